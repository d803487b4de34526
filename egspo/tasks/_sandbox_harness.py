"""Trusted harness of the code sandbox (run by `egspo.tasks.sandbox`; stdlib only).

Started as `python -I -S _sandbox_harness.py RESULT_FD` (normally pid 1 of fresh namespaces), it
reads marshalled jobs from stdin, runs each test in a forked child under an unprivileged uid and
rlimits, and writes one raw outcome letter per test (`OUTCOMES`), tagged with the job's nonce, on
RESULT_FD; the caller decides. Why a program cannot change how its tests run or forge their
verdict, and the limits: docs/sandbox.md.

One file over the usual size on purpose: it runs as a standalone script under `-I -S` (no package
imports), and everything a test child calls after the program runs must be bound in it before.
"""

import _thread
import dis
import gc
import importlib  # renames _frozen_importlib on first import: done here, before any snapshot
import marshal
import os
import resource
import select
import signal
import sys
import time

# ctypes is imported only by _libc (mounts, prctl) and dropped from sys.modules: test children
# cannot import it. json/secrets/re are not imported: they triple the harness start-up time.

OUTCOMES = {"P": "passed", "F": "test failed", "E": "program or setup raised", "T": "timed out",
            "K": "killed by a signal or limit", "X": "interpreter state changed (tampering)",
            "B": "forbidden primitive used", "Z": "exited 0 without the pass token",
            "H": "harness error in the test child"}
_EXIT_OUTCOME = {0: "Z", 1: "F", 2: "E", 3: "X", 4: "B", 5: "X", 6: "H", 7: "H"}
_END, _CHECK = "egspo.end", "egspo.check"
_MARKER = "\n__egspo_end__('egspo.end')\n"
# Audit events that end the child (exit 4).
_FORBIDDEN = frozenset({
    "sys.settrace", "sys.setprofile", "sys._current_frames", "sys._current_exceptions",
    "sys.addaudithook", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    "code.__new__", "cpython.PyInterpreterState_New", "sys.monitoring.register_callback"})
_BLOCKED_IMPORTS = frozenset({"ctypes", "_ctypes", "_xxsubinterpreters", "_xxinterpchannels",
                              "_interpreters", "_interpchannels"})
_SYS_VOLATILE = frozenset({"stdin", "stdout", "stderr", "argv", "last_type", "last_value",
                           "last_traceback", "last_exc", "tracebacklimit", "ps1", "ps2",
                           "dont_write_bytecode", "pycache_prefix"})
_CLASS_ADDABLE = frozenset({"__annotations__", "__slotnames__"})  # lazily cached by the stdlib
_STRICT, _MODULE, _CLASS, _PAIRS, _CELLS = 0, 1, 2, 3, 4
_ModuleType = type(sys)
_FunctionType = type(lambda: None)
_BuiltinType = type(len)

_LIBC = None


def _libc():
  global _LIBC
  if _LIBC is None:
    import ctypes
    _LIBC = ctypes.CDLL(None, use_errno=True)
    _scrub_ctypes()
  return _LIBC


def _errno():
  import ctypes
  e = ctypes.get_errno()
  _scrub_ctypes()
  return e


def _scrub_ctypes():
  """Drop ctypes from sys.modules and from every module namespace (numpy treats it as absent):
  a test child can then reach ctypes neither by import (the audit hook refuses it) nor by name."""
  mods = [m for k, m in list(sys.modules.items())
          if k in ("ctypes", "_ctypes") or k.startswith("ctypes.")]
  if not mods:
    return
  for k in list(sys.modules):
    if k in ("ctypes", "_ctypes") or k.startswith("ctypes."):
      del sys.modules[k]
  for m in list(sys.modules.values()):
    d = getattr(m, "__dict__", None) if isinstance(m, _ModuleType) else None
    if d is not None:
      for k, v in list(d.items()):
        if any(v is c for c in mods):
          d[k] = None


