"""The task interface the RL loop and the evaluation harness use (REFERENCE §5).

Tasks know nothing of JAX: they turn example dicts into prompt text and completion text into
rewards and metrics. Every task implements:

  name: str
      Registry name (`egspo.tasks.get_task(name)`).
  max_reward: float
      The largest reward a completion can earn (Countdown/Sudoku 1, GSM8K 4, MATH 3, code 1.5).
  prompt(example, style="chat", purpose="train") -> str
      "chat": the d1/EGSPO instruct prompt text (the user message; the tokenizer applies the chat
      template). Training prompts ask for `<reasoning>…</reasoning><answer>…</answer>`; with
      purpose="eval" they are d1's evaluation prompts (which ask for `\\boxed{}` where d1 does).
      "plain": a short printable-ASCII prompt for the built-in character tokenizer of the CPU
      presets, e.g. "Numbers: 3,5,7 Target: 22\\n".
  eval_prefill(style="chat") -> str
      Text prefilled after the prompt for evaluation: "<reasoning>" (d1 protocol) for chat, "" for
      plain.
  reward(completion, example) -> float
      The RL training reward of the reference (REFERENCE §5) with its defects fixed; the reference
      behaviour is reachable with `get_task(name, reference_rewards=True)`. Never raises on text.
  rewards(completions, examples) -> np.ndarray [B] float32
      Batched rewards (code tasks run the sandbox programs in parallel).
  score(completion, example) -> dict
      The evaluation metric of the d1 protocol for one completion: always `correct` (bool), plus
      task extras (Sudoku: `correct_cells`, `empty_cells`, `cell_accuracy`). Never raises on text.
  aggregate(scores) -> dict
      Dataset-level metrics from a list of `score` dicts: `accuracy` (+ task extras).
  sft_target(example, style) -> str
      A correct completion (for SFT warm-starting the tiny CPU model). Raises if the example carries
      no known solution.
  load_examples(split="test", path=None) -> list[dict]
      The examples of a split. A data file (`path`: .jsonl, .json, .parquet or .csv in the
      Hugging Face layout of the task's dataset) always goes through the task's own converter,
      for training ('train') and evaluation ('test') alike; without one, the task looks its
      split's file up (`egspo.tasks.data.find_split_file`). Training splits follow the released
      code's splits (e.g. KodCode's 90%, Countdown/Sudoku without the last 500 shuffled rows).
  sample_example(rng) -> dict   (generator tasks: Countdown, Sudoku, copy)
      One generated training problem; a function of the generator's state only.
  question(example) -> str
      The bare problem text (the `question` field of d1's generations JSON).
  ground_truth(example) / example_from_ground_truth(question, ground_truth)
      The `ground_truth` field of d1's generations JSON and its inverse, for rescoring saved files.

Examples are plain dicts (JSON-able), documented per task module.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np

Example = Mapping[str, Any]

STYLES = ("chat", "plain")
PURPOSES = ("train", "eval")

# The d1/EGSPO system prompt of the training prompts (egspo data_utils, facts only).
XML_FORMAT_PROMPT = """
Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>
"""

# Anchored tags; DOTALL so multi-line answers are found (a REFERENCE §5 defect otherwise).
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(text: str) -> str | None:
  """Content of the last complete `<answer>…</answer>`, stripped; None if there is none."""
  matches = _ANSWER_RE.findall(text)
  return matches[-1].strip() if matches else None


def last_boxed(text: str) -> str | None:
  """Content of the last `\\boxed{…}` (or `\\fbox{…}`) with nested braces; None if none/unclosed.

  Also accepts the `\\boxed 5` form (argument up to whitespace or `$`), as the MATH answer
  extractor does.
  """
  best = None
  for key in ("\\boxed", "\\fbox"):
    i = text.rfind(key)
    if i >= 0 and (best is None or i > best[0]):
      best = (i, key)
  if best is None:
    return None
  i, key = best
  j = i + len(key)
  if j < len(text) and text[j] == " ":
    m = re.match(r" +([^\s$]+)", text[j:])
    return m.group(1) if m else None
  while j < len(text) and text[j] in " \t":
    j += 1
  if j >= len(text) or text[j] != "{":
    # `\boxed` not followed by a brace: look for an earlier well-formed one.
    return last_boxed(text[:i])
  k = closing_brace(text, j)
  return text[j + 1:k] if k is not None else last_boxed(text[:i])


def closing_brace(text: str, start: int) -> int | None:
  """Index of the brace closing the first `{` at or after `start` (nested braces counted), or
  None if it is never closed."""
  depth = 0
  for k in range(start, len(text)):
    if text[k] == "{":
      depth += 1
    elif text[k] == "}":
      depth -= 1
      if depth == 0:
        return k
  return None


def check_style(style: str) -> None:
  if style not in STYLES:
    raise ValueError(f"unknown prompt style {style!r}; expected one of {STYLES}")


def check_purpose(purpose: str) -> None:
  if purpose not in PURPOSES:
    raise ValueError(f"unknown prompt purpose {purpose!r}; expected one of {PURPOSES}")


class Task:
  """Base class; see the module docstring for the contract."""

  name: str = "task"
  max_reward: float = 1.0

  def __init__(self, reference_rewards: bool = False):
    # reference_rewards=True reproduces the reference reward code, defects included (REFERENCE §5).
    self.reference_rewards = bool(reference_rewards)

  # --- prompts -------------------------------------------------------------------------------
  def prompt(self, example: Example, style: str = "chat", purpose: str = "train") -> str:
    raise NotImplementedError

  def eval_prefill(self, style: str = "chat") -> str:
    check_style(style)
    return "<reasoning>" if style == "chat" else ""

  def sft_target(self, example: Example, style: str = "plain") -> str:
    raise NotImplementedError

  def load_examples(self, split: str = "test", path: str | None = None) -> list[dict]:
    raise NotImplementedError

  # --- rewards and metrics -------------------------------------------------------------------
  def reward(self, completion: str, example: Example) -> float:
    raise NotImplementedError

  def rewards(self, completions: Sequence[str], examples: Sequence[Example]) -> np.ndarray:
    """[B] float32 rewards; `examples` is aligned with `completions` (repeat prompts per group)."""
    if len(completions) != len(examples):
      raise ValueError(f"{len(completions)} completions but {len(examples)} examples")
    return np.asarray([self.reward(c, e) for c, e in zip(completions, examples)], np.float32)

  def correctness_reward(self, completion: str, example: Example) -> float:
    """The correctness term of `reward` alone: the last of the released trainer's reward functions
    (`egspo_train.py`; GSM8K `correctness_reward_func`, MATH `correctness_reward_func_math`, code
    `coding_reward_func`). Countdown and Sudoku have a single reward function: the whole reward.
    EGSPO's `egspo.correctness_step_reward_only` scores the one-step guesses with it."""
    return self.reward(completion, example)

  def correctness_rewards(self, completions: Sequence[str], examples: Sequence[Example]) -> np.ndarray:
    """Batched `correctness_reward`: [B] float32."""
    if len(completions) != len(examples):
      raise ValueError(f"{len(completions)} completions but {len(examples)} examples")
    return np.asarray([self.correctness_reward(c, e) for c, e in zip(completions, examples)],
                      np.float32)

  def score(self, completion: str, example: Example) -> dict:
    raise NotImplementedError

  def scores(self, completions: Sequence[str], examples: Sequence[Example]) -> list[dict]:
    """Batched `score` (code tasks run the programs in parallel)."""
    if len(completions) != len(examples):
      raise ValueError(f"{len(completions)} completions but {len(examples)} examples")
    return [self.score(c, e) for c, e in zip(completions, examples)]

  def aggregate(self, scores: Sequence[dict]) -> dict:
    n = len(scores)
    correct = sum(bool(s["correct"]) for s in scores)
    return {"accuracy": correct / n if n else 0.0, "correct": correct, "total": n}

  # --- d1 generations JSON ------------------------------------------------------------------
  def question(self, example: Example) -> str:
    raise NotImplementedError

  def ground_truth(self, example: Example) -> Any:
    raise NotImplementedError

  def example_from_ground_truth(self, question: str, ground_truth: Any) -> dict:
    raise NotImplementedError
