"""Tests of chunk and task planning (panoseti_pipeline/chunking.py)."""

from __future__ import annotations

from panoseti_pipeline import chunking


def test_task_ranges_are_chunk_aligned():
    ranges = chunking.task_ranges(100_000, 8192, chunking.chunks_per_task(8192, 2540, 64))
    assert all(a % 8192 == 0 for a, _ in ranges)
    assert ranges[0] == (0, 3 * 8192) and ranges[-1][1] == 100_000
    assert chunking.task_ranges(10, 8192, chunking.chunks_per_task(8192, 2540, 1)) == [(0, 10)]


def test_time_chunk_is_within_the_frames():
    assert chunking.time_chunk(8192, 10) == 10
    assert chunking.time_chunk(64, 1000) == 64
    assert chunking.time_chunk(64, 0) == 1
