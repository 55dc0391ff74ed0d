"""XRPO: the rollout allocator, masked group advantages, in-context seeding,
the solution store through a checkpoint, and learning."""

import functools
import json
import math
import os
import shutil
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from configs import smoke
from configs import xrpo as xrpo_config
from rlax_llm import experiment
from rlax_llm.core import allocation
from rlax_llm.core import selection
from rlax_llm.data.tokenizer import CharTokenizer
from rlax_llm.methods import get_method
from rlax_llm.methods import rollouts
from rlax_llm.methods import transforms as tf
from rlax_llm.methods import xrpo
from rlax_llm.training import checkpoint as ckpt_lib
from rlax_llm.training.metrics import read_metrics
from tests import test_learning

ALPHA, COEF = 0.05, 0.1


# -- NumPy references -----------------------------------------------------------


def ref_delta(std, n, alpha=ALPHA):
  """h(n) - h(n + 1) with scipy's t quantiles (float64)."""
  if n < 2:
    return 0.0
  h = lambda m: scipy.stats.t.ppf(1 - alpha / 2, m - 1) * std / math.sqrt(m)
  return h(n) - h(n + 1)


def ref_allocate(std, count, budget, capacity, total, alpha=ALPHA, coef=COEF):
  extra = [0] * len(std)
  for i in range(budget):
    best, arg = -math.inf, None
    for q in range(len(std)):
      n = count[q] + extra[q]
      if n >= capacity:
        continue
      pri = ref_delta(std[q], n, alpha) + coef * math.sqrt(
          math.log(1 + total + i) / n)
      if pri > best:
        best, arg = pri, q
    if arg is not None:
      extra[arg] += 1
  return np.array(extra)


def ref_phases(table, b, g, slots, base, phases, alpha=ALPHA, coef=COEF):
  """The allocation of every phase on a fixed reward table."""
  budgets = xrpo.phase_budgets(b, g, base, phases)
  rewards = [list(table[q][:base]) for q in range(b)]
  out = [np.full(b, base)]
  for budget in budgets[1:]:
    n = [len(r) for r in rewards]
    std = [float(np.std(r, ddof=1)) for r in rewards]
    a = ref_allocate(std, n, budget, slots, sum(n), alpha, coef)
    for q in range(b):
      rewards[q] += list(table[q][n[q]:n[q] + a[q]])
    out.append(a)
  return out


# -- the core -------------------------------------------------------------------


def test_t_critical_matches_scipy():
  df = np.arange(1, 64)
  for alpha in (0.05, 0.2):
    np.testing.assert_allclose(allocation.t_critical(df, alpha=alpha),
                               scipy.stats.t.ppf(1 - alpha / 2, df),
                               rtol=2e-5)
  with pytest.raises(ValueError, match="alpha"):
    allocation.t_critical(3, alpha=1.0)


def test_half_width_reduction_and_bonus_hand_computed():
  # t_{0.975,3} = 3.18245, t_{0.975,4} = 2.77645, s = 0.5:
  # h(4) = 3.18245 * 0.5 / 2 = 0.795612, h(5) = 2.77645 * 0.5 / sqrt(5).
  assert float(allocation.interval_half_width(0.5, 4)) == pytest.approx(
      0.795612, rel=1e-5)
  assert float(allocation.uncertainty_reduction(0.5, 4)) == pytest.approx(
      0.795612 - 0.620832, rel=1e-4)
  assert float(allocation.uncertainty_reduction(0.5, 1)) == 0.0
  # 0.1 * sqrt(log(1 + 63) / 4)
  assert float(allocation.exploration_bonus(4, 63, coef=0.1)) == pytest.approx(
      0.1 * math.sqrt(math.log(64) / 4), rel=1e-6)
  std, n = allocation.group_reward_std(
      jnp.array([[1., 0., 1., 9.], [1., 1., 1., 1.]]),
      jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]]))
  np.testing.assert_allclose(std, [np.std([1, 0, 1], ddof=1), 0.0],
                             rtol=1e-6)
  np.testing.assert_array_equal(n, [3, 1])


