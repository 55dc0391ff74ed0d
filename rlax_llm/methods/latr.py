"""The "latr" rollout engine: lookahead tree rollouts.

Lookahead Tree-Based Rollouts for Enhanced Trajectory-Level Exploration in
Reinforcement Learning with Verifiable Rewards (Xing et al., arXiv:2510.24302).

Each RL step draws B prompts; for each, S = round(G * eta) of its G rows come
from the LATR tree (`rlax_llm.sampling.latr`) and the other G - S are plain
samples, all in one decode loop over a shared prefill. eta follows the
tree's piecewise-constant schedule (`latr.eta_at`) over RL steps. The stored
log-probs are the policy's own at the sampling temperature, so any policy
loss of the GRPO family applies unchanged, and groups of different prompts
are independent draws (dynamic sampling may draw more).

Settings: the fields of `latr.TreeConfig`, parsed by
`latr.tree_config_from_fields` from `config.rollout` (see
configs/latr_arith.py). With `keep_math_symbols` the table of exempt token
ids is built from the tokenizer (`latr.math_symbol_table`).

Stats: `rollout/branches_opened` and `rollout/branches_pruned` (per prompt),
`rollout/tree_rows` (S), `rollout/eta`, `rollout/switch_step` (mean step of
the switch to sampling), `rollout/distinct_tree` (distinct completions among
the S tree rows).
"""

from __future__ import annotations

import jax
import numpy as np

from rlax_llm.methods import rollouts
from rlax_llm.sampling import latr as latr_lib


def token_texts(tokenizer, vocab_size: int) -> list[str]:
  """The text of each token id alone ("" past the tokenizer's vocabulary)."""
  n = min(int(tokenizer.vocab_size), vocab_size)
  ids = np.arange(n, dtype=np.int32)[:, None]
  texts = list(tokenizer.decode_batch(ids, np.ones_like(ids, bool)))
  return texts + [""] * (vocab_size - n)


class LatrRollout(rollouts.Engine):
  """B prompts x (S tree rows + G - S samples); see the module docstring."""

  name = "latr"

  @classmethod
  def from_section(cls, ctx, section):
    fields = {k: v for k, v in dict(section).items() if k != "name"}
    try:
      tree = latr_lib.tree_config_from_fields(fields)
    except ValueError as e:
      raise ValueError(f"config.rollout (latr engine): {e}") from e
    return cls(ctx, tree)

  def __init__(self, ctx, tree: latr_lib.TreeConfig):
    super().__init__(ctx, tree)
    self.tree = tree
    self.exempt_V = None
    if tree.keep_math_symbols:
      vocab = ctx.vocab_size or int(ctx.tokenizer.vocab_size)
      self.exempt_V = latr_lib.math_symbol_table(
          token_texts(ctx.tokenizer, vocab))

  def rollout(self, params, step: int, draw: int = 0) -> rollouts.Groups:
    ctx, tok = self.ctx, self.ctx.tokenizer
    g = ctx.num_samples
    eta = latr_lib.eta_at(self.tree, step - ctx.rl_start)
    s = latr_lib.tree_rows(g, eta)
    problems, p, pm = rollouts.encode_prompts(ctx, step, ctx.num_prompts,
                                              draw)
    ro = jax.device_get(latr_lib.latr_generate_jit(
        ctx.graphdef, params, p, pm, rollouts.rollout_key(ctx.key, step, draw),
        num_samples=g, num_tree=s, max_new_tokens=ctx.max_new_tokens,
        eos_id=tok.eos_id, pad_id=tok.pad_id, sampler=ctx.sampler,
        tree=self.tree, exempt_V=self.exempt_V))
    groups = rollouts.scored_groups(ctx, problems, p, pm, ro.tokens, ro.mask,
                                    ro.logp, ro.lengths, ro.finished)
    groups.stats.update({
        "rollout/eta": eta,
        "rollout/tree_rows": s,
        "rollout/branches_opened": float(np.mean(ro.opened)),
        "rollout/branches_pruned": float(np.mean(ro.pruned)),
        "rollout/switch_step": float(np.mean(ro.switch_step)),
        "rollout/distinct_tree": (
            rollouts.distinct_completions(groups.texts[:, :s]) if s else 0.0),
    })
    return groups

