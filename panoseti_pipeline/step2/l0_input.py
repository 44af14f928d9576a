"""Step 2's input: checking an L0 store, reading its frames, and which frames feed a baseline.

:func:`inspect_l0` checks the store once, in the driver, and describes it in a small
:class:`L0Info` that every task receives. A :class:`Selection` says which frames feed
each quabo's baseline; :func:`selected` reads a task's frames and applies it, and the
per-quabo frame records it returns end up in the L1 attributes.

A module frame flagged ``missing_quabo`` whose quabo ``q`` has ``headers/tv_sec[:, q] ==
0`` does not enter quadrant ``q``'s baseline (PFF_FORMAT.md §5): its zeros are not a
measurement. A ph256 frame is one quabo's image (``headers/quabo_num``).
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from panoseti_pipeline import pff
from panoseti_pipeline.errors import InputError
from panoseti_pipeline.store import layout

QUADRANT = np.zeros((32, 32), np.int8)  # module image pixel -> quabo (PFF_FORMAT.md §5)
QUADRANT[:16, 16:], QUADRANT[16:, 16:], QUADRANT[16:, :16] = 1, 2, 3
MAX_LISTED_FRAMES = 1000  # excluded frame indices listed in the attributes
REQUIRED = ("images", "time", "timestamps", "frame_flags", "headers/tv_sec")


@dataclasses.dataclass(frozen=True)
class L0Info:
    """What every task needs to know about the L0 input (small, pickled to workers)."""

    path: str
    dp: str
    n_frames: int
    shape: tuple[int, int]
    dtype: str
    per_frame: tuple[str, ...]  # arrays with a leading time axis, carried into L1
    token: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)  # this run

    @property
    def ph256(self) -> bool:
        return pff.PRODUCTS[self.dp].header_kind == "ph256"

    @property
    def groups(self) -> int:
        """Number of baseline images: one per quabo for ph256, else one."""
        return pff.N_QUABOS if self.ph256 else 1

    @property
    def pixels(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def offset(self) -> int:
        """Added to a pixel to map it onto 0..65535 (the histogram range)."""
        return int(np.iinfo(np.dtype(self.dtype)).min)

    def array(self, name: str) -> Any:
        """Array ``name`` of the L0 store, opened once per process and run."""
        return layout.open_array(self.path, name, layout.LEVEL_L0, self.token)


def inspect_l0(path: str | os.PathLike) -> L0Info:
    """Open and check an L0 store; :class:`InputError` naming what is wrong."""
    group = layout.open_product(path, layout.LEVEL_L0)
    where = Path(path)
    dp = group.attrs.get("data_product")
    if dp not in pff.PRODUCTS:
        raise InputError(f"{where}: unknown data_product {dp!r} in the L0 attributes")
    product = pff.PRODUCTS[dp]
    names = arrays_of(group)
    needed = (*REQUIRED, "headers/quabo_num") if product.header_kind == "ph256" else REQUIRED
    missing = [n for n in needed if n not in names]
    if missing:
        raise InputError(f"{where}: L0 incomplete: no array {', '.join(missing)}")
    images = names["images"]
    n = images.shape[0]
    if images.shape[1:] != product.shape or images.dtype != product.dtype:
        raise InputError(f"{where}: images are {images.dtype}{list(images.shape)}, a {dp} "
                         f"L0 store has {product.dtype}[n, {product.shape[0]}, "
                         f"{product.shape[1]}]")
    if n == 0:
        raise InputError(f"{where}: the L0 store has no frames")
    if group.attrs.get("n_frames", n) != n:
        raise InputError(f"{where}: L0 incomplete: attributes say {group.attrs['n_frames']} "
                         f"frames, images hold {n}")
    per_frame = tuple(k for k, a in names.items() if k != "images" and _time_dim(a))
    for name in ("images", *per_frame):
        a = names[name]
        if a.shape[0] != n:
            raise InputError(f"{where}: L0 incomplete: {name} has {a.shape[0]} frames, "
                             f"images {n}")
        if a.nchunks_initialized != a.nchunks:
            raise InputError(f"{where}: L0 incomplete: {name} has "
                             f"{a.nchunks - a.nchunks_initialized} of {a.nchunks} chunks "
                             "missing")
    return L0Info(str(where), dp, n, product.shape, product.dtype.str, per_frame)


def arrays_of(group: Any) -> dict[str, Any]:
    """Every array of a group, nested ones by their path (``headers/tv_sec``)."""
    import zarr

    return {k: v for k, v in group.members(max_depth=None) if isinstance(v, zarr.Array)}


def _time_dim(array: Any) -> bool:
    dims = array.metadata.dimension_names or ()
    return bool(dims) and dims[0] == "time"


# --------------------------------------------------------------------------- selection


@dataclasses.dataclass(frozen=True)
class Selection:
    """Frames that feed the baseline: index < cutoff[q] and index % step == 0."""

    cutoff: tuple[int, ...]  # per quabo
    step: int

    @property
    def stop(self) -> int:
        return max(self.cutoff)


def _chunk_use(info: L0Info, sel: Selection, start: int, flags: np.ndarray,
               aux: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``use[t, q]`` (frame start+t feeds quabo q) and ``excluded[t, q]`` (missing quabo).

    ``aux`` is ``headers/quabo_num`` for ph256, ``headers/tv_sec`` (time, quabo) otherwise.
    """
    t = start + np.arange(len(flags))
    chosen = (t[:, None] < np.asarray(sel.cutoff)) & (t % sel.step == 0)[:, None]
    if info.ph256:
        return chosen & (aux[:, None] == np.arange(pff.N_QUABOS)), np.zeros_like(chosen)
    missing = ((flags & pff.FLAG_MISSING_QUABO) != 0)[:, None] & (aux == 0)
    return chosen & ~missing, chosen & missing


