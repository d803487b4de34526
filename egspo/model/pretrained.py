"""Load, convert, save and export LLaDA checkpoints, one layer group at a time.

`from_pretrained` reads either layout (Hugging Face safetensors, or the egspo orbax directory of
`egspo.model.orbax_io`) straight into the requested shardings; `convert_hf_to_orbax` (what
`python -m egspo.convert` runs) and `save_pretrained_orbax` write the orbax layout; `export_hf`
writes safetensors shards for PyTorch users. Design and memory bounds: docs/conversion.md.

A checkpoint to read is a local directory, a hub repo id (`egspo.hub.resolve_checkpoint`) or, in
the orbax layout, a `gs://` URL; an output is a local directory (made absolute) or a `gs://` URL.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx, traverse_util

from egspo import paths
from egspo import sharding as sharding_lib
from egspo import tokenizer as tok_lib
from egspo.hub import (REMOTE_CODE_FILES, TOKENIZER_FILES, CheckpointError, is_remote,
                       resolve_checkpoint)
from egspo.model import checkpoint_spec as spec_lib
from egspo.model import orbax_io
from egspo.model import safetensors_io as st
from egspo.model.checkpoint_spec import CONFIG, PARAM_DTYPES, TensorSpec
from egspo.model.llada import LLaDA, ModelConfig

# ----------------------------------------------------------------------------------------------
# Locations


def _checkpoint_dir(path, **kwargs):
  """A checkpoint to read: a local dir or hub repo id (`resolve_checkpoint(path, **kwargs)`), or
  a `scheme://` URL (`epath.Path`; the orbax layout only)."""
  return epath.Path(path) if is_remote(path) else resolve_checkpoint(path, **kwargs)


def _prepare_out_dir(out_dir, overwrite: bool):
  """An empty output directory: local → absolute `pathlib.Path`; `scheme://` → `epath.Path`."""
  out_dir = epath.Path(out_dir) if is_remote(out_dir) else pathlib.Path(paths.resolve_path(out_dir))
  if out_dir.exists() and any(out_dir.iterdir()):
    if not overwrite:
      raise FileExistsError(f"output directory {out_dir} exists and is not empty "
                            "(pass overwrite=True / --overwrite)")
    if isinstance(out_dir, pathlib.Path):
      shutil.rmtree(out_dir)
    else:
      out_dir.rmtree()
  out_dir.mkdir(parents=True, exist_ok=True)
  return out_dir


def checkpoint_layout(path: str | os.PathLike) -> str:
  """'orbax' (an egspo orbax dir) or 'hf' (a Hugging Face dir); a clear error otherwise."""
  path = _checkpoint_dir(path)
  if not path.is_dir():
    raise CheckpointError(f"checkpoint directory {path} does not exist")
  if (path / orbax_io.MANIFEST).is_file():
    return "orbax"
  if (path / st.INDEX).is_file() or (path / st.SINGLE).is_file():
    return "hf"
  if (path / "params").is_dir():
    raise CheckpointError(f"{path}: orbax params/ without {orbax_io.MANIFEST}: an unfinished or "
                          "corrupt conversion; convert again")
  raise CheckpointError(f"{path} is neither an egspo orbax checkpoint ({orbax_io.MANIFEST}) nor "
                        f"a Hugging Face checkpoint ({st.INDEX} or {st.SINGLE})")


def _hf_dir(path) -> pathlib.Path:
  """The local directory of an HF checkpoint (a local dir or hub repo id; not a URL)."""
  if is_remote(path):
    raise CheckpointError(f"{path}: a Hugging Face checkpoint is read from a local directory or "
                          "a hub repo id; convert it there first (python -m egspo.convert)")
  return resolve_checkpoint(path)


def index_hf_checkpoint(path: str | os.PathLike) -> dict[str, st.Entry]:
  """Name → safetensors entry over all shards of an HF checkpoint (local dir or hub repo id)."""
  return st.index_checkpoint(_hf_dir(path))


def _hf_config(path, entries: dict[str, st.Entry], overrides: dict) -> ModelConfig:
  """The config of an HF checkpoint, its tensors' names and shapes checked against it."""
  embed = entries.get(spec_lib.EMBED)
  cfg = spec_lib.config_from_json(spec_lib.read_config_json(path), str(path / CONFIG),
                                  tensor_dtype=None if embed is None else embed.dtype, **overrides)
  spec_lib.check_tensors({n: e.shape for n, e in entries.items()}, cfg, str(path))
  return cfg


