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
Only the path-probability weights divide a copy's weight by its copy count
(:func:`path_log_weights`), so a finished path keeps its own probability mass.

The advantage pipeline, each step a small pure function:

  node_values -> depth_advantages -> token_advantages
                                   -> depth_prune_mask / width_prune_mask

:func:`tree_advantages` chains them. "BranchGRPO: Stable and Efficient GRPO
with Structured Branching in Diffusion Models" (arXiv:2509.06040) introduced
the reward fusion, depth-wise normalisation and pruning for diffusion
denoising trees; here a depth is a span of tokens.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from rlax_llm.core import advantages

__all__ = [
    "TreeAdvantages",
    "ancestor_index",
    "depth_advantages",
    "depth_prune_mask",
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


def segment_ids(split_points: Sequence[int], max_new_tokens: int) -> np.ndarray:
  """[T] int32 depth of each completion position: d with s_d <= t < s_{d+1}."""
  splits = np.asarray(split_points)
  return (np.searchsorted(splits, np.arange(max_new_tokens), side="right")
          - 1).astype(np.int32)


def _leaves_per_node(branching: Sequence[int]) -> list[int]:
  """S_d = K_{d+1} ... K_{D-1}, leaves under one depth-d node."""
  return [math.prod(branching[d + 1:]) for d in range(len(branching))]


def ancestor_index(branching: Sequence[int], depth: int) -> np.ndarray:
  """[G] int32: the depth-``depth`` node of each leaf, ``g // S_depth``."""
  g = math.prod(branching)
  return (np.arange(g) // _leaves_per_node(branching)[depth]).astype(np.int32)


def path_log_weights(logp_NT: jax.typing.ArrayLike,
                     mask_NT: jax.typing.ArrayLike, *,
                     split_points: Sequence[int],
                     branching: Sequence[int]) -> jax.Array:
  """Log-weight of each leaf path for probability-weighted node values.

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

    V(u) = sum_{g in leaves(u)} w_g r_g,
    w_g = 1 / S_d                               (uniform)
    w_g = exp(log w_g) / sum_{g' in leaves(u)} exp(log w_g')   (weighted)

  The path-probability weighting is BranchGRPO's reward fusion
  (arXiv:2509.06040); within a node the shared prefix cancels, so only the
  probabilities of the leaves' own continuations matter. A node whose leaves
  all have the same reward gets exactly that reward under either weighting.

  Args:
    reward_BG: [B, G] leaf rewards, leaves in tree order.
    branching: the tree's branching factors (static); prod must be G.
    log_weight_BG: optional [B, G] leaf log-weights (e.g.
      :func:`path_log_weights`); None gives the uniform mean.

  Returns:
    A tuple of D float32 arrays, depth d of shape [B, M_d].
  """
  reward_BG = jnp.asarray(reward_BG, jnp.float32)
  chex.assert_rank(reward_BG, 2)
  b, g = reward_BG.shape
  if math.prod(branching) != g:
    raise ValueError(f"reward_BG has G={g} leaves but prod(branching)="
                     f"{math.prod(branching)} (branching={list(branching)}).")
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
      lo_BM, hi_BM = jnp.min(r_BMS, axis=-1), jnp.max(r_BMS, axis=-1)
      # Rounding in the weights must not make equal leaves unequal nodes.
      values.append(jnp.where(lo_BM == hi_BM, lo_BM, jnp.clip(
          jnp.sum(w_BMS * r_BMS, axis=-1), lo_BM, hi_BM)))
  return tuple(values)


def depth_advantages(values: Sequence[jax.typing.ArrayLike], *,
                     scale_by_std: bool = True,
                     eps: float = 1e-6) -> tuple[jax.Array, ...]:
  """Node values normalised among the nodes of one depth of one prompt.

    A(u) = (V(u) - mean_{u' at depth d} V(u')) / (std_d + eps)

  with the sample std (ddof=1) as in :func:`advantages.grpo_advantages`
  (``scale_by_std=False`` only centres). A depth whose values are all equal,
  or that has a single node, gets exactly 0. BranchGRPO's depth-wise
  advantage estimator (arXiv:2509.06040).

  Args:
    values: D arrays [B, M_d] (from :func:`node_values`).
    scale_by_std: divide by the depth's std.
    eps: added to the std.

  Returns:
    A tuple of D float32 arrays [B, M_d].
  """
  return tuple(advantages.grpo_advantages(v, scale_by_std=scale_by_std, eps=eps)
               for v in values)


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


def depth_prune_mask(mask_NT: jax.typing.ArrayLike, *,
                     split_points: Sequence[int], min_depth: int = 0,
                     max_depth: Optional[int] = None) -> jax.Array:
  """Keeps the loss only on segments with ``min_depth <= d <= max_depth``.

  BranchGRPO's depth pruning (arXiv:2509.06040): the rollout still samples
  every depth, the backward pass skips the others.

  Args:
    mask_NT: [N, T] valid tokens.
    split_points: the tree's split points (static).
    min_depth: shallowest depth that trains.
    max_depth: deepest depth that trains; None keeps all.

  Returns:
    [N, T] bool mask.
  """
  mask_NT = jnp.asarray(mask_NT)
  mask_NT = mask_NT if mask_NT.dtype == jnp.bool_ else mask_NT != 0
  chex.assert_rank(mask_NT, 2)
  seg_T = segment_ids(split_points, mask_NT.shape[1])
  hi = len(split_points) - 1 if max_depth is None else max_depth
  keep_T = (seg_T >= min_depth) & (seg_T <= hi)
  return mask_NT & jnp.asarray(keep_T)[None, :]


def width_prune_mask(node_adv: Sequence[jax.typing.ArrayLike],
                     mask_NT: jax.typing.ArrayLike, *,
                     split_points: Sequence[int], branching: Sequence[int],
                     keep: int) -> jax.Array:
  """Keeps, at each depth, the segments of the ``keep`` nodes of largest |A|.

  BranchGRPO's width pruning (arXiv:2509.06040): only the most informative
  nodes of a depth (largest |advantage|, ties to the lower index) enter the
  backward pass. A depth with at most ``keep`` nodes keeps them all;
  ``keep <= 0`` disables pruning.

  Args:
    node_adv: D arrays [B, M_d] of node advantages.
    mask_NT: [N, T] valid tokens.
    split_points: the tree's split points (static).
    branching: the tree's branching factors (static).
    keep: nodes kept per depth and prompt (static).

  Returns:
    [N, T] bool mask.
  """
  mask_NT = jnp.asarray(mask_NT)
  mask_NT = mask_NT if mask_NT.dtype == jnp.bool_ else mask_NT != 0
  chex.assert_rank(mask_NT, 2)
  if keep <= 0:
    return mask_NT
  n, t = mask_NT.shape
  kept = []
  for d, a_BM in enumerate(node_adv):
    a_BM = jnp.abs(jnp.asarray(a_BM, jnp.float32))
    m = a_BM.shape[1]
    if keep >= m:
      kept_BM = jnp.ones(a_BM.shape, bool)
    else:
      _, idx_BK = jax.lax.top_k(a_BM, keep)  # stable: ties to lower index
      kept_BM = jnp.zeros(a_BM.shape, bool).at[
          jnp.arange(a_BM.shape[0])[:, None], idx_BK].set(True)
    kept.append(kept_BM[:, ancestor_index(branching, d)])
  kept_DBG = jnp.stack(kept)
  seg_T = segment_ids(split_points, t)
  kept_BGT = jnp.moveaxis(kept_DBG[seg_T], 0, -1)
  return mask_NT & kept_BGT.reshape(n, t)


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


def tree_advantages(reward_BG: jax.typing.ArrayLike,
                    mask_NT: jax.typing.ArrayLike, *,
                    split_points: Sequence[int], branching: Sequence[int],
                    logp_NT: Optional[jax.typing.ArrayLike] = None,
                    path_weighted: bool = False, scale_by_std: bool = True,
                    eps: float = 1e-6, min_depth: int = 0,
                    max_depth: Optional[int] = None,
                    width_keep: int = 0) -> TreeAdvantages:
  """BranchGRPO advantages of a batch of token trees, per token.

    V(u)  = (weighted) mean reward of the leaves under u
    A(u)  = (V(u) - mean_d V) / (std_d V + eps)   over depth d of one prompt
    A_{n,t} = A(ancestor of leaf n at the depth of position t)

  then depth pruning (segments outside ``[min_depth, max_depth]``) and width
  pruning (``width_keep`` nodes of largest |A| per depth) drop tokens from
  the loss mask. From "BranchGRPO: Stable and Efficient GRPO with Structured
  Branching in Diffusion Models" (arXiv:2509.06040).

  A shared prefix lies in every leaf row below it with the same advantage and
  old log-prob, so a per-token loss counts it once per leaf: each leaf path is
  a sample of the policy, as in GRPO.

  Args:
    reward_BG: [B, G] leaf rewards, leaves in tree order.
    mask_NT: [N, T] valid tokens of each leaf row, N = B * G.
    split_points: the tree's split points (static).
    branching: the tree's branching factors (static).
    logp_NT: [N, T] token log-probs; needed when ``path_weighted``.
    path_weighted: weight leaves by path probability (see
      :func:`path_log_weights`) instead of uniformly.
    scale_by_std: divide by the depth's std.
    eps: added to the std.
    min_depth: shallowest depth that trains.
    max_depth: deepest depth that trains; None keeps all.
    width_keep: nodes kept per depth; 0 keeps all.

  Returns:
    :class:`TreeAdvantages`.
  """
  splits, ks = validate_tree(split_points, branching)
  reward_BG = jnp.asarray(reward_BG, jnp.float32)
  mask_NT = jnp.asarray(mask_NT)
  mask_NT = mask_NT if mask_NT.dtype == jnp.bool_ else mask_NT != 0
  chex.assert_rank([reward_BG, mask_NT], 2)
  chex.assert_shape(mask_NT, (reward_BG.size, None))
  log_w = None
  if path_weighted:
    if logp_NT is None:
      raise ValueError("path_weighted=True weights leaves by their path "
                       "probability: pass logp_NT, the rollout's log-probs.")
    log_w = path_log_weights(logp_NT, mask_NT, split_points=splits,
                             branching=ks)
  values = node_values(reward_BG, branching=ks, log_weight_BG=log_w)
  node_adv = depth_advantages(values, scale_by_std=scale_by_std, eps=eps)
  loss_mask = depth_prune_mask(mask_NT, split_points=splits,
                               min_depth=min_depth, max_depth=max_depth)
  loss_mask = width_prune_mask(node_adv, loss_mask, split_points=splits,
                               branching=ks, keep=width_keep)
  adv_NT = token_advantages(node_adv, loss_mask, split_points=splits,
                            branching=ks)
  return TreeAdvantages(adv_NT=adv_NT, loss_mask_NT=loss_mask, values=values,
                        node_adv=node_adv)
