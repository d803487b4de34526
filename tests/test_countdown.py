"""Countdown: safe evaluator, reward, d1 eval metric, generator (checked by an independent
brute-force solver and expression parser written here), data files in every layout and format."""

import itertools
import json
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import SHARED_DATA
from egspo.tasks import get_task
from egspo import config as config_lib
from egspo.tasks import data
from egspo.tasks.countdown import (ExpressionError, countdown_example, countdown_reward,
                                   evaluate_expression, generate_problem, read_jsonl)
from egspo.tokenizer import CharTokenizer


# --- independent helpers (not the module's code) --------------------------------------------

def brute_force_values(numbers):
  """All values of + − × ÷ expression trees using every number exactly once."""
  def rec(vals):
    if len(vals) == 1:
      return {vals[0]}
    out = set()
    for k in range(1, len(vals)):
      for left_idx in itertools.combinations(range(len(vals)), k):
        left = [vals[i] for i in left_idx]
        right = [vals[i] for i in range(len(vals)) if i not in left_idx]
        for a in rec(left):
          for b in rec(right):
            out |= {a + b, a - b, a * b}
            if b != 0:
              out.add(a / b)
    return out
  return rec([Fraction(n) for n in numbers])


def parse_expr(s):
  """Tiny recursive-descent evaluator (integers, + - * /, parens) → (Fraction, literals)."""
  toks = [t for t in __import__("re").findall(r"\d+|[-+*/()]", s)]
  pos = [0]
  lits = []

  def peek():
    return toks[pos[0]] if pos[0] < len(toks) else None

  def eat():
    pos[0] += 1
    return toks[pos[0] - 1]

  def atom():
    t = eat()
    if t == "(":
      v = expr()
      assert eat() == ")"
      return v
    lits.append(int(t))
    return Fraction(int(t))

  def term():
    v = atom()
    while peek() in ("*", "/"):
      v = v * atom() if eat() == "*" else v / atom()
    return v

  def expr():
    v = term()
    while peek() in ("+", "-"):
      v = v + term() if eat() == "+" else v - term()
    return v

  v = expr()
  assert pos[0] == len(toks)
  return v, lits


# --- evaluator ------------------------------------------------------------------------------

@pytest.mark.parametrize("expr,value", [
    ("(7-3)*5+2", 22), ("10/4", Fraction(5, 2)), ("-3+5", 2), ("2*(3+4)", 14),
    ("6/(1-3/4)", 24), (" 1 + 2\n", 3), ("100-93+30", 37), ("+4", 4)])
def test_evaluator_values(expr, value):
  assert evaluate_expression(expr)[0] == value


@pytest.mark.parametrize("expr", [
    "2**3", "7//2", "3.5+1", "1/0", "5/(3-3)", "a+1", "__import__('os')", "1e5", "", "()",
    "3 5", "(3)(5)", "[1]", "1" * 30, "(" * 300 + "1" + ")" * 300, "(" * 250 + "1" + ")" * 250,
    "1+" * 400 + "1", "abs(-3)",
    "2 = 2"])
def test_evaluator_rejects(expr):
  with pytest.raises(ExpressionError):
    evaluate_expression(expr)


def test_evaluator_loose_grammar_is_the_reference_whitelist():
  assert evaluate_expression("2**3", loose=True)[0] == 8
  assert evaluate_expression("7//2", loose=True)[0] == 3
  assert evaluate_expression("1.5*2", loose=True)[0] == 3
  with pytest.raises(ExpressionError):
    evaluate_expression("9**9**9", loose=True)  # guarded, not a hang


# --- reward ---------------------------------------------------------------------------------

NUMS, TARGET = [2, 3, 4], 5


@pytest.mark.parametrize("completion,reward", [
    ("<reasoning>\n2*4=8, 8-3=5\n</reasoning>\n<answer>\n2*4-3\n</answer>", 1.0),
    ("<answer>2*4-3</answer>", 1.0),
    ("<answer>(4*2)-3</answer>", 1.0),
    ("<answer>2+3+4</answer>", 0.1),        # wrong value
    ("<answer>2*4-3+0</answer>", 0.1),      # extra number
    ("<answer>4+1</answer>", 0.1),          # wrong numbers
    ("<answer>2*4-3-3+3</answer>", 0.1),    # number reused
    ("<answer>2*4-3=5</answer>", 0.1),      # equation, not an expression
    ("<answer>two times four minus 3</answer>", 0.1),
    ("<answer></answer>", 0.1),
    ("2*4-3", 0.0),                          # no tags
    ("<answer>2*4-3", 0.0),                  # unclosed
    ("<reasoning>\nmany\nlines\n</reasoning>", 0.0),
    ("<answer>1+1</answer> wait <answer>\n4*2-3\n</answer>", 1.0),  # last answer counts
])
def test_countdown_reward_cases(completion, reward):
  task = get_task("countdown")
  assert task.reward(completion, {"numbers": NUMS, "target": TARGET}) == pytest.approx(reward)


