"""Policy losses: EGSPO's per-step surrogate and the baselines' losses (REFERENCE §3.7, §4).

Every loss is a pure function of arrays returning `(loss_sum, denominator, metrics)`:
  loss_sum     scalar float32, the sum of per-element losses of this micro-batch;
  denominator  scalar float32, the number of elements the loss is a mean over;
  metrics      dict of scalar means over the same elements.
The loss of a whole batch split into micro-batches is Σ loss_sum / Σ denominator, exactly the
un-split loss; a metric aggregates the same way, weighted by `denominator`.

Gradients flow only through the current policy's log-likelihood (`logp`, `logl`): the old and
reference quantities (and StableDRL's importance weights) are wrapped in `stop_gradient`, so a
caller cannot leak gradient into them by accident.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp

_sg = jax.lax.stop_gradient


def k3_kl(logp, logp_ref):
  """Schulman's k3 estimator of KL(π_θ ‖ π_ref): exp(ref − logp) − (ref − logp) − 1 ≥ 0."""
  d = logp_ref - logp
  return jnp.exp(d) - d - 1.0


def k2_kl(logp, logp_ref):
  """k2 estimator ½ (logp − ref)² ≥ 0 (ESPO's choice for the noisy sequence ELBO)."""
  return 0.5 * jnp.square(logp - logp_ref)


KL_ESTIMATORS = {"k2": k2_kl, "k3": k3_kl}


def clipped_surrogate(ratio, adv, epsilon: float, epsilon_high: float):
  """Per-element PPO loss −min(ratio·A, clip(ratio, 1 − ε, 1 + ε_high)·A) (REFERENCE §3.7)."""
  clipped = jnp.clip(ratio, 1.0 - epsilon, 1.0 + epsilon_high)
  return -jnp.minimum(ratio * adv, clipped * adv)


def _mean(x, w, denom):
  return jnp.sum(jnp.where(w, x, 0.0)) / jnp.maximum(denom, 1.0)


def _ppo_metrics(ratio, adv, w, denom, epsilon, epsilon_high):
  # A clip is "active" when the clipped branch is chosen: zero gradient for that element.
  low = (ratio < 1.0 - epsilon) & (adv < 0)
  high = (ratio > 1.0 + epsilon_high) & (adv > 0)
  return {
      "clip/low_frac": _mean(low.astype(jnp.float32), w, denom),
      "clip/high_frac": _mean(high.astype(jnp.float32), w, denom),
      "clip/frac": _mean((low | high).astype(jnp.float32), w, denom),
      "ratio/mean": _mean(ratio, w, denom),
  }


def _zero_invalid(valid, cur, old, ref):
  """float32 copies with invalid entries set to 0 (old/ref also detached)."""
  f = lambda x: jnp.where(valid, x.astype(jnp.float32), 0.0)
  return f(cur), _sg(f(old)), (None if ref is None else _sg(f(ref)))


def _check_inputs(rank: int, *arrays, adv=None):
  """Trace-time contract of a loss: the given `arrays` (None = absent) share one shape of `rank`;
  the first (the current log-likelihood) and `adv` are floating point."""
  given = [a for a in arrays if a is not None]
  chex.assert_rank(given, rank)
  chex.assert_equal_shape(given)
  chex.assert_type([arrays[0]] + ([] if adv is None else [adv]), float)


def gather_step_logprobs(token_logp, commit_step, steps, aggregation: str = "sum"):
  """Step-level log π(a_t | s_t) gathered from per-position log-probs (REFERENCE §3.4).

  token_logp: [B, K, G] log-probs of the final tokens under the state of selected step k (the
  forward of x_t), or [B, G] when one value per position serves every step (the rollout-time
  `Rollout.logprob`, i.e. logp_old); commit_step: [B, G]; steps: [B, K].
  aggregation="sum" (REFERENCE): Σ over positions with commit_step == t; "mean" (the reference
  trainer's `logps_aggregation='mean'`): their mean (0 for a step that commits nothing).
  Returns [B, K] float32.
  """
  chex.assert_rank([token_logp, commit_step, steps], [{2, 3}, 2, 2])
  chex.assert_equal_shape_prefix([token_logp, commit_step, steps], 1)
  chex.assert_type([commit_step, steps], int)
  if aggregation not in ("sum", "mean"):
    raise ValueError(f"aggregation must be 'sum' or 'mean', got {aggregation!r}")
  act = commit_step[:, None, :] == steps[:, :, None]  # [B, K, G]: the action a_t
  if token_logp.ndim == 2:
    token_logp = token_logp[:, None, :]
  total = jnp.sum(jnp.where(act, token_logp.astype(jnp.float32), 0.0), axis=-1)
  if aggregation == "sum":
    return total
  return total / jnp.maximum(act.sum(-1), 1).astype(jnp.float32)


