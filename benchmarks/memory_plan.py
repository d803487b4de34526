"""Memory plan: does one EGSPO iteration of LLaDA-8B fit on a given accelerator slice? (issue 6)

Compiles ahead of time — `jax.jit(...).lower(abstract args).compile()`, nothing allocated, the
model built with `nnx.eval_shape` — the three programs of one RL iteration as `egspo.train` runs
them, over a fake device mesh standing in for the slice:

  rollout  the whole `sampler.generate` scan over the T denoising steps (B = prompts × G);
  ref      the frozen reference log-probs of the B×K selected states (`EGSPO._ref_logps_impl`,
           scanned over micro-batches);
  update   `rl.update.make_update_step` with the EGSPO loss: one optimizer step, gradients
           accumulated over the micro-batches (the per_step schedule: each optimizer step trains
           one selected step of every sample, K such steps per iteration).

Per-device memory comes from `compiled.memory_analysis()` (arguments, outputs, temporaries; total =
arguments + outputs − donated aliases + temporaries). Buffers alive across the iteration but not
arguments of a program (the optimizer state during the rollout, the reference adapters during the
update, ...) are added from their shardings ("resident"), and the iteration's peak is the largest
program total. These are **CPU-backend** memory analyses of the SPMD-partitioned programs: XLA's
buffer assignment for the same partitioned HLO, an estimate of the TPU/GPU figure. Known bias: the
CPU backend upcasts bf16 matmuls to float32, so temporaries include a float32 copy of the weights
of the layer being computed and float32 matmul outputs (an over-estimate on TPU/GPU).

FLOPs: XLA's `cost_analysis()` counts a loop body once, so the compiled count comes from probe
programs without loops — one denoising-step forward, one reference micro-batch forward, one
micro-batch loss gradient — compiled on one device with 1 and 2 unscanned layers and extrapolated
linearly to n_layers, then multiplied by their trip counts (T, micro-batches, K optimizer steps).
The analytic count is 2·(matmul parameters)·tokens + attention 4·n_layers·L²·d per sequence +
2·d·V per LM-head position, times (1 forward + 1 activation-gradient + 1 weight-gradient for full
fine-tuning only + 1 recompute with remat) in the update.

The 8B model is built with `scan_layers=True` (one scanned block: the 32-layer program compiles
in about a minute here instead of tens of minutes) and the 8B numerics (bf16 parameters and
matmuls, float32 norms/logits, remat unless a plan turns it off), its LoRA adapters those of the
config's `lora.targets` and `lora.dropout` (the `lora.apply_lora` call training makes; no LM head
by default). The full T-step rollout scan is compiled, not a single step. Buffers are per device; "-1" mesh axes take the remaining devices.

Each device count runs in its own subprocess (`XLA_FLAGS=--xla_force_host_platform_device_count=N`
must be set before jax is imported).

    /work/venv/bin/python benchmarks/memory_plan.py --quick      # the recommended plan per slice
    /work/venv/bin/python benchmarks/memory_plan.py              # + remat off, full FT, no FSDP
    /work/venv/bin/python benchmarks/memory_plan.py --chips v5p-8 --plans fsdp
"""

from __future__ import annotations

import os
import sys


def _set_device_count_from_argv():
  """The child sets its fake device count before jax is imported."""
  if "--child" in sys.argv:
    n = sys.argv[sys.argv.index("--child") + 1]
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={int(n)}")
    os.environ["JAX_PLATFORMS"] = "cpu"


if __name__ == "__main__":
  _set_device_count_from_argv()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from egspo import config as config_lib  # noqa: E402
from egspo import sharding as shard_lib  # noqa: E402
from egspo.diffusion import sampler as sampler_lib  # noqa: E402
from egspo.model import llada  # noqa: E402
from egspo.model import lora as lora_lib  # noqa: E402
from egspo.rl import algorithms as algo_lib  # noqa: E402
from egspo.rl import registry  # noqa: E402
from egspo.rl import update as update_lib  # noqa: E402

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """A slice: `num_devices` accelerators (JAX devices) with `hbm_gib` GiB of memory each."""

  name: str
  num_devices: int
  hbm_gib: float


