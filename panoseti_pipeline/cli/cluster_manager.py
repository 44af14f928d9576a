"""Start one Dask cluster from ``[cluster]``, publish its address, hold it, tear it down.

Usage::

    python3 cluster_lifecycle_manager.py config.toml /tmp/scheduler_address.txt &
    # ... wait until the file exists, then give the steps its two lines:
    # --dask-scheduler ADDRESS --dask-credentials DIRECTORY
    kill -TERM %1      # closes scheduler and workers, removes the file, exit 0

The scheduler file (mode 0600) holds the scheduler's address on its first line and, on
its second, the directory of the cluster's temporary TLS credentials (a private directory
beside the scheduler file, removed when the cluster closes; empty for
``cluster_type = "scheduler"``): a client connects with them only, e.g. a step's
``--dask-credentials``. It is written atomically, and only once the workers have joined
(``min_workers``, 0 = all requested, within ``startup_timeout_s``). The address, one line
per worker (address, host -- for SSH workers the host their session reached, for SLURM
workers their job id --, pid, threads, working directory) and the dashboard link are
printed on stdout first. SIGTERM or SIGINT closes everything this process started, removes
the scheduler file and exits 0.

Exit codes: 0 closed cleanly after SIGTERM/SIGINT; 1 the cluster did not start (one line on
stderr, nothing left running, no scheduler file); 2 usage or configuration error (including
``use_dask = false``: there is nothing to start); 130 interrupted while starting.

With ``cluster_type = "slurm"`` the workers run in SLURM jobs, cancelled by job id when
the cluster closes. With ``cluster_type = "scheduler"`` the configured
``scheduler_address`` is only checked and published; the scheduler and its workers are
left running on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from panoseti_pipeline.errors import ConfigError, run_main

PROG = "cluster_lifecycle_manager.py"
#: How long a stop waits for the workers' warm-up imports (~1 s) before the close.
WARM_JOIN_S = 5.0


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    from panoseti_pipeline.version import add_version_option

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Start the pipeline's Dask cluster and hold it until SIGTERM/SIGINT.",
    )
    add_version_option(parser)
    parser.add_argument("config", help="pipeline configuration (TOML), section [cluster]")
    parser.add_argument("scheduler_file", help="file to receive the scheduler address")
    parser.add_argument("--debug", action="store_true", help="tracebacks and Dask logs")
    args = parser.parse_args(argv)
    return run_main(lambda: _run(args), PROG, args.debug)


def _run(args: argparse.Namespace) -> int:
    import logging

    from panoseti_pipeline.config import load_config

    config = load_config(args.config)
    if not config.cluster.use_dask:
        raise ConfigError(
            f"{args.config}: [cluster] use_dask = false: there is no cluster to start; "
            f"set use_dask = true, or run the steps without a scheduler address"
        )
    scheduler_file = Path(args.scheduler_file)
    if not scheduler_file.parent.is_dir():
        raise ConfigError(f"{scheduler_file}: directory {scheduler_file.parent} does not exist")

    from panoseti_pipeline import cluster as dask_cluster

    stop = threading.Event()
    if not args.debug:  # a stop during start-up must not print the client's reconnect trace
        logging.getLogger("distributed.client").setLevel(logging.CRITICAL)
    # Dask's own log lines only with --debug: a worker losing its scheduler while the
    # run is being stopped logs a traceback that is noise there; real failures reach the
    # steps, which report them in one line.
    silence = logging.WARNING if args.debug else logging.CRITICAL
    cluster = dask_cluster.ClusterHandle(config.cluster, silence_logs=silence,
                                         credentials_parent=scheduler_file.parent)
    try:
        try:
            cluster.start()  # SIGTERM here raises Interrupted: start() closes what it began
        except ConfigError as err:  # e.g. an interface this machine does not have
            raise ConfigError(f"{args.config}: {err}") from err
        # From now on SIGTERM/SIGINT only ask to stop; a second one cannot cut the close.
        with _stop_on(stop, signal.SIGTERM, signal.SIGINT):
            try:
                # Printed (and flushed) before the file is written: whoever waits for the
                # file finds these lines complete.
                workers = dask_cluster.describe_workers(cluster.client)
                print(f"scheduler {cluster.address} ({cluster.kind}, {len(workers)} workers)")
                for w in workers:
                    print(_worker_line(w))
                print(f"dashboard {cluster.dashboard_link or 'off (dashboard_port = 0)'}")
                print(f"scheduler file {scheduler_file}; stop with: kill -TERM {os.getpid()}")
                sys.stdout.flush()
                dask_cluster.write_scheduler_file(scheduler_file, cluster.address,
                                                  cluster.credentials)
                warming = dask_cluster.warm_workers(cluster.client)
                while not stop.wait(1.0):
                    pass
                warming.join(timeout=WARM_JOIN_S)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    scheduler_file.unlink()
                cluster.close()
    finally:
        cluster.close()
    print(f"{cluster.kind} cluster closed")
    return 0


def _worker_line(w: dict) -> str:
    """One worker for the log and the run record: where it listens, where it runs."""
    where = w.get("hostname") or "?"
    if w.get("ssh_host"):
        where = f"{w['ssh_host']} via ssh ({where})"
    elif w.get("slurm_job"):
        where = f"{where} in SLURM job {w['slurm_job']}"
    return (f"worker {w['address']} on {where}, pid {w.get('pid')}, "
            f"{w.get('nthreads')} threads, cwd {w.get('cwd')}")


@contextlib.contextmanager
def _stop_on(event: threading.Event, *signums: signal.Signals) -> Iterator[None]:
    """While active, the given signals set ``event`` instead of interrupting."""

    def handler(_signum: int, _frame: object) -> None:
        event.set()

    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())
