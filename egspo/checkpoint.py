"""Checkpoints with exact resume, preemption handling and the non-finite-update guard.

REFERENCE §3 (the training loop). A checkpoint is two orbax items in one step directory:

    <workdir>/<step>/state   the training state: any pytree of jax arrays (params, optimizer
                             state, RNG keys, counters), saved with `ocp.args.StandardSave`
    <workdir>/<step>/meta    a JSON dict of host-side facts (step, data-iterator position, config
                             snapshot, ...), saved with `ocp.args.JsonSave`

Exact resume needs every source of state: parameters, optimizer moments and count, the RNG key,
the data position and the step. The caller puts the first three in `state` and the host-side ones
in `meta`; `Checkpointer.restore` gives both back bit-for-bit (tests/test_checkpoint.py trains a
toy model N steps straight and k + (N - k) steps across a restart, and a SIGKILL, and compares).

Atomicity is orbax's: a step is written to `<step>.orbax-checkpoint-tmp-<time>` and renamed to
`<step>` only when every item (and, multi-host, every process) has finished, with a
`commit_success.txt` marker. An interrupted save therefore leaves a tmp directory that
`latest_step()`/`restore()` never see (and that a background sweep deletes when the next
`Checkpointer` opens the directory); the previous step stays loadable. Corruption after a commit
(a truncated or deleted file) raises `CheckpointError` naming the step directory and the fault;
`restore(fallback=True)` then takes the newest older step that loads and moves the unusable newer
steps aside to `<directory>/corrupt/<step>-<unix time>` (kept for inspection; orbax no longer
lists them, so the run can save those steps again). Multi-host, every process must reach the same
verdict, so use `fallback` only on a filesystem all processes share.

Errors are one line naming the directory and the cause: a save that fails (disk full, directory
not writable) raises `CheckpointError` from the `save`/`wait_until_finished`/`close` call that
sees it and removes the step's temporary directory; orbax's own error logs of background saves are
cut to one line (their tracebacks go to DEBUG). `save` refuses a state with a NaN/Inf floating leaf.

Multi-host: every process calls `save`/`restore` with its addressable shards; orbax coordinates
who writes what (each process writes its own array shards, the primary process writes metadata and
the JSON item, and the rename happens after a barrier). Nothing here writes from process 0 only.

A local directory is made absolute (`~` expanded) at construction: orbax refuses relative paths.
A `scheme://` path (gs://...) is used as given.

Typed PRNG keys (`jax.random.key`) cannot be serialised as such, so `save` stores their
`jax.random.key_data` and records the key's implementation under `meta["__prng_keys__"]`;
`restore` wraps them back with `jax.random.wrap_key_data`.
"""

from __future__ import annotations

import logging
import re
import signal
import sys
import threading
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocp_managers

from egspo import paths

log = logging.getLogger(__name__)