# v5p-8 = 4 chips (a TPU "-N" counts TensorCores on v4/v5p, chips on v5e).
CHIPS = {
    "v5p-8": Chip("v5p-8", 4, 95.0),
    "v5p-16": Chip("v5p-16", 8, 95.0),
    "v4-32": Chip("v4-32", 16, 32.0),
    "v5e-16": Chip("v5e-16", 16, 16.0),
    "8xH100": Chip("8xH100", 8, 80e9 / GIB),  # 80 GB = 74.5 GiB
}


@dataclasses.dataclass(frozen=True)
class Plan:
  """A sharding choice: mesh axis sizes (data × fsdp × tensor = devices), remat, LoRA or full."""

  data: int = 1
  fsdp: int = -1
  tensor: int = 1
  trainable: str = "lora"  # 'lora' | 'full'
  remat: bool = True
  param_dtype: str = "bfloat16"
  rules: tuple = ()  # (logical_axis, mesh_axes) overrides of egspo.sharding.RULES

  def label(self, n: int) -> str:
    d, f, t = self.mesh_shape(n)
    return (f"d{d}·f{f}·t{t} {self.trainable} {'remat' if self.remat else 'no-remat'} "
            f"{'bf16' if self.param_dtype == 'bfloat16' else 'f32'}"
            + "".join(f" {k}→{v}" for k, v in self.rules))

  def mesh_shape(self, n: int) -> tuple[int, int, int]:
    shape = [self.data, self.fsdp, self.tensor]
    if -1 in shape:
      shape[shape.index(-1)] = n // math.prod(s for s in shape if s != -1)
    return tuple(shape)


# Named sharding choices (`--plans`); -1 takes the remaining devices.
PLANS = {
    "fsdp": Plan(data=1, fsdp=-1, tensor=1),
    "fsdp_noremat": Plan(data=1, fsdp=-1, tensor=1, remat=False),
    "fsdp_full": Plan(data=1, fsdp=-1, tensor=1, trainable="full"),
    "fsdp_tp2": Plan(data=1, fsdp=-1, tensor=2),
    "fsdp_tp4": Plan(data=1, fsdp=-1, tensor=4),
    "fsdp_tp4_full": Plan(data=1, fsdp=-1, tensor=4, trainable="full"),
    "data": Plan(data=-1, fsdp=1, tensor=1),
    # LoRA factors split along their rank too (B [rank, out] is otherwise replicated when its
    # output axis is a tensor axis of size 1).
    "fsdp_rank": Plan(data=1, fsdp=-1, tensor=1, rules=(("lora_rank", "fsdp"),)),
}
QUICK_PLANS = ("fsdp", "fsdp_rank")
DEFAULT_PLANS = ("fsdp_rank", "fsdp", "fsdp_noremat", "fsdp_full", "fsdp_tp4", "fsdp_tp4_full",
                 "data")


