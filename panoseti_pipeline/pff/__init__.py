"""The PANOSETI File Format (PFF): names, frame index, exact reading, time, writing.

This module is the one place that knows PFF (see PFF_FORMAT.md). A data file is frames
back to back, no file header, no index::

    frame  := header "\\n\\n" "*" pixels
    header := ASCII JSON written by fixed printf formats (fixed width, space padded)
    pixels := little-endian, row-major, size fixed by the data product

Contract
--------
* :func:`index_file` finds every frame's byte offset by streaming the file through one
  reused buffer: the fast path checks, vectorised over a whole block, that each frame at
  the nominal stride starts with ``{`` and has ``\\n\\n*`` after its header; a frame that
  fails (a ``pkt_nsec >= 10**9`` makes its header longer) is *walked* (its delimiter is
  searched inside its header only, never inside pixels) and the fast path resumes. The
  index is a short list of regular segments, so its size does not grow with the file.
* :func:`read_frames` reads a frame range with one ``readinto`` into a reusable buffer and
  parses images (one copy out of a zero-copy strided view) and every header field
  (fixed-width ASCII columns decoded by numpy, checked against the header template; only
  frames that fail fall back to ``json.loads``).
* :func:`frame_times` turns header fields into int64 nanoseconds and quality flags.
* :func:`write_frames` writes frames byte-exact to the DAQ's printf formats.

Notes
-----
* ``pkt_nsec`` is a 32-bit board value printed with ``%9u`` (a minimum width); values
  ``>= 10**9`` widen the header. ``999999999`` is the clamp sentinel of newer DAQ builds.
* Time arithmetic is integer only: float64 seconds resolve only ~240 ns today.
* Memory: nothing maps or holds the whole file; peak use is one block buffer.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from panoseti_pipeline.errors import InputError, PFFFormatError, PFFNameError

# --------------------------------------------------------------------------- products

MODULE_FIELDS = ("pkt_num", "pkt_tai", "pkt_nsec", "tv_sec", "tv_usec")
PH256_FIELDS = ("quabo_num", *MODULE_FIELDS)
N_QUABOS = 4

#: printf minimum width of each field (PFF_FORMAT.md §2)
FIELD_WIDTH = {"quabo_num": 1, "pkt_num": 10, "pkt_tai": 4, "pkt_nsec": 9, "tv_sec": 10,
               "tv_usec": 6}
#: smallest integer dtype holding every legal value of the field, losslessly
FIELD_DTYPE = {"quabo_num": np.dtype("u1"), "pkt_num": np.dtype("<u2"),
               "pkt_tai": np.dtype("<u2"), "pkt_nsec": np.dtype("<u4"),
               "tv_sec": np.dtype("<i8"), "tv_usec": np.dtype("<u4")}
#: largest legal value of each field (values above are a format error, never wrapped)
FIELD_MAX = {"quabo_num": 3, "pkt_num": 0xFFFF, "pkt_tai": 1023, "pkt_nsec": 0xFFFFFFFF,
             "tv_sec": 9_999_999_999, "tv_usec": 999_999}

NSEC_CLAMPED = 999_999_999
NAT = np.iinfo(np.int64).min

FLAG_MISSING_QUABO = 1
FLAG_INVALID_NSEC = 2
FLAG_HOST_CLOCK = 4
FLAG_OUT_OF_ORDER = 8
FLAG_NAMES = {FLAG_MISSING_QUABO: "missing_quabo", FLAG_INVALID_NSEC: "invalid_pkt_nsec",
              FLAG_HOST_CLOCK: "host_clock_time", FLAG_OUT_OF_ORDER: "out_of_order"}

TIME_WHITE_RABBIT = "white_rabbit"
TIME_HOST_CLOCK = "host_clock"

_MODULE_QUABO_FMT = ('   "quabo_{q}": {{ "pkt_num": {pkt_num:10d}, "pkt_tai": {pkt_tai:4d}, '
                     '"pkt_nsec": {pkt_nsec:9d}, "tv_sec": {tv_sec:10d}, '
                     '"tv_usec": {tv_usec:6d}}}')
_PH256_FMT = ('{{ "quabo_num": {quabo_num:1d}, "pkt_num": {pkt_num:10d}, '
              '"pkt_tai": {pkt_tai:4d}, "pkt_nsec": {pkt_nsec:9d}, "tv_sec": {tv_sec:10d}, '
              '"tv_usec": {tv_usec:6d}}}')
_DELIM = b"\n\n*"
_MAX_HEADER_GROWTH = 16  # bytes a walked header may exceed the nominal length by


def _format_header(kind: str, values: dict[str, Sequence[int]] | dict[str, int]) -> str:
    """One header exactly as the DAQ's printf writes it (widths are minimums)."""
    if kind == "ph256":
        return _PH256_FMT.format(**values)
    lines = [_MODULE_QUABO_FMT.format(q=q, **{f: values[f][q] for f in MODULE_FIELDS})
             for q in range(N_QUABOS)]
    return "{\n" + ", \n".join(lines) + "\n}"


