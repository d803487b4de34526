"""Tests for egspo.checkpoint: round trips, sharded restore, keep-N and best-N, atomicity,
corruption, exact resume (normal stop, SIGKILL, SIGTERM with egspo.preemption's guard, one and two
processes) and the refusal to save NaN/Inf.

This file is also the toy training program the subprocess tests run:
    python tests/test_checkpoint.py WORKDIR TOTAL_STEPS [--sleep S] [--guard]
"""

import argparse
import functools
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

if __name__ == "__main__":  # subprocess: same device set-up as the in-process tests (conftest)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import chex  # pylint: disable=g-import-not-at-top  (starts no JAX backend)
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    chex.set_n_cpu_devices(8)

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from egspo import checkpoint as ckpt_lib
from egspo.checkpoint import CheckpointError, Checkpointer
from egspo.preemption import PreemptionGuard

P = jax.sharding.PartitionSpec
NamedSharding = jax.sharding.NamedSharding
THIS_FILE = pathlib.Path(__file__).resolve()


def _is_key(x) -> bool:
  return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _assert_trees_identical(a, b):
  """Same structure, dtypes and bits (typed keys compared through their key data)."""
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    if _is_key(x):
      assert _is_key(y)
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    x, y = np.asarray(x).reshape(-1), np.asarray(y).reshape(-1)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8))


# ---------------------------------------------------------------------------------------------
# The toy training program: a tiny MLP, AdamW, a key split per step, a positioned data stream.

_TX = optax.adamw(3e-2, weight_decay=0.1)
_BATCH, _DIN, _DH = 8, 4, 16


def _batch_at(position: int):
  """Deterministic data stream: the batch at `position` depends on the position only."""
  rng = np.random.default_rng([1234, position])
  x = rng.normal(size=(_BATCH, _DIN)).astype(np.float32)
  y = np.sin(x.sum(-1, keepdims=True)).astype(np.float32)
  return x, y


@jax.jit
def _init_state():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {"w1": jax.random.normal(k1, (_DIN, _DH)) * 0.5, "b1": jnp.zeros(_DH),
            "w2": jax.random.normal(k2, (_DH, 1)) * 0.5, "b2": jnp.zeros(1)}
  return {"params": params, "opt": _TX.init(params), "key": k3}


def _loss(params, x, y, key):
  x = x + 0.1 * jax.random.normal(key, x.shape)  # input noise: makes the RNG key matter
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)


# The state is donated: an async save must have copied it off the device before returning.
@functools.partial(jax.jit, donate_argnums=0)
def _train_step(state, x, y):
  key, sub = jax.random.split(state["key"])
  loss, grads = jax.value_and_grad(_loss)(state["params"], x, y, sub)
  updates, opt = _TX.update(grads, state["opt"], state["params"])
  return {"params": optax.apply_updates(state["params"], updates), "opt": opt, "key": key}, loss


def toy_train(workdir, total_steps: int, *, sleep: float = 0.0, guard: bool = False,
              stop_after: int | None = None):
  """Trains to `total_steps`, resuming from the latest checkpoint; saves after every step.

  Checkpoint step s holds the state after s training steps and meta {step, data_position}.
  `stop_after` returns normally after that many steps (of the whole run). Returns the state.
  """
  state = _init_state()
  start, position = 0, 0
  ckpt = Checkpointer(workdir, max_to_keep=2) if workdir is not None else None
  if ckpt is not None and ckpt.latest_step() is not None:
    state, meta = ckpt.restore(target=jax.eval_shape(lambda: state))
    start, position = meta["step"], meta["data_position"]
  end = total_steps if stop_after is None else min(total_steps, stop_after)
  with PreemptionGuard() as g:
    for step in range(start, end):
      x, y = _batch_at(position)
      position += 1
      state, _ = _train_step(state, x, y)
      if ckpt is not None:
        ckpt.save(step + 1, state, {"step": step + 1, "data_position": position})
      if guard and g.should_stop(step):
        print(f"preempted after step {step + 1}", flush=True)
        break
      time.sleep(sleep)
  if ckpt is not None:
    ckpt.close()
  return state


