"""Entry point: `python -m egspo.main --config=configs/countdown.py[:tiny] --workdir=DIR`.

Overrides: `--config.optim.learning_rate=1e-5`. Multi-host: on Cloud TPU pods
`jax.distributed.initialize()` finds the coordinator itself; elsewhere pass
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`.
A run resumes from the latest checkpoint in `--workdir` automatically.
"""

from __future__ import annotations

import logging as std_logging
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (file.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
_COORD = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process).")
_NUM_PROC = flags.DEFINE_integer("num_processes", None, "Number of JAX processes.")
_PROC_ID = flags.DEFINE_integer("process_id", None, "Index of this process.")
flags.mark_flags_as_required(["config", "workdir"])


def _maybe_initialize_distributed() -> None:
  import jax

  if _COORD.value:
    jax.distributed.initialize(coordinator_address=_COORD.value, num_processes=_NUM_PROC.value,
                               process_id=_PROC_ID.value)
  elif any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                                     "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")):
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
  for handler in std_logging.getLogger().handlers + std_logging.getLogger("absl").handlers:
    handler.addFilter(_QuietLibraries())
  _maybe_initialize_distributed()
  from egspo import train  # after distributed initialisation: importing may touch devices

  import jax

  logging.info("JAX process %d/%d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  train.run(_CONFIG.value, _WORKDIR.value)


def run_main():
  app.run(main)


if __name__ == "__main__":
  run_main()
