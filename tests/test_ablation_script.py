"""scripts/ablation.py (issue 14's ablation): per-example scores read from the runs' evaluation
files, paired by seed and problem, bootstrapped differences, the cost estimate, and (slow) the
whole script end to end with micro runs, then resumed with nothing left to run."""

import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "ablation.py"
ENTROPY, UNIFORM = "egspo/entropy/lam0", "egspo/uniform/lam0"


def _script():
  spec = importlib.util.spec_from_file_location("ablation_script", SCRIPT)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _write_eval(workdir, step, correct, questions=("q0", "q1", "q2", "q3")):
  """workdir/eval/eval_<step>.json in egspo.eval's layout, one record per question."""
  gens = [{"question": q, "prompt_input": q, "generations": "", "ground_truth": "",
           "score": {"correct": bool(c)}} for q, c in zip(questions, correct)]
  (workdir / "eval").mkdir(parents=True, exist_ok=True)
  (workdir / "eval" / f"eval_{step}.json").write_text(json.dumps(
      {"task": "countdown", "tag": "eval", "step": step,
       "results": {"16": {"metrics": {}, "generations": gens}}}))


def _fake_study(ab, root, questions_of_seed1_uniform=None):
  """Two seeds with the same scores: SFT [0,0,0,1], entropy [1,1,0,1], uniform [1,0,0,1]; each
  RL run also has an earlier evaluation (step 20 < 100: the numeric, not the textual, last)."""
  runs = ab.cm.plan_runs(root, [0, 1], [ENTROPY, UNIFORM], [])
  for r in runs:
    if r.method == "sft":
      _write_eval(r.workdir, 5, [0, 0, 0, 1])
      continue
    _write_eval(r.workdir, 20, [0, 0, 0, 0])
    correct = [1, 1, 0, 1] if r.method == ENTROPY else [1, 0, 0, 1]
    if r.method == UNIFORM and r.seed == 1 and questions_of_seed1_uniform:
      _write_eval(r.workdir, 100, correct, questions_of_seed1_uniform)
    else:
      _write_eval(r.workdir, 100, correct)
  return runs


def test_differences_from_the_runs_evaluation_files(tmp_path):
  ab = _script()
  seeds, scores = ab.arm_scores(_fake_study(ab, tmp_path))
  assert seeds == [0, 1] and list(scores) == ["sft", ENTROPY, UNIFORM]
  assert scores[ENTROPY]["accuracy"].tolist() == [[1, 1, 0, 1]] * 2
  assert list(scores[ENTROPY]) == ["accuracy"]  # no cell_accuracy in Countdown's scores
  diffs = {d["difference"]: d for d in ab.differences(scores, 10_000, 0)}
  assert set(diffs) == {"entropy − uniform (λ 0)", "EGSPO − SFT (entropy, λ 0)"}
  # Both seeds identical: a resample's mean is that of 8 draws from the 4 problems' differences.
  # entropy − uniform: d = [0, 1, 0, 0]; no draw hits problem 1 with probability (3/4)^8 = 0.10.
  d = diffs["entropy − uniform (λ 0)"]
  assert (d["mean"], d["lo"], d["significant"], d["per_seed"]) == (0.25, 0.0, False, [0.25, 0.25])
  # EGSPO − SFT: d = [1, 1, 0, 0], 8 draws ~ Binomial(8, 1/2)/8: P(≤ 1) = 0.035, P(≥ 7) = 0.035,
  # so the 2.5% and 97.5% quantiles are 1/8 and 7/8.
  d = diffs["EGSPO − SFT (entropy, λ 0)"]
  assert (d["mean"], d["lo"], d["hi"], d["significant"]) == (0.5, 0.125, 0.875, True)
  md = ab.markdown("configs/countdown.py:tiny", seeds, scores, list(diffs.values()))
  assert "| EGSPO − SFT (entropy, λ 0) | accuracy | +50.00 | [+12.50, +87.50] | yes | +50.0, +50.0 |" in md
  assert "| entropy − uniform (λ 0) | accuracy | +25.00 | [+0.00, " in md
  assert "| egspo/uniform/lam0 | accuracy | 50.0 | 50.0, 50.0 |" in md
  assert "4 held-out problems per seed" in md and "10,000 resamples" in md


