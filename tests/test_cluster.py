"""Tests for the cluster package and cluster_lifecycle_manager.py, with real processes.

Every Dask address stays on loopback (``interface = "lo"``). Each manager started here
carries a unique ``PANOSETI_TEST_TAG`` in its environment, inherited by its worker
processes, so a leftover can be found after the manager exits and stopped by PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
from distributed import Client

REPO = Path(__file__).resolve().parents[1]

from process_tools import (  # noqa: E402
    PYTHON,
    ManagerProcess,
    foreign_client_error,
    tagged_processes,
)

from panoseti_pipeline import cluster as dask_cluster  # noqa: E402
from panoseti_pipeline.config import load_config  # noqa: E402
from panoseti_pipeline.errors import ClusterError, ConfigError  # noqa: E402

psutil = pytest.importorskip("psutil")
distributed = pytest.importorskip("distributed")
dask = pytest.importorskip("dask")

PROG = "cluster_lifecycle_manager.py"

LOCAL = {
    "use_dask": True,
    "cluster_type": "local",
    "interface": "lo",
    "local_workers": 2,
    "local_threads_per_worker": 1,
    "local_memory_per_worker": "1GB",
    "dashboard_port": 0,
    "startup_timeout_s": 30.0,
}


# -- helpers ---------------------------------------------------------------------------


def write_config(path: Path, **cluster: object) -> Path:
    import tomli_w

    path.write_text(tomli_w.dumps({"cluster": cluster}))
    return path


@pytest.fixture
def make_manager(tmp_path: Path) -> Iterator:
    started: list[ManagerProcess] = []

    def make(name: str = "m", **cluster: object) -> ManagerProcess:
        workdir = tmp_path / name
        workdir.mkdir()
        manager = ManagerProcess(workdir, write_config(workdir / "config.toml", **cluster))
        started.append(manager)
        return manager

    yield make
    for manager in started:
        manager.stop()


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ManagerProcess, str]]:
    """A manager holding a 2-worker local cluster, shared by the read-only checks."""
    workdir = tmp_path_factory.mktemp("running")
    manager = ManagerProcess(workdir, write_config(workdir / "config.toml", **LOCAL)).start()
    try:
        yield manager, manager.wait_ready()
    finally:
        manager.stop()


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def module_probe():
    """A worker-side probe: where each module was imported from, and the worker's cwd.

    Built inside a function so it is pickled by value: workers cannot import this file.
    """

    def probe(names: tuple[str, ...]) -> dict:
        import importlib
        import os

        return {
            "cwd": os.getcwd(),
            "files": {n: importlib.import_module(n).__file__ for n in names},
        }

    return probe


def assert_one_error_line(stderr: str, *needles: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"{PROG}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


def assert_all_gone(manager: ManagerProcess, seen: list[psutil.Process]) -> None:
    _, alive = psutil.wait_procs(seen, timeout=10)
    assert not alive, [p.pid for p in alive]
    assert not tagged_processes(manager.tag)
    assert not manager.scheduler_file.exists()
    # the cluster's TLS credentials went with it
    assert not list(manager.workdir.glob("dask_tls.*"))


# -- the running cluster ---------------------------------------------------------------


def test_workers_import_the_steps_modules_once_the_cluster_is_up(
        running: tuple[ManagerProcess, str]) -> None:
    """(First of the tests on this cluster: none has run a task there yet.) The manager
    has every worker import the steps' task modules as soon as it publishes
    the cluster (without waiting for it), so that no first task pays for them."""
    manager, address = running
    client = dask_cluster.connect_client(address, timeout=10, credentials=manager.credentials)

    def imported() -> bool:
        import sys

        return {"panoseti_pipeline.step1", "panoseti_pipeline.step2.subtract", "zarr",
                "numcodecs.blosc", "google_crc32c"} <= set(sys.modules)

    try:
        deadline = time.monotonic() + 30
        while not all((found := client.run(imported)).values()):
            assert time.monotonic() < deadline, found
            time.sleep(0.1)
        assert len(found) == 2
    finally:
        client.close()


def test_manager_publishes_a_loopback_cluster(running: tuple[ManagerProcess, str]) -> None:
    manager, address = running
    assert address.startswith("tls://127.")
    assert f"scheduler {address}" in manager.stdout
    assert "dashboard off" in manager.stdout
    # Every socket the manager and its workers listen on is on loopback.
    listening = []
    for proc in [psutil.Process(manager.proc.pid), *manager.descendants()]:
        listening += [c.laddr for c in proc.net_connections("inet") if c.status == "LISTEN"]
    assert listening
    assert all(laddr.ip.startswith("127.") for laddr in listening), listening
    # No file left half-written next to the scheduler file.
    assert [p.name for p in manager.workdir.iterdir() if p.name.endswith(".partial")] == []


def test_cluster_refuses_clients_without_its_credentials(
        running: tuple[ManagerProcess, str]) -> None:
    """Only a client holding the cluster's temporary key gets in; nobody else can read it."""
    manager, address = running
    credentials = Path(manager.credentials)
    assert credentials.parent == manager.workdir
    assert manager.scheduler_file.stat().st_mode & 0o777 == 0o600
    assert credentials.stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in credentials.iterdir()) == ["cert.pem", "key.pem"]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in credentials.iterdir())
    scheduler_before = dask.config.get("scheduler", None)
    with pytest.raises(ClusterError, match="accepts TLS connections only") as refused:
        dask_cluster.connect_client(address, timeout=5)  # no credentials
    with pytest.raises(ClusterError, match="cannot reach"):
        dask_cluster.connect_client(address.replace("tls://", "tcp://"), timeout=5)
    # The refused clients are closed, not left to a garbage collection (their __del__
    # takes distributed's loop-runner lock: run while the next client starts, a deadlock).
    half_made = [frame.f_locals["self"] for frame, _ in traceback.walk_tb(
        refused.value.__cause__.__traceback__) if isinstance(frame.f_locals.get("self"), Client)]
    assert half_made and {c.status for c in half_made} == {"closed"}
    assert "certificate" in foreign_client_error(address)  # credentials of another cluster
    client = dask_cluster.connect_client(address, timeout=10, credentials=str(credentials))
    try:
        assert client.submit(sum, [1, 2]).result(timeout=30) == 3
        # Not made the process's default scheduler: dask collections computed here (e.g.
        # by xarray or pypff) never ask for a client, whether its connection failed or not.
        assert dask.config.get("scheduler", None) == scheduler_before
    finally:
        client.close()


