"""Training checkpoints with exact resume.

`Checkpointer` keeps (state, meta) per step with orbax: async saves, the latest N steps plus
optionally the best N by an evaluation metric, atomic commits, a fallback past steps corrupted
after their commit, one-line `CheckpointError`s, and a refusal to save NaN/Inf.
Design: docs/checkpointing.md.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocp_managers

from egspo import paths
from egspo.hub import CheckpointError

log = logging.getLogger(__name__)

STATE_ITEM = "state"
META_ITEM = "meta"
_ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"
_NO_METRICS_WARNING = "Requested `tracked_metric`; did not provide metrics."


def resolve_directory(directory) -> epath.Path:
  """`directory` as an absolute path (`~` expanded); a `scheme://` path (gs://...) unchanged."""
  return epath.Path(paths.resolve_path(directory))


class _QuietFailedIO(logging.Filter):
  """One line, not thousands, when orbax fails to write or read a checkpoint.

  A failed async save makes each orbax thread log a long traceback, and the array writes still in
  flight end in unraisable 'Event loop is closed' errors and unretrieved asyncio futures.
  `Checkpointer` raises one `CheckpointError` for the failure; here the first orbax ERROR record
  keeps its first line, the rest is dropped until that error is raised (all of it at DEBUG on
  `egspo.checkpoint`). Orbax's warning for a save without metrics under best-N is dropped too:
  saves between evaluations carry none by design.
  """

  def __init__(self):
    super().__init__()
    self.pending = False  # a failure was shown and its CheckpointError not yet raised
    self.in_flight: dict[int, str] = {}  # id(Checkpointer) → step dir of its unfinished save

  def filter(self, record):
    if record.levelno == logging.WARNING and record.getMessage() == _NO_METRICS_WARNING:
      return False
    exc = record.exc_info[1] if record.exc_info else None
    if exc is None or record.levelno < logging.ERROR:
      return True
    if record.name == "asyncio":  # futures of the abandoned array writes
      if ".orbax-checkpoint" in str(exc) or "OCDBT" in str(exc):
        log.debug("asyncio: %s", record.getMessage(), exc_info=record.exc_info)
        return False
      return True
    if "/orbax/" not in record.pathname:
      return True
    log.debug("orbax: %s", record.getMessage(), exc_info=record.exc_info)
    if self.pending:
      return False
    self.pending = True
    where = ", ".join(sorted(self.in_flight.values()))
    record.msg = (f"writing checkpoint {where} failed: {type(exc).__name__}: {_first_line(exc)}"
                  if where else _shorten(record.getMessage().splitlines()[0]))
    record.args, record.exc_info, record.exc_text = None, None, None
    return True

  def unraisable(self, previous):
    """A `sys.unraisablehook` that drops the echoes (see above) and passes the rest on."""

    def hook(unraisable):
      exc, obj = unraisable.exc_value, unraisable.object
      code = getattr(obj, "cr_code", None)
      loop_closed = isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
      orbax_coroutine = code is not None and "/orbax/" in code.co_filename
      if loop_closed or orbax_coroutine:
        log.debug("dropped an unraisable %r (%r) of a failed checkpoint operation", exc, obj)
        return
      previous(unraisable)

    hook.egspo_quiet = True
    return hook


_QUIET = _QuietFailedIO()


def _quiet_failed_io() -> None:
  """Installs `_QuietFailedIO` (idempotent; pytest and others may swap the unraisable hook)."""
  for name in ("absl", "asyncio"):  # orbax logs through absl.logging (the 'absl' logger)
    logger = logging.getLogger(name)
    if _QUIET not in logger.filters:
      logger.addFilter(_QUIET)
  if not getattr(sys.unraisablehook, "egspo_quiet", False):
    sys.unraisablehook = _QUIET.unraisable(sys.unraisablehook)


def _failure(message: str) -> CheckpointError:
  """The CheckpointError of a failure; later orbax errors are shown again."""
  _QUIET.pending = False
  return CheckpointError(message)


class Checkpointer:
  """Orbax `CheckpointManager` over (state, meta): keep-N and best-N, async saves, safe restore.

      ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=3, best_metric="eval/accuracy")
      if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(target=jax.eval_shape(lambda: state), fallback=True)
      ckpt.save(step, state, {"step": step, "data": pos})                  # returns at once
      ckpt.save(step, state, meta, metrics={"eval/accuracy": 0.41})        # after an evaluation
      ckpt.close()                                                         # waits for the last save

  Every process of a multi-host run makes the same calls. `save` returns once the arrays are
  copied off the device (the caller may donate them); the files are written in the background.
  """

  def __init__(self, directory, *, max_to_keep: int | None = 3, best_metric: str | None = None,
               best_mode: str = "max", keep_best: int = 1, async_save: bool = True):
    """
    Args:
      directory: root directory of the step directories (created if missing).
      max_to_keep: keep the newest N steps (None = keep all).
      best_metric: a key of the `metrics` given to `save`; the `keep_best` steps with the best
        value are kept beside the newest N (orbax's best-N policy), and `best_step()` names the
        best. None = no best-N.
      best_mode: 'max' (higher is better) or 'min'.
      keep_best: how many best steps to keep.
      async_save: write in a background thread (call `wait_until_finished`/`close`).
    """
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    if keep_best < 1:
      raise ValueError(f"keep_best must be >= 1, got {keep_best}")
    self.directory = resolve_directory(directory)
    self.best_metric = best_metric
    _quiet_failed_io()
    policies = [ocp_managers.LatestN(n=max_to_keep)]
    best_fn = None
    if best_metric is not None:
      best_fn = lambda metrics: float(metrics[best_metric])  # noqa: E731
      policies.append(ocp_managers.BestN(get_metric_fn=best_fn, reverse=best_mode == "min",
                                         n=keep_best, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp_managers.AnyPreservationPolicy(policies),
        best_fn=best_fn, best_mode=best_mode,
        enable_async_checkpointing=async_save,
        # Left-over tmp dirs are saves that never committed (killed mid-write): drop them.
        cleanup_tmp_directories=True)
    # Handlers named up front, so a fresh manager can read an existing step's metadata.
    try:
      self._manager = ocp.CheckpointManager(
          self.directory, options=options,
          item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(),
                         META_ITEM: ocp.JsonCheckpointHandler()})
    except Exception as e:  # not a directory, not writable, bucket missing, ...
      raise _failure(f"cannot open checkpoint directory {self.directory}: "
                     f"{type(e).__name__}: {_first_line(e)}") from None
    self._pending_step: int | None = None  # the step of the last save started

  # -- queries -------------------------------------------------------------------------------

  def all_steps(self) -> list[int]:
    """Committed steps, ascending (tmp dirs of unfinished saves are not steps)."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest committed step, or None if the directory has none."""
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The committed step with the best `best_metric`, or None (no best-N, or no step saved
    with metrics)."""
    if self.best_metric is None:
      return None
    return self._manager.best_step()

  def step_dir(self, step: int) -> epath.Path:
    return self.directory / str(step)

  # -- save ----------------------------------------------------------------------------------

  def save(self, step: int, state, meta: Mapping[str, Any] | None = None, *,
           metrics: Mapping[str, float] | None = None, force: bool = False) -> bool:
    """Starts saving `state` (pytree of arrays) and `meta` (JSON-able dict) as step `step`.

    `metrics` (with `best_metric` set) ranks the step for best-N, e.g. the evaluation accuracy
    measured at this step; a step saved without metrics is kept only while among the newest N.
    Returns True if a save was started (False if `step` is not newer than the latest step and
    `force` is not set). Raises ValueError for metrics without a finite `best_metric` value;
    CheckpointError if a floating leaf of `state` holds NaN/Inf (nothing is written) or if this
    or the previous (async) save cannot be written.
    """
    step = int(step)
    if metrics is not None:
      metrics = self._check_metrics(metrics)
    if not force and not self._manager.should_save(step):
      return False
    bad = nonfinite_leaves(state)
    if bad:
      more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
      raise CheckpointError(f"refusing to save step {step} to {self.directory}: non-finite "
                            f"values (NaN/Inf) in {', '.join(bad[:3])}{more}")
    try:
      started = self._manager.save(
          step, force=force, metrics=metrics,
          args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state),
                                     META_ITEM: ocp.args.JsonSave(dict(meta or {}))}))
    except Exception as e:  # orbax/tensorstore raise many types; this or the previous save
      raise self._write_error(e) from None
    if started:
      self._pending_step = step
      _QUIET.in_flight[id(self)] = str(self.step_dir(step))
    return started

  def _check_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
    if self.best_metric is None:
      raise ValueError(f"metrics given to save, but the Checkpointer of {self.directory} keeps "
                       "no best step (best_metric=None)")
    value = metrics.get(self.best_metric)
    if value is None or not math.isfinite(float(value)):
      raise ValueError(f"metrics[{self.best_metric!r}] must be a finite number, got {value!r} "
                       f"(metrics: {sorted(metrics)})")
    return {k: float(v) for k, v in metrics.items()}

  def wait_until_finished(self) -> None:
    """Blocks until the pending async save (if any) is committed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise self._write_error(e) from None
    _QUIET.in_flight.pop(id(self), None)

  def close(self) -> None:
    """Waits for pending saves and releases the manager's threads."""
    try:
      self._manager.close()
    except Exception as e:
      raise self._write_error(e) from None
    _QUIET.in_flight.pop(id(self), None)

  def _write_error(self, e: BaseException) -> CheckpointError:
    """The one-line error of a failed save; removes the unfinished step's temporary directory."""
    where = self.directory if self._pending_step is None else self.step_dir(self._pending_step)
    self._pending_step = None
    _QUIET.in_flight.pop(id(self), None)
    removed = self._remove_tmp_dirs()
    log.debug("checkpoint save failed", exc_info=e)
    note = f" (removed {', '.join(removed)})" if removed else ""
    return _failure(f"cannot write checkpoint {where}: {type(e).__name__}: "
                    f"{_first_line(e)}{note}")

  def _remove_tmp_dirs(self) -> list[str]:
    """Deletes the `*.orbax-checkpoint-tmp*` directories of unfinished saves → their names."""
    if jax.process_index() != 0:
      return []
    removed = []
    try:
      for p in self.directory.glob(f"*{_ORBAX_TMP_SUFFIX}*"):
        if p.is_dir():
          p.rmtree()
        else:
          p.unlink()
        removed.append(p.name)
    except OSError as e:
      log.warning("could not remove temporary checkpoint directories in %s: %s",
                  self.directory, e)
    return removed

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- restore -------------------------------------------------------------------------------

  def restore(self, step: int | None = None, target=None, *,
              fallback: bool = False) -> tuple[Any, dict[str, Any]]:
    """Restores (state, meta) of `step` (default: the latest step).

    Args:
      step: the step to restore; None = `latest_step()`.
      target: abstract state to restore into: a pytree of `jax.ShapeDtypeStruct` (with
        `sharding=NamedSharding(...)` for a sharded restore) or of concrete arrays; restored
        leaves get its tree structure, dtypes and shardings. None = the saved structure (dicts
        and lists) on this process's first device, whatever topology saved it.
      fallback: if the step cannot be restored, log why and try the next older committed step;
        when one loads, the unusable newer steps are moved to `<directory>/corrupt/`.

    Raises:
      FileNotFoundError: the directory has no committed step.
      CheckpointError: the step (and, with `fallback`, every older one) cannot be restored; the
        first line names the directory and the newest step's fault, the next lines the others.
    """
    self._manager.reload()  # another process (or a killed run) may have changed the directory
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"no committed checkpoint in {self.directory} "
                              f"(found: {_listing(self.directory)})")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise CheckpointError(f"no committed checkpoint for step {step} in {self.directory}; "
                            f"committed steps: {steps}")
    candidates = [s for s in reversed(steps) if s <= step] if fallback else [step]
    errors, failed = [], []
    for s in candidates:
      try:
        restored = self._restore_step(s, target)
      except CheckpointError as e:
        errors.append(str(e))
        failed.append(s)
        log.debug("restore of %s failed", self.step_dir(s), exc_info=e.__cause__ or e)
        if fallback:
          log.warning("checkpoint step %d is unusable, trying an older one: %s", s, e)
        continue
      if failed:
        self._move_aside(failed)
      return restored
    if len(errors) == 1:
      raise CheckpointError(errors[0]) from None
    raise CheckpointError(f"no restorable checkpoint in {self.directory} (tried steps {failed}): "
                          + "\n  ".join(errors)) from None

  def _move_aside(self, steps: Sequence[int]) -> None:
    """Moves unusable committed steps to `<directory>/corrupt/<step>-<unix time>`."""
    if jax.process_index() == 0:
      aside = self.directory / "corrupt"
      aside.mkdir(parents=True, exist_ok=True)
      for s in steps:
        dest = aside / f"{s}-{int(time.time())}"
        self.step_dir(s).rename(dest)
        log.warning("moved the unusable checkpoint %s to %s", self.step_dir(s), dest)
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes(f"egspo_move_aside_{self.directory}_{steps}")
    self._manager.reload()

  def _restore_step(self, step: int, target):
    try:
      abstract = self._abstract_from_metadata(step) if target is None else _to_abstract(target)
      restored = self._manager.restore(
          step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract),
                                           META_ITEM: ocp.args.JsonRestore()}))
    except Exception as e:  # orbax/tensorstore raise many types; name the step dir either way
      raise _failure(f"checkpoint {self.step_dir(step)} cannot be restored: "
                     f"{type(e).__name__}: {_first_line(e)}") from e
    return restored[STATE_ITEM], dict(restored[META_ITEM] or {})

  def _abstract_from_metadata(self, step: int):
    """The saved tree as ShapeDtypeStructs on this process's first device.

    Orbax refuses a target-less restore on another device topology than the one that saved (e.g.
    a 2-process checkpoint read by one process); an explicit single-device target always works.
    """
    tree = self._manager.item_metadata(step)[STATE_ITEM]
    tree = getattr(tree, "tree", tree)
    if tree is None:
      raise ValueError(f"no array metadata for item {STATE_ITEM!r}")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), tree,
        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


