"""Small-model ablations: one SFT warm start shared by several RL variants, and their curves.

Used by `notebooks/small_model_ablation.ipynb` (the notebook only calls these functions):

    config = ablation.ablation_config("colab")                # the 'tiny' countdown config
    sft_dir = ablation.warm_start(config, root / "sft")       # SFT only, checkpointed
    runs = ablation.run_variants(config, sft_dir, root, ablation.VARIANTS)
    ablation.plot_curves(runs, "rl/reward", "reward.png")

Every variant starts from the same SFT checkpoint (copied into its workdir, where the trainer's
resume logic picks it up) and uses the same seed, so the variants differ only in what they
ablate: the step selection (entropy top-K vs uniform vs random, REFERENCE §3.3) and the stepwise
advantage weight λ (0 = EGSPO's sequence advantage, 0.5 = EGSPO-SA, REFERENCE §3.5–3.6).
Curves are read back from each run's `metrics.jsonl` (`egspo.metrics`). Run directories are
local; relative ones are resolved against the current directory.
"""

from __future__ import annotations

import copy
import pathlib
import shutil
from typing import Any, Mapping

import numpy as np

from egspo import config as config_lib
from egspo import paths
from egspo import metrics as metrics_lib

# name → config overrides ("section.field": value). λ 0 is the `egspo` algorithm (no value
# estimates); λ 0.5 the `egspo_sa` algorithm.
VARIANTS: dict[str, dict[str, Any]] = {
    "entropy, λ=0": {"algorithm": "egspo", "egspo.selection": "entropy"},
    "uniform, λ=0": {"algorithm": "egspo", "egspo.selection": "uniform"},
    "random, λ=0": {"algorithm": "egspo", "egspo.selection": "random"},
    "entropy, λ=0.5": {"algorithm": "egspo_sa", "egspo.selection": "entropy", "egspo.lam": 0.5},
}

# The notebook's run sizes: overrides of the 'tiny' config ("section.field": value).
SIZES: dict[str, dict[str, Any]] = {
    # A few minutes on a CPU (tests/test_notebook.py): checks that everything runs; 60 SFT steps
    # and 6 RL iterations are far too few for the curves to mean anything.
    "test": {
        "sft.steps": 60, "sft.batch_size": 32, "sft.warmup_steps": 10,
        "batch.num_prompts": 4, "batch.group_size": 4, "batch.micro_batch_size": 16,
        "task.num_eval_examples": 32, "eval.batch_size": 32,
        "train.num_iterations": 6, "train.eval_every": 2, "train.checkpoint_every": 10**6,
    },
    # The notebook's default: the tiny SFT warm start as configured (6000 steps, 5-6 min on the
    # README's 2-core machine), then 150 RL iterations per variant (~0.45 s each) evaluated every
    # 25 on the 1024 held-out problems: ~12-13 min in all there (estimated from the tiny run's
    # measured parts, not run end to end); more on a free Colab CPU runtime (not measured).
    "colab": {"train.num_iterations": 150, "train.eval_every": 25},
    # The ':tiny' schedule as configured: 450 RL iterations per variant, evaluated every 75.
    "full": {},
}

# The metrics plotted by the notebook (written by `egspo.train`).
REWARD = "rl/reward"
ACCURACY = "eval/accuracy"


def set_fields(config, overrides: Mapping[str, Any]):
  """A copy of `config` with dotted fields replaced ({"egspo.lam": 0.5}); unknown fields raise."""
  c = copy.deepcopy(config)
  for key, value in overrides.items():
    node, *path = [c] + key.split(".")
    for p in path[:-1]:
      if p not in node:
        raise ValueError(f"config has no section {p!r} (in override {key!r})")
      node = node[p]
    if path[-1] not in node:
      raise ValueError(f"config has no field {key!r}")
    node[path[-1]] = value
  return c


def ablation_config(size: str = "colab", task: str = "countdown", seed: int = 0):
  """The CPU ('tiny') config of `task` with the overrides of `SIZES[size]`, on one device."""
  if size not in SIZES:
    raise ValueError(f"unknown ablation size {size!r}; known: {', '.join(SIZES)}")
  c = config_lib.base_config(task, "tiny")
  c.seed = seed
  c.mesh.num_devices = 1
  c = set_fields(c, SIZES[size])
  config_lib.validate(c)
  return c


def warm_start(config, workdir) -> pathlib.Path:
  """Runs the SFT stage only (`train.num_iterations` = 0) in `workdir`; returns `workdir`.

  Reuses a finished warm start already in `workdir` (the trainer resumes from its checkpoint).
  """
  from egspo import train  # local: importing the trainer starts JAX

  c = set_fields(config, {"train.num_iterations": 0, "eval.before_training": False})
  if c.sft.steps <= 0:
    raise ValueError("warm_start needs sft.steps > 0")
  workdir = local_dir(workdir)
  _run(train, c, workdir)
  return workdir


