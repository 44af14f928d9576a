"""Tests of the per-process set-up and per-thread buffers of task processes (runners.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from panoseti_pipeline import runners


def test_each_step_gets_its_own_process_settings_on_a_long_lived_worker(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Step 1, step 2, step 1 again in one process: each applies its settings; a repeat
    of the same settings does nothing."""
    applied: list[tuple] = []
    monkeypatch.setattr(runners, "_applied", {})
    monkeypatch.setattr(runners.layout, "configure_zarr",
                        lambda concurrency, threads: applied.append(("zarr", concurrency,
                                                                     threads)))
    monkeypatch.setattr(runners.publish, "apply_permission_policy",
                        lambda gw: applied.append(("umask", gw)))
    step2 = runners.ProcessSettings(4, 0, 0, True)
    other = runners.ProcessSettings(16, 2, 3, False)
    step1 = runners.ProcessSettings(None, 2, 3, False)  # its tasks do not use zarr
    for settings in (step2, step2, other, step1, step1, step2):
        runners.prepare_process(settings)
    cpus = runners.cpus()
    assert applied == [("zarr", 4, cpus), ("umask", True), ("zarr", 16, 6), ("umask", False),
                       ("zarr", 4, cpus), ("umask", True)]


FAULTS_OF_REUSED_BLOCKS = """
import ctypes, json, resource, sys
import numpy as np
from panoseti_pipeline import runners
ctypes.CDLL(None).prctl(41, 0, 0, 0, 0)  # huge pages as by default (a parent's choice is inherited)
applied = runners.reuse_memory() if sys.argv[1] == "keep" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def block():  # a block's temporaries: several alive at once, then all freed
    arrays = [np.ones(4 << 20, np.uint8) for _ in range(8)]
    del arrays
block()
before = faults()
for _ in range(5):
    block()
status = open("/proc/self/status").read()
thp = int(status.split("THP_enabled:")[1].split()[0]) if "THP_enabled:" in status else None
print(json.dumps({"applied": applied, "faults": faults() - before, "thp": thp}))
"""


@pytest.mark.skipif(not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"),
                    reason="mallopt is glibc's")
