"""Faults of real files the reader survives without mis-reading a frame (issue 12).

Files are written byte-exact by the writer and then edited as a damaged recording would
be: a tail of NUL bytes, a header line missing one quabo, one corrupt frame (a header
digit replaced, the ``*`` lost, one pixel byte lost), a ``tv_sec`` too large for int64
nanoseconds, and longer headers that add up to whole frames (the re-index during the
time-source sampling).
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from test_pff import assert_same_headers, name_for, read_all, synth, times_of, write

from panoseti_pipeline import pff
from panoseti_pipeline.cli import step1
from panoseti_pipeline.errors import PFFFormatError
from panoseti_pipeline.flags import FLAG_ATTRS


def take(headers: dict, rows) -> dict:
    return {k: np.asarray(v)[rows] for k, v in headers.items()}


def frame_offsets(dp: str, images, headers) -> list[int]:
    """Byte offset of every frame (and the file size last) as the writer lays them out."""
    sizes = [len(pff.encode_frames(dp, images[i:i + 1], take(headers, slice(i, i + 1))))
             for i in range(len(images))]
    return [0, *np.cumsum(sizes).tolist()]


def accounted_bytes(index: pff.FrameIndex) -> int:
    """Frames, skipped ranges, a partial last frame and a NUL tail: the whole file."""
    frames = sum((b - a) * stride for a, b, _off, stride in index.segments(0, index.n_frames))
    return (frames + sum(r.length for r in index.skipped) + index.partial_bytes
            + index.nul_tail_bytes)


def read_blocks(path, frames_per_block=16, **kw):
    with pff.PFFReader(path, **kw) as reader:
        got = [(s, f) for s, f in reader.blocks(frames_per_block, copy=True)]
        index = reader.index
    images = np.concatenate([f.images for _, f in got])
    headers = {k: np.concatenate([f.headers[k] for _, f in got]) for k in got[0][1].headers}
    flags = np.concatenate([f.index_flags for _, f in got])
    return index, images, headers, flags, [s for s, _ in got]


# ----------------------------------------------------------------------------- re-index


def long_headers_adding_up_to_one_frame(tmp_path, first_long):
    """1000 ph256 frames, 636 of them one byte longer: the size of exactly 1001 frames."""
    images, headers, _ = synth("ph256", 1000)
    headers["pkt_nsec"][first_long:first_long + 636] = 1_000_000_000 + np.arange(636)
    path = write(tmp_path, "ph256", images, headers, seqno=first_long)
    assert path.stat().st_size == 1001 * 636
    return path, images, headers


def test_time_source_sampling_survives_the_exact_reindex(tmp_path):
    path, _, _ = long_headers_adding_up_to_one_frame(tmp_path, 300)
    with pff.PFFReader(path) as reader:
        assert reader.index.n_frames == 1001 and not reader.index.exact
        # the middle sample finds the longer headers: the end sample must use the new count
        # (was: IndexError frame range 1000..1000 outside 0..1000)
        assert pff.decide_time_source(reader, sample_frames=3) == pff.TIME_WHITE_RABBIT
        assert reader.index.exact and reader.index.n_frames == 1000


def test_reader_read_renumbers_by_byte_after_the_exact_reindex(tmp_path):
    path, images, headers = long_headers_adding_up_to_one_frame(tmp_path, 364)
    with pff.PFFReader(path) as reader:
        # the assumed last frame starts inside the real last frame: there is no frame
        # from its byte on (was: IndexError frame range 1000..1000 outside 0..1000)
        frames = reader.read(1000, 1001)
        assert reader.index.exact and reader.index.n_frames == 1000
        assert (frames.first, len(frames)) == (1000, 0)
    with pff.PFFReader(path) as reader:
        frames = reader.read(990, 1001)  # frames from assumed frame 990's byte on
        assert reader.index.exact and (frames.first, len(frames)) == (990, 10)
        np.testing.assert_array_equal(frames.images, images[990:])
        assert_same_headers(frames.headers, take(headers, slice(990, 1000)))
    for first_long in (300, 364):
        path, images, headers = long_headers_adding_up_to_one_frame(tmp_path, first_long)
        index, got, got_headers, _, starts = read_blocks(path, 128)
        assert index.n_frames == 1000 and starts == list(range(0, 1000, 128))
        np.testing.assert_array_equal(got, images)
        assert_same_headers(got_headers, headers)


# ----------------------------------------------------------------------------- tv_sec range


def test_tv_sec_too_large_for_int64_nanoseconds_is_nat_and_flagged(tmp_path):
    images, headers, _ = synth("img16", 20)
    headers["tv_sec"][5, 0] = 9_721_882_092  # one corrupted digit: quabo 1 gives the time
    headers["tv_sec"][7, :] = 9_999_999_999  # no quabo with a usable second
    source, t, flags, _ = times_of(write(tmp_path, "img16", images, headers))
    assert source == pff.TIME_WHITE_RABBIT
    assert t[7] == pff.NAT  # never a wrapped time (was a time in 1680)
    assert flags[7] == pff.FLAG_INVALID_TIME
    assert t[5] % 10**9 == headers["pkt_nsec"][5, 1] and flags[5] == pff.FLAG_INVALID_TIME
    assert not flags[8] & pff.FLAG_OUT_OF_ORDER and not flags[[0, 1, 2, 3, 4, 6, 8, 9]].any()

    images, headers, _ = synth("ph256", 20, timing="gnss")
    headers["tv_sec"][3] = 9_223_372_037  # the first second whose nanoseconds overflow
    headers["tv_sec"][4] = pff.MAX_TV_SEC  # the last second that is still a time
    source, t, flags, _ = times_of(write(tmp_path, "ph256", images, headers, seqno=1))
    assert source == pff.TIME_HOST_CLOCK
    assert t[3] == pff.NAT and flags[3] == pff.FLAG_INVALID_TIME
    assert t[4] == pff.MAX_TV_SEC * 10**9 + headers["tv_usec"][4] * 1000 > 0
    assert pff.flag_counts(flags)["invalid_time"] == 1


def test_new_flags_are_documented_bits():
    assert pff.FLAG_NAMES[pff.FLAG_INVALID_TIME] == "invalid_time"
    assert pff.FLAG_NAMES[pff.FLAG_AFTER_GAP] == "after_gap"
    assert (pff.FLAG_INVALID_TIME, pff.FLAG_AFTER_GAP) == (16, 32)
    assert FLAG_ATTRS["flag_masks"] == [1, 2, 4, 8, 16, 32]
    assert FLAG_ATTRS["flag_meanings"].split()[-2:] == ["invalid_time", "after_gap"]


# ----------------------------------------------------------------------------- NUL tail


@pytest.mark.parametrize("dp", ["img16", "ph256"])
@pytest.mark.parametrize("nuls", [16, 100, 636, 2540, 3 * 2540, 100_000])
def test_nul_tail_keeps_every_whole_frame(tmp_path, dp, nuls):
    images, headers, _ = synth(dp, 50)
    headers["pkt_nsec"][20] = 1_000_000_000 + 20  # a longer header before the NULs
    path = write(tmp_path, dp, images, headers, tail=bytes(nuls))
    for strict in (False, True):
        index, frames = read_all(path, strict=strict, block_bytes=1 << 14)
        assert (index.n_frames, index.partial_bytes, index.nul_tail_bytes) == (50, 0, nuls)
        assert index.skipped == () and accounted_bytes(index) == index.file_size
        np.testing.assert_array_equal(frames.images, images)
        assert_same_headers(frames.headers, headers)
        assert any("NUL" in line for line in index.damage_notices())
        got_index, got, got_headers, flags, _ = read_blocks(path, strict=strict)
        assert got_index.nul_tail_bytes == nuls and not flags.any()
        np.testing.assert_array_equal(got, images)
        assert_same_headers(got_headers, headers)


def test_partial_header_then_nul_tail(tmp_path):
    images, headers, _ = synth("img16", 30)
    extra = pff.encode_frames("img16", images[:1], take(headers, slice(0, 1)))
    path = write(tmp_path, "img16", images, headers, tail=extra[:300] + bytes(5000))
    index, frames = read_all(path)
    assert (index.n_frames, index.partial_bytes, index.nul_tail_bytes) == (30, 300, 5000)
    np.testing.assert_array_equal(frames.images, images)


def test_file_of_nul_bytes_only_has_no_frames(tmp_path):
    path = tmp_path / name_for("img16")
    path.write_bytes(bytes(10_000))
    for strict in (False, True):
        index = pff.index_file(path, strict=strict)
        assert (index.n_frames, index.partial_bytes, index.nul_tail_bytes) == (0, 0, 10_000)
        with pff.PFFReader(path, strict=strict) as reader:
            assert reader.index.n_frames == 0 and list(reader.blocks()) == []


# ----------------------------------------------------------------------------- missing quabo


def drop_quabo_lines(data: bytes, offsets: list[int], edits: list[tuple[int, int]],
                     header_bytes: int) -> bytes:
    """Remove the ``"quabo_q": {...}`` line of frame i's header, for each (i, q)."""
    out = bytearray(data)
    for i, q in sorted(edits, reverse=True):  # back to front: earlier offsets stay valid
        start = offsets[i]
        end = out.index(b"\n\n*", start)
        header = bytes(out[start:end])
        assert end - start >= header_bytes
        lines = header[2:-2].split(b", \n")  # "{\n" line ", \n" line ... "\n}"
        del lines[q]
        out[start:end] = b"{\n" + b", \n".join(lines) + b"\n}"
    return bytes(out)