def test_arms_on_different_problems_are_refused(tmp_path):
  ab = _script()
  runs = _fake_study(ab, tmp_path, questions_of_seed1_uniform=("q0", "q1", "q2", "q9"))
  with pytest.raises(ValueError, match="seed 1: egspo/uniform/lam0 and sft were evaluated on "
                                       "different held-out problems"):
    ab.arm_scores(runs)
  with pytest.raises(ValueError, match="holds no eval_<step>.json"):
    ab.cm.final_generations(tmp_path / "nowhere")


def test_cost_estimate_adds_the_documented_rates(tmp_path):
  ab = _script()
  runs = ab.cm.plan_runs(tmp_path, [0], [ENTROPY, "diffu_grpo"], [])
  rl = 2 * ab.RL_RUN_OVERHEAD_S
  want = (ab.SFT_SECONDS_PER_STEP * 6000 + rl
          + 450 * (ab.RL_SECONDS_PER_ITERATION[ENTROPY] + ab.RL_SECONDS_PER_ITERATION["diffu_grpo"]))
  assert ab.estimate_seconds(runs, 6000, 450, "countdown") == pytest.approx(want)
  sft_f, rl_f = ab.TASK_TIME_FACTORS["sudoku"]
  assert ab.estimate_seconds(runs[1:], 6000, 450, "sudoku") == pytest.approx(
      rl + rl_f * (want - rl - ab.SFT_SECONDS_PER_STEP * 6000))
  assert math.isnan(ab.estimate_seconds(runs, 6000, 450, "gsm8k"))


def test_dry_run_prints_the_estimate_and_the_commands(tmp_path):
  out = subprocess.run(
      [sys.executable, str(SCRIPT), "--dry-run", "--config", "configs/sudoku.py:tiny",
       "--jobs", "2", "--runs", str(tmp_path / "runs")],
      cwd=REPO, capture_output=True, text=True, check=True).stdout
  assert out.startswith("30 runs (5 seeds × (SFT + 5 arms), 6000 SFT steps, 450 RL iterations), "
                        "30 to do: estimated ")
  cmds = [l for l in out.splitlines() if l.startswith("$ ")]
  assert len(cmds) == 30 and all("--config=configs/sudoku.py:tiny" in c for c in cmds)
  assert all("seed" in c and "/sft " in c for c in cmds[:5])  # every SFT run first
  bad = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--arms", "egspo/nope"],
                       cwd=REPO, capture_output=True, text=True)
  assert bad.returncode == 2 and "unknown methods ['egspo/nope']" in bad.stderr


@pytest.mark.slow
def test_end_to_end_micro_ablation_then_resume(tmp_path):
  """2 seeds × (SFT + 2 arms), 2 at a time, micro sizes: the json and md hold the paired
  differences; a second call finds every run finished and writes the same differences."""
  cmd = [sys.executable, str(SCRIPT), "--size", "smoke", "--seeds", "0,1",
         "--arms", f"{ENTROPY},{UNIFORM}", "--jobs", "2", "--resamples", "10000",
         "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "res" / "abl")]
  first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  assert "6 runs (2 seeds × (SFT + 2 arms), 5 SFT steps, 1 RL iterations), 6 to do" in first.stdout
  res = json.loads((tmp_path / "res" / "abl.json").read_text())
  diffs = {d["difference"]: d for d in res["differences"]}
  assert set(diffs) == {"entropy − uniform (λ 0)", "EGSPO − SFT (entropy, λ 0)"}
  for d in diffs.values():
    assert d["metric"] == "accuracy" and d["num_resamples"] == 10_000 and len(d["per_seed"]) == 2
    assert d["lo"] <= d["mean"] <= d["hi"]
  assert [len(s.split()) for s in res["scores"][ENTROPY]["accuracy"]] == [8, 8]
  assert {(r["arm"], r["seed"]) for r in res["runs"]} == {
      (a, s) for a in ("sft", ENTROPY, UNIFORM) for s in (0, 1)}
  assert all(r["wall_seconds"] > 0 for r in res["runs"])
  md = (tmp_path / "res" / "abl.md").read_text()
  assert "| entropy − uniform (λ 0) | accuracy |" in md and "| EGSPO − SFT (entropy, λ 0) |" in md
  again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "6 to do" not in again.stdout and "0 to do" in again.stdout
  assert not [l for l in again.stdout.splitlines() if l.startswith("$ ")]
  resumed = json.loads((tmp_path / "res" / "abl.json").read_text())
  assert (resumed["differences"], resumed["runs"]) == (res["differences"], res["runs"])
