"""Isolated execution of generated Python code (REFERENCE §5: 1 s, 1 GB per program).

`run_tests(program, tests)` → one bool per test; `run_batch(jobs, workers)` runs jobs in parallel
across cores. Each test runs in a forked child of a trusted harness (`_sandbox_harness.py`) inside
pid/network/mount namespaces when the machine allows ("root", "userns"; else "plain", with a loud
warning), under rlimits, optional cgroups and deadlines. The harness reports a raw outcome letter
per test (`OUTCOMES`); this module decides (pass iff "P"). Layers, why a program cannot forge its
verdict, and the residual limits: docs/sandbox.md.
"""

from __future__ import annotations

import concurrent.futures
import logging
import marshal
import os
import pathlib
import queue
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Sequence

from egspo.tasks._sandbox_harness import OUTCOMES  # raw per-test outcomes; only "P" is a pass

log = logging.getLogger(__name__)

HARNESS = str(pathlib.Path(__file__).with_name("_sandbox_harness.py"))
MAX_PROGRAM_CHARS = 1_000_000
UID_BASE = 61000  # dedicated uids/gids (no passwd entry needed), see slot_uid
MAX_SLOTS = 64
_NS_FLAGS = ["--fork", "--pid", "--net", "--mount-proc", "--kill-child"]

_mode_lock = threading.Lock()
_mode: str | None = None
_cgroup_root: dict | None = None
_warned: set = set()


def _warn_once(key: str, msg: str) -> None:
  if key not in _warned:
    _warned.add(key)
    log.warning(msg)
    print(f"WARNING (egspo sandbox): {msg}", file=sys.stderr)


