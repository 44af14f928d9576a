"""Would the ``zarrs`` codec pipeline (PyPI ``zarrs``, Rust) help here? Measured, not assumed.

Usage: python3 bench/bench_zarrs.py [--mb 1024]   (needs ``pip install zarrs``; not a
requirement of the pipeline)

On the L0 store of a generated img16 file (step 1, bench config), in child processes
with zarr's default codec pipeline and with ``zarrs.ZarrsCodecPipeline``
(``ZARR_CODEC_PIPELINE__PATH``):

* read: every ``images`` chunk through zarr, one time chunk at a time, as step 2 reads;
* write: the same images written with ``array[a:b] = ...`` into an array with the L0
  metadata, one shard at a time (zarr writes whole shards), then every file compared
  byte for byte with step 1's own;
* step 2 end to end (default method, local mode) with each pipeline: wall time.

Step 1 writes its chunk and shard files itself (``store/shards.py``), so a zarr codec
pipeline only reaches step 1's verification read and step 2's reads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_step1 import write_config
from benchlib import OUT, REPO, big_file

ZARRS = "zarrs.ZarrsCodecPipeline"
STEP1 = ("import sys; from panoseti_pipeline.cli import step1; "
         "sys.exit(step1.main(sys.argv[1:]))")

READ = """
import json, sys, time
import numpy as np, zarr
a = zarr.open_array(sys.argv[1] + "/images", mode="r")
c = a.chunks[0]
t0 = time.perf_counter()
total = 0
for s in range(0, a.shape[0], c):
    total += int(a[s:s + c][:, 0, 0].sum())
print(json.dumps({"seconds": time.perf_counter() - t0, "pipeline":
                  zarr.config.get("codec_pipeline.path"), "checksum": total}))
"""

WRITE = """
import json, sys, time
import zarr
src = zarr.open_array(sys.argv[1] + "/images", mode="r")
dst = zarr.create_array(sys.argv[2], shape=src.shape, chunks=src.chunks,
                        shards=src.shards, dtype=src.dtype, compressors=src.compressors,
                        serializer=src.serializer, fill_value=src.fill_value,
                        dimension_names=src.metadata.dimension_names,
                        config={"write_empty_chunks": True})
step = (src.shards or src.chunks)[0]
seconds = 0.0
for s in range(0, src.shape[0], step):
    data = src[s:s + step]
    t0 = time.perf_counter()
    dst[s:s + step] = data
    seconds += time.perf_counter() - t0
print(json.dumps({"seconds": seconds}))
"""

STEP2 = """
import json, sys, time
t0 = time.perf_counter()
from panoseti_pipeline.cli import step2
rc = step2.main([sys.argv[1], sys.argv[2], "--config", sys.argv[3], "--quiet"])
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t0}))
"""


def child(code: str, *args: str, zarrs: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "ZARR_CODEC_PIPELINE__PATH"}
    if zarrs:
        env["ZARR_CODEC_PIPELINE__PATH"] = ZARRS
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env,
                          check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def same_files(a: Path, b: Path) -> tuple[int, int]:
    """(chunk/shard files compared, how many differ) between two arrays' directories."""
    files = [p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != "zarr.json"]
    differ = sum((a / f).read_bytes() != (b / f).read_bytes() for f in files)
    return len(files), differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1024)
    args = parser.parse_args()
    path = big_file(args.mb)
    mb = path.stat().st_size / 1e6
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=OUT if OUT.exists() else None) as tmp:
        tmp = Path(tmp)
        cfg = write_config(tmp, 2)
        l0 = tmp / "bench_L0.zarr"
        subprocess.run([sys.executable, "-c", STEP1, str(path), str(l0), str(cfg), "--quiet"],
                       cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        rows = {}
        for name, flag in (("zarr", False), ("zarrs", True)):
            read = child(READ, str(l0), zarrs=flag)
            write = child(WRITE, str(l0), str(tmp / f"{name}.zarr"), zarrs=flag)
            compared, differ = same_files(l0 / "images", tmp / f"{name}.zarr")
            step2 = child(STEP2, str(l0), str(tmp / f"{name}_L1.zarr"), str(cfg), zarrs=flag)
            rows[name] = (read, write, compared, differ, step2)
    print(f"{mb:.0f} MB img16 L0, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for name, (read, write, compared, differ, step2) in rows.items():
        print(f"  {name:6} ({read['pipeline']}): read images {read['seconds']:.2f} s, write "
              f"images {write['seconds']:.2f} s ({differ} of {compared} files differ from "
              f"step 1's), step 2 {step2['seconds']:.2f} s (rc {step2['rc']})")
    z, zs = rows["zarr"], rows["zarrs"]
    print(f"zarr / zarrs time: read {z[0]['seconds'] / zs[0]['seconds']:.2f}, write "
          f"{z[1]['seconds'] / zs[1]['seconds']:.2f}, step 2 "
          f"{z[4]['seconds'] / zs[4]['seconds']:.2f} (> 1: zarrs faster)")


if __name__ == "__main__":
    main()
