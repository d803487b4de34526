"""The seed papers' baselines as registered algorithms: diffu-GRPO, ESPO, GDPO, StableDRL, wd1.

Each is a class with the `plan`/`loss` contract of `egspo.rl.registry` (REFERENCE §4), so it runs
on the same rollouts, with the same loop, as EGSPO. What they share:

  * the likelihood quantity is a function of the policy and a masking key: one-step token
    log-probs [b, L] (diffu-GRPO) or a sequence ELBO estimate [b] (the others);
  * `plan` draws μ = `num_iterations` masking keys (one per optimizer step on this rollout) and,
    with no gradient, evaluates the quantity under the rollout-time policy (old = the `params`
    passed to `plan`) and the frozen reference (`ctx.ref_params`) with the *same* key (common
    random numbers), micro-batched by `lax.map` like EGSPO's reference pass;
  * the key of micro-batch a travels inside the batch (`mask_key`, the key data repeated on every
    row of the micro-batch), so `loss` recomputes the current policy's quantity on exactly the
    masks old and ref were computed with, whatever key the update step passes;
  * `loss` then calls the tested loss function of `egspo.rl.losses`.

A cached rollout (`rollout.cache`, sampled by μ ≈ π_old): none of these methods reads the
rollout's recorded log-probs; the old quantity is already their own forward of `params` with
full attention, so π_old is exact without EGSPO's recomputation (`egspo.rl.tis`). The
completions' own μ-vs-π_old mismatch is not importance-weighted here: its sequence-level weight
would need the whole trajectory's likelihood under π_old (T forwards per completion).

Forward counts per rollout of B completions (F = forwards of one estimator call per row):
plan μ·B·F (old) + μ·B·F (reference, only when β > 0), update μ·B·F forward+backward.
diffu-GRPO F = 1; ESPO F = 2·num_mc (coupled) or num_mc; GDPO F = num_nodes; StableDRL/wd1: that
of their estimator.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from egspo.diffusion import masking
from egspo.diffusion import sampler as sampler_lib
from egspo.diffusion import spg
from egspo.rl import advantages as adv_lib
from egspo.rl import losses as loss_lib
from egspo.rl.registry import Context, Iteration, register, split_micro

# The masking key of the old quantity when it has masks of its own (StableDRL's released
# `iw_masks='independent'`): fold_in(iteration key, INDEPENDENT_OLD_KEY); the inner iterations use
# fold_in(iteration key, 1000 + j).
INDEPENDENT_OLD_KEY = 999


def micro_batch_keys(key, batch_size: int, micro_batch_size: int):
  """[B, K] uint32 key data: every row of micro-batch a holds the data of fold_in(key, a).

  Stored in the batch so that old, reference and current quantities of a micro-batch use one key
  (ESPO's stratified mask counts are spread across the rows of one micro-batch, so the key must
  be per micro-batch, not per row).
  """
  if batch_size % micro_batch_size:
    raise ValueError(f"batch {batch_size} is not divisible by micro_batch_size {micro_batch_size}")
  num_micro = batch_size // micro_batch_size
  data = jnp.stack([jax.random.key_data(jax.random.fold_in(key, a)) for a in range(num_micro)])
  return jnp.repeat(data, micro_batch_size, axis=0)


def micro_batch_key(mb):
  """The masking key of a micro-batch built by `micro_batch_keys` (the first row's)."""
  return jax.random.wrap_key_data(mb["mask_key"][0])


class _Baseline:
  """Shared plan: advantages, μ masking keys, old/reference quantities under common keys.

  Subclasses set `section` (their config section) and implement `quantity`, `advantages` and
  `loss_from`; `needs_old` / `needs_ref` say which no-grad passes `plan` must run.
  """

  section = ""
  needs_old = True
  # True: the old quantity comes from masks of its own, drawn once per rollout and shared by the
  # inner iterations (StableDRL's release); False: recomputed with each iteration's key.
  independent_old = False

  @classmethod
  def validate_config(cls, f) -> None:
    """The method's section (`f`: an `egspo.config.Fields`); subclasses add their fields."""
    f.integer(f"{cls.section}.num_iterations", 1)

  @classmethod
  def _validate_clip_and_kl(cls, f) -> None:
    f.real(f"{cls.section}.eps", 0.0, 1.0, lo_open=True, hi_open=True)
    f.real(f"{cls.section}.beta", 0.0)

  @classmethod
  def _validate_whole_groups(cls, f) -> None:
    """Losses normalised over whole groups: a micro-batch must not split a group."""
    micro, group = f.integer("batch.micro_batch_size", 1), f.integer("batch.group_size", 1)
    f.require(micro % group == 0, "batch.micro_batch_size", micro,
              f"{f.get('algorithm')} needs whole groups per micro-batch: a multiple of "
              f"batch.group_size={group}")

  def __init__(self, ctx: Context):
    self.ctx = ctx
    c = ctx.config
    self.cfg = c[self.section]
    self.group_size = c.batch.group_size
    self.micro = c.batch.micro_batch_size
    self.num_iterations = int(self.cfg.num_iterations)
    self._quantity_all = jax.jit(self._quantity_all_impl)

  @classmethod
  def optimizer_steps_per_iteration(cls, config) -> int:
    """μ = `num_iterations`: one optimizer step per masking key (`plan`'s batches)."""
    return int(config[cls.section].num_iterations)

  @property
  def needs_ref(self) -> bool:
    return float(self.cfg.get("beta", 0.0)) > 0.0

  # -- to implement --------------------------------------------------------------------------

  def quantity(self, model, mb, key):
    """The policy's likelihood quantity for one micro-batch ([b] or [b, L] float32)."""
    raise NotImplementedError

  def advantages(self, rewards):
    """[B] rewards → [B] advantages."""
    raise NotImplementedError

  def loss_from(self, cur, mb):
    raise NotImplementedError

  def extra_fields(self, params, frozen, ro) -> dict:
    """Per-row batch fields beyond prompt/tokens/adv (e.g. diffu-GRPO's valid-token mask)."""
    del params, frozen, ro
    return {}

  # -- shared --------------------------------------------------------------------------------

  def logits_fn(self, model, gen_length: int):
    """Completion logits only: the LM head runs on the last `gen_length` positions."""
    return sampler_lib.model_logits_fn(model, gen_length)

  def _quantity_all_impl(self, params, frozen, batch):
    """The quantity for all B rows, micro-batch by micro-batch (memory of one micro-batch)."""
    model = self.ctx.policy.model(params, frozen)
    out = jax.lax.map(lambda mb: self.quantity(model, mb, micro_batch_key(mb)),
                      split_micro(batch, self.micro))
    return out.reshape((-1,) + out.shape[2:])

  def plan(self, params, frozen, it: Iteration):
    ro = it.rollout
    rewards = jnp.asarray(np.asarray(it.rewards, np.float32))
    adv = self.advantages(rewards)
    base = dict(prompt_ids=ro.prompt_ids, prompt_mask=ro.prompt_mask, tokens=ro.tokens,
                adv=jnp.asarray(adv, jnp.float32))
    base.update(self.extra_fields(params, frozen, ro))
    b = ro.tokens.shape[0]
    batches, old_means = [], []
    shared_old = None
    if self.needs_old and self.independent_old:
      keys = micro_batch_keys(jax.random.fold_in(it.key, INDEPENDENT_OLD_KEY), b, self.micro)
      shared_old = self._quantity_all(params, frozen, dict(base, mask_key=keys))
    for j in range(self.num_iterations):
      # One masking key per optimizer step on this rollout (d1: a fixed seed per inner
      # iteration), shared by old, reference and current policies.
      batch = dict(base, mask_key=micro_batch_keys(jax.random.fold_in(it.key, 1000 + j), b,
                                                   self.micro))
      if self.needs_old:
        batch["old"] = (shared_old if shared_old is not None
                        else self._quantity_all(params, frozen, batch))
        old_means.append(self.likelihood_mean(batch["old"]))
      if self.needs_ref:
        batch["ref"] = self._quantity_all(self.ctx.ref_params, frozen, batch)
      batches.append(split_micro(batch, self.micro))
    metrics = {"adv_abs_mean": float(jnp.mean(jnp.abs(base["adv"]))),
               "inner_iterations": float(self.num_iterations)}
    if old_means:
      metrics["likelihood_old_mean"] = float(np.mean(old_means))
    return batches, metrics

  def likelihood_mean(self, old) -> float:
    """The logged mean of an old quantity (`likelihood_old_mean`)."""
    return float(jnp.mean(old))

  def loss(self, model, mb, key):
    del key  # the masks come from the batch's own key (common random numbers with plan)
    return self.loss_from(self.quantity(model, mb, micro_batch_key(mb)), mb)


@register("diffu_grpo")
class DiffuGRPO(_Baseline):
  """diffu-GRPO (d1, REFERENCE §4): one-step token log-probs of the fully masked completion with
  the prompt masked w.p. p (a fresh key per inner iteration), per-token clip, k3 KL, token mean
  over the completion through its first EOS, A = r − mean_G r, μ optimizer steps per rollout."""

  section = "diffu_grpo"

  @classmethod
  def validate_config(cls, f) -> None:
    super().validate_config(f)
    f.real("diffu_grpo.p_mask_prompt", 0.0, 1.0, hi_open=True)
    f.choice("diffu_grpo.reduction", loss_lib.REDUCTIONS)
    cls._validate_clip_and_kl(f)

  def quantity(self, model, mb, key):
    toks = mb["tokens"]
    return masking.one_step_token_logprobs(
        self.logits_fn(model, toks.shape[-1]), key, mb["prompt_ids"], mb["prompt_mask"], toks,
        mask_token_id=self.ctx.mask_token_id, p_mask_prompt=float(self.cfg.p_mask_prompt))

  def advantages(self, rewards):
    return adv_lib.group_baseline_advantages(rewards, self.group_size)

  def extra_fields(self, params, frozen, ro):
    eos = self.ctx.policy.model(params, frozen).cfg.eos_token_id
    return {"valid": loss_lib.completion_mask_through_eos(ro.tokens, eos)}

  def loss_from(self, cur, mb):
    return loss_lib.diffu_grpo_token_loss(
        cur, mb["old"], mb["adv"], mb["valid"], mb.get("ref"), epsilon=float(self.cfg.eps),
        beta=float(self.cfg.beta), reduction=self.cfg.reduction)


class _SequenceELBO(_Baseline):
  """Methods on a sequence-level ELBO estimate [b] of the whole completion (length L = gen
  length, EOS padding included, as in ESPO)."""

  estimator = "espo"

  @classmethod
  def _validate_estimator(cls, f) -> None:
    """A configurable estimator: its name and the draws of each kind."""
    f.choice(f"{cls.section}.estimator", sorted(masking.ESTIMATORS))
    f.integer(f"{cls.section}.num_mc", 1)
    f.integer(f"{cls.section}.num_nodes", 1)

  def estimator_name(self) -> str:
    return self.cfg.get("estimator", self.estimator)

  def estimator_kwargs(self) -> dict:
    name = self.estimator_name()
    if name == "espo":
      return {"num_mc": int(self.cfg.num_mc), "coupled": bool(self.cfg.get("coupled", True))}
    if name == "gauss_legendre":
      return {"num_nodes": int(self.cfg.num_nodes)}
    if name == "double_mc":
      # LLaDA's ε = 1e-3 floor on the masking rate: ε = 0 has infinite variance (1/t weights).
      return {"num_samples": int(self.cfg.num_mc), "eps": 1e-3}
    raise ValueError(f"{self.section}.estimator={name!r}: must be one of "
                     f"{sorted(masking.ESTIMATORS)}")

  def quantity(self, model, mb, key):
    toks = mb["tokens"]
    est = masking.ESTIMATORS[self.estimator_name()]
    return est(self.logits_fn(model, toks.shape[-1]), key, mb["prompt_ids"], mb["prompt_mask"],
               toks, mask_token_id=self.ctx.mask_token_id, **self.estimator_kwargs())

  def advantages(self, rewards):
    return adv_lib.group_baseline_advantages(rewards, self.group_size)


@register("espo")
class ESPO(_SequenceELBO):
  """ESPO (REFERENCE §4): stratified ELBO with the coupled complement draw (`num_mc` draws),
  ratio exp((ELBO_θ − ELBO_old)/L), PPO clip, k2 KL β·½(ELBO_θ − ELBO_ref)²/L, leave-one-out
  advantages."""

  section = "espo"

  @classmethod
  def validate_config(cls, f) -> None:
    super().validate_config(f)
    f.integer("espo.num_mc", 1)
    f.boolean("espo.coupled")
    cls._validate_clip_and_kl(f)

  def estimator_name(self) -> str:
    return "espo"

  def advantages(self, rewards):
    return adv_lib.leave_one_out_advantages(rewards, self.group_size)

  def loss_from(self, cur, mb):
    return loss_lib.espo_loss(cur, mb["old"], mb["adv"], mb["tokens"].shape[-1], mb.get("ref"),
                              epsilon=float(self.cfg.eps), beta=float(self.cfg.beta))


@register("gdpo")
class GDPO(_SequenceELBO):
  """GDPO (REFERENCE §4): Gauss–Legendre ELBO (N nodes, one mask draw each), sequence-level
  clipped ratio with configurable length normalisation, A = r − mean_G r."""

  section = "gdpo"

  @classmethod
  def validate_config(cls, f) -> None:
    super().validate_config(f)
    f.integer("gdpo.num_nodes", 1)
    f.choice("gdpo.normalize", loss_lib.NORMALIZATIONS)
    cls._validate_clip_and_kl(f)

  def estimator_name(self) -> str:
    return "gauss_legendre"

  def loss_from(self, cur, mb):
    return loss_lib.gdpo_loss(cur, mb["old"], mb["adv"], mb["tokens"].shape[-1], mb.get("ref"),
                              normalize=self.cfg.normalize, epsilon=float(self.cfg.eps),
                              beta=float(self.cfg.beta))


@register("stabledrl")
class StableDRL(_SequenceELBO):
  """StableDRL (REFERENCE §4): importance weights clipped unconditionally at `clip_iw` and
  self-normalised over the group (or the micro-batch); loss −Σ w_i A_i L_i, no KL;
  A = r − mean_G r.

  Defaults (lower variance) and the release (`networks/llada_svpo.py`, `compute_loss_spg`, with
  `use_snis`), each by its field:
    estimator  any ELBO of `masking.ESTIMATORS` (default 'espo') | 'spg': SPG's block-random
               masks and per-token-mean ELBO/EUBO (`_get_per_seq_logps_spg`; egspo.diffusion.spg)
    bound      'elbo': L_i = the ELBO | 'spg': ELBO if A_i > 0, else ω·EUBO + (1 − ω)·ELBO
               (`final_per_seq_logps`); the weights always come from the ELBO
    iw_masks   'common': log w = ELBO_θ − ELBO_old on the same masks (each inner iteration's
               key) | 'independent': ELBO_old once per rollout from masks of its own
               (`ref_elbo`, drawn in `generate_and_score_completions_spg`), ELBO_θ from fresh masks
    normalize_over  'group' | 'micro_batch' (the release: its per-device batch, one prompt's
               16 completions at its configs, i.e. 'group' with G = 16)
  """

  section = "stabledrl"
  NORMALIZE_OVER = ("group", "micro_batch")
  ESTIMATORS = tuple(sorted(masking.ESTIMATORS)) + ("spg",)
  BOUNDS = ("elbo", "spg")
  IW_MASKS = ("common", "independent")

  @classmethod
  def validate_config(cls, f) -> None:
    super().validate_config(f)
    est = f.choice("stabledrl.estimator", cls.ESTIMATORS)
    num_mc = f.integer("stabledrl.num_mc", 1)
    f.integer("stabledrl.num_nodes", 1)
    f.real("stabledrl.clip_iw", 0.0, lo_open=True)
    f.choice("stabledrl.normalize_over", cls.NORMALIZE_OVER)
    f.real("stabledrl.log_iw_scale", 0.0, lo_open=True)
    bound = f.choice("stabledrl.bound", cls.BOUNDS)
    f.require(bound == "elbo" or est == "spg", "stabledrl.bound", bound,
              "the SPG bound needs stabledrl.estimator='spg' (its EUBO shares the ELBO's draws)")
    f.choice("stabledrl.iw_masks", cls.IW_MASKS)
    f.real("stabledrl.eubo_beta", 0.0, lo_open=True)
    f.real("stabledrl.mix_weight", 0.0, 1.0)
    f.real("stabledrl.p_mask_prompt", 0.0, 1.0, hi_open=True)
    if est == "spg":
      blocks = f.get("rollout.gen_length") // f.get("rollout.block_length")
      f.require(num_mc <= blocks, "stabledrl.num_mc", num_mc,
                f"the 'spg' estimator draws its num_mc masks from distinct blocks: must be <= "
                f"rollout.gen_length/rollout.block_length={blocks}")
    cls._validate_whole_groups(f)

  @property
  def needs_ref(self) -> bool:
    return False  # no KL term

  @property
  def independent_old(self) -> bool:
    return self.cfg.iw_masks == "independent"

  def quantity(self, model, mb, key):
    """[b] ELBO, or [b, 2] (ELBO, EUBO) for the 'spg' estimator."""
    if self.estimator_name() != "spg":
      return super().quantity(model, mb, key)
    toks = mb["tokens"]
    return spg.spg_estimate(
        self.logits_fn(model, toks.shape[-1]), key, mb["prompt_ids"], mb["prompt_mask"], toks,
        loss_lib.completion_mask_through_eos(toks, model.cfg.eos_token_id),
        mask_token_id=self.ctx.mask_token_id, block_length=self.ctx.config.rollout.block_length,
        num_t=int(self.cfg.num_mc), p_mask_prompt=float(self.cfg.p_mask_prompt),
        eubo_beta=float(self.cfg.eubo_beta))

  def likelihood_mean(self, old) -> float:
    return float(jnp.mean(old if old.ndim == 1 else old[:, 0]))  # the ELBO

  def loss_from(self, cur, mb):
    n = self.group_size if self.cfg.normalize_over == "group" else cur.shape[0]
    old, bound = mb["old"], None
    if cur.ndim == 2:  # the 'spg' estimator: (ELBO, EUBO)
      if self.cfg.bound == "spg":
        bound = spg.sandwich(cur[:, 0], cur[:, 1], mb["adv"], float(self.cfg.mix_weight))
      cur, old = cur[:, 0], old[:, 0]
    return loss_lib.stabledrl_loss(cur, old, mb["adv"], n, clip_iw=float(self.cfg.clip_iw),
                                   log_iw_scale=float(self.cfg.log_iw_scale), bound=bound)


@register("wd1")
class WD1(_SequenceELBO):
  """wd1 (REFERENCE §4, related work): ratio-free −Σ softmax(A/τ)_i ℓ_i + Σ softmax(−A/τ)_i ℓ_i on
  an ELBO estimate ℓ; needs neither old nor reference passes."""

  section = "wd1"
  needs_old = False

  @classmethod
  def validate_config(cls, f) -> None:
    super().validate_config(f)
    cls._validate_estimator(f)
    f.real("wd1.temperature", 0.0, lo_open=True)
    cls._validate_whole_groups(f)

  @property
  def needs_ref(self) -> bool:
    return False

  def loss_from(self, cur, mb):
    return loss_lib.wd1_loss(cur, mb["adv"], self.group_size,
                             temperature=float(self.cfg.temperature))
