"""Read the time-sharded arrays :mod:`panoseti_pipeline.store.shards` writes, without zarr.

Why: step 2 reads every L0 frame, and zarr's read path (its event loop, one task per
inner chunk, a copy for the checksum, a copy into the output) cost more thread time than
the decoding itself. The layout is simple enough to read directly: per needed shard
file, the index at its end (``(offset, nbytes)`` uint64 pairs plus their CRC32C), then
the bytes of the needed inner chunks with one ``pread`` per contiguous run, each chunk's
CRC32C checked and the chunk decoded (numcodecs, as zarr does) straight into the output
where it covers whole frames of it.

Only an array whose metadata is exactly what our writer produces is read here: one
``sharding_indexed`` codec, index at the end with ``bytes`` + ``crc32c``, inner chunks
and shards spanning time only, inner codecs ``bytes`` (little-endian), then Blosc or
gzip or nothing, then ``crc32c`` or nothing, in a directory store.
:func:`frames_of` makes that decision (the only place that does); every other array
(another writer's codecs, unsharded, filters) is returned as the zarr array it is.

Absent inner chunks (index entry ``2**64 - 1``) and absent shard files read as the
fill value, as zarr reads them. A damaged file (checksum mismatch, truncated shard,
undecodable chunk) raises :class:`~panoseti_pipeline.errors.StoreError` naming the
file and the chunk.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import gzip
import os
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from panoseti_pipeline.errors import StoreError
from panoseti_pipeline.store.shards import EMPTY, crc32c

#: most bytes one ``pread`` fetches: a long contiguous run is cut at chunk boundaries
RUN_BYTES = 64 << 20
_INDEX_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]


@dataclasses.dataclass(frozen=True)
class _Codecs:
    """The inner-chunk codecs: ``decode(data, raw)`` fills ``raw`` (uint8, a whole chunk)
    or raises ValueError; ``checksum``: a CRC32C follows the data."""

    decode: Callable[[np.ndarray, np.ndarray], None]
    checksum: bool


def _raw_into(data: np.ndarray, raw: np.ndarray) -> None:
    _check_size(data.size, raw)
    raw[:] = data


def _blosc_into(data: np.ndarray, raw: np.ndarray) -> None:
    """Blosc (numcodecs, as zarr decodes it); the sizes come from Blosc's 16-byte header."""
    from numcodecs import blosc

    header = data[:16].tobytes()
    if len(header) < 16 or int.from_bytes(header[12:16], "little") != data.size:
        raise ValueError(f"not a Blosc buffer of {data.size} bytes")
    _check_size(int.from_bytes(header[4:8], "little"), raw)
    blosc.decompress(data, raw)


def _gzip_into(data: np.ndarray, raw: np.ndarray) -> None:
    """gzip (Python's, as numcodecs' GZip decodes it for zarr)."""
    out = gzip.decompress(data)
    _check_size(len(out), raw)
    raw[:] = np.frombuffer(out, np.uint8)


def _check_size(nbytes: int, raw: np.ndarray) -> None:
    if nbytes != raw.size:
        raise ValueError(f"{nbytes} bytes decoded, a chunk has {raw.size}")


def frames_of(array: Any) -> Any:
    """``array`` (a zarr array) as a :class:`ShardedFrames` when it has our shard layout,
    else ``array`` itself: both give frames a..b-1 with ``[a:b]``."""
    import zarr

    codecs = _our_codecs(array)
    if codecs is None or not isinstance(array.store, zarr.storage.LocalStore):
        return array
    return ShardedFrames(Path(array.store.root, array.path), array.shape, array.dtype,
                         array.metadata.fill_value, array.chunks[0], array.shards[0],
                         codecs, array.metadata.encode_chunk_key)


