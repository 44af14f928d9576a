"""The pipeline's Zarr products (L0, L1): codecs, array layout, atomic publishing.

Both steps write a Zarr v3 group per product (DESIGN.md §4, §5). This module is where
the layout conventions live, so step 1, step 2 and the tests agree on them:

* every array carries zarr v3 ``dimension_names``; ``time`` is int64 nanoseconds with CF
  attributes so xarray decodes ``datetime64[ns]`` (NaT is int64 min, the fill value);
* chunks along time are whole multiples shared by images and per-frame arrays, so a task
  that owns a chunk-aligned frame range owns every chunk it writes;
* a product is written under ``<name>.<uuid>.partial`` next to its final path and renamed
  into place only after it was verified (:func:`publishing`); an existing product under
  the final name is complete by construction.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import shutil
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs

from panoseti_pipeline.errors import InputError, PipelineError, StoreError
from panoseti_pipeline.flags import FLAG_ATTRS
from panoseti_pipeline.pff.timing import NAT
from panoseti_pipeline.store import publish as store_files

LEVEL_L0 = "L0"
LEVEL_L1 = "L1"
TIME_ATTRS = {"units": "nanoseconds since 1970-01-01", "calendar": "proleptic_gregorian",
              "standard_name": "time", "long_name": "frame time (UTC)"}
_SHUFFLES = {"bit": "bitshuffle", "byte": "shuffle", "none": "noshuffle"}


def configure_zarr(max_concurrent_writes: int, compress_threads: int) -> None:
    """Zarr's I/O concurrency and compression threads for this process.

    Must run before the first read or write (zarr reads ``threading.max_workers`` once).
    Detector data never equals the fill value, so the per-chunk "is it empty?" scan of
    ``write_empty_chunks=False`` is pure cost (3-5x measured here): switch it off.
    """
    zarr.config.set({"async.concurrency": max_concurrent_writes,
                     "threading.max_workers": compress_threads,
                     "array.write_empty_chunks": True})


def compressors(codec: str, level: int, shuffle: str, checksum: bool) -> list:
    """Zarr v3 bytes-to-bytes codecs for a ``[pff_to_zarr]``-style codec setting."""
    out: list = []
    if codec in ("blosc-lz4", "zstd"):
        out.append(zarr.codecs.BloscCodec(cname="lz4" if codec == "blosc-lz4" else "zstd",
                                          clevel=level, shuffle=_SHUFFLES[shuffle]))
    elif codec == "gzip":
        out.append(zarr.codecs.GzipCodec(level=level))
    elif codec != "none":
        raise ValueError(f"unknown codec {codec!r}")
    if checksum:
        out.append(zarr.codecs.Crc32cCodec())
    return out


def codec_settings(section: Any) -> dict[str, Any]:
    """The codec keys of a config section, as given to :func:`compressors`."""
    return {"codec": section.codec, "level": section.level, "shuffle": section.shuffle,
            "checksum": section.checksum}


def create_array(group: zarr.Group, name: str, shape: tuple[int, ...], chunks: tuple[int, ...],
                 dtype: Any, dims: tuple[str, ...], codecs: list, attrs: Mapping | None = None,
                 fill_value: Any = 0) -> zarr.Array:
    """One array of a product, with dimension names and the product's codecs."""
    return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype,
                              compressors=codecs or None, fill_value=fill_value,
                              dimension_names=dims, attributes=dict(attrs or {}))


def create_frame_arrays(group: zarr.Group, n_frames: int, time_chunk: int, codecs: list,
                        header_dtypes: Mapping[str, tuple[np.dtype, tuple[int, ...]]]) -> None:
    """``time``, ``timestamps``, ``frame_flags`` and ``headers/*``: the per-frame arrays."""
    chunk = (max(1, min(time_chunk, n_frames)),)
    create_array(group, "time", (n_frames,), chunk, "<i8", ("time",), codecs, TIME_ATTRS,
                 fill_value=NAT)
    create_array(group, "timestamps", (n_frames,), chunk, "<f8", ("time",), codecs,
                 {"units": "s", "long_name": "Unix seconds (float64; derived from time)"},
                 fill_value=float("nan"))
    create_array(group, "frame_flags", (n_frames,), chunk, "u1", ("time",), codecs,
                 FLAG_ATTRS)
    headers = group.create_group("headers")
    for field, (dtype, trailing) in header_dtypes.items():
        dims = ("time", "quabo")[: 1 + len(trailing)]
        create_array(headers, field, (n_frames, *trailing), chunk + trailing, dtype, dims,
                     codecs)


@functools.lru_cache(maxsize=256)
def _open_array(store: str, name: str) -> zarr.Array:
    return zarr.open_array(store=f"{store}/{name}", mode="r+")


def write_frames(store: str, start: int, stop: int, values: Mapping[str, np.ndarray]) -> None:
    """Write frames ``start..stop-1`` of several arrays of one store, concurrently.

    One call gathers every array's chunk writes on zarr's event loop, so the small
    per-frame arrays are written while the images compress: written one after the other
    they cost ~2 ms per array and chunk, 40 % of step 1 here. Every write has finished
    (or failed) when this returns; the first failure is raised.
    """
    from zarr.core.sync import sync

    arrays = [(_open_array(store, name).async_array, value) for name, value in values.items()]

    async def write_all() -> list:
        return await asyncio.gather(
            *(array.setitem(slice(start, stop), value) for array, value in arrays),
            return_exceptions=True)

    for result in sync(write_all()):
        if isinstance(result, BaseException):
            raise result


