"""L1 size per baseline quantum and codec, on the first frames of an L0 store.

Usage: python3 bench/bench_l1_codecs.py L0_STORE [--frames 8192]

L1 = L0 - baseline (the mean of the first 200 frames; ph256: of each quabo), with the
baseline rounded to each quantum, encoded with the Blosc settings step 2 may use. Prints
each L1's size over the L0's (both Blosc-lz4 with bit shuffle, as step 1 writes it) and
the encode speed: the measurement behind ``baseline_quantum`` and the L1 ``shuffle``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import zarr
from numcodecs import Blosc

QUANTA = (0, 1 / 16, 1 / 8, 1 / 4)
CODECS = (("lz4", Blosc.SHUFFLE, 5), ("lz4", Blosc.BITSHUFFLE, 5),
          ("zstd", Blosc.BITSHUFFLE, 1), ("zstd", Blosc.BITSHUFFLE, 3))


def baseline(group: zarr.Group, x: np.ndarray) -> np.ndarray:
    """Per frame, the baseline it gets: the mean of the first 200 frames (of its quabo)."""
    if group.attrs["data_product"] != "ph256":
        return x[:200].mean(axis=0)
    quabo = group["quabo_num"][: len(x)].astype(int)
    means = np.stack([x[quabo == q][:200].mean(axis=0) if (quabo == q).any()
                      else np.zeros(x.shape[1:]) for q in range(4)])
    return means[quabo]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("l0", help="an L0 store")
    parser.add_argument("--frames", type=int, default=8192)
    args = parser.parse_args()
    group = zarr.open_group(args.l0, mode="r")
    x = group["images"][: args.frames]
    base = baseline(group, x)
    l0_bytes = len(Blosc(cname="lz4", clevel=5, shuffle=Blosc.BITSHUFFLE).encode(x))
    print(f"{args.l0}: {len(x)} frames of {group.attrs['data_product']}")
    for quantum in QUANTA:
        b = np.round(base / quantum) * quantum if quantum else base
        l1 = np.subtract(x, b.astype(np.float32), dtype=np.float32)
        for cname, shuffle, level in CODECS:
            codec = Blosc(cname=cname, clevel=level, shuffle=shuffle, blocksize=0)
            t0 = time.perf_counter()
            size = len(codec.encode(l1))
            seconds = time.perf_counter() - t0
            kind = "bit" if shuffle == Blosc.BITSHUFFLE else "byte"
            print(f"quantum {quantum:<7g} {cname:4} {kind:4} level {level}: "
                  f"L1/L0 {size / l0_bytes:.2f}, encode {l1.nbytes / seconds / 1e6:.0f} MB/s")


if __name__ == "__main__":
    main()