def _our_codecs(array: Any) -> _Codecs | None:
    """The inner codecs if ``array``'s metadata is exactly our writer's layout, else None."""
    meta = array.metadata
    if getattr(meta, "zarr_format", None) != 3 or meta.storage_transformers:
        return None
    codecs = meta.to_dict()["codecs"]
    if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed" or array.ndim < 1:
        return None
    config = codecs[0]["configuration"]
    if (config.get("index_location", "end") != "end"
            or list(config["index_codecs"]) != _INDEX_CODECS
            or tuple(array.chunks[1:]) != tuple(array.shape[1:])
            or tuple(array.shards[1:]) != tuple(array.shape[1:])):
        return None
    chain = list(config["codecs"])
    if not chain or chain[0]["name"] != "bytes" or chain[0].get("configuration", {}).get(
            "endian", "little") != "little":
        return None
    chain = chain[1:]
    checksum = bool(chain) and chain[-1] == {"name": "crc32c"}
    if checksum:
        chain = chain[:-1]
    # decoding reads every parameter from the chunk itself (Blosc's header, gzip's)
    if not chain:
        return _Codecs(_raw_into, checksum)
    decoders = {"blosc": _blosc_into, "gzip": _gzip_into}
    if len(chain) == 1 and chain[0]["name"] in decoders:
        return _Codecs(decoders[chain[0]["name"]], checksum)
    return None


@dataclasses.dataclass(frozen=True)
class _Chunk:
    """Inner chunk ``k`` of the array: where its bytes are and which frames are wanted."""

    k: int
    offset: int
    nbytes: int
    lo: int  # wanted frames lo..hi-1 of the chunk
    hi: int
    at: int  # ... go to output rows at..at+hi-lo


