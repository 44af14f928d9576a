"""What makes an L1 store honest: NaN where nothing was measured, pixel masks, a summary.

* :func:`blank_missing_quadrants`: a module frame whose quabo ``q`` is missing
  (``quabo_<q>_tv_sec == 0``, the frame carries ``frame_flags`` bit 1) holds zeros in
  quadrant ``q``; its L1 pixels become NaN instead of ``-baseline`` (which would show as
  a dip in every light curve).
* :func:`pixel_masks`: hot and dead pixels from the per-pixel ``baseline`` and
  ``baseline_std`` (the pedestal and its noise over the frames that made the baseline),
  with robust module-wide rules (:data:`HOT_RULE`, :data:`DEAD_RULE`; a steady star is a
  light source, not hot), written as the uint8 arrays ``hot_pixel_mask`` and
  ``dead_pixel_mask``. The masks only describe: images are not changed there.
* :func:`window_check`: flagged and outlying frames in a baseline window (the
  ``summary``'s ``warnings``).
* :func:`chunk_summary` / :func:`combine_summaries`: the ``summary`` attribute, from one
  small partial per chunk, combined in frame order (so threads and a Dask cluster give
  the same bytes). Frame and flag counts and the time span are exact; the residual
  statistics come from every :data:`SAMPLE_STEP`-th frame (a histogram of the whole
  residual cube would cost as much as the subtraction itself), mean and std from
  values rounded to 1/:data:`FIXED_POINT` unit, percentiles from unit-wide bins.

Notes
-----
The quicklooks (:mod:`panoseti_pipeline.quicklook`) apply :func:`pixel_masks` to an L0
store's own mean and noise, so L0 and L1 quicklooks mark pixels by the same rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from panoseti_pipeline import pff
from panoseti_pipeline.flags import FLAG_NAMES
from panoseti_pipeline.pff.timing import NAT
from panoseti_pipeline.step2.l0_input import QUADRANT

HOT_K = 10.0  # hot: baseline above the module median + HOT_K robust sigmas, or ...
NOISE_RATIO = 3.0  # ... noise above NOISE_RATIO x the module's median noise
MAD_SIGMA = 1.4826  # MAD -> standard deviation of a normal distribution
MIN_SIGMA = 1.0  # ADC counts: the robust sigma is at least this (a flat module has MAD 0)
SAMPLE_STEP = 16  # residual statistics from frames whose index % SAMPLE_STEP == 0
#: residuals are summed as integers of 1/FIXED_POINT units: float sums depend on the
#: order and the memory alignment, and the summary must not differ between runs
FIXED_POINT = 16
#: a light source's excess variance is at least SHOT_FACTOR x its shot noise at the gain:
#: light counted by a SiPM has more than shot noise (optical crosstalk, scintillation),
#: and a hot pixel whose window holds a few outlying values (which a plain mean's
#: baseline_std takes in) must not pass for one
SHOT_FACTOR = 2.0
HOT_RULE = (f"hot: (baseline > median + {HOT_K:g} * max({MAD_SIGMA} * MAD, {MIN_SIGMA:g} ADC) "
            f"or baseline_std > {NOISE_RATIO:g} * median(baseline_std)) and not a light "
            "source; medians and MAD over the module's pixels with a baseline and nonzero "
            "baseline_std (all quabos). Light source (a star): the baseline stands out as "
            "above and the excess variance baseline_std**2 - median(baseline_std)**2 is at "
            f"least {SHOT_FACTOR:g} * adc_per_pe * (baseline - median), {SHOT_FACTOR:g} x the "
            "shot noise of light at that gain (light's variance grows with its level; a hot "
            "pixel's level is an offset of less noise). Cannot tell: a hot pixel whose "
            "noise is that large (e.g. a high dark-count rate with crosstalk) from a star of "
            "the same level (both a source); a star of less variance (faint and steady: "
            "plain shot noise) is marked hot")
DEAD_RULE = ("dead: baseline_std == 0 (no variance in the frames that made the baseline: "
             "always zero, or stuck) and not hot (a pixel stuck at saturation is hot)")


def missing_quabos(frames: Mapping[str, np.ndarray]) -> np.ndarray:
    """(time, quabo) bool: quabo q is missing in that frame (its tv_sec is 0)."""
    return np.stack([frames[f"quabo_{q}_tv_sec"] == 0 for q in range(pff.N_QUABOS)], axis=1)


def blank_missing_quadrants(images: np.ndarray, missing: np.ndarray) -> int:
    """Set the quadrants of missing quabos to NaN in place; how many values that was."""
    rows = np.flatnonzero(missing.any(axis=1))
    if rows.size:
        quadrant = QUADRANT[: images.shape[1], : images.shape[2]]
        gone = missing[rows][:, quadrant]  # (rows, y, x)
        images[rows] = np.where(gone, np.float32(np.nan), images[rows])
        return int(gone.sum())
    return 0


def pixel_masks(baseline: np.ndarray, std: np.ndarray, adc_per_pe: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """(hot, dead) uint8 masks of the shape of ``baseline`` (any shape; NaN: no data);
    ``adc_per_pe``: ADC counts per photoelectron, the gain a light source's shot noise
    follows (:data:`HOT_RULE`, :data:`SHOT_FACTOR`).

    One module's pixels are judged together (all quabos of a ph256 module too). Noise is
    judged by ratio, not by MAD: the spread of per-pixel noise estimates is narrow, and
    one outlying frame in the baseline window must not make a pixel hot. A steady star
    raises both the level and the noise of its pixel, as a hot pixel does; what tells it
    apart is that its variance grows with its level as shot noise does, where a hot
    pixel's level is an offset of little noise.
    """
    finite = np.isfinite(baseline) & np.isfinite(std)
    live = finite & (std > 0)
    hot = np.zeros(baseline.shape, bool)
    if live.any():
        level = float(np.median(baseline[live]))
        sigma = max(MAD_SIGMA * float(np.median(np.abs(baseline[live] - level))), MIN_SIGMA)
        noise = float(np.median(std[live]))
        high = baseline > level + HOT_K * sigma
        with np.errstate(invalid="ignore"):
            source = high & (std * std - noise * noise
                             >= SHOT_FACTOR * adc_per_pe * (baseline - level))
        hot = finite & (high | (std > NOISE_RATIO * noise)) & ~source
    dead = finite & (std == 0) & ~hot
    return hot.astype(np.uint8), dead.astype(np.uint8)


MASK_ATTRS = {
    "hot_pixel_mask": {"long_name": "hot pixels (1 = hot)", "rule": HOT_RULE,
                       "hot_k": HOT_K, "noise_ratio": NOISE_RATIO, "mad_sigma": MAD_SIGMA,
                       "min_sigma_adc": MIN_SIGMA, "shot_factor": SHOT_FACTOR},
    "dead_pixel_mask": {"long_name": "dead pixels (1 = dead)", "rule": DEAD_RULE},
}


# --------------------------------------------------------------------------- window check

OUTLIER_K = 10.0  # a window frame is outlying beyond this many robust sigmas of frame means
OUTLIER_MIN_SIGMA = 0.1  # ADC counts: the robust sigma of frame means is at least this
#: flags of frames that cannot bias a baseline: a missing quabo's quadrant is left out of
#: it, and every frame of a GNSS-timed board has its time from the host clock
UNBIASED_FLAGS = ("missing_quabo", "host_clock_time")
MAX_LISTED_OUTLIERS = 20
WINDOW_RULE = (f"outlying: frame mean (over the pixels it gives the baseline) departs from "
               f"the median of the window's frame means (per quabo for ph256) by more than "
               f"{OUTLIER_K:g} * max({MAD_SIGMA} * MAD, {OUTLIER_MIN_SIGMA:g} ADC); warned "
               "of: outlying frames, and flagged frames but for " + ", ".join(UNBIASED_FLAGS))


def frame_levels(x: np.ndarray, use: np.ndarray, aux: np.ndarray, ph256: bool
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(mean level, group) of every frame of ``x``: the mean of the pixels it gives a
    baseline (a missing quabo's quadrant left out), and its quabo (ph256) or 0."""
    if ph256:
        return x.mean(axis=(1, 2)), aux.astype(np.int8)
    quadrant = QUADRANT[: x.shape[1], : x.shape[2]]
    sums = np.stack([x[:, quadrant == q].sum(axis=1, dtype=np.float64)
                     for q in range(pff.N_QUABOS)], axis=1)
    pixels = np.stack([(quadrant == q).sum() for q in range(pff.N_QUABOS)])
    with np.errstate(invalid="ignore", divide="ignore"):  # no quabo at all: NaN
        level = (sums * use).sum(axis=1) / (use * pixels).sum(axis=1)
    return level, np.zeros(len(x), np.int8)


