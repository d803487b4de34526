"""Every RL method on the `:tiny` Countdown setting, × seeds, from one shared SFT checkpoint per seed
(issue 5): held-out accuracy (mean ± spread over seeds), FLOPs per RL iteration and wall time, as a
markdown table.

For each seed S:
  1. SFT once: `python -m egspo.main --config=configs/countdown.py:tiny --config.seed=S
     --config.train.num_iterations=0` (with `eval.before_training`, so its history holds the SFT
     model's held-out accuracy: the table's "SFT" row);
  2. every method starts from that very checkpoint: `checkpoints/sft` is copied into the method's
     workdir, where the SFT stage finds it complete and skips to RL; all methods then train for
     the same `train.num_iterations` (the same number of rollouts) and are evaluated on the same
     held-out problems (generated from the seed stream reserved for evaluation).
With `--sft_from OUT_OF_TINY_COUNTDOWN`, step 1 is skipped and the SFT checkpoint (and its held-out
accuracy) of `scripts/tiny_countdown.py`'s run of the same seed is reused: the same config and seed
give the same SFT stage, so this only saves its minutes.
Finished runs (a `history.json` in the workdir) are not re-run, so an interrupted comparison
resumes where it stopped. Results: OUT/results.json (raw) and OUT/results.md (the table).

    python scripts/compare_methods.py --seeds 0,1,2 --out runs/compare_methods
    python scripts/compare_methods.py --seeds 0 --iterations 1 --methods espo,gdpo \\
        --out /tmp/cmp -- --config.sft.steps=5 --config.task.num_eval_examples=16

FLOPs per RL iteration are analytic (multiply-add = 2 FLOPs), from the model config and the
forward / backward counts each method does per iteration; evaluation and rewards are excluded:

  F(S, h)  = 2·n_layers·(2d² + 2d·d_kv + 3d·d_ff)·S + 4·n_layers·S²·d + 2·d·V·h
             one forward of a canvas of S = P + G tokens with the LM head at h positions (the
             same formula as benchmarks/train_step.py; norms, RoPE and softmax left out)
  rollout  = B·T·F(S, G)                                  (T denoising steps, B = prompts × G)
  EGSPO(-SA)     : + B·K·F(S, M) reference  + 3·B·K·F(S, M) update (backward = 2 × forward)
                   K selected steps, M = most tokens one step commits; the one-step value of
                   EGSPO-SA reuses rollout logits (rewards only, no FLOPs)
  diffu-GRPO     : + μ·B·F(S, G)·(1 + [β>0]) old/ref  + 3·μ·B·F(S, G) update
  ESPO/GDPO/...  : + μ·B·E·F(S, G)·(1 + [β>0]) old/ref + 3·μ·B·E·F(S, G) update, with E forwards
                   per ELBO estimate: ESPO 2·num_mc (coupled) or num_mc, GDPO num_nodes,
                   StableDRL/wd1 those of their estimator; StableDRL has no reference pass and
                   wd1 neither old nor reference pass
μ = the method's `num_iterations` (optimizer steps per rollout).

Wall time: `rl_train_seconds` of the run's history (rollout + reward + plan + update, no
evaluation; compilation included), mean over seeds; and seconds per iteration, the median over
iterations of the same phases from metrics.jsonl (compilation excluded), mean over seeds. Spread: the sample standard deviation over seeds (ddof = 1).
"""

from __future__ import annotations

import argparse
import ast
import json
import pathlib
import shutil
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/countdown.py:tiny"

