"""The pipeline's Dask cluster: start it from ``[cluster]``, wait for workers, close it.

One :class:`ClusterHandle` owns one cluster for its whole life::

    new --start()--> starting --(workers joined)--> running --close()--> closed
                         \\--(timeout, error, Ctrl-C)--> closed   (everything started is closed)

Four kinds, chosen by the effective ``cluster_type`` of the configuration:

``local``
    a :class:`distributed.LocalCluster` with ``local_workers`` worker processes.
``ssh``
    a :class:`distributed.SSHCluster` (asyncssh): the FIRST of ``ssh_hosts`` runs the
    scheduler and EVERY listed host runs ``ssh_workers_per_host`` workers.
``slurm``
    a :class:`dask_jobqueue.SLURMCluster`: the scheduler runs in this process, the workers
    in ``slurm_jobs`` batch jobs (``sbatch``), kept at that number (a lost job is
    replaced) and cancelled by job id (``scancel``) on close.
``scheduler``
    an existing scheduler at ``scheduler_address``: only checked, never closed.

Steps connect with :func:`connect_client`. Workers and the scheduler import the installed
``panoseti_pipeline`` package: on a cluster, ``remote_python`` is the interpreter of the
same environment on the shared filesystem (``pip install -e`` of this repository).

Examples
--------
>>> from panoseti_pipeline.config import load_config
>>> with ClusterHandle(load_config("config.toml").cluster) as cluster:  # doctest: +SKIP
...     cluster.start()
...     client = connect_client(cluster.address)

Notes
-----
* ``interface`` is given to the scheduler and to every worker, so ``interface = "lo"``
  keeps every Dask address on 127.0.0.0/8 (the tests rely on it). A SLURM worker's HTTP
  server (``dask worker --dashboard-address``, default all interfaces) is bound to the
  interface's address too, looked up in the job on its node.
* ``dashboard_port = 0`` disables the dashboard; the scheduler's small HTTP server
  (health checks) then binds the scheduler's own host on a random port, never 0.0.0.0.
* SSHCluster reads each remote process's log to learn its address and hangs when
  distributed's log level is WARN or higher (dask/distributed#8393): the SSH path forces
  ``logging.distributed = info`` in the configuration it forwards.
* Environment variables do not reach SSH workers; :data:`WORKER_ENV_PREFIXES` chooses the
  ones forwarded through the nanny's ``env`` option.
* ``distributed`` is imported only inside the functions that need it (1.4 s).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from panoseti_pipeline import cluster_credentials
from panoseti_pipeline.errors import ClusterError, ConfigError

if TYPE_CHECKING:
    from distributed import Client, Security

#: Environment variables (exact names or prefixes ending in "_") forwarded to SSH workers.
WORKER_ENV_PREFIXES: tuple[str, ...] = (
    "ZARR_",
    "NUMCODECS_",
    "BLOSC_",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
)

_POLL_S = 0.1
#: How often closing SSH workers asks the scheduler again (for workers that joined late).
_RETIRE_POLL_S = 0.5
#: How often a start asks squeue about its SLURM jobs.
_SQUEUE_POLL_S = 1.0
_CLOSE_TIMEOUT_S = 30.0
#: After an SSH host's workers failed, how long the others get to register.
_FAILED_GRACE_S = 3.0

logger = logging.getLogger(__name__)


class ClusterState(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    CLOSED = "closed"


def forwarded_worker_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The client's environment variables that workers need (:data:`WORKER_ENV_PREFIXES`).

    Values holding a quote are left out: SSHCluster puts the worker options inside a
    single-quoted shell word on the remote command line.
    """
    environ = dict(os.environ if environ is None else environ)
    chosen = {}
    for key, value in sorted(environ.items()):
        wanted = any(
            key.startswith(p) if p.endswith("_") else key == p for p in WORKER_ENV_PREFIXES
        )
        if wanted and "'" not in value and '"' not in value:
            chosen[key] = value
    return chosen


def ssh_cluster_arguments(cluster_config: Any) -> dict[str, Any]:
    """Keyword arguments for :func:`distributed.SSHCluster` (no connection is made).

    Kept separate from starting so the mapping from ``[cluster]`` keys can be checked
    without an SSH server.
    """
    c = cluster_config
    hosts = list(c.ssh_hosts)  # non-empty for cluster_type "ssh": the config checked it
    connect_options: dict[str, Any] = {"port": int(c.ssh_port)}
    connect_options["username"] = c.ssh_username or _current_user()
    if c.ssh_client_keys:
        connect_options["client_keys"] = [os.path.expanduser(k) for k in c.ssh_client_keys]
    if not c.ssh_verify_host_keys:
        connect_options["known_hosts"] = None  # unsafe; documented in config.toml
    elif c.ssh_known_hosts:
        connect_options["known_hosts"] = os.path.expanduser(c.ssh_known_hosts)
    connect_options["connect_timeout"] = float(c.startup_timeout_s)
    scheduler_options: dict[str, Any] = {"port": 0}
    worker_options: dict[str, Any] = {
        "n_workers": int(c.ssh_workers_per_host),
        "nthreads": int(c.ssh_threads_per_worker),
        "memory_limit": c.ssh_memory_per_worker,
        "env": forwarded_worker_env(),
    }
    if c.local_directory:
        worker_options["local_directory"] = _expanded(c.local_directory)
    if c.interface:
        scheduler_options["interface"] = c.interface
        worker_options["interface"] = c.interface
    if c.dashboard_port:
        scheduler_options["dashboard"] = True
        # the first host as written (the scheduler's), never every interface of it
        scheduler_options["dashboard_address"] = f"{hosts[0]}:{int(c.dashboard_port)}"
    else:
        scheduler_options["dashboard"] = False
    return {
        "hosts": [hosts[0], *hosts],
        "connect_options": connect_options,
        "scheduler_options": scheduler_options,
        "worker_options": worker_options,
        "remote_python": c.remote_python or sys.executable,
    }


