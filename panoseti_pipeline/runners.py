"""Where the steps' tasks run: threads of this process, or a Dask cluster.

Both steps cut their work into chunk-aligned tasks that read and write the stores
themselves and return small summaries. A runner maps a task function over argument
tuples and folds each summary as it completes, with a progress bar; the step code does
not care where the tasks ran, which is how local and cluster runs stay byte-identical.
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from panoseti_pipeline.errors import ClusterError

#: ``fold(index, summary)`` may return the progress it represents (e.g. frames); None = 1
Fold = Callable[[int, Any], "int | None"]


def cpus() -> int:
    """CPUs this process may use (the affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _bar(total: int, desc: str, unit: str, progress: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit != "task",
                disable=not progress, file=sys.stderr, leave=False)


class LocalRunner:
    """Tasks on a thread pool of this process (numpy and the codecs release the GIL)."""

    mode = "local"

    def __init__(self, threads: int | None = None, progress: bool = True) -> None:
        self.threads = threads or cpus()
        self.progress = progress

    @staticmethod
    def share(value: Any) -> Any:
        """``value`` as tasks should receive it (here: itself)."""
        return value

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple], desc: str, fold: Fold,
            total: int | None = None, unit: str = "task") -> None:
        """Run ``fn(*call)`` for every call; ``fold(i, result)`` as each one completes."""
        with _bar(total or len(calls), desc, unit, self.progress) as bar, \
                concurrent.futures.ThreadPoolExecutor(self.threads) as pool:
            futures = {pool.submit(fn, *c): i for i, c in enumerate(calls)}
            try:
                for fut in concurrent.futures.as_completed(futures):
                    bar.update(fold(futures[fut], fut.result()) or 1)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)


class DaskRunner:
    """Tasks on a Dask cluster; they read and write the stores on the shared file system."""

    mode = "dask"

    def __init__(self, client: Any, progress: bool = True) -> None:
        self.client = client
        self.progress = progress

    def share(self, value: Any) -> Any:
        """``value`` sent to every worker once; tasks receive it through the future."""
        return self.client.scatter(value, broadcast=True, hash=False)

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple], desc: str, fold: Fold,
            total: int | None = None, unit: str = "task") -> None:
        from distributed import as_completed

        futures = [self.client.submit(fn, *c, pure=False) for c in calls]
        index = {f.key: i for i, f in enumerate(futures)}
        with _bar(total or len(calls), desc, unit, self.progress) as bar:
            try:
                for fut in as_completed(futures):
                    bar.update(fold(index[fut.key], fut.result()) or 1)
                    fut.release()
            except concurrent.futures.CancelledError as err:  # e.g. the scheduler went away
                if self.client.status == "running":
                    self.client.cancel(futures)
                raise ClusterError(f"{desc}: a task was cancelled by the Dask cluster "
                                   f"({' '.join(str(err).split())}); is the cluster still "
                                   "running?") from None
            except BaseException:
                self.client.cancel(futures)
                raise


def runner_for(client: Any, threads: int | None, progress: bool) -> LocalRunner | DaskRunner:
    """A Dask runner when a client is given, else local threads."""
    return DaskRunner(client, progress) if client is not None else LocalRunner(threads, progress)
