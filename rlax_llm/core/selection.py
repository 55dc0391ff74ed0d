"""Selection and shaping of rollouts before the loss: DAPO's filters.

Which groups and sequences enter a policy update changes what is learned as
much as the loss does. DAPO ("DAPO: An Open-Source LLM Reinforcement Learning
System at Scale", arXiv:2503.14476) drops groups that carry no learning
signal (dynamic sampling), punishes over-long completions smoothly (soft
overlong punishment) and can drop truncated completions from the loss
(overlong filtering). Each is a small function of rewards, lengths and
masks; combine their outputs with ``&`` and ``+``.

D^3S ("Dynamic Dual-level Down-Sampling", arXiv:2509.22115) selects the
rollouts and tokens with the most informative advantages, and XRPO ("XRPO:
Pushing the limits of GRPO with Targeted Exploration and Exploitation",
arXiv:2510.06672) sharpens the advantages of correct but unlikely rollouts.
"""

from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp

from rlax_llm.core import aggregation as agg

__all__ = [
    "d3s_sample_mask",
    "d3s_token_mask",
    "dynamic_sampling_mask",
    "linear_schedule",
    "overlong_penalty",
    "truncation_mask",
    "xrpo_novelty",
    "xrpo_sharpen",
]


def dynamic_sampling_mask(
    reward_BG: jax.typing.ArrayLike,
    *,
    mask_BG: Optional[jax.typing.ArrayLike] = None,
) -> jax.Array:
  """Groups worth training on: their valid rewards are not all equal.

    keep_b = max_{g valid} r_{b,g} > min_{g valid} r_{b,g}

  With binary accuracy rewards this is DAPO's ``0 < #correct < G``: a group
  whose samples are all right or all wrong has zero group-relative advantage
  and only dilutes the batch. DAPO over-samples prompts and keeps filling the
  batch with kept groups ("DAPO", arXiv:2503.14476, dynamic sampling). Use
  ``jnp.repeat(keep_B, G)`` for a per-sequence [N] mask.

  Args:
    reward_BG: [B, G] scalar reward of each of G completions of B prompts.
    mask_BG: optional [B, G] validity mask (bool or ``!= 0``); masked samples
      are ignored (their rewards may be NaN).

  Returns:
    [B] bool; False for groups with fewer than two valid samples.
  """
  reward_BG = jnp.asarray(reward_BG)
  chex.assert_rank(reward_BG, 2)
  if mask_BG is None:
    valid_BG = jnp.ones(reward_BG.shape, jnp.bool_)
  else:
    valid_BG = agg.as_bool_mask(mask_BG)
    chex.assert_equal_shape([reward_BG, valid_BG])
  reward_BG = reward_BG.astype(jnp.promote_types(reward_BG.dtype,
                                                 jnp.float32))
  hi_B = jnp.max(jnp.where(valid_BG, reward_BG, -jnp.inf), axis=-1)
  lo_B = jnp.min(jnp.where(valid_BG, reward_BG, jnp.inf), axis=-1)
  return hi_B > lo_B


def overlong_penalty(
    length_N: jax.typing.ArrayLike,
    *,
    max_length: int,
    cache_length: int,
) -> jax.Array:
  """DAPO's soft overlong punishment, a length-dependent reward term.

  With ``L = max_length`` and ``C = cache_length``:

    R(|y|) = 0                       if |y| <= L - C
           = ((L - C) - |y|) / C     if L - C < |y| <= L
           = -1                      if |y| > L

  Added to the task reward, it ramps linearly from 0 to -1 over the last
  ``C`` tokens of the budget. From "DAPO: An Open-Source LLM Reinforcement
  Learning System at Scale" (arXiv:2503.14476), which uses L = 20480 with
  C = 4096 (a 16384-token expected length).

  Args:
    length_N: [N] completion lengths (int or float), e.g.
      ``mask_NT.sum(-1)``.
    max_length: L, the maximum completion length.
    cache_length: C, the length of the punishment interval, ``0 < C <= L``.

  Returns:
    [N] float32 penalties in [-1, 0].

  Raises:
    ValueError: ``cache_length`` not in (0, max_length].
  """
  if not 0 < cache_length <= max_length:
    raise ValueError(
        f"cache_length must be in (0, max_length={max_length}], got "
        f"{cache_length}; DAPO uses max_length=20480, cache_length=4096.")
  length_N = jnp.asarray(length_N)
  chex.assert_rank(length_N, 1)
  length_N = length_N.astype(jnp.float32)
  expected = max_length - cache_length
  ramp_N = (expected - length_N) / cache_length
  return jnp.clip(ramp_N, -1.0, 0.0)