class ShardedFrames:
    """A time-sharded array of ours, read frames a..b-1 at a time (``[a:b]`` or :meth:`read`).

    Nothing is cached between reads but the metadata: a shard's index is read again
    with every read that needs the shard (a ``pread`` of ``16 * per_shard + 4`` bytes).
    """

    def __init__(self, directory: Path, shape: tuple[int, ...], dtype: Any, fill_value: Any,
                 chunk: int, shard: int, codecs: _Codecs, key: Callable[[tuple], str]) -> None:
        self.directory = directory
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.fill_value = fill_value
        self.chunk = chunk
        self.per_shard = shard // chunk
        self.codecs = codecs
        self._key = key
        self._stored = self.dtype.newbyteorder("<") if self.dtype.itemsize > 1 else self.dtype
        self._frame_bytes = self.dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def chunks(self) -> tuple[int, ...]:
        """The inner chunk shape, as zarr's ``Array.chunks``."""
        return (self.chunk, *self.shape[1:])

    @property
    def shards(self) -> tuple[int, ...]:
        """The shard shape, as zarr's ``Array.shards``."""
        return (self.chunk * self.per_shard, *self.shape[1:])

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError(f"{self.directory}: only [a:b] reads frames ({key!r})")
        a, b, _ = key.indices(self.shape[0])
        return self.read(a, max(a, b))

    def read(self, a: int, b: int) -> np.ndarray:
        """Frames a..b-1 (0 <= a <= b <= frames) in a new array.

        The runs of chunk bytes are read and decoded on the calling thread when there is
        one, else on a small pool shared by the process (numcodecs and the checksum
        release the GIL while they work).
        """
        if not 0 <= a <= b <= self.shape[0]:
            raise IndexError(f"{self.directory}: frames {a}..{b - 1} are outside 0.."
                             f"{self.shape[0] - 1}")
        out = np.empty((b - a, *self.shape[1:]), self.dtype)
        if a == b:
            return out
        jobs = [(path, run) for path, runs in self._plan(a, b, out) for run in runs]
        if len(jobs) == 1:
            self._read_run(out, *jobs[0])
        elif jobs:
            list(_pool().map(lambda job: self._read_run(out, *job), jobs))
        return out

    # ------------------------------------------------------------------ planning

    def _plan(self, a: int, b: int, out: np.ndarray) -> Iterator[tuple[Path, list]]:
        """Per shard file that holds some of frames a..b-1: its runs of wanted chunks.

        Frames of absent chunks (and of absent shard files) get the fill value here.
        """
        c, per = self.chunk, self.per_shard
        for s in range(a // (c * per), (b - 1) // (c * per) + 1):
            path = self.directory / self._key((s, *[0] * (self.ndim - 1)))
            wanted = []
            for k in range(max(a // c, s * per), min(-(-b // c), (s + 1) * per)):
                lo, hi = max(a, k * c) - k * c, min(b, (k + 1) * c) - k * c
                wanted.append((k, lo, hi, k * c + lo - a))
            index = self._index(path) if path.is_file() else None
            chunks = []
            for k, lo, hi, at in wanted:
                offset, nbytes = (EMPTY, EMPTY) if index is None else index[k - s * per]
                if offset == EMPTY and nbytes == EMPTY:
                    out[at: at + hi - lo] = self.fill_value
                else:
                    chunks.append(_Chunk(k, int(offset), int(nbytes), lo, hi, at))
            yield path, _runs(chunks)

    def _index(self, path: Path) -> np.ndarray:
        """The shard's ``(offset, nbytes)`` per inner chunk, its CRC32C checked and every
        entry inside the file."""
        size = 16 * self.per_shard + 4
        with open(path, "rb") as f:
            end = os.fstat(f.fileno()).st_size
            raw = os.pread(f.fileno(), size, end - size) if end >= size else b""
        if len(raw) != size or crc32c(raw[:-4]) != raw[-4:]:
            raise StoreError(f"{path}: shard index damaged (its CRC32C does not match: a "
                             "truncated or corrupt shard file)")
        index = np.frombuffer(raw[:-4], "<u8").reshape(self.per_shard, 2)
        used = ~((index[:, 0] == EMPTY) & (index[:, 1] == EMPTY))
        past = used & (index[:, 0] + index[:, 1] > end - size)
        if past.any():
            k = int(np.flatnonzero(past)[0])
            raise StoreError(f"{path}: inner chunk {k} lies past the end of the data "
                             f"({end - size} bytes): a truncated shard file")
        return index

    # ------------------------------------------------------------------ reading

    def _read_run(self, out: np.ndarray, path: Path, run: list[_Chunk]) -> None:
        """Read one contiguous run of chunk bytes and decode each chunk into ``out``."""
        start = run[0].offset
        buf = np.empty(run[-1].offset + run[-1].nbytes - start, np.uint8)
        fd = os.open(path, os.O_RDONLY)
        try:
            got = os.preadv(fd, [buf], start)
        finally:
            os.close(fd)
        if got != buf.size:
            raise StoreError(f"{path}: inner chunk {run[0].k % self.per_shard} cut short "
                             f"(read {got} of {buf.size} bytes): a truncated shard file")
        for ch in run:
            self._decode(out, path, ch, buf[ch.offset - start: ch.offset - start + ch.nbytes])

    def _decode(self, out: np.ndarray, path: Path, ch: _Chunk, data: np.ndarray) -> None:
        where = f"{path}: inner chunk {ch.k % self.per_shard} (frames {ch.k * self.chunk}.."
        where += f"{(ch.k + 1) * self.chunk - 1})"
        if self.codecs.checksum:
            data, stored = data[:-4], data[-4:]
            if crc32c(data) != stored.tobytes():
                raise StoreError(f"{where}: CRC32C does not match (corrupt data)")
        n = ch.hi - ch.lo
        whole = ch.lo == 0 and ch.hi == self.chunk and self._stored == self.dtype
        dest = out[ch.at: ch.at + n] if whole else np.empty(
            (self.chunk, *self.shape[1:]), self._stored)
        raw = dest.reshape(-1).view(np.uint8)
        try:
            self.codecs.decode(data, raw)
        except (ValueError, RuntimeError, OSError, EOFError, zlib.error) as err:
            raise StoreError(f"{where}: cannot be decoded ({err})") from None
        if not whole:
            out[ch.at: ch.at + n] = dest[ch.lo: ch.hi]


def _runs(chunks: list[_Chunk]) -> list[list[_Chunk]]:
    """Chunks grouped into runs that are back to back in the file (at most RUN_BYTES)."""
    runs: list[list[_Chunk]] = []
    for ch in sorted(chunks, key=lambda c: c.offset):
        last = runs[-1][-1] if runs else None
        if (last is not None and last.offset + last.nbytes == ch.offset
                and ch.offset + ch.nbytes - runs[-1][0].offset <= RUN_BYTES):
            runs[-1].append(ch)
        else:
            runs.append([ch])
    return runs


@functools.cache
def _pool() -> concurrent.futures.ThreadPoolExecutor:
    """Threads decoding the runs of one read that needs several (one per CPU)."""
    from panoseti_pipeline import runners

    return concurrent.futures.ThreadPoolExecutor(runners.cpus(), "shard-read")
