"""Evaluation harness: rescoring hand-made d1-format files (CLI, no model), the evaluate() core
with a stub generator, the output round trip, and a tiny-preset generation run."""

import json
import subprocess
import sys

import pytest

from egspo import eval as ev
from egspo.tasks import get_task
from egspo.tokenizer import CharTokenizer


def run_cli(*args):
  proc = subprocess.run([sys.executable, "-m", "egspo.eval", *args], capture_output=True,
                        text=True, timeout=120)
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


def test_rescore_rejects_bad_file(tmp_path):
  p = tmp_path / "bad.json"
  p.write_text(json.dumps({"foo": 1}))
  proc = subprocess.run([sys.executable, "-m", "egspo.eval", "--task", "countdown", "--generations", str(p)],
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode != 0 and "generations" in proc.stderr


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
  save_pretrained_orbax(init_model(get_config("tiny"), 0), ckpt, tokenizer=CharTokenizer())
  res2 = ev.main(["--task", "sudoku", "--checkpoint", str(ckpt), "--style", "plain",
                  "--gen_lengths", "16", "--limit", "2", "--batch_size", "2"])
  assert [g["generations"] for g in res2["results"]["16"]["generations"]] == [g["generations"] for g in gens]
