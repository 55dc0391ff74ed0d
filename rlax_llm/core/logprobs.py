"""Token log-probabilities and entropies from logits, always in float32.

Logits may come in bfloat16 from the model; they are upcast to float32 before
the temperature division and the log-softmax, so the log-probs used in
importance ratios do not carry bfloat16 rounding (~1e-2) in their difference.

The sampling temperature must match the one used by the sampler: the policy
that generated a token at temperature tau is ``softmax(logits / tau)``.
Logits of ``-inf`` (e.g. a masked vocabulary) are allowed.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

__all__ = [
    "LogprobsAndEntropy",
    "chunked_token_logprobs_and_entropy",
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

  verl's ``entropy_from_logits`` computes the same quantity as
  ``logsumexp(z) - sum softmax(z) z``; here it comes from the log-softmax,
  which stays finite for logits of -inf (filtered tokens).

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


def _softcap(z, softcap):
  """softcap * tanh(z / softcap) (Gemma 2's final logit soft-capping)."""
  return z if softcap is None else softcap * jnp.tanh(z / softcap)


def _online_chunk_stats(hidden_KD: jax.Array, kernel_DV: jax.Array,
                        targets_K: jax.Array, temperature,
                        vocab_chunk: int, softcap=None
                        ) -> tuple[jax.Array, jax.Array]:
  """Target log-probs and entropies of K tokens, streaming over vocab blocks.

  A running max ``m``, running ``s = sum_v exp(z_v - m)`` and running
  ``w = sum_v exp(z_v - m) z_v`` give ``lse = m + log s`` and
  ``H = lse - w / s``. The last block is slid back to end at V (dynamic_slice
  clamps its start); columns an earlier block already counted are masked, so
  the kernel is never padded or copied.
  """
  k = hidden_KD.shape[0]
  vocab = kernel_DV.shape[1]
  block = min(vocab_chunk, vocab)
  num_blocks = -(-vocab // block)
  tau = jnp.asarray(temperature, jnp.float32)

  @jax.checkpoint
  def step(carry, i):
    m_K, s_K, w_K, z_target_K = carry
    start = i * block
    first = jnp.minimum(start, vocab - block)  # where dynamic_slice lands
    kernel_DB = jax.lax.dynamic_slice_in_dim(kernel_DV, first, block, axis=1)
    z_KB = _softcap(jnp.dot(hidden_KD, kernel_DB,
                            preferred_element_type=jnp.float32),
                    softcap) / tau
    valid_B = first + jnp.arange(block) >= start
    z_KB = jnp.where(valid_B, z_KB, 0.0)
    m_new_K = jnp.maximum(
        m_K, jnp.max(jnp.where(valid_B, z_KB, -jnp.inf), axis=-1))
    # The max only stabilises; it cancels from lse and H, so no gradient.
    m_new_K = jax.lax.stop_gradient(m_new_K)
    decay_K = jnp.exp(m_K - m_new_K)  # 0 on the first block (m = -inf)
    e_KB = jnp.where(valid_B, jnp.exp(z_KB - m_new_K[:, None]), 0.0)
    s_K = s_K * decay_K + jnp.sum(e_KB, axis=-1)
    w_K = w_K * decay_K + jnp.sum(e_KB * z_KB, axis=-1)
    in_block_K = (targets_K >= start) & (targets_K < start + block)
    idx_K = jnp.clip(targets_K - first, 0, block - 1)
    z_t_K = jnp.take_along_axis(z_KB, idx_K[:, None], axis=-1)[:, 0]
    z_target_K = z_target_K + jnp.where(in_block_K, z_t_K, 0.0)
    return (m_new_K, s_K, w_K, z_target_K), None

  init = (jnp.full((k,), -jnp.inf, jnp.float32),
          jnp.zeros((k,), jnp.float32), jnp.zeros((k,), jnp.float32),
          jnp.zeros((k,), jnp.float32))
  (m_K, s_K, w_K, z_target_K), _ = jax.lax.scan(step, init,
                                                jnp.arange(num_blocks))
  lse_K = m_K + jnp.log(s_K)
  return z_target_K - lse_K, lse_K - w_K / s_K


def _dense_chunk_stats(hidden_KD: jax.Array, kernel_DV: jax.Array,
                       targets_K: jax.Array, temperature,
                       softcap=None) -> tuple[jax.Array, jax.Array]:
  """Target log-probs and entropies of K tokens from one [K, V] logits block."""
  logits_1KV = _softcap(jnp.dot(hidden_KD, kernel_DV,
                                preferred_element_type=jnp.float32),
                        softcap)[None]
  logp_1KV = _scaled_log_softmax(logits_1KV, temperature)
  return _gather(logp_1KV, targets_K[None])[0], _entropy(logp_1KV)[0]


def chunked_token_logprobs_and_entropy(
    hidden_NTD: jax.typing.ArrayLike,
    kernel_DV: jax.typing.ArrayLike,
    targets_NT: jax.typing.ArrayLike,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    vocab_chunk: int | None = None,
    softcap: float | None = None,
) -> LogprobsAndEntropy:
  """Target log-probs and entropies of ``hidden @ kernel`` without [N, T, V].

  Same values as ``token_logprobs_and_entropy(hidden @ kernel, targets)``
  (logits accumulated in float32), computed ``chunk_size`` tokens at a time:

    z[m] = c tanh(hidden[m] @ kernel / c) / tau     (c = softcap; without
                                                    it z[m] = hidden @ kernel / tau)
    logp[m] = z[m, y_m] - logsumexp_v z[m, v]
    H[m] = logsumexp_v z[m, v] - sum_v softmax(z[m])_v z[m, v]

  Tokens are flattened to [M, D], padded with zero rows to a multiple of the
  chunk and mapped over with ``jax.lax.map``; each chunk is wrapped in
  ``jax.checkpoint``, so the backward pass recomputes a chunk's logits instead
  of keeping all of them. Peak extra memory is about ``chunk_size * V * 4``
  bytes (times a small constant), or ``chunk_size * vocab_chunk * 4`` with
  ``vocab_chunk`` set, where the vocabulary is streamed with an online
  logsumexp (running max, running sum of exp, running sum of exp * logit).
  Gradients flow to ``hidden`` and ``kernel``; the targets are integers.
  Padding rows give finite values and gradients (they are dropped before
  returning); mask real padding tokens downstream as usual.

  The fused-projection idea follows "Cut Your Losses in Large-Vocabulary
  Language Models" (arXiv:2411.09009).

  Args:
    hidden_NTD: [N, T, D] final hidden states, any float dtype. Row ``t`` must
      give the distribution that ``targets_NT[:, t]`` was drawn from.
    kernel_DV: [D, V] output projection (unembedding), any float dtype.
    targets_NT: [N, T] integer token ids in ``[0, V)`` (padding positions
      need a valid id too).
    temperature: sampling temperature tau > 0.
    chunk_size: tokens per chunk (capped at N * T), > 0.
    vocab_chunk: vocabulary columns per streamed block (capped at V), or
      None to take the whole vocabulary of a chunk at once.
    softcap: final logit soft-cap c (Gemma 2), or None.

  Returns:
    :class:`LogprobsAndEntropy` of two [N, T] float32 arrays.
  """
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive number of tokens, got "
                     f"{chunk_size}.")
  if vocab_chunk is not None and vocab_chunk < 1:
    raise ValueError(f"vocab_chunk must be a positive number of columns or "
                     f"None, got {vocab_chunk}.")
  hidden_NTD = jnp.asarray(hidden_NTD)
  kernel_DV = jnp.asarray(kernel_DV)
  targets_NT = jnp.asarray(targets_NT)
  chex.assert_rank([hidden_NTD, kernel_DV, targets_NT], [3, 2, 2])
  chex.assert_shape(kernel_DV, (hidden_NTD.shape[-1], None))
  chex.assert_shape(targets_NT, hidden_NTD.shape[:2])
  n, t, d = hidden_NTD.shape
  m = n * t
  chunk = max(1, min(chunk_size, m))
  num_chunks = -(-m // chunk)
  pad = num_chunks * chunk - m
  hidden_MD = jnp.pad(hidden_NTD.reshape(m, d), ((0, pad), (0, 0)))
  targets_M = jnp.pad(targets_NT.reshape(m).astype(jnp.int32), (0, pad))

  if vocab_chunk is None:
    stats = functools.partial(_dense_chunk_stats, temperature=temperature,
                              softcap=softcap)
  else:
    stats = functools.partial(_online_chunk_stats, temperature=temperature,
                              vocab_chunk=vocab_chunk, softcap=softcap)
  stats = jax.checkpoint(stats)
  logp_CK, entropy_CK = jax.lax.map(
      lambda xs: stats(xs[0], kernel_DV, xs[1]),
      (hidden_MD.reshape(num_chunks, chunk, d),
       targets_M.reshape(num_chunks, chunk)))
  return LogprobsAndEntropy(
      logp=logp_CK.reshape(-1)[:m].reshape(n, t),
      entropy=entropy_CK.reshape(-1)[:m].reshape(n, t))
