"""Evaluation harness (d1 protocol, REFERENCE §2/§5) and rescoring of saved generations.

    # generate with a checkpoint and score (temperature 0, block 32, steps = gen_length/2,
    # "<reasoning>" prefill), writing every generation and the metrics:
    python -m egspo.eval --task countdown --checkpoint DIR --gen_lengths 128,256,512 --output out.json
    # the same on a randomly initialised CPU preset with the character tokenizer (smoke runs):
    python -m egspo.eval --task countdown --preset tiny --gen_lengths 16 --limit 8 --output runs/eval_tiny.json
    # rescore a saved generations file (d1's, this harness's, or a training run's eval/*.json),
    # no model needed; --output writes the per-example results:
    python -m egspo.eval --task countdown --generations runs/eval_tiny.json --output rescored.json

d1's file format: {"generations": [{"question", "generations", "ground_truth", ...}, ...]}.
Files written here (and by the training loop, `workdir/eval/{tag}_{step}.json`) hold one such
list per generation length: {"task", "protocol", "results": {"128": {"metrics", "generations"}}};
each record adds "prompt_input" and the task's "score" ("correct", "extracted", ...). The
rescoring mode reads both layouts; an item whose ground_truth is null (some of d1's GSM8K files)
counts as incorrect and is reported in `missing_ground_truth`. Metrics: `accuracy` (fraction
correct); Sudoku adds `cell_accuracy` (the number d1/EGSPO report as Sudoku accuracy); code tasks
add `mean_passed`.

`evaluate(model, tokenizer, task, examples, gen_lengths, batch_size)` is the library entry;
`generation_records` builds the per-example records for it, for the training loop's evaluation
and for rescoring, so every file re-grades the same way. The model/sampler calls live in
`generate_texts` only. Checkpoints are evaluated one at a time: picking the best checkpoint per
length on the test set (a REFERENCE §5 defect of the reference scripts) is left to an explicit,
fixed rule upstream.
"""

from __future__ import annotations

import argparse
import json
import numbers
import sys
import time
from typing import Any, Sequence

import numpy as np
from etils import epath

from egspo import paths
from egspo.tasks import get_task


# --- the only place that touches the model and the sampler -----------------------------------

def generate_texts(model, tokenizer, prompts: Sequence[str], gen_length: int, *,
                   block_length: int = 32, steps: int | None = None, temperature: float = 0.0,
                   seed: int = 0, batch_size: int = 8, pad_to: int | None = None,
                   reference: bool = False, cache: str = "none",
                   cache_refresh: int = 0) -> list[str]:
  """Completions of `prompts` (already chat-formatted and prefilled) with the LLaDA sampler
  (`cache`: its block K/V cache, 'none' | 'prefix' | 'dual', refilled every `cache_refresh`
  steps of a block, 0 = at its start; the LM head on the block only).

  Batches are padded to `batch_size` rows (by repeating the last prompt) and prompts to `pad_to`
  tokens, so one compiled program serves the whole evaluation. reference=True decodes as the
  release's evaluation does (every position, special tokens kept; `sampler.decode_options`).
  """
  import jax
  from egspo.diffusion import sampler

  steps = gen_length // 2 if steps is None else steps
  config = sampler.SamplerConfig(gen_length=gen_length, steps=steps,
                                 block_length=min(block_length, gen_length),
                                 mask_token_id=model.cfg.mask_token_id, temperature=temperature,
                                 cache=cache, cache_refresh=cache_refresh, record_x0_hat=False)
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
    out += sampler.decode_completions(rollout, tokenizer,
                                      **sampler.decode_options(reference, "eval"))[:n]
  return out


# --- evaluation core ---------------------------------------------------------------------------

def build_prompts(task, tokenizer, examples: Sequence[dict], style: str = "chat") -> list[str]:
  """Eval prompts: the task's eval prompt through the chat template, plus the d1 prefill."""
  return [tokenizer.chat_prompt(task.prompt(ex, style, "eval"), task.eval_prefill(style))
          for ex in examples]


