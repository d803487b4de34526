"""LoRA (low-rank adaptation) of chosen LLaDA projections.

A target projection `y = x W` becomes `y = x W + (alpha / r) · (x A) B` with `A [in, r]`
(random) and `B [r, out]` zero-initialised, so the adapted model starts exactly equal to the base
model (Hu et al. 2021). `A` and `B` are `nnx.LoRAParam`s: `nnx.Optimizer(model, tx,
wrt=nnx.LoRAParam)` trains only them while `W` stays an `nnx.Param` at its original path
(`blocks.{i}.q_proj.kernel`), so checkpoints, conversion and sharding rules are unchanged.
The LoRA factors carry logical axes too (`(in_axis, "lora_rank")`, `("lora_rank", out_axis)`),
and for scanned block stacks they get the same leading layer axis as the kernels.

REFERENCE §3.8: EGSPO trains LoRA r = 128, α = 64 on LLaDA-8B.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

# Every projection inside the transformer blocks (not the embedding, not the LM head). Paths
# are "blocks.3.q_proj" (list of blocks) or "blocks.q_proj" (scanned stack).
DEFAULT_TARGETS = r"^blocks\.(\d+\.)?(q_proj|k_proj|v_proj|attn_out|ff_proj|up_proj|ff_out)$"


class LoRALinear(nnx.Module):
  """A bias-free projection with a LoRA update: x [..., in] → [..., out].

  `kernel` is the base projection's own variable (same path, same metadata). Works for a single
  kernel [in, out] and for a scanned stack [layers, in, out] (then A is [layers, in, r] and B
  [layers, r, out]; `nnx.scan` slices all three together).
  """

  def __init__(self, base: nnx.Linear, rank: int, alpha: float, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32):
    if getattr(base, "bias", None) is not None:
      raise ValueError("LoRALinear wraps bias-free projections only (LLaDA has no biases)")
    self.kernel = base.kernel
    shape = self.kernel.get_value().shape
    lead, (d_in, d_out) = tuple(shape[:-2]), shape[-2:]
    axes = self.kernel.get_metadata().get("logical_axes") or (None, None)
    self.rank = rank
    self.scale = alpha / rank
    self.dtype = base.dtype
    self.preferred_element_type = base.preferred_element_type
    self.precision = base.precision
    # A ~ N(0, 1/in) keeps x A at the scale of x; B = 0 makes the update start at exactly zero.
    a = jax.random.normal(rngs.params(), lead + (d_in, rank), jnp.float32) / math.sqrt(d_in)
    self.lora_a = nnx.LoRAParam(a.astype(param_dtype), logical_axes=(axes[-2], "lora_rank"))
    self.lora_b = nnx.LoRAParam(jnp.zeros(lead + (rank, d_out), param_dtype),
                                logical_axes=("lora_rank", axes[-1]))

  def __call__(self, x):
    dtype = self.dtype or x.dtype
    x = x.astype(dtype)
    y = jnp.dot(x, self.kernel[...].astype(dtype), precision=self.precision,
                preferred_element_type=self.preferred_element_type)
    xa = jnp.dot(x, self.lora_a[...].astype(dtype), precision=self.precision)
    delta = jnp.dot(xa, self.lora_b[...].astype(dtype), precision=self.precision)
    return y + (self.scale * delta).astype(y.dtype)

  def merged_kernel(self):
    """W + (alpha / r) · A B, in the kernel's dtype ([in, out] or [layers, in, out])."""
    w = self.kernel[...]
    ab = jnp.einsum("...ir,...ro->...io", self.lora_a[...].astype(jnp.float32),
                    self.lora_b[...].astype(jnp.float32))
    return (w.astype(jnp.float32) + self.scale * ab).astype(w.dtype)


def _path_str(path) -> str:
  return ".".join(str(p) for p in path)


def _set_child(parent, key, value):
  if isinstance(key, int):
    parent[key] = value
  else:
    setattr(parent, key, value)


def lora_modules(model) -> dict[str, LoRALinear]:
  """Path string → LoRALinear of every adapted projection in `model`."""
  return {_path_str(p): m for p, m in nnx.iter_graph(model) if isinstance(m, LoRALinear)}


def apply_lora(model, rank: int, alpha: float, targets: str = DEFAULT_TARGETS,
               rngs: nnx.Rngs | None = None, param_dtype=jnp.float32):
  """Replaces every `nnx.Linear` whose path matches the regex `targets` by a LoRALinear, in place.

  rank r and alpha give the update scale alpha / r. LoRA factors are created in `param_dtype`
  (float32 by default: they are few and are what the optimiser updates). Returns the model.
  """
  if not isinstance(rank, int) or rank <= 0:
    raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
  if not alpha > 0:
    raise ValueError(f"LoRA alpha must be positive, got {alpha!r}")
  if lora_modules(model):
    raise ValueError("the model already has LoRA adapters; merge_lora it first")
  pattern = re.compile(targets)
  rngs = nnx.Rngs(0) if rngs is None else rngs
  found = [(p, m) for p, m in nnx.iter_graph(model)
           if isinstance(m, nnx.Linear) and pattern.search(_path_str(p))]
  if not found:
    names = [_path_str(p) for p, m in nnx.iter_graph(model) if isinstance(m, nnx.Linear)]
    raise ValueError(f"LoRA targets {targets!r} match no projection; projections are e.g. "
                     f"{names[:8]}")
  for path, linear in found:
    parent = model
    for key in path[:-1]:
      parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    _set_child(parent, path[-1], LoRALinear(linear, rank, alpha, rngs=rngs,
                                            param_dtype=param_dtype))
  return model


def merge_lora(model):
  """A plain LLaDA (no LoRA modules) whose kernels are W + (alpha / r) · A B (for export).

  The input model is left unchanged; unadapted parameters are shared (JAX arrays are immutable).
  """
  from egspo.model.llada import LLaDA

  adapted = {tuple(k.split(".")): m for k, m in lora_modules(model).items()}
  plain = nnx.eval_shape(lambda: LLaDA(model.cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract = nnx.split(plain)
  values = {tuple(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model))}
  merged_kernels = {k + ("kernel",): m.merged_kernel() for k, m in adapted.items()}
  flat = []
  for path, var in nnx.to_flat_state(abstract):
    key = tuple(map(str, path))
    if key in merged_kernels:
      value = merged_kernels[key]
    elif key in values:
      value = values[key].get_value()
    else:
      raise ValueError(f"merge_lora: no value for {_path_str(path)} in the LoRA model")
    flat.append((path, var.replace(value)))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def num_lora_params(model) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))


__all__ = ["DEFAULT_TARGETS", "LoRALinear", "apply_lora", "merge_lora", "lora_modules",
           "num_lora_params"]
