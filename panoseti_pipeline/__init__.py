"""PANOSETI L0 -> L1 pipeline: PFF recordings to lossless L0 and baseline-subtracted L1 Zarr.

The top-level scripts of the repository (``run.sh``, ``step1_pff_to_zarr.py``,
``step2_dask_baseline.py``, ``cluster_lifecycle_manager.py``, ``pff.py``) are thin entry
points into this package; ``python3 -m panoseti_pipeline --help`` lists every command.
Importing the package imports nothing heavy: each module imports what it needs.
"""
