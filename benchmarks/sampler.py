"""Throughput of the jitted LLaDA sampler against a reference-style PyTorch sampler, same weights.

    python benchmarks/sampler.py --preset small --batch 8 --gen_length 128 --steps 64 \
        --block_length 32 --threads 1

JAX: `egspo.diffusion.sampler.generate_with_model` (one jitted scan over the steps, records the
full rollout: commit steps, log-probs, entropies, x̂0). PyTorch: tests/torch_sampler.py with
`record=False`, i.e. the ML-GSAI/LLaDA `generate` way: a Python loop over steps, one forward over
the whole canvas per step, float64 softmax, `topk` per sample. Both are pinned to the same CPU cores
(`sched_setaffinity`) and thread count (torch.set_num_threads; XLA single-threaded Eigen when
--threads 1). Timings after one warm-up run, median of --runs runs, as wall time and as process
CPU time (the latter is less disturbed by other processes on a shared machine). tokens/s counts
generated tokens (batch × gen_length).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="small")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--prompt_length", type=int, default=32)
  p.add_argument("--gen_length", type=int, default=128)
  p.add_argument("--steps", type=int, default=64)
  p.add_argument("--block_length", type=int, default=32)
  p.add_argument("--temperature", type=float, default=0.0)
  p.add_argument("--threads", type=int, default=1)
  p.add_argument("--runs", type=int, default=3)
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args()


def main():
  args = _parse()
  # Pin before jax/torch start their thread pools.
  cpus = sorted(os.sched_getaffinity(0))[-args.threads:]
  os.sched_setaffinity(0, cpus)
  if args.threads == 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false"
                               " intra_op_parallelism_threads=1").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

  import jax
  import numpy as np
  import torch

  import torch_llada
  import torch_sampler
  from egspo.diffusion import sampler
  from egspo.model import llada
  from egspo.tokenizer import CharTokenizer

  torch.set_num_threads(args.threads)
  torch.set_num_interop_threads(1)

  cfg = llada.get_config(args.preset, vocab=CharTokenizer())
  tcfg = torch_sampler.torch_config(cfg)
  # Random weights with peaked next-token distributions (as in tests/test_sampler.py), so that the
  # greedy JAX and PyTorch completions can be compared token for token without near-ties.
  sd = torch_llada.random_state_dict(tcfg, seed=args.seed)
  sd["model.transformer.ff_out.weight"] *= 3.0
  model = torch_sampler.load_state_dict_into_jax(llada.init_model(cfg, args.seed), sd)
  config = sampler.SamplerConfig(gen_length=args.gen_length, steps=args.steps,
                                 block_length=args.block_length,
                                 mask_token_id=cfg.mask_token_id, temperature=args.temperature)
  rng = np.random.default_rng(args.seed)
  # Real tokens only (the reference sampler has no padding mask), never the special ids.
  prompt = rng.integers(8, cfg.vocab_size, size=(args.batch, args.prompt_length)).astype(np.int32)
  mask = np.ones_like(prompt, bool)

  def run_jax(i):
    r = sampler.generate_with_model(model, prompt, mask, jax.random.key(i), config)
    return jax.block_until_ready(r).tokens

  def run_torch(i):
    g = torch.Generator().manual_seed(i)
    return torch_sampler.generate(sd, tcfg, torch.from_numpy(prompt).long(), None,
                                  steps=args.steps, gen_length=args.gen_length,
                                  block_length=args.block_length, mask_id=cfg.mask_token_id,
                                  temperature=args.temperature, record=False,
                                  generator=g)["tokens"]

  def timed(fn):
    t0 = time.perf_counter()
    fn(0)  # warm-up (compilation for JAX)
    first = time.perf_counter() - t0
    walls, cpus_ = [], []
    for i in range(args.runs):
      t0, c0 = time.perf_counter(), time.process_time()
      out = fn(i + 1)
      walls.append(time.perf_counter() - t0)
      cpus_.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus_), first, out

  n_tok = args.batch * args.gen_length
  print(f"preset={args.preset} params={cfg.num_params():,} batch={args.batch} "
        f"prompt={args.prompt_length} gen={args.gen_length} steps={args.steps} "
        f"block={args.block_length} temperature={args.temperature} threads={args.threads} "
        f"cpus={cpus} runs={args.runs} jax={jax.__version__} torch={torch.__version__}")
  jax_t, jax_c, jax_first, jax_tok = timed(run_jax)
  print(f"jax generate:          wall {jax_t:.3f} s ({n_tok / jax_t:,.0f} tokens/s), "
        f"cpu {jax_c:.3f} s ({n_tok / jax_c:,.0f} tokens/cpu-s); "
        f"first call incl. compile {jax_first:.2f} s")
  torch_t, torch_c, _, torch_tok = timed(run_torch)
  print(f"torch reference-style: wall {torch_t:.3f} s ({n_tok / torch_t:,.0f} tokens/s), "
        f"cpu {torch_c:.3f} s ({n_tok / torch_c:,.0f} tokens/cpu-s)")
  print(f"speedup: {torch_t / jax_t:.2f}x wall, {torch_c / jax_c:.2f}x cpu time")
  if args.temperature == 0:
    same = np.array_equal(np.asarray(jax_tok), torch_tok.numpy())
    print(f"greedy completions identical: {same}")


if __name__ == "__main__":
  main()
