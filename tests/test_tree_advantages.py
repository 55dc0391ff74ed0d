"""Tests for rlax_llm.core.tree_advantages."""

import functools
import math

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import numpy as np
import pytest

from rlax_llm.core import tree_advantages as ta

VARIANTS = [pytest.param(lambda f: f, id="eager"),
            pytest.param(jax.jit, id="jit")]
EPS = 1e-6


# -- NumPy loop references ----------------------------------------------------
def ref_leaves_under(branching, depth, node):
  """Leaves of node `node` at `depth`, built by walking the tree."""
  leaves = [()]
  for k in branching:  # enumerate leaf paths as digit tuples
    leaves = [p + (c,) for p in leaves for c in range(k)]
  out = []
  for g, path in enumerate(leaves):
    # The depth-d node index of a path: its first d+1 digits in mixed radix.
    idx = 0
    for d in range(depth + 1):
      idx = idx * branching[d] + path[d]
    if idx == node:
      out.append(g)
  return out


def ref_tree_advantages(reward_BG, mask_NT, logp_NT, split_points, branching,
                        path_weighted=False, scale_by_std=True, min_depth=0,
                        max_depth=None, width_keep=0):
  """Float64 loops: values, depth-normalised advantages, token spread."""
  b_count, g_count = reward_BG.shape
  t_count = mask_NT.shape[1]
  depth = len(branching)
  seg = [max(d for d in range(depth) if split_points[d] <= t)
         for t in range(t_count)]
  log_w = np.zeros((b_count, g_count))
  if path_weighted:
    for b in range(b_count):
      for g in range(g_count):
        n = b * g_count + g
        valid = [t for t in range(t_count) if mask_NT[n, t]]
        total = sum(float(logp_NT[n, t]) for t in valid)
        end = seg[valid[-1]] if valid else depth - 1
        copies = math.prod(branching[end + 1:])
        log_w[b, g] = total - math.log(copies)
  node_adv = []
  for d in range(depth):
    m = math.prod(branching[:d + 1])
    adv = np.zeros((b_count, m))
    for b in range(b_count):
      vals = []
      for u in range(m):
        leaves = ref_leaves_under(branching, d, u)
        if path_weighted:
          w = np.array([math.exp(log_w[b, g]) for g in leaves])
          w = w / w.sum()
        else:
          w = np.full(len(leaves), 1.0 / len(leaves))
        vals.append(sum(wi * float(reward_BG[b, g])
                        for wi, g in zip(w, leaves)))
      if m < 2 or max(vals) == min(vals):
        continue
      mean = sum(vals) / m
      std = math.sqrt(sum((v - mean)**2 for v in vals) / (m - 1))
      for u in range(m):
        adv[b, u] = (vals[u] - mean) / (std + EPS) if scale_by_std else (
            vals[u] - mean)
    node_adv.append(adv)
  hi = depth - 1 if max_depth is None else max_depth
  keep_node = []
  for d in range(depth):
    keep = np.ones(node_adv[d].shape, bool)
    if 0 < width_keep < node_adv[d].shape[1]:
      for b in range(b_count):
        order = sorted(range(node_adv[d].shape[1]),
                       key=lambda u, b=b, d=d: (-abs(node_adv[d][b, u]), u))
        keep[b] = False
        keep[b, order[:width_keep]] = True
    keep_node.append(keep)
  adv_NT = np.zeros((b_count * g_count, t_count))
  loss_NT = np.zeros((b_count * g_count, t_count), bool)
  for b in range(b_count):
    for g in range(g_count):
      n = b * g_count + g
      for t in range(t_count):
        d = seg[t]
        u = next(u for u in range(node_adv[d].shape[1])
                 if g in ref_leaves_under(branching, d, u))
        if mask_NT[n, t] and min_depth <= d <= hi and keep_node[d][b, u]:
          loss_NT[n, t] = True
          adv_NT[n, t] = node_adv[d][b, u]
  return adv_NT, loss_NT, node_adv


def random_tree_batch(rng, b, split_points, branching, t):
  """Rewards with ties and a constant prompt; masks as a tree would make."""
  g = math.prod(branching)
  reward_BG = rng.integers(0, 3, (b, g)).astype(np.float32) / 2
  reward_BG[0] = 1.0
  lengths_N = rng.integers(0, t + 1, b * g)
  mask_NT = np.arange(t)[None, :] < lengths_N[:, None]
  logp_NT = np.where(mask_NT, -rng.random((b * g, t)) * 2, 0).astype(
      np.float32)
  return reward_BG, mask_NT, logp_NT


TREES = [((0, 1, 2), (4, 2, 2), 5), ((0, 2), (3, 2), 4),
         ((0,), (6,), 3), ((0, 1, 3), (2, 1, 3), 6)]


