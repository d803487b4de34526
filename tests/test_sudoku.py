"""Sudoku 4×4: solver, generators (the test set's distribution; unique solutions), checked against
an independent enumeration of all 288 grids, reward, d1 eval metric, data files in every format,
the release's training split, d1's seed-42 subsample."""

import collections
import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import SHARED_DATA
from egspo.tasks import data, get_task
from egspo.tasks.sudoku import (count_solutions, d1_eval_answer, d1_eval_subsample,
                                generate_puzzle, is_valid_solution, read_csv, solve, sudoku_example,
                                sudoku_reward)
from egspo.tokenizer import CharTokenizer


def all_grids():
  """Every valid 4×4 Sudoku grid, by brute force over row permutations (independent of the
  module's backtracking solver)."""
  perms = ["".join(p) for p in itertools.permutations("1234")]
  grids = []
  for rows in itertools.product(perms, repeat=4):
    cols_ok = all(len({r[c] for r in rows}) == 4 for c in range(4))
    boxes_ok = all(len({rows[br + i][bc + j] for i in range(2) for j in range(2)}) == 4
                   for br in (0, 2) for bc in (0, 2))
    if cols_ok and boxes_ok:
      grids.append("".join(rows))
  return grids


GRIDS = all_grids()


def completions_of(puzzle):
  return [g for g in GRIDS if all(p == "0" or p == c for p, c in zip(puzzle, g))]


def test_there_are_288_grids_and_the_solver_counts_them():
  assert len(GRIDS) == 288
  assert count_solutions("0" * 16, limit=1000) == 288
  assert all(is_valid_solution(g) for g in GRIDS[:50])
  assert count_solutions(GRIDS[0]) == 1
  assert count_solutions("1100" + "0" * 12) == 0  # conflicting givens


def test_solver_on_examples():
  p = "3102200002100320"
  assert solve(p) == "3142243142131324" == completions_of(p)[0]
  assert solve("0" * 16) is None
  with pytest.raises(ValueError, match="16-character"):
    count_solutions("123")


def test_default_generator_is_the_test_distribution():
  """8 empty cells, uniformly placed, several completions allowed (the stored solution is one of
  them); a sizeable fraction is ambiguous, as in the test set (24.8%)."""
  task = get_task("sudoku")
  counts, cells = collections.Counter(), np.zeros(16)
  for k in range(600):
    ex = task.sample_example(np.random.default_rng([4, k]))
    assert ex["puzzle"].count("0") == 8 and is_valid_solution(ex["solution"])
    comps = completions_of(ex["puzzle"])
    assert ex["solution"] in comps
    counts[len(comps)] += 1
    cells += [c == "0" for c in ex["puzzle"]]
    assert task.reward(task.sft_target(ex, "plain"), ex) == 1.0
  ambiguous = sum(v for n, v in counts.items() if n > 1) / 600
  assert 0.12 < ambiguous < 0.30, counts
  assert cells.min() > 0.4 * 600 and cells.max() < 0.6 * 600  # every cell ~half the time


def test_generator_unique_solutions():
  empties = []
  for k in range(120):
    ex = generate_puzzle(np.random.default_rng([3, k]), (6, 12), unique=True)
    assert completions_of(ex["puzzle"]) == [ex["solution"]]
    assert is_valid_solution(ex["solution"])
    n = ex["puzzle"].count("0")
    assert 1 <= n <= 12
    empties.append(n)
  assert max(empties) >= 10 and min(empties) <= 8  # the range is used, not one size


def test_generator_same_seed_same_data():
  a = [generate_puzzle(np.random.default_rng(s)) for s in range(10)]
  assert a == [generate_puzzle(np.random.default_rng(s)) for s in range(10)]
  assert a != [generate_puzzle(np.random.default_rng(s + 50)) for s in range(10)]


# --- reward ---------------------------------------------------------------------------------

EX = {"puzzle": "3102200002100320", "solution": "3142243142131324"}  # 8 empty cells


@pytest.mark.parametrize("completion,reward", [
    ("<reasoning>\nrow 1 needs 4\n</reasoning>\n<answer>\n3142243142131324\n</answer>", 1.0),
    ("<answer>3142 2431\n4213 1324</answer>", 1.0),              # separators ignored
    ("<answer>3142243142131324999</answer>", 1.0),              # truncated to 16
    ("<answer>3142</answer>", 1 / 8),                            # padded with 0: only cell 2
    ("<answer>3102200002100320</answer>", 0.0),                  # the puzzle itself
    ("<answer>3112213142131324</answer>", 6 / 8),                # two empty cells wrong
    ("<answer>[3142243142131324]</answer>", 1.0),
    ("3142243142131324", 0.0),                                    # no tags
    ("<answer>3142243142131324", 0.0),                            # unclosed
    ("<answer>1</answer> <answer>3142243142131324</answer>", 1.0),  # last answer counts
])
def test_sudoku_reward_cases(completion, reward):
  assert get_task("sudoku").reward(completion, EX) == pytest.approx(reward)


def test_sudoku_reward_unicode_digit_defect():
  # '²' is str.isdigit(): the reference keeps it (shifting later digits), the fix drops it.
  text = "<answer>²3142243142131324</answer>"
  assert sudoku_reward(text, EX["puzzle"], EX["solution"]) == 1.0
  assert sudoku_reward(text, EX["puzzle"], EX["solution"], reference=True) < 1.0