def _mount_tmpfs(path, size_mb, mode="1777"):
  # MS_NOSUID | MS_NODEV = 2 | 4; mount propagation is already private (unshare --mount).
  opts = f"size={int(size_mb)}m,mode={mode}".encode()
  rc = _libc().mount(b"tmpfs", path.encode(), b"tmpfs", 2 | 4, opts)
  if rc != 0:
    raise OSError(_errno(), f"mount tmpfs on {path}")


def _bind(src, dst):
  # MS_BIND | MS_REC
  if _libc().mount(src.encode(), dst.encode(), None, 4096 | 16384, None) != 0:
    raise OSError(_errno(), f"bind {src} -> {dst}")


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
    raise OSError(_errno(), f"mount tmpfs on {blocked}")
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


# --- per-job preparation (in the harness, before any program runs) --------------------------

def _imports(code):
  """(name, fromlist, level) of every import statement in `code` and its nested code objects."""
  out = []
  stack = [code]
  while stack:
    co = stack.pop()
    ins = list(dis.get_instructions(co))
    for j, op in enumerate(ins):
      if op.opname == "IMPORT_NAME" and j >= 2:
        out.append((op.argval, ins[j - 1].argval, ins[j - 2].argval))
    stack.extend(c for c in co.co_consts if isinstance(c, type(co)))
  return out


def _compile_test(src, i):
  """(code with the end marker appended, offset of the marker's call) or (None, -1)."""
  try:
    compile(src, f"<test {i}>", "exec")  # the test alone must be valid
    code = compile(src + _MARKER, f"<test {i}>", "exec")
  except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
    return None, -1
  calls = [op.offset for op in dis.get_instructions(code) if op.opname == "CALL"]
  return code, (calls[-1] if calls else -1)


def _global_names(code):
  """Names `code` (and its nested code objects) reads as globals."""
  out, stack = set(), [code]
  while stack:
    co = stack.pop()
    out.update(op.argval for op in dis.get_instructions(co)
               if op.opname in ("LOAD_NAME", "LOAD_GLOBAL") and isinstance(op.argval, str))
    stack.extend(c for c in co.co_consts if isinstance(c, type(co)))
  return out


_NO_IMPORT = frozenset({"antigravity", "this", "tkinter", "turtle", "turtledemo", "idlelib",
                        "webbrowser", "pydoc", "test", "lib2to3", "ensurepip", "venv", "solution"})


def _preimport(codes, program_code):
  """Import, here in the trusted harness, every absolute module the setup/tests import, so the
  snapshot covers them and the test resolves them from it; likewise a stdlib module the tests
  use as a global without importing it when the program binds that name (the test then gets the
  real module). Returns (names imported, such module names, names the setup/tests import from
  `solution` explicitly)."""
  roots, explicit, wanted = set(), set(), []
  for code in codes:
    for name, fromlist, level in _imports(code):
      if not isinstance(name, str) or level:
        continue
      if name.split(".")[0] == "solution":
        explicit.update(n for n in (fromlist or ()) if isinstance(n, str) and n != "*")
        continue
      if name.split(".")[0] not in _NO_IMPORT:
        wanted.append((name, tuple(fromlist or ())))
  used = set().union(*(_global_names(c) for c in codes)) if codes else set()
  modnames = {n for n in used & set(program_code.co_names) & sys.stdlib_module_names
              if n not in _NO_IMPORT and not n.startswith("_")}
  wanted += [(n, ()) for n in sorted(modnames)]
  for name, fromlist in wanted:
    try:
      __import__(name, {}, {}, fromlist, 0)
    except BaseException:  # noqa: BLE001 - a missing module fails the test later
      continue
    roots.add(name)
  _scrub_ctypes()
  return frozenset(roots), frozenset(modnames & roots), frozenset(explicit)


def _module_of(v):
  """Name of the module whose code `v` runs (its own, for a module), or None."""
  if isinstance(v, _ModuleType):
    name = v.__dict__.get("__name__")
  elif isinstance(v, type):
    name = type.__dict__["__module__"].__get__(v)
  elif isinstance(v, (_FunctionType, _BuiltinType)):
    name = v.__module__
  else:
    name = type.__dict__["__module__"].__get__(type(v))
  return name if isinstance(name, str) else None


