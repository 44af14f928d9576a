"""Step 2 (L0 -> L1): baseline methods and the L1 writer.

The L1 store holds ``images`` as float32 ``L0 - baseline`` (never cast back to the L0
integer type: the original pipeline did, and every negative residual wrapped to ~65535),
the ``baseline`` that was subtracted, and every per-frame array of the L0 store (``time``,
``timestamps``, ``frame_flags``, ``headers/*``) value-identical (DESIGN.md §5).

Methods (``[baseline_subtract] method``; chosen by the config, never from a path name):

``mean``
    per-pixel mean of the first ``baseline_window`` frames (the original pipeline's).
``median``
    per-pixel median of the same frames (robust to flashes).
``image_median``
    on every ``frame_step``-th frame: 8x8 block medians, median over time, upsampled back
    and subtracted; then the temporal median of every ``frame_step``-th frame of that
    result is subtracted; the residual is divided by ``adc_to_pe``. (The two subtracted
    images add up to the temporal median of the sampled frames; both are kept as the
    published method defines them, and ``baseline`` is their sum, in ADC counts.)
``ph_pedestal``
    per-pixel median over all frames subtracted; values not above ``sigma_threshold`` x
    the per-pixel standard deviation (ddof = 0) become NaN. ``baseline_std`` is stored.

Groups: a module product (img16, img8, ph1024) has one baseline image (y, x); ph256 has
one per quabo (quabo, y, x) because each ph256 frame is one quabo's 16x16 image
(``headers/quabo_num``), and for ``mean``/``median`` the window is the first
``baseline_window`` frames *of that quabo*. A module frame flagged ``missing_quabo``
whose quabo ``q`` has ``headers/tv_sec[:, q] == 0`` does not enter quadrant ``q``'s
baseline (PFF_FORMAT.md §5): its zeros are not a measurement.

How it runs (DESIGN.md §7): every task owns one chunk-aligned frame range of
``compute_chunk_size`` frames, reads its L0 slice, and either returns small partial
statistics or writes its own L1 chunks. Medians are exact and need no rechunking: L0
pixels are integers of at most 16 bits, so a per-pixel median is found from two passes
of per-pixel histograms (high byte, then the low byte inside the bin holding the middle
rank); means and standard deviations come from exact integer moments. Each task holds
about one chunk (``ph_pedestal`` included: no task ever holds all times of a pixel);
partials are integers, whose sums do not depend on the order tasks finish in, or
image_median's block medians, concatenated in chunk order. The baseline is computed once
and broadcast to the tasks that write, so local threads and a Dask cluster give
byte-identical stores.

Notes
-----
* Memory: a task holds its L0 slice, one reused float32 output buffer per thread and
  ~20 MB of histogram temporaries (SUB_BLOCK frames at a time).
* Fresh 32 MB arrays per chunk cost page faults that serialise a process's threads on
  these machines; hence the reused output buffer.

Examples
--------
>>> from pipeline_config import load_config
>>> result = subtract_baseline("run_L0.zarr", "run_L1.zarr", load_config(None))  # doctest: +SKIP
>>> print(result.line())                                                         # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from panoseti_pipeline import pff
from panoseti_pipeline import runners as task_runners
from panoseti_pipeline.errors import InputError, StoreError
from panoseti_pipeline.store import layout as zp
from panoseti_pipeline.store import publish as store_files

BLOCK = 8  # image_median: side of the spatial median blocks (pixels)
QUADRANT = np.zeros((32, 32), np.int8)  # module image pixel -> quabo (PFF_FORMAT.md §5)
QUADRANT[:16, 16:], QUADRANT[16:, 16:], QUADRANT[16:, :16] = 1, 2, 3
SUB_BLOCK = 512  # frames per vectorised histogram step (bounds temporaries to ~20 MB)
MAX_LISTED_FRAMES = 1000  # excluded frame indices listed in the attributes
ZARR_CONCURRENCY = 4  # zarr async I/O concurrency per process
REQUIRED = ("images", "time", "timestamps", "frame_flags", "headers/tv_sec")


# --------------------------------------------------------------------------- input


@dataclasses.dataclass(frozen=True)
class L0Info:
    """What every task needs to know about the L0 input (small, pickled to workers)."""

    path: str
    dp: str
    n_frames: int
    shape: tuple[int, int]
    dtype: str
    per_frame: tuple[str, ...]  # arrays with a leading time axis, carried into L1
    token: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)  # this run

    @property
    def ph256(self) -> bool:
        return pff.PRODUCTS[self.dp].header_kind == "ph256"

    @property
    def groups(self) -> int:
        """Number of baseline images: one per quabo for ph256, else one."""
        return pff.N_QUABOS if self.ph256 else 1

    @property
    def pixels(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def offset(self) -> int:
        """Added to a pixel to map it onto 0..65535 (the histogram range)."""
        return int(np.iinfo(np.dtype(self.dtype)).min)


def inspect_l0(path: str | os.PathLike) -> L0Info:
    """Open and check an L0 store; :class:`InputError` naming what is wrong."""
    group = zp.open_product(path, zp.LEVEL_L0)
    where = Path(path)
    dp = group.attrs.get("data_product")
    if dp not in pff.PRODUCTS:
        raise InputError(f"{where}: unknown data_product {dp!r} in the L0 attributes")
    product = pff.PRODUCTS[dp]
    names = _arrays(group)
    needed = (*REQUIRED, "headers/quabo_num") if product.header_kind == "ph256" else REQUIRED
    missing = [n for n in needed if n not in names]
    if missing:
        raise InputError(f"{where}: L0 incomplete: no array {', '.join(missing)}")
    images = names["images"]
    n = images.shape[0]
    if images.shape[1:] != product.shape or images.dtype != product.dtype:
        raise InputError(f"{where}: images are {images.dtype}{list(images.shape)}, a {dp} "
                         f"L0 store has {product.dtype}[n, {product.shape[0]}, "
                         f"{product.shape[1]}]")
    if n == 0:
        raise InputError(f"{where}: the L0 store has no frames")
    if group.attrs.get("n_frames", n) != n:
        raise InputError(f"{where}: L0 incomplete: attributes say {group.attrs['n_frames']} "
                         f"frames, images hold {n}")
    per_frame = tuple(k for k, a in names.items() if k != "images" and _time_dim(a))
    for name in ("images", *per_frame):
        a = names[name]
        if a.shape[0] != n:
            raise InputError(f"{where}: L0 incomplete: {name} has {a.shape[0]} frames, "
                             f"images {n}")
        if a.nchunks_initialized != a.nchunks:
            raise InputError(f"{where}: L0 incomplete: {name} has "
                             f"{a.nchunks - a.nchunks_initialized} of {a.nchunks} chunks "
                             "missing")
    return L0Info(str(where), dp, n, product.shape, product.dtype.str, per_frame)


def _arrays(group: Any) -> dict[str, Any]:
    import zarr

    return {k: v for k, v in group.members(max_depth=None) if isinstance(v, zarr.Array)}


def _time_dim(array: Any) -> bool:
    dims = array.metadata.dimension_names or ()
    return bool(dims) and dims[0] == "time"


# --------------------------------------------------------------------------- selection


@dataclasses.dataclass(frozen=True)
class Selection:
    """Frames that feed the baseline: index < cutoff[q] and index % step == 0."""

    cutoff: tuple[int, ...]  # per quabo
    step: int

    @property
    def stop(self) -> int:
        return max(self.cutoff)


def _chunk_use(info: L0Info, sel: Selection, start: int, flags: np.ndarray,
               aux: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``use[t, q]`` (frame start+t feeds quabo q) and ``excluded[t, q]`` (missing quabo).

    ``aux`` is ``headers/quabo_num`` for ph256, ``headers/tv_sec`` (time, quabo) otherwise.
    """
    t = start + np.arange(len(flags))
    chosen = (t[:, None] < np.asarray(sel.cutoff)) & (t % sel.step == 0)[:, None]
    if info.ph256:
        return chosen & (aux[:, None] == np.arange(pff.N_QUABOS)), np.zeros_like(chosen)
    missing = ((flags & pff.FLAG_MISSING_QUABO) != 0)[:, None] & (aux == 0)
    return chosen & ~missing, chosen & missing


