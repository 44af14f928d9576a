"""The whole pipeline on one generated img16 file (and a real one): phases against step 1.

Usage: python3 bench/bench_pipeline.py [--mb 1024] [--runs 3] [--real FILE.pff ...]

Per run, alternated, with the shipped config.toml (each command a fresh process, started
as run.sh starts it; Python's bytecode cache in .venv is warm after the first run):

* step 1 alone (``step1_pff_to_zarr.py FILE L0``) and step 2 alone on its L0
  (``step2_dask_baseline.py L0 L1``);
* ``./run.sh FILE OUT`` (quicklooks on) and ``./run.sh --no-quicklook FILE OUT``.

Prints medians: the quicklook phase (run.sh minus run.sh --no-quicklook), the rest (plan,
record, catalog, L0 removal: run.sh --no-quicklook minus both steps), the ratio
run.sh / step 1, and the bytes per input byte each phase writes and reads. ``--real``
files (e.g. a real PANOSETI ph256 file) get the L1/L0 size ratio of one run.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from benchlib import OUT, REPO, big_file


def du(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


#: A step as run.sh starts it: the interpreter and environment of env_bootstrap.sh (.venv,
#: its byte-code cache), then the script.
AS_RUN_SH = ['bash', '-c', 'source env_bootstrap.sh && bootstrap_python_env "$PWD" '
             '"$PWD/requirements.txt" 2>/dev/null && exec "$PYTHON" "$@"', 'bash']


def one_run(pff: Path, work: Path) -> dict[str, float]:
    """Every phase once, in fresh directories."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    l0, l1 = work / "L0.zarr", work / "L1.zarr"
    out = {"step1": timed([*AS_RUN_SH, "step1_pff_to_zarr.py", str(pff), str(l0),
                           "config.toml", "--quiet"]),
           "step2": timed([*AS_RUN_SH, "step2_dask_baseline.py", str(l0), str(l1),
                           "--quiet"])}
    out["run_sh"] = timed(["./run.sh", str(pff), str(work / "full")])
    out["run_sh_no_quicklook"] = timed(["./run.sh", "--no-quicklook", str(pff),
                                        str(work / "bare")])
    out["pff_bytes"], out["l0_bytes"], out["l1_bytes"] = (pff.stat().st_size, du(l0),
                                                          du(l1))
    out["look_bytes"] = du(l1 / "quicklook") if (l1 / "quicklook").is_dir() else du(l1)
    return out


def report(runs: list[dict[str, float]]) -> None:
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    quicklook = med["run_sh"] - med["run_sh_no_quicklook"]
    rest = med["run_sh_no_quicklook"] - med["step1"] - med["step2"]
    pff = med["pff_bytes"]
    print(f"medians of {len(runs)} runs (seconds)")
    for name, value in (("step 1", med["step1"]), ("step 2", med["step2"]),
                        ("quicklooks", quicklook), ("the rest", rest),
                        ("run.sh", med["run_sh"])):
        print(f"  {name:11} {value:7.2f} s  {value / med['step1']:5.2f}x step 1")
    per_run = ", ".join(f"{r['run_sh'] / r['step1']:.2f}" for r in runs)
    print(f"run.sh / step 1 = {med['run_sh'] / med['step1']:.2f} (per run: {per_run})")
    print("bytes per input (PFF) byte:")
    print(f"  step 1     reads 1.00, writes L0 {med['l0_bytes'] / pff:.3f}")
    print(f"  step 2     reads L0 {med['l0_bytes'] / pff:.3f}, writes L1 "
          f"{med['l1_bytes'] / pff:.3f}")
    print(f"  quicklooks read {med['look_bytes'] / pff:.5f} (the L1's stored look)")
    print(f"L1 / L0 = {med['l1_bytes'] / med['l0_bytes']:.3f}")
    print(json.dumps({k: round(v, 3) for k, v in med.items()}))


def real_ratio(pff: Path, work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
    subprocess.run(["./run.sh", "--keep-l0", "--no-quicklook", str(pff), str(work)],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    l0 = sum(du(p) for p in work.rglob("*_L0.zarr"))
    l1 = sum(du(p) for p in work.rglob("*_L1.zarr"))
    print(f"{pff.name}: L1 / L0 = {l1 / l0:.3f} ({l1 / 1e6:.2f} MB / {l0 / 1e6:.2f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--real", type=Path, nargs="*", default=[])
    args = parser.parse_args()
    os.environ.pop("CONFIG_FILE", None)  # the shipped config.toml
    pff = big_file(args.mb)
    work = OUT / "pipeline"
    timed(["./run.sh", "--no-quicklook", str(pff), str(work / "warm")])  # bytecode, page cache
    runs = [one_run(pff, work / "run") for _ in range(args.runs)]
    report(runs)
    for real in args.real:
        real_ratio(real, work / "real")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
