"""Group-relative advantages for outcome rewards (GRPO, Dr.GRPO, RLOO).

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

from typing import Optional

import chex
import jax
import jax.numpy as jnp

__all__ = ["grpo_advantages", "rloo_advantages"]


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
