"""Test-wide set-up: 8 fake CPU devices (must be set before jax is imported) and the repo paths."""

import os
import pathlib
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

TESTS_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
# shared/ (the papers' Countdown and Sudoku test sets) lies beside the checkout, or inside it.
SHARED_DATA = next((p for p in (REPO_ROOT / "shared" / "data", REPO_ROOT.parent / "shared" / "data")
                    if p.is_dir()), REPO_ROOT.parent / "shared" / "data")
sys.path.insert(0, str(TESTS_DIR))  # for `import torch_llada`