def _run_toy_subprocess(workdir, total_steps, *, sleep, guard=False):
  cmd = [sys.executable, str(THIS_FILE), str(workdir), str(total_steps), "--sleep", str(sleep)]
  if guard:
    cmd.append("--guard")
  return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, PYTHONPATH=str(THIS_FILE.parents[1])))


def _wait_for_step(proc, workdir, step, timeout=60.0):
  """Polls until the committed step directory `step` exists (or the process has ended)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if (pathlib.Path(workdir) / str(step)).is_dir():
      return
    if proc.poll() is not None:
      raise AssertionError(f"toy run ended early rc={proc.returncode}: {proc.stderr.read()[-2000:]}")
    time.sleep(0.01)
  proc.kill()
  raise AssertionError(f"step {step} never appeared in {workdir}")


# ---------------------------------------------------------------------------------------------
# Exact resume.

N_STEPS = 12


def test_exact_resume_after_normal_stop(tmp_path):
  straight = toy_train(None, N_STEPS)
  toy_train(tmp_path, N_STEPS, stop_after=5)
  assert Checkpointer(tmp_path).latest_step() == 5
  resumed = toy_train(tmp_path, N_STEPS)
  _assert_trees_identical(straight, resumed)
  # And the control: resuming without the saved RNG key/data position gives other bits.
  assert not np.array_equal(np.asarray(straight["params"]["w1"]),
                            np.asarray(toy_train(None, N_STEPS - 5)["params"]["w1"]))


def test_exact_resume_after_sigkill(tmp_path):
  total = 20
  proc = _run_toy_subprocess(tmp_path, total, sleep=0.1)
  _wait_for_step(proc, tmp_path, 4)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  assert proc.returncode == -signal.SIGKILL
  ckpt = Checkpointer(tmp_path)
  killed_at = ckpt.latest_step()
  ckpt.close()
  assert 4 <= killed_at < total  # it really was cut off mid-run
  resumed = toy_train(tmp_path, total)
  _assert_trees_identical(toy_train(None, total), resumed)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  total = 200
  proc = _run_toy_subprocess(tmp_path, total, sleep=0.05, guard=True)
  _wait_for_step(proc, tmp_path, 3)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 0, err[-2000:]
  assert "preempted after step" in out
  stopped = int(out.split("preempted after step")[1].split()[0])
  ckpt = Checkpointer(tmp_path)
  assert ckpt.latest_step() == stopped < total
  _, meta = ckpt.restore()
  ckpt.close()
  assert meta == {"step": stopped, "data_position": stopped}
  _assert_trees_identical(toy_train(None, stopped + 3), toy_train(tmp_path, stopped + 3))


# ---------------------------------------------------------------------------------------------
# Round trips, sharding, retention, atomicity, corruption.


def _state_with_everything():
  params = {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4), "b": jnp.ones(4, jnp.bfloat16)}
  return {"params": params, "opt": optax.adamw(1e-3).init(params), "key": jax.random.key(7),
          "batch_keys": jax.random.split(jax.random.key(3), 8), "step": jnp.int32(41)}


def test_roundtrip_typed_keys_optax_state_and_meta(tmp_path):
  state = _state_with_everything()
  meta = {"step": 41, "data_position": [3, 17], "config": {"lr": 1e-3, "name": "tiny"}}
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(41, state, meta)
    ckpt.wait_until_finished()
    assert ckpt.latest_step() == 41 and ckpt.all_steps() == [41]
    restored, restored_meta = ckpt.restore(target=jax.eval_shape(lambda: state))
    assert restored_meta == meta
    _assert_trees_identical(state, restored)
    assert restored["key"].dtype == state["key"].dtype
    # The optax state comes back as the same named tuples (the target's structure).
    assert type(restored["opt"][0]) is type(state["opt"][0])
    # Without a target: the saved structure as plain containers, keys still typed.
    untargeted, _ = ckpt.restore(41)
    assert _is_key(untargeted["key"])
    np.testing.assert_array_equal(jax.random.key_data(untargeted["batch_keys"]),
                                  jax.random.key_data(state["batch_keys"]))
    np.testing.assert_array_equal(untargeted["params"]["w"], state["params"]["w"])


def test_nnx_model_optimizer_and_rngs_roundtrip(tmp_path):
  """The loop's real state: nnx.split of (model, nnx.Optimizer) with an nnx.Rngs stream."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  class Toy(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(3, 4, rngs=rngs)
      self.rngs = rngs

  model = Toy(nnx.Rngs(0, dropout=1))
  opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    noise = jax.random.normal(model.rngs.dropout(), (2, 3))  # advances the rng stream
    opt.update(model, nnx.grad(lambda m: jnp.sum(m.linear(noise) ** 2))(model))

  step(model, opt)
  graphdef, state = nnx.split((model, opt))
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state, {"step": 1})
    ckpt.wait_until_finished()
    restored, meta = ckpt.restore(target=nnx.eval_shape(lambda: state))
  assert meta == {"step": 1}
  _assert_trees_identical(state, restored)
  model2, opt2 = nnx.merge(graphdef, restored)
  # Both copies continue identically: same rng draw, same update.
  step(model, opt)
  step(model2, opt2)
  _assert_trees_identical(nnx.state((model, opt)), nnx.state((model2, opt2)))


