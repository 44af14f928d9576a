"""How busy a night keeps the cluster: run.sh on a night of 8 products on the loopback
SSH cluster (2 hosts x 2 workers x 1 thread), the utilization its run record says.

Usage: python3 bench/bench_utilization.py [--frames 6000] [--in-flight 0 1]

Starts a throwaway sshd on 127.0.0.1 and 127.0.0.2 (tests/sshd_testbed.py; needs
openssh-server), generates a .pffd night of img16 and ph256 for modules 1-4 (8 products,
``--frames`` per file, 2 seqno files each; the shipped config's chunks and tasks, or
``--shard-factor`` time chunks per task), and runs ``./run.sh --no-quicklook`` on it once
per value of ``--in-flight`` (``[run] concurrent_products``; 0 = one per worker thread,
here 4). Prints the run record's ``[utilization]`` (busy worker-thread seconds / (4
threads x the time from the first task's start to the last task's end)) and the whole
run's seconds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import tomli_w
from benchlib import OUT, REPO, loopback_sshd

HOSTS = ["127.0.0.1", "127.0.0.2"]


def night(frames: int) -> Path:
    """The generated night, made once and reused."""
    from panoseti_pipeline import synthetic

    root = OUT / f"night_8_products_{frames}"
    found = sorted(root.glob("*.pffd"))
    if found:
        return found[0]
    print(f"generating a night of 8 products in {root} ...", flush=True)
    return synthetic.make_observation(root, modules=(1, 2, 3, 4),
                                      products=("img16", "ph256"), frames_per_file=frames,
                                      files_per_stream=2)


def config(path: Path, bed: Any, in_flight: int,
           shard_factor: int | None) -> Path:
    document = tomllib.loads((REPO / "config.toml").read_text())
    document["cluster"].update(use_dask=True, cluster_type="ssh", ssh_hosts=HOSTS,
                               ssh_workers_per_host=2, ssh_threads_per_worker=1,
                               ssh_memory_per_worker="2GB",
                               startup_timeout_s=60.0, **bed.cluster_keys(sys.executable))
    if shard_factor is not None:  # smaller tasks than the shipped ones
        document["pff_to_zarr"].update(shard_factor=shard_factor)
        document["baseline_subtract"].update(shard_factor=shard_factor)
    document["run"]["concurrent_products"] = in_flight
    path.write_text(tomli_w.dumps(document))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=6000)
    parser.add_argument("--in-flight", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--shard-factor", type=int, default=None,
                        help="time chunks per task in both steps (default: the shipped 64)")
    args = parser.parse_args()
    obs = night(args.frames)
    with loopback_sshd("bench_utilization") as (tmp, bed):
        for in_flight in args.in_flight:
            out = tmp / f"out_{in_flight}"
            env = dict(os.environ, CONFIG_FILE=str(config(tmp / f"c{in_flight}.toml",
                                                          bed, in_flight,
                                                          args.shard_factor)))
            t0 = time.perf_counter()
            done = subprocess.run(["./run.sh", "--no-quicklook", str(obs), str(out)],
                                  cwd=REPO, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"run.sh failed ({done.returncode}):\n{done.stderr[-3000:]}")
            seconds = time.perf_counter() - t0
            (record,) = out.glob("run_record_*.toml")
            u = tomllib.loads(record.read_text())["utilization"]
            print(f"concurrent_products = {in_flight}: utilization {u['value']:.3f} "
                  f"(busy {u['busy_thread_s']:.1f} thread-s / {u['threads']} threads x "
                  f"{u['wall_s']:.1f} s; {u['tasks']} tasks); run.sh {seconds:.1f} s",
                  flush=True)
            shutil.rmtree(out)


if __name__ == "__main__":
    main()
