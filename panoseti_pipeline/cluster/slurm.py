"""``slurm``: the scheduler in this process, the workers in SLURM batch jobs.

A :class:`dask_jobqueue.SLURMCluster` submits ``slurm_jobs`` jobs (``sbatch``), keeps
that many (a lost job is replaced) and cancels them by job id (``scancel``) on close.
Every job id sbatch answers is recorded, so none outlives the cluster, whatever happens
to the start.

Notes
-----
* A worker's HTTP server (``dask worker --dashboard-address``, default all interfaces) is
  bound to the address of ``interface``, looked up in the job on its node.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from panoseti_pipeline import cluster_credentials
from panoseti_pipeline.cluster.kind import (
    CLOSE_TIMEOUT_S,
    POLL_S,
    ClusterKind,
    describe_error,
    interface_address,
)
from panoseti_pipeline.errors import ClusterError

#: How often a start asks squeue about its SLURM jobs.
_SQUEUE_POLL_S = 1.0

logger = logging.getLogger(__name__)


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



class SLURMKind(ClusterKind):
    """``slurm_jobs`` worker jobs, submitted in the background and watched in squeue."""

    failure_advice = "check the [cluster] slurm_* keys and the jobs' output"

    def __init__(self, config: Any, silence_logs: int) -> None:
        super().__init__(config, silence_logs)
        #: Every SLURM job id this cluster submitted (appended as sbatch answers).
        self._job_ids: list[str] = []
        self._next_squeue = 0.0

    def start(self, credentials: Path | None) -> tuple[str, str | None]:
        from dask_jobqueue import SLURMCluster

        c = self.config
        try:
            self.cluster = SLURMCluster(
                job_cls=_recorded_slurm_job_class(self._job_ids),
                silence_logs=self.silence_logs,
                **slurm_cluster_arguments(c, credentials),
            )
        except Exception as err:
            raise ClusterError(f"SLURM cluster did not start: {describe_error(err)}") from err
        # The spec scale(jobs=) would set, and sbatch in the background by our own call,
        # so that a refusal reaches the handle's wait; adapt() then resubmits a job
        # whose workers were lost (scancel, walltime) after the lost-worker-timeout.
        jobs = int(c.slurm_jobs)
        while len(self.cluster.worker_spec) < jobs:
            self.cluster.worker_spec.update(self.cluster.new_worker_spec())
        self._start_workers_in_background(_sbatch_problem)
        self.cluster.adapt(minimum_jobs=jobs, maximum_jobs=jobs)
        self._next_squeue = time.monotonic() + _SQUEUE_POLL_S
        return (self.cluster.scheduler_address,
                self.cluster.dashboard_link if c.dashboard_port else None)

    def check_workers(self) -> None:
        """Record a failure when every SLURM job was submitted and all of them have
        already ended, before their workers joined (e.g. no Python on the node); asks
        squeue every :data:`_SQUEUE_POLL_S` until a failure is known."""
        now = time.monotonic()
        if now < self._next_squeue or self.worker_failures:
            return
        self._next_squeue = now + _SQUEUE_POLL_S
        ids = list(self._job_ids)
        if len(ids) < int(self.config.slurm_jobs) or _slurm_job_states(ids) != {}:
            return
        where = self.config.slurm_log_directory or f"slurm-<job id>.out in {os.getcwd()}"
        self.worker_failures.append(
            f"the SLURM jobs {', '.join(ids)} ended before their workers joined; "
            f"see their output ({where})"
        )

    def waiting_note(self) -> str:
        states = _slurm_job_states(self._job_ids) or {}
        shown = ", ".join(f"{i} {state}" for i, state in states.items())
        return f" (SLURM jobs: {shown or 'none in the queue'})"

    def close(self) -> None:
        super().close()
        _cancel_jobs(self._job_ids)


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
        return f"cannot run sbatch ({describe_error(err)}): are SLURM's commands on PATH here?"
    return f"submitting the worker job: {describe_error(err)}"


def _slurm_command(*cmd: str) -> Any:
    """Run a SLURM command (squeue, scancel): its CompletedProcess, or None, with a warning
    naming the command, its exit code and stderr, when it could not run or failed."""
    import subprocess

    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as err:
        logger.warning("%s: %s", " ".join(cmd), describe_error(err))
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


def _cancel_jobs(job_ids: list[str], timeout_s: float = CLOSE_TIMEOUT_S) -> None:
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
        time.sleep(POLL_S * 2)
        left = _slurm_job_states(ids)
    if left:
        logger.warning("SLURM jobs still in the queue after scancel: %s", left)


