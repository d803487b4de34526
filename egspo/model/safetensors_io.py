"""Hugging Face safetensors files: the tensor index of a checkpoint directory, row-chunked reads
into the layout and dtype the caller wants, and a streaming writer.

Reading goes through the `safetensors` library (`safe_open(..., framework="numpy")`; bf16 comes
back as `ml_dtypes.bfloat16`); its errors become `CheckpointError`s naming the file. Design and
memory figures: docs/conversion.md.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Callable

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from egspo.hub import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16), "F64": np.dtype(np.float64)}
_NAMES = {v: k for k, v in DTYPES.items()}
CHUNK_BYTES = 4 * 2**20


@dataclasses.dataclass(frozen=True)
class Entry:
  """One tensor of a safetensors file (from its header; no data read)."""

  file: pathlib.Path
  name: str
  dtype: np.dtype
  shape: tuple[int, ...]

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _open(file: pathlib.Path):
  try:
    return safe_open(str(file), framework="numpy")
  except (SafetensorError, OSError) as e:
    raise CheckpointError(f"{file}: cannot read safetensors file: {e}") from e


def read_header(file: pathlib.Path) -> dict[str, Entry]:
  """Name → entry of every tensor of one file (the library checks the header against the file)."""
  entries = {}
  with _open(file) as f:
    for name in f.keys():
      s = f.get_slice(name)
      dtype = DTYPES.get(s.get_dtype())
      if dtype is None:
        raise CheckpointError(f"{file}: tensor {name} has unsupported dtype {s.get_dtype()!r}; "
                              f"supported: {sorted(DTYPES)}")
      entries[name] = Entry(file, name, dtype, tuple(int(d) for d in s.get_shape()))
  return entries


def read_tensor(entry: Entry, *, transpose: bool = False, dtype: np.dtype | None = None,
                chunk_bytes: int = CHUNK_BYTES) -> np.ndarray:
  """The tensor as a fresh array, transposed (2-D only) and/or cast to `dtype` on the way.

  Read in row chunks of ≤ `chunk_bytes`, each written into the output: the peak is the output
  plus about two chunks (the library's slice and its copy), whatever the transposition or cast.
  The library maps the file into memory and pages read through the map stay resident until it is
  closed, so each chunk opens the file anew (one tensor at a time would add the whole tensor).
  """
  dtype = entry.dtype if dtype is None else np.dtype(dtype)
  if transpose and len(entry.shape) != 2:
    raise ValueError(f"transpose needs a 2-D tensor, got shape {entry.shape} ({entry.name})")
  out = np.empty(entry.shape[::-1] if transpose else entry.shape, dtype)
  n = entry.shape[0] if entry.shape else 1
  step = max(1, chunk_bytes // max(1, entry.nbytes // max(n, 1)))
  try:
    for r0 in range(0, n, step):
      r1 = min(r0 + step, n)  # the library refuses an end past the last row
      with _open(entry.file) as f:
        if not entry.shape:
          out[...] = f.get_tensor(entry.name)
        elif transpose:
          out[:, r0:r1] = f.get_slice(entry.name)[r0:r1].T
        else:
          out[r0:r1] = f.get_slice(entry.name)[r0:r1]
  except SafetensorError as e:
    raise CheckpointError(f"{entry.file}: cannot read tensor {entry.name}: {e}") from e
  return out


def index_checkpoint(path: pathlib.Path) -> dict[str, Entry]:
  """Name → entry over all shards of a local HF checkpoint directory (headers only)."""
  index_file, single = path / INDEX, path / SINGLE
  if not index_file.is_file():
    if single.is_file():
      return read_header(single)
    raise CheckpointError(f"{path}: no {INDEX} and no {SINGLE}; not a Hugging Face checkpoint")
  try:
    weight_map = json.loads(index_file.read_text())["weight_map"]
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
      shards.setdefault(shard, []).append(name)
  except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
    raise CheckpointError(f"{index_file}: corrupt index (need a 'weight_map' object): {e}") from e
  entries: dict[str, Entry] = {}
  for shard, names in sorted(shards.items()):
    if not (path / shard).is_file():
      raise CheckpointError(f"{index_file} maps tensor {names[0]} (and {len(names) - 1} more) "
                            f"to shard {shard}, which does not exist in {path}")
    header = read_header(path / shard)
    for name in names:
      if name not in header:
        raise CheckpointError(f"{index_file} maps tensor {name} to {shard}, but that shard has "
                              "no such tensor")
      entries[name] = header[name]
  return entries


def shard_plan(sizes: list[int], max_shard_bytes: int) -> list[list[int]]:
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


Item = tuple[str, Callable[[], np.ndarray], np.dtype, tuple[int, ...]]


def write_file(file: pathlib.Path, items: list[Item], *, write: bool = True) -> None:
  """One safetensors file, fetching and writing one tensor at a time.

  items: (name, fetch() → array, dtype, shape); the header is computed up front from the shapes,
  so only one tensor is ever in memory (the library's `save_file` needs the whole shard).
  `write=False` only runs the fetches (the processes of a multi-host job that take part in the
  gathers but write nothing). The file appears under its name only when complete.
  """
  if not write:
    for _, fetch, _, _ in items:
      fetch()
    return
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for name, _, dt, shape in items:
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    header[name] = {"dtype": _NAMES[dt], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the data section 8-byte aligned, as the library writes it
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
