"""Golden test (issue 14, Proof): one update of the JAX path under the released trainer's settings
equals an independent PyTorch implementation of the release (tests/torch_egspo_reference.py).

A fixed rollout record (the JAX sampler's, from a small random LLaDA), three parameter sets
(π_old that sampled it, the current π_θ, the frozen π_ref), a token-level task reward. The JAX
path is `EGSPO.plan` + `update.make_update_step` exactly as training runs them; the PyTorch side
replays the trajectory the release's way (its own forwards for the rollout metadata, entropy
top-K in `torch.topk` order, one-step values, λ-returns, batch-1 per-step forwards,
`compute_loss`, the gradient-accumulated optimizer step). Every optimizer step of the rollout:
selected steps, advantages, π_old / π_ref step log-probs, the loss and every parameter's
gradient agree to 1e-5 in float32.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import torch_egspo_reference as ref
import torch_llada
import torch_sampler
from egspo import config as config_lib
from egspo import train as train_lib
from egspo.diffusion import sampler as sampler_lib
from egspo.rl import algorithms
from egspo.rl import registry
from egspo.rl import update as U
from test_model import from_torch, small_config

NP, G, P = 2, 4, 6  # prompts, completions per prompt, prompt length (unpadded: the release
B = NP * G  # passes no attention mask)
GEN, BLOCK, T, K, GA, MICRO = 16, 8, 8, 4, 2, 4  # 2 tokens per step; K/GA = 2 optimizer steps
LAM, EPS, EPS_HIGH, BETA = 0.5, 0.2, 0.5, 0.04
ATOL = 1e-5


def reference_settings(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `:reference` config's algorithm (`config.RELEASE_ALGORITHM`: train.sh, train.yaml), K
  shrunk to this test's T = 8 steps; the PyTorch side reads the same values from the constants
  above."""
  config_lib.apply_settings(c, config_lib.RELEASE_ALGORITHM)
  c.egspo.num_selected_steps = K
  assert (c.egspo.lam, c.loss.eps, c.loss.eps_high, c.loss.beta, c.train.columns_per_update) \
      == (LAM, EPS, EPS_HIGH, BETA, GA)
  return c


def _config():
  c = config_lib.base_config("copy", "tiny")
  c.rollout.gen_length, c.rollout.block_length, c.rollout.steps = GEN, BLOCK, T
  c.rollout.max_prompt_length = P
  c.batch.num_prompts, c.batch.group_size, c.batch.micro_batch_size = NP, G, MICRO
  reference_settings(c)
  config_lib.validate(c)
  return c


def decode(ids):
  return [tuple(int(t) for t in row) for row in np.asarray(ids)]


def reward(texts, examples):
  """A graded token-level reward: the fraction of tokens ≡ the example's id (mod 3)."""
  return np.array([np.mean([t % 3 == ex["id"] % 3 for t in text])
                   for text, ex in zip(texts, examples)], np.float32)


def _perturbed(sd, seed, scale):
  g = torch.Generator().manual_seed(seed)
  return {k: v + scale * v.abs().mean() * torch.randn(v.shape, generator=g) for k, v in sd.items()}


@pytest.fixture(scope="module")
def world():
  cfg = small_config()
  hf = torch_sampler.torch_config(cfg)
  head = "model.transformer.ff_out.weight"
  sds = {"old": torch_llada.random_state_dict(cfg.to_hf_config(), seed=0)}
  sds["old"][head] *= 4.0  # peaked distributions: step entropies far apart, a clear top-K order
  sds["cur"] = _perturbed(sds["old"], 1, 0.1)  # some ratios leave [1 − ε, 1 + ε_high]
  sds["ref"] = _perturbed(sds["old"], 2, 0.1)
  for sd in sds.values():  # the mask token never wins the release's greedy argmax
    sd[head][cfg.mask_token_id] = 0.0
  models = {k: from_torch(cfg, sd) for k, sd in sds.items()}
  policy, params_old, frozen = U.split_policy(models["old"])
  params = {k: U.split_policy(m)[1] for k, m in models.items()}

  rng = np.random.default_rng(0)
  prompt = np.repeat(rng.integers(3, cfg.mask_token_id, (NP, P)), G, axis=0).astype(np.int32)
  scfg = sampler_lib.SamplerConfig(gen_length=GEN, steps=T, block_length=BLOCK,
                                   mask_token_id=cfg.mask_token_id, temperature=1.0)
  ro = sampler_lib.generate_with_model(models["old"], jnp.asarray(prompt),
                                       jnp.ones((B, P), bool), jax.random.key(0), scfg)
  # One example object per group, repeated G times (as the prompt stream gives them).
  examples = [ex for ex in ({"id": g} for g in range(NP)) for _ in range(G)]
  rewards = reward(decode(ro.tokens), examples)

  c = _config()
  ctx = registry.Context(config=c, policy=policy, ref_params=params["ref"],
                         mask_token_id=cfg.mask_token_id,
                         max_commit=int(sampler_lib.commit_schedule(scfg).max()),
                         reward_fn=reward, decode_fn=decode)
  algo = registry.get_algorithm(c.algorithm)(ctx)
  batches, _ = algo.plan(params_old, frozen,
                         registry.Iteration(ro, rewards, examples, jax.random.key(1)))
  return dict(cfg=cfg, hf=hf, sds=sds, policy=policy, params=params, frozen=frozen, ro=ro,
              prompt=prompt, examples=examples, algo=algo, batches=batches)