def test_sharded_restore_into_other_mesh_layout(tmp_path):
  assert jax.device_count() == 8
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  w = jax.device_put(jnp.arange(64, dtype=jnp.float32).reshape(8, 8),
                     NamedSharding(mesh, P("data", "model")))
  keys = jax.device_put(jax.random.split(jax.random.key(0), 8), NamedSharding(mesh, P("data")))
  state = {"w": w, "keys": keys, "v": jnp.arange(8.0)}
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(3, state, {"step": 3})
    ckpt.wait_until_finished()
    target = {
        "w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=NamedSharding(mesh, P("model", None))),
        "keys": jax.ShapeDtypeStruct((8,), keys.dtype, sharding=NamedSharding(mesh, P("model"))),
        "v": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=NamedSharding(mesh, P(("data", "model")))),
    }
    restored, _ = ckpt.restore(target=target)
  for name in ("w", "keys", "v"):
    assert restored[name].sharding == target[name].sharding, name
  assert len(restored["v"].addressable_shards) == 8
  assert restored["v"].addressable_shards[0].data.shape == (1,)
  _assert_trees_identical(state, restored)


def test_keep_latest_n_beside_the_best_n(tmp_path):
  accuracy = {2: 0.3, 4: 0.7, 6: 0.5, 8: 0.6}  # evaluated at even steps only
  with Checkpointer(tmp_path, max_to_keep=2, best_metric="eval/accuracy") as ckpt:
    assert ckpt.best_step() is None
    for s in range(10):
      metrics = {"eval/accuracy": accuracy[s], "eval/n": 8} if s in accuracy else None
      assert ckpt.save(s, {"x": jnp.full(2, s, jnp.float32)}, {"step": s}, metrics=metrics)
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [4, 8, 9] and ckpt.best_step() == 4
    assert not ckpt.save(9, {"x": jnp.zeros(2)})  # not newer than the latest step
    with np.testing.assert_raises(ValueError):  # the ranked metric is required and finite
      ckpt.save(10, {"x": jnp.zeros(2)}, metrics={"eval/n": 8})
    with np.testing.assert_raises(ValueError):
      ckpt.save(10, {"x": jnp.zeros(2)}, metrics={"eval/accuracy": float("nan")})
  with Checkpointer(tmp_path, max_to_keep=2, best_metric="eval/accuracy") as ckpt:
    assert ckpt.best_step() == 4  # the metrics are stored with the steps
    state, meta = ckpt.restore(ckpt.best_step())
    assert meta == {"step": 4} and float(state["x"][0]) == 4.0
    ckpt.save(10, {"x": jnp.zeros(2)}, {"step": 10}, metrics={"eval/accuracy": 0.9})
    ckpt.save(11, {"x": jnp.zeros(2)}, {"step": 11})
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [10, 11] and ckpt.best_step() == 10
  with Checkpointer(tmp_path / "min", max_to_keep=1, best_metric="loss", best_mode="min",
                    keep_best=2) as ckpt:
    for s, loss in enumerate([3.0, 1.0, 2.0, 4.0]):
      ckpt.save(s, {"x": jnp.zeros(1)}, metrics={"loss": loss})
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [1, 2, 3] and ckpt.best_step() == 1
  with Checkpointer(tmp_path / "plain", max_to_keep=None) as ckpt:
    for s in range(4):
      ckpt.save(s, {"x": jnp.zeros(1)})
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [0, 1, 2, 3] and ckpt.best_step() is None
    with np.testing.assert_raises(ValueError):  # metrics need best_metric
      ckpt.save(4, {"x": jnp.zeros(1)}, metrics={"eval/accuracy": 0.5})
  for bad in ({"max_to_keep": 0}, {"best_mode": "best"}, {"best_metric": "a", "keep_best": 0}):
    with np.testing.assert_raises(ValueError):
      Checkpointer(tmp_path / "bad", **bad)


