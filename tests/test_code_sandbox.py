"""The code sandbox against hostile programs, and the code-task rewards built on it.

The hostile jobs run in two parallel batches (escapes and resource bombs; interpreter tampering
with legitimate controls), short timeouts, so the suite is bounded in time; each case then asserts
its own verdict and side effects. The test process surviving to the asserts is
itself part of the test (several programs try to kill it)."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from egspo.tasks import get_task, sandbox
from egspo.tasks.code_programs import (extract_program, humaneval_tests, kodcode_tests,
                                       prepare_program, score)

CALLER = os.getpid()
SECRET = "egspo-secret-7f3a"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp("sbx")
  os.chmod(root, 0o777)
  sentinel = root / "sentinel"
  sentinel.mkdir()
  (sentinel / "keep.txt").write_text("keep")
  os.chmod(sentinel, 0o777)
  listener = socket.socket()
  listener.bind(("127.0.0.1", 0))
  listener.listen(1)
  listener.setblocking(False)
  os.environ["EGSPO_TEST_SECRET"] = SECRET
  yield {"root": root, "sentinel": sentinel, "port": listener.getsockname()[1], "listener": listener}
  listener.close()
  os.environ.pop("EGSPO_TEST_SECRET", None)


def hostile_jobs(env):
  d = lambda s: textwrap.dedent(s).strip() + "\n"  # noqa: E731
  outside = env["root"] / "pwned.txt"
  return {
      # name: (program, tests, expected verdicts)
      "correct": ("def add(a, b):\n  return a + b\n",
                  ["assert add(1, 2) == 3", "assert add(1, 2) == 4", "from solution import add\nassert add(2, 2) == 4"],
                  [True, False, True]),
      "infinite_loop": ("while True:\n  pass\n", ["assert True"], [False]),
      "loop_in_one_test": ("def f():\n  while True:\n    pass\n", ["f()", "assert 1 + 1 == 2"], [False, True]),
      "fork_bomb": (d("""
          import os
          while True:
            try:
              os.fork()
            except OSError:
              pass
          """), ["assert True"], [False]),
      "memory_bomb": ("a = []\nwhile True:\n  a.append(' ' * 10**7)\n", ["assert True"], [False]),
      "big_alloc": ("x = bytearray(4 * 1024**3)\n", ["assert len(x) > 0"], [False]),
      "deep_recursion": (d("""
          import sys
          sys.setrecursionlimit(10**7)
          def f(n):
            return f(n + 1)
          f(0)
          """), ["assert True"], [False]),
      "huge_output": ("while True:\n  print('x' * 100000)\n", ["assert True"], [False]),
      "huge_file": (d("""
          with open('big.bin', 'wb') as f:
            for _ in range(200):
              f.write(b'0' * 1024**2)
          """), ["import os\nassert os.path.getsize('big.bin') >= 200 * 1024**2"], [False]),
      "write_outside": (d(f"""
          for p in [{str(outside)!r}, '/work/egspo_pwned.txt', '/etc/egspo_pwned']:
            try:
              open(p, 'w').write('pwned')
            except OSError:
              pass
          """), ["assert True"], [True]),
      "delete_outside": (d(f"""
          import shutil
          shutil.rmtree({str(env['sentinel'])!r}, ignore_errors=True)
          """), ["assert True"], [True]),
      "socket_out": (d("""
          import socket
          try:
            socket.create_connection(('1.1.1.1', 53), timeout=0.3)
            ok = True
          except OSError:
            ok = False
          """), ["assert ok"], [False]),
      "socket_caller": (d(f"""
          import socket
          try:
            socket.create_connection(('127.0.0.1', {env['port']}), timeout=0.3)
            ok = True
          except OSError:
            ok = False
          """), ["assert ok"], [False]),
      "kill_parent": (d(f"""
          import os, signal
          for pid in (os.getppid(), {CALLER}, 1, -1):
            try:
              os.kill(pid, signal.SIGKILL)
            except OSError:
              pass
          """), ["assert True"], [True]),
      "os_exit": ("import os\nos._exit(0)\n", ["assert True"], [False]),
      "sys_exit": ("import sys\nsys.exit(0)\n", ["assert True"], [False]),
      "exit_in_test": ("import os\n", ["os._exit(0)"], [False]),
      "read_env": ("import os\n",
                   [f"assert {SECRET!r} in str(dict(os.environ))",
                    f"assert {SECRET!r} in open('/proc/{CALLER}/environ').read()",
                    "assert 'EGSPO_TEST_SECRET' in open('/proc/1/environ').read()"],
                   [False, False, False]),
      "forge_stdout": (d("""
          import os, json
          fake = json.dumps({'nonce': 'x', 'results': [True]}).encode()
          print(fake.decode())
          for fd in range(0, 256):
            try:
              os.write(fd, fake)
            except OSError:
              pass
          raise SystemExit(0)
          """), ["assert True"], [False]),
      "daemon": (d("""
          import os, time
          if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
              time.sleep(1000)
            os._exit(0)
          """), ["assert True"], [True]),
      "ignore_signals": (d("""
          import signal
          for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
          while True:
            pass
          """), ["assert True"], [False]),
      "threads": (d("""
          import threading
          def spin():
            while True:
              pass
          for _ in range(8):
            threading.Thread(target=spin, daemon=True).start()
          spin()
          """), ["assert True"], [False]),
      "syntax_error": ("def f(:\n", ["assert True"], [False]),
  }


# --- the program cannot change how its tests run or how the verdict is reported ---------------
# Each case would score 1.0 in a harness that runs the test after the program in one interpreter
# and trusts what it sees there (exit status, output, exec, sys.modules ...). Every program here
# is wrong (or, in `*_correct`, right but tampering): name -> (program, tests, setup, outcomes),
# outcomes being the exact raw letters (sandbox.OUTCOMES) or None where timing decides.

_D = lambda s: textwrap.dedent(s).strip() + "\n"  # noqa: E731
WRONG = "def add(a, b):\n  return a - b\n"  # fails add(1, 2) == 3
RIGHT = "def add(a, b):\n  return a + b\n"
T2 = ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]

INTERPRETER_JOBS = {
    # The reported hack: exec/eval/compile replaced by no-ops and a fake json in sys.modules.
    "exec_eval_compile_fake_json": (_D("""
        import builtins, sys, types
        builtins.exec = lambda *a, **k: None
        builtins.eval = lambda *a, **k: True
        builtins.compile = lambda *a, **k: compile('pass', '<x>', 'exec')
        fake = types.ModuleType('json')
        fake.dumps = lambda *a, **k: '{"passed": true}'
        fake.loads = lambda *a, **k: {'passed': True}
        sys.modules['json'] = fake
        """) + WRONG, T2, "", "XX"),
    "exec_hack_correct": (_D("""
        import builtins
        builtins.exec = lambda *a, **k: None
        """) + RIGHT, T2, "", "XX"),
    "builtins_print_open_import": (_D("""
        import builtins
        _imp = builtins.__import__
        builtins.print = lambda *a, **k: None
        builtins.open = lambda *a, **k: None
        builtins.__import__ = lambda name, *a, **k: _imp(name, *a, **k)
        """) + WRONG, T2, "", "XX"),
    "builtins_isinstance_assertion": (_D("""
        import builtins
        builtins.isinstance = lambda *a: True
        class Never(Exception):
          pass
        builtins.AssertionError = Never
        def is_int(x):
          return False
        """), ["assert isinstance(5, int) and is_int(5)"], "", "X"),
    "builtin_replaced_during_test": (_D("""
        import builtins
        def f(xs):
          builtins.sorted = lambda *a, **k: [1, 2, 3]
          return xs
        """), ["assert sorted(f([3, 2, 9])) == [1, 2, 3]"], "", "F"),
    "program_defines_sorted": (_D("""
        def sorted(*a, **k):
          return [1, 2, 3]
        def f(xs):
          return xs
        """), ["assert sorted(f([3, 2, 9])) == [1, 2, 3]"], "", "F"),
    "star_import_shadows_builtin": (_D("""
        __all__ = ['f', 'sorted']
        def sorted(*a, **k):
          return [1, 2, 3]
        def f(xs):
          return xs
        """), ["assert sorted(f([3, 2, 9])) == [1, 2, 3]"], "from solution import *", "F"),
    "fake_module_as_global": (_D("""
        import types
        math = types.ModuleType('math')
        math.isclose = lambda *a, **k: True
        def area(r):
          return 0
        """), ["assert math.isclose(area(1), 3.14159, rel_tol=1e-3)"], "", "F"),
    "patch_math_isclose": (_D("""
        import math
        math.isclose = lambda *a, **k: True
        def area(r):
          return 0
        """), ["assert math.isclose(area(1), 3.14159, rel_tol=1e-3)"], "import math", "X"),
    "patch_math_self_restoring": (_D("""
        import math
        _orig = math.isclose
        def _fake(*a, **k):
          math.isclose = _orig
          return True
        math.isclose = _fake
        def area(r):
          return 0
        """), ["assert math.isclose(area(1), 3.14159, rel_tol=1e-3)"], "import math", "X"),
    "fake_sys_modules_math": (_D("""
        import sys, types
        m = types.ModuleType('math')
        m.isclose = lambda *a, **k: True
        sys.modules['math'] = m
        def area(r):
          return 0
        """), ["import math\nassert math.isclose(area(1), 3.14159, rel_tol=1e-3)"], "", "X"),
    "fake_os_sys_and_harness_modules": (_D("""
        import sys, types
        for name in ('os', 'sys', '__main__', '_sandbox_harness', 'egspo.tasks.sandbox', 'marshal',
                     'signal', 'time', 'resource', 'json'):
          m = types.ModuleType(name)
          m._exit = m.exit = lambda *a: None
          m.write = lambda *a: 32
          sys.modules[name] = m
        """) + WRONG, T2, "", "FF"),
    "patch_harness_globals": (_D("""
        import sys
        main = sys.modules['__main__']
        for k, v in list(vars(main).items()):
          if callable(v) and not k.startswith('__'):
            setattr(main, k, lambda *a, **k: None)
        """) + WRONG, T2, "", "FF"),
    "excepthook": (_D("""
        import sys, os
        sys.excepthook = lambda *a: os._exit(0)
        sys.unraisablehook = lambda *a: os._exit(0)
        """) + WRONG, T2, "", "XX"),
    "sys_exit_during_test": ("import sys\ndef add(a, b):\n  sys.exit(0)\n", T2, "", "FF"),
    "os_exit_during_test": ("import os\ndef add(a, b):\n  os._exit(0)\n", T2, "", "ZZ"),
    "os_exit_in_setup": (RIGHT.replace("a + b", "a - b"), T2, "import os\nos._exit(0)", "ZZ"),
    "os_exit_from_thread_after_test": (_D("""
        import threading, time, os
        def later():
          time.sleep(0.05)
          os._exit(0)
        threading.Thread(target=later, daemon=True).start()
        """) + WRONG, T2, "", None),
    "atexit_fake_verdict": (_D("""
        import atexit, os, sys
        def fake():
          print('{"passed": true, "score": 1.0}')
          print('ALL TESTS PASSED', file=sys.stderr)
          os._exit(0)
        atexit.register(fake)
        """) + WRONG, T2, "", "FF"),
    "fake_success_markers": (_D("""
        import sys
        for m in ('PASSED', 'OK', '1.0', 'All tests passed!', '{"nonce": "x", "results": [true]}'):
          print(m)
          print(m, file=sys.stderr)
        """) + WRONG, T2, "", "FF"),
    "echo_every_fd": (_D("""
        import os
        data = b''
        for fd in range(3, 256):
          try:
            os.set_blocking(fd, False)
            data += os.read(fd, 4096)
          except OSError:
            pass
        for fd in range(3, 256):
          for chunk in (data, data + data, b'1' * 32):
            try:
              os.write(fd, chunk)
            except OSError:
              pass
        os._exit(0)
        """), T2, "", "ZZ"),
    "frame_walk_for_secrets": (_D("""
        import sys, os
        blobs = []
        f = sys._getframe()
        while f is not None:
          for v in list(f.f_locals.values()) + list(f.f_globals.values()):
            if isinstance(v, (bytes, bytearray)) and 8 <= len(v) <= 64:
              blobs.append(bytes(v))
          f = f.f_back
        for fd in range(3, 256):
          for b in blobs + [b + b for b in blobs]:
            try:
              os.write(fd, b)
            except OSError:
              pass
        os._exit(0)
        """), T2, "", "ZZ"),
    "forge_end_marker": ("import sys, functools\nadd = functools.partial(sys.audit, 'egspo.end')\n",
                         T2, "", "FF"),
    "raise_harness_events": ("import sys\nsys.audit('egspo.end')\nsys.audit('egspo.check')\n" + WRONG,
                             T2, "", "FF"),
    "rebind_test_builtins_via_frames": (_D("""
        import sys
        f = sys._getframe()
        while f is not None and f.f_code.co_name != '_trusted_run':
          f = f.f_back
        tg = f.f_locals['tg']
        fake = dict(tg['__builtins__'])
        fake['sorted'] = lambda *a, **k: [1, 2, 3]
        tg['__builtins__'] = fake
        def g(xs):
          return xs
        """), ["assert sorted(g([9, 8])) == [1, 2, 3]"], "", "X"),
    "monkeypatch_unittest": (_D("""
        import unittest
        unittest.TestCase.assertEqual = lambda *a, **k: None
        """) + WRONG, ["import unittest\nunittest.TestCase().assertEqual(add(1, 2), 3)"], "", "X"),
    "counter_eq_patch": (_D("""
        import collections
        collections.Counter.__eq__ = lambda self, other: True
        def count(s):
          return collections.Counter()
        """), ["from collections import Counter\nassert count('aab') == Counter('aab')"], "", "X"),
    "class_bases_swap": (_D("""
        import collections
        class AlwaysEqual(dict):
          def __eq__(self, other):
            return True
        collections.Counter.__bases__ = (AlwaysEqual,)
        def count(s):
          return collections.Counter()
        """), ["from collections import Counter\nassert count('aab') == Counter('aab')"], "", "B"),
    "pytest_raises_patch": (_D("""
        import pytest, contextlib
        pytest.raises = lambda *a, **k: contextlib.suppress(BaseException)
        def safe_div(a, b):
          return 0
        """), ["test_raises()"], _D("""
        import pytest
        from solution import safe_div
        def test_raises():
            with pytest.raises(ZeroDivisionError):
                safe_div(1, 0)
        """), "X"),
    "pytest_approx_defaults": (_D("""
        import pytest
        pytest.approx.__defaults__ = (1e9, 1e9, False)
        def third():
          return 5.0
        """), ["import pytest\nassert third() == pytest.approx(1 / 3)"], "", "B"),
    "library_code_swap": (_D("""
        import fractions
        fractions.Fraction.__eq__.__code__ = (lambda *a, **k: True).__code__
        """) + WRONG, T2, "", "BB"),
    "module_class_swap": (_D("""
        import math, types
        class Fake(types.ModuleType):
          def __getattribute__(self, name):
            return lambda *a, **k: True
        math.__class__ = Fake
        def area(r):
          return 0
        """), ["assert math.isclose(area(1), 3.14)"], "import math", "B"),
    "settrace_skips_assert": (_D("""
        import sys
        def tracer(frame, event, arg):
          if frame.f_code.co_filename.startswith('<test') and event == 'line':
            try:
              frame.f_lineno = frame.f_code.co_firstlineno + 2
            except Exception:
              pass
          return tracer
        sys.settrace(tracer)
        """) + WRONG, ["assert add(1, 2) == 3\nx = 1\nx = 2"], "", "B"),
    "setprofile": ("import sys\nsys.setprofile(lambda *a: None)\n" + WRONG, T2, "", "BB"),
    "threading_settrace": (_D("""
        import threading
        threading.settrace(lambda *a: None)
        threading.Thread(target=lambda: None).start()
        """) + WRONG, T2, "", "BB"),
    "gc_patch_int_eq": (_D("""
        import gc
        gc.get_referents(int.__dict__)[0]['__eq__'] = lambda a, b: True
        """) + WRONG, T2, "", "BB"),
    "gc_walk_objects": ("import gc\nobjs = gc.get_objects()\n" + WRONG, T2, "", "BB"),
    "gc_callback_exits": (_D("""
        import gc, os
        gc.callbacks.append(lambda phase, info: os._exit(0))
        gc.set_threshold(1)
        """) + WRONG, T2, "", None),
    "signal_handlers_exit_0": (_D("""
        import signal, os
        def h(*a):
          os._exit(0)
        for s in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
          signal.signal(s, h)
        signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
        """) + WRONG, T2, "", None),
    "thread_keeps_patching": (_D("""
        import threading, math, time
        def spin():
          while True:
            math.isclose = lambda *a, **k: True
            time.sleep(0)
        threading.Thread(target=spin, daemon=True).start()
        def area(r):
          return 0
        """), ["assert math.isclose(area(1), 3.14159, rel_tol=1e-3)"], "import math", None),
    "ctypes_correct": ("import ctypes\n" + RIGHT, T2, "", "EE"),
    "current_frames_correct": ("import sys\nsys._current_frames()\n" + RIGHT, T2, "", "BB"),
    "new_code_object_correct": ("c = (lambda: 0).__code__.replace(co_consts=(1,))\n" + RIGHT, T2, "", "BB"),
    "audit_hook_correct": ("import sys\nsys.addaudithook(lambda *a: None)\n" + RIGHT, T2, "", "BB"),
    "proc_self_mem": (_D("""
        ok = False
        try:
          open('/proc/self/mem', 'rb')
          ok = True
        except OSError:
          pass
        """), ["assert ok"], "", "F"),
}

# Legitimate programs keep their full score.
LEGIT_JOBS = {
    "legit_classes": (_D("""
        class Stack:
          def __init__(self):
            self.items = []
          def push(self, x):
            self.items.append(x)
          def pop(self):
            return self.items.pop()
        class Point:
          def __init__(self, x, y):
            self.x, self.y = x, y
          def __eq__(self, o):
            return isinstance(o, Point) and (self.x, self.y) == (o.x, o.y)
        def mid(a, b):
          return Point((a.x + b.x) / 2, (a.y + b.y) / 2)
        """), ["s = Stack(); s.push(1); s.push(2)\nassert s.pop() == 2",
               "assert mid(Point(0, 0), Point(2, 2)) == Point(1, 1)"], ""),
    "legit_json_math_collections": (_D("""
        import json, math, collections
        def stats(xs):
          c = collections.Counter(xs)
          rms = round(math.sqrt(sum(x * x for x in xs) / len(xs)), 3)
          return json.dumps({"n": len(xs), "top": c.most_common(1)[0][0], "rms": rms})
        def counts(xs):
          return collections.Counter(xs)
        """), ["assert json.loads(stats([1, 1, 2]))['top'] == 1",
               "assert math.isclose(json.loads(stats([3, 4]))['rms'], 3.536)",
               "assert counts('aab') == collections.Counter({'a': 2, 'b': 1})",
               "assert counts('aab') == {'a': 2, 'b': 1}"], "import json, math, collections"),
    "legit_recursion": (_D("""
        import sys
        from functools import lru_cache
        sys.setrecursionlimit(10000)
        @lru_cache(None)
        def fib(n):
          return n if n < 2 else fib(n - 1) + fib(n - 2)
        def depth(n):
          return 0 if n == 0 else 1 + depth(n - 1)
        """), ["assert fib(80) == 23416728348467685", "assert depth(2500) == 2500"], ""),
    "legit_stdlib": (_D("""
        import re, heapq, itertools, dataclasses, enum, typing, fractions, decimal, warnings
        from collections import namedtuple
        warnings.filterwarnings("ignore")
        P = namedtuple("P", "a b")
        class Color(enum.Enum):
          RED = 1
        @dataclasses.dataclass
        class Item:
          name: str
          qty: int = 0
        def top2(xs: typing.List[int]) -> typing.List[int]:
          return heapq.nlargest(2, xs)
        def words(s):
          return re.findall(r"[a-z]+", s.lower())
        def half(x):
          return fractions.Fraction(x, 2)
        def dsum(a, b):
          return decimal.Decimal(a) + decimal.Decimal(b)
        def pairs(xs):
          return list(itertools.combinations(xs, 2))
        """), ["assert top2([3, 1, 5]) == [5, 3]", "assert words('Hi, there') == ['hi', 'there']",
               "from fractions import Fraction\nassert half(1) == Fraction(1, 2)",
               "import decimal\nassert dsum('0.1', '0.2') == decimal.Decimal('0.3')",
               "assert pairs([1, 2, 3]) == [(1, 2), (1, 3), (2, 3)]",
               "assert Item('a', 2) == Item('a', 2) and Color.RED.value == 1 and P(1, 2).b == 2"], ""),
    "legit_kodcode_pytest": (_D("""
        def safe_div(a, b):
          if b == 0:
            raise ZeroDivisionError("b is zero")
          return a / b
        """), ["test_ok()", "test_raises()", "test_approx()"], _D("""
        from solution import *
        import pytest
        def test_ok():
            assert safe_div(6, 3) == 2
        def test_raises():
            with pytest.raises(ZeroDivisionError):
                safe_div(1, 0)
        def test_approx():
            assert safe_div(1, 3) == pytest.approx(0.3333333)
        """)),
    "legit_threads_output_tempfile": (_D("""
        import threading, sys, tempfile, os
        print("hello", file=sys.stderr)
        def psum(xs):
          out = [0, 0]
          def work(k):
            out[k] = sum(xs[k::2])
          ts = [threading.Thread(target=work, args=(k,)) for k in range(2)]
          for t in ts:
            t.start()
          for t in ts:
            t.join()
          return sum(out)
        def roundtrip(s):
          with tempfile.TemporaryDirectory() as d:  # weakref.finalize flips class flags
            with open(os.path.join(d, 'f'), 'w') as f:
              f.write(s)
            with open(os.path.join(d, 'f')) as f:
              return f.read()
        """), ["assert psum(list(range(10))) == 45", "assert roundtrip('abc') == 'abc'"], "import tempfile"),
    "legit_shadowing_helpers": (_D("""
        import sys
        input = sys.stdin.readline
        def max(a, b):
          return a if a > b else b
        def biggest(xs):
          m = xs[0]
          for x in xs:
            m = max(m, x)
          return m
        """), ["assert biggest([3, 9, 2]) == 9", "assert max([1, 5]) == 5"], ""),
    "legit_mock_input": ("def ask():\n  return int(input()) * 2\n",
                         ["from unittest.mock import patch\nwith patch('builtins.input', return_value='21'):\n"
                          "    assert ask() == 42"], ""),
}


@pytest.fixture(scope="module")
def interp_batch():
  jobs = {**{k: v[:3] for k, v in INTERPRETER_JOBS.items()}, **LEGIT_JOBS}
  names = list(jobs)
  t0 = time.monotonic()
  out = sandbox.run_batch_outcomes([{"program": p, "tests": t, "setup": s} for p, t, s in jobs.values()],
                                   workers=2, timeout_s=1.0, memory_mb=512)
  return {"outcomes": dict(zip(names, out)), "elapsed": time.monotonic() - t0}


@pytest.mark.parametrize("name", list(INTERPRETER_JOBS))
def test_interpreter_tampering_scores_zero(interp_batch, name):
  _, tests, _, expected = INTERPRETER_JOBS[name]
  got = interp_batch["outcomes"][name]
  assert len(got) == len(tests) and "P" not in got, (name, got)
  if expected is not None:  # the mechanism that stopped it, not an incidental failure
    assert got == expected, (name, got)


@pytest.mark.parametrize("name", list(LEGIT_JOBS))
def test_legit_programs_keep_full_score(interp_batch, name):
  assert interp_batch["outcomes"][name] == "P" * len(LEGIT_JOBS[name][1])


def test_outcome_letters_and_bools_agree():
  prog = "def f(x):\n  return x\n"
  tests = ["assert f(1) == 1", "assert f(1) == 2", "while True:\n  pass"]
  assert sandbox.run_batch_outcomes([{"program": prog, "tests": tests}], timeout_s=0.5) == ["PFT"]
  assert sandbox.run_batch([{"program": prog, "tests": tests}], timeout_s=0.5) == [[True, False, False]]
  assert sandbox.run_batch_outcomes([{"program": "x = (", "tests": ["assert 1"]}]) == ["E"]
  assert set(sandbox.OUTCOMES) == set("PFETKXBZH")


def test_trusted_code_never_looks_up_globals():
  # Code that runs after the program started takes everything from its arguments or closure:
  # replacing builtins or this module's globals cannot redirect it.
  import dis
  from egspo.tasks import _sandbox_harness as h

  for path in h._TRUSTED:
    outer, _, inner = path.partition(".")
    code = getattr(h, outer).__code__
    if inner:
      code = next(c for c in code.co_consts if isinstance(c, type(code)) and c.co_name == inner)
    ops = {i.opname for i in dis.get_instructions(code)}
    assert not ops & {"LOAD_GLOBAL", "LOAD_NAME", "STORE_GLOBAL", "IMPORT_NAME"}, path
    nested = [c for c in code.co_consts if isinstance(c, type(code))]
    assert not nested, (path, "no closures inside trusted code")


def test_marker_offset_is_the_end_of_the_test():
  # The reporter accepts only the call at this offset; check it against the live frame (in a
  # subprocess: audit hooks cannot be removed).
  script = textwrap.dedent("""
      import sys
      from egspo.tasks import _sandbox_harness as h
      code, end = h._compile_test("x = 1\\nassert x == 1", 0)
      got = []
      sys.addaudithook(lambda e, a: got.append(sys._getframe(1).f_lasti) if e == "egspo.end" else None)
      exec(code, {"__egspo_end__": sys.audit})
      print(got == [end], h._compile_test("assert (", 0) == (None, -1))
      """)
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
  assert out.stdout.split() == ["True", "True"], out.stderr


@pytest.fixture(scope="module")
def batch(env):
  jobs = hostile_jobs(env)
  names = list(jobs)
  t0 = time.monotonic()
  results = sandbox.run_batch([{"program": jobs[n][0], "tests": jobs[n][1]} for n in names],
                              workers=2, timeout_s=0.5, memory_mb=256)
  elapsed = time.monotonic() - t0
  return {"results": dict(zip(names, results)), "jobs": jobs, "elapsed": elapsed}


CASES = list(hostile_jobs({"root": __import__("pathlib").Path("/x"), "sentinel": "/x", "port": 1}))


@pytest.mark.parametrize("name", CASES)
def test_hostile_program_verdict(batch, name):
  assert batch["results"][name] == batch["jobs"][name][2], name


def test_suite_is_bounded_and_caller_survives(batch):
  # 23 jobs, ≤ 3 tests each, 0.5 s per test, 2 workers: well under a minute even when contended.
  assert batch["elapsed"] < 60
  assert psutil.pid_exists(CALLER)


def test_no_side_effects_outside(batch, env):
  assert not (env["root"] / "pwned.txt").exists()
  assert not os.path.exists("/work/egspo_pwned.txt") and not os.path.exists("/etc/egspo_pwned")
  assert (env["sentinel"] / "keep.txt").read_text() == "keep"
  with pytest.raises(BlockingIOError):
    env["listener"].accept()  # nobody reached the caller's socket


def test_no_processes_left(batch):
  if sandbox.isolation_mode() != "root":
    pytest.skip("dedicated uids only in root mode")
  time.sleep(0.2)
  left = [p.info for p in psutil.process_iter(["pid", "uids", "name"])
          if p.info["uids"] and sandbox.slot_uid(0) <= p.info["uids"].real <= sandbox.slot_uid(sandbox.MAX_SLOTS - 1)]
  assert left == []


def test_isolation_mode_detected():
  mode = sandbox.isolation_mode()
  assert mode in ("root", "userns", "plain")
  if os.geteuid() == 0 and subprocess.run(["unshare", "--fork", "--pid", "--net", "--mount-proc", "true"],
                                          capture_output=True).returncode == 0:
    assert mode == "root"


@pytest.mark.parametrize("mode", ["userns", "plain"])
def test_weaker_modes_still_run_and_time_out(mode):
  if mode == "userns" and subprocess.run(
      ["unshare", "--user", "--map-root-user", "--fork", "--pid", "--net", "--mount-proc", "true"],
      capture_output=True).returncode != 0:
    pytest.skip("user namespaces unavailable")
  script = textwrap.dedent("""
      import json, sys
      from egspo.tasks import sandbox
      EXEC_HACK = "import builtins\\nbuiltins.exec = lambda *a, **k: None\\ndef f(x):\\n  return x\\n"
      PROC_MEM = "ok = False\\ntry:\\n  open('/proc/self/mem', 'rb')\\n  ok = True\\nexcept OSError:\\n  pass\\n"
      out = [sandbox.isolation_mode(),
             sandbox.run_tests("def f(x):\\n  return 2 * x\\n", ["assert f(2) == 4", "assert f(2) == 5"]),
             sandbox.run_tests("while True:\\n  pass\\n", ["assert True"], timeout_s=0.3),
             sandbox.run_tests("import os\\nos._exit(0)\\n", ["assert True"]),
             sandbox.run_batch_outcomes([{"program": EXEC_HACK, "tests": ["assert f(2) == 5"]},
                                         {"program": PROC_MEM, "tests": ["assert ok"]}])]
      print(json.dumps(out))
      """)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                        env={**os.environ, "EGSPO_SANDBOX_MODE": mode})
  assert proc.returncode == 0, proc.stderr
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out == [mode, [True, False], [False], [False], ["X", "F"]]
  if mode == "plain":
    assert "NOT contained" in proc.stderr  # the loud warning


# --- code-task API --------------------------------------------------------------------------

def test_score_api_fraction():
  prog = "def sq(x):\n  return x * x\n"
  assert score(prog, ["assert sq(2) == 4", "assert sq(3) == 9", "assert sq(3) == 10", "assert sq(0) == 1"]) == 0.5
  assert score(prog, []) == 0.0
  assert score("x = ", ["assert True"]) == 0.0


def test_extract_program_and_alias():
  c = "<reasoning>\nx\n</reasoning>\n<answer>\n```python\ndef g(a):\n  return a\n```\n</answer>"
  prog, inside = extract_program(c)
  assert prog == "def g(a):\n  return a\n" and inside
  assert extract_program("```python\ndef g(a):\n  return a\n```") == ("def g(a):\n  return a\n", False)
  assert extract_program("no code") == (None, False)
  assert prepare_program(prog, "f").endswith("f = g\n")
  assert "def f(a)" in prepare_program(prog, "f", rename=True)
  assert prepare_program(prog, "g") == prog


MBPP_ROW = {"task_id": 2, "prompt": "Write a function to find the shared elements of two lists.",
            "code": "def similar_elements(a, b):\n  return tuple(set(a) & set(b))",
            "test_imports": [],
            "test_list": ["assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))",
                          "assert set(similar_elements((1, 2, 3, 4),(5, 4, 3, 7))) == set((3, 4))",
                          "assert set(similar_elements((11, 12, 14, 13),(17, 15, 14, 13))) == set((13, 14))"]}


def test_mbpp_reward_and_reader(tmp_path):
  p = tmp_path / "mbpp_test.jsonl"
  p.write_text(json.dumps(MBPP_ROW) + "\n")
  task = get_task("mbpp", data_path=str(p))
  ex = task.load_examples()[0]
  assert ex["entry_point"] == "similar_elements" and len(ex["tests"]) == 3
  good = f"<answer>\n```python\n{MBPP_ROW['code']}\n```\n</answer>"
  other_name = "<answer>\n```python\ndef common(a, b):\n  return tuple(set(a) & set(b))\n```\n</answer>"
  wrong = "<answer>\n```python\ndef similar_elements(a, b):\n  return (3, 4)\n```\n</answer>"
  outside = f"```python\n{MBPP_ROW['code']}\n```"
  r = task.rewards([good, other_name, wrong, outside, "<answer>no code</answer>"], [ex] * 5)
  assert r.tolist() == pytest.approx([1.5, 1.5, 0.5 + 1 / 3, 1.0, 0.0])
  assert task.score(good, ex)["correct"] and not task.score(wrong, ex)["correct"]
  ref = get_task("mbpp", reference_rewards=True)
  bad = "<answer>\n```python\nimport os\ndef similar_elements(a, b):\n  return tuple(set(a) & set(b))\n```\n</answer>"
  # d1 blocklist vs sandbox; reference mode adds xmlcount (one "\n</answer>", nothing after: 0.126)
  assert ref.reward(bad, ex) == pytest.approx(0.5 + 0.126) and task.reward(bad, ex) == 1.5
  assert "Your code should pass the following tests" in task.prompt(ex, "chat", "eval")


def test_kodcode_style_tests():
  test_file = textwrap.dedent("""
      from solution import double
      import pytest

      def test_small():
          assert double(2) == 4

      def test_neg():
          assert double(-1) == -2

      def test_raises():
          with pytest.raises(TypeError):
              double(None)
      """)
  tests, setup = kodcode_tests(test_file)
  assert tests == ["test_small()", "test_neg()", "test_raises()"]
  task = get_task("kodcode")
  ex = task._convert({"question": "Double it.", "test": test_file, "solution": "def double(x):\n  return 2 * x"})
  assert ex["entry_point"] == "double"
  comp = "<answer>\n```python\ndef twice(x):\n  return x + x\n```\n</answer>"
  assert task.reward(comp, ex) == pytest.approx(1.5)  # aliased, pytest importable, 3/3


def test_humaneval_canonical_solutions_pass():
  task = get_task("humaneval")
  exs = task.load_examples()
  assert len(exs) == 164
  subset = exs[:12]
  comps = [f"<answer>\n```python\n{e['solution']}\n```\n</answer>" for e in subset]
  assert task.rewards(comps, subset).tolist() == [1.5] * len(subset)
  # Splitting check() into asserts: fraction of asserts for a wrong solution.
  tests, setup = humaneval_tests("def check(candidate):\n    assert candidate(1) == 1\n    assert candidate(2) == 4\n", "sq")
  assert tests == ["candidate = sq\nassert candidate(1) == 1", "candidate = sq\nassert candidate(2) == 4"]
  assert score("def sq(x):\n  return x\n", tests, setup=setup) == 0.5


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_code_parsing_never_raises(text):
  prog, inside = extract_program(text)
  assert prog is None or isinstance(prog, str)
  prepare_program(text, "f")
  kodcode_tests(text)
  humaneval_tests(text, "f")
  task = get_task("mbpp")
  job, bonus = task._job(text, {"tests": ["assert f(1) == 1"], "entry_point": "f"})
  assert bonus in (0.0, 0.5)


@settings(max_examples=8, deadline=None)
@given(st.text(max_size=60))
def test_code_reward_on_arbitrary_program_text(body):
  # Arbitrary text inside a fenced block reaches the sandbox: a reward in [0, 1.5], no exception.
  comp = f"<answer>\n```python\ndef f(x):\n  {body}\n```\n</answer>"
  r = get_task("mbpp", timeout_s=0.5).reward(comp, {"tests": ["assert f(1) is None"], "entry_point": "f"})
  assert 0.5 <= r <= 1.5


def test_jobs_sharing_a_harness_do_not_see_each_other():
  if sandbox.isolation_mode() == "plain":
    pytest.skip("per-job tmpfs needs a mount namespace")
  writer = textwrap.dedent("""
      import os, tempfile
      open('left.txt', 'w').write('x')
      open('/dev/shm/left', 'w').write('x')
      open(os.path.join(tempfile.gettempdir(), 'left2.txt'), 'w').write('x')
      try:
        open('/tmp/left3.txt', 'w').write('x')
      except OSError:
        pass
      """)
  checker = textwrap.dedent("""
      import os, glob
      seen = glob.glob('/tmp/**/left*', recursive=True) + glob.glob('/dev/shm/*') + glob.glob('left*')
      """)
  res = sandbox.run_batch([{"program": writer, "tests": ["assert os.path.exists('left.txt')"]},
                           {"program": checker, "tests": ["assert seen == []"]}],
                          workers=1, jobs_per_harness=8, timeout_s=1.0)
  assert res == [[True], [True]]


def test_code_verdict_cache(monkeypatch):
  calls = []
  real = sandbox.run_batch

  def counting(jobs, **kw):
    calls.append(len(jobs))
    return real(jobs, **kw)

  monkeypatch.setattr(sandbox, "run_batch", counting)
  task = get_task("mbpp", cache_size=2)
  ex = {"tests": ["assert f(2) == 4"], "entry_point": "f"}
  good = "<answer>\n```python\ndef f(x):\n  return 2 * x\n```\n</answer>"
  bad = "<answer>\n```python\ndef f(x):\n  return x\n```\n</answer>"
  other = "<answer>\n```python\ndef f(x):\n  return x + 2\n```\n</answer>"
  assert task.rewards([good, good, bad, good], [ex] * 4).tolist() == [1.5, 1.5, 0.5, 1.5]
  assert calls == [2]  # duplicates run once
  assert task.rewards([bad, good], [ex] * 2).tolist() == [0.5, 1.5] and calls == [2]  # cached
  task.rewards([other], [ex])  # evicts the least recently used entry (cache_size=2)
  assert len(task._cache) == 2 and calls == [2, 1]
  assert get_task("mbpp", cache_size=0).reward(good, ex) == 1.5
