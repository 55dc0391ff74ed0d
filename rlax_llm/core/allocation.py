"""XRPO's rollout allocator: where the next rollouts of a step go.

"XRPO: Pushing the limits of GRPO with Targeted Exploration and
Exploitation" (arXiv:2510.06672, Sec. "hierarchical rollout planning")
spreads a fixed budget of rollouts over a step's prompts in phases: every
prompt first gets a base number of rollouts, then each later phase gives its
share of the budget to the prompts of highest priority

  Pi_q = Delta_q(n_q) + phi_q(T, n_q)

  h_q(n)        = t_{1 - alpha/2, n - 1} * s_q / sqrt(n)  (t-interval
                                                           half-width of the
                                                           prompt's mean reward)
  Delta_q(n)    = h_q(n) - h_q(n + 1)                     (uncertainty removed
                                                           by one more rollout,
                                                           s_q held fixed)
  phi_q(T, n)   = coef * sqrt(log(1 + T) / n)             (UCB-style bonus)

with n_q the prompt's rollouts so far, s_q the sample standard deviation of
their rewards (n - 1 in the denominator) and T the rollouts of the step so
far. Inside a phase the budget is handed out one rollout at a time, each to
the current highest priority with the counts already planned in the phase
(a prompt's s_q only changes once the phase's rollouts are scored), so a
phase is a greedy water-filling of Delta + phi. Ties go to the lower index.

The t critical value is computed in JAX by bisection on the Student-t CDF
(`jax.scipy.special.betainc`), so every function here is jit-able.
"""

from __future__ import annotations

import functools
from typing import Optional

import chex
import jax
import jax.numpy as jnp

from rlax_llm.core import aggregation as agg

__all__ = [
    "exploration_bonus",
    "group_reward_std",
    "interval_half_width",
    "t_critical",
    "uncertainty_reduction",
    "xrpo_allocate",
    "xrpo_priority",
]

_BISECTION_STEPS = 64


def t_critical(df: jax.typing.ArrayLike, *, alpha: float = 0.05) -> jax.Array:
  """t_{1 - alpha/2, df}: the two-sided (1 - alpha) Student-t critical value.

    P(|t_df| > c) = I_{df / (df + c^2)}(df / 2, 1 / 2) = alpha

  solved for x = df / (df + c^2) by bisection (the regularised incomplete
  beta I_x is increasing in x), then c = sqrt(df (1 - x) / x).

  Args:
    df: degrees of freedom (>= 1), any shape; float or int.
    alpha: two-sided level, in (0, 1).

  Returns:
    f32 critical values, the shape of `df`.
  """
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"alpha must be in (0, 1), got {alpha}.")
  df = jnp.maximum(jnp.asarray(df, jnp.float32), 1.0)
  a = df / 2.0

  def body(_, lo_hi):
    lo, hi = lo_hi
    mid = 0.5 * (lo + hi)
    below = jax.scipy.special.betainc(a, 0.5, mid) < alpha
    return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

  lo, hi = jax.lax.fori_loop(0, _BISECTION_STEPS, body,
                             (jnp.zeros_like(df), jnp.ones_like(df)))
  x = 0.5 * (lo + hi)
  return jnp.sqrt(df * (1.0 - x) / x)


def group_reward_std(reward_BG: jax.typing.ArrayLike,
                     valid_BG: Optional[jax.typing.ArrayLike] = None
                     ) -> tuple[jax.Array, jax.Array]:
  """(s_B, n_B): sample std (ddof 1) and count of each group's valid rewards.

  s is 0 for groups with fewer than two valid rewards.

  The variance is the shifted-data form (n sum d^2 - (sum d)^2) / (n (n - 1))
  with d = r - c, c the group's first valid reward. For 0/1 rewards every
  term is an integer, exact in f32 (n up to 4096), so a group with k correct
  rewards and one with n - k have bitwise the same s: the allocator's ties
  between them are real ties, broken by the lower index, not by how the
  compiler rounded k / n. (A two-pass form, mean first, gives the two s that
  differ in the last bit, and which prompt gets the next rollout then
  depends on the CPU and the XLA flags.)

  Args:
    reward_BG: [B, G] rewards.
    valid_BG: optional [B, G] mask of the slots that hold a rollout.

  Returns:
    ([B] f32 std, [B] int32 counts).
  """
  reward_BG = jnp.asarray(reward_BG, jnp.float32)
  chex.assert_rank(reward_BG, 2)
  valid = (jnp.ones(reward_BG.shape, bool) if valid_BG is None
           else agg.as_bool_mask(valid_BG))
  chex.assert_equal_shape([reward_BG, valid])
  n = jnp.sum(valid, -1)
  first = jnp.take_along_axis(reward_BG, jnp.argmax(valid, -1)[:, None], -1)
  dev = jnp.where(valid, reward_BG - first, 0.0)
  nf = n.astype(jnp.float32)
  ss = nf * jnp.sum(dev * dev, -1) - jnp.square(jnp.sum(dev, -1))
  var = jnp.maximum(ss, 0.0) / jnp.maximum(nf * (nf - 1.0), 1.0)
  return jnp.where(n >= 2, jnp.sqrt(var), 0.0), n.astype(jnp.int32)


def interval_half_width(std: jax.typing.ArrayLike, n: jax.typing.ArrayLike,
                        *, alpha: float = 0.05) -> jax.Array:
  """h(n) = t_{1-alpha/2, n-1} * std / sqrt(n); 0 where n < 2."""
  n = jnp.asarray(n, jnp.float32)
  return _half_width(t_critical(n - 1.0, alpha=alpha), std, n)


