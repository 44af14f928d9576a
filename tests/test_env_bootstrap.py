"""Tests of env_bootstrap.sh: run bash on the library with fake interpreters.

The fakes are small /bin/sh scripts in ``tmp_path`` that answer the library's version probe
(``python -c ...``), log every call, and stand in for ``-m venv`` and ``-m pip``, so no test
creates a real environment or installs anything. PATH holds only the fakes and a few
coreutils, so what the machine has installed does not leak in (except in the one test that
looks at the real machine on purpose).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
LIBRARY = REPO_ROOT / "env_bootstrap.sh"
BASH = shutil.which("bash") or "/bin/bash"
# External commands the library uses (besides the interpreters it probes).
TOOLS = ("sort", "sha256sum", "rm", "mkdir", "cp")


def fake_python(path: Path, version: str, *, pip_output: str = "", pip_rc: int = 0) -> Path:
    """Write a fake interpreter reporting ``version``. It logs its calls to the fake tree's
    ``calls.log``, copies itself to ``DIR/bin/python`` for ``-m venv ... DIR``, and answers
    ``-m pip ...`` with ``pip_output`` and exit status ``pip_rc``."""
    log = _log_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$0 $*" >> "{log}"\n'
        'case "$1" in\n'
        f'  -c) printf "%s\\n%s\\n" "{version}" "$0" ;;\n'
        '  -m) case "$2" in\n'
        '        venv) for a; do d="$a"; done; mkdir -p "$d/bin" && cp "$0" "$d/bin/python" ;;\n'
        f"        pip) printf '%s\\n' '{pip_output}'; exit {pip_rc} ;;\n"
        "        *) exit 2 ;;\n"
        "      esac ;;\n"
        "  *) exit 2 ;;\n"
        "esac\n"
    )
    path.chmod(0o755)
    return path


def _log_file(path: Path) -> Path:
    # Every fake under one tmp_path shares the log at <tmp_path>/calls.log.
    for parent in path.parents:
        if (parent / ".fake_root").exists():
            return parent / "calls.log"
    raise AssertionError(f"{path} is not under a fake tree")


def fake_script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A fake world: ``bin/`` (the only PATH entry with interpreters), ``tools/``
    (coreutils the library needs), ``home/`` (no ~/.pyenv) and ``repo/``."""
    (tmp_path / ".fake_root").touch()
    tools = tmp_path / "tools"
    tools.mkdir()
    for name in TOOLS:
        found = shutil.which(name)
        assert found, f"test needs {name} on PATH"
        (tools / name).symlink_to(found)
    for name in ("bin", "home", "repo"):
        (tmp_path / name).mkdir()
    (tmp_path / "repo" / "pyproject.toml").write_text('[project]\nname = "fake"\n')
    return tmp_path


def fake_env(tree: Path, **extra: str) -> dict[str, str]:
    return {"PATH": f"{tree / 'bin'}:{tree / 'tools'}", "HOME": str(tree / "home"), **extra}


