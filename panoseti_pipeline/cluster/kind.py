"""What each ``cluster_type`` provides the common handle, and what the types share.

:class:`~panoseti_pipeline.cluster.handle.ClusterHandle` starts a cluster through one
:class:`ClusterKind` (:mod:`.local`, :mod:`.ssh`, :mod:`.slurm`, or
:class:`ExistingScheduler`), waits for its workers and closes it; the kind starts its
processes, tells the handle about workers that failed, and stops what it started.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from panoseti_pipeline.errors import ConfigError

if TYPE_CHECKING:
    from distributed import Client

#: How often a wait asks again (workers joined, jobs left the queue).
POLL_S = 0.1
#: How long a cluster's close may take before what is left is stopped by other means.
CLOSE_TIMEOUT_S = 30.0

logger = logging.getLogger(__name__)


class ClusterKind:
    """One type of cluster as the handle starts and closes it.

    :meth:`start` starts the cluster (keeping distributed's cluster object in
    :attr:`cluster`, which :meth:`close` closes); the other methods are the points where
    a type adds to the handle's common wait and close, and do nothing here.
    """

    #: Whether the handle starts this cluster (and makes TLS credentials for it).
    ours = True
    #: The end of the handle's error when workers failed to start.
    failure_advice = "lower min_workers, or check the workers' hosts"

    def __init__(self, config: Any, silence_logs: int) -> None:
        self.config = config
        self.silence_logs = silence_logs
        self.cluster: Any = None
        #: Why workers did not start (set by the background start, or the type's checks).
        self.worker_failures: list[str] = []
        #: Set when the background start of the workers has ended (either way).
        self.workers_tried: threading.Event | None = None

    def start(self, credentials: Path | None) -> tuple[str, str | None]:
        """Start the cluster with TLS ``credentials``; its scheduler's address and
        dashboard link (None: no dashboard). Workers may still be starting."""
        raise NotImplementedError

    def check_workers(self) -> None:
        """Called at every poll while the handle waits for workers: record in
        :attr:`worker_failures` what the scheduler cannot see."""

    def workers_despite_failure(self) -> int:
        """The most workers that can join once some failed to start."""
        return 0

    def waiting_note(self) -> str:
        """What the handle's timeout error adds about workers not yet started."""
        return ""

    def close_workers(self, client: Client) -> None:
        """Called before the handle's client closes (with the scheduler still up)."""

    def close(self) -> None:
        """Close the cluster (after the handle's client); safe to call twice."""
        cluster, self.cluster = self.cluster, None
        if cluster is not None:
            try:
                cluster.close(timeout=CLOSE_TIMEOUT_S)
            except Exception as err:  # noqa: BLE001 -- still stop what we started
                logger.warning("closing the %s cluster: %s", self.config.cluster_type, err)

    def _start_workers_in_background(self, why: Callable[[BaseException], str]) -> None:
        """Bring the cluster's workers to its spec in the background; a failure is
        recorded as ``why(error)`` for the handle's wait instead of logged."""
        cluster, failures = self.cluster, self.worker_failures
        tried = self.workers_tried = threading.Event()

        async def start_workers() -> None:
            # SpecCluster raises the first failure once every worker was tried.
            try:
                await cluster._correct_state()
            except Exception as err:  # noqa: BLE001 -- reported by the handle's wait
                failures.append(why(err))
            finally:
                tried.set()

        cluster.loop.add_callback(start_workers)


class ExistingScheduler(ClusterKind):
    """``scheduler``: a scheduler someone else runs, at ``scheduler_address``; only
    checked, never closed."""

    ours = False

    def start(self, credentials: Path | None) -> tuple[str, str | None]:
        return self.config.scheduler_address, None  # set: the config checked it


def describe_error(err: BaseException) -> str:
    """An exception's message on one line of at most 300 characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def interface_address(interface: str) -> str:
    """The IPv4 address of ``interface`` on this machine (ConfigError when it has none)."""
    from distributed.utils import get_ip_interface

    try:
        return get_ip_interface(interface)
    except ValueError as err:
        raise ConfigError(f"[cluster] interface = {interface!r}: {describe_error(err)}") from err


def expanded_path(path: str) -> str | None:
    """A configured path with ``~`` and ``$VARIABLES`` expanded here; None for ""."""
    return os.path.expanduser(os.path.expandvars(path)) if path else None
