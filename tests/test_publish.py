"""Publishing a product: nothing not ours is removed, and what killed runs left is cleared
only when the run that held it is gone (store/publish.py, store/ownership.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from panoseti_pipeline.errors import StoreError
from panoseti_pipeline.store import ownership, publish


def fake_product(path: Path, level: str, payload: str = "x") -> Path:
    path.mkdir(parents=True)
    (path / "zarr.json").write_text(json.dumps({"attributes": {"processing_level": level}}))
    (path / "payload").write_text(payload)
    return path


def dead_holder() -> ownership.Holder:
    """The holder record of a process that has ended (its pid is free or reused)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    holder = ownership.Holder.of(proc.pid)
    proc.wait()
    assert holder.started > 0 and holder.alive() is False
    return holder


def test_a_directory_made_at_the_final_name_during_the_run_is_never_removed(
        tmp_path: Path) -> None:
    """Defect: the name was checked on entry only; the swap moved aside and deleted
    whatever appeared there meanwhile (a directory of raw data)."""
    final = tmp_path / "x_L0.zarr"
    for overwrite in (False, True):
        with pytest.raises(StoreError, match="not an L0 store written by this pipeline"):
            with publish.publishing(final, "L0", overwrite=overwrite) as tmp:
                fake_product(tmp, "L0")
                final.mkdir()
                (final / "obs.pff").write_bytes(b"raw data")
        assert (final / "obs.pff").read_bytes() == b"raw data"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["x_L0.zarr"]  # no partial/owner
        (final / "obs.pff").unlink()
        final.rmdir()


def test_a_product_published_meanwhile_is_replaced_only_with_overwrite(tmp_path: Path) -> None:
    final = tmp_path / "x_L0.zarr"
    with pytest.raises(StoreError, match="use --overwrite"):
        with publish.publishing(final, "L0") as tmp:
            fake_product(tmp, "L0", "new")
            fake_product(final, "L0", "other run")
    assert (final / "payload").read_text() == "other run"
    with publish.publishing(final, "L0", overwrite=True) as tmp:
        fake_product(tmp, "L0", "new")
    assert (final / "payload").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["x_L0.zarr"]


def test_a_live_runs_partial_is_left_alone_a_dead_runs_is_removed(tmp_path: Path) -> None:
    """Defect: a rerun removed every ``<final>.*.partial``, a live run's included."""
    final = tmp_path / "x_L1.zarr"
    live = fake_product(tmp_path / "x_L1.zarr.aaaa.partial", "L1")
    ownership.claim(tmp_path / "x_L1.zarr.aaaa.owner")  # this process: alive
    dead = fake_product(tmp_path / "x_L1.zarr.bbbb.partial", "L1")
    ownership.claim(tmp_path / "x_L1.zarr.bbbb.owner", dead_holder())
    orphan = fake_product(tmp_path / "x_L1.zarr.cccc.partial", "L1")  # holder never written
    notices = publish.clear_stale(final)
    assert live.exists() and (tmp_path / "x_L1.zarr.aaaa.owner").exists()
    assert not dead.exists() and not (tmp_path / "x_L1.zarr.bbbb.owner").exists()
    assert not orphan.exists()
    assert any("left alone" in n and str(live) in n for n in notices)
    assert sum("removed the partial store" in n for n in notices) == 2


def test_a_run_on_another_host_is_left_alone(tmp_path: Path) -> None:
    final = tmp_path / "x_L1.zarr"
    partial = fake_product(tmp_path / "x_L1.zarr.dddd.partial", "L1")
    ownership.claim(tmp_path / "x_L1.zarr.dddd.owner",
                    ownership.Holder("elsewhere.example", 1, 1.0e9))
    assert "left alone" in publish.clear_stale(final)[0]
    assert partial.exists()


def test_a_product_half_swapped_by_a_killed_run_is_put_back(tmp_path: Path) -> None:
    """Defect: a kill between the two renames left ``<final>.<id>.old`` for ever (and no
    product under the final name)."""
    final = tmp_path / "x_L1.zarr"
    fake_product(tmp_path / "x_L1.zarr.eeee.old", "L1", "previous")
    fake_product(tmp_path / "x_L1.zarr.eeee.partial", "L1", "new, never published")
    ownership.claim(tmp_path / "x_L1.zarr.eeee.owner", dead_holder())
    publish.clear_stale(final)
    assert (final / "payload").read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["x_L1.zarr"]
    # killed after the second rename: the new product is in place, the old one goes
    fake_product(tmp_path / "x_L1.zarr.ffff.old", "L1", "previous")
    ownership.claim(tmp_path / "x_L1.zarr.ffff.owner", dead_holder())
    publish.clear_stale(final)
    assert (final / "payload").read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["x_L1.zarr"]


