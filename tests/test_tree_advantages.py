"""Tests for rlax_llm.core.tree_advantages."""

import functools
import math

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlax_llm.core import tree_advantages as ta

# The hand-computed cases call it compiled (one program instead of an
# eager compile per operation); `test_matches_reference` runs both ways.
_tree_advantages = jax.jit(ta.tree_advantages, static_argnames=(
    "split_points", "branching", "value_weighting", "value_alpha",
    "scale_by_std", "eps", "std_floor", "pruned_depths", "width_pruning",
    "width_ratio", "adv_clip"))
VARIANTS = [pytest.param(lambda f: f, id="eager"),
            pytest.param(jax.jit, id="jit")]
EPS = 1e-8  # the official std offset (flux.py:680)


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


def ref_segments(split_points, t_count):
  depth = len(split_points)
  return [max(d for d in range(depth) if split_points[d] <= t)
          for t in range(t_count)]


def ref_values(reward_BG, mask_NT, logp_NT, split_points, branching,
               weighting, alpha):
  """Float64 node values, each depth a [B, M_d] array."""
  b_count, g_count = reward_BG.shape
  t_count = mask_NT.shape[1]
  depth = len(branching)
  seg = ref_segments(split_points, t_count)
  values = [np.zeros((b_count, math.prod(branching[:d + 1])))
            for d in range(depth)]
  for b in range(b_count):
    if weighting == "edge_softmax":
      # Bottom-up: each node's value is the softmax (alpha * child edge
      # log-prob) weighted sum of its children's values.
      for g in range(g_count):
        values[-1][b, g] = float(reward_BG[b, g])
      for d in range(depth - 2, -1, -1):
        for u in range(values[d].shape[1]):
          kids = [u * branching[d + 1] + j for j in range(branching[d + 1])]
          lps = []
          for c in kids:
            row = b * g_count + ref_leaves_under(branching, d + 1, c)[0]
            lps.append(sum(float(logp_NT[row, t]) for t in range(t_count)
                           if seg[t] == d + 1 and mask_NT[row, t]))
          w = np.exp(alpha * (np.array(lps) - max(lps)))
          w = w / w.sum()
          values[d][b, u] = sum(wi * values[d + 1][b, c]
                                for wi, c in zip(w, kids))
      continue
    log_w = np.zeros(g_count)
    if weighting == "path_softmax":
      for g in range(g_count):
        n = b * g_count + g
        valid = [t for t in range(t_count) if mask_NT[n, t]]
        total = sum(float(logp_NT[n, t]) for t in valid)
        end = seg[valid[-1]] if valid else depth - 1
        log_w[g] = total - math.log(math.prod(branching[end + 1:]))
    for d in range(depth):
      for u in range(values[d].shape[1]):
        leaves = ref_leaves_under(branching, d, u)
        w = np.array([math.exp(log_w[g]) for g in leaves])
        w = w / w.sum()
        values[d][b, u] = sum(wi * float(reward_BG[b, g])
                              for wi, g in zip(w, leaves))
  return values


def ref_depth_advantages(values, scale_by_std=True):
  """The official z-score: sample std, 0 below 1e-6, std + 1e-8."""
  out = []
  for v in values:
    adv = np.zeros(v.shape)
    for b in range(v.shape[0]):
      vals = [float(x) for x in v[b]]
      m = len(vals)
      if m < 2:
        continue
      mean = sum(vals) / m
      std = math.sqrt(sum((x - mean)**2 for x in vals) / (m - 1))
      if std < 1e-6:
        continue
      for u in range(m):
        adv[b, u] = (vals[u] - mean) / (std + EPS) if scale_by_std else (
            vals[u] - mean)
    out.append(adv)
  return out


