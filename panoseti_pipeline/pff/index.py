"""Where every frame of a PFF file starts: the frame index.

A file has no index of its own, so one is built by streaming the file through one reused
buffer (:func:`index_file`). The fast path checks, vectorised over a whole block, that
each frame at the nominal stride starts with ``{`` and has ``\\n\\n*`` right after its
header; a frame that fails (a ``pkt_nsec >= 10**9`` makes its header longer) is
*walked*: its delimiter is searched inside its header only, never inside pixels, and the
fast path resumes. The index is a short list of regular segments, so its size does not
grow with the file. :func:`assume_regular` skips the pass altogether for the common clean
file; reading through it checks every frame, so a wrong assumption is caught, not misread.

Legacy (before 2022-10-17), foreign and corrupt files are refused on their first header
or at the byte where the frames stop making sense, with the file and byte offset; a
trailing partial frame (a killed recorder, a file still being written) is dropped and
counted, never an error.

Notes
-----
* Pixel bytes may hold ``\\n\\n*`` and ``{``: no search ever runs over them.
* Memory: nothing maps or holds the whole file; peak use is one block buffer.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np

from panoseti_pipeline.errors import PFFFormatError
from panoseti_pipeline.pff.headers import header_values
from panoseti_pipeline.pff.names import parse_name
from panoseti_pipeline.pff.products import DELIMITER, PRODUCTS, Product, get_product

DEFAULT_BLOCK_BYTES = 32 << 20
_MAX_HEADER_GROWTH = 16  # bytes a walked header may exceed the nominal length by


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
        if len(head) < product.header_bytes + len(DELIMITER):
            return  # too short for a frame: the index reports it as a partial frame
        raise PFFFormatError(f"{path}: not a PFF {product.dp} file: no '\\n\\n' ends the "
                             f"first header (expected at byte {product.header_bytes})")
    try:
        header = json.loads(head[:end])
    except ValueError:
        raise PFFFormatError(f"{path}: legacy or foreign PFF header at byte 0 (not JSON; files "
                             "written before 2022-06-27 are not supported)") from None
    header_values(path, 0, header, product)  # raises with the reason if keys differ
    if end < product.header_bytes:
        raise PFFFormatError(f"{path}: legacy PFF header at byte 0: {end} bytes where the "
                             f"fixed-width {product.dp} header has {product.header_bytes} "
                             "(files written before 2022-10-17 are not supported)")
    if head[end + 2:end + 3] not in (b"*", b""):
        raise PFFFormatError(f"{path}: not a PFF file: expected '*' at byte {end + 2}, found "
                             f"{head[end + 2:end + 3]!r}")


def readinto_full(f: BinaryIO, view: memoryview) -> int:
    """readinto until ``view`` is full or the file ends (network file systems read short)."""
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def delimited(rows: np.ndarray, hlen: int) -> np.ndarray:
    """Which frames (rows of ``hlen``-byte headers) start with ``{`` and have ``\\n\\n*``."""
    return ((rows[:, 0] == 0x7B) & (rows[:, hlen] == 0x0A) & (rows[:, hlen + 1] == 0x0A)
            & (rows[:, hlen + 2] == 0x2A))


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
        filled = readinto_full(f, memoryview(buf))
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
                ok = delimited(frames, h)
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
            filled += readinto_full(f, memoryview(buf)[filled:])
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
    return end + len(DELIMITER) + product.pixel_bytes