def window_selection(l0: Any, info: L0Info, window: int, chunk: int) -> tuple[Selection, bool]:
    """The first ``window`` frames (of each quabo for ph256); and whether data ran short.

    For ph256 ``headers/quabo_num`` is read chunk by chunk only until every quabo has
    its ``window`` frames (usually the first chunk).
    """
    if not info.ph256:
        return Selection((min(window, info.n_frames),) * pff.N_QUABOS, 1), window > info.n_frames
    cutoff = [info.n_frames] * pff.N_QUABOS
    seen = np.zeros(pff.N_QUABOS, np.int64)
    quabo_num = l0["headers/quabo_num"]
    for a in range(0, info.n_frames, chunk):
        q = quabo_num[a: a + chunk]
        for k in np.flatnonzero(seen < window):
            hits = np.flatnonzero(q == k)
            if seen[k] + hits.size >= window:
                cutoff[k] = a + int(hits[window - seen[k] - 1]) + 1
            seen[k] += hits.size
        if (seen >= window).all():
            break
    return Selection(tuple(cutoff), 1), bool((seen < window).any())


def _read(info: L0Info, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images, frame flags and the quabo array (quabo_num or tv_sec) of frames start..stop-1."""
    aux = "headers/quabo_num" if info.ph256 else "headers/tv_sec"
    return tuple(info.array(k)[start:stop]  # type: ignore[return-value]
                 for k in ("images", "frame_flags", aux))


def _frame_record(use: np.ndarray, excluded: np.ndarray, start: int) -> list[dict[str, Any]]:
    """Per quabo: frames used (count, first, last) and excluded missing-quabo frames."""
    out = []
    for q in range(use.shape[1]):
        idx = np.flatnonzero(use[:, q])
        gone = np.flatnonzero(excluded[:, q])
        out.append({"count": int(idx.size),
                    "first": int(start + idx[0]) if idx.size else None,
                    "last": int(start + idx[-1]) if idx.size else None,
                    "excluded_count": int(gone.size),  # a dead quabo: counted, listed short
                    "excluded": (start + gone[:MAX_LISTED_FRAMES]).tolist()})
    return out


def selected(info: L0Info, sel: Selection, start: int, stop: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Frames start..stop-1 that feed some baseline: images, use[t, q], aux; the record."""
    x, flags, aux = _read(info, start, min(stop, sel.stop))
    use, excluded = _chunk_use(info, sel, start, flags, aux)
    record = _frame_record(use, excluded, start)
    feeds = use.any(axis=1)
    if feeds.all():  # the usual case: no copy
        return x, use, aux, record
    return x[feeds], use[feeds], aux[feeds], record


def combine_frames(records: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per-quabo frame records of all chunks (in chunk order) into one."""
    out = []
    for q in range(pff.N_QUABOS):
        rows = [r[q] for r in records]
        firsts = [r["first"] for r in rows if r["first"] is not None]
        excluded = [i for r in rows for i in r["excluded"]][:MAX_LISTED_FRAMES]
        out.append({"quabo": q, "count": sum(r["count"] for r in rows),
                    "first": min(firsts) if firsts else None,
                    "last": max(r["last"] for r in rows if r["last"] is not None)
                    if firsts else None,
                    "excluded_missing_quabo": sum(r["excluded_count"] for r in rows),
                    "excluded_frames": excluded})
    return out
