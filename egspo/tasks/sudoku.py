"""Sudoku 4×4 (REFERENCE §5).

Example dict: {"puzzle": "3102200002100320", "solution": "3142243142131324"} — 16 characters,
row-major, '0' = empty.

Reward (d1 `sudoku_reward_func`): the digits of the last `<answer>…</answer>`, padded with '0' or
truncated to 16; the fraction of the puzzle's originally empty cells that match the solution;
0 without an answer. Defect fixed: the reference keeps every `str.isdigit()` character
(superscripts, Arabic-Indic digits …), which then never match; here only ASCII 0-9 count
(`reference_rewards=True` restores `isdigit`).

Metric (`score`, d1 evaluation parser): the answer found by d1's cascade of patterns (answer tags,
a code fence inside them, a 16-digit run …); `cell_accuracy` = correct empty cells / empty cells.
`aggregate` reports both `accuracy` (puzzles fully solved) and `cell_accuracy` = total correct
empty cells / total empty cells, which is the number d1/EGSPO report as Sudoku accuracy.
"""

from __future__ import annotations

import os
import re
from typing import Any, Sequence

import numpy as np

from egspo.tasks.base import Example, Task, check_purpose, check_style

N = 4
CELLS = N * N
_UNITS = ([[r * N + c for c in range(N)] for r in range(N)]
          + [[r * N + c for r in range(N)] for c in range(N)]
          + [[(br + r) * N + bc + c for r in range(2) for c in range(2)]
             for br in (0, 2) for bc in (0, 2)])
_PEERS = [sorted({p for u in _UNITS if i in u for p in u} - {i}) for i in range(CELLS)]


def _check_grid(s: str, what: str) -> None:
  if not isinstance(s, str) or len(s) != CELLS or any(ch not in "01234" for ch in s):
    raise ValueError(f"{what} must be a 16-character string of digits 0-4, got {s!r}")


def count_solutions(puzzle: str, limit: int = 2) -> int:
  """Number of completions of `puzzle` (stops counting at `limit`). Backtracking, most
  constrained cell first."""
  _check_grid(puzzle, "puzzle")
  grid = [int(ch) for ch in puzzle]
  for i, v in enumerate(grid):  # givens must not conflict
    if v and any(grid[p] == v for p in _PEERS[i]):
      return 0

  def rec() -> int:
    best, best_opts = -1, None
    for i in range(CELLS):
      if grid[i] == 0:
        opts = {1, 2, 3, 4} - {grid[p] for p in _PEERS[i]}
        if best_opts is None or len(opts) < len(best_opts):
          best, best_opts = i, opts
          if not opts:
            return 0
    if best < 0:
      return 1
    total = 0
    for v in sorted(best_opts):
      grid[best] = v
      total += rec()
      grid[best] = 0
      if total >= limit:
        break
    return total

  return rec()


def solve(puzzle: str) -> str | None:
  """The unique solution of `puzzle`, or None if it has zero or several."""
  _check_grid(puzzle, "puzzle")
  if count_solutions(puzzle, 2) != 1:
    return None
  grid = [int(ch) for ch in puzzle]
  for i in range(CELLS):
    if grid[i] == 0:
      for v in range(1, 5):
        if all(grid[p] != v for p in _PEERS[i]):
          grid[i] = v
          if count_solutions("".join(map(str, grid)), 1) == 1:
            break
          grid[i] = 0
  return "".join(map(str, grid))


def is_valid_solution(grid: str) -> bool:
  if not isinstance(grid, str) or len(grid) != CELLS or any(ch not in "1234" for ch in grid):
    return False
  return all(sorted(grid[i] for i in u) == ["1", "2", "3", "4"] for u in _UNITS)


def _random_full_grid(rng: np.random.Generator) -> str:
  grid = [0] * CELLS

  def fill(i: int) -> bool:
    if i == CELLS:
      return True
    for v in rng.permutation(4) + 1:
      if all(grid[p] != v for p in _PEERS[i]):
        grid[i] = int(v)
        if fill(i + 1):
          return True
    grid[i] = 0
    return False

  fill(0)
  return "".join(map(str, grid))


def generate_puzzle(rng: np.random.Generator, empty_range: tuple[int, int] = (8, 8),
                    unique: bool = False) -> dict:
  """A puzzle from a uniformly random full grid with a number of empty cells drawn from
  `empty_range` (inclusive).

  unique=False (default, the test set's distribution): that many cells, chosen uniformly, are
  emptied, whether or not the solution stays unique (~19% of 8-empty puzzles then have several
  completions; the test set has 24.8%); `solution` is the grid they were cut from, which is
  uniform over the puzzle's completions. unique=True: cells are removed in random order while
  the solution stays unique (the count is capped by what uniqueness allows)."""
  lo, hi = empty_range
  if not 1 <= lo <= hi <= CELLS:
    raise ValueError(f"empty_range must satisfy 1 <= lo <= hi <= 16, got {empty_range}")
  solution = _random_full_grid(rng)
  want = int(rng.integers(lo, hi + 1))
  puzzle = list(solution)
  if not unique:
    for i in rng.choice(CELLS, want, replace=False):
      puzzle[i] = "0"
    return {"puzzle": "".join(puzzle), "solution": solution}
  removed = 0
  for i in rng.permutation(CELLS):
    if removed == want:
      break
    keep = puzzle[i]
    puzzle[i] = "0"
    if count_solutions("".join(puzzle), 2) == 1:
      removed += 1
    else:
      puzzle[i] = keep
  return {"puzzle": "".join(puzzle), "solution": solution}