# name → config overrides. EGSPO with entropy / uniform / random step selection at λ = 0 (plain
# EGSPO) and λ = 0.5 (EGSPO-SA), then the baselines with their published hyperparameters.
METHODS = {
    "egspo/entropy/lam0": ["--config.algorithm=egspo", "--config.egspo.selection=entropy"],
    "egspo/uniform/lam0": ["--config.algorithm=egspo", "--config.egspo.selection=uniform"],
    "egspo/random/lam0": ["--config.algorithm=egspo", "--config.egspo.selection=random"],
    "egspo_sa/entropy/lam0.5": ["--config.algorithm=egspo_sa", "--config.egspo.selection=entropy",
                                "--config.egspo.lam=0.5"],
    "egspo_sa/uniform/lam0.5": ["--config.algorithm=egspo_sa", "--config.egspo.selection=uniform",
                                "--config.egspo.lam=0.5"],
    "egspo_sa/random/lam0.5": ["--config.algorithm=egspo_sa", "--config.egspo.selection=random",
                               "--config.egspo.lam=0.5"],
    "diffu_grpo": ["--config.algorithm=diffu_grpo"],
    "espo": ["--config.algorithm=espo"],
    "gdpo": ["--config.algorithm=gdpo"],
    "stabledrl": ["--config.algorithm=stabledrl"],
    "wd1": ["--config.algorithm=wd1"],
}
DEFAULT_METHODS = [m for m in METHODS if m != "wd1"]


# ----------------------------------------------------------------------------------------------
# Configs and FLOPs


def resolved_config(overrides: list[str]):
  """The experiment config of `CONFIG` with `--config.a.b=v` overrides applied (values parsed as
  Python literals, else kept as strings)."""
  sys.path.insert(0, str(REPO))
  from configs import countdown  # noqa: PLC0415

  c = countdown.get_config(CONFIG.split(":")[1])
  for arg in overrides:
    if not arg.startswith("--config."):
      raise ValueError(f"override {arg!r} is not of the form --config.a.b=value")
    path, _, raw = arg[len("--config."):].partition("=")
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    node = c
    *parents, last = path.split(".")
    for p in parents:
      node = node[p]
    if isinstance(node[last], float) and isinstance(value, int):
      value = float(value)
    node[last] = value
  return c


def forward_flops(cfg, seq_len: int, head_positions: int) -> float:
  """F(S, h) of the module docstring: one LLaDA forward of S tokens, LM head at h positions."""
  d, f = cfg.d_model, cfg.mlp_hidden_size
  kv = cfg.n_kv_heads * cfg.head_dim
  body = 2.0 * cfg.n_layers * (2 * d * d + 2 * d * kv + 3 * d * f) * seq_len
  attn = 4.0 * cfg.n_layers * seq_len * seq_len * d
  return body + attn + 2.0 * d * cfg.embedding_size * head_positions


def estimator_forwards(section) -> int:
  """Forwards per row of one ELBO estimate (egspo.diffusion.masking.ESTIMATORS)."""
  est = section.get("estimator", "espo")
  if est == "espo":
    return section.num_mc * (2 if section.get("coupled", True) else 1)
  if est == "gauss_legendre":
    return section.num_nodes
  return section.num_mc  # double_mc


def iteration_flops(c) -> dict:
  """Analytic FLOPs of one RL iteration of config `c` → {rollout, plan, update, total}."""
  from egspo.diffusion import sampler as sampler_lib  # noqa: PLC0415
  from egspo.model import llada  # noqa: PLC0415
  from egspo.tokenizer import CharTokenizer  # noqa: PLC0415

  cfg = llada.get_config(c.model.preset, vocab=CharTokenizer())
  b = c.batch.num_prompts * c.batch.group_size
  p, g, t = c.rollout.max_prompt_length, c.rollout.gen_length, c.rollout.steps
  s = p + g
  rollout = b * t * forward_flops(cfg, s, g)
  algo = c.algorithm
  if algo in ("egspo", "egspo_sa"):
    scfg = sampler_lib.SamplerConfig(gen_length=g, steps=t, block_length=c.rollout.block_length,
                                     mask_token_id=cfg.mask_token_id)
    m = int(sampler_lib.commit_schedule(scfg).max())
    k = c.egspo.num_selected_steps
    plan = b * k * forward_flops(cfg, s, m)
    update = 3.0 * b * k * forward_flops(cfg, s, m)
  else:
    sec = c[algo]
    mu = sec.num_iterations
    e = 1 if algo == "diffu_grpo" else (
        sec.num_mc * (2 if sec.coupled else 1) if algo == "espo" else
        sec.num_nodes if algo == "gdpo" else estimator_forwards(sec))
    passes = 1 if algo == "stabledrl" else 0 if algo == "wd1" else 1 + (sec.beta > 0)
    plan = passes * mu * b * e * forward_flops(cfg, s, g)
    update = 3.0 * mu * b * e * forward_flops(cfg, s, g)
  return dict(rollout=rollout, plan=plan, update=update, total=rollout + plan + update)


