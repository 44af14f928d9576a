"""What a published product store says about itself: the facts the catalog and
``pff.py info STORE.zarr`` show.

Everything comes from the root ``zarr.json`` (its attributes and consolidated metadata:
level, product, module, observation, frames, flag counts, creation time, the array shapes
for the uncompressed size), the bytes on disk, and the first and last time chunk of
``unix_t_ns`` (the first and last frame that has a time: a frame with none holds NaT).
Nothing else is read, so a night's store is described in milliseconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from panoseti_pipeline.errors import InputError
from panoseti_pipeline.store.publish import store_bytes

ROOT_DOCUMENT = "zarr.json"
TIME_ARRAY = "unix_t_ns"


@dataclasses.dataclass(frozen=True)
class StoreFacts:
    """One product store, described. Times are int64 ns (None: no frame has a time)."""

    path: str
    level: str
    data_product: str
    module: int | None
    run: str  # the observation run directory's name without .pffd ("" for a lone file)
    site: str
    frames: int
    first_ns: int | None
    last_ns: int | None
    flag_counts: dict[str, int]
    created: str
    zarr_json_sha256: str
    bytes: int  # on disk
    raw_bytes: int  # of every array, uncompressed
    pff_to_l0: float | None  # step 1's compression (of this L0, or of an L1's L0)
    l1_to_l0: float | None
    skipped_ranges: int  # corrupt byte ranges of the input step 1 skipped

    @property
    def compression_ratio(self) -> float | None:
        return self.raw_bytes / self.bytes if self.bytes else None

    @property
    def status(self) -> str:
        """What the store is: ``ok``, or ``degraded`` (step 1 skipped corrupt bytes of its
        input; the frames there are lost, the others exact)."""
        return "degraded" if self.skipped_ranges else "ok"


def read_root(path: str | os.PathLike) -> tuple[bytes, dict[str, Any]]:
    """The root ``zarr.json`` of a store: (its bytes, parsed); InputError if it has none."""
    doc = Path(path) / ROOT_DOCUMENT
    try:
        data = doc.read_bytes()
        meta = json.loads(data)
    except FileNotFoundError:
        raise InputError(f"{path}: not a Zarr v3 store (no {ROOT_DOCUMENT})") from None
    except OSError as err:
        raise InputError(f"{doc}: cannot read ({err.strerror})") from None
    except ValueError as err:
        raise InputError(f"{doc}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise InputError(f"{doc}: not a Zarr v3 group document")
    return data, meta


def observation(attrs: dict[str, Any]) -> dict[str, Any]:
    """The run a product came from: ours in L0 ``observation``, in L1 under ``l0``."""
    obs = attrs.get("observation") or (attrs.get("l0") or {}).get("observation") or {}
    return obs if isinstance(obs, dict) else {}


def skipped_ranges(attrs: dict[str, Any]) -> list[dict[str, Any]]:
    """The corrupt byte ranges step 1 skipped, each with its file's name: in L0
    ``source_files``, in L1 under ``l0``."""
    sources = attrs.get("source_files") or (attrs.get("l0") or {}).get("source_files") or []
    return [dict(r, file=src.get("name", "?")) for src in sources if isinstance(src, dict)
            for r in src.get("skipped", []) if isinstance(r, dict)]


def pff_to_l0_ratio(attrs: dict[str, Any]) -> float | None:
    """PFF bytes / L0 bytes as step 1 measured and recorded it (``report``); an L1 carries
    its L0's attributes in ``l0``. The one source of this figure: the run summary, the
    index page and ``pff.py info`` all read it here."""
    l0 = attrs.get("l0", attrs) if attrs.get("processing_level") == "L1" else attrs
    ratio = (l0.get("report") or {}).get("compression_ratio")
    return float(ratio) if isinstance(ratio, (int, float)) else None


def l1_to_l0_ratio(attrs: dict[str, Any]) -> float | None:
    """L1 bytes / L0 bytes as step 2 measured and recorded it (``size``); the one source."""
    ratio = (attrs.get("size") or {}).get("l1_to_l0_ratio")
    return float(ratio) if isinstance(ratio, (int, float)) else None


def store_facts(path: str | os.PathLike) -> StoreFacts:
    """Describe the product store at ``path`` (ours, L0 or L1, or PANOSETI's L0)."""
    data, meta = read_root(path)
    attrs = meta.get("attributes") or {}
    if "data_product" not in attrs:
        raise InputError(f"{path}: not a PFF product store (no data_product attribute)")
    arrays = ((meta.get("consolidated_metadata") or {}).get("metadata") or {})
    obs = observation(attrs)
    first, last = _time_span(path)
    module = attrs.get("module")
    return StoreFacts(
        path=str(path), level=str(attrs.get("processing_level", "L0")),
        data_product=str(attrs["data_product"]),
        module=int(module) if str(module).isdigit() else None,
        run=str(obs.get("name", "")).removesuffix(".pffd"), site=str(obs.get("site", "")),
        frames=int(attrs.get("total_frames", 0)), first_ns=first, last_ns=last,
        flag_counts={k: int(v) for k, v in (attrs.get("flag_counts") or {}).items()},
        created=str(attrs.get("created", "")),
        zarr_json_sha256=hashlib.sha256(data).hexdigest(), bytes=store_bytes(path),
        raw_bytes=sum(_raw_bytes(m) for m in arrays.values() if isinstance(m, dict)),
        pff_to_l0=pff_to_l0_ratio(attrs), l1_to_l0=l1_to_l0_ratio(attrs),
        skipped_ranges=len(skipped_ranges(attrs)))


def _raw_bytes(meta: dict[str, Any]) -> int:
    import numpy as np  # here, not at the top: run.sh's record calls need no numpy (0.1 s)

    if meta.get("node_type") != "array":  # a group (np.dtype(None) would be float64)
        return 0
    try:
        itemsize = np.dtype(meta.get("data_type")).itemsize
    except TypeError:  # a data type numpy does not name (strings)
        return 0
    return math.prod(meta.get("shape") or ()) * itemsize


def _time_span(path: str | os.PathLike) -> tuple[int | None, int | None]:
    """First and last non-NaT ``unix_t_ns`` within the first and last time chunks."""
    import zarr

    from panoseti_pipeline.pff.timing import NAT

    times = zarr.open_array(store=str(path), path=TIME_ARRAY, mode="r")
    n = times.shape[0]
    if not n:
        return None, None
    k = min(n, times.chunks[0])
    head, tail = times[:k], times[n - k:]
    head, tail = head[head != NAT], tail[tail != NAT]
    return (int(head[0]) if head.size else None), (int(tail[-1]) if tail.size else None)
