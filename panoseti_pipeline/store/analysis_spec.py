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
from collections.abc import Iterable
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
    return _checksum((p.relative_to(root).as_posix(), p) for p in root.rglob("*")
                     if p.is_file() and p.name != METADATA_FILE)


def bytes_checksum(files: dict[str, bytes]) -> str:
    """:func:`data_checksum` of a store still in memory (relative path -> bytes)."""
    return _checksum((rel, data) for rel, data in files.items()
                     if rel.rsplit("/", 1)[-1] != METADATA_FILE)


def file_checksum(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of one file's bytes (a PFF input of step 1)."""
    digest = hashlib.sha256()
    _add_file(digest, Path(path))
    return f"sha256:{digest.hexdigest()}"


def _checksum(files: Iterable[tuple[str, Path | bytes]]) -> str:
    """Each file (in path order, by parts) as its relative path, NUL and its bytes."""
    digest = hashlib.sha256()
    for rel, content in sorted(files, key=lambda f: f[0].split("/")):
        digest.update(rel.encode() + b"\0")
        if isinstance(content, bytes):
            digest.update(content)
        else:
            _add_file(digest, content)
    return f"sha256:{digest.hexdigest()}"


def _add_file(digest: Any, path: Path) -> None:
    with open(path, "rb") as f:
        while block := f.read(READ_BLOCK):
            digest.update(block)


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


# --------------------------------------------------------------------------- levels

LEVEL_DIRS = ("L0", "L1")  # <run>/L0/, <run>/L1/: the levels, in a run's directory
MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA_VERSION = "2.0"
META_DIR = ".panoseti-meta"  # the run's metadata, in every level


def store_record(store: str | os.PathLike, level: str, known: dict[str, str]
                 ) -> dict[str, Any]:
    """A store's entry in its level's manifest (their ``StoreLineage``: no other keys),
    from its attributes; the checksum is the one its processing history ends with, else
    ``known[resolved path]``, else computed."""
    import zarr

    from panoseti_pipeline.housekeeping import is_hashset_root
    from panoseti_pipeline.time_order import cadence_ns

    path = Path(store)
    group = zarr.open_group(str(path), mode="r")
    attrs = group.attrs.asdict()
    if is_hashset_root(attrs):
        return _hk_record(group, attrs, path, level)
    kind = "ph" if str(attrs.get("data_product", "")).startswith("ph") else "img"
    qc = attrs.get("timestamp_qc")
    history = attrs.get("processing_history") or []
    return {"dp": attrs.get("data_product"), "module": str(attrs.get("module")),
            "level": level, "kind": kind, "store": path.name,
            "n_frames": int(attrs.get("total_frames", 0)),
            "time_range": [qc["t_start_ns"], qc["t_end_ns"]] if qc else None,
            "checksum": (history[-1].get("output_checksum") if history else
                         known.get(str(path.resolve())) or data_checksum(path)),
            "source_store": Path(attrs["l0_path"]).name if "l0_path" in attrs else None,
            "calibration_params": attrs.get("calibration") if level != "L0" else None,
            "timestamp_qc": qc, "hashset": None,
            "cadence_ns": cadence_ns(kind, attrs.get("run_configs")),
            "processing_history": history}


def _hk_record(group: Any, attrs: dict[str, Any], path: Path, level: str) -> dict[str, Any]:
    """A housekeeping store's entry, as the team's ``pa-hk`` writes it (``dp`` "hk",
    ``module`` "?": housekeeping is per run, not per module), with its time range and
    cadence."""
    from panoseti_pipeline.housekeeping import HK_TIME

    t = group[HK_TIME][:]
    history = attrs.get("processing_history") or []
    return {"dp": "hk", "module": "?", "level": level, "kind": "hk", "store": path.name,
            "n_frames": int(t.size),
            "time_range": [int(t.min()), int(t.max())] if t.size else None,
            "checksum": (history[-1].get("output_checksum") if history
                         else data_checksum(path)),
            "source_store": None, "calibration_params": None, "timestamp_qc": None,
            "hashset": attrs["hashset"], "cadence_ns": attrs.get("cadence_ns"),
            "processing_history": history}


def source_checksums(store: str | os.PathLike) -> dict[str, str]:
    """{resolved L0 path: its checksum} that an L1 store's processing history records."""
    import zarr

    attrs = zarr.open_group(str(store), mode="r").attrs
    history = attrs.get("processing_history") or []
    if "l0_path" not in attrs or not history:
        return {}
    return {str(Path(attrs["l0_path"]).resolve()): history[0].get("output_checksum")}


def level_manifest(run_id: str, level: str, stores: list[Path], created_utc: str,
                   known: dict[str, str]) -> dict[str, Any]:
    """The ``manifest.json`` of one level of one run (their ``Manifest``); ``known``:
    checksums of stores already computed, by resolved path."""
    return {STORAGE_VERSION_KEY: STORAGE_VERSION,
            "manifest_schema_version": MANIFEST_SCHEMA_VERSION, "run_id": run_id,
            "level": level, "created_utc": created_utc, "seed_manifest_version": None,
            "stores": [store_record(s, level, known) for s in sorted(stores)]}


def write_level(level_dir: str | os.PathLike, run_id: str, level: str, stores: list[Path],
                bundle: str | os.PathLike | None, created_utc: str,
                known: dict[str, str]) -> Path:
    """``manifest.json`` and ``.panoseti-meta/`` (the run ``bundle``'s files copied in,
    when there is one; nothing there is removed) in ``level_dir``; the manifest is written
    under a temporary name and renamed in. Returns the manifest's path."""
    import json
    import shutil
    import uuid

    level_dir = Path(level_dir)
    if bundle is not None:
        shutil.copytree(bundle, level_dir / META_DIR, symlinks=True, dirs_exist_ok=True)
    manifest = level_dir / MANIFEST_NAME
    tmp = level_dir / f"{MANIFEST_NAME}.{uuid.uuid4().hex}.partial"
    tmp.write_text(json.dumps(level_manifest(run_id, level, stores, created_utc, known),
                              indent=2) + "\n", encoding="utf-8")
    tmp.replace(manifest)
    return manifest
