#!/usr/bin/env bash
# Train egspo on a Cloud TPU VM / pod slice, with preemption-aware restarts.
#
# Usage: launch/tpu_pod.sh [--dry-run] [-h|--help] SUBCOMMAND
#
# Subcommands
#   create   create the TPU VM (or the queued resource, QUEUED=1) unless a READY one exists;
#            one that is being created or repaired is waited for, a broken one replaced
#   setup    copy the code to every worker (git archive of REPO_REF + scp, or git clone of
#            REPO_URL at REPO_REF) and install it with jax[tpu] into a venv on every worker
#   train    run `python -m egspo.main` once on every worker (--worker=all)
#   watch    the restart loop: train; when it fails, look at the TPU: if it is gone or no longer
#            READY (PREEMPTED, TERMINATED, a SUSPENDED queued resource, ...) delete it, create it
#            again, set it up, and train again; if it is READY, just train again. At most
#            MAX_RESTARTS restarts. The run resumes from the latest checkpoint in WORKDIR.
#   all      create + setup + watch
#   status   print the TPU (and queued resource) state
#   stop     stop the training process this script started on every worker
#   delete   delete the TPU VM (or the queued resource and its node)
#
# Options
#   --dry-run   print every command, one per line, instead of running it (same as DRY_RUN=1);
#               state queries are printed too and answered "does not exist"
#   -h, --help  this text
#
# Environment variables (default in brackets)
#   PROJECT          GCP project; empty uses gcloud's configured project          []
#   ZONE             zone of the TPU                                             [us-east5-a]
#   TPU_NAME         name of the TPU VM (node id)                                [egspo-tpu]
#   ACCELERATOR_TYPE TPU type and size, e.g. v5p-8, v5p-16, v4-32, v5litepod-16  [v5p-16]
#   RUNTIME_VERSION  TPU software version; the default follows ACCELERATOR_TYPE:
#                    v5p: v2-alpha-tpuv5, v5e: v2-alpha-tpuv5-lite, v6e: v2-alpha-tpuv6e,
#                    v4 and older: tpu-ubuntu2204-base
#   SPOT             1: Spot VMs (cheaper, preemptible at any time)              [0]
#   QUEUED           1: ask through a queued resource and wait until it is ACTIVE  [0]
#   QUEUED_RESOURCE_ID  name of the queued resource                          [${TPU_NAME}-qr]
#   CONFIG           config file[:variant], relative to the repo                 [configs/countdown.py]
#   WORKDIR          run directory; must be on GCS (gs://bucket/path) so every worker sees the
#                    same checkpoints (required for train/watch/all)
#   ALLOW_LOCAL_WORKDIR  1: accept a non-gs:// WORKDIR (single-host slices only)   [0]
#   EXTRA_ARGS       extra flags for egspo.main, split on whitespace, e.g.
#                    '--config.train.num_iterations=500 --config.seed=1'            []
#   REMOTE_ENV       VAR=value pairs set for the training processes, split on whitespace,
#                    e.g. 'LIBTPU_INIT_ARGS=--xla_tpu_enable_async_all_gather=true'  []
#   REPO_URL         if set, workers `git clone` this URL instead of receiving a tarball  []
#   REPO_REF         commit/branch/tag to archive (or to check out after cloning)  [HEAD]
#   REMOTE_DIR       code directory on each worker, relative to the home directory  [egspo]
#   REMOTE_VENV      virtual environment on each worker, relative to home         [egspo-venv]
#   PYTHON_VERSION   Python for that venv (uv fetches it; the TPU images ship 3.10)  [3.12]
#   JAX_VERSION      jax[tpu] version; default: the jax pin in requirements/constraints.txt
#   TARBALL          local path of the code tarball              [${TMPDIR:-/tmp}/${TPU_NAME}-code.tar.gz]
#   MAX_RESTARTS     restarts the watch loop allows before giving up              [20]
#   RETRY_DELAY      seconds to wait before a restart                            [60]
#   POLL_INTERVAL    seconds between queued-resource state checks                [60]
#   DRY_RUN          1: same as --dry-run                                        [0]
#
# Multi-host: on a pod slice every worker runs the same command; egspo.main calls
# jax.distributed.initialize() and the TPU runtime supplies the coordinator, so no
# --coordinator_address is needed here (see launch/gpu_node.sh for the explicit form).
#
# Example
#   PROJECT=my-proj WORKDIR=gs://my-bucket/egspo/countdown SPOT=1 launch/tpu_pod.sh all
set -euo pipefail

