"""Device meshes and logical-axis sharding rules.

Library code names logical axes ("batch", "embed", "mlp", "heads", "kv_heads",
"head_dim", "vocab"); a rule table maps each to a mesh axis ("data", "fsdp",
"tensor"), a tuple of mesh axes, or None (replicated). A dimension whose size
does not divide by its mesh axes is replicated instead, so one rule table
serves every model size.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Training: batch over data x fsdp, weights over fsdp (ZeRO-3 style) and tensor.
DEFAULT_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "vocab": "tensor",
}


def make_mesh(shape: Mapping[str, int] | Sequence[int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes ("data", "fsdp", "tensor").

  Args:
    shape: sizes per axis, as a dict or a 3-sequence; at most one -1, which
      takes the devices left over. None puts every device on "data".
    devices: defaults to `jax.devices()`.

  Raises:
    ValueError: when the sizes do not multiply to the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if shape is None:
    sizes = [-1, 1, 1]
  elif isinstance(shape, Mapping):
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
      raise ValueError(f"Unknown mesh axes {sorted(unknown)}; the axes are "
                       f"{MESH_AXES}.")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  else:
    sizes = [int(s) for s in shape]
    if len(sizes) != len(MESH_AXES):
      raise ValueError(f"Mesh shape {tuple(sizes)} needs one size per axis "
                       f"{MESH_AXES}.")
  if sizes.count(-1) > 1:
    raise ValueError(f"Mesh shape {sizes}: at most one axis may be -1.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n % known:
      raise ValueError(f"Mesh shape {sizes} does not divide {n} devices.")
    sizes[sizes.index(-1)] = n // known
  if math.prod(sizes) != n:
    raise ValueError(
        f"Mesh shape {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
        f"devices but {n} are available; set one axis to -1 to fill.")
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(logical: Sequence[str | None] | None, shape: Sequence[int],
                    mesh: Mesh, rules: Mapping[str, Any] = DEFAULT_RULES) -> P:
  """The PartitionSpec for an array with the given logical axis names.

  A dimension maps to its rule's mesh axes unless its size is not divisible
  by them, or a mesh axis was already used by an earlier dimension; then it is
  replicated.
  """
  if logical is None:
    return P()
  if len(logical) != len(shape):
    raise ValueError(f"Logical axes {tuple(logical)} do not match shape "
                     f"{tuple(shape)}.")
  used: set[str] = set()
  spec = []
  for name, size in zip(logical, shape):
    axes = rules.get(name) if name is not None else None
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    names = tuple(a for a in names if mesh.shape.get(a, 1) > 1)
    if (not names or any(a in used for a in names)
        or size % _axis_size(mesh, names)):
      spec.append(None)
      continue
    used.update(names)
    spec.append(names[0] if len(names) == 1 else names)
  return P(*spec)


def tree_shardings(logical_tree, shape_tree, mesh: Mesh,
                   rules: Mapping[str, Any] = DEFAULT_RULES):
  """NamedShardings for a pytree, given matching logical-axis and shape trees.

  Args:
    logical_tree: pytree whose leaves, in order, are tuples of logical axis
      names (or None), one per array leaf of `shape_tree`.
    shape_tree: pytree of arrays or ShapeDtypeStructs.
    mesh: the device mesh.
    rules: logical -> mesh axis rules.
  """
  shapes, treedef = jax.tree.flatten(shape_tree)
  logical = jax.tree.leaves(
      logical_tree, is_leaf=lambda x: x is None or isinstance(x, tuple))
  if len(logical) != len(shapes):
    raise ValueError(f"{len(logical)} logical-axis entries for "
                     f"{len(shapes)} arrays.")
  return jax.tree.unflatten(treedef, [
      NamedSharding(mesh, logical_to_spec(l, s.shape, mesh, rules))
      for l, s in zip(logical, shapes)])


def batch_sharding(mesh: Mesh, ndim: int,
                   rules: Mapping[str, Any] = DEFAULT_RULES) -> NamedSharding:
  """Shards the leading (batch) axis of an ndim array over the batch axes."""
  axes = rules.get("batch")
  names = (axes,) if isinstance(axes, str) else tuple(axes or ())
  lead = names[0] if len(names) == 1 else (names or None)
  return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_size_multiple(mesh: Mesh,
                        rules: Mapping[str, Any] = DEFAULT_RULES) -> int:
  """How many ways the batch axis is split: batch sizes must divide by it."""
  return _axis_size(mesh, rules.get("batch"))