STATE_ITEM = "state"
META_ITEM = "meta"
_PRNG_META_KEY = "__prng_keys__"
_ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be written or restored: the message names the directory and cause."""


def resolve_directory(directory) -> epath.Path:
  """`directory` as an absolute path (`~` expanded); a `scheme://` path (gs://...) unchanged."""
  return epath.Path(paths.resolve_path(directory))


class _QuietFailedIO(logging.Filter):
  """One line, not thousands, when orbax fails to write or read a checkpoint.

  A failed async save makes orbax log the exception with a ~100-line traceback from each of its
  threads, and every array write still in flight then ends in a tensorstore callback into
  orbax's closed event loop ('Event loop is closed', an unraisable error each), an asyncio
  'Future exception was never retrieved', and at exit an abandoned coroutine. `Checkpointer`
  raises one `CheckpointError` for the failure (at the next save/wait/close for an async save).
  Here: the first orbax ERROR record of a failure keeps its first line (the immediate notice),
  later ones are dropped until that `CheckpointError` is raised; the echoes above are dropped.
  All of it stays available at DEBUG (`logging.getLogger('egspo.checkpoint')`).
  """

  def __init__(self):
    super().__init__()
    self.pending = False  # a failure was shown and its CheckpointError not yet raised
    self.in_flight: dict[int, str] = {}  # id(Checkpointer) → step dir of its unfinished save

  def filter(self, record):
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


# ---------------------------------------------------------------------------------------------
# Typed PRNG keys ⇄ raw key data.


def _is_prng_key(x) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_impl_name(x) -> str:
  """Name of a typed key's implementation, e.g. 'threefry2x32'; works on arrays and abstract."""
  if isinstance(x, jax.Array):
    return str(jax.random.key_impl(x))
  # ShapeDtypeStruct: the dtype carries the impl; key_impl() only accepts concrete arrays.
  return str(x.dtype._impl.name)  # pylint: disable=protected-access


def _keys_to_data(tree) -> tuple[Any, dict[str, str]]:
  """Replaces every typed PRNG key leaf by its uint32 key data → (tree, {keystr(path): impl})."""
  impls = {}

  def encode(path, x):
    if _is_prng_key(x):
      impls[jax.tree_util.keystr(path)] = _key_impl_name(x)
      return jax.random.key_data(x)
    return x

  return jax.tree_util.tree_map_with_path(encode, tree), impls


def _abstract_keys_to_data(target):
  """Abstract target with typed-key leaves replaced by the abstract key data (same sharding)."""

  def encode(x):
    if not _is_prng_key(x):
      return x
    data = jax.eval_shape(jax.random.key_data, x)
    # The key data has trailing key dims; a NamedSharding's spec leaves trailing dims replicated,
    # so the key's own sharding lays the data out the same way.
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(x, "sharding", None))

  return jax.tree_util.tree_map(encode, target)


def _data_to_keys(tree, impls: Mapping[str, str]):
  """Inverse of `_keys_to_data`: wraps the recorded leaves back into typed keys."""
  if not impls:
    return tree
  found = set()

  def decode(path, x):
    name = jax.tree_util.keystr(path)
    if name in impls:
      found.add(name)
      return jax.random.wrap_key_data(x, impl=impls[name])
    return x

  out = jax.tree_util.tree_map_with_path(decode, tree)
  missing = set(impls) - found
  if missing:
    raise CheckpointError(f"PRNG key leaves {sorted(missing)} recorded at save time are not in the "
                          "restored state: the target's tree structure differs from the saved one")
  return out


# ---------------------------------------------------------------------------------------------
# The checkpointer.


