"""The public PyTorch LLaDA samplers as baselines for benchmarks/sampler.py (`--public DIR`).

Nothing of theirs is in this repository: DIR is a checkout of NVlabs/Fast-dLLM that the user
provides (its `llada/model/modeling_llada.py`, LLaDA's published modeling code with Fast-dLLM's
K/V-cache hooks, and `llada/generate.py`), and optionally `--public_llada DIR2`, a checkout of
ML-GSAI/LLaDA (its batched `generate.py`, the sampler d1 and the EGSPO release call). The model
is built from the config.json and safetensors that `egspo.model.export_hf` writes for the
benchmark's weights, so the run also checks that an egspo export loads in LLaDA's own code with
identical logits.

Samplers (greedy, low-confidence remasking, as published):
  public   ML-GSAI/LLaDA `generate`, the whole batch at once (with --public_llada)
  fast_none, fast_prefix, fast_dual  Fast-dLLM's `generate`, `generate_with_prefix_cache` and
           `generate_with_dual_cache`: one prompt at a time, as published (their canvas is
           `torch.full((1, ...))`)

Compatibility: the published code targets transformers 4.x. Under transformers 5 its
`from_pretrained` fails, so the model is constructed from `LLaDAConfig` and the safetensors
loaded with `load_state_dict(strict=True)`; LLaDAConfig's `use_cache` is set on the instance
(transformers 5 no longer keeps it). It imports `einops` (the `bench` extra).
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys
import tempfile

SAMPLERS = ("public", "fast_none", "fast_prefix", "fast_dual")
# Which egspo cache mode each public sampler runs (token agreement and speed-ups are taken
# against it).
EGSPO_MODE = {"public": "none", "fast_none": "none", "fast_prefix": "prefix", "fast_dual": "dual"}


def _load_module(name: str, path: pathlib.Path):
  if not path.is_file():
    raise SystemExit(f"error: {path} not found (--public takes a checkout of NVlabs/Fast-dLLM, "
                     "--public_llada one of ML-GSAI/LLaDA)")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def check_dirs(fast_dllm: str, llada: str | None = None) -> None:
  """One line naming the missing file, before any model is built."""
  fast = pathlib.Path(fast_dllm).expanduser()
  for rel in ("llada/generate.py", "llada/model/modeling_llada.py",
              "llada/model/configuration_llada.py"):
    if not (fast / rel).is_file():
      raise SystemExit(f"error: --public {fast_dllm}: {rel} not found (give a checkout of "
                       "NVlabs/Fast-dLLM)")
  if llada and not (pathlib.Path(llada).expanduser() / "generate.py").is_file():
    raise SystemExit(f"error: --public_llada {llada}: generate.py not found (give a checkout of "
                     "ML-GSAI/LLaDA)")


class Public:
  """The published model and samplers over an egspo model's weights."""

  def __init__(self, egspo_model, fast_dllm: str, llada: str | None = None):
    import torch
    from safetensors.torch import load_file

    from egspo.model import export_hf

    check_dirs(fast_dllm, llada)
    fast = pathlib.Path(fast_dllm).expanduser().resolve() / "llada"
    sys.path.insert(0, str(fast))  # generate.py imports `model.modeling_llada`
    try:
      self.fast = _load_module("fast_dllm_generate", fast / "generate.py")
    finally:
      sys.path.remove(str(fast))
    self.llada = (_load_module("llada_generate", pathlib.Path(llada).expanduser() / "generate.py")
                  if llada else None)
    modeling = sys.modules["model.modeling_llada"]
    configuration = sys.modules["model.configuration_llada"]
    with tempfile.TemporaryDirectory() as tmp:
      export_hf(egspo_model, pathlib.Path(tmp) / "hf", dtype="float32")
      cfg_json = json.loads((pathlib.Path(tmp) / "hf" / "config.json").read_text())
      config = configuration.LLaDAConfig(**cfg_json)
      config.use_cache = False
      self.model = modeling.LLaDAModelLM(config, init_params=False).eval()
      self.model.load_state_dict(load_file(str(pathlib.Path(tmp) / "hf" / "model.safetensors")),
                                 strict=True)
    self.mask_id = cfg_json["mask_token_id"]
    self.torch = torch

  def logits(self, ids):
    with self.torch.no_grad():
      return self.model(self.torch.as_tensor(ids).long()).logits.numpy()

  def samplers(self) -> tuple[str, ...]:
    """Those this checkout can run (`public` needs ML-GSAI/LLaDA's batched generate)."""
    return SAMPLERS if self.llada is not None else SAMPLERS[1:]

  def generate(self, name: str, prompt, *, steps: int, gen_length: int, block_length: int):
    """Completion token ids [B, gen_length] (numpy) of one greedy run of sampler `name`."""
    torch = self.torch
    prompt = torch.as_tensor(prompt).long()
    kw = dict(steps=steps, gen_length=gen_length, block_length=block_length, temperature=0.0,
              remasking="low_confidence", mask_id=self.mask_id)
    p = prompt.shape[1]
    with torch.no_grad():
      if name == "public":
        return self.llada.generate(self.model, prompt, **kw)[:, p:].numpy()
      fn = {"fast_none": self.fast.generate,
            "fast_prefix": self.fast.generate_with_prefix_cache,
            "fast_dual": self.fast.generate_with_dual_cache}[name]
      rows = [fn(self.model, prompt[i:i + 1], **kw)[0][:, p:] for i in range(prompt.shape[0])]
    return torch.cat(rows).numpy()
