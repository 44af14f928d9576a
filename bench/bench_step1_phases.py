"""Where step 1's time goes: a phase breakdown on one img16 file, against the codec bound.

Usage: python3 bench/bench_step1_phases.py [--mb 1024] [--workers 2] [--runs 1]

* imports: a fresh interpreter importing what ``step1_pff_to_zarr.py`` imports for a
  local run (and whether ``distributed`` came with it);
* floor: what a conversion cannot skip, each on one thread (read the file, gather the
  pixels into chunks, write the store's bytes, the codec), and the best ratio it allows;
* codec bound: the file's image bytes, in the same chunks, through the configured codec
  (Blosc lz4 level 5 bit-shuffle) + CRC32C on ``--workers`` threads, in memory;
* step 1 end to end: ``step1_pff_to_zarr.py`` in a child process (bench_step1's config:
  the shipped one, local mode), wall time from before its imports;
* phases: step 1 once more in this process, every phase's function wrapped to add up its
  own time (exclusive of the phases it calls), summed over the threads that ran it.
  Phases on the task threads overlap: their sum is thread-seconds, not wall time.

Prints the machine's load average with the figures (2 shared cores: compare ratios, not
seconds, and only within one run). Another tree's phases (e.g. main's, for a before and
after): ``PYTHONPATH=/path/to/main python3 bench/bench_step1_phases.py``.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from bench_step1 import codec_bound, write_config
from benchlib import OUT, big_file, run_child

END_TO_END = """
import json, sys, time
t0 = time.perf_counter()
from panoseti_pipeline.cli import step1 as step1_pff_to_zarr
rc = step1_pff_to_zarr.main([sys.argv[1], sys.argv[2], sys.argv[3], "--quiet"])
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t0,
                  "distributed": "distributed" in sys.modules}))
"""

IMPORTS = """
import json, sys, time
t0 = time.perf_counter()
from panoseti_pipeline.cli import step1
from panoseti_pipeline import cluster, config, step1
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "distributed": "distributed" in sys.modules,
                  "zarr": "zarr" in sys.modules}))
