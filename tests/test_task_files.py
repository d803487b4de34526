"""Data files in the Hugging Face layouts reach training and evaluation through each task's own
converter (every format), a training file holding the evaluation set is refused, over-long
prompts follow task.prompt_truncation, and every `configs/<task>.py` starts (validate, build,
first batch) on local files. The tests write the files themselves."""

import gzip
import json
import pathlib

import numpy as np
import pytest

from egspo import config as config_lib
from egspo import trainer
from egspo.tasks import get_task
from egspo.tasks.sudoku import generate_puzzle

REPO = pathlib.Path(__file__).resolve().parents[1]
FORMATS = (".jsonl", ".json", ".parquet", ".csv")


def write(rows, path):
  """`rows` as a file in the format of `path`'s suffix (csv: one column per key, JSON cells)."""
  path = pathlib.Path(path)
  name = path.name
  if name.endswith(".jsonl.gz"):
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write("".join(json.dumps(r) + "\n" for r in rows))
  elif name.endswith(".jsonl"):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  elif name.endswith(".json"):
    path.write_text(json.dumps(rows))
  elif name.endswith(".parquet"):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path)
  else:
    import csv
    with open(path, "w", newline="", encoding="utf-8") as f:
      w = csv.DictWriter(f, fieldnames=list(rows[0]))
      w.writeheader()
      w.writerows([{k: v if isinstance(v, str) else json.dumps(v) for k, v in r.items()}
                   for r in rows])
  return str(path)


# --- rows in the Hugging Face layouts -------------------------------------------------------

def gsm8k_rows(n=6):  # openai/gsm8k (main)
  return [{"question": f"Ann has {i} apples and buys {i + 3}. How many?",
           "answer": f"She has {i} + {i + 3} = <<{i}+{i + 3}={2 * i + 3}>>{2 * i + 3}.\n"
                     f"#### {2 * i + 3}"} for i in range(n)]


def math_rows(n=6):  # HuggingFaceH4/MATH-500
  return [{"problem": f"Compute ${i} + {i}$.", "solution": f"It is $\\boxed{{{2 * i}}}$.",
           "answer": str(2 * i), "subject": "Algebra", "level": 1,
           "unique_id": f"test/algebra/{i}.json"} for i in range(n)]


def kodcode_rows(n=20):  # KodCode/KodCode-Light-RL-10K
  return [{"question_id": f"Q_{i}", "question": f"Write add{i}(x) returning x + {i}.",
           "solution": f"def add{i}(x):\n    return x + {i}\n",
           "test": f"from solution import add{i}\n\ndef test_one():\n    assert add{i}(1) == {1 + i}"
                   f"\n\ndef test_zero():\n    assert add{i}(0) == {i}\n",
           "test_info": [{"function_name": f"add{i}"}], "gpt_difficulty": "easy"}
          for i in range(n)]


def mbpp_rows(n=3):  # mbpp (sanitized)
  return [{"source_file": "x.py", "task_id": 600 + i, "prompt": f"Write triple{i}(x).",
           "code": f"def triple{i}(x):\n    return 3 * x\n", "test_imports": [],
           "test_list": [f"assert triple{i}(2) == 6", f"assert triple{i}(0) == 0"]}
          for i in range(n)]


def humaneval_rows(n=2):  # openai_humaneval
  return [{"task_id": f"HumanEval/{i}",
           "prompt": f'def neg{i}(x):\n    """Return -x."""\n',
           "canonical_solution": "    return -x\n",
           "test": "def check(candidate):\n    assert candidate(1) == -1\n    assert candidate(0) == 0\n",
           "entry_point": f"neg{i}"} for i in range(n)]


def countdown_rows(n):  # Jiayi-Pan/Countdown-Tasks-3to4
  rng = np.random.default_rng(1)
  rows = []
  for i in range(n):
    nums = [int(x) for x in rng.integers(1, 101, size=3 if i % 5 else 4)]
    rows.append({"target": int(sum(nums)), "nums": nums})
  return rows


def sudoku_rows(n):  # the release's 4x4_sudoku_unique_puzzles.csv columns
  return [{"Puzzle": ex["puzzle"], "Solution": ex["solution"]}
          for ex in (generate_puzzle(np.random.default_rng([2, k])) for k in range(n))]


def correct(task, example):
  """A completion with the example's reference solution (the task's chat SFT target)."""
  return task.sft_target(example, "chat")


# --- each task's converter, train and eval alike --------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_gsm8k_answer_is_the_final_number(tmp_path, fmt):
  """Before the fix a train_file row kept the whole worked solution as the answer, so a correct
  completion earned 2.0 (format terms only) instead of 4.0."""
  task = get_task("gsm8k")
  path = write(gsm8k_rows(), tmp_path / f"gsm8k{fmt}")
  for split in ("train", "test"):
    exs = task.load_examples(split, path=path)
    assert [e["answer"] for e in exs] == [str(2 * i + 3) for i in range(6)]
    assert task.reward(correct(task, exs[1]), exs[1]) == 4.0


