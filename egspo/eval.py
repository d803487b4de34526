"""Evaluation harness (d1 protocol, REFERENCE §2/§5) and rescoring of saved generations.

    # generate with a checkpoint and score (temperature 0, block 32, steps = gen_length/2,
    # "<reasoning>" prefill), writing every generation and the metrics:
    python -m egspo.eval --task countdown --checkpoint DIR --gen_lengths 128,256,512 --output out.json
    # the same on a randomly initialised CPU preset with the character tokenizer (smoke runs):
    python -m egspo.eval --task countdown --preset tiny --gen_lengths 32 --limit 8 --output out.json
    # rescore a saved generations file in d1's JSON format, no model needed:
    python -m egspo.eval --task sudoku --generations sudoku_generations.json

d1's file format: {"generations": [{"question", "generations", "ground_truth", ...}, ...]}.
Files written here hold one such list per generation length:
{"task", "protocol", "results": {"128": {"metrics": {...}, "generations": [...]}, ...}}; the
rescoring mode reads both layouts. Metrics: `accuracy` (fraction correct); Sudoku adds
`cell_accuracy` (the number d1/EGSPO report as Sudoku accuracy); code tasks add `mean_passed`.

`evaluate(model, tokenizer, task, examples, gen_lengths, batch_size)` is the library entry the
training loop calls for periodic evaluation; the model/sampler calls live in `generate_texts`
only. Checkpoints are evaluated one at a time: picking the best checkpoint per length on the test
set (a REFERENCE §5 defect of the reference scripts) is left to an explicit, fixed rule upstream.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

from egspo.tasks import get_task


# --- the only place that touches the model and the sampler -----------------------------------

def generate_texts(model, tokenizer, prompts: Sequence[str], gen_length: int, *,
                   block_length: int = 32, steps: int | None = None, temperature: float = 0.0,
                   seed: int = 0, batch_size: int = 8, pad_to: int | None = None) -> list[str]:
  """Completions of `prompts` (already chat-formatted and prefilled) with the LLaDA sampler.

  Batches are padded to `batch_size` rows (by repeating the last prompt) and prompts to `pad_to`
  tokens, so one compiled program serves the whole evaluation.
  """
  import jax
  from egspo.diffusion import sampler

  steps = gen_length // 2 if steps is None else steps
  config = sampler.SamplerConfig(gen_length=gen_length, steps=steps,
                                 block_length=min(block_length, gen_length),
                                 mask_token_id=model.cfg.mask_token_id, temperature=temperature)
  if pad_to is None:
    pad_to = max(len(tokenizer.encode(p)) for p in prompts)
  key = jax.random.key(seed)
  out: list[str] = []
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start:start + batch_size])
    n = len(chunk)
    chunk += [chunk[-1]] * (batch_size - n)
    ids, mask = tokenizer.encode_batch(chunk, pad_to=pad_to)
    rollout = sampler.generate_with_model(model, ids, mask, jax.random.fold_in(key, start), config)
    out += sampler.decode_completions(rollout, tokenizer)[:n]
  return out


# --- evaluation core ---------------------------------------------------------------------------

def build_prompts(task, tokenizer, examples: Sequence[dict], style: str = "chat") -> list[str]:
  """Eval prompts: the task's eval prompt through the chat template, plus the d1 prefill."""
  return [tokenizer.chat_prompt(task.prompt(ex, style, "eval"), task.eval_prefill(style))
          for ex in examples]


def score_generations(task, completions: Sequence[str], examples: Sequence[dict]) -> tuple[list, dict]:
  scores = task.scores(list(completions), list(examples))
  return scores, task.aggregate(scores)


def evaluate(model, tokenizer, task, examples: Sequence[dict], gen_lengths: Sequence[int] = (128, 256, 512),
             batch_size: int = 8, *, style: str = "chat", block_length: int = 32,
             temperature: float = 0.0, seed: int = 0, generate_fn=None) -> dict:
  """Generate for every example at every length with the d1 protocol and score.

  Returns {"protocol": {...}, "results": {str(L): {"metrics", "generations", "seconds"}}} where
  each generation record is d1's {"question", "prompt_input", "generations", "ground_truth"} plus
  this harness's "score". `generate_fn(prompts, gen_length) -> texts` replaces the model call
  (tests, other samplers).
  """
  if not examples:
    raise ValueError("evaluate got no examples")
  prompts = build_prompts(task, tokenizer, examples, style)
  pad_to = max(len(tokenizer.encode(p)) for p in prompts)
  results = {}
  for length in gen_lengths:
    t0 = time.time()
    if generate_fn is not None:
      texts = list(generate_fn(prompts, int(length)))
    else:
      texts = generate_texts(model, tokenizer, prompts, int(length), block_length=block_length,
                             temperature=temperature, seed=seed, batch_size=batch_size,
                             pad_to=pad_to)
    scores, metrics = score_generations(task, texts, examples)
    records = [{"question": task.question(ex), "prompt_input": p, "generations": t,
                "ground_truth": task.ground_truth(ex),
                "score": {k: v for k, v in s.items() if k != "extracted"}}
               for ex, p, t, s in zip(examples, prompts, texts, scores)]
    results[str(length)] = {"metrics": metrics, "generations": records,
                            "seconds": round(time.time() - t0, 3)}
  protocol = {"temperature": temperature, "block_length": block_length, "steps": "gen_length/2",
              "prefill": task.eval_prefill(style), "style": style, "remasking": "low_confidence"}
  return {"task": task.name, "protocol": protocol, "results": results}