LOSS_SCALES = ("tokens_per_step", "none")  # named values of `loss.scale`


def step_loss_scale(scale, *, gen_length: int, steps: int) -> float:
  """The `loss_scale` of `egspo_step_loss` for the config's `loss.scale`.

  'tokens_per_step' → 1 / (gen_length // steps): the released trainer divides each per-step loss
  by `max_completion_length // diffusion_steps` (2 at 256/128) under its `sum` aggregation;
  'none' → 1; a positive finite number (or its string, as a command-line override gives it) →
  itself. Raises ValueError naming the allowed values.
  """
  if scale == "tokens_per_step":
    per_step = gen_length // steps
    if per_step < 1:
      raise ValueError(f"'tokens_per_step' needs rollout.gen_length={gen_length} >= "
                       f"rollout.steps={steps}")
    return 1.0 / per_step
  if scale == "none":
    return 1.0
  try:
    value = float(scale) if not isinstance(scale, bool) else float("nan")
  except (TypeError, ValueError):
    value = float("nan")
  if not (math.isfinite(value) and value > 0):
    raise ValueError(f"must be one of {LOSS_SCALES} or a positive finite number")
  return value


def egspo_step_loss(logp, logp_old, adv, valid=None, logp_ref=None, *, epsilon: float = 0.2,
                    epsilon_high: float = 0.5, beta: float = 0.04, loss_scale: float = 1.0,
                    kl=None, tis_weight=None):
  """EGSPO per-step clipped surrogate with the k3 KL (REFERENCE §3.7).

  logp, logp_old, logp_ref: [B, K] step-level log-probs log π(a_t | s_t) = Σ over the tokens
  committed at the selected step (current, rollout-time, frozen reference); adv: [B, K];
  valid: optional [B, K] bool (padding slots contribute nothing).
      ratio = exp(logp − logp_old)
      ℓ = −min(ratio·A, clip(ratio, 1 − ε, 1 + ε_high)·A) + β · k3(logp, logp_ref)
  `loss_scale` multiplies ℓ: the reference trainer divides by tokens-per-step under its `sum`
  aggregation (loss_scale = 1 / tokens_per_step reproduces it; `step_loss_scale` turns the
  config's `loss.scale` into it). With beta = 0 or logp_ref None the KL term is dropped.
  `kl`: optional [B, K] per-step KL that replaces k3 (carrying its own gradient), e.g. the
  release's `use_exact_kl` full-vocabulary KL (`egspo.rl.step_variants.exact_step_kl`); then
  `logp_ref` is not needed.
  `tis_weight`: optional [B, K] truncated importance weight min(π_old/μ, C) of a rollout sampled
  by an approximation μ of π_old (`egspo.rl.tis`); it multiplies the clipped surrogate, not the
  KL term (as verl's TIS weights the policy-gradient loss alone), and is a constant (detached).
  Returns (Σ_valid ℓ, #valid, metrics: clip fractions, kl (mean KL term), ratio/mean).
  """
  _check_inputs(2, logp, logp_old, adv, valid, logp_ref, kl, tis_weight, adv=adv)
  valid = jnp.ones(jnp.shape(logp), bool) if valid is None else valid.astype(bool)
  # Padding slots are zeroed before any exp(), so garbage there cannot overflow into NaN grads.
  logp, logp_old, logp_ref = _zero_invalid(valid, logp, logp_old, logp_ref)
  adv = _sg(adv.astype(jnp.float32))
  ratio = jnp.exp(logp - logp_old)
  per = clipped_surrogate(ratio, adv, epsilon, epsilon_high)
  if tis_weight is not None:
    per = per * _sg(jnp.where(valid, tis_weight.astype(jnp.float32), 0.0))
  denom = valid.sum().astype(jnp.float32)
  metrics = _ppo_metrics(ratio, adv, valid, denom, epsilon, epsilon_high)
  if kl is not None and beta != 0.0:
    kl = jnp.where(valid, kl.astype(jnp.float32), 0.0)
  elif logp_ref is not None and beta != 0.0:
    kl = k3_kl(logp, logp_ref)
  else:
    kl = None
  if kl is not None:
    per = per + beta * kl
    metrics["kl"] = _mean(kl, valid, denom)
  loss_sum = jnp.sum(jnp.where(valid, per, 0.0)) * loss_scale
  metrics["loss"] = loss_sum / jnp.maximum(denom, 1.0)
  return loss_sum, denom, metrics


