"""``local``: a :class:`distributed.LocalCluster` of worker processes on this machine.

Its worker processes are children of this process; any still alive after the cluster
closed are stopped by PID (:func:`_reap`), and only those that appeared while it ran.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from panoseti_pipeline import cluster_credentials
from panoseti_pipeline.cluster.kind import (
    ClusterKind,
    describe_error,
    expanded_path,
    interface_address,
)
from panoseti_pipeline.errors import ClusterError

logger = logging.getLogger(__name__)


class LocalKind(ClusterKind):
    """``local_workers`` worker processes of ``local_threads_per_worker`` threads."""

    def __init__(self, config: Any, silence_logs: int) -> None:
        super().__init__(config, silence_logs)
        #: Our child processes before the start (None: not started, nothing to stop).
        self._pids_before: set[int] | None = None

    def start(self, credentials: Path | None) -> tuple[str, str | None]:
        from distributed import LocalCluster

        self._pids_before = _child_pids()
        c = self.config
        host = interface_address(c.interface) if c.interface else "127.0.0.1"
        if c.dashboard_port:
            dashboard_address = f"{host}:{int(c.dashboard_port)}"
            dashboard = True
        else:
            dashboard_address = f"{host}:0"
            dashboard = False
        try:
            self.cluster = LocalCluster(
                n_workers=0,
                threads_per_worker=int(c.local_threads_per_worker),
                memory_limit=c.local_memory_per_worker,
                processes=True,
                local_directory=expanded_path(c.local_directory),
                interface=c.interface or None,
                host=None if c.interface else host,
                dashboard_address=dashboard_address,
                scheduler_kwargs={"dashboard": dashboard},
                silence_logs=self.silence_logs,
                protocol="tls://",
                security=cluster_credentials.security(credentials),
            )
        except Exception as err:
            raise ClusterError(f"local cluster did not start: {describe_error(err)}") from err
        # scale() starts the workers in the background; the handle's wait bounds the wait.
        self.cluster.scale(int(c.local_workers))
        return (self.cluster.scheduler_address,
                self.cluster.dashboard_link if dashboard else None)

    def close(self) -> None:
        started = set() if self._pids_before is None else _child_pids() - self._pids_before
        super().close()
        _reap(started)


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
