"""How both steps cut frames along time: the time chunk of a store, and task ranges.

Every array of a product has the same chunk along time, and every task owns a range of
whole chunks, so no two tasks ever write one chunk (DESIGN.md §7). These two rules are
written here once; step 1 and step 2 (and the store layout) use them.
"""

from __future__ import annotations


def time_chunk(requested: int, n_frames: int) -> int:
    """The time chunk of an ``n_frames`` store: ``requested``, but within 1..n_frames.

    A chunk longer than the data would make zarr allocate (and compress) a mostly empty
    chunk; an empty store still needs a chunk of 1.
    """
    return max(1, min(requested, n_frames))


def chunks_per_task(chunk: int, frame_bytes: int, target_mb: float) -> int:
    """Whole chunks of ``chunk`` frames per task for about ``target_mb`` of input each."""
    return max(1, round(target_mb * 1e6 / (frame_bytes * chunk)))


def task_ranges(n_frames: int, chunk: int, per_task: int = 1) -> list[tuple[int, int]]:
    """Frame ranges ``(start, stop)`` of ``per_task`` whole chunks each (the last shorter).

    Starts are multiples of ``chunk``: a task owns every chunk it writes.
    """
    step = per_task * chunk
    return [(a, min(a + step, n_frames)) for a in range(0, n_frames, step)]
