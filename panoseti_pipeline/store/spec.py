"""PANOSETI's Zarr v3 layout for PFF data (pypff >= 1.0.4), and what we add to it.

PANOSETI's library writes (``pypff.zarr.convert_run``) and reads
(``pypff.zarr.open_zarr_run``) one flat Zarr group per (data product, module) stream;
its spec is ``docs/zarr_v3_spec.md`` in panoseti/pypff. Conformance is tested with their
reader (tests/test_pypff_conformance.py). This module is the one home of its names:

* ``images`` (time, y, x): the PFF pixels;
* ``unix_t_ns`` (time,) int64: the frame time in ns -- ours is the exact time of
  PFF_FORMAT.md §4 (NaT, int64 min, where a frame has none: see ``frame_flags``); no CF
  ``units``, so their ``timestamps()`` stays int64;
* one (time,) array per header field: ``quabo_<i>_<field>`` for module products
  (img16, img8, ph1024), the bare ``<field>`` for ph256 (with ``quabo_num``), at least
  the spec's dtypes, each with ``pff_header_field`` (the dotted key of the header);
* root attributes: the spec's required ones (:func:`spec_attributes`).

Ours on top: ``time`` (the same ns with CF attributes, so xarray gives a datetime64[ns]
index), ``frame_flags`` (CF flag masks) and provenance attributes.

Notes
-----
* ``pkt_num`` is a 16-bit board counter, but the spec stores it as uint32: stored wider,
  losslessly.
* pypff 1.0.4 writes ``panoseti_pff_zarr_version = "1.1"`` (the spec text still says
  1.0) and never checks it; we write what their writer writes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from panoseti_pipeline.flags import FLAG_ATTRS
from panoseti_pipeline.pff.products import DELIMITER, N_QUABOS, Product
from panoseti_pipeline.pff.timing import NAT

SPEC_VERSION = "1.1"
SPEC_VERSION_KEY = "panoseti_pff_zarr_version"
#: the spec's dtype of each header field (pypff's writer; other integer fields: int64)
SPEC_DTYPE = {"quabo_num": np.dtype("u1"), "pkt_num": np.dtype("<u4"),
              "pkt_tai": np.dtype("<u2"), "pkt_nsec": np.dtype("<u4"),
              "tv_sec": np.dtype("<i8"), "tv_usec": np.dtype("<u4")}
UNIX_T_NS_ATTRS = {"ns_since_epoch": "1970-01-01T00:00:00Z",
                   "long_name": "UNIX timestamp in nanoseconds"}
TIME_ATTRS = {"units": "nanoseconds since 1970-01-01", "calendar": "proleptic_gregorian",
              "standard_name": "time", "long_name": "frame time (UTC)"}


@dataclasses.dataclass(frozen=True)
class HeaderArray:
    """One per-frame header array: its name in the store, the PFF field and quabo."""

    name: str
    field: str
    quabo: int | None  # module products: which of the 4 sub-headers; ph256: None

    @property
    def dtype(self) -> np.dtype:
        return SPEC_DTYPE[self.field]

    @property
    def pff_header_field(self) -> str:
        return self.field if self.quabo is None else f"quabo_{self.quabo}.{self.field}"


def header_arrays(product: Product) -> list[HeaderArray]:
    """The header arrays of ``product``, in the order of the header's bytes."""
    if product.header_kind == "ph256":
        return [HeaderArray(field, field, None) for field in product.fields]
    return [HeaderArray(f"quabo_{q}_{field}", field, q)
            for q in range(N_QUABOS) for field in product.fields]


def header_columns(product: Product, headers: Mapping[str, np.ndarray]
                   ) -> dict[str, np.ndarray]:
    """pff's header fields ((n,) or (n, quabo) arrays) as the spec's columns (views)."""
    return {h.name: headers[h.field] if h.quabo is None else headers[h.field][:, h.quabo]
            for h in header_arrays(product)}


@dataclasses.dataclass(frozen=True)
class FrameArray:
    """A (time, ...) array of a product store: how :mod:`.layout` creates it."""

    name: str
    dtype: np.dtype
    trailing: tuple[int, ...]
    dims: tuple[str, ...]
    attrs: Mapping[str, Any]
    fill_value: Any = 0


def frame_arrays(product: Product, module: int, image_dtype: Any = None,
                 image_attrs: Mapping[str, Any] | None = None) -> list[FrameArray]:
    """Every per-frame array of a product store: images (``image_dtype``: L1's float32),
    ``unix_t_ns``, the header arrays, ``time`` and ``frame_flags``."""
    images = FrameArray("images", np.dtype(image_dtype or product.dtype), product.shape,
                        ("time", "y", "x"),
                        {"data_product": product.dp, "module": str(module),
                         **(image_attrs or {})})
    per_frame = [FrameArray("unix_t_ns", np.dtype("<i8"), (), ("time",), UNIX_T_NS_ATTRS)]
    per_frame += [FrameArray(h.name, h.dtype, (), ("time",),
                             {"pff_header_field": h.pff_header_field})
                  for h in header_arrays(product)]
    per_frame += [FrameArray("time", np.dtype("<i8"), (), ("time",), TIME_ATTRS, NAT),
                  FrameArray("frame_flags", np.dtype("u1"), (), ("time",), FLAG_ATTRS)]
    return [images, *per_frame]


def frame_config(product: Product) -> dict[str, Any]:
    """The spec's ``frame_config``: where a frame's parts are (``header_size`` counts the
    header text and its blank line, up to the ``*``)."""
    return {"header_size": product.header_bytes + len(DELIMITER) - 1,
            "payload_size": product.pixel_bytes, "frame_size": product.frame_bytes,
            "image_shape": list(product.shape), "dtype_str": product.dtype.name,
            "bytes_per_pixel": product.bpp, "format_name": product.dp}


#: the root attributes PANOSETI's spec requires (plus its optional ``run_configs``)
REQUIRED_ATTRIBUTES = (SPEC_VERSION_KEY, "data_product", "bytes_per_pixel", "module",
                       "source_pff_files", "total_frames", "header_format", "header_fields",
                       "quabo_fields", "frame_config", "run_configs")


def spec_attributes(product: Product, module: int, source_pff_files: Sequence[str],
                    total_frames: int, run_configs: Mapping[str, Any] | None,
                    shard_factor: int) -> dict[str, Any]:
    """The root attributes the spec requires (``run_configs`` and ``shard_factor`` when
    there are any), in the order pypff writes them."""
    names = [h.name for h in header_arrays(product)]
    single = product.header_kind == "ph256"
    attrs: dict[str, Any] = {
        SPEC_VERSION_KEY: SPEC_VERSION,
        "data_product": product.dp,
        "bytes_per_pixel": product.bpp,
        "module": str(module),
        "source_pff_files": list(source_pff_files),
        "total_frames": int(total_frames),
        "header_format": "single" if single else "module",
        "header_fields": sorted(names) if single else [],
        "quabo_fields": [] if single else sorted(names),
        "frame_config": frame_config(product),
    }
    if run_configs:
        attrs["run_configs"] = dict(run_configs)
    if shard_factor:
        attrs["shard_factor"] = int(shard_factor)
    return attrs