"""


#: "owner.function ..." -> the phase its own time counts to (owners: see instrument)
PHASES = {
    "step1.check_stream": "check inputs",
    "step1.index_stream": "index",
    "step1._create_store": "create store (zarr and its import, during the tasks)",
    "reader._read_pieces": "read (page cache -> buffer)",
    "reader._check_delimiters reader.parse_fixed": "header decode",
    "pff.frame_times": "time",
    "step1.previous_time": "look-back before a task",
    "pff.copy_pixels": "image copy",
    "spec.header_columns step1.decode_range": "decode other",
    "shards.crc32c": "encode: crc32c",
    "ChunkFiles.add ChunkFiles._finish_shard": "store write",
    "FrameWriter._drain_one": "task thread waits for encoders",
    "step1._verify": "verify (read back, compare)",
    "step1._decode_sample": "verify: decode the sample again (a thread)",
    "step1._attributes": "attributes",
    "layout.consolidate": "consolidate",
    "publish.store_bytes": "store size",
    "publish.swap_into_place": "publish (rename)",
}


class PhaseClock:
    """Exclusive time per phase, summed over threads (a per-thread stack of open calls)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)
        self._lock = threading.Lock()
        self._local = threading.local()

    def wrap(self, phase: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            stack = self._local.__dict__.setdefault("stack", [])
            stack.append(0.0)  # time spent in nested phases
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - t0
                nested = stack.pop()
                if stack:
                    stack[-1] += spent
                with self._lock:
                    self.seconds[phase] += spent - nested
                    self.calls[phase] += 1
        return timed

    def patch(self, owner, name: str, phase: str) -> None:
        """Time ``owner.name`` (absent in an older tree, e.g. main's: left alone)."""
        if hasattr(owner, name):
            setattr(owner, name, self.wrap(phase, getattr(owner, name)))


def instrument(clock: PhaseClock) -> None:
    """Wrap step 1's phase functions where step 1 looks them up."""
    from panoseti_pipeline import pff, step1
    from panoseti_pipeline.pff import reader
    from panoseti_pipeline.store import layout, publish, shards, spec

    owners = {"step1": step1, "pff": pff, "reader": reader, "layout": layout,
              "publish": publish, "shards": shards, "spec": spec,
              "ChunkFiles": shards.ChunkFiles, "FrameWriter": shards.FrameWriter}
    for where, phase in PHASES.items():
        for target in where.split():
            owner, name = target.split(".")
            clock.patch(owners[owner], name, phase)
    codec_compressor = shards.ChunkCodec.compressor
    codec_encoder = shards.ChunkCodec.encoder

    def compressor(self, itemsize):
        fn = codec_compressor(self, itemsize)
        return None if fn is None else clock.wrap("encode: compress", fn)

    def encoder(self, dtype):
        return clock.wrap("encode: other (pad, contiguous, join)", codec_encoder(self, dtype))

    shards.ChunkCodec.compressor = compressor
    shards.ChunkCodec.encoder = encoder


def profile(path: Path, cfg_path: Path, out: Path) -> tuple[float, PhaseClock]:
    """Step 1 in this process with every phase timed; (wall seconds, clock)."""
    from panoseti_pipeline import step1
    from panoseti_pipeline.config import load_config

    clock = PhaseClock()
    instrument(clock)
    cfg = load_config(str(cfg_path))
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    step1.convert([str(path)], str(out), cfg, quiet=True, notice=lambda _m: None)
    wall = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return wall, clock


def floor(path: Path, store_bytes: int, time_chunk: int) -> dict[str, float]:
    """Thread-seconds of the work no conversion can skip, each measured on one thread:
    reading the file (page cache -> a reused buffer, block by block), gathering each
    block's pixels into one contiguous chunk (the codec's input), writing the store's
    bytes to a new file (8 MB writes), and the codec itself on one thread."""
    from panoseti_pipeline import pff

    out: dict[str, float] = {}
    with pff.PFFReader(path) as reader:
        index, product = reader.index, reader.index.product
        nbytes = index.byte_range(0, time_chunk)[1]
        buf = np.empty(nbytes, np.uint8)
        chunk = np.empty((time_chunk, *product.shape), product.dtype)
        out["read"] = out["gather pixels"] = 0.0
        with open(path, "rb", buffering=0) as f:
            for start in range(0, index.n_frames, time_chunk):
                n = min(time_chunk, index.n_frames - start)
                t0 = time.perf_counter()
                got = f.readinto(memoryview(buf)[:index.byte_range(start, start + n)[1]])
                t1 = time.perf_counter()
                rows = buf[:got].reshape(n, -1)
                pixels = rows[:, -product.pixel_bytes:].view(product.dtype)
                pff.copy_pixels(chunk[:n], pixels.reshape(n, *product.shape))
                out["read"] += t1 - t0
                out["gather pixels"] += time.perf_counter() - t1
    block = np.ones(8 << 20, np.uint8)
    target = path.parent / f".floor_write_{os.getpid()}"
    t0 = time.perf_counter()
    with open(target, "wb", buffering=0) as f:
        for _ in range(-(-store_bytes // block.size)):
            f.write(block)
    out["write the store's bytes"] = time.perf_counter() - t0
    target.unlink()
    out["codec (1 thread)"] = codec_bound(path, time_chunk, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=1, help="end-to-end runs (best taken)")
    args = parser.parse_args()
    path = big_file(args.mb)
    mb = path.stat().st_size / 1e6
    with tempfile.TemporaryDirectory(dir=OUT if OUT.exists() else None) as tmp:
        tmp = Path(tmp)
        cfg = write_config(tmp, args.workers)
        load_before = os.getloadavg()
        imports = run_child(IMPORTS)
        bound = codec_bound(path, 8192, args.workers)
        runs = []
        for _ in range(args.runs):
            shutil.rmtree(tmp / "e2e_L0.zarr", ignore_errors=True)
            runs.append(run_child(END_TO_END, str(path), str(tmp / "e2e_L0.zarr"), str(cfg)))
        store_bytes = sum(f.stat().st_size for f in (tmp / "e2e_L0.zarr").rglob("*")
                          if f.is_file())
        shutil.rmtree(tmp / "e2e_L0.zarr", ignore_errors=True)
        e2e = min(r["seconds"] for r in runs)
        least = floor(path, store_bytes, 8192)
        wall, clock = profile(path, cfg, tmp / "phases_L0.zarr")
        load_after = os.getloadavg()
    print(f"{mb:.0f} MB img16 ({path.name}), {args.workers} threads, load average "
          f"before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, after "
          f"{load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    print(f"imports (fresh interpreter): {imports['seconds']:.2f} s; distributed imported: "
          f"{imports['distributed']}")
    print(f"step 1 end to end (child, imports included, best of {args.runs}): {e2e:.2f} s "
          f"({mb / e2e:.0f} MB/s); distributed imported: {runs[0]['distributed']}")
    print(f"codec bound (images, blosc-lz4 5 bit-shuffle + crc32c, {args.workers} threads): "
          f"{bound:.2f} s ({mb / bound:.0f} MB/s)")
    print(f"ratio codec-bound / end-to-end: {bound / e2e:.2f} (target >= 0.6); "
          f"without imports: {bound / max(e2e - imports['seconds'], 1e-9):.2f}")
    best = sum(least.values()) / args.workers
    print(f"\nfloor: work no conversion skips, thread-seconds on one thread "
          f"({store_bytes / 1e6:.0f} MB store):")
    for what, seconds in least.items():
        print(f"  {what:<40} {seconds:6.2f} s")
    print(f"  shared perfectly by {args.workers} threads, no header parsing, no imports: "
          f"{best:.2f} s -> the best ratio possible here {bound / best:.2f}; with the "
          f"imports {bound / (best + imports['seconds']):.2f}")
    print(f"\nphases of step 1 in this process (wall {wall:.2f} s; thread-seconds, "
          "exclusive):")
    total = 0.0
    for phase, seconds in sorted(clock.seconds.items(), key=lambda kv: -kv[1]):
        total += seconds
        print(f"  {phase:<40} {seconds:6.2f} s  {100 * seconds / wall:5.1f}% of wall  "
              f"({clock.calls[phase]} calls)")
    print(f"  {'sum (threads overlap)':<40} {total:6.2f} s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