def load_config(path: str | os.PathLike, **overrides) -> ModelConfig:
  """The ModelConfig of a checkpoint dir (either layout) with field overrides."""
  path = _checkpoint_dir(path)
  checkpoint_layout(path)
  return spec_lib.config_from_json(spec_lib.read_config_json(path), str(path / CONFIG),
                                   **overrides)


# ----------------------------------------------------------------------------------------------
# Tokenizer and config.json beside the weights


def save_tokenizer(tokenizer, out_dir, cfg_json: dict[str, Any]) -> None:
  """Put the model's tokenizer beside its weights.

  tokenizer: None (nothing), a directory (its tokenizer files are copied), an
  `egspo.tokenizer.HFTokenizer` (saved with `save_pretrained`) or a `CharTokenizer` (recorded as
  `"egspo_tokenizer": "char"` in `cfg_json`, which the caller writes as config.json).
  """
  if tokenizer is None:
    return
  if isinstance(tokenizer, tok_lib.CharTokenizer):
    cfg_json["egspo_tokenizer"] = "char"
  elif isinstance(tokenizer, tok_lib.HFTokenizer):
    with tempfile.TemporaryDirectory() as tmp:  # transformers writes local directories only
      tokenizer.tok.save_pretrained(tmp)
      for f in sorted(pathlib.Path(tmp).iterdir()):
        _copy_file(f, out_dir / f.name)
  elif isinstance(tokenizer, (str, os.PathLike)):
    src = _checkpoint_dir(tokenizer, what="tokenizer", weights=False)
    for name in TOKENIZER_FILES:
      if (src / name).is_file():
        _copy_file(src / name, out_dir / name)
    try:  # a CPU-preset checkpoint records its built-in tokenizer in config.json
      if json.loads((src / CONFIG).read_text()).get("egspo_tokenizer") == "char":
        cfg_json["egspo_tokenizer"] = "char"
    except (OSError, ValueError, AttributeError):
      pass
  else:
    raise TypeError(f"tokenizer must be None, a directory, an HFTokenizer or a CharTokenizer, got "
                    f"{type(tokenizer).__name__}")


def _copy_file(src, dst) -> None:
  """One file, local or `scheme://` on either side (a hub cache symlink is followed)."""
  if is_remote(src) or is_remote(dst):
    epath.Path(src).copy(epath.Path(dst), overwrite=True)
  else:
    shutil.copyfile(src, dst)


# `auto_map` of an export: LLaDA's modeling code beside the weights when the source had it, else
# the code of the hub repo the 8B checkpoints come from (transformers' "REPO--module.Class").
LLADA_CODE_REPO = "GSAI-ML/LLaDA-8B-Instruct"
_AUTO_MAP = {"AutoConfig": "configuration_llada.LLaDAConfig",
             "AutoModel": "modeling_llada.LLaDAModelLM",
             "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"}


def _copy_remote_code(source, out_dir) -> bool:
  """Copy LLaDA's modeling code (`REMOTE_CODE_FILES`) from a source checkpoint directory, if it
  has it; True if `out_dir` then holds all of it."""
  if isinstance(source, (str, os.PathLike)):
    src = _checkpoint_dir(source, what="checkpoint", weights=False)
    if all((src / f).is_file() for f in REMOTE_CODE_FILES):
      for f in REMOTE_CODE_FILES:
        _copy_file(src / f, out_dir / f)
  return all((out_dir / f).is_file() for f in REMOTE_CODE_FILES)


