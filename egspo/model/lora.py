"""LoRA (low-rank adaptation) of chosen LLaDA projections.

A target projection `y = x W` becomes `y = x W + (alpha / r) · (x A) B` with `A [in, r]`
(random) and `B [r, out]` zero-initialised, so the adapted model starts exactly equal to the base
model (Hu et al. 2021). `A` and `B` are `nnx.LoRAParam`s: `nnx.Optimizer(model, tx,
wrt=nnx.LoRAParam)` trains only them while `W` stays an `nnx.Param` at its original path
(`blocks.{i}.q_proj.kernel`), so checkpoints, conversion and sharding rules are unchanged.
The LoRA factors carry logical axes too (`(in_axis, "lora_rank")`, `("lora_rank", out_axis)`),
and for scanned block stacks they get the same leading layer axis as the kernels.

Which projections are adapted (`lora.targets`, `target_pattern`): a named set of `TARGET_SETS`
('reference': the four the released trainer adapts; 'all_linear': every block projection), block
projection names joined by '|' or ',', or 're:' + a regular expression over module paths. Named
sets and names match inside the transformer blocks only, so the top-level LM head `ff_out` (which
shares its name with the blocks' down projection) is never adapted unless a raw regex asks for it.

LoRA dropout (PEFT's `lora_dropout`) drops the adapter's input, `(alpha / r) · (drop(x) A) B`, in
training forwards only: `enable_dropout(model, key)` gives every adapter its mask key for one
forward (the update step calls it); without it, forwards (rollouts, evaluation, π_old, π_ref) are
deterministic.

REFERENCE §3.8: EGSPO trains LoRA r = 128, α = 64, dropout 0.05 on LLaDA-8B.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

# The projections of a transformer block (`llada.Block`; LLaDA's Hugging Face names too). Their
# paths are "blocks.3.q_proj" (list of blocks) or "blocks.q_proj" (scanned stack); the LM head's is
# "ff_out".
BLOCK_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")
TARGET_SETS = {
    # The released trainer's PEFT targets are LLaMA's names (q/k/v/o/up/down/gate_proj); in LLaDA
    # (o, down, gate = attn_out, ff_out, ff_proj) they match only these four.
    "reference": ("q_proj", "k_proj", "v_proj", "up_proj"),
    # Every projection inside the blocks (not the embedding, not the LM head).
    "all_linear": BLOCK_PROJECTIONS,
}
DEFAULT_TARGETS = "reference"
REGEX_PREFIX = "re:"  # `lora.targets = "re:<regex>"`: searched in the module path


def target_pattern(targets: str) -> re.Pattern:
  """The regex over module paths that `targets` selects (see the module docstring).

  A named set or '|'/','-joined block projection names → the paths `blocks.[i.]<name>` exactly
  (inside the blocks: never the LM head); 're:<regex>' → that regex, searched in the path. Raises
  ValueError naming the allowed values (`targets_error` gives the reason alone).
  """
  why = targets_error(targets)
  if why:
    raise ValueError(f"LoRA targets {targets!r}: {why}")
  if targets.startswith(REGEX_PREFIX):
    return re.compile(targets[len(REGEX_PREFIX):])
  return re.compile(rf"^blocks\.(\d+\.)?({'|'.join(_names(targets))})$")


def _names(targets: str) -> tuple[str, ...]:
  return TARGET_SETS.get(targets) or tuple(n.strip() for n in re.split(r"[|,]", targets))


def targets_error(targets) -> str | None:
  """Why `targets` is not a valid LoRA target spec, or None."""
  if not isinstance(targets, str) or not targets.strip():
    return "must be a non-empty string"
  if targets.startswith(REGEX_PREFIX):
    try:
      re.compile(targets[len(REGEX_PREFIX):])
    except re.error as e:
      return f"bad regular expression ({e})"
    return None if targets[len(REGEX_PREFIX):] else "empty regular expression"
  unknown = [n for n in _names(targets) if n not in BLOCK_PROJECTIONS]
  if unknown:
    return (f"unknown projection(s) {unknown}; allowed: a set of {sorted(TARGET_SETS)}, names of "
            f"{list(BLOCK_PROJECTIONS)} joined by '|', or '{REGEX_PREFIX}<regex>' over module paths")
  return None


def is_target(path: str, targets: str) -> bool:
  """Does `targets` adapt the projection at `path` (e.g. "blocks.0.q_proj", "ff_out")?"""
  return target_pattern(targets).search(path) is not None


class LoRADropoutKey(nnx.Variable):
  """An adapter's dropout-mask key data for one training forward (`enable_dropout`)."""


