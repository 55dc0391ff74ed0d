"""Low-rank adapters (LoRA, arXiv:2106.09685): split, merge, zero, label.

A `Transformer` whose config has `lora_rank` r > 0 holds, beside each
targeted base weight `<t>_proj` W, the adapter matrices `<t>_lora_a` A
[in..., r] and `<t>_lora_b` B [r, out...] (`transformer.LoRAParam`), and
computes y = x W + (alpha / r) (x A) B. The functions here act on its
parameter state, an `nnx.State` or the nested dict of its arrays
(`nnx.to_pure_dict(state)`):

  * `split_lora(params) -> (base, adapters)`: the base state is exactly the
    state of a `lora_rank=0` model (`base_config(cfg)`).
  * `merge_lora(params, cfg)`: the state of a `lora_rank=0` model with
    W + (alpha / r) A B folded into each targeted weight (export, serving).
  * `zero_adapters(params)`: B set to zero, the adapters switched off: the
    model then gives exactly the base model's logits (a free KL reference).
  * `lora_labels(params)`: "lora" / "frozen" per leaf, the labels of
    `optax.multi_transform` (`training.state.lora_optimizer` uses them).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from rlax_llm.models.config import ModelConfig

__all__ = ["ADAPTER", "FROZEN", "adapter_mask", "base_config",
           "num_adapter_params",
           "fold_adapter", "is_adapter_name", "lora_labels", "merge_lora",
           "split_lora", "zero_adapters"]

ADAPTER = "lora"
FROZEN = "frozen"
_NAME = re.compile(r"^(?P<target>[a-z]+)_lora_(?P<which>[ab])$")


def is_adapter_name(name) -> bool:
  """Whether a parameter name is an adapter's (`q_lora_a`, `down_lora_b`)."""
  return isinstance(name, str) and _NAME.match(name) is not None


def _path_names(path) -> list:
  return [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))
          for k in path]


def _on_adapter(path) -> str | None:
  """"a" or "b" when a pytree key path runs through an adapter, else None."""
  for name in _path_names(path):
    if is_adapter_name(name):
      return _NAME.match(name).group("which")
  return None


def base_config(cfg: ModelConfig) -> ModelConfig:
  """`cfg` without adapters (lora_rank 0): the model `merge_lora` returns."""
  return dataclasses.replace(cfg, lora_rank=0)


def lora_labels(params):
  """`ADAPTER` for every adapter leaf of `params`, `FROZEN` for the rest.

  A tree of strings shaped like `params`, for `optax.multi_transform`.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, _: ADAPTER if _on_adapter(path) else FROZEN, params)


def adapter_mask(params):
  """True for every adapter leaf of `params`, False for the base weights."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: _on_adapter(path) is not None, params)


