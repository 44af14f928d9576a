"""run.sh with ``l1_layout = "panoseti_analysis"`` and ``method = "panoseti_analysis"``:
a night (img16 + ph256, DAQ names) laid out as PANOSETI's analysis storage spec says."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import zarr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_run_sh import run, run_env, write_config  # noqa: E402

from panoseti_pipeline import synthetic as synthetic_obs  # noqa: E402
from panoseti_pipeline.store.analysis_spec import data_checksum, file_checksum  # noqa: E402

#: their Manifest and StoreLineage fields (their models forbid any other key)
MANIFEST_KEYS = {"panoseti_analysis_storage_version", "manifest_schema_version", "run_id",
                 "level", "created_utc", "seed_manifest_version", "stores"}
STORE_KEYS = {"dp", "module", "level", "kind", "store", "n_frames", "time_range", "checksum",
              "source_store", "calibration_params", "timestamp_qc", "hashset", "cadence_ns",
              "model", "inference_params", "processing_history"}


def test_a_night_in_the_team_layout(tmp_path: Path) -> None:
    obs = synthetic_obs.make_observation(tmp_path / "in", frames_per_file=300,
                                         files_per_stream=1, products=("img16", "ph256"))
    cfg = write_config(tmp_path / "team.toml", "local", baseline_subtract={
        "method": "panoseti_analysis", "l1_layout": "panoseti_analysis", "frame_stride": 10})
    out = tmp_path / "out"
    rc, _, stderr = run(["--keep-l0", str(obs), str(out)], run_env(tmp_path, cfg),
                        quicklook=True)
    assert rc == 0, stderr[-3000:]
    run_id = obs.name.removesuffix(".pffd")
    level = out / run_id / "L1"
    stores = {dp: level / f"{run_id}.dp_{dp}.module_1.zarr" for dp in ("img16", "ph256")}
    manifest = json.loads((level / "manifest.json").read_text())
    assert set(manifest) == MANIFEST_KEYS
    assert manifest["run_id"] == run_id and manifest["level"] == "L1"
    assert manifest["panoseti_analysis_storage_version"] == "2.0"
    records = {r["dp"]: r for r in manifest["stores"]}
    assert set(records) == set(stores)
    for dp, store in stores.items():
        r = records[dp]
        assert set(r) <= STORE_KEYS
        g = zarr.open_group(str(store), mode="r")
        main = "pedestal_subtracted" if dp == "ph256" else "median_subtracted"
        assert main in g.array_keys()
        assert r["store"] == store.name and r["level"] == "L1" and r["module"] == "1"
        assert r["kind"] == ("ph" if dp == "ph256" else "img")
        assert r["n_frames"] == g[main].shape[0]
        assert r["checksum"] == data_checksum(store)
        assert r["calibration_params"] == g.attrs["calibration"]
        assert r["calibration_params"]["frame_stride"] == 10
        t = g["unix_t_ns"][:]
        assert (np.diff(t) >= 0).all() and r["time_range"] == [int(t[0]), int(t[-1])]
        assert r["timestamp_qc"] == g.attrs["timestamp_qc"]
        convert, calibrate = r["processing_history"]
        assert convert["input_checksums"] == [file_checksum(p) for p in sorted(
            obs.glob(f"*dp_{dp}*.pff"))]  # step 1's PFF inputs
        assert calibrate["input_checksums"] == [convert["output_checksum"]]
        assert r["cadence_ns"] == (10**6 if dp == "img16" else None)  # the run's config
    assert (level / "index.html").is_file()  # the quicklooks read the team's L1 too
    for lvl in (level, out / run_id / "L0"):
        meta = lvl / ".panoseti-meta"
        assert (meta / "manifest.json").is_file()  # the run bundle, copied into each level
        assert (meta / "hk.pff").read_bytes() == (obs / "hk.pff").read_bytes()
    # the kept L0, level-major too: pypff's reader opens the level; its manifest
    l0_level = out / run_id / "L0"
    from pypff.zarr import open_zarr_run

    reader = open_zarr_run(l0_level)
    assert reader.list_products() == ["dp_img16.bpp_2.module_1", "dp_ph256.bpp_2.module_1"]
    l0_manifest = json.loads((l0_level / "manifest.json").read_text())
    assert set(l0_manifest) == MANIFEST_KEYS and l0_manifest["level"] == "L0"
    for r in l0_manifest["stores"]:
        assert set(r) <= STORE_KEYS
        l0_store = l0_level / r["store"]
        assert r["checksum"] == data_checksum(l0_store)  # as step 2 recorded it
        assert r["checksum"] == records[r["dp"]]["processing_history"][0]["output_checksum"]
        assert records[r["dp"]]["source_store"] == r["store"]
        assert r["timestamp_qc"]["status"] in ("clean", "flagged")  # L0: never repaired
        assert r["calibration_params"] is None
