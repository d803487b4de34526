"""Trusted harness of the code sandbox (run by `egspo.tasks.sandbox`; stdlib only).

Started as `python -I -S _sandbox_harness.py RESULT_FD` — normally as pid 1 of fresh pid, network
and mount namespaces — it reads a list of jobs (a marshalled dict) from stdin; each job gets a fresh
tmpfs work directory, and each of its tests a forked child that drops to an unprivileged uid
under rlimits and runs program + setup + test; whatever a test leaves running is killed before
the next test. The child proves a pass by echoing a per-test token that it reads from a pipe only after its test has passed; the
harness reports the results, tagged with the caller's job nonce, on RESULT_FD, a pipe the
children never hold. Program output goes to /dev/null and is never read.
"""

import ctypes
import marshal
import os
import resource
import signal
import sys
import time

# json/secrets/re are not imported: they triple the harness start-up time (~50 ms).

_LIBC = None


def _libc():
  global _LIBC
  if _LIBC is None:
    _LIBC = ctypes.CDLL(None, use_errno=True)
  return _LIBC


def _mount_tmpfs(path, size_mb, mode="1777"):
  # MS_NOSUID | MS_NODEV = 2 | 4; mount propagation is already private (unshare --mount).
  opts = f"size={int(size_mb)}m,mode={mode}".encode()
  rc = _libc().mount(b"tmpfs", path.encode(), b"tmpfs", 2 | 4, opts)
  if rc != 0:
    raise OSError(ctypes.get_errno(), f"mount tmpfs on {path}")


def _bind(src, dst):
  # MS_BIND | MS_REC
  if _libc().mount(src.encode(), dst.encode(), None, 4096 | 16384, None) != 0:
    raise OSError(ctypes.get_errno(), f"bind {src} -> {dst}")


def _expose_python():
  """Make the interpreter's files readable to the unprivileged uid when they sit under a
  directory others cannot traverse (e.g. /root/.pyenv): inside the private mount namespace, cover
  that directory with an empty tmpfs (hiding the rest of it) and bind the prefix back in."""
  prefix = os.path.realpath(sys.base_prefix)
  parts = prefix.strip("/").split("/")
  blocked = None
  for k in range(1, len(parts)):
    d = "/" + "/".join(parts[:k])
    if not os.stat(d).st_mode & 0o001:
      blocked = d
      break
  if blocked is None:
    return
  stash = "/tmp/.egspo_prefix"
  os.makedirs(stash, exist_ok=True)
  _bind(prefix, stash)
  opts = b"size=1m,mode=0755"
  if _libc().mount(b"tmpfs", blocked.encode(), b"tmpfs", 2 | 4, opts) != 0:
    raise OSError(ctypes.get_errno(), f"mount tmpfs on {blocked}")
  os.makedirs(prefix, mode=0o755, exist_ok=True)
  d = prefix
  while d != blocked:
    os.chmod(d, 0o755)
    d = os.path.dirname(d)
  _bind(stash, prefix)


def _hold_dirs_under(root, paths):
  """O_PATH fds of the existing directories among `paths` that lie under `root`, taken before a
  tmpfs covers `root`, so `_rebind_read_only` can put them back (e.g. a virtualenv in /tmp)."""
  held = {}
  for p in paths:
    rp = os.path.realpath(p)
    if (rp + "/").startswith(root.rstrip("/") + "/") and os.path.isdir(rp) and rp not in held:
      held[rp] = os.open(rp, os.O_PATH)
  return held


def _rebind_read_only(held):
  for rp, fd in sorted(held.items()):
    os.makedirs(rp, mode=0o755, exist_ok=True)
    _bind(f"/proc/self/fd/{fd}", rp)
    # MS_REMOUNT | MS_BIND | MS_RDONLY: the program can read these packages, never write them.
    _libc().mount(None, rp.encode(), None, 32 | 4096 | 1, None)
    os.close(fd)


def _reap_all():
  while True:
    try:
      pid, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
      return
    if pid == 0:
      return


def _kill_everything_else():
  """As pid 1 of a pid namespace, SIGKILL every other process in it (setsid daemons too)."""
  if os.getpid() != 1:  # never outside a private pid namespace
    return
  try:
    os.kill(-1, signal.SIGKILL)
  except ProcessLookupError:
    pass
  deadline = time.monotonic() + 2.0
  while time.monotonic() < deadline:
    try:
      pid, _ = os.waitpid(-1, 0)
    except ChildProcessError:
      return


def _child(job, i, token_r, pass_w, result_fd):
  """Runs in the forked child: isolate, drop privileges, run the program and test i."""
  try:
    os.setsid()
    os.close(result_fd)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
      os.dup2(devnull, fd)
    cpu = int(job["timeout_s"]) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    mem = int(job["memory_mb"]) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    fsize = int(job["fsize_mb"]) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_NPROC, (int(job["max_procs"]),) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    if job.get("drop"):
      os.setgroups([])
      os.setgid(int(job["gid"]))
      os.setuid(int(job["uid"]))
    try:  # PR_SET_NO_NEW_PRIVS: no setuid binaries can regain privileges
      _libc().prctl(38, 1, 0, 0, 0)
    except Exception:
      pass
    os.environ.clear()
    # One BLAS/OpenMP thread: threads count against RLIMIT_NPROC.
    os.environ.update({"PATH": "/usr/bin:/bin", "HOME": job["workdir"], "TMPDIR": job["workdir"],
                       "LANG": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                       "MKL_NUM_THREADS": "1"})
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 3000))
    import types
    module = types.ModuleType("solution")
    ns = module.__dict__
    sys.modules["solution"] = module
    exec(job["_program_code"], ns)
    if job.get("setup"):
      exec(compile(job["setup"], "<setup>", "exec"), ns)
    exec(compile(job["tests"][i], f"<test {i}>", "exec"), ns)
  except BaseException:  # failures, SystemExit, KeyboardInterrupt: not a pass
    os._exit(1)
  # The test passed: fetch the token (not in memory while the program ran) and echo it.
  try:
    token = os.read(token_r, 64)
    os.write(pass_w, token)
  finally:
    os._exit(0)


