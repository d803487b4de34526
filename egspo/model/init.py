"""A LLaDA initialised straight into its shardings (the random-init counterpart of
`egspo.model.pretrained.from_pretrained`)."""

from __future__ import annotations

from flax import nnx
from jax.sharding import Mesh

from egspo import sharding
from egspo.model.llada import LLaDA, ModelConfig


def create_sharded_model(cfg: ModelConfig, mesh: Mesh, rules=sharding.RULES,
                         seed: int = 0) -> LLaDA:
  """A freshly initialised LLaDA whose parameters are created directly in their shardings.

  The model is traced abstractly (`nnx.eval_shape`) and initialised inside a jit with
  `out_shardings`, so no device or host ever holds the full unsharded model. The values equal
  `llada.init_model(cfg, seed)` (JAX's partitionable threefry makes random draws
  sharding-invariant).
  """
  return sharding.create_sharded(lambda: LLaDA(cfg, rngs=nnx.Rngs(seed)), mesh, rules)