def zero_adapters(params):
  """`params` with every adapter B set to zero (A kept).

  The model then computes exactly its base model: (x A) B = 0 is added to
  x W, so the logits equal bit for bit those of `split_lora(params)[0]` in a
  `lora_rank=0` model. Inside a jitted step this costs no memory beyond the
  zeros, and the same compiled model scores the policy and the reference.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if _on_adapter(path) == "b" else x,
      params)


def _partition(tree, keep_adapters: bool):
  """The sub-tree of adapter (or of base) leaves of a nested mapping."""
  if isinstance(tree, nnx.State):
    flat = [(p, v) for p, v in nnx.to_flat_state(tree)
            if any(is_adapter_name(k) for k in p) == keep_adapters]
    return nnx.from_flat_state(flat)
  out = {}
  for k, v in tree.items():
    if is_adapter_name(k):
      if keep_adapters:
        out[k] = v
    elif isinstance(v, Mapping):
      sub = _partition(v, keep_adapters)
      if sub or not keep_adapters:
        out[k] = sub
    elif not keep_adapters:
      out[k] = v
  return out


def split_lora(params) -> tuple[Any, Any]:
  """(base, adapters): the parameters without adapters, and the adapters.

  Args:
    params: the parameter state of a `Transformer` (an `nnx.State`, or the
      nested dict of its arrays).

  Returns:
    base: the same kind of tree without the adapters: exactly the state of a
      `Transformer(base_config(cfg))`, e.g. to score the reference policy
      with `nnx.merge(base_graphdef, base)` (no adapter compute at all).
    adapters: the adapters alone, keyed by the same paths.
  """
  return _partition(params, False), _partition(params, True)


def fold_adapter(w, a, b, scale: float, xp=jnp):
  """W + scale * A B in W's dtype, the product and sum taken in f32.

  Args:
    w: the base weight [in..., out...].
    a: A [in..., r].
    b: B [r, out...].
    scale: alpha / r.
    xp: `jax.numpy` (device arrays) or `numpy` (host arrays).
  """
  f32 = xp.float32
  delta = xp.tensordot(xp.asarray(a).astype(f32), xp.asarray(b).astype(f32),
                       axes=1)
  if tuple(delta.shape) != tuple(w.shape):
    raise ValueError(f"Adapter A {tuple(a.shape)} B {tuple(b.shape)} gives a "
                     f"product of shape {tuple(delta.shape)}, but its weight "
                     f"is {tuple(w.shape)}; the adapters do not belong to "
                     "this weight.")
  return (xp.asarray(w).astype(f32) + f32(scale) * delta).astype(w.dtype)


def _value(x):
  return x.get_value() if isinstance(x, nnx.Variable) else x


def merge_lora(params, cfg: ModelConfig):
  """The parameters of `base_config(cfg)` with the adapters folded in.

  Each targeted weight becomes W + (alpha / r) A B (computed in f32, stored
  in W's dtype), so the merged `lora_rank=0` model computes the adapter
  model's function up to that rounding.

  Args:
    params: the parameter state of a `Transformer(cfg)` (an `nnx.State`, or
      the nested dict of its arrays).
    cfg: its config, with `lora_rank` > 0.

  Returns:
    The same kind of tree, without adapters, for `base_config(cfg)`.

  Raises:
    ValueError: when `cfg` has no adapters, or an adapter lacks its weight or
      its other half.
  """
  if not cfg.lora_rank:
    raise ValueError("merge_lora needs a config with lora_rank > 0; a "
                     "lora_rank=0 model has no adapters to fold in (use its "
                     "params as they are).")
  base, adapters = split_lora(params)
  flat_a = dict(_flat(adapters))
  folded = {}
  for path, a in flat_a.items():
    m = _NAME.match(path[-1])
    if m.group("which") != "a":
      continue
    prefix, target = path[:-1], m.group("target")
    b = flat_a.get(prefix + (f"{target}_lora_b",))
    if b is None:
      raise ValueError(f"Adapter {'/'.join(map(str, path))} has no B "
                       f"({target}_lora_b) beside it.")
    folded[prefix + (f"{target}_proj",)] = (a, b)
  if len(flat_a) != 2 * len(folded):
    raise ValueError("Every adapter B needs its A (<target>_lora_a) beside "
                     "it; the adapter parameters are incomplete.")

  def fold(path, w):
    a, b = folded.pop(path)
    return fold_adapter(_value(w), _value(a), _value(b), cfg.lora_scale)

  if isinstance(base, nnx.State):
    flat = [(p, v.replace(fold(tuple(p), v)) if tuple(p) in folded else v)
            for p, v in nnx.to_flat_state(base)]
    out = nnx.from_flat_state(flat)
  else:
    out = _rebuild(base, (), lambda p, w: fold(p, w) if p in folded else w)
  if folded:
    raise ValueError(f"Adapters {sorted(map(str, folded))[:4]} have no base "
                     "weight <target>_proj beside them.")
  return out


def _flat(tree, prefix=()):
  """(path tuple, leaf) pairs of a nested mapping (Variables as leaves)."""
  if isinstance(tree, nnx.State):
    for p, v in nnx.to_flat_state(tree):
      yield prefix + tuple(p), v
    return
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _flat(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def _rebuild(tree, prefix, fn):
  return {k: (_rebuild(v, prefix + (k,), fn) if isinstance(v, Mapping)
              else fn(prefix + (k,), v)) for k, v in tree.items()}


def num_adapter_params(params) -> int:
  """How many adapter entries `params` holds (arrays or ShapeDtypeStructs)."""
  _, adapters = split_lora(params)
  return int(sum(np.prod(np.shape(_value(x)), dtype=np.int64)
                 for _, x in _flat(adapters)))
