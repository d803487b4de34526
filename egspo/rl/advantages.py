"""Advantages: group baselines, leave-one-out, and EGSPO's stepwise advantages (REFERENCE §3.6, §4).

Batch layout. B = n_groups · G rows with each group contiguous: rows [g·G, (g+1)·G) are the G
completions of prompt g (what repeating each prompt G times in place gives). Every function here
reshapes [B, ...] → [n_groups, G, ...] and reduces over the G axis, so trailing axes (e.g. the K
selected-step columns) are handled column by column.
"""

from __future__ import annotations

import math

import chex
import jax.numpy as jnp

LAMBDA_SCHEDULES = ("constant", "linear")
BASELINES = ("returns", "standard_grpo")


def _grouped(x, group_size: int):
  if group_size < 1:
    raise ValueError(f"group_size must be ≥ 1, got {group_size}")
  if x.shape[0] % group_size:
    raise ValueError(f"batch of {x.shape[0]} rows is not a whole number of groups of {group_size}")
  return x.reshape((x.shape[0] // group_size, group_size) + x.shape[1:])


def _std_normalise(adv_grouped, x_grouped, eps):
  # Unbiased (ddof = 1) group std as in TRL/d1's `scale_rewards`; ε as in ESPO.
  std = jnp.std(x_grouped, axis=1, keepdims=True, ddof=1)
  return adv_grouped / (std + eps)


def group_baseline_advantages(r, group_size: int, normalize_std: bool = False, eps: float = 1e-4):
  """A_i = r_i − mean_{j in group} r_j (GRPO baseline without std division; REFERENCE §3.6, §4).

  r: [B, ...] float → [B, ...] float32. With `normalize_std`, A is divided by (std_G(r) + eps)
  (off by default: the papers here use no std division).
  """
  r = jnp.asarray(r, jnp.float32)
  rg = _grouped(r, group_size)
  adv = rg - rg.mean(axis=1, keepdims=True)
  if normalize_std:
    adv = _std_normalise(adv, rg, eps)
  return adv.reshape(r.shape)


def leave_one_out_advantages(r, group_size: int, normalize_std: bool = False, eps: float = 1e-4):
  """A_i = r_i − mean_{j ≠ i} r_j = G/(G−1) · (r_i − mean_G r) (ESPO, REFERENCE §4).

  r: [B, ...] → [B, ...] float32; needs G ≥ 2.
  """
  if group_size < 2:
    raise ValueError(f"leave-one-out needs group_size ≥ 2, got {group_size}")
  r = jnp.asarray(r, jnp.float32)
  rg = _grouped(r, group_size)
  others = (rg.sum(axis=1, keepdims=True) - rg) / (group_size - 1)
  adv = rg - others
  if normalize_std:
    adv = _std_normalise(adv, rg, eps)
  return adv.reshape(r.shape)


def stepwise_advantages(r_final, values, group_size: int, lam: float, valid=None, *,
                        steps=None, num_steps: int | None = None,
                        lambda_schedule: str = "constant", normalize_returns: bool = True,
                        baseline: str = "returns"):
  """EGSPO-SA advantages per selected step (REFERENCE §3.6). λ = 0 is plain EGSPO.

  r_final: [B] final rewards; values: [B, K] one-step values V(s_t) of the selected steps;
  valid: optional [B, K] bool. Returns A [B, K] float32 (0 at invalid slots).

  Default (REFERENCE §3.6, `baseline="returns"`):
      stepwise_adv_t = r_final − V(s_t)
      R_t = (r_final + λ_t · stepwise_adv_t) / (1 + λ_t)        (no division if not normalize_returns)
      A_t = R_t − mean_G(R_t)                                     per selected-step column
  so λ = 0 gives A = r − mean_G(r) in every column.

  Variant flags:
    lambda_schedule="linear": λ_t = λ · t / T with t the selected step (`steps` [B, K] and
      `num_steps` needed). This project's own variant: the released trainer
      (`vishnutez/egspo-dllm-rl`, `egspo_trainer.py` lines 910–918) uses one constant `lambda1`
      for every step, halved every `lambda1_update_steps` optimizer steps only with
      `dynamic_lambda1` (`halved_lambda`).
    normalize_returns=False: no division by (1 + λ_t) (the release's `normalize_returns`,
      lines 919–921, default False there; its `train.sh` sets True).
    baseline="standard_grpo": A_t = (r − mean_G r + λ_t · stepwise_adv_t) / (1 + λ_t), i.e. the
      group baseline only on the final reward and the stepwise term added uncentred (the
      release's `standard_grpo_returns`, lines 915–916 and 962–969).

  Invalid slots (adaptive-K padding) enter the column mean as if V(s_t) = r_final (no stepwise
  signal, R_t = r_final), which keeps λ = 0 exactly equal to r − mean_G(r); their output is 0.
  """
  if lambda_schedule not in LAMBDA_SCHEDULES:
    raise ValueError(f"unknown lambda_schedule {lambda_schedule!r}; choose one of {LAMBDA_SCHEDULES}")
  if baseline not in BASELINES:
    raise ValueError(f"unknown baseline {baseline!r}; choose one of {BASELINES}")
  chex.assert_rank([r_final, values], [1, 2])
  chex.assert_equal_shape_prefix([r_final, values], 1)
  for x in (valid, steps):
    if x is not None:
      chex.assert_equal_shape([values, x])
  r_final = jnp.asarray(r_final, jnp.float32)
  values = jnp.asarray(values, jnp.float32)
  valid = jnp.ones(values.shape, bool) if valid is None else jnp.asarray(valid, bool)
  if lambda_schedule == "linear":
    if steps is None or num_steps is None:
      raise ValueError("lambda_schedule='linear' needs steps [B, K] and num_steps")
    lam_t = lam * jnp.asarray(steps, jnp.float32) / num_steps
  else:
    lam_t = jnp.full(values.shape, lam, jnp.float32)

  r = r_final[:, None]
  stepwise = jnp.where(valid, r - values, 0.0)
  norm = (1.0 + lam_t) if normalize_returns else 1.0
  if baseline == "returns":
    returns = (r + lam_t * stepwise) / norm
    adv = group_baseline_advantages(returns, group_size)
  else:
    adv = (group_baseline_advantages(r, group_size) + lam_t * stepwise) / norm
  return jnp.where(valid, adv, 0.0)


def halved_lambda(lam: float, step: int, every: int, updates_per_rollout: int) -> float:
  """λ under the release's `dynamic_lambda1` (`egspo_trainer.py` lines 910–912).

  The release halves `lambda1` in place at every rollout whose optimizer step
  (`state.global_step`) is a multiple of `every` (`lambda1_update_steps`), step 0 included, before
  computing that rollout's returns. With rollouts every `updates_per_rollout` (P) optimizer steps,
  the rollouts at or before `step` that halve are those at multiples of lcm(every, P), so
  λ = lam · 2^−(⌊step / lcm(every, P)⌋ + 1): a function of the step, whatever was resumed.
  """
  if every < 1 or updates_per_rollout < 1:
    raise ValueError(f"every={every} and updates_per_rollout={updates_per_rollout} must be >= 1")
  period = every * updates_per_rollout // math.gcd(every, updates_per_rollout)
  return float(lam) * 0.5 ** (int(step) // period + 1)