def test_reward_std_is_exact_for_binary_rewards_so_ties_are_real():
  """k correct of n and n - k correct of n: bitwise the same std, equal to
  the ddof-1 std; real-valued rewards still match NumPy's two-pass std."""
  std_fn = jax.jit(allocation.group_reward_std)
  for n in (2, 3, 5, 7, 8, 13, 16, 31):
    reward = (np.arange(32)[None, :] < np.arange(n + 1)[:, None]).astype(
        np.float32)  # row k: k correct rewards, then wrong ones
    reward = np.roll(reward, 3, axis=1)  # the first valid slot varies
    valid = np.broadcast_to(np.roll(np.arange(32) < n, 3), reward.shape)
    std, count = map(np.asarray, std_fn(reward, valid))
    np.testing.assert_array_equal(count, n)
    np.testing.assert_array_equal(std, std[::-1], err_msg=f"n={n}")
    want = [np.std(np.r_[np.ones(k), np.zeros(n - k)], ddof=1)
            for k in range(n + 1)]
    np.testing.assert_allclose(std, want, rtol=1e-6)
  # What this removes: two prompts of 2 and 3 correct of 5 had std one bit
  # apart (0.5477226 vs 0.5477225), and the next rollout went to one or the
  # other by the CPU's rounding; now both priorities tie and the lower index
  # gets it, whatever the order of the two prompts.
  std, _ = std_fn(np.array([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], np.float32),
                  None)
  got = allocation.xrpo_allocate(std, jnp.array([5, 5]), 1, capacity=8)
  np.testing.assert_array_equal(got, [1, 0])
  got = allocation.xrpo_allocate(std[::-1], jnp.array([5, 5]), 1, capacity=8)
  np.testing.assert_array_equal(got, [1, 0])
  rng = np.random.default_rng(3)
  reward = (rng.normal(size=(40, 24)) * 3.0 + 50.0).astype(np.float32)
  valid = rng.random((40, 24)) < 0.6
  valid[:, :2] = True
  std, _ = std_fn(reward, valid)
  want = [np.std(reward[i][valid[i]].astype(np.float64), ddof=1)
          for i in range(40)]
  np.testing.assert_allclose(std, want, rtol=2e-6)


def test_allocate_hand_computed():
  # No bonus: Delta(s=.5, n=2) = 3.25 > Delta(.5, 3) = 0.446 > Delta(.5, 4)
  # = 0.175 = prompt 2's (a tie, the lower index wins) > prompt 1's 0.
  std, count = jnp.array([0.5, 0.0, 0.5]), jnp.array([2, 4, 4])
  go = functools.partial(allocation.xrpo_allocate, std, count, coef=0.0)
  np.testing.assert_array_equal(go(2, capacity=8), [2, 0, 0])
  np.testing.assert_array_equal(go(3, capacity=8), [3, 0, 0])
  # Capacity 5: prompt 0 fills to 5, then prompt 2, then prompt 1.
  np.testing.assert_array_equal(go(5, capacity=5), [3, 1, 1])
  # Everything full: nothing more is given out.
  np.testing.assert_array_equal(go(9, capacity=5), [3, 1, 1])
  # The bonus alone (std 0 everywhere) spreads evenly, lowest index first.
  np.testing.assert_array_equal(
      allocation.xrpo_allocate(jnp.zeros(3), jnp.array([2, 2, 2]), 4,
                               capacity=9, coef=1.0), [2, 1, 1])


class AllocateTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy_reference(self):
    rng = np.random.default_rng(0)
    for trial in range(4):
      b = 6
      std = rng.uniform(0, 0.6, b).round(3)
      count = rng.integers(2, 6, b)
      budget, cap = 12, 8
      fn = self.variant(functools.partial(
          allocation.xrpo_allocate, budget=budget, capacity=cap, coef=COEF))
      got = np.asarray(fn(jnp.asarray(std, jnp.float32), jnp.asarray(count)))
      want = ref_allocate(list(std), list(count), budget, cap,
                          int(count.sum()))
      np.testing.assert_array_equal(got, want, err_msg=f"trial {trial}")
      assert got.sum() == budget
      assert np.all(count + got <= cap)


def _primitives_in_while_bodies(jaxpr, inside=False):
  """Names of the primitives inside `while` loop bodies of a jaxpr."""
  found = set()
  for eqn in jaxpr.eqns:
    if inside:
      found.add(eqn.primitive.name)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", None)
        if inner is not None:
          inner = inner if hasattr(inner, "eqns") else inner.jaxpr
          found |= _primitives_in_while_bodies(
              inner, inside or eqn.primitive.name == "while")
  return found


