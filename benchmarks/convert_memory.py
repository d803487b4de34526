"""Peak host memory of `python -m egspo.convert` on a multi-shard HF checkpoint of ≥ 1 GB.

Builds a random LLaDA checkpoint (wide layers, float32 by default) in a temp dir, written tensor
by tensor so this process stays small, then runs the converter's CLI entry point
(`egspo.convert.main`, what `python -m egspo.convert` runs) in a fresh subprocess. The child reads
its own high-water mark `VmHWM` from /proc/self/status twice: after imports, JAX backend start and
one tiny orbax save (the post-import baseline: fixed costs), and after the conversion (the peak).
The parent also polls the child's RSS with psutil every 5 ms as a cross-check.
(`getrusage(RUSAGE_CHILDREN)` is not used: on Linux it carries over the parent's RSS at fork
time, which here includes the checkpoint builder's buffers.)

Prints model size, largest shard, largest tensor, peak RSS and peak RSS minus the baseline.
Target (issue 2): peak ≤ largest shard + a constant, far below the model size.

    /work/venv/bin/python benchmarks/convert_memory.py [--layers 14 --d_model 1024 ...]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np
import psutil

from egspo.model import checkpoint_spec, safetensors_io
from egspo.model.llada import ModelConfig

MB = 2**20

CHILD = r"""
import json, pathlib, sys
import numpy as np
import jax
from egspo import convert as cli
from egspo.model import orbax_io

def vmhwm():
  for line in open("/proc/self/status"):
    if line.startswith("VmHWM"):
      return int(line.split()[1]) * 1024

hf, out, warm = sys.argv[1:4]
jax.devices()
orbax_io.save_group(pathlib.Path(warm), "warm", {("a",): np.ones(4, np.float32)})
baseline = vmhwm()
rc = cli.main(["--checkpoint", hf, "--output", out, "--quiet"])
print(json.dumps({"rc": rc, "baseline": baseline, "peak": vmhwm()}))
"""


LOAD_CHILD = r"""
import json, pathlib, sys
import numpy as np
import jax
from egspo.model import orbax_io, pretrained

def vmhwm():
  for line in open("/proc/self/status"):
    if line.startswith("VmHWM"):
      return int(line.split()[1]) * 1024

