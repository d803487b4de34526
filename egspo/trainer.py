"""The set-up both training stages share: the sharded policy, tokenizer, task, data streams, the
metrics writer and held-out evaluation (`Trainer`). The stages themselves are in `egspo.train`."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from egspo import config as config_lib
from egspo import eval as eval_lib
from egspo import metrics as metrics_lib
from egspo import sharding as shard_lib
from egspo import tokenizer as tok_lib
from egspo import tasks as tasks_lib
from egspo.diffusion import sampler as sampler_lib
from egspo.model import llada
from egspo.rl import update as update_lib
from egspo.tasks import data as data_lib

# Seeds (as egspo.train's): exact resume and every measured run depend on these values.
EVAL_SET_SEED = 7919  # generated held-out problems: default_rng([seed, 7919]), apart from both
LORA_SEED_OFFSET = 1  # the LoRA adapters' init: nnx.Rngs(seed + 1), apart from the model's
EVAL_WIDTH_MULTIPLE = 64  # evaluation prompts pad to a multiple of 64 tokens: few compiled shapes
MAX_REDRAWS = 1000  # draws of a generated training problem that must avoid the held-out set


def build_model(config, tokenizer, mesh, rules):
  """The policy, sharded: pretrained weights (HF or converted dir, or hub repo id ORG/NAME), or a
  seeded random init of `model.preset` when `model.checkpoint` is '' or 'random'."""
  overrides = dict(param_dtype=config.model.param_dtype, dtype=config.model.dtype,
                   remat=config.model.remat, scan_layers=config.model.scan_layers,
                   attention_impl=config.model.attention_impl)
  if config.model.checkpoint not in ("", "random"):
    from egspo.model import from_pretrained

    model = from_pretrained(config.model.checkpoint, mesh=mesh, rules=rules, **overrides)
  else:
    from egspo.model.init import create_sharded_model

    cfg = llada.get_config(config.model.preset, vocab=tokenizer, **overrides)
    model = create_sharded_model(cfg, mesh, rules, seed=config.seed)
  for name in ("mask_id", "eos_id"):
    want = getattr(tokenizer, name)
    have = model.cfg.mask_token_id if name == "mask_id" else model.cfg.eos_token_id
    if want != have:
      raise ValueError(f"tokenizer {name}={want} differs from the model's {have}")
  if config.lora.enabled:
    from egspo.model import lora

    lora.apply_lora(model, rank=config.lora.rank, alpha=config.lora.alpha,
                    targets=config.lora.targets, rngs=nnx.Rngs(config.seed + LORA_SEED_OFFSET),
                    dropout=config.lora.dropout)
    shard_lib.shard_model(model, mesh, rules)  # the new adapters onto their shardings
  return model


def sampler_config(config, model_cfg, section: str) -> sampler_lib.SamplerConfig:
  s = config[section]
  return sampler_lib.SamplerConfig(
      gen_length=s.gen_length, steps=s.steps, block_length=s.block_length,
      mask_token_id=model_cfg.mask_token_id,
      temperature=float(s.temperature) if section == "rollout" else 0.0,
      remasking=s.remasking if section == "rollout" else "low_confidence",
      cfg_scale=float(s.cfg_scale) if section == "rollout" else 0.0, cache=s.cache,
      cache_refresh=s.cache_refresh,
      record_x0_hat=section == "rollout")  # evaluation: the LM head on the block only


@dataclasses.dataclass
class Trainer:
  """Holds what the stages share. Create with `Trainer.create(config, workdir)`."""

  config: ml_collections.ConfigDict
  workdir: epath.Path
  mesh: Any
  rules: Any
  tokenizer: Any
  task: Any
  policy: update_lib.Policy
  params: Any
  frozen: Any
  model_cfg: llada.ModelConfig
  writer: Any
  trainable: str
  sft_steps_done: int = 0  # SFT steps behind `params` (set by sft_stage; RL's step labels start there)
  prompts_cut_frac: float = 0.0  # training prompts cut by the last `encode_prompts` (fraction)
  preempted: bool = False  # a signal stopped a stage early (`run` returns without finishing)
  # The jitted evaluation generate function per sampler config (compiled once per shape).
  _eval_fns: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

  @classmethod
  def create(cls, config, workdir) -> "Trainer":
    config_lib.validate(config)
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    devices = jax.devices()
    if config.mesh.num_devices > 0:
      devices = devices[:config.mesh.num_devices]
    mesh = shard_lib.make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp,
                               tensor=config.mesh.tensor, devices=devices)
    rules = shard_lib.merge_rules(shard_lib.RULES, tuple(config.mesh.rules))
    tokenizer = tok_lib.load_tokenizer(config.tokenizer or config.model.checkpoint)
    task = tasks_lib.get_task(config.task.name, **config.task.options)
    model = build_model(config, tokenizer, mesh, rules)
    trainable = "lora" if config.lora.enabled else "full"
    policy, params, frozen = update_lib.split_policy(model, trainable)
    writer = metrics_lib.MetricsWriter(workdir, is_main_process=jax.process_index() == 0,
                                       resume_step=_latest_logged_step(workdir))
    if jax.process_index() == 0:
      (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    return cls(config=config, workdir=workdir, mesh=mesh, rules=rules, tokenizer=tokenizer,
               task=task, policy=policy, params=params, frozen=frozen, model_cfg=model.cfg,
               writer=writer, trainable=trainable)

  # -- helpers -----------------------------------------------------------------------------

  def put_batch(self, tree, micro_axis: bool = False):
    """Host arrays (identical on every process) → global arrays split along the batch axis.
    micro_axis: leaves are [A, b, ...] and b is split (the micro-batch axis A is not)."""
    spec = P(None, shard_lib.BATCH_AXES) if micro_axis else P(shard_lib.BATCH_AXES)
    sharding = NamedSharding(self.mesh, spec)

    def put(x):
      if isinstance(x, jax.Array) and (jax.process_count() == 1 or not x.is_fully_addressable):
        return jax.device_put(x, sharding)  # already global (or one process): reshard on device
      x = np.asarray(x)
      return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(put, tree)

  def prompt_ids(self, examples, purpose="train") -> list[list[int]]:
    """Token ids of each example's whole prompt (chat template, and the prefill for 'eval')."""
    c = self.config
    prefill = self.task.eval_prefill(c.task.prompt_style) if purpose == "eval" else ""
    texts = [self.tokenizer.chat_prompt(self.task.prompt(ex, c.task.prompt_style, purpose),
                                        prefill) for ex in examples]
    return [self.tokenizer.encode(t) for t in texts]

  def encode_prompts(self, examples, purpose="train"):
    """Left-padded prompt ids/mask [B, W]. Training prompts (rollouts, SFT): W =
    rollout.max_prompt_length (fixed: no recompiles), a longer prompt handled by
    task.prompt_truncation (`data.fit_prompt`; `self.prompts_cut_frac` = the fraction cut). 'eval'
    prompts are never cut (the release evaluates whole prompts): W grows to the longest, rounded
    up to a multiple of EVAL_WIDTH_MULTIPLE."""
    c = self.config
    width = c.rollout.max_prompt_length
    ids = self.prompt_ids(examples, purpose)
    if purpose == "eval":
      width = max(width, -(-max(map(len, ids)) // EVAL_WIDTH_MULTIPLE) * EVAL_WIDTH_MULTIPLE)
    else:
      fitted = []
      for i, (ex, x) in enumerate(zip(examples, ids)):
        try:
          fitted.append(data_lib.fit_prompt(x, width, c.task.prompt_truncation))
        except ValueError as e:
          raise ValueError(f"task {self.task.name!r}, prompt {i} "
                           f"({self.task.question(ex)[:50]!r}...): {e}") from None
      ids = [x for x, _ in fitted]
      n_cut = sum(cut for _, cut in fitted)
      self.prompts_cut_frac = n_cut / len(ids)
      if n_cut:
        logging.log_first_n(logging.WARNING, "task.prompt_truncation=%r cut %d of %d training "
                            "prompts to rollout.max_prompt_length=%d tokens (metric "
                            "rl/prompts_cut_frac)", 1, c.task.prompt_truncation, n_cut, len(ids),
                            width)
    out = np.full((len(ids), width), self.tokenizer.pad_id, np.int32)
    mask = np.zeros((len(ids), width), bool)
    for i, x in enumerate(ids):
      if not x:
        raise ValueError(f"task {self.task.name!r}: prompt {i} encodes to zero tokens")
      out[i, width - len(x):] = x
      mask[i, width - len(x):] = True
    return out, mask

  def decode(self, tokens, purpose: str = "train") -> list[str]:
    """Completion texts; with task option reference_rewards, decoded as the release does."""
    return sampler_lib.decode_completions(
        np.asarray(tokens), self.tokenizer,
        **sampler_lib.decode_options(self.task.reference_rewards, purpose))

  def new_state(self, params, tx):
    """Train state with the optimizer state created on device, sharded like the parameters."""
    return jax.jit(lambda p: update_lib.TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                                   opt_state=tx.init(p)))(params)

  def make_update(self, tx, loss_fn, state):
    shardings = lambda t: jax.tree.map(lambda x: x.sharding, t)  # noqa: E731
    return update_lib.make_update_step(
        self.policy, tx, loss_fn, state_shardings=shardings(state),
        frozen_shardings=shardings(self.frozen),
        batch_shardings=NamedSharding(self.mesh, P(None, shard_lib.BATCH_AXES)))

  # -- evaluation --------------------------------------------------------------------------

  def evaluate(self, params, examples, tag: str, step: int) -> dict:
    """Greedy decoding with the eval protocol; accuracy on held-out `examples`.

    Writes workdir/eval/{tag}_{step}.json in `egspo.eval`'s layout (d1's records per generation
    length), which `python -m egspo.eval --generations` re-grades to the same metrics.
    """
    c = self.config
    scfg = sampler_config(c, self.model_cfg, "eval")
    gen = self._eval_generate(scfg)
    style = c.task.prompt_style
    prompts = eval_lib.build_prompts(self.task, self.tokenizer, examples, style)
    texts = []
    bs = c.eval.batch_size
    # Whole prompts, never cut, at one width for the whole set (one compiled shape).
    all_ids, all_mask = self.encode_prompts(examples, purpose="eval")
    for i in range(0, len(prompts), bs):
      rows = list(range(i, min(i + bs, len(prompts))))
      n = len(rows)
      rows += [rows[-1]] * (bs - n)  # pad the last batch: one compiled shape
      ids, mask = self.put_batch((all_ids[rows], all_mask[rows]))
      texts += self.decode(to_host(gen(params, self.frozen, ids, mask))[:n], "eval")
    scores, metrics = eval_lib.score_generations(self.task, texts, examples)
    self.writer.write_scalars(step, {f"{tag}/{k}": float(v) for k, v in metrics.items()
                                     if isinstance(v, (int, float, np.floating))})
    if jax.process_index() == 0:
      records = eval_lib.generation_records(self.task, examples, prompts, texts, scores)
      eval_lib.write_json(self.workdir / "eval" / f"{tag}_{step}.json", {
          "task": self.task.name, "tag": tag, "step": step,
          "protocol": eval_lib.protocol(self.task, style, scfg.block_length, scfg.temperature,
                                        scfg.steps, cache=scfg.cache,
                                        cache_refresh=scfg.cache_refresh),
          "results": {str(scfg.gen_length): {"metrics": metrics, "generations": records}}})
    logging.info("eval %s @%d: %s", tag, step, metrics)
    return metrics

  def _eval_generate(self, scfg):
    """The jitted greedy generate of `scfg`, built once per config and cached on the Trainer."""
    if scfg in self._eval_fns:
      return self._eval_fns[scfg]
    key = jax.random.key(0)  # unused at temperature 0

    @jax.jit
    def gen(params, frozen, ids, mask):
      model = self.policy.model(params, frozen)
      return sampler_lib.generate_model(model, ids, mask, key, scfg).tokens

    self._eval_fns[scfg] = gen
    return gen

  def eval_examples(self) -> list:
    """Held-out examples: the task's test file (first n, read by the task's converter), or for
    generator tasks without a file n generated problems from a seed stream separate from
    training (excluded from training)."""
    c = self.config
    n = c.task.num_eval_examples
    if n == 0:
      return []
    if c.task.eval_file or not hasattr(self.task, "sample_example") or c.task.eval_source == "file":
      examples = self.task.load_examples("test", path=c.task.eval_file or None)
      if not examples:
        raise ValueError(f"task {self.task.name!r}: the evaluation set is empty")
      return list(examples[:n])
    rng = np.random.default_rng([c.seed, EVAL_SET_SEED])
    return [self.task.sample_example(rng) for _ in range(n)]

  def train_stream(self, batch_size, group_size, seed, held_out=()):
    """Deterministic, resumable prompt stream. A data file (task.train_file, or a file task's own
    training split) is read by the task's converter (`load_examples("train")`); one holding every
    held-out example is refused, and with task.prompt_truncation='error' so is one with a prompt
    longer than rollout.max_prompt_length (before any step). Generated problems equal to a
    held-out one are redrawn, so evaluation measures generalisation."""
    c = self.config
    if c.task.train_file or not hasattr(self.task, "sample_example"):
      what = (f"task.train_file={c.task.train_file!r}" if c.task.train_file
              else f"the {self.task.name} training data")
      examples = self.task.load_examples("train", path=c.task.train_file or None)
      if not examples:
        raise ValueError(f"{what} holds no examples")
      overlap = data_lib.check_held_out(examples, held_out, what)
      if overlap:
        logging.warning("%s holds %d of the %d evaluation examples", what, overlap, len(held_out))
      if c.task.prompt_truncation == "error":
        lengths = [len(x) for x in self.prompt_ids(examples)]
        over = sum(n > c.rollout.max_prompt_length for n in lengths)
        if over:
          raise ValueError(f"{over} of the {len(examples)} prompts of {what} exceed "
                           f"rollout.max_prompt_length={c.rollout.max_prompt_length} tokens "
                           f"(longest {max(lengths)}); set task.prompt_truncation='left' (the release) or "
                           "'middle', or raise rollout.max_prompt_length")
      return data_lib.PromptStream(examples, batch_size, group_size, seed=seed)
    banned = {_example_key(e) for e in held_out}

    def sample(rng):
      for _ in range(MAX_REDRAWS):
        ex = self.task.sample_example(rng)
        if _example_key(ex) not in banned:
          return ex
      raise ValueError("could not draw a training problem outside the held-out set")

    return data_lib.PromptStream(sample, batch_size, group_size, seed=seed)


def to_host(x):
  """A (possibly multi-host sharded) array as a full numpy array on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(shard_lib.process_allgather(x, tiled=True))
  return np.asarray(x)


def _example_key(ex) -> str:
  return json.dumps({k: v for k, v in ex.items() if k != "solution"}, sort_keys=True, default=str)


def _checkpointed_steps(workdir, stage: str) -> list[int]:
  d = epath.Path(workdir) / "checkpoints" / stage
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _latest_logged_step(workdir) -> int | None:
  """The global metrics step of the last checkpoint, for de-duplicating metrics after a resume.

  Metrics use one global step: SFT step s logs at s, RL iteration i at S + i, where S is the
  step of the SFT checkpoint RL started from (`Trainer.sft_steps_done`; 0 without SFT).
  """
  rl, sft = _checkpointed_steps(workdir, "rl"), _checkpointed_steps(workdir, "sft")
  if rl:
    return (sft[-1] if sft else 0) + rl[-1]
  return sft[-1] if sft else None
