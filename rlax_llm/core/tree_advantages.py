"""Depth-wise advantages over shared-prefix rollout trees (BranchGRPO).

A tree of completions for one prompt is fixed by split points
``s_0 = 0 < s_1 < ... < s_{D-1} < T`` (token offsets in the completion) and
branching factors ``K_0, ..., K_{D-1}``: the root (the prompt) has ``K_0``
children, each decodes tokens ``[s_0, s_1)``; at ``s_d`` every node gets
``K_d`` children that continue independently over ``[s_d, s_{d+1})`` (the last
segment runs to ``T``). Depth ``d`` holds ``M_d = K_0 ... K_d`` nodes and the
tree ends in ``G = M_{D-1}`` leaves, one per training row. Leaf ``g``'s
ancestor at depth ``d`` is node ``g // S_d`` with ``S_d = G / M_d`` leaves per
depth-``d`` node, and the tokens of segment ``d`` of its row belong to that
ancestor.

A node whose path ends (EOS) before a split is expanded by duplication: its
leaves are exact copies of one completion. Each copy is a genuine sample of the
policy (nothing is drawn after EOS), so uniform leaf means over all G rows are
the recursive child means, and every statistic below treats the tree as full.
Under the per-edge softmax the children of a finished node are all copies
with empty edges (log-prob 0), so they share the weight equally and the node
keeps the copies' reward; the path-softmax variant of ours divides a copy's
weight by its copy count (:func:`path_log_weights`), so a finished path keeps
its own probability mass.

The advantage pipeline, each step a small pure function:

  node_values | edge_softmax_values -> depth_advantages -> token_advantages
      -> depth_prune_mask -> width_prune_mask

:func:`tree_advantages` chains them. "BranchGRPO: Stable and Efficient GRPO
with Structured Branching in Diffusion Models" (arXiv:2509.06040) introduced
the reward fusion, depth-wise normalisation and pruning for diffusion
denoising trees; its official code (Fredreic1849/BranchGRPO,
fastvideo/train_branchgrpo_flux.py, cited below as "flux.py:LINE") is
followed rule by rule, with a depth being a span of tokens between two split
points. In the official tree every denoising step is one depth and the steps
between two splits form a chain of single-child nodes; a chain's nodes have
the same leaves, so their values and depth-wise advantages coincide and one
token span here stands for the whole chain.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np


__all__ = [
    "TreeAdvantages",
    "VALUE_WEIGHTINGS",
    "WIDTH_PRUNING_MODES",
    "active_pruned_depths",
    "ancestor_index",
    "depth_advantages",
    "depth_prune_mask",
    "edge_log_probs",
    "edge_softmax_values",
    "edge_weights",
    "node_values",
    "path_log_weights",
    "segment_ids",
    "token_advantages",
    "tree_advantages",
    "validate_tree",
    "width_prune_mask",
]


def validate_tree(split_points: Sequence[int], branching: int | Sequence[int],
                  *, num_samples: Optional[int] = None,
                  max_new_tokens: Optional[int] = None
                  ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Checks a tree shape and returns it as tuples of ints.

  Args:
    split_points: token offsets ``s_0 = 0 < s_1 < ... < s_{D-1}``.
    branching: ``K_d`` per split, or one int used at every split.
    num_samples: if given, G, which must equal ``prod(K)``.
    max_new_tokens: if given, T, which every split point must precede.

  Returns:
    ``(split_points, branching)``, both tuples of length D.

  Raises:
    ValueError: naming what is wrong with the shape and how to fix it.
  """
  splits = tuple(int(s) for s in split_points)
  if not splits or splits[0] != 0:
    raise ValueError(f"split_points must start at 0 (the first segment begins "
                     f"at the first completion token), got {list(splits)}.")
  if any(b <= a for a, b in zip(splits, splits[1:])):
    raise ValueError(f"split_points must be strictly increasing, got "
                     f"{list(splits)}.")
  if max_new_tokens is not None and splits[-1] >= max_new_tokens:
    raise ValueError(
        f"split point {splits[-1]} leaves no token to sample after it: every "
        f"split point must be < max_new_tokens={max_new_tokens}. Drop the "
        "late split points or raise the completion budget.")
  if isinstance(branching, (int, np.integer)):
    ks = (int(branching),) * len(splits)
  else:
    ks = tuple(int(k) for k in branching)
  if len(ks) != len(splits):
    raise ValueError(f"branching has {len(ks)} factors for {len(splits)} "
                     f"split points ({list(splits)}); give one factor per "
                     "split point, or a single int for all of them.")
  if any(k < 1 for k in ks):
    raise ValueError(f"branching factors must be >= 1, got {list(ks)}.")
  if num_samples is not None and math.prod(ks) != num_samples:
    raise ValueError(
        f"The tree has prod(branching) = {math.prod(ks)} leaves "
        f"(branching={list(ks)}) but rl.num_samples = {num_samples}: each "
        "leaf is one training row, so set rl.num_samples to "
        f"{math.prod(ks)} or change the branching factors.")
  return splits, ks


