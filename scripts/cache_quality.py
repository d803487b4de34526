"""Issue 15's quality targets for the sampler's block K/V cache (`eval.cache`, `rollout.cache`;
egspo/diffusion/cache.py) on a `:tiny` task, from one SFT checkpoint per seed.

Quality: each seed's SFT checkpoint evaluated greedily on the held-out problems with every
`--modes` cache mode (and every `--block_lengths` evaluation block length): eval-only runs, the
checkpoint copied into a new workdir (`train.num_iterations=0`, `eval.before_training`) →
accuracy (Sudoku: and cell accuracy) and the token agreement of each mode's generations with
those of `none` at the same block length (`token_agreement`); with `--refreshes`, the cached
modes also with `eval.cache_refresh` = each value (a full forward every r steps of a block), at
the config's block length; such a row's mode reads e.g. `dual r2`.
RL: from the same checkpoint, `--method` (EGSPO-SA, entropy, λ 0.5 by default; compare_methods'
METHODS) for the config's `train.num_iterations` with `rollout.cache` = each of `--rl_modes`,
evaluated with the default `eval.cache=none` so the accuracies are comparable → held-out accuracy
after RL, the paired hierarchical-bootstrap difference against `none` (seeds, then problems;
`egspo.stats.paired_bootstrap`), seconds per iteration (compare_methods'
`median_iteration_seconds`) and the mean `rl/tis/logp_gap` and `rl/tis/capped_frac` of metrics.jsonl.

Runs are compare_methods' (`Run`, `Runner`): finished ones are skipped, so a rerun (e.g. with
more seeds) only runs what is new. With `--from DIR` (a compare_methods / ablation runs folder,
DIR/seedS/{sft, <method slug>}) each seed's SFT run is DIR's (it must be finished) and DIR's
finished cache-none arm of `--method` is reused unless `--runs` holds a finished one; otherwise
they run in `--runs`.

    python scripts/cache_quality.py --config configs/countdown.py:tiny --seeds 0,1,2 \\
        --from /work/ablation_runs/countdown
    python scripts/cache_quality.py --config configs/sudoku.py:tiny --seeds 0 --rl_seeds ''
    python scripts/cache_quality.py --seeds 0 --rl_seeds 0 --runs /tmp/cq --out /tmp/cq/res \\
        -- --config.sft.steps=5 --config.train.num_iterations=2 --config.task.num_eval_examples=8

Results: OUT.json holds one entry per config (a run replaces its config's entry, keeping the
others), OUT.md the tables of every entry; OUT defaults to results/<today>/cache_quality.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import pathlib
import shlex
import statistics
import subprocess
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import ablation  # noqa: E402  (scripts/ is not a package; METRICS: metric → score field)
import compare_methods as cm  # noqa: E402

from egspo import stats  # noqa: E402  (compare_methods put the repository on the path)

MODES = ("none", "prefix", "dual")
METHOD = "egspo_sa/entropy/lam0.5"
TIS_KEYS = ("rl/tis/logp_gap", "rl/tis/capped_frac")
PHASES = ("rollout", "plan", "update")  # rl/time/<phase>: the cache moves time between them
QUALITY_TOLERANCE = 0.01  # issue 15: prefix / dual within 1 point of none


# ----------------------------------------------------------------------------------------------
# Pure parts


def token_agreement(reference: list[str], other: list[str], encode=list) -> dict:
  """Agreement of two lists of generations, example by example: `token_agreement` = tokens equal
  at the same position / the longer generation's tokens, summed over examples (a missing
  position counts as a disagreement); `identical` = the fraction of examples generated alike.
  `encode` maps a text to its tokens (one character per token for the char tokenizer)."""
  if len(reference) != len(other):
    raise ValueError(f"token_agreement: {len(reference)} reference generations, {len(other)} others")
  if not reference:
    raise ValueError("token_agreement: no generations")
  agree = total = same = 0
  for a, b in zip(reference, other):
    ta, tb = list(encode(a)), list(encode(b))
    agree += sum(x == y for x, y in zip(ta, tb))
    total += max(len(ta), len(tb))
    same += ta == tb
  return {"token_agreement": agree / total if total else 1.0, "identical": same / len(reference),
          "num_examples": len(reference)}


def mean_logged(rows: list[dict], key: str) -> float:
  """Mean of `key` over the metrics rows that log it; nan when none does."""
  xs = [r[key] for r in rows if key in r]
  return statistics.fmean(xs) if xs else math.nan


def median_phase_seconds(rows: list[dict]) -> dict[str, float]:
  """Median over RL iterations of each `rl/time/<phase>` (PHASES); nan for a phase never logged."""
  out = {}
  for phase in PHASES:
    xs = [r[f"rl/time/{phase}"] for r in rows if f"rl/time/{phase}" in r]
    out[phase] = statistics.median(xs) if xs else math.nan
  return out


def binomial_se(p: float, n: int) -> float:
  """Standard error of an accuracy p measured on n problems."""
  return math.sqrt(p * (1.0 - p) / n)


def _pct(x) -> str:
  return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def quality_table(rows: list[dict]) -> str:
  """Markdown: one row per (seed, block length, mode), Δ against `none` of the same seed and
  block length in points."""
  cells = any("cell_accuracy" in r for r in rows)
  head = ("| seed | eval block | cache | accuracy % | Δ vs none (points) | "
          + ("cell accuracy % | Δ cells | " if cells else "")
          + "token agreement with none % | identical generations % |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  none = {(r["seed"], r["block_length"]): r for r in rows if r["mode"] == "none"}
  for r in rows:
    ref = none.get((r["seed"], r["block_length"]))
    d = f"{100 * (r['accuracy'] - ref['accuracy']):+.1f}" if ref else "–"
    line = f"| {r['seed']} | {r['block_length']} | {r['mode']} | {_pct(r['accuracy'])} | {d} | "
    if cells:
      dc = (f"{100 * (r['cell_accuracy'] - ref['cell_accuracy']):+.1f}"
            if ref and "cell_accuracy" in r else "–")
      line += f"{_pct(r.get('cell_accuracy'))} | {dc} | "
    line += f"{_pct(r.get('token_agreement'))} | {_pct(r.get('identical'))} |"
    lines.append(line)
  return "\n".join(lines)


def mode_means(rows: list[dict]) -> list[dict]:
  """Per (block length, mode): the seed-mean accuracy (and cell accuracy) and its Δ against
  `none`, over the seeds that have both."""
  none = {(r["seed"], r["block_length"]): r for r in rows if r["mode"] == "none"}
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    if (r["seed"], r["block_length"]) in none:
      groups.setdefault((r["block_length"], r["mode"]), []).append(r)
  out = []
  for (block, mode), rs in groups.items():
    row = {"block_length": block, "mode": mode, "seeds": [r["seed"] for r in rs]}
    for m in ablation.METRICS:
      if all(m in r for r in rs):
        row[m] = statistics.fmean(r[m] for r in rs)
        row[f"delta_{m}"] = statistics.fmean(
            r[m] - none[(r["seed"], r["block_length"])][m] for r in rs)
    if all("token_agreement" in r for r in rs):
      row["token_agreement"] = statistics.fmean(r["token_agreement"] for r in rs)
    out.append(row)
  return out


def means_table(means: list[dict]) -> str:
  """Markdown: one row per (block length, mode), seed means."""
  lines = ["| eval block | cache | seeds | accuracy % (mean) | Δ vs none (points) | "
           "token agreement % |", "|---|---|---|---|---|---|"]
  for m in means:
    d = m.get("delta_accuracy")
    lines.append(f"| {m['block_length']} | {m['mode']} | {len(m['seeds'])} | "
                 f"{_pct(m.get('accuracy'))} | {'–' if d is None else f'{100 * d:+.1f}'} | "
                 f"{_pct(m.get('token_agreement'))} |")
  return "\n".join(lines)


def quality_verdict(rows: list[dict], tolerance: float = QUALITY_TOLERANCE) -> dict:
  """The largest |mode − none| over seeds and block lengths, per metric, and whether every
  cached mode is within `tolerance` of `none`."""
  none = {(r["seed"], r["block_length"]): r for r in rows if r["mode"] == "none"}
  worst = {}
  for r in rows:
    ref = none.get((r["seed"], r["block_length"]))
    if r["mode"] == "none" or ref is None:
      continue
    for m in ablation.METRICS:
      if m in r and m in ref:
        worst[m] = max(worst.get(m, 0.0), abs(r[m] - ref[m]))
  return {"max_abs_diff": worst, "tolerance": tolerance,
          "holds": bool(worst) and all(v <= tolerance + 1e-12 for v in worst.values())}


def rl_table(rows: list[dict]) -> str:
  """Markdown: one row per (seed, rollout cache) RL run."""
  lines = ["| seed | rollout cache | SFT % | after RL % | s / iteration (median) | "
           "rollout / plan / update s (medians) | RL train s | mean tis/logp_gap | "
           "mean tis/capped_frac | run |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    gap, cap = (r.get(k, math.nan) for k in TIS_KEYS)
    phases = " / ".join(f"{r['phase_seconds'][p]:.3f}" for p in PHASES)
    lines.append(f"| {r['seed']} | {r['mode']} | {_pct(r['sft_accuracy'])} | "
                 f"{_pct(r['accuracy'])} | {r['seconds_per_iteration']:.2f} | {phases} | "
                 f"{r['rl_train_seconds']:.0f} | "
                 + ("–" if math.isnan(gap) else f"{gap:.4f}") + " | "
                 + ("–" if math.isnan(cap) else f"{cap:.4f}") + f" | {r['source']} |")
  return "\n".join(lines)


def rl_verdict(per_example: dict[str, np.ndarray], mode: str, num_resamples: int, seed: int
               ) -> dict:
  """`mode` − none on [seeds, problems] per-example correctness: the paired bootstrap, the
  binomial SE of one run and of the seed-mean difference of two independent runs. Two readings
  of "within noise": the paired 95% interval covers 0 (`within_noise`), and |mean| ≤ 2 binomial
  SEs of the seed-mean difference (`within_2se`, the issue's yardstick)."""
  a, b = per_example[mode], per_example["none"]
  boot = stats.paired_bootstrap(a, b, num_resamples, seed)
  s, n = a.shape
  se_run = binomial_se(float(b.mean()), n)
  se_diff = se_run * math.sqrt(2 / s)
  return {**boot, "binomial_se_run": se_run, "binomial_se_mean_diff": se_diff,
          "within_noise": not boot["significant"],
          "within_2se": abs(boot["mean"]) <= 2 * se_diff, "num_seeds": s, "num_problems": n}


def markdown(entry: dict) -> str:
  """One config's tables and verdicts."""
  q, lines = entry["quality"], [f"### {entry['config']}", ""]
  if q["rows"]:
    v = q["verdict"]
    worst = ", ".join(f"{m} {100 * x:.1f}" for m, x in v["max_abs_diff"].items())
    lines += [quality_table(q["rows"]), "", means_table(mode_means(q["rows"])), "",
              f"Largest |cached − none| (points): {worst or '–'}; target (≤ "
              f"{100 * v['tolerance']:.0f} point): **{'holds' if v['holds'] else 'missed'}**.", ""]
  rl = entry["rl"]
  if rl["rows"]:
    lines += [rl_table(rl["rows"]), ""]
    for mode, v in rl["verdicts"].items():
      lines.append(
          f"{mode} − none after RL over {v['num_seeds']} seed(s) × {v['num_problems']} problems: "
          f"{100 * v['mean']:+.2f} points, 95% paired-bootstrap interval [{100 * v['lo']:+.2f}, "
          f"{100 * v['hi']:+.2f}] (per seed {', '.join(f'{100 * d:+.1f}' for d in v['per_seed'])}"
          f"): the interval {'covers' if v['within_noise'] else 'excludes'} 0. Binomial SE of "
          f"one run {100 * v['binomial_se_run']:.2f} points, of the seed-mean difference of "
          f"independent runs {100 * v['binomial_se_mean_diff']:.2f}: |Δ| = "
          f"{abs(v['mean']) / v['binomial_se_mean_diff']:.1f} SE, "
          f"{'within' if v['within_2se'] else 'beyond'} 2 SE.")
    lines.append("")
  lines.append(f"{entry['note']}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Runs


def plan(runs_dir: pathlib.Path, from_dir: pathlib.Path | None, seeds: list[int],
         rl_seeds: list[int], modes: list[str], block_lengths: list[int | None],
         rl_modes: list[str], method: str, common: list[str], refreshes: tuple[int, ...] = (),
         config: str = cm.CONFIG, rl_refreshes: tuple[int, ...] = (0,)) -> dict:
  """{"sft": {seed: Run}, "eval": [(block_length, Run)], "rl": [Run]}; eval and RL runs start
  from their seed's SFT run (DIR's with --from). Names: eval/<mode>[/b<L>], eval/<mode>/r<r>
  (the cached modes with `eval.cache_refresh` r, at the config's block length), rl/<mode>,
  rl/<mode>/r<r> (the cached modes with each `rollout.cache_refresh` r of rl_refreshes, 0 = the
  block start only: rl/<mode>). A finished --from run is
  the rl/none reference only if its config.json is this comparison's (`same_config`)."""
  sft, evals, rl = {}, [], []
  for s in sorted(set(seeds) | set(rl_seeds)):
    seed_arg = [f"--config.seed={s}"]
    if from_dir is not None:
      run = cm.Run("sft", s, from_dir / f"seed{s}" / "sft", ())
      if not run.done:
        raise SystemExit(f"--from: {run.workdir} holds no finished SFT run (no history.json); "
                         f"drop seed {s} or wait for it")
    else:
      base = [x for x in common if not x.startswith("--config.train.num_iterations=")]
      run = cm.Run("sft", s, runs_dir / f"seed{s}" / "sft", tuple(seed_arg + base + [
          "--config.train.num_iterations=0", "--config.eval.before_training=True"]))
    sft[s] = run
  for s in seeds:
    for length in block_lengths:
      suffix = "" if length is None else f"_b{length}"
      extra = [] if length is None else [f"--config.eval.block_length={length}"]
      for mode in modes:
        evals.append((length, cm.Run(f"eval/{mode}{suffix.replace('_', '/')}", s,
                                     runs_dir / f"seed{s}" / f"eval_{mode}{suffix}",
                                     tuple([f"--config.seed={s}"] + common + extra + [
                                         "--config.train.num_iterations=0",
                                         "--config.eval.before_training=True",
                                         f"--config.eval.cache={mode}"]), sft[s].workdir)))
    for r in refreshes:
      for mode in (m for m in modes if m != "none"):
        evals.append((None, cm.Run(f"eval/{mode}/r{r}", s, runs_dir / f"seed{s}" / f"eval_{mode}_r{r}",
                                   tuple([f"--config.seed={s}"] + common + [
                                       "--config.train.num_iterations=0",
                                       "--config.eval.before_training=True",
                                       f"--config.eval.cache={mode}",
                                       f"--config.eval.cache_refresh={r}"]), sft[s].workdir)))
  for s in rl_seeds:
    for mode in rl_modes:
      for r in (rl_refreshes if mode != "none" else (0,)):
        name, extra = (f"{mode}/r{r}", [f"--config.rollout.cache_refresh={r}"]) if r else (mode, [])
        args = tuple([f"--config.seed={s}"] + common + cm.METHODS[method] + [
            f"--config.rollout.cache={mode}", "--config.eval.before_training=False"] + extra)
        own = cm.Run(f"rl/{name}", s, runs_dir / f"seed{s}" / f"rl_{name.replace('/', '_')}",
                     args, sft[s].workdir)
        reuse = own._replace(workdir=from_dir / f"seed{s}" / cm.slug(method)) if from_dir else own
        rl.append(reuse if (mode == "none" and reuse.done and not own.done
                            and same_config(reuse, config)) else own)
  return {"sft": sft, "eval": evals, "rl": rl}


def same_config(run: cm.Run, config: str) -> bool:
  """Whether `run`'s saved config.json is the one its arguments resolve to: a --from run of
  another `train.num_iterations` (the ablation's 100) or of an older commit's fields is not the
  reference of this comparison and is run again here instead."""
  saved = run.workdir / "config.json"
  if not saved.exists():
    return False
  want = json.loads(cm.resolved_config(list(run.args), config).to_json_best_effort())
  return json.loads(saved.read_text()) == want


def _eval_file(workdir: pathlib.Path) -> dict:
  """The last evaluation's file: {"protocol", "results": {length: {"metrics", "generations"}}}."""
  files = sorted(workdir.glob("eval/eval_*.json"), key=lambda p: int(p.stem.split("_")[1]))
  if not files:
    raise ValueError(f"{workdir / 'eval'} holds no eval_<step>.json")
  return json.loads(files[-1].read_text())


def quality_rows(evals: list[tuple[int | None, cm.Run]]) -> list[dict]:
  """Per eval run: its metrics and the token agreement with `none` of the same seed and block
  length; refuses a file whose protocol is not the run's cache mode."""
  rows, texts = [], {}
  for _, r in evals:
    ev, mode = _eval_file(r.workdir), r.method.split("/")[1]
    if ev["protocol"]["cache"] != mode:
      raise ValueError(f"{r.workdir}: evaluated with cache {ev['protocol']['cache']!r}, not {mode!r}")
    refresh = ev["protocol"].get("cache_refresh", 0)
    mode += f" r{refresh}" if refresh else ""
    (res,) = ev["results"].values()
    block = ev["protocol"]["block_length"]
    texts[(r.seed, block, mode)] = [g["generations"] for g in res["generations"]]
    row = {"seed": r.seed, "block_length": block, "mode": mode, "workdir": str(r.workdir)}
    row.update({m: float(res["metrics"][m]) for m in ablation.METRICS if m in res["metrics"]})
    rows.append(row)
  for row in rows:
    ref = texts.get((row["seed"], row["block_length"], "none"))
    if ref is not None:
      row.update(token_agreement(ref, texts[(row["seed"], row["block_length"], row["mode"])]))
  return rows


def rl_mode(run: cm.Run) -> str:
  """'rl/dual/r2' → 'dual r2' (the quality tables' name), 'rl/none' → 'none'."""
  return run.method.split("/", 1)[1].replace("/", " ")


def rl_rows(rl: list[cm.Run], sft: dict, runs_dir: pathlib.Path) -> list[dict]:
  rows = []
  for r in rl:
    h = json.loads((r.workdir / "history.json").read_text())
    metrics = [json.loads(l) for l in (r.workdir / "metrics.jsonl").read_text().splitlines()]
    before = json.loads((sft[r.seed].workdir / "history.json").read_text())["before"]
    rows.append({"seed": r.seed, "mode": rl_mode(r),
                 "accuracy": cm.final_eval(h)["accuracy"], "sft_accuracy": before["accuracy"],
                 "seconds_per_iteration": cm.median_iteration_seconds(r.workdir / "metrics.jsonl"),
                 "rl_train_seconds": float(h.get("rl_train_seconds", math.nan)),
                 "phase_seconds": median_phase_seconds(metrics),
                 **{k: mean_logged(metrics, k) for k in TIS_KEYS},
                 "source": "this script" if runs_dir in r.workdir.parents else "--from",
                 "workdir": str(r.workdir)})
  return rows


def per_example(rl: list[cm.Run]) -> dict[str, np.ndarray]:
  """{mode: [seeds, problems] correctness}, refusing runs of a seed on different problems."""
  recs = {}
  for r in rl:
    recs.setdefault(rl_mode(r), {})[r.seed] = cm.final_generations(r.workdir)
  seeds = sorted(recs["none"])
  for mode, by_seed in recs.items():
    for s in seeds:
      if [x["question"] for x in by_seed[s]] != [x["question"] for x in recs["none"][s]]:
        raise ValueError(f"seed {s}: rl/{mode} and rl/none were evaluated on different problems")
  return {mode: np.array([[float(x["score"]["correct"]) for x in by_seed[s]] for s in seeds])
          for mode, by_seed in recs.items()}


def _ints(ap, text: str, flag: str) -> list[int]:
  try:
    return [int(x) for x in text.split(",") if x]
  except ValueError:
    ap.error(f"{flag} must be comma-separated integers, got {text!r}")


def _modes(ap, text: str, flag: str) -> list[str]:
  modes = [m for m in text.split(",") if m]
  bad = [m for m in modes if m not in MODES]
  if bad:
    ap.error(f"{flag}: unknown cache modes {bad}; allowed: {', '.join(MODES)}")
  return modes


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--config", default=cm.CONFIG, help="FILE.py[:variant], relative to the repository")
  ap.add_argument("--seeds", default="0", help="seeds of the quality evaluations")
  ap.add_argument("--rl_seeds", default=None, help="seeds of the RL runs (default: --seeds; '' for none)")
  ap.add_argument("--modes", default=",".join(MODES), help="eval.cache modes")
  ap.add_argument("--block_lengths", default="",
                  help="extra eval.block_length values evaluated beside the config's")
  ap.add_argument("--refreshes", default="",
                  help="eval.cache_refresh values evaluated for the cached modes (config's block)")
  ap.add_argument("--rl_modes", default="dual,none", help="rollout.cache modes (none is the reference)")
  ap.add_argument("--rl_refreshes", default="0",
                  help="rollout.cache_refresh values of the RL runs of the cached --rl_modes "
                       "(0: refilled at each block's start only)")
  ap.add_argument("--method", default=METHOD, help=f"one of: {', '.join(cm.METHODS)}")
  ap.add_argument("--from", dest="from_dir", default=None,
                  help="a compare_methods / ablation runs folder: its SFT runs and finished "
                       "cache-none --method runs are reused")
  ap.add_argument("--runs", default=None, help="workdirs (default runs/cache_quality_<task>)")
  ap.add_argument("--out", default=None,
                  help="results stem: OUT.json, OUT.md (default results/<today>/cache_quality)")
  ap.add_argument("--resamples", type=int, default=stats.NUM_RESAMPLES)
  ap.add_argument("--dry-run", action="store_true", help="print the commands only")
  ap.add_argument("extra", nargs="*", help="extra --config.x=y overrides for every run")
  a = ap.parse_args()
  seeds = _ints(ap, a.seeds, "--seeds")
  rl_seeds = seeds if a.rl_seeds is None else _ints(ap, a.rl_seeds, "--rl_seeds")
  modes, rl_modes = _modes(ap, a.modes, "--modes"), _modes(ap, a.rl_modes, "--rl_modes")
  if rl_seeds and "none" not in rl_modes:
    ap.error("--rl_modes must include none (the reference of the comparison)")
  if "none" not in modes:
    ap.error("--modes must include none (the reference of the token agreement)")
  if a.method not in cm.METHODS:
    ap.error(f"--method: unknown {a.method!r}; known: {', '.join(cm.METHODS)}")
  c = cm.resolved_config(list(a.extra), a.config)
  block_lengths = [None] + [b for b in _ints(ap, a.block_lengths, "--block_lengths")
                            if b != c.eval.block_length]
  task = c.task.name
  runs_dir = (pathlib.Path(a.runs).expanduser().resolve() if a.runs else
              cm.REPO / "runs" / f"cache_quality_{task}")
  out = (pathlib.Path(a.out).expanduser().resolve() if a.out else
         cm.REPO / "results" / datetime.date.today().isoformat() / "cache_quality")
  from_dir = pathlib.Path(a.from_dir).expanduser().resolve() if a.from_dir else None
  refreshes = tuple(r for r in _ints(ap, a.refreshes, "--refreshes") if r)
  rl_refreshes = tuple(dict.fromkeys(_ints(ap, a.rl_refreshes, "--rl_refreshes")))
  if not rl_refreshes or min(rl_refreshes) < 0:
    ap.error(f"--rl_refreshes: non-negative integers expected, got {a.rl_refreshes!r}")
  p = plan(runs_dir, from_dir, seeds, rl_seeds, modes, block_lengths, rl_modes, a.method,
           list(a.extra), refreshes, a.config, rl_refreshes)
  runner = cm.Runner(a.config, 1, a.dry_run)
  runner.run_all(list(p["sft"].values()) + [r for _, r in p["eval"]] + p["rl"])
  if a.dry_run:
    return
  qrows = quality_rows(p["eval"])
  rrows = rl_rows(p["rl"], p["sft"], runs_dir)
  verdicts = {}
  if p["rl"]:
    scores = per_example(p["rl"])
    verdicts = {m: rl_verdict(scores, m, a.resamples, 0) for m in scores if m != "none"}
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cm.REPO, capture_output=True,
                          text=True, check=False).stdout.strip()
  entry = {"config": a.config, "overrides": list(a.extra), "method": a.method, "commit": commit,
           "command": shlex.join(["python", "scripts/cache_quality.py"] + sys.argv[1:]),
           "quality": {"rows": qrows, "verdict": quality_verdict(qrows)},
           "rl": {"rows": rrows, "verdicts": verdicts},
           "note": (f"{task}: {c.task.num_eval_examples} held-out problems per seed, greedy"
                    + (f"; RL {c.train.num_iterations} iterations of {a.method}, evaluated with "
                       "eval.cache=none" if rl_seeds else "")
                    + f"; commit {commit}. Times on the 2-core machine, loaded.")}
  json_file, md_file = out.with_name(out.name + ".json"), out.with_name(out.name + ".md")
  entries = json.loads(json_file.read_text()) if json_file.exists() else {}
  entries[a.config] = entry
  out.parent.mkdir(parents=True, exist_ok=True)
  json_file.write_text(json.dumps(entries, indent=1))
  md_file.write_text("\n\n".join(markdown(e) for e in entries.values()) + "\n")
  print(markdown(entry))
  print(f"wrote {json_file} and {md_file}")


if __name__ == "__main__":
  main()
