"""Frame times and quality flags from PFF header fields (PFF_FORMAT.md §4).

Every frame gets int64 nanoseconds since the Unix epoch and a bit mask of
:mod:`panoseti_pipeline.flags` (:func:`frame_times`). On White Rabbit-timed boards the
second is the host's ``tv_sec`` moved by at most 1 s so that ``(second + 37) mod 1024``
equals ``pkt_tai``, and ``pkt_nsec`` gives the nanoseconds. GNSS-timed boards have
``pkt_tai`` unrelated to TAI; there the host clock (``tv_sec``, ``tv_usec``) is the
usable time. :func:`decide_time_source` decides once per file which case holds, from
frames at its start, middle and end; the flags say for which frames the host clock stood
in. A module frame takes its time from its first quabo that sent a packet
(``tv_sec != 0``).

Notes
-----
* Integer arithmetic only: float64 seconds resolve only ~240 ns today.
* ``999999999`` in ``pkt_nsec`` is the clamp sentinel of newer DAQ builds; it and values
  ``>= 10**9`` flag the frame, and where the frame's time comes from that quabo, the
  host clock stands in.
* :data:`NAT` (int64 min, numpy's ``NaT``) is the time of a frame with no live quabo;
  such frames are skipped, not compared, when looking for out-of-order frames.
"""

from __future__ import annotations

import numpy as np

from panoseti_pipeline.flags import (
    FLAG_HOST_CLOCK,
    FLAG_INVALID_NSEC,
    FLAG_MISSING_QUABO,
    FLAG_OUT_OF_ORDER,
)
from panoseti_pipeline.pff.products import MODULE_FIELDS
from panoseti_pipeline.pff.reader import PFFReader

NSEC_CLAMPED = 999_999_999
NAT = np.iinfo(np.int64).min

TIME_WHITE_RABBIT = "white_rabbit"
TIME_HOST_CLOCK = "host_clock"


def _module_pick(headers: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray,
                                                          np.ndarray]:
    """Fields of the first live quabo (tv_sec != 0) of every frame; live any; all live."""
    live = headers["tv_sec"] != 0
    q = np.argmax(live, axis=1)
    rows = np.arange(len(q))
    return ({f: headers[f][rows, q].astype(np.int64) for f in MODULE_FIELDS},
            live.any(axis=1), live.all(axis=1))


def _time_fields(headers: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray,
                                                          np.ndarray]:
    if headers["tv_sec"].ndim == 2:
        return _module_pick(headers)
    live = headers["tv_sec"] != 0
    return {f: headers[f].astype(np.int64) for f in MODULE_FIELDS}, live, live


def _wr_offset(tv_sec: np.ndarray, pkt_tai: np.ndarray) -> np.ndarray:
    """Seconds to add to tv_sec for the WR second; a large value where clocks disagree."""
    d = (tv_sec - pkt_tai + 37) % 1024
    return np.select([d == 0, d == 1, d == 1023], [0, -1, 1], default=np.iinfo(np.int64).max)


def wr_consistent_fraction(headers: dict[str, np.ndarray]) -> tuple[int, int]:
    """(frames whose WR and host seconds agree within 1 s, frames with a live quabo)."""
    sel, live, _ = _time_fields(headers)
    agree = _wr_offset(sel["tv_sec"], sel["pkt_tai"]) != np.iinfo(np.int64).max
    return int((agree & live).sum()), int(live.sum())


def decide_time_source(reader: PFFReader, sample_frames: int = 3072) -> str:
    """White Rabbit if most sampled frames have WR seconds within 1 s of the host clock.

    GNSS-timed modules have ``pkt_tai`` unrelated to TAI, so ``d`` is far from 0 for
    the whole file; there the host clock is the usable time (PFF_FORMAT.md §4). Samples
    the start, middle and end of the file.
    """
    n = reader.index.n_frames
    k = max(1, sample_frames // 3)
    agree = total = 0
    for s in sorted({0, max(0, n // 2 - k // 2), max(0, n - k)}) if n else ():
        a, t = wr_consistent_fraction(reader.read(s, min(reader.index.n_frames, s + k)).headers)
        agree, total = agree + a, total + t
    return TIME_WHITE_RABBIT if total and agree * 2 >= total else TIME_HOST_CLOCK


def frame_times(headers: dict[str, np.ndarray], time_source: str,
                previous_ns: int = NAT) -> tuple[np.ndarray, np.ndarray]:
    """int64 ns since the Unix epoch and uint8 quality flags for every frame.

    ``previous_ns`` is the time of the frame before this block (for the out-of-order
    flag across block boundaries).
    """
    sel, any_live, all_live = _time_fields(headers)
    n = len(any_live)
    flags = np.zeros(n, np.uint8)
    flags[~all_live] |= FLAG_MISSING_QUABO
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
    flags[use_host & any_live] |= FLAG_HOST_CLOCK
    time_ns = np.where(any_live, time_ns, NAT)
    # compare with the last frame before that has a time (NaT frames are skipped)
    last = np.where(any_live, np.arange(n), -1)
    np.maximum.accumulate(last, out=last)
    before = np.concatenate(([-1], last[:-1]))
    prev = np.where(before >= 0, time_ns[np.maximum(before, 0)], previous_ns)
    earlier = any_live & (prev != NAT) & (time_ns < prev)
    flags[earlier] |= FLAG_OUT_OF_ORDER
    return time_ns.astype(np.int64), flags


def last_valid_time(time_ns: np.ndarray, default: int = NAT) -> int:
    """The last non-NaT time of a block (the out-of-order reference for the next one)."""
    ok = np.flatnonzero(time_ns != NAT)
    return int(time_ns[ok[-1]]) if ok.size else default
