"""Token log-probabilities and entropies from logits, always in float32.

Logits may come in bfloat16 from the model; they are upcast to float32 before
the temperature division and the log-softmax, so the log-probs used in
importance ratios do not carry bfloat16 rounding (~1e-2) in their difference.

The sampling temperature must match the one used by the sampler: the policy
that generated a token at temperature tau is ``softmax(logits / tau)``.
Logits of ``-inf`` (e.g. a masked vocabulary) are allowed.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

__all__ = [
    "LogprobsAndEntropy",
    "entropy_from_logits",
    "token_logprobs",
    "token_logprobs_and_entropy",
]


class LogprobsAndEntropy(NamedTuple):
  """Output of :func:`token_logprobs_and_entropy`.

  Attributes:
    logp: [N, T] float32 log-prob of each target token.
    entropy: [N, T] float32 entropy of each next-token distribution.
  """

  logp: jax.Array
  entropy: jax.Array


def _scaled_log_softmax(logits_NTV: jax.typing.ArrayLike,
                        temperature: float) -> jax.Array:
  """log_softmax(logits / temperature) over the last axis, in float32."""
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  logits_NTV = jnp.asarray(logits_NTV)
  chex.assert_rank(logits_NTV, 3)
  z_NTV = logits_NTV.astype(jnp.float32) / jnp.asarray(temperature,
                                                        jnp.float32)
  return jax.nn.log_softmax(z_NTV, axis=-1)


def _gather(logp_NTV: jax.Array, targets_NT: jax.typing.ArrayLike) -> jax.Array:
  targets_NT = jnp.asarray(targets_NT)
  chex.assert_shape(targets_NT, logp_NTV.shape[:2])
  return jnp.take_along_axis(
      logp_NTV, targets_NT[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _entropy(logp_NTV: jax.Array) -> jax.Array:
  p_NTV = jnp.exp(logp_NTV)
  # 0 * log 0 = 0; the inner `where` keeps -inf out of the gradient as well.
  finite_NTV = p_NTV > 0
  safe_logp_NTV = jnp.where(finite_NTV, logp_NTV, 0)
  return -jnp.sum(jnp.where(finite_NTV, p_NTV * safe_logp_NTV, 0), axis=-1)


def token_logprobs(
    logits_NTV: jax.typing.ArrayLike,
    targets_NT: jax.typing.ArrayLike,
    *,
    temperature: float = 1.0,
) -> jax.Array:
  """Log-probability of each target token under ``softmax(logits / tau)``.

    logp[n, t] = z[n, t, y] - log sum_v exp z[n, t, v],   z = logits / tau

  Args:
    logits_NTV: [N, T, V] next-token logits, any float dtype. Row ``t`` must
      be the distribution that ``targets_NT[:, t]`` was drawn from (i.e. the
      caller has already shifted logits/targets by one).
    targets_NT: [N, T] integer token ids in ``[0, V)`` (padding positions
      need a valid id too; mask them downstream).
    temperature: sampling temperature tau > 0.

  Returns:
    [N, T] float32 log-probs (<= 0).
  """
  return _gather(_scaled_log_softmax(logits_NTV, temperature), targets_NT)


def entropy_from_logits(
    logits_NTV: jax.typing.ArrayLike,
    *,
    temperature: float = 1.0,
) -> jax.Array:
  """Entropy of each next-token distribution ``softmax(logits / tau)``.

    H[n, t] = -sum_v p[n, t, v] log p[n, t, v],   p = softmax(logits / tau)

  Args:
    logits_NTV: [N, T, V] next-token logits, any float dtype.
    temperature: sampling temperature tau > 0.

  Returns:
    [N, T] float32 entropies in nats, in ``[0, log V]``.
  """
  return _entropy(_scaled_log_softmax(logits_NTV, temperature))


def token_logprobs_and_entropy(
    logits_NTV: jax.typing.ArrayLike,
    targets_NT: jax.typing.ArrayLike,
    *,
    temperature: float = 1.0,
) -> LogprobsAndEntropy:
  """Target log-probs and entropies sharing one float32 log-softmax.

  See :func:`token_logprobs` and :func:`entropy_from_logits` for the formulas.

  Args:
    logits_NTV: [N, T, V] next-token logits, any float dtype.
    targets_NT: [N, T] integer token ids in ``[0, V)``.
    temperature: sampling temperature tau > 0.

  Returns:
    :class:`LogprobsAndEntropy` of two [N, T] float32 arrays.
  """
  logp_NTV = _scaled_log_softmax(logits_NTV, temperature)
  return LogprobsAndEntropy(
      logp=_gather(logp_NTV, targets_NT), entropy=_entropy(logp_NTV))
