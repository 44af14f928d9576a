"""Frame times and quality flags from PFF header fields (PFF_FORMAT.md §4).

Every frame gets int64 nanoseconds since the Unix epoch and a bit mask of
:mod:`panoseti_pipeline.flags` (:func:`frame_times`). On White Rabbit-timed boards the
second is the host's ``tv_sec`` moved by at most 1 s so that ``(second + 37) mod 1024``
equals ``pkt_tai``, and ``pkt_nsec`` gives the nanoseconds. GNSS-timed boards have
``pkt_tai`` unrelated to TAI; there the host clock (``tv_sec``, ``tv_usec``) is the
usable time. :func:`decide_time_source` decides once per file which case holds, from
frames at its start, middle and end; the flags say for which frames the host clock stood
in. A module frame takes its time from its first quabo that sent a packet
(``tv_sec != 0``) with a usable second.

Notes
-----
* Integer arithmetic only: float64 seconds resolve only ~240 ns today.
* ``999999999`` in ``pkt_nsec`` is the clamp sentinel of newer DAQ builds; it and values
  ``>= 10**9`` flag the frame, and where the frame's time comes from that quabo, the
  host clock stands in.
* :data:`NAT` (int64 min, numpy's ``NaT``) is the time of a frame with no live quabo, or
  whose live quabos all have a ``tv_sec`` above :data:`MAX_TV_SEC` (year 2262: only a
  corrupted digit gets there; flagged ``invalid_time``, never a wrapped time); such
  frames are skipped, not compared, when looking for out-of-order frames.
"""

from __future__ import annotations

import numpy as np

from panoseti_pipeline.flags import (
    FLAG_HOST_CLOCK,
    FLAG_INVALID_NSEC,
    FLAG_INVALID_TIME,
    FLAG_MISSING_QUABO,
    FLAG_OUT_OF_ORDER,
)
from panoseti_pipeline.pff.products import MODULE_FIELDS
from panoseti_pipeline.pff.reader import PFFReader

NSEC_CLAMPED = 999_999_999
NAT = np.iinfo(np.int64).min
#: the largest ``tv_sec`` that is a time: its int64 ns (moved by the WR second, plus
#: ``pkt_nsec`` or ``tv_usec``) still fit; a larger one (a corrupted digit) gives NaT
MAX_TV_SEC = np.iinfo(np.int64).max // 1_000_000_000 - 2

TIME_WHITE_RABBIT = "white_rabbit"
TIME_HOST_CLOCK = "host_clock"


def _time_fields(headers: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray,
                                                          np.ndarray, np.ndarray]:
    """Each frame's first quabo with a usable second: its fields; has one, all live, bad.

    A quabo is live when ``tv_sec != 0``; its second is usable up to :data:`MAX_TV_SEC`
    (larger ones would wrap int64 nanoseconds). Per frame: whether a quabo has a usable
    second, whether every quabo is live, whether a live quabo's second is unusable.
    """
    tv_sec = headers["tv_sec"]
    live = tv_sec != 0
    usable = live & (tv_sec <= MAX_TV_SEC)
    if tv_sec.ndim == 2:
        q = np.argmax(usable, axis=1)
        rows = np.arange(len(q))
        sel = {f: headers[f][rows, q].astype(np.int64) for f in MODULE_FIELDS}
        timed, all_live, bad = usable.any(axis=1), live.all(axis=1), (live & ~usable).any(axis=1)
    else:
        sel = {f: headers[f].astype(np.int64) for f in MODULE_FIELDS}
        timed, all_live, bad = usable, live, live & ~usable
    sel["tv_sec"] = np.where(timed, sel["tv_sec"], 0)  # no arithmetic on unusable seconds
    return sel, timed, all_live, bad


def _wr_offset(tv_sec: np.ndarray, pkt_tai: np.ndarray) -> np.ndarray:
    """Seconds to add to tv_sec for the WR second; a large value where clocks disagree."""
    d = (tv_sec - pkt_tai + 37) % 1024
    return np.select([d == 0, d == 1, d == 1023], [0, -1, 1], default=np.iinfo(np.int64).max)


