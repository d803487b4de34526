"""LLaDA checkpoints: Hugging Face safetensors ⇄ egspo orbax directories, streamed tensor by tensor.

REFERENCE §1 fixes the checkpoint: tensor names `model.transformer.*`, PyTorch `[out, in]` weights
(Flax kernels are `[in, out]`, so every projection is transposed), `config.json` with LLaDA's keys.

Two on-disk layouts, both readable by `from_pretrained`:

* **HF directory** — `config.json` and either `model.safetensors` or sharded
  `model-0000X-of-0000N.safetensors` with `model.safetensors.index.json`. Read with a small
  safetensors reader of our own (the format is an 8-byte little-endian header length, a JSON header
  `{name: {dtype, shape, data_offsets}}`, then raw little-endian bytes). Each tensor is read alone
  with one `readinto` into a buffer of exactly its size, so nothing else of the shard is resident;
  bf16 is viewed as `ml_dtypes.bfloat16` (numpy has no native bf16 and safetensors' numpy
  front-end refuses it), which also makes export bit-exact.

* **egspo orbax directory** (what `python -m egspo.convert` and `save_pretrained_orbax` write)::

      OUT/config.json            LLaDA config.json (plus `param_dtype`)
      OUT/egspo_checkpoint.json  manifest: format, version, group names; written LAST
      OUT/params/embed/          orbax item {wte: {embedding}}
      OUT/params/layer_00000/    orbax item {attn_norm, q_proj, …, ff_out} of block 0 (Flax names)
      ...
      OUT/params/final/          orbax item {ln_f: {weight}, ff_out: {kernel}}

  Why one orbax item per group instead of one item for the whole tree: an orbax PyTree save needs
  every leaf of the tree in memory at the moment of the call, so a single item would hold the whole
  model (16 GB for LLaDA-8B in bf16) in host memory. One item per layer bounds the converter's peak
  host memory by the largest group (one transformer block, ≈ 0.44 GB for 8B in bf16, or the
  1 GB embedding/head) plus a constant, with only public orbax APIs (no hand-written
  tensorstore/OCDBT metadata that could drift from orbax's format). Groups are also
  layout-neutral: the same directory restores into the list layout or the `scan_layers` layout
  (stacked `[n_layers, …]` params, filled layer by layer in place on device), and each item is
  restored straight into its target `NamedSharding` so every device reads only its own shard.
  The manifest is written after all groups, so a directory without it is an unfinished
  conversion and is rejected with a clear error.

`from_pretrained` builds the model abstractly (`nnx.eval_shape`, no random init), then fills its
parameters group by group into the requested shardings; `export_hf` writes a model back to the HF
layout (size-bounded shards + index + config.json), also tensor by tensor.

A checkpoint to read is a local directory, a Hugging Face hub repo id (`ORG/NAME`, fetched into
the hub cache by `egspo.hub.resolve_checkpoint`) or, in the orbax layout, a `gs://` URL; an
output directory is local (made absolute: orbax refuses relative paths) or a `gs://` URL.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import shutil
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from egspo import paths
from egspo.model.llada import LLaDA, ModelConfig
from egspo.hub import (TOKENIZER_FILES, CheckpointError, CheckpointNotFoundError, is_remote,
                       resolve_checkpoint)

FORMAT_NAME = "egspo-llada-orbax"
FORMAT_VERSION = 1
MANIFEST = "egspo_checkpoint.json"
CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

_ST_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
              "BF16": np.dtype(ml_dtypes.bfloat16), "F64": np.dtype(np.float64)}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
              "float16": np.dtype(np.float16)}

_PREFIX = "model.transformer."
_BLOCK_NORMS = ("attn_norm", "ff_norm")
_BLOCK_PROJS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")


# ----------------------------------------------------------------------------------------------
# Name mapping (REFERENCE §1)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One checkpoint tensor: HF name, its place in a group's Flax tree, shapes on both sides."""

  hf_name: str
  group: str
  flax_path: tuple[str, ...]  # path inside the group item, e.g. ("q_proj", "kernel")
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
  specs = [TensorSpec(_PREFIX + "wte.weight", "embed", ("wte", "embedding"), (v, d), False)]
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


