"""The "branch" rollout engine: shared-prefix trees with depth-wise advantages.

Each of the step's B prompts grows one tree of G = prod(K) leaf completions
(`rlax_llm.sampling.branch`): K_0 paths from the prompt, each split into K_d
children at split point s_d. Leaves are scored by the task's reward; the
advantages come from `rlax_llm.core.tree_advantages`, following the official
BranchGRPO code (Fredreic1849/BranchGRPO, fastvideo/train_branchgrpo_flux.py)
with token spans as depths: node value = mean leaf reward (optionally the
official recursive softmax over child edge log-probs), normalised among the
nodes of one depth of one tree; each token gets the advantage of the node
that generated it; depth pruning (a set of depths, optionally a sliding
window) and width pruning after the last split drop tokens from the loss,
both only up to a cutoff RL step. The engine supplies these per-token
advantages itself (`Groups.token_adv`), so the method's sequence advantage
is not used (and options that transform sequence advantages are refused
with this engine); its policy loss is, and `rl.scale_by_std` selects std
scaling of the depth-wise advantages. Trees of different prompts are
independent, so dynamic sampling may draw more of them.

The batch has one row per leaf holding the full path, so a shared prefix is
present in each leaf row below it. With `train_edges_once` (the default, as
BranchGRPO trains each edge of its tree once) those copies carry token
weights 1 / (leaves below the segment's node) (`tree_advantages.
edge_weights`), so every edge counts once in the loss; without it every leaf
path counts as one sample, as in GRPO.

From "BranchGRPO: Stable and Efficient GRPO with Structured Branching in
Diffusion Models" (arXiv:2509.06040), with token spans as depths.

Settings (`config.rollout`, see configs/branch_arith.py); the official
argument each follows is in brackets:
  split_points: token offsets of the splits, starting at 0.
  branching: children per split (a list, or one int for every split).
  value_weighting: "mean" (default) | "edge_softmax" [tree_prob_weighted] |
    "path_softmax" (a variant of rlax_llm: one softmax over whole paths).
  value_alpha: temperature of "edge_softmax" (official fixed 1.0).
  depth_pruning: depths whose tokens do not train, a tuple or a comma list
    "1,2" [depth_pruning]; () prunes none.
  depth_pruning_slide: move that set one depth shallower every
    depth_pruning_slide_interval RL steps [depth_pruning_slide,
    depth_pruning_slide_interval], until its shallowest depth reaches
    depth_pruning_stop_depth (-1: the last split's parent, depth D - 2)
    [depth_pruning_stop_depth].
  width_pruning: "none" | "best_per_branch" | "best_and_worst"
    [width_pruning_mode 0 | 1 | 2], with width_pruning_ratio
    [width_pruning_ratio].
  pruning_cutoff_step: prune (depth and width) only while the RL step,
    counted from 1, is <= this; -1 always [int(max_train_steps *
    pruning_step_ratio)].
  adv_clip_max: token advantages are clipped to +-adv_clip_max in the loss
    [adv_clip_max, 5.0]; a depth of M nodes can reach |A| = (M-1)/sqrt(M),
    so it acts only from M = 27 nodes.
  train_edges_once: weight shared-prefix tokens once per edge.
  scale_by_std: divide depth advantages by their std (from rl.scale_by_std).

The pruning of an RL step depends on that step (the sliding window and the
cutoff): `rollout(params, step)` records the step, and `readvantage` (the
transforms' recomputation after reward shaping, same step) reuses it.

Stats: `rollout/sampled_tokens` (each shared prefix once),
`rollout/generated_tokens_per_completion` (tokens sampled / leaves;
independent sampling would sample `rollout/length`), `rollout/token_savings`
(1 - sampled / leaf-path tokens), `rollout/decode_row_fraction` (rows
decoded per step / G), `rollout/adv_abs_depth{d}` (per node),
`rollout/pruned_tokens` (share of generated tokens dropped by pruning) and,
with depth pruning, `rollout/depth_pruning_shallowest` (the shallowest
pruned depth this step; -1 when pruning is past its cutoff).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rlax_llm.core import tree_advantages as tree_adv
from rlax_llm.methods import rollouts
from rlax_llm.sampling.branch import branch_generate_jit

_DEFAULTS = dict(split_points=(0,), branching=(1,), value_weighting="mean",
                 value_alpha=1.0, depth_pruning=(), depth_pruning_slide=False,
                 depth_pruning_slide_interval=1, depth_pruning_stop_depth=-1,
                 width_pruning="none", width_pruning_ratio=0.5,
                 pruning_cutoff_step=-1, adv_clip_max=5.0,
                 train_edges_once=True, scale_by_std=True)


class BranchSettings(NamedTuple):
  split_points: tuple[int, ...]
  branching: tuple[int, ...]
  value_weighting: str
  value_alpha: float
  depth_pruning: tuple[int, ...]
  depth_pruning_slide: bool
  depth_pruning_slide_interval: int
  depth_pruning_stop_depth: int
  width_pruning: str
  width_pruning_ratio: float
  pruning_cutoff_step: int
  adv_clip_max: float
  train_edges_once: bool
  scale_by_std: bool


def _depth_list(value) -> tuple[int, ...]:
  if isinstance(value, str):  # the official comma list, "15,16,17"
    return tuple(int(v) for v in value.split(",") if v.strip())
  if isinstance(value, (int, np.integer)):
    return (int(value),)
  return tuple(int(v) for v in value)


def parse_settings(section, *, num_samples: int, max_new_tokens: int,
                   scale_by_std: bool = True) -> BranchSettings:
  """Validated settings of a `config.rollout` section of the branch engine."""
  f = rollouts.check_fields("branch", section,
                            dict(_DEFAULTS, scale_by_std=scale_by_std))
  try:
    splits, ks = tree_adv.validate_tree(
        tuple(f["split_points"]), f["branching"], num_samples=num_samples,
        max_new_tokens=max_new_tokens)
  except ValueError as e:
    raise ValueError(f"config.rollout (branch engine): {e}") from e
  depth = len(splits)
  if f["value_weighting"] not in tree_adv.VALUE_WEIGHTINGS:
    raise ValueError(
        f"config.rollout.value_weighting={f['value_weighting']!r}; choose "
        f"one of {list(tree_adv.VALUE_WEIGHTINGS)} (\"mean\" is the "
        "official default).")
  alpha = float(f["value_alpha"])
  if not np.isfinite(alpha):
    raise ValueError(f"config.rollout.value_alpha must be finite, got "
                     f"{f['value_alpha']}.")
  try:
    pruned = _depth_list(f["depth_pruning"])
  except (TypeError, ValueError) as e:
    raise ValueError(
        "config.rollout.depth_pruning must be depths as a tuple of ints or a "
        f"comma list such as \"1,2\", got {f['depth_pruning']!r}.") from e
  if any(not 0 <= d < depth for d in pruned) or len(set(pruned)) != len(
      pruned):
    raise ValueError(
        f"config.rollout.depth_pruning={list(pruned)} must list distinct "
        f"depths in 0..{depth - 1} (the tree has {depth} depths, one per "
        "split point).")
  if len(pruned) >= depth:
    raise ValueError(
        f"config.rollout.depth_pruning={list(pruned)} drops every depth of "
        f"the {depth}-depth tree, so no token would train; leave at least "
        "one depth out of it.")
  interval = int(f["depth_pruning_slide_interval"])
  if interval < 1:
    raise ValueError("config.rollout.depth_pruning_slide_interval must be "
                     f">= 1 (RL steps per move), got {interval}.")
  stop = int(f["depth_pruning_stop_depth"])
  if not -1 <= stop < depth:
    raise ValueError(
        f"config.rollout.depth_pruning_stop_depth={stop} must be in "
        f"0..{depth - 1}, or -1 for the last split's parent (depth "
        f"{depth - 2}).")
  stop = depth - 2 if stop == -1 else stop
  if f["width_pruning"] not in tree_adv.WIDTH_PRUNING_MODES:
    raise ValueError(
        f"config.rollout.width_pruning={f['width_pruning']!r}; choose one of "
        f"{list(tree_adv.WIDTH_PRUNING_MODES)} (official width_pruning_mode "
        "0, 1, 2).")
  ratio = float(f["width_pruning_ratio"])
  if not 0.0 < ratio <= 1.0:
    raise ValueError("config.rollout.width_pruning_ratio must be in (0, 1] "
                     f"(the share of transitions kept), got {ratio}.")
  clip = float(f["adv_clip_max"])
  if not clip > 0:
    raise ValueError("config.rollout.adv_clip_max must be > 0 (use a large "
                     "value such as 1e9 to disable the clip), got "
                     f"{f['adv_clip_max']}.")
  return BranchSettings(
      tuple(splits), tuple(ks), str(f["value_weighting"]), alpha, pruned,
      bool(f["depth_pruning_slide"]), interval, stop,
      str(f["width_pruning"]), ratio, int(f["pruning_cutoff_step"]),
      clip, bool(f["train_edges_once"]), bool(f["scale_by_std"]))


def pruning_at(settings: BranchSettings, rl_step: int
               ) -> tuple[tuple[int, ...], str]:
  """(pruned depths, width pruning mode) of RL step `rl_step` (from 1).

  Nothing is pruned past `pruning_cutoff_step` (the official
  `current_step <= int(max_steps * pruning_step_ratio)`, flux.py:1260-1263).
  """
  st = settings
  if 0 <= st.pruning_cutoff_step < rl_step:
    return (), "none"
  return tree_adv.active_pruned_depths(
      st.depth_pruning, rl_step=rl_step, slide=st.depth_pruning_slide,
      interval=st.depth_pruning_slide_interval,
      stop_depth=st.depth_pruning_stop_depth), st.width_pruning


class BranchRollout(rollouts.Engine):
  """B prompts x one shared-prefix tree of G leaves each; see module doc."""

  name = "branch"
  sequence_advantages = False

  @classmethod
  def from_section(cls, ctx, section, *, scale_by_std: bool = True):
    return cls(ctx, parse_settings(section, num_samples=ctx.num_samples,
                                   max_new_tokens=ctx.max_new_tokens,
                                   scale_by_std=scale_by_std))

  def __init__(self, ctx, settings: BranchSettings):
    super().__init__(ctx, settings)
    st = settings

    def advantages(reward_BG, mask_NT, logp_NT, *, pruned_depths,
                   width_pruning):
      return tree_adv.tree_advantages(
          reward_BG, mask_NT, logp_NT=logp_NT, split_points=st.split_points,
          branching=st.branching, value_weighting=st.value_weighting,
          value_alpha=st.value_alpha, scale_by_std=st.scale_by_std,
          pruned_depths=pruned_depths, width_pruning=width_pruning,
          width_ratio=st.width_pruning_ratio, adv_clip=st.adv_clip_max)

    # One program per pruning state (the sliding window has at most D).
    self.advantages = jax.jit(
        advantages, static_argnames=("pruned_depths", "width_pruning"))
    self.edge_w_GT = (
        tree_adv.edge_weights(st.split_points, st.branching,
                              ctx.max_new_tokens)
        if st.train_edges_once else
        np.ones((ctx.num_samples, ctx.max_new_tokens), np.float32))
    self.step = ctx.rl_start  # the global step of the latest rollout

  def rollout(self, params, step: int, draw: int = 0) -> rollouts.Groups:
    ctx, tok, st = self.ctx, self.ctx.tokenizer, self.settings
    b, g, t = ctx.num_prompts, ctx.num_samples, ctx.max_new_tokens
    self.step = step
    problems, p, pm = rollouts.encode_prompts(ctx, step, b, draw)
    ro = jax.device_get(branch_generate_jit(
        ctx.graphdef, params, p, pm, rollouts.rollout_key(ctx.key, step, draw),
        split_points=st.split_points, branching=st.branching,
        max_new_tokens=t, eos_id=tok.eos_id, pad_id=tok.pad_id,
        sampler=ctx.sampler))
    groups = rollouts.scored_groups(ctx, problems, p, pm, ro.tokens, ro.mask,
                                    ro.logp, ro.lengths, ro.finished)
    return self.with_tree_advantages(groups, ro)

  def with_tree_advantages(self, groups: rollouts.Groups,
                           ro: Any = None) -> rollouts.Groups:
    """Groups with the tree's token advantages and loss weights.

    Recomputed from `groups.reward` (the transforms call it again after
    reward shaping, `rollouts.Engine.readvantage`), pruned as the RL step of
    the latest `rollout` call prescribes (`pruning_at`).
    """
    b, g, t = groups.tokens.shape
    pruned, width = pruning_at(self.settings,
                               self.step - self.ctx.rl_start + 1)
    tree = jax.device_get(self.advantages(
        jnp.asarray(groups.reward), groups.mask.reshape(b * g, t),
        groups.logp.reshape(b * g, t), pruned_depths=pruned,
        width_pruning=width))
    loss_mask = np.asarray(tree.loss_mask_NT).reshape(b, g, t)
    weights = loss_mask * self.edge_w_GT[None]
    stats = dict(groups.stats)
    if ro is not None:
      completed = max(int(ro.lengths.sum()), 1)
      generated = int(ro.generated.sum())
      stats["rollout/sampled_tokens"] = generated
      stats["rollout/generated_tokens_per_completion"] = generated / (b * g)
      stats["rollout/token_savings"] = 1.0 - generated / completed
      stats["rollout/decode_row_fraction"] = (
          float(ro.decode_rows) / max(g * int(ro.steps), 1))
    stats["rollout/pruned_tokens"] = 1.0 - loss_mask.sum() / max(
        groups.mask.sum(), 1)
    if self.settings.depth_pruning:
      stats["rollout/depth_pruning_shallowest"] = float(
          min(pruned) if pruned else -1)
    for d, a in enumerate(tree.node_adv):
      stats[f"rollout/adv_abs_depth{d}"] = np.abs(a).mean()
    return groups._replace(
        token_adv=np.asarray(tree.adv_NT, np.float32).reshape(b, g, t),
        weights=weights.astype(np.float32), stats=stats)

  def readvantage(self, groups: rollouts.Groups) -> rollouts.Groups:
    return self.with_tree_advantages(groups)