def segment_ids(split_points: Sequence[int],
                max_new_tokens: int) -> np.ndarray:
  """[T] int32 depth of each completion position: d with s_d <= t < s_{d+1}."""
  splits = np.asarray(split_points)
  return (np.searchsorted(splits, np.arange(max_new_tokens), side="right")
          - 1).astype(np.int32)


def _leaves_per_node(branching: Sequence[int]) -> list[int]:
  """S_d = K_{d+1} ... K_{D-1}, leaves under one depth-d node."""
  return [math.prod(branching[d + 1:]) for d in range(len(branching))]


def edge_weights(split_points: Sequence[int], branching: Sequence[int],
                 max_new_tokens: int) -> np.ndarray:
  """[G, T] float32 weights that train each tree edge once.

    w_{g,t} = 1 / S_d,   d the depth of position t, S_d = K_{d+1} ... K_{D-1}

  A depth-d segment is the same tokens in the S_d leaf rows below its node;
  weighting each copy by 1 / S_d makes the tree's loss count every edge
  once, as the official code trains each parent-child transition of its tree
  once (`collect_all_transitions`, flux.py:1199-1223), instead of once per
  leaf path below it. Rows are leaves in tree order (as `tree_advantages`).
  """
  splits, ks = validate_tree(split_points, branching)
  per_node = np.asarray(_leaves_per_node(ks), np.float32)
  w_T = 1.0 / per_node[segment_ids(splits, max_new_tokens)]
  return np.broadcast_to(w_T, (math.prod(ks), max_new_tokens)).astype(
      np.float32)


