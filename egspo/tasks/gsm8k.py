"""GSM8K (REFERENCE §5).

Example dict: {"question": str, "answer": "72" (the text after '####'), "solution": full
worked answer or None}.

Reward (d1/EGSPO sum of five terms, max 4.0):
  xmlcount ≤ 0.5   0.125 for each of `<reasoning>\\n`, `\\n</reasoning>\\n`, `\\n<answer>\\n`,
                   `\\n</answer>` occurring exactly once, minus 0.001 per character after the
                   closing answer tag;
  soft     0.5     `<reasoning>…</reasoning>\\s*<answer>…</answer>` at the start;
  strict   0.5     exactly `<reasoning>\\n…\\n</reasoning>\\n<answer>\\n…\\n</answer>\\n`;
  integer  0.5     the extracted answer is all digits;
  correct  2.0     the extracted answer equals the reference answer.
The extracted answer is the text between the last `<answer>` and the next `</answer>` (the whole
text when there is no tag). Defects fixed: format regexes use DOTALL (multi-line reasoning
matches); answers compare as numbers ("1,000" = "1000" = "1000.0", "$5" = "5") rather than as
raw strings. `reference_rewards=True`: no DOTALL, exact string comparison.

Metric (`score`, d1 evaluation parser): the first non-trivial `\\boxed{…}` holding a number,
else the last number inside `<answer>…</answer>`, compared with the reference as a float.
By default thousands separators and `$` are removed first ("\\boxed{1,000}" reads 1000);
`reference_rewards=True` is d1's parser exactly (it reads 1.0 there) against d1's ground truth
(`d1_ground_truth`): on d1's released generations the default grades 0.9 points higher at 256.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

from egspo.tasks.base import Example, Task, check_purpose, check_style

SYSTEM = """
Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>
"""
EVAL_SYSTEM = """You are a math expert. You will be given a question to solve. Solve it step by step. Wrap the final answer in a \\boxed{}. 
Respond in the following format:
<reasoning>
Your reasoning here
</reasoning>
<answer>
\\boxed{...}
</answer>"""

_STRICT = r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$"
_SOFT = r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>"
_NUM_RE = re.compile(r"-?\d+\.?\d*")


def extract_hash_answer(text: str) -> str | None:
  """The reference answer after '####' in a GSM8K solution."""
  if "####" not in text:
    return None
  return text.split("####")[1].strip()


def extract_xml_answer(text: str) -> str:
  return text.split("<answer>")[-1].split("</answer>")[0].strip()


def count_xml(text: str) -> float:
  count = 0.0
  if text.count("<reasoning>\n") == 1:
    count += 0.125
  if text.count("\n</reasoning>\n") == 1:
    count += 0.125
  if text.count("\n<answer>\n") == 1:
    count += 0.125
    count -= len(text.split("\n</answer>\n")[-1]) * 0.001
  if text.count("\n</answer>") == 1:
    count += 0.125
    count -= (len(text.split("\n</answer>")[-1]) - 1) * 0.001
  return count


def to_number(text: str) -> Fraction | None:
  """A number written as '1,000', '$5', '72.0', '-3', '5.' ; None if the text is not one."""
  t = text.strip().replace(",", "").replace("$", "").strip()
  t = t.rstrip(".") if re.fullmatch(r"-?\d+\.", t) else t
  if not re.fullmatch(r"-?\d+(\.\d+)?", t) or len(t) > 40:
    return None
  return Fraction(t)


def answers_match(pred: str, ref: str, reference: bool = False) -> bool:
  if reference:
    return pred == ref
  a, b = to_number(pred), to_number(ref)
  if a is not None and b is not None:
    return a == b
  return pred.strip() == ref.strip()


def gsm8k_reward_terms(completion: str, answer: str, reference: bool = False) -> dict:
  flags = 0 if reference else re.DOTALL
  extracted = extract_xml_answer(completion)
  return {
      "xmlcount": count_xml(completion),
      "soft": 0.5 if re.match(_SOFT, completion, flags) else 0.0,
      "strict": 0.5 if re.match(_STRICT, completion, flags) else 0.0,
      "integer": 0.5 if extracted.isdigit() else 0.0,
      "correct": 2.0 if answers_match(extracted, str(answer), reference) else 0.0,
  }


def _first_float(text: str, pick: int) -> float | None:
  """float(text), else the `pick`-th number written in it (None if none)."""
  try:
    return float(text)
  except ValueError:
    nums = _NUM_RE.findall(text)
    return float(nums[pick]) if nums else None


def d1_eval_number(completion: str, reference: bool = False) -> float | None:
  """The number d1's GSM8K evaluation parser reads from a generation (see module docstring).

  reference=True is d1's parser exactly: no thousands separators or `$` are removed, so
  "\\boxed{1,000}" reads as 1.0."""
  clean = (lambda t: t) if reference else (lambda t: t.replace(",", "").replace("$", ""))
  for boxed in re.findall(r"\\boxed{(.*?)}", completion):
    boxed = clean(boxed.strip())
    if boxed and not re.fullmatch(r"\.+", boxed):
      value = _first_float(boxed, 0)
      if value is not None:
        return value
  m = re.search(r"<answer>(.*?)</answer>", completion, re.DOTALL)
  if m:
    text = clean(m.group(1).strip())
    if text:
      return _first_float(text, -1)
  return None


_D1_GOLD_RE = re.compile(r"####\s*\$?([\d,]+(?:\.\d+)?)")


def d1_ground_truth(example: Example) -> float | None:
  """The ground truth d1's evaluation compares with: the first number after '####' in the worked
  solution, commas removed (None for a negative answer, whose '-' the pattern does not take)."""
  text = example.get("solution") or f"#### {example['answer']}"
  m = _D1_GOLD_RE.search(str(text))
  return float(m.group(1).replace(",", "")) if m else None


def _ascii(text: str) -> str:
  return "".join(ch if (32 <= ord(ch) < 127 or ch == "\n") else " " for ch in text)


class GSM8KTask(Task):
  name = "gsm8k"
  max_reward = 4.0

  def __init__(self, reference_rewards: bool = False, data_path: str | None = None):
    super().__init__(reference_rewards)
    self.data_path = data_path

  def load_examples(self, split: str = "test", path: str | None = None) -> list[dict]:
    from egspo.tasks.data import load_hf_records
    rows = load_hf_records("gsm8k", split, path or self.data_path, hf_id="openai/gsm8k",
                           hf_config="main", env_var="EGSPO_GSM8K_FILE")
    out = []
    for i, r in enumerate(rows):
      if "question" not in r or "answer" not in r:
        raise ValueError(f"gsm8k record {i} lacks question/answer: {sorted(r)}")
      ans = extract_hash_answer(str(r["answer"]))
      out.append({"question": r["question"], "answer": ans if ans is not None else str(r["answer"]).strip(),
                  "solution": r["answer"] if ans is not None else None})
    return out

  def prompt(self, example: Example, style: str = "chat", purpose: str = "train") -> str:
    check_style(style)
    check_purpose(purpose)
    if style == "plain":
      return f"Q: {_ascii(example['question']).strip()}\n"
    if purpose == "eval":
      return f"{EVAL_SYSTEM}\n\n{example['question']}"
    return f"{SYSTEM}\n\n{example['question']}"

  def sft_target(self, example: Example, style: str = "plain") -> str:
    check_style(style)
    if style == "plain":
      return f"<answer>{example['answer']}</answer>"
    steps = (example.get("solution") or "").split("####")[0].strip() or "Compute the answer."
    return f"<reasoning>\n{steps}\n</reasoning>\n<answer>\n{example['answer']}\n</answer>\n"

  def reward(self, completion: str, example: Example) -> float:
    return float(sum(gsm8k_reward_terms(completion, example["answer"], self.reference_rewards).values()))

  def correctness_reward(self, completion: str, example: Example) -> float:
    """The `correct` term alone (2.0; the release's `correctness_reward_func`)."""
    return gsm8k_reward_terms(completion, example["answer"], self.reference_rewards)["correct"]

  def score(self, completion: str, example: Example) -> dict:
    if self.reference_rewards:  # d1: exact float equality with its parsed ground truth
      pred = d1_eval_number(completion, reference=True)
      gold = d1_ground_truth(example)
      return {"correct": pred is not None and pred == gold, "extracted": pred}
    pred = d1_eval_number(completion)
    ref = to_number(str(example["answer"]))
    correct = pred is not None and ref is not None and abs(pred - float(ref)) < 1e-9
    return {"correct": bool(correct), "extracted": pred}

  def question(self, example: Example) -> str:
    return example["question"]

  def ground_truth(self, example: Example) -> Any:
    ref = to_number(str(example["answer"]))
    return float(ref) if ref is not None else example["answer"]

  def example_from_ground_truth(self, question: str, ground_truth: Any) -> dict:
    if ground_truth is None:
      raise ValueError("GSM8K ground truth is missing")
    gt = ground_truth
    if isinstance(gt, float) and gt.is_integer():
      gt = int(gt)
    return {"question": question, "answer": str(gt), "solution": None}
