"""An independent PyTorch implementation of LLaDA (REFERENCE §1), written from the paper's spec for
parity tests and the reference-style sampler benchmark. Tensor names follow the HF checkpoint
(`model.transformer.*`), weights are `[out, in]`.

Differences from the reference code are deliberate and documented: an optional key-padding mask
(`attention_mask`, 1 = real token) with positions counted over real tokens only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def hf_state_dict_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
  """Name → shape of every tensor in a LLaDA checkpoint with config.json-style `cfg`."""
  d, f = cfg["d_model"], cfg["mlp_hidden_size"]
  hd = d // cfg["n_heads"]
  kv = cfg.get("n_kv_heads", cfg["n_heads"]) * hd
  v = cfg.get("embedding_size") or cfg["vocab_size"]
  shapes = {"model.transformer.wte.weight": (v, d), "model.transformer.ln_f.weight": (d,),
            "model.transformer.ff_out.weight": (v, d)}
  for i in range(cfg["n_layers"]):
    p = f"model.transformer.blocks.{i}."
    shapes.update({p + "attn_norm.weight": (d,), p + "ff_norm.weight": (d,),
                   p + "q_proj.weight": (d, d), p + "k_proj.weight": (kv, d),
                   p + "v_proj.weight": (kv, d), p + "attn_out.weight": (d, d),
                   p + "ff_proj.weight": (f, d), p + "up_proj.weight": (f, d),
                   p + "ff_out.weight": (d, f)})
  return shapes


def random_state_dict(cfg: dict, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
  g = torch.Generator().manual_seed(seed)
  sd = {}
  for name, shape in hf_state_dict_shapes(cfg).items():
    if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
      sd[name] = (1.0 + 0.1 * torch.randn(shape, generator=g)).to(dtype)
    else:
      sd[name] = (torch.randn(shape, generator=g) / math.sqrt(shape[-1])).to(dtype)
  return sd


def _rms_norm(x, w, eps):
  x32 = x.float()
  x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
  return (w.float() * x32).to(x.dtype)


def _rope(x, pos, theta):
  # x: [B, H, L, D]; pos: [B, L]
  d = x.shape[-1]
  inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
  freqs = pos.float()[..., None] * inv_freq  # [B, L, D/2]
  emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, L, D]
  x32 = x.float()
  x1, x2 = x32[..., : d // 2], x32[..., d // 2:]
  rot = torch.cat([-x2, x1], dim=-1)
  return (x32 * emb.cos() + rot * emb.sin()).to(x.dtype)


@torch.no_grad()
def forward(sd: dict[str, torch.Tensor], cfg: dict, input_ids: torch.Tensor,
            attention_mask: torch.Tensor | None = None) -> torch.Tensor:
  """Logits [B, L, vocab_size] (float32) of LLaDA with weights `sd`."""
  eps, theta = cfg.get("rms_norm_eps", 1e-5), cfg.get("rope_theta", 500000.0)
  nh = cfg["n_heads"]
  nkv = cfg.get("n_kv_heads", nh)
  b, l = input_ids.shape
  if attention_mask is None:
    pos = torch.arange(l)[None].expand(b, l)
    attn_bias = None
  else:
    m = attention_mask.bool()
    pos = (m.long().cumsum(1) - 1).clamp(min=0)
    attn_bias = torch.zeros(b, 1, 1, l).masked_fill(~m[:, None, None, :], float("-inf"))
  x = F.embedding(input_ids, sd["model.transformer.wte.weight"])
  for i in range(cfg["n_layers"]):
    p = f"model.transformer.blocks.{i}."
    n = _rms_norm(x, sd[p + "attn_norm.weight"], eps)
    q = (n @ sd[p + "q_proj.weight"].T).view(b, l, nh, -1).transpose(1, 2)
    k = (n @ sd[p + "k_proj.weight"].T).view(b, l, nkv, -1).transpose(1, 2)
    v = (n @ sd[p + "v_proj.weight"].T).view(b, l, nkv, -1).transpose(1, 2)
    if nkv != nh:
      k = k.repeat_interleave(nh // nkv, dim=1)
      v = v.repeat_interleave(nh // nkv, dim=1)
    q, k = _rope(q, pos, theta), _rope(k, pos, theta)
    bias = None if attn_bias is None else attn_bias.to(q.dtype)
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=False)
    a = a.transpose(1, 2).reshape(b, l, -1)
    h = x + a @ sd[p + "attn_out.weight"].T
    m_ = _rms_norm(h, sd[p + "ff_norm.weight"], eps)
    x = h + (F.silu(m_ @ sd[p + "ff_proj.weight"].T) * (m_ @ sd[p + "up_proj.weight"].T)) \
        @ sd[p + "ff_out.weight"].T
  x = _rms_norm(x, sd["model.transformer.ln_f.weight"], eps)
  logits = (x @ sd["model.transformer.ff_out.weight"].T).float()
  return logits[..., : cfg["vocab_size"]]
