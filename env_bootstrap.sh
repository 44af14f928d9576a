# shellcheck shell=bash
# env_bootstrap.sh: choose a Python >= 3.12 and make the pipeline's requirements importable.
#
# A library, sourced by run.sh and tests/run_tests.sh:
#
#     source "$REPO_ROOT/env_bootstrap.sh"
#     bootstrap_python_env "$REPO_ROOT" "$REPO_ROOT/requirements.txt"   # exports PYTHON
#     "$PYTHON" "$REPO_ROOT/step1_pff_to_zarr.py" ...
#
# or executed, `bash env_bootstrap.sh [REQUIREMENTS_FILE]`, which does the same for the
# repository it sits in (default requirements.txt) and prints the chosen interpreter on
# stdout: the Python scripts re-run themselves with it (panoseti_pipeline/bootstrap.py).
#
# The interpreter, in this order (DESIGN.md §9):
#   1. the active virtual env ($VIRTUAL_ENV) or conda env ($CONDA_PREFIX), if its python
#      is >= 3.12;
#   2. the first working python3.13, python3.12, python3 on PATH that is >= 3.12 (each is
#      run, not just looked up: the pyenv shim of a version that is not selected exists on
#      PATH but fails);
#   3. the newest pyenv version >= 3.12, as $(pyenv prefix X)/bin/python3;
#   4. otherwise one line on stderr asking to install Python >= 3.12, and a non-zero return.
#
# The requirements: an active env (1) that already satisfies the requirements file (its
# lower bounds) is used as it is. Otherwise <repo>/.venv is created (or reused) with the
# chosen interpreter and filled from the lock beside FILE (requirements.txt ->
# requirements.lock, requirements-test.txt -> requirements-test.lock: exact versions of
# every package, with hashes): `pip install --require-hashes --no-deps -r LOCK`, then the
# pipeline's own package, editable, with the locked setuptools (no build isolation, so
# nothing unlocked is downloaded). Without a lock beside FILE, `pip install -r FILE -e
# <repo>`. Either runs only when the lock (or FILE and what it includes with -r/-c) or
# pyproject.toml changed since the last successful install: a stamp in .venv holds their
# hash. A repeated run with no other env active finds .venv ready from that stamp and
# probes only .venv's python: no search for an interpreter, no pip.
#
# Every message is one line on stderr ("env_bootstrap: ..."), so stdout stays the caller's.
# Safe under `set -o errexit -o nounset -o pipefail`. Names defined: bootstrap_python_env,
# env_bootstrap_find_python, env_bootstrap_requirements_digest, env_bootstrap_lock_file,
# _envb_* helpers, and the ENV_BOOTSTRAP_* results of env_bootstrap_find_python.

# Python older than 3.<this> is rejected (zarr >= 3.2 requires Python >= 3.12).
ENV_BOOTSTRAP_MIN_MINOR=12

_envb_say() {
  printf 'env_bootstrap: %s\n' "$*" >&2
}