def completion_mask_through_eos(tokens, eos_id: int):
  """[N, L] bool: completion positions up to and including the first EOS (all if none).

  The validity mask of d1/TRL (`seq_idx <= first_eos_idx`).
  """
  is_eos = tokens == eos_id
  first = jnp.where(is_eos.any(-1), jnp.argmax(is_eos, axis=-1), tokens.shape[-1])
  return jnp.arange(tokens.shape[-1])[None, :] <= first[:, None]


REDUCTIONS = ("token", "sequence")  # of diffu_grpo_token_loss


def diffu_grpo_token_loss(logp, logp_old, adv, mask, logp_ref=None, *, epsilon: float = 0.5,
                          epsilon_high: float | None = None, beta: float = 0.04,
                          reduction: str = "token"):
  """diffu-GRPO (d1) per-token clipped loss with the k3 KL (REFERENCE §4).

  logp, logp_old, logp_ref: [N, L] one-step token log-probs log π̂(o_k) (`masking.
  one_step_token_logprobs`, same key for all three); adv: [N] sequence advantages; mask: [N, L]
  bool valid completion tokens (`completion_mask_through_eos`).
      ℓ_k = −min(r_k·A, clip(r_k, 1 − ε, 1 + ε_high)·A) + β·k3_k,  r_k = exp(logp_k − logp_old_k)
  reduction="token" (d1): Σ_{n,k} mask·ℓ / Σ mask (loss_sum, denominator = #valid tokens);
  reduction="sequence": each sequence's token mean, then a mean over sequences (denominator N).
  ε = 0.5 as in d1's released runs; epsilon_high defaults to epsilon.
  """
  if reduction not in REDUCTIONS:
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
  _check_inputs(2, logp, logp_old, mask, logp_ref, adv=adv)
  chex.assert_rank(adv, 1)
  chex.assert_equal_shape_prefix([logp, adv], 1)
  epsilon_high = epsilon if epsilon_high is None else epsilon_high
  mask = mask.astype(bool)
  logp, logp_old, logp_ref = _zero_invalid(mask, logp, logp_old, logp_ref)
  a = _sg(adv.astype(jnp.float32))[:, None]
  ratio = jnp.exp(logp - logp_old)
  per = clipped_surrogate(ratio, a, epsilon, epsilon_high)
  a_full = jnp.broadcast_to(a, per.shape)
  kl = None
  if logp_ref is not None and beta != 0.0:
    kl = k3_kl(logp, logp_ref)
    per = per + beta * kl
  ntok = mask.sum().astype(jnp.float32)
  metrics = _ppo_metrics(ratio, a_full, mask, ntok, epsilon, epsilon_high)
  if kl is not None:
    metrics["kl"] = _mean(kl, mask, ntok)
  if reduction == "token":
    loss_sum, denom = jnp.sum(jnp.where(mask, per, 0.0)), ntok
  else:
    per_seq = jnp.sum(jnp.where(mask, per, 0.0), -1) / jnp.maximum(mask.sum(-1), 1)
    loss_sum, denom = per_seq.sum(), jnp.asarray(per.shape[0], jnp.float32)
  metrics["loss"] = loss_sum / jnp.maximum(denom, 1.0)
  return loss_sum, denom, metrics