def _allocate_without_table(std_B, count_B, budget, *, capacity, alpha, coef):
  """The greedy loop with `xrpo_priority` evaluated in every iteration."""
  t0 = jnp.sum(count_B)

  def body(i, extra_B):
    n = count_B + extra_B
    pri = allocation.xrpo_priority(std_B, n, t0 + i, alpha=alpha, coef=coef)
    open_B = n < capacity
    pri = jnp.where(open_B, pri, -jnp.inf)
    return extra_B.at[jnp.argmax(pri)].add(jnp.any(open_B).astype(jnp.int32))

  return jax.lax.fori_loop(0, jnp.asarray(budget, jnp.int32), body,
                           jnp.zeros_like(count_B))


def test_allocate_tables_the_critical_values_and_matches_the_priorities():
  """The loop looks the t critical values up (no incomplete beta function
  inside it) and gives out exactly what `xrpo_priority` in every iteration
  gives out, ties included (rewards of 0/1: few distinct stds)."""
  go = lambda s, c: allocation.xrpo_allocate(s, c, 7, capacity=9)
  jaxpr = jax.make_jaxpr(go)(jnp.ones(4), jnp.full(4, 2, jnp.int32)).jaxpr
  assert "regularized_incomplete_beta" not in _primitives_in_while_bodies(
      jaxpr)
  untabled = jax.make_jaxpr(
      lambda c: _allocate_without_table(jnp.ones(4), c, 7, capacity=9,
                                        alpha=ALPHA, coef=COEF))(
                                            jnp.full(4, 2, jnp.int32)).jaxpr
  assert "regularized_incomplete_beta" in _primitives_in_while_bodies(
      untabled)  # what the check finds in the loop of the untabled form
  rng = np.random.default_rng(5)
  # Budgets are traced in both (one program per capacity).
  theirs = jax.jit(_allocate_without_table,
                   static_argnames=("capacity", "alpha", "coef"))
  std_fn = jax.jit(allocation.group_reward_std)
  for trial in range(8):
    b, cap = 12, (5, 16)[trial % 2]
    count = rng.integers(0, cap + 1, b)
    reward = rng.integers(0, 2, (b, cap)).astype(np.float32)
    std, _ = std_fn(reward, np.arange(cap) < count[:, None])
    budget = int(rng.integers(1, 3 * b))
    count = jnp.asarray(count, jnp.int32)
    got = np.asarray(allocation.xrpo_allocate(std, count, budget, capacity=cap,
                                              alpha=ALPHA, coef=COEF))
    want = np.asarray(theirs(std, count, budget, capacity=cap, alpha=ALPHA,
                             coef=COEF))
    np.testing.assert_array_equal(got, want, err_msg=f"trial {trial}")
    assert np.all(np.asarray(count) + got <= cap)


def test_novelty_mean_and_sum():
  logp = np.array([[-1., -1., 0.], [-3., 0., 0.], [-.5, -.5, -.5],
                   [0., 0., 0.]], np.float32)
  mask = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]], bool)
  for norm in (True, False):
    s = [(logp[i][mask[i]].mean() if norm else logp[i][mask[i]].sum())
         for i in range(4) if mask[i].any()]
    want = [math.exp(s[0] - (s[0] + s[1]) / 2),
            math.exp(s[1] - (s[0] + s[1]) / 2), 1.0, 1.0]
    got = selection.xrpo_novelty(logp, mask, 2, length_normalise=norm)
    np.testing.assert_allclose(got, want, rtol=1e-6)
  # Mean: -1 vs -3 per token; sum: -2 vs -3.
  assert not np.allclose(selection.xrpo_novelty(logp, mask, 2),
                         selection.xrpo_novelty(logp, mask, 2,
                                                length_normalise=False))


# -- masked group advantages ------------------------------------------------------


def _groups(reward_BG, valid_BG, t=3):
  b, g = reward_BG.shape
  mask = np.repeat(valid_BG[..., None], t, -1)
  return rollouts.Groups(
      prompt=np.ones((b, 2), np.int32), prompt_mask=np.ones((b, 2), bool),
      tokens=np.ones((b, g, t), np.int32), mask=mask,
      logp=np.where(mask, -0.5, 0.0).astype(np.float32),
      lengths=mask.sum(-1), finished=valid_BG.copy(),
      reward=np.where(valid_BG, reward_BG, 0.0).astype(np.float32),
      texts=np.full((b, g), "x", object), weights=mask.astype(np.float32),
      stats={}, valid=valid_BG)


