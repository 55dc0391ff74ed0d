"""Policy objectives on masked [N, T] token batches.

PPO clip, GSPO, CISPO, plain policy gradient, and importance weights for
rollout/trainer mismatch. Supervised objectives (SFT, DFT, One-Token Rollout)
live in :mod:`rlax_llm.core.supervised` and KL/entropy terms in
:mod:`rlax_llm.core.regularizers`; both are re-exported here.

Each objective is a per-token loss function (``*_token_loss``, returning
``loss_NT`` and auxiliary arrays) followed by :func:`aggregation.aggregate`.
A new variant (GSPO, CISPO, ...) swaps the per-token function and reuses the
aggregation modes and their micro-batch normalisers unchanged.

Objectives return ``(loss, metrics)`` ready for
``jax.value_and_grad(fn, has_aux=True)``. Metrics are detached from the
gradient and are masked token means over the batch the call sees (for max/min,
masked max/min); all metrics are 0 for an all-masked batch.

Old log-probs, reference log-probs and advantages are data: no gradient flows
into them. Values at masked positions are ignored, even ``inf`` or ``NaN``,
and receive zero gradient.
"""


from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp

from rlax_llm.core import aggregation as agg
from rlax_llm.core._common import (Metrics, _broadcast_adv, _check_static,
                                   _masked_extremum, _prepare_adv,
                                   _prepare_logp, _seq_mask)
# Re-exported: `objectives.kl_penalty`, `objectives.sft_loss`, ... stay valid.
from rlax_llm.core.regularizers import KL_ESTIMATORS, entropy_loss, kl_loss
from rlax_llm.core.regularizers import kl_penalty
from rlax_llm.core.supervised import dft_loss, otr_exact_loss, otr_loss
from rlax_llm.core.supervised import sft_loss

__all__ = [
    "IMPORTANCE_MODES",
    "KL_ESTIMATORS",
    "PPOClipAux",
    "cispo_loss",
    "dft_loss",
    "entropy_loss",
    "gspo_loss",
    "importance_weights",
    "kl_loss",
    "kl_penalty",
    "otr_exact_loss",
    "otr_loss",
    "policy_gradient_loss",
    "ppo_clip_loss",
    "ppo_clip_token_loss",
    "sft_loss",
]


class PPOClipAux(NamedTuple):
  """Per-token by-products of :func:`ppo_clip_token_loss`, all [N, T].

  Attributes:
    ratio_NT: importance ratio ``exp(logp - old_logp)``; 1 at masked tokens.
    log_ratio_NT: ``logp - old_logp``; 0 at masked tokens.
    clipped_low_NT: bool, ``A < 0`` and ``ratio < 1 - clip_low`` (the clip
      zeroes the gradient).
    clipped_high_NT: bool, ``A > 0`` and ``ratio > 1 + clip_high``.
    dual_clipped_NT: bool, ``A < 0`` and ``ratio > dual_clip``.
  """

  ratio_NT: jax.Array
  log_ratio_NT: jax.Array
  clipped_low_NT: jax.Array
  clipped_high_NT: jax.Array
  dual_clipped_NT: jax.Array


