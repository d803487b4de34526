"""Evaluation harness: rescoring hand-made d1-format files (CLI, no model; null ground truths,
bad files, per-example --output at any path form), the evaluate() core with a stub generator, the
output round trip, a tiny-preset generation run, and the training loop's evaluation (its files
re-grade to the same metrics; its generate function compiles once)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from egspo import eval as ev
from egspo.tasks import get_task
from egspo.tokenizer import CharTokenizer


def run_cli(*args, cwd=None, env=None, ok=True):
  proc = subprocess.run([sys.executable, "-m", "egspo.eval", *args], capture_output=True,
                        text=True, timeout=120, cwd=cwd,
                        env=dict(os.environ if env is None else env,
                                 PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1])))
  if not ok:
    return proc
  assert proc.returncode == 0, proc.stderr
  return json.loads(proc.stdout)


def write(tmp_path, name, items):
  p = tmp_path / name
  p.write_text(json.dumps({"generations": items, "gen_length": 256}))
  return str(p)


def test_rescore_countdown_d1_file(tmp_path):
  q = "Numbers: [2, 3, 4]\nTarget: 5"
  items = [
      {"question": q, "generations": "x\n</reasoning>\n<answer>\n\\boxed{2*4-3}\n</answer>", "ground_truth": [[2, 3, 4], 5]},
      {"question": q, "generations": "<answer>\\boxed{4 \\times 2 - 3 = 5}</answer>", "ground_truth": [[2, 3, 4], 5]},
      {"question": q, "generations": "<answer>\\boxed{2+3+4}</answer>", "ground_truth": [[2, 3, 4], 5]},
      {"question": q, "generations": "I give up", "ground_truth": [[2, 3, 4], 5]},
  ]
  out = run_cli("--task", "countdown", "--generations", write(tmp_path, "c.json", items))
  assert out["metrics"]["accuracy"] == 0.5 and out["metrics"]["total"] == 4
  assert out["metrics"]["gen_length"] == 256


def test_rescore_sudoku_d1_file_cell_accuracy(tmp_path):
  items = [  # 8 empty cells each
      {"question": "3102200002100320", "generations": "<answer>\n3142243142131324\n</answer>",
       "ground_truth": "3142243142131324"},
      {"question": "Solve the following Sudoku puzzle: 3102200002100320",
       "generations": "<answer>\n3112213142131324\n</answer>", "ground_truth": "3142243142131324"},
  ]
  out = run_cli("--task", "sudoku", "--generations", write(tmp_path, "s.json", items))
  assert out["metrics"]["accuracy"] == 0.5
  assert out["metrics"]["cell_accuracy"] == pytest.approx(14 / 16)


def test_rescore_gsm8k_math_mbpp(tmp_path):
  g = [{"question": "q", "generations": "<answer>\\boxed{18}</answer>", "ground_truth": 18.0},
       {"question": "q", "generations": "<answer>17</answer>", "ground_truth": 18.0},
       {"question": "q", "generations": "<answer>1,234</answer>", "ground_truth": 1234.0}]
  assert run_cli("--task", "gsm8k", "--generations", write(tmp_path, "g.json", g))["metrics"]["correct"] == 2
  m = [{"question": "p", "generations": "so \\boxed{\\dfrac{1}{2}}", "ground_truth": "\\frac{1}{2}"},
       {"question": "p", "generations": "so \\boxed{3}", "ground_truth": "\\frac{1}{2}"}]
  assert run_cli("--task", "math500", "--generations", write(tmp_path, "m.json", m))["metrics"]["accuracy"] == 0.5
  tests = "\nassert sq(2) == 4\nassert sq(3) == 9"
  c = [{"question": "square", "generations": "<answer>\n```python\ndef sq(x):\n  return x*x\n```\n</answer>", "ground_truth": tests},
       {"question": "square", "generations": "<answer>\n```python\ndef sq(x):\n  return 2*x\n```\n</answer>", "ground_truth": tests}]
  out = run_cli("--task", "mbpp", "--generations", write(tmp_path, "p.json", c))["metrics"]
  assert out["accuracy"] == 0.5 and out["mean_passed"] == pytest.approx(0.75)


@pytest.mark.parametrize("content, problem", [
    ({"foo": 1}, "'generations' list (d1) or 'results'"),
    ({"generations": []}, "the 'generations' list is empty"),
    ({"generations": [{"question": "q", "generations": "x", "ground_truth": 1.0}, "oops"]},
     "generations[1] is a str, not a JSON object"),
    ({"results": {"256": {"generations": [3]}}}, "results['256']: generations[0] is a int"),
    ({"generations": [{"question": "q", "generations": "x", "ground_truth": None}]},
     "none of the 1 items has a ground_truth"),
    ([1, 2], "must hold a JSON object, got a list"),
])
def test_rescore_rejects_bad_file_in_one_line(tmp_path, content, problem):
  p = tmp_path / "bad.json"
  p.write_text(json.dumps(content))
  proc = run_cli("--task", "gsm8k", "--generations", str(p), ok=False)
  assert proc.returncode != 0 and proc.stdout == ""
  (line,) = proc.stderr.strip().splitlines()  # one line: no traceback, no usage text
  assert line.startswith(f"python -m egspo.eval: error: cannot rescore {p}: ") and problem in line


def test_resolve_path_forms(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert str(ev.resolve_path("runs/x.json")) == str(tmp_path / "runs/x.json")
  assert str(ev.resolve_path("~/x.json")) == str(tmp_path / "home/x.json")
  assert str(ev.resolve_path("/abs/x.json")) == "/abs/x.json"
  assert str(ev.resolve_path("gs://bucket/run/x.json")) == "gs://bucket/run/x.json"
  with pytest.raises(ValueError, match="empty path"):
    ev.resolve_path("")


def test_rescore_null_ground_truth_counts_incorrect_and_output_per_example(tmp_path):
  # d1's released GSM8K files hold items whose ground_truth is null.
  items = [{"question": "a", "generations": "<answer>\\boxed{18}</answer>", "ground_truth": 18.0},
           {"question": "b", "generations": "<answer>\\boxed{7}</answer>", "ground_truth": None},
           {"question": "c", "generations": "<answer>5</answer>", "ground_truth": 6.0},
           {"question": "d", "generations": "<answer>\\boxed{4}</answer>"}]
  src = write(tmp_path, "g.json", items)
  out = run_cli("--task", "gsm8k", "--generations", src, "--output", "runs/sub/r.json", cwd=tmp_path)
  m = out["metrics"]
  assert (m["correct"], m["total"], m["missing_ground_truth"]) == (1, 4, 2)
  assert m["accuracy"] == 0.25 and m["gen_length"] == 256
  saved = json.loads((tmp_path / "runs/sub/r.json").read_text())  # relative to the cwd
  assert saved["metrics"] == m and saved["file"] == src and saved["gen_length"] == 256
  recs = saved["generations"]
  assert [r["question"] for r in recs] == ["a", "b", "c", "d"]
  assert [r["ground_truth"] for r in recs] == [18.0, None, 6.0, None]
  assert [r["score"]["correct"] for r in recs] == [True, False, False, False]
  assert [r["score"]["extracted"] for r in recs] == [18.0, None, 5.0, None]
  assert [r["score"].get("missing_ground_truth", False) for r in recs] == [False, True, False, True]
  # The per-example file is itself a d1-layout file that re-grades the same.
  assert run_cli("--task", "gsm8k", "--generations", str(tmp_path / "runs/sub/r.json"))["metrics"] == m


def test_rescore_sudoku_null_ground_truth_zero_cells_and_home_output(tmp_path):
  items = [{"question": "3102200002100320", "generations": "<answer>\n3142243142131324\n</answer>",
            "ground_truth": "3142243142131324"},
           {"question": "0140432014020000", "generations": "<answer>\n2143432114323214\n</answer>",
            "ground_truth": None}]
  data = {"task": "sudoku", "results": {"16": {"generations": items}, "32": {"generations": items[:1]}}}
  src = tmp_path / "in.json"
  src.write_text(json.dumps(data))
  home = tmp_path / "home"
  home.mkdir()
  out = run_cli("--task", "sudoku", "--generations", str(src), "--output", "~/x/y.json",
                env=dict(os.environ, HOME=str(home)))
  m16, m32 = out["metrics"]["16"], out["metrics"]["32"]
  assert (m16["accuracy"], m16["missing_ground_truth"], m16["cell_accuracy"]) == (0.5, 1, 1.0)
  assert (m16["correct_cells"], m16["empty_cells"]) == (8, 8)  # unknown cells add nothing
  assert (m32["accuracy"], m32["missing_ground_truth"]) == (1.0, 0)
  saved = json.loads((home / "x/y.json").read_text())
  assert saved["results"]["16"]["metrics"] == m16
  assert [r["score"]["correct"] for r in saved["results"]["16"]["generations"]] == [True, False]
  assert saved["results"]["16"]["generations"][0]["score"]["extracted"] == "3142243142131324"


def test_evaluate_core_with_stub_generator_and_round_trip(tmp_path):
  task = get_task("countdown", number_range=(1, 9), target_range=(1, 30))
  import numpy as np
  exs = [task.sample_example(np.random.default_rng(i)) for i in range(6)]
  seen = {}

  def gen(prompts, length):
    seen[length] = prompts
    # correct boxed answers for the first half, junk for the rest
    return [f"x</reasoning><answer>\\boxed{{{e['solution']}}}</answer>" if i < 3 else "junk"
            for i, e in enumerate(exs)]

  res = ev.evaluate(None, CharTokenizer(), task, exs, gen_lengths=(16, 32), style="plain", generate_fn=gen)
  assert set(res["results"]) == {"16", "32"} and set(seen) == {16, 32}
  assert seen[16][0] == task.prompt(exs[0], "plain")  # plain: no template, empty prefill
  for r in res["results"].values():
    assert r["metrics"]["accuracy"] == 0.5 and len(r["generations"]) == 6
    assert r["generations"][0]["ground_truth"] == [exs[0]["numbers"], exs[0]["target"]]
  assert res["protocol"]["temperature"] == 0.0 and res["protocol"]["block_length"] == 32
  p = tmp_path / "out.json"
  p.write_text(json.dumps(res))
  out = run_cli("--task", "countdown", "--generations", str(p))
  assert out["metrics"]["16"]["accuracy"] == 0.5 and out["metrics"]["32"]["correct"] == 3


def test_chat_prompts_get_template_and_prefill():
  class Tok:
    def chat_prompt(self, user, prefill=""):
      return f"<user>{user}</user><assistant>{prefill}"
  task = get_task("gsm8k")
  (p,) = ev.build_prompts(task, Tok(), [{"question": "2+2?", "answer": "4"}], "chat")
  assert p.startswith("<user>You are a math expert") and p.endswith("<assistant><reasoning>")


def test_generation_mode_preset_and_checkpoint_agree(tmp_path, monkeypatch):
  from conftest import SHARED_DATA
  if not (SHARED_DATA / "sudoku_4x4_test.csv").exists():
    # A checkout without shared/ beside it: a two-puzzle file in the standard csv format.
    (tmp_path / "sudoku_4x4_test.csv").write_text(
        "Puzzle,Solution\n3102200002100320,3142243142131324\n0140432014020000,2143432114323214\n")
    monkeypatch.setenv("EGSPO_DATA_DIR", str(tmp_path))
  out = tmp_path / "gen.json"
  res = ev.main(["--task", "sudoku", "--preset", "tiny", "--gen_lengths", "16", "--limit", "2",
                 "--batch_size", "2", "--output", str(out)])
  data = json.loads(out.read_text())
  gens = data["results"]["16"]["generations"]
  assert len(gens) == 2 and all(isinstance(g["generations"], str) for g in gens)
  assert set(data["results"]["16"]["metrics"]) >= {"accuracy", "cell_accuracy"}
  assert res["checkpoint"] == "preset:tiny:seed0"
  # The same weights saved as a checkpoint (with the char tokenizer) give the same greedy texts.
  from egspo.model import get_config, init_model, save_pretrained_orbax
  ckpt = tmp_path / "ckpt"
  save_pretrained_orbax(init_model(get_config("tiny", vocab=CharTokenizer()), 0), ckpt, tokenizer=CharTokenizer())
  res2 = ev.main(["--task", "sudoku", "--checkpoint", str(ckpt), "--style", "plain",
                  "--gen_lengths", "16", "--limit", "2", "--batch_size", "2"])
  assert [g["generations"] for g in res2["results"]["16"]["generations"]] == [g["generations"] for g in gens]


def test_preset_output_relative_path_regrades(tmp_path, monkeypatch):
  # The README's smoke example: a relative --output (created with its parent) that --generations
  # re-grades to the metrics the preset run printed.
  monkeypatch.chdir(tmp_path)
  task = get_task("countdown")
  exs = [task.sample_example(np.random.default_rng(i)) for i in range(3)]
  (tmp_path / "cd.jsonl").write_text("".join(
      json.dumps({"input": ",".join(map(str, e["numbers"])), "output": str(e["target"])}) + "\n"
      for e in exs))
  res = ev.main(["--task", "countdown", "--preset", "tiny", "--gen_lengths", "16", "--limit", "3",
                 "--batch_size", "4", "--data_path", "cd.jsonl", "--output", "runs/eval_tiny.json"])
  assert (tmp_path / "runs/eval_tiny.json").is_file()
  out = ev.main(["--task", "countdown", "--generations", "runs/eval_tiny.json"])
  want = dict(res["results"]["16"]["metrics"], missing_ground_truth=0)
  assert out["metrics"] == {"16": want}


# --- the training loop's evaluation ------------------------------------------------------------

def _tiny_trainer(tmp_path):
  from egspo import config as config_lib
  from egspo import sharding as shard_lib
  from egspo import trainer

  c = config_lib.base_config("countdown", "tiny")
  c.sft.steps = 0
  c.task.num_eval_examples = 0
  c.eval.batch_size = 4
  c.mesh.num_devices = 1
  tr = trainer.Trainer.create(c, tmp_path / "work")
  return tr, shard_lib.use_mesh(tr.mesh, tr.rules)


def test_trainer_eval_file_regrades_to_same_metrics_and_compiles_once(tmp_path):
  import jax
  from egspo import trainer

  tr, mesh = _tiny_trainer(tmp_path)
  task = tr.task
  exs = [task.sample_example(np.random.default_rng(i)) for i in range(6)]
  model_texts, seen = [], [0]
  real_decode = tr.decode

  def decode(tokens, purpose="train"):  # the model's texts, a correct answer in every even row
    out = []
    for t in real_decode(tokens, purpose):
      i, seen[0] = seen[0], seen[0] + 1
      model_texts.append(t)
      out.append(f"x</reasoning><answer>\\boxed{{{exs[i]['solution']}}}</answer>" if i % 2 == 0 else t)
    return out

  tr.decode = decode
  scfg = trainer.sampler_config(tr.config, tr.model_cfg, "eval")
  with mesh:
    m1 = tr.evaluate(tr.params, exs, "eval", 3)
    first_texts, seen[0] = list(model_texts), 0
    perturbed = jax.tree.map(lambda x: x * 1.01, tr.params)
    m2 = tr.evaluate(perturbed, exs[:5], "eval", 7)
  tr.writer.close()
  gen = tr._eval_generate(scfg)
  assert gen is tr._eval_generate(scfg)  # one function per sampler config ...
  assert gen._cache_size() == 1  # ... compiled once for both calls (and the padded last batch)
  assert m1["correct"] >= 3 and m1["total"] == 6 and m2["total"] == 5

  path = tr.workdir / "eval" / "eval_3.json"
  data = json.loads(path.read_text())
  assert data["task"] == "countdown" and data["step"] == 3
  assert data["protocol"]["steps"] == scfg.steps and data["protocol"]["prefill"] == ""
  (length, r), = data["results"].items()
  assert length == str(scfg.gen_length) and r["metrics"] == m1
  rec = r["generations"][1]
  assert set(rec) == {"question", "prompt_input", "generations", "ground_truth", "score"}
  assert rec["question"] == task.question(exs[1])
  assert rec["prompt_input"] == task.prompt(exs[1], "plain", "eval")
  assert rec["generations"] == first_texts[1] and len(first_texts) == 6
  assert exs[0]["solution"] in r["generations"][0]["generations"]
  assert rec["ground_truth"] == [exs[1]["numbers"], exs[1]["target"]]
  out = run_cli("--task", "countdown", "--generations", str(path))
  assert out["metrics"] == {length: dict(m1, missing_ground_truth=0)}
  out2 = ev.main(["--task", "countdown", "--generations", str(tr.workdir / "eval" / "eval_7.json")])
  assert out2["metrics"] == {length: dict(m2, missing_ground_truth=0)}


def test_trainer_evaluates_prompts_longer_than_max_prompt_length(tmp_path):
  """Evaluation prompts are never cut (the release evaluates whole prompts) and never refused:
  the batch is widened to the longest prompt (rounded up to 64) for the whole set."""
  tr, mesh = _tiny_trainer(tmp_path)
  exs = [tr.task.sample_example(np.random.default_rng(i)) for i in range(3)]
  longest = max(len(x) for x in tr.prompt_ids(exs, "eval"))
  tr.config.unlock()
  tr.config.rollout.max_prompt_length = longest - 5  # every eval prompt is now "too long"
  with mesh:
    m = tr.evaluate(tr.params, exs, "eval", 0)
  tr.writer.close()
  assert m["total"] == 3
  (r,) = json.loads((tr.workdir / "eval" / "eval_0.json").read_text())["results"].values()
  assert [g["prompt_input"] for g in r["generations"]] == [
      tr.task.prompt(ex, "plain", "eval") for ex in exs]