@pytest.mark.parametrize("dp", ["img16", "img8", "ph1024"])
def test_header_missing_a_quabo_line_reads_as_a_missing_quabo(tmp_path, dp):
    images, headers, _ = synth(dp, 40)
    headers["pkt_nsec"][20, 2] = 1_000_000_001  # a longer header in an edited frame too
    data = pff.encode_frames(dp, images, headers)
    edits = [(0, 2), (20, 0), (21, 3), (39, 3)]
    path = tmp_path / name_for(dp)
    path.write_bytes(drop_quabo_lines(data, frame_offsets(dp, images, headers), edits,
                                      pff.PRODUCTS[dp].header_bytes))
    want = {k: v.copy() for k, v in headers.items()}
    for i, q in edits:
        for f in pff.MODULE_FIELDS:
            want[f][i, q] = 0
    for strict in (False, True):
        index, frames = read_all(path, strict=strict, block_bytes=1)
        assert (index.n_frames, index.frames_walked, index.partial_bytes) == (40, 4, 0)
        np.testing.assert_array_equal(frames.images, images)
        assert_same_headers(frames.headers, want)
        _, got, got_headers, _, _ = read_blocks(path, strict=strict)
        np.testing.assert_array_equal(got, images)
        assert_same_headers(got_headers, want)
    _, t, flags, _ = times_of(path)
    edited = [i for i, _ in edits]
    assert (flags[[0, 21, 39]] == pff.FLAG_MISSING_QUABO).all()
    assert flags[20] == pff.FLAG_MISSING_QUABO | pff.FLAG_INVALID_NSEC
    assert not np.delete(flags, edited).any()
    assert t[20] % 10**9 == headers["pkt_nsec"][20, 1]  # quabo 0 missing: quabo 1's time


