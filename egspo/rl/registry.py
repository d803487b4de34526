"""The registry of RL methods and the contract between the trainer and a method.

A method is a class registered by name (`--config.algorithm=NAME`):

  Method(ctx: Context)
  plan(params, frozen, it: Iteration) -> (batches, metrics)
      Host-side and jitted no-grad work on one iteration's rollout: step selection, values,
      advantages, old/reference likelihoods. Each batch is a pytree of arrays with a leading
      micro-batch axis [A, b, ...] (`split_micro`), one optimizer step each.
  loss(model, micro_batch, key) -> (loss_sum, denom, metrics)
      A pure function of arrays, differentiated by `egspo.rl.update.make_update_step`.
  validate_config(fields)  (classmethod)
      Checks the method's config section through `fields` (an `egspo.config.Fields`: typed reads
      that raise `ConfigError` naming the field); `egspo.config.validate` calls it for the
      selected method.
  optimizer_steps_per_iteration(config) -> int  (classmethod, optional: 1 without it)
      How many batches `plan` returns, i.e. optimizer steps per RL iteration: the learning-rate
      schedule counts optimizer steps (`optimizer_steps_per_iteration` below).

A new method is one registered class plus its config section; importing `egspo.rl` registers
the built-in ones (`egspo.rl.algorithms`, `egspo.rl.baselines`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from egspo.diffusion.rollout import Rollout

_REGISTRY: dict[str, type] = {}


def _same_class(a: type, b: type) -> bool:
  """The same class, or a redefinition of it (a reloaded module, a re-run notebook cell)."""
  return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def register(*names: str):
  """Class decorator: registers the method under each of `names` (a name another class holds
  is refused)."""
  def deco(cls):
    for n in names:
      if n in _REGISTRY and not _same_class(_REGISTRY[n], cls):
        raise ValueError(f"algorithm {n!r} is already registered by {_REGISTRY[n].__qualname__}")
      _REGISTRY[n] = cls
    return cls

  return deco


def unregister(name: str) -> None:
  """Removes a registered name (tests that register a method of their own)."""
  _REGISTRY.pop(name, None)


def get_algorithm(name: str) -> type:
  if name not in _REGISTRY:
    raise ValueError(f"unknown algorithm {name!r}; registered: {registered()}")
  return _REGISTRY[name]


def registered() -> list[str]:
  return sorted(_REGISTRY)


def optimizer_steps_per_iteration(config) -> int:
  """Optimizer steps one RL iteration of `config.algorithm` takes (its method's
  `optimizer_steps_per_iteration(config)`; 1 for a method without one)."""
  method = get_algorithm(config.algorithm)
  count = getattr(method, "optimizer_steps_per_iteration", None)
  return 1 if count is None else int(count(config))


@dataclasses.dataclass
class Iteration:
  """One RL iteration's rollout and rewards (B = num_prompts × G completions, groups contiguous)."""

  rollout: Rollout
  rewards: np.ndarray  # [B] float32
  examples: list  # [B] task examples (each prompt's example repeated G times)
  key: jax.Array
  step: int = 0  # optimizer steps applied before this rollout (RL stage)


@dataclasses.dataclass
class Context:
  """What methods need from the trainer."""

  config: Any  # the experiment ConfigDict
  policy: Any  # egspo.rl.update.Policy: params (+ frozen) -> model
  ref_params: Any  # frozen reference policy's trainable part (see update.reference_params)
  mask_token_id: int
  max_commit: int  # the most tokens one sampler step commits
  reward_fn: Callable[[list, list], np.ndarray]  # (texts, examples) -> [B]
  decode_fn: Callable[[np.ndarray], list]  # completion tokens [N, G] -> texts (cut at EOS)
  to_host: Callable[[Any], np.ndarray] = np.asarray  # a (multi-host) array → full numpy array
  # The correctness term alone, (texts, examples) -> [B] (Task.correctness_rewards): EGSPO's
  # `egspo.correctness_step_reward_only` scores the one-step guesses with it.
  step_reward_fn: Callable[[list, list], np.ndarray] | None = None


def split_micro(tree, micro_batch_size: int):
  """[B, ...] leaves → [B / m, m, ...] (the micro-batch axis of a planned batch)."""

  def f(x):
    b = x.shape[0]
    if b % micro_batch_size:
      raise ValueError(f"batch {b} is not divisible by micro_batch_size {micro_batch_size}")
    return x.reshape((b // micro_batch_size, micro_batch_size) + x.shape[1:])

  return jax.tree.map(f, tree)
