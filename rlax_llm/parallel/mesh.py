"""Device meshes and logical-axis sharding rules.

Library code names logical axes; a rule table maps each to a mesh axis
("data", "fsdp", "tensor"), a tuple of mesh axes, or None (replicated).

Parameter axes: "embed", "mlp", "heads", "kv_heads", "head_dim", "vocab".
Activation axes: "batch", "length", "act_embed", "act_mlp", "act_heads",
"act_kv_heads", "act_vocab".

Two rule sets ship: `TRAIN_RULES` shards weights over fsdp (ZeRO-3 style) and
tensor and splits the batch over data x fsdp; `SAMPLE_RULES` keeps weights
tensor-sharded but gathers them over fsdp once per rollout, so the
token-by-token decode loop does not all-gather every weight at every token.

A dimension whose size does not divide by its mesh axes is replicated instead,
so one rule table serves every model size; `unsharded_leaves` finds the large
arrays that ended up whole on a device anyway.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Training: batch over data x fsdp, weights over fsdp and tensor.
TRAIN_RULES: dict[str, Any] = {
    # Parameters.
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "vocab": "tensor",
    # Activations.
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    "act_mlp": "tensor",
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_vocab": "tensor",
}

# Sampling: weights stay tensor-sharded but are whole along "embed" (no fsdp),
# the rollout batch is still split over data x fsdp.
SAMPLE_RULES: dict[str, Any] = dict(TRAIN_RULES, embed=None)

DEFAULT_RULES = TRAIN_RULES
RULE_SETS = {"train": TRAIN_RULES, "sample": SAMPLE_RULES}


def get_rules(kind: str = "train",
              overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """A copy of the "train" or "sample" rule set with `overrides` applied.

  Args:
    kind: "train" or "sample".
    overrides: logical axis -> mesh axis, tuple of mesh axes or None.

  Raises:
    ValueError: for an unknown kind, or a rule naming an unknown mesh axis.
  """
  if kind not in RULE_SETS:
    raise ValueError(f"Unknown rule set {kind!r}; choose one of "
                     f"{sorted(RULE_SETS)}.")
  rules = dict(RULE_SETS[kind])
  rules.update(dict(overrides or {}))
  check_rules(rules)
  return rules


def _names(axes) -> tuple[str, ...]:
  if axes is None:
    return ()
  if isinstance(axes, str):
    return (axes,)
  return tuple(axes)


def check_rules(rules: Mapping[str, Any]) -> None:
  """Raises ValueError if a rule maps to something other than mesh axes."""
  for logical, axes in rules.items():
    if axes is not None and not isinstance(axes, (str, tuple, list)):
      raise ValueError(f"Rule {logical!r}: {axes!r} is not a mesh axis, a "
                       "tuple of mesh axes or None.")
    bad = [a for a in _names(axes) if a not in MESH_AXES]
    if bad:
      raise ValueError(f"Rule {logical!r} -> {axes!r} names unknown mesh "
                       f"axes {bad}; the mesh axes are {MESH_AXES}.")


def _given_sizes(shape) -> list[int]:
  """The sizes per axis as given (-1 still unresolved), checked."""
  if shape is None:
    sizes = [-1, 1, 1]
  elif hasattr(shape, "items"):  # dict or ConfigDict
    items = dict(shape.items())
    unknown = set(items) - set(MESH_AXES)
    if unknown:
      raise ValueError(f"Unknown mesh axes {sorted(unknown)}; the axes are "
                       f"{MESH_AXES}.")
    sizes = [int(items.get(a, 1)) for a in MESH_AXES]
  else:
    sizes = [int(s) for s in shape]
    if len(sizes) != len(MESH_AXES):
      raise ValueError(f"Mesh shape {tuple(sizes)} needs one size per axis "
                       f"{MESH_AXES}.")
  return sizes


def _mesh_sizes(shape, n: int) -> list[int]:
  sizes = _given_sizes(shape)
  named = dict(zip(MESH_AXES, sizes))
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"Mesh shape {named}: sizes must be positive, or -1 for "
                     "the axis that takes the remaining devices.")
  if sizes.count(-1) > 1:
    raise ValueError(f"Mesh shape {named}: at most one axis may be -1.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n % known:
      raise ValueError(
          f"Mesh shape {named} does not divide the {n} devices: the fixed "
          f"axes need a multiple of {known}. Choose sizes whose product "
          f"divides {n}.")
    sizes[sizes.index(-1)] = n // known
  if math.prod(sizes) != n:
    raise ValueError(
        f"Mesh shape {named} needs {math.prod(sizes)} devices but {n} are "
        "available; make the sizes multiply to the device count or set one "
        "axis to -1 to fill.")
  return sizes


def make_mesh(shape: Mapping[str, int] | Sequence[int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes ("data", "fsdp", "tensor").

  Devices are laid out process by process along the leading axes, so each
  process owns a contiguous block of the batch (see
  `distributed.process_batch_slice`). On TPU the physical topology decides
  the order within that layout.

  Args:
    shape: sizes per axis, as a dict (or ConfigDict) or a 3-sequence; at most
      one -1, which takes the devices left over. None puts every device on
      "data".
    devices: defaults to `jax.devices()` (every process's devices).

  Raises:
    ValueError: when the sizes do not multiply to the number of devices.
  """
  all_devices = devices is None
  devices = list(jax.devices() if devices is None else devices)
  sizes = _mesh_sizes(shape, len(devices))
  grid = None
  if all_devices and devices[0].platform == "tpu":
    try:
      grid = mesh_utils.create_device_mesh(sizes, devices)
    except (ValueError, NotImplementedError, AssertionError):
      grid = None  # a shape the topology helper cannot lay out
  if grid is None:
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    grid = np.asarray(devices, dtype=object).reshape(sizes)
  return Mesh(grid, MESH_AXES)


