"""Who holds a partial store or an output directory, and whether that holder still lives.

A holder is a small JSON file naming the host, the process id and the process's start
time. It is written whole under a private name and hard-linked into place (``link()``
fails when the name exists: atomic on local file systems, NFS and BeeGFS;
:mod:`.safe_write`), so nobody ever reads a holder half written. A process id alone can
be reused after a reboot or a wrap-around; with its start time it names one process. A
holder on this host is stale when that process is gone -- a process that exists but
whose details ``/proc`` hides (another user's, ``hidepid``) is alive; a holder on another
host cannot be checked from here, so it is never taken over silently; a file that is no
holder record (damaged) is held until it is :data:`UNREADABLE_STALE_S` old.

Used for the ``<final>.<id>.owner`` file beside each partial store (store/publish.py) and
for the output directory's run lock (``run.sh``: :func:`acquire_lock`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import socket
import time
import uuid
from pathlib import Path

import psutil

from panoseti_pipeline.errors import EXIT_USAGE, StoreError
from panoseti_pipeline.store.safe_write import write_file

LOCK_NAME = ".panoseti-run.lock"
#: Seconds after which a holder file that holds no holder record counts as stale.
UNREADABLE_STALE_S = 60.0


class LockHeld(StoreError):
    """Another run holds the output directory: found before any work (exit 2)."""

    exit_code = EXIT_USAGE


@dataclasses.dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: float  # the process's start time (seconds since the epoch, as psutil gives)

    @classmethod
    def of(cls, pid: int | None = None) -> Holder:
        """The holder record of process ``pid`` (default: this process) on this host."""
        pid = os.getpid() if pid is None else pid
        return cls(socket.gethostname(), pid, _start_time(pid) or 0.0)

    def alive(self) -> bool | None:
        """True/False on this host; None when it is on another host (cannot tell).

        A process that exists but is hidden or closed to us (``/proc`` mounted
        ``hidepid=1``: access denied; ``hidepid=2``: absent from ``/proc``, yet
        ``kill(pid, 0)`` answers EPERM) is alive: its start time cannot be checked.
        """
        if self.host != socket.gethostname():
            return None
        try:
            started = psutil.Process(self.pid).create_time()
        except psutil.AccessDenied:
            return True
        except psutil.NoSuchProcess:
            return _exists(self.pid)
        except ValueError:  # not a process id
            return False
        return abs(started - self.started) < 1.0

    def describe(self) -> str:
        when = dt.datetime.fromtimestamp(self.started, dt.timezone.utc)
        return f"pid {self.pid} on {self.host}, started {when.isoformat(timespec='seconds')}"


def _start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def _exists(pid: int) -> bool:
    """Whether process ``pid`` exists, asked of the kernel (``kill(pid, 0)``), not of
    ``/proc``; EPERM (another user's process) means it does."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(path: Path, holder: Holder | None = None) -> None:
    """Create ``path`` naming ``holder``, whole at once; FileExistsError when it exists.

    The record is written under a private name and hard-linked to ``path``
    (:func:`.safe_write.write_file`): the name never exists empty or half written (a
    reader of a file created, then written, judged it stale in between and took it over).
    """
    holder = holder or Holder.of()
    write_file(path, json.dumps(dataclasses.asdict(holder)).encode(), exclusive=True)


def read(path: Path) -> Holder | None:
    """The holder named in ``path``; None when the file is gone or not a holder record
    (damaged, or written by a version of this pipeline that created it before writing)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return Holder(str(data["host"]), int(data["pid"]), float(data["started"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_stale(path: Path) -> bool:
    """True when ``path``'s holder is known to be gone, or the file is gone, or it holds
    no holder record and is older than :data:`UNREADABLE_STALE_S`."""
    holder = read(path)
    if holder is not None:
        return holder.alive() is False
    try:
        return time.time() - path.stat().st_mtime > UNREADABLE_STALE_S
    except FileNotFoundError:
        return True


def release(path: Path, holder: Holder | None = None) -> bool:
    """Remove ``path`` if it still names ``holder`` (default: this process)."""
    holder = holder or Holder.of()
    if read(path) != holder:
        return False
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return True


def acquire_lock(directory: Path, holder: Holder) -> str | None:
    """Take ``directory``'s run lock for ``holder``; return a notice when a stale lock
    was taken over. Raises :class:`LockHeld` naming the holder when another run has it."""
    lock = directory / LOCK_NAME
    while True:
        try:
            claim(lock, holder)
            return None
        except FileExistsError:
            pass
        current = read(lock)
        if not is_stale(lock):
            raise LockHeld(_held_message(directory, lock, current))
        # Stale: move it aside under a name of our own, so that two runs taking it over
        # at once cannot both succeed, then claim it afresh.
        aside = lock.with_name(f"{LOCK_NAME}.{uuid.uuid4().hex[:12]}.stale")
        try:
            lock.rename(aside)
        except FileNotFoundError:
            continue  # another run took it over first; the claim decides
        if not is_stale(aside):  # a fresh lock replaced it meanwhile: put it back
            with contextlib.suppress(OSError):
                os.link(aside, lock, follow_symlinks=False)
            aside.unlink()
            continue
        aside.unlink()
        try:
            claim(lock, holder)
        except FileExistsError:
            continue
        old = current.describe() if current else "no holder record in it"
        return f"{lock}: took over the lock of a run that is gone ({old})"


def _held_message(directory: Path, lock: Path, current: Holder | None) -> str:
    if current is None:
        return (f"{directory}: another run.sh may be writing here: its lock {lock} holds no "
                f"holder record yet (taken over once {UNREADABLE_STALE_S:.0f} s old); "
                f"remove it if no run is writing here")
    where = "" if current.alive() else " (on another host: cannot check it from here)"
    return (f"{directory}: another run.sh writes here ({current.describe()}){where}; wait "
            f"for it, or remove {lock} if that run is gone")
