"""The sharded policy-gradient update and the batched per-step log-probabilities it needs.

Parameters are handled functionally: `nnx.split` turns the policy into a graph definition, the
*trainable* state (all `nnx.Param`s, or only `nnx.LoRAParam`s for LoRA) and the *frozen* rest.
`update_step` is one `jax.jit` with `in_shardings`/`out_shardings` over the mesh and a donated
train state; inside, `lax.scan` accumulates gradients over micro-batches, optax applies AdamW with
clipping, and a non-finite loss, gradient, new parameter or optimizer state refuses the update (the
old state is kept; `update_ok` in the metrics says so, and the loop stops after
`train.max_refused_updates` refusals in a row).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import nnx, struct

from egspo.diffusion import rollout as rollout_lib
from egspo.model import lora as lora_lib

# A micro-batch's LoRA dropout masks derive from its update key a: fold_in(key_a, 3) (a stream of
# its own beside the loss's key; exact resume depends on the value).
LORA_DROPOUT_KEY = 3


@struct.dataclass
class TrainState:
  """What the optimizer owns. `params` is the trainable `nnx.State`."""

  step: jax.Array
  params: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class Policy:
  """The policy's graph definition; `model(params, frozen)` rebuilds the LLaDA module."""

  graphdef: Any

  def model(self, params, frozen):
    return nnx.merge(self.graphdef, params, frozen)


def split_policy(model, trainable: str = "full"):
  """→ (Policy, trainable params, frozen state). trainable: 'full' (every Param) or 'lora'."""
  if trainable == "full":
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  elif trainable == "lora":
    graphdef, params, frozen = nnx.split(model, nnx.LoRAParam, ...)
    if not jax.tree.leaves(params):
      raise ValueError("trainable='lora' but the model has no LoRA parameters (apply_lora first)")
  else:
    raise ValueError(f"trainable must be 'full' or 'lora', got {trainable!r}")
  return Policy(graphdef), params, frozen


def reference_params(params):
  """The frozen reference policy π_ref = the policy RL starts from (REFERENCE §3.7): a copy of the
  trainable part `params` (the train state donates its own buffers), shared frozen rest.

  Full fine-tuning copies every parameter. With LoRA the base is frozen and shared, so only the
  adapters are copied: after an SFT stage they are its trained factors (the release's reference is
  its SFT-merged base with the adapter off, the same policy); without one, B = 0 and π_ref is the
  base model.
  """
  return jax.tree.map(jnp.copy, params)


def committed_positions(commit_step, steps, max_commit: int):
  """Indices of the completion positions committed at each selected step.

  commit_step: [B, G]; steps: [B, K] → (idx [B, K, M] int32, valid [B, K, M] bool), M = max_commit,
  the largest number of tokens any step commits (static, from the sampler's schedule).
  """
  hit = commit_step[:, None, :] == steps[:, :, None]  # [B, K, G]
  # Stable argsort of "not hit" puts the committed positions first, in position order.
  idx = jnp.argsort(~hit, axis=-1, stable=True)[..., :max_commit].astype(jnp.int32)
  valid = jnp.take_along_axis(hit, idx, axis=-1)
  return idx, valid


def step_logprobs(model, prompt_ids, prompt_mask, tokens, commit_step, steps, *,
                  mask_token_id: int, max_commit: int):
  """log π_θ(a_t | s_t) for every selected step, all B×K states in one batched forward.

  REFERENCE §3.4: the sum over the tokens committed at step t of log softmax(model(x_t))[token]
  (untempered; the choice of positions is not modelled).

  prompt_ids, prompt_mask: [B, P]; tokens, commit_step: [B, G]; steps: [B, K] → [B, K] float32.
  The LM head runs only at the ≤ M committed positions of each state, not the whole canvas.
  """
  hidden = step_hidden(model, prompt_ids, prompt_mask, tokens, commit_step, steps,
                       mask_token_id=mask_token_id)
  return committed_logprobs(model, hidden, tokens, commit_step, steps, max_commit=max_commit)


def step_hidden(model, prompt_ids, prompt_mask, tokens, commit_step, steps, *,
                mask_token_id: int):
  """The completion's final hidden states [B, K, G, D] of the B×K selected states x_t, one
  batched forward (shapes as `step_logprobs`)."""
  b, k = steps.shape
  p, g = prompt_ids.shape[1], tokens.shape[1]
  ro = rollout_lib
  comp = ro.completion_at(tokens[:, None, :], commit_step[:, None, :], steps, mask_token_id)
  ids = jnp.concatenate([jnp.broadcast_to(prompt_ids[:, None], (b, k, p)),
                         comp.astype(prompt_ids.dtype)], axis=-1).reshape(b * k, p + g)
  attn = jnp.concatenate([jnp.broadcast_to(prompt_mask[:, None], (b, k, p)),
                          jnp.ones((b, k, g), bool)], axis=-1).reshape(b * k, p + g)
  return model.hidden_states(ids, attn)[:, p:, :].reshape(b, k, g, -1)  # [B, K, G, D]


