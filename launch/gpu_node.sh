#!/usr/bin/env bash
# Train egspo on one node with several GPUs, relaunching after a failure.
#
# Usage: launch/gpu_node.sh [--dry-run] [-h|--help] SUBCOMMAND
#
# Subcommands
#   setup   create the virtual environment VENV and install egspo with jax[cuda12]
#   train   run `python -m egspo.main` and relaunch it when it exits non-zero, at most
#           MAX_RESTARTS times; each relaunch resumes from the latest checkpoint in WORKDIR
#   all     setup + train
#
# Options
#   --dry-run   print every command, one per line, instead of running it (same as DRY_RUN=1)
#   -h, --help  this text
#
# Processes
#   NUM_PROCESSES=1 (default): one process drives all the GPUs it sees (CUDA_VISIBLE_DEVICES,
#     or GPU_IDS when set).
#   NUM_PROCESSES=N>1: one process per GPU, process i sees only GPU_IDS[i] and gets
#     --coordinator_address=COORDINATOR_ADDRESS --num_processes=N --process_id=i, which
#     egspo.main hands to jax.distributed.initialize(). If one process fails, the others are
#     stopped and all N are relaunched together.
#   Each process appends its output to LOG_DIR/process_<i>.log.
#
# Environment variables (default in brackets)
#   CONFIG              config file[:variant], relative to the repo      [configs/countdown.py]
#   WORKDIR             run directory: checkpoints, metrics; local or gs:// (required for train)
#   EXTRA_ARGS          extra flags for egspo.main, split on whitespace, e.g.
#                       '--config.train.num_iterations=500 --config.seed=1'  []
#   NUM_PROCESSES       processes to start (see above)                    [1]
#   GPU_IDS             comma-separated GPU indices; with NUM_PROCESSES>1 one per process
#                       [0,1,...,NUM_PROCESSES-1; with 1 process: unset = all visible GPUs]
#   COORDINATOR_PORT    port of process 0's coordinator                   [12355]
#   COORDINATOR_ADDRESS host:port of the coordinator            [localhost:COORDINATOR_PORT]
#   MAX_RESTARTS        relaunches after a non-zero exit before giving up  [10]
#   RETRY_DELAY         seconds to wait before a relaunch                 [30]
#   STOP_TIMEOUT        seconds the other processes get to exit after SIGTERM before SIGKILL [30]
#   LOG_DIR             per-process logs                                 [<repo>/runs/logs]
#   VENV                virtual environment created by setup             [<repo>/.venv]
#   PYTHON              interpreter that runs egspo.main                 [VENV/bin/python]
#   PYTHON_BIN          interpreter that creates VENV (>= 3.11)          [python3]
#   JAX_VERSION         jax[cuda12] version; default: the jax pin in requirements/constraints.txt
#   DRY_RUN             1: same as --dry-run                             [0]
#
# Example
#   WORKDIR=runs/countdown NUM_PROCESSES=8 launch/gpu_node.sh all
set -euo pipefail

LAUNCH_NAME="gpu_node"
LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${LAUNCH_DIR}/.." && pwd)"
# shellcheck source=launch/common.sh
source "${LAUNCH_DIR}/common.sh"