#: pipeline modules that tasks import on the workers
TASK_MODULES = ("panoseti_pipeline.step1", "panoseti_pipeline.step2", "panoseti_pipeline.pff")


def installed_file(name: str) -> Path:
    """Where the repository holds module ``name`` (a module file or a package)."""
    path = REPO / name.replace(".", "/")
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def test_workers_import_the_installed_package(running: tuple[ManagerProcess, str]) -> None:
    manager, address = running
    client = dask_cluster.connect_client(address, timeout=10, credentials=manager.credentials)
    try:
        rows = dask_cluster.describe_workers(client)
        assert len(rows) == 2
        assert all(r["address"].startswith("tls://127.") for r in rows)
        assert all(r["host"].startswith("127.") and r["nthreads"] == 1 for r in rows)
        assert all(r["memory_limit"] == 10**9 and r["pid"] and r["cwd"] for r in rows)
        for row in rows:
            got = client.submit(module_probe(), TASK_MODULES, workers=[row["address"]],
                                pure=False).result(timeout=30)
            for name, file in got["files"].items():
                # the package of this repository, installed (editable) in the venv
                assert Path(file) == installed_file(name), (name, file)
    finally:
        client.close()


def test_late_worker_elsewhere_imports_the_package(running: tuple[ManagerProcess, str],
                                                  tmp_path: Path) -> None:
    """A worker that joins later, with cwd outside the repo and no PYTHONPATH to it."""
    manager, address = running
    client = dask_cluster.connect_client(address, timeout=10, credentials=manager.credentials)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cert, key = (f"{manager.credentials}/{name}" for name in ("cert.pem", "key.pem"))
    worker = subprocess.Popen(
        [PYTHON, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
         "--no-nanny", "--no-dashboard", "--interface", "lo", "--name", "late",
         "--local-directory", str(tmp_path / "space"),
         "--tls-ca-file", cert, "--tls-cert", cert, "--tls-key", key],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        client.wait_for_workers(3, timeout=30)
        late = [r for r in dask_cluster.describe_workers(client) if r["name"] == "late"]
        assert len(late) == 1 and late[0]["address"].startswith("tls://127.")
        got = client.submit(
            module_probe(), TASK_MODULES, workers=[late[0]["address"]], pure=False
        ).result(timeout=30)
        assert Path(got["cwd"]) == tmp_path
        for name, file in got["files"].items():
            assert Path(file) == installed_file(name), got
    finally:
        with contextlib.suppress(Exception):
            client.retire_workers(names=["late"], close_workers=True)
        client.close()
        try:  # retired, it exits by itself; SIGTERM while it closes can hang it for 10 s+
            worker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(timeout=10)


def test_scheduler_type_checks_publishes_and_leaves_it_running(
    running: tuple[ManagerProcess, str], make_manager
) -> None:
    owner, address = running
    manager = make_manager(
        use_dask=True, cluster_type="scheduler", scheduler_address=address,
        startup_timeout_s=10.0
    )
    # a scheduler of the user's own with TLS: its credentials come from Dask's configuration
    cert, key = (f"{owner.credentials}/{name}" for name in ("cert.pem", "key.pem"))
    manager.env.update({"DASK_DISTRIBUTED__COMM__TLS__CA_FILE": cert,
                        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": cert,
                        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": key})
    assert manager.start().wait_ready() == address
    assert manager.credentials is None  # none of ours to publish
    manager.proc.send_signal(signal.SIGTERM)
    assert manager.wait_exit() == 0, manager.stderr
    assert not manager.scheduler_file.exists()
    assert owner.proc.poll() is None and owner.scheduler_file.exists()


# -- lifecycle -------------------------------------------------------------------------


SIGNALS = (signal.SIGTERM, signal.SIGINT)


@pytest.fixture(scope="module")
def manager_per_signal(tmp_path_factory: pytest.TempPathFactory
                       ) -> Iterator[dict[int, ManagerProcess]]:
    """A fresh manager for each signal test, all started at once (each test stops its own)."""
    managers = {}
    for signum in SIGNALS:
        workdir = tmp_path_factory.mktemp(f"signal_{signum}")
        config = write_config(workdir / "config.toml", **LOCAL)
        managers[signum] = ManagerProcess(workdir, config).start()
    yield managers
    for manager in managers.values():
        manager.stop()


@pytest.mark.parametrize("signum", SIGNALS)
def test_signal_closes_everything(manager_per_signal: dict[int, ManagerProcess],
                                  signum: int) -> None:
    manager = manager_per_signal[signum]
    address = manager.wait_ready()
    assert address.startswith("tls://127.")
    seen = manager.descendants()
    assert len(seen) >= 2  # the two worker processes
    manager.proc.send_signal(signum)
    assert manager.wait_exit() == 0, manager.stderr
    assert manager.stderr == ""
    assert "cluster closed" in manager.stdout
    assert_all_gone(manager, seen)


def test_startup_timeout_fails_cleanly(make_manager) -> None:
    manager = make_manager(**{**LOCAL, "startup_timeout_s": 0.05}).start()
    seen: list[psutil.Process] = []
    while manager.proc.poll() is None:  # collect the workers it starts meanwhile
        with contextlib.suppress(psutil.Error):
            seen += manager.descendants()
        time.sleep(0.02)
    assert manager.wait_exit() == 1
    assert_one_error_line(manager.stderr, "workers joined", "startup_timeout_s")
    assert manager.stdout == ""
    assert_all_gone(manager, seen)


def test_unreachable_scheduler_is_a_clear_error(make_manager) -> None:
    address = f"tcp://127.0.0.1:{free_loopback_port()}"
    manager = make_manager(
        use_dask=True, cluster_type="scheduler", scheduler_address=address,
        startup_timeout_s=0.5
    )
    started = time.monotonic()
    assert manager.start().wait_exit(timeout=20) == 1
    assert time.monotonic() - started < 20
    assert_one_error_line(manager.stderr, "cannot reach", address)
    assert not manager.scheduler_file.exists()


def test_use_dask_false_is_a_usage_error(make_manager) -> None:
    manager = make_manager(use_dask=False)
    assert manager.start().wait_exit() == 2
    assert_one_error_line(manager.stderr, "use_dask = false")
    assert not manager.scheduler_file.exists()


def test_unknown_interface_is_a_usage_error(make_manager) -> None:
    manager = make_manager(**{**LOCAL, "interface": "nosuch0"})
    assert manager.start().wait_exit() == 2
    assert_one_error_line(manager.stderr, "config.toml", "interface", "nosuch0")
    assert not manager.scheduler_file.exists()


def test_bad_config_is_a_usage_error(make_manager) -> None:
    manager = make_manager(local_wrkers=2)
    assert manager.start().wait_exit() == 2
    assert "local_wrkers" in manager.stderr
    assert not manager.scheduler_file.exists()


# -- in-process ------------------------------------------------------------------------


def test_handle_states_and_idempotent_close(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path / "c.toml", **{**LOCAL, "local_workers": 1}))
    handle = dask_cluster.ClusterHandle(config.cluster)
    assert handle.state is dask_cluster.ClusterState.NEW
    with handle:
        handle.start()
        assert handle.state is dask_cluster.ClusterState.RUNNING
        assert handle.address.startswith("tls://127.")
        assert handle.credentials is not None and handle.credentials.is_dir()
        assert len(handle.client.nthreads()) == 1
        with pytest.raises(ClusterError, match="already running"):
            handle.start()
    assert handle.state is dask_cluster.ClusterState.CLOSED
    assert not handle.credentials.exists()
    handle.close()
    with pytest.raises(ClusterError, match="closed"):
        _ = handle.client


def test_handle_refuses_use_dask_false(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path / "c.toml", use_dask=False))
    with pytest.raises(ConfigError, match="use_dask"):
        dask_cluster.ClusterHandle(config.cluster).start()


def test_write_scheduler_file_is_atomic(tmp_path: Path) -> None:
    target = tmp_path / "sched.txt"
    target.write_text("tcp://old:1\n")
    dask_cluster.write_scheduler_file(target, "tls://127.0.0.1:8786", tmp_path / "tls")
    assert dask_cluster.read_scheduler_file(target) == ("tls://127.0.0.1:8786",
                                                        str(tmp_path / "tls"))
    assert [p.name for p in tmp_path.iterdir()] == ["sched.txt"]
    assert target.stat().st_mode & 0o777 == 0o600
    dask_cluster.write_scheduler_file(target, "tcp://127.0.0.1:8786")
    assert dask_cluster.read_scheduler_file(target) == ("tcp://127.0.0.1:8786", None)
    with pytest.raises(OSError):
        dask_cluster.write_scheduler_file(tmp_path / "missing" / "s.txt", "tcp://x:1")


def test_a_step_waits_for_the_scheduler_file_then_says_why_not(tmp_path: Path) -> None:
    """A step given the scheduler file of a cluster still starting waits for it (on its
    connecting thread), fails in one line when it does not come, and stops waiting when
    the step ends first."""
    missing = tmp_path / "scheduler_address"
    with (dask_cluster.step_client(None, scheduler_file=str(missing), wait_s=0.3) as pending,
          pytest.raises(ClusterError, match=f"{missing}: no Dask cluster within 0.3 s")):
        pending()
    started = time.monotonic()
    with dask_cluster.step_client(None, scheduler_file=str(missing), wait_s=600):
        pass  # the step ended before it wanted the cluster
    assert time.monotonic() - started < 60  # not the 600 s it would wait for the file
    with pytest.raises(ConfigError, match="not both"), dask_cluster.step_client(
            "tcp://127.0.0.1:1", scheduler_file=str(missing)):
        pass


# -- SSH arguments (no SSH server needed) ----------------------------------------------


def ssh_config(tmp_path: Path, **keys: object):
    base = {
        "ssh_hosts": ["127.0.0.1", "127.0.0.2"],
        "interface": "lo",
        "ssh_workers_per_host": 2,
        "ssh_threads_per_worker": 3,
        "ssh_memory_per_worker": "2GB",
        "ssh_port": 2222,
        "ssh_username": "panoseti",
        "ssh_client_keys": ["/keys/id_ed25519"],
        "ssh_known_hosts": "/keys/known_hosts",
    }
    return load_config(write_config(tmp_path / "ssh.toml", **{**base, **keys})).cluster


def test_ssh_arguments_map_the_config(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ZARR_ASYNC__CONCURRENCY", "8")
    monkeypatch.setenv("UNRELATED_SECRET", "x")
    args = dask_cluster.ssh_cluster_arguments(ssh_config(tmp_path))
    assert args["hosts"] == ["127.0.0.1", "127.0.0.1", "127.0.0.2"]
    connect = args["connect_options"]
    assert connect["port"] == 2222 and connect["username"] == "panoseti"
    assert connect["client_keys"] == ["/keys/id_ed25519"]
    assert connect["known_hosts"] == "/keys/known_hosts"
    workers = args["worker_options"]
    assert workers["n_workers"] == 2 and workers["nthreads"] == 3
    assert workers["memory_limit"] == "2GB" and workers["interface"] == "lo"
    assert workers["env"]["ZARR_ASYNC__CONCURRENCY"] == "8"
    assert "UNRELATED_SECRET" not in workers["env"]
    assert args["scheduler_options"]["interface"] == "lo"
    assert args["scheduler_options"]["dashboard"] is False
    assert args["remote_python"] == sys.executable
    assert ssh_config(tmp_path).n_workers == 4


def test_ssh_host_keys_are_verified_unless_disabled(tmp_path: Path) -> None:
    default = dask_cluster.ssh_cluster_arguments(ssh_config(tmp_path, ssh_known_hosts=""))
    assert "known_hosts" not in default["connect_options"]  # asyncssh: ~/.ssh/known_hosts
    unsafe = dask_cluster.ssh_cluster_arguments(ssh_config(tmp_path, ssh_verify_host_keys=False))
    assert unsafe["connect_options"]["known_hosts"] is None
