"""Training metrics: TensorBoard event files, JSON lines, a progress bar and phase timers.

Files a run leaves in its workdir (main process only; other processes write nothing):

    metrics.jsonl          one JSON object per `write_scalars` call:
                           {"step": 12, "time": 1763781234.5, "train/loss": 0.31, ...}
                           (non-finite values are written as null, so the file is strict JSON)
    tensorboard/           TensorBoard event files (scalars under their names)

Resume without duplicates: a run that restarts from checkpoint step s passes `resume_step=s`;
records with step > s (written after that checkpoint by the run that crashed) are dropped from
metrics.jsonl before appending, and the TensorBoard writer is opened with `purge_step=s + 1`, so
TensorBoard hides the crashed run's later points. A start without `resume_step` over an existing
metrics.jsonl moves it aside to `metrics.jsonl.bak-<unix time>`. When the step actually restored
is known only later (a corrupt checkpoint fell back to an older one), `rewind(s)` does the same
on the open writer; `rewind(s, redo=("eval/",))` also drops the records at step s that hold a
metric named eval/... (work done after checkpoint s that the run is about to redo at step s), and
TensorBoard then purges from s and gets the kept records at s again.

A remote workdir (`gs://bucket/run`, any `scheme://`, read and written through etils.epath: for
GCS install `gcsfs`) cannot be appended to, so the files are written in a local mirror
(`local_dir`, default `$TMPDIR/egspo_metrics/<workdir as a name>`) and copied to the workdir, each
file whole, at most every `sync_every_s` seconds, on `flush()` and on `close()`. A run resumed on a
fresh machine (a preempted TPU VM) first takes metrics.jsonl back from the workdir.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import numbers
import os
import pathlib
import re
import tempfile
import time
from typing import Any, Callable, Iterator, Mapping

import numpy as np
from etils import epath
from tqdm.auto import tqdm

from egspo.paths import is_remote  # noqa: F401  (tests patch metrics.is_remote)

log = logging.getLogger(__name__)

JSONL_NAME = "metrics.jsonl"
TB_DIR = "tensorboard"


def _to_scalar(name: str, value) -> float | int | None:
  """A Python number from an int/float/bool/0-d array; non-finite → None. Else ValueError."""
  if isinstance(value, bool) or isinstance(value, np.bool_):
    return int(value)
  if isinstance(value, numbers.Integral):
    return int(value)
  if isinstance(value, numbers.Real):
    value = float(value)
  else:
    arr = np.asarray(value)  # jax arrays and numpy scalars (copies to host)
    if arr.shape != () or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
      raise ValueError(f"metric {name!r} must be a real scalar, got {arr.dtype}{list(arr.shape)}")
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
      return int(arr)
    if np.iscomplexobj(arr):
      raise ValueError(f"metric {name!r} must be a real scalar, got {arr.dtype}")
    value = float(arr)
  return value if math.isfinite(value) else None


def read_jsonl(path) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl file (a torn last line from a crash is skipped)."""
  records = []
  path = pathlib.Path(path)
  if not path.exists():
    return records
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue  # a line cut by a kill mid-write
  return records


