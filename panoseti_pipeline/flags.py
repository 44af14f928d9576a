"""Per-frame quality flags: one bit each, set while reading and timing frames, kept in stores.

This is the one list of flags: :func:`panoseti_pipeline.pff.frame_times` sets the time
flags and the frame index the gap flag (``Frames.index_flags``); step 1 counts them into
the L0 attributes, step 2 reads them back, and :data:`FLAG_ATTRS` is how a store's
``frame_flags`` array describes them (CF ``flag_masks`` / ``flag_meanings``).
A new flag is a new bit here, never a reused one: stores written earlier keep their meaning.
"""

from __future__ import annotations

import numpy as np

FLAG_MISSING_QUABO = 1  # a quabo's sub-header is all zeros (tv_sec == 0): flushed without it
FLAG_INVALID_NSEC = 2  # a live quabo's pkt_nsec is the clamp sentinel or >= 10**9
FLAG_HOST_CLOCK = 4  # the time is the host clock's, not White Rabbit's
FLAG_OUT_OF_ORDER = 8  # earlier than the last frame before it that has a time
FLAG_INVALID_TIME = 16  # a live quabo's tv_sec is too large for int64 ns: never a wrapped time
FLAG_AFTER_GAP = 32  # the first frame after a corrupt byte range the reader skipped
#: bit -> name, in bit order (the order of ``flag_meanings``)
FLAG_NAMES = {FLAG_MISSING_QUABO: "missing_quabo", FLAG_INVALID_NSEC: "invalid_pkt_nsec",
              FLAG_HOST_CLOCK: "host_clock_time", FLAG_OUT_OF_ORDER: "out_of_order",
              FLAG_INVALID_TIME: "invalid_time", FLAG_AFTER_GAP: "after_gap"}
#: CF attributes of a ``frame_flags`` array, so readers decode the bits by name
FLAG_ATTRS = {"flag_masks": list(FLAG_NAMES),
              "flag_meanings": " ".join(FLAG_NAMES.values()),
              "long_name": "per-frame quality flags (bit mask)"}


def flag_counts(flags: np.ndarray) -> dict[str, int]:
    """Frames that carry each flag, by name (a frame may carry several)."""
    return {name: int(np.count_nonzero(flags & bit)) for bit, name in FLAG_NAMES.items()}
