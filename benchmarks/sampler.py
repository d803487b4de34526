"""Throughput of the jitted LLaDA sampler per cache mode against a reference-style PyTorch
sampler on the same weights: tokens/s and achieved FLOP/s.

    python benchmarks/sampler.py --shape short  # d256 L4 V512, B 8, prompt 32, gen 64, 32 steps
    python benchmarks/sampler.py --shape long   # d512 L4 V512, B 4, prompt 128, gen 128, 64 steps
    python benchmarks/sampler.py --shape d1     # d1's proportions at d256: prompt 200, gen 256
    python benchmarks/sampler.py --shape long_b1  # `_b1`: any shape at batch 1 (Fast-dLLM's)
    python benchmarks/sampler.py --preset small --batch 8 --gen_length 128 --steps 64 \
        --block_length 32 --cache none,dual --threads 1
    python benchmarks/sampler.py --shape long_b1 --public ~/Fast-dLLM --public_llada ~/LLaDA
    python benchmarks/sampler.py --shape d1 --preset llada_1b --vocab_size 126464 --no_torch \
        --threads 0 --matmul_dtype bfloat16 --matmul_n 8192 --peak_tflops 989  # on a GPU

A shape sets the schedule and, unless --preset is given, the model width; flags given
explicitly override it (`--shape d1 --preset llada_1b`: d1's schedule at the 1B preset).

JAX: `sampler.generate_with_model` for each `--cache` mode (none | prefix | dual,
egspo/diffusion/cache.py): one jitted program, a scan over blocks of scans over steps (`none`
with `--x0_hat`: today's single scan over the steps). By default it samples tokens only (`record_x0_hat=False`: the LM head on the
current block), as the reference does; `--x0_hat` times the RL rollout's record. PyTorch:
tests/torch_sampler.py with `record=False`, the ML-GSAI/LLaDA `generate` way: a Python loop over
steps, one forward over the whole canvas per step (LM head on every position), float64 softmax.
Both pinned to the same cores and thread count; timings after one warm-up run (compilation),
median of --runs, wall time and process CPU time (less disturbed on a shared machine).

tokens/s counts generated tokens (batch × gen_length). FLOPs are analytic and count what each
program executes (`step_flops`: layer matmuls 2·N per query position, attention
4·L·queries·keys·d, the LM head 2·d·V per head position; norms, RoPE, softmax left out), against
a matmul peak measured in the same run (benchmarks/train_step.py `matmul_peak`) and, with
--peak_tflops, as a fraction of an accelerator's stated peak (MFU). Token
agreement: the fraction of completion tokens equal to `none`'s (a cache samples from an
approximation). `--public`: also the published samplers on the same weights and prompts
(Fast-dLLM's none / prefix / dual cache, one prompt at a time; with `--public_llada`, ML-GSAI/LLaDA's
batched `generate`), each against the egspo mode that runs its algorithm: tokens/s, egspo's
speed-up and token agreement (benchmarks/public_llada.py). Last line: `RESULT {json}` with every
figure.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODES = ("none", "prefix", "dual")
# The issue-15 shapes: the model's width (overrides of the `small` preset, used when no --preset
# is given) and the sampling schedule.
MODEL_FIELDS = ("d_model", "n_layers", "vocab_size")
SHAPES = {
    "short": dict(d_model=256, n_layers=4, vocab_size=512, batch=8, prompt_length=32,
                  gen_length=64, steps=32, block_length=32),
    "long": dict(d_model=512, n_layers=4, vocab_size=512, batch=4, prompt_length=128,
                 gen_length=128, steps=64, block_length=32),
    "d1": dict(d_model=256, n_layers=4, vocab_size=512, batch=4, prompt_length=200,
               gen_length=256, steps=128, block_length=32),
}
# Batch-1 variants: the Fast-dLLM table samples one prompt at a time.
SHAPES.update({f"{name}_b1": {**shape, "batch": 1} for name, shape in list(SHAPES.items())})
# llada.ATTENTION_IMPLS, written out: parsing imports no jax (tests/test_benchmarks.py compares).
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "head_major")
DEFAULTS = dict(preset="small", batch=8, prompt_length=32, gen_length=128, steps=64,
                block_length=32)


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                 help="a named shape: fills the flags not given (its width only without --preset)")
  p.add_argument("--preset", default=None, help=f"model preset (default {DEFAULTS['preset']})")
  p.add_argument("--d_model", type=int, default=None, help="override: width (heads of 32 dims)")
  p.add_argument("--n_layers", type=int, default=None)
  p.add_argument("--vocab_size", type=int, default=None,
                 help="override: vocabulary (≥ the character tokenizer's ids)")
  p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                 help="override: param and compute dtype (default: the preset's)")
  p.add_argument("--attention_impl", default="auto", choices=ATTENTION_IMPLS,
                 help="ModelConfig.attention_impl of egspo's model (auto: head_major on CPU)")
  for name in ("batch", "prompt_length", "gen_length", "steps", "block_length"):
    p.add_argument(f"--{name}", type=int, default=None, help=f"default {DEFAULTS[name]}")
  p.add_argument("--temperature", type=float, default=0.0)
  p.add_argument("--cache", default=",".join(MODES), help="comma-separated cache modes")
  p.add_argument("--cache_refresh", type=int, default=0,
                 help="the cached modes refill their cache every N steps of a block (0: block start)")
  p.add_argument("--x0_hat", action="store_true", help="record x̂0 (the RL rollout's record)")
  p.add_argument("--no_torch", action="store_true", help="skip the PyTorch reference loop")
  p.add_argument("--public", default=None, metavar="DIR",
                 help="a checkout of NVlabs/Fast-dLLM: also time LLaDA's published model with "
                      "Fast-dLLM's samplers (none, prefix, dual cache; one prompt at a time) on "
                      "the same weights (benchmarks/public_llada.py)")
  p.add_argument("--public_llada", default=None, metavar="DIR",
                 help="with --public, a checkout of ML-GSAI/LLaDA: also its batched generate")
  p.add_argument("--threads", type=int, default=1, help="CPU threads (0 = leave the default)")
  p.add_argument("--runs", type=int, default=3)
  p.add_argument("--matmul_n", type=int, default=1024, help="square size of the peak matmul")
  p.add_argument("--matmul_dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--peak_tflops", type=float, default=None,
                 help="stated dense peak of the accelerator in TFLOP/s: prints MFU against it")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  for k, v in SHAPES.get(args.shape, {}).items():
    if getattr(args, k) is None and not (k in MODEL_FIELDS and args.preset is not None):
      setattr(args, k, v)
  for k, v in DEFAULTS.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  if args.public_llada and not args.public:
    p.error("--public_llada needs --public (the model code is Fast-dLLM's modeling_llada.py)")
  if args.public and args.temperature != 0:
    p.error("--public compares greedy runs token for token: use --temperature 0")
  if args.public:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import public_llada  # pylint: disable=import-outside-toplevel
    public_llada.check_dirs(args.public, args.public_llada)
  args.cache = [m.strip() for m in args.cache.split(",") if m.strip()]
  bad = [m for m in args.cache if m not in MODES]
  if bad or not args.cache:
    p.error(f"--cache {bad or '(empty)'}: allowed {MODES}")
  return args


def model_config(args):
  from egspo.model import llada
  from egspo.tokenizer import CharTokenizer

  over = {}
  if args.d_model:
    heads = max(1, args.d_model // 32)
    over.update(d_model=args.d_model, n_heads=heads, n_kv_heads=heads,
                mlp_hidden_size=3 * args.d_model)
  if args.n_layers:
    over["n_layers"] = args.n_layers
  if args.vocab_size:
    over.update(vocab_size=args.vocab_size, embedding_size=args.vocab_size)
  if args.dtype:
    over.update(param_dtype=args.dtype, dtype=args.dtype)
  over["max_sequence_length"] = max(1024, 2 * (args.prompt_length + args.gen_length))
  over["attention_impl"] = args.attention_impl
  return llada.get_config(args.preset, vocab=CharTokenizer(), **over)


def step_flops(cfg, queries: int, keys: int, head_positions: int) -> float:
  """Analytic FLOPs of one forward of `queries` positions attending `keys` keys, the LM head on
  `head_positions` of them (multiply-add = 2)."""
  d, f = cfg.d_model, cfg.mlp_hidden_size
  kv = cfg.n_kv_heads * cfg.head_dim
  per_layer = 2 * d * d + 2 * d * kv + 3 * d * f
  return (2.0 * cfg.n_layers * per_layer * queries + 4.0 * cfg.n_layers * queries * keys * d
          + 2.0 * d * cfg.embedding_size * head_positions)


def sampler_flops(cfg, *, batch, p, g, steps, block, mode, x0_hat, refresh=0) -> float:
  """FLOPs of one generation of `batch` sequences as each program runs it ('torch': the
  reference loop, LM head on the whole canvas; `refresh`: the cached modes' cache_refresh)."""
  s, blocks = p + g, g // block
  if mode == "torch":
    return batch * steps * step_flops(cfg, s, s, s)
  head = g if x0_hat else block
  full = step_flops(cfg, s, s, head)
  if mode == "none":
    return batch * steps * full
  fulls = steps // (refresh or steps // blocks)  # every refresh (block start) is a full forward
  per_block = (steps - fulls) // blocks  # cached steps of each block
  if mode == "prefix":  # block j's window: the block and every later position, over S keys
    cached = sum(step_flops(cfg, g - j * block, s, g - j * block if x0_hat else block)
                 for j in range(blocks))
  else:  # dual: the block over the canvas
    cached = blocks * step_flops(cfg, block, s, block)
  return batch * (fulls * full + per_block * cached)


def main(argv=None):
  args = _parse(argv)
  sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]
  from train_step import _setup_threads  # pylint: disable=import-error
  cpus = _setup_threads(args.threads)  # pin before jax/torch start their thread pools
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

  import jax
  import numpy as np
  import torch

  import torch_llada
  import torch_sampler
  from train_step import Clock, matmul_peak  # pylint: disable=import-error
  from egspo.diffusion import sampler
  from egspo.model import llada

  if args.threads > 0:
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)

  cfg = model_config(args)
  why = llada.attention_backend_error(cfg.attention_impl, jax.default_backend())
  if why:
    raise SystemExit(f"error: --{why}")
  tcfg = torch_sampler.torch_config(cfg)
  # Random weights with peaked next-token distributions (as tests/test_sampler.py), so greedy
  # completions can be compared token for token without near-ties.
  sd = torch_llada.random_state_dict(tcfg, seed=args.seed)
  sd["model.transformer.ff_out.weight"] *= 3.0
  model = torch_sampler.load_state_dict_into_jax(llada.init_model(cfg, args.seed), sd)
  rng = np.random.default_rng(args.seed)
  # Real tokens only (the reference sampler has no padding mask), never the special ids.
  prompt = rng.integers(8, cfg.vocab_size, size=(args.batch, args.prompt_length)).astype(np.int32)
  mask = np.ones_like(prompt, bool)
  n_tok = args.batch * args.gen_length

  def timed(fn):
    t0 = time.perf_counter()
    fn(0)  # warm-up (compilation for JAX)
    first = time.perf_counter() - t0
    walls, cpu = [], []
    out = None
    for i in range(args.runs):
      with Clock() as ck:
        out = fn(i + 1)
      walls.append(ck.wall)
      cpu.append(ck.cpu)
    return statistics.median(walls), statistics.median(cpu), first, out

  print(f"shape={args.shape} preset={args.preset} d={cfg.d_model} L={cfg.n_layers} "
        f"V={cfg.vocab_size} params={cfg.num_params():,} batch={args.batch} "
        f"prompt={args.prompt_length} gen={args.gen_length} steps={args.steps} "
        f"block={args.block_length} cache_refresh={args.cache_refresh} "
        f"temperature={args.temperature} x0_hat={args.x0_hat} "
        f"dtype={cfg.dtype} attention={cfg.attention_impl} threads={args.threads} cpus={cpus} "
        f"runs={args.runs} "
        f"device={jax.devices()[0].device_kind} jax={jax.__version__} "
        f"torch={torch.__version__} load={os.getloadavg()[0]:.2f}")
  peak = matmul_peak(args.matmul_n, dtype=args.matmul_dtype)["jax"]
  print(f"matmul peak ({args.matmul_n}² {args.matmul_dtype} jnp.dot, best of 5): "
        f"{peak['wall']:.1f} GFLOP/s wall, {peak['cpu']:.1f} per CPU second")
  shape = dict(batch=args.batch, p=args.prompt_length, g=args.gen_length, steps=args.steps,
               block=args.block_length, x0_hat=args.x0_hat)
  result = dict(shape=args.shape, cache_refresh=args.cache_refresh, d_model=cfg.d_model,
                n_layers=cfg.n_layers,
                vocab_size=cfg.vocab_size, preset=args.preset, dtype=cfg.dtype,
                attention_impl=cfg.attention_impl, device=jax.devices()[0].device_kind,
                peak_tflops=args.peak_tflops,
                **shape, threads=args.threads,
                matmul_peak_gflops=peak["wall"], matmul_peak_gflops_per_cpu_s=peak["cpu"],
                modes={})
  tokens = {}
  for mode in args.cache:
    config = sampler.SamplerConfig(gen_length=args.gen_length, steps=args.steps,
                                   block_length=args.block_length,
                                   mask_token_id=cfg.mask_token_id, temperature=args.temperature,
                                   cache=mode, record_x0_hat=args.x0_hat,
                                   cache_refresh=0 if mode == "none" else args.cache_refresh)

    def run(i, config=config):
      r = sampler.generate_with_model(model, prompt, mask, jax.random.key(i), config)
      return np.asarray(jax.block_until_ready(r).tokens)

    wall, cpu, first, tokens[mode] = timed(run)
    flops = sampler_flops(cfg, mode=mode, refresh=config.cache_refresh, **shape)
    row = dict(seconds=wall, cpu_seconds=cpu, compile_and_first_s=first,
               tokens_per_s=n_tok / wall, tokens_per_cpu_s=n_tok / cpu, gflop=flops / 1e9,
               gflops=flops / wall / 1e9, fraction_of_peak=flops / wall / 1e9 / peak["wall"])
    if args.peak_tflops:
      row["mfu"] = flops / wall / (args.peak_tflops * 1e12)
    if "none" in tokens:
      row["token_agreement_with_none"] = float(np.mean(tokens[mode] == tokens["none"]))
    result["modes"][mode] = row
    agree = row.get("token_agreement_with_none")
    print(f"jax {mode:6s}: {n_tok / wall:9,.0f} tokens/s wall ({n_tok / cpu:,.0f} per CPU s), "
          f"{wall:.3f} s, {flops / 1e9:.2f} GFLOP, {row['gflops']:.1f} GFLOP/s "
          f"({row['fraction_of_peak']:.0%} of peak"
          + (f", MFU {row['mfu']:.1%} of {args.peak_tflops:g} TFLOP/s" if "mfu" in row else "")
          + f"); first call incl. compile {first:.1f} s"
          + ("" if agree is None else f"; tokens equal to none's: {agree:.1%}"))
  if not args.no_torch:
    def run_torch(i):
      g = torch.Generator().manual_seed(i)
      return torch_sampler.generate(sd, tcfg, torch.from_numpy(prompt).long(), None,
                                    steps=args.steps, gen_length=args.gen_length,
                                    block_length=args.block_length, mask_id=cfg.mask_token_id,
                                    temperature=args.temperature, record=False,
                                    generator=g)["tokens"].numpy()

    wall, cpu, _, torch_tok = timed(run_torch)
    flops = sampler_flops(cfg, mode="torch", **shape)
    result["torch"] = dict(seconds=wall, cpu_seconds=cpu, tokens_per_s=n_tok / wall,
                           tokens_per_cpu_s=n_tok / cpu, gflop=flops / 1e9,
                           gflops=flops / wall / 1e9)
    print(f"torch reference-style: {n_tok / wall:9,.0f} tokens/s wall ({n_tok / cpu:,.0f} per "
          f"CPU s), {wall:.3f} s, {flops / 1e9:.2f} GFLOP, {flops / wall / 1e9:.1f} GFLOP/s")
    for mode, row in result["modes"].items():
      row["speedup_vs_torch"] = wall / row["seconds"]
      row["speedup_vs_torch_cpu"] = cpu / row["cpu_seconds"]
    print("speedup over torch (wall / cpu): " + ", ".join(
        f"{m} {r['speedup_vs_torch']:.2f}x / {r['speedup_vs_torch_cpu']:.2f}x"
        for m, r in result["modes"].items()))
    if args.temperature == 0 and "none" in tokens:
      result["greedy_none_equals_torch"] = bool(np.array_equal(tokens["none"], torch_tok))
      print(f"greedy completions of none identical to torch: {result['greedy_none_equals_torch']}")
  if args.public:
    result["public"] = time_public(args, model, prompt, tokens, result, timed, n_tok, np)
  print("RESULT " + json.dumps(result))


