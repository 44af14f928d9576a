#!/usr/bin/env bash
# run.sh: PANOSETI L0 -> L1 over many inputs, with one persistent Dask cluster.
#
#     ./run.sh [options] <input_pff_file_or_pffd_dir> [more ...] <output_l1_dir>
#     CONFIG_FILE=custom.toml ./run.sh data.pff /scratch/output/L1
#     ./run.sh --demo [dir]      # small synthetic observation -> L1, says where to look
#     ./run.sh --sbatch "-c 8 --mem=32G -t 4:00:00" data.pffd /scratch/L1   # as one SLURM job
#     ./run.sh --help
#
# Checks everything before any work (`python3 -m panoseti_pipeline driver plan`), starts the cluster once
# (cluster_lifecycle_manager.py), runs step 1 (PFF -> L0) and step 2 (L0 -> L1) for every
# input, removes each L0, prints a summary table and writes a run record (TOML) into the
# output directory. Whatever happens (success, a failed step, Ctrl-C, SIGTERM) the
# processes it started are stopped by their PID and the temporary files of the failed
# input are removed. Exit: 0 every input done, 1 an input failed, 2 usage/config/input
# problem found before any work, 130 interrupted.
#
# Bash stays thin: the logic that needs Python is in panoseti_pipeline/driver/, called
# through one small CLI (`py` below).
set -o errexit -o nounset -o pipefail

REPO_ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
# shellcheck source=SCRIPTDIR/env_bootstrap.sh
source "$REPO_ROOT/env_bootstrap.sh"

DEMO_DEFAULT_DIR="panoseti_demo"
# Polls of the wait loops, in seconds: every WAIT_POLL_S while waiting for a process to
# stop or the cluster to start; a running step every WAIT_POLL_S for its first
# STEP_FAST_POLLS polls (most short steps end within seconds), then every
# STEP_SLOW_POLL_S (an hour-long step costs next to no CPU).
WAIT_POLL_S=0.1
STEP_FAST_POLLS=100
STEP_SLOW_POLL_S=0.5

# Options (parse_args).
OPT_DRY_RUN=0
OPT_KEEP_L0=0
OPT_OVERWRITE=0
OPT_KEEP_GOING=0
OPT_DEBUG=0
OPT_DEMO=0
OPT_NO_QUICKLOOK=0
OPT_STEPS="1,2"
OPT_L0_DIR=""
OPT_SBATCH=""
OPT_VERSION=0
OPT_SBATCH_SET=0
ARGS=()
PLAN_ARGS=()
DEBUG_ARGS=()
STEP_FLAGS=()
CONFIG=""

# Run state (read by the cleanup and signal handlers).
RUN_TMP=""
STATE_FILE=""
SCHEDULER_FILE=""
CLUSTER_LOG=""
CLUSTER_ADDRESS=""
CLUSTER_DEADLINE=0 # (SECONDS) when run.sh stops waiting for the cluster
MANAGER_PID=""
MANAGER_SIGNALLED=0 # the manager was asked to stop (signal_cluster)
STEP_PID=""     # in a lane (a product in flight): its running step ...
CURRENT_JOB=""  # ... its job ...
CURRENT_STEP="" # ... and the job's step
LANES=1         # products in flight at once (the plan's lanes record)
LANE_CPUS=0     # CPUs of each local step process (0: all of this machine's)
RUNNING=()      # job indexes of the lanes in flight (in the main shell)
LANE_PID=()     # per job index: the process id of its lane
STEP_START=""
STEP_RC=""
CLEANED_UP=0
LOCKED=() # the directories whose run lock this run holds (released by the cleanup)
RUN_LOG=""
LOGGER_PID=""
TERMINAL_ERR=""
HURRY=0
USE_DASK=0
CLUSTER_WAIT_S=180
# Tenths of a second a step, then the cluster manager, gets to stop after SIGTERM before
# SIGKILL ([run] stop_grace_s, from the plan).
STOP_GRACE_TENTHS=600
CLUSTER_DESC=""
OUT_DIR=""
L0_DIR=""
L0_DIR_SCRATCH=0 # L0_DIR is the pipeline's own (<output>/.l0_tmp): removed when empty
L0_DIR_CREATED=0
OUT_DIR_CREATED=0
RUN_UMASK=""
FAILED=0
JOB_ACTION=()
JOB_NAME=()
JOB_L0=()
JOB_L1=()
JOB_INPUTS=()
BUNDLE_RUN=()     # per run: its .pffd directory (or a bundle of it, --steps 2) ...
BUNDLE_DIR=()     # ... and the directory of its products (its bundle goes there too)

