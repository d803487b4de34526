"""The code sandbox against hostile programs, and the code-task rewards built on it.

All hostile jobs run in one parallel batch (short timeouts) so the suite is bounded in time; each
case then asserts its own verdict and side effects. The test process surviving to the asserts is
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
from egspo.tasks.code import extract_program, humaneval_tests, kodcode_tests, prepare_program, score

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
      out = [sandbox.isolation_mode(),
             sandbox.run_tests("def f(x):\\n  return 2 * x\\n", ["assert f(2) == 4", "assert f(2) == 5"]),
             sandbox.run_tests("while True:\\n  pass\\n", ["assert True"], timeout_s=0.3),
             sandbox.run_tests("import os\\nos._exit(0)\\n", ["assert True"])]
      print(json.dumps(out))
      """)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                        env={**os.environ, "EGSPO_SANDBOX_MODE": mode})
  assert proc.returncode == 0, proc.stderr
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out == [mode, [True, False], [False], [False]]
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