def time_public(args, model, prompt, tokens, result, timed, n_tok, np) -> dict:
  """The published samplers (benchmarks/public_llada.py) on the same weights and prompts: their
  tokens/s, the speed-up of the matching egspo mode over each, and token agreement with it."""
  import public_llada  # pylint: disable=import-error,import-outside-toplevel

  pub = public_llada.Public(model, args.public, args.public_llada)
  ids = np.concatenate([prompt, np.full((args.batch, args.gen_length), model.cfg.mask_token_id,
                                        prompt.dtype)], axis=1)
  ours = np.asarray(model(ids, np.ones_like(ids, bool)))
  out = {"logits_max_abs_diff": float(np.max(np.abs(pub.logits(ids)[..., :ours.shape[-1]] - ours)))}
  print(f"published model (Fast-dLLM's modeling_llada.py) on egspo's export: max |logits diff| "
        f"{out['logits_max_abs_diff']:.1e}")
  for name in pub.samplers():
    mode = public_llada.EGSPO_MODE[name]

    def run(i, name=name):
      del i  # greedy
      return pub.generate(name, prompt, steps=args.steps, gen_length=args.gen_length,
                          block_length=args.block_length)

    wall, cpu, _, tok = timed(run)
    row = dict(seconds=wall, cpu_seconds=cpu, tokens_per_s=n_tok / wall,
               tokens_per_cpu_s=n_tok / cpu, egspo_mode=mode)
    ours_row = result["modes"].get(mode)
    if ours_row is not None:
      row.update(egspo_speedup=wall / ours_row["seconds"],
                 egspo_speedup_cpu=cpu / ours_row["cpu_seconds"],
                 token_agreement_with_egspo=float(np.mean(tok == tokens[mode])))
    if "dual" in result["modes"]:
      row["egspo_dual_speedup"] = wall / result["modes"]["dual"]["seconds"]
    out[name] = row
    print(f"{name:11s}: {n_tok / wall:9,.0f} tokens/s wall ({n_tok / cpu:,.0f} per CPU s), "
          f"{wall:.3f} s" + ("" if ours_row is None else
                             f"; egspo {mode} {row['egspo_speedup']:.2f}x faster, tokens equal "
                             f"to egspo {mode}'s: {row['token_agreement_with_egspo']:.1%}")
          + ("" if "egspo_dual_speedup" not in row else
             f"; egspo dual {row['egspo_dual_speedup']:.2f}x"))
  return out


if __name__ == "__main__":
  main()
