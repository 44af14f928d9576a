"""open_run / open_products against the stores opened directly with zarr."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import zarr

from panoseti_pipeline import open_products, open_run, synthetic
from panoseti_pipeline.flags import FLAG_NAMES

REPO = Path(__file__).resolve().parents[1]
CONFIG = ("[cluster]\nuse_dask = false\n[pff_to_zarr]\ntime_chunk = 256\n"
          "[baseline_subtract]\ncompute_chunk_size = 256\n")


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("products")
    (root / "c.toml").write_text(CONFIG)
    run = synthetic.make_observation(root / "in", frames_per_file=400, files_per_stream=1,
                                     faults=("missing_quabo", "out_of_order"))
    out = root / "out"
    done = subprocess.run(["bash", str(REPO / "run.sh"), str(run), str(out)],
                          env={**os.environ, "CONFIG_FILE": str(root / "c.toml")},
                          capture_output=True, text=True, timeout=600)
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
    (hk,) = run_dir.glob("*.panoseti-meta/*.hk.zarr")
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
