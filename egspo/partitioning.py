"""Logical axis names → `PartitionSpec`s under rules given as data (no mesh or model state).

A rule set is a tuple of `(logical_name, mesh_axes)` pairs, mesh_axes None, a mesh axis name or a
tuple of names (`merge_rules` normalises what a config holds). The model pins activations with
these under the flax rules context (`egspo.model.llada.constrain`); `egspo.sharding` holds the
default rules and maps parameters and batches with them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence

from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]


def _normalise_axes(value, name: str) -> MeshAxes:
  if value is None or value == () or value == []:
    return None
  if isinstance(value, str):
    return value
  if isinstance(value, Iterable) and all(isinstance(a, str) for a in value):
    value = tuple(value)
    return value[0] if len(value) == 1 else value
  raise ValueError(f"sharding rule for {name!r}: mesh axes must be None, a mesh axis name or a "
                   f"sequence of names, got {value!r}")


def merge_rules(rules: Rules | Mapping | Sequence,
                overrides: Mapping | Sequence | None = None) -> Rules:
  """`rules` with the entries of `overrides` replaced or added (both: pairs or a mapping).

  Accepts what a config holds (lists of [name, axes] pairs, or a dict), returns a tuple of
  (logical_name, mesh_axes) pairs with mesh_axes None, a str or a tuple of str.
  """
  def pairs(r):
    items = r.items() if isinstance(r, Mapping) else r
    out = []
    for item in items:
      if not (isinstance(item, Sequence) and len(item) == 2 and isinstance(item[0], str)):
        raise ValueError(f"a sharding rule must be a (logical_name, mesh_axes) pair, got {item!r}")
      out.append((item[0], _normalise_axes(item[1], item[0])))
    return out

  merged = dict(pairs(rules))
  if overrides:
    merged.update(pairs(overrides))
  return tuple(merged.items())


def _rules_dict(rules) -> dict[str, MeshAxes]:
  return dict(merge_rules(rules))


def logical_to_mesh_axes(logical_axes: Sequence[str | None], rules, mesh=None,
                         shape: Sequence[int] | None = None, name: str = "") -> P:
  """PartitionSpec for an array with the given logical axis names.

  With `mesh` and `shape`, dimensions not divisible by their mesh axes' total size, and mesh
  axes already used by an earlier dimension, are replicated (debug log) so the spec is always
  valid for that array.
  """
  table = _rules_dict(rules)
  spec, used = [], set()
  for dim, logical in enumerate(logical_axes):
    if logical is None:
      spec.append(None)
      continue
    if logical not in table:
      raise ValueError(f"no sharding rule for logical axis {logical!r}{' of ' + name if name else ''}"
                       f"; known: {sorted(table)}")
    axes = table[logical]
    axes_t = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    if mesh is not None:
      unknown = [a for a in axes_t if a not in mesh.shape]
      if unknown:
        raise ValueError(f"sharding rule {logical!r} → {axes!r} names mesh axes {unknown} not in "
                         f"the mesh {dict(mesh.shape)}")
      # Size-1 mesh axes shard nothing; dropping them keeps specs minimal and comparable.
      axes_t = tuple(a for a in axes_t if mesh.shape[a] > 1)
    if used.intersection(axes_t):
      log.debug("%s dim %d (%s): mesh axes %s already used by another dim; replicated",
                name, dim, logical, axes_t)
      axes_t = ()
    if mesh is not None and shape is not None and axes_t:
      size = math.prod(mesh.shape[a] for a in axes_t)
      if shape[dim] % size:
        log.debug("%s dim %d (%s) of size %d is not divisible by mesh axes %s (size %d); "
                  "replicated", name, dim, logical, shape[dim], axes_t, size)
        axes_t = ()
    used.update(axes_t)
    spec.append(None if not axes_t else axes_t[0] if len(axes_t) == 1 else axes_t)
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)