def _closure(roots):
  """The modules a test importing `roots` can run code of: the roots, their parent packages,
  and, transitively, the modules of every value in their namespaces and their classes'."""
  seen, todo = set(), list(roots)
  while todo:
    name = todo.pop()
    if name in seen or not isinstance(sys.modules.get(name), _ModuleType):
      continue
    seen.add(name)
    if "." in name:
      todo.append(name.rpartition(".")[0])
    for k, v in tuple(sys.modules[name].__dict__.items()):
      if k in _METADATA:  # the import system's records, not code the test runs
        continue
      todo.append(_module_of(v))
      if isinstance(v, type) and not v.__flags__ & (1 << 8):
        todo.extend(_module_of(w) for w in tuple(v.__dict__.values()))
  return seen - {"builtins", "sys", "__main__", None}


_METADATA = frozenset({"__spec__", "__loader__", "__builtins__", "__cached__", "__file__"})
_STATES = {}


class _Anchor:
  """A weak-referenceable object kept for the harness's lifetime."""


_ANCHOR = _Anchor()


def _warm_up():
  """Flip, before the snapshot, the library flags that legitimately change on first use (so a
  test child's first use does not read as tampering): weakref.finalize's class flags (used by
  tempfile.TemporaryDirectory and many libraries)."""
  weakref = sys.modules.get("weakref")
  if weakref is not None:
    weakref.finalize(_ANCHOR, int)


def _state(roots):
  """Snapshot of the interpreter state a test importing `roots` can depend on: (entries,
  protected function ids, protected module and class ids, module map, indexes of the entries
  fork changes). Entries are (kind, mapping, length, value ids, keys, values); the values are
  held, so ids stay unique. Cached while no module is added."""
  key = (len(sys.modules), roots)
  if key in _STATES:
    return _STATES[key]
  _warm_up()
  entries, funcs, objs, seen = [], set(), set(), set()

  def add(kind, d, ident):
    if ident not in seen:
      seen.add(ident)
      entries.append(_entry(kind, d))

  import builtins
  add(_MODULE, builtins.__dict__, id(builtins.__dict__))
  pairs = tuple((k, v) for k, v in sys.__dict__.items() if k not in _SYS_VOLATILE)
  entries.append((_PAIRS, sys.__dict__, len(pairs), (), (), pairs))
  names = sorted(_closure(roots))
  mods = {n: sys.modules[n] for n in names}
  entries.append((_PAIRS, sys.modules, len(mods), (), (), tuple(mods.items())))
  add(_STRICT, mods, id(mods))
  fns = []
  for m in mods.values():
    objs.add(id(m))
    d = m.__dict__
    add(_MODULE, d, id(d))
    for v in tuple(d.values()):
      if isinstance(v, _FunctionType):
        fns.append(v)
      elif isinstance(v, type) and not v.__flags__ & (1 << 8) and id(v) not in seen:  # mutable
        objs.add(id(v))
        cd = v.__dict__
        add(_CLASS, cd, id(v))
        for w in cd.values():
          if isinstance(w, (staticmethod, classmethod)):
            w = w.__func__
          if isinstance(w, _FunctionType):
            fns.append(w)
  # Library functions: their closure cells (writable without an audit event) and keyword
  # defaults (a dict), and the functions those cells hold (decorated originals).
  cells, contents = [], []
  while fns:
    f = fns.pop()
    if id(f) in funcs:
      continue
    funcs.add(id(f))
    if f.__kwdefaults__:
      add(_STRICT, f.__kwdefaults__, id(f.__kwdefaults__))
    for c in f.__closure__ or ():
      try:
        v = c.cell_contents
      except ValueError:  # empty cell
        continue
      cells.append(c)
      contents.append(v)
      if isinstance(v, _FunctionType):
        fns.append(v)
  entries.append((_CELLS, tuple(cells), len(cells), (), (), tuple(contents)))
  entries = tuple(entries)
  snap = (entries, frozenset(funcs), frozenset(objs), mods, _forked_changes(entries))
  if len(_STATES) > 64:
    _STATES.clear()
  _STATES[key] = snap
  return snap


