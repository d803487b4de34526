"""Deterministic, resumable training-prompt streams and local data-file lookup.

`PromptStream` yields batches of examples from either
  * a generator `sample(rng) -> example` (infinite): example k is drawn with
    `np.random.default_rng([seed, k])`, so it depends only on (seed, k); or
  * a list of examples (a file): epochs, each a permutation drawn with
    `np.random.default_rng([seed, epoch])` (or file order with shuffle=False).
Its position is a small JSON-able state {"seed", "epoch", "index"}; `PromptStream.from_state`
resumes so that batches after resuming equal the batches of the uninterrupted stream.
Same seed → same data.

Data files are found per split: an explicit path, else `$EGSPO_<NAME>_<SPLIT>_FILE`
(`$EGSPO_GSM8K_TRAIN_FILE`, `$EGSPO_GSM8K_TEST_FILE`), else `$EGSPO_<NAME>_FILE` for the test
split only (a test file never becomes a training file through the environment), else
`$EGSPO_DATA_DIR/<name>_<split>.{jsonl,parquet,json,csv}`. Records (`read_records`) are raw rows in
the Hugging Face layout; each task's `load_examples` converts them (for training and evaluation
alike). `hf_train_test_split` and `hf_shuffle_holdout` reproduce the released code's splits;
`check_held_out` refuses a training set that contains the evaluation set; `fit_prompt` applies
`task.prompt_truncation` to an over-long prompt.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import math
import os
import pathlib
import socket
from typing import Any, Callable, Sequence

import numpy as np

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
_SHIPPED = pathlib.Path(__file__).resolve().parent / "testsets"  # package data, see its README


def shared_data_file(filename: str, env_var: str | None = None) -> str:
  """Path of a data file: $env_var, else $EGSPO_DATA_DIR/filename, else shared/data/filename
  beside or inside the checkout, else the copy shipped in `egspo/tasks/testsets/` (the papers'
  Countdown and Sudoku test sets). A clear FileNotFoundError says how to provide it."""
  if env_var and os.environ.get(env_var):
    p = pathlib.Path(os.environ[env_var])
    if not p.is_file():
      raise FileNotFoundError(f"${env_var}={p} is not a file")
    return str(p)
  candidates = []
  if os.environ.get("EGSPO_DATA_DIR"):
    candidates.append(pathlib.Path(os.environ["EGSPO_DATA_DIR"]) / filename)
  candidates += [_REPO_ROOT / "shared" / "data" / filename,
                 _REPO_ROOT.parent / "shared" / "data" / filename,
                 _SHIPPED / filename]
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

DATA_EXTENSIONS = ("jsonl", "parquet", "json", "csv")


def read_records(path: str | os.PathLike) -> list[dict]:
  """Raw records of a local .jsonl(.gz), .json (a list, or {"data"/"rows"/"examples": [...]}),
  .parquet or .csv file (csv cells stay strings, as `pandas.read_csv(dtype=str)` reads them)."""
  p = pathlib.Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"{p} is not a file")
  name = p.name.lower()
  if name.endswith(".parquet"):
    import pyarrow.parquet as pq
    return pq.read_table(p).to_pylist()
  if name.endswith((".jsonl", ".jsonl.gz")):
    opener = gzip.open if name.endswith(".gz") else open
    out = []
    with opener(p, "rt", encoding="utf-8") as f:
      for lineno, line in enumerate(f, 1):
        if line.strip():
          try:
            out.append(json.loads(line))
          except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{lineno}: not JSON ({e.msg})") from None
    return out
  if name.endswith(".json"):
    with open(p, encoding="utf-8") as f:
      data = json.load(f)
    if isinstance(data, dict):
      data = data.get("data") or data.get("rows") or data.get("examples")
    if not isinstance(data, list):
      raise ValueError(f"{p}: expected a list of records")
    return data
  if name.endswith(".csv"):
    with open(p, newline="", encoding="utf-8") as f:
      return [dict(r) for r in csv.DictReader(f)]
  raise ValueError(f"{p}: unsupported data file type (use .jsonl, .json, .parquet or .csv)")


def split_env_var(env_var: str, split: str) -> str:
  """The split's variable: ("EGSPO_GSM8K_FILE", "train") -> "EGSPO_GSM8K_TRAIN_FILE"."""
  base = env_var[:-len("_FILE")] if env_var.endswith("_FILE") else env_var
  return f"{base}_{split.upper()}_FILE"


def find_split_file(name: str, split: str, env_var: str | None = None) -> str | None:
  """The local file of `name`/`split` named by the environment (module docstring), or None.
  A variable naming a missing file is an error."""
  names = []
  if env_var:
    names.append(split_env_var(env_var, split))
    if split == "test":
      names.append(env_var)
  for var in names:
    if os.environ.get(var):
      p = pathlib.Path(os.environ[var])
      if not p.is_file():
        raise FileNotFoundError(f"${var}={p} is not a file")
      return str(p)
  if os.environ.get("EGSPO_DATA_DIR"):
    for ext in DATA_EXTENSIONS:
      p = pathlib.Path(os.environ["EGSPO_DATA_DIR"]) / f"{name}_{split}.{ext}"
      if p.is_file():
        return str(p)
  return None


def _online(host: str = "huggingface.co", timeout: float = 2.0) -> bool:
  if os.environ.get("EGSPO_OFFLINE", "") not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE") == "1":
    return False
  try:
    socket.create_connection((host, 443), timeout=timeout).close()
    return True
  except OSError:
    return False


