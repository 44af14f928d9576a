"""The common handle of one cluster: its states, start, wait for workers and close.

What differs by ``cluster_type`` is done by the handle's :class:`~.kind.ClusterKind`
(:mod:`.local`, :mod:`.ssh`, :mod:`.slurm`); the scheduler file hands the running
cluster's address and credentials to the steps.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from panoseti_pipeline import cluster_credentials
from panoseti_pipeline.cluster.client import open_client
from panoseti_pipeline.cluster.kind import POLL_S, ClusterKind, ExistingScheduler
from panoseti_pipeline.cluster.local import LocalKind
from panoseti_pipeline.cluster.slurm import SLURMKind
from panoseti_pipeline.cluster.ssh import SSHKind
from panoseti_pipeline.errors import ClusterError, ConfigError

if TYPE_CHECKING:
    from distributed import Client, Security

#: After an SSH host's workers failed, how long the others get to register.
_FAILED_GRACE_S = 3.0

#: The kind of cluster each ``cluster_type`` names.
_KINDS: dict[str, type[ClusterKind]] = {
    "local": LocalKind,
    "ssh": SSHKind,
    "slurm": SLURMKind,
    "scheduler": ExistingScheduler,
}

logger = logging.getLogger(__name__)


class ClusterState(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    CLOSED = "closed"


class ClusterHandle:
    """One Dask cluster described by a ``[cluster]`` configuration.

    :meth:`start` blocks until at least ``min_workers`` workers (0 = all requested) have
    joined, or raises :class:`ClusterError` after ``startup_timeout_s`` with everything
    it started already closed. :meth:`close` is idempotent. As a context manager the
    handle is closed on exit (it is not started on entry).

    A cluster the handle starts (every kind but ``scheduler``) accepts only TLS
    connections with the temporary credentials it makes in ``credentials_parent`` (a
    private directory, :attr:`credentials`, removed on close); the steps connect with
    them (:func:`~.client.connect_client`).
    """

    def __init__(self, cluster_config: Any, *, silence_logs: int = logging.ERROR,
                 credentials_parent: str | os.PathLike[str] | None = None) -> None:
        self.config = cluster_config
        self.kind = cluster_config.cluster_type  # resolved and checked by the config
        self.state = ClusterState.NEW
        self.address: str | None = None
        self.dashboard_link: str | None = None
        self._kind = _KINDS[self.kind](cluster_config, silence_logs)
        self._client: Client | None = None
        self._credentials_parent = credentials_parent
        #: The directory of this cluster's TLS credentials (None: no TLS of ours).
        self.credentials: Path | None = None

    def __repr__(self) -> str:
        where = f" {self.address}" if self.address else ""
        return f"<ClusterHandle {self.kind} {self.state.value}{where}>"

    def __enter__(self) -> ClusterHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def client(self) -> Client:
        """The handle's own client (for checks and :func:`~.client.describe_workers`)."""
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
        try:
            if self._kind.ours:
                self.credentials = cluster_credentials.create(
                    self._credentials_parent or tempfile.gettempdir())
            self.address, self.dashboard_link = self._kind.start(self.credentials)
            self._client = open_client(self.address, _remaining(deadline, floor=1.0),
                                       self._security())
            self._wait_for_workers(need, deadline)
            if not self._kind.ours:
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
        if client is not None:
            self._kind.close_workers(client)
            with contextlib.suppress(Exception):
                client.close(timeout=10)
        self._kind.close()
        if self.credentials is not None:
            cluster_credentials.remove(self.credentials)

    def _security(self) -> Security | None:
        """The client side of this cluster's TLS (None: the Dask configuration's)."""
        if self.credentials is None:
            return None
        return cluster_credentials.security(self.credentials)

    def _wait_for_workers(self, need: int, deadline: float) -> None:
        """Wait until ``need`` workers joined; fail at the deadline, or once workers
        failed to start: at once if ``need`` counts on them (an SSH host's, any SLURM
        job's), else after a short grace (the other hosts' workers have started by then)."""
        assert self._client is not None
        kind, failures = self._kind, self._kind.worker_failures
        joined = 0
        failed_at = None
        while True:
            joined = len(self._client.nthreads())
            if joined >= need:
                if failures:
                    logger.warning("starting %s workers: %s", self.kind, "; ".join(failures))
                return
            now = time.monotonic()
            kind.check_workers()
            if failures:
                if need > kind.workers_despite_failure():
                    break
                failed_at = now if failed_at is None else failed_at
            if now >= deadline or (failed_at is not None and now - failed_at > _FAILED_GRACE_S):
                break
            time.sleep(POLL_S)
        if failures:
            raise ClusterError(
                f"{self.kind} cluster at {self.address}: only {joined} of {need} workers "
                f"joined: {'; '.join(failures)}; {kind.failure_advice}"
            )
        raise ClusterError(
            f"{self.kind} cluster at {self.address}: only {joined} of {need} workers joined "
            f"within startup_timeout_s = {self.config.startup_timeout_s:g} s"
            f"{kind.waiting_note()}; raise startup_timeout_s or lower min_workers, or check "
            f"the workers' hosts and memory"
        )


def _remaining(deadline: float, floor: float = 0.0) -> float:
    return max(deadline - time.monotonic(), floor)
