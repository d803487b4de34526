"""The memory plan's AOT compiles (benchmarks/memory_plan.py) on a reduced LLaDA over the 8 fake
CPU devices of conftest: XLA's memory analysis is positive and orders the sharding choices as it
must, and the analytic FLOP count agrees with XLA's cost analysis (issue 6)."""

import dataclasses
import importlib.util
import math
import sys

import jax
import pytest

from flax import nnx

from egspo import config as config_lib
from egspo.model import llada, lora
from conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("memory_plan",
                                              REPO_ROOT / "benchmarks" / "memory_plan.py")
mp = importlib.util.module_from_spec(spec)
sys.modules["memory_plan"] = mp  # dataclasses look their module up
spec.loader.exec_module(mp)

# llada_8b's architecture and bf16 numerics, shrunk: 1 layer, d_model 256, vocab 1024 (plans
# without remat: a smaller program, a faster compile).
CFG = llada.get_config("llada_8b", n_layers=1, d_model=256, n_heads=4, n_kv_heads=4,
                       mlp_hidden_size=512, vocab_size=1024, embedding_size=1024,
                       mask_token_id=1000, eos_token_id=1001, pad_token_id=1001)
PLANS = {k: dataclasses.replace(mp.PLANS[k], remat=False) for k in ("fsdp", "fsdp_full", "data")}
WL = mp.Workload(prompt_length=16, gen_length=16, block_length=8, steps=4, num_prompts=4,
                 group_size=4, micro_batch_size=8, num_selected=2, lora_rank=8)


def test_plans_the_adapters_training_builds():
  """The 8B default config's workload: the plan's abstract policy adapts exactly what
  `egspo.trainer.build_model` adapts (`lora.apply_lora` with `lora.targets`), no LM head."""
  c = config_lib.base_config("countdown")
  wl = mp.Workload.from_config(c)
  assert (wl.lora_targets, wl.lora_dropout) == (c.lora.targets, c.lora.dropout)
  _, params, _ = mp.abstract_policy(mp.model_config_8b(), "lora", wl)
  planned = {".".join(map(str, p[:-1])) for p, _ in nnx.to_flat_state(params)}
  assert planned == {f"blocks.{n}" for n in lora.TARGET_SETS[c.lora.targets]}
  assert "ff_out" not in planned
  # The analytic FLOPs count the same adapters: r·(in + out) of q, k, v (4096 → 4096) and
  # up_proj (4096 → 12288) per layer.
  cfg = mp.model_config_8b()
  extra = mp._matmul_params(cfg, "lora", wl) - mp._matmul_params(cfg, "full", wl)
  assert extra == cfg.n_layers * wl.lora_rank * (3 * 8192 + 4096 + 12288)


@pytest.fixture(scope="module")
def lora_fsdp():
  assert jax.device_count() == 8
  return mp.compile_iteration(CFG, PLANS["fsdp"], WL)


def test_memory_analysis_positive_and_peak(lora_fsdp):
  assert lora_fsdp["mesh"] == (1, 8, 1)
  assert set(lora_fsdp["programs"]) == {"rollout", "ref", "update"}
  for name, p in lora_fsdp["programs"].items():
    for field in ("arguments", "outputs", "temporaries", "total", "resident"):
      assert p[field] > 0, (name, field, p)
    assert p["total"] == p["arguments"] + p["outputs"] - p["aliased"] + p["temporaries"]
    assert p["peak"] == p["total"] + p["resident"]
  # The update donates the train state: its new state aliases the old one.
  upd = lora_fsdp["programs"]["update"]
  state = lora_fsdp["params_bytes"]["trainable"] + lora_fsdp["params_bytes"]["opt_state"]
  assert upd["aliased"] >= state
  assert lora_fsdp["peak"] == max(p["peak"] for p in lora_fsdp["programs"].values())


def test_sharding_choices_order_argument_memory(lora_fsdp):
  upd = lambda r: r["programs"]["update"]["arguments"]  # noqa: E731
  full = mp.compile_iteration(CFG, PLANS["fsdp_full"], WL, programs=("update",))
  data = mp.compile_iteration(CFG, PLANS["data"], WL, programs=("update",))
  # Full fine-tuning trains (and keeps AdamW moments for) every parameter; LoRA only adapters.
  assert upd(full) > upd(lora_fsdp)
  # FSDP over 8 devices splits the frozen base weights 8 ways; data parallelism replicates them.
  assert upd(lora_fsdp) < upd(data)
  assert data["params_bytes"]["frozen"] >= 7 * lora_fsdp["params_bytes"]["frozen"]
  # The analysis sees the arguments we give it: per-device bytes of their shardings.
  assert math.isclose(upd(data), data["programs"]["update"]["arguments"])


@pytest.mark.parametrize("program", ["ref", pytest.param("update", marks=pytest.mark.slow),
                                     pytest.param("rollout", marks=pytest.mark.slow)])
@pytest.mark.parametrize("plan", ["fsdp", pytest.param("fsdp_full", marks=pytest.mark.slow)])
def test_analytic_flops_match_compiled(program, plan):
  """Forward (denoising step, reference log-probs) and forward+backward (update): the analytic
  count is within 25% of XLA's cost analysis of the probe programs."""
  plan = dataclasses.replace(mp.PLANS[plan], remat=program == "update")
  got = mp.compiled_flops(CFG, plan, WL, programs=(program,))
  want = mp.analytic_flops(CFG, plan, WL)
  assert got[program] > 0
  assert 0.8 < want[program] / got[program] < 1.25, (want[program], got[program])
