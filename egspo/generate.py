"""Sample a completion with the LLaDA sampler: `python -m egspo.generate`.

    python -m egspo.generate --checkpoint DIR --prompt "What is 2+3?" --chat \
        --gen_length 128 --steps 64 --block_length 32 --temperature 0 --json
    python -m egspo.generate --preset tiny --seed 0 --prompt_ids 10,11,12 --gen_length 16 \
        --steps 8 --block_length 8 --json

`--checkpoint` (a directory or a hub repo id ORG/NAME) loads a model with
`egspo.model.from_pretrained` (HF or converted layout) and, when the directory has one, its
tokenizer with `egspo.tokenizer.load_tokenizer`. `--prompt_ids` needs only the model (mask and EOS
ids come from its config.json); `--prompt` needs the tokenizer. `--preset NAME --seed S` builds a
randomly initialised model over the built-in character tokenizer (for tests and smoke runs).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m egspo.generate", description=__doc__.split("\n")[0])
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--checkpoint", help="model directory (HF safetensors or converted orbax) "
                   "or hub repo id ORG/NAME[@REVISION]")
  src.add_argument("--preset", help="randomly initialised model preset (e.g. tiny)")
  p.add_argument("--seed", type=int, default=0, help="init seed of --preset models")
  prompt = p.add_mutually_exclusive_group(required=True)
  prompt.add_argument("--prompt", help="prompt text")
  prompt.add_argument("--prompt_ids", help="prompt token ids, comma-separated")
  p.add_argument("--chat", action="store_true", help="wrap --prompt in the chat template")
  p.add_argument("--gen_length", type=int, default=128)
  p.add_argument("--steps", type=int, default=64)
  p.add_argument("--block_length", type=int, default=32)
  p.add_argument("--temperature", type=float, default=0.0)
  p.add_argument("--remasking", default="low_confidence", choices=["low_confidence", "random"])
  p.add_argument("--cache", default="none", choices=["none", "prefix", "dual"],
                 help="the sampler's block K/V cache (egspo.diffusion.cache)")
  p.add_argument("--cache_refresh", type=int, default=0,
                 help="with --cache: refill it every N steps of a block (0: at each block start)")
  p.add_argument("--sample_seed", type=int, default=0, help="PRNG seed of the sampler")
  p.add_argument("--json", action="store_true", help="print one JSON object")
  return p


def _load(args, parser):
  """(model, tokenizer or None, why there is no tokenizer or None)."""
  from egspo import model as model_pkg
  from egspo import hub
  from egspo import tokenizer as tok_pkg

  if args.preset is not None:
    from egspo.model import llada
    try:
      cfg = llada.get_config(args.preset, vocab=tok_pkg.CharTokenizer())
    except ValueError as e:
      parser.error(str(e))
    return llada.init_model(cfg, args.seed), tok_pkg.CharTokenizer(), None
  try:
    path = (args.checkpoint if hub.is_remote(args.checkpoint)
            else hub.resolve_checkpoint(args.checkpoint))
    model = model_pkg.from_pretrained(path)
  except hub.CheckpointError as e:
    parser.error(str(e))
  try:
    return model, tok_pkg.load_tokenizer(path), None
  except (OSError, ValueError) as e:  # no tokenizer files, or unreadable ones
    return model, None, str(e)


def main(argv=None) -> dict:
  parser = _parser()
  args = parser.parse_args(argv)

  import jax
  from egspo.diffusion import sampler

  model, tokenizer, no_tokenizer = _load(args, parser)
  if args.prompt_ids is not None:
    try:
      ids = [int(s) for s in args.prompt_ids.split(",") if s.strip()]
    except ValueError:
      parser.error(f"--prompt_ids must be comma-separated integers, got {args.prompt_ids!r}")
    if not ids:
      parser.error("--prompt_ids is empty")
    bad = [i for i in ids if not 0 <= i < model.cfg.vocab_size]
    if bad:
      parser.error(f"--prompt_ids {bad} are outside the vocabulary [0, {model.cfg.vocab_size})")
  else:
    if tokenizer is None:
      parser.error(f"--prompt needs a tokenizer: {no_tokenizer}; pass --prompt_ids instead")
    text = tokenizer.chat_prompt(args.prompt) if args.chat else args.prompt
    ids = tokenizer.encode(text)
  try:
    config = sampler.SamplerConfig(gen_length=args.gen_length, steps=args.steps,
                                   block_length=args.block_length,
                                   mask_token_id=model.cfg.mask_token_id,
                                   temperature=args.temperature, remasking=args.remasking,
                                   cache=args.cache, cache_refresh=args.cache_refresh,
                                   record_x0_hat=False)
    sampler.check_model_config(model.cfg, config, len(ids))
  except ValueError as e:
    parser.error(str(e))

  prompt_ids = np.asarray([ids], np.int32)
  rollout = sampler.generate_with_model(model, prompt_ids, np.ones_like(prompt_ids, bool),
                                        jax.random.key(args.sample_seed), config)
  tokens = np.asarray(rollout.tokens[0]).tolist()
  result = {"prompt_ids": ids, "completion_ids": tokens,
            "commit_step": np.asarray(rollout.commit_step[0]).tolist()}
  if tokenizer is not None:
    result["text"] = sampler.decode_completions(rollout, tokenizer)[0]
  if args.json:
    print(json.dumps(result))
  else:
    print("completion ids:", " ".join(map(str, tokens)))
    if "text" in result:
      print(result["text"])
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
