"""EGSPO / EGSPO-SA as a registered method (REFERENCE §3); the contract is `egspo.rl.registry`'s."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from egspo.rl import advantages as adv_lib
from egspo.rl import losses as loss_lib
from egspo.rl import selection as sel_lib
from egspo.rl import step_variants
from egspo.rl import termination as term_lib
from egspo.rl import tis as tis_lib
from egspo.rl import update as update_lib
from egspo.rl import value as value_lib
from egspo.rl.registry import Context, Iteration, register, split_micro

# How one rollout's K selected-step columns become optimizer steps (`train.update_schedule`).
UPDATE_SCHEDULES = ("per_step", "joint", "reference")
# The [B, K] fields of a planned batch, sliced by column; the others are per sample.
COLUMN_FIELDS = ("steps", "valid", "adv", "logp_old", "logp_ref", "ref_vocab", "tis_weight")


def column_groups(schedule: str, k: int, columns_per_update: int = 2) -> list[list[int]]:
  """The selected-step columns each optimizer step trains, in the order they run.

    per_step   K optimizer steps, the j-th on column j: [[0], [1], …, [K-1]];
    joint      one optimizer step on all K columns: [[0, …, K-1]];
    reference  the released trainer's loop (`egspo_trainer.py` `_prepare_inputs` / `compute_loss`):
               its micro-step counter is incremented before the loss reads column
               `counter mod K`, so one rollout's K micro-steps train columns 1, 2, …, K-1, 0, and
               `columns_per_update` consecutive micro-steps (its gradient_accumulation_steps, 2 in
               `train.sh`) share one optimizer step: K=8 → [[1, 2], [3, 4], [5, 6], [7, 0]].
  """
  if schedule not in UPDATE_SCHEDULES:
    raise ValueError(f"unknown train.update_schedule {schedule!r}; choose one of "
                     f"{UPDATE_SCHEDULES}")
  if schedule == "joint":
    return [list(range(k))]
  if schedule == "per_step":
    return [[j] for j in range(k)]
  if columns_per_update < 1 or k % columns_per_update:
    raise ValueError(f"train.columns_per_update={columns_per_update} must divide "
                     f"egspo.num_selected_steps={k} (an optimizer step may not span rollouts)")
  order = [(j + 1) % k for j in range(k)]
  return [order[i:i + columns_per_update] for i in range(0, k, columns_per_update)]


def columns_batch(batch: dict, cols: list[int]) -> dict:
  """The rows of `batch` ([B, …] fields, COLUMN_FIELDS [B, K]) for the columns `cols`, one
  column at a time stacked along the rows: [len(cols)·B, …], COLUMN_FIELDS [len(cols)·B, 1].

  Stacking keeps each micro-batch within one column (the memory of a one-column step); the
  loss, a mean over all valid (row, column) slots, is the mean of the per-column means.
  """
  parts = [{**batch, **{n: batch[n][:, j:j + 1] for n in COLUMN_FIELDS if n in batch}}
           for j in cols]
  if len(parts) == 1:
    return parts[0]
  return jax.tree.map(lambda *x: jnp.concatenate(x, axis=0), *parts)


@register("egspo", "egspo_sa")
class EGSPO:
  """EGSPO / EGSPO-SA (REFERENCE §3): entropy-guided step selection, per-step clipped surrogate
  with k3 KL, stepwise advantages from the one-step value (λ > 0, EGSPO-SA)."""

  @classmethod
  def validate_config(cls, f) -> None:
    """The `egspo` (selection, pairing, K, λ) and `loss` (clip, KL, scale) sections, and
    `train.columns_per_update` of the 'reference' update schedule."""
    f.choice("egspo.selection", sel_lib.METHODS)
    f.choice("egspo.pairing", sel_lib.PAIRINGS)
    k = f.integer("egspo.num_selected_steps", 1)
    steps = f.integer("rollout.steps", 1)
    f.require(k <= steps, "egspo.num_selected_steps", k, f"must be <= rollout.steps={steps}")
    n = f.integer("train.columns_per_update", 1)
    if f.get("train.update_schedule") == "reference":  # the choice: egspo.config_checks
      f.require(k % n == 0, "train.columns_per_update", n,
                f"must divide egspo.num_selected_steps={k} under train.update_schedule="
                "'reference' (an optimizer step may not span rollouts)")
    scale = f.get("loss.scale")
    try:
      loss_lib.step_loss_scale(scale, gen_length=f.get("rollout.gen_length"), steps=steps)
    except ValueError as e:
      f.require(False, "loss.scale", scale, str(e))
    f.real("egspo.adaptive_alpha", 0.0, 1.0, lo_open=True)
    f.real("egspo.lam", 0.0)
    f.real("loss.eps", 0.0, 1.0, lo_open=True, hi_open=True)
    f.real("loss.eps_high", 0.0, lo_open=True)
    f.real("loss.beta", 0.0)
    # The released trainer's options (README "The release's options").
    pred_state = f.choice("egspo.pred_state", step_variants.PRED_STATES)
    for name in ("terminate_at_last_non_eos", "correctness_step_reward_only", "dynamic_lambda1",
                 "random_replace", "normalize_returns"):
      f.boolean(f"egspo.{name}")
    f.integer("egspo.lambda1_update_steps", 1)
    f.choice("egspo.baseline", adv_lib.BASELINES)
    exact = f.boolean("loss.use_exact_kl")
    f.require(not (exact and pred_state == "final"), "loss.use_exact_kl", exact,
              "the exact KL is over the committed positions: needs egspo.pred_state='next'")

  @classmethod
  def optimizer_steps_per_iteration(cls, config) -> int:
    """One optimizer step per column group of `train.update_schedule` (`plan`'s batches)."""
    c = config
    return len(column_groups(c.train.update_schedule, c.egspo.num_selected_steps,
                             c.train.columns_per_update))

  def __init__(self, ctx: Context):
    self.ctx = ctx
    c = ctx.config
    self.k = c.egspo.num_selected_steps
    self.lam = 0.0 if c.algorithm == "egspo" else float(c.egspo.lam)
    self.group_size = c.batch.group_size
    self.micro = c.batch.micro_batch_size
    self.loss_scale = loss_lib.step_loss_scale(c.loss.scale, gen_length=c.rollout.gen_length,
                                               steps=c.rollout.steps)
    self._ref_logps = jax.jit(self._ref_logps_impl)
    # The release's pred_state='final' / use_exact_kl (egspo.rl.step_variants): their own
    # no-grad passes; None on the default path (pred_state 'next', k3).
    self.pred_state, self.exact_kl = c.egspo.pred_state, bool(c.loss.use_exact_kl)
    self._variant_pass = None
    if self.pred_state != "next" and self.exact_kl:
      raise ValueError("loss.use_exact_kl needs egspo.pred_state='next'")
    if self.pred_state != "next" or self.exact_kl:
      self._variant_pass = step_variants.no_grad_pass(
          ctx.policy, self.micro, mask_token_id=ctx.mask_token_id, max_commit=ctx.max_commit,
          pred_state=self.pred_state, with_vocab=self.exact_kl)
    # A cached rollout (rollout.cache) was sampled by μ ≠ π_old: the exact π_old (and, for the
    # values, x̂0) of the selected states from one full forward, TIS weights min(π_old/μ, C)
    # (egspo.rl.tis). None with cache='none': π_old is the rollout's record, no forward.
    self._old_pass, self.tis_cap = None, float(c.rollout.tis_cap)
    if c.rollout.cache != "none":
      self._old_pass = tis_lib.old_step_pass(
          ctx.policy, self.micro, mask_token_id=ctx.mask_token_id, max_commit=ctx.max_commit,
          with_x0_hat=self.lam > 0)

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
    c = self.ctx.config
    ro = it.rollout
    select = dict(k=self.k, num_steps=ro.num_steps, step_entropy=ro.step_entropy,
                  key=jax.random.fold_in(it.key, 1), alpha=c.egspo.adaptive_alpha,
                  order=c.egspo.pairing, replace=c.egspo.random_replace)
    if c.egspo.terminate_at_last_non_eos:
      eos = self.ctx.policy.model(params, frozen).cfg.eos_token_id
      last = term_lib.last_non_eos_steps(ro.tokens, ro.commit_step, eos, ro.num_steps)
      steps, valid = term_lib.select_capped(c.egspo.selection, last=last, **select)
    else:
      steps, valid = sel_lib.select_steps(c.egspo.selection, **select)
    metrics = {}
    # π_old = the rollout's own log-probs: no forward needed (REFERENCE §3.1), unless a cache
    # sampled the rollout: then they are μ's, and π_old and x̂0 come from full forwards.
    logp_old = loss_lib.gather_step_logprobs(ro.logprob, ro.commit_step, steps)
    old_x0_hat = tis_weight = None
    if self._old_pass is not None:
      logp_mu = logp_old
      states = dict(prompt_ids=ro.prompt_ids, prompt_mask=ro.prompt_mask, tokens=ro.tokens,
                    commit_step=ro.commit_step, steps=steps)
      logp_old = self._old_pass(params, frozen, states)
      if self.lam > 0:
        logp_old, old_x0_hat = logp_old
      tis_weight, tis_metrics = tis_lib.truncated_weights(logp_old, logp_mu, self.tis_cap, valid)
      metrics.update({k: float(v) for k, v in tis_metrics.items()})
    rewards = np.asarray(it.rewards, np.float32)
    lam = self.lam
    if lam > 0 and c.egspo.dynamic_lambda1:
      lam = adv_lib.halved_lambda(lam, it.step, c.egspo.lambda1_update_steps,
                                  self.optimizer_steps_per_iteration(c))
      metrics["lambda"] = lam
    if lam > 0:
      reward_fn = self.ctx.reward_fn
      if c.egspo.correctness_step_reward_only:
        reward_fn = value_lib.require_step_reward_fn(self.ctx.step_reward_fn)
      guesses = self.ctx.to_host(old_x0_hat if old_x0_hat is not None else
                                 value_lib.one_step_guesses(ro.x0_hat, steps))
      values, _, value_metrics = value_lib.one_step_values(
          guesses, reward_fn, self.ctx.decode_fn, it.examples, valid=self.ctx.to_host(valid))
      adv = adv_lib.stepwise_advantages(jnp.asarray(rewards), jnp.asarray(values),
                                        self.group_size, lam, valid=valid,
                                        normalize_returns=c.egspo.normalize_returns,
                                        baseline=c.egspo.baseline)
      metrics.update(value_metrics)
      metrics["value/mean"] = float(np.mean(values))
    else:
      a = adv_lib.group_baseline_advantages(jnp.asarray(rewards), self.group_size)
      adv = jnp.broadcast_to(a[:, None], steps.shape)
    batch = dict(prompt_ids=ro.prompt_ids, prompt_mask=ro.prompt_mask, tokens=ro.tokens,
                 commit_step=ro.commit_step, steps=steps, valid=valid,
                 adv=jnp.asarray(adv, jnp.float32), logp_old=logp_old)
    if tis_weight is not None:
      batch["tis_weight"] = tis_weight
    if self._variant_pass is None:
      batch["logp_ref"] = self._ref_logps(self.ctx.ref_params, frozen, batch)
    else:
      if self.pred_state == "final":  # π_old of these positions is not in the rollout record
        batch["logp_old"] = self._variant_pass(params, frozen, batch)
      ref = self._variant_pass(self.ctx.ref_params, frozen, batch)
      if self.exact_kl:
        batch["logp_ref"], batch["ref_vocab"] = ref
      else:
        batch["logp_ref"] = ref
    metrics["selected_step_mean"] = float(jnp.mean(steps))
    metrics["adv_abs_mean"] = float(jnp.mean(jnp.abs(batch["adv"])))  # scalars: all hosts agree
    if c.train.update_schedule == "joint":
      return [split_micro(batch, self.micro)], metrics
    groups = column_groups(c.train.update_schedule, steps.shape[1], c.train.columns_per_update)
    return [split_micro(columns_batch(batch, g), self.micro) for g in groups], metrics

  def loss(self, model, mb, key):
    del key
    c = self.ctx.config
    kl = None
    if self._variant_pass is None:
      logp = update_lib.step_logprobs(model, mb["prompt_ids"], mb["prompt_mask"], mb["tokens"],
                                      mb["commit_step"], mb["steps"],
                                      mask_token_id=self.ctx.mask_token_id,
                                      max_commit=self.ctx.max_commit)
    else:
      logp, kl = step_variants.policy_terms(
          model, mb, mask_token_id=self.ctx.mask_token_id, max_commit=self.ctx.max_commit,
          pred_state=self.pred_state, exact_kl=self.exact_kl)
    return loss_lib.egspo_step_loss(logp, mb["logp_old"], mb["adv"], mb["valid"], mb["logp_ref"],
                                    epsilon=c.loss.eps, epsilon_high=c.loss.eps_high,
                                    beta=c.loss.beta, loss_scale=self.loss_scale, kl=kl,
                                    tis_weight=mb.get("tis_weight"))

