"""Tests for rlax_llm.core.advantages."""

import functools
import math

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlax_llm.core import advantages

VARIANTS = [pytest.param(lambda f: f, id="eager"),
            pytest.param(jax.jit, id="jit")]
PROPERTY_SETTINGS = settings(max_examples=30, deadline=None, database=None)
EPS = 1e-6


def reference_grpo(reward_BG, mask_BG=None, scale_by_std=True, eps=EPS):
  """Plain-loop float64 GRPO / Dr.GRPO advantages with the sample std."""
  n_groups, group_size = reward_BG.shape
  if mask_BG is None:
    mask_BG = np.ones(reward_BG.shape, bool)
  adv_BG = np.zeros(reward_BG.shape)
  for b in range(n_groups):
    values = [float(reward_BG[b, g]) for g in range(group_size) if mask_BG[b, g]]
    if len(values) < 2 or min(values) == max(values):
      continue
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean)**2 for v in values) / (len(values) - 1))
    for g in range(group_size):
      if mask_BG[b, g]:
        centered = float(reward_BG[b, g]) - mean
        adv_BG[b, g] = centered / (std + eps) if scale_by_std else centered
  return adv_BG


def reference_rloo(reward_BG, mask_BG=None):
  """Plain-loop float64 leave-one-out advantages."""
  n_groups, group_size = reward_BG.shape
  if mask_BG is None:
    mask_BG = np.ones(reward_BG.shape, bool)
  adv_BG = np.zeros(reward_BG.shape)
  for b in range(n_groups):
    members = [g for g in range(group_size) if mask_BG[b, g]]
    values = [float(reward_BG[b, g]) for g in members]
    if len(values) < 2 or min(values) == max(values):
      continue
    for g in members:
      others = [float(reward_BG[b, h]) for h in members if h != g]
      adv_BG[b, g] = float(reward_BG[b, g]) - sum(others) / len(others)
  return adv_BG


def random_rewards(rng, n_groups, group_size):
  """Binary, few-level and continuous groups, plus one constant group."""
  kind = rng.integers(0, 3, size=(n_groups, 1))
  reward_BG = np.where(
      kind == 0, rng.integers(0, 2, (n_groups, group_size)),
      np.where(kind == 1, rng.integers(0, 4, (n_groups, group_size)) / 3.0,
               rng.normal(size=(n_groups, group_size))))
  reward_BG[0] = 0.1
  return reward_BG.astype(np.float32)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("scale_by_std", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_grpo_matches_reference(variant, scale_by_std, masked):
  rng = np.random.default_rng(0)
  reward_BG = random_rewards(rng, 7, 6)
  mask_BG = rng.random(reward_BG.shape) < 0.7 if masked else None
  fn = variant(functools.partial(advantages.grpo_advantages,
                                 scale_by_std=scale_by_std))
  got_BG = fn(reward_BG, mask_BG=mask_BG)
  assert got_BG.dtype == jnp.float32 and got_BG.shape == (7, 6)
  np.testing.assert_allclose(
      got_BG, reference_grpo(reward_BG, mask_BG, scale_by_std),
      rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("masked", [False, True])
def test_rloo_matches_reference(variant, masked):
  rng = np.random.default_rng(1)
  reward_BG = random_rewards(rng, 7, 5)
  mask_BG = rng.random(reward_BG.shape) < 0.7 if masked else None
  got_BG = variant(advantages.rloo_advantages)(reward_BG, mask_BG=mask_BG)
  np.testing.assert_allclose(got_BG, reference_rloo(reward_BG, mask_BG),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn", [advantages.grpo_advantages,
                                advantages.rloo_advantages])
def test_vmap_over_leading_axis(fn):
  reward_KBG = random_rewards(np.random.default_rng(2), 12, 4).reshape(3, 4, 4)
  got_KBG = jax.jit(jax.vmap(fn))(reward_KBG)
  want_KBG = np.stack([fn(r) for r in reward_KBG])
  np.testing.assert_allclose(got_KBG, want_KBG, rtol=1e-6, atol=1e-7)


def test_hand_computed():
  reward_BG = jnp.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0]])
  # Group 0: mean 0.25, sample std sqrt(0.75 / 3) = 0.5.
  # Group 1: mean 0.5, sample std sqrt(1 / 3) = 0.57735027.
  np.testing.assert_allclose(
      advantages.grpo_advantages(reward_BG),
      [[0.75 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001],
       [-0.5 / 0.57735127, 0.5 / 0.57735127, -0.5 / 0.57735127,
        0.5 / 0.57735127]], rtol=1e-6)
  np.testing.assert_allclose(
      advantages.grpo_advantages(reward_BG, scale_by_std=False),
      [[0.75, -0.25, -0.25, -0.25], [-0.5, 0.5, -0.5, 0.5]], rtol=1e-6)
  np.testing.assert_allclose(
      advantages.rloo_advantages(reward_BG),
      [[1.0, -1 / 3, -1 / 3, -1 / 3], [-2 / 3, 2 / 3, -2 / 3, 2 / 3]],
      rtol=1e-6)


