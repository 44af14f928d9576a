"""Step 2 (L0 -> L1): every method against an independent numpy float64 reference.

The L0 stores are real step-1 output of PFF files written byte-exact; the references
below compute each baseline from the L0 arrays with plain numpy (masked NaN arrays,
``nanmean``/``nanmedian``/``nanstd``), not with any code of ``panoseti_pipeline.step2``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from panoseti_pipeline import pff, step2
from panoseti_pipeline import synthetic as synthetic_obs
from panoseti_pipeline.cli import step1 as step1_pff_to_zarr
from panoseti_pipeline.cli import step2 as step2_dask_baseline
from panoseti_pipeline.config import load_config

N_FRAMES = 600
METHODS = ("clipped_mean", "mean", "median", "image_median", "ph_pedestal")
#: the method of a config that names none
SHIPPED = load_config(None).baseline_subtract.method
#: quadrant of quabo q in a module image (PFF_FORMAT.md §5), written out independently
QUADRANTS = {0: (slice(0, 16), slice(0, 16)), 1: (slice(0, 16), slice(16, 32)),
             2: (slice(16, 32), slice(16, 32)), 3: (slice(16, 32), slice(0, 16))}


# --------------------------------------------------------------------------- inputs


def write_config(path: Path, **baseline) -> Path:
    keys = {"compute_chunk_size": 160, "baseline_window": 100, **baseline}
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in keys.items())
    path.write_text("[cluster]\nuse_dask = false\n[pff_to_zarr]\ntime_chunk = 128\n"
                    f"[baseline_subtract]\n{body}\n")
    return path


def make_l0(root: Path, dp: str, n: int = N_FRAMES, missing: tuple[int, ...] = ()) -> Path:
    """A step-1 L0 store of one synthetic PFF file.

    Module products get quabo 0 dropped (zero sub-header and quadrant, as the DAQ writes
    it) in frames ``missing``; ph256 quabos get pedestals 200 ADC apart, so one shared
    baseline would be far off.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    spec = synthetic_obs.StreamSpec(dp=dp)
    times = int(synthetic_obs.DEFAULT_START.timestamp()) * 10**9 + np.arange(n) * 10**6
    headers = synthetic_obs.synth_headers(rng, spec, times, first_pkt=0)
    images = synthetic_obs.synth_images(rng, spec, n, 0)
    if dp == "ph256":
        images = (images + 200 * headers["quabo_num"][:, None, None]).astype("<i2")
    for t in missing:
        for field in pff.MODULE_FIELDS:
            headers[field][t, 0] = 0
        images[t][QUADRANTS[0]] = 0
    path = root / synthetic_obs.file_name(spec, synthetic_obs.DEFAULT_START, 0)
    with open(path, "wb") as f:
        pff.write_frames(f, dp, images, headers)
    l0 = root / f"{dp}_L0.zarr"
    cfg = write_config(root / "step1.toml")
    assert step1_pff_to_zarr.main([str(path), str(l0), str(cfg), "--quiet"]) == 0
    return l0


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("l0")
    return {"img16": make_l0(root / "img16", "img16", missing=(3, 57, 400)),
            "ph256": make_l0(root / "ph256", "ph256"),
            "img8": make_l0(root / "img8", "img8", n=300),
            "ph1024": make_l0(root / "ph1024", "ph1024", n=300, missing=(5,))}


def run_step2(l0: Path, l1: Path, cfg: Path, *extra: str) -> int:
    return step2_dask_baseline.main([str(l0), str(l1), "--config", str(cfg), "--quiet",
                                     *extra])


# --------------------------------------------------------------------------- reference