@pytest.mark.parametrize("fmt", FORMATS)
def test_math500_answer(tmp_path, fmt):
  task = get_task("math500")
  exs = task.load_examples("test", path=write(math_rows(), tmp_path / f"math{fmt}"))
  assert [e["answer"] for e in exs] == [str(2 * i) for i in range(6)]
  assert task.reward(correct(task, exs[2]), exs[2]) == task.max_reward


@pytest.mark.parametrize("fmt", (".jsonl", ".parquet"))
def test_kodcode_rows_are_converted_and_split_as_released(tmp_path, fmt):
  """A KodCode file crashed with KeyError 'tests'; now its rows become examples, 90% train."""
  path = write(kodcode_rows(), tmp_path / f"kodcode{fmt}")
  for name in ("kodcode", "code"):
    task = get_task(name)
    tr, te = task.load_examples("train", path=path), get_task("kodcode").load_examples("test", path)
    assert len(tr) == 18 and len(te) == 2
    assert {e["task_id"] for e in tr} | {e["task_id"] for e in te} == {f"Q_{i}" for i in range(20)}
    assert [e["task_id"] for e in te] == ["Q_15", "Q_9"]  # datasets' split of 20 rows, seed 42
    assert tr[0]["tests"] == ["test_one()", "test_zero()"] and tr[0]["entry_point"] == "add14"
  assert task.rewards([correct(task, tr[0])], [tr[0]])[0] == 1.5
  bad = write([{"question": "q"}], tmp_path / "bad.jsonl")
  with pytest.raises(ValueError, match="not a KodCode record"):
    get_task("kodcode", test_fraction=0).load_examples("train", path=bad)


def test_code_task_evaluates_on_mbpp_and_humaneval(tmp_path):
  task = get_task("code")
  mbpp = write(mbpp_rows(3), tmp_path / "mbpp_test.jsonl")
  he = write(humaneval_rows(2), tmp_path / "HumanEval.jsonl.gz")
  opts = get_task("code", mbpp_path=mbpp, humaneval_path=he)
  exs = opts.load_examples("test")
  assert [e["dataset"] for e in exs] == ["mbpp", "humaneval", "mbpp", "humaneval", "mbpp"]
  # One file with both kinds of records gives the same examples.
  mixed = write(mbpp_rows(3) + humaneval_rows(2), tmp_path / "mixed.jsonl")
  assert sorted(map(json.dumps, task.load_examples("test", mixed))) == sorted(map(json.dumps, exs))
  # Each example is prompted and scored by its own task.
  assert task.prompt(exs[0], "chat", "eval") == get_task("mbpp").prompt(exs[0], "chat", "eval")
  assert task.prompt(exs[1], "chat", "eval") == get_task("humaneval").prompt(exs[1], "chat", "eval")
  texts = [correct(task, e) for e in exs[:4]] + ["<answer>no code</answer>"]
  scores = task.scores(texts, exs)
  assert [s["correct"] for s in scores] == [True, True, True, True, False]
  agg = task.aggregate(scores)
  assert agg["accuracy"] == pytest.approx(0.8) and agg["mbpp_accuracy"] == pytest.approx(2 / 3)
  assert agg["humaneval_accuracy"] == 1.0 and agg["humaneval_total"] == 2
  with pytest.raises(ValueError, match="not an MBPP"):
    task.load_examples("test", write(gsm8k_rows(1), tmp_path / "g.jsonl"))


# --- the Trainer: converters, refusing the test set, prompt truncation ------------------------

def tiny(task, tmp_path, **overrides):
  c = config_lib.load_config(f"{REPO}/configs/{task}.py:tiny")
  c.mesh.num_devices = 1
  c.sft.steps = 0
  c.task.num_eval_examples = 4
  c.batch.num_prompts, c.batch.group_size, c.batch.micro_batch_size = 2, 2, 4
  c.eval.batch_size = 4
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  config_lib.validate(c)
  return trainer.Trainer.create(c, str(tmp_path / "run"))


def test_train_file_goes_through_the_converter(tmp_path):
  path = write(gsm8k_rows(), tmp_path / "train.parquet")
  ev = write(gsm8k_rows(8)[6:], tmp_path / "test.jsonl")
  tr = tiny("gsm8k", tmp_path, **{"task.train_file": path, "task.eval_file": ev,
                                  "rollout.max_prompt_length": 64})
  batch = tr.train_stream(2, 2, seed=0, held_out=tr.eval_examples()).next_batch()
  assert all(e["answer"] == str(int(e["question"].split()[2]) * 2 + 3) for e in batch.examples)


def test_training_on_the_evaluation_file_is_refused(tmp_path):
  ev = write(gsm8k_rows(), tmp_path / "gsm8k_test.jsonl")
  copy = write(gsm8k_rows(), tmp_path / "copy.parquet")  # same content, other path and format
  for train_file in (ev, copy):
    tr = tiny("gsm8k", tmp_path, **{"task.train_file": train_file, "task.eval_file": ev,
                                    "rollout.max_prompt_length": 64})
    with pytest.raises(ValueError, match="contains all 4 evaluation examples"):
      tr.train_stream(2, 2, seed=0, held_out=tr.eval_examples())


