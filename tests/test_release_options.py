"""The released EGSPO trainer's options as config fields (issue 14 §8), through EGSPO's `plan` and
`loss`: each field's default keeps the project's behaviour, each release value does what the
release does (hand-computed or against the tested pure function it follows)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from egspo import config as config_lib
from egspo import trainer as trainer_lib
from egspo.diffusion.rollout import Rollout
from egspo.model import llada
from egspo.rl import advantages as adv_lib
from egspo.rl import registry
from egspo.rl import selection as sel_lib
from egspo.rl import step_variants as sv
from egspo.rl import update as U
from egspo.tokenizer import CharTokenizer

NP, GS, P, G, T, K, MICRO = 2, 4, 5, 8, 4, 2, 4  # 8 rows, 4 steps of 2 tokens, K = 2
B = NP * GS
EOS = 1


@pytest.fixture(scope="module")
def split():
  model = llada.init_model(llada.get_config("tiny", vocab=CharTokenizer(), n_layers=1), seed=3)
  return U.split_policy(model)


def _config(**over):
  c = config_lib.base_config("copy", "tiny")
  c.algorithm = "egspo_sa"
  c.batch.num_prompts, c.batch.group_size, c.batch.micro_batch_size = NP, GS, MICRO
  c.rollout.gen_length, c.rollout.block_length, c.rollout.steps = G, G, T
  c.egspo.num_selected_steps = K
  c.train.update_schedule = "joint"  # one batch holding every column: easy to read back
  for k, v in over.items():
    sec, field = k.split(".")
    with c[sec].ignore_type():  # bad types too: the validation must name them
      c[sec][field] = v
  config_lib.validate(c)
  return c


def _decode(ids):
  return [" ".join(str(int(x)) for x in row) for row in np.asarray(ids)]


def _reward(texts, examples):
  """Fraction of even ids (the 'task reward')."""
  del examples
  return np.array([np.mean([int(x) % 2 == 0 for x in t.split()]) for t in texts], np.float32)


def _correct(texts, examples):
  """A different 'correctness term': 1 if the first id is below 50."""
  del examples
  return np.array([float(int(t.split()[0]) < 50) for t in texts], np.float32)


def _rollout(seed=0, eos_rows=()):
  rng = np.random.default_rng(seed)
  commit = np.stack([rng.permutation(np.repeat(np.arange(T), 2)) for _ in range(B)])
  tokens = rng.integers(10, 90, (B, G))
  for r in eos_rows:  # steps 2 and 3 of these rows commit only EOS
    tokens[r][commit[r] >= 2] = EOS
  ent = rng.uniform(0.1, 2.0, (B, G)).astype(np.float32)
  return Rollout(prompt_ids=jnp.asarray(rng.integers(10, 90, (B, P)), jnp.int32),
                 prompt_mask=jnp.ones((B, P), bool),
                 tokens=jnp.asarray(tokens, jnp.int32), commit_step=jnp.asarray(commit, jnp.int32),
                 logprob=jnp.asarray(-rng.uniform(0.1, 3.0, (B, G)), jnp.float32),
                 entropy=jnp.asarray(ent),
                 step_entropy=sel_lib.step_entropy(jnp.asarray(ent), jnp.asarray(commit), T),
                 x0_hat=jnp.asarray(rng.integers(10, 90, (B, T, G)), jnp.int32))


REWARDS = np.array([1.0, 0.0, 0.5, 0.25, 0.2, 0.2, 0.9, 0.1], np.float32)
EXAMPLES = [{"i": i // GS} for i in range(B)]


def _algo(split, ref_params=None, **over):
  policy, params, _ = split
  ctx = registry.Context(config=_config(**over), policy=policy,
                         ref_params=params if ref_params is None else ref_params,
                         mask_token_id=2, max_commit=2, reward_fn=_reward, decode_fn=_decode,
                         step_reward_fn=_correct)
  return registry.get_algorithm("egspo_sa")(ctx)


def _plan(algo, split, ro=None, step=0, seed=0):
  _, params, frozen = split
  it = registry.Iteration(ro or _rollout(seed), REWARDS, EXAMPLES, jax.random.key(seed), step=step)
  batches, metrics = algo.plan(params, frozen, it)
  assert len(batches) == 1
  full = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), batches[0])  # [B, ...]
  return batches, full, metrics


def _values(ro, steps, fn):
  guesses = np.asarray(ro.x0_hat)[np.arange(B)[:, None], np.asarray(steps)]  # [B, K, G]
  return fn(_decode(guesses.reshape(B * K, G)), None).reshape(B, K)


def test_defaults_keep_the_projects_behaviour():
  c = config_lib.base_config("countdown")
  assert (c.egspo.pred_state, c.egspo.terminate_at_last_non_eos,
          c.egspo.correctness_step_reward_only, c.egspo.dynamic_lambda1, c.egspo.random_replace,
          c.egspo.normalize_returns, c.egspo.baseline, c.loss.use_exact_kl,
          c.rollout.cfg_scale) == ("next", False, False, False, False, True, "returns", False, 0.0)
  assert (c.stabledrl.estimator, c.stabledrl.bound, c.stabledrl.iw_masks,
          c.stabledrl.normalize_over) == ("espo", "elbo", "common", "group")


@pytest.mark.parametrize("field, value", [
    ("egspo.pred_state", "prev"), ("egspo.terminate_at_last_non_eos", 1),
    ("egspo.correctness_step_reward_only", "yes"), ("egspo.dynamic_lambda1", None),
    ("egspo.lambda1_update_steps", 0), ("egspo.random_replace", 0.0),
    ("egspo.normalize_returns", "true"), ("egspo.baseline", "grpo"), ("loss.use_exact_kl", 1),
    ("rollout.cfg_scale", -0.5)])
def test_bad_values_name_the_field(field, value):
  with pytest.raises(config_lib.ConfigError, match=f"^bad config field {field}="):
    _config(**{field: value})


def test_advantage_options_follow_the_release(split):
  """normalize_returns, standard_grpo and correctness_step_reward_only: the plan's advantages
  equal `stepwise_advantages` on values scored by the right reward function."""
  ro = _rollout()
  for over, fn in [({}, _reward),
                   ({"egspo.normalize_returns": False}, _reward),
                   ({"egspo.baseline": "standard_grpo"}, _reward),
                   ({"egspo.correctness_step_reward_only": True}, _correct)]:
    _, full, _ = _plan(_algo(split, **over), split, ro)
    values = _values(ro, full["steps"], fn)
    want = adv_lib.stepwise_advantages(
        jnp.asarray(REWARDS), jnp.asarray(values), GS, 0.5,
        normalize_returns=over.get("egspo.normalize_returns", True),
        baseline=over.get("egspo.baseline", "returns"))
    np.testing.assert_allclose(np.asarray(full["adv"]), np.asarray(want), atol=1e-6,
                               err_msg=str(over))
  # The default and the correctness-only values really differ on this rollout.
  assert not np.allclose(_values(ro, full["steps"], _reward), _values(ro, full["steps"], _correct))


def test_halved_lambda_hand_computed():
  # Rollouts every 4 optimizer steps, halving every 1000 (the release's defaults): step 0 halves.
  assert adv_lib.halved_lambda(0.5, 0, 1000, 4) == 0.25
  assert adv_lib.halved_lambda(0.5, 996, 1000, 4) == 0.25
  assert adv_lib.halved_lambda(0.5, 1000, 1000, 4) == 0.125
  # Rollouts at 0, 3, 6, 9, 12, …: global_step % 4 == 0 only at 0 and 12 (lcm 12).
  assert [adv_lib.halved_lambda(1.0, s, 4, 3) for s in (0, 3, 6, 9, 12)] == [0.5] * 4 + [0.25]
  with pytest.raises(ValueError, match="must be >= 1"):
    adv_lib.halved_lambda(1.0, 0, 0, 3)


def test_dynamic_lambda1_uses_the_rollouts_optimizer_step(split):
  algo = _algo(split, **{"egspo.dynamic_lambda1": True, "egspo.lambda1_update_steps": 2})
  ro = _rollout()
  for step, lam in ((0, 0.25), (1, 0.25), (2, 0.125)):  # joint: 1 optimizer step per rollout
    _, full, metrics = _plan(algo, split, ro, step=step)
    assert metrics["lambda"] == lam
    want = adv_lib.stepwise_advantages(jnp.asarray(REWARDS),
                                       jnp.asarray(_values(ro, full["steps"], _reward)), GS, lam)
    np.testing.assert_allclose(np.asarray(full["adv"]), np.asarray(want), atol=1e-6)


def test_random_replace_draws_with_replacement(split):
  algo = _algo(split, **{"egspo.selection": "random", "egspo.random_replace": True,
                         "egspo.num_selected_steps": 2})
  for seed in range(3):
    _, full, _ = _plan(algo, split, seed=seed)
    want, _ = sel_lib.random_steps(jax.random.fold_in(jax.random.key(seed), 1), T, K, B,
                                   replace=True)
    np.testing.assert_array_equal(np.asarray(full["steps"]), np.asarray(want))


def test_terminate_at_last_non_eos_caps_every_row(split):
  ro = _rollout(eos_rows=(0, 5))  # rows 0 and 5: steps 2, 3 commit only EOS → last = 1
  for selection in ("entropy", "uniform", "random"):
    algo = _algo(split, **{"egspo.terminate_at_last_non_eos": True,
                           "egspo.selection": selection})
    _, full, _ = _plan(algo, split, ro)
    steps, valid = np.asarray(full["steps"]), np.asarray(full["valid"])
    for r in (0, 5):
      assert (steps[r][valid[r]] <= 1).all(), selection
    if selection == "uniform":  # linspace(0, last, 2): [0, 1] capped, [0, 3] elsewhere
      np.testing.assert_array_equal(steps[0], [0, 1])
      np.testing.assert_array_equal(steps[1], [0, T - 1])
  algo = _algo(split, **{"egspo.terminate_at_last_non_eos": False, "egspo.selection": "uniform"})
  np.testing.assert_array_equal(np.asarray(_plan(algo, split, ro)[1]["steps"])[0], [0, T - 1])


def test_pred_state_final_recomputes_pi_old_and_starts_at_ratio_one(split):
  policy, params, frozen = split
  algo = _algo(split, **{"egspo.pred_state": "final"})
  ro = _rollout(1)
  batches, full, _ = _plan(algo, split, ro, seed=1)
  model = policy.model(params, frozen)
  want = sv.step_forward(model, ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.commit_step,
                         full["steps"], mask_token_id=2, max_commit=2, pred_state="final")
  np.testing.assert_allclose(np.asarray(full["logp_old"]), np.asarray(want), atol=1e-5)
  _, _, m = algo.loss(model, jax.tree.map(lambda x: x[0], batches[0]), jax.random.key(0))
  assert float(m["ratio/mean"]) == pytest.approx(1.0, abs=1e-5)
  assert abs(float(m["kl"])) < 1e-6  # the reference is the same policy


def test_use_exact_kl_is_the_full_vocabulary_kl_to_the_reference(split):
  policy, params, frozen = split
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  ref = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                     for x, k in zip(leaves, keys)])
  algo = _algo(split, ref, **{"loss.use_exact_kl": True})
  ro = _rollout(2)
  batches, full, _ = _plan(algo, split, ro, seed=2)
  assert full["ref_vocab"].shape == (B, K, 2, llada.get_config(
      "tiny", vocab=CharTokenizer()).vocab_size)
  mb = jax.tree.map(lambda x: x[1], batches[0])
  model = policy.model(params, frozen)
  _, _, m = algo.loss(model, mb, jax.random.key(0))
  logp, vocab, valid = sv.step_forward(model, mb["prompt_ids"], mb["prompt_mask"], mb["tokens"],
                                       mb["commit_step"], mb["steps"], mask_token_id=2,
                                       max_commit=2, with_vocab=True)
  _, ref_vocab, _ = sv.step_forward(policy.model(ref, frozen), mb["prompt_ids"],
                                    mb["prompt_mask"], mb["tokens"], mb["commit_step"],
                                    mb["steps"], mask_token_id=2, max_commit=2, with_vocab=True)
  want = float(jnp.mean(sv.exact_step_kl(vocab, ref_vocab, valid)))
  assert want > 0 and float(m["kl"]) == pytest.approx(want, rel=1e-4)
  # The default (k3 of the step log-probs) gives another number on the same batch.
  default = _algo(split, ref)
  _, _, m3 = default.loss(model, {k: v for k, v in mb.items() if k != "ref_vocab"},
                          jax.random.key(0))
  assert float(m3["kl"]) != pytest.approx(want, rel=1e-3)


def test_cfg_scale_reaches_the_rollout_sampler_only():
  c = _config(**{"rollout.cfg_scale": 1.5})
  cfg = llada.get_config("tiny", vocab=CharTokenizer())
  assert trainer_lib.sampler_config(c, cfg, "rollout").cfg_scale == 1.5
  assert trainer_lib.sampler_config(c, cfg, "eval").cfg_scale == 0.0
  assert trainer_lib.sampler_config(_config(), cfg, "rollout").cfg_scale == 0.0
