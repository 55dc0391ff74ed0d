"""KL and entropy terms: estimators of KL(pi || pi_ref) and their losses.

Usable inside the loss (``kl_loss``, ``entropy_loss``) or as reward shaping
(``kl_penalty`` per token, then ``advantages.token_level_rewards``). Values
at masked positions are ignored and receive zero gradient.
"""

from __future__ import annotations

from typing import Callable, Optional

import chex
import jax
import jax.numpy as jnp

from rlax_llm.core import aggregation as agg
from rlax_llm.core._common import Metrics, _masked_extremum, _prepare_logp

__all__ = ["KL_ESTIMATORS", "entropy_loss", "kl_loss", "kl_penalty"]


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

