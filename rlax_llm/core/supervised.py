"""Supervised objectives on target tokens: SFT, DFT and One-Token Rollout.

Cross-entropy (``sft_loss``), Dynamic Fine-Tuning (``dft_loss``: the
cross-entropy weighted by the stop-gradient target probability) and One-Token
Rollout (``otr_loss`` with K sampled candidates per position, and
``otr_exact_loss``, its expectation over the vocabulary), so that whether OTR
is more than a noisy DFT can be measured with the same pipeline.
"""

from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp

from rlax_llm.core import aggregation as agg
from rlax_llm.core._common import Metrics, _check_static, _prepare_logp

__all__ = ["dft_loss", "otr_exact_loss", "otr_loss", "sft_loss"]


def sft_loss(
    logp_NT: jax.typing.ArrayLike,
    mask_NT: jax.typing.ArrayLike,
    *,
    aggregation: str = "token_mean",
    num_tokens: Optional[jax.typing.ArrayLike] = None,
    num_seqs: Optional[jax.typing.ArrayLike] = None,
    norm_constant: Optional[jax.typing.ArrayLike] = None,
) -> tuple[jax.Array, Metrics]:
  """Negative log-likelihood of target tokens (supervised fine-tuning).

    L = aggregate_{n,t}( -log pi(y_{n,t} | y_{n,<t}) )

  With the default ``"token_mean"`` this is the usual per-token cross-entropy.

  Args:
    logp_NT: [N, T] log-prob of each target token (see
      :func:`logprobs.token_logprobs`).
    mask_NT: [N, T] validity mask (bool or ``!= 0``), e.g. completion tokens.
    aggregation: mode of :func:`aggregation.aggregate` (static under jit).
    num_tokens: global token count for micro-batching.
    num_seqs: global sequence count for micro-batching.
    norm_constant: divisor of ``"seq_mean_token_sum_norm"``.

  Returns:
    ``(loss, metrics)`` with metrics ``sft_loss`` (the loss) and ``nll`` (the
    masked token mean of ``-logp`` over this call's batch), float32 scalars.
  """
  logp_NT = jnp.asarray(logp_NT, jnp.float32)
  valid_NT = agg.as_bool_mask(mask_NT)
  chex.assert_rank(logp_NT, 2)
  chex.assert_equal_shape([logp_NT, valid_NT])
  nll_NT = -logp_NT
  loss = agg.aggregate(nll_NT, valid_NT, aggregation, num_tokens=num_tokens,
                       num_seqs=num_seqs, norm_constant=norm_constant)
  metrics = {
      "sft_loss": jax.lax.stop_gradient(loss),
      "nll": jax.lax.stop_gradient(agg.masked_mean(nll_NT, valid_NT)),
  }
  return loss, metrics


def dft_loss(
    logp_NT: jax.typing.ArrayLike,
    mask_NT: jax.typing.ArrayLike,
    *,
    aggregation: str = "token_mean",
    num_tokens: Optional[jax.typing.ArrayLike] = None,
    num_seqs: Optional[jax.typing.ArrayLike] = None,
    norm_constant: Optional[jax.typing.ArrayLike] = None,
) -> tuple[jax.Array, Metrics]:
  """Dynamic fine-tuning: cross-entropy weighted by the target's probability.

    L = aggregate_{n,t}( -sg[pi(y_t)] log pi(y_t) )

  Rescaling each token's SFT gradient by its (stop-gradient) probability
  undoes the ``1 / pi`` importance weight hidden in the SFT gradient seen as
  a policy gradient. From "On the Generalization of SFT: A Reinforcement
  Learning Perspective with Reward Rectification" (arXiv:2508.05629).

  Args:
    logp_NT: [N, T] log-prob of each target token.
    mask_NT: [N, T] validity mask (bool or ``!= 0``).
    aggregation: mode of :func:`aggregation.aggregate` (static under jit).
    num_tokens: global token count for micro-batching.
    num_seqs: global sequence count for micro-batching.
    norm_constant: divisor of ``"seq_mean_token_sum_norm"``.

  Returns:
    ``(loss, metrics)`` with metrics ``dft_loss`` (the loss), ``nll`` (masked
    token mean of ``-logp``) and ``target_prob`` (masked token mean of
    ``pi(y_t)``), float32 scalars.
  """
  logp_NT, valid_NT = _prepare_logp(logp_NT, mask_NT)
  prob_NT = jax.lax.stop_gradient(jnp.exp(logp_NT))
  loss = agg.aggregate(-prob_NT * logp_NT, valid_NT, aggregation,
                       num_tokens=num_tokens, num_seqs=num_seqs,
                       norm_constant=norm_constant)
  metrics = {
      "dft_loss": jax.lax.stop_gradient(loss),
      "nll": jax.lax.stop_gradient(agg.masked_mean(-logp_NT, valid_NT)),
      "target_prob": agg.masked_mean(prob_NT, valid_NT),
  }
  return loss, metrics


