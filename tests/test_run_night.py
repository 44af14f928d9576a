"""A night as the DAQ writes it, through ``run.sh``, read back with PANOSETI's reader.

The generated run has two modules x (img16, ph256) x three seqno files, each rolled-over
file named with its own ``start_`` (the DAQ's ``new_dp_file()``), the 0-byte img8/ph1024
files the DAQ creates at start, the run's configs, log, sentinels and ``hk.pff``. Also:
how many files a GB of input becomes with the shipped configuration.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import zarr
from process_tools import run_sh

from panoseti_pipeline import pff, run_bundle, synthetic

REPO = Path(__file__).resolve().parents[1]
FRAMES = 1200  # per file: 1.2 s of img16, 6 s of ph256, so every seqno has its own start_
CONFIG = """
[cluster]
use_dask = false
[pff_to_zarr]
time_chunk = 256
shard_factor = 4
[baseline_subtract]
compute_chunk_size = 256
shard_factor = 4
"""


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory
          ) -> tuple[Path, Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("night")
    run = synthetic.make_observation(root / "in", seed=11, modules=(1, 2),
                                     products=("img16", "ph256"), frames_per_file=FRAMES,
                                     files_per_stream=3)
    config = root / "night.toml"
    config.write_text(CONFIG)
    out = root / "out"
    return run, out, run_sh(run, out, config=config)


def test_the_daq_names_are_real(night) -> None:
    run, _, _ = night
    for dp in ("img16", "ph256"):
        starts = {pff.parse_name(p).start for p in run.glob(f"*dp_{dp}*module_1*.pff")}
        assert len(starts) == 3, "each rolled-over seqno file has its own start_"
    assert sorted(p.stat().st_size for p in run.glob("*dp_img8*")) == [0, 0]


def test_every_stream_becomes_one_l1_with_every_frame(night) -> None:
    run, out, result = night
    assert result.returncode == 0, result.stderr
    products = out / run.name[: -len(".pffd")]
    stores = sorted(p.name for p in products.glob("*.zarr"))
    stem = run.name[: -len(".pffd")]
    assert stores == [f"{stem}.dp_{dp}.bpp_2.module_{m}_L1.zarr"
                      for dp in ("img16", "ph256") for m in (1, 2)]
    for name in stores:
        group = zarr.open_group(str(products / name), mode="r")
        dp, module = group.attrs["data_product"], int(group.attrs["module"])
        files = sorted(run.glob(f"*dp_{dp}.*module_{module}.*.pff"),
                       key=lambda p: pff.parse_name(p).seqno)
        assert group.attrs["total_frames"] == 3 * FRAMES == group["images"].shape[0]
        assert group.attrs["source_pff_files"] == [p.name for p in files]
        expected = []
        for path in files:  # the exact times, file by file, from the PFF files
            with pff.PFFReader(path) as reader:
                frames = reader.read(0, reader.index.n_frames)
                times, _ = pff.frame_times(frames.headers,
                                           pff.decide_time_source(reader))
                expected.append(times)
        np.testing.assert_array_equal(group["unix_t_ns"][:], np.concatenate(expected))
    assert not (out / ".l0_tmp").exists()
    assert len(list(out.glob("run_record_*.toml"))) == 1


def test_the_run_bundle_holds_the_metadata_and_its_checksums_verify(night) -> None:
    run, out, _ = night
    products = out / run.name[: -len(".pffd")]
    bundle = products / f"{run.name}.panoseti-meta"
    assert run_bundle.verify_bundle(bundle) == []
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert sorted(p["name"] for p in manifest["products"]) == sorted(
        p.name for p in products.glob("*.zarr"))
    assert all(p["frames"] == 3 * FRAMES and p["level"] == "L1" for p in manifest["products"])
    for rel in ("configs/obs_config.json", "configs/daq_config.json", "sentinels/run_complete",
                "hk.pff"):
        assert (bundle / rel).read_bytes() == (run / Path(rel).name).read_bytes(), rel
        assert rel in manifest["files"]


def test_pypff_lists_exactly_this_runs_products_and_reads_its_configs(night) -> None:
    open_zarr_run = pytest.importorskip("pypff.zarr").open_zarr_run
    run, out, _ = night
    opened = open_zarr_run(out / run.name[: -len(".pffd")])
    assert opened.list_products() == [f"dp_{dp}.bpp_2.module_{m}"
                                      for dp in ("img16", "ph256") for m in (1, 2)]
    assert opened.configs == {p.stem: json.loads(p.read_text()) for p in run.glob("*.json")}


@pytest.mark.gigabyte
@pytest.mark.skipif(os.environ.get("PANOSETI_GIGABYTE_TESTS") != "1",
                    reason="1 GB input: CI runs it (.ci/run); PANOSETI_GIGABYTE_TESTS=1 here")
def test_a_gb_of_input_is_at_most_60_files_in_l0_and_in_l1(tmp_path: Path) -> None:
    """The shipped configuration (sharded stores), a real 1 GB img16 stream."""
    run = tmp_path / "obs_Lick.start_2024-07-25T04:34:46Z.runtype_sci-obs.pffd"
    run.mkdir()
    big = synthetic.write_big_file(run, 1024)
    out = tmp_path / "out"
    result = run_sh("--keep-l0", run, out, config=REPO / "config.toml")  # local: use_dask off
    assert result.returncode == 0, result.stderr
    gb = big.stat().st_size / 1e9
    for level, where in (("L0", out / "L0"), ("L1", out / run.name[: -len(".pffd")])):
        (store,) = where.glob(f"*_{level}.zarr")
        files = [p for p in store.rglob("*") if p.is_file()]
        assert len(files) / gb <= 60, (level, len(files), gb)
