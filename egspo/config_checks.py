"""Validation of the experiment config: every field the code reads, checked before anything is
built (type, range, finiteness, choices). The choices come from their owners (the method registry,
the model presets, the sampler); the selected method checks its own section through `Fields`
(`Algorithm.validate_config`). `egspo.config` re-exports `validate` and `ConfigError`.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any

import ml_collections

VARIANTS = ("", "8b", "reference", "tiny")
RANDOM_INIT = "random"  # model.checkpoint value: the preset with seeded random weights
# What the released trainer trains the generator tasks on (egspo/data_utils.py), for ':reference'.
RELEASE_TRAIN_DATA = {
    "countdown": "Jiayi-Pan/Countdown-Tasks-3to4 (train split; its last 500 rows after "
                 "shuffle(seed=42) held out, as released)",
    "sudoku": "the release's dataset/4x4_sudoku_unique_puzzles.csv (Puzzle/Solution columns; its "
              "last 500 rows after shuffle(seed=42) held out)",
}


class ConfigError(ValueError):
  """A bad experiment config; the message is one line naming the field, its value and what is
  allowed (`egspo.main` prints it as `error: ...` and exits with status 2)."""


def _get(c: ml_collections.ConfigDict, field: str) -> Any:
  node = c
  for i, part in enumerate(field.split(".")):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      raise ConfigError(f"missing config field {field} (the config has no "
                        f"{'.'.join(field.split('.')[:i + 1])})")
    node = node[part]
  return node


def _fail(field: str, value: Any, allowed: str) -> None:
  raise ConfigError(f"bad config field {field}={value!r}: {allowed}")


def _check(cond: bool, field: str, value: Any, why: str) -> None:
  if not cond:
    _fail(field, value, why)


def _is_int(v: Any) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _int(c, field: str, lo: int | None = None, hi: int | None = None, also: tuple = ()) -> int:
  """An integer field in [lo, hi] (or one of the special values `also`, e.g. -1 = all)."""
  v = _get(c, field)
  ok = _is_int(v) and (v in also or ((lo is None or v >= lo) and (hi is None or v <= hi)))
  if not ok:
    rng = (f">= {lo}" if hi is None else f"in [{lo}, {hi}]") if lo is not None else ""
    extra = " or ".join(str(a) for a in also)
    _fail(field, v, f"must be an integer {rng}{' or ' + extra if extra else ''}".rstrip())
  return v


def _real(c, field: str, lo: float | None = None, hi: float | None = None, *,
          lo_open: bool = False, hi_open: bool = False) -> float:
  """A finite real field in the interval given by lo/hi (open ends where asked)."""
  v = _get(c, field)
  ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
  if ok and lo is not None:
    ok = v > lo if lo_open else v >= lo
  if ok and hi is not None:
    ok = v < hi if hi_open else v <= hi
  if not ok:
    if lo is not None and hi is not None:
      rng = f" in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
      rng = f" {'>' if lo_open else '>='} {lo:g}"
    elif hi is not None:
      rng = f" {'<' if hi_open else '<='} {hi:g}"
    else:
      rng = ""
    _fail(field, v, f"must be a finite number{rng}")
  return float(v)


def _choice(c, field: str, choices) -> Any:
  v = _get(c, field)
  if not isinstance(v, str) or v not in choices:
    _fail(field, v, f"must be one of {tuple(choices)}")
  return v


def _bool(c, field: str) -> bool:
  v = _get(c, field)
  _check(isinstance(v, bool), field, v, "must be True or False")
  return v


def _str(c, field: str) -> str:
  v = _get(c, field)
  _check(isinstance(v, str), field, v, "must be a string")
  return v


def _local_file(c, field: str) -> None:
  """'' or an existing local file (read with egspo.tasks.data.read_records)."""
  v = _str(c, field)
  if v and not os.path.isfile(os.path.expanduser(v)):
    _fail(field, v, f"no such file (cwd {os.getcwd()})")


class Fields:
  """Typed reads of a config's fields, each raising `ConfigError` naming the field, its value and
  what is allowed. `validate` uses them, and passes one to the selected method's
  `validate_config` (egspo.rl.registry), which checks its own section with them."""

  def __init__(self, c: ml_collections.ConfigDict):
    self.config = c

  def get(self, field: str) -> Any:
    return _get(self.config, field)

  def integer(self, field: str, lo: int | None = None, hi: int | None = None,
              also: tuple = ()) -> int:
    return _int(self.config, field, lo, hi, also)

  def real(self, field: str, lo: float | None = None, hi: float | None = None, *,
           lo_open: bool = False, hi_open: bool = False) -> float:
    return _real(self.config, field, lo, hi, lo_open=lo_open, hi_open=hi_open)

  def choice(self, field: str, choices) -> Any:
    return _choice(self.config, field, choices)

  def boolean(self, field: str) -> bool:
    return _bool(self.config, field)

  def string(self, field: str) -> str:
    return _str(self.config, field)

  def require(self, cond: bool, field: str, value: Any, why: str) -> None:
    _check(cond, field, value, why)


def validate(c: ml_collections.ConfigDict) -> None:
  """Checks type, range, finiteness and choices of every field the code reads (the selected
  method's section by its own `validate_config`); raises `ConfigError` naming the first bad
  field, its value and the allowed values.

  Imports the method registry (JAX; no backend is started): under two CPU-seconds.
  """
  # pylint: disable-next=import-outside-toplevel  (egspo.main fails fast on a bad file first)
  from egspo.rl import algorithms, registry

  _int(c, "seed", 0, 2**31 - 1)
  _choice(c, "variant", VARIANTS)
  algorithm = _choice(c, "algorithm", registry.registered())
  _validate_task(c)
  _validate_model(c)
  _validate_mesh(c)

  _sampling(c, "rollout")
  _real(c, "rollout.tis_cap", 1.0)  # a weight cap below 1 would shrink every on-policy step
  prompt_len = _int(c, "rollout.max_prompt_length", 1)
  _sampling(c, "eval")
  _int(c, "eval.batch_size", 1)
  _bool(c, "eval.before_training")
  _check_sequence_length(c, prompt_len)

  prompts = _int(c, "batch.num_prompts", 1)
  group = _int(c, "batch.group_size", 2)  # advantages are relative to the group
  micro = _int(c, "batch.micro_batch_size", 1)
  _check(prompts * group % micro == 0, "batch.micro_batch_size", micro,
         f"must divide batch.num_prompts*batch.group_size={prompts * group}")

  _real(c, "optim.learning_rate", 0.0, lo_open=True)
  _real(c, "optim.b1", 0.0, 1.0, hi_open=True)
  _real(c, "optim.b2", 0.0, 1.0, hi_open=True)
  _real(c, "optim.weight_decay", 0.0)
  _real(c, "optim.max_grad_norm", 0.0, lo_open=True)
  warmup = _int(c, "optim.warmup_steps", 0)
  schedule = _choice(c, "optim.schedule", ("constant", "cosine"))

  _validate_sft(c)

  iters = _int(c, "train.num_iterations", 0)
  _choice(c, "train.update_schedule", algorithms.UPDATE_SCHEDULES)
  _real(c, "train.time_budget_s", 0.0)
  for name in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
               "max_refused_updates"):
    _int(c, f"train.{name}", 1)
  registry.get_algorithm(algorithm).validate_config(Fields(c))
  if schedule == "cosine":  # the schedule counts optimizer steps (egspo.train.rl_optimizer)
    per = registry.optimizer_steps_per_iteration(c)
    _check(iters * per > warmup, "optim.warmup_steps", warmup,
           f"optim.schedule='cosine' decays over the RL stage's {iters * per} optimizer steps "
           f"(train.num_iterations={iters} × {per} per iteration): must be fewer")


def _validate_task(c) -> None:
  # pylint: disable-next=import-outside-toplevel  (no JAX)
  from egspo import tasks as tasks_lib
  from egspo.tasks import data as data_lib  # pylint: disable=import-outside-toplevel

  _choice(c, "task.name", tasks_lib.task_names())
  _choice(c, "task.prompt_style", ("chat", "plain"))
  _choice(c, "task.eval_source", ("file", "generated"))
  _choice(c, "task.prompt_truncation", data_lib.PROMPT_TRUNCATIONS)
  _int(c, "task.num_eval_examples", 0)
  options = _get(c, "task.options")
  _check(isinstance(options, (ml_collections.ConfigDict, dict)), "task.options", options,
         "must be a ConfigDict of keyword arguments of the task")
  _local_file(c, "task.train_file")
  _local_file(c, "task.eval_file")
  name = _get(c, "task.name")
  if _get(c, "variant") == "reference" and name in RELEASE_TRAIN_DATA:
    # The release trains on a dataset file, not on generated problems.
    train_file = _get(c, "task.train_file")
    env = f"EGSPO_{name.upper()}_TRAIN_FILE"
    _check(bool(train_file or os.environ.get(env)), "task.train_file", train_file,
           f"the reference recipe trains {name} on {RELEASE_TRAIN_DATA[name]}: pass a local copy "
           f"(--config.task.train_file=FILE or ${env})")


def _validate_model(c) -> None:
  from egspo.model import llada  # pylint: disable=import-outside-toplevel  (starts no backend)

  preset = _choice(c, "model.preset", sorted(llada.PRESETS))
  ckpt = _str(c, "model.checkpoint")
  for name in ("param_dtype", "dtype"):
    _choice(c, f"model.{name}", sorted(llada.DTYPES))
  _bool(c, "model.remat")
  _bool(c, "model.scan_layers")
  _choice(c, "model.attention_impl", list(llada.ATTENTION_IMPLS))
  tok = _str(c, "tokenizer")
  if preset == "llada_8b" and not ckpt:
    if _get(c, "variant") == "reference":
      _fail("model.checkpoint", ckpt, "the reference recipe starts RL from LLaDA-sft-s1k-merged "
            "(LLaDA-8B-Instruct after d1's masked SFT on s1K, LoRA merged; d1's SFT/sft_train.py): "
            "--config.model.checkpoint=DIR of it (HF or converted); 'random' only for smoke runs")
    _fail("model.checkpoint", ckpt, "the llada_8b preset needs a converted or HF checkpoint "
          "(--config.model.checkpoint=DIR); random 8B weights only with model.checkpoint=random")
  if ckpt in ("", RANDOM_INIT):  # the preset's architecture with seeded random weights
    _check(tok != "", "tokenizer", tok, f"must be 'char' or a tokenizer directory when "
           f"model.checkpoint={ckpt!r} (there is no checkpoint to take it from)")
    if preset == "llada_8b":
      _check(tok != "char", "tokenizer", tok, "the llada_8b preset needs LLaDA's tokenizer "
             "directory, not the built-in 'char' tokenizer")
    else:
      _check(tok == "char", "tokenizer", tok, f"model.preset={preset!r} is built over the "
             "built-in 'char' tokenizer; must be 'char'")
  _bool(c, "lora.enabled")
  _int(c, "lora.rank", 1)
  _real(c, "lora.alpha", 0.0, lo_open=True)
  _real(c, "lora.dropout", 0.0, 1.0, hi_open=True)
  targets = _str(c, "lora.targets")
  from egspo.model import lora  # pylint: disable=import-outside-toplevel  (starts no backend)

  why = lora.targets_error(targets)
  _check(why is None, "lora.targets", targets, why)


def _validate_mesh(c) -> None:
  _int(c, "mesh.num_devices", 1, also=(-1,))
  axes = [_int(c, f"mesh.{a}", 1, also=(-1,)) for a in ("data", "fsdp", "tensor")]
  _check(axes.count(-1) <= 1, "mesh.fsdp", axes[1],
         f"at most one of mesh.data/fsdp/tensor may be -1 (got {tuple(axes)})")
  rules = _get(c, "mesh.rules")
  ok = isinstance(rules, (tuple, list)) and all(
      isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str) for r in rules)
  _check(ok, "mesh.rules", rules, "must be a tuple of (logical_axis, mesh_axes) pairs")


def _sampling(c, section: str) -> None:
  """`rollout` or `eval`: the fields of a `SamplerConfig`, checked by the sampler itself."""
  from egspo.diffusion import sampler  # pylint: disable=import-outside-toplevel

  names = ("gen_length", "steps", "block_length", "cache", "cache_refresh") + (
      ("temperature", "remasking", "cfg_scale") if section == "rollout" else ())
  try:
    sampler.check_sampling(**{n: _get(c, f"{section}.{n}") for n in names},
                           prefix=f"{section}.")
  except sampler.SamplerConfigError as e:
    _fail(f"{section}.{e.field}", e.value, e.why)


def _check_sequence_length(c, prompt_len: int) -> None:
  """Prompt + completion fit the preset's positions (a checkpoint brings its own config)."""
  if c.model.checkpoint not in ("", RANDOM_INIT):
    return
  from egspo.model import llada  # pylint: disable=import-outside-toplevel

  max_len = llada.PRESETS[c.model.preset]["max_sequence_length"]
  gen = c.rollout.gen_length
  _check(prompt_len + gen <= max_len, "rollout.max_prompt_length", prompt_len,
         f"+ rollout.gen_length={gen} must be <= model.preset={c.model.preset!r}'s "
         f"max_sequence_length={max_len}")
  gen = c.eval.gen_length
  _check(prompt_len + gen <= max_len, "eval.gen_length", gen,
         f"rollout.max_prompt_length={prompt_len} + eval.gen_length must be <= "
         f"model.preset={c.model.preset!r}'s max_sequence_length={max_len}")


def _validate_sft(c) -> None:
  steps = _int(c, "sft.steps", 0)
  _int(c, "sft.batch_size", 1)
  _real(c, "sft.learning_rate", 0.0, lo_open=True)
  warmup = _int(c, "sft.warmup_steps", 0)
  _int(c, "sft.log_every", 1)
  _int(c, "sft.checkpoint_every", 1)
  _real(c, "sft.time_budget_s", 0.0)
  schedule = _choice(c, "sft.schedule", ("constant", "wsd"))
  span = _int(c, "sft.schedule_steps", 0) or steps
  _real(c, "sft.decay_fraction", 0.0, 1.0, lo_open=True)
  _real(c, "sft.final_lr_fraction", 0.0, 1.0)
  if schedule == "wsd" and steps:
    _check(span > warmup, "sft.warmup_steps", warmup,
           f"must be < the {span} steps of the 'wsd' schedule")
