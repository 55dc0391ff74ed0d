"""The "latr" rollout engine: GRPO on lookahead tree rollouts.

Lookahead Tree-Based Rollouts for Enhanced Trajectory-Level Exploration in
Reinforcement Learning with Verifiable Rewards (Xing et al., arXiv:2510.24302).

Each RL step draws B prompts; for each, S = round(G * eta) of its G rows come
from the LATR tree (`rlax_llm.sampling.latr`) and the other G - S are plain
samples, all in one decode loop over a shared prefill. eta decays with the RL
step (`eta_schedule`). The group is rewarded, its advantages come from the
method's `advantage_fn` over all G rows, and the batch has the usual
`rl.prompts_per_step * rl.num_samples` rows. Because the stored log-probs are
the policy's own (see `sampling.latr`), any policy loss of the GRPO family
applies unchanged.

Config (`config.rollout`):
  name="latr"; tau_abs, tau_rel (branching), tau_ed (pruning),
  max_branches_per_step, windows (lookahead lengths, in tokens),
  branch_steps (longest branching phase, tokens; 0 = no limit), and the eta
  schedule: eta0, eta_min, eta_decay_every (RL steps; 0 = constant),
  eta_decay_rate, eta_schedule ("step" or "linear").

Stats: `rollout/branches_opened` and `rollout/branches_pruned` (per prompt),
`rollout/tree_rows` (S), `rollout/eta`, `rollout/switch_step` (mean step of
the switch to sampling), `rollout/distinct_tree` (distinct completions among
the S tree rows), plus `reward_stats` (`rollout/distinct_per_group` over all
G rows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rlax_llm.core import selection
from rlax_llm.methods.rollouts import (Engine, distinct_completions,
                                       group_batch, register, reward_stats,
                                       rollout_key)
from rlax_llm.sampling import latr as latr_lib

_FIELDS = ("tau_abs", "tau_rel", "tau_ed", "max_branches_per_step", "windows",
           "branch_steps", "eta0", "eta_min", "eta_decay_every",
           "eta_decay_rate", "eta_schedule")


def tree_config(cfg) -> latr_lib.TreeConfig:
  """The validated `TreeConfig` of a `config.rollout` section."""
  missing = [k for k in _FIELDS if k not in cfg]
  if missing:
    raise ValueError(f"config.rollout lacks {missing} for the 'latr' engine; "
                     "derive the config from configs/latr_arith.py.")
  windows = cfg.windows
  if isinstance(windows, (int, np.integer)):
    windows = (int(windows),)
  return latr_lib.TreeConfig(
      tau_abs=float(cfg.tau_abs), tau_rel=float(cfg.tau_rel),
      tau_ed=float(cfg.tau_ed),
      max_branches_per_step=int(cfg.max_branches_per_step),
      windows=tuple(int(w) for w in windows),
      branch_steps=int(cfg.branch_steps) if cfg.branch_steps > 0 else 1 << 30,
  ).validate()


@register("latr")
class LatrRollout(Engine):
  """B prompts x (S tree rows + G - S samples); see the module docstring."""

  def __init__(self, exp, cfg):
    super().__init__(exp, cfg)
    self.tree = tree_config(cfg)
    self.eta_at(0)  # checks the schedule's settings now

  def eta_at(self, rl_step: int) -> float:
    c = self.cfg
    return latr_lib.eta_schedule(
        rl_step, eta0=float(c.eta0), eta_min=float(c.eta_min),
        decay_every=int(c.eta_decay_every),
        decay_rate=float(c.eta_decay_rate), kind=str(c.eta_schedule))

  def rollout(self, params, step: int):
    exp, c = self.exp, self.exp.config
    tok = exp.setup.tokenizer
    b, g, t = c.rl.prompts_per_step, c.rl.num_samples, exp.max_new_tokens
    eta = self.eta_at(step - c.sft.steps)
    s = latr_lib.tree_rows(g, eta)
    problems = exp.setup.task.train_batch(step, b)
    p, pm = tok.encode_batch([q.prompt for q in problems],
                             max_length=exp.prompt_len)
    ro = jax.device_get(latr_lib.latr_generate_jit(
        exp.graphdef, params, p, pm, rollout_key(exp.key, step),
        num_samples=g, num_tree=s, max_new_tokens=t, eos_id=tok.eos_id,
        pad_id=tok.pad_id, sampler=exp.sampler, tree=self.tree))
    texts = exp.decode(ro.tokens, ro.mask)
    answers = [q.answer for q in problems for _ in range(g)]
    reward_N, errors = exp.rewards(texts, answers)
    if c.rl.overlong_buffer > 0:  # DAPO's soft overlong punishment
      reward_N = reward_N + np.asarray(selection.overlong_penalty(
          ro.lengths, max_length=t, cache_length=c.rl.overlong_buffer))
    texts_BG = np.asarray(texts, dtype=object).reshape(b, g)
    groups = dict(prompt=p, prompt_mask=pm, tokens=ro.tokens.reshape(b, g, t),
                  mask=ro.mask.reshape(b, g, t), logp=ro.logp.reshape(b, g, t),
                  lengths=ro.lengths.reshape(b, g),
                  finished=ro.finished.reshape(b, g),
                  reward=reward_N.reshape(b, g), texts=texts_BG)
    adv_BG = np.asarray(exp.method.advantage_fn(jnp.asarray(groups["reward"])))
    batch = group_batch(groups, adv_BG)
    stats = reward_stats(groups)
    stats.update({
        "reward/errors": errors,
        "rollout/adv_abs": np.abs(adv_BG).mean(),
        "rollout/eta": eta,
        "rollout/tree_rows": s,
        "rollout/branches_opened": float(np.mean(ro.opened)),
        "rollout/branches_pruned": float(np.mean(ro.pruned)),
        "rollout/switch_step": float(np.mean(ro.switch_step)),
        "rollout/distinct_tree": (distinct_completions(texts_BG[:, :s])
                                  if s else 0.0),
    })
    return batch, stats