def _to_abstract(tree):
  """Concrete arrays → ShapeDtypeStruct with their sharding; abstract leaves kept."""

  def to_sds(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, (np.ndarray, np.generic)):
      return jax.ShapeDtypeStruct(x.shape, x.dtype)
    return x

  return jax.tree_util.tree_map(to_sds, tree)


def nonfinite_leaves(tree) -> list[str]:
  """Paths (`jax.tree_util.keystr`) of the floating leaves of `tree` holding a NaN or ±Inf.

  One jitted reduction over all leaves; sharded and multi-host arrays work (every process gets
  the same answer). Integer, bool and PRNG-key leaves are ignored.
  """
  paths_, leaves = [], []
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact):
      paths_.append(jax.tree_util.keystr(path))
      leaves.append(x)
  if not leaves:
    return []
  return [p for p, ok in zip(paths_, np.asarray(_leaf_flags(leaves))) if not ok]


@jax.jit
def _leaf_flags(leaves):
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
  return _shorten(_TS_SPEC.sub("", text))


_TS_SPEC = re.compile(r" ?\[tensorstore_spec='.*?'\]")  # a JSON blob of the store's settings


def _shorten(text: str, head: int = 200, tail: int = 400) -> str:
  """Long one-line messages keep their start (the kind of error) and end (usually the cause)."""
  return text if len(text) <= head + tail + 5 else f"{text[:head]} ... {text[-tail:]}"


def _listing(directory: epath.Path) -> list[str]:
  try:
    return sorted(p.name for p in directory.iterdir())
  except OSError:
    return []