def _entry(kind, d):
  ks, vs = tuple(d), tuple(d.values())
  return (kind, d, len(ks), tuple(map(id, vs)), ks, vs)


def _forked_changes(entries):
  """Indexes of the entries that fork itself changes (at-fork hooks, e.g. threading's new
  locks), found once by a trial fork; the test child takes those again before the program."""
  r, w = os.pipe()
  pid = os.fork()
  if pid == 0:
    try:
      os.close(r)
      bad = [k for k, e in enumerate(entries)
             if e[0] != _PAIRS and not _make_check((e,))()]
      os.write(w, marshal.dumps(bad))
    finally:
      os._exit(0)
  os.close(w)
  data = b""
  while True:
    chunk = os.read(r, 65536)
    if not chunk:
      break
    data += chunk
  os.close(r)
  os.waitpid(pid, 0)
  return tuple(marshal.loads(data)) if data else ()


def _after_fork(entries, changed):
  """In the test child, before any program code: `entries` with the `changed` ones taken again."""
  if not changed:
    return entries
  out = list(entries)
  for k in changed:
    kind, d = out[k][0], out[k][1]
    if kind == _CELLS:
      out[k] = (kind, d, len(d), (), (), tuple(c.cell_contents for c in d))
    else:
      out[k] = _entry(kind, d)
  return tuple(out)


# --- the test child: everything below runs after fork -----------------------------------------

def _make_check(snap, len_=len, tuple_=tuple, map_=map, id_=id, next_=next, reversed_=reversed,
                range_=range, zip_=zip, type_=type, str_=str, addable=_CLASS_ADDABLE):
  """A closure that is True iff the state in `snap` is unchanged (see the module docstring)."""
  strict, module, klass, pairs_kind, cells_kind = _STRICT, _MODULE, _CLASS, _PAIRS, _CELLS

  def check():
    for kind, d, n, vids, ks, vs in snap:
      if kind == pairs_kind:
        for k, v in vs:
          if d.get(k, check) is not v:
            return False
        continue
      if kind == cells_kind:  # an emptied cell raises: the test fails
        for c, v in zip_(d, vs):
          if c.cell_contents is not v:
            return False
        continue
      m = len_(d)
      if (m == n and tuple_(map_(id_, d.values())) == vids
          and (n == 0 or next_(reversed_(d)) is ks[-1])):
        continue
      if m < n or kind == strict:
        return False
      keys, vals = tuple_(d), tuple_(d.values())
      if len_(keys) != len_(vals):
        return False
      for j in range_(n):
        if keys[j] is not ks[j]:
          return False
        if vals[j] is not vs[j] and not (kind == module and vs[j] is None):
          return False
      if kind == klass:
        for j in range_(n, len_(keys)):
          if type_(keys[j]) is not str_ or keys[j] not in addable:
            return False
    return True
  return check


def _reporter(token, pipe_w, go, main_ident, guard_code, test_code, test_globals, end_offset,
              check, write, exit_, frames_of, set_switch, sleep, gc_disable, callbacks,
              BaseException_):
  """The reporter thread: repeats the committed token only for a genuine end of test."""
  try:
    go.acquire()
    # From here no program code may run in this thread: no forced GIL hand-offs, no gc callbacks.
    set_switch(1e6)
    sleep(0)
    gc_disable()
    callbacks.clear()
    frames = frames_of()
    mf = frames.get(main_ident)
    tf = None if mf is None else mf.f_back
    if (tf is None or mf.f_code is not guard_code or tf.f_code is not test_code
        or tf.f_globals is not test_globals or tf.f_lasti != end_offset):
      exit_(5)
    if not check():
      exit_(3)
    write(pipe_w, token)
    exit_(0)
  except BaseException_:
    exit_(7)