@dataclasses.dataclass(frozen=True)
class Workload:
  """Shapes of one RL iteration (defaults: the 8B config, `egspo.config.base_config`)."""

  prompt_length: int = 200
  gen_length: int = 256
  block_length: int = 32
  steps: int = 128
  num_prompts: int = 12
  group_size: int = 8
  micro_batch_size: int = 48
  num_selected: int = 8
  lora_rank: int = 128
  lora_alpha: float = 64.0
  lora_targets: str = lora_lib.DEFAULT_TARGETS  # as training: egspo.model.lora.target_pattern
  lora_dropout: float = 0.05

  @classmethod
  def from_config(cls, c) -> "Workload":
    return cls(prompt_length=c.rollout.max_prompt_length, gen_length=c.rollout.gen_length,
               block_length=c.rollout.block_length, steps=c.rollout.steps,
               num_prompts=c.batch.num_prompts, group_size=c.batch.group_size,
               micro_batch_size=c.batch.micro_batch_size, num_selected=c.egspo.num_selected_steps,
               lora_rank=c.lora.rank, lora_alpha=c.lora.alpha, lora_targets=c.lora.targets,
               lora_dropout=c.lora.dropout)

  @property
  def batch(self) -> int:
    return self.num_prompts * self.group_size

  @property
  def seq_len(self) -> int:
    return self.prompt_length + self.gen_length

  @property
  def num_micro(self) -> int:
    return self.batch // self.micro_batch_size

  def sampler_config(self, mask_token_id: int) -> sampler_lib.SamplerConfig:
    return sampler_lib.SamplerConfig(gen_length=self.gen_length, steps=self.steps,
                                     block_length=self.block_length, mask_token_id=mask_token_id,
                                     temperature=0.9)

  def max_commit(self, mask_token_id: int = 0) -> int:
    return int(sampler_lib.commit_schedule(self.sampler_config(mask_token_id)).max())


# ----------------------------------------------------------------------------------------------
# Abstract policy and shardings


def abstract_policy(model_cfg: llada.ModelConfig, trainable: str, wl: Workload):
  """(Policy, params, frozen) of an abstract (shape-only) LLaDA, with LoRA adapters for 'lora'."""

  def make():
    model = llada.LLaDA(model_cfg, rngs=nnx.Rngs(0))
    if trainable == "lora":  # the adapters training builds (egspo.trainer.build_model)
      lora_lib.apply_lora(model, rank=wl.lora_rank, alpha=wl.lora_alpha, targets=wl.lora_targets,
                          rngs=nnx.Rngs(1), dropout=wl.lora_dropout)
    return model

  return update_lib.split_policy(nnx.eval_shape(make), trainable)


def with_shardings(abstract, shardings):
  """ShapeDtypeStructs carrying their shardings (what `.lower` needs for a sharded program)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


def _experiment_config(wl: Workload):
  """The 8B experiment config with the workload's shapes (what the EGSPO algorithm reads)."""
  c = config_lib.base_config("countdown")
  c.algorithm = "egspo_sa"
  c.egspo.num_selected_steps = wl.num_selected
  c.batch.num_prompts, c.batch.group_size = wl.num_prompts, wl.group_size
  c.batch.micro_batch_size = wl.micro_batch_size
  c.rollout.gen_length, c.rollout.steps = wl.gen_length, wl.steps
  c.rollout.block_length, c.rollout.max_prompt_length = wl.block_length, wl.prompt_length
  return c


def _egspo(policy, ref_params, model_cfg, wl: Workload):
  ctx = registry.Context(config=_experiment_config(wl), policy=policy, ref_params=ref_params,
                         mask_token_id=model_cfg.mask_token_id,
                         max_commit=wl.max_commit(model_cfg.mask_token_id),
                         reward_fn=None, decode_fn=None)
  return algo_lib.EGSPO(ctx)


def _batch_struct(wl: Workload, rows: int, k: int, lead: tuple[int, ...] = ()):
  """Abstract EGSPO batch: `lead` + [rows, ...] leaves (what `EGSPO.plan` builds)."""
  i32, f32 = jnp.int32, jnp.float32
  s = lambda *shape, dt=i32: jax.ShapeDtypeStruct(lead + (rows,) + shape, dt)  # noqa: E731
  return dict(prompt_ids=s(wl.prompt_length), prompt_mask=s(wl.prompt_length, dt=jnp.bool_),
              tokens=s(wl.gen_length), commit_step=s(wl.gen_length), steps=s(k),
              valid=s(k, dt=jnp.bool_), adv=s(k, dt=f32), logp_old=s(k, dt=f32),
              logp_ref=s(k, dt=f32))


# ----------------------------------------------------------------------------------------------
# The three programs of one iteration, compiled ahead of time


def _memory(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  out = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
             aliased=m.alias_size_in_bytes, temporaries=m.temp_size_in_bytes)
  out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
  return out


