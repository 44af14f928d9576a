"""Soak: many runs of run.sh on one generated night, each stopped by a random signal at a
random time, then one clean rerun; the night must come out as from a single clean run.

Not part of the default suite (it takes minutes): it runs only when PANOSETI_SOAK_RUNS is
set, e.g.::

    PANOSETI_SOAK_RUNS=20 bash tests/run_tests.sh tests/test_soak.py -n 0

Every interrupted run has ``--overwrite``, so each redoes the whole night and the signal
lands in real work (a step, the cluster start, a swap of a finished product).
PANOSETI_SOAK_SEED repeats a sequence (the seed in use is printed). Signals: SIGKILL to
run.sh's whole process group (what a job killer or a crashed node does), SIGTERM to
run.sh alone (``kill PID``), SIGINT to the process group (Ctrl-C at the terminal).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fault_tools import assert_same_store, leftovers  # noqa: E402
from process_tools import session_processes  # noqa: E402
from test_run_sh import RUN_SH, run, run_env, run_records, write_config  # noqa: E402

from panoseti_pipeline import run_bundle  # noqa: E402
from panoseti_pipeline import synthetic as synthetic_obs  # noqa: E402

RUNS = int(os.environ.get("PANOSETI_SOAK_RUNS", "0") or 0)
SIGNALS = ("KILL", "TERM", "INT")

pytestmark = [pytest.mark.soak, pytest.mark.skipif(
    not RUNS, reason="soak test: set PANOSETI_SOAK_RUNS (e.g. 20) to run it")]


def products(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*.zarr") if p.suffix == ".zarr"
                  and not any(part.endswith(".panoseti-meta") for part in p.parts))


def interrupted_run(args: list[str], env: dict[str, str], sig: str, after_s: float) -> int:
    """run.sh stopped by ``sig`` after ``after_s`` seconds; returns its exit status."""
    proc = subprocess.Popen([RUN_SH, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        proc.wait(timeout=after_s)
    except subprocess.TimeoutExpired:
        if sig == "TERM":
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, getattr(signal, f"SIG{sig}"))
    rc = proc.wait(timeout=300)
    deadline = time.monotonic() + 10  # the kernel may take a moment to reap
    while session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not session_processes(proc.pid), f"left by a SIG{sig}ed run.sh: " \
        f"{session_processes(proc.pid)}"
    return rc


def test_a_night_survives_random_signals_and_one_clean_rerun_finishes_it(tmp_path: Path
                                                                         ) -> None:
    seed = int(os.environ.get("PANOSETI_SOAK_SEED", random.randrange(1 << 30)))
    print(f"soak: {RUNS} runs, PANOSETI_SOAK_SEED={seed}")
    rng = random.Random(seed)
    night = synthetic_obs.make_observation(tmp_path / "night", frames_per_file=600,
                                           files_per_stream=2, products=("img16", "ph256"),
                                           faults=("missing_quabo", "partial_last"))
    config = write_config(tmp_path / "dask.toml", "dask")
    env = run_env(tmp_path, config)

    reference = tmp_path / "reference"
    t0 = time.monotonic()
    rc, _, stderr = run([str(night), str(reference)], env)
    clean_s = time.monotonic() - t0
    assert rc == 0, stderr[-3000:]

    out = tmp_path / "soaked"
    for k in range(RUNS):
        sig, after = rng.choice(SIGNALS), rng.uniform(0.2, 1.2 * clean_s)
        # --overwrite: every run has the whole night to redo (and products to swap), so
        # each signal lands in real work, not in a run that only skips finished products
        rc = interrupted_run(["--overwrite", str(night), str(out)], env, sig, after)
        print(f"soak run {k + 1}: SIG{sig} after {after:.1f} s -> exit {rc}")
        assert rc in (0, 1, 2, 130, -9), f"run {k + 1}: unexpected exit status {rc}"

    rc, _, stderr = run([str(night), str(out)], env)
    assert rc == 0, stderr[-3000:]
    assert all(e["status"] in ("ok", "skipped") for e in run_records(out)[-1]["inputs"])
    want = products(reference)
    got = products(out)
    assert [p.relative_to(out) for p in got] == [p.relative_to(reference) for p in want]
    for a, b in zip(got, want, strict=True):
        assert_same_store(a, b)
    (bundle,) = out.rglob("*.panoseti-meta")
    assert run_bundle.verify_bundle(bundle) == []
    assert not leftovers(out), leftovers(out)
    assert not list(out.rglob("*_L0.zarr")), "an L0 store was left"
