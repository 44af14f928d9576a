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

With ``l1_layout = "panoseti_analysis"`` the store follows the team's analysis storage
spec instead (§5 of their ``docs/storage_spec.md``): in the run's ``L0/`` level, one flat
store per hashset (source kind), ``hk.<hashset>.zarr``: ``quabo`` (every
``QUABO_<BOARDLOC>``, with ``module`` and ``quabo`` coordinates), else the source's name
in lower case (``gpsprim``, ``gpssupp``, ``wrswitch``, ``wps``). Each is a table over its
own ``hk_time`` dimension, records stably sorted by ``hk_t_ns`` (int64 ns of
``Computer_UTC``, no CF units: the team reads it as integers), the fields typed as above
over the kind's records together. Root attributes: theirs (``hashset``, their storage
version, ``processing_history`` with one ``build_hk`` step, as their ``pa-hk`` writes)
and ours (``content``, ``sources``, ``records``, ``cadence_ns``: the median interval
between consecutive records of one source, ``renamed``, ``created``, ``software``). The
quicklook stays in ``<run>.housekeeping/``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
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
QUABO_HASHSET = "quabo"
HASHSET_PREFIX = "hk."  # the team's layout: L0/hk.<hashset>.zarr
HK_TIME, HK_DIM = "hk_t_ns", "hk_time"  # the team's time coordinate and its dimension
_COORD_ATTRS = {
    HK_TIME: {"long_name": "host clock (Computer_UTC) of the record, ns since 1970-01-01"},
    "module": {"long_name": "module of the quabo board (BOARDLOC // 4)"},
    "quabo": {"long_name": "quabo of the board in its module (BOARDLOC % 4)"}}
_INT = r"[+-]?(?:0|[1-9]\d*)"
_FLOAT = r"[+-]?(?:(?:0|[1-9]\d*)(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
# every value of a column a number: one regex pass over the values joined by newlines
_ALL_INT = re.compile(rf"(?:{_INT}\n)*{_INT}")
_ALL_FLOAT = re.compile(rf"(?:{_FLOAT}\n)*{_FLOAT}")
_UTC = re.compile(r"(\d+)(?:\.(\d*))?\Z")
_MAX_NS = np.iinfo(np.int64).max
#: names a Zarr node may not have: its own metadata file, Zarr v2's, the time array's
_RESERVED = {"", "time", "zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata"}
#: in a hashset store, the coordinates' names too (and "time" is free)
_HASHSET_RESERVED = (_RESERVED - {"time"}) | set(_COORD_ATTRS)
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
    rows: dict[str, list[tuple[int, dict[str, str]]]]  # source as written -> (t ns, fields)


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
        if group != source:
            renamed[group] = source
        times, columns, names[group] = _table(rows[source], _RESERVED)
        renamed.update({f"{group}/{name}": field for name, field in names[group].items()
                        if name != field})
        series[group] = {"time": times, **columns}
    return Housekeeping(series, names, records, cut, cut_bytes, unreadable, n_bad, renamed,
                        rows)


def _table(recs: list[tuple[int, dict[str, str]]], reserved: set[str]
           ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, str]]:
    """Records -> (their times, one :func:`column` per field in order of appearance,
    array name -> field as written); ``reserved``: names no field array may take."""
    order = list(dict.fromkeys(f for _, fields in recs for f in fields if f != TIME_FIELD))
    names = node_names(order, reserved)
    columns = {name: column([fields.get(field) for _, fields in recs])
               for name, field in names.items()}
    return np.array([t for t, _ in recs], dtype=np.int64), columns, names


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


def node_name(name: str, reserved: set[str] = _RESERVED) -> str:
    """A Zarr node name for a source or field: no ``/`` or NUL, at most
    :data:`_MAX_NAME_BYTES` bytes; ``field_`` before a name Zarr or the store's own arrays
    reserve (``""``, dots only, ``zarr.json``, ``.z*`` metadata, ``__*``, ``reserved``)."""
    name = name.replace("/", "_").replace("\0", "_")
    name = name.encode()[:_MAX_NAME_BYTES].decode(errors="ignore")
    taken = name in reserved or not name.strip(".") or name.startswith("__")
    return f"field_{name}" if taken else name


