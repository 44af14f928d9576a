"""Opening products as xarray: a run, or whatever the catalog finds, as one ``DataTree``.

    from panoseti_pipeline import open_run, open_products
    tree = open_run("L1/obs_Lick.start_2024-07-25T04:34:46Z.runtype_sci-obs")
    tree["module_1/img16"].dataset          # images, baseline, headers, flag_* ; time index
    tree = open_products("L1", module=1, dp="img16",
                         between=("2024-07-25T04:34", "2024-07-25T04:35"))

Each product is ``xr.open_zarr`` of its store (lazy, dask-backed, ``time`` a
``datetime64[ns]`` index) with the frame flags decoded: one boolean variable per flag,
``flag_<name>`` (``flag_missing_quabo``, ...), True where the frame carries it, beside the
``frame_flags`` bit mask itself. Node names: ``module_<n>/<dp>`` (``<dp>_<level>`` when
a directory holds both an L0 and an L1 of one product); a run's housekeeping store, when
the run has one (``<run>.housekeeping/``, beside its bundle), is ``housekeeping`` (one
child per source). ``open_products`` puts each run under its own node.

A run written with ``l1_layout = "panoseti_analysis"`` has its stores in level
directories (``<run>/L1/``, ``<run>/L0/``): ``open_run`` takes the run's directory or one
of its levels, and its ``housekeeping`` node holds the ``L0/hk.<hashset>.zarr`` stores,
one child per hashset (``housekeeping/quabo``, ... on ``hk_t_ns``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from panoseti_pipeline.errors import ConfigError, InputError
from panoseti_pipeline.flags import FLAG_NAMES
from panoseti_pipeline.housekeeping import find_hashset_stores, find_hk
from panoseti_pipeline.store.analysis_spec import LEVEL_DIRS
from panoseti_pipeline.store.facts import read_root

if TYPE_CHECKING:
    import xarray as xr

HK_NODE = "housekeeping"


def open_dataset(path: str | os.PathLike) -> xr.Dataset:
    """One product store as a Dataset with ``flag_<name>`` booleans decoded."""
    import xarray as xr

    ds = xr.open_zarr(str(path))
    return decode_flags(ds)


def decode_flags(ds: xr.Dataset) -> xr.Dataset:
    """``flag_<name>`` (bool, lazy) for every bit of ``frame_flags``, by its CF attributes."""
    if "frame_flags" not in ds:
        return ds
    flags = ds["frame_flags"]
    masks = flags.attrs.get("flag_masks", list(FLAG_NAMES))
    meanings = str(flags.attrs.get("flag_meanings", " ".join(FLAG_NAMES.values()))).split()
    return ds.assign({f"flag_{name}": (flags & np.uint8(bit)) != 0
                      for bit, name in zip(masks, meanings, strict=True)})


def _product_stores(directory: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(store, root attributes) of every product store directly in ``directory``."""
    found = []
    for path in sorted(directory.glob("*.zarr")):
        try:
            attrs = read_root(path)[1].get("attributes") or {}
        except InputError:
            continue
        if "data_product" in attrs:
            found.append((path, attrs))
    return found


def _node_names(stores: Sequence[tuple[Path, dict[str, Any]]]) -> list[str]:
    """``module_<n>/<dp>``; ``<dp>_<level>`` where one product comes in two levels."""
    keys = [(str(a.get("module")), str(a["data_product"]),
             str(a.get("processing_level", "L0"))) for _, a in stores]
    counts: dict[tuple[str, str], int] = {}
    for module, dp, _ in keys:
        counts[module, dp] = counts.get((module, dp), 0) + 1
    return [f"module_{m}/{dp}" + (f"_{level}" if counts[m, dp] > 1 else "")
            for m, dp, level in keys]


