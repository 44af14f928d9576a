"""The pipeline's Dask cluster: start it from ``[cluster]``, wait for workers, close it.

One :class:`ClusterHandle` owns one cluster for its whole life::

    new --start()--> starting --(workers joined)--> running --close()--> closed
                         \\--(timeout, error, Ctrl-C)--> closed   (everything started is closed)

Four kinds, chosen by the effective ``cluster_type`` of the configuration, each in its
module beside the common handle (:mod:`.handle`, :mod:`.kind`):

``local`` (:mod:`.local`)
    a :class:`distributed.LocalCluster` with ``local_workers`` worker processes.
``ssh`` (:mod:`.ssh`)
    a :class:`distributed.SSHCluster` (asyncssh): the FIRST of ``ssh_hosts`` runs the
    scheduler and EVERY listed host runs ``ssh_workers_per_host`` workers.
``slurm`` (:mod:`.slurm`)
    a :class:`dask_jobqueue.SLURMCluster`: the scheduler runs in this process, the workers
    in ``slurm_jobs`` batch jobs (``sbatch``), kept at that number (a lost job is
    replaced) and cancelled by job id (``scancel``) on close.
``scheduler`` (:class:`.kind.ExistingScheduler`)
    an existing scheduler at ``scheduler_address``: only checked, never closed.

Steps connect with :func:`connect_client` (:mod:`.client`). Workers and the scheduler
import the installed ``panoseti_pipeline`` package: on a cluster, ``remote_python`` is
the interpreter of the same environment on the shared filesystem (``pip install -e`` of
this repository).

Examples
--------
>>> from panoseti_pipeline.config import load_config
>>> with ClusterHandle(load_config("config.toml").cluster) as cluster:  # doctest: +SKIP
...     cluster.start()
...     client = connect_client(cluster.address, credentials=cluster.credentials)

Notes
-----
* ``interface`` is given to the scheduler and to every worker, so ``interface = "lo"``
  keeps every Dask address on 127.0.0.0/8 (the tests rely on it).
* ``dashboard_port = 0`` disables the dashboard; the scheduler's small HTTP server
  (health checks) then binds the scheduler's own host on a random port, never 0.0.0.0.
* ``distributed`` is imported only inside the functions that need it (1.4 s).
"""

from panoseti_pipeline.cluster.client import (
    add_cluster_options,
    connect_client,
    describe_workers,
    read_scheduler_file,
    startup_wait_s,
    step_client,
    warm_workers,
    write_scheduler_file,
)
from panoseti_pipeline.cluster.handle import ClusterHandle, ClusterState
from panoseti_pipeline.cluster.kind import interface_address
from panoseti_pipeline.cluster.slurm import slurm_cluster_arguments
from panoseti_pipeline.cluster.ssh import ssh_cluster_arguments

__all__ = [
    "ClusterHandle",
    "ClusterState",
    "add_cluster_options",
    "connect_client",
    "describe_workers",
    "interface_address",
    "read_scheduler_file",
    "slurm_cluster_arguments",
    "ssh_cluster_arguments",
    "startup_wait_s",
    "step_client",
    "warm_workers",
    "write_scheduler_file",
]
