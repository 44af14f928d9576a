"""PANOSETI's analysis storage spec: what the team's analysis code finds in an L1 store.

The analysis code (``panoseti_analysis``) reads L1 stores by a second spec beside pypff's
(which still governs the L0 arrays): its own version key, the main array named by product
family, ``data_level``, a ``calibration`` record, ``timestamp_qc`` and a
``processing_history`` of IVOA-Provenance-shaped steps. Its records forbid unknown keys:
only their fields go into them; our own provenance stays in our attributes.

Checksums (``"sha256:<hex>"``) are of a store's data: every file below the store but the
``zarr.json`` metadata files, in sorted path order, each as its relative path and its
bytes. Attributes may then be written after the checksum without changing it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

STORAGE_VERSION_KEY = "panoseti_analysis_storage_version"
STORAGE_VERSION = "2.0"  # the version of their spec followed here
MAIN_ARRAYS = {"ph": "pedestal_subtracted", "img": "median_subtracted"}
METADATA_FILE = "zarr.json"
READ_BLOCK = 1 << 20


def main_array(family: str) -> str:
    """The L1 array of calibrated frames for a product family ("ph" or "img")."""
    return MAIN_ARRAYS[family]


def data_checksum(store: str | os.PathLike) -> str:
    """``sha256:<hex>`` of a store's data files (see the module docstring)."""
    root = Path(store)
    digest = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != METADATA_FILE)
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            while block := f.read(READ_BLOCK):
                digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def processing_step(step_name: str, params: dict[str, Any], input_checksums: list[str],
                    output_checksum: str, timestamp_utc: str,
                    software: dict[str, Any]) -> dict[str, Any]:
    """One ``processing_history`` entry (their ``ProcessingStep``); ``step_version`` is
    the pipeline's revision."""
    versions = {k: str(v) for k, v in software.items()}
    return {"step_name": step_name, "step_version": versions.get("pipeline", "unknown"),
            "params": params, "input_checksums": input_checksums,
            "output_checksum": output_checksum, "timestamp_utc": timestamp_utc,
            "software": versions}
