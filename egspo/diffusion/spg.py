"""SPG's sandwiched likelihood bound as StableDRL releases it (REFERENCE §4, SPG / StableDRL).

StableDRL's released loss (`networks/llada_svpo.py` of JianyuanZhong/StableDRL) trains on SPG's
per-sample bound, not on a plain ELBO:

    L_i = ELBO_i                                   if A_i > 0
          ω · EUBO_i + (1 − ω) · ELBO_i            otherwise          (`logp_estimation='mix'`)

with both terms from the same `num_t` mask draws of SPG's `block_random` forward process
(`forward_process_spg`), and ω = `spg_omega` 0.5, β = `spg_beta` 1.5 in its configs. Per draw j:

    ELBO_j = mean over masked valid completion tokens of log p_θ(y_i | y_masked)
    t_j    = (masked valid tokens) / (valid tokens)
    ELBO   = mean_j ELBO_j
    EUBO   = (1/β) · mean over tokens with a_i > 0 of log a_i,
             a_i = mean_j p_θ(y_i | y_masked_j)^β · 1[i masked in j] / t_j

("valid" = the completion through its first EOS, `completion_mask`). Everything here is a pure
function of arrays and an explicit key, so current and old policies see the same masks when given
the same key.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def block_random_masks(key, prompt_mask, completion_valid, *, block_length: int, num_t: int,
                       p_mask_prompt: float):
  """SPG's `block_random` forward process (`forward_process_spg`, min_t 0, max_t 1).

  prompt_mask [N, P] bool (real prompt tokens), completion_valid [N, L] bool (the completion
  through its first EOS). Per row and draw: a block b among the valid completion's blocks (the
  release takes entry j of a random permutation of all L/block_length blocks, modulo the valid
  count, so draws of one row differ where they can); in the completion, blocks before b keep each
  token with probability 1 − p_mask_prompt, block b masks a uniformly random subset of
  m ~ U{1 … its valid length} of its valid tokens, blocks after b and every position past the
  valid completion are masked; each real prompt token is masked with probability p_mask_prompt
  (the release also masks padding, which it attends; here padding is never attended or masked).
  Returns (prompt_masked [num_t, N, P] bool, completion_masked [num_t, N, L] bool).
  """
  chex.assert_rank([prompt_mask, completion_valid], 2)
  chex.assert_equal_shape_prefix([prompt_mask, completion_valid], 1)
  n, l = completion_valid.shape
  if l % block_length:
    raise ValueError(f"completion length {l} is not a multiple of block_length={block_length}")
  num_blocks = l // block_length
  if not 1 <= num_t <= num_blocks:
    raise ValueError(f"num_t={num_t} draws: need 1 <= num_t <= the {num_blocks} blocks of the "
                     "completion (the release takes them from one permutation of the blocks)")
  k_perm, k_count, k_order, k_prompt, k_before = jax.random.split(key, 5)
  valid = completion_valid.astype(bool)
  length = valid.sum(-1)  # [N] valid completion length (≥ 1 whenever an EOS or token exists)
  valid_blocks = jnp.maximum((length - 1) // block_length + 1, 1)  # [N]

  # Entry j of a random permutation of the blocks, modulo the valid block count: [num_t, N].
  perm = jnp.argsort(jax.random.uniform(k_perm, (n, num_blocks)), axis=-1)
  chosen = (perm[:, :num_t] % valid_blocks[:, None]).T

  pos = jnp.arange(l)
  block_of = pos // block_length  # [L]
  start = chosen * block_length  # [num_t, N]
  in_block = block_of[None, None, :] == chosen[..., None]  # [num_t, N, L]
  # Valid tokens of the chosen block; m ~ U{1 … count} of them, a uniformly random subset.
  block_valid = in_block & valid[None]
  count = jnp.maximum(jnp.minimum(block_length, length[None] - start), 1)  # [num_t, N]
  m = jnp.floor(jax.random.uniform(k_count, count.shape) * count).astype(jnp.int32) + 1
  scores = jnp.where(block_valid, jax.random.uniform(k_order, block_valid.shape), 2.0)
  rank = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)  # rank among the block's tokens
  masked_block = block_valid & (rank < m[..., None])
  later = block_of[None, None, :] > chosen[..., None]
  before = block_of[None, None, :] < chosen[..., None]
  noise_before = jax.random.uniform(k_before, (num_t, n, l)) < p_mask_prompt
  completion_masked = masked_block | later | (before & noise_before) | ~valid[None]
  prompt_masked = ((jax.random.uniform(k_prompt, (num_t,) + prompt_mask.shape) < p_mask_prompt)
                   & prompt_mask.astype(bool)[None])
  return prompt_masked, completion_masked


def draw_logprobs(logits_fn, prompt_ids, prompt_mask, completion_ids, prompt_masked,
                  completion_masked, mask_token_id: int):
  """log p_θ(y_i | canvas of draw j) at every completion position: [num_t, N, L] float32.

  One batched forward over the num_t·N noisy canvases; `logits_fn(ids, attention_mask)` returns
  logits whose last L positions are the completion's (as the estimators of `masking`).
  """
  d, n, l = completion_masked.shape
  pids = jnp.where(prompt_masked, mask_token_id, prompt_ids[None]).reshape(d * n, -1)
  comp = jnp.where(completion_masked, mask_token_id, completion_ids[None]).reshape(d * n, l)
  attn = jnp.concatenate([jnp.broadcast_to(prompt_mask.astype(bool)[None], prompt_masked.shape)
                          .reshape(d * n, -1), jnp.ones((d * n, l), bool)], axis=-1)
  ids = jnp.concatenate([pids, comp.astype(pids.dtype)], axis=-1)
  logits = logits_fn(ids, attn)[:, -l:, :].astype(jnp.float32)
  tgt = jnp.broadcast_to(completion_ids[None], (d, n, l)).reshape(d * n, l)
  picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
  return (picked - jax.nn.logsumexp(logits, axis=-1)).reshape(d, n, l)


def bound_terms(token_logp, completion_masked, completion_valid, eubo_beta: float = 1.5):
  """(ELBO [N], EUBO [N]) of `_get_per_seq_logps_spg` from per-draw token log-probs.

  token_logp [num_t, N, L]; completion_masked [num_t, N, L] bool; completion_valid [N, L] bool.
  ELBO: per draw the mean log-prob over masked valid tokens (a draw masking none counts 0), then
  the mean over draws. EUBO: (1/β) · the mean of log a_i over tokens with a_i > 0, a_i = mean_j
  exp(β log p_ij) · 1[masked] / t_j, t_j the draw's masked fraction of the valid tokens; computed
  in log space (the release exponentiates p^β). A row with no masked valid token gets EUBO 0.
  """
  chex.assert_rank([token_logp, completion_masked, completion_valid], [3, 3, 2])
  chex.assert_equal_shape([token_logp, completion_masked])
  d = token_logp.shape[0]
  hit = completion_masked.astype(bool) & completion_valid.astype(bool)[None]  # [D, N, L]
  lp = token_logp.astype(jnp.float32)
  n_hit = hit.sum(-1).astype(jnp.float32)  # [D, N]
  elbo = (jnp.sum(jnp.where(hit, lp, 0.0), -1) / jnp.maximum(n_hit, 1e-8)).mean(0)
  n_valid = jnp.maximum(completion_valid.sum(-1).astype(jnp.float32), 1e-8)  # [N]
  log_t = jnp.log(jnp.maximum(n_hit / n_valid[None], 1e-8))  # [D, N]
  terms = jnp.where(hit, eubo_beta * lp - log_t[..., None], -jnp.inf)
  log_a = jax.nn.logsumexp(terms, axis=0) - jnp.log(jnp.float32(d))  # [N, L]
  any_hit = hit.any(0)
  per_row = jnp.sum(jnp.where(any_hit, log_a, 0.0), -1) / jnp.maximum(any_hit.sum(-1), 1)
  return elbo, per_row / eubo_beta


def sandwich(elbo, eubo, adv, mix_weight: float = 0.5):
  """SPG's per-sample bound: ELBO where A > 0, ω·EUBO + (1 − ω)·ELBO elsewhere (A = 0 included,
  as the release's `reward_mask = advantages > 0`). All [N]."""
  chex.assert_equal_shape([elbo, eubo, adv])
  return jnp.where(adv > 0, elbo, mix_weight * eubo + (1.0 - mix_weight) * elbo)


def spg_estimate(logits_fn, key, prompt_ids, prompt_mask, completion_ids, completion_valid, *,
                 mask_token_id: int, block_length: int, num_t: int = 2,
                 p_mask_prompt: float = 0.15, eubo_beta: float = 1.5):
  """[N, 2] float32: (ELBO, EUBO) of each row under `num_t` block-random draws from `key`."""
  pm, cm = block_random_masks(key, prompt_mask, completion_valid, block_length=block_length,
                              num_t=num_t, p_mask_prompt=p_mask_prompt)
  lp = draw_logprobs(logits_fn, prompt_ids, prompt_mask, completion_ids, pm, cm, mask_token_id)
  elbo, eubo = bound_terms(lp, cm, completion_valid, eubo_beta)
  return jnp.stack([elbo, eubo], axis=-1)
