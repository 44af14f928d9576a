"""Atomic publishing of product stores, and the facts about them on disk.

A product is written as ``<final>.<id>.partial`` next to its final path (same file
system, so the rename is atomic) and renamed into place only when complete and verified
(:func:`publishing`): a root document with the right ``processing_level`` under the final
name means complete (:func:`is_published`). What killed runs left (partial stores, a
product half swapped, an L0 store marked transient that was to be removed after step 2,
:func:`hold_transient`) is cleared before a rerun, but only when the run that held it is
gone (:func:`clear_stale`); nothing unmarked is ever removed, and a link is unlinked,
never followed. Files follow the caller's umask, never world-writable, group-writable
exactly when configured (:func:`permission_umask`).

``run.sh``'s planner calls these for every input and must start fast, so this module
imports no zarr (0.7 s): it reads the root ``zarr.json`` directly.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import functools
import glob
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from panoseti_pipeline.errors import PipelineError, StoreError
from panoseti_pipeline.store import ownership

PARTIAL_SUFFIX = ".partial"
OLD_SUFFIX = ".old"
OWNER_SUFFIX = ".owner"
TRANSIENT_SUFFIX = ".transient"


def is_published(path: str | os.PathLike, level: str) -> bool:
    """True when a complete product of ``level`` ("L0", "L1") sits at ``path``."""
    try:
        with open(Path(path) / "zarr.json", encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("attributes", {}).get("processing_level") == level


def clear_stale(final: str | os.PathLike, released: ownership.Holder | None = None
                ) -> list[str]:
    """Remove what killed runs left beside ``final``; return a notice for each.

    A run writing ``final`` holds ``<final>.<id>.owner`` (:mod:`.ownership`) while its
    ``<final>.<id>.partial`` store and, during the swap, ``<final>.<id>.old`` (the product
    it replaces) exist. Of a holder that is gone: the partial store is removed; an old
    product is removed when a product is in place, else renamed back to ``final``. A
    store a run made only to read and remove (``<final>.<id>.transient``,
    :func:`hold_transient`) is removed with its mark once that run is gone, or when that
    run, ``released``, is done with it (silently). What a live run holds -- or a run on
    another host, which cannot be checked from here -- is left alone.
    """
    final = Path(final)
    notices = []
    ids = {p.name[len(final.name) + 1:].rsplit(".", 1)[0]
           for suffix in (PARTIAL_SUFFIX, OLD_SUFFIX, OWNER_SUFFIX)
           for p in final.parent.glob(f"{glob.escape(final.name)}.*{suffix}")}
    for run_id in sorted(ids):
        owner, partial, old = (final.with_name(f"{final.name}.{run_id}{suffix}")
                               for suffix in (OWNER_SUFFIX, PARTIAL_SUFFIX, OLD_SUFFIX))
        if owner.exists() and not ownership.is_stale(owner):
            holder = ownership.read(owner)
            notices.append(f"{partial}: left alone, a run that may still be writing it "
                           f"holds it ({holder.describe() if holder else owner})")
            continue
        if os.path.lexists(partial):
            remove_entry(partial)
            notices.append(f"{partial}: removed the partial store of an interrupted run")
        if os.path.lexists(old):
            if os.path.lexists(final):
                remove_entry(old)
                notices.append(f"{old}: removed the product an interrupted run had replaced")
            else:
                old.rename(final)
                notices.append(f"{final}: put back the product an interrupted run was "
                               "replacing")
        with contextlib.suppress(FileNotFoundError):
            owner.unlink()
    for mark in _transient_marks(final):
        ours = released is not None and ownership.read(mark) == released
        if not (ours or ownership.is_stale(mark)):
            continue
        if any(is_published(final, level) for level in ("L0", "L1")):
            remove_entry(final)
            if not ours:
                notices.append(f"{final}: removed the store a stopped run made to read once "
                               "and remove (it had not removed it yet)")
        mark.unlink(missing_ok=True)
    return notices


def hold_transient(final: str | os.PathLike, holder: ownership.Holder | None) -> list[str]:
    """Before a run makes (or reuses) the L0 store ``final``: record whether it is
    transient, to be removed once step 2 has read it, or kept; return notices.

    ``holder`` (run.sh) will remove it: ``<final>.<id>.transient`` names it, so that if
    that run stops first, a later run knows the store was left unfinished
    (:func:`clear_stale`). ``None``: the run keeps it (``--keep-l0``). A store already
    there without a mark was kept by an earlier run: it is used and stays. A stopped
    run's mark is taken over (or dropped when the store is kept now), its store used.
    """
    final = Path(final)
    marks = _transient_marks(final)
    for mark in marks:
        if not ownership.is_stale(mark):
            other = ownership.read(mark)
            raise StoreError(f"{final}: another run uses this L0 store "
                             f"({other.describe() if other else mark}); give each run its "
                             "own L0 directory (--l0-dir)")
    there = is_published(final, "L0")
    notices = []
    if there and not marks:
        notices.append(f"{final}: an L0 store an earlier run kept (--keep-l0): used, and it "
                       "stays")
    elif holder is not None:
        ownership.claim(final.with_name(f"{final.name}.{uuid.uuid4().hex[:12]}"
                                        f"{TRANSIENT_SUFFIX}"), holder)
    elif there:
        notices.append(f"{final}: the L0 store a stopped run left is kept now (--keep-l0)")
    for mark in marks:  # after the new mark: a kill in between leaves one or the other
        mark.unlink(missing_ok=True)
    return notices


def is_transient(final: str | os.PathLike) -> bool:
    """Whether ``final`` is a store a run made to read once and remove (marked so)."""
    return bool(_transient_marks(Path(final)))


def _transient_marks(final: Path) -> list[Path]:
    return sorted(final.parent.glob(f"{glob.escape(final.name)}.*{TRANSIENT_SUFFIX}"))


@contextlib.contextmanager
def publishing(final: str | os.PathLike, level: str, overwrite: bool = False
               ) -> Iterator[Path]:
    """Yield a temporary store path; on success rename it to ``final``, else remove it.

    With ``overwrite`` an existing ``final`` is replaced only if it is a published product
    of ``level``: anything else there (a directory of raw data given as the output by
    mistake, or made while this run worked) is refused, never removed. See :func:`staged`.
    """
    final = Path(final)
    with staged(final, functools.partial(_replace_problem, final, level, overwrite),
                "the store") as tmp:
        yield tmp


@contextlib.contextmanager
def staged(final: Path, replace_problem: Callable[[], str | None], what: str
           ) -> Iterator[Path]:
    """Yield ``<final>.<id>.partial`` to write ``what`` into; on success rename it to
    ``final``, else remove it.

    The directory sits next to ``final`` (same file system, so the rename is atomic) and
    is held by this process (``<final>.<id>.owner``, :func:`clear_stale`). Whatever is at
    ``final`` is checked with ``replace_problem`` (None: it may be replaced) on entry and
    again just before the rename; the old one is moved aside and deleted only once the
    new one is in place.
    """
    problem = replace_problem()
    if problem:
        raise StoreError(problem)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreError(f"{final.parent}: cannot create output directory "
                         f"({err.strerror})") from None
    if not os.access(final.parent, os.W_OK | os.X_OK):
        raise StoreError(f"{final.parent}: output directory is not writable")
    run_id = uuid.uuid4().hex[:12]
    owner = final.with_name(f"{final.name}.{run_id}{OWNER_SUFFIX}")
    tmp = final.with_name(f"{final.name}.{run_id}{PARTIAL_SUFFIX}")
    ownership.claim(owner)
    try:
        yield tmp
        swap_into_place(tmp, final, replace_problem)
    except BaseException as err:
        try:
            wait_for_pending_writes()  # else writes still in flight re-create the partial
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if _is_write_failure(err, tmp):  # e.g. disk full: name the store, not "errno 28"
            raise StoreError(f"{final}: cannot write {what}: {err.strerror or err}; "
                             f"nothing was published (its partial copy was removed)"
                             ) from err
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            owner.unlink()


def _replace_problem(final: Path, level: str, overwrite: bool) -> str | None:
    """Why ``final`` may not be (re)placed by a new product of ``level``, or None."""
    if not (final.exists() or final.is_symlink()):
        return None
    if not is_published(final, level):
        return (f"{final}: exists and is not an {level} store written by this pipeline; "
                "refusing to replace it (choose another output)")
    if not overwrite:
        return f"{final}: exists (use --overwrite to replace it)"
    return None


def swap_into_place(tmp: Path, final: Path, replace_problem: Callable[[], str | None]
                    ) -> None:
    """Rename ``tmp`` (``<name>.<id>.partial``) to ``final``, checking again just before
    that whatever is at ``final`` now may be replaced (``replace_problem()`` is None); an
    old product there is kept as ``<name>.<id>.old`` until the rename succeeded."""
    problem = replace_problem()
    if problem:
        raise StoreError(f"{problem} (found when publishing)")
    if not (final.exists() or final.is_symlink()):
        tmp.rename(final)
        return
    old = tmp.with_name(tmp.name.removesuffix(PARTIAL_SUFFIX) + OLD_SUFFIX)
    final.rename(old)
    try:
        tmp.rename(final)
    except BaseException:
        old.rename(final)  # put the previous product back under its name
        raise
    remove_entry(old)


def remove_entry(path: Path) -> None:
    """Remove what is at ``path``: a symbolic link is unlinked, never followed (a product
    linked from elsewhere loses the link, its target is not ours); a directory goes whole."""
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path)


def wait_for_pending_writes(timeout_s: float = 20.0) -> None:
    """Wait (bounded) for zarr I/O still in flight in this process.

    When one chunk write of an ``array[a:b] = ...`` fails (e.g. disk full), zarr raises at
    once while the other chunk writes of that call go on in its I/O thread; a partial store
    removed before they end is re-created by them (measured: a disk-full step 1 left one).
    Call this before removing a store after an error. Never from zarr's own loop thread.
    """
    try:
        from zarr.core import sync as zarr_sync

        loop = zarr_sync.loop[0]
    except (ImportError, AttributeError, IndexError):
        return
    if loop is None or not loop.is_running() or loop.is_closed():
        return
    import asyncio  # zarr's already; not at the top: run.sh's driver calls need none (40 ms)

    async def drain() -> None:
        me = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)

    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(drain(), loop).result(timeout_s + 5)


_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def _is_write_failure(err: BaseException, tmp: Path) -> bool:
    """An OSError about the store being written (not about an input file)."""
    if not isinstance(err, OSError) or isinstance(err, PipelineError):
        return False
    if err.filename:
        return str(err.filename).startswith(str(tmp))
    return err.errno in _OUTPUT_ERRNOS


def store_bytes(path: str | os.PathLike) -> int:
    """Bytes of the files of a directory store (for compression and size ratios)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def permission_umask(group_writable: bool, current: int) -> int:
    """The pipeline's umask policy applied to ``current``.

    Files keep the caller's umask but are never world-writable; group-writable exactly
    when configured.
    """
    mask = current | 0o002
    return mask & ~0o020 if group_writable else mask | 0o020


def apply_permission_policy(group_writable: bool) -> int:
    """Set this process's umask by :func:`permission_umask`; return the new umask."""
    mask = permission_umask(group_writable, os.umask(0))
    os.umask(mask)
    return mask


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