class MetricsWriter:
  """Writes scalars to TensorBoard and metrics.jsonl in `workdir`; a no-op off the main process.

      writer = MetricsWriter(workdir, is_main_process=jax.process_index() == 0,
                             resume_step=restored_step)
      writer.write_scalars(step, {"train/reward": r, "train/loss": l, "train/kl": kl})
      writer.close()
  """

  def __init__(self, workdir, *, is_main_process: bool = True, resume_step: int | None = None,
               tensorboard: bool = True, local_dir=None, sync_every_s: float = 60.0):
    self.enabled = bool(is_main_process)
    self._jsonl = None
    self._tb = None
    # Remote workdir: write in a local mirror, copy to `self.remote` (see the module docstring).
    self.remote = epath.Path(workdir) if is_remote(workdir) else None
    if self.remote is not None:
      if local_dir is None:
        local_dir = os.path.join(tempfile.gettempdir(), "egspo_metrics",
                                 re.sub(r"[^A-Za-z0-9._-]+", "_", str(workdir)))
      self.workdir = pathlib.Path(local_dir)
    else:
      self.workdir = pathlib.Path(workdir)
    self.sync_every_s = sync_every_s
    self._synced: dict[str, tuple[int, int]] = {}  # relative path → (size, mtime_ns) uploaded
    self._last_sync = time.monotonic()
    if not self.enabled:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    jsonl_path = self.workdir / JSONL_NAME
    if self.remote is not None and not jsonl_path.exists() and (self.remote / JSONL_NAME).exists():
      jsonl_path.write_bytes((self.remote / JSONL_NAME).read_bytes())  # resumed on a new machine
    if resume_step is not None:
      self._truncate_jsonl(jsonl_path, resume_step)
    elif jsonl_path.exists() and jsonl_path.stat().st_size > 0:
      # A fresh start over an old log (e.g. a run that crashed before its first checkpoint):
      # keep the old records aside rather than interleave two runs' steps.
      backup = jsonl_path.with_name(f"{JSONL_NAME}.bak-{int(time.time())}")
      log.warning("%s has records but no resume step was given: moved to %s", jsonl_path, backup)
      os.replace(jsonl_path, backup)
    self._jsonl = open(jsonl_path, "a", buffering=1)  # line-buffered: one record per line
    if tensorboard:
      # Hide the events a crashed run wrote after its checkpoint.
      self._open_tb(purge_step=0 if resume_step is None else resume_step + 1)

  def _open_tb(self, purge_step: int) -> None:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    # tensorboardX names event files by whole seconds and host: a unique suffix keeps a quick
    # restart from overwriting the previous run's file.
    self._tb = SummaryWriter(logdir=str(self.workdir / TB_DIR), flush_secs=30,
                             filename_suffix=f".{os.getpid()}.{time.time_ns()}",
                             purge_step=purge_step)

  @staticmethod
  def _truncate_jsonl(path: pathlib.Path, resume_step: int, redo=()) -> list[dict[str, Any]]:
    """Keeps the records with step <= resume_step, less those at resume_step holding a metric
    whose name starts with a prefix in `redo` (atomically: write a copy, then rename).
    Returns the kept records at resume_step."""
    if not path.exists():
      return []
    redo = tuple(redo)

    def keep(r):
      step = r.get("step", -1)
      if step == resume_step and redo:
        return not any(k.startswith(redo) for k in r if k not in ("step", "time"))
      return step <= resume_step

    kept = [r for r in read_jsonl(path) if keep(r)]
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
      for record in kept:
        f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)
    return [r for r in kept if r.get("step") == resume_step]

  def rewind(self, step: int, *, redo: tuple[str, ...] = ()) -> None:
    """Continues the log after global step `step`, the step the run actually restored.

    Drops the records with step > `step` (and, at `step`, those holding a metric whose name
    starts with a prefix in `redo`), in metrics.jsonl and, by a purge, in TensorBoard.
    """
    if not self.enabled:
      return
    step = int(step)
    jsonl_path = self.workdir / JSONL_NAME
    self._jsonl.close()
    at_step = self._truncate_jsonl(jsonl_path, step, redo)
    self._jsonl = open(jsonl_path, "a", buffering=1)
    if self._tb is not None:
      self._tb.close()
      self._open_tb(purge_step=step if redo else step + 1)
      for record in at_step if redo else ():  # the purge hid them too: write them again
        for name, value in record.items():
          if name not in ("step", "time"):
            self._tb.add_scalar(name, float("nan") if value is None else value, step,
                                walltime=record.get("time"))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Writes one record: {"step", "time", **scalars}. Values: numbers or 0-d arrays."""
    if not self.enabled:
      return
    step = int(step)
    values = {}
    for name, value in scalars.items():
      if not isinstance(name, str) or name in ("step", "time"):
        raise ValueError(f"bad metric name {name!r} (must be a str other than 'step'/'time')")
      values[name] = _to_scalar(name, value)
    now = time.time()
    self._jsonl.write(json.dumps({"step": step, "time": now, **values}, allow_nan=False) + "\n")
    if self._tb is not None:
      for name, value in values.items():
        self._tb.add_scalar(name, float("nan") if value is None else value, step, walltime=now)
    if self.remote is not None and time.monotonic() - self._last_sync >= self.sync_every_s:
      self.flush()

  def flush(self) -> None:
    if self._jsonl is not None:
      self._jsonl.flush()
      os.fsync(self._jsonl.fileno())
    if self._tb is not None:
      self._tb.flush()
    self._sync()

  def _sync(self) -> None:
    """Copies the local mirror's new or changed files, whole, to the remote workdir."""
    if self.remote is None or not self.enabled:
      return
    for path in sorted(self.workdir.rglob("*")):
      if not path.is_file():
        continue
      rel = path.relative_to(self.workdir).as_posix()
      st = path.stat()
      if self._synced.get(rel) == (st.st_size, st.st_mtime_ns):
        continue
      dst = self.remote / rel
      dst.parent.mkdir(parents=True, exist_ok=True)
      dst.write_bytes(path.read_bytes())
      self._synced[rel] = (st.st_size, st.st_mtime_ns)
    self._last_sync = time.monotonic()

  def close(self) -> None:
    if self._jsonl is not None:
      self.flush()
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    self._sync()  # the event files' last bytes, written by close

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ---------------------------------------------------------------------------------------------
# Phase timings.


