"""The released trainer's per-step log-probability variants (`egspo.pred_state`, `loss.use_exact_kl`).

`egspo.rl.update.step_logprobs` is the default step log-probability: log π(a_t | s_t) summed over
the tokens committed at step t (REFERENCE §3.4; the release's `pred_state='next'`). The released
trainer (`vishnutez/egspo-dllm-rl`, `egspo/egspo_trainer.py` `_get_per_token_logps_unbiased`,
lines 509–516) has a second target, and its loss (`compute_loss`, lines 106–136) a second KL:

  pred_state='final'  the positions still masked in x_t (`curr_state != final_state`), each
                      predicted as its final token: Σ_{g: commit_step ≥ t} log p_θ(y_g | x_t).
                      The release never records these under π_old (its old log-probs are the
                      committed tokens', lines 761–768, and its `all_tokens_logps` buffer is sized
                      for the committed tokens, so the path stops with a shape error); here π_old
                      is recomputed by a no-grad forward of the rollout policy (`no_grad_pass`).
  use_exact_kl        KL(π_θ ‖ π_ref) over the full vocabulary at the step's committed positions,
                      summed over them (`exact_kl`, line 111, `sum` aggregation), in place of k3
                      of the step log-probs. The release takes log(softmax + 1e-10); here the
                      exact log_softmax.

Shapes: prompt_ids, prompt_mask [B, P]; tokens, commit_step [B, G]; steps [B, K].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from egspo.diffusion import rollout as rollout_lib
from egspo.rl import update as update_lib
from egspo.rl.registry import split_micro

PRED_STATES = ("next", "final")


def step_positions(commit_step, steps, pred_state: str, max_commit: int):
  """(idx [B, K, M] int32, valid [B, K, M] bool): the positions step t's log-prob sums over.

  'next': the M = max_commit positions committed at t (`update.committed_positions`);
  'final': every completion position (M = G), valid where still masked in x_t (commit ≥ t).
  """
  if pred_state == "next":
    return update_lib.committed_positions(commit_step, steps, max_commit)
  if pred_state != "final":
    raise ValueError(f"pred_state must be one of {PRED_STATES}, got {pred_state!r}")
  b, k = steps.shape
  g = commit_step.shape[-1]
  idx = jnp.broadcast_to(jnp.arange(g, dtype=jnp.int32), (b, k, g))
  return idx, commit_step[:, None, :] >= steps[:, :, None]


def step_forward(model, prompt_ids, prompt_mask, tokens, commit_step, steps, *,
                 mask_token_id: int, max_commit: int, pred_state: str = "next",
                 with_vocab: bool = False):
  """log π_θ at every selected step under `pred_state`: [B, K] float32; with `with_vocab` also
  (log-probs [B, K, M, V] float32 at the step's positions, their valid mask [B, K, M]).

  All B×K states x_t in one batched forward; the LM head runs only at the M positions.
  """
  b, k = steps.shape
  p, g = prompt_ids.shape[1], tokens.shape[1]
  comp = rollout_lib.completion_at(tokens[:, None, :], commit_step[:, None, :], steps,
                                   mask_token_id)
  ids = jnp.concatenate([jnp.broadcast_to(prompt_ids[:, None], (b, k, p)),
                         comp.astype(prompt_ids.dtype)], axis=-1).reshape(b * k, p + g)
  attn = jnp.concatenate([jnp.broadcast_to(prompt_mask[:, None], (b, k, p)),
                          jnp.ones((b, k, g), bool)], axis=-1).reshape(b * k, p + g)
  hidden = model.hidden_states(ids, attn)[:, p:, :].reshape(b, k, g, -1)
  idx, valid = step_positions(commit_step, steps, pred_state, max_commit)
  h = jnp.take_along_axis(hidden, idx[..., None], axis=2)  # [B, K, M, D]
  logp = jax.nn.log_softmax(model.logits(h).astype(jnp.float32), axis=-1)  # [B, K, M, V]
  tok = jnp.take_along_axis(jnp.broadcast_to(tokens[:, None, :], (b, k, g)), idx, axis=-1)
  tok_logp = jnp.take_along_axis(logp, tok[..., None], axis=-1)[..., 0]
  total = jnp.sum(jnp.where(valid, tok_logp, 0.0), axis=-1)
  return (total, logp, valid) if with_vocab else total


def exact_step_kl(logp_vocab, ref_logp_vocab, valid):
  """Σ over the step's valid positions of KL(π_θ ‖ π_ref) = Σ_v p_θ (log p_θ − log p_ref): [B, K].

  logp_vocab (carries the gradient), ref_logp_vocab: [B, K, M, V] log-probs; valid: [B, K, M].
  """
  kl = jnp.sum(jnp.exp(logp_vocab) * (logp_vocab - jax.lax.stop_gradient(ref_logp_vocab)), -1)
  return jnp.sum(jnp.where(valid, kl, 0.0), axis=-1)


def policy_terms(model, mb, *, mask_token_id: int, max_commit: int, pred_state: str,
                 exact_kl: bool):
  """The loss's (log π_θ [B, K], exact KL [B, K] or None) on a planned micro-batch (its
  prompt_ids, prompt_mask, tokens, commit_step, steps, and `ref_vocab` for the exact KL)."""
  out = step_forward(model, mb["prompt_ids"], mb["prompt_mask"], mb["tokens"], mb["commit_step"],
                     mb["steps"], mask_token_id=mask_token_id, max_commit=max_commit,
                     pred_state=pred_state, with_vocab=exact_kl)
  if not exact_kl:
    return out, None
  logp, vocab, valid = out
  return logp, exact_step_kl(vocab, mb["ref_vocab"], valid)


def no_grad_pass(policy, micro_batch_size: int, *, mask_token_id: int, max_commit: int,
                 pred_state: str, with_vocab: bool):
  """A jitted fn(params, frozen, batch) → step log-probs [B, K] (and, with `with_vocab`, the
  log-probs [B, K, M, V] at the step's positions), scanned over micro-batches of the batch's
  prompt_ids, prompt_mask, tokens, commit_step and steps: π_old under pred_state='final', π_ref
  for the exact KL."""

  def run(params, frozen, batch):
    model = policy.model(params, frozen)

    def one(mb):
      out = step_forward(model, mb["prompt_ids"], mb["prompt_mask"], mb["tokens"],
                         mb["commit_step"], mb["steps"], mask_token_id=mask_token_id,
                         max_commit=max_commit, pred_state=pred_state, with_vocab=with_vocab)
      return out[:2] if with_vocab else out

    fields = ("prompt_ids", "prompt_mask", "tokens", "commit_step", "steps")
    out = jax.lax.map(one, split_micro({n: batch[n] for n in fields}, micro_batch_size))
    return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), out)

  return jax.jit(run)
