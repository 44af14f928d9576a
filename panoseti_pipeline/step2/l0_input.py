"""Step 2's input: checking an L0 store, reading its frames, and which frames feed a baseline.

:func:`inspect_l0` checks the store once, in the driver, and describes it in a small
:class:`L0Info` that every task receives. A :class:`Selection` says which frames feed
each quabo's baseline; :func:`selected` reads a task's frames and applies it, and the
per-quabo frame records it returns end up in the L1 attributes.

A module frame whose quabo ``q`` is missing (``quabo_<q>_tv_sec == 0``, the frame is
flagged ``missing_quabo``) does not enter quadrant ``q``'s baseline (PFF_FORMAT.md §5):
its zeros are not a measurement. A ph256 frame is one quabo's image (``quabo_num``).

The L0 is any store of PANOSETI's layout (:mod:`panoseti_pipeline.store.spec`): ours,
or one written by ``pypff.zarr.convert_run``, which has no ``time`` and no
``frame_flags``: step 2 then derives them (:meth:`L0Info.derive`).
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
from panoseti_pipeline.store import layout, spec

QUADRANT = np.zeros((32, 32), np.int8)  # module image pixel -> quabo (PFF_FORMAT.md §5)
QUADRANT[:16, 16:], QUADRANT[16:, 16:], QUADRANT[16:, :16] = 1, 2, 3
MAX_LISTED_FRAMES = 1000  # excluded frame indices listed in the attributes
#: arrays step 2 derives when an L0 of another writer lacks them
DERIVED = ("time", "frame_flags")


@dataclasses.dataclass(frozen=True)
class L0Info:
    """What every task needs to know about the L0 input (small, pickled to workers)."""

    path: str
    dp: str
    n_frames: int
    shape: tuple[int, int]
    dtype: str
    module: int
    derived: tuple[str, ...]  # of DERIVED, those the L0 lacks (computed for L1)
    token: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)  # this run

    @property
    def ph256(self) -> bool:
        return pff.PRODUCTS[self.dp].header_kind == "ph256"

    @property
    def kind(self) -> str:
        """The product's family, "ph" or "img"."""
        return self.product.family

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

    @property
    def product(self) -> pff.Product:
        return pff.PRODUCTS[self.dp]

    @property
    def carried(self) -> list[str]:
        """The per-frame arrays read from the L0 into the L1 (all but ``images``)."""
        return [a.name for a in spec.frame_arrays(self.product, self.module)[1:]
                if a.name not in self.derived]

    def array(self, name: str) -> Any:
        """Array ``name`` of the L0 store, opened once per process and run: read by
        :mod:`panoseti_pipeline.store.shard_reader` when it is one of our shard layout."""
        return layout.open_array(self.path, name, layout.LEVEL_L0, self.token)

    def quabo_state(self, start: int, stop: int) -> np.ndarray:
        """Frames start..stop-1: ``quabo_num`` (ph256), else ``tv_sec`` per quabo
        (time, quabo), 0 where that quabo is missing."""
        if self.ph256:
            return self.array("quabo_num")[start:stop]
        return np.stack([self.array(f"quabo_{q}_tv_sec")[start:stop]
                         for q in range(pff.N_QUABOS)], axis=1)

    def derive(self, frames: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``time`` and ``frame_flags`` of an L0 that lacks them, from its carried
        ``frames``: ``time`` is ``unix_t_ns``; the flags hold ``missing_quabo`` only (the
        other flags need the PFF files: unknown, said in the L1 attributes)."""
        out: dict[str, np.ndarray] = {}
        if "time" in self.derived:
            out["time"] = frames["unix_t_ns"]
        if "frame_flags" in self.derived:
            from panoseti_pipeline.step2.quality import missing_quabos  # imports this module

            n = len(frames["unix_t_ns"])
            missing = (np.zeros(n, bool) if self.ph256
                       else missing_quabos(frames).any(axis=1))
            out["frame_flags"] = np.where(missing, pff.FLAG_MISSING_QUABO, 0).astype(np.uint8)
        return out


def inspect_l0(path: str | os.PathLike) -> L0Info:
    """Open and check an L0 store; :class:`InputError` naming what is wrong."""
    group = layout.open_product(path, layout.LEVEL_L0)
    where = Path(path)
    dp = group.attrs.get("data_product")
    if dp not in pff.PRODUCTS:
        raise InputError(f"{where}: unknown data_product {dp!r} in the L0 attributes")
    product = pff.PRODUCTS[dp]
    try:
        module = int(group.attrs.get("module"))
    except (TypeError, ValueError):
        raise InputError(f"{where}: no module number in the L0 attributes "
                         f"(module = {group.attrs.get('module')!r})") from None
    names = arrays_of(group)
    wanted = [a.name for a in spec.frame_arrays(product, module)]
    derived = tuple(n for n in DERIVED if n not in names)
    missing = [n for n in wanted if n not in names and n not in derived]
    if missing:
        raise InputError(f"{where}: L0 incomplete or not PANOSETI's layout: no array "
                         f"{', '.join(missing)}")
    images = names["images"]
    n = images.shape[0]
    if images.shape[1:] != product.shape or images.dtype != product.dtype:
        raise InputError(f"{where}: images are {images.dtype}{list(images.shape)}, a {dp} "
                         f"L0 store has {product.dtype}[n, {product.shape[0]}, "
                         f"{product.shape[1]}]")
    if n == 0:
        raise InputError(f"{where}: the L0 store has no frames")
    declared = group.attrs.get("total_frames", n)
    if declared != n:
        raise InputError(f"{where}: L0 incomplete: attributes say {declared} frames, "
                         f"images hold {n}")
    for name in (n for n in wanted if n in names):
        a = names[name]
        if not _time_dim(a) or a.shape[0] != n:
            raise InputError(f"{where}: L0 incomplete: {name} has {a.shape[0]} frames, "
                             f"images {n}")
        missing_files, expected = layout.missing_files(where, a)
        if missing_files:
            raise InputError(f"{where}: L0 incomplete: {name} has {missing_files} of "
                             f"{expected} chunk files missing")
    return L0Info(str(where), dp, n, product.shape, product.dtype.str, module, derived)


def arrays_of(group: Any) -> dict[str, Any]:
    """Every array at the root of a (flat) product group, by name."""
    import zarr

    return {k: v for k, v in group.members() if isinstance(v, zarr.Array)}


def _time_dim(array: Any) -> bool:
    dims = array.metadata.dimension_names or ()
    return bool(dims) and dims[0] == "time"


# --------------------------------------------------------------------------- selection


@dataclasses.dataclass(frozen=True, eq=False)
class Selection:
    """Frames that feed the baseline: index < cutoff[q] and index % step == 0, or the
    L0 positions ``picked``; ``pooled``: every ph256 frame feeds group 0 (one baseline
    for all quabos), else a ph256 frame feeds its quabo's."""

    cutoff: tuple[int, ...]  # per quabo
    step: int
    picked: np.ndarray | None = None  # ascending L0 positions, instead of cutoff and step
    pooled: bool = False

    @classmethod
    def positions(cls, picked: np.ndarray, pooled: bool) -> Selection:
        """The frames at L0 positions ``picked`` (ascending, not empty)."""
        return cls((int(picked[-1]) + 1,) * pff.N_QUABOS, 1, picked, pooled)

    @property
    def stop(self) -> int:
        return max(self.cutoff)


def _chunk_use(info: L0Info, sel: Selection, start: int, aux: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """``use[t, q]`` (frame start+t feeds quabo q) and ``excluded[t, q]`` (missing quabo).

    ``aux`` is :meth:`L0Info.quabo_state`.
    """
    t = start + np.arange(len(aux))
    chosen = (t[:, None] < np.asarray(sel.cutoff)) & (t % sel.step == 0)[:, None]
    if sel.picked is not None:
        near = sel.picked[np.searchsorted(sel.picked, start):
                          np.searchsorted(sel.picked, start + len(aux))]
        chosen &= np.isin(t, near)[:, None]
    if info.ph256:
        return chosen & (aux[:, None] == np.arange(pff.N_QUABOS)), np.zeros_like(chosen)
    missing = aux == 0  # the frame is flagged missing_quabo
    return chosen & ~missing, chosen & missing


def window_selection(l0: Any, info: L0Info, window: int, chunk: int) -> tuple[Selection, bool]:
    """The first ``window`` frames (of each quabo for ph256); and whether data ran short.

    For ph256 ``quabo_num`` is read chunk by chunk only until every quabo has
    its ``window`` frames (usually the first chunk).
    """
    if not info.ph256:
        return Selection((min(window, info.n_frames),) * pff.N_QUABOS, 1), window > info.n_frames
    cutoff = [info.n_frames] * pff.N_QUABOS
    seen = np.zeros(pff.N_QUABOS, np.int64)
    quabo_num = l0["quabo_num"]
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
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]], np.ndarray]:
    """Frames start..stop-1 that feed some baseline: images, use[t, q], aux; the record;
    their L0 positions."""
    stop = min(stop, sel.stop)
    x, aux = info.array("images")[start:stop], info.quabo_state(start, stop)
    use, excluded = _chunk_use(info, sel, start, aux)
    record = _frame_record(use, excluded, start)
    feeds = use.any(axis=1)
    if sel.pooled:  # the statistics put every frame in group 0 (aux is quabo_num)
        aux = np.zeros_like(aux)
    if feeds.all():  # the usual case: no copy
        return x, use, aux, record, np.arange(start, stop)
    return x[feeds], use[feeds], aux[feeds], record, start + np.flatnonzero(feeds)


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