def truncation_mask(
    mask_NT: jax.typing.ArrayLike,
    truncated_N: jax.typing.ArrayLike,
) -> jax.Array:
  """Drops every token of truncated completions from the loss.

    m'_{n,t} = m_{n,t} and not truncated_n

  DAPO's overlong filtering: a completion cut at the length limit gets a
  reward that judges the cut, not the reasoning, so its tokens are masked
  out of the loss ("DAPO", arXiv:2503.14476). Pass the result to the
  objective and to :func:`aggregation.normalizers`.

  Args:
    mask_NT: [N, T] validity mask (bool or ``!= 0``).
    truncated_N: [N] bool (or ``!= 0``): the completion hit the length limit
      without an end-of-sequence token.

  Returns:
    [N, T] bool mask.
  """
  valid_NT = agg.as_bool_mask(mask_NT)
  truncated_N = agg.as_bool_mask(truncated_N)
  chex.assert_rank(valid_NT, 2)
  chex.assert_shape(truncated_N, valid_NT.shape[:1])
  return valid_NT & ~truncated_N[:, None]


def d3s_sample_mask(adv_N: jax.typing.ArrayLike, budget: int, *,
                    mask_N: Optional[jax.typing.ArrayLike] = None
                    ) -> jax.Array:
  """D^3S sample-level selection: the budget-sized subset of largest variance.

    S* = argmax_{S subset of valid rollouts, |S| = k} Var_{i in S}(A_i)

  (population variance). A maximum-variance subset of size k always consists
  of the i smallest and the k - i largest values for some i, so the search is
  over k + 1 candidates, each scored in O(1) from prefix sums of the sorted
  advantages: exact, O(N log N), and jit-able for a static budget. Ties
  between equal advantages are broken by position (stable sort).

  Args:
    adv_N: [N] sequence advantages, pooled across groups.
    budget: k, the number of rollouts to keep (static); clipped to the
      number of valid rollouts.
    mask_N: optional [N] validity mask; invalid rollouts are never selected.

  Returns:
    [N] bool, True on the selected rollouts.
  """
  adv_N = jnp.asarray(adv_N, jnp.float32)
  chex.assert_rank(adv_N, 1)
  n = adv_N.shape[0]
  if budget < 0:
    raise ValueError(f"budget must be >= 0, got {budget}.")
  valid = (jnp.ones((n,), bool) if mask_N is None
           else agg.as_bool_mask(mask_N))
  num_valid = jnp.sum(valid)
  k = jnp.minimum(budget, num_valid)
  # Invalid entries sort to the end and are never inside a chosen window.
  order = jnp.argsort(jnp.where(valid, adv_N, jnp.inf), stable=True)
  x = jnp.where(valid, adv_N, 0.0)[order]
  c1 = jnp.concatenate([jnp.zeros(1), jnp.cumsum(x)])
  c2 = jnp.concatenate([jnp.zeros(1), jnp.cumsum(x * x)])
  i = jnp.arange(budget + 1)  # i smallest + (k - i) largest valid values
  i = jnp.minimum(i, k)
  hi_start = num_valid - (k - i)
  s1 = c1[i] + c1[num_valid] - c1[hi_start]
  s2 = c2[i] + c2[num_valid] - c2[hi_start]
  kf = jnp.maximum(k, 1).astype(jnp.float32)
  var = s2 / kf - (s1 / kf) ** 2
  best = jnp.argmax(var)
  rank = jnp.arange(n)
  chosen_sorted = (rank < i[best]) | ((rank >= hi_start[best])
                                      & (rank < num_valid))
  return jnp.zeros((n,), bool).at[order].set(chosen_sorted) & (k > 0)


def d3s_token_mask(adv_NT: jax.typing.ArrayLike,
                   entropy_NT: jax.typing.ArrayLike,
                   mask_NT: jax.typing.ArrayLike, *,
                   fraction: float | jax.Array) -> jax.Array:
  """D^3S token-level selection: keep the top fraction by |A| x entropy.

    score_{n,t} = |A_{n,t}| * H_{n,t};  keep the ceil(fraction * #valid)
    highest-scoring valid tokens of the batch.

  Tokens tied with the last kept score are all kept. `fraction` may be a
  traced scalar (e.g. from `linear_schedule`).

  Args:
    adv_NT: [N, T] (or [N], broadcast) advantages.
    entropy_NT: [N, T] per-token policy entropies.
    mask_NT: [N, T] validity mask.
    fraction: share of valid tokens to keep, in [0, 1].

  Returns:
    [N, T] bool, a subset of `mask_NT`.
  """
  entropy_NT = jnp.asarray(entropy_NT, jnp.float32)
  adv_NT = jnp.asarray(adv_NT, jnp.float32)
  if adv_NT.ndim == 1:
    adv_NT = adv_NT[:, None]
  adv_NT = jnp.broadcast_to(adv_NT, entropy_NT.shape)
  valid = agg.as_bool_mask(mask_NT)
  chex.assert_equal_shape([entropy_NT, valid])
  score = jnp.where(valid, jnp.abs(adv_NT) * entropy_NT, -jnp.inf).ravel()
  num_valid = jnp.sum(valid)
  k = jnp.ceil(jnp.clip(fraction, 0.0, 1.0) * num_valid).astype(jnp.int32)
  ranked = jnp.sort(score)[::-1]
  threshold = ranked[jnp.maximum(k - 1, 0)]
  keep = (score >= threshold).reshape(valid.shape) & valid
  return keep & (k > 0)