def slurm_cluster_arguments(cluster_config: Any,
                            credentials: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Keyword arguments for :class:`dask_jobqueue.SLURMCluster` (nothing is submitted).

    The ``slurm_*`` keys map to the option after the prefix. With an ``interface``, the
    job script looks up that interface's address on its node (with the workers' Python)
    and binds the worker's HTTP server to it. With ``credentials`` (a directory of
    :mod:`~panoseti_pipeline.cluster_credentials`), every connection uses TLS: the job
    script writes the credentials on its node for its workers.
    """
    c = cluster_config
    python = c.remote_python or sys.executable
    prologue = list(c.slurm_job_script_prologue)
    worker_args = list(c.slurm_worker_extra_args)
    tls: dict[str, Any] = {}
    if credentials is not None:
        prologue = cluster_credentials.job_script_lines(credentials) + prologue
        worker_args += cluster_credentials.job_worker_args()
        tls = {"protocol": "tls://", "security": cluster_credentials.security(credentials)}
    host = ""
    if c.interface:
        host = interface_address(c.interface)
        prologue.append(_worker_ip_line(python, c.interface))
        worker_args += ["--dashboard-address", f'"${_WORKER_IP_VAR}:0"']
    return {
        "cores": int(c.slurm_cores),
        "memory": c.slurm_memory,
        "processes": int(c.slurm_processes),
        "queue": c.slurm_queue or None,
        "account": c.slurm_account or None,
        "walltime": c.slurm_walltime,
        "job_extra_directives": list(c.slurm_job_extra_directives),
        "job_script_prologue": prologue,
        "worker_extra_args": worker_args,
        # unquoted in the job script: $VARIABLES expand on the node
        "local_directory": c.local_directory or None,
        "log_directory": c.slurm_log_directory or None,
        "interface": c.interface or None,
        "python": python,
        "scheduler_options": {
            "port": 0,
            "dashboard": bool(c.dashboard_port),
            "dashboard_address": f"{host}:{int(c.dashboard_port)}",
        },
        **tls,
    }


class ClusterHandle:
    """One Dask cluster described by a ``[cluster]`` configuration.

    :meth:`start` blocks until at least ``min_workers`` workers (0 = all requested) have
    joined, or raises :class:`ClusterError` after ``startup_timeout_s`` with everything
    it started already closed. :meth:`close` is idempotent. As a context manager the
    handle is closed on exit (it is not started on entry).

    A cluster the handle starts (every kind but ``scheduler``) accepts only TLS
    connections with the temporary credentials it makes in ``credentials_parent`` (a
    private directory, :attr:`credentials`, removed on close); the steps connect with
    them (:func:`connect_client`).
    """

    def __init__(self, cluster_config: Any, *, silence_logs: int = logging.ERROR,
                 credentials_parent: str | os.PathLike[str] | None = None) -> None:
        self.config = cluster_config
        self.kind = cluster_config.cluster_type  # resolved and checked by the config
        self.state = ClusterState.NEW
        self.address: str | None = None
        self.dashboard_link: str | None = None
        self._silence_logs = silence_logs
        self._cluster: Any = None
        self._client: Client | None = None
        self._pids_before: set[int] = set()
        #: Why workers did not start (set by the background start, or squeue's view).
        self._worker_failures: list[str] = []
        #: Set when the background start of the workers has ended (either way).
        self._workers_tried: threading.Event | None = None
        #: Every SLURM job id this handle submitted (appended as sbatch answers).
        self._job_ids: list[str] = []
        self._credentials_parent = credentials_parent
        #: The directory of this cluster's TLS credentials (None: no TLS of ours).
        self.credentials: Path | None = None
        #: Where the SSH hosts keep them, relative to the SSH user's home directory.
        self._remote_credentials: str | None = None

    def __repr__(self) -> str:
        where = f" {self.address}" if self.address else ""
        return f"<ClusterHandle {self.kind} {self.state.value}{where}>"

    def __enter__(self) -> ClusterHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def client(self) -> Client:
        """The handle's own client (for checks and :func:`describe_workers`)."""
        if self._client is None or self.state is not ClusterState.RUNNING:
            raise ClusterError(f"cluster is {self.state.value}, not running")
        return self._client

    @property
    def min_workers(self) -> int:
        """Workers that must join before :meth:`start` returns (the config checked that
        ``min_workers`` is at most what it requests)."""
        return int(self.config.min_workers) or int(self.config.n_workers or 0)

    def start(self) -> ClusterHandle:
        """Start (or reach) the cluster and wait for its workers."""
        if self.state is not ClusterState.NEW:
            raise ClusterError(f"cluster already {self.state.value}; a handle starts once")
        if not getattr(self.config, "use_dask", True):
            raise ConfigError("[cluster] use_dask = false: there is no cluster to start")
        need = self.min_workers
        deadline = time.monotonic() + float(self.config.startup_timeout_s)
        self.state = ClusterState.STARTING
        self._pids_before = _child_pids()
        try:
            if self.kind != "scheduler":
                self.credentials = cluster_credentials.create(
                    self._credentials_parent or tempfile.gettempdir())
            if self.kind == "local":
                self._start_local()
            elif self.kind == "ssh":
                self._start_ssh()
            elif self.kind == "slurm":
                self._start_slurm()
            else:
                self.address = self.config.scheduler_address  # set: the config checked it
            self._client = _open_client(self.address, _remaining(deadline, floor=1.0),
                                        self._security())
            self._wait_for_workers(need, deadline)
            if self.kind == "scheduler":
                self.dashboard_link = self._client.dashboard_link  # not ours to judge
        except BaseException:
            self.close()
            raise
        self.state = ClusterState.RUNNING
        return self

    def close(self) -> None:
        """Close the client and everything this handle started; safe to call twice."""
        if self.state is ClusterState.CLOSED:
            return
        self.state = ClusterState.CLOSED
        client, self._client = self._client, None
        cluster, self._cluster = self._cluster, None
        if client is not None:
            if self.kind == "ssh":
                _close_ssh_workers(client, cluster, self._workers_tried)
            with contextlib.suppress(Exception):
                client.close(timeout=10)
        started = _child_pids() - self._pids_before
        if cluster is not None:
            try:
                cluster.close(timeout=_CLOSE_TIMEOUT_S)
            except Exception as err:  # noqa: BLE001 -- still reap what we started
                logger.warning("closing the %s cluster: %s", self.kind, err)
        if self.kind == "local":
            _reap(started)
        elif self.kind == "slurm":
            _cancel_jobs(self._job_ids)
        if self._remote_credentials is not None:
            _remove_remote_credentials(self._remote_credentials, self.config)
        if self.credentials is not None:
            cluster_credentials.remove(self.credentials)

    def _security(self) -> Security | None:
        """The client side of this cluster's TLS (None: the Dask configuration's)."""
        if self.credentials is None:
            return None
        return cluster_credentials.security(self.credentials)

    # -- starting ------------------------------------------------------------------

    def _start_local(self) -> None:
        from distributed import LocalCluster

        c = self.config
        host = interface_address(c.interface) if c.interface else "127.0.0.1"
        if c.dashboard_port:
            dashboard_address = f"{host}:{int(c.dashboard_port)}"
            dashboard = True
        else:
            dashboard_address = f"{host}:0"
            dashboard = False
        try:
            self._cluster = LocalCluster(
                n_workers=0,
                threads_per_worker=int(c.local_threads_per_worker),
                memory_limit=c.local_memory_per_worker,
                processes=True,
                local_directory=_expanded(c.local_directory),
                interface=c.interface or None,
                host=None if c.interface else host,
                dashboard_address=dashboard_address,
                scheduler_kwargs={"dashboard": dashboard},
                silence_logs=self._silence_logs,
                protocol="tls://",
                security=self._security(),
            )
        except Exception as err:
            raise ClusterError(f"local cluster did not start: {_describe(err)}") from err
        self.address = self._cluster.scheduler_address
        # scale() starts the workers in the background; _wait_for_workers bounds the wait.
        self._cluster.scale(int(c.local_workers))
        if dashboard:
            self.dashboard_link = self._cluster.dashboard_link

    def _start_ssh(self) -> None:
        import dask.config
        from distributed import SpecCluster

        import_asyncssh()  # before distributed imports it, without its warnings
        args = ssh_cluster_arguments(self.config)
        hosts = args.pop("hosts")
        assert self.credentials is not None
        # Each host keeps the credentials in the SSH user's home directory (its own,
        # whoever else uses the host), at a path every remote process finds through the
        # Dask configuration forwarded with its command.
        remote = self._remote_credentials = f".panoseti_{self.credentials.name}"
        # Remote processes report their address through their log (dask/distributed#8393).
        dask.config.set({"logging.distributed": "info",
                         **cluster_credentials.dask_config(remote)})
        args["scheduler_options"]["protocol"] = "tls"
        args["worker_options"]["protocol"] = "tls"
        push = (str(self.credentials), remote)
        try:
            # Scheduler first (blocking, bounded by asyncssh's connect_timeout) ...
            self._cluster = SpecCluster(
                workers={},
                scheduler={"cls": _ssh_scheduler_class(push), "options": {
                    "address": hosts[0],
                    "connect_options": args["connect_options"],
                    "kwargs": args["scheduler_options"],
                    "remote_python": args["remote_python"],
                }},
                name="SSHCluster",
                security=self._security(),
                silence_logs=self._silence_logs,
            )
        except Exception as err:
            raise ClusterError(
                f"SSH scheduler on {hosts[0]} did not start: {_describe(err)}; "
                f"{_ssh_hint(err, hosts[0], self.config)}"
            ) from err
        self.address = self._cluster.scheduler_address
        if self.config.dashboard_port:
            self.dashboard_link = self._cluster.dashboard_link
        # ... then one worker process group per host, in the background, like scale(),
        # so that min_workers can be met while a slow or dead host is still tried.
        for i, host in enumerate(hosts[1:]):
            self._cluster.worker_spec[i] = {
                "cls": _ssh_host_workers_class(push),
                "options": {
                    "address": host,
                    "connect_options": args["connect_options"],
                    "kwargs": args["worker_options"],
                    "worker_class": "distributed.Nanny",
                    "remote_python": args["remote_python"],
                },
            }
        config = self.config
        self._start_workers_in_background(
            lambda err: f"{_describe(err)}; {_ssh_hint(err, getattr(err, 'host', ''), config)}"
        )

    def _start_slurm(self) -> None:
        from dask_jobqueue import SLURMCluster

        c = self.config
        try:
            self._cluster = SLURMCluster(
                job_cls=_recorded_slurm_job_class(self._job_ids),
                silence_logs=self._silence_logs,
                **slurm_cluster_arguments(c, self.credentials),
            )
        except Exception as err:
            raise ClusterError(f"SLURM cluster did not start: {_describe(err)}") from err
        self.address = self._cluster.scheduler_address
        if c.dashboard_port:
            self.dashboard_link = self._cluster.dashboard_link
        # The spec scale(jobs=) would set, and sbatch in the background by our own call,
        # so that a refusal reaches _wait_for_workers; adapt() then resubmits a job
        # whose workers were lost (scancel, walltime) after the lost-worker-timeout.
        jobs = int(c.slurm_jobs)
        while len(self._cluster.worker_spec) < jobs:
            self._cluster.worker_spec.update(self._cluster.new_worker_spec())
        self._start_workers_in_background(_sbatch_problem)
        self._cluster.adapt(minimum_jobs=jobs, maximum_jobs=jobs)

    def _start_workers_in_background(self, why: Callable[[BaseException], str]) -> None:
        """Bring the cluster's workers to its spec in the background; a failure is
        recorded as ``why(error)`` for :meth:`_wait_for_workers` instead of logged."""
        cluster, failures = self._cluster, self._worker_failures
        tried = self._workers_tried = threading.Event()

        async def start_workers() -> None:
            # SpecCluster raises the first failure once every worker was tried.
            try:
                await cluster._correct_state()
            except Exception as err:  # noqa: BLE001 -- reported by _wait_for_workers
                failures.append(why(err))
            finally:
                tried.set()

        cluster.loop.add_callback(start_workers)

    def _wait_for_workers(self, need: int, deadline: float) -> None:
        """Wait until ``need`` workers joined; fail at the deadline, or once workers
        failed to start: at once if ``need`` counts on them (an SSH host's, any SLURM
        job's), else after a short grace (the other hosts' workers have started by then)."""
        assert self._client is not None
        joined = 0
        failed_at = None
        next_squeue = time.monotonic() + _SQUEUE_POLL_S
        while True:
            joined = len(self._client.nthreads())
            if joined >= need:
                if self._worker_failures:
                    logger.warning("starting %s workers: %s", self.kind,
                                   "; ".join(self._worker_failures))
                return
            now = time.monotonic()
            if self.kind == "slurm" and now >= next_squeue and not self._worker_failures:
                next_squeue = now + _SQUEUE_POLL_S
                self._check_slurm_jobs()
            if self._worker_failures:
                if need > self._workers_despite_failure():
                    break
                failed_at = now if failed_at is None else failed_at
            if now >= deadline or (failed_at is not None and now - failed_at > _FAILED_GRACE_S):
                break
            time.sleep(_POLL_S)
        if self._worker_failures:
            advice = (
                "check the [cluster] slurm_* keys and the jobs' output"
                if self.kind == "slurm"
                else "fix that host or remove it from ssh_hosts, or lower min_workers"
            )
            raise ClusterError(
                f"{self.kind} cluster at {self.address}: only {joined} of {need} workers "
                f"joined: {'; '.join(self._worker_failures)}; {advice}"
            )
        queued = ""
        if self.kind == "slurm":
            states = _slurm_job_states(self._job_ids) or {}
            shown = ", ".join(f"{i} {state}" for i, state in states.items())
            queued = f" (SLURM jobs: {shown or 'none in the queue'})"
        raise ClusterError(
            f"{self.kind} cluster at {self.address}: only {joined} of {need} workers joined "
            f"within startup_timeout_s = {self.config.startup_timeout_s:g} s{queued}; raise "
            f"startup_timeout_s or lower min_workers, or check the workers' hosts and memory"
        )

    def _workers_despite_failure(self) -> int:
        """The most workers that can join once some failed to start: all but one SSH
        host's; none for SLURM (its jobs are alike: what refused one refuses all)."""
        if self.kind != "ssh":
            return 0
        return (len(self.config.ssh_hosts) - 1) * int(self.config.ssh_workers_per_host)

    def _check_slurm_jobs(self) -> None:
        """Record a failure when every SLURM job was submitted and all of them have
        already ended, before their workers joined (e.g. no Python on the node)."""
        ids = list(self._job_ids)
        if len(ids) < int(self.config.slurm_jobs) or _slurm_job_states(ids) != {}:
            return
        where = self.config.slurm_log_directory or f"slurm-<job id>.out in {os.getcwd()}"
        self._worker_failures.append(
            f"the SLURM jobs {', '.join(ids)} ended before their workers joined; "
            f"see their output ({where})"
        )