def ancestor_index(branching: Sequence[int], depth: int) -> np.ndarray:
  """[G] int32: the depth-``depth`` node of each leaf, ``g // S_depth``."""
  g = math.prod(branching)
  return (np.arange(g) // _leaves_per_node(branching)[depth]).astype(np.int32)


def path_log_weights(logp_NT: jax.typing.ArrayLike,
                     mask_NT: jax.typing.ArrayLike, *,
                     split_points: Sequence[int],
                     branching: Sequence[int]) -> jax.Array:
  """Log-weight of each leaf path, for rlax_llm's path-softmax node values.

  Not in the official BranchGRPO code: its optional weighting is the
  recursive per-edge softmax of :func:`edge_softmax_values`. This variant of
  ours takes one softmax over whole-path log-probs under each node, which
  concentrates a node's value on its likeliest leaf.

    log w_n = sum_t logp_{n,t} mask_{n,t} - log S_{e(n)}

  where ``e(n)`` is the depth of the segment holding row n's last valid
  token and ``S_e`` the number of leaves under a depth-``e`` node. A path
  that ended at depth ``e < D-1`` fills all ``S_e`` leaves of its node with
  copies; the ``- log S_e`` splits its probability among them. Rows with no
  valid token get ``log S = 0``.

  Args:
    logp_NT: [N, T] token log-probs (N = B * G, leaves of a prompt adjacent).
    mask_NT: [N, T] valid tokens (bool or ``!= 0``).
    split_points: the tree's split points (static).
    branching: the tree's branching factors (static).

  Returns:
    [B, G] float32 log-weights.
  """
  logp_NT = jnp.asarray(logp_NT, jnp.float32)
  mask_NT = jnp.asarray(mask_NT)
  mask_NT = mask_NT if mask_NT.dtype == jnp.bool_ else mask_NT != 0
  chex.assert_rank(logp_NT, 2)
  chex.assert_equal_shape([logp_NT, mask_NT])
  g = math.prod(branching)
  n, t = logp_NT.shape
  if n % g:
    raise ValueError(f"{n} rows are not a whole number of {g}-leaf trees.")
  seg_T = jnp.asarray(segment_ids(split_points, t))
  last_N = jnp.max(jnp.where(mask_NT, jnp.arange(t), -1), axis=-1)
  end_N = jnp.where(last_N >= 0, seg_T[jnp.maximum(last_N, 0)],
                    len(branching) - 1)
  log_copies_D = jnp.log(jnp.asarray(_leaves_per_node(branching), jnp.float32))
  total_N = jnp.sum(jnp.where(mask_NT, logp_NT, 0.0), axis=-1)
  return (total_N - log_copies_D[end_N]).reshape(n // g, g)


def node_values(reward_BG: jax.typing.ArrayLike, *,
                branching: Sequence[int],
                log_weight_BG: Optional[jax.typing.ArrayLike] = None
                ) -> tuple[jax.Array, ...]:
  """Value of every node: the mean reward of its leaves (reward fusion).

    V(u) = 1 / S_d  sum_{g in leaves(u)} r_g                (default)
    V(u) = sum_{g in leaves(u)} softmax_g(log w_g) r_g      (log_weight_BG)

  The uniform mean is the official default, `compute_node_rewards_from_leaves`
  with `use_prob_weighted=False` (flux.py:645-651: each internal node's
  reward is the mean of all its leaf descendants). The weighted form is a
  variant of rlax_llm, not of the official code (whose optional weighting is
  :func:`edge_softmax_values`): with :func:`path_log_weights` it softmaxes
  whole-path log-probs, so a node's value collapses onto its likeliest leaf.
  A node whose leaves all have the same reward gets exactly that reward.

  Args:
    reward_BG: [B, G] leaf rewards, leaves in tree order.
    branching: the tree's branching factors (static); prod must be G.
    log_weight_BG: optional [B, G] leaf log-weights; None gives the mean.

  Returns:
    A tuple of D float32 arrays, depth d of shape [B, M_d].
  """
  reward_BG = _check_rewards(reward_BG, branching)
  b, g = reward_BG.shape
  if log_weight_BG is not None:
    log_weight_BG = jnp.asarray(log_weight_BG, jnp.float32)
    chex.assert_equal_shape([reward_BG, log_weight_BG])
  values = []
  for s in _leaves_per_node(branching):
    r_BMS = reward_BG.reshape(b, g // s, s)
    if log_weight_BG is None:
      values.append(jnp.mean(r_BMS, axis=-1))
    else:
      w_BMS = jax.nn.softmax(log_weight_BG.reshape(b, g // s, s), axis=-1)
      values.append(_guarded_sum(w_BMS, r_BMS))
  return tuple(values)


def _check_rewards(reward_BG, branching) -> jax.Array:
  reward_BG = jnp.asarray(reward_BG, jnp.float32)
  chex.assert_rank(reward_BG, 2)
  if math.prod(branching) != reward_BG.shape[1]:
    raise ValueError(f"reward_BG has G={reward_BG.shape[1]} leaves but "
                     f"prod(branching)={math.prod(branching)} "
                     f"(branching={list(branching)}).")
  return reward_BG


def _guarded_sum(w_BMK: jax.Array, v_BMK: jax.Array) -> jax.Array:
  """sum_k w v over the last axis, kept inside [min v, max v].

  Rounding in the weights must not make equal children an unequal parent.
  """
  lo_BM, hi_BM = jnp.min(v_BMK, axis=-1), jnp.max(v_BMK, axis=-1)
  return jnp.where(lo_BM == hi_BM, lo_BM, jnp.clip(
      jnp.sum(w_BMK * v_BMK, axis=-1), lo_BM, hi_BM))


def edge_log_probs(logp_NT: jax.typing.ArrayLike,
                   mask_NT: jax.typing.ArrayLike, *,
                   split_points: Sequence[int],
                   branching: Sequence[int]) -> tuple[jax.Array, ...]:
  """Log-prob of each node's own edge: its segment's summed token log-probs.

    l(u) = sum_{t in segment d} logp_{n(u), t} mask_{n(u), t}

  for a depth-d node u, read from its first leaf row n(u) (every leaf below
  u holds the same segment-d tokens). The official edge is one denoising
  step (`child.log_prob`, flux.py:479-482); here an edge is the node's token
  span. A segment with no valid token (a finished path's copies) has l = 0,
  as the official code gives a missing log-prob 0 (flux.py:628-630).

  Args:
    logp_NT: [N, T] token log-probs (N = B * G, leaves of a prompt adjacent).
    mask_NT: [N, T] valid tokens (bool or ``!= 0``).
    split_points: the tree's split points (static).
    branching: the tree's branching factors (static).

  Returns:
    A tuple of D float32 arrays, depth d of shape [B, M_d].
  """
  logp_NT = jnp.asarray(logp_NT, jnp.float32)
  mask_NT = _as_bool(mask_NT)
  chex.assert_rank(logp_NT, 2)
  chex.assert_equal_shape([logp_NT, mask_NT])
  g = math.prod(branching)
  n, t = logp_NT.shape
  if n % g:
    raise ValueError(f"{n} rows are not a whole number of {g}-leaf trees.")
  seg_T = segment_ids(split_points, t)
  lp_BGT = jnp.where(mask_NT, logp_NT, 0.0).reshape(n // g, g, t)
  out = []
  for d, s in enumerate(_leaves_per_node(branching)):
    in_seg_T = jnp.asarray(seg_T == d)
    out.append(jnp.sum(jnp.where(in_seg_T, lp_BGT[:, ::s], 0.0), axis=-1))
  return tuple(out)


def edge_softmax_values(reward_BG: jax.typing.ArrayLike,
                        edge_logp: Sequence[jax.typing.ArrayLike], *,
                        branching: Sequence[int],
                        alpha: float = 1.0) -> tuple[jax.Array, ...]:
  """Node values by a recursive softmax over each child's own edge log-prob.

    V_{D-1}(g) = r_g
    V_d(u)     = sum_{c in children(u)} softmax_c(alpha l(c)) V_{d+1}(c)

  bottom-up, depth by depth: the official `tree_prob_weighted` option of
  `compute_node_rewards_from_leaves` (flux.py:615-643; alpha is fixed to 1.0
  there, flux.py:617). A single child passes its value up unchanged
  (flux.py:621-623), as a softmax over one child does. A node whose children
  all have the same value gets exactly that value.

  Args:
    reward_BG: [B, G] leaf rewards, leaves in tree order.
    edge_logp: D arrays [B, M_d], each node's edge log-prob (from
      :func:`edge_log_probs`).
    branching: the tree's branching factors (static).
    alpha: temperature of the softmax (static or traced scalar).

  Returns:
    A tuple of D float32 arrays, depth d of shape [B, M_d].
  """
  reward_BG = _check_rewards(reward_BG, branching)
  b = reward_BG.shape[0]
  if len(edge_logp) != len(branching):
    raise ValueError(f"{len(edge_logp)} depths of edge log-probs for a tree "
                     f"of depth {len(branching)}.")
  values = [reward_BG]
  for d in range(len(branching) - 2, -1, -1):
    m, k = math.prod(branching[:d + 1]), branching[d + 1]
    lp_BMK = jnp.asarray(edge_logp[d + 1], jnp.float32).reshape(b, m, k)
    v_BMK = values[0].reshape(b, m, k)
    w_BMK = jax.nn.softmax(alpha * lp_BMK, axis=-1)
    values.insert(0, _guarded_sum(w_BMK, v_BMK))
  return tuple(values)


def depth_advantages(values: Sequence[jax.typing.ArrayLike], *,
                     scale_by_std: bool = True, eps: float = 1e-8,
                     std_floor: float = 1e-6) -> tuple[jax.Array, ...]:
  """Node values normalised among the nodes of one depth of one prompt.

    A(u) = (V(u) - mean_d V) / (std_d V + eps)   if std_d V >= std_floor
    A(u) = 0                                       otherwise

  with the sample std (ddof=1, torch's `Tensor.std`), as
  `compute_hierarchical_advantages_by_depth` (flux.py:655-689): a depth of
  one node gets 0 (flux.py:663-667), a depth whose std is below 1e-6 gets 0
  (flux.py:675-677), otherwise the std plus 1e-8 divides (flux.py:680), over
  the nodes of one tree (flux.py:1170-1179). ``scale_by_std=False`` (from
  rl.scale_by_std, not in the official code) only centres, with the same
  zero for depths below the floor.

  Args:
    values: D arrays [B, M_d] (from :func:`node_values`).
    scale_by_std: divide by the depth's std.
    eps: added to the std (official 1e-8).
    std_floor: depths whose std is below it get 0 (official 1e-6).

  Returns:
    A tuple of D float32 arrays [B, M_d].
  """
  out = []
  for v_BM in values:
    v_BM = jnp.asarray(v_BM, jnp.float32)
    chex.assert_rank(v_BM, 2)
    m = v_BM.shape[1]
    if m < 2:
      out.append(jnp.zeros_like(v_BM))
      continue
    centred_BM = v_BM - jnp.mean(v_BM, axis=1, keepdims=True)
    std_B1 = jnp.sqrt(jnp.sum(centred_BM**2, axis=1, keepdims=True) / (m - 1))
    adv_BM = centred_BM / (std_B1 + eps) if scale_by_std else centred_BM
    out.append(jnp.where(std_B1 < std_floor, 0.0, adv_BM))
  return tuple(out)


def _as_bool(mask_NT) -> jax.Array:
  mask_NT = jnp.asarray(mask_NT)
  return mask_NT if mask_NT.dtype == jnp.bool_ else mask_NT != 0


def token_advantages(node_adv: Sequence[jax.typing.ArrayLike],
                     mask_NT: jax.typing.ArrayLike, *,
                     split_points: Sequence[int],
                     branching: Sequence[int]) -> jax.Array:
  """Gives each token the advantage of the node that generated it.

    A_{(b,g), t} = A_d(b, g // S_d)   with d = depth of position t

  Args:
    node_adv: D arrays [B, M_d] (from :func:`depth_advantages`).
    mask_NT: [N, T] valid tokens; the result is 0 elsewhere.
    split_points: the tree's split points (static).
    branching: the tree's branching factors (static).

  Returns:
    [N, T] float32 per-token advantages, N = B * G.
  """
  mask_NT = jnp.asarray(mask_NT)
  mask_NT = mask_NT if mask_NT.dtype == jnp.bool_ else mask_NT != 0
  chex.assert_rank(mask_NT, 2)
  if len(node_adv) != len(branching):
    raise ValueError(f"{len(node_adv)} depths of advantages for a tree of "
                     f"depth {len(branching)}.")
  g = math.prod(branching)
  n, t = mask_NT.shape
  b = n // g
  per_depth_DBG = jnp.stack([
      jnp.asarray(a, jnp.float32)[:, ancestor_index(branching, d)]
      for d, a in enumerate(node_adv)])
  chex.assert_shape(per_depth_DBG, (len(branching), b, g))
  seg_T = segment_ids(split_points, t)
  adv_BGT = jnp.moveaxis(per_depth_DBG[seg_T], 0, -1)
  return jnp.where(mask_NT, adv_BGT.reshape(n, t), 0.0)


def active_pruned_depths(pruned_depths: Sequence[int], *, rl_step: int,
                         slide: bool = False, interval: int = 1,
                         stop_depth: int = 0) -> tuple[int, ...]:
  """The depths depth pruning drops at RL step ``rl_step`` (host-side).

    shift = min(rl_step // interval, max(0, min(P) - stop_depth))
    active = {d - shift : d in P}                 (slide)
    active = P                                    (no slide)

  The official sliding window (flux.py:1278-1296): the window of pruned
  depths moves one depth shallower every ``interval`` training steps until
  its shallowest depth reaches ``stop_depth`` (official default: the depth
  of the last split's parent, flux.py:1281-1283). ``rl_step`` counts RL
  steps from 1, as the official `current_step` (flux.py:1857, 1877).

  Args:
    pruned_depths: the base set P of depths to drop.
    rl_step: the RL step, 1 for the first.
    slide: move the window with the step.
    interval: RL steps per one-depth move (>= 1).
    stop_depth: the shallowest depth the window may reach.

  Returns:
    The sorted tuple of depths to drop.
  """
  base = sorted(int(d) for d in pruned_depths)
  if not base or not slide:
    return tuple(base)
  shift = min(max(0, int(rl_step) // max(1, int(interval))),
              max(0, base[0] - int(stop_depth)))
  return tuple(d - shift for d in base)


def depth_prune_mask(mask_NT: jax.typing.ArrayLike, *,
                     split_points: Sequence[int],
                     pruned_depths: Sequence[int] = ()) -> jax.Array:
  """Drops the loss on the segments of the depths in ``pruned_depths``.

  The official depth pruning (flux.py:1270-1322): the rollout still samples
  and scores every depth; edges into a node of a listed depth are left out
  of training (`child_depth not in pruning_depths`, flux.py:1304). Depths
  outside the tree are ignored, as there.

  Args:
    mask_NT: [N, T] valid tokens.
    split_points: the tree's split points (static).
    pruned_depths: depths whose tokens do not train (static).

  Returns:
    [N, T] bool mask.
  """
  mask_NT = _as_bool(mask_NT)
  chex.assert_rank(mask_NT, 2)
  seg_T = segment_ids(split_points, mask_NT.shape[1])
  keep_T = ~np.isin(seg_T, np.asarray(tuple(pruned_depths), np.int64))
  return mask_NT & jnp.asarray(keep_T)[None, :]


WIDTH_PRUNING_MODES = ("none", "best_per_branch", "best_and_worst")


def width_prune_mask(adv_NT: jax.typing.ArrayLike,
                     mask_NT: jax.typing.ArrayLike, *,
                     split_points: Sequence[int], branching: Sequence[int],
                     mode: str = "none", ratio: float = 0.5) -> jax.Array:
  """The official width pruning: only transitions after the last split.

  The transitions it ranks are the tokens after the first token of the last
  segment, ``t > s_{D-1}`` (the official `sample["step"] > last_split_step`,
  flux.py:1340-1351: the split transition itself, step s_{D-1}, is kept), in
  tree order (leaf by leaf, then position, the order of the official
  depth-first collection, flux.py:1199-1223); tokens outside that set keep
  their mask.

    "best_per_branch" (official mode 1, flux.py:1358-1434): per leaf (one
      child of the last split), keep the max(1, floor(n ratio)) of its n
      transitions with the largest advantage (a stable sort). All of them
      carry the leaf's advantage, so this keeps the leaf's first ones.
    "best_and_worst" (official mode 2, flux.py:1436-1458): over the prompt's
      tree, k = max(2, floor(n ratio)) of the n transitions, the first
      floor(k / 2) and the last k - floor(k / 2) of the stable descending
      advantage order. The official code ranks over all trees of one
      device's batch; here each prompt's tree is ranked on its own, as its
      advantages are normalised per tree. k is capped at n (the official
      code would repeat a transition when n < 2).
    "none": no pruning (official mode 0, the default).

  Args:
    adv_NT: [N, T] per-token advantages (from :func:`token_advantages`).
    mask_NT: [N, T] tokens still in the loss (after depth pruning).
    split_points: the tree's split points (static).
    branching: the tree's branching factors (static).
    mode: one of ``WIDTH_PRUNING_MODES`` (static).
    ratio: the official `width_pruning_ratio`, in (0, 1] (static).

  Returns:
    [N, T] bool mask.
  """
  mask_NT = _as_bool(mask_NT)
  chex.assert_rank(mask_NT, 2)
  if mode not in WIDTH_PRUNING_MODES:
    raise ValueError(f"width pruning mode {mode!r} is not one of "
                     f"{list(WIDTH_PRUNING_MODES)}.")
  if mode == "none":
    return mask_NT
  adv_NT = jnp.asarray(adv_NT, jnp.float32)
  chex.assert_equal_shape([adv_NT, mask_NT])
  n, t = mask_NT.shape
  g = math.prod(branching)
  after_T = jnp.asarray(np.arange(t) > split_points[-1])
  elig_NT = mask_NT & after_T[None, :]
  rows = n if mode == "best_per_branch" else n // g
  elig_RL, adv_RL = elig_NT.reshape(rows, -1), adv_NT.reshape(rows, -1)
  size = elig_RL.shape[1]
  # Python-float keep counts per group size n, exactly as int(n * ratio).
  if mode == "best_per_branch":
    table = [0] + [max(1, int(c * ratio)) for c in range(1, size + 1)]
  else:
    table = [0] + [min(c, max(2, int(c * ratio))) for c in range(1, size + 1)]
  # Stable descending order by advantage; "+ 0.0" makes -0.0 tie with 0.0.
  key_RL = jnp.where(elig_RL, -adv_RL + 0.0, jnp.inf)
  rank_RL = jnp.argsort(jnp.argsort(key_RL, axis=-1, stable=True), axis=-1,
                        stable=True)
  count_R1 = jnp.sum(elig_RL, axis=-1, keepdims=True)
  keep_R1 = jnp.asarray(table, jnp.int32)[count_R1]
  if mode == "best_per_branch":
    kept_RL = rank_RL < keep_R1
  else:
    best_R1 = keep_R1 // 2
    kept_RL = (rank_RL < best_R1) | (rank_RL >= count_R1 - (keep_R1 - best_R1))
  pruned_NT = (elig_RL & ~kept_RL).reshape(n, t)
  return mask_NT & ~pruned_NT


class TreeAdvantages(NamedTuple):
  """Output of :func:`tree_advantages`.

  Attributes:
    adv_NT: [N, T] float32 per-token advantages, 0 off ``loss_mask_NT``.
    loss_mask_NT: [N, T] bool, the valid tokens that survive pruning.
    values: D arrays [B, M_d], node values.
    node_adv: D arrays [B, M_d], node advantages.
  """
  adv_NT: jax.Array
  loss_mask_NT: jax.Array
  values: tuple[jax.Array, ...]
  node_adv: tuple[jax.Array, ...]


VALUE_WEIGHTINGS = ("mean", "edge_softmax", "path_softmax")


def tree_advantages(reward_BG: jax.typing.ArrayLike,
                    mask_NT: jax.typing.ArrayLike, *,
                    split_points: Sequence[int], branching: Sequence[int],
                    logp_NT: Optional[jax.typing.ArrayLike] = None,
                    value_weighting: str = "mean", value_alpha: float = 1.0,
                    scale_by_std: bool = True, eps: float = 1e-8,
                    std_floor: float = 1e-6,
                    pruned_depths: Sequence[int] = (),
                    width_pruning: str = "none",
                    width_ratio: float = 0.5,
                    adv_clip: Optional[float] = None) -> TreeAdvantages:
  """BranchGRPO advantages of a batch of token trees, per token.

    V(u)  = mean reward of the leaves under u                  ("mean")
          | recursive softmax of child edge log-probs          ("edge_softmax")
          | softmax of whole-path log-probs, ours              ("path_softmax")
    A(u)  = (V(u) - mean_d V) / (std_d V + eps)   over depth d of one prompt
    A_{n,t} = A(ancestor of leaf n at the depth of position t)

  then depth pruning (the segments of ``pruned_depths``) and width pruning
  after the last split (``width_pruning``, ``width_ratio``) drop tokens
  from the loss mask, in the official order (flux.py:1266-1458), and the
  surviving advantages are clipped to ``[-adv_clip, adv_clip]`` (the
  official `adv_clip_max`, applied in the loss after pruning ranked the
  unclipped ones, flux.py:1535-1547). From
  "BranchGRPO: Stable and Efficient GRPO with Structured Branching in
  Diffusion Models" (arXiv:2509.06040) and its official code.

  Every leaf row holds its full path, so a shared prefix lies in each leaf
  row below it; the caller weights those copies (:func:`edge_weights`) to
  count each edge once, as the official code trains each edge once.

  Args:
    reward_BG: [B, G] leaf rewards, leaves in tree order.
    mask_NT: [N, T] valid tokens of each leaf row, N = B * G.
    split_points: the tree's split points (static).
    branching: the tree's branching factors (static).
    logp_NT: [N, T] behaviour token log-probs; needed unless "mean".
    value_weighting: one of ``VALUE_WEIGHTINGS`` (static).
    value_alpha: softmax temperature of "edge_softmax" (official 1.0).
    scale_by_std: divide by the depth's std.
    eps: added to the std.
    std_floor: depths with a smaller std get 0.
    pruned_depths: depths whose tokens do not train (static).
    width_pruning: one of ``WIDTH_PRUNING_MODES`` (static).
    width_ratio: share kept by width pruning (static).
    adv_clip: clip of the token advantages; None does not clip.

  Returns:
    :class:`TreeAdvantages` (``node_adv`` unclipped).
  """
  splits, ks = validate_tree(split_points, branching)
  reward_BG = jnp.asarray(reward_BG, jnp.float32)
  mask_NT = _as_bool(mask_NT)
  chex.assert_rank([reward_BG, mask_NT], 2)
  chex.assert_shape(mask_NT, (reward_BG.size, None))
  if value_weighting not in VALUE_WEIGHTINGS:
    raise ValueError(f"value_weighting={value_weighting!r}; choose one of "
                     f"{list(VALUE_WEIGHTINGS)}.")
  if value_weighting != "mean" and logp_NT is None:
    raise ValueError(f"value_weighting={value_weighting!r} weights node "
                     "values by log-probs: pass logp_NT, the rollout's "
                     "log-probs.")
  if value_weighting == "edge_softmax":
    edges = edge_log_probs(logp_NT, mask_NT, split_points=splits,
                           branching=ks)
    values = edge_softmax_values(reward_BG, edges, branching=ks,
                                 alpha=value_alpha)
  elif value_weighting == "path_softmax":
    log_w = path_log_weights(logp_NT, mask_NT, split_points=splits,
                             branching=ks)
    values = node_values(reward_BG, branching=ks, log_weight_BG=log_w)
  else:
    values = node_values(reward_BG, branching=ks)
  node_adv = depth_advantages(values, scale_by_std=scale_by_std, eps=eps,
                              std_floor=std_floor)
  adv_NT = token_advantages(node_adv, mask_NT, split_points=splits,
                            branching=ks)
  loss_mask = depth_prune_mask(mask_NT, split_points=splits,
                               pruned_depths=pruned_depths)
  loss_mask = width_prune_mask(adv_NT, loss_mask, split_points=splits,
                               branching=ks, mode=width_pruning,
                               ratio=width_ratio)
  if adv_clip is not None:
    adv_NT = jnp.clip(adv_NT, -adv_clip, adv_clip)
  return TreeAdvantages(adv_NT=jnp.where(loss_mask, adv_NT, 0.0),
                        loss_mask_NT=loss_mask, values=values,
                        node_adv=node_adv)