class Checkpointer:
  """Orbax `CheckpointManager` over (state, meta) with keep-N, async saves and safe restore.

  Usage (every process of a multi-host run makes the same calls):

      ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=3, keep_every=1000)
      if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(target=jax.eval_shape(lambda: state), fallback=True)
      ...
      ckpt.save(step, state, {"step": step, "data_position": pos})   # returns at once (async)
      ...
      ckpt.close()                                                   # waits for the last save

  An async `save` returns after the arrays are copied off the device, so the caller may donate or
  overwrite the state's buffers right away; the file writes continue in a background thread.
  """

  def __init__(self, directory, *, max_to_keep: int | None = 3, keep_every: int | None = None,
               save_interval_steps: int = 1, async_save: bool = True, read_only: bool = False):
    """
    Args:
      directory: root directory of the step directories (created if missing).
      max_to_keep: keep the newest N steps (None = keep all).
      keep_every: also keep forever every step that is a multiple of this (None = off).
      save_interval_steps: `save` (without force) only writes steps that are multiples of this.
      async_save: write in a background thread (call `wait_until_finished`/`close`).
      read_only: open an existing directory for restoring only.
    """
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
    if keep_every is not None and keep_every < 1:
      raise ValueError(f"keep_every must be >= 1 or None, got {keep_every}")
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
    self.directory = resolve_directory(directory)
    self._read_only = read_only
    _quiet_failed_io()
    policies = [ocp_managers.LatestN(n=max_to_keep)]
    if keep_every is not None:
      policies.append(ocp_managers.EveryNSteps(interval_steps=keep_every))
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps,
        preservation_policy=ocp_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        # Left-over tmp dirs are saves that never committed (killed mid-write): drop them.
        cleanup_tmp_directories=not read_only,
        create=not read_only,
        read_only=read_only,
    )
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

  def step_dir(self, step: int) -> epath.Path:
    return self.directory / str(step)

  # -- save ----------------------------------------------------------------------------------

  def save(self, step: int, state, meta: Mapping[str, Any] | None = None, *,
           force: bool = False) -> bool:
    """Starts saving `state` (pytree of arrays) and `meta` (JSON-able dict) as step `step`.

    Returns True if a save was started (False when `save_interval_steps` skips this step and
    `force` is not set). Raises ValueError if `meta` is not a JSON-able dict or uses the
    reserved key "__prng_keys__"; CheckpointError if a floating leaf of `state` holds NaN/Inf
    (nothing is written) or if this or the previous (async) save cannot be written.
    """
    meta = dict(meta or {})
    if _PRNG_META_KEY in meta:
      raise ValueError(f"meta key {_PRNG_META_KEY!r} is reserved by the checkpointer")
    step = int(step)
    state, impls = _keys_to_data(state)
    meta[_PRNG_META_KEY] = impls
    if not force and not self._manager.should_save(step):
      return False
    bad = nonfinite_leaves(state)
    if bad:
      more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
      raise CheckpointError(f"refusing to save step {step} to {self.directory}: non-finite "
                            f"values (NaN/Inf) in {', '.join(bad[:3])}{more}")
    try:
      started = self._manager.save(
          step, force=force,
          args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state),
                                     META_ITEM: ocp.args.JsonSave(meta)}))
    except Exception as e:  # orbax/tensorstore raise many types; this or the previous save
      raise self._write_error(e) from None
    if started:
      self._pending_step = step
      _QUIET.in_flight[id(self)] = str(self.step_dir(step))
    return started

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
    if self._read_only or jax.process_index() != 0:
      return []
    removed = []
    try:
      for p in self.directory.glob(f"*{_ORBAX_TMP_SUFFIX}*"):
        p.rmtree() if p.is_dir() else p.unlink()
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
        `sharding=NamedSharding(...)` for a sharded restore; e.g. `jax.eval_shape` of the
        initial state with shardings attached), or of concrete arrays. Restored leaves get its
        tree structure, dtypes and shardings. None = the saved structure (nested dicts/lists,
        namedtuples become lists) with every array on this process's first device: for
        inspection and small states, whatever topology saved it.
      fallback: if the step cannot be restored, log why and try the next older committed step
        (the guard against a checkpoint corrupted after its commit, e.g. a truncated file); when
        an older one loads, the unusable newer steps are moved to `<directory>/corrupt/`.

    Raises:
      FileNotFoundError: the directory has no committed step.
      CheckpointError: the step (and, with `fallback`, every older one) is corrupt or missing;
        the message's first line names the directory and the newest step's fault, the next
        lines each other step tried.
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
    step_dir = self.step_dir(step)
    problem = _check_step_dir(step_dir)
    if problem:
      raise CheckpointError(f"checkpoint {step_dir} is incomplete: {problem}")
    try:
      if target is None:
        abstract = self._abstract_from_metadata(step)
      else:
        abstract = _abstract_keys_to_data(_to_abstract(target))
      restored = self._manager.restore(
          step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract),
                                           META_ITEM: ocp.args.JsonRestore()}))
    except Exception as e:  # orbax/tensorstore raise many types; name the step dir either way
      raise _failure(f"checkpoint {step_dir} cannot be restored: "
                     f"{type(e).__name__}: {_first_line(e)}") from e
    meta = dict(restored[META_ITEM] or {})
    impls = meta.pop(_PRNG_META_KEY, {})
    state = _data_to_keys(restored[STATE_ITEM], impls)
    return state, meta


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
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, (np.ndarray, np.generic)):
      return jax.ShapeDtypeStruct(x.shape, x.dtype)
    return x

  return jax.tree_util.tree_map(to_sds, tree)


def _check_step_dir(step_dir: epath.Path) -> str | None:
  """Cheap structural check of a committed step dir → description of what is missing, or None."""
  required = [
      "_CHECKPOINT_METADATA",
      f"{STATE_ITEM}/_METADATA",
      f"{META_ITEM}/metadata",
  ]
  if not step_dir.is_dir():
    return "the step directory does not exist"
  for rel in required:
    if not (step_dir / rel).exists():
      return f"missing file {rel!r}"
  for rel in (f"{META_ITEM}/metadata", f"{STATE_ITEM}/_METADATA"):
    if (step_dir / rel).stat().length == 0:
      return f"file {rel!r} is empty"
  return None


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


