"""Baseline bias and noise per method, with flashes planted in the baseline window.

Usage: python3 bench/bench_baseline_robustness.py [--frames 600] [--window 200]

An img16 L0 (step 1 of a generated PFF file) whose pixels are Poisson with a known mean
per pixel (uniform in 40..60 ADC, so an integer median cannot land on it by luck), and a
flash of ``amplitude`` ADC counts added to every pixel of ``duration`` frames from frame
100 (inside the window). Step 2 runs each window method on it; per method and flash the
baseline's error against the true means over the pixels: ``bias`` (its mean: the L1
residual of a quiet pixel) and ``noise`` (its standard deviation over the pixels), and
whether the summary's window check warns. Read in ADC counts; the quantum of the
baseline (1/8) is in both.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np
import zarr

from panoseti_pipeline import pff, step2, synthetic
from panoseti_pipeline.cli import step1
from panoseti_pipeline.config import load_config

METHODS = ("mean", "median", "clipped_mean")
FLASHES = ((0, 0), (5, 5), (20, 5), (150, 5), (20, 20), (150, 20), (150, 60))
FLASH_START = 100
CONFIG = Path(__file__).resolve().parents[1] / "config.toml"


def make_l0(root: Path, frames: int, amplitude: int, duration: int, seed: int = 1
            ) -> tuple[Path, np.ndarray]:
    """An img16 L0 with the planted flash, and the true per-pixel means (y, x)."""
    rng = np.random.default_rng(seed)
    spec = synthetic.StreamSpec(dp="img16")
    truth = rng.uniform(40, 60, (32, 32))
    images = rng.poisson(truth, (frames, 32, 32))
    images[FLASH_START: FLASH_START + duration] += amplitude
    times = int(synthetic.DEFAULT_START.timestamp()) * 10**9 + np.arange(frames) * 10**6
    headers = synthetic.synth_headers(rng, spec, times, first_pkt=0)
    path = root / synthetic.file_name(spec, synthetic.DEFAULT_START, 0)
    with open(path, "wb") as f:
        pff.write_frames(f, "img16", images.astype("<u2"), headers)
    l0 = root / "L0.zarr"
    with contextlib.redirect_stdout(io.StringIO()):  # step 1's summary line
        assert step1.main([str(path), str(l0), str(CONFIG), "--quiet"]) == 0
    return l0, truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=600)
    parser.add_argument("--window", type=int, default=200)
    args = parser.parse_args()
    print(f"img16, {args.frames} frames, window {args.window}, flash from frame "
          f"{FLASH_START}; bias / noise of the baseline in ADC counts")
    print(f"{'flash (ADC x frames)':>21}  " + "  ".join(f"{m:>22}" for m in METHODS)
          + "  warned")
    for amplitude, duration in FLASHES:
        with tempfile.TemporaryDirectory() as tmp:
            l0, truth = make_l0(Path(tmp), args.frames, amplitude, duration)
            cells, warned = [], None
            for method in METHODS:
                cfg = load_config(None).with_overrides(
                    "baseline_subtract", method=method, baseline_window=args.window)
                l1 = Path(tmp) / f"{method}.zarr"
                step2.subtract_baseline(l0, l1, cfg, quiet=True, notice=lambda _m: None)
                g = zarr.open_group(str(l1), mode="r")
                error = g["baseline"][:].astype(np.float64) - truth
                cells.append(f"{error.mean():+8.3f} / {error.std():6.3f}")
                warned = g.attrs["summary"]["warnings"] != []
        print(f"{f'{amplitude} x {duration}':>21}  " + "  ".join(f"{c:>22}" for c in cells)
              + f"  {'yes' if warned else 'no'}")


if __name__ == "__main__":
    main()
