"""Policy objectives on masked [N, T] token batches.

PPO clip, GSPO, CISPO, plain policy gradient, SFT, DFT, One-Token Rollout,
KL and entropy terms, and importance weights for rollout/trainer mismatch.

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

  verl's ``kl_penalty`` names these "kl" (k1), "mse" (k2) and
  "low_var_kl" (k3) and clamps k3 to [-10, 10]; TRL's GRPO uses k3 without a
  clamp. No clamp is applied here: k3 is non-negative by construction, and a
  clamp would hide the large values that signal a run drifting away from its
  reference.

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


def kl_loss(
    logp_NT: jax.typing.ArrayLike,
    ref_logp_NT: jax.typing.ArrayLike,
    mask_NT: jax.typing.ArrayLike,
    *,
    kind: str = "k3",
    aggregation: str = "token_mean",
    num_tokens: Optional[jax.typing.ArrayLike] = None,
    num_seqs: Optional[jax.typing.ArrayLike] = None,
    norm_constant: Optional[jax.typing.ArrayLike] = None,
) -> tuple[jax.Array, Metrics]:
  """KL(pi || pi_ref) penalty as a loss: :func:`kl_penalty` aggregated.

    L = aggregate_{n,t}( k(ref_logp - logp) )      k in {k1, k2, k3}

  GRPO ("DeepSeekMath", arXiv:2402.03300) adds ``beta * L`` with ``k3`` and
  ``"seq_mean_token_mean"``; the estimators are from J. Schulman,
  "Approximating KL Divergence" (2020). Scale by the KL coefficient outside.

  Args:
    logp_NT: [N, T] log-probs of the sampled tokens under the current policy.
    ref_logp_NT: [N, T] log-probs under the reference policy (no gradient).
    mask_NT: [N, T] validity mask (bool or ``!= 0``).
    kind: one of :data:`KL_ESTIMATORS`.
    aggregation: mode of :func:`aggregation.aggregate` (static under jit).
    num_tokens: global token count for micro-batching.
    num_seqs: global sequence count for micro-batching.
    norm_constant: divisor of ``"seq_mean_token_sum_norm"``.

  Returns:
    ``(loss, metrics)`` with metrics ``kl_loss`` (the loss), ``kl`` (masked
    token mean of the chosen estimator) and ``kl_max`` (masked max).

  Raises:
    ValueError: unknown ``kind``.
  """
  logp_NT, valid_NT, ref_logp_NT = _prepare_logp(logp_NT, mask_NT,
                                                 ref_logp_NT)
  kl_NT = kl_penalty(logp_NT, ref_logp_NT, kind)
  loss = agg.aggregate(kl_NT, valid_NT, aggregation, num_tokens=num_tokens,
                       num_seqs=num_seqs, norm_constant=norm_constant)
  kl_NT = jax.lax.stop_gradient(kl_NT)
  metrics = {
      "kl_loss": jax.lax.stop_gradient(loss),
      "kl": agg.masked_mean(kl_NT, valid_NT),
      "kl_max": _masked_extremum(kl_NT, valid_NT, jnp.max, -jnp.inf),
  }
  return loss, metrics


def entropy_loss(
    entropy_NT: jax.typing.ArrayLike,
    mask_NT: jax.typing.ArrayLike,
    *,
    aggregation: str = "token_mean",
    num_tokens: Optional[jax.typing.ArrayLike] = None,
    num_seqs: Optional[jax.typing.ArrayLike] = None,
    norm_constant: Optional[jax.typing.ArrayLike] = None,
) -> tuple[jax.Array, Metrics]:
  """Entropy bonus as a loss: minimising it raises the policy entropy.

    L = -aggregate_{n,t}( H(pi(. | y_{n,<t})) )

  Add ``coef * L`` to a policy loss, as in the entropy-regularised objective
  of "Asynchronous Methods for Deep Reinforcement Learning" (A3C,
  arXiv:1602.01783) and PPO (arXiv:1707.06347).

  Args:
    entropy_NT: [N, T] entropy of each next-token distribution, differentiable
      (e.g. from :func:`logprobs.token_logprobs_and_entropy`).
    mask_NT: [N, T] validity mask (bool or ``!= 0``).
    aggregation: mode of :func:`aggregation.aggregate` (static under jit).
    num_tokens: global token count for micro-batching.
    num_seqs: global sequence count for micro-batching.
    norm_constant: divisor of ``"seq_mean_token_sum_norm"``.

  Returns:
    ``(loss, metrics)`` with metrics ``entropy_loss`` (the loss) and
    ``entropy`` (masked token mean of the entropy), float32 scalars.
  """
  entropy_NT, valid_NT = _prepare_logp(entropy_NT, mask_NT)
  loss = -agg.aggregate(entropy_NT, valid_NT, aggregation,
                        num_tokens=num_tokens, num_seqs=num_seqs,
                        norm_constant=norm_constant)
  metrics = {
      "entropy_loss": jax.lax.stop_gradient(loss),
      "entropy": jax.lax.stop_gradient(agg.masked_mean(entropy_NT, valid_NT)),
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
