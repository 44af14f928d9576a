#!/usr/bin/env bash
# Refresh the lock files: the newest releases within the bounds of requirements.txt and
# requirements-test.txt, exact versions with hashes, for Python >= 3.12 on any platform.
#
#     bash tools/refresh_lock.sh
#     rm -rf .venv && tests/run_tests.sh     # a release reaches users only once this passes
#
# requirements-test.lock locks requirements-test.txt (which includes requirements.txt)
# and the build requirements of pyproject.toml (setuptools: env_bootstrap.sh installs the
# pipeline's package without build isolation, so nothing unlocked is downloaded).
# requirements.lock locks requirements.txt and the build requirements with the versions
# of requirements-test.lock, so both give the same version of every package they share.
# tools/lock-constraints.txt caps what must not be taken yet, each with its reason.
#
# The resolver is uv (pinned below), installed into a temporary venv that is removed
# afterwards; it needs the package index (PyPI), nothing else.
set -o errexit -o nounset -o pipefail

REPO_ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)"
UV_VERSION="0.13.9"
# shellcheck source=SCRIPTDIR/../env_bootstrap.sh
source "$REPO_ROOT/env_bootstrap.sh"

main() {
  local work build=build-system.requires.txt
  env_bootstrap_find_python
  work="$(mktemp -d)"
  # shellcheck disable=SC2064 # expand now: work is local
  trap "rm -rf -- '$work'" EXIT
  echo "refresh_lock: installing uv $UV_VERSION into a temporary venv" >&2
  "$ENV_BOOTSTRAP_BASE_PYTHON" -m venv "$work/uv"
  "$work/uv/bin/python" -m pip install --disable-pip-version-check --quiet "uv==$UV_VERSION"
  # Inputs under their own names in the work directory, so the locks' "via" notes name
  # them as in the repository.
  cp -- "$REPO_ROOT/requirements.txt" "$REPO_ROOT/requirements-test.txt" "$work/"
  cp -- "$REPO_ROOT/tools/lock-constraints.txt" "$work/"
  "$ENV_BOOTSTRAP_BASE_PYTHON" -c 'import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["build-system"]["requires"]))' \
    "$REPO_ROOT/pyproject.toml" >"$work/$build"
  cd -- "$work"
  compile requirements-test.lock requirements-test.txt "$build"
  compile requirements.lock requirements.txt "$build" -c requirements-test.lock
  cp -- requirements-test.lock requirements.lock "$REPO_ROOT/"
  echo "refresh_lock: wrote $REPO_ROOT/requirements.lock and requirements-test.lock;" \
    "now: rm -rf $REPO_ROOT/.venv && $REPO_ROOT/tests/run_tests.sh" >&2
}

# compile OUTPUT INPUT... [uv options]: one lock file.
compile() {
  local out="$1"
  shift
  "$work/uv/bin/uv" pip compile --quiet --universal --python-version 3.12 --generate-hashes \
    --custom-compile-command "bash tools/refresh_lock.sh" \
    -c lock-constraints.txt -o "$out" "$@"
}

main "$@"