def _two_steps(directory):
  with Checkpointer(directory, max_to_keep=5) as ckpt:
    for s in (1, 2):
      ckpt.save(s, {"x": jnp.full(256, s, jnp.float32)}, {"step": s})
  return directory


def test_interrupted_save_is_ignored_and_cleaned(tmp_path):
  _two_steps(tmp_path)
  # What a save killed mid-write leaves: a tmp dir with some, not all, of the files.
  tmp = tmp_path / f"3{ckpt_lib._ORBAX_TMP_SUFFIX}"
  shutil.copytree(tmp_path / "2", tmp)
  shutil.rmtree(tmp / "meta")
  ckpt = Checkpointer(tmp_path)
  assert ckpt.latest_step() == 2 and ckpt.all_steps() == [1, 2]
  state, meta = ckpt.restore()
  assert meta == {"step": 2} and float(state["x"][0]) == 2.0
  ckpt.close()
  assert not tmp.exists()  # swept when the directory was opened


@pytest.mark.parametrize("damage", ["state metadata deleted", "meta emptied"])
def test_corrupt_checkpoint_message_and_fallback(tmp_path, damage):
  _two_steps(tmp_path)
  if damage == "state metadata deleted":
    (tmp_path / "2" / "state" / "_METADATA").unlink()
  else:
    for f in (tmp_path / "2" / "meta").iterdir():
      f.write_bytes(b"")
  target = {"x": jax.ShapeDtypeStruct((256,), jnp.float32)}
  ckpt = Checkpointer(tmp_path)
  for t in (None, target):  # from the saved metadata, and into a target
    with np.testing.assert_raises(CheckpointError) as cm:
      ckpt.restore(target=t)
    msg = str(cm.exception)
    assert msg.startswith(f"checkpoint {tmp_path / '2'} cannot be restored: "), msg
    assert len(msg.splitlines()) == 1
  state, meta = ckpt.restore(target=target, fallback=True)
  assert meta == {"step": 1} and float(state["x"][0]) == 1.0
  assert ckpt.all_steps() == [1]  # step 2 moved aside
  ckpt.close()


def test_truncated_array_file_is_reported(tmp_path):
  _two_steps(tmp_path)
  data_files = [p for p in (tmp_path / "2" / "state").rglob("*")
                if p.is_file() and p.parent.name == "d"]
  assert data_files
  for p in data_files:
    with open(p, "r+b") as f:
      f.truncate(3)
  ckpt = Checkpointer(tmp_path)
  with np.testing.assert_raises(CheckpointError) as cm:
    ckpt.restore(target={"x": jax.ShapeDtypeStruct((256,), jnp.float32)})
  assert str(tmp_path / "2") in str(cm.exception) and "cannot be restored" in str(cm.exception)
  state, meta = ckpt.restore(target={"x": jax.ShapeDtypeStruct((256,), jnp.float32)},
                             fallback=True)
  assert meta == {"step": 1} and float(state["x"][0]) == 1.0
  ckpt.close()


def test_restore_errors_name_the_problem(tmp_path):
  with Checkpointer(tmp_path / "empty") as ckpt, np.testing.assert_raises(FileNotFoundError):
    ckpt.restore()
  _two_steps(tmp_path / "two")
  with Checkpointer(tmp_path / "two") as ckpt:
    with np.testing.assert_raises(CheckpointError) as cm:
      ckpt.restore(step=5)
    assert "step 5" in str(cm.exception) and "[1, 2]" in str(cm.exception)
  with np.testing.assert_raises(ValueError):
    Checkpointer(tmp_path / "bad", max_to_keep=0)


