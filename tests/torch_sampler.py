"""A step-by-step PyTorch LLaDA sampler written the reference way (REFERENCE §2), for parity tests
and the speed baseline of benchmarks/sampler.py.

Like ML-GSAI/LLaDA's `generate`: a Python loop over blocks and steps, one forward pass over the
whole canvas per step (`torch_llada.forward`), float64 softmax confidences, `torch.topk` per sample.
Deliberate differences, shared with egspo.diffusion.sampler: an optional key-padding mask, and the
mask token is never a candidate. With `record=True` it also records what RL needs (commit step,
log-prob, entropy, x̂0 and the state before every step), computed independently of the JAX code.

Also a test-local weight bridge between the JAX `LLaDA` (egspo.model.llada) and the HF-named
PyTorch state dict that `torch_llada.forward` takes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import torch_llada

_BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")


def torch_config(model_cfg) -> dict:
  """The config.json-style dict `torch_llada.forward` takes, from a JAX ModelConfig."""
  keys = ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size",
          "embedding_size", "rope_theta", "rms_norm_eps")
  return {k: getattr(model_cfg, k) for k in keys}


def state_dict_from_jax(model) -> dict[str, torch.Tensor]:
  """HF-named float32 tensors ([out, in] linears) from a non-scanned JAX `LLaDA`."""
  def t(x, transpose=False):
    a = np.asarray(x[...], dtype=np.float32)
    return torch.from_numpy(np.array(a.T if transpose else a, copy=True))

  sd = {"model.transformer.wte.weight": t(model.wte.embedding),
        "model.transformer.ln_f.weight": t(model.ln_f.weight),
        "model.transformer.ff_out.weight": t(model.ff_out.kernel, True)}
  for i, blk in enumerate(model.blocks):
    p = f"model.transformer.blocks.{i}."
    sd[p + "attn_norm.weight"] = t(blk.attn_norm.weight)
    sd[p + "ff_norm.weight"] = t(blk.ff_norm.weight)
    for name in _BLOCK_LINEARS:
      sd[p + name + ".weight"] = t(getattr(blk, name).kernel, True)
  return sd


def load_state_dict_into_jax(model, sd: dict[str, torch.Tensor]):
  """Overwrite the parameters of a non-scanned JAX `LLaDA` with HF-named tensors (in place)."""
  import jax.numpy as jnp

  def put(var, tensor, transpose=False):
    a = tensor.detach().float().numpy()
    a = a.T if transpose else a
    if a.shape != var[...].shape:
      raise ValueError(f"shape {a.shape} does not fit parameter of shape {var[...].shape}")
    var[...] = jnp.asarray(a, var[...].dtype)

  put(model.wte.embedding, sd["model.transformer.wte.weight"])
  put(model.ln_f.weight, sd["model.transformer.ln_f.weight"])
  put(model.ff_out.kernel, sd["model.transformer.ff_out.weight"], True)
  for i, blk in enumerate(model.blocks):
    p = f"model.transformer.blocks.{i}."
    put(blk.attn_norm.weight, sd[p + "attn_norm.weight"])
    put(blk.ff_norm.weight, sd[p + "ff_norm.weight"])
    for name in _BLOCK_LINEARS:
      put(getattr(blk, name).kernel, sd[p + name + ".weight"], True)
  return model


def num_transfer_tokens(block_mask_index: torch.Tensor, steps: int) -> torch.Tensor:
  """[B, steps]: masked count // steps per step, the remainder one each over the first steps."""
  mask_num = block_mask_index.sum(dim=1, keepdim=True)
  base, remainder = mask_num // steps, mask_num % steps
  out = base.expand(-1, steps).clone()
  for i in range(out.shape[0]):
    out[i, : int(remainder[i])] += 1
  return out


def gumbel_argmax(logits: torch.Tensor, temperature: float, generator=None) -> torch.Tensor:
  """argmax of exp(l) / (−log u)^τ, u ~ U(0,1) (= Gumbel-max from softmax(l/τ)); argmax at τ = 0."""
  if temperature == 0:
    return logits.argmax(dim=-1)
  logits = logits.double()
  u = torch.rand(logits.shape, dtype=torch.float64, generator=generator)
  return (logits.exp() / (-torch.log(u)) ** temperature).argmax(dim=-1)


