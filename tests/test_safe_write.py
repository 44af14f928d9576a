"""The pipeline's small files are created, never written through a link planted at their
name (store/safe_write.py: the run record, the run log, holder files; quicklook PNGs and
index.html are in test_quicklook.py)."""

from __future__ import annotations

import datetime as dt
import os
import tomllib
from pathlib import Path

import pytest

from panoseti_pipeline.driver import record, runlog
from panoseti_pipeline.store import safe_write


def test_the_run_record_never_overwrites_anything_at_its_name(tmp_path: Path) -> None:
    """Defect: the record's name was checked, then written: a link made in between (or a
    dangling link) had the record written into the link's target."""
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    now = dt.datetime.now(dt.timezone.utc)
    for s in range(30):  # every name the next half minute could give
        stamp = (now + dt.timedelta(seconds=s)).strftime("%Y%m%dT%H%M%SZ")
        (tmp_path / f"{record.RECORD_PREFIX}{stamp}.toml").symlink_to(tmp_path / "nothing")
        (tmp_path / f"{record.RECORD_PREFIX}{stamp}_2.toml").symlink_to(victim)
    path = record.write_run_record(tmp_path, {"run": {"exit_status": 0}})
    assert victim.read_text() == "mine" and not (tmp_path / "nothing").exists()
    assert path.name.endswith("_3.toml") and not path.is_symlink()
    assert tomllib.loads(path.read_text()) == {"run": {"exit_status": 0}}
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def test_the_run_log_is_never_written_through_a_link(tmp_path: Path) -> None:
    """Defect: the log was opened ``"ab"``, through a link at its name. Now it is a new
    file or none: a warning, and stderr still reaches the terminal."""
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    log = tmp_path / "run_log.log"
    log.symlink_to(victim)
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    os.write(src_w, b"run.sh: step 1\nrun.sh: done\n")
    os.close(src_w)
    runlog.tee(str(log), src_r, dst_w)
    os.close(dst_w)
    shown = os.read(dst_r, 1 << 16).decode()
    assert victim.read_text() == "mine" and log.is_symlink()
    assert f"run.sh: warning: no run log: {log}: File exists" in shown
    assert shown.endswith("run.sh: step 1\nrun.sh: done\n")
    # a new log: every line, timestamped
    src_r, src_w = os.pipe()
    os.write(src_w, b"line\n")
    os.close(src_w)
    fresh = tmp_path / "fresh.log"
    runlog.tee(str(fresh), src_r, os.open(os.devnull, os.O_WRONLY))
    assert fresh.read_text().endswith("Z line\n")


def test_write_file_replaces_a_link_and_exclusive_refuses_one(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    link = tmp_path / "x.png"
    link.symlink_to(victim)
    with pytest.raises(FileExistsError):
        safe_write.write_file(link, b"new", exclusive=True)
    safe_write.write_file(link, lambda f: f.write(b"new"))
    assert victim.read_text() == "mine" and link.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt", "x.png"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