NORMALIZATIONS = ("inside", "outside", "none")


def sequence_clipped_loss(logl, logl_old, adv, length, logl_ref=None, *, normalize: str = "inside",
                          epsilon: float = 0.2, epsilon_high: float | None = None,
                          beta: float = 0.0, kl: str = "k2", valid=None):
  """Sequence-level PPO loss on (estimated) sequence log-likelihoods, e.g. ELBOs (REFERENCE §4).

  logl, logl_old, logl_ref: [N] sequence log-likelihood estimates (current / old / reference,
  computed with the same masks); adv: [N]; length: scalar or [N] normaliser L; valid: optional
  [N] bool.
    normalize="inside"  (ESPO, GSPO-style): ratio = exp((logl − logl_old) / L), ℓ = PPO(ratio, A)
    normalize="outside": ratio = exp(logl − logl_old), ℓ = PPO(ratio, A) / L
    normalize="none":    ratio = exp(logl − logl_old), ℓ = PPO(ratio, A)
  KL (β > 0 and logl_ref given): β · kl(logl, logl_ref) / L (no 1/L with normalize="none");
  ESPO uses k2: β · ½ (logl − logl_ref)² / L.
  Returns (Σ ℓ, N_valid, metrics).
  """
  if normalize not in NORMALIZATIONS:
    raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
  if kl not in KL_ESTIMATORS:
    raise ValueError(f"kl must be one of {tuple(KL_ESTIMATORS)}, got {kl!r}")
  _check_inputs(1, logl, logl_old, adv, logl_ref, valid, adv=adv)
  epsilon_high = epsilon if epsilon_high is None else epsilon_high
  valid = jnp.ones(jnp.shape(logl), bool) if valid is None else valid.astype(bool)
  logl, logl_old, logl_ref = _zero_invalid(valid, logl, logl_old, logl_ref)
  adv = _sg(adv.astype(jnp.float32))
  length = jnp.broadcast_to(jnp.asarray(length, jnp.float32), logl.shape)
  norm = length if normalize != "none" else jnp.ones_like(length)
  delta = logl - logl_old
  ratio = jnp.exp(delta / length if normalize == "inside" else delta)
  per = clipped_surrogate(ratio, adv, epsilon, epsilon_high)
  if normalize == "outside":
    per = per / length
  denom = valid.sum().astype(jnp.float32)
  metrics = _ppo_metrics(ratio, adv, valid, denom, epsilon, epsilon_high)
  if logl_ref is not None and beta != 0.0:
    kl_val = KL_ESTIMATORS[kl](logl, logl_ref) / norm
    per = per + beta * kl_val
    metrics["kl"] = _mean(kl_val, valid, denom)
  loss_sum = jnp.sum(jnp.where(valid, per, 0.0))
  metrics["loss"] = loss_sum / jnp.maximum(denom, 1.0)
  return loss_sum, denom, metrics


def espo_loss(logl, logl_old, adv, length, logl_ref=None, *, epsilon: float = 0.2,
              epsilon_high: float | None = None, beta: float = 0.01, valid=None):
  """ESPO (REFERENCE §4): per-token-normalised ratio exp((ELBO_θ − ELBO_old)/L), PPO clip, k2 KL.

  Defaults from ESPO's `recipes/train.yaml` (ε 0.2, β 0.01; its per-task scripts override them,
  e.g. Countdown β 3e-3). L = the completion length the ELBO sums over.
  """
  return sequence_clipped_loss(logl, logl_old, adv, length, logl_ref, normalize="inside",
                               epsilon=epsilon, epsilon_high=epsilon_high, beta=beta, kl="k2",
                               valid=valid)


