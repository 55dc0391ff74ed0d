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
