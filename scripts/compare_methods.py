"""Every RL method on a `:tiny` setting (`--config`, Countdown by default), × seeds, from one shared
SFT checkpoint per seed (issue 5): held-out accuracy (mean ± spread over seeds), FLOPs per RL
iteration and wall time, as a markdown table. `scripts/ablation.py` runs its arms the same way.

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
Finished runs (a `history.json` in the workdir) are not re-run and unfinished ones resume from
their checkpoints, so an interrupted comparison resumes where it stopped; `--jobs N` runs up to N
at once (`Runner`). Results: OUT/results.json (raw) and OUT/results.md (the table).

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
import concurrent.futures
import json
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import typing

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/countdown.py:tiny"
WALL_FILE = "wall_seconds.txt"  # in a run's workdir, written by Runner

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


def resolved_config(overrides: list[str], config: str = CONFIG):
  """The experiment config `config` (FILE.py[:variant], relative to the repository) with
  `--config.a.b=v` overrides applied (values parsed as Python literals, else kept as strings)."""
  sys.path.insert(0, str(REPO))
  from egspo import config as config_lib  # noqa: PLC0415

  c = config_lib.load_config(str(REPO / config))
  for arg in overrides:
    if not arg.startswith("--config."):
      raise ValueError(f"override {arg!r} is not of the form --config.a.b=value")
    path, _, raw = arg[len("--config."):].partition("=")
    config_lib.check_field(c, path)  # ConfigError naming the unknown field
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


class Run(typing.NamedTuple):
  """One `egspo.main` run: a seed's SFT stage (method 'sft') or a method's RL from it."""
  method: str
  seed: int
  workdir: pathlib.Path
  args: tuple[str, ...]
  sft_dir: pathlib.Path | None = None  # RL runs: the seed's SFT run, whose checkpoint they start from

  @property
  def done(self) -> bool:
    return (self.workdir / "history.json").exists()


def plan_runs(out: pathlib.Path, seeds: list[int], methods: list[str], common: list[str]
              ) -> list[Run]:
  """Per seed: one SFT run (`train.num_iterations=0`, the SFT model evaluated) in OUT/seedS/sft,
  then every method in OUT/seedS/<method>, each starting from that SFT checkpoint."""
  runs = []
  sft_common = [x for x in common if not x.startswith("--config.train.num_iterations=")]
  for seed in seeds:
    base, seed_args = out / f"seed{seed}", [f"--config.seed={seed}"]
    sft = Run("sft", seed, base / "sft", tuple(seed_args + sft_common + [
        "--config.train.num_iterations=0", "--config.eval.before_training=True"]))
    runs.append(sft)
    runs += [Run(m, seed, base / slug(m), tuple(seed_args + common + METHODS[m] + [
        "--config.eval.before_training=False"]), sft.workdir) for m in methods]
  return runs


def command(config: str, run: Run) -> list[str]:
  return [sys.executable, "-m", "egspo.main", f"--config={config}", f"--workdir={run.workdir}",
          *run.args]


class Runner:
  """Runs `Run`s with `egspo.main`, up to `jobs` subprocesses at once.

  Finished runs (a history.json) are skipped. Every SFT run is started before any RL run, and an
  RL run waits for its seed's SFT run. An unfinished RL run resumes from its own checkpoints (a
  new one first gets the SFT checkpoint copied in). On a failure the runs still going get SIGTERM
  (egspo.main saves a checkpoint, so a rerun resumes them) and the failure is raised.
  """

  def __init__(self, config: str = CONFIG, jobs: int = 1, dry_run: bool = False,
               sft_from: pathlib.Path | None = None):
    if jobs < 1:
      raise ValueError(f"jobs must be >= 1, got {jobs}")
    self.config, self.jobs, self.dry_run, self.sft_from = config, jobs, dry_run, sft_from
    self._procs: set[subprocess.Popen] = set()
    self._lock = threading.Lock()

  def run_all(self, runs: list[Run]) -> dict[pathlib.Path, float]:
    """Runs the unfinished `runs`; returns {workdir: wall seconds} of those it ran."""
    todo = sorted((r for r in runs if not r.done), key=lambda r: r.sft_dir is not None)
    if self.dry_run:
      for r in todo:
        print("$", " ".join(command(self.config, r)), flush=True)
      return {}
    futures = {}
    with concurrent.futures.ThreadPoolExecutor(self.jobs) as pool:
      for r in todo:  # FIFO: the SFT runs are taken first, so a waiting RL run never blocks one
        futures[r.workdir] = pool.submit(self._run, r, futures.get(r.sft_dir))
      try:
        for f in concurrent.futures.as_completed(futures.values()):
          f.result()
      except BaseException:
        for f in futures.values():
          f.cancel()
        self._terminate()
        raise
    return {wd: f.result() for wd, f in futures.items()}

  def _run(self, run: Run, sft: concurrent.futures.Future | None) -> float:
    if sft is not None:
      sft.result()  # raises if the seed's SFT run failed
    if run.sft_dir is None and self.sft_from is not None:
      adopt_sft(self.sft_from / f"seed{run.seed}" / "egspo_sa", run.workdir)
      return 0.0
    if run.sft_dir is not None and not (run.workdir / "checkpoints" / "sft").exists():
      tmp = run.workdir / "checkpoints" / "sft.copying"  # an interrupted copy is redone
      shutil.rmtree(tmp, ignore_errors=True)
      shutil.copytree(run.sft_dir / "checkpoints" / "sft", tmp)
      tmp.rename(tmp.with_name("sft"))
    cmd = command(self.config, run)
    print("$", " ".join(cmd), flush=True)
    run.workdir.parent.mkdir(parents=True, exist_ok=True)
    log = run.workdir.parent / f"{run.workdir.name}.log"
    t0 = time.time()
    with open(log, "a") as f:
      with self._lock:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        self._procs.add(proc)
      rc = proc.wait()
      with self._lock:
        self._procs.discard(proc)
    wall = (wall_seconds(run.workdir) or 0.0) + time.time() - t0  # over resumptions
    (run.workdir / WALL_FILE).write_text(f"{wall:.1f}\n")
    if rc:
      raise RuntimeError(f"run failed (exit {rc}); see {log}")
    if not run.done:
      raise RuntimeError(f"run stopped before the end (no history.json; rerun to resume); see {log}")
    return wall

  def _terminate(self) -> None:
    with self._lock:
      for proc in self._procs:
        proc.terminate()


def wall_seconds(workdir: pathlib.Path) -> float | None:
  """The wall seconds the Runner spent on the run (all its attempts), None if it ran none."""
  f = workdir / WALL_FILE
  return float(f.read_text()) if f.exists() else None


def final_eval(history: dict) -> dict:
  evals = sorted((int(k.split("_")[1]), v) for k, v in history.items()
                 if k.startswith("eval_") and isinstance(v, dict))
  if not evals:
    raise ValueError("the run's history holds no evaluation after RL (task.num_eval_examples=0?)")
  return evals[-1][1]


def final_generations(workdir: pathlib.Path) -> list[dict]:
  """The per-example records (`egspo.eval.generation_records`: question, generations, score with
  "correct", ...) of the run's last held-out evaluation, workdir/eval/eval_<step>.json."""
  files = sorted((int(m.group(1)), p) for p in (workdir / "eval").glob("eval_*.json")
                 if (m := re.fullmatch(r"eval_(\d+)\.json", p.name)))
  if not files:
    raise ValueError(f"{workdir / 'eval'} holds no eval_<step>.json (task.num_eval_examples=0?)")
  results = json.loads(files[-1][1].read_text())["results"]
  if len(results) != 1:
    raise ValueError(f"{files[-1][1]}: expected one generation length, got {sorted(results)}")
  return next(iter(results.values()))["generations"]


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


