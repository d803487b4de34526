"""MATH / MATH-500 (REFERENCE §5).

Example dict: {"problem": str, "answer": str (the reference final answer, LaTeX), "solution":
worked solution or None}. Records with only `solution` get `answer` = its last `\\boxed{}`.

Reward (d1 `correctness_reward_func_math` + 0.5 × `boxed_and_answer_tags_format_reward`):
  2.0 if the content of the completion's last `\\boxed{…}` (nested braces) is equivalent to the
      reference answer;
  + 0.5 × (1.0 if the completion has `<answer>` + (1.0 if `\\boxed` occurs in the answer text,
      i.e. after the first `<answer>` up to `</answer>`, or in the whole text without a tag,
      else 0.5)).
Equivalence: equal after light LaTeX normalisation, else math-verify (sympy) with a timeout.
Defects fixed: the reference tests `"\\boxed" in text` written as a Python string "\\boxed" with a
single backslash, i.e. a backspace + "oxed", which never matches, so the format term never sees a
box; and without any box it compares the *whole* completion with the answer.
`reference_rewards=True` restores both.

Metric (`score`, d1 evaluation parser): the last `\\boxed{}` content, else the `<answer>` text;
correct iff equivalent to the reference.
"""

from __future__ import annotations

import functools
import re
import threading
from typing import Any

from egspo.tasks.base import Example, Task, check_purpose, check_style, last_boxed
from egspo.tasks.gsm8k import EVAL_SYSTEM, SYSTEM, _ascii

EQUIV_TIMEOUT_S = 3
MAX_VERIFY_CHARS = 300  # longer strings are compared only after normalisation


def normalize_answer(s: str) -> str:
  """Light LaTeX normalisation for string equivalence (not a CAS)."""
  s = s.strip()
  m = re.fullmatch(r"\\text\{(.*)\}", s)
  if m:
    s = m.group(1)
  s = re.sub(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}", r"\1", s)
  for a, b in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""),
               ("\\ ", ""), ("\\$", ""), ("$", ""), ("^{\\circ}", ""), ("^\\circ", ""),
               ("\\%", ""), ("%", ""), ("dfrac", "frac"), ("tfrac", "frac"), ("\\displaystyle", "")):
    s = s.replace(a, b)
  s = s.replace(" ", "").replace("\n", "")
  if re.match(r"^[a-zA-Z]{1,2}=", s) and s.count("=") == 1:
    s = s.split("=", 1)[1]
  s = re.sub(r"(?<![\d}])\.(\d)", r"0.\1", s)
  s = s.rstrip(".")
  if re.fullmatch(r"-?\d+\.0+", s):
    s = s.split(".")[0]
  return s


_EXPLOSIVE = re.compile(r"\^\s*\{[^{}]*[\^!]|\^\s*\{?\s*\d{3,}|\d{3,}\s*\}?\s*!|!\s*!|\*\*|\d{40,}")


def cas_safe(s: str) -> bool:
  """False for expressions whose evaluation can explode (nested or huge exponents, big
  factorials): those are only compared as strings, because a CAS call on them can take seconds
  (main thread, with the alarm timeout) or forever (other threads, where no timeout exists)."""
  return not _EXPLOSIVE.search(s)


def _math_verify(pred: str, gold: str) -> bool:
  try:
    from math_verify import parse, verify
  except ImportError:  # pragma: no cover - math-verify is a dependency
    return False
  # math-verify's timeouts use SIGALRM, which only works in the main thread; elsewhere the input
  # size cap bounds the work instead.
  main = threading.current_thread() is threading.main_thread()
  t = EQUIV_TIMEOUT_S if main else None
  try:
    g = parse(f"\\boxed{{{gold}}}", parsing_timeout=t)
    p = parse(f"\\boxed{{{pred}}}", parsing_timeout=t)
    if not g or not p:
      return False
    return bool(verify(g, p, timeout_seconds=t))
  except Exception:  # noqa: BLE001 - any parser/CAS failure means "not shown equivalent"
    return False


def is_equivalent(pred: str | None, gold: str | None, use_cas: bool = True) -> bool:
  """Whether two final answers are mathematically the same (never raises). Memoised: the
  one-step value estimates of EGSPO-SA re-grade the same answers many times."""
  if pred is None or gold is None or not isinstance(pred, str) or not isinstance(gold, str):
    return False
  return _is_equivalent(pred, gold, bool(use_cas))


