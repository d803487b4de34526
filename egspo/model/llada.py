"""LLaDA in Flax NNX: a LLaMA-style transformer with bidirectional attention.

REFERENCE §1. Block:
    h   = x + attn_out(SDPA_noncausal(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))),  n = attn_norm(x)
    out = h + ff_out(silu(ff_proj(m)) * up_proj(m)),                                     m = ff_norm(h)
RoPE (half-split `rotate_half` form) and RMSNorm are computed in float32; no biases; untied head.

Unlike the reference implementation, the model takes a key-padding `attention_mask`: padded keys
are never attended, and RoPE positions count only real tokens, so a left-padded prompt gives the
same logits as the same prompt alone.

Every parameter carries logical axis names (``vocab``, ``embed``, ``heads``, ``kv_heads``,
``mlp``, ``norm``, and ``layers`` for scanned stacks); `egspo.sharding` maps them to mesh axes.
Under a mesh and flax's logical-axis rules context (`egspo.sharding.use_mesh`) activations are
pinned by logical names too (`constrain`); the model itself knows no mesh and no rules.
Numerics: matmuls in `dtype` (bf16 for the 8B preset); RMSNorm, RoPE and softmax statistics in
float32; the LM head accumulates and returns float32 logits.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd

from egspo import partitioning

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# The architecture fields of LLaDA-8B's config.json (GSAI-ML/LLaDA-8B-Instruct) that this model
# implements: a Llama-style block (separate q/k/v, SwiGLU with SiLU), RoPE, RMSNorm with weights,
# no biases, an untied head. LLaDA's modeling code defaults to another model (fused projections,
# no RoPE, LayerNorm), so an export writes them all and a checkpoint with another value of any of
# them is refused. A tuple lists the values accepted on reading (the first is written).
LLADA_ARCHITECTURE: dict[str, Any] = {
    "block_type": "llama", "activation_type": "silu", "rope": True, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "include_bias": False, "include_qkv_bias": (False, None),
    "bias_for_layer_norm": (False, None), "alibi": False, "attention_layer_norm": False,
    "input_emb_norm": False, "scale_logits": False, "weight_tying": False,
    "multi_query_attention": (None, False), "block_group_size": 1,
}
# Written on export only (inference settings of the 8B config.json, not checked on reading).
LLADA_EXPORT_DEFAULTS: dict[str, Any] = {
    "attention_dropout": 0.0, "residual_dropout": 0.0, "embedding_dropout": 0.0,
    "rope_full_precision": True, "flash_attention": False, "use_cache": False,
}

# Names of `jax.checkpoint` policies for `ModelConfig.remat_policy`.
REMAT_POLICIES = {
    "nothing": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything": jax.checkpoint_policies.everything_saveable,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of a LLaDA model. Field names follow LLaDA's `config.json`."""

  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  mlp_hidden_size: int
  vocab_size: int
  embedding_size: int
  mask_token_id: int
  eos_token_id: int
  pad_token_id: int
  rope_theta: float = 500000.0
  rms_norm_eps: float = 1e-5
  max_sequence_length: int = 4096
  # Numerics and memory (not part of the checkpoint).
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype of matmuls; norms, RoPE and logits stay float32
  remat: bool = False  # rematerialise each block in the backward pass
  # What a rematerialised block keeps from its forward pass (a name in REMAT_POLICIES):
  # "nothing" recomputes the whole block (least memory); "dots" keeps matmul outputs.
  remat_policy: str = "nothing"
  scan_layers: bool = False  # one scanned block with a leading `layers` axis instead of a list
  # Attention kernel (a name in ATTENTION_IMPLS): "auto" = "head_major" on the CPU backend, where
  # XLA's attention with small heads runs at a fraction of the matmul rate, else "xla";
  # "xla" / "cudnn" = jax.nn.dot_product_attention with that implementation.
  attention_impl: str = "auto"

  def __post_init__(self):
    def bad(field, why):
      raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r}: {why}")

    for f in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size",
              "embedding_size", "max_sequence_length"):
      if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
        bad(f, "must be a positive integer")
    if self.d_model % self.n_heads:
      bad("d_model", f"must be divisible by n_heads={self.n_heads}")
    if self.n_heads % self.n_kv_heads:
      bad("n_kv_heads", f"must divide n_heads={self.n_heads}")
    if (self.d_model // self.n_heads) % 2:
      bad("n_heads", "head_dim = d_model / n_heads must be even for RoPE")
    if self.embedding_size < self.vocab_size:
      bad("embedding_size", f"must be >= vocab_size={self.vocab_size}")
    for f in ("mask_token_id", "eos_token_id", "pad_token_id"):
      if not 0 <= getattr(self, f) < self.vocab_size:
        bad(f, f"must be a token id in [0, vocab_size={self.vocab_size})")
    for f in ("param_dtype", "dtype"):
      if getattr(self, f) not in DTYPES:
        bad(f, f"must be one of {sorted(DTYPES)}")
    if self.attention_impl not in ATTENTION_IMPLS:
      bad("attention_impl", f"must be one of {list(ATTENTION_IMPLS)}")
    if self.remat_policy not in REMAT_POLICIES:
      bad("remat_policy", f"must be one of {sorted(REMAT_POLICIES)}")
    if not self.rms_norm_eps > 0:
      bad("rms_norm_eps", "must be positive")
    if not self.rope_theta > 0:
      bad("rope_theta", "must be positive")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def jnp_dtype(self):
    return DTYPES[self.dtype]

  @property
  def jnp_param_dtype(self):
    return DTYPES[self.param_dtype]

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def num_params(self) -> int:
    d, f, v = self.d_model, self.mlp_hidden_size, self.embedding_size
    kv = self.n_kv_heads * self.head_dim
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
    return self.n_layers * per_layer + 2 * v * d + d

  # Keys of LLaDA's config.json that describe the architecture.
  HF_KEYS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size",
             "embedding_size", "mask_token_id", "eos_token_id", "rope_theta", "rms_norm_eps",
             "max_sequence_length")

  def to_hf_config(self) -> dict[str, Any]:
    """LLaDA's config.json: the sizes, and the architecture fields LLaDA's modeling code reads
    (`LLADA_ARCHITECTURE`; its defaults build a different model: no RoPE, LayerNorm, fused
    projections)."""
    cfg = {k: getattr(self, k) for k in self.HF_KEYS}
    cfg["pad_token_id"] = self.pad_token_id
    cfg["model_type"] = "llada"
    cfg.update({k: v[0] if isinstance(v, tuple) else v for k, v in LLADA_ARCHITECTURE.items()})
    cfg.update(LLADA_EXPORT_DEFAULTS)
    return cfg

  @classmethod
  def from_hf_config(cls, cfg: dict[str, Any], **overrides) -> "ModelConfig":
    """The config of LLaDA's config.json; a ValueError names any architecture field whose value
    this model does not implement (an absent field counts as LLaDA-8B's)."""
    allowed = {k: v if isinstance(v, tuple) else (v,) for k, v in LLADA_ARCHITECTURE.items()}
    other = {k: cfg[k] for k, ok in allowed.items() if k in cfg and cfg[k] not in ok}
    if other:
      raise ValueError(
          "config.json describes an architecture egspo's LLaDA does not implement: "
          + ", ".join(f"{k}={v!r} (implemented: {' or '.join(map(repr, allowed[k]))})"
                      for k, v in other.items()))
    missing = [k for k in cls.HF_KEYS if k not in cfg and k not in overrides
               and k not in ("embedding_size", "n_kv_heads", "max_sequence_length")]
    if missing:
      raise ValueError(f"config.json is missing LLaDA keys: {missing}")
    kw = {k: cfg[k] for k in cls.HF_KEYS if k in cfg}
    kw.setdefault("embedding_size", kw["vocab_size"])
    kw.setdefault("n_kv_heads", kw["n_heads"])
    if cfg.get("embedding_size") is None:
      kw["embedding_size"] = kw["vocab_size"]
    kw["pad_token_id"] = cfg.get("pad_token_id", kw["eos_token_id"])
    if kw["pad_token_id"] is None:
      kw["pad_token_id"] = kw["eos_token_id"]
    kw["rope_theta"] = float(kw.get("rope_theta", 500000.0))
    kw["rms_norm_eps"] = float(kw.get("rms_norm_eps", 1e-5))
    kw.update(overrides)
    return cls(**kw)


