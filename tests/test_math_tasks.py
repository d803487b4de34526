"""GSM8K and MATH500: reward terms on hand-computed completions, the DOTALL / backspace defects,
d1 eval parsing, equivalence, readers of the HF formats from files written here, fuzzing."""

import json

import pytest
from hypothesis import given, settings, strategies as st

from egspo.tasks import get_task, last_boxed
from egspo.tasks.gsm8k import count_xml, d1_eval_number, gsm8k_reward_terms, to_number
from egspo.tasks.math500 import boxed_format_score, is_equivalent, normalize_answer

GOOD = "<reasoning>\nstep 1\nstep 2\n</reasoning>\n<answer>\n72\n</answer>\n"


# --- GSM8K ----------------------------------------------------------------------------------

def test_gsm8k_terms_perfect_completion():
  terms = gsm8k_reward_terms(GOOD, "72")
  # xmlcount: 4 × 0.125, nothing after "\n</answer>\n" and exactly 1 char ("\n") after "\n</answer>".
  assert terms == {"xmlcount": 0.5, "soft": 0.5, "strict": 0.5, "integer": 0.5, "correct": 2.0}
  assert get_task("gsm8k").reward(GOOD, {"answer": "72"}) == 4.0


def test_gsm8k_dotall_defect():
  # Multi-line reasoning: the reference patterns (no DOTALL) fail soft and strict.
  ref = gsm8k_reward_terms(GOOD, "72", reference=True)
  assert ref["soft"] == 0.0 and ref["strict"] == 0.0
  single = "<reasoning>\none line\n</reasoning>\n<answer>\n72\n</answer>\n"
  assert gsm8k_reward_terms(single, "72", reference=True)["strict"] == 0.5


def test_gsm8k_xmlcount_penalises_trailing_text():
  text = GOOD + "extra"  # 5 chars after "\n</answer>\n", 6 after "\n</answer>"
  assert count_xml(text) == pytest.approx(0.5 - 5 * 0.001 - 5 * 0.001)
  assert count_xml("no tags") == 0.0


@pytest.mark.parametrize("completion,answer,correct,integer", [
    ("<answer>72</answer>", "72", 2.0, 0.5),
    ("<answer>\n1,000\n</answer>", "1000", 2.0, 0.0),
    ("<answer>$5</answer>", "5", 2.0, 0.0),
    ("<answer>72.0</answer>", "72", 2.0, 0.0),
    ("<answer>71</answer>", "72", 0.0, 0.5),
    ("<answer>seventy-two</answer>", "72", 0.0, 0.0),
    ("72", "72", 2.0, 0.5),  # no tag: the whole text is the extracted answer (reference rule)
])
def test_gsm8k_correctness_terms(completion, answer, correct, integer):
  t = gsm8k_reward_terms(completion, answer)
  assert (t["correct"], t["integer"]) == (correct, integer)


def test_gsm8k_reference_string_equality():
  assert gsm8k_reward_terms("<answer>1,000</answer>", "1000", reference=True)["correct"] == 0.0
  assert to_number("1,000") == 1000 and to_number("5.") == 5 and to_number("abc") is None


def test_gsm8k_d1_eval_metric():
  task = get_task("gsm8k")
  ex = {"question": "q", "answer": "18"}
  assert task.score("<answer>\\boxed{18}</answer>", ex)["correct"]
  assert task.score("so \\boxed{\\$18.00}", ex)["correct"]
  assert task.score("<answer>The answer is 18 dollars</answer>", ex)["correct"]
  assert not task.score("<answer>17</answer>", ex)["correct"]
  assert d1_eval_number("\\boxed{...} then \\boxed{1,234}") == 1234.0
  assert d1_eval_number("nothing") is None


def test_gsm8k_reader_jsonl_and_parquet(tmp_path):
  rows = [{"question": "2+2?", "answer": "Add.\n#### 4"}, {"question": "3*3?", "answer": "Mul.\n#### 9"}]
  p = tmp_path / "gsm8k_test.jsonl"
  p.write_text("\n".join(json.dumps(r) for r in rows))
  task = get_task("gsm8k")
  exs = task.load_examples(path=str(p))
  assert [e["answer"] for e in exs] == ["4", "9"] and exs[0]["question"] == "2+2?"
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "g.parquet")
  assert task.load_examples(path=str(tmp_path / "g.parquet")) == exs
  assert task.reward(task.sft_target(exs[0], "chat"), exs[0]) == 4.0


def test_offline_without_file_is_a_clear_error(monkeypatch, tmp_path):
  monkeypatch.setenv("EGSPO_OFFLINE", "1")
  monkeypatch.delenv("EGSPO_GSM8K_FILE", raising=False)
  monkeypatch.setenv("EGSPO_DATA_DIR", str(tmp_path))
  for name, var in (("gsm8k", "EGSPO_GSM8K_FILE"), ("math500", "EGSPO_MATH500_FILE"),
                    ("mbpp", "EGSPO_MBPP_FILE")):
    with pytest.raises(FileNotFoundError, match=var) as e:
      get_task(name).load_examples("test")
    assert "data_path=" in str(e.value) and "EGSPO_DATA_DIR" in str(e.value)
  monkeypatch.setenv("EGSPO_DATA_DIR", str(tmp_path))
  (tmp_path / "gsm8k_train.jsonl").write_text(json.dumps({"question": "q", "answer": "#### 1"}))
  assert get_task("gsm8k").load_examples("train")[0]["answer"] == "1"


