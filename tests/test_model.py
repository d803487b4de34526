"""LLaDA in Flax NNX (egspo.model.llada) against the independent PyTorch LLaDA (tests/torch_llada.py).

REFERENCE §1. Parity ≤ 1e-4 in f32 on small random configs (MHA and GQA), with left padding,
scan/remat variants equal to the plain model (logits and gradients), bf16 close to f32, config
and input validation.
"""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import torch_llada
from egspo.model import llada
from egspo.tokenizer import CharTokenizer

PAD = 0


def small_config(**kw) -> llada.ModelConfig:
  base = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=48, vocab_size=50,
              embedding_size=52, mask_token_id=49, eos_token_id=1, pad_token_id=PAD,
              rope_theta=10000.0, rms_norm_eps=1e-5, max_sequence_length=64)
  base.update(kw)
  return llada.ModelConfig(**base)


def load_torch_state_dict(model: llada.LLaDA, sd: dict[str, torch.Tensor]) -> llada.LLaDA:
  """Copies a HF-layout PyTorch state dict (REFERENCE §1 names, [out, in]) into `model` in place.

  Test-local: kernels are the transposes of the PyTorch weights; scanned models stack the layers.
  """
  cfg = model.cfg
  dt = cfg.jnp_param_dtype

  def arr(name, transpose=False):
    t = sd[name].float().numpy()
    return jnp.asarray(t.T if transpose else t, dtype=dt)

  pre = "model.transformer."
  model.wte.embedding.set_value(arr(pre + "wte.weight"))
  model.ln_f.weight.set_value(arr(pre + "ln_f.weight"))
  model.ff_out.kernel.set_value(arr(pre + "ff_out.weight", transpose=True))
  names = {"attn_norm": ("weight", False), "ff_norm": ("weight", False)}
  names.update({p: ("kernel", True) for p in
                ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")})
  for mod, (attr, tr) in names.items():
    per_layer = [arr(f"{pre}blocks.{i}.{mod}.weight", tr) for i in range(cfg.n_layers)]
    if cfg.scan_layers:
      getattr(getattr(model.blocks, mod), attr).set_value(jnp.stack(per_layer))
    else:
      for i, w in enumerate(per_layer):
        getattr(getattr(model.blocks[i], mod), attr).set_value(w)
  return model


def from_torch(cfg: llada.ModelConfig, sd) -> llada.LLaDA:
  """An LLaDA built abstractly (no random init) and filled from a PyTorch state dict."""
  return load_torch_state_dict(nnx.eval_shape(lambda: llada.LLaDA(cfg, rngs=nnx.Rngs(0))), sd)


def torch_logits(cfg: llada.ModelConfig, sd, ids, mask=None) -> np.ndarray:
  hf = cfg.to_hf_config()
  m = None if mask is None else torch.as_tensor(np.array(mask))
  return torch_llada.forward(sd, hf, torch.as_tensor(np.array(ids)), m).numpy()


def jit_forward(model):
  """Logits through nnx.split/merge inside jax.jit (how training code calls the model)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def f(state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)

  return lambda ids, mask=None: f(state, ids, mask)


def random_ids(key, b, l, vocab):
  return jax.random.randint(jax.random.key(key), (b, l), 2, vocab, dtype=jnp.int32)


@pytest.fixture(scope="module")
def torch_sd():
  return {kv: torch_llada.random_state_dict(small_config(n_kv_heads=kv).to_hf_config(), seed=kv)
          for kv in (2, 4)}


@pytest.mark.parametrize("impl", ["auto", "xla", "head_major"])
@pytest.mark.parametrize("n_kv_heads", [4, 2])  # MHA and GQA
def test_parity_with_torch_f32(torch_sd, n_kv_heads, impl):
  cfg = small_config(n_kv_heads=n_kv_heads, attention_impl=impl)
  sd = torch_sd[n_kv_heads]
  model = from_torch(cfg, sd)
  ids = random_ids(0, 3, 17, cfg.vocab_size)
  ours = np.asarray(jit_forward(model)(ids))
  ref = torch_logits(cfg, sd, ids)
  assert ours.shape == (3, 17, cfg.vocab_size) and ours.dtype == np.float32
  assert np.abs(ref).max() > 0.5  # non-trivial logits, so the tolerance below means something
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  # A different state dict gives different logits: the loader really moved the weights.
  other = torch_logits(cfg, torch_llada.random_state_dict(cfg.to_hf_config(), seed=99), ids)
  assert np.abs(other - ref).max() > 0.1


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_head_major_attention_is_jax_attention(kv_heads, dtype, tol):
  """`head_major_attention` computes `jax.nn.dot_product_attention` (MHA and GQA, left-padded
  keys, float32 and bfloat16): values and gradients; "auto" is it on the CPU backend."""
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (2, 5, 4, 8), dtype) * 2
  k, v = (jax.random.normal(x, (2, 7, kv_heads, 8), dtype) for x in ks[1:3])
  mask = jnp.ones((2, 7), bool).at[0, :3].set(False)
  want = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :])
  got = llada.head_major_attention(q, k, v, mask)
  assert got.dtype == want.dtype == dtype and got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol)
  assert jax.default_backend() == "cpu"
  np.testing.assert_array_equal(np.asarray(llada.attention(q, k, v, mask, "auto"), np.float32),
                                np.asarray(got, np.float32))
  np.testing.assert_array_equal(np.asarray(llada.attention(q, k, v, mask, "xla"), np.float32),
                                np.asarray(want, np.float32))
  if dtype == jnp.float32:
    w = jax.random.normal(ks[3], want.shape)
    loss = lambda impl: lambda q, k, v: (llada.attention(q, k, v, mask, impl) * w).sum()
    for a, b in zip(jax.grad(loss("head_major"), (0, 1, 2))(q, k, v),
                    jax.grad(loss("xla"), (0, 1, 2))(q, k, v)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    np.testing.assert_array_equal(  # a padded key has no influence
        np.asarray(llada.head_major_attention(q, k.at[0, :3].set(1e4), v.at[0, :3].set(-1e4),
                                              mask)), np.asarray(got))


def test_attention_backend_error():
  """cuDNN attention is refused off GPUs in one line (egspo.main checks it before building)."""
  assert llada.attention_backend_error("cudnn", "gpu") is None
  for impl in ("auto", "xla", "head_major"):
    assert llada.attention_backend_error(impl, "cpu") is None
  why = llada.attention_backend_error("cudnn", "tpu")
  assert "\n" not in why and "'cudnn' needs a GPU backend, this one is 'tpu'" in why


def test_left_padding_equals_prompt_alone(torch_sd):
  cfg = small_config(n_kv_heads=2)
  sd = torch_sd[2]
  model = from_torch(cfg, sd)
  fwd = jit_forward(model)
  lengths = [13, 7, 1]
  width = max(lengths)
  prompts = [np.asarray(random_ids(10 + i, 1, n, cfg.vocab_size))[0] for i, n in enumerate(lengths)]
  ids = np.full((len(lengths), width), PAD, np.int32)
  mask = np.zeros((len(lengths), width), np.int32)
  for i, p in enumerate(prompts):
    ids[i, width - len(p):] = p
    mask[i, width - len(p):] = 1
  padded = np.asarray(fwd(jnp.asarray(ids), jnp.asarray(mask)))
  ref_padded = torch_logits(cfg, sd, ids, mask)
  np.testing.assert_allclose(padded, ref_padded, atol=1e-4, rtol=0)
  for i, p in enumerate(prompts):
    alone = np.asarray(fwd(jnp.asarray(p[None])))[0]
    np.testing.assert_allclose(padded[i, width - len(p):], alone, atol=1e-4, rtol=0)
    np.testing.assert_allclose(alone, torch_logits(cfg, sd, p[None])[0], atol=1e-4, rtol=0)
  # Padding content is never attended: other pad token values leave the real positions unchanged.
  ids2 = np.where(mask == 1, ids, 7)
  padded2 = np.asarray(fwd(jnp.asarray(ids2), jnp.asarray(mask)))
  np.testing.assert_allclose(padded2[mask == 1], padded[mask == 1], atol=1e-6, rtol=0)
  # Without the mask the padding is attended (the reference code's defect) and logits change.
  unmasked = np.asarray(fwd(jnp.asarray(ids)))
  assert np.abs(unmasked[1, width - lengths[1]:] - padded[1, width - lengths[1]:]).max() > 1e-2


def _loss_and_grads(model, ids, mask, targets):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def step(params, rest):
    def loss_fn(params):
      logits = nnx.merge(graphdef, params, rest)(ids, mask)
      logp = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1)), logits
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  (loss, logits), grads = step(params, rest)
  return loss, grads, logits


def _stack_grads(grads, cfg):
  """Per-layer gradients of a list-of-blocks model → the scanned layout (leading layer axis)."""
  flat = nnx.to_flat_state(grads)
  out = {}
  for path, v in flat:
    if path[0] == "blocks":
      out.setdefault(("blocks",) + path[2:], [None] * cfg.n_layers)[path[1]] = v[...]
    else:
      out[path] = v[...]
  return {k: (jnp.stack(v) if isinstance(v, list) else v) for k, v in out.items()}


GRAD_IDS = random_ids(3, 2, 11, 50)
GRAD_MASK = jnp.asarray([[1] * 11, [0] * 4 + [1] * 7], jnp.int32)
GRAD_TARGETS = random_ids(4, 2, 11, 50)


@pytest.fixture(scope="module")
def plain_grads(torch_sd):
  """Loss, per-layer-stacked gradients and logits of the plain model (no scan, no remat)."""
  cfg = small_config(n_kv_heads=2)
  loss, grads, logits = _loss_and_grads(from_torch(cfg, torch_sd[2]), GRAD_IDS, GRAD_MASK,
                                        GRAD_TARGETS)
  flat = _stack_grads(grads, cfg)
  assert min(float(jnp.abs(g).max()) for g in flat.values()) > 0  # every param gets gradient
  return loss, flat, logits


@pytest.mark.parametrize("scan, remat, policy", [
    (False, True, "nothing"),
    (True, True, "dots"),
    pytest.param(True, False, "nothing", marks=pytest.mark.slow),
])
def test_scan_and_remat_give_identical_logits_and_grads(torch_sd, plain_grads, scan, remat,
                                                        policy):
  ref_loss, ref_flat, ref_logits = plain_grads
  cfg = small_config(n_kv_heads=2, scan_layers=scan, remat=remat, remat_policy=policy)
  loss, grads, logits = _loss_and_grads(from_torch(cfg, torch_sd[2]), GRAD_IDS, GRAD_MASK,
                                        GRAD_TARGETS)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=0)
  np.testing.assert_allclose(loss, ref_loss, atol=1e-6, rtol=0)
  got = ({p: v[...] for p, v in nnx.to_flat_state(grads)} if scan
         else _stack_grads(grads, cfg))
  assert set(got) == set(ref_flat)
  for k in ref_flat:
    np.testing.assert_allclose(got[k], ref_flat[k], atol=1e-5, rtol=1e-5, err_msg=str(k))


def test_bf16_runs_and_stays_close(torch_sd):
  sd = torch_sd[2]
  ids = random_ids(5, 2, 16, 50)
  ref = np.asarray(jit_forward(from_torch(small_config(), sd))(ids))
  for param_dtype, dtype in [("float32", "bfloat16"), ("bfloat16", "bfloat16")]:
    cfg = small_config(param_dtype=param_dtype, dtype=dtype)
    model = from_torch(cfg, sd)
    assert model.blocks[0].q_proj.kernel[...].dtype == cfg.jnp_param_dtype
    logits = np.asarray(jit_forward(model)(ids))
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    err = np.abs(logits - ref).max() / np.abs(ref).max()
    assert err < 3e-2, (param_dtype, dtype, err)
    # Close, but really computed in bf16 (otherwise this test would not test bf16).
    assert np.abs(logits - ref).max() > 1e-5
    # The argmax token (what the sampler commits) agrees almost everywhere.
    assert (logits.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_num_params_matches_model():
  for cfg in (small_config(), small_config(n_kv_heads=1, scan_layers=True)):
    params = nnx.state(nnx.eval_shape(lambda: llada.LLaDA(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params()
  # The real LLaDA-8B sizes, abstractly (no memory): 8.02B parameters.
  cfg8 = llada.get_config("llada_8b")
  abstract = nnx.eval_shape(lambda: llada.LLaDA(cfg8, rngs=nnx.Rngs(0)))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert n == cfg8.num_params() == 8_015_581_184
  assert abstract.blocks[0].q_proj.kernel.get_value().shape == (4096, 4096)
  assert abstract.blocks[0].ff_proj.kernel.get_value().shape == (4096, 12288)


def test_presets_and_hf_config_round_trip():
  for name in llada.PRESETS:
    cfg = llada.get_config(name, vocab=None if name == "llada_8b" else CharTokenizer())
    back = llada.ModelConfig.from_hf_config(cfg.to_hf_config())
    for f in llada.ModelConfig.HF_KEYS + ("pad_token_id",):
      assert getattr(back, f) == getattr(cfg, f), (name, f)
  assert llada.get_config("tiny", vocab=CharTokenizer(), n_layers=3).n_layers == 3


def test_presets_take_the_vocabulary_ids():
  """The CPU presets are built over the ids given (the model imports no tokenizer); llada_8b
  keeps its checkpoint's ids, which a vocabulary must fit."""
  tok = CharTokenizer()
  cfg = llada.get_config("small", vocab=tok)
  assert (cfg.vocab_size, cfg.embedding_size) == (tok.vocab_size, tok.vocab_size)
  assert (cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id) == (tok.mask_id, tok.eos_id,
                                                                      tok.pad_id)
  other = types.SimpleNamespace(vocab_size=50, mask_id=7, eos_id=8, pad_id=9)
  cfg = llada.get_config("tiny", vocab=other)
  assert (cfg.vocab_size, cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id) == (50, 7, 8, 9)
  with pytest.raises(ValueError, match="model preset 'tiny' is built over a tokenizer's vocab"):
    llada.get_config("tiny")
  llada_ids = types.SimpleNamespace(vocab_size=126349, mask_id=126336, eos_id=126081, pad_id=0)
  assert llada.get_config("llada_8b", vocab=llada_ids) == llada.get_config("llada_8b")
  with pytest.raises(ValueError, match="'llada_8b' has mask_token_id=126336, the vocabulary 2"):
    llada.get_config("llada_8b", vocab=tok)


@pytest.mark.parametrize("kw, field", [
    (dict(d_model=30), "d_model"),  # not divisible by n_heads=4
    (dict(n_kv_heads=3), "n_kv_heads"),
    (dict(n_heads=8, n_kv_heads=8, d_model=24), "n_heads"),  # odd head_dim 3
    (dict(embedding_size=10), "embedding_size"),
    (dict(mask_token_id=50), "mask_token_id"),
    (dict(n_layers=0), "n_layers"),
    (dict(dtype="float64"), "dtype"),
    (dict(param_dtype="int8"), "param_dtype"),
    (dict(remat_policy="some"), "remat_policy"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
    (dict(attention_impl="flash"), "attention_impl"),
])
def test_config_validation(kw, field):
  with pytest.raises(ValueError, match=f"ModelConfig.{field}="):
    small_config(**kw)


def test_bad_preset_and_inputs(torch_sd):
  with pytest.raises(ValueError, match="unknown model preset 'huge'.*tiny"):
    llada.get_config("huge")
  with pytest.raises(TypeError):
    llada.get_config("tiny", vocab=CharTokenizer(), no_such_field=1)
  with pytest.raises(ValueError, match="missing LLaDA keys"):
    llada.ModelConfig.from_hf_config({"d_model": 8})
  model = from_torch(small_config(max_sequence_length=8), torch_sd[2])
  with pytest.raises(ValueError, match="sequence length 9 exceeds the model's max_sequence_length=8"):
    model(jnp.ones((1, 9), jnp.int32))
  with pytest.raises(ValueError, match=r"\[batch, length\]"):
    model(jnp.ones((9,), jnp.int32))
  with pytest.raises(ValueError, match="integer token ids"):
    model(jnp.ones((1, 4), jnp.float32))
  with pytest.raises(ValueError, match="attention_mask shape"):
    model(jnp.ones((1, 4), jnp.int32), jnp.ones((1, 5), jnp.int32))
  out = nnx.eval_shape(lambda m: m(jnp.ones((1, 8), jnp.int32)), model)
  assert out.shape == (1, 8, 50) and out.dtype == jnp.float32


def test_init_seeds_and_scanned_stack():
  cfg = small_config(scan_layers=True)
  model = llada.init_model(cfg, seed=3)
  params = nnx.state(model, nnx.Param)
  assert params["blocks"]["q_proj"]["kernel"][...].shape == (2, 32, 32)
  assert params["blocks"]["k_proj"]["kernel"][...].shape == (2, 32, 16)
  assert params["blocks"]["q_proj"]["kernel"].get_metadata()["logical_axes"] == ("embed", "heads")
  # The layers are initialised independently (split RNG streams), not copies of one block.
  k = params["blocks"]["q_proj"]["kernel"][...]
  assert float(jnp.abs(k[0] - k[1]).max()) > 1e-3
  # Same seed → same weights; another seed → different weights.
  same = llada.init_model(cfg, seed=3)
  np.testing.assert_array_equal(same.wte.embedding[...], model.wte.embedding[...])
  assert not np.allclose(llada.init_model(cfg, seed=4).wte.embedding[...],
                         model.wte.embedding[...])
  hash(cfg)  # static jit arguments need a hashable config
  assert dataclasses.replace(cfg, n_layers=3) == cfg.replace(n_layers=3)