class _Eng(NamedTuple):
  sequence_advantages: bool = True


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_masked_group_advantages_match_numpy_loop(method):
  rng = np.random.default_rng(3)
  reward = rng.integers(0, 2, (5, 6)).astype(np.float32)
  valid = np.zeros((5, 6), bool)
  for q, n in enumerate([2, 6, 3, 4, 5]):
    valid[q, :n] = True
  reward[~valid] = 7.0  # must not leak into any group statistic
  g = _groups(reward, valid)._replace(reward=reward)
  work = tf.advantage(get_method(method))(
      tf.Work(groups=g, stats={}), tf.StepContext(_Eng(), None, None, 0, 0))
  want = np.zeros_like(reward)
  for q in range(5):
    r = reward[q][valid[q]]
    k = len(r)
    for j in range(k):
      if method == "grpo":
        want[q, j] = (r[j] - r.mean()) / (r.std(ddof=1) + 1e-6)
      else:
        want[q, j] = r[j] - (r.sum() - r[j]) / (k - 1)
  np.testing.assert_allclose(work.adv, want, atol=1e-5)
  assert np.all(work.adv[~valid] == 0)
  batch = tf.to_batch(work)
  assert np.all(batch.weights.reshape(5, 6, -1)[~valid] == 0)


def test_advantage_transform_compiles_once_per_estimator_and_settings():
  """The advantage transform runs the estimator jitted, one program per
  estimator and settings: experiments built in one process (a new
  `get_method` each) share it; other settings get their own, with their own
  values."""
  a, b = get_method("grpo"), get_method("grpo")
  assert a.advantage_fn is not b.advantage_fn
  assert tf._jitted(a.advantage_fn) is tf._jitted(b.advantage_fn)  # pylint: disable=protected-access
  dr = get_method("grpo", scale_by_std=False)
  assert tf._jitted(dr.advantage_fn) is not tf._jitted(a.advantage_fn)  # pylint: disable=protected-access
  reward = np.array([[1., 0., 0., 1.], [1., 1., 1., 0.], [1., 1., 1., 1.]],
                    np.float32)
  g = _groups(reward, np.ones((3, 4), bool))._replace(valid=None)
  ctx = tf.StepContext(_Eng(), None, None, 0, 0)
  got = {m.name + str(i): tf.advantage(m)(tf.Work(groups=g, stats={}), ctx).adv
         for i, m in enumerate((a, dr))}
  centred = reward - reward.mean(-1, keepdims=True)
  std = reward.std(-1, ddof=1, keepdims=True)
  np.testing.assert_allclose(got["grpo1"], centred, atol=1e-6)
  np.testing.assert_allclose(got["grpo0"], centred / (std + 1e-6), atol=1e-5)
  assert np.all(got["grpo0"][2] == 0)  # all rewards equal: exactly 0


def test_masked_reward_stats_and_dynamic_sampling():
  reward = np.array([[1., 1., 0., 0.], [0., 1., 0., 0.]], np.float32)
  valid = np.array([[1, 1, 0, 0], [1, 1, 1, 0]], bool)
  s = rollouts.reward_stats(_groups(reward, valid))
  assert s["reward/mean"] == pytest.approx(3 / 5)
  assert s["reward/solved_groups"] == 0.5  # group 0: all valid correct
  assert s["rollout/distinct_per_group"] == 1.0
  # Group 0's valid rewards agree: dynamic sampling drops it.
  work = tf.dynamic_sampling(max_rounds=1)(
      tf.Work(groups=_groups(reward, valid), stats={}),
      tf.StepContext(_Eng(), None, None, 0, 0))
  assert work.stats["rollout/kept_groups_first_draw"] == 1
  assert work.stats["rollout/filtered_first_draw"] == 0.5


def _variable_work(counts, g=6, t=5, p=4, seed=0):
  """GRPO advantages of groups holding `counts` rollouts in `g` slots, with
  random tokens, lengths, behaviour log-probs and per-row prompts."""
  rng = np.random.default_rng(seed)
  b = len(counts)
  valid = np.arange(g)[None] < np.asarray(counts)[:, None]
  lengths = np.where(valid, rng.integers(1, t + 1, (b, g)), 0)
  mask = np.arange(t) < lengths[..., None]
  tokens = np.where(mask, rng.integers(1, 19, (b, g, t)), 0).astype(np.int32)
  logp = np.where(mask, rng.normal(-2.0, 0.3, (b, g, t)), 0.0)
  groups = _groups(rng.integers(0, 2, (b, g)).astype(np.float32), valid, t)
  groups = groups._replace(
      tokens=tokens, mask=mask, logp=logp.astype(np.float32),
      lengths=lengths, weights=mask.astype(np.float32),
      row_prompt=rng.integers(2, 19, (b, g, p)).astype(np.int32),
      row_prompt_mask=np.ones((b, g, p), bool))
  return tf.advantage(get_method("grpo"))(
      tf.Work(groups=groups, stats={}), tf.StepContext(_Eng(), None, None, 0, 0))


