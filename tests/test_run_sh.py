"""Tests of run.sh (and its Python side, the driver), end to end on generated observations.

run.sh runs as a real process in its own session (``start_new_session=True``), so that
"no process it started is left" can be checked: after it exits, no process of that
session or process group may be alive (``/proc/<pid>/stat``). Every Dask address stays on
loopback (``interface = "lo"``).

The SIGINT test holds step 1 mid-run with the test plugin's ``SLOW_TASK`` (seconds each
step task sleeps; tests/plugins/sitecustomize.py, put on PYTHONPATH by ``with_plugin``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import zarr

REPO = Path(__file__).resolve().parents[1]

from fault_tools import SLOW_TASK, assert_same_store, leftovers, with_plugin  # noqa: E402
from process_tools import session_processes  # noqa: E402

from panoseti_pipeline import pff, runners  # noqa: E402
from panoseti_pipeline import synthetic as synthetic_obs  # noqa: E402
from panoseti_pipeline.driver import plan as driver_plan  # noqa: E402
from panoseti_pipeline.driver import record as driver_record  # noqa: E402
from panoseti_pipeline.driver.record import RECORD_PREFIX  # noqa: E402
from panoseti_pipeline.store import ownership  # noqa: E402

RUN_SH = str(REPO / "run.sh")
RUN_TIMEOUT_S = 240
FRAMES = 600

COMMON = {
    "pff_to_zarr": {"time_chunk": 256, "num_workers": 2},
    "baseline_subtract": {"baseline_window": 100, "compute_chunk_size": 256},
    # A step or manager that hangs costs the test 20 s, not the default 60 s.
    "run": {"stop_grace_s": 20.0},
}
CONFIGS = {
    "local": {"cluster": {"use_dask": False}, **COMMON},
    "dask": {"cluster": {"use_dask": True, "cluster_type": "local", "interface": "lo",
                         "local_workers": 2, "local_threads_per_worker": 1,
                         "local_memory_per_worker": "1GB", "dashboard_port": 0,
                         "startup_timeout_s": 60.0}, **COMMON},
}


# --------------------------------------------------------------------------- helpers


def write_config(path: Path, mode: str, **sections: dict) -> Path:
    """The config of ``mode``, with the keys of ``sections`` replaced."""
    import tomli_w

    config = {name: dict(keys) for name, keys in CONFIGS[mode].items()}
    for name, keys in sections.items():
        config.setdefault(name, {}).update(keys)
    path.write_text(tomli_w.dumps(config))
    return path


def session_process(sid: int, needle: str) -> int | None:
    """The PID of a live process of session ``sid`` whose command line holds ``needle``."""
    return next((pid for pid, cmdline in session_processes(sid) if needle in cmdline), None)


def _kill_session_leftovers(sid: int) -> None:
    """Test teardown: stop what is left of a run.sh we started (by PID)."""
    for pid, _ in session_processes(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def run_env(tmp_path: Path, config: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["CONFIG_FILE"] = str(config)
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir(exist_ok=True)
    env["TMPDIR"] = str(tmpdir)
    env.pop(SLOW_TASK, None)
    if sys.prefix != sys.base_prefix:  # the venv running the tests has the requirements
        env["VIRTUAL_ENV"] = sys.prefix
    env.update(extra)
    return with_plugin(env)


@contextlib.contextmanager
def started(args: Sequence[str], env: dict[str, str],
            quicklook: bool = False) -> Iterator[subprocess.Popen]:
    """run.sh ARGS started in a session of its own; without ``quicklook`` with
    ``--no-quicklook`` (these tests look at stores; test_index_html at the PNGs)."""
    flags = () if quicklook else ("--no-quicklook",)
    proc = subprocess.Popen([RUN_SH, *flags, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _kill_session_leftovers(proc.pid)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    """A started run.sh to the end; asserts that it left no process behind."""
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"run.sh did not finish in {RUN_TIMEOUT_S} s\n{err[-4000:]}")
    left = session_processes(proc.pid)
    assert not left, f"processes left by run.sh: {left}\n{err[-3000:]}"
    return proc.returncode, out, err


def run(args: Sequence[str], env: dict[str, str],
        quicklook: bool = False) -> tuple[int, str, str]:
    """run.sh to the end; asserts that it left no process behind."""
    with started(args, env, quicklook) as proc:
        return finish(proc)


def run_records(out_dir: Path) -> list[dict]:
    paths = sorted(out_dir.glob(f"{RECORD_PREFIX}*.toml"))
    return [tomllib.loads(p.read_text()) for p in paths]


def statuses(record: dict) -> dict[str, str]:
    return {entry["name"]: entry["status"] for entry in record["inputs"]}


def pff_frames(files: Sequence[Path]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Pixels and header fields of the files of one stream, in order, read with pff.py."""
    images, headers = [], []
    for path in files:
        with pff.PFFReader(path) as reader:
            frames = reader.read(0, reader.index.n_frames)
        images.append(frames.images)
        headers.append(frames.headers)
    return (np.concatenate(images),
            {k: np.concatenate([h[k] for h in headers]) for k in headers[0]})


def check_l1(l1: Path, files: Sequence[Path]) -> None:
    """L1 images are the PFF pixels minus the stored baseline (ph256: per quabo)."""
    import zarr

    group = zarr.open_group(str(l1), mode="r")
    assert group.attrs["processing_level"] == "L1"
    images = group["images"][:]
    baseline = group["baseline"][:]
    raw, headers = pff_frames(files)
    assert images.dtype == np.float32
    assert images.shape == raw.shape
    if baseline.ndim == 3:  # ph256: one baseline per quabo
        expected = raw.astype(np.float64) - baseline[headers["quabo_num"].astype(int)]
    else:
        expected = raw.astype(np.float64) - baseline
    np.testing.assert_allclose(images, expected, rtol=0, atol=1e-2)
    assert np.array_equal(group["time"][:].size, raw.shape[0])