# The checkpoint's vocabulary (REFERENCE §1): LLaDA-8B's ids.
LLADA_8B_VOCAB = dict(vocab_size=126464, embedding_size=126464, mask_token_id=126336,
                      eos_token_id=126081, pad_token_id=126081)

# Architectures by name. All but `llada_8b` are built over a tokenizer's vocabulary, given to
# `get_config` (the built-in character tokenizer: `egspo.tokenizer.CharTokenizer`).
PRESETS = {
    "llada_8b": dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                     mlp_hidden_size=12288, rope_theta=500000.0, rms_norm_eps=1e-5,
                     max_sequence_length=4096, param_dtype="bfloat16", dtype="bfloat16",
                     remat=True, **LLADA_8B_VOCAB),
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=192,
                 rope_theta=10000.0, max_sequence_length=256),  # ~0.15M parameters
    "small": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden_size=384,
                  rope_theta=10000.0, max_sequence_length=512),  # ~0.9M parameters
    "base": dict(d_model=256, n_layers=6, n_heads=8, n_kv_heads=8, mlp_hidden_size=768,
                 rope_theta=10000.0, max_sequence_length=1024),  # ~5M parameters
    # LLaDA-8B's architecture at half the width and half the depth (head_dim 128, MLP 3·d, MHA,
    # its RoPE θ and norm ε, bf16) over a tokenizer's vocabulary, for accelerator benchmarks:
    # 0.87B parameters without the embeddings (+ 2·d·V for the embedding and the untied head).
    "llada_1b": dict(d_model=2048, n_layers=16, n_heads=16, n_kv_heads=16, mlp_hidden_size=6144,
                     rope_theta=500000.0, rms_norm_eps=1e-5, max_sequence_length=4096,
                     param_dtype="bfloat16", dtype="bfloat16"),
}


