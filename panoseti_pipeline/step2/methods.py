"""The baseline methods: which frames feed the baseline, how it is computed, what is subtracted.

Methods (``[baseline_subtract] method``; chosen by the config, never from a path name):

``mean``
    per-pixel mean of the first ``baseline_window`` frames (the original pipeline's).
``median``
    per-pixel median of the same frames (robust to flashes; on integer pixels a
    half-integer, off the pixel's mean by up to 0.5 ADC however long the window).
``clipped_mean`` (the default)
    per-pixel mean of the same frames' values within ``CLIP_K`` robust sigmas of the
    pixel's median (:data:`CLIPPED_SIGMA`: the narrower half of the interquartile range,
    so a flash in up to ~45% of the window does not widen it): a flash of more than ~4
    sigmas in the window is left out, and a clean pixel's baseline is its mean, as
    precise as ``mean``'s (bench/bench_baseline_robustness.py).
``image_median``
    on every ``frame_step``-th frame: 8x8 block medians, median over time, upsampled back
    and subtracted; then the temporal median of every ``frame_step``-th frame of that
    result is subtracted; the residual is divided by ``adc_to_pe``. (The two subtracted
    images add up to the temporal median of the sampled frames; both are kept as the
    published method defines them, and ``baseline`` is their sum, in ADC counts.)
``ph_pedestal``
    per-pixel median over all frames subtracted; values not above ``sigma_threshold`` x
    the per-pixel standard deviation (ddof = 0) become NaN.
``panoseti_analysis``
    the calibrations of PANOSETI's analysis code, on the frames in time order
    (:mod:`panoseti_pipeline.time_order`), of which every ``frame_stride``-th feeds the
    baseline. Pulse heights (ph256, ph1024): ``ph_pedestal`` on those frames with
    ``analysis_sigma_threshold`` (their pedestal is the median plus ``baseline_offset``,
    which cancels), one baseline for all quabos of a ph256 module as their code has;
    ph1024 L1 images have the upper-right and lower-left 16x16 quadrants exchanged as
    their code does (the L0 keeps the DAQ's order, which PFF_FORMAT.md §5 reads as is).
    Images (img8, img16): ``image_median`` on those frames. Their hot and dead pixel
    rules come with it (:func:`analysis_masks`).

Every method also gives ``baseline_std``, the per-pixel standard deviation (ddof = 0) of
the frames that made its baseline: the pedestal noise the pixel masks are judged on
(:mod:`panoseti_pipeline.step2.quality`).

Groups: a module product (img16, img8, ph1024) has one baseline image (y, x); ph256 has
one per quabo (quabo, y, x) because each ph256 frame is one quabo's 16x16 image, and for
the window methods (``WINDOW_METHODS``) the window is the first ``baseline_window``
frames *of that quabo*.

:func:`compute_baseline` runs the reduction passes (the statistics are exact:
:mod:`panoseti_pipeline.step2.histogram`); :func:`subtraction_for` turns the result into
the :class:`Subtraction` every apply task receives. image_median's block medians are the
one partial that is not an integer sum: they are concatenated in chunk order.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np

from panoseti_pipeline import chunking, pff, runners
from panoseti_pipeline.errors import InputError
from panoseti_pipeline.step2 import histogram, quality
from panoseti_pipeline.step2.l0_input import (
    QUADRANT,
    L0Info,
    Selection,
    combine_frames,
    selected,
    window_selection,
)
from panoseti_pipeline.time_order import strided

ANALYSIS = "panoseti_analysis"
#: the methods whose baseline is made of the first ``baseline_window`` frames
WINDOW_METHODS = ("mean", "median", "clipped_mean")
CLIP_K = 3.5  # clipped_mean keeps values within CLIP_K robust sigmas of the median
QUARTILE_Z = 0.6745  # the upper quartile of a standard normal distribution
CLIP_MIN_SIGMA = 1.0  # ADC counts: the robust sigma is at least this (integer pixels)
CLIPPED_SIGMA = (f"max(min(median - Q1, Q3 - median) / {QUARTILE_Z}, {CLIP_MIN_SIGMA:g} ADC); "
                 "Q1, Q3: the values of rank (n-1)//4 and n-1-(n-1)//4 (0 = smallest)")
#: panoseti_analysis: a pixel is hot above this many times the module's mean level
ANALYSIS_HOT_FACTOR = 3.0


@dataclasses.dataclass(frozen=True)
class MethodSettings:
    """What a baseline method is given: the ``[baseline_subtract]`` values it uses for one
    L0 product, taken from the configuration once, at step 2's edge (:meth:`of`)."""

    method: str
    window: int  # WINDOW_METHODS: frames that make the baseline
    frame_step: int  # image_median
    adc_to_pe: float  # image_median, panoseti_analysis (img)
    block_size: int  # image_median, panoseti_analysis (img)
    sigma_threshold: float  # ph_pedestal
    frame_stride: int  # panoseti_analysis
    baseline_offset: int  # panoseti_analysis (ph)
    analysis_sigma: float  # panoseti_analysis (ph)
    quantum: float  # the baseline is rounded to a multiple of it (0: not rounded)
    chunk: int  # frames per statistics task
    kind: str  # the product's: "ph" or "img"
    exchange: bool  # ph1024 quadrants exchanged in the L1 (panoseti_analysis)

    @classmethod
    def of(cls, section: Any, info: L0Info) -> MethodSettings:
        """The settings of a ``[baseline_subtract]`` section for the L0 ``info``."""
        return cls(section.method, section.baseline_window, section.frame_step,
                   section.adc_to_pe, section.block_size, section.sigma_threshold,
                   section.frame_stride, section.baseline_offset,
                   section.analysis_sigma_threshold, section.baseline_quantum,
                   section.compute_chunk_size, info.kind,
                   section.method == ANALYSIS and info.dp == "ph1024")

    @property
    def like(self) -> str:
        """The computation: the method, or the one panoseti_analysis shares for this kind
        (on its own frames and parameters)."""
        if self.method != ANALYSIS:
            return self.method
        return "ph_pedestal" if self.kind == "ph" else "image_median"

    @property
    def cut(self) -> float:
        """Residuals not above ``cut`` x baseline_std become NaN (ph_pedestal-like)."""
        return self.analysis_sigma if self.method == ANALYSIS else self.sigma_threshold

    @property
    def units(self) -> str:
        """The unit of the L1 images (image_median divides by ADC counts per photoelectron)."""
        return "photoelectrons" if self.like == "image_median" else "ADC counts"

    def parameters(self) -> dict[str, Any]:
        """The values the method uses, under their configuration names (for the attributes;
        panoseti_analysis: their parameter names and ``kind``, as their ``calibration``)."""
        if self.method == ANALYSIS and self.kind == "ph":
            return {"kind": "ph", "sigma_threshold": self.analysis_sigma,
                    "baseline_offset": self.baseline_offset, "frame_stride": self.frame_stride}
        if self.method == ANALYSIS:
            return {"kind": "img", "frame_stride": self.frame_stride,
                    "block_size": self.block_size, "adc_to_pe": self.adc_to_pe}
        if self.method == "clipped_mean":
            return {"baseline_window": self.window, "clip_sigmas": CLIP_K,
                    "sigma": CLIPPED_SIGMA}
        if self.method in WINDOW_METHODS:
            return {"baseline_window": self.window}
        if self.method == "image_median":
            return {"frame_step": self.frame_step, "adc_to_pe": self.adc_to_pe,
                    "block_size": self.block_size}
        return {"sigma_threshold": self.sigma_threshold, "std_ddof": 0}