def method_rows(runs: list[Run], config: str = CONFIG) -> list[dict]:
  """One row per run: held-out accuracy (the SFT model's for 'sft'), times and analytic FLOPs."""
  rows = []
  for r in runs:
    h = json.loads((r.workdir / "history.json").read_text())
    if r.sft_dir is None:
      rows.append({"method": "sft", "seed": r.seed, "accuracy": h["before"]["accuracy"]})
      continue
    rows.append({"method": r.method, "seed": r.seed, "accuracy": final_eval(h)["accuracy"],
                 "rl_train_seconds": float(h.get("rl_train_seconds", float("nan"))),
                 "seconds_per_iteration": median_iteration_seconds(r.workdir / "metrics.jsonl"),
                 "wall_seconds": wall_seconds(r.workdir),
                 "flops_per_iteration": iteration_flops(resolved_config(list(r.args), config))})
  return rows


def table(rows: list[dict], methods: list[str], iterations: int | None,
          config: str = CONFIG) -> str:
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
  note = (f"\n{n_seeds} seed(s), {config}"
          + (f", train.num_iterations={iterations}" if iterations is not None else "")
          + "; sd = sample standard deviation over seeds.")
  return "\n".join(lines) + "\n" + note


# ----------------------------------------------------------------------------------------------
# Command line (shared with scripts/ablation.py)


