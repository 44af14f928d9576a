"""Step 1 (PFF -> L0): every array of the store against what was written into the PFF."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from panoseti_pipeline import pff
from panoseti_pipeline import synthetic as synthetic_obs
from panoseti_pipeline.cli import step1 as step1_pff_to_zarr

RUN_DIR = "obs_Lick.start_2024-07-25T04:34:46Z.runtype_sci-obs.pffd"


def small_config(tmp_path: Path, **pff_to_zarr) -> Path:
    keys = {"time_chunk": 64, "chunk_size_mb": 1, "num_workers": 2, **pff_to_zarr}
    body = "\n".join(f"{k} = {v!r}".replace("'", '"').replace("True", "true")
                     .replace("False", "false") for k, v in keys.items())
    path = tmp_path / "cfg.toml"
    path.write_text(f"[cluster]\nuse_dask = false\n[pff_to_zarr]\n{body}\n")
    return path


def make_stream(root: Path, dp: str, sizes: list[int], *, timing: str = "wr",
                seed: int = 0, module: int = 1, tail: bytes = b"", edit=None,
                cadence_ns: int = 1_000_000):
    """Write one stream's seqno files, named as the DAQ names them (a rolled-over file
    by the second its first frame came); return (paths, images, headers) as written."""
    run = root / RUN_DIR
    run.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    spec = synthetic_obs.StreamSpec(dp=dp, module=module, timing=timing)
    t0 = int(synthetic_obs.DEFAULT_START.timestamp()) * 10**9
    paths, all_images, all_headers, first = [], [], [], 0
    for seqno, n in enumerate(sizes):
        times = t0 + (first + np.arange(n, dtype=np.int64)) * cadence_ns
        headers = synthetic_obs.synth_headers(rng, spec, times, first_pkt=first)
        images = synthetic_obs.synth_images(rng, spec, n, first)
        if edit:
            edit(seqno, images, headers)
        start = synthetic_obs.opened_at(int(times[0])) if seqno else synthetic_obs.DEFAULT_START
        path = run / synthetic_obs.file_name(spec, start, seqno)
        with open(path, "wb") as f:
            pff.write_frames(f, dp, images, headers)
            if seqno == len(sizes) - 1:
                f.write(tail)
        paths.append(path)
        all_images.append(images)
        all_headers.append(headers)
        first += n
    headers = {k: np.concatenate([h[k] for h in all_headers]) for k in all_headers[0]}
    return paths, np.concatenate(all_images), headers


def expected_time(paths, headers):
    """Sequential reference: each file's time source, flags carried across files."""
    out_t, out_f, prev, at = [], [], pff.NAT, 0
    for p in paths:
        with pff.PFFReader(p) as r:
            source, n = pff.decide_time_source(r), r.index.n_frames
        t, f = pff.frame_times({k: v[at:at + n] for k, v in headers.items()}, source, prev)
        prev = pff.last_valid_time(t, prev)
        out_t.append(t)
        out_f.append(f)
        at += n
    return np.concatenate(out_t), np.concatenate(out_f)


def run_step1(*args: str) -> int:
    return step1_pff_to_zarr.main([*map(str, args), "--quiet"])


#: the dtype PANOSETI's spec gives each header field (pypff's writer), written out here
SPEC_DTYPES = {"quabo_num": "uint8", "pkt_num": "uint32", "pkt_tai": "uint16",
               "pkt_nsec": "uint32", "tv_sec": "int64", "tv_usec": "uint32"}


def header_columns(dp: str, headers) -> dict[str, tuple[str, np.ndarray]]:
    """The spec's header arrays of ``headers`` as written: name -> (PFF field, values):
    ``quabo_<i>_<field>`` for module products, the bare ``<field>`` for ph256."""
    if dp == "ph256":
        return {k: (k, v) for k, v in headers.items()}
    return {f"quabo_{q}_{k}": (k, v[:, q]) for k, v in headers.items() for q in range(4)}