@dataclasses.dataclass
class Baseline:
    """The result of the reduction passes."""

    values: np.ndarray  # (groups, y, x) float64, NaN where no frame was used
    std: np.ndarray  # population std (ddof 0) of the frames that made the baseline
    frames: dict[str, Any]
    extra: dict[str, Any]
    #: the method's own (hot, dead) uint8 masks, (y, x) in the L0's pixel order
    #: (panoseti_analysis: their rules); None: the pipeline's masks only
    own_masks: tuple[np.ndarray, np.ndarray] | None = None

    def quantized(self, quantum: float) -> Baseline:
        """The baseline rounded to the nearest multiple of ``quantum`` (0: unchanged).

        A baseline of a few fractional bits makes ``L0 - baseline`` exact in float32 (L0
        pixels have at most 16 bits, float32 24), so ``L1 + baseline`` gives back the L0
        bit for bit, and the L1's low mantissa bits are zeros that compress; the cost is a
        baseline error of at most ``quantum / 2``.
        """
        if not quantum:
            return self
        return dataclasses.replace(self, values=np.round(self.values / quantum) * quantum)


@dataclasses.dataclass(frozen=True)
class Subtraction:
    """What the apply tasks do: ``(L0 - baseline[g]) / scale``, NaN where not above cut."""

    baseline: np.ndarray  # (groups, y, x) float32
    scale: float = 1.0
    threshold: np.ndarray | None = None  # (groups, y, x) float32, ph_pedestal
    exchange: bool = False  # ph1024 quadrants exchanged in the result (panoseti_analysis)

    def residuals(self, x: np.ndarray, quabo: np.ndarray | None,
                  out: np.ndarray | None = None, missing: np.ndarray | None = None
                  ) -> np.ndarray:
        """float32 residuals of integer frames ``x``; ``quabo``: quabo_num (ph256 only);
        ``missing`` (time, quabo): quadrants of missing quabos become NaN (module products).
        """
        pick = quabo.astype(np.intp) if quabo is not None else None
        base = self.baseline[pick] if pick is not None else self.baseline[0]
        out = np.subtract(x, base, out=out, dtype=np.float32)  # exact: |pixel| < 2**24
        if self.scale != 1.0:
            out /= np.float32(self.scale)
        if self.threshold is not None:
            cut = self.threshold[pick] if pick is not None else self.threshold[0]
            below = np.greater(out, cut)
            np.logical_not(below, out=below)  # NaN compares False: stays NaN
            out[below] = np.nan
        if missing is not None:
            quality.blank_missing_quadrants(out, missing)
        if self.exchange:
            exchange_quadrants(out)
        return out