def ppo_clip_token_loss(
    logp_NT: jax.typing.ArrayLike,
    old_logp_NT: jax.typing.ArrayLike,
    adv_NT: jax.typing.ArrayLike,
    mask_NT: jax.typing.ArrayLike,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: Optional[float] = None,
) -> tuple[jax.Array, PPOClipAux]:
  """Per-token clipped surrogate loss of PPO, with clip-higher and dual clip.

    rho = exp(logp - old_logp)
    l   = -min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A)
    l   = min(l, -dual_clip A)   where A < 0   (only if dual_clip is set)

  PPO: "Proximal Policy Optimization Algorithms" (arXiv:1707.06347).
  Decoupled ``clip_low`` / ``clip_high`` ("clip-higher"): "DAPO: An Open-Source
  LLM Reinforcement Learning System at Scale" (arXiv:2503.14476). Dual clip
  bounds the loss of negative-advantage tokens whose ratio has exploded:
  "Mastering Complex Control in MOBA Games with Deep Reinforcement Learning"
  (arXiv:1912.09729).

  Args:
    logp_NT: [N, T] log-probs of the sampled tokens under the current policy.
    old_logp_NT: [N, T] log-probs under the policy that sampled them.
    adv_NT: [N] per-sequence or [N, T] per-token advantages.
    mask_NT: [N, T] validity mask (bool or ``!= 0``).
    clip_low: lower clip range, ratio floor ``1 - clip_low``.
    clip_high: upper clip range, ratio ceiling ``1 + clip_high``.
    dual_clip: if set (> 1), negative-advantage losses are capped at
      ``-dual_clip * A``.

  Returns:
    ``(loss_NT, aux)``: [N, T] float32 per-token loss, 0 at masked tokens, and
    a :class:`PPOClipAux`.
  """
  _check_static("clip_low", clip_low, greater_than=0)
  _check_static("clip_high", clip_high, greater_than=0)
  if dual_clip is not None:
    _check_static("dual_clip", dual_clip, greater_than=1)
  logp_NT = jnp.asarray(logp_NT, jnp.float32)
  old_logp_NT = jax.lax.stop_gradient(jnp.asarray(old_logp_NT, jnp.float32))
  valid_NT = agg.as_bool_mask(mask_NT)
  chex.assert_rank(logp_NT, 2)
  chex.assert_equal_shape([logp_NT, old_logp_NT, valid_NT])
  adv_NT = jax.lax.stop_gradient(
      _broadcast_adv(adv_NT, logp_NT.shape).astype(jnp.float32))

  adv_NT = jnp.where(valid_NT, adv_NT, 0)
  log_ratio_NT = jnp.where(valid_NT, logp_NT - old_logp_NT, 0)
  ratio_NT = jnp.exp(log_ratio_NT)
  clipped_ratio_NT = jnp.clip(ratio_NT, 1 - clip_low, 1 + clip_high)
  loss_NT = -jnp.minimum(ratio_NT * adv_NT, clipped_ratio_NT * adv_NT)
  negative_NT = adv_NT < 0
  if dual_clip is not None:
    dual_bound_NT = -dual_clip * adv_NT
    dual_clipped_NT = valid_NT & negative_NT & (loss_NT > dual_bound_NT)
    loss_NT = jnp.where(negative_NT, jnp.minimum(loss_NT, dual_bound_NT),
                        loss_NT)
  else:
    dual_clipped_NT = jnp.zeros_like(valid_NT)
  loss_NT = jnp.where(valid_NT, loss_NT, 0)
  aux = PPOClipAux(
      ratio_NT=ratio_NT,
      log_ratio_NT=log_ratio_NT,
      clipped_low_NT=valid_NT & negative_NT & (ratio_NT < 1 - clip_low),
      clipped_high_NT=valid_NT & (adv_NT > 0) & (ratio_NT > 1 + clip_high),
      dual_clipped_NT=dual_clipped_NT,
  )
  return loss_NT, aux



