"""Shared tools of the fault campaign (tests/test_faults.py).

* snapshots of a tree (checksums, modes, directory mtimes) to prove inputs untouched;
* chunk digests to prove a rerun is byte-identical to an uninterrupted run, and
  :func:`assert_same_store` to prove two runs (local, SSH, SLURM) wrote the same store;
* processes: run a CLI in its own session, wait for a point, kill it, and check that
  nothing of that session is left (``/proc/<pid>/stat``);
* permissions as root: :func:`as_unprivileged` drops CAP_DAC_OVERRIDE and
  CAP_DAC_READ_SEARCH (``setpriv --bounding-set``), so root then obeys file modes the way
  any user does (a uid switch cannot work here: the venv's interpreter lives under
  ``/root``, mode 0700);
* a small tmpfs for disk-full cases (:func:`tmpfs`), always unmounted;
* kill points: :func:`with_plugin` puts the test plugin (``tests/plugins/sitecustomize.py``)
  on a command's PYTHONPATH when its environment asks for one of its effects (a slowdown,
  ``SLOW_TASK``, ``SLOW_PUBLISH``; a warning on import), so the command and the Dask
  workers it starts have it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from process_tools import session_processes

REPO = Path(__file__).resolve().parents[1]
STEP1 = str(REPO / "step1_pff_to_zarr.py")
STEP2 = str(REPO / "step2_dask_baseline.py")
RUN_SH = str(REPO / "run.sh")
PLUGINS = Path(__file__).resolve().parent / "plugins"
SLOW_TASK = "TEST_PLUGIN_SLOW_TASK_S"  # SECONDS: each step task sleeps first
SLOW_PUBLISH = "TEST_PLUGIN_SLOW_PUBLISH_S"  # SECONDS[:NAME_SUFFIX]: held before the rename


# --------------------------------------------------------------------------- trees


def tree_snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (and root): files by sha256, mode and mtime, directories
    by mode and mtime (a file created and removed again changes its directory's mtime)."""
    snap: dict[str, tuple] = {}
    for p in [root, *sorted(root.rglob("*"))]:
        st = p.lstat()
        key = str(p.relative_to(root))
        if stat.S_ISREG(st.st_mode):
            snap[key] = ("file", hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mode,
                         st.st_mtime_ns)
        else:
            snap[key] = ("other", st.st_mode, st.st_mtime_ns)
    return snap


def chunk_digests(store: Path) -> dict[str, str]:
    """sha256 of every chunk file (metadata differs: it records times and the mode)."""
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.rglob("*")) if p.is_file() and "/c/" in str(p)}


#: Group attributes (at any depth) that describe the run, not the data: times, speeds,
#: mode, the [cluster] section, where the L0 was, and the L0's size (its metadata holds the
#: configuration, so it differs by a few hundred bytes).
VOLATILE_ATTRS = frozenset({"created", "seconds", "mb_per_s", "mode", "cluster", "l0_path",
                            "l0_bytes", "l1_to_l0_ratio", "concurrent_products"})


def scrub(value: Any) -> Any:
    """``value`` without the keys of :data:`VOLATILE_ATTRS`, at any depth."""
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if k not in VOLATILE_ATTRS}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def assert_same_store(got: Path, want: Path) -> None:
    """Every chunk and array metadata file byte-identical; group attributes identical
    except the run's own (:data:`VOLATILE_ATTRS`: times, mode, cluster configuration)."""
    files = sorted(p.relative_to(want) for p in want.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(got) for p in got.rglob("*") if p.is_file())
    assert any(f.name != "zarr.json" for f in files)
    for rel in files:
        a, b = (got / rel).read_bytes(), (want / rel).read_bytes()
        if a == b:
            continue
        assert rel.name == "zarr.json", f"{rel} differs"
        meta_a, meta_b = json.loads(a), json.loads(b)
        assert meta_a.get("node_type") == "group", f"array metadata {rel} differs"
        assert scrub(meta_a) == scrub(meta_b), f"{rel}: attributes differ"


def store_arrays(store: Path) -> dict[str, object]:
    """Every array of a store (one flat group), read back (values, not bytes)."""
    import zarr

    group = zarr.open_group(str(store), mode="r")
    return {name: arr[...] for name, arr in group.arrays()}


def leftovers(directory: Path) -> list[str]:
    """What must not survive a failure: partial stores, their old copies and holder
    files, transient marks of L0 stores, and the output directory's run lock."""
    return sorted(str(p) for p in directory.rglob("*")
                  if p.name.endswith((".partial", ".old", ".owner", ".stale", ".transient"))
                  or p.name == ".panoseti-run.lock")