# ----------------------------------------------------------------------------------------------
# Runs


def run_main(workdir: pathlib.Path, args: list[str], dry_run: bool) -> float:
  cmd = [sys.executable, "-m", "egspo.main", f"--config={CONFIG}", f"--workdir={workdir}"] + args
  print("$", " ".join(cmd), flush=True)
  if dry_run:
    return 0.0
  workdir.parent.mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  log = workdir.parent / f"{workdir.name}.log"
  with open(log, "w") as f:
    proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
  if proc.returncode:
    raise SystemExit(f"run failed (exit {proc.returncode}); see {log}")
  return time.time() - t0


def final_eval(history: dict) -> dict:
  evals = sorted((int(k.split("_")[1]), v) for k, v in history.items()
                 if k.startswith("eval_") and isinstance(v, dict))
  if not evals:
    raise ValueError("the run's history holds no evaluation after RL (task.num_eval_examples=0?)")
  return evals[-1][1]


def median_iteration_seconds(metrics_file: pathlib.Path) -> float:
  """Median over RL iterations of rollout + reward + plan + update seconds (the median keeps the
  first iterations' compilation out)."""
  per_it = []
  for line in metrics_file.read_text().splitlines():
    r = json.loads(line)
    if "rl/time/update" in r:
      per_it.append(sum(r.get(f"rl/time/{k}", 0.0) for k in ("rollout", "reward", "plan", "update")))
  return statistics.median(per_it) if per_it else float("nan")


def slug(method: str) -> str:
  return method.replace("/", "_")


def adopt_sft(src: pathlib.Path, sft_dir: pathlib.Path) -> None:
  """Reuse the SFT stage of an earlier run of the same config and seed (e.g. a
  `scripts/tiny_countdown.py` run): its `checkpoints/sft` and the SFT model's held-out accuracy."""
  ckpt, hist = src / "checkpoints" / "sft", src / "history.json"
  if not (ckpt.is_dir() and hist.exists()):
    raise SystemExit(f"--sft_from: {src} holds no checkpoints/sft and history.json")
  before = json.loads(hist.read_text()).get("before")
  if not before:
    raise SystemExit(f"--sft_from: {hist} has no 'before' (SFT model) evaluation")
  shutil.rmtree(sft_dir, ignore_errors=True)
  shutil.copytree(ckpt, sft_dir / "checkpoints" / "sft")
  (sft_dir / "history.json").write_text(json.dumps({"before": before, "copied_from": str(src)}))


def run_seed(out: pathlib.Path, seed: int, methods: list[str], common: list[str],
             dry_run: bool, sft_from: pathlib.Path | None = None) -> list[dict]:
  base = out / f"seed{seed}"
  sft_dir = base / "sft"
  seed_args = [f"--config.seed={seed}"]
  if sft_from is not None and not (sft_dir / "history.json").exists() and not dry_run:
    adopt_sft(sft_from / f"seed{seed}" / "egspo_sa", sft_dir)
  if not (sft_dir / "history.json").exists():
    sft_common = [x for x in common if not x.startswith("--config.train.num_iterations=")]
    run_main(sft_dir, seed_args + sft_common + ["--config.train.num_iterations=0",
                                                "--config.eval.before_training=True"], dry_run)
  rows = []
  if not dry_run:
    h = json.loads((sft_dir / "history.json").read_text())
    rows.append({"method": "sft", "seed": seed, "accuracy": h["before"]["accuracy"]})
  for method in methods:
    wd = base / slug(method)
    args = seed_args + common + METHODS[method] + ["--config.eval.before_training=False"]
    wall = None
    if not (wd / "history.json").exists():
      if not dry_run:
        # Start from the seed's SFT checkpoint (a stale partial run of this method is discarded).
        shutil.rmtree(wd, ignore_errors=True)
        shutil.copytree(sft_dir / "checkpoints" / "sft", wd / "checkpoints" / "sft")
      wall = run_main(wd, args, dry_run)
    if dry_run:
      continue
    h = json.loads((wd / "history.json").read_text())
    flops = iteration_flops(resolved_config(args))
    rows.append({"method": method, "seed": seed, "accuracy": final_eval(h)["accuracy"],
                 "rl_train_seconds": float(h.get("rl_train_seconds", float("nan"))),
                 "seconds_per_iteration": median_iteration_seconds(wd / "metrics.jsonl"),
                 "wall_seconds": wall, "flops_per_iteration": flops})
  return rows