def clipped_mean(masked: np.ndarray) -> np.ndarray:
    """Per element (axis 0, NaN: no value), the mean of the values within 3.5 sigma of the
    median, sigma = max(min(median - Q1, Q3 - median) / 0.6745, 1), Q1 and Q3 the values
    of rank (n-1)//4 and n-1-(n-1)//4 of the n values (0 = smallest)."""
    n = np.isfinite(masked).sum(axis=0)
    ordered = np.sort(masked, axis=0)  # NaN last

    def rank(r: np.ndarray) -> np.ndarray:
        return np.take_along_axis(ordered, np.clip(r, 0, None)[None], axis=0)[0]

    median = (rank((n - 1) // 2) + rank(n // 2)) / 2
    quarter = (n - 1) // 4
    half = np.minimum(median - rank(quarter), rank(n - 1 - quarter) - median)
    sigma = np.maximum(half / 0.6745, 1.0)
    with np.errstate(invalid="ignore"):
        kept = np.where(np.abs(masked - median) <= 3.5 * sigma, masked, np.nan)
    return np.nanmean(kept, axis=0)


def quantize(base: np.ndarray, quantum: float) -> np.ndarray:
    """The baseline rounded to the nearest multiple of quantum (ties to even; 0: as is)."""
    return np.round(base / quantum) * quantum if quantum else base


def reference(l0: Path, method: str, window: int = 100, frame_step: int = 10,
              adc_to_pe: float = 1.5, sigma: float = 3.0, quantum: float = 0.125
              ) -> tuple[np.ndarray, np.ndarray]:
    """(expected L1 images, expected baseline (groups, y, x)) in float64; the baseline
    rounded to ``quantum`` (the shipped default: 1/8 ADC count)."""
    g = zarr.open_group(str(l0), mode="r")
    x = g["images"][:].astype(np.float64)
    n = len(x)
    flags = g["frame_flags"][:]
    ph256 = g.attrs["data_product"] == "ph256"
    t = np.arange(n)
    if ph256:
        qn = g["quabo_num"][:].astype(int)
        valid = np.stack([qn == q for q in range(4)], axis=1)[:, :, None, None]
        valid = np.broadcast_to(valid, (n, 4, *x.shape[1:]))
        frame_group = qn
    else:
        tv_sec = np.stack([g[f"quabo_{q}_tv_sec"][:] for q in range(4)], axis=1)
        valid = np.ones((n, 1, *x.shape[1:]), bool)
        for q, (ys, xs) in QUADRANTS.items():
            gone = ((flags & 1) != 0) & (tv_sec[:, q] == 0)
            valid[gone, 0, ys, xs] = False
        frame_group = np.zeros(n, int)
        x = np.where(valid[:, 0], x, np.nan)  # a missing quabo's quadrant: NaN in L1
    chosen = np.ones(valid.shape[:2], bool)
    window_method = method in ("mean", "median", "clipped_mean")
    if window_method:
        if ph256:  # the first `window` frames of each quabo
            chosen[:] = False
            for q in range(4):
                chosen[np.flatnonzero(qn == q)[:window], q] = True
        else:
            chosen[window:] = False
    elif method == "image_median":
        chosen[t % frame_step != 0] = False
    masked = np.where(valid & chosen[:, :, None, None], x[:, None], np.nan)
    if window_method:
        statistic = {"mean": lambda a: np.nanmean(a, axis=0), "clipped_mean": clipped_mean,
                     "median": lambda a: np.nanmedian(a, axis=0)}[method]
        base = quantize(statistic(masked), quantum)
        return x - base[frame_group], base
    if method == "image_median":
        s = masked[chosen.any(axis=1)]
        k, gr, h, w = s.shape
        blocks = np.median(s.reshape(k, gr, h // 8, 8, w // 8, 8), axis=(3, 5))
        up = np.kron(np.nanmedian(blocks, axis=0), np.ones((8, 8)))
        base = quantize(up + np.nanmedian(s - up, axis=0), quantum)
        return (x - base[frame_group]) / adc_to_pe, base
    pedestal = quantize(np.nanmedian(masked, axis=0), quantum)
    std = np.nanstd(masked, axis=0)
    d = x - pedestal[frame_group]
    return np.where(d > sigma * std[frame_group], d, np.nan), pedestal


def assert_float32_close(got: np.ndarray, want: np.ndarray, scale: float) -> None:
    """Equal to float32 rounding: a few ulps of the largest magnitude involved."""
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=4 * 2.0**-24, atol=4 * 2.0**-24 * scale,
                               equal_nan=True)
    assert np.array_equal(np.isnan(got), np.isnan(want))


def assert_inverts_to_l0(l0: Path, l1: Path, adc_to_pe: float = 1.5) -> None:
    """L0 = L1 + baseline, bit for bit in float32, wherever L1 is not NaN (image_median,
    which divides by adc_to_pe: L0 = rint(L1 * adc_to_pe + baseline))."""
    g0, g1 = zarr.open_group(str(l0), mode="r"), zarr.open_group(str(l1), mode="r")
    x, images, base = g0["images"][:], g1["images"][:], g1["baseline"][:]
    base = base[g0["quabo_num"][:].astype(int)] if base.ndim == 3 else base
    finite = np.isfinite(images)
    assert finite.sum() >= 100  # values there to check (ph_pedestal: above its cut)
    if g1.attrs["baseline_method"] == "image_median":
        back = np.rint(images * np.float32(adc_to_pe) + base)
    else:
        back = images + base  # float32 + float32: no rounding if the rule holds
        assert back.dtype == np.float32
    assert np.array_equal(back[finite], x[finite].astype(np.float32))
    quantum = g1.attrs["precision"]["baseline_quantum"]
    assert np.array_equal(base, quantize(base, quantum))  # a multiple of the quantum


# --------------------------------------------------------------------------- methods


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dp", ["img16", "ph256"])
def test_method_matches_float64_reference(stores, tmp_path, dp, method):
    l1 = tmp_path / "L1.zarr"
    assert run_step2(stores[dp], l1, write_config(tmp_path / "c.toml", method=method)) == 0
    want, want_base = reference(stores[dp], method)
    g = zarr.open_group(str(l1), mode="r")
    base = g["baseline"][:]
    assert g["baseline"].metadata.dimension_names == (
        ("quabo", "y", "x") if dp == "ph256" else ("y", "x"))
    assert base.shape == ((4, 16, 16) if dp == "ph256" else (32, 32))
    scale = float(np.nanmax(np.abs(want_base))) + 1
    assert_float32_close(base, want_base if dp == "ph256" else want_base[0], scale)
    assert_float32_close(g["images"][:], want, scale)
    assert g.attrs["baseline_method"] == method
    assert_inverts_to_l0(stores[dp], l1)
    if method == "ph_pedestal":
        assert g["baseline_std"].shape == base.shape
        assert 0 < g.attrs["report"]["nan_values"] < want.size


@pytest.mark.parametrize("dp", ["img8", "ph1024"])
def test_other_products_window_methods(stores, tmp_path, dp):
    for method in ("mean", "median", "clipped_mean"):
        l1 = tmp_path / f"{method}.zarr"
        assert run_step2(stores[dp], l1, write_config(tmp_path / "c.toml", method=method)) == 0
        want, want_base = reference(stores[dp], method)
        got = zarr.open_group(str(l1), mode="r")["images"][:]
        assert_float32_close(got, want, float(np.nanmax(np.abs(want_base))) + 1)
        assert_inverts_to_l0(stores[dp], l1)


def test_exact_float_baseline_with_quantum_zero(stores, tmp_path):
    """baseline_quantum = 0: the float mean itself is subtracted (not a multiple of a step)."""
    l1 = tmp_path / "L1.zarr"
    cfg = write_config(tmp_path / "c.toml", baseline_quantum=0, method="mean")
    assert run_step2(stores["img16"], l1, cfg) == 0
    want, want_base = reference(stores["img16"], "mean", quantum=0)
    g = zarr.open_group(str(l1), mode="r")
    scale = float(np.nanmax(np.abs(want_base))) + 1
    assert_float32_close(g["baseline"][:], want_base[0], scale)
    assert_float32_close(g["images"][:], want, scale)
    assert not np.array_equal(want_base, quantize(want_base, 1 / 8))  # the cases differ
    assert g.attrs["precision"]["baseline_quantum"] == 0


def test_ph256_baseline_is_per_quabo(stores, tmp_path):
    l1 = tmp_path / "L1.zarr"
    assert run_step2(stores["ph256"], l1, write_config(tmp_path / "c.toml")) == 0
    g = zarr.open_group(str(l1), mode="r")
    level = np.nanmean(g["baseline"][:], axis=(1, 2))
    np.testing.assert_allclose(level, [0, 200, 400, 600], atol=15)  # pedestals as written
    per_quabo = g.attrs["baseline_frames"]["per_quabo"]
    assert [q["count"] for q in per_quabo] == [100] * 4  # first 100 frames of each quabo
    assert g.attrs["baseline_frames"]["frames_used"] == 400  # a ph256 frame is one quabo's
    qn = zarr.open_group(str(stores["ph256"]), mode="r")["quabo_num"][:]
    assert [q["last"] for q in per_quabo] == [int(np.flatnonzero(qn == q)[99])
                                              for q in range(4)]


def test_l1_images_are_float32_never_wrapped(stores, tmp_path):
    """The original pipeline cast L0 - baseline back to uint16: -3 became 65533."""
    l1 = tmp_path / "L1.zarr"
    assert run_step2(stores["img16"], l1, write_config(tmp_path / "c.toml")) == 0
    images = zarr.open_group(str(l1), mode="r")["images"][:]
    l0 = zarr.open_group(str(stores["img16"]), mode="r")["images"][:]
    assert images.dtype == np.float32
    assert (images < 0).sum() > images.size // 4  # noise around the baseline
    assert np.nanmax(images) < l0.max()  # NaN: the missing quabo's quadrant
    want, _ = reference(stores["img16"], SHIPPED)
    assert_float32_close(images, want, 5000)


def test_missing_quabo_frames_do_not_enter_the_baseline(stores, tmp_path):
    l1 = tmp_path / "L1.zarr"
    cfg = write_config(tmp_path / "c.toml", baseline_window=500, method="mean")
    assert run_step2(stores["img16"], l1, cfg) == 0
    g = zarr.open_group(str(l1), mode="r")
    frames = g.attrs["baseline_frames"]["per_quabo"]
    assert frames[0]["excluded_frames"] == [3, 57, 400]
    assert frames[0]["excluded_missing_quabo"] == 3
    assert [q["count"] for q in frames] == [497, 500, 500, 500]
    assert g.attrs["baseline_frames"]["frames_used"] == 500  # each in some quadrant
    assert (frames[0]["first"], frames[0]["last"]) == (0, 499)
    l0 = zarr.open_group(str(stores["img16"]), mode="r")["images"][:500].astype(float)
    keep = np.setdiff1d(np.arange(500), [3, 57, 400])
    ys, xs = QUADRANTS[0]
    np.testing.assert_allclose(g["baseline"][ys, xs],
                               quantize(l0[keep][:, ys, xs].mean(axis=0), 1 / 8), rtol=1e-6)
    np.testing.assert_allclose(g["baseline"][16:, :], quantize(l0[:, 16:, :].mean(axis=0), 1 / 8),
                               rtol=1e-6)
    naive = l0[:, ys, xs].mean(axis=0)  # the zeros pull it down: a test that means it
    assert (g["baseline"][ys, xs] - naive > 0.1).all()


def test_window_larger_than_the_data_uses_all_frames(stores, tmp_path, capsys):
    l1 = tmp_path / "L1.zarr"
    cfg = write_config(tmp_path / "c.toml")
    assert step2_dask_baseline.main([str(stores["ph1024"]), str(l1), "--config", str(cfg),
                                     "--baseline-window", "100000"]) == 0
    assert "is more than the frames there are" in capsys.readouterr().err
    g = zarr.open_group(str(l1), mode="r")
    frames = g.attrs["baseline_frames"]
    assert frames["window_truncated"] is True and frames["window_requested"] == 100000
    assert g.attrs["baseline_window"] == 100000
    want, want_base = reference(stores["ph1024"], SHIPPED, window=300)
    assert_float32_close(g["baseline"][:], want_base[0], 1000)


# --------------------------------------------------------------------------- transients

#: the generator's flash: +150 ADC in every pixel of frames 150-154 (synth_images)
FLASH = range(150, 155)
#: |L1 residual| of quiet frames that the shipped method stays within, flash or not
#: (measured: +0.04 ADC with the flash in a 200-frame window, +0.07 for a clean 100-frame
#: window; "mean": -3.75 and +0.01)
QUIET_TOLERANCE = 0.15


def quiet_residual(l1: Path) -> float:
    """Mean L1 residual of the frames after the baseline window (no flash, all pixels)."""
    return float(np.nanmean(zarr.open_group(str(l1), mode="r")["images"][300:]))


def test_shipped_method_is_not_biased_by_a_flash_in_its_window(stores, tmp_path, capsys):
    """The flash falls in a 200-frame window: "mean" offsets every quiet frame by about
    -150 * 5 / 200 ADC, the shipped method stays near zero and keeps L0 = L1 + baseline;
    the summary warns of the flash's frames, once, naming them."""
    got = {}
    for method in ("mean", SHIPPED):
        l1 = tmp_path / f"{method}.zarr"
        cfg = write_config(tmp_path / f"{method}.toml", baseline_window=200,
                           **({"method": method} if method == "mean" else {}))
        assert step2_dask_baseline.main([str(stores["img16"]), str(l1), "--config",
                                         str(cfg)]) == 0
        got[method] = quiet_residual(l1)
        g = zarr.open_group(str(l1), mode="r")
        assert g.attrs["baseline_method"] == method
        check = g.attrs["baseline_frames"]["window_check"]
        assert check["outlying_l0_frames"] == list(FLASH) and check["frames"] == 200
        (warning,) = g.attrs["summary"]["warnings"]
        assert "5 outlying frame(s) (L0 frames 150, 151, 152, 153, 154)" in warning
        assert "flagged" not in warning  # its missing-quabo frames are left out anyway
        assert f"warning: {warning}" in capsys.readouterr().err
        assert_inverts_to_l0(stores["img16"], l1)
    assert SHIPPED == "clipped_mean"
    assert got["mean"] < -3.5  # 750 / 200 (quadrant 0: 750 / 197, frames 3 and 57 out)
    assert abs(got[SHIPPED]) < QUIET_TOLERANCE


def test_clean_window_gives_no_warning(stores, tmp_path):
    """The first 100 frames hold no flash (and two missing-quabo frames, which cannot
    bias the baseline): no warning, and the shipped baseline is close to the mean."""
    l1 = tmp_path / "L1.zarr"
    assert run_step2(stores["img16"], l1, write_config(tmp_path / "c.toml")) == 0
    g = zarr.open_group(str(l1), mode="r")
    check = g.attrs["baseline_frames"]["window_check"]
    assert check["outlying_frames"] == 0 and check["warning"] is None
    assert check["frames_per_flag"]["missing_quabo"] == 2  # frames 3 and 57
    assert g.attrs["summary"]["warnings"] == []
    assert abs(quiet_residual(l1)) < QUIET_TOLERANCE


def test_flagged_frames_in_the_window_are_warned(tmp_path):
    """A frame whose time jumps back 2 s (flagged out_of_order by step 1) in the window."""
    spec = synthetic_obs.StreamSpec(dp="img16", frames_per_file=300, files=1,
                                    faults=frozenset({"out_of_order"}))
    (pff_file,) = synthetic_obs.write_stream(tmp_path, spec)
    l0, l1 = tmp_path / "L0.zarr", tmp_path / "L1.zarr"
    cfg = write_config(tmp_path / "c.toml", fail_on_suspect=False)
    assert step1_pff_to_zarr.main([str(pff_file), str(l0), str(cfg), "--quiet"]) == 0
    assert run_step2(l0, l1, cfg) == 0
    flags = zarr.open_group(str(l0), mode="r")["frame_flags"][:100]
    late = int(np.count_nonzero(flags & pff.FLAG_OUT_OF_ORDER))
    assert late >= 1
    (warning,) = zarr.open_group(str(l1), mode="r").attrs["summary"]["warnings"]
    assert f"holds {late} flagged frame(s) (out_of_order {late})" in warning


def test_a_quabo_that_rarely_fires_leaves_chunks_without_window_frames(tmp_path):
    """ph256 whose quabo 3 fires only in the last 30 of 1000 frames: the chunks between
    the other quabos' windows and those frames feed no baseline, and the window check
    still counts every window frame."""
    n = 1000
    rng = np.random.default_rng(5)
    spec = synthetic_obs.StreamSpec(dp="ph256")
    times = int(synthetic_obs.DEFAULT_START.timestamp()) * 10**9 + np.arange(n) * 10**6
    headers = synthetic_obs.synth_headers(rng, spec, times, first_pkt=0)
    headers["quabo_num"] = np.where(np.arange(n) < n - 30, rng.integers(0, 3, n), 3)
    path = tmp_path / synthetic_obs.file_name(spec, synthetic_obs.DEFAULT_START, 0)
    with open(path, "wb") as f:
        pff.write_frames(f, "ph256", synthetic_obs.synth_images(rng, spec, n, 0), headers)
    l0, l1 = tmp_path / "L0.zarr", tmp_path / "L1.zarr"
    cfg = write_config(tmp_path / "c.toml")
    assert step1_pff_to_zarr.main([str(path), str(l0), str(cfg), "--quiet"]) == 0
    assert run_step2(l0, l1, cfg) == 0
    frames = zarr.open_group(str(l1), mode="r").attrs["baseline_frames"]
    assert [q["count"] for q in frames["per_quabo"]] == [100, 100, 100, 30]
    last = max(q["last"] for q in frames["per_quabo"][:3])
    assert (last // 160 + 2) * 160 < n - 30  # a whole chunk of 160 frames between
    assert frames["window_check"]["frames"] == 330


def test_run_summary_names_the_product_with_the_warning(stores, tmp_path):
    """run.sh's summary and run record take the warnings of the L1 stores they list."""
    from panoseti_pipeline.driver import record

    flash, clean = tmp_path / "flash.zarr", tmp_path / "clean.zarr"
    assert run_step2(stores["img16"], flash,
                     write_config(tmp_path / "f.toml", baseline_window=200)) == 0
    assert run_step2(stores["img16"], clean, write_config(tmp_path / "c.toml")) == 0
    state = {"steps": [2], "jobs": [
        {"name": name, "l0": "", "l1": str(path), "action": "run", "steps": {}}
        for name, path in (("night_a", flash), ("night_b", clean))]}
    for i in range(2):
        record.record_step(state, i, 2, "ok")
    (warning,) = zarr.open_group(str(flash), mode="r").attrs["summary"]["warnings"]
    assert record.warning_lines(state) == [f"warning: 1. night_a: {warning}"]


# --------------------------------------------------------------------------- layout


@pytest.mark.parametrize("chunk", [128, 160])  # = L0 chunk: the same files; else values
def test_per_frame_arrays_carried_unchanged(stores, tmp_path, chunk):
    l1 = tmp_path / "L1.zarr"
    cfg = write_config(tmp_path / "c.toml", compute_chunk_size=chunk,
                       shuffle="bit")  # the L0's codecs (step 1's default shuffle)
    assert run_step2(stores["img16"], l1, cfg) == 0
    src = zarr.open_group(str(stores["img16"]), mode="r")
    dst = zarr.open_group(str(l1), mode="r")
    names = ["time", "unix_t_ns", "frame_flags",
             *(f"quabo_{q}_{f}" for q in range(4) for f in pff.MODULE_FIELDS)]
    for name in names:
        a, b = src[name], dst[name]
        assert b.dtype == a.dtype and b.attrs.asdict() == a.attrs.asdict()
        assert b.metadata.dimension_names == a.metadata.dimension_names
        assert b.fill_value == a.fill_value or np.isnan(a.fill_value)
        assert np.array_equal(b[:], a[:]), name
        assert b.chunks[0] == chunk and b.shards[0] == 64 * chunk
        # chunked and encoded as in the L0: byte-identical files
        assert (chunk == 128) == (file_digests(l1 / name) == file_digests(
            stores["img16"] / name)), name
    assert dst["images"].chunks == (chunk, 32, 32)


def file_digests(array_dir: Path) -> dict[str, str]:
    """sha256 of every chunk (or shard) file of an array."""
    return {str(p.relative_to(array_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((array_dir / "c").rglob("*")) if p.is_file()}


def test_attributes_record_provenance(stores, tmp_path):
    l1 = tmp_path / "L1.zarr"
    assert run_step2(stores["img16"], l1, write_config(tmp_path / "c.toml",
                                                       method="image_median")) == 0
    attrs = zarr.open_group(str(l1), mode="r").attrs.asdict()
    l0_attrs = zarr.open_group(str(stores["img16"]), mode="r").attrs.asdict()
    assert attrs["processing_level"] == "L1" and attrs["baseline_method"] == "image_median"
    assert attrs["parameters"]["frame_step"] == 10 and attrs["parameters"]["adc_to_pe"] == 1.5
    assert np.array(attrs["parameters"]["block_median_map"]).shape == (4, 4)
    assert attrs["baseline_frames"]["per_quabo"][1]["count"] == N_FRAMES // 10
    assert attrs["baseline_frames"]["per_quabo"][0]["excluded_frames"] == [400]
    assert attrs["l0"] == l0_attrs and attrs["data_product"] == "img16"
    for key in ("panoseti_pff_zarr_version", "data_product", "bytes_per_pixel", "module",
                "source_pff_files", "total_frames", "header_format", "quabo_fields",
                "frame_config"):  # PANOSETI's root attributes, as in the L0
        assert attrs[key] == l0_attrs[key], key
    assert attrs["total_frames"] == N_FRAMES and attrs["frame_flags_source"] == "L0"
    assert attrs["calibration"] == {"method": "image_median",
                                    "parameters": attrs["parameters"]}
    assert attrs["config"]["baseline_subtract"]["method"] == "image_median"
    assert {"numpy", "zarr", "python"} <= set(attrs["software"]) and attrs["created"]
    size = attrs["size"]
    assert size["l1_to_l0_ratio"] == pytest.approx(size["l1_bytes"] / size["l0_bytes"],
                                                   rel=1e-3)


def test_xarray_opens_l1_with_time_index_and_baseline(stores, tmp_path):
    l1 = tmp_path / "L1.zarr"
    assert run_step2(stores["ph256"], l1, write_config(tmp_path / "c.toml")) == 0
    ds = xr.open_zarr(l1)
    assert ds["images"].dims == ("time", "y", "x") and ds["images"].dtype == np.float32
    assert ds["baseline"].dims == ("quabo", "y", "x")
    assert np.issubdtype(ds["time"].dtype, np.datetime64) and "time" in ds.indexes
    assert ds["quabo_num"].dims == ("time",)  # every header array, in the root group
    tree = xr.open_datatree(l1, engine="zarr")
    assert tree.ds["quabo_num"].dims == ("time",)
    assert tree.ds["baseline"].shape == (4, 16, 16)
    want, _ = reference(stores["ph256"], SHIPPED)
    np.testing.assert_allclose(ds["images"].values, want, atol=1e-3)


def test_bitround_keeps_fewer_mantissa_bits(stores, tmp_path):
    exact, lossy = tmp_path / "exact.zarr", tmp_path / "lossy.zarr"
    # on the exact float baseline: a quantized one leaves few mantissa bits to round
    cfg = write_config(tmp_path / "a.toml", baseline_quantum=0)
    assert run_step2(stores["img16"], exact, cfg) == 0
    cfg = write_config(tmp_path / "b.toml", keep_mantissa_bits=7, baseline_quantum=0)
    assert run_step2(stores["img16"], lossy, cfg) == 0
    a = zarr.open_group(str(exact), mode="r")
    b = zarr.open_group(str(lossy), mode="r")
    assert b.attrs["precision"] == {"keep_mantissa_bits": 7, "lossy": True,
                                    "baseline_quantum": 0, "max_baseline_error": 0}
    assert [f.codec_name for f in b["images"].filters] == ["numcodecs.bitround"]
    np.testing.assert_allclose(b["images"][:], a["images"][:], rtol=2.0**-7)
    assert b.attrs["size"]["l1_bytes"] < 0.8 * a.attrs["size"]["l1_bytes"]
    assert np.array_equal(b["baseline"][:], a["baseline"][:])  # the baseline stays exact


# --------------------------------------------------------------------------- CLI


def test_existing_output_left_alone_unless_overwrite(stores, tmp_path, capsys):
    l1, cfg = tmp_path / "L1.zarr", write_config(tmp_path / "c.toml")
    assert run_step2(stores["img8"], l1, cfg) == 0
    before = {p: p.stat().st_mtime_ns for p in l1.rglob("*")}
    capsys.readouterr()
    assert step2_dask_baseline.main([str(stores["img8"]), str(l1), "--config", str(cfg)]) == 0
    assert "exists, left alone" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in l1.rglob("*")} == before
    assert run_step2(stores["img8"], l1, cfg, "--overwrite", "--method", "median") == 0
    assert zarr.open_group(str(l1), mode="r").attrs["baseline_method"] == "median"
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*.old"))


def incomplete_l0(stores: dict[str, Path], tmp_path: Path) -> Path:
    copy = tmp_path / "broken_L0.zarr"
    shutil.copytree(stores["img8"], copy)
    next(p for p in sorted((copy / "images").rglob("*")) if p.is_file() and
         "/c/" in str(p)).unlink()
    return copy


@pytest.mark.parametrize("case, code, words", [
    ("missing input", 1, "no such store"),
    ("not a store", 1, "not a Zarr store"),
    ("L1 as input", 1, "not an L0 store"),
    ("L0 incomplete", 1, "L0 incomplete"),
    ("bad config", 2, "unknown key 'baseline_windw'"),
    ("window < 1", 2, "baseline_window = 0 is out of range"),
    ("output inside input", 1, "must not be, contain or sit inside"),
])
def test_errors_are_one_line_with_no_output(stores, tmp_path, capsys, case, code, words):
    l0, cfg, extra = stores["img8"], write_config(tmp_path / "c.toml"), []
    l1 = tmp_path / "out_L1.zarr"
    if case == "missing input":
        l0 = tmp_path / "nope_L0.zarr"
    elif case == "not a store":
        l0 = tmp_path / "plain_dir"
        l0.mkdir()
    elif case == "L1 as input":
        assert run_step2(stores["img8"], tmp_path / "first_L1.zarr", cfg) == 0
        l0 = tmp_path / "first_L1.zarr"
    elif case == "L0 incomplete":
        l0 = incomplete_l0(stores, tmp_path)
    elif case == "bad config":
        cfg.write_text("[baseline_subtract]\nbaseline_windw = 10\n")
    elif case == "window < 1":
        extra = ["--baseline-window", "0"]
    elif case == "output inside input":
        l1 = stores["img8"] / "L1.zarr"
    capsys.readouterr()
    assert run_step2(l0, l1, cfg, *extra) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "Traceback" not in err
    assert not l1.exists() and not list(l1.parent.glob(f"{l1.name}.*"))


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="no such store"):
        run_step2(tmp_path / "nope_L0.zarr", tmp_path / "L1.zarr",
                  write_config(tmp_path / "c.toml"), "--debug")


# --------------------------------------------------------------------------- cluster


def chunk_digests(store: Path) -> dict[str, str]:
    """sha256 of every file but the root metadata (which records the mode and time)."""
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.rglob("*"))
            if p.is_file() and p.relative_to(store) != Path("zarr.json")}


@pytest.mark.filterwarnings("ignore:Scheduler already contains a plugin")  # 2nd connect
def test_dask_cluster_output_is_byte_identical_to_local(stores, tmp_path):
    from distributed import LocalCluster

    from panoseti_pipeline import cluster as dask_cluster

    cfg = write_config(tmp_path / "c.toml", method="ph_pedestal", compute_chunk_size=128)
    cfg_img = write_config(tmp_path / "i.toml", method="image_median")
    local_ph, local_img = tmp_path / "local_ph.zarr", tmp_path / "local_img.zarr"
    assert run_step2(stores["ph256"], local_ph, cfg) == 0
    assert run_step2(stores["img16"], local_img, cfg_img) == 0
    remote_ph, remote_img = tmp_path / "dask_ph.zarr", tmp_path / "dask_img.zarr"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, interface="lo",
                      dashboard_address="127.0.0.1:0") as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tcp://127.")
        assert run_step2(stores["ph256"], remote_ph, cfg, "--dask-scheduler", address) == 0
        with dask_cluster.connect_client(address) as client:
            result = step2.subtract_baseline(stores["img16"], remote_img,
                                             load_config(cfg_img), client=client, quiet=True)
            workers = client.scheduler_info()["workers"]
            assert len(workers) == 2 and all(w.startswith("tcp://127.") for w in workers)
    assert result.mode == "dask"
    for local, remote in ((local_ph, remote_ph), (local_img, remote_img)):
        assert zarr.open_group(str(remote), mode="r").attrs["report"]["mode"] == "dask"
        assert chunk_digests(local) == chunk_digests(remote)
        a, b = (zarr.open_group(str(p), mode="r").attrs.asdict() for p in (local, remote))
        # creation time and timing differ between runs; the git revision recorded in
        # "software" changes ("-dirty") if the tree is edited while the test runs
        for skip in ("created", "report", "software"):
            a.pop(skip), b.pop(skip)
        assert a == b


LOCAL_STEPS = """
import json, sys
from panoseti_pipeline.cli import step1, step2
rcs = [step1.main([sys.argv[1], sys.argv[2], sys.argv[4], "--quiet"]),
       step2.main([sys.argv[2], sys.argv[3], "--config", sys.argv[4], "--quiet"])]
print(json.dumps({"rcs": rcs, "loaded": sorted(m for m in sys.modules
                                               if m.split(".")[0] in ("dask", "distributed"))}))
"""


def test_local_steps_import_neither_dask_nor_distributed(tmp_path):
    """use_dask = false: both steps in one fresh interpreter, no ``dask`` or
    ``distributed`` module loaded at the end (``distributed`` costs ~1.4 s of imports and
    a cluster run's start-up, ``dask`` alone 0.13 s per step)."""
    import subprocess
    import sys

    rng = np.random.default_rng(3)
    spec = synthetic_obs.StreamSpec(dp="img16")
    times = int(synthetic_obs.DEFAULT_START.timestamp()) * 10**9 + np.arange(300) * 10**6
    headers = synthetic_obs.synth_headers(rng, spec, times, first_pkt=0)
    images = synthetic_obs.synth_images(rng, spec, 300, 0)
    path = tmp_path / synthetic_obs.file_name(spec, synthetic_obs.DEFAULT_START, 0)
    with open(path, "wb") as f:
        pff.write_frames(f, "img16", images, headers)
    l0, l1 = tmp_path / "x_L0.zarr", tmp_path / "x_L1.zarr"
    cfg = write_config(tmp_path / "cfg.toml")  # with sizes as the shipped config has
    cfg.write_text(cfg.read_text().replace("use_dask = false\n", 'use_dask = false\n'
                                           'local_memory_per_worker = "4GB"\n'
                                           'ssh_memory_per_worker = "512 MiB"\n'))
    proc = subprocess.run([sys.executable, "-c", LOCAL_STEPS, str(path), str(l0), str(l1),
                           str(cfg)],
                          capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["rcs"] == [0, 0]
    np.testing.assert_array_equal(zarr.open_group(str(l0), mode="r")["images"][:], images)
    assert zarr.open_group(str(l1), mode="r")["images"].shape == images.shape
    assert out["loaded"] == []
