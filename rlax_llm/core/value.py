"""Critic objectives for actor-critic methods (PPO with a value head).

The critic V(s_t) predicts the return from each completion token; its targets
are the lambda-returns of :func:`advantages.gae_advantages`. Values, old
values and returns are per-token [N, T] arrays with an explicit mask, and the
loss aggregates with the same global normalisers as the policy losses, so it
is exact under micro-batching and sharding.
"""

from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp

from rlax_llm.core import aggregation as agg

__all__ = ["explained_variance", "value_loss", "whiten"]


def value_loss(
    value_NT: jax.typing.ArrayLike,
    old_value_NT: jax.typing.ArrayLike,
    return_NT: jax.typing.ArrayLike,
    mask_NT: jax.typing.ArrayLike,
    *,
    clip: Optional[float] = 0.2,
    aggregation: str = "token_mean",
    num_tokens: Optional[jax.typing.ArrayLike] = None,
    num_seqs: Optional[jax.typing.ArrayLike] = None,
    norm_constant: Optional[jax.typing.ArrayLike] = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Clipped squared-error value loss.

    V_clip = V_old + clip(V - V_old, -clip, clip)
    L      = aggregate( 0.5 * max((V - R)^2, (V_clip - R)^2) )

  (unclipped ``0.5 (V - R)^2`` with ``clip=None``). The value clip of PPO's
  reference implementation ("Proximal Policy Optimization Algorithms",
  arXiv:1707.06347; "Implementation Matters in Deep Policy Gradients",
  arXiv:2005.12729); the same form as verl's ``compute_value_loss`` and TRL's
  PPO trainer (both take the max of the clipped and unclipped errors). verl
  averages with its ``loss_agg_mode``; TRL with a plain masked mean, which is
  ``aggregation="token_mean"`` here.

  Metrics: ``value_loss``; ``value_clip_frac`` (tokens where the clipped
  error is the larger); ``value_mean``; ``return_mean``.

  Args:
    value_NT: [N, T] current critic predictions (gradient flows here).
    old_value_NT: [N, T] predictions at rollout time (data).
    return_NT: [N, T] value targets (data).
    mask_NT: [N, T] validity mask.
    clip: clip range around the old values; None disables the clip.
    aggregation: mode of :func:`aggregation.aggregate`.
    num_tokens: global token count for micro-batching.
    num_seqs: global sequence count for micro-batching.
    norm_constant: divisor of ``"seq_mean_token_sum_norm"``.

  Returns:
    ``(loss, metrics)``.
  """
  value_NT = jnp.asarray(value_NT, jnp.float32)
  old_value_NT = jax.lax.stop_gradient(jnp.asarray(old_value_NT, jnp.float32))
  return_NT = jax.lax.stop_gradient(jnp.asarray(return_NT, jnp.float32))
  valid = agg.as_bool_mask(mask_NT)
  chex.assert_equal_shape([value_NT, old_value_NT, return_NT, valid])
  if clip is not None and not clip > 0:
    raise ValueError(f"clip must be > 0 or None, got {clip}.")
  value_NT = jnp.where(valid, value_NT, 0.0)
  old_value_NT = jnp.where(valid, old_value_NT, 0.0)
  return_NT = jnp.where(valid, return_NT, 0.0)
  err = jnp.square(value_NT - return_NT)
  if clip is None:
    per_token = 0.5 * err
    clipped = jnp.zeros_like(valid)
  else:
    v_clip = old_value_NT + jnp.clip(value_NT - old_value_NT, -clip, clip)
    err_clip = jnp.square(v_clip - return_NT)
    per_token = 0.5 * jnp.maximum(err, err_clip)
    clipped = err_clip > err
  loss = agg.aggregate(per_token, valid, aggregation, num_tokens=num_tokens,
                       num_seqs=num_seqs, norm_constant=norm_constant)
  mean = lambda x: jax.lax.stop_gradient(agg.masked_mean(x, valid))
  return loss, {"value_loss": jax.lax.stop_gradient(loss),
                "value_clip_frac": mean(clipped),
                "value_mean": mean(value_NT),
                "return_mean": mean(return_NT)}


def whiten(x_NT: jax.typing.ArrayLike, mask_NT: jax.typing.ArrayLike, *,
           shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
  """(x - mean) / (std + eps) over the valid tokens of the whole batch.

  Population statistics over valid entries; masked entries come out 0. With
  ``shift_mean=False`` only the scale changes. PPO's advantage normalisation
  (as in verl's ``masked_whiten`` and TRL's ``whiten``, which use the same
  masked statistics; TRL applies Bessel's correction to the variance, verl
  does not, and neither does this function).

  Args:
    x_NT: [N, T] values (e.g. GAE advantages).
    mask_NT: [N, T] validity mask.
    shift_mean: subtract the mean (else keep it).
    eps: added to the std.

  Returns:
    [N, T] float32.
  """
  x_NT = jnp.asarray(x_NT, jnp.float32)
  valid = agg.as_bool_mask(mask_NT)
  chex.assert_equal_shape([x_NT, valid])
  mean = agg.masked_mean(x_NT, valid)
  var = agg.masked_mean(jnp.square(x_NT - mean), valid)
  out = (x_NT - mean) / (jnp.sqrt(var) + eps)
  if not shift_mean:
    out = out + mean
  return jnp.where(valid, out, 0.0)


def explained_variance(value_NT: jax.typing.ArrayLike,
                       return_NT: jax.typing.ArrayLike,
                       mask_NT: jax.typing.ArrayLike) -> jax.Array:
  """1 - Var[R - V] / Var[R] over valid tokens (0 when Var[R] = 0)."""
  value_NT = jnp.asarray(value_NT, jnp.float32)
  return_NT = jnp.asarray(return_NT, jnp.float32)
  valid = agg.as_bool_mask(mask_NT)
  def var(x):
    m = agg.masked_mean(x, valid)
    return agg.masked_mean(jnp.square(x - m), valid)
  vr = var(return_NT)
  return jnp.where(vr > 0, 1.0 - var(return_NT - value_NT)
                   / jnp.where(vr > 0, vr, 1.0), 0.0)
