"""Does the release's decoding change EGSPO-SA's one-step values? (issue 12, item 10)

The project decodes a completion up to its first EOS with special tokens dropped; the release,
in training, decodes every position with special tokens dropped (text after an EOS still counts).
The one-step value V(s_t) = r(x̂0(s_t)) scores the sampler's guesses x̂0, which often hold tokens
after an EOS, so the two decodings can give different values. This script takes a trained `:tiny`
SFT checkpoint, samples rollouts as RL does (the training prompt stream, the rollout sampler at
its temperature), scores x̂0 at every denoising step with both decodings, and prints how often
the value differs and by how much, and the same for the final rewards.

    python scripts/decoding_values.py --sft_run runs/tiny --batches 4
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import tempfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


def compare(values_a: np.ndarray, values_b: np.ndarray) -> dict:
  """Fraction of entries that differ and mean / max absolute difference."""
  a, b = np.asarray(values_a, np.float64), np.asarray(values_b, np.float64)
  d = np.abs(a - b)
  return {"n": int(d.size), "differ_frac": float(np.mean(d > 0)), "mean_abs_diff": float(d.mean()),
          "max_abs_diff": float(d.max()) if d.size else 0.0}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--sft_run", required=True, help="a run directory holding checkpoints/sft")
  ap.add_argument("--config", default="configs/countdown.py:tiny")
  ap.add_argument("--batches", type=int, default=4, help="rollout batches (prompts × G each)")
  ap.add_argument("--json", default=None, help="also write the figures here")
  a = ap.parse_args()

  sys.path.insert(0, str(REPO))
  import jax  # pylint: disable=import-outside-toplevel

  from egspo import config as config_lib  # pylint: disable=import-outside-toplevel
  from egspo import train, trainer  # pylint: disable=import-outside-toplevel
  from egspo.diffusion import sampler as sampler_lib  # pylint: disable=import-outside-toplevel
  from egspo.rl import value  # pylint: disable=import-outside-toplevel

  src = pathlib.Path(a.sft_run).expanduser().resolve() / "checkpoints" / "sft"
  if not src.is_dir():
    raise SystemExit(f"--sft_run: {src} is not a directory")
  c = config_lib.load_config(str(REPO / a.config))
  c.train.num_iterations = 0
  c.eval.before_training = False
  with tempfile.TemporaryDirectory() as tmp:
    work = pathlib.Path(tmp) / "run"
    shutil.copytree(src, work / "checkpoints" / "sft")
    tr = trainer.Trainer.create(c, work)
    params = train.sft_stage(tr)  # the finished SFT checkpoint, restored
    scfg = trainer.sampler_config(c, tr.model_cfg, "rollout")
    rollout = train.make_rollout(tr, scfg)
    stream = tr.train_stream(c.batch.num_prompts, c.batch.group_size, seed=c.seed,
                             held_out=tr.eval_examples())
    decoders = {
        name: (lambda ids, o=sampler_lib.decode_options(ref, "train"):
               sampler_lib.decode_completions(np.asarray(ids), tr.tokenizer, **o))
        for name, ref in (("project", False), ("release", True))}
    vals = {k: [] for k in decoders}
    finals = {k: [] for k in decoders}
    key = jax.random.key(c.seed)
    for b in range(a.batches):
      examples = stream.next_batch().repeated
      ids, mask = tr.put_batch(tr.encode_prompts(examples))
      ro = rollout(params, tr.frozen, ids, mask, jax.random.fold_in(key, b))
      t = ro.x0_hat.shape[1]
      steps = np.broadcast_to(np.arange(t), (len(examples), t)).astype(np.int32)
      guesses = trainer.to_host(value.one_step_guesses(ro.x0_hat, steps))
      final = trainer.to_host(ro.tokens)
      for name, dec in decoders.items():
        v, f, _ = value.one_step_values(guesses, tr.task.rewards, dec, examples, final_tokens=final)
        vals[name].append(v)
        finals[name].append(f)
    tr.writer.close()
  out = {"config": a.config, "sft_run": str(a.sft_run), "batches": a.batches,
         "rollouts": int(sum(len(x) for x in vals["project"])),
         "one_step_values": compare(np.concatenate(vals["project"]),
                                    np.concatenate(vals["release"])),
         "final_rewards": compare(np.concatenate(finals["project"]),
                                  np.concatenate(finals["release"])),
         "mean_value": {k: float(np.concatenate(v).mean()) for k, v in vals.items()}}
  print(json.dumps(out, indent=1))
  if a.json:
    pathlib.Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
  main()
