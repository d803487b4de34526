"""Entry point: `python -m egspo.main --config=configs/countdown.py[:tiny] --workdir=DIR`.

Overrides: `--config.optim.learning_rate=1e-5`. Multi-host: on Cloud TPU pods
`jax.distributed.initialize()` finds the coordinator itself; elsewhere pass
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`.
A run resumes from the latest checkpoint in `--workdir` automatically; the workdir may be
relative, `~/…`, absolute or `gs://…` (resolved once, here).

A bad config (missing or broken file, bad `:variant`, unknown or mistyped override, a value
`egspo.config.validate` rejects) prints one line `error: …` and exits with status 2 before
anything is built. SIGTERM before `train.run` takes it over (imports, flag parsing, distributed
set-up) exits 0, as SIGTERM inside `train.run` does after its checkpoint.
"""

from __future__ import annotations

import logging as std_logging
import os
import signal
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from egspo import config as config_lib
from egspo import paths

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (file.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples "
                               "(relative, ~/…, absolute or gs://…).")
_COORD = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process).")
_NUM_PROC = flags.DEFINE_integer("num_processes", None, "Number of JAX processes.")
_PROC_ID = flags.DEFINE_integer("process_id", None, "Index of this process.")
flags.mark_flags_as_required(["config", "workdir"])

EXIT_USAGE = 2


def _fail(message: str) -> None:
  """Prints `error: <first line>` to stderr and exits with status 2."""
  line = (str(message).strip().splitlines() or ["bad command line"])[0]
  sys.stderr.write(f"error: {line}\n")
  sys.stderr.flush()
  raise SystemExit(EXIT_USAGE)


# ----------------------------------------------------------------------------------------------
# Command line: one clear line for a bad config.


def config_args(argv) -> tuple[str | None, list[str]]:
  """(the --config value, the dotted fields of `--config.a.b=…` overrides) found in `argv`."""
  spec, fields = None, []
  args = list(argv[1:])
  i = 0
  while i < len(args):
    a = args[i]
    if a == "--":
      break
    name, eq, value = a.lstrip("-").partition("=")
    if a.startswith("-") and name == "config":
      if eq:
        spec = value
      elif i + 1 < len(args):
        spec, i = args[i + 1], i + 1
    elif a.startswith("-") and name.startswith(("config.", "noconfig.")):
      fields.append(name.split(".", 1)[1])
    i += 1
  return spec, fields


def diagnose(argv) -> str | None:
  """The one-line config error of `argv` (file, variant, unknown override field), or None."""
  spec, fields = config_args(argv)
  if spec is None:
    return None
  try:
    config = config_lib.load_config(spec)
    for field in fields:
      config_lib.check_field(config, field)
  except config_lib.ConfigError as e:
    return str(e)
  return None


def _flag_error(e: Exception) -> str:
  """absl's flag error (`flag --config.seed=abc: invalid literal …`) as one line."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  msg = lines[-1] if lines else type(e).__name__
  if lines and lines[0].startswith("flag --config.") and lines[-1] != lines[0]:
    msg = f"{lines[0].rstrip(':')}: {msg}"
  return msg[len("flag "):] if msg.startswith("flag --") else msg


def parse_flags(argv):
  """absl's flag parsing (a `flags_parser` for `app.run`), with config errors as one line."""
  try:
    rest = flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  (flags.Error, a KeyError of an override…)
    _fail(diagnose(argv) or _flag_error(e))
  # A file that failed to load leaves a stand-in that raises on first use: say why now.
  if not isinstance(_CONFIG.value, ml_collections.ConfigDict):
    _fail(diagnose(argv) or f"--config could not be loaded ({type(_CONFIG.value).__name__})")
  return rest


# ----------------------------------------------------------------------------------------------
# SIGTERM during start-up


def _exit_on_sigterm(signum, frame):  # pylint: disable=unused-argument
  """Start-up has nothing to save (train.run installs its own guard before anything is written):
  leave at once with exit status 0."""
  logging.warning("received SIGTERM before training started: exiting")
  for handler in std_logging.getLogger().handlers + std_logging.getLogger("absl").handlers:
    handler.flush()
  # Not SystemExit: the signal may land inside an extension module's import (jaxlib), and
  # unwinding a half-imported C extension can crash the interpreter's teardown (SIGSEGV).
  os._exit(0)


def _maybe_initialize_distributed() -> None:
  import jax

  distributed = bool(_COORD.value) or any(
      k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                                "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))
  if distributed:
    # Multi-host SIGTERM belongs to JAX's preemption service (all hosts stop at one step).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
  if _COORD.value:
    jax.distributed.initialize(coordinator_address=_COORD.value, num_processes=_NUM_PROC.value,
                               process_id=_PROC_ID.value)
  elif distributed:
    # Cloud TPU pod slices, SLURM and Open MPI: JAX discovers the coordinator itself.
    jax.distributed.initialize()


class _QuietLibraries(std_logging.Filter):
  """Drops INFO chatter of orbax/jax internals (dozens of lines per checkpoint); keeps warnings."""

  def filter(self, record):
    noisy = any(s in record.pathname for s in ("/orbax/", "/jax/_src/"))
    return record.levelno >= std_logging.WARNING or not noisy


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  try:
    config_lib.validate(config)
  except config_lib.ConfigError as e:
    _fail(str(e))
  try:
    workdir = paths.resolve_path(_WORKDIR.value)
  except ValueError as e:
    _fail(f"--workdir={_WORKDIR.value!r}: {e}")
  for handler in std_logging.getLogger().handlers + std_logging.getLogger("absl").handlers:
    handler.addFilter(_QuietLibraries())
  _maybe_initialize_distributed()
  from egspo import train  # after distributed initialisation: importing may touch devices

  import jax

  logging.info("JAX process %d/%d, %d local / %d global devices; workdir %s",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), workdir)
  from egspo import checkpoint as ckpt_lib
  from egspo.model import llada
  from egspo.rl import update as update_lib

  why = llada.attention_backend_error(config.model.attention_impl, jax.default_backend())
  if why:
    _fail(f"bad config field model.{why}")

  try:
    train.run(config, workdir)
  except (ckpt_lib.CheckpointError, update_lib.NonFiniteError) as e:
    # Already one line naming the directory / stage and cause; no traceback over it.
    logging.error("%s", e)
    sys.stderr.write(f"error: {str(e).splitlines()[0]}\n")
    raise SystemExit(1) from None


def run_main():
  # train.run's PreemptionGuard replaces this handler while it runs, then restores it.
  signal.signal(signal.SIGTERM, _exit_on_sigterm)
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run_main()
