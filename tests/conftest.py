"""Settings of the whole test session."""

from __future__ import annotations

import pytest

# The order in which the pytest-xdist workers get the test modules (tests/run_tests.sh:
# --dist loadscope --no-loadscope-reorder): longest first, so that the short modules fill
# the end and no worker runs a long one alone while the other idles (longest processing
# time first). Seconds per module from `tests/run_tests.sh --durations=0` on the 2-core
# development machine; a module not listed comes after these. Only the order depends on
# these figures: an outdated one costs minutes at worst, never a result.
MODULE_SECONDS = {
    "test_run_sh": 150, "test_faults": 113, "test_slurm_cluster": 82,
    "test_ssh_cluster": 67, "test_catalog": 50, "test_readme_examples": 38,
    "test_step2": 37, "test_pypff_conformance": 33, "test_index_html": 30,
    "test_cluster": 21, "test_team_layout": 20, "test_products": 17, "test_run_night": 15,
    "test_quicklook": 15, "test_step1": 13, "test_step2_analysis": 11,
    "test_housekeeping": 10,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest modules first; within a module, the tests in the order written."""
    def seconds(item: pytest.Item) -> int:
        return MODULE_SECONDS.get(item.path.stem, 0)

    items.sort(key=seconds, reverse=True)  # stable