def start_cluster(cluster_config: Any) -> ClusterHandle:
    """Start a cluster and return its running handle (close it with ``.close()``)."""
    return ClusterHandle(cluster_config).start()


@contextlib.contextmanager
def step_client(address: str | None, debug: bool = False,
                credentials: str | None = None) -> Iterator[Client | None]:
    """The client a step runs its tasks through; None (run locally) without an address.

    ``credentials`` is the TLS credentials directory of a cluster the pipeline started.

    Keeps distributed's log lines out of the step's one-line errors unless ``debug``,
    and closes the client at the end.
    """
    if not address:
        yield None
        return
    if not debug:
        quiet_client_logs()
    client = connect_client(address, credentials=credentials)
    try:
        yield client
    finally:
        client.close()


def quiet_client_logs() -> None:
    """Silence distributed's own log lines in a step's process.

    A lost scheduler or a cancelled task is reported by the step in one line; the
    client's reconnect tracebacks would bury it. ``--debug`` skips this.
    """
    import distributed  # noqa: F401 -- its logging set-up first, then ours

    for name in ["distributed", *logging.root.manager.loggerDict]:
        if name.startswith("distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def add_credentials_option(parser: Any) -> None:
    """A step's ``--dask-credentials`` option (argparse)."""
    parser.add_argument("--dask-credentials", metavar="DIRECTORY",
                        help="TLS credentials of the Dask scheduler (the directory named in "
                             "the cluster manager's scheduler file)")


def connect_client(address: str, timeout: float = 30.0,
                   credentials: str | os.PathLike[str] | None = None) -> Client:
    """Connect to the scheduler at ``address`` (a :class:`ClusterError` if it is not there),
    with the TLS ``credentials`` directory of a cluster the pipeline started; without
    them, with the Dask configuration's ``distributed.comm.tls`` settings."""
    security = cluster_credentials.security(credentials) if credentials else None
    return _open_client(address, timeout, security)


def describe_workers(client: Client) -> list[dict[str, Any]]:
    """One dict per worker for run records.

    Keys: address, name, host (the address it listens on), hostname (the machine's
    name), ssh_host (the address its SSH session reached, from ``SSH_CONNECTION``;
    None when not started over SSH, or when it only inherited the caller's own SSH
    login), slurm_job (the SLURM job it runs in, ``SLURM_JOB_ID``, or None), pid,
    nthreads, memory_limit, local_directory, cwd.
    """
    import socket

    workers = client.scheduler_info(n_workers=-1)["workers"]
    try:  # module-level builtins only: pickled by name, the workers need not import this
        pids, cwds = client.run(os.getpid), client.run(os.getcwd)
        hostnames = client.run(socket.gethostname)
        sessions = client.run(os.getenv, "SSH_CONNECTION")
        jobs = client.run(os.getenv, "SLURM_JOB_ID")
    except Exception:  # noqa: BLE001 -- a record without them is still a record
        pids, cwds, hostnames, sessions, jobs = {}, {}, {}, {}, {}
    own_session = os.environ.get("SSH_CONNECTION")  # workers may inherit the user's login
    rows = []
    for address, info in sorted(workers.items()):
        session = sessions.get(address)
        session = session.split() if session and session != own_session else []
        rows.append(
            {
                "address": address,
                "name": info.get("name"),
                "host": info.get("host"),
                "hostname": hostnames.get(address),
                "ssh_host": session[2] if len(session) == 4 else None,
                "slurm_job": jobs.get(address),
                "pid": pids.get(address, info.get("pid")),
                "nthreads": info.get("nthreads"),
                "memory_limit": info.get("memory_limit"),
                "local_directory": info.get("local_directory"),
                "cwd": cwds.get(address),
            }
        )
    return rows


def write_scheduler_file(path: str | os.PathLike[str], address: str,
                         credentials: str | os.PathLike[str] | None = None) -> None:
    """Write ``address`` and the credentials directory (an empty line for none), a line
    each, to ``path`` atomically (temp file + rename), readable by its owner only."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:  # mkstemp's mode: 0600
            f.write(f"{address}\n{credentials or ''}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_scheduler_file(path: str | os.PathLike[str]) -> tuple[str, str | None]:
    """The address and the credentials directory (or None) of :func:`write_scheduler_file`."""
    address, credentials = ([*Path(path).read_text().splitlines(), "", ""])[:2]
    return address.strip(), credentials.strip() or None


# -- helpers -------------------------------------------------------------------------


def _open_client(address: str, timeout: float, security: Security | None = None) -> Client:
    from distributed import Client

    # Not the default scheduler (set_as_default=False): the steps submit their tasks to this
    # client by name, and a default client changes the Dask configuration of the whole
    # process, which a client that fails to connect, or whose close times out, never
    # undoes -- dask collections computed later in the process would ask for a client that
    # is not there.
    # A Client whose connection fails keeps its started loop runner until its __del__ closes
    # it, and distributed's loop runners share one non-reentrant lock: a garbage collection
    # that runs that __del__ while the next client starts holds the lock and waits for it
    # forever (seen: a test connecting again after a refused connection hung). So the
    # client is made where this function holds it, and a failed one is closed here.
    client = Client.__new__(Client)
    try:
        client.__init__(address, timeout=timeout, security=security, set_as_default=False)
        return client
    except BaseException as err:
        with contextlib.suppress(Exception):  # its first failure is the one reported
            client.close(timeout=timeout)
        if isinstance(err, TypeError) and address.startswith("tls://"):
            # distributed's "TLS expects a `ssl_context` argument"
            raise ClusterError(
                f"the Dask scheduler at {address} accepts TLS connections only, and no TLS "
                f"credentials were given: pass the directory on the second line of the "
                f"cluster manager's scheduler file (--dask-credentials), or set "
                f"distributed.comm.tls in the Dask configuration"
            ) from err
        if isinstance(err, (OSError, TimeoutError)):
            raise ClusterError(
                f"cannot reach the Dask scheduler at {address} within {timeout:g} s "
                f"({_describe(err)}); is it running and is the address right?"
            ) from err
        raise


def _remaining(deadline: float, floor: float = 0.0) -> float:
    return max(deadline - time.monotonic(), floor)


def interface_address(interface: str) -> str:
    """The IPv4 address of ``interface`` on this machine (ConfigError when it has none)."""
    from distributed.utils import get_ip_interface

    try:
        return get_ip_interface(interface)
    except ValueError as err:
        raise ConfigError(f"[cluster] interface = {interface!r}: {_describe(err)}") from err


def _expanded(path: str) -> str | None:
    """A configured path with ``~`` and ``$VARIABLES`` expanded here; None for ""."""
    return os.path.expanduser(os.path.expandvars(path)) if path else None


#: The job-script variable holding the address of ``interface`` on the worker's node.
_WORKER_IP_VAR = "PANOSETI_WORKER_IP"


def _worker_ip_line(python: str, interface: str) -> str:
    """A job-script line setting :data:`_WORKER_IP_VAR` to ``interface``'s IPv4 address on
    the node (as distributed's ``get_ip_interface`` finds it), or ending the job."""
    import shlex

    code = ("import psutil, socket, sys; print(next(a.address for a in "
            "psutil.net_if_addrs()[sys.argv[1]] if a.family == socket.AF_INET))")
    lookup = f"{shlex.quote(python)} -c {shlex.quote(code)} {shlex.quote(interface)}"
    return (f'{_WORKER_IP_VAR}="$({lookup})" || {{ echo "no IPv4 address on interface '
            f'{interface} of $(hostname)" >&2; exit 1; }}')


def _recorded_slurm_job_class(job_ids: list[str]) -> type:
    """dask-jobqueue's SLURM job, appending its id to ``job_ids`` as soon as sbatch
    answers (so that every job submitted can be cancelled, whatever happens next), and
    marked failed when sbatch refused it (SpecCluster's close insists on that)."""
    from dask_jobqueue.slurm import SLURMJob
    from distributed.core import Status

    class RecordedSLURMJob(SLURMJob):
        def __init__(self, *args: Any, security: Any = None, **kwargs: Any) -> None:
            # The TLS options come from the job script (slurm_cluster_arguments): the
            # scheduler's own files are not on the job's node.
            super().__init__(*args, security=None, **kwargs)

        async def start(self) -> None:
            try:
                await super().start()
            except BaseException:
                self.status = Status.failed
                raise

        def _job_id_from_submit_output(self, out: str) -> str:
            job_id = super()._job_id_from_submit_output(out)
            job_ids.append(job_id)
            return job_id

    return RecordedSLURMJob


def _sbatch_problem(err: BaseException) -> str:
    """Why a worker job was not submitted: sbatch's own error lines, when it ran."""
    said = [line.strip() for line in str(err).splitlines()
            if line.strip().startswith("sbatch:")]
    if said:
        return f"sbatch refused the worker job: {' '.join(said)}"
    if isinstance(err, FileNotFoundError):
        return f"cannot run sbatch ({_describe(err)}): are SLURM's commands on PATH here?"
    return f"submitting the worker job: {_describe(err)}"


def _slurm_command(*cmd: str) -> Any:
    """Run a SLURM command (squeue, scancel): its CompletedProcess, or None, with a warning
    naming the command, its exit code and stderr, when it could not run or failed."""
    import subprocess

    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as err:
        logger.warning("%s: %s", " ".join(cmd), _describe(err))
        return None
    if done.returncode != 0:
        logger.warning("%s exited %d: %s", " ".join(cmd), done.returncode,
                       " ".join(done.stderr.split()))
        return None
    return done


def _slurm_job_states(job_ids: list[str]) -> dict[str, str] | None:
    """``{job id: state}`` of those of ``job_ids`` still in the queue (pending, running,
    completing), from ``squeue``; None when squeue cannot tell."""
    if not job_ids:
        return {}
    done = _slurm_command("squeue", "-h", "--me", "-o", "%i %T %r")
    if done is None:
        return None
    wanted, states = set(job_ids), {}
    for line in done.stdout.splitlines():
        job_id, state, reason = (line.split(maxsplit=2) + ["", ""])[:3]
        if job_id in wanted:
            states[job_id] = f"{state} ({reason})" if state == "PENDING" else state
    return states


def _cancel_jobs(job_ids: list[str], timeout_s: float = _CLOSE_TIMEOUT_S) -> None:
    """Cancel those of ``job_ids`` still in the queue, by id, and wait until they left it.

    SLURMCluster's close cancels its jobs already; this is the check that none is left
    (e.g. a close that timed out), and waits for the jobs' processes to end. When squeue
    cannot tell, every id is cancelled.
    """
    ids = list(job_ids)
    left = _slurm_job_states(ids)
    if left == {}:
        return
    _slurm_command("scancel", *(left or ids))
    deadline = time.monotonic() + timeout_s
    while left and time.monotonic() < deadline:
        time.sleep(_POLL_S * 2)
        left = _slurm_job_states(ids)
    if left:
        logger.warning("SLURM jobs still in the queue after scancel: %s", left)


def _describe(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _current_user() -> str:
    import getpass

    return getpass.getuser()


def import_asyncssh() -> ModuleType:
    """asyncssh, imported without cryptography's deprecation warnings.

    asyncssh imports the DSA types that cryptography >= 51 deprecates, so its first import
    prints ten lines of warnings a user can do nothing about, before the cluster's one
    error line. Only that class is silenced, and only during this import; later imports
    of asyncssh (distributed's) find the module already loaded.
    """
    from cryptography.utils import CryptographyDeprecationWarning  # asyncssh requires it

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning)
        import asyncssh
    return asyncssh


def _ssh_hint(err: BaseException, host: str, config: Any) -> str:
    """What to check after an SSH start failure, judged from the underlying error."""
    asyncssh = import_asyncssh()
    while err.__cause__ is not None:  # SSHCluster and we wrap the asyncssh error
        err = err.__cause__
    port = int(config.ssh_port)
    if isinstance(err, asyncssh.HostKeyNotVerifiable):
        known = config.ssh_known_hosts or "~/.ssh/known_hosts"
        return (
            f"the host key of [{host}]:{port} is not trusted by ssh_known_hosts ({known}): "
            f"for a new host, check its fingerprint and add it (ssh-keyscan -p {port} "
            f"{host} >> {known}); if its key changed, find out why first; on a closed test "
            f"network only, ssh_verify_host_keys = false skips the check (unsafe)"
        )
    if isinstance(err, asyncssh.PermissionDenied):
        user = config.ssh_username or _current_user()
        return f"check ssh_username ({user}) and ssh_client_keys (authorized on {host}?)"
    if isinstance(err, (ConnectionRefusedError, TimeoutError, OSError)):
        return f"is sshd running on {host} port {port} and reachable from here?"
    if "failed to start" in str(err):  # the remote command ended before it started
        python = config.remote_python or sys.executable
        return (
            f"is remote_python ({python}) on {host}, with the pipeline's requirements "
            f"installed?"
        )
    return "check ssh_hosts, ssh_username, ssh_client_keys, ssh_known_hosts and remote_python"


async def _push_credentials(address: str, connect_options: dict[str, Any],
                            push: tuple[str, str]) -> None:
    """Write the credentials of local directory ``push[0]`` to ``push[1]`` on ``address``
    over a verified SSH connection (the same options as the cluster's)."""
    asyncssh = import_asyncssh()
    local, remote = push
    async with asyncssh.connect(address, **connect_options) as connection:
        _WRITTEN_ON.setdefault(remote, set()).add(address)  # from here on, remove it
        for name, text in cluster_credentials.read_pems(local).items():
            done = await connection.run(cluster_credentials.remote_write_command(remote, name),
                                        input=text)
            if done.exit_status != 0:
                raise ClusterError(
                    f"cannot write the cluster's TLS credentials to ~/{remote} on {address} "
                    f"(exit {done.exit_status}): {_describe(Exception(done.stderr or ''))}"
                )


#: remote credentials directory -> the hosts it may have been written on (hosts never
#: reached have nothing to remove, and their errors were reported when they failed)
_WRITTEN_ON: dict[str, set[str]] = {}


def _remove_remote_credentials(remote: str, config: Any) -> None:
    """Remove ``~/remote`` on every SSH host it was written on (after the cluster's
    processes ended)."""
    import asyncio
    import shlex

    args = ssh_cluster_arguments(config)
    asyncssh = import_asyncssh()

    async def remove(host: str) -> None:
        async with asyncssh.connect(host, **args["connect_options"]) as connection:
            await connection.run(f"rm -rf -- {shlex.quote(remote)}")

    async def remove_all() -> None:
        written = _WRITTEN_ON.pop(remote, set())
        hosts = [h for h in dict.fromkeys(args["hosts"]) if h in written]
        for host, result in zip(hosts, await asyncio.gather(
                *(remove(h) for h in hosts), return_exceptions=True), strict=True):
            if isinstance(result, BaseException):
                logger.warning("could not remove ~/%s on %s: %s", remote, host,
                               _describe(result))

    asyncio.run(remove_all())


def _ssh_scheduler_class(push: tuple[str, str]) -> type:
    """distributed's SSH scheduler, given the credentials on its host before it starts."""
    from distributed.deploy.ssh import Scheduler as SSHScheduler

    class SSHSchedulerWithCredentials(SSHScheduler):
        async def start(self) -> None:
            await _push_credentials(self.address, self.connect_options, push)
            await super().start()

    return SSHSchedulerWithCredentials


def _ssh_host_workers_class(push: tuple[str, str]) -> type:
    """distributed's SSH worker group, given the credentials on its host before it
    starts, whose start failure names its host."""
    from distributed.deploy.ssh import Worker as SSHWorker

    class SSHHostWorkers(SSHWorker):
        async def start(self) -> None:
            try:
                await _push_credentials(self.address, self.connect_options, push)
                await super().start()
            except Exception as err:
                with contextlib.suppress(Exception):
                    await self.close()
                failure = ClusterError(
                    f"SSH workers on {self.address} did not start: {_describe(err)}"
                )
                failure.host = self.address  # type: ignore[attr-defined]
                raise failure from err

    return SSHHostWorkers


def _close_ssh_workers(client: Client, cluster: Any, tried: threading.Event | None,
                       timeout_s: float = 20.0) -> None:
    """Close the SSH workers through the scheduler and wait for their remote processes.

    SSHCluster stops a remote process by an SSH signal request, which an OpenSSH server
    may refuse ("session signalling requires privilege separation"); the workers then
    outlive the cluster until they notice the scheduler is gone. Asking the scheduler to
    close them (nannies included) and waiting for each remote command to end does not
    depend on that. A close during the start (a failed, timed-out or interrupted start)
    first lets the start of every host end (``tried``), so that each remote process is
    known, and repeats the request while waiting: a worker still starting registers later
    and is closed then.
    """
    deadline = time.monotonic() + timeout_s
    if tried is not None:
        tried.wait(timeout_s)
    procs = [getattr(w, "proc", None) for w in getattr(cluster, "workers", {}).values()]
    procs = [p for p in procs if p is not None]
    while True:
        with contextlib.suppress(Exception):
            client.retire_workers(close_workers=True)
        if all(p.exit_status is not None or p.is_closing() for p in procs):
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(_RETIRE_POLL_S)
    logger.warning("SSH worker processes still running after %g s; closing anyway", timeout_s)


def _child_pids() -> set[int]:
    try:
        import psutil
    except ImportError:  # comes with distributed
        return set()
    return {
        p.pid
        for p in psutil.Process().children(recursive=True)
        # multiprocessing's resource tracker is shared and ends with this process
        if "resource_tracker" not in " ".join(_cmdline(p))
    }


def _cmdline(process: Any) -> list[str]:
    try:
        return process.cmdline()
    except Exception:  # noqa: BLE001 -- gone or not ours to read
        return []


def _reap(pids: set[int], grace_s: float = 5.0) -> None:
    """Stop the given child processes of ours that are still alive, by PID.

    Called after a local cluster closed, with the children that appeared while it ran
    (its worker processes): terminate, wait, then kill what is left.
    """
    try:
        import psutil
    except ImportError:
        return
    alive = [p for p in psutil.Process().children(recursive=True) if p.pid in pids]
    if not alive:
        return
    logger.warning("stopping %d leftover worker process(es): %s", len(alive), sorted(pids))
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(alive, timeout=grace_s)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(alive, timeout=grace_s)
