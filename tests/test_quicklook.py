"""Quicklooks: a PNG per L0 and L1 store that decodes, shows what the store holds, and
differs between products; bad stores give one error line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from panoseti_pipeline import pff, quicklook, synthetic
from panoseti_pipeline.cli import step1, step2

PRODUCTS = ("img16", "ph256")


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("looks")
    run = synthetic.make_observation(root / "in", seed=5, products=PRODUCTS,
                                     frames_per_file=400, files_per_stream=2,
                                     faults=("missing_quabo", "bad_pixels"))
    cfg = root / "c.toml"
    cfg.write_text("[cluster]\nuse_dask = false\n[pff_to_zarr]\ntime_chunk = 128\n"
                   "[baseline_subtract]\ncompute_chunk_size = 128\nbaseline_window = 100\n")
    out = []
    for dp in PRODUCTS:
        files = sorted((p for p in run.glob(f"*.dp_{dp}.*.pff") if p.stat().st_size),
                       key=lambda p: pff.parse_name(p).seqno)
        l0, l1 = root / f"{dp}_L0.zarr", root / f"{dp}_L1.zarr"
        assert step1.main([*map(str, files), str(l0), str(cfg), "--quiet"]) == 0
        assert step2.main([str(l0), str(l1), "--config", str(cfg), "--quiet"]) == 0
        out += [l0, l1]
    return out


def decode(path: Path) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(path)


def test_cli_writes_a_decodable_png_per_store_and_they_differ(stores, tmp_path, capsys):
    assert quicklook.main([*map(str, stores), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    pngs = [tmp_path / f"{s.name.removesuffix('.zarr')}.png" for s in stores]
    assert printed == list(map(str, pngs))
    images = [decode(p) for p in pngs]
    for image in images:
        assert image.ndim == 3 and image.shape[0] > 500 and image.shape[1] > 500
        assert image.std() > 0.05  # drawn, not blank
    digests = {p.read_bytes() for p in pngs}
    assert len(digests) == len(pngs)
    ph = [i for i, s in enumerate(stores) if "ph256" in s.name]
    assert all(images[i].shape[0] > images[0].shape[0] for i in ph)  # + the histogram row


def test_what_the_look_accumulates_matches_the_store(stores):
    l1 = next(s for s in stores if s.name == "img16_L1.zarr")
    look, maps = quicklook.accumulate(l1)
    g = zarr.open_group(str(l1), mode="r")
    images = g["images"][:].astype(np.float64)
    np.testing.assert_allclose(maps["mean"][0], np.nanmean(images, axis=0), rtol=1e-6,
                               atol=1e-5)
    assert np.array_equal(maps["hot"][0], g["hot_pixel_mask"][:])
    assert np.array_equal(maps["dead"][0], g["dead_pixel_mask"][:])
    sums = np.nansum(images, axis=(1, 2))
    assert look.bins == len(sums) == 800  # fewer frames than LC_BINS: one per bin
    np.testing.assert_allclose(look.lc_sum, sums, rtol=1e-6, atol=1e-3)
    flags = g["frame_flags"][:]
    assert np.array_equal(look.bin_flags[0], (flags & 1) != 0)
    assert look.bin_flags[0].sum() == 2


@pytest.mark.parametrize("dp", PRODUCTS)
def test_step2_stores_the_look_that_reading_the_l1_gives(stores, dp):
    """The quicklook of our L1 is drawn from what step 2 gathered while writing it: equal
    to what reading every frame of the store again gives."""
    from panoseti_pipeline import look as look_module

    l1 = next(s for s in stores if s.name == f"{dp}_L1.zarr")
    assert look_module.ARRAY in set(zarr.open_group(str(l1), mode="r").array_keys())
    stored, maps = quicklook.accumulate(l1)
    read, read_maps = quicklook.accumulate(l1, stored=False)
    assert (stored.frames, stored.bins, stored.dp, stored.groups) == (
        read.frames, read.bins, read.dp, read.groups)
    for name in ("pixel_count", "lc_count", "bin_frames", "bin_flags", "t_min", "t_max",
                 "ph_hist"):
        assert np.array_equal(getattr(stored, name), getattr(read, name)), name
    for name in ("pixel_sum", "pixel_sumsq", "lc_sum", "lc_min", "lc_max"):
        # float32 sums within a block: step 2's blocks are its chunks, the reader's larger
        np.testing.assert_allclose(getattr(stored, name), getattr(read, name), rtol=1e-5,
                                   atol=1e-3, err_msg=name)
    assert stored.bin_frames.sum() == stored.frames and stored.lc_count.sum() > 0
    np.testing.assert_allclose(maps["mean"], read_maps["mean"], rtol=1e-5, atol=1e-4)


def test_l0_look_leaves_missing_quadrants_out_and_finds_the_same_pixels(stores):
    l0 = next(s for s in stores if s.name == "img16_L0.zarr")
    look, maps = quicklook.accumulate(l0)
    hot, dead = synthetic.bad_pixels(synthetic.StreamSpec(dp="img16"), seed=5)
    assert sorted(map(tuple, np.argwhere(maps["hot"][0]).tolist())) == sorted(hot)
    assert sorted(map(tuple, np.argwhere(maps["dead"][0]).tolist())) == sorted(dead)
    assert look.pixel_count[0, 0, 0] == 798 and look.pixel_count[0, 31, 31] == 800


def test_pulse_heights_per_quabo(stores):
    l0 = next(s for s in stores if s.name == "ph256_L0.zarr")
    look, _ = quicklook.accumulate(l0)
    g = zarr.open_group(str(l0), mode="r")
    images, quabo = g["images"][:], g["quabo_num"][:]
    assert look.ph_hist is not None
    for q in range(4):
        heights = images[quabo == q].reshape(-1, 256).max(axis=1)
        assert look.ph_hist[q].sum() == heights.size
        want, _ = np.histogram(np.clip(heights, quicklook.PH_EDGES[0],
                                       quicklook.PH_EDGES[-1] - 1), quicklook.PH_EDGES)
        assert np.array_equal(look.ph_hist[q], want)


def figure_of(store: Path):
    """The quicklook figure of a store, with each axes' title, labels and texts."""
    look, maps = quicklook.accumulate(store)
    fig = quicklook.figure(look, maps)
    axes = [(ax.get_title(), ax.get_xlabel(), ax.get_ylabel(), ax) for ax in fig.axes]
    return look, fig, axes


