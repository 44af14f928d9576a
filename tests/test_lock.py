"""The lock files agree with the requirements, and the environment holds what they lock.

``requirements.lock`` and ``requirements-test.lock`` (``bash tools/refresh_lock.sh``) are
what ``env_bootstrap.sh`` installs into ``.venv``; ``requirements*.txt`` and
``pyproject.toml`` keep the lower bounds for installs into an environment of one's own.
A requirement the lock lacks, or a locked version outside its bound, fails here.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
RUNTIME, TEST = REPO / "requirements.txt", REPO / "requirements-test.txt"
#: one locked requirement: ``name==version [; marker]``, then its hashes
LOCKED = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")
PYTHONS = ("3.12", "3.13")


def lock_of(requirements: Path) -> Path:
    return requirements.with_suffix(".lock")


def requirements_in(path: Path) -> list[Requirement]:
    """The requirements of a requirements file, following ``-r`` includes."""
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            out += requirements_in(path.parent / line[3:].strip())
        elif line:
            out.append(Requirement(line))
    return out


def build_requirements() -> list[Requirement]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return [Requirement(r) for r in pyproject["build-system"]["requires"]]


def locked(path: Path) -> dict[str, tuple[Version, str | None, int]]:
    """name -> (version, marker, number of hashes) of a lock file."""
    out: dict[str, tuple[Version, str | None, int]] = {}
    name = None
    for line in path.read_text().splitlines():
        match = LOCKED.match(line)
        if match:
            name = canonicalize_name(match[1])
            assert name not in out, f"{path.name}: {name} locked twice"
            out[name] = (Version(match[2]), match[3], 0)
        elif line.strip().startswith("--hash=sha256:") and name:
            version, marker, hashes = out[name]
            out[name] = (version, marker, hashes + 1)
    return out


def applies(marker: str | None, python: str) -> bool:
    env = {"python_version": python, "python_full_version": f"{python}.0",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
           "implementation_name": "cpython", "platform_python_implementation": "CPython",
           "os_name": "posix"}
    return marker is None or Marker(marker).evaluate(env)


@pytest.mark.parametrize("requirements", [RUNTIME, TEST], ids=["runtime", "test"])
def test_every_requirement_is_locked_within_its_bound(requirements: Path) -> None:
    lock = locked(lock_of(requirements))
    for req in [*requirements_in(requirements), *build_requirements()]:
        name = canonicalize_name(req.name)
        assert name in lock, f"{lock_of(requirements).name} lacks {req} ({requirements.name})"
        version, marker, hashes = lock[name]
        assert version in req.specifier, (
            f"{lock_of(requirements).name}: {name}=={version} is outside {req} "
            f"({requirements.name}): bash tools/refresh_lock.sh")
        for python in PYTHONS:
            assert applies(marker, python), f"{name} is not locked for Python {python}"


@pytest.mark.parametrize("requirements", [RUNTIME, TEST], ids=["runtime", "test"])
def test_every_locked_package_has_hashes(requirements: Path) -> None:
    lock = locked(lock_of(requirements))
    assert lock
    assert not [name for name, (_, _, hashes) in lock.items() if hashes == 0]


def test_the_two_locks_agree_on_every_package_they_share() -> None:
    runtime, test = locked(lock_of(RUNTIME)), locked(lock_of(TEST))
    assert set(runtime) <= set(test)
    assert {n: runtime[n][0] for n in runtime} == {n: test[n][0] for n in runtime}


def test_pyproject_takes_its_requirements_from_requirements_txt() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["dynamic"] == ["dependencies"]
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"]["file"] == [RUNTIME.name]


@pytest.fixture
def repo_venv() -> None:
    """The tests below judge the .venv env_bootstrap.sh made from the test lock (CI, a
    fresh clone), not an environment of your own."""
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        pytest.skip(f"not running in {REPO / '.venv'} (an environment of your own)")


def test_the_repository_venv_holds_exactly_the_locked_versions(repo_venv: None) -> None:
    """Every distribution in it is locked, at the locked version, and nothing is absent."""
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    lock = {n: v for n, (v, marker, _) in locked(lock_of(TEST)).items()
            if applies(marker, python)}
    own = {"pip", canonicalize_name("panoseti-pipeline")}
    installed = {canonicalize_name(d.metadata["Name"]): Version(d.version)
                 for d in metadata.distributions()}
    extra = {n: str(v) for n, v in installed.items() if n not in lock and n not in own}
    wrong = {n: (str(installed[n]), str(v)) for n, v in lock.items()
             if n in installed and installed[n] != v}
    absent = sorted(set(lock) - set(installed))
    assert not (extra or wrong or absent), (extra, wrong, absent)


def test_the_locked_libraries_import_without_warnings(repo_venv: None) -> None:
    code = ("import asyncssh, distributed, zarr, numcodecs, xarray, dask_jobqueue, "
            "matplotlib, psutil, tqdm, tomli_w")
    result = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and not result.stderr, result.stderr