def test_grpo_uses_sample_std():
  # Two samples: sample std is 1/sqrt(2), the population std would give +-1.
  np.testing.assert_allclose(
      advantages.grpo_advantages(jnp.array([[0.0, 1.0]]), eps=0.0),
      [[-0.70710678, 0.70710678]], rtol=1e-6)


def test_mask_drops_samples_from_group_statistics():
  reward_BG = jnp.array([[1.0, 0.0, 123.0, 0.0, 0.0]])
  mask_BG = jnp.array([[True, True, False, True, True]])
  got_BG = advantages.grpo_advantages(reward_BG, mask_BG=mask_BG, eps=0.0)
  np.testing.assert_allclose(got_BG, [[1.5, -0.5, 0.0, -0.5, -0.5]],
                             rtol=1e-6)
  got_BG = advantages.rloo_advantages(reward_BG, mask_BG=mask_BG)
  np.testing.assert_allclose(got_BG, [[1.0, -1 / 3, 0.0, -1 / 3, -1 / 3]],
                             rtol=1e-6)


@pytest.mark.parametrize("fn", [
    advantages.grpo_advantages,
    functools.partial(advantages.grpo_advantages, scale_by_std=False),
    advantages.rloo_advantages,
])
def test_degenerate_groups_give_exact_zeros(fn):
  reward_BG = jnp.array([[0.1, 0.1, 0.1], [1 / 3, 1 / 3, 1 / 3],
                         [1e7 + 1, 1e7 + 1, 1e7 + 1], [5.0, -1.0, 2.0]])
  mask_BG = jnp.array([[1, 1, 1], [1, 1, 1], [1, 1, 1], [0, 1, 0]])
  adv_BG = jax.jit(fn)(reward_BG, mask_BG=mask_BG)
  np.testing.assert_array_equal(adv_BG, 0.0)
  np.testing.assert_array_equal(fn(jnp.array([[3.0], [-2.0]])), 0.0)
  grad_BG = jax.jit(jax.grad(
      lambda r: jnp.sum(fn(r, mask_BG=mask_BG)**2)))(reward_BG)
  assert np.all(np.isfinite(grad_BG))


# Property tests use a few fixed shapes so that compiled functions are reused.
N_GROUPS = 5
GROUP_SIZES = [1, 2, 3, 8, 16]

_jit_grpo = jax.jit(advantages.grpo_advantages,
                    static_argnames=("scale_by_std",))
_jit_rloo = jax.jit(advantages.rloo_advantages)


@st.composite
def group_rewards(draw):
  group_size = draw(st.sampled_from(GROUP_SIZES))
  seed = draw(st.integers(0, 2**32 - 1))
  scale = draw(st.sampled_from([1e-2, 1.0, 1e3]))
  offset = draw(st.floats(-10, 10))
  rng = np.random.default_rng(seed)
  reward_BG = random_rewards(rng, N_GROUPS, group_size)
  return ((reward_BG + offset) * scale).astype(np.float32)


