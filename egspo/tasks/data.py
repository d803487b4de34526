"""Deterministic, resumable training-prompt streams and local data-file lookup.

`PromptStream` yields batches of examples from either
  * a generator `sample(rng) -> example` (infinite): example k is drawn with
    `np.random.default_rng([seed, k])`, so it depends only on (seed, k); or
  * a list of examples (a file): epochs, each a permutation drawn with
    `np.random.default_rng([seed, epoch])` (or file order with shuffle=False).
Its position is a small JSON-able state {"seed", "epoch", "index"}; `PromptStream.from_state`
resumes so that batches after resuming equal the batches of the uninterrupted stream.
Same seed → same data.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Callable, Sequence

import numpy as np

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def shared_data_file(filename: str, env_var: str | None = None) -> str:
  """Path of a data file: $env_var, else $EGSPO_DATA_DIR/filename, else shared/data/filename
  beside or inside the checkout. A clear FileNotFoundError says how to provide it."""
  if env_var and os.environ.get(env_var):
    p = pathlib.Path(os.environ[env_var])
    if not p.is_file():
      raise FileNotFoundError(f"${env_var}={p} is not a file")
    return str(p)
  candidates = []
  if os.environ.get("EGSPO_DATA_DIR"):
    candidates.append(pathlib.Path(os.environ["EGSPO_DATA_DIR"]) / filename)
  candidates += [_REPO_ROOT / "shared" / "data" / filename,
                 _REPO_ROOT.parent / "shared" / "data" / filename]
  for p in candidates:
    if p.is_file():
      return str(p)
  hint = f"set ${env_var} to the file, or " if env_var else ""
  raise FileNotFoundError(f"data file {filename!r} not found (looked in "
                          f"{', '.join(str(c) for c in candidates)}); {hint}set $EGSPO_DATA_DIR "
                          f"to a directory holding it, or pass the task option data_path=")


@dataclasses.dataclass
class PromptBatch:
  """B distinct examples and the group size G of the RL step.

  `repeated` is the [B*G] list with each example repeated G times consecutively (the layout of
  group-relative advantages); `group_index` [B*G] int32 maps each row to its example.
  """

  examples: list
  group_size: int = 1

  @property
  def repeated(self) -> list:
    return [e for e in self.examples for _ in range(self.group_size)]

  @property
  def group_index(self) -> np.ndarray:
    return np.repeat(np.arange(len(self.examples), dtype=np.int32), self.group_size)

  def __len__(self) -> int:
    return len(self.examples) * self.group_size


class PromptStream:
  """Deterministic batches of examples; see the module docstring."""

  def __init__(self, source: Callable[[np.random.Generator], dict] | Sequence[dict],
               batch_size: int, group_size: int = 1, seed: int = 0, shuffle: bool = True,
               state: dict | None = None):
    if batch_size < 1 or group_size < 1:
      raise ValueError(f"batch_size and group_size must be >= 1, got {batch_size}, {group_size}")
    self.batch_size, self.group_size, self.shuffle = int(batch_size), int(group_size), shuffle
    if callable(source):
      self._sample, self._examples = source, None
    else:
      self._sample, self._examples = None, list(source)
      if not self._examples:
        raise ValueError("PromptStream got an empty list of examples")
    self.seed, self.epoch, self.index = int(seed), 0, 0
    self._perm_epoch, self._perm = None, None
    if state is not None:
      self.load_state(state)

  @property
  def infinite(self) -> bool:
    return self._sample is not None

  def state(self) -> dict:
    """JSON-able position: the next batch starts at example `index` of epoch `epoch`."""
    return {"seed": self.seed, "epoch": self.epoch, "index": self.index}

  def load_state(self, state: dict) -> None:
    missing = {"seed", "epoch", "index"} - set(state)
    if missing:
      raise ValueError(f"stream state lacks {sorted(missing)}: {state!r}")
    self.seed, self.epoch, self.index = int(state["seed"]), int(state["epoch"]), int(state["index"])
    if self._examples is not None and not 0 <= self.index <= len(self._examples):
      raise ValueError(f"stream state index {self.index} outside the {len(self._examples)} examples")

  @classmethod
  def from_state(cls, source, batch_size: int, state: dict, group_size: int = 1,
                 shuffle: bool = True) -> "PromptStream":
    return cls(source, batch_size, group_size, seed=int(state["seed"]), shuffle=shuffle, state=state)

  def _order(self, epoch: int) -> np.ndarray:
    if self._perm_epoch != epoch:
      n = len(self._examples)
      self._perm = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                    else np.arange(n))
      self._perm_epoch = epoch
    return self._perm

  def _next_example(self) -> dict:
    if self._sample is not None:
      ex = self._sample(np.random.default_rng([self.seed, self.index]))
      self.index += 1
      return ex
    if self.index >= len(self._examples):
      self.epoch, self.index = self.epoch + 1, 0
    ex = self._examples[int(self._order(self.epoch)[self.index])]
    self.index += 1
    return ex

  def next_batch(self) -> PromptBatch:
    return PromptBatch([self._next_example() for _ in range(self.batch_size)], self.group_size)

  def __iter__(self):
    while True:
      yield self.next_batch()


def prompt_stream(task, batch_size: int, group_size: int = 1, seed: int = 0,
                  examples: Sequence[dict] | None = None, state: dict | None = None) -> PromptStream:
  """A stream for `task`: over `examples` if given, else over the task's generator
  (`task.sample_example`), else over its training file (`task.load_examples("train")`)."""
  if examples is None:
    if hasattr(task, "sample_example"):
      source: Any = task.sample_example
    else:
      source = task.load_examples("train")
  else:
    source = examples
  return PromptStream(source, batch_size, group_size, seed=seed, state=state)


# --- Hugging Face datasets from local files or (when online) the hub ---------------------------

def read_records(path: str | os.PathLike) -> list[dict]:
  """Records of a local .jsonl, .json (a list, or {"data"/"rows": [...]}) or .parquet file."""
  p = pathlib.Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"{p} is not a file")
  name = p.name.lower()
  if name.endswith(".parquet"):
    import pyarrow.parquet as pq
    return pq.read_table(p).to_pylist()
  if name.endswith((".jsonl", ".jsonl.gz")):
    import gzip
    import json
    opener = gzip.open if name.endswith(".gz") else open
    with opener(p, "rt", encoding="utf-8") as f:
      return [json.loads(line) for line in f if line.strip()]
  if name.endswith(".json"):
    import json
    with open(p, encoding="utf-8") as f:
      data = json.load(f)
    if isinstance(data, dict):
      data = data.get("data") or data.get("rows") or data.get("examples")
    if not isinstance(data, list):
      raise ValueError(f"{p}: expected a list of records")
    return data
  raise ValueError(f"{p}: unsupported data file type (use .jsonl, .json or .parquet)")


def _online(host: str = "huggingface.co", timeout: float = 2.0) -> bool:
  if os.environ.get("EGSPO_OFFLINE", "") not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE") == "1":
    return False
  import socket
  try:
    socket.create_connection((host, 443), timeout=timeout).close()
    return True
  except OSError:
    return False


def load_hf_records(name: str, split: str, path: str | None = None, *, hf_id: str | None = None,
                    hf_config: str | None = None, tfds_name: str | None = None,
                    env_var: str | None = None) -> list[dict]:
  """Records of dataset `name`/`split` in the Hugging Face column layout, from (in order):
  `path`; $env_var; $EGSPO_DATA_DIR/{name}_{split}.{jsonl,parquet,json}; when online, the
  `datasets` library (`hf_id`, `hf_config`) or tensorflow-datasets (`tfds_name`).
  Offline with no file: FileNotFoundError saying how to provide one."""
  if path:
    return read_records(path)
  if env_var and os.environ.get(env_var):
    return read_records(os.environ[env_var])
  tried = []
  if os.environ.get("EGSPO_DATA_DIR"):
    for ext in ("jsonl", "parquet", "json"):
      p = pathlib.Path(os.environ["EGSPO_DATA_DIR"]) / f"{name}_{split}.{ext}"
      tried.append(str(p))
      if p.is_file():
        return read_records(p)
  errors = []
  if (hf_id or tfds_name) and _online():
    if hf_id:
      try:
        import datasets  # type: ignore
        ds = datasets.load_dataset(hf_id, hf_config, split=split)
        return [dict(r) for r in ds]
      except Exception as e:  # noqa: BLE001 - report every source that failed
        errors.append(f"datasets.load_dataset({hf_id!r}, {hf_config!r}): {e}")
    if tfds_name:
      try:
        import tensorflow_datasets as tfds  # type: ignore
        ds = tfds.load(tfds_name, split=split)

        def _py(v):
          v = v.tolist() if hasattr(v, "tolist") else v
          if isinstance(v, bytes):
            return v.decode("utf-8")
          if isinstance(v, list):
            return [_py(x) for x in v]
          return v

        return [{k: _py(v) for k, v in r.items()} for r in tfds.as_numpy(ds)]
      except Exception as e:  # noqa: BLE001
        errors.append(f"tfds.load({tfds_name!r}): {e}")
  how = (f"pass data_path=FILE (.jsonl/.parquet/.json in the Hugging Face {hf_id or name} "
         f"format)" + (f", set ${env_var}=FILE" if env_var else "")
         + f", or put {name}_{split}.jsonl in $EGSPO_DATA_DIR")
  detail = ("; " + "; ".join(errors)) if errors else " (offline: no download attempted)"
  raise FileNotFoundError(f"no local data for {name!r} split {split!r}: {how}{detail}")