def get_config(preset: str, vocab=None, **overrides) -> ModelConfig:
  """A named preset (`llada_8b`, `tiny`, `small`, `base`, `llada_1b`) with optional overrides.

  vocab: the token ids, anything with `vocab_size`, `mask_id`, `eos_id` and `pad_id` (a
  tokenizer). The other presets are built over it (required); `llada_8b` has its checkpoint's
  ids, which `vocab` must fit (its size at most the preset's, the same mask and EOS ids).
  """
  if preset not in PRESETS:
    raise ValueError(f"unknown model preset {preset!r}; known presets: {sorted(PRESETS)}")
  fields = dict(PRESETS[preset])
  if "vocab_size" not in fields:
    if vocab is None:
      raise ValueError(f"model preset {preset!r} is built over a tokenizer's vocabulary: pass "
                       "vocab= (e.g. egspo.tokenizer.CharTokenizer())")
    fields.update(vocab_size=vocab.vocab_size, embedding_size=vocab.vocab_size,
                  mask_token_id=vocab.mask_id, eos_token_id=vocab.eos_id, pad_token_id=vocab.pad_id)
  elif vocab is not None:
    if vocab.vocab_size > fields["vocab_size"]:
      raise ValueError(f"model preset {preset!r} has vocab_size={fields['vocab_size']} < the "
                       f"vocabulary's {vocab.vocab_size}")
    for name, want in (("mask_token_id", vocab.mask_id), ("eos_token_id", vocab.eos_id)):
      if want != fields[name]:
        raise ValueError(f"model preset {preset!r} has {name}={fields[name]}, the vocabulary "
                         f"{want}")
  return ModelConfig(**{**fields, **overrides})


# ----------------------------------------------------------------------------------------------
# Layers


