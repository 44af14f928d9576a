"""Step 1 speed vs the codec bound, its peak memory, sharding, and pypff's converter.

Usage: python3 bench/bench_step1.py [--mb 1024] [--mb-large 4096] [--workers 2] [--no-pypff]

* codec bound: the same image bytes, in the same chunks, encoded in memory by the same
  codecs (Blosc lz4 level 5 bit-shuffle + CRC32C) on ``--workers`` threads;
* step 1: ``step1_pff_to_zarr.py`` in a child process, local mode, with the shipped
  config (sharded: ``shard_factor`` 64) but codec settings as above; wall time, the
  child's peak RSS and the store's file count;
* the same without sharding (``shard_factor = 0``): time and file count;
* ``pypff.zarr.convert_run`` (PANOSETI's converter, its defaults) on a ``.pffd`` holding
  the same file: time and file count.
Prints ratio = codec-bound time / step-1 time (target >= 0.6), sharded / unsharded time
(target <= 1.10), files per GB of input (target <= 60), pypff time / ours, and peak RSS
for both sizes (target <= 600 MB at both).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchlib import OUT, big_file, run_child

STEP1 = """
import json, sys, time
from panoseti_pipeline.cli import step1 as step1_pff_to_zarr
t0 = time.perf_counter()
rc = step1_pff_to_zarr.main([sys.argv[1], sys.argv[2], sys.argv[3], "--quiet"])
rss = peak_rss_mb()
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t0, "self_rss_mb": rss}))
"""

PYPFF = """
import json, sys, time
from pypff import PanosetiRun
from pypff.zarr import convert_run
t0 = time.perf_counter()
convert_run(PanosetiRun(sys.argv[1]), sys.argv[2])
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""
RUN_DIR = "obs_bench.start_2024-07-25T04:34:46Z.runtype_sci-obs.pffd"


def codec_bound(path: Path, time_chunk: int, threads: int) -> float:
    """Seconds to encode the file's image chunks with Blosc+CRC32C on ``threads`` threads."""
    import google_crc32c
    import numcodecs

    from panoseti_pipeline import pff

    blosc = numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)

    def encode(chunk):
        data = blosc.encode(chunk)
        return google_crc32c.value(data)

    total = 0.0
    with pff.PFFReader(path) as reader, concurrent.futures.ThreadPoolExecutor(threads) as ex:
        group = threads * 4
        n = reader.index.n_frames
        for start in range(0, n, group * time_chunk):
            stop = min(n, start + group * time_chunk)
            images = reader.read(start, stop).images
            chunks = [images[a:a + time_chunk] for a in range(0, stop - start, time_chunk)]
            t0 = time.perf_counter()
            list(ex.map(encode, chunks))
            total += time.perf_counter() - t0
    return total


def write_config(directory: Path, workers: int, shard_factor: int | None = None) -> Path:
    """The bench's step 1 config: the shipped one (``shard_factor``: None) but the codec."""
    shards = "" if shard_factor is None else f"shard_factor = {shard_factor}\n"
    cfg = directory / f"bench_{shard_factor}.toml"
    cfg.write_text(f"""[cluster]
use_dask = false
[pff_to_zarr]
codec = "blosc-lz4"
level = 5
shuffle = "bit"
checksum = true
time_chunk = 8192
num_workers = {workers}
{shards}""")
    return cfg


def file_count(directory: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(directory))


def run_step1(path: Path, cfg: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    result = run_child(STEP1, str(path), str(out), str(cfg))
    result["files"] = file_count(out)
    shutil.rmtree(out, ignore_errors=True)
    return result


def run_pypff(path: Path, tmp: Path) -> dict:
    """pypff's ``convert_run`` on a run directory holding (a hard link to) ``path``."""
    run = tmp / RUN_DIR
    run.mkdir()
    os.link(path, run / path.name)
    out = tmp / "pypff_out"
    result = run_child(PYPFF, str(run), str(out))
    result["files"] = file_count(out)
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1024)
    parser.add_argument("--mb-large", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-pypff", action="store_true", help="skip pypff's converter")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=OUT.parent if OUT.exists() else None) as tmp:
        tmp = Path(tmp)
        cfg = write_config(tmp, args.workers)
        path = big_file(args.mb)
        bound = codec_bound(path, 8192, args.workers)
        ours = run_step1(path, cfg, tmp / "out_L0.zarr")
        flat = run_step1(path, write_config(tmp, args.workers, 0), tmp / "flat_L0.zarr")
        mb = path.stat().st_size / 1e6
        print(f"{mb:.0f} MB img16: codec bound {bound:.2f} s, step 1 {ours['seconds']:.2f} s "
              f"({mb / ours['seconds']:.0f} MB/s), peak RSS {ours['self_rss_mb']:.0f} MB")
        print(f"ratio codec-bound/step1: {bound / ours['seconds']:.2f} (target >= 0.6)")
        print(f"sharded: {ours['files']} files ({ours['files'] / mb * 1000:.0f} per GB, target "
              f"<= 60); unsharded: {flat['seconds']:.2f} s, {flat['files']} files; "
              f"time sharded/unsharded {ours['seconds'] / flat['seconds']:.2f} "
              "(target <= 1.10)")
        if not args.no_pypff:
            theirs = run_pypff(path, tmp)
            print(f"pypff convert_run: {theirs['seconds']:.2f} s, {theirs['files']} files; "
                  f"its time / step 1's: sharded {theirs['seconds'] / ours['seconds']:.1f}x, "
                  f"unsharded {theirs['seconds'] / flat['seconds']:.1f}x")
        if args.mb_large:
            large = run_step1(big_file(args.mb_large), cfg, tmp / "out_large_L0.zarr")
            print(f"{args.mb_large} MB img16: step 1 {large['seconds']:.2f} s, "
                  f"peak RSS {large['self_rss_mb']:.0f} MB (target <= 600 MB at both sizes)")


if __name__ == "__main__":
    main()