def open_product(path: str | os.PathLike, level: str) -> zarr.Group:
    """Open a published product read-only; :class:`InputError` if it is not one."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such store")
    try:
        with _quiet_consolidated():
            group = zarr.open_group(store=str(p), mode="r", use_consolidated=True)
    except (FileNotFoundError, ValueError, KeyError, zarr.errors.BaseZarrError) as err:
        if (p / "zarr.json").is_file() and "onsolidated" in str(err):
            raise InputError(f"{p}: incomplete store: no consolidated metadata (its writing "
                             f"never finished; rerun the step that makes it)") from None
        raise InputError(f"{p}: not a Zarr store written by this pipeline ({err})") from None
    got = group.attrs.get("processing_level")
    if got != level:
        raise InputError(f"{p}: not an {level} store (processing_level = {got!r})")
    return group


@contextlib.contextmanager
def _quiet_consolidated() -> Iterator[None]:
    """Zarr warns that v3 consolidated metadata is not in the spec yet; we know."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        yield


def consolidate(path: str | os.PathLike) -> None:
    with _quiet_consolidated():
        zarr.consolidate_metadata(str(path))


@contextlib.contextmanager
def publishing(final: str | os.PathLike, level: str, overwrite: bool = False
               ) -> Iterator[Path]:
    """Yield a temporary store path; on success rename it to ``final``, else remove it.

    The temporary store sits next to ``final`` (same file system, so the rename is
    atomic) as ``<name>.<uuid>.partial``. With ``overwrite`` an existing ``final`` is
    replaced only if it is a published product of ``level``: anything else there (a
    directory of raw data given as the output by mistake) is refused, never removed.
    The old product is moved aside and deleted only once the new one is in place.
    """
    final = Path(final)
    if final.exists() or final.is_symlink():
        if not store_files.is_published(final, level):
            raise StoreError(f"{final}: exists and is not an {level} store written by this "
                             "pipeline; refusing to replace it (choose another output)")
        if not overwrite:
            raise StoreError(f"{final}: exists (use --overwrite to replace it)")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreError(f"{final.parent}: cannot create output directory "
                         f"({err.strerror})") from None
    if not os.access(final.parent, os.W_OK | os.X_OK):
        raise StoreError(f"{final.parent}: output directory is not writable")
    tmp = final.with_name(f"{final.name}.{uuid.uuid4().hex[:12]}{store_files.PARTIAL_SUFFIX}")
    try:
        yield tmp
        _test_hold(final)
        _replace(tmp, final)
    except BaseException as err:
        try:
            wait_for_pending_writes()  # else writes still in flight re-create the partial
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if _is_write_failure(err, tmp):  # e.g. disk full: name the store, not "errno 28"
            raise StoreError(f"{final}: cannot write the store: {err.strerror or err}; "
                             "nothing was published (its partial store was removed)") from err
        raise


def _replace(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an old product there is kept until that succeeded."""
    if not final.exists():
        tmp.rename(final)
        return
    old = final.with_name(f"{final.name}.{uuid.uuid4().hex[:12]}.old")
    final.rename(old)
    try:
        tmp.rename(final)
    except BaseException:
        old.rename(final)  # put the previous product back under its name
        raise
    shutil.rmtree(old)


def wait_for_pending_writes(timeout_s: float = 20.0) -> None:
    """Wait (bounded) for zarr I/O still in flight in this process.

    When one chunk write of an ``array[a:b] = ...`` fails (e.g. disk full), zarr raises at
    once while the other chunk writes of that call go on in its I/O thread; a partial store
    removed before they end is re-created by them (measured: a disk-full step 1 left one).
    Call this before removing a store after an error. Never from zarr's own loop thread.
    """
    try:
        from zarr.core import sync as zarr_sync

        loop = zarr_sync.loop[0]
    except (ImportError, AttributeError, IndexError):
        return
    if loop is None or not loop.is_running() or loop.is_closed():
        return

    async def drain() -> None:
        me = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)

    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(drain(), loop).result(timeout_s + 5)


def _test_hold(final: Path) -> None:
    """Tests only: ``PANOSETI_TEST_SLOW_PUBLISH_S="SECONDS[:NAME_SUFFIX]"`` holds a verified
    store (whose name ends with NAME_SUFFIX) just before it is published, so that kill and
    signal tests can hit that point."""
    spec = os.environ.get("PANOSETI_TEST_SLOW_PUBLISH_S")
    if spec:
        seconds, _, suffix = spec.partition(":")
        if final.name.endswith(suffix):
            time.sleep(float(seconds))


_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def _is_write_failure(err: BaseException, tmp: Path) -> bool:
    """An OSError about the store being written (not about an input file)."""
    if not isinstance(err, OSError) or isinstance(err, PipelineError):
        return False
    if err.filename:
        return str(err.filename).startswith(str(tmp))
    return err.errno in _OUTPUT_ERRNOS


def software_versions() -> dict[str, str]:
    """Versions recorded in every product's attributes (provenance)."""
    import numcodecs

    versions = {"pipeline": _git_revision(), "python": sys.version.split()[0],
                "numpy": np.__version__, "zarr": zarr.__version__,
                "numcodecs": numcodecs.__version__}
    with contextlib.suppress(ImportError):
        import dask

        versions["dask"] = dask.__version__
    return versions


def _git_revision() -> str:
    repo = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"