def _group_specs(cfg: ModelConfig) -> dict[str, list[TensorSpec]]:
  out: dict[str, list[TensorSpec]] = {g: [] for g in group_names(cfg)}
  for s in tensor_specs(cfg):
    out[s.group].append(s)
  return out


def _model_path(cfg: ModelConfig, group: str, flax_path: tuple[str, ...]) -> tuple[tuple, int | None]:
  """(path in the model's pure state dict, layer index to write along axis 0 or None)."""
  if group.startswith("layer_"):
    i = int(group[len("layer_"):])
    if cfg.scan_layers:
      return ("blocks",) + flax_path, i
    return ("blocks", i) + flax_path, None
  return flax_path, None


# ----------------------------------------------------------------------------------------------
# Locations and config.json


def _checkpoint_dir(path, **kwargs) -> pathlib.Path:
  """A checkpoint to read: a local dir or hub repo id (`egspo.hub.resolve_checkpoint`, with
  `kwargs`), or a `scheme://` URL (read through etils.epath; the orbax layout only)."""
  if is_remote(path):
    from etils import epath

    return epath.Path(path)
  return resolve_checkpoint(path, **kwargs)


def _output_dir(path):
  """A directory to write: local → absolute `pathlib.Path` (`~` expanded); `scheme://` →
  `epath.Path`."""
  if is_remote(path):
    from etils import epath

    return epath.Path(path)
  return pathlib.Path(paths.resolve_path(path))


def read_config_json(path: str | os.PathLike) -> dict[str, Any]:
  path = _checkpoint_dir(path) / CONFIG
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
  if stored not in _NP_DTYPES and tensor_dtype is not None:
    stored = next((k for k, v in _NP_DTYPES.items() if v == tensor_dtype), None)
  if "param_dtype" not in overrides and stored in _NP_DTYPES:
    overrides["param_dtype"] = stored
  try:
    return ModelConfig.from_hf_config(cfg_json, **overrides)
  except (ValueError, TypeError, KeyError) as e:
    raise CheckpointError(f"{where}: {e}") from e


# ----------------------------------------------------------------------------------------------
# safetensors (read + write), streaming


@dataclasses.dataclass(frozen=True)
class _StEntry:
  file: pathlib.Path
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int  # absolute byte offset in the file
  nbytes: int


def read_safetensors_header(path: pathlib.Path) -> dict[str, _StEntry]:
  """Name → entry of one safetensors file, validated against the file size."""
  try:
    size = path.stat().st_size
    with open(path, "rb") as fh:
      raw = fh.read(8)
      if len(raw) < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
      n = int.from_bytes(raw, "little")
      if n <= 0 or 8 + n > size:
        raise CheckpointError(f"{path}: corrupt safetensors header length {n} (file size {size})")
      header = json.loads(fh.read(n))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from e
  except OSError as e:
    raise CheckpointError(f"{path}: cannot read safetensors file: {e}") from e
  entries = {}
  for name, meta in header.items():
    if name == "__metadata__":
      continue
    dt = _ST_DTYPES.get(meta.get("dtype"))
    if dt is None:
      raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {meta.get('dtype')!r}; "
                            f"supported: {sorted(_ST_DTYPES)}")
    shape = tuple(int(s) for s in meta["shape"])
    begin, end = (int(o) for o in meta["data_offsets"])
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if end - begin != nbytes or 8 + n + end > size:
      raise CheckpointError(f"{path}: tensor {name} of shape {shape} {meta['dtype']} has data "
                            f"offsets {begin}..{end} inconsistent with the file ({size} bytes)")
    entries[name] = _StEntry(path, dt, shape, 8 + n + begin, nbytes)
  return entries


