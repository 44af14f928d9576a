"""open_run / open_products against the stores opened directly with zarr."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from process_tools import run_sh

from panoseti_pipeline import open_products, open_run, synthetic
from panoseti_pipeline.flags import FLAG_NAMES

# the planted out_of_order frame is 2 s early: a suspect time axis, written all the same
CONFIG = ("[cluster]\nuse_dask = false\n[pff_to_zarr]\ntime_chunk = 256\n"
          "[baseline_subtract]\ncompute_chunk_size = 256\nfail_on_suspect = false\n")


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("products")
    (root / "c.toml").write_text(CONFIG)
    run = synthetic.make_observation(root / "in", frames_per_file=400, files_per_stream=1,
                                     faults=("missing_quabo", "out_of_order"))
    out = root / "out"
    done = run_sh(run, out, config=root / "c.toml")
    assert done.returncode == 0, done.stderr
    return out, out / run.name.removesuffix(".pffd")


def test_open_run_gives_the_values_of_each_store(night) -> None:
    _, run_dir = night
    tree = open_run(run_dir)
    assert sorted(tree.children) == ["housekeeping", "module_1"]
    assert sorted(tree["module_1"].children) == ["img16", "ph256"]
    flagged = 0
    for dp in ("img16", "ph256"):
        (store,) = run_dir.glob(f"*dp_{dp}*_L1.zarr")
        group = zarr.open_group(str(store), mode="r")
        ds = tree[f"module_1/{dp}"].dataset
        assert ds.attrs["data_product"] == dp and ds.attrs["processing_level"] == "L1"
        for name, array in group.arrays():
            want = array[:]
            got = ds[name].values
            if name == "time":
                got = got.astype("datetime64[ns]").astype(np.int64)
            np.testing.assert_array_equal(got, want, err_msg=f"{dp} {name}")
        flags = group["frame_flags"][:]
        for bit, name in FLAG_NAMES.items():
            np.testing.assert_array_equal(ds[f"flag_{name}"].values, (flags & bit) != 0)
            flagged += int(ds[f"flag_{name}"].values.sum())
    assert flagged > 0  # the planted faults are there to decode
    (hk,) = run_dir.glob("*.housekeeping/*.hk.zarr")
    hk_group = zarr.open_group(str(hk), mode="r")
    np.testing.assert_array_equal(tree["housekeeping/QUABO_4"].dataset["TEMP1"].values,
                                  hk_group["QUABO_4/TEMP1"][:])


def test_open_products_selects_and_cuts_by_time(night) -> None:
    out, run_dir = night
    (store,) = run_dir.glob("*dp_ph256*_L1.zarr")
    t = zarr.open_group(str(store), mode="r")["time"][:]
    lo, hi = np.sort(t)[[100, 300]]
    between = tuple(str(np.datetime64(int(v), "ns")) for v in (lo, hi))
    tree = open_products(out, dp="ph256", between=between)
    (run,) = tree.children
    assert run == run_dir.name
    ds = tree[f"{run}/module_1/ph256"].dataset
    inside = (t >= lo) & (t <= hi)
    assert ds.sizes["time"] == int(inside.sum()) >= 201
    np.testing.assert_array_equal(ds["images"].values,
                                  zarr.open_group(str(store), mode="r")["images"][:][inside])
    everything = open_products(out)
    assert sorted(everything[run]["module_1"].children) == ["img16", "ph256"]


def test_pff_info_describes_the_stores(night, capsys: pytest.CaptureFixture[str],
                                       tmp_path: Path) -> None:
    """`pff.py info STORE.zarr` on the run's real stores: every figure recomputed here."""
    from panoseti_pipeline.pff.info import main

    _, run_dir = night
    (store,) = run_dir.glob("*dp_img16*_L1.zarr")
    (hk,) = run_dir.glob("*.housekeeping/*.hk.zarr")
    assert main(["info", str(store), str(hk)]) == 0
    out = capsys.readouterr().out.splitlines()
    group = zarr.open_group(str(store), mode="r")
    t = group["unix_t_ns"][:]
    t = t[t != np.iinfo(np.int64).min]
    flags = group["frame_flags"][:]
    on_disk = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    raw = sum(a.nbytes for _, a in group.members(max_depth=None)  # the quicklook group's too
              if isinstance(a, zarr.Array))
    first, last = (np.datetime_as_string(np.datetime64(int(v), "ns"), unit="ns") + "Z"
                   for v in (t[0], t[-1]))
    assert out[0] == str(store)
    assert out[1].startswith(f"  level=L1 dp=img16 module=1 frames={group['images'].shape[0]} ")
    assert out[2] == f"  time {first} .. {last}"
    assert out[3] == "  flags: " + ", ".join(f"{name}={np.count_nonzero(flags & bit)}"
                                            for bit, name in FLAG_NAMES.items())
    assert out[4].startswith(f"  size: {on_disk} bytes on disk, {raw} uncompressed "
                             f"(compression ratio {raw / on_disk:.2f}), PFF/L0 "
                             f"{group.attrs['l0']['report']['compression_ratio']:.2f}, L1/L0 "
                             f"{group.attrs['size']['l1_to_l0_ratio']:.2f}")
    hk_attrs = zarr.open_group(str(hk), mode="r").attrs
    assert out[5] == str(hk) and f"{hk_attrs['records']} records" in out[6]

    (tmp_path / "x.zarr").mkdir()
    (tmp_path / "x.zarr" / "zarr.json").write_text('{"attributes": {}}')
    assert main(["info", str(tmp_path / "x.zarr")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"pff.py: error: {tmp_path / 'x.zarr'}: not a PFF product store (no " \
                  "data_product attribute)"


@pytest.mark.parametrize("between", [
    ("2024-07-25T04:34:46", "2024-07-25T04:34:46.2"),    # a partial end: its whole ms
    ("2024-07-25T04:34:46.15", "2024-07-25T04:34:46.3Z"),
    ("2024-07-25T04:34", "2024-07-25T04:35"),            # whole minutes
    ("2024-07-25T04:34:46.250000001", "2024-07-25T04:34:46.26"),
])
def test_between_selects_what_ds_sel_selects(night, between) -> None:
    """``between`` with the strings a user pastes is ``ds.sel(time=slice(...))``."""
    import xarray as xr

    out, run_dir = night
    for dp in ("img16", "ph256"):
        (store,) = run_dir.glob(f"*dp_{dp}*_L1.zarr")
        direct = xr.open_zarr(str(store)).sortby("time")   # sel needs a sorted index
        want = direct.sel(time=slice(*(t.removesuffix("Z") for t in between)))
        tree = open_products(out, dp=dp, between=between)
        got = tree[f"{run_dir.name}/module_1/{dp}"].dataset
        assert want.sizes["time"] > 0
        np.testing.assert_array_equal(np.sort(got["time"].values), want["time"].values)
        np.testing.assert_array_equal(got["images"].sortby("time").values,
                                      want["images"].values)


def test_a_cut_dataset_does_not_state_the_whole_stores_facts(night) -> None:
    out, run_dir = night
    whole = open_run(run_dir)["module_1/img16"].dataset
    between = ("2024-07-25T04:34:46.2", "2024-07-25T04:34:46.3")
    cut = open_products(out, dp="img16", between=between)[
        f"{run_dir.name}/module_1/img16"].dataset
    assert cut.sizes["time"] < whole.sizes["time"] == whole.attrs["total_frames"]
    for name in ("total_frames", "summary", "flag_counts"):
        assert name not in cut.attrs and cut.attrs[f"store_{name}"] == whole.attrs[name]
    assert cut.attrs["between"] == list(between)
    assert cut.attrs["data_product"] == "img16"


@pytest.mark.parametrize("kwargs,match", [({"dp": "img17"}, "img17.*not a data product"),
                                          ({"level": "L2"}, "L2.*not a level")])
def test_an_unknown_product_or_level_is_refused(night, kwargs, match) -> None:
    from panoseti_pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        open_products(night[0], **kwargs)