# ---------------------------------------------------------------------------------------------
# Preemption.


class PreemptionGuard:
  """Context manager that turns SIGTERM/SIGINT into a flag the training loop polls.

      with PreemptionGuard() as guard:
        for step in range(start, total):
          state = train_step(state)
          if guard.should_stop(step):
            ckpt.save(step, state, meta, force=True)
            break
      ckpt.close()     # the async save must commit before the process exits

  Single process: the handlers set a flag; the current step finishes, the caller saves and
  returns, and the process exits with code 0. A second SIGINT raises KeyboardInterrupt at once
  (for a person at the terminal who really wants out).

  Multi-host (`jax.process_count() > 1`): a preemption notice reaches one host, but all hosts
  must stop, and save, at the same step, or the save's collectives deadlock. JAX's preemption
  service (started by `jax.distributed.initialize`, config `jax_enable_preemption_service`)
  catches SIGTERM in C++ and agrees on a sync step; `should_stop(step)` then returns
  `multihost_utils.reached_preemption_sync_point(step)`, which is True on every host at the
  same step. So in that mode the guard leaves SIGTERM to JAX (a Python handler would replace
  JAX's) and only handles SIGINT, which it agrees on across hosts with a small all-gather.
  `should_stop` must then be called by every host the same number of times (at every step, and at
  any other check such as a stage boundary); the sync point is counted in those calls, which only
  grow, so one guard can serve several loops whose step numbers start over.

  On exit the previous handlers are restored. Handlers can only be installed from the main
  thread; elsewhere the guard logs a warning and only the multi-host sync point is active.
  """

  def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
    self._signals = tuple(signals)
    self._previous: dict[int, Any] = {}
    self._event = threading.Event()
    self._received: list[int] = []
    self._multihost = False
    self._calls = 0  # should_stop calls: the (monotone) step id of JAX's preemption sync point

  @property
  def received(self) -> list[int]:
    """Signal numbers received so far (in order)."""
    return list(self._received)

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    if signum == signal.SIGINT and self._event.is_set() and signal.SIGINT in self._received:
      raise KeyboardInterrupt  # second Ctrl-C: stop now
    self._received.append(signum)
    self._event.set()
    log.warning("received signal %d: will save and stop after the current step", signum)

  def __enter__(self) -> "PreemptionGuard":
    self._multihost = jax.process_count() > 1
    signals = self._signals
    if self._multihost:
      signals = tuple(s for s in signals if s != signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread():
      log.warning("PreemptionGuard entered off the main thread: no signal handlers installed")
      return self
    for s in signals:
      self._previous[s] = signal.signal(s, self._handler)
    return self

  def __exit__(self, *exc) -> None:
    for s, prev in self._previous.items():
      signal.signal(s, prev if prev is not None else signal.SIG_DFL)
    self._previous.clear()

  def request_stop(self) -> None:
    """Sets the stop flag by hand (tests, or a loop that decides to stop itself)."""
    self._event.set()

  def should_stop(self, step: int | None = None) -> bool:  # pylint: disable=unused-argument
    """True once a stop was requested (and, multi-host, agreed by all hosts at this call).

    `step` is informational; multi-host, the calls themselves are counted (see the class doc).
    """
    if not self._multihost:
      return self._event.is_set()
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    self._calls += 1
    local = np.array([self._event.is_set()], dtype=np.int32)
    any_host = bool(np.asarray(multihost_utils.process_allgather(local)).any())
    return multihost_utils.reached_preemption_sync_point(self._calls) or any_host


# ---------------------------------------------------------------------------------------------
# Non-finite guard.


def all_finite(tree) -> jax.Array:
  """True iff every floating (and complex) leaf of `tree` is free of NaN/±Inf → bool scalar.

  Integer, bool and key leaves are ignored. Works inside `jax.jit` (returns a traced bool).
  """
  oks = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
         if not _is_prng_key(x) and jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  if not oks:
    return jnp.bool_(True)
  return jnp.all(jnp.stack(oks))


def nonfinite_leaves(tree) -> list[str]:
  """Paths (`jax.tree_util.keystr`) of the floating leaves of `tree` holding a NaN or ±Inf.

  One jitted reduction per leaf, fetched together; sharded and multi-host arrays work (every
  process gets the same answer). Integer, bool and key leaves are ignored.
  """
  paths, leaves = [], []
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    if (hasattr(x, "dtype") and not _is_prng_key(x)
        and jnp.issubdtype(jnp.result_type(x), jnp.inexact)):
      paths.append(jax.tree_util.keystr(path))
      leaves.append(x)
  if not leaves:
    return []
  flags = np.asarray(_leaf_flags(leaves))
  return [p for p, ok in zip(paths, flags) if not ok]


@jax.jit
def _leaf_flags(leaves):
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


class NonFiniteError(RuntimeError):
  """Training stopped: too many updates in a row were refused for non-finite values."""


class RefusedUpdates:
  """Counts consecutive refused (non-finite) updates and stops the run after `limit` in a row.

      refused = RefusedUpdates(limit=10, stage="RL", fields="optim.learning_rate, ...")
      state, m = update(state, batch)              # refuses a non-finite update (keeps state)
      refused.record(bool(m["update_ok"]), where="iteration 12")

  `record` logs each refusal and raises `NonFiniteError` naming the stage, the place, the config
  fields to look at and the limit's own field, once `limit` consecutive updates were refused.
  """

  LIMIT_FIELD = "train.max_refused_updates"

  def __init__(self, limit: int, stage: str, fields: str):
    if limit < 1:
      raise ValueError(f"{self.LIMIT_FIELD} must be >= 1, got {limit}")
    self.limit, self.stage, self.fields = int(limit), stage, fields
    self.in_a_row = 0
    self.total = 0

  def record(self, ok: bool, where: str) -> None:
    if ok:
      self.in_a_row = 0
      return
    self.in_a_row += 1
    self.total += 1
    log.warning("%s %s: update refused (non-finite loss, gradients or new state); %d in a row",
                self.stage, where, self.in_a_row)
    if self.in_a_row >= self.limit:
      raise NonFiniteError(
          f"{self.stage} stopped at {where}: {self.in_a_row} updates in a row were refused "
          f"because the loss, the gradients or the updated parameters/optimizer state were not "
          f"finite (NaN/Inf); no non-finite state was applied or saved. Check {self.fields} "
          f"(the limit is {self.LIMIT_FIELD}={self.limit})")


def select_if_finite(ok, new_state, old_state):
  """`new_state` where `ok` else `old_state`, leaf by leaf (both trees of the same structure).

  The pattern that refuses a non-finite update inside the jitted step and keeps the last good
  state (params, optimizer moments and count alike):

      loss, grads = jax.value_and_grad(loss_fn)(params, batch)
      updates, new_opt = tx.update(grads, opt_state, params)
      new_params = optax.apply_updates(params, updates)
      ok = all_finite((loss, grads, new_params, new_opt))   # check what would be applied
      params, opt_state = select_if_finite(ok, (new_params, new_opt), (params, opt_state))

  `ok` is a bool scalar (a traced one inside jit). A `jnp.where` select costs one elementwise
  pass and keeps donation working; `jax.lax.cond(ok, lambda: new, lambda: old)` is equivalent.
  Typed PRNG keys are selected through their key data.
  """
  ok = jnp.asarray(ok)
  if ok.shape != () or ok.dtype != jnp.bool_:
    raise ValueError(f"select_if_finite needs a bool scalar, got {ok.dtype}{list(ok.shape)}")
  if jax.tree_util.tree_structure(new_state) != jax.tree_util.tree_structure(old_state):
    raise ValueError("select_if_finite: new_state and old_state have different tree structures")

  def select(new, old):
    if _is_prng_key(new):
      data = jnp.where(ok, jax.random.key_data(new), jax.random.key_data(old))
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(new))
    return jnp.where(ok, new, old)

  return jax.tree_util.tree_map(select, new_state, old_state)