def _trajectory(w):
  """The release's record: canvases [T+1, B, P+G], state t = prompt ++ tokens committed before t."""
  ro = w["ro"]
  tokens = torch.tensor(np.asarray(ro.tokens)).long()
  commit = torch.tensor(np.asarray(ro.commit_step)).long()
  prompt = torch.as_tensor(w["prompt"]).long()
  states = [torch.cat([prompt, torch.where(commit < t, tokens, w["cfg"].mask_token_id)], dim=1)
            for t in range(T + 1)]
  return torch.stack(states).long()


@pytest.fixture(scope="module")
def release(world):
  """The PyTorch side up to the advantages: what `_generate_and_score_completions` returns."""
  w = world
  traj = _trajectory(w)
  logps, dists, greedy = ref.replay_metadata(w["sds"]["old"], w["hf"], traj,
                                             w["cfg"].mask_token_id)
  eval_steps = ref.high_entropy_steps(dists, K)
  completions = greedy[:, :, P:]
  selected = [[completions[b, eval_steps[b, t]] for t in range(K)] + [completions[b, -1]]
              for b in range(B)]
  step_rewards = torch.as_tensor(np.stack([
      reward(decode(torch.stack(row).numpy()), [w["examples"][b]] * (K + 1))
      for b, row in enumerate(selected)]))
  return dict(
      traj=traj, eval_steps=eval_steps, step_rewards=step_rewards,
      adv=ref.stepwise_advantages(step_rewards, G, LAM),
      old=ref.old_step_logps(logps, eval_steps),
      ref=ref.step_logps(w["sds"]["ref"], w["hf"], traj, eval_steps))


def test_release_schedule_is_the_reference_update_schedule():
  """`_prepare_inputs`' counter with gradient accumulation 2 = column_groups('reference')."""
  for k, ga in ((8, 2), (K, GA), (6, 3), (4, 1), (4, 4)):
    steps = ref.micro_step_columns(k, ga, num_micro_steps=3 * k)
    # Each optimizer step takes its micro-steps from one rollout; K/GA steps per rollout.
    assert all(len({r for r, _ in s}) == 1 for s in steps)
    per_rollout = [[[col for _, col in s] for s in steps if s[0][0] == r] for r in range(3)]
    assert per_rollout[0] == per_rollout[1] == per_rollout[2]
    assert algorithms.column_groups("reference", k, ga) == per_rollout[0]
  assert algorithms.column_groups("reference", 8, 2) == [[1, 2], [3, 4], [5, 6], [7, 0]]


def test_staleness_metric_counts_applied_updates_since_the_rollout():
  # The release's K = 8, accumulation 2: optimizer steps 0..3 of a rollout see 0..3 updates.
  steps = ref.micro_step_columns(8, 2, num_micro_steps=8)
  assert len(steps) == 4
  m = train_lib.staleness_metrics([{"update_ok": 1.0}] * len(steps))
  assert m == {"staleness/mean": 1.5, "staleness/max": 3.0}
  assert train_lib.staleness_metrics([{"update_ok": 1.0}] * 8)["staleness/max"] == 7.0  # per_step
  assert train_lib.staleness_metrics([{"update_ok": 1.0}]) == {"staleness/mean": 0.0,
                                                              "staleness/max": 0.0}  # joint
  # A refused (non-finite) update changes nothing, so it does not age the batch: 0, 1, 1, 2.
  m = train_lib.staleness_metrics([{"update_ok": 1.0}, {"update_ok": 0.0}, {"update_ok": 1.0},
                                   {"update_ok": 1.0}])
  assert m == {"staleness/mean": 1.0, "staleness/max": 2.0}