# -- tests --------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("splits,branching,t", TREES)
@pytest.mark.parametrize("path_weighted", [False, True])
def test_matches_reference(variant, splits, branching, t, path_weighted):
  rng = np.random.default_rng(len(splits) + t)
  reward_BG, mask_NT, logp_NT = random_tree_batch(rng, 3, splits, branching, t)
  fn = variant(functools.partial(
      ta.tree_advantages, split_points=splits, branching=branching,
      path_weighted=path_weighted))
  got = fn(reward_BG, mask_NT, logp_NT=logp_NT)
  want_adv, want_mask, want_node = ref_tree_advantages(
      reward_BG, mask_NT, logp_NT, splits, branching, path_weighted)
  np.testing.assert_array_equal(got.loss_mask_NT, want_mask)
  np.testing.assert_allclose(got.adv_NT, want_adv, rtol=1e-5, atol=1e-6)
  for d in range(len(branching)):
    np.testing.assert_allclose(got.node_adv[d], want_node[d], rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("min_depth,max_depth,width_keep",
                         [(1, None, 0), (0, 1, 0), (0, None, 2), (1, 1, 3)])
def test_pruning_matches_reference(variant, min_depth, max_depth, width_keep):
  splits, branching, t = (0, 1, 2), (4, 2, 2), 5
  rng = np.random.default_rng(7)
  reward_BG, mask_NT, logp_NT = random_tree_batch(rng, 4, splits, branching, t)
  reward_BG = reward_BG + rng.normal(size=reward_BG.shape).astype(
      np.float32) * 0.1  # distinct |A| so top-k has no ties
  fn = variant(functools.partial(
      ta.tree_advantages, split_points=splits, branching=branching,
      min_depth=min_depth, max_depth=max_depth, width_keep=width_keep,
      scale_by_std=False))
  got = fn(reward_BG, mask_NT)
  want_adv, want_mask, _ = ref_tree_advantages(
      reward_BG, mask_NT, logp_NT, splits, branching, False, False, min_depth,
      max_depth, width_keep)
  np.testing.assert_array_equal(got.loss_mask_NT, want_mask)
  np.testing.assert_allclose(got.adv_NT, want_adv, rtol=1e-5, atol=1e-6)
  assert want_mask.sum() < mask_NT.sum()  # the case prunes something


def test_hand_computed_tree():
  # One prompt, splits (0, 1), branching (2, 2): leaves 0,1 under node 0 and
  # leaves 2,3 under node 1. Rewards 1, 0, 0, 0.
  reward_BG = np.array([[1.0, 0.0, 0.0, 0.0]])
  mask_NT = np.ones((4, 3), bool)
  mask_NT[3, 2] = False
  out = ta.tree_advantages(reward_BG, mask_NT, split_points=(0, 1),
                           branching=(2, 2))
  # Depth 0 values 0.5, 0: mean 0.25, sample std sqrt(2 * 0.0625) = 0.35355.
  # Depth 1 values 1, 0, 0, 0: mean 0.25, sample std 0.5.
  a0 = 0.25 / (math.sqrt(0.125) + EPS)
  a1 = 0.75 / (0.5 + EPS)
  b1 = -0.25 / (0.5 + EPS)
  np.testing.assert_allclose(out.values[0], [[0.5, 0.0]])
  np.testing.assert_allclose(out.values[1], [[1.0, 0.0, 0.0, 0.0]])
  np.testing.assert_allclose(
      out.adv_NT,
      [[a0, a1, a1], [a0, b1, b1], [-a0, b1, b1], [-a0, b1, 0.0]], rtol=1e-6)


def test_hand_computed_path_weights():
  # Branching (1, 2), splits (0, 1), T = 3: the single depth-0 node ended
  # with its first token, so its two leaves are copies of one path and each
  # gets half its probability mass.
  mask_NT = np.array([[True, False, False], [True, False, False]])
  logp_NT = np.array([[-0.5, 0, 0], [-0.5, 0, 0]], np.float32)
  lw = ta.path_log_weights(logp_NT, mask_NT, split_points=(0, 1),
                           branching=(1, 2))
  np.testing.assert_allclose(lw, [[-0.5 - math.log(2), -0.5 - math.log(2)]],
                             rtol=1e-6)
  # Node with one finished child (2 copies, p = 0.5) and one child whose two
  # leaves have continuation probabilities 0.3 and 0.1 (child p = 0.5):
  # weights 0.25, 0.25, 0.15, 0.05 (normalised by 0.7).
  logp_NT = np.log(np.array([[0.5, 1, 1], [0.5, 1, 1], [0.5, 0.3, 1],
                             [0.5, 0.1, 1]], np.float32))
  mask_NT = np.array([[1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 0]], bool)
  lw = ta.path_log_weights(logp_NT, mask_NT, split_points=(0, 1),
                           branching=(2, 2))
  values = ta.node_values(np.array([[1.0, 1.0, 0.0, 1.0]]), branching=(2, 2),
                          log_weight_BG=lw)
  # Root-level values per depth-0 node: node 0 holds leaves 0,1 (value 1);
  # node 1 holds leaves 2, 3 weighted 0.75 / 0.25 -> 0.25.
  np.testing.assert_allclose(values[0], [[1.0, 0.25]], rtol=1e-6)
  np.testing.assert_allclose(values[1], [[1.0, 1.0, 0.0, 1.0]], rtol=1e-6)


def test_constant_rewards_and_single_child_give_zeros():
  mask_NT = np.ones((8, 4), bool)
  out = jax.jit(functools.partial(
      ta.tree_advantages, split_points=(0, 2), branching=(2, 2),
      path_weighted=True))(np.full((2, 4), 0.7), mask_NT,
                           logp_NT=np.full((8, 4), -1.0))
  assert np.all(out.adv_NT == 0) and np.all(np.isfinite(out.adv_NT))
  # K_0 = 1: a single root child; its depth-0 advantage is 0, deeper ones not.
  out = ta.tree_advantages(np.array([[1.0, 0.0, 0.0]]), np.ones((3, 2), bool),
                           split_points=(0, 1), branching=(1, 3))
  np.testing.assert_array_equal(out.node_adv[0], [[0.0]])
  assert np.all(out.adv_NT[:, 0] == 0) and np.all(out.adv_NT[:, 1] != 0)
  # A whole tree of one leaf.
  out = ta.tree_advantages(np.array([[1.0]]), np.ones((1, 2), bool),
                           split_points=(0,), branching=1)
  np.testing.assert_array_equal(out.adv_NT, [[0.0, 0.0]])


def test_full_depth_tree_of_one_split_is_grpo():
  from rlax_llm.core import advantages  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  reward_BG = rng.normal(size=(3, 6)).astype(np.float32)
  mask_NT = rng.random((18, 4)) < 0.8
  out = ta.tree_advantages(reward_BG, mask_NT, split_points=(0,),
                           branching=(6,))
  want = np.asarray(advantages.grpo_advantages(reward_BG)).reshape(18, 1)
  np.testing.assert_allclose(out.adv_NT, np.where(mask_NT, want, 0),
                             rtol=1e-6)


def test_vmap_over_leading_axis():
  rng = np.random.default_rng(5)
  splits, branching, t = (0, 1, 2), (4, 2, 2), 5
  batches = [random_tree_batch(rng, 2, splits, branching, t) for _ in range(3)]
  r_KBG = np.stack([x[0] for x in batches])
  m_KNT = np.stack([x[1] for x in batches])
  fn = functools.partial(ta.tree_advantages, split_points=splits,
                         branching=branching, width_keep=3)
  got = jax.jit(jax.vmap(fn))(r_KBG, m_KNT)
  for k in range(3):
    want = fn(r_KBG[k], m_KNT[k])
    np.testing.assert_allclose(got.adv_NT[k], want.adv_NT, rtol=1e-6)
    np.testing.assert_array_equal(got.loss_mask_NT[k], want.loss_mask_NT)


@settings(max_examples=25, deadline=None, database=None)
@given(st.integers(0, 2**31 - 1))
def test_depth_advantages_sum_to_zero_per_depth(seed):
  rng = np.random.default_rng(seed)
  reward_BG = rng.random((2, 12)).astype(np.float32)
  values = ta.node_values(reward_BG, branching=(3, 2, 2))
  for v, a in zip(values, ta.depth_advantages(values, scale_by_std=False)):
    np.testing.assert_allclose(np.sum(a, axis=1), 0, atol=1e-5)
    # Uniform node values at every depth average to the root mean.
    np.testing.assert_allclose(v.mean(axis=1), reward_BG.mean(axis=1),
                               rtol=1e-5)


def test_segment_ids_and_ancestors():
  np.testing.assert_array_equal(ta.segment_ids((0, 1, 3), 6),
                                [0, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(ta.ancestor_index((2, 3), 0),
                                [0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(ta.ancestor_index((2, 3), 1), np.arange(6))


@pytest.mark.parametrize("kwargs,match", [
    (dict(split_points=(1, 2), branching=2), "must start at 0"),
    (dict(split_points=(0, 2, 2), branching=2), "strictly increasing"),
    (dict(split_points=(0, 1), branching=(2, 2, 2)), "one factor per"),
    (dict(split_points=(0, 1), branching=(2, 0)), ">= 1"),
    (dict(split_points=(0, 1), branching=(4, 2), num_samples=16),
     "set rl.num_samples to 8"),
    (dict(split_points=(0, 5), branching=2, max_new_tokens=5),
     "must be < max_new_tokens=5"),
])
def test_validate_tree_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ta.validate_tree(**kwargs)


def test_path_weighted_needs_logp():
  with pytest.raises(ValueError, match="pass logp_NT"):
    ta.tree_advantages(np.zeros((1, 2)), np.ones((2, 2), bool),
                       split_points=(0,), branching=2, path_weighted=True)
  assert ta.validate_tree([0, 2], 3) == ((0, 2), (3, 3))
