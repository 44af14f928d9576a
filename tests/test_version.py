"""Every command says what it is (``--version``) and, in ``--help``, one program name and a
help text for every option."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from panoseti_pipeline.version import git_revision, package_version

REPO = Path(__file__).resolve().parents[1]
MODULE = "python3 -m panoseti_pipeline"
COMMANDS = ["step1", "step2", "cluster", "pff", "config", "synthetic", "quicklook",
            "catalog", "driver"]
#: the subcommands of a command, whose options have help texts too
SUBCOMMANDS = {"pff": ["info"], "config": ["check", "show"], "driver": ["demo-observation"]}
SCRIPTS = ["step1_pff_to_zarr.py", "step2_dask_baseline.py", "cluster_lifecycle_manager.py",
           "pff.py"]


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "80"})
    assert done.returncode == 0, (argv, done.stderr)
    return done


def test_the_version_is_the_packages_and_the_checkouts_commit():
    assert package_version() == re.search(r'^version = "(.+)"', (REPO / "pyproject.toml")
                                          .read_text(), re.M).group(1)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    if head.returncode == 0:  # a checkout: the commit is named
        assert git_revision().removesuffix("-dirty").endswith(head.stdout.strip()[:7])


@pytest.mark.parametrize("argv", [
    [sys.executable, "-m", "panoseti_pipeline", "--version"],
    *([sys.executable, "-m", "panoseti_pipeline", c, "--version"] for c in COMMANDS),
    *([sys.executable, str(REPO / s), "--version"] for s in SCRIPTS),
    ["bash", str(REPO / "run.sh"), "--version"],
])
def test_every_command_has_version(argv: list[str], tmp_path: Path):
    out = run(argv, tmp_path).stdout.strip()  # from a directory outside the repository
    expected = f"(panoseti-pipeline {package_version()}"
    assert expected in out and out.count("\n") == 0, out
    if git_revision() != "unknown":
        assert out.endswith(f", git {git_revision()})"), out


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_one_program_name_and_helps_every_option(command: str):
    argvs = [[command], *([command, sub] for sub in SUBCOMMANDS.get(command, []))]
    for argv in argvs:
        text = run([sys.executable, "-m", "panoseti_pipeline", *argv, "--help"], REPO).stdout
        assert re.match(rf"usage: {MODULE} {' '.join(argv)}\s", text), text
        assert set(re.findall(r"usage: (\S+(?: -m \S+)?)", text)) == {MODULE}
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if not re.match(r"^  -", line):
                continue
            inline = re.match(r"^  -\S.*?\S {2,}\S", line)
            following = i + 1 < len(lines) and re.match(r"^ {10,}\S", lines[i + 1])
            assert inline or following, f"{' '.join(argv)}: no help for {line.strip()!r}"


def test_help_never_breaks_a_word():
    """The --faults help lists the fault names whole (argparse breaks a long word)."""
    from panoseti_pipeline.synthetic import FAULTS

    text = run([sys.executable, "-m", "panoseti_pipeline", "synthetic", "--help"],
               REPO).stdout
    flat = " ".join(text.split())
    assert all(re.search(rf"\b{name}\b", flat) for name in FAULTS), flat


def test_top_level_help_lists_every_command_and_pff_reads_stores():
    text = run([sys.executable, "-m", "panoseti_pipeline", "--help"], REPO).stdout
    assert text.startswith(f"usage: {MODULE} COMMAND")
    assert all(re.search(rf"^  {c} ", text, re.M) for c in COMMANDS)
    assert re.search(r"^  pff .*stores", text, re.M), text
