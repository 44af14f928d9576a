#!/usr/bin/env python3
"""Start one Dask cluster from [cluster], publish its address, hold it until SIGTERM.

    python3 cluster_lifecycle_manager.py config.toml scheduler_file

See panoseti_pipeline/cli/cluster_manager.py and the README.
"""

import sys

from panoseti_pipeline.bootstrap import ensure_requirements

ensure_requirements()  # re-runs this script under the project's .venv when needed

from panoseti_pipeline.cli.cluster_manager import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