def load_hf_records(name: str, split: str, path: str | None = None, *, hf_id: str | None = None,
                    hf_config: str | None = None, env_var: str | None = None) -> list[dict]:
  """Raw records of dataset `name`/`split` in the Hugging Face column layout, from (in order):
  `path`; the split's file (`find_split_file`: `$EGSPO_<NAME>_<SPLIT>_FILE`, `env_var` for the
  test split only, `$EGSPO_DATA_DIR/{name}_{split}.*`); when online, the hub through the optional
  `datasets` library (`hf_id`, `hf_config`; `pip install -e ".[datasets]"`).
  Otherwise: FileNotFoundError saying how to provide a file."""
  if path:
    return read_records(path)
  found = find_split_file(name, split, env_var)
  if found:
    return read_records(found)
  errors = []
  if hf_id and _online():
    try:
      import datasets  # type: ignore  # optional: the "datasets" extra
    except ImportError:
      errors.append(f"downloading {hf_id!r} needs the `datasets` package "
                    "(pip install -e \".[datasets]\")")
    else:
      try:
        ds = datasets.load_dataset(hf_id, hf_config, split=split)
        return [dict(r) for r in ds]
      except Exception as e:  # noqa: BLE001 - reported with how to provide a local file
        errors.append(f"datasets.load_dataset({hf_id!r}, {hf_config!r}): {e}")
  if env_var:
    var = split_env_var(env_var, split)
    env_how = (f", set ${var}=FILE" + (f" (or ${env_var})" if split == "test" else
                                       f" (${env_var} names the test file only)"))
  else:
    env_how = ""
  how = (f"pass data_path=FILE (.jsonl/.parquet/.json/.csv in the Hugging Face {hf_id or name} "
         f"format){env_how}, or put {name}_{split}.jsonl in $EGSPO_DATA_DIR")
  detail = ("; " + "; ".join(errors)) if errors else " (offline: no download attempted)"
  raise FileNotFoundError(f"no local data for {name!r} split {split!r}: {how}{detail}")


# --- the released code's splits ----------------------------------------------------------------

def hf_train_test_split(n: int, test_size: float = 0.1,
                        seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
  """(train, test) row indices of `datasets.Dataset.train_test_split(test_size=test_size,
  seed=seed)` on n rows (the release's KodCode split: test_size 0.1, seed 42).

  Identical to `datasets` (checked against it): it draws `np.random.default_rng(seed)
  .permutation(n)`, takes the first ceil(test_size·n) as the test rows and the rest as the
  training rows, both in permutation order. Rows must be in the dataset's order."""
  if not 0.0 < test_size < 1.0:
    raise ValueError(f"test_size must be in (0, 1), got {test_size}")
  n_test = math.ceil(test_size * n)
  if n_test >= n:
    raise ValueError(f"test_size={test_size} leaves no training rows out of {n}")
  perm = np.random.default_rng(seed).permutation(n)
  return perm[n_test:], perm[:n_test]


def hf_shuffle_holdout(n: int, holdout: int = 500, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
  """(train, held-out) row indices of the release's Countdown/Sudoku split:
  `dataset.shuffle(seed=seed)`, then all but the last `holdout` rows train (`datasets` shuffles
  with `np.random.default_rng(seed).permutation(n)`)."""
  if holdout < 0 or holdout >= n:
    raise ValueError(f"cannot hold out {holdout} of {n} rows (set the task option train_holdout "
                     f"to 0 to train on every row)")
  perm = np.random.default_rng(seed).permutation(n)
  return perm[:n - holdout], perm[n - holdout:]


def example_key(example: dict) -> str:
  """A hashable identity of an example (its fields except the worked `solution`)."""
  return json.dumps({k: v for k, v in example.items() if k != "solution"}, sort_keys=True,
                    default=str)


def check_held_out(train: Sequence[dict], held_out: Sequence[dict], what: str) -> int:
  """Refuse a training set holding every evaluation example (the evaluation file passed as the
  training file, by any path or format); returns how many evaluation examples it holds."""
  if not held_out:
    return 0
  keys = {example_key(e) for e in train}
  n = sum(example_key(e) in keys for e in held_out)
  if n == len(held_out):
    raise ValueError(f"{what} contains all {n} evaluation examples (is it the evaluation file?): "
                     "refusing to train on the test set; pass the training split")
  return n


# --- prompts longer than the model's prompt window -----------------------------------------------

PROMPT_TRUNCATIONS = ("error", "left", "middle")


def fit_prompt(ids: Sequence[int], max_length: int, mode: str) -> tuple[list[int], bool]:
  """(ids, whether cut) of a prompt for a window of `max_length` tokens. Modes: 'error' raises;
  'left' keeps the last max_length tokens (the released trainer's `prompt_ids[:, -max_len:]`,
  which drops the chat template's head and the task instructions first); 'middle' keeps the first
  max_length - max_length//2 tokens (template head, instructions, start of the question) and the
  last max_length//2 (end of the question, template tail, prefill)."""
  if mode not in PROMPT_TRUNCATIONS:
    raise ValueError(f"unknown prompt truncation {mode!r}; expected one of {PROMPT_TRUNCATIONS}")
  ids = list(ids)
  if len(ids) <= max_length:
    return ids, False
  if mode == "error":
    raise ValueError(f"a prompt of {len(ids)} tokens exceeds rollout.max_prompt_length="
                     f"{max_length}; set task.prompt_truncation='left' (the release: keep the last "
                     f"{max_length} tokens) or 'middle', or raise rollout.max_prompt_length")
  if mode == "left":
    return ids[len(ids) - max_length:], True
  tail = max_length // 2
  return ids[:max_length - tail] + (ids[len(ids) - tail:] if tail else []), True
