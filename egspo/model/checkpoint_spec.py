"""What a LLaDA checkpoint holds (REFERENCE §1): every tensor's Hugging Face name, shape and place
in the Flax model, its layer group, and config.json ⇄ `ModelConfig`.

Hugging Face names are `model.transformer.*` with PyTorch `[out, in]` weights; Flax kernels are
`[in, out]`, so every projection is transposed. A group (`embed`, `layer_00000`, …, `final`) is
the unit the converter reads, writes and places at a time.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import ml_dtypes
import numpy as np

from egspo.hub import CheckpointError
from egspo.model.llada import ModelConfig

CONFIG = "config.json"
PARAM_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                "float16": np.dtype(np.float16)}

_PREFIX = "model.transformer."
EMBED = _PREFIX + "wte.weight"  # its dtype is taken as the checkpoint's storage dtype
_BLOCK_NORMS = ("attn_norm", "ff_norm")
_BLOCK_PROJS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One checkpoint tensor: HF name, its place in a group's Flax tree, shapes on both sides."""

  hf_name: str
  group: str
  flax_path: tuple[str, ...]  # path inside the group, e.g. ("q_proj", "kernel")
  hf_shape: tuple[int, ...]
  transpose: bool  # PyTorch [out, in] ⇄ Flax kernel [in, out]

  @property
  def flax_shape(self) -> tuple[int, ...]:
    return tuple(reversed(self.hf_shape)) if self.transpose else self.hf_shape


def layer_group(i: int) -> str:
  return f"layer_{i:05d}"


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
  """Every tensor of a LLaDA checkpoint with `cfg`, in checkpoint (group) order."""
  d, f, v = cfg.d_model, cfg.mlp_hidden_size, cfg.embedding_size
  kv = cfg.n_kv_heads * cfg.head_dim
  proj_shapes = {"q_proj": (d, d), "k_proj": (kv, d), "v_proj": (kv, d), "attn_out": (d, d),
                 "ff_proj": (f, d), "up_proj": (f, d), "ff_out": (d, f)}
  specs = [TensorSpec(EMBED, "embed", ("wte", "embedding"), (v, d), False)]
  for i in range(cfg.n_layers):
    p, g = f"{_PREFIX}blocks.{i}.", layer_group(i)
    for n in _BLOCK_NORMS:
      specs.append(TensorSpec(p + n + ".weight", g, (n, "weight"), (d,), False))
    for n in _BLOCK_PROJS:
      specs.append(TensorSpec(p + n + ".weight", g, (n, "kernel"), proj_shapes[n], True))
  specs.append(TensorSpec(_PREFIX + "ln_f.weight", "final", ("ln_f", "weight"), (d,), False))
  specs.append(TensorSpec(_PREFIX + "ff_out.weight", "final", ("ff_out", "kernel"), (v, d), True))
  return specs


def group_names(cfg: ModelConfig) -> list[str]:
  return ["embed"] + [layer_group(i) for i in range(cfg.n_layers)] + ["final"]


def group_specs(cfg: ModelConfig) -> dict[str, list[TensorSpec]]:
  """Group name → its tensors, groups in checkpoint order."""
  out: dict[str, list[TensorSpec]] = {g: [] for g in group_names(cfg)}
  for s in tensor_specs(cfg):
    out[s.group].append(s)
  return out


def model_path(cfg: ModelConfig, spec: TensorSpec) -> tuple[tuple, int | None]:
  """(path in the model's pure state dict, layer index along axis 0 of a scanned stack or None)."""
  if spec.group.startswith("layer_"):
    i = int(spec.group[len("layer_"):])
    if cfg.scan_layers:
      return ("blocks",) + spec.flax_path, i
    return ("blocks", i) + spec.flax_path, None
  return spec.flax_path, None


def check_tensors(shapes: dict[str, tuple[int, ...]], cfg: ModelConfig, where: str) -> None:
  """Every expected name present with the expected shape (name → shape), nothing unexpected."""
  specs = tensor_specs(cfg)
  missing = [s.hf_name for s in specs if s.hf_name not in shapes]
  if missing:
    raise CheckpointError(f"{where}: missing tensor {missing[0]}"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  unexpected = sorted(set(shapes) - {s.hf_name for s in specs})
  if unexpected:
    raise CheckpointError(f"{where}: unexpected tensor {unexpected[0]}"
                          + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
                          + " not in a LLaDA checkpoint with this config")
  for s in specs:
    got = tuple(shapes[s.hf_name])
    if got != s.hf_shape:
      raise CheckpointError(f"{where}: shape mismatch for tensor {s.hf_name}: checkpoint has "
                            f"{got}, config expects {s.hf_shape}")


def read_config_json(directory: pathlib.Path) -> dict[str, Any]:
  """The config.json of a checkpoint directory as a dict."""
  path = directory / CONFIG
  if not path.is_file():
    raise CheckpointError(f"{path} not found: a LLaDA checkpoint directory needs config.json")
  try:
    cfg = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path} is not valid JSON: {e}") from e
  if not isinstance(cfg, dict):
    raise CheckpointError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
  return cfg


def config_from_json(cfg_json: dict[str, Any], where: str, *, tensor_dtype: np.dtype | None = None,
                     **overrides) -> ModelConfig:
  """ModelConfig from a LLaDA config.json dict.

  `param_dtype` (unless overridden) is the config's `param_dtype`/`torch_dtype`, else the dtype
  the tensors are stored in (`tensor_dtype`), else float32: an 8B bf16 checkpoint stays bf16.
  """
  if cfg_json.get("weight_tying"):
    raise CheckpointError(f"{where}: weight_tying=true is not a LLaDA-8B layout (untied head "
                          "expected, REFERENCE §1)")
  stored = cfg_json.get("param_dtype", cfg_json.get("torch_dtype"))
  if stored not in PARAM_DTYPES and tensor_dtype is not None:
    stored = next((k for k, v in PARAM_DTYPES.items() if v == tensor_dtype), None)
  if "param_dtype" not in overrides and stored in PARAM_DTYPES:
    overrides["param_dtype"] = stored
  try:
    return ModelConfig.from_hf_config(cfg_json, **overrides)
  except (ValueError, TypeError, KeyError) as e:
    raise CheckpointError(f"{where}: {e}") from e
