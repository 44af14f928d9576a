"""A throwaway one-node SLURM cluster on this machine, for the SLURM tests and benchmark.

:func:`start_slurm` generates a munge key, starts ``munged`` (as user munge), writes a
``slurm.conf`` (controller and one node, ``CPUs=2 RealMemory=8000``, on 127.0.0.1,
cgroup-free) and starts ``slurmctld`` and ``slurmd``; it returns once ``sinfo`` shows
the node idle::

    bed = start_slurm(tmp_dir)       # raises SlurmUnavailable(reason) when it cannot
    try:
        env = bed.env()              # {"SLURM_CONF": ...}: sbatch/squeue/scancel use it
        ...
        bed.jobs()                   # [(job id, state)] of this private cluster's queue
    finally:
        bed.stop()                   # cancels its jobs by id, then stops the daemons by PID

State, spool, log and pid files live in ``directory``; munge's socket and key in a
separate temporary directory that user munge can reach (pytest's are mode 0700).
Nothing is stopped by name: the daemons by the PIDs of the processes started here,
jobs by the ids this cluster's own ``squeue`` lists.

Notes
-----
* Needs root: slurmd runs jobs as their owner, and munged is started as user munge.
* The daemons listen on every interface (SLURM has no option to bind one address); their
  traffic goes to 127.0.0.1 (``SlurmctldHost=<host>(127.0.0.1)``, ``NodeAddr=127.0.0.1``).
* Not a pytest plugin: plain functions, usable from a benchmark too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")
DAEMONS = ("munged", "slurmctld", "slurmd")
COMMANDS = ("sbatch", "squeue", "scancel", "scontrol", "sinfo")
#: What the one node offers (the issue's measured configuration).
NODE_CPUS = 2
NODE_MEMORY_MB = 8000


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be started here (not installed, not root, ...); the why is the text."""


