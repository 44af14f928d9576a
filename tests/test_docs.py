"""The README stays true: every config key, script option and command is documented."""

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
CONFIG = (REPO / "config.toml").read_text()
SECTIONS = {"cluster": pipeline_config.ClusterConfig,
            "pff_to_zarr": pipeline_config.PffToZarrConfig,
            "baseline_subtract": pipeline_config.BaselineConfig,
            "run": pipeline_config.RunConfig}


@pytest.mark.parametrize("section", SECTIONS)
def test_every_config_key_is_in_readme_and_config_toml(section):
    keys = [f.name for f in dataclasses.fields(SECTIONS[section])]
    assert keys
    shipped = pipeline_config.load_config(REPO / "config.toml").as_dict()[section]
    for key in keys:
        assert f"`{key}`" in README, f"[{section}] {key} is not documented in README.md"
        assert re.search(rf"^#? ?{key} = ", CONFIG, re.M), f"[{section}] {key} not in config.toml"
        assert key in shipped


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
    assert command.removeprefix("-m ") in README
    missing = sorted(o for o in options if o not in README)
    assert not missing, f"{command} options not in README.md: {missing}"


def test_every_run_sh_option_is_documented():
    out = subprocess.run(["bash", str(REPO / "run.sh"), "--help"], capture_output=True,
                         text=True, check=True).stdout
    options = set(re.findall(r"(--[a-z][a-z0-9-]+)", out)) - {"--help"}
    assert {"--dry-run", "--steps", "--keep-l0", "--overwrite", "--keep-going",
            "--debug", "--demo"} <= options
    assert not sorted(o for o in options if f"`{o}" not in README)
