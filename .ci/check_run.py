"""CI checks of the README's first command (the `:tiny` run in WORKDIR).

    python .ci/check_run.py learned WORKDIR            # held-out accuracy after RL > before RL
    python .ci/check_run.py snapshot WORKDIR > F       # what a resumed run must leave unchanged
    python .ci/check_run.py unchanged WORKDIR F        # ... and that it did
"""

import json
import pathlib
import re
import sys


def learned(workdir: pathlib.Path) -> None:
  h = json.loads((workdir / "history.json").read_text())
  evals = sorted((int(k.split("_")[1]), v) for k, v in h.items() if re.fullmatch(r"eval_\d+", k))
  if "before" not in h or not evals:
    sys.exit(f"FAIL: {workdir}/history.json lacks the pre-RL or a post-RL evaluation: {list(h)}")
  before, (it, after) = h["before"]["accuracy"], evals[-1]
  print(f"held-out accuracy: before RL {100 * before:.1f}%, after {it} RL iterations "
        f"{100 * after['accuracy']:.1f}%")
  if not after["accuracy"] > before:
    sys.exit("FAIL: RL did not raise held-out accuracy")


def snapshot(workdir: pathlib.Path) -> dict:
  ckpts = {stage: sorted(p.name for p in (workdir / "checkpoints" / stage).iterdir())
           for stage in ("sft", "rl") if (workdir / "checkpoints" / stage).exists()}
  rows = (workdir / "metrics.jsonl").read_text().splitlines()
  return {"checkpoints": ckpts, "metrics_rows": len(rows),
          "history": json.loads((workdir / "history.json").read_text())}


def main(argv):
  what, workdir = argv[1], pathlib.Path(argv[2])
  if what == "learned":
    learned(workdir)
  elif what == "snapshot":
    print(json.dumps(snapshot(workdir)))
  elif what == "unchanged":
    before, now = json.loads(pathlib.Path(argv[3]).read_text()), snapshot(workdir)
    for k in before:
      if before[k] != now[k]:
        sys.exit(f"FAIL: the resumed run changed {k}: {before[k]} -> {now[k]}")
    print(f"resumed without retraining: checkpoints {now['checkpoints']}, "
          f"{now['metrics_rows']} metrics rows, history unchanged")
  else:
    sys.exit(__doc__)


if __name__ == "__main__":
  main(sys.argv)