def ppo_clip_loss(
    logp_NT: jax.typing.ArrayLike,
    old_logp_NT: jax.typing.ArrayLike,
    adv_NT: jax.typing.ArrayLike,
    mask_NT: jax.typing.ArrayLike,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: Optional[float] = None,
    aggregation: str = "token_mean",
    num_tokens: Optional[jax.typing.ArrayLike] = None,
    num_seqs: Optional[jax.typing.ArrayLike] = None,
    norm_constant: Optional[jax.typing.ArrayLike] = None,
) -> tuple[jax.Array, Metrics]:
  """Clipped PPO policy loss aggregated over a masked token batch.

    L = aggregate_{n,t}( -min(rho A, clip(rho, 1-clip_low, 1+clip_high) A) )

  with the dual-clip cap of :func:`ppo_clip_token_loss` if ``dual_clip`` is
  set. PPO: "Proximal Policy Optimization Algorithms" (arXiv:1707.06347);
  clip-higher: DAPO (arXiv:2503.14476); dual clip: arXiv:1912.09729. GRPO
  (arXiv:2402.03300) is this loss with group advantages and
  ``aggregation="seq_mean_token_mean"``; DAPO uses ``"token_mean"``.

  Metrics (masked token means over this call's batch unless noted):
    ``pg_loss``: the aggregated loss. ``clip_frac``: fraction of tokens whose
    gradient the clip removes, ``clip_frac_low`` (A < 0, rho < 1 - clip_low)
    plus ``clip_frac_high`` (A > 0, rho > 1 + clip_high). ``dual_clip_frac``:
    tokens capped by the dual clip (0 without it). ``approx_kl``: the k3
    estimator ``(rho - 1) - log rho`` of KL(pi_old || pi), non-negative and
    unbiased under samples from pi_old (Schulman, "Approximating KL
    Divergence", 2020). ``ratio_mean``; ``ratio_max`` / ``ratio_min`` (masked
    max / min).

  verl's ``compute_policy_loss`` (vanilla mode) has the same per-token loss
  with ``clip_ratio_low``/``clip_ratio_high`` and dual clip ``clip_ratio_c``
  (applied to negative advantages, as here); TRL's GRPO uses the same
  ``-min(rho A, clip(rho) A)`` with ``epsilon_low``/``epsilon_high`` and no
  dual clip. The clip fractions reported here count only tokens whose
  gradient the clip actually removes; verl's ``pg_clipfrac`` counts tokens
  where the clipped term is the larger loss, which for A < 0 and
  rho < 1 - clip_low is the same set.

  Args:
    logp_NT: [N, T] log-probs of the sampled tokens under the current policy.
    old_logp_NT: [N, T] log-probs under the policy that sampled them.
    adv_NT: [N] per-sequence or [N, T] per-token advantages.
    mask_NT: [N, T] validity mask (bool or ``!= 0``).
    clip_low: lower clip range.
    clip_high: upper clip range.
    dual_clip: optional dual-clip constant (> 1).
    aggregation: mode of :func:`aggregation.aggregate` (static under jit).
    num_tokens: global token count for micro-batching (see ``aggregate``).
    num_seqs: global sequence count for micro-batching.
    norm_constant: divisor of ``"seq_mean_token_sum_norm"``.

  Returns:
    ``(loss, metrics)``: float32 scalar loss and a dict of float32 scalars.
  """
  loss_NT, aux = ppo_clip_token_loss(
      logp_NT, old_logp_NT, adv_NT, mask_NT,
      clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip)
  valid_NT = agg.as_bool_mask(mask_NT)
  loss = agg.aggregate(loss_NT, valid_NT, aggregation, num_tokens=num_tokens,
                       num_seqs=num_seqs, norm_constant=norm_constant)
  aux = jax.lax.stop_gradient(aux)
  mean = lambda x_NT: agg.masked_mean(x_NT, valid_NT)
  metrics = {
      "pg_loss": jax.lax.stop_gradient(loss),
      "clip_frac": mean(aux.clipped_low_NT | aux.clipped_high_NT),
      "clip_frac_low": mean(aux.clipped_low_NT),
      "clip_frac_high": mean(aux.clipped_high_NT),
      "dual_clip_frac": mean(aux.dual_clipped_NT),
      "approx_kl": mean((aux.ratio_NT - 1) - aux.log_ratio_NT),
      "ratio_mean": mean(aux.ratio_NT),
      "ratio_max": _masked_extremum(aux.ratio_NT, valid_NT, jnp.max, -jnp.inf),
      "ratio_min": _masked_extremum(aux.ratio_NT, valid_NT, jnp.min, jnp.inf),
  }
  return loss, metrics



