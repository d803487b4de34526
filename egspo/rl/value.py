"""The one-step value estimator V(s_t) ≈ r(x̂0(s_t), q) (REFERENCE §3.1, §3.5).

x̂0(s_t) is the sampler's one-step denoised guess of the completion from state x_t (argmax at every
still-masked position, committed tokens kept), recorded in the rollout as `x0_hat` [B, T, G]. The
value costs no forward pass: a gather on device (`one_step_guesses`) and one batched reward call
on the host (`one_step_values`), where identical guesses are scored once.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def one_step_guesses(x0_hat, steps):
  """Gather x̂0(s_t) at the selected steps: x0_hat [B, T, G], steps [B, K] int → [B, K, G].

  vmapped over samples: row b takes x0_hat[b, steps[b, k]] for each k.
  """
  chex.assert_rank(x0_hat, 3)
  chex.assert_rank(steps, 2)
  chex.assert_equal_shape_prefix([x0_hat, steps], 1)
  chex.assert_type(steps, int)
  return jax.vmap(lambda x, s: jnp.take(x, s, axis=0))(x0_hat, steps)


def one_step_values(guesses, reward_fn: Callable[[list, list], Any],
                    decode_fn: Callable[[np.ndarray], Sequence[str]], examples: Sequence[Any],
                    valid=None, final_tokens=None):
  """Score every one-step guess with the task reward in one batched call (REFERENCE §3.5).

  guesses: [B, K, G] int (host or device array); examples: length-B sequence, the task example
  of each row; valid: optional [B, K] bool (invalid slots are not scored; their value is 0);
  final_tokens: optional [B, G] int, the final completions, scored in the same call so that
  r_final and V come from one reward batch.
  decode_fn(ids [N, G] int np) → N texts; reward_fn(texts, examples) → N rewards.

  Guesses are deduplicated per (example object, token sequence): consecutive steps often have the
  same x̂0, and the final completion often equals the last guesses, so each distinct pair is
  decoded and scored once.

  Returns (values [B, K] float32 np, final_rewards [B] float32 np or None, metrics) with
  metrics = {"value/unique_evals": distinct (example, sequence) pairs scored,
             "value/requested_evals": slots that asked for a reward}.
  """
  guesses = np.asarray(guesses)
  if guesses.ndim != 3:
    raise ValueError(f"guesses must be [B, K, G], got shape {guesses.shape}")
  b, k, g = guesses.shape
  if len(examples) != b:
    raise ValueError(f"examples has {len(examples)} entries for B={b} rows of guesses")
  valid = np.ones((b, k), bool) if valid is None else np.asarray(valid, bool)
  if valid.shape != (b, k):
    raise ValueError(f"valid must be [B, K]={b, k}, got {valid.shape}")
  if final_tokens is not None:
    final_tokens = np.asarray(final_tokens)
    if final_tokens.shape != (b, g):
      raise ValueError(f"final_tokens must be [B, G]={b, g}, got {final_tokens.shape}")

  # Slot (row, column) → index into the unique list; column k = K is the final completion.
  unique: dict[tuple, int] = {}
  rows: list[np.ndarray] = []
  row_examples: list[Any] = []
  slot_index = np.full((b, k + 1), -1, np.int64)

  def _add(i, j, seq):
    # id(): examples repeated G times for a group are usually the same object; distinct but
    # equal objects only lose some deduplication, never correctness.
    key = (id(examples[i]), seq.tobytes())
    if key not in unique:
      unique[key] = len(rows)
      rows.append(seq)
      row_examples.append(examples[i])
    slot_index[i, j] = unique[key]

  for i in range(b):
    for j in range(k):
      if valid[i, j]:
        _add(i, j, guesses[i, j])
    if final_tokens is not None:
      _add(i, k, final_tokens[i])

  if rows:
    texts = list(decode_fn(np.stack(rows)))
    if len(texts) != len(rows):
      raise ValueError(f"decode_fn returned {len(texts)} texts for {len(rows)} sequences")
    scores = np.asarray(reward_fn(texts, row_examples), np.float32).reshape(-1)
    if scores.shape[0] != len(rows):
      raise ValueError(f"reward_fn returned {scores.shape[0]} rewards for {len(rows)} completions")
  else:
    scores = np.zeros((0,), np.float32)

  gathered = np.where(slot_index >= 0, scores[np.maximum(slot_index, 0)] if len(scores) else 0.0,
                      0.0).astype(np.float32)
  values = gathered[:, :k]
  final_rewards = gathered[:, k] if final_tokens is not None else None
  metrics = {"value/unique_evals": len(rows),
             "value/requested_evals": int(valid.sum()) + (b if final_tokens is not None else 0)}
  return values, final_rewards, metrics


def require_step_reward_fn(step_reward_fn):
  """The reward of the one-step guesses under `egspo.correctness_step_reward_only`: the task's
  correctness term (`Context.step_reward_fn`, i.e. `Task.correctness_rewards`).

  The release (`egspo_trainer.py` lines 887–897) weights the rewards of the intermediate steps'
  guesses by its last reward function alone (weight 1, the correctness term) and the final
  completion's by all of them; here r_final is the task reward as always and V(s_t) is scored
  with this function. Raises ValueError when the trainer gave none.
  """
  if step_reward_fn is None:
    raise ValueError("egspo.correctness_step_reward_only needs the task's correctness reward "
                     "(registry.Context.step_reward_fn, Task.correctness_rewards)")
  return step_reward_fn
