"""MATH / MATH-500 (REFERENCE §5).

Example dict: {"problem": str, "answer": str (the reference final answer, LaTeX), "solution":
worked solution or None}. Records with only `solution` get `answer` = its last `\\boxed{}`.

Two graders, chosen by the task's one switch `reference_rewards`:
  default    the last `\\boxed{…}` (nested braces) is equivalent to the answer: equal after light
             LaTeX normalisation, else math-verify (sympy) with a timeout;
  reference  d1's string grader, the one behind the published tables (d1 `eval/parser_helper.py`,
             `diffu-grpo/math500_utils.py`): `last_boxed_only_string` → `remove_boxed` →
             `strip_string` → string equality (`is_equiv`), quirks included. On d1's released
             LLaDA generations math-verify grades higher (README "Graders").

Reward (d1 `correctness_reward_func_math` + `boxed_and_answer_tags_format_reward`, max 3.0):
  2.0 if the extracted answer is equivalent to the reference
  + 0.5 × (1.0 if the completion has `<answer>`, + 1.0 if `\\boxed` occurs in the answer text
      (after the first `<answer>` up to `</answer>`, or the whole text without a tag), else 0.5).
Defects fixed by default: the reference tests `"\\boxed" in text` written as the Python string
"\\boxed" with a single backslash, i.e. a backspace + "oxed", which never matches, so the format
term never sees a box; and without a box it compares the *whole* completion with the answer.
Reference mode keeps both and grades against the last box of the example's `solution` (the
release passes the worked solution as the answer).

Metric (`score`, d1 evaluation parser): the last `\\boxed{}` content, else the `<answer>` text;
correct iff equivalent. Reference mode: d1's `parse_math_answers` exactly (with no box at all the
whole generation is compared; the `<answer>` text only when the box is unclosed or empty).
"""

from __future__ import annotations

import functools
import re
import threading
from typing import Any

from egspo.tasks.base import (Example, Task, check_purpose, check_style, closing_brace,
                              last_boxed)
from egspo.tasks.gsm8k import EVAL_SYSTEM, SYSTEM, _ascii

# The release's MATH500 evaluation prompt, byte for byte (a stray `"` and space after
# `</answer>`; no space after `\boxed{}.`); the default reuses GSM8K's evaluation prompt.
REFERENCE_EVAL_SYSTEM = ("You are a math expert. You will be given a question to solve. Solve it step "
                         "by step. Wrap the final answer in a \\boxed{}.\nRespond in the following "
                         "format:\n<reasoning>\nYour reasoning here\n</reasoning>\n<answer>\n"
                         "\\boxed{...}\n</answer>\" \n")

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


# --- d1's string grader (reference mode) ------------------------------------------------------
# Reproduces the behaviour of d1's `last_boxed_only_string`, `remove_boxed`, `strip_string` and
# `is_equiv` (facts from `eval/parser_helper.py`), including where they raise: every function
# below raises exactly where d1's does, and the callers handle that as d1's callers do.


def d1_last_boxed_only_string(text: str) -> str | None:
  """`\\boxed …` up to the next `$` if any `\\boxed ` (with a space) occurs; else the last
  `\\boxed{…}` (or `\\fbox{…}`) with balanced braces, None if unclosed; the text itself if neither."""
  if "\\boxed " in text:
    return "\\boxed " + text.split("\\boxed ")[-1].split("$")[0]
  start = text.rfind("\\boxed")
  if start < 0:
    start = text.rfind("\\fbox")
    if start < 0:
      return text
  end = closing_brace(text, start)
  return None if end is None else text[start:end + 1]


def d1_remove_boxed(s: str) -> str:
  """The content of `\\boxed{…}` / `\\boxed …`; other text unchanged. Raises on None, and on text
  holding `\\boxed ` that does not start with it."""
  if "\\boxed " in s:
    if not s.startswith("\\boxed "):
      raise ValueError("text holds '\\boxed ' but does not start with it")
    return s[len("\\boxed "):]
  if s.startswith("\\boxed{") and s.endswith("}"):
    return s[len("\\boxed{"):-1]
  return s


def _d1_fix_fracs(s: str) -> str:
  parts = s.split("\\frac")
  out = parts[0]
  for part in parts[1:]:
    out += "\\frac"
    if part[0] == "{":  # IndexError on a trailing "\frac", as in d1
      out += part
    elif len(part) < 2:
      return s
    elif part[1] != "{":
      out += "{" + part[0] + "}{" + part[1] + "}" + part[2:]
    else:
      out += "{" + part[0] + "}" + part[1] + part[2:]
  return out


def _d1_remove_right_units(s: str) -> str:
  if "\\text{ " not in s:
    return s
  parts = s.split("\\text{ ")
  if len(parts) != 2:
    raise ValueError("more than one '\\text{ '")
  return parts[0]