def test_plan_matches_the_release(world, release):
  """Selected steps (entropy rank), advantages, π_old and π_ref per column of each optimizer
  step."""
  # The record's entropy ranks are unambiguous (float noise cannot reorder the top K + 1).
  top = np.sort(np.asarray(world["ro"].step_entropy), axis=1)[:, ::-1][:, :K + 1]
  assert np.diff(top, axis=1).max() < -1e-4
  groups = algorithms.column_groups("reference", K, GA)
  assert len(world["batches"]) == len(groups) == K // GA
  for batch, cols in zip(world["batches"], groups):
    flat = jax.tree.map(lambda x: np.asarray(x).reshape((-1,) + x.shape[2:]), batch)
    assert flat["steps"].shape == (GA * B, 1)
    col = lambda x: np.concatenate([np.asarray(x)[..., c] for c in cols])  # noqa: E731
    np.testing.assert_array_equal(flat["steps"][:, 0], col(release["eval_steps"]))
    np.testing.assert_allclose(flat["adv"][:, 0], col(release["adv"]), atol=ATOL, rtol=0)
    np.testing.assert_allclose(flat["logp_old"][:, 0], col(release["old"].T), atol=ATOL, rtol=0)
    np.testing.assert_allclose(flat["logp_ref"][:, 0], col(release["ref"].T), atol=ATOL, rtol=0)


def test_the_record_makes_the_test_discriminating(release):
  """The pairing, λ and the values matter for this record: pairing the same steps by time gives
  other advantages, and the one-step values differ from the final rewards."""
  steps = release["eval_steps"]
  assert not torch.equal(steps, torch.sort(steps, dim=1).values)
  by_time = torch.argsort(steps, dim=1)
  rewards_by_time = torch.cat([torch.gather(release["step_rewards"][:, :-1], 1, by_time),
                               release["step_rewards"][:, -1:]], dim=1)
  adv_time = ref.stepwise_advantages(rewards_by_time, G, LAM)
  adv_rank_in_time_order = torch.gather(release["adv"], 1, by_time)
  assert (adv_time - adv_rank_in_time_order).abs().max() > 1e-2
  assert (release["step_rewards"][:, :-1] != release["step_rewards"][:, -1:]).any()


def _recording_tx():
  """An optax transformation whose state is the last gradient it was given (no update)."""
  def init(params):
    return jax.tree.map(jnp.zeros_like, params)

  def update(grads, state, params=None):
    del state, params
    return jax.tree.map(jnp.zeros_like, grads), grads

  return optax.GradientTransformation(init, update)


def _jax_update(world, update, tx, batch):
  """(loss, gradient as HF-named [out, in] tensors) of one optimizer step at π_θ."""
  w = world
  params = jax.tree.map(jnp.copy, w["params"]["cur"])
  state = U.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params))
  new_state, m = update(state, w["frozen"], batch, jax.random.key(2))
  assert float(m["update_ok"]) == 1.0
  # The gradient as a model's parameters, read out under the checkpoint's names and layout.
  grad_model = w["policy"].model(new_state.opt_state, w["frozen"])
  return float(m["loss"]), torch_sampler.state_dict_from_jax(grad_model)


def test_one_update_loss_and_gradients_match_the_release(world, release):
  w, r = world, release
  cur = {k: v.clone().requires_grad_(True) for k, v in w["sds"]["cur"].items()}
  tokens_per_step = GEN // T
  tx = _recording_tx()
  update = U.make_update_step(w["policy"], tx, w["algo"].loss)  # the training update step
  clipped = []
  for batch, micro in zip(w["batches"], ref.micro_step_columns(K, GA, num_micro_steps=K)):
    losses = []
    for _, c in micro:
      logp = ref.step_logps(cur, w["hf"], r["traj"], r["eval_steps"][:, c:c + 1], grad=True)[0]
      ratio = torch.exp(logp - r["old"][c]).detach()
      clipped.append(((ratio < 1 - EPS) & (r["adv"][:, c] < 0))
                     | ((ratio > 1 + EPS_HIGH) & (r["adv"][:, c] > 0)))
      losses.append(ref.micro_step_loss(logp, r["old"][c], r["ref"][c], r["adv"][:, c],
                                        epsilon=EPS, epsilon_high=EPS_HIGH, beta=BETA,
                                        tokens_per_step=tokens_per_step))
    loss = ref.optimizer_step_loss(losses)
    grads = torch.autograd.grad(loss, list(cur.values()))
    want = dict(zip(cur, grads))

    got_loss, got = _jax_update(w, update, tx, batch)
    np.testing.assert_allclose(got_loss, float(loss.detach()), atol=ATOL, rtol=0)
    assert set(got) == set(want)
    for name in want:
      np.testing.assert_allclose(got[name].numpy(), want[name].numpy(), atol=ATOL, rtol=0,
                                 err_msg=name)
    assert max(float(g.abs().max()) for g in want.values()) > 1e-2  # not a vacuous comparison
  # Both branches of the clipped surrogate occur in this record.
  clipped = torch.cat(clipped)
  assert clipped.any() and not clipped.all()