def score_generations(task, completions: Sequence[str], examples: Sequence[dict]) -> tuple[list, dict]:
  scores = task.scores(list(completions), list(examples))
  return scores, task.aggregate(scores)


def generation_records(task, examples: Sequence[dict], prompts: Sequence[str],
                       texts: Sequence[str], scores: Sequence[dict]) -> list[dict]:
  """d1's per-example records {"question", "prompt_input", "generations", "ground_truth"} plus the
  task's "score" (with "correct" and the "extracted" answer): the one layout every file uses."""
  return [{"question": task.question(ex), "prompt_input": p, "generations": t,
           "ground_truth": task.ground_truth(ex), "score": dict(s)}
          for ex, p, t, s in zip(examples, prompts, texts, scores)]


def protocol(task, style: str, block_length: int, temperature: float, steps: Any = "gen_length/2",
             cache: str = "none", cache_refresh: int = 0) -> dict:
  return {"temperature": temperature, "block_length": block_length, "steps": steps,
          "prefill": task.eval_prefill(style), "style": style, "remasking": "low_confidence",
          "cache": cache, "cache_refresh": cache_refresh}


def evaluate(model, tokenizer, task, examples: Sequence[dict], gen_lengths: Sequence[int] = (128, 256, 512),
             batch_size: int = 8, *, style: str = "chat", block_length: int = 32,
             temperature: float = 0.0, seed: int = 0, generate_fn=None,
             cache: str = "none", cache_refresh: int = 0) -> dict:
  """Generate for every example at every length with the d1 protocol and score.

  Returns {"task", "protocol", "results": {str(L): {"metrics", "generations", "seconds"}}} with
  `generation_records` as the generations. `generate_fn(prompts, gen_length) -> texts` replaces
  the model call (tests, other samplers).
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
                             pad_to=pad_to, reference=task.reference_rewards, cache=cache,
                             cache_refresh=cache_refresh)
    scores, metrics = score_generations(task, texts, examples)
    results[str(length)] = {"metrics": metrics,
                            "generations": generation_records(task, examples, prompts, texts, scores),
                            "seconds": round(time.time() - t0, 3)}
  return {"task": task.name, "protocol": protocol(task, style, block_length, temperature,
                                                  cache=cache, cache_refresh=cache_refresh),
          "results": results}


# --- rescoring saved files -----------------------------------------------------------------------

def _zero_like(value):
  if isinstance(value, (bool, np.bool_)):
    return False
  if isinstance(value, numbers.Number):
    return type(value)(0)
  return None


def rescore_items(task, items: Sequence[Any]) -> tuple[list[dict], dict]:
  """(per-example records, metrics) of one list of saved generation records.

  An item whose "ground_truth" is missing or null counts as incorrect (zero in every count the
  task's `aggregate` sums) and is counted in metrics["missing_ground_truth"].
  """
  if not isinstance(items, list):
    raise ValueError(f"'generations' must be a list of records, got {type(items).__name__}")
  if not items:
    raise ValueError("the 'generations' list is empty")
  examples, texts = [], []
  for i, it in enumerate(items):
    if not isinstance(it, dict):
      raise ValueError(f"generations[{i}] is a {type(it).__name__}, not a JSON object")
    text = it.get("generations")
    if text is not None and not isinstance(text, str):
      raise ValueError(f"generations[{i}]['generations'] must be a string, got {type(text).__name__}")
    texts.append(text or "")
    gt = it.get("ground_truth")
    try:
      examples.append(None if gt is None else task.example_from_ground_truth(it.get("question", ""), gt))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"generations[{i}]: {e}") from None
  present = [i for i, ex in enumerate(examples) if ex is not None]
  if not present:
    raise ValueError(f"none of the {len(items)} items has a ground_truth; nothing to grade")
  found = task.scores([texts[i] for i in present], [examples[i] for i in present])
  zero = {k: _zero_like(v) for k, v in found[0].items()}
  scores = [dict(zero, correct=False, extracted=None, missing_ground_truth=True) for _ in items]
  for i, s in zip(present, found):
    scores[i] = s
  metrics = task.aggregate(scores)
  metrics["missing_ground_truth"] = len(items) - len(present)
  records = [{"question": it.get("question"), "prompt_input": it.get("prompt_input"),
              "generations": t, "ground_truth": it.get("ground_truth"), "score": s}
             for it, t, s in zip(items, texts, scores)]
  return records, metrics


def rescore(task, data: Any) -> dict:
  """A saved generations file re-graded, in its own layout: d1's {"metrics", "generations"
  (+ "gen_length")} or this harness's {"metrics": {L: ...}, "results": {L: {"metrics",
  "generations"}}}, the generations being per-example records with the new scores."""
  if not isinstance(data, dict):
    raise ValueError(f"the file must hold a JSON object, got a {type(data).__name__}")
  if "generations" in data:
    records, metrics = rescore_items(task, data["generations"])
    out = {"metrics": metrics, "generations": records}
    if "gen_length" in data:
      out["gen_length"] = metrics["gen_length"] = data["gen_length"]
    return out
  if isinstance(data.get("results"), dict) and data["results"]:
    results = {}
    for length, r in data["results"].items():
      if not isinstance(r, dict) or "generations" not in r:
        raise ValueError(f"results[{length!r}] has no 'generations' list")
      try:
        records, metrics = rescore_items(task, r["generations"])
      except ValueError as e:
        raise ValueError(f"results[{length!r}]: {e}") from None
      results[length] = {"metrics": metrics, "generations": records}
    return {"metrics": {k: v["metrics"] for k, v in results.items()}, "results": results}
  raise ValueError("the file must hold a 'generations' list (d1) or 'results' by generation length")


# --- files ---------------------------------------------------------------------------------------

def resolve_path(path: str) -> epath.Path:
  """A relative, `~/...` or absolute path made absolute (once, at the entry point); a
  `scheme://` path (gs://) as given."""
  return epath.Path(paths.resolve_path(path))


def _json_default(x):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, (set, tuple)):
    return list(x)
  return str(x)


