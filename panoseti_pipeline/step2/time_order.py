"""The L1's time order: frames stably sorted by ``unix_t_ns``, frames without a time last.

The DAQ writes frames in acquisition order, which is not always time order (the pulse
heights of a module's four quabos interleave). The L1 is sorted so that a time join
between modules can binary-search ``unix_t_ns``; ``l0_frame`` (each L1 frame's position
in the L0) gives the acquisition order back exactly.

:func:`time_order` is the permutation (``l1[i] = l0[order[i]]``): T int64 values, small
beside the frames, computed once in the driver from ``unix_t_ns`` read chunk by chunk.
The sort is stable: equal times keep their L0 order, and frames without a time (NaT)
follow every timed frame, in their L0 order.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from panoseti_pipeline.pff.timing import NAT


def time_order(unix_t_ns: Any, chunk: int) -> np.ndarray:
    """The stable permutation (int64) that sorts ``unix_t_ns`` (a zarr array), NaT last."""
    n = unix_t_ns.shape[0]
    key = np.empty(n, np.int64)
    for a in range(0, n, chunk):
        key[a: a + chunk] = unix_t_ns[a: a + chunk]
    key[key == NAT] = np.iinfo(np.int64).max  # after every real time, order kept
    if (key[1:] >= key[:-1]).all():  # already in order: nothing to sort
        return np.arange(n, dtype=np.int64)
    return np.argsort(key, kind="stable").astype(np.int64)


def strided(order: np.ndarray, stride: int) -> np.ndarray:
    """The L0 positions (ascending) of every ``stride``-th frame in time order."""
    return np.sort(order[::stride])
