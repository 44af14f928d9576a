"""Fault campaign: bad input, crashes, interrupts, permissions (DESIGN.md §8).

Every case asserts what a user at 3 a.m. relies on: the exit status; one clear line on
stderr naming the file and the problem (no traceback without ``--debug``); no store under
a final name that is not complete (and no partial store left after a clean failure);
inputs byte-identical afterwards (checksums, modes and directory mtimes before/after);
no process left running (every process of the command's session, ``/proc``).

How the faults are made (tests/fault_tools.py):

* permissions as root: the command runs without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH
  (``setpriv --bounding-set``), so chmod 000 and read-only directories bite as for any
  user (the venv's interpreter is under /root, mode 0700, so a uid switch cannot work);
* disk full: a small tmpfs mounted by the test and filled with a ballast file; the
  ballast is removed for the rerun; always unmounted;
* kill points: ``SLOW_TASK`` (each step task sleeps first) and
  ``SLOW_PUBLISH="SECONDS[:NAME_SUFFIX]"`` (a verified store is held just before its
  rename): variables of the test-only plugin ``tests/plugins/sitecustomize.py``, which
  ``base_env`` puts on PYTHONPATH; the pipeline reads none of them;
* signals to run.sh: SIGINT to its process group (as a terminal's Ctrl-C), SIGTERM to its
  PID only; the lifecycle manager is found among run.sh's session and killed by PID.

Every Dask address stays on loopback (``interface = "lo"``, ``dashboard_port = 0``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
from fault_tools import (
    RUN_SH,
    SLOW_PUBLISH,
    SLOW_TASK,
    STEP1,
    STEP2,
    Spawned,
    as_unprivileged,
    assert_nothing_left,
    assert_one_error,
    base_env,
    chunk_digests,
    error_lines,
    fill,
    leftovers,
    permission_problems,
    run_cmd,
    store_arrays,
    tmpfs,
    tree_snapshot,
)

from panoseti_pipeline import pff
from panoseti_pipeline import synthetic as synthetic_obs
from panoseti_pipeline.cli import step1 as step1_pff_to_zarr
from panoseti_pipeline.cli import step2 as step2_dask_baseline
from panoseti_pipeline.driver import cli as driver_cli

pytestmark = pytest.mark.faults

FRAMES = 300  # per seqno file; the stream has two files
OBS = "obs_Lick.start_2024-07-25T04:34:46Z.runtype_sci-obs.pffd"
RUN = OBS[: -len(".pffd")]  # run.sh's directory of that run's products
STREAM = RUN + ".dp_img16.bpp_2.module_1"
FRAME_BYTES = pff.PRODUCTS["img16"].frame_bytes
STEPS = {"pff_to_zarr": {"time_chunk": 64, "shard_factor": 3, "num_workers": 1},
         "baseline_subtract": {"baseline_window": 100, "compute_chunk_size": 64,
                               "shard_factor": 3}}
CONFIGS = {
    "local": {"cluster": {"use_dask": False}, **STEPS},
    "dask": {"cluster": {"use_dask": True, "cluster_type": "local", "interface": "lo",
                         "local_workers": 2, "local_threads_per_worker": 1,
                         "local_memory_per_worker": "1GB", "dashboard_port": 0,
                         "startup_timeout_s": 60.0}, **STEPS},
}


def write_config(path: Path, mode: str = "local", **run: object) -> Path:
    import tomli_w

    values = json.loads(json.dumps(CONFIGS[mode]))
    if run:
        values["run"] = run
    path.write_text(tomli_w.dumps(values))
    return path


def pff_name(dp: str = "img16", module: int = 1, seqno: int = 0, bpp: int | None = None) -> str:
    bpp = pff.PRODUCTS[dp].bpp if bpp is None and dp in pff.PRODUCTS else (bpp or 2)
    return f"start_2024-07-25T04:34:46Z.dp_{dp}.bpp_{bpp}.module_{module}.seqno_{seqno}.pff"


class Data:
    """One observation (a .pffd with one img16 stream of two seqno files, an hk.pff and
    empty files of the other products) and the reference L0 and L1 of that stream, made
    by an uninterrupted run of each step."""

    def __init__(self, root: Path) -> None:
        self.obs = synthetic_obs.make_observation(root / "input", frames_per_file=FRAMES,
                                                  files_per_stream=2, products=("img16",))
        self.stream = sorted(self.obs.glob("*dp_img16*.pff"))
        self.config = write_config(root / "local.toml")
        self.l0 = root / "ref" / f"{STREAM}_L0.zarr"
        self.l1 = root / "ref" / f"{STREAM}_L1.zarr"
        assert step1_pff_to_zarr.main([*map(str, self.stream), str(self.l0),
                                       str(self.config), "--quiet"]) == 0
        assert step2_dask_baseline.main([str(self.l0), str(self.l1), "--config",
                                         str(self.config), "--quiet"]) == 0
        self.l0_digests = chunk_digests(self.l0)
        self.l1_digests = chunk_digests(self.l1)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    return Data(tmp_path_factory.mktemp("faults"))


def assert_same_store(store: Path, reference: Path) -> None:
    """Byte-identical chunks and equal values: as if never interrupted."""
    assert chunk_digests(store) == chunk_digests(reference)
    got, want = store_arrays(store), store_arrays(reference)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def only(directory: Path) -> list[str]:
    """What is in a directory (nothing may be there after a failed step)."""
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# =========================================================================== bad input


def _bad_step1_inputs(case: str, d: Path, good: bytes) -> tuple[list[Path], list[str]]:
    """Inputs of one bad-input case, and what its error line must name."""
    def put(name: str, content: bytes) -> Path:
        (d / name).write_bytes(content)
        return d / name

    if case == "nonexistent":
        p = d / pff_name(module=2)
        return [p], [str(p), "no such file"]
    if case == "directory":
        (d / pff_name(module=3)).mkdir()
        return [d / pff_name(module=3)], [str(d / pff_name(module=3)), "not a regular file"]
    if case == "empty_file":
        p = put(pff_name(module=4), b"")
        return [p], [str(p), "empty (0 bytes)"]
    if case == "truncated_in_first_header":
        p = put(pff_name(module=5), good[:100])
        return [p], [str(p), "no whole frame (100 bytes"]
    if case == "random_bytes":
        rng = np.random.default_rng(5)
        p = put(pff_name(module=6), rng.integers(0, 256, 40_000, np.uint8).tobytes())
        return [p], [str(p), "not a PFF file: byte 0"]
    if case == "unknown_dp":
        p = put(pff_name(dp="img32", bpp=2), good)
        return [p], [str(p), "unknown data product dp_img32"]
    if case == "bpp_disagrees":
        p = put(pff_name(bpp=1), good)
        return [p], [str(p), "bpp_1 disagrees with dp_img16"]
    if case == "legacy_header":
        legacy = {f"quabo_{q}": {"acq_mode": 2, "mod_num": 1, "pkt_num": 5, "pkt_tai": 3,
                                 "pkt_nsec": 7, "pkt_utc": 9, "tv_sec": 1650000000,
                                 "tv_usec": 5} for q in range(4)}
        frame = json.dumps(legacy).encode() + b"\n\n*" + bytes(2048)
        p = put(pff_name(module=7), frame * 3)
        return [p], [str(p), "legacy PFF header at byte 0"]
    if case == "housekeeping":
        p = synthetic_obs.write_housekeeping(d)
        return [p], [str(p), "housekeeping"]
    if case == "two_streams":
        a = put(pff_name(module=8), good)
        b = put(pff_name(module=9, seqno=1), good)
        return [a, b], [a.name, b.name, "not one stream"]
    if case == "duplicate_seqno_same_file":
        a = put(pff_name(module=10), good)
        return [a, a], [str(a), "duplicate seqno [0]"]
    if case == "duplicate_seqno_copies":  # the same file name in two directories
        a = put(pff_name(module=11), good)
        (d / "copy").mkdir()
        b = d / "copy" / a.name
        b.write_bytes(good)
        return [a, b], [str(a), str(b), "not one stream"]
    raise AssertionError(case)


BAD_STEP1 = ["nonexistent", "directory", "empty_file", "truncated_in_first_header",
             "random_bytes", "unknown_dp", "bpp_disagrees", "legacy_header", "housekeeping",
             "two_streams", "duplicate_seqno_same_file", "duplicate_seqno_copies"]


@pytest.mark.parametrize("case", BAD_STEP1)
def test_step1_bad_input(data: Data, tmp_path: Path, capsys: pytest.CaptureFixture,
                         case: str) -> None:
    d = tmp_path / "in"
    d.mkdir()
    inputs, needles = _bad_step1_inputs(case, d, data.stream[0].read_bytes())
    before = tree_snapshot(d)
    out = tmp_path / "out" / "x_L0.zarr"
    rc = step1_pff_to_zarr.main([*map(str, inputs), str(out), str(data.config), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert_one_error(err, "step1_pff_to_zarr.py", *needles)
    assert only(out.parent) == []
    assert tree_snapshot(d) == before


@pytest.mark.parametrize("cut", ["mid_header", "mid_pixels"])
def test_step1_truncated_last_frame_is_dropped_and_reported(
        data: Data, tmp_path: Path, capsys: pytest.CaptureFixture, cut: str) -> None:
    """A file cut inside its last frame (the DAQ stopped): the whole frames are kept, the
    partial one is dropped, counted in the attributes and reported on stderr."""
    dropped = 100 if cut == "mid_header" else FRAME_BYTES - 50
    (tmp_path / "in").mkdir()
    p = tmp_path / "in" / data.stream[0].name
    p.write_bytes(data.stream[0].read_bytes()[: 200 * FRAME_BYTES + dropped])
    before = tree_snapshot(p.parent)
    out = tmp_path / "out" / "x_L0.zarr"
    rc = step1_pff_to_zarr.main([str(p), str(out), str(data.config)])
    err = capsys.readouterr().err
    assert rc == 0, err
    notices = [line for line in error_lines(err) if "partial last frame dropped" in line]
    assert len(notices) == 1 and str(p) in notices[0] and f"({dropped} bytes" in notices[0]
    import zarr

    group = zarr.open_group(str(out), mode="r")
    assert group.attrs["total_frames"] == 200
    assert group.attrs["source_files"][0]["partial_bytes_dropped"] == dropped
    ref = zarr.open_group(str(data.l0), mode="r")
    np.testing.assert_array_equal(group["images"][:], ref["images"][:200])
    assert tree_snapshot(p.parent) == before


def test_step1_unreadable_file(data: Data, tmp_path: Path) -> None:
    """chmod 000, run without the DAC-override capabilities (or as a normal user)."""
    p = tmp_path / data.stream[0].name
    shutil.copyfile(data.stream[0], p)
    p.chmod(0)
    before = tree_snapshot(tmp_path)
    out = tmp_path / "out" / "x_L0.zarr"
    rc, _, err = run_cmd(as_unprivileged([sys.executable, STEP1, str(p), str(out),
                                          str(data.config), "--quiet"]), base_env(tmp_path))
    assert rc == 1, err
    assert_one_error(err, "step1_pff_to_zarr.py", str(p), "not readable (permission denied)")
    assert only(out.parent) == []
    after = tree_snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k.startswith(p.name)} == \
        {k: v for k, v in before.items() if k.startswith(p.name)}


def _bad_l0(case: str, data: Data, d: Path) -> tuple[Path, list[str]]:
    if case == "nonexistent":
        return d / "nope_L0.zarr", ["nope_L0.zarr: no such store"]
    if case == "pff_file":
        return data.stream[0], [str(data.stream[0]), "not a Zarr store"]
    if case == "plain_directory":
        (d / "plain").mkdir()
        return d / "plain", [str(d / "plain"), "not a Zarr store"]
    if case == "killed_step1_partial":  # what a killed step 1 leaves: no attributes yet
        store = d / f"{STREAM}_L0.zarr.0123456789ab.partial"
        shutil.copytree(data.l0, store)
        meta = json.loads((store / "zarr.json").read_text())
        meta["attributes"] = {}
        meta.pop("consolidated_metadata", None)
        (store / "zarr.json").write_text(json.dumps(meta))
        return store, [str(store), "incomplete"]
    if case == "chunks_missing":
        store = d / "holes_L0.zarr"
        shutil.copytree(data.l0, store)
        shutil.rmtree(store / "images" / "c")
        return store, [str(store), "incomplete"]
    if case == "l1_not_l0":
        return data.l1, [str(data.l1), "not an L0 store"]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["nonexistent", "pff_file", "plain_directory",
                                  "killed_step1_partial", "chunks_missing", "l1_not_l0"])
def test_step2_bad_l0(data: Data, tmp_path: Path, capsys: pytest.CaptureFixture,
                      case: str) -> None:
    d = tmp_path / "in"
    d.mkdir()
    l0, needles = _bad_l0(case, data, d)
    watched = l0 if l0.exists() else d
    before = tree_snapshot(watched)
    out = tmp_path / "out" / "x_L1.zarr"
    rc = step2_dask_baseline.main([str(l0), str(out), "--config", str(data.config)])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert_one_error(err, "step2_dask_baseline.py", *needles)
    assert only(out.parent) == []
    if case != "chunks_missing":  # run.sh --steps 2 refuses it before any work, too
        rc = driver_cli.main(["plan", "--config", str(data.config), "--output", str(out.parent),
                            "--steps", "2", "--dry-run", "--", str(l0)])
        lines = error_lines(capsys.readouterr().err)
        assert rc == 2 and len(lines) == 2 and str(l0) in lines[1], lines
        assert ("no such file" if case == "nonexistent" else "not a complete L0") in lines[1]
        assert not out.parent.exists()
    assert tree_snapshot(watched) == before


CONFIG_ERRORS = {  # case: (config text, what the line must say)
    "typo": ("[pff_to_zarr]\ntime_chunck = 64\n",
             "unknown key 'time_chunck' (did you mean 'time_chunk'?)"),
    "wrong_type": ("[pff_to_zarr]\nnum_workers = 'two'\n", "num_workers must be an integer"),
    "codec_lz5": ("[baseline_subtract]\ncodec = 'lz5'\n", 'codec = "lz5" is not one of'),
    "level_0": ("[pff_to_zarr]\nlevel = 0\n", "level = 0 is out of range (1..9)"),
    "level_10": ("[baseline_subtract]\nlevel = 10\n", "level = 10 is out of range (1..9)"),
    "negative_window": ("[baseline_subtract]\nbaseline_window = -5\n",
                        "baseline_window = -5 is out of range"),
    "time_chunk_0": ("[pff_to_zarr]\ntime_chunk = 0\n", "time_chunk = 0 is out of range"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_config_errors_stop_every_entry_point_before_any_work(
        data: Data, tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    text, needle = CONFIG_ERRORS[case]
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[cluster]\nuse_dask = false\n" + text)
    out = tmp_path / "out"
    before = tree_snapshot(data.obs)

    rc = step1_pff_to_zarr.main([str(data.stream[0]), str(out / "x_L0.zarr"), str(cfg)])
    assert rc == 2
    assert_one_error(capsys.readouterr().err, "step1_pff_to_zarr.py", str(cfg), needle)
    rc = step2_dask_baseline.main([str(data.l0), str(out / "x_L1.zarr"), "--config", str(cfg)])
    assert rc == 2
    assert_one_error(capsys.readouterr().err, "step2_dask_baseline.py", str(cfg), needle)
    # run.sh's check (driver plan): a count line, then one line per problem.
    rc = driver_cli.main(["plan", "--config", str(cfg), "--output", str(out), "--dry-run",
                        "--", str(data.obs)])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    lines = [line for line in error_lines(captured.err) if "run.sh: note:" not in line]
    assert lines[0] == ("run.sh: error: 1 problem found before any work (nothing was "
                        "started):")
    assert len(lines) == 2 and str(cfg) in lines[1] and needle in lines[1], lines
    assert not out.exists()
    assert tree_snapshot(data.obs) == before


def test_step2_negative_window_on_the_command_line(data: Data, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "x_L1.zarr"
    rc = step2_dask_baseline.main([str(data.l0), str(out), "--config", str(data.config),
                                   "--baseline-window", "-3"])
    assert rc == 2
    assert_one_error(capsys.readouterr().err, "step2_dask_baseline.py",
                     "baseline_window = -3 is out of range")
    assert not out.exists()


# =========================================================================== faults


def test_output_directory_not_writable(data: Data, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out_dir.chmod(0o555)
    env = base_env(tmp_path, CONFIG_FILE=str(data.config))
    before = tree_snapshot(data.obs)
    try:
        rc, _, err = run_cmd(as_unprivileged(
            [sys.executable, STEP1, *map(str, data.stream), str(out_dir / "x_L0.zarr"),
             str(data.config), "--quiet"]), env)
        assert rc == 1, err
        assert_one_error(err, "step1_pff_to_zarr.py", str(out_dir), "not writable")
        rc, _, err = run_cmd(as_unprivileged(
            [sys.executable, STEP2, str(data.l0), str(out_dir / "x_L1.zarr"), "--config",
             str(data.config), "--quiet"]), env)
        assert rc == 1, err
        assert_one_error(err, "step2_dask_baseline.py", str(out_dir), "not writable")
        rc, stdout, err = run_cmd(as_unprivileged([RUN_SH, "--no-quicklook", str(data.obs),
                                                   str(out_dir)]), env)
        assert rc == 2, err
        assert stdout == ""
        assert any(str(out_dir) in line and "not writable" in line
                   for line in error_lines(err)), err
        assert only(out_dir) == []
    finally:
        out_dir.chmod(0o755)
    assert tree_snapshot(data.obs) == before


def test_run_sh_unreadable_input_is_found_before_any_work(data: Data, tmp_path: Path) -> None:
    p = tmp_path / data.stream[0].name
    shutil.copyfile(data.stream[0], p)
    p.chmod(0)
    out = tmp_path / "out"
    rc, _, err = run_cmd(as_unprivileged([RUN_SH, "--no-quicklook", str(p), str(out)]),
                         base_env(tmp_path, CONFIG_FILE=str(data.config)))
    assert rc == 2, err
    assert f"run.sh: error: {p}: not readable (permission denied)" in error_lines(err)
    assert not out.exists()
    assert stat.S_IMODE(p.stat().st_mode) == 0


def test_an_unreadable_run_config_is_found_before_any_work(data: Data, tmp_path: Path) -> None:
    """Defect: a *.json of the run directory that cannot be read failed each stream after
    its whole conversion ("cannot read the run config"), and then the bundle."""
    obs = tmp_path / data.obs.name
    shutil.copytree(data.obs, obs)
    config = obs / "daq_config.json"
    config.chmod(0)
    out = tmp_path / "out"
    env = base_env(tmp_path, CONFIG_FILE=str(data.config))
    rc, _, err = run_cmd(as_unprivileged([RUN_SH, "--no-quicklook", str(obs), str(out)]), env)
    assert rc == 2, err
    assert f"run.sh: error: {config}: not readable (permission denied)" in err
    assert not out.exists()
    # step 1 alone reads the run's configs first: it fails before writing anything
    store = tmp_path / "new" / "x_L0.zarr"
    rc, _, err = run_cmd(as_unprivileged([sys.executable, STEP1, *map(str, sorted(
        obs.glob("*dp_img16*.pff"))), str(store), str(data.config), "--quiet"]), env)
    assert rc == 1, err
    assert_one_error(err, "step1_pff_to_zarr.py", str(config), "cannot read the run config")
    assert not store.parent.exists()
    assert stat.S_IMODE(config.stat().st_mode) == 0


@pytest.mark.parametrize("step", [1, 2])
def test_disk_full_then_rerun_after_freeing_space(data: Data, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture,
                                                  step: int) -> None:
    """The failing run is a real process: in-process, zarr's chunk writes still in flight
    after the first failure could land once the ballast is gone (see the report)."""
    reference = data.l0 if step == 1 else data.l1
    size = sum(f.stat().st_size for f in reference.rglob("*") if f.is_file())
    before = tree_snapshot(data.obs), tree_snapshot(data.l0)
    with tmpfs(tmp_path / "small", size_kb=4 * size // 1024 + 1024) as disk:
        ballast = fill(disk, leave_bytes=size // 3)
        out = disk / f"{STREAM}_L{step - 1}.zarr"
        if step == 1:
            prog, args = STEP1, [*map(str, data.stream), str(out), str(data.config)]
        else:
            prog, args = STEP2, [str(data.l0), str(out), "--config", str(data.config)]
        rc, _, err = run_cmd([sys.executable, prog, *args, "--quiet"], base_env(tmp_path))
        assert rc == 1, err
        assert_one_error(err, Path(prog).name, str(out), "No space left on device")
        assert only(disk) == ["ballast"]  # no final store, no partial store
        ballast.unlink()
        main = step1_pff_to_zarr.main if step == 1 else step2_dask_baseline.main
        assert main(args) == 0, capsys.readouterr().err  # the same command again
        assert only(disk) == [out.name]
        assert_same_store(out, reference)
    assert (tree_snapshot(data.obs), tree_snapshot(data.l0)) == before


def _partial(final: Path) -> Path | None:
    found = sorted(final.parent.glob(f"{final.name}.*.partial"))
    return found[0] if found else None


def _chunks(store: Path | None, array: str = "images") -> int:
    """Chunk files of ``array`` in a partial store (shard files: the store is sharded)."""
    if store is None or not (store / array / "c").is_dir():
        return 0
    return sum(1 for p in (store / array / "c").rglob("*") if p.is_file())


def _at_publish(final: Path) -> bool:
    """The partial store is verified and consolidated: held just before its rename."""
    p = _partial(final)
    try:
        return p is not None and "consolidated_metadata" in (p / "zarr.json").read_text()
    except OSError:
        return False


def _kill_and_check(s: Spawned, final: Path) -> Path:
    os.kill(s.pid, signal.SIGKILL)
    assert s.finish() == -signal.SIGKILL
    assert_nothing_left(s.pid)
    assert not final.exists(), "a killed step left a store under the final name"
    stale = _partial(final)
    assert stale is not None  # what the rerun must remove
    return stale


STEP1_KILL_POINTS = {  # point: (environment, condition on the partial store)
    # four tasks of 192, 192, 192 and 24 frames (a shard file of 3 chunks of 64 each), one
    # at a time, each waiting 1 s: kill while the second shard is written
    "tasks_started": ({SLOW_TASK: "1.0"}, lambda p: p is not None and _chunks(p) == 0
                      and (p / "images" / "zarr.json").exists()),
    "some_chunks_written": ({SLOW_TASK: "1.0"}, lambda p: _chunks(p) >= 2),
    "at_publish": ({SLOW_PUBLISH: "30"}, None),
}


@pytest.mark.parametrize("point", list(STEP1_KILL_POINTS))
def test_step1_kill_9_then_rerun_is_identical(data: Data, tmp_path: Path,
                                              capsys: pytest.CaptureFixture,
                                              point: str) -> None:
    hooks, condition = STEP1_KILL_POINTS[point]
    final = tmp_path / f"{STREAM}_L0.zarr"
    args = [*map(str, data.stream), str(final), str(data.config)]
    before = tree_snapshot(data.obs)
    with Spawned([sys.executable, STEP1, *args, "--quiet"], base_env(tmp_path, **hooks)) as s:
        if condition is None:
            s.wait_until(lambda: _at_publish(final), "the store held at publish")
        else:
            s.wait_until(lambda: condition(_partial(final)), point)
        if point == "some_chunks_written":
            assert _chunks(_partial(final)) < 4, "all shards were written already"
        stale = _kill_and_check(s, final)

    assert step1_pff_to_zarr.main(args) == 0  # the same command again
    err = capsys.readouterr().err
    assert f"{stale}: removed the partial store of an interrupted run" in err
    assert not stale.exists() and leftovers(tmp_path) == []
    assert_same_store(final, data.l0)
    assert tree_snapshot(data.obs) == before


@pytest.mark.parametrize("point", ["tasks_running", "at_publish"])
def test_step2_kill_9_then_rerun_is_identical(data: Data, tmp_path: Path,
                                              capsys: pytest.CaptureFixture,
                                              point: str) -> None:
    final = tmp_path / f"{STREAM}_L1.zarr"
    args = [str(data.l0), str(final), "--config", str(data.config)]
    before = tree_snapshot(data.l0)
    env = base_env(tmp_path, **{SLOW_PUBLISH: "30"})
    with Spawned([sys.executable, STEP2, *args, "--quiet"], env) as s:
        if point == "tasks_running":  # as soon as the store exists (no task hook in step 2)
            s.wait_until(lambda: _partial(final) is not None, "the partial L1 store")
        else:
            s.wait_until(lambda: _at_publish(final), "the store held at publish")
        stale = _kill_and_check(s, final)

    assert step2_dask_baseline.main(args) == 0
    err = capsys.readouterr().err
    assert f"{stale}: removed the partial store of an interrupted run" in err
    assert not stale.exists() and leftovers(tmp_path) == []
    assert_same_store(final, data.l1)
    assert tree_snapshot(data.l0) == before


# --------------------------------------------------------------------------- run.sh


def run_records(out: Path) -> list[dict]:
    return [tomllib.loads(p.read_text()) for p in sorted(out.glob("run_record_*.toml"))]


def _scheduler_files(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "tmpdir").glob("panoseti_run.*/scheduler_address"))


def _rerun_completes(data: Data, tmp_path: Path, out: Path) -> None:
    """The same command again (without a cluster, to keep the suite short): done, and
    byte-identical to the uninterrupted run."""
    rc, _, err = run_cmd([RUN_SH, "--no-quicklook", str(data.obs), str(out)],
                         base_env(tmp_path, CONFIG_FILE=str(data.config)))
    assert rc == 0, err[-3000:]
    assert run_records(out)[-1]["inputs"][0]["status"] == "ok"
    assert_same_store(out / RUN / f"{STREAM}_L1.zarr", data.l1)
    assert leftovers(out) == [] and not (out / ".l0_tmp").exists()


SIGNAL_CASES = [(sig, phase) for phase in ("cluster_start", "step1", "step2")
                for sig in ("INT", "TERM")]


@pytest.mark.parametrize(("sig", "phase"), SIGNAL_CASES,
                         ids=[f"SIG{s}-{p}" for s, p in SIGNAL_CASES])
def test_run_sh_signal_stops_everything_and_rerun_resumes(data: Data, tmp_path: Path,
                                                          sig: str, phase: str) -> None:
    out = tmp_path / "L1"
    config = write_config(tmp_path / "dask.toml", "dask")
    hold = {"step1": "60:_L0.zarr", "step2": "60:_L1.zarr"}.get(phase)
    env = base_env(tmp_path, CONFIG_FILE=str(config), **({SLOW_PUBLISH: hold} if hold else {}))
    before = tree_snapshot(data.obs)
    with Spawned([RUN_SH, "--no-quicklook", str(data.obs), str(out)], env) as s:
        if phase == "cluster_start":
            s.wait_until(lambda: s.find("cluster_lifecycle_manager.py") is not None,
                         "the cluster manager started")
            time.sleep(0.3)  # importing Dask and starting: no scheduler file yet
            assert not _scheduler_files(tmp_path), "the cluster was up already"
        elif phase == "step1":
            s.wait_until(lambda: _at_publish(out / ".l0_tmp" / f"{STREAM}_L0.zarr"),
                         "step 1 under way")
        else:
            s.wait_until(lambda: _partial(out / RUN / f"{STREAM}_L1.zarr") is not None,
                         "step 2 under way")
        if sig == "INT":
            os.killpg(s.pid, signal.SIGINT)  # Ctrl-C at a terminal: the whole group
        else:
            os.kill(s.pid, signal.SIGTERM)  # e.g. a batch system: run.sh alone
        rc = s.finish(timeout=150)
        assert_nothing_left(s.pid)
    assert rc == 130, s.stderr[-3000:]
    assert f"interrupted by SIG{sig}" in s.stderr
    # Known, reported: the lifecycle manager's own Dask client may log a reconnect
    # traceback ("distributed.client - ERROR") when stopped while the cluster starts.
    dask_client_log = phase == "cluster_start" and "distributed.client - ERROR" in s.stderr
    assert dask_client_log or "Traceback" not in s.stderr, s.stderr[-3000:]
    assert not (out / RUN / f"{STREAM}_L1.zarr").exists(), s.stderr[-3000:]
    assert leftovers(out) == [] and not list(out.rglob("*_L0.zarr"))
    assert not _scheduler_files(tmp_path)
    assert not list((tmp_path / "tmpdir").glob("panoseti_run.*")), "run.sh left its temp dir"
    if phase != "cluster_start":
        record = run_records(out)[-1]
        assert record["run"]["exit_status"] == 130
        assert record["inputs"][0]["status"] == "failed"
    assert tree_snapshot(data.obs) == before
    if sig == "INT":  # the rerun does not depend on which signal stopped the run
        _rerun_completes(data, tmp_path, out)


def test_lifecycle_manager_killed_mid_run(data: Data, tmp_path: Path) -> None:
    out = tmp_path / "L1"
    config = write_config(tmp_path / "dask.toml", "dask")
    env = base_env(tmp_path, CONFIG_FILE=str(config), **{SLOW_TASK: "1.0"})
    before = tree_snapshot(data.obs)
    with Spawned([RUN_SH, "--no-quicklook", str(data.obs), str(out)], env) as s:
        # (Step 1 starts while the cluster does: its store is there before the cluster.)
        s.wait_until(lambda: _partial(out / ".l0_tmp" / f"{STREAM}_L0.zarr") is not None
                     and _scheduler_files(tmp_path), "step 1 under way on the cluster")
        manager = s.find("cluster_lifecycle_manager.py")
        assert manager is not None
        os.kill(manager, signal.SIGKILL)
        rc = s.finish(timeout=150)
        assert_nothing_left(s.pid)  # the Dask workers too
    assert rc == 1, s.stderr[-3000:]
    assert f"the cluster manager (pid {manager}) exited" in s.stderr
    assert f"the cluster manager (pid {manager}) is gone: stopping the running step" \
        in s.stderr
    step1 = [line for line in error_lines(s.stderr) if line.startswith("step1_pff_to_zarr.py")]
    assert len(step1) == 1, s.stderr[-3000:]
    assert "Traceback" not in s.stderr
    assert not (out / RUN / f"{STREAM}_L1.zarr").exists()
    assert leftovers(out) == [] and not list(out.rglob("*_L0.zarr"))
    assert run_records(out)[-1]["run"]["exit_status"] == 1
    assert tree_snapshot(data.obs) == before
    _rerun_completes(data, tmp_path, out)


# =========================================================================== safety


def test_read_only_input_tree_and_no_world_or_group_writable_output(data: Data,
                                                                    tmp_path: Path) -> None:
    """chmod -R a-w on the input tree; umask 000; group_writable = false: the run works,
    writes nothing in the input tree, and creates nothing group- or world-writable."""
    tree = tmp_path / "input"
    shutil.copytree(data.obs, tree / data.obs.name)
    subprocess.run(["chmod", "-R", "a-w", str(tree)], check=True)
    config = write_config(tmp_path / "local.toml", group_writable=False)
    out = tmp_path / "out"
    before = tree_snapshot(tree)
    try:
        rc, _, err = run_cmd(as_unprivileged([RUN_SH, "--no-quicklook", "--keep-l0",
                                              str(tree / data.obs.name), str(out)]),
                             base_env(tmp_path, CONFIG_FILE=str(config)), umask=0)
    finally:
        after = tree_snapshot(tree)
        subprocess.run(["chmod", "-R", "u+w", str(tree)], check=True)
    assert rc == 0, err[-3000:]
    assert after == before, "run.sh changed the input tree"
    assert_same_store(out / RUN / f"{STREAM}_L1.zarr", data.l1)
    assert_same_store(out / "L0" / f"{STREAM}_L0.zarr", data.l0)
    assert permission_problems(out, group_writable=False) == []


def test_group_writable_policy_is_followed(data: Data, tmp_path: Path) -> None:
    """group_writable = true: a caller's umask 022 still gives group-writable products;
    nothing is world-writable."""
    config = write_config(tmp_path / "local.toml", group_writable=True)
    out = tmp_path / "out"
    rc, _, err = run_cmd([RUN_SH, "--no-quicklook", "--keep-l0", str(data.obs), str(out)],
                         base_env(tmp_path, CONFIG_FILE=str(config)), umask=0o022)
    assert rc == 0, err[-3000:]
    assert permission_problems(out, group_writable=True) == []
    for store in (out / RUN / f"{STREAM}_L1.zarr", out / "L0" / f"{STREAM}_L0.zarr"):
        for p in [store, *store.rglob("*")]:
            assert p.stat().st_mode & stat.S_IWGRP, f"{p} is not group-writable"
