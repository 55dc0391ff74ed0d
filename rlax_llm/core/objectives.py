"""Policy objectives on masked [N, T] token batches: PPO clip, SFT, KL.

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

__all__ = [
    "KL_ESTIMATORS",
    "PPOClipAux",
    "kl_penalty",
    "ppo_clip_loss",
    "ppo_clip_token_loss",
    "sft_loss",
]

Metrics = dict[str, jax.Array]


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


def _masked_extremum(x_NT: jax.Array, valid_NT: jax.Array,
                     reduce: Callable[..., jax.Array],
                     fill: float) -> jax.Array:
  """Masked max/min of ``x_NT``; 0 when nothing is valid."""
  value = reduce(jnp.where(valid_NT, x_NT, fill))
  return jnp.where(jnp.any(valid_NT), value, 0)


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


def _kl_k1(delta: jax.Array) -> jax.Array:
  return -delta


def _kl_k2(delta: jax.Array) -> jax.Array:
  return 0.5 * delta**2


def _kl_k3(delta: jax.Array) -> jax.Array:
  return jnp.expm1(delta) - delta


# Each maps delta = ref_logp - logp (log of ref / pi) to a KL(pi || ref) term.
KL_ESTIMATORS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "k1": _kl_k1,
    "k2": _kl_k2,
    "k3": _kl_k3,
}


def kl_penalty(
    logp: jax.typing.ArrayLike,
    ref_logp: jax.typing.ArrayLike,
    kind: str = "k3",
) -> jax.Array:
  """Per-sample estimate of KL(pi || pi_ref) from samples of pi, elementwise.

  With ``delta = ref_logp - logp = log(pi_ref / pi)``:

    k1 = -delta                    = logp - ref_logp   (unbiased, high variance)
    k2 = delta^2 / 2                                   (biased, low variance)
    k3 = exp(delta) - delta - 1                        (unbiased, >= 0)

  From J. Schulman, "Approximating KL Divergence" (2020,
  http://joschu.net/blog/kl-approx.html); GRPO (arXiv:2402.03300) adds k3 to
  its loss. k1 and k3 are unbiased for the KL *value*; their gradient as a
  loss is not the gradient of the KL (k2's is, to first order).

  Args:
    logp: log-probs of sampled tokens under pi, any shape (e.g. [N, T]).
    ref_logp: log-probs of the same tokens under pi_ref, same shape.
    kind: one of :data:`KL_ESTIMATORS` (``"k1"``, ``"k2"``, ``"k3"``).

  Returns:
    float32 array of ``logp``'s shape. Mask it when aggregating, e.g.
    ``aggregate(kl_penalty(logp_NT, ref_NT), mask_NT)``; no gradient flows
    into ``ref_logp``.

  Raises:
    ValueError: unknown ``kind``.
  """
  try:
    estimator = KL_ESTIMATORS[kind]
  except KeyError:
    raise ValueError(f"Unknown KL estimator kind {kind!r}; valid kinds are "
                     f"{sorted(KL_ESTIMATORS)}.") from None
  logp = jnp.asarray(logp, jnp.float32)
  ref_logp = jax.lax.stop_gradient(jnp.asarray(ref_logp, jnp.float32))
  chex.assert_equal_shape([logp, ref_logp])
  return estimator(ref_logp - logp)
