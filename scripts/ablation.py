"""The ablation of issue 14 on a `:tiny` task: step selection, λ and diffu-GRPO, paired by seed,
with paired hierarchical-bootstrap 95% intervals of each difference in held-out accuracy.

Arms (scripts/compare_methods.py METHODS): EGSPO λ = 0 with entropy / uniform / random step
selection, EGSPO-SA λ = 0.5 with entropy selection, diffu-GRPO; the seed's SFT model is reported
too. Per seed every arm starts from the one SFT checkpoint of that seed and is evaluated on the
same held-out problems (generated from `default_rng([seed, EVAL_SET_SEED])`, egspo/trainer.py
`eval_examples`: they depend on the seed and the task settings only, which no arm changes; the
script checks that the arms of a seed saw the same questions). The runs, their resumption and
`--jobs` are compare_methods' (`plan_runs`, `Runner`): finished runs are skipped, so an
interrupted ablation resumes where it stopped.

Each difference A − B is read from the per-example scores of the runs' last evaluation
(workdir/eval/eval_<step>.json: `correct`, and Sudoku's `cell_accuracy`) and bootstrapped by
`egspo.stats.paired_bootstrap`: seeds with replacement, then problems within each drawn seed,
the same draws for both arms; "significant" means the 95% interval excludes 0.

    python scripts/ablation.py --config configs/countdown.py:tiny --seeds 0,1,2,3,4 --jobs 2
    python scripts/ablation.py --config configs/sudoku.py:tiny --seeds 0,1,2,3,4 --jobs 2
    python scripts/ablation.py --size smoke --seeds 0,1 --out /tmp/abl/smoke --runs /tmp/abl/runs

Results: OUT.json (runs, per-example scores, differences) and OUT.md (tables); OUT defaults to
results/<today>/ablation_<task>, the runs' workdirs to runs/ablation_<task>. Before starting, the
script prints an estimate of the time the pending runs take (RATES below).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import compare_methods as cm  # noqa: E402  (scripts/ is not a package)

sys.path.insert(0, str(cm.REPO))
from egspo import stats  # noqa: E402

ARMS = ["egspo/entropy/lam0", "egspo/uniform/lam0", "egspo/random/lam0",
        "egspo_sa/entropy/lam0.5", "diffu_grpo"]
SFT = "sft"  # the seed's SFT model: the start of every arm
# name → (A, B): the difference A − B. Differences whose arms were not run are left out.
COMPARISONS = {
    "entropy − uniform (λ 0)": ("egspo/entropy/lam0", "egspo/uniform/lam0"),
    "entropy − random (λ 0)": ("egspo/entropy/lam0", "egspo/random/lam0"),
    "uniform − random (λ 0)": ("egspo/uniform/lam0", "egspo/random/lam0"),
    "λ 0.5 − λ 0 (entropy)": ("egspo_sa/entropy/lam0.5", "egspo/entropy/lam0"),
    "EGSPO − diffu-GRPO (entropy, λ 0)": ("egspo/entropy/lam0", "diffu_grpo"),
    "EGSPO-SA − diffu-GRPO (entropy, λ 0.5)": ("egspo_sa/entropy/lam0.5", "diffu_grpo"),
    "EGSPO − SFT (entropy, λ 0)": ("egspo/entropy/lam0", SFT),
    "diffu-GRPO − SFT": ("diffu_grpo", SFT),
}
# Reported metric → the per-example score field (egspo.eval records); a metric is reported when
# every record has the field (Sudoku's cell accuracy is the number d1/EGSPO report for it).
METRICS = {"accuracy": "correct", "cell_accuracy": "cell_accuracy"}
# Run sizes: overrides of the config. 'smoke' checks the plumbing in about a minute per run.
SIZES = {
    "full": [],
    "smoke": ["--config.sft.steps=5", "--config.sft.warmup_steps=1",
              "--config.train.num_iterations=1", "--config.task.num_eval_examples=8",
              "--config.eval.batch_size=8"],
}

# Seconds on the README's 2-core machine, one run at a time, Countdown ':tiny' (results/2026-12-02):
#   SFT: whole run − RL train s of tiny_countdown_wsd.json, 345–386 s for 6000 steps (start-up
#        and the 7 evaluations of 1024 problems included) → per SFT step;
#   RL:  rl_train_seconds / 100 iterations in compare_methods.json, mean over its 3 seeds, plus
#        wall − rl_train_seconds of those runs (start-up, checkpoint restore, 2 evaluations;
#        8–18 s, mean 10.6) per run.
SFT_SECONDS_PER_STEP = 0.062
RL_SECONDS_PER_ITERATION = {
    "egspo/entropy/lam0": 0.47, "egspo/uniform/lam0": 0.53, "egspo/random/lam0": 0.59,
    "egspo_sa/entropy/lam0.5": 0.52, "egspo_sa/uniform/lam0.5": 0.52,
    "egspo_sa/random/lam0.5": 0.52, "diffu_grpo": 1.41, "espo": 3.18, "gdpo": 0.39,
    "stabledrl": 0.86,
}
RL_RUN_OVERHEAD_S = 11.0
# Sudoku ':tiny' (24 tokens in 12 steps, against Countdown's 16 in 8) relative to Countdown
# ':tiny', (SFT, RL) time ratios: 150 SFT steps and 12 EGSPO-SA iterations of each, back to back
# on the 2-core machine while other jobs ran (2026-12-02, load ~8): SFT 2.0 against 2.8 steps/s
# (steps 50-150), RL 2.78 against 1.30 s per iteration (median). Rough: the load varied.
TASK_TIME_FACTORS = {"countdown": (1.0, 1.0), "sudoku": (1.4, 2.1)}


def estimate_seconds(runs: list[cm.Run], sft_steps: int, iterations: int, task: str) -> float:
  """Seconds `runs` take one at a time on the README's machine (RATES above); nan when a task or
  method has no documented rate."""
  sft_f, rl_f = TASK_TIME_FACTORS.get(task, (math.nan, math.nan))
  total = 0.0
  for r in runs:
    if r.sft_dir is None:
      total += sft_f * SFT_SECONDS_PER_STEP * sft_steps
    else:
      rate = RL_SECONDS_PER_ITERATION.get(r.method, math.nan)
      total += RL_RUN_OVERHEAD_S + rl_f * rate * iterations
  return total


def arm_scores(runs: list[cm.Run]) -> tuple[list[int], dict[str, dict[str, np.ndarray]]]:
  """(seeds, {arm: {metric: [seeds, problems] per-example scores}}) from each run's last
  held-out evaluation; refuses arms of one seed evaluated on different problems."""
  records: dict[int, dict[str, list[dict]]] = {}
  for r in runs:
    records.setdefault(r.seed, {})[r.method] = cm.final_generations(r.workdir)
  seeds = sorted(records)
  arms = list(records[seeds[0]])
  for seed in seeds:
    if list(records[seed]) != arms:
      raise ValueError(f"seed {seed} has arms {list(records[seed])}, seed {seeds[0]} {arms}")
    questions = {arm: [x["question"] for x in recs] for arm, recs in records[seed].items()}
    for arm in arms[1:]:
      if questions[arm] != questions[arms[0]]:
        raise ValueError(f"seed {seed}: {arm} and {arms[0]} were evaluated on different "
                         "held-out problems (not paired)")
  every = [x["score"] for per_arm in records.values() for recs in per_arm.values() for x in recs]
  metrics = {m: f for m, f in METRICS.items() if all(f in s for s in every)}
  if "accuracy" not in metrics:
    raise ValueError("evaluation records without a 'correct' score")
  return seeds, {arm: {m: np.array([[float(x["score"][f]) for x in records[s][arm]] for s in seeds])
                       for m, f in metrics.items()} for arm in arms}


def differences(scores: dict, num_resamples: int, seed: int) -> list[dict]:
  """`stats.paired_bootstrap` of every COMPARISONS difference (and metric) whose arms ran."""
  rows = []
  for name, (a, b) in COMPARISONS.items():
    if a in scores and b in scores:
      for metric in scores[a]:
        rows.append({"difference": name, "a": a, "b": b, "metric": metric,
                     **stats.paired_bootstrap(scores[a][metric], scores[b][metric],
                                              num_resamples, seed)})
  return rows


def markdown(config: str, seeds: list[int], scores: dict, diffs: list[dict]) -> str:
  """The arms' held-out scores and the paired differences (in points) as markdown tables."""
  n = next(iter(next(iter(scores.values())).values())).shape[1]
  boot = diffs[0] if diffs else {"num_resamples": 0, "level": stats.LEVEL}
  lines = [f"{config}, seeds {', '.join(map(str, seeds))}, {n} held-out problems per seed "
           "(the same for every arm of a seed).", "",
           "| arm | metric | mean % | per seed |", "|---|---|---|---|"]
  for arm, per_metric in scores.items():
    for metric, x in per_metric.items():
      lines.append(f"| {arm} | {metric} | {100 * x.mean():.1f} | "
                   f"{', '.join(f'{100 * v:.1f}' for v in x.mean(axis=1))} |")
  lines += ["", f"Paired differences A − B in points, with {100 * boot['level']:.0f}% intervals "
            f"of a hierarchical bootstrap ({boot['num_resamples']:,} resamples of seeds, then "
            "problems within each seed; the same draws for both arms); significant = the "
            "interval excludes 0.", "",
            "| difference | metric | mean | 95% interval | significant | per seed |",
            "|---|---|---|---|---|---|"]
  for d in diffs:
    lines.append(f"| {d['difference']} | {d['metric']} | {100 * d['mean']:+.2f} | "
                 f"[{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}] | "
                 f"{'yes' if d['significant'] else 'no'} | "
                 f"{', '.join(f'{100 * v:+.1f}' for v in d['per_seed'])} |")
  return "\n".join(lines)