HOST_LAYOUTS = ("auto", "shared", "split")


def choose_layout(layout: str, shape=None, *, cpu: bool, processes: int,
                  devices: int) -> str:
  """The host layout ("shared" or "split") that `layout` means for a run.

  "auto" is "split" for one process whose devices are all CPU devices, more
  than one of them (one per core: `distributed.host_devices=-1`), with a
  data-only mesh (`shape` None, or fsdp and tensor 1); anything else (an
  accelerator, several processes, one device, fsdp or tensor sharding) is
  "shared". "shared" and "split" are themselves.

  Args:
    layout: "auto", "shared" or "split".
    shape: the update mesh's sizes as given to `make_mesh`.
    cpu: whether every device is a CPU device.
    processes: the run's process count.
    devices: this process's device count.

  Raises:
    ValueError: for an unknown layout or mesh shape.
  """
  if layout not in HOST_LAYOUTS:
    raise ValueError(f"host layout {layout!r} is not one of {HOST_LAYOUTS}.")
  if layout != "auto":
    return layout
  sizes = dict(zip(MESH_AXES, _given_sizes(shape)))
  data_only = sizes["fsdp"] == 1 and sizes["tensor"] == 1
  return ("split" if cpu and processes == 1 and devices > 1 and data_only
          else "shared")


def layout_meshes(shape: Mapping[str, int] | Sequence[int] | None = None,
                  layout: str = "shared",
                  devices: Sequence[jax.Device] | None = None
                  ) -> tuple[Mesh, Mesh]:
  """The (update mesh, rollout mesh) of a host layout.

  "shared": both are `make_mesh(shape, devices)`. "split": the updates (and
  every other training computation) run on the first device alone, and
  rollouts and evaluation on a "data" mesh over every device. On a CPU host
  split into one device per core (`distributed.host_devices=-1`) that runs
  decoding data-parallel over the cores, while the update's large matmuls
  use every core as one device's threads and its scratch memory can be
  reused between calls (`distributed.reuse_host_memory`); the GRPO bench's
  step is faster that way than with either layout on one mesh.

  Args:
    shape: the update mesh's sizes (`make_mesh`); "split" needs every axis to
      be 1 or -1 (one device).
    layout: "shared", "split" or "auto" (`choose_layout` on `devices`).
    devices: defaults to `jax.devices()`; "split" needs them all in this
      process.

  Raises:
    ValueError: for an unknown layout, a "split" mesh shape over more than
      one device, or a "split" run of several processes.
  """
  given = devices
  devices = list(jax.devices() if devices is None else devices)
  layout = choose_layout(
      layout, shape, cpu=all(d.platform == "cpu" for d in devices),
      processes=len({d.process_index for d in devices}),
      devices=len(devices))
  if layout == "shared":
    # `make_mesh` with no devices given lays a TPU slice out by topology.
    mesh = make_mesh(shape, given)
    return mesh, mesh
  if any(d.process_index != jax.process_index() for d in devices):
    raise ValueError(
        "distributed.host_layout='split' runs the updates on one device of "
        "one process, and this run spans several processes; use "
        "host_layout='shared' for multi-process runs.")
  try:
    update = make_mesh(shape, devices[:1])
  except ValueError as e:
    named = dict(shape.items()) if hasattr(shape, "items") else shape
    raise ValueError(
        f"distributed.host_layout='split' runs the updates on one device, "
        f"and the mesh {named} asks for more; set every mesh axis to 1 (or "
        "-1), or use host_layout='shared'.") from e
  return update, make_mesh({"data": len(devices)}, devices)


