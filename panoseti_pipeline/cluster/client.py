"""The client side: how a step connects to the cluster's scheduler and reports its workers.

Steps connect with :func:`step_client` (or :func:`connect_client`), given the address and
TLS credentials directory of the cluster manager's scheduler file.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from panoseti_pipeline import cluster_credentials
from panoseti_pipeline.cluster.kind import describe_error
from panoseti_pipeline.errors import ClusterError

if TYPE_CHECKING:
    from distributed import Client, Security


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
    return open_client(address, timeout, security)


def warm_workers(client: Client) -> None:
    """Have every worker import what the steps' tasks use, without waiting: it happens
    while the first step process starts (its own imports take as long), so the first
    task on each worker does not pay for them (~1 s on one machine's fresh workers)."""
    client.run(_import_task_modules, wait=False)  # (distributed: a coroutine function)


async def _import_task_modules() -> None:
    import asyncio

    def imports() -> None:
        import panoseti_pipeline.step1
        import panoseti_pipeline.step2.subtract  # noqa: F401

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

