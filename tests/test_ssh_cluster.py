"""The multi-host SSH cluster, end to end, through a throwaway sshd on loopback.

One sshd (tests/sshd_testbed.py) listens on 127.0.0.1 and 127.0.0.2, which play two
hosts; every Dask address stays on loopback (``interface = "lo"``). The [cluster] sections
are the original pipeline's SSH form (``use_dask``, ``ssh_hosts``, ``ssh_*_per_*``) plus
the test bed's keys (port, user, key, known_hosts, remote_python = this venv's python).

The tests skip, saying why, only when sshd cannot be started here; with ``CI`` set they
fail instead. After every test nothing started through the sshd (found by the
``SSH_CONNECTION`` its sessions set) and nothing carrying the test's
``PANOSETI_TEST_TAG`` may be alive; leftovers are stopped by PID and fail the test. The
tests that only need a running cluster share one (:class:`TestOneCluster`); its
processes are checked the same way once it has closed, after them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import sshd_testbed  # noqa: E402

psutil = pytest.importorskip("psutil")
distributed = pytest.importorskip("distributed")
pytest.importorskip("asyncssh")

from fault_tools import assert_same_store, with_plugin  # noqa: E402
from process_tools import (  # noqa: E402
    PYTHON,
    ManagerProcess,
    cmdline,
    described,
    foreign_client_error,
    lingering,
    start_or_skip,
    tagged_env,
)

from panoseti_pipeline import cluster as dask_cluster  # noqa: E402
from panoseti_pipeline.errors import ClusterError  # noqa: E402

pytestmark = [pytest.mark.ssh]

STEP1 = str(REPO / "step1_pff_to_zarr.py")
RUN_SH = REPO / "run.sh"
STEP2 = REPO / "step2_dask_baseline.py"
HOSTS = list(sshd_testbed.HOSTS)
STEP_TIMEOUT_S = 120.0

#: The original pipeline's [cluster] form (the test bed's keys are added to it).
ORIGINAL_SSH_FORM = {
    "use_dask": True,
    "ssh_hosts": HOSTS,
    "ssh_workers_per_host": 2,
    "ssh_threads_per_worker": 1,
    "ssh_memory_per_worker": "1GB",
}

# -- the test bed ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sshd_testbed.SSHTestBed]:
    """The session's sshd on 127.0.0.1 and 127.0.0.2; skipped (CI: failed) if impossible."""
    testbed = start_or_skip(lambda: sshd_testbed.start_sshd(tmp_path_factory.mktemp("sshd")),
                            sshd_testbed.SSHDUnavailable, "sshd", "SSH-cluster")
    try:
        yield testbed
    finally:
        testbed.stop()


@pytest.fixture
def tag() -> str:
    return uuid.uuid4().hex


def assert_nothing_left(testbed: sshd_testbed.SSHTestBed | None, tag: str,
                        keep: Callable[[Any], bool] | None = None) -> None:
    """No process of the sshd's sessions (but those ``keep`` accepts) or with ``tag``;
    leftovers are stopped by PID, then fail the test."""
    def sessions() -> list:
        return [p for p in (testbed.processes() if testbed else []) if not (keep and keep(p))]

    left = lingering(tag, sessions)
    names = described(left)
    sshd_testbed.stop_processes(left)
    assert not names, f"processes left running (stopped now): {names}"


@pytest.fixture(autouse=True)
def nothing_left(request: pytest.FixtureRequest, tag: str) -> Iterator[None]:
    """After each test: no process of the sshd's sessions or with this test's tag (but
    those of a shared cluster the test uses, checked when that cluster closes)."""
    yield
    testbed = request.getfixturevalue("bed") if "bed" in request.fixturenames else None
    shared = (request.getfixturevalue("one_cluster") if "one_cluster" in request.fixturenames
              else None)
    assert_nothing_left(testbed, tag, shared.owns if shared else None)


# -- helpers -----------------------------------------------------------------------------


def write_config(path: Path, cluster: dict[str, Any], **sections: dict[str, Any]) -> Path:
    import tomli_w

    path.write_text(tomli_w.dumps({"cluster": cluster, **sections}))
    return path


def ssh_cluster(bed: sshd_testbed.SSHTestBed, **keys: Any) -> dict[str, Any]:
    """The original SSH form plus the test bed's keys, then ``keys``."""
    return {**ORIGINAL_SSH_FORM, **bed.cluster_keys(PYTHON), "startup_timeout_s": 60.0, **keys}