def test_batch_of_variable_groups_keeps_the_valid_slots():
  work = _variable_work([2, 6, 3, 5])  # 16 rollouts in 4 x 6 slots
  full = tf.to_batch(work)
  assert full.completion.shape == (24, 5)
  valid = work.groups.valid.reshape(24)
  want = np.flatnonzero(valid)  # in group order
  compact = tf.to_batch(work, rows=16)
  for name, a, b in zip(full._fields, full, compact):
    if a is not None:
      np.testing.assert_array_equal(np.asarray(a)[want], b, err_msg=name)
  # Fewer rollouts than rows: filled with empty slots (no token, weight 0).
  padded = tf.to_batch(work, rows=20)
  np.testing.assert_array_equal(padded.completion[:16], compact.completion)
  assert not padded.completion_mask[16:].any()
  assert not padded.weights[16:].any() and not padded.advantages[16:].any()
  # More than rows (dynamic sampling keeps the fuller groups): all slots.
  assert tf.to_batch(work, rows=12).completion.shape == (24, 5)
  assert tf.to_batch(_variable_work([6, 6, 6, 6]), rows=16).completion.shape \
      == (24, 5)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean",
                                         "seq_mean_token_sum_norm"])
def test_update_over_valid_slots_equals_the_update_over_all(aggregation):
  # pylint: disable=g-import-not-at-top
  import optax
  from rlax_llm.parallel.mesh import make_mesh
  from rlax_llm.training import state as state_lib
  from rlax_llm.training import steps as steps_lib
  from tests.test_steps import CFG_1LAYER
  # pylint: enable=g-import-not-at-top
  work = _variable_work([2, 6, 3, 5], seed=1)
  opt = optax.sgd(100.0)  # the change -lr * gradient, far above rounding
  state, _ = state_lib.create_train_state(CFG_1LAYER, opt, make_mesh(),
                                          seed=0)
  step = jax.jit(steps_lib.make_rl_step(
      state_lib.model_graphdef(CFG_1LAYER), opt,
      get_method("grpo", aggregation=aggregation,
                 max_new_tokens=5).policy_loss, num_microbatches=2))
  deltas, metrics = [], []
  for rows in (None, 16):
    new, m = step(state, tf.to_batch(work, rows=rows))
    deltas.append(jax.tree.leaves(jax.tree.map(
        lambda a, b: np.asarray(a - b), new.params, state.params)))
    metrics.append(m)
  assert np.abs(deltas[0][0]).max() > 0  # it did update
  for a, b in zip(*deltas):
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max()
                               + 2.5e-7)
  for k in ("loss", "grad_norm", "entropy", "clip_frac"):
    np.testing.assert_allclose(metrics[1][k], metrics[0][k], rtol=1e-5,
                               atol=1e-7, err_msg=k)


def test_sampled_tokens_over_draws_and_engines():
  reward = np.array([[1., 1., 0., 0.], [0., 1., 0., 0.]], np.float32)
  valid = np.array([[1, 1, 0, 0], [1, 1, 1, 0]], bool)
  g = _groups(reward, valid, t=3)
  assert rollouts.sampled_tokens(g) == 3 * 5  # valid slots' tokens
  # An engine's own count (a tree's shared prefixes once) comes first.
  assert rollouts.sampled_tokens(g._replace(
      stats={"rollout/sampled_tokens": 7})) == 7
  # Dynamic sampling adds each further draw's tokens to the first draw's.
  draws = {1: _groups(np.ones((2, 4), np.float32), np.ones((2, 4), bool)),
           2: _groups(reward, valid)}  # draw 1's groups all agree: dropped
  work = tf.apply_chain([tf.dynamic_sampling(max_rounds=3)], g,
                        tf.StepContext(_Eng(), draws.__getitem__, None, 0, 0))
  assert work.stats["rollout/sampling_rounds"] == 3
  assert work.stats["rollout/sampled_tokens"] == 15 + 3 * 8 + 15


