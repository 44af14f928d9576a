"""What a quicklook shows, accumulated in one pass: :class:`Look`.

Step 2 folds every L1 chunk into a :class:`Look` while the chunk is in memory anyway
(touch the data once), merges the parts in frame order and stores the result small in
the L1 (the ``quicklook`` array, :meth:`Look.save`), so a quicklook of our L1 renders
without reading the images again (:meth:`Look.load`). For any other store (an L0, a
store of another writer) :mod:`panoseti_pipeline.quicklook` reads the images and folds
them into a :class:`Look` the same way.

Parts are combined in frame order whatever order they were made in, so local threads
and a Dask cluster store the same bytes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from panoseti_pipeline import pff
from panoseti_pipeline.flags import FLAG_NAMES
from panoseti_pipeline.pff.timing import NAT

LC_BINS = 2000  # light-curve and time-series bins at most
PH_EDGES = np.arange(-512, 4096 + 16, 16)  # pulse-height histogram bins (ADC counts)
#: quabo -> (rows, columns) of its quadrant in a 32x32 module image (PFF_FORMAT.md §5)
QUADRANT_SLICES = {0: (slice(0, 16), slice(0, 16)), 1: (slice(0, 16), slice(16, 32)),
                   2: (slice(16, 32), slice(16, 32)), 3: (slice(16, 32), slice(0, 16))}
ARRAY = "quicklook"  # the L1's array holding its stored Look
VERSION = 1  # of the stored Look's layout; another version is read from the images
NO_TIME = np.iinfo(np.int64).max  # t_min of a bin with no timed frame
#: how two parts' arrays combine
_SUMS = ("pixel_sum", "pixel_sumsq", "pixel_count", "lc_sum", "lc_count", "bin_frames",
         "bin_flags", "ph_hist")
_MINS = ("lc_min", "t_min")
_MAXS = ("lc_max", "t_max")
_META = ("level", "dp", "module", "frames", "groups", "bins")
_TIMES = {"t_min": NO_TIME, "t_max": NAT}  # time arrays and their "no time" value
_INTEGERS = ("pixel_count", "lc_count", "bin_frames", "bin_flags", "ph_hist")


@dataclasses.dataclass
class Look:
    """What a quicklook shows, accumulated block by block (small: pixels and bins)."""

    name: str
    level: str
    dp: str
    module: str
    frames: int
    groups: int  # baseline images: 4 for ph256 (one per quabo), else 1
    shape: tuple[int, int]
    bins: int
    pixel_sum: np.ndarray
    pixel_sumsq: np.ndarray
    pixel_count: np.ndarray
    lc_sum: np.ndarray
    lc_count: np.ndarray
    lc_min: np.ndarray
    lc_max: np.ndarray
    bin_frames: np.ndarray
    bin_flags: np.ndarray  # (flag, bin): frames carrying each flag
    t_min: np.ndarray
    t_max: np.ndarray
    ph_hist: np.ndarray | None  # (quabo, bin)

    @classmethod
    def empty(cls, name: str, level: str, dp: str, module: str, frames: int) -> Look:
        product = pff.PRODUCTS[dp]
        groups = pff.N_QUABOS if product.header_kind == "ph256" else 1
        bins = max(1, min(frames, LC_BINS))
        plane = (groups, *product.shape)
        return cls(name, level, dp, module, frames, groups, product.shape, bins,
                   np.zeros(plane), np.zeros(plane), np.zeros(plane, np.int64),
                   np.zeros(bins), np.zeros(bins, np.int64), np.full(bins, np.inf),
                   np.full(bins, -np.inf), np.zeros(bins, np.int64),
                   np.zeros((len(FLAG_NAMES), bins), np.int64),
                   np.full(bins, NO_TIME), np.full(bins, NAT),
                   np.zeros((pff.N_QUABOS, len(PH_EDGES) - 1), np.int64)
                   if dp.startswith("ph") else None)

    def add(self, start: int, images: np.ndarray, flags: np.ndarray, time_ns: np.ndarray,
            quabo: np.ndarray | None, nan_free: bool = False) -> None:
        """Fold in frames start..start+len(images)-1 (float32, NaN = not measured;
        ``nan_free``: the caller knows there is no NaN, which saves a pass).

        Sums run in float32 within the block (numpy's pairwise sums over a frame's pixels;
        over frames, one pass per pixel) and accumulate in float64 across blocks: a few
        ms per 8192-frame chunk, and errors of about 1e-6 of the value, far below what a
        plot shows.
        """
        b = (start + np.arange(len(images))) * self.bins // self.frames
        finite = None if nan_free else np.isfinite(images)
        if finite is not None and finite.all():
            finite = None
        z = images if finite is None else np.where(finite, images, np.float32(0))
        groups = quabo.astype(np.intp) if quabo is not None else np.zeros(len(images), np.intp)
        for g in np.unique(groups):
            mine = z if self.groups == 1 else z[groups == g]  # no copy for modules
            self.pixel_sum[g] += mine.sum(axis=0)
            self.pixel_sumsq[g] += np.einsum("fyx,fyx->yx", mine, mine)
            self.pixel_count[g] += (len(mine) if finite is None else
                                    finite[groups == g].sum(axis=0))
        total = z.reshape(len(z), -1).sum(axis=1).astype(np.float64)
        measured = (np.ones(len(z), bool) if finite is None
                    else finite.reshape(len(z), -1).any(axis=1))
        self.lc_sum += np.bincount(b[measured], total[measured], self.bins)
        self.lc_count += np.bincount(b[measured], minlength=self.bins)
        np.minimum.at(self.lc_min, b[measured], total[measured])
        np.maximum.at(self.lc_max, b[measured], total[measured])
        self.bin_frames += np.bincount(b, minlength=self.bins)
        for i, bit in enumerate(FLAG_NAMES):
            self.bin_flags[i] += np.bincount(b, (flags & bit) != 0, self.bins).astype(np.int64)
        timed = time_ns != NAT
        np.minimum.at(self.t_min, b[timed], time_ns[timed])
        np.maximum.at(self.t_max, b[timed], time_ns[timed])
        if self.ph_hist is not None:
            self._add_pulse_heights(images, groups)

    def _add_pulse_heights(self, images: np.ndarray, groups: np.ndarray) -> None:
        """Each event's pulse height per quabo: the maximum over its 16x16 pixels."""
        if self.groups > 1:  # ph256: a frame is one quabo's image
            heights = np.fmax.reduce(images.reshape(len(images), -1), axis=1)[:, None]
            owner = groups[:, None]
        else:  # ph1024: four quadrants per frame
            heights = np.stack([np.fmax.reduce(images[:, ys, xs].reshape(len(images), -1),
                                               axis=1)
                                for ys, xs in QUADRANT_SLICES.values()], axis=1)
            owner = np.broadcast_to(np.arange(pff.N_QUABOS), heights.shape)
        ok = np.isfinite(heights)
        k = np.clip(np.searchsorted(PH_EDGES, heights[ok], side="right") - 1, 0,
                    len(PH_EDGES) - 2)
        self.ph_hist += np.bincount(owner[ok] * (len(PH_EDGES) - 1) + k,
                                    minlength=self.ph_hist.size).reshape(self.ph_hist.shape)

    def merge(self, other: Look) -> Look:
        """Fold another part of the same store into this one (in place); this one."""
        for name in _SUMS:
            mine = getattr(self, name)
            if mine is not None:
                mine += getattr(other, name)
        for name in _MINS:
            np.minimum(getattr(self, name), getattr(other, name), out=getattr(self, name))
        for name in _MAXS:
            np.maximum(getattr(self, name), getattr(other, name), out=getattr(self, name))
        return self

    def save(self, group: Any) -> None:
        """Store it as ``group``'s array :data:`ARRAY`: one float64 array (two files: a
        product's file count matters on BeeGFS), its layout in the array's attributes.

        Counts are exact in float64 (below 2**53); times are stored as ns after the first
        bin's first time (exact for spans below 104 days), NaN where a bin has none.
        """
        t0 = int(self.t_min.min()) if (self.t_min != NO_TIME).any() else 0
        pieces, where, offset = [], {}, 0
        for name in (*_SUMS, *_MINS, *_MAXS):
            values = getattr(self, name)
            if values is None:
                continue
            if name in _TIMES:
                values = np.where(values == _TIMES[name], np.nan, (values - t0).astype(float))
            pieces.append(np.asarray(values, np.float64).ravel())
            where[name] = [offset, list(values.shape)]
            offset += pieces[-1].size
        group.create_array(ARRAY, data=np.concatenate(pieces), compressors=None,
                           dimension_names=(f"{ARRAY}_value",), attributes={
            "version": VERSION, **{k: getattr(self, k) for k in _META}, "t0_ns": t0,
            "layout": where,
            "description": "what the quicklook shows, gathered by step 2 while it wrote the "
                           "images: per-pixel sums, light-curve and flag bins, times, "
                           "pulse-height histograms, one after another as 'layout' says "
                           "(panoseti_pipeline.look)"})

    @classmethod
    def load(cls, group: Any, name: str) -> Look | None:
        """The Look stored in ``group`` (an L1 of ours), or None if there is none."""
        if ARRAY not in set(group.array_keys()):
            return None
        array = group[ARRAY]
        meta = dict(array.attrs)
        if meta.get("version") != VERSION:
            return None
        flat = array[...]
        arrays: dict[str, np.ndarray | None] = {}
        for key in (*_SUMS, *_MINS, *_MAXS):
            if key not in meta["layout"]:
                arrays[key] = None
                continue
            offset, shape = meta["layout"][key]
            values = flat[offset: offset + int(np.prod(shape))].reshape(shape)
            if key in _TIMES:
                values = np.where(np.isnan(values), _TIMES[key],
                                  meta["t0_ns"] + np.nan_to_num(values).astype(np.int64))
            elif key in _INTEGERS:
                values = values.astype(np.int64)
            arrays[key] = values
        product = pff.PRODUCTS[meta["dp"]]
        return cls(name, meta["level"], meta["dp"], meta["module"], meta["frames"],
                   meta["groups"], product.shape, meta["bins"], **arrays)
