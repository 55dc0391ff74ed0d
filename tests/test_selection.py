"""Tests for rlax_llm.core.selection."""

import functools

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlax_llm.core import advantages
from rlax_llm.core import selection

VARIANTS = [pytest.param(lambda f: f, id="eager"),
            pytest.param(jax.jit, id="jit")]
PROPERTY_SETTINGS = settings(max_examples=20, deadline=None, database=None)


def reference_dynamic_sampling(reward_BG, mask_BG=None):
  keep_B = np.zeros(reward_BG.shape[0], bool)
  for b in range(reward_BG.shape[0]):
    values = [float(reward_BG[b, g]) for g in range(reward_BG.shape[1])
              if mask_BG is None or mask_BG[b, g]]
    keep_B[b] = len(values) >= 2 and min(values) != max(values)
  return keep_B


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("masked", [False, True])
def test_dynamic_sampling_matches_reference(variant, masked):
  rng = np.random.default_rng(0)
  reward_BG = rng.integers(0, 2, (12, 4)).astype(np.float32)
  mask_BG = rng.random((12, 4)) < 0.7 if masked else None
  if masked:
    reward_BG[~mask_BG] = np.nan
  keep_B = variant(selection.dynamic_sampling_mask)(reward_BG,
                                                     mask_BG=mask_BG)
  want_B = reference_dynamic_sampling(reward_BG, mask_BG)
  assert keep_B.dtype == jnp.bool_
  np.testing.assert_array_equal(keep_B, want_B)
  assert 0 < want_B.sum() < 12


def test_dynamic_sampling_hand_computed():
  reward_BG = jnp.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0],
                         [0.5, 0.5, 0.2]])
  np.testing.assert_array_equal(selection.dynamic_sampling_mask(reward_BG),
                                [False, False, True, True])
  mask_BG = jnp.array([[1, 1, 1], [1, 1, 1], [1, 0, 1], [1, 1, 0]])
  np.testing.assert_array_equal(
      selection.dynamic_sampling_mask(reward_BG, mask_BG=mask_BG),
      [False, False, False, False])


@PROPERTY_SETTINGS
@given(seed=st.integers(0, 2**32 - 1), group_size=st.sampled_from([1, 2, 8]))
def test_dropped_groups_are_exactly_the_zero_advantage_groups(seed,
                                                              group_size):
  rng = np.random.default_rng(seed)
  reward_BG = rng.integers(0, 2, (6, group_size)).astype(np.float32)
  mask_BG = rng.random((6, group_size)) < 0.8
  keep_B = np.asarray(jax.jit(selection.dynamic_sampling_mask)(
      reward_BG, mask_BG=mask_BG))
  adv_BG = np.asarray(advantages.grpo_advantages(reward_BG, mask_BG=mask_BG))
  np.testing.assert_array_equal(keep_B, np.any(adv_BG != 0, axis=-1))


def reference_overlong(length, max_length, cache_length):
  if length <= max_length - cache_length:
    return 0.0
  if length <= max_length:
    return ((max_length - cache_length) - length) / cache_length
  return -1.0


@pytest.mark.parametrize("variant", VARIANTS)
def test_overlong_penalty_matches_reference(variant):
  length_N = np.arange(0, 40, 3)
  fn = variant(functools.partial(selection.overlong_penalty, max_length=30,
                                 cache_length=8))
  got_N = fn(length_N)
  assert got_N.dtype == jnp.float32
  np.testing.assert_allclose(
      got_N, [reference_overlong(int(n), 30, 8) for n in length_N],
      rtol=1e-6, atol=1e-7)


def test_overlong_penalty_hand_computed():
  # DAPO's setting: L = 20480, C = 4096, expected length 16384.
  got_N = selection.overlong_penalty(
      jnp.array([100, 16384, 16385, 18432, 20480, 20481]), max_length=20480,
      cache_length=4096)
  np.testing.assert_allclose(got_N, [0.0, 0.0, -1 / 4096, -0.5, -1.0, -1.0],
                             rtol=1e-6, atol=1e-8)
  with pytest.raises(ValueError, match="cache_length"):
    selection.overlong_penalty(jnp.array([1]), max_length=10, cache_length=11)
  with pytest.raises(ValueError, match="cache_length"):
    selection.overlong_penalty(jnp.array([1]), max_length=10, cache_length=0)


