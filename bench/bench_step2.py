"""Step 2 (L0 -> L1) speed vs the decode + encode bound, its peak memory, BitRound sizes.

Usage: python3 bench/bench_step2.py [--mb 1024] [--methods mean,median,...] [--bits 23,16,12]

On the L0 store of a generated img16 file (made once with step 1 from
``benchlib.big_file``), measures in child processes, in one run:

* the bound: decode every L0 image chunk, subtract the mean of the first
  ``baseline_window`` frames and encode the float32 result with the L1 codecs, in memory
  (no files), on as many threads as step 2 uses;
* the write bound: the same, each chunk's encoded bytes written to a file (what step 2
  cannot avoid: its L1 is float32, ~4x the L0);
* step 2 (``l1_baseline.subtract_baseline``, local threads) per method: wall time, the
  ratios bound / step 2 and write bound / step 2 (target: >= 0.8 for ``mean``; the
  shipped ``clipped_mean`` adds two passes over the baseline window only), peak RSS
  (VmHWM; target <= 600 MB) and the L1/L0 size ratio;
* ``keep_mantissa_bits`` (BitRound, lossy): L1 size and time per setting.
"""

from __future__ import annotations

import argparse
import os
import shutil

from benchlib import OUT, big_file, run_child

MAKE_L0 = """
import json, sys
from panoseti_pipeline.cli import step1 as step1_pff_to_zarr
rc = step1_pff_to_zarr.main([sys.argv[1], sys.argv[2], "config.toml", "--quiet"])
print(json.dumps({"rc": rc}))
"""

BOUND = """
import concurrent.futures, json, os, resource, sys, time
import numpy as np, zarr
from panoseti_pipeline.store import layout as zp
from panoseti_pipeline.config import load_config
section = load_config("config.toml").baseline_subtract
zp.configure_zarr(4, 2)
images = zp.open_product(sys.argv[1], "L0")["images"]
n, h, w = images.shape
chunk = section.compute_chunk_size
from panoseti_pipeline.store.shards import ChunkCodec
codecs = zp.compressors(ChunkCodec(section.codec, section.level, section.shuffle,
                                   section.checksum))
threads = len(os.sched_getaffinity(0))
baseline = images[:section.baseline_window].mean(axis=0)
quantum = section.baseline_quantum  # rounded as step 2 rounds it
baseline = (np.round(baseline / quantum) * quantum if quantum else baseline).astype(np.float32)

def one(a):
    x = images[a:a + chunk]  # decode
    store = (zarr.storage.MemoryStore() if len(sys.argv) < 3 else  # or files on disk
             zarr.storage.LocalStore(f"{sys.argv[2]}/{a}"))
    out = zarr.create_array(store, shape=x.shape, chunks=x.shape,
                            dtype="<f4", compressors=codecs, fill_value=float("nan"))
    out[:] = np.subtract(x, baseline, dtype=np.float32)  # the float32 output, encoded
    return len(x)

t0 = time.perf_counter()
with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    frames = sum(pool.map(one, range(0, n, chunk)))
seconds = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": seconds, "frames": frames, "threads": threads,
                  "cpu_s": ru.ru_utime + ru.ru_stime, "rss_mb": peak_rss_mb()}))
"""

STEP2 = """
import json, resource, sys, time
from panoseti_pipeline import step2 as l1_baseline
from panoseti_pipeline.config import load_config
cfg = load_config("config.toml").with_overrides(
    "baseline_subtract", method=sys.argv[3], keep_mantissa_bits=int(sys.argv[4]))
t0 = time.perf_counter()
r = l1_baseline.subtract_baseline(sys.argv[1], sys.argv[2], cfg, overwrite=True, quiet=True)
seconds = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": seconds, "frames": r.frames, "l0_bytes": r.l0_bytes,
                  "l1_bytes": r.l1_bytes, "cpu_s": ru.ru_utime + ru.ru_stime,
                  "rss_mb": peak_rss_mb()}))
"""


def bench_l0(megabytes: int) -> str:
    """The L0 store of the generated file, made once with step 1."""
    from panoseti_pipeline.store import publish as store_files

    l0 = OUT / f"img16_{megabytes}MB_L0.zarr"
    if not store_files.is_published(l0, "L0"):
        pff_path = big_file(megabytes)
        print(f"making {l0} with step 1 ...", flush=True)
        run_child(MAKE_L0, str(pff_path), str(l0))
    return str(l0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1024)
    parser.add_argument("--methods",
                        default="clipped_mean,mean,median,image_median,ph_pedestal")
    parser.add_argument("--bits", default="23,16,12,8",
                        help="keep_mantissa_bits values to measure with the mean method")
    args = parser.parse_args()
    l0 = bench_l0(args.mb)
    l1 = str(OUT / f"img16_{args.mb}MB_L1.zarr")
    run_child(BOUND, l0)  # warm the page cache
    bound = run_child(BOUND, l0)
    scratch = OUT / "bound_files"
    shutil.rmtree(scratch, ignore_errors=True)
    write_bound = run_child(BOUND, l0, str(scratch))
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"L0: {l0} ({bound['frames']} frames); {bound['threads']} threads; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"bound (decode L0, subtract, encode float32; in memory): {bound['seconds']:.2f} s "
          f"wall, {bound['cpu_s']:.2f} s CPU")
    print(f"write bound (the same, each chunk written to a file): "
          f"{write_bound['seconds']:.2f} s wall, {write_bound['cpu_s']:.2f} s CPU")
    print(f"{'method':<13} {'bits':>4} {'seconds':>8} {'bound/step2':>11} {'write b./s2':>11} "
          f"{'CPU ratio':>9} {'peak RSS MB':>11} {'L1/L0 size':>10}")
    rows = [(m, 23) for m in args.methods.split(",")]
    rows += [("mean", int(b)) for b in args.bits.split(",") if int(b) != 23]
    for method, bits in rows:
        shutil.rmtree(l1, ignore_errors=True)  # not part of the measurement
        r = run_child(STEP2, l0, l1, method, str(bits))
        print(f"{method:<13} {bits:>4} {r['seconds']:>8.2f} "
              f"{bound['seconds'] / r['seconds']:>11.2f} "
              f"{write_bound['seconds'] / r['seconds']:>11.2f} "
              f"{bound['cpu_s'] / r['cpu_s']:>9.2f} {r['rss_mb']:>11.0f} "
              f"{r['l1_bytes'] / r['l0_bytes']:>10.2f}", flush=True)
    shutil.rmtree(l1, ignore_errors=True)  # the L0 stays cached; the L1 is GBs
    print("targets: bound/step2 >= 0.8 (mean, bits 23), peak RSS <= 600 MB; CPU ratio is "
          "the same ratio in CPU seconds (less sensitive to a busy machine; step 2 "
          "includes its imports and writing the files)")


if __name__ == "__main__":
    main()
