"""PANOSETI's own reader opens our stores, and we open theirs (pypff >= 1.0.4).

The expected values come from pypff's own reading of the PFF files (``pypff.io2``), an
implementation independent of ours: stores made by our step 1 and step 2 must give, through
``pypff.zarr.open_zarr_run``, the products, frame counts, times, header values and run
configs that pypff reads from the PFF files themselves. The night is generated with the
DAQ's file names (a new ``start_`` for every rolled-over seqno file), all four data
products, two modules, and the run's metadata.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from panoseti_pipeline import pff, run_bundle, step1, synthetic
from panoseti_pipeline.config import from_dict
from panoseti_pipeline.step2 import subtract_baseline

try:
    from pypff.io2 import PanosetiRun
    from pypff.zarr import PanosetiZarrStore, convert_run, open_zarr_run
except ImportError as err:  # pragma: no cover - CI installs requirements-test.txt
    if os.environ.get("CI"):
        raise
    pytest.skip(f"pypff is not installed ({err}): pip install -r requirements-test.txt",
                allow_module_level=True)

PRODUCTS = ("img16", "img8", "ph256", "ph1024")
MODULES = (1, 2)
WINDOW = 50
CONFIG = from_dict({"cluster": {"use_dask": False},
                    "pff_to_zarr": {"time_chunk": 128, "shard_factor": 2},
                    "baseline_subtract": {"compute_chunk_size": 128, "shard_factor": 2,
                                          "baseline_window": WINDOW, "method": "mean"}})


@dataclasses.dataclass(frozen=True)
class Night:
    run: Path
    l0: Path  # our L0 stores and the run bundle
    l1: Path  # our L1 stores, no bundle (configs come from the stores)


def store_name(run: Path, dp: str, module: int, level: str) -> str:
    return f"{run.name[:-5]}.dp_{dp}.bpp_{pff.PRODUCTS[dp].bpp}.module_{module}_{level}.zarr"


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> Night:
    root = tmp_path_factory.mktemp("night")
    run = synthetic.make_observation(root / "in", seed=5, modules=MODULES, products=PRODUCTS,
                                     frames_per_file=150, files_per_stream=3)
    l0_dir, l1_dir = root / "l0", root / "l1"
    l0_dir.mkdir()
    l1_dir.mkdir()
    names = [pff.parse_name(p) for p in run.glob("*.pff") if p.name != pff.HOUSEKEEPING_NAME]
    streams, problems = pff.group_streams(names)
    assert problems == [] and len(streams) == len(PRODUCTS) * len(MODULES)
    summaries = []
    for s in streams:
        l0 = l0_dir / store_name(run, s.dp, s.module, "L0")
        result = step1.convert([n.path for n in s.data_files], l0, CONFIG, quiet=True,
                               notice=lambda _m: None)
        subtract_baseline(l0, l1_dir / store_name(run, s.dp, s.module, "L1"), CONFIG,
                          quiet=True, notice=lambda _m: None)
        t = zarr.open_array(str(l0 / "unix_t_ns"))[:]
        summaries.append(run_bundle.ProductSummary(l0.name, s.dp, s.module, "L0",
                                                   result.frames, int(t[0]), int(t[-1])))
    run_bundle.write_bundle(run, l0_dir, summaries, notice=lambda _m: None)
    return Night(run, l0_dir, l1_dir)


def keys() -> list[str]:
    return sorted(f"dp_{dp}.bpp_{pff.PRODUCTS[dp].bpp}.module_{m}"
                  for dp in PRODUCTS for m in MODULES)


def run_configs(run: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in sorted(run.glob("*.json"))}


@pytest.mark.parametrize("level", ["l0", "l1"])
def test_open_zarr_run_reads_our_stores_as_pypff_reads_the_pff_files(night: Night,
                                                                     level: str) -> None:
    ours = open_zarr_run(getattr(night, level))
    assert ours.list_products() == keys()
    pff_run = PanosetiRun(night.run)
    assert sorted(pff_run.list_products()) == keys()
    for key in keys():
        seq = pff_run.get_product(key)
        store = ours.get_product(key)
        assert len(store) == len(seq) == 3 * 150
        np.testing.assert_array_equal(store.timestamps(), seq.timestamps())
        assert store.timestamps().dtype == np.int64
        ds = store.to_dataset()
        header = seq.get_metadata_arrays(list(seq.metadata_offsets))
        assert len(header) == (6 if key.startswith("dp_ph256") else 20)
        for dotted, values in header.items():
            name = dotted.replace(".", "_")
            assert ds[name].attrs["pff_header_field"] == dotted
            np.testing.assert_array_equal(ds[name].values.astype(np.int64), values,
                                          err_msg=f"{key} {name}")
        if level == "l0":
            np.testing.assert_array_equal(ds["images"].values, seq.read_images_range(0))
        else:
            assert ds["images"].dtype == np.float32
        assert store.data_product == key.split(".")[0][3:]
        assert store.source_pff_files == [Path(p).name for p in seq.file_paths]
        assert store.frame_config["frame_size"] == pff.PRODUCTS[store.data_product].frame_bytes
    # configs: from the run bundle beside the L0 stores, from the stores' run_configs in L1
    assert ours.configs == run_configs(night.run)


def test_xarray_opens_every_array_with_a_datetime_index_and_no_warning(night: Night) -> None:
    for level, directory in (("L0", night.l0), ("L1", night.l1)):
        for path in directory.glob("*.zarr"):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                ds = xr.open_zarr(path)
            assert ds.indexes["time"].dtype == np.dtype("datetime64[ns]"), path
            assert ds.sizes["time"] == 450
            expected = {"images", "unix_t_ns", "frame_flags",
                        *zarr.open_group(str(path)).attrs["quabo_fields"],
                        *zarr.open_group(str(path)).attrs["header_fields"]}
            assert expected <= set(ds.variables), (path, expected - set(ds.variables))
            assert ds.attrs["processing_level"] == level


def test_our_step2_reads_a_pypff_l0_into_an_exact_l1(night: Night, tmp_path: Path) -> None:
    made = convert_run(PanosetiRun(night.run), tmp_path / "pypff", shard_factor=2)
    by_key = {PanosetiZarrStore(p).data_product + "." + PanosetiZarrStore(p).module: p
              for p in made}
    for dp in ("img16", "ph1024"):
        l0 = by_key[f"{dp}.1"]
        out = tmp_path / f"{dp}_L1.zarr"
        result = subtract_baseline(l0, out, CONFIG, quiet=True, notice=lambda _m: None)
        assert result.status == "ok"
        images = zarr.open_array(str(l0 / "images"))[:]
        quantum = CONFIG.baseline_subtract.baseline_quantum  # the mean, rounded to it
        base = (np.round(images[:WINDOW].astype(np.float64).mean(axis=0) / quantum)
                * quantum).astype(np.float32)
        got = zarr.open_group(str(out))
        np.testing.assert_array_equal(got["images"][:], images.astype(np.float32) - base)
        np.testing.assert_array_equal(got["baseline"][:], base)
        # carried over and derived per-frame arrays
        np.testing.assert_array_equal(got["unix_t_ns"][:],
                                      zarr.open_array(str(l0 / "unix_t_ns"))[:])
        np.testing.assert_array_equal(got["time"][:], got["unix_t_ns"][:])
        assert "missing_quabo only" in got.attrs["frame_flags_source"]
        assert got.attrs["processing_level"] == "L1"
        # and PANOSETI's reader opens the result
        assert len(PanosetiZarrStore(out)) == 450