def exchange_quadrants(a: np.ndarray) -> np.ndarray:
    """Exchange the upper-right and lower-left 16x16 quadrants of the last two axes of
    ``a`` in place (panoseti_analysis' ph1024 quabo order); ``a`` is returned."""
    upper_right = a[..., :16, 16:].copy()
    a[..., :16, 16:] = a[..., 16:, :16]
    a[..., 16:, :16] = upper_right
    return a


def selection_for(l0: Any, info: L0Info, m: MethodSettings, order: np.ndarray
                  ) -> tuple[Selection, dict[str, Any]]:
    """The frame selection of a method, and its description for the attributes;
    ``order``: the L0 positions in time order (:mod:`panoseti_pipeline.time_order`)."""
    n = info.n_frames
    if m.method == ANALYSIS:
        return Selection.positions(strided(order, m.frame_stride), pooled=info.ph256), {
            "selection": f"every {m.frame_stride}th frame in time order (unix_t_ns, "
                         "stable sort, frames without a time last)"
                         + (", all quabos together" if info.ph256 else "")}
    if m.method in WINDOW_METHODS:
        sel, short = window_selection(l0, info, m.window, m.chunk)
        what = f"first {m.window} frames" + (" of each quabo" if info.ph256 else "")
        return sel, {"selection": what, "window_requested": m.window,
                     "window_truncated": short}
    if m.method == "image_median":
        return Selection((n,) * pff.N_QUABOS, m.frame_step), {
            "selection": f"every {m.frame_step}th frame (index % {m.frame_step} == 0)"}
    return Selection((n,) * pff.N_QUABOS, 1), {"selection": "all frames"}


def _block_medians(info: L0Info, x: np.ndarray, use: np.ndarray, aux: np.ndarray,
                   block: int) -> tuple[np.ndarray, np.ndarray]:
    """Per selected frame, the median of every block x block block and its group
    (-1 = none; a module block is in one quadrant when block <= 16)."""
    rows = np.flatnonzero(use.any(axis=1))
    h, w = info.shape
    bh, bw = h // block, w // block
    blocks = x[rows].reshape(rows.size, bh, block, bw, block).swapaxes(2, 3)
    med = np.median(blocks.reshape(rows.size, bh, bw, block * block), axis=-1)
    if info.ph256:
        gid = np.broadcast_to(aux[rows].astype(np.int8)[:, None, None], med.shape)
    elif block > 16:  # the whole image: every quadrant there
        gid = np.where(use[rows].all(axis=1), 0, -1).astype(np.int8)[:, None, None]
        gid = np.broadcast_to(gid, med.shape)
    else:
        quadrant = QUADRANT[: h: block, : w: block]
        gid = np.where(use[rows][:, quadrant], 0, -1).astype(np.int8)
    return med, np.ascontiguousarray(gid)