def permission_problems(root: Path, group_writable: bool) -> list[str]:
    """Entries under ``root`` that are world-writable, or group-writable against policy."""
    bad = []
    for p in [root, *root.rglob("*")]:
        mode = p.lstat().st_mode
        if stat.S_ISLNK(mode):
            continue
        if mode & stat.S_IWOTH:
            bad.append(f"{p}: world-writable ({stat.filemode(mode)})")
        if not group_writable and mode & stat.S_IWGRP:
            bad.append(f"{p}: group-writable ({stat.filemode(mode)}) without group_writable")
    return bad


# --------------------------------------------------------------------------- stderr


#: a progress line where stderr is not a terminal (runners.LineProgress)
PROGRESS_LINE = re.compile(r": +\d+% \(\d+/\d+ \w+\)$")


def error_lines(stderr: str) -> list[str]:
    """Lines of stderr that are not progress: tqdm's bars (redrawn with a carriage return)
    on a terminal, whole progress lines elsewhere."""
    return [line for line in stderr.splitlines()
            if line.strip() and "\r" not in line and "frame/s" not in line
            and not PROGRESS_LINE.search(line)]


def assert_one_error(stderr: str, prog: str, *needles: str) -> str:
    """Exactly one line on stderr, ``PROG: error: ...``, holding every needle."""
    lines = error_lines(stderr)
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    line = lines[0]
    assert line.startswith(f"{prog}: error: "), line
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


# --------------------------------------------------------------------------- processes


def assert_nothing_left(sid: int, grace_s: float = 5.0) -> None:
    """No process of session ``sid`` after a short grace (the kernel reaps asynchronously);
    whatever is left is killed by PID, then the test fails."""
    deadline = time.monotonic() + grace_s
    while session_processes(sid) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = session_processes(sid)
    for pid, _ in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left running: {left}"


def as_unprivileged(cmd: Sequence[str]) -> list[str]:
    """``cmd`` run so that file modes apply (root: without the DAC-override capabilities)."""
    if os.geteuid() != 0:
        return list(cmd)
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot make file modes apply")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--", *cmd]


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (SLOW_TASK, SLOW_PUBLISH)}
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir(exist_ok=True)
    env["TMPDIR"] = str(tmpdir)
    if sys.prefix != sys.base_prefix:  # the venv running the tests has the requirements
        env["VIRTUAL_ENV"] = sys.prefix
    env.update(extra)
    return with_plugin(env)


def with_plugin(env: dict[str, str]) -> dict[str, str]:
    """``env``, with the test plugin first on PYTHONPATH if ``env`` asks for any of its
    effects (a ``TEST_PLUGIN_*`` variable)."""
    if any(name.startswith("TEST_PLUGIN_") for name in env):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PLUGINS),
                                                          env.get("PYTHONPATH")]))
    return env


class Spawned:
    """A command in its own session; stopped (by PID) and checked on exit."""

    def __init__(self, cmd: Sequence[str], env: dict[str, str], umask: int = -1) -> None:
        self.proc = subprocess.Popen(list(cmd), env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     start_new_session=True, umask=umask)
        self.pid = self.proc.pid
        self.stdout = self.stderr = ""

    def __enter__(self) -> Spawned:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.proc.communicate()
        for pid, _ in session_processes(self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                self.finish()
                pytest.fail(f"exited ({self.proc.returncode}) before {what}:\n"
                            f"{self.stderr[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not reached within {timeout} s")
            time.sleep(0.02)

    def finish(self, timeout: float = 180) -> int:
        try:
            self.stdout, self.stderr = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self.stdout, self.stderr = self.proc.communicate()
            pytest.fail(f"did not finish within {timeout} s:\n{self.stderr[-3000:]}")
        return self.proc.returncode

    def find(self, needle: str) -> int | None:
        """PID of a process of this session whose command line holds ``needle``."""
        for pid, cmdline in session_processes(self.pid):
            if needle in cmdline:
                return pid
        return None


def run_cmd(cmd: Sequence[str], env: dict[str, str], umask: int = -1,
            timeout: float = 240) -> tuple[int, str, str]:
    """Run to the end in its own session; assert it left no process behind."""
    with Spawned(cmd, env, umask) as s:
        rc = s.finish(timeout)
        assert_nothing_left(s.pid)
    return rc, s.stdout, s.stderr


# --------------------------------------------------------------------------- disk full


@contextlib.contextmanager
def tmpfs(path: Path, size_kb: int) -> Iterator[Path]:
    """A ``size_kb`` tmpfs mounted at ``path`` (skips without the privilege to mount)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0755", "tmpfs",
                           str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory: Path, leave_bytes: int) -> Path:
    """A ballast file that leaves about ``leave_bytes`` free on ``directory``'s file system."""
    ballast = directory / "ballast"
    free = shutil.disk_usage(directory).free
    with open(ballast, "wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))
    return ballast
