"""Countdown: reach a target with + − × ÷ using each given number exactly once (REFERENCE §5).

Example dict: {"numbers": [30, 100, 93], "target": 23, "solution": "100-93+30" or None}.

Rule (decided here, as in the reference reward and the d1 prompt "You must use all numbers from
the list, and each number must be used exactly once"): an answer must use *all* given numbers,
each exactly once. The generator therefore only emits targets reachable with all numbers.

Reward (d1 `countdown_reward_func` semantics): 0 without a complete `<answer>…</answer>`;
1.0 if the last answer is an arithmetic expression whose integer literals are exactly the given
numbers (as a multiset) and whose value is within 1e-5 of the target; 0.1 otherwise.
Defect fixed: the reference evaluates model text with Python `eval`; here an AST walker over
numbers, + − * /, parentheses and unary ± evaluates exactly in rationals (no `eval`, bounded
input size, division by zero → not a number). `reference_rewards=True` restores the reference's
looser grammar (its character whitelist admits `**`, `//` and decimals; digit runs are the
"numbers"), still evaluated safely.
"""

from __future__ import annotations

import ast
import functools
import os
import re
from fractions import Fraction
from typing import Any, Iterable, Sequence

import numpy as np

from egspo.tasks.base import (XML_FORMAT_PROMPT, Example, Task, check_purpose, check_style,
                              extract_answer, last_boxed)

MAX_EXPRESSION_CHARS = 512  # longer "expressions" are not answers; bounds parse time/memory
MAX_LITERAL_DIGITS = 18
TOLERANCE = 1e-5


class ExpressionError(ValueError):
  """The text is not an allowed arithmetic expression, or has no finite value."""


_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b}


def _to_fraction(x) -> Fraction:
  return x if isinstance(x, Fraction) else Fraction(x)