def test_length_of_correct_and_wrong_rollouts():
  rng = np.random.default_rng(0)
  reward = rng.integers(0, 2, (4, 5)).astype(np.float32)
  reward[3] = 0.0  # a group with no correct row
  lengths = rng.integers(1, 30, (4, 5))
  for valid in (None, rng.random((4, 5)) < 0.7):
    v = np.ones((4, 5), bool) if valid is None else valid
    g = _groups(reward, v)._replace(lengths=lengths, valid=valid)
    s = rollouts.reward_stats(g)
    right = [lengths[i, j] for i in range(4) for j in range(5)
             if v[i, j] and reward[i, j] >= 0.5]
    wrong = [lengths[i, j] for i in range(4) for j in range(5)
             if v[i, j] and reward[i, j] < 0.5]
    assert s["rollout/length_correct"] == pytest.approx(np.mean(right))
    assert s["rollout/length_wrong"] == pytest.approx(np.mean(wrong))
    assert s["rollout/rollouts"] == v.sum()
  # No correct rollout at all: the key is absent, not a NaN or a 0.
  s = rollouts.reward_stats(_groups(np.zeros((2, 3), np.float32),
                                    np.ones((2, 3), bool)))
  assert "rollout/length_correct" not in s
  assert s["rollout/length_wrong"] == 3.0


# -- the engine on synthetic rollouts -------------------------------------------


class Problem(NamedTuple):
  prompt: str
  answer: int


class FakeTask:
  """Step s draws prompts "{s}{i}+{i}=", answer i (the prompt's index)."""

  def train_batch(self, step, n, draw=0):
    return [Problem(f"{step + 10 * draw}{i}+{i}=", i) for i in range(n)]


class Table:
  """Reward of the k-th rollout of prompt q at step s: table[q][k] (the
  same table each step); seeded rollouts can be given their own table."""

  def __init__(self, table, seeded=None):
    self.table, self.seeded = table, seeded
    self.calls = []  # (prompt texts of each sampled row)
    self.count = {}

  def sample(self, tok, t):
    def fn(params, prompt, mask, key, num_samples):
      del params, key
      texts = [tok.decode(list(p[m])) for p, m in zip(prompt, mask)]
      texts = [x for x in texts for _ in range(num_samples)]
      self.calls.append(texts)
      n = len(texts)
      tokens = np.full((n, t), 0, np.int32)
      tokens[:, 0] = tok.encode("7")[0]
      mask_nt = np.zeros((n, t), bool)
      mask_nt[:, 0] = True
      return xrpo._Rows(tokens, mask_nt, np.full((n, t), -0.25, np.float32),
                        np.ones(n, np.int32), np.ones(n, bool))
    return fn

  def score(self, texts, answers):
    seeded = [" " in p for p in self.calls[-1]]
    out = []
    for q, sd in zip(answers, seeded):
      k = self.count.get(q, 0)
      self.count[q] = k + 1
      out.append(self.seeded[q] if sd and self.seeded is not None
                 else self.table[q][k])
    return np.array(out, np.float32), 0


def _engine(table, *, b, g, seeded=None, **fields):
  tok = CharTokenizer()
  t = 3
  ctx = rollouts.RolloutContext(
      graphdef=None, mesh=None, sampler=None, tokenizer=tok, task=FakeTask(),
      score=table.score, decode=lambda tokens, mask: [
          f"{i}" for i in range(len(tokens))],
      key=jax.random.key(0), prompt_len=8, max_new_tokens=t, num_prompts=b,
      num_samples=g)
  section = dict(name="xrpo", seeding=False, explore_coef=COEF)
  section.update(fields)
  eng = xrpo.XrpoRollout.from_section(ctx, section)
  eng.sample_fn = table.sample(tok, t)
  return eng


def _per_phase(table, b):
  """Rollouts each prompt got in each sampling call."""
  out = []
  for texts in table.calls:
    qs = [int(x.split(" ")[-1].split("+")[0][-1]) for x in texts]
    out.append(np.bincount(qs, minlength=b))
  return out


TABLES = {
    # Prompt 0 mixed, 1 all right, 2 all wrong, 3 mixed late, 4 one right.
    "mixed": [[1, 0] * 8, [1] * 16, [0] * 16, [0, 0, 1, 0] * 4,
              [1] + [0] * 15],
    "uniform": [[0] * 16] * 5,
}