def gspo_loss(
    logp_NT: jax.typing.ArrayLike,
    old_logp_NT: jax.typing.ArrayLike,
    adv_NT: jax.typing.ArrayLike,
    mask_NT: jax.typing.ArrayLike,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    aggregation: str = "seq_mean_token_mean",
    num_tokens: Optional[jax.typing.ArrayLike] = None,
    num_seqs: Optional[jax.typing.ArrayLike] = None,
    norm_constant: Optional[jax.typing.ArrayLike] = None,
) -> tuple[jax.Array, Metrics]:
  """Group Sequence Policy Optimisation: a PPO clip on a sequence ratio.

    s_n     = exp( 1/|y_n| sum_t m (logp - old_logp) )      (length-normalised)
    s_{n,t} = sg[s_n] * pi(y_t) / sg[pi(y_t)]               (GSPO-token)
    L       = aggregate_{n,t}( -min(s_{n,t} A, clip(s_{n,t}, 1-clip_low,
                                                      1+clip_high) A) )

  ``s_{n,t}`` equals ``s_n`` in value, so the clip decision is made per
  sequence, while its gradient ``s_n grad log pi(y_t)`` gives, after the
  per-sequence token mean of the default ``"seq_mean_token_mean"``, the
  paper's sequence-level gradient ``s_n A_n 1/|y_n| sum_t grad log pi(y_t)``.
  With per-token advantages it is the paper's GSPO-token variant. From "Group
  Sequence Policy Optimization" (arXiv:2507.18071), whose clip ranges 3e-4 /
  4e-4 are the defaults.

  Metrics: ``pg_loss``; ``clip_frac`` / ``clip_frac_low`` / ``clip_frac_high``
  (fraction of valid tokens whose gradient the clip removes: every token of a
  clipped sequence); ``seq_clip_frac`` (fraction of non-empty sequences with
  a clipped token); ``approx_kl`` (token mean of the k3 estimator of the
  token ratio, as in :func:`ppo_clip_loss`); ``seq_ratio_mean`` /
  ``seq_ratio_max`` / ``seq_ratio_min`` over non-empty sequences.

  verl's ``gspo`` policy-loss mode and TRL's
  ``importance_sampling_level="sequence"`` use the same length-normalised
  sequence log-ratio and apply it to every token with the stop-gradient
  construction, as here; the paper's defaults (3e-4, 4e-4) are kept.

  Args:
    logp_NT: [N, T] log-probs of the sampled tokens under the current policy.
    old_logp_NT: [N, T] log-probs under the policy that sampled them.
    adv_NT: [N] per-sequence or [N, T] per-token advantages.
    mask_NT: [N, T] validity mask (bool or ``!= 0``).
    clip_low: lower clip range of the sequence ratio.
    clip_high: upper clip range of the sequence ratio.
    aggregation: mode of :func:`aggregation.aggregate` (static under jit);
      the paper's objective is ``"seq_mean_token_mean"``.
    num_tokens: global token count for micro-batching.
    num_seqs: global sequence count for micro-batching.
    norm_constant: divisor of ``"seq_mean_token_sum_norm"``.

  Returns:
    ``(loss, metrics)``: float32 scalar loss and a dict of float32 scalars.
  """
  logp_NT, valid_NT, old_logp_NT = _prepare_logp(logp_NT, mask_NT,
                                                 old_logp_NT)
  seq_log_ratio_N = agg.masked_mean(logp_NT - old_logp_NT, valid_NT, axis=-1)
  # Value: log s_n at every token; gradient: that of logp_NT.
  token_log_ratio_NT = (jax.lax.stop_gradient(seq_log_ratio_N)[:, None] +
                        logp_NT - jax.lax.stop_gradient(logp_NT))
  loss_NT, aux = ppo_clip_token_loss(
      token_log_ratio_NT, jnp.zeros_like(logp_NT), adv_NT, valid_NT,
      clip_low=clip_low, clip_high=clip_high)
  loss = agg.aggregate(loss_NT, valid_NT, aggregation, num_tokens=num_tokens,
                       num_seqs=num_seqs, norm_constant=norm_constant)
  aux = jax.lax.stop_gradient(aux)
  mean = lambda x_NT: agg.masked_mean(x_NT, valid_NT)
  seq_valid_N = _seq_mask(valid_NT)
  seq_ratio_N = jax.lax.stop_gradient(jnp.exp(seq_log_ratio_N))
  clipped_NT = aux.clipped_low_NT | aux.clipped_high_NT
  token_log_ratio_NT = jax.lax.stop_gradient(logp_NT - old_logp_NT)
  metrics = {
      "pg_loss": jax.lax.stop_gradient(loss),
      "clip_frac": mean(clipped_NT),
      "clip_frac_low": mean(aux.clipped_low_NT),
      "clip_frac_high": mean(aux.clipped_high_NT),
      "seq_clip_frac": agg.masked_mean(jnp.any(clipped_NT, axis=-1),
                                       seq_valid_N),
      "approx_kl": mean(jnp.expm1(token_log_ratio_NT) - token_log_ratio_NT),
      "seq_ratio_mean": agg.masked_mean(seq_ratio_N, seq_valid_N),
      "seq_ratio_max": _masked_extremum(seq_ratio_N, seq_valid_N, jnp.max,
                                        -jnp.inf),
      "seq_ratio_min": _masked_extremum(seq_ratio_N, seq_valid_N, jnp.min,
                                        jnp.inf),
  }
  return loss, metrics