def test_sudoku_d1_metric_and_aggregate():
  task = get_task("sudoku")
  s1 = task.score("<answer>\n3142243142131324\n</answer>", EX)
  s2 = task.score("<answer>\n3112213142131324<|eot_id|>", EX)  # d1 accepts eot instead of tag
  s3 = task.score("no answer at all", EX)
  assert (s1["correct"], s1["correct_cells"], s1["empty_cells"]) == (True, 8, 8)
  assert (s2["correct"], s2["correct_cells"]) == (False, 6)
  assert (s3["correct"], s3["correct_cells"]) == (False, 0)
  agg = task.aggregate([s1, s2, s3])
  assert agg["accuracy"] == pytest.approx(1 / 3)
  assert agg["cell_accuracy"] == pytest.approx(14 / 24)
  assert d1_eval_answer("so the grid is 3142243142131324 done") == "3142243142131324"


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_sudoku_never_raises(text):
  task = get_task("sudoku")
  r = task.reward(text, EX)
  assert 0.0 <= r <= 1.0
  assert 0.0 <= get_task("sudoku", reference_rewards=True).reward(text, EX) <= 1.0
  assert 0 <= task.score(text, EX)["cell_accuracy"] <= 1.0


# --- data -----------------------------------------------------------------------------------

def test_shared_csv_and_d1_subsample():
  path = SHARED_DATA / "sudoku_4x4_test.csv"
  if not path.is_file():
    pytest.skip("shared data not present")
  rows = read_csv(path)
  assert len(rows) == 500
  assert rows[0] == {"puzzle": "3102200002100320", "solution": "3142243142131324"}
  # Every given solution completes its puzzle; the solver's counts match brute force. The d1 test
  # set is not uniquely solvable everywhere: 124 of 500 puzzles have several solutions (rewards
  # compare with the listed one, as in d1).
  counts = [len(completions_of(r["puzzle"])) for r in rows]
  assert all(r["solution"] in completions_of(r["puzzle"]) for r in rows)
  assert [count_solutions(r["puzzle"], 1000) for r in rows] == counts
  assert sum(c > 1 for c in counts) == 124
  idx = d1_eval_subsample(500)
  assert len(set(idx.tolist())) == 256 and idx.max() < 500
  np.testing.assert_array_equal(idx, np.random.RandomState(42).choice(500, 256, replace=False))
  ev = get_task("sudoku").load_examples(path=str(path))
  assert ev == [rows[i] for i in idx]


def test_read_csv_errors(tmp_path):
  p = tmp_path / "s.csv"
  p.write_text("Puzzle,Solution\n12,34\n")
  with pytest.raises(ValueError, match="s.csv:2"):
    read_csv(p)
  p.write_text("a,b\n")
  with pytest.raises(ValueError, match="Puzzle,Solution"):
    read_csv(p)
  p.write_text("a,b\n1,2\n")
  with pytest.raises(ValueError, match="Puzzle,Solution"):
    read_csv(p)


def _write(rows, path):
  fmt = path.suffix
  if fmt == ".csv":  # the release's 4x4_sudoku_unique_puzzles.csv layout
    path.write_text("Puzzle,Solution\n" + "".join(f"{r['Puzzle']},{r['Solution']}\n" for r in rows))
  elif fmt == ".jsonl":
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  elif fmt == ".json":
    path.write_text(json.dumps({"data": rows}))
  else:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path)
  return str(path)


def _release_rows(n):
  rows = []
  for k in range(n):
    ex = generate_puzzle(np.random.default_rng([9, k]), (4, 10), unique=True)
    rows.append({"Puzzle": ex["puzzle"], "Solution": ex["solution"]})
  return rows


@pytest.mark.parametrize("fmt", [".csv", ".jsonl", ".json", ".parquet"])
def test_training_file_is_the_release_split(tmp_path, fmt):
  """Shuffled with seed 42, the last 500 held out, as the release trains on its csv."""
  rows = _release_rows(540)
  path = _write(rows, tmp_path / f"4x4_sudoku_unique_puzzles{fmt}")
  task = get_task("sudoku")
  exs = task.load_examples("train", path=path)
  keep, _ = data.hf_shuffle_holdout(540, 500, 42)
  assert exs == [{"puzzle": rows[i]["Puzzle"], "solution": rows[i]["Solution"]} for i in keep]
  assert all(task.reward(task.sft_target(e, "chat"), e) == 1.0 for e in exs)
  assert len(get_task("sudoku", train_holdout=0).load_examples("train", path=path)) == 540
  # The same file as an evaluation file: every row (below d1's 256 no subsample is drawn).
  assert len(get_task("sudoku").load_examples("test", path=_write(rows[:40], tmp_path / f"t{fmt}"))) == 40


def test_numeric_columns_get_their_leading_zeros_back():
  assert sudoku_example({"puzzle": 102200002100320, "solution": "3142243142131324"}) == {
      "puzzle": "0102200002100320", "solution": "3142243142131324"}
  with pytest.raises(ValueError, match="16-character"):
    sudoku_example({"Puzzle": "12", "Solution": "3142243142131324"})


def test_prompts_and_sft_target():
  task = get_task("sudoku")
  assert task.prompt(EX, "plain") == "Sudoku: 3102200002100320\n"
  CharTokenizer().encode(task.prompt(EX, "plain") + task.sft_target(EX, "plain"))
  assert "Solve the following Sudoku puzzle: 3102200002100320" in task.prompt(EX, "chat")
  assert task.reward(task.sft_target(EX, "plain"), EX) == 1.0
  assert task.reward(task.sft_target(EX, "chat"), EX) == 1.0
