"""The training loop: SFT warm start (optional), then RL iterations, with evaluation and resume.

One RL iteration (`rl_iteration`) reads as the algorithm (REFERENCE §3):

    rollout  = generate(policy, prompts)                 # T denoising steps, one jitted scan
    rewards  = task.rewards(decode(rollout))             # host
    batches  = algorithm.plan(rollout, rewards)          # select steps, values, advantages, π_ref
    for batch in batches: state = update_step(state, batch)   # jitted, sharded, donated

`Stage` is the housekeeping both stages share. Everything is resumable: the train state
(parameters, optimizer), the step and the data position are checkpointed; the sampling and update
keys are derived from (seed, stage, step) (the constants below), so a resumed run repeats exactly
what the uninterrupted run would have done.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from egspo import checkpoint as ckpt_lib
from egspo import config as config_lib
from egspo import eval as eval_lib
from egspo import metrics as metrics_lib
from egspo import preemption
from egspo import sharding as shard_lib
from egspo import tokenizer as tok_lib
from egspo import tasks as tasks_lib
from egspo.diffusion import masking
from egspo.diffusion import sampler as sampler_lib
from egspo.model import llada
from egspo.rl import registry
from egspo.rl import update as update_lib
from egspo.tasks import data as data_lib

# Seeds and PRNG streams. Exact resume and every measured run depend on these values: the names
# document the derivations; the values must not change.
SFT_KEY = 1  # SFT step s masks with fold_in(fold_in(key(seed), SFT_KEY), s)
RL_KEY = 2  # RL iteration i's key: fold_in(fold_in(key(seed), RL_KEY), i); within it,
ROLLOUT_KEY = 0  # fold_in(·, 0) samples the rollout (1 selects steps: rl/algorithms.py),
UPDATE_KEY_BASE = 100  # fold_in(·, 100 + j) keys optimizer step j (1000 + j: rl/baselines.py)
SFT_DATA_SEED_OFFSET = 17  # SFT's prompt stream draws from seed + 17, apart from RL's (seed)
EVAL_SET_SEED = 7919  # generated held-out problems: default_rng([seed, 7919]), apart from both
LORA_SEED_OFFSET = 1  # the LoRA adapters' init: nnx.Rngs(seed + 1), apart from the model's

EVAL_WIDTH_MULTIPLE = 64  # evaluation prompts pad to a multiple of 64 tokens: few compiled shapes
MAX_REDRAWS = 1000  # draws of a generated training problem that must avoid the held-out set
SFT_CHECKPOINTS_KEPT = 2  # SFT's last checkpoints kept (RL: train.keep_checkpoints)
# The SFT optimizer's fixed settings (AdamW, no weight decay, clipping at 1; sft.* sets the rate).
SFT_ADAMW = dict(b1=0.9, b2=0.99, weight_decay=0.0, max_grad_norm=1.0)


# ----------------------------------------------------------------------------------------------
# Set-up


def build_model(config, tokenizer, mesh, rules):
  """The policy, sharded: pretrained weights (HF or converted dir, or hub repo id ORG/NAME), or a
  seeded random init of `model.preset` when `model.checkpoint` is '' or 'random'."""
  overrides = dict(param_dtype=config.model.param_dtype, dtype=config.model.dtype,
                   remat=config.model.remat, scan_layers=config.model.scan_layers)
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
                    targets=config.lora.targets, rngs=nnx.Rngs(config.seed + LORA_SEED_OFFSET))
    shard_lib.shard_model(model, mesh, rules)  # the new adapters onto their shardings
  return model


def sampler_config(config, model_cfg, section: str) -> sampler_lib.SamplerConfig:
  s = config[section]
  return sampler_lib.SamplerConfig(
      gen_length=s.gen_length, steps=s.steps, block_length=s.block_length,
      mask_token_id=model_cfg.mask_token_id,
      temperature=float(s.temperature) if section == "rollout" else 0.0,
      remasking=s.remasking if section == "rollout" else "low_confidence")


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
                                        scfg.steps),
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
      return sampler_lib.generate(sampler_lib.model_logits_fn(model, scfg.gen_length), ids, mask,
                                  key, scfg).tokens

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


# ----------------------------------------------------------------------------------------------
# What SFT and RL share: resume, refused updates, stop signal, time budget, checkpoints


class Stage:
  """The housekeeping around a stage's steps, one copy for SFT and RL.

      with Stage(tr, "rl", guard, ...) as stage:     # the last save commits on any exit
        state, meta = stage.resume(state, stream)    # the stage's last checkpoint, if any
        for step in stage.steps():                   # from the step restored; the clock starts
          state, m = update(...)
          stage.refused.record(ok, where)            # NonFiniteError after too many in a row
          ...                                        # evaluate if stage.is_last(step + 1)
          if stage.end_step(step + 1, state, stream, meta):  # stop signal or time budget
            break

  `end_step` saves every `checkpoint_every` steps, at the last one and whenever it stops. A stop
  signal sets `tr.preempted` (the relaunch resumes); a spent time budget ends the stage for good
  (saved as `finished`: the relaunch goes on to what follows).
  """

  def __init__(self, tr: Trainer, name: str, guard: preemption.PreemptionGuard | None, *,
               unit: str, num_steps: int, checkpoint_every: int, time_budget_s: float,
               keep: int, fields: str):
    self.tr, self.name, self.unit = tr, name, unit
    self.guard = guard or preemption.PreemptionGuard()  # not entered: never asks to stop
    self.num_steps, self.checkpoint_every = num_steps, checkpoint_every
    self.time_budget_s = time_budget_s
    self.ckpt = ckpt_lib.Checkpointer(tr.workdir / "checkpoints" / name, max_to_keep=keep)
    self.refused = update_lib.RefusedUpdates(tr.config.train.max_refused_updates, name.upper(),
                                             fields)
    self.start, self.finished, self.restored = 0, False, False
    self._t0 = time.time()
    self._budget = (-1, False)  # (step, out of time after it): checked once per step

  def __enter__(self) -> "Stage":
    return self

  def __exit__(self, *exc) -> None:
    self.ckpt.close()  # the last save commits, on any exit

  def resume(self, state, stream):
    """→ (state, meta) of the last good checkpoint, `stream` moved to its position; (state, {})
    without one. Sets `start`, `finished` and `restored`."""
    if self.ckpt.latest_step() is None:
      return state, {}
    state, meta = self.ckpt.restore(target=state, fallback=True)
    stream.load_state(meta["data"])
    self.start, self.finished = int(meta["step"]), bool(meta.get("finished", False))
    self.restored = True
    logging.info("%s: resumed at %s %d", self.name.upper(), self.unit, self.start)
    return state, meta

  def steps(self) -> range:
    """The steps still to run (none once finished); the time budget counts from here."""
    self._t0 = time.time()
    return range(self.start, self.start if self.finished else self.num_steps)

  def elapsed(self) -> float:
    return time.time() - self._t0

  def _out_of_time(self, done: int) -> bool:
    if self._budget[0] != done:
      self._budget = (done, bool(self.time_budget_s) and self.elapsed() > self.time_budget_s)
    return self._budget[1]

  def is_last(self, done: int) -> bool:
    """Does step `done` end the stage: the last step, or the time budget spent?"""
    return done == self.num_steps or self._out_of_time(done)

  def save(self, step: int, state, stream, meta: dict) -> None:
    self.ckpt.save(step, state, {"step": step, "data": stream.state(), **meta}, force=True)

  def stop_requested(self, step: int) -> bool:
    """Polls the stop signal (multi-host: agreed by all hosts); sets `tr.preempted`."""
    self.tr.preempted = self.tr.preempted or self.guard.should_stop(step)
    return self.tr.preempted

  def end_step(self, done: int, state, stream, meta: dict | None = None) -> bool:
    """After step `done`: polls the stop signal and the time budget, saves when due. True: stop."""
    out_of_time = self._out_of_time(done)
    stop = self.stop_requested(done)
    if done % self.checkpoint_every == 0 or done == self.num_steps or stop or out_of_time:
      self.save(done, state, stream, {**(meta or {}), "finished": out_of_time})
    if out_of_time and not stop:
      logging.info("%s: time budget of %.0f s reached at %s %d", self.name.upper(),
                   self.time_budget_s, self.unit, done)
    return stop or out_of_time


# ----------------------------------------------------------------------------------------------
# SFT warm start (LLaDA's masked-diffusion SFT loss)


SFT_FIELDS = ("sft.learning_rate, sft.warmup_steps, sft.batch_size and the initial parameters "
              "(model.checkpoint)")
RL_FIELDS = ("optim.learning_rate, optim.max_grad_norm, optim.warmup_steps, loss.beta and the "
             "parameters RL starts from (the SFT checkpoint, or model.checkpoint)")


def sft_optimizer(c):
  """AdamW with `SFT_ADAMW` and the `sft.*` learning rate and schedule."""
  span = c.sft.schedule_steps or c.sft.steps
  decay_steps = min(max(1, round(c.sft.decay_fraction * span)),
                    max(span - c.sft.warmup_steps, 1))
  return update_lib.make_optimizer(c.sft.learning_rate, **SFT_ADAMW,
                                   warmup_steps=c.sft.warmup_steps, schedule=c.sft.schedule,
                                   total_steps=span, decay_steps=decay_steps,
                                   final_lr_fraction=c.sft.final_lr_fraction)


def sft_stage(tr: Trainer, guard: preemption.PreemptionGuard | None = None):
  """Masked-diffusion SFT from the last SFT checkpoint (if any) → the parameters.

  Sets `tr.sft_steps_done`. When `guard` asks to stop, saves a checkpoint, sets `tr.preempted`
  and returns (None: never stops). Raises `update.NonFiniteError` after
  `train.max_refused_updates` refused updates in a row.
  """
  c = tr.config
  if c.sft.steps == 0:
    return tr.params
  tx = sft_optimizer(c)
  stream = tr.train_stream(c.sft.batch_size, 1, seed=c.seed + SFT_DATA_SEED_OFFSET,
                           held_out=tr.eval_examples())
  gen_len, eos = c.rollout.gen_length, tr.tokenizer.eos_id

  def make_batch(examples):
    ids, mask = tr.encode_prompts(examples)
    comp = np.full((len(examples), gen_len), eos, np.int32)
    for i, ex in enumerate(examples):
      t = tr.tokenizer.encode(tr.task.sft_target(ex, c.task.prompt_style))
      if len(t) > gen_len:
        raise ValueError(f"SFT target of {len(t)} tokens exceeds rollout.gen_length={gen_len}")
      comp[i, :len(t)] = t
    # One micro-batch per step: the leading [A = 1] axis of the update.
    return tr.put_batch({"prompt_ids": ids[None], "prompt_mask": mask[None],
                         "completion": comp[None]}, micro_axis=True)

  def loss_fn(model, mb, key):
    return masking.sft_loss(sampler_lib.model_logits_fn(model, gen_len), key, mb["prompt_ids"],
                            mb["prompt_mask"], mb["completion"],
                            mask_token_id=tr.model_cfg.mask_token_id)

  with Stage(tr, "sft", guard, unit="step", num_steps=c.sft.steps,
             checkpoint_every=c.sft.checkpoint_every, time_budget_s=c.sft.time_budget_s,
             keep=SFT_CHECKPOINTS_KEPT, fields=SFT_FIELDS) as stage:
    state, _ = stage.resume(tr.new_state(tr.params, tx), stream)
    update = tr.make_update(tx, loss_fn, state)
    base_key = jax.random.fold_in(jax.random.key(c.seed), SFT_KEY)
    steps, done = stage.steps(), stage.start
    if steps:  # the log goes on after the step restored, not the newest on disk
      tr.writer.rewind(stage.start)
    pending = None  # the previous step's update_ok, read one step late: the host never waits
    for step in steps:
      batch = make_batch(stream.next_batch().examples)
      state, m = update(state, tr.frozen, batch, jax.random.fold_in(base_key, step))
      if pending is not None:
        stage.refused.record(bool(pending[1]), f"step {pending[0]}")
      done = step + 1
      pending = (done, m["update_ok"])
      if done % c.sft.log_every == 0 or stage.is_last(done):
        m = {f"sft/{k}": float(v) for k, v in m.items()}
        m["sft/steps_per_s"] = (done - stage.start) / stage.elapsed()
        tr.writer.write_scalars(done, m)
        logging.info("sft %d/%d loss %.4f", done, c.sft.steps, m["sft/loss"])
      # A time budget ends SFT for good (the "continue SFT for the same wall time" control).
      if stage.end_step(done, state, stream):
        break
    if pending is not None:
      stage.refused.record(bool(pending[1]), f"step {pending[0]}")
  tr.sft_steps_done = done
  return state.params


# ----------------------------------------------------------------------------------------------
# RL


def rl_optimizer(c):
  """AdamW of the RL stage (`optim.*`), its schedule over `train.num_iterations`."""
  return update_lib.make_optimizer(
      c.optim.learning_rate, b1=c.optim.b1, b2=c.optim.b2, weight_decay=c.optim.weight_decay,
      max_grad_norm=c.optim.max_grad_norm, warmup_steps=c.optim.warmup_steps,
      schedule=c.optim.schedule, total_steps=c.train.num_iterations)


def make_algorithm(tr: Trainer, ref_params, scfg: sampler_lib.SamplerConfig):
  """The registered method `config.algorithm`, given π_ref's parameters and the rollout sampler."""
  c = tr.config
  sampler_lib.check_model_config(tr.model_cfg, scfg, c.rollout.max_prompt_length)
  ctx = registry.Context(config=c, policy=tr.policy, ref_params=ref_params,
                         mask_token_id=tr.model_cfg.mask_token_id,
                         max_commit=int(sampler_lib.commit_schedule(scfg).max()),
                         reward_fn=tr.task.rewards, decode_fn=tr.decode, to_host=to_host)
  return registry.get_algorithm(c.algorithm)(ctx)


