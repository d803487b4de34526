"""The released trainer's `terminate_at_last_non_eos`: select steps only up to the last step that
committed a non-EOS token (`egspo.terminate_at_last_non_eos`).

Release (`vishnutez/egspo-dllm-rl`, `egspo/egspo_trainer.py`): `generate` marks a step
EOS-only when every token it commits is `eos_token_id` (line 310) and takes
`last_non_eos_steps = steps − 1 − argmin(flip(is_eos_decoded))` (line 348), the last step that
committed anything else (T − 1 if every step was EOS-only). `_generate_and_score_completions`
(lines 718–737) then selects per sample among steps 0 … last_b:
  high_entropy  top-K of the step entropies of steps 0 … last_b (torch.topk; fewer than K such
                steps stop the release with an error; here the missing slots are invalid);
  uniform       `linspace(0, last_b, K).long()` (here in exact integer arithmetic:
                floor(j · last_b / (K − 1)));
  random        `randint(0, last_b + 1, (K,))`: K draws with replacement, no forced last step, in
                draw order (`replace=False` draws distinct steps instead; slots beyond the
                last_b + 1 steps are invalid).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from egspo.rl import selection as sel_lib


def last_non_eos_steps(tokens, commit_step, eos_id: int, num_steps: int):
  """[B] int32: the last step that committed a token other than `eos_id` (T − 1 if none did).

  tokens, commit_step: [B, G] (the rollout's final tokens and commit steps).
  """
  chex.assert_rank([tokens, commit_step], 2)
  chex.assert_equal_shape([tokens, commit_step])
  t = jnp.arange(num_steps, dtype=jnp.int32)
  non_eos = (commit_step[:, None, :] == t[None, :, None]) & (tokens != eos_id)[:, None, :]
  has = non_eos.any(-1)  # [B, T]
  last = num_steps - 1 - jnp.argmax(has[:, ::-1], axis=-1)
  return jnp.where(has.any(-1), last, num_steps - 1).astype(jnp.int32)


def capped_uniform_steps(last, k: int):
  """Per sample floor(j · last_b / (K − 1)), j = 0 … K − 1 ([0] for K = 1): ([B, K] int32,
  valid all True)."""
  j = jnp.arange(k, dtype=jnp.int32)
  steps = (j[None, :] * last[:, None]) // max(k - 1, 1)
  return steps.astype(jnp.int32), jnp.ones(steps.shape, bool)


def capped_random_steps(key, last, k: int, num_steps: int, replace: bool = True):
  """Per sample K random steps of 0 … last_b, in draw order: with replacement (the release) or
  distinct (then slots beyond the last_b + 1 available steps are invalid). → ([B, K], [B, K])."""
  b = last.shape[0]
  if replace:
    u = jax.random.uniform(key, (b, k))
    steps = jnp.minimum(jnp.floor(u * (last[:, None] + 1)), last[:, None]).astype(jnp.int32)
    return steps, jnp.ones((b, k), bool)
  allowed = jnp.arange(num_steps)[None, :] <= last[:, None]
  scores = jnp.where(allowed, jax.random.uniform(key, (b, num_steps)), -1.0)
  _, idx = jax.lax.top_k(scores, k)
  return idx.astype(jnp.int32), idx <= last[:, None]


def select_capped(method: str, *, k: int, last, num_steps: int, step_entropy=None, key=None,
                  replace: bool = True, order: str = "time", alpha: float = 0.7):
  """`selection.select_steps` restricted per sample to steps 0 … last_b (the release's
  `terminate_at_last_non_eos`). method: entropy | uniform | random (adaptive ranks like entropy).
  → (steps [B, K] int32, valid [B, K] bool); a selected step beyond last_b is never valid."""
  if method not in sel_lib.METHODS:
    raise ValueError(f"unknown step selection method {method!r}; choose one of "
                     f"{sel_lib.METHODS}")
  last = jnp.asarray(last, jnp.int32)
  if method == "uniform":
    return capped_uniform_steps(last, k)
  if method == "random":
    if key is None:
      raise ValueError("method 'random' needs a jax.random key")
    return capped_random_steps(key, last, k, num_steps, replace)
  allowed = jnp.arange(num_steps)[None, :] <= last[:, None]
  steps, valid = sel_lib.select_steps(method, k=k, num_steps=num_steps, alpha=alpha,
                                      step_entropy=step_entropy, step_valid=allowed, order=order)
  return steps, valid & (steps <= last[:, None])