def node_names(names: Iterable[str], reserved: set[str] = _RESERVED) -> dict[str, str]:
    """Node name -> name as written, for distinct ``names``, in their order: a name that is
    a node name already keeps it; the others get :func:`node_name`, and ``_2``, ``_3``,
    ... after a name already taken, so that no two become one."""
    names = list(names)
    taken = {name for name in names if node_name(name, reserved) == name}
    nodes = {}
    for name in names:
        if name in taken:
            nodes[name] = name
            continue
        base = candidate = node_name(name, reserved)
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
    """Write ``hk`` as a Zarr v3 store at ``path`` (one group per source, consolidated)."""
    from panoseti_pipeline.store.layout import software_versions
    from panoseti_pipeline.store.publish import utc_now

    async def fill(root: Any) -> None:
        import asyncio

        groups = await asyncio.gather(*(
            root.create_group(source, attributes=_source_attrs(hk.renamed.get(source, source)))
            for source in hk.series))
        await asyncio.gather(*(
            _write_field(group, name, values, "time",
                         TIME_ATTRS if name == "time" else {"hk_field": hk.fields[source][name]})
            for group, (source, table) in zip(groups, hk.series.items(), strict=True)
            for name, values in table.items()))

    _write_store(path, fill, lambda _checksum: {
        "content": "housekeeping", "source_file": source_file.name,
        "source_bytes": source_file.stat().st_size, "records": hk.records,
        "records_by_source": {s: int(t["time"].size) for s, t in hk.series.items()},
        "cut_last_record": hk.cut_last_record, "cut_bytes": hk.cut_bytes,
        "unreadable_records": hk.unreadable_count,
        "unreadable_records_listed": hk.unreadable, "renamed": hk.renamed,
        "created": utc_now(), "software": software_versions()})


def _write_store(path: str | os.PathLike, fill: Callable[[Any], Awaitable[None]],
                 root_attrs: Callable[[str], dict[str, Any]]) -> None:
    """A Zarr v3 store at ``path`` (not over anything there), consolidated: ``fill`` makes
    its nodes, ``root_attrs(checksum of its data files)`` its root attributes.

    A night's hk.pff has hundreds of small fields. Through zarr's file store each array
    costs a few blocking file operations; so the store is built in memory, its arrays
    concurrently, and its files then written in one pass (353 fields: 2.2 s -> 1.1 s).
    """
    import asyncio

    import zarr
    import zarr.api.asynchronous as azarr
    from zarr.core.buffer import default_buffer_prototype

    from panoseti_pipeline.store.analysis_spec import bytes_checksum
    from panoseti_pipeline.store.layout import consolidate
    from panoseti_pipeline.store.safe_write import write_file

    memory = zarr.storage.MemoryStore()

    async def files() -> dict[str, bytes]:
        keys = [key async for key in memory.list()]
        values = await asyncio.gather(*(memory.get(k, default_buffer_prototype()) for k in keys))
        return {k: v.to_bytes() for k, v in zip(keys, values, strict=True)}

    async def build() -> dict[str, bytes]:
        root = await azarr.open_group(store=memory, mode="w-")
        await fill(root)
        await root.update_attributes(root_attrs(bytes_checksum(await files())))
        consolidate(memory)
        return await files()

    written = asyncio.run(build())
    Path(path).mkdir()  # as zarr's mode "w-": not over anything there
    for directory in sorted({Path(path, key).parent for key in written}):
        directory.mkdir(exist_ok=True)  # parents first (sorted)
    for key, data in written.items():
        write_file(Path(path, key), data)


async def _write_field(group: Any, name: str, values: np.ndarray, dim: str,
                       attrs: dict[str, Any]) -> None:
    """One field of a source (or its time, or a coordinate) as a 1-D array on ``dim``."""
    dtype = str if values.dtype == object else values.dtype
    fill = "" if dtype is str else (np.nan if values.dtype.kind == "f" else 0)
    n = values.size
    array = await group.create_array(name, shape=(n,), chunks=(max(1, min(n, 65536)),),
                                     dtype=dtype, fill_value=fill, dimension_names=(dim,),
                                     attributes={"_ARRAY_DIMENSIONS": [dim], **attrs})
    await array.setitem(slice(None), values)


