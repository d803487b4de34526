"""One RL iteration of EGSPO timed phase by phase; the batched update against the reference's
batch-1 loop; FLOPs of EGSPO (K selected steps) against training on all T steps.

    python benchmarks/train_step.py --preset tiny
    python benchmarks/train_step.py --preset small --batch 64 --gen_length 32 --iters 3
    python benchmarks/train_step.py --preset llada_1b --dtype bfloat16 --threads 0 \
        --matmul_dtype bfloat16 --matmul_n 8192 --peak_tflops 989  # on a GPU (device_check.sh)

Setting: `configs/countdown.py:tiny` (Countdown, char tokenizer, B = 16 prompts × 8, G = 32,
T = 16, K = 4, EGSPO-SA, the reference per-step update schedule) with the model preset and the
flags below replacing its fields; random initial weights (no SFT: the cost of a step does not
depend on the weights, only the reward texts do). The iteration is `egspo.train.rl_iteration`,
as `rl_stage` runs it (`Trainer.create`, `make_rollout`'s jitted `sampler.generate`,
`task.rewards` on decoded texts, `algorithm.plan`: step selection, one-step values, advantages,
reference log-probs; the jitted, donated `update_step` of `Trainer.make_update`), each phase
timed.

Printed (one line each, then one JSON line `RESULT {...}` with every figure):
  1. seconds per RL iteration split into rollout / reward / plan (values + advantages + the
     reference-policy forward) / update, after one warm-up iteration, median of --iters;
  2. the update's FLOPs from XLA's `cost_analysis()` of the compiled update step and an analytic
     count, its achieved FLOP/s, and the ratio to this machine's matmul peak measured in the same
     run (a large `jnp.dot` in --matmul_dtype, best of 5; torch's `torch.mm` for reference);
     tokens/s of the rollout (B·G generated) and of the update (B·K·(P+G) trained);
  3. the same update in the reference scheme (REFERENCE §3.9 defect): one jitted per-state
     gradient function called on each of the B·K states at batch size 1 in a Python loop,
     accumulating gradients, then the same optimizer step; likewise the reference-policy forwards
     one state at a time. Both times and the speedup; the accumulated gradient is checked against
     the batched one;
  4. FLOPs per iteration (rollout + update + reference forward) of EGSPO against training on all
     T steps (K = T), analytic, and the ratio.

With --peak_tflops (an accelerator's stated dense peak, benchmarks/device_check.sh) the update's
and the rollout's analytic FLOP/s are also printed as a fraction of it (MFU).

Timing: wall time (`time.perf_counter`) is what is reported; process CPU time
(`time.process_time`) is printed beside it, since the machine may be shared (the load average
is printed). With --threads 1 (default) XLA and torch run single-threaded, pinned to one core,
so CPU time ≈ wall time on an idle core and the matmul peak is a one-core peak.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

MATMUL_DTYPES = ("float32", "bfloat16")


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="tiny", help="model preset (egspo.model.llada.PRESETS)")
  p.add_argument("--batch", type=int, default=None,
                 help="B, completions per iteration (num_prompts × group_size); default: config")
  p.add_argument("--group_size", type=int, default=None)
  p.add_argument("--gen_length", type=int, default=None, help="G, completion length")
  p.add_argument("--block_length", type=int, default=None)
  p.add_argument("--steps", type=int, default=None, help="T, denoising steps")
  p.add_argument("--k", type=int, default=None, help="K, selected steps")
  p.add_argument("--micro_batch", type=int, default=None, help="default: B (one micro-batch)")
  p.add_argument("--algorithm", default="egspo_sa", choices=("egspo", "egspo_sa"))
  p.add_argument("--schedule", default=None, choices=("per_step", "joint"),
                 help="update schedule (train.update_schedule); default: the config's "
                 "(per_step: K optimizer steps per rollout, one selected-step column each)")
  p.add_argument("--iters", type=int, default=3, help="timed iterations after the warm-up")
  p.add_argument("--ref_iters", type=int, default=1, help="timed runs of the batch-1 scheme")
  p.add_argument("--threads", type=int, default=1, help="CPU threads (0 = leave XLA's default)")
  p.add_argument("--matmul_n", type=int, default=2048, help="square size for the peak matmul")
  p.add_argument("--matmul_dtype", default="float32", choices=MATMUL_DTYPES)
  p.add_argument("--peak_tflops", type=float, default=None,
                 help="stated dense peak of the accelerator in TFLOP/s: prints MFU against it")
  p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                 help="model.param_dtype and model.dtype; default: the config's (float32)")
  p.add_argument("--scan_layers", default=None, action=argparse.BooleanOptionalAction,
                 help="model.scan_layers (one compiled block: shorter compiles)")
  p.add_argument("--remat", default=None, action=argparse.BooleanOptionalAction)
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def _setup_threads(threads: int):
  """Pin and limit threads before jax/torch start their pools."""
  if threads <= 0:
    return sorted(os.sched_getaffinity(0))
  cpus = sorted(os.sched_getaffinity(0))[-threads:]
  os.sched_setaffinity(0, cpus)
  if threads == 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false"
                               " intra_op_parallelism_threads=1").strip()
  for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[v] = str(threads)
  return cpus


class Clock:
  """Wall and process-CPU seconds of a block."""

  def __enter__(self):
    self.w0, self.c0 = time.perf_counter(), time.process_time()
    return self

  def __exit__(self, *exc):
    self.wall = time.perf_counter() - self.w0
    self.cpu = time.process_time() - self.c0


class PhaseClocks:
  """A `metrics.Timer` for `train.rl_iteration` that keeps a `Clock` (wall and CPU) per phase."""

  def __init__(self):
    self.clocks = {}

  @contextlib.contextmanager
  def __call__(self, name):
    with Clock() as ck:
      yield
    self.clocks[name] = ck


def _flops_of(compiled) -> float:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):  # older jax: one dict per computation
    ca = ca[0]
  return float(ca.get("flops", float("nan"))) if ca else float("nan")


def forward_flops(cfg, seq_len: int, head_positions: int) -> float:
  """Analytic forward FLOPs of one LLaDA sequence (multiply-add = 2 FLOPs).

  Layer matmuls 2·N_layers·S, attention scores and weighted values 4·n_layers·S²·d, the LM head
  2·d·V at `head_positions` positions only (the sampler: the G completion positions; the
  update: the ≤ M positions committed at the selected step). Norms, RoPE, softmax are left out.
  """
  d, f = cfg.d_model, cfg.mlp_hidden_size
  kv = cfg.n_kv_heads * cfg.head_dim
  per_layer = 2 * d * d + 2 * d * kv + 3 * d * f
  body = 2.0 * cfg.n_layers * per_layer * seq_len
  attn = 4.0 * cfg.n_layers * seq_len * seq_len * d
  head = 2.0 * d * cfg.embedding_size * head_positions
  return body + attn + head


def iteration_flops(cfg, *, b, p, g, t, k, m):
  """Analytic FLOPs of one RL iteration → dict: rollout (T forwards over B canvases), update
  (fwd + bwd = 3× forward, over the B·K selected states), reference forward (B·K states)."""
  s = p + g
  rollout = b * t * forward_flops(cfg, s, g)
  state = forward_flops(cfg, s, m)
  update = 3.0 * b * k * state
  ref = b * k * state
  return dict(rollout=rollout, update=update, ref=ref, total=rollout + update + ref)


def matmul_peak(n: int, reps: int = 5, dtype: str = "float32"):
  """Best of `reps` timed n×n matmuls in `dtype` → {jax, torch} × {wall, cpu} GFLOP/s (cpu: FLOPs
  per second of process CPU time, which other jobs on a shared machine do not inflate). On a GPU
  backend torch runs on the GPU too (synchronised)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  if dtype not in MATMUL_DTYPES:
    raise ValueError(f"matmul dtype {dtype!r}: allowed {MATMUL_DTYPES}")
  rng = np.random.default_rng(0)
  a = rng.standard_normal((n, n), np.float32)
  b = rng.standard_normal((n, n), np.float32)
  flops = 2.0 * n ** 3
  dot = jax.jit(jnp.dot)
  ja, jb = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
  gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
  tdev, tdt = ("cuda" if gpu else "cpu"), getattr(torch, dtype)
  ta, tb = torch.from_numpy(a).to(tdev, tdt), torch.from_numpy(b).to(tdev, tdt)

  def torch_mm():
    torch.mm(ta, tb)
    if gpu:
      torch.cuda.synchronize()

  out = {}
  for name, fn in (("jax", lambda: dot(ja, jb).block_until_ready()), ("torch", torch_mm)):
    fn()  # warm-up (compilation)
    wall = cpu = float("inf")
    for _ in range(reps):
      with Clock() as ck:
        fn()
      wall, cpu = min(wall, ck.wall), min(cpu, ck.cpu)
    out[name] = {"wall": flops / wall / 1e9, "cpu": flops / max(cpu, 1e-9) / 1e9}
  return out


