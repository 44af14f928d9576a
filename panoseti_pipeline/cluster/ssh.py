"""``ssh``: a cluster started over SSH (asyncssh), like :class:`distributed.SSHCluster`.

The FIRST of ``ssh_hosts`` runs the scheduler and EVERY listed host runs
``ssh_workers_per_host`` workers. Each host gets the cluster's TLS credentials over the
verified SSH connection before its processes start, and loses them when it closes.

Notes
-----
* SSHCluster reads each remote process's log to learn its address and hangs when
  distributed's log level is WARN or higher (dask/distributed#8393): the start forces
  ``logging.distributed = info`` in the configuration it forwards.
* Environment variables do not reach SSH workers; :data:`WORKER_ENV_PREFIXES` chooses the
  ones forwarded through the nanny's ``env`` option.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from panoseti_pipeline import cluster_credentials
from panoseti_pipeline.cluster.kind import ClusterKind, describe_error, expanded_path
from panoseti_pipeline.errors import ClusterError

if TYPE_CHECKING:
    from distributed import Client

#: Environment variables (exact names or prefixes ending in "_") forwarded to SSH workers.
WORKER_ENV_PREFIXES: tuple[str, ...] = (
    "ZARR_",
    "NUMCODECS_",
    "BLOSC_",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
)

#: How often closing SSH workers asks the scheduler again (for workers that joined late).
_RETIRE_POLL_S = 0.5

logger = logging.getLogger(__name__)


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
        worker_options["local_directory"] = expanded_path(c.local_directory)
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


class SSHKind(ClusterKind):
    """The scheduler on the first host, then each host's workers in the background."""

    failure_advice = "fix that host or remove it from ssh_hosts, or lower min_workers"

    def __init__(self, config: Any, silence_logs: int) -> None:
        super().__init__(config, silence_logs)
        #: Where the SSH hosts keep the credentials, relative to the SSH user's home.
        self._remote_credentials: str | None = None

    def start(self, credentials: Path | None) -> tuple[str, str | None]:
        import dask.config
        from distributed import SpecCluster

        import_asyncssh()  # before distributed imports it, without its warnings
        args = ssh_cluster_arguments(self.config)
        hosts = args.pop("hosts")
        assert credentials is not None
        # Each host keeps the credentials in the SSH user's home directory (its own,
        # whoever else uses the host), at a path every remote process finds through the
        # Dask configuration forwarded with its command.
        remote = self._remote_credentials = f".panoseti_{credentials.name}"
        # Remote processes report their address through their log (dask/distributed#8393).
        dask.config.set({"logging.distributed": "info",
                         **cluster_credentials.dask_config(remote)})
        args["scheduler_options"]["protocol"] = "tls"
        args["worker_options"]["protocol"] = "tls"
        push = (str(credentials), remote)
        try:
            # Scheduler first (blocking, bounded by asyncssh's connect_timeout) ...
            self.cluster = SpecCluster(
                workers={},
                scheduler={"cls": _ssh_scheduler_class(push), "options": {
                    "address": hosts[0],
                    "connect_options": args["connect_options"],
                    "kwargs": args["scheduler_options"],
                    "remote_python": args["remote_python"],
                }},
                name="SSHCluster",
                security=cluster_credentials.security(credentials),
                silence_logs=self.silence_logs,
            )
        except Exception as err:
            raise ClusterError(
                f"SSH scheduler on {hosts[0]} did not start: {describe_error(err)}; "
                f"{_ssh_hint(err, hosts[0], self.config)}"
            ) from err
        # ... then one worker process group per host, in the background, like scale(),
        # so that min_workers can be met while a slow or dead host is still tried.
        for i, host in enumerate(hosts[1:]):
            self.cluster.worker_spec[i] = {
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
            lambda err: f"{describe_error(err)}; "
                        f"{_ssh_hint(err, getattr(err, 'host', ''), config)}"
        )
        return (self.cluster.scheduler_address,
                self.cluster.dashboard_link if config.dashboard_port else None)

    def workers_despite_failure(self) -> int:
        """All but one host's."""
        return (len(self.config.ssh_hosts) - 1) * int(self.config.ssh_workers_per_host)

    def close_workers(self, client: Client) -> None:
        _close_ssh_workers(client, self.cluster, self.workers_tried)

    def close(self) -> None:
        super().close()
        remote, self._remote_credentials = self._remote_credentials, None
        if remote is not None:
            _remove_remote_credentials(remote, self.config)


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
                    f"(exit {done.exit_status}): {describe_error(Exception(done.stderr or ''))}"
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
                               describe_error(result))

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
                    f"SSH workers on {self.address} did not start: {describe_error(err)}"
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