@dataclasses.dataclass(frozen=True)
class HeaderLayout:
    """Byte template of a nominal header and the plan of its vectorised parser.

    ``digit_cols`` holds the byte columns of every digit of every fixed-width number, so
    one fancy index gathers all of a block's numbers; each field's digits are then
    decoded together with integer Horner steps (no per-frame Python).
    """

    template: np.ndarray  # uint8 (header_bytes,), numbers blanked to spaces
    static: np.ndarray  # bool (header_bytes,): True where the byte is not part of a number
    columns: dict[tuple[str, int], int]  # (field, quabo) -> first byte of the number
    digit_cols: np.ndarray  # int64 (n_digits,): byte columns of every digit, field-major
    spans: dict[str, tuple[int, int]]  # field -> its slice of digit_cols
    n_quabos: int  # numbers per field: 4 (module) or 1 (ph256)
    words: int  # leading whole 32-bit words of the header, compared as words

    @property
    def size(self) -> int:
        return int(self.template.size)

    def static_mismatch(self, hdr: np.ndarray) -> np.ndarray:
        """Frames (n, header_bytes) whose non-number bytes differ from the template."""
        w = self.words * 4
        words = np.ascontiguousarray(hdr[:, :w]).view("<u4") if hdr.strides[0] % 4 else \
            hdr[:, :w].view("<u4")
        tmpl = self.template[:w].view("<u4")
        mask = np.where(self.static[:w], 0xFF, 0).astype(np.uint8).view("<u4")
        bad = ((words ^ tmpl) & mask).any(axis=1)
        tail = self.static[w:]
        return bad | (hdr[:, w:][:, tail] != self.template[w:][tail]).any(axis=1)


def _header_layout(kind: str) -> HeaderLayout:
    fields = PH256_FIELDS if kind == "ph256" else MODULE_FIELDS
    n_q = 1 if kind == "ph256" else N_QUABOS
    zero = _format_header(kind, {f: [0] * N_QUABOS if kind == "module" else 0 for f in fields})
    template = np.frombuffer(zero.encode(), np.uint8).copy()
    static = np.ones(template.size, bool)
    columns: dict[tuple[str, int], int] = {}
    start = 0
    for q in range(n_q):
        for f in fields:
            key = f'"{f}": '
            pos = zero.index(key, start) + len(key)
            columns[(f, q)] = pos
            static[pos:pos + FIELD_WIDTH[f]] = False
            start = pos
    template[~static] = ord(" ")
    # digits gathered field-major, so each field's digits reshape to (n, quabos, width)
    numbers = tuple(sorted(columns, key=lambda fq: (fields.index(fq[0]), fq[1])))
    digit_cols = [c for f, q in numbers for c in range(columns[(f, q)],
                                                        columns[(f, q)] + FIELD_WIDTH[f])]
    spans, at = {}, 0
    for f in fields:
        spans[f] = (at, at + n_q * FIELD_WIDTH[f])
        at = spans[f][1]
    return HeaderLayout(template, static, columns, np.array(digit_cols), spans,
                        n_q, template.size // 4)


@dataclasses.dataclass(frozen=True)
class Product:
    """A PFF data product: what the pixels are and which header precedes them."""

    dp: str
    bpp: int
    shape: tuple[int, int]
    dtype: np.dtype
    header_kind: str  # "module" (4 quabo sub-headers) or "ph256" (one quabo)

    @property
    def pixel_bytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.dtype.itemsize

    @property
    def layout(self) -> HeaderLayout:
        return _LAYOUTS[self.header_kind]

    @property
    def header_bytes(self) -> int:
        return self.layout.size

    @property
    def frame_bytes(self) -> int:
        return self.header_bytes + len(_DELIM) + self.pixel_bytes

    @property
    def fields(self) -> tuple[str, ...]:
        return PH256_FIELDS if self.header_kind == "ph256" else MODULE_FIELDS

    @property
    def header_shape(self) -> tuple[int, ...]:
        """Trailing shape of every header field array: (quabo,) or ()."""
        return () if self.header_kind == "ph256" else (N_QUABOS,)


_LAYOUTS = {kind: _header_layout(kind) for kind in ("module", "ph256")}

PRODUCTS: dict[str, Product] = {
    "img16": Product("img16", 2, (32, 32), np.dtype("<u2"), "module"),
    "img8": Product("img8", 1, (32, 32), np.dtype("u1"), "module"),
    "ph1024": Product("ph1024", 2, (32, 32), np.dtype("<i2"), "module"),
    "ph256": Product("ph256", 2, (16, 16), np.dtype("<i2"), "ph256"),
}


def get_product(dp: str) -> Product:
    try:
        return PRODUCTS[dp]
    except KeyError:
        raise PFFNameError(f"unknown data product dp_{dp!s} (known: "
                           f"{', '.join(PRODUCTS)})") from None


# --------------------------------------------------------------------------- names

_START_RE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})T(\d{2})[:_-](\d{2})[:_-](\d{2})Z?$")
HOUSEKEEPING_NAME = "hk.pff"


def _pairs(stem: str) -> dict[str, str]:
    """``k1_v1.k2_v2`` -> {k1: v1, k2: v2}; key and value split at the first ``_``."""
    out = {}
    for part in stem.split("."):
        key, sep, value = part.partition("_")
        if not sep or not key:
            raise ValueError(part)
        out[key] = value
    return out


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

    @property
    def stream(self) -> tuple:
        """What files of one stream share: run directory, start, dp, module, other keys.

        They differ only in seqno; the same dp and module with another start time is
        another recording, never to be joined.
        """
        return (str(self.path.parent.resolve()), self.start, self.dp, self.module,
                tuple(sorted(self.extra.items())))


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
        raise PFFNameError(f"{p}: not a PFF data file name (expected "
                           "start_<time>Z.dp_<dp>.bpp_<n>.module_<n>.seqno_<n>.pff)")
    try:
        pairs = _pairs(p.name[: -len(".pff")])
        start = parse_start(pairs.pop("start"))
        dp = pairs.pop("dp")
        bpp, module, seqno = (int(pairs.pop(k)) for k in ("bpp", "module", "seqno"))
    except (ValueError, KeyError) as err:
        raise PFFNameError(f"{p}: not a PFF data file name (bad or missing part {err}; "
                           "expected start_<time>Z.dp_<dp>.bpp_<n>.module_<n>.seqno_<n>.pff)"
                           ) from None
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
    try:
        pairs = _pairs(p.name[: -len(".pffd")])
        site = pairs.pop("obs")
        start = parse_start(pairs.pop("start"))
        runtype = pairs.pop("runtype", "")
    except (ValueError, KeyError) as err:
        raise PFFNameError(f"{p}: not a PFF observation directory name (bad or missing part "
                           f"{err}; expected obs_<site>.start_<time>Z.runtype_<type>.pffd)"
                           ) from None
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


