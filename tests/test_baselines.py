"""The baselines as registered algorithms (issue 5): plan shapes, common random numbers (ratio 1
and KL 0 at the rollout parameters), loss == a direct slow computation, one update raises a
positive-advantage sample's likelihood, registry and config, end-to-end runs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from egspo import config as config_lib
from egspo.diffusion import masking
from egspo.diffusion import spg
from egspo.diffusion.rollout import Rollout
from egspo.model import llada
from egspo.rl import baselines
from egspo.rl import losses as loss_lib
from egspo.rl import registry
from egspo.rl import update as U
from egspo.tokenizer import CharTokenizer

METHODS = ("diffu_grpo", "espo", "gdpo", "stabledrl", "wd1")
NP, G, P, L, MICRO = 2, 4, 6, 8, 4  # 2 prompts × G=4 = 8 rows, 2 micro-batches of 4
B = NP * G


@pytest.fixture(scope="module")
def model():
  # One layer: the tests compile each method's plan and update step; depth only adds compile time.
  return llada.init_model(llada.get_config("tiny", vocab=CharTokenizer(), n_layers=1), seed=3)


@pytest.fixture(scope="module")
def split(model):
  return U.split_policy(model)


def _config(name, **over):
  c = config_lib.base_config("copy", "tiny")
  c.algorithm = name
  c.batch.num_prompts, c.batch.group_size, c.batch.micro_batch_size = NP, G, MICRO
  c.rollout.gen_length, c.rollout.block_length, c.rollout.steps = L, L, 4
  for sec in METHODS:
    c[sec].num_iterations = 2
  # Non-zero KL weights everywhere they exist, so the reference pass is exercised.
  c.gdpo.beta = 0.05
  c.espo.beta = 0.02
  for k, v in over.items():
    sec, field = k.split(".")
    c[sec][field] = v
  return c


def _rollout(seed=0, eos_id=1):
  rng = np.random.default_rng(seed)
  prompt = rng.integers(10, 90, (B, P))
  pmask = np.ones((B, P), bool)
  pmask[0, :2] = False  # a left-padded row
  tokens = rng.integers(10, 90, (B, L))
  tokens[1, 5:] = eos_id  # EOS then padding: diffu-GRPO's valid tokens stop after position 5
  tokens[2, 0] = eos_id
  z = np.zeros((B, L), np.float32)
  return Rollout(prompt_ids=jnp.asarray(prompt, jnp.int32), prompt_mask=jnp.asarray(pmask),
                 tokens=jnp.asarray(tokens, jnp.int32), commit_step=jnp.zeros((B, L), jnp.int32),
                 logprob=jnp.asarray(z), entropy=jnp.asarray(z), step_entropy=jnp.zeros((B, 4)),
                 x0_hat=jnp.zeros((B, 4, L), jnp.int32))


REWARDS = np.array([1.0, 0.0, 0.5, 0.0, 0.2, 0.2, 0.9, 0.1], np.float32)


def _algo(name, split, ref_params=None, **over):
  policy, params, frozen = split
  ctx = registry.Context(config=_config(name, **over), policy=policy,
                         ref_params=params if ref_params is None else ref_params,
                         mask_token_id=2, max_commit=1, reward_fn=None, decode_fn=None)
  return registry.get_algorithm(name)(ctx)


def _plan(algo, split, rewards=REWARDS, seed=0):
  _, params, frozen = split
  it = registry.Iteration(_rollout(seed), rewards, [None] * B, jax.random.key(seed))
  return algo.plan(params, frozen, it)


_ALGOS = {}


def _shared_algo(name, split, ref_params):
  """One algorithm instance per method for the whole module, so its jitted no-grad pass compiles
  once; `ctx.ref_params` is read at plan time and may be swapped."""
  if name not in _ALGOS:
    _ALGOS[name] = _algo(name, split)
  algo = _ALGOS[name]
  algo.ctx.ref_params = ref_params
  return algo


def _perturbed(params, scale=0.05, seed=9):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                      for x, k in zip(leaves, keys)])


def _micro(batch, a):
  return jax.tree.map(lambda x: x[a], batch)


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_registry_and_config(name):
  assert registry.get_algorithm(name).__module__ == "egspo.rl.baselines"
  assert name in registry.registered()
  for task in ("countdown", "sudoku", "gsm8k", "math500", "kodcode", "copy"):
    c = config_lib.base_config(task, "tiny")
    c.algorithm = name
    config_lib.validate(c)


def test_config_rejects_bad_baseline_fields():
  """The selected method checks its own section (`validate_config`), with the choices of the
  lists it uses (masking.ESTIMATORS, losses.NORMALIZATIONS / REDUCTIONS)."""
  def bad(name, field, value, match=None):
    c = _config(name, **{field: value})
    with pytest.raises(config_lib.ConfigError, match=match or f"^bad config field {field}="):
      config_lib.validate(c)
    c = _config(name)
    c.algorithm = "egspo_sa"  # another method's section is not read: not checked
    c[field.split(".")[0]][field.split(".")[1]] = value
    config_lib.validate(c)

  bad("diffu_grpo", "diffu_grpo.p_mask_prompt", 1.0)
  bad("diffu_grpo", "diffu_grpo.reduction", "mean", r"must be one of \('token', 'sequence'\)")
  bad("espo", "espo.num_iterations", 0)
  bad("gdpo", "gdpo.normalize", "sideways", r"must be one of \('inside', 'outside', 'none'\)")
  bad("stabledrl", "stabledrl.estimator", "exact",
      r"must be one of \('double_mc', 'espo', 'gauss_legendre', 'spg'\)")
  bad("wd1", "wd1.estimator", "spg", r"must be one of \('double_mc', 'espo', 'gauss_legendre'\)")
  bad("stabledrl", "stabledrl.bound", "spg", "needs stabledrl.estimator='spg'")
  bad("stabledrl", "stabledrl.iw_masks", "shared", r"must be one of \('common', 'independent'\)")
  bad("stabledrl", "stabledrl.mix_weight", 1.5)
  c = _config("stabledrl", **{"stabledrl.estimator": "spg"})  # L = block_length: one block
  with pytest.raises(config_lib.ConfigError, match="^bad config field stabledrl.num_mc=2: .*<= "
                     "rollout.gen_length/rollout.block_length=1"):
    config_lib.validate(c)
  bad("wd1", "wd1.temperature", 0.0)
  bad("stabledrl", "batch.micro_batch_size", 2, "stabledrl needs whole groups")  # splits G=4
  assert config_lib.base_config("countdown").espo.beta == pytest.approx(3e-3)  # ESPO's script
  assert config_lib.base_config("gsm8k").espo.beta == pytest.approx(0.01)


@pytest.mark.parametrize("name", METHODS)
def test_plan_shapes_keys_and_advantages(name, split):
  algo = _shared_algo(name, split, split[1])
  batches, metrics = _plan(algo, split)
  assert len(batches) == 2  # num_iterations optimizer steps on one rollout
  a = B // MICRO
  for batch in batches:
    assert batch["tokens"].shape == (a, MICRO, L)
    assert batch["prompt_ids"].shape == (a, MICRO, P)
    assert batch["adv"].shape == (a, MICRO)
    want_q = (a, MICRO, L) if name == "diffu_grpo" else (a, MICRO)
    if name != "wd1":
      assert batch["old"].shape == want_q and np.all(np.isfinite(batch["old"]))
    else:
      assert "old" not in batch
    assert ("ref" in batch) == (name in ("diffu_grpo", "espo", "gdpo"))
    k = np.asarray(batch["mask_key"])
    assert (k == k[:, :1]).all()  # one key per micro-batch
    assert not (k[0, 0] == k[1, 0]).all()  # different micro-batches, different masks
  # A fresh masking key per inner iteration (d1: a new seed per μ step).
  assert not np.array_equal(batches[0]["mask_key"], batches[1]["mask_key"])
  # Advantages by hand.
  r = REWARDS.reshape(NP, G)
  if name == "espo":
    want = r - (r.sum(1, keepdims=True) - r) / (G - 1)
  else:
    want = r - r.mean(1, keepdims=True)
  np.testing.assert_allclose(np.asarray(batches[0]["adv"]).reshape(-1), want.reshape(-1),
                             atol=1e-6)
  if name == "diffu_grpo":
    valid = np.asarray(batches[0]["valid"]).reshape(B, L)
    assert valid[1].tolist() == [True] * 6 + [False] * 2  # through the first EOS
    assert valid[2].tolist() == [True] + [False] * 7
    assert valid[0].all()
  assert metrics["adv_abs_mean"] == pytest.approx(float(np.abs(want).mean()), rel=1e-5)


def _direct_quantity(name, cfg, model, mb):
  """The estimator called by hand, with the full-canvas logits of `model(ids, mask)` (an
  independent path from the LM-head-only logits function)."""
  key = jax.random.wrap_key_data(mb["mask_key"][0])
  fn = lambda ids, attn: model(ids, attn)  # noqa: E731
  args = (fn, key, mb["prompt_ids"], mb["prompt_mask"], mb["tokens"])
  if name == "diffu_grpo":
    return masking.one_step_token_logprobs(*args, mask_token_id=2,
                                           p_mask_prompt=cfg.diffu_grpo.p_mask_prompt)
  if name == "espo":
    return masking.elbo_espo(*args, mask_token_id=2, num_mc=cfg.espo.num_mc)
  if name == "gdpo":
    return masking.elbo_gauss_legendre(*args, mask_token_id=2, num_nodes=cfg.gdpo.num_nodes)
  s = cfg[name]
  assert s.estimator == "espo"
  return masking.elbo_espo(*args, mask_token_id=2, num_mc=s.num_mc)


def _direct_loss(name, cfg, cur, old, ref, mb):
  adv, tokens = mb["adv"], mb["tokens"]
  if name == "diffu_grpo":
    valid = loss_lib.completion_mask_through_eos(tokens, 1)
    return loss_lib.diffu_grpo_token_loss(cur, old, adv, valid, ref, epsilon=0.5, beta=0.04)
  if name == "espo":
    return loss_lib.espo_loss(cur, old, adv, L, ref, epsilon=0.2, beta=cfg.espo.beta)
  if name == "gdpo":
    return loss_lib.gdpo_loss(cur, old, adv, L, ref, normalize="inside", epsilon=0.2,
                              beta=cfg.gdpo.beta)
  if name == "stabledrl":
    return loss_lib.stabledrl_loss(cur, old, adv, G, clip_iw=5.0)
  return loss_lib.wd1_loss(cur, adv, G, temperature=1.0)


@pytest.mark.parametrize("name", METHODS)
def test_loss_equals_direct_computation(name, split, model):
  """At moved parameters (old ≠ current ≠ reference) the registered loss equals the estimator and
  loss function called by hand."""
  _, params, frozen = split
  ref = _perturbed(params, seed=11)
  algo = _shared_algo(name, split, ref)
  batches, _ = _plan(algo, split, seed=1)
  policy = split[0]
  moved = policy.model(_perturbed(params, 0.03, seed=5), frozen)
  ref_model = policy.model(ref, frozen)
  old_model = policy.model(params, frozen)
  cfg = algo.ctx.config
  mb = _micro(batches[1], 1)  # 2nd inner iteration, 2nd micro-batch
  old = _direct_quantity(name, cfg, old_model, mb)
  if name != "wd1":
    np.testing.assert_allclose(np.asarray(mb["old"]), np.asarray(old), rtol=1e-5, atol=1e-4)
  has_ref = name in ("diffu_grpo", "espo", "gdpo")
  if has_ref:
    ref_q = _direct_quantity(name, cfg, ref_model, mb)
    np.testing.assert_allclose(np.asarray(mb["ref"]), np.asarray(ref_q), rtol=1e-5, atol=1e-4)
  cur = _direct_quantity(name, cfg, moved, mb)
  want_sum, want_den, want_m = _direct_loss(name, cfg, cur, old, ref_q if has_ref else None, mb)
  got_sum, got_den, got_m = algo.loss(moved, mb, jax.random.key(0))
  assert float(got_den) == float(want_den)
  assert float(got_sum) == pytest.approx(float(want_sum), rel=1e-4, abs=1e-5)
  if "ratio/mean" in got_m:
    assert abs(float(got_m["ratio/mean"]) - 1.0) > 1e-4  # the policy really moved
    assert float(got_m["ratio/mean"]) == pytest.approx(float(want_m["ratio/mean"]), rel=1e-4)
  if has_ref and cfg[name].beta > 0:
    assert float(got_m["kl"]) > 0
    assert float(got_m["kl"]) == pytest.approx(float(want_m["kl"]), rel=1e-3)


@pytest.mark.parametrize("name", METHODS)
def test_update_raises_positive_advantage_likelihood(name, split):
  """One `make_update_step` step on the first planned batch. Its metrics are those of the loss at
  the rollout parameters (old = current with common random numbers): ratio exactly 1 and KL 0 to an
  identical reference. After the step the only positive-advantage sample (row 0) is more likely
  under the same masks."""
  policy, params, frozen = split
  algo = _shared_algo(name, split, params)
  rewards = np.zeros(B, np.float32)
  rewards[0] = 1.0
  batches, _ = _plan(algo, split, rewards=rewards, seed=2)
  batch = batches[0]
  tx = optax.adam(3e-3)
  state = U.TrainState(step=jnp.zeros((), jnp.int32), params=jax.tree.map(jnp.copy, params),
                       opt_state=tx.init(params))
  step = U.make_update_step(policy, tx, algo.loss)
  new, m = step(state, frozen, batch, jax.random.key(0))
  assert float(m["update_ok"]) == 1.0 and np.isfinite(float(m["loss"]))
  if name in ("diffu_grpo", "espo", "gdpo"):
    assert float(m["ratio/mean"]) == pytest.approx(1.0, abs=1e-5)
    assert float(m["clip/frac"]) == 0.0
    assert abs(float(m["kl"])) < 1e-6
  if name == "stabledrl":
    assert float(m["iw/mean"]) == pytest.approx(1.0, abs=1e-5)
    assert float(m["iw/ess_frac"]) == pytest.approx(1.0, abs=1e-5)  # uniform weights

  def likelihood(p):
    mb = _micro(batch, 0)
    q = algo.quantity(policy.model(p, frozen), mb, baselines.micro_batch_key(mb))
    if q.ndim == 2:  # token log-probs: the sample's sum over its valid tokens
      q = jnp.sum(jnp.where(mb["valid"], q, 0.0), -1)
    return float(q[0])

  before, after = likelihood(params), likelihood(new.params)
  assert after > before + 1e-3, (before, after)


def test_plan_rejects_a_micro_batch_that_does_not_divide(split):
  with pytest.raises(ValueError, match="micro_batch_size"):
    baselines.micro_batch_keys(jax.random.key(0), 8, 3)


# ----------------------------------------------------------------------------------------------
# StableDRL as released (issue 14 §9): the SPG bound, independent masks for the weights' ELBOs.

_RELEASED = {"stabledrl.estimator": "spg", "stabledrl.bound": "spg",
             "stabledrl.iw_masks": "independent", "rollout.block_length": 4}  # 2 blocks of 4


def _spg_direct(model, mb, key=None):
  """The 'spg' estimate by hand on the full-canvas logits of `model(ids, mask)`."""
  key = jax.random.wrap_key_data(mb["mask_key"][0]) if key is None else key
  valid = loss_lib.completion_mask_through_eos(mb["tokens"], 1)
  return spg.spg_estimate(lambda ids, attn: model(ids, attn), key, mb["prompt_ids"],
                          mb["prompt_mask"], mb["tokens"], valid, mask_token_id=2,
                          block_length=4, num_t=2, p_mask_prompt=0.15, eubo_beta=1.5)


def test_stabledrl_released_bound_and_independent_masks(split):
  """'independent': one old (ELBO, EUBO) per rollout from masks of its own, shared by the inner
  iterations; the loss is −Σ w A L_SPG with w from the current ELBO on fresh masks, by hand."""
  policy, params, frozen = split
  algo = _algo("stabledrl", split, **_RELEASED)
  batches, metrics = _plan(algo, split, seed=3)
  a = B // MICRO
  assert batches[0]["old"].shape == (a, MICRO, 2)
  np.testing.assert_array_equal(np.asarray(batches[0]["old"]), np.asarray(batches[1]["old"]))
  old_keys = baselines.micro_batch_keys(
      jax.random.fold_in(jax.random.key(3), baselines.INDEPENDENT_OLD_KEY), B, MICRO)
  mb = _micro(batches[1], 1)
  want_old = _spg_direct(policy.model(params, frozen), mb,
                         jax.random.wrap_key_data(old_keys[MICRO]))
  np.testing.assert_allclose(np.asarray(mb["old"]), np.asarray(want_old), rtol=1e-5, atol=1e-5)
  assert metrics["likelihood_old_mean"] == pytest.approx(
      float(jnp.mean(batches[0]["old"][..., 0])), rel=1e-6)
  moved = policy.model(_perturbed(params, 0.03, seed=5), frozen)
  cur = _spg_direct(moved, mb)
  bound = spg.sandwich(cur[:, 0], cur[:, 1], mb["adv"], 0.5)
  assert not np.allclose(np.asarray(bound), np.asarray(cur[:, 0]))  # A ≤ 0 rows take the mix
  want = loss_lib.stabledrl_loss(cur[:, 0], mb["old"][:, 0], mb["adv"], G, clip_iw=5.0,
                                 bound=bound)
  got = algo.loss(moved, mb, jax.random.key(0))
  assert float(got[0]) == pytest.approx(float(want[0]), rel=1e-4, abs=1e-6)
  assert float(got[1]) == float(want[1])


@pytest.mark.parametrize("iw_masks", ["common", "independent"])
def test_stabledrl_weights_at_the_rollout_parameters(split, iw_masks):
  """At the rollout parameters the weights are exactly uniform with common masks (ELBO_θ = ELBO_old
  draw for draw), and not with the release's independent masks."""
  _, params, frozen = split
  algo = _algo("stabledrl", split, **{**_RELEASED, "stabledrl.iw_masks": iw_masks})
  batches, _ = _plan(algo, split, seed=4)
  if iw_masks == "common":
    assert not np.allclose(np.asarray(batches[0]["old"]), np.asarray(batches[1]["old"]))
  _, _, m = algo.loss(split[0].model(params, frozen), _micro(batches[0], 0), jax.random.key(0))
  if iw_masks == "common":
    assert float(m["iw/ess_frac"]) == pytest.approx(1.0, abs=1e-5)
  else:
    assert float(m["iw/ess_frac"]) < 1.0 - 1e-4