def sample_std(reward_BG):
  if reward_BG.shape[1] < 2:
    return np.zeros(reward_BG.shape[0])
  return np.std(reward_BG.astype(np.float64), axis=-1, ddof=1)


def rounding_scale(reward_BG, normalised):
  """[B, 1] float32 rounding scale of a group's advantages.

  Rounding in the group mean is ~G * 6e-8 * max|r|, amplified by the division
  by the std when the advantages are normalised.
  """
  scale_B = 6e-8 * reward_BG.shape[1] * np.abs(reward_BG).max(-1)
  if normalised:
    scale_B = scale_B / (sample_std(reward_BG) + EPS)
  return scale_B[:, None]


@PROPERTY_SETTINGS
@given(reward_BG=group_rewards(), scale_by_std=st.booleans())
def test_grpo_sums_to_zero_per_group(reward_BG, scale_by_std):
  adv_BG = np.asarray(_jit_grpo(reward_BG, scale_by_std=scale_by_std))
  assert np.all(np.isfinite(adv_BG))
  tol_B = 4 * reward_BG.shape[1] * rounding_scale(reward_BG, scale_by_std)
  assert np.all(np.abs(adv_BG.sum(-1, keepdims=True)) <= tol_B + 1e-7)
  # Their sample std is std / (std + eps), i.e. ~1 (where float32 resolves
  # the spread); a population std would give sqrt(G / (G - 1)) instead.
  std_B = sample_std(reward_BG)
  if scale_by_std and reward_BG.shape[1] > 1:
    wide = std_B > 1e-3 * np.abs(reward_BG).max(-1)
    np.testing.assert_allclose(
        np.std(adv_BG[wide], axis=-1, ddof=1),
        std_B[wide] / (std_B[wide] + EPS), rtol=1e-3)


@PROPERTY_SETTINGS
@given(reward_BG=group_rewards())
def test_rloo_sums_to_zero_per_group(reward_BG):
  adv_BG = np.asarray(_jit_rloo(reward_BG))
  tol_B = 8 * reward_BG.shape[1] * rounding_scale(reward_BG, False)
  assert np.all(np.abs(adv_BG.sum(-1, keepdims=True)) <= tol_B + 1e-7)


@PROPERTY_SETTINGS
@given(group_size=st.sampled_from(GROUP_SIZES),
       value=st.floats(-1e6, 1e6, width=32), scale_by_std=st.booleans())
def test_constant_and_singleton_groups_are_zero(group_size, value,
                                                scale_by_std):
  reward_BG = np.full((N_GROUPS, group_size), value, np.float32)
  np.testing.assert_array_equal(
      _jit_grpo(reward_BG, scale_by_std=scale_by_std), 0.0)
  np.testing.assert_array_equal(_jit_rloo(reward_BG), 0.0)


@PROPERTY_SETTINGS
@given(reward_BG=group_rewards(),
       pad_value=st.sampled_from([0.0, 1e30, np.nan]))
def test_masked_padding_samples_change_nothing(reward_BG, pad_value):
  group_size, pad = reward_BG.shape[1], 3
  padded_BG = np.concatenate(
      [reward_BG, np.full((N_GROUPS, pad), pad_value, np.float32)], axis=1)
  mask_BG = np.arange(group_size + pad)[None, :] < group_size
  mask_BG = np.broadcast_to(mask_BG, padded_BG.shape)
  for fn, normalised in ((_jit_grpo, True), (_jit_rloo, False)):
    got_BG = np.asarray(fn(padded_BG, mask_BG=mask_BG))
    # Padding may reorder float32 sums: allow a few roundings of the mean.
    error_BG = np.abs(got_BG[:, :group_size] - fn(reward_BG))
    assert np.all(error_BG <= 8 * rounding_scale(reward_BG, normalised) + 1e-7)
    np.testing.assert_array_equal(got_BG[:, group_size:], 0.0)