def write_json(path: epath.Path, obj) -> None:
  """`obj` as JSON at `path` (local or gs://, through etils.epath), parent directories created."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj, indent=1, default=_json_default))


# --- command line ------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m egspo.eval", description=__doc__.split("\n")[0])
  p.add_argument("--task", required=True, help="countdown, sudoku, gsm8k, math500, mbpp, humaneval")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--generations", help="rescore this saved generations JSON (no model); path as --output")
  src.add_argument("--checkpoint", help="model directory (egspo.model.from_pretrained)")
  src.add_argument("--preset", help="randomly initialised model preset with the char tokenizer")
  p.add_argument("--seed", type=int, default=0, help="init seed of --preset")
  p.add_argument("--gen_lengths", default="128,256,512")
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--block_length", type=int, default=32)
  p.add_argument("--temperature", type=float, default=0.0)
  p.add_argument("--cache", choices=["none", "prefix", "dual"], default="none",
                 help="the sampler's block K/V cache (egspo.diffusion.cache)")
  p.add_argument("--cache_refresh", type=int, default=0,
                 help="with --cache: refill it every N steps of a block (0: at each block start)")
  p.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
  p.add_argument("--data_path", default=None, help="eval data file (else the task's default)")
  p.add_argument("--style", choices=["chat", "plain"], default=None,
                 help="prompt style (default: chat for --checkpoint, plain for --preset)")
  p.add_argument("--reference_rewards", action="store_true",
                 help="the released code's prompts, decoding and graders, defects included "
                      "(README 'Graders')")
  p.add_argument("--output", help="write the generations (with --generations: the re-graded "
                 "per-example records) and the metrics as JSON here; relative, ~/, absolute or gs://")
  return p


def _load_model(args, parser):
  if args.preset is not None:
    from egspo.model import llada
    from egspo.tokenizer import CharTokenizer
    try:
      tok = CharTokenizer()
      return llada.init_model(llada.get_config(args.preset, vocab=tok), args.seed), tok
    except ValueError as e:
      parser.error(str(e))
  from egspo import model as model_pkg
  from egspo import tokenizer as tok_pkg
  if not hasattr(tok_pkg, "load_tokenizer"):
    parser.error("--checkpoint needs egspo.tokenizer.load_tokenizer, which this install lacks")
  from egspo import hub
  try:  # a directory or a hub repo id, resolved once; eval's prompts are text: a tokenizer is needed
    path = (args.checkpoint if hub.is_remote(args.checkpoint)
            else hub.resolve_checkpoint(args.checkpoint))
    return model_pkg.from_pretrained(path), tok_pkg.load_tokenizer(path)
  except (OSError, ValueError) as e:
    parser.error(f"--checkpoint {args.checkpoint}: {e}")


def _check_sampling(parser, args, gen_lengths) -> None:
  """The sampler's settings of every --gen_lengths value, before a model is loaded."""
  from egspo.diffusion import sampler  # pylint: disable=import-outside-toplevel

  for length in gen_lengths:
    try:
      sampler.check_sampling(length, length // 2, min(args.block_length, length),
                             temperature=args.temperature, cache=args.cache,
                             cache_refresh=args.cache_refresh)
    except ValueError as e:  # gen_length = each --gen_lengths value, steps = gen_length / 2
      parser.error(f"--gen_lengths {length}: {e}".replace("SamplerConfig.", "--"))