def _eval_node(node: ast.AST, loose: bool, literals: list) -> Fraction:
  if isinstance(node, ast.Expression):
    return _eval_node(node.body, loose, literals)
  if isinstance(node, ast.Constant):
    v = node.value
    if isinstance(v, bool) or not isinstance(v, (int, float) if loose else int):
      raise ExpressionError(f"literal {v!r} is not allowed")
    if isinstance(v, float):
      if not np.isfinite(v):
        raise ExpressionError("non-finite literal")
    elif len(str(abs(v))) > MAX_LITERAL_DIGITS:
      raise ExpressionError("literal too long")
    literals.append(v)
    return Fraction(v)
  if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
    x = _eval_node(node.operand, loose, literals)
    return -x if isinstance(node.op, ast.USub) else x
  if isinstance(node, ast.BinOp):
    a = _eval_node(node.left, loose, literals)
    b = _eval_node(node.right, loose, literals)
    op = type(node.op)
    if op in _BINOPS:
      return _BINOPS[op](a, b)
    if op is ast.Div or (loose and op is ast.FloorDiv):
      if b == 0:
        raise ExpressionError("division by zero")
      return a / b if op is ast.Div else Fraction(a // b)
    if loose and op is ast.Pow:
      # Python semantics for the reference grammar, with a size guard instead of a hang.
      if b.denominator != 1 or abs(b) > 64 or (a != 0 and abs(a.numerator).bit_length() * abs(b) > 4096):
        raise ExpressionError("power too large or non-integer exponent")
      if a == 0 and b < 0:
        raise ExpressionError("zero to a negative power")
      return a ** int(b)
    raise ExpressionError(f"operator {op.__name__} is not allowed")
  raise ExpressionError(f"{type(node).__name__} is not allowed in an arithmetic expression")


def evaluate_expression(expr: str, loose: bool = False) -> tuple[Fraction, list]:
  """Exact value and integer literals of an arithmetic expression, without `eval`.

  Grammar: integer literals, + − * /, parentheses, unary ±. `loose=True` also admits `**`, `//`
  and decimal literals (the reference's character whitelist). Raises ExpressionError otherwise.
  """
  if not isinstance(expr, str):
    raise ExpressionError("expression must be a string")
  expr = expr.strip()
  if not expr:
    raise ExpressionError("empty expression")
  if len(expr) > MAX_EXPRESSION_CHARS:
    raise ExpressionError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
  allowed = r"^[\d+\-*/().\s]+$" if loose else r"^[\d+\-*/()\s]+$"
  if not re.match(allowed, expr):
    raise ExpressionError("characters other than digits, + - * / ( ) and spaces")
  try:
    tree = ast.parse(expr, mode="eval")
  except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
    raise ExpressionError(f"not parseable: {type(e).__name__}") from None
  literals: list = []
  try:
    value = _eval_node(tree, loose, literals)
  except RecursionError:
    raise ExpressionError("expression nested too deeply") from None
  return value, literals


def _close(value: Fraction, target) -> bool:
  return abs(value - _to_fraction(target)) < TOLERANCE


def countdown_reward(completion: str, numbers: Sequence[int], target: int, *,
                     reference: bool = False, format_score: float = 0.1,
                     score: float = 1.0) -> float:
  """d1's Countdown reward with a safe evaluator (see module docstring). Never raises."""
  try:
    expr = extract_answer(completion)
    if expr is None:
      return 0.0
    try:
      value, literals = evaluate_expression(expr, loose=reference)
    except ExpressionError:
      return format_score
    if reference:
      used = sorted(int(n) for n in re.findall(r"\d+", expr))
    else:
      used = sorted(literals)
    if used != sorted(int(n) for n in numbers):
      return format_score
    return score if _close(value, target) else format_score
  except Exception:  # pragma: no cover - defensive: a reward must never raise on model text
    return 0.0


def _d1_eval_expression(completion: str, reference: bool) -> str:
  """Expression as d1's Countdown evaluation parser finds it (boxed first, LaTeX ops mapped)."""
  boxed = last_boxed(completion)
  if boxed is not None:
    expr = boxed
  elif reference:
    # d1: without any \boxed the *whole* generation is taken as the expression.
    expr = completion
  else:
    m = re.search(r"<answer>(.*?)</answer>", completion, re.DOTALL)
    expr = m.group(1).strip() if m else completion
  expr = expr.replace(r"\div", "/").replace(r"\times", "*").replace(r"\cdot", "*")
  m = re.search(r"([0-9+\-*/() ]+)=[0-9. ]+", expr)
  if m:
    expr = m.group(1).strip()
  return expr


# --- generator -------------------------------------------------------------------------------

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def _combine(a, b, op):
  """(value, text, precedence) of `a op b`, with only the parentheses precedence needs."""
  (va, ta, pa), (vb, tb, pb) = a, b
  p = _PREC[op]
  if pa < p:
    ta = f"({ta})"
  if pb < p or (pb == p and op in "-/"):
    tb = f"({tb})"
  if op == "+":
    v = va + vb
  elif op == "-":
    v = va - vb
  elif op == "*":
    v = va * vb
  else:
    v = va / vb
  return v, f"{ta}{op}{tb}", p


def _all_expressions(items: tuple, integer_only: bool) -> Iterable[tuple]:
  """Every (value, text, prec) combining *all* items with + − × ÷ (each used once)."""
  if len(items) == 1:
    yield items[0]
    return
  n = len(items)
  for i in range(n):
    for j in range(i + 1, n):
      rest = items[:i] + items[i + 1:j] + items[j + 1:]
      a, b = items[i], items[j]
      cands = [_combine(a, b, "+"), _combine(a, b, "*"), _combine(a, b, "-"), _combine(b, a, "-")]
      if b[0] != 0:
        cands.append(_combine(a, b, "/"))
      if a[0] != 0:
        cands.append(_combine(b, a, "/"))
      for c in cands:
        if integer_only and (c[0].denominator != 1 or c[0] < 0):
          continue
        yield from _all_expressions(rest + (c,), integer_only)


@functools.lru_cache(maxsize=8192)
def reachable_targets(numbers: tuple, integer_only: bool = True) -> dict:
  """{integer value: one expression} over all expressions using every number exactly once."""
  items = tuple((Fraction(x), str(x), 3) for x in numbers)
  out: dict = {}
  for v, text, _ in _all_expressions(items, integer_only):
    if v.denominator == 1 and int(v) not in out:
      out[int(v)] = text
  return out


def generate_problem(rng: np.random.Generator, num_numbers: int | Sequence[int] = 3,
                     number_range: tuple[int, int] = (1, 100),
                     target_range: tuple[int, int] = (1, 100),
                     integer_intermediates: bool = True, max_tries: int = 1000) -> dict:
  """A solvable problem: numbers drawn uniformly from `number_range` (inclusive), target drawn
  uniformly among the integers in `target_range` reachable using all numbers; keeps a solution.
  The default ranges are those of the test set and of the release's training set
  (Countdown-Tasks-3to4: numbers and targets in 1..100).

  integer_intermediates: only expressions whose intermediate values are non-negative integers
  count (the classic game; the solution then never needs fractions).
  """
  counts = [num_numbers] if isinstance(num_numbers, int) else list(num_numbers)
  if not counts or any(c < 2 or c > 6 for c in counts):
    raise ValueError(f"num_numbers must be in 2..6, got {num_numbers}")
  lo, hi = number_range
  tlo, thi = target_range
  if lo > hi or tlo > thi:
    raise ValueError(f"empty range: number_range={number_range}, target_range={target_range}")
  for _ in range(max_tries):
    n = int(counts[rng.integers(len(counts))])
    numbers = [int(x) for x in rng.integers(lo, hi + 1, size=n)]
    reach = reachable_targets(tuple(sorted(numbers)), integer_intermediates)
    targets = sorted(t for t in reach if tlo <= t <= thi)
    if targets:
      t = targets[int(rng.integers(len(targets)))]
      return {"numbers": numbers, "target": int(t), "solution": reach[t]}
  raise ValueError(f"no solvable problem found in {max_tries} tries for number_range="
                   f"{number_range}, target_range={target_range}")


def countdown_example(row: dict) -> dict:
  """An example from a record: the test set's {"input": "30,100,93", "output": "23"}, the
  Countdown-Tasks-3to4 layout {"nums": [..], "target": ..} (a list, or its text as a csv cell
  holds it), or this module's {"numbers", "target"}. Raises ValueError on anything else."""
  if "input" in row and "output" in row:
    nums, target = row["input"], row["output"]
  elif "nums" in row and "target" in row:
    nums, target = row["nums"], row["target"]
  elif "numbers" in row and "target" in row:
    nums, target = row["numbers"], row["target"]
  else:
    raise ValueError(f"not a Countdown record (needs input/output or nums/target): {sorted(row)}")
  if isinstance(nums, str):
    nums = re.findall(r"-?\d+", nums)
  try:
    numbers = [int(x) for x in nums]
    target = int(target)
  except (TypeError, ValueError) as e:
    raise ValueError(f"not a Countdown record ({e}): {row!r:.80}") from None
  if not numbers:
    raise ValueError(f"not a Countdown record (no numbers): {row!r:.80}")
  return {"numbers": numbers, "target": target, "solution": row.get("solution")}


def read_examples(path: str | os.PathLike) -> list[dict]:
  """Examples of a Countdown file in any layout of `countdown_example` (.jsonl, .json, .parquet,
  .csv; e.g. the test set's jsonl or a Countdown-Tasks-3to4 parquet/jsonl)."""
  from egspo.tasks.data import read_records
  out = []
  for i, row in enumerate(read_records(path)):
    try:
      out.append(countdown_example(row))
    except ValueError as e:
      raise ValueError(f"{path}: record {i}: {e}") from None
  return out


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """The standard Countdown jsonl (`{"input": "30,100,93", "output": "23"}` per line)."""
  return read_examples(path)


CHAT_TRAIN = ("{system}\nUsing only the numbers {numbers}, create an arithmetic expression that "
              "evaluates to exactly {target}. You must use all numbers from the list, and each "
              "number must be used exactly once. You may use the operations +, -, *, and / as "
              "needed. After reasoning, provide only your final expression inside "
              "<answer></answer> tags without including an equals sign or the target number. For "
              "example, if the numbers are [2, 3, 4] and the target is 5, a valid answer is: "
              "<answer>\n2*4-3\n</answer>")
CHAT_EVAL_SYSTEM = (
    "Using only the provided numbers, create an arithmetic expression that evaluates to exactly "
    "the provided target number. You may use the operations +, -, *, and / as needed, but each "
    "number must be used exactly once. Think step-by-step. After reasoning, provide only your "
    "final expression inside \\boxed{} tags without including an equals sign or the target "
    "number. For example: \\boxed{a + b * c}Respond in the following format:\n<reasoning>\n"
    "Your reasoning here\n</reasoning>\n<answer>\n\\boxed{...}\n</answer>")


class CountdownTask(Task):
  """Countdown. Training: generated problems, or a file (the release's Countdown-Tasks-3to4
  rows: only rows with `num_numbers` numbers, shuffled with seed 42 and the last `train_holdout`
  = 500 held out, as the release trains). Evaluation: the test file (`countdown_cd3_test.jsonl`)."""

  name = "countdown"

  def __init__(self, reference_rewards: bool = False, num_numbers: int | Sequence[int] = 3,
               number_range: Sequence[int] = (1, 100), target_range: Sequence[int] = (1, 100),
               integer_intermediates: bool = True, data_path: str | None = None,
               train_holdout: int = 500, split_seed: int = 42):
    super().__init__(reference_rewards)
    self.num_numbers = num_numbers if isinstance(num_numbers, int) else tuple(num_numbers)
    self.number_range = tuple(int(x) for x in number_range)
    self.target_range = tuple(int(x) for x in target_range)
    self.integer_intermediates = integer_intermediates
    self.data_path = data_path  # the evaluation file
    self.train_holdout, self.split_seed = int(train_holdout), int(split_seed)

  # data
  def sample_example(self, rng: np.random.Generator) -> dict:
    return generate_problem(rng, self.num_numbers, self.number_range, self.target_range,
                            self.integer_intermediates)

  def load_examples(self, split: str = "test", path: str | None = None) -> list[dict]:
    """The file's examples: for 'test' the given file, else `data_path`, else the test set
    (`$EGSPO_COUNTDOWN_TEST_FILE`, `$EGSPO_COUNTDOWN_FILE`, `$EGSPO_DATA_DIR`, shared/data);
    for 'train' the given file (or `$EGSPO_COUNTDOWN_TRAIN_FILE`,
    `$EGSPO_DATA_DIR/countdown_train.*`), its rows with `num_numbers` numbers, minus the release's
    held-out rows."""
    from egspo.tasks import data
    if split == "test":
      path = (path or self.data_path
              or data.find_split_file("countdown", "test", "EGSPO_COUNTDOWN_FILE")
              or data.shared_data_file("countdown_cd3_test.jsonl", "EGSPO_COUNTDOWN_FILE"))
      return read_examples(path)
    path = path or data.find_split_file("countdown", split, "EGSPO_COUNTDOWN_FILE")
    if not path:
      raise FileNotFoundError(f"no Countdown {split!r} file: pass task.train_file=FILE or set "
                              "$EGSPO_COUNTDOWN_TRAIN_FILE (without one, training uses the "
                              "generator)")
    counts = {self.num_numbers} if isinstance(self.num_numbers, int) else set(self.num_numbers)
    rows = [e for e in read_examples(path) if len(e["numbers"]) in counts]
    if not rows:
      raise ValueError(f"{path}: no problem with {sorted(counts)} numbers "
                       "(task option num_numbers)")
    if self.train_holdout:
      keep, _ = data.hf_shuffle_holdout(len(rows), self.train_holdout, self.split_seed)
      rows = [rows[i] for i in keep]
    return rows

  # prompts
  def prompt(self, example: Example, style: str = "chat", purpose: str = "train") -> str:
    check_style(style)
    check_purpose(purpose)
    nums, target = list(example["numbers"]), int(example["target"])
    if style == "plain":
      return f"Numbers: {','.join(str(n) for n in nums)} Target: {target}\n"
    if purpose == "eval":
      return f"{CHAT_EVAL_SYSTEM}\n\nNumbers: {nums}\nTarget: {target}"
    return CHAT_TRAIN.format(system=XML_FORMAT_PROMPT, numbers=nums, target=target)

  def sft_target(self, example: Example, style: str = "plain") -> str:
    check_style(style)
    # File rows carry no solution: search one (any expression using every number once).
    sol = example.get("solution") or (
        reachable_targets(tuple(sorted(int(n) for n in example["numbers"])), False)
        .get(int(example["target"])) if len(example["numbers"]) <= 4 else None)
    if not sol:
      raise ValueError(f"Countdown example {example!r} carries no solution and none was found")
    if style == "plain":
      return f"<answer>{sol}</answer>"
    return (f"<reasoning>\nUsing {', '.join(str(n) for n in example['numbers'])}: {sol} = "
            f"{example['target']}.\n</reasoning>\n<answer>\n{sol}\n</answer>")

  # rewards and metrics
  def reward(self, completion: str, example: Example) -> float:
    return countdown_reward(completion, example["numbers"], example["target"],
                            reference=self.reference_rewards)

  def score(self, completion: str, example: Example) -> dict:
    expr = None
    correct = False
    try:
      expr = _d1_eval_expression(completion, self.reference_rewards)
      value, literals = evaluate_expression(expr, loose=True)
      used = (sorted(int(n) for n in re.findall(r"\d+", expr)) if self.reference_rewards
              else sorted(literals))
      correct = used == sorted(int(n) for n in example["numbers"]) and _close(value, example["target"])
    except (ExpressionError, TypeError, ValueError):
      pass
    return {"correct": bool(correct), "extracted": expr}

  def question(self, example: Example) -> str:
    return f"Numbers: {list(example['numbers'])}\nTarget: {int(example['target'])}"

  def ground_truth(self, example: Example) -> Any:
    return [list(example["numbers"]), int(example["target"])]

  def example_from_ground_truth(self, question: str, ground_truth: Any) -> dict:
    if isinstance(ground_truth, (list, tuple)) and len(ground_truth) == 2:
      return {"numbers": [int(x) for x in ground_truth[0]], "target": int(ground_truth[1]),
              "solution": None}
    m1 = re.search(r"Numbers: \[([\d, ]+)\]", question or "")
    m2 = re.search(r"Target: (\d+)", question or "")
    if not (m1 and m2):
      raise ValueError(f"Countdown ground truth {ground_truth!r} is not [numbers, target] and the "
                       "question names no 'Numbers: [..]' / 'Target: N'")
    return {"numbers": [int(x) for x in m1.group(1).split(",")], "target": int(m2.group(1)),
            "solution": None}