def wr_consistent_fraction(headers: dict[str, np.ndarray]) -> tuple[int, int]:
    """(frames whose WR and host seconds agree within 1 s, frames with a usable second)."""
    sel, timed, _, _ = _time_fields(headers)
    agree = _wr_offset(sel["tv_sec"], sel["pkt_tai"]) != np.iinfo(np.int64).max
    return int((agree & timed).sum()), int(timed.sum())


def decide_time_source(reader: PFFReader, sample_frames: int = 3072) -> str:
    """White Rabbit if most sampled frames have WR seconds within 1 s of the host clock.

    GNSS-timed modules have ``pkt_tai`` unrelated to TAI, so ``d`` is far from 0 for
    the whole file; there the host clock is the usable time (PFF_FORMAT.md §4). Samples
    the start, middle and end of the file; if a sample makes the reader index the file
    exactly, the frame count changed and the sampling starts again.
    """
    k = max(1, sample_frames // 3)
    while True:
        index = reader.index
        n = index.n_frames
        agree = total = 0
        for s in sorted({0, max(0, n // 2 - k // 2), max(0, n - k)}) if n else ():
            headers = reader.read(s, min(n, s + k)).headers
            if reader.index is not index:
                break
            a, t = wr_consistent_fraction(headers)
            agree, total = agree + a, total + t
        else:
            return TIME_WHITE_RABBIT if total and agree * 2 >= total else TIME_HOST_CLOCK


def frame_times(headers: dict[str, np.ndarray], time_source: str,
                previous_ns: int = NAT) -> tuple[np.ndarray, np.ndarray]:
    """int64 ns since the Unix epoch and uint8 quality flags for every frame.

    ``previous_ns`` is the time of the frame before this block (for the out-of-order
    flag across block boundaries).
    """
    sel, timed, all_live, bad_sec = _time_fields(headers)
    n = len(timed)
    flags = np.zeros(n, np.uint8)
    flags[~all_live] |= FLAG_MISSING_QUABO
    flags[bad_sec] |= FLAG_INVALID_TIME
    nsec = headers["pkt_nsec"]
    live = headers["tv_sec"] != 0
    invalid_nsec = (nsec >= NSEC_CLAMPED) & live
    if invalid_nsec.ndim == 2:
        invalid_nsec = invalid_nsec.any(axis=1)
    flags[invalid_nsec] |= FLAG_INVALID_NSEC
    host = sel["tv_sec"] * 1_000_000_000 + sel["tv_usec"] * 1000
    if time_source == TIME_WHITE_RABBIT:
        shift = _wr_offset(sel["tv_sec"], sel["pkt_tai"])
        wr_ok = (shift != np.iinfo(np.int64).max) & (sel["pkt_nsec"] < NSEC_CLAMPED)
        wr = (sel["tv_sec"] + np.where(wr_ok, shift, 0)) * 1_000_000_000 + sel["pkt_nsec"]
        time_ns = np.where(wr_ok, wr, host)
        use_host = ~wr_ok
    else:
        time_ns = host
        use_host = np.ones(n, bool)
    flags[use_host & timed] |= FLAG_HOST_CLOCK
    time_ns = np.where(timed, time_ns, NAT)
    # compare with the last frame before that has a time (NaT frames are skipped)
    last = np.where(timed, np.arange(n), -1)
    np.maximum.accumulate(last, out=last)
    before = np.concatenate(([-1], last[:-1]))
    prev = np.where(before >= 0, time_ns[np.maximum(before, 0)], previous_ns)
    earlier = timed & (prev != NAT) & (time_ns < prev)
    flags[earlier] |= FLAG_OUT_OF_ORDER
    return time_ns.astype(np.int64), flags


def last_valid_time(time_ns: np.ndarray, default: int = NAT) -> int:
    """The last non-NaT time of a block (the out-of-order reference for the next one)."""
    ok = np.flatnonzero(time_ns != NAT)
    return int(time_ns[ok[-1]]) if ok.size else default
