"""Facts about product stores on disk that need no zarr: naming, completeness, size, modes.

``run.sh``'s planner calls these for every input and must start fast, so they read the
root ``zarr.json`` directly instead of importing zarr (0.7 s). A product is written as
``<final>.<id>.partial`` and renamed into place only when complete and verified, so a
root document with the right ``processing_level`` under the final name means complete.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from pathlib import Path

PARTIAL_SUFFIX = ".partial"


def is_published(path: str | os.PathLike, level: str) -> bool:
    """True when a complete product of ``level`` ("L0", "L1") sits at ``path``."""
    try:
        with open(Path(path) / "zarr.json", encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("attributes", {}).get("processing_level") == level


def remove_stale_partials(final: str | os.PathLike) -> list[Path]:
    """Remove ``<final>.*.partial`` left by a killed run (it never became a product)."""
    final = Path(final)
    stale = sorted(final.parent.glob(f"{final.name}.*{PARTIAL_SUFFIX}"))
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def store_bytes(path: str | os.PathLike) -> int:
    """Bytes of the files of a directory store (for compression and size ratios)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def permission_umask(group_writable: bool, current: int) -> int:
    """The pipeline's umask policy applied to ``current``.

    Files keep the caller's umask but are never world-writable; group-writable exactly
    when configured.
    """
    mask = current | 0o002
    return mask & ~0o020 if group_writable else mask | 0o020


def apply_permission_policy(group_writable: bool) -> int:
    """Set this process's umask by :func:`permission_umask`; return the new umask."""
    mask = permission_umask(group_writable, os.umask(0))
    os.umask(mask)
    return mask


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
