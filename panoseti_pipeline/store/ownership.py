"""Who holds a partial store or an output directory, and whether that holder still lives.

A holder is a small JSON file created with ``O_EXCL`` (atomic on local file systems, on
NFS v3+ and on BeeGFS) naming the host, the process id and the process's start time. A
process id alone can be reused after a reboot or a wrap-around; with its start time it
names one process. A holder on this host is stale when that process is gone; a holder
on another host cannot be checked from here, so it is never taken over silently.

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
import uuid
from pathlib import Path

import psutil

from panoseti_pipeline.errors import EXIT_USAGE, StoreError

LOCK_NAME = ".panoseti-run.lock"


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
        """True/False on this host; None when it is on another host (cannot tell)."""
        if self.host != socket.gethostname():
            return None
        started = _start_time(self.pid)
        return started is not None and abs(started - self.started) < 1.0

    def describe(self) -> str:
        when = dt.datetime.fromtimestamp(self.started, dt.timezone.utc)
        return f"pid {self.pid} on {self.host}, started {when.isoformat(timespec='seconds')}"


def _start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def claim(path: Path, holder: Holder | None = None) -> None:
    """Create ``path`` naming ``holder``; FileExistsError when it exists already."""
    holder = holder or Holder.of()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(holder), f)


def read(path: Path) -> Holder | None:
    """The holder named in ``path``; None when the file is gone or not a holder record
    (e.g. cut short by a crash between its creation and its write)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return Holder(str(data["host"]), int(data["pid"]), float(data["started"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_stale(path: Path) -> bool:
    """True when ``path``'s holder is known to be gone (or the file holds no holder)."""
    holder = read(path)
    return holder is None or holder.alive() is False


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
    try:
        claim(lock, holder)
        return None
    except FileExistsError:
        pass
    current = read(lock)
    if current is not None and current.alive() is not False:
        where = "" if current.alive() else " (on another host: cannot check it from here)"
        raise LockHeld(f"{directory}: another run.sh writes here ({current.describe()})"
                         f"{where}; wait for it, or remove {lock} if that run is gone")
    # Stale: move it aside under a name of our own, so that two runs taking it over at
    # once cannot both succeed, then claim it afresh.
    aside = lock.with_name(f"{LOCK_NAME}.{uuid.uuid4().hex[:12]}.stale")
    try:
        lock.rename(aside)
    except FileNotFoundError:
        pass  # another run took it over first; the claim below decides
    else:
        if read(aside) != current:  # a fresh lock replaced it meanwhile: put it back
            with contextlib.suppress(OSError):
                os.link(aside, lock)
            aside.unlink()
            return acquire_lock(directory, holder)
        aside.unlink()
    try:
        claim(lock, holder)
    except FileExistsError:
        return acquire_lock(directory, holder)
    old = current.describe() if current else "unreadable"
    return f"{lock}: took over the lock of a run that is gone ({old})"
