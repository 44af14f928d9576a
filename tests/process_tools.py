"""Process-tree checks shared by the tests that start run.sh and the steps."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# A test run started as a background job of a non-interactive shell (`cmd &`, nohup)
# inherits SIGINT ignored, and so would every run.sh it starts: bash cannot trap a signal
# ignored on entry, and the Ctrl-C tests would test nothing. With a Python handler here
# instead, the processes the tests start get SIGINT's default disposition again.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def session_processes(sid: int) -> list[tuple[int, str]]:
    """Live processes (not zombies) whose session or process group is ``sid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        state, pgrp, session = fields[0], int(fields[2]), int(fields[3])
        if state != "Z" and sid in (pgrp, session):
            with contextlib.suppress(OSError):
                found.append((int(entry.name), (entry / "cmdline").read_bytes()
                              .replace(b"\0", b" ").decode(errors="replace")))
    return found


# --------------------------------------------------------------------------- tagged


def tagged_processes(tag: str) -> list:
    """Live processes whose environment carries ``PANOSETI_TEST_TAG=tag``."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("PANOSETI_TEST_TAG") == tag and proc.status() != "zombie":
                found.append(proc)
    return found


def start_or_skip(start: Callable[[], T], unavailable: type[Exception], what: str,
                  tests: str) -> T:
    """``start()``, a test bed; where ``what`` cannot start here (``unavailable`` says
    why) the ``tests`` are skipped with that reason, except under CI (``CI`` set), where
    they must run: there it is a failure."""
    import pytest

    try:
        return start()
    except unavailable as err:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the {tests} tests, but {what} could not start: {err}")
        pytest.skip(f"{what} could not be started here: {err}")


def lingering(tag: str, more: Callable[[], list] | None = None, grace_s: float = 15.0) -> list:
    """Processes with ``tag`` (and ``more()``) still alive after up to ``grace_s``:
    closing is asynchronous, so they get a moment to end first."""
    deadline = time.monotonic() + grace_s
    while True:
        left = tagged_processes(tag) + (more() if more else [])
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def cmdline(proc: Any) -> list[str]:
    """A process's command line ([] once it is gone or not ours to read)."""
    import psutil

    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def described(procs: list) -> list[str]:
    """``PID command line`` of each process, for an assertion message."""
    return [f"{p.pid} {' '.join(cmdline(p))[:120]}" for p in procs]


def stop_by_pid(procs: list) -> None:
    """Kill the given processes (by PID) and reap them."""
    import psutil

    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=10)


def run_sh(*args: str | os.PathLike, config: Path,
           quicklook: bool = False) -> subprocess.CompletedProcess[str]:
    """run.sh ARGS with ``CONFIG_FILE=config``, to the end (10 min at most). Without
    ``quicklook``, with ``--no-quicklook``: the PNGs cost a matplotlib import and about a
    second per run, and only the tests of the quicklooks and index.html look at them."""
    flags = () if quicklook else ("--no-quicklook",)
    return subprocess.run(["bash", str(REPO / "run.sh"), *flags, *map(str, args)],
                          env={**os.environ, "CONFIG_FILE": str(config)},
                          capture_output=True, text=True, timeout=600)


def tagged_env(tag: str) -> dict[str, str]:
    """This environment, marked with ``tag`` and without the repository on PYTHONPATH."""
    env = {**os.environ, "PANOSETI_TEST_TAG": tag}
    env.pop("PYTHONPATH", None)
    return env


# --------------------------------------------------------------------------- manager

REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").is_dir() else sys.executable
MANAGER = str(REPO / "cluster_lifecycle_manager.py")


@dataclass
class ManagerProcess:
    """One cluster_lifecycle_manager.py subprocess a test started, and its output."""

    workdir: Path
    config: Path
    tag: str = field(default_factory=lambda: uuid.uuid4().hex)
    env: dict[str, str] = field(default_factory=dict)  # added to the tagged environment
    proc: subprocess.Popen | None = None
    files: list[Any] = field(default_factory=list)

    @property
    def scheduler_file(self) -> Path:
        return self.workdir / "scheduler.txt"

    def start(self, *extra: str) -> ManagerProcess:
        out = open(self.workdir / "manager.out", "w")  # noqa: SIM115 -- closed in stop()
        err = open(self.workdir / "manager.err", "w")  # noqa: SIM115
        self.files += [out, err]
        self.proc = subprocess.Popen(
            [PYTHON, MANAGER, str(self.config), str(self.scheduler_file), *extra],
            cwd=self.workdir, env={**tagged_env(self.tag), **self.env}, stdout=out,
            stderr=err)
        return self

    def wait_ready(self, timeout: float = 60.0) -> str:
        """The scheduler address, once the file and the manager's report lines are there."""
        import pytest

        deadline = time.monotonic() + timeout
        while not self.scheduler_file.exists():
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"manager exited {self.proc.returncode}: {self.stderr}")
            if time.monotonic() > deadline:
                pytest.fail(f"no scheduler file after {timeout} s: {self.stderr}")
            time.sleep(0.05)
        address = self.scheduler_file.read_text().splitlines()[0]
        while "stop with:" not in self.stdout and time.monotonic() < deadline:
            time.sleep(0.05)  # the file is written just before the lines are printed
        return address

    @property
    def credentials(self) -> str | None:
        """The TLS credentials directory named in the scheduler file (None: none)."""
        return self.scheduler_file.read_text().splitlines()[1] or None

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def descendants(self) -> list:
        import psutil

        assert self.proc is not None
        return psutil.Process(self.proc.pid).children(recursive=True)

    @property
    def stdout(self) -> str:
        return (self.workdir / "manager.out").read_text()

    @property
    def stderr(self) -> str:
        return (self.workdir / "manager.err").read_text()

    def stop(self) -> None:
        """Teardown: the manager and anything carrying its tag, by PID."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for f in self.files:
            f.close()
        stop_by_pid(tagged_processes(self.tag))


_FOREIGN_CLIENT = """
import sys
import distributed
try:
    distributed.Client(sys.argv[1], timeout=10, security=distributed.Security.temporary())
except OSError as err:
    print(f"{type(err).__name__}: {err}")
    sys.exit(3)
print("connected")
"""


def foreign_client_error(address: str) -> str:
    """The error of a client holding another cluster's credentials, in a process of its
    own: a refused handshake in this process can leave distributed's shared IO loop unable
    to start the next client's within its 10 s (seen on a loaded machine)."""
    done = subprocess.run([sys.executable, "-c", _FOREIGN_CLIENT, address], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 3, (done.returncode, done.stdout, done.stderr[-2000:])
    return done.stdout