def run_variant(config, sft_dir, workdir, overrides: Mapping[str, Any] | None = None) -> dict:
  """RL from the SFT checkpoint in `sft_dir` with `overrides`; returns the evaluation history.

  The SFT checkpoints are copied to `workdir/checkpoints/sft`, so the trainer's SFT stage
  restores them (nothing re-trained) and every variant starts from the same parameters.
  """
  from egspo import train

  src = local_dir(sft_dir) / "checkpoints" / "sft"
  if not src.is_dir():
    raise ValueError(f"no SFT checkpoint under {src} (run warm_start first)")
  workdir = local_dir(workdir)
  dst = workdir / "checkpoints" / "sft"
  if not dst.exists():  # copied under a temporary name: an interrupted copy is redone
    tmp = dst.with_name(dst.name + ".copying")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    tmp.rename(dst)
  return _run(train, set_fields(config, overrides or {}), workdir)


def _run(train, config, workdir) -> dict:
  """`train.run`, stopping the whole ablation when the run was interrupted (Ctrl-C/SIGTERM save a
  checkpoint and return; calling the same cell again resumes)."""
  history = train.run(config, str(workdir))
  if history.get("preempted"):
    raise KeyboardInterrupt(f"interrupted in {workdir} (checkpoint saved; run again to resume)")
  return history


def run_variants(config, sft_dir, root, variants: Mapping[str, Mapping[str, Any]] = VARIANTS
                 ) -> dict[str, pathlib.Path]:
  """Runs every variant in `root/<slug of its name>`; returns {name: workdir}."""
  runs = {}
  for name, overrides in variants.items():
    workdir = local_dir(root) / slug(name)
    run_variant(config, sft_dir, workdir, overrides)
    runs[name] = workdir
  return runs


def local_dir(path) -> pathlib.Path:
  """`path` as an absolute local directory name ('~' expanded, relative to the current one)."""
  s = str(path)
  if "://" in s:
    raise ValueError(f"ablation run directories are local; got {s!r}")
  return pathlib.Path(paths.resolve_path(s))


def slug(name: str) -> str:
  """A directory name for a variant name ("entropy, λ=0.5" → "entropy_lam0.5")."""
  s = name.replace("λ=", "lam").replace(",", "").replace(" ", "_")
  return "".join(ch for ch in s if ch.isalnum() or ch in "._-")


def load_curve(workdir, key: str) -> tuple[np.ndarray, np.ndarray]:
  """(global steps, values) of metric `key` in `workdir/metrics.jsonl` (null values skipped)."""
  records = metrics_lib.read_jsonl(pathlib.Path(workdir) / metrics_lib.JSONL_NAME)
  pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
  if not pts:
    return np.zeros(0, np.int64), np.zeros(0, np.float64)
  steps, values = zip(*pts)
  return np.asarray(steps, np.int64), np.asarray(values, np.float64)


def moving_average(values, window: int) -> np.ndarray:
  """Trailing mean over the last `window` points (fewer at the start): [N] → [N]."""
  values = np.asarray(values, np.float64)
  if window < 1:
    raise ValueError(f"window must be >= 1, got {window}")
  c = np.cumsum(np.concatenate([[0.0], values]))
  idx = np.arange(1, len(values) + 1)
  lo = np.maximum(idx - window, 0)
  return (c[idx] - c[lo]) / (idx - lo)


def plot_curves(runs: Mapping[str, Any], key: str, path, *, title: str | None = None,
                ylabel: str | None = None, smooth: int = 1, offset_steps: int = 0):
  """Line plot of metric `key` for each run ({name: workdir}), saved as PNG at `path`.

  smooth: trailing moving-average window; offset_steps is subtracted from the global step
  (pass sft.steps to count RL iterations). Returns the path.
  """
  try:
    import matplotlib  # optional: the "notebook" extra
  except ImportError:
    raise ImportError('plot_curves needs matplotlib (pip install -e ".[notebook]")') from None

  matplotlib.use("Agg")  # files only: works without a display (and inside nbclient)
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  plotted = 0
  for name, workdir in runs.items():
    steps, values = load_curve(workdir, key)
    if len(steps):
      ax.plot(steps - offset_steps, moving_average(values, smooth), marker="o", ms=3, label=name)
      plotted += 1
  if not plotted:
    plt.close(fig)
    raise ValueError(f"no run has metric {key!r}")
  ax.set_xlabel("RL iteration" if offset_steps else "step")
  ax.set_ylabel(ylabel or key)
  ax.set_title(title or key)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  path = pathlib.Path(path)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def summary(runs: Mapping[str, Any], last: int = 3) -> list[dict[str, Any]]:
  """Per run: mean reward over its last `last` iterations, first and final eval accuracy."""
  rows = []
  for name, workdir in runs.items():
    _, reward = load_curve(workdir, REWARD)
    _, acc = load_curve(workdir, ACCURACY)
    rows.append(dict(variant=name, iterations=len(reward),
                     reward_last=float(np.mean(reward[-last:])) if len(reward) else float("nan"),
                     accuracy_first=float(acc[0]) if len(acc) else float("nan"),
                     accuracy_final=float(acc[-1]) if len(acc) else float("nan")))
  return rows


__all__ = ["VARIANTS", "SIZES", "REWARD", "ACCURACY", "set_fields", "ablation_config",
           "warm_start", "run_variant", "run_variants", "local_dir", "slug", "load_curve",
           "moving_average", "plot_curves", "summary"]
