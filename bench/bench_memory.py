"""Peak memory of the whole pipeline: the largest resident set of any process of run.sh.

Usage: python3 bench/bench_memory.py [--mb 1024 4096]

For each size, a generated img16 file (``benchlib.big_file``: one file of that size, the
largest a DAQ writes is 4 GB) goes through ``./run.sh`` with the shipped config.toml
(quicklooks on) in a fresh child process, which then reads the peak RSS of its largest
descendant (``getrusage(RUSAGE_CHILDREN).ru_maxrss``: every step, driver call and the
run's logger; a Dask worker's RSS is what its nanny watches, the same measure). Memory
must be bounded by the block size, not the file size: the two figures should be equal.
"""

from __future__ import annotations

import argparse
import os
import shutil

from benchlib import OUT, big_file, run_child

RUN = """
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
subprocess.run(["./run.sh", sys.argv[1], sys.argv[2]], check=True,
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, nargs="+", default=[1024, 4096])
    args = parser.parse_args()
    os.environ.pop("CONFIG_FILE", None)  # the shipped config.toml
    print("input MB  run.sh s  peak RSS MB (largest process)")
    for mb in args.mb:
        pff = big_file(mb)
        out = OUT / "memory"
        shutil.rmtree(out, ignore_errors=True)
        result = run_child(RUN, str(pff), str(out))
        print(f"{pff.stat().st_size / 1e6:8.0f}  {result['seconds']:8.1f}  "
              f"{result['peak_mb']:8.0f}")
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
