"""Smoke test of benchmarks/train_step.py at its smallest settings: it runs, and the figures it
prints are consistent (the batch-1 gradient equals the batched one, XLA's FLOP count agrees with
the analytic one, the K-vs-T FLOP ratio is K/T for the update). Times are printed, not asserted."""

import json
import os
import subprocess
import sys

from conftest import REPO_ROOT


def test_train_step_benchmark_smallest():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, not 8
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / "train_step.py"), "--preset", "tiny",
         "--batch", "8", "--group_size", "4", "--gen_length", "8", "--block_length", "8",
         "--steps", "4", "--k", "2", "--iters", "1", "--matmul_n", "256"]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  for tag in ("[1]", "[2]", "[3]", "[4]", "load average at start"):
    assert any(line.startswith(tag) for line in lines), (tag, out.stdout)
  r = json.loads(next(line for line in lines if line.startswith("RESULT "))[len("RESULT "):])
  assert (r["B"], r["G"], r["T"], r["K"], r["schedule"]) == (8, 8, 4, 2, "per_step")
  for ph in ("rollout", "reward", "plan", "update", "value_reward", "total"):
    assert r["seconds"][ph] > 0, ph
  assert abs(r["seconds"]["value_reward"] - r["seconds"]["reward"] - r["seconds"]["plan"]) < 1e-9
  # The batch-1 loop accumulates the same gradient as the batched step.
  assert r["grad_max_abs"] > 0
  assert r["grad_max_abs_diff"] <= 1e-4 * r["grad_max_abs"]
  # XLA's count of the compiled update and the analytic count agree to 15 %.
  assert abs(r["update_gflop_xla"] / r["update_gflop_analytic"] - 1) < 0.15
  assert abs(r["ref_gflop_xla"] / r["ref_gflop_analytic"] - 1) < 0.15
  # Training FLOPs scale with the number of trained steps: K / T exactly.
  assert abs(r["flops_ratio_train"] - 2 / 4) < 1e-12
  assert 2 / 4 < r["flops_ratio_iteration"] < 1
  for k in ("matmul_peak_gflops_jax", "matmul_peak_gflops_torch", "update_speedup", "ref_speedup"):
    assert r[k] > 0, k