@pytest.fixture
def make_manager(tmp_path: Path, tag: str) -> Iterator:
    started: list[ManagerProcess] = []

    def make(cluster: dict[str, Any], name: str = "m", **sections: Any) -> ManagerProcess:
        workdir = tmp_path / name
        workdir.mkdir()
        config = write_config(workdir / "config.toml", cluster, **sections)
        manager = ManagerProcess(workdir, config, tag)
        started.append(manager)
        return manager

    yield make
    for manager in started:
        manager.stop()


def module_probe():
    """A probe run on a worker or the scheduler (pickled by value: defined in a function)."""

    def probe(names: tuple[str, ...], dask_scheduler: Any = None) -> dict[str, Any]:
        import importlib
        import os

        return {"cwd": os.getcwd(),
                "files": {n: importlib.import_module(n).__file__ for n in names}}

    return probe


def start_step1(inputs: list[Path], output: Path, config: Path, *extra: str, tag: str,
                cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, STEP1, *map(str, inputs), str(output), str(config),
                             *extra], cwd=cwd, env=tagged_env(tag), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="session")
def big_stream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One clean img16 file large enough for ~25 tasks of a tenth of a second or more."""
    from panoseti_pipeline import synthetic as synthetic_obs

    return synthetic_obs.write_big_file(tmp_path_factory.mktemp("big"), 32)


#: Small chunks and tasks (one 512-frame chunk of 1.3 MB each, one chunk per shard: a
#: task owns whole shards) so that step 1 on big_stream runs in ~30 tasks, and a worker
#: can be killed while others wait.
MANY_TASKS = {"time_chunk": 512, "chunk_size_mb": 1, "shard_factor": 1}


# -- the cluster itself ------------------------------------------------------------------


@dataclass
class OneCluster:
    """A running SSH cluster shared by the tests of :class:`TestOneCluster`."""

    manager: ManagerProcess
    address: str
    #: The processes started through the sshd when the cluster was ready.
    roots: set[int]

    def owns(self, proc: Any) -> bool:
        """Whether ``proc`` is one of the cluster's processes (a restarted worker is below
        its nanny)."""
        try:
            return proc.pid in self.roots or any(p.pid in self.roots for p in proc.parents())
        except psutil.Error:
            return False


@pytest.fixture(scope="class")
def one_cluster(bed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OneCluster]:
    """The original SSH form, 4 workers on two hosts; after the class's tests it must close
    cleanly and leave nothing running."""
    workdir = tmp_path_factory.mktemp("one_cluster")
    config = write_config(workdir / "config.toml", ssh_cluster(bed), pff_to_zarr=MANY_TASKS)
    manager = ManagerProcess(workdir, config).start()
    try:
        address = manager.wait_ready()
        local = Path(manager.credentials)
        remote = Path.home() / f".panoseti_{local.name}"
        yield OneCluster(manager, address, {p.pid for p in bed.processes()})
        assert manager.terminate() == 0, manager.stderr
        assert "ssh cluster closed" in manager.stdout
        assert not manager.scheduler_file.exists()
        # the TLS credentials are gone, here and on the SSH hosts
        assert not local.exists() and not remote.exists()
    finally:
        manager.stop()
        assert_nothing_left(bed, manager.tag)


class TestOneCluster:
    """Tests that only need a running SSH cluster share one (a start costs seconds); each
    leaves it as it found it: 4 workers, two per host."""

    def test_workers_run_on_both_ssh_hosts_outside_the_repo(self, bed, one_cluster) -> None:
        manager, address = one_cluster.manager, one_cluster.address
        assert address.startswith("tls://127.0.0.1:")
        assert f"scheduler {address} (ssh, 4 workers)" in manager.stdout
        client = dask_cluster.connect_client(address, timeout=30,
                                               credentials=manager.credentials)
        try:
            rows = dask_cluster.describe_workers(client)
            # Two workers per "host", each one a process started through that host's sshd.
            assert sorted(r["ssh_host"] for r in rows) == sorted(HOSTS * 2), rows
            sessions = {p.pid: sshd_testbed.session_host(p) for p in bed.processes()}
            for row in rows:
                assert sessions.get(row["pid"]) == row["ssh_host"], (row, sessions)
                assert row["address"].startswith("tls://127.") and row["nthreads"] == 1
                assert row["memory_limit"] == 10**9
                # An SSH session starts in the remote home directory, not in the repository.
                assert Path(row["cwd"]) == Path.home() and Path(row["cwd"]) != REPO
            # The scheduler is an SSH session process on the first host, not ours.
            # (`python -m distributed.cli.dask_spec --spec ...`; a nanny names the scheduler.)
            schedulers = [host for pid, host in sessions.items()
                          if cmdline(psutil.Process(pid))[3:4] == ["--spec"]]
            assert schedulers == [HOSTS[0]] and manager.proc.pid not in sessions
            # ... yet the pipeline's package imports on every worker and on the scheduler:
            # remote_python is the venv where it is installed (editable, this repository).
            names = ("panoseti_pipeline.step1", "panoseti_pipeline.step2")
            for row in rows:
                got = client.submit(module_probe(), names, workers=[row["address"]],
                                    pure=False).result(timeout=30)
                for name, file in got["files"].items():
                    module = REPO / name.replace(".", "/")
                    expected = (module / "__init__.py" if module.is_dir()
                                else module.with_suffix(".py"))
                    assert Path(file) == expected, (name, file)
            on_scheduler = client.run_on_scheduler(module_probe(), names)
            assert all(Path(f).is_relative_to(REPO) for f in on_scheduler["files"].values())
        finally:
            client.close()

    def test_cluster_refuses_clients_without_its_credentials(self, one_cluster) -> None:
        """The remote scheduler accepts only the cluster's temporary key, which the SSH
        hosts keep in a private directory of the SSH user's home."""
        manager, address = one_cluster.manager, one_cluster.address
        remote = Path.home() / f".panoseti_{Path(manager.credentials).name}"
        assert remote.stat().st_mode & 0o777 == 0o700
        assert all(p.stat().st_mode & 0o777 == 0o600 for p in remote.iterdir())
        with pytest.raises(ClusterError, match="accepts TLS connections only"):
            dask_cluster.connect_client(address, timeout=5)
        with pytest.raises(ClusterError, match="cannot reach"):
            dask_cluster.connect_client(address.replace("tls://", "tcp://"), timeout=5)
        assert "certificate" in foreign_client_error(address)

    def test_killed_worker_mid_step1_is_rescheduled(self, one_cluster, big_stream, tmp_path,
                                                    tag) -> None:
        """SIGKILL a busy SSH worker by PID during step 1: same store as a local run."""
        manager, address = one_cluster.manager, one_cluster.address
        local = write_config(tmp_path / "local.toml", {"use_dask": False},
                             pff_to_zarr=MANY_TASKS)
        ref = start_step1([big_stream], tmp_path / "local_L0.zarr", local, "--quiet", tag=tag,
                          cwd=tmp_path)  # the reference, meanwhile
        client = dask_cluster.connect_client(address, timeout=30,
                                               credentials=manager.credentials)
        out = tmp_path / "ssh_L0.zarr"
        try:
            pids = {r["address"]: r for r in dask_cluster.describe_workers(client)}
            step1 = start_step1([big_stream], out, manager.config, address, "--quiet",
                                "--dask-credentials", manager.credentials, tag=tag,
                                cwd=tmp_path)
            victim = None
            deadline = time.monotonic() + STEP_TIMEOUT_S
            while victim is None and step1.poll() is None and time.monotonic() < deadline:
                busy = [w for w, keys in client.processing().items() if keys and w in pids]
                if busy:  # the first worker seen running a task of step 1
                    victim = pids[busy[0]]
                    os.kill(victim["pid"], signal.SIGKILL)
                    break
                time.sleep(0.01)
            assert victim is not None, "step 1 ended before a worker could be killed"
            assert step1.poll() is None, "step 1 ended right when the worker was killed"
            stdout, stderr = step1.communicate(timeout=STEP_TIMEOUT_S)
            assert step1.returncode == 0, stderr
            assert not psutil.pid_exists(victim["pid"])
            # The nanny started a replacement on the same host.
            client.wait_for_workers(4, timeout=30)
            rows = dask_cluster.describe_workers(client)
            assert victim["pid"] not in {r["pid"] for r in rows}
            assert sorted(r["ssh_host"] for r in rows) == sorted(HOSTS * 2)
        finally:
            client.close()
        assert f"{out}: " in stdout
        _, ref_stderr = ref.communicate(timeout=STEP_TIMEOUT_S)
        assert ref.returncode == 0, ref_stderr
        assert_same_store(out, tmp_path / "local_L0.zarr")
        assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


