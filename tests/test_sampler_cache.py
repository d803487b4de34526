"""Tests of the block K/V cache and the LM head on needed positions (egspo/diffusion/cache.py,
`LLaDA.hidden_states_kv`, the dispatch in egspo/diffusion/sampler.py).

What is exact, and so asserted exactly: `none` without x̂0 (the LM head on the block only) equals
today's sampler; one step per block makes every step a full forward, so `prefix` and `dual`
equal `none` at any depth; in a one-layer model every position's keys and values depend on its
own token only, so the cached modes equal `none` for any block length (a block as long as the
generation included). Deeper models with several steps per block sample from an approximation
μ: there the record is checked against a recomputation of the cached forward by hand.
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from egspo import config as config_lib
from egspo import generate as generate_cli
from egspo.diffusion import cache
from egspo.diffusion import rollout as rollout_lib
from egspo.diffusion import sampler
from egspo.model import llada
from egspo.tokenizer import CharTokenizer

PROMPTS = [[20, 21, 22, 23, 24, 25], [40, 41, 42], [60]]  # left-padded to P = 6
P, GEN, BLOCK, STEPS = 6, 16, 8, 6  # 2 blocks, 3 steps per block (counts 3, 3, 2)
SAMPLING = [dict(), dict(temperature=0.7), dict(temperature=0.5, remasking="random")]
FIELDS = ("tokens", "commit_step", "logprob", "entropy", "step_entropy")


def _pad(prompts, pad_id):
  ids = np.full((len(prompts), P), pad_id, np.int32)
  for i, p in enumerate(prompts):
    ids[i, P - len(p):] = p
  return ids, ids != pad_id


def _model(n_layers=2, scan=False, **kw):
  """The tiny preset, random weights with peaked distributions (a scaled LM head)."""
  cfg = llada.get_config("tiny", vocab=CharTokenizer(), n_layers=n_layers, scan_layers=scan, **kw)
  model = llada.init_model(cfg, 3)
  model.ff_out.kernel[...] = model.ff_out.kernel[...] * 8.0
  return model


@pytest.fixture(scope="module")
def deep():
  return _model(2)


def _config(model, **kw):
  base = dict(gen_length=GEN, steps=STEPS, block_length=BLOCK,
              mask_token_id=model.cfg.mask_token_id)
  return sampler.SamplerConfig(**{**base, **kw})


def _run(model, config, prompts=PROMPTS, key=4, states=False):
  ids, mask = _pad(prompts, model.cfg.pad_token_id)
  out = sampler.generate_with_model(model, ids, mask, jax.random.key(key), config,
                                    return_states=states)
  return jax.tree.map(np.asarray, out)


def _assert_same(a, b, fields=FIELDS):
  for f in fields:
    np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)


def _check_schedule(r, config):
  """Every position committed once, in its own block, with the schedule's count at each step."""
  counts, blocks = sampler.commit_schedule(config), sampler.step_blocks(config)
  for t in range(config.steps):
    np.testing.assert_array_equal((r.commit_step == t).sum(1), counts[t], err_msg=f"step {t}")
  np.testing.assert_array_equal(blocks[r.commit_step],
                                np.broadcast_to(np.arange(GEN) // BLOCK, r.tokens.shape))
  assert (r.tokens != config.mask_token_id).all()


# ---------------------------------------------------------------------------------------------
# Exact cases


@pytest.mark.parametrize("kw", SAMPLING, ids=["greedy", "tau0.7", "random"])
def test_none_with_head_on_block_equals_todays_sampler(deep, kw):
  """record_x0_hat=False runs the block loop with the LM head on the block only: the same
  tokens, commit steps, log-probs and entropies, bit for bit, as today's sampler."""
  today = _run(deep, _config(deep, **kw))
  assert today.x0_hat.shape == (3, STEPS, GEN)
  lean = _run(deep, _config(deep, record_x0_hat=False, **kw))
  assert lean.x0_hat is None
  _assert_same(lean, today)
  # The generic logits_fn path (today's code, untouched) is what `cache='none'` runs.
  fn = sampler.model_logits_fn(deep, GEN)
  ids, mask = _pad(PROMPTS, deep.cfg.pad_token_id)
  generic = jax.tree.map(np.asarray, jax.jit(
      lambda i, m, k: sampler.generate(fn, i, m, k, _config(deep, **kw)))(ids, mask,
                                                                          jax.random.key(4)))
  _assert_same(generic, today, FIELDS + ("x0_hat",))


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_one_step_per_block_equals_none(mode, scan):
  """Every step is a block start (a full forward): the caches change nothing, at any depth."""
  model = _model(2, scan)
  ref = _run(model, _config(model, steps=2))
  _assert_same(_run(model, _config(model, steps=2, cache=mode)), ref, FIELDS + ("x0_hat",))


@pytest.mark.parametrize("kw", SAMPLING, ids=["greedy", "tau0.7", "random"])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_one_layer_cache_is_exact(mode, kw):
  """One layer: cached keys/values of unchanged tokens are exact, so the completions equal
  `none`'s for several blocks and for one block as long as the generation."""
  model = _model(1)
  for shape in (dict(), dict(block_length=GEN, steps=8)):
    ref = _run(model, _config(model, **shape, **kw))
    got = _run(model, _config(model, cache=mode, **shape, **kw))
    _assert_same(got, ref, ("tokens", "commit_step"))
    for f in ("logprob", "entropy", "step_entropy"):
      np.testing.assert_allclose(getattr(got, f), getattr(ref, f), atol=1e-5, err_msg=f)
    if mode == "prefix":  # every masked position is in the window: x̂0 is fresh
      np.testing.assert_array_equal(got.x0_hat, ref.x0_hat)


# ---------------------------------------------------------------------------------------------
# The model's cached forward


@pytest.mark.parametrize("impl", ["xla", "head_major"])
@pytest.mark.parametrize("scan", [False, True])
def test_hidden_states_kv_matches_the_full_forward(scan, impl):
  """kv=None is `hidden_states` (and returns the canvas' keys/values, in the kernel's layout); a
  window against keys and values of the same canvas gives the full forward's hidden states
  there, left padding included, and writes its own keys/values over whatever the cache held."""
  model = _model(2, scan, attention_impl=impl)
  ids, pmask = _pad(PROMPTS, model.cfg.pad_token_id)
  comp = np.asarray(jax.random.randint(jax.random.key(1), (3, GEN), 3, 100), np.int32)
  ids = jnp.asarray(np.concatenate([ids, comp], 1))
  mask = jnp.asarray(np.concatenate([pmask, np.ones((3, GEN), bool)], 1))
  pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  full = nnx.jit(lambda m: m.hidden_states(ids, mask))(model)
  hid, kv = nnx.jit(lambda m: m.hidden_states_kv(ids, pos, mask))(model)
  np.testing.assert_allclose(np.asarray(hid), np.asarray(full), atol=2e-5)  # fusion may differ
  heads, hd = model.cfg.n_kv_heads, model.cfg.head_dim
  want_shapes = (((2, 3, heads, hd, P + GEN), (2, 3, heads, P + GEN, hd)) if impl == "head_major"
                 else ((2, 3, P + GEN, heads, hd),) * 2)
  assert (kv[0].shape, kv[1].shape) == want_shapes
  assert model.kv_position_axes == ((4, 3) if impl == "head_major" else (2, 2))
  for start, width in ((P, BLOCK), (P + BLOCK, BLOCK), (P + 3, GEN - 3)):
    stale = tuple(  # 7.0 at the window's positions: overwritten, never read
        jax.lax.dynamic_update_slice_in_dim(
            a, jnp.full_like(jax.lax.slice_in_dim(a, start, start + width, axis=ax), 7.0), start,
            axis=ax) for a, ax in zip(kv, model.kv_position_axes))
    win, new = nnx.jit(lambda m: m.hidden_states_kv(
        ids[:, start:start + width], pos[:, start:start + width], mask, stale, start))(model)
    np.testing.assert_allclose(np.asarray(win), np.asarray(full)[:, start:start + width],
                               atol=2e-5)
    np.testing.assert_allclose(np.asarray(new[0]), np.asarray(kv[0]), atol=2e-5)
    np.testing.assert_allclose(np.asarray(new[1]), np.asarray(kv[1]), atol=2e-5)


@pytest.mark.parametrize("steps,refresh", [(STEPS, 0), (8, 2)], ids=["block_start", "every2"])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_record_equals_the_cached_forward_by_hand(deep, mode, steps, refresh):
  """Two layers, three (four) steps per block: the cached rollout differs from `none` (μ ≠ π),
  and its log-probs, entropies and commits equal a by-hand recomputation: keys/values from a full
  forward on the state x_{t0} of the last refresh (the block start; with `cache_refresh` 2 every
  second step), the window (prefix: block + rest, dual: block) on x_t."""
  config = _config(deep, cache=mode, steps=steps, cache_refresh=refresh)
  r, states = _run(deep, config, states=True)
  _check_schedule(r, config)
  spb, spr = steps // 2, refresh or steps // 2
  ids, pmask = _pad(PROMPTS, deep.cfg.pad_token_id)
  mask = jnp.asarray(np.concatenate([pmask, np.ones((3, GEN), bool)], 1))
  pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  canvas = lambda t: jnp.asarray(np.concatenate([ids, states[:, t]], 1))
  for t in range(steps):
    t0 = t - t % spr
    blk = P + (t // spb) * BLOCK
    hid, kv = deep.hidden_states_kv(canvas(t0), pos, mask)
    if t != t0:
      end = P + GEN if mode == "prefix" else blk + BLOCK
      hid, _ = deep.hidden_states_kv(canvas(t)[:, blk:end], pos[:, blk:end], mask, kv, blk)
      hid = jnp.pad(hid, [(0, 0), (blk, P + GEN - end), (0, 0)])
    logp = np.array(jax.nn.log_softmax(deep.logits(hid[:, P:])))  # [B, G, V]
    act = r.commit_step == t
    b, g = np.nonzero(act)
    np.testing.assert_allclose(r.logprob[act], logp[b, g, r.tokens[act]], atol=1e-5)
    p = np.exp(logp[b, g])
    np.testing.assert_allclose(r.entropy[act], -(p * np.log(p + 1e-8)).sum(-1), atol=1e-5)
    # Greedy: each committed token is the window's argmax (mask token excluded).
    logp[..., deep.cfg.mask_token_id] = -np.inf
    np.testing.assert_array_equal(r.tokens[act], logp[b, g].argmax(-1))
  assert not np.array_equal(r.logprob, _run(deep, _config(deep, steps=steps)).logprob)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cache_refresh_bounds(deep, mode):
  """cache_refresh = steps per block is the default (the block start only); 1 refills the cache
  at every step, so the cached modes equal `none` at any depth."""
  base = _run(deep, _config(deep, cache=mode))
  _assert_same(_run(deep, _config(deep, cache=mode, cache_refresh=STEPS // 2)), base,
               FIELDS + ("x0_hat",))
  ref = _run(deep, _config(deep))
  _assert_same(_run(deep, _config(deep, cache=mode, cache_refresh=1)), ref, FIELDS + ("x0_hat",))
  assert _config(deep, cache=mode).steps_per_refresh == STEPS // 2


# ---------------------------------------------------------------------------------------------
# Shapes, batches, jit, the LM head


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_padded_batch_equals_each_prompt_alone_under_one_compile(deep, mode):
  config = _config(deep, cache=mode, temperature=0.0)
  r = _run(deep, config)
  for i, p in enumerate(PROMPTS):
    alone = sampler.generate_with_model(deep, np.array([p], np.int32), np.ones((1, len(p)), bool),
                                        jax.random.key(4), config)
    np.testing.assert_array_equal(np.asarray(alone.tokens[0]), r.tokens[i])
    np.testing.assert_array_equal(np.asarray(alone.commit_step[0]), r.commit_step[i])
    np.testing.assert_allclose(np.asarray(alone.logprob[0]), r.logprob[i], atol=1e-5)
  # Other prompts of the same shape reuse the compiled program (static shapes).
  before = sampler._generate_jit._cache_size()  # pylint: disable=protected-access
  _run(deep, config, prompts=[[30, 31], [50], [70, 71, 72, 73]], key=9)
  assert sampler._generate_jit._cache_size() == before  # pylint: disable=protected-access


def _scan_lengths(jaxpr):
  """Lengths of the scans in a jaxpr, outermost first (depth-first)."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "scan":
      out.append(eqn.params["length"])
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out += _scan_lengths(sub)
  return out


def _head_rows(jaxpr, d, vocab):
  """Row shapes [B, L] of every matmul against the LM head's [D, vocab] kernel."""
  out = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general" and eqn.invars[1].aval.shape == (d, vocab):
      out.add(tuple(eqn.invars[0].aval.shape[:-1]))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out |= _head_rows(sub, d, vocab)
  return out


@pytest.mark.parametrize("mode,record,rows", [
    ("none", True, {GEN}), ("none", False, {BLOCK}),
    ("prefix", True, {GEN, GEN - BLOCK}), ("prefix", False, {BLOCK}),
    ("dual", True, {GEN, BLOCK}), ("dual", False, {BLOCK})])
def test_lm_head_runs_only_on_needed_positions(deep, mode, record, rows):
  """The traced program: a scan over blocks (prefix: one program per block, its window
  shrinking) of scans over refresh groups (one per block by default) of scans over steps, and
  the LM head only on the block (without x̂0), the completion (none, block starts) or the window
  (prefix: block + rest, G − j · block_length)."""
  config = _config(deep, cache=mode, record_x0_hat=record)
  ids, mask = _pad(PROMPTS, deep.cfg.pad_token_id)
  graphdef, state = nnx.split(deep)
  jaxpr = jax.make_jaxpr(lambda s: sampler.generate_from_state(
      graphdef, s, ids, mask, jax.random.key(0), config))(state).jaxpr
  d, vocab = deep.cfg.d_model, deep.cfg.embedding_size
  assert vocab not in (d, deep.cfg.mlp_hidden_size)  # the head's kernel is unambiguous
  assert _head_rows(jaxpr, d, vocab) == {(3, n) for n in rows}
  lengths = _scan_lengths(jaxpr)
  want = {"prefix": [1, 2] * (GEN // BLOCK)}.get(mode, [2, 1, 2])
  assert lengths[:len(want)] == ([STEPS] if mode == "none" and record else want)[:len(want)]


def test_head_on_block_gives_identical_logits(deep):
  ids = jnp.asarray(np.random.default_rng(0).integers(3, 100, (2, P + GEN)), jnp.int32)
  hid = deep.hidden_states(ids)
  every = np.asarray(deep.logits(hid[:, P:]))
  for start in (0, BLOCK):
    blk = np.asarray(deep.logits(hid[:, P + start:P + start + BLOCK]))
    np.testing.assert_array_equal(blk, every[:, start:start + BLOCK])


def test_cached_record_fields_and_rebuilt_states(deep):
  """The cached rollout records what RL reads: x_t rebuilt from (tokens, commit_step) is the
  state each step saw; x̂0 keeps committed tokens and agrees with greedy commits."""
  config = _config(deep, cache="dual")
  r, states = _run(deep, config, states=True)
  assert r.x0_hat.shape == (3, STEPS, GEN) and r.step_entropy.shape == (3, STEPS)
  for t in range(STEPS):
    np.testing.assert_array_equal(
        np.asarray(rollout_lib.completion_at(r.tokens, r.commit_step, t, config.mask_token_id)),
        states[:, t])
    kept = states[:, t] != config.mask_token_id
    np.testing.assert_array_equal(r.x0_hat[:, t][kept], states[:, t][kept])
    act = r.commit_step == t
    np.testing.assert_array_equal(r.x0_hat[:, t][act], r.tokens[act])
    np.testing.assert_allclose(r.step_entropy[:, t], (r.entropy * act).sum(1) / act.sum(1),
                               atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Configuration and entry points


def test_bad_cache_values_and_the_logits_fn_path(deep):
  with pytest.raises(sampler.SamplerConfigError, match=r"SamplerConfig.cache='full': must be one"):
    _config(deep, cache="full")
  with pytest.raises(sampler.SamplerConfigError, match=r"record_x0_hat"):
    _config(deep, record_x0_hat="yes")
  with pytest.raises(sampler.SamplerConfigError, match=r"cache_refresh=2: needs cache='prefix'"):
    _config(deep, cache_refresh=2)
  with pytest.raises(sampler.SamplerConfigError, match=r"cache_refresh=2: must divide the 3 steps"):
    _config(deep, cache="dual", cache_refresh=2)
  for bad in (-1, 1.5, True):
    with pytest.raises(sampler.SamplerConfigError, match=r"cache_refresh=.*must be an integer"):
      _config(deep, cache="dual", cache_refresh=bad)
  with pytest.raises(ValueError, match="needs the model, not a logits_fn"):
    sampler.generate(lambda i, m: None, *_pad(PROMPTS, 0), jax.random.key(0),
                     _config(deep, cache="dual"))
  # prefix: the block and every later position (Fast-dLLM's window); dual: the block.
  prefix, dual = _config(deep, cache="prefix"), _config(deep, cache="dual")
  assert [cache.window_length(prefix, j) for j in range(GEN // BLOCK)] == [
      GEN - j * BLOCK for j in range(GEN // BLOCK)]
  assert [cache.window_length(dual, j) for j in range(GEN // BLOCK)] == [BLOCK] * (GEN // BLOCK)


@pytest.mark.parametrize("section", ["rollout", "eval"])
def test_config_fields(section):
  c = config_lib.base_config("countdown", "tiny")
  assert c[section].cache == "none"
  config_lib.validate(c)
  c[section].cache = "dual"
  config_lib.validate(c)
  c[section].cache_refresh = 4  # the :tiny 8 steps in one block
  config_lib.validate(c)
  c[section].cache_refresh = 3
  with pytest.raises(config_lib.ConfigError,
                     match=rf"^bad config field {section}\.cache_refresh=3: must divide the 8"):
    config_lib.validate(c)
  c[section].cache_refresh = 0
  c[section].cache = "kv"
  with pytest.raises(config_lib.ConfigError, match=rf"^bad config field {section}\.cache='kv'"):
    config_lib.validate(c)


def test_generate_cli_cache_flag(capsys):
  args = ["--preset", "tiny", "--prompt_ids", "20,21,22", "--gen_length", "16", "--steps", "8",
          "--block_length", "8", "--json"]
  outs = {}
  for mode in ("none", "prefix", "dual"):
    outs[mode] = generate_cli.main(args + ["--cache", mode])
    assert len(outs[mode]["completion_ids"]) == 16
  capsys.readouterr()
  with pytest.raises(SystemExit):
    generate_cli.main(args + ["--cache", "full"])
  assert "invalid choice: 'full'" in capsys.readouterr().err
  out = generate_cli.main(args + ["--cache", "dual", "--cache_refresh", "1"])
  assert out["completion_ids"] == outs["none"]["completion_ids"]  # refilled at every step
  capsys.readouterr()
  with pytest.raises(SystemExit):
    generate_cli.main(args + ["--cache", "dual", "--cache_refresh", "3"])
  assert "cache_refresh=3: must divide the 4 steps per block" in capsys.readouterr().err


def test_eval_cli_checks_the_sampler_before_loading(capsys):
  """A bad --cache_refresh (or --gen_lengths value) is one line before any model is built."""
  from egspo import eval as eval_cli  # pylint: disable=import-outside-toplevel
  with pytest.raises(SystemExit):
    eval_cli.main(["--task", "countdown", "--checkpoint", "/nonexistent", "--gen_lengths", "16",
                   "--block_length", "16", "--cache", "dual", "--cache_refresh", "3"])
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.endswith("--gen_lengths 16: --cache_refresh=3: must divide the 8 steps per block "
                      "(steps / (gen_length/block_length))")


def test_sampler_benchmark_smallest():
  """benchmarks/sampler.py at a tiny shape: every mode reported, consistent analytic FLOPs
  (dual < prefix < none < the reference loop's, whose LM head covers the whole canvas), greedy
  `none` equal to the PyTorch loop. Times are printed, not asserted."""
  import json
  import os
  import subprocess
  import sys

  from conftest import REPO_ROOT

  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / "sampler.py"), "--preset", "tiny",
         "--batch", "2", "--prompt_length", "8", "--gen_length", "16", "--steps", "8",
         "--block_length", "8", "--runs", "1", "--matmul_n", "128"]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(next(line for line in out.stdout.splitlines()
                      if line.startswith("RESULT "))[len("RESULT "):])
  modes = r["modes"]
  assert sorted(modes) == ["dual", "none", "prefix"]
  assert all(m["tokens_per_s"] > 0 and m["gflops"] > 0 for m in modes.values())
  assert modes["dual"]["gflop"] < modes["prefix"]["gflop"] < modes["none"]["gflop"]
  assert modes["none"]["gflop"] < r["torch"]["gflop"]
  assert modes["none"]["token_agreement_with_none"] == 1.0
  assert r["greedy_none_equals_torch"] is True