usage() {
  cat <<'EOF'
Usage: ./run.sh [options] <input_pff_file_or_pffd_dir> [more ...] <output_l1_dir>
       ./run.sh --demo [dir]

Converts PANOSETI PFF files to L1 Zarr stores: step 1 PFF -> L0 (lossless), step 2
L0 -> L1 (baseline-subtracted float32). The steps run on this machine, or on one Dask
cluster for all inputs when the config sets [cluster] use_dask = true.

Inputs: .pff data files (start_*.dp_*.bpp_*.module_*.seqno_*.pff), or .pffd observation
directories (one product per data product and module; seqno files joined in order; 0-byte
files and hk.pff skipped). Outputs: <output_l1_dir>/<run>/<run>.dp_*.module_*_L1.zarr for
a .pffd run <run>.pffd (with its run bundle and index.html), <output_l1_dir>/<input
name>_L1.zarr for a .pff file given alone, and in <output_l1_dir>: catalog.sqlite,
run_record_<UTC time>.toml, run_log_<UTC time>_<pid>.log. See docs/run.md.

Options:
  --dry-run        print the plan (streams, outputs, cluster) and change nothing
  --steps S        1, 2 or 1,2 (default 1,2). --steps 1 writes <name>_L0.zarr into the
                   output directory; with --steps 2 the inputs are L0 stores
  --keep-l0        keep the intermediate L0 stores (default: in <output_l1_dir>/L0); no
                   later run removes them
  --l0-dir DIR     where the L0 stores go (default: [run] l0_dir of the config, or
                   <output_l1_dir>/.l0_tmp); never inside the input tree; locked while a
                   run uses it
  --overwrite      redo inputs whose product is already there (default: skip them)
  --keep-going     a failed input does not stop the others (the exit status is still 1)
  --no-quicklook   no quicklook PNGs and index.html beside the products (default: made
                   after the summary, one PNG per product, one index.html per directory)
  --demo [DIR]     write a small synthetic observation into DIR (default ./panoseti_demo),
                   run the whole pipeline on it, and print where to look
  --sbatch OPTS    check the run here, then submit it as one SLURM job (sbatch OPTS, e.g.
                   "-c 8 --mem=32G -t 4:00:00 -A acct -o log_%j.out") running run.sh on
                   its node with the config's cluster (there: use_dask = true,
                   cluster_type = "local", local_workers = the job's cores; with
                   use_dask = false the steps run as threads); prints the job id
  --debug          tracebacks and Dask logs from every step
  --version        print the pipeline's version (and git commit) and exit
  -h, --help       this help

Environment: CONFIG_FILE (default: config.toml next to run.sh).
Exit status: 0 every input done (or already there), 1 an input failed, 2 a problem found
before any work (nothing started), 130 interrupted.
EOF
}

say() {
  printf 'run.sh: %s\n' "$*" >&2
}

usage_error() {
  say "error: $*"
  say "see ./run.sh --help"
  exit 2
}

# py SUBCOMMAND ...: the Python side (panoseti_pipeline.driver).
py() {
  "$PYTHON" -m panoseti_pipeline driver "${DEBUG_ARGS[@]}" "$@"
}

# now: the time in seconds (fractions where bash has them).
now() {
  if [[ -n "${EPOCHREALTIME:-}" ]]; then
    printf '%s\n' "$EPOCHREALTIME"
  else
    date +%s
  fi
}