def _run_test(job, i, result_fd):
  token = os.urandom(16).hex().encode()
  token_r, token_w = os.pipe()
  pass_r, pass_w = os.pipe()
  os.write(token_w, token)
  os.close(token_w)
  pid = os.fork()
  if pid == 0:
    os.close(pass_r)
    _child(job, i, token_r, pass_w, result_fd)
  os.close(token_r)
  os.close(pass_w)
  deadline = time.monotonic() + float(job["timeout_s"])
  status = None
  while True:
    got, st = os.waitpid(pid, os.WNOHANG)
    if got == pid:
      status = st
      break
    if time.monotonic() > deadline:
      break
    time.sleep(0.002)
  # Kill whatever the test left behind: its process group, and in a pid namespace everything.
  try:
    os.killpg(pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass
  if status is None:
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    try:
      os.waitpid(pid, 0)
    except ChildProcessError:
      pass
  _kill_everything_else()
  _reap_all()
  os.set_blocking(pass_r, False)
  try:
    echoed = os.read(pass_r, 64)
  except BlockingIOError:
    echoed = b""
  os.close(pass_r)
  return (status is not None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
          and echoed == token)


def _wipe(path):
  """Delete everything under `path` (as root inside the namespace), keeping `path` itself."""
  try:
    entries = list(os.scandir(path))
  except OSError:
    return
  for e in entries:
    try:
      if e.is_dir(follow_symlinks=False):
        _wipe(e.path)
        os.rmdir(e.path)
      else:
        os.unlink(e.path)
    except OSError:
      pass


def _enter_workdir(common, k):
  """A fresh work directory for job k: its own tmpfs in namespace modes, else a subdirectory."""
  d = f"w{k}"
  if common.get("mount"):
    d = f"/tmp/w{k}"
    os.mkdir(d, 0o700)
    _mount_tmpfs(d, common["tmpfs_mb"], mode="0700")
  else:
    os.mkdir(d, 0o700)
  if common.get("drop"):
    os.chown(d, int(common["uid"]), int(common["gid"]))
  os.chdir(d)
  return os.getcwd()


def _leave_workdir(common, d):
  os.chdir(os.path.dirname(d))
  if common.get("mount"):
    _libc().umount2(d.encode(), 2)  # MNT_DETACH: its files vanish with the mount
    try:
      os.rmdir(d)
    except OSError:
      pass
    _wipe("/dev/shm")


def main():
  result_fd = int(sys.argv[1])
  common = marshal.loads(sys.stdin.buffer.read())
  nonce = common.pop("nonce")  # the children (forks of this process) never see the nonce
  jobs = common.pop("jobs")
  devnull = os.open(os.devnull, os.O_RDONLY)
  os.dup2(devnull, 0)
  notes = []
  for p in common.get("sys_path", []):
    if p not in sys.path:
      sys.path.append(p)
  if common.get("mount"):
    try:
      # /tmp is not writable by the dropped uid (jobs cannot leave files for later jobs); each job
      # gets its own tmpfs work directory and TMPDIR.
      held = _hold_dirs_under("/tmp", list(common.get("sys_path", [])) + [sys.prefix])
      _mount_tmpfs("/tmp", common["tmpfs_mb"], mode="0755" if common.get("drop") else "1777")
      _rebind_read_only(held)
      if os.path.isdir("/dev/shm"):
        _mount_tmpfs("/dev/shm", common["tmpfs_mb"])
      if common.get("drop"):
        _expose_python()
    except OSError as e:
      notes.append(f"tmpfs mount failed: {e}")
      common["mount"] = False
  verdicts = []
  for k, j in enumerate(jobs):
    job = dict(common, **j)
    try:
      job["_program_code"] = compile(job["program"], "<program>", "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
      verdicts.append("0" * len(job["tests"]))
      continue
    try:
      d = _enter_workdir(common, k)
    except OSError as e:
      notes.append(f"work directory failed: {e}")
      verdicts.append("0" * len(job["tests"]))
      continue
    job["workdir"] = d
    results = [_run_test(job, i, result_fd) for i in range(len(job["tests"]))]
    _leave_workdir(common, d)
    verdicts.append("".join("1" if r else "0" for r in results))
  # "<nonce> <verdicts of job 0>,<of job 1>,... <notes>"; the caller accepts it only with its nonce.
  msg = f"{nonce} {','.join(verdicts)} {'; '.join(notes)}".encode()
  os.write(result_fd, msg)
  os.close(result_fd)


if __name__ == "__main__":
  main()