LAUNCH_NAME="tpu_pod"
LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${LAUNCH_DIR}/.." && pwd)"
# shellcheck source=launch/common.sh
source "${LAUNCH_DIR}/common.sh"

usage() {
  # The header comment above is the help text.
  sed -n '2,/^set -euo pipefail/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

default_runtime_version() {
  case "$1" in
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    *) echo "tpu-ubuntu2204-base" ;;
  esac
}

# ---- configuration -------------------------------------------------------------------------
PROJECT="${PROJECT:-}"
ZONE="${ZONE:-us-east5-a}"
TPU_NAME="${TPU_NAME:-egspo-tpu}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5p-16}"
RUNTIME_VERSION="${RUNTIME_VERSION:-$(default_runtime_version "${ACCELERATOR_TYPE}")}"
SPOT="${SPOT:-0}"
QUEUED="${QUEUED:-0}"
QUEUED_RESOURCE_ID="${QUEUED_RESOURCE_ID:-${TPU_NAME}-qr}"
CONFIG="${CONFIG:-configs/countdown.py}"
WORKDIR="${WORKDIR:-}"
ALLOW_LOCAL_WORKDIR="${ALLOW_LOCAL_WORKDIR:-0}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
REMOTE_ENV="${REMOTE_ENV:-}"
REPO_URL="${REPO_URL:-}"
REPO_REF="${REPO_REF:-HEAD}"
REMOTE_DIR="${REMOTE_DIR:-egspo}"
REMOTE_VENV="${REMOTE_VENV:-egspo-venv}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
JAX_VERSION="${JAX_VERSION:-}"
TARBALL="${TARBALL:-${TMPDIR:-/tmp}/${TPU_NAME}-code.tar.gz}"
MAX_RESTARTS="${MAX_RESTARTS:-20}"
RETRY_DELAY="${RETRY_DELAY:-60}"
POLL_INTERVAL="${POLL_INTERVAL:-60}"
DRY_RUN="${DRY_RUN:-0}"

# ---- arguments -------------------------------------------------------------------------------
parse_args "$@"

require_uint MAX_RESTARTS "${MAX_RESTARTS}"
require_uint RETRY_DELAY "${RETRY_DELAY}"
require_uint POLL_INTERVAL "${POLL_INTERVAL}"
for flag_name in SPOT QUEUED ALLOW_LOCAL_WORKDIR DRY_RUN; do
  [[ "${!flag_name}" == 0 || "${!flag_name}" == 1 ]] || die "${flag_name} must be 0 or 1, got '${!flag_name}'"
done
# These are pasted into the remote shell scripts below; keep them plain relative paths.
for path_name in REMOTE_DIR REMOTE_VENV; do
  [[ "${!path_name}" =~ ^[A-Za-z0-9_.-][A-Za-z0-9_./-]*$ ]] ||
    die "${path_name} must be a plain path relative to the home directory, got '${!path_name}'"
done
[[ -n "${JAX_VERSION}" ]] || JAX_VERSION="$(pinned_jax_version "${REPO_ROOT}/requirements/constraints.txt")"

GCLOUD_SCOPE=("--zone=${ZONE}")
[[ -z "${PROJECT}" ]] || GCLOUD_SCOPE+=("--project=${PROJECT}")

# ---- TPU resources ---------------------------------------------------------------------------

# State of the TPU node (READY, CREATING, PREEMPTED, TERMINATED, ...); empty if it does not exist.
tpu_state() {
  query gcloud compute tpus tpu-vm describe "${TPU_NAME}" "${GCLOUD_SCOPE[@]}" '--format=value(state)'
}

