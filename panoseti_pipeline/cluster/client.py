"""The client side: the scheduler file, how a step connects to the cluster's scheduler,
and what the manager asks of the workers once they are up.

The cluster manager writes the scheduler file (:func:`write_scheduler_file`: the address
and the TLS credentials directory). Steps connect with :func:`step_client` (or
:func:`connect_client`), given that file (waited for: run.sh starts the steps while the
cluster starts) or the address and credentials.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from panoseti_pipeline import cluster_credentials
from panoseti_pipeline.cluster.kind import describe_error
from panoseti_pipeline.errors import ClusterError, ConfigError

if TYPE_CHECKING:
    from distributed import Client, Security

#: How often a step looks for the scheduler file of a cluster still starting.
SCHEDULER_FILE_POLL_S = 0.02
#: Seconds run.sh and the steps wait for the scheduler file on top of [cluster]
#: startup_timeout_s (interpreter and Dask imports, SSH logins).
STARTUP_WAIT_MARGIN_S = 60
#: How long a step's end waits for a connection still being made.
CLOSE_WAIT_S = 2.0

@contextlib.contextmanager
def step_client(address: str | None, debug: bool = False, credentials: str | None = None,
                scheduler_file: str | None = None, wait_s: float = 0.0
                ) -> Iterator[PendingClient | None]:
    """The client a step runs its tasks through, being connected on a thread while the
    step does its own first work (imports, reading its input: the connection took ~0.4 s
    of each step's start); None (run locally) without an address or scheduler file.

    ``credentials``: the TLS credentials directory of a cluster the pipeline started.
    ``scheduler_file``: the cluster manager's scheduler file instead of an address, waited
    for up to ``wait_s`` seconds (the cluster may still be starting: run.sh starts the
    steps meanwhile).

    Keeps distributed's log lines out of the step's one-line errors unless ``debug``,
    and closes the client at the end.
    """
    if address and scheduler_file:
        raise ConfigError("give a scheduler address or --dask-scheduler-file, not both")
    if not (address or scheduler_file):
        yield None
        return

    def connect(abandoned: threading.Event) -> Client:
        if not debug:
            quiet_client_logs()
        if scheduler_file:
            where, secrets = wait_for_scheduler_file(scheduler_file, wait_s, abandoned)
            return connect_client(where, credentials=secrets)
        return connect_client(address, credentials=credentials)

    pending = PendingClient(connect)
    try:
        yield pending
    finally:
        pending.close()


class PendingClient:
    """A Dask client being connected on a thread; calling it waits for it (and raises
    what the connection raised)."""

    def __init__(self, connect: Callable[[threading.Event], Client]) -> None:
        self._done: concurrent.futures.Future[Client] = concurrent.futures.Future()
        self._abandoned = threading.Event()
        threading.Thread(target=self._connect, args=(connect,), name="dask-connect",
                         daemon=True).start()

    def _connect(self, connect: Callable[[threading.Event], Client]) -> None:
        try:
            self._done.set_result(connect(self._abandoned))
        except BaseException as err:  # noqa: BLE001 -- raised where the client is wanted
            self._done.set_exception(err)

    def _wait(self, seconds: float = float("inf")) -> bool:
        deadline = time.monotonic() + seconds
        while not self._done.done() and time.monotonic() < deadline:
            concurrent.futures.wait([self._done], timeout=0.2)  # a signal's handler runs
        return self._done.done()

    def __call__(self) -> Client:
        self._wait()
        return self._done.result()

    def close(self) -> None:
        """Close the client. A step that ends before it needed the cluster stops waiting
        for the scheduler file, and gives a connection under way :data:`CLOSE_WAIT_S`
        to finish (then the process's exit ends it: a scheduler that died mid-connection
        would hold it for the client's 30 s timeout)."""
        self._abandoned.set()
        if self._wait(CLOSE_WAIT_S) and self._done.exception() is None:
            self._done.result().close()  # (a failure was reported where it was wanted)


def wait_for_scheduler_file(path: str | os.PathLike[str], wait_s: float,
                            abandoned: threading.Event) -> tuple[str, str | None]:
    """The address and credentials in the cluster manager's scheduler file, once it is
    there (a :class:`ClusterError` after ``wait_s`` seconds, or once ``abandoned``)."""
    deadline = time.monotonic() + wait_s
    while not os.path.exists(path):  # written whole: a temporary file renamed
        if time.monotonic() >= deadline or abandoned.wait(SCHEDULER_FILE_POLL_S):
            raise ClusterError(f"{path}: no Dask cluster within {wait_s:g} s (the cluster "
                               "manager did not write its scheduler file)")
    return read_scheduler_file(path)


def startup_wait_s(section: Any) -> int:
    """How long to wait for the scheduler file of a cluster of ``[cluster]`` ``section``."""
    return int(section.startup_timeout_s) + STARTUP_WAIT_MARGIN_S


def quiet_client_logs() -> None:
    """Silence distributed's own log lines in a step's process.

    A lost scheduler or a cancelled task is reported by the step in one line; the
    client's reconnect tracebacks would bury it. ``--debug`` skips this.
    """
    import distributed  # noqa: F401 -- its logging set-up first, then ours

    for name in ["distributed", *logging.root.manager.loggerDict]:
        if name.startswith("distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


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


def add_cluster_options(parser: Any) -> None:
    """A step's ``--dask-credentials`` and ``--dask-scheduler-file`` options (argparse)."""
    parser.add_argument("--dask-credentials", metavar="DIRECTORY",
                        help="TLS credentials of the Dask scheduler (the directory named in "
                             "the cluster manager's scheduler file)")
    parser.add_argument("--dask-scheduler-file", metavar="FILE",
                        help="instead of an address: the cluster manager's scheduler file "
                             "(address and credentials), waited for while the cluster "
                             "starts, up to [cluster] startup_timeout_s + "
                             f"{STARTUP_WAIT_MARGIN_S} s")


def connect_client(address: str, timeout: float = 30.0,
                   credentials: str | os.PathLike[str] | None = None) -> Client:
    """Connect to the scheduler at ``address`` (a :class:`ClusterError` if it is not there),
    with the TLS ``credentials`` directory of a cluster the pipeline started; without
    them, with the Dask configuration's ``distributed.comm.tls`` settings."""
    security = cluster_credentials.security(credentials) if credentials else None
    return open_client(address, timeout, security)


#: What the steps' tasks import on a worker: their modules, and what those import only
#: inside the tasks (step 2's read the L0 through zarr, ~0.2 s to import; step 1's write
#: their shards with numcodecs and google_crc32c).
TASK_MODULES = ("panoseti_pipeline.step1", "panoseti_pipeline.step2.subtract", "zarr",
                "numcodecs.blosc", "google_crc32c")


def warm_workers(client: Client) -> threading.Thread:
    """Have every worker import :data:`TASK_MODULES`, on a thread of the caller: it
    happens while the first step process starts, so that the first tasks of each step on
    each worker do not pay for them (step 2's first three tasks, 0.1 s each on one
    machine, took 0.35 s more on a cluster whose workers had only run step 1). The caller
    joins the thread before it closes the cluster, so that the close does not cut the
    imports short (a stop at once after the start once left a timeout on its stderr)."""

    def warm() -> None:
        with contextlib.suppress(Exception):  # a worker gone meanwhile imports them in a task
            client.run(_import_task_modules)

    thread = threading.Thread(target=warm, name="warm-workers", daemon=True)
    thread.start()
    return thread


async def _import_task_modules() -> None:
    import asyncio
    import importlib

    def imports() -> None:
        for name in TASK_MODULES:
            importlib.import_module(name)

    await asyncio.get_running_loop().run_in_executor(None, imports)  # the loop stays free


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


def open_client(address: str, timeout: float, security: Security | None = None) -> Client:
    """A client of the scheduler at ``address`` with TLS ``security`` (None: the Dask
    configuration's); a :class:`ClusterError` when it cannot connect."""
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
                f"({describe_error(err)}); is it running and is the address right?"
            ) from err
        raise

