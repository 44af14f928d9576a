"""pff.py read speed vs numpy.fromfile on the same bytes, and pff's peak memory.

Usage: python3 bench/bench_pff_read.py [--mb 1024]

Reads a generated img16 file fully with pff (index, images, every header field, times
and flags, streamed in blocks) and with one ``numpy.fromfile``; prints the speed ratio
measured in this run (target >= 0.25) and the peak RSS of the pff reader (a child
process: target bounded by the block size, not the file size).
"""

from __future__ import annotations

import argparse

from benchlib import big_file, run_child

PFF_READ = """
import json, sys, time
from panoseti_pipeline import pff
path = sys.argv[1]
t0 = time.perf_counter()
prev, frames = pff.NAT, 0
with pff.PFFReader(path) as reader:
    source = pff.decide_time_source(reader)
    for _, block in reader.blocks(4096):
        t, flags = pff.frame_times(block.headers, source, prev)
        prev = pff.last_valid_time(t, prev)
        frames += len(block)
seconds = time.perf_counter() - t0
rss = peak_rss_mb()
print(json.dumps({"seconds": seconds, "frames": frames, "self_rss_mb": rss}))
"""

RAW_READ = """
import json, sys, time
import numpy as np
t0 = time.perf_counter()
data = np.fromfile(sys.argv[1], np.uint8)
rss = peak_rss_mb()
print(json.dumps({"seconds": time.perf_counter() - t0, "bytes": data.size, "self_rss_mb": rss}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1024)
    args = parser.parse_args()
    path = str(big_file(args.mb))
    run_child(RAW_READ, path)  # warm the page cache so both read from memory
    raw = run_child(RAW_READ, path)
    ours = run_child(PFF_READ, path)
    mb = raw["bytes"] / 1e6
    print(f"file: {mb:.0f} MB, {ours['frames']} frames")
    print(f"numpy.fromfile: {raw['seconds']:.2f} s ({mb / raw['seconds']:.0f} MB/s), "
          f"peak RSS {raw['self_rss_mb']:.0f} MB")
    print(f"pff read:       {ours['seconds']:.2f} s ({mb / ours['seconds']:.0f} MB/s), "
          f"peak RSS {ours['self_rss_mb']:.0f} MB")
    print(f"ratio pff/raw speed: {raw['seconds'] / ours['seconds']:.2f} (target >= 0.25)")


if __name__ == "__main__":
    main()
