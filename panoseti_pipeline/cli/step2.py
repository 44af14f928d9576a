"""Step 2: subtract the baseline from an L0 Zarr store, giving a float32 L1 store.

Usage::

    python3 step2_dask_baseline.py run_L0.zarr run_L1.zarr --config config.toml
    python3 step2_dask_baseline.py run_L0.zarr run_L1.zarr --config config.toml \\
        --dask-scheduler tcp://10.0.0.1:8786 --baseline-window 500 --method median

Command-line values override ``[baseline_subtract]`` of the config. Without a scheduler
the tasks run on threads of this process, with a progress bar; with one, they run on the
cluster's workers, which read the L0 store and write their L1 chunks directly (the
shared file system); only small summaries come back. Either way the store is
byte-identical.

The store is written under a temporary name and renamed into place only once it is
verified. An existing complete L1 store is left alone (exit 0) unless --overwrite.
Exit status: 0 store complete and checked (or already there), 1 input or write failed,
2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from panoseti_pipeline import cluster
from panoseti_pipeline.config import BASELINE_METHODS
from panoseti_pipeline.errors import EXIT_OK, run_main
from panoseti_pipeline.version import add_version_option

PROG = "step2_dask_baseline.py"


def parse_args(argv: Sequence[str] | None, prog: str = PROG) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog, description="Subtract the baseline from an L0 Zarr store (-> L1).")
    add_version_option(parser)
    parser.add_argument("input", metavar="INPUT_L0.zarr", help="L0 store written by step 1")
    parser.add_argument("output", metavar="OUTPUT_L1.zarr", help="L1 store to write")
    parser.add_argument("--config", metavar="CONFIG.toml",
                        help="pipeline configuration (default: built-in defaults)")
    parser.add_argument("--dask-scheduler", metavar="ADDRESS",
                        help="run the tasks on this Dask scheduler (tcp://host:port)")
    cluster.add_cluster_options(parser)
    parser.add_argument("--baseline-window", type=int, metavar="N",
                        help="frames that make the baseline (overrides the config)")
    parser.add_argument("--method", metavar="M",
                        help=f"baseline method: {' | '.join(BASELINE_METHODS)} "
                             "(overrides the config)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output store")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar, notices or summary line")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    args = parse_args(argv, prog)

    def body() -> int:
        from panoseti_pipeline import step2
        from panoseti_pipeline.config import load_config

        cfg = load_config(args.config).with_overrides(
            "baseline_subtract", baseline_window=args.baseline_window, method=args.method)
        notice = (lambda _msg: None) if args.quiet else (lambda msg: print(msg,
                                                                           file=sys.stderr))
        with cluster.step_client(args.dask_scheduler, args.debug, args.dask_credentials,
                                 args.dask_scheduler_file,
                                 cluster.startup_wait_s(cfg.cluster)) as client:
            result = step2.subtract_baseline(args.input, args.output, cfg, client=client,
                                             overwrite=args.overwrite, quiet=args.quiet,
                                             notice=notice)
        if not args.quiet:
            print(result.line())
        return EXIT_OK

    return run_main(body, PROG, args.debug)


if __name__ == "__main__":
    sys.exit(main())