def colorbars(fig) -> list:
    return [image.colorbar for ax in fig.axes for image in ax.images if image.colorbar]


@pytest.mark.parametrize("name", ["img16_L0.zarr", "img16_L1.zarr"])
def test_dead_pixels_are_grey_and_the_colours_span_the_typical_pixels(stores, name):
    """A dead pixel (always 0) is no measurement: masked (drawn grey), not the darkest or
    brightest colour, and neither it nor a hot pixel sets the colour range."""
    import matplotlib.pyplot as plt

    look, fig, axes = figure_of(next(s for s in stores if s.name == name))
    _, maps = quicklook.accumulate(next(s for s in stores if s.name == name))
    try:
        hot, dead = synthetic.bad_pixels(synthetic.StreamSpec(dp="img16"), seed=5)
        mean_image = next(ax for title, _x, _y, ax in axes if title == "mean image").images[0]
        shown = mean_image.get_array()
        assert all(shown.mask[y, x] for y, x in dead)
        assert not any(shown.mask[y, x] for y, x in hot)
        typical = np.ones((32, 32), bool)
        for y, x in [*hot, *dead]:
            typical[y, x] = False
        low, high = np.percentile(maps["mean"][0][typical], [1, 99])
        assert mean_image.norm.vmin == pytest.approx(low)
        assert mean_image.norm.vmax == pytest.approx(high)
        assert high - low < 200  # the hot pixels (~1500 ADC above) are out of the range
    finally:
        plt.close(fig)


@pytest.mark.parametrize("index", range(4))
def test_every_axis_and_colour_bar_says_its_unit(stores, index):
    """Pixels of L0 and of our L1 methods are ADC counts: every colour bar and y axis of
    a pixel value says so, every other axis says what it counts."""
    import matplotlib.pyplot as plt

    store = stores[index]
    assert zarr.open_group(str(store), mode="r")["images"].attrs.get(
        "units", "ADC counts") == "ADC counts"
    look, fig, axes = figure_of(store)
    try:
        bars = colorbars(fig)
        assert [bar.ax.get_ylabel() for bar in bars] == ["ADC counts", "ADC counts"]
        plots = [a for a in axes if a[0]]  # the titled panels (a colour bar has no title)
        assert len(plots) == (6 if look.ph_hist is not None else 5)
        for title, xlabel, ylabel, _ax in plots:
            assert xlabel and ylabel, title
        units = {ylabel for _t, _x, ylabel, _ax in plots[:2]} | {plots[2][2]}
        assert all("ADC counts" in u or "(pixel)" in u for u in units), units
        texts = " ".join(t.get_text() for t in fig.findobj(plt.Text))
        assert "seconds from 20" in texts and " UTC" in texts
    finally:
        plt.close(fig)


