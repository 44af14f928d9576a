"""pff/streams.py: streams as the DAQ names them (a new start_ for every rolled-over file)."""

from __future__ import annotations

from pathlib import Path

from panoseti_pipeline import pff


def touch(directory: Path, start: str, dp: str, module: int, seqno: int, size: int = 10,
          extra: str = "") -> pff.PFFName:
    bpp = pff.PRODUCTS[dp].bpp
    path = directory / f"start_{start}Z.dp_{dp}.bpp_{bpp}.module_{module}{extra}.seqno_{seqno}.pff"
    path.write_bytes(b"x" * size)
    return pff.parse_name(path)


def test_rolled_over_files_with_later_starts_are_one_stream_in_seqno_order(tmp_path):
    names = [touch(tmp_path, "2025-08-02T05:57:41", "img16", 1, 1),
             touch(tmp_path, "2025-08-02T05:31:36", "img16", 1, 0),
             touch(tmp_path, "2025-08-02T06:23:02", "img16", 1, 2),
             touch(tmp_path, "2025-08-02T05:31:36", "ph256", 1, 0),
             touch(tmp_path, "2025-08-02T05:31:36", "img16", 2, 0, size=0)]
    streams, problems = pff.group_streams(names)
    assert problems == []
    assert [(s.dp, s.module) for s in streams] == [("img16", 1), ("img16", 2), ("ph256", 1)]
    img = streams[0]
    assert [n.seqno for n in img.files] == [0, 1, 2]
    assert img.notices == ()
    assert [n.seqno for n in img.data_files] == [0, 1, 2]
    assert streams[1].data_files == []  # the DAQ's 0-byte file: a stream with no data


def test_start_going_backwards_and_a_gap_are_notices_not_refusals(tmp_path):
    names = [touch(tmp_path, "2025-08-02T05:31:36", "img16", 1, 0),
             touch(tmp_path, "2025-08-02T05:20:00", "img16", 1, 1),
             touch(tmp_path, "2025-08-02T06:00:00", "img16", 1, 3)]
    streams, problems = pff.group_streams(names)
    assert problems == [] and len(streams) == 1
    notices = streams[0].notices
    assert len(notices) == 2
    assert "seqno 2 missing" in notices[0]
    assert "seqno 1 is named start_05:20:00Z, before seqno 0 (start_05:31:36Z)" in notices[1]
    assert [n.seqno for n in streams[0].files] == [0, 1, 3]


def test_the_same_seqno_twice_is_refused(tmp_path):
    names = [touch(tmp_path, "2025-08-02T05:31:36", "img16", 1, 0),
             touch(tmp_path, "2025-08-02T05:40:00", "img16", 1, 0)]
    streams, problems = pff.group_streams(names)
    assert streams == []
    assert len(problems) == 1 and "duplicate seqno [0]" in problems[0]


def test_directories_and_other_name_keys_separate_streams(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    names = [touch(tmp_path / "a", "2025-08-02T05:31:36", "img16", 1, 0),
             touch(tmp_path / "b", "2025-08-02T05:31:36", "img16", 1, 1),
             touch(tmp_path / "a", "2025-08-02T05:31:36", "img16", 1, 1, extra=".run_x")]
    streams, problems = pff.group_streams(names)
    assert problems == [] and len(streams) == 3
