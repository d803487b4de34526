"""Exact π_old for cached rollouts and truncated importance weights (egspo/rl/tis.py, issue 15 §2).

With the cache off the full-forward π_old and x̂0 of the selected states are the rollout's own
record, and the plan takes neither the extra forward nor a weight; with `dual` on a 2-layer
model they differ from μ's record and equal a by-hand full forward of each state; the weight
min(π_old/μ, C) and the weighted loss are checked by hand; a micro RL run with `dual` logs the
TIS metrics and its first update's ratio is 1 (π_θ = π_old exactly, which μ is not).
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from egspo import config as config_lib
from egspo import train
from egspo.diffusion import rollout as rollout_lib
from egspo.diffusion import sampler
from egspo.model import llada
from egspo.rl import advantages as adv_lib
from egspo.rl import algorithms as algo_lib
from egspo.rl import losses as loss_lib
from egspo.rl import registry
from egspo.rl import tis as tis_lib
from egspo.rl import update as update_lib
from egspo.rl import value as value_lib
from egspo.tokenizer import CharTokenizer

# 4 prompts (2 groups of 2), left-padded to P = 6; 2 blocks of 8, 3 steps per block (3, 3, 2).
PROMPTS = [[20, 21, 22, 23, 24, 25], [20, 21, 22, 23, 24, 25], [40, 41, 42], [40, 41, 42]]
P, GEN, BLOCK, STEPS, GROUP = 6, 16, 8, 6, 2
B = len(PROMPTS)
ALL_STEPS = np.broadcast_to(np.arange(STEPS, dtype=np.int32), (B, STEPS))


@pytest.fixture(scope="module")
def model():
  """The tiny preset with 2 layers, random weights with peaked distributions (a scaled head)."""
  m = llada.init_model(llada.get_config("tiny", vocab=CharTokenizer(), n_layers=2), 3)
  m.ff_out.kernel[...] = m.ff_out.kernel[...] * 8.0
  return m


def _sampler_config(model, cache):
  return sampler.SamplerConfig(gen_length=GEN, steps=STEPS, block_length=BLOCK,
                               mask_token_id=model.cfg.mask_token_id, temperature=0.7,
                               cache=cache)


def _rollout(model, cache):
  ids = np.full((B, P), model.cfg.pad_token_id, np.int32)
  for i, p in enumerate(PROMPTS):
    ids[i, P - len(p):] = p
  return sampler.generate_with_model(model, ids, ids != model.cfg.pad_token_id,
                                     jax.random.key(4), _sampler_config(model, cache))


def _states(ro, steps):
  return dict(prompt_ids=ro.prompt_ids, prompt_mask=ro.prompt_mask, tokens=ro.tokens,
              commit_step=ro.commit_step, steps=jnp.asarray(steps))


def _old_pass(model, ro, steps, with_x0_hat=True):
  policy, params, frozen = update_lib.split_policy(model)
  fn = tis_lib.old_step_pass(policy, 2, mask_token_id=model.cfg.mask_token_id,
                             max_commit=int(sampler.commit_schedule(
                                 _sampler_config(model, "none")).max()),
                             with_x0_hat=with_x0_hat)
  return jax.tree.map(np.asarray, fn(params, frozen, _states(ro, steps)))


def _mu(ro, steps):
  return np.asarray(loss_lib.gather_step_logprobs(ro.logprob, ro.commit_step, jnp.asarray(steps)))


def _by_hand(model, ro, steps):
  """Each state x_t through the model's own full forward, one at a time: (Σ over the tokens
  committed at t of log softmax[token] [B, K], x̂0 [B, K, G])."""
  mask_id = model.cfg.mask_token_id
  ids, attn = rollout_lib.canvas_at(ro, jnp.asarray(steps), mask_id)
  logp, x0 = np.zeros(steps.shape, np.float32), np.zeros(steps.shape + (GEN,), np.int32)
  tokens, commit = np.asarray(ro.tokens), np.asarray(ro.commit_step)
  for b in range(B):
    for k in range(steps.shape[1]):
      logits = np.array(model(ids[b, k][None], attn[b, k][None]), np.float32)[0, P:]
      lsm = np.asarray(jax.nn.log_softmax(jnp.asarray(logits)))
      act = commit[b] == steps[b, k]
      logp[b, k] = lsm[act, tokens[b, act]].sum()
      logits[:, mask_id] = -np.inf
      comp = np.asarray(ids[b, k, P:])
      x0[b, k] = np.where(comp == mask_id, logits.argmax(-1), comp)
  return logp, x0


def test_cache_off_old_pass_equals_the_rollouts_record(model):
  """Without a cache μ = π_old: the full-forward pass gives the recorded log-probs (to f32
  rounding: other batch shapes) and the recorded x̂0 exactly."""
  ro = _rollout(model, "none")
  logp, x0 = _old_pass(model, ro, ALL_STEPS)
  np.testing.assert_allclose(logp, _mu(ro, ALL_STEPS), atol=2e-5, rtol=1e-5)
  np.testing.assert_array_equal(
      x0, np.asarray(value_lib.one_step_guesses(ro.x0_hat, jnp.asarray(ALL_STEPS))))


def test_dual_cache_old_pass_is_the_full_forward_not_mu(model):
  """`dual` with 3 steps per block: π_old and x̂0 of every state equal the model's full forward
  of that state, one by one; they equal μ's record at block starts (a full forward there) and
  differ from it elsewhere."""
  ro = _rollout(model, "dual")
  logp, x0 = _old_pass(model, ro, ALL_STEPS)
  want_logp, want_x0 = _by_hand(model, ro, ALL_STEPS)
  np.testing.assert_allclose(logp, want_logp, atol=2e-5, rtol=1e-5)
  np.testing.assert_array_equal(x0, want_x0)
  mu = _mu(ro, ALL_STEPS)
  starts = ALL_STEPS % (STEPS // (GEN // BLOCK)) == 0
  np.testing.assert_allclose(logp[starts], mu[starts], atol=2e-5, rtol=1e-5)
  assert np.abs(logp - mu)[~starts].max() > 1e-3
  # Without x̂0 the pass returns the same log-probs alone.
  np.testing.assert_array_equal(_old_pass(model, ro, ALL_STEPS, with_x0_hat=False), logp)


def test_truncated_weights_by_hand():
  logp_old = jnp.array([[-1.0, -2.0, -0.5], [-3.0, -0.1, -4.0]])
  logp_mu = jnp.array([[-1.5, -1.0, -0.5], [-0.2, -2.0, -4.5]])
  valid = jnp.array([[True, True, True], [True, True, False]])
  w, m = tis_lib.truncated_weights(logp_old, logp_mu, 2.0, valid)
  # Ratios e^0.5, e^-1, 1, e^-2.8, e^1.9 (> 2: capped); the invalid slot gets weight 1.
  want = np.array([[math.exp(0.5), math.exp(-1.0), 1.0], [math.exp(-2.8), 2.0, 1.0]])
  np.testing.assert_allclose(np.asarray(w), want, rtol=1e-6)
  assert float(m["tis/logp_gap"]) == pytest.approx((0.5 + 1.0 + 0.0 + 2.8 + 1.9) / 5, rel=1e-6)
  assert float(m["tis/capped_frac"]) == pytest.approx(1 / 5)
  assert float(m["tis/weight_mean"]) == pytest.approx(want[valid].mean(), rel=1e-6)
  # A huge gap is capped, not inf/NaN; the weight carries no gradient.
  w, _ = tis_lib.truncated_weights(jnp.array([[0.0]]), jnp.array([[-500.0]]), 3.0)
  assert float(w[0, 0]) == 3.0
  g = jax.grad(lambda a: tis_lib.truncated_weights(a, logp_mu, 2.0)[0].sum())(logp_old)
  np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_weighted_step_loss_by_hand():
  """The weight multiplies each step's clipped surrogate, not its KL term; None = today's loss."""
  logp = jnp.array([[-1.0, -0.7], [-2.0, -0.3]])
  old = jnp.array([[-1.2, -0.5], [-1.5, -0.3]])
  ref = jnp.array([[-1.1, -0.6], [-1.0, -0.4]])
  adv = jnp.array([[1.0, -0.5], [0.7, 2.0]])
  valid = jnp.array([[True, True], [True, False]])
  w = jnp.array([[1.5, 0.25], [2.0, 9.0]])
  eps, eps_high, beta, scale = 0.2, 0.5, 0.04, 0.5
  got, denom, _ = loss_lib.egspo_step_loss(logp, old, adv, valid, ref, epsilon=eps,
                                           epsilon_high=eps_high, beta=beta, loss_scale=scale,
                                           tis_weight=w)
  want = 0.0
  for i, j in [(0, 0), (0, 1), (1, 0)]:
    lp, r, a = float(logp[i, j]), math.exp(float(logp[i, j] - old[i, j])), float(adv[i, j])
    surrogate = -min(r * a, min(max(r, 1 - eps), 1 + eps_high) * a)
    d = float(ref[i, j]) - lp
    want += float(w[i, j]) * surrogate + beta * (math.exp(d) - d - 1)
  assert float(denom) == 3.0
  assert float(got) == pytest.approx(want * scale, rel=1e-5)
  plain = loss_lib.egspo_step_loss(logp, old, adv, valid, ref, loss_scale=scale)
  unit = loss_lib.egspo_step_loss(logp, old, adv, valid, ref, loss_scale=scale,
                                  tis_weight=jnp.ones_like(w))
  assert float(plain[0]) == pytest.approx(float(unit[0]), rel=1e-7)
  g = jax.grad(lambda x: loss_lib.egspo_step_loss(logp, old, adv, valid, ref,
                                                  tis_weight=x)[0])(w)
  np.testing.assert_array_equal(np.asarray(g), 0.0)  # a constant


# ---------------------------------------------------------------------------------------------
# EGSPO's plan


def _decode(ids):
  return [" ".join(str(int(x)) for x in row) for row in np.asarray(ids)]


def _reward(texts, examples):
  """Fraction of even ids (the 'task reward')."""
  del examples
  return np.array([np.mean([int(x) % 2 == 0 for x in t.split()]) for t in texts], np.float32)


def _plan(model, ro, cache, **over):
  c = config_lib.base_config("copy", "tiny")
  c.algorithm = "egspo_sa"
  c.batch.num_prompts, c.batch.group_size, c.batch.micro_batch_size = B // GROUP, GROUP, 2
  c.rollout.gen_length, c.rollout.block_length, c.rollout.steps = GEN, BLOCK, STEPS
  c.rollout.cache = cache
  c.egspo.num_selected_steps = 3
  c.train.update_schedule = "joint"  # one batch holding every column
  for k, v in over.items():
    sec, field = k.split(".")
    c[sec][field] = v
  config_lib.validate(c)
  policy, params, frozen = update_lib.split_policy(model)
  ctx = registry.Context(config=c, policy=policy, ref_params=params,
                         mask_token_id=model.cfg.mask_token_id,
                         max_commit=int(sampler.commit_schedule(
                             _sampler_config(model, cache)).max()),
                         reward_fn=_reward, decode_fn=_decode)
  algo = registry.get_algorithm("egspo_sa")(ctx)
  rewards = _reward(_decode(ro.tokens), None)
  it = registry.Iteration(ro, rewards, [{"i": i // GROUP} for i in range(B)], jax.random.key(0))
  (batch,), metrics = algo.plan(params, frozen, it)
  full = jax.tree.map(lambda x: np.asarray(x).reshape((-1,) + x.shape[2:]), batch)
  return algo, full, metrics, rewards


def _values(x0, valid):
  """The one-step values of guesses [B, K, G] at the valid slots (0 elsewhere)."""
  v = _reward(_decode(x0.reshape(-1, GEN)), None).reshape(x0.shape[:2])
  return np.where(valid, v, 0.0)


def test_plan_with_cache_off_is_todays(model, monkeypatch):
  """cache='none': no full forward is built, π_old is the record itself (bit for bit), the
  values use the recorded x̂0, and the batch holds no weight; tis_cap changes nothing."""
  monkeypatch.setattr(tis_lib, "old_step_pass", lambda *a, **k: pytest.fail("extra forward"))
  ro = _rollout(model, "none")
  algo, full, metrics, rewards = _plan(model, ro, "none")
  assert algo._old_pass is None  # pylint: disable=protected-access
  assert set(full) == {"prompt_ids", "prompt_mask", "tokens", "commit_step", "steps", "valid",
                       "adv", "logp_old", "logp_ref"}
  assert not any(k.startswith("tis/") for k in metrics)
  np.testing.assert_array_equal(full["logp_old"], _mu(ro, full["steps"]))
  guesses = np.asarray(value_lib.one_step_guesses(ro.x0_hat, jnp.asarray(full["steps"])))
  want = adv_lib.stepwise_advantages(jnp.asarray(rewards),
                                     jnp.asarray(_values(guesses, full["valid"])), GROUP, 0.5,
                                     valid=jnp.asarray(full["valid"]))
  np.testing.assert_array_equal(full["adv"], np.asarray(want, np.float32))
  _, other, _, _ = _plan(model, ro, "none", **{"rollout.tis_cap": 5.0})
  for k in full:
    np.testing.assert_array_equal(other[k], full[k], err_msg=k)


def test_plan_with_dual_cache_uses_exact_old_and_weights(model):
  """cache='dual': π_old and the values' x̂0 from the full forward (= by hand), the weight
  min(π_old/μ, C) in the batch and the TIS metrics logged."""
  ro = _rollout(model, "dual")
  _, full, metrics, rewards = _plan(model, ro, "dual", **{"rollout.tis_cap": 1.5})
  steps, valid = full["steps"], full["valid"]
  want_logp, want_x0 = _by_hand(model, ro, steps)
  np.testing.assert_allclose(full["logp_old"], want_logp, atol=2e-5, rtol=1e-5)
  mu = _mu(ro, steps)
  np.testing.assert_allclose(full["tis_weight"],
                             np.where(valid, np.minimum(np.exp(full["logp_old"] - mu), 1.5), 1.0),
                             rtol=1e-6)
  gap = np.abs(full["logp_old"] - mu)[valid]
  assert metrics["tis/logp_gap"] == pytest.approx(gap.mean(), rel=1e-5, abs=1e-7)
  assert metrics["tis/capped_frac"] == pytest.approx(
      (np.exp(full["logp_old"] - mu) > 1.5)[valid].mean())
  want = adv_lib.stepwise_advantages(jnp.asarray(rewards), jnp.asarray(_values(want_x0, valid)),
                                     GROUP, 0.5, valid=jnp.asarray(valid))
  np.testing.assert_allclose(full["adv"], np.asarray(want), atol=1e-6)
  # The weight is the sampled action's (the committed tokens), whatever the loss's target; the
  # per-step schedule hands column j its own weights.
  _, final, _, _ = _plan(model, ro, "dual", **{"rollout.tis_cap": 1.5,
                                                "egspo.pred_state": "final"})
  np.testing.assert_array_equal(final["tis_weight"], full["tis_weight"])
  assert not np.allclose(final["logp_old"], full["logp_old"])
  cols = [algo_lib.columns_batch(full, [j])["tis_weight"] for j in range(steps.shape[1])]
  np.testing.assert_array_equal(np.concatenate(cols, 1), full["tis_weight"])


# ---------------------------------------------------------------------------------------------
# End to end


def test_micro_rl_run_with_dual_cache_logs_tis_metrics(tmp_path):
  """One RL iteration of the micro pipeline with `dual` (4 steps per block): the TIS metrics are
  logged, and the one joint update starts at ratio π_θ/π_old = 1 (exact π_old), no clipping."""
  from test_train import micro_config  # pylint: disable=import-outside-toplevel
  c = micro_config(**{"rollout.cache": "dual", "sft.steps": 0, "train.num_iterations": 1,
                      "train.update_schedule": "joint"})
  train.run(c, tmp_path)
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  (row,) = [r for r in rows if "rl/loss" in r]
  assert row["rl/tis/logp_gap"] > 0.0 and math.isfinite(row["rl/tis/logp_gap"])
  assert 0.0 <= row["rl/tis/capped_frac"] <= 1.0
  assert 0.0 < row["rl/tis/weight_mean"] <= c.rollout.tis_cap
  assert row["rl/ratio/mean"] == pytest.approx(1.0, abs=1e-5)
  assert row["rl/clip/frac"] == 0.0
