"""The SLURM cluster (``cluster_type = "slurm"``), end to end, on a real one-node SLURM.

tests/slurm_testbed.py starts munged, slurmctld and slurmd on 127.0.0.1 once per session;
every Dask address stays on loopback (``interface = "lo"``). The tests marked ``slurm``
skip, saying why, only when SLURM cannot be started here (not root, not installed); with
``CI`` set they fail instead. After each of them no job may be left in the queue (the
test bed's cluster is private: every job in it is a test's) and no process carrying the
test's ``PANOSETI_TEST_TAG`` (sbatch exports it into the jobs) may be alive; leftovers are
cancelled or stopped by job id and PID, and fail the test.

A task is slowed down in the worker jobs by the test plugin (tests/plugins, ``SLOW_TASK``):
the job script's prologue puts it on PYTHONPATH, so it does not depend on sbatch
exporting the caller's environment.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import slurm_testbed  # noqa: E402
from fault_tools import (  # noqa: E402
    PLUGINS,
    RUN_SH,
    SLOW_TASK,
    STEP1,
    Spawned,
    assert_nothing_left,
    assert_same_store,
    base_env,
    run_cmd,
)
from process_tools import (  # noqa: E402
    PYTHON,
    ManagerProcess,
    cmdline,
    described,
    foreign_client_error,
    lingering,
    start_or_skip,
    stop_by_pid,
    tagged_processes,
)

from panoseti_pipeline import cluster as dask_cluster  # noqa: E402
from panoseti_pipeline.config import load_config  # noqa: E402
from panoseti_pipeline.driver import plan as driver_plan  # noqa: E402
from panoseti_pipeline.errors import ClusterError  # noqa: E402

psutil = pytest.importorskip("psutil")
distributed = pytest.importorskip("distributed")

#: Two worker jobs of one core each: the test node has CPUs=2.
SLURM = {
    "use_dask": True,
    "cluster_type": "slurm",
    "interface": "lo",
    "slurm_jobs": 2,
    "slurm_cores": 1,
    "slurm_memory": "1GB",
    "slurm_walltime": "00:10:00",
    "remote_python": PYTHON,
    "dashboard_port": 0,
    "startup_timeout_s": 60.0,
}
#: Small chunks and tasks: the demo night (6000 frames a stream) in 6 tasks per step.
SECTIONS = {
    "pff_to_zarr": {"time_chunk": 1024, "chunk_size_mb": 1},
    "baseline_subtract": {"compute_chunk_size": 1024},
    "run": {"stop_grace_s": 20.0},
}
RUN_TIMEOUT_S = 180.0


# -- the test bed ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[slurm_testbed.SlurmTestBed]:
    """The session's SLURM (SLURM_CONF set for every command and process started);
    skipped (CI: failed) when it cannot start."""
    testbed = start_or_skip(lambda: slurm_testbed.start_slurm(tmp_path_factory.mktemp("slurm")),
                            slurm_testbed.SlurmUnavailable, "SLURM", "SLURM")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in testbed.env().items():
            mp.setenv(name, value)
        try:
            yield testbed
        finally:
            testbed.stop()


@pytest.fixture
def tag(bed: slurm_testbed.SlurmTestBed) -> Iterator[str]:
    """The ``PANOSETI_TEST_TAG`` of the test's processes; after the test, no job may be
    in the queue and no process with the tag alive."""
    test_tag = uuid.uuid4().hex
    yield test_tag
    jobs = bed.wait_no_jobs(timeout=15.0)
    bed.cancel_all()
    left = lingering(test_tag)
    names = described(left)
    stop_by_pid(left)
    assert not jobs, f"SLURM jobs left (cancelled now): {jobs}"
    assert not names, f"processes left running (stopped now): {names}"


@pytest.fixture(scope="session")
def night(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo night: an img16 and a ph256 stream of two files each (.pffd)."""
    from panoseti_pipeline.driver import demo

    return demo.write_demo_observation(tmp_path_factory.mktemp("night"))