src, warm = sys.argv[1:3]
jax.devices()
orbax_io.save_group(pathlib.Path(warm), "warm", {("a",): np.ones(4, np.float32)})
baseline = vmhwm()
model = pretrained.from_pretrained(src)
jax.block_until_ready(jax.tree.leaves(model))
print(json.dumps({"baseline": baseline, "peak": vmhwm()}))
"""


def build_checkpoint(path: pathlib.Path, cfg: ModelConfig, max_shard_bytes: int,
                     dtype: np.dtype) -> dict:
  """Random HF checkpoint of `cfg`, generated and written one tensor at a time."""
  path.mkdir(parents=True)
  specs = checkpoint_spec.tensor_specs(cfg)
  sizes = [int(np.prod(s.hf_shape)) * dtype.itemsize for s in specs]
  plan = safetensors_io.shard_plan(sizes, max_shard_bytes)
  rng = np.random.default_rng(0)
  weight_map = {}

  def fetch(shape):
    return lambda: (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dtype)

  for k, idx in enumerate(plan):
    fname = f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors"
    safetensors_io.write_file(path / fname, [(specs[i].hf_name, fetch(specs[i].hf_shape), dtype,
                                              specs[i].hf_shape) for i in idx])
    weight_map.update({specs[i].hf_name: fname for i in idx})
  (path / safetensors_io.INDEX).write_text(json.dumps({"metadata": {"total_size": sum(sizes)},
                                                "weight_map": weight_map}))
  hf = cfg.to_hf_config()
  hf["torch_dtype"] = "float32" if dtype == np.float32 else "bfloat16"
  (path / checkpoint_spec.CONFIG).write_text(json.dumps(hf))
  shard_sizes = [(path / f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors").stat().st_size
                 for k in range(len(plan))]
  groups = checkpoint_spec.group_specs(cfg).values()
  return {"model_bytes": sum(sizes), "largest_tensor": max(sizes), "n_shards": len(plan),
          "largest_shard": max(shard_sizes),
          "largest_group": max(sum(int(np.prod(s.hf_shape)) * dtype.itemsize for s in g)
                               for g in groups)}


def run_and_poll(cmd: list[str]) -> tuple[int, str, float, float]:
  """(returncode, stdout, peak RSS from 5 ms psutil polling, wall seconds) of a child process."""
  t0 = time.time()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  ps, peak = psutil.Process(proc.pid), 0
  while proc.poll() is None:
    try:
      peak = max(peak, ps.memory_info().rss)
    except psutil.NoSuchProcess:
      break
    time.sleep(0.005)
  out, err = proc.communicate()
  if proc.returncode:
    sys.stderr.write(out + err)
  return proc.returncode, out, peak, time.time() - t0


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--d_model", type=int, default=1024)
  p.add_argument("--layers", type=int, default=14)
  p.add_argument("--mlp", type=int, default=4096)
  p.add_argument("--vocab", type=int, default=32768)
  p.add_argument("--max_shard_mb", type=int, default=300)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--workdir", default=None, help="where to build (default: a temp dir)")
  p.add_argument("--no_load", dest="load", action="store_false",
                 help="skip measuring from_pretrained (the loaded model lives in host memory on CPU)")
  args = p.parse_args()
  dtype = np.dtype(np.float32 if args.dtype == "float32" else ml_dtypes.bfloat16)
  cfg = ModelConfig(d_model=args.d_model, n_layers=args.layers, n_heads=args.d_model // 128,
                    n_kv_heads=args.d_model // 128, mlp_hidden_size=args.mlp,
                    vocab_size=args.vocab, embedding_size=args.vocab, mask_token_id=args.vocab - 1,
                    eos_token_id=1, pad_token_id=1, param_dtype=args.dtype)
  with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
    tmp = pathlib.Path(tmp)
    t0 = time.time()
    info = build_checkpoint(tmp / "hf", cfg, args.max_shard_mb * MB, dtype)
    build_s = time.time() - t0
    rc, out, peak_poll, wall = run_and_poll(
        [sys.executable, "-c", CHILD, str(tmp / "hf"), str(tmp / "orbax"), str(tmp / "warm")])
    assert rc == 0, "conversion failed"
    child = json.loads(out.strip().splitlines()[-1])
    assert child["rc"] == 0, "conversion failed"
    out_bytes = sum(f.stat().st_size for f in (tmp / "orbax").rglob("*") if f.is_file())
    loads = {}
    if args.load:  # from_pretrained into (CPU) device memory, from each layout
      for name in ("orbax", "hf"):
        rc, out, _, load_wall = run_and_poll([sys.executable, "-c", LOAD_CHILD, str(tmp / name),
                                              str(tmp / f"warm_{name}")])
        assert rc == 0, f"from_pretrained({name}) failed"
        loads[name] = dict(json.loads(out.strip().splitlines()[-1]), wall=load_wall)
  peak, baseline = child["peak"], child["baseline"]
  print(f"config: d_model={cfg.d_model} layers={cfg.n_layers} mlp={cfg.mlp_hidden_size} "
        f"vocab={cfg.vocab_size} dtype={args.dtype} ({cfg.num_params() / 1e6:.0f}M params)")
  print(f"model size:          {info['model_bytes'] / MB:8.1f} MiB in {info['n_shards']} shards "
        f"(built in {build_s:.1f}s)")
  print(f"largest shard:       {info['largest_shard'] / MB:8.1f} MiB")
  print(f"largest tensor:      {info['largest_tensor'] / MB:8.1f} MiB")
  print(f"largest layer group: {info['largest_group'] / MB:8.1f} MiB")
  print(f"orbax output:        {out_bytes / MB:8.1f} MiB, conversion wall {wall:.1f}s")
  print(f"post-import baseline RSS: {baseline / MB:8.1f} MiB")
  print(f"peak RSS (conversion):    {peak / MB:8.1f} MiB (VmHWM; psutil 5 ms poll "
        f"{peak_poll / MB:.1f})")
  print(f"peak RSS - baseline:      {(peak - baseline) / MB:8.1f} MiB "
        f"= {(peak - baseline) / info['model_bytes']:.2f} x model size, "
        f"{(peak - baseline) / info['largest_shard']:.2f} x largest shard, "
        f"{(peak - baseline) / info['largest_group']:.2f} x largest group")
  for name, r in loads.items():
    extra = r["peak"] - r["baseline"] - info["model_bytes"]
    print(f"from_pretrained({name} dir) on CPU: peak RSS - baseline {(r['peak'] - r['baseline']) / MB:.1f}"
          f" MiB = model {info['model_bytes'] / MB:.1f} MiB + {extra / MB:.1f} MiB ({r['wall']:.1f}s)")


if __name__ == "__main__":
  main()