PROGRAMS = ("rollout", "ref", "update")


def compile_iteration(model_cfg: llada.ModelConfig, plan: Plan, wl: Workload, devices=None,
                      rules=shard_lib.RULES, programs=PROGRAMS) -> dict:
  """AOT-compiles rollout, reference log-probs and update for `plan` over `devices` (default all).

  `programs`: which of PROGRAMS to compile (the peak is over those).

  Returns {"programs": {name: memory dict + compile_s}, "resident": {name: bytes}, "peak": bytes,
  "mesh": (d, f, t)}, all per device.
  """
  devices = list(jax.devices() if devices is None else devices)
  mesh = shard_lib.make_mesh(data=plan.data, fsdp=plan.fsdp, tensor=plan.tensor, devices=devices)
  rules = shard_lib.merge_rules(rules, plan.rules)
  batch_div = shard_lib.batch_size_multiple(mesh)
  for name, rows in (("num_prompts × group_size", wl.batch), ("micro_batch_size",
                                                                wl.micro_batch_size)):
    if rows % batch_div:
      raise ValueError(f"{name}={rows} is not divisible by the data×fsdp device count {batch_div}")
  model_cfg = model_cfg.replace(remat=plan.remat, param_dtype=plan.param_dtype)
  policy, params, frozen = abstract_policy(model_cfg, plan.trainable, wl)
  tx = update_lib.make_optimizer(3e-5)
  state = jax.eval_shape(lambda p: update_lib.TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                                         opt_state=tx.init(p)), params)
  state_sh = shard_lib.logical_to_mesh_sharding(state, mesh, rules)
  frozen_sh = shard_lib.logical_to_mesh_sharding(frozen, mesh, rules)
  state_a, frozen_a = with_shardings(state, state_sh), with_shardings(frozen, frozen_sh)
  ref_a = state_a.params  # π_ref: a copy of the trainable part (the adapters, or all for full FT)
  key_a = jax.eval_shape(lambda: jax.random.key(0))
  batch_sh = NamedSharding(mesh, P(shard_lib.BATCH_AXES))
  micro_sh = NamedSharding(mesh, P(None, shard_lib.BATCH_AXES))
  scfg = wl.sampler_config(model_cfg.mask_token_id)

  wanted, programs = programs, {}

  def run(name, fn, *args):
    if name not in wanted:
      return
    t0 = time.time()
    with shard_lib.use_mesh(mesh, rules):
      compiled = fn.lower(*args).compile()
    programs[name] = dict(_memory(compiled), compile_s=time.time() - t0)
    return compiled

  # rollout: the T-step generate scan (as `train.make_rollout`).
  # The model state enters the scan as an operand (`generate(..., params=)`): a closed-over
  # NNX module cannot be used by the scanned layer stack inside another scan.
  def rollout_fn(params, frozen, ids, mask, key):
    graphdef, model_state = nnx.split(policy.model(params, frozen))
    return sampler_lib.generate(sampler_lib.nnx_logits_fn(graphdef, scfg.gen_length), ids, mask,
                                key, scfg, params=model_state)

  ids_a = jax.ShapeDtypeStruct((wl.batch, wl.prompt_length), jnp.int32, sharding=batch_sh)
  mask_a = jax.ShapeDtypeStruct((wl.batch, wl.prompt_length), jnp.bool_, sharding=batch_sh)
  run("rollout", jax.jit(rollout_fn), state_a.params, frozen_a, ids_a, mask_a, key_a)

  # ref: π_ref log-probs of all B×K selected states, scanned over micro-batches.
  algo = _egspo(policy, ref_a, model_cfg, wl)
  full_batch = with_shardings(_batch_struct(wl, wl.batch, wl.num_selected),
                              jax.tree.map(lambda _: batch_sh,
                                           _batch_struct(wl, wl.batch, wl.num_selected)))
  run("ref", jax.jit(algo._ref_logps_impl), ref_a, frozen_a, full_batch)

  # update: one optimizer step of the per_step schedule (one selected step per sample).
  mb = _batch_struct(wl, wl.micro_batch_size, 1, lead=(wl.num_micro,))
  mb_a = with_shardings(mb, jax.tree.map(lambda _: micro_sh, mb))
  step = update_lib.make_update_step(policy, tx, algo.loss, state_shardings=state_sh,
                                     frozen_shardings=frozen_sh, batch_shardings=micro_sh)
  run("update", step, state_a, frozen_a, mb_a, key_a)

  # Buffers alive during a program without being its arguments.
  opt_b = per_device_bytes(state_a.opt_state)
  ref_b = per_device_bytes(ref_a)
  record_b = per_device_bytes(full_batch)  # rollout record + plan outputs, held across programs
  resident = {"rollout": opt_b + ref_b, "ref": per_device_bytes(state_a), "update": ref_b + record_b}
  for name, p in programs.items():
    p["resident"] = resident[name]
    p["peak"] = p["total"] + resident[name]
  return dict(mesh=tuple(mesh.shape[a] for a in shard_lib.MESH_AXES), programs=programs,
              peak=max(p["peak"] for p in programs.values()),
              params_bytes=dict(trainable=per_device_bytes(state_a.params),
                                frozen=per_device_bytes(frozen_a), opt_state=opt_b))


