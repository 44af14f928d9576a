"""Holders of the output lock and of partial stores (store/ownership.py): two runs never
both hold one lock, and a live run is never judged gone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from panoseti_pipeline.store import ownership, publish

REPO = Path(__file__).resolve().parents[1]


def test_two_runs_taking_the_lock_at_once_never_both_get_it(tmp_path: Path) -> None:
    """Defect: the lock was created, then written; a run reading it empty in between
    judged it stale and took it over too (both held it in ~10 % of the rounds)."""
    me = ownership.Holder.of()
    parent = ownership.Holder.of(os.getppid())
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        for k in range(300):
            directory = tmp_path / str(k)
            directory.mkdir()
            won: list[ownership.Holder] = []

            def take(holder: ownership.Holder, directory: Path = directory,
                     won: list[ownership.Holder] = won) -> None:
                try:
                    ownership.acquire_lock(directory, holder)
                    won.append(holder)
                except ownership.LockHeld:
                    pass

            threads = [threading.Thread(target=take, args=(h,)) for h in (me, parent)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(won) == 1, f"round {k}: {len(won)} runs hold the lock"
            assert ownership.read(directory / ownership.LOCK_NAME) == won[0]
            assert sorted(p.name for p in directory.iterdir()) == [ownership.LOCK_NAME]
    finally:
        sys.setswitchinterval(previous)


def test_a_lock_without_a_holder_record_is_held_until_it_is_old(tmp_path: Path) -> None:
    lock = tmp_path / ownership.LOCK_NAME
    lock.touch()  # as a run of an earlier version left it between creating and writing
    with pytest.raises(ownership.LockHeld, match="holds no holder record"):
        ownership.acquire_lock(tmp_path, ownership.Holder.of())
    assert lock.read_bytes() == b""
    old = time.time() - 2 * ownership.UNREADABLE_STALE_S
    os.utime(lock, (old, old))
    notice = ownership.acquire_lock(tmp_path, ownership.Holder.of())
    assert notice and "took over" in notice
    assert ownership.read(lock) == ownership.Holder.of()


# --------------------------------------------------------------------------- hidepid

HIDDEN_GID = 54321  # the proc mount's gid= option: a group nobody of the test is in


def _hidepid_tools() -> None:
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("setpriv")):
        pytest.skip("needs root, unshare and setpriv (a private /proc mount with hidepid)")


@pytest.mark.parametrize("hidepid", [1, 2])
def test_a_live_run_of_another_user_under_hidepid_keeps_its_lock_and_partial(
        tmp_path: Path, hidepid: int) -> None:
    """Defect: "access denied" counted as "no such process": on a node with /proc mounted
    hidepid=1/2, another user's live run looked gone, its lock was taken over and its
    partial store removed. The check runs as root without capabilities in a mount
    namespace whose /proc is mounted hidepid (with gid= a group root is not in), where
    the other user's process is closed (1) or invisible (2), as it is for any user."""
    _hidepid_tools()
    other = subprocess.Popen(["setpriv", "--reuid", "65534", "--regid", "65534",
                              "--clear-groups", "sleep", "120"])
    try:
        deadline = time.monotonic() + 10
        while os.stat(f"/proc/{other.pid}").st_uid != 65534:  # setpriv has exec'd sleep
            assert time.monotonic() < deadline
            time.sleep(0.01)
        holder = ownership.Holder.of(other.pid)
        ownership.claim(tmp_path / ownership.LOCK_NAME, holder)
        final = tmp_path / "x_L1.zarr"
        partial = tmp_path / "x_L1.zarr.aaaa.partial"
        partial.mkdir()
        ownership.claim(tmp_path / "x_L1.zarr.aaaa.owner", holder)
        check = (
            "import json, sys; from pathlib import Path\n"
            "from panoseti_pipeline.store import ownership, publish\n"
            "d = Path(sys.argv[1])\n"
            "try:\n"
            "    ownership.acquire_lock(d, ownership.Holder.of()); lock = 'taken'\n"
            "except ownership.LockHeld as err:\n"
            "    lock = str(err)\n"
            "print(json.dumps([lock, publish.clear_stale(d / 'x_L1.zarr')]))\n")
        script = (f"mount -t proc -o hidepid={hidepid},gid={HIDDEN_GID} proc /proc && "
                  f'exec setpriv --bounding-set -all "$@"')
        done = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
             sys.executable, "-c", check, str(tmp_path)],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        assert done.returncode == 0, done.stderr
        lock, notices = json.loads(done.stdout)
        assert lock.startswith(f"{tmp_path}: another run.sh writes here (pid {other.pid} ")
        assert ownership.read(tmp_path / ownership.LOCK_NAME) == holder
        assert partial.is_dir() and final.name not in os.listdir(tmp_path)
        assert any("left alone" in n for n in notices)
    finally:
        other.kill()
        other.wait()
    # once that run is gone, both are cleared
    assert publish.clear_stale(tmp_path / "x_L1.zarr") and not partial.exists()