@torch.no_grad()
def generate(sd, cfg: dict, prompt: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             steps: int, gen_length: int, block_length: int, mask_id: int,
             temperature: float = 0.0, remasking: str = "low_confidence", record: bool = True,
             generator: torch.Generator | None = None) -> dict:
  """Sample completions [B, gen_length] for left-padded prompts [B, P] (reference-style loop).

  Returns {'tokens'} and, with `record`, also 'commit_step' [B, G], 'logprob' [B, G],
  'entropy' [B, G], 'step_entropy' [B, T], 'x0_hat' [B, T, G], 'states' [B, T, G] (the
  completion before each step). Log-probs/entropies are float64 of the untempered softmax.
  """
  b, p_len = prompt.shape
  x = torch.full((b, p_len + gen_length), mask_id, dtype=torch.long)
  x[:, :p_len] = prompt
  attn = None
  if attention_mask is not None:
    attn = torch.cat([attention_mask.bool(), torch.ones(b, gen_length, dtype=torch.bool)], dim=1)
  assert gen_length % block_length == 0
  num_blocks = gen_length // block_length
  assert steps % num_blocks == 0
  steps_per_block = steps // num_blocks

  if record:
    commit_step = torch.full((b, gen_length), -1, dtype=torch.long)
    logprob = torch.zeros(b, gen_length, dtype=torch.float64)
    entropy = torch.zeros(b, gen_length, dtype=torch.float64)
    step_entropy = torch.zeros(b, steps, dtype=torch.float64)
    x0_hat = torch.zeros(b, steps, gen_length, dtype=torch.long)
    states = torch.zeros(b, steps, gen_length, dtype=torch.long)

  t = 0
  for blk in range(num_blocks):
    lo = p_len + blk * block_length
    hi = lo + block_length
    transfer_counts = num_transfer_tokens(x[:, lo:hi] == mask_id, steps_per_block)
    for i in range(steps_per_block):
      mask_index = x == mask_id
      logits = torch_llada.forward(sd, cfg, x, attn)  # [B, L, V], the whole canvas
      cand_logits = logits.clone()
      cand_logits[..., mask_id] = -torch.inf  # the mask token is never a candidate
      x0 = gumbel_argmax(cand_logits, temperature, generator)
      probs = F.softmax(logits.double(), dim=-1)
      if remasking == "low_confidence":
        x0_p = torch.gather(probs, -1, x0[..., None])[..., 0]
      elif remasking == "random":
        x0_p = torch.rand(x0.shape, dtype=torch.float64, generator=generator)
      else:
        raise ValueError(remasking)
      x0_p[:, hi:] = -torch.inf
      x0 = torch.where(mask_index, x0, x)
      confidence = torch.where(mask_index, x0_p, torch.tensor(-torch.inf, dtype=torch.float64))
      transfer = torch.zeros_like(x, dtype=torch.bool)
      for j in range(b):
        _, sel = torch.topk(confidence[j], k=int(transfer_counts[j, i]))
        transfer[j, sel] = True
      if record:
        states[:, t] = x[:, p_len:]
        x0_hat[:, t] = torch.where(mask_index, cand_logits.argmax(-1), x)[:, p_len:]
        logp = torch.log_softmax(logits.double(), dim=-1)
        lp = torch.gather(logp, -1, x0[..., None])[..., 0]
        ent = -(probs * torch.log(probs + 1e-8)).sum(-1)
        tr = transfer[:, p_len:]
        commit_step[tr] = t
        logprob[tr] = lp[:, p_len:][tr]
        entropy[tr] = ent[:, p_len:][tr]
        step_entropy[:, t] = (ent[:, p_len:] * tr).sum(1) / tr.sum(1)
      x[transfer] = x0[transfer]
      t += 1

  out = {"tokens": x[:, p_len:].clone()}
  if record:
    out.update(commit_step=commit_step, logprob=logprob, entropy=entropy,
               step_entropy=step_entropy, x0_hat=x0_hat, states=states)
  return out