def _window_frames(info: L0Info, x: np.ndarray, use: np.ndarray, aux: np.ndarray,
                   positions: np.ndarray) -> dict[str, np.ndarray]:
    """Per window frame: its L0 position, mean level, group and flags (for
    :func:`quality.window_check`; 17 bytes a frame)."""
    level, group = quality.frame_levels(x, use, aux, info.ph256)
    if "frame_flags" not in info.derived:
        flags = info.array("frame_flags")[positions[0]: positions[-1] + 1][
            positions - positions[0]] if positions.size else np.zeros(0, np.uint8)
    else:  # derived as step 2 derives it: missing_quabo only
        missing = np.zeros(len(x), bool) if info.ph256 else (aux == 0).any(axis=1)
        flags = np.where(missing, pff.FLAG_MISSING_QUABO, 0).astype(np.uint8)
    return {"positions": positions, "levels": level, "groups": group, "flags": flags}


def stats_task(info: L0Info, sel: Selection, start: int, stop: int, method: str,
               block: int, process: runners.ProcessSettings) -> dict[str, Any]:
    """Pass 1 over frames start..stop-1: exact counts and moments, high-byte histograms
    (median-based methods), block medians (image_median), the window's frame levels and
    flags (WINDOW_METHODS)."""
    runners.prepare_process(process)
    x, use, aux, record, positions = selected(info, sel, start, stop)
    orders = (0, 1, 2)  # count, sum, squares: every method stores baseline_std
    out: dict[str, Any] = {"start": start, "frames": record, "frames_any": len(x),
                           **histogram.first_pass(info, x, use, aux, orders,
                                                  high_bytes=method != "mean")}
    if method == "image_median":
        out["block_median"], out["block_group"] = _block_medians(info, x, use, aux, block)
    if method in WINDOW_METHODS:
        out["window"] = _window_frames(info, x, use, aux, positions)
    return out


def compute_baseline(runner: Any, l0: Any, info: L0Info, m: MethodSettings,
                     order: np.ndarray, process: runners.ProcessSettings) -> Baseline:
    """Run the reduction passes of ``m.method`` and finish the baseline (rounded to
    ``m.quantum``); ``order``: the L0 positions in time order."""
    method = m.like
    if method == "image_median" and info.shape[0] % m.block_size:
        raise InputError(f"{info.path}: block_size = {m.block_size} does not divide the "
                         f"{info.shape[0]}-pixel side of {info.dp} images")
    sel, frames = selection_for(l0, info, m, order)
    calls = [(info, sel, a, b, method, m.block_size, process)
             for a, b in chunking.task_ranges(sel.stop, m.chunk)]
    k_total = info.groups * info.pixels
    acc: dict[str, Any] = {"moments": np.zeros((3, k_total), np.int64),
                           "hist": np.zeros((k_total, 256), np.int64)}
    records: list[Any] = [None] * len(calls)
    blocks: list[Any] = [None] * len(calls)
    window: list[Any] = [None] * len(calls)

    def fold_stats(i: int, r: dict[str, Any]) -> None:
        acc["moments"] += r["moments"]
        acc["frames_any"] = acc.get("frames_any", 0) + r["frames_any"]
        if "hist" in r:
            acc["hist"] += r["hist"]
        records[i] = r["frames"]
        if "block_median" in r:
            blocks[i] = (r["block_median"], r["block_group"])
        window[i] = r.get("window")

    runner.map(stats_task, calls, "baseline statistics", fold_stats)
    frames["per_quabo"] = combine_frames(records)
    frames["frames_used"] = int(acc.get("frames_any", 0))  # frames in any quadrant's baseline
    if method in WINDOW_METHODS:
        frames["window_check"] = quality.window_check(
            *(np.concatenate([w[k] for w in window if w is not None])
              for k in ("positions", "levels", "groups", "flags")))
    shape = (info.groups, *info.shape)
    count, total, squares = acc["moments"]
    std = _pooled(sel, histogram.std(count, total, squares).reshape(shape))  # pedestal noise
    if method == "mean":
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = total / count + info.offset
        return Baseline(mean.reshape(shape), std, frames, {}).quantized(m.quantum)
    if method == "clipped_mean":
        mean, std = _clipped_mean(runner, info, sel, m, acc["hist"], count, process)
        return Baseline(mean.reshape(shape), std.reshape(shape), frames,
                        {}).quantized(m.quantum)
    values = _pooled(sel, histogram.exact_median(runner, info, sel, m.chunk, acc["hist"],
                                                 count, process).reshape(shape))
    if method == "image_median":
        b = m.block_size
        block_map = _block_map(info, blocks)  # (groups, y/b, x/b)
        upsampled = block_map.repeat(b, axis=1).repeat(b, axis=2)
        supermedian = values - upsampled  # median over time of (sampled frame - upsampled)
        extra = {"block_size": b,
                 "block_median_map": _json_floats(block_map if info.ph256 else block_map[0])}
        own = analysis_masks(upsampled[0]) if m.method == ANALYSIS else None
        return Baseline(upsampled + supermedian, std, frames, extra,
                        own).quantized(m.quantum)
    own = analysis_masks(values[0] + m.baseline_offset) if m.method == ANALYSIS else None
    return Baseline(values, std, frames, {}, own).quantized(m.quantum)


