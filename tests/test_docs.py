"""The docs stay true: every config key, script option and command is documented.

The README is the front door (short); the reference is in ``docs/``.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from panoseti_pipeline import config as pipeline_config

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
DOCS = {path.name: path.read_text() for path in sorted((REPO / "docs").glob("*.md"))}
#: everything a user reads: the README and the reference
ALL_DOCS = "\n".join([README, *DOCS.values()])
CONFIG = (REPO / "config.toml").read_text()
SECTIONS = {"cluster": pipeline_config.ClusterConfig,
            "pff_to_zarr": pipeline_config.PffToZarrConfig,
            "baseline_subtract": pipeline_config.BaselineConfig,
            "run": pipeline_config.RunConfig}


def documented_keys() -> dict[str, list[str]]:
    """The keys of each ``## [section]`` table of docs/config.md (first column)."""
    keys: dict[str, list[str]] = {}
    for part in DOCS["config.md"].split("\n## [")[1:]:
        section, body = part.split("]", 1)
        keys[section] = [m for line in body.splitlines() if line.startswith("| `")
                         for m in re.findall(r"`([a-z_0-9]+)`", line.split("|")[1])]
    return keys


def test_docs_config_md_documents_exactly_the_schemas_keys():
    """Both ways: every key of the schema has a row, and every row is a key of the schema."""
    documented = documented_keys()
    assert sorted(documented) == sorted(SECTIONS)
    for section, cls in SECTIONS.items():
        schema = [f.name for f in dataclasses.fields(cls)]
        assert sorted(documented[section]) == sorted(schema), section
        assert len(set(documented[section])) == len(documented[section]), section


@pytest.mark.parametrize("section", SECTIONS)
def test_every_config_key_is_in_config_toml(section):
    keys = [f.name for f in dataclasses.fields(SECTIONS[section])]
    assert keys
    shipped = pipeline_config.load_config(REPO / "config.toml").as_dict()[section]
    for key in keys:
        assert re.search(rf"^#? ?{key} = ", CONFIG, re.M), f"[{section}] {key} not in config.toml"
        assert key in shipped


def test_readme_is_a_front_door_and_links_resolve():
    """At most 400 lines; every relative link of the README and docs/ points at a file."""
    assert len(README.splitlines()) <= 400
    for name, text in [("README.md", README), *DOCS.items()]:
        base = REPO if name == "README.md" else REPO / "docs"
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert (base / target).exists(), f"{name} links to a missing {target}"


def test_user_docs_use_no_project_internal_language():
    """No issue numbers, goals ("target") or internal names; a link's target is fine."""
    for name, text in [("README.md", README), *DOCS.items()]:
        for word in (r"\bissue \d+", r"\bdesign card\b", r"\btargets?\b"):
            found = [line for line in text.splitlines()
                     if re.search(word, line, re.I) and "its target" not in line]
            assert not found, (name, word, found)


def test_quick_start_is_the_two_commands():
    quick = README.split("## Quick start", 1)[1].split("##", 1)[0]
    assert re.findall(r"^\./run\.sh --demo$|^tests/run_tests\.sh$", quick, re.M) == [
        "./run.sh --demo", "tests/run_tests.sh"]


@pytest.mark.parametrize("command", [
    "step1_pff_to_zarr.py", "step2_dask_baseline.py", "cluster_lifecycle_manager.py",
    "pff.py", "-m panoseti_pipeline synthetic", "-m panoseti_pipeline config check",
    "-m panoseti_pipeline quicklook",
    "-m panoseti_pipeline catalog"])
def test_every_script_option_is_documented(command):
    argv = command.split()
    if not argv[0].startswith("-"):
        argv[0] = str(REPO / argv[0])
    out = subprocess.run([sys.executable, *argv, "--help"], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout
    options = set(re.findall(r"(--[a-z][a-z0-9-]+)", out)) - {"--help"}
    assert command.removeprefix("-m ") in ALL_DOCS
    missing = sorted(o for o in options if o not in ALL_DOCS)
    assert not missing, f"{command} options not in README.md or docs/: {missing}"


def test_every_run_sh_option_is_documented():
    out = subprocess.run(["bash", str(REPO / "run.sh"), "--help"], capture_output=True,
                         text=True, check=True).stdout
    options = set(re.findall(r"(--[a-z][a-z0-9-]+)", out)) - {"--help"}
    assert {"--dry-run", "--steps", "--keep-l0", "--overwrite", "--keep-going",
            "--debug", "--demo"} <= options
    assert not sorted(o for o in options if f"`{o}" not in ALL_DOCS)
