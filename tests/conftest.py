"""Test-wide set-up: 8 fake CPU devices (before any JAX backend starts) and the repo paths."""

import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # read when jax is imported

import chex  # noqa: E402  (imports jax; starts no backend)

# 8 fake CPU devices for the mesh tests, unless XLA_FLAGS already asks for a count.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  chex.set_n_cpu_devices(8)

TESTS_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
# shared/ (the papers' Countdown and Sudoku test sets) lies beside the checkout, or inside it.
SHARED_DATA = next((p for p in (REPO_ROOT / "shared" / "data", REPO_ROOT.parent / "shared" / "data")
                    if p.is_dir()), REPO_ROOT.parent / "shared" / "data")
sys.path.insert(0, str(TESTS_DIR))  # for `import torch_llada`