def test_a_task_process_reuses_freed_memory_instead_of_faulting_it_in_again() -> None:
    """Blocks of 32 MB of temporaries, freed after each block: with glibc's defaults the
    next block faults fresh pages in again (5 x 8192 pages touched); kept, none. And no
    transparent huge pages, which numpy asks for and the kernel zeroes 2 MB at a time."""
    def run(mode: str) -> dict:
        out = subprocess.run([sys.executable, "-c", FAULTS_OF_REUSED_BLOCKS, mode],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    default, kept = run("default"), run("keep")
    assert default["faults"] >= 5000, default  # glibc gave the memory back
    assert kept["applied"] is True and kept["faults"] < 100, kept
    assert kept["thp"] in (0, None), kept  # no huge pages zeroed whole (None: old kernel)
    assert default["thp"] in (1, None), default


def test_thread_array_reuses_this_threads_buffer() -> None:
    a = runners.thread_array("test", (4, 8), np.float32)
    assert a.shape == (4, 8) and a.dtype == np.float32
    a[...] = 1
    b = runners.thread_array("test", (2, 3), np.uint16)  # smaller: the same memory
    assert b.shape == (2, 3) and np.shares_memory(a, b)
    c = runners.thread_array("test", (1000,), np.float64)  # larger: a new buffer
    assert c.shape == (1000,) and not np.shares_memory(a, c)


def _write_later(directory: str, i: int) -> int:
    """Task: the first fails at once; the others run on and then write into ``directory``."""
    if i == 0:
        raise RuntimeError("task 0 failed")
    time.sleep(1.0)
    Path(directory, "c").mkdir(parents=True, exist_ok=True)
    Path(directory, "c", str(i)).write_bytes(b"chunk")
    return i


def test_a_failed_dask_map_returns_only_when_no_task_still_writes(tmp_path: Path) -> None:
    """Defect: cancelling left running tasks writing into the partial store after the
    caller removed it. Now the failure reaches the caller once they have all ended."""
    from distributed import Client, LocalCluster

    partial = tmp_path / "out.zarr.0123.partial"
    partial.mkdir()
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=False,
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        runner = runners.DaskRunner(client, progress=False)
        with pytest.raises(RuntimeError, match="task 0 failed"):
            runner.map(_write_later, [(str(partial), i) for i in range(4)], "test",
                       lambda _i, _r: None)
        shutil.rmtree(partial)  # the caller's clean-up after the failure
        time.sleep(2.0)  # longer than any task still running would need to write
        assert not partial.exists()


def test_progress_into_a_file_is_whole_lines_about_every_ten_percent(tmp_path):
    """Where stderr is not a terminal (a redirected log, a SLURM -o file): no carriage
    returns, a line at about every 10 % and one at 100 %."""
    import subprocess
    import sys

    code = ("from panoseti_pipeline.runners import LocalRunner\n"
            "LocalRunner(2, progress=True).map(abs, [(i,) for i in range(95)], 'demo step',"
            " lambda i, r: None)\n")
    log = tmp_path / "stderr.log"
    for told in ({}, {"PANOSETI_PROGRESS": "lines"}):
        with log.open("wb") as err:
            subprocess.run([sys.executable, "-c", code], stderr=err, check=True, timeout=120,
                           env={**{k: v for k, v in os.environ.items()
                                   if k != "PANOSETI_PROGRESS"}, **told})
        text = log.read_bytes()
        assert b"\r" not in text and b"\x1b[" not in text
        lines = text.decode().splitlines()
        assert lines[-1] == "demo step: 100% (95/95 tasks)"
        assert 9 <= len(lines) <= 11 and all(line.startswith("demo step: ") for line in lines)


def test_a_step_process_leaves_every_task_of_its_maps_in_its_task_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each map adds its tasks (where and when each ran) to the file run.sh names; a file
    another process left is replaced, not extended; a task that failed has no record."""
    import socket

    path = tmp_path / "tasks_0_2.json"
    path.write_text(json.dumps({"pid": -1, "mode": "dask", "pool": "x", "threads": 9,
                                "tasks": [{"start": 0.0}]}))
    monkeypatch.setenv(runners.TASK_FILE_ENV, str(path))
    runner = runners.LocalRunner(3, progress=False)
    got: dict[int, int] = {}
    runner.map(abs, [(-i,) for i in range(5)], "first", got.__setitem__)
    assert got == {i: i for i in range(5)}  # the results, not the timings, are folded
    runner.map(abs, [(-i,) for i in range(5, 7)], "second", got.__setitem__)
    with pytest.raises(ZeroDivisionError):
        runner.map(divmod, [(1, 0)], "failing", lambda _i, _r: None)
    record = json.loads(path.read_text())
    # the pool of local tasks is the machine (steps side by side each have a share of it)
    assert record["pid"] == os.getpid() and record["threads"] == runners.host_cpus()
    assert record["mode"] == "local" and record["pool"] == f"local:{socket.gethostname()}"
    tasks = record["tasks"]
    assert [t["fn"] for t in tasks] == ["abs"] * 7
    for t in tasks:
        assert t["host"] == socket.gethostname() and t["pid"] == os.getpid()
        assert t["thread"] in {"task_0", "task_1", "task_2"} and t["worker"] is None
        assert 0 < t["start"] <= t["end"]
    assert tasks[4]["end"] <= tasks[5]["start"]  # the second map after the first


def test_dask_tasks_name_their_worker_and_the_cluster_s_threads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from distributed import Client, LocalCluster

    path = tmp_path / "tasks_0_1.json"
    monkeypatch.setenv(runners.TASK_FILE_ENV, str(path))
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=False,
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        runners.DaskRunner(client, progress=False).map(abs, [(-i,) for i in range(6)],
                                                       "test", lambda _i, _r: None)
        workers = set(client.nthreads())
        scheduler = client.scheduler.address
    record = json.loads(path.read_text())
    assert record["mode"] == "dask" and record["threads"] == 4
    assert record["pool"] == scheduler
    assert len(record["tasks"]) == 6
    assert {t["worker"] for t in record["tasks"]} <= workers
    assert all("Dask" in t["thread"] and t["start"] <= t["end"] for t in record["tasks"])