def check_tasks(out: Path, record: dict, stdout: str, mode: str) -> None:
    """Every step of every input ran tasks, each naming its host, process and thread and
    starting before it ended, within the run; the utilization on the summary and in the
    record is busy / (threads x wall) recomputed here from those tasks."""
    import datetime as dt

    tasks = json.loads((out / record["utilization"]["tasks_file"]).read_text())
    assert tasks["run_record"] in {p.name for p in out.glob(f"{RECORD_PREFIX}*.toml")}
    started = dt.datetime.fromisoformat(record["run"]["started"]).timestamp()
    finished = dt.datetime.fromisoformat(record["run"]["finished"]).timestamp() + 1  # s
    ran = {(t["input"], t["step"]) for t in tasks["tasks"]}
    assert ran == {(e["name"], step) for e in record["inputs"] for step in (1, 2)}
    for t in tasks["tasks"]:
        assert t["host"] == socket.gethostname() and t["pid"] > 0 and t["thread"]
        assert started <= t["start"] < t["end"] <= finished, t
        assert (t["worker"] or "").startswith("tls://127.0.0.1:") is (mode == "dask")
    for entry in record["inputs"]:
        for step in ("step1", "step2"):
            assert entry[step]["mode"] == mode and entry[step]["tasks"] == sum(
                1 for t in tasks["tasks"] if (t["input"], t["step"]) == (entry["name"],
                                                                         int(step[-1])))
    # the steps share one pool: the cluster's 2 threads, or this host's local threads
    # (step 1: num_workers = 2, step 2: one per CPU)
    (threads,) = tasks["pools"].values()
    assert threads == (2 if mode == "dask" else max(2, runners.cpus()))
    if mode == "local":  # a step process's pool: its threads, named alike in each map
        assert {t["thread"] for t in tasks["tasks"]} <= {f"task_{k}" for k in range(threads)}
    else:  # the workers' processes (not the steps'), each one worker
        assert len({(t["pid"], t["worker"]) for t in tasks["tasks"]}) <= 2
        assert len({t["pid"] for t in tasks["tasks"]}) == len({t["worker"]
                                                              for t in tasks["tasks"]})
    busy = sum(t["end"] - t["start"] for t in tasks["tasks"])
    wall = (max(t["end"] for t in tasks["tasks"])
            - min(t["start"] for t in tasks["tasks"]))
    value = busy / (threads * wall)
    u = record["utilization"]
    assert u["threads"] == threads and u["tasks"] == len(tasks["tasks"])
    assert u["value"] == pytest.approx(value, abs=1e-4)
    assert u["busy_thread_s"] == pytest.approx(busy, abs=1e-3)
    assert u["wall_s"] == pytest.approx(wall, abs=1e-3)
    line = re.search(r"^cluster utilization: (\S+) \(busy (\S+) thread-s / (\d+) threads x "
                     r"(\S+) s; (\d+) tasks\)$", stdout, re.M)
    assert line, stdout
    assert line.group(1) == f"{value:.2f}" and line.group(2) == f"{busy:.1f}"
    assert int(line.group(3)) == threads and line.group(4) == f"{wall:.1f}"
    assert int(line.group(5)) == len(tasks["tasks"])


# --------------------------------------------------------------------------- fixtures


class Data:
    """Two single files and one .pffd observation (two streams with data)."""

    def __init__(self, root: Path) -> None:
        self.obs = synthetic_obs.make_observation(root / "obs", frames_per_file=FRAMES,
                                                  files_per_stream=2,
                                                  products=("img16", "ph256"))
        files = root / "files"
        files.mkdir()
        self.file_a = synthetic_obs.write_stream(
            files, synthetic_obs.StreamSpec(dp="img16", module=2, frames_per_file=FRAMES,
                                            files=1), seed=1)[0]
        self.file_b = synthetic_obs.write_stream(
            files, synthetic_obs.StreamSpec(dp="img8", module=3, frames_per_file=FRAMES,
                                            files=1), seed=2)[0]
        stem = self.obs.name[: -len(".pffd")]
        seqno = lambda p: pff.parse_name(p).seqno  # noqa: E731 -- a sort key
        self.expected = {  # L1 path under the output directory -> PFF files
            f"{self.file_a.stem}_L1.zarr": [self.file_a],
            f"{self.file_b.stem}_L1.zarr": [self.file_b],
            # a run's streams go into the run's own directory, beside its bundle
            f"{stem}/{stem}.dp_img16.bpp_2.module_1_L1.zarr":
                sorted(self.obs.glob("*dp_img16*.pff"), key=seqno),
            f"{stem}/{stem}.dp_ph256.bpp_2.module_1_L1.zarr":
                sorted(self.obs.glob("*dp_ph256*.pff"), key=seqno),
        }


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    return Data(tmp_path_factory.mktemp("run_sh_data"))


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in root.rglob("*")}


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["local", "dask"])
def test_two_files_and_a_pffd_directory_to_l1(data: Data, tmp_path: Path, mode: str) -> None:
    config = write_config(tmp_path / f"{mode}.toml", mode)
    out = tmp_path / "L1"
    env = run_env(tmp_path, config)
    args = [str(data.file_a), str(data.obs), str(data.file_b), str(out)]
    rc, stdout, stderr = run(args, env)
    assert rc == 0, stderr[-4000:]

    products = sorted(str(p.relative_to(out)) for p in out.rglob("*_L1.zarr"))
    assert products == sorted(data.expected)
    run_dir = out / data.obs.name[: -len(".pffd")]
    assert (run_dir / f"{data.obs.name}.panoseti-meta" / "manifest.json").is_file()
    for name, files in data.expected.items():
        check_l1(out / name, files)
    assert not (out / driver_plan.SCRATCH_L0_SUBDIR).exists(), "L0 stores not removed"
    assert not list(out.rglob("*_L0.zarr")) and not list(out.rglob("*.partial"))
    assert not list((tmp_path / "tmpdir").glob("panoseti_run.*")), "run.sh left its temp dir"

    (record,) = run_records(out)
    assert set(statuses(record).values()) == {"ok"}
    assert record["run"]["exit_status"] == 0
    assert record["config"]["cluster"]["use_dask"] is (mode == "dask")
    assert record["software"]["zarr"]
    assert all(e["frames"] == 2 * FRAMES or e["frames"] == FRAMES for e in record["inputs"])
    assert all(e["l0_removed"] for e in record["inputs"])
    assert "empty (0 bytes), skipped" in stderr
    assert "run bundle: " in stderr
    for name in data.expected:
        assert Path(name).name[: -len("_L1.zarr")] in stdout  # the summary table
    if mode == "dask":
        assert record["cluster"]["scheduler_address"].startswith("tls://127.0.0.1:")
        assert record["cluster"]["workers"] == 2
    check_tasks(out, record, stdout, mode)

    # Again: everything is there, so every input is skipped and no cluster starts.
    rc, stdout, stderr = run(args, env)
    assert rc == 0, stderr[-3000:]
    assert set(statuses(run_records(out)[-1]).values()) == {"skipped"}
    assert "starting the cluster" not in stderr
    assert "utilization" not in run_records(out)[-1] and "utilization" not in stdout