@pytest.mark.parametrize("name", sorted(TABLES))
@pytest.mark.parametrize("phases", [2, 3, 4])
def test_engine_allocates_phase_by_phase_like_the_reference(name, phases):
  b, g = 5, 4
  table = Table(TABLES[name])
  eng = _engine(table, b=b, g=g, phases=phases)
  groups = eng.rollout(None, 0)
  got = _per_phase(table, b)
  want = ref_phases(TABLES[name], b, g, 2 * g, 2, phases)
  assert len(got) == len(want)
  for k, (x, y) in enumerate(zip(got, want)):
    np.testing.assert_array_equal(x, y, err_msg=f"phase {k + 1}")
  # The budget is spent exactly; no prompt exceeds its slots.
  n = groups.valid.sum(-1)
  assert n.sum() == b * g and n.max() <= 2 * g
  np.testing.assert_array_equal(n, sum(want))
  # Each group holds its table's rewards in the order sampled.
  for q in range(b):
    np.testing.assert_array_equal(groups.reward[q, :n[q]],
                                  TABLES[name][q][:n[q]])
    assert not groups.mask[q, n[q]:].any()
  st = groups.stats
  assert st["rollout/xrpo_alloc_max"] == n.max()
  assert st["rollout/xrpo_alloc_min"] == n.min()
  if name == "mixed":
    assert n.max() > n.min()  # variable allocation


def test_engine_is_deterministic_and_draws_other_prompts():
  a, b_ = Table(TABLES["mixed"]), Table(TABLES["mixed"])
  ga = _engine(a, b=5, g=4).rollout(None, 3)
  gb = _engine(b_, b=5, g=4).rollout(None, 3)
  for x, y in zip(ga, gb):
    if isinstance(x, np.ndarray):
      np.testing.assert_array_equal(x, y)
  assert a.calls == b_.calls
  c = Table(TABLES["mixed"])
  _engine(c, b=5, g=4).rollout(None, 3, draw=1)
  assert c.calls[0][0] != a.calls[0][0]


def test_settings_are_checked():
  with pytest.raises(ValueError, match="phases"):
    _engine(Table(TABLES["mixed"]), b=5, g=4, phases=1)
  with pytest.raises(ValueError, match="does not know"):
    _engine(Table(TABLES["mixed"]), b=5, g=4, budget=3)
  with pytest.raises(ValueError, match="num_samples"):
    _engine(Table(TABLES["mixed"]), b=5, g=1)


# -- in-context seeding ----------------------------------------------------------


def test_seeded_prompt_text_and_store():
  assert xrpo.seeded_prompt("5+9=", [("3+4=", "7"), ("12*3=", "36")]) == (
      "3+4=7 12*3=36 5+9=")
  store = xrpo.SolutionStore(3)
  for p, s in [("1+1=", "2"), ("2+2=", "4"), ("9*9=", "81"), ("1+1=", "2"),
               ("3+3=", "6")]:
    store.add(p, s)
  assert store.items == [("9*9=", "81"), ("1+1=", "2"), ("3+3=", "6")]
  # Most similar first; the prompt's own solution is never offered.
  assert store.retrieve("3+3=", 2) == [("1+1=", "2"), ("9*9=", "81")]
  assert store.retrieve("9*9=", 1)[0][0] != "9*9="
  back = xrpo.SolutionStore(3)
  back.load_state_dict(json.loads(json.dumps(store.state_dict())))
  assert back.items == store.items


def test_seeding_only_all_wrong_prompts_and_conditions_on_them():
  b, g = 5, 4
  table = Table(TABLES["mixed"], seeded=[1.0] * b)
  eng = _engine(table, b=b, g=g, seeding=True, seed_prompt_len=24)
  eng.store.add("77+1=", "78")
  eng.store.add("55+5=", "60")
  groups = eng.rollout(None, 0)
  tok = CharTokenizer()
  seeded = {x for call in table.calls[1:] for x in call if " " in x}
  # Prompts 2 and 3 have no correct rollout after phase 1 (their first two
  # rewards: [1, 0], [1, 1], [0, 0], [0, 0], [1, 0]).
  # Neither stored prompt shares a trigram with them: newest first.
  assert seeded == {"55+5=60 77+1=78 02+2=", "55+5=60 77+1=78 03+3="}
  assert not any(" " in x for x in table.calls[0])
  assert groups.stats["rollout/xrpo_seeded_prompts"] == 2
  # A newly seeded prompt first gets `base` rollouts of phase 2.
  assert _per_phase(table, b)[1][2] >= 2
  # Each row carries the prompt it was sampled from; the batch uses it.
  batch = tf.to_batch(tf.Work(groups=groups,
                              adv=np.zeros(groups.reward.shape), stats={}))
  n = groups.valid.sum(-1)
  m = groups.tokens.shape[1]
  for q in range(b):
    for j in range(m):
      text = tok.decode(list(batch.prompt[q * m + j][
          batch.prompt_mask[q * m + j]]))
      if j < eng.base or q not in (2, 3) or j >= n[q]:
        assert text == f"0{q}+{q}=", (q, j, text)
      else:
        assert text == f"55+5=60 77+1=78 0{q}+{q}=", (q, j, text)
  # Seeded rollouts were all correct: the seeded prompts are recorded.
  assert groups.stats["rollout/xrpo_seeded_solved"] == 2
  stored = dict(eng.store.items)
  assert set(stored) == {"77+1=", "55+5=", "00+0=", "01+1=", "02+2=",
                         "03+3=", "04+4="}
  # Off: nothing is seeded even with a full store.
  off = Table(TABLES["mixed"])
  eng2 = _engine(off, b=b, g=g, seeding=False)
  eng2.store.add("77+1=", "78")
  eng2.rollout(None, 0)
  assert not any(" " in x for c in off.calls for x in c)