# ----------------------------------------------------------------------------------------------
# FLOPs


def _matmul_params(model_cfg: llada.ModelConfig, trainable: str, wl: Workload) -> int:
  """Parameters of the transformer blocks' matmuls (+ LoRA factors of the block projections that
  `wl.lora_targets` adapts): FLOPs/token = 2× this."""
  d, f = model_cfg.d_model, model_cfg.mlp_hidden_size
  kv = model_cfg.n_kv_heads * model_cfg.head_dim
  shapes = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "attn_out": (d, d),
            "ff_proj": (d, f), "up_proj": (d, f), "ff_out": (f, d)}
  n = sum(a * b for a, b in shapes.values())
  if trainable == "lora":
    n += sum(wl.lora_rank * (a + b) for k, (a, b) in shapes.items()
             if lora_lib.is_target(f"blocks.0.{k}", wl.lora_targets))
  return model_cfg.n_layers * n


def forward_flops(model_cfg, trainable, wl, n_seq: int, seq_len: int, head_positions: int) -> float:
  """Analytic forward FLOPs of n_seq sequences with the LM head at head_positions per sequence."""
  d = model_cfg.d_model
  per_seq = (2 * _matmul_params(model_cfg, trainable, wl) * seq_len
             + 4 * model_cfg.n_layers * seq_len**2 * d + 2 * d * model_cfg.embedding_size
             * head_positions)
  return float(n_seq * per_seq)


def analytic_flops(model_cfg: llada.ModelConfig, plan: Plan, wl: Workload) -> dict[str, float]:
  """Global FLOPs of one iteration's programs (see the module docstring)."""
  m = wl.max_commit(model_cfg.mask_token_id)
  rollout = wl.steps * forward_flops(model_cfg, plan.trainable, wl, wl.batch, wl.seq_len,
                                     wl.gen_length)
  ref = forward_flops(model_cfg, plan.trainable, wl, wl.batch * wl.num_selected, wl.seq_len, m)
  passes = 2 + (plan.trainable == "full") + plan.remat
  update = wl.num_selected * passes * forward_flops(model_cfg, plan.trainable, wl, wl.batch,
                                                    wl.seq_len, m)
  return dict(rollout=rollout, ref=ref, update=update, iteration=rollout + ref + update)


