"""Housekeeping: ``hk.pff`` -> ``<run>.hk.zarr`` (time series per source) and its quicklook.

``hk.pff`` (PFF_FORMAT.md §8) is single-line JSON records separated by a blank line, each
``{"<source>": {"Computer_UTC": "<unix s.fraction>", "<field>": "<string>", ...}}``; sources
are ``QUABO_<BOARDLOC>`` (one per quabo board, BOARDLOC = 4 * module + quabo), ``GPSPRIM``,
``GPSSUPP``, ``WRSWITCH``, ``WPS``. Every value is a string; the recorder is usually killed,
so the file ends inside its last record.

The store has one group per source, each a table over its own ``time`` dimension:

* ``time``: int64 ns since the epoch (the record's ``Computer_UTC``, exact to the ns, CF
  ``units`` so xarray gives ``datetime64[ns]``): the host clock, never the GPS time, which a
  receiver after a week-number rollover reports in 1999;
* one array per field, ``int64`` where every value is a decimal integer, ``float64`` where
  every value is a decimal number (``""`` or a field a record lacks: NaN), otherwise the
  strings as written (``"0x28b4667a"``, ``"0208"``, ``"Doing fixes"``; absent: ``""``). A
  number with a leading zero (``"0208"``, a firmware version) stays a string. Attribute
  ``hk_field`` holds the field's name as written, group attribute ``hk_source`` the
  source's (:func:`node_name`: an array or group name has ``/`` and NUL replaced, and
  ``field_`` before a name Zarr or the ``time`` array reserves; two names that would
  become one get ``_2``, ``_3``, ...: every rename is a notice, no field is lost).

Root attributes: ``content = "housekeeping"`` (no ``processing_level``: it is not a data
product), ``source_file`` and its size, ``records`` (read), ``records_by_source``,
``cut_last_record`` (0 or 1: the file ended inside a record, which is dropped),
``cut_bytes``, ``unreadable_records`` (offset and reason of any other record that is not
one JSON object of UTF-8 strings with a usable ``Computer_UTC``: one bad record is
dropped and counted, never the store), ``renamed`` (stored name -> name as written),
``created``, ``software``.

The store and its quicklook live in ``<run>.housekeeping/`` beside the run bundle
(:mod:`panoseti_pipeline.run_bundle`): not in the bundle, which pypff lists file by file
as the run's sidecars (``list_sidecars``), and not as a top-level ``*.zarr`` beside the
products, which PANOSETI's ``open_zarr_run`` keys as a data product. A night of
housekeeping is a few MB, so the file is read whole.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

HK_STORE_SUFFIX = ".hk.zarr"
HK_QUICKLOOK_SUFFIX = ".hk.png"
HK_DIR_SUFFIX = ".housekeeping"  # <run>.housekeeping/: the store and its PNG, beside the bundle
RECORD_SEPARATOR = b"\n\n"
TIME_FIELD = "Computer_UTC"
TIME_ATTRS = {"units": "nanoseconds since 1970-01-01", "calendar": "proleptic_gregorian",
              "long_name": "host clock (Computer_UTC) of the record"}
QUABO_PREFIX = "QUABO_"
_INT = r"[+-]?(?:0|[1-9]\d*)"
_FLOAT = r"[+-]?(?:(?:0|[1-9]\d*)(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
# every value of a column a number: one regex pass over the values joined by newlines
_ALL_INT = re.compile(rf"(?:{_INT}\n)*{_INT}")
_ALL_FLOAT = re.compile(rf"(?:{_FLOAT}\n)*{_FLOAT}")
_UTC = re.compile(r"(\d+)(?:\.(\d*))?\Z")
_MAX_NS = np.iinfo(np.int64).max
#: names a Zarr node may not have: its own metadata file, Zarr v2's, the time array's
_RESERVED = {"", "time", "zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata"}
_MAX_NAME_BYTES = 200  # a file name holds 255 bytes; room for the _<n> of a collision
_MAX_REPORTED = 20  # unreadable records listed by offset in the attributes


@dataclasses.dataclass
class Housekeeping:
    """The parsed records: ``series[source][field]`` arrays, ``series[source]["time"]`` ns."""

    series: dict[str, dict[str, np.ndarray]]
    fields: dict[str, dict[str, str]]  # source -> array name -> field name as written
    records: int
    cut_last_record: int
    cut_bytes: int
    unreadable: list[dict[str, Any]]
    unreadable_count: int
    renamed: dict[str, str]  # "<group>[/<array>]" -> the source or field as written


def utc_to_ns(text: str) -> int:
    """``Computer_UTC`` ("1754110800.0123456") -> int ns, exactly (digits past ns dropped)."""
    m = _UTC.match(text.strip())
    if not m:
        raise ValueError(f"Computer_UTC {text!r} is not Unix seconds")
    frac = (m.group(2) or "")[:9].ljust(9, "0")
    t_ns = int(m.group(1)) * 1_000_000_000 + int(frac)
    if t_ns > _MAX_NS:
        raise ValueError(f"Computer_UTC {text!r} is out of range (after 2262)")
    return t_ns


def parse_hk(data: bytes) -> Housekeeping:
    """Split ``hk.pff`` bytes into records and the records into one table per source."""
    pieces = data.split(RECORD_SEPARATOR)
    rows: dict[str, list[tuple[int, Mapping[str, str]]]] = {}
    unreadable: list[dict[str, Any]] = []
    n_bad = cut = cut_bytes = records = 0
    offset = 0
    for k, piece in enumerate(pieces):
        start, offset = offset, offset + len(piece) + len(RECORD_SEPARATOR)
        if not piece.strip():
            continue
        last = k == len(pieces) - 1
        try:
            source, fields, t_ns = _record(piece)
        except ValueError as err:
            if last:  # the recorder was killed inside its last record
                cut, cut_bytes = 1, len(piece)
            else:
                n_bad += 1
                if len(unreadable) < _MAX_REPORTED:
                    unreadable.append({"offset": start, "length": len(piece),
                                       "reason": str(err)})
            continue
        rows.setdefault(source, []).append((t_ns, fields))
        records += 1
    series: dict[str, dict[str, np.ndarray]] = {}
    names: dict[str, dict[str, str]] = {}
    renamed: dict[str, str] = {}
    for group, source in node_names(rows).items():
        recs = rows[source]
        if group != source:
            renamed[group] = source
        order = list(dict.fromkeys(f for _, fields in recs for f in fields if f != TIME_FIELD))
        table = {"time": np.array([t for t, _ in recs], dtype=np.int64)}
        names[group] = {}
        for name, field in node_names(order).items():
            table[name] = column([fields.get(field) for _, fields in recs])
            names[group][name] = field
            if name != field:
                renamed[f"{group}/{name}"] = field
        series[group] = table
    return Housekeeping(series, names, records, cut, cut_bytes, unreadable, n_bad, renamed)


def _record(piece: bytes) -> tuple[str, dict[str, str], int]:
    """(source, fields, time ns) of one record; ValueError saying why it is not one."""
    try:
        obj = json.loads(piece)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"not JSON ({err})") from None
    if not (isinstance(obj, dict) and len(obj) == 1):
        raise ValueError("not one {source: {fields}} object")
    ((source, fields),) = obj.items()
    if not (isinstance(fields, dict) and all(isinstance(v, str) for v in fields.values())):
        raise ValueError(f"{source}: fields are not all strings")
    try:  # a lone surrogate ("\\ud800") is valid JSON, not text a store can hold
        "".join([source, *fields, *fields.values()]).encode()
    except UnicodeEncodeError:
        raise ValueError(f"{source!r}: a name or value is not UTF-8 text") from None
    if TIME_FIELD not in fields:
        raise ValueError(f"{source}: no {TIME_FIELD}")
    return source, fields, utc_to_ns(fields[TIME_FIELD])


def node_name(name: str) -> str:
    """A Zarr node name for a source or field: no ``/`` or NUL, at most
    :data:`_MAX_NAME_BYTES` bytes; ``field_`` before a name Zarr or the time array
    reserves (``""``, dots only, ``time``, ``zarr.json``, ``.z*`` metadata, ``__*``)."""
    name = name.replace("/", "_").replace("\0", "_")
    name = name.encode()[:_MAX_NAME_BYTES].decode(errors="ignore")
    reserved = name in _RESERVED or not name.strip(".") or name.startswith("__")
    return f"field_{name}" if reserved else name


def node_names(names: Iterable[str]) -> dict[str, str]:
    """Node name -> name as written, for distinct ``names``, in their order: a name that is
    a node name already keeps it; the others get :func:`node_name`, and ``_2``, ``_3``,
    ... after a name already taken, so that no two become one."""
    names = list(names)
    taken = {name for name in names if node_name(name) == name}
    nodes = {}
    for name in names:
        if name in taken:
            nodes[name] = name
            continue
        base = candidate = node_name(name)
        n = 1
        while candidate in taken:
            n += 1
            candidate = f"{base}_{n}"
        taken.add(candidate)
        nodes[name] = candidate
    return {node: name for name, node in nodes.items()}


def column(values: list[str | None]) -> np.ndarray:
    """One field's values: int64, float64 (NaN where empty or absent) or the strings.

    The distinct values are matched at once, joined by newlines; a value holding a
    newline could pass that test in pieces, but numpy's conversion then refuses it.
    """
    strings = ["" if v is None else v for v in values]
    joined = "\n".join({v for v in values if v})
    try:
        if joined and all(values) and _ALL_INT.fullmatch(joined):
            return np.array(strings, dtype=str).astype(np.int64)
        if joined and _ALL_FLOAT.fullmatch(joined):
            return np.array([v or "nan" for v in strings], dtype=str).astype(np.float64)
    except (ValueError, OverflowError):  # beyond int64, or a newline inside a value
        pass
    out = np.empty(len(strings), dtype=object)  # not via numpy's str: it drops trailing NULs
    out[:] = strings
    return out


def hk_names(run_dir: str | os.PathLike) -> tuple[str, str, str]:
    """``(<run>.housekeeping, <run>.hk.zarr, <run>.hk.png)``, ``<run>`` the run directory's
    name minus ``.pffd``: the directory beside the bundle, the store and PNG in it."""
    run = Path(os.path.abspath(run_dir)).name.removesuffix(".pffd")
    return run + HK_DIR_SUFFIX, run + HK_STORE_SUFFIX, run + HK_QUICKLOOK_SUFFIX


def find_hk(directory: str | os.PathLike, suffix: str = HK_STORE_SUFFIX) -> list[Path]:
    """The housekeeping stores (or, ``suffix`` ``.hk.png``, PNGs) of the runs whose
    products are in ``directory``."""
    return sorted(Path(directory).glob(f"*{HK_DIR_SUFFIX}/*{suffix}"))


def write_hk_store(hk: Housekeeping, path: str | os.PathLike, source_file: Path) -> None:
    """Write ``hk`` as a Zarr v3 store at ``path`` (one group per source, consolidated).

    A night's hk.pff has hundreds of small fields. Through zarr's file store each array
    costs a few blocking file operations; so the store is built in memory, its arrays
    concurrently, and its files then written in one pass (353 fields: 2.2 s -> 1.1 s).
    """
    import asyncio

    import zarr
    import zarr.api.asynchronous as azarr
    from zarr.core.buffer import default_buffer_prototype

    from panoseti_pipeline.store.layout import consolidate, software_versions
    from panoseti_pipeline.store.publish import utc_now
    from panoseti_pipeline.store.safe_write import write_file

    memory = zarr.storage.MemoryStore()

    async def build() -> dict[str, bytes]:
        root = await azarr.open_group(store=memory, mode="w-")
        await root.update_attributes({
            "content": "housekeeping", "source_file": source_file.name,
            "source_bytes": source_file.stat().st_size, "records": hk.records,
            "records_by_source": {s: int(t["time"].size) for s, t in hk.series.items()},
            "cut_last_record": hk.cut_last_record, "cut_bytes": hk.cut_bytes,
            "unreadable_records": hk.unreadable_count,
            "unreadable_records_listed": hk.unreadable, "renamed": hk.renamed,
            "created": utc_now(),
            "software": software_versions()})
        groups = await asyncio.gather(*(
            root.create_group(source, attributes=_source_attrs(hk.renamed.get(source, source)))
            for source in hk.series))
        await asyncio.gather(*(
            _write_field(group, name, values, None if name == "time" else hk.fields[source][name])
            for group, (source, table) in zip(groups, hk.series.items(), strict=True)
            for name, values in table.items()))
        consolidate(memory)
        keys = [key async for key in memory.list()]
        values = await asyncio.gather(*(memory.get(k, default_buffer_prototype()) for k in keys))
        return {k: v.to_bytes() for k, v in zip(keys, values, strict=True)}

    files = asyncio.run(build())
    Path(path).mkdir()  # as zarr's mode "w-": not over anything there
    for directory in sorted({Path(path, key).parent for key in files}):
        directory.mkdir(exist_ok=True)  # parents first (sorted)
    for key, data in files.items():
        write_file(Path(path, key), data)


async def _write_field(group: Any, name: str, values: np.ndarray, field: str | None) -> None:
    """One field of a source (or its ``time``) as a 1-D array on ``time``."""
    attrs = TIME_ATTRS if name == "time" else {"hk_field": field}
    dtype = str if values.dtype == object else values.dtype
    fill = "" if dtype is str else (np.nan if values.dtype.kind == "f" else 0)
    n = values.size
    array = await group.create_array(name, shape=(n,), chunks=(max(1, min(n, 65536)),),
                                     dtype=dtype, fill_value=fill, dimension_names=("time",),
                                     attributes={"_ARRAY_DIMENSIONS": ["time"], **attrs})
    await array.setitem(slice(None), values)


def _source_attrs(source: str) -> dict[str, Any]:
    """A QUABO_<BOARDLOC> group says which module and quabo it is."""
    attrs: dict[str, Any] = {"hk_source": source}
    boardloc = source.removeprefix(QUABO_PREFIX)
    if source.startswith(QUABO_PREFIX) and boardloc.isdigit():
        attrs.update(boardloc=int(boardloc), module=int(boardloc) // 4,
                     quabo=int(boardloc) % 4)
    return attrs


def plot_hk(hk: Housekeeping, png: str | os.PathLike, title: str = "") -> None:
    """Quicklook PNG: detector and FPGA temperature and HV of every quabo board over time."""
    import matplotlib.pyplot as plt

    fig = hk_figure(hk, title)
    fig.savefig(png, dpi=90)
    plt.close(fig)


def hk_figure(hk: Housekeeping, title: str = "") -> Any:
    """The housekeeping quicklook as a matplotlib figure (closed by the caller); time
    ticks in UTC with date and hour (a night crosses midnight)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    panels = (("TEMP1", "detector °C"), ("TEMP2", "FPGA °C"), ("HVMON", "HV (V)"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 8), sharex=True)
    quabos = sorted((s for s in hk.series if s.startswith(QUABO_PREFIX)), key=lambda s: (len(s), s))
    n = len(quabos)
    colors = (plt.get_cmap("tab10")(np.arange(n)) if n <= 10
              else plt.get_cmap("turbo")(np.linspace(0, 1, n)))
    for ax, (field, label) in zip(axes, panels, strict=True):
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        for k, source in enumerate(quabos):
            table = hk.series[source]
            t = table["time"].astype("datetime64[ns]")
            attrs = _source_attrs(source)
            who = (f"module {attrs['module']} quabo {attrs['quabo']}" if "module" in attrs
                   else source)
            names = [c for c in table if (c == field or re.fullmatch(rf"{field}\d", c))
                     and table[c].dtype.kind in "fi"]
            for j, name in enumerate(names):
                ax.plot(t, table[name], ".-", ms=3, lw=0.8, color=colors[k],
                        label=who if j == 0 else None)
    if not quabos:
        axes[0].text(0.5, 0.5, "no quabo records in hk.pff", ha="center",
                     transform=axes[0].transAxes)
    elif len(quabos) <= 16:
        axes[0].legend(fontsize="x-small", ncol=4, loc="best")
    if quabos:  # times: matplotlib's dates are UTC unless told otherwise
        axes[-1].xaxis.set_major_locator(mdates.AutoDateLocator(maxticks=8))
        axes[-1].xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d %H:%M:%S"))
    axes[-1].set_xlabel("UTC (Computer_UTC of the record)")
    fig.suptitle(title or "housekeeping", fontsize="medium")
    fig.autofmt_xdate()
    fig.tight_layout()
    return fig


def convert_hk(hk_file: str | os.PathLike, store: str | os.PathLike,
               png: str | os.PathLike | None = None) -> dict[str, Any]:
    """``hk.pff`` -> store (and quicklook); return what the run bundle's manifest keeps."""
    hk_file, store = Path(hk_file), Path(store)
    hk = parse_hk(hk_file.read_bytes())
    write_hk_store(hk, store, hk_file)
    if png is not None:
        plot_hk(hk, png, title=f"{store.name}: temperatures and HV")
    return {"store": store.name, "quicklook": Path(png).name if png is not None else None,
            "records": hk.records, "cut_last_record": hk.cut_last_record,
            "unreadable_records": hk.unreadable_count, "renamed": hk.renamed,
            "sources": sorted(hk.series)}
