"""Synthetic PANOSETI observations: realistic PFF files for tests, the demo and benchmarks.

Deterministic from a seed. Frames are written byte-exact by :func:`pff.write_frames`, with
White Rabbit or GNSS timing, and the awkward cases real files have, each opt-in:

* ``long_nsec``     a few frames with ``pkt_nsec >= 10**9`` (longer headers)
* ``clamped_nsec``  a few frames with ``pkt_nsec = 999999999`` (the DAQ's clamp)
* ``missing_quabo`` a few module frames without quabo 0 (zero sub-header and quadrant)
* ``out_of_order``  one frame whose time is earlier than the previous one
* ``partial_last``  the last file of each stream ends in a partial frame

Examples::

    python3 synthetic_obs.py /tmp/demo --frames 3000 --files-per-stream 2 --faults all
    python3 synthetic_obs.py /tmp/bench --single-file-mb 1024     # one big img16 file
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from panoseti_pipeline import pff

FAULTS = ("long_nsec", "clamped_nsec", "missing_quabo", "out_of_order", "partial_last")
DEFAULT_START = dt.datetime(2024, 7, 25, 4, 34, 46, tzinfo=dt.timezone.utc)
GNSS_TAI_OFFSET = 517  # pkt_tai of a GNSS-timed board: unrelated to TAI (d far from 0)


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """What to generate for one (dp, module) stream."""

    dp: str = "img16"
    module: int = 1
    frames_per_file: int = 2000
    files: int = 2
    cadence_ns: int = 1_000_000  # image integration time; mean spacing for pulse-height
    timing: str = "wr"  # "wr" (White Rabbit) or "gnss"
    faults: frozenset[str] = frozenset()


def _true_times(rng: np.random.Generator, spec: StreamSpec, t0_ns: int, n: int) -> np.ndarray:
    if spec.dp.startswith("ph"):  # event-driven: random spacing
        steps = rng.exponential(spec.cadence_ns, n).astype(np.int64) + 1
        return t0_ns + np.cumsum(steps)
    return t0_ns + np.arange(n, dtype=np.int64) * spec.cadence_ns


def synth_headers(rng: np.random.Generator, spec: StreamSpec, time_ns: np.ndarray,
                  first_pkt: int) -> dict[str, np.ndarray]:
    """Header fields for frames taken at ``time_ns`` (true WR times)."""
    product = pff.PRODUCTS[spec.dp]
    n = len(time_ns)
    shape = (n, *product.header_shape)
    q = 1 if product.header_kind == "ph256" else pff.N_QUABOS
    jitter = rng.integers(-8, 9, size=(n, q)) * 4  # quabo clocks agree within tens of ns
    t = (time_ns[:, None] + jitter).reshape(shape)
    arrival = t + rng.integers(200_000, 400_000, size=shape)  # host receives later
    unix_sec = t // 1_000_000_000
    tai_offset = 37 if spec.timing == "wr" else 37 + GNSS_TAI_OFFSET
    headers = {
        "pkt_num": (first_pkt + np.arange(n)[:, None] + np.zeros((1, q), np.int64))
        .reshape(shape) % 65536,
        "pkt_tai": (unix_sec + tai_offset) % 1024,
        "pkt_nsec": t % 1_000_000_000,
        "tv_sec": arrival // 1_000_000_000,
        "tv_usec": (arrival // 1000) % 1_000_000,
    }
    if product.header_kind == "ph256":  # events of the four quabos interleave
        quabo = rng.integers(0, 4, n)
        for k in range(pff.N_QUABOS):  # each quabo counts its own packets
            mine = quabo == k
            headers["pkt_num"][mine] = (first_pkt + np.arange(mine.sum())) % 65536
        headers["quabo_num"] = quabo
    return headers


def synth_images(rng: np.random.Generator, spec: StreamSpec, n: int, first_frame: int
                 ) -> np.ndarray:
    """Pedestal + noise, a fixed star, and a flash in frames 150-154 of the stream."""
    product = pff.PRODUCTS[spec.dp]
    h, w = product.shape
    if spec.dp.startswith("ph"):  # pulse heights: signed, baseline removed on the board
        img = rng.normal(0, 40, (n, h, w))
        img[rng.random((n, h, w)) < 0.002] = -600  # real files hold values below -500
        img[:, h // 3, w // 3] += rng.integers(200, 3000, n)
        return np.clip(img, -32768, 32767).astype(product.dtype)
    top = 250 if spec.dp == "img8" else 4000
    pedestal = 40 + 10 * np.arange(h * w).reshape(h, w) % 30
    img = rng.poisson(pedestal, (n, h, w)).astype(np.int64)
    yy, xx = np.mgrid[:h, :w]
    img += (60 * np.exp(-((yy - 9) ** 2 + (xx - 21) ** 2) / 3.0)).astype(np.int64)
    frames = first_frame + np.arange(n)
    img[(frames >= 150) & (frames < 155)] += 150
    return np.clip(img, 0, top).astype(product.dtype)


def _apply_faults(rng: np.random.Generator, spec: StreamSpec, images: np.ndarray,
                  headers: dict[str, np.ndarray], file_no: int) -> None:
    n = len(images)
    pick = np.sort(rng.choice(np.arange(1, n - 1), size=min(3, max(n - 2, 0)), replace=False))
    if "long_nsec" in spec.faults and pick.size:
        headers["pkt_nsec"][pick[0]] = 1_000_000_000 + headers["pkt_nsec"][pick[0]] % 1000
    if "clamped_nsec" in spec.faults and pick.size > 1:
        headers["pkt_nsec"][pick[1]] = pff.NSEC_CLAMPED
    if "missing_quabo" in spec.faults and pick.size > 2 and spec.dp != "ph256":
        for f in pff.MODULE_FIELDS:
            headers[f][pick[2], 0] = 0
        images[pick[2], :16, :16] = 0  # quabo 0 is the upper-left quadrant
    if "out_of_order" in spec.faults and file_no == 0 and n > 10:
        headers["tv_sec"][5] -= 2
        headers["pkt_tai"][5] = (headers["pkt_tai"][5] - 2) % 1024


def file_name(spec: StreamSpec, start: dt.datetime, seqno: int) -> str:
    return (f"start_{start:%Y-%m-%dT%H:%M:%S}Z.dp_{spec.dp}.bpp_{pff.PRODUCTS[spec.dp].bpp}"
            f".module_{spec.module}.seqno_{seqno}.pff")


def write_stream(directory: Path, spec: StreamSpec, *, seed: int = 0,
                 start: dt.datetime = DEFAULT_START) -> list[Path]:
    """Write the seqno files of one stream; return their paths in seqno order."""
    rng = np.random.default_rng([seed, spec.module, sorted(pff.PRODUCTS).index(spec.dp)])
    t0 = int(start.timestamp()) * 1_000_000_000 + 123_456_789
    paths = []
    for seqno in range(spec.files):
        n = spec.frames_per_file
        first = seqno * n
        times = _true_times(rng, spec, t0, n)
        t0 = int(times[-1]) + spec.cadence_ns
        headers = synth_headers(rng, spec, times, first_pkt=first)
        images = synth_images(rng, spec, n, first)
        _apply_faults(rng, spec, images, headers, seqno)
        path = directory / file_name(spec, start, seqno)
        with open(path, "wb") as f:
            pff.write_frames(f, spec.dp, images, headers)
            if "partial_last" in spec.faults and seqno == spec.files - 1:
                tail = pff.encode_frames(spec.dp, images[:1], {k: v[:1] for k, v in
                                                               headers.items()})
                f.write(tail[: len(tail) // 2])
        paths.append(path)
    return paths


def write_housekeeping(directory: Path, records: int = 5) -> Path:
    """hk.pff: single-line JSON records separated by blank lines, the last one cut."""
    lines = [f'{{ "type": "hk", "seq": "{i}", "temp": "{20 + i / 10:.1f}" }}'
             for i in range(records)]
    text = "\n\n".join(lines)
    path = directory / pff.HOUSEKEEPING_NAME
    path.write_text(text[: len(text) - 7])
    return path


def make_observation(root: str | Path, *, seed: int = 0, modules: Sequence[int] = (1,),
                     products: Sequence[str] = ("img16", "ph256"), frames_per_file: int = 2000,
                     files_per_stream: int = 2, timing: str = "wr",
                     faults: Sequence[str] = (), site: str = "Lick",
                     start: dt.datetime = DEFAULT_START) -> Path:
    """Write ``obs_<site>.start_<t>Z.runtype_sci-obs.pffd`` under ``root``; return it."""
    unknown = set(faults) - set(FAULTS)
    if unknown:
        raise ValueError(f"unknown faults {sorted(unknown)}; known: {', '.join(FAULTS)}")
    run = Path(root) / f"obs_{site}.start_{start:%Y-%m-%dT%H:%M:%S}Z.runtype_sci-obs.pffd"
    run.mkdir(parents=True, exist_ok=True)
    for module in modules:
        for dp in pff.PRODUCTS:
            spec = StreamSpec(dp=dp, module=module, frames_per_file=frames_per_file,
                              files=files_per_stream, timing=timing,
                              cadence_ns=1_000_000 if dp.startswith("img") else 5_000_000,
                              faults=frozenset(faults))
            if dp in products:
                write_stream(run, spec, seed=seed, start=start)
            else:  # the DAQ creates every product's file at start
                (run / file_name(spec, start, 0)).touch()
    write_housekeeping(run)
    return run


def write_big_file(directory: str | Path, megabytes: int, *, dp: str = "img16", seed: int = 0,
                   block_frames: int = 16384) -> Path:
    """One large clean stream file (benchmarks), written block by block in bounded memory."""
    spec = StreamSpec(dp=dp, module=1)
    product = pff.PRODUCTS[dp]
    n_total = megabytes * 1_000_000 // product.frame_bytes
    rng = np.random.default_rng(seed)
    path = Path(directory) / file_name(spec, DEFAULT_START, 0)
    t0 = int(DEFAULT_START.timestamp()) * 1_000_000_000
    with open(path, "wb") as f:
        for first in range(0, n_total, block_frames):
            n = min(block_frames, n_total - first)
            times = t0 + (first + np.arange(n, dtype=np.int64)) * spec.cadence_ns
            pff.write_frames(f, dp, synth_images(rng, spec, n, first),
                             synth_headers(rng, spec, times, first_pkt=first))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Write a synthetic PANOSETI observation (or one big file) for tests and demos."""
    from panoseti_pipeline.errors import run_main

    parser = argparse.ArgumentParser(prog="panoseti_pipeline synthetic",
                                     description=main.__doc__)
    parser.add_argument("root", help="directory to write into (created if needed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modules", type=int, nargs="+", default=[1])
    parser.add_argument("--products", nargs="+", default=["img16", "ph256"],
                        choices=sorted(pff.PRODUCTS))
    parser.add_argument("--frames", type=int, default=2000, help="frames per file")
    parser.add_argument("--files-per-stream", type=int, default=2)
    parser.add_argument("--timing", choices=("wr", "gnss"), default="wr")
    parser.add_argument("--faults", default="",
                        help=f"comma-separated subset of {','.join(FAULTS)}, or 'all'")
    parser.add_argument("--single-file-mb", type=int, default=0,
                        help="instead: write one clean img16 file of this many MB")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    faults = FAULTS if args.faults == "all" else [f for f in args.faults.split(",") if f]

    def body() -> int:
        Path(args.root).mkdir(parents=True, exist_ok=True)
        if args.single_file_mb:
            print(write_big_file(args.root, args.single_file_mb, seed=args.seed))
            return 0
        print(make_observation(args.root, seed=args.seed, modules=args.modules,
                               products=args.products, frames_per_file=args.frames,
                               files_per_stream=args.files_per_stream, timing=args.timing,
                               faults=faults))
        return 0

    return run_main(body, "synthetic", args.debug)


if __name__ == "__main__":
    sys.exit(main())