def gdpo_loss(logl, logl_old, adv, length, logl_ref=None, *, normalize: str = "inside",
              epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
              kl: str = "k3", valid=None):
  """GDPO (REFERENCE §4): sequence-level GRPO ratio on the Gauss–Legendre ELBO.

  The length normalisation is configurable (`normalize` inside or outside the exponent, or none);
  the KL term is off by default (β = 0); the defaults are not taken from GDPO's released code.
  """
  return sequence_clipped_loss(logl, logl_old, adv, length, logl_ref, normalize=normalize,
                               epsilon=epsilon, epsilon_high=epsilon_high, beta=beta, kl=kl,
                               valid=valid)


def _grouped(x, group_size):
  if x.ndim != 1 or x.shape[0] % group_size:
    raise ValueError(f"need a [B] array with B a multiple of group_size={group_size}, "
                     f"got shape {x.shape}")
  return x.reshape(-1, group_size)


def stabledrl_loss(logl, logl_old, adv, group_size: int, *, clip_iw: float = 5.0,
                   log_iw_scale=1.0, bound=None):
  """StableDRL (REFERENCE §4): unconditional clipping + self-normalised importance weights.

  logl: [B] sequence log-likelihood estimate of the current policy (any ELBO estimator; carries
  the gradient); logl_old: [B] the same estimate under the sampling policy (same masks); adv: [B];
  groups of `group_size` contiguous rows (group_size = B reproduces the released code, which
  normalises over the whole per-device batch).
      log w_i = min((logl_i − logl_old_i) · log_iw_scale, log clip_iw)    clipped whatever sign A has
      w = softmax_group(log w), detached
      loss_group = −Σ_i w_i A_i logl_i                                     no KL
  `log_iw_scale` = 1/L turns a summed ELBO's weight into a per-token one (the release's SPG ELBO
  is already a per-token mean, and it uses 1).
  `bound`: optional [B] quantity that carries the gradient in place of logl in the loss (the
  weights still come from logl): the release's SPG bound (`egspo.diffusion.spg.sandwich`,
  `compute_loss_spg`: `−Σ w_i A_i L_SPG_i` with w from the ELBO).
  Returns (Σ over groups of loss_group, #groups, metrics).
  """
  _check_inputs(1, logl, logl_old, adv, bound, adv=adv)
  lg, lo, ag = (_grouped(x.astype(jnp.float32), group_size) for x in (logl, logl_old, adv))
  lb = lg if bound is None else _grouped(bound.astype(jnp.float32), group_size)
  log_iw = _sg((lg - lo) * log_iw_scale)
  log_c = jnp.log(jnp.float32(clip_iw))
  w = _sg(jax.nn.softmax(jnp.minimum(log_iw, log_c), axis=-1))
  per_group = -jnp.sum(w * _sg(ag) * lb, axis=-1)
  n = jnp.asarray(lg.shape[0], jnp.float32)
  loss_sum = per_group.sum()
  metrics = {
      "loss": loss_sum / n,
      "iw/mean": jnp.mean(jnp.exp(log_iw)),
      "iw/clip_frac": jnp.mean((log_iw > log_c).astype(jnp.float32)),
      # Effective sample size of the normalised weights, as a fraction of the group size.
      "iw/ess_frac": jnp.mean(1.0 / jnp.sum(w * w, axis=-1)) / group_size,
  }
  return loss_sum, n, metrics


def wd1_loss(logl, adv, group_size: int, temperature: float = 1.0):
  """wd1 (REFERENCE §4): ratio-free weighted likelihood −Σ softmax(A/τ)_i ℓ_i + Σ softmax(−A/τ)_i ℓ_i.

  logl: [B] sequence log-likelihood estimates (carry the gradient); adv: [B]; softmax over each
  contiguous group of `group_size`. Returns (Σ over groups, #groups, metrics).
  """
  _check_inputs(1, logl, adv, adv=adv)
  lg, ag = (_grouped(x.astype(jnp.float32), group_size) for x in (logl, adv))
  ag = _sg(ag)
  w_pos = jax.nn.softmax(ag / temperature, axis=-1)
  w_neg = jax.nn.softmax(-ag / temperature, axis=-1)
  per_group = jnp.sum((w_neg - w_pos) * lg, axis=-1)
  n = jnp.asarray(lg.shape[0], jnp.float32)
  return per_group.sum(), n, {"loss": per_group.sum() / n}
