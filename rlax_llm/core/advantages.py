"""Advantages: group-relative (GRPO, Dr.GRPO, RLOO), batch-normalised
(REINFORCE++) and token-level (GAE, discounted returns).

Rewards arrive as ``reward_BG``: B prompts, G sampled completions each. The
advantage of each completion compares its reward with the other completions
of the same prompt, so no value network is needed. ``adv_BG.reshape(-1)``
gives the per-sequence ``adv_N`` in the row-major order ``n = b * G + g``.

All estimators take an optional ``mask_BG`` for groups with missing samples
(e.g. filtered or unfinished rollouts): masked entries do not enter the group
statistics and get advantage 0. A group with fewer than two valid samples, or
whose valid rewards are all equal, gets advantage exactly 0 (never NaN, and
not the ``~1e-3`` that rounding in the mean would otherwise leave behind).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp

__all__ = [
    "GAEOutput",
    "gae_advantages",
    "grpo_advantages",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "token_level_returns",
    "token_level_rewards",
]


def _prepare(reward_BG: jax.typing.ArrayLike,
             mask_BG: Optional[jax.typing.ArrayLike]):
  """Casts to float, checks shapes, returns (reward, valid, count_B1)."""
  reward_BG = jnp.asarray(reward_BG)
  reward_BG = reward_BG.astype(jnp.promote_types(reward_BG.dtype, jnp.float32))
  chex.assert_rank(reward_BG, 2)
  if mask_BG is None:
    valid_BG = jnp.ones(reward_BG.shape, jnp.bool_)
  else:
    valid_BG = jnp.asarray(mask_BG)
    if valid_BG.dtype != jnp.bool_:
      valid_BG = valid_BG != 0
    chex.assert_equal_shape([reward_BG, valid_BG])
  count_B1 = jnp.sum(valid_BG, axis=-1, keepdims=True).astype(reward_BG.dtype)
  return reward_BG, valid_BG, count_B1


def _varying_groups(reward_BG: jax.Array, valid_BG: jax.Array) -> jax.Array:
  """[B, 1] bool: the group has two valid rewards that differ."""
  hi_B1 = jnp.max(jnp.where(valid_BG, reward_BG, -jnp.inf), -1, keepdims=True)
  lo_B1 = jnp.min(jnp.where(valid_BG, reward_BG, jnp.inf), -1, keepdims=True)
  return hi_B1 > lo_B1


def _centered(reward_BG: jax.Array, valid_BG: jax.Array,
              count_B1: jax.Array) -> jax.Array:
  """r - mean over valid entries of the group; 0 at masked entries."""
  sum_B1 = jnp.sum(jnp.where(valid_BG, reward_BG, 0), -1, keepdims=True)
  mean_B1 = sum_B1 / jnp.maximum(count_B1, 1)
  return jnp.where(valid_BG, reward_BG - mean_B1, 0)


def grpo_advantages(
    reward_BG: jax.typing.ArrayLike,
    *,
    scale_by_std: bool = True,
    eps: float = 1e-6,
    mask_BG: Optional[jax.typing.ArrayLike] = None,
) -> jax.Array:
  """Group-normalised advantages of GRPO, or group-centred ones of Dr.GRPO.

    A_{b,g} = (r_{b,g} - mean_g r_b) / (std_g r_b + eps)   (scale_by_std=True)
    A_{b,g} =  r_{b,g} - mean_g r_b                        (scale_by_std=False)

  ``std`` is the *sample* standard deviation (ddof=1, Bessel-corrected),
  ``sqrt(sum_g (r - mean)^2 / (G - 1))``, as ``torch.std`` computes it in the
  TRL and verl implementations. GRPO is from "DeepSeekMath: Pushing the Limits
  of Mathematical Reasoning in Open Language Models" (arXiv:2402.03300);
  dropping the std division is Dr.GRPO, "Understanding R1-Zero-Like Training:
  A Critical Perspective" (arXiv:2503.20783).

  verl and TRL: the same centring and the same sample std. They differ at
  the edges: verl adds eps=1e-6 and gives a group of one sample mean 0 and
  std 1 (its advantage is the raw reward); TRL adds 1e-4 and, for a group of
  one, divides by torch's NaN std. Here eps defaults to 1e-6 and groups with
  fewer than two valid samples get 0, never NaN: one sample carries no
  group-relative signal.

  Args:
    reward_BG: [B, G] scalar reward of each of G completions of B prompts.
    scale_by_std: divide by the group std (GRPO); False gives Dr.GRPO.
    eps: added to the std before dividing.
    mask_BG: optional [B, G] validity mask (bool or ``!= 0``); masked samples
      are left out of the group statistics and get advantage 0.

  Returns:
    [B, G] float32 advantages. Groups with fewer than two valid samples or
    with all valid rewards equal get exactly 0.
  """
  reward_BG, valid_BG, count_B1 = _prepare(reward_BG, mask_BG)
  centered_BG = _centered(reward_BG, valid_BG, count_B1)
  if scale_by_std:
    var_B1 = jnp.sum(centered_BG**2, -1, keepdims=True) / jnp.maximum(
        count_B1 - 1, 1)
    positive_B1 = var_B1 > 0
    # Double `where` keeps the gradient of sqrt finite at zero variance.
    std_B1 = jnp.where(positive_B1,
                       jnp.sqrt(jnp.where(positive_B1, var_B1, 1)), 0)
    adv_BG = centered_BG / (std_B1 + eps)
  else:
    adv_BG = centered_BG
  return jnp.where(_varying_groups(reward_BG, valid_BG), adv_BG, 0)


def rloo_advantages(
    reward_BG: jax.typing.ArrayLike,
    *,
    mask_BG: Optional[jax.typing.ArrayLike] = None,
) -> jax.Array:
  """REINFORCE leave-one-out advantages: each sample's baseline is the others.

    A_{b,g} = r_{b,g} - 1/(G-1) sum_{g' != g} r_{b,g'}
            = G/(G-1) (r_{b,g} - mean_g r_b)

  From "Back to Basics: Revisiting REINFORCE Style Optimization for Learning
  from Human Feedback in LLMs" (arXiv:2402.14740), after Kool et al.'s "Buy 4
  REINFORCE Samples, Get a Baseline for Free!" (2019). With ``mask_BG``, G is
  the number of valid samples of the group.

  verl's RLOO advantage is the same leave-one-out baseline (written as
  G/(G-1) times the group-centred reward); TRL's RLOO trainer computes the
  same baseline. Groups of one sample get 0 here.

  Args:
    reward_BG: [B, G] scalar reward of each of G completions of B prompts.
    mask_BG: optional [B, G] validity mask (bool or ``!= 0``); masked samples
      are left out of the baselines and get advantage 0.

  Returns:
    [B, G] float32 advantages; 0 for groups with fewer than two valid samples
    or with all valid rewards equal.
  """
  reward_BG, valid_BG, count_B1 = _prepare(reward_BG, mask_BG)
  centered_BG = _centered(reward_BG, valid_BG, count_B1)
  adv_BG = centered_BG * count_B1 / jnp.maximum(count_B1 - 1, 1)
  return jnp.where(_varying_groups(reward_BG, valid_BG), adv_BG, 0)


def reinforce_pp_advantages(
    reward_BG: jax.typing.ArrayLike,
    *,
    group_baseline: bool = False,
    eps: float = 1e-6,
    mask_BG: Optional[jax.typing.ArrayLike] = None,
) -> jax.Array:
  """REINFORCE++ advantages: rewards normalised over the whole batch.

    A_{b,g} = (r_{b,g} - mean_batch r) / (std_batch r + eps)
                                                     (group_baseline=False)
    A'_{b,g} = r_{b,g} - mean_g r_b
    A_{b,g} = (A'_{b,g} - mean_batch A') / (std_batch A' + eps)
                                                     (group_baseline=True)

  Statistics run over every valid sample of the batch (all B * G, not one
  group); ``std_batch`` is the population std (ddof=0). With the group
  baseline ("REINFORCE++-baseline"), ``mean_batch A'`` is 0 exactly (each
  group's centred rewards sum to 0) and is not subtracted, so groups whose
  valid rewards are all equal get exactly 0. From "REINFORCE++: An Efficient
  RLHF Algorithm with Robustness to Both Prompt and Reward Models"
  (arXiv:2501.03262). For token-level rewards (e.g. a per-token KL penalty)
  build returns with :func:`token_level_returns` and normalise them over the
  batch the same way.

  verl's REINFORCE++ (and "-baseline") whiten per-token returns over every
  valid *token* of the batch, so long completions weigh more in the batch
  statistics; here the statistics run over sequences (one reward each), which
  keeps the normalisation independent of completion lengths. With outcome
  rewards only and equal lengths the two agree.

  Args:
    reward_BG: [B, G] scalar reward of each of G completions of B prompts.
    group_baseline: subtract the group mean before the batch normalisation.
    eps: added to the batch std before dividing.
    mask_BG: optional [B, G] validity mask (bool or ``!= 0``); masked samples
      are left out of every statistic and get advantage 0.

  Returns:
    [B, G] float32 advantages. A batch whose valid values are all equal (or
    has fewer than two valid samples) gets exactly 0.
  """
  reward_BG, valid_BG, count_B1 = _prepare(reward_BG, mask_BG)
  if group_baseline:
    x_BG = jnp.where(_varying_groups(reward_BG, valid_BG),
                     _centered(reward_BG, valid_BG, count_B1), 0)
  else:
    total = jnp.sum(jnp.where(valid_BG, reward_BG, 0))
    mean = total / jnp.maximum(jnp.sum(count_B1), 1)
    x_BG = jnp.where(valid_BG, reward_BG - mean, 0)
  count = jnp.sum(count_B1)
  var = jnp.sum(x_BG**2) / jnp.maximum(count, 1)
  hi = jnp.max(jnp.where(valid_BG, reward_BG, -jnp.inf))
  lo = jnp.min(jnp.where(valid_BG, reward_BG, jnp.inf))
  varying = (hi > lo) & (var > 0)
  # Double `where` keeps the gradient of sqrt finite at zero variance.
  std = jnp.where(varying, jnp.sqrt(jnp.where(varying, var, 1)), 0)
  return jnp.where(varying & valid_BG, x_BG / (std + eps), 0)


class GAEOutput(NamedTuple):
  """Output of :func:`gae_advantages`, both [N, T] float32, 0 where masked.

  Attributes:
    adv_NT: generalised advantage estimates.
    returns_NT: value targets ``adv + value`` (the lambda-returns).
  """

  adv_NT: jax.Array
  returns_NT: jax.Array


def _prepare_tokens(reward_NT, mask_NT, value_NT=None):
  """Casts to float, checks [N, T] shapes, returns (reward, valid, value)."""
  reward_NT = jnp.asarray(reward_NT)
  dtype = jnp.promote_types(reward_NT.dtype, jnp.float32)
  reward_NT = reward_NT.astype(dtype)
  valid_NT = jnp.asarray(mask_NT)
  if valid_NT.dtype != jnp.bool_:
    valid_NT = valid_NT != 0
  chex.assert_rank(reward_NT, 2)
  chex.assert_equal_shape([reward_NT, valid_NT])
  if value_NT is None:
    value_NT = jnp.zeros_like(reward_NT)
  value_NT = jnp.asarray(value_NT).astype(dtype)
  chex.assert_equal_shape([reward_NT, value_NT])
  return (jnp.where(valid_NT, reward_NT, 0), valid_NT,
          jnp.where(valid_NT, value_NT, 0))


def _masked_reverse_scan(reward_NT, value_NT, valid_NT, gamma, lam):
  """GAE over valid tokens only, scanning t = T-1 .. 0; returns adv_NT."""

  def step(carry, inputs):
    next_value_N, next_adv_N = carry
    reward_N, value_N, valid_N = inputs
    delta_N = reward_N + gamma * next_value_N - value_N
    adv_N = delta_N + gamma * lam * next_adv_N
    # A masked token is skipped: it passes the carry through unchanged.
    carry = (jnp.where(valid_N, value_N, next_value_N),
             jnp.where(valid_N, adv_N, next_adv_N))
    return carry, jnp.where(valid_N, adv_N, 0)

  zeros_N = jnp.zeros(reward_NT.shape[:1], reward_NT.dtype)
  _, adv_TN = jax.lax.scan(step, (zeros_N, zeros_N),
                           (reward_NT.T, value_NT.T, valid_NT.T), reverse=True)
  return adv_TN.T


def gae_advantages(
    reward_NT: jax.typing.ArrayLike,
    value_NT: jax.typing.ArrayLike,
    mask_NT: jax.typing.ArrayLike,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> GAEOutput:
  """Generalised advantage estimation over the valid tokens of each sequence.

    delta_t = r_t + gamma V_{t'} - V_t
    A_t     = delta_t + gamma lam A_{t'}
    R_t     = A_t + V_t

  where ``t'`` is the next *valid* token after ``t`` in the same row: masked
  tokens (padding, or tool output in a multi-turn rollout) are skipped, their
  rewards and values are ignored (even NaN), and their outputs are 0. After a
  row's last valid token ``V_{t'} = A_{t'} = 0`` (the episode ends). Computed
  with a reverse ``lax.scan`` over T. From "High-Dimensional Continuous
  Control Using Generalized Advantage Estimation" (arXiv:1506.02438).

  verl's ``compute_gae_advantage_return`` and TRL's PPO trainer compute the
  same recursion; masked positions inside a sequence are skipped here (the
  carry passes through them), as in verl's current version, whereas a plain
  reverse loop over positions would let padding break the chain. Both then
  whiten the advantages over the batch's valid tokens
  (``rlax_llm.core.value.whiten``).

  Args:
    reward_NT: [N, T] per-token rewards (e.g. from
      :func:`token_level_rewards`).
    value_NT: [N, T] value estimates V(s_t); no gradient flows into them.
    mask_NT: [N, T] validity mask (bool or ``!= 0``).
    gamma: discount factor.
    lam: GAE lambda; ``lam=1`` gives Monte-Carlo returns minus values,
      ``lam=0`` one-step TD errors.

  Returns:
    A :class:`GAEOutput` ``(adv_NT, returns_NT)`` of [N, T] float32 arrays.
  """
  reward_NT, valid_NT, value_NT = _prepare_tokens(reward_NT, mask_NT,
                                                  value_NT)
  value_NT = jax.lax.stop_gradient(value_NT)
  adv_NT = _masked_reverse_scan(reward_NT, value_NT, valid_NT, gamma, lam)
  returns_NT = jnp.where(valid_NT, adv_NT + value_NT, 0)
  return GAEOutput(adv_NT=adv_NT, returns_NT=returns_NT)


def token_level_returns(
    reward_NT: jax.typing.ArrayLike,
    mask_NT: jax.typing.ArrayLike,
    *,
    gamma: float = 1.0,
) -> jax.Array:
  """Discounted reward-to-go over the valid tokens of each sequence.

    G_t = r_t + gamma G_{t'}     (t' the next valid token; G = 0 after the end)

  This is :func:`gae_advantages` with zero values and ``lam=1``; with
  :func:`token_level_rewards` it gives REINFORCE++'s token advantages
  ``r(x, y) - beta sum_{i >= t} KL_i`` (arXiv:2501.03262).

  Args:
    reward_NT: [N, T] per-token rewards.
    mask_NT: [N, T] validity mask (bool or ``!= 0``).
    gamma: discount factor.

  Returns:
    [N, T] float32 returns, 0 at masked tokens.
  """
  reward_NT, valid_NT, zeros_NT = _prepare_tokens(reward_NT, mask_NT)
  return _masked_reverse_scan(reward_NT, zeros_NT, valid_NT, gamma, 1.0)


def token_level_rewards(
    reward_N: jax.typing.ArrayLike,
    mask_NT: jax.typing.ArrayLike,
    *,
    kl_NT: Optional[jax.typing.ArrayLike] = None,
    kl_coef: float = 0.0,
) -> jax.Array:
  """Places each sequence reward on its last valid token, minus a KL penalty.

    r_{n,t} = reward_n [t = last valid token of n] - kl_coef KL_{n,t}

  The per-token KL-shaped reward of RLHF with PPO ("Training language models
  to follow instructions with human feedback", arXiv:2203.02155) and of
  REINFORCE++ (arXiv:2501.03262).

  Args:
    reward_N: [N] scalar reward of each sequence.
    mask_NT: [N, T] validity mask (bool or ``!= 0``).
    kl_NT: optional [N, T] per-token KL estimate (e.g.
      :func:`objectives.kl_penalty`); treated as data (no gradient).
    kl_coef: weight of the KL penalty.

  Returns:
    [N, T] float32 rewards, 0 at masked tokens; rows without a valid token
    are all 0.
  """
  valid_NT = jnp.asarray(mask_NT)
  if valid_NT.dtype != jnp.bool_:
    valid_NT = valid_NT != 0
  chex.assert_rank(valid_NT, 2)
  reward_N = jnp.asarray(reward_N)
  reward_N = reward_N.astype(jnp.promote_types(reward_N.dtype, jnp.float32))
  chex.assert_shape(reward_N, valid_NT.shape[:1])
  n_cols = valid_NT.shape[1]
  # Index of the last valid token: the largest t with a valid entry.
  last_N = jnp.max(jnp.where(valid_NT, jnp.arange(n_cols), -1), axis=-1)
  is_last_NT = jnp.arange(n_cols)[None, :] == last_N[:, None]
  reward_NT = jnp.where(is_last_NT, reward_N[:, None], 0)
  if kl_NT is not None:
    kl_NT = jax.lax.stop_gradient(jnp.asarray(kl_NT, reward_NT.dtype))
    chex.assert_equal_shape([kl_NT, valid_NT])
    reward_NT = reward_NT - kl_coef * kl_NT
  return jnp.where(valid_NT, reward_NT, 0)


def masked_whiten_unbiased(x_NT: jax.typing.ArrayLike,
                           mask_NT: jax.typing.ArrayLike, *,
                           eps: float = 1e-8) -> jax.Array:
  """(x - mean) / sqrt(var + eps) over the valid tokens, Bessel-corrected.

  The statistics of verl's ``masked_whiten`` (verl/utils/torch_functional.py:
  masked mean, ``masked_var`` with the n / (n - 1) correction, rsqrt of
  var + 1e-8), used by its REINFORCE++ advantages. Masked entries are 0; a
  batch with fewer than two valid tokens is returned centred, unscaled.
  """
  x_NT = jnp.asarray(x_NT, jnp.float32)
  valid = jnp.asarray(mask_NT)
  valid = valid if valid.dtype == jnp.bool_ else valid != 0
  chex.assert_equal_shape([x_NT, valid])
  n = jnp.sum(valid).astype(jnp.float32)
  mean = jnp.sum(jnp.where(valid, x_NT, 0)) / jnp.maximum(n, 1)
  sq = jnp.sum(jnp.where(valid, (x_NT - mean) ** 2, 0))
  var = sq / jnp.maximum(n - 1, 1)
  scale = jnp.where(n > 1, jax.lax.rsqrt(var + eps), 1.0)
  return jnp.where(valid, (x_NT - mean) * scale, 0)


def reinforce_pp_token_advantages(
    reward_N: jax.typing.ArrayLike,
    mask_NT: jax.typing.ArrayLike,
    *,
    group_size: int,
    kl_NT: Optional[jax.typing.ArrayLike] = None,
    kl_coef: float = 0.0,
    group_baseline: bool = False,
    gamma: float = 1.0,
) -> jax.Array:
  """REINFORCE++ token advantages, whitened over the batch's tokens.

  Without the group baseline (REINFORCE++, arXiv:2501.03262):
    r_{n,t} = R_n [t last] - kl_coef KL_{n,t}         (token_level_rewards)
    G_{n,t} = sum_{t' >= t} gamma^{t'-t} r_{n,t'}     (token_level_returns)
    A       = whiten(G) over every valid token of the batch
  With the group baseline ("REINFORCE++-baseline"):
    s_n     = R_n - kl_coef sum_t KL_{n,t},   s_n <- s_n - mean_{group} s
    A_{n,t} = whiten(s_n broadcast over its tokens)
  as verl's ``compute_reinforce_plus_plus_outcome_advantage`` and
  ``..._baseline_outcome_advantage`` compute them (whitening with
  :func:`masked_whiten_unbiased`), so long completions weigh more in the
  batch statistics, unlike :func:`reinforce_pp_advantages`.

  Args:
    reward_N: [N] sequence rewards, groups of `group_size` adjacent.
    mask_NT: [N, T] validity mask.
    group_size: G.
    kl_NT: optional [N, T] per-token KL estimate (no gradient).
    kl_coef: weight of the KL in the reward.
    group_baseline: subtract the group mean (the "baseline" variant).
    gamma: discount of the returns (variant without baseline).

  Returns:
    [N, T] float32 advantages, 0 where masked.
  """
  valid = jnp.asarray(mask_NT)
  valid = valid if valid.dtype == jnp.bool_ else valid != 0
  chex.assert_rank(valid, 2)
  n = valid.shape[0]
  if group_size < 1 or n % group_size:
    raise ValueError(f"N={n} rollouts do not split into groups of "
                     f"group_size={group_size}.")
  reward_N = jnp.asarray(reward_N, jnp.float32)
  kl = (jnp.zeros(valid.shape, jnp.float32) if kl_NT is None
        else jax.lax.stop_gradient(jnp.asarray(kl_NT, jnp.float32)))
  if group_baseline:
    s_N = reward_N - kl_coef * jnp.sum(jnp.where(valid, kl, 0), -1)
    s_BG = s_N.reshape(-1, group_size)
    s_N = (s_BG - jnp.mean(s_BG, -1, keepdims=True)).reshape(n)
    x_NT = jnp.broadcast_to(s_N[:, None], valid.shape)
  else:
    r_NT = token_level_rewards(reward_N, valid, kl_NT=kl, kl_coef=kl_coef)
    x_NT = token_level_returns(r_NT, valid, gamma=gamma)
  return masked_whiten_unbiased(x_NT, valid)