class Timer:
  """Accumulates wall seconds per named phase (rollout / value+reward / update) per iteration.

      timer = Timer()
      with timer("rollout"):
        rollout = jax.block_until_ready(generate(...))   # block: JAX dispatch is asynchronous
      ...
      writer.write_scalars(step, timer.seconds(prefix="time/"))   # then
      timer.reset()

  Entering the same phase twice in an iteration adds up. `clock` is injectable for tests.
  """

  def __init__(self, clock: Callable[[], float] = time.perf_counter):
    self._clock = clock
    self._seconds: dict[str, float] = collections.OrderedDict()

  @contextlib.contextmanager
  def __call__(self, name: str) -> Iterator[None]:
    start = self._clock()
    try:
      yield
    finally:
      self._seconds[name] = self._seconds.get(name, 0.0) + (self._clock() - start)

  def seconds(self, prefix: str = "") -> dict[str, float]:
    """{prefix + phase: seconds} accumulated since the last reset, in first-use order."""
    return {prefix + name: s for name, s in self._seconds.items()}

  def total(self) -> float:
    return sum(self._seconds.values())

  def reset(self) -> None:
    self._seconds.clear()


# ---------------------------------------------------------------------------------------------
# Progress bar: tqdm's own, with the metrics as its postfix.

DEFAULT_FIELDS = (("R", "reward"), ("L", "loss"), ("KL", "kl"))


def progress_bar(total: int, *, initial: int = 0, desc: str = "train",
                 is_main_process: bool = True, **tqdm_kwargs) -> tqdm:
  """A tqdm bar over training steps, disabled off the main process. Per step:

      bar.set_postfix(bar_postfix(metrics, tokens_per_sec=tokens / seconds), refresh=False)
      bar.update()
  """
  return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
              disable=not is_main_process, **tqdm_kwargs)


def _lookup(metrics: Mapping[str, Any], key: str):
  """metrics[key], or the single entry whose name ends with '/key' (e.g. 'train/reward')."""
  if key in metrics:
    return metrics[key]
  hits = [v for k, v in metrics.items() if k.endswith("/" + key)]
  return hits[0] if len(hits) == 1 else None


def bar_postfix(metrics: Mapping[str, Any], *, tokens_per_sec: float | None = None,
                fields=DEFAULT_FIELDS) -> dict[str, float | str]:
  """`tqdm.set_postfix` arguments: {label: value} for each (label, key) of `fields` found in
  `metrics` (a key matches itself or a single '*/key'; missing or ambiguous keys are left out),
  then 'tok/s' in tqdm's SI format."""
  out: dict[str, float | str] = {}
  for label, key in fields:
    value = _lookup(metrics, key)
    if value is not None:
      out[label] = float(np.asarray(value))
  if tokens_per_sec is not None:
    out["tok/s"] = tqdm.format_sizeof(tokens_per_sec)
  return out
