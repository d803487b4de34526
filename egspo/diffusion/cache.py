"""The block K/V cache of the LLaDA sampler, and the LM head on the positions a step uses.

`SamplerConfig.cache`, after Fast-dLLM (arXiv 2505.22618; NVlabs/Fast-dLLM `llada/generate.py`):
  none    every step runs the whole canvas (prompt ++ completion) through the model;
  prefix  the first step of each block runs the whole canvas and keeps every layer's keys and
          values; the block's other steps run the block and everything after it (the suffix)
          against the kept keys/values of the positions before the block;
  dual    as prefix, but the other steps run the block only: the keys/values of everything
          outside it (prompt, decoded blocks, the masked suffix) are the last refresh's.
The cached positions' tokens do not change within a block, but with bidirectional attention their
keys/values above the first layer depend on the block's tokens: the cached modes sample from an
approximation μ of the full-attention policy, exact for one step per block or a one-layer model.
`cache_refresh` = r refills the cache with a full forward every r steps of a block (0: only at
its first step), trading speed for a closer μ.

Static shapes: one `lax.scan` over the blocks, each a `lax.scan` over its refresh groups of r
steps, each group a full-forward step and a `lax.scan` over the group's other steps. `dual`
runs block_length positions. `prefix` runs block j's window, the block and every later position
(G − j · block_length, shrinking as in Fast-dLLM): its blocks are unrolled, one program per block
(compile time × the number of blocks) instead of one padded window of G for every block, which
ran up to 1.6× the FLOPs at four blocks.

LM head: the commit rule uses the block's logits; the record's x̂0 every still-masked position's.
Without `record_x0_hat` (evaluation) the head runs on the block only. With it: on the completion
at the block start, then on the window (prefix: every masked position's x̂0 is fresh; dual: the
block's is, the suffix keeps the block start's argmax, the cached model's latest guess there).

The record has `sampler.generate`'s fields and step keys (step t uses fold_in(key, t)); its
log-probs and entropies are μ's. Called by `sampler.generate_from_state`, which passes its
commit rule and argmax (this module imports nothing of the sampler).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from egspo.diffusion.rollout import Rollout


def window_length(config, block: int = 0) -> int:
  """Canvas positions a cached step of block `block` runs: the block and every later position
  for 'prefix' (G − block · block_length), block_length for 'dual', 0 for 'none'."""
  if config.cache == "prefix":
    return config.gen_length - block * config.block_length
  return config.block_length if config.cache == "dual" else 0


def generate(graphdef, state, prompt_ids, prompt_mask, key, config, *, commit: Callable,
             greedy: Callable, return_states: bool = False):
  """The sampler over blocks for an NNX LLaDA (graphdef, state). Pure, jittable.

  prompt_ids [B, P] (left-padded), prompt_mask [B, P] bool; config: a `SamplerConfig`.
  commit(completion, block_logits, step, key, config) → (completion, committed, logprob,
  entropy, step_entropy), `sampler.commit_block`; greedy(logits, mask_id): argmax without the
  mask token. Returns a `Rollout` (x0_hat None without `config.record_x0_hat`), with
  `return_states` also the completions before each step, [B, T, G].
  """
  if prompt_ids.ndim != 2 or prompt_mask.shape != prompt_ids.shape:
    raise ValueError(f"prompt_ids [B, P] and prompt_mask of the same shape expected, got "
                     f"{prompt_ids.shape} and {prompt_mask.shape}")
  b, p = prompt_ids.shape
  g, bl, spb = config.gen_length, config.block_length, config.steps_per_block
  spr = config.steps_per_refresh if config.cache != "none" else spb
  mask_id, mode, record = config.mask_token_id, config.cache, config.record_x0_hat
  s = p + g
  prompt_ids = prompt_ids.astype(jnp.int32)
  key_mask = jnp.concatenate([prompt_mask.astype(bool), jnp.ones((b, g), bool)], axis=1)  # [B, S]
  positions = jnp.maximum(jnp.cumsum(key_mask, axis=1) - 1, 0)  # as LLaDA.hidden_states

  def canvas(completion):
    return jnp.concatenate([prompt_ids, completion], axis=1)

  def head(model, hidden):
    return model.logits(hidden).astype(jnp.float32)

  def full_step(st, completion, t):
    """The whole canvas → (block logits [B, bl, V], guess [B, G] or None, kv or None)."""
    model = nnx.merge(graphdef, st)
    ids = canvas(completion)
    if mode == "none":
      hidden, kv = model.hidden_states(ids, key_mask), None
    else:
      hidden, kv = model.hidden_states_kv(ids, positions, key_mask)
    start = (t // spb) * bl  # in the completion
    if record:
      logits = head(model, hidden[:, p:])  # [B, G, V]
      return jax.lax.dynamic_slice_in_dim(logits, start, bl, axis=1), greedy(logits, mask_id), kv
    return head(model, jax.lax.dynamic_slice_in_dim(hidden, p + start, bl, axis=1)), None, kv

  def cached_step(st, kv, guess, completion, t, width):
    """The window (`width` positions from the block's start) against the last refresh's kv →
    (block logits, guess with the window's)."""
    model = nnx.merge(graphdef, st)
    start = (t // spb) * bl
    ids = jax.lax.dynamic_slice_in_dim(canvas(completion), p + start, width, axis=1)
    pos = jax.lax.dynamic_slice_in_dim(positions, p + start, width, axis=1)
    hidden, _ = model.hidden_states_kv(ids, pos, key_mask, kv, p + start)
    if not record:
      return head(model, hidden[:, :bl]), None
    logits = head(model, hidden if mode == "prefix" else hidden[:, :bl])
    fresh = greedy(logits, mask_id)  # [B, width or bl]
    return logits[:, :bl], jax.lax.dynamic_update_slice_in_dim(guess, fresh, start, axis=1)

  def take_step(carry, t, blk_logits, guess):
    """Commits step t and updates the record → (carry, per-step outputs)."""
    completion, commit_step, logprob, entropy, st = carry
    new, committed, lp, ent, h = commit(completion, blk_logits, t, jax.random.fold_in(key, t),
                                        config)
    x0_hat = None if guess is None else jnp.where(completion == mask_id, guess, completion)
    carry = (new, jnp.where(committed, t, commit_step), jnp.where(committed, lp, logprob),
             jnp.where(committed, ent, entropy), st)
    return carry, (h, x0_hat) + ((completion,) if return_states else ())

  def group(carry, t0, width):
    """Steps t0 .. t0 + spr − 1 of one block: a full forward (refilling the cache), then the
    cached steps (windows of `width`) against it."""
    blk_logits, guess, kv = full_step(carry[-1], carry[0], t0)
    carry, first = take_step(carry, t0, blk_logits, guess)

    def step(inner, t):
      carry, kv = inner
      if mode == "none":
        blk_logits, fresh, _ = full_step(carry[-1], carry[0], t)
      else:
        blk_logits, fresh = cached_step(carry[-1], kv, guess, carry[0], t, width)
      carry, ys = take_step(carry, t, blk_logits, fresh)
      return (carry, kv), ys

    (carry, _), rest = jax.lax.scan(step, (carry, kv), t0 + jnp.arange(1, spr, dtype=jnp.int32))
    return carry, jax.tree.map(lambda a, r: jnp.concatenate([a[None], r]), first, rest)

  def block(carry, j, width):
    carry, ys = jax.lax.scan(lambda c, t0: group(c, t0, width), carry,
                             j * spb + spr * jnp.arange(spb // spr, dtype=jnp.int32))
    return carry, jax.tree.map(lambda a: a.reshape((spb,) + a.shape[2:]), ys)

  init = (jnp.full((b, g), mask_id, jnp.int32), jnp.full((b, g), config.steps, jnp.int32),
          jnp.zeros((b, g), jnp.float32), jnp.zeros((b, g), jnp.float32), state)
  if mode == "prefix":  # the window shrinks block by block: one program per block
    carry, per_block = init, []
    for j in range(config.num_blocks):
      carry, ys = block(carry, j, window_length(config, j))
      per_block.append(ys)
    ys = jax.tree.map(lambda *a: jnp.stack(a), *per_block)
  else:
    carry, ys = jax.lax.scan(lambda c, j: block(c, j, window_length(config)), init,
                             jnp.arange(config.num_blocks, dtype=jnp.int32))
  tokens, commit_step, logprob, entropy, _ = carry
  # [num_blocks, steps_per_block, B, ...] → [B, T, ...]
  ys = jax.tree.map(lambda a: jnp.moveaxis(a.reshape((config.steps,) + a.shape[2:]), 0, 1), ys)
  rollout = Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask.astype(bool), tokens=tokens,
                    commit_step=commit_step, logprob=logprob, entropy=entropy,
                    step_entropy=ys[0], x0_hat=ys[1])
  return (rollout, ys[2]) if return_states else rollout
