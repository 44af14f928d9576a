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


def test_sharded_tasks_own_whole_shards():
    """With shards of 64 chunks a task is one shard: no two tasks write one shard file."""
    ranges = chunking.task_ranges(100_000, 1024, 64)
    assert ranges == [(0, 65_536), (65_536, 100_000)]
    assert chunking.task_ranges(10, 8, 64) == [(0, 10)]