def _clipped_mean(runner: Any, info: L0Info, sel: Selection, m: MethodSettings,
                  hist: np.ndarray, count: np.ndarray, process: runners.ProcessSettings
                  ) -> tuple[np.ndarray, np.ndarray]:
    """clipped_mean's (mean, std) per element: pass 2 finds the median and quartiles
    (exact ranks), pass 3 sums the values within ``CLIP_K`` x :data:`CLIPPED_SIGMA` of
    the median (NaN where no frame was used)."""
    quarter = (count - 1) // 4
    ranks = np.concatenate([histogram.middle_ranks(count),
                            np.stack([quarter, count - 1 - quarter])])
    values = histogram.exact_ranks(runner, info, sel, m.chunk, hist, ranks, process)
    centre = (values[0] + values[1]) / 2.0  # on the offset scale, as the values
    half = np.minimum(centre - values[2], values[3] - centre)  # the side a flash is not on
    sigma = np.maximum(half / QUARTILE_Z, CLIP_MIN_SIGMA)
    bounds = np.stack([np.ceil(centre - CLIP_K * sigma),
                       np.floor(centre + CLIP_K * sigma)]).astype(np.int64)
    calls = [(info, sel, a, b, bounds, process)
             for a, b in chunking.task_ranges(sel.stop, m.chunk)]
    moments = np.zeros((3, count.size), np.int64)

    def fold(_i: int, r: dict[str, Any]) -> None:
        moments[:] += r["moments"]

    runner.map(histogram.clipped_task, calls, "clipped baseline", fold)
    kept, total, squares = moments
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / kept + info.offset
    return mean, histogram.std(kept, total, squares)


def _pooled(sel: Selection, a: np.ndarray) -> np.ndarray:
    """A pooled selection's statistic (group 0) for every group: one baseline for all."""
    return np.broadcast_to(a[:1], a.shape).copy() if sel.pooled else a


def analysis_masks(level: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """panoseti_analysis' (hot, dead) uint8 masks of a per-pixel ``level`` (their ph
    pedestal with its offset, or their img block-median map): hot above
    ANALYSIS_HOT_FACTOR x the mean level over the pixels, dead at 0."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no level at all: nothing hot
        mean = float(np.nanmean(level))
    return ((level > ANALYSIS_HOT_FACTOR * mean).astype(np.uint8),
            (level == 0).astype(np.uint8))


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


def subtraction_for(m: MethodSettings, baseline: Baseline) -> Subtraction:
    """The per-frame operation of a method, with the baseline broadcast to every task."""
    values = baseline.values.astype(np.float32)
    if m.like == "image_median":
        return Subtraction(values, scale=m.adc_to_pe)
    if m.like == "ph_pedestal":
        return Subtraction(values, threshold=(m.cut * baseline.std).astype(np.float32),
                           exchange=m.exchange)
    return Subtraction(values)


def formula(info: L0Info, m: MethodSettings) -> str:
    """What the L1 images are, in words (an attribute of the store and of ``images``)."""
    base = "baseline[quabo_num]" if info.ph256 else "baseline"
    exchanged = ("; then the upper-right and lower-left 16x16 quadrants exchanged"
                 if m.exchange else "")
    if m.like == "image_median":
        return f"images = (L0 images - {base}) / adc_to_pe"
    if m.like == "ph_pedestal":
        cut = "analysis_sigma_threshold" if m.method == ANALYSIS else "sigma_threshold"
        return (f"d = L0 images - {base}; images = d where d > {cut} * "
                f"{base.replace('baseline', 'baseline_std')}, else NaN{exchanged}")
    return f"images = L0 images - {base}"