def rescore(task, data: dict) -> dict:
  """Metrics of a saved generations file (d1 layout or this harness's), per generation length."""
  def one(items):
    examples = [task.example_from_ground_truth(it.get("question", ""), it.get("ground_truth"))
                for it in items]
    _, metrics = score_generations(task, [it.get("generations", "") or "" for it in items], examples)
    return metrics

  if isinstance(data.get("generations"), list):
    out = one(data["generations"])
    if "gen_length" in data:
      out["gen_length"] = data["gen_length"]
    return out
  if isinstance(data.get("results"), dict):
    return {length: one(r["generations"]) for length, r in data["results"].items()}
  raise ValueError("generations file must hold a 'generations' list (d1) or 'results' by length")


# --- command line ------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m egspo.eval", description=__doc__.split("\n")[0])
  p.add_argument("--task", required=True, help="countdown, sudoku, gsm8k, math500, mbpp, humaneval")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--generations", help="rescore this saved generations JSON (no model)")
  src.add_argument("--checkpoint", help="model directory (egspo.model.from_pretrained)")
  src.add_argument("--preset", help="randomly initialised model preset with the char tokenizer")
  p.add_argument("--seed", type=int, default=0, help="init seed of --preset")
  p.add_argument("--gen_lengths", default="128,256,512")
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--block_length", type=int, default=32)
  p.add_argument("--temperature", type=float, default=0.0)
  p.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
  p.add_argument("--data_path", default=None, help="eval data file (else the task's default)")
  p.add_argument("--style", choices=["chat", "plain"], default=None,
                 help="prompt style (default: chat for --checkpoint, plain for --preset)")
  p.add_argument("--reference_rewards", action="store_true",
                 help="score with the reference parsers, defects included")
  p.add_argument("--output", help="write generations + metrics JSON here")
  return p


def _load_model(args, parser):
  if args.preset is not None:
    from egspo.model import llada
    from egspo.tokenizer import CharTokenizer
    try:
      return llada.init_model(llada.get_config(args.preset), args.seed), CharTokenizer()
    except ValueError as e:
      parser.error(str(e))
  from egspo import model as model_pkg
  from egspo import tokenizer as tok_pkg
  if not hasattr(tok_pkg, "load_tokenizer"):
    parser.error("--checkpoint needs egspo.tokenizer.load_tokenizer, which this install lacks")
  return model_pkg.from_pretrained(args.checkpoint), tok_pkg.load_tokenizer(args.checkpoint)


def main(argv=None) -> dict:
  parser = _parser()
  args = parser.parse_args(argv)
  try:
    task = get_task(args.task, reference_rewards=args.reference_rewards)
  except ValueError as e:
    parser.error(str(e))

  if args.generations:
    try:
      with open(args.generations, encoding="utf-8") as f:
        data = json.load(f)
      metrics = rescore(task, data)
    except (OSError, ValueError, KeyError, TypeError) as e:
      parser.error(f"cannot rescore {args.generations}: {e}")
    out = {"task": task.name, "file": args.generations, "metrics": metrics}
    print(json.dumps(out, indent=2))
    return out

  try:
    gen_lengths = [int(x) for x in args.gen_lengths.split(",") if x.strip()]
  except ValueError:
    parser.error(f"--gen_lengths must be comma-separated integers, got {args.gen_lengths!r}")
  examples = task.load_examples("test", args.data_path) if args.data_path else task.load_examples("test")
  if args.limit:
    examples = examples[:args.limit]
  model, tokenizer = _load_model(args, parser)
  style = args.style or ("plain" if args.preset else "chat")
  result = evaluate(model, tokenizer, task, examples, gen_lengths, args.batch_size, style=style,
                    block_length=args.block_length, temperature=args.temperature)
  result["checkpoint"] = args.checkpoint or f"preset:{args.preset}:seed{args.seed}"
  if args.output:
    with open(args.output, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)
  summary = {"task": task.name, "checkpoint": result["checkpoint"],
             "metrics": {k: v["metrics"] for k, v in result["results"].items()}}
  print(json.dumps(summary, indent=2))
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
