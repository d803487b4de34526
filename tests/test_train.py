"""End-to-end training loop: exact resume (clean stop and SIGKILL), sharded == single device,
2 processes == 1 process, and clear errors for bad configs (issue 4)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from egspo import checkpoint as ckpt_lib
from egspo import config as config_lib
from egspo import sharding
from egspo import train
from egspo import trainer
from egspo.rl import update as update_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def micro_config(**overrides):
  """The tiny pipeline shrunk to seconds on the synthetic `copy` task (dense reward, so the
  updates carry a real signal): 2 SFT steps, 2 prompts × G=4, 8 denoising steps."""
  c = config_lib.base_config("copy", "tiny")
  c.sft.steps = 2
  c.sft.batch_size = 8
  c.sft.warmup_steps = 1
  c.batch.num_prompts = 2
  c.batch.group_size = 4
  c.batch.micro_batch_size = 8
  c.rollout.gen_length = 16
  c.rollout.block_length = 8
  c.rollout.steps = 8
  c.rollout.max_prompt_length = 32
  c.egspo.num_selected_steps = 2
  c.task.num_eval_examples = 0
  c.train.num_iterations = 3
  c.train.checkpoint_every = 1
  c.sft.checkpoint_every = 1
  c.eval.before_training = False
  c.mesh.num_devices = 1
  c.optim.learning_rate = 1e-3
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def final_params(workdir, stage="rl"):
  ck = ckpt_lib.Checkpointer(pathlib.Path(workdir) / "checkpoints" / stage)
  state, meta = ck.restore()
  ck.close()
  return state, meta


def assert_params_close(a, b, atol=1e-4, max_outlier_frac=1e-3, outlier_atol=5e-3):
  """Sharded vs single-device parameters. Adam normalises each coordinate, so a coordinate whose
  gradient is ~0 (an embedding row no sample used) can move by up to lr per step on float noise
  alone: allow a few such outliers (bounded by `outlier_atol`), and check everything else tightly.
  The scale-sensitive figures (loss, grad norm, KL) are compared by `assert_same_metrics`."""
  x = np.concatenate([np.ravel(np.asarray(l)) for l in jax.tree.leaves(a)])
  y = np.concatenate([np.ravel(np.asarray(l)) for l in jax.tree.leaves(b)])
  diff = np.abs(x - y)
  assert diff.max() <= outlier_atol, diff.max()
  assert np.mean(diff > atol) <= max_outlier_frac, np.mean(diff > atol)


def assert_trees_equal(a, b, atol=0.0):
  """Same structure; leaves equal, or within `atol` when given."""
  if atol:
    chex.assert_trees_all_close(a, b, atol=atol, rtol=1e-7)
  else:
    chex.assert_trees_all_equal(a, b)


def test_resume_after_clean_stop_is_exact(tmp_path):
  train.run(micro_config(), tmp_path / "straight")
  train.run(micro_config(**{"train.num_iterations": 1}), tmp_path / "resumed")
  train.run(micro_config(), tmp_path / "resumed")  # resumes at iteration 1
  a, meta_a = final_params(tmp_path / "straight")
  b, meta_b = final_params(tmp_path / "resumed")
  assert meta_a["step"] == meta_b["step"] == 3
  assert meta_a["data"] == meta_b["data"]
  assert_trees_equal(a, b)
  # Metrics: one record per RL iteration after the resume de-duplication.
  recs = [json.loads(l) for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
  rl_steps = [r["step"] for r in recs if "rl/loss" in r]
  assert rl_steps == [3, 4, 5]  # global steps: sft.steps (2) + iteration


def test_rl_stage_is_rl_iteration_plus_housekeeping(tmp_path):
  """One iteration assembled by hand from the public pieces (RL_KEY, the prompt stream,
  make_algorithm, make_rollout, rl_iteration) gives the run's parameters and logged metrics."""
  c = micro_config(**{"sft.steps": 0, "train.num_iterations": 1})
  train.run(c, tmp_path / "run")
  tr = trainer.Trainer.create(c, tmp_path / "by_hand")
  with sharding.use_mesh(tr.mesh, tr.rules):  # as train.run
    tx = train.rl_optimizer(c)
    scfg = trainer.sampler_config(c, tr.model_cfg, "rollout")
    algo = train.make_algorithm(tr, update_lib.reference_params(tr.params), scfg)
    state = tr.new_state(tr.params, tx)
    stream = tr.train_stream(c.batch.num_prompts, c.batch.group_size, seed=c.seed)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(c.seed), train.RL_KEY), 0)
    out = train.rl_iteration(tr, train.make_rollout(tr, scfg), algo,
                             tr.make_update(tx, algo.loss, state), state,
                             stream.next_batch().repeated, key)
  tr.writer.close()
  saved, _ = final_params(tmp_path / "run")
  assert_trees_equal(jax.tree.leaves(saved["params"]), jax.tree.leaves(out.state.params))
  (logged,) = [r for r in metric_rows(tmp_path / "run") if "rl/loss" in r]
  for k in ("loss", "reward", "kl", "grad_norm", "adv_abs_mean"):
    assert logged[f"rl/{k}"] == out.metrics[k], k
  assert len(out.updates) == len(out.batches) == c.egspo.num_selected_steps  # per_step schedule


