"""The top-level scripts work as the README writes them, whatever ``python3`` is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: the interpreter this test's venv was made from: it has none of the requirements
BASE = Path(getattr(sys, "_base_executable", sys.executable))


def lacks_requirements(python: Path) -> bool:
    probe = subprocess.run([str(python), "-c", "import zarr, dask"], capture_output=True)
    return probe.returncode != 0


@pytest.mark.parametrize("argv", [["pff.py", "--help"], ["step1_pff_to_zarr.py", "--help"],
                                  ["-m", "panoseti_pipeline", "--help"]])
def test_a_python_without_requirements_reruns_under_the_venv(argv: list[str]) -> None:
    if not lacks_requirements(BASE):
        pytest.skip(f"{BASE} has the requirements itself: nothing to re-run")
    out = subprocess.run([str(BASE), *argv], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout
    # env_bootstrap.sh said which interpreter it chose: this repository's .venv
    assert f"using {REPO / '.venv' / 'bin' / 'python'}" in out.stderr


def test_the_venv_itself_lacking_requirements_says_what_to_type(tmp_path: Path) -> None:
    """A .venv that lost its packages is not re-run in a loop: one line, exit 2."""
    import venv

    bare = tmp_path / "bare"
    venv.EnvBuilder(with_pip=False).create(bare)
    code = ("import sys; from pathlib import Path; import panoseti_pipeline.bootstrap as b; "
            f"b.REPO_ROOT = Path({str(tmp_path)!r}); "
            f"(Path({str(tmp_path)!r}) / '.venv').symlink_to({str(bare)!r}); "
            "b.ensure_requirements()")
    out = subprocess.run([str(bare / "bin" / "python"), "-c", code], capture_output=True,
                         text=True, env={"PYTHONPATH": str(REPO)}, timeout=60)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "lacks" in lines[0] and "env_bootstrap.sh" in lines[0]