def window_selection(l0: Any, info: L0Info, window: int, chunk: int) -> tuple[Selection, bool]:
    """The first ``window`` frames (of each quabo for ph256); and whether data ran short.

    For ph256 ``headers/quabo_num`` is read chunk by chunk only until every quabo has
    its ``window`` frames (usually the first chunk).
    """
    if not info.ph256:
        return Selection((min(window, info.n_frames),) * pff.N_QUABOS, 1), window > info.n_frames
    cutoff = [info.n_frames] * pff.N_QUABOS
    seen = np.zeros(pff.N_QUABOS, np.int64)
    quabo_num = l0["headers/quabo_num"]
    for a in range(0, info.n_frames, chunk):
        q = quabo_num[a: a + chunk]
        for k in np.flatnonzero(seen < window):
            hits = np.flatnonzero(q == k)
            if seen[k] + hits.size >= window:
                cutoff[k] = a + int(hits[window - seen[k] - 1]) + 1
            seen[k] += hits.size
        if (seen >= window).all():
            break
    return Selection(tuple(cutoff), 1), bool((seen < window).any())


def selection_for(l0: Any, info: L0Info, section: Any) -> tuple[Selection, dict[str, Any]]:
    """The frame selection of a method, and its description for the attributes."""
    n = info.n_frames
    if section.method in ("mean", "median"):
        sel, short = window_selection(l0, info, section.baseline_window,
                                      section.compute_chunk_size)
        what = (f"first {section.baseline_window} frames"
                + (" of each quabo" if info.ph256 else ""))
        return sel, {"selection": what, "window_requested": section.baseline_window,
                     "window_truncated": short}
    if section.method == "image_median":
        return Selection((n,) * pff.N_QUABOS, section.frame_step), {
            "selection": f"every {section.frame_step}th frame (index % {section.frame_step}"
                         " == 0)"}
    return Selection((n,) * pff.N_QUABOS, 1), {"selection": "all frames"}


