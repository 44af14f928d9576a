"""Where the steps' tasks run (threads of this process, or a Dask cluster), and what a
task process keeps between tasks.

Both steps cut their work into chunk-aligned tasks (:mod:`panoseti_pipeline.chunking`)
that read and write the stores themselves and return small summaries. A runner maps a
task function over argument tuples and folds each summary as it completes, with a
progress bar; the step code does not care where the tasks ran, which is how local and
cluster runs stay byte-identical. Each task also reports where and when it ran (host,
process, thread, start, end); a step started by run.sh leaves those, with the worker
threads it had, in the file :data:`TASK_FILE_ENV` names, for the run's record.

A process that runs tasks (this one, or a long-lived Dask worker serving step 1 and
step 2 of many inputs in turn) is set up by :func:`prepare_process` before each task,
and each of its threads reuses its large buffers (:func:`thread_array`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from panoseti_pipeline.errors import ClusterError
from panoseti_pipeline.store import layout, publish
from panoseti_pipeline.store.safe_write import write_file

#: ``fold(index, summary)`` may return the progress it represents (e.g. frames); None = 1
Fold = Callable[[int, Any], "int | None"]


#: Set by run.sh for each step process when several products run locally at once: the
#: CPUs that step's share is (the products split the machine's instead of each taking all).
CPUS_ENV = "PANOSETI_CPUS"


def cpu_share() -> int | None:
    """The CPUs run.sh gave this step (``PANOSETI_CPUS``), or None: not one of several."""
    share = os.environ.get(CPUS_ENV, "")
    return int(share) if share.isdigit() and int(share) > 0 else None


def host_cpus() -> int:
    """CPUs of this machine that this process may run on (the affinity mask where the OS
    has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpus() -> int:
    """CPUs this process may use: :func:`host_cpus`, at most its :func:`cpu_share`."""
    return min(host_cpus(), cpu_share() or host_cpus())


# --------------------------------------------------------------------------- task processes


@dataclasses.dataclass(frozen=True)
class ProcessSettings:
    """How a step wants the processes that run its tasks set up (small, sent to workers).

    The compression thread count is worked out in the process itself: it depends on the
    CPUs and Dask threads of that process, not of the one that planned the tasks.
    """

    io_concurrency: int | None  # zarr's async I/O concurrency; None: the tasks skip zarr
    threads_per_task: int  # compression threads per concurrently running task; 0: all CPUs
    tasks_per_process: int  # tasks running at once; 0: the Dask worker's thread count
    group_writable: bool

    def compress_threads(self) -> int:
        """Compression threads for this process: zarr's pool serves every task thread."""
        if not self.threads_per_task:
            return cpus()
        tasks = self.tasks_per_process
        if not tasks:
            from distributed import get_worker

            try:
                tasks = get_worker().state.nthreads
            except ValueError:  # not inside a worker (e.g. the driver verifying)
                tasks = 1
        return self.threads_per_task * tasks


_setup_lock = threading.Lock()
_applied: dict[str, Any] = {}


def prepare_process(settings: ProcessSettings) -> None:
    """Zarr's concurrency and compression threads, and the umask, of this process (and,
    once, :func:`reuse_memory`).

    Applied whenever they differ from what this process last applied, so a long-lived
    worker running step 1, then step 2, then step 1 again gets each step's own settings.
    zarr sizes its compression thread pool at its first read or write in a process, so
    that pool keeps its first size (the concurrency and the umask follow each step).
    """
    with _setup_lock:
        if "memory" not in _applied:
            _applied["memory"] = reuse_memory()
        if settings.io_concurrency is not None:
            wanted = (settings.io_concurrency, settings.compress_threads())
            if _applied.get("zarr") != wanted:
                layout.configure_zarr(*wanted)
                _applied["zarr"] = wanted
        if _applied.get("umask") != settings.group_writable:
            publish.apply_permission_policy(settings.group_writable)
            _applied["umask"] = settings.group_writable


#: glibc ``mallopt`` parameters (malloc.h) and the values :func:`reuse_memory` sets
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64-bit: a chunk's blocks come from the heap
_TRIM_THRESHOLD = 64 << 20  # freed memory kept for reuse at the top of a heap, at most
_ARENA_MAX = 2  # heaps threads share (default 8 per core: each would keep its own)
_PR_SET_THP_DISABLE = 41  # prctl (linux/prctl.h)


def reuse_memory() -> bool:
    """Make this process reuse its memory block after block instead of faulting fresh
    zeroed pages in for every block (Linux with glibc; elsewhere nothing changes).

    * glibc maps a block over 128 kB (up to 32 MB, as it learns) on its own and unmaps it
      when freed, and trims freed memory at the top of each heap, so every numpy
      temporary, compressed chunk and read-back of every block faulted fresh pages in
      (e.g. 8.6 vs 1.7 ms to compare a block's headers with their template). Blocks up to
      32 MB now come from the heaps, and up to 64 MB of freed memory stays on top of each.
      Larger blocks are still mapped on their own (glibc's limit), e.g. Blosc's output
      for step 2's 32 MiB float32 chunks; keeping those too raised RSS above 600 MB.
      Threads share 2 heaps (glibc's default: up to 8 per core, each keeping its own
      freed memory): step 1 of 4 GB on 2 tasks peaked at 540-560 MB RSS with one heap
      per thread, 315 MB with 2, no slower.
    * numpy asks for transparent huge pages on large arrays, and a huge page is zeroed
      whole (2 MB) when first touched: with memory kept, that was 9% of step 1's CPU
      time (perf). Turned off for this process and those it starts
      (``PR_SET_THP_DISABLE`` is inherited).

    Together, on step 1 of 1 GB here: system time 1.65 -> 0.92 s, wall -13%; peak RSS
    rises by what is kept (bench/RESULTS.md). Returns whether both applied.
    """
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return False
    except (ValueError, OSError):  # not a GNU libc
        return False
    import ctypes

    libc = ctypes.CDLL(None)
    kept = bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
                and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
                and libc.mallopt(_M_ARENA_MAX, _ARENA_MAX))
    return kept and libc.prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0


