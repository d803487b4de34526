"""Exact π_old for rollouts of the cached sampler, and truncated importance weights (issue 15 §2).

With `rollout.cache = prefix | dual` the rollout is sampled by μ, the block-K/V-cache
approximation of the full-attention policy (egspo/diffusion/cache.py): its recorded log-probs,
entropies and x̂0 are μ's. The update's ratio π_θ/π_old needs the full-attention π_old, so after
step selection `old_step_pass` runs one batched full forward over the B×K selected states and
returns log π_old(a_t|s_t) (the update's own `update.step_hidden` + `committed_logprobs`) and,
for the one-step values, the full-attention x̂0(s_t). The remaining mismatch, that a_t was drawn
from μ, is corrected by a truncated importance weight per step,

    w_t = min(π_old(a_t|s_t) / μ(a_t|s_t), C),  C = `rollout.tis_cap`,

a stop-gradient constant multiplying the step's clipped surrogate: token-level TIS of Yao et
al., "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training" (2025,
fengyao.notion.site/off-policy-rl), where the mismatched engines are vLLM (μ) and FSDP (π_old)
and C = 2 (verl's `tis_imp_ratio_cap`). Here an action is a step's committed tokens, so the
ratio is over their summed log-probs. Entropy-guided selection keeps μ's step entropies: full
ones would cost a forward for every one of the T steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from egspo.diffusion import rollout as rollout_lib
from egspo.rl import update as update_lib
from egspo.rl.registry import split_micro

STATE_FIELDS = ("prompt_ids", "prompt_mask", "tokens", "commit_step", "steps")


def one_step_guess(model, hidden, tokens, commit_step, steps, mask_token_id: int):
  """x̂0(s_t) [B, K, G] int32 from the states' hidden [B, K, G, D] (`update.step_hidden`): the
  argmax of the float32 logits (mask token excluded) at every position still masked in x_t,
  committed tokens kept, as the sampler records it. The LM head runs one column k at a time
  ([B, G, V], the memory of one rollout step's logits)."""

  def column(h):  # [B, G, D] → [B, G]
    logits = model.logits(h).astype(jnp.float32)
    logits = logits.at[..., mask_token_id].set(-jnp.inf)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  guess = jnp.moveaxis(jax.lax.map(column, jnp.moveaxis(hidden, 1, 0)), 0, 1)
  comp = rollout_lib.completion_at(tokens[:, None, :], commit_step[:, None, :], steps,
                                   mask_token_id)
  return jnp.where(comp == mask_token_id, guess, comp)


def old_step_pass(policy, micro_batch_size: int, *, mask_token_id: int, max_commit: int,
                  with_x0_hat: bool):
  """A jitted fn(params, frozen, batch) → log π_old(a_t|s_t) [B, K] float32, with `with_x0_hat`
  (log-probs, x̂0(s_t) [B, K, G] int32): one full-attention forward per selected state, scanned
  over micro-batches of the batch's `STATE_FIELDS` (steps [B, K])."""

  def run(params, frozen, batch):
    model = policy.model(params, frozen)

    def one(mb):
      args = (mb["tokens"], mb["commit_step"], mb["steps"])
      hidden = update_lib.step_hidden(model, mb["prompt_ids"], mb["prompt_mask"], *args,
                                      mask_token_id=mask_token_id)
      logp = update_lib.committed_logprobs(model, hidden, *args, max_commit=max_commit)
      if not with_x0_hat:
        return logp
      return logp, one_step_guess(model, hidden, *args, mask_token_id)

    out = jax.lax.map(one, split_micro({n: batch[n] for n in STATE_FIELDS}, micro_batch_size))
    return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), out)

  return jax.jit(run)


def truncated_weights(logp_old, logp_mu, cap: float, valid=None):
  """Truncated importance weights of the sampled actions and their diagnostics.

  logp_old, logp_mu: [B, K] step log-probs of the same actions under π_old (full attention) and
  μ (the cached sampler); valid: optional [B, K] bool. Returns (w [B, K] float32 =
  min(exp(logp_old − logp_mu), cap), 1 at invalid slots; metrics over the valid slots:
    tis/logp_gap     mean |logp_mu − logp_old|
    tis/capped_frac  fraction with π_old/μ > cap (the cap binds)
    tis/weight_mean  mean w).
  """
  valid = jnp.ones(jnp.shape(logp_old), bool) if valid is None else jnp.asarray(valid, bool)
  delta = jnp.where(valid, jnp.asarray(logp_old, jnp.float32) - logp_mu, 0.0)
  ratio = jnp.exp(delta)  # may overflow to inf: then capped
  w = jnp.where(valid, jnp.minimum(ratio, jnp.float32(cap)), 1.0)
  n = jnp.maximum(valid.sum(), 1).astype(jnp.float32)

  def mean(x):
    return jnp.sum(jnp.where(valid, x, 0.0)) / n

  metrics = {"tis/logp_gap": mean(jnp.abs(delta)),
             "tis/capped_frac": mean((ratio > cap).astype(jnp.float32)),
             "tis/weight_mean": mean(w)}
  return jax.lax.stop_gradient(w), metrics