# ----------------------------------------------------------------------------------------------
# End to end: each method through `egspo.train.run` on the micro copy config of test_train.


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_end_to_end_micro_run(name, tmp_path):
  from egspo import train
  from test_train import micro_config

  over = {"algorithm": name}
  for sec in METHODS:
    over[f"{sec}.num_iterations"] = 2
  c = micro_config(**over)
  train.run(c, tmp_path)
  recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  rl = [r for r in recs if "rl/loss" in r]
  assert len(rl) == c.train.num_iterations
  for r in rl:
    assert np.isfinite(r["rl/loss"]) and r["rl/update_ok"] == 1.0
    assert r["rl/inner_iterations"] == 2.0


# ----------------------------------------------------------------------------------------------
# scripts/compare_methods.py: the analytic FLOPs it reports.


def _compare_script():
  import importlib.util
  import pathlib

  path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "compare_methods.py"
  spec = importlib.util.spec_from_file_location("compare_methods", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_compare_methods_forward_flops_match_xla(model):
  """F(S, h) against XLA's cost analysis of the compiled forward (norms, RoPE and softmax are
  not counted by the formula, so it may only be a little lower)."""
  cm = _compare_script()
  cfg = model.cfg
  s, h = 40, 16
  policy, params, frozen = U.split_policy(model)

  def fwd(params, ids):
    m = policy.model(params, frozen)
    return m.logits(m.hidden_states(ids, jnp.ones(ids.shape, bool))[:, -h:])

  ca = jax.jit(fwd).lower(params, jnp.zeros((1, s), jnp.int32)).compile().cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  xla = float(ca["flops"])
  ours = cm.forward_flops(cfg, s, h)
  assert 0.8 * xla <= ours <= 1.0 * xla, (ours, xla)


def test_compare_methods_iteration_flops_counts():
  """Forward counts per method, by hand, in units of F = F(S, G)."""
  cm = _compare_script()
  over = ["--config.batch.num_prompts=2", "--config.batch.group_size=4"]
  c = cm.resolved_config(over + ["--config.algorithm=diffu_grpo",
                                 "--config.diffu_grpo.num_iterations=3"])
  cfg = llada.get_config(c.model.preset, vocab=CharTokenizer())
  s, g, b = c.rollout.max_prompt_length + c.rollout.gen_length, c.rollout.gen_length, 8
  f = cm.forward_flops(cfg, s, g)
  got = cm.iteration_flops(c)
  assert got["rollout"] == pytest.approx(b * c.rollout.steps * f)
  assert got["plan"] == pytest.approx(2 * 3 * b * f)  # old + reference (β = 0.04 > 0)
  assert got["update"] == pytest.approx(3 * 3 * b * f)  # forward + backward = 3 forwards
  c = cm.resolved_config(over + ["--config.algorithm=espo", "--config.espo.num_iterations=2",
                                 "--config.espo.num_mc=2"])
  got = cm.iteration_flops(c)
  assert got["plan"] == pytest.approx(2 * 2 * b * 4 * f)  # coupled: 2·num_mc forwards per ELBO
  assert got["update"] == pytest.approx(3 * 2 * b * 4 * f)
  c = cm.resolved_config(over + ["--config.algorithm=stabledrl",
                                 "--config.stabledrl.estimator=gauss_legendre",
                                 "--config.stabledrl.num_nodes=3"])
  got = cm.iteration_flops(c)
  mu = c.stabledrl.num_iterations
  assert got["plan"] == pytest.approx(mu * b * 3 * f)  # old only: no KL
  assert got["update"] == pytest.approx(3 * mu * b * 3 * f)
  assert got["total"] == pytest.approx(got["rollout"] + got["plan"] + got["update"])


def test_compare_methods_adopts_sft_of_a_tiny_countdown_run(tmp_path):
  """--sft_from: the SFT checkpoint and the SFT model's accuracy are taken over; a source without
  them is refused with its path named."""
  import json

  cm = _compare_script()
  src = tmp_path / "tc" / "seed3" / "egspo_sa"
  (src / "checkpoints" / "sft" / "100").mkdir(parents=True)
  (src / "checkpoints" / "sft" / "100" / "blob").write_text("weights")
  (src / "history.json").write_text(json.dumps({"before": {"accuracy": 0.07}, "eval_450": {}}))
  dst = tmp_path / "cmp" / "seed3" / "sft"
  cm.adopt_sft(src, dst)
  assert (dst / "checkpoints" / "sft" / "100" / "blob").read_text() == "weights"
  assert json.loads((dst / "history.json").read_text())["before"] == {"accuracy": 0.07}
  with pytest.raises(SystemExit, match="holds no checkpoints/sft"):
    cm.adopt_sft(tmp_path / "nowhere", tmp_path / "x")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["diffu_grpo", "espo"])
def test_sharded_training_equals_single_device(name, tmp_path):
  """The masking key travels in the batch, so a (2, 2, 2) data/fsdp/tensor mesh trains exactly
  like one device (ESPO's stratified counts span the global micro-batch, not a shard of it)."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices")
  from egspo import train
  from test_train import assert_same_metrics, assert_trees_equal, final_params, micro_config

  over = {"algorithm": name, f"{name}.num_iterations": 2, "train.num_iterations": 2}
  train.run(micro_config(**over), tmp_path / "single")
  train.run(micro_config(**over, **{"mesh.num_devices": 8, "mesh.data": 2, "mesh.fsdp": 2,
                                    "mesh.tensor": 2}), tmp_path / "sharded")
  a, _ = final_params(tmp_path / "single")
  b, _ = final_params(tmp_path / "sharded")
  assert_trees_equal(a["params"], b["params"], atol=1e-4)
  assert_same_metrics(tmp_path / "single", tmp_path / "sharded")
