"""The rollout record: what one sampled denoising trajectory leaves for RL (REFERENCE §3.1).

Step convention. A trajectory has T = `steps` denoising steps, t = 0 … T-1. The state the sampler
sees when it runs step t is

    x_t = prompt ++ where(commit_step < t, tokens, MASK)          (x_0 = all masked)

and the action of step t is the set of completion positions with `commit_step == t`, which it
commits to `tokens`. So every intermediate state is rebuilt exactly from (`tokens`,
`commit_step`): no [T, L] canvas history is stored.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Rollout:
  """A batch of B denoising trajectories with prompt length P, completion length G, T steps.

  Attributes:
    prompt_ids:   [B, P] int32, left-padded prompt tokens.
    prompt_mask:  [B, P] bool, True at real prompt tokens.
    tokens:       [B, G] int32, the final completion (every position committed once).
    commit_step:  [B, G] int32 in [0, T): the step at which each completion position was committed.
    logprob:      [B, G] float32, rollout-time log softmax(logits)[token] at its commit step
                  (untempered logits, whatever the sampling temperature).
    entropy:      [B, G] float32, −Σ_v p log(p + 1e-8) of the untempered distribution at the
                  position at its commit step.
    step_entropy: [B, T] float32, H_t = mean of `entropy` over the positions committed at step t.
    x0_hat:       [B, T, G] int32, one-step denoised guess of the completion from state x_t:
                  argmax of the untempered logits at every still-masked position, committed
                  tokens kept (REFERENCE §3.1, used by the one-step value V(s_t)).
  """

  prompt_ids: jax.Array
  prompt_mask: jax.Array
  tokens: jax.Array
  commit_step: jax.Array
  logprob: jax.Array
  entropy: jax.Array
  step_entropy: jax.Array
  x0_hat: jax.Array

  @property
  def num_steps(self) -> int:
    return self.step_entropy.shape[-1]

  @property
  def gen_length(self) -> int:
    return self.tokens.shape[-1]


def completion_at(tokens, commit_step, t, mask_token_id: int):
  """Completion part of state x_t: tokens committed before step t, MASK elsewhere.

  tokens, commit_step: [..., G]; t: int or int array broadcastable to [...] → [..., G].
  """
  t = jnp.asarray(t)[..., None]
  return jnp.where(commit_step < t, tokens, mask_token_id)


def action_mask(commit_step, t):
  """[..., G] bool: the completion positions committed at step t (the action a_t)."""
  return commit_step == jnp.asarray(t)[..., None]


def canvas_at(rollout: Rollout, steps, mask_token_id: int):
  """States x_t for selected steps: steps [B, K] int → (ids [B, K, P+G], attention mask [B, K, P+G])."""
  comp = completion_at(rollout.tokens[:, None, :], rollout.commit_step[:, None, :], steps,
                       mask_token_id)  # [B, K, G]
  b, k = steps.shape
  prompt = jnp.broadcast_to(rollout.prompt_ids[:, None, :], (b, k, rollout.prompt_ids.shape[-1]))
  pmask = jnp.broadcast_to(rollout.prompt_mask[:, None, :], prompt.shape)
  ids = jnp.concatenate([prompt, comp.astype(prompt.dtype)], axis=-1)
  mask = jnp.concatenate([pmask, jnp.ones(comp.shape, bool)], axis=-1)
  return ids, mask