# --------------------------------------------------------------------------- tasks

_process_lock = threading.Lock()
_process_ready: dict[str, bool] = {}
_open_arrays: dict[tuple[str, str, str], Any] = {}
_buffers = threading.local()


def _prepare_process(group_writable: bool) -> None:
    """Zarr settings and the umask of this process (Dask workers included), per run."""
    with _process_lock:
        if _process_ready.get("group_writable") != group_writable:
            zp.configure_zarr(ZARR_CONCURRENCY, task_runners.cpus())
            store_files.apply_permission_policy(group_writable)
            _process_ready["group_writable"] = group_writable


def _array(token: str, path: str, name: str, writable: bool = False) -> Any:
    """An array of the L0 store (or, ``writable``, of the L1 store being written), opened
    once per run and process: metadata reads cost milliseconds each.

    ``token`` is unique per run, so a store rewritten between runs is opened afresh.
    """
    import zarr

    key = (token, path, name)
    with _process_lock:
        array = _open_arrays.get(key)
    if array is None:
        if writable:  # not consolidated yet
            group = zarr.open_group(store=path, mode="r+", use_consolidated=False)
        else:
            group = zp.open_product(path, zp.LEVEL_L0)
        array = group[name]
        with _process_lock:
            if len(_open_arrays) > 256:
                _open_arrays.clear()
            _open_arrays[key] = array
    return array