# State of the queued resource (WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE, SUSPENDED, FAILED,
# ...); empty if it does not exist.
queued_state() {
  query gcloud compute tpus queued-resources describe "${QUEUED_RESOURCE_ID}" "${GCLOUD_SCOPE[@]}" \
    '--format=value(state.state)'
}

# Functions below may run as `if f` / `f || ...`, where bash ignores `set -e` inside them, so
# each failure is passed on explicitly with `|| return 1`.

create_tpu() {
  local spot=()
  [[ "${SPOT}" == 0 ]] || spot=(--spot)
  if [[ "${QUEUED}" == 1 ]]; then
    local state
    state="$(queued_state)"
    case "${state}" in
      ACTIVE)
        log "queued resource ${QUEUED_RESOURCE_ID} is already ACTIVE"
        return 0
        ;;
      "") ;;
      FAILED | SUSPENDED | SUSPENDING)
        log "queued resource ${QUEUED_RESOURCE_ID} is ${state}: deleting it first"
        delete_tpu || return 1
        ;;
      *) log "queued resource ${QUEUED_RESOURCE_ID} is ${state}: waiting for it" ;;
    esac
    if [[ -z "${state}" || "${state}" == FAILED || "${state}" == SUSPEND* ]]; then
      run gcloud compute tpus queued-resources create "${QUEUED_RESOURCE_ID}" "${GCLOUD_SCOPE[@]}" \
        "--node-id=${TPU_NAME}" "--accelerator-type=${ACCELERATOR_TYPE}" \
        "--runtime-version=${RUNTIME_VERSION}" "${spot[@]}" || return 1
    fi
    wait_for_queued_resource || return 1
  else
    local state
    state="$(tpu_state)"
    # A TPU on its way somewhere is waited for rather than deleted.
    while [[ "${state}" =~ ^(CREATING|STARTING|RESTARTING|REPAIRING|REIMAGING|STOPPING|DELETING)$ ]]; do
      log "TPU ${TPU_NAME} is ${state}; checking again in ${POLL_INTERVAL}s"
      pause "${POLL_INTERVAL}"
      state="$(tpu_state)"
    done
    case "${state}" in
      READY)
        log "TPU ${TPU_NAME} already exists and is READY"
        return 0
        ;;
      "") ;;
      *)
        log "TPU ${TPU_NAME} exists in state ${state}: deleting it first"
        delete_tpu || return 1
        ;;
    esac
    run gcloud compute tpus tpu-vm create "${TPU_NAME}" "${GCLOUD_SCOPE[@]}" \
      "--accelerator-type=${ACCELERATOR_TYPE}" "--version=${RUNTIME_VERSION}" "${spot[@]}" || return 1
  fi
}

wait_for_queued_resource() {
  local state misses=0
  while true; do
    state="$(queued_state)"
    if is_dry_run; then
      state=ACTIVE
    fi
    case "${state}" in
      ACTIVE)
        log "queued resource ${QUEUED_RESOURCE_ID} is ACTIVE"
        return 0
        ;;
      FAILED | SUSPENDED)
        log "queued resource ${QUEUED_RESOURCE_ID} is ${state}"
        return 1
        ;;
      "")
        # Not found, or the API call failed: give a transient error two more chances.
        misses=$((misses + 1))
        if ((misses >= 3)); then
          log "queued resource ${QUEUED_RESOURCE_ID} not found"
          return 1
        fi
        pause "${POLL_INTERVAL}"
        ;;
      *)
        log "queued resource ${QUEUED_RESOURCE_ID} is ${state}; checking again in ${POLL_INTERVAL}s"
        pause "${POLL_INTERVAL}"
        ;;
    esac
  done
}

delete_tpu() {
  if [[ "${QUEUED}" == 1 ]]; then
    # --force also deletes the TPU node the queued resource created.
    run gcloud compute tpus queued-resources delete "${QUEUED_RESOURCE_ID}" "${GCLOUD_SCOPE[@]}" \
      --force --quiet || return 1
  else
    run gcloud compute tpus tpu-vm delete "${TPU_NAME}" "${GCLOUD_SCOPE[@]}" --quiet || return 1
  fi
}