def assert_store_matches(store: Path, paths, images, headers):
    g = zarr.open_group(str(store), mode="r")
    dp = pff.parse_name(paths[0]).dp
    assert g.attrs["processing_level"] == "L0" and g.attrs["data_product"] == dp
    assert g["images"].dtype == pff.PRODUCTS[dp].dtype
    np.testing.assert_array_equal(g["images"][:], images)
    columns = header_columns(dp, headers)
    for name, (field, v) in columns.items():
        assert g[name].dtype == np.dtype(SPEC_DTYPES[field]), name
        np.testing.assert_array_equal(g[name][:], v, err_msg=name)
    t, flags = expected_time(paths, headers)
    np.testing.assert_array_equal(g["time"][:], t)
    np.testing.assert_array_equal(g["frame_flags"][:], flags)
    assert g["unix_t_ns"].dtype == np.int64
    np.testing.assert_array_equal(g["unix_t_ns"][:], t)  # the exact times, NaT included
    assert g.attrs["total_frames"] == len(images)
    for arr in ("images", "time", "unix_t_ns", "frame_flags", *columns):
        assert g[arr].metadata.dimension_names[0] == "time"
    return g


@pytest.mark.parametrize("dp", sorted(pff.PRODUCTS))
def test_every_product_is_bit_exact(tmp_path, dp):
    paths, images, headers = make_stream(tmp_path, dp, [300])
    out = tmp_path / "out_L0.zarr"
    assert run_step1(paths[0], out, small_config(tmp_path)) == 0
    g = assert_store_matches(out, paths, images, headers)
    dims = g["pkt_num" if dp == "ph256" else "quabo_3_pkt_num"].metadata.dimension_names
    assert dims == ("time",)
    assert g["images"].chunks == (64, *pff.PRODUCTS[dp].shape)


def test_multi_seqno_stream_with_awkward_frames(tmp_path, capsys):
    def edit(seqno, images, headers):
        if seqno == 1:
            headers["pkt_nsec"][10, 2] = 1_000_000_321  # header drift
            headers["pkt_nsec"][20, 0] = pff.NSEC_CLAMPED
            for f in pff.MODULE_FIELDS:  # missing quabo 0
                headers[f][30, 0] = 0
            images[30, :16, :16] = 0

    extra = b"{\n   partial frame"
    paths, images, headers = make_stream(tmp_path, "img16", [150, 200, 130], edit=edit,
                                         tail=extra)
    (tmp_path / RUN_DIR / "start_2024-07-25T04:34:46Z.dp_img16.bpp_2.module_1.seqno_3.pff"
     ).touch()  # an empty file the DAQ left: skipped with a notice
    out = tmp_path / "stream_L0.zarr"
    files = [*reversed(paths), tmp_path / RUN_DIR /
             "start_2024-07-25T04:34:46Z.dp_img16.bpp_2.module_1.seqno_3.pff"]
    assert step1_pff_to_zarr.main([*map(str, files), str(out),
                                   str(small_config(tmp_path))]) == 0
    captured = capsys.readouterr()
    assert "seqno_3.pff: empty (0 bytes), skipped" in captured.err
    assert f"partial last frame dropped ({len(extra)} bytes" in captured.err
    assert "walked 1 frames" in captured.out
    g = assert_store_matches(out, paths, images, headers)
    src = g.attrs["source_files"]
    assert [s["seqno"] for s in src] == [0, 1, 2]
    assert [s["frames"] for s in src] == [150, 200, 130]
    assert src[1]["frames_walked"] == 1 and src[2]["partial_bytes_dropped"] == len(extra)
    assert g.attrs["observation"]["site"] == "Lick"
    flags = g["frame_flags"][:]
    assert flags[150 + 30] & pff.FLAG_MISSING_QUABO
    assert flags[150 + 20] == pff.FLAG_INVALID_NSEC | pff.FLAG_HOST_CLOCK
    assert g.attrs["flag_counts"]["missing_quabo"] == 1
    assert g.attrs["config"]["pff_to_zarr"]["time_chunk"] == 64
    assert {"pipeline", "python", "numpy", "zarr", "dask"} <= set(g.attrs["software"])


