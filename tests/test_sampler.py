"""Tests of the LLaDA sampler (egspo/diffusion/sampler.py), the rollout record and the CLI.

The model is the `tiny` preset with random weights that give peaked distributions (the default
init is nearly uniform, where float rounding could flip near-ties between JAX and PyTorch).
Parity is against tests/torch_sampler.py, an independent reference-style PyTorch sampler.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import torch_llada
import torch_sampler
from egspo import generate as generate_cli
from egspo.diffusion import rollout as rollout_lib
from egspo.diffusion import sampler
from egspo.model import llada
from egspo.tokenizer import CharTokenizer

# Prompts of different lengths, left-padded to P = 6.
PROMPTS = [[20, 21, 22, 23, 24, 25], [40, 41, 42], [60]]
GEN, BLOCK, STEPS = 16, 8, 6  # 2 blocks, 3 steps per block: counts 3, 3, 2 (a remainder)


def _pad(prompts, pad_id, width=None):
  width = width or max(map(len, prompts))
  ids = np.full((len(prompts), width), pad_id, np.int32)
  mask = np.zeros((len(prompts), width), bool)
  for i, p in enumerate(prompts):
    ids[i, width - len(p):] = p
    mask[i, width - len(p):] = True
  return ids, mask


@pytest.fixture(scope="module")
def setup():
  cfg = llada.get_config("tiny", vocab=CharTokenizer())
  tcfg = torch_sampler.torch_config(cfg)
  sd = torch_llada.random_state_dict(tcfg, seed=3)
  sd["model.transformer.ff_out.weight"] *= 3.0  # peaked next-token distributions
  model = torch_sampler.load_state_dict_into_jax(llada.init_model(cfg, 0), sd)
  ids, mask = _pad(PROMPTS, cfg.pad_token_id)
  config = sampler.SamplerConfig(gen_length=GEN, steps=STEPS, block_length=BLOCK,
                                 mask_token_id=cfg.mask_token_id)
  rollout, states = sampler.generate_with_model(model, ids, mask, jax.random.key(0), config,
                                                return_states=True)
  return dict(cfg=cfg, tcfg=tcfg, sd=sd, model=model, ids=ids, mask=mask, config=config,
              rollout=jax.tree.map(np.asarray, rollout), states=np.asarray(states))


def _check_schedule(r, config):
  """Invariants every rollout must satisfy, whatever the temperature and remasking."""
  b, g = r.tokens.shape
  counts = sampler.commit_schedule(config)
  blocks = sampler.step_blocks(config)
  assert r.commit_step.min() >= 0 and r.commit_step.max() < config.steps  # every position filled
  assert (r.tokens != config.mask_token_id).all()
  for t in range(config.steps):
    n = (r.commit_step == t).sum(axis=1)
    np.testing.assert_array_equal(n, np.full(b, counts[t]), err_msg=f"step {t}")
  # Each position is committed during its own block: nothing outside the current block, and the
  # block is full by its last step.
  pos_block = np.arange(g) // config.block_length
  np.testing.assert_array_equal(blocks[r.commit_step], np.broadcast_to(pos_block, (b, g)))


# ---------------------------------------------------------------------------------------------
# Config and schedule


def test_commit_schedule_hand_computed():
  c = sampler.SamplerConfig(gen_length=16, steps=6, block_length=8, mask_token_id=2)
  np.testing.assert_array_equal(sampler.commit_schedule(c), [3, 3, 2, 3, 3, 2])
  np.testing.assert_array_equal(sampler.step_blocks(c), [0, 0, 0, 1, 1, 1])
  c = sampler.SamplerConfig(gen_length=256, steps=128, block_length=32, mask_token_id=2)
  assert (sampler.commit_schedule(c) == 2).all() and c.steps_per_block == 16
  c = sampler.SamplerConfig(gen_length=10, steps=4, block_length=10, mask_token_id=2)
  np.testing.assert_array_equal(sampler.commit_schedule(c), [3, 3, 2, 2])


@pytest.mark.parametrize("kw, field", [
    (dict(gen_length=20, block_length=8, steps=4), "gen_length"),
    (dict(gen_length=16, block_length=8, steps=5), "steps"),
    (dict(gen_length=16, block_length=8, steps=18), "steps"),
    (dict(gen_length=0, block_length=8, steps=2), "gen_length"),
    (dict(gen_length=16, block_length=8, steps=2, temperature=-0.1), "temperature"),
    (dict(gen_length=16, block_length=8, steps=2, remasking="top_p"), "remasking"),
    (dict(gen_length=16, block_length=8, steps=2, mask_token_id=-1), "mask_token_id"),
])
def test_bad_config_raises(kw, field):
  kw = dict(dict(mask_token_id=2), **kw)
  with pytest.raises(ValueError, match=f"SamplerConfig.{field}"):
    sampler.SamplerConfig(**kw)


# ---------------------------------------------------------------------------------------------
# denoise_step on hand-made logits


def test_denoise_step_hand_computed():
  """Fixed logits: the committed positions, tokens, log-probs and entropies are hand-checked."""
  v, mask_id = 5, 4
  # Completion of 4 positions (one block of 4, 2 steps → commit 2 per step); position 1 is already
  # committed. Position logits favour token (pos % 3) with margins that set the confidences.
  margins = np.array([1.0, 5.0, 3.0, 2.0], np.float32)
  table = np.zeros((1, 4, v), np.float32)
  for i in range(4):
    table[0, i, i % 3] = margins[i]
  table[0, :, mask_id] = 10.0  # the mask token has the largest logit: must never be chosen

  def logits_fn(ids, attn):
    assert ids.shape == (1, 2 + 4) and attn.shape == ids.shape
    return jnp.asarray(table)

  config = sampler.SamplerConfig(gen_length=4, steps=2, block_length=4, mask_token_id=mask_id)
  completion = jnp.array([[mask_id, 3, mask_id, mask_id]], jnp.int32)
  step = jax.jit(lambda *a: sampler.denoise_step(logits_fn, *a, config))
  out = step(jnp.array([[7, 8]]), jnp.array([[True, True]]), completion, 0, jax.random.key(0))
  # Confidence = p(x0) grows with the margin: among masked positions 0, 2, 3 the two most confident
  # are 2 (margin 3) and 3 (margin 2).
  np.testing.assert_array_equal(out.committed[0], [False, False, True, True])
  np.testing.assert_array_equal(out.completion[0], [mask_id, 3, 2, 0])
  np.testing.assert_array_equal(out.x0_hat[0], [0, 3, 2, 0])
  logp = jax.nn.log_softmax(jnp.asarray(table[0]), axis=-1)
  p = np.exp(np.asarray(logp))
  ent = -(p * np.log(p + 1e-8)).sum(-1)
  np.testing.assert_allclose(out.logprob[0, 2:], [logp[2, 2], logp[3, 0]], rtol=1e-6)
  np.testing.assert_allclose(out.entropy[0, 2:], ent[2:], rtol=1e-6)
  np.testing.assert_allclose(out.step_entropy[0], ent[2:].mean(), rtol=1e-6)
  assert out.logprob[0, 0] == 0 and out.entropy[0, 0] == 0


def test_classifier_free_guidance_hand_computed():
  """cfg_scale s: one forward over the canvas and its copy with the prompt masked, logits
  u + (s + 1)(c − u) (the release's `generate`); padding stays unattended. s = 0 is one forward
  over the canvas alone, as before."""
  v, mask_id, s = 5, 4, 1.5
  rng = np.random.default_rng(0)
  base = jnp.asarray(rng.normal(size=(3, v)), jnp.float32)
  delta = jnp.asarray(rng.normal(size=(3, v)), jnp.float32)
  seen = []

  def logits_fn(ids, attn):
    seen.append(ids.shape)
    prompt_seen = (attn[:, :2] & (ids[:, :2] != mask_id)).sum(-1).astype(jnp.float32)
    return base[None] + prompt_seen[:, None, None] * delta[None]  # [N, 3, V]

  prompt = jnp.array([[7, 8], [0, 9]], jnp.int32)
  pmask = jnp.array([[True, True], [False, True]])  # row 1: one pad, one real token
  completion = jnp.full((2, 3), mask_id, jnp.int32)
  config = sampler.SamplerConfig(gen_length=3, steps=3, block_length=3, mask_token_id=mask_id,
                                 cfg_scale=s)
  out = sampler.denoise_step(logits_fn, prompt, pmask, completion, 0, jax.random.key(0), config)
  assert seen == [(4, 5)]  # both halves in one forward
  for b, n in ((0, 2.0), (1, 1.0)):  # attended real prompt tokens: conditional n, unconditional 0
    guided = base + (s + 1.0) * n * delta
    logp = jax.nn.log_softmax(guided, axis=-1)
    want_x0 = np.argmax(np.where(np.arange(v) == mask_id, -np.inf, guided), axis=-1)
    np.testing.assert_array_equal(out.x0_hat[b], want_x0)
    (pos,) = np.flatnonzero(np.asarray(out.committed[b]))
    assert pos == int(np.argmax(np.asarray(logp)[np.arange(3), want_x0]))  # most confident
    np.testing.assert_allclose(out.logprob[b, pos], logp[pos, want_x0[pos]], rtol=1e-6)
  seen.clear()
  plain = sampler.denoise_step(logits_fn, prompt, pmask, completion, 0, jax.random.key(0),
                               config.replace(cfg_scale=0.0))
  assert seen == [(2, 5)]
  want = np.argmax(np.where(np.arange(v) == mask_id, -np.inf,
                            base[None] + jnp.array([2.0, 1.0])[:, None, None] * delta[None]), -1)
  np.testing.assert_array_equal(plain.x0_hat, want)


def test_cfg_scale_config_checks():
  with pytest.raises(ValueError, match="SamplerConfig.cfg_scale"):
    sampler.SamplerConfig(gen_length=4, steps=2, block_length=4, mask_token_id=2, cfg_scale=-1.0)
  with pytest.raises(ValueError, match="needs cache='none'"):
    sampler.SamplerConfig(gen_length=4, steps=2, block_length=4, mask_token_id=2, cfg_scale=1.0,
                          cache="prefix")
  assert sampler.SamplerConfig(gen_length=4, steps=2, block_length=4, mask_token_id=2).cfg_scale == 0


def test_guided_rollout_obeys_the_schedule(setup):
  config = setup["config"].replace(cfg_scale=0.5)
  r = jax.tree.map(np.asarray, sampler.generate_with_model(
      setup["model"], setup["ids"], setup["mask"], jax.random.key(0), config))
  _check_schedule(r, config)
  assert not np.array_equal(r.logprob, setup["rollout"].logprob)  # guidance changed something


def test_gumbel_max_samples_tempered_softmax():
  """At τ = 0.5 the candidate x0 is distributed as softmax(logits / τ) (mask token excluded)."""
  logits = np.array([1.0, 0.5, 0.0, -1.0, 3.0], np.float32)  # token 4 = mask: excluded
  tau, n = 0.5, 20000
  config = sampler.SamplerConfig(gen_length=1, steps=1, block_length=1, mask_token_id=4,
                                 temperature=tau)

  def one(key):
    out = sampler.denoise_step(lambda ids, a: jnp.asarray(logits)[None, None, :],
                               jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), bool),
                               jnp.full((1, 1), 4, jnp.int32), 0, key, config)
    return out.completion[0, 0]

  draws = np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(1), n)))
  freq = np.bincount(draws, minlength=5) / n
  want = np.exp(logits[:4] / tau) / np.exp(logits[:4] / tau).sum()
  assert freq[4] == 0
  tol = 4 * np.sqrt(want * (1 - want) / n) + 1e-3
  assert (np.abs(freq[:4] - want) <= tol).all(), (freq, want)
  # The wrong scaling argmax(logits + Gumbel/τ) would sample softmax(τ·logits) instead.
  wrong = np.exp(logits[:4] * tau) / np.exp(logits[:4] * tau).sum()
  assert np.abs(freq[:4] - wrong).max() > 0.1


# ---------------------------------------------------------------------------------------------
# Whole rollouts on the tiny model


def test_schedule_invariants_greedy(setup):
  r, config = setup["rollout"], setup["config"]
  _check_schedule(r, config)
  assert r.x0_hat.shape == (3, STEPS, GEN) and r.step_entropy.shape == (3, STEPS)
  np.testing.assert_array_equal(r.prompt_ids, setup["ids"])


def test_greedy_matches_torch_sampler(setup):
  """τ = 0: token for token equal to the reference-style PyTorch sampler, record included."""
  r, c = setup["rollout"], setup["config"]
  ref = torch_sampler.generate(setup["sd"], setup["tcfg"], torch.from_numpy(setup["ids"]).long(),
                               torch.from_numpy(setup["mask"]), steps=STEPS, gen_length=GEN,
                               block_length=BLOCK, mask_id=c.mask_token_id)
  np.testing.assert_array_equal(r.tokens, ref["tokens"].numpy())
  np.testing.assert_array_equal(r.commit_step, ref["commit_step"].numpy())
  np.testing.assert_array_equal(r.x0_hat, ref["x0_hat"].numpy())
  np.testing.assert_array_equal(setup["states"], ref["states"].numpy())
  np.testing.assert_allclose(r.logprob, ref["logprob"].numpy(), atol=2e-4)
  np.testing.assert_allclose(r.entropy, ref["entropy"].numpy(), atol=2e-4)
  np.testing.assert_allclose(r.step_entropy, ref["step_entropy"].numpy(), atol=2e-4)
  # The distributions are far from uniform (otherwise parity would be vacuous).
  assert r.entropy.max() < 0.8 * np.log(setup["cfg"].vocab_size)


def test_padded_batch_equals_each_prompt_alone(setup):
  c = setup["config"]
  for i, p in enumerate(PROMPTS):  # PyTorch, unpadded, batch 1
    ref = torch_sampler.generate(setup["sd"], setup["tcfg"], torch.tensor([p]), None, steps=STEPS,
                                 gen_length=GEN, block_length=BLOCK, mask_id=c.mask_token_id,
                                 record=False)
    np.testing.assert_array_equal(setup["rollout"].tokens[i], ref["tokens"][0].numpy())
  # JAX, the shortest prompt alone (no padding at all).
  alone = sampler.generate_with_model(setup["model"], np.array([PROMPTS[2]], np.int32),
                                      np.ones((1, 1), bool), jax.random.key(5), c)
  np.testing.assert_array_equal(np.asarray(alone.tokens[0]), setup["rollout"].tokens[2])
  np.testing.assert_array_equal(np.asarray(alone.commit_step[0]), setup["rollout"].commit_step[2])


def test_greedy_is_deterministic(setup):
  again, _ = sampler.generate_with_model(setup["model"], setup["ids"], setup["mask"],
                                         jax.random.key(123), setup["config"], return_states=True)
  np.testing.assert_array_equal(np.asarray(again.tokens), setup["rollout"].tokens)
  np.testing.assert_array_equal(np.asarray(again.commit_step), setup["rollout"].commit_step)


def test_states_rebuilt_from_record(setup):
  """Every x_t rebuilt with `completion_at` / `canvas_at` equals the state the sampler saw."""
  r, states, c = setup["rollout"], setup["states"], setup["config"]
  for t in range(STEPS):
    rebuilt = rollout_lib.completion_at(r.tokens, r.commit_step, t, c.mask_token_id)
    np.testing.assert_array_equal(np.asarray(rebuilt), states[:, t], err_msg=f"step {t}")
  # The state before step 0 is all masked; after the last step (t = T) it is the final completion.
  assert (states[:, 0] == c.mask_token_id).all()
  final = rollout_lib.completion_at(r.tokens, r.commit_step, STEPS, c.mask_token_id)
  np.testing.assert_array_equal(np.asarray(final), r.tokens)
  steps = np.broadcast_to(np.arange(STEPS), (3, STEPS))
  ids, mask = rollout_lib.canvas_at(jax.tree.map(jnp.asarray, r), jnp.asarray(steps),
                                    c.mask_token_id)
  np.testing.assert_array_equal(np.asarray(ids)[..., 6:], states)
  np.testing.assert_array_equal(np.asarray(ids)[..., :6], np.repeat(setup["ids"][:, None], STEPS, 1))
  np.testing.assert_array_equal(np.asarray(mask)[..., :6],
                                np.repeat(setup["mask"][:, None], STEPS, 1))


def test_record_equals_recomputation_on_rebuilt_states(setup):
  """logprob, entropy, step_entropy and x̂0 equal a fresh forward on the rebuilt state x_t."""
  r, c, model = setup["rollout"], setup["config"], setup["model"]
  b = r.tokens.shape[0]
  steps = np.broadcast_to(np.arange(STEPS), (b, STEPS))
  ids, mask = rollout_lib.canvas_at(jax.tree.map(jnp.asarray, r), jnp.asarray(steps),
                                    c.mask_token_id)
  logits = nnx.jit(lambda m, i, a: m(i, a))(model, ids.reshape(b * STEPS, -1),
                                            mask.reshape(b * STEPS, -1))
  logits = np.asarray(logits).reshape(b, STEPS, -1, logits.shape[-1])[:, :, 6:]  # [B, T, G, V]
  logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
  p = np.exp(logp)
  ent = -(p * np.log(p + 1e-8)).sum(-1)  # [B, T, G]
  bi, gi = np.meshgrid(np.arange(b), np.arange(GEN), indexing="ij")
  cs = r.commit_step
  np.testing.assert_allclose(r.logprob, logp[bi, cs, gi, r.tokens], atol=1e-5)
  np.testing.assert_allclose(r.entropy, ent[bi, cs, gi], atol=1e-5)
  for t in range(STEPS):
    act = np.asarray(rollout_lib.action_mask(r.commit_step, t))
    np.testing.assert_allclose(r.step_entropy[:, t],
                               (ent[:, t] * act).sum(1) / act.sum(1), atol=1e-5)
    still = np.asarray(ids)[:, t, 6:] == c.mask_token_id
    am = logits[:, t].copy()
    am[..., c.mask_token_id] = -np.inf
    want = np.where(still, am.argmax(-1), np.asarray(ids)[:, t, 6:])
    np.testing.assert_array_equal(r.x0_hat[:, t], want, err_msg=f"x0_hat step {t}")
  # x̂0 at a step agrees with the tokens that step commits (greedy: same argmax).
  for t in range(STEPS):
    act = np.asarray(rollout_lib.action_mask(r.commit_step, t))
    np.testing.assert_array_equal(r.x0_hat[:, t][act], r.tokens[act])


def test_temperature_reproducible_and_key_dependent(setup):
  c = setup["config"].replace(temperature=0.9)
  run = lambda k: jax.tree.map(np.asarray, sampler.generate_with_model(
      setup["model"], setup["ids"], setup["mask"], jax.random.key(k), c))
  a, a2, b = run(7), run(7), run(8)
  np.testing.assert_array_equal(a.tokens, a2.tokens)
  np.testing.assert_array_equal(a.commit_step, a2.commit_step)
  np.testing.assert_array_equal(a.logprob, a2.logprob)
  assert (a.tokens != b.tokens).any()
  assert (a.tokens != setup["rollout"].tokens).any()  # not greedy
  _check_schedule(a, c)
  # Sampled tokens: logprob is the untempered log-prob of the committed token, so it can be lower
  # than the greedy token's; it is always <= 0 and finite.
  assert np.isfinite(a.logprob).all() and (a.logprob <= 0).all()


def test_random_remasking_obeys_schedule(setup):
  c = setup["config"].replace(remasking="random")
  a = jax.tree.map(np.asarray, sampler.generate_with_model(
      setup["model"], setup["ids"], setup["mask"], jax.random.key(3), c))
  _check_schedule(a, c)
  # The order of commits inside a block differs from low-confidence remasking.
  assert (a.commit_step != setup["rollout"].commit_step).any()


def test_generate_inside_user_jit_with_shardings(setup):
  """The pure core runs inside a caller's jit with the batch sharded over a mesh."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
  ids = np.concatenate([setup["ids"], setup["ids"][:1]])  # batch 4 over 2 devices
  mask = np.concatenate([setup["mask"], setup["mask"][:1]])
  graphdef, state = nnx.split(setup["model"])
  data = NamedSharding(mesh, P("data"))
  repl = NamedSharding(mesh, P())
  fn = jax.jit(lambda s, i, m, k: sampler.generate_from_state(graphdef, s, i, m, k,
                                                              setup["config"]),
               in_shardings=(repl, data, data, repl), out_shardings=data)
  out = fn(state, ids, mask, jax.random.key(0))
  assert out.tokens.sharding.spec == P("data")
  np.testing.assert_array_equal(np.asarray(out.tokens)[:3], setup["rollout"].tokens)
  np.testing.assert_array_equal(np.asarray(out.tokens)[3], setup["rollout"].tokens[0])


def test_generate_rejects_bad_inputs(setup):
  c = setup["config"]
  with pytest.raises(ValueError, match="max_sequence_length"):
    sampler.generate_with_model(setup["model"], np.zeros((1, 250), np.int32),
                                np.ones((1, 250), bool), jax.random.key(0), c)
  with pytest.raises(ValueError, match="mask_token_id"):
    sampler.generate_with_model(setup["model"], setup["ids"], setup["mask"], jax.random.key(0),
                                c.replace(mask_token_id=5))
  with pytest.raises(ValueError, match="prompt_mask shape"):
    sampler.generate_with_model(setup["model"], setup["ids"], setup["mask"][:, :3],
                                jax.random.key(0), c)


def test_decode_completions_cuts_at_eos():
  tok = CharTokenizer()
  ids = tok.encode("ab") + [tok.eos_id] + tok.encode("cd") + [tok.eos_id]
  tokens = np.array([ids, tok.encode("xyzw") + [tok.eos_id] * 2])
  assert sampler.decode_completions(tokens, tok) == ["ab", "xyzw"]
  assert sampler.cut_at_stop([5, 6, 1, 7], [1]) == [5, 6]
  assert sampler.cut_at_stop([5, 6], [1]) == [5, 6]


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_preset_json(capsys):
  argv = ["--preset", "tiny", "--seed", "0", "--prompt_ids", "10,11,12", "--gen_length", "16",
          "--steps", "8", "--block_length", "8", "--temperature", "0", "--json"]
  result = generate_cli.main(argv)
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed == result
  assert printed["prompt_ids"] == [10, 11, 12] and len(printed["completion_ids"]) == 16
  # Same as the library on the same model.
  cfg = llada.get_config("tiny", vocab=CharTokenizer())
  c = sampler.SamplerConfig(gen_length=16, steps=8, block_length=8,
                            mask_token_id=cfg.mask_token_id)
  r = sampler.generate_with_model(llada.init_model(cfg, 0), np.array([[10, 11, 12]], np.int32),
                                  np.ones((1, 3), bool), jax.random.key(0), c)
  assert printed["completion_ids"] == np.asarray(r.tokens[0]).tolist()
  assert isinstance(printed["text"], str)


@pytest.mark.parametrize("extra, message", [
    (["--prompt_ids", "10,11", "--gen_length", "256", "--block_length", "32", "--steps", "8"],
     "max_sequence_length"),
    (["--prompt_ids", "10,11", "--gen_length", "20", "--block_length", "8", "--steps", "4"],
     "gen_length"),
    (["--prompt_ids", "10,x"], "comma-separated"),
    (["--prompt_ids", "10,100000"], "outside the vocabulary"),
])
def test_cli_errors(capsys, extra, message):
  with pytest.raises(SystemExit):
    generate_cli.main(["--preset", "tiny"] + extra)
  assert message in capsys.readouterr().err


def test_cli_unknown_preset(capsys):
  with pytest.raises(SystemExit):
    generate_cli.main(["--preset", "nope", "--prompt_ids", "1"])
  assert "unknown model preset" in capsys.readouterr().err


def test_scanned_remat_model_and_closure_api_match(setup):
  """A scanned + rematerialised layer stack with the same weights samples the same completions,
  and the closure API `generate(model_logits_fn(model, G), ...)` equals `generate_with_model`."""
  cfg, model, c = setup["cfg"], setup["model"], setup["config"]
  scanned = llada.init_model(cfg.replace(scan_layers=True, remat=True), 1)
  for name in ("attn_norm", "ff_norm"):
    getattr(scanned.blocks, name).weight[...] = jnp.stack(
        [getattr(b, name).weight[...] for b in model.blocks])
  for name in ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"):
    getattr(scanned.blocks, name).kernel[...] = jnp.stack(
        [getattr(b, name).kernel[...] for b in model.blocks])
  scanned.wte.embedding[...] = model.wte.embedding[...]
  scanned.ln_f.weight[...] = model.ln_f.weight[...]
  scanned.ff_out.kernel[...] = model.ff_out.kernel[...]
  r = sampler.generate_with_model(scanned, setup["ids"], setup["mask"], jax.random.key(0), c)
  np.testing.assert_array_equal(np.asarray(r.tokens), setup["rollout"].tokens)
  np.testing.assert_array_equal(np.asarray(r.commit_step), setup["rollout"].commit_step)

  fn = sampler.model_logits_fn(model, GEN)
  r2 = jax.jit(lambda i, m, k: sampler.generate(fn, i, m, k, c))(setup["ids"], setup["mask"],
                                                                 jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(r2.tokens), setup["rollout"].tokens)
  np.testing.assert_allclose(np.asarray(r2.logprob), setup["rollout"].logprob, atol=1e-6)


def test_cli_checkpoint_and_text_prompt(tmp_path, capsys):
  """--checkpoint (an HF-layout export of the tiny preset, with its char tokenizer) and --prompt
  give the same completion as the same randomly initialised preset."""
  from egspo.model import export_hf

  export_hf(llada.init_model(llada.get_config("tiny", vocab=CharTokenizer()), 4),
            tmp_path / "ckpt", tokenizer=CharTokenizer())
  common = ["--prompt", "Hi!", "--gen_length", "16", "--steps", "4", "--block_length", "8",
            "--json"]
  from_ckpt = generate_cli.main(["--checkpoint", str(tmp_path / "ckpt")] + common)
  from_preset = generate_cli.main(["--preset", "tiny", "--seed", "4"] + common)
  capsys.readouterr()
  assert from_ckpt["prompt_ids"] == CharTokenizer().encode("Hi!")
  assert from_ckpt == from_preset
