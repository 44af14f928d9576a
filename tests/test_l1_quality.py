"""L1 that does not mislead: NaN where nothing was measured, hot/dead masks, the summary.

The inputs are generated nights (``missing_quabo`` and ``bad_pixels`` faults) converted
by step 1 and step 2; the expectations come from what the generator planted
(:func:`synthetic.bad_pixels`) and from the stores' own per-frame arrays, computed here
with plain numpy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from panoseti_pipeline import pff, synthetic
from panoseti_pipeline.cli import step1, step2

PRODUCTS = ("img16", "img8", "ph256")
QUADRANTS = {0: (slice(0, 16), slice(0, 16)), 1: (slice(0, 16), slice(16, 32)),
             2: (slice(16, 32), slice(16, 32)), 3: (slice(16, 32), slice(0, 16))}


def config(path: Path, **baseline: object) -> Path:
    keys = {"compute_chunk_size": 160, "baseline_window": 100, **baseline}
    body = "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in keys.items())
    path.write_text("[cluster]\nuse_dask = false\n[pff_to_zarr]\ntime_chunk = 128\n"
                    f"[baseline_subtract]\n{body}\n")
    return path


def convert(files: list[Path], l0: Path, l1: Path, cfg: Path) -> None:
    assert step1.main([*map(str, files), str(l0), str(cfg), "--quiet"]) == 0
    assert step2.main([str(l0), str(l1), "--config", str(cfg), "--quiet"]) == 0


@pytest.fixture(scope="module")
def night(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("quality")
    run = synthetic.make_observation(root / "in", seed=3, products=PRODUCTS,
                                     frames_per_file=500, files_per_stream=2,
                                     faults=("missing_quabo", "bad_pixels"))
    cfg = config(root / "c.toml")
    out = {}
    for dp in PRODUCTS:
        files = sorted((p for p in run.glob(f"*.dp_{dp}.*.pff") if p.stat().st_size),
                       key=lambda p: pff.parse_name(p).seqno)
        l0, l1 = root / f"{dp}_L0.zarr", root / f"{dp}_L1.zarr"
        convert(files, l0, l1, cfg)
        out[dp] = (l0, l1)
    return out


def quadrant_nan(group: zarr.Group) -> np.ndarray:
    """Expected NaN pixels: quadrant q of every frame flagged missing_quabo whose
    quabo_<q>_tv_sec is 0."""
    flags = group["frame_flags"][:]
    want = np.zeros(group["images"].shape, bool)
    for q, (ys, xs) in QUADRANTS.items():
        gone = ((flags & 1) != 0) & (group[f"quabo_{q}_tv_sec"][:] == 0)
        want[gone, ys, xs] = True
    return want


@pytest.mark.parametrize("dp", ["img16", "img8"])
def test_nan_exactly_where_flag_1_says(night, dp):
    l1 = zarr.open_group(str(night[dp][1]), mode="r")
    images = l1["images"][:]
    assert images.dtype == np.float32
    want = quadrant_nan(l1)
    assert want.any(axis=(1, 2)).sum() == 2  # one missing-quabo frame per file
    assert np.array_equal(np.isnan(images), want)
    l0 = zarr.open_group(str(night[dp][0]), mode="r")["images"][:]
    assert (l0[want] == 0).all()  # what L1 no longer shows as -baseline
    summary = l1.attrs["summary"]
    assert summary["nan_values"] == {"missing_quabo": int(want.sum()), "uncalibrated": 0,
                                     "below_threshold": 0, "total": int(want.sum())}
    assert l1.attrs["report"]["nan_values"] == int(want.sum())


@pytest.mark.parametrize("dp", ["img16", "img8"])
def test_masks_find_exactly_the_planted_pixels(night, dp):
    l1 = zarr.open_group(str(night[dp][1]), mode="r")
    hot, dead = synthetic.bad_pixels(synthetic.StreamSpec(dp=dp), seed=3)
    for name, planted in (("hot_pixel_mask", hot), ("dead_pixel_mask", dead)):
        mask = l1[name]
        assert mask.dtype == np.uint8 and mask.metadata.dimension_names == ("y", "x")
        assert "rule" in mask.attrs
        assert sorted(map(tuple, np.argwhere(mask[:] == 1).tolist())) == sorted(planted)
    summary = l1.attrs["summary"]
    assert (summary["hot_pixels"], summary["dead_pixels"]) == (len(hot), len(dead))
    std, base = l1["baseline_std"][:], l1["baseline"][:]
    assert all(std[p] == 0 and base[p] == 0 for p in dead)  # always zero
    if dp == "img8":  # the hot pixels saturate at 250: no variance, yet hot, not dead
        assert all(std[p] == 0 and base[p] == 250 for p in hot)


def test_the_hot_rule_tells_a_twinkling_star_from_an_offset_not_a_steady_one():
    """2000 frames at a gain of 1.5 ADC per photoelectron, light counted with 15 % optical
    crosstalk (each photoelectron fires a second SiPM cell with that chance). A star of
    ~450 ADC that twinkles (15 % scintillation: variance ~8x its shot noise) is a light
    source, not hot. A steady offset (pedestal noise only), the generator's hot pixels
    (Poisson counts of 1 ADC each) and dark counts (~1.3x shot noise) are hot; so is a
    steady star of the same statistics: the rule's stated limit."""
    from panoseti_pipeline.step2.quality import SHOT_FACTOR, pixel_masks

    rng = np.random.default_rng(11)
    gain, n = 1.5, 2000

    def counted(rate: float | np.ndarray) -> np.ndarray:
        first = rng.poisson(rate, n)
        return gain * (first + rng.binomial(first, 0.15))

    frames = rng.normal(100, 5, (n, 16, 16))  # pedestal and its noise
    frames[:, 2, 3] += counted(260 * np.clip(1 + 0.15 * rng.normal(size=n), 0, None))
    frames[:, 4, 5] += 450  # an offset
    frames[:, 6, 7] += rng.poisson(1500, n)  # as synthetic.py plants hot pixels
    frames[:, 8, 9] += counted(870)  # dark counts, ~1500 ADC
    frames[:, 10, 11] += counted(260)  # a steady star, ~450 ADC
    base, std = frames.mean(axis=0), frames.std(axis=0)
    hot, _ = pixel_masks(base, std, gain)
    assert sorted(map(tuple, np.argwhere(hot).tolist())) == [(4, 5), (6, 7), (8, 9), (10, 11)]
    excess = (std**2 - np.median(std) ** 2) / (gain * (base - np.median(base)))
    assert excess[2, 3] > 2 * SHOT_FACTOR and excess[10, 11] < SHOT_FACTOR / 1.3  # margins


