"""Train state: parameters, optimiser state, step and PRNG key, created sharded.

The state is created abstractly (`abstract_model`, `jax.eval_shape`) ->
shardings -> jitted initialisers with those output shardings, so each device
only ever materialises its own shard of the parameters and of the optimiser
state (which is sharded like them). The model's abstract state and its
parameter initialiser (the seed's key an argument) are traced and compiled
once per config and layout in a process, so states for other seeds or
optimisers reuse them.

Rollouts may use another layout of the same parameters
(`param_shardings(cfg, mesh, mesh_lib.SAMPLE_RULES)`); `reshard` moves them.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rlax_llm.models import lora as lora_lib
from rlax_llm.models.config import ModelConfig
from rlax_llm.models.transformer import Transformer
from rlax_llm.models.transformer import abstract_model
from rlax_llm.models.transformer import logical_axes
from rlax_llm.parallel import mesh as mesh_lib


class TrainState(NamedTuple):
  """Everything an update step reads and writes.

  Attributes:
    step: int32 scalar, optimiser steps taken in the current phase's count.
    params: the model's parameter state (an `nnx.State`).
    opt_state: the optax state.
    rng: PRNG key; step-specific keys are `fold_in(rng, step)`.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def model_graphdef(cfg: ModelConfig) -> nnx.GraphDef:
  """The NNX graph of a `Transformer` with config `cfg` (no weights allocated)."""
  return abstract_model(cfg, copy=False)[0]


def init_params(cfg: ModelConfig, seed):
  """Parameter state of a freshly initialised `Transformer`.

  `seed`: an int, or the `jax.random.key_data` of a key (traced or not);
  the two give the same parameters for the same key.
  """
  return nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))[1]


def param_logical_axes(cfg: ModelConfig):
  """Logical-axis names of each parameter, as a tree like the param state."""
  return logical_axes(abstract_model(cfg, copy=False)[1])


def param_shardings(cfg: ModelConfig, mesh: Mesh,
                    rules=mesh_lib.DEFAULT_RULES):
  """NamedShardings of the parameter state under `rules`.

  Pass `mesh_lib.SAMPLE_RULES` for the layout rollouts use (weights whole
  along "embed", still split over "tensor").
  """
  _, abstract = abstract_model(cfg, copy=False)
  return mesh_lib.tree_shardings(param_logical_axes(cfg), abstract, mesh,
                                 rules)


def opt_state_shardings(optimizer: optax.GradientTransformation,
                        abstract_opt_state, abstract_params, param_sh,
                        mesh: Mesh):
  """Shardings of an optimiser state: moments take their parameter's sharding.

  Leaves that optax identifies as per-parameter (Adam's mu and nu, momentum
  traces, ...) and have their parameter's shape take its sharding; everything
  else (step counters, scalars, factored statistics) is replicated.
  """
  rep = mesh_lib.replicated(mesh)

  def like_param(leaf, param, sharding):
    same = getattr(leaf, "shape", None) == tuple(param.shape)
    return sharding if same else rep

  try:
    return optax.tree_map_params(optimizer, like_param, abstract_opt_state,
                                 abstract_params, param_sh,
                                 transform_non_params=lambda _: rep)
  except (ValueError, TypeError):
    # An optimiser whose init cannot be traced with placeholders (or whose
    # state holds `optax.MaskedNode`s, as `optax.masked` and
    # `lora_optimizer` make): match whole sub-trees with the parameters'
    # structure instead, a masked-out parameter matching any parameter.
    params_def = jax.tree.structure(param_sh)

    def masked(x):
      return isinstance(x, optax.MaskedNode)

    def is_param_tree(x):
      return jax.tree.structure(x, is_leaf=masked) == params_def

    def shardings_of(x):
      if not is_param_tree(x):
        return rep
      return jax.tree.map(lambda leaf, sh: leaf if masked(leaf) else sh, x,
                          param_sh, is_leaf=masked)

    return jax.tree.map(shardings_of, abstract_opt_state, is_leaf=is_param_tree)


def state_shardings(cfg: ModelConfig, optimizer: optax.GradientTransformation,
                    mesh: Mesh, rules=mesh_lib.DEFAULT_RULES,
                    seed: int = 0):
  """(abstract TrainState, TrainState of NamedShardings).

  Optimiser leaves that mirror a parameter take that parameter's sharding;
  the rest (counters, scalars) are replicated. Nothing is allocated.
  """
  # As jax.eval_shape(lambda: init_state(cfg, optimizer, seed)), with the
  # model's part traced once per config (`abstract_model`).
  _, params = abstract_model(cfg)
  abstract = TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
      opt_state=jax.eval_shape(optimizer.init, params),
      rng=jax.eval_shape(lambda: _key_data(seed)))
  param_sh = mesh_lib.tree_shardings(param_logical_axes(cfg), abstract.params,
                                     mesh, rules)
  rep = mesh_lib.replicated(mesh)
  opt_sh = opt_state_shardings(optimizer, abstract.opt_state, abstract.params,
                               param_sh, mesh)
  shardings = TrainState(step=rep, params=param_sh, opt_state=opt_sh, rng=rep)
  return abstract, shardings