def cispo_loss(
    logp_NT: jax.typing.ArrayLike,
    old_logp_NT: jax.typing.ArrayLike,
    adv_NT: jax.typing.ArrayLike,
    mask_NT: jax.typing.ArrayLike,
    *,
    clip_low: Optional[float] = None,
    clip_high: float = 0.28,
    aggregation: str = "token_mean",
    num_tokens: Optional[jax.typing.ArrayLike] = None,
    num_seqs: Optional[jax.typing.ArrayLike] = None,
    norm_constant: Optional[jax.typing.ArrayLike] = None,
) -> tuple[jax.Array, Metrics]:
  """CISPO: REINFORCE weighted by a clipped, stop-gradient importance ratio.

    r   = exp(logp - old_logp)
    r^  = clip(r, 1 - clip_low, 1 + clip_high)
    L   = aggregate_{n,t}( -sg[r^] A logp )

  Unlike PPO, no token loses its gradient: the clip bounds the weight of the
  update, it never zeroes it. Clipping convention of the paper: only the
  upper bound is tuned and no lower bound is imposed (``eps_low`` "set to a
  large value"), hence ``clip_low=None`` (no floor); the paper normalises by
  the total token count of the batch, ``"token_mean"``. The paper does not
  fix a public value of ``eps_high``; 0.28 (DAPO's clip-higher) is this
  library's default. From "MiniMax-M1: Scaling Test-Time Compute Efficiently
  with Lightning Attention" (arXiv:2506.13585).

  Metrics: ``pg_loss``; ``clip_frac_low`` / ``clip_frac_high`` (fraction of
  valid tokens whose weight hit a bound), ``clip_frac`` their sum;
  ``approx_kl`` (k3, as in :func:`ppo_clip_loss`); ``is_weight_mean``
  (mean clipped weight); ``ratio_mean`` / ``ratio_max`` / ``ratio_min``.

  Args:
    logp_NT: [N, T] log-probs of the sampled tokens under the current policy.
    old_logp_NT: [N, T] log-probs under the policy that sampled them.
    adv_NT: [N] per-sequence or [N, T] per-token advantages.
    mask_NT: [N, T] validity mask (bool or ``!= 0``).
    clip_low: optional lower clip range (weight floor ``1 - clip_low``);
      ``None`` imposes no floor.
    clip_high: upper clip range, weight ceiling ``1 + clip_high``.
    aggregation: mode of :func:`aggregation.aggregate` (static under jit).
    num_tokens: global token count for micro-batching.
    num_seqs: global sequence count for micro-batching.
    norm_constant: divisor of ``"seq_mean_token_sum_norm"``.

  Returns:
    ``(loss, metrics)``: float32 scalar loss and a dict of float32 scalars.
  """
  _check_static("clip_high", clip_high, greater_than=0)
  if clip_low is not None:
    _check_static("clip_low", clip_low, greater_than=0)
  logp_NT, valid_NT, old_logp_NT = _prepare_logp(logp_NT, mask_NT,
                                                 old_logp_NT)
  adv_NT = _prepare_adv(adv_NT, valid_NT)
  log_ratio_NT = jax.lax.stop_gradient(logp_NT - old_logp_NT)
  ratio_NT = jnp.exp(log_ratio_NT)
  floor = -jnp.inf if clip_low is None else 1 - clip_low
  weight_NT = jnp.clip(ratio_NT, floor, 1 + clip_high)
  loss_NT = jnp.where(valid_NT, -weight_NT * adv_NT * logp_NT, 0)
  loss = agg.aggregate(loss_NT, valid_NT, aggregation, num_tokens=num_tokens,
                       num_seqs=num_seqs, norm_constant=norm_constant)
  mean = lambda x_NT: agg.masked_mean(x_NT, valid_NT)
  low_NT, high_NT = ratio_NT < floor, ratio_NT > 1 + clip_high
  metrics = {
      "pg_loss": jax.lax.stop_gradient(loss),
      "clip_frac": mean(low_NT | high_NT),
      "clip_frac_low": mean(low_NT),
      "clip_frac_high": mean(high_NT),
      "approx_kl": mean(jnp.expm1(log_ratio_NT) - log_ratio_NT),
      "is_weight_mean": mean(weight_NT),
      "ratio_mean": mean(ratio_NT),
      "ratio_max": _masked_extremum(ratio_NT, valid_NT, jnp.max, -jnp.inf),
      "ratio_min": _masked_extremum(ratio_NT, valid_NT, jnp.min, jnp.inf),
  }
  return loss, metrics


