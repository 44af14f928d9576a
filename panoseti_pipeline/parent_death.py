"""A step or cluster manager that run.sh started stops when run.sh is gone.

run.sh stops what it started whatever ends it -- except SIGKILL of run.sh alone (``kill
-9 PID``, an out-of-memory kill), which leaves it no time to: its step would go on
writing and its cluster manager would hold the cluster for ever. So run.sh names itself
in :data:`PARENT_ENV` for the processes it starts, and each of them asks the kernel for
SIGTERM when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``), which
:func:`panoseti_pipeline.errors.run_main` turns into the same clean stop as a Ctrl-C:
the partial store removed, the cluster closed.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PARENT_ENV = "PANOSETI_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def stop_with_parent() -> None:
    """If run.sh started this process (:data:`PARENT_ENV`), get SIGTERM when it dies --
    at once if it died already. Call with the SIGTERM handler in place."""
    parent = os.environ.pop(PARENT_ENV, "")  # not for this process's own children
    if not parent.isdigit():
        return
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != int(parent):  # gone before the request was made
        os.kill(os.getpid(), signal.SIGTERM)
