"""GRPO on lookahead tree rollouts (LATR, arXiv:2510.24302), synthetic arithmetic.

Run:
  python -m experiments.train --config=configs/latr_arith.py --workdir=/tmp/latr

The default experiment (1,500 SFT steps, then 300 GRPO steps of 64 prompts x
16 rows) with rollouts from the "latr" engine: S = round(16 * eta) rows of each
group come from a lookahead tree (greedy branching where the policy hesitates,
pruning of branches whose next tokens echo their parent, then sampling; tree
rows no branch claims sample like plain rows), the other 16 - S are plain
samples. eta halves every 100 RL steps, 0.5 -> 0.125
(S = 8, 4, 2). Thresholds are the paper's math settings; the lookahead window
(2 tokens) and the branching phase (3 tokens) are scaled to answers of at most
4 characters + EOS. Writes the same artifacts as the default run; the metrics
add rollout/branches_opened, rollout/branches_pruned, rollout/tree_rows,
rollout/eta, rollout/switch_step and rollout/distinct_tree next to
rollout/distinct_per_group.
"""

import ml_collections

from configs import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.rollout = ml_collections.ConfigDict(dict(
      name="latr",
      tau_abs=0.15,             # branch on c when p(c) > tau_abs
      tau_rel=0.25,             # and p(top-1) - p(c) < tau_rel
      tau_ed=0.5,               # prune when the window's NED < tau_ed
      max_branches_per_step=2,  # children one branch opens at one step
      windows=(2,),             # lookahead lengths after the branch token
      branch_steps=3,           # the branching phase ends by this step
                                # (0: only when the tree is full)
      eta0=0.5,                 # share of each group drawn by the tree
      eta_min=0.125,
      eta_decay_every=100,      # RL steps; 0 keeps eta0
      eta_decay_rate=0.5,
      eta_schedule="step",      # or "linear" (eta0 -> eta_min)
  ))
  return c