@pytest.mark.slow
@pytest.mark.faults
def test_corrupt_input_with_and_without_keep_going(data: Data, tmp_path: Path) -> None:
    """One product after the other: without --keep-going the run stops after the failure
    (no later product starts), with it the others are done."""
    config = write_config(tmp_path / "local.toml", "local", run={"concurrent_products": 1})
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad = bad_dir / "start_2024-07-25T04:34:46Z.dp_img16.bpp_2.module_7.seqno_0.pff"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, np.uint8).tobytes())
    env = run_env(tmp_path, config)

    stop, out = tmp_path / "stop", tmp_path / "going"
    with started([str(bad), str(data.file_a), str(stop)], env) as first:  # both runs at once
        rc, stdout, stderr = run(["--keep-going", str(bad), str(data.file_a),
                                  str(data.file_b), str(out)], env)
        stop_rc, _, stop_stderr = finish(first)

    assert stop_rc == 1
    assert "step 1 (PFF -> L0) failed" in stop_stderr and bad.name in stop_stderr
    assert statuses(run_records(stop)[-1]) == {bad.stem: "failed", data.file_a.stem: "not-run"}
    assert not list(stop.glob("*_L1.zarr"))

    assert rc == 1, stderr[-3000:]
    record = run_records(out)[-1]
    assert statuses(record) == {bad.stem: "failed", data.file_a.stem: "ok",
                                data.file_b.stem: "ok"}
    assert record["run"]["exit_status"] == 1
    assert f"failed: 1. {bad.stem}" in stdout
    # the reason is the step's own error line, in the summary and the run record
    (bad_entry,) = [e for e in record["inputs"] if e["name"] == bad.stem]
    assert bad_entry["reason"].startswith("step 1 (PFF -> L0) failed: ")
    assert bad.name in bad_entry["reason"] and "exit status" not in bad_entry["reason"]
    assert bad_entry["step1"]["reason"] in bad_entry["reason"]
    assert f"failed: 1. {bad.stem}: {bad_entry['reason']}" in stdout
    # the run's log beside the record: stderr as shown, each line with its UTC time
    log = Path(record["run"]["log"])
    assert log.parent == out and log.name.startswith("run_log_")
    lines = log.read_text().splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ", ln) for ln in lines)
    shown = [ln for ln in stderr.splitlines() if ln.startswith("run.sh: ")][1:]  # after "log:"
    logged = [ln.split(" ", 1)[1] for ln in lines]
    assert shown and all(ln in logged for ln in shown)
    assert any(bad_entry["step1"]["reason"] in ln for ln in logged)
    assert sorted(p.name for p in out.glob("*_L1.zarr")) == sorted(
        f"{f.stem}_L1.zarr" for f in (data.file_a, data.file_b))
    assert not list(out.rglob("*_L0.zarr")) and not list(out.rglob("*.partial"))


