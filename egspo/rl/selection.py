"""Which denoising steps to train on: step entropy and step selection (REFERENCE §3.2–3.3).

Step convention (see `egspo.diffusion.rollout`): a trajectory has T steps t = 0 … T-1; the action
of step t is the set of completion positions with `commit_step == t`.

Every selector returns `(steps, valid)`:
  steps: [B, K] int32, selected step indices;
  valid: [B, K] bool, False only for padding slots of adaptive-K (all True otherwise).
Column k of `steps` is what the advantage code calls "selected-step column k" (REFERENCE §3.6):
the EGSPO-SA group mean pairs the rows' steps column by column, and the update schedules train
columns. The per-sample selectors (entropy, adaptive) order each row by `order` (`PAIRINGS`):
  entropy_rank  column k holds the row's k-th highest-entropy step (`lax.top_k` order, ties to the
                earlier step; the released trainer's `torch.topk` order; adaptive-K's selected
                slots come first);
  time          ascending step order (column k = the row's k-th earliest selected step).
uniform/random select the same steps in every row, in ascending step order (the pairing is the
same under either order).

Selectors:
  entropy   per sample, the K steps with the largest step entropy H_t (`lax.top_k`; the paper's
            EGSPO default, K = 8);
  uniform   K-1 evenly spaced steps in [0, T-2] plus the last step T-1, the same for every row;
  random    K-1 distinct random steps in [0, T-2] plus T-1, the same for every row;
  adaptive  per sample, the smallest K whose top-K entropies reach a fraction α of the total
            entropy (Ada-EGSPO, α = 0.7), capped at k_max.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("entropy", "uniform", "random", "adaptive")
PAIRINGS = ("entropy_rank", "time")  # column order of the per-sample selectors


def step_entropy(entropy, commit_step, num_steps: int):
  """H_t = mean entropy of the tokens committed at step t (REFERENCE §3.2).

  entropy: [B, G] float, per-position entropy at its commit step; commit_step: [B, G] int in
  [0, T). Returns [B, T] float32. A step that commits no token (possible when a block has fewer
  masked positions than steps) gets H_t = 0; pass `step_counts(...) > 0` as `step_valid` to the
  selectors to rank such steps last.
  """
  chex.assert_rank([entropy, commit_step], 2)
  chex.assert_equal_shape([entropy, commit_step])
  chex.assert_type(commit_step, int)
  onehot = jax.nn.one_hot(commit_step, num_steps, dtype=jnp.float32)  # [B, G, T]
  total = jnp.einsum("bg,bgt->bt", entropy.astype(jnp.float32), onehot)
  count = onehot.sum(axis=1)
  return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


def step_counts(commit_step, num_steps: int):
  """[B, T] int32: the number of completion positions committed at each step."""
  chex.assert_rank(commit_step, 2)
  chex.assert_type(commit_step, int)
  return jax.nn.one_hot(commit_step, num_steps, dtype=jnp.int32).sum(axis=1)


def _check_scores(step_entropy, step_valid):
  """[B, T] float step entropies and an optional [B, T] bool mask of the same shape."""
  chex.assert_rank(step_entropy, 2)
  chex.assert_type(step_entropy, float)
  if step_valid is not None:
    chex.assert_equal_shape([step_entropy, step_valid])
    chex.assert_type(step_valid, bool)


def _check_k(k: int, num_steps: int, name: str = "k"):
  if not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"{name} must be a positive int, got {k!r}")
  if k > num_steps:
    raise ValueError(f"{name}={k} exceeds the number of denoising steps T={num_steps}")


def _ranked_scores(entropy, step_valid):
  """Scores for top-K: entropy, with invalid steps pushed below every valid one."""
  scores = entropy.astype(jnp.float32)
  if step_valid is not None:
    scores = jnp.where(step_valid, scores, -jnp.inf)
  return scores


def _check_order(order: str):
  if order not in PAIRINGS:
    raise ValueError(f"unknown column order (egspo.pairing) {order!r}; choose one of {PAIRINGS}")


def _sort_by_step(steps, *others):
  order = jnp.argsort(steps, axis=-1)
  return (jnp.take_along_axis(steps, order, axis=-1),
          *(jnp.take_along_axis(o, order, axis=-1) for o in others))


@functools.partial(jax.jit, static_argnames=("k", "order"))
def entropy_topk_steps(step_entropy, k: int, step_valid=None, order: str = "time"):
  """Entropy-guided selection: per sample the K steps with the largest H_t (REFERENCE §3.3).

  step_entropy: [B, T]; step_valid: optional [B, T] bool (e.g. steps that commit a token, or the
  reference's `terminate_at_last_non_eos` cap): invalid steps are chosen only after every valid
  one. Ties go to the earlier step (`lax.top_k` keeps the lower index first). `order`: the
  columns by entropy rank ('entropy_rank') or by step ('time'). Returns
  (steps [B, K] int32, valid [B, K] bool all True).
  """
  _check_scores(step_entropy, step_valid)
  _check_k(k, step_entropy.shape[-1])
  _check_order(order)
  _, idx = jax.lax.top_k(_ranked_scores(step_entropy, step_valid), k)
  steps = idx.astype(jnp.int32)
  if order == "time":
    steps = jnp.sort(steps, axis=-1)
  return steps, jnp.ones(steps.shape, bool)


def uniform_steps(num_steps: int, k: int, batch_size: int):
  """K-1 evenly spaced steps floor(j (T-2) / (K-2)), j = 0 … K-2, plus the last step T-1.

  The same steps for every row (REFERENCE §3.3 ablation; the reference trainer's
  `linspace(0, T-2, K-1).long()` + [T-1], computed here in exact integer arithmetic).
  K = T selects every step. Returns (steps [B, K] int32, valid [B, K] bool).
  """
  _check_k(k, num_steps)
  if k == 1:
    base = np.zeros((0,), np.int64)
  elif k == 2:
    base = np.zeros((1,), np.int64)
  else:
    base = (np.arange(k - 1) * (num_steps - 2)) // (k - 2)
  row = np.concatenate([base, [num_steps - 1]]).astype(np.int32)
  steps = jnp.broadcast_to(jnp.asarray(row), (batch_size, k))
  return steps, jnp.ones((batch_size, k), bool)


def random_steps(key, num_steps: int, k: int, batch_size: int, replace: bool = False):
  """K-1 random steps from [0, T-2] plus the last step T-1, the same for every row.

  REFERENCE §3.3 ablation. `replace=False` (default) draws distinct steps; the reference trainer
  draws with replacement (`torch.randint`), so a step can be trained twice: `replace=True`.
  Returns (steps [B, K] int32 ascending, valid [B, K] bool).
  """
  _check_k(k, num_steps)
  base = jax.random.choice(key, max(num_steps - 1, 1), (k - 1,), replace=replace)
  row = jnp.sort(jnp.concatenate([base.astype(jnp.int32),
                                  jnp.full((1,), num_steps - 1, jnp.int32)]))
  return jnp.broadcast_to(row, (batch_size, k)), jnp.ones((batch_size, k), bool)


@functools.partial(jax.jit, static_argnames=("k_max", "order"))
def adaptive_entropy_steps(step_entropy, alpha, k_max: int, step_valid=None,
                           order: str = "time"):
  """Ada-EGSPO: the smallest K_b ≤ k_max whose top-K_b entropies sum to ≥ α · Σ_t H_t.

  REFERENCE §3.3 (α = 0.7). step_entropy: [B, T] (non-negative); step_valid as in
  `entropy_topk_steps` (invalid steps count neither in the total nor in the selection).
  K_b ≥ 1 always (an all-zero row gives K_b = 1). The comparison allows a relative slack of 1e-6
  so that float rounding of the cumulative sum cannot add a step.
  Returns (steps [B, k_max] int32, valid [B, k_max] bool): the k_max highest-entropy steps in
  `order` (by entropy rank: the K_b selected slots first; or by step), `valid` marking the K_b
  that are selected.
  """
  _check_scores(step_entropy, step_valid)
  _check_k(k_max, step_entropy.shape[-1], "k_max")
  _check_order(order)
  scores = _ranked_scores(step_entropy, step_valid)
  top, idx = jax.lax.top_k(scores, k_max)  # [B, k_max], descending
  total = jnp.where(jnp.isfinite(scores), scores, 0.0).sum(-1, keepdims=True)
  cum = jnp.cumsum(jnp.where(jnp.isfinite(top), top, 0.0), axis=-1)
  reached = cum >= alpha * total * (1.0 - 1e-6)
  # First rank at which the fraction is reached (k_max - 1 if never), so K_b = that + 1.
  first = jnp.where(reached.any(-1), jnp.argmax(reached, axis=-1), k_max - 1)
  rank = jnp.arange(k_max)[None, :]
  valid = rank <= first[:, None]
  if step_valid is not None:
    valid = valid & jnp.isfinite(top)
  if order == "entropy_rank":
    return idx.astype(jnp.int32), valid
  return _sort_by_step(idx.astype(jnp.int32), valid)


def select_steps(method: str, *, k: int, num_steps: int, batch_size: int | None = None,
                 step_entropy=None, key=None, alpha: float = 0.7, step_valid=None,
                 replace: bool = False, order: str = "time"):
  """One entry point for the config: `method` in METHODS → (steps [B, K] int32, valid [B, K]).

  entropy/adaptive need `step_entropy` [B, T] (for adaptive `k` is k_max) and order their
  columns by `order` (PAIRINGS); uniform/random need `batch_size` (or `step_entropy` to read it
  from); random needs `key`.
  """
  if method not in METHODS:
    raise ValueError(f"unknown step selection method {method!r}; choose one of {METHODS}")
  _check_order(order)
  if step_entropy is not None:
    if step_entropy.ndim != 2 or step_entropy.shape[-1] != num_steps:
      raise ValueError(f"step_entropy must be [B, T={num_steps}], got {step_entropy.shape}")
    batch_size = step_entropy.shape[0] if batch_size is None else batch_size
  if method == "entropy":
    if step_entropy is None:
      raise ValueError("method 'entropy' needs step_entropy [B, T]")
    return entropy_topk_steps(step_entropy, k, step_valid, order=order)
  if method == "adaptive":
    if step_entropy is None:
      raise ValueError("method 'adaptive' needs step_entropy [B, T]")
    if not 0.0 < alpha <= 1.0:
      raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    return adaptive_entropy_steps(step_entropy, alpha, k, step_valid, order=order)
  if batch_size is None:
    raise ValueError(f"method {method!r} needs batch_size (or step_entropy)")
  if method == "uniform":
    return uniform_steps(num_steps, k, batch_size)
  if key is None:
    raise ValueError("method 'random' needs a jax.random key")
  return random_steps(key, num_steps, k, batch_size, replace=replace)