def init_state(cfg: ModelConfig, optimizer: optax.GradientTransformation,
               seed: int) -> TrainState:
  """A fresh TrainState with no sharding of its own.

  Trace it under `jax.eval_shape` or a jit with output shardings (as
  `create_train_state` does) rather than calling it eagerly on a large model.
  """
  params = init_params(cfg, seed)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), rng=_key_data(seed))


def _key_data(seed: int) -> jax.Array:
  return jax.random.key_data(jax.random.key(seed))


def create_train_state(cfg: ModelConfig, optimizer: optax.GradientTransformation,
                       mesh: Mesh, *, seed: int,
                       rules=mesh_lib.DEFAULT_RULES) -> tuple[TrainState, Any]:
  """Initialises a TrainState directly into its shardings.

  Returns:
    (state, shardings), the shardings a TrainState of the same structure.
  """
  _, shardings = state_shardings(cfg, optimizer, mesh, rules, seed)
  # The values of `init_state(cfg, optimizer, seed)`, in two programs: the
  # parameters' (compiled once per config and layout, the seed's key an
  # argument), then the optimiser state's from them.
  key = _key_program(shardings.rng)(seed)
  params = _param_init_program(cfg, shardings.params)(key)
  step, opt_state = jax.jit(
      lambda p: (jnp.zeros((), jnp.int32), optimizer.init(p)),
      out_shardings=(shardings.step, shardings.opt_state))(params)
  return TrainState(step=step, params=params, opt_state=opt_state,
                    rng=key), shardings


def _param_init_program(cfg: ModelConfig, param_sh):
  """jit(key data -> `init_params(cfg, key)`) with outputs on `param_sh`."""
  leaves, treedef = jax.tree.flatten(param_sh)
  try:
    return _param_init_cached(cfg, treedef, tuple(leaves))
  except TypeError:  # unhashable config: a program of its own
    return jax.jit(functools.partial(init_params, cfg), out_shardings=param_sh)


@functools.lru_cache(maxsize=16)
def _key_program(sharding):
  return jax.jit(_key_data, static_argnums=0, out_shardings=sharding)


@functools.lru_cache(maxsize=16)
def _param_init_cached(cfg: ModelConfig, treedef, leaves):
  return jax.jit(functools.partial(init_params, cfg),
                 out_shardings=jax.tree.unflatten(treedef, leaves))


def reshard(tree, shardings):
  """`tree` moved onto `shardings` (e.g. training -> sampling layout).

  Runs as one jitted identity with output shardings, so XLA moves only the
  shards each device needs; the input stays valid.
  """
  return jax.jit(lambda x: x, out_shardings=shardings)(tree)


def reset_optimizer(state: TrainState, optimizer: optax.GradientTransformation,
                    shardings: TrainState) -> TrainState:
  """A state with step 0 and a fresh optimiser state (e.g. SFT -> RL).

  Both are created on `shardings`, so they are global arrays that every
  process of a multi-process run can checkpoint.
  """
  step, fresh = jax.jit(
      lambda p: (jnp.zeros((), jnp.int32), optimizer.init(p)),
      out_shardings=(shardings.step, shardings.opt_state))(state.params)
  return state._replace(step=step, opt_state=fresh)


def step_rng(state: TrainState, *tags: int) -> jax.Array:
  """A key for this step (and optional sub-tags), from the state's base key."""
  key = jax.random.wrap_key_data(state.rng)
  key = jax.random.fold_in(key, state.step)
  for tag in tags:
    key = jax.random.fold_in(key, tag)
  return key


def lora_optimizer(optimizer: optax.GradientTransformation,
                   cfg: ModelConfig) -> optax.GradientTransformation:
  """`optimizer` on the adapters only, when `cfg.lora_rank` > 0.

  `optax.multi_transform` runs `optimizer` on the leaves that
  `lora.lora_labels` marks as adapters and `optax.set_to_zero` on the base
  weights: the base weights get exactly zero updates (they stay bit for bit
  unchanged under `optax.apply_updates`), the optimiser state holds moments
  for the adapters only (`optax.MaskedNode` in place of every base weight),
  and a clipping or weight decay inside `optimizer` sees the adapters alone.
  With `cfg.lora_rank` 0 it returns `optimizer` itself.

  Wrap the optimiser once and use the result everywhere the optimiser is
  used: `state_shardings`, `create_train_state`, `reset_optimizer` and the
  update step.
  """
  if not cfg.lora_rank:
    return optimizer
  return optax.multi_transform(
      {lora_lib.ADAPTER: optimizer, lora_lib.FROZEN: optax.set_to_zero()},
      lora_lib.lora_labels)


def opt_state_bytes(opt_state) -> int:
  """Bytes of an optimiser state's arrays (or of its `jax.eval_shape`)."""
  return int(sum(x.size * jnp.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(opt_state) if hasattr(x, "dtype")))



class RefState(NamedTuple):
  """An RL-phase state with a frozen reference policy beside it.

  Attributes:
    train: the trained state (a `TrainState`, or `ppo.PPOState`).
    ref: the reference policy's parameters, sharded like the policy's; never
      updated by a step (`experiment` may reset it to the policy).
  """
  train: Any
  ref: Any