def test_relative_and_home_paths_are_made_absolute(tmp_path, monkeypatch):
  """Orbax refuses relative paths ("Checkpoint path should be absolute")."""
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  for given, where in (("rel/ck", tmp_path / "rel" / "ck"),
                       ("~/ck", tmp_path / "home" / "ck")):
    with Checkpointer(given) as ckpt:
      assert str(ckpt.directory) == str(where)
      ckpt.save(1, {"x": jnp.ones(3)}, {"step": 1})
    with Checkpointer(given) as ckpt:
      assert ckpt.restore()[1] == {"step": 1}
    assert (where / "1" / "commit_success.txt").exists()
  assert str(ckpt_lib.resolve_directory("gs://bucket/run/ck")) == "gs://bucket/run/ck"


def test_save_refuses_nonfinite_state(tmp_path):
  state = {"params": {"w": jnp.array([1.0, jnp.nan]), "b": jnp.ones(2, jnp.bfloat16)},
           "count": jnp.int32(3), "key": jax.random.key(0)}
  with Checkpointer(tmp_path) as ckpt:
    with np.testing.assert_raises(CheckpointError) as cm:
      ckpt.save(5, state, {"step": 5})
    msg = str(cm.exception)
    assert "refusing to save step 5" in msg and str(tmp_path) in msg and "['params']['w']" in msg
    assert "['b']" not in msg  # only the bad leaves are named
    bad_b = {**state, "params": {"w": jnp.ones(2), "b": jnp.array([jnp.inf, 0], jnp.bfloat16)}}
    with np.testing.assert_raises(CheckpointError):
      ckpt.save(6, bad_b, {"step": 6}, force=True)
    assert ckpt.all_steps() == []
    # Integer, key and finite leaves are fine.
    ckpt.save(7, {**state, "params": {"w": jnp.ones(2), "b": jnp.ones(2, jnp.bfloat16)}})
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [7]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["7"]  # no tmp dir of the refused ones


def test_nonfinite_leaves_names_paths():
  tree = {"a": jnp.array([1.0, -jnp.inf]), "b": [jnp.zeros(2), jnp.array(jnp.nan)],
          "i": jnp.arange(3), "k": jax.random.key(1)}
  assert ckpt_lib.nonfinite_leaves(tree) == ["['a']", "['b'][1]"]
  assert ckpt_lib.nonfinite_leaves({"i": jnp.arange(2)}) == []


def _corrupt_arrays(step_dir):
  data = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert data
  for p in data:
    with open(p, "r+b") as f:
      f.truncate(3)


def test_fallback_moves_the_corrupt_step_aside_and_the_step_can_be_saved_again(tmp_path):
  _two_steps(tmp_path)
  target = {"x": jax.ShapeDtypeStruct((256,), jnp.float32)}
  _corrupt_arrays(tmp_path / "2")
  with Checkpointer(tmp_path) as ckpt:
    state, meta = ckpt.restore(target=target, fallback=True)
    assert meta == {"step": 1} and float(state["x"][0]) == 1.0
    assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
    aside = list((tmp_path / "corrupt").iterdir())
    assert len(aside) == 1 and aside[0].name.startswith("2-")  # kept for inspection
    assert (aside[0] / "state").is_dir()
    # Orbax no longer sees step 2: retraining can save it again (StepAlreadyExistsError before).
    ckpt.save(2, {"x": jnp.full(256, 22.0)}, {"step": 2}, force=True)
    ckpt.wait_until_finished()
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [1, 2]
    state, meta = ckpt.restore(target=target, fallback=True)
    assert meta == {"step": 2} and float(state["x"][0]) == 22.0
  # Without fallback nothing is moved.
  _corrupt_arrays(tmp_path / "2")
  with Checkpointer(tmp_path) as ckpt, np.testing.assert_raises(CheckpointError):
    ckpt.restore(target=target)
  assert (tmp_path / "2").is_dir() and len(list((tmp_path / "corrupt").iterdir())) == 1


