"""LoRA (egspo.model.lora): zero-init identity, merge equivalence, LoRA-only gradients, counts,
target sets (the 8B default adapts no LM head; 'reference' is what the release's PEFT targets
match), dropout in training forwards only, scanned stacks and sharding metadata."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from egspo import config as config_lib
from egspo import sharding
from egspo.model import checkpoint_spec, llada, lora

ALL7 = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")


def small_config(**kw):
  base = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=48, vocab_size=50,
              embedding_size=52, mask_token_id=49, eos_token_id=1, pad_token_id=0,
              rope_theta=10000.0, max_sequence_length=64)
  base.update(kw)
  return llada.ModelConfig(**base)


def fwd(model, ids, mask=None):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m))(state, ids, mask)


def perturb_b(model, seed=0, scale=0.3):
  """Random B factors (after training B is no longer zero); numpy draws keep the test fast."""
  rng = np.random.default_rng(seed)
  for _, m in sorted(lora.lora_modules(model).items()):
    b = m.lora_b[...]
    m.lora_b.set_value(jnp.asarray(scale * rng.standard_normal(b.shape), b.dtype))


@pytest.fixture(scope="module")
def bases():
  """Base models (list of blocks and scanned stack), initialised once and cloned by the tests."""
  return {scan: llada.init_model(small_config(scan_layers=scan), seed=1) for scan in (False, True)}


IDS = jnp.asarray(np.random.default_rng(0).integers(2, 50, (2, 9)), jnp.int32)
MASK = jnp.asarray([[1] * 9, [0] * 3 + [1] * 6], jnp.int32)


@pytest.mark.parametrize("scan", [False, True])
def test_zero_init_identity_and_merge(scan, bases):
  cfg = small_config(scan_layers=scan)
  model = nnx.clone(bases[scan])
  base_logits = np.asarray(fwd(model, IDS, MASK))
  lora.apply_lora(model, rank=4, alpha=8.0, targets="all_linear", rngs=nnx.Rngs(3))
  mods = lora.lora_modules(model)
  want = {f"blocks.{n}" if scan else f"blocks.{i}.{n}" for n in ALL7
          for i in range(cfg.n_layers)}
  assert set(mods) == want  # every block projection; not the LM head `ff_out`
  m = mods["blocks.q_proj" if scan else "blocks.1.q_proj"]
  assert m.scale == 2.0
  assert m.lora_a[...].shape == ((2,) if scan else ()) + (32, 4)
  assert m.lora_b[...].shape == ((2,) if scan else ()) + (4, 32)
  assert float(jnp.abs(m.lora_a[...]).max()) > 0.1 and float(jnp.abs(m.lora_b[...]).max()) == 0
  # B = 0: the adapted model is exactly the base model.
  np.testing.assert_allclose(fwd(model, IDS, MASK), base_logits, atol=1e-6, rtol=0)

  perturb_b(model)
  adapted = np.asarray(fwd(model, IDS, MASK))
  assert np.abs(adapted - base_logits).max() > 1e-2
  merged = lora.merge_lora(model)
  assert type(merged) is llada.LLaDA and not lora.lora_modules(merged)
  assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
  # Same parameter paths and shapes as a freshly built model: exportable as is.
  fresh = nnx.state(bases[scan], nnx.Param)
  chex.assert_trees_all_equal_shapes(nnx.state(merged, nnx.Param), fresh)
  np.testing.assert_allclose(fwd(merged, IDS, MASK), adapted, atol=1e-5, rtol=0)
  # Hand check of one merged kernel: W + (alpha/r) A B.
  mk = merged.blocks.q_proj.kernel[...] if scan else merged.blocks[1].q_proj.kernel[...]
  want_k = m.kernel[...] + 2.0 * jnp.einsum("...ir,...ro->...io", m.lora_a[...], m.lora_b[...])
  np.testing.assert_allclose(mk, want_k, atol=1e-6, rtol=0)
  # merge_lora leaves the LoRA model as it was.
  np.testing.assert_allclose(fwd(model, IDS, MASK), adapted, atol=0, rtol=0)


@pytest.mark.parametrize("scan", [False, True])
def test_only_lora_params_get_gradients_and_train(scan, bases):
  if scan:  # the scanned stack with remat (the memory-saving layout for large models)
    cfg = small_config(scan_layers=True, remat=True)
    model = nnx.eval_shape(lambda: llada.LLaDA(cfg, rngs=nnx.Rngs(0)))
    nnx.update(model, nnx.state(bases[True]))
  else:
    model = nnx.clone(bases[False])
  lora.apply_lora(model, rank=4, alpha=2.0, targets="all_linear", rngs=nnx.Rngs(0))
  targets = jnp.asarray(np.random.default_rng(1).integers(0, 50, IDS.shape), jnp.int32)

  def loss_fn(model):
    logp = jax.nn.log_softmax(model(IDS, MASK))
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))

  base_before = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
  base_before = jax.tree.map(np.asarray, base_before)
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

  @nnx.jit
  def train_step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)
    return loss, grads

  loss, grads = train_step(model, optimizer)
  # At B = 0 the gradient w.r.t. A is exactly zero (dL/dA = xᵀ (dL/dy) Bᵀ) and w.r.t. B is not;
  # the frozen base weights get no gradient at all.
  flat = {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(grads)}
  assert set(flat) == {f"{k}.{n}" for k in lora.lora_modules(model) for n in ("lora_a", "lora_b")}
  v = "blocks.v_proj" if scan else "blocks.0.v_proj"
  assert float(jnp.abs(flat[v + ".lora_a"]).max()) == 0.0
  assert float(jnp.abs(flat[v + ".lora_b"]).max()) > 1e-6
  losses = [float(loss)] + [float(train_step(model, optimizer)[0]) for _ in range(4)]
  assert losses[-1] < losses[0]
  base_after = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
  chex.assert_trees_all_equal(base_before, base_after)  # the base weights are frozen
  ff_out = lora.lora_modules(model)["blocks.ff_out" if scan else "blocks.1.ff_out"]
  assert float(jnp.abs(ff_out.lora_b[...]).max()) > 1e-3


def test_parameter_counts_and_target_selection(bases):
  cfg = small_config()
  model = nnx.clone(bases[False])
  n_base = cfg.num_params()
  lora.apply_lora(model, rank=4, alpha=6.0, targets="all_linear")
  # Σ over the 7 projections of r·(in + out), per layer: q 32+32, k 32+16, v 32+16, attn_out
  # 32+32, ff_proj 32+48, up_proj 32+48, ff_out 48+32 = 464.
  assert lora.num_lora_params(model) == 4 * 464 * cfg.n_layers == 3712
  n_all = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n_all == n_base + 3712  # LoRAParam is a Param subclass; the base count is unchanged

  only_qv = lora.apply_lora(nnx.clone(bases[False]), rank=4, alpha=2.0, targets="re:(q|v)_proj$")
  assert sorted(lora.lora_modules(only_qv)) == ["blocks.0.q_proj", "blocks.0.v_proj",
                                                 "blocks.1.q_proj", "blocks.1.v_proj"]
  assert lora.num_lora_params(only_qv) == 4 * (64 + 48) * 2
  # The default set (the release's four): q 32+32, k 32+16, v 32+16, up_proj 32+48 = 240.
  ref = lora.apply_lora(nnx.clone(bases[False]), rank=4, alpha=2.0)
  assert lora.num_lora_params(ref) == 4 * 240 * 2
  # Only a raw regex reaches the LM head; it keeps its float32 output under bf16 compute.
  abstract = nnx.eval_shape(lambda: llada.LLaDA(cfg.replace(dtype="bfloat16"), rngs=nnx.Rngs(0)))
  nnx.update(abstract, nnx.state(bases[False]))
  head = lora.apply_lora(abstract, rank=4, alpha=2.0, targets="re:^ff_out$")
  assert list(lora.lora_modules(head)) == ["ff_out"]
  assert lora.num_lora_params(head) == 4 * (32 + 52)
  assert nnx.eval_shape(lambda m: m(IDS), head).dtype == jnp.float32

  with pytest.raises(ValueError, match="match no projection"):
    lora.apply_lora(nnx.clone(bases[False]), rank=4, alpha=2.0, targets="re:nothing_here")
  with pytest.raises(ValueError, match=r"unknown projection\(s\) \['lm_head'\]; allowed: a set"):
    lora.apply_lora(nnx.clone(bases[False]), rank=4, alpha=2.0, targets="q_proj|lm_head")
  with pytest.raises(ValueError, match="dropout must be in"):
    lora.apply_lora(nnx.clone(bases[False]), rank=4, alpha=2.0, dropout=1.0)
  with pytest.raises(ValueError, match="rank must be a positive integer"):
    lora.apply_lora(nnx.clone(bases[False]), rank=0, alpha=2.0)
  with pytest.raises(ValueError, match="alpha must be positive"):
    lora.apply_lora(nnx.clone(bases[False]), rank=4, alpha=0.0)
  with pytest.raises(ValueError, match="already has LoRA adapters"):
    lora.apply_lora(model, rank=2, alpha=2.0)


@pytest.mark.parametrize("scan", [False, True])
def test_lora_params_carry_logical_axes_and_shard(scan, bases):
  model = nnx.clone(bases[scan])
  lora.apply_lora(model, rank=4, alpha=4.0, targets="all_linear")
  m = lora.lora_modules(model)["blocks.ff_out" if scan else "blocks.0.ff_out"]
  assert m.lora_a.get_metadata()["logical_axes"] == ("mlp", "lora_rank")
  assert m.lora_b.get_metadata()["logical_axes"] == ("lora_rank", "embed")
  mesh = sharding.make_mesh(2, 2, 2)
  sharding.shard_model(model, mesh)
  lead = (None,) if scan else ()
  assert m.lora_a[...].sharding.spec == P(*lead, "tensor")
  assert m.lora_b[...].sharding.spec == P(*lead, None, "fsdp")
  assert m.kernel[...].sharding.spec == P(*lead, "tensor", "fsdp")


# ----------------------------------------------------------------------------------------------
# Target sets: one definition for training, export and the memory plan.

# The released trainer's PEFT `target_modules` (egspo_train.py): LLaMA's projection names.
RELEASE_PEFT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj",
                        "gate_proj")


def _peft_matches(module_name: str, targets) -> bool:
  """PEFT's rule for a list of names: the module's name is one, or ends in '.' + one."""
  return any(module_name == t or module_name.endswith("." + t) for t in targets)


def test_reference_set_is_what_the_release_adapts_in_llada(bases):
  cfg = small_config()
  prefix = "model.transformer."
  linear = [s.hf_name.removesuffix(".weight") for s in checkpoint_spec.tensor_specs(cfg)
            if s.transpose]  # the projections ([out, in] weights), the LM head among them
  released = {n.removeprefix(prefix) for n in linear if _peft_matches(n, RELEASE_PEFT_TARGETS)}
  assert {p.rsplit(".", 1)[-1] for p in released} == {"q_proj", "k_proj", "v_proj", "up_proj"}
  model = lora.apply_lora(nnx.clone(bases[False]), rank=2, alpha=2.0, targets="reference")
  assert set(lora.lora_modules(model)) == released


@pytest.mark.parametrize("scan", [True, False])
def test_default_8b_config_adapts_no_lm_head(scan):
  """The 8B default config, shapes only (nnx.eval_shape: nothing allocated): the adapters of
  `trainer.build_model`'s apply_lora call are the reference set in every block, never the head."""
  c = config_lib.base_config("countdown")
  cfg = llada.get_config(c.model.preset, scan_layers=scan)

  def adapted(targets):
    def build():
      model = llada.LLaDA(cfg, rngs=nnx.Rngs(0))
      return lora.apply_lora(model, rank=c.lora.rank, alpha=c.lora.alpha, targets=targets,
                             dropout=c.lora.dropout)
    return set(lora.lora_modules(nnx.eval_shape(build)))

  layers = [""] if scan else [f"{i}." for i in range(cfg.n_layers)]
  assert c.lora.enabled and c.lora.targets == lora.DEFAULT_TARGETS == "reference"
  assert c.lora.dropout == 0.05
  assert adapted(c.lora.targets) == {f"blocks.{l}{n}" for l in layers
                                     for n in lora.TARGET_SETS["reference"]}
  # The former default (seven names searched anywhere in the path) also adapted the 126,464-wide
  # head `ff_out`; names now match inside the blocks only.
  legacy = adapted("q_proj|k_proj|v_proj|attn_out|ff_proj|up_proj|ff_out")
  assert "ff_out" not in legacy and len(legacy) == 7 * len(layers)
  assert adapted("all_linear") == legacy