usage() {
  # The header comment above is the help text.
  sed -n '2,/^set -euo pipefail/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

# ---- configuration -------------------------------------------------------------------------
CONFIG="${CONFIG:-configs/countdown.py}"
WORKDIR="${WORKDIR:-}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
NUM_PROCESSES="${NUM_PROCESSES:-1}"
GPU_IDS="${GPU_IDS:-}"
COORDINATOR_PORT="${COORDINATOR_PORT:-12355}"
COORDINATOR_ADDRESS="${COORDINATOR_ADDRESS:-localhost:${COORDINATOR_PORT}}"
MAX_RESTARTS="${MAX_RESTARTS:-10}"
RETRY_DELAY="${RETRY_DELAY:-30}"
STOP_TIMEOUT="${STOP_TIMEOUT:-30}"
LOG_DIR="${LOG_DIR:-${REPO_ROOT}/runs/logs}"
VENV="${VENV:-${REPO_ROOT}/.venv}"
PYTHON="${PYTHON:-${VENV}/bin/python}"
PYTHON_BIN="${PYTHON_BIN:-python3}"
JAX_VERSION="${JAX_VERSION:-}"
DRY_RUN="${DRY_RUN:-0}"

# ---- arguments -------------------------------------------------------------------------------
parse_args "$@"

require_uint MAX_RESTARTS "${MAX_RESTARTS}"
require_uint RETRY_DELAY "${RETRY_DELAY}"
require_uint STOP_TIMEOUT "${STOP_TIMEOUT}"
require_uint NUM_PROCESSES "${NUM_PROCESSES}"
((NUM_PROCESSES >= 1)) || die "NUM_PROCESSES must be at least 1"
[[ "${DRY_RUN}" == 0 || "${DRY_RUN}" == 1 ]] || die "DRY_RUN must be 0 or 1, got '${DRY_RUN}'"
[[ -n "${JAX_VERSION}" ]] || JAX_VERSION="$(pinned_jax_version "${REPO_ROOT}/requirements/constraints.txt")"

# GPU of each process (multi-process mode), or the visible set of the single process.
GPU_LIST=()
if [[ -n "${GPU_IDS}" ]]; then
  [[ "${GPU_IDS}" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "GPU_IDS must look like 0,1,2,3, got '${GPU_IDS}'"
  IFS=, read -r -a GPU_LIST <<<"${GPU_IDS}"
elif ((NUM_PROCESSES > 1)); then
  for ((i = 0; i < NUM_PROCESSES; i++)); do GPU_LIST+=("${i}"); done
fi
if ((NUM_PROCESSES > 1 && ${#GPU_LIST[@]} != NUM_PROCESSES)); then
  die "GPU_IDS lists ${#GPU_LIST[@]} GPUs but NUM_PROCESSES=${NUM_PROCESSES}: give one GPU per process"
fi

# ---- setup -----------------------------------------------------------------------------------

setup_env() {
  # jax is pinned to the tested version (constraints.txt) with the CUDA 12 plugin on top.
  run "${PYTHON_BIN}" -m venv "${VENV}"
  run "${VENV}/bin/python" -m pip install --upgrade pip
  run "${VENV}/bin/python" -m pip install -c "${REPO_ROOT}/requirements/constraints.txt" \
    -e "${REPO_ROOT}[gpu]" "jax[cuda12]==${JAX_VERSION}"
  run "${VENV}/bin/python" -c "import jax; print(jax.__version__, jax.devices())"
}

# ---- training --------------------------------------------------------------------------------

check_train_inputs() {
  [[ -n "${WORKDIR}" ]] || die "WORKDIR is required (a local directory or gs://bucket/path)"
  if ! is_dry_run && ! command -v "${PYTHON}" >/dev/null 2>&1; then
    die "PYTHON=${PYTHON} is not an executable: run '$0 setup' first, or set PYTHON"
  fi
}

PIDS=()

# SIGTERM the processes still running, SIGKILL them after STOP_TIMEOUT seconds, reap them all.
stop_processes() {
  local pid waited=0 alive
  for pid in "${PIDS[@]}"; do
    kill -TERM "${pid}" 2>/dev/null || true
  done
  while ((waited < STOP_TIMEOUT)); do
    alive=0
    for pid in "${PIDS[@]}"; do
      if kill -0 "${pid}" 2>/dev/null; then alive=1; fi
    done
    ((alive)) || break
    sleep 1
    waited=$((waited + 1))
  done
  for pid in "${PIDS[@]}"; do
    kill -KILL "${pid}" 2>/dev/null || true
    wait "${pid}" 2>/dev/null || true
  done
  PIDS=()
}

# Never leave training processes behind when this script stops.
on_exit() {
  if ((${#PIDS[@]} > 0)); then
    log "stopping the training processes"
    stop_processes
  fi
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The argv of process i.
process_command() {
  local i="$1" cmd=()
  if ((NUM_PROCESSES > 1)); then
    cmd=(env "CUDA_VISIBLE_DEVICES=${GPU_LIST[i]}")
  elif ((${#GPU_LIST[@]} > 0)); then
    cmd=(env "CUDA_VISIBLE_DEVICES=${GPU_IDS}")
  fi
  split_extra_args "${EXTRA_ARGS}"
  cmd+=("${PYTHON}" -m egspo.main "--config=${CONFIG}" "--workdir=${WORKDIR}" "${EXTRA_ARGV[@]}")
  if ((NUM_PROCESSES > 1)); then
    cmd+=("--coordinator_address=${COORDINATOR_ADDRESS}" "--num_processes=${NUM_PROCESSES}"
      "--process_id=${i}")
  fi
  PROCESS_ARGV=("${cmd[@]}")
}

# Start all processes and wait for them; 0 when all exit 0, 1 as soon as one fails (the others
# are then stopped, since a multi-process JAX run cannot go on without one of its processes).
train_once() {
  local attempt="$1" i pid status next failed
  PIDS=()
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    local logfile="${LOG_DIR}/process_${i}.log"
    is_dry_run || printf '=== attempt %s, %s\n' "${attempt}" "$(date -u '+%Y-%m-%d %H:%M:%S UTC')" >>"${logfile}"
    process_command "${i}"
    run_bg "${logfile}" "${PROCESS_ARGV[@]}"
    PIDS+=("${LAST_PID}")
    is_dry_run || log "process ${i} (pid ${LAST_PID}) logs to ${logfile}"
  done
  if is_dry_run; then
    PIDS=()
    return 0
  fi
  # PIDS holds the processes not yet waited for (only those may be signalled: a reaped pid
  # can be reused by an unrelated process).
  while ((${#PIDS[@]} > 0)); do
    next=()
    failed=""
    for pid in "${PIDS[@]}"; do
      if [[ -n "${failed}" ]] || kill -0 "${pid}" 2>/dev/null; then
        next+=("${pid}")
        continue
      fi
      status=0
      wait "${pid}" || status=$?
      ((status == 0)) || failed="process with pid ${pid} exited with status ${status}"
    done
    PIDS=("${next[@]}")
    if [[ -n "${failed}" ]]; then
      log "${failed}; stopping the others"
      stop_processes
      return 1
    fi
    ((${#PIDS[@]} == 0)) || sleep 1
  done
}

train_loop() {
  local restarts=0
  run cd "${REPO_ROOT}"
  run mkdir -p "${LOG_DIR}"
  while true; do
    log "launching ${NUM_PROCESSES} process(es) (restart ${restarts}/${MAX_RESTARTS})"
    if train_once "${restarts}"; then
      if is_dry_run; then
        log "dry run: a real run waits for the processes and relaunches them after a failure, at most ${MAX_RESTARTS} times"
      else
        log "training finished"
      fi
      return 0
    fi
    if ((restarts >= MAX_RESTARTS)); then
      die "giving up after ${MAX_RESTARTS} restarts (MAX_RESTARTS); logs in ${LOG_DIR}"
    fi
    restarts=$((restarts + 1))
    log "relaunching in ${RETRY_DELAY}s; the run resumes from the latest checkpoint in ${WORKDIR}"
    pause "${RETRY_DELAY}"
  done
}

# ---- main ------------------------------------------------------------------------------------
is_dry_run && log "dry run: printing the commands instead of running them"
case "${SUBCOMMAND}" in
  setup) setup_env ;;
  train)
    check_train_inputs
    train_loop
    ;;
  all)
    [[ -n "${WORKDIR}" ]] || die "WORKDIR is required (a local directory or gs://bucket/path)"
    setup_env
    check_train_inputs
    train_loop
    ;;
  *) die "unknown subcommand '${SUBCOMMAND}' (setup|train|all; see --help)" ;;
esac