def _probe_flops(model_cfg, plan: Plan, wl: Workload, programs=PROGRAMS) -> dict:
  """Compiled FLOPs of the loop bodies on one device (see the module docstring)."""
  out = {}
  for n_layers in (1, 2):
    cfg = model_cfg.replace(n_layers=n_layers, scan_layers=False, remat=plan.remat,
                            param_dtype=plan.param_dtype)
    policy, params, frozen = abstract_policy(cfg, plan.trainable, wl)
    algo = _egspo(policy, params, cfg, wl)
    scfg = wl.sampler_config(cfg.mask_token_id)
    key = jax.eval_shape(lambda: jax.random.key(0))

    def step_fn(params, frozen, ids, mask, completion, key):
      model = policy.model(params, frozen)
      return sampler_lib.denoise_step(sampler_lib.model_logits_fn(model, scfg.gen_length), ids,
                                      mask, completion, 0, key, scfg)

    def ref_fn(params, frozen, mb):
      model = policy.model(params, frozen)
      return update_lib.step_logprobs(model, mb["prompt_ids"], mb["prompt_mask"], mb["tokens"],
                                      mb["commit_step"], mb["steps"],
                                      mask_token_id=cfg.mask_token_id,
                                      max_commit=algo.ctx.max_commit)

    def grad_fn(params, frozen, mb, key):
      def loss(p):  # as make_update_step's training forward (LoRA dropout on)
        model = policy.model(p, frozen)
        lora_lib.enable_dropout(model, key)
        return algo.loss(model, mb, key)[0]

      return jax.grad(loss)(params)

    b = wl.batch
    ids = jax.ShapeDtypeStruct((b, wl.prompt_length), jnp.int32)
    mask = jax.ShapeDtypeStruct((b, wl.prompt_length), jnp.bool_)
    comp = jax.ShapeDtypeStruct((b, wl.gen_length), jnp.int32)
    probes = dict(
        rollout=(step_fn, params, frozen, ids, mask, comp, key),
        ref=(ref_fn, params, frozen, _batch_struct(wl, wl.micro_batch_size, wl.num_selected)),
        update=(grad_fn, params, frozen, _batch_struct(wl, wl.micro_batch_size, 1), key))
    out[n_layers] = {k: jax.jit(probes[k][0]).lower(*probes[k][1:]).compile().cost_analysis()
                     ["flops"] for k in programs}
  return out


def compiled_flops(model_cfg: llada.ModelConfig, plan: Plan, wl: Workload,
                   programs=PROGRAMS) -> dict[str, float]:
  """Global FLOPs of one iteration from loop-free probe compiles, extrapolated in n_layers."""
  probe = _probe_flops(model_cfg, plan, wl, programs)
  at = lambda k: probe[1][k] + (model_cfg.n_layers - 1) * (probe[2][k] - probe[1][k])  # noqa: E731
  trips = dict(rollout=wl.steps, ref=wl.num_micro, update=wl.num_selected * wl.num_micro)
  out = {k: trips[k] * at(k) for k in programs}
  out["iteration"] = sum(out.values())
  return out


# ----------------------------------------------------------------------------------------------
# Driver


def model_config_8b(scan_layers: bool = True) -> llada.ModelConfig:
  # The accelerators' attention ("auto" would pick the CPU kernel on these fake CPU devices).
  return llada.get_config("llada_8b", scan_layers=scan_layers, attention_impl="xla")


def child(n: int, chips: list[str], plans: list[str], wl: Workload, flops: bool) -> None:
  """Runs in a subprocess with n fake devices; prints one JSON line per (chip, plan).

  Chips with the same device count share one compile per plan (only the HBM differs)."""
  assert jax.device_count() == n, (jax.device_count(), n)
  cfg = model_config_8b()
  flop_cache = {}
  for name in plans:
    plan = PLANS[name]
    row = dict(plan=name, label=plan.label(n))
    try:
      row.update(compile_iteration(cfg, plan, wl))
    except Exception as e:  # noqa: BLE001 — a plan that cannot be built is a table row too
      row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    fkey = (plan.trainable, plan.remat, plan.param_dtype)
    if flops and fkey not in flop_cache:
      flop_cache[fkey] = (compiled_flops(cfg, plan, wl), analytic_flops(cfg, plan, wl))
    if flops:
      row["flops_compiled"], row["flops_analytic"] = flop_cache[fkey]
    for chip in chips:
      print("ROW " + json.dumps(dict(row, chip=chip, hbm=CHIPS[chip].hbm_gib * GIB)), flush=True)