def _prepare_logits(logits_NTV, targets_NT, mask_NT):
  """float32 logits (0 at masked positions), int32 targets, bool mask.

  Zeroing the logits of masked positions keeps NaN padding out of the
  log-softmax, whose gradient would otherwise turn ``0 * NaN`` into NaN.
  """
  logits_NTV = jnp.asarray(logits_NTV)
  valid_NT = agg.as_bool_mask(mask_NT)
  targets_NT = jnp.asarray(targets_NT)
  chex.assert_rank(logits_NTV, 3)
  chex.assert_shape([valid_NT, targets_NT], logits_NTV.shape[:2])
  logits_NTV = jnp.where(valid_NT[..., None],
                         logits_NTV.astype(jnp.float32), 0)
  targets_NT = jnp.where(valid_NT, targets_NT, 0).astype(jnp.int32)
  return logits_NTV, targets_NT, valid_NT


def _gather_last(x_NTV: jax.Array, index_NTK: jax.Array) -> jax.Array:
  """x_NTV[n, t, index[n, t, k]] -> [N, T, K]."""
  return jnp.take_along_axis(x_NTV, index_NTK, axis=-1)


def _otr_candidates(logits_NTV: jax.Array, rng: jax.Array, num_candidates: int,
                    kappa: float) -> jax.Array:
  """[N, T, K] int32 draws from softmax(logits / kappa), inverse-CDF.

  Memory is O(N T V + N T K): the K uniforms are located in one cumulative
  sum of the sampling distribution by binary search.
  """
  q_NTV = jax.nn.softmax(jax.lax.stop_gradient(logits_NTV) / kappa, axis=-1)
  cdf_NTV = jnp.cumsum(q_NTV, axis=-1)
  n_rows, n_cols, vocab = q_NTV.shape
  u_NTK = jax.random.uniform(rng, (n_rows, n_cols, num_candidates))
  search = lambda cdf_V, v_K: jnp.searchsorted(cdf_V, v_K, side="right")
  flat_cdf = cdf_NTV.reshape(-1, vocab)
  flat_u = (u_NTK * cdf_NTV[..., -1:]).reshape(-1, num_candidates)
  index = jax.vmap(search)(flat_cdf, flat_u).reshape(u_NTK.shape)
  return jnp.minimum(index, vocab - 1).astype(jnp.int32)


def otr_loss(
    logits_NTV: jax.typing.ArrayLike,
    targets_NT: jax.typing.ArrayLike,
    mask_NT: jax.typing.ArrayLike,
    rng: jax.Array,
    *,
    num_candidates: int = 8,
    kappa: float = 1.2,
    beta: float = -0.1,
    aggregation: str = "token_mean",
    num_tokens: Optional[jax.typing.ArrayLike] = None,
    num_seqs: Optional[jax.typing.ArrayLike] = None,
    norm_constant: Optional[jax.typing.ArrayLike] = None,
) -> tuple[jax.Array, Metrics]:
  """One-Token Rollout: a one-step policy gradient on supervised targets.

  At each valid position (state ``s = y_{<t}``, target ``x = y_t``) draw K
  candidates from the sampling distribution ``q = softmax(logits / kappa)``:

    a_1..a_K ~ q,   R(a) = 1 if a = x else beta
    l_t = -(1/K) sum_j sg[R(a_j)] log pi(a_j | s),   pi = softmax(logits)
    L   = aggregate_{n,t}( l_t )

  Candidates and rewards carry no gradient. Its expectation over the draws
  is :func:`otr_exact_loss`. From "One-Token Rollout: Guiding Supervised
  Fine-Tuning of LLMs with Policy Gradient" (arXiv:2509.26313), whose
  ``kappa = 1.2`` and ``beta = -0.1`` are the defaults; ``num_candidates=8``
  is this library's default.

  Args:
    logits_NTV: [N, T, V] logits of each next-token distribution (any float
      dtype; upcast to float32).
    targets_NT: [N, T] int supervised target tokens.
    mask_NT: [N, T] validity mask (bool or ``!= 0``). Logits and targets at
      masked positions are ignored (even NaN) and get zero gradient.
    rng: PRNG key for the candidate draws.
    num_candidates: K, draws per position (static).
    kappa: sampling temperature of the candidates.
    beta: reward of a candidate that is not the target.
    aggregation: mode of :func:`aggregation.aggregate` (static under jit).
    num_tokens: global token count for micro-batching.
    num_seqs: global sequence count for micro-batching.
    norm_constant: divisor of ``"seq_mean_token_sum_norm"``.

  Returns:
    ``(loss, metrics)`` with metrics ``otr_loss`` (the loss), ``hit_rate``
    (fraction of candidates equal to the target), ``nll`` and
    ``target_prob`` (masked token means of ``-log pi(x)`` and ``pi(x)``).
  """
  _check_static("kappa", kappa, greater_than=0)
  _check_static("num_candidates", num_candidates, greater_than=0)
  logits_NTV, targets_NT, valid_NT = _prepare_logits(logits_NTV, targets_NT,
                                                     mask_NT)
  logp_NTV = jax.nn.log_softmax(logits_NTV, axis=-1)
  cand_NTK = _otr_candidates(logits_NTV, rng, num_candidates, kappa)
  hit_NTK = cand_NTK == targets_NT[..., None]
  reward_NTK = jnp.where(hit_NTK, 1.0, jnp.asarray(beta, jnp.float32))
  loss_NT = -jnp.mean(reward_NTK * _gather_last(logp_NTV, cand_NTK), axis=-1)
  loss = agg.aggregate(loss_NT, valid_NT, aggregation, num_tokens=num_tokens,
                       num_seqs=num_seqs, norm_constant=norm_constant)
  target_logp_NT = jax.lax.stop_gradient(
      _gather_last(logp_NTV, targets_NT[..., None])[..., 0])
  mean = lambda x_NT: agg.masked_mean(x_NT, valid_NT)
  metrics = {
      "otr_loss": jax.lax.stop_gradient(loss),
      "hit_rate": mean(jnp.mean(hit_NTK, axis=-1)),
      "nll": mean(-target_logp_NT),
      "target_prob": mean(jnp.exp(target_logp_NT)),
  }
  return loss, metrics