def read_tensor(entry: _StEntry, *, transpose: bool = False, dtype: np.dtype | None = None,
                chunk_bytes: int = 16 * 2**20) -> np.ndarray:
  """The tensor read into a fresh array of exactly its (output) size, nothing else resident.

  With `transpose` (2-D only) and/or a `dtype` different from the stored one, the file is read in
  row chunks of ≤ chunk_bytes that are transposed/cast into the output, so the peak is the output
  plus one chunk instead of two full copies.
  """
  dtype = entry.dtype if dtype is None else np.dtype(dtype)
  with open(entry.file, "rb") as fh:
    fh.seek(entry.offset)
    if (not transpose and dtype == entry.dtype) or not entry.shape:
      out = np.empty(entry.shape, entry.dtype)
      got = fh.readinto(memoryview(out.reshape(-1).view(np.uint8)))
      if got != entry.nbytes:
        raise CheckpointError(f"{entry.file}: short read ({got} of {entry.nbytes} bytes)")
      return out.astype(dtype, copy=False)
    if transpose and len(entry.shape) != 2:
      raise ValueError(f"transpose needs a 2-D tensor, got shape {entry.shape}")
    rows = entry.shape[0] if entry.shape else 1
    row_shape = entry.shape[1:]
    row_bytes = max(1, entry.nbytes // max(rows, 1))
    step = max(1, chunk_bytes // row_bytes)
    out = np.empty(tuple(reversed(entry.shape)) if transpose else entry.shape, dtype)
    buf = np.empty((min(step, rows),) + row_shape, entry.dtype)
    for r0 in range(0, rows, step):
      chunk = buf[: min(step, rows - r0)]
      want = chunk.nbytes
      got = fh.readinto(memoryview(chunk.reshape(-1).view(np.uint8)))
      if got != want:
        raise CheckpointError(f"{entry.file}: short read ({got} of {want} bytes)")
      if transpose:
        out[:, r0:r0 + len(chunk)] = chunk.T
      else:
        out[r0:r0 + len(chunk)] = chunk
    return out


def index_hf_checkpoint(path: str | os.PathLike) -> dict[str, _StEntry]:
  """Name → entry over all shards of an HF checkpoint dir (headers only; no tensor data read)."""
  if is_remote(path):
    raise CheckpointError(f"{path}: a Hugging Face checkpoint is read from a local directory or "
                          "a hub repo id; convert it there first (python -m egspo.convert)")
  path = _checkpoint_dir(path)
  index_file, single = path / INDEX, path / SINGLE
  if index_file.is_file():
    try:
      weight_map = json.loads(index_file.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
      raise CheckpointError(f"{index_file}: corrupt index (need a 'weight_map' object): {e}") from e
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
      shards.setdefault(shard, []).append(name)
    entries: dict[str, _StEntry] = {}
    for shard, names in sorted(shards.items()):
      file = path / shard
      if not file.is_file():
        raise CheckpointError(f"{index_file} maps tensor {names[0]} (and {len(names) - 1} more) "
                              f"to shard {shard}, which does not exist in {path}")
      header = read_safetensors_header(file)
      for name in names:
        if name not in header:
          raise CheckpointError(f"{index_file} maps tensor {name} to {shard}, but that shard has "
                                "no such tensor")
        entries[name] = header[name]
    return entries
  if single.is_file():
    return read_safetensors_header(single)
  raise CheckpointError(f"{path}: no {INDEX} and no {SINGLE}; not a Hugging Face checkpoint")


def _stored_dtype(entries: dict[str, _StEntry]) -> np.dtype | None:
  """The dtype of the embedding (the checkpoint's storage dtype), if present."""
  e = entries.get(_PREFIX + "wte.weight")
  return None if e is None else e.dtype


def check_tensors(entries: dict[str, Any], cfg: ModelConfig, where: str) -> None:
  """Every expected name present with the expected shape, and nothing unexpected."""
  specs = tensor_specs(cfg)
  expected = {s.hf_name for s in specs}
  missing = [s.hf_name for s in specs if s.hf_name not in entries]
  if missing:
    raise CheckpointError(f"{where}: missing tensor {missing[0]}"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  unexpected = sorted(set(entries) - expected)
  if unexpected:
    raise CheckpointError(f"{where}: unexpected tensor {unexpected[0]}"
                          + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
                          + " not in a LLaDA checkpoint with this config")
  for s in specs:
    got = tuple(entries[s.hf_name].shape)
    if got != s.hf_shape:
      raise CheckpointError(f"{where}: shape mismatch for tensor {s.hf_name}: checkpoint has "
                            f"{got}, config expects {s.hf_shape}")


def _write_safetensors(file: pathlib.Path, items: list[tuple[str, Callable[[], np.ndarray],
                                                              np.dtype, tuple[int, ...]]],
                       write: bool = True) -> None:
  """Write one safetensors file, fetching and writing one tensor at a time.

  items: (name, fetch() → array, dtype, shape); the header is computed up front from shapes.
  write=False only runs the fetches (other processes of a multi-host job take part in the
  gathers but write nothing).
  """
  if not write:
    for _, fetch, _, _ in items:
      fetch()
    return
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for name, _, dt, shape in items:
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    header[name] = {"dtype": _ST_NAMES[dt], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as the reference writer does
  tmp = file.with_suffix(".tmp")
  with tmp.open("wb") as fh:
    fh.write(len(raw).to_bytes(8, "little"))
    fh.write(raw)
    for name, fetch, dt, shape in items:
      arr = np.ascontiguousarray(fetch())
      if arr.dtype != dt or arr.shape != tuple(shape):
        raise AssertionError(f"{name}: fetched {arr.shape} {arr.dtype}, header says {shape} {dt}")
      fh.write(memoryview(arr.reshape(-1).view(np.uint8)))
      del arr
  tmp.replace(file)


# ----------------------------------------------------------------------------------------------
# orbax groups


def _orbax():
  import orbax.checkpoint as ocp  # local: importing orbax is slow and not needed by the model

  return ocp


def _nest(flat: dict[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    d = out
    for k in path[:-1]:
      d = d.setdefault(k, {})
    d[path[-1]] = v
  return out


def _release_freed_memory() -> None:
  """Hand freed heap pages back to the OS (glibc keeps them otherwise, inflating RSS)."""
  try:
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc: nothing to do
    pass


def _save_group(out_dir: pathlib.Path, group: str, tree: dict) -> None:
  """One orbax PyTree item, saved synchronously.

  Compression is off: measured with benchmarks/convert_memory.py, zstd made orbax hold about two
  extra copies of the group while writing (vs one without) and saved < 10% disk on weights.
  """
  ocp = _orbax()
  ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))
  ckptr.save(out_dir / "params" / group, args=ocp.args.PyTreeSave(tree))
  ckptr.close()
  _release_freed_memory()


def save_tokenizer(tokenizer, out_dir: pathlib.Path, cfg_json: dict[str, Any]) -> None:
  """Put the model's tokenizer beside its weights.

  tokenizer: None (nothing), a directory (its tokenizer files are copied), an
  `egspo.tokenizer.HFTokenizer` (saved with `save_pretrained`) or a `CharTokenizer` (recorded as
  `"egspo_tokenizer": "char"` in `cfg_json`, which the caller writes as config.json).
  """
  if tokenizer is None:
    return
  from egspo import tokenizer as tok_lib  # local: the tokenizer module imports nothing heavy

  if isinstance(tokenizer, tok_lib.CharTokenizer):
    cfg_json["egspo_tokenizer"] = "char"
  elif isinstance(tokenizer, tok_lib.HFTokenizer):
    if is_remote(out_dir):  # transformers writes local directories only
      import tempfile

      with tempfile.TemporaryDirectory() as tmp:
        tokenizer.tok.save_pretrained(tmp)
        for f in sorted(pathlib.Path(tmp).iterdir()):
          _copy_file(f, out_dir / f.name)
    else:
      tokenizer.tok.save_pretrained(str(out_dir))
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
    from etils import epath

    epath.Path(src).copy(epath.Path(dst), overwrite=True)
  else:
    shutil.copyfile(src, dst)


def _write_manifest(out_dir: pathlib.Path, cfg: ModelConfig, source: str, tokenizer=None) -> None:
  cfg_json = cfg.to_hf_config()
  cfg_json["param_dtype"] = cfg.param_dtype
  save_tokenizer(tokenizer, out_dir, cfg_json)
  (out_dir / CONFIG).write_text(json.dumps(cfg_json, indent=2) + "\n")
  manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "source": source,
              "param_dtype": cfg.param_dtype, "groups": group_names(cfg)}
  (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _prepare_out_dir(out_dir: str | os.PathLike, overwrite: bool) -> pathlib.Path:
  out_dir = _output_dir(out_dir)
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


def convert_hf_to_orbax(checkpoint: str | os.PathLike, output: str | os.PathLike, *,
                        param_dtype: str | None = None, overwrite: bool = False,
                        log: Callable[[str], None] | None = None) -> ModelConfig:
  """Convert an HF LLaDA checkpoint dir into an egspo orbax dir, one layer group at a time.

  All names and shapes are checked from the safetensors headers before anything is written.
  Peak host memory ≈ one layer group (+ one tensor being transposed) + a constant.
  Returns the ModelConfig written to `output/config.json`.
  """
  checkpoint = _checkpoint_dir(checkpoint)
  overrides = {} if param_dtype is None else {"param_dtype": param_dtype}
  cfg_json = read_config_json(checkpoint)
  entries = index_hf_checkpoint(checkpoint)
  cfg = config_from_json(cfg_json, str(checkpoint / CONFIG),
                         tensor_dtype=_stored_dtype(entries), **overrides)
  check_tensors(entries, cfg, str(checkpoint))
  out_dir = _prepare_out_dir(output, overwrite)
  target = _NP_DTYPES[cfg.param_dtype]
  for group, specs in _group_specs(cfg).items():
    flat = {}
    for s in specs:
      flat[s.flax_path] = read_tensor(entries[s.hf_name], transpose=s.transpose, dtype=target)
    _save_group(out_dir, group, _nest(flat))
    del flat
    _release_freed_memory()
    if log is not None:
      log(f"wrote {group}")
  _write_manifest(out_dir, cfg, source=str(checkpoint), tokenizer=checkpoint)
  return cfg


# ----------------------------------------------------------------------------------------------
# Loading


def checkpoint_layout(path: str | os.PathLike) -> str:
  """'orbax' (an egspo orbax dir) or 'hf' (a Hugging Face dir); a clear error otherwise."""
  path = _checkpoint_dir(path)
  if not path.is_dir():
    raise CheckpointError(f"checkpoint directory {path} does not exist")
  if (path / MANIFEST).is_file():
    return "orbax"
  if (path / INDEX).is_file() or (path / SINGLE).is_file():
    return "hf"
  if (path / "params").is_dir():
    raise CheckpointError(f"{path}: orbax params/ without {MANIFEST}: an unfinished or corrupt "
                          "conversion; convert again")
  raise CheckpointError(f"{path} is neither an egspo orbax checkpoint ({MANIFEST}) nor a Hugging "
                        f"Face checkpoint ({INDEX} or {SINGLE})")


def _read_manifest(path: pathlib.Path) -> dict[str, Any]:
  try:
    manifest = json.loads((path / MANIFEST).read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path / MANIFEST}: corrupt manifest: {e}") from e
  if manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
    raise CheckpointError(f"{path / MANIFEST}: format {manifest.get('format')!r} version "
                          f"{manifest.get('version')!r}; expected {FORMAT_NAME!r} v{FORMAT_VERSION}")
  return manifest


def load_config(path: str | os.PathLike, **overrides) -> ModelConfig:
  """The ModelConfig of a checkpoint dir (either layout) with field overrides."""
  path = _checkpoint_dir(path)
  checkpoint_layout(path)
  return config_from_json(read_config_json(path), str(path / CONFIG), **overrides)


def _drop_leading_axis(sharding):
  """Sharding of one layer of a stacked [n_layers, ...] array sharded by `sharding`."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = tuple(sharding.spec)[1:]
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec),
                                      memory_kind=sharding.memory_kind)
  return sharding


@functools.lru_cache(maxsize=None)
def _zeros_fn(shape, dtype, sharding):
  return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _set_layer_fn(sharding):
  # Donating the stack makes the update in place: peak device memory = the stack + one layer.
  return jax.jit(lambda stack, layer, i: jax.lax.dynamic_update_index_in_dim(stack, layer, i, 0),
                 out_shardings=sharding, donate_argnums=0)


def _flatten_pure(tree: dict, prefix: tuple = ()) -> dict[tuple, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten_pure(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _resolve_shardings(abs_state: nnx.State, mesh, shardings, rules) -> dict[tuple, Any]:
  """path → target sharding of every parameter of the (abstract) model."""
  flat = _flatten_pure(abs_state.to_pure_dict())
  if shardings is None and mesh is None:
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return {p: dev for p in flat}
  if shardings is None:
    # The parameters' logical axes through the logical → mesh axis rules of egspo.sharding.
    from egspo import sharding as sharding_lib

    shardings = sharding_lib.logical_to_mesh_sharding(
        abs_state, mesh, sharding_lib.RULES if rules is None else rules)
  if isinstance(shardings, jax.sharding.Sharding):
    return {p: shardings for p in flat}
  if isinstance(shardings, nnx.State):
    shardings = shardings.to_pure_dict()
  if not isinstance(shardings, dict):
    raise TypeError("shardings must be a Sharding, an nnx.State or a nested dict of shardings "
                    f"matching the model's parameters, got {type(shardings).__name__}")
  given = _flatten_pure(shardings)
  out = {}
  for p in flat:
    s = given.get(p)
    if isinstance(s, nnx.Variable):
      s = s.get_value() if hasattr(s, "get_value") else s.value
    if not isinstance(s, jax.sharding.Sharding):
      raise ValueError(f"shardings has no Sharding for parameter {'/'.join(map(str, p))}")
    out[p] = s
  return out


def _iter_group_arrays(path: pathlib.Path, layout: str, cfg: ModelConfig,
                       group: str, specs: list[TensorSpec], targets: dict[tuple, Any],
                       entries: dict[str, _StEntry] | None) -> Iterator[tuple[TensorSpec, jax.Array]]:
  """(spec, device array in its target sharding) for every tensor of one group."""
  dtype = _NP_DTYPES[cfg.param_dtype]
  if layout == "hf":
    for s in specs:
      arr = read_tensor(entries[s.hf_name], transpose=s.transpose, dtype=dtype)
      # Each device copies only its own slice of the host tensor.
      yield s, jax.make_array_from_callback(s.flax_shape, targets[s.flax_path],
                                            lambda idx, a=arr: a[idx])
      del arr
    return
  ocp = _orbax()
  item = path / "params" / group
  target = _nest({s.flax_path: jax.ShapeDtypeStruct(s.flax_shape, dtype, sharding=targets[s.flax_path])
                  for s in specs})
  if not item.is_dir():
    raise CheckpointError(f"{path}: orbax group {group} is missing ({item})")
  ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
  try:
    stored = ckptr.metadata(item).item_metadata.tree
    for s in specs:
      meta = stored
      for k in s.flax_path:
        meta = meta.get(k) if isinstance(meta, dict) else None
      if meta is None:
        raise CheckpointError(f"{item}: missing tensor {'/'.join(s.flax_path)} "
                              f"({s.hf_name})")
      if tuple(meta.shape) != s.flax_shape:
        raise CheckpointError(f"{item}: shape mismatch for tensor {'/'.join(s.flax_path)} "
                              f"({s.hf_name}): checkpoint has {tuple(meta.shape)}, config "
                              f"expects {s.flax_shape}")
    restored = ckptr.restore(item, args=ocp.args.StandardRestore(target))
  except CheckpointError:
    raise
  except Exception as e:  # orbax/tensorstore raise many types for damaged directories
    raise CheckpointError(f"{path}: cannot restore orbax group {group}: "
                          f"{type(e).__name__}: {e}") from e
  finally:
    ckptr.close()
  flat = _flatten_pure(restored)
  for s in specs:
    yield s, flat[s.flax_path]


def from_pretrained(path: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None,
                    shardings=None, rules=None, **config_overrides) -> LLaDA:
  """Load a LLaDA model from an HF dir or an egspo orbax dir, straight into its shardings.

  Args:
    path: checkpoint directory (either layout; detected from its files; relative, `~/…` or
      absolute), a hub repo id `ORG/NAME[@REVISION]` (`egspo.hub.resolve_checkpoint`), or a
      `gs://…` URL of an orbax directory.
    mesh: optional mesh; without `shardings` each parameter gets the sharding its
      `logical_axes` map to under `rules` (`egspo.sharding.logical_to_mesh_sharding`).
    shardings: optional target shardings: a single `Sharding` for all, or an `nnx.State`/nested
      dict of `NamedSharding`s matching `nnx.state(model, nnx.Param)` for the requested layout
      (stacked `[n_layers, …]` leaves when `scan_layers=True`).
    rules: logical → mesh axis rules used with `mesh` (default `egspo.sharding.RULES`).
    Neither mesh nor shardings: everything on the first device.
    **config_overrides: ModelConfig fields (`param_dtype`, `dtype`, `scan_layers`, `remat`, ...).
      `param_dtype` defaults to the checkpoint's stored dtype.

  The model is built with `nnx.eval_shape` (no random init); each tensor is read once and
  placed directly into its target sharding.
  """
  path = _checkpoint_dir(path)
  layout = checkpoint_layout(path)
  if layout == "orbax":
    manifest = _read_manifest(path)
    config_overrides.setdefault("param_dtype", manifest.get("param_dtype", "float32"))
  entries = index_hf_checkpoint(path) if layout == "hf" else None
  cfg = config_from_json(read_config_json(path), str(path / CONFIG),
                         tensor_dtype=None if entries is None else _stored_dtype(entries),
                         **config_overrides)
  if layout == "hf":
    check_tensors(entries, cfg, str(path))
  elif manifest.get("groups") != group_names(cfg):
    raise CheckpointError(f"{path / MANIFEST}: groups {manifest.get('groups')} do not match the "
                          f"config ({cfg.n_layers} layers)")
  abstract = nnx.eval_shape(lambda: LLaDA(cfg, rngs=nnx.Rngs(0)))
  graphdef, abs_state = nnx.split(abstract)
  targets = _resolve_shardings(abs_state, mesh, shardings, rules)
  flat_abs = _flatten_pure(abs_state.to_pure_dict())
  values: dict[tuple, jax.Array] = {}
  for group, specs in _group_specs(cfg).items():
    group_targets = {}
    for s in specs:
      mpath, layer = _model_path(cfg, group, s.flax_path)
      if mpath not in flat_abs:
        raise AssertionError(f"model has no parameter {mpath} for {s.hf_name}")
      t = targets[mpath]
      group_targets[s.flax_path] = t if layer is None else _drop_leading_axis(t)
    for s, arr in _iter_group_arrays(path, layout, cfg, group, specs, group_targets, entries):
      mpath, layer = _model_path(cfg, group, s.flax_path)
      if layer is None:
        values[mpath] = arr
        continue
      if mpath not in values:
        a = flat_abs[mpath]
        values[mpath] = _zeros_fn(tuple(a.shape), a.dtype, targets[mpath])()
      values[mpath] = _set_layer_fn(targets[mpath])(values[mpath], arr, jnp.int32(layer))
      del arr
    _release_freed_memory()
  missing = set(flat_abs) - set(values)
  if missing:
    raise AssertionError(f"parameters not loaded: {sorted(map(str, missing))[:3]}")
  nnx.replace_by_pure_dict(abs_state, _nest(values))
  return nnx.merge(graphdef, abs_state)


# ----------------------------------------------------------------------------------------------
# Saving and export


def _model_param(model: LLaDA) -> Callable[[str, TensorSpec], jax.Array]:
  """get(group, spec) → the model's parameter for that tensor in Flax layout (one layer sliced)."""
  flat = _flatten_pure(nnx.state(model, nnx.Param).to_pure_dict())
  cfg = model.cfg

  def get(group: str, spec: TensorSpec) -> jax.Array:
    mpath, layer = _model_path(cfg, group, spec.flax_path)
    arr = flat[mpath]
    return arr if layer is None else arr[layer]

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
  `egspo.tokenizer.load_tokenizer(out_dir)` returns it.

  Sharded arrays are saved by orbax shard by shard; a scanned model is written layer by layer.
  """
  out_dir = _prepare_out_dir(out_dir, overwrite)
  get = _model_param(model)
  for group, specs in _group_specs(model.cfg).items():
    _save_group(out_dir, group, _nest({s.flax_path: get(group, s) for s in specs}))
  _write_manifest(out_dir, model.cfg, source="save_pretrained_orbax", tokenizer=tokenizer)


def _shard_plan(sizes: list[int], max_shard_bytes: int) -> list[list[int]]:
  """Consecutive tensor indices grouped into shards of ≤ max_shard_bytes (a larger tensor alone)."""
  shards: list[list[int]] = [[]]
  used = 0
  for i, n in enumerate(sizes):
    if shards[-1] and used + n > max_shard_bytes:
      shards.append([])
      used = 0
    shards[-1].append(i)
    used += n
  return shards


def export_hf(model: LLaDA, out_dir: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30,
              dtype: str | None = None, tokenizer=None,
              overwrite: bool = False) -> list[pathlib.Path]:
  """Write `model` in LLaDA's Hugging Face layout (REFERENCE §1) for PyTorch users.

  Files: `config.json`; `model.safetensors` if everything fits in one shard, else
  `model-0000X-of-0000N.safetensors` (each ≤ max_shard_bytes unless one tensor is larger) and
  `model.safetensors.index.json`. Kernels are transposed back to `[out, in]`; tensors are fetched
  from the devices and written one at a time. `dtype` (default: the param dtype) sets the stored
  dtype. `tokenizer` (optional, see `save_tokenizer`) is written beside the weights.
  Returns the shard paths.
  """
  if max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
  cfg = model.cfg
  if (dtype or cfg.param_dtype) not in _NP_DTYPES:
    raise ValueError(f"dtype must be one of {sorted(_NP_DTYPES)}, got {dtype!r}")
  dt = _NP_DTYPES[dtype or cfg.param_dtype]
  out_dir = _prepare_out_dir(out_dir, overwrite)
  get = _model_param(model)
  specs = tensor_specs(cfg)
  sizes = [int(np.prod(s.hf_shape)) * dt.itemsize for s in specs]
  plan = _shard_plan(sizes, max_shard_bytes)
  names = ([SINGLE] if len(plan) == 1 else
           [f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors" for k in range(len(plan))])

  def fetch(s: TensorSpec) -> Callable[[], np.ndarray]:
    def f():
      arr = _to_host(get(s.group, s)).astype(dt, copy=False)
      return arr.T if s.transpose else arr
    return f

  files, weight_map = [], {}
  for fname, idx in zip(names, plan):
    items = [(specs[i].hf_name, fetch(specs[i]), dt, specs[i].hf_shape) for i in idx]
    _write_safetensors(out_dir / fname, items, write=jax.process_index() == 0)
    files.append(out_dir / fname)
    weight_map.update({specs[i].hf_name: fname for i in idx})
  if jax.process_index() == 0:
    if len(plan) > 1:
      index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
      (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    cfg_json = cfg.to_hf_config()
    cfg_json.update({"architectures": ["LLaDAModelLM"], "torch_dtype": str(dtype or cfg.param_dtype),
                     "weight_tying": False})
    save_tokenizer(tokenizer, out_dir, cfg_json)
    (out_dir / CONFIG).write_text(json.dumps(cfg_json, indent=2) + "\n")
  return files