def test_all_steps_corrupt_is_one_clear_error(tmp_path):
  _two_steps(tmp_path)
  for s in ("1", "2"):
    _corrupt_arrays(tmp_path / s)
  with Checkpointer(tmp_path) as ckpt:
    with np.testing.assert_raises(CheckpointError) as cm:
      ckpt.restore(target={"x": jax.ShapeDtypeStruct((256,), jnp.float32)}, fallback=True)
  first, *rest = str(cm.exception).splitlines()
  assert first.startswith(f"no restorable checkpoint in {tmp_path} (tried steps [2, 1]): ")
  assert f"{tmp_path / '2'} cannot be restored" in first
  assert len(rest) == 1 and f"{tmp_path / '1'} cannot be restored" in rest[0]
  assert cm.exception.__cause__ is None and cm.exception.__suppress_context__
  assert (tmp_path / "1").is_dir() and (tmp_path / "2").is_dir()  # nothing moved


def test_unusable_directory_is_one_clear_error(tmp_path):
  (tmp_path / "file").write_text("not a directory")
  with np.testing.assert_raises(CheckpointError) as cm:
    Checkpointer(tmp_path / "file" / "ck")
  assert str(cm.exception).startswith(f"cannot open checkpoint directory {tmp_path}/file/ck: ")
  assert len(str(cm.exception).splitlines()) == 1


_FULL_DISK_SCRIPT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
import jax, jax.numpy as jnp
from egspo.checkpoint import Checkpointer, CheckpointError
ckpt = Checkpointer(sys.argv[1], max_to_keep=2)
ckpt.save(1, {"x": jnp.zeros(4)}, {"step": 1})
ckpt.wait_until_finished()
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))  # "the disk is full" from now on
try:
  for step in (2, 3):  # async: the failure of step 2 surfaces at step 3's save (or close)
    ckpt.save(step, {f"w{i}": jax.random.normal(jax.random.key(i), (40_000,)) for i in range(24)},
              {"step": step})
  ckpt.close()
except CheckpointError as e:
  print("CheckpointError:", e)