@pytest.fixture(scope="session")
def local_l1(night: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo night's L1 stores by run.sh without a cluster: the reference."""
    work = tmp_path_factory.mktemp("local")
    config = write_config(work / "local.toml", {"use_dask": False})
    rc, _, err = run_cmd([RUN_SH, "--no-quicklook", str(night), str(work / "L1")],
                         run_env(work, config, "ref"))
    assert rc == 0, err[-3000:]
    return work / "L1"


# -- helpers -----------------------------------------------------------------------------


def write_config(path: Path, cluster: dict[str, Any], **sections: dict[str, Any]) -> Path:
    import tomli_w

    path.write_text(tomli_w.dumps({"cluster": cluster, **SECTIONS, **sections}))
    return path


def slurm_keys(tmp_path: Path, slow_task_s: float = 0.0, **keys: Any) -> dict[str, Any]:
    """The SLURM cluster's keys; the jobs' output under tmp_path, and the test plugin in
    the jobs (through the prologue) when ``slow_task_s`` is set."""
    prologue = []
    if slow_task_s:
        prologue = [f"export PYTHONPATH={PLUGINS}", f"export {SLOW_TASK}={slow_task_s:g}"]
    return {**SLURM, "slurm_log_directory": str(tmp_path / "job_logs"),
            "local_directory": str(tmp_path / "scratch"),
            "slurm_job_script_prologue": prologue, **keys}


def run_env(tmp_path: Path, config: Path, tag: str) -> dict[str, str]:
    return base_env(tmp_path, CONFIG_FILE=str(config), PANOSETI_TEST_TAG=tag)


def store_names(directory: Path) -> list[str]:
    """The L1 stores under ``directory`` (run.sh puts a run's in a directory of its own)."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*_L1.zarr"))


def assert_same_l1(got: Path, want: Path) -> None:
    names = store_names(want)
    assert len(names) == 2, names  # img16 and ph256
    assert store_names(got) == names
    for name in names:
        assert_same_store(got / name, want / name)


def listening_addresses(procs: list[Any]) -> list[str]:
    found = []
    for proc in procs:
        try:
            found += [c.laddr.ip for c in proc.net_connections("inet") if c.status == "LISTEN"]
        except psutil.Error:
            pass
    return found


@pytest.fixture
def make_manager(tmp_path: Path, tag: str) -> Iterator:
    started: list[ManagerProcess] = []

    def make(cluster: dict[str, Any], name: str = "m") -> ManagerProcess:
        workdir = tmp_path / name
        workdir.mkdir()
        manager = ManagerProcess(workdir, write_config(workdir / "config.toml", cluster), tag)
        started.append(manager)
        return manager.start()

    yield make
    for manager in started:
        manager.stop()


# -- the cluster itself ------------------------------------------------------------------


@pytest.mark.slurm
def test_workers_run_in_slurm_jobs_on_loopback_and_are_cancelled(
        bed, make_manager, tmp_path) -> None:
    started = time.monotonic()
    manager = make_manager(slurm_keys(tmp_path))
    address = manager.wait_ready()
    up_s = time.monotonic() - started
    assert address.startswith("tls://127.0.0.1:")
    assert f"scheduler {address} (slurm, 2 workers)" in manager.stdout
    queued = dict(bed.jobs())
    assert sorted(queued.values()) == ["RUNNING", "RUNNING"], queued
    client = dask_cluster.connect_client(address, timeout=30,
                                               credentials=manager.credentials)
    try:
        rows = dask_cluster.describe_workers(client)
    finally:
        client.close()
    # One worker in each job, in the configured scratch, each line naming its job.
    assert sorted(r["slurm_job"] for r in rows) == sorted(queued), rows
    for row in rows:
        assert f"in SLURM job {row['slurm_job']}, pid {row['pid']}" in manager.stdout
        assert Path(row["local_directory"]).is_relative_to(tmp_path / "scratch"), row
    # The jobs' processes carry the test's tag (sbatch exports it); every socket they and
    # the manager (the scheduler) listen on is on loopback.
    job_procs = tagged_processes(manager.tag)
    assert {r["pid"] for r in rows} <= {p.pid for p in job_procs}
    listening = listening_addresses(job_procs)
    assert len(listening) >= 3 * len(rows), listening  # nanny, worker, worker's HTTP
    assert all(ip.startswith("127.") for ip in listening), listening
    print(f"\nSLURM cluster of 2 worker jobs up in {up_s:.1f} s")
    # Only the cluster's own key gets in; each job keeps it in a private directory of its
    # node, written by its job script (no shared directory needed).
    with pytest.raises(ClusterError, match="accepts TLS connections only"):
        dask_cluster.connect_client(address, timeout=5)
    assert "certificate" in foreign_client_error(address)
    keys = {Path(c[c.index("--tls-key") + 1]) for p in job_procs
            if "--tls-key" in (c := cmdline(p))}
    assert len(keys) == 2, keys  # one per job
    assert all(k.parent.stat().st_mode & 0o777 == 0o700 for k in keys)
    assert all(k.stat().st_mode & 0o777 == 0o600 for k in keys)

    assert manager.terminate() == 0, manager.stderr
    assert not any(k.parent.exists() for k in keys)  # removed when the job script ended
    assert "slurm cluster closed" in manager.stdout
    assert bed.jobs() == []  # the manager waited for its jobs to leave the queue
    assert not manager.scheduler_file.exists()


@pytest.mark.slurm
def test_refused_job_is_one_clear_error(bed, make_manager, tmp_path) -> None:
    manager = make_manager(slurm_keys(tmp_path, slurm_queue="nope"))
    assert manager.wait_exit(timeout=60) == 1
    lines = manager.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cluster_lifecycle_manager.py: error: ")
    assert "sbatch refused the worker job" in lines[0] and "nope" in lines[0], lines[0]
    assert not manager.scheduler_file.exists()


@pytest.mark.slurm
def test_sigterm_while_a_job_waits_in_the_queue_cancels_every_job(bed, make_manager,
                                                                  tmp_path) -> None:
    """Two jobs of 2 cores on a 2-CPU node: one runs, one waits; SIGTERM during the start
    cancels both, the queued one included."""
    manager = make_manager(slurm_keys(tmp_path, slurm_cores=2))
    deadline = time.monotonic() + 60
    while sorted(state for _, state in bed.jobs()) != ["PENDING", "RUNNING"]:
        assert manager.proc.poll() is None, manager.stderr
        assert time.monotonic() < deadline, bed.jobs()
        time.sleep(0.1)
    assert manager.terminate() == 130, manager.stderr
    assert bed.jobs() == []
    assert not manager.scheduler_file.exists()


@pytest.mark.slurm
def test_scancel_of_a_worker_job_mid_step_gives_the_same_store(
        bed, make_manager, night, tmp_path, tag, monkeypatch) -> None:
    """scancel the job of a busy worker during step 1: the step finishes on the other job,
    the store is identical to a run without a cluster, and a new job replaces the lost one
    (after distributed's lost-worker-timeout, shortened here)."""
    monkeypatch.setenv("DASK_DISTRIBUTED__DEPLOY__LOST_WORKER_TIMEOUT", "1s")
    inputs = sorted(str(p) for p in night.glob("*dp_img16*.pff"))
    local = write_config(tmp_path / "local.toml", {"use_dask": False})
    env = base_env(tmp_path, PANOSETI_TEST_TAG=tag)
    with Spawned([PYTHON, STEP1, *inputs, str(tmp_path / "local_L0.zarr"), str(local),
                  "--quiet"], env) as ref:  # the reference, while the cluster starts
        manager = make_manager(slurm_keys(tmp_path, slow_task_s=2.0))
        address = manager.wait_ready()
        assert ref.finish() == 0, ref.stderr
    client = dask_cluster.connect_client(address, timeout=30,
                                               credentials=manager.credentials)
    out = tmp_path / "slurm_L0.zarr"
    try:
        jobs = {r["address"]: r["slurm_job"] for r in dask_cluster.describe_workers(client)}
        with Spawned([PYTHON, STEP1, *inputs, str(out), str(manager.config), address,
                      "--quiet", "--dask-credentials", manager.credentials], env) as step1:
            victim = None
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while victim is None and time.monotonic() < deadline:
                assert step1.proc.poll() is None, step1.proc.communicate()[1][-3000:]
                busy = [w for w, keys in client.processing().items() if keys and w in jobs]
                if busy and list(tmp_path.glob("slurm_L0.zarr*partial*")):
                    victim = jobs[busy[0]]
                    cancelled = bed.run("scancel", victim)
                    assert cancelled.returncode == 0, cancelled.stderr
                time.sleep(0.05)
            assert victim is not None, "no worker was busy during step 1"
            assert step1.proc.poll() is None, "step 1 ended right when the job was cancelled"
            assert step1.finish(RUN_TIMEOUT_S) == 0, step1.stderr[-3000:]
        assert victim not in dict(bed.jobs())
        # The cluster submitted a new job for the lost one; its worker joins.
        client.wait_for_workers(2, timeout=60)
        now = {r["slurm_job"] for r in dask_cluster.describe_workers(client)}
        assert len(now) == 2 and victim not in now, now
    finally:
        client.close()
    assert_same_store(out, tmp_path / "local_L0.zarr")
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []
    assert manager.terminate() == 0, manager.stderr
    assert bed.jobs() == []


# -- run.sh ------------------------------------------------------------------------------


@pytest.mark.slurm
def test_run_sh_on_slurm_matches_local(bed, night, local_l1, tmp_path, tag) -> None:
    config = write_config(tmp_path / "slurm.toml", slurm_keys(tmp_path))
    started = time.monotonic()
    rc, _, err = run_cmd([RUN_SH, "--no-quicklook", str(night), str(tmp_path / "L1")],
                         run_env(tmp_path, config, tag), timeout=RUN_TIMEOUT_S)
    assert rc == 0, err[-4000:]
    print(f"\ndemo night on 2 SLURM worker jobs: {time.monotonic() - started:.1f} s wall")
    assert bed.jobs() == []
    assert_same_l1(tmp_path / "L1", local_l1)
    # The run record names the workers and their jobs.
    record = tomllib.loads(next((tmp_path / "L1").glob("run_record_*.toml")).read_text())
    workers = [w for w in record["cluster"]["manager_output"] if w.startswith("worker ")]
    assert len(workers) == 2 and all(" in SLURM job " in w for w in workers), workers
    assert record["cluster"]["cluster_type"] == "slurm" and record["cluster"]["jobs"] == 2


@pytest.mark.slurm
def test_ctrl_c_of_run_sh_leaves_no_job_and_no_process(bed, night, tmp_path, tag) -> None:
    config = write_config(tmp_path / "slurm.toml", slurm_keys(tmp_path, slow_task_s=1.0))
    out = tmp_path / "L1"
    l0_dir = out / driver_plan.SCRATCH_L0_SUBDIR
    with Spawned([RUN_SH, "--no-quicklook", str(night), str(out)],
                 run_env(tmp_path, config, tag)) as s:
        s.wait_until(lambda: bool(list(l0_dir.rglob("*.partial"))) and len(bed.jobs()) == 2,
                     "step 1 under way on the SLURM workers", timeout=RUN_TIMEOUT_S)
        os.killpg(s.pid, signal.SIGINT)  # Ctrl-C at a terminal: the whole group
        assert s.finish(timeout=60) == 130, s.stderr[-3000:]
        assert bed.wait_no_jobs(timeout=5) == []
        assert_nothing_left(s.pid)
    assert "interrupted by SIGINT" in s.stderr
    assert not list(out.rglob("*.partial")) and not list(out.rglob("*_L1.zarr"))


@pytest.mark.slurm
def test_sbatch_runs_the_whole_night_as_one_job(bed, night, local_l1, tmp_path, tag) -> None:
    """run.sh --sbatch: one job, whose run.sh uses a local cluster on the node."""
    local = {"use_dask": True, "cluster_type": "local", "interface": "lo", "local_workers": 2,
             "local_memory_per_worker": "1GB", "startup_timeout_s": 60.0,
             "local_directory": str(tmp_path / "scratch_$SLURM_JOB_ID")}
    config = write_config(tmp_path / "node.toml", local)
    log = tmp_path / "job_%j.out"
    rc, _, err = run_cmd([RUN_SH, "--no-quicklook", "--sbatch", f"-c 2 --mem=3G -t 10 -o {log}",
                          str(night), str(tmp_path / "L1")], run_env(tmp_path, config, tag))
    assert rc == 0, err[-3000:]
    job = err.split("submitted SLURM job ", 1)[1].split()[0]
    assert bed.wait_no_jobs(timeout=RUN_TIMEOUT_S) == []
    output = Path(str(log).replace("%j", job)).read_text()
    assert bed.job_field(job, "JobState") == "COMPLETED", output[-3000:]
    assert bed.job_field(job, "ExitCode") == "0:0"
    assert output.count(f" in SLURM job {job}, ") == 2, output[-3000:]  # the local workers
    assert (tmp_path / f"scratch_{job}").is_dir()  # $SLURM_JOB_ID expanded in the job
    assert_same_l1(tmp_path / "L1", local_l1)


# -- without SLURM -----------------------------------------------------------------------


def test_slurm_arguments_map_the_config(tmp_path: Path) -> None:
    keys = {**SLURM, "slurm_jobs": 3, "slurm_cores": 4, "slurm_processes": 2,
            "slurm_memory": "8GB", "slurm_queue": "shared", "slurm_account": "panoseti",
            "slurm_walltime": "1-00:00:00", "slurm_job_extra_directives": ["--qos=normal"],
            "slurm_job_script_prologue": ["module load python"],
            "slurm_worker_extra_args": ["--lifetime", "3h50m"],
            "local_directory": "/scratch/$USER/job_$SLURM_JOB_ID"}
    cluster = load_config(write_config(tmp_path / "c.toml", keys)).cluster
    assert cluster.n_workers == 6
    args = dask_cluster.slurm_cluster_arguments(cluster)
    assert (args["cores"], args["processes"], args["memory"]) == (4, 2, "8GB")
    assert (args["queue"], args["account"], args["walltime"]) == ("shared", "panoseti",
                                                                  "1-00:00:00")
    assert args["job_extra_directives"] == ["--qos=normal"]
    assert args["local_directory"] == "/scratch/$USER/job_$SLURM_JOB_ID"  # expanded on the node
    assert args["interface"] == "lo" and args["python"] == PYTHON
    assert args["scheduler_options"] == {"port": 0, "dashboard": False,
                                         "dashboard_address": "127.0.0.1:0"}
    # The user's prologue first, then the line finding the interface's address on the node,
    # to which the worker's HTTP server is bound (its default is every interface).
    assert args["job_script_prologue"][0] == "module load python"
    assert "PANOSETI_WORKER_IP=" in args["job_script_prologue"][1]
    assert args["worker_extra_args"] == ["--lifetime", "3h50m", "--dashboard-address",
                                         '"$PANOSETI_WORKER_IP:0"']
    defaults = load_config(write_config(tmp_path / "d.toml",
                                        {"cluster_type": "slurm"})).cluster
    plain = dask_cluster.slurm_cluster_arguments(defaults)
    assert plain["queue"] is None and plain["account"] is None
    assert plain["local_directory"] is None and plain["interface"] is None
    assert plain["job_script_prologue"] == [] and plain["worker_extra_args"] == []
    # With credentials: the job script writes them first, the worker reads them, TLS.
    from panoseti_pipeline import cluster_credentials

    credentials = cluster_credentials.create(tmp_path)
    tls = dask_cluster.slurm_cluster_arguments(cluster, credentials)
    written = "\n".join(tls["job_script_prologue"][:-2])
    assert all(pem in written for pem in cluster_credentials.read_pems(credentials).values())
    assert tls["job_script_prologue"][-2] == "module load python"
    assert tls["worker_extra_args"] == ["--lifetime", "3h50m",
                                        *cluster_credentials.job_worker_args(),
                                        "--dashboard-address", '"$PANOSETI_WORKER_IP:0"']
    assert tls["protocol"] == "tls://" and tls["security"].require_encryption


def test_worker_scratch_inside_the_output_is_refused(night: Path, tmp_path: Path) -> None:
    out = tmp_path / "L1"
    config = write_config(tmp_path / "c.toml", {**SLURM, "local_directory": str(out / "spill")})
    plan, *_ = driver_plan.make_plan([str(night)], str(config), str(out))
    assert any("local_directory" in p and "output directory" in p for p in plan.problems), (
        plan.problems)
    fine = write_config(tmp_path / "f.toml", {**SLURM, "local_directory": str(tmp_path / "s")})
    plan, *_ = driver_plan.make_plan([str(night)], str(fine), str(out))
    assert plan.problems == []


def test_readme_slurm_config_block_is_valid() -> None:
    """The complete [cluster] block of docs/cluster.md's "A SLURM cluster" loads as it stands."""
    import re

    from panoseti_pipeline.config import from_dict

    section = (REPO / "docs" / "cluster.md").read_text().split("## A SLURM cluster", 1)[1]
    block = re.search(r"```toml\n(.*?)```", section, re.S).group(1)
    cluster = from_dict(tomllib.loads(block), "docs/cluster.md").cluster
    assert cluster.cluster_type == "slurm" and cluster.n_workers == 8
    assert "--lifetime" in cluster.slurm_worker_extra_args
