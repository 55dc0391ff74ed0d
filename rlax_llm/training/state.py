"""Train state: parameters, optimiser state, step and PRNG key, created sharded.

The state is created with `jax.eval_shape` -> shardings -> `jax.jit(init,
out_shardings=...)`, so each device only ever materialises its own shard of
the parameters and of the optimiser state (which is sharded like them).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rlax_llm.models.config import ModelConfig
from rlax_llm.models.transformer import Transformer, logical_axes
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
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(
      cfg, rngs=nnx.Rngs(0))))
  return graphdef


def init_params(cfg: ModelConfig, seed: int):
  """Parameter state of a freshly initialised `Transformer`."""
  return nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))[1]


def param_logical_axes(cfg: ModelConfig):
  """Logical-axis names of each parameter, as a tree like the param state."""
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  return logical_axes(nnx.split(model)[1])


def state_shardings(cfg: ModelConfig, optimizer: optax.GradientTransformation,
                    mesh: Mesh, rules=mesh_lib.DEFAULT_RULES,
                    seed: int = 0):
  """(abstract TrainState, TrainState of NamedShardings).

  Optimiser leaves with a parameter's shape take that parameter's sharding;
  the rest (counters, scalars) are replicated.
  """
  abstract = jax.eval_shape(lambda: _init(cfg, optimizer, seed))
  param_sh = mesh_lib.tree_shardings(param_logical_axes(cfg), abstract.params,
                                     mesh, rules)
  rep = mesh_lib.replicated(mesh)
  params_def = jax.tree.structure(abstract.params)

  def is_param_tree(x):
    return jax.tree.structure(x) == params_def

  # Moments (mu, nu, ...) mirror the parameter tree and take its shardings.
  opt_sh = jax.tree.map(lambda x: param_sh if is_param_tree(x) else rep,
                        abstract.opt_state, is_leaf=is_param_tree)
  shardings = TrainState(step=rep, params=param_sh, opt_state=opt_sh, rng=rep)
  return abstract, shardings


def _init(cfg, optimizer, seed):
  params = init_params(cfg, seed)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params),
                    rng=jax.random.key_data(jax.random.key(seed)))


def create_train_state(cfg: ModelConfig, optimizer: optax.GradientTransformation,
                       mesh: Mesh, *, seed: int,
                       rules=mesh_lib.DEFAULT_RULES) -> tuple[TrainState, Any]:
  """Initialises a TrainState directly into its shardings.

  Returns:
    (state, shardings), the shardings a TrainState of the same structure.
  """
  _, shardings = state_shardings(cfg, optimizer, mesh, rules, seed)
  init = jax.jit(lambda: _init(cfg, optimizer, seed), out_shardings=shardings)
  return init(), shardings


def reset_optimizer(state: TrainState, optimizer: optax.GradientTransformation,
                    shardings: TrainState) -> TrainState:
  """A state with step 0 and a fresh optimiser state (e.g. SFT -> RL)."""
  fresh = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(
      state.params)
  return state._replace(step=jnp.zeros((), jnp.int32), opt_state=fresh)


def step_rng(state: TrainState, *tags: int) -> jax.Array:
  """A key for this step (and optional sub-tags), from the state's base key."""
  key = jax.random.wrap_key_data(state.rng)
  key = jax.random.fold_in(key, state.step)
  for tag in tags:
    key = jax.random.fold_in(key, tag)
  return key

