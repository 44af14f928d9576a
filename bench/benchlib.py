"""Shared benchmark plumbing: cached generated inputs, timing, peak memory of a child.

Benchmarks print ratios measured within one run (the machines are shared and noisy);
absolute seconds are printed only for context.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OUT = Path(os.environ.get("BENCH_DIR", REPO / "bench" / "out"))


def big_file(megabytes: int) -> Path:
    """A generated clean img16 file of about ``megabytes`` MB, made once and reused."""
    from panoseti_pipeline import synthetic as synthetic_obs

    directory = OUT / f"img16_{megabytes}MB"
    found = sorted(directory.glob("*.pff"))
    if found:
        return found[0]
    directory.mkdir(parents=True, exist_ok=True)
    print(f"generating a {megabytes} MB img16 file in {directory} ...", flush=True)
    return synthetic_obs.write_big_file(directory, megabytes)


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - t0, result


#: defined in every child: its own peak RSS in MB. Not ``ru_maxrss``: Linux keeps that
#: across fork and exec, so a child's would be at least the bench's own (measured: a child
#: of a 527 MB parent reported 527 MB with a 14 MB VmHWM).
CHILD_PREAMBLE = """
def peak_rss_mb():
    with open("/proc/self/status") as f:
        return int(f.read().split("VmHWM:")[1].split()[0]) / 1024
"""


def run_child(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter; return the JSON object it printed last.

    Children measure their own peak RSS with ``peak_rss_mb()`` (VmHWM: every page
    touched, mapped file pages included, at its peak): what Dask's monitor samples.
    """
    # -P: the working directory is not put first on sys.path, so PYTHONPATH (or else the
    # venv's install) says which tree is measured
    proc = subprocess.run([sys.executable, "-P", "-c", CHILD_PREAMBLE + code, *args],
                          cwd=REPO, check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def loopback_sshd(bench: str) -> Iterator[tuple[Path, Any]]:
    """A temporary directory under OUT and a throwaway sshd on loopback in it
    (tests/sshd_testbed.py), stopped at the end; ``bench`` exits with a message where sshd
    cannot start. PYTHONPATH is dropped: the workers must not find the repository."""
    sys.path.insert(0, str(REPO / "tests"))
    import sshd_testbed

    os.environ.pop("PYTHONPATH", None)
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=OUT) as tmp_name:
        tmp = Path(tmp_name)
        try:
            bed = sshd_testbed.start_sshd(tmp / "sshd")
        except sshd_testbed.SSHDUnavailable as err:
            raise SystemExit(f"{bench}: cannot start sshd: {err}") from err
        with bed:
            yield tmp, bed