def test_time_budgets_end_both_stages_for_good(tmp_path):
  """sft.time_budget_s / train.time_budget_s: each stage stops after its first step, evaluates
  and saves as finished; the relaunch trains no further and logs nothing twice. sft.log_every
  logs the last SFT step too."""
  c = _eval_config(**{"sft.steps": 5, "sft.log_every": 2, "sft.time_budget_s": 1e-6,
                      "train.num_iterations": 3, "train.eval_every": 100,
                      "train.time_budget_s": 1e-6})
  history = train.run(c, tmp_path)
  assert history["sft_steps"] == 1 and {"before", "eval_1"} <= set(history)
  assert [r["step"] for r in metric_rows(tmp_path) if "sft/loss" in r] == [1]
  assert [r["step"] for r in metric_rows(tmp_path) if "rl/loss" in r] == [2]
  assert [r["step"] for r in metric_rows(tmp_path) if "eval/accuracy" in r] == [1, 2]
  _, meta = final_params(tmp_path)
  assert meta["step"] == 1 and meta["finished"] and meta["history"]["eval_1"] == history["eval_1"]
  log = (tmp_path / "metrics.jsonl").read_text()
  again = train.run(c, tmp_path)
  assert (tmp_path / "metrics.jsonl").read_text() == log
  assert again == history
  assert final_params(tmp_path)[1]["step"] == 1 and final_params(tmp_path, "sft")[1]["step"] == 1


def test_prng_derivations_are_pinned():
  """Exact resume and every measured run in the README depend on these derivations."""
  assert (train.SFT_KEY, train.RL_KEY, train.ROLLOUT_KEY, train.UPDATE_KEY_BASE,
          train.SFT_DATA_SEED_OFFSET, trainer.EVAL_SET_SEED, trainer.LORA_SEED_OFFSET) == \
      (1, 2, 0, 100, 17, 7919, 1)