def test_an_img_l1_calibrated_per_photoelectron_says_photoelectrons(stores, tmp_path):
    """The team's img calibration (method panoseti_analysis) divides by ADC counts per
    photoelectron: the store says photoelectrons, and so do the PNG's pixel axes; the
    pedestal noise stays ADC counts."""
    import matplotlib.pyplot as plt

    l0 = next(s for s in stores if s.name == "img16_L0.zarr")
    cfg = tmp_path / "pe.toml"
    cfg.write_text("[cluster]\nuse_dask = false\n[baseline_subtract]\n"
                   "method = \"panoseti_analysis\"\ncompute_chunk_size = 128\n"
                   "frame_stride = 10\n")
    l1 = tmp_path / "img16_pe_L1.zarr"
    assert step2.main([str(l0), str(l1), "--config", str(cfg), "--quiet"]) == 0
    g = zarr.open_group(str(l1), mode="r")
    assert g["images"].attrs["units"] == "photoelectrons"
    assert g.attrs["calibration"]["method"] == "panoseti_analysis"
    _look, fig, axes = figure_of(l1)
    try:
        assert [bar.ax.get_ylabel() for bar in colorbars(fig)] == ["photoelectrons",
                                                                   "ADC counts"]
        (curve,) = [a for a in axes if a[0].startswith("light curve")]
        assert curve[2] == "module sum (photoelectrons)"
    finally:
        plt.close(fig)
    png = quicklook.quicklook(l1, tmp_path)
    assert decode(png).std() > 0.05


@pytest.mark.parametrize("level", ["L0", "L1"])
def test_a_ph_light_curve_is_summed_pulse_height_and_event_rate(stores, level):
    """A ph frame is one event (ph256: of one quabo), not a module's exposure: the curve is
    the pulse height summed over each bin's events, the rate is events per second."""
    import matplotlib.pyplot as plt

    look, fig, axes = figure_of(next(s for s in stores if s.name == f"ph256_{level}.zarr"))
    try:
        titles = [a[0] for a in axes]
        assert not any("module sum" in t or "light curve" in t for t in titles)
        (curve,) = [a for a in axes if a[0].startswith("summed pulse height per bin")]
        assert curve[2] == "summed pulse height (ADC counts)"
        (line,) = curve[3].get_lines()[:1]
        have = look.lc_count > 0
        np.testing.assert_allclose(line.get_ydata(), look.lc_sum[have])
        (rate,) = [a for a in axes if a[0] == "event rate (events/s)"]
        assert rate[2] == "events/s"
    finally:
        plt.close(fig)
    img_look, img_fig, img_axes = figure_of(next(s for s in stores
                                                 if s.name == f"img16_{level}.zarr"))
    plt.close(img_fig)
    titles = [a[0] for a in img_axes]
    assert any(t.startswith("light curve: module sum") for t in titles)
    assert "frame rate (frames/s)" in titles and img_look.ph_hist is None


def test_a_bad_store_is_one_line_and_the_others_still_get_their_png(stores, tmp_path,
                                                                    capsys):
    assert quicklook.main([str(tmp_path / "nope_L1.zarr"), str(stores[0]), "--out",
                           str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope_L1.zarr" in err[0] and "no such store" in err[0]
    assert (tmp_path / f"{stores[0].name.removesuffix('.zarr')}.png").is_file()


def test_a_link_at_a_png_or_index_name_is_replaced_never_written_through(stores, tmp_path,
                                                                         capsys):
    """Defect: PNGs were saved through whatever was at their name, and index.html went
    through the predictable ``.index.html.<pid>.tmp``: a link planted there (any member of
    a group-writable output's group can) made the pipeline overwrite the link's target."""
    import json
    import os
    import shutil

    from panoseti_pipeline.driver import index_page

    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    png = tmp_path / "img16_L1.png"
    png.symlink_to(victim)
    assert quicklook.main([str(stores[1]), "--out", str(tmp_path)]) == 0
    assert victim.read_text() == "mine" and not png.is_symlink()
    assert decode(png).std() > 0.05
    # the index page (and the PNG beside a store) of a run
    out = tmp_path / "out"
    store = shutil.copytree(stores[1], out / stores[1].name)
    planted = [out / "img16_L1.png", out / "index.html",
               out / f".index.html.{os.getpid()}.tmp"]
    for link in planted:
        link.symlink_to(victim)
    state = tmp_path / "state.json"
    ok = {"status": "ok", "exit_code": 0}
    state.write_text(json.dumps({"steps": [1, 2], "jobs": [
        {"name": "img16", "l0": "", "l1": str(store), "action": "run",
         "steps": {"1": ok, "2": ok}}]}))
    pages, failed = index_page.make_quicklooks(state)
    assert (pages, failed) == ([out / "index.html"], 0)
    assert victim.read_text() == "mine"
    assert not (out / "index.html").is_symlink() and "img16_L1.zarr" in pages[0].read_text()
    assert not (out / "img16_L1.png").is_symlink() and decode(out / "img16_L1.png").size
