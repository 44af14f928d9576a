"""Quicklooks: one PNG per product store (L0 or L1), to see a night at a glance.

``python3 -m panoseti_pipeline quicklook STORE... [--out DIR]`` writes ``<store>.png``
(beside the store, or into DIR) with

* the mean image and the noise map (L1: its ``baseline_std``; L0: the per-pixel
  standard deviation over all frames) with hot (x) and dead (o) pixels marked (L1: its
  masks; L0: the same rule, :func:`panoseti_pipeline.step2.quality.pixel_masks`, applied
  to its mean and noise), on the 32x32 module grid with the quadrant borders drawn
  (ph256: each quabo's 16x16 image placed in its quadrant); dead pixels grey, the
  colours spanning the 1st-99th percentile of the other pixels that are not hot
  (:func:`shown`);
* img8, img16: the light curve of the module sum (measured pixels: NaN and a missing
  quabo's quadrant left out), downsampled to at most 2000 bins (mean, min-max band);
  ph256, ph1024 (a frame is one event, ph256's of one quabo): the summed pulse height
  per bin (every pixel of every event in it); with the bins that hold flagged frames
  marked;
* the frame rate (ph: the event rate) and the flagged frames per flag over time;
* for pulse-height products (ph256, ph1024) the histogram of each event's pulse height
  (the maximum over the quabo's 16x16 pixels), per quabo.

What is drawn is a :class:`panoseti_pipeline.look.Look`. Our L1 stores hold theirs
(step 2 gathers it while it writes the images), so their PNG is drawn without reading
the images. Any other store (an L0, a store of another writer, an L1 of an older
version) is read once, in blocks of whole time chunks (about :data:`BLOCK_FRAMES`
frames), each folded into the Look: memory is bounded by the block.

Every axis and colour bar says its unit: the pixels' as the store's images array states
it (``units``: ADC counts, or photoelectrons for an img L1 calibrated per photoelectron);
an L0's pixels are ADC counts.

Examples::

    python3 -m panoseti_pipeline quicklook L1/obs_*/*.zarr
    python3 -m panoseti_pipeline quicklook run_L0.zarr --out /tmp/looks
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from panoseti_pipeline import pff
from panoseti_pipeline.errors import InputError
from panoseti_pipeline.flags import FLAG_NAMES
from panoseti_pipeline.look import NO_TIME, PH_EDGES, QUADRANT_SLICES, Look
from panoseti_pipeline.step2 import quality
from panoseti_pipeline.store import analysis_spec, layout
from panoseti_pipeline.store.safe_write import write_file

BLOCK_FRAMES = 8192  # frames read at a time (rounded to whole time chunks)
DPI = 80
RAW_UNITS = "ADC counts"  # of PFF pixels, and of any array that does not say otherwise


def open_store(path: str | Path) -> tuple[Any, str]:
    """A published L1 or L0 product (ours or PANOSETI's layout) and its level."""
    try:
        return layout.open_product(path, layout.LEVEL_L1), layout.LEVEL_L1
    except InputError:
        return layout.open_product(path, layout.LEVEL_L0), layout.LEVEL_L0


def block_frames(group: Any) -> int:
    """Frames per read: whole (inner) time chunks, about BLOCK_FRAMES."""
    chunk = group["images"].chunks[0]
    return chunk * max(1, BLOCK_FRAMES // chunk)


def accumulate(path: Path, stored: bool = True) -> tuple[Look, dict[str, np.ndarray]]:
    """The :class:`Look` of a store and its pixel maps: the one step 2 stored in our L1
    (``stored``), else read from the store's images once, block by block."""
    group, level = open_store(path)
    dp = group.attrs.get("data_product")
    if dp not in pff.PRODUCTS:
        raise InputError(f"{path}: unknown data_product {dp!r}")
    look = ((Look.load(group, path.name) if stored and level == layout.LEVEL_L1 else None)
            or read_look(path, group, level, dp))
    return look, pixel_maps(look, group, level)


def read_look(path: Path, group: Any, level: str, dp: str) -> Look:
    """Fold every frame of the store into a :class:`Look`, block by block."""
    n = group["images"].shape[0]
    if n == 0:
        raise InputError(f"{path}: the store has no frames")
    look = Look.empty(path.name, level, dp, str(group.attrs.get("module", "?")), n)
    names = set(group.array_keys())
    ph256 = look.groups > 1
    blank = level == layout.LEVEL_L0 and not ph256  # L1 has its NaN already
    step = block_frames(group)
    for a in range(0, n, step):
        b = min(n, a + step)
        images = group["images"][a:b].astype(np.float32)
        if blank:
            quality.blank_missing_quadrants(images, quality.missing_quabos(
                {f"quabo_{q}_tv_sec": group[f"quabo_{q}_tv_sec"][a:b]
                 for q in range(pff.N_QUABOS)}))
        flags = (group["frame_flags"][a:b] if "frame_flags" in names
                 else np.zeros(b - a, np.uint8))
        time_ns = group["time"][a:b] if "time" in names else group["unix_t_ns"][a:b]
        look.add(a, images, flags, time_ns, group["quabo_num"][a:b] if ph256 else None)
    return look


def pixel_maps(look: Look, group: Any, level: str) -> dict[str, np.ndarray]:
    """Mean, noise, hot and dead maps, (groups, y, x) each."""
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = look.pixel_sum / look.pixel_count
        std = np.sqrt(np.maximum(look.pixel_sumsq / look.pixel_count - mean * mean, 0))
    std[look.pixel_count == 0] = np.nan
    names = set(group.array_keys())
    if level == layout.LEVEL_L1 and {"baseline_std", "hot_pixel_mask"} <= names:
        def plane(name: str) -> np.ndarray:  # (y, x) masks (panoseti_analysis): every group
            return np.broadcast_to(group[name][:], (look.groups, *look.shape))

        return {"mean": mean, "noise": plane("baseline_std"),
                "hot": plane("hot_pixel_mask"), "dead": plane("dead_pixel_mask"),
                "noise_label": "baseline_std (pedestal noise)",
                "units": image_units(group, look.dp),
                "noise_units": _units(group["baseline_std"])}
    from panoseti_pipeline.config import load_config

    gain = load_config(None).baseline_subtract.adc_to_pe  # what step 2 judges an L1 with
    hot, dead = quality.pixel_masks(mean, std, gain)
    units = image_units(group, look.dp)
    return {"mean": mean, "noise": std, "hot": hot, "dead": dead,
            "noise_label": "std over all frames", "units": units, "noise_units": units}


def image_units(group: Any, dp: str) -> str:
    """The unit of a store's pixels, as its images array (our name, or the team's layout's)
    states it; raw pixels (an L0's) are ADC counts."""
    names = set(group.array_keys())
    for name in ("images", analysis_spec.main_array(pff.PRODUCTS[dp].family)):
        if name in names:
            return _units(group[name])
    return RAW_UNITS


def _units(array: Any) -> str:
    return str(array.attrs.get("units", RAW_UNITS))


def module_grid(planes: np.ndarray) -> np.ndarray:
    """(groups, y, x) -> one 32x32 image: ph256's quabo images placed in their quadrants."""
    if planes.shape[0] == 1:
        return planes[0]
    out = np.full((32, 32), np.nan, dtype=np.result_type(planes.dtype, np.float32))
    for q, (ys, xs) in QUADRANT_SLICES.items():
        out[ys, xs] = planes[q]
    return out


#: the colour range of the pixel maps: these percentiles of the pixels neither hot nor dead
COLOUR_PERCENTILES = (1.0, 99.0)


def shown(values: np.ndarray, hot: np.ndarray, dead: np.ndarray
          ) -> tuple[np.ma.MaskedArray, float | None, float | None]:
    """A pixel map as drawn: dead pixels masked (grey: their 0 is no measurement, and
    must not look like the brightest or darkest pixel), and the colour range
    :data:`COLOUR_PERCENTILES` of the other pixels that are not hot (hot pixels and
    outliers take the end colours); None: matplotlib's range (no such pixel)."""
    values = np.ma.masked_where(dead.astype(bool) | ~np.isfinite(values), values)
    typical = values.filled(np.nan)[~hot.astype(bool)]
    typical = typical[np.isfinite(typical)]
    if not typical.size:
        return values, None, None
    low, high = (float(v) for v in np.percentile(typical, COLOUR_PERCENTILES))
    return values, low, max(high, low + 1e-6)  # a flat map still gets a range


def render(look: Look, maps: dict[str, Any], out: Path) -> Path:
    """Draw the quicklook of ``look`` into the PNG ``out``."""
    import matplotlib.pyplot as plt

    fig = figure(look, maps)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_file(out, lambda f: fig.savefig(f, dpi=DPI, format="png"))
    plt.close(fig)
    return out


def figure(look: Look, maps: dict[str, Any]) -> Any:
    """The quicklook of ``look`` as a matplotlib figure (closed by the caller)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: batch jobs, SSH sessions
    import matplotlib.pyplot as plt

    units = maps["units"]
    events = look.ph_hist is not None  # ph256, ph1024: a frame is one event
    rows = 4 if events else 3
    fig = plt.figure(figsize=(11, 3.2 * rows + 0.6), dpi=DPI)
    grid = fig.add_gridspec(rows, 2, height_ratios=[1.4] + [1] * (rows - 1), hspace=0.5)
    first = look.t_min[look.t_min != NO_TIME]
    t0 = int(first.min()) if first.size else 0
    span = (int(look.t_max.max()) - t0) / 1e9 if first.size else float("nan")
    start = f"{np.datetime64(t0, 'ns')} UTC" if first.size else "?"
    fig.suptitle(f"{look.name}\n{look.level} {look.dp} module {look.module}: "
                 f"{look.frames} frames, {span:.3f} s from {start}", fontsize=10)
    seconds = f"seconds from {start}"
    hot, dead = module_grid(maps["hot"]), module_grid(maps["dead"])
    for col, (key, title, unit) in enumerate((("mean", "mean image", units),
                                              ("noise", maps["noise_label"],
                                               maps["noise_units"]))):
        ax = fig.add_subplot(grid[0, col])
        values, low, high = shown(module_grid(maps[key]), hot, dead)
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
        image = ax.imshow(values, origin="upper", cmap=cmap, vmin=low, vmax=high,
                          interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04,
                     extend="both").set_label(unit, fontsize=8)
        for line in (15.5,):
            ax.axhline(line, color="white", lw=1)
            ax.axvline(line, color="white", lw=1)
        ys, xs = np.nonzero(hot)
        ax.scatter(xs, ys, marker="x", s=40, color="red", label=f"hot ({len(xs)})")
        ys, xs = np.nonzero(dead)
        ax.scatter(xs, ys, marker="o", s=40, facecolors="none", edgecolors="cyan",
                   label=f"dead ({len(xs)})")
        ax.set_title(title + (" (quabo images in their quadrants)" if look.groups > 1 else ""),
                     fontsize=9)
        ax.set_xlabel("x (pixel)", fontsize=8)
        ax.set_ylabel("y (pixel)", fontsize=8)
        ax.legend(loc="upper right", fontsize=7, framealpha=0.6)
    x = _bin_seconds(look, t0)
    ax = fig.add_subplot(grid[1, :])
    have = look.lc_count > 0
    if events:  # a sum over a bin's events, not a mean over frames of a steady module
        floor = look.lc_sum
        ax.plot(x[have], floor[have], color="C0", lw=0.8, label="sum in bin")
        ax.set_title(f"summed pulse height per bin: every pixel of every event in it "
                     f"({look.bins} bins)", fontsize=9)
        ax.set_ylabel(f"summed pulse height ({units})", fontsize=8)
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = look.lc_sum / look.lc_count
        floor = look.lc_min
        ax.fill_between(x[have], look.lc_min[have], look.lc_max[have], color="C0",
                        alpha=0.25, lw=0, label="min-max in bin")
        ax.plot(x[have], mean[have], color="C0", lw=0.8, label="mean in bin")
        ax.set_title(f"light curve: module sum of the measured pixels ({look.bins} bins)",
                     fontsize=9)
        ax.set_ylabel(f"module sum ({units})", fontsize=8)
    flagged = look.bin_flags.sum(axis=0) > 0
    if flagged.any() and have.any():
        ax.plot(x[flagged], np.full(flagged.sum(), np.nanmin(floor[have])), "|",
                color="red", ms=12, label=f"bins with flagged frames ({flagged.sum()})")
    ax.set_xlabel(seconds)
    ax.legend(loc="upper right", fontsize=7)
    ax = fig.add_subplot(grid[2, 0])
    rate = _frame_rate(look)
    ax.plot(x, rate, color="C2", lw=0.8)
    top = np.nanmax(rate) if np.isfinite(rate).any() else 1.0
    ax.set_ylim(0, 1.15 * top)  # a steady rate is a line below the top, not on it
    ax.ticklabel_format(axis="y", useOffset=False)  # 1000 +- jitter, not "+1e3"
    per_second = "events/s" if events else "frames/s"
    ax.set_title(f"{'event' if events else 'frame'} rate ({per_second})", fontsize=9)
    ax.set_ylabel(per_second, fontsize=8)
    ax.set_xlabel(seconds)
    ax = fig.add_subplot(grid[2, 1])
    drawn = False
    for i, name in enumerate(FLAG_NAMES.values()):
        if look.bin_flags[i].any():
            ax.step(x, look.bin_flags[i], where="mid", lw=0.8,
                    label=f"{name} ({look.bin_flags[i].sum()})")
            drawn = True
    ax.set_title("flagged frames per bin", fontsize=9)
    ax.set_ylabel("frames", fontsize=8)
    ax.set_xlabel(seconds)
    if drawn:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no flagged frames", ha="center", va="center",
                transform=ax.transAxes)
    if events:
        ax = fig.add_subplot(grid[3, :])
        centres = (PH_EDGES[:-1] + PH_EDGES[1:]) / 2
        for q in range(pff.N_QUABOS):
            if look.ph_hist[q].any():
                ax.step(centres, look.ph_hist[q], where="mid", lw=0.8,
                        label=f"quabo {q} ({look.ph_hist[q].sum()} events)")
        ax.set_yscale("log")
        ax.set_title("pulse height per event and quabo (max of its 16x16 pixels; values "
                     "outside the axis in the end bins)", fontsize=9)
        ax.set_xlabel(f"pulse height ({units}"
                      + (" above the baseline)" if look.level == "L1" else ")"))
        ax.set_ylabel("events", fontsize=8)
        ax.legend(fontsize=7)
    return fig


def _bin_seconds(look: Look, t0: int) -> np.ndarray:
    """Each bin's mid time in seconds from t0 (bins with no time: interpolated)."""
    timed = look.t_min != NO_TIME
    mid = np.full(look.bins, np.nan)
    mid[timed] = ((look.t_min[timed] - t0) + (look.t_max[timed] - t0)) / 2e9
    if timed.any() and not timed.all():
        idx = np.arange(look.bins)
        mid = np.interp(idx, idx[timed], mid[timed])
    return mid


def _frame_rate(look: Look) -> np.ndarray:
    """Frames per second per bin: its frames over the time to the next bin's first frame
    (the last bin: over its own span)."""
    start = look.t_min.astype(np.float64)
    start[look.t_min == NO_TIME] = np.nan
    rate = np.full(look.bins, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate[:-1] = look.bin_frames[:-1] / ((start[1:] - start[:-1]) / 1e9)
        last = (look.t_max[-1] - look.t_min[-1]) / 1e9
        if look.bin_frames[-1] > 1 and last > 0:
            rate[-1] = (look.bin_frames[-1] - 1) / last
    rate[~np.isfinite(rate)] = np.nan
    return rate


def png_path(store: Path, out_dir: Path | None = None) -> Path:
    """``<store name without .zarr>.png``, beside the store or in ``out_dir``."""
    return (out_dir or store.parent) / f"{store.name.removesuffix('.zarr')}.png"


def quicklook(store: str | Path, out_dir: Path | None = None) -> Path:
    """Write the quicklook PNG of one store; its path."""
    store = Path(store)
    look, maps = accumulate(store)
    return render(look, maps, png_path(store, out_dir))


def main(argv: Sequence[str] | None = None,
         prog: str = "python3 -m panoseti_pipeline quicklook") -> int:
    """Write a quicklook PNG per L0 or L1 store."""
    from panoseti_pipeline.errors import report_each, run_main
    from panoseti_pipeline.version import add_version_option

    parser = argparse.ArgumentParser(prog=prog, description=main.__doc__)
    add_version_option(parser)
    parser.add_argument("stores", nargs="+", help="L0 or L1 Zarr stores")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for the PNGs (default: beside each store)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)

    def body() -> int:
        return report_each(args.stores, lambda store: print(quicklook(store, args.out)),
                           "quicklook", args.debug)

    return run_main(body, "quicklook", args.debug)


if __name__ == "__main__":
    sys.exit(main())