def test_missing_quabo_line_header_must_still_be_exact(tmp_path):
    images, headers, _ = synth("img16", 5)
    data = pff.encode_frames("img16", images, headers)
    offsets = frame_offsets("img16", images, headers)
    edited = bytearray(drop_quabo_lines(data, offsets, [(2, 1)], 489))
    at = offsets[2] + edited[offsets[2]:].index(b'"quabo_2"')
    edited[at:at + 9] = b'"quabo_9"'  # valid JSON, not a quabo
    path = tmp_path / name_for("img16")
    path.write_bytes(bytes(edited))
    with pytest.raises(PFFFormatError, match=f"byte {offsets[2]}"):
        read_all(path, strict=True)


# ----------------------------------------------------------------------------- corrupt frame


def corrupt(data: bytes, at: int, kind: str, product: pff.Product) -> bytes:
    """One damaged frame starting at byte ``at``: a digit replaced, '*' lost, a pixel lost."""
    out = bytearray(data)
    end = out.index(b"\n\n*", at)
    if kind == "digit":
        col = product.layout.columns[("pkt_tai", 0)] + 3  # the last digit of a number
        assert chr(out[at + col]).isdigit()
        out[at + col] = ord("x")
    elif kind == "star":
        del out[end + 2]
    else:
        del out[end + 3 + product.pixel_bytes // 2]
    return bytes(out)


@pytest.mark.parametrize("dp", ["img16", "ph256"])
@pytest.mark.parametrize("kind", ["digit", "star", "pixel"])
@pytest.mark.parametrize("where", [0, 20, 39])
def test_one_corrupt_frame_is_skipped_and_every_other_frame_read_bit_exact(tmp_path, dp, kind,
                                                                           where):
    n = 40
    product = pff.PRODUCTS[dp]
    images, headers, _ = synth(dp, n)
    headers["pkt_nsec"][[1, 19, 21, 38]] = 1_000_000_000 + 7  # walked frames around it
    offsets = frame_offsets(dp, images, headers)
    data = corrupt(pff.encode_frames(dp, images, headers), offsets[where], kind, product)
    path = tmp_path / name_for(dp)
    path.write_bytes(data)
    length = offsets[where + 1] - offsets[where] - (kind != "digit")

    if where == n - 1 and kind == "pixel":  # a short last frame is a partial frame
        index, frames = read_all(path)
        assert (index.n_frames, index.partial_bytes, index.skipped) == (n - 1, length, ())
        np.testing.assert_array_equal(frames.images, images[:-1])
        return

    keep = [i for i in range(n) if i != where]
    index, frames = read_all(path)
    assert index.n_frames == n - 1 and index.degraded
    assert accounted_bytes(index) == index.file_size == len(data)
    (gap,) = index.skipped
    assert (gap.offset, gap.length, gap.frames_lost, gap.next_frame) == (
        offsets[where], length, 1, where)
    assert gap.reason
    np.testing.assert_array_equal(frames.images, images[keep])
    assert_same_headers(frames.headers, take(headers, keep))
    after = [where] if where < n - 1 else []
    assert np.flatnonzero(frames.index_flags).tolist() == after
    assert (frames.index_flags[after] == pff.FLAG_AFTER_GAP).all()
    notices = index.damage_notices()
    assert len(notices) == 1 and "CORRUPT" in notices[0] and f"byte {offsets[where]}" in notices[0]

    for block in (1, 1 << 14):  # every buffer boundary
        small, _ = read_all(path, block_bytes=block)
        assert small.skipped == index.skipped
        np.testing.assert_array_equal(small.offsets(), index.offsets())
    got_index, got, got_headers, flags, starts = read_blocks(path)
    assert got_index.skipped == index.skipped and starts == list(range(0, n - 1, 16))
    np.testing.assert_array_equal(got, images[keep])
    assert_same_headers(got_headers, take(headers, keep))
    np.testing.assert_array_equal(flags, frames.index_flags)

    with pytest.raises(PFFFormatError, match="byte"):  # strict: refused as before
        read_all(path, strict=True)
    with pytest.raises(PFFFormatError, match="byte"), pff.PFFReader(path, strict=True) as r:
        list(r.blocks(16))


def test_pff_info_reports_the_gap_flag_the_skipped_range_and_the_nul_tail(tmp_path, capsys):
    images, headers, _ = synth("img16", 40)
    offsets = frame_offsets("img16", images, headers)
    path = tmp_path / name_for("img16")
    path.write_bytes(corrupt(pff.encode_frames("img16", images, headers), offsets[10],
                             "star", pff.PRODUCTS["img16"]) + bytes(4096))
    assert pff.main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "after_gap=1" in out and "nul_tail_bytes_dropped=4096" in out
    assert f"CORRUPT DATA SKIPPED: 2539 bytes at byte {offsets[10]}" in out


@pytest.mark.parametrize("where", [0, 15, 29])
def test_ten_digit_pkt_nsec_first_middle_last_is_walked_not_skipped(tmp_path, where):
    for dp in ("img8", "ph256"):
        images, headers, _ = synth(dp, 30)
        headers["pkt_nsec"][where] = 4_000_000_000
        path = write(tmp_path, dp, images, headers)
        for strict in (False, True):
            index, frames = read_all(path, strict=strict)
            assert (index.n_frames, index.frames_walked, index.skipped) == (30, 1, ())
            np.testing.assert_array_equal(frames.images, images)
            assert_same_headers(frames.headers, headers)


def test_a_file_with_no_valid_frame_is_refused_not_emptied(tmp_path):
    images, headers, _ = synth("img16", 3)
    data = pff.encode_frames("img16", images, headers).replace(b'"pkt_tai": ', b'"pkt_tai":_')
    path = tmp_path / name_for("img16")
    path.write_bytes(data)
    with pytest.raises(PFFFormatError, match="byte 0"):
        pff.index_file(path)
    with pytest.raises(PFFFormatError, match="byte 0"), pff.PFFReader(path) as reader:
        list(reader.blocks())


# ----------------------------------------------------------------------------- step 1


def test_step1_converts_missing_quabo_lines_and_drops_a_nul_tail(tmp_path, capsys):
    images, headers, _ = synth("img16", 300)
    edits = [(0, 1), (150, 3), (299, 0)]
    data = drop_quabo_lines(pff.encode_frames("img16", images, headers),
                            frame_offsets("img16", images, headers), edits, 489)
    path = tmp_path / name_for("img16")
    path.write_bytes(data + bytes(3 * 4096))
    cfg = tmp_path / "cfg.toml"
    cfg.write_text("[cluster]\nuse_dask = false\n[pff_to_zarr]\ntime_chunk = 64\n"
                   "chunk_size_mb = 1\nnum_workers = 2\n")
    out = tmp_path / "x_L0.zarr"
    assert step1.main([str(path), str(out), str(cfg)]) == 0
    assert f"{3 * 4096} NUL bytes at the end dropped" in capsys.readouterr().err
    g = zarr.open_group(str(out), mode="r")
    np.testing.assert_array_equal(g["images"][:], images)
    for i, q in edits:
        for f in pff.MODULE_FIELDS:
            headers[f][i, q] = 0
    for k, v in headers.items():
        for q in range(pff.N_QUABOS):
            np.testing.assert_array_equal(g[f"quabo_{q}_{k}"][:], v[:, q], err_msg=k)
    assert g.attrs["source_files"][0]["nul_tail_bytes"] == 3 * 4096
    flags = g["frame_flags"][:]
    assert np.flatnonzero(flags).tolist() == [0, 150, 299]
    assert (flags[[0, 150, 299]] == pff.FLAG_MISSING_QUABO).all()