def add_run_args(ap: argparse.ArgumentParser, seeds: str) -> None:
  """The options of a multi-seed study: config, seeds, iterations, jobs, dry run, overrides."""
  ap.add_argument("--config", default=CONFIG, help="FILE.py[:variant], relative to the repository")
  ap.add_argument("--seeds", default=seeds)
  ap.add_argument("--iterations", type=int, default=None,
                  help="train.num_iterations for every method (default: the config's)")
  ap.add_argument("--jobs", type=int, default=1, help="runs at once (subprocesses)")
  ap.add_argument("--dry-run", action="store_true", help="print the commands only")
  ap.add_argument("extra", nargs="*", help="extra --config.x=y overrides for every run")


def parse_run_args(ap: argparse.ArgumentParser, a, methods: list[str], pre: list[str] = ()
                   ) -> tuple[list[int], list[str]]:
  """(seeds, common overrides) from `add_run_args`' options; errors name the bad value."""
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    ap.error(f"unknown methods {unknown}; known: {list(METHODS)}")
  if a.jobs < 1:
    ap.error(f"--jobs must be >= 1, got {a.jobs}")
  try:
    seeds = [int(s) for s in a.seeds.split(",") if s]
  except ValueError:
    ap.error(f"--seeds must be comma-separated integers, got {a.seeds!r}")
  common = list(pre) + list(a.extra)
  if a.iterations is not None:
    common.append(f"--config.train.num_iterations={a.iterations}")
  from egspo import config as config_lib  # noqa: PLC0415

  for m in methods:  # fail fast on a bad config or override, before hours of runs
    try:
      config_lib.validate(resolved_config(common + METHODS[m], a.config))
    except Exception as e:  # pylint: disable=broad-except  (ConfigError, KeyError of a bad field…)
      ap.error(f"--config {a.config} with {' '.join(common + METHODS[m])}: "
               f"{type(e).__name__}: {e}")
  return seeds, common


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  add_run_args(ap, seeds="0,1,2")
  ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                  help=f"comma-separated, from: {', '.join(METHODS)}")
  ap.add_argument("--out", default="runs/compare_methods")
  ap.add_argument("--sft_from", default=None,
                  help="OUT of a scripts/tiny_countdown.py run with the same seeds and SFT "
                       "settings: reuse its SFT checkpoints (OUT/seedS/egspo_sa) instead of "
                       "training SFT again")
  a = ap.parse_args()
  methods = [m for m in a.methods.split(",") if m]
  seeds, common = parse_run_args(ap, a, methods)
  out = pathlib.Path(a.out).expanduser().resolve()
  runs = plan_runs(out, seeds, methods, common)
  sft_from = pathlib.Path(a.sft_from).expanduser().resolve() if a.sft_from else None
  Runner(a.config, a.jobs, a.dry_run, sft_from).run_all(runs)
  if a.dry_run:
    return
  rows = method_rows(runs, a.config)
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(rows, indent=1))
  md = table(rows, methods, a.iterations, a.config)
  (out / "results.md").write_text(md + "\n")
  print(md)


if __name__ == "__main__":
  main()
