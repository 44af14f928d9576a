"""Where every frame of a PFF file starts: the frame index.

A file has no index of its own, so one is built by streaming the file through one reused
buffer (:func:`index_file`). The fast path checks, vectorised over a whole block, that
each frame at the nominal stride starts with ``{`` and has ``\\n\\n*`` right after its
header; a frame that fails (a ``pkt_nsec >= 10**9`` makes its header longer, a missing
quabo line shorter) is *walked*: its delimiter is searched inside its header only, never
inside pixels, and the fast path resumes. The index is a short list of regular segments,
so its size does not grow with the file. :func:`assume_regular` skips the pass altogether
for the common clean file; reading through it checks every frame, so a wrong assumption
is caught, not misread.

What a recording can end or be damaged with:

* a partial last frame (a killed recorder, a file still being written): dropped and
  counted (``partial_bytes``), never an error;
* a tail of NUL bytes (a preallocated file, a crash after the file was extended): every
  whole frame before it is kept, the NULs are counted (``nul_tail_bytes``);
* a corrupt frame (a flipped or lost byte): by default every byte range that holds no
  valid frame is skipped and recorded (``skipped``, :class:`SkippedRange`), and reading
  resumes at the next valid frame: a ``{`` that begins a header the DAQ's printf could
  have written exactly, followed by ``\\n\\n*``. A frame is only kept when the next frame
  starts right after it, so a frame that lost or gained a byte is dropped with the range,
  never read shifted. With ``strict`` the file is refused at that byte instead.

Legacy (before 2022-10-17), foreign and unreadable files are refused on their first header
or when no valid frame is left, with the file and byte offset.

Notes
-----
* Pixel bytes may hold ``\\n\\n*`` and ``{``: no search runs over them, except the search
  for the next valid frame after a corrupt one, which needs a whole exact header.
* Memory: nothing maps or holds the whole file; peak use is one block buffer.
* A frame whose header is whole but whose last bytes a crash left as zeros cannot be told
  from one whose pixels end in zeros: it is kept.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np

from panoseti_pipeline.errors import PFFFormatError
from panoseti_pipeline.flags import FLAG_AFTER_GAP
from panoseti_pipeline.pff.headers import header_values, parse_fixed, parse_header
from panoseti_pipeline.pff.names import parse_name
from panoseti_pipeline.pff.products import DELIMITER, PRODUCTS, Product, get_product

DEFAULT_BLOCK_BYTES = 32 << 20
_MAX_HEADER_GROWTH = 16  # bytes a walked header may exceed the nominal length by
_MIN_NUL_TAIL = 16  # fewer trailing NULs can be a frame's own zeros shifted by a lost byte
_MAX_WRONG_FIXED_BYTES = 4  # a damaged header still shows where its frame starts


@dataclasses.dataclass(frozen=True)
class SkippedRange:
    """A corrupt byte range no frame was read from (see :func:`index_file`)."""

    offset: int  # first byte skipped
    length: int  # bytes skipped
    frames_lost: int  # estimate: the length in nominal frames, at least 1
    reason: str  # why no frame could be read at ``offset``
    next_frame: int  # the frame right after the range (flagged after_gap); n_frames if none


@dataclasses.dataclass(frozen=True)
class FrameIndex:
    """Byte offset of every whole frame of one file, as regular segments.

    Segment ``s`` holds frames ``first[s] .. first[s+1]-1``, the first at byte
    ``offset[s]``, each ``stride[s]`` bytes long. A clean file is one segment; every
    walked frame (longer or shorter header) is a segment of one, and a skipped range
    lies between two segments.

    ``exact`` is False for an index that only *assumes* the nominal stride (see
    :func:`assume_regular`): reading through it checks every frame's delimiters and
    raises :class:`StrideMismatch` where the assumption fails. ``strict``: refuse a
    corrupt frame instead of skipping it (the exact index is made with the same choice).
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
    strict: bool = False
    nul_tail_bytes: int = 0
    skipped: tuple[SkippedRange, ...] = ()

    @property
    def product(self) -> Product:
        return PRODUCTS[self.dp]

    @property
    def n_frames(self) -> int:
        return int(self.first[-1])

    @property
    def degraded(self) -> bool:
        """Corrupt byte ranges were skipped: frames of the recording are missing."""
        return bool(self.skipped)

    def offsets(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Byte offsets of frames ``start .. stop-1``."""
        stop = self.n_frames if stop is None else stop
        k = np.arange(start, stop, dtype=np.int64)
        seg = np.searchsorted(self.first, k, side="right") - 1
        return self.offset[seg] + (k - self.first[seg]) * self.stride[seg]

    def byte_range(self, start: int, stop: int) -> tuple[int, int]:
        """(first byte, bytes of the frames) of frames ``start .. stop-1``.

        The byte count is what :func:`~.reader.read_frames` reads: a skipped range
        between the frames is not read.
        """
        if not 0 <= start < stop <= self.n_frames:
            raise IndexError(f"frame range {start}..{stop} outside 0..{self.n_frames}")
        lo = np.clip(self.first[:-1], start, stop)
        hi = np.clip(self.first[1:], start, stop)
        return int(self.offsets(start, start + 1)[0]), int(((hi - lo) * self.stride).sum())

    def segments(self, start: int, stop: int) -> Iterator[tuple[int, int, int, int]]:
        """(first frame, stop frame, byte offset, stride) of each segment piece in range."""
        s = int(np.searchsorted(self.first, start, side="right") - 1)
        while s < len(self.offset) and self.first[s] < stop:
            a, b = max(start, int(self.first[s])), min(stop, int(self.first[s + 1]))
            stride = int(self.stride[s])
            yield a, b, int(self.offset[s]) + (a - int(self.first[s])) * stride, stride
            s += 1

    def frame_at(self, byte: int) -> int:
        """The first frame that starts at or after file byte ``byte`` (n_frames if none)."""
        s = int(np.searchsorted(self.offset, byte, side="right")) - 1
        if s < 0:
            return 0
        k = -(-(byte - int(self.offset[s])) // int(self.stride[s]))
        return min(int(self.first[s]) + k, int(self.first[s + 1]))

    def index_flags(self, start: int, stop: int) -> np.ndarray:
        """uint8 flags of frames ``start .. stop-1`` the index sets: after_gap."""
        flags = np.zeros(stop - start, np.uint8)
        for r in self.skipped:
            if start <= r.next_frame < stop:
                flags[r.next_frame - start] |= FLAG_AFTER_GAP
        return flags

    def damage_notices(self) -> list[str]:
        """One line per byte range dropped other than a partial last frame, to print."""
        lines = [f"{self.path}: CORRUPT DATA SKIPPED: {r.length} bytes at byte {r.offset} "
                 f"(about {r.frames_lost} frame(s) lost; reading resumed at frame "
                 f"{r.next_frame}): {r.reason}" for r in self.skipped]
        if self.nul_tail_bytes:
            lines.append(f"{self.path}: {self.nul_tail_bytes} NUL bytes at the end dropped "
                         "(a preallocated file, or a crash after the file was extended); "
                         f"the {self.n_frames} whole frames before them are kept")
        return lines


class _SegmentList:
    """Accumulates segments, merging a piece that continues the previous one."""

    def __init__(self) -> None:
        self.offset: list[int] = []
        self.stride: list[int] = []
        self.count: list[int] = []

    @property
    def n_frames(self) -> int:
        return sum(self.count)

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

    def drop_last(self) -> None:
        """Forget the last frame (it turned out not to end where a frame starts)."""
        self.count[-1] -= 1
        if not self.count[-1]:
            del self.offset[-1], self.stride[-1], self.count[-1]

    def walked(self, nominal: int) -> int:
        """Frames not at the nominal length (each was walked)."""
        return sum(c for s, c in zip(self.stride, self.count, strict=True) if s != nominal)

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
    if end < product.header_bytes and end not in product.header_sizes:
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
    """The assumed index does not hold (a frame elsewhere, a bad header): index exactly."""


def assume_regular(path: str | os.PathLike, dp: str | None = None, *,
                   strict: bool = False) -> FrameIndex:
    """An index that assumes every frame has the nominal length, after checking frame 0.

    This is what nearly every file is, and it costs no pass over the file: reading
    through it verifies each frame's delimiters, so a wrong assumption is always caught
    (:class:`StrideMismatch`), never misread. If every frame verifies, it is exact: a
    longer frame cannot hide in a tail shorter than one nominal frame. A file that does
    not start or end like that is indexed at once (:func:`index_file`).
    """
    path = str(path)
    product = get_product(dp) if dp else parse_name(path).product
    size = os.stat(path).st_size
    n, partial = divmod(size, product.frame_bytes)
    with open(path, "rb", buffering=0) as f:
        head = f.read(4096)
        try:
            if head:
                _check_first_header(path, head, product)
        except PFFFormatError:  # refused with the same reason, or a NUL file, or skipped
            return index_file(path, product.dp, strict=strict)
        if partial:
            f.seek(n * product.frame_bytes)
            if f.read(1) != b"{":  # not a cut-off frame here: something is irregular
                return index_file(path, product.dp, strict=strict)
    first = np.array([0, n], np.int64)
    return FrameIndex(path, product.dp, size, np.zeros(1, np.int64),
                      np.array([product.frame_bytes], np.int64), first, partial, 0,
                      exact=False, strict=strict)


def index_file(path: str | os.PathLike, dp: str | None = None, *,
               block_bytes: int = DEFAULT_BLOCK_BYTES, strict: bool = False) -> FrameIndex:
    """Index every whole frame of a PFF file, streaming it through one buffer.

    ``dp`` defaults to the data product in the file name. A partial last frame and a
    tail of NUL bytes are dropped and counted. A corrupt frame is skipped and recorded
    (``skipped``), or with ``strict`` refused: :class:`PFFFormatError` (file, byte
    offset, what was expected), as for legacy, foreign or unreadable content. Without
    ``strict`` every header is checked here, so reading never meets a bad one.
    """
    path = str(path)
    product = get_product(dp) if dp else parse_name(path).product
    size = os.stat(path).st_size
    with open(path, "rb", buffering=0) as f:
        indexer = _Indexer(path, product, f, size, block_bytes, strict)
        indexer.run()
    segments, skipped = indexer.segments, indexer.skipped
    if skipped and not segments.n_frames:
        raise PFFFormatError(f"{path}: no valid frame in the file: {skipped[0].reason}")
    return FrameIndex(path, product.dp, size, *segments.arrays(), indexer.partial,
                      segments.walked(product.frame_bytes), strict=strict,
                      nul_tail_bytes=indexer.nul_tail, skipped=tuple(skipped))


def _data_end(f: BinaryIO, size: int) -> int:
    """Where the NUL bytes that end the file start (``size`` if fewer than the minimum)."""
    end, chunk = size, 64 << 10
    while end > 0:
        start = max(0, end - chunk)
        f.seek(start)
        kept = len(f.read(end - start).rstrip(b"\0"))
        if kept:
            end = start + kept
            break
        end, chunk = start, min(chunk * 4, 16 << 20)
    return end if size - end >= _MIN_NUL_TAIL else size


class _Window:
    """Bytes of a file through one reused buffer, refilled where they are asked for."""

    def __init__(self, path: str, f: BinaryIO, size: int, nbytes: int) -> None:
        self.path, self.f, self.size = path, f, size
        self.buf = np.empty(nbytes, np.uint8)
        self.base = self.filled = 0

    def get(self, offset: int, length: int) -> np.ndarray:
        """Bytes ``offset .. offset+length-1`` (fewer at the end of the file or buffer)."""
        length = max(0, min(length, self.size - offset, self.buf.size))
        lo = offset - self.base
        if lo < 0 or lo + length > self.filled:
            keep = self.filled - lo if 0 <= lo < self.filled else 0
            self.buf[:keep] = self.buf[lo:lo + keep]  # the unfinished part, then refill
            want = min(self.buf.size, self.size - offset)
            self.f.seek(offset + keep)
            self.base = offset
            self.filled = keep + readinto_full(self.f, memoryview(self.buf)[keep:want])
            if self.filled < want:
                raise PFFFormatError(f"{self.path}: file shrank while being indexed (at byte "
                                     f"{offset + self.filled}, expected {self.size} bytes)")
            lo = 0
        return self.buf[lo:lo + length]


class _Indexer:
    """One pass of :func:`index_file`: frames, skipped ranges and the tail of one file."""

    def __init__(self, path: str, product: Product, f: BinaryIO, size: int, block_bytes: int,
                 strict: bool) -> None:
        self.path, self.product, self.size, self.strict = path, product, size, strict
        self.nominal = product.frame_bytes
        block_bytes = max(block_bytes, 4 * self.nominal)
        self.window = _Window(path, f, size, block_bytes + self.nominal + _MAX_HEADER_GROWTH)
        self.data_end = _data_end(f, size)  # where the NUL tail starts
        self.segments = _SegmentList()
        self.skipped: list[SkippedRange] = []
        self.partial = self.nul_tail = 0
        self.prev = -1  # byte of the last frame, until a frame is seen to start after it

    def run(self) -> None:
        nominal, h = self.nominal, self.product.header_bytes
        if self.data_end:
            self._check_start()
        whole = self.window.buf.size // nominal
        span = whole  # frames checked at once: small right after a walk, then growing
        p = 0
        while p < self.data_end:
            view = self.window.get(p, span * nominal)
            m = len(view) // nominal
            rows = view[:m * nominal].reshape(m, nominal)
            ok = delimited(rows, h)
            good = m if ok.all() else int(np.argmin(ok))
            if good and not self.strict:  # every header exact, or the frame is corrupt
                hdr_ok = parse_fixed(rows[:good, :h], self.product)[1]
                good = good if hdr_ok.all() else int(np.argmin(hdr_ok))
            self.segments.add(p, nominal, good)
            if good:
                self.prev = p + (good - 1) * nominal
                p += good * nominal
                span = min(whole, span * 8)
                if good == m and m:
                    continue
            if p < self.data_end:
                p = self._step(p)
                span = 16  # long headers come in runs: look ahead a little
        self.nul_tail = max(0, self.size - p)

    def _check_start(self) -> None:
        """Refuse a legacy or foreign file; skip a corrupt first frame unless strict."""
        try:
            head = bytes(self.window.get(0, min(4096, self.data_end)))
            _check_first_header(self.path, head, self.product)
        except PFFFormatError:
            if self.strict or self._find_frame(1, 2 * (self.nominal + _MAX_HEADER_GROWTH)) \
                    is None:
                raise

    def _step(self, p: int) -> int:
        """Walk the frame at byte ``p``; return where the next frame starts."""
        try:
            length = self._walk(p)
        except PFFFormatError as err:
            return self._skip_corrupt(p, err)
        if length is None:  # cut off by the end of the data: a partial frame
            self.partial = self.data_end - p
            return self.data_end
        self.segments.add(p, length, 1)
        self.prev = p
        return p + length

    def _walk(self, p: int) -> int | None:
        """Length of the frame at byte ``p`` found from its own delimiter; None if cut off.

        Only the header region is searched: pixel bytes may hold any value.
        """
        product, h = self.product, self.product.header_bytes
        window = bytes(self.window.get(p, h + _MAX_HEADER_GROWTH + 3))
        if window[:1] != b"{":
            raise PFFFormatError(f"{self.path}: corrupt data at byte {p}: expected a frame "
                                 f"header starting with '{{', found {window[:1]!r}")
        end = window.find(b"\n\n")
        if 0 <= end < h and end not in product.header_sizes:
            raise PFFFormatError(f"{self.path}: corrupt frame at byte {p}: header of {end} "
                                 f"bytes, shorter than the fixed-width {product.dp} header "
                                 f"({h} bytes) and not one without whole quabo lines")
        if end < 0 or end + 3 > len(window):
            if p + h + _MAX_HEADER_GROWTH + 3 > self.data_end:
                return None  # not enough bytes left to tell: a partial frame
            raise PFFFormatError(f"{self.path}: corrupt frame at byte {p}: no '\\n\\n*' within "
                                 f"{h + _MAX_HEADER_GROWTH} bytes of the header start")
        if window[end + 2] != 0x2A:
            raise PFFFormatError(f"{self.path}: corrupt frame at byte {p}: expected '*' at byte "
                                 f"{p + end + 2}, found {window[end + 2:end + 3]!r}")
        length = end + len(DELIMITER) + product.pixel_bytes
        if p + length > self.size:
            return None
        if not self.strict:
            parse_header(self.path, p, window[:end], product)  # raises with the reason
        return length

    def _skip_corrupt(self, p: int, err: PFFFormatError) -> int:
        """Record the corrupt bytes from ``p`` to the next valid frame; return its byte.

        The frame before ``p`` is kept only if a frame (perhaps damaged) starts at ``p``:
        otherwise it may have lost or gained a byte, and it goes with the range.
        """
        if self.strict:
            raise err
        prev = self.prev
        q = self._find_frame((prev if prev >= 0 else p) + 1, self.data_end)
        reason = str(err).removeprefix(f"{self.path}: ")
        start = p
        if prev >= 0 and ((q is not None and q < p) or not self._starts_frame(p, q)):
            self.segments.drop_last()
            start = prev
            reason += (f"; the frame before it (byte {prev}) does not end where a frame "
                       "starts: dropped too")
        end = self.data_end if q is None else q
        last = self.skipped[-1] if self.skipped else None
        next_frame = self.segments.n_frames
        if last and last.offset + last.length == start and last.next_frame == next_frame:
            start, reason = last.offset, f"{last.reason}; {reason}"
            self.skipped.pop()
        self.skipped.append(SkippedRange(start, end - start,
                                         max(1, round((end - start) / self.nominal)),
                                         reason, next_frame))
        self.prev = -1
        return end

    def _find_frame(self, start: int, stop: int) -> int | None:
        """Byte of the first valid frame start in ``start .. stop-1``, or None.

        A candidate is a ``{`` with ``\\n\\n*`` after it at a length a header can have
        (vectorised over the buffer); it is valid when that header parses exactly.
        """
        sizes = sorted(self.product.header_sizes)
        reach = sizes[-1] + len(DELIMITER)
        step = self.window.buf.size - reach
        pos = start
        while pos < min(stop, self.data_end):
            view = self.window.get(pos, step + reach)
            n = min(step, stop - pos, len(view))
            cand = np.flatnonzero(view[:n] == 0x7B)
            hit = np.zeros(cand.size, bool)
            for length in sizes:
                at = cand + length
                fits = at + 2 < len(view)
                at = at[fits]
                hit[fits] |= ((view[at] == 0x0A) & (view[at + 1] == 0x0A)
                              & (view[at + 2] == 0x2A))
            for c in cand[hit]:
                text = bytes(view[c:c + reach])
                end = text.find(b"\n\n")
                if end in self.product.header_sizes and text[end + 2:end + 3] == b"*":
                    try:
                        parse_header(self.path, pos + int(c), text[:end], self.product)
                    except PFFFormatError:
                        continue
                    return pos + int(c)
            pos += n
        return None

    def _starts_frame(self, p: int, q: int | None) -> bool:
        """Whether a (damaged) frame starts at byte ``p``, the next valid one at ``q``.

        Either nominal-length frames fill ``p .. q`` (or the file's end) exactly, each
        with ``\\n\\n*`` in place and at most a few fixed header bytes wrong (a replaced
        digit or brace), or a header that parses exactly starts at ``p`` and ``q`` is
        not inside it (a lost ``*``, a frame cut short).
        """
        product, h, nominal = self.product, self.product.header_bytes, self.nominal
        layout = product.layout
        for end in [q] if q is not None else [self.size, self.data_end]:
            k, rest = divmod(end - p, nominal)
            if k and not rest and end - p <= self.window.buf.size:
                rows = self.window.get(p, end - p).reshape(k, nominal)
                wrong = ((rows[:, :h] != layout.template) & layout.static).sum(axis=1)
                if (wrong <= _MAX_WRONG_FIXED_BYTES).all() and (
                        rows[:, h:h + 3] == np.frombuffer(DELIMITER, np.uint8)).all():
                    return True
        text = bytes(self.window.get(p, h + _MAX_HEADER_GROWTH + 3))
        end = text.find(b"\n\n")
        if (not text.startswith(b"{") or end not in product.header_sizes
                or (q is not None and q < p + end + len(DELIMITER))):
            return False
        try:
            parse_header(self.path, p, text[:end], product)
        except PFFFormatError:
            return False
        return True