def format_table(rows: list[dict]) -> str:
  g = lambda b: f"{b / GIB:7.1f}"  # noqa: E731
  head = (f"{'slice':8} {'plan':48} {'program':8} {'args':>7} {'out':>7} {'temp':>7} "
          f"{'total':>7} {'+resid':>7} {'peak':>7} {'HBM':>6}  fits   {'TFLOP/it cmp':>12} "
          f"{'analytic':>9}")
  lines = [head, "-" * len(head)]
  for r in rows:
    if "error" in r:
      lines.append(f"{r['chip']:8} {r['label']:48} ERROR {r['error']}")
      continue
    for i, (name, p) in enumerate(r["programs"].items()):
      fits = "yes" if r["peak"] <= r["hbm"] else "NO"
      tail = ""
      if i == 0:
        tail = f"  {fits:4}"
        if "flops_compiled" in r:
          tail += (f"  {r['flops_compiled']['iteration'] / 1e12:12.0f} "
                   f"{r['flops_analytic']['iteration'] / 1e12:9.0f}")
      lines.append(f"{r['chip'] if i == 0 else '':8} {r['label'] if i == 0 else '':48} {name:8} "
                   f"{g(p['arguments'])} {g(p['outputs'])} {g(p['temporaries'])} {g(p['total'])} "
                   f"{g(p['resident'])} {g(p['peak'])} {r['hbm'] / GIB:6.1f}{tail}")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--chips", default=",".join(CHIPS), help=f"comma list of {list(CHIPS)}")
  ap.add_argument("--plans", default=None, help=f"comma list of {list(PLANS)}")
  ap.add_argument("--quick", action="store_true", help=f"plans {QUICK_PLANS} only")
  ap.add_argument("--no-flops", action="store_true", help="skip the FLOP probe compiles")
  ap.add_argument("--json", default="", help="also write the rows to this file")
  ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  plans = (args.plans.split(",") if args.plans else
           list(QUICK_PLANS if args.quick else DEFAULT_PLANS))
  for p in plans:
    if p not in PLANS:
      ap.error(f"unknown plan {p!r}; known: {list(PLANS)}")
  chips = args.chips.split(",")
  for c in chips:
    if c not in CHIPS:
      ap.error(f"unknown chip {c!r}; known: {list(CHIPS)}")
  wl = Workload.from_config(config_lib.base_config("countdown"))
  if args.child:
    child(args.child, chips, plans, wl, flops=not args.no_flops)
    return
  rows = []
  by_n = {}
  for c in chips:
    by_n.setdefault(CHIPS[c].num_devices, []).append(c)
  for n, cs in by_n.items():
    cmd = [sys.executable, __file__, "--child", str(n), "--chips", ",".join(cs), "--plans",
           ",".join(plans)] + (["--no-flops"] if args.no_flops else [])
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    got = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    if proc.returncode:
      print(proc.stderr[-3000:], file=sys.stderr)
    print(f"# {n} fake devices ({','.join(cs)}): {len(got)} rows in {time.time() - t0:.0f} s",
          file=sys.stderr, flush=True)
    rows += got
  order = {c: i for i, c in enumerate(chips)}
  rows.sort(key=lambda r: (order[r["chip"]], plans.index(r["plan"])))
  print(f"LLaDA-8B EGSPO iteration (B={wl.batch}: {wl.num_prompts} prompts × G={wl.group_size}, "
        f"P={wl.prompt_length}, gen {wl.gen_length}, T={wl.steps}, K={wl.num_selected}, "
        f"micro-batch {wl.micro_batch_size}); GiB per device, CPU-backend XLA memory analysis")
  print(format_table(rows))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
  main()