def table(rows: list[dict], methods: list[str], iterations: int | None) -> str:
  def stats(xs):
    m = statistics.fmean(xs)
    sd = statistics.stdev(xs) if len(xs) > 1 else float("nan")
    return m, sd

  lines = ["| method | held-out accuracy % (mean ± sd) | per seed | Δ vs SFT | "
           "GFLOP / iteration (rollout + plan + update) | s / iteration (median) | "
           "RL train s (mean) |",
           "|---|---|---|---|---|---|---|"]
  sft = [r["accuracy"] for r in rows if r["method"] == "sft"]
  sft_mean = statistics.fmean(sft) if sft else float("nan")
  if sft:
    m, sd = stats(sft)
    lines.append(f"| SFT (start of every method) | {100 * m:.1f} ± {100 * sd:.1f} | "
                 f"{', '.join(f'{100 * x:.1f}' for x in sft)} | | | | |")
  for method in methods:
    rs = [r for r in rows if r["method"] == method]
    if not rs:
      continue
    acc = [r["accuracy"] for r in rs]
    m, sd = stats(acc)
    f = rs[0]["flops_per_iteration"]
    secs = statistics.fmean(r["rl_train_seconds"] for r in rs)
    per_it = statistics.fmean(r["seconds_per_iteration"] for r in rs)
    lines.append(f"| {method} | {100 * m:.1f} ± {100 * sd:.1f} | "
                 f"{', '.join(f'{100 * x:.1f}' for x in acc)} | {100 * (m - sft_mean):+.1f} | "
                 f"{f['total'] / 1e9:.2f} ({f['rollout'] / 1e9:.2f} + {f['plan'] / 1e9:.2f} + "
                 f"{f['update'] / 1e9:.2f}) | {per_it:.2f} | {secs:.0f} |")
  n_seeds = len(sft)
  note = (f"\n{n_seeds} seed(s), {CONFIG}"
          + (f", train.num_iterations={iterations}" if iterations is not None else "")
          + "; sd = sample standard deviation over seeds.")
  return "\n".join(lines) + "\n" + note


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                  help=f"comma-separated, from: {', '.join(METHODS)}")
  ap.add_argument("--iterations", type=int, default=None,
                  help="train.num_iterations for every method (default: the config's)")
  ap.add_argument("--out", default="runs/compare_methods")
  ap.add_argument("--dry-run", action="store_true", help="print the commands only")
  ap.add_argument("--sft_from", default=None,
                  help="OUT of a scripts/tiny_countdown.py run with the same seeds and SFT "
                       "settings: reuse its SFT checkpoints (OUT/seedS/egspo_sa) instead of "
                       "training SFT again")
  ap.add_argument("extra", nargs="*", help="extra --config.x=y overrides for every run")
  a = ap.parse_args()
  methods = [m for m in a.methods.split(",") if m]
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    ap.error(f"unknown methods {unknown}; known: {list(METHODS)}")
  common = list(a.extra)
  if a.iterations is not None:
    common.append(f"--config.train.num_iterations={a.iterations}")
  resolved_config(common)  # fail fast on a bad override
  out = pathlib.Path(a.out).expanduser().resolve()
  rows = []
  for seed in [int(s) for s in a.seeds.split(",")]:
    rows += run_seed(out, seed, methods, common, a.dry_run,
                     pathlib.Path(a.sft_from).expanduser().resolve() if a.sft_from else None)
    if not a.dry_run:
      out.mkdir(parents=True, exist_ok=True)
      (out / "results.json").write_text(json.dumps(rows, indent=1))
  if a.dry_run:
    return
  md = table(rows, methods, a.iterations)
  (out / "results.md").write_text(md + "\n")
  print(md)


if __name__ == "__main__":
  main()
