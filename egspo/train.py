"""The training loop: SFT warm start (optional), then RL iterations, with evaluation and resume.

One RL iteration (`rl_iteration`) reads as the algorithm (REFERENCE §3):

    rollout  = generate(policy, prompts)                 # T denoising steps, one jitted scan
    rewards  = task.rewards(decode(rollout))             # host
    batches  = algorithm.plan(rollout, rewards)          # select steps, values, advantages, π_ref
    for batch in batches: state = update_step(state, batch)   # jitted, sharded, donated

`Stage` is the housekeeping both stages share. Everything is resumable: the train state
(parameters, optimizer), the step and the data position are checkpointed; the sampling and update
keys are derived from (seed, stage, step) (the constants below and in `egspo.trainer`), so a resumed run repeats exactly
what the uninterrupted run would have done.
"""

from __future__ import annotations

import json
import time
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
from absl import logging

from egspo import checkpoint as ckpt_lib
from egspo import metrics as metrics_lib
from egspo import preemption
from egspo import sharding as shard_lib
from egspo.diffusion import masking
from egspo.diffusion import sampler as sampler_lib
from egspo.rl import registry
from egspo.rl import update as update_lib
from egspo.trainer import Trainer, sampler_config, to_host

# Seeds and PRNG streams. Exact resume and every measured run depend on these values: the names
# document the derivations; the values must not change.
SFT_KEY = 1  # SFT step s masks with fold_in(fold_in(key(seed), SFT_KEY), s)
RL_KEY = 2  # RL iteration i's key: fold_in(fold_in(key(seed), RL_KEY), i); within it,
ROLLOUT_KEY = 0  # fold_in(·, 0) samples the rollout (1 selects steps: rl/algorithms.py),
UPDATE_KEY_BASE = 100  # fold_in(·, 100 + j) keys optimizer step j (1000 + j: rl/baselines.py)
SFT_DATA_SEED_OFFSET = 17  # SFT's prompt stream draws from seed + 17, apart from RL's (seed)

SFT_CHECKPOINTS_KEPT = 2  # SFT's last checkpoints kept (RL: train.keep_checkpoints)
BEST_METRIC = "eval/accuracy"  # RL also keeps its best-evaluated checkpoint (orbax best-N)
# The SFT optimizer's fixed settings (AdamW, no weight decay, clipping at 1; sft.* sets the rate).
SFT_ADAMW = dict(b1=0.9, b2=0.99, weight_decay=0.0, max_grad_norm=1.0)


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
               keep: int, fields: str, best_metric: str | None = None):
    self.tr, self.name, self.unit = tr, name, unit
    self.guard = guard or preemption.PreemptionGuard()  # not entered: never asks to stop
    self.num_steps, self.checkpoint_every = num_steps, checkpoint_every
    self.time_budget_s = time_budget_s
    # Beside the newest `keep`, the step with the best `best_metric` (orbax's best-N policy).
    self.ckpt = ckpt_lib.Checkpointer(tr.workdir / "checkpoints" / name, max_to_keep=keep,
                                      best_metric=best_metric)
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

  def save(self, step: int, state, stream, meta: dict, metrics: dict | None = None) -> None:
    self.ckpt.save(step, state, {"step": step, "data": stream.state(), **meta}, force=True,
                   metrics=metrics)

  def stop_requested(self, step: int) -> bool:
    """Polls the stop signal (multi-host: agreed by all hosts); sets `tr.preempted`."""
    self.tr.preempted = self.tr.preempted or self.guard.should_stop(step)
    return self.tr.preempted

  def end_step(self, done: int, state, stream, meta: dict | None = None,
               metrics: dict | None = None) -> bool:
    """After step `done`: polls the stop signal and the time budget, saves when due (and always
    after an evaluation, `metrics`, so the best-N policy can keep that step). True: stop."""
    out_of_time = self._out_of_time(done)
    stop = self.stop_requested(done)
    if (done % self.checkpoint_every == 0 or done == self.num_steps or stop or out_of_time
        or metrics is not None):
      self.save(done, state, stream, {**(meta or {}), "finished": out_of_time}, metrics)
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


def rl_optimizer_steps(c) -> int:
  """The RL stage's optimizer steps: `train.num_iterations` × the method's optimizer steps per
  iteration (EGSPO: one per column group of `train.update_schedule`; baselines: μ)."""
  return c.train.num_iterations * registry.optimizer_steps_per_iteration(c)


def rl_optimizer(c):
  """AdamW of the RL stage (`optim.*`); its schedule (and `optim.warmup_steps`) counts optimizer
  steps, over the `rl_optimizer_steps(c)` of the stage."""
  return update_lib.make_optimizer(
      c.optim.learning_rate, b1=c.optim.b1, b2=c.optim.b2, weight_decay=c.optim.weight_decay,
      max_grad_norm=c.optim.max_grad_norm, warmup_steps=c.optim.warmup_steps,
      schedule=c.optim.schedule, total_steps=rl_optimizer_steps(c))