def reference_reinforce_pp(reward_BG, mask_BG=None, group_baseline=False,
                           eps=EPS):
  """Plain-loop float64 REINFORCE++ advantages (population batch std)."""
  n_groups, group_size = reward_BG.shape
  if mask_BG is None:
    mask_BG = np.ones(reward_BG.shape, bool)
  x_BG = np.zeros(reward_BG.shape)
  for b in range(n_groups):
    members = [g for g in range(group_size) if mask_BG[b, g]]
    mean = sum(float(reward_BG[b, g]) for g in members) / max(len(members), 1)
    for g in members:
      x_BG[b, g] = float(reward_BG[b, g]) - (mean if group_baseline else 0.0)
  cells = [(b, g) for b in range(n_groups) for g in range(group_size)
           if mask_BG[b, g]]
  values = [x_BG[c] for c in cells]
  adv_BG = np.zeros(reward_BG.shape)
  if not values or max(values) - min(values) < 1e-12:
    return adv_BG
  mean = sum(values) / len(values)
  std = math.sqrt(sum((v - mean)**2 for v in values) / len(values))
  for c in cells:
    adv_BG[c] = (x_BG[c] - mean) / (std + eps)
  return adv_BG


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("group_baseline", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_reinforce_pp_matches_reference(variant, group_baseline, masked):
  rng = np.random.default_rng(3)
  reward_BG = random_rewards(rng, 7, 6)
  mask_BG = rng.random(reward_BG.shape) < 0.7 if masked else None
  fn = variant(functools.partial(advantages.reinforce_pp_advantages,
                                 group_baseline=group_baseline))
  got_BG = fn(reward_BG, mask_BG=mask_BG)
  assert got_BG.dtype == jnp.float32 and got_BG.shape == (7, 6)
  np.testing.assert_allclose(
      got_BG, reference_reinforce_pp(reward_BG, mask_BG, group_baseline),
      rtol=1e-5, atol=1e-5)


def test_reinforce_pp_hand_computed():
  reward_BG = jnp.array([[1.0, 0.0], [1.0, 1.0]])
  # Batch mean 0.75, population std sqrt(0.1875) = 0.4330127.
  np.testing.assert_allclose(
      advantages.reinforce_pp_advantages(reward_BG, eps=0.0),
      [[0.25 / 0.4330127, -0.75 / 0.4330127],
       [0.25 / 0.4330127, 0.25 / 0.4330127]], rtol=1e-6)
  # Group baseline: centred [[0.5, -0.5], [0, 0]], batch std sqrt(0.125).
  np.testing.assert_allclose(
      advantages.reinforce_pp_advantages(reward_BG, group_baseline=True,
                                         eps=0.0),
      [[1.4142135, -1.4142135], [0.0, 0.0]], rtol=1e-6)


@pytest.mark.parametrize("group_baseline", [False, True])
def test_reinforce_pp_degenerate_batches_give_exact_zeros(group_baseline):
  fn = jax.jit(functools.partial(advantages.reinforce_pp_advantages,
                                 group_baseline=group_baseline))
  np.testing.assert_array_equal(fn(jnp.full((3, 4), 0.1)), 0.0)
  np.testing.assert_array_equal(fn(jnp.array([[2.0]])), 0.0)
  np.testing.assert_array_equal(
      fn(jnp.array([[1.0, 5.0]]), mask_BG=jnp.array([[True, False]])), 0.0)
  np.testing.assert_array_equal(
      fn(jnp.ones((2, 2)), mask_BG=jnp.zeros((2, 2))), 0.0)
  grad_BG = jax.grad(lambda r: jnp.sum(fn(r)**2))(jnp.full((2, 3), 0.1))
  assert np.all(np.isfinite(grad_BG))


_jit_rpp = jax.jit(advantages.reinforce_pp_advantages,
                   static_argnames=("group_baseline",))


@PROPERTY_SETTINGS
@given(reward_BG=group_rewards(), group_baseline=st.booleans())
def test_reinforce_pp_is_batch_standardised(reward_BG, group_baseline):
  adv_BG = np.asarray(_jit_rpp(reward_BG, group_baseline=group_baseline))
  assert np.all(np.isfinite(adv_BG))
  if np.abs(adv_BG).max() == 0:
    return
  # Zero batch mean; batch std std / (std + eps) ~ 1 where the spread is
  # resolved in float32.
  assert abs(adv_BG.mean()) < 1e-3
  x_BG = reward_BG.astype(np.float64)
  if group_baseline:
    x_BG = x_BG - x_BG.mean(-1, keepdims=True)
  std = x_BG.std()
  if std > 1e-3 * np.abs(reward_BG).max():
    np.testing.assert_allclose(adv_BG.std(), std / (std + EPS), rtol=1e-3)
  if group_baseline:
    np.testing.assert_allclose(adv_BG.sum(-1), 0.0, atol=1e-3)


def reference_gae(reward_NT, value_NT, mask_NT, gamma, lam):
  """Plain-loop float64 GAE over the valid tokens of each row."""
  n_rows, n_cols = reward_NT.shape
  adv_NT, ret_NT = np.zeros((n_rows, n_cols)), np.zeros((n_rows, n_cols))
  for n in range(n_rows):
    steps = [t for t in range(n_cols) if mask_NT[n, t]]
    next_value, next_adv = 0.0, 0.0
    for t in reversed(steps):
      delta = (float(reward_NT[n, t]) + gamma * next_value -
               float(value_NT[n, t]))
      next_adv = delta + gamma * lam * next_adv
      next_value = float(value_NT[n, t])
      adv_NT[n, t] = next_adv
      ret_NT[n, t] = next_adv + next_value
  return adv_NT, ret_NT


def random_token_batch(rng, n_rows, n_cols, p_valid=0.8):
  reward_NT = rng.normal(size=(n_rows, n_cols)).astype(np.float32)
  value_NT = rng.normal(size=(n_rows, n_cols)).astype(np.float32)
  mask_NT = rng.random((n_rows, n_cols)) < p_valid
  mask_NT[0] = False
  # Garbage at masked tokens must be ignored.
  reward_NT[~mask_NT] = np.nan
  value_NT[~mask_NT] = np.inf
  return reward_NT, value_NT, mask_NT


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
def test_gae_matches_reference(variant, gamma, lam):
  batch = random_token_batch(np.random.default_rng(4), 5, 9)
  fn = variant(functools.partial(advantages.gae_advantages, gamma=gamma,
                                 lam=lam))
  adv_NT, ret_NT = fn(*batch)
  want_adv_NT, want_ret_NT = reference_gae(*batch, gamma, lam)
  assert adv_NT.dtype == jnp.float32 and adv_NT.shape == (5, 9)
  np.testing.assert_allclose(adv_NT, want_adv_NT, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ret_NT, want_ret_NT, rtol=1e-5, atol=1e-5)


def test_gae_hand_computed():
  reward_NT = jnp.array([[0.0, 7.0, 0.0, 1.0]])
  value_NT = jnp.array([[0.5, 9.0, 0.25, 0.0]])
  mask_NT = jnp.array([[1, 0, 1, 1]])
  # Valid steps t=0, 2, 3; gamma=0.5, lam=0.5.
  # t=3: delta = 1 - 0 = 1, A = 1.
  # t=2: delta = 0 + 0.5 * 0 - 0.25 = -0.25, A = -0.25 + 0.25 * 1 = 0.
  # t=0: delta = 0 + 0.5 * 0.25 - 0.5 = -0.375, A = -0.375 + 0.25 * 0.
  adv_NT, ret_NT = advantages.gae_advantages(reward_NT, value_NT, mask_NT,
                                             gamma=0.5, lam=0.5)
  np.testing.assert_allclose(adv_NT, [[-0.375, 0.0, 0.0, 1.0]], atol=1e-7)
  np.testing.assert_allclose(ret_NT, [[0.125, 0.0, 0.25, 1.0]], atol=1e-7)
  returns_NT = advantages.token_level_returns(reward_NT, mask_NT, gamma=0.5)
  np.testing.assert_allclose(returns_NT, [[0.25, 0.0, 0.5, 1.0]], atol=1e-7)


def test_token_level_rewards_and_returns():
  mask_NT = jnp.array([[1, 1, 1, 0], [0, 1, 0, 1], [0, 0, 0, 0]])
  kl_NT = jnp.array([[0.1, 0.2, 0.3, 9.0], [9.0, 0.5, 9.0, 0.25],
                     [1.0, 1.0, 1.0, 1.0]])
  reward_NT = advantages.token_level_rewards(
      jnp.array([1.0, -1.0, 5.0]), mask_NT, kl_NT=kl_NT, kl_coef=0.5)
  np.testing.assert_allclose(
      reward_NT, [[-0.05, -0.1, 0.85, 0.0], [0.0, -0.25, 0.0, -1.125],
                  [0.0, 0.0, 0.0, 0.0]], rtol=1e-6)
  # REINFORCE++ token advantage: r - beta * sum_{i >= t} KL_i.
  returns_NT = jax.jit(advantages.token_level_returns)(reward_NT, mask_NT)
  np.testing.assert_allclose(
      returns_NT, [[0.7, 0.75, 0.85, 0.0], [0.0, -1.375, 0.0, -1.125],
                   [0.0, 0.0, 0.0, 0.0]], rtol=1e-6)
  # gamma=1, lam=1 GAE with zero values is the same return.
  adv_NT, _ = advantages.gae_advantages(reward_NT, jnp.zeros((3, 4)), mask_NT)
  np.testing.assert_allclose(adv_NT, returns_NT, rtol=1e-6)


def test_gae_gradient_reaches_rewards_not_values():
  batch = [jnp.asarray(np.nan_to_num(x, nan=0.0, posinf=0.0)) for x in
           random_token_batch(np.random.default_rng(5), 3, 4)]
  loss = lambda r, v: jnp.sum(advantages.gae_advantages(r, v, batch[2])[0])
  grad_r, grad_v = jax.grad(loss, argnums=(0, 1))(batch[0], batch[1])
  np.testing.assert_array_equal(grad_v, 0.0)
  np.testing.assert_array_equal(np.asarray(grad_r)[~np.asarray(batch[2])], 0.0)
  assert np.all(np.isfinite(grad_r))


_jit_gae = jax.jit(advantages.gae_advantages)


@PROPERTY_SETTINGS
@given(seed=st.integers(0, 2**32 - 1), p_valid=st.sampled_from([0.0, 0.5, 1.0]),
       gamma=st.sampled_from([1.0, 0.9]), lam=st.sampled_from([1.0, 0.8]))
def test_gae_ignores_masked_gaps(seed, p_valid, gamma, lam):
  """Removing masked tokens and left-packing the rest changes nothing."""
  reward_NT, value_NT, mask_NT = random_token_batch(
      np.random.default_rng(seed), 4, 6, p_valid)
  adv_NT, ret_NT = _jit_gae(reward_NT, value_NT, mask_NT, gamma=gamma,
                            lam=lam)
  packed = [np.zeros((4, 6), np.float32) for _ in range(2)]
  packed_mask_NT = np.zeros((4, 6), bool)
  for n in range(4):
    k = int(mask_NT[n].sum())
    packed[0][n, :k] = reward_NT[n, mask_NT[n]]
    packed[1][n, :k] = value_NT[n, mask_NT[n]]
    packed_mask_NT[n, :k] = True
  p_adv_NT, p_ret_NT = _jit_gae(*packed, packed_mask_NT, gamma=gamma, lam=lam)
  for got_NT, want_NT in ((adv_NT, p_adv_NT), (ret_NT, p_ret_NT)):
    got_NT = np.asarray(got_NT)
    assert np.all(np.isfinite(got_NT))
    np.testing.assert_array_equal(got_NT[~mask_NT], 0.0)
    for n in range(4):
      k = int(mask_NT[n].sum())
      np.testing.assert_allclose(got_NT[n, mask_NT[n]], want_NT[n, :k],
                                 rtol=1e-6, atol=1e-6)
