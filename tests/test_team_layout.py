"""run.sh with ``l1_layout = "panoseti_analysis"`` and ``method = "panoseti_analysis"``:
a night (img16 + ph256, DAQ names) laid out as PANOSETI's analysis storage spec says,
its housekeeping as one ``hk.<hashset>.zarr`` per source kind in ``L0/``, and our own
readers (open_run, open_products, the catalog, index.html, pff.py info) on it. One night
with ``--keep-l0`` for the module; one without, for where the housekeeping goes then."""

from __future__ import annotations

import json
import sys
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
import xarray as xr
import zarr
from pydantic import BaseModel, ConfigDict

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_run_sh import pff_frames, run, run_env, write_config  # noqa: E402

from panoseti_pipeline import open_products, open_run  # noqa: E402
from panoseti_pipeline import synthetic as synthetic_obs  # noqa: E402
from panoseti_pipeline.store.analysis_spec import data_checksum, file_checksum  # noqa: E402

#: their Manifest and StoreLineage fields (their models forbid any other key)
MANIFEST_KEYS = {"panoseti_analysis_storage_version", "manifest_schema_version", "run_id",
                 "level", "created_utc", "seed_manifest_version", "stores"}
STORE_KEYS = {"dp", "module", "level", "kind", "store", "n_frames", "time_range", "checksum",
              "source_store", "calibration_params", "timestamp_qc", "hashset", "cadence_ns",
              "model", "inference_params", "processing_history"}
HASHSETS = {"quabo", "gpsprim", "gpssupp", "wrswitch", "wps"}  # of the synthetic hk.pff
HK_RECORDS = 3 * (4 + 4) + 1  # three periods of the 8 sources of one module, one cut


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Step(_Strict):  # the field types of their ProcessingStep
    step_name: str
    step_version: str
    params: dict[str, Any]
    recipe_name: str | None = None
    recipe_hash: str | None = None
    input_checksums: list[str] = []
    output_checksum: str | None = None
    timestamp_utc: str
    software: dict[str, str] = {}


class HkLineage(_Strict):  # their StoreLineage, as an hk store's record fills it
    dp: str
    module: str
    level: str
    kind: str
    store: str
    n_frames: int
    time_range: tuple[int, int] | None = None
    checksum: str | None = None
    source_store: str | None = None
    calibration_params: dict[str, Any] | None = None
    timestamp_qc: dict[str, Any] | None = None
    hashset: str | None = None
    cadence_ns: int | None = None
    processing_history: list[Step] = []


def team_night(root: Path, keep_l0: bool) -> SimpleNamespace:
    obs = synthetic_obs.make_observation(root / "in", frames_per_file=300,
                                         files_per_stream=1, products=("img16", "ph256"))
    synthetic_obs.write_housekeeping(obs, HK_RECORDS, modules=(1,))  # three records a source
    cfg = write_config(root / "team.toml", "local", baseline_subtract={
        "method": "panoseti_analysis", "l1_layout": "panoseti_analysis", "frame_stride": 10})
    out = root / "out"
    rc, _, stderr = run([*(["--keep-l0"] if keep_l0 else []), str(obs), str(out)],
                        run_env(root, cfg), quicklook=True)
    assert rc == 0, stderr[-3000:]
    run_id = obs.name.removesuffix(".pffd")
    return SimpleNamespace(obs=obs, out=out, run_id=run_id, run_dir=out / run_id,
                           l0=out / run_id / "L0", l1=out / run_id / "L1")


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    return team_night(tmp_path_factory.mktemp("team"), keep_l0=True)


def hk_expected(hk_pff: Path) -> dict[str, list[tuple[int, str, dict[str, str]]]]:
    """hashset -> its records (time ns, source, fields), stably sorted by time: read here
    from the file (records separated by a blank line, the last one cut)."""
    *complete, _cut = hk_pff.read_bytes().split(b"\n\n")
    out: dict[str, list[tuple[int, str, dict[str, str]]]] = {}
    for piece in complete:
        ((source, fields),) = json.loads(piece).items()
        kind = "quabo" if source.startswith("QUABO_") else source.lower()
        t_ns = int(Decimal(fields["Computer_UTC"]) * 10**9)
        out.setdefault(kind, []).append((t_ns, source, fields))
    return {k: sorted(v, key=lambda r: r[0]) for k, v in out.items()}


