"""A step or cluster manager that run.sh started stops when run.sh is gone.

run.sh stops what it started whatever ends it -- except SIGKILL of run.sh alone (``kill
-9 PID``, an out-of-memory kill), which leaves it no time to: its step would go on
writing and its cluster manager would hold the cluster for ever. So run.sh names itself
in :data:`PARENT_ENV` for the processes it starts, and each of them asks the kernel for
SIGTERM when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``), which
:func:`panoseti_pipeline.errors.run_main` turns into the same clean stop as a Ctrl-C:
the partial store removed, the cluster closed.

A step runs in a lane of run.sh (a subshell per product in flight), so it names two: its
parent, the lane, and run.sh itself, which is not its parent and is watched instead
(checked every :data:`WATCH_S` seconds on a thread).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PARENT_ENV = "PANOSETI_PARENT_PID"
_PR_SET_PDEATHSIG = 1
WATCH_S = 1.0


def stop_with_parent() -> None:
    """If run.sh started this process (:data:`PARENT_ENV`: the parent's id, then those of
    processes above it), get SIGTERM when any of them dies -- at once if one died
    already. Call with the SIGTERM handler in place."""
    ids = os.environ.pop(PARENT_ENV, "").split()  # not for this process's own children
    if not ids or not all(i.isdigit() for i in ids):
        return
    parent, *above = map(int, ids)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # gone before the request was made
        os.kill(os.getpid(), signal.SIGTERM)
    if above:
        threading.Thread(target=_watch, args=(above,), name="run.sh-watch",
                         daemon=True).start()


def _watch(pids: list[int]) -> None:
    while True:
        for pid in pids:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            except PermissionError:  # there, another user's: cannot be ours, but alive
                pass
        time.sleep(WATCH_S)