_threads = threading.local()


def thread_array(name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised array in this thread's reusable buffer ``name``.

    Fresh large allocations are returned to the OS when freed, so every task would pay
    page faults on new memory again (measured ~0.15 s per 64 MB here; they also
    serialise a process's threads); reuse avoids it. Valid until this thread asks for
    ``name`` again.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    buf = getattr(_threads, name, None)
    if buf is None or buf.size < nbytes:
        buf = np.empty(nbytes + nbytes // 8, np.uint8)
        setattr(_threads, name, buf)
    return buf[:nbytes].view(dtype).reshape(shape)


# --------------------------------------------------------------------------- runners


#: run.sh tells its steps whether its own stderr is a terminal ("bar") or not ("lines"):
#: theirs is always the pipe to its log
PROGRESS_ENV = "PANOSETI_PROGRESS"


def _bar(total: int, desc: str, unit: str, progress: bool) -> Any:
    """A progress bar on a terminal; whole lines elsewhere (a redirected log, a SLURM
    ``-o`` file), which tqdm's carriage-return redraws would fill."""
    if progress and not _progress_on_terminal():
        return LineProgress(total, desc, unit)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit != "task",
                disable=not progress, file=sys.stderr, leave=False)


def _progress_on_terminal() -> bool:
    told = os.environ.get(PROGRESS_ENV, "")
    return told == "bar" if told in ("bar", "lines") else sys.stderr.isatty()


class LineProgress:
    """Progress as one line at about every 10 % of the work, the last at 100 %."""

    STEP = 0.1

    def __init__(self, total: int, desc: str, unit: str) -> None:
        self.total, self.desc, self.unit = max(total, 1), desc, unit
        self.done = 0
        self.shown = 0.0  # the fraction last shown

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int = 1) -> None:
        self.done += n
        fraction = min(self.done / self.total, 1.0)
        if fraction >= 1.0 or fraction - self.shown >= self.STEP - 1e-9:
            self.shown = fraction
            print(f"{self.desc}: {fraction:4.0%} ({self.done}/{self.total} {self.unit}s)",
                  file=sys.stderr, flush=True)


class LocalRunner:
    """Tasks on a thread pool of this process (numpy and the codecs release the GIL)."""

    mode = "local"

    def __init__(self, threads: int | None = None, progress: bool = True) -> None:
        self.threads = threads or cpus()
        self.progress = progress

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple], desc: str, fold: Fold,
            total: int | None = None, unit: str = "task") -> None:
        """Run ``fn(*call)`` for every call; ``fold(i, result)`` as each one completes."""
        tasks: list[dict[str, Any]] = []
        with _bar(total or len(calls), desc, unit, self.progress) as bar, \
                concurrent.futures.ThreadPoolExecutor(self.threads, "task") as pool:
            futures = {pool.submit(timed, fn, *c): i for i, c in enumerate(calls)}
            try:
                for fut in concurrent.futures.as_completed(futures):
                    result, task = fut.result()
                    tasks.append(task)
                    bar.update(fold(futures[fut], result) or 1)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
                # the pool is the machine: its CPUs, also when this step has a share of them
                record_tasks(tasks, self.mode, host_cpus(), f"local:{socket.gethostname()}")