def _make_guard(pipe_w, test_code, test_globals, end_offset, snap, importer, funcs, objs):
  """Start the reporter thread and return the audit hook (see the module docstring)."""
  exit_, getframe, get_ident, type_, str_, bytes_, id_ = (
      os._exit, sys._getframe, _thread.get_ident, type, str, bytes, id)
  ImportError_, PermissionError_ = ImportError, PermissionError
  forbidden, blocked, end, check_ev = _FORBIDDEN, _BLOCKED_IMPORTS, _END, _CHECK
  check = _make_check(snap)
  go, stop = _thread.allocate_lock(), _thread.allocate_lock()
  go.acquire()
  stop.acquire()
  t_ident = -1

  def guard(event, args):
    if type_(event) is not str_:
      return
    if event in forbidden:
      if event == "sys._current_frames" and get_ident() == t_ident:
        return
      exit_(4)
    if event[:7] == "ctypes.":
      exit_(4)
    if event == "object.__setattr__":
      name = args[1]
      if type_(name) is not str_ or name == "__code__":
        exit_(4)
      target = args[0]
      if (name == "__defaults__" or name == "__kwdefaults__") and (
          target is importer or id_(target) in funcs):
        exit_(4)
      if (name == "__class__" or name == "__bases__") and id_(target) in objs:
        exit_(4)
    elif event == "import":
      name = args[0]
      if type_(name) is not str_ or name in blocked or name[:7] == "ctypes.":
        raise ImportError_("not available in the sandbox")
    elif event == "open" or event == "os.chdir" or event == "os.symlink":
      # No /proc, no */mem (namespace modes also cover /proc with a tmpfs; a userns child could
      # unmount it).
      p = args[0]
      if type_(p) is bytes_:
        p = p.decode("latin-1")
      if type_(p) is str_ and (p[:5] == "/proc" or "/proc/" in p
                               or p.rstrip("/").rpartition("/")[2] in ("mem", "pagemap")):
        raise PermissionError_(13, "not available in the sandbox", args[0])
    elif event == check_ev:
      if not check():
        exit_(3)
    elif event == end:
      fr = getframe(1)
      if fr.f_code is test_code and fr.f_globals is test_globals and fr.f_lasti == end_offset:
        go.release()
        while True:  # the reporter verifies, writes and ends the process
          stop.acquire()

  # The commitment: written before any program code runs; afterwards only the reporter thread
  # holds the token (this frame ends before the program starts).
  token = os.urandom(16)
  if os.write(pipe_w, token) != 16:
    raise OSError("short write of the token")
  _thread.stack_size(256 * 1024)
  try:
    t_ident = _thread.start_new_thread(_reporter, (
        token, pipe_w, go, _thread.get_ident(), guard.__code__, test_code, test_globals,
        end_offset, _make_check(snap), os.write, os._exit, sys._current_frames,
        sys.setswitchinterval, time.sleep, gc.disable, gc.callbacks, BaseException))
  finally:
    _thread.stack_size(0)
  del token
  return guard


def _make_importer(mods, program, orig, str_=str, type_=type):
  """The test's `__import__`: `solution` is the program's module; modules that existed before the
  program ran come from the snapshot `mods`. State lives in positional defaults (a tuple that only
  an audited `__defaults__` assignment could replace)."""
  def __import__(name, globals=None, locals=None, fromlist=(), level=0, _mods=mods, _prog=program,
                 _orig=orig, _str=str_, _type=type_):
    if level == 0 and _type(name) is _str:
      if name == "solution":
        return _prog
      m = _mods.get(name)
      if m is not None:
        if fromlist:
          return m
        top = _mods.get(name.partition(".")[0])
        if top is not None:
          return top
    return _orig(name, globals, locals, fromlist, level)
  return __import__


