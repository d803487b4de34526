"""Device meshes, logical-axis sharding rules and multi-host helpers.

The mesh has three axes (MaxText / big_vision style):
  data   — pure data parallelism (parameters replicated across it);
  fsdp   — data parallelism whose members also split the parameters (ZeRO-3 / FSDP);
  tensor — tensor (model) parallelism inside attention heads, MLP and vocabulary.

Parameters name their dimensions with logical axes (`logical_axes` variable metadata, see
`egspo.model.llada`); `RULES` maps each logical name to mesh axes. Rules are plain data, a tuple
of `(logical_name, mesh_axes)` pairs, so a config can override them (`merge_rules`; the mapping
itself is `egspo.partitioning`'s). A dimension whose size is not divisible by its mesh axes, or
whose mesh axis is already used by an earlier dimension of the same array, is replicated instead
(logged at debug level) — correct, only less sharded. `use_mesh` makes a mesh and rules current,
so the model pins its activations by the same rules.
"""

from __future__ import annotations

import contextlib
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from egspo.partitioning import Rules, logical_to_mesh_axes, merge_rules

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # mesh axes a [B, ...] batch is split over

# Default logical → mesh axis rules. `layers` is the leading axis of scanned block stacks;
# `lora_rank` the inner dimension of LoRA factors; `batch`/`length` name activation dimensions.
RULES: Rules = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
    ("lora_rank", None),
    # Activations (see `egspo.model.llada.constrain`): the residual stream stays whole per
    # example; attention heads, MLP hidden units and logits split over tensor like their weights.
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


# ----------------------------------------------------------------------------------------------
# Mesh


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh with Auto axis types over `devices` (default: all).

  One axis may be -1: it takes all devices left over by the others. The product of the axis
  sizes must equal the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  shape = [data, fsdp, tensor]
  for name, s in zip(MESH_AXES, shape):
    if not isinstance(s, (int, np.integer)) or (s < 1 and s != -1):
      raise ValueError(f"mesh axis {name}={s!r} must be a positive integer or -1")
  if shape.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got data={data}, fsdp={fsdp}, "
                     f"tensor={tensor}")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if n % known:
      raise ValueError(f"mesh data={data}, fsdp={fsdp}, tensor={tensor}: {n} devices are not "
                       f"divisible by the fixed axes' product {known}")
    shape[shape.index(-1)] = n // known
  if math.prod(shape) != n:
    raise ValueError(f"mesh data={shape[0]} × fsdp={shape[1]} × tensor={shape[2]} = "
                     f"{math.prod(shape)} devices, but {n} devices are available")
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=auto, devices=devices)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules = RULES):
  """`mesh` and `rules` current (`jax.set_mesh`, flax's `nnx.logical_axis_rules`): the model
  pins activation shardings by its logical names (`egspo.model.llada.constrain`).

  A function jitted inside keeps the rules it was traced with; use one rule set per process.
  """
  with jax.set_mesh(mesh), nnx.logical_axis_rules(merge_rules(rules)):
    yield mesh


# ----------------------------------------------------------------------------------------------
# Parameters


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _variable_logical_axes(path, var: nnx.Variable) -> tuple[str | None, ...]:
  """The variable's logical axes, with "layers" prepended for a scanned stack (ndim one larger)."""
  value = var.get_value() if hasattr(var, "get_value") else var.value
  ndim = len(np.shape(value))
  axes = var.get_metadata().get("logical_axes")
  if axes is None:
    return (None,) * ndim
  axes = tuple(axes)
  if len(axes) + 1 == ndim:
    axes = ("layers",) + axes
  if len(axes) != ndim:
    raise ValueError(f"parameter {jax.tree_util.keystr(path)} has shape {np.shape(value)} but "
                     f"logical axes {axes}")
  return axes


def logical_to_mesh_sharding(state, mesh: Mesh, rules=RULES):
  """Pytree of NamedSharding matching `state` (an nnx.State/graph node, concrete or abstract).

  Every nnx.Variable is mapped through its `logical_axes` metadata and `rules` (variables without
  logical axes, e.g. RNG state, are replicated). The result has the structure of `state` with
  each variable's value replaced by its NamedSharding, so it can be passed as `in_shardings` /
  `out_shardings` of a jit over that state, or to `jax.device_put`.
  """
  rules = merge_rules(rules)

  def one(path, var):
    if not _is_variable(var):  # a bare array leaf: replicate
      return NamedSharding(mesh, P())
    value = var.get_value() if hasattr(var, "get_value") else var.value
    spec = logical_to_mesh_axes(_variable_logical_axes(path, var), rules, mesh, np.shape(value),
                                name=jax.tree_util.keystr(path))
    return var.replace(NamedSharding(mesh, spec))

  return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_variable)