# ------------------------------------------------------------ the team's layout: hashsets


@dataclasses.dataclass
class Hashset:
    """The records of one source kind (all ``QUABO_<BOARDLOC>`` are ``quabo``), as one
    table over ``hk_t_ns``: ``coords`` the time (and module, quabo), ``columns`` the
    fields (:func:`column`, over the kind's records together)."""

    name: str
    sources: list[str]  # as written, in order of appearance
    coords: dict[str, np.ndarray]
    columns: dict[str, np.ndarray]
    fields: dict[str, str]  # array name -> field as written
    cadence_ns: int | None


def hashset_of(source: str) -> str:
    """A source's hashset: ``quabo`` for every quabo board, else its name in lower case
    (``GPSPRIM`` -> ``gpsprim``), made a node name."""
    if source.startswith(QUABO_PREFIX) and source.removeprefix(QUABO_PREFIX).isdigit():
        return QUABO_HASHSET
    return node_name(source.lower())


def hashsets(hk: Housekeeping) -> dict[str, Hashset]:
    """``hk``'s records by hashset, each stably sorted by time (records of one instant
    keep their order in the file); a quabo record gets its ``module`` and ``quabo``."""
    kinds: dict[str, list[str]] = {}
    for source in hk.rows:
        kinds.setdefault(hashset_of(source), []).append(source)
    out = {}
    for name, sources in kinds.items():
        recs = sorted(((t, fields, source) for source in sources
                       for t, fields in hk.rows[source]), key=lambda r: r[0])
        times, columns, fields = _table([(t, f) for t, f, _ in recs], _HASHSET_RESERVED)
        coords = {HK_TIME: times}
        if name == QUABO_HASHSET:
            boardloc = np.array([int(s.removeprefix(QUABO_PREFIX)) for _, _, s in recs],
                                dtype=np.int64)
            coords.update(module=boardloc // 4, quabo=boardloc % 4)
        out[name] = Hashset(name, sources, coords, columns, fields,
                            _cadence_ns([hk.rows[s] for s in sources]))
    return out


def _cadence_ns(per_source: list[list[tuple[int, dict[str, str]]]]) -> int | None:
    """The median interval between consecutive records of one source (None: no source
    has two records at distinct times)."""
    gaps = np.concatenate([np.diff(np.sort(np.array([t for t, _ in recs], dtype=np.int64)))
                           for recs in per_source])
    gaps = gaps[gaps > 0]
    return int(np.median(gaps)) if gaps.size else None


def hashset_store_name(hashset: str) -> str:
    """``hk.<hashset>.zarr``: the store of one hashset in the team's ``L0/`` level."""
    return f"{HASHSET_PREFIX}{hashset}.zarr"


def is_hashset_store(path: str | os.PathLike) -> bool:
    """True for a ``hk.<hashset>.zarr`` this pipeline wrote (its root attributes say so)."""
    from panoseti_pipeline.errors import InputError
    from panoseti_pipeline.store.facts import read_root

    try:
        attrs = read_root(path)[1].get("attributes") or {}
    except InputError:
        return False
    return is_hashset_root(attrs)


def is_hashset_root(attrs: Mapping[str, Any]) -> bool:
    """True for the root attributes of a ``hk.<hashset>.zarr`` (:func:`write_hashset_store`)."""
    return attrs.get("content") == "housekeeping" and "hashset" in attrs


def find_hashset_stores(level_dir: str | os.PathLike) -> list[Path]:
    """The ``hk.<hashset>.zarr`` stores of the team's layout in a level directory."""
    return [p for p in sorted(Path(level_dir).glob(f"{HASHSET_PREFIX}*.zarr"))
            if is_hashset_store(p)]


def write_hashset_store(hs: Hashset, path: str | os.PathLike, source_file: Path,
                        source_checksum: str, created: str) -> None:
    """One hashset as a flat Zarr v3 store at ``path``: every array on ``hk_time``, the
    coordinates (``hk_t_ns`` int64 ns, ``module``, ``quabo``) named in each field's
    ``coordinates`` attribute (so xarray opens them as coordinates); root attributes the
    team's (``hashset``, their storage version, ``processing_history``) and ours."""
    from panoseti_pipeline.store.analysis_spec import (
        STORAGE_VERSION,
        STORAGE_VERSION_KEY,
        processing_step,
    )
    from panoseti_pipeline.store.layout import software_versions

    software = software_versions()
    coordinates = " ".join(hs.coords)

    async def fill(root: Any) -> None:
        import asyncio

        await asyncio.gather(
            *(_write_field(root, name, values, HK_DIM, _COORD_ATTRS[name])
              for name, values in hs.coords.items()),
            *(_write_field(root, name, values, HK_DIM,
                           {"hk_field": hs.fields[name], "coordinates": coordinates})
              for name, values in hs.columns.items()))

    def root_attrs(checksum: str) -> dict[str, Any]:
        step = processing_step("build_hk", {"hashset": hs.name}, [source_checksum], checksum,
                               created, software)
        return {"hashset": hs.name, STORAGE_VERSION_KEY: STORAGE_VERSION,
                "processing_history": [step], "content": "housekeeping",
                "source_file": source_file.name, "sources": hs.sources,
                "records": int(hs.coords[HK_TIME].size), "cadence_ns": hs.cadence_ns,
                "renamed": {n: f for n, f in hs.fields.items() if n != f},
                "created": created, "software": software}

    _write_store(path, fill, root_attrs)


def publish_hashset_stores(hk: Housekeeping, level_dir: Path, source_file: Path,
                           notice: Callable[[str], None]) -> list[Path]:
    """``hk.<hashset>.zarr`` of every hashset of ``hk`` in ``level_dir``, each built under
    a ``.partial`` name and renamed into place (what a killed run left there cleared
    first, with a ``notice``); a store there is replaced only if it is a hashset store
    this pipeline wrote. ``source_file``: the hk.pff they come from."""
    import functools

    from panoseti_pipeline.store import publish
    from panoseti_pipeline.store.analysis_spec import file_checksum

    created, checksum = publish.utc_now(), file_checksum(source_file)
    written = []
    for name, hs in hashsets(hk).items():
        final = level_dir / hashset_store_name(name)
        for message in publish.clear_stale(final):
            notice(message)
        with publish.staged(final, functools.partial(_hashset_replace_problem, final),
                            "a housekeeping store") as tmp:
            write_hashset_store(hs, tmp, source_file, checksum, created)
        written.append(final)
    return written


def _hashset_replace_problem(final: Path) -> str | None:
    if not (final.exists() or final.is_symlink()) or (
            not final.is_symlink() and is_hashset_store(final)):
        return None
    return (f"{final}: exists and is not a housekeeping store this pipeline wrote; "
            "refusing to replace it (move it away or choose another output)")


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


def convert_hk(hk_file: str | os.PathLike, store: str | os.PathLike | None,
               png: str | os.PathLike | None = None, *,
               hk_level: str | os.PathLike | None = None,
               notice: Callable[[str], None] = print) -> dict[str, Any]:
    """``hk.pff`` (read and parsed once) -> our store (``store``), its quicklook (``png``)
    and, ``hk_level``, the team's ``hk.<hashset>.zarr`` stores in that level directory;
    return what the run bundle's manifest keeps (``hk_stores``: their paths)."""
    hk_file = Path(hk_file)
    hk = parse_hk(hk_file.read_bytes())
    if store is not None:
        write_hk_store(hk, store, hk_file)
    hk_stores = (publish_hashset_stores(hk, Path(hk_level), hk_file, notice) if hk_level
                 else [])
    if png is not None:
        name = Path(store).name if store is not None else Path(png).stem.removesuffix(".hk")
        plot_hk(hk, png, title=f"{name}: temperatures and HV")
    return {"store": Path(store).name if store is not None else None,
            "quicklook": Path(png).name if png is not None else None,
            "hk_stores": [str(p) for p in hk_stores],
            "records": hk.records, "cut_last_record": hk.cut_last_record,
            "unreadable_records": hk.unreadable_count, "renamed": hk.renamed,
            "sources": sorted(hk.series)}