class LoRALinear(nnx.Module):
  """A bias-free projection with a LoRA update: x [..., in] → [..., out].

  `kernel` is the base projection's own variable (same path, same metadata). Works for a single
  kernel [in, out] and for a scanned stack [layers, in, out] (then A is [layers, in, r] and B
  [layers, r, out]; `nnx.scan` slices all three together). `dropout`: the rate at which the
  adapter's input is dropped (inverted scaling) in a forward given a `dropout_key`.
  """

  def __init__(self, base: nnx.Linear, rank: int, alpha: float, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32, dropout: float = 0.0):
    if getattr(base, "bias", None) is not None:
      raise ValueError("LoRALinear wraps bias-free projections only (LLaDA has no biases)")
    self.kernel = base.kernel
    shape = self.kernel.get_value().shape
    lead, (d_in, d_out) = tuple(shape[:-2]), shape[-2:]
    axes = self.kernel.get_metadata().get("logical_axes") or (None, None)
    self.rank = rank
    self.scale = alpha / rank
    self.dropout = float(dropout)
    self.dropout_key = nnx.data(None)  # a LoRADropoutKey in a training forward (`enable_dropout`)
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
    if self.dropout > 0 and self.dropout_key is not None:
      keep = jax.random.bernoulli(jax.random.wrap_key_data(self.dropout_key[...]),
                                  1.0 - self.dropout, x.shape)
      x = jnp.where(keep, x / jnp.asarray(1.0 - self.dropout, dtype), jnp.zeros((), dtype))
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
               rngs: nnx.Rngs | None = None, param_dtype=jnp.float32, dropout: float = 0.0):
  """Replaces every `nnx.Linear` that `targets` selects (`target_pattern`) by a LoRALinear, in
  place.

  rank r and alpha give the update scale alpha / r. LoRA factors are created in `param_dtype`
  (float32 by default: they are few and are what the optimiser updates). `dropout` in [0, 1): the
  adapters' input dropout in training forwards (`enable_dropout`). Returns the model.
  """
  if not isinstance(rank, int) or rank <= 0:
    raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
  if not alpha > 0:
    raise ValueError(f"LoRA alpha must be positive, got {alpha!r}")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
  if lora_modules(model):
    raise ValueError("the model already has LoRA adapters; merge_lora it first")
  pattern = target_pattern(targets)
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
                                            param_dtype=param_dtype, dropout=dropout))
  return model


def enable_dropout(model, key) -> None:
  """Gives every adapter with dropout > 0 its mask key for the next forward(s) of `model`, in place.

  For a training forward on a model rebuilt inside the traced step (`rl.update.make_update_step`):
  adapter i (sorted paths) masks with fold_in(key, i), and layer l of a scanned stack with the l-th
  key of split(fold_in(key, i), layers). A model without adapters or dropout is left as is.
  """
  for i, (_, m) in enumerate(sorted(lora_modules(model).items())):
    if m.dropout <= 0:
      continue
    k = jax.random.fold_in(key, i)
    lead = m.kernel.get_value().shape[:-2]
    if lead:  # a scanned stack: one key per layer, sliced with the kernels
      k = jax.random.split(k, lead)
    m.dropout_key = LoRADropoutKey(jax.random.key_data(k))


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


__all__ = ["BLOCK_PROJECTIONS", "DEFAULT_TARGETS", "TARGET_SETS", "LoRALinear", "apply_lora",
           "enable_dropout", "is_target", "merge_lora", "lora_modules", "num_lora_params",
           "target_pattern"]
