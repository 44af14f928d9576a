"""The layout of the pipeline's Zarr products (L0, L1): codecs, arrays, opening them.

Both steps write a Zarr v3 group per product (DESIGN.md §4, §5). This module is where
the layout conventions live, so step 1, step 2 and the tests agree on them:

* every array carries zarr v3 ``dimension_names``; ``time`` is int64 nanoseconds with CF
  attributes so xarray decodes ``datetime64[ns]`` (NaT is int64 min, the fill value);
* chunks along time are whole multiples shared by images and per-frame arrays
  (:mod:`panoseti_pipeline.chunking`), so a task that owns a chunk-aligned frame range
  owns every chunk it writes;
* a published product carries its ``processing_level``; :func:`open_product` opens only
  that. How a product gets published atomically: :mod:`panoseti_pipeline.store.publish`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from panoseti_pipeline.errors import InputError
from panoseti_pipeline.store.publish import PARTIAL_SUFFIX
from panoseti_pipeline.store.shard_reader import ShardedFrames, frames_of
from panoseti_pipeline.store.spec import SPEC_VERSION_KEY, FrameArray
from panoseti_pipeline.version import git_revision

if TYPE_CHECKING:  # zarr is imported where it is used: 0.35 s a step 1 task never needs
    import zarr

    from panoseti_pipeline.store.shards import ChunkCodec

LEVEL_L0 = "L0"
LEVEL_L1 = "L1"
_SHUFFLES = {"bit": "bitshuffle", "byte": "shuffle", "none": "noshuffle"}


def configure_zarr(max_concurrent_writes: int, compress_threads: int) -> None:
    """Zarr's I/O concurrency and compression threads for this process.

    Must run before the first read or write (zarr reads ``threading.max_workers`` once).
    Detector data never equals the fill value, so the per-chunk "is it empty?" scan of
    ``write_empty_chunks=False`` is pure cost (3-5x measured here): switch it off.
    """
    import zarr

    zarr.config.set({"async.concurrency": max_concurrent_writes,
                     "threading.max_workers": compress_threads,
                     "array.write_empty_chunks": True})


def compressors(codec: ChunkCodec) -> list:
    """Zarr v3 bytes-to-bytes codecs that write what ``codec`` writes."""
    import zarr.codecs

    out: list = []
    if codec.codec in ("blosc-lz4", "zstd"):
        out.append(zarr.codecs.BloscCodec(
            cname="lz4" if codec.codec == "blosc-lz4" else "zstd", clevel=codec.level,
            shuffle=_SHUFFLES[codec.shuffle]))
    elif codec.codec == "gzip":
        out.append(zarr.codecs.GzipCodec(level=codec.level))
    elif codec.codec != "none":
        raise ValueError(f"unknown codec {codec.codec!r}")
    if codec.checksum:
        out.append(zarr.codecs.Crc32cCodec())
    return out


def create_array(group: zarr.Group, name: str, shape: tuple[int, ...], chunks: tuple[int, ...],
                 dtype: Any, dims: tuple[str, ...], codecs: list, attrs: Mapping | None = None,
                 fill_value: Any = 0) -> zarr.Array:
    """One array of a product, with dimension names and the product's codecs."""
    return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype,
                              compressors=codecs or None, fill_value=fill_value,
                              dimension_names=dims, attributes=dict(attrs or {}))


