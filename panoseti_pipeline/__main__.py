"""``python3 -m panoseti_pipeline COMMAND ...`` (see :mod:`panoseti_pipeline.cli`)."""

import sys

from panoseti_pipeline.bootstrap import ensure_requirements

ensure_requirements()

from panoseti_pipeline.cli import main  # noqa: E402

sys.exit(main())