def _half_width(t_crit, std, n):
  """h(n) given its critical value t_{1-alpha/2, n-1} (f32 `n`)."""
  std = jnp.asarray(std, jnp.float32)
  h = t_crit * std / jnp.sqrt(jnp.maximum(n, 1.0))
  return jnp.where(n >= 2, h, 0.0)


def uncertainty_reduction(std: jax.typing.ArrayLike,
                          n: jax.typing.ArrayLike, *,
                          alpha: float = 0.05) -> jax.Array:
  """Delta(n) = h(n) - h(n + 1) at a fixed std (0 where n < 2)."""
  n = jnp.asarray(n, jnp.float32)
  return _reduction(lambda m: interval_half_width(std, m, alpha=alpha), n)


def _reduction(half_width, n):
  """Delta(n) = h(n) - h(n + 1) for the half-width function `half_width`."""
  return jnp.where(n >= 2, half_width(n) - half_width(n + 1), 0.0)


def exploration_bonus(n: jax.typing.ArrayLike, total: jax.typing.ArrayLike,
                      *, coef: float = 0.1) -> jax.Array:
  """phi(T, n) = coef * sqrt(log(1 + T) / n) (n clipped to >= 1)."""
  n = jnp.maximum(jnp.asarray(n, jnp.float32), 1.0)
  total = jnp.maximum(jnp.asarray(total, jnp.float32), 0.0)
  return coef * jnp.sqrt(jnp.log1p(total) / n)


def xrpo_priority(std: jax.typing.ArrayLike, n: jax.typing.ArrayLike,
                  total: jax.typing.ArrayLike, *, alpha: float = 0.05,
                  coef: float = 0.1) -> jax.Array:
  """Pi = Delta(n) + phi(T, n): XRPO's priority for one more rollout."""
  return (uncertainty_reduction(std, n, alpha=alpha)
          + exploration_bonus(n, total, coef=coef))


def xrpo_allocate(std_B: jax.typing.ArrayLike, count_B: jax.typing.ArrayLike,
                  budget: int, *, capacity: int,
                  total: Optional[jax.typing.ArrayLike] = None,
                  alpha: float = 0.05, coef: float = 0.1) -> jax.Array:
  """One phase of XRPO's allocator: `budget` rollouts spread by priority.

    repeat budget times:
      q* = argmax_{q : n_q + a_q < capacity} Pi(s_q, n_q + a_q, T)
      a_{q*} += 1;  T += 1

  Rollouts that find no prompt below `capacity` are not given out (the
  returned counts then sum to less than `budget`).

  Args:
    std_B: [B] reward standard deviations s_q (e.g. `group_reward_std`).
    count_B: [B] rollouts each prompt already has (n_q).
    budget: rollouts to give out in this phase (a Python int >= 0; one
      compiled program serves every value).
    capacity: most rollouts a prompt may hold (slots per group).
    total: T at the phase's start; default sum(count_B).
    alpha: the t-interval's two-sided level.
    coef: the exploration bonus' scale.

  Returns:
    [B] int32 rollouts given to each prompt in this phase.
  """
  std_B = jnp.asarray(std_B, jnp.float32)
  count_B = jnp.asarray(count_B, jnp.int32)
  chex.assert_rank(std_B, 1)
  chex.assert_equal_shape([std_B, count_B])
  if budget < 0:
    raise ValueError(f"budget must be >= 0, got {budget}.")
  if total is not None:
    total = jnp.asarray(total, jnp.int32)
  return _allocate_phase(std_B, count_B, jnp.asarray(budget, jnp.int32), total,
                         capacity=capacity, alpha=alpha, coef=coef)


@functools.partial(jax.jit, static_argnames=("capacity", "alpha", "coef"))
def _allocate_phase(std_B, count_B, budget, total, *, capacity, alpha, coef):
  """xrpo_allocate's greedy loop, compiled once per (shape, statics).

  The budget is traced (the loop is a while loop), so a host that calls the
  allocator with a different budget every phase compiles it once.

  A prompt's count only takes the values 0 .. capacity inside the loop
  (a full prompt is never picked), so the critical values t_{1-alpha/2, n-1}
  of h(n) and h(n + 1) are computed once, for n = 0 .. capacity + 1, and
  looked up: each rollout handed out then costs a few operations per prompt
  instead of two bisections over the incomplete beta function per prompt.
  The priorities are `xrpo_priority`'s formula; compiled in another program
  they may differ from its values in the last bit, so two prompts within
  rounding of each other could swap, but exact ties (equal std and count:
  `group_reward_std` is exact for 0/1 rewards) stay ties.
  """
  t0 = jnp.sum(count_B) if total is None else total
  table = t_critical(jnp.arange(capacity + 2, dtype=jnp.float32) - 1.0,
                     alpha=alpha)

  def half_width(n):  # h(n) with the tabled critical value
    t_crit = table[jnp.clip(n, 0, capacity + 1)]
    return _half_width(t_crit, std_B, n.astype(jnp.float32))

  def body(i, extra_B):
    n = count_B + extra_B
    pri = _reduction(half_width, n) + exploration_bonus(n, t0 + i, coef=coef)
    open_B = n < capacity
    pri = jnp.where(open_B, pri, -jnp.inf)
    j = jnp.argmax(pri)
    return extra_B.at[j].add(jnp.any(open_B).astype(jnp.int32))

  return jax.lax.fori_loop(0, budget, body, jnp.zeros_like(count_B))