def _d1_fix_sqrt(s: str) -> str:
  if "\\sqrt" not in s:
    return s
  parts = s.split("\\sqrt")
  out = parts[0]
  for part in parts[1:]:
    if part[0] != "{":  # IndexError on a trailing "\sqrt", as in d1
      out += "\\sqrt{" + part[0] + "}" + part[1:]
    else:
      out += "\\sqrt" + part
  return out


def _d1_fix_a_slash_b(s: str) -> str:
  parts = s.split("/")
  if len(parts) != 2:
    return s
  a, b = int(parts[0]), int(parts[1])  # ValueError propagates, as in d1
  return f"\\frac{{{a}}}{{{b}}}" if s == f"{a}/{b}" else s


def d1_strip_string(s: str) -> str:
  """d1's (Hendrycks MATH's) answer normalisation."""
  for a, b in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
               ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", "")):
    s = s.replace(a, b)
  s = _d1_remove_right_units(s)
  s = s.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
  if not s:
    return s
  if s[0] == ".":
    s = "0" + s
  sides = s.split("=")
  if len(sides) == 2 and len(sides[0]) <= 2:
    s = sides[1]
  s = _d1_fix_sqrt(s).replace(" ", "")
  s = _d1_fix_fracs(s)
  if s == "0.5":
    s = "\\frac{1}{2}"
  return _d1_fix_a_slash_b(s)


def d1_is_equiv(a: Any, b: Any) -> bool:
  """d1's `is_equiv`: floats compare within 1e-6; None equals None; otherwise equal after
  `d1_strip_string`, or (when that raises) equal as given."""
  if type(a) is float or type(b) is float:
    try:
      return abs(float(a) - float(b)) < 1e-6
    except (TypeError, ValueError):
      return False
  if a is None or b is None:
    return a is None and b is None
  try:
    return d1_strip_string(a) == d1_strip_string(b)
  except Exception:  # noqa: BLE001 - d1 falls back to plain equality on any failure
    return a == b


def d1_extract_boxed(text: str) -> str | None:
  """`remove_boxed(last_boxed_only_string(text))`, None where d1's pair raises."""
  try:
    return d1_remove_boxed(d1_last_boxed_only_string(text))
  except (TypeError, ValueError):
    return None


def d1_math_eval_answer(generation: str) -> str | None:
  """The answer d1's `parse_math_answers` reads: the box (or, with no box, the whole text); the
  stripped `<answer>` content when that is empty or the box is unclosed."""
  parsed = d1_extract_boxed(generation)
  if not parsed:
    m = re.search(r"<answer>(.*?)</answer>", generation, re.DOTALL)
    if m:
      parsed = m.group(1).strip()
  return parsed


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
      system = REFERENCE_EVAL_SYSTEM if self.reference_rewards else EVAL_SYSTEM
      return f"{system}\n\n{example['problem']}"
    return (f"{SYSTEM}\n\nYou are a math expert. You will be given a question to solve. Solve it "
            f"step by step. Wrap the final answer in a \\boxed{{}}. \n\n{example['problem']}")

  def sft_target(self, example: Example, style: str = "plain") -> str:
    check_style(style)
    ans = example["answer"]
    if style == "plain":
      return f"<answer>\\boxed{{{ans}}}</answer>"
    steps = (example.get("solution") or "Solve.").strip()
    return f"<reasoning>\n{steps}\n</reasoning>\n<answer>\n\\boxed{{{ans}}}\n</answer>\n"

  def _correct(self, completion: str, example: Example) -> bool:
    if self.reference_rewards:
      pred = d1_extract_boxed(completion)
      return d1_is_equiv(completion if pred is None else pred, self._reference_gold(example))
    return is_equivalent(last_boxed(completion), example["answer"], self.use_cas)

  def reward(self, completion: str, example: Example) -> float:
    try:
      return (2.0 * self._correct(completion, example)
              + 0.5 * boxed_format_score(completion, self.reference_rewards))
    except Exception:  # noqa: BLE001 - a reward never raises on model text
      return 0.0

  def correctness_reward(self, completion: str, example: Example) -> float:
    """2.0 if correct, without the format term (the release's `correctness_reward_func_math`)."""
    try:
      return 2.0 * self._correct(completion, example)
    except Exception:  # noqa: BLE001 - a reward never raises on model text
      return 0.0

  @staticmethod
  def _reference_gold(example: Example) -> Any:
    """The release grades against the last box of the worked solution (its `answer` column)."""
    solution = example.get("solution")
    gold = d1_extract_boxed(solution) if isinstance(solution, str) else None
    return example["answer"] if gold is None else gold

  def score(self, completion: str, example: Example) -> dict:
    if self.reference_rewards:
      pred = d1_math_eval_answer(completion)
      return {"correct": pred is not None and d1_is_equiv(pred, example["answer"]),
              "extracted": pred}
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
    if self.reference_rewards:  # d1 compares with the file's ground truth as it is
      return {"problem": question, "answer": ground_truth, "solution": None}
    gt = str(ground_truth)
    boxed = last_boxed(gt)  # d1 train-style ground truths are whole solutions
    return {"problem": question, "answer": boxed if boxed is not None else gt, "solution": None}