def _read(info: L0Info, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images, frame flags and the quabo array (quabo_num or tv_sec) of frames start..stop-1."""
    aux = "headers/quabo_num" if info.ph256 else "headers/tv_sec"
    return tuple(_array(info.token, info.path, k)[start:stop]  # type: ignore[return-value]
                 for k in ("images", "frame_flags", aux))


def _out_buffer(shape: tuple[int, ...]) -> np.ndarray:
    """This thread's reused float32 output buffer: fresh 32 MB arrays cost page faults
    that serialise the threads of a process (measured: 2 threads no faster than 1)."""
    size = int(np.prod(shape))
    buf = getattr(_buffers, "f32", None)
    if buf is None or buf.size < size:
        buf = _buffers.f32 = np.empty(size, np.float32)
    return buf[:size].reshape(shape)


def _frame_record(use: np.ndarray, excluded: np.ndarray, start: int) -> list[dict[str, Any]]:
    """Per quabo: frames used (count, first, last) and excluded missing-quabo frames."""
    out = []
    for q in range(use.shape[1]):
        idx = np.flatnonzero(use[:, q])
        gone = np.flatnonzero(excluded[:, q])
        out.append({"count": int(idx.size),
                    "first": int(start + idx[0]) if idx.size else None,
                    "last": int(start + idx[-1]) if idx.size else None,
                    "excluded_count": int(gone.size),  # a dead quabo: counted, listed short
                    "excluded": (start + gone[:MAX_LISTED_FRAMES]).tolist()})
    return out


def _block_medians(info: L0Info, x: np.ndarray, use: np.ndarray, aux: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per selected frame, the median of every BLOCK x BLOCK block and its group (-1 = none)."""
    rows = np.flatnonzero(use.any(axis=1))
    h, w = info.shape
    bh, bw = h // BLOCK, w // BLOCK
    blocks = x[rows].reshape(rows.size, bh, BLOCK, bw, BLOCK).swapaxes(2, 3)
    med = np.median(blocks.reshape(rows.size, bh, bw, BLOCK * BLOCK), axis=-1)
    if info.ph256:
        gid = np.broadcast_to(aux[rows].astype(np.int8)[:, None, None], med.shape)
    else:
        quadrant = QUADRANT[: h: BLOCK, : w: BLOCK]
        gid = np.where(use[rows][:, quadrant], 0, -1).astype(np.int8)
    return med, np.ascontiguousarray(gid)


def _selected(info: L0Info, sel: Selection, start: int, stop: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Frames start..stop-1 that feed some baseline: images, use[t, q], aux; the record."""
    x, flags, aux = _read(info, start, min(stop, sel.stop))
    use, excluded = _chunk_use(info, sel, start, flags, aux)
    record = _frame_record(use, excluded, start)
    feeds = use.any(axis=1)
    if feeds.all():  # the usual case: no copy
        return x, use, aux, record
    return x[feeds], use[feeds], aux[feeds], record


def _elements(info: L0Info, x: np.ndarray, use: np.ndarray, aux: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Offset values v (frames, pixels) int64 in 0..65535; each value's histogram row
    start ``key * 256`` (key = group * pixels + pixel), or :func:`_dump` where the value
    feeds no baseline; and the validity mask of module products (None: all valid)."""
    v = x.reshape(len(x), -1).astype(np.int64)
    v -= info.offset
    p256 = np.arange(info.pixels, dtype=np.int64) * 256
    if info.ph256:  # the rows kept are exactly the frames of their quabo
        return v, aux.astype(np.int64)[:, None] * (info.pixels * 256) + p256, None
    valid = use[:, QUADRANT[: info.shape[0], : info.shape[1]].ravel()]
    return v, np.where(valid, p256, _dump(info)), valid


def _dump(info: L0Info) -> int:
    """First histogram bin past the real ones: values that feed no baseline go there."""
    return info.groups * info.pixels * 256


def _histogram(info: L0Info, index: np.ndarray) -> np.ndarray:
    """(K, 256) counts of histogram row+bin ``index``; the dump bins are dropped."""
    k256 = _dump(info)
    return np.bincount(index.ravel(), minlength=k256 + 256)[:k256].reshape(-1, 256)


def _moments(info: L0Info, v: np.ndarray, valid: np.ndarray | None, aux: np.ndarray,
             orders: tuple[int, ...]) -> list[np.ndarray]:
    """Exact int64 sums of v**k per (group, pixel) for k in ``orders`` (0 = count)."""
    out = []
    for k in orders:
        term = np.ones_like(v) if k == 0 else v if k == 1 else v * v
        if info.ph256:
            out.append(np.stack([term[aux == g].sum(axis=0) for g in range(info.groups)])
                       .ravel())
        else:
            out.append(np.where(valid, term, 0).sum(axis=0))
    return out


def stats_task(info: L0Info, sel: Selection, start: int, stop: int, method: str,
               group_writable: bool = False) -> dict[str, Any]:
    """Pass 1 over frames start..stop-1: exact counts and moments, high-byte histograms,
    block medians (image_median). Integer partials: their sum is order-free."""
    _prepare_process(group_writable)
    x, use, aux, record = _selected(info, sel, start, stop)
    k_total = info.groups * info.pixels
    orders = {"mean": (0, 1), "ph_pedestal": (0, 1, 2)}.get(method, (0,))
    out: dict[str, Any] = {"start": start, "frames": record, "frames_any": len(x),
                           "moments": np.zeros((3, k_total), np.int64)}
    if method != "mean":
        out["hist"] = np.zeros((k_total, 256), np.int64)
    for a in range(0, len(x), SUB_BLOCK):
        part = slice(a, a + SUB_BLOCK)
        v, rows, valid = _elements(info, x[part], use[part], aux[part])
        for k, m in zip(orders, _moments(info, v, valid, aux[part], orders), strict=True):
            out["moments"][k] += m
        if method != "mean":
            out["hist"] += _histogram(info, (v >> 8) + rows)
    if method == "image_median":
        out["block_median"], out["block_group"] = _block_medians(info, x, use, aux)
    return out


def rank_task(info: L0Info, sel: Selection, start: int, stop: int, targets: np.ndarray,
              group_writable: bool = False) -> dict[str, Any]:
    """Pass 2: low-byte histograms inside the high-byte bin of each middle rank.

    ``targets`` is (2, K): the high-byte bins of the lower and upper middle ranks.
    """
    _prepare_process(group_writable)
    x, use, aux, _ = _selected(info, sel, start, stop)
    lo = np.zeros((2, *targets.shape[1:], 256), np.int64)
    table = targets.reshape(2, info.groups, info.pixels)
    for a in range(0, len(x), SUB_BLOCK):
        part = slice(a, a + SUB_BLOCK)
        v, rows, _ = _elements(info, x[part], use[part], aux[part])
        for i in range(2):
            want = table[i][aux[part].astype(np.intp)] if info.ph256 else table[i, 0]
            lo[i] += _histogram(info, np.where((v >> 8) == want, (v & 255) + rows,
                                               _dump(info)))
    return {"start": start, "lo": lo}


@dataclasses.dataclass(frozen=True)
class Subtraction:
    """What the apply tasks do: ``(L0 - baseline[g]) / scale``, NaN where not above cut."""

    baseline: np.ndarray  # (groups, y, x) float32
    scale: float = 1.0
    threshold: np.ndarray | None = None  # (groups, y, x) float32, ph_pedestal


def subtract(info: L0Info, spec: Subtraction, x: np.ndarray, aux: np.ndarray | None,
             out: np.ndarray | None = None) -> np.ndarray:
    """float32 residuals of integer frames ``x``; ``aux`` = quabo_num for ph256."""
    pick = aux.astype(np.intp) if info.ph256 else None
    base = spec.baseline[pick] if pick is not None else spec.baseline[0]
    out = np.subtract(x, base, out=out, dtype=np.float32)  # exact: |pixel| < 2**24
    if spec.scale != 1.0:
        out /= np.float32(spec.scale)
    if spec.threshold is not None:
        cut = spec.threshold[pick] if pick is not None else spec.threshold[0]
        below = np.greater(out, cut)
        np.logical_not(below, out=below)  # NaN compares False: stays NaN
        out[below] = np.nan
    return out


def apply_task(info: L0Info, spec: Subtraction, l1_path: str, start: int, stop: int,
               copy_files: bool, group_writable: bool = False) -> dict[str, Any]:
    """Write L1 frames start..stop-1 (images and every per-frame array); chunk-aligned.

    ``copy_files``: the per-frame arrays have the same chunks in L0 and L1, so their
    chunk files are copied byte for byte (no decode/encode).
    """
    _prepare_process(group_writable)
    time.sleep(float(os.environ.get("PANOSETI_TEST_SLOW_TASK_S") or 0))  # tests: hold step 2
    aux = (_array(info.token, info.path, "headers/quabo_num")[start:stop] if info.ph256
           else None)
    x = _array(info.token, info.path, "images")[start:stop]
    out = subtract(info, spec, x, aux, _out_buffer(x.shape))
    try:
        _array(info.token, l1_path, "images", writable=True)[start:stop] = out
        for name in info.per_frame:
            src = _array(info.token, info.path, name)
            if copy_files:
                index = (start // src.chunks[0],) + (0,) * (src.ndim - 1)
                key = src.metadata.encode_chunk_key(index)
                target = Path(l1_path, name, key)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(info.path, name, key), target)
            else:
                _array(info.token, l1_path, name, writable=True)[start:stop] = src[start:stop]
    except BaseException:
        zp.wait_for_pending_writes()  # no write may land after the driver's cleanup
        raise
    nan = int(np.isnan(out).sum()) if spec.threshold is not None else 0
    return {"start": start, "frames": stop - start, "nan": nan}


# --------------------------------------------------------------------------- baseline


@dataclasses.dataclass
class Baseline:
    """The result of the reduction passes."""

    values: np.ndarray  # (groups, y, x) float64, NaN where no frame was used
    std: np.ndarray | None
    frames: dict[str, Any]
    extra: dict[str, Any]


def _ranges(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk, n)) for a in range(0, n, chunk)]