@pytest.mark.slow
@pytest.mark.faults
def test_sigint_during_step1_stops_everything_and_rerun_finishes(data: Data,
                                                                 tmp_path: Path) -> None:
    """One product after the other: Ctrl-C while the second one's step 1 runs."""
    config = write_config(tmp_path / "dask.toml", "dask", run={"concurrent_products": 1})
    out = tmp_path / "L1"
    l0_dir = out / driver_plan.SCRATCH_L0_SUBDIR
    args = [str(data.file_a), str(data.file_b), str(out)]
    first_l1 = out / f"{data.file_a.stem}_L1.zarr"
    env = run_env(tmp_path, config, **{SLOW_TASK: "1.0"})
    with started(args, env) as proc:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        # Wait for the second input's step 1 to be under way (its partial L0 store).
        while not (first_l1.exists() and list(l0_dir.glob(f"{data.file_b.stem}*.partial"))):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "step 1 of the second input never started"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C at a terminal
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("run.sh did not stop within 120 s of SIGINT")
        assert proc.returncode != 0
        deadline = time.monotonic() + 5  # the kernel may take a moment to reap
        while session_processes(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not session_processes(proc.pid), f"left behind: {session_processes(proc.pid)}"
    assert "interrupted by SIGINT" in err
    assert not (out / f"{data.file_b.stem}_L1.zarr").exists()
    assert not list(out.rglob(f"{data.file_b.stem}_L0.zarr"))
    assert not list(out.rglob("*.partial")), "partial store left after SIGINT"
    record = run_records(out)[-1]
    assert statuses(record) == {data.file_a.stem: "ok", data.file_b.stem: "failed"}
    assert record["run"]["exit_status"] == 130

    # Rerun (without a cluster, to keep the suite short): the first input is skipped, the
    # second done.
    rc, _, stderr = run(args, run_env(tmp_path, write_config(tmp_path / "local.toml", "local")))
    assert rc == 0, stderr[-3000:]
    assert statuses(run_records(out)[-1]) == {data.file_a.stem: "skipped",
                                              data.file_b.stem: "ok"}
    check_l1(out / f"{data.file_b.stem}_L1.zarr", [data.file_b])


# --------------------------------------------------------------------------- products in flight


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A .pffd run of four products: img16 and ph256 of modules 1 and 2."""
    return synthetic_obs.make_observation(tmp_path_factory.mktemp("night") / "obs",
                                          modules=(1, 2), frames_per_file=FRAMES,
                                          files_per_stream=1, products=("img16", "ph256"))


FOUR_AT_ONCE = {"cluster": {"local_workers": 4}, "run": {"concurrent_products": 4}}


def steps_running(sid: int) -> int:
    """Step processes (step 1 or step 2) alive in session ``sid``."""
    return sum(1 for _, cmdline in session_processes(sid)
               if "step1_pff_to_zarr.py" in cmdline or "step2_dask_baseline.py" in cmdline)


@contextlib.contextmanager
def most_steps_at_once(proc: subprocess.Popen) -> Iterator[list[int]]:
    """The most step processes seen running at once while ``proc`` runs (sampled every
    20 ms on a thread, so the caller can read the pipes meanwhile)."""
    import threading

    seen = [0]

    def sample() -> None:
        while proc.poll() is None:
            seen[0] = max(seen[0], steps_running(proc.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield seen
    finally:
        sampler.join(timeout=RUN_TIMEOUT_S)


def wait_for_steps(proc: subprocess.Popen, n: int) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while steps_running(proc.pid) < n:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"never {n} steps at once"
        time.sleep(0.02)


@pytest.mark.slow
def test_four_products_in_flight_give_the_l1_of_one_at_a_time(night: Path,
                                                              tmp_path: Path) -> None:
    """concurrent_products = 4 on a local cluster of 4 single-thread workers: at least 3
    steps run at once; every L1 store equals that of a run of one product at a time; the
    summary and the run record list the products in input order."""
    together, alone = tmp_path / "together", tmp_path / "alone"
    config = write_config(tmp_path / "four.toml", "dask", **FOUR_AT_ONCE)
    with started([str(night), str(together)], run_env(tmp_path, config)) as proc, \
            most_steps_at_once(proc) as seen:
        rc, out, err = finish(proc)
    assert rc == 0, err[-3000:]
    assert seen[0] >= 3, f"at most {seen[0]} steps ran at once\n{err[-3000:]}"
    rc, out_alone, err = run([str(night), str(alone)], run_env(tmp_path, write_config(
        tmp_path / "one.toml", "local", run={"concurrent_products": 1})))
    assert rc == 0, err[-3000:]
    first, second = run_records(together)[-1], run_records(alone)[-1]
    names = [e["name"] for e in second["inputs"]]
    assert len(names) == 4 and [e["name"] for e in first["inputs"]] == names
    assert set(statuses(first).values()) == {"ok"}
    table = [ln.split()[1] for ln in out.splitlines() if ln[:1].isdigit()]
    assert table == names == [ln.split()[1] for ln in out_alone.splitlines() if ln[:1].isdigit()]
    stores = sorted(p.relative_to(alone) for p in alone.rglob("*_L1.zarr"))
    assert len(stores) == 4
    assert stores == sorted(p.relative_to(together) for p in together.rglob("*_L1.zarr"))
    for rel in stores:
        assert_same_store(together / rel, alone / rel)
    assert leftovers(together) == [] and not list(together.rglob("*_L0.zarr"))


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.parametrize("sig", ["INT", "TERM"])
def test_a_signal_stops_every_product_in_flight(night: Path, tmp_path: Path, sig: str
                                                ) -> None:
    """Ctrl-C (the whole group) or SIGTERM (run.sh alone) with 4 products in flight:
    every step stops, nothing is half-published, no process is left, the record says
    which products were stopped; a rerun (after Ctrl-C) finishes the night."""
    out = tmp_path / "L1"
    config = write_config(tmp_path / "four.toml", "dask", **FOUR_AT_ONCE)
    with started([str(night), str(out)],
                 run_env(tmp_path, config, **{SLOW_TASK: "1.0"})) as proc:
        wait_for_steps(proc, 3)
        if sig == "INT":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGTERM)
        rc, _, err = finish(proc)  # and no process left
    assert rc == 130, err[-3000:]
    assert f"interrupted by SIG{sig}" in err and "Traceback" not in err
    record = run_records(out)[-1]
    assert record["run"]["exit_status"] == 130
    stopped = [e["name"] for e in record["inputs"] if e["status"] == "failed"]
    assert len(stopped) >= 3, record["inputs"]
    for name in stopped:
        assert not list(out.rglob(f"{name}_L1.zarr"))
    assert leftovers(out) == [] and not list(out.rglob("*_L0.zarr"))
    assert not list((tmp_path / "tmpdir").glob("panoseti_run.*")), "run.sh left its temp dir"
    if sig == "INT":  # the rerun resumes the night (once: it does not depend on the signal)
        rc, _, err = run([str(night), str(out)], run_env(tmp_path, write_config(
            tmp_path / "local.toml", "local")))
        assert rc == 0, err[-3000:]
        assert set(statuses(run_records(out)[-1]).values()) <= {"ok", "skipped"}
        assert len(list(out.rglob("*_L1.zarr"))) == 4


@pytest.mark.slow
@pytest.mark.faults
def test_hung_step_and_manager_are_killed_after_stop_grace_s(data: Data, tmp_path: Path) -> None:
    """A step and a cluster manager that do not stop on SIGTERM (here: SIGSTOPped) get
    [run] stop_grace_s each, then SIGKILL; the manager's workers are killed with it."""
    grace_s = 0.5
    config = write_config(tmp_path / "dask.toml", "dask", run={"stop_grace_s": grace_s})
    out = tmp_path / "L1"
    with started([str(data.file_a), str(out)], run_env(tmp_path, config)) as proc:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while (step := session_process(proc.pid, "step1_pff_to_zarr.py")) is None:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "step 1 never started"
            time.sleep(0.02)
        manager = session_process(proc.pid, "cluster_lifecycle_manager.py")
        assert manager is not None
        import psutil

        # (step 1 starts while the cluster does: wait for its workers)
        while not psutil.Process(manager).children(recursive=True):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the cluster's workers never started"
            time.sleep(0.02)
        os.kill(step, signal.SIGSTOP)
        os.kill(manager, signal.SIGSTOP)
        stopping = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail("run.sh did not stop after SIGTERM")
        took = time.monotonic() - stopping
        deadline = time.monotonic() + 5  # the kernel may take a moment to reap
        while session_processes(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not session_processes(proc.pid), f"left behind: {session_processes(proc.pid)}"
    assert proc.returncode == 130, err[-3000:]
    assert f"step (pid {step}) still running; killing it" in err
    assert f"cluster manager (pid {manager}) did not stop; killing it and its processes" in err
    assert took < 60, took  # the default grace alone is 60 s for each of the two
    assert not list(out.rglob("*.partial")) and not list(out.rglob("*_L0.zarr"))


@pytest.mark.faults
def test_a_cluster_that_never_comes_up_stops_the_steps_started_meanwhile(
        data: Data, tmp_path: Path) -> None:
    """Step 1 starts while the cluster does (it waits for the scheduler file). A cluster
    that does not come up (here: startup_timeout_s too short for its workers) ends the
    run with status 1 and a clear line; the step started meanwhile is stopped; nothing
    is written and no process is left."""
    config = write_config(tmp_path / "dask.toml", "dask", cluster={"startup_timeout_s": 0.05})
    out = tmp_path / "L1"
    rc, _, err = run([str(data.file_a), str(out)], run_env(tmp_path, config))
    assert rc == 1, err[-3000:]
    lines = err.splitlines()
    started = next(i for i, line in enumerate(lines) if ": step 1, PFF -> L0" in line)
    failed = next(i for i, line in enumerate(lines) if "before the cluster was up" in line)
    assert started < failed and "nothing was converted" in lines[failed], err[-3000:]
    assert "workers joined within startup_timeout_s" in err  # the manager's own line
    assert "Traceback" not in err
    assert not [p for p in out.rglob("*") if p.suffix in (".zarr", ".partial")], err[-3000:]
    assert not list((tmp_path / "tmpdir").glob("panoseti_run.*")), "run.sh left its temp dir"


@pytest.mark.faults
def test_run_sh_killed_alone_takes_its_step_and_cluster_with_it(data: Data,
                                                                tmp_path: Path) -> None:
    """Defect (noticed in issue 12): SIGKILL to run.sh alone (not its group) left its
    cluster manager, its workers and the running step running for ever. They get SIGTERM
    from the kernel when run.sh dies, and stop as for Ctrl-C."""
    config = write_config(tmp_path / "dask.toml", "dask")
    out = tmp_path / "L1"
    env = run_env(tmp_path, config, **{SLOW_TASK: "30"})
    with started([str(data.file_a), str(out)], env) as proc:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while session_process(proc.pid, "step1_pff_to_zarr.py") is None:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "step 1 never started"
            time.sleep(0.05)
        assert session_process(proc.pid, "cluster_lifecycle_manager.py") is not None
        os.kill(proc.pid, signal.SIGKILL)  # run.sh alone
        proc.wait()
        deadline = time.monotonic() + RUN_TIMEOUT_S  # the cluster's close, not a step task
        while session_processes(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not session_processes(proc.pid), f"left behind: {session_processes(proc.pid)}"
    assert not (out / f"{data.file_a.stem}_L1.zarr").exists()


# --------------------------------------------------------------------------- no work


def test_dry_run_changes_nothing(data: Data, tmp_path: Path) -> None:
    config = write_config(tmp_path / "dask.toml", "dask")
    env = run_env(tmp_path, config)
    out = tmp_path / "out"
    before = tree_state(tmp_path), tree_state(data.obs.parent.parent)
    rc, stdout, stderr = run(["--dry-run", str(data.obs), str(data.file_a), str(out)], env)
    assert rc == 0, stderr
    assert (tree_state(tmp_path), tree_state(data.obs.parent.parent)) == before
    assert not out.exists()
    for name in data.expected:
        if not name.startswith(data.file_b.stem):
            assert str(out / name) in stdout
    assert "Dask local cluster: 2 workers" in stdout
    assert "starting the cluster" not in stderr


def test_demo_dry_run_writes_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path / "dask.toml", "dask")
    env = run_env(tmp_path, config)
    before = tree_state(tmp_path)
    rc, _stdout, stderr = run(["--demo", "--dry-run", str(tmp_path / "demo")], env)
    assert rc == 0, stderr
    assert "nothing written" in stderr and str(tmp_path / "demo" / "L1") in stderr
    assert tree_state(tmp_path) == before


def test_every_problem_is_listed_before_any_work(data: Data, tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[pff_to_zarr]\ncodex = 'zstd'\nlevel = 12\n")
    (tmp_path / "in").mkdir()  # beside the output, not holding it (that is raw data)
    empty = tmp_path / "in" / "start_2024-07-25T04:34:46Z.dp_img16.bpp_2.module_9.seqno_0.pff"
    empty.touch()
    badname = tmp_path / "in" / "observation.pff"
    badname.write_bytes(b"x")
    out = tmp_path / "out"
    rc, stdout, stderr = run([str(tmp_path / "missing.pff"), str(badname), str(empty),
                              str(data.file_a), str(out)], run_env(tmp_path, config))
    assert rc == 2
    for text in ("unknown key 'codex'", "level = 12", "missing.pff: no such file",
                 "observation.pff: not a PFF data file name", "empty (0 bytes)",
                 "5 problems found before any work"):
        assert text in stderr
    # the heading counts the problems listed under it (a file's own heading is no problem)
    listed = [ln for ln in stderr.splitlines() if ln.startswith("run.sh: error: ")]
    assert len(listed) == 1 + 5, stderr
    assert not out.exists()
    assert not list((tmp_path / "tmpdir").glob("panoseti_run.*"))


def test_a_dashboard_without_bokeh_or_on_a_busy_port_is_refused_before_any_work(
        data: Data, tmp_path: Path) -> None:
    """Defect: the dashboard page said bokeh was missing; a busy port gave Dask's raw
    warning mid-run. Both are problems of the plan now, each one line."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_config(tmp_path / "dash.toml", "dask", cluster={"dashboard_port": port})
        out = tmp_path / "out"
        rc, _, stderr = run(["--dry-run", str(data.file_a), str(out)], run_env(tmp_path, config))
    assert rc == 2
    assert f"cannot listen on 127.0.0.1:{port}" in stderr
    has_bokeh = importlib.util.find_spec("bokeh") is not None
    assert (f"dashboard_port = {port}: the dashboard needs bokeh" in stderr) is not has_bokeh
    assert f"{1 + (not has_bokeh)} problem" in stderr and not out.exists()


def test_the_ssh_dashboard_binds_the_scheduler_host_only() -> None:
    from panoseti_pipeline.cluster import ssh_cluster_arguments
    from panoseti_pipeline.config import ClusterConfig

    c = ClusterConfig(use_dask=True, cluster_type="ssh", ssh_hosts=["127.0.0.2", "127.0.0.3"],
                      interface="lo", dashboard_port=8787)
    assert ssh_cluster_arguments(c)["scheduler_options"]["dashboard_address"] == \
        "127.0.0.2:8787"


def test_output_inside_the_input_tree_is_refused(data: Data, tmp_path: Path) -> None:
    config = write_config(tmp_path / "local.toml", "local")
    plan, *_ = driver_plan.make_plan([str(data.obs)], str(config), str(data.obs / "L1"))
    assert any("inside the input tree" in p for p in plan.problems)


def test_an_output_in_raw_data_is_refused_before_any_work(tmp_path: Path) -> None:
    """Defect: ``./run.sh ../two/*.pffd`` (the output forgotten) took the last run as the
    output directory, wrote the catalog, log, record and products into that raw
    observation and exited 0; ``./run.sh raw/*.pff raw`` was accepted too."""
    import datetime as dt

    config = write_config(tmp_path / "local.toml", "local")
    env = run_env(tmp_path, config)
    two = tmp_path / "two"
    runs = [synthetic_obs.make_observation(two, frames_per_file=10, files_per_stream=1,
                                           products=("img16",), start=start)
            for start in (synthetic_obs.DEFAULT_START,
                          synthetic_obs.DEFAULT_START + dt.timedelta(hours=1))]
    raw = runs[0]
    before = tree_state(two)
    rc, _, stderr = run([str(runs[0]), str(runs[1])], env)
    assert rc == 2, stderr
    assert (f"run.sh: error: {runs[1]}: the output directory is a .pffd observation "
            "directory (raw data); did you forget the output directory?") in stderr
    files = sorted(map(str, raw.glob("*.dp_img16.*.pff")))
    rc, _, stderr = run([*files, str(raw)], env)
    assert rc == 2, stderr
    assert f"{raw}: the output directory is a .pffd observation directory" in stderr
    assert tree_state(two) == before
    # a directory holding PFF files, or anything below it
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(files[0], loose)
    for out, where in ((loose, "holds"), (loose / "L1" / "x", f"is inside {loose}, which holds")):
        for steps in ((1, 2), (1,), (2,)):
            inputs = [str(loose / Path(files[0]).name)] if 1 in steps else []
            plan, *_ = driver_plan.make_plan(inputs, str(config), str(out), steps=steps)
            assert f"{out}: the output directory {where} PFF files (raw data); did you " \
                "forget the output directory? It is the last argument" in plan.problems
            assert sum("raw data" in p for p in plan.problems) == 1, plan.problems


def test_free_space_is_checked_against_the_estimate(tmp_path: Path) -> None:
    job = driver_plan.Job(name="x", inputs=["x.pff"], l0="", l1="", input_bytes=10**9,
                       est_l0_bytes=10**9, est_l1_bytes=2 * 10**9)

    class Usage:
        free = 2 * 10**9

    problems = driver_plan.free_space_problems([job], tmp_path, tmp_path / ".l0", (1, 2), False,
                                            disk_usage=lambda _p: Usage)
    assert len(problems) == 1 and "not enough free space" in problems[0]
    Usage.free = 4 * 10**9
    assert not driver_plan.free_space_problems([job], tmp_path, tmp_path / ".l0", (1, 2),
                                            False, disk_usage=lambda _p: Usage)
    # three products, two in flight: two transient L0 stores exist at once
    small = dataclasses.replace(job, name="y", est_l0_bytes=10**8, est_l1_bytes=10**8)
    jobs = [job, job, small]  # L1 4.1 GB, L0 the two largest 2 GB (one at a time: 1 GB)
    Usage.free = 5.5 * 10**9
    assert not driver_plan.free_space_problems(jobs, tmp_path, tmp_path / ".l0", (1, 2),
                                            False, disk_usage=lambda _p: Usage)
    (problem,) = driver_plan.free_space_problems(jobs, tmp_path, tmp_path / ".l0", (1, 2),
                                                 False, 2, disk_usage=lambda _p: Usage)
    assert "L0 (the 2 largest at once" in problem and "6.1 GB needed" in problem, problem


def test_plan_for_bash_carries_the_stop_grace(data: Data, tmp_path: Path) -> None:
    config = write_config(tmp_path / "local.toml", "local", run={"stop_grace_s": 2.5})
    plan, cfg, out, l0 = driver_plan.make_plan([str(data.file_a)], str(config),
                                               str(tmp_path / "out"))
    assert not plan.problems, plan.problems
    lines = driver_plan.bash_lines(plan, cfg, out, l0, 0o022)
    assert "stop\x1f25" in lines
    assert all(field for line in lines for field in line.split("\x1f"))  # no empty field


def test_a_product_made_with_other_settings_is_skipped_saying_so(data: Data,
                                                                  tmp_path: Path) -> None:
    """Defect: after a ``median`` run, a rerun with ``mean`` said "complete product
    already there, skipped" and exited 0: the product was silently not what the config
    asks. The plan compares the settings the product records with this config's."""
    from panoseti_pipeline.cli import step1, step2

    made = write_config(tmp_path / "median.toml", "local",
                        baseline_subtract={"method": "median", "baseline_window": 100})
    out = tmp_path / "out"
    l0, l1 = tmp_path / f"{data.file_a.stem}_L0.zarr", out / f"{data.file_a.stem}_L1.zarr"
    assert step1.main([str(data.file_a), str(l0), str(made), "--quiet"]) == 0
    assert step2.main([str(l0), str(l1), "--config", str(made), "--quiet"]) == 0
    now = write_config(tmp_path / "now.toml", "local",  # the shipped method: clipped_mean
                       pff_to_zarr={"num_workers": 1, "time_chunk": 256})  # speed only
    plan, *_ = driver_plan.make_plan([str(data.file_a)], str(now), str(out))
    (job,) = plan.jobs
    assert job.action == "skip"
    assert job.made_otherwise == ('made with method = "median"; this config: '
                                  'method = "clipped_mean"')
    assert f"{l1}: complete product already there, skipped; {job.made_otherwise}; " \
        "--overwrite redoes it" in plan.notices
    status = driver_record.job_status({"action": "skip",
                                       "made_otherwise": job.made_otherwise}, [1, 2])
    assert status == ("skipped", f"complete product already there, {job.made_otherwise} "
                                 "(--overwrite redoes it)")
    plan, *_ = driver_plan.make_plan([str(data.file_a)], str(made), str(out))
    assert plan.jobs[0].made_otherwise == "" and plan.notices == []  # made so: nothing to say
    plan, *_ = driver_plan.make_plan([str(l0)], str(now), str(out), steps=(2,))
    assert plan.jobs[0].made_otherwise.startswith('made with method = "median"')


def test_job_status_says_why() -> None:
    ok = {"status": "ok", "exit_code": 0}

    def status(**job: object) -> tuple[str, str]:
        return driver_record.job_status({"action": "run", "steps": {}, **job}, [1, 2])

    assert status() == ("not-run", "not started (an earlier input failed or the run was "
                                   "stopped)")
    assert status(action="skip") == ("skipped", "complete product already there")
    assert status(steps={"1": ok, "2": ok}) == ("ok", "")
    assert status(steps={"1": ok}, mark="interrupted") == (
        "failed", "interrupted before step 2 (L0 -> L1)")
    assert status(steps={"1": {"status": "failed", "exit_code": 1}}) == (
        "failed", "step 1 (PFF -> L0) failed (exit status 1)")
    assert status(steps={"1": ok, "2": {"status": "failed", "exit_code": 143}}) == (
        "failed", "step 2 (L0 -> L1) failed (interrupted)")
    assert status(steps={"1": {"status": "failed", "exit_code": 1,
                               "reason": "x.pff: corrupt data at byte 3810000"}}) == (
        "failed", "step 1 (PFF -> L0) failed: x.pff: corrupt data at byte 3810000")
    skipped = [{"offset": 10, "length": 5, "frames_lost": 1}] * 2
    assert status(steps={"1": ok, "2": ok}, skipped=skipped) == (
        "degraded", "2 corrupt byte range(s) of the input skipped (~2 frame(s) lost; see "
                    "skipped_ranges)")


@pytest.mark.faults
def test_a_corrupt_frame_gives_a_degraded_input_in_summary_and_record(data: Data,
                                                                      tmp_path: Path) -> None:
    config = write_config(tmp_path / "local.toml", "local")
    bad = tmp_path / "in" / data.file_a.name
    bad.parent.mkdir()
    raw = bytearray(data.file_a.read_bytes())
    frame_bytes = len(raw) // FRAMES
    raw[300 * frame_bytes + 100] = ord("#")  # one header digit of frame 300
    bad.write_bytes(bytes(raw))
    out = tmp_path / "L1"
    rc, stdout, stderr = run([str(bad), str(out)], run_env(tmp_path, config))
    assert rc == 0, stderr[-3000:]
    (entry,) = run_records(out)[-1]["inputs"]
    assert entry["status"] == "degraded" and "1 corrupt byte range(s)" in entry["reason"]
    (skipped,) = entry["skipped_ranges"]
    assert skipped["file"] == bad.name
    assert skipped["offset"] <= 300 * frame_bytes + 100 < skipped["offset"] + skipped["length"]
    assert f"degraded: 1. {bad.stem}: 1 corrupt byte range(s)" in stdout
    assert f"{bad.stem}  degraded" in stdout  # the table's status column
    assert zarr.open_array(str(out / f"{bad.stem}_L1.zarr" / "images")).shape[0] == FRAMES - 1


def bash_scripts() -> list[str]:
    """The repository's bash scripts: tracked files named *.sh or with a bash shebang."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    found = []
    for name in filter(None, listed):
        if name.endswith(".sh"):
            found.append(name)
            continue
        with contextlib.suppress(OSError), open(REPO / name, "rb") as f:
            if f.readline().rstrip() in (b"#!/usr/bin/env bash", b"#!/bin/bash"):
                found.append(name)
    return sorted(found)


def test_bash_scripts_are_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        if os.environ.get("CI"):
            pytest.fail("CI must check the bash scripts, but shellcheck is not installed "
                        "(apt-get install shellcheck; .ci/run installs it)")
        pytest.skip("shellcheck is not installed (apt-get install shellcheck); CI runs it")
    scripts = bash_scripts()
    assert {"run.sh", "env_bootstrap.sh", "tests/run_tests.sh", ".ci/run"} <= set(scripts)
    done = subprocess.run([shellcheck, *scripts], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_usage_errors_and_help(tmp_path: Path) -> None:
    env = run_env(tmp_path, tmp_path / "none.toml")
    rc, stdout, _ = run(["--help"], env)
    assert rc == 0 and "--keep-going" in stdout and "--dry-run" in stdout
    rc, _, stderr = run(["--steps", "3", "a.pff", "out"], env)
    assert rc == 2 and "--steps 3" in stderr
    rc, _, stderr = run(["only_one_argument"], env)
    assert rc == 2 and "need at least one input" in stderr


@pytest.mark.slow
def test_steps_1_then_steps_2(data: Data, tmp_path: Path) -> None:
    env = run_env(tmp_path, write_config(tmp_path / "local.toml", "local"))
    l0_out, l1_out = tmp_path / "L0", tmp_path / "L1"
    rc, _, stderr = run(["--steps", "1", str(data.file_a), str(l0_out)], env)
    assert rc == 0, stderr[-3000:]
    l0 = l0_out / f"{data.file_a.stem}_L0.zarr"
    assert l0.is_dir() and not (l0_out / driver_plan.SCRATCH_L0_SUBDIR).exists()
    rc, _, stderr = run(["--steps", "2", str(l0), str(l1_out)], env)
    assert rc == 0, stderr[-3000:]
    check_l1(l1_out / f"{data.file_a.stem}_L1.zarr", [data.file_a])
    assert l0.is_dir(), "an input L0 store was removed"


def test_an_empty_job_name_keeps_the_plan_in_its_columns(data: Data, tmp_path: Path) -> None:
    """Defect: the plan's fields were TAB-separated and bash's read merges two TABs, so
    the empty name of ``_L0.zarr`` shifted the columns: ``--steps 2 emp/_L0.zarr out``
    ran step 2 with its input and output swapped."""
    from panoseti_pipeline.cli import step1

    config = write_config(tmp_path / "local.toml", "local")
    l0 = tmp_path / "emp" / "_L0.zarr"
    assert step1.main([str(data.file_a), str(l0), str(config), "--quiet"]) == 0
    before = tree_state(l0)
    out = tmp_path / "out"
    rc, _, stderr = run(["--steps", "2", str(l0), str(out)],
                        run_env(tmp_path, config))
    assert rc == 0, stderr[-3000:]
    check_l1(out / "_L1.zarr", [data.file_a])
    assert tree_state(l0) == before


FAKE_SBATCH = """#!/usr/bin/env bash
# sbatch as SLURM runs a job: the script on stdin, or --wrap CMD in a /bin/sh script
script="$FAKE_SLURM_DIR/job.sh"
wrap=""
while (($#)); do
  if [[ "$1" == --wrap ]]; then wrap="$2"; shift; fi
  shift
done
if [[ -n "$wrap" ]]; then printf '#!/bin/sh\\n%s\\n' "$wrap" >"$script"; else cat >"$script"; fi
chmod +x "$script"
echo 4242
"""
FAKE_ENV = """#!/usr/bin/env python3
import json, os, sys
json.dump(sys.argv[1:], open(os.path.join(os.environ["FAKE_SLURM_DIR"], "argv.json"), "w"))
"""


def test_sbatch_passes_every_argument_as_written(data: Data, tmp_path: Path) -> None:
    """Defect: the job was ``sbatch --wrap "$(printf %q ...)"``: bash's quoting ($'...'
    for non-ASCII bytes) run by /bin/sh, which passed it on literally. The job script
    (here run as SLURM runs one) must hand run.sh exactly the paths given."""
    fake = tmp_path / "fake"
    fake.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("env", FAKE_ENV)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    inputs = tmp_path / "nuit_é"
    inputs.mkdir()
    shutil.copy(data.file_a, inputs)
    out = tmp_path / "L1 ñ"
    config = write_config(tmp_path / "local.toml", "local")
    env = run_env(tmp_path, config, FAKE_SLURM_DIR=str(fake), LC_ALL="C",
                  PATH=f"{fake}:{os.environ['PATH']}")
    rc, _, stderr = run(["--sbatch", "-c 2", "--keep-l0", str(inputs / data.file_a.name),
                         str(out)], env, quicklook=True)  # the job's arguments, as given
    assert rc == 0 and "submitted SLURM job 4242" in stderr, stderr[-3000:]
    job = subprocess.run([str(fake / "job.sh")], env=env, capture_output=True, text=True,
                         timeout=60)
    assert job.returncode == 0, job.stderr
    argv = json.loads((fake / "argv.json").read_text())
    assert argv == [f"CONFIG_FILE={config}", RUN_SH, "--steps", "1,2", "--keep-l0", "--",
                    str(inputs / data.file_a.name), str(out)]


def test_steps_2_lays_out_a_runs_l1_like_steps_1_2(tmp_path: Path) -> None:
    """Defect: ``--steps 2`` wrote L1 straight into the output directory: no per-run
    directory, no bundle, no housekeeping for ``open_run`` (and runs hiding each other's
    products in pypff's reader, the reason for one directory per run)."""
    from panoseti_pipeline import products, run_bundle

    obs = synthetic_obs.make_observation(tmp_path / "in", frames_per_file=200,
                                         files_per_stream=1, products=("img16", "ph256"))
    env = run_env(tmp_path, write_config(tmp_path / "local.toml", "local"))
    l0_out, l1_out = tmp_path / "L0", tmp_path / "L1"
    rc, _, stderr = run(["--steps", "1", str(obs), str(l0_out)], env)
    assert rc == 0, stderr[-3000:]
    run_name = obs.name.removesuffix(".pffd")
    l0s = sorted((l0_out / run_name).glob("*_L0.zarr"))
    assert len(l0s) == 2
    before = tree_state(l0_out)
    rc, _, stderr = run(["--steps", "2", *map(str, l0s), str(l1_out)], env)
    assert rc == 0, stderr[-3000:]
    assert tree_state(l0_out) == before  # inputs untouched
    for dp in ("img16", "ph256"):
        name = f"{run_name}.dp_{dp}.bpp_2.module_1_L1.zarr"
        check_l1(l1_out / run_name / name, sorted(obs.glob(f"*dp_{dp}*.pff")))
    bundle = l1_out / run_name / f"{obs.name}.panoseti-meta"
    assert run_bundle.verify_bundle(bundle) == []
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["source_run_dir"] == str(obs)
    assert sorted(manifest["zarr_stores"]) == sorted(p.name.replace("_L0", "_L1")
                                                     for p in l0s)
    assert (bundle / "hk.pff").read_bytes() == (obs / "hk.pff").read_bytes()
    tree = products.open_run(l1_out / run_name)
    assert {"module_1", "housekeeping"} <= set(tree.children)


# --------------------------------------------------------------------------- output lock


def test_a_second_run_on_the_same_output_exits_2_naming_the_holder(data: Data,
                                                                    tmp_path: Path) -> None:
    config = write_config(tmp_path / "local.toml", "local")
    out = tmp_path / "L1"
    lock = out / ownership.LOCK_NAME
    env = run_env(tmp_path, config, **{SLOW_TASK: "2.0"})
    with started([str(data.file_a), str(out)], env) as first:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not lock.exists():
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.05)
        rc, _, stderr = run([str(data.file_b), str(out)], run_env(tmp_path, config))
        assert rc == 2, stderr[-3000:]
        assert f"another run.sh writes here (pid {first.pid} on " in stderr
        assert not (out / f"{data.file_b.stem}_L1.zarr").exists()
        assert lock.exists()  # the first run's lock is still there, still its own
        rc, _, stderr = finish(first)
    assert rc == 0, stderr[-3000:]
    assert not lock.exists()
    check_l1(out / f"{data.file_a.stem}_L1.zarr", [data.file_a])


def test_a_stale_lock_is_taken_over_with_a_notice(data: Data, tmp_path: Path) -> None:
    config = write_config(tmp_path / "local.toml", "local")
    out = tmp_path / "L1"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])  # a run.sh killed long ago
    gone = ownership.Holder.of(proc.pid)
    proc.wait()
    ownership.claim(out / ownership.LOCK_NAME, gone)
    rc, _, stderr = run(["--steps", "1", str(data.file_a), str(out)],
                        run_env(tmp_path, config))
    assert rc == 0, stderr[-3000:]
    assert f"took over the lock of a run that is gone (pid {gone.pid} on" in stderr
    assert not (out / ownership.LOCK_NAME).exists()


def test_kept_l0_stores_stay_and_only_a_stopped_runs_transient_l0_goes(
        data: Data, tmp_path: Path) -> None:
    """Defect: after ``--keep-l0``, a plain rerun deleted the kept L0 stores, "left by a
    run stopped before it could" (false). Now kept L0 stores live in <output>/L0, are
    recorded and cataloged as kept, and stay; only an L0 marked transient by a run that
    is gone (found by the soak test: a run killed between step 2 and the L0's removal)
    is removed, and the scratch directory with it once empty."""
    from panoseti_pipeline import catalog

    config = write_config(tmp_path / "local.toml", "local")
    out = tmp_path / "L1"
    kept = out / driver_plan.KEPT_L0_SUBDIR / f"{data.file_a.stem}_L0.zarr"
    rc, _, stderr = run(["--keep-l0", str(data.file_a), str(out)],
                        run_env(tmp_path, config))
    assert rc == 0 and kept.is_dir(), stderr[-3000:]
    (entry,) = run_records(out)[-1]["inputs"]
    assert entry["l0"] == str(kept) and entry["l0_kept"] and not entry["l0_removed"]
    assert {(Path(r["path"]).name, r["level"]) for r in catalog.query(out)} == {
        (kept.name, "L0"), (f"{data.file_a.stem}_L1.zarr", "L1")}
    before = tree_state(kept)
    # a stopped run's transient L0 in the scratch directory (an earlier run made it)
    scratch = out / driver_plan.SCRATCH_L0_SUBDIR
    transient = scratch / kept.name
    shutil.copytree(kept, transient)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])  # that run.sh, long gone
    ownership.claim(scratch / f"{kept.name}.abcd.transient", ownership.Holder.of(gone.pid))
    gone.wait()
    rc, _, stderr = run([str(data.file_a), str(out)],
                        run_env(tmp_path, config))
    assert rc == 0, stderr[-3000:]
    assert "skipped" in stderr and "left by a run stopped" not in stderr
    assert f"{transient}: removed the store a stopped run made to read once" in stderr
    assert tree_state(kept) == before, "a kept L0 store was touched"
    assert not scratch.exists()
    (entry,) = run_records(out)[-1]["inputs"]
    assert entry["status"] == "skipped" and entry["l0_kept"] is False
    check_l1(out / f"{data.file_a.stem}_L1.zarr", [data.file_a])


def test_two_runs_sharing_an_l0_directory_never_touch_each_others_l0(
        data: Data, tmp_path: Path) -> None:
    """Defect: two runs on different outputs with one [run] l0_dir: B's step 1 failed
    "exists (found when publishing)", B's cleanup removed A's L0, A's step 2 failed; both
    exited 1. The L0 directory is locked like the output: B exits 2 before any work."""
    l0_dir = tmp_path / "scratch_l0"
    config = write_config(tmp_path / "local.toml", "local", run={"l0_dir": str(l0_dir)})
    first_out, second_out = tmp_path / "A", tmp_path / "B"
    env = run_env(tmp_path, config, **{SLOW_TASK: "1.0"})
    with started([str(data.file_a), str(first_out)], env) as first:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not list(l0_dir.glob("*.partial")):  # A's step 1 under way
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the first run's step 1 never started"
            time.sleep(0.05)
        rc, _, stderr = run([str(data.file_a), str(second_out)], run_env(tmp_path, config))
        assert rc == 2, stderr[-3000:]
        assert f"{l0_dir}: another run.sh writes here (pid {first.pid} on " in stderr
        assert not (second_out / ownership.LOCK_NAME).exists()  # all locks or none
        rc, _, stderr = finish(first)
    assert rc == 0, stderr[-3000:]
    check_l1(first_out / f"{data.file_a.stem}_L1.zarr", [data.file_a])
    assert not l0_dir.exists()  # its L0 and lock removed, then the directory it made