def make_rollout(tr: Trainer, scfg: sampler_lib.SamplerConfig):
  """The jitted rollout: (params, frozen, prompt ids, mask, key) → `Rollout` (REFERENCE §2)."""

  @jax.jit
  def rollout(params, frozen, ids, mask, key):
    model = tr.policy.model(params, frozen)
    return sampler_lib.generate(sampler_lib.model_logits_fn(model, scfg.gen_length), ids, mask,
                                key, scfg)

  return rollout


def apply_updates(tr: Trainer, update, state, batches, key):
  """One optimizer step per planned batch (the update schedule) → (state, per-step metrics)."""
  ms = []
  for j, batch in enumerate(batches):
    state, m = update(state, tr.frozen, tr.put_batch(batch, micro_axis=True),
                      jax.random.fold_in(key, UPDATE_KEY_BASE + j))
    ms.append(m)
  return state, jax.device_get(ms)


class IterationResult(NamedTuple):
  state: update_lib.TrainState
  metrics: dict  # the iteration's: means over its optimizer steps, the plan's, rewards
  updates: list  # metrics of each optimizer step (`update_ok` among them)
  batches: list  # the planned optimizer-step batches


def rl_iteration(tr: Trainer, rollout, algo, update, state, examples, key,
                 timer=None) -> IterationResult:
  """One RL iteration on `examples` ([B] = prompts × G, groups contiguous), as the paper's
  algorithm box (REFERENCE §3); `timer` (`metrics.Timer`) times the four phases.

    rollout  T denoising steps of π_θ, recording each step's commits, log-probs, entropy, x̂0
    rewards  of the decoded completions
    plan     step selection, values, advantages, π_old / π_ref: the optimizer-step batches
    updates  one jitted, sharded optimizer step per batch
  """
  timer = timer or metrics_lib.Timer()
  ids, mask = tr.put_batch(tr.encode_prompts(examples))
  with timer("rollout"):
    ro = rollout(state.params, tr.frozen, ids, mask, jax.random.fold_in(key, ROLLOUT_KEY))
    jax.block_until_ready(ro)
  with timer("reward"):
    texts = tr.decode(to_host(ro.tokens))
    rewards = np.asarray(tr.task.rewards(texts, examples), np.float32)
  with timer("plan"):
    batches, plan_metrics = algo.plan(state.params, tr.frozen,
                                      registry.Iteration(ro, rewards, examples, key))
    jax.block_until_ready(batches)
  with timer("update"):
    state, updates = apply_updates(tr, update, state, batches, key)
  m = {k: float(np.mean([x[k] for x in updates])) for k in updates[0]}
  m.update(plan_metrics)
  m.update(reward=float(rewards.mean()), reward_std=float(rewards.std()),
           completion_tokens=float(np.mean([len(t) for t in texts])),
           prompts_cut_frac=tr.prompts_cut_frac)
  return IterationResult(state, m, updates, batches)