# --- MATH500 --------------------------------------------------------------------------------

@pytest.mark.parametrize("text,boxed", [
    ("x \\boxed{5} y", "5"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("first \\boxed{1} then \\boxed{\\sqrt{2}+{3}}", "\\sqrt{2}+{3}"),
    ("\\boxed 7$", "7"),
    ("\\fbox{9}", "9"),
    ("\\boxed{1} and unclosed \\boxed{2", "1"),
    ("nothing", None),
])
def test_last_boxed(text, boxed):
  assert last_boxed(text) == boxed


@pytest.mark.parametrize("a,b,eq", [
    ("\\frac{1}{2}", "0.5", True), ("\\dfrac{1}{2}", "\\frac12", True), ("x = 3", "3", True),
    ("10\\%", "10", True), ("\\text{(A)}", "(A)", True), ("2\\sqrt{2}", "\\sqrt{8}", True),
    ("3", "4", False), ("", "", False), (None, "1", False)])
def test_math_equivalence(a, b, eq):
  assert is_equivalent(a, b) is eq


def test_math_reward_and_backspace_defect():
  task, ref = get_task("math500"), get_task("math500", reference_rewards=True)
  ex = {"problem": "p", "answer": "\\frac{1}{2}"}
  good = "<reasoning>\nhalf\n</reasoning>\n<answer>\n\\boxed{\\frac{1}{2}}\n</answer>"
  assert task.reward(good, ex) == 2.0 + 0.5 * 2.0
  assert ref.reward(good, ex) == 2.0 + 0.5 * 1.5  # "\boxed" (backspace) never found
  assert "\boxed" == "\x08oxed"
  assert task.reward("<answer>1/2</answer>", ex) == 0.5 * 1.5  # no box: not graded correct
  assert ref.reward("1/2", ex) == 2.0 + 0.5 * 0.5  # reference compares the whole text
  assert boxed_format_score("\\boxed{1}") == 1.0 and boxed_format_score("none") == 0.5
  assert task.score("<answer>1/2</answer>", ex)["correct"]  # eval falls back to the answer tag


def test_math_reader(tmp_path):
  rows = [{"problem": "1+1?", "solution": "It is $\\boxed{2}$.", "answer": "2"},
          {"problem": "2+2?", "solution": "So \\boxed{\\frac{8}{2}}."}]
  p = tmp_path / "m.jsonl"
  p.write_text("\n".join(json.dumps(r) for r in rows))
  exs = get_task("math500").load_examples(path=str(p))
  assert [e["answer"] for e in exs] == ["2", "\\frac{8}{2}"]
  assert get_task("math500").reward(get_task("math500").sft_target(exs[1], "chat"), exs[1]) == 3.0
  assert normalize_answer(" \\left( 1 \\right) ") == "(1)"


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_math_tasks_never_raise(text):
  g, m = get_task("gsm8k"), get_task("math500", use_cas=False)
  assert 0.0 <= g.reward(text, {"answer": "72"}) <= 4.0
  assert 0.0 <= get_task("gsm8k", reference_rewards=True).reward(text, {"answer": "72"}) <= 4.0
  assert 0.0 <= m.reward(text, {"answer": "\\frac{1}{2}"}) <= 3.0
  g.score(text, {"answer": "72"})
  m.score(text, {"answer": "2"})
  ref_g, ref_m = get_task("gsm8k", reference_rewards=True), get_task("math500", reference_rewards=True)
  assert 0.0 <= ref_m.reward(text, {"answer": "2", "solution": text}) <= 3.0
  assert isinstance(ref_m.score(text, {"answer": text})["correct"], bool)
  assert isinstance(ref_g.score(text, {"answer": "72"})["correct"], bool)
  last_boxed(text)


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet="\\boxed{}frac12+-=x$() ", max_size=40))
def test_math_verify_path_never_raises(text):
  assert isinstance(is_equivalent(text, "\\frac{1}{2}"), bool)


def test_explosive_expressions_skip_the_cas_in_any_thread():
  import threading
  import time
  from egspo.tasks.math500 import cas_safe
  bombs = ["9^{9^{9^{9}}}", "2^{2^{100}}", "(10^{10^{10}})!", "10!!!!", "3**3**3", "2^{1000}"]
  assert not any(cas_safe(b) for b in bombs)
  assert cas_safe("x^2+2x+1") and cas_safe("5!") and cas_safe("2^{10}")
  out = []
  t0 = time.monotonic()
  th = threading.Thread(target=lambda: out.extend(is_equivalent(b, "1") for b in bombs))
  th.start()
  th.join(timeout=30)
  assert not th.is_alive() and out == [False] * len(bombs)
  assert time.monotonic() - t0 < 5
  assert is_equivalent("2^{10}", "1024") and is_equivalent("(x+1)^2", "x^2+2x+1")
