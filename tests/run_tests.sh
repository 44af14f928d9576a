#!/usr/bin/env bash
# Run the lint and the test suite: the command the README and CI use.
#
#     bash tests/run_tests.sh                 # ruff, then the whole pytest suite
#     bash tests/run_tests.sh -k pff -x       # extra arguments go to pytest
#     bash tests/run_tests.sh -m "not ssh"    # e.g. leave out the SSH-cluster tests
#     bash tests/run_tests.sh -n 0 -x         # one process (the default: one per CPU, xdist)
#
# Chooses a Python >= 3.12 and installs requirements-test.txt into .venv when needed
# (env_bootstrap.sh). Runs from the repository root whatever the caller's directory, so
# test paths given as arguments are relative to the repository root. Exits with pytest's
# status, except that "no tests collected" (pytest's 5) is a failure too; a ruff finding
# makes the exit non-zero after the tests have run.
set -o errexit -o nounset -o pipefail

REPO_ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)"
# shellcheck source=SCRIPTDIR/../env_bootstrap.sh
source "$REPO_ROOT/env_bootstrap.sh"

main() {
  local lint_rc=0 test_rc=0
  bootstrap_python_env "$REPO_ROOT" "$REPO_ROOT/requirements-test.txt"
  cd -- "$REPO_ROOT"

  # (bootstrap_python_env caches byte code in .venv/pycache: the suite starts a few hundred
  # Python processes, each importing numpy, dask, zarr and xarray.)

  echo "run_tests.sh: ruff check $REPO_ROOT" >&2
  "$PYTHON" -m ruff check "$REPO_ROOT" || lint_rc=$?

  # One pytest worker per CPU this process may use, first: a later -n in the arguments
  # (e.g. -n 0 to debug) wins. --dist loadscope: each module (test class) runs whole on
  # one worker, so a module's fixture (a night through run.sh, a running cluster) is made
  # once, not once per worker; --no-loadscope-reorder: the modules are handed out in
  # collection order, which tests/conftest.py makes longest first.
  # (--dist loadgroup would allow finer groups, but pytest-xdist 3.8 ignores xdist_group
  # marks under pytest 9.2: pytest-dev/pytest-xdist#1386.)
  "$PYTHON" -m pytest -n "$(nproc)" --dist loadscope --no-loadscope-reorder "$@" || test_rc=$?

  if ((test_rc == 5)); then
    echo "run_tests.sh: error: pytest collected no tests (exit 5); counted as a failure" >&2
    exit 5
  fi
  if ((test_rc != 0)); then
    exit "$test_rc"
  fi
  if ((lint_rc != 0)); then
    echo "run_tests.sh: error: ruff check found problems (exit $lint_rc); the tests passed" >&2
    exit "$lint_rc"
  fi
}

main "$@"