parse_args() {
  while (($# > 0)); do
    case "$1" in
      -h | --help)
        usage
        exit 0
        ;;
      --version)
        OPT_VERSION=1
        return 0
        ;;
      --dry-run) OPT_DRY_RUN=1 ;;
      --keep-l0) OPT_KEEP_L0=1 ;;
      --overwrite) OPT_OVERWRITE=1 ;;
      --keep-going) OPT_KEEP_GOING=1 ;;
      --debug) OPT_DEBUG=1 ;;
      --demo) OPT_DEMO=1 ;;
      --no-quicklook) OPT_NO_QUICKLOOK=1 ;;
      --steps | --l0-dir | --sbatch)
        (($# >= 2)) || usage_error "$1 needs a value"
        case "$1" in
          --steps) OPT_STEPS="$2" ;;
          --l0-dir) OPT_L0_DIR="$2" ;;
          *) OPT_SBATCH="$2" OPT_SBATCH_SET=1 ;;
        esac
        shift
        ;;
      --steps=*) OPT_STEPS="${1#*=}" ;;
      --l0-dir=*) OPT_L0_DIR="${1#*=}" ;;
      --sbatch=*) OPT_SBATCH="${1#*=}" OPT_SBATCH_SET=1 ;;
      --)
        shift
        ARGS+=("$@")
        break
        ;;
      -*) usage_error "unknown option $1" ;;
      *) ARGS+=("$1") ;;
    esac
    shift
  done
  case "$OPT_STEPS" in
    1 | 2 | 1,2) ;;
    *) usage_error "--steps $OPT_STEPS: expected 1, 2 or 1,2" ;;
  esac
  if ((OPT_DEMO && OPT_SBATCH_SET)); then
    usage_error "--demo and --sbatch do not go together"
  fi
  if ((OPT_DEMO)); then
    ((${#ARGS[@]} <= 1)) || usage_error "--demo takes at most one directory"
  elif ((${#ARGS[@]} < 2)); then
    usage_error "need at least one input and the output directory"
  fi
  if ((OPT_DEBUG)); then
    DEBUG_ARGS=(--debug)
    STEP_FLAGS+=(--debug)
  fi
  if ((OPT_OVERWRITE)); then
    STEP_FLAGS+=(--overwrite)
  fi
}

# absolute PATH: PATH made absolute and normalised (".", ".." and "//" taken out, as
# Python's os.path.abspath does; links are not followed), for messages and the run record.
absolute() {
  local path="$1" part
  local -a parts out=()
  [[ "$path" == /* ]] || path="$PWD/$path"
  IFS=/ read -r -a parts <<<"$path"
  for part in "${parts[@]}"; do
    case "$part" in
      "" | .) ;;
      ..) if ((${#out[@]})); then unset 'out[-1]'; fi ;;
      *) out+=("$part") ;;
    esac
  done
  local IFS=/
  printf '/%s\n' "${out[*]}"
}

# ---------------------------------------------------------------------------- processes

# wait_gone PID TENTHS: true once PID has exited within TENTHS tenths of a second (HURRY,
# a second signal, cuts the wait short).
wait_gone() {
  local pid="$1" ticks="$2"
  while kill -0 "$pid" 2>/dev/null; do
    if ((ticks <= 0 || HURRY)); then
      return 1
    fi
    ticks=$((ticks - 1))
    sleep "$WAIT_POLL_S"
  done
}

# run_step CMD...: run one step in the background and wait for it, so that a signal
# reaches our handler at once (bash runs traps only between foreground commands). The
# step, like the cluster manager, stops if run.sh (or its lane) is killed
# (PANOSETI_PARENT_PID: the lane, then run.sh).
# Its stdout goes to stderr: run.sh's stdout holds only the plan and the summary.
# While a cluster is in use, the lifecycle manager is watched too: if it dies (the Dask
# client of the step would wait ~30 s for a scheduler that is gone), the step is stopped
# at once and fails (status 1); run_jobs then reports the lost cluster (cluster_alive).
# Where its tasks ran goes to tasks_<job>_<step>.json, which `driver record` reads.
run_step() {
  local rc=0 lost=0 polls=0 lane="$BASHPID" # (in the step's own fork, BASHPID is the step)
  STEP_START="$(now)"
  STEP_RC=""
  rm -f -- "$RUN_TMP/step_error_$CURRENT_JOB"
  PANOSETI_ERROR_FILE="$RUN_TMP/step_error_$CURRENT_JOB" PANOSETI_PARENT_PID="$lane $$" \
    PANOSETI_TASK_FILE="$RUN_TMP/tasks_${CURRENT_JOB}_${CURRENT_STEP}.json" \
    PANOSETI_CPUS="$LANE_CPUS" "$@" >&2 </dev/null &
  STEP_PID=$!
  if [[ -n "$MANAGER_PID" ]]; then
    while kill -0 "$STEP_PID" 2>/dev/null; do
      if ! kill -0 "$MANAGER_PID" 2>/dev/null; then
        lost=1
        say "the cluster manager (pid $MANAGER_PID) is gone: stopping the running step (pid $STEP_PID)"
        stop_step
        break
      fi
      if ((polls < STEP_FAST_POLLS)); then
        polls=$((polls + 1))
        sleep "$WAIT_POLL_S"
      else
        sleep "$STEP_SLOW_POLL_S"
      fi
    done
  fi
  if ((!lost)); then
    wait "$STEP_PID" || rc=$?
  else
    rc=1
  fi
  STEP_PID=""
  STEP_RC="$rc"
  return "$rc"
}

stop_step() {
  [[ -n "$STEP_PID" ]] || return 0
  local pid="$STEP_PID"
  if kill -0 "$pid" 2>/dev/null; then
    say "stopping the running step (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_gone "$pid" "$STOP_GRACE_TENTHS"; then
      say "warning: step (pid $pid) still running; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  wait "$pid" 2>/dev/null || true
  STEP_PID=""
}

# launch_cluster: start the lifecycle manager; the cluster comes up while the first steps
# start (they wait for its scheduler file themselves: --dask-scheduler-file), and
# wait_for_cluster (in run_jobs) says when it is up, or why not.
launch_cluster() {
  SCHEDULER_FILE="$RUN_TMP/scheduler_address"
  CLUSTER_LOG="$RUN_TMP/cluster_manager.out"
  say "starting the cluster: $CLUSTER_DESC"
  PANOSETI_PARENT_PID="$$" "$PYTHON" "$REPO_ROOT/cluster_lifecycle_manager.py" "$CONFIG" \
    "$SCHEDULER_FILE" "${DEBUG_ARGS[@]}" >"$CLUSTER_LOG" </dev/null &
  MANAGER_PID=$!
  CLUSTER_DEADLINE=$((SECONDS + CLUSTER_WAIT_S))
}

# wait_for_cluster: until the manager has written the scheduler file (its lines then go to
# the log). Returns 1, saying why, if the manager exited first or the deadline passed.
wait_for_cluster() {
  local rc=0
  while [[ ! -s "$SCHEDULER_FILE" ]]; do
    if ! kill -0 "$MANAGER_PID" 2>/dev/null; then
      wait "$MANAGER_PID" || rc=$?
      MANAGER_PID=""
      say "error: the cluster manager exited (status $rc) before the cluster was up (its message is above); nothing was converted"
      return 1
    fi
    if ((SECONDS >= CLUSTER_DEADLINE)); then
      say "error: no scheduler address from the cluster manager within $CLUSTER_WAIT_S s ([cluster] startup_timeout_s + margin); stopping it"
      return 1
    fi
    sleep "$WAIT_POLL_S"
  done
  IFS= read -r CLUSTER_ADDRESS <"$SCHEDULER_FILE" || true
  # The record keeps the cluster as it came up: the manager is stopped while the run is
  # finished (run_pipeline), and its closing line would be there or not.
  cp -- "$CLUSTER_LOG" "$RUN_TMP/cluster_up.out"
  CLUSTER_LOG="$RUN_TMP/cluster_up.out"
  while IFS= read -r line; do
    say "cluster: $line"
  done <"$CLUSTER_LOG"
}

# signal_cluster: ask the lifecycle manager to stop (SIGTERM); stop_cluster waits for it.
signal_cluster() {
  [[ -n "$MANAGER_PID" ]] && ((!MANAGER_SIGNALLED)) || return 0
  MANAGER_SIGNALLED=1
  kill -0 "$MANAGER_PID" 2>/dev/null || return 0
  say "stopping the cluster (manager pid $MANAGER_PID)"
  kill -TERM "$MANAGER_PID" 2>/dev/null || true
}

# stop_cluster: signal_cluster, wait, then KILL the manager if it hangs, and the processes
# below it (e.g. local Dask workers: a manager still there has them all below it).
stop_cluster() {
  [[ -n "$MANAGER_PID" ]] || return 0
  local pid="$MANAGER_PID" below child
  signal_cluster
  if ! wait_gone "$pid" "$STOP_GRACE_TENTHS"; then
    say "warning: cluster manager (pid $pid) did not stop; killing it and its processes"
    below="$(py descendants "$pid" 2>/dev/null)" || below=""
    kill -KILL "$pid" 2>/dev/null || true
    for child in $below; do
      kill -KILL "$child" 2>/dev/null || true
    done
  fi
  wait "$pid" 2>/dev/null || true
  MANAGER_PID=""
  if [[ -n "$SCHEDULER_FILE" ]]; then
    rm -f -- "$SCHEDULER_FILE"
  fi
}

# cluster_alive: false, with the reason on stderr, when the lifecycle manager this run
# started has exited under us (e.g. killed): the cluster is gone, so is every later step.
cluster_alive() {
  [[ -n "$MANAGER_PID" ]] || return 0
  if kill -0 "$MANAGER_PID" 2>/dev/null; then
    return 0
  fi
  local rc=0
  wait "$MANAGER_PID" 2>/dev/null || rc=$?
  say "error: the cluster manager (pid $MANAGER_PID) exited with status $rc during the run: the Dask cluster is gone; stopping (rerun to finish the remaining inputs)"
  MANAGER_PID=""
  return 1
}

# release FINAL...: what killed steps left beside these products (partial stores of a
# process that is gone; never another live run's), and the transient L0 stores this run
# made among them (marked as its own before the jobs: driver prepare-l0; never a kept L0).
release() {
  py clear-stale --pid "$$" "$@" || say "warning: could not clear the partial stores of $*"
}

# remove_leftovers I: after input I failed: partial stores, and its transient L0.
remove_leftovers() {
  local i="$1"
  local -a finals=()
  if [[ "$OPT_STEPS" == *1* ]]; then
    finals+=("${JOB_L0[i]}")
  fi
  if [[ "$OPT_STEPS" == *2* ]]; then
    finals+=("${JOB_L1[i]}")
  fi
  release "${finals[@]}"
}

# start_log: from here on, stderr (this script's and every step's) also goes, with
# timestamps, to RUN_LOG beside the run record. The logger ignores SIGINT/SIGTERM, so
# that a Ctrl-C at the terminal leaves it to log how the run stopped.
start_log() {
  RUN_LOG="$OUT_DIR/run_log_$(date -u +%Y%m%dT%H%M%SZ)_$$.log"
  # The steps' stderr becomes the logger's pipe: tell them what ours is, so that they
  # draw progress bars on a terminal and print whole lines into a file (runners.py).
  if [[ -t 2 ]] && ((LANES == 1)); then # one bar per step: products side by side print lines
    export PANOSETI_PROGRESS=bar
  else
    export PANOSETI_PROGRESS=lines
  fi
  exec {TERMINAL_ERR}>&2
  exec 2> >(
    trap '' INT TERM
    exec "$PYTHON" -m panoseti_pipeline.driver.runlog "$RUN_LOG" >&"$TERMINAL_ERR"
  )
  LOGGER_PID=$!
  say "log: $RUN_LOG"
}

# shellcheck disable=SC2317  # invoked by the cleanup (the trap)
# stop_log: stderr back to the terminal; the logger ends when the last writer is gone
# (waited for, bounded: a straggler still holding the pipe does not hold this run; polled
# finely, as it is usually gone within milliseconds).
stop_log() {
  local polls=0
  [[ -n "$LOGGER_PID" ]] || return 0
  exec 2>&"$TERMINAL_ERR"
  while kill -0 "$LOGGER_PID" 2>/dev/null && ((polls++ < 500)); do
    sleep 0.01
  done
  LOGGER_PID=""
}

# cleanup: on every exit (the EXIT trap). Idempotent.
# shellcheck disable=SC2317  # invoked by the trap
cleanup() {
  if ((CLEANED_UP)); then
    return 0
  fi
  CLEANED_UP=1
  stop_lanes
  stop_cluster
  if ((${#LOCKED[@]})); then
    local -a stale=()
    if [[ "$OPT_STEPS" == 1,2 ]] && ((${#JOB_L0[@]})); then # the marks of jobs not run
      stale=(--clear-stale "${JOB_L0[@]}")
    fi
    py lock release "${LOCKED[@]}" --pid "$$" "${stale[@]}" ||
      say "warning: could not release the lock of ${LOCKED[*]}"
  fi
  if ((L0_DIR_CREATED || L0_DIR_SCRATCH)); then # only when empty
    rmdir -- "$L0_DIR" 2>/dev/null || true
  fi
  if ((OUT_DIR_CREATED)); then # only when empty (e.g. the cluster did not start)
    rmdir -- "$OUT_DIR" 2>/dev/null || true
  fi
  if [[ -n "$RUN_TMP" ]]; then
    rm -rf -- "${RUN_TMP:?}"
  fi
  stop_log
}

on_signal() {
  local sig="$1"
  trap 'HURRY=1; signal_lanes' INT TERM # a second signal: stop without the grace periods
  say "interrupted by SIG$sig: stopping what this run started"
  stop_lanes
  stop_cluster
  if [[ -n "$STATE_FILE" && -s "$STATE_FILE" ]]; then
    py summary "$STATE_FILE" --exit-code 130 --log "$RUN_LOG" --cluster-address "$CLUSTER_ADDRESS" \
      --cluster-log "$CLUSTER_LOG" || true
  fi
  exit 130
}

# lane_stop: a lane's SIGTERM (the run is stopping): its step stopped within the grace
# time, the job's outcome recorded (interrupted, or what the step returned just before),
# its partial stores and transient L0 removed; the lane exits 130.
# shellcheck disable=SC2317  # invoked by the lane's trap
lane_stop() {
  trap 'HURRY=1' TERM # a second one: no grace
  local was_running=0
  if [[ -n "$STEP_PID" ]]; then was_running=1; fi
  stop_step
  if [[ -n "$CURRENT_JOB" ]]; then
    if [[ -n "$CURRENT_STEP" ]] && ((!was_running)) && [[ -n "$STEP_RC" ]]; then
      record "$CURRENT_JOB" "$CURRENT_STEP" "$STEP_RC" # it ended just before the signal
    elif [[ -n "$CURRENT_STEP" ]]; then
      py record "$STATE_FILE" "$CURRENT_JOB" "$CURRENT_STEP" interrupted --exit-code 130 \
        --start "$STEP_START" --end "$(now)" || true
    else
      py mark "$STATE_FILE" "$CURRENT_JOB" interrupted || true
    fi
    remove_leftovers "$CURRENT_JOB"
  fi
  exit 130
}

# signal_lanes: SIGTERM to every lane in flight.
signal_lanes() {
  local i
  for i in "${RUNNING[@]}"; do
    kill -TERM "${LANE_PID[i]}" 2>/dev/null || true
  done
}

# stop_lanes: every lane stopped (lane_stop) and waited for; one that outlives its step's
# grace time by 10 s is killed.
stop_lanes() {
  local i ticks
  ((${#RUNNING[@]})) || return 0
  say "stopping ${#RUNNING[@]} input(s) in flight"
  signal_lanes
  for i in "${RUNNING[@]}"; do
    ticks=$((STOP_GRACE_TENTHS + 100))
    while kill -0 "${LANE_PID[i]}" 2>/dev/null; do
      if ((ticks-- <= 0)); then # still there: not a reused process id
        kill -KILL "${LANE_PID[i]}" 2>/dev/null || true
        break
      fi
      sleep "$WAIT_POLL_S"
    done
    wait "${LANE_PID[i]}" 2>/dev/null || true
  done
  RUNNING=()
}

# ---------------------------------------------------------------------------- the run

# read_plan TEXT: the plan of the driver into the JOB_* arrays. Its fields are separated
# by US ($'\x1f'), which read never merges (two TABs would be one: an empty field shifted
# the others).
read_plan() {
  local -a f
  local line
  while IFS= read -r line; do
    IFS=$'\x1f' read -r -a f <<<"$line"
    case "${f[0]:-}" in
      cluster)
        USE_DASK="${f[1]}"
        CLUSTER_WAIT_S="${f[2]}"
        CLUSTER_DESC="${f[3]}"
        ;;
      stop) STOP_GRACE_TENTHS="${f[1]}" ;;
      lanes) LANES="${f[1]}" LANE_CPUS="${f[2]}" ;;
      l0dir) L0_DIR="${f[1]}" L0_DIR_SCRATCH="${f[2]}" ;;
      umask) RUN_UMASK="${f[1]}" ;;
      job)
        JOB_ACTION+=("${f[2]}")
        JOB_NAME+=("${f[3]}")
        JOB_L0+=("${f[4]}")
        JOB_L1+=("${f[5]}")
        JOB_INPUTS+=("$(IFS=$'\x1f' && printf '%s' "${f[*]:6}")")
        ;;
      bundle)
        BUNDLE_RUN+=("${f[1]}")
        BUNDLE_DIR+=("${f[2]}")
        ;;
      *) ;;
    esac
  done <<<"$1"
}

# record I STEP RC: the step's outcome into the state file (sizes read by the driver).
record() {
  local status=ok
  local -a reason=()
  if (($3 != 0)); then status=failed; fi
  if [[ -s "$RUN_TMP/step_error_$1" ]]; then reason=(--reason-file "$RUN_TMP/step_error_$1"); fi
  py record "$STATE_FILE" "$1" "$2" "$status" --exit-code "$3" --start "$STEP_START" \
    --end "$(now)" "${reason[@]}" "${@:4}" ||
    say "warning: could not record step $2 of input $(($1 + 1))"
}

# run_job I: step 1, step 2, drop the L0. Returns the failing step's status.
run_job() {
  local i="$1" rc=0 tag name="${JOB_NAME[$1]}" l0="${JOB_L0[$1]}" l1="${JOB_L1[$1]}"
  local -a files=() address=() extra=()
  tag="[$((i + 1))/${#JOB_NAME[@]}] $name"
  IFS=$'\x1f' read -r -a files <<<"${JOB_INPUTS[i]}"
  CURRENT_JOB="$i"

  if [[ "$OPT_STEPS" == *1* ]]; then
    if [[ -n "$SCHEDULER_FILE" ]]; then address=(--dask-scheduler-file "$SCHEDULER_FILE"); fi
    say "$tag: step 1, PFF -> L0: ${#files[@]} file(s) -> $l0"
    CURRENT_STEP=1
    run_step "$PYTHON" "$REPO_ROOT/step1_pff_to_zarr.py" "${files[@]}" "$l0" "$CONFIG" \
      "${address[@]}" "${STEP_FLAGS[@]}" || rc=$?
    record "$i" 1 "$rc"
    CURRENT_STEP=""
    STEP_RC=""
    if ((rc != 0)); then
      say "error: $tag: step 1 (PFF -> L0) failed with exit status $rc; input: ${files[*]}"
      remove_leftovers "$i"
      CURRENT_JOB=""
      return "$rc"
    fi
  fi

  if [[ "$OPT_STEPS" == *2* ]]; then
    address=()
    if [[ -n "$SCHEDULER_FILE" ]]; then address=(--dask-scheduler-file "$SCHEDULER_FILE"); fi
    say "$tag: step 2, L0 -> L1: $l1"
    CURRENT_STEP=2
    run_step "$PYTHON" "$REPO_ROOT/step2_dask_baseline.py" "$l0" "$l1" --config "$CONFIG" \
      "${address[@]}" "${STEP_FLAGS[@]}" || rc=$?
    if ((rc == 0)) && [[ "$OPT_STEPS" == 1,2 ]]; then # a transient L0 goes, a kept one stays
      extra=(--release "$l0" --pid "$$")
    fi
    record "$i" 2 "$rc" "${extra[@]}"
    CURRENT_STEP=""
    STEP_RC=""
    if ((rc != 0)); then
      say "error: $tag: step 2 (L0 -> L1) failed with exit status $rc; input: $l0"
      remove_leftovers "$i"
      CURRENT_JOB=""
      return "$rc"
    fi
  fi
  CURRENT_JOB=""
  say "$tag: done"
}

# start_lane I: job I in a lane of its own (a background subshell: its steps, records and
# leftovers are its own; SIGTERM stops it, see lane_stop). Its exit status also goes to a
# file: the main shell may have collected it already (wait -n), and bash < 5.1 cannot say
# which child that was.
start_lane() {
  local i="$1"
  rm -f -- "$RUN_TMP/lane_rc_$i"
  (
    trap 'printf %s "$?" >"$RUN_TMP/lane_rc_$i"' EXIT
    trap lane_stop TERM
    run_job "$i"
  ) &
  LANE_PID[i]=$!
  RUNNING+=("$i")
}

# reap_lanes: wait until a lane ends, then account for every lane that has: a failed one
# counts, and returns 1 when no further input may start (the first failure without
# --keep-going, or the cluster is gone).
reap_lanes() {
  local i rc go=0 interrupted=0
  local -a still=()
  wait -n 2>/dev/null || true # a child ended (a lane, or the cluster manager)
  for i in "${RUNNING[@]}"; do
    if kill -0 "${LANE_PID[i]}" 2>/dev/null; then
      still+=("$i")
      continue
    fi
    rc=0
    wait "${LANE_PID[i]}" 2>/dev/null || rc=$?
    if [[ -s "$RUN_TMP/lane_rc_$i" ]]; then rc="$(<"$RUN_TMP/lane_rc_$i")"; fi
    ((rc != 0)) || continue
    FAILED=$((FAILED + 1))
    if ((rc == 130)); then interrupted=1; fi # the step itself was interrupted
    go=1
  done
  RUNNING=("${still[@]}")
  if ((interrupted)); then
    on_signal INT
  fi
  ((go)) || return 0
  if ! cluster_alive; then
    return 1
  fi
  if ((!OPT_KEEP_GOING)); then
    say "stopping after the first failed input: no other starts (--keep-going continues with the others)"
    return 1
  fi
}

# run_jobs: every job to run, LANES of them in flight at once, in input order.
run_jobs() {
  local i n="${#JOB_NAME[@]}" go=1
  for ((i = 0; i < n && go; i++)); do
    if [[ "${JOB_ACTION[i]}" == skip ]]; then
      say "[$((i + 1))/$n] ${JOB_NAME[i]}: complete product already there, skipped (--overwrite redoes it)"
      continue
    fi
    while ((go && ${#RUNNING[@]} >= LANES)); do
      await_cluster
      reap_lanes || go=0
    done
    if ((go)); then start_lane "$i"; fi
  done
  await_cluster
  while ((${#RUNNING[@]})); do
    reap_lanes || true
  done
}

# await_cluster: once the first lanes have started (their steps start while the cluster
# does), wait for the cluster; if it does not come up, stop them and exit 1.
await_cluster() {
  [[ -n "$SCHEDULER_FILE" && -z "$CLUSTER_ADDRESS" ]] || return 0
  wait_for_cluster && return 0
  stop_lanes
  exit 1
}

any_job_to_run() {
  local action
  for action in "${JOB_ACTION[@]}"; do
    [[ "$action" == run ]] && return 0
  done
  return 1
}

# set_plan_args: PLAN_ARGS, the options of `py plan` for this run (OUT_DIR set).
set_plan_args() {
  PLAN_ARGS=(--config "$CONFIG" --output "$OUT_DIR" --steps "$OPT_STEPS")
  if [[ -n "$OPT_L0_DIR" ]]; then PLAN_ARGS+=(--l0-dir "$OPT_L0_DIR"); fi
  if ((OPT_KEEP_L0)); then PLAN_ARGS+=(--keep-l0); fi
  if ((OPT_OVERWRITE)); then PLAN_ARGS+=(--overwrite); fi
  if ((OPT_KEEP_GOING)); then PLAN_ARGS+=(--keep-going); fi
}

# submit_sbatch INPUT... OUTPUT_DIR: --sbatch. Checks the run here (the plan, printed),
# then submits this script with the same options, absolute paths and CONFIG_FILE as one
# SLURM job (sbatch OPT_SBATCH); the steps run on the job's node. With --dry-run only
# the plan is printed. Exits 2 on a problem in the plan or when sbatch refuses the job.
submit_sbatch() {
  local -a inputs=() opts=() job_args=(--steps "$OPT_STEPS")
  local arg job
  for arg in "${@:1:$#-1}"; do inputs+=("$(absolute "$arg")"); done
  OUT_DIR="$(absolute "${!#}")"
  set_plan_args
  py plan "${PLAN_ARGS[@]}" --dry-run -- "${inputs[@]}" || exit $?
  ((!OPT_DRY_RUN)) || return 0
  if [[ -n "$OPT_L0_DIR" ]]; then job_args+=(--l0-dir "$(absolute "$OPT_L0_DIR")"); fi
  for arg in KEEP_L0:--keep-l0 OVERWRITE:--overwrite KEEP_GOING:--keep-going DEBUG:--debug \
    NO_QUICKLOOK:--no-quicklook; do
    local flag="OPT_${arg%%:*}"
    if ((${!flag})); then job_args+=("${arg#*:}"); fi
  done
  read -r -a opts <<<"$OPT_SBATCH"
  # The job script on sbatch's stdin, with a bash shebang: printf %q quotes for bash ($'...'
  # for non-ASCII bytes), which the /bin/sh of sbatch --wrap would take literally.
  job="$(printf '#!/usr/bin/env bash\n%s\n' "$(printf '%q ' exec env CONFIG_FILE="$CONFIG" \
    "$REPO_ROOT/run.sh" "${job_args[@]}" -- "${inputs[@]}" "$OUT_DIR")" |
    sbatch --parsable --job-name=panoseti-l1 "${opts[@]}")" ||
    usage_error "sbatch did not accept the job (its message is above); OPTS: ${opts[*]}"
  job="${job%%;*}"
  say "submitted SLURM job $job (sbatch ${opts[*]}): run.sh on its node; follow it with squeue -j $job"
}

# run_pipeline INPUT... OUTPUT_DIR: the whole run; sets PIPELINE_RC (0 or 1), exits on
# problems found before any work (2) and on signals (130).
run_pipeline() {
  local -a inputs=("${@:1:$#-1}") locked=()
  local plan_out rc=0
  OUT_DIR="$(absolute "${!#}")"
  set_plan_args

  if ((OPT_DRY_RUN)); then
    py plan "${PLAN_ARGS[@]}" --dry-run -- "${inputs[@]}" || exit $?
    PIPELINE_RC=0
    return 0
  fi

  trap cleanup EXIT
  trap 'on_signal INT' INT
  trap 'on_signal TERM' TERM
  RUN_TMP="$(mktemp -d "${TMPDIR:-/tmp}/panoseti_run.XXXXXX")"
  STATE_FILE="$RUN_TMP/state.json"
  plan_out="$(py plan "${PLAN_ARGS[@]}" --state "$STATE_FILE" \
    --command-line "$(printf '%q ' "$0" "${ORIGINAL_ARGS[@]}")" -- "${inputs[@]}")" || rc=$?
  if ((rc != 0)); then
    exit "$rc"
  fi
  read_plan "$plan_out"
  umask "$RUN_UMASK"

  if [[ ! -d "$OUT_DIR" ]]; then
    mkdir -p -- "$OUT_DIR"
    OUT_DIR_CREATED=1
  fi
  locked=("$OUT_DIR")
  if [[ "$OPT_STEPS" != 2 ]]; then # the L0 directory too: another output's run may share it
    if [[ ! -d "$L0_DIR" ]]; then
      mkdir -p -- "$L0_DIR"
      L0_DIR_CREATED=1
    fi
    locked+=("$L0_DIR")
  fi
  py lock acquire "${locked[@]}" --pid "$$" || exit $? # another run writes there: exit 2
  LOCKED=("${locked[@]}")
  start_log
  if [[ "$OPT_STEPS" == 1,2 ]]; then # each L0 marked transient (or kept); leftovers cleared
    py prepare-l0 "$STATE_FILE" --pid "$$" || exit 1
  fi
  say "${#JOB_NAME[@]} input(s) -> $OUT_DIR (config $CONFIG)"

  if ((USE_DASK)) && any_job_to_run; then
    launch_cluster
  elif ((!USE_DASK)); then
    say "no Dask cluster (use_dask = false): the steps run locally"
  fi

  run_jobs
  signal_cluster # it closes while the run is finished (stop_cluster below waits for it)
  # One process for all that follows the jobs: each run's bundle beside its products (one
  # not written fails the run), the team layout's level manifests, the summary and run
  # record, the catalog, and (unless --no-quicklook) the quicklook PNGs and index.html.
  local -a finish_args=()
  local k
  for ((k = 0; k < ${#BUNDLE_RUN[@]}; k++)); do
    finish_args+=(--bundle "${BUNDLE_RUN[k]}" "${BUNDLE_DIR[k]}")
  done
  if ((OPT_NO_QUICKLOOK)); then finish_args+=(--no-quicklook); fi
  PIPELINE_RC=0
  py finish "$STATE_FILE" --failed "$FAILED" --log "$RUN_LOG" \
    --cluster-address "$CLUSTER_ADDRESS" --cluster-log "$CLUSTER_LOG" \
    "${finish_args[@]}" || PIPELINE_RC=1
  stop_cluster
  if ((FAILED > 0)); then
    say "error: $FAILED input(s) failed (listed above)"
  fi
}

run_demo() {
  local dir observation first
  dir="$(absolute "${ARGS[0]:-$DEMO_DEFAULT_DIR}")"
  if ((OPT_DRY_RUN)); then # the config is checked; nothing is written
    py demo-config "$CONFIG" - >/dev/null || exit 2
    say "demo (dry run, nothing written): would write a small synthetic observation into" \
      "$dir/input and the config $dir/demo_config.toml ($CONFIG on the loopback" \
      "interface), then run the pipeline into $dir/L1"
    return 0
  fi
  say "demo: writing a small synthetic observation into $dir/input"
  observation="$(py demo-observation "$dir/input")"
  py demo-config "$CONFIG" "$dir/demo_config.toml" >/dev/null
  say "demo: config $dir/demo_config.toml ($CONFIG with the Dask cluster on the loopback interface)"
  CONFIG="$dir/demo_config.toml"
  run_pipeline "$observation" "$dir/L1"
  first=""
  for first in "$dir"/L1/*/*_L1.zarr; do break; done
  cat <<EOF

Demo finished (exit status $PIPELINE_RC). Look at:
  input observation  $observation
  L1 stores          $dir/L1/<run>/*_L1.zarr (one directory per observation run)
  run bundle         $dir/L1/<run>/<run>.pffd.panoseti-meta (configs, logs, hk.pff, manifest)
  run record         $dir/L1/run_record_*.toml
  quicklooks         $dir/L1/<run>/index.html (open it in a browser; one PNG per store)
  config used        $CONFIG
Open an L1 store with xarray:
  $PYTHON -c 'import xarray as xr; print(xr.open_zarr("$first"))'
or the run with PANOSETI's reader, pypff (not a requirement: first
$PYTHON -m pip install pypff):
  $PYTHON -c 'from pypff.zarr import open_zarr_run; print(open_zarr_run("${first%/*}").list_products())'
EOF
}

main() {
  ORIGINAL_ARGS=("$@")
  if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
    say "error: bash >= 4.4 is needed (this is $BASH_VERSION)"
    exit 2
  fi
  parse_args "$@"
  CONFIG="$(absolute "${CONFIG_FILE:-$REPO_ROOT/config.toml}")"
  bootstrap_python_env "$REPO_ROOT" "$REPO_ROOT/requirements.txt" || exit 2
  if ((OPT_VERSION)); then
    exec "$PYTHON" -c 'import sys; from panoseti_pipeline.version import version_line
print(version_line(sys.argv[1]))' "run.sh"
  fi
  PIPELINE_RC=0
  if ((OPT_DEMO)); then
    run_demo
  elif ((OPT_SBATCH_SET)); then
    submit_sbatch "${ARGS[@]}"
  else
    run_pipeline "${ARGS[@]}"
  fi
  exit "$PIPELINE_RC"
}

main "$@"