def create_frame_arrays(group: zarr.Group, arrays: Sequence[FrameArray], n_frames: int,
                        time_chunk: int, per_shard: int, codecs: list,
                        image_filters: list | None = None) -> None:
    """The per-frame arrays of a product (:func:`panoseti_pipeline.store.spec.frame_arrays`).

    Every array shares the store's ``time_chunk`` (:func:`panoseti_pipeline.chunking.time_chunk`)
    and, with ``per_shard`` > 0, shards of ``per_shard`` chunks, so a task owning whole
    shards owns every file it writes. ``_ARRAY_DIMENSIONS`` is kept beside zarr v3's
    ``dimension_names``, as the PANOSETI spec asks. ``image_filters`` apply to ``images``.
    """
    for a in arrays:
        chunks = (time_chunk, *a.trailing)
        shards = (time_chunk * per_shard, *a.trailing) if per_shard else None
        filters = image_filters if a.name == "images" and image_filters else None
        group.create_array(a.name, shape=(n_frames, *a.trailing), chunks=chunks, shards=shards,
                           dtype=a.dtype, filters=filters, compressors=codecs or None,
                           fill_value=a.fill_value, dimension_names=a.dims,
                           attributes={"_ARRAY_DIMENSIONS": list(a.dims), **a.attrs})


def read_frames(arrays: Mapping[str, Any], a: int, b: int) -> dict[str, np.ndarray]:
    """Frames a..b-1 of every array (zarr's or :class:`ShardedFrames`), in one trip."""
    return read_ranges(arrays, [(a, b)])[0]


def read_ranges(arrays: Mapping[str, Any], ranges: Sequence[tuple[int, int]]
                ) -> list[dict[str, np.ndarray]]:
    """Frames a..b-1 of every array for each (a, b) of ``ranges``, in one trip.

    :class:`ShardedFrames` are read on the calling thread. For zarr arrays,
    ``array[a:b]`` one array at a time costs a round trip to zarr's loop thread each
    (3-5 ms measured here, more than reading a small chunk): a chunk of 20-odd arrays
    pays it once instead, and the chunks are decoded on zarr's threads meanwhile.
    """
    through_zarr = [name for name, array in arrays.items()
                    if not isinstance(array, ShardedFrames)]
    values = iter(_zarr_ranges([arrays[n] for n in through_zarr], ranges)
                  if through_zarr else ())
    return [{name: next(values) if name in through_zarr else array.read(a, b)
             for name, array in arrays.items()} for a, b in ranges]


def _zarr_ranges(arrays: list[zarr.Array], ranges: Sequence[tuple[int, int]]
                 ) -> list[np.ndarray]:
    import asyncio

    from zarr.core.sync import sync

    async def read() -> list[np.ndarray]:
        return await asyncio.gather(*(array.async_array.getitem(slice(a, b))
                                      for a, b in ranges for array in arrays))

    return sync(read())


ROWS_RANGES_PER_TRIP = 4  # read_rows: chunk ranges read at once (bounds its memory)


def read_rows(arrays: Mapping[str, zarr.Array], rows: np.ndarray, chunk: int
              ) -> dict[str, np.ndarray]:
    """Frames at positions ``rows`` (any order) of every array, in that order.

    Ascending consecutive ``rows`` are one range (no copy, as :func:`read_frames`);
    otherwise each ``chunk``-frame block the rows fall in is read once, from its first to
    its last row, :data:`ROWS_RANGES_PER_TRIP` blocks at a time.
    """
    if rows.size and rows[-1] - rows[0] == rows.size - 1 and (np.diff(rows) == 1).all():
        return read_frames(arrays, int(rows[0]), int(rows[-1]) + 1)
    out = {name: np.empty((rows.size, *a.shape[1:]), a.dtype) for name, a in arrays.items()}
    block = rows // chunk
    blocks = np.unique(block)
    for i in range(0, blocks.size, ROWS_RANGES_PER_TRIP):
        wanted = [np.flatnonzero(block == b) for b in blocks[i: i + ROWS_RANGES_PER_TRIP]]
        ranges = [(int(rows[w].min()), int(rows[w].max()) + 1) for w in wanted]
        for w, (a, _), part in zip(wanted, ranges, read_ranges(arrays, ranges), strict=True):
            for name, values in part.items():
                out[name][w] = values[rows[w] - a]
    return out