def ref_width_prune(keep_NT, adv_NT, split_points, g_count, mode, ratio):
  """The official list-based width pruning on the transitions after the
  last split, collected leaf by leaf in position order."""
  keep_NT = keep_NT.copy()
  n_count, t_count = keep_NT.shape
  last = max(split_points)
  samples = [(n, t) for n in range(n_count) for t in range(t_count)
             if keep_NT[n, t] and t > last]
  adv = lambda s: float(adv_NT[s])
  kept = set()
  if mode == "best_per_branch":
    for n in range(n_count):
      group = [s for s in samples if s[0] == n]
      if not group:
        continue
      count = max(1, int(len(group) * ratio))
      kept.update(sorted(group, key=adv, reverse=True)[:count])
  else:
    for b in range(n_count // g_count):
      group = [s for s in samples if s[0] // g_count == b]
      if not group:
        continue
      ordered = sorted(group, key=adv, reverse=True)
      count = max(2, int(len(group) * ratio))
      best = count // 2
      kept.update(ordered[:best])
      if count - best > 0:
        kept.update(ordered[-(count - best):])
  for s in samples:
    if s not in kept:
      keep_NT[s] = False
  return keep_NT


def ref_tree_advantages(reward_BG, mask_NT, logp_NT, split_points, branching,
                        weighting="mean", alpha=1.0, scale_by_std=True,
                        pruned_depths=(), width_pruning="none", ratio=0.5):
  """Float64 loops: values, depth-normalised advantages, token spread,
  depth pruning, then width pruning."""
  b_count, g_count = reward_BG.shape
  t_count = mask_NT.shape[1]
  seg = ref_segments(split_points, t_count)
  values = ref_values(reward_BG, mask_NT, logp_NT, split_points, branching,
                      weighting, alpha)
  node_adv = ref_depth_advantages(values, scale_by_std)
  adv_NT = np.zeros((b_count * g_count, t_count))
  loss_NT = np.zeros((b_count * g_count, t_count), bool)
  for b in range(b_count):
    for g in range(g_count):
      n = b * g_count + g
      for t in range(t_count):
        d = seg[t]
        u = next(u for u in range(node_adv[d].shape[1])
                 if g in ref_leaves_under(branching, d, u))
        if mask_NT[n, t]:
          adv_NT[n, t] = node_adv[d][b, u]
          loss_NT[n, t] = d not in pruned_depths
  if width_pruning != "none":
    loss_NT = ref_width_prune(loss_NT, adv_NT, split_points, g_count,
                              width_pruning, ratio)
  return np.where(loss_NT, adv_NT, 0.0), loss_NT, node_adv, values


def random_tree_batch(rng, b, split_points, branching, t, end_prob=0.25):
  """Rewards with ties and a constant prompt; masks and log-probs as a tree
  makes them: leaves below a node share its tokens, a path that ends (EOS)
  leaves its descendants' segments empty."""
  g = math.prod(branching)
  reward_BG = rng.integers(0, 3, (b, g)).astype(np.float32) / 2
  reward_BG[0] = 1.0
  ends = tuple(split_points[1:]) + (t,)
  mask_NT = np.zeros((b * g, t), bool)
  logp_NT = np.zeros((b * g, t), np.float32)
  for bi in range(b):
    ended = np.zeros(1, bool)
    for d, k in enumerate(branching):
      ended = np.repeat(ended, k)
      s = math.prod(branching[d + 1:])
      for u in range(len(ended)):
        if ended[u]:
          continue
        stop = ends[d]
        if rng.random() < end_prob:  # EOS inside this segment
          stop = int(rng.integers(split_points[d] + 1, ends[d] + 1))
          ended[u] = True
        rows = slice(bi * g + u * s, bi * g + (u + 1) * s)
        mask_NT[rows, split_points[d]:stop] = True
        logp_NT[rows, split_points[d]:stop] = -2 * rng.random(
            stop - split_points[d])
  return reward_BG, mask_NT, logp_NT


TREES = [((0, 1, 2), (4, 2, 2), 5), ((0, 2), (3, 2), 4),
         ((0,), (6,), 3), ((0, 1, 3), (2, 1, 3), 6)]


# -- tests --------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("splits,branching,t", TREES)
@pytest.mark.parametrize("weighting,alpha", [
    ("mean", 1.0), ("edge_softmax", 1.0), ("edge_softmax", 2.5),
    ("path_softmax", 1.0)])
def test_matches_reference(variant, splits, branching, t, weighting, alpha):
  rng = np.random.default_rng(len(splits) + t)
  reward_BG, mask_NT, logp_NT = random_tree_batch(rng, 3, splits, branching, t)
  fn = variant(functools.partial(
      ta.tree_advantages, split_points=splits, branching=branching,
      value_weighting=weighting, value_alpha=alpha))
  got = fn(reward_BG, mask_NT, logp_NT=logp_NT)
  want_adv, want_mask, want_node, want_values = ref_tree_advantages(
      reward_BG, mask_NT, logp_NT, splits, branching, weighting, alpha)
  np.testing.assert_array_equal(got.loss_mask_NT, want_mask)
  np.testing.assert_allclose(got.adv_NT, want_adv, rtol=1e-5, atol=1e-5)
  for d in range(len(branching)):
    np.testing.assert_allclose(got.values[d], want_values[d], rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(got.node_adv[d], want_node[d], rtol=1e-5,
                               atol=1e-5)


def test_weightings_differ():
  # The three value rules are different functions of the same tree.
  splits, branching, t = (0, 1, 2), (4, 2, 2), 5
  rng = np.random.default_rng(11)
  reward_BG, mask_NT, logp_NT = random_tree_batch(rng, 2, splits, branching,
                                                  t, end_prob=0.0)
  reward_BG = rng.random(reward_BG.shape).astype(np.float32)
  vals = {w: _tree_advantages(reward_BG, mask_NT, logp_NT=logp_NT,
                              split_points=splits, branching=branching,
                              value_weighting=w).values[0]
          for w in ta.VALUE_WEIGHTINGS}
  assert not np.allclose(vals["mean"], vals["edge_softmax"], atol=1e-3)
  assert not np.allclose(vals["path_softmax"], vals["edge_softmax"],
                         atol=1e-3)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pruned,width,ratio", [
    ((1,), "none", 0.5), ((0, 1), "none", 0.5), ((), "best_per_branch", 0.5),
    ((), "best_per_branch", 0.7), ((), "best_and_worst", 0.5),
    ((1,), "best_and_worst", 0.3), ((2,), "best_per_branch", 0.5),
    ((0,), "best_and_worst", 1.0)])
def test_pruning_matches_reference(variant, pruned, width, ratio):
  splits, branching, t = (0, 1, 2), (4, 2, 2), 6
  rng = np.random.default_rng(7)
  reward_BG, mask_NT, logp_NT = random_tree_batch(rng, 4, splits, branching, t)
  fn = variant(functools.partial(
      ta.tree_advantages, split_points=splits, branching=branching,
      pruned_depths=pruned, width_pruning=width, width_ratio=ratio))
  got = fn(reward_BG, mask_NT)
  want_adv, want_mask, _, _ = ref_tree_advantages(
      reward_BG, mask_NT, logp_NT, splits, branching, pruned_depths=pruned,
      width_pruning=width, ratio=ratio)
  np.testing.assert_array_equal(got.loss_mask_NT, want_mask)
  np.testing.assert_allclose(got.adv_NT, want_adv, rtol=1e-5, atol=1e-5)
  if pruned or ratio < 1:
    assert want_mask.sum() < mask_NT.sum()  # the case prunes something


def test_hand_computed_tree():
  # One prompt, splits (0, 1), branching (2, 2): leaves 0,1 under node 0 and
  # leaves 2,3 under node 1. Rewards 1, 0, 0, 0.
  reward_BG = np.array([[1.0, 0.0, 0.0, 0.0]])
  mask_NT = np.ones((4, 3), bool)
  mask_NT[3, 2] = False
  out = _tree_advantages(reward_BG, mask_NT, split_points=(0, 1),
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


def test_hand_computed_edge_softmax():
  # Splits (0, 1), branching (2, 2), T = 2; rewards 1, 0, 0, 1. The second
  # token is each leaf's own edge: probabilities 0.75, 0.25 under depth-0
  # node 0 and 0.5, 0.5 under node 1 (first tokens do not enter: the root's
  # value is not used).
  reward_BG = np.array([[1.0, 0.0, 0.0, 1.0]])
  logp_NT = np.log(np.array([[0.3, 0.75], [0.3, 0.25], [0.9, 0.5],
                             [0.9, 0.5]], np.float32))
  mask_NT = np.ones((4, 2), bool)
  edges = ta.edge_log_probs(logp_NT, mask_NT, split_points=(0, 1),
                            branching=(2, 2))
  np.testing.assert_allclose(edges[0], [np.log([0.3, 0.9])], rtol=1e-6)
  np.testing.assert_allclose(edges[1], [np.log([0.75, 0.25, 0.5, 0.5])],
                             rtol=1e-6)
  out = _tree_advantages(reward_BG, mask_NT, logp_NT=logp_NT,
                         split_points=(0, 1), branching=(2, 2),
                         value_weighting="edge_softmax")
  # softmax(log p) = p / sum p: node 0 = 0.75 * 1 + 0.25 * 0, node 1 = 0.5.
  np.testing.assert_allclose(out.values[0], [[0.75, 0.5]], rtol=1e-6)
  # Depth 0: mean 0.625, deviations +-0.125, sample std 0.125 sqrt(2).
  a0 = 0.125 / (0.125 * math.sqrt(2) + EPS)
  np.testing.assert_allclose(out.node_adv[0], [[a0, -a0]], rtol=1e-6)
  # Depth 1: the leaf rewards, mean 0.5, sample std sqrt(1 / 3).
  a1 = 0.5 / (math.sqrt(1 / 3) + EPS)
  np.testing.assert_allclose(out.node_adv[1], [[a1, -a1, -a1, a1]],
                             rtol=1e-6)
  # alpha = 2: weights 0.75^2 / (0.75^2 + 0.25^2) = 0.9 and 0.1.
  out = _tree_advantages(reward_BG, mask_NT, logp_NT=logp_NT,
                         split_points=(0, 1), branching=(2, 2),
                         value_weighting="edge_softmax", value_alpha=2.0)
  np.testing.assert_allclose(out.values[0], [[0.9, 0.5]], rtol=1e-6)
  # The mean gives 0.5 to both nodes: no depth-0 signal.
  out = _tree_advantages(reward_BG, mask_NT, split_points=(0, 1),
                         branching=(2, 2))
  np.testing.assert_array_equal(out.node_adv[0], [[0.0, 0.0]])


def test_hand_computed_path_weights():
  # rlax_llm's path-softmax variant. Branching (1, 2), splits (0, 1), T = 3:
  # the single depth-0 node ended with its first token, so its two leaves are
  # copies of one path and each gets half its probability mass.
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


def test_edge_softmax_recursion_three_depths_by_hand():
  # Branching (1, 2, 2): depth-1 nodes A (leaves 0, 1) and B (leaves 2, 3).
  # Depth-2 edge probabilities: A's 0.5 / 0.5, B's 0.8 / 0.2; rewards
  # 1, 0, 1, 0 -> V(A) = 0.5, V(B) = 0.8. Depth-1 edge probabilities
  # 0.25 (A) and 0.75 (B) -> V(root child) = 0.25 * 0.5 + 0.75 * 0.8.
  splits = (0, 1, 2)
  p = np.array([[0.5, 0.25, 0.5], [0.5, 0.25, 0.5], [0.5, 0.75, 0.8],
                [0.5, 0.75, 0.2]], np.float32)
  vals = ta.edge_softmax_values(
      np.array([[1.0, 0.0, 1.0, 0.0]]),
      ta.edge_log_probs(np.log(p), np.ones((4, 3), bool), split_points=splits,
                        branching=(1, 2, 2)), branching=(1, 2, 2))
  np.testing.assert_allclose(vals[2], [[1.0, 0.0, 1.0, 0.0]])
  np.testing.assert_allclose(vals[1], [[0.5, 0.8]], rtol=1e-6)
  np.testing.assert_allclose(vals[0], [[0.25 * 0.5 + 0.75 * 0.8]], rtol=1e-6)


def test_depth_std_floor_and_eps_by_hand():
  # Official: std < 1e-6 gives 0; otherwise divide by std + 1e-8.
  small, = ta.depth_advantages([np.array([[0.0, 1e-6]])])
  np.testing.assert_array_equal(small, [[0.0, 0.0]])  # std 7.1e-7
  big, = ta.depth_advantages([np.array([[0.0, 2e-6]])])
  want = 1e-6 / (math.sqrt(2) * 1e-6 + 1e-8)  # 0.7021, not 1/sqrt(2)
  np.testing.assert_allclose(big, [[-want, want]], rtol=1e-5)
  one, = ta.depth_advantages([np.array([[3.0], [5.0]])])
  np.testing.assert_array_equal(one, [[0.0], [0.0]])  # one node per depth
  centred, = ta.depth_advantages([np.array([[1.0, 2.0, 6.0]])],
                                 scale_by_std=False)
  np.testing.assert_allclose(centred, [[-2.0, -1.0, 3.0]], rtol=1e-6)


def test_width_pruning_by_hand():
  # Splits (0, 1), branching (2, 2), T = 5: the last split is at 1, so the
  # ranked transitions are t = 2, 3, 4 (t = 1, the split itself, trains).
  splits, branching = (0, 1), (2, 2)
  mask_NT = np.ones((4, 5), bool)
  mask_NT[1, 4] = False  # leaf 1 has 2 transitions after the split
  mask_NT[2, 2:] = False  # leaf 2 has none
  out = _tree_advantages(np.array([[1.0, 0.5, 0.0, 0.25]]), mask_NT,
                         split_points=splits, branching=branching,
                         width_pruning="best_per_branch", width_ratio=0.5)
  # Per leaf: max(1, floor(n / 2)) of n = 3, 2, 0, 3 -> the first 1, 1, 0, 1.
  want = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0],
                   [1, 1, 1, 0, 0]], bool)
  np.testing.assert_array_equal(out.loss_mask_NT, want)
  # Best and worst: n = 8, k = 4: the 2 best (leaf 0's t = 2, 3) and the 2
  # worst (leaf 3's t = 3, 4: leaf 3 ranks last, its transitions in order).
  out = _tree_advantages(np.array([[1.0, 0.5, 0.0, 0.25]]), mask_NT,
                         split_points=splits, branching=branching,
                         width_pruning="best_and_worst", width_ratio=0.5)
  want = np.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0],
                   [1, 1, 0, 1, 1]], bool)
  np.testing.assert_array_equal(out.loss_mask_NT, want)
  # Ties keep tree order: rewards 1, 1, 0, 0 with full masks, n = 12, k = 6:
  # the best 3 are leaf 0's, the worst 3 the end of the order, leaf 3's.
  out = _tree_advantages(np.array([[1.0, 1.0, 0.0, 0.0]]),
                         np.ones((4, 5), bool), split_points=splits,
                         branching=branching,
                         width_pruning="best_and_worst", width_ratio=0.5)
  np.testing.assert_array_equal(out.loss_mask_NT[:, 2:].all(axis=1),
                                [True, False, False, True])
  np.testing.assert_array_equal(out.loss_mask_NT[:, 2:].any(axis=1),
                                [True, False, False, True])


