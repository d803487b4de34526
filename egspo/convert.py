"""`python -m egspo.convert --checkpoint HF_DIR|ORG/NAME --output OUT_DIR [--param_dtype bfloat16|float32]`

Streams a LLaDA checkpoint in the Hugging Face layout into an egspo orbax directory that
`egspo.model.from_pretrained` reads (`egspo.model.pretrained`; design in docs/conversion.md). With
`--to_hf` the direction is reversed: an egspo orbax (or HF) directory is exported as HF safetensors.
`--checkpoint` is a local directory or a hub repo id (e.g. GSAI-ML/LLaDA-8B-Instruct, fetched
into the Hugging Face cache; `HF_HOME`, `HF_HUB_OFFLINE=1` honoured); `--output` is a local path
(relative, `~/…`, absolute) or a `gs://…` URL.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m egspo.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True,
                      help="input checkpoint directory or hub repo id ORG/NAME[@REVISION]")
  parser.add_argument("--output", required=True, help="output directory or gs:// URL (created)")
  parser.add_argument("--param_dtype", choices=("bfloat16", "float32", "float16"), default=None,
                      help="stored parameter dtype (default: the checkpoint's)")
  parser.add_argument("--to_hf", action="store_true",
                      help="export to HF safetensors instead of converting to orbax")
  parser.add_argument("--max_shard_gb", type=float, default=5.0,
                      help="largest safetensors shard written by --to_hf (GiB)")
  parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output dir")
  parser.add_argument("--quiet", action="store_true")
  args = parser.parse_args(argv)
  if not args.output.strip():
    parser.error("--output is empty: give a directory or a gs:// URL")

  from egspo import hub, paths
  from egspo.model import pretrained  # after argument parsing: --help stays fast

  log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
  t0 = time.time()
  try:
    # Resolved once, here: a local output made absolute (orbax refuses relative paths), gs://
    # as is; the checkpoint a local directory or a hub repo id fetched into the HF cache.
    output = paths.resolve_path(args.output)
    source = (args.checkpoint if hub.is_remote(args.checkpoint)
              else hub.resolve_checkpoint(args.checkpoint))
    if args.to_hf:
      overrides = {} if args.param_dtype is None else {"param_dtype": args.param_dtype}
      model = pretrained.from_pretrained(source, **overrides)
      files = pretrained.export_hf(model, output, overwrite=args.overwrite, tokenizer=source,
                                   max_shard_bytes=int(args.max_shard_gb * 2**30))
      log(f"exported {len(files)} shard(s) to {output} in {time.time() - t0:.1f}s")
    else:
      cfg = pretrained.convert_hf_to_orbax(source, output, param_dtype=args.param_dtype,
                                           overwrite=args.overwrite, log=log)
      log(f"converted {cfg.num_params():,} parameters ({cfg.param_dtype}) to {output} "
          f"in {time.time() - t0:.1f}s")
  except (hub.CheckpointError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