def linear_schedule(step: jax.typing.ArrayLike, *, start: float, end: float,
                    num_steps: int) -> jax.Array:
  """start + (end - start) * min(step / num_steps, 1): e.g. a D^3S fraction."""
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(num_steps, 1), 0., 1.)
  return start + (end - start) * frac


def xrpo_novelty(logp_NT: jax.typing.ArrayLike, mask_NT: jax.typing.ArrayLike,
                 group_size: int, *, length_normalise: bool = True
                 ) -> jax.Array:
  """XRPO novelty of each rollout relative to its group.

    s_i   = (1 / |y_i|) sum_t log pi(y_{i,t})        (length_normalise=True)
          =             sum_t log pi(y_{i,t})        (length_normalise=False)
    eta_i = exp(s_i - mean_{j in group(i), |y_j| > 0} s_j)

  eta_i < 1 marks a rollout the policy finds less likely than its siblings do
  on average (with the default, per token: a geometric mean). The group mean
  covers the group's non-empty rollouts; an empty rollout (or an empty slot
  of a variable-size group) gets eta = 1 (no bonus). XRPO's s(y) is the
  length-normalised sequence log-likelihood (the paper's novelty definition
  next to its advantage-sharpening equation, as its readers implement it; see
  docs/FIDELITY.md); the summed log-probability is the option, under which
  longer rollouts read as more novel.

  Args:
    logp_NT: [N, T] f32 per-token log-probs of the sampled tokens (the
      behaviour log-probs returned by `generate`).
    mask_NT: [N, T] validity mask.
    group_size: G; rows b*G .. b*G+G-1 form group b (N = B * G).
    length_normalise: s as the mean (True) or the sum (False) of the
      rollout's token log-probs.

  Returns:
    [N] f32 novelty eta.
  """
  logp_NT = jnp.asarray(logp_NT, jnp.float32)
  valid = agg.as_bool_mask(mask_NT)
  chex.assert_equal_shape([logp_NT, valid])
  n = logp_NT.shape[0]
  if group_size < 1 or n % group_size:
    raise ValueError(f"N={n} rollouts do not split into groups of "
                     f"group_size={group_size}.")
  length = jnp.sum(valid, axis=-1)
  s_N = jnp.sum(jnp.where(valid, logp_NT, 0.0), -1)
  if length_normalise:
    s_N = s_N / jnp.maximum(length, 1)
  nonempty = (length > 0).reshape(-1, group_size)
  s_BG = s_N.reshape(-1, group_size)
  mean_B = (jnp.sum(jnp.where(nonempty, s_BG, 0.0), -1, keepdims=True)
            / jnp.maximum(jnp.sum(nonempty, -1, keepdims=True), 1))
  eta = jnp.where(nonempty, jnp.exp(s_BG - mean_B), 1.0)
  return eta.reshape(n)


def xrpo_sharpen(adv_N: jax.typing.ArrayLike, correct_N: jax.typing.ArrayLike,
                 eta_N: jax.typing.ArrayLike, *, lam: float = 2.5,
                 kappa_clip: float = 0.5) -> jax.Array:
  """XRPO novelty-aware advantage sharpening.

    A'_i = A_i + min(max(lam * (1 - eta_i), 0), kappa_clip * A_i)
           for correct rollouts with A_i > 0;  A'_i = A_i otherwise.

  The bonus is positive only for below-average likelihood (eta < 1) and is
  capped at a fraction `kappa_clip` of the rollout's own advantage, so it
  amplifies, and never creates or flips, a learning signal. Defaults are the
  paper's (lam 2.5, kappa_clip 0.5).

  Args:
    adv_N: [N] sequence advantages (e.g. GRPO's, flattened from [B, G]).
    correct_N: [N] bool, the rollout was verified correct.
    eta_N: [N] novelty from `xrpo_novelty`.
    lam: scale of the novelty bonus.
    kappa_clip: cap of the bonus relative to A_i.

  Returns:
    [N] f32 sharpened advantages.
  """
  adv_N = jnp.asarray(adv_N, jnp.float32)
  eta_N = jnp.asarray(eta_N, jnp.float32)
  correct_N = jnp.asarray(correct_N).astype(bool)
  chex.assert_rank(adv_N, 1)
  chex.assert_equal_shape([adv_N, eta_N, correct_N])
  bonus = jnp.minimum(jnp.maximum(lam * (1.0 - eta_N), 0.0),
                      kappa_clip * adv_N)
  return jnp.where(correct_N & (adv_N > 0), adv_N + bonus, adv_N)