def onto_mesh(tree, mesh: Mesh | None):
  """`tree` with every array that is not on exactly `mesh`'s devices put
  there whole (replicated); arrays already there keep their sharding. With
  no mesh (None), `tree` itself.

  Rollouts of the "split" layout (`layout_meshes`) take the parameters from
  the update's device to the rollout mesh this way.
  """
  if mesh is None:
    return tree
  devices = set(mesh.devices.flat)
  target = replicated(mesh)

  def put(x):
    if isinstance(x, jax.Array) and x.sharding.device_set == devices:
      return x
    return jax.device_put(x, target)
  return jax.tree.map(put, tree)


def _axis_size(mesh: Mesh, axes) -> int:
  return math.prod(mesh.shape[a] for a in _names(axes))


def logical_to_spec(logical: Sequence[str | None] | None, shape: Sequence[int],
                    mesh: Mesh, rules: Mapping[str, Any] = DEFAULT_RULES) -> P:
  """The PartitionSpec for an array with the given logical axis names.

  A dimension maps to its rule's mesh axes unless its size is not divisible
  by them, or a mesh axis was already used by an earlier dimension; then it is
  replicated. Mesh axes of size 1 are dropped.
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
    names = tuple(a for a in _names(axes) if mesh.shape.get(a, 1) > 1)
    if (not names or any(a in used for a in names)
        or size % _axis_size(mesh, names)):
      spec.append(None)
      continue
    used.update(names)
    spec.append(names[0] if len(names) == 1 else names)
  return P(*spec)


def logical_sharding(logical: Sequence[str | None] | None,
                     shape: Sequence[int], mesh: Mesh,
                     rules: Mapping[str, Any] = DEFAULT_RULES) -> NamedSharding:
  """`logical_to_spec` wrapped in a NamedSharding on `mesh`."""
  return NamedSharding(mesh, logical_to_spec(logical, shape, mesh, rules))


def logical_constraint(x: jax.Array, logical: Sequence[str | None],
                       mesh: Mesh,
                       rules: Mapping[str, Any] = DEFAULT_RULES) -> jax.Array:
  """Constrains an activation's sharding inside jit by its logical axes.

  Example: `logical_constraint(h_NTD, ("batch", "length", "act_embed"), mesh)`.
  """
  return jax.lax.with_sharding_constraint(
      x, logical_sharding(logical, x.shape, mesh, rules))


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
      logical_sharding(l, s.shape, mesh, rules)
      for l, s in zip(logical, shapes)])


def batch_axes(rules: Mapping[str, Any] = DEFAULT_RULES) -> tuple[str, ...]:
  """The mesh axes the leading batch dimension is split over."""
  return _names(rules.get("batch"))


def batch_sharding(mesh: Mesh, ndim: int,
                   rules: Mapping[str, Any] = DEFAULT_RULES) -> NamedSharding:
  """Shards the leading (batch) axis of an ndim array over the batch axes."""
  if ndim < 1:
    return NamedSharding(mesh, P())
  names = batch_axes(rules)
  lead = names[0] if len(names) == 1 else (names or None)
  return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  """A sharding that holds the whole array on every device of `mesh`."""
  return NamedSharding(mesh, P())


def batch_size_multiple(mesh: Mesh,
                        rules: Mapping[str, Any] = DEFAULT_RULES) -> int:
  """How many ways the batch axis is split: batch sizes must divide by it."""
  return _axis_size(mesh, rules.get("batch"))


def unsharded_leaves(tree, *, min_size: int = 1 << 16) -> list[str]:
  """Large arrays of `tree` that some device holds in full.

  Args:
    tree: pytree of jax.Arrays or ShapeDtypeStructs carrying a `.sharding`.
    min_size: arrays with fewer elements are ignored (norm scales, counters).

  Returns:
    "path shape spec" strings, one per array of at least `min_size` elements
    whose per-device shard is the whole array although its sharding spans
    more than one device. Empty when every large array is split.
  """
  out = []
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    sharding = getattr(x, "sharding", None)
    if sharding is None or math.prod(x.shape) < min_size:
      continue
    if len(sharding.device_set) < 2:
      continue
    if tuple(sharding.shard_shape(x.shape)) == tuple(x.shape):
      spec = getattr(sharding, "spec", sharding)
      out.append(f"{jax.tree_util.keystr(path)} {tuple(x.shape)} {spec}")
  return out
