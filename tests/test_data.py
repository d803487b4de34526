"""Prompt streams: determinism, resume == continue, epochs, group layout; data-file lookup."""

import json
import sys

import numpy as np
import pytest

from egspo.tasks import get_task
from egspo.tasks import data
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
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "r.parquet")
  assert read_records(tmp_path / "r.parquet") == rows
  (tmp_path / "r.csv").write_text("Puzzle,Solution\n0120,3124\n")
  assert read_records(tmp_path / "r.csv") == [{"Puzzle": "0120", "Solution": "3124"}]  # strings
  (tmp_path / "r.txt").write_text("x")
  with pytest.raises(ValueError, match="unsupported"):
    read_records(tmp_path / "r.txt")
  (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n')
  with pytest.raises(ValueError, match="bad.jsonl:2"):
    read_records(tmp_path / "bad.jsonl")


def test_split_files_from_the_environment(monkeypatch, tmp_path):
  """A split's own variable wins; the generic $EGSPO_X_FILE names the test file only, so a test
  file never becomes a training file through the environment."""
  for var in ("EGSPO_DATA_DIR", "EGSPO_X_FILE", "EGSPO_X_TRAIN_FILE", "EGSPO_X_TEST_FILE"):
    monkeypatch.delenv(var, raising=False)
  train, test, generic = (tmp_path / f"{n}.jsonl" for n in ("train", "test", "generic"))
  for p in (train, test, generic):
    p.write_text(json.dumps({"f": p.stem}) + "\n")
  assert data.split_env_var("EGSPO_GSM8K_FILE", "train") == "EGSPO_GSM8K_TRAIN_FILE"
  monkeypatch.setenv("EGSPO_X_FILE", str(generic))
  assert data.find_split_file("x", "test", "EGSPO_X_FILE") == str(generic)
  assert data.find_split_file("x", "train", "EGSPO_X_FILE") is None
  with pytest.raises(FileNotFoundError, match=r"EGSPO_X_TRAIN_FILE.*names the test file only"):
    data.load_hf_records("x", "train", env_var="EGSPO_X_FILE")
  monkeypatch.setenv("EGSPO_X_TRAIN_FILE", str(train))
  monkeypatch.setenv("EGSPO_X_TEST_FILE", str(test))
  assert data.load_hf_records("x", "train", env_var="EGSPO_X_FILE") == [{"f": "train"}]
  assert data.load_hf_records("x", "test", env_var="EGSPO_X_FILE") == [{"f": "test"}]
  monkeypatch.setenv("EGSPO_X_TRAIN_FILE", str(tmp_path / "missing.jsonl"))
  with pytest.raises(FileNotFoundError, match="EGSPO_X_TRAIN_FILE"):
    data.find_split_file("x", "train", "EGSPO_X_FILE")
  # One directory holding the split files.
  for var in ("EGSPO_X_FILE", "EGSPO_X_TRAIN_FILE", "EGSPO_X_TEST_FILE"):
    monkeypatch.delenv(var)
  monkeypatch.setenv("EGSPO_DATA_DIR", str(tmp_path))
  (tmp_path / "x_train.csv").write_text("f\ncsv\n")
  assert data.load_hf_records("x", "train") == [{"f": "csv"}]


def test_hub_download_without_datasets_says_which_extra(monkeypatch):
  """Online with no local file and no `datasets` package: one error naming the extra."""
  for var in ("EGSPO_DATA_DIR", "EGSPO_X_FILE", "EGSPO_X_TEST_FILE"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(data, "_online", lambda: True)
  monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets → ImportError
  with pytest.raises(FileNotFoundError,
                     match=r"needs the `datasets` package \(pip install -e \"\.\[datasets\]\"\)"):
    data.load_hf_records("x", "test", hf_id="org/x", env_var="EGSPO_X_FILE")


def test_gsm8k_splits_never_share_the_generic_variable(monkeypatch, tmp_path):
  monkeypatch.setenv("EGSPO_OFFLINE", "1")
  monkeypatch.setenv("EGSPO_DATA_DIR", str(tmp_path / "empty"))
  monkeypatch.delenv("EGSPO_GSM8K_TRAIN_FILE", raising=False)
  monkeypatch.delenv("EGSPO_GSM8K_TEST_FILE", raising=False)
  test = tmp_path / "test.jsonl"
  test.write_text(json.dumps({"question": "1+1?", "answer": "One and one.\n#### 2"}) + "\n")
  monkeypatch.setenv("EGSPO_GSM8K_FILE", str(test))
  task = get_task("gsm8k")
  assert task.load_examples("test")[0]["answer"] == "2"
  with pytest.raises(FileNotFoundError, match="EGSPO_GSM8K_TRAIN_FILE"):
    task.load_examples("train")


# Produced by `datasets` 5.2.0 on a 20-row Dataset: train_test_split(test_size=0.1, seed=42) and
# shuffle(seed=42) (hf_train_test_split / hf_shuffle_holdout were also checked equal to it for
# n = 37, 1000, 10000).
_HF_SPLIT_20 = ([14, 7, 12, 10, 6, 19, 3, 0, 16, 5, 11, 18, 2, 4, 17, 1, 13, 8], [15, 9])
_HF_SHUFFLE_20 = [15, 9, 14, 7, 12, 10, 6, 19, 3, 0, 16, 5, 11, 18, 2, 4, 17, 1, 13, 8]


def test_release_splits_equal_the_datasets_library():
  train, test = data.hf_train_test_split(20, 0.1, 42)
  assert (train.tolist(), test.tolist()) == _HF_SPLIT_20
  keep, held = data.hf_shuffle_holdout(20, 5, 42)
  assert keep.tolist() + held.tolist() == _HF_SHUFFLE_20 and len(held) == 5
  for n in (11, 101, 10000):  # ceil(0.1 n) test rows, a partition of all rows
    train, test = data.hf_train_test_split(n)
    assert len(test) == -(-n // 10) and sorted(train.tolist() + test.tolist()) == list(range(n))
  with pytest.raises(ValueError, match="train_holdout"):
    data.hf_shuffle_holdout(10, 500)
  with pytest.raises(ValueError, match="test_size"):
    data.hf_train_test_split(10, 1.5)


def test_release_splits_against_datasets_when_installed():
  datasets = pytest.importorskip("datasets")
  import pyarrow as pa
  from datasets.table import InMemoryTable
  # Explicit fingerprints: no pickling of the table (which some datasets/pyarrow pairs break).
  ds = datasets.Dataset(InMemoryTable(pa.table({"i": list(range(37))})), fingerprint="f")
  sp = ds.train_test_split(test_size=0.1, seed=42, train_new_fingerprint="a",
                           test_new_fingerprint="b")
  train, test = data.hf_train_test_split(37)
  assert list(sp["train"]["i"]) == train.tolist() and list(sp["test"]["i"]) == test.tolist()
  shuffled = list(ds.shuffle(seed=42, new_fingerprint="s")["i"])
  assert shuffled == np.concatenate(data.hf_shuffle_holdout(37, 7)).tolist()


def test_training_set_holding_the_evaluation_set_is_refused():
  ev = [{"question": f"q{i}", "answer": str(i), "solution": "worked"} for i in range(4)]
  same = [dict(e, solution=None) for e in ev[::-1]] + [{"question": "other", "answer": "0"}]
  with pytest.raises(ValueError, match=r"train\.jsonl contains all 4 evaluation examples"):
    data.check_held_out(same, ev, "train.jsonl")
  assert data.check_held_out(same, ev[:2] + [{"question": "new", "answer": "1"}], "f") == 2
  assert data.check_held_out(same, [], "f") == 0


@pytest.mark.parametrize("mode,want,cut", [
    ("left", [4, 5, 6, 7, 8, 9], True),
    ("middle", [0, 1, 2, 7, 8, 9], True),
])
def test_fit_prompt(mode, want, cut):
  ids = list(range(10))
  assert data.fit_prompt(ids, 6, mode) == (want, cut)
  assert data.fit_prompt(ids, 10, mode) == (ids, False)
  assert data.fit_prompt(ids, 1, mode)[0] == ([9] if mode == "left" else [0])


def test_fit_prompt_error_names_the_field_and_the_modes():
  with pytest.raises(ValueError, match=r"12 tokens exceeds rollout\.max_prompt_length=8.*'left'.*'middle'"):
    data.fit_prompt(list(range(12)), 8, "error")
  with pytest.raises(ValueError, match="unknown prompt truncation"):
    data.fit_prompt([1], 8, "right")


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
  assert task_names() == ["code", "copy", "countdown", "gsm8k", "humaneval", "kodcode", "math500",
                          "mbpp", "sudoku"]
  assert {n: get_task(n).max_reward for n in task_names()} == {
      "code": 1.5, "copy": 1.0, "countdown": 1.0, "gsm8k": 4.0, "humaneval": 1.5, "kodcode": 1.5,
      "math500": 3.0, "mbpp": 1.5, "sudoku": 1.0}
  assert get_task("math").name == "math500" and get_task("GSM8K").name == "gsm8k"
  with pytest.raises(ValueError, match="unknown task"):
    get_task("chess")


def test_shipped_test_sets_are_the_fallback(tmp_path, monkeypatch):
  """Without $EGSPO_DATA_DIR or a shared/ folder, the package's own copies of the papers' test
  sets are used (a fresh `pip install` can evaluate Countdown and Sudoku)."""
  from egspo.tasks import data as data_lib
  from egspo.tasks import get_task

  monkeypatch.delenv("EGSPO_DATA_DIR", raising=False)
  monkeypatch.setattr(data_lib, "_REPO_ROOT", tmp_path / "nowhere")
  for name in ("countdown_cd3_test.jsonl", "sudoku_4x4_test.csv"):
    path = data_lib.shared_data_file(name)
    assert path.startswith(str(data_lib._SHIPPED))
  assert len(get_task("countdown").load_examples("test")) == 256
  assert len(get_task("sudoku").load_examples("test")) == 256  # d1 draws 256 of the 500 (seed 42)
  with pytest.raises(FileNotFoundError, match="not_there.csv"):
    data_lib.shared_data_file("not_there.csv")
