"""EGSPO / EGSPO-SA as a registered method (REFERENCE §3); the contract is `egspo.rl.registry`'s."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from egspo.rl import advantages as adv_lib
from egspo.rl import losses as loss_lib
from egspo.rl import selection as sel_lib
from egspo.rl import update as update_lib
from egspo.rl import value as value_lib
from egspo.rl.registry import Context, Iteration, register, split_micro


@register("egspo", "egspo_sa")
class EGSPO:
  """EGSPO / EGSPO-SA (REFERENCE §3): entropy-guided step selection, per-step clipped surrogate
  with k3 KL, stepwise advantages from the one-step value (λ > 0, EGSPO-SA)."""

  @classmethod
  def validate_config(cls, f) -> None:
    """The `egspo` (selection, K, λ) and `loss` (clip, KL) sections."""
    f.choice("egspo.selection", sel_lib.METHODS)
    k = f.integer("egspo.num_selected_steps", 1)
    steps = f.integer("rollout.steps", 1)
    f.require(k <= steps, "egspo.num_selected_steps", k, f"must be <= rollout.steps={steps}")
    f.real("egspo.adaptive_alpha", 0.0, 1.0, lo_open=True)
    f.real("egspo.lam", 0.0)
    f.real("loss.eps", 0.0, 1.0, lo_open=True, hi_open=True)
    f.real("loss.eps_high", 0.0, lo_open=True)
    f.real("loss.beta", 0.0)

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

    micro = split_micro(batch, self.micro)
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
      return [split_micro(b, self.micro) for b in per_k], metrics
    return [split_micro(batch, self.micro)], metrics

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