def test_countdown_reward_exact_rationals():
  # 6/(1-3/4) = 24 exactly; a float evaluation would also pass, an integer one would not.
  assert countdown_reward("<answer>6/(1-3/4)</answer>", [6, 1, 3, 4], 24) == 1.0
  assert countdown_reward("<answer>6/(1-3/4)</answer>", [6, 1, 3, 4], 23) == 0.1


def test_countdown_reference_flag_restores_reference_grammar():
  ref = get_task("countdown", reference_rewards=True)
  fixed = get_task("countdown")
  ex = {"numbers": [2, 2, 1], "target": 5}
  assert ref.reward("<answer>2**2+1</answer>", ex) == 1.0     # Python eval semantics
  assert fixed.reward("<answer>2**2+1</answer>", ex) == 0.1   # only + - * / allowed
  ex2 = {"numbers": [3, 0, 2], "target": 5}
  assert ref.reward("<answer>3.0+2</answer>", ex2) == 1.0     # digit runs are "numbers"
  assert fixed.reward("<answer>3.0+2</answer>", ex2) == 0.1


def test_countdown_d1_eval_metric():
  task = get_task("countdown")
  ex = {"numbers": NUMS, "target": TARGET}
  assert task.score("<reasoning>\nx\n</reasoning>\n<answer>\n\\boxed{2*4-3}\n</answer>", ex)["correct"]
  assert task.score("<answer>\\boxed{4 \\times 2 - 3}</answer>", ex)["correct"]
  assert task.score("\\boxed{2*4-3 = 5}", ex)["correct"]
  assert not task.score("\\boxed{2*4+3}", ex)["correct"]
  assert task.score("<answer>2*4-3</answer>", ex)["correct"]
  # d1 itself takes the whole text when nothing is boxed:
  assert not get_task("countdown", reference_rewards=True).score("<answer>2*4-3</answer>", ex)["correct"]


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_countdown_never_raises_on_text(text):
  task = get_task("countdown")
  ex = {"numbers": NUMS, "target": TARGET}
  assert task.reward(text, ex) in (0.0, 0.1, 1.0)
  assert get_task("countdown", reference_rewards=True).reward(text, ex) in (0.0, 0.1, 1.0)
  assert isinstance(task.score(text, ex)["correct"], bool)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789+-*/(). \n", max_size=80))
def test_evaluator_only_raises_expression_error(expr):
  for loose in (False, True):
    try:
      value, _ = evaluate_expression(expr, loose=loose)
      assert isinstance(value, Fraction)
    except ExpressionError:
      pass
  countdown_reward(f"<answer>{expr}</answer>", NUMS, TARGET)


# --- generator ------------------------------------------------------------------------------

def test_generator_problems_are_solvable_and_solutions_correct():
  task = get_task("countdown", num_numbers=(3, 4), number_range=(1, 12), target_range=(1, 150))
  seen_sizes = set()
  for k in range(150):
    ex = task.sample_example(np.random.default_rng([7, k]))
    nums, target = ex["numbers"], ex["target"]
    seen_sizes.add(len(nums))
    assert all(1 <= n <= 12 for n in nums) and 1 <= target <= 150
    assert Fraction(target) in brute_force_values(nums)
    value, lits = parse_expr(ex["solution"])
    assert value == target and sorted(lits) == sorted(nums)
    assert task.reward(task.sft_target(ex, "plain"), ex) == 1.0
    assert task.reward(task.sft_target(ex, "chat"), ex) == 1.0
  assert seen_sizes == {3, 4}


def test_default_generator_matches_the_test_ranges():
  """Numbers and targets in 1..100, as the test set and Countdown-Tasks-3to4; the tiny run keeps
  its own small ranges."""
  task = get_task("countdown")
  exs = [task.sample_example(np.random.default_rng([5, k])) for k in range(400)]
  nums = [n for e in exs for n in e["numbers"]]
  assert all(len(e["numbers"]) == 3 for e in exs)
  assert min(nums) >= 1 and max(nums) == 100 and all(1 <= e["target"] <= 100 for e in exs)
  for ex in exs[:50]:
    assert task.reward(task.sft_target(ex, "chat"), ex) == 1.0
  tiny = config_lib.base_config("countdown", "tiny").task.options
  assert (tuple(tiny.number_range), tuple(tiny.target_range)) == ((1, 12), (1, 150))


def test_generator_same_seed_same_data():
  a = [generate_problem(np.random.default_rng(s)) for s in range(20)]
  b = [generate_problem(np.random.default_rng(s)) for s in range(20)]
  c = [generate_problem(np.random.default_rng(s + 100)) for s in range(20)]
  assert a == b and a != c


def test_generator_bad_ranges():
  with pytest.raises(ValueError, match="num_numbers"):
    generate_problem(np.random.default_rng(0), num_numbers=1)
  with pytest.raises(ValueError, match="no solvable"):
    generate_problem(np.random.default_rng(0), number_range=(1, 1), target_range=(50, 60), max_tries=5)


# --- data files and prompts -----------------------------------------------------------------