# _envb_probe CMD: run CMD as Python; print "VERSION<TAB>EXECUTABLE" (sys.executable, so a
# pyenv shim resolves to the real interpreter). Non-zero if CMD does not run as Python.
_envb_probe() {
  local cmd="$1" out version executable
  out="$("$cmd" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3]); print(sys.executable)' \
    </dev/null 2>/dev/null)" || return 1
  version="${out%%$'\n'*}"
  executable=""
  if [[ "$out" == *$'\n'* ]]; then
    executable="${out#*$'\n'}"
    executable="${executable%%$'\n'*}"
  fi
  [[ "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || return 1
  if [[ -z "$executable" || ! -x "$executable" ]]; then
    executable="$cmd"
  fi
  printf '%s\t%s\n' "$version" "$executable"
}

# _envb_new_enough VERSION: true if VERSION (X.Y.Z) is >= 3.ENV_BOOTSTRAP_MIN_MINOR.
_envb_new_enough() {
  local major minor rest
  IFS=. read -r major minor rest <<<"$1"
  [[ "$major" =~ ^[0-9]+$ && "$minor" =~ ^[0-9]+$ ]] || return 1
  ((major > 3 || (major == 3 && minor >= ENV_BOOTSTRAP_MIN_MINOR)))
}

# _envb_accept CMD HOW: if CMD is a working Python >= 3.12, record it as the choice.
_envb_accept() {
  local cmd="$1" how="$2" probe
  probe="$(_envb_probe "$cmd")" || return 1
  _envb_new_enough "${probe%%$'\t'*}" || return 1
  ENV_BOOTSTRAP_BASE_VERSION="${probe%%$'\t'*}"
  ENV_BOOTSTRAP_BASE_PYTHON="${probe#*$'\t'}"
  ENV_BOOTSTRAP_HOW="$how"
}

# _envb_pyenv_versions PYENV: the installed pyenv versions X.Y.Z with Y >= the minimum,
# newest first (aliases, dev, free-threaded and non-CPython versions are left out).
_envb_pyenv_versions() {
  local pyenv_cmd="$1" version
  "$pyenv_cmd" versions --bare 2>/dev/null | while IFS= read -r version; do
    version="${version//[[:space:]]/}"
    if [[ "$version" =~ ^3\.([0-9]+)\.[0-9]+$ ]] \
      && ((BASH_REMATCH[1] >= ENV_BOOTSTRAP_MIN_MINOR)); then
      printf '%s\n' "$version"
    fi
  done | sort -t . -k 1,1nr -k 2,2nr -k 3,3nr
}

# env_bootstrap_find_python: choose the interpreter (order in the header). Sets
# ENV_BOOTSTRAP_BASE_PYTHON (absolute path), ENV_BOOTSTRAP_BASE_VERSION, ENV_BOOTSTRAP_HOW
# (how it was found) and ENV_BOOTSTRAP_ACTIVE_ENV (the env's prefix for case 1, else "").
# Returns 1 after one line on stderr when there is none.
env_bootstrap_find_python() {
  local env_var prefix probe candidate pyenv_cmd version
  ENV_BOOTSTRAP_BASE_PYTHON=""
  ENV_BOOTSTRAP_BASE_VERSION=""
  ENV_BOOTSTRAP_HOW=""
  ENV_BOOTSTRAP_ACTIVE_ENV=""

  for env_var in VIRTUAL_ENV CONDA_PREFIX; do
    prefix="${!env_var:-}"
    [[ -n "$prefix" ]] || continue
    if _envb_accept "$prefix/bin/python" "the active env $prefix (\$$env_var)"; then
      ENV_BOOTSTRAP_ACTIVE_ENV="$prefix"
      return 0
    fi
    if probe="$(_envb_probe "$prefix/bin/python")"; then
      _envb_say "ignoring the active env $prefix (\$$env_var): Python ${probe%%$'\t'*} < 3.$ENV_BOOTSTRAP_MIN_MINOR"
    else
      _envb_say "ignoring the active env $prefix (\$$env_var): no working $prefix/bin/python"
    fi
  done

  for candidate in python3.13 python3.12 python3; do
    command -v "$candidate" >/dev/null 2>&1 || continue
    if _envb_accept "$candidate" "$candidate on PATH"; then
      return 0
    fi
  done

  pyenv_cmd="$(command -v pyenv 2>/dev/null)" || pyenv_cmd="${PYENV_ROOT:-${HOME:-/nonexistent}/.pyenv}/bin/pyenv"
  if [[ -x "$pyenv_cmd" ]]; then
    while IFS= read -r version; do
      prefix="$("$pyenv_cmd" prefix "$version" 2>/dev/null)" || continue
      if _envb_accept "$prefix/bin/python3" "pyenv version $version"; then
        return 0
      fi
    done < <(_envb_pyenv_versions "$pyenv_cmd")
  fi

  _envb_say "error: no Python >= 3.$ENV_BOOTSTRAP_MIN_MINOR found (tried \$VIRTUAL_ENV/\$CONDA_PREFIX, python3.13/python3.12/python3 on PATH, pyenv); install Python >= 3.$ENV_BOOTSTRAP_MIN_MINOR and activate it, e.g. \`conda create -n panoseti python=3.13 && conda activate panoseti\`"
  return 1
}

# _envb_requirements_text FILE [DEPTH]: FILE's lines followed by those of the files it
# includes with -r/--requirement or -c/--constraint (relative to FILE's directory).
_envb_requirements_text() {
  local file="$1" depth="${2:-0}" dir line include
  local include_re='^[[:space:]]*(-r|--requirement|-c|--constraint)[[:space:]=]+([^[:space:]#]+)'
  if ((depth > 10)); then
    _envb_say "error: $file: requirement files include each other more than 10 deep"
    return 1
  fi
  if [[ ! -r "$file" ]]; then
    _envb_say "error: cannot read requirements file $file"
    return 1
  fi
  dir="."
  if [[ "$file" == */* ]]; then
    dir="${file%/*}"
  fi
  printf '## %s\n' "${file##*/}"
  while IFS= read -r line || [[ -n "$line" ]]; do
    printf '%s\n' "$line"
    if [[ "$line" =~ $include_re ]]; then
      include="${BASH_REMATCH[2]}"
      if [[ "$include" != /* ]]; then
        include="$dir/$include"
      fi
      _envb_requirements_text "$include" "$((depth + 1))" || return 1
    fi
  done <"$file"
}

# env_bootstrap_requirements_digest FILE: print the SHA-256 of FILE and its includes.
env_bootstrap_requirements_digest() {
  local text sum
  text="$(_envb_requirements_text "$1")" || return 1
  if command -v sha256sum >/dev/null 2>&1; then
    sum="$(printf '%s\n' "$text" | sha256sum)"
  elif command -v shasum >/dev/null 2>&1; then
    sum="$(printf '%s\n' "$text" | shasum -a 256)"
  else
    sum="$(printf '%s\n' "$text" | cksum)"
  fi
  printf '%s\n' "${sum%% *}"
}

# _envb_same_dir A B: true if A and B are the same existing directory.
_envb_same_dir() {
  [[ -d "$1" && -d "$2" ]] || return 1
  [[ "$(cd -- "$1" && pwd -P)" == "$(cd -- "$2" && pwd -P)" ]]
}

# _envb_satisfies PYTHON FILE: true if PYTHON's environment already has everything FILE
# asks for (pip's dry run, offline: nothing to install and no error).
_envb_satisfies() {
  local python="$1" req="$2" out
  out="$("$python" -m pip install --dry-run --no-index --disable-pip-version-check \
    -r "$req" 2>&1 </dev/null)" || return 1
  [[ "$out" != *"Would install"* ]]
}

# _envb_ensure_venv VENV BASE_PYTHON: reuse VENV if its python works and is >= 3.12,
# else (re)create it with BASE_PYTHON. Sets ENV_BOOTSTRAP_VENV_VERSION.
_envb_ensure_venv() {
  local venv="$1" base="$2" probe
  local -a venv_args=()
  if [[ -e "$venv/bin/python" ]] && probe="$(_envb_probe "$venv/bin/python")" \
    && _envb_new_enough "${probe%%$'\t'*}"; then
    ENV_BOOTSTRAP_VENV_VERSION="${probe%%$'\t'*}"
    return 0
  fi
  if [[ -e "$venv" ]]; then
    _envb_say "recreating $venv with $base: its python is missing, broken or older than 3.$ENV_BOOTSTRAP_MIN_MINOR"
    venv_args=(--clear)
  else
    _envb_say "creating $venv with $base (Python $ENV_BOOTSTRAP_BASE_VERSION)"
  fi
  if ! "$base" -m venv ${venv_args[@]+"${venv_args[@]}"} "$venv" >&2 </dev/null; then
    _envb_say "error: '$base -m venv $venv' failed (is Python's venv/ensurepip module installed?)"
    return 1
  fi
  probe="$(_envb_probe "$venv/bin/python")" || {
    _envb_say "error: $venv/bin/python does not run after creating $venv"
    return 1
  }
  ENV_BOOTSTRAP_VENV_VERSION="${probe%%$'\t'*}"
}

# _envb_has_package PYTHON REPO: true if PYTHON imports the pipeline package from REPO
# (run from / so that the current directory does not make it importable).
_envb_has_package() {
  local found
  found="$(cd / && "$1" -c 'import panoseti_pipeline as p; print(p.__file__)' 2>/dev/null \
    </dev/null)" || return 1
  [[ "$found" == "$2/panoseti_pipeline/__init__.py" ]]
}

# env_bootstrap_lock_file FILE: the lock of requirements FILE (same name, .lock).
env_bootstrap_lock_file() {
  printf '%s.lock\n' "${1%.txt}"
}

# _envb_pip VENV ARGS...: VENV's pip, quiet; one line naming the command if it fails.
_envb_pip() {
  local venv="$1"
  shift
  if ! "$venv/bin/python" -m pip install --disable-pip-version-check --quiet "$@" \
    >&2 </dev/null; then
    _envb_say "error: '$venv/bin/python -m pip install $*' failed (pip's messages above)"
    return 1
  fi
}

# _envb_install_source FILE: what gets installed for requirements FILE: its lock when
# there is one beside it, else FILE itself.
_envb_install_source() {
  local lock
  lock="$(env_bootstrap_lock_file "$1")"
  if [[ -e "$lock" ]]; then
    printf '%s\n' "$lock"
  else
    printf '%s\n' "$1"
  fi
}

# _envb_digest FILE REPO: the install stamp's text for requirements FILE of REPO (the hash
# of what gets installed, and of pyproject.toml).
_envb_digest() {
  local digest
  digest="$(env_bootstrap_requirements_digest "$(_envb_install_source "$1")")" || return 1
  digest+=" $(env_bootstrap_requirements_digest "$2/pyproject.toml")" || return 1
  printf '%s\n' "$digest"
}

# _envb_stamp VENV FILE: the install stamp of requirements FILE in VENV.
_envb_stamp() {
  printf '%s\n' "$1/.panoseti-installed-${2##*/}.sha256"
}

# _envb_installed VENV FILE REPO: true if VENV's stamp says exactly this set was installed.
_envb_installed() {
  local stamp digest
  stamp="$(_envb_stamp "$1" "$2")"
  [[ -r "$stamp" ]] || return 1
  digest="$(_envb_digest "$2" "$3")" || return 1
  [[ "$(<"$stamp")" == "$digest" ]]
}

# _envb_install_if_changed VENV FILE REPO: install FILE's lock (else FILE) and REPO,
# editable, into VENV unless the stamp says this exact set and pyproject.toml were
# installed.
_envb_install_if_changed() {
  local venv="$1" req="$2" repo="$3" lock source digest stamp
  if _envb_installed "$venv" "$req" "$repo"; then
    return 0
  fi
  lock="$(env_bootstrap_lock_file "$req")"
  source="$(_envb_install_source "$req")"
  digest="$(_envb_digest "$req" "$repo")" || return 1
  stamp="$(_envb_stamp "$venv" "$req")"
  _envb_say "installing ${source##*/} into $venv (first run, or the requirements changed) ..."
  rm -f -- "$stamp"
  if [[ "$source" == "$lock" ]]; then
    # --no-compile: byte-compiling every module of every package took 3/4 of the install
    # (55 s -> 15 s here); Python compiles what is imported, once, when it is imported.
    _envb_pip "$venv" --no-compile --require-hashes --no-deps -r "$lock" || return 1
    _envb_pip "$venv" --no-deps --no-build-isolation -e "$repo" || return 1
  else
    _envb_pip "$venv" -r "$req" -e "$repo" || return 1
  fi
  printf '%s\n' "$digest" >"$stamp"
}

# _envb_bytecode_cache VENV: the processes of a run (each step, each driver call) import
# numpy, zarr, dask, matplotlib ...; the .venv is installed without byte code (--no-compile,
# 4x faster), so without a cache each process compiles those modules again (~1 s each) --
# always so where PYTHONDONTWRITEBYTECODE is set. Byte code is written into one cache in
# VENV (PYTHONPYCACHEPREFIX, unless the caller chose one): the source trees get none.
_envb_bytecode_cache() {
  export PYTHONPYCACHEPREFIX="${PYTHONPYCACHEPREFIX:-$1/pycache}"
  unset PYTHONDONTWRITEBYTECODE
}

# _envb_ready_venv VENV FILE REPO: true if no env other than VENV is active and VENV's
# python works, is >= 3.12 and has FILE's set installed. Sets ENV_BOOTSTRAP_VENV_VERSION.
_envb_ready_venv() {
  local venv="$1" env_var prefix probe
  for env_var in VIRTUAL_ENV CONDA_PREFIX; do
    prefix="${!env_var:-}"
    if [[ -n "$prefix" ]] && ! _envb_same_dir "$prefix" "$venv"; then
      return 1
    fi
  done
  [[ -x "$venv/bin/python" ]] || return 1
  _envb_installed "$venv" "$2" "$3" || return 1
  probe="$(_envb_probe "$venv/bin/python")" || return 1
  _envb_new_enough "${probe%%$'\t'*}" || return 1
  ENV_BOOTSTRAP_VENV_VERSION="${probe%%$'\t'*}"
}

# bootstrap_python_env REPO_ROOT REQUIREMENTS_FILE: choose the interpreter, make the
# requirements importable, export PYTHON, and say on stderr which interpreter it is.
bootstrap_python_env() {
  local repo_root="${1:?usage: bootstrap_python_env REPO_ROOT REQUIREMENTS_FILE}"
  local req="${2:?usage: bootstrap_python_env REPO_ROOT REQUIREMENTS_FILE}"
  local venv="$repo_root/.venv"
  if [[ ! -r "$req" ]]; then
    _envb_say "error: cannot read requirements file $req"
    return 1
  fi
  # The repository's .venv, installed from exactly these requirements, with no other env
  # active: nothing to choose, so no interpreter on PATH or in pyenv is probed (pyenv's
  # shims cost ~0.4 s each, and run.sh bootstraps on every run).
  if _envb_ready_venv "$venv" "$req" "$repo_root"; then
    PYTHON="$venv/bin/python"
    export PYTHON
    _envb_bytecode_cache "$venv"
    _envb_say "using $PYTHON (Python $ENV_BOOTSTRAP_VENV_VERSION, the repository's .venv, installed from $(_envb_install_source "$req"))"
    return 0
  fi
  env_bootstrap_find_python || return 1

  if [[ -n "$ENV_BOOTSTRAP_ACTIVE_ENV" ]] && ! _envb_same_dir "$ENV_BOOTSTRAP_ACTIVE_ENV" "$venv"; then
    if _envb_satisfies "$ENV_BOOTSTRAP_BASE_PYTHON" "$req" \
      && _envb_has_package "$ENV_BOOTSTRAP_BASE_PYTHON" "$repo_root"; then
      PYTHON="$ENV_BOOTSTRAP_BASE_PYTHON"
      export PYTHON
      _envb_say "using $PYTHON (Python $ENV_BOOTSTRAP_BASE_VERSION, $ENV_BOOTSTRAP_HOW, which has ${req##*/} and the pipeline package)"
      return 0
    fi
    _envb_say "the active env $ENV_BOOTSTRAP_ACTIVE_ENV lacks some of ${req##*/} or the pipeline package (pip install -e $repo_root); using $venv instead"
  fi

  _envb_ensure_venv "$venv" "$ENV_BOOTSTRAP_BASE_PYTHON" || return 1
  _envb_install_if_changed "$venv" "$req" "$repo_root" || return 1
  PYTHON="$venv/bin/python"
  export PYTHON
  _envb_bytecode_cache "$venv"
  _envb_say "using $PYTHON (Python $ENV_BOOTSTRAP_VENV_VERSION; base interpreter $ENV_BOOTSTRAP_BASE_PYTHON, $ENV_BOOTSTRAP_HOW)"
}

# Executed rather than sourced: bootstrap this repository and print the interpreter.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  set -o errexit -o nounset -o pipefail
  _envb_repo="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
  bootstrap_python_env "$_envb_repo" "${1:-$_envb_repo/requirements.txt}"
  printf '%s\n' "$PYTHON"
fi