def test_seeding_needs_a_stored_solution_that_fits():
  table = Table(TABLES["uniform"])
  eng = _engine(table, b=5, g=4, seeding=True, seed_prompt_len=12)
  eng.rollout(None, 0)  # empty store: nothing to seed with
  assert not any(" " in x for c in table.calls for x in c)
  eng.store.add("7777+1111=", "8888")  # too long for 12 tokens with a prompt
  table.calls.clear()
  table.count.clear()
  eng.rollout(None, 1)
  assert not any(" " in x for c in table.calls for x in c)


# -- through the experiment: refusals, checkpoint round trip, learning ---------


def _easy(rl_steps, learning_rate=3e-4):
  """test_learning's easy XRPO setup, at 8 prompts x 4 samples."""
  c = test_learning._easy("xrpo", rl_steps=rl_steps,  # pylint: disable=protected-access
                          learning_rate=learning_rate)
  c.rl.prompts_per_step = 8
  c.rl.num_samples = 4
  c.eval.every = 1000
  c.eval.num_problems = smoke.get_config().eval.num_problems
  c.checkpoint.every = smoke.get_config().checkpoint.every
  return c


def test_token_level_advantages_are_refused(tmp_path):
  c = smoke.shrink(xrpo_config.get_config())
  c.rl.method = "reinforce_pp"
  c.rl.xrpo_lambda = 0.0
  c.rl.token_level_advantages = True
  with pytest.raises(ValueError, match="token_level_advantages.*xrpo"):
    experiment.Experiment(c, str(tmp_path))
  c = smoke.shrink(xrpo_config.get_config())
  c.rl.xrpo_novelty = "median"
  with pytest.raises(ValueError, match="xrpo_novelty"):
    experiment.Experiment(c, str(tmp_path / "b"))


def test_store_round_trips_through_a_checkpoint_and_resume_matches(tmp_path):
  c = _easy(rl_steps=4)
  c.checkpoint.every = 122  # checkpoints at the switch (120), 122, the end
  c.checkpoint.max_to_keep = 5
  full = tmp_path / "full"
  experiment.run(c, str(full))
  ckpt = ckpt_lib.Checkpointer(str(full / "checkpoints"))
  meta = ckpt.restore_meta(122)
  items = meta["rollout_state"]["store"]["items"]
  assert items, "no solution recorded by step 122: the check would be empty"
  rec = {r["step"]: r for r in read_metrics(str(full / "metrics.jsonl"))}
  assert rec[122]["rollout/xrpo_store_size"] == len(items)
  # Resume from step 122: copy the run and drop what came later.
  part = tmp_path / "part"
  shutil.copytree(full, part)
  shutil.rmtree(part / "checkpoints" / "124")
  os.remove(part / "summary.json")
  experiment.run(c, str(part))
  strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith(
      "time/")} for r in rs]
  assert strip(read_metrics(str(part / "metrics.jsonl"))) == strip(
      read_metrics(str(full / "metrics.jsonl")))
  # Without the store the resumed steps differ (the test can fail).
  lost = tmp_path / "lost"
  shutil.copytree(part, lost)
  shutil.rmtree(lost / "checkpoints" / "124")
  os.remove(lost / "summary.json")
  exp = experiment.Experiment(c, str(lost))
  exp.engine.load_state_dict = lambda state: None
  exp.run()
  got = {r["step"]: r for r in read_metrics(str(lost / "metrics.jsonl"))}
  assert (got[123]["rollout/xrpo_store_size"]
          != rec[123]["rollout/xrpo_store_size"])
