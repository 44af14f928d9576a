"""Run the pipeline's scripts under an interpreter that has its requirements.

A user types ``python3 step1_pff_to_zarr.py ...`` with whatever ``python3`` is first on
PATH (on PANOSETI's machines often 3.11 without zarr). :func:`ensure_requirements`, called
by every top-level script before it imports anything else, re-runs the script under the
repository's ``.venv`` -- created and filled by ``env_bootstrap.sh`` exactly as ``run.sh``
does -- or stops with one line saying what to type. This module imports only the
standard library and runs on any Python >= 3.10, so it can say so on an old interpreter.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
#: import names of requirements.txt that every entry point needs
REQUIRED_MODULES = ("numpy", "zarr", "numcodecs", "dask", "distributed", "xarray", "tomli_w")
MIN_PYTHON = (3, 12)


def missing_requirements() -> list[str]:
    """What this interpreter lacks: a too old version, or modules of requirements.txt."""
    if sys.version_info < MIN_PYTHON:
        need, have = ".".join(map(str, MIN_PYTHON)), ".".join(map(str, sys.version_info[:2]))
        return [f"Python >= {need} (this is {have})"]
    return [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]


def ensure_requirements() -> None:
    """Return if this interpreter can run the pipeline; else re-exec under ``.venv``.

    ``env_bootstrap.sh`` chooses a Python >= 3.12 and creates or updates ``.venv`` (it
    says what it does on stderr). If that fails, or ``.venv`` itself still lacks
    something, one line on stderr says what to type and the process exits with 2.
    """
    missing = missing_requirements()
    if not missing:
        return
    prog = Path(sys.argv[0]).name or "panoseti_pipeline"
    venv = REPO_ROOT / ".venv"
    hint = (f"create the environment with `bash {REPO_ROOT}/env_bootstrap.sh` (or run "
            f"./run.sh once), then rerun; or activate a Python >= 3.12 env and "
            f"`pip install -e {REPO_ROOT}`")
    if Path(sys.prefix).resolve() == venv.resolve():
        _stop(f"{prog}: error: {venv} lacks {', '.join(missing)}; {hint}")
    result = subprocess.run(["bash", str(REPO_ROOT / "env_bootstrap.sh")],
                            stdout=subprocess.PIPE, text=True)
    python = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    if result.returncode != 0 or not python:
        _stop(f"{prog}: error: this Python ({sys.executable}) lacks {', '.join(missing)}; {hint}")
    os.execv(python, [python, *sys.orig_argv[1:]])


def _stop(line: str) -> None:
    print(line, file=sys.stderr)
    raise SystemExit(2)