def rl_stage(tr: Trainer, init_params, guard: preemption.PreemptionGuard | None = None) -> dict:
  """RL iterations from `init_params` (or the last RL checkpoint) → the evaluation history.

  The pre-RL evaluation is saved with the initial state as RL step 0, so a relaunch does not
  redo it. When `guard` asks to stop, saves, sets `tr.preempted` and returns the history so far.
  """
  c = tr.config
  tx = rl_optimizer(c)
  scfg = sampler_config(c, tr.model_cfg, "rollout")
  algo = make_algorithm(tr, update_lib.reference_params(init_params, tr.trainable), scfg)
  rollout = make_rollout(tr, scfg)
  eval_examples = tr.eval_examples()
  stream = tr.train_stream(c.batch.num_prompts, c.batch.group_size, seed=c.seed,
                           held_out=eval_examples)

  def evaluate(params, done):  # logged at the global step: SFT steps + iteration
    return tr.evaluate(params, eval_examples, "eval", tr.sft_steps_done + done)

  with Stage(tr, "rl", guard, unit="iteration", num_steps=c.train.num_iterations,
             checkpoint_every=c.train.checkpoint_every, time_budget_s=c.train.time_budget_s,
             keep=c.train.keep_checkpoints, fields=RL_FIELDS) as stage:
    state, meta = stage.resume(tr.new_state(init_params, tx), stream)
    history = meta.get("history", {})
    # The log goes on after the step restored; without an RL checkpoint, a pre-RL evaluation that
    # a stopped run logged is redone below, so its records at that step go too.
    tr.writer.rewind(tr.sft_steps_done + stage.start, redo=() if stage.restored else ("eval/",))
    update = tr.make_update(tx, algo.loss, state)
    history["sft_steps"] = tr.sft_steps_done
    if stage.start == 0 and "before" not in history and c.eval.before_training and eval_examples:
      history["before"] = evaluate(state.params, 0)
      stage.save(0, state, stream, {"history": history})
    if stage.stop_requested(tr.sft_steps_done + stage.start):
      return history

    base_key = jax.random.fold_in(jax.random.key(c.seed), RL_KEY)
    timer = metrics_lib.Timer()
    bar = metrics_lib.progress_bar(c.train.num_iterations, initial=stage.start, desc="rl",
                                   is_main_process=jax.process_index() == 0)
    try:
      for it in stage.steps():
        examples = stream.next_batch().repeated  # [B] = num_prompts × G, groups contiguous
        state, m, updates, _ = rl_iteration(tr, rollout, algo, update, state, examples,
                                            jax.random.fold_in(base_key, it), timer)
        done = it + 1
        for j, x in enumerate(updates):
          stage.refused.record(bool(x["update_ok"]), f"iteration {done} (update {j + 1}/"
                               f"{len(updates)})")
        m.update(timer.seconds(prefix="time/"))
        # Training wall time without evaluation: the budget of the continued-SFT control.
        seconds = timer.total()
        history["rl_train_seconds"] = history.get("rl_train_seconds", 0.0) + seconds
        timer.reset()
        tr.writer.write_scalars(tr.sft_steps_done + done, {f"rl/{k}": v for k, v in m.items()})
        # Throughput: generated completion tokens (B × G) per second of the iteration's phases.
        tokens_per_sec = len(examples) * c.rollout.gen_length / max(seconds, 1e-9)
        bar.set_postfix(metrics_lib.bar_postfix(m, tokens_per_sec=tokens_per_sec), refresh=False)
        bar.update()
        if done % c.train.log_every == 0:
          logging.info("rl %d/%d reward %.3f loss %.4f kl %.4f", done, c.train.num_iterations,
                       m["reward"], m["loss"], m.get("kl", float("nan")))
        if eval_examples and (done % c.train.eval_every == 0 or stage.is_last(done)):
          history[f"eval_{done}"] = evaluate(state.params, done)
        if stage.end_step(done, state, stream, {"history": history}):
          break
    finally:
      bar.close()
  tr.params = state.params
  return history


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """SFT warm start (if `sft.steps`), then RL → the evaluation history (also history.json).

  SIGTERM/SIGINT at any time (start-up, compilation, an evaluation, the loops) stops the run at
  the next step or stage boundary, after a checkpoint where there is something to save; `run`
  then returns the history so far with `"preempted": True` (no history.json), and the same
  command resumes. Raises `update.NonFiniteError` / `checkpoint.CheckpointError` (one-line
  messages) when training diverges or a checkpoint cannot be written or read.
  """
  with preemption.PreemptionGuard() as guard:
    tr = Trainer.create(config, workdir)
    history = {}
    try:
      # Under the mesh and its rules the model's activation sharding hints (llada.constrain) apply.
      with shard_lib.use_mesh(tr.mesh, tr.rules):
        if not _stop_requested(tr, guard):
          params = sft_stage(tr, guard)
          if not _stop_requested(tr, guard):
            history = rl_stage(tr, params, guard)
    finally:  # also on a stop: the metrics reach a remote workdir
      tr.writer.close()
  if tr.preempted:
    logging.info("stopped by a signal; run the same command again to resume")
    return {**history, "preempted": True}
  if jax.process_index() == 0:
    (tr.workdir / "history.json").write_text(json.dumps(history, indent=1, default=float))
  return history


def _stop_requested(tr: Trainer, guard: preemption.PreemptionGuard) -> bool:
  """A stage boundary: has a signal (during start-up, compilation, evaluation) asked to stop?"""
  tr.preempted = tr.preempted or guard.should_stop()
  return tr.preempted
