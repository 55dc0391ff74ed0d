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
