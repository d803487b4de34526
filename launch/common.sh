# shellcheck shell=bash
# Helpers shared by launch/tpu_pod.sh and launch/gpu_node.sh (sourced, not executed).
#
# The dry-run contract: every external command goes through `run` (or `query`/`run_bg`).
# With DRY_RUN=1 they print the command on stdout, one line each, quoted so that the line can
# be pasted into a POSIX shell (or parsed with Python's shlex.split), and run nothing.
# Progress messages go to stderr, so stdout of a dry run holds commands only. The printed
# commands go to file descriptor 3, a copy of the script's stdout, so that a query made inside
# $(...) still shows up.
exec 3>&1

# Quote each argument for a POSIX shell: plain words stay bare, anything else is wrapped in
# single quotes (an embedded ' becomes '\''). Prints one line: the arguments joined by spaces.
shquote() {
  local arg quoted=() sq="'\\''"
  for arg in "$@"; do
    if [[ -n "${arg}" && "${arg}" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      quoted+=("${arg}")
    else
      quoted+=("'${arg//\'/${sq}}'")
    fi
  done
  printf '%s\n' "${quoted[*]}"
}

log() {
  printf '[%s %s] %s\n' "${LAUNCH_NAME:-launch}" "$(date -u +%H:%M:%S)" "$*" >&2
}

die() {
  log "error: $*"
  exit 1
}

is_dry_run() {
  [[ "${DRY_RUN:-0}" == 1 ]]
}

# Run a command, or print it under DRY_RUN=1.
run() {
  if is_dry_run; then
    shquote "$@" >&3
  else
    "$@"
  fi
}

# Run a command whose stdout is an answer the script needs (a resource state, ...). Under
# DRY_RUN=1 it prints the command and answers with nothing, i.e. "the resource does not exist",
# so a dry run shows the full path from scratch.
query() {
  if is_dry_run; then
    shquote "$@" >&3
  else
    "$@" 2>/dev/null || true
  fi
}

# Start a command in the background with stdout and stderr appended to a log file; the pid is
# left in LAST_PID. Under DRY_RUN=1 it prints `CMD >> LOG 2>&1 &` and sets LAST_PID=0.
run_bg() {
  local logfile="$1"
  shift
  if is_dry_run; then
    printf '%s >> %s 2>&1 &\n' "$(shquote "$@")" "$(shquote "${logfile}")" >&3
    LAST_PID=0
  else
    "$@" >>"${logfile}" 2>&1 &
    # shellcheck disable=SC2034  # read by the sourcing script
    LAST_PID=$!
  fi
}

# Sleep unless dry-running (a dry run never waits).
pause() {
  if ! is_dry_run && [[ "$1" != 0 ]]; then
    sleep "$1"
  fi
}

# Split a string of extra flags into the array EXTRA_ARGV on whitespace (no globbing, no quote
# processing: pass values without spaces, e.g. EXTRA_ARGS='--config.egspo.lam=0.5 --config.seed=1').
# shellcheck disable=SC2034  # EXTRA_ARGV is read by the sourcing script
split_extra_args() {
  EXTRA_ARGV=()
  if [[ -n "${1:-}" ]]; then
    read -r -a EXTRA_ARGV <<<"$1"
  fi
}

# The jax version pinned in requirements/constraints.txt (the tested set), so the accelerator
# build (jax[tpu] / jax[cuda12]) matches the version CI runs on CPU.
pinned_jax_version() {
  local constraints="$1" version
  version="$(sed -n 's/^jax==\([^ ;]*\).*/\1/p' "${constraints}" 2>/dev/null | head -n 1)"
  [[ -n "${version}" ]] || die "no 'jax==' pin in ${constraints}; set JAX_VERSION"
  printf '%s\n' "${version}"
}

# Fail with a clear message unless $2 (named $1) is a non-negative integer.
require_uint() {
  [[ "$2" =~ ^[0-9]+$ ]] || die "$1 must be a non-negative integer, got '$2'"
}

# parse_args ARGS...: sets SUBCOMMAND (exactly one) and DRY_RUN (--dry-run); -h/--help prints the
# calling script's `usage` and exits. Shared by tpu_pod.sh and gpu_node.sh.
parse_args() {
  SUBCOMMAND=""
  while (($# > 0)); do
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      -h | --help)
        usage
        exit 0
        ;;
      -*) die "unknown option '$1' (see --help)" ;;
      *)
        [[ -z "${SUBCOMMAND}" ]] || die "one subcommand at a time, got '${SUBCOMMAND}' and '$1'"
        SUBCOMMAND="$1"
        ;;
    esac
    shift
  done
  [[ -n "${SUBCOMMAND}" ]] || {
    usage >&2
    die "missing subcommand"
  }
}
