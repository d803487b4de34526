"""Copy: a synthetic sanity task with a dense reward (repeat a digit string).

Not a task of the papers: a reward that a randomly initialised model already earns in part, so
the RL plumbing (advantages, gradients, sharding, resume) is exercised with a real learning
signal in seconds. Example: {"digits": "40213"}. With n digits and c the completion (stripped):
reward = ½ · (digits among c[:n]) / n + ½ · (positions i < n with c[i] == digit i) / n,
so even a random policy gets varied rewards; `correct` = exact match.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from egspo.tasks.base import Example, Task, check_purpose, check_style


class CopyTask(Task):
  name = "copy"

  def __init__(self, reference_rewards: bool = False, min_length: int = 3, max_length: int = 6):
    super().__init__(reference_rewards)
    if not 1 <= min_length <= max_length:
      raise ValueError(f"need 1 <= min_length <= max_length, got {min_length}, {max_length}")
    self.min_length, self.max_length = int(min_length), int(max_length)

  def sample_example(self, rng: np.random.Generator) -> dict:
    n = int(rng.integers(self.min_length, self.max_length + 1))
    return {"digits": "".join(str(int(d)) for d in rng.integers(0, 10, n))}

  def load_examples(self, split: str = "test", path: str | None = None) -> list[dict]:
    del path
    rng = np.random.default_rng({"train": 0, "test": 1}.get(split, 2))
    return [self.sample_example(rng) for _ in range(256)]

  def prompt(self, example: Example, style: str = "chat", purpose: str = "train") -> str:
    check_style(style)
    check_purpose(purpose)
    if style == "plain":
      return f"Copy: {example['digits']}\n"
    return f"Repeat the following digits exactly, with nothing else: {example['digits']}"

  def eval_prefill(self, style: str = "chat") -> str:
    return ""

  def sft_target(self, example: Example, style: str = "plain") -> str:
    return example["digits"]

  def reward(self, completion: str, example: Example) -> float:
    want = example["digits"]
    got = completion.strip()[:len(want)]
    shape = sum(ch.isdigit() for ch in got) / len(want)
    exact = sum(a == b for a, b in zip(got, want)) / len(want)
    return 0.5 * shape + 0.5 * exact

  def rewards(self, completions: Sequence[str], examples: Sequence[Example]) -> np.ndarray:
    return np.asarray([self.reward(c, e) for c, e in zip(completions, examples)], np.float32)

  def score(self, completion: str, example: Example) -> dict:
    return {"correct": completion.strip() == example["digits"],
            "digit_accuracy": sum(a == b for a, b in zip(completion.strip(), example["digits"]))
                              / len(example["digits"])}

  def aggregate(self, scores: Sequence[dict]) -> dict:
    n = max(len(scores), 1)
    return {"accuracy": sum(s["correct"] for s in scores) / n,
            "digit_accuracy": sum(s["digit_accuracy"] for s in scores) / n, "total": len(scores)}

  def question(self, example: Example) -> str:
    return self.prompt(example, "chat")

  def ground_truth(self, example: Example) -> Any:
    return example["digits"]

  def example_from_ground_truth(self, question: str, ground_truth: Any) -> dict:
    return {"digits": str(ground_truth)}