def typed(values: list[str | None], dtype: np.dtype) -> np.ndarray:
    if dtype.kind == "f":
        return np.array([float(v) if v else np.nan for v in values])
    if dtype.kind == "i":
        return np.array([int(v) for v in values])
    return np.array(["" if v is None else v for v in values], dtype=object)


def test_a_night_in_the_team_layout(night) -> None:
    obs, run_id, level = night.obs, night.run_id, night.l1
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
        # as the team's tools open a store (their io.stores.open_store: xarray, without
        # consolidated metadata): the main array on (time, y, x), int64 ns times
        ds = xr.open_zarr(store, consolidated=False)
        assert ds[main].dims[0] == "time" and ds[main].shape[0] == r["n_frames"]
        assert ds["unix_t_ns"].dtype == np.int64
    for lvl in (level, night.l0):
        meta = lvl / ".panoseti-meta"
        assert (meta / "manifest.json").is_file()  # the run bundle, copied into each level
        assert (meta / "hk.pff").read_bytes() == (obs / "hk.pff").read_bytes()
    # the kept L0, level-major too: pypff's reader opens the level (it also keys the
    # housekeeping stores, which have no data_product, as one "dp_unknown" product)
    from pypff.zarr import open_zarr_run

    reader = open_zarr_run(night.l0)
    products = {"dp_img16.bpp_2.module_1", "dp_ph256.bpp_2.module_1"}
    assert products <= set(reader.list_products())
    assert reader.get_product("dp_ph256.bpp_2.module_1").total_frames == 300
    l0_manifest = json.loads((night.l0 / "manifest.json").read_text())
    assert set(l0_manifest) == MANIFEST_KEYS and l0_manifest["level"] == "L0"
    assert {r["kind"] for r in l0_manifest["stores"]} == {"img", "ph", "hk"}
    for r in (r for r in l0_manifest["stores"] if r["kind"] != "hk"):
        assert set(r) <= STORE_KEYS
        l0_store = night.l0 / r["store"]
        assert r["checksum"] == data_checksum(l0_store)  # as step 2 recorded it
        assert r["checksum"] == records[r["dp"]]["processing_history"][0]["output_checksum"]
        assert records[r["dp"]]["source_store"] == r["store"]
        assert r["timestamp_qc"]["status"] in ("clean", "flagged")  # L0: never repaired
        assert r["calibration_params"] is None


