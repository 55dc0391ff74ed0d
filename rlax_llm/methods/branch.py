"""The "branch" rollout engine: shared-prefix trees with depth-wise advantages.

Each of the step's B prompts grows one tree of G = prod(K) leaf completions
(`rlax_llm.sampling.branch`): K_0 paths from the prompt, each split into K_d
children at split point s_d. Leaves are scored by the task's reward; the
advantages come from `rlax_llm.core.tree_advantages` (node value = mean leaf
reward, optionally path-probability weighted; normalised among the nodes of
one depth; each token gets the advantage of the node that generated it), and
depth / width pruning drop segments from the loss mask. The method's own
sequence advantage function (`rl.method`) is not used; its policy loss is, and
`rl.scale_by_std` selects std scaling of the depth-wise advantages.

The batch has one row per leaf holding the full path, so a shared prefix is
present in each leaf row below it (same tokens, old log-prob and advantage):
a per-token loss counts it once per leaf, which treats every leaf path as one
sample of the policy, as GRPO does.

From "BranchGRPO: Stable and Efficient GRPO with Structured Branching in
Diffusion Models" (arXiv:2509.06040), with token spans as depths.

Config (`config.rollout`, see configs/branch_arith.py):
  split_points: token offsets of the splits, starting at 0.
  branching: children per split (a list, or one int for every split).
  path_weighted: node values weighted by leaf path probability.
  min_depth, max_depth: depths whose tokens train (max_depth -1: all).
  width_keep: nodes of largest |advantage| kept per depth (0: all).

Stats besides `reward_stats`: `rollout/generated_tokens_per_completion`
(tokens sampled / leaves; independent sampling would sample
`rollout/length`), `rollout/token_savings` (1 - sampled / leaf-path tokens),
`rollout/decode_row_fraction` (rows decoded per step / G), `rollout/adv_abs`
(per training token), `rollout/adv_abs_depth{d}` (per node) and
`rollout/pruned_tokens` (share of generated tokens dropped by pruning).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from rlax_llm.core import selection
from rlax_llm.core import tree_advantages as tree_adv
from rlax_llm.methods.rollouts import Engine
from rlax_llm.methods.rollouts import group_batch
from rlax_llm.methods.rollouts import register
from rlax_llm.methods.rollouts import reward_stats
from rlax_llm.methods.rollouts import rollout_key
from rlax_llm.sampling.branch import branch_generate_jit

_FIELDS = ("name", "split_points", "branching", "path_weighted", "min_depth",
           "max_depth", "width_keep")


@register("branch")
class BranchRollout(Engine):
  """B prompts x one shared-prefix tree of G leaves each; see module doc."""

  def __init__(self, exp, cfg):
    super().__init__(exp, cfg)
    unknown = sorted(set(cfg.keys()) - set(_FIELDS))
    if unknown:
      raise ValueError(f"config.rollout has fields {unknown} that the branch "
                       f"engine does not know; its fields are {list(_FIELDS)}.")
    c = exp.config
    try:
      self.split_points, self.branching = tree_adv.validate_tree(
          tuple(cfg.split_points), cfg.branching,
          num_samples=c.rl.num_samples, max_new_tokens=exp.max_new_tokens)
    except ValueError as e:
      raise ValueError(f"config.rollout (branch engine): {e}") from e
    depth = len(self.split_points)
    self.max_depth = depth - 1 if cfg.max_depth < 0 else int(cfg.max_depth)
    self.min_depth = int(cfg.min_depth)
    if not 0 <= self.min_depth <= self.max_depth < depth:
      raise ValueError(
          f"config.rollout.min_depth={cfg.min_depth} and max_depth="
          f"{cfg.max_depth} must satisfy 0 <= min_depth <= max_depth < "
          f"{depth} (the tree's depth; max_depth -1 means the deepest), or "
          "no token would train.")
    if cfg.width_keep < 0:
      raise ValueError(f"config.rollout.width_keep must be >= 0 (0 keeps every "
                       f"node), got {cfg.width_keep}.")
    self.advantages = jax.jit(functools.partial(
        tree_adv.tree_advantages, split_points=self.split_points,
        branching=self.branching, path_weighted=bool(cfg.path_weighted),
        scale_by_std=bool(c.rl.scale_by_std), min_depth=self.min_depth,
        max_depth=self.max_depth, width_keep=int(cfg.width_keep)))

  def rollout(self, params, step: int):
    exp, c = self.exp, self.exp.config
    tok = exp.setup.tokenizer
    b, g, t = c.rl.prompts_per_step, c.rl.num_samples, exp.max_new_tokens
    problems = exp.setup.task.train_batch(step, b, draw=0)
    p, pm = tok.encode_batch([q.prompt for q in problems],
                             max_length=exp.prompt_len)
    ro = jax.device_get(branch_generate_jit(
        exp.graphdef, params, p, pm, rollout_key(exp.key, step),
        split_points=self.split_points, branching=self.branching,
        max_new_tokens=t, eos_id=tok.eos_id, pad_id=tok.pad_id,
        sampler=exp.sampler))
    texts = exp.decode(ro.tokens, ro.mask)
    answers = [q.answer for q in problems for _ in range(g)]
    reward_N, errors = exp.rewards(texts, answers)
    if c.rl.overlong_buffer > 0:  # DAPO's soft overlong punishment
      reward_N = reward_N + np.asarray(selection.overlong_penalty(
          ro.lengths, max_length=t, cache_length=c.rl.overlong_buffer))
    groups = dict(prompt=p, prompt_mask=pm, tokens=ro.tokens.reshape(b, g, t),
                  mask=ro.mask.reshape(b, g, t), logp=ro.logp.reshape(b, g, t),
                  lengths=ro.lengths.reshape(b, g),
                  finished=ro.finished.reshape(b, g),
                  reward=reward_N.reshape(b, g),
                  texts=np.asarray(texts, dtype=object).reshape(b, g))
    tree = jax.device_get(self.advantages(
        jnp.asarray(groups["reward"]), ro.mask, logp_NT=ro.logp))
    loss_mask = np.asarray(tree.loss_mask_NT)
    batch = group_batch(dict(groups, mask=loss_mask.reshape(b, g, t)),
                        np.asarray(tree.adv_NT).reshape(b, g, t))

    stats = reward_stats(groups)
    stats["reward/errors"] = errors
    completed = max(int(ro.lengths.sum()), 1)
    generated = int(ro.generated.sum())
    # G independent samples would sample every token of every leaf path.
    stats["rollout/generated_tokens_per_completion"] = generated / (b * g)
    stats["rollout/token_savings"] = 1.0 - generated / completed
    stats["rollout/decode_row_fraction"] = (
        float(ro.decode_rows) / max(g * int(ro.steps), 1))
    # Mean |advantage| over the tokens that train (advantages are per token).
    stats["rollout/adv_abs"] = (np.abs(tree.adv_NT).sum()
                                / max(loss_mask.sum(), 1))
    stats["rollout/pruned_tokens"] = 1.0 - loss_mask.sum() / max(
        ro.mask.sum(), 1)
    for d, a in enumerate(tree.node_adv):
      stats[f"rollout/adv_abs_depth{d}"] = np.abs(a).mean()
    return batch, stats
