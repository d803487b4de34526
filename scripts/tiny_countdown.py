"""The `:tiny` Countdown experiment of issue 4, for several seeds, with its SFT control.

For each seed:
  1. `python -m egspo.main --config=configs/countdown.py:tiny --config.seed=S` — SFT warm start,
     held-out accuracy of the SFT model, EGSPO-SA RL, held-out accuracy after RL (wall time measured);
  2. the control: the same SFT checkpoint, SFT continued for the RL stage's training wall time
     (`--config.sft.time_budget_s`), then the same held-out evaluation.
Prints a markdown table (accuracy of SFT / after RL / SFT control, gains, times) and writes it
with the raw numbers to OUT/results.json.

    python scripts/tiny_countdown.py --seeds 0,1,2 --out runs/tiny_countdown [-- --config.x=y ...]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_main(workdir: pathlib.Path, args: list[str]) -> float:
  cmd = [sys.executable, "-m", "egspo.main", "--config=configs/countdown.py:tiny",
         f"--workdir={workdir}"] + args
  print("$", " ".join(cmd), flush=True)
  t0 = time.time()
  with open(workdir.parent / f"{workdir.name}.log", "w") as log:
    subprocess.run(cmd, cwd=REPO, check=True, stdout=log, stderr=subprocess.STDOUT)
  return time.time() - t0


def final_eval(history: dict) -> dict:
  evals = sorted((int(k.split("_")[1]), v) for k, v in history.items()
                 if k.startswith("eval_") and isinstance(v, dict))
  return evals[-1][1] if evals else history["before"]


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--out", default="runs/tiny_countdown")
  ap.add_argument("extra", nargs="*", help="extra --config.x=y overrides for both runs")
  a = ap.parse_args()
  out = pathlib.Path(a.out).expanduser().resolve()
  out.mkdir(parents=True, exist_ok=True)
  rows = []
  for seed in [int(s) for s in a.seeds.split(",")]:
    base = out / f"seed{seed}"
    base.mkdir(exist_ok=True)
    rl_dir, ctl_dir = base / "egspo_sa", base / "sft_control"
    wall = run_main(rl_dir, [f"--config.seed={seed}"] + a.extra)
    h = json.loads((rl_dir / "history.json").read_text())
    budget = float(h["rl_train_seconds"])
    # The control starts from the very SFT checkpoint the RL run started from.
    shutil.rmtree(ctl_dir, ignore_errors=True)
    shutil.copytree(rl_dir / "checkpoints" / "sft", ctl_dir / "checkpoints" / "sft")
    # SFT goes on where it stopped: same data stream position, optimizer state and, past the end
    # of the original schedule (sft.schedule_steps), at the learning rate that schedule ended with.
    run_main(ctl_dir, [f"--config.seed={seed}", "--config.sft.steps=100000000",
                       f"--config.sft.schedule_steps={int(h['sft_steps'])}",
                       f"--config.sft.time_budget_s={budget}", "--config.train.num_iterations=0"]
             + a.extra)
    hc = json.loads((ctl_dir / "history.json").read_text())
    rows.append({"seed": seed, "sft": h["before"]["accuracy"], "rl": final_eval(h)["accuracy"],
                 "sft_control": hc["before"]["accuracy"], "rl_train_seconds": budget,
                 "total_wall_seconds": wall})
    (out / "results.json").write_text(json.dumps(rows, indent=1))

  lines = ["| seed | SFT | SFT + EGSPO-SA | SFT continued (same time) | RL gain | control gain | "
           "RL train s | whole run s |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['seed']} | {100 * r['sft']:.1f} | {100 * r['rl']:.1f} | "
                 f"{100 * r['sft_control']:.1f} | {100 * (r['rl'] - r['sft']):+.1f} | "
                 f"{100 * (r['sft_control'] - r['sft']):+.1f} | {r['rl_train_seconds']:.0f} | "
                 f"{r['total_wall_seconds']:.0f} |")
  n = len(rows)
  mean = lambda k: sum(r[k] for r in rows) / n  # noqa: E731
  lines.append(f"| mean | {100 * mean('sft'):.1f} | {100 * mean('rl'):.1f} | "
               f"{100 * mean('sft_control'):.1f} | {100 * (mean('rl') - mean('sft')):+.1f} | "
               f"{100 * (mean('sft_control') - mean('sft')):+.1f} | | |")
  table = "\n".join(lines)
  (out / "results.md").write_text(table + "\n")
  print(table)


if __name__ == "__main__":
  main()