def make_algorithm(tr: Trainer, ref_params, scfg: sampler_lib.SamplerConfig):
  """The registered method `config.algorithm`, given π_ref's parameters and the rollout sampler."""
  c = tr.config
  sampler_lib.check_model_config(tr.model_cfg, scfg, c.rollout.max_prompt_length)
  ctx = registry.Context(config=c, policy=tr.policy, ref_params=ref_params,
                         mask_token_id=tr.model_cfg.mask_token_id,
                         max_commit=int(sampler_lib.commit_schedule(scfg).max()),
                         reward_fn=tr.task.rewards, decode_fn=tr.decode, to_host=to_host,
                         step_reward_fn=tr.task.correctness_rewards)
  return registry.get_algorithm(c.algorithm)(ctx)


def make_rollout(tr: Trainer, scfg: sampler_lib.SamplerConfig):
  """The jitted rollout: (params, frozen, prompt ids, mask, key) → `Rollout` (REFERENCE §2)."""

  @jax.jit
  def rollout(params, frozen, ids, mask, key):
    model = tr.policy.model(params, frozen)
    return sampler_lib.generate_model(model, ids, mask, key, scfg)

  return rollout


def apply_updates(tr: Trainer, update, state, batches, key):
  """One optimizer step per planned batch (the update schedule) → (state, per-step metrics)."""
  ms = []
  for j, batch in enumerate(batches):
    state, m = update(state, tr.frozen, tr.put_batch(batch, micro_axis=True),
                      jax.random.fold_in(key, UPDATE_KEY_BASE + j))
    ms.append(m)
  return state, jax.device_get(ms)


def staleness_metrics(updates: list) -> dict:
  """Staleness of each optimizer step: the updates applied (`update_ok`) since the rollout that
  produced its batch, before it ran → mean and max over the iteration's optimizer steps."""
  applied = np.cumsum([0.0] + [float(x["update_ok"]) for x in updates[:-1]])
  return {"staleness/mean": float(applied.mean()), "staleness/max": float(applied.max())}


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
             (a cached rollout: π_old, x̂0 and TIS weights from one full forward, rl/tis.py)
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
                                      registry.Iteration(ro, rewards, examples, key,
                                                         step=int(to_host(state.step))))
    jax.block_until_ready(batches)
  with timer("update"):
    state, updates = apply_updates(tr, update, state, batches, key)
  m = {k: float(np.mean([x[k] for x in updates])) for k in updates[0]}
  m.update(staleness_metrics(updates))
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
  steps_per_iteration = registry.optimizer_steps_per_iteration(c)
  scfg = sampler_config(c, tr.model_cfg, "rollout")
  algo = make_algorithm(tr, update_lib.reference_params(init_params), scfg)
  rollout = make_rollout(tr, scfg)
  eval_examples = tr.eval_examples()
  stream = tr.train_stream(c.batch.num_prompts, c.batch.group_size, seed=c.seed,
                           held_out=eval_examples)

  def evaluate(params, done):  # logged at the global step: SFT steps + iteration
    return tr.evaluate(params, eval_examples, "eval", tr.sft_steps_done + done)

  with Stage(tr, "rl", guard, unit="iteration", num_steps=c.train.num_iterations,
             checkpoint_every=c.train.checkpoint_every, time_budget_s=c.train.time_budget_s,
             keep=c.train.keep_checkpoints, fields=RL_FIELDS,
             best_metric=BEST_METRIC if eval_examples else None) as stage:
    state, meta = stage.resume(tr.new_state(init_params, tx), stream)
    history = meta.get("history", {})
    # The log goes on after the step restored; without an RL checkpoint, a pre-RL evaluation that
    # a stopped run logged is redone below, so its records at that step go too.
    tr.writer.rewind(tr.sft_steps_done + stage.start, redo=() if stage.restored else ("eval/",))
    update = tr.make_update(tx, algo.loss, state)
    history["sft_steps"] = tr.sft_steps_done
    if stage.start == 0 and "before" not in history and c.eval.before_training and eval_examples:
      history["before"] = evaluate(state.params, 0)
      stage.save(0, state, stream, {"history": history}, _best(history["before"]))
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
        if len(updates) != steps_per_iteration:  # the schedule's length assumes it
          raise RuntimeError(f"algorithm {c.algorithm!r} planned {len(updates)} optimizer steps "
                             f"in iteration {done}, but its optimizer_steps_per_iteration says "
                             f"{steps_per_iteration}")
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
        evaluated = None
        if eval_examples and (done % c.train.eval_every == 0 or stage.is_last(done)):
          history[f"eval_{done}"] = evaluated = evaluate(state.params, done)
        if stage.end_step(done, state, stream, {"history": history}, _best(evaluated)):
          break
    finally:
      bar.close()
  tr.params = state.params
  return history


def _best(metrics: dict | None) -> dict | None:
  """The checkpoint metrics of an evaluation (None without one)."""
  return None if metrics is None else {BEST_METRIC: float(metrics["accuracy"])}


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
