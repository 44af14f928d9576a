"""Reading PFF frames exactly: images and every header field of a frame range.

:func:`read_frames` reads a range with one ``readinto`` into a reusable buffer, checks
every frame's delimiters where the index puts them, copies the images out of a zero-copy
strided view (or hands out the view) and decodes every header field (:mod:`.headers`).
:class:`PFFReader` is the usual way in: one open file, one buffer, no indexing pass
unless a frame is not at the nominal stride.

Notes
-----
* Memory: one buffer of the largest range read; nothing maps or holds the whole file.
* A file that changes while it is read is an error at the byte where it shows, never a
  silently shifted frame.
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
    """Decoded frames: images (n, H, W) and header fields ((n, 4) or (n,) each)."""

    images: np.ndarray
    headers: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.images)


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
    return Frames(images, headers)


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


def _read_exact(src: str | os.PathLike | BinaryIO, offset: int, out: np.ndarray,
                name: str) -> None:
    if isinstance(src, (str, os.PathLike)):
        with open(src, "rb", buffering=0) as f:
            _read_exact(f, offset, out, name)
        return
    src.seek(offset)
    got = readinto_full(src, memoryview(out))
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
