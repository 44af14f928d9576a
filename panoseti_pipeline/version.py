"""What this pipeline is: the package's version and, in a git checkout, its commit.

One home for both, so that ``--version`` of every command and the ``software`` record of
every store say the same thing.
"""

from __future__ import annotations

import argparse
import subprocess
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

DISTRIBUTION = "panoseti-pipeline"


@cache
def git_revision() -> str:
    """``git describe --always --dirty`` of the checkout holding the package, or "unknown"."""
    repo = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def package_version() -> str:
    """The installed distribution's version (pyproject.toml), or "unknown" if not installed."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown"


def version_line(prog: str) -> str:
    """``PROG (panoseti-pipeline 0.3.0, git 1a2b3c4)``; no git part outside a checkout."""
    revision = git_revision()
    git = f", git {revision}" if revision != "unknown" else ""
    return f"{prog} ({DISTRIBUTION} {package_version()}{git})"


class _VersionAction(argparse.Action):
    """argparse's ``version`` action, but asking git only when ``--version`` is given."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line(parser.prog))
        parser.exit()


def add_version_option(parser: argparse.ArgumentParser) -> None:
    """``--version`` on a parser: print :func:`version_line` and exit 0."""
    parser.add_argument("--version", action=_VersionAction,
                        help="print the pipeline's version (and git commit) and exit")