def _adopt(items, tg, mod_dict, pristine, explicit, modnames, mods, missing, tuple_, type_, str_,
           ModuleType_, FunctionType_):
  """Bring the program's names in `items` into the test namespace `tg`: not those that would
  shadow a builtin (unless imported from `solution` by name); a name the tests use as a stdlib
  module is that module (unless the program made it a function); a name bound to a module stands
  for the snapshot's module of that name. Entries of `tg` that are not the program's are kept."""
  for k, v in tuple_(items):
    if type_(k) is not str_ or k[:2] == "__" or mod_dict.get(k, missing) is not v:
      continue
    if k in pristine and k not in explicit:
      if tg.get(k, missing) is v:
        del tg[k]
      continue
    if k in modnames and type_(v) is not FunctionType_ and k in mods:
      v = mods[k]
    elif type_(v) is ModuleType_:
      name = v.__dict__.get("__name__")
      if type_(name) is str_:
        v = mods.get(name, v)
    tg[k] = v


def _trusted_run(program_code, mod_dict, setup_code, test_code, tg, pristine, explicit, modnames,
                 mods, adopt, missing, audit, exec_, exit_, tuple_, type_, str_, ModuleType_,
                 FunctionType_, BaseException_):
  """Program, setup, integrity check, test. Only arguments are used (no global or builtin
  look-ups, no closures), so nothing the program rebinds can alter this path."""
  try:
    exec_(program_code, mod_dict)
  except BaseException_:
    exit_(2)
  try:
    adopt(mod_dict.items(), tg, mod_dict, pristine, explicit, modnames, mods, missing, tuple_,
          type_, str_, ModuleType_, FunctionType_)
    if setup_code is not None:
      exec_(setup_code, tg)
      # `from solution import *` and the like: the same rules for what the setup imported.
      adopt(tg.items(), tg, mod_dict, pristine, explicit, modnames, mods, missing, tuple_, type_,
            str_, ModuleType_, FunctionType_)
  except BaseException_:
    exit_(2)
  audit("egspo.check")
  tg["__egspo_end__"] = audit
  try:
    exec_(test_code, tg)
  except BaseException_:
    exit_(1)
  exit_(1)  # the test ended without its end marker reaching the guard


# Code that runs after the program started must not look up globals or builtins, nor share
# closure cells with anything the program can reach (tests/test_code_sandbox.py checks the first).
_TRUSTED = ("_trusted_run", "_adopt", "_reporter", "_make_check.check", "_make_guard.guard",
            "_make_importer.__import__")


def _child(job, i, pipe_w, result_fd, prep):
  """Runs in the forked child: isolate, build the test's namespace, start the reporter, drop
  privileges, install the guard, then `_trusted_run`."""
  try:
    os.setsid()
    os.close(result_fd)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
      os.dup2(devnull, fd)
    os.close(devnull)
    os.environ.clear()
    # One BLAS/OpenMP thread: threads count against RLIMIT_NPROC.
    os.environ.update({"PATH": "/usr/bin:/bin", "HOME": job["workdir"], "TMPDIR": job["workdir"],
                       "LANG": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                       "MKL_NUM_THREADS": "1"})
    entries, funcs, objs, mods, changed = prep["state"]
    entries = _after_fork(entries, changed)
    test_code, end_offset = prep["tests"][i]
    module = _ModuleType("solution")
    b_keys, b_vals = entries[0][4], entries[0][5]  # the builtins before any program
    pristine = dict(zip(b_keys, b_vals))
    importer = _make_importer(mods, module, pristine["__import__"])
    pristine["__import__"] = importer
    tg = {"__builtins__": pristine, "__name__": "__egspo_test__"}
    pk, pv = tuple(pristine), tuple(pristine.values())
    snap = entries + ((_STRICT, pristine, len(pk), tuple(map(id, pv)), pk, pv),
                      (_PAIRS, tg, 1, (), (), (("__builtins__", pristine),)))
    guard = _make_guard(pipe_w, test_code, tg, end_offset, snap, importer, funcs, objs)
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
    globals()["_LIBC"] = None  # the harness's ctypes handle is unreachable from here on
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 3000))
    sys.modules["solution"] = module
    sys.addaudithook(guard)
    del guard
    args = (job["_program_code"], module.__dict__, prep["setup"], test_code, tg, pristine,
            prep["explicit"], prep["modnames"], mods, _adopt, object(), sys.audit, exec, os._exit,
            tuple, type, str, _ModuleType, _FunctionType, BaseException)
    del entries, funcs, objs, mods, module, pristine, tg, snap, importer, job, prep
  except BaseException:
    os._exit(6)
  _trusted_run(*args)