def _write_config(out_dir, cfg: ModelConfig, source, *, auto_map: bool = False,
                  **extra) -> None:
  """config.json (LLaDA's fields, `extra`), the tokenizer of `source` (see `save_tokenizer`) and
  its modeling code; `auto_map` (an HF export) names that code, or the hub's if there is none."""
  cfg_json = dict(cfg.to_hf_config(), **extra)
  save_tokenizer(source, out_dir, cfg_json)
  local_code = _copy_remote_code(source, out_dir)
  if auto_map:
    cfg_json["auto_map"] = {k: v if local_code else f"{LLADA_CODE_REPO}--{v}"
                            for k, v in _AUTO_MAP.items()}
  (out_dir / CONFIG).write_text(json.dumps(cfg_json, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# HF → orbax


def convert_hf_to_orbax(checkpoint: str | os.PathLike, output: str | os.PathLike, *,
                        param_dtype: str | None = None, overwrite: bool = False,
                        log: Callable[[str], None] | None = None) -> ModelConfig:
  """Convert an HF LLaDA checkpoint into an egspo orbax dir, one layer group at a time.

  Every name and shape is checked from the safetensors headers before anything is written;
  peak host memory ≈ one layer group + one read chunk + a constant. Returns the ModelConfig
  written to `output/config.json`.
  """
  checkpoint = _hf_dir(checkpoint)
  entries = st.index_checkpoint(checkpoint)
  cfg = _hf_config(checkpoint, entries,
                   {} if param_dtype is None else {"param_dtype": param_dtype})
  out_dir = _prepare_out_dir(output, overwrite)
  dtype = PARAM_DTYPES[cfg.param_dtype]
  for group, specs in spec_lib.group_specs(cfg).items():
    orbax_io.save_group(out_dir, group, {
        s.flax_path: st.read_tensor(entries[s.hf_name], transpose=s.transpose, dtype=dtype)
        for s in specs})
    if log is not None:
      log(f"wrote {group}")
  _write_config(out_dir, cfg, checkpoint, param_dtype=cfg.param_dtype)
  orbax_io.write_manifest(out_dir, cfg, source=str(checkpoint))
  return cfg


# ----------------------------------------------------------------------------------------------
# Loading


def _drop_leading_axis(sharding):
  """Sharding of one layer of a stacked [n_layers, ...] array sharded by `sharding`."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = jax.sharding.PartitionSpec(*tuple(sharding.spec)[1:])
    return jax.sharding.NamedSharding(sharding.mesh, spec, memory_kind=sharding.memory_kind)
  return sharding


@functools.lru_cache(maxsize=None)
def _zeros_fn(shape, dtype, sharding):
  return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _set_layer_fn(sharding):
  # Donating the stack makes the update in place: peak device memory = the stack + one layer.
  return jax.jit(lambda stack, layer, i: jax.lax.dynamic_update_index_in_dim(stack, layer, i, 0),
                 out_shardings=sharding, donate_argnums=0)


def _resolve_shardings(abs_state: nnx.State, mesh, shardings, rules) -> dict[tuple, Any]:
  """path → target sharding of every parameter of the (abstract) model."""
  flat = traverse_util.flatten_dict(abs_state.to_pure_dict())
  if shardings is None and mesh is None:
    return dict.fromkeys(flat, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  if shardings is None:
    shardings = sharding_lib.logical_to_mesh_sharding(
        abs_state, mesh, sharding_lib.RULES if rules is None else rules)
  if isinstance(shardings, jax.sharding.Sharding):
    return dict.fromkeys(flat, shardings)
  if isinstance(shardings, nnx.State):
    shardings = shardings.to_pure_dict()
  if not isinstance(shardings, dict):
    raise TypeError("shardings must be a Sharding, an nnx.State or a nested dict of shardings "
                    f"matching the model's parameters, got {type(shardings).__name__}")
  given = traverse_util.flatten_dict(shardings)
  out = {}
  for p in flat:
    s = given.get(p)
    if isinstance(s, nnx.Variable):
      s = s.get_value()
    if not isinstance(s, jax.sharding.Sharding):
      raise ValueError(f"shardings has no Sharding for parameter {'/'.join(map(str, p))}")
    out[p] = s
  return out


def _group_arrays(path, entries: dict[str, st.Entry] | None, dtype: np.dtype, group: str,
                  specs: list[TensorSpec], targets: dict) -> Iterator[tuple[TensorSpec, jax.Array]]:
  """(spec, device array in its target sharding) for every tensor of one group."""
  if entries is None:
    restored = orbax_io.restore_group(path, group, specs, dtype, targets)
    yield from ((s, restored[s.flax_path]) for s in specs)
    return
  for s in specs:
    arr = st.read_tensor(entries[s.hf_name], transpose=s.transpose, dtype=dtype)
    # Each device copies only its own slice of the host tensor.
    yield s, jax.make_array_from_callback(s.flax_shape, targets[s.flax_path],
                                          lambda idx, a=arr: a[idx])
    del arr


def from_pretrained(path: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None,
                    shardings=None, rules=None, **config_overrides) -> LLaDA:
  """Load a LLaDA model from an HF dir or an egspo orbax dir, straight into its shardings.

  Args:
    path: checkpoint directory (either layout, detected from its files; relative, `~/…` or
      absolute), a hub repo id `ORG/NAME[@REVISION]`, or a `gs://…` URL of an orbax directory.
    mesh: optional mesh; without `shardings` each parameter gets the sharding its
      `logical_axes` map to under `rules` (default `egspo.sharding.RULES`).
    shardings: optional target shardings: one `Sharding` for all, or an `nnx.State`/nested dict
      of `NamedSharding`s matching `nnx.state(model, nnx.Param)` for the requested layout
      (stacked `[n_layers, …]` leaves when `scan_layers=True`).
    rules: logical → mesh axis rules used with `mesh`.
    **config_overrides: ModelConfig fields (`param_dtype`, `dtype`, `scan_layers`, `remat`, ...);
      `param_dtype` defaults to the checkpoint's stored dtype.
  Neither mesh nor shardings: everything on the first device. The model is built with
  `nnx.eval_shape` (no random init); each tensor is read once, into its target sharding.
  """
  path = _checkpoint_dir(path)
  if checkpoint_layout(path) == "orbax":
    entries = None
    manifest = orbax_io.read_manifest(path)
    config_overrides.setdefault("param_dtype", manifest.get("param_dtype", "float32"))
    cfg = spec_lib.config_from_json(spec_lib.read_config_json(path), str(path / CONFIG),
                                    **config_overrides)
    orbax_io.check_groups(path, manifest, cfg)
  else:
    entries = index_hf_checkpoint(path)
    cfg = _hf_config(path, entries, config_overrides)
  graphdef, abs_state = nnx.split(nnx.eval_shape(lambda: LLaDA(cfg, rngs=nnx.Rngs(0))))
  targets = _resolve_shardings(abs_state, mesh, shardings, rules)
  flat_abs = traverse_util.flatten_dict(abs_state.to_pure_dict())
  values: dict[tuple, jax.Array] = {}
  for group, specs in spec_lib.group_specs(cfg).items():
    group_targets = {}
    for s in specs:
      mpath, layer = spec_lib.model_path(cfg, s)
      group_targets[s.flax_path] = (targets[mpath] if layer is None
                                    else _drop_leading_axis(targets[mpath]))
    for s, arr in _group_arrays(path, entries, PARAM_DTYPES[cfg.param_dtype], group, specs,
                                group_targets):
      mpath, layer = spec_lib.model_path(cfg, s)
      if layer is None:
        values[mpath] = arr
        continue
      if mpath not in values:
        a = flat_abs[mpath]
        values[mpath] = _zeros_fn(tuple(a.shape), a.dtype, targets[mpath])()
      values[mpath] = _set_layer_fn(targets[mpath])(values[mpath], arr, jnp.int32(layer))
      del arr
    orbax_io.release_freed_memory()
  missing = set(flat_abs) - set(values)
  if missing:
    raise AssertionError(f"parameters not loaded: {sorted(map(str, missing))[:3]}")
  nnx.replace_by_pure_dict(abs_state, traverse_util.unflatten_dict(values))
  return nnx.merge(graphdef, abs_state)


# ----------------------------------------------------------------------------------------------
# Saving and export


def _model_param(model: LLaDA) -> Callable[[TensorSpec], jax.Array]:
  """get(spec) → the model's parameter for that tensor in Flax layout (one layer sliced)."""
  flat = traverse_util.flatten_dict(nnx.state(model, nnx.Param).to_pure_dict())

  def get(spec: TensorSpec) -> jax.Array:
    mpath, layer = spec_lib.model_path(model.cfg, spec)
    return flat[mpath] if layer is None else flat[mpath][layer]

  return get


def _to_host(arr: jax.Array) -> np.ndarray:
  if isinstance(arr, jax.Array) and not arr.is_fully_addressable:
    from jax.experimental import multihost_utils  # gathers a multi-process array on every host

    return np.asarray(multihost_utils.process_allgather(arr, tiled=True))
  return np.asarray(jax.device_get(arr))


def save_pretrained_orbax(model: LLaDA, out_dir: str | os.PathLike, *, tokenizer=None,
                          overwrite: bool = False) -> None:
  """Write `model` as an egspo orbax dir (the layout `python -m egspo.convert` writes).

  `tokenizer` (optional, see `save_tokenizer`) is stored beside the weights, so that
  `egspo.tokenizer.load_tokenizer(out_dir)` returns it (with a checkpoint directory, its LLaDA
  modeling code too, for a later `export_hf`). Orbax saves sharded arrays shard by
  shard; a scanned model is written layer by layer.
  """
  out_dir = _prepare_out_dir(out_dir, overwrite)
  get = _model_param(model)
  for group, specs in spec_lib.group_specs(model.cfg).items():
    orbax_io.save_group(out_dir, group, {s.flax_path: get(s) for s in specs})
  _write_config(out_dir, model.cfg, tokenizer, param_dtype=model.cfg.param_dtype)
  orbax_io.write_manifest(out_dir, model.cfg, source="save_pretrained_orbax")


def export_hf(model: LLaDA, out_dir: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30,
              dtype: str | None = None, tokenizer=None,
              overwrite: bool = False) -> list[pathlib.Path]:
  """Write `model` in LLaDA's Hugging Face layout (REFERENCE §1) for PyTorch users.

  Files: `config.json`; `model.safetensors` if everything fits in one shard, else
  `model-0000X-of-0000N.safetensors` (each ≤ max_shard_bytes unless one tensor is larger) and
  `model.safetensors.index.json`. Kernels are transposed back to `[out, in]`; tensors are fetched
  from the devices and written one at a time. `dtype` (default: the param dtype) sets the stored
  dtype; `tokenizer` (optional, see `save_tokenizer`) is written beside the weights, and when it
  is a checkpoint directory holding LLaDA's modeling code (`REMOTE_CODE_FILES`), that code too.
  config.json carries LLaDA-8B's architecture fields and an `auto_map` naming that code (or,
  without it, the hub's `LLADA_CODE_REPO`), so `transformers.AutoModel.from_pretrained(out_dir,
  trust_remote_code=True)` builds this model. Returns the shard paths.
  """
  if max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
  dtype = dtype or model.cfg.param_dtype
  if dtype not in PARAM_DTYPES:
    raise ValueError(f"dtype must be one of {sorted(PARAM_DTYPES)}, got {dtype!r}")
  dt = PARAM_DTYPES[dtype]
  out_dir = _prepare_out_dir(out_dir, overwrite)
  get = _model_param(model)
  specs = spec_lib.tensor_specs(model.cfg)
  sizes = [int(np.prod(s.hf_shape)) * dt.itemsize for s in specs]
  plan = st.shard_plan(sizes, max_shard_bytes)
  names = ([st.SINGLE] if len(plan) == 1 else
           [f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors" for k in range(len(plan))])

  def fetch(s: TensorSpec) -> Callable[[], np.ndarray]:
    def f():
      arr = _to_host(get(s)).astype(dt, copy=False)
      return arr.T if s.transpose else arr
    return f

  files, weight_map = [], {}
  for fname, idx in zip(names, plan):
    st.write_file(out_dir / fname, [(specs[i].hf_name, fetch(specs[i]), dt, specs[i].hf_shape)
                                    for i in idx], write=jax.process_index() == 0)
    files.append(out_dir / fname)
    weight_map.update({specs[i].hf_name: fname for i in idx})
  if jax.process_index() == 0:
    if len(plan) > 1:
      index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
      (out_dir / st.INDEX).write_text(json.dumps(index, indent=2) + "\n")
    _write_config(out_dir, model.cfg, tokenizer, auto_map=True, architectures=["LLaDAModelLM"],
                  torch_dtype=dtype)
  return files
