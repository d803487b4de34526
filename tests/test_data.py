"""Prompt streams: determinism, resume == continue, epochs, group layout; data-file lookup."""

import json

import numpy as np
import pytest

from egspo.tasks import get_task
from egspo.tasks.data import PromptBatch, PromptStream, prompt_stream, read_records, shared_data_file


def _take(stream, n):
  return [stream.next_batch().examples for _ in range(n)]


def test_generator_stream_same_seed_same_data():
  task = get_task("countdown", number_range=(1, 12), target_range=(1, 50))
  a = _take(prompt_stream(task, 4, seed=3), 3)
  b = _take(prompt_stream(task, 4, seed=3), 3)
  c = _take(prompt_stream(task, 4, seed=4), 3)
  assert a == b and a != c


@pytest.mark.parametrize("source", ["generator", "file"])
@pytest.mark.parametrize("k", [0, 1, 3, 5])
def test_resume_from_state_equals_continuing(source, k):
  task = get_task("sudoku")
  src = task.sample_example if source == "generator" else [{"id": i} for i in range(7)]
  full = PromptStream(src, batch_size=3, seed=11)
  for _ in range(k):
    full.next_batch()
  state = json.loads(json.dumps(full.state()))  # JSON round trip
  expected = _take(full, 4)
  resumed = PromptStream.from_state(src, batch_size=3, state=state)
  assert _take(resumed, 4) == expected


def test_file_stream_epochs_are_shuffled_permutations():
  data = [{"id": i} for i in range(10)]
  s = PromptStream(data, batch_size=5, seed=0)
  epochs = [[e["id"] for b in _take(s, 2) for e in b] for _ in range(3)]
  for ep in epochs:
    assert sorted(ep) == list(range(10))
  assert epochs[0] != epochs[1] and epochs[0] != list(range(10))
  assert s.state() == {"seed": 0, "epoch": 2, "index": 10}
  # Batches crossing an epoch boundary take the rest from the next epoch.
  s2 = PromptStream(data, batch_size=4, seed=0)
  ids = [e["id"] for b in _take(s2, 5) for e in b]
  assert ids[:10] == epochs[0] and ids[10:20] == epochs[1]
  assert [e["id"] for b in _take(PromptStream(data, 5, shuffle=False), 1) for e in b] == [0, 1, 2, 3, 4]


def test_groups():
  s = PromptStream([{"id": i} for i in range(5)], batch_size=2, group_size=3, seed=1)
  b = s.next_batch()
  assert isinstance(b, PromptBatch) and len(b) == 6
  assert [e["id"] for e in b.repeated] == [b.examples[0]["id"]] * 3 + [b.examples[1]["id"]] * 3
  np.testing.assert_array_equal(b.group_index, [0, 0, 0, 1, 1, 1])


def test_errors():
  with pytest.raises(ValueError, match="batch_size"):
    PromptStream([{"a": 1}], batch_size=0)
  with pytest.raises(ValueError, match="empty"):
    PromptStream([], batch_size=1)
  with pytest.raises(ValueError, match="lacks"):
    PromptStream([{"a": 1}], batch_size=1, state={"seed": 0})
  with pytest.raises(ValueError, match="outside"):
    PromptStream([{"a": 1}], batch_size=1, state={"seed": 0, "epoch": 0, "index": 5})


def test_shared_data_file_lookup(monkeypatch, tmp_path):
  monkeypatch.setenv("EGSPO_X_FILE", str(tmp_path / "missing.jsonl"))
  with pytest.raises(FileNotFoundError, match="EGSPO_X_FILE"):
    shared_data_file("x.jsonl", "EGSPO_X_FILE")
  monkeypatch.delenv("EGSPO_X_FILE")
  monkeypatch.setenv("EGSPO_DATA_DIR", str(tmp_path))
  (tmp_path / "x.jsonl").write_text("{}\n")
  assert shared_data_file("x.jsonl", "EGSPO_X_FILE") == str(tmp_path / "x.jsonl")
  with pytest.raises(FileNotFoundError, match="EGSPO_DATA_DIR"):
    shared_data_file("nope.jsonl")


def test_read_records_formats(tmp_path):
  rows = [{"a": 1}, {"a": 2}]
  (tmp_path / "r.json").write_text(json.dumps({"data": rows}))
  (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
  assert read_records(tmp_path / "r.json") == rows == read_records(tmp_path / "r.jsonl")
  (tmp_path / "r.txt").write_text("x")
  with pytest.raises(ValueError, match="unsupported"):
    read_records(tmp_path / "r.txt")


@pytest.mark.parametrize("name,example", [
    ("countdown", {"numbers": [3, 5, 7], "target": 22, "solution": "(7-3)*5+2"}),
    ("sudoku", {"puzzle": "3102200002100320", "solution": "3142243142131324"}),
    ("gsm8k", {"question": "Ann has 3 apples — and €2. How many?", "answer": "3", "solution": "3 → 3\n#### 3"}),
    ("math500", {"problem": "Compute $\\frac{1}{2}·2$.", "answer": "1", "solution": None}),
    ("mbpp", {"question": "Write f — a function.", "tests": ["assert f(1) == 1"], "setup": "",
              "entry_point": "f", "solution": "def f(x):\n  return x"}),
])
def test_plain_prompts_fit_the_char_tokenizer(name, example):
  from egspo.tokenizer import CharTokenizer
  task = get_task(name)
  text = task.prompt(example, "plain") + task.eval_prefill("plain") + task.sft_target(example, "plain")
  CharTokenizer().encode(text)  # raises on any character outside printable ASCII + newline
  assert task.prompt(example, "plain").endswith("\n")
  if name in ("countdown", "sudoku", "gsm8k", "math500"):
    assert task.reward(task.sft_target(example, "plain"), example) > 0


def test_registry_and_max_rewards():
  from egspo.tasks import task_names
  assert task_names() == ["copy", "countdown", "gsm8k", "humaneval", "kodcode", "math500", "mbpp",
                          "sudoku"]
  assert {n: get_task(n).max_reward for n in task_names()} == {
      "copy": 1.0, "countdown": 1.0, "gsm8k": 4.0, "humaneval": 1.5, "kodcode": 1.5, "math500": 3.0,
      "mbpp": 1.5, "sudoku": 1.0}
  assert get_task("math").name == "math500" and get_task("GSM8K").name == "gsm8k"
  with pytest.raises(ValueError, match="unknown task"):
    get_task("chess")