def _dense(cfg: ModelConfig, d_in: int, d_out: int, axes: tuple[str, str], rngs: nnx.Rngs,
           out_dtype=None):
  """A bias-free projection; the kernel is [in, out] (the transpose of PyTorch's weight).

  out_dtype=float32 makes the matmul accumulate into and return float32 even with bf16 inputs
  (used by the LM head so log-probs are not rounded to bf16).
  """
  init = nnx.initializers.normal(stddev=0.02)
  return nnx.Linear(d_in, d_out, use_bias=False, dtype=cfg.jnp_dtype,
                    param_dtype=cfg.jnp_param_dtype, preferred_element_type=out_dtype,
                    kernel_init=nnx.with_metadata(init, logical_axes=axes), rngs=rngs)


def constrain(x, logical_axes: tuple[str | None, ...]):
  """Pins the sharding of activation x by logical axis names.

  Active only under a mesh (`jax.set_mesh`) and flax's logical-axis rules
  (`nnx.logical_axis_rules`; `egspo.sharding.use_mesh` sets both, e.g. batch → (data, fsdp),
  act_heads/act_vocab → tensor); identity otherwise, so the model runs unchanged on one device.
  Without these hints XLA's propagation may keep activations replicated or reshard them back and
  forth between FSDP matmuls.
  """
  mesh = jax.sharding.get_abstract_mesh()
  rules = spmd.get_logical_axis_rules()
  if mesh.empty or not rules:
    return x
  spec = partitioning.logical_to_mesh_axes(logical_axes, rules, mesh, x.shape)
  return jax.lax.with_sharding_constraint(x, spec)


class RMSNorm(nnx.Module):
  """y = weight * x / sqrt(mean(x²) + eps), computed in float32 (LLaDA's RMSLayerNorm)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    del rngs
    self.eps = cfg.rms_norm_eps
    self.weight = nnx.Param(jnp.ones((cfg.d_model,), cfg.jnp_param_dtype), logical_axes=("norm",))

  def __call__(self, x):
    dtype = x.dtype
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    return (self.weight[...].astype(jnp.float32) * x).astype(dtype)


def rope_cos_sin(positions, head_dim: int, theta: float):
  """cos, sin tables [B, L, head_dim] in float32 for integer positions [B, L]."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, head_dim/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
  """Half-split rotary embedding of x [B, L, N, H] (rotate_half form), in float32."""
  dtype = x.dtype
  x = x.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(dtype)


ATTENTION_IMPLS = ("auto", "xla", "cudnn", "head_major")


def resolve_attention(impl: str) -> str:
  """"auto" → "head_major" on the CPU backend, "xla" elsewhere; other names unchanged."""
  if impl == "auto":
    return "head_major" if jax.default_backend() == "cpu" else "xla"
  return impl


def attention_backend_error(impl: str, backend: str) -> str | None:
  """Why `impl` cannot run on the JAX `backend` ('cpu', 'gpu', 'tpu'), or None: cuDNN's kernel
  exists on GPUs only (elsewhere it fails at the first trace, after the model is built)."""
  if impl == "cudnn" and backend != "gpu":
    return (f"attention_impl='cudnn' needs a GPU backend, this one is {backend!r} "
            f"(use 'auto' or 'xla')")
  return None


def to_head_major(k, v):
  """Keys [B, S, K, H] → [B, K, H, S] and values [B, S, K, H] → [B, K, S, H]: the operands of
  `head_major_attention`'s two matmuls (and the block cache's layout with that kernel)."""
  return jnp.transpose(k, (0, 2, 3, 1)), jnp.transpose(v, (0, 2, 1, 3))


def attention(q, k, v, key_mask, impl: str = "auto"):
  """Bidirectional attention: queries q [B, T, N, H] over keys/values k, v [B, S, K, H] (K kv
  heads dividing N), key_mask [B, S] bool (True = attend) or None → [B, T, N, H].

  impl (`ModelConfig.attention_impl`): "xla" / "cudnn" run `jax.nn.dot_product_attention`;
  "head_major" runs `head_major_attention`; "auto" picks "head_major" on the CPU backend and
  "xla" elsewhere (decided at trace time).
  """
  impl = resolve_attention(impl)
  if impl == "head_major":
    return head_major_attention(q, k, v, key_mask)
  mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1(query), S(key)]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=False, implementation=impl)


