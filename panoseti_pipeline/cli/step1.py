"""Step 1: convert the PFF file(s) of one stream into a lossless L0 Zarr v3 store.

Usage::

    python3 step1_pff_to_zarr.py input.pff output_L0.zarr config.toml [tcp://scheduler:8786]
    python3 step1_pff_to_zarr.py seqno0.pff seqno1.pff output_L0.zarr config.toml

Several inputs must be the seqno files of one stream (same observation, dp and
module); they are joined in seqno order, 0-byte files skipped. Without a scheduler
address the conversion runs in this process ([pff_to_zarr] num_workers threads); with
one, every chunk-aligned frame range is a task on the cluster's workers, which write
their chunks directly.

The store is written under a temporary name and renamed into place only once it is
verified. An existing complete store is left alone (exit 0) unless --overwrite.
Exit status: 0 store complete and checked (or already there), 1 input or write
failed, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from panoseti_pipeline import cluster
from panoseti_pipeline.errors import EXIT_OK, run_main
from panoseti_pipeline.version import add_version_option

_ADDRESS = re.compile(r"^[a-z]+://")


PROG = "step1_pff_to_zarr.py"


def parse_args(argv: Sequence[str] | None, prog: str = PROG) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Convert the PFF file(s) of one stream into a lossless L0 Zarr store.",
        epilog="Positional arguments: INPUT.pff [INPUT.pff ...] OUTPUT_L0.zarr CONFIG.toml "
               "[SCHEDULER_ADDRESS]. See docs/steps.md.")
    add_version_option(parser)
    parser.add_argument("args", nargs="+", metavar="ARG",
                        help="input PFF file(s), the output store, the config file, and "
                             "optionally a Dask scheduler address (tcp://host:port)")
    cluster.add_cluster_options(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output store")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or notices")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    ns = parser.parse_args(argv)
    args = list(ns.args)
    ns.address = args.pop() if args and _ADDRESS.match(args[-1]) else None
    if len(args) < 3:
        parser.error("need at least INPUT.pff OUTPUT_L0.zarr CONFIG.toml")
    ns.inputs, ns.output, ns.config = args[:-2], args[-2], args[-1]
    if not ns.config.endswith(".toml"):
        parser.error(f"the config file must be a .toml file, got {ns.config!r} "
                     "(order: INPUT... OUTPUT CONFIG [ADDRESS])")
    if ns.output.endswith(".pff"):
        parser.error(f"the output must be a Zarr store path, got {ns.output!r}")
    return ns


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    args = parse_args(argv, prog)

    def body() -> int:
        from panoseti_pipeline import step1
        from panoseti_pipeline.config import load_config

        cfg = load_config(args.config)
        notice = (lambda _msg: None) if args.quiet else (lambda msg: print(msg,
                                                                           file=sys.stderr))
        with cluster.step_client(args.address, args.debug, args.dask_credentials,
                                 args.dask_scheduler_file,
                                 cluster.startup_wait_s(cfg.cluster)) as client:
            result = step1.convert(args.inputs, args.output, cfg, client=client,
                                   overwrite=args.overwrite, quiet=args.quiet, notice=notice)
        print(result.line())
        return EXIT_OK

    return run_main(body, "step1_pff_to_zarr.py", args.debug)


if __name__ == "__main__":
    sys.exit(main())