def test_the_output_lock(tmp_path: Path) -> None:
    me = ownership.Holder.of()
    assert ownership.acquire_lock(tmp_path, me) is None
    lock = tmp_path / ownership.LOCK_NAME
    with pytest.raises(ownership.LockHeld, match=f"pid {me.pid} on {me.host}"):
        ownership.acquire_lock(tmp_path, dead_holder())
    assert ownership.read(lock) == me
    assert not ownership.release(lock, dead_holder())  # not its lock: kept
    assert ownership.release(lock, me) and not lock.exists()
    # a stale lock (its process gone on this host) is taken over, with a notice
    gone = dead_holder()
    ownership.claim(lock, gone)
    notice = ownership.acquire_lock(tmp_path, me)
    assert notice and "took over" in notice and f"pid {gone.pid}" in notice
    assert ownership.read(lock) == me
    assert [p.name for p in tmp_path.iterdir()] == [ownership.LOCK_NAME]


def test_a_linked_product_is_replaced_by_unlinking_the_link(tmp_path: Path) -> None:
    """Defect: with --overwrite the swap renamed a symlinked product to ``.old`` and then
    failed to rmtree the link (``OSError [Errno None]``), and so did every later run's
    clear_stale. The link goes; the store it pointed to is not ours and stays."""
    elsewhere = fake_product(tmp_path / "elsewhere" / "x_L1.zarr", "L1", "linked")
    out = tmp_path / "out"
    out.mkdir()
    final = out / "x_L1.zarr"
    final.symlink_to(elsewhere)
    with publish.publishing(final, "L1", overwrite=True) as tmp:
        fake_product(tmp, "L1", "new")
    assert not final.is_symlink() and (final / "payload").read_text() == "new"
    assert (elsewhere / "payload").read_text() == "linked"
    assert [p.name for p in out.iterdir()] == ["x_L1.zarr"]
    # a killed run's half swap of a linked product: the link is put back, or unlinked
    old = out / "x_L1.zarr.abcd.old"
    old.symlink_to(elsewhere)
    ownership.claim(out / "x_L1.zarr.abcd.owner", dead_holder())
    assert publish.clear_stale(final) == [f"{old}: removed the product an interrupted run "
                                          "had replaced"]
    assert [p.name for p in out.iterdir()] == ["x_L1.zarr"]
    assert (elsewhere / "payload").read_text() == "linked"


def test_only_a_transient_l0_is_ever_removed_and_only_by_its_run_or_once_it_is_gone(
        tmp_path: Path) -> None:
    """An L0 store run.sh reads once and removes is marked transient before step 1
    (``<final>.<id>.transient``, naming run.sh); a kept one has no mark and is never
    removed (defect: a plain rerun deleted the L0 stores --keep-l0 had kept)."""
    me = ownership.Holder.of()
    final = tmp_path / "x_L0.zarr"
    marks = lambda: sorted(tmp_path.glob("x_L0.zarr.*.transient"))  # noqa: E731
    assert publish.hold_transient(final, me) == []  # before step 1 made it
    fake_product(final, "L0")
    assert publish.is_transient(final) and ownership.read(marks()[0]) == me
    assert publish.clear_stale(final) == [] and final.exists()  # its run lives
    assert publish.clear_stale(final, released=me) == []  # its run is done with it
    assert list(tmp_path.iterdir()) == []
    # kept by an earlier run: used and left alone, whoever clears
    fake_product(final, "L0", "kept")
    assert "an L0 store an earlier run kept" in publish.hold_transient(final, me)[0]
    assert marks() == []
    assert publish.clear_stale(final, released=me) == [] and final.exists()
    # a stopped run's transient L0: removed ...
    ownership.claim(tmp_path / "x_L0.zarr.dead.transient", dead_holder())
    assert "removed the store a stopped run made" in publish.clear_stale(final)[0]
    assert list(tmp_path.iterdir()) == []
    # ... or taken over by a run that uses it, or kept by one that keeps its L0
    fake_product(final, "L0")
    ownership.claim(tmp_path / "x_L0.zarr.dead.transient", dead_holder())
    assert publish.hold_transient(final, me) == []
    assert [ownership.read(m) for m in marks()] == [me]
    marks()[0].unlink()
    ownership.claim(tmp_path / "x_L0.zarr.dead.transient", dead_holder())
    assert "kept now" in publish.hold_transient(final, None)[0]
    assert marks() == [] and final.exists()