def otr_exact_loss(
    logits_NTV: jax.typing.ArrayLike,
    targets_NT: jax.typing.ArrayLike,
    mask_NT: jax.typing.ArrayLike,
    *,
    kappa: float = 1.2,
    beta: float = -0.1,
    aggregation: str = "token_mean",
    num_tokens: Optional[jax.typing.ArrayLike] = None,
    num_seqs: Optional[jax.typing.ArrayLike] = None,
    norm_constant: Optional[jax.typing.ArrayLike] = None,
) -> tuple[jax.Array, Metrics]:
  """One-Token Rollout in expectation: the sum over the vocabulary.

    l_t = -sum_a sg[q(a)] R(a) log pi(a)
        = -beta sum_a sg[q(a)] log pi(a) - (1 - beta) sg[q(x)] log pi(x)

  with ``q = softmax(logits / kappa)``, ``pi = softmax(logits)`` and the
  reward ``R`` of :func:`otr_loss`, whose expected value (and gradient) over
  the K draws this is. At ``kappa = 1`` the first term's gradient vanishes
  (``sum_a pi(a) grad log pi(a) = 0``) and the gradient is ``(1 - beta)``
  times that of :func:`dft_loss`. From "One-Token Rollout: Guiding
  Supervised Fine-Tuning of LLMs with Policy Gradient" (arXiv:2509.26313).

  Args:
    logits_NTV: [N, T, V] logits of each next-token distribution.
    targets_NT: [N, T] int supervised target tokens.
    mask_NT: [N, T] validity mask (bool or ``!= 0``).
    kappa: temperature of the (stop-gradient) weighting distribution q.
    beta: reward of a token that is not the target.
    aggregation: mode of :func:`aggregation.aggregate` (static under jit).
    num_tokens: global token count for micro-batching.
    num_seqs: global sequence count for micro-batching.
    norm_constant: divisor of ``"seq_mean_token_sum_norm"``.

  Returns:
    ``(loss, metrics)`` with metrics ``otr_loss`` (the loss), ``nll`` and
    ``target_prob`` (masked token means of ``-log pi(x)`` and ``pi(x)``).
  """
  _check_static("kappa", kappa, greater_than=0)
  logits_NTV, targets_NT, valid_NT = _prepare_logits(logits_NTV, targets_NT,
                                                     mask_NT)
  logp_NTV = jax.nn.log_softmax(logits_NTV, axis=-1)
  q_NTV = jax.lax.stop_gradient(jax.nn.softmax(logits_NTV / kappa, axis=-1))
  # q log pi with 0 * (-inf) read as 0 for tokens of zero probability.
  q_logp_NTV = jnp.where(q_NTV > 0, q_NTV * logp_NTV, 0)
  target_q_logp_NT = _gather_last(q_logp_NTV, targets_NT[..., None])[..., 0]
  loss_NT = -(beta * jnp.sum(q_logp_NTV, axis=-1) +
              (1 - beta) * target_q_logp_NT)
  loss = agg.aggregate(loss_NT, valid_NT, aggregation, num_tokens=num_tokens,
                       num_seqs=num_seqs, norm_constant=norm_constant)
  target_logp_NT = jax.lax.stop_gradient(
      _gather_last(logp_NTV, targets_NT[..., None])[..., 0])
  mean = lambda x_NT: agg.masked_mean(x_NT, valid_NT)
  metrics = {
      "otr_loss": jax.lax.stop_gradient(loss),
      "nll": mean(-target_logp_NT),
      "target_prob": mean(jnp.exp(target_logp_NT)),
  }
  return loss, metrics