def committed_logprobs(model, hidden, tokens, commit_step, steps, *, max_commit: int):
  """Σ over the tokens committed at each selected step of log softmax(head(hidden))[token]:
  hidden [B, K, G, D] (`step_hidden`) → [B, K] float32; the LM head runs at ≤ M positions."""
  b, k = steps.shape
  g = tokens.shape[1]
  idx, valid = committed_positions(commit_step, steps, max_commit)  # [B, K, M]
  h = jnp.take_along_axis(hidden, idx[..., None], axis=2)  # [B, K, M, D]
  logp = jax.nn.log_softmax(model.logits(h), axis=-1)  # [B, K, M, V]
  tok = jnp.take_along_axis(jnp.broadcast_to(tokens[:, None, :], (b, k, g)), idx, axis=-1)
  tok_logp = jnp.take_along_axis(logp, tok[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(valid, tok_logp, 0.0), axis=-1)


LossFn = Callable[..., tuple[jax.Array, jax.Array, dict]]


def make_update_step(policy: Policy, tx: optax.GradientTransformation, loss_fn: LossFn, *,
                     state_shardings=None, frozen_shardings=None, batch_shardings=None):
  """Builds the jitted, sharded update: (state, frozen, batch, key) → (state, metrics).

  `loss_fn(model, micro_batch, key) -> (loss_sum, denom, metrics)` is a pure function of arrays;
  the step minimises Σ loss_sum / Σ denom over the micro-batches. `batch` is a pytree whose
  leaves have a leading micro-batch axis [A, ...]; the gradient is accumulated over the A
  micro-batches with `lax.scan`, so memory is that of one micro-batch. Each micro-batch
  gets its own key (fold_in(key, a)); LoRA dropout (a training forward) masks with
  fold_in(fold_in(key, a), LORA_DROPOUT_KEY).
  """

  def loss_of_params(params, frozen, mb, key):
    model = policy.model(params, frozen)
    lora_lib.enable_dropout(model, jax.random.fold_in(key, LORA_DROPOUT_KEY))
    loss_sum, denom, metrics = loss_fn(model, mb, key)
    return loss_sum, (denom, metrics)

  grad_fn = jax.value_and_grad(loss_of_params, has_aux=True)

  def update(state: TrainState, frozen, batch, key):
    num_micro = jax.tree.leaves(batch)[0].shape[0]

    def micro(carry, xs):
      g_acc, l_acc, d_acc = carry
      a, mb = xs
      (loss_sum, (denom, metrics)), grads = grad_fn(state.params, frozen, mb,
                                                    jax.random.fold_in(key, a))
      g_acc = jax.tree.map(jnp.add, g_acc, grads)
      return (g_acc, l_acc + loss_sum, d_acc + denom), metrics

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (g_sum, l_sum, d_sum), metrics = jax.lax.scan(
        micro, (zeros, jnp.float32(0), jnp.float32(0)), (jnp.arange(num_micro), batch))
    denom = jnp.maximum(d_sum, 1.0)
    grads = jax.tree.map(lambda g: g / denom, g_sum)
    loss = l_sum / denom
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    # Refuse what would be applied, not only its inputs: a finite gradient times an infinite
    # (or NaN) learning rate is a non-finite parameter.
    ok = all_finite((loss, grads, new_params, new_opt))
    new_state = TrainState(step=state.step + ok.astype(state.step.dtype),
                           params=new_params, opt_state=new_opt)
    new_state = select_if_finite(ok, new_state, state)  # refuse a non-finite update
    out = {k: jnp.mean(v) for k, v in metrics.items()}
    out.update(loss=loss, grad_norm=optax.global_norm(grads), update_ok=ok.astype(jnp.float32),
               denom=d_sum)
    return new_state, out

  return jax.jit(update,
                 in_shardings=(state_shardings, frozen_shardings, batch_shardings, None),
                 out_shardings=(state_shardings, None),
                 donate_argnums=(0,))


def make_schedule(learning_rate, *, warmup_steps=0, total_steps=None, schedule="constant",
                  decay_steps=0, final_lr_fraction=0.0):
  """The learning rate per step: linear warm-up from 0 over `warmup_steps`, then

    constant : `learning_rate`;
    cosine   : cosine decay to `final_lr_fraction · learning_rate` at `total_steps`;
    wsd      : warmup-stable-decay: constant until `total_steps - decay_steps`, linear decay to
               `final_lr_fraction · learning_rate` at `total_steps`;

  after `total_steps` the rate stays at its final value (so training on past the schedule, e.g. a
  continued-SFT control, goes on at the rate the schedule ended with). Steps are applied optimizer
  steps (a refused update keeps the optimizer's count), not RL iterations.
  """
  if schedule == "constant":
    lr = (optax.linear_schedule(0.0, learning_rate, warmup_steps) if warmup_steps else
          learning_rate)
    if warmup_steps:
      lr = optax.join_schedules([lr, optax.constant_schedule(learning_rate)], [warmup_steps])
    return lr
  if schedule not in ("cosine", "wsd"):
    raise ValueError(f"schedule must be 'constant', 'cosine' or 'wsd', got {schedule!r}")
  if not total_steps:
    raise ValueError(f"schedule={schedule!r} needs total_steps > 0")
  final = final_lr_fraction * learning_rate
  if schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(warmup_steps, 1),
                                              total_steps, end_value=final)
  if not 0 < decay_steps <= total_steps - warmup_steps:
    raise ValueError(f"schedule='wsd' needs 0 < decay_steps <= total_steps - warmup_steps, got "
                     f"decay_steps={decay_steps}, total_steps={total_steps}, "
                     f"warmup_steps={warmup_steps}")
  stable_end = total_steps - decay_steps
  return optax.join_schedules(
      [optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1)),
       optax.constant_schedule(learning_rate),
       optax.linear_schedule(learning_rate, final, decay_steps),
       optax.constant_schedule(final)],
      [max(warmup_steps, 1), stable_end, total_steps])


