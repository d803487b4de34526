"""The preemption guard of the training loop: SIGTERM/SIGINT become a stop flag that every host
of a multi-host run agrees on, so all of them save at the same step. Design: docs/checkpointing.md.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils


class PreemptionGuard:
  """Context manager that turns SIGTERM/SIGINT into a stop flag the training loop polls.

      with PreemptionGuard() as guard:
        for step in range(start, total):
          state = train_step(state)
          if guard.should_stop(step):
            ckpt.save(step, state, meta, force=True)
            break
      ckpt.close()     # the async save must commit before the process exits

  A second SIGINT raises KeyboardInterrupt at once. Multi-host, SIGTERM is left to JAX's
  preemption service and `should_stop` returns True on every host at the same call (orbax's
  `multihost.reached_preemption`, plus an all-gather for SIGINT), so every host must call it
  the same number of times. Previous handlers are restored on exit. Why: docs/checkpointing.md.
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
    logging.warning("received signal %d: will save and stop after the current step", signum)

  def __enter__(self) -> "PreemptionGuard":
    self._multihost = jax.process_count() > 1
    signals = self._signals
    if self._multihost:  # a Python handler would replace JAX's preemption notifier
      signals = tuple(s for s in signals if s != signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread():
      logging.warning("PreemptionGuard entered off the main thread: no signal handlers installed")
      return self
    for s in signals:
      self._previous[s] = signal.signal(s, self._handler)
    return self

  def __exit__(self, *exc) -> None:
    for s, prev in self._previous.items():
      signal.signal(s, prev if prev is not None else signal.SIG_DFL)
    self._previous.clear()

  def should_stop(self, step: int | None = None) -> bool:  # pylint: disable=unused-argument
    """True once a stop was requested (and, multi-host, agreed by all hosts at this call).

    `step` is informational; multi-host, the calls themselves are counted.
    """
    if not self._multihost:
      return self._event.is_set()
    self._calls += 1
    local = np.array([self._event.is_set()], dtype=np.int32)
    any_host = bool(np.asarray(multihost_utils.process_allgather(local)).any())
    return ocp.multihost.reached_preemption(self._calls) or any_host
