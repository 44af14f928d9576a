#!/usr/bin/env python3
"""Step 1: the PFF file(s) of one stream -> a lossless L0 Zarr v3 store.

    python3 step1_pff_to_zarr.py input.pff output_L0.zarr config.toml [tcp://scheduler:8786]

See panoseti_pipeline/cli/step1.py and the README.
"""

import sys

from panoseti_pipeline.bootstrap import ensure_requirements

ensure_requirements()  # re-runs this script under the project's .venv when needed

from panoseti_pipeline.cli.step1 import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