def test_target_specs():
  pat = lora.target_pattern
  assert all(lora.is_target(p, "all_linear") for p in ("blocks.0.ff_out", "blocks.ff_out"))
  assert not lora.is_target("ff_out", "all_linear") and not lora.is_target("ff_out", "ff_out")
  assert not lora.is_target("blocks.0.ff_out", "reference")
  assert pat("q_proj, v_proj").pattern == pat("q_proj|v_proj").pattern
  assert lora.is_target("ff_out", "re:^ff_out$") and lora.targets_error("re:^ff_out$") is None
  for bad, why in [("", "non-empty"), ("re:", "empty regular"), ("re:(", "bad regular"),
                   ("lm_head", "unknown projection"), ("q_proj|", "unknown projection"),
                   (None, "non-empty")]:
    assert why in lora.targets_error(bad), bad
    with pytest.raises(ValueError, match=re.escape(f"LoRA targets {bad!r}: ") + ".*" + why):
      pat(bad)


# ----------------------------------------------------------------------------------------------
# Dropout: on the adapter's input, in a forward given keys (the update step's) only.


def test_dropout_by_hand():
  base = nnx.Linear(6, 5, use_bias=False, rngs=nnx.Rngs(0))
  m = lora.LoRALinear(base, rank=3, alpha=6.0, rngs=nnx.Rngs(1), dropout=0.4)
  m.lora_b.set_value(jax.random.normal(jax.random.key(2), (3, 5)))
  x = np.asarray(jax.random.normal(jax.random.key(3), (4, 50, 6)))
  w, a, b = (np.asarray(v[...]) for v in (m.kernel, m.lora_a, m.lora_b))
  np.testing.assert_allclose(m(x), x @ w + 2.0 * (x @ a) @ b, rtol=1e-5, atol=1e-5)
  key = jax.random.key(7)
  lora.enable_dropout(m, key)  # the only adapter: index 0
  keep = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, 0), 0.6, x.shape))
  assert 0.35 < 1 - keep.mean() < 0.45
  dropped = np.where(keep, x / 0.6, 0.0)
  np.testing.assert_allclose(m(x), x @ w + 2.0 * (dropped @ a) @ b, rtol=1e-5, atol=1e-5)