def _grid_text(v) -> str:
  """A grid cell of a record as a 16-character string; an integer (a numeric column that lost
  its leading zeros) is zero-filled back."""
  if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
    return str(int(v)).zfill(CELLS)
  return str(v).strip()


def sudoku_example(row: dict) -> dict:
  """An example from a record with Puzzle/Solution columns (any case; the release's csv files)."""
  cols = {str(c).lower(): c for c in row}
  if "puzzle" not in cols or "solution" not in cols:
    raise ValueError(f"expected columns Puzzle,Solution, got {sorted(row)}")
  p, s = _grid_text(row[cols["puzzle"]]), _grid_text(row[cols["solution"]])
  _check_grid(p, "puzzle")
  _check_grid(s, "solution")
  return {"puzzle": p, "solution": s}


def read_examples(path: str | os.PathLike) -> list[dict]:
  """Examples of a Sudoku file (.csv as released, or .jsonl/.json/.parquet with the same columns)."""
  from egspo.tasks.data import read_records
  rows = read_records(path)
  if not rows:
    raise ValueError(f"{path}: no puzzles (expected rows with columns Puzzle,Solution)")
  out = []
  for i, row in enumerate(rows):
    try:
      out.append(sudoku_example(row))
    except ValueError as e:
      where = f"{path}:{i + 2}" if str(path).lower().endswith(".csv") else f"{path}: record {i}"
      raise ValueError(f"{where}: {e}") from None
  return out


def read_csv(path: str | os.PathLike) -> list[dict]:
  """The standard csv with columns Puzzle,Solution (16-character strings)."""
  return read_examples(path)


def d1_eval_subsample(n_total: int, n: int = 256, seed: int = 42) -> np.ndarray:
  """Indices d1's evaluation draws: `np.random.seed(42); np.random.choice(N, 256, replace=False)`
  (the legacy global generator, reproduced with RandomState)."""
  return np.random.RandomState(seed).choice(n_total, n, replace=False)


def _cells(answer: str | None, puzzle: str, solution: str) -> tuple[int, int]:
  empty = [i for i in range(CELLS) if puzzle[i] == "0"]
  if not answer:
    return 0, len(empty)
  answer = (answer + "0" * CELLS)[:CELLS]
  return sum(answer[i] == solution[i] for i in empty), len(empty)


def sudoku_reward(completion: str, puzzle: str, solution: str, reference: bool = False) -> float:
  """Fraction of empty cells filled correctly (see module docstring). Never raises on text."""
  matches = re.findall(r"<answer>(.*?)</answer>", completion, re.DOTALL)
  if not matches:
    return 0.0
  text = matches[-1].strip()
  digits = "".join(ch for ch in text if (ch.isdigit() if reference else ch in "0123456789"))
  correct, empty = _cells(digits, puzzle, solution)
  return correct / empty if empty else 0.0


_D1_PATTERNS = (
    r"<answer>.*?```\s*([\d\s]+)```",
    r"<answer>(.*?)(?:<\|eot_id\|>|<\|endoftext\|>|</answer>)",
    r"</answer>\s*(.*?)(?:<\|eot_id\|>|<\|endoftext\|>|$)",
    r".*?(\d{16})\s*</answer>",
    r"\b(\d{16})\b",
)


def d1_eval_answer(completion: str) -> str:
  """The answer string d1's Sudoku evaluation parser extracts (whitespace removed)."""
  for pattern in _D1_PATTERNS:
    m = re.search(pattern, completion, re.DOTALL)
    if m and m.group(1).strip():
      return re.sub(r"\s", "", m.group(1).strip())
  return ""


CHAT_SYSTEM = """
Please solve the following 4x4 Sudoku puzzle. The puzzle is provided as a 16-character string reading left-to-right, top-to-bottom, where '0' represents empty cells.

Rules:
- Fill empty cells with digits 1-4
- Each row must contain digits 1-4 exactly once
- Each column must contain digits 1-4 exactly once
- Each 2x2 box must contain digits 1-4 exactly once

Important: Your solution must be a COMPLETE 16-character string with only the digits 1-4, representing your final solved grid.

Respond in this exact format:
<reasoning>
Your step-by-step solving process
</reasoning>
<answer>
[16-character solution string with no spaces or separators]
</answer>
"""