def test_ph256_masks_are_per_quabo(night):
    """The generator's ph256 'star' pixel (y, x) = (5, 5) fires in every event of every
    quabo (200-3000 ADC above the pedestal, a spread far above the shot noise of its
    level at adc_to_pe): a light source, not hot; the planted hot pixels (Poisson counts
    1500 above the pedestal, less excess variance than twice that shot noise) are hot."""
    l1 = zarr.open_group(str(night["ph256"][1]), mode="r")
    hot, dead = synthetic.bad_pixels(synthetic.StreamSpec(dp="ph256"), seed=3)
    got_hot = sorted(map(tuple, np.argwhere(l1["hot_pixel_mask"][:] == 1).tolist()))
    assert l1["hot_pixel_mask"].metadata.dimension_names == ("quabo", "y", "x")
    assert got_hot == sorted(hot)
    base, std = l1["baseline"][:], l1["baseline_std"][:]
    star = (slice(None), 5, 5)
    assert (base[star] > 1000).all() and (std[star] > 10 * np.median(std)).all()  # it is bright
    assert sorted(map(tuple, np.argwhere(l1["dead_pixel_mask"][:] == 1).tolist())) == \
        sorted(dead)
    assert not np.isnan(l1["images"][:]).any()  # a ph256 frame is one quabo: none missing


@pytest.mark.parametrize("dp", PRODUCTS)
def test_summary_matches_the_store(night, dp):
    l1 = zarr.open_group(str(night[dp][1]), mode="r")
    s = l1.attrs["summary"]
    flags = l1["frame_flags"][:]
    t = l1["time"][:]
    assert s["frames"] == len(flags) == 1000
    assert s["frames_per_flag"] == {name: int(np.count_nonzero(flags & bit))
                                    for bit, name in pff.FLAG_NAMES.items()}
    assert s["flagged_frames"] == int(np.count_nonzero(flags))
    assert s["time_first"] == f"{np.datetime64(int(t.min()), 'ns')}Z"
    assert s["span_s"] == pytest.approx((int(t.max()) - int(t.min())) / 1e9)
    sample = l1["images"][::16].astype(np.float64)
    sample = sample[np.isfinite(sample)]
    r = s["residuals"]
    assert r["values"] == sample.size
    assert r["mean"] == pytest.approx(sample.mean(), abs=1 / 16)
    assert r["std"] == pytest.approx(sample.std(), rel=1e-3)
    for key, q in (("p01", 1), ("p99", 99)):
        assert abs(r[key] - np.percentile(sample, q)) <= 1.0, key


def test_pixels_without_a_baseline_are_nan_and_counted(tmp_path):
    """Quabo 0 missing in every frame of the baseline window: its quadrant has no
    baseline, so it is NaN in every frame (counted as uncalibrated where the quabo is
    there, as missing_quabo where it is not)."""
    spec = synthetic.StreamSpec(dp="img16")
    rng = np.random.default_rng(1)
    n = 300
    times = int(synthetic.DEFAULT_START.timestamp()) * 10**9 + np.arange(n) * 10**6
    headers = synthetic.synth_headers(rng, spec, times, first_pkt=0)
    images = synthetic.synth_images(rng, spec, n, 0)
    for field in pff.MODULE_FIELDS:
        headers[field][:100, 0] = 0
    images[:100, :16, :16] = 0
    path = tmp_path / synthetic.file_name(spec, synthetic.DEFAULT_START, 0)
    with open(path, "wb") as f:
        pff.write_frames(f, "img16", images, headers)
    l1 = tmp_path / "L1.zarr"
    convert([path], tmp_path / "L0.zarr", l1, config(tmp_path / "c.toml"))
    g = zarr.open_group(str(l1), mode="r")
    assert np.isnan(g["baseline"][:16, :16]).all() and not np.isnan(g["baseline"][16:]).any()
    nan = np.isnan(g["images"][:])
    assert nan[:, :16, :16].all() and nan.sum() == n * 256
    s = g.attrs["summary"]
    assert s["uncalibrated_pixels"] == 256
    assert s["nan_values"] == {"missing_quabo": 100 * 256, "uncalibrated": 200 * 256,
                               "below_threshold": 0, "total": n * 256}
    assert g["hot_pixel_mask"][:16, :16].sum() == 0 == g["dead_pixel_mask"][:16, :16].sum()
