"""errors.run_main: one line and an exit code for every way a script ends."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# A SIGTERM whose Interrupted lands in a callback, where Python can only print and ignore
# it (seen when run.sh stops the cluster manager while it imports Dask): the script must
# still report the signal (exit 130) in one line, without a traceback.
SWALLOWED = textwrap.dedent("""
    import gc, os, signal, sys, weakref
    from panoseti_pipeline.errors import ClusterError, run_main

    class Thing:
        pass

    def body():
        thing = Thing()
        weakref.finalize(thing, lambda: os.kill(os.getpid(), signal.SIGTERM) or sum(range(10**6)))
        del thing
        gc.collect()
        raise ClusterError("local cluster did not start: AssertionError")

    sys.exit(run_main(body, "prog", False))
""")


def test_a_signal_swallowed_inside_a_callback_is_still_reported():
    out = subprocess.run([sys.executable, "-c", SWALLOWED], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 130
    assert out.stderr.splitlines() == ["prog: error: stopped by signal SIGTERM"]


def test_without_a_signal_the_error_is_the_error():
    code = SWALLOWED.replace("os.kill(os.getpid(), signal.SIGTERM) or ", "")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        "prog: error: local cluster did not start: AssertionError"]