def test_housekeeping_is_one_store_per_hashset_in_L0(night) -> None:
    """Each hk.<hashset>.zarr holds that kind's records of hk.pff, value for value, on
    its own hk_t_ns; the L0 manifest has one record per store with their fields."""

    hk_pff = night.obs / "hk.pff"
    expected = hk_expected(hk_pff)
    assert set(expected) == HASHSETS
    manifest = json.loads((night.l0 / "manifest.json").read_text())
    hk_records = {r["hashset"]: r for r in manifest["stores"] if r["kind"] == "hk"}
    assert set(hk_records) == HASHSETS
    for hashset, recs in expected.items():
        store = night.l0 / f"hk.{hashset}.zarr"
        g = zarr.open_group(str(store), mode="r")
        times = np.array([t for t, _, _ in recs])
        np.testing.assert_array_equal(g["hk_t_ns"][:], times)
        assert g["hk_t_ns"].dtype == np.int64 and g.attrs["hashset"] == hashset
        fields = {f for _, _, fs in recs for f in fs} - {"Computer_UTC"}
        written = {a.attrs["hk_field"]: a for name, a in g.arrays()
                   if name not in ("hk_t_ns", "module", "quabo")}
        assert set(written) == fields
        for field, array in written.items():
            assert array.metadata.dimension_names == ("hk_time",)
            want = typed([fs.get(field) for _, _, fs in recs], array.dtype)
            np.testing.assert_array_equal(array[:], want, err_msg=f"{hashset} {field}")
        ds = xr.open_zarr(store)
        assert "hk_t_ns" in ds.coords and ds["hk_t_ns"].dtype == np.int64
        if hashset == "quabo":  # module and quabo of each record's board, as coordinates
            boards = np.array([int(s.removeprefix("QUABO_")) for _, s, _ in recs])
            np.testing.assert_array_equal(ds["module"].values, boards // 4)
            np.testing.assert_array_equal(ds["quabo"].values, boards % 4)
            assert {"module", "quabo"} <= set(ds["TEMP1"].coords)
            assert len(recs) == 4 * 3 and set(boards // 4) == {1}
        r = hk_records[hashset]
        HkLineage.model_validate_json(json.dumps(r))  # their fields and types, no others
        per_source: dict[str, list[int]] = {}
        for t, source, _ in recs:
            per_source.setdefault(source, []).append(t)
        gaps = np.concatenate([np.diff(sorted(ts)) for ts in per_source.values()])
        assert r == {**r, "dp": "hk", "module": "?", "level": "L0", "kind": "hk",
                     "store": store.name, "n_frames": len(recs),
                     "time_range": [int(times.min()), int(times.max())],
                     "checksum": data_checksum(store), "hashset": hashset,
                     "cadence_ns": int(np.median(gaps[gaps > 0])), "timestamp_qc": None}
        (step,) = r["processing_history"]
        assert step["step_name"] == "build_hk"
        assert step["input_checksums"] == [file_checksum(hk_pff)]
        assert step["output_checksum"] == r["checksum"]
        assert g.attrs["processing_history"] == r["processing_history"]
    # our quicklook stays beside the bundle; the store is the team's only
    (hk_dir,) = night.l1.glob("*.housekeeping")
    assert [p.suffix for p in hk_dir.iterdir()] == [".png"]
    (bundle,) = night.l1.glob("*.pffd.panoseti-meta")
    bundle_hk = json.loads((bundle / "manifest.json").read_text())["housekeeping"]
    assert bundle_hk["store"] is None
    assert sorted(bundle_hk["hk_stores"]) == sorted(f"../L0/hk.{h}.zarr" for h in HASHSETS)


def test_without_keep_l0_the_L0_level_holds_the_housekeeping(tmp_path: Path) -> None:
    """No L0 data stores are kept, but the team finds the housekeeping where their spec
    puts it: L0/ with its stores, its manifest and the run's metadata."""
    night = team_night(tmp_path, keep_l0=False)
    assert sorted(p.name for p in night.l0.iterdir()) == sorted(
        [".panoseti-meta", "manifest.json", *(f"hk.{h}.zarr" for h in HASHSETS)])
    manifest = json.loads((night.l0 / "manifest.json").read_text())
    assert set(manifest) == MANIFEST_KEYS and manifest["level"] == "L0"
    assert sorted(r["hashset"] for r in manifest["stores"]) == sorted(HASHSETS)
    assert all(r["kind"] == "hk" and r["checksum"] == data_checksum(night.l0 / r["store"])
               for r in manifest["stores"])
    assert (night.l0 / ".panoseti-meta" / "hk.pff").read_bytes() == (
        night.obs / "hk.pff").read_bytes()


# ---------------------------------------------------------------- our readers, this layout


def test_open_run_reads_both_levels_and_the_housekeeping(night) -> None:
    tree = open_run(night.run_dir)
    assert sorted(tree.children) == ["housekeeping", "module_1"]
    assert sorted(tree["module_1"].children) == ["img16_L0", "img16_L1", "ph256_L0",
                                                 "ph256_L1"]
    for dp, main in (("img16", "median_subtracted"), ("ph256", "pedestal_subtracted")):
        (pff_file,) = night.obs.glob(f"*dp_{dp}*.pff")
        raw, _ = pff_frames([pff_file])
        l0 = tree[f"module_1/{dp}_L0"].dataset
        np.testing.assert_array_equal(l0["images"].values, raw)  # the PFF's pixels
        l1 = tree[f"module_1/{dp}_L1"].dataset
        store = zarr.open_group(str(night.l1 / f"{night.run_id}.dp_{dp}.module_1.zarr"),
                                mode="r")
        np.testing.assert_array_equal(l1[main].values, store[main][:])
        np.testing.assert_array_equal(l1["l0_frame"].values, store["l0_frame"][:])
        assert l1.attrs["data_level"] == "L1"
    hk = tree["housekeeping"]
    assert sorted(hk.children) == sorted(HASHSETS)
    quabo = hk_expected(night.obs / "hk.pff")["quabo"]
    np.testing.assert_array_equal(hk["quabo"].dataset["TEMP1"].values,
                                  [float(f["TEMP1"]) for _, _, f in quabo])
    np.testing.assert_array_equal(hk["quabo"].dataset["hk_t_ns"].values,
                                  [t for t, _, _ in quabo])
    level = open_run(night.l1)  # one level of the run: its products, the run's housekeeping
    assert sorted(level["module_1"].children) == ["img16", "ph256"]
    assert sorted(level["housekeeping"].children) == sorted(HASHSETS)


def test_open_products_and_the_catalog_list_both_levels(night) -> None:
    from panoseti_pipeline import catalog

    rows = catalog.query(night.out)
    assert sorted((r["level"], r["data_product"]) for r in rows) == [
        ("L0", "img16"), ("L0", "ph256"), ("L1", "img16"), ("L1", "ph256")]
    for r in rows:
        store = Path(r["path"])
        assert store.parent == night.run_dir / r["level"] and r["run"] == night.run_id
        t = zarr.open_group(str(store), mode="r")["unix_t_ns"][:]
        assert r["module"] == 1 and r["frames"] == t.size == 300
        assert (r["first_ns"], r["last_ns"]) == (int(t[0]), int(t[-1]))
    assert catalog.rebuild(night.out) == 4  # the walk finds the same four, not the hk stores
    assert sorted(r["path"] for r in catalog.query(night.out)) == sorted(
        r["path"] for r in rows)
    store = night.l1 / f"{night.run_id}.dp_ph256.module_1.zarr"
    t = zarr.open_group(str(store), mode="r")["unix_t_ns"][:]
    lo, hi = t[[50, 200]]
    between = tuple(str(np.datetime64(int(v), "ns")) for v in (lo, hi))
    tree = open_products(night.out, dp="ph256", level="L1", between=between)
    ds = tree[f"{night.run_id}/module_1/ph256"].dataset
    inside = (t >= lo) & (t <= hi)
    assert ds.sizes["time"] == int(inside.sum()) >= 151
    np.testing.assert_array_equal(
        ds["pedestal_subtracted"].values,
        zarr.open_group(str(store), mode="r")["pedestal_subtracted"][:][inside])


def test_index_page_and_pff_info_on_the_team_layout(night, capsys) -> None:
    from panoseti_pipeline.pff.info import main

    page = (night.l1 / "index.html").read_text()
    for dp in ("img16", "ph256"):
        png = night.l1 / f"{night.run_id}.dp_{dp}.module_1.png"
        assert png.read_bytes().startswith(b"\x89PNG") and quote(png.name) in page
    (hk_png,) = night.l1.glob("*.housekeeping/*.hk.png")
    assert quote(f"{hk_png.parent.name}/{hk_png.name}") in page
    l1 = night.l1 / f"{night.run_id}.dp_ph256.module_1.zarr"
    l0 = night.l0 / f"{night.run_id}.dp_img16.module_1.zarr"
    hk = night.l0 / "hk.quabo.zarr"
    assert main(["info", str(l1), str(l0), str(hk)]) == 0
    out = capsys.readouterr().out.splitlines()
    frames = zarr.open_group(str(l1), mode="r")["pedestal_subtracted"].shape[0]
    assert out[0] == str(l1)
    assert out[1].startswith(f"  level=L1 dp=ph256 module=1 frames={frames} "
                             f"run={night.run_id} ")
    assert out[5] == str(l0) and out[6].startswith("  level=L0 dp=img16 module=1 frames=300 ")
    quabo = hk_expected(night.obs / "hk.pff")["quabo"]
    sources = sorted({s for _, s, _ in quabo}, key=lambda s: int(s.removeprefix("QUABO_")))
    assert out[-2:] == [str(hk), f"  housekeeping, hashset quabo: {len(quabo)} records of "
                        f"4 source(s) ({', '.join(sources)}), one every 10 s"]