def make_optimizer(learning_rate, *, b1=0.9, b2=0.99, weight_decay=0.1, max_grad_norm=0.2,
                   warmup_steps=0, total_steps=None, schedule="constant", decay_steps=0,
                   final_lr_fraction=0.0):
  """AdamW with global-norm clipping (REFERENCE §3.8). No weight decay on norm weights (1-D).
  The learning-rate schedule: `make_schedule`."""
  lr = make_schedule(learning_rate, warmup_steps=warmup_steps, total_steps=total_steps,
                     schedule=schedule, decay_steps=decay_steps,
                     final_lr_fraction=final_lr_fraction)

  def decay_mask(params):
    return jax.tree.map(lambda x: x.ndim > 1, params)

  return optax.chain(optax.clip_by_global_norm(max_grad_norm),
                     optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask))


# ----------------------------------------------------------------------------------------------
# Non-finite guard: a NaN/Inf update is refused inside the step; the loop stops after a run of them.


def all_finite(tree) -> jax.Array:
  """True iff every floating leaf of `tree` is free of NaN/±Inf → bool scalar (traced in jit).

  Integer, bool and PRNG-key leaves are ignored.
  """
  oks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
         if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(oks)) if oks else jnp.bool_(True)


def select_if_finite(ok, new_state, old_state):
  """`new_state` where `ok` else `old_state`, leaf by leaf (trees of the same structure).

      ok = all_finite((loss, grads, new_params, new_opt))   # check what would be applied
      params, opt_state = select_if_finite(ok, (new_params, new_opt), (params, opt_state))

  `ok` is a bool scalar; a `jnp.where` select costs one elementwise pass and keeps donation.
  """
  ok = jnp.asarray(ok)
  if ok.shape != () or ok.dtype != jnp.bool_:
    raise ValueError(f"select_if_finite needs a bool scalar, got {ok.dtype}{list(ok.shape)}")
  if jax.tree.structure(new_state) != jax.tree.structure(old_state):
    raise ValueError("select_if_finite: new_state and old_state have different tree structures")
  return jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, old_state)


class NonFiniteError(RuntimeError):
  """Training stopped: too many updates in a row were refused for non-finite values."""


class RefusedUpdates:
  """Counts consecutive refused (non-finite) updates and stops the run after `limit` in a row.

      refused = RefusedUpdates(limit=10, stage="RL", fields="optim.learning_rate, ...")
      state, m = update(state, batch)              # refuses a non-finite update (keeps state)
      refused.record(bool(m["update_ok"]), where="iteration 12")

  `record` logs each refusal and raises `NonFiniteError` naming the stage, the place, the config
  fields to look at and the limit's own field, once `limit` consecutive updates were refused.
  """

  LIMIT_FIELD = "train.max_refused_updates"

  def __init__(self, limit: int, stage: str, fields: str):
    if limit < 1:
      raise ValueError(f"{self.LIMIT_FIELD} must be >= 1, got {limit}")
    self.limit, self.stage, self.fields = int(limit), stage, fields
    self.in_a_row = 0
    self.total = 0

  def record(self, ok: bool, where: str) -> None:
    if ok:
      self.in_a_row = 0
      return
    self.in_a_row += 1
    self.total += 1
    logging.warning("%s %s: update refused (non-finite loss, gradients or new state); %d in a "
                    "row", self.stage, where, self.in_a_row)
    if self.in_a_row >= self.limit:
      raise NonFiniteError(
          f"{self.stage} stopped at {where}: {self.in_a_row} updates in a row were refused "
          f"because the loss, the gradients or the updated parameters/optimizer state were not "
          f"finite (NaN/Inf); no non-finite state was applied or saved. Check {self.fields} "
          f"(the limit is {self.LIMIT_FIELD}={self.limit})")
