"""Step 2's ``panoseti_analysis`` method against an independent numpy implementation of
the PANOSETI analysis code's two calibrations, written here from their description
(../shared/ANALYSIS_L1.md: whole arrays in memory, on the time-sorted frames)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from panoseti_pipeline import pff
from panoseti_pipeline import synthetic as synthetic_obs
from panoseti_pipeline.cli import step1 as step1_pff_to_zarr
from panoseti_pipeline.cli import step2 as step2_dask_baseline

NAT = np.iinfo(np.int64).min


def write_config(path: Path, **baseline) -> Path:
    keys = {"compute_chunk_size": 160, "method": "panoseti_analysis", **baseline}
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in keys.items())
    path.write_text("[cluster]\nuse_dask = false\n[pff_to_zarr]\ntime_chunk = 128\n"
                    f"[baseline_subtract]\n{body}\n")
    return path


def make_l0(root: Path, dp: str, n: int, swap_every: int = 0, shift: dict | None = None,
            untimed: tuple[int, ...] = ()) -> Path:
    """A step-1 L0 store of one synthetic PFF file; with ``swap_every``, frames t and t+1
    are written in reverse for every t % swap_every == 0 (acquisition order is then not
    time order, as when a module's quabos interleave); ``shift``: {frame: ns} added to
    those frames' times; ``untimed``: module frames without any quabo (no time)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(11)
    spec = synthetic_obs.StreamSpec(dp=dp)
    times = int(synthetic_obs.DEFAULT_START.timestamp()) * 10**9 + np.arange(n) * 10**6
    for t, ns in (shift or {}).items():
        times[t] += ns
    headers = synthetic_obs.synth_headers(rng, spec, times, first_pkt=0)
    for t in untimed:
        for field in pff.MODULE_FIELDS:
            headers[field][t] = 0
    images = synthetic_obs.synth_images(rng, spec, n, 0)
    if dp.startswith("ph"):  # pulses well above the cut
        images[rng.random(images.shape) < 0.01] += 1500
    if dp == "ph256":  # quabo pedestals apart: one pooled baseline is what is tested
        images = (images + 50 * headers["quabo_num"][:, None, None]).astype("<i2")
    if dp == "ph1024":  # quadrants of different levels: the exchange shows
        images[:, :16, 16:] += 300
    written = np.arange(n)
    if swap_every:
        for t in range(0, n - 1, swap_every):
            written[[t, t + 1]] = written[[t + 1, t]]
    images = images[written]
    headers = {k: v[written] for k, v in headers.items()}
    path = root / synthetic_obs.file_name(spec, synthetic_obs.DEFAULT_START, 0)
    with open(path, "wb") as f:
        pff.write_frames(f, dp, images, headers)
    l0 = root / f"{dp}_L0.zarr"
    assert step1_pff_to_zarr.main([str(path), str(l0), str(write_config(root / "s1.toml")),
                                   "--quiet"]) == 0
    return l0


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("l0")
    return {"img16": make_l0(root / "img16", "img16", 900),
            "ph256": make_l0(root / "ph256", "ph256", 1200, swap_every=5),
            "ph1024": make_l0(root / "ph1024", "ph1024", 500, swap_every=9)}


# ----------------------------------------------------- their algorithm, whole arrays


def sorted_frames(l0: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images in time order, the L0 positions in that order): stable, NaT last."""
    g = zarr.open_group(str(l0), mode="r")
    t = g["unix_t_ns"][:]
    order = np.argsort(np.where(t == NAT, np.iinfo(np.int64).max, t), kind="stable")
    return g["images"][:][order], order


def swap_quadrants(a: np.ndarray) -> np.ndarray:
    """ph1024: upper-right and lower-left 16x16 quadrants exchanged (a copy)."""
    out = a.copy()
    out[..., :16, 16:], out[..., 16:, :16] = a[..., 16:, :16], a[..., :16, 16:]
    return out


def their_ph(images: np.ndarray, stride: int, offset: int, k: float):
    x = images.astype(np.float32)
    if x.shape[1] == 32:
        x = swap_quadrants(x)
    shifted = x[::stride] + np.float32(offset)
    pedestal = np.median(shifted, axis=0)
    sigma = np.std(shifted, axis=0)
    calibrated = (x + np.float32(offset)) - pedestal
    out = np.where(calibrated > k * sigma, calibrated, np.float32(np.nan))
    hot = pedestal > 3.0 * float(pedestal.mean())
    return out, hot, pedestal == 0, calibrated, k * sigma


def their_img(images: np.ndarray, stride: int, block: int, adc_to_pe: float):
    x = images.astype(np.int32)
    sub = x[::stride]
    n, h, w = sub.shape
    block_medians = np.median(sub.reshape(n, h // block, block, w // block, block)
                              .transpose(0, 1, 3, 2, 4).reshape(n, h // block, w // block, -1),
                              axis=-1)
    up = np.repeat(np.repeat(np.median(block_medians, axis=0), block, 0), block, 1)
    spatial = x - up
    supermedian = np.median(spatial[::stride], axis=0)
    out = ((spatial - supermedian) / adc_to_pe).astype(np.float32)
    return out, up > 3.0 * float(up.mean()), up == 0


# --------------------------------------------------------------------------- tests


def run(l0: Path, tmp_path: Path, **keys) -> zarr.Group:
    l1 = tmp_path / "L1.zarr"
    cfg = write_config(tmp_path / "c.toml", **keys)
    assert step2_dask_baseline.main([str(l0), str(l1), "--config", str(cfg), "--quiet"]) == 0
    return zarr.open_group(str(l1), mode="r")


@pytest.mark.parametrize("dp", ["ph256", "ph1024"])
def test_ph_calibration_equals_theirs(stores, tmp_path, dp):
    x, order = sorted_frames(stores[dp])
    assert not np.array_equal(order, np.arange(len(order)))  # the sort matters here
    g = run(stores[dp], tmp_path, frame_stride=20)
    want, hot, dead, calibrated, cut = their_ph(x, 20, 800, 5.0)
    assert np.array_equal(g["l0_frame"][:], order)  # L1 is in time order
    got = g["images"][:]
    assert got.dtype == np.float32
    same_nan = np.isnan(got) == np.isnan(want)
    # a value exactly at the cut may fall either side of it (their std is float32)
    cut = np.broadcast_to(cut, calibrated.shape)
    assert np.allclose(calibrated[~same_nan], cut[~same_nan], rtol=1e-5, atol=0)
    both = ~np.isnan(got) & ~np.isnan(want)
    assert both.sum() > 1000  # pulses
    assert np.array_equal(got[both], want[both])
    assert np.array_equal(g["hot_pixel_mask"][:], hot.astype(np.uint8))
    assert np.array_equal(g["dead_pixel_mask"][:], dead.astype(np.uint8))
    assert {"pipeline_hot_pixel_mask", "pipeline_dead_pixel_mask", "baseline_std"} <= set(
        g.array_keys())
    assert g.attrs["calibration"] == {"method": "panoseti_analysis", "parameters": {
        "kind": "ph", "sigma_threshold": 5.0, "baseline_offset": 800, "frame_stride": 20}}
    nan = g.attrs["summary"]["nan_values"]
    assert nan["below_threshold"] == np.isnan(got).sum() > 0  # their cut, counted
    # L1 + baseline gives back the L0 (in the L1's pixel order) wherever L1 is a value
    l0 = zarr.open_group(str(stores[dp]), mode="r")["images"][:][order]
    base = g["baseline"][:]
    if dp == "ph256":  # one baseline for all quabos: four equal images
        assert all(np.array_equal(base[0], base[q]) for q in range(4))
        base = base[0]
    raw = swap_quadrants(l0) if dp == "ph1024" else l0
    finite = np.isfinite(got)
    assert np.array_equal((got + base)[finite], raw.astype(np.float32)[finite])


def test_img_calibration_equals_theirs(stores, tmp_path):
    x, order = sorted_frames(stores["img16"])
    g = run(stores["img16"], tmp_path, frame_stride=20)
    want, hot, dead = their_img(x, 20, 8, 1.5)
    got = g["images"][:]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=2.0**-23, atol=0)
    assert np.array_equal(g["hot_pixel_mask"][:], hot.astype(np.uint8))
    assert np.array_equal(g["dead_pixel_mask"][:], dead.astype(np.uint8))
    assert {"kind": "img", "frame_stride": 20, "block_size": 8, "adc_to_pe": 1.5}.items() <= (
        g.attrs["calibration"]["parameters"].items())
    assert g["images"].attrs["units"] == "photoelectrons"


def test_img_defaults_and_other_block(stores, tmp_path):
    """Their defaults (frame_stride 200) and a block of 4 pixels."""
    x, order = sorted_frames(stores["img16"])
    g = run(stores["img16"], tmp_path, block_size=4)
    want, hot, _ = their_img(x, 200, 4, 1.5)
    np.testing.assert_allclose(g["images"][:], want, rtol=2.0**-23, atol=0)
    assert np.array_equal(g["hot_pixel_mask"][:], hot.astype(np.uint8))


# ----------------------------------------------------------- time order, timestamp_qc

QC_KEYS = {"status", "monotonic", "n_frames", "n_nonmonotonic", "n_duplicates", "max_gap_ns",
           "n_gaps_over_threshold", "gap_threshold_ns", "t_start_ns", "t_end_ns"}


def assert_time_order(l0: Path, g: zarr.Group) -> np.ndarray:
    """L1 = the L0 frames stably sorted by unix_t_ns (NaT last); l0_frame gives the L0
    order back for every per-frame array. Returns l0_frame."""
    g0 = zarr.open_group(str(l0), mode="r")
    _, order = sorted_frames(l0)
    l0_frame = g["l0_frame"][:]
    assert l0_frame.dtype == np.int64
    assert np.array_equal(l0_frame, order)
    t = g["unix_t_ns"][:]
    timed = t[t != NAT]
    assert (np.diff(timed) >= 0).all()
    assert (t[timed.size:] == NAT).all()  # frames without a time last
    back = np.argsort(l0_frame)
    for name, array in g0.arrays():
        if name != "images" and array.shape[:1] == (len(order),):
            assert np.array_equal(g[name][:][back], array[:]), name
    assert set(g.attrs["timestamp_qc"]) == QC_KEYS
    l0_qc = g0.attrs["timestamp_qc"]  # the L0 records its own, in acquisition order
    assert set(l0_qc) == QC_KEYS and l0_qc["status"] != "repaired"
    assert l0_qc["monotonic"] == bool((np.diff(g0["unix_t_ns"][:][
        g0["unix_t_ns"][:] != NAT]) >= 0).all())
    assert l0_qc["n_nonmonotonic"] == g.attrs["timestamp_qc"]["n_nonmonotonic"]
    return l0_frame


def test_interleaved_ph256_is_repaired_and_reversible(stores, tmp_path):
    g = run(stores["ph256"], tmp_path, method="median")
    l0_frame = assert_time_order(stores["ph256"], g)
    assert not np.array_equal(l0_frame, np.arange(l0_frame.size))
    qc = g.attrs["timestamp_qc"]
    assert qc["status"] == "repaired" and qc["monotonic"] is True
    assert qc["n_nonmonotonic"] == 240  # one per swapped pair
    assert qc["n_frames"] == 1200
    assert qc["t_start_ns"] == g["unix_t_ns"][0] and qc["t_end_ns"] == g["unix_t_ns"][-1]
    l0 = zarr.open_group(str(stores["ph256"]), mode="r")
    base = g["baseline"][:][g["quabo_num"][:].astype(int)]  # per quabo, as ever
    assert np.array_equal(g["images"][:] + base, l0["images"][:][l0_frame].astype(np.float32))


def test_clean_img16_is_clean_and_untouched(stores, tmp_path):
    g = run(stores["img16"], tmp_path, method="mean")
    l0_frame = assert_time_order(stores["img16"], g)
    assert np.array_equal(l0_frame, np.arange(900))
    qc = g.attrs["timestamp_qc"]
    assert qc["status"] == "clean" and qc["n_nonmonotonic"] == qc["n_duplicates"] == 0
    assert qc["gap_threshold_ns"] == 4 * 10**6  # 4 cadences (the median interval here)
    assert g.attrs["time_order"]["reordered"] is False


def test_frames_without_time_go_last_in_order(tmp_path):
    l0 = make_l0(tmp_path / "l0", "img16", 300, swap_every=50, untimed=(7, 100, 101))
    g = run(l0, tmp_path, method="mean")
    l0_frame = assert_time_order(l0, g)
    assert list(l0_frame[-3:]) == [7, 100, 101]
    assert (g["frame_flags"][-3:] & pff.FLAG_MISSING_QUABO).all()  # flagged
    assert g.attrs["time_order"]["frames_without_time"] == 3
    assert np.isnan(g["images"][-3:]).all()  # no quabo: nothing measured


def test_a_backward_jump_of_2_s_is_suspect_and_refused(tmp_path, capsys):
    l0 = make_l0(tmp_path / "l0", "ph256", 400, shift={200: -2 * 10**9})
    l1 = tmp_path / "refused.zarr"
    cfg = write_config(tmp_path / "c.toml", method="mean")
    assert step2_dask_baseline.main([str(l0), str(l1), "--config", str(cfg), "--quiet"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(l0) in err[0] and "suspect" in err[0]
    assert not l1.exists()
    g = run(l0, tmp_path, method="mean", fail_on_suspect=False)
    assert g.attrs["timestamp_qc"]["status"] == "suspect"
    assert_time_order(l0, g)


# ----------------------------------------------------------- the team's L1 layout

STEP_KEYS = {"step_name", "step_version", "params", "recipe_name", "recipe_hash",
             "input_checksums", "output_checksum", "timestamp_utc", "software",
             "nextflow_lineage_id"}  # their ProcessingStep's fields (no others allowed)


@pytest.mark.parametrize("dp", ["img16", "ph256"])
def test_team_layout_names_and_attributes(stores, tmp_path, dp):
    from panoseti_pipeline.store.analysis_spec import data_checksum

    g = run(stores[dp], tmp_path, l1_layout="panoseti_analysis", frame_stride=20)
    g0 = zarr.open_group(str(stores[dp]), mode="r")
    main = "pedestal_subtracted" if dp == "ph256" else "median_subtracted"
    names = set(g.array_keys())
    assert main in names and "images" not in names
    assert g[main].dtype == np.float32 and g[main].shape == g0["images"].shape
    assert set(g0.array_keys()) - {"images"} <= names  # every L0 header and time array
    for mask in ("hot_pixel_mask", "dead_pixel_mask"):
        assert g[mask].dtype == np.uint8 and g[mask].shape == g0["images"].shape[1:]
    a = g.attrs
    assert a["data_level"] == "L1"
    assert a["panoseti_analysis_storage_version"] == "2.0"
    assert a["panoseti_pff_zarr_version"] == g0.attrs["panoseti_pff_zarr_version"]
    for key in ("data_product", "module", "bytes_per_pixel", "total_frames", "frame_config",
                "source_pff_files"):
        assert a[key] == g0.attrs[key], key
    kind = "img" if dp == "img16" else "ph"
    assert a["calibration"]["kind"] == kind and a["calibration"]["frame_stride"] == 20
    assert set(a["timestamp_qc"]) == QC_KEYS
    history = a["processing_history"]
    assert [h["step_name"] for h in history] == ["convert", f"calibrate_{kind}"]
    for h in history:
        assert set(h) <= STEP_KEYS
        assert all(isinstance(v, str) for v in h["software"].values())
        assert dt.datetime.fromisoformat(h["timestamp_utc"]).tzinfo is not None  # ISO 8601
    l0_sum, l1_sum = data_checksum(stores[dp]), data_checksum(tmp_path / "L1.zarr")
    assert l0_sum.startswith("sha256:") and len(l0_sum) == 7 + 64
    assert history[0]["output_checksum"] == l0_sum == history[1]["input_checksums"][0]
    assert history[1]["output_checksum"] == l1_sum  # the attributes do not change it
    assert history[1]["params"] == a["calibration"]
