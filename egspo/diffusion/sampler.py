"""The LLaDA semi-autoregressive sampler, recording what RL needs (REFERENCE §2, §3.1).

One denoising step (`denoise_step`): a forward pass over the canvas (prompt ++ completion, with a
key-padding mask for left-padded prompts), a candidate x0 at every position of the current block by
Gumbel-max sampling, a confidence (untempered probability of x0, or uniform noise for `random`
remasking), and the top-k most confident still-masked positions of the current block are
committed, k from the static schedule of `commit_schedule`. `generate` runs all T steps in one
`lax.scan` and returns a `Rollout` (egspo/diffusion/rollout.py): the step at which each position was
committed, its token, untempered log-prob and entropy, the per-step entropy and the per-step
one-step denoised guess x̂0. No canvas history is stored: `completion_at` rebuilds any x_t.

Differences from the reference sampler (ML-GSAI/LLaDA `generate.py`), all deliberate:
- a key-padding attention mask, so left-padded prompts do not attend padding (REFERENCE §2 defect);
- the LM head is applied to the completion only (prompt logits are never used);
- the mask token is never a candidate (neither for x0 nor for x̂0): a committed MASK would leave a
  "committed" position masked and break the schedule. The recorded log-probs and entropies use the
  full untempered softmax, exactly what the RL loss recomputes (REFERENCE §3.4);
- confidences are ranked in log space and in float32 (the reference uses float64 probabilities);
  ties go to the leftmost position (`lax.top_k` is stable).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from egspo.diffusion.rollout import Rollout

REMASKING = ("low_confidence", "random")
# SamplerConfig.cache: the block K/V cache of egspo/diffusion/cache.py (after Fast-dLLM).
CACHE_MODES = ("none", "prefix", "dual")

# logits_fn(ids [B, P+G] int32, attention_mask [B, P+G] bool) -> completion logits [B, G, V] float32.
LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """The LLaDA sampling schedule (REFERENCE §2). Hashable: usable as a static jit argument.

  gen_length:    G, completion length (a multiple of block_length).
  steps:         T, total denoising steps (a multiple of the number of blocks).
  block_length:  length of one semi-autoregressive block.
  mask_token_id: the model's mask token.
  temperature:   τ ≥ 0 of the Gumbel-max sampling; 0 = greedy argmax.
  remasking:     'low_confidence' (commit the most probable candidates) or 'random'.
  cache:         'none' (every step runs the whole canvas), 'prefix' or 'dual' (a block K/V
                 cache, egspo/diffusion/cache.py; needs the model: `generate_from_state`).
  cache_refresh: with a cache, a full forward refills it every `cache_refresh` steps of a block
                 (a divisor of the steps per block); 0 = at each block's first step only, as
                 Fast-dLLM. 1 runs every step in full (the cache then changes nothing).
  record_x0_hat: record the per-step x̂0 (RL's one-step values); False (evaluation) runs the LM
                 head on the current block only and leaves `Rollout.x0_hat` None.
  cfg_scale:     classifier-free guidance s ≥ 0 (0 = none): logits = u + (s + 1)(c − u), u from the
                 canvas with its prompt masked (`guided_logits`); needs cache='none'.
  """

  gen_length: int
  steps: int
  block_length: int
  mask_token_id: int
  temperature: float = 0.0
  remasking: str = "low_confidence"
  cache: str = "none"
  record_x0_hat: bool = True
  cfg_scale: float = 0.0
  cache_refresh: int = 0

  def __post_init__(self):
    if self.mask_token_id is None:
      raise SamplerConfigError("mask_token_id", None, "must be a non-negative token id")
    check_sampling(**dataclasses.asdict(self))

  @property
  def num_blocks(self) -> int:
    return self.gen_length // self.block_length

  @property
  def steps_per_block(self) -> int:
    return self.steps // self.num_blocks

  @property
  def steps_per_refresh(self) -> int:
    """Steps between two full forwards of the cached sampler (the steps per block when 0)."""
    return self.cache_refresh or self.steps_per_block

  def replace(self, **kw) -> "SamplerConfig":
    return dataclasses.replace(self, **kw)


class SamplerConfigError(ValueError):
  """A bad sampler field: `field`, its `value` and `why` (the config wraps it in its own error)."""

  def __init__(self, field: str, value: Any, why: str, owner: str = "SamplerConfig"):
    super().__init__(f"{owner}.{field}={value!r}: {why}")
    self.field, self.value, self.why = field, value, why


def check_sampling(gen_length, steps, block_length, mask_token_id=None, temperature=0.0,
                   remasking="low_confidence", cache="none", record_x0_hat=True,
                   cfg_scale=0.0, cache_refresh=0, *, prefix: str = "") -> None:
  """Raises `SamplerConfigError` for the first bad `SamplerConfig` field (`mask_token_id=None`:
  not known yet, not checked); `prefix` names the other fields in the reasons (e.g. 'rollout.')."""
  def bad(field, value, why):
    raise SamplerConfigError(field, value, why)

  def is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

  for field, v in (("gen_length", gen_length), ("steps", steps), ("block_length", block_length)):
    if not is_int(v) or v <= 0:
      bad(field, v, "must be a positive integer")
  if mask_token_id is not None and (not is_int(mask_token_id) or mask_token_id < 0):
    bad("mask_token_id", mask_token_id, "must be a non-negative token id")
  if gen_length % block_length:
    bad("gen_length", gen_length, f"must be divisible by {prefix}block_length={block_length}")
  blocks = gen_length // block_length
  if steps % blocks:
    bad("steps", steps, f"must be divisible by the number of blocks "
                        f"{prefix}gen_length/block_length={blocks}")
  if steps // blocks > block_length:
    bad("steps", steps, f"gives {steps // blocks} steps per block, more than "
                        f"{prefix}block_length={block_length} (a step would commit no token)")
  if (not isinstance(temperature, numbers.Real) or isinstance(temperature, bool)
      or not np.isfinite(temperature) or temperature < 0):
    bad("temperature", temperature, "must be a finite number >= 0")
  if not isinstance(remasking, str) or remasking not in REMASKING:
    bad("remasking", remasking, f"must be one of {REMASKING}")
  if not isinstance(cache, str) or cache not in CACHE_MODES:
    bad("cache", cache, f"must be one of {CACHE_MODES}")
  if not isinstance(record_x0_hat, (bool, np.bool_)):
    bad("record_x0_hat", record_x0_hat, "must be True or False")
  if (not isinstance(cfg_scale, numbers.Real) or isinstance(cfg_scale, bool)
      or not np.isfinite(cfg_scale) or cfg_scale < 0):
    bad("cfg_scale", cfg_scale, "must be a finite number >= 0")
  if cfg_scale > 0 and cache != "none":
    bad("cfg_scale", cfg_scale, f"classifier-free guidance needs {prefix}cache='none' "
                                f"(got {cache!r})")
  if not is_int(cache_refresh) or cache_refresh < 0:
    bad("cache_refresh", cache_refresh, "must be an integer >= 0 (0 = at each block start)")
  if cache_refresh and cache == "none":
    bad("cache_refresh", cache_refresh, f"needs {prefix}cache='prefix' or 'dual' (got 'none')")
  if cache_refresh and (steps // blocks) % cache_refresh:
    bad("cache_refresh", cache_refresh, f"must divide the {steps // blocks} steps per block "
                                        f"({prefix}steps / ({prefix}gen_length/block_length))")


def commit_schedule(config: SamplerConfig) -> np.ndarray:
  """[T] int32: tokens committed at each step (REFERENCE §2).

  Inside each block of `block_length` masked positions, step s of S commits
  `block_length // S` tokens plus one for the first `block_length % S` steps; every block is
  fully masked when it starts, so the schedule is the same for every block and every sample.
  """
  s, n = config.steps_per_block, config.block_length
  per_block = np.full(s, n // s, np.int32)
  per_block[: n % s] += 1
  return np.tile(per_block, config.num_blocks)


def step_blocks(config: SamplerConfig) -> np.ndarray:
  """[T] int32: the block decoded at each step."""
  return np.arange(config.steps, dtype=np.int32) // config.steps_per_block


@struct.dataclass
class StepOutput:
  """What one denoising step leaves (B samples, completion length G).

  completion:   [B, G] int32, the completion after the step's commits.
  committed:    [B, G] bool, the positions committed at this step (the action a_t).
  logprob:      [B, G] float32, untempered log softmax(logits)[token] at committed positions, 0 elsewhere.
  entropy:      [B, G] float32, −Σ_v p log(p + 1e-8) at committed positions, 0 elsewhere.
  step_entropy: [B] float32, mean of `entropy` over the committed positions (H_t, REFERENCE §3.2).
  x0_hat:       [B, G] int32, untempered argmax at every position still masked before the step,
                committed tokens kept (REFERENCE §3.1).
  """

  completion: jax.Array
  committed: jax.Array
  logprob: jax.Array
  entropy: jax.Array
  step_entropy: jax.Array
  x0_hat: jax.Array


def _argmax_no_mask(scores, mask_token_id: int):
  """argmax over the last axis with the mask token excluded: [..., V] → [...] int32."""
  vocab = jax.lax.broadcasted_iota(jnp.int32, scores.shape, scores.ndim - 1)
  return jnp.argmax(jnp.where(vocab == mask_token_id, -jnp.inf, scores), axis=-1).astype(jnp.int32)


def denoise_step(logits_fn: LogitsFn, prompt_ids, prompt_mask, completion, step, key,
                 config: SamplerConfig) -> StepOutput:
  """One LLaDA denoising step from state x_t = prompt ++ completion (REFERENCE §2). Pure, jittable.

  prompt_ids [B, P] int, prompt_mask [B, P] bool (left padding = False); completion [B, G] int32
  with MASK at undecided positions; step: the step index t (int or traced int32 scalar);
  key: PRNG key of this step (used for the Gumbel noise at τ > 0 and for `random` remasking).

  Candidates: x0 = argmax(logits/τ + Gumbel) (exact argmax at τ = 0), mask token excluded.
  Confidence: untempered log softmax(logits)[x0] ('low_confidence') or U(0,1) ('random'); −inf at
  committed positions and outside the current block. The k = commit_schedule[t] most confident
  positions are committed.
  """
  chex.assert_rank([prompt_ids, prompt_mask, completion, step], [2, 2, 2, 0])
  chex.assert_equal_shape([prompt_ids, prompt_mask])
  chex.assert_equal_shape_prefix([prompt_ids, completion], 1)
  chex.assert_type([prompt_ids, completion, step], int)
  b, g = completion.shape
  if g != config.gen_length:
    raise ValueError(f"completion has length {g}, but config.gen_length={config.gen_length}")
  mask_id = config.mask_token_id
  step = jnp.asarray(step, jnp.int32)

  ids = jnp.concatenate([prompt_ids.astype(jnp.int32), completion], axis=1)
  attn = jnp.concatenate([prompt_mask.astype(bool), jnp.ones((b, g), bool)], axis=1)
  if config.cfg_scale > 0:
    logits = guided_logits(logits_fn, ids, attn, prompt_ids.shape[1], config)
  else:
    logits = logits_fn(ids, attn).astype(jnp.float32)  # [B, G, V]
  if logits.shape[:2] != (b, g):
    raise ValueError(f"logits_fn must return completion logits [B={b}, G={g}, V], "
                     f"got {logits.shape}")

  masked = completion == mask_id  # [B, G]
  x0_hat = jnp.where(masked, _argmax_no_mask(logits, mask_id), completion)
  # Everything committed at this step lies in the current block: work on that slice only (the
  # Gumbel noise, log-softmax and entropy cost [B, block_length, V] instead of [B, G, V]).
  start = (step // config.steps_per_block) * config.block_length
  blk_logits = jax.lax.dynamic_slice_in_dim(logits, start, config.block_length, axis=1)
  new, committed, logprob, entropy, step_entropy = commit_block(completion, blk_logits, step, key,
                                                                config)
  return StepOutput(completion=new, committed=committed, logprob=logprob, entropy=entropy,
                    step_entropy=step_entropy, x0_hat=x0_hat)


def guided_logits(logits_fn: LogitsFn, ids, attn, prompt_length: int, config: SamplerConfig):
  """Classifier-free guidance of the released trainer's `generate` (`vishnutez/egspo-dllm-rl`,
  `egspo/egspo_trainer.py` lines 254–262; LLaDA's sampler): one forward over the canvas and its
  unconditional copy, whose prompt positions are all MASK, then u + (s + 1)(c − u) in float32.
  Padding stays unattended in both halves (the release masks and attends it). The rollout records
  this guided distribution (log-probs, entropies, x̂0), as the release does, while the training
  forwards score the unguided policy (the release's `_get_per_token_logps_unbiased`), so at
  cfg_scale > 0 the first ratio is not 1.
  """
  un_ids = ids.at[:, :prompt_length].set(config.mask_token_id)
  both = logits_fn(jnp.concatenate([ids, un_ids], axis=0), jnp.concatenate([attn, attn], axis=0))
  cond, uncond = jnp.split(both.astype(jnp.float32), 2, axis=0)
  return uncond + (config.cfg_scale + 1.0) * (cond - uncond)


def commit_block(completion, blk_logits, step, key, config: SamplerConfig):
  """The commit rule of step `step` on the current block's untempered logits [B, bl, V] float32
  (`denoise_step` after its forward; the block cache's steps too).

  Returns (completion, committed, logprob, entropy, step_entropy) as in `StepOutput`.
  """
  b, g = completion.shape
  mask_id, bl = config.mask_token_id, config.block_length
  counts = jnp.asarray(commit_schedule(config))
  kmax = int(commit_schedule(config).max())
  step = jnp.asarray(step, jnp.int32)
  start = (step // config.steps_per_block) * bl
  blk_comp = jax.lax.dynamic_slice_in_dim(completion, start, bl, axis=1)  # [B, bl]
  blk_masked = blk_comp == mask_id
  gumbel_key, remask_key = jax.random.split(key)
  if config.temperature == 0:
    x0 = _argmax_no_mask(blk_logits, mask_id)
  else:
    noise = jax.random.gumbel(gumbel_key, blk_logits.shape, jnp.float32)
    x0 = _argmax_no_mask(blk_logits / config.temperature + noise, mask_id)
  logp = jax.nn.log_softmax(blk_logits, axis=-1)  # untempered
  lp = jnp.take_along_axis(logp, x0[..., None], axis=-1)[..., 0]  # [B, bl]
  p = jnp.exp(logp)
  ent = -jnp.sum(p * jnp.log(p + 1e-8), axis=-1)  # [B, bl]

  if config.remasking == "low_confidence":
    conf = lp  # log p: the same order as p, finer resolution near p = 1
  else:
    conf = jax.random.uniform(remask_key, (b, bl), jnp.float32)
  conf = jnp.where(blk_masked, conf, -jnp.inf)
  k = counts[step]
  _, top = jax.lax.top_k(conf, kmax)  # [B, kmax], the static largest count, cut to k below
  take = jnp.arange(kmax) < k
  commit = jnp.any(jax.nn.one_hot(top, bl, dtype=bool) & take[None, :, None], axis=1)
  commit = commit & blk_masked  # never needed by the schedule; guards the invariant

  blk_new = jnp.where(commit, x0, blk_comp)
  new_completion = jax.lax.dynamic_update_slice_in_dim(completion, blk_new, start, axis=1)

  def to_full(x):
    return jax.lax.dynamic_update_slice_in_dim(jnp.zeros((b, g), x.dtype), x, start, axis=1)

  n_commit = jnp.maximum(jnp.sum(commit, axis=1), 1)
  step_entropy = jnp.sum(jnp.where(commit, ent, 0.0), axis=1) / n_commit
  return (new_completion, to_full(commit), to_full(jnp.where(commit, lp, 0.0)),
          to_full(jnp.where(commit, ent, 0.0)), step_entropy)


def generate(logits_fn, prompt_ids, prompt_mask, key, config: SamplerConfig,
             return_states: bool = False, params=None):
  """The whole semi-autoregressive schedule in one `lax.scan` over the T steps. Pure, jittable.

  prompt_ids [B, P] int (left-padded), prompt_mask [B, P] bool; key: PRNG key (step t uses
  fold_in(key, t)). `logits_fn(ids, attention_mask)` → completion logits [B, G, V]; or, when
  `params` (a pytree, e.g. an NNX state) is given, `logits_fn(params, ids, attention_mask)`, with
  `params` passed into the loop as an operand rather than closed over.
  Returns a `Rollout`; with `return_states` also the completions the sampler saw before each step,
  [B, T, G] (a debugging/testing aid: `completion_at` rebuilds them).
  Call it inside your own `jax.jit` (with shardings) or use `generate_with_model`.
  """
  if prompt_ids.ndim != 2:
    raise ValueError(f"prompt_ids must be [batch, prompt_length], got shape {prompt_ids.shape}")
  if prompt_mask.shape != prompt_ids.shape:
    raise ValueError(f"prompt_mask shape {prompt_mask.shape} != prompt_ids shape "
                     f"{prompt_ids.shape}")
  if config.cache != "none":
    raise ValueError(f"SamplerConfig.cache={config.cache!r} needs the model, not a logits_fn: "
                     "use generate_from_state, generate_model or generate_with_model")
  b, g = prompt_ids.shape[0], config.gen_length
  completion0 = jnp.full((b, g), config.mask_token_id, jnp.int32)

  def body(carry, t):
    completion, commit_step, logprob, entropy, p = carry
    fn = logits_fn if params is None else functools.partial(logits_fn, p)
    out = denoise_step(fn, prompt_ids, prompt_mask, completion, t, jax.random.fold_in(key, t),
                       config)
    carry = (out.completion, jnp.where(out.committed, t, commit_step),
             jnp.where(out.committed, out.logprob, logprob),
             jnp.where(out.committed, out.entropy, entropy), p)
    ys = (out.step_entropy, out.x0_hat if config.record_x0_hat else None) + (
        (completion,) if return_states else ())
    return carry, ys

  init = (completion0, jnp.full((b, g), config.steps, jnp.int32), jnp.zeros((b, g), jnp.float32),
          jnp.zeros((b, g), jnp.float32), params)
  (tokens, commit_step, logprob, entropy, _), ys = jax.lax.scan(
      body, init, jnp.arange(config.steps, dtype=jnp.int32))
  rollout = Rollout(prompt_ids=prompt_ids.astype(jnp.int32), prompt_mask=prompt_mask.astype(bool),
                    tokens=tokens, commit_step=commit_step, logprob=logprob, entropy=entropy,
                    step_entropy=ys[0].T,
                    x0_hat=None if ys[1] is None else jnp.swapaxes(ys[1], 0, 1))
  if return_states:
    return rollout, jnp.swapaxes(ys[2], 0, 1)
  return rollout


def nnx_logits_fn(graphdef, gen_length: int):
  """fn(state, ids, attention_mask) → completion logits [B, G, V] of the NNX LLaDA (graphdef, state).

  The LM head is applied to the last `gen_length` positions only. Use it with `generate(...,
  params=state)`: the state then enters the scan as an operand, which NNX transforms inside the
  model (the scanned layer stack) require."""

  def fn(state, ids, attention_mask):
    model = nnx.merge(graphdef, state)
    hidden = model.hidden_states(ids, attention_mask)
    return model.logits(hidden[:, -gen_length:])

  return fn


def model_logits_fn(model, gen_length: int) -> LogitsFn:
  """A closure `LogitsFn` of a LLaDA model object, for `denoise_step` outside `generate`."""
  graphdef, state = nnx.split(model)
  return functools.partial(nnx_logits_fn(graphdef, gen_length), state)


def uses_block_loop(config: SamplerConfig) -> bool:
  """Does the model-level sampler run egspo/diffusion/cache.py's block loop: with a cache, or
  (unguided) without x̂0, where the LM head runs on the current block only."""
  return config.cache != "none" or (not config.record_x0_hat and config.cfg_scale == 0)


def generate_from_state(graphdef, state, prompt_ids, prompt_mask, key, config: SamplerConfig,
                        return_states: bool = False):
  """`generate` for an NNX model given as (graphdef, state) = nnx.split(model). Pure, jittable:
  a training step can call it inside its own `jax.jit` with sharded `state`. With
  `config.cache` or without `record_x0_hat`: the block loop of egspo/diffusion/cache.py."""
  if uses_block_loop(config):
    from egspo.diffusion import cache  # pylint: disable=import-outside-toplevel
    return cache.generate(graphdef, state, prompt_ids, prompt_mask, key, config,
                          commit=commit_block, greedy=_argmax_no_mask,
                          return_states=return_states)
  return generate(nnx_logits_fn(graphdef, config.gen_length), prompt_ids, prompt_mask, key,
                  config, return_states=return_states, params=state)


def generate_model(model, prompt_ids, prompt_mask, key, config: SamplerConfig):
  """The `Rollout` of a LLaDA model object inside the caller's own `jax.jit` (the trainer's
  rollout and evaluation): `generate(model_logits_fn(...))` for `cache='none'` with x̂0, else
  `generate_from_state`."""
  if not uses_block_loop(config):
    return generate(model_logits_fn(model, config.gen_length), prompt_ids, prompt_mask, key,
                    config)
  return generate_from_state(*nnx.split(model), prompt_ids, prompt_mask, key, config)


_generate_jit = jax.jit(generate_from_state, static_argnames=("graphdef", "config",
                                                              "return_states"))


def check_model_config(model_cfg, config: SamplerConfig, prompt_length: int):
  """Clear errors when a sampler config does not fit a model config (mask id, maximum length)."""
  if config.mask_token_id != model_cfg.mask_token_id:
    raise ValueError(f"SamplerConfig.mask_token_id={config.mask_token_id} differs from the "
                     f"model's mask_token_id={model_cfg.mask_token_id}")
  total = prompt_length + config.gen_length
  if total > model_cfg.max_sequence_length:
    raise ValueError(f"prompt length {prompt_length} + gen_length {config.gen_length} = {total} "
                     f"exceeds the model's max_sequence_length={model_cfg.max_sequence_length}")


def generate_with_model(model, prompt_ids, prompt_mask, key, config: SamplerConfig,
                        return_states: bool = False):
  """Convenience wrapper: jitted `generate` for a `LLaDA` model (compiled once per shape/config)."""
  prompt_ids, prompt_mask = jnp.asarray(prompt_ids), jnp.asarray(prompt_mask)
  check_model_config(model.cfg, config, prompt_ids.shape[-1])
  graphdef, state = nnx.split(model)
  return _generate_jit(graphdef, state, prompt_ids, prompt_mask, key, config,
                       return_states=return_states)


def decode_completions(rollout_or_tokens, tokenizer, stop_ids=None, *, cut: bool = True,
                       skip_special: bool = True) -> list[str]:
  """Texts of the completions: by default each cut at its first EOS (or any of `stop_ids`), special
  tokens dropped. `cut=False` decodes every position; `skip_special=False` keeps special tokens
  as text (e.g. "<|eot_id|><|endoftext|>"). `decode_options` gives the release's settings.

  rollout_or_tokens: a `Rollout` or completion tokens [B, G].
  """
  tokens = rollout_or_tokens.tokens if isinstance(rollout_or_tokens, Rollout) else rollout_or_tokens
  tokens = np.asarray(tokens)
  if stop_ids is None:
    stop_ids = [tokenizer.eos_id] + [i for i in [getattr(tokenizer, "eot_id", None)]
                                     if i is not None]
  rows = [cut_at_stop(row, stop_ids) if cut else row for row in tokens.tolist()]
  if skip_special:
    return [tokenizer.decode(row) for row in rows]
  return [tokenizer.decode(row, skip_special=False) for row in rows]


def decode_options(reference: bool, purpose: str) -> dict:
  """`decode_completions` keyword arguments. Default: cut at the first EOS, specials dropped.
  reference=True reproduces the release: training rewards decode every position with special
  tokens dropped (text after an EOS counts); evaluation keeps the special tokens."""
  if purpose not in ("train", "eval"):
    raise ValueError(f"decode purpose must be 'train' or 'eval', got {purpose!r}")
  if not reference:
    return {"cut": True, "skip_special": True}
  return {"cut": False, "skip_special": purpose == "train"}


def cut_at_stop(ids, stop_ids) -> list[int]:
  """The ids before the first stop id."""
  stop = set(int(s) for s in stop_ids)
  out = []
  for i in ids:
    if int(i) in stop:
      break
    out.append(int(i))
  return out
