"""Reading PFF frames exactly: images and every header field of a frame range.

:func:`read_frames` reads a range with one ``readinto`` into a reusable buffer (one more
per skipped corrupt range inside it), checks
every frame's delimiters where the index puts them, copies the images out of a zero-copy
strided view (or hands out the view) and decodes every header field (:mod:`.headers`).
:class:`PFFReader` is the usual way in: one open file, one buffer, no indexing pass
unless a frame is not at the nominal stride.

Notes
-----
* Memory: one buffer of the largest range read; nothing maps or holds the whole file.
* A file that changes while it is read is an error at the byte where it shows, never a
  silently shifted frame.
* A skipped corrupt range (see :mod:`.index`) is not read; the frame after it carries
  ``FLAG_AFTER_GAP`` in ``Frames.index_flags``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np

from panoseti_pipeline.errors import PFFFormatError
from panoseti_pipeline.pff.headers import parse_fixed, parse_json_rows
from panoseti_pipeline.pff.index import (
    FrameIndex,
    StrideMismatch,
    assume_regular,
    delimited,
    index_file,
    readinto_full,
)
from panoseti_pipeline.pff.products import DELIMITER, FIELD_DTYPE


@dataclasses.dataclass
class Frames:
    """Decoded frames: images (n, H, W), header fields ((n, 4) or (n,) each), and where.

    ``first`` is the index's number of the first frame; ``index_flags`` (uint8, (n,)) are
    the flags the index sets (after_gap), to OR into :func:`~.timing.frame_times`' flags.
    """

    images: np.ndarray
    headers: dict[str, np.ndarray]
    first: int
    index_flags: np.ndarray

    def __len__(self) -> int:
        return len(self.images)

    def head(self, n: int) -> Frames:
        """The first ``n`` frames (views)."""
        return Frames(self.images[:n], {k: v[:n] for k, v in self.headers.items()},
                      self.first, self.index_flags[:n])


def read_frames(path: str | os.PathLike | BinaryIO, index: FrameIndex, start: int, stop: int,
                *, buffer: np.ndarray | None = None, copy: bool = True) -> Frames:
    """Read frames ``start .. stop-1``: images and every header field, exactly.

    ``path`` may be an open binary file; ``buffer`` (uint8) is reused when large enough,
    which is 2-3x faster than allocating for every block. With ``copy=False`` the images
    of a regular range are a zero-copy strided view of ``buffer`` (valid until it is
    reused); otherwise they are copied out once. Header columns are decoded in bulk.
    Through an assumed index (not strict), a bad header raises :class:`StrideMismatch`:
    the exact index skips the corrupt frame.
    """
    product = index.product
    n = stop - start
    nbytes = index.byte_range(start, stop)[1]
    if buffer is None or buffer.size < nbytes:
        buffer = np.empty(nbytes, np.uint8)
    raw = buffer[:nbytes]
    pieces = list(index.segments(start, stop))
    at = _read_pieces(path, pieces, raw, index.path)
    view_only = not copy and len(pieces) == 1
    images = None if view_only else np.empty((n, *product.shape), product.dtype)
    headers = {f: np.empty((n, *product.header_shape), FIELD_DTYPE[f]) for f in product.fields}
    try:
        for (a, b, off, stride), rel in zip(pieces, at, strict=True):
            rows = raw[rel:rel + (b - a) * stride].reshape(b - a, stride)
            hlen = stride - len(DELIMITER) - product.pixel_bytes
            _check_delimiters(rows, hlen, off, index)
            pixels = rows[:, hlen + len(DELIMITER):].view(product.dtype)
            pixels = pixels.reshape(b - a, *product.shape)
            if view_only:
                images = pixels
            else:
                copy_pixels(images[a - start:b - start], pixels)
            if hlen == product.header_bytes:
                values, ok = parse_fixed(rows[:, :hlen], product)
                for f in product.fields:
                    headers[f][a - start:b - start] = values[f]
                bad = np.flatnonzero(~ok)
            else:
                bad = np.arange(b - a)
            if bad.size:
                parse_json_rows(index.path, rows[bad], off + bad * stride, hlen, product,
                                headers, bad + (a - start))
    except PFFFormatError as err:
        if index.exact or index.strict or isinstance(err, StrideMismatch):
            raise
        raise StrideMismatch(str(err)) from None
    return Frames(images, headers, start, index.index_flags(start, stop))


def copy_pixels(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[...] = src for (n, H, W) images, one row of bytes per frame (memcpy speed).

    ``src`` may be a strided view of frames in a read buffer; copying element by element
    through its (H, W) axes is several times slower than copying each frame's bytes.
    """
    dst.view(np.uint8).reshape(len(dst), -1)[...] = src.view(np.uint8).reshape(len(src), -1)


