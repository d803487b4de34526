"""The registry of RL algorithms: one rollout in, optimizer-step batches and a loss out.

An algorithm is a class registered by name (`--config.algorithm=NAME`) with two methods:

  plan(params, frozen, it) -> (batches, metrics)
      Host-side and jitted no-grad work on one iteration's rollout: step selection, values,
      advantages, old/reference log-likelihoods. Returns the list of optimizer-step batches;
      each is a pytree of arrays with a leading micro-batch axis [A, b, ...].
  loss(model, micro_batch, key) -> (loss_sum, denom, metrics)
      A pure function of arrays, differentiated by `egspo.rl.update.make_update_step`.

A new method is one registered class and a config; the training loop does not change.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from egspo.diffusion.rollout import Rollout
from egspo.rl import advantages as adv_lib
from egspo.rl import losses as loss_lib
from egspo.rl import selection as sel_lib
from egspo.rl import update as update_lib
from egspo.rl import value as value_lib

_REGISTRY: dict[str, type] = {}


def register(*names: str):
  def deco(cls):
    for n in names:
      _REGISTRY[n] = cls
    return cls

  return deco


def get_algorithm(name: str):
  if name not in _REGISTRY:
    raise ValueError(f"unknown algorithm {name!r}; registered: {sorted(_REGISTRY)}")
  return _REGISTRY[name]


def registered() -> list[str]:
  return sorted(_REGISTRY)


@dataclasses.dataclass
class Iteration:
  """One RL iteration's rollout and rewards (B = num_prompts × G completions, groups contiguous)."""

  rollout: Rollout
  rewards: np.ndarray  # [B] float32
  examples: list  # [B] task examples (each prompt's example repeated G times)
  key: jax.Array


@dataclasses.dataclass
class Context:
  """What algorithms need from the trainer."""

  config: Any  # the experiment ConfigDict
  policy: update_lib.Policy
  ref_params: Any  # frozen reference policy's trainable part (see update.reference_params)
  mask_token_id: int
  max_commit: int  # the most tokens one sampler step commits
  reward_fn: Callable[[list, list], np.ndarray]  # (texts, examples) -> [B]
  decode_fn: Callable[[np.ndarray], list]  # completion tokens [N, G] -> texts (cut at EOS)
  to_host: Callable[[Any], np.ndarray] = np.asarray  # a (multi-host) array → full numpy array


def _split_micro(tree, micro_batch_size: int):
  """[B, ...] leaves → [B / m, m, ...]."""

  def f(x):
    b = x.shape[0]
    if b % micro_batch_size:
      raise ValueError(f"batch {b} is not divisible by micro_batch_size {micro_batch_size}")
    return x.reshape((b // micro_batch_size, micro_batch_size) + x.shape[1:])

  return jax.tree.map(f, tree)


@register("egspo", "egspo_sa")
class EGSPO:
  """EGSPO / EGSPO-SA (REFERENCE §3): entropy-guided step selection, per-step clipped surrogate
  with k3 KL, stepwise advantages from the one-step value (λ > 0, EGSPO-SA)."""

  def __init__(self, ctx: Context):
    self.ctx = ctx
    c = ctx.config
    self.k = c.egspo.num_selected_steps
    self.lam = 0.0 if c.algorithm == "egspo" else float(c.egspo.lam)
    self.group_size = c.batch.group_size
    self.micro = c.batch.micro_batch_size
    self._ref_logps = jax.jit(self._ref_logps_impl)

  def _ref_logps_impl(self, ref_params, frozen, batch):
    """log π_ref(a_t|s_t) for all B×K selected states, scanned over micro-batches."""
    model = self.ctx.policy.model(ref_params, frozen)

    def one(mb):
      return update_lib.step_logprobs(model, mb["prompt_ids"], mb["prompt_mask"], mb["tokens"],
                                      mb["commit_step"], mb["steps"],
                                      mask_token_id=self.ctx.mask_token_id,
                                      max_commit=self.ctx.max_commit)

    micro = _split_micro(batch, self.micro)
    out = jax.lax.map(one, micro)
    return out.reshape((-1,) + out.shape[2:])

  def plan(self, params, frozen, it: Iteration):
    del params  # the rollout-time log-probs are π_old; no forward needed
    c = self.ctx.config
    ro = it.rollout
    steps, valid = sel_lib.select_steps(
        c.egspo.selection, k=self.k, num_steps=ro.num_steps, step_entropy=ro.step_entropy,
        key=jax.random.fold_in(it.key, 1), alpha=c.egspo.adaptive_alpha)
    metrics = {}
    rewards = np.asarray(it.rewards, np.float32)
    if self.lam > 0:
      guesses = self.ctx.to_host(value_lib.one_step_guesses(ro.x0_hat, steps))
      values, _, value_metrics = value_lib.one_step_values(
          guesses, self.ctx.reward_fn, self.ctx.decode_fn, it.examples,
          valid=self.ctx.to_host(valid))
      adv = adv_lib.stepwise_advantages(jnp.asarray(rewards), jnp.asarray(values),
                                        self.group_size, self.lam, valid=valid)
      metrics.update(value_metrics)
      metrics["value/mean"] = float(np.mean(values))
    else:
      a = adv_lib.group_baseline_advantages(jnp.asarray(rewards), self.group_size)
      adv = jnp.broadcast_to(a[:, None], steps.shape)
    batch = dict(prompt_ids=ro.prompt_ids, prompt_mask=ro.prompt_mask, tokens=ro.tokens,
                 commit_step=ro.commit_step, steps=steps, valid=valid,
                 adv=jnp.asarray(adv, jnp.float32),
                 # π_old = the rollout's own log-probs: no forward needed (REFERENCE §3.1).
                 logp_old=loss_lib.gather_step_logprobs(ro.logprob, ro.commit_step, steps))
    batch["logp_ref"] = self._ref_logps(self.ctx.ref_params, frozen, batch)
    metrics["selected_step_mean"] = float(jnp.mean(steps))
    metrics["adv_abs_mean"] = float(jnp.mean(jnp.abs(batch["adv"])))  # scalars: all hosts agree
    if c.train.update_schedule == "per_step":
      # The reference schedule: K optimizer steps, the k-th trains each sample's k-th selected step.
      per_k = [{**batch, **{n: batch[n][:, j:j + 1] for n in
                            ("steps", "valid", "adv", "logp_old", "logp_ref")}}
               for j in range(steps.shape[1])]
      return [_split_micro(b, self.micro) for b in per_k], metrics
    return [_split_micro(batch, self.micro)], metrics

  def loss(self, model, mb, key):
    del key
    c = self.ctx.config
    logp = update_lib.step_logprobs(model, mb["prompt_ids"], mb["prompt_mask"], mb["tokens"],
                                    mb["commit_step"], mb["steps"],
                                    mask_token_id=self.ctx.mask_token_id,
                                    max_commit=self.ctx.max_commit)
    return loss_lib.egspo_step_loss(logp, mb["logp_old"], mb["adv"], mb["valid"], mb["logp_ref"],
                                    epsilon=c.loss.eps, epsilon_high=c.loss.eps_high,
                                    beta=c.loss.beta)


# The baselines register themselves (diffu_grpo, espo, gdpo, stabledrl, wd1); imported last because
# they build on the names above.
from egspo.rl import baselines as _baselines  # noqa: E402,F401  pylint: disable=wrong-import-position
