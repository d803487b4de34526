"""egspo.preemption: the guard's flag, handler restore and second-SIGINT escape (the SIGTERM
subprocess runs, one and two processes, are in tests/test_checkpoint.py)."""

import os
import signal
import time

import numpy as np

from egspo.preemption import PreemptionGuard


def test_preemption_guard_sets_flag_and_restores_handlers():
  seen = []
  sentinel = lambda signum, frame: seen.append(signum)
  old = signal.signal(signal.SIGTERM, sentinel)
  try:
    with PreemptionGuard() as guard:
      assert not guard.should_stop(0)
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.01)  # Python runs handlers between bytecodes of the main thread
      assert guard.should_stop(1) and guard.received == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is sentinel
    assert seen == []  # the guard, not the previous handler, got the signal
  finally:
    signal.signal(signal.SIGTERM, old)


def test_preemption_guard_second_sigint_interrupts():
  # The handler before the guard is the interpreter's default, or SIG_IGN when the test process
  # was started in the background by a non-interactive shell: either way it comes back.
  before = signal.getsignal(signal.SIGINT)
  with PreemptionGuard() as guard:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)
    assert guard.should_stop()
    with np.testing.assert_raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.01)
  assert signal.getsignal(signal.SIGINT) is before