def test_gnss_timed_stream_uses_host_clock(tmp_path):
    paths, images, headers = make_stream(tmp_path, "img16", [200], timing="gnss")
    out = tmp_path / "gnss_L0.zarr"
    assert run_step1(paths[0], out, small_config(tmp_path)) == 0
    g = assert_store_matches(out, paths, images, headers)
    assert g.attrs["time_source"] == "host_clock"
    assert (g["frame_flags"][:] == pff.FLAG_HOST_CLOCK).all()


def test_xarray_opens_the_store_with_a_time_index(tmp_path):
    paths, images, headers = make_stream(tmp_path, "img16", [100])
    out = tmp_path / "x_L0.zarr"
    assert run_step1(paths[0], out, small_config(tmp_path)) == 0
    ds = xr.open_zarr(out)
    assert ds["time"].dtype == np.dtype("datetime64[ns]")
    t, _ = expected_time(paths, headers)
    np.testing.assert_array_equal(ds["time"].values.astype(np.int64), t)
    assert ds["images"].dims == ("time", "y", "x")
    np.testing.assert_array_equal(ds["images"].isel(time=5).values, images[5])
    for q in range(4):  # every header array, in the root group
        assert ds[f"quabo_{q}_pkt_nsec"].dims == ("time",)
        np.testing.assert_array_equal(ds[f"quabo_{q}_pkt_nsec"].values, headers["pkt_nsec"][:, q])
    tree = xr.open_datatree(out, engine="zarr")
    assert tree.ds["quabo_0_pkt_nsec"].dims == ("time",)
    assert "time" in tree.ds.indexes


def test_dask_cluster_output_is_byte_identical_to_local(tmp_path):
    from distributed import LocalCluster

    from panoseti_pipeline import cluster as dask_cluster

    paths, images, headers = make_stream(tmp_path, "img16", [400, 130])
    cfg = small_config(tmp_path)
    local, remote = tmp_path / "local_L0.zarr", tmp_path / "dask_L0.zarr"
    assert step1_pff_to_zarr.main([*map(str, paths), str(local), str(cfg), "--quiet"]) == 0
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, interface="lo",
                      dashboard_address="127.0.0.1:0") as cluster:
        assert step1_pff_to_zarr.main([*map(str, paths), str(remote), str(cfg),
                                       cluster.scheduler_address, "--quiet"]) == 0
        with dask_cluster.connect_client(cluster.scheduler_address) as client:
            assert len(client.scheduler_info()["workers"]) == 2
    assert zarr.open_group(str(remote)).attrs["report"]["mode"] == "dask"
    assert_store_matches(remote, paths, images, headers)
    assert chunk_digests(local) == chunk_digests(remote)


def chunk_digests(store: Path) -> dict[str, str]:
    """sha256 of every chunk file (metadata differs: it records the mode and time)."""
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.rglob("*")) if p.is_file() and "/c/" in str(p)}


def test_rerun_leaves_a_complete_store_alone(tmp_path, capsys):
    paths, _, _ = make_stream(tmp_path, "ph256", [120])
    out, cfg = tmp_path / "ph_L0.zarr", small_config(tmp_path)
    assert run_step1(paths[0], out, cfg) == 0
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    assert run_step1(paths[0], out, cfg) == 0
    assert "already there, left alone" in capsys.readouterr().out
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    assert before == after
    assert step1_pff_to_zarr.main([str(paths[0]), str(out), str(cfg), "--quiet",
                                   "--overwrite"]) == 0
    assert zarr.open_group(str(out)).attrs["created"]