def metric_rows(workdir):
  return [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def assert_no_duplicate_rows(workdir):
  """Every (metric, step) pair is logged once."""
  pairs = [(k, r["step"]) for r in metric_rows(workdir) for k in r if k not in ("step", "time")]
  dups = sorted({p for p in pairs if pairs.count(p) > 1})
  assert not dups, dups


def _corrupt_step(step_dir):
  """Truncates the array data files of a committed step (it still looks complete)."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files
  for p in files:
    with open(p, "r+b") as f:
      f.truncate(3)


def test_corrupt_latest_rl_checkpoint_relaunch_converges(tmp_path):
  """Fallback to the previous step, retraining to the corrupt one (no StepAlreadyExistsError: the
  bad step is moved aside), bitwise the same result; a second relaunch has nothing to do and the
  log has no duplicate rows."""
  c = micro_config()
  train.run(c, tmp_path)
  good, _ = final_params(tmp_path)
  rl = tmp_path / "checkpoints" / "rl"
  _corrupt_step(rl / "3")
  history = train.run(c, tmp_path)
  assert "preempted" not in history
  aside = list((rl / "corrupt").iterdir())
  assert len(aside) == 1 and aside[0].name.startswith("3-")
  again, meta = final_params(tmp_path)
  assert meta["step"] == 3
  assert_trees_equal(good, again)  # retrained from step 2: exactly what was lost
  log = (tmp_path / "metrics.jsonl").read_text()
  train.run(c, tmp_path)  # finished: no work
  assert (tmp_path / "metrics.jsonl").read_text() == log
  assert [r["step"] for r in metric_rows(tmp_path) if "rl/loss" in r] == [3, 4, 5]
  assert_no_duplicate_rows(tmp_path)
  assert len(list((rl / "corrupt").iterdir())) == 1


def _eval_config(**overrides):
  return micro_config(**{"task.num_eval_examples": 4, "eval.batch_size": 4,
                         "eval.before_training": True, "train.num_iterations": 2, **overrides})


def test_crash_after_the_pre_rl_evaluation_logs_it_once(tmp_path, monkeypatch):
  """Killed after the pre-RL evaluation was logged, before anything recorded it: the relaunch
  evaluates again and the log holds that evaluation once."""
  original = trainer.Trainer.evaluate

  def evaluate_then_die(self, *args, **kwargs):
    original(self, *args, **kwargs)
    raise RuntimeError("killed")

  monkeypatch.setattr(trainer.Trainer, "evaluate", evaluate_then_die)
  with pytest.raises(RuntimeError, match="killed"):
    train.run(_eval_config(), tmp_path)
  assert [r["step"] for r in metric_rows(tmp_path) if "eval/accuracy" in r] == [2]
  monkeypatch.setattr(trainer.Trainer, "evaluate", original)
  history = train.run(_eval_config(), tmp_path)
  assert "before" in history and "eval_2" in history
  assert [r["step"] for r in metric_rows(tmp_path) if "eval/accuracy" in r] == [2, 4]
  assert_no_duplicate_rows(tmp_path)


def test_sigterm_during_the_pre_rl_evaluation_stops_cleanly(tmp_path, monkeypatch):
  """SIGTERM while evaluating before RL: `run` returns (main exits 0) with the evaluation saved
  as RL step 0; the relaunch does not redo it and logs nothing twice."""
  original = trainer.Trainer.evaluate
  calls = []

  def evaluate_and_signal(self, params, examples, tag, step):
    calls.append(step)
    out = original(self, params, examples, tag, step)
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.05)  # the handler runs in the main thread between bytecodes
    return out

  monkeypatch.setattr(trainer.Trainer, "evaluate", evaluate_and_signal)
  history = train.run(_eval_config(), tmp_path)
  assert history["preempted"] and "before" in history and calls == [2]
  assert not (tmp_path / "history.json").exists()
  _, meta = final_params(tmp_path)
  assert meta["step"] == 0 and meta["history"]["before"] == history["before"]
  history = train.run(_eval_config(), tmp_path)
  assert "preempted" not in history and calls == [2, 4]  # the pre-RL evaluation not redone
  assert [r["step"] for r in metric_rows(tmp_path) if "eval/accuracy" in r] == [2, 4]
  assert_no_duplicate_rows(tmp_path)


def test_sigterm_during_start_up_returns_without_training(tmp_path, monkeypatch):
  original = trainer.build_model

  def build_and_signal(*args, **kwargs):
    model = original(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    return model

  monkeypatch.setattr(trainer, "build_model", build_and_signal)
  assert train.run(micro_config(), tmp_path) == {"preempted": True}
  assert not (tmp_path / "checkpoints").exists()
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the guard's handler is gone
  monkeypatch.setattr(trainer, "build_model", original)
  assert "preempted" not in train.run(micro_config(), tmp_path)
  assert final_params(tmp_path)[1]["step"] == 3


@pytest.mark.parametrize("field,value,stage", [("sft.learning_rate", float("nan"), "SFT"),
                                               ("optim.learning_rate", float("inf"), "RL")])
def test_nonfinite_learning_rate_stops_with_a_clear_error(tmp_path, monkeypatch, field, value,
                                                          stage):
  """Non-finite updates are refused (the parameters stay finite), and after
  train.max_refused_updates of them in a row the run stops with one error naming the stage and
  the fields; no checkpoint on disk holds a NaN/Inf. `validate` rejects these rates up front, so
  it is bypassed here: the guard holds for whatever reaches the update (e.g. a finite rate that
  overflows, or a non-finite checkpoint to start from)."""
  monkeypatch.setattr(config_lib, "validate", lambda c: None)
  c = micro_config(**{field: value, "sft.steps": 3, "train.max_refused_updates": 2})
  with pytest.raises(update_lib.NonFiniteError) as e:
    train.run(c, tmp_path)
  msg = str(e.value)
  assert msg.startswith(f"{stage} stopped at ") and "2 updates in a row were refused" in msg
  assert field in msg and "train.max_refused_updates=2" in msg and len(msg.splitlines()) == 1
  assert not (tmp_path / "history.json").exists()
  saved = 0
  for d in (tmp_path / "checkpoints").iterdir():
    with ckpt_lib.Checkpointer(d) as ck:
      for step in ck.all_steps():
        state, _ = ck.restore(step)
        assert ckpt_lib.nonfinite_leaves(state) == [], (d.name, step)
        saved += 1
  assert saved >= 1


def _run_main(workdir, extra=(), env_extra=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **(env_extra or {}))
  args = [sys.executable, "-m", "egspo.main", "--config=configs/copy.py:tiny",
          f"--workdir={workdir}"]
  c = micro_config()
  for k in ("sft.steps", "sft.batch_size", "sft.warmup_steps", "batch.num_prompts",
            "batch.group_size", "batch.micro_batch_size", "rollout.gen_length",
            "rollout.block_length", "rollout.steps", "rollout.max_prompt_length",
            "egspo.num_selected_steps", "task.num_eval_examples", "train.num_iterations",
            "train.checkpoint_every", "sft.checkpoint_every", "eval.before_training", "mesh.num_devices",
            "optim.learning_rate"):
    node = c
    for p in k.split("."):
      node = node[p]
    args.append(f"--config.{k}={node}")
  return subprocess.Popen(args + list(extra), cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(tmp_path):
  straight = _run_main(tmp_path / "straight", ["--config.train.num_iterations=4"])
  victim = _run_main(tmp_path / "killed", ["--config.train.num_iterations=4"])
  ckdir = tmp_path / "killed" / "checkpoints" / "rl"
  deadline = time.time() + 240
  while time.time() < deadline and not (ckdir / "2").exists():
    if victim.poll() is not None:
      pytest.fail("the run ended before it could be killed:\n" + victim.stdout.read()[-3000:])
    time.sleep(0.2)
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  out, _ = straight.communicate(timeout=300)
  assert straight.returncode == 0, out[-3000:]
  resumed = _run_main(tmp_path / "killed", ["--config.train.num_iterations=4"])
  out, _ = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, out[-3000:]
  assert "RL: resumed at iteration" in out
  assert_trees_equal(final_params(tmp_path / "straight")[0], final_params(tmp_path / "killed")[0])


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
  proc = _run_main(tmp_path / "w", ["--config.train.num_iterations=1000",
                                    "--config.train.checkpoint_every=1000"])
  ckdir = tmp_path / "w" / "checkpoints" / "sft"
  deadline = time.time() + 240
  while time.time() < deadline and not (ckdir / "2").exists():  # SFT done: RL is running
    time.sleep(0.2)
  time.sleep(3.0)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-3000:]
  _, meta = final_params(tmp_path / "w")
  assert 1 <= meta["step"] < 1000


@pytest.mark.parametrize("mesh", [(2, 2, 2), pytest.param((8, 1, 1), marks=pytest.mark.slow),
                                  pytest.param((1, 2, 4), marks=pytest.mark.slow),
                                  pytest.param((2, 4, 1), marks=pytest.mark.slow)])
def test_sharded_training_equals_single_device(tmp_path, mesh):
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices")
  single = micro_config(**{"train.num_iterations": 2})
  train.run(single, tmp_path / "single")
  sharded = micro_config(**{"train.num_iterations": 2, "mesh.num_devices": 8,
                            "mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2]})
  train.run(sharded, tmp_path / "sharded")
  a, _ = final_params(tmp_path / "single")
  b, _ = final_params(tmp_path / "sharded")
  # The copy task's dense reward gives real gradients: with all advantages zero, Adam would turn
  # float noise into lr-sized steps and any two runs would differ.
  assert_params_close(a["params"], b["params"])
  assert_same_metrics(tmp_path / "single", tmp_path / "sharded")


def assert_same_metrics(dir_a, dir_b):
  def rl_records(d):
    recs = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "rl/loss" in r]

  ra, rb = rl_records(dir_a), rl_records(dir_b)
  assert len(ra) == len(rb) > 0
  for x, y in zip(ra, rb):
    for k in ("rl/loss", "rl/grad_norm", "rl/kl", "rl/reward", "rl/adv_abs_mean",
              "rl/ratio/mean", "rl/denom"):
      assert x[k] == pytest.approx(y[k], rel=1e-3, abs=1e-6), k


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
  """2 JAX processes on loopback × 2 fake devices each == 1 process × 4 devices."""
  port = 20000 + os.getpid() % 20000
  common = ["--config.train.num_iterations=2", "--config.mesh.num_devices=-1"]
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  procs = [_run_main(tmp_path / "multi", common + [f"--coordinator_address=127.0.0.1:{port}",
                                                   "--num_processes=2", f"--process_id={i}"],
                     env_extra=env) for i in range(2)]
  single = _run_main(tmp_path / "single", common,
                     env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  for p in procs + [single]:
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
  a = final_params(tmp_path / "single")[0]
  b = final_params(tmp_path / "multi")[0]
  assert_params_close(a["params"], b["params"])
  assert_same_metrics(tmp_path / "single", tmp_path / "multi")


@pytest.mark.parametrize("field,value,msg", [
    ("algorithm", "ppo", "algorithm"),
    ("rollout.gen_length", 20, "rollout.gen_length"),
    ("rollout.steps", 7, "rollout.steps"),
    ("batch.micro_batch_size", 3, "batch.micro_batch_size"),
    ("egspo.num_selected_steps", 99, "egspo.num_selected_steps"),
    ("egspo.selection", "max", "egspo.selection"),
    ("task.prompt_style", "fancy", "task.prompt_style"),
    ("sft.schedule", "cosine", "sft.schedule"),
    ("sft.final_lr_fraction", 2.0, "sft.final_lr_fraction"),
])
def test_bad_config_names_the_field(field, value, msg):
  c = micro_config()
  node = c
  *path, last = field.split(".")
  for p in path:
    node = node[p]
  node[last] = value
  with pytest.raises(ValueError, match=msg.replace(".", r"\.")):
    config_lib.validate(c)


def test_wsd_sft_schedule_fields():
  c = micro_config()
  c.sft.steps, c.sft.warmup_steps, c.sft.schedule = 100, 10, "wsd"
  for bad in (0.0, 1.5):
    c.sft.decay_fraction = bad
    with pytest.raises(ValueError, match=r"sft\.decay_fraction"):
      config_lib.validate(c)
  c.sft.decay_fraction = 1.0
  config_lib.validate(c)
  c.sft.warmup_steps = 100
  with pytest.raises(ValueError, match=r"sft\.warmup_steps"):
    config_lib.validate(c)
  c.sft.warmup_steps = 10
  c.sft.schedule_steps, c.sft.steps = 100, 10**8  # a control trains on past the schedule
  config_lib.validate(c)


def test_8b_config_needs_a_checkpoint():
  c = config_lib.base_config("countdown")
  with pytest.raises(ValueError, match="model.checkpoint"):
    config_lib.validate(c)
  c.model.checkpoint = "/some/dir"
  config_lib.validate(c)  # the paper's setting itself is valid
  assert (c.egspo.num_selected_steps, c.egspo.lam, c.loss.eps, c.loss.eps_high, c.loss.beta) == \
      (8, 0.5, 0.2, 0.5, 0.04)
  assert (c.rollout.gen_length, c.rollout.block_length, c.rollout.steps) == (256, 32, 128)


def test_main_prints_one_line_for_a_checkpoint_error(tmp_path):
  """A checkpoint directory that cannot be written ends the run with exit 1 and one
  `error: ...` line naming it, not a traceback."""
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "checkpoints" / "sft").write_text("a file where a directory should be")
  proc = subprocess.run(
      [sys.executable, "-m", "egspo.main", "--config=configs/countdown.py:tiny",
       f"--workdir={tmp_path}", "--config.sft.steps=60", "--config.train.num_iterations=1",
       "--config.task.num_eval_examples=4"], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: cannot write checkpoint ") and "checkpoints/sft" in last
  assert "Traceback" not in proc.stderr


def test_rl_keeps_the_best_evaluated_checkpoint(tmp_path):
  """RL's checkpoints: the newest `train.keep_checkpoints` and, beside them, the step whose
  held-out accuracy was best (orbax's best-N policy; every evaluated step is saved)."""
  c = micro_config(**{"task.num_eval_examples": 4, "eval.batch_size": 4,
                      "eval.before_training": True, "train.num_iterations": 4,
                      "train.eval_every": 1, "train.checkpoint_every": 100,
                      "train.keep_checkpoints": 1})
  history = train.run(c, tmp_path)
  acc = {0: history["before"]["accuracy"]}
  acc.update({i: history[f"eval_{i}"]["accuracy"] for i in range(1, 5)})
  ck = ckpt_lib.Checkpointer(tmp_path / "checkpoints" / "rl", best_metric=train.BEST_METRIC)
  try:
    best = ck.best_step()
    assert best is not None and acc[best] == max(acc.values()), (best, acc)
    assert set(ck.all_steps()) == {4, best}
    _, meta = ck.restore(best)
    assert meta["step"] == best
  finally:
    ck.close()