# --------------------------------------------------------------------------- frame index

DEFAULT_BLOCK_BYTES = 32 << 20


@dataclasses.dataclass(frozen=True)
class FrameIndex:
    """Byte offset of every whole frame of one file, as regular segments.

    Segment ``s`` holds frames ``first[s] .. first[s+1]-1``, the first at byte
    ``offset[s]``, each ``stride[s]`` bytes long. A clean file is one segment; every
    walked frame (longer header) is a segment of one.

    ``exact`` is False for an index that only *assumes* the nominal stride (see
    :func:`assume_regular`): reading through it checks every frame's delimiters and
    raises :class:`StrideMismatch` where the assumption fails.
    """

    path: str
    dp: str
    file_size: int
    offset: np.ndarray  # int64 (n_segments,)
    stride: np.ndarray  # int64 (n_segments,)
    first: np.ndarray  # int64 (n_segments + 1,), last entry = n_frames
    partial_bytes: int
    frames_walked: int
    exact: bool = True

    @property
    def product(self) -> Product:
        return PRODUCTS[self.dp]

    @property
    def n_frames(self) -> int:
        return int(self.first[-1])

    def offsets(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Byte offsets of frames ``start .. stop-1``."""
        stop = self.n_frames if stop is None else stop
        k = np.arange(start, stop, dtype=np.int64)
        seg = np.searchsorted(self.first, k, side="right") - 1
        return self.offset[seg] + (k - self.first[seg]) * self.stride[seg]

    def byte_range(self, start: int, stop: int) -> tuple[int, int]:
        """(first byte, byte count) spanned by frames ``start .. stop-1``."""
        if not 0 <= start < stop <= self.n_frames:
            raise IndexError(f"frame range {start}..{stop} outside 0..{self.n_frames}")
        first_off, last_off = self.offsets(start, start + 1)[0], self.offsets(stop - 1, stop)[0]
        seg = int(np.searchsorted(self.first, stop - 1, side="right") - 1)
        return int(first_off), int(last_off + self.stride[seg] - first_off)

    def segments(self, start: int, stop: int) -> Iterator[tuple[int, int, int, int]]:
        """(first frame, stop frame, byte offset, stride) of each segment piece in range."""
        s = int(np.searchsorted(self.first, start, side="right") - 1)
        while s < len(self.offset) and self.first[s] < stop:
            a, b = max(start, int(self.first[s])), min(stop, int(self.first[s + 1]))
            stride = int(self.stride[s])
            yield a, b, int(self.offset[s]) + (a - int(self.first[s])) * stride, stride
            s += 1


class _SegmentList:
    """Accumulates segments, merging a piece that continues the previous one."""

    def __init__(self) -> None:
        self.offset: list[int] = []
        self.stride: list[int] = []
        self.count: list[int] = []

    def add(self, offset: int, stride: int, count: int) -> None:
        if count <= 0:
            return
        if (self.offset and self.stride[-1] == stride
                and self.offset[-1] + self.count[-1] * stride == offset):
            self.count[-1] += count
        else:
            self.offset.append(offset)
            self.stride.append(stride)
            self.count.append(count)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        first = np.zeros(len(self.count) + 1, np.int64)
        np.cumsum(self.count, out=first[1:])
        return (np.array(self.offset, np.int64), np.array(self.stride, np.int64), first)


def _check_first_header(path: str, head: bytes, product: Product) -> None:
    """Refuse legacy, non-PFF and foreign files on their first header, with the reason."""
    if not head.startswith(b"{"):
        raise PFFFormatError(f"{path}: not a PFF file: byte 0 is {head[:1]!r}, expected '{{' "
                             "(start of a JSON frame header)")
    end = head.find(b"\n\n")
    if end < 0:
        if len(head) < product.header_bytes + len(_DELIM):
            return  # too short for a frame: the index reports it as a partial frame
        raise PFFFormatError(f"{path}: not a PFF {product.dp} file: no '\\n\\n' ends the "
                             f"first header (expected at byte {product.header_bytes})")
    try:
        header = json.loads(head[:end])
    except ValueError:
        raise PFFFormatError(f"{path}: legacy or foreign PFF header at byte 0 (not JSON; files "
                             "written before 2022-06-27 are not supported)") from None
    _header_values(path, 0, header, product)  # raises with the reason if keys differ
    if end < product.header_bytes:
        raise PFFFormatError(f"{path}: legacy PFF header at byte 0: {end} bytes where the "
                             f"fixed-width {product.dp} header has {product.header_bytes} "
                             "(files written before 2022-10-17 are not supported)")
    if head[end + 2:end + 3] not in (b"*", b""):
        raise PFFFormatError(f"{path}: not a PFF file: expected '*' at byte {end + 2}, found "
                             f"{head[end + 2:end + 3]!r}")


def _fill(f: BinaryIO, view: memoryview) -> int:
    """readinto until ``view`` is full or the file ends (network file systems read short)."""
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


class StrideMismatch(PFFFormatError):
    """A frame is not where the assumed regular stride puts it: index the file exactly."""


def assume_regular(path: str | os.PathLike, dp: str | None = None) -> FrameIndex:
    """An index that assumes every frame has the nominal length, after checking frame 0.

    This is what nearly every file is, and it costs no pass over the file: reading
    through it verifies each frame's delimiters, so a wrong assumption is always caught
    (:class:`StrideMismatch`), never misread. If every frame verifies, it is exact: a
    longer frame cannot hide in a tail shorter than one nominal frame.
    """
    path = str(path)
    product = get_product(dp) if dp else parse_name(path).product
    size = os.stat(path).st_size
    n, partial = divmod(size, product.frame_bytes)
    with open(path, "rb", buffering=0) as f:
        head = f.read(4096)
        if head:
            _check_first_header(path, head, product)
        if partial:
            f.seek(n * product.frame_bytes)
            if f.read(1) != b"{":  # not a cut-off frame here: something is irregular
                return index_file(path, product.dp)
    first = np.array([0, n], np.int64)
    return FrameIndex(path, product.dp, size, np.zeros(1, np.int64),
                      np.array([product.frame_bytes], np.int64), first, partial, 0,
                      exact=False)


def index_file(path: str | os.PathLike, dp: str | None = None, *,
               block_bytes: int = DEFAULT_BLOCK_BYTES) -> FrameIndex:
    """Index every whole frame of a PFF file, streaming it through one buffer.

    ``dp`` defaults to the data product in the file name. Raises :class:`PFFFormatError`
    (file, byte offset, what was expected) for legacy, foreign or corrupt content.
    A trailing partial frame is not an error: it is dropped and counted.
    """
    path = str(path)
    product = get_product(dp) if dp else parse_name(path).product
    nominal = product.frame_bytes
    h = product.header_bytes
    segments = _SegmentList()
    walked = 0
    partial = 0
    block_bytes = max(block_bytes, 4 * nominal)
    buf = np.empty(block_bytes + nominal + _MAX_HEADER_GROWTH, np.uint8)
    size = os.stat(path).st_size
    with open(path, "rb", buffering=0) as f:
        filled = _fill(f, memoryview(buf))
        if filled == 0:
            return FrameIndex(path, product.dp, 0, *segments.arrays(), 0, 0)
        _check_first_header(path, bytes(buf[: min(filled, 4096)]), product)
        base = 0  # file offset of buf[0]
        pos = 0  # buffer position of the next frame start
        eof = filled < buf.size
        whole = buf.size // nominal
        span = whole  # frames checked at once: small right after a walk, then growing
        while True:
            m = min((filled - pos) // nominal, span)
            if m:
                frames = buf[pos:pos + m * nominal].reshape(m, nominal)
                ok = ((frames[:, 0] == 0x7B) & (frames[:, h] == 0x0A)
                      & (frames[:, h + 1] == 0x0A) & (frames[:, h + 2] == 0x2A))
                good = m if ok.all() else int(np.argmin(ok))
                segments.add(base + pos, nominal, good)
                pos += good * nominal
                span = min(whole, span * 8)
                if good < m:  # walk the frame that broke the stride
                    length = _walk_frame(path, buf, pos, filled, base, product)
                    if length and pos + length <= filled:
                        segments.add(base + pos, length, 1)
                        walked += 1
                        pos += length
                        span = 16  # long headers come in runs: look ahead a little
                        continue
                elif filled - pos >= nominal:  # the window was clean; check the rest
                    continue
            if eof:
                rest = filled - pos
                if rest and (length := _walk_frame(path, buf, pos, filled, base, product)):
                    if pos + length <= filled:  # a last frame longer than nominal
                        segments.add(base + pos, length, 1)
                        walked += 1
                        pos += length
                        continue
                partial = filled - pos
                break
            buf[: filled - pos] = buf[pos:filled]  # keep the unfinished frame, refill
            base += pos
            filled -= pos
            pos = 0
            filled += _fill(f, memoryview(buf)[filled:])
            eof = filled < buf.size
    return FrameIndex(path, product.dp, size, *segments.arrays(), partial, walked)


def _walk_frame(path: str, buf: np.ndarray, pos: int, filled: int, base: int,
                product: Product) -> int:
    """Length of the frame at ``buf[pos]`` found from its own delimiter, or 0 if cut off.

    Only the header region is searched: pixel bytes may hold any value.
    """
    h = product.header_bytes
    if buf[pos] != 0x7B:
        raise PFFFormatError(f"{path}: corrupt data at byte {base + pos}: expected a frame "
                             f"header starting with '{{', found {bytes(buf[pos:pos + 1])!r}")
    window = bytes(buf[pos:min(filled, pos + h + _MAX_HEADER_GROWTH + 3)])
    end = window.find(b"\n\n")
    if 0 <= end < h:
        raise PFFFormatError(f"{path}: corrupt frame at byte {base + pos}: header of {end} "
                             f"bytes, shorter than the fixed-width {product.dp} header "
                             f"({h} bytes)")
    if end < 0 or end + 3 > len(window):
        if pos + h + _MAX_HEADER_GROWTH + 3 > filled:
            return 0  # not enough bytes left to tell: a partial frame
        raise PFFFormatError(f"{path}: corrupt frame at byte {base + pos}: no '\\n\\n*' within "
                             f"{h + _MAX_HEADER_GROWTH} bytes of the header start")
    if window[end + 2] != 0x2A:
        raise PFFFormatError(f"{path}: corrupt frame at byte {base + pos}: expected '*' at byte "
                             f"{base + pos + end + 2}, found {window[end + 2:end + 3]!r}")
    return end + len(_DELIM) + product.pixel_bytes


# --------------------------------------------------------------------------- reading


@dataclasses.dataclass
class Frames:
    """Decoded frames: images (n, H, W) and header fields ((n, 4) or (n,) each)."""

    images: np.ndarray
    headers: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.images)


def _parse_fixed(hdr: np.ndarray, product: Product) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Parse nominal-length headers (n, header_bytes) column-wise; return values, ok mask.

    A frame is ok when its non-number bytes equal the template and every number is
    right-aligned digits padded with spaces (a digit last), within its field's range.
    """
    layout = product.layout
    n = len(hdr)
    ok = ~layout.static_mismatch(hdr)
    chars = hdr[:, layout.digit_cols]
    out = {}
    for f in product.fields:
        a, b = layout.spans[f]
        c = chars[:, a:b].reshape(n, layout.n_quabos, FIELD_WIDTH[f])
        digit = c - np.uint8(0x30)
        is_digit = digit <= 9
        is_space = c == 0x20
        # only digits and spaces; no space after a digit; the last character a digit;
        # no leading zero (printf never writes one, so "0000028" is a corrupted number)
        ok &= (is_digit | is_space).all(axis=(1, 2)) & is_digit[:, :, -1].all(axis=1)
        ok &= ~(is_digit[:, :, :-1] & is_space[:, :, 1:]).any(axis=(1, 2))
        leading_zero = c[:, :, :-1] == 0x30
        leading_zero[:, :, 1:] &= is_space[:, :, :-2]
        ok &= ~leading_zero.any(axis=(1, 2))
        digit *= is_digit
        values = digit[:, :, 0].astype(np.int64)
        for j in range(1, FIELD_WIDTH[f]):
            values *= 10
            values += digit[:, :, j]
        ok &= (values <= FIELD_MAX[f]).all(axis=1)
        out[f] = values if product.header_kind == "module" else values[:, 0]
    return out, ok


def _header_values(path: str, offset: int, header: object, product: Product
                   ) -> dict[str, list[int] | int]:
    """Validate one JSON-decoded header; return field -> value (per quabo for modules)."""
    legacy = {"acq_mode", "mod_num", "pkt_utc"}

    def fail(why: str) -> PFFFormatError:
        return PFFFormatError(f"{path}: bad {product.dp} frame header at byte {offset}: {why}")

    def fields_of(d: object) -> dict[str, int]:
        if not isinstance(d, dict):
            raise fail("expected a JSON object")
        if legacy & d.keys():
            raise PFFFormatError(f"{path}: legacy PFF header at byte {offset} (keys "
                                 f"{sorted(legacy & d.keys())}; files written before "
                                 "2022-10-17 are not supported)")
        want = PH256_FIELDS if product.header_kind == "ph256" else MODULE_FIELDS
        if list(d) != list(want):
            raise fail(f"keys {list(d)}, expected {list(want)}")
        for k, v in d.items():
            if type(v) is not int or not 0 <= v <= FIELD_MAX[k]:
                raise fail(f"{k} = {v!r} is not an integer in 0..{FIELD_MAX[k]}")
        return d

    if product.header_kind == "ph256":
        return fields_of(header)
    if not isinstance(header, dict):
        raise fail("expected a JSON object")
    if legacy & header.keys():
        fields_of(header)
    quabos = [f"quabo_{q}" for q in range(N_QUABOS)]
    if list(header) != quabos:
        raise fail(f"keys {list(header)}, expected {quabos}")
    per_q = [fields_of(header[k]) for k in quabos]
    return {f: [d[f] for d in per_q] for f in MODULE_FIELDS}


def _parse_json_rows(path: str, rows: np.ndarray, offsets: np.ndarray, hlen: int,
                     product: Product, into: dict[str, np.ndarray], at: np.ndarray) -> None:
    """Slow path for the few frames the column parser rejects: JSON per frame.

    The header must also be exactly what the DAQ's printf would write for its values:
    valid JSON with other padding (a lost or inserted byte) would otherwise read as
    plausible, wrong numbers.
    """
    for i, row, off in zip(at, rows, offsets, strict=True):
        text = row[:hlen].tobytes()
        try:
            header = json.loads(text)
        except ValueError:
            raise PFFFormatError(f"{path}: bad {product.dp} frame header at byte {off}: "
                                 "not valid JSON") from None
        values = _header_values(path, int(off), header, product)
        if _format_header(product.header_kind, values).encode() != text:
            raise PFFFormatError(f"{path}: bad {product.dp} frame header at byte {off}: "
                                 "not in the DAQ's fixed-width format")
        for field, value in values.items():
            into[field][i] = value


def read_frames(path: str | os.PathLike | BinaryIO, index: FrameIndex, start: int, stop: int,
                *, buffer: np.ndarray | None = None, copy: bool = True) -> Frames:
    """Read frames ``start .. stop-1``: images and every header field, exactly.

    ``path`` may be an open binary file; ``buffer`` (uint8) is reused when large enough,
    which is 2-3x faster than allocating for every block. With ``copy=False`` the images
    of a regular range are a zero-copy strided view of ``buffer`` (valid until it is
    reused); otherwise they are copied out once. Header columns are decoded in bulk.
    """
    product = index.product
    n = stop - start
    first, nbytes = index.byte_range(start, stop)
    if buffer is None or buffer.size < nbytes:
        buffer = np.empty(nbytes, np.uint8)
    raw = buffer[:nbytes]
    _read_exact(path, first, raw, index.path)
    pieces = list(index.segments(start, stop))
    view_only = not copy and len(pieces) == 1
    images = None if view_only else np.empty((n, *product.shape), product.dtype)
    headers = {f: np.empty((n, *product.header_shape), FIELD_DTYPE[f]) for f in product.fields}
    for a, b, off, stride in pieces:
        rel = off - first
        rows = raw[rel:rel + (b - a) * stride].reshape(b - a, stride)
        hlen = stride - len(_DELIM) - product.pixel_bytes
        _check_delimiters(rows, hlen, off, index)
        pixels = rows[:, hlen + len(_DELIM):].view(product.dtype).reshape(b - a, *product.shape)
        if view_only:
            images = pixels
        else:
            copy_pixels(images[a - start:b - start], pixels)
        if hlen == product.header_bytes:
            values, ok = _parse_fixed(rows[:, :hlen], product)
            for f in product.fields:
                headers[f][a - start:b - start] = values[f]
            bad = np.flatnonzero(~ok)
        else:
            bad = np.arange(b - a)
        if bad.size:
            _parse_json_rows(index.path, rows[bad], off + bad * stride, hlen, product,
                             headers, bad + (a - start))
    return Frames(images, headers)


def copy_pixels(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[...] = src for (n, H, W) images, one row of bytes per frame (memcpy speed).

    ``src`` may be a strided view of frames in a read buffer; copying element by element
    through its (H, W) axes is several times slower than copying each frame's bytes.
    """
    dst.view(np.uint8).reshape(len(dst), -1)[...] = src.view(np.uint8).reshape(len(src), -1)


def _check_delimiters(rows: np.ndarray, hlen: int, offset: int, index: FrameIndex) -> None:
    """Every frame must start with ``{`` and have ``\\n\\n*`` right after its header."""
    ok = ((rows[:, 0] == 0x7B) & (rows[:, hlen] == 0x0A) & (rows[:, hlen + 1] == 0x0A)
          & (rows[:, hlen + 2] == 0x2A))
    if ok.all():
        return
    at = offset + int(np.argmin(ok)) * rows.shape[1]
    if not index.exact:
        raise StrideMismatch(f"{index.path}: frame at byte {at} is not at the nominal stride")
    raise PFFFormatError(f"{index.path}: no frame delimiter where the index expects one "
                         f"(byte {at}); did the file change while being read?")


def _read_exact(src: str | os.PathLike | BinaryIO, offset: int, out: np.ndarray,
                name: str) -> None:
    if isinstance(src, (str, os.PathLike)):
        with open(src, "rb", buffering=0) as f:
            _read_exact(f, offset, out, name)
        return
    src.seek(offset)
    got = _fill(src, memoryview(out))
    if got < out.size:
        raise PFFFormatError(f"{name}: file shrank while reading: wanted {out.size} bytes "
                             f"at byte {offset}, got {got}")


class PFFReader:
    """Sequential or random reads of one file through one reused buffer.

    Starts from :func:`assume_regular` (no indexing pass) and switches to the exact
    index the first time a frame is not at the nominal stride. Use as a context manager.
    """

    def __init__(self, path: str | os.PathLike, index: FrameIndex | None = None) -> None:
        self.path = str(path)
        self.index = index if index is not None else assume_regular(path)
        self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 (closed in close())
        self._buffer = np.empty(0, np.uint8)

    def __enter__(self) -> PFFReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def read(self, start: int, stop: int, *, copy: bool = True) -> Frames:
        """Frames ``start .. stop-1`` (``copy=False``: images may view the buffer)."""
        while True:
            nbytes = self.index.byte_range(start, stop)[1]
            if self._buffer.size < nbytes:
                self._buffer = np.empty(nbytes + nbytes // 8, np.uint8)
            try:
                return read_frames(self._file, self.index, start, stop, buffer=self._buffer,
                                   copy=copy)
            except StrideMismatch:
                self.index = index_file(self.path, self.index.dp)
                stop = min(stop, self.index.n_frames)

    def blocks(self, frames_per_block: int = 4096, *, copy: bool = False
               ) -> Iterator[tuple[int, Frames]]:
        """Stream the file as (first frame, Frames); by default images view the buffer."""
        start = 0
        while start < self.index.n_frames:
            frames = self.read(start, min(start + frames_per_block, self.index.n_frames),
                               copy=copy)
            yield start, frames
            start += len(frames)


# --------------------------------------------------------------------------- time


def _module_pick(headers: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray,
                                                          np.ndarray]:
    """Fields of the first live quabo (tv_sec != 0) of every frame; live any; all live."""
    live = headers["tv_sec"] != 0
    q = np.argmax(live, axis=1)
    rows = np.arange(len(q))
    return ({f: headers[f][rows, q].astype(np.int64) for f in MODULE_FIELDS},
            live.any(axis=1), live.all(axis=1))


def _time_fields(headers: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray,
                                                          np.ndarray]:
    if headers["tv_sec"].ndim == 2:
        return _module_pick(headers)
    live = headers["tv_sec"] != 0
    return {f: headers[f].astype(np.int64) for f in MODULE_FIELDS}, live, live


def _wr_offset(tv_sec: np.ndarray, pkt_tai: np.ndarray) -> np.ndarray:
    """Seconds to add to tv_sec for the WR second; a large value where clocks disagree."""
    d = (tv_sec - pkt_tai + 37) % 1024
    return np.select([d == 0, d == 1, d == 1023], [0, -1, 1], default=np.iinfo(np.int64).max)


def wr_consistent_fraction(headers: dict[str, np.ndarray]) -> tuple[int, int]:
    """(frames whose WR and host seconds agree within 1 s, frames with a live quabo)."""
    sel, live, _ = _time_fields(headers)
    agree = _wr_offset(sel["tv_sec"], sel["pkt_tai"]) != np.iinfo(np.int64).max
    return int((agree & live).sum()), int(live.sum())


def decide_time_source(reader: PFFReader, sample_frames: int = 3072) -> str:
    """White Rabbit if most sampled frames have WR seconds within 1 s of the host clock.

    GNSS-timed modules have ``pkt_tai`` unrelated to TAI, so ``d`` is far from 0 for
    the whole file; there the host clock is the usable time (PFF_FORMAT.md §4). Samples
    the start, middle and end of the file.
    """
    n = reader.index.n_frames
    k = max(1, sample_frames // 3)
    agree = total = 0
    for s in sorted({0, max(0, n // 2 - k // 2), max(0, n - k)}) if n else ():
        a, t = wr_consistent_fraction(reader.read(s, min(reader.index.n_frames, s + k)).headers)
        agree, total = agree + a, total + t
    return TIME_WHITE_RABBIT if total and agree * 2 >= total else TIME_HOST_CLOCK


def frame_times(headers: dict[str, np.ndarray], time_source: str,
                previous_ns: int = NAT) -> tuple[np.ndarray, np.ndarray]:
    """int64 ns since the Unix epoch and uint8 quality flags for every frame.

    ``previous_ns`` is the time of the frame before this block (for the out-of-order
    flag across block boundaries).
    """
    sel, any_live, all_live = _time_fields(headers)
    n = len(any_live)
    flags = np.zeros(n, np.uint8)
    flags[~all_live] |= FLAG_MISSING_QUABO
    nsec = headers["pkt_nsec"]
    live = headers["tv_sec"] != 0
    invalid_nsec = (nsec >= NSEC_CLAMPED) & live
    if invalid_nsec.ndim == 2:
        invalid_nsec = invalid_nsec.any(axis=1)
    flags[invalid_nsec] |= FLAG_INVALID_NSEC
    host = sel["tv_sec"] * 1_000_000_000 + sel["tv_usec"] * 1000
    if time_source == TIME_WHITE_RABBIT:
        shift = _wr_offset(sel["tv_sec"], sel["pkt_tai"])
        wr_ok = (shift != np.iinfo(np.int64).max) & (sel["pkt_nsec"] < NSEC_CLAMPED)
        wr = (sel["tv_sec"] + np.where(wr_ok, shift, 0)) * 1_000_000_000 + sel["pkt_nsec"]
        time_ns = np.where(wr_ok, wr, host)
        use_host = ~wr_ok
    else:
        time_ns = host
        use_host = np.ones(n, bool)
    flags[use_host & any_live] |= FLAG_HOST_CLOCK
    time_ns = np.where(any_live, time_ns, NAT)
    # compare with the last frame before that has a time (NaT frames are skipped)
    last = np.where(any_live, np.arange(n), -1)
    np.maximum.accumulate(last, out=last)
    before = np.concatenate(([-1], last[:-1]))
    prev = np.where(before >= 0, time_ns[np.maximum(before, 0)], previous_ns)
    earlier = any_live & (prev != NAT) & (time_ns < prev)
    flags[earlier] |= FLAG_OUT_OF_ORDER
    return time_ns.astype(np.int64), flags


def last_valid_time(time_ns: np.ndarray, default: int = NAT) -> int:
    """The last non-NaT time of a block (the out-of-order reference for the next one)."""
    ok = np.flatnonzero(time_ns != NAT)
    return int(time_ns[ok[-1]]) if ok.size else default


def flag_counts(flags: np.ndarray) -> dict[str, int]:
    return {name: int(np.count_nonzero(flags & bit)) for bit, name in FLAG_NAMES.items()}


# --------------------------------------------------------------------------- writing


def _encode_fixed(values: np.ndarray, width: int) -> np.ndarray:
    """Non-negative ints that fit ``width`` -> (n, width) right-aligned ASCII, space padded."""
    v = values.astype(np.int64)[:, None]
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    digits = (v // powers) % 10 + 0x30
    pad = (v < powers) & (powers > 1)
    return np.where(pad, 0x20, digits).astype(np.uint8)


def encode_frames(dp: str, images: np.ndarray, headers: dict[str, np.ndarray]) -> bytes:
    """Frames as the DAQ writes them, byte for byte (PFF_FORMAT.md §2)."""
    product = get_product(dp)
    images = np.asarray(images)
    n = len(images)
    if images.shape[1:] != product.shape:
        raise ValueError(f"{dp} images must be (n, {product.shape[0]}, {product.shape[1]})")
    values = {f: np.asarray(headers[f], np.int64).reshape(n, *product.header_shape)
              for f in product.fields}
    for f, v in values.items():
        if v.size and (v.min() < 0 or v.max() > FIELD_MAX[f]):
            raise ValueError(f"{f} outside 0..{FIELD_MAX[f]}")
    layout = product.layout
    rows = np.empty((n, product.frame_bytes), np.uint8)
    rows[:, :layout.size] = layout.template
    rows[:, layout.size:layout.size + 3] = np.frombuffer(_DELIM, np.uint8)
    rows[:, layout.size + 3:] = np.ascontiguousarray(images, product.dtype).reshape(n, -1).view(
        np.uint8)
    wide = np.zeros(n, bool)
    for (f, q), col in layout.columns.items():
        v = values[f] if product.header_kind == "ph256" else values[f][:, q]
        fits = v < 10 ** FIELD_WIDTH[f]
        wide |= ~fits
        rows[:, col:col + FIELD_WIDTH[f]] = _encode_fixed(np.where(fits, v, 0), FIELD_WIDTH[f])
    parts, done = [], 0
    for i in np.flatnonzero(wide):  # only a few frames are ever wider than the minimum
        parts.append(rows[done:i].tobytes())
        vals = {f: values[f][i].tolist() for f in product.fields}
        text = _format_header(product.header_kind, vals).encode()
        parts.append(text + _DELIM + rows[i, layout.size + 3:].tobytes())
        done = i + 1
    parts.append(rows[done:].tobytes())
    return b"".join(parts)


def write_frames(f: BinaryIO, dp: str, images: np.ndarray, headers: dict[str, np.ndarray]
                 ) -> int:
    """Append frames to an open binary file; return the number of bytes written."""
    data = encode_frames(dp, images, headers)
    f.write(data)
    return len(data)


# --------------------------------------------------------------------------- info CLI


def _pkt_gaps(pkt_num: np.ndarray, live: np.ndarray, last: np.ndarray) -> tuple[int, int]:
    """(gaps, missing packets) in one quabo's pkt_num column, mod 65536; updates last."""
    vals = pkt_num[live].astype(np.int64)
    if not vals.size:
        return 0, 0
    seq = np.concatenate((last[:1], vals)) if last[0] >= 0 else vals
    step = np.diff(seq) % 65536
    last[0] = vals[-1]
    jumps = step[step != 1]
    return int(jumps.size), int(np.where(jumps > 1, jumps - 1, 0).sum())


def summarize_file(path: str | os.PathLike, frames_per_block: int = 4096) -> dict:
    """Everything ``pff.py info`` prints about one data file (streams in blocks)."""
    name = parse_name(path)
    with PFFReader(path) as reader:
        return _summarize(name, reader, frames_per_block)


def _summarize(name: PFFName, reader: PFFReader, frames_per_block: int) -> dict:
    source = decide_time_source(reader)
    counts = dict.fromkeys(FLAG_NAMES.values(), 0)
    first = last = NAT
    n_groups = 4 if name.product.header_kind == "ph256" else N_QUABOS
    last_pkt = np.full((n_groups, 1), -1, np.int64)
    gaps = np.zeros((n_groups, 2), np.int64)
    prev = NAT
    for _start, frames in reader.blocks(frames_per_block):
        t, flags = frame_times(frames.headers, source, prev)
        prev = last_valid_time(t, prev)
        for k, v in flag_counts(flags).items():
            counts[k] += v
        valid = t[t != NAT]
        if valid.size:
            first = int(valid[0]) if first == NAT else first
            last = int(valid[-1])
        h = frames.headers
        for g in range(n_groups):
            if name.product.header_kind == "ph256":
                col, live = h["pkt_num"], (h["quabo_num"] == g) & (h["tv_sec"] != 0)
            else:
                col, live = h["pkt_num"][:, g], h["tv_sec"][:, g] != 0
            gaps[g] += _pkt_gaps(col, live, last_pkt[g])
    index = reader.index
    return {"file": reader.path, "dp": name.dp, "module": name.module, "seqno": name.seqno,
            "frames": index.n_frames, "partial_bytes_dropped": index.partial_bytes,
            "frames_walked": index.frames_walked, "time_source": source,
            "first_time": format_ns(first), "last_time": format_ns(last),
            "flags": counts,
            "pkt_num_gaps": {f"quabo_{g}": {"gaps": int(gaps[g, 0]), "missing": int(gaps[g, 1])}
                             for g in range(n_groups)}}


def format_ns(t: int) -> str:
    """int64 ns -> ISO 8601 UTC with nanoseconds (``NaT`` for the missing value)."""
    if t == NAT:
        return "NaT"
    return np.datetime_as_string(np.datetime64(t, "ns"), unit="ns") + "Z"


def _info_lines(summary: dict) -> list[str]:
    s = summary
    flags = ", ".join(f"{k}={v}" for k, v in s["flags"].items())
    gaps = ", ".join(f"{q}: {g['gaps']} gaps/{g['missing']} missing"
                     for q, g in s["pkt_num_gaps"].items())
    return [s["file"],
            f"  dp={s['dp']} module={s['module']} seqno={s['seqno']} frames={s['frames']} "
            f"partial_bytes_dropped={s['partial_bytes_dropped']} "
            f"frames_walked={s['frames_walked']}",
            f"  time {s['first_time']} .. {s['last_time']} (source: {s['time_source']})",
            f"  flags: {flags}",
            f"  pkt_num: {gaps}"]


def _expand(paths: Sequence[str]) -> Iterator[Path]:
    for p in map(Path, paths):
        yield from sorted(p.glob("*.pff")) if p.is_dir() else [p]


def main(argv: Sequence[str] | None = None) -> int:
    """``pff.py info FILE_OR_DIR...``: what is in PFF files, one block of lines per file."""
    from panoseti_pipeline.errors import EXIT_FAILED, EXIT_OK, run_main

    parser = argparse.ArgumentParser(prog="pff.py", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="summarise PFF files (a .pffd directory: its files)")
    info.add_argument("paths", nargs="+", metavar="FILE_OR_DIR")
    info.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)

    def body() -> int:
        failed = 0
        for path in _expand(args.paths):
            try:
                if is_housekeeping(path):
                    print(f"{path}\n  housekeeping (hk.pff): not image data, skipped")
                    continue
                if not path.exists():
                    raise InputError(f"{path}: no such file")
                if path.stat().st_size == 0:
                    print(f"{path}\n  empty (0 bytes): no frames")
                    continue
                print("\n".join(_info_lines(summarize_file(path))))
            except (InputError, PFFFormatError, PFFNameError) as err:
                if args.debug:
                    raise
                print(f"pff.py: error: {err}", file=sys.stderr)
                failed += 1
        return EXIT_FAILED if failed else EXIT_OK

    return run_main(body, "pff.py", args.debug)


if __name__ == "__main__":
    sys.exit(main())