class DaskRunner:
    """Tasks on a Dask cluster; they read and write the stores on the shared file system."""

    mode = "dask"

    def __init__(self, client: Any, progress: bool = True) -> None:
        self.client = client
        self.progress = progress

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple], desc: str, fold: Fold,
            total: int | None = None, unit: str = "task") -> None:
        from distributed import as_completed

        name = getattr(fn, "__name__", "task")  # the dashboard's name, not timed's
        futures = [self.client.submit(timed, fn, *c, key=f"{name}-{uuid.uuid4().hex}")
                   for c in calls]
        index = {f.key: i for i, f in enumerate(futures)}
        tasks: list[dict[str, Any]] = []
        threads = sum(self.client.nthreads().values())
        with _bar(total or len(calls), desc, unit, self.progress) as bar:
            try:
                for fut in as_completed(futures, loop=self.client.loop):  # not a default
                    result, task = fut.result()
                    tasks.append(task)
                    bar.update(fold(index[fut.key], result) or 1)
                    fut.release()
            except concurrent.futures.CancelledError as err:  # e.g. the scheduler went away
                if self.client.status == "running":
                    self.client.cancel(futures)
                raise ClusterError(f"{desc}: a task was cancelled by the Dask cluster "
                                   f"({' '.join(str(err).split())}); is the cluster still "
                                   "running?") from None
            except BaseException:
                self.cancel_and_wait(futures)
                raise
            finally:
                record_tasks(tasks, self.mode, threads, self.client.scheduler.address)

    def cancel_and_wait(self, futures: Sequence[Any], timeout_s: float = 120.0) -> None:
        """Cancel ``futures`` and wait until none of them still runs on a worker.

        Dask cannot stop a running task: cancelling only drops its result. A task still
        running would go on writing chunk files into the partial store the caller is about
        to remove (and re-create it), so the caller cleans up only after this returns.
        """
        keys = {f.key for f in futures}
        self.client.cancel(futures)
        deadline = time.monotonic() + timeout_s
        while self.client.status == "running" and time.monotonic() < deadline:
            running = self.client.run(_running_keys, keys, on_error="ignore")
            if not any(running.values()):
                return
            time.sleep(0.1)
        if self.client.status == "running":
            print(f"warning: {len(keys)} cancelled task(s) still ran on the Dask cluster "
                  f"after {timeout_s:.0f} s; they may leave files in the partial store",
                  file=sys.stderr)


def _running_keys(keys: set[Any], dask_worker: Any = None) -> list[Any]:
    """On a worker: which of ``keys`` are still executing (cancelled ones included)."""
    state = dask_worker.state
    return [ts.key for ts in (*state.executing, *state.long_running) if ts.key in keys]


# --------------------------------------------------------------------------- task records


#: run.sh names a file per step here: where and when the step's tasks ran (JSON)
TASK_FILE_ENV = "PANOSETI_TASK_FILE"


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, dict[str, Any]]:
    """``fn(*args)`` and where and when it ran (on the thread that runs the task).

    ``thread`` is the thread's name (``task_<n>`` of a local pool, the same in every map;
    a Dask worker's ``Dask-Default-Threads-...``),
    ``worker`` the Dask worker's address (None in local threads); times are epoch
    seconds of the host's clock.
    """
    start = time.time()
    result = fn(*args)
    end = time.time()
    return result, {"fn": getattr(fn, "__name__", "task"), "host": socket.gethostname(),
                    "pid": os.getpid(), "thread": threading.current_thread().name,
                    "worker": _worker_address(), "start": start, "end": end}


def _worker_address() -> str | None:
    distributed = sys.modules.get("distributed")  # imported where a Dask worker runs
    if distributed is None:
        return None
    try:
        return distributed.get_worker().address
    except ValueError:  # a thread of a process that is not a worker
        return None


def record_tasks(tasks: list[dict[str, Any]], mode: str, threads: int, pool: str) -> None:
    """Add ``tasks`` to the file :data:`TASK_FILE_ENV` names (if set): one JSON object
    per step process, ``{"pid", "mode", "pool", "threads", "tasks"}``.

    ``threads`` are the worker threads the tasks could have run on: the host's CPUs
    (local steps, also several side by side), or every thread of the Dask cluster;
    ``pool`` names them (the host, or the scheduler), so that steps sharing a pool count
    its threads once. A step maps
    several times (step 2: baseline, then subtraction): a file another process wrote is
    replaced, this process's extended. Not written: a warning, the step goes on.
    """
    path = os.environ.get(TASK_FILE_ENV)
    if not path:
        return
    try:
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
        except (FileNotFoundError, ValueError):
            record = {}
        if record.get("pid") != os.getpid():
            record = {"pid": os.getpid(), "mode": mode, "pool": pool, "threads": 0,
                      "tasks": []}
        record["threads"] = max(record["threads"], threads)
        record["tasks"] += sorted(tasks, key=lambda t: t["start"])
        write_file(path, json.dumps(record).encode())
    except OSError as err:
        print(f"warning: the task record {path} was not written: {err}", file=sys.stderr)


def runner_for(client: Any, threads: int | None, progress: bool) -> LocalRunner | DaskRunner:
    """A Dask runner when a client is given, else local threads. ``client`` may be a
    callable giving it (a connection made meanwhile: :class:`cluster.client.PendingClient`)."""
    if client is None:
        return LocalRunner(threads, progress)
    return DaskRunner(client() if callable(client) else client, progress)
