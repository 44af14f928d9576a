"""The whole pipeline on a Dask cluster against without one, on one machine.

Usage: python3 bench/bench_dask_vs_local.py [--mb 1024] [--files 4] [--pairs 3]
       [--products 1]

A generated .pffd run: ``--products`` streams (img16, modules 1..N) of ``--files`` seqno
files of ``--mb`` MB each, named as the DAQ names them (run.sh joins a stream's files into
one product). Per pair, alternated (the order flips each pair), ``./run.sh RUN OUT`` with
the shipped config.toml, once with ``use_dask = false``
and once with ``use_dask = true`` (a local cluster of one single-thread worker per CPU on
the loopback interface). Prints each run's seconds and the median of the pairs' speed
ratios (local seconds / Dask seconds: 1.0 = as fast; above 1, the cluster is faster).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import time
import tomllib
from pathlib import Path

import tomli_w
from benchlib import OUT, REPO

from panoseti_pipeline.runners import host_cpus as cpus


def observation(megabytes: int, files: int, products: int) -> Path:
    """A .pffd run of ``products`` generated streams (modules 1..N), made once and reused:
    run.sh joins each stream's seqno files into one product."""
    from panoseti_pipeline import synthetic

    run = (OUT / f"img16_{products}x{files}x{megabytes}MB" /
           "obs_bench.start_2024-07-25T04:34:46Z.runtype_sci-obs.pffd")
    for module in range(1, products + 1):
        if len(list(run.glob(f"*.module_{module}.seqno_*.pff"))) != files:
            run.mkdir(parents=True, exist_ok=True)
            print(f"generating {files} x {megabytes} MB of img16 module {module} in {run} "
                  "...", flush=True)
            for old in run.glob(f"*.module_{module}.seqno_*.pff"):
                old.unlink()
            synthetic.write_big_stream(run, megabytes, files, module=module, seed=module)
    return run


def config(path: Path, use_dask: bool) -> Path:
    """The shipped config.toml with ``use_dask`` set (and a loopback local cluster)."""
    document = tomllib.loads((REPO / "config.toml").read_text())
    document["cluster"].update(use_dask=use_dask, cluster_type="local", interface="lo",
                               local_workers=cpus(), local_threads_per_worker=1)
    path.write_text(tomli_w.dumps(document))
    return path


def run_sh(inputs: list[Path], out: Path, config_file: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, CONFIG_FILE=str(config_file))
    t0 = time.perf_counter()
    subprocess.run(["./run.sh", *map(str, inputs), str(out)], cwd=REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1024)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--products", type=int, default=1)
    args = parser.parse_args()
    run = observation(args.mb, args.files, args.products)
    work = OUT / "dask_vs_local"
    work.mkdir(parents=True, exist_ok=True)
    configs = {"local": config(work / "local.toml", False),
               "dask": config(work / "dask.toml", True)}
    run_sh(sorted(run.glob("*.seqno_0.pff"))[:1], work / "warm", configs["local"])  # byte code
    ratios = []
    for pair in range(args.pairs):
        order = ("local", "dask") if pair % 2 == 0 else ("dask", "local")
        seconds = {mode: run_sh([run], work / mode, configs[mode]) for mode in order}
        ratios.append(seconds["local"] / seconds["dask"])
        print(f"pair {pair + 1}: use_dask = false {seconds['local']:.2f} s, "
              f"use_dask = true {seconds['dask']:.2f} s, ratio {ratios[-1]:.3f}", flush=True)
    print(f"{args.products} product(s) of {args.files} x {args.mb} MB, {cpus()} CPUs: "
          f"Dask speed / local speed, median of {args.pairs} pairs = "
          f"{statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