def run_rows(runs: list[cm.Run]) -> list[dict]:
  """Per run: held-out accuracy and times (from history.json)."""
  rows = []
  for r in runs:
    h = json.loads((r.workdir / "history.json").read_text())
    acc = h["before"] if r.sft_dir is None else cm.final_eval(h)
    rows.append({"arm": r.method, "seed": r.seed, "accuracy": acc["accuracy"],
                 "rl_train_seconds": h.get("rl_train_seconds"),
                 "wall_seconds": cm.wall_seconds(r.workdir), "workdir": str(r.workdir)})
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  cm.add_run_args(ap, seeds="0,1,2,3,4")
  ap.add_argument("--arms", default=",".join(ARMS),
                  help=f"comma-separated, from: {', '.join(cm.METHODS)}")
  ap.add_argument("--size", choices=list(SIZES), default="full",
                  help="'smoke': a few SFT steps, 1 RL iteration, 8 held-out problems")
  ap.add_argument("--out", default=None,
                  help="results stem: OUT.json, OUT.md (default results/<today>/ablation_<task>)")
  ap.add_argument("--runs", default=None, help="runs' workdirs (default runs/ablation_<task>)")
  ap.add_argument("--resamples", type=int, default=stats.NUM_RESAMPLES)
  ap.add_argument("--bootstrap_seed", type=int, default=0)
  a = ap.parse_args()
  arms = [m for m in a.arms.split(",") if m]
  seeds, common = cm.parse_run_args(ap, a, arms, pre=SIZES[a.size])
  if a.resamples < 1:
    ap.error(f"--resamples must be >= 1, got {a.resamples}")
  c = cm.resolved_config(common, a.config)
  task = c.task.name
  out = (pathlib.Path(a.out).expanduser().resolve() if a.out else
         cm.REPO / "results" / datetime.date.today().isoformat() / f"ablation_{task}")
  runs_dir = (pathlib.Path(a.runs).expanduser().resolve() if a.runs else
              cm.REPO / "runs" / f"ablation_{task}")
  runs = cm.plan_runs(runs_dir, seeds, arms, common)
  pending = [r for r in runs if not r.done]
  est = estimate_seconds(pending, c.sft.steps, c.train.num_iterations, task)
  print(f"{len(runs)} runs ({len(seeds)} seeds × (SFT + {len(arms)} arms), {c.sft.steps} SFT "
        f"steps, {c.train.num_iterations} RL iterations), {len(pending)} to do: estimated "
        f"{est / 3600:.1f} h ({est / 60:.0f} min) one at a time on the README's 2-core machine"
        + (f", at best {est / 3600 / a.jobs:.1f} h with --jobs {a.jobs} (the runs share its "
           "cores)" if a.jobs > 1 else "")
        + ("; fewer than the issue's 5 seeds" if len(seeds) < 5 else ""), flush=True)
  cm.Runner(a.config, a.jobs, a.dry_run).run_all(runs)
  if a.dry_run:
    return
  seeds, scores = arm_scores(runs)
  diffs = differences(scores, a.resamples, a.bootstrap_seed)
  md = markdown(a.config, seeds, scores, diffs)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_name(out.name + ".json").write_text(json.dumps({
      "config": a.config, "overrides": common, "seeds": seeds, "arms": arms,
      "runs": run_rows(runs), "differences": diffs,
      # per arm, metric and seed: the per-example scores, space-separated, in problem order
      "scores": {arm: {m: [" ".join(f"{v:g}" for v in row) for row in x]
                       for m, x in per.items()} for arm, per in scores.items()},
  }, indent=1))
  out.with_name(out.name + ".md").write_text(md + "\n")
  print(md)
  print(f"wrote {out}.json and {out}.md")


if __name__ == "__main__":
  main()
