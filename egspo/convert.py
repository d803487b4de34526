"""`python -m egspo.convert --checkpoint HF_DIR --output OUT_DIR [--param_dtype bfloat16|float32]`

Streams a LLaDA checkpoint in the Hugging Face layout into an egspo orbax directory that
`egspo.model.from_pretrained` reads (see `egspo.model.convert` for the format). With `--to_hf`
the direction is reversed: an egspo orbax (or HF) directory is exported as HF safetensors.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m egspo.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help="input checkpoint directory")
  parser.add_argument("--output", required=True, help="output directory (created)")
  parser.add_argument("--param_dtype", choices=("bfloat16", "float32", "float16"), default=None,
                      help="stored parameter dtype (default: the checkpoint's)")
  parser.add_argument("--to_hf", action="store_true",
                      help="export to HF safetensors instead of converting to orbax")
  parser.add_argument("--max_shard_gb", type=float, default=5.0,
                      help="largest safetensors shard written by --to_hf (GiB)")
  parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output dir")
  parser.add_argument("--quiet", action="store_true")
  args = parser.parse_args(argv)

  from egspo.model import convert  # after argument parsing: --help stays fast

  log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
  t0 = time.time()
  try:
    if args.to_hf:
      overrides = {} if args.param_dtype is None else {"param_dtype": args.param_dtype}
      model = convert.from_pretrained(args.checkpoint, **overrides)
      files = convert.export_hf(model, args.output, overwrite=args.overwrite,
                                tokenizer=args.checkpoint,
                                max_shard_bytes=int(args.max_shard_gb * 2**30))
      log(f"exported {len(files)} shard(s) to {args.output} in {time.time() - t0:.1f}s")
    else:
      cfg = convert.convert_hf_to_orbax(args.checkpoint, args.output,
                                        param_dtype=args.param_dtype,
                                        overwrite=args.overwrite, log=log)
      log(f"converted {cfg.num_params():,} parameters ({cfg.param_dtype}) to {args.output} "
          f"in {time.time() - t0:.1f}s")
  except (convert.CheckpointError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