# Run a shell script on every worker, in the login shell of the worker account (bash on the
# Cloud TPU images; the scripts use `set -o pipefail` and $BASHPID). gcloud exits non-zero when
# the script fails on any worker.
ssh_all() {
  local script="$1"
  shift
  run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${GCLOUD_SCOPE[@]}" --worker=all "$@" \
    "--command=${script}"
}

# ---- code and environment --------------------------------------------------------------------
TARBALL_BUILT=0

setup_tpu() {
  if [[ -n "${REPO_URL}" ]]; then
    ssh_all "set -e; cd \"\$HOME\"; rm -rf ${REMOTE_DIR}; git clone --quiet $(shquote "${REPO_URL}") ${REMOTE_DIR}; git -C ${REMOTE_DIR} checkout --quiet $(shquote "${REPO_REF}")" || return 1
  else
    # Archived once per invocation: a TPU recreated after a preemption gets the same code even
    # if the local checkout has moved on since.
    if ((!TARBALL_BUILT)); then
      if ! is_dry_run && [[ -n "$(git -C "${REPO_ROOT}" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
        log "note: uncommitted changes are not shipped; the workers get ${REPO_REF} as committed"
      fi
      run git -C "${REPO_ROOT}" archive --format=tar.gz "--output=${TARBALL}" "${REPO_REF}" || return 1
      TARBALL_BUILT=1
    fi
    run gcloud compute tpus tpu-vm scp "${TARBALL}" "${TPU_NAME}:${REMOTE_DIR}.tar.gz" \
      "${GCLOUD_SCOPE[@]}" --worker=all || return 1
    ssh_all "set -e; cd \"\$HOME\"; rm -rf ${REMOTE_DIR}; mkdir -p ${REMOTE_DIR}; tar -xzf ${REMOTE_DIR}.tar.gz -C ${REMOTE_DIR}; rm -f ${REMOTE_DIR}.tar.gz" || return 1
  fi
  # The TPU images ship Python 3.10 and egspo needs >= 3.11: uv provides the interpreter.
  # jax is pinned to the tested version (constraints.txt) with the TPU build (libtpu) on top.
  # shellcheck disable=SC2016  # $HOME is expanded on the worker, not here
  local uv='"$HOME/.local/bin/uv"' py="\"\$HOME/${REMOTE_VENV}/bin/python\""
  ssh_all "set -e; cd \"\$HOME/${REMOTE_DIR}\"; python3 -m pip install --user --quiet --upgrade uv || python3 -m pip install --user --quiet --upgrade --break-system-packages uv; [ -x ${py} ] || ${uv} venv --python ${PYTHON_VERSION} \"\$HOME/${REMOTE_VENV}\"; ${uv} pip install --python ${py} -c requirements/constraints.txt -e \".[tpu]\" \"jax[tpu]==${JAX_VERSION}\"; ${py} -c \"import jax, egspo; print(jax.__version__)\"" || return 1
}

# ---- training --------------------------------------------------------------------------------

check_workdir() {
  [[ -n "${WORKDIR}" ]] || die "WORKDIR is required: a GCS path such as gs://my-bucket/egspo/run1"
  if [[ "${WORKDIR}" != gs://* && "${ALLOW_LOCAL_WORKDIR}" != 1 ]]; then
    die "WORKDIR=${WORKDIR} is not on GCS: every worker must see the same checkpoints; use gs://... (or ALLOW_LOCAL_WORKDIR=1 on a single-host slice)"
  fi
}

# The training command as run on each worker.
train_command() {
  local extra_env=()
  split_extra_args "${EXTRA_ARGS}"
  [[ -z "${REMOTE_ENV}" ]] || read -r -a extra_env <<<"env ${REMOTE_ENV}"
  shquote "${extra_env[@]}" python -m egspo.main "--config=${CONFIG}" "--workdir=${WORKDIR}" \
    "${EXTRA_ARGV[@]}"
}

# One training attempt on all workers. A process left over from a dropped ssh session would
# hold the TPU, so the pid of each run is recorded and a stale one is stopped first.
train_once() {
  # shellcheck disable=SC2016  # $HOME is expanded on the worker, not here
  local pidfile='"$HOME/egspo-train.pid"' logfile='"$HOME/egspo-train.log"'
  ssh_all "set -o pipefail; cd \"\$HOME/${REMOTE_DIR}\"; . \"\$HOME/${REMOTE_VENV}/bin/activate\"; $(stop_script); (echo \"\$BASHPID\" > ${pidfile}; exec $(train_command)) 2>&1 | tee -a ${logfile}" \
    --ssh-flag=-oServerAliveInterval=60
}

# Shell text that stops the egspo.main process recorded in the pid file if it still runs
# (SIGTERM, then SIGKILL after 30 s). The cmdline check keeps a recycled pid safe.
stop_script() {
  # shellcheck disable=SC2016  # $HOME and $p are expanded on the worker, not here
  local pidfile='"$HOME/egspo-train.pid"' p='"$p"'
  printf '%s' "p=\$(cat ${pidfile} 2>/dev/null); if [ -n ${p} ] && grep -qs egspo.main /proc/${p}/cmdline; then kill ${p}; for _ in \$(seq 30); do kill -0 ${p} 2>/dev/null || break; sleep 1; done; kill -9 ${p} 2>/dev/null; fi; rm -f ${pidfile}"
}

watch_loop() {
  local restarts=0 need_provision=0 state
  while true; do
    if ((need_provision)); then
      log "recreating ${TPU_NAME}"
      if create_tpu && setup_tpu; then
        need_provision=0
      else
        log "recreating ${TPU_NAME} failed"
      fi
    fi
    if ((!need_provision)); then
      log "training on ${TPU_NAME} (restart ${restarts}/${MAX_RESTARTS})"
      if train_once; then
        if is_dry_run; then
          log "dry run: a real run checks the TPU after a failure, recreates it if it was preempted, and trains again, at most ${MAX_RESTARTS} times"
        else
          log "training finished"
        fi
        return 0
      fi
      log "training on ${TPU_NAME} failed"
    fi
    if ((restarts >= MAX_RESTARTS)); then
      die "giving up after ${MAX_RESTARTS} restarts (MAX_RESTARTS)"
    fi
    restarts=$((restarts + 1))
    if [[ "${QUEUED}" == 1 ]]; then
      state="$(queued_state)"
      [[ "${state}" == ACTIVE ]] && state="$(tpu_state)"
    else
      state="$(tpu_state)"
    fi
    if [[ "${state}" != READY ]]; then
      log "TPU state is '${state:-NOT_FOUND}' (preempted or gone): it will be recreated"
      need_provision=1
    fi
    log "restarting in ${RETRY_DELAY}s; the run resumes from the latest checkpoint in ${WORKDIR}"
    pause "${RETRY_DELAY}"
  done
}

# ---- main ------------------------------------------------------------------------------------
is_dry_run && log "dry run: printing the commands instead of running them"
case "${SUBCOMMAND}" in
  create) create_tpu || die "create failed" ;;
  setup) setup_tpu || die "setup failed" ;;
  train)
    check_workdir
    train_once || die "training failed"
    ;;
  watch)
    check_workdir
    watch_loop
    ;;
  all)
    check_workdir
    create_tpu || die "create failed"
    setup_tpu || die "setup failed"
    watch_loop
    ;;
  status)
    [[ "${QUEUED}" == 0 ]] || run gcloud compute tpus queued-resources describe "${QUEUED_RESOURCE_ID}" "${GCLOUD_SCOPE[@]}"
    run gcloud compute tpus tpu-vm describe "${TPU_NAME}" "${GCLOUD_SCOPE[@]}"
    ;;
  stop) ssh_all "$(stop_script)" || die "stop failed" ;;
  delete) delete_tpu || die "delete failed" ;;
  *) die "unknown subcommand '${SUBCOMMAND}' (create|setup|train|watch|all|status|stop|delete; see --help)" ;;
esac
