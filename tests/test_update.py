"""The batched per-step log-probs and the jitted update step (issue 4)."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flax import nnx

from egspo import config as config_lib
from egspo import train
from egspo.model import llada, lora
from egspo.rl import update as U
from egspo.tokenizer import CharTokenizer

B, P, G, T = 3, 5, 8, 4


@pytest.fixture(scope="module")
def model():
  return llada.init_model(llada.get_config("tiny", vocab=CharTokenizer()), seed=3)


def _record(seed=0):
  rng = np.random.default_rng(seed)
  prompt = jnp.asarray(rng.integers(10, 90, (B, P)), jnp.int32)
  pmask = jnp.ones((B, P), bool).at[0, :2].set(False)  # a left-padded row
  tokens = jnp.asarray(rng.integers(10, 90, (B, G)), jnp.int32)
  # Two tokens per step, in a random order of positions.
  commit = jnp.asarray(np.stack([rng.permutation(np.repeat(np.arange(T), 2)) for _ in range(B)]),
                       jnp.int32)
  return prompt, pmask, tokens, commit


def test_step_logprobs_equal_one_state_at_a_time(model):
  prompt, pmask, tokens, commit = _record()
  steps = jnp.array([[0, 3], [1, 2], [3, 0]])
  mask_id = model.cfg.mask_token_id
  got = np.asarray(U.step_logprobs(model, prompt, pmask, tokens, commit, steps,
                                   mask_token_id=mask_id, max_commit=2))
  want = np.zeros(steps.shape)
  for b in range(B):
    for k in range(steps.shape[1]):
      t = int(steps[b, k])
      comp = jnp.where(commit[b] < t, tokens[b], mask_id)  # the state x_t
      ids = jnp.concatenate([prompt[b], comp])[None]
      am = jnp.concatenate([pmask[b], jnp.ones(G, bool)])[None]
      if b == 0:  # alone, without its padding: must give the same numbers
        ids, am = ids[:, 2:], am[:, 2:]
      logp = jax.nn.log_softmax(model(ids, am)[0, -G:])
      want[b, k] = sum(float(logp[i, tokens[b, i]]) for i in range(G) if int(commit[b, i]) == t)
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_committed_positions_pads_short_steps():
  commit = jnp.array([[0, 1, 1, 2]])
  idx, valid = U.committed_positions(commit, jnp.array([[1, 0, 3]]), max_commit=2)
  np.testing.assert_array_equal(np.asarray(idx)[0, 0], [1, 2])
  np.testing.assert_array_equal(np.asarray(valid), [[[True, True], [True, False],
                                                     [False, False]]])


def _toy_loss(model, mb, key):
  del key
  logits = model(mb["ids"])
  logp = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(logp, mb["ids"][..., None], -1)[..., 0]
  return jnp.sum(nll), jnp.float32(nll.size), {"nll": jnp.mean(nll)}


def test_update_accumulation_matches_full_batch(model):
  """Two micro-batches of 2 give the same step as one batch of 4."""
  policy, params, frozen = U.split_policy(model)
  tx = optax.sgd(0.1)
  ids = jnp.asarray(np.random.default_rng(0).integers(10, 90, (4, 6)), jnp.int32)
  outs = []
  for a in (1, 2):
    state = U.TrainState(step=jnp.zeros((), jnp.int32), params=jax.tree.map(jnp.copy, params),
                         opt_state=tx.init(params))
    step = U.make_update_step(policy, tx, _toy_loss)
    new, m = step(state, frozen, {"ids": ids.reshape(a, 4 // a, 6)}, jax.random.key(0))
    outs.append((new, m))
  chex.assert_trees_all_close(outs[0][0].params, outs[1][0].params, atol=1e-6)
  assert float(outs[0][1]["loss"]) == pytest.approx(float(outs[1][1]["loss"]), rel=1e-6)
  assert int(outs[0][0].step) == 1


def test_non_finite_loss_keeps_the_old_state(model):
  policy, params, frozen = U.split_policy(model)
  tx = optax.adam(1e-2)
  state = U.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  before = jax.tree.map(np.asarray, state)

  def nan_loss(model, mb, key):
    s, d, m = _toy_loss(model, mb, key)
    return s * jnp.nan, d, m

  step = U.make_update_step(policy, tx, nan_loss)
  new, m = step(state, frozen, {"ids": jnp.ones((1, 2, 6), jnp.int32) * 20}, jax.random.key(0))
  assert float(m["update_ok"]) == 0.0
  assert int(new.step) == 0
  chex.assert_trees_all_equal(before, new)


def _lora_policy(model, dropout=0.0, b_scale=0.0):
  m = nnx.clone(model)
  lora.apply_lora(m, rank=4, alpha=8.0, targets="all_linear", rngs=nnx.Rngs(0), dropout=dropout)
  for x in lora.lora_modules(m).values():
    x.lora_b.set_value(jnp.full_like(x.lora_b[...], b_scale))
  return U.split_policy(m, "lora")


def _new_state(tx, params):
  return U.TrainState(step=jnp.zeros((), jnp.int32), params=jax.tree.map(jnp.copy, params),
                      opt_state=tx.init(params))


IDS = jnp.asarray(np.random.default_rng(0).integers(10, 90, (1, 4, 6)), jnp.int32)


def test_reference_is_the_policy_rl_starts_from_with_lora(model):
  """LoRA with an SFT stage: π_ref is base + the SFT-trained adapters (the policy RL starts
  from, not the pre-SFT base); only the adapters are copied (the frozen base is shared), and the
  copy outlives the donated RL train state."""
  policy, params, frozen = _lora_policy(model)
  tx = optax.adam(1e-2)
  step = U.make_update_step(policy, tx, _toy_loss)
  state = _new_state(tx, params)
  for i in range(3):  # "SFT" of the adapters
    state, m = step(state, frozen, {"ids": IDS}, jax.random.key(i))
    assert float(m["update_ok"]) == 1.0
  init_params = state.params  # what sft_stage hands to rl_stage
  ref = U.reference_params(init_params)
  assert {p[-1] for p, _ in nnx.to_flat_state(ref)} == {"lora_a", "lora_b"}  # adapters only
  chex.assert_trees_all_equal(ref, init_params)
  start = np.asarray(policy.model(init_params, frozen)(IDS[0]))
  base = np.asarray(model(IDS[0]))
  assert np.abs(start - base).max() > 1e-3  # SFT moved the policy
  np.testing.assert_array_equal(policy.model(ref, frozen)(IDS[0]), start)
  rl_state = U.TrainState(step=jnp.zeros((), jnp.int32), params=init_params,
                          opt_state=tx.init(init_params))
  step(rl_state, frozen, {"ids": IDS}, jax.random.key(9))  # donates init_params' buffers
  np.testing.assert_array_equal(policy.model(ref, frozen)(IDS[0]), start)
  full = {"a": jnp.ones((2, 2))}  # full fine-tuning: a copy of every parameter
  assert U.reference_params(full)["a"] is not full["a"]
  chex.assert_trees_all_equal(U.reference_params(full), full)


def test_lora_dropout_in_the_update_step_is_keyed(model):
  """Dropout in the training forward only, its masks from the micro-batch's update key:
  fold_in(fold_in(key, a), LORA_DROPOUT_KEY). Same key, same step (resume); π_old/π_ref/rollout
  forwards (the model without keys) are deterministic."""
  policy, params, frozen = _lora_policy(model, dropout=0.5, b_scale=0.05)
  tx = optax.sgd(0.1)
  step = U.make_update_step(policy, tx, _toy_loss)
  k0, k1 = jax.random.key(0), jax.random.key(1)
  a, ma = step(_new_state(tx, params), frozen, {"ids": IDS}, k0)
  b, _ = step(_new_state(tx, params), frozen, {"ids": IDS}, k0)
  _, mc = step(_new_state(tx, params), frozen, {"ids": IDS}, k1)
  chex.assert_trees_all_equal(a.params, b.params)
  assert float(ma["loss"]) != float(mc["loss"])
  det = policy.model(params, frozen)
  loss_sum, denom, _ = _toy_loss(det, {"ids": IDS[0]}, None)
  assert abs(float(ma["loss"]) - float(loss_sum / denom)) > 1e-4
  lora.enable_dropout(det, jax.random.fold_in(jax.random.fold_in(k0, 0), U.LORA_DROPOUT_KEY))
  loss_sum, denom, _ = _toy_loss(det, {"ids": IDS[0]}, None)
  assert float(ma["loss"]) == pytest.approx(float(loss_sum / denom), rel=1e-5)


def test_optimizer_clips_and_skips_decay_on_norms():
  tx = U.make_optimizer(1.0, weight_decay=0.5, max_grad_norm=1.0)
  params = {"w": jnp.ones((2, 2)), "norm": jnp.ones((2,))}
  st = tx.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  upd, _ = tx.update(zero, st, params)
  # Zero gradient: only decoupled weight decay moves w (by lr·wd·w); the 1-D norm weight is not decayed.
  np.testing.assert_allclose(np.asarray(upd["w"]), -0.5 * np.ones((2, 2)), atol=1e-6)
  np.testing.assert_allclose(np.asarray(upd["norm"]), 0.0, atol=1e-7)
  with pytest.raises(ValueError, match="schedule must be"):
    U.make_optimizer(1.0, schedule="bogus")


def test_schedules_by_hand():
  wsd = U.make_schedule(2.0, warmup_steps=10, total_steps=100, schedule="wsd", decay_steps=40,
                        final_lr_fraction=0.1)
  # warm-up 0 → 2 over 10 steps; stable to step 60; linear 2 → 0.2 over 60..100; then held.
  for step, want in [(0, 0.0), (5, 1.0), (10, 2.0), (59, 2.0), (60, 2.0), (80, 1.1), (100, 0.2),
                     (10_000, 0.2)]:
    assert float(wsd(step)) == pytest.approx(want, rel=1e-6), step
  cos = U.make_schedule(1.0, warmup_steps=0, total_steps=100, schedule="cosine",
                        final_lr_fraction=0.5)
  # one warm-up step (optax's minimum), then cosine from 1 to 0.5 over steps 1..100
  assert float(cos(50)) == pytest.approx(0.5 + 0.25 * (1 + math.cos(math.pi * 49 / 99)), rel=1e-5)
  assert float(cos(1000)) == pytest.approx(0.5)
  const = U.make_schedule(3.0, warmup_steps=4)
  assert [float(const(s)) for s in (0, 2, 4, 99)] == pytest.approx([0.0, 1.5, 3.0, 3.0])
  with pytest.raises(ValueError, match="decay_steps"):
    U.make_schedule(1.0, total_steps=100, schedule="wsd", decay_steps=0)


def _applied_rates(tx, n: int) -> list[float]:
  """The learning rate of each of `n` optimizer steps: with zero gradients AdamW's update is its
  decoupled weight decay alone, −lr·wd·w (w = 1)."""
  params = {"w": jnp.ones((2, 2))}
  zero, st, rates = {"w": jnp.zeros((2, 2))}, tx.init(params), []
  for _ in range(n):
    upd, st = tx.update(zero, st, params)
    rates.append(-float(upd["w"][0, 0]))
  return rates


def test_rl_schedule_counts_optimizer_steps():
  """The tiny EGSPO-SA config (per_step, K = 4): 5 iterations are 20 optimizer steps; warm-up 4
  steps, then cosine to 0 at step 20. The rate after n iterations is the schedule at 4n."""
  c = config_lib.base_config("countdown", "tiny")
  c.train.num_iterations, c.optim.warmup_steps, c.optim.schedule = 5, 4, "cosine"
  c.optim.learning_rate = 1e-3
  config_lib.validate(c)
  assert train.rl_optimizer_steps(c) == 20
  wd = c.optim.weight_decay
  rates = np.asarray(_applied_rates(train.rl_optimizer(c), 20)) / wd
  peak = 1e-3
  want = {2: 0.5 * peak, 4: peak,  # mid warm-up; after iteration 1
          12: peak * 0.5 * (1 + math.cos(math.pi * 8 / 16)),  # after iteration 3: half-way
          19: peak * 0.5 * (1 + math.cos(math.pi * 15 / 16))}  # the last step
  for n, lr in want.items():
    assert rates[n] == pytest.approx(lr, rel=1e-4), n
  # Steps per iteration by method and update schedule.
  c.train.update_schedule = "joint"
  assert train.rl_optimizer_steps(c) == 5
  c.train.update_schedule, c.train.columns_per_update = "reference", 2
  assert train.rl_optimizer_steps(c) == 10
  c.algorithm, c.diffu_grpo.num_iterations = "diffu_grpo", 3
  assert train.rl_optimizer_steps(c) == 15


# ----------------------------------------------------------------------------------------------
# The non-finite guard.


def test_all_finite_cases():
  f = jax.jit(U.all_finite)
  good = {"a": jnp.ones(3), "i": jnp.arange(3), "k": jax.random.key(0), "h": jnp.ones(2, jnp.bfloat16)}
  assert bool(f(good))
  assert not bool(f({**good, "a": jnp.array([1.0, jnp.nan, 2.0])}))
  assert not bool(f({**good, "h": jnp.array([jnp.inf, 0], jnp.bfloat16)}))
  assert not bool(f({**good, "a": jnp.array([-jnp.inf])}))
  assert bool(f({"i": jnp.array([2**31 - 1])}))  # integers are never non-finite
  assert bool(f({}))


def test_select_if_finite_refuses_a_nan_update():
  tx = optax.adamw(0.1)
  params = {"w": jnp.array([1.0, -2.0])}

  @jax.jit
  def step(params, opt, key, scale):
    new_key, sub = jax.random.split(key)
    loss, grads = jax.value_and_grad(lambda p: jnp.sum(p["w"] ** 2) * scale)(params)
    updates, new_opt = tx.update(grads, opt, params)
    ok = U.all_finite((loss, grads))
    new = (optax.apply_updates(params, updates), new_opt, new_key)
    return U.select_if_finite(ok, new, (params, opt, key)), ok

  state = (params, tx.init(params), jax.random.key(1))
  (bad_state, ok) = step(*state, jnp.float32(jnp.nan))
  assert not bool(ok)
  for got, want in zip(jax.tree.leaves(bad_state), jax.tree.leaves(state)):  # all kept:
    if jnp.issubdtype(got.dtype, jax.dtypes.prng_key):  # params, moments, count and key
      got, want = jax.random.key_data(got), jax.random.key_data(want)
    np.testing.assert_array_equal(got, want)
  (good_state, ok) = step(*state, jnp.float32(1.0))
  assert bool(ok)
  # One AdamW step moves each weight by lr·sign(g) (bias-corrected first step) plus decay.
  np.testing.assert_allclose(good_state[0]["w"], [1.0 - 0.1 - 0.1 * 1e-4 * 1.0,
                                                   -2.0 + 0.1 + 0.1 * 1e-4 * 2.0], rtol=1e-5)
  assert int(good_state[1][0].count) == 1
  with np.testing.assert_raises(ValueError):
    U.select_if_finite(jnp.array([True, False]), params, params)


def test_refused_updates_stop_after_the_limit_in_a_row():
  refused = U.RefusedUpdates(3, "RL", "optim.learning_rate")
  for ok in (False, False, True, False, False):  # an accepted update resets the count
    refused.record(ok, "iteration 1")
  assert refused.in_a_row == 2 and refused.total == 4
  with np.testing.assert_raises(U.NonFiniteError) as cm:
    refused.record(False, "iteration 7 (update 2/4)")
  msg = str(cm.exception)
  assert msg.startswith("RL stopped at iteration 7 (update 2/4): 3 updates in a row were refused")
  assert "optim.learning_rate" in msg and "train.max_refused_updates=3" in msg
  assert len(msg.splitlines()) == 1
  with np.testing.assert_raises(ValueError):
    U.RefusedUpdates(0, "SFT", "sft.learning_rate")