def policy_gradient_loss(
    logp_NT: jax.typing.ArrayLike,
    adv_NT: jax.typing.ArrayLike,
    mask_NT: jax.typing.ArrayLike,
    *,
    aggregation: str = "token_mean",
    num_tokens: Optional[jax.typing.ArrayLike] = None,
    num_seqs: Optional[jax.typing.ArrayLike] = None,
    norm_constant: Optional[jax.typing.ArrayLike] = None,
) -> tuple[jax.Array, Metrics]:
  """On-policy REINFORCE loss, the score-function policy gradient.

    L = aggregate_{n,t}( -A logp )

  Its gradient is ``-A grad log pi``, the likelihood-ratio estimator of
  Williams, "Simple Statistical Gradient-Following Algorithms for
  Connectionist Reinforcement Learning" (1992); with group advantages it is
  the REINFORCE of "Back to Basics: Revisiting REINFORCE Style Optimization
  for Learning from Human Feedback in LLMs" (arXiv:2402.14740). It is
  :func:`ppo_clip_loss`'s gradient at ``old_logp = logp`` (one update per
  rollout).

  Args:
    logp_NT: [N, T] log-probs of the sampled tokens under the current policy.
    adv_NT: [N] per-sequence or [N, T] per-token advantages.
    mask_NT: [N, T] validity mask (bool or ``!= 0``).
    aggregation: mode of :func:`aggregation.aggregate` (static under jit).
    num_tokens: global token count for micro-batching.
    num_seqs: global sequence count for micro-batching.
    norm_constant: divisor of ``"seq_mean_token_sum_norm"``.

  Returns:
    ``(loss, metrics)`` with metrics ``pg_loss`` and ``adv_mean`` (masked
    token mean of the advantages), float32 scalars.
  """
  logp_NT, valid_NT = _prepare_logp(logp_NT, mask_NT)
  adv_NT = _prepare_adv(adv_NT, valid_NT)
  loss_NT = -adv_NT * logp_NT
  loss = agg.aggregate(loss_NT, valid_NT, aggregation, num_tokens=num_tokens,
                       num_seqs=num_seqs, norm_constant=norm_constant)
  metrics = {
      "pg_loss": jax.lax.stop_gradient(loss),
      "adv_mean": agg.masked_mean(adv_NT, valid_NT),
  }
  return loss, metrics



def _truncate(log_ratio, log_cap):
  """Truncated IS: min(rho, cap); returns (weight, capped)."""
  return jnp.exp(jnp.minimum(log_ratio, log_cap)), log_ratio > log_cap


def _mask(log_ratio, log_cap):
  """Masked IS: rho if rho <= cap else 0; returns (weight, capped)."""
  capped = log_ratio > log_cap
  return jnp.where(capped, 0, jnp.exp(jnp.minimum(log_ratio, log_cap))), capped


# Each maps (log rho, log cap) to (weight, bool "the cap acted").
IMPORTANCE_MODES: dict[str, Callable[[jax.Array, jax.Array],
                                     tuple[jax.Array, jax.Array]]] = {
    "truncate": _truncate,
    "mask": _mask,
}