def main(argv=None) -> dict:
  parser = _parser()
  args = parser.parse_args(argv)
  try:
    task = get_task(args.task, reference_rewards=args.reference_rewards)
  except ValueError as e:
    parser.error(str(e))
  # Relative, ~/..., absolute or gs://: resolved once; written through etils.epath.
  try:
    output = resolve_path(args.output) if args.output is not None else None
  except ValueError as e:
    parser.error(f"--output: {e}")

  if args.generations is not None:
    try:
      source = resolve_path(args.generations)
      regraded = rescore(task, json.loads(source.read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:  # one line naming the file and the problem
      raise SystemExit(f"{parser.prog}: error: cannot rescore {args.generations}: {e}") from None
    out = {"task": task.name, "file": str(source), "metrics": regraded["metrics"]}
    if output is not None:
      write_json(output, {**out, **regraded})
    print(json.dumps(out, indent=2))
    return out

  try:
    gen_lengths = [int(x) for x in args.gen_lengths.split(",") if x.strip()]
  except ValueError:
    parser.error(f"--gen_lengths must be comma-separated integers, got {args.gen_lengths!r}")
  _check_sampling(parser, args, gen_lengths)
  examples = task.load_examples("test", args.data_path) if args.data_path else task.load_examples("test")
  if args.limit:
    examples = examples[:args.limit]
  if output is not None:  # a path that cannot be written fails before any generation
    output.parent.mkdir(parents=True, exist_ok=True)
  model, tokenizer = _load_model(args, parser)
  style = args.style or ("plain" if args.preset else "chat")
  result = evaluate(model, tokenizer, task, examples, gen_lengths, args.batch_size, style=style,
                    block_length=args.block_length, temperature=args.temperature,
                    cache=args.cache, cache_refresh=args.cache_refresh)
  result["checkpoint"] = args.checkpoint or f"preset:{args.preset}:seed{args.seed}"
  if output is not None:
    write_json(output, result)
  summary = {"task": task.name, "checkpoint": result["checkpoint"],
             "metrics": {k: v["metrics"] for k, v in result["results"].items()}}
  print(json.dumps(summary, indent=2))
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