def _wait(pid, deadline):
  """The exit status of child `pid`, or None at `deadline` (woken by a pidfd when available)."""
  try:
    pidfd = os.pidfd_open(pid)
  except (AttributeError, OSError):
    pidfd = -1
  try:
    while True:
      got, st = os.waitpid(pid, os.WNOHANG)
      if got == pid:
        return st
      left = deadline - time.monotonic()
      if left <= 0:
        return None
      if pidfd >= 0:
        select.select([pidfd], [], [], left)
      else:
        time.sleep(min(left, 0.002))
  finally:
    if pidfd >= 0:
      os.close(pidfd)


def _run_test(job, i, result_fd, prep):
  """One test in a forked child; returns its outcome letter."""
  if prep["tests"][i][0] is None:
    return "F"
  r, w = os.pipe()
  pid = os.fork()
  if pid == 0:
    try:
      os.close(r)
      _child(job, i, w, result_fd, prep)
    finally:
      os._exit(6)
  os.close(w)
  deadline = time.monotonic() + float(job["timeout_s"])
  status = _wait(pid, deadline)
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
  os.set_blocking(r, False)
  try:
    data = os.read(r, 64)
  except BlockingIOError:
    data = b""
  os.close(r)
  if status is None:
    return "T"
  if not os.WIFEXITED(status):
    return "K"
  code = os.WEXITSTATUS(status)
  if code == 0 and len(data) == 32 and data[:16] == data[16:]:
    return "P"
  return _EXIT_OUTCOME.get(code, "F")


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


def _prepare(job):
  """Compile setup and tests, import what they import, snapshot: the per-job `prep` dict, or None
  if the setup does not compile."""
  setup = job.get("setup") or ""
  try:
    setup_code = compile(setup, "<setup>", "exec") if setup.strip() else None
  except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
    return None
  tests = [_compile_test(t, i) for i, t in enumerate(job["tests"])]
  codes = ([setup_code] if setup_code is not None else []) + [c for c, _ in tests if c is not None]
  roots, modnames, explicit = _preimport(codes, job["_program_code"])
  return {"setup": setup_code, "tests": tests, "explicit": explicit, "modnames": modnames,
          "state": _state(roots)}


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
  if common.get("mount"):
    try:  # no /proc for the tests (no /proc/self/mem; the caller's /proc stays hidden too)
      _mount_tmpfs("/proc", 1, mode="0555")
    except OSError as e:
      notes.append(f"hiding /proc failed: {e}")
      common["mount"] = False  # the guard checks paths instead
  try:  # PR_SET_NO_NEW_PRIVS (inherited by every child): no setuid binary regains privileges
    _libc().prctl(38, 1, 0, 0, 0)
  except Exception:
    pass
  verdicts = []
  for k, j in enumerate(jobs):
    job = dict(common, **j)
    n = len(job["tests"])
    try:
      job["_program_code"] = compile(job["program"], "<program>", "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
      verdicts.append("E" * n)
      continue
    prep = _prepare(job)
    if prep is None:
      verdicts.append("E" * n)
      continue
    try:
      d = _enter_workdir(common, k)
    except OSError as e:
      notes.append(f"work directory failed: {e}")
      verdicts.append("H" * n)
      continue
    job["workdir"] = d
    results = [_run_test(job, i, result_fd, prep) for i in range(n)]
    _leave_workdir(common, d)
    verdicts.append("".join(results))
  # "<nonce> <outcomes of job 0>,<of job 1>,... <notes>"; the caller accepts it only with its nonce.
  msg = f"{nonce} {','.join(verdicts)} {'; '.join(notes)}".encode()
  os.write(result_fd, msg)
  os.close(result_fd)


if __name__ == "__main__":
  main()
