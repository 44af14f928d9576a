"""Reading an L0 store of ours: zarr vs the pipeline's own shard reader, same files.

Usage: python3 bench/bench_l0_read.py [--mb 1024] [--repeats 3]

On the L0 store of a generated img16 file (made once with step 1, as
``bench_step2.py`` makes it), measures in child processes, alternating, in one run:

* ``images`` read whole, ``array[:]`` (zarr) vs ``ShardedFrames[:]``;
* ``images`` read chunk by chunk on as many threads as step 2's tasks use;
* every per-frame array of step 2's L0 read, chunk by chunk on those threads, through
  ``layout.read_frames`` (what each of step 2's apply chunks does).

Prints the best wall time of each and the ratio zarr / own reader (> 1: ours faster),
after checking that both read equal values.
"""

from __future__ import annotations

import argparse
import os

from bench_step2 import bench_l0
from benchlib import run_child

READ = """
import concurrent.futures, hashlib, json, os, sys, time
import numpy as np
from panoseti_pipeline import runners
from panoseti_pipeline.step2 import l0_input
from panoseti_pipeline.store import layout
from panoseti_pipeline.store.shard_reader import ShardedFrames, frames_of

path, reader, how = sys.argv[1:4]
runners.prepare_process(runners.ProcessSettings(4, 0, 0, False))  # as step 2 does
info = l0_input.inspect_l0(path)
group = layout.open_product(path, "L0")
names = ["images"] if how != "all arrays" else ["images", *info.carried]
arrays = {n: frames_of(group[n]) if reader == "own" else group[n] for n in names}
assert all(isinstance(a, ShardedFrames) == (reader == "own") for a in arrays.values())
chunk = group["images"].chunks[0]
digest = hashlib.sha256()
t0 = time.perf_counter()
if how == "whole":
    x = arrays["images"][:]
    frames = len(x)
    digest.update(x[:: 997].tobytes())
else:
    def one(a):
        return layout.read_frames(arrays, a, min(a + chunk, info.n_frames))
    with concurrent.futures.ThreadPoolExecutor(runners.cpus()) as pool:
        frames = 0
        for got in pool.map(one, range(0, info.n_frames, chunk)):
            frames += len(got["images"])
            for n in names:
                digest.update(got[n][:: 997].tobytes())
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "frames": frames, "digest": digest.hexdigest()}))
"""

CASES = ("whole", "chunks", "all arrays")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    l0 = bench_l0(args.mb)
    run_child(READ, l0, "own", "whole")  # warm the page cache
    print(f"L0: {l0}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'read':<12} {'zarr s':>7} {'own s':>7} {'zarr/own':>8}")
    for how in CASES:
        best: dict[str, float] = {}
        digests = set()
        for _ in range(args.repeats):
            for reader in ("zarr", "own"):
                r = run_child(READ, l0, reader, how)
                best[reader] = min(best.get(reader, float("inf")), r["seconds"])
                digests.add(r["digest"])
        if len(digests) != 1:
            raise SystemExit(f"{how}: zarr and the own reader read different values")
        print(f"{how:<12} {best['zarr']:>7.2f} {best['own']:>7.2f} "
              f"{best['zarr'] / best['own']:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