def main(argv=None):
  args = _parse(argv)
  cpus = _setup_threads(args.threads)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

  import jax
  import jax.numpy as jnp
  import optax
  import torch

  from egspo import config as config_lib
  from egspo import train as train_lib
  from egspo.diffusion import sampler as sampler_lib
  from egspo.rl import update as update_lib

  if args.threads > 0:
    torch.set_num_threads(args.threads)

  # ---- the experiment config: Countdown :tiny, then the flags --------------------------------
  c = config_lib.base_config("countdown", "tiny")
  c.model.preset = args.preset
  c.algorithm = args.algorithm
  c.task.num_eval_examples = 0
  c.seed = args.seed
  if args.group_size is not None:
    c.batch.group_size = args.group_size
  if args.batch is not None:
    if args.batch % c.batch.group_size:
      raise ValueError(f"--batch={args.batch} must be a multiple of the group size "
                       f"{c.batch.group_size}")
    c.batch.num_prompts = args.batch // c.batch.group_size
  bsz = c.batch.num_prompts * c.batch.group_size
  c.batch.micro_batch_size = args.micro_batch or bsz
  if args.gen_length is not None:
    c.rollout.gen_length = args.gen_length
  if args.block_length is not None:
    c.rollout.block_length = args.block_length
  elif c.rollout.gen_length % c.rollout.block_length:
    c.rollout.block_length = c.rollout.gen_length
  if args.steps is not None:
    c.rollout.steps = args.steps
  if args.k is not None:
    c.egspo.num_selected_steps = args.k
  if args.schedule is not None:
    c.train.update_schedule = args.schedule
  if args.dtype is not None:
    c.model.param_dtype = c.model.dtype = args.dtype
  for name in ("scan_layers", "remat"):
    if getattr(args, name) is not None:
      c.model[name] = getattr(args, name)
  config_lib.validate(c)

  workdir = tempfile.mkdtemp(prefix="egspo_bench_")
  tr = train_lib.Trainer.create(c, workdir)
  mcfg = tr.model_cfg
  tx = train_lib.rl_optimizer(c)
  state = tr.new_state(tr.params, tx)
  ref_params = update_lib.reference_params(tr.params)
  scfg = train_lib.sampler_config(c, mcfg, "rollout")
  max_commit = int(sampler_lib.commit_schedule(scfg).max())
  algo = train_lib.make_algorithm(tr, ref_params, scfg)
  rollout = train_lib.make_rollout(tr, scfg)
  update = tr.make_update(tx, algo.loss, state)
  stream = tr.train_stream(c.batch.num_prompts, c.batch.group_size, seed=c.seed)
  base_key = jax.random.fold_in(jax.random.key(c.seed), train_lib.RL_KEY)

  b, g, t, k = bsz, c.rollout.gen_length, c.rollout.steps, c.egspo.num_selected_steps
  p = c.rollout.max_prompt_length
  load0 = os.getloadavg()
  print(f"preset={args.preset} params={mcfg.num_params():,} (d={mcfg.d_model} "
        f"layers={mcfg.n_layers} V={mcfg.vocab_size}) task=countdown:tiny "
        f"algorithm={c.algorithm} schedule={c.train.update_schedule}")
  print(f"B={b} (prompts {c.batch.num_prompts} x group {c.batch.group_size}) P={p} G={g} T={t} "
        f"K={k} M={max_commit} micro_batch={c.batch.micro_batch_size} threads={args.threads} "
        f"cpus={cpus} devices={jax.device_count()} ({jax.devices()[0].device_kind}) "
        f"dtype={mcfg.dtype} scan_layers={mcfg.scan_layers} remat={mcfg.remat} "
        f"jax={jax.__version__} torch={torch.__version__}")
  print(f"load average at start (1/5/15 min): {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} "
        f"on {os.cpu_count()} cores")

  # ---- 1. one RL iteration, phase by phase (train.rl_iteration) -------------------------------
  def iteration(it, state):
    key = jax.random.fold_in(base_key, it)
    timer = PhaseClocks()
    out = train_lib.rl_iteration(tr, rollout, algo, update, state, stream.next_batch().repeated,
                                 key, timer)
    return out.state, timer.clocks, out.batches, key

  with Clock() as ck:
    state, _, _, _ = iteration(0, state)
  print(f"warm-up iteration (compiles): {ck.wall:.2f} s wall")
  runs = []
  for i in range(args.iters):
    state, times, batches, key = iteration(1 + i, state)
    runs.append(times)
  phases = ("rollout", "reward", "plan", "update")
  med = {ph: statistics.median(r[ph].wall for r in runs) for ph in phases}
  med_cpu = {ph: statistics.median(r[ph].cpu for r in runs) for ph in phases}
  total = sum(med.values())
  print(f"[1] seconds per RL iteration (median of {args.iters}, wall; cpu in brackets):")
  for ph, label in (("rollout", "rollout (T sampler steps)"),
                    ("reward", "reward (decode + task reward)"),
                    ("plan", "plan (selection + one-step values + advantages + ref forward)"),
                    ("update", f"update ({len(batches)} optimizer step(s))")):
    print(f"    {label:<66} {med[ph]:8.4f} s  [{med_cpu[ph]:.4f}]")
  print(f"    {'value+reward (= reward + plan)':<66} {med['reward'] + med['plan']:8.4f} s  "
        f"[{med_cpu['reward'] + med_cpu['plan']:.4f}]")
  print(f"    {'total':<66} {total:8.4f} s  [{sum(med_cpu.values()):.4f}]")

  # The reference forward alone (part of `plan`), batched, for the comparison in 3.
  # Rebuild the whole [B, K] plan batch from the per-step batches (per_step: one column each).
  cols = ("steps", "valid", "adv", "logp_old", "logp_ref")
  flat = [jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), bt) for bt in batches]
  full = dict(flat[0])
  for n in cols:
    full[n] = jnp.concatenate([f[n] for f in flat], axis=1)
  ref_jit = algo._ref_logps  # pylint: disable=protected-access
  jax.block_until_ready(ref_jit(ref_params, tr.frozen, full))  # warm-up (compiles)
  ref_times = []
  for _ in range(max(args.iters, 1)):
    with Clock() as ck:
      jax.block_until_ready(ref_jit(ref_params, tr.frozen, full))
    ref_times.append(ck)
  ref_b_wall = statistics.median(x.wall for x in ref_times)
  ref_b_cpu = statistics.median(x.cpu for x in ref_times)

  # ---- 2. FLOPs and achieved FLOP/s of the update ----------------------------------------------
  upd_batches = [tr.put_batch(bt, micro_axis=True) for bt in batches]
  compiled = update.lower(state, tr.frozen, upd_batches[0], key).compile()
  # XLA's cost analysis counts a loop body once: the update scans over its A micro-batches and
  # the reference forward maps over B / micro_batch ones, so their counts are scaled by the trip
  # count (exact while A = 1, the default; the optimizer's few FLOPs are then over-counted).
  num_micro = jax.tree.leaves(batches[0])[0].shape[0]
  xla_update = _flops_of(compiled) * len(batches) * num_micro  # all optimizer steps
  xla_ref = (_flops_of(ref_jit.lower(ref_params, tr.frozen, full).compile())
             * (b // c.batch.micro_batch_size))
  fl = iteration_flops(mcfg, b=b, p=p, g=g, t=t, k=k, m=max_commit)
  naive = 2.0 * mcfg.num_params() * (b * k * (p + g)) * 3
  peak = matmul_peak(args.matmul_n, dtype=args.matmul_dtype)
  upd_s, upd_c = med["update"], med_cpu["update"]
  print(f"[2] update FLOPs per iteration: XLA cost_analysis {xla_update / 1e9:.3f} GFLOP; "
        f"analytic (layers+attention+head, x3 fwd+bwd) {fl['update'] / 1e9:.3f} GFLOP; "
        f"naive 2*N*tokens*3 {naive / 1e9:.3f} GFLOP (N={mcfg.num_params():,}, "
        f"tokens=B*K*(P+G)={b * k * (p + g):,})")
  print(f"    reference-policy forward: XLA {xla_ref / 1e9:.3f} GFLOP; analytic "
        f"{fl['ref'] / 1e9:.3f} GFLOP"
        + ("; scan_layers: XLA counts the scanned block once, not per layer"
           if mcfg.scan_layers else ""))
  print(f"    achieved: {xla_update / upd_s / 1e9:.2f} GFLOP/s (XLA count) / "
        f"{fl['update'] / upd_s / 1e9:.2f} GFLOP/s (analytic) per wall second "
        f"({upd_s:.4f} s); {xla_update / upd_c / 1e9:.2f} / {fl['update'] / upd_c / 1e9:.2f} "
        f"GFLOP/s per CPU second ({upd_c:.4f} s)")
  print(f"    matmul peak ({args.matmul_n}x{args.matmul_n} {args.matmul_dtype}, best of 5): "
        f"jax.numpy.dot "
        f"{peak['jax']['wall']:.2f} GFLOP/s wall, {peak['jax']['cpu']:.2f} per CPU second; "
        f"torch.mm {peak['torch']['wall']:.2f} wall, {peak['torch']['cpu']:.2f} per CPU second")
  frac_wall = xla_update / upd_s / 1e9 / peak["jax"]["wall"]
  frac_cpu = xla_update / upd_c / 1e9 / peak["jax"]["cpu"]
  print(f"    update / jax matmul peak (XLA count): {frac_wall:.1%} in wall time, "
        f"{frac_cpu:.1%} in CPU time; analytic count: "
        f"{fl['update'] / upd_s / 1e9 / peak['jax']['wall']:.1%} wall, "
        f"{fl['update'] / upd_c / 1e9 / peak['jax']['cpu']:.1%} cpu")
  rollout_s = med["rollout"]
  tok = dict(rollout_tokens_per_s=b * g / rollout_s, update_tokens_per_s=b * k * (p + g) / upd_s)
  mfu = {}
  if args.peak_tflops:
    stated = args.peak_tflops * 1e12
    mfu = dict(peak_tflops=args.peak_tflops, update_mfu=fl["update"] / upd_s / stated,
               update_mfu_xla=xla_update / upd_s / stated,
               rollout_mfu=fl["rollout"] / rollout_s / stated)
  print(f"    tokens/s: rollout {tok['rollout_tokens_per_s']:,.0f} generated (B*G / rollout s), "
        f"update {tok['update_tokens_per_s']:,.0f} trained (B*K*(P+G) / update s)"
        + ("" if not mfu else
           f"; MFU (analytic FLOPs) against the stated peak {args.peak_tflops:g} TFLOP/s: "
           f"update {mfu['update_mfu']:.1%} (XLA count {mfu['update_mfu_xla']:.1%}), rollout "
           f"{mfu['rollout_mfu']:.1%}"))

  # ---- 3. the reference's scheme: batch-1 per-state forwards+backwards in a Python loop -------
  def loss_of_params(params, frozen, mb):
    loss_sum, denom, _ = algo.loss(tr.policy.model(params, frozen), mb, None)
    return loss_sum, denom

  grad_fn = jax.value_and_grad(loss_of_params, has_aux=True)

  @jax.jit
  def per_state(acc, params, frozen, mb):
    """One state [1, 1]: its loss gradient added into the accumulators (acc_g, acc_denom)."""
    (_, denom), grads = grad_fn(params, frozen, mb)
    return jax.tree.map(jnp.add, acc[0], grads), acc[1] + denom

  @jax.jit
  def apply(st, acc):
    grads = jax.tree.map(lambda x: x / jnp.maximum(acc[1], 1.0), acc[0])
    updates, new_opt = tx.update(grads, st.opt_state, st.params)
    return update_lib.TrainState(step=st.step + 1, params=optax.apply_updates(st.params, updates),
                                 opt_state=new_opt), grads

  @jax.jit
  def ref_forward_one(ref_params, frozen, mb):
    """log π_ref of one state [1, 1]: the function `plan` maps over micro-batches."""
    model = tr.policy.model(ref_params, frozen)
    return update_lib.step_logprobs(model, mb["prompt_ids"], mb["prompt_mask"], mb["tokens"],
                                    mb["commit_step"], mb["steps"],
                                    mask_token_id=mcfg.mask_token_id, max_commit=max_commit)

  def one_state(bt, i, j):
    """State i's j-th selected step as a [1, 1] batch (no micro-batch axis), host-sliced."""
    return {n: (v[i:i + 1, j:j + 1] if n in cols else v[i:i + 1]) for n, v in bt.items()}

  host_full = jax.device_get(full)
  states = [[one_state(host_full, i, j) for i in range(b)] for j in range(k)]
  states = jax.device_put(states)  # sliced beforehand: the loop times only the computation
  zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.float32(0))
  ref_state = jax.jit(lambda s: jax.tree.map(jnp.copy, s))(state)

  def reference_update(st):
    grads = []
    groups = states if c.train.update_schedule == "per_step" else [sum(states, [])]
    for group in groups:  # one optimizer step per selected-step column (per_step schedule)
      acc = zeros
      for mb in group:
        acc = per_state(acc, st.params, tr.frozen, mb)
      st, gr = apply(st, acc)
      grads.append(gr)
    jax.block_until_ready(st)
    return st, grads

  def reference_ref_forward():
    out = [ref_forward_one(ref_params, tr.frozen, mb) for group in states for mb in group]
    return jax.block_until_ready(out)

  _, loop_grads = reference_update(ref_state)  # warm-up (compiles); also the grads to check
  reference_ref_forward()
  loop_t, loop_rt = [], []
  for _ in range(args.ref_iters):
    with Clock() as ck:
      reference_update(ref_state)
    loop_t.append(ck)
    with Clock() as ck:
      reference_ref_forward()
    loop_rt.append(ck)
  loop_wall = statistics.median(x.wall for x in loop_t)
  loop_cpu = statistics.median(x.cpu for x in loop_t)
  loopr_wall = statistics.median(x.wall for x in loop_rt)
  loopr_cpu = statistics.median(x.cpu for x in loop_rt)

  # Check: the batch-1 accumulated gradient equals the batched one (first optimizer step).
  @jax.jit
  def batched_grad(params, frozen, mb):
    (_, denom), grads = grad_fn(params, frozen, mb)
    return jax.tree.map(lambda x: x / jnp.maximum(denom, 1.0), grads)

  first = (jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), batches[0])
           if c.train.update_schedule == "per_step" else full)
  gb = batched_grad(ref_state.params, tr.frozen, first)
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(gb))
  diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in
             zip(jax.tree.leaves(gb), jax.tree.leaves(loop_grads[0])))
  speed = loop_wall / upd_s
  speed_ref = loopr_wall / ref_b_wall
  speed_both = (loop_wall + loopr_wall) / (upd_s + ref_b_wall)
  print(f"[3] update, batched (egspo update_step, {len(batches)} call(s)): {upd_s:.4f} s wall "
        f"[{med_cpu['update']:.4f} cpu]; reference scheme ({b * k} batch-1 jitted grad calls in "
        f"a Python loop + {len(batches)} optimizer step(s)): {loop_wall:.4f} s wall "
        f"[{loop_cpu:.4f} cpu] -> speedup {speed:.2f}x wall, "
        f"{loop_cpu / upd_c:.2f}x cpu")
  print(f"    reference-policy forward, batched: {ref_b_wall:.4f} s [{ref_b_cpu:.4f}]; batch-1 "
        f"loop: {loopr_wall:.4f} s [{loopr_cpu:.4f}] -> speedup {speed_ref:.2f}x wall, "
        f"{loopr_cpu / ref_b_cpu:.2f}x cpu")
  print(f"    update + reference forward: speedup {speed_both:.2f}x wall, "
        f"{(loop_cpu + loopr_cpu) / (upd_c + ref_b_cpu):.2f}x cpu")
  print(f"    gradient check (first optimizer step): max|batched - batch-1 accumulated| = "
        f"{diff:.2e} (max|g| = {scale:.2e})")

  # ---- 4. FLOPs per iteration: EGSPO (K steps) against all T steps -----------------------------
  fl_t = iteration_flops(mcfg, b=b, p=p, g=g, t=t, k=t, m=max_commit)
  train_k, train_t = fl["update"] + fl["ref"], fl_t["update"] + fl_t["ref"]
  print(f"[4] analytic FLOPs per iteration: rollout {fl['rollout'] / 1e9:.3f} GFLOP; "
        f"update+ref EGSPO (K={k}) {train_k / 1e9:.3f} vs all steps (K=T={t}) "
        f"{train_t / 1e9:.3f} GFLOP (ratio {train_k / train_t:.3f}); whole iteration "
        f"{fl['total'] / 1e9:.3f} vs {fl_t['total'] / 1e9:.3f} GFLOP "
        f"(ratio {fl['total'] / fl_t['total']:.3f})")
  load1 = os.getloadavg()
  print(f"load average at end (1/5/15 min): {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")

  result = dict(
      preset=args.preset, params=mcfg.num_params(), B=b, P=p, G=g, T=t, K=k, M=max_commit,
      threads=args.threads, schedule=c.train.update_schedule, load_start=load0[0],
      load_end=load1[0],
      seconds={ph: med[ph] for ph in phases} | {"value_reward": med["reward"] + med["plan"],
                                                "total": total},
      cpu_seconds=med_cpu,
      update_gflop_xla=xla_update / 1e9, update_gflop_analytic=fl["update"] / 1e9,
      update_gflop_naive=naive / 1e9, ref_gflop_xla=xla_ref / 1e9,
      ref_gflop_analytic=fl["ref"] / 1e9,
      update_gflops_xla=xla_update / upd_s / 1e9,
      update_gflops_analytic=fl["update"] / upd_s / 1e9,
      update_gflops_per_cpu_s_xla=xla_update / upd_c / 1e9,
      matmul_dtype=args.matmul_dtype, dtype=mcfg.dtype, device=jax.devices()[0].device_kind,
      **tok, **mfu,
      matmul_peak_gflops_jax=peak["jax"]["wall"], matmul_peak_gflops_torch=peak["torch"]["wall"],
      matmul_peak_gflops_per_cpu_s_jax=peak["jax"]["cpu"],
      matmul_peak_gflops_per_cpu_s_torch=peak["torch"]["cpu"],
      update_fraction_of_peak=frac_wall, update_fraction_of_peak_cpu=frac_cpu,
      batched_update_s=upd_s, batch1_update_s=loop_wall, update_speedup=speed,
      batched_update_cpu_s=upd_c, batch1_update_cpu_s=loop_cpu,
      update_speedup_cpu=loop_cpu / upd_c,
      batched_ref_s=ref_b_wall, batch1_ref_s=loopr_wall, ref_speedup=speed_ref,
      batched_ref_cpu_s=ref_b_cpu, batch1_ref_cpu_s=loopr_cpu,
      ref_speedup_cpu=loopr_cpu / ref_b_cpu,
      combined_speedup_cpu=(loop_cpu + loopr_cpu) / (upd_c + ref_b_cpu),
      combined_speedup=speed_both, grad_max_abs_diff=diff, grad_max_abs=scale,
      iteration_gflop_k=fl["total"] / 1e9, iteration_gflop_all_t=fl_t["total"] / 1e9,
      train_gflop_k=train_k / 1e9, train_gflop_all_t=train_t / 1e9,
      flops_ratio_train=train_k / train_t, flops_ratio_iteration=fl["total"] / fl_t["total"])
  print("RESULT " + json.dumps(result))
  tr.writer.close()
  return result


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