def test_failure_mid_write_leaves_no_store(tmp_path, capsys):
    paths, _, _ = make_stream(tmp_path, "img16", [600])
    data = bytearray(paths[0].read_bytes())
    data[500 * 2540 + 100] = ord("#")  # a digit of frame 500's header: fails in its task
    os.chmod(paths[0], 0o644)
    paths[0].write_bytes(bytes(data))
    digest = hashlib.sha256(paths[0].read_bytes()).hexdigest()
    out = tmp_path / "bad_L0.zarr"
    # strict: the corrupt frame fails its task (by default it would be skipped, recorded)
    assert run_step1(paths[0], out, small_config(tmp_path, strict=True)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(paths[0]) in err[0] and f"byte {500 * 2540}" in err[0]
    assert not out.exists()
    assert not list(tmp_path.glob("bad_L0.zarr*"))  # nor a partial store
    assert hashlib.sha256(paths[0].read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("case", ["missing", "mixed", "duplicate", "not_pff", "all_empty",
                                  "bad_config", "unwritable"])
def test_bad_input_gets_one_line_and_no_output(tmp_path, capsys, case):
    paths, _, _ = make_stream(tmp_path, "img16", [70, 70])
    other, _, _ = make_stream(tmp_path, "ph256", [50])
    cfg = small_config(tmp_path)
    out = tmp_path / "out" / "o_L0.zarr"
    args = {"missing": [tmp_path / "nope.pff"],
            "mixed": [paths[0], other[0]],
            "duplicate": [paths[0], paths[0]],
            "not_pff": [tmp_path / "data.bin"],
            "all_empty": [tmp_path / RUN_DIR / "start_2024-07-25T04:34:46Z.dp_img8.bpp_1."
                                                "module_1.seqno_0.pff"],
            "bad_config": [paths[0]],
            "unwritable": [paths[0]]}[case]
    (tmp_path / "data.bin").write_bytes(b"x")
    args[0].touch() if case == "all_empty" else None
    if case == "bad_config":
        cfg.write_text("[pff_to_zarr]\ncodex = 'zstd'\n")
    if case == "unwritable":  # root may write anywhere: a file where the directory goes
        out.parent.write_text("not a directory")
    rc = step1_pff_to_zarr.main([*map(str, args), str(out), str(cfg), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == (2 if case == "bad_config" else 1), err
    assert "Traceback" not in err and err.startswith("step1_pff_to_zarr.py: error:")
    expect = {"missing": "nope.pff: no such file", "mixed": "not one stream",
              "duplicate": "duplicate seqno [0]", "not_pff": "not a PFF data file name",
              "all_empty": "every input file is empty",
              "bad_config": "unknown key 'codex' (did you mean 'codec'?)",
              "unwritable": "cannot create output directory"}[case]
    assert expect in err
    assert not out.exists()


def image_codecs(array) -> list:
    """The codecs of each chunk of ``array``: inside the shards when it is sharded."""
    codecs = array.metadata.codecs
    if codecs[0].to_dict()["name"] == "sharding_indexed":
        return list(codecs[0].codecs)
    return list(codecs)


@pytest.mark.parametrize("keys,codecs", [
    ({}, ["bytes", "blosc", "crc32c"]),
    ({"codec": "zstd", "level": 1, "shuffle": "byte", "checksum": False, "shard_factor": 2},
     ["bytes", "blosc"]),
    ({"codec": "gzip", "level": 9, "shard_factor": 0}, ["bytes", "gzip", "crc32c"]),
    ({"codec": "none", "checksum": False, "shard_factor": 0}, ["bytes"]),
])
def test_every_pff_to_zarr_key_acts(tmp_path, keys, codecs):
    paths, images, headers = make_stream(tmp_path, "img16", [500])
    out = tmp_path / "k_L0.zarr"
    cfg = small_config(tmp_path, time_chunk=100, chunk_size_mb=1, num_workers=3,
                       blosc_threads=2, max_concurrent_writes=3, **keys)
    assert run_step1(paths[0], out, cfg) == 0
    g = assert_store_matches(out, paths, images, headers)
    assert [c.to_dict()["name"] for c in image_codecs(g["images"])] == codecs
    if "blosc" in codecs:
        blosc = image_codecs(g["images"])[1].to_dict()["configuration"]
        assert blosc["cname"] == ("zstd" if keys.get("codec") == "zstd" else "lz4")
        assert blosc["clevel"] == keys.get("level", 5)
        assert blosc["shuffle"] == {"byte": "shuffle"}.get(keys.get("shuffle"), "bitshuffle")
    assert g["images"].chunks[0] == 100 and g["quabo_0_pkt_nsec"].chunks == (100,)
    shard_factor = keys.get("shard_factor", 64)  # the shipped default
    files = sorted(p for p in (out / "images" / "c").rglob("*") if p.is_file())
    if shard_factor:  # tasks own whole shards: 1 of 6400 frames, or 3 of 200 frames
        assert g.attrs["shard_factor"] == shard_factor
        for name in ("images", "unix_t_ns", "quabo_0_pkt_nsec", "frame_flags"):
            assert g[name].shards[0] == 100 * shard_factor, name
        assert g.attrs["report"]["tasks"] == len(files) == -(-500 // (100 * shard_factor))
    else:  # chunk_size_mb = 1 is ~394 img16 frames: tasks of 4 chunks of 100 frames
        assert g["images"].shards is None and "shard_factor" not in g.attrs
        assert g.attrs["report"]["tasks"] == 2 and len(files) == 5
    assert zarr.config.get("async.concurrency") == 3
    assert zarr.config.get("threading.max_workers") == 2 * 3  # blosc_threads per task


def test_overwrite_never_removes_what_is_not_a_product(tmp_path, capsys):
    from panoseti_pipeline.cli import step2 as step2_dask_baseline

    paths, _, _ = make_stream(tmp_path, "img16", [50])
    run, cfg = paths[0].parent, small_config(tmp_path)
    before = {p: p.read_bytes() for p in run.iterdir()}
    # the observation directory itself given as the output, by mistake
    assert run_step1(paths[0], run, cfg, "--overwrite") == 1
    assert "is not an L0 store written by this pipeline" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run.iterdir()} == before
    l0 = tmp_path / "ok_L0.zarr"
    assert run_step1(paths[0], l0, cfg) == 0
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("keep me")
    assert step2_dask_baseline.main([str(l0), str(notes), "--config", str(cfg), "--quiet",
                                     "--overwrite"]) == 1
    assert "is not an L1 store written by this pipeline" in capsys.readouterr().err
    assert (notes / "notes.txt").read_text() == "keep me"
    # an L0 product is not replaced by step 2 either
    assert step2_dask_baseline.main([str(l0), str(tmp_path / "l1.zarr"), "--config",
                                     str(cfg), "--quiet"]) == 0
    assert run_step1(paths[0], tmp_path / "l1.zarr", cfg, "--overwrite") == 1
    assert zarr.open_group(str(tmp_path / "l1.zarr")).attrs["processing_level"] == "L1"


def test_rolled_over_files_are_joined_whatever_their_start_and_odd_names_are_told(
        tmp_path, capsys):
    # 40 frames 2 s apart: seqno 1 starts 80 s (a later minute) after seqno 0
    paths, images, headers = make_stream(tmp_path, "img16", [40, 40, 40],
                                         cadence_ns=2_000_000_000)
    assert "T04:34:46Z" in paths[0].name and "T04:36:06Z" in paths[1].name
    cfg = small_config(tmp_path)
    assert step1_pff_to_zarr.main([*map(str, paths), str(tmp_path / "a_L0.zarr"),
                                   str(cfg)]) == 0
    err = capsys.readouterr().err
    assert "seqno" not in err and "start_" not in err, err  # as the DAQ writes them
    group = zarr.open_group(str(tmp_path / "a_L0.zarr"))
    assert group.attrs["total_frames"] == 120
    np.testing.assert_array_equal(group["images"][:], images)
    # a file named earlier than its predecessor (a renamed file?) is joined and told
    earlier = paths[2].with_name(paths[2].name.replace("T04:37:26Z", "T04:30:00Z"))
    paths[2].rename(earlier)
    assert step1_pff_to_zarr.main([str(paths[0]), str(paths[1]), str(earlier),
                                   str(tmp_path / "b_L0.zarr"), str(cfg)]) == 0
    assert ("seqno 2 is named start_04:30:00Z, before seqno 1 (start_04:36:06Z)"
            in capsys.readouterr().err)
    assert zarr.open_group(str(tmp_path / "b_L0.zarr")).attrs["total_frames"] == 120
    # a gap is told; another module is not joined
    assert step1_pff_to_zarr.main([str(paths[0]), str(earlier), str(tmp_path / "c_L0.zarr"),
                                   str(cfg)]) == 0
    assert "seqno 1 missing; joined without it" in capsys.readouterr().err
    assert zarr.open_group(str(tmp_path / "c_L0.zarr")).attrs["total_frames"] == 80
    other, _, _ = make_stream(tmp_path, "img16", [40], module=2)
    assert run_step1(paths[0], other[0], tmp_path / "d_L0.zarr", cfg) == 1
    assert "not one stream" in capsys.readouterr().err


def test_a_stream_with_daq_names_converts_to_one_l0_with_every_frame(tmp_path, capsys):
    """Three seqno files as the generator (and the DAQ) names them: seqno 0 by the run's
    start, each rolled-over file by the second its first frame came -- seqno 1 at a later
    minute (PFF_FORMAT.md §6). One stream: one L0 with every frame."""
    run = tmp_path / RUN_DIR
    run.mkdir()
    spec = synthetic_obs.StreamSpec(dp="img16", frames_per_file=40, files=3,
                                    cadence_ns=3_000_000_000)
    paths = synthetic_obs.write_stream(run, spec)
    starts = [pff.parse_name(p).start for p in paths]
    assert starts[0] == synthetic_obs.DEFAULT_START
    assert starts[0] < starts[1] < starts[2]
    assert (starts[1].hour, starts[1].minute) > (starts[0].hour, starts[0].minute)
    assert len({pff.parse_name(p).start for p in paths}) == 3  # three different start_
    parts = []
    for path in paths:  # what was written, read back frame by frame
        with pff.PFFReader(path) as reader:
            parts.append(reader.read(0, reader.index.n_frames))
    images = np.concatenate([f.images for f in parts])
    headers = {k: np.concatenate([f.headers[k] for f in parts]) for k in parts[0].headers}
    out = tmp_path / "daq_L0.zarr"
    assert step1_pff_to_zarr.main([*map(str, reversed(paths)), str(out),
                                   str(small_config(tmp_path))]) == 0
    err = capsys.readouterr().err
    assert "seqno" not in err and "start_" not in err, err  # nothing odd to tell
    g = assert_store_matches(out, paths, images, headers)
    assert g.attrs["total_frames"] == len(images) == 120
    assert g.attrs["source_pff_files"] == [p.name for p in paths]
    assert [s["seqno"] for s in g.attrs["source_files"]] == [0, 1, 2]
    assert [s["frames"] for s in g.attrs["source_files"]] == [40, 40, 40]
    assert list(tmp_path.glob("*.zarr")) == [out]


@pytest.mark.parametrize("dp", ["img16", "img8", "ph1024", "ph256"])
def test_spec_arrays_hold_the_times_and_header_values_written(tmp_path, dp):
    """PANOSETI's layout read with plain zarr: ``unix_t_ns`` is the exact time written
    (White Rabbit: quabo 0's second and ns, PFF_FORMAT.md §4) and every
    ``quabo_<i>_<field>`` (ph256: ``<field>``) holds that quabo's field as written."""
    product = pff.PRODUCTS[dp]
    ph256 = dp == "ph256"
    n, quabos = 150, 1 if ph256 else 4
    rng = np.random.default_rng(11)
    t0 = int(synthetic_obs.DEFAULT_START.timestamp()) * 10**9 + 999_000_000
    times = t0 + np.cumsum(rng.integers(1, 30_000_000, n))  # crosses seconds, odd ns
    per_quabo = times[:, None] + np.arange(quabos) * 7  # quabo 0's is the frame time
    arrival = per_quabo + rng.integers(200_000, 400_000, (n, quabos))
    headers = {"pkt_num": rng.integers(0, 65536, (n, quabos)),
               "pkt_tai": (per_quabo // 10**9 + 37) % 1024,
               "pkt_nsec": per_quabo % 10**9,
               "tv_sec": arrival // 10**9,
               "tv_usec": arrival // 1000 % 10**6}
    if ph256:
        headers = {"quabo_num": rng.integers(0, 4, n), **{k: v[:, 0] for k, v in
                                                         headers.items()}}
    info = np.iinfo(product.dtype)
    images = rng.integers(info.min, int(info.max) + 1, (n, *product.shape)).astype(
        product.dtype)
    run = tmp_path / RUN_DIR
    run.mkdir()
    path = run / synthetic_obs.file_name(synthetic_obs.StreamSpec(dp=dp, module=254),
                                         synthetic_obs.DEFAULT_START, 0)
    with open(path, "wb") as f:
        pff.write_frames(f, dp, images, headers)
    out = tmp_path / f"{dp}_L0.zarr"
    assert run_step1(path, out, small_config(tmp_path)) == 0

    g = zarr.open_group(str(out), mode="r")
    fields = ["pkt_num", "pkt_tai", "pkt_nsec", "tv_sec", "tv_usec"]
    expected = ({f: (f, f, headers[f]) for f in ["quabo_num", *fields]} if ph256 else
                {f"quabo_{q}_{f}": (f, f"quabo_{q}.{f}", headers[f][:, q])
                 for q in range(4) for f in fields})  # name: field, its header key, values
    assert set(g.array_keys()) == {"images", "unix_t_ns", "time", "frame_flags", *expected}
    np.testing.assert_array_equal(g["images"][:], images)
    assert g["unix_t_ns"].dtype == np.int64
    np.testing.assert_array_equal(g["unix_t_ns"][:], times)
    np.testing.assert_array_equal(g["time"][:], times)
    assert not g["frame_flags"][:].any()
    for name, (field, key, values) in expected.items():
        assert g[name].dtype == np.dtype(SPEC_DTYPES[field]), name
        assert g[name].attrs["pff_header_field"] == key
        assert g[name].metadata.dimension_names == ("time",)
        np.testing.assert_array_equal(g[name][:], values, err_msg=name)
    attrs = g.attrs
    assert (attrs["data_product"], attrs["bytes_per_pixel"], attrs["module"],
            attrs["total_frames"]) == (dp, product.bpp, "254", n)
    assert attrs["source_pff_files"] == [path.name]
    assert attrs["header_format"] == ("single" if ph256 else "module")
    listed = attrs["header_fields"] if ph256 else attrs["quabo_fields"]
    assert sorted(listed) == sorted(expected)
    assert (attrs["quabo_fields"] if ph256 else attrs["header_fields"]) == []


def test_longer_headers_that_add_up_to_whole_frames_are_found(tmp_path, capsys):
    # 636 one-byte-longer ph256 headers = exactly one frame more: the start, middle and
    # end samples still line up, the tasks in between do not
    def edit(_seqno, _images, headers):
        headers["pkt_nsec"][1100:1736] = 1_000_000_000 + np.arange(636)

    paths, images, headers = make_stream(tmp_path, "ph256", [5000], edit=edit)
    assert paths[0].stat().st_size == 5001 * 636
    out = tmp_path / "long_L0.zarr"
    assert step1_pff_to_zarr.main([str(paths[0]), str(out),
                                   str(small_config(tmp_path))]) == 0
    assert "converting again" in capsys.readouterr().err
    g = assert_store_matches(out, paths, images, headers)
    assert g.attrs["source_files"][0]["frames_walked"] == 636


def test_out_of_order_flag_does_not_depend_on_task_boundaries(tmp_path):
    def edit(_seqno, _images, headers):
        for f in pff.MODULE_FIELDS:
            headers[f][374:384] = 0  # ten frames with no live quabo before the boundary
            headers[f][384] = headers[f][300]  # then a time earlier than frame 373's

    paths, images, headers = make_stream(tmp_path, "img16", [800], edit=edit)
    out = tmp_path / "ooo_L0.zarr"
    assert run_step1(paths[0], out, small_config(tmp_path, shard_factor=6)) == 0
    g = assert_store_matches(out, paths, images, headers)
    assert g.attrs["report"]["tasks"] == 3  # frames 0..383, 384..767, 768..799
    assert g["frame_flags"][384] & pff.FLAG_OUT_OF_ORDER


def test_a_corrupt_frame_is_skipped_recorded_and_flagged_by_default(tmp_path, capsys):
    """issue 12: one bad header digit no longer costs the file; every other frame exact."""
    paths, images, headers = make_stream(tmp_path, "img16", [600])
    data = bytearray(paths[0].read_bytes())
    data[500 * 2540 + 100] = ord("#")  # a digit of frame 500's header
    os.chmod(paths[0], 0o644)
    paths[0].write_bytes(bytes(data))
    out = tmp_path / "x_L0.zarr"
    assert step1_pff_to_zarr.main([str(paths[0]), str(out), str(small_config(tmp_path))]) == 0
    captured = capsys.readouterr()
    assert "CORRUPT DATA SKIPPED" in captured.err and "DEGRADED" in captured.out
    group = zarr.open_group(str(out), mode="r")
    keep = np.r_[0:500, 501:600]  # frame 500 is lost, the rest bit-exact
    np.testing.assert_array_equal(group["images"][:], images[keep])
    np.testing.assert_array_equal(group["quabo_2_pkt_num"][:], headers["pkt_num"][keep, 2])
    (skipped,) = group.attrs["source_files"][0]["skipped"]
    assert skipped["offset"] <= 500 * 2540 + 100 < skipped["offset"] + skipped["length"]
    assert np.flatnonzero(group["frame_flags"][:] & pff.FLAG_AFTER_GAP).tolist() == [500]
    assert group.attrs["report"]["degraded"] is True


@pytest.mark.parametrize("array,chunk", [("images", 0), ("quabo_2_pkt_nsec", 2), ("time", 4)])
def test_a_chunk_written_wrong_fails_verification_and_nothing_is_published(
        tmp_path, monkeypatch, capsys, array, chunk):
    """A task that writes one wrong value (of the first, middle or last chunk): the read
    back finds it, step 1 fails naming the chunk, and no store is left."""
    from panoseti_pipeline import step1

    paths, _, _ = make_stream(tmp_path, "img16", [450])
    decode_chunk = step1.decode_chunk

    def one_value_wrong(files, a, b):
        values, summary = decode_chunk(files, a, b)
        if a == chunk * 100:
            values = {**values, array: values[array].copy()}
            values[array].reshape(-1)[7] += 1
        return values, summary

    monkeypatch.setattr(step1, "decode_chunk", one_value_wrong)
    out = tmp_path / "bad_L0.zarr"
    assert run_step1(paths[0], out, small_config(tmp_path, time_chunk=100)) == 1
    err = capsys.readouterr().err
    assert f"chunk {chunk} (frames {chunk * 100}..{min(449, chunk * 100 + 99)}) read back " \
           "differs from the PFF input" in err, err
    assert not out.exists() and not list(tmp_path.glob("bad_L0.zarr*"))
