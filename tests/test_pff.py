"""pff.py against frames written byte-exact to the DAQ format (PFF_FORMAT.md)."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from panoseti_pipeline import pff
from panoseti_pipeline import synthetic as synthetic_obs
from panoseti_pipeline.errors import PFFFormatError, PFFNameError

MODULE_EXAMPLE = (
    "{\n"
    '   "quabo_0": { "pkt_num":      37993, "pkt_tai":  529, "pkt_nsec": 779007488, '
    '"tv_sec": 1721882092, "tv_usec": 779336}, \n'
    '   "quabo_1": { "pkt_num":      36441, "pkt_tai":  529, "pkt_nsec": 779007484, '
    '"tv_sec": 1721882092, "tv_usec": 779356}, \n'
    '   "quabo_2": { "pkt_num":      35058, "pkt_tai":  529, "pkt_nsec": 779007492, '
    '"tv_sec": 1721882092, "tv_usec": 779356}, \n'
    '   "quabo_3": { "pkt_num":      33692, "pkt_tai":  529, "pkt_nsec": 779007484, '
    '"tv_sec": 1721882092, "tv_usec": 779347}\n'
    "}"
)
PH256_EXAMPLE = ('{ "quabo_num": 3, "pkt_num":       5124, "pkt_tai":  229, '
                 '"pkt_nsec": 999999999, "tv_sec": 1754112728, "tv_usec": 985339}')


def name_for(dp: str, seqno: int = 0, module: int = 1) -> str:
    return synthetic_obs.file_name(synthetic_obs.StreamSpec(dp=dp, module=module),
                                   synthetic_obs.DEFAULT_START, seqno)


def synth(dp: str, n: int, seed: int = 0, timing: str = "wr"):
    rng = np.random.default_rng(seed)
    spec = synthetic_obs.StreamSpec(dp=dp, timing=timing)
    t0 = int(synthetic_obs.DEFAULT_START.timestamp()) * 10**9
    times = t0 + np.arange(n, dtype=np.int64) * 1_000_000
    headers = synthetic_obs.synth_headers(rng, spec, times, first_pkt=65530)
    images = synthetic_obs.synth_images(rng, spec, n, 0)
    return images, headers, times


def write(tmp_path, dp, images, headers, tail=b"", seqno=0):
    path = tmp_path / name_for(dp, seqno)
    with open(path, "wb") as f:
        pff.write_frames(f, dp, images, headers)
        f.write(tail)
    return path


def read_all(path, **kw):
    index = pff.index_file(path, **kw)
    frames = pff.read_frames(path, index, 0, index.n_frames) if index.n_frames else None
    return index, frames


def assert_same_headers(got: dict, want: dict):
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == pff.FIELD_DTYPE[k]
        np.testing.assert_array_equal(got[k], np.asarray(want[k]), err_msg=k)


# ----------------------------------------------------------------------------- writer


def test_writer_reproduces_module_example_byte_for_byte():
    header = json.loads(MODULE_EXAMPLE)
    values = {f: [header[f"quabo_{q}"][f] for q in range(4)] for f in pff.MODULE_FIELDS}
    img = np.zeros((1, 32, 32), "<u2")
    data = pff.encode_frames("img16", img, {f: np.array([v]) for f, v in values.items()})
    assert data[:489] == MODULE_EXAMPLE.encode()
    assert data[489:492] == b"\n\n*"
    assert len(data) == 2540


def test_writer_reproduces_ph256_example_byte_for_byte():
    header = json.loads(PH256_EXAMPLE)
    img = np.full((1, 16, 16), -517, "<i2")
    data = pff.encode_frames("ph256", img, {f: np.array([v]) for f, v in header.items()})
    assert data[:121] == PH256_EXAMPLE.encode()
    assert len(data) == 636
    assert np.frombuffer(data[124:], "<i2").min() == -517


@pytest.mark.parametrize("dp,frame_bytes", [("img16", 2540), ("img8", 1516), ("ph1024", 2540),
                                            ("ph256", 636)])
def test_product_table_matches_format(dp, frame_bytes):
    assert pff.PRODUCTS[dp].frame_bytes == frame_bytes


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("dp", sorted(pff.PRODUCTS))
def test_round_trip_every_product_bit_exact(tmp_path, dp):
    images, headers, _ = synth(dp, 777)
    path = write(tmp_path, dp, images, headers)
    index, frames = read_all(path)
    assert (index.n_frames, index.partial_bytes, index.frames_walked) == (777, 0, 0)
    assert frames.images.dtype == pff.PRODUCTS[dp].dtype
    np.testing.assert_array_equal(frames.images, images)
    assert_same_headers(frames.headers, headers)
    assert path.read_bytes() == pff.encode_frames(dp, frames.images, frames.headers)


def test_pulse_height_values_are_signed(tmp_path):
    images, headers, _ = synth("ph1024", 50)
    images[3, 4, 5] = -32768
    images[4, 0, 0] = -600
    _, frames = read_all(write(tmp_path, "ph1024", images, headers))
    assert frames.images[3, 4, 5] == -32768 and frames.images[4, 0, 0] == -600


def test_pixels_holding_delimiters_are_never_searched(tmp_path):
    images, headers, _ = synth("img8", 40)
    images[:] = np.frombuffer(b"\n\n*{" * 256, "u1").reshape(32, 32)
    headers["pkt_nsec"][7, 2] = 3_000_000_000  # force a walk through such pixels
    index, frames = read_all(write(tmp_path, "img8", images, headers))
    assert index.n_frames == 40 and index.frames_walked == 1
    np.testing.assert_array_equal(frames.images, images)


field_values = {
    "pkt_num": st.integers(0, 0xFFFF), "pkt_tai": st.integers(0, 1023),
    "pkt_nsec": st.one_of(st.integers(0, 999_999_999), st.just(999_999_999),
                          st.integers(10**9, 0xFFFFFFFF)),
    "tv_sec": st.integers(0, 9_999_999_999), "tv_usec": st.integers(0, 999_999),
    "quabo_num": st.integers(0, 3),
}


@settings(max_examples=60, deadline=None)
@given(data=st.data(), dp=st.sampled_from(sorted(pff.PRODUCTS)), n=st.integers(1, 6))
def test_random_frames_at_field_limits_round_trip(tmp_path_factory, data, dp, n):
    product = pff.PRODUCTS[dp]
    shape = (n, *product.header_shape)
    headers = {f: np.array(data.draw(st.lists(field_values[f], min_size=int(np.prod(shape)),
                                              max_size=int(np.prod(shape))))).reshape(shape)
               for f in product.fields}
    info = np.iinfo(product.dtype)
    images = np.array(data.draw(st.lists(st.sampled_from([info.min, info.max, 0, 10]),
                                         min_size=n * product.shape[0] * product.shape[1],
                                         max_size=n * product.shape[0] * product.shape[1])),
                      product.dtype).reshape(n, *product.shape)
    path = write(tmp_path_factory.mktemp("h"), dp, images, headers)
    index, frames = read_all(path, block_bytes=1)  # smallest blocks: every boundary case
    assert index.n_frames == n
    np.testing.assert_array_equal(frames.images, images)
    assert_same_headers(frames.headers, headers)
    # every header is valid JSON agreeing with the parsed values
    for off, hdr in zip(index.offsets(), range(n), strict=True):
        raw = path.read_bytes()[off:]
        assert json.loads(raw[:raw.index(b"\n\n")]) is not None, hdr


# ----------------------------------------------------------------------------- index


def test_header_drift_mid_file_loses_no_frame(tmp_path):
    images, headers, _ = synth("img16", 500)
    headers["pkt_nsec"][100, 1] = 1_000_000_007  # +1 byte
    headers["pkt_nsec"][300] = [4_000_000_000] * 4  # +4 bytes
    path = write(tmp_path, "img16", images, headers)
    for block in (1, 10_000, 1 << 24):
        index, frames = read_all(path, block_bytes=block)
        assert (index.n_frames, index.frames_walked) == (500, 2)
        np.testing.assert_array_equal(frames.images, images)
        assert_same_headers(frames.headers, headers)
    assert index.offsets(101, 102)[0] == 101 * 2540 + 1
    assert index.offsets(499, 500)[0] == 499 * 2540 + 5


def test_long_first_and_last_frames(tmp_path):
    images, headers, _ = synth("ph256", 30)
    headers["pkt_nsec"][0] = 1_234_567_890
    headers["pkt_nsec"][29] = 1_234_567_891
    index, frames = read_all(write(tmp_path, "ph256", images, headers))
    assert (index.n_frames, index.frames_walked, index.partial_bytes) == (30, 2, 0)
    assert_same_headers(frames.headers, headers)


@pytest.mark.parametrize("cut", [1, 200, 489, 491, 2539])
def test_partial_last_frame_is_dropped_and_counted(tmp_path, cut):
    images, headers, _ = synth("img16", 20)
    extra = pff.encode_frames("img16", images[:1], {k: v[:1] for k, v in headers.items()})
    index, frames = read_all(write(tmp_path, "img16", images, headers, tail=extra[:cut]))
    assert (index.n_frames, index.partial_bytes) == (20, cut)
    np.testing.assert_array_equal(frames.images, images)


def test_zero_byte_file_has_no_frames(tmp_path):
    path = tmp_path / name_for("img16")
    path.touch()
    index = pff.index_file(path)
    assert (index.n_frames, index.partial_bytes, index.file_size) == (0, 0, 0)


def test_frame_range_reads_match_whole_read(tmp_path):
    images, headers, _ = synth("img16", 300)
    headers["pkt_nsec"][150, 0] = 1_500_000_000
    path = write(tmp_path, "img16", images, headers)
    index = pff.index_file(path)
    buf = np.empty(10, np.uint8)
    for a, b in [(0, 1), (149, 152), (151, 300), (0, 300)]:
        frames = pff.read_frames(path, index, a, b, buffer=buf)
        np.testing.assert_array_equal(frames.images, images[a:b])
        assert frames.headers["pkt_nsec"][150 - a, 0] == 1_500_000_000 if a <= 150 < b else True
    with pff.PFFReader(path) as reader:
        blocks = [(s, f.images.copy()) for s, f in reader.blocks(64)]
        assert reader.index.exact and reader.index.frames_walked == 1
    assert [s for s, _ in blocks] == [0, 64, 128, 192, 256]
    np.testing.assert_array_equal(np.concatenate([f for _, f in blocks]), images)


def test_assumed_stride_is_verified_and_replaced_when_wrong(tmp_path):
    images, headers, _ = synth("img16", 300)
    headers["pkt_nsec"][200] = [4_000_000_000] * 4  # +4 bytes ...
    tail = pff.encode_frames("img16", images[:1], {k: v[:1] for k, v in headers.items()})
    path = write(tmp_path, "img16", images, headers, tail=tail[:2536])  # ... 301 * 2540 in all
    assumed = pff.assume_regular(path)
    assert (assumed.n_frames, assumed.partial_bytes, assumed.exact) == (301, 0, False)
    with pytest.raises(pff.StrideMismatch, match=f"byte {200 * 2540}"):
        pff.read_frames(path, assumed, 0, 301)
    with pff.PFFReader(path) as reader:
        got = np.concatenate([f.images for _, f in reader.blocks(128, copy=True)])
        assert (reader.index.n_frames, reader.index.partial_bytes) == (300, 2536)
    np.testing.assert_array_equal(got, images)
    clean = write(tmp_path, "img16", images[:50], {k: v[:50] for k, v in headers.items()},
                  seqno=1)
    with pff.PFFReader(clean) as reader:  # a clean file is never indexed separately
        assert len(reader.read(0, 50)) == 50 and not reader.index.exact


# ----------------------------------------------------------------------------- refusals


def test_legacy_variable_width_header_is_refused(tmp_path):
    legacy = {f"quabo_{q}": {"acq_mode": 2, "mod_num": 1, "pkt_num": 5, "pkt_tai": 3,
                             "pkt_nsec": 7, "pkt_utc": 9, "tv_sec": 1650000000, "tv_usec": 5}
              for q in range(4)}
    body = json.dumps(legacy).encode() + b"\n\n*" + bytes(2048)
    path = tmp_path / name_for("img16")
    path.write_bytes(body * 3)
    with pytest.raises(PFFFormatError, match=r"legacy PFF header at byte 0.*2022-10-17"):
        pff.index_file(path)


def test_pre_json_header_is_refused(tmp_path):
    path = tmp_path / name_for("img16")
    path.write_bytes(b"{quabo 0: pkt_num 5 pkt_tai 3}\n\n*" + bytes(3000))
    with pytest.raises(PFFFormatError, match="not JSON"):
        pff.index_file(path)


def test_random_bytes_with_valid_name_are_refused(tmp_path):
    path = tmp_path / name_for("img16")
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 10_000, "u1").tobytes())
    with pytest.raises(PFFFormatError, match=str(path)):
        pff.index_file(path)


def test_corruption_mid_file_names_the_byte_offset(tmp_path):
    images, headers, _ = synth("img16", 10)
    path = write(tmp_path, "img16", images, headers)
    data = bytearray(path.read_bytes())
    data[5 * 2540] = ord("#")
    path.write_bytes(bytes(data))
    with pytest.raises(PFFFormatError, match=f"byte {5 * 2540}"):
        pff.index_file(path, strict=True)
    index = pff.index_file(path)  # by default the frame is skipped, the byte recorded
    assert index.n_frames == 9 and index.skipped[0].offset == 5 * 2540


def test_bad_digit_in_header_falls_back_to_json_and_fails_clearly(tmp_path):
    images, headers, _ = synth("img16", 10)
    path = write(tmp_path, "img16", images, headers)
    data = bytearray(path.read_bytes())
    col = pff.PRODUCTS["img16"].layout.columns[("pkt_tai", 2)]
    data[3 * 2540 + col] = ord("x")
    path.write_bytes(bytes(data))
    index = pff.index_file(path, strict=True)
    with pytest.raises(PFFFormatError, match=f"byte {3 * 2540}"):
        pff.read_frames(path, index, 0, 10)
    with pytest.raises(pff.StrideMismatch, match=f"byte {3 * 2540}"):  # assumed: index exactly
        pff.read_frames(path, pff.assume_regular(path), 0, 10)
    assert pff.index_file(path).skipped[0].offset == 3 * 2540


def test_value_out_of_range_is_refused_not_wrapped(tmp_path):
    images, headers, _ = synth("img16", 4)
    path = write(tmp_path, "img16", images, headers)
    data = bytearray(path.read_bytes())
    col = pff.PRODUCTS["img16"].layout.columns[("pkt_num", 0)]
    data[2540 + col:2540 + col + 10] = b"     70000"
    path.write_bytes(bytes(data))
    with pytest.raises(PFFFormatError, match="pkt_num = 70000"):
        pff.read_frames(path, pff.index_file(path, strict=True), 0, 4)


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize("sep", [":", "-", "_"])
def test_start_time_parses_with_every_separator(sep):
    name = pff.parse_name(f"start_2024-07-25T04{sep}34{sep}46Z.dp_img16.bpp_2.module_3."
                          "seqno_12.pff")
    assert name.start == dt.datetime(2024, 7, 25, 4, 34, 46, tzinfo=dt.timezone.utc)
    assert (name.dp, name.bpp, name.module, name.seqno) == ("img16", 2, 3, 12)


def test_unknown_keys_are_kept_and_run_dir_parsed(tmp_path):
    name = pff.parse_name("start_2024-07-25T04_34_46Z.dp_ph256.bpp_2.module_254.seqno_0."
                          "foo_bar_baz.pff")
    assert name.extra == {"foo": "bar_baz"}
    run = pff.parse_run_dir("obs_Lick_dome.start_2024-07-25T04_34_46Z.runtype_sci-obs.pffd")
    assert (run.site, run.runtype) == ("Lick_dome", "sci-obs")
    assert run.start.hour == 4 and run.start.tzinfo is dt.timezone.utc


@pytest.mark.parametrize("name,match", [
    ("hk.pff", "housekeeping"),
    ("data.pff", "not a PFF data file name"),
    ("start_2024-07-25T04:34:46Z.dp_img32.bpp_2.module_1.seqno_0.pff", "unknown data product"),
    ("start_2024-07-25T04:34:46Z.dp_img16.bpp_1.module_1.seqno_0.pff", "bpp_1 disagrees"),
    ("start_2024-07-25T04:34:46Z.dp_img16.bpp_2.module_x.seqno_0.pff",
     r"part module_x is not module_<n> \(expected start_<time>Z\.dp_<dp>\.bpp_<n>\."
     r"module_<n>\.seqno_<n>\.pff\)"),
    ("start_2024-07-25T04:34:46Z.dp_img16.bpp_2.seqno_0.pff", "no part module_<n> "),
    ("start_2024-07-25T04.dp_img16.bpp_2.module_1.seqno_0.pff",
     "part start_2024-07-25T04 is not start_<YYYY-mm-ddTHH:MM:SS>Z"),
])
def test_bad_names_are_refused_with_the_reason(name, match):
    with pytest.raises(PFFNameError, match=match):
        pff.parse_name(name)
    assert pff.is_housekeeping(name) == (name == "hk.pff")


def test_a_bad_run_directory_name_says_which_part_and_the_pattern():
    with pytest.raises(PFFNameError, match=r"no part start_.*\(expected obs_<site>\.start_"):
        pff.parse_run_dir("obs_Lick.runtype_sci-obs.pffd")


def test_housekeeping_is_not_read_as_images(tmp_path):
    hk = synthetic_obs.write_housekeeping(tmp_path)
    assert pff.is_housekeeping(hk)
    with pytest.raises(PFFNameError, match="housekeeping"):
        pff.index_file(hk)


# ----------------------------------------------------------------------------- time


def times_of(path):
    index, frames = read_all(path)
    with pff.PFFReader(path) as reader:
        source = pff.decide_time_source(reader)
    t, flags = pff.frame_times(frames.headers, source)
    return source, t, flags, frames


def test_white_rabbit_time_is_exact_nanoseconds(tmp_path):
    images, headers, true = synth("img16", 3000)
    source, t, flags, frames = times_of(write(tmp_path, "img16", images, headers))
    assert source == pff.TIME_WHITE_RABBIT
    # the synthetic quabo clocks are within 32 ns of the true time, also across seconds
    assert np.abs(t - true).max() <= 32
    np.testing.assert_array_equal(t % 10**9, headers["pkt_nsec"][:, 0])
    assert not flags.any()


@pytest.mark.parametrize("d,expect_shift", [(0, 0), (1, -1), (1023, 1)])
def test_wr_second_from_host_second_and_tai_bits(d, expect_shift):
    tv_sec = np.array([1_721_882_092])
    headers = {"tv_sec": tv_sec, "pkt_tai": (tv_sec + 37 - d) % 1024,
               "pkt_nsec": np.array([5]), "tv_usec": np.array([0]), "pkt_num": np.array([0]),
               "quabo_num": np.array([0])}
    t, flags = pff.frame_times(headers, pff.TIME_WHITE_RABBIT)
    assert t[0] == (1_721_882_092 + expect_shift) * 10**9 + 5 and flags[0] == 0


def test_gnss_file_uses_host_clock_and_flags_it(tmp_path):
    images, headers, _ = synth("img16", 500, timing="gnss")
    source, t, flags, _ = times_of(write(tmp_path, "img16", images, headers))
    assert source == pff.TIME_HOST_CLOCK
    np.testing.assert_array_equal(
        t, headers["tv_sec"][:, 0] * 10**9 + headers["tv_usec"][:, 0] * 1000)
    assert (flags == pff.FLAG_HOST_CLOCK).all()


def test_missing_quabo_flags_and_takes_next_quabo_time(tmp_path):
    images, headers, _ = synth("img16", 20)
    for f in pff.MODULE_FIELDS:
        headers[f][4, 0] = 0
        headers[f][6, :3] = 0
        headers[f][9, :] = 0
    _, t, flags, frames = times_of(write(tmp_path, "img16", images, headers))
    assert flags[4] & pff.FLAG_MISSING_QUABO and flags[9] & pff.FLAG_MISSING_QUABO
    assert t[4] % 10**9 == headers["pkt_nsec"][4, 1]
    assert t[6] % 10**9 == headers["pkt_nsec"][6, 3]
    assert t[9] == pff.NAT and flags[9] == pff.FLAG_MISSING_QUABO
    assert not flags[10] & pff.FLAG_OUT_OF_ORDER  # NaT frames are skipped, not compared
    assert (flags[[0, 1, 2, 3, 5, 7, 8]] == 0).all()


def test_clamped_and_wide_nsec_flag_and_fall_back_to_host_clock(tmp_path):
    images, headers, _ = synth("img16", 20)
    headers["pkt_nsec"][3, 0] = pff.NSEC_CLAMPED
    headers["pkt_nsec"][5, 2] = 1_000_000_001  # a later quabo: flagged, time still WR
    _, t, flags, _ = times_of(write(tmp_path, "img16", images, headers))
    assert flags[3] == pff.FLAG_INVALID_NSEC | pff.FLAG_HOST_CLOCK
    assert t[3] == headers["tv_sec"][3, 0] * 10**9 + headers["tv_usec"][3, 0] * 1000
    assert flags[5] == pff.FLAG_INVALID_NSEC
    assert t[5] % 10**9 == headers["pkt_nsec"][5, 0]


def test_out_of_order_frame_is_flagged_also_across_blocks(tmp_path):
    images, headers, true = synth("ph256", 10)
    headers["pkt_nsec"][6] = (true[6] - 5_000_000) % 10**9
    _, t, flags, frames = times_of(write(tmp_path, "ph256", images, headers))
    assert np.flatnonzero(flags & pff.FLAG_OUT_OF_ORDER).tolist() == [6]
    _, later = pff.frame_times({k: v[6:] for k, v in frames.headers.items()},
                               pff.TIME_WHITE_RABBIT, previous_ns=int(t[5]))
    assert later[0] & pff.FLAG_OUT_OF_ORDER


# ----------------------------------------------------------------------------- CLI


def test_info_cli_reports_observation_and_bad_file(tmp_path, capsys):
    run = synthetic_obs.make_observation(tmp_path, frames_per_file=300,
                                         faults=synthetic_obs.FAULTS)
    assert pff.main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    assert "housekeeping (hk.pff)" in out and "empty (0 bytes)" in out
    assert "frames=300 partial_bytes_dropped=0 frames_walked=1" in out
    assert "partial_bytes_dropped=1270" in out and "source: white_rabbit" in out
    bad = tmp_path / name_for("img16", seqno=9)
    bad.write_bytes(b"garbage" * 1000)
    assert pff.main(["info", str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "Traceback" not in err[0]


@pytest.mark.parametrize("old,new", [(b"   7654321", b"   0654321"),  # leading zeros
                                     (b"   7654321", b"  7654321 ")])  # moved padding
def test_numbers_not_as_printf_writes_them_are_refused(tmp_path, old, new):
    images, headers, _ = synth("img16", 3)
    headers["pkt_nsec"][1, 2] = 7654321
    path = write(tmp_path, "img16", images, headers)
    data = path.read_bytes()
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, new))
    with pytest.raises(PFFFormatError, match="byte 2540"):
        pff.read_frames(path, pff.index_file(path, strict=True), 0, 3)


def test_a_lost_padding_byte_is_refused_not_read(tmp_path):
    images, headers, _ = synth("img8", 4)
    headers["pkt_num"][2, 1] = 5
    path = write(tmp_path, "img8", images, headers)
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"pkt_num":          5', b'"pkt_num":         5', 1))
    with pytest.raises(PFFFormatError, match="shorter than the fixed-width"):
        pff.index_file(path, strict=True)
