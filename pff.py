#!/usr/bin/env python3
"""The PANOSETI File Format's public face.

    python3 pff.py info FILE_OR_DIR...      # what is in PFF files
    import pff                              # the reader API (panoseti_pipeline.pff)
"""

import sys

from panoseti_pipeline.bootstrap import ensure_requirements

ensure_requirements()  # re-runs this script under the project's .venv when needed

from panoseti_pipeline.pff import *  # noqa: E402,F403 -- `import pff` gives the reader API
from panoseti_pipeline.pff import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
