"""PANOSETI L0 -> L1 pipeline: PFF recordings to lossless L0 and baseline-subtracted L1 Zarr.

The top-level scripts of the repository (``run.sh``, ``step1_pff_to_zarr.py``,
``step2_dask_baseline.py``, ``cluster_lifecycle_manager.py``, ``pff.py``) are thin entry
points into this package; ``python3 -m panoseti_pipeline --help`` lists every command.
Importing the package imports nothing heavy: each module imports what it needs, and
``open_run`` / ``open_products`` (:mod:`panoseti_pipeline.products`) load on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["open_products", "open_run"]


def __getattr__(name: str) -> Any:
    """``from panoseti_pipeline import open_run``, without importing xarray at package import."""
    if name in __all__:
        from panoseti_pipeline import products

        return getattr(products, name)
    raise AttributeError(f"module 'panoseti_pipeline' has no attribute {name!r}")