def test_read_shared_jsonl_and_all_solvable():
  path = SHARED_DATA / "countdown_cd3_test.jsonl"
  if not path.is_file():
    pytest.skip("shared data not present")
  exs = read_jsonl(path)
  assert len(exs) == 256
  assert exs[0] == {"numbers": [30, 100, 93], "target": 23, "solution": None}
  assert sum(Fraction(e["target"]) in brute_force_values(e["numbers"]) for e in exs) == 256


def test_read_jsonl_errors(tmp_path):
  p = tmp_path / "bad.jsonl"
  p.write_text(json.dumps({"input": "1,2", "output": "x"}) + "\n")
  with pytest.raises(ValueError, match="bad.jsonl: record 0"):
    read_jsonl(p)
  p.write_text(json.dumps({"question": "?"}) + "\n")
  with pytest.raises(ValueError, match="not a Countdown record"):
    get_task("countdown").load_examples("test", path=str(p))


# The release's training rows (Jiayi-Pan/Countdown-Tasks-3to4: nums, target) and the test set's
# rows (input, output), written in each file format the readers take.
def _hf_rows(n):
  rng = np.random.default_rng(0)
  rows = []
  for i in range(n):
    nums = [int(x) for x in rng.integers(1, 101, size=3 if i % 4 else 4)]
    rows.append({"target": int(sum(nums)), "nums": nums})
  return rows


def _write(rows, path):
  fmt = path.suffix
  if fmt == ".jsonl":
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  elif fmt == ".json":
    path.write_text(json.dumps(rows))
  elif fmt == ".parquet":
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path)
  else:  # .csv as pandas writes a list column: "[1, 2, 3]"
    path.write_text(",".join(rows[0]) + "\n" + "".join(
        ",".join(f'"{v}"' for v in r.values()) + "\n" for r in rows))
  return str(path)


@pytest.mark.parametrize("fmt", [".jsonl", ".json", ".parquet", ".csv"])
def test_training_file_in_the_release_layout(tmp_path, fmt):
  """3-number rows only, shuffled with seed 42, the last 500 held out (the release's split)."""
  rows = _hf_rows(800)
  path = _write(rows, tmp_path / f"countdown_train{fmt}")
  task = get_task("countdown")
  exs = task.load_examples("train", path=path)
  three = [{"numbers": r["nums"], "target": r["target"], "solution": None} for r in rows
           if len(r["nums"]) == 3]
  keep, _ = data.hf_shuffle_holdout(len(three), 500, 42)
  assert exs == [three[i] for i in keep] and len(exs) == len(three) - 500
  assert all(task.reward(f"<answer>{'+'.join(map(str, e['numbers']))}</answer>", e) == 1.0
             for e in exs)
  assert len(get_task("countdown", train_holdout=0).load_examples("train", path=path)) == len(three)
  with pytest.raises(ValueError, match="train_holdout"):
    task.load_examples("train", path=_write(rows[:100], tmp_path / f"small{fmt}"))


@pytest.mark.parametrize("fmt", [".jsonl", ".parquet", ".csv"])
def test_test_file_layout_in_every_format(tmp_path, fmt):
  rows = [{"input": "30,100,93", "output": "23"}, {"input": "83,18,75", "output": "10"}]
  exs = get_task("countdown").load_examples("test", path=_write(rows, tmp_path / f"t{fmt}"))
  assert exs == [{"numbers": [30, 100, 93], "target": 23, "solution": None},
                 {"numbers": [83, 18, 75], "target": 10, "solution": None}]


def test_countdown_example_layouts():
  want = {"numbers": [1, 2, 3], "target": 6, "solution": None}
  assert countdown_example({"input": "1,2,3", "output": "6"}) == want
  assert countdown_example({"nums": [1, 2, 3], "target": 6}) == want
  assert countdown_example({"nums": "[1 2 3]", "target": "6"}) == want
  assert countdown_example({"numbers": [1, 2, 3], "target": 6, "solution": "1+2+3"})["solution"]
  with pytest.raises(ValueError, match="not a Countdown record"):
    countdown_example({"nums": [], "target": 1})


def test_prompts():
  task = get_task("countdown")
  ex = {"numbers": [3, 5, 7], "target": 22, "solution": "(7-3)*5+2"}
  plain = task.prompt(ex, "plain")
  assert plain == "Numbers: 3,5,7 Target: 22\n"
  CharTokenizer().encode(plain + task.sft_target(ex, "plain"))  # encodable by the tiny tokenizer
  chat = task.prompt(ex, "chat")
  assert "[3, 5, 7]" in chat and "exactly 22" in chat and "<answer>" in chat
  assert "\\boxed{" in task.prompt(ex, "chat", "eval") and "Target: 22" in task.prompt(ex, "chat", "eval")
  assert task.eval_prefill("chat") == "<reasoning>" and task.eval_prefill("plain") == ""
  with pytest.raises(ValueError, match="style"):
    task.prompt(ex, "fancy")
  with pytest.raises(ValueError, match="no solution"):
    task.sft_target({"numbers": [1, 1], "target": 50, "solution": None})
  row = {"numbers": [6, 4, 9], "target": 15, "solution": None}  # a file row: solution searched
  assert task.reward(task.sft_target(row, "chat"), row) == 1.0
