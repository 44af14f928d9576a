"""PFF file and observation-directory names (PFF_FORMAT.md §6).

A data file is named ``start_<time>Z.dp_<dp>.bpp_<n>.module_<n>.seqno_<n>.pff`` and sits
in an observation directory ``obs_<site>.start_<time>Z.runtype_<type>.pffd``: pairs
joined by ``.``, key and value split at the first ``_``. Only the name says which data
product and module a file holds, so it is checked as strictly as the bytes: an unknown
product and a ``bpp`` that disagrees with it are refused; unknown keys are kept.
``hk.pff`` (housekeeping) sits in the same directory and is never image data.

Notes
-----
* The time inside ``start_`` has ``:``, ``-`` or ``_`` between hours, minutes and
  seconds; all three parse to the same aware UTC (splitting on every ``_`` would not).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
from collections.abc import Sequence
from pathlib import Path

from panoseti_pipeline.errors import PFFNameError
from panoseti_pipeline.pff.products import PRODUCTS, Product

_START_RE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})T(\d{2})[:_-](\d{2})[:_-](\d{2})Z?$")
HOUSEKEEPING_NAME = "hk.pff"


DATA_FILE_PATTERN = "start_<time>Z.dp_<dp>.bpp_<n>.module_<n>.seqno_<n>.pff"
RUN_DIR_PATTERN = "obs_<site>.start_<time>Z.runtype_<type>.pffd"
#: how each part of a name reads: key -> the form of its value, its parser
_PART_FORMS = {"start": ("<YYYY-mm-ddTHH:MM:SS>Z", lambda value: parse_start(value)),
               "dp": ("<dp>", str), "obs": ("<site>", str), "runtype": ("<type>", str),
               "bpp": ("<n>", int), "module": ("<n>", int), "seqno": ("<n>", int)}


def _pairs(stem: str) -> dict[str, str]:
    """``k1_v1.k2_v2`` -> {k1: v1, k2: v2}; key and value split at the first ``_``."""
    out = {}
    for part in stem.split("."):
        key, sep, value = part.partition("_")
        if not sep or not key:
            raise ValueError(f"part {part!r} is not <key>_<value>")
        out[key] = value
    return out


def _parts(stem: str, keys: Sequence[str]) -> tuple[list, dict[str, str]]:
    """The values of ``keys`` parsed, and the other pairs; ValueError names the part."""
    pairs = _pairs(stem)
    values = []
    for key in keys:
        form, parse = _PART_FORMS[key]
        if key not in pairs:
            raise ValueError(f"no part {key}_{form}")
        raw = pairs.pop(key)
        try:
            values.append(parse(raw))
        except ValueError:
            raise ValueError(f"part {key}_{raw} is not {key}_{form}") from None
    return values, pairs


def parse_start(text: str) -> dt.datetime:
    """``2024-07-25T04:34:46Z`` (``:``, ``-`` or ``_`` between h, m, s) -> aware UTC."""
    m = _START_RE.match(text)
    if not m:
        raise ValueError(text)
    return dt.datetime(*map(int, m.groups()), tzinfo=dt.timezone.utc)


@dataclasses.dataclass(frozen=True)
class PFFName:
    """Fields of a data file name ``start_….dp_….bpp_….module_….seqno_….pff``."""

    path: Path
    start: dt.datetime
    dp: str
    bpp: int
    module: int
    seqno: int
    extra: dict[str, str]

    @property
    def product(self) -> Product:
        return PRODUCTS[self.dp]


def missing_seqnos(names: Sequence[PFFName]) -> list[int]:
    """Seqnos absent between the first and last of a stream's files (a lost file)."""
    have = {n.seqno for n in names}
    return [k for k in range(min(have), max(have)) if k not in have] if have else []


@dataclasses.dataclass(frozen=True)
class RunName:
    """Fields of an observation directory ``obs_….start_….runtype_….pffd``."""

    path: Path
    site: str
    start: dt.datetime
    runtype: str
    extra: dict[str, str]

    def as_attrs(self) -> dict[str, str]:
        return {"name": self.path.name, "site": self.site, "run_start": self.start.isoformat(),
                "run_type": self.runtype, **self.extra}


def parse_name(path: str | os.PathLike) -> PFFName:
    """Parse a PFF data file name; :class:`PFFNameError` says what is wrong with it."""
    p = Path(path)
    if p.name == HOUSEKEEPING_NAME:
        raise PFFNameError(f"{p}: is housekeeping (hk.pff), not image or pulse-height data")
    if p.suffix != ".pff":
        raise PFFNameError(f"{p}: not a PFF data file name (expected {DATA_FILE_PATTERN})")
    try:
        (start, dp, bpp, module, seqno), pairs = _parts(
            p.name[: -len(".pff")], ("start", "dp", "bpp", "module", "seqno"))
    except ValueError as err:
        raise PFFNameError(f"{p}: not a PFF data file name: {err} "
                           f"(expected {DATA_FILE_PATTERN})") from None
    product = PRODUCTS.get(dp)
    if product is None:
        raise PFFNameError(f"{p}: unknown data product dp_{dp} (known: {', '.join(PRODUCTS)})")
    if bpp != product.bpp:
        raise PFFNameError(f"{p}: bpp_{bpp} disagrees with dp_{dp} (which has bpp_{product.bpp})")
    return PFFName(p, start, dp, bpp, module, seqno, pairs)


def parse_run_dir(path: str | os.PathLike) -> RunName:
    """Parse an observation directory name ``obs_<site>.start_<time>Z.runtype_<t>.pffd``."""
    p = Path(path)
    if p.suffix != ".pffd":
        raise PFFNameError(f"{p}: not a PFF observation directory name (must end in .pffd)")
    stem = p.name[: -len(".pffd")]
    try:
        (site, start), pairs = _parts(stem, ("obs", "start"))
        runtype = pairs.pop("runtype", "")
    except ValueError as err:
        raise PFFNameError(f"{p}: not a PFF observation directory name: {err} "
                           f"(expected {RUN_DIR_PATTERN})") from None
    return RunName(p, site, start, runtype, pairs)


def is_housekeeping(path: str | os.PathLike) -> bool:
    return Path(path).name == HOUSEKEEPING_NAME


def run_of(path: str | os.PathLike) -> RunName | None:
    """The observation run a data file belongs to, when it sits in a ``.pffd`` dir."""
    parent = Path(path).resolve().parent
    try:
        return parse_run_dir(parent)
    except PFFNameError:
        return None