def run_library(commands: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Source the library under errexit/nounset/pipefail in a fresh bash and run
    ``commands`` there."""
    script = f'set -o errexit -o nounset -o pipefail\nsource "$1"\n{commands}\n'
    return subprocess.run(
        [BASH, "-c", script, "bash", str(LIBRARY)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


FIND = 'env_bootstrap_find_python\nprintf "%s\\n" "$ENV_BOOTSTRAP_BASE_PYTHON" "$ENV_BOOTSTRAP_HOW"'


def found(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[0]


def fake_pyenv(tree: Path, versions: dict[str, str | None]) -> None:
    """A fake ``pyenv`` on PATH listing ``versions``; each maps to the version its
    ``bin/python3`` reports, or None for a broken/missing interpreter."""
    root = tree / "pyenv"
    for name, reported in versions.items():
        if reported is not None:
            fake_python(root / "versions" / name / "bin" / "python3", reported)
    listing = " ".join(["system", *versions, "3.14.0t", "miniconda3-latest"])
    fake_script(
        tree / "bin" / "pyenv",
        'case "$1" in\n'
        f'  versions) for v in {listing}; do echo "$v"; done ;;\n'
        f'  prefix) echo "{root}/versions/$2" ;;\n'
        "  *) exit 1 ;;\n"
        "esac\n",
    )


def failing_shim(path: Path) -> Path:
    """Like pyenv's shim of a version that is installed but not selected."""
    name = path.name
    return fake_script(path, f'echo "pyenv: {name}: command not found" >&2\nexit 127\n')


# --- the real machine ---------------------------------------------------------------------


def test_real_machine_has_a_python_3_12_or_newer():
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX")}
    result = run_library(FIND, env)
    chosen = found(result)
    version = subprocess.run(
        [chosen, "-c", "import sys; print(sys.version_info >= (3, 12))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert version == "True", chosen


def test_active_env_with_the_requirements_is_used_and_said(tmp_path: Path):
    """This test's own environment has pytest and, through PYTHONPATH, the repository's
    package: as the active env it is used as it is, without making a .venv, and the chosen
    interpreter is named on stderr only."""
    prefix = Path(sys.prefix)
    if not (prefix / "bin" / "python").exists():
        pytest.skip(f"{prefix} has no bin/python")
    requirements = tmp_path / "requirements-test.txt"
    requirements.write_text("pytest>=7\n")
    (tmp_path / "panoseti_pipeline").mkdir()
    (tmp_path / "panoseti_pipeline" / "__init__.py").write_text("")
    env = {**os.environ, "VIRTUAL_ENV": str(prefix), "PYTHONPATH": str(tmp_path)}
    env.pop("CONDA_PREFIX", None)
    result = run_library(
        f'bootstrap_python_env "{tmp_path}" "{requirements}"\nprintf "%s\\n" "$PYTHON"', env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(prefix / "bin" / "python")]
    assert result.stderr.splitlines() == [
        f"env_bootstrap: using {prefix / 'bin' / 'python'} (Python "
        f"{'.'.join(map(str, sys.version_info[:3]))}, the active env {prefix} ($VIRTUAL_ENV), "
        "which has requirements-test.txt and the pipeline package)"
    ]
    assert not (tmp_path / ".venv").exists()


# --- the order of DESIGN.md §9 ------------------------------------------------------------


@pytest.mark.parametrize("variable", ["VIRTUAL_ENV", "CONDA_PREFIX"])
def test_active_env_is_preferred_to_path(tree: Path, variable: str):
    env_python = fake_python(tree / "env" / "bin" / "python", "3.12.1")
    fake_python(tree / "bin" / "python3.13", "3.13.0")
    result = run_library(FIND, fake_env(tree, **{variable: str(tree / "env")}))
    assert found(result) == str(env_python)
    assert f"${variable}" in result.stdout.splitlines()[1]


def test_active_env_older_than_3_12_is_ignored_with_a_note(tree: Path):
    fake_python(tree / "env" / "bin" / "python", "3.11.7")
    on_path = fake_python(tree / "bin" / "python3.13", "3.13.0")
    result = run_library(FIND, fake_env(tree, VIRTUAL_ENV=str(tree / "env")))
    assert found(result) == str(on_path)
    assert "ignoring the active env" in result.stderr and "3.11.7" in result.stderr


def test_working_python_on_path_is_preferred_to_pyenv(tree: Path):
    failing_shim(tree / "bin" / "python3.13")
    on_path = fake_python(tree / "bin" / "python3.12", "3.12.1")
    fake_pyenv(tree, {"3.13.0": "3.13.0"})
    result = run_library(FIND, fake_env(tree))
    assert found(result) == str(on_path)
    assert result.stdout.splitlines()[1] == "python3.12 on PATH"


def test_failing_shims_and_python3_3_11_lead_to_newest_pyenv_version(tree: Path):
    failing_shim(tree / "bin" / "python3.13")
    failing_shim(tree / "bin" / "python3.12")
    fake_python(tree / "bin" / "python3", "3.11.7")
    fake_pyenv(tree, {"3.11.7": "3.11.7", "3.12.1": "3.12.1", "3.13.0": "3.13.0"})
    result = run_library(FIND, fake_env(tree))
    assert found(result) == str(tree / "pyenv" / "versions" / "3.13.0" / "bin" / "python3")
    assert result.stdout.splitlines()[1] == "pyenv version 3.13.0"
    assert result.stderr == ""


def test_broken_newest_pyenv_version_falls_back_to_the_next(tree: Path):
    fake_python(tree / "bin" / "python3", "3.11.7")
    fake_pyenv(tree, {"3.12.1": "3.12.1", "3.13.0": None})
    result = run_library(FIND, fake_env(tree))
    assert found(result) == str(tree / "pyenv" / "versions" / "3.12.1" / "bin" / "python3")


def test_pyenv_is_found_under_home_when_not_on_path(tree: Path):
    fake_python(tree / "bin" / "python3", "3.11.7")
    fake_pyenv(tree, {"3.13.0": "3.13.0"})
    home_pyenv = tree / "home" / ".pyenv" / "bin"
    home_pyenv.mkdir(parents=True)
    (tree / "bin" / "pyenv").rename(home_pyenv / "pyenv")
    result = run_library(FIND, fake_env(tree))
    assert found(result) == str(tree / "pyenv" / "versions" / "3.13.0" / "bin" / "python3")


def test_only_python_3_11_fails_with_one_clear_line(tree: Path):
    fake_python(tree / "bin" / "python3", "3.11.7")
    requirements = tree / "repo" / "requirements.txt"
    requirements.write_text("numpy>=2\n")
    result = run_library(
        f'bootstrap_python_env "{tree / "repo"}" "{requirements}"\necho "not reached"',
        fake_env(tree),
    )
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("env_bootstrap: error: no Python >= 3.12 found")
    assert "conda create -n panoseti python=3.13" in lines[0]
    assert not (tree / "repo" / ".venv").exists()


# --- the .venv and the install stamp ------------------------------------------------------


def bootstrap(tree: Path, requirements: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return run_library(
        f'bootstrap_python_env "{tree / "repo"}" "{requirements}"\nprintf "%s\\n" "$PYTHON"',
        fake_env(tree, **extra),
    )


def pip_calls(tree: Path) -> list[str]:
    log = tree / "calls.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return [line for line in lines if " -m pip " in line]


def test_venv_is_made_and_installed_into_only_when_requirements_change(tree: Path):
    fake_python(tree / "bin" / "python3.13", "3.13.0")
    repo = tree / "repo"
    (repo / "requirements.txt").write_text("numpy>=2\n")
    requirements = repo / "requirements-test.txt"
    requirements.write_text("-r requirements.txt\npytest>=8\n")
    venv_python = repo / ".venv" / "bin" / "python"

    first = bootstrap(tree, requirements)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [str(venv_python)]
    assert "creating" in first.stderr and "installing requirements-test.txt" in first.stderr
    assert first.stderr.splitlines()[-1].startswith(f"env_bootstrap: using {venv_python} (")
    assert len(pip_calls(tree)) == 1
    assert pip_calls(tree)[0].endswith(
        f"-m pip install --disable-pip-version-check --quiet -r {requirements} -e {repo}"
    )

    calls_before = len((tree / "calls.log").read_text().splitlines())
    second = bootstrap(tree, requirements)
    assert second.returncode == 0, second.stderr
    assert "installing" not in second.stderr and "creating" not in second.stderr
    assert second.stderr.splitlines() == [
        f"env_bootstrap: using {venv_python} (Python 3.13.0, the repository's .venv, "
        f"installed from {requirements})"]
    assert len(pip_calls(tree)) == 1
    # The ready .venv is all that is run: no interpreter on PATH is probed again.
    second_calls = (tree / "calls.log").read_text().splitlines()[calls_before:]
    assert second_calls and all(c.startswith(f"{venv_python} -c ") for c in second_calls)

    # A change in the included file counts as a change.
    (repo / "requirements.txt").write_text("numpy>=2.1\n")
    third = bootstrap(tree, requirements)
    assert third.returncode == 0, third.stderr
    assert "installing requirements-test.txt" in third.stderr
    assert len(pip_calls(tree)) == 2

    # So does a change in pyproject.toml (the package's own metadata).
    (repo / "pyproject.toml").write_text('[project]\nname = "fake"\nversion = "2"\n')
    fourth = bootstrap(tree, requirements)
    assert fourth.returncode == 0, fourth.stderr
    assert len(pip_calls(tree)) == 3


def test_the_lock_beside_the_requirements_is_what_gets_installed(tree: Path):
    """With requirements-test.lock beside requirements-test.txt, .venv gets exactly the
    lock (hash-checked, no dependency of its own choosing), then the package without
    build isolation; a change of the lock reinstalls, one of the .txt alone does not."""
    fake_python(tree / "bin" / "python3.13", "3.13.0")
    repo = tree / "repo"
    requirements = repo / "requirements-test.txt"
    requirements.write_text("pytest>=8\n")
    lock = repo / "requirements-test.lock"
    lock.write_text("pytest==9.0.0 --hash=sha256:00\n")

    first = bootstrap(tree, requirements)
    assert first.returncode == 0, first.stderr
    assert "installing requirements-test.lock" in first.stderr
    calls = pip_calls(tree)
    assert len(calls) == 2, calls
    assert calls[0].endswith(f"--quiet --no-compile --require-hashes --no-deps -r {lock}")
    assert calls[1].endswith(f"--quiet --no-deps --no-build-isolation -e {repo}")

    requirements.write_text("pytest>=8.1\n")
    assert bootstrap(tree, requirements).returncode == 0
    assert len(pip_calls(tree)) == 2
    lock.write_text("pytest==9.0.1 --hash=sha256:01\n")
    third = bootstrap(tree, requirements)
    assert third.returncode == 0, third.stderr
    assert len(pip_calls(tree)) == 4


def test_failed_install_leaves_no_stamp_and_fails(tree: Path):
    fake_python(tree / "bin" / "python3.13", "3.13.0")
    repo = tree / "repo"
    requirements = repo / "requirements.txt"
    requirements.write_text("numpy>=2\n")
    fake_python(repo / ".venv" / "bin" / "python", "3.13.0", pip_output="ERROR: no", pip_rc=1)
    result = bootstrap(tree, requirements)
    assert result.returncode != 0
    assert result.stdout == ""
    assert "pip install -r" in result.stderr and "failed" in result.stderr
    assert list((repo / ".venv").glob(".panoseti-installed-*")) == []


def test_active_env_lacking_requirements_falls_back_to_venv(tree: Path):
    fake_python(tree / "env" / "bin" / "python", "3.13.0", pip_output="Would install zarr-3.4.2")
    repo = tree / "repo"
    requirements = repo / "requirements.txt"
    requirements.write_text("zarr>=3.2\n")
    result = bootstrap(tree, requirements, VIRTUAL_ENV=str(tree / "env"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(repo / ".venv" / "bin" / "python")]
    assert "lacks some of requirements.txt or the pipeline package" in result.stderr
    assert (repo / ".venv" / "bin" / "python").exists()


def test_repo_venv_as_active_env_uses_the_stamp(tree: Path):
    repo = tree / "repo"
    requirements = repo / "requirements.txt"
    requirements.write_text("numpy>=2\n")
    fake_python(repo / ".venv" / "bin" / "python", "3.13.0")
    env = {"VIRTUAL_ENV": str(repo / ".venv")}
    assert bootstrap(tree, requirements, **env).returncode == 0
    result = bootstrap(tree, requirements, **env)
    assert result.returncode == 0, result.stderr
    assert [c for c in pip_calls(tree) if "--dry-run" in c] == []
    assert len(pip_calls(tree)) == 1


def test_the_venvs_byte_code_is_cached_inside_it(tree: Path):
    """Each process of a run imports numpy, zarr, dask ...: with PYTHONDONTWRITEBYTECODE
    set (and .venv installed without byte code) each would compile them again. Using .venv,
    byte code goes to .venv/pycache, fresh or ready, unless the caller chose a cache."""
    fake_python(tree / "bin" / "python3.13", "3.13.0")
    repo = tree / "repo"
    requirements = repo / "requirements.txt"
    requirements.write_text("numpy>=2\n")
    show = (f'bootstrap_python_env "{repo}" "{requirements}"\n'
            'printf "%s|%s\\n" "${PYTHONPYCACHEPREFIX-unset}" "${PYTHONDONTWRITEBYTECODE-unset}"')
    for _fresh_then_ready in range(2):
        result = run_library(show, fake_env(tree, PYTHONDONTWRITEBYTECODE="1"))
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == [f"{repo / '.venv' / 'pycache'}|unset"]
    chosen = run_library(show, fake_env(tree, PYTHONPYCACHEPREFIX=str(tree / "mine")))
    assert chosen.stdout.splitlines() == [f"{tree / 'mine'}|unset"]