@PROPERTY_SETTINGS
@given(lengths=st.lists(st.integers(0, 100), min_size=2, max_size=2))
def test_overlong_penalty_is_monotone_and_bounded(lengths):
  short, long = sorted(lengths)
  got_N = np.asarray(selection.overlong_penalty(
      jnp.array([short, long]), max_length=64, cache_length=16))
  assert -1 <= got_N[1] <= got_N[0] <= 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_truncation_mask(variant):
  mask_NT = np.array([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
  truncated_N = np.array([False, True, True])
  got_NT = variant(selection.truncation_mask)(mask_NT, truncated_N)
  assert got_NT.dtype == jnp.bool_
  np.testing.assert_array_equal(got_NT, [[1, 1, 0], [0, 0, 0], [0, 0, 0]])
  rng = np.random.default_rng(1)
  mask_NT = rng.random((6, 5)) < 0.7
  truncated_N = rng.random(6) < 0.5
  want_NT = np.array([[mask_NT[n, t] and not truncated_N[n]
                       for t in range(5)] for n in range(6)])
  np.testing.assert_array_equal(
      variant(selection.truncation_mask)(mask_NT.astype(np.float32),
                                         truncated_N), want_NT)


# ---------------------------------------------------------------- D^3S ------

import itertools  # noqa: E402

from rlax_llm.core.selection import d3s_sample_mask  # noqa: E402
from rlax_llm.core.selection import d3s_token_mask  # noqa: E402
from rlax_llm.core.selection import linear_schedule  # noqa: E402


def _brute_force_best_variance(adv, valid, k):
  idx = [i for i in range(len(adv)) if valid[i]]
  best = -1.0
  for subset in itertools.combinations(idx, min(k, len(idx))):
    vals = np.array([adv[i] for i in subset], np.float64)
    best = max(best, float(vals.var()) if len(vals) else 0.0)
  return best


@pytest.mark.parametrize("jit", [False, True])
def test_d3s_sample_mask_reaches_the_brute_force_optimum(jit):
  rng = np.random.default_rng(0)
  fn = (jax.jit(d3s_sample_mask, static_argnums=1) if jit
        else d3s_sample_mask)
  for trial in range(12):
    n = 9
    adv = rng.normal(size=n).round(2)
    valid = rng.random(n) > 0.2
    k = int(rng.integers(1, n + 1))
    keep = np.asarray(fn(jnp.asarray(adv), k, mask_N=jnp.asarray(valid)))
    assert keep.sum() == min(k, valid.sum()), trial
    assert not (keep & ~valid).any()
    got = float(adv[keep].var()) if keep.any() else 0.0
    np.testing.assert_allclose(got, _brute_force_best_variance(adv, valid, k),
                               atol=1e-6)


def test_d3s_sample_mask_hand_case():
  # Budget 2 of [0, 5, 1, -3]: the extremes -3 and 5 (variance 16).
  keep = d3s_sample_mask(jnp.array([0.0, 5.0, 1.0, -3.0]), 2)
  np.testing.assert_array_equal(np.asarray(keep), [False, True, False, True])
  assert not np.asarray(d3s_sample_mask(jnp.ones(3), 0)).any()


def test_d3s_token_mask_keeps_the_top_fraction():
  adv = jnp.array([1.0, -2.0])
  ent = jnp.array([[0.5, 0.1, 0.9], [0.3, 0.2, 0.0]])
  mask = jnp.array([[1, 1, 1], [1, 1, 0]], bool)
  # Scores: [0.5, 0.1, 0.9], [0.6, 0.4, -]; 5 valid, fraction 0.4 -> 2 kept.
  keep = d3s_token_mask(adv, ent, mask, fraction=0.4)
  np.testing.assert_array_equal(np.asarray(keep),
                                [[False, False, True], [True, False, False]])
  assert np.asarray(d3s_token_mask(adv, ent, mask, fraction=1.0)).sum() == 5
  assert not np.asarray(d3s_token_mask(adv, ent, mask, fraction=0.0)).any()
  rng = np.random.default_rng(1)
  a, e = rng.normal(size=(6, 7)), rng.random((6, 7))
  m = rng.random((6, 7)) > 0.3
  keep = np.asarray(jax.jit(d3s_token_mask)(a, e, m, fraction=0.3))
  scores = np.abs(a) * e
  kept, dropped = scores[keep], scores[m & ~keep]
  assert keep.sum() == int(np.ceil(0.3 * m.sum()))
  assert kept.min() >= dropped.max()


def test_linear_schedule():
  np.testing.assert_allclose(
      [float(linear_schedule(s, start=1.0, end=0.2, num_steps=4))
       for s in (0, 2, 4, 9)], [1.0, 0.6, 0.2, 0.2], atol=1e-7)


def reference_xrpo(adv_N, correct_N, logp_NT, mask_NT, group_size, lam,
                   kappa_clip):
  n = len(adv_N)
  s = np.zeros(n)
  length = mask_NT.sum(-1)
  for i in range(n):
    if length[i]:
      s[i] = sum(logp_NT[i, t] for t in range(logp_NT.shape[1])
                 if mask_NT[i, t]) / length[i]
  out = np.array(adv_N, np.float64)
  etas = np.ones(n)
  for b in range(n // group_size):
    rows = [i for i in range(b * group_size, (b + 1) * group_size)
            if length[i]]
    mean = np.mean([s[i] for i in rows]) if rows else 0.0
    for i in rows:
      etas[i] = np.exp(s[i] - mean)
  for i in range(n):
    if correct_N[i] and adv_N[i] > 0:
      out[i] = adv_N[i] + min(max(lam * (1 - etas[i]), 0.0),
                              kappa_clip * adv_N[i])
  return etas, out


@pytest.mark.parametrize("variant", VARIANTS)
def test_xrpo_sharpening_matches_reference(variant):
  rng = np.random.default_rng(3)
  b, g, t = 5, 4, 6
  reward_BG = rng.integers(0, 2, (b, g)).astype(np.float32)
  adv_N = np.asarray(advantages.grpo_advantages(reward_BG)).reshape(-1)
  logp_NT = -rng.gamma(1.0, 1.0, (b * g, t)).astype(np.float32)
  mask_NT = np.arange(t)[None] < rng.integers(0, t + 1, (b * g, 1))
  eta = variant(functools.partial(selection.xrpo_novelty,
                                  group_size=g))(logp_NT, mask_NT)
  sharp = variant(selection.xrpo_sharpen)(adv_N, reward_BG.reshape(-1) > 0.5,
                                          eta)
  want_eta, want = reference_xrpo(adv_N, reward_BG.reshape(-1) > 0.5, logp_NT,
                                  mask_NT, g, 2.5, 0.5)
  np.testing.assert_allclose(eta, want_eta, rtol=1e-5)
  np.testing.assert_allclose(sharp, want, rtol=1e-5, atol=1e-6)
  changed = ~np.isclose(sharp, adv_N)
  assert changed.any()
  # Only correct rollouts with positive advantage are ever changed, upwards.
  assert np.all((reward_BG.reshape(-1) > 0.5)[changed])
  assert np.all(sharp[changed] > adv_N[changed])


def test_xrpo_hand_computed():
  # One group of 3: per-token log-likelihoods -1, -2, -3 (mean -2).
  logp = jnp.array([[-1.0, -1.0], [-2.0, -2.0], [-3.0, 0.0]])
  mask = jnp.array([[1, 1], [1, 1], [1, 0]])
  eta = selection.xrpo_novelty(logp, mask, 3)
  np.testing.assert_allclose(eta, np.exp([1.0, 0.0, -1.0]), rtol=1e-6)
  adv = jnp.array([1.0, 1.0, 1.0])
  out = selection.xrpo_sharpen(adv, jnp.array([True, True, True]), eta,
                               lam=2.5, kappa_clip=0.5)
  # eta > 1: no bonus; eta = 1: none; eta = e^-1: min(2.5*(1-e^-1), 0.5)=0.5.
  np.testing.assert_allclose(out, [1.0, 1.0, 1.5], rtol=1e-6)
  out = selection.xrpo_sharpen(adv, jnp.array([True, True, True]), eta,
                               lam=0.1, kappa_clip=0.5)
  np.testing.assert_allclose(out, [1.0, 1.0, 1.0 + 0.1 * (1 - np.exp(-1))],
                             rtol=1e-6)
  # Incorrect rollouts and negative advantages are untouched.
  out = selection.xrpo_sharpen(jnp.array([-1.0, 1.0, 1.0]),
                               jnp.array([True, True, False]), eta)
  np.testing.assert_allclose(out, [-1.0, 1.0, 1.0])


def test_xrpo_novelty_empty_rows_and_bad_groups():
  eta = selection.xrpo_novelty(jnp.zeros((4, 3)), jnp.zeros((4, 3)), 2)
  np.testing.assert_array_equal(eta, np.ones(4))
  with pytest.raises(ValueError, match="group_size"):
    selection.xrpo_novelty(jnp.zeros((5, 3)), jnp.ones((5, 3)), 2)


def test_xrpo_under_vmap_matches_per_batch_calls():
  rng = np.random.default_rng(5)
  logp = -rng.gamma(1.0, 1.0, (3, 8, 4)).astype(np.float32)
  mask = rng.random((3, 8, 4)) < 0.8
  adv = rng.normal(size=(3, 8)).astype(np.float32)
  correct = rng.random((3, 8)) < 0.5

  def both(lp, m, a, c):
    eta = selection.xrpo_novelty(lp, m, 4)
    return eta, selection.xrpo_sharpen(a, c, eta)

  eta_v, sharp_v = jax.vmap(both)(logp, mask, adv, correct)
  for i in range(3):
    eta, sharp = both(logp[i], mask[i], adv[i], correct[i])
    np.testing.assert_allclose(eta_v[i], eta, rtol=1e-6)
    np.testing.assert_allclose(sharp_v[i], sharp, rtol=1e-6)