def create_sharded(make_module, mesh: Mesh, rules=RULES):
  """Builds `make_module()` (an nnx.Module factory) directly into its logical-axis shardings."""
  abstract = nnx.eval_shape(make_module)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = logical_to_mesh_sharding(abstract_state, mesh, rules)

  def init():
    return nnx.state(make_module())

  state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def shard_model(model, mesh: Mesh, rules=RULES):
  """Moves an existing model's variables onto their logical-axis shardings (in place)."""
  state = nnx.state(model)
  nnx.update(model, jax.device_put(state, logical_to_mesh_sharding(state, mesh, rules)))
  return model


def model_shardings(model, mesh: Mesh, rules=RULES, filter_=nnx.Param):
  """Shardings of the `filter_` variables of `model` (e.g. for `in_shardings` of a train step)."""
  return logical_to_mesh_sharding(nnx.state(model, filter_), mesh, rules)


# ----------------------------------------------------------------------------------------------
# Data


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a [B, ...] array split along its batch dimension over (data, fsdp).

  Trailing dimensions are replicated whatever their number, so one sharding serves every
  batch array (ids [B, L], masks, advantages [B, K], ...).
  """
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_size_multiple(mesh: Mesh) -> int:
  """The global batch size must be a multiple of this (the data × fsdp device count)."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def shard_batch(batch, mesh: Mesh):
  """Places a pytree of host/global [B, ...] arrays split along B over (data, fsdp).

  Single-process only (each process passes the whole batch); use `host_local_to_global` when
  every process holds its own slice.
  """
  n = batch_size_multiple(mesh)

  def put(x):
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    if x.ndim == 0 or x.shape[0] % n:
      raise ValueError(f"batch dimension {x.shape[:1]} of an array with shape {x.shape} is not "
                       f"divisible by the data×fsdp device count {n}")
    return jax.device_put(x, data_sharding(mesh))

  return jax.tree.map(put, batch)


# ----------------------------------------------------------------------------------------------
# Multi-host


def is_main_process() -> bool:
  """True on process 0 (the one that writes logs, metrics and checkpoints metadata)."""
  return jax.process_index() == 0


def host_local_to_global(batch, mesh: Mesh, spec: P = P(BATCH_AXES)):
  """Assembles per-process [B_local, ...] arrays into global [B_local × processes, ...] arrays.

  Each process passes its own rows; `jax.make_array_from_process_local_data` stitches them
  into one array sharded by `spec` over `mesh` without any host gathering the whole batch.
  """
  sharding = NamedSharding(mesh, spec)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      batch)


def process_allgather(x, tiled: bool = True):
  """The full value of a (possibly multi-host sharded) pytree on every host, as numpy arrays.

  tiled=True concatenates per-process pieces along the first axis (global arrays come back
  whole); tiled=False stacks them under a new leading process axis.
  """
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(x, tiled=tiled)


def sync_global_devices(name: str) -> None:
  """Barrier across all processes (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def describe(state, max_rows: int = 50) -> str:
  """A short table 'path shape spec' of a sharded state, for logs."""
  rows = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    spec = getattr(getattr(leaf, "sharding", None), "spec", None)
    rows.append(f"{jax.tree_util.keystr(path)} {tuple(np.shape(leaf))} {spec}")
  return "\n".join(rows[:max_rows] + ([f"... {len(rows) - max_rows} more"] if len(rows) > max_rows
                                       else []))


__all__ = [
    "MESH_AXES", "BATCH_AXES", "RULES", "make_mesh", "use_mesh", "merge_rules",
    "logical_to_mesh_axes", "logical_to_mesh_sharding", "create_sharded", "shard_model",
    "model_shardings", "data_sharding", "replicated", "batch_size_multiple", "shard_batch",
    "is_main_process", "host_local_to_global", "process_allgather", "sync_global_devices",
    "describe",
]