def open_run(path: str | os.PathLike) -> xr.DataTree:
    """A run's output directory (``<output>/<run>/``, or one of its level directories in
    the team's layout) as a DataTree: one node per product (``module_<n>/<dp>``), and
    ``housekeeping`` when the run has one."""
    import xarray as xr

    directory = Path(path)
    if not directory.is_dir():
        raise InputError(f"{directory}: no such run directory")
    levels = [directory / level for level in LEVEL_DIRS]
    stores = [s for d in (directory, *levels) if d.is_dir() for s in _product_stores(d)]
    if not stores:
        raise InputError(f"{directory}: no product stores (*.zarr with a data_product) here; "
                         "give a run's directory, e.g. <output>/obs_<site>.start_<t>Z...")
    nodes: dict[str, Any] = {"/": xr.Dataset(attrs={"run_directory": str(directory)})}
    for name, (store, _attrs) in zip(_node_names(stores), stores, strict=True):
        nodes[name] = open_dataset(store)
    tree = xr.DataTree.from_dict(nodes)
    hk = find_hk(directory)
    run = directory.parent if directory.name in LEVEL_DIRS else directory
    hashsets = find_hashset_stores(run / LEVEL_DIRS[0])  # the team's layout: in L0/
    if hk:
        tree[HK_NODE] = xr.open_datatree(str(hk[0]), engine="zarr")
    elif hashsets:
        children = [xr.open_zarr(p) for p in hashsets]
        tree[HK_NODE] = xr.DataTree.from_dict({str(ds.attrs["hashset"]): ds for ds in children})
    return tree


#: root attributes that describe a whole store: on a dataset cut by ``between`` they are
#: kept as ``store_<name>``, so that no one reads them as facts about the cut
WHOLE_STORE_ATTRS = ("total_frames", "summary", "flag_counts", "report", "size")


def open_products(catalog_or_root: str | os.PathLike, *, module: int | None = None,
                  dp: str | None = None, between: tuple[str, str] | None = None,
                  level: str | None = None, status: str | None = None) -> xr.DataTree:
    """The products the catalog lists (filters as ``catalog``'s options) as a DataTree:
    ``<run>/module_<n>/<dp>``.

    With ``between=(start, end)`` (UTC) each product is cut exactly as
    ``ds.sel(time=slice(start, end))`` cuts it (a partial time covers its whole period:
    ``"04:35"`` ends at 04:35:59.999999999); the cut dataset's whole-store attributes
    are renamed ``store_<name>`` and ``between`` records the interval. An unknown data
    product or level is refused (ConfigError), not answered with an empty tree.
    """
    import xarray as xr

    from panoseti_pipeline.catalog import LEVELS, interval, query
    from panoseti_pipeline.pff.products import PRODUCTS

    if dp is not None and dp not in PRODUCTS:
        raise ConfigError(f"dp={dp!r}: not a data product (known: {', '.join(PRODUCTS)})")
    if level is not None and level not in LEVELS:
        raise ConfigError(f"level={level!r}: not a level (known: {', '.join(LEVELS)})")
    rows = query(catalog_or_root, module=module, dp=dp, between=between, level=level,
                 status=status)
    by_run: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
    for r in rows:
        run = r["run"] or Path(r["path"]).name.removesuffix(".zarr")  # a lone file's store
        by_run.setdefault(run, []).append((Path(r["path"]), {
            "module": r["module"], "data_product": r["data_product"],
            "processing_level": r["level"]}))
    nodes: dict[str, Any] = {"/": xr.Dataset()}
    bounds = interval(between) if between is not None else None
    for run, stores in by_run.items():
        for name, (store, _attrs) in zip(_node_names(stores), stores, strict=True):
            ds = open_dataset(store)
            if bounds is not None:
                ds = _cut(ds, bounds, between)
            nodes[f"{run}/{name}"] = ds
    return xr.DataTree.from_dict(nodes)


def _cut(ds: xr.Dataset, bounds: tuple[int, int], between: tuple[str, str]) -> xr.Dataset:
    """The frames whose time lies in ``bounds`` (ns, both ends included; NaT never)."""
    start, end = (np.datetime64(b, "ns") for b in bounds)
    ds = ds.isel(time=((ds["time"] >= start) & (ds["time"] <= end)).values)
    attrs = {(f"store_{k}" if k in WHOLE_STORE_ATTRS else k): v for k, v in ds.attrs.items()}
    ds.attrs = {**attrs, "between": list(between)}
    return ds