def open_product(path: str | os.PathLike, level: str) -> zarr.Group:
    """Open a product read-only; :class:`InputError` if it is not one of ``level``.

    Ours say their ``processing_level``. An L0 may also be a store of PANOSETI's spec
    written by another tool (``pypff.zarr.convert_run``: ``panoseti_pff_zarr_version``,
    no level, no consolidated metadata). Completeness is not judged here: ours are only
    ever published complete; :func:`panoseti_pipeline.step2.l0_input.inspect_l0` checks
    the chunks of the others.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such store")
    if p.name.endswith(PARTIAL_SUFFIX):
        raise InputError(f"{p}: incomplete store (a partial store: its writing never "
                         "finished; rerun the step that makes it)")
    import zarr

    try:
        with _quiet_consolidated():
            group = zarr.open_group(store=str(p), mode="r", use_consolidated=None)
    except (FileNotFoundError, ValueError, KeyError, zarr.errors.BaseZarrError) as err:
        raise InputError(f"{p}: not a Zarr store of PFF data ({err})") from None
    got = group.attrs.get("processing_level")
    if got is None and level == LEVEL_L0 and SPEC_VERSION_KEY in group.attrs:
        return group
    if got != level:
        expected = (f"an {level} store (processing_level = {got!r}, and no "
                    f"{SPEC_VERSION_KEY} of PANOSETI's spec)" if level == LEVEL_L0
                    else f"an {level} store (processing_level = {got!r})")
        raise InputError(f"{p}: not {expected}")
    return group


def missing_files(store: str | os.PathLike, array: zarr.Array) -> tuple[int, int]:
    """(missing, expected) chunk files -- shard files if sharded -- of a time-chunked array
    in a directory store: what a writer that stopped early leaves out."""
    along = (array.shards or array.chunks)[0]
    expected = -(-array.shape[0] // along)
    rest = (0,) * (array.ndim - 1)
    missing = sum(not Path(store, array.path, array.metadata.encode_chunk_key((i, *rest)))
                  .is_file() for i in range(expected))
    return missing, expected


@functools.lru_cache(maxsize=256)
def open_array(path: str, name: str, level: str | None = None, run: str = "") -> Any:
    """Array ``name`` of the store at ``path``, opened once per process and ``run``.

    Tasks open the same arrays again and again, and metadata reads cost milliseconds
    each. ``level``: a published product of that level, read-only (checked as
    :func:`open_product` does), as a :class:`ShardedFrames` if the array has our shard
    layout (:func:`frames_of`), else as a zarr array; None: a store being written (not
    consolidated yet), a writable zarr array. ``run`` tells runs apart, so a store
    rewritten between runs under the same path is opened afresh.
    """
    if level is None:
        import zarr

        return zarr.open_array(store=f"{path}/{name}", mode="r+")
    return frames_of(_open_product_once(path, level, run)[name])


@functools.lru_cache(maxsize=16)
def _open_product_once(path: str, level: str, run: str) -> zarr.Group:
    """:func:`open_product` once per process and run: its consolidated metadata (every
    array's) is parsed once, not once for each array opened (24 times in a step 2)."""
    return open_product(path, level)


@contextlib.contextmanager
def _quiet_consolidated() -> Iterator[None]:
    """Zarr warns that v3 consolidated metadata is not in the spec yet; we know."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        yield


def consolidate(store: str | os.PathLike | zarr.abc.store.Store) -> None:
    """Consolidate a store's metadata (a path, or a zarr store such as a MemoryStore)."""
    import zarr

    with _quiet_consolidated():
        zarr.consolidate_metadata(store if isinstance(store, zarr.abc.store.Store)
                                  else str(store))


def software_versions() -> dict[str, str]:
    """Versions recorded in every product's attributes (provenance). From the installed
    packages' metadata: importing zarr and numcodecs only to ask costs a driver call 0.4 s,
    importing dask 0.13 s."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"pipeline": git_revision(), "python": sys.version.split()[0],
                "numpy": np.__version__}
    for package in ("zarr", "numcodecs", "dask"):
        with contextlib.suppress(PackageNotFoundError):
            versions[package] = version(package)
    return versions


