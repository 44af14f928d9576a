"""The L1's time order: frames stably sorted by ``unix_t_ns``, frames without a time last.

The DAQ writes frames in acquisition order, which is not always time order (the pulse
heights of a module's four quabos interleave). The L1 is sorted so that a time join
between modules can binary-search ``unix_t_ns``; ``l0_frame`` (each L1 frame's position
in the L0) gives the acquisition order back exactly.

:func:`time_order` is the permutation (``l1[i] = l0[order[i]]``): T int64 values, small
beside the frames, computed once in the driver from ``unix_t_ns`` read chunk by chunk.
:func:`timestamp_qc` is PANOSETI's record of a store's time axis (their storage spec §4:
status, counts, the gap threshold of each product family, ``suspect``).
The sort is stable: equal times keep their L0 order, and frames without a time (NaT)
follow every timed frame, in their L0 order.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from panoseti_pipeline.pff.timing import NAT


def read_times(unix_t_ns: Any, chunk: int) -> np.ndarray:
    """All of a (zarr) ``unix_t_ns`` array, read ``chunk`` frames at a time."""
    n = unix_t_ns.shape[0]
    out = np.empty(n, np.int64)
    for a in range(0, n, chunk):
        out[a: a + chunk] = unix_t_ns[a: a + chunk]
    return out


def time_order(t: np.ndarray) -> np.ndarray:
    """The stable permutation (int64) that sorts the times ``t``, NaT last."""
    key = np.where(t == NAT, np.iinfo(np.int64).max, t)  # after every real time, in order
    if (key[1:] >= key[:-1]).all():  # already in order: nothing to sort
        return np.arange(t.size, dtype=np.int64)
    return np.argsort(key, kind="stable").astype(np.int64)


def strided(order: np.ndarray, stride: int) -> np.ndarray:
    """The L0 positions (ascending) of every ``stride``-th frame in time order."""
    return np.sort(order[::stride])


# --------------------------------------------------------------------------- timestamp_qc

GAP_CADENCES = 4  # images: a gap is an interval longer than this many cadences
GAP_MADS = 10  # pulse heights: ... longer than the median interval + this many MADs
SUSPECT_CADENCES = 1000  # images: a backward jump longer than this many cadences is suspect
SUSPECT_PH_NS = 1_000_000_000  # pulse heights: ... longer than 1 s
QC_RULES = {"gap_threshold": f"images: {GAP_CADENCES} x cadence; pulse heights: median + "
                             f"{GAP_MADS} x MAD of the positive intervals in time order",
            "suspect": f"a backward jump longer than {SUSPECT_CADENCES} x cadence (images) "
                       f"or {SUSPECT_PH_NS // 10**9} s (pulse heights)",
            "frames_without_time": "left out of the intervals, counted in n_frames"}


def cadence_ns(kind: str, run_configs: Any) -> int | None:
    """An image product's frame interval: ``data_config``'s ``image.integration_time_usec``
    (None for pulse heights, which are events, or when the run has no such config)."""
    if kind != "img" or not isinstance(run_configs, dict):
        return None
    usec = ((run_configs.get("data_config") or {}).get("image") or {}).get(
        "integration_time_usec")
    return int(usec) * 1000 if isinstance(usec, (int, float)) and usec > 0 else None


def _gap_rule(intervals: np.ndarray, kind: str, cadence: int | None) -> tuple[int, int]:
    """(gap threshold, suspect backward jump), ns, from a run's sorted intervals: images,
    GAP_CADENCES cadences (the median interval without a known cadence); pulse heights,
    the median positive interval + GAP_MADS MADs."""
    positive = intervals[intervals > 0]
    if kind == "img":
        base = cadence or (int(np.median(positive)) if positive.size else 0)
        return GAP_CADENCES * base, SUSPECT_CADENCES * base
    median = float(np.median(positive)) if positive.size else 0.0
    mad = float(np.median(np.abs(positive - median))) if positive.size else 0.0
    return int(median + GAP_MADS * mad), SUSPECT_PH_NS


def timestamp_qc(unix_t_ns: np.ndarray, kind: str, cadence: int | None, *,
                 sorted_copy: bool) -> dict[str, Any]:
    """PANOSETI's ``timestamp_qc`` record of ``unix_t_ns`` in acquisition (L0) order.

    ``sorted_copy``: the record of a store written in time order (L1): ``repaired`` when
    the order changed, and ``monotonic``; else (L0) ``clean``, ``flagged`` or ``suspect``.
    Images without a known ``cadence`` use their median interval.
    """
    # A run's times are whole-file arrays (8 bytes a frame): each temporary is freed as
    # soon as it has served, and an already ordered run is not sorted again.
    t = unix_t_ns[unix_t_ns != NAT]
    n = int(unix_t_ns.size)
    steps = np.diff(t)
    backward = steps[steps < 0]
    del steps
    ordered = np.sort(t) if backward.size else t
    del t
    intervals = np.diff(ordered)
    threshold, suspect_ns = _gap_rule(intervals, kind, cadence)
    gaps = int(np.count_nonzero(intervals > threshold)) if threshold > 0 else 0
    duplicates = int(np.count_nonzero(intervals == 0))
    suspect = backward.size > 0 and -int(backward.min()) > suspect_ns
    untimed_before_timed = (unix_t_ns[:-1] == NAT) & (unix_t_ns[1:] != NAT)
    reordered = backward.size > 0 or bool(untimed_before_timed.any())
    if suspect:
        status = "suspect"
    elif sorted_copy and reordered:
        status = "repaired"
    elif backward.size or duplicates or gaps:
        status = "flagged"
    else:
        status = "clean"
    return {"status": status, "monotonic": sorted_copy or not backward.size,
            "n_frames": n, "n_nonmonotonic": int(backward.size), "n_duplicates": duplicates,
            "max_gap_ns": int(intervals.max()) if intervals.size else 0,
            "n_gaps_over_threshold": gaps, "gap_threshold_ns": int(threshold),
            "t_start_ns": int(ordered[0]) if ordered.size else 0,
            "t_end_ns": int(ordered[-1]) if ordered.size else 0}