def _check_delimiters(rows: np.ndarray, hlen: int, offset: int, index: FrameIndex) -> None:
    """Every frame must start with ``{`` and have ``\\n\\n*`` right after its header."""
    ok = delimited(rows, hlen)
    if ok.all():
        return
    at = offset + int(np.argmin(ok)) * rows.shape[1]
    if not index.exact:
        raise StrideMismatch(f"{index.path}: frame at byte {at} is not at the nominal stride")
    raise PFFFormatError(f"{index.path}: no frame delimiter where the index expects one "
                         f"(byte {at}); did the file change while being read?")


def _read_pieces(src: str | os.PathLike | BinaryIO, pieces: list[tuple[int, int, int, int]],
                 out: np.ndarray, name: str) -> list[int]:
    """Read segment pieces back to back into ``out``; return where each one starts there.

    Adjacent pieces are one read; the bytes of a skipped range between two are not read.
    """
    if isinstance(src, (str, os.PathLike)):
        with open(src, "rb", buffering=0) as f:
            return _read_pieces(f, pieces, out, name)
    at, pos, end = [], 0, -1
    for a, b, off, stride in pieces:
        if off != end:
            src.seek(off)
        nbytes = (b - a) * stride
        got = readinto_full(src, memoryview(out[pos:pos + nbytes]))
        if got < nbytes:
            raise PFFFormatError(f"{name}: file shrank while reading: wanted {nbytes} bytes "
                                 f"at byte {off}, got {got}")
        at.append(pos)
        pos, end = pos + nbytes, off + nbytes
    return at


class PFFReader:
    """Sequential or random reads of one file through one reused buffer.

    Starts from :func:`assume_regular` (no indexing pass) and switches to the exact
    index the first time a frame is not at the nominal stride. ``strict``: refuse a
    corrupt frame instead of skipping it. Use as a context manager.
    """

    def __init__(self, path: str | os.PathLike, index: FrameIndex | None = None, *,
                 strict: bool = False) -> None:
        self.path = str(path)
        self.index = index if index is not None else assume_regular(path, strict=strict)
        self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 (closed in close())
        self._buffer = np.empty(0, np.uint8)

    def __enter__(self) -> PFFReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def read(self, start: int, stop: int, *, copy: bool = True) -> Frames:
        """Frames ``start .. stop-1`` (``copy=False``: images may view the buffer).

        Through the assumed index the frame after the range is read too, so every frame
        returned is seen to end where the next one starts. Where the assumption fails
        the file is indexed exactly and the range renumbered by byte: the frames from
        the byte where frame ``start`` was assumed on (``Frames.first``; fewer, or none,
        near the end).
        """
        while True:
            index = self.index
            if start >= stop:
                return _no_frames(index, start)
            more = 0 if index.exact or stop >= index.n_frames else 1
            nbytes = index.byte_range(start, stop + more)[1]
            if self._buffer.size < nbytes:
                self._buffer = np.empty(nbytes + nbytes // 8, np.uint8)
            try:
                frames = read_frames(self._file, index, start, stop + more,
                                     buffer=self._buffer, copy=copy)
            except StrideMismatch:
                self.index = index_file(self.path, index.dp, strict=index.strict)
                start, stop = (self._renumber(index, k) for k in (start, stop))
                continue
            return frames.head(stop - start) if more else frames

    def _renumber(self, old: FrameIndex, k: int) -> int:
        """Frame ``k`` of the assumed index ``old``: the first exact frame from its byte."""
        if k >= old.n_frames:
            return self.index.n_frames
        return self.index.frame_at(int(old.offsets(k, k + 1)[0]))

    def blocks(self, frames_per_block: int = 4096, *, copy: bool = False
               ) -> Iterator[tuple[int, Frames]]:
        """Stream the file as (first frame, Frames); by default images view the buffer."""
        start = 0
        while start < self.index.n_frames:
            frames = self.read(start, min(start + frames_per_block, self.index.n_frames),
                               copy=copy)
            if len(frames):  # none if the exact index has no frame in the assumed range
                yield frames.first, frames
            start = frames.first + len(frames)


def _no_frames(index: FrameIndex, first: int) -> Frames:
    product = index.product
    return Frames(np.empty((0, *product.shape), product.dtype),
                  {f: np.empty((0, *product.header_shape), FIELD_DTYPE[f])
                   for f in product.fields}, first, np.zeros(0, np.uint8))
