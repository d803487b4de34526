"""The egspo orbax checkpoint directory: one orbax item per layer group and a manifest.

    OUT/config.json            LLaDA config.json (plus `param_dtype`)
    OUT/egspo_checkpoint.json  manifest: format, version, group names; written last
    OUT/params/<group>/        orbax item of one group (Flax names: {q_proj: {kernel}, ...})

One item per group bounds host memory by one group (an orbax save holds its whole tree), and a
directory without the manifest is an unfinished conversion. Why: docs/conversion.md.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from egspo.hub import CheckpointError
from egspo.model.checkpoint_spec import TensorSpec, group_names
from egspo.model.llada import ModelConfig

FORMAT_NAME = "egspo-llada-orbax"
FORMAT_VERSION = 1
MANIFEST = "egspo_checkpoint.json"


def _orbax():
  import orbax.checkpoint as ocp  # local: importing orbax is slow and not needed by the model

  return ocp


def release_freed_memory() -> None:
  """Hand freed heap pages back to the OS (glibc keeps them otherwise, inflating RSS)."""
  try:
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc: nothing to do
    pass


def save_group(out_dir: pathlib.Path, group: str, flat: dict[tuple[str, ...], Any]) -> None:
  """One group ({flax path: array}) as an orbax PyTree item, saved synchronously.

  Compression is off: zstd made orbax hold about two extra copies of the group while writing
  (benchmarks/convert_memory.py) and saved < 10% disk on weights.
  """
  ocp = _orbax()
  ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))
  ckptr.save(out_dir / "params" / group, args=ocp.args.PyTreeSave(traverse_util.unflatten_dict(flat)))
  ckptr.close()
  release_freed_memory()


def restore_group(path: pathlib.Path, group: str, specs: list[TensorSpec], dtype: np.dtype,
                  targets: dict[tuple[str, ...], Any]) -> dict[tuple[str, ...], jax.Array]:
  """{flax path: array} of one group, each restored straight into `targets[flax path]` (a
  sharding), after checking the stored names and shapes against `specs`."""
  ocp = _orbax()
  item = path / "params" / group
  if not item.is_dir():
    raise CheckpointError(f"{path}: orbax group {group} is missing ({item})")
  target = traverse_util.unflatten_dict(
      {s.flax_path: jax.ShapeDtypeStruct(s.flax_shape, dtype, sharding=targets[s.flax_path])
       for s in specs})
  ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
  try:
    stored = ckptr.metadata(item).item_metadata.tree
    for s in specs:
      meta = stored
      for k in s.flax_path:
        meta = meta.get(k) if isinstance(meta, dict) else None
      if meta is None:
        raise CheckpointError(f"{item}: missing tensor {'/'.join(s.flax_path)} ({s.hf_name})")
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
  return traverse_util.flatten_dict(restored)


def write_manifest(out_dir: pathlib.Path, cfg: ModelConfig, source: str) -> None:
  """The manifest, written after every group and config.json: the directory is complete."""
  manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "source": source,
              "param_dtype": cfg.param_dtype, "groups": group_names(cfg)}
  (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(path) -> dict[str, Any]:
  """The manifest of an egspo orbax checkpoint directory (format and version checked)."""
  try:
    manifest = json.loads((path / MANIFEST).read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path / MANIFEST}: corrupt manifest: {e}") from e
  if not isinstance(manifest, dict):
    raise CheckpointError(f"{path / MANIFEST}: corrupt manifest: not a JSON object")
  if manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
    raise CheckpointError(f"{path / MANIFEST}: format {manifest.get('format')!r} version "
                          f"{manifest.get('version')!r}; expected {FORMAT_NAME!r} v{FORMAT_VERSION}")
  return manifest


def check_groups(path, manifest: dict[str, Any], cfg: ModelConfig) -> None:
  """The manifest's groups are those of `cfg` (same number of layers)."""
  if manifest.get("groups") != group_names(cfg):
    raise CheckpointError(f"{path / MANIFEST}: groups {manifest.get('groups')} do not match the "
                          f"config ({cfg.n_layers} layers)")