def _keyed_forward(graphdef):
  @jax.jit
  def forward(state, key):
    m = nnx.merge(graphdef, state)
    if key is not None:
      lora.enable_dropout(m, key)
    return m(IDS, MASK)

  return forward


@pytest.mark.parametrize("scan", [False, True])
def test_dropout_only_in_forwards_given_keys(scan, bases):
  """As the update step: a model rebuilt in the trace gets keys (reproducible, one per adapter and
  layer); other forwards (rollout, evaluation, π_old, π_ref) are deterministic."""
  model = nnx.clone(bases[scan])
  lora.apply_lora(model, rank=4, alpha=8.0, dropout=0.3, rngs=nnx.Rngs(0))
  perturb_b(model)
  graphdef, state = nnx.split(model)
  forward = _keyed_forward(graphdef)
  k0, k1 = jax.random.key(0), jax.random.key(1)
  det = np.asarray(forward(state, None))
  np.testing.assert_array_equal(fwd(model, IDS, MASK), det)
  d0 = np.asarray(forward(state, k0))
  np.testing.assert_array_equal(forward(state, k0), d0)
  assert np.abs(d0 - det).max() > 1e-3 and np.abs(forward(state, k1) - d0).max() > 1e-3
  m = nnx.merge(graphdef, state)
  lora.enable_dropout(m, k0)
  keys = np.concatenate([np.asarray(x.dropout_key[...]).reshape(-1, 2)
                         for x in lora.lora_modules(m).values()])
  assert len(keys) == 4 * 2 and len(np.unique(keys, axis=0)) == len(keys)  # adapters × layers
  assert all(x.dropout_key is None for x in lora.lora_modules(model).values())

  no_drop = lora.apply_lora(nnx.clone(bases[scan]), rank=4, alpha=8.0, rngs=nnx.Rngs(0))
  perturb_b(no_drop)
  forward = _keyed_forward(nnx.graphdef(no_drop))  # dropout 0: keys change nothing
  state = nnx.state(no_drop)
  np.testing.assert_array_equal(forward(state, k0), forward(state, None))