def test_prompt_truncation_modes(tmp_path):
  rows = [{"question": "What is 2+2?", "answer": "#### 4"},
          {"question": "A train leaves at noon going at sixty miles an hour; when is it 90 miles "
                       "away from the station?", "answer": "#### 2"}]
  path = write(rows, tmp_path / "train.jsonl")
  common = {"task.train_file": path, "task.num_eval_examples": 0,
            "rollout.max_prompt_length": 24}
  tr = tiny("gsm8k", tmp_path, **common)
  with pytest.raises(ValueError, match=r"1 of the 2 prompts of task\.train_file=.* exceed "
                                       r"rollout\.max_prompt_length=24 tokens.*'left'"):
    tr.train_stream(2, 2, seed=0)
  exs = get_task("gsm8k").load_examples("train", path=path)
  whole = tr.prompt_ids(exs)
  with pytest.raises(ValueError, match="prompt 1 .*exceeds rollout.max_prompt_length=24"):
    tr.encode_prompts(exs)
  for mode, want in (("left", whole[1][-24:]), ("middle", whole[1][:12] + whole[1][-12:])):
    tr = tiny("gsm8k", tmp_path, **common, **{"task.prompt_truncation": mode})
    tr.train_stream(2, 2, seed=0)  # no error before training
    ids, mask = tr.encode_prompts(exs)
    assert ids.shape == (2, 24) and mask[1].all() and ids[1].tolist() == want
    assert ids[0][mask[0]].tolist() == whole[0] and tr.prompts_cut_frac == 0.5
    tr.encode_prompts(exs[:1])
    assert tr.prompts_cut_frac == 0.0
  # Evaluation prompts are never cut: the width grows (a multiple of 64).
  lengths = [len(x) for x in tr.prompt_ids(exs, "eval")]
  ids, mask = tr.encode_prompts(exs, purpose="eval")
  assert ids.shape[1] == -(-max(lengths) // 64) * 64 > 24 and mask.sum(1).tolist() == lengths


# --- every configs/<task>.py starts on local files ------------------------------------------

def _start_case(task, tmp_path):
  """(config overrides, [expected eval datasets]) with local files in the HF layouts."""
  d = tmp_path / "data"
  d.mkdir()
  if task == "countdown":
    return {"task.train_file": write(countdown_rows(640), d / "countdown_train.parquet"),
            "task.eval_file": write([{"input": "30,100,93", "output": "23"}] * 2
                                    + [{"input": "1,2,3", "output": "6"}] * 2, d / "cd3.jsonl"),
            "task.eval_source": "file"}
  if task == "sudoku":
    rows = sudoku_rows(520)
    return {"task.train_file": write(rows, d / "4x4_sudoku_unique_puzzles.csv"),
            "task.eval_file": write(sudoku_rows(530)[520:], d / "sudoku_4x4_test.csv"),
            "task.eval_source": "file"}
  if task == "gsm8k":
    return {"task.train_file": write(gsm8k_rows(), d / "gsm8k_train.parquet"),
            "task.eval_file": write(gsm8k_rows(10)[6:], d / "gsm8k_test.jsonl"),
            "rollout.max_prompt_length": 64}
  if task == "math500":
    return {"task.train_file": write(math_rows(), d / "math_train.jsonl"),
            "task.eval_file": write(math_rows(10)[6:], d / "math500_test.jsonl"),
            "rollout.max_prompt_length": 64}
  if task == "code":
    return {"task.train_file": write(kodcode_rows(), d / "kodcode.parquet"),
            "task.eval_file": write(mbpp_rows(3) + humaneval_rows(2), d / "mbpp_he.jsonl"),
            "rollout.max_prompt_length": 96}
  return {}  # copy: generated digit strings, no file format


@pytest.mark.parametrize("task", ["countdown", "sudoku", "gsm8k", "math500", "code", "copy"])
def test_every_config_starts_on_local_files(task, tmp_path):
  tr = tiny(task, tmp_path, **_start_case(task, tmp_path))
  assert tr.task.name == task
  ev = tr.eval_examples()
  assert len(ev) == 4
  stream = tr.train_stream(2, 2, seed=0, held_out=ev)
  batch = stream.next_batch()
  ids, mask = tr.encode_prompts(batch.repeated)
  assert ids.shape == (4, tr.config.rollout.max_prompt_length) and mask.any(1).all()
  eids, _ = tr.encode_prompts(ev, purpose="eval")
  assert eids.shape[0] == 4
  # The examples are real ones: their reference solutions earn the full reward.
  rewards = tr.task.rewards([correct(tr.task, e) for e in batch.examples], batch.examples)
  np.testing.assert_allclose(rewards, tr.task.max_reward)