def window_check(positions: np.ndarray, levels: np.ndarray, groups: np.ndarray,
                 flags: np.ndarray) -> dict[str, Any]:
    """What the baseline window holds that could bias it: flagged frames (by flag) and
    outlying frames (:data:`WINDOW_RULE`), with ``warning``: one line, or None."""
    outlying = np.zeros(len(levels), bool)
    for g in np.unique(groups):
        mine = (groups == g) & np.isfinite(levels)
        if mine.any():
            centre = float(np.median(levels[mine]))
            sigma = max(MAD_SIGMA * float(np.median(np.abs(levels[mine] - centre))),
                        OUTLIER_MIN_SIGMA)
            outlying[mine] = np.abs(levels[mine] - centre) > OUTLIER_K * sigma
    per_flag = {name: int(np.count_nonzero(flags & bit)) for bit, name in FLAG_NAMES.items()}
    biasing = sum(bit for bit, name in FLAG_NAMES.items() if name not in UNBIASED_FLAGS)
    n_flagged = int(np.count_nonzero(flags & biasing))
    where = np.sort(positions[outlying])
    problems = [f"{n_flagged} flagged frame(s) (" + ", ".join(
        f"{k} {v}" for k, v in per_flag.items() if v and k not in UNBIASED_FLAGS) + ")"
                ] if n_flagged else []
    if where.size:
        problems.append(f"{where.size} outlying frame(s) (L0 frames "
                        + ", ".join(map(str, where[:5].tolist()))
                        + (", ..." if where.size > 5 else "") + ")")
    return {"frames": len(levels), "frames_per_flag": per_flag, "warned_flagged": n_flagged,
            "outlying_frames": int(where.size),
            "outlying_l0_frames": where[:MAX_LISTED_OUTLIERS].tolist(), "rule": WINDOW_RULE,
            "warning": ("the baseline window holds " + " and ".join(problems)
                        + ": a transient there may bias the baseline") if problems else None}