# -- failures ----------------------------------------------------------------------------


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("cluster_lifecycle_manager.py: error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize("case", ["nothing listening", "second host down"])
def test_unreachable_host_is_a_clear_error(bed, make_manager, case: str) -> None:
    timeout_s = 20.0
    if case == "nothing listening":  # a loopback port where nobody listens
        port = sshd_testbed.free_port()
        cluster = ssh_cluster(bed, ssh_port=port, startup_timeout_s=timeout_s)
        bad = f"127.0.0.1 port {port}"
    else:  # the scheduler's host is fine, a worker host refuses
        cluster = ssh_cluster(bed, ssh_hosts=[HOSTS[0], "127.0.0.3"],
                              startup_timeout_s=timeout_s)
        bad = "127.0.0.3"
    manager = make_manager(cluster).start()
    started = time.monotonic()
    assert manager.proc.wait(timeout=timeout_s + 30) == 1
    assert time.monotonic() - started < timeout_s + 15  # the close fits in the margin
    line = one_error_line(manager.stderr)
    assert bad in line and "is sshd running" in line, line
    assert not manager.scheduler_file.exists()


#: the test plugin's switch: importing the named module warns as cryptography >= 51 does
DEPRECATION_ON_IMPORT = "TEST_PLUGIN_DEPRECATION_ON_IMPORT"


def test_the_newest_cryptography_warnings_stay_out_of_the_error(bed, make_manager) -> None:
    """cryptography >= 51 warns when asyncssh imports its DSA types. The lock holds an
    older release, so the plugin warns as the newest does: the error is still one line,
    and the plugin really warns where the pipeline does not filter."""
    noisy = with_plugin({DEPRECATION_ON_IMPORT: "asyncssh"})
    plain = subprocess.run([PYTHON, "-c", "import asyncssh"], env={**os.environ, **noisy},
                           capture_output=True, text=True, timeout=60)
    assert "CryptographyDeprecationWarning: DSA is deprecated" in plain.stderr, plain.stderr
    port = sshd_testbed.free_port()
    manager = make_manager(ssh_cluster(bed, ssh_port=port, startup_timeout_s=20.0))
    manager.env = noisy
    assert manager.start().proc.wait(timeout=60) == 1
    line = one_error_line(manager.stderr)
    assert f"127.0.0.1 port {port}" in line and "is sshd running" in line, line


def test_startup_timeout_closes_the_workers_still_starting(bed, make_manager) -> None:
    """The deadline passes while the workers start (the scheduler alone takes longer):
    the close waits for every host's start to end and closes what started. The fixture
    checks that nothing started through the sshd is left."""
    manager = make_manager(ssh_cluster(bed, startup_timeout_s=2.0)).start()
    assert manager.proc.wait(timeout=60) == 1
    line = one_error_line(manager.stderr)
    assert "workers joined within startup_timeout_s = 2 s" in line, line
    assert not manager.scheduler_file.exists()


def test_unknown_host_key_is_refused_by_default(bed, make_manager) -> None:
    # A known_hosts that names another key for these hosts, and one naming no key at all;
    # both managers at once (each fails at its first login).
    managers = [make_manager(ssh_cluster(bed, ssh_known_hosts=str(known)), name=name).start()
                for name, known in [("wrong", bed.wrong_known_hosts), ("empty", Path(os.devnull))]]
    for manager in managers:
        assert manager.proc.wait(timeout=60) == 1
        line = one_error_line(manager.stderr)
        assert "not trusted" in line and "ssh_verify_host_keys = false" in line, line
        assert not manager.scheduler_file.exists()


def test_host_key_check_opt_out_works(bed, make_manager) -> None:
    cluster = ssh_cluster(bed, ssh_known_hosts=str(bed.wrong_known_hosts),
                          ssh_verify_host_keys=False, ssh_workers_per_host=1)
    manager = make_manager(cluster).start()
    assert manager.wait_ready().startswith("tls://127.0.0.1:")
    assert "(ssh, 2 workers)" in manager.stdout
    assert manager.terminate() == 0, manager.stderr


# -- run.sh end to end -------------------------------------------------------------------

needs_driver = pytest.mark.skipif(
    not (RUN_SH.is_file() and STEP2.is_file()),
    reason="run.sh and step2_dask_baseline.py are not in the repository yet",
)


@pytest.fixture(scope="session")
def observation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated .pffd observation: one img16 and one ph256 stream, 2 files each."""
    from panoseti_pipeline import synthetic as synthetic_obs

    return synthetic_obs.make_observation(tmp_path_factory.mktemp("obs"), frames_per_file=1500,
                                          products=("img16", "ph256"))


def start_run_sh(args: list[str], config: Path, tag: str, cwd: Path) -> subprocess.Popen:
    env = tagged_env(tag)
    env["CONFIG_FILE"] = str(config)
    if sys.prefix != sys.base_prefix:  # the venv running the tests has the requirements
        env["VIRTUAL_ENV"] = sys.prefix
    (cwd / "tmpdir").mkdir(exist_ok=True)
    env["TMPDIR"] = str(cwd / "tmpdir")
    return subprocess.Popen([str(RUN_SH), "--no-quicklook", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 240.0) -> subprocess.CompletedProcess:
    """Wait for a started run.sh (killed after ``timeout``, like ``subprocess.run``)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_sh(args: list[str], config: Path, tag: str, cwd: Path,
           timeout: float = 240.0) -> subprocess.CompletedProcess:
    return finish(start_run_sh(args, config, tag, cwd), timeout)


def run_record(out_dir: Path) -> dict[str, Any]:
    import tomllib

    records = sorted(out_dir.glob("run_record_*.toml"))
    assert len(records) == 1, records
    return tomllib.loads(records[0].read_text())


@needs_driver
def test_run_sh_on_two_ssh_hosts_matches_local(bed, observation, tmp_path, tag) -> None:
    """run.sh with the original [cluster] SSH form: the same L1 stores as use_dask = false,
    made by workers started over SSH on both hosts, outside the repository."""
    small = {"time_chunk": 1024, "chunk_size_mb": 1}
    ssh = write_config(tmp_path / "ssh.toml", ssh_cluster(bed, ssh_workers_per_host=1),
                       pff_to_zarr=small)
    local = write_config(tmp_path / "local.toml", {"use_dask": False}, pff_to_zarr=small)
    ssh_run = start_run_sh([str(observation), str(tmp_path / "L1_ssh")], ssh, tag, tmp_path)
    # The reference meanwhile (the SSH run waits on logins and remote imports).
    ref = run_sh([str(observation), str(tmp_path / "L1_local")], local, tag, tmp_path)
    done = finish(ssh_run)
    assert done.returncode == 0, done.stderr[-4000:]
    assert ref.returncode == 0, ref.stderr[-4000:]

    run = observation.name[: -len(".pffd")]  # run.sh's directory of the run's products
    stores = sorted(f"{run}/{p.name}" for p in (tmp_path / "L1_local" / run).glob("*_L1.zarr"))
    assert len(stores) == 2, stores  # img16 and ph256
    assert sorted(f"{run}/{p.name}"
                  for p in (tmp_path / "L1_ssh" / run).glob("*_L1.zarr")) == stores
    for name in stores:
        assert_same_store(tmp_path / "L1_ssh" / name, tmp_path / "L1_local" / name)

    # The run record names the workers: one per host, reached over SSH, not in the repo.
    record = run_record(tmp_path / "L1_ssh")
    workers = [line for line in record["cluster"]["manager_output"]
               if line.startswith("worker ")]
    assert len(workers) == 2, record["cluster"]
    by_host = sorted(workers, key=lambda w: w.split()[3])
    for host, line in zip(sorted(HOSTS), by_host, strict=True):
        assert f" on {host} via ssh " in line, line
        assert f"cwd {Path.home()}," in f"{line}," and str(REPO) not in line, line
    assert record["cluster"]["scheduler_address"].startswith("tls://127.0.0.1:")
    assert [i["status"] for i in record["inputs"]] == ["ok", "ok"], record["inputs"]


@needs_driver
def test_run_sh_with_an_unreachable_host_fails_cleanly(bed, observation, tmp_path,
                                                       tag) -> None:
    port = sshd_testbed.free_port()
    config = write_config(tmp_path / "ssh.toml",
                          ssh_cluster(bed, ssh_port=port, startup_timeout_s=10.0))
    started = time.monotonic()
    done = run_sh([str(observation), str(tmp_path / "L1")], config, tag, tmp_path, timeout=90)
    assert done.returncode != 0
    assert time.monotonic() - started < 60
    assert f"127.0.0.1 port {port}" in done.stderr and "is sshd running" in done.stderr
    assert not list(tmp_path.glob("L1/*.zarr*"))