class SudokuTask(Task):
  """4×4 Sudoku. Training: generated puzzles (default: 8 empty cells, several solutions allowed,
  as in the test set), or a file (the release's `4x4_sudoku_unique_puzzles.csv`, shuffled with
  seed 42 and the last `train_holdout` = 500 held out, as the release trains). Evaluation: the
  test csv, d1's 256 puzzles drawn with seed 42."""

  name = "sudoku"

  def __init__(self, reference_rewards: bool = False, empty_range: Sequence[int] = (8, 8),
               unique: bool = False, data_path: str | None = None, eval_subsample: int = 256,
               eval_seed: int = 42, train_holdout: int = 500, split_seed: int = 42):
    super().__init__(reference_rewards)
    self.empty_range = tuple(int(x) for x in empty_range)
    self.unique = bool(unique)
    self.data_path = data_path  # the evaluation file
    self.eval_subsample = eval_subsample
    self.eval_seed = eval_seed
    self.train_holdout, self.split_seed = int(train_holdout), int(split_seed)

  def sample_example(self, rng: np.random.Generator) -> dict:
    return generate_puzzle(rng, self.empty_range, self.unique)

  def load_examples(self, split: str = "test", path: str | None = None,
                    subsample: bool = True) -> list[dict]:
    """'test': the given file, else `data_path`, else the test csv (`$EGSPO_SUDOKU_TEST_FILE`,
    `$EGSPO_SUDOKU_FILE`, `$EGSPO_DATA_DIR`, shared/data); with `subsample`, d1's 256 puzzles
    drawn with seed 42 (in d1's order). 'train': the given file (or `$EGSPO_SUDOKU_TRAIN_FILE`,
    `$EGSPO_DATA_DIR/sudoku_train.*`) minus the release's held-out rows."""
    from egspo.tasks import data
    if split != "test":
      path = path or data.find_split_file("sudoku", split, "EGSPO_SUDOKU_FILE")
      if not path:
        raise FileNotFoundError(f"no Sudoku {split!r} file: pass task.train_file=FILE or set "
                                "$EGSPO_SUDOKU_TRAIN_FILE (without one, training uses the "
                                "generator)")
      rows = read_examples(path)
      if self.train_holdout:
        keep, _ = data.hf_shuffle_holdout(len(rows), self.train_holdout, self.split_seed)
        rows = [rows[i] for i in keep]
      return rows
    path = (path or self.data_path or data.find_split_file("sudoku", "test", "EGSPO_SUDOKU_FILE")
            or data.shared_data_file("sudoku_4x4_test.csv", "EGSPO_SUDOKU_FILE"))
    rows = read_examples(path)
    if subsample and self.eval_subsample and self.eval_subsample < len(rows):
      rows = [rows[i] for i in d1_eval_subsample(len(rows), self.eval_subsample, self.eval_seed)]
    return rows

  def prompt(self, example: Example, style: str = "chat", purpose: str = "train") -> str:
    check_style(style)
    check_purpose(purpose)
    if style == "plain":
      return f"Sudoku: {example['puzzle']}\n"
    return f"{CHAT_SYSTEM}\n\nSolve the following Sudoku puzzle: {example['puzzle']}\n"

  def sft_target(self, example: Example, style: str = "plain") -> str:
    check_style(style)
    sol = example.get("solution")
    if not sol:
      raise ValueError(f"Sudoku example {example!r} carries no solution")
    if style == "plain":
      return f"<answer>{sol}</answer>"
    return (f"<reasoning>\nFill each empty cell so every row, column and box has 1-4.\n"
            f"</reasoning>\n<answer>\n{sol}\n</answer>")

  def reward(self, completion: str, example: Example) -> float:
    return sudoku_reward(completion, example["puzzle"], example["solution"],
                         reference=self.reference_rewards)

  def score(self, completion: str, example: Example) -> dict:
    answer = d1_eval_answer(completion)
    correct, empty = _cells(answer, example["puzzle"], example["solution"])
    return {"correct": empty > 0 and correct == empty, "correct_cells": correct,
            "empty_cells": empty, "cell_accuracy": correct / empty if empty else 0.0,
            "extracted": answer}

  def aggregate(self, scores: Sequence[dict]) -> dict:
    out = super().aggregate(scores)
    cc = sum(s["correct_cells"] for s in scores)
    ec = sum(s["empty_cells"] for s in scores)
    out.update(cell_accuracy=cc / ec if ec else 0.0, correct_cells=cc, empty_cells=ec)
    return out

  def question(self, example: Example) -> str:
    return f"Solve the following Sudoku puzzle: {example['puzzle']}"

  def ground_truth(self, example: Example) -> Any:
    return example["solution"]

  def example_from_ground_truth(self, question: str, ground_truth: Any) -> dict:
    question = question or ""
    if len(question) >= CELLS and all(c.isdigit() for c in question[:CELLS]):
      puzzle = question[:CELLS]
    else:
      m = re.search(r"Sudoku puzzle: ([0-9]{16})", question) or re.search(r"\b([0-4]{16})\b", question)
      if not m:
        raise ValueError(f"no 16-digit puzzle found in question {question[:80]!r}")
      puzzle = m.group(1)
    _check_grid(puzzle, "puzzle")
    _check_grid(str(ground_truth), "ground_truth (solution)")
    return {"puzzle": puzzle, "solution": str(ground_truth)}