def _combine_frames(records: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per-quabo frame records of all chunks (in chunk order) into one."""
    out = []
    for q in range(pff.N_QUABOS):
        rows = [r[q] for r in records]
        firsts = [r["first"] for r in rows if r["first"] is not None]
        excluded = [i for r in rows for i in r["excluded"]][:MAX_LISTED_FRAMES]
        out.append({"quabo": q, "count": sum(r["count"] for r in rows),
                    "first": min(firsts) if firsts else None,
                    "last": max(r["last"] for r in rows if r["last"] is not None)
                    if firsts else None,
                    "excluded_missing_quabo": sum(r["excluded_count"] for r in rows),
                    "excluded_frames": excluded})
    return out


def _middle_bins(hist: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For the two middle ranks (n-1)//2 and n//2: their bin and their rank inside it."""
    ranks = np.stack([(count - 1) // 2, count // 2])  # (2, K)
    cum = np.cumsum(hist, axis=1)  # (K, 256)
    bins = np.stack([(cum <= r[:, None]).sum(axis=1) for r in ranks]).clip(0, 255)
    k = np.arange(hist.shape[0])
    below = cum[k, bins] - hist[k, bins]
    return bins, ranks - below


def compute_baseline(runner: Any, l0: Any, info: L0Info, section: Any,
                     group_writable: bool = False) -> Baseline:
    """Run the reduction passes of ``section.method`` and finish the baseline."""
    method = section.method
    sel, frames = selection_for(l0, info, section)
    calls = [(info, sel, a, b, method, group_writable)
             for a, b in _ranges(sel.stop, section.compute_chunk_size)]
    k_total = info.groups * info.pixels
    acc: dict[str, Any] = {"moments": np.zeros((3, k_total), np.int64),
                           "hist": np.zeros((k_total, 256), np.int64)}
    records: list[Any] = [None] * len(calls)
    blocks: list[Any] = [None] * len(calls)

    def fold_stats(i: int, r: dict[str, Any]) -> None:
        acc["moments"] += r["moments"]
        acc["frames_any"] = acc.get("frames_any", 0) + r["frames_any"]
        if "hist" in r:
            acc["hist"] += r["hist"]
        records[i] = r["frames"]
        if "block_median" in r:
            blocks[i] = (r["block_median"], r["block_group"])

    runner.map(stats_task, calls, "baseline statistics", fold_stats)
    frames["per_quabo"] = _combine_frames(records)
    frames["frames_used"] = int(acc.get("frames_any", 0))  # frames in any quadrant's baseline
    shape = (info.groups, *info.shape)
    count, total, squares = acc["moments"]
    if method == "mean":
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = total / count + info.offset
        return Baseline(mean.reshape(shape), None, frames, {})
    values = _finish_median(runner, info, sel, section, acc, group_writable).reshape(shape)
    if method == "ph_pedestal":
        return Baseline(values, _std(count, total, squares).reshape(shape), frames, {})
    if method == "image_median":
        block_map = _block_map(info, blocks)  # (groups, y/B, x/B)
        upsampled = block_map.repeat(BLOCK, axis=1).repeat(BLOCK, axis=2)
        supermedian = values - upsampled  # median over time of (sampled frame - upsampled)
        extra = {"block_size": BLOCK,
                 "block_median_map": _json_floats(block_map if info.ph256 else block_map[0])}
        return Baseline(upsampled + supermedian, None, frames, extra)
    return Baseline(values, None, frames, {})


def _std(count: np.ndarray, total: np.ndarray, squares: np.ndarray) -> np.ndarray:
    """Population standard deviation from exact integer moments (Python ints: no
    cancellation, no overflow), rounded once at the end."""
    n, s, ss = (a.astype(object) for a in (count, total, squares))
    spread = (n * ss - s * s).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sqrt(spread) / count


def _finish_median(runner: Any, info: L0Info, sel: Selection, section: Any,
                   acc: dict[str, Any], group_writable: bool) -> np.ndarray:
    """Pass 2 and the exact per-element median (float64, NaN where no frame was used)."""
    count = acc["moments"][0]
    bins, inner = _middle_bins(acc["hist"], count)
    calls = [(info, sel, a, b, bins, group_writable)
             for a, b in _ranges(sel.stop, section.compute_chunk_size)]
    lo = np.zeros((2, *acc["hist"].shape), np.int64)

    def fold_rank(_i: int, r: dict[str, Any]) -> None:
        lo[:] += r["lo"]

    runner.map(rank_task, calls, "baseline medians", fold_rank)
    values = bins * 256 + _rank_in(lo, inner)  # (2, K)
    median = (values[0] + values[1]) / 2.0 + info.offset
    median[count == 0] = np.nan
    return median


def _rank_in(hist: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """(2, K): the bin of hist[i, k] where the cumulative count first exceeds ranks[i, k]."""
    cum = np.cumsum(hist, axis=2)
    return (cum <= ranks[..., None]).sum(axis=2).clip(0, 255)


def _block_map(info: L0Info, blocks: list[Any]) -> np.ndarray:
    """Median over the sampled frames of each block median, per group (NaN: none)."""
    med = np.concatenate([b[0] for b in blocks if b is not None])
    gid = np.concatenate([b[1] for b in blocks if b is not None])
    out = []
    for g in range(info.groups):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN: no frame for a block
            out.append(np.nanmedian(np.where(gid == g, med, np.nan), axis=0))
    return np.stack(out)


def _json_floats(a: np.ndarray) -> Any:
    """Nested lists with NaN as None (JSON has no NaN)."""
    return np.where(np.isnan(a), None, a).tolist()


# --------------------------------------------------------------------------- L1 writer


def method_parameters(section: Any) -> dict[str, Any]:
    """The configuration values the chosen method uses (recorded in the attributes)."""
    if section.method in ("mean", "median"):
        return {"baseline_window": section.baseline_window}
    if section.method == "image_median":
        return {"frame_step": section.frame_step, "adc_to_pe": section.adc_to_pe,
                "block_size": BLOCK}
    return {"sigma_threshold": section.sigma_threshold, "std_ddof": 0}


def subtraction_for(section: Any, baseline: Baseline) -> Subtraction:
    """The per-frame operation of a method, with the baseline broadcast to every task."""
    values = baseline.values.astype(np.float32)
    if section.method == "image_median":
        return Subtraction(values, scale=section.adc_to_pe)
    if section.method == "ph_pedestal":
        return Subtraction(values, threshold=(section.sigma_threshold
                                              * baseline.std).astype(np.float32))
    return Subtraction(values)


def _formula(info: L0Info, section: Any) -> str:
    base = "baseline[headers/quabo_num]" if info.ph256 else "baseline"
    if section.method == "image_median":
        return f"images = (L0 images - {base}) / adc_to_pe"
    if section.method == "ph_pedestal":
        return (f"d = L0 images - {base}; images = d where d > sigma_threshold * "
                f"{base.replace('baseline', 'baseline_std')}, else NaN")
    return f"images = L0 images - {base}"


def image_filters(section: Any) -> list:
    """BitRound on the float32 images when fewer than 23 mantissa bits are kept (lossy)."""
    if section.keep_mantissa_bits >= 23:
        return []
    from zarr.codecs.numcodecs import BitRound

    return [BitRound(keepbits=section.keep_mantissa_bits)]


def create_l1(path: Path, l0: Any, info: L0Info, section: Any, baseline: Baseline
              ) -> tuple[int, bool]:
    """The L1 group with every array defined and the baseline written.

    Per-frame arrays keep their L0 dtype, codecs, fill value, chunk key encoding,
    attributes and dimension names; only their time chunk becomes ``compute_chunk_size``,
    shared with ``images``, so one task owns every chunk of its frame range. Returns that
    chunk and whether the per-frame chunks are unchanged (then their files are copied).
    """
    import zarr

    n = info.n_frames
    chunk = max(1, min(section.compute_chunk_size, n))
    codecs = zp.compressors(**zp.codec_settings(section))
    group = zarr.open_group(store=str(path), mode="w-")
    units = "photoelectrons" if section.method == "image_median" else "ADC counts"
    group.create_array("images", shape=(n, *info.shape), chunks=(chunk, *info.shape),
                       dtype="<f4", filters=image_filters(section) or None,
                       compressors=codecs or None, fill_value=float("nan"),
                       dimension_names=("time", "y", "x"),
                       attributes={"long_name": f"baseline-subtracted {info.dp} pixels",
                                   "units": units, "formula": _formula(info, section)})
    dims = ("quabo", "y", "x") if info.ph256 else ("y", "x")
    planes = {"baseline": baseline.values, "baseline_std": baseline.std}
    for name, values in planes.items():
        if values is None:
            continue
        data = (values if info.ph256 else values[0]).astype(np.float32)
        array = zp.create_array(group, name, data.shape, data.shape, "<f4", dims, codecs,
                                {"long_name": f"{name.replace('_', ' ')} "
                                              f"({section.method})", "units": "ADC counts"},
                                fill_value=float("nan"))
        array[...] = data
    same_chunks = True
    for name in info.per_frame:
        src = l0[name]
        same_chunks &= src.chunks == (chunk, *src.shape[1:])
        parent, _, leaf = name.rpartition("/")
        where = group
        if parent:
            where = group.require_group(parent)
            where.attrs.update(l0[parent].attrs.asdict())
        where.create_array(leaf, shape=src.shape, chunks=(chunk, *src.shape[1:]),
                           dtype=src.dtype, filters=src.filters or None,
                           compressors=src.compressors or None, serializer=src.serializer,
                           fill_value=src.fill_value,
                           chunk_key_encoding=src.metadata.chunk_key_encoding,
                           dimension_names=src.metadata.dimension_names,
                           attributes=src.attrs.asdict())
    return chunk, same_chunks


def verify_l1(path: Path, info: L0Info, spec: Subtraction, summaries: list[dict],
              keep_bits: int) -> None:
    """Every frame written, every chunk present, first and last chunk read back right."""
    import zarr

    got = sum(s["frames"] for s in summaries)
    if got != info.n_frames:
        raise StoreError(f"{path}: wrote {got} frames, the L0 store has {info.n_frames}")
    l1 = zarr.open_group(store=str(path), mode="r", use_consolidated=False)
    for name, array in _arrays(l1).items():
        if array.nchunks_initialized != array.nchunks:
            raise StoreError(f"{path}: {name} has {array.nchunks - array.nchunks_initialized}"
                             f" of {array.nchunks} chunks missing after writing")
    l0 = zp.open_product(info.path, zp.LEVEL_L0)
    n = info.n_frames
    for a, b in {(0, min(n, 64)), (max(0, n - 64), n)}:
        aux = l0["headers/quabo_num"][a:b] if info.ph256 else None
        expect = subtract(info, spec, l0["images"][a:b], aux)
        same_images = np.allclose(l1["images"][a:b], expect, rtol=2.0 ** -keep_bits, atol=0,
                                  equal_nan=True)
        same_frames = all(np.array_equal(l1[k][a:b], l0[k][a:b], equal_nan=k == "timestamps")
                          for k in info.per_frame)
        if not (same_images and same_frames):
            raise StoreError(f"{path}: frames {a}..{b - 1} read back differ from the "
                             "L0 input and the baseline")


def _check_paths(l0_path: Path, l1_path: Path) -> None:
    a, b = l0_path.resolve(), l1_path.resolve()
    if a == b or a.is_relative_to(b) or b.is_relative_to(a):
        raise InputError(f"{l1_path}: the L1 output must not be, contain or sit inside "
                         f"the L0 input {l0_path}")


@dataclasses.dataclass(frozen=True)
class Result:
    """What one run did, for the summary line and the driver's table."""

    output: str
    status: str  # "ok" or "exists"
    method: str = ""
    frames: int = 0
    seconds: float = 0.0
    l0_bytes: int = 0
    l1_bytes: int = 0
    mode: str = ""

    def line(self) -> str:
        if self.status == "exists":
            return f"{self.output}: complete L1 store exists, left alone (--overwrite replaces it)"
        ratio = self.l1_bytes / max(self.l0_bytes, 1)
        return (f"{self.output}: L1 written ({self.method} baseline, {self.frames} frames, "
                f"{self.seconds:.1f} s, {self.mode}; {self.l1_bytes / 1e6:.1f} MB = "
                f"{ratio:.2f}x the L0 size)")


def subtract_baseline(l0_path: str | os.PathLike, l1_path: str | os.PathLike, cfg: Any, *,
                      client: Any = None, overwrite: bool = False, quiet: bool = False,
                      notice: Callable[[str], None] | None = None,
                      threads: int | None = None) -> Result:
    """L0 store -> L1 store with the configured baseline method; published atomically.

    ``client``: a Dask client whose workers run the tasks (None: threads of this process).
    An existing complete L1 store is left alone unless ``overwrite``.
    """
    import zarr

    notice = notice or (lambda msg: print(msg, file=sys.stderr))
    section = cfg.baseline_subtract
    l0_path, output = Path(l0_path), Path(l1_path)
    _check_paths(l0_path, output)
    gw = cfg.run.group_writable
    _prepare_process(gw)
    if not overwrite and store_files.is_published(output, zp.LEVEL_L1):
        return Result(str(output), "exists")
    t0 = time.perf_counter()
    info = inspect_l0(l0_path)
    l0 = zp.open_product(l0_path, zp.LEVEL_L0)
    for stale in store_files.remove_stale_partials(output):
        notice(f"{stale}: removed the partial store of an interrupted run")
    store_files.apply_permission_policy(gw)
    runner = task_runners.runner_for(client, threads, not quiet)
    baseline = compute_baseline(runner, l0, info, section, gw)
    if baseline.frames.get("window_truncated"):
        notice(f"{l0_path}: baseline_window = {section.baseline_window} is more than the "
               "frames there are; the baseline uses all of them")
    for q in baseline.frames["per_quabo"]:
        if q["count"] == 0 and not info.ph256:  # a ph256 quabo with no frame has no pixels
            notice(f"{l0_path}: no frame of quabo {q['quabo']} feeds its baseline; its "
                   "L1 pixels are NaN")
    spec = subtraction_for(section, baseline)
    with zp.publishing(output, zp.LEVEL_L1, overwrite) as tmp:
        chunk, copy_files = create_l1(tmp, l0, info, section, baseline)
        calls = [(info, spec, str(tmp), a, b, copy_files, gw)
                 for a, b in _ranges(info.n_frames, chunk)]
        summaries: list[dict] = []
        runner.map(apply_task, calls, f"{output.name}", lambda _i, r: summaries.append(r))
        verify_l1(tmp, info, spec, summaries, section.keep_mantissa_bits)
        l0_bytes, l1_bytes = store_files.store_bytes(l0_path), store_files.store_bytes(tmp)
        seconds = time.perf_counter() - t0
        group = zarr.open_group(store=str(tmp), mode="r+", use_consolidated=False)
        group.attrs.update({
            "processing_level": zp.LEVEL_L1,
            "data_product": info.dp,
            "module": l0.attrs.get("module"),
            "n_frames": info.n_frames,
            "time_source": l0.attrs.get("time_source"),
            "flag_counts": l0.attrs.get("flag_counts"),
            "baseline_method": section.method,
            "baseline_window": section.baseline_window,
            "parameters": method_parameters(section) | baseline.extra,
            "baseline_frames": baseline.frames,
            "formula": _formula(info, section),
            "precision": {"keep_mantissa_bits": section.keep_mantissa_bits,
                          "lossy": section.keep_mantissa_bits < 23},
            "config": cfg.as_dict(),
            "l0_path": str(l0_path.resolve()),
            "l0": l0.attrs.asdict(),
            "software": zp.software_versions(),
            "created": store_files.utc_now(),
            "size": {"l0_bytes": l0_bytes, "l1_bytes": l1_bytes,
                     "l1_to_l0_ratio": round(l1_bytes / max(l0_bytes, 1), 4)},
            "report": {"seconds": round(seconds, 3), "mode": runner.mode,
                       "tasks": len(calls), "time_chunk": chunk,
                       "per_frame_arrays": "chunk files copied" if copy_files
                       else "values copied",
                       "nan_values": sum(s["nan"] for s in summaries)},
        })
        zp.consolidate(tmp)
    return Result(str(output), "ok", section.method, info.n_frames, seconds, l0_bytes,
                  l1_bytes, runner.mode)
