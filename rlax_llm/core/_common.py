"""Shared checks and helpers of the loss modules (not public API)."""

from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp

from rlax_llm.core import aggregation as agg

Metrics = dict[str, jax.Array]


def _check_static(name: str, value, *, greater_than: float) -> None:
  """Validates hyper-parameters given as Python numbers (traced ones pass)."""
  if isinstance(value, (int, float)) and not value > greater_than:
    raise ValueError(f"{name} must be > {greater_than}, got {value}.")


def _broadcast_adv(adv: jax.typing.ArrayLike, shape_NT) -> jax.Array:
  """Takes [N] (per sequence) or [N, T] (per token) advantages to [N, T]."""
  adv = jnp.asarray(adv)
  if adv.ndim == 1:
    chex.assert_shape(adv, shape_NT[:1])
    adv = adv[:, None]
  else:
    chex.assert_shape(adv, shape_NT)
  return jnp.broadcast_to(adv, shape_NT)


def _masked_extremum(x_NT: jax.Array, valid_NT: jax.Array,
                     reduce: Callable[..., jax.Array],
                     fill: float) -> jax.Array:
  """Masked max/min of ``x_NT``; 0 when nothing is valid."""
  value = reduce(jnp.where(valid_NT, x_NT, fill))
  return jnp.where(jnp.any(valid_NT), value, 0)


def _prepare_logp(logp_NT, mask_NT, *others):
  """float32 ``logp_NT`` (0 where masked), bool mask, stop-gradient others.

  Zeroing masked log-probs first keeps NaN / inf padding out of every later
  expression, including ``logp - stop_gradient(logp)`` tricks.
  """
  logp_NT = jnp.asarray(logp_NT, jnp.float32)
  valid_NT = agg.as_bool_mask(mask_NT)
  chex.assert_rank(logp_NT, 2)
  chex.assert_equal_shape([logp_NT, valid_NT])
  out = [jnp.where(valid_NT, logp_NT, 0), valid_NT]
  for other_NT in others:
    other_NT = jax.lax.stop_gradient(jnp.asarray(other_NT, jnp.float32))
    chex.assert_equal_shape([logp_NT, other_NT])
    out.append(jnp.where(valid_NT, other_NT, 0))
  return out


def _prepare_adv(adv, valid_NT):
  """[N] or [N, T] advantages -> stop-gradient float32 [N, T], 0 if masked."""
  adv_NT = jax.lax.stop_gradient(
      _broadcast_adv(adv, valid_NT.shape).astype(jnp.float32))
  return jnp.where(valid_NT, adv_NT, 0)


def _seq_mask(valid_NT: jax.Array) -> jax.Array:
  """[N] bool: the row has at least one valid token."""
  return jnp.any(valid_NT, axis=-1)