@functools.lru_cache(maxsize=65536)
def _is_equivalent(pred: str, gold: str, use_cas: bool) -> bool:
  try:
    a, b = normalize_answer(pred), normalize_answer(gold)
    if a == b and a != "":
      return True
    if (not use_cas or not a or not b or len(pred) > MAX_VERIFY_CHARS
        or len(gold) > MAX_VERIFY_CHARS or not cas_safe(pred) or not cas_safe(gold)):
      return False
    return _math_verify(pred, gold)
  except Exception:  # noqa: BLE001
    return False


def boxed_format_score(completion: str, reference: bool = False) -> float:
  """d1's `boxed_in_answer` (in [0.5, 2.0]); reference=True keeps the backspace defect."""
  score = 0.0
  text = completion
  if "<answer>" in completion:
    text = completion.split("<answer>", 1)[1].split("</answer>", 1)[0]
    score += 1.0
  needle = "\boxed" if reference else "\\boxed"  # "\boxed" is backspace + "oxed" (the defect)
  return score + (1.0 if needle in text else 0.5)


class Math500Task(Task):
  name = "math500"
  max_reward = 3.0

  def __init__(self, reference_rewards: bool = False, data_path: str | None = None,
               use_cas: bool = True):
    super().__init__(reference_rewards)
    self.data_path = data_path
    self.use_cas = use_cas

  def load_examples(self, split: str = "test", path: str | None = None) -> list[dict]:
    from egspo.tasks.data import load_hf_records
    hf_id = "HuggingFaceH4/MATH-500" if split == "test" else "ankner/math-500"
    rows = load_hf_records("math500", split, path or self.data_path, hf_id=hf_id,
                           env_var="EGSPO_MATH500_FILE")
    out = []
    for i, r in enumerate(rows):
      problem = r.get("problem") or r.get("question")
      answer = r.get("answer")
      if answer is None and r.get("solution"):
        answer = last_boxed(r["solution"])
      if problem is None or answer is None:
        raise ValueError(f"math500 record {i} lacks problem and answer (or a boxed solution): "
                         f"{sorted(r)}")
      out.append({"problem": problem, "answer": str(answer), "solution": r.get("solution")})
    return out

  def prompt(self, example: Example, style: str = "chat", purpose: str = "train") -> str:
    check_style(style)
    check_purpose(purpose)
    if style == "plain":
      return f"Q: {_ascii(example['problem']).strip()}\n"
    if purpose == "eval":
      return f"{EVAL_SYSTEM}\n\n{example['problem']}"
    return (f"{SYSTEM}\n\nYou are a math expert. You will be given a question to solve. Solve it "
            f"step by step. Wrap the final answer in a \\boxed{{}}. \n\n{example['problem']}")

  def sft_target(self, example: Example, style: str = "plain") -> str:
    check_style(style)
    ans = example["answer"]
    if style == "plain":
      return f"<answer>\\boxed{{{ans}}}</answer>"
    steps = (example.get("solution") or "Solve.").strip()
    return f"<reasoning>\n{steps}\n</reasoning>\n<answer>\n\\boxed{{{ans}}}\n</answer>\n"

  def reward(self, completion: str, example: Example) -> float:
    try:
      pred = last_boxed(completion)
      if pred is None and self.reference_rewards:
        pred = completion  # the reference compares the whole text when nothing is boxed
      correct = 2.0 if is_equivalent(pred, example["answer"], self.use_cas) else 0.0
      return correct + 0.5 * boxed_format_score(completion, self.reference_rewards)
    except Exception:  # noqa: BLE001 - a reward never raises on model text
      return 0.0

  def score(self, completion: str, example: Example) -> dict:
    pred = last_boxed(completion)
    if not pred:
      m = re.search(r"<answer>(.*?)</answer>", completion, re.DOTALL)
      pred = m.group(1).strip() if m else None
    return {"correct": is_equivalent(pred, example["answer"], self.use_cas), "extracted": pred}

  def question(self, example: Example) -> str:
    return example["problem"]

  def ground_truth(self, example: Example) -> Any:
    return example["answer"]

  def example_from_ground_truth(self, question: str, ground_truth: Any) -> dict:
    if ground_truth is None:
      raise ValueError("MATH ground truth is missing")
    gt = str(ground_truth)
    boxed = last_boxed(gt)  # d1 train-style ground truths are whole solutions
    return {"problem": question, "answer": boxed if boxed is not None else gt, "solution": None}
