"""The pipeline's commands: ``python3 -m panoseti_pipeline COMMAND ...``.

Each command is a ``main(argv) -> int`` in its own module, imported only when called, so
``--help`` and a fast command never pay for zarr or dask. The top-level scripts call the
same functions (``step1_pff_to_zarr.py`` is ``step1`` here).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

#: command -> (module:function, one-line help)
COMMANDS = {
    "step1": ("panoseti_pipeline.cli.step1:main", "PFF file(s) of one stream -> L0 Zarr"),
    "step2": ("panoseti_pipeline.cli.step2:main", "L0 Zarr -> baseline-subtracted L1 Zarr"),
    "cluster": ("panoseti_pipeline.cli.cluster_manager:main",
                "start a Dask cluster from [cluster], hold it until SIGTERM"),
    "pff": ("panoseti_pipeline.pff.info:main",
            "pff info FILE_OR_DIR_OR_STORE...: what is in PFF files and Zarr stores"),
    "config": ("panoseti_pipeline.config:main", "config check|show CONFIG.toml"),
    "synthetic": ("panoseti_pipeline.synthetic:main",
                  "write a synthetic observation (tests, demo, benchmarks)"),
    "quicklook": ("panoseti_pipeline.quicklook:main",
                  "quicklook STORE... [--out DIR]: a PNG per L0/L1 store"),
    "catalog": ("panoseti_pipeline.catalog:main",
                "catalog OUTPUT_ROOT [--module --dp --between --level --json]: find products"),
    "driver": ("panoseti_pipeline.driver.cli:main",
               "run.sh's Python side (plan, record, summary)"),
}


PROG = "python3 -m panoseti_pipeline"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--version"]:
        from panoseti_pipeline.version import version_line

        print(version_line(PROG))
        return 0
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
        usage = (f"usage: {PROG} COMMAND [ARGS...]\n       {PROG} --version\n\n"
                 f"commands (COMMAND --help for each):\n")
        print(usage + "\n".join(lines), file=sys.stdout if args else sys.stderr)
        if args and args[0] not in ("-h", "--help"):
            print(f"panoseti_pipeline: error: unknown command {args[0]!r}", file=sys.stderr)
            return 2
        return 0 if args else 2
    module, _, function = COMMANDS[args[0]][0].partition(":")
    command = getattr(importlib.import_module(module), function)
    return int(command(args[1:], prog=f"{PROG} {args[0]}") or 0)