@dataclasses.dataclass
class SlurmTestBed:
    """A running one-node SLURM cluster and the files that describe it."""

    directory: Path
    munge_dir: Path
    conf: Path
    node: str
    procs: dict[str, subprocess.Popen] = dataclasses.field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """Environment variables that point SLURM's commands at this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """A SLURM command against this cluster (``squeue``, ``scancel``, ...)."""
        return subprocess.run(list(cmd), env={**os.environ, **self.env()}, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def jobs(self) -> list[tuple[str, str]]:
        """(job id, state) of every job in this cluster's queue (pending, running,
        completing): all of them were submitted by the tests."""
        done = self.run("squeue", "-h", "-o", "%i %T")
        if done.returncode != 0:
            raise RuntimeError(f"squeue failed: {done.stderr.strip()}")
        return [tuple(line.split()[:2]) for line in done.stdout.splitlines() if line.strip()]

    def job_field(self, job_id: str, name: str) -> str:
        """One ``Name=value`` field of ``scontrol show job`` (kept a few minutes after the
        job ended), e.g. ``JobState`` or ``ExitCode``."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        for word in out.split():
            key, _, value = word.partition("=")
            if key == name:
                return value
        return ""

    def wait_no_jobs(self, timeout: float = STOP_TIMEOUT_S) -> list[tuple[str, str]]:
        """Wait until the queue is empty; return what is still there at the timeout."""
        deadline = time.monotonic() + timeout
        while (left := self.jobs()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left

    def cancel_all(self) -> list[str]:
        """Cancel every job of this cluster, by id, and wait for the queue to drain."""
        ids = [job_id for job_id, _ in self.jobs()]
        if ids:
            self.run("scancel", *ids)
            self.wait_no_jobs()
        return ids

    def log(self, name: str) -> str:
        path = self.directory / "log" / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def stop(self) -> None:
        """Cancel the jobs, then stop slurmd, slurmctld and munged by their PIDs."""
        slurm_up = all(self._alive(n) for n in ("slurmctld", "slurmd"))
        if slurm_up:
            with contextlib.suppress(Exception):
                self.cancel_all()
            with contextlib.suppress(Exception):
                self.run("scontrol", "shutdown")
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            if name == "munged" or not slurm_up:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)
        shutil.rmtree(self.munge_dir, ignore_errors=True)

    def _alive(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def __enter__(self) -> SlurmTestBed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_slurm(directory: str | os.PathLike[str],
                timeout_s: float = START_TIMEOUT_S) -> SlurmTestBed:
    """Start munged, slurmctld and slurmd with their files in ``directory``.

    Raises :class:`SlurmUnavailable` saying why when it cannot (nothing is left running).
    """
    if os.geteuid() != 0:
        raise SlurmUnavailable("the SLURM test bed needs root (slurmd runs jobs as their "
                               "owner; munged runs as user munge); CI runs as root")
    programs = {name: _find(name, SBIN) for name in DAEMONS}
    programs.update({name: shutil.which(name) for name in COMMANDS})
    missing = sorted(name for name, path in programs.items() if not path)
    if missing:
        raise SlurmUnavailable(f"not installed: {', '.join(missing)} "
                               f"(apt-get install slurm-wlm munge)")
    try:
        munge_user = pwd.getpwnam("munge")
    except KeyError:
        raise SlurmUnavailable("there is no user munge (apt-get install munge)") from None

    d = Path(directory)
    for sub in ("state", "spool", "log"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    munge_dir = Path(tempfile.mkdtemp(prefix="panoseti-munge-"))
    node = socket.gethostname().split(".")[0]
    bed = SlurmTestBed(d, munge_dir, d / "slurm.conf", node)
    try:
        _write_munge_key(munge_dir, munge_user)
        bed.conf.write_text(_slurm_conf(d, munge_dir, node, *_free_ports(2)))
        socket_path = munge_dir / "munge.socket.2"
        bed.procs["munged"] = _spawn(
            [programs["munged"], "-F", f"--key-file={munge_dir / 'munge.key'}",
             f"--socket={socket_path}", f"--log-file={munge_dir / 'munged.log'}",
             f"--pid-file={munge_dir / 'munged.pid'}", f"--seed-file={munge_dir / 'munged.seed'}"],
            d / "log" / "munged.out", user=munge_user.pw_uid, group=munge_user.pw_gid)
        _wait(lambda: socket_path.exists(), bed, "munged", timeout_s)
        env = {**os.environ, **bed.env()}
        bed.procs["slurmctld"] = _spawn([programs["slurmctld"], "-D", "-f", str(bed.conf)],
                                        d / "log" / "slurmctld.out", env=env)
        bed.procs["slurmd"] = _spawn([programs["slurmd"], "-D", "-N", node, "-f", str(bed.conf)],
                                     d / "log" / "slurmd.out", env=env)
        _wait(lambda: _node_state(bed) == "idle", bed, "the node to be idle in sinfo", timeout_s)
    except BaseException:
        bed.stop()
        raise
    return bed


# -- helpers ---------------------------------------------------------------------------


def _find(name: str, dirs: tuple[str, ...]) -> str | None:
    for directory in dirs:
        path = os.path.join(directory, name)
        if os.access(path, os.X_OK):
            return path
    return shutil.which(name)


def _write_munge_key(munge_dir: Path, user: pwd.struct_passwd) -> None:
    """A fresh 1024-bit key; munged wants it private to munge, and its socket directory
    reachable by everyone (mode 0755)."""
    key = munge_dir / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o400)
    munge_dir.chmod(0o755)
    for path in (munge_dir, key):
        os.chown(path, user.pw_uid, user.pw_gid)


def _free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on every interface now (the daemons bind them all)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _slurm_conf(d: Path, munge_dir: Path, node: str, ctld_port: int, slurmd_port: int) -> str:
    lines = [
        "ClusterName=panoseti-test",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_dir / 'munge.socket.2'}",
        f"StateSaveLocation={d / 'state'}",
        f"SlurmdSpoolDir={d / 'spool'}",
        f"SlurmctldPidFile={d / 'slurmctld.pid'}",
        f"SlurmdPidFile={d / 'slurmd.pid'}",
        f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={d / 'log' / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        "SwitchType=switch/none",
        "MpiDefault=none",
        "ReturnToService=2",
        # A cancelled job's processes get SIGTERM, then SIGKILL after KillWait seconds.
        "KillWait=5",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={NODE_CPUS} RealMemory={NODE_MEMORY_MB} "
        "State=UNKNOWN",
        f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP",
    ]
    return "\n".join(lines) + "\n"


def _spawn(cmd: list[str], log: Path, **kwargs: object) -> subprocess.Popen:
    with open(log, "w") as out:
        try:
            return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    **kwargs)  # type: ignore[call-overload]
        except OSError as err:
            raise SlurmUnavailable(f"cannot run {cmd[0]}: {err}") from err


def _node_state(bed: SlurmTestBed) -> str:
    done = bed.run("sinfo", "-h", "-n", bed.node, "-o", "%T", timeout=10)
    return done.stdout.strip() if done.returncode == 0 else ""


def _wait(ready: Callable[[], bool], bed: SlurmTestBed, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        dead = [name for name, proc in bed.procs.items() if proc.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"{', '.join(dead)} exited" if dead else f"no {what} after {timeout_s:g} s"
            tail = " | ".join(_log_tail(bed, name) for name in (dead or list(bed.procs)))
            raise SlurmUnavailable(f"SLURM did not start: {why}: {tail or 'no output'}")
        time.sleep(0.1)


def _log_tail(bed: SlurmTestBed, name: str, lines: int = 3) -> str:
    text = bed.log(name) or _read(bed.directory / "log" / f"{name}.out")
    tail = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return f"{name}: {' / '.join(tail)}" if tail else ""


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""