def head_major_attention(q, k, v, key_mask, *, head_major_kv: bool = False):
  """`jax.nn.dot_product_attention`'s XLA computation (float32 logits and softmax, probabilities
  in the values' dtype), written as 4-d matmuls over [B, K, ·, ·] with the keys as [H, S]: each
  kv head's query group stacked along the query axis, the softmax normalised after the values'
  matmul. The same values to float32 rounding; on XLA's CPU backend 1.2–3.9× faster at 32-dim
  heads, where the einsum form runs far below the matmul rate. head_major_kv: k and v are
  already `to_head_major`'s (the block cache keeps them so: no transpose per cached step).
  """
  b, t, n, h = q.shape
  kt, vt = (k, v) if head_major_kv else to_head_major(k, v)
  kh = kt.shape[1]
  qt = jnp.transpose(q.reshape(b, t, kh, n // kh, h), (0, 2, 3, 1, 4)).reshape(b, kh, -1, h)
  logits = jnp.matmul(qt, kt, preferred_element_type=jnp.float32) * (h ** -0.5)  # [B,K,G·T,S]
  if key_mask is not None:
    logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  e = jnp.exp(logits - logits.max(-1, keepdims=True))
  out = jnp.matmul(e.astype(v.dtype), vt, preferred_element_type=jnp.float32) / e.sum(
      -1, keepdims=True)
  out = jnp.transpose(out.reshape(b, kh, n // kh, t, h), (0, 3, 1, 2, 4))
  return out.reshape(b, t, n, h).astype(q.dtype)


class Block(nnx.Module):
  """One LLaDA transformer block (pre-norm attention + SwiGLU MLP)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, hd = cfg.d_model, cfg.head_dim
    self.attn_norm = RMSNorm(cfg, rngs=rngs)
    self.q_proj = _dense(cfg, d, cfg.n_heads * hd, ("embed", "heads"), rngs)
    self.k_proj = _dense(cfg, d, cfg.n_kv_heads * hd, ("embed", "kv_heads"), rngs)
    self.v_proj = _dense(cfg, d, cfg.n_kv_heads * hd, ("embed", "kv_heads"), rngs)
    self.attn_out = _dense(cfg, cfg.n_heads * hd, d, ("heads", "embed"), rngs)
    self.ff_norm = RMSNorm(cfg, rngs=rngs)
    self.ff_proj = _dense(cfg, d, cfg.mlp_hidden_size, ("embed", "mlp"), rngs)
    self.up_proj = _dense(cfg, d, cfg.mlp_hidden_size, ("embed", "mlp"), rngs)
    self.ff_out = _dense(cfg, cfg.mlp_hidden_size, d, ("mlp", "embed"), rngs)

  def __call__(self, x, cos, sin, key_mask):
    """x [B, L, D]; cos/sin [B, L, H]; key_mask [B, L] bool (True = attend to this key)."""
    return self.attend(x, *self.qkv(x, cos, sin), key_mask)

  def qkv(self, x, cos, sin):
    """Queries [B, L, n_heads, H], keys and values [B, L, n_kv_heads, H] (RoPE applied) of x."""
    cfg = self.cfg
    b, l, _ = x.shape
    n = self.attn_norm(x)
    q = self.q_proj(n).reshape(b, l, cfg.n_heads, cfg.head_dim)
    k = self.k_proj(n).reshape(b, l, cfg.n_kv_heads, cfg.head_dim)
    v = self.v_proj(n).reshape(b, l, cfg.n_kv_heads, cfg.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q = constrain(q, ("batch", "length", "act_heads", None))
    k = constrain(k, ("batch", "length", "act_kv_heads", None))
    v = constrain(v, ("batch", "length", "act_kv_heads", None))
    return q, k, v

  def attend(self, x, q, k, v, key_mask, head_major_kv: bool = False):
    """The rest of the block for queries q of x [B, L, D] over keys/values k, v [B, S, ...]
    (`to_head_major`'s with head_major_kv); key_mask [B, S] bool or None."""
    cfg = self.cfg
    b, l, _ = x.shape
    # GQA (n_kv_heads < n_heads) is handled natively: query head i uses kv head i // group,
    # the same as repeating each kv head `group` times (tested against the PyTorch reference).
    if head_major_kv:
      attn = head_major_attention(q, k, v, key_mask, head_major_kv=True)
    else:
      attn = attention(q, k, v, key_mask, cfg.attention_impl)
    h = x + self.attn_out(attn.reshape(b, l, cfg.n_heads * cfg.head_dim))
    m = self.ff_norm(h)
    gate = constrain(jax.nn.silu(self.ff_proj(m)) * self.up_proj(m), ("batch", "length", "act_mlp"))
    return constrain(h + self.ff_out(gate), ("batch", "length", "act_embed"))


class LLaDA(nnx.Module):
  """The LLaDA mask predictor: token ids [B, L] → logits [B, L, vocab_size] (float32)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    emb_init = nnx.with_metadata(nnx.initializers.normal(stddev=0.02),
                                 logical_axes=("vocab", "embed"))
    self.wte = nnx.Embed(cfg.embedding_size, cfg.d_model, dtype=cfg.jnp_dtype,
                         param_dtype=cfg.jnp_param_dtype, embedding_init=emb_init, rngs=rngs)
    if cfg.scan_layers:
      @nnx.split_rngs(splits=cfg.n_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make_blocks(rngs):
        return Block(cfg, rngs=rngs)

      self.blocks = make_blocks(rngs)
    else:
      self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
    self.ln_f = RMSNorm(cfg, rngs=rngs)
    # LM head: bf16 inputs, float32 output (logits feed log-probs, ratios and entropies).
    self.ff_out = _dense(cfg, cfg.d_model, cfg.embedding_size, ("embed", "vocab"), rngs,
                         out_dtype=jnp.float32)

  def hidden_states(self, input_ids, attention_mask=None):
    """Final normalised hidden states [B, L, D] for input_ids [B, L].

    attention_mask [B, L] (bool/int, 1 = real token): padded keys are not attended, and RoPE
    positions count real tokens only (position = number of real tokens before it).
    """
    cfg = self.cfg
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
      raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape "
                       f"{input_ids.shape}")
    if input_ids.shape[1] > cfg.max_sequence_length:
      raise ValueError(f"sequence length {input_ids.shape[1]} exceeds the model's "
                       f"max_sequence_length={cfg.max_sequence_length}")
    if attention_mask is None:
      key_mask = None
      positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    else:
      key_mask = attention_mask.astype(bool)
      positions = jnp.maximum(jnp.cumsum(key_mask, axis=1) - 1, 0)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
    x = constrain(self.wte(input_ids), ("batch", "length", "act_embed"))

    def block_fn(block, x):
      return block(x, cos, sin, key_mask)

    if cfg.remat:
      # scan already stops XLA from merging the recomputation with the forward pass (CSE),
      # so the extra barrier is only needed for the unrolled list of blocks (JAX remat docs).
      checkpointed = jax.checkpoint(
          lambda graphdef, state, x: nnx.merge(graphdef, state)(x, cos, sin, key_mask),
          prevent_cse=not cfg.scan_layers, policy=REMAT_POLICIES[cfg.remat_policy],
          static_argnums=(0,))

      def block_fn(block, x):
        # A pure jax.checkpoint over the block's state: nnx.remat would write the state back
        # into Variables of an outer trace, which fails for models rebuilt by `nnx.merge`
        # inside jax.grad with LoRA adapters (flax TraceContextError).
        return checkpointed(*nnx.split(block), x)
    if cfg.scan_layers:
      # A plain lax.scan over the stacked block state (one slice per layer). nnx.scan rejects
      # modules whose variables hold tracers of an enclosing trace, e.g. a model rebuilt by
      # `nnx.merge` inside the micro-batch scan of `rl.update.make_update_step`.
      graphdef, stacked = nnx.split(self.blocks)

      def layer(x, layer_state):
        return block_fn(nnx.merge(graphdef, layer_state), x), None

      x, _ = jax.lax.scan(layer, x, stacked)
    else:
      for block in self.blocks:
        x = block_fn(block, x)
    return self.ln_f(x)

  def hidden_states_kv(self, input_ids, positions, key_mask, kv=None, start=0):
    """The forward of a window of W canvas positions against cached keys and values (the block
    cache of `egspo.diffusion.cache`, after Fast-dLLM). No remat: a sampling forward.

    input_ids, positions [B, W] (the window's RoPE positions); key_mask [B, S] bool over the
    canvas of S positions (True = attend). kv = (k, v): the canvas' keys and values (RoPE
    applied) per layer, each [n_layers, B, S, n_kv_heads, head_dim], or with the "head_major"
    kernel kept as its operands, keys [n_layers, B, n_kv_heads, head_dim, S] and values
    [n_layers, B, n_kv_heads, S, head_dim] (`kv_position_axes`); the window's own are computed
    and written at [start, start + W) before its queries attend all S keys. kv=None: the window
    is the whole canvas (W = S), as `hidden_states` with these positions and mask. Returns
    (hidden [B, W, D], normalised; kv with the window's keys and values, of S positions).
    """
    cfg = self.cfg
    if input_ids.shape != positions.shape or key_mask.shape[0] != input_ids.shape[0]:
      raise ValueError(f"input_ids {input_ids.shape}, positions {positions.shape} and key_mask "
                       f"{key_mask.shape} must be [B, W], [B, W] and [B, S]")
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
    x = constrain(self.wte(input_ids), ("batch", "length", "act_embed"))

    head_major = resolve_attention(cfg.attention_impl) == "head_major"
    axes = [a - 1 for a in self.kv_position_axes]  # of one layer's k and v

    def layer(block, x, cached):
      q, k, v = block.qkv(x, cos, sin)
      if head_major:
        k, v = to_head_major(k, v)
      if cached is not None:
        k, v = (jax.lax.dynamic_update_slice_in_dim(c, new, start, axis=a)
                for c, new, a in zip(cached, (k, v), axes))
      return block.attend(x, q, k, v, key_mask, head_major_kv=head_major), (k, v)

    if cfg.scan_layers:
      graphdef, stacked = nnx.split(self.blocks)
      x, new_kv = jax.lax.scan(lambda x, xs: layer(nnx.merge(graphdef, xs[0]), x, xs[1]), x,
                               (stacked, kv))
    else:
      outs = []
      for i, block in enumerate(self.blocks):
        x, out = layer(block, x, None if kv is None else (kv[0][i], kv[1][i]))
        outs.append(out)
      new_kv = tuple(jnp.stack(t) for t in zip(*outs))
    return self.ln_f(x), new_kv

  @property
  def kv_position_axes(self) -> tuple[int, int]:
    """The position axis of `hidden_states_kv`'s stacked keys and values: [n_layers, B, S, K, H]
    → (2, 2); with the "head_major" kernel [n_layers, B, K, H, S] and [n_layers, B, K, S, H] →
    (4, 3)."""
    return (4, 3) if resolve_attention(self.cfg.attention_impl) == "head_major" else (2, 2)

  def logits(self, hidden):
    """LM head: hidden [..., D] → float32 logits [..., vocab_size]."""
    out = self.ff_out(hidden).astype(jnp.float32)
    if out.ndim == 3:
      out = constrain(out, ("batch", "length", "act_vocab"))
    return out[..., : self.cfg.vocab_size]

  def __call__(self, input_ids, attention_mask=None):
    return self.logits(self.hidden_states(input_ids, attention_mask))


def init_model(cfg: ModelConfig, seed: int = 0) -> LLaDA:
  """A randomly initialised LLaDA (unsharded; see `egspo.model.init.create_sharded_model`)."""
  return LLaDA(cfg, rngs=nnx.Rngs(seed))
