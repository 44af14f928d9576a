"""Write the chunks of a time-chunked Zarr v3 array straight to its files, streaming.

Why not ``array[a:b] = data``: zarr encodes a whole shard in memory before it writes it,
so a shard big enough to keep a night's file count low (a shard holds ~1 GB of input)
would cost its size in RAM, and every chunk would take zarr's event loop and a copy for
its checksum. Here each inner chunk is encoded once, appended to the shard file as it
is produced, and the shard index is written last: memory is one chunk per array, and a
task that owns a whole shard writes it alone.

The bytes are what zarr itself writes for the array's metadata (``bytes`` little-endian,
then Blosc/gzip, then ``crc32c``; shard index ``(offset, nbytes)`` uint64 pairs plus its
CRC32C, at the end of the file); a test compares them with zarr's own output. The array
(its ``zarr.json``) is created by zarr (:mod:`panoseti_pipeline.store.layout`); only
chunk files are written here.

Notes
-----
* Chunks span time only: an array is ``(time, *rest)`` with chunk ``(C, *rest)`` and,
  when sharded, shard ``(C * per_shard, *rest)``.
* The last chunk of an array is padded with the fill value (0) to the full chunk shape,
  as zarr does; inner chunks of the last shard past the array's end are marked empty.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import gzip
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

#: an absent inner chunk in a shard index (zarr v3 sharding spec)
EMPTY = np.uint64(2**64 - 1)
_SHUFFLES = {"bit": 2, "byte": 1, "none": 0}
#: a chunk's encoded bytes as pieces to write back to back (data, then its checksum)
Encoded = tuple[bytes, ...]


@dataclasses.dataclass(frozen=True)
class ChunkCodec:
    """Encodes one chunk as the array's codecs do: little-endian bytes, then the
    compressor (``blosc-lz4``, ``zstd`` = Blosc zstd, ``gzip``, ``none``), then CRC32C."""

    codec: str
    level: int
    shuffle: str
    checksum: bool

    def compressor(self, itemsize: int) -> Callable[[np.ndarray], bytes] | None:
        """The compression of raw chunk bytes for arrays of ``itemsize`` bytes (None: none).

        Blosc's typesize is the array's item size, as zarr sets it from the data type.
        gzip is written with mtime 0, so equal chunks give equal bytes whenever they are
        written (zarr's own gzip stamps the current time into every chunk).
        """
        if self.codec in ("blosc-lz4", "zstd"):
            import numcodecs

            blosc = numcodecs.Blosc.from_config({
                "cname": "lz4" if self.codec == "blosc-lz4" else "zstd",
                "clevel": self.level, "shuffle": _SHUFFLES[self.shuffle], "blocksize": 0,
                "typesize": itemsize})
            return lambda raw: bytes(blosc.encode(raw))
        if self.codec == "gzip":
            level = self.level
            return lambda raw: gzip.compress(raw, compresslevel=level, mtime=0)
        if self.codec == "none":
            return None
        raise ValueError(f"unknown codec {self.codec!r}")

    def encoder(self, dtype: Any) -> Callable[[np.ndarray], Encoded]:
        """A function ``chunk -> encoded pieces`` for chunks of ``dtype`` (safe to share by
        threads): the compressed bytes and their CRC32C, written back to back (one copy
        fewer than joining them)."""
        dtype = np.dtype(dtype)
        if dtype.itemsize > 1:
            dtype = dtype.newbyteorder("<")
        compress = self.compressor(dtype.itemsize)
        checksum = self.checksum

        def encode(chunk: np.ndarray) -> Encoded:
            raw = np.ascontiguousarray(chunk, dtype=dtype).view(np.uint8).reshape(-1)
            data = compress(raw) if compress is not None else raw.tobytes()
            return (data, crc32c(data)) if checksum else (data,)

        return encode


def crc32c(data: bytes) -> bytes:
    """CRC32C of ``data`` as 4 little-endian bytes (zarr's ``crc32c`` codec)."""
    import google_crc32c

    return np.uint32(google_crc32c.value(data)).tobytes()


def pad_chunk(values: np.ndarray, chunk: int) -> np.ndarray:
    """``values`` (fewer than ``chunk`` frames: the array's last chunk) padded with 0."""
    if len(values) == chunk:
        return values
    out = np.zeros((chunk, *values.shape[1:]), dtype=values.dtype)
    out[: len(values)] = values
    return out


def chunk_key(index: int, ndim: int) -> str:
    """The file of chunk (or shard) ``index`` along time: ``c/<index>/0/...`` (``/`` keys)."""
    return "/".join(["c", str(index), *["0"] * (ndim - 1)])


class ChunkFiles:
    """Writes the time chunks of one array, in order, from chunk ``first`` on.

    With ``per_shard`` inner chunks per shard (0: no sharding), chunk ``k`` goes into
    shard ``k // per_shard``; a shard's file is complete when its last inner chunk (or
    the array's last chunk) was added, or at :meth:`close`. Without sharding every
    chunk is its own file. Files are written under ``array_dir`` (e.g.
    ``store/images``), directories created as needed.
    """

    def __init__(self, array_dir: str | os.PathLike, ndim: int, first: int, per_shard: int,
                 n_chunks: int) -> None:
        self.array_dir = Path(array_dir)
        self.ndim = ndim
        self.next = first
        self.per_shard = per_shard
        self.n_chunks = n_chunks
        self._file = None
        self._index: np.ndarray | None = None
        self._offset = 0

    def add(self, encoded: Encoded) -> None:
        """Append the next chunk's encoded bytes (pieces written back to back)."""
        k = self.next
        if k >= self.n_chunks:
            raise ValueError(f"{self.array_dir}: chunk {k} is past the array's "
                             f"{self.n_chunks} chunks")
        self.next += 1
        if not self.per_shard:
            _write_file(self.array_dir / chunk_key(k, self.ndim), encoded)
            return
        shard, inner = divmod(k, self.per_shard)
        if self._file is None:
            path = self.array_dir / chunk_key(shard, self.ndim)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "wb")  # noqa: SIM115 -- closed by _finish_shard
            self._index = np.full((self.per_shard, 2), EMPTY, dtype="<u8")
            self._offset = 0
        nbytes = 0
        for piece in encoded:
            nbytes += self._file.write(piece)
        self._index[inner] = (self._offset, nbytes)
        self._offset += nbytes
        if inner == self.per_shard - 1 or k == self.n_chunks - 1:
            self._finish_shard()

    def close(self) -> None:
        """Finish a shard whose remaining chunks belong to another writer (or never come)."""
        if self._file is not None:
            self._finish_shard()

    def abort(self) -> None:
        """Close without writing an index (the store is being discarded)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def _finish_shard(self) -> None:
        index = self._index.tobytes()
        self._file.write(index + crc32c(index))
        self._file.close()
        self._file = None


def _write_file(path: Path, encoded: Encoded) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for piece in encoded:
            f.write(piece)


class FrameWriter:
    """Writes a task's frames, whole time chunks at a time, into several arrays of a store.

    Each chunk is produced (read, decoded) and encoded on one of ``threads`` threads, so
    a task that owns a whole shard still uses every core it is given; the encoded bytes
    are appended to each array's files in chunk order by the calling thread. At most
    ``threads + 1`` chunks are in flight: memory is bounded by the chunk, not the shard.
    ``produce`` functions run on the pool's threads and may use thread-local buffers
    (:func:`panoseti_pipeline.runners.thread_array`): a thread encodes a chunk before it
    produces the next one.
    """

    def __init__(self, store: str | os.PathLike, dtypes: Mapping[str, Any],
                 ndims: Mapping[str, int], chunk: int, per_shard: int, n_frames: int,
                 first_frame: int, codec: ChunkCodec, threads: int,
                 prepare: Mapping[str, Callable[[np.ndarray], np.ndarray]] | None = None
                 ) -> None:
        if first_frame % chunk:
            raise ValueError(f"frame {first_frame} is not at a chunk boundary ({chunk})")
        n_chunks = -(-n_frames // chunk)
        self.chunk = chunk
        self.encoders = {name: codec.encoder(dtype) for name, dtype in dtypes.items()}
        self.prepare = dict(prepare or {})
        self.files = {name: ChunkFiles(Path(store, name), ndims[name], first_frame // chunk,
                                       per_shard, n_chunks) for name in dtypes}
        threads = max(1, threads)
        self.pool = concurrent.futures.ThreadPoolExecutor(threads)
        self.in_flight = threads + 1
        self._pending: collections.deque = collections.deque()
        self._summaries: list[Any] = []

    def add(self, produce: Callable[[], tuple[Mapping[str, np.ndarray], Any]]) -> None:
        """Queue the next chunk: ``produce()`` returns its arrays (the array's last chunk
        may be short) and a summary, handed back by :meth:`close` in chunk order."""
        self._pending.append(self.pool.submit(self._encode_chunk, produce))
        while len(self._pending) > self.in_flight:
            self._drain_one()

    def close(self) -> list[Any]:
        """Write everything queued, finish the files (shard indexes); the summaries."""
        try:
            while self._pending:
                self._drain_one()
            for files in self.files.values():
                files.close()
        finally:
            self.pool.shutdown()
        return self._summaries

    def abort(self) -> None:
        """Stop: wait for the running chunks (nothing is written after this returns)."""
        for job in self._pending:
            job.cancel()
        self.pool.shutdown(wait=True)
        for files in self.files.values():
            files.abort()

    def _encode_chunk(self, produce: Callable[[], tuple[Mapping[str, np.ndarray], Any]]
                      ) -> tuple[dict[str, Encoded], Any]:
        values, summary = produce()
        encoded = {}
        for name, encode in self.encoders.items():
            chunk = values[name]
            if name in self.prepare:
                chunk = self.prepare[name](chunk)
            encoded[name] = encode(pad_chunk(chunk, self.chunk))
        return encoded, summary

    def _drain_one(self) -> None:
        encoded, summary = self._pending.popleft().result()
        for name, data in encoded.items():
            self.files[name].add(data)
        self._summaries.append(summary)