# --------------------------------------------------------------------------- summary


def chunk_summary(start: int, images: np.ndarray, flags: np.ndarray, time_ns: np.ndarray,
                  nan_counts: Mapping[str, int]) -> dict[str, Any]:
    """The partial summary of frames start..start+len(images)-1 (small, exact integers
    where possible; float sums of the sampled residuals, deterministic per chunk)."""
    first = -start % SAMPLE_STEP
    sample = images[first::SAMPLE_STEP].ravel()
    sample = sample[np.isfinite(sample)]
    bins = np.floor(sample).astype(np.int64)
    fixed = np.rint(sample * FIXED_POINT).astype(np.int64)  # integer sums: any order
    low = int(bins.min()) if bins.size else 0
    timed = time_ns[time_ns != NAT]
    return {
        "start": start, "frames": len(images),
        "flags": [int(np.count_nonzero(flags & bit)) for bit in FLAG_NAMES],
        "flagged": int(np.count_nonzero(flags)),
        "t_min": int(timed.min()) if timed.size else None,
        "t_max": int(timed.max()) if timed.size else None,
        "n": int(sample.size), "sum": int(fixed.sum()), "sumsq": int((fixed * fixed).sum()),
        "hist_low": low, "hist": np.bincount(bins - low).astype(np.int32)
        if bins.size else np.zeros(0, np.int32),
        "nan": dict(nan_counts),
    }


def _iso(ns: int | None) -> str | None:
    return None if ns is None else f"{np.datetime64(ns, 'ns')}Z"


def _percentile(low: int, hist: np.ndarray, q: float) -> float | None:
    """The centre of the unit-wide bin holding rank q * (n - 1)."""
    n = int(hist.sum())
    if n == 0:
        return None
    rank = q * (n - 1)
    k = int(np.searchsorted(np.cumsum(hist), rank, side="right"))
    return float(low + k + 0.5)


def combine_summaries(parts: Sequence[dict[str, Any]], *, units: str, hot: int, dead: int,
                      uncalibrated_pixels: int, warnings: Sequence[str] = ()
                      ) -> dict[str, Any]:
    """The ``summary`` attribute of an L1 store from its chunks' partials (any order);
    ``warnings``: one line each, about what may have biased the L1 (run.sh shows them)."""
    parts = sorted(parts, key=lambda p: p["start"])
    n = sum(p["n"] for p in parts)
    total = sum(p["sum"] for p in parts)
    squares = sum(p["sumsq"] for p in parts)
    lows = [p["hist_low"] for p in parts if p["hist"].size]
    low = min(lows) if lows else 0
    size = max((p["hist_low"] - low + p["hist"].size for p in parts if p["hist"].size),
               default=0)
    hist = np.zeros(size, np.int64)
    for p in parts:
        offset = p["hist_low"] - low
        hist[offset: offset + p["hist"].size] += p["hist"]
    t_min = [p["t_min"] for p in parts if p["t_min"] is not None]
    t_max = [p["t_max"] for p in parts if p["t_max"] is not None]
    first, last = (min(t_min), max(t_max)) if t_min else (None, None)
    mean = total / n / FIXED_POINT if n else None
    nan = {k: sum(p["nan"].get(k, 0) for p in parts) for k in parts[0]["nan"]} if parts else {}
    return {
        "frames": sum(p["frames"] for p in parts),
        "time_first": _iso(first), "time_last": _iso(last),
        "span_s": (last - first) / 1e9 if first is not None else None,
        "frames_per_flag": {name: sum(p["flags"][i] for p in parts)
                            for i, name in enumerate(FLAG_NAMES.values())},
        "flagged_frames": sum(p["flagged"] for p in parts),
        "residuals": {
            "units": units, "sample": f"every {SAMPLE_STEP}th frame (index % {SAMPLE_STEP}"
                                      " == 0), finite values", "values": n,
            "mean": mean,
            "std": (n * squares - total * total) ** 0.5 / n / FIXED_POINT if n else None,
            "p01": _percentile(low, hist, 0.01), "p99": _percentile(low, hist, 0.99),
            "percentile_resolution": "bins 1 unit wide, value = bin centre"},
        "hot_pixels": hot, "dead_pixels": dead, "uncalibrated_pixels": uncalibrated_pixels,
        "nan_values": {**nan, "total": sum(nan.values())},
        "warnings": list(warnings),
    }