def test_adv_clip_by_hand():
  # 30 leaves, one reward 1: its z-score is 29 / sqrt(30) = 5.29 > 5, the
  # others -1 / sqrt(30) = -0.18; the clip acts after width ranking.
  reward_BG = np.zeros((1, 30), np.float32)
  reward_BG[0, 4] = 1.0
  out = _tree_advantages(reward_BG, np.ones((30, 2), bool),
                         split_points=(0,), branching=(30,), adv_clip=5.0)
  z = 29 / math.sqrt(30)
  assert z > 5
  np.testing.assert_allclose(out.node_adv[0][0, 4], z / (1 + EPS * math.sqrt(
      30)), rtol=1e-5)  # node advantages stay unclipped
  want = np.full((30, 2), -1 / math.sqrt(30))
  want[4] = 5.0
  np.testing.assert_allclose(out.adv_NT, want, rtol=1e-5)


def test_active_pruned_depths():
  # The official example: window 15..18, every 30 steps, stop at depth 9.
  base = (15, 16, 17, 18)
  assert ta.active_pruned_depths(base, rl_step=29, slide=True, interval=30,
                                 stop_depth=9) == base
  assert ta.active_pruned_depths(base, rl_step=30, slide=True, interval=30,
                                 stop_depth=9) == (14, 15, 16, 17)
  assert ta.active_pruned_depths(base, rl_step=10**6, slide=True,
                                 interval=30, stop_depth=9) == (9, 10, 11, 12)
  assert ta.active_pruned_depths(base, rl_step=500, interval=30,
                                 stop_depth=9) == base  # no slide
  assert ta.active_pruned_depths((3, 1), rl_step=1, slide=True,
                                 stop_depth=0) == (0, 2)  # moves at step 1
  assert ta.active_pruned_depths((), rl_step=7, slide=True) == ()