"""


def test_failed_save_is_one_line_and_leaves_no_tmp_dir(tmp_path):
  """A save that cannot be written (here: a file-size limit, as a full disk) gives one error line
  naming the step directory and the cause, not orbax's hundreds of traceback lines, and its
  temporary directory is removed."""
  workdir = tmp_path / "ck"
  proc = subprocess.run([sys.executable, "-c", _FULL_DISK_SCRIPT, str(workdir)],
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=str(THIS_FILE.parents[1])))
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-3000:]
  lines = [l for l in out.splitlines() if l.strip()]
  error = [l for l in lines if l.startswith("CheckpointError:")]
  assert len(error) == 1, out[-3000:]
  assert f"cannot write checkpoint {workdir / '2'}: " in error[0] and "File too large" in error[0]
  assert len(lines) <= 3, out[-3000:]  # orbax's one-line notice, the error (no tracebacks)
  assert "Traceback" not in out and "Event loop is closed" not in out
  assert sorted(p.name for p in workdir.iterdir()) == ["1"]


def big_saves(workdir):
  """Saves a 32 MB state every step, forever: a SIGKILL lands mid-write sooner or later."""
  ckpt = Checkpointer(workdir, max_to_keep=2)
  for step in range(1_000_000):
    ckpt.save(step, {"x": jnp.full((8 * 2**20,), step, jnp.float32)}, {"step": step})


def test_sigkill_during_a_real_save_leaves_previous_step(tmp_path):
  """Kill the writer while a step's tmp directory exists: that step is never seen, the previous
  committed step restores intact, and the tmp directory is swept on the next open."""
  for attempt in range(3):
    workdir = tmp_path / str(attempt)
    proc = subprocess.Popen([sys.executable, str(THIS_FILE), str(workdir), "0", "--big-saves"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(THIS_FILE.parents[1])))
    deadline = time.time() + 60
    caught = None
    while time.time() < deadline and proc.poll() is None:
      committed = [p for p in workdir.glob("[0-9]*") if p.name.isdigit()]
      tmps = list(workdir.glob(f"*{ckpt_lib._ORBAX_TMP_SUFFIX}*"))
      if committed and tmps:
        proc.send_signal(signal.SIGKILL)
        caught = tmps
        break
      time.sleep(0.002)
    proc.kill()
    proc.wait(timeout=30)
    if caught and any(t.exists() for t in caught):
      break
  else:
    raise AssertionError("never caught a save in flight")
  left_over = [t for t in caught if t.exists()]
  in_flight = int(left_over[0].name.split(".")[0])
  ckpt = Checkpointer(workdir)
  latest = ckpt.latest_step()
  assert latest is not None and latest < in_flight
  state, meta = ckpt.restore(target={"x": jax.ShapeDtypeStruct((8 * 2**20,), jnp.float32)})
  ckpt.close()
  assert meta == {"step": latest}
  assert float(state["x"][0]) == latest and float(state["x"][-1]) == latest
  assert not any(t.exists() for t in left_over)


def multihost_toy(workdir, process_id: int, port: int, num_processes: int = 2):
  """One process of a loopback multi-host run: x ← x + 1 per step on an array sharded over all
  processes' devices, checkpoints every 5 steps; on a preemption agreed by all processes, a
  forced save of the same step everywhere, then a sharded restore that must match."""
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=num_processes, process_id=process_id)
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharding = NamedSharding(mesh, P("data"))
  n = 2 * jax.device_count()
  x = jax.jit(lambda: jnp.arange(n, dtype=jnp.float32), out_shardings=sharding)()
  add_one = jax.jit(lambda x: x + 1.0)
  ckpt = Checkpointer(workdir, max_to_keep=2)
  with PreemptionGuard() as guard:
    for step in range(100_000):
      x = add_one(x)
      if guard.should_stop(step):
        ckpt.save(step + 1, {"x": x}, {"step": step + 1}, force=True)
        print(f"process {process_id} stopped after step {step + 1}", flush=True)
        break
      if (step + 1) % 5 == 0:
        ckpt.save(step + 1, {"x": x}, {"step": step + 1})
      time.sleep(0.02)
  ckpt.close()
  ckpt = Checkpointer(workdir)
  state, meta = ckpt.restore(target={"x": jax.ShapeDtypeStruct((n,), jnp.float32,
                                                                 sharding=sharding)})
  ckpt.close()
  assert meta["step"] == step + 1
  for a, b in zip(state["x"].addressable_shards, x.addressable_shards):
    np.testing.assert_array_equal(a.data, b.data)
  print(f"process {process_id} restored step {meta['step']}", flush=True)


def test_multihost_sigterm_stops_every_process_at_one_step(tmp_path):
  """SIGTERM to one of two loopback processes: JAX's preemption service makes both stop, and
  save, at the same step; both exit 0; the checkpoint restores there and here."""
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=str(THIS_FILE.parents[1]))
  procs = [subprocess.Popen([sys.executable, str(THIS_FILE), str(tmp_path), "0",
                             "--multihost-process", str(i), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for i in range(2)]
  try:
    _wait_for_step(procs[0], tmp_path, 10, timeout=120)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=120) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  stops = [int(out.split("stopped after step")[1].split()[0]) for out, _ in outs]
  assert stops[0] == stops[1] > 10
  assert all(f"restored step {stops[0]}" in out for out, _ in outs)
  with Checkpointer(tmp_path) as ckpt:
    state, meta = ckpt.restore()
  assert meta == {"step": stops[0]}
  np.testing.assert_array_equal(state["x"], np.arange(state["x"].shape[0]) + stops[0])


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("workdir")
  parser.add_argument("total_steps", type=int)
  parser.add_argument("--sleep", type=float, default=0.0)
  parser.add_argument("--guard", action="store_true")
  parser.add_argument("--multihost-process", type=int, default=None)
  parser.add_argument("--port", type=int, default=None)
  parser.add_argument("--big-saves", action="store_true")
  a = parser.parse_args()
  if a.big_saves:
    big_saves(a.workdir)
  elif a.multihost_process is not None:
    multihost_toy(a.workdir, a.multihost_process, a.port)
  else:
    toy_train(a.workdir, a.total_steps, sleep=a.sleep, guard=a.guard)
