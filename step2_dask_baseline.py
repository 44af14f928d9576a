#!/usr/bin/env python3
"""Step 2: L0 Zarr -> baseline-subtracted L1 Zarr.

    python3 step2_dask_baseline.py input_L0.zarr output_L1.zarr --config config.toml
        [--dask-scheduler tcp://scheduler:8786] [--baseline-window 200]

See panoseti_pipeline/cli/step2.py and the README.
"""

import sys

from panoseti_pipeline.bootstrap import ensure_requirements

ensure_requirements()  # re-runs this script under the project's .venv when needed

from panoseti_pipeline.cli.step2 import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
