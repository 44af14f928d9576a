"""Exact per-pixel statistics of integer frames: moments, histograms, ranks, the median.

L0 pixels are integers of at most 16 bits, so a per-pixel median (or any rank) needs
neither all times of a pixel in one task nor any rechunking. Pass 1 counts each pixel's
values by their high byte (256 bins per pixel), which locates the bin holding each
wanted rank (``_rank_bins``); pass 2 (:func:`rank_task`) counts the low byte of the
values inside that bin, which gives the exact values at those ranks
(:func:`exact_ranks`, :func:`exact_median`). Means and standard deviations come from
exact integer moments (:func:`std`); ``clipped_mean`` adds a third pass of moments of
the values inside per-pixel bounds (:func:`clipped_task`).

Every partial is an integer array, so their sum does not depend on the order tasks
finish in: local threads and a Dask cluster give byte-identical results.

Notes
-----
* Values are offset onto 0..65535 (:attr:`L0Info.offset`) and counted into one
  histogram row per (group, pixel); a value that feeds no baseline goes to a dump bin
  past the real rows, which is dropped (one ``bincount`` per step, no masking copies).
* Memory: a task holds its L0 slice and ~20 MB of temporaries (``SUB_BLOCK`` frames at
  a time).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from panoseti_pipeline import chunking, runners
from panoseti_pipeline.step2.l0_input import QUADRANT, L0Info, Selection, selected

SUB_BLOCK = 512  # frames per vectorised histogram step (bounds temporaries to ~20 MB)


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
    """Exact int64 sums of v**k per (group, pixel) for k in ``orders`` (0 = count), of
    the values where ``valid`` (None: all; ph256 rows are grouped by quabo ``aux``)."""
    out = []
    for k in orders:
        term = np.ones_like(v) if k == 0 else v if k == 1 else v * v
        if info.ph256 and valid is not None:  # ph256: only values chosen by ``valid``
            term = np.where(valid, term, 0)
        if info.ph256:
            out.append(np.stack([term[aux == g].sum(axis=0) for g in range(info.groups)])
                       .ravel())
        else:
            out.append(np.where(valid, term, 0).sum(axis=0))
    return out


def first_pass(info: L0Info, x: np.ndarray, use: np.ndarray, aux: np.ndarray,
               orders: tuple[int, ...], high_bytes: bool) -> dict[str, np.ndarray]:
    """Pass 1 over selected frames: ``moments`` (3, K) of the given ``orders`` (the
    others stay 0) and, if ``high_bytes``, the high-byte histograms ``hist`` (K, 256)."""
    k_total = info.groups * info.pixels
    out = {"moments": np.zeros((3, k_total), np.int64)}
    if high_bytes:
        out["hist"] = np.zeros((k_total, 256), np.int64)
    for a in range(0, len(x), SUB_BLOCK):
        part = slice(a, a + SUB_BLOCK)
        v, rows, valid = _elements(info, x[part], use[part], aux[part])
        for k, m in zip(orders, _moments(info, v, valid, aux[part], orders), strict=True):
            out["moments"][k] += m
        if high_bytes:
            out["hist"] += _histogram(info, (v >> 8) + rows)
    return out


def rank_task(info: L0Info, sel: Selection, start: int, stop: int, targets: np.ndarray,
              process: runners.ProcessSettings) -> dict[str, Any]:
    """Pass 2: low-byte histograms inside the high-byte bin of each wanted rank.

    ``targets`` is (R, K): the high-byte bins of the R ranks wanted of each element.
    """
    runners.prepare_process(process)
    x, use, aux, *_ = selected(info, sel, start, stop)
    lo = np.zeros((*targets.shape, 256), np.int64)
    table = targets.reshape(len(targets), info.groups, info.pixels)
    for a in range(0, len(x), SUB_BLOCK):
        part = slice(a, a + SUB_BLOCK)
        v, rows, _ = _elements(info, x[part], use[part], aux[part])
        for i in range(len(targets)):
            want = table[i][aux[part].astype(np.intp)] if info.ph256 else table[i, 0]
            lo[i] += _histogram(info, np.where((v >> 8) == want, (v & 255) + rows,
                                               _dump(info)))
    return {"start": start, "lo": lo}


def _rank_bins(hist: np.ndarray, ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For the (R, K) ``ranks``: their high-byte bin and their rank inside it."""
    cum = np.cumsum(hist, axis=1)  # (K, 256)
    bins = np.stack([(cum <= r[:, None]).sum(axis=1) for r in ranks]).clip(0, 255)
    k = np.arange(hist.shape[0])
    below = cum[k, bins] - hist[k, bins]
    return bins, ranks - below