def importance_weights(
    logp_NT: jax.typing.ArrayLike,
    rollout_logp_NT: jax.typing.ArrayLike,
    mask_NT: jax.typing.ArrayLike,
    *,
    level: str = "token",
    mode: str = "truncate",
    cap: float = 2.0,
) -> tuple[jax.Array, Metrics]:
  """Importance weights correcting a rollout engine / trainer mismatch.

  The sampler (e.g. an inference engine in lower precision) and the trainer
  compute slightly different probabilities for the same tokens. With
  ``rho = pi_train / pi_rollout``:

    token level:    rho_{n,t} = exp(logp - rollout_logp)
    sequence level: rho_n     = exp(sum_t m (logp - rollout_logp)),
                    broadcast to every token of the row
    truncate:       w = min(rho, cap)                 (truncated IS)
    mask:           w = rho if rho <= cap else 0      (masked IS)

  Multiply the weights into the per-token loss, or equivalently into the
  advantages: ``ppo_clip_loss(..., adv_NT * w_NT, ...)`` (``w >= 0`` keeps
  the sign of A, so the PPO clip is unchanged). Truncated importance
  sampling as in V-trace ("IMPALA: Scalable Distributed Deep-RL with
  Importance Weighted Actor-Learner Architectures", arXiv:1802.01561); its
  use for the sampler/trainer gap follows F. Yao et al., "Your Efficient RL
  Framework Secretly Brings You Off-Policy RL Training" (2025, blog post).

  Metrics (token means over valid tokens): ``is_weight_mean``,
  ``is_capped_frac`` (tokens whose ratio exceeded the cap, i.e. truncated or
  masked), ``is_ratio_max`` (masked max of rho) and ``rollout_kl`` (k3
  estimate of KL(pi_rollout || pi_train), ``rho - 1 - log rho`` per token).

  verl's truncated importance sampling between the rollout engine and the
  trainer (token level, ``min(rho, cap)``) is ``level="token",
  mode="truncate"``; TRL's vLLM importance-sampling correction is the same
  token-level truncation. The sequence level and the masking mode go beyond
  both.

  Args:
    logp_NT: [N, T] log-probs of the sampled tokens under the trainer's
      policy (e.g. ``old_logp_NT``); treated as data.
    rollout_logp_NT: [N, T] log-probs reported by the sampler.
    mask_NT: [N, T] validity mask (bool or ``!= 0``).
    level: ``"token"`` or ``"sequence"`` (static).
    mode: a key of :data:`IMPORTANCE_MODES`, ``"truncate"`` or ``"mask"``
      (static).
    cap: the ratio threshold ``C > 0``.

  Returns:
    ``(w_NT, metrics)``: [N, T] float32 stop-gradient weights, 0 at masked
    tokens, and a dict of float32 scalars.

  Raises:
    ValueError: unknown ``level`` or ``mode``, or ``cap <= 0``.
  """
  _check_static("cap", cap, greater_than=0)
  if level not in ("token", "sequence"):
    raise ValueError(f"Unknown importance level {level!r}; valid levels are "
                     "['sequence', 'token'].")
  try:
    weight_fn = IMPORTANCE_MODES[mode]
  except KeyError:
    raise ValueError(f"Unknown importance mode {mode!r}; valid modes are "
                     f"{sorted(IMPORTANCE_MODES)}.") from None
  logp_NT, valid_NT, rollout_logp_NT = _prepare_logp(
      jax.lax.stop_gradient(logp_NT), mask_NT, rollout_logp_NT)
  log_ratio_NT = logp_NT - rollout_logp_NT
  log_cap = jnp.log(jnp.asarray(cap, jnp.float32))
  if level == "token":
    log_rho_NT = log_ratio_NT
  else:
    log_rho_N = agg.masked_sum(log_ratio_NT, valid_NT, axis=-1)
    log_rho_NT = jnp.broadcast_to(log_rho_N[:, None], log_ratio_NT.shape)
  w_NT, capped_NT = weight_fn(log_rho_NT, log_cap)
  w_NT = jax.lax.stop_gradient(jnp.where(valid_NT, w_NT, 0))
  # exp of a clamped log-ratio: the metric stays finite for huge mismatches.
  rho_NT = jnp.exp(jnp.minimum(log_rho_NT, 80.0))
  mean = lambda x_NT: agg.masked_mean(x_NT, valid_NT)
  metrics = {
      "is_weight_mean": mean(w_NT),
      "is_capped_frac": mean(capped_NT),
      "is_ratio_max": _masked_extremum(rho_NT, valid_NT, jnp.max, -jnp.inf),
      "rollout_kl": mean(jnp.expm1(log_ratio_NT) - log_ratio_NT),
  }
  return w_NT, metrics