def _probe(cmd: list[str]) -> bool:
  try:
    return subprocess.run(cmd + ["true"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          timeout=10).returncode == 0
  except (OSError, subprocess.SubprocessError):
    return False


def isolation_mode() -> str:
  """'root', 'userns' or 'plain' (see module docstring); detected once per process.
  $EGSPO_SANDBOX_MODE forces a weaker mode (for tests)."""
  global _mode
  with _mode_lock:
    if _mode is None:
      forced = os.environ.get("EGSPO_SANDBOX_MODE")
      unshare = shutil.which("unshare")
      if forced in ("root", "userns", "plain"):
        _mode = forced
      elif unshare and os.geteuid() == 0 and _probe([unshare] + _NS_FLAGS):
        _mode = "root"
      elif unshare and _probe([unshare, "--user", "--map-root-user"] + _NS_FLAGS):
        _mode = "userns"
      else:
        _mode = "plain"
      if _mode == "userns":
        _warn_once("userns", "not root: sandbox uses user+pid+net+mount namespaces without a uid "
                   "drop")
      elif _mode == "plain":
        _warn_once("plain", "no usable `unshare`: sandboxed programs run with rlimits only; "
                   "network, files outside the work directory and setsid daemons are NOT contained")
    return _mode


def _cgroup_support() -> dict:
  """Writable cgroup controllers for per-job limits: {'memory': dir, 'pids': dir} (v1) or
  {'v2': dir}; empty if none (warned once)."""
  global _cgroup_root
  if _cgroup_root is not None:
    return _cgroup_root
  found: dict = {}
  base = pathlib.Path("/sys/fs/cgroup")
  if os.environ.get("EGSPO_SANDBOX_CGROUPS", "1") != "0" and os.geteuid() == 0:
    for ctrl in ("memory", "pids"):
      d = base / ctrl
      if (d / "cgroup.procs").exists():
        probe = d / f"egspo_probe_{os.getpid()}"
        try:
          probe.mkdir(exist_ok=True)
          probe.rmdir()
          found[ctrl] = d
        except OSError:
          pass
    if not found and (base / "cgroup.controllers").exists():
      probe = base / f"egspo_probe_{os.getpid()}"
      try:
        probe.mkdir(exist_ok=True)
        probe.rmdir()
        found["v2"] = base
      except OSError:
        pass
  if not found:
    _warn_once("cgroup", "no writable cgroups: per-job total memory/process caps rely on rlimits")
  _cgroup_root = found
  return found


def _cgroup_create(name: str, memory_bytes: int, max_procs: int) -> list[pathlib.Path]:
  made = []
  try:
    for ctrl, root in _cgroup_support().items():
      d = root / name
      d.mkdir()
      made.append(d)
      if ctrl == "memory":
        (d / "memory.limit_in_bytes").write_text(str(memory_bytes))
        try:
          (d / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
        except OSError:
          pass
      elif ctrl == "pids":
        (d / "pids.max").write_text(str(max_procs))
      else:
        (d / "memory.max").write_text(str(memory_bytes))
        (d / "pids.max").write_text(str(max_procs))
  except OSError as e:
    _warn_once("cgroup-create", f"cgroup setup failed ({e}); continuing without")
  return made


def _cgroup_remove(dirs: list[pathlib.Path]) -> None:
  for d in dirs:
    for _ in range(50):
      try:
        d.rmdir()
        break
      except OSError:
        time.sleep(0.02)


class _Slots:
  """Worker slot ids, so concurrent jobs get distinct uids (RLIMIT_NPROC is per uid)."""

  def __init__(self, n: int):
    self.q: queue.Queue = queue.Queue()
    for i in range(n):
      self.q.put(i)


_default_slots = _Slots(MAX_SLOTS)


def slot_uid(slot: int, pid: int | None = None) -> int:
  """The uid/gid of worker slot `slot` of process `pid` (default: this one): distinct per slot and
  per caller process, so concurrent callers (e.g. pytest-xdist workers) never share a uid and
  RLIMIT_NPROC counts one harness's processes only."""
  pid = os.getpid() if pid is None else pid
  return UID_BASE + (pid % 4096) * MAX_SLOTS + int(slot)


def run_tests(program: str, tests: Sequence[str], setup: str = "", timeout_s: float = 1.0,
              memory_mb: int = 1024, max_procs: int = 8, fsize_mb: int = 16,
              tmpfs_mb: int = 64) -> list[bool]:
  """Run `program`, then `setup`, then test i, in an isolated child per test.

  Returns one bool per test: True iff that test ran to completion without an exception within
  `timeout_s` wall-clock seconds (and the CPU-time limit), and the interpreter state it depends on
  was left as it was (see the module docstring). The test sees the program's names; the program
  is also importable as module `solution` (`from solution import f`). Never raises on program
  text.
  """
  return run_batch([{"program": program, "tests": tests, "setup": setup}], workers=1,
                   timeout_s=timeout_s, memory_mb=memory_mb, max_procs=max_procs,
                   fsize_mb=fsize_mb, tmpfs_mb=tmpfs_mb)[0]


def _valid(job) -> bool:
  return isinstance(job.get("program"), str) and len(job["program"]) <= MAX_PROGRAM_CHARS


def _run_harness(jobs: list[dict], slot: int, timeout_s: float = 1.0, memory_mb: int = 1024,
                 max_procs: int = 8, fsize_mb: int = 16, tmpfs_mb: int = 64) -> list[str]:
  """One harness process (one set of namespaces) running `jobs` one after another: one outcome
  string per job (a letter of `OUTCOMES` per test)."""
  fail = ["H" * len(j["tests"]) for j in jobs]
  mode = isolation_mode()
  nonce = secrets.token_hex(16)
  uid = slot_uid(slot)
  payload = {"jobs": [{"program": j["program"], "setup": j.get("setup") or "",
                       "tests": [str(t) for t in j["tests"]]} for j in jobs],
             "timeout_s": float(timeout_s), "memory_mb": int(memory_mb),
             "max_procs": int(max_procs), "fsize_mb": int(fsize_mb), "tmpfs_mb": int(tmpfs_mb),
             "nonce": nonce, "uid": uid, "gid": uid, "drop": mode == "root",
             "mount": mode in ("root", "userns"),
             "sys_path": [p for p in sys.path if p.endswith("site-packages")]}
  py = [sys.executable, "-I", "-S", HARNESS]
  if mode == "root":
    cmd = ["unshare"] + _NS_FLAGS
  elif mode == "userns":
    cmd = ["unshare", "--user", "--map-root-user"] + _NS_FLAGS
  else:
    cmd = []
  # The harness's starting directory (and the work area in plain mode), removed afterwards.
  workdir = tempfile.mkdtemp(prefix="egspo_sbx_")
  if mode == "root":
    os.chown(workdir, uid, uid)
  os.chmod(workdir, 0o700)
  n_tests = sum(len(j["tests"]) for j in jobs)
  cgroups = _cgroup_create(f"egspo_sbx_{os.getpid()}_{slot}_{nonce[:8]}",
                           (int(memory_mb) + 256) * 1024 * 1024, int(max_procs) + 8)
  r, w = os.pipe()
  proc = None
  try:
    proc = subprocess.Popen(cmd + py + [str(w)], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(w,),
                            cwd=workdir, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",
                                              "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                                              "MKL_NUM_THREADS": "1"},
                            start_new_session=True)
    os.close(w)
    w = -1
    for d in cgroups:  # before the jobs are sent nothing but the harness runs
      try:
        (d / "cgroup.procs").write_text(str(proc.pid))
      except OSError:
        pass
    try:
      proc.stdin.write(marshal.dumps(payload))
      proc.stdin.close()
    except OSError:
      pass
    # Per test: its limit, fork and clean-up; per job: the imports of its tests (e.g. pytest).
    deadline = time.monotonic() + n_tests * (float(timeout_s) + 2.5) + 5.0 * len(jobs) + 10.0
    chunks, size = [], 0
    while True:
      left = deadline - time.monotonic()
      if left <= 0:
        break
      ready, _, _ = select.select([r], [], [], min(left, 1.0))
      if ready:
        data = os.read(r, 65536)
        if not data:
          break
        chunks.append(data)
        size += len(data)
        if size > 1 << 20:
          break
    raw = b"".join(chunks)
  finally:
    if w >= 0:
      os.close(w)
    os.close(r)
    if proc is not None:
      try:
        os.killpg(proc.pid, signal.SIGKILL)  # unshare + harness; the namespace dies with them
      except (ProcessLookupError, PermissionError):
        pass
      try:
        proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        pass
    _cgroup_remove(cgroups)
    shutil.rmtree(workdir, ignore_errors=True)
  try:
    got_nonce, verdicts, notes = raw.decode("ascii").split(" ", 2)
  except (UnicodeDecodeError, ValueError):
    return fail
  verdicts = verdicts.split(",")
  if (not secrets.compare_digest(got_nonce, nonce) or len(verdicts) != len(jobs)
      or any(len(v) != len(j["tests"]) or set(v) - set(OUTCOMES) for v, j in zip(verdicts, jobs))):
    return fail
  if notes:
    _warn_once("harness-notes", f"sandbox harness: {notes}")
  return verdicts


def default_workers() -> int:
  return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def run_batch(jobs: Sequence[dict], workers: int | None = None, jobs_per_harness: int = 8,
              **limits) -> list[list[bool]]:
  """Run many jobs in parallel; one bool per test per job (True iff it passed), order preserved.
  See `run_batch_outcomes` for the arguments."""
  return [[c == "P" for c in o] for o in run_batch_outcomes(jobs, workers, jobs_per_harness, **limits)]


def run_batch_outcomes(jobs: Sequence[dict], workers: int | None = None, jobs_per_harness: int = 8,
                       **limits) -> list[str]:
  """Run many jobs in parallel; one outcome string per job, a letter of `OUTCOMES` per test.

  Each job: {"program": str, "tests": [str], "setup": str (optional)}. `limits` go to every
  test (timeout_s, memory_mb, max_procs, fsize_mb, tmpfs_mb). Up to `workers` harnesses run at
  once (default: one per core), each in its own namespaces with its own uid, running up to
  `jobs_per_harness` jobs in sequence (each job in a fresh work directory) to amortise start-up.
  """
  out: list = [None] * len(jobs)
  todo = []
  for i, j in enumerate(jobs):
    tests = list(j.get("tests") or [])
    if not tests:
      out[i] = ""
    elif not _valid(j):
      out[i] = "E" * len(tests)
    else:
      todo.append((i, {"program": j["program"], "tests": tests, "setup": j.get("setup") or ""}))
  if not todo:
    return out
  workers = max(1, min(workers or default_workers(), MAX_SLOTS, len(todo)))
  per = max(1, min(int(jobs_per_harness), -(-len(todo) // workers)))
  chunks = [todo[k:k + per] for k in range(0, len(todo), per)]

  def one(chunk):
    slot = _default_slots.q.get()  # a free uid, distinct from every concurrent harness
    try:
      return _run_harness([j for _, j in chunk], slot, **limits)
    finally:
      _default_slots.q.put(slot)

  if workers == 1 or len(chunks) == 1:
    results = [one(c) for c in chunks]
  else:
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
      results = list(ex.map(one, chunks))
  for chunk, res in zip(chunks, results):
    for (i, _), r in zip(chunk, res):
      out[i] = r
  return out