def _rank_in(hist: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """(R, K): the bin of hist[i, k] where the cumulative count first exceeds ranks[i, k]."""
    cum = np.cumsum(hist, axis=2)
    return (cum <= ranks[..., None]).sum(axis=2).clip(0, 255)


def exact_ranks(runner: Any, info: L0Info, sel: Selection, chunk: int, hist: np.ndarray,
                ranks: np.ndarray, process: runners.ProcessSettings) -> np.ndarray:
    """Pass 2 over the selected frames (tasks of ``chunk`` frames): the exact value of
    rank ``ranks[i, k]`` (0 = smallest) of every element k, from pass 1's ``hist``; (R, K)
    int64 on the offset scale 0..65535 (add :attr:`L0Info.offset` for pixel values)."""
    bins, inner = _rank_bins(hist, ranks)
    calls = [(info, sel, a, b, bins, process) for a, b in chunking.task_ranges(sel.stop, chunk)]
    lo = np.zeros((len(ranks), *hist.shape), np.int64)

    def fold_rank(_i: int, r: dict[str, Any]) -> None:
        lo[:] += r["lo"]

    runner.map(rank_task, calls, "baseline ranks", fold_rank)
    return bins * 256 + _rank_in(lo, inner)


def middle_ranks(count: np.ndarray) -> np.ndarray:
    """(2, K): the two middle ranks (n-1)//2 and n//2 of elements of ``count`` values."""
    return np.stack([(count - 1) // 2, count // 2])


def median_of(values: np.ndarray, count: np.ndarray, offset: int) -> np.ndarray:
    """The median (float64, NaN where ``count`` is 0) from the values at the two
    :func:`middle_ranks` (offset scale, as :func:`exact_ranks` gives them)."""
    median = (values[0] + values[1]) / 2.0 + offset
    median[count == 0] = np.nan
    return median


def exact_median(runner: Any, info: L0Info, sel: Selection, chunk: int, hist: np.ndarray,
                 count: np.ndarray, process: runners.ProcessSettings) -> np.ndarray:
    """Pass 2 over the selected frames (tasks of ``chunk`` frames) and the exact
    per-element median from pass 1's ``hist`` and ``count`` (float64, NaN where no frame
    was used)."""
    values = exact_ranks(runner, info, sel, chunk, hist, middle_ranks(count), process)
    return median_of(values, count, info.offset)


def clipped_task(info: L0Info, sel: Selection, start: int, stop: int, bounds: np.ndarray,
                 process: runners.ProcessSettings) -> dict[str, Any]:
    """Pass 3 (``clipped_mean``): exact count, sum and sum of squares per element of the
    selected values inside ``bounds`` (2, K) (inclusive, offset scale)."""
    runners.prepare_process(process)
    x, use, aux, *_ = selected(info, sel, start, stop)
    k_total = info.groups * info.pixels
    lo = np.append(bounds[0], 1)  # the dump row: an empty range
    hi = np.append(bounds[1], 0)
    moments = np.zeros((3, k_total), np.int64)
    for a in range(0, len(x), SUB_BLOCK):
        part = slice(a, a + SUB_BLOCK)
        v, rows, _ = _elements(info, x[part], use[part], aux[part])
        key = rows >> 8  # element k, or K for a value that feeds no baseline
        inside = (v >= lo[key]) & (v <= hi[key])
        for k, m in zip((0, 1, 2), _moments(info, v, inside, aux[part], (0, 1, 2)),
                        strict=True):
            moments[k] += m
    return {"start": start, "moments": moments}


def std(count: np.ndarray, total: np.ndarray, squares: np.ndarray) -> np.ndarray:
    """Population standard deviation from exact integer moments (Python ints: no
    cancellation, no overflow), rounded once at the end."""
    n, s, ss = (a.astype(object) for a in (count, total, squares))
    spread = (n * ss - s * s).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sqrt(spread) / count