@pytest.mark.parametrize("interval,stop", [(1, 0), (3, 1), (4, 5)])
def test_active_pruned_depths_matches_step_loop(interval, stop):
  base = (2, 4)
  shallowest = min(base)
  for step in range(1, 25):
    # Loop reference: one depth shallower at each multiple of the interval,
    # never past the stop depth.
    if step % interval == 0 and shallowest > stop:
      shallowest -= 1
    shift = min(base) - shallowest
    assert ta.active_pruned_depths(
        base, rl_step=step, slide=True, interval=interval,
        stop_depth=stop) == tuple(d - shift for d in base), step


def test_depth_prune_mask_by_hand():
  mask_NT = np.ones((2, 6), bool)
  got = ta.depth_prune_mask(mask_NT, split_points=(0, 1, 3),
                            pruned_depths=(0, 2))
  np.testing.assert_array_equal(got, [[0, 1, 1, 0, 0, 0]] * 2)
  got = ta.depth_prune_mask(mask_NT, split_points=(0, 1, 3),
                            pruned_depths=(7, -1))  # outside: ignored
  np.testing.assert_array_equal(got, mask_NT)


def test_edge_weighted_loss_counts_each_edge_once():
  """The leaf rows' weighted loss (as the update step applies the weights)
  equals a loop over the tree's distinct edges, each counted once."""
  from rlax_llm.core import objectives  # pylint: disable=g-import-not-at-top
  splits, branching, t = (0, 1, 3), (2, 3, 2), 5
  b_count, g_count = 2, 12
  rng = np.random.default_rng(21)
  reward_BG, mask_NT, _ = random_tree_batch(rng, b_count, splits, branching,
                                            t, end_prob=0.2)
  reward_BG = rng.random(reward_BG.shape).astype(np.float32)
  seg = ref_segments(splits, t)
  per_node = [math.prod(branching[d + 1:]) for d in range(len(branching))]
  # One parameter per distinct edge token: theta[b, u, t] for the node u at
  # depth seg[t] (entries u >= M_d unused).
  m_last = g_count
  old = rng.normal(size=(b_count, m_last, t)).astype(np.float32) - 1
  theta = old + rng.uniform(-0.05, 0.05, old.shape).astype(np.float32)
  node_of = np.array([[g // per_node[seg[i]] for i in range(t)]
                      for g in range(g_count)])  # [G, T]

  def leaf_rows(x_BMT):
    return jnp.stack([x_BMT[:, node_of[:, i], i] for i in range(t)],
                     -1).reshape(b_count * g_count, t)

  tree = _tree_advantages(reward_BG, mask_NT, split_points=splits,
                          branching=branching, pruned_depths=(1,))
  w_NT = np.asarray(tree.loss_mask_NT) * np.tile(
      ta.edge_weights(splits, branching, t), (b_count, 1))

  def loss_fn(th, w):
    loss, _ = objectives.ppo_clip_loss(
        leaf_rows(th), leaf_rows(jnp.asarray(old)), tree.adv_NT * w, w > 0,
        num_tokens=jnp.sum(w))
    return loss

  loss, grad = jax.value_and_grad(loss_fn)(jnp.asarray(theta), w_NT)
  # NumPy loop over distinct edges: depth-d node u's valid tokens, once.
  total, count = 0.0, 0
  want_grad = np.zeros(theta.shape)
  for b in range(b_count):
    for d in range(len(branching)):
      if d == 1:
        continue  # pruned
      for u in range(g_count // per_node[d]):
        row = b * g_count + u * per_node[d]
        adv = float(tree.node_adv[d][b, u])
        for i in range(t):
          if seg[i] != d or not mask_NT[row, i]:
            continue
          ratio = math.exp(float(theta[b, u, i]) - float(old[b, u, i]))
          total += -ratio * adv  # |ratio - 1| < 0.06: inside the clip
          want_grad[b, u, i] = -ratio * adv
          count += 1
  assert count == pytest.approx(float(w_NT.sum()), rel=1e-6)
  np.testing.assert_allclose(loss, total / count, rtol=1e-5)
  np.testing.assert_allclose(grad, want_grad / count, rtol=1e-4, atol=1e-7)
  # Unweighted leaf rows count a shared prefix once per leaf: a different
  # loss, so the check above can fail.
  unweighted = loss_fn(jnp.asarray(theta), np.asarray(tree.loss_mask_NT,
                                                      np.float32))
  assert abs(float(unweighted) - total / count) > 1e-3


def test_constant_rewards_and_single_child_give_zeros():
  mask_NT = np.ones((8, 4), bool)
  for weighting in ta.VALUE_WEIGHTINGS:
    out = jax.jit(functools.partial(
        ta.tree_advantages, split_points=(0, 2), branching=(2, 2),
        value_weighting=weighting))(np.full((2, 4), 0.7), mask_NT,
                                    logp_NT=np.linspace(-3, -1, 32).reshape(
                                        8, 4))
    assert np.all(out.adv_NT == 0) and np.all(np.isfinite(out.adv_NT))
  # K_0 = 1: a single root child; its depth-0 advantage is 0, deeper ones not.
  out = _tree_advantages(np.array([[1.0, 0.0, 0.0]]), np.ones((3, 2), bool),
                         split_points=(0, 1), branching=(1, 3))
  np.testing.assert_array_equal(out.node_adv[0], [[0.0]])
  assert np.all(out.adv_NT[:, 0] == 0) and np.all(out.adv_NT[:, 1] != 0)
  # A whole tree of one leaf.
  out = _tree_advantages(np.array([[1.0]]), np.ones((1, 2), bool),
                         split_points=(0,), branching=1)
  np.testing.assert_array_equal(out.adv_NT, [[0.0, 0.0]])


def test_full_depth_tree_of_one_split_is_grpo():
  rng = np.random.default_rng(3)
  reward_BG = rng.normal(size=(3, 6)).astype(np.float32)
  mask_NT = rng.random((18, 4)) < 0.8
  out = _tree_advantages(reward_BG, mask_NT, split_points=(0,),
                         branching=(6,))
  mean = reward_BG.mean(axis=1, keepdims=True)
  std = reward_BG.std(axis=1, ddof=1, keepdims=True)
  want = ((reward_BG - mean) / (std + EPS)).reshape(18, 1)
  np.testing.assert_allclose(out.adv_NT, np.where(mask_NT, want, 0),
                             rtol=1e-5, atol=1e-6)


def test_vmap_over_leading_axis():
  rng = np.random.default_rng(5)
  splits, branching, t = (0, 1, 2), (4, 2, 2), 5
  batches = [random_tree_batch(rng, 2, splits, branching, t) for _ in range(3)]
  r_KBG = np.stack([x[0] for x in batches])
  m_KNT = np.stack([x[1] for x in batches])
  fn = functools.partial(ta.tree_advantages, split_points=splits,
                         branching=branching, width_pruning="best_and_worst")
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


@pytest.mark.parametrize("weighting", ["edge_softmax", "path_softmax"])
def test_weighted_values_need_logp(weighting):
  with pytest.raises(ValueError, match="pass logp_NT"):
    ta.tree_advantages(np.zeros((1, 2)), np.ones((2, 2), bool),
                       split_points=(0,), branching=2,
                       value_weighting=weighting)
  with pytest.raises(ValueError, match="choose one of"):
    ta.tree_advantages(np.zeros((1, 2)), np.ones((2, 2), bool),
                       split_points=(0,), branching=2, value_weighting="max")
  with pytest.raises(ValueError, match="not one of"):
    ta.width_prune_mask(np.zeros((2, 2)), np.ones((2, 2), bool),
                        split_points=(0,), branching=(2,), mode="top")
  assert ta.validate_tree([0, 2], 3) == ((0, 2), (3, 3))
