"""GRPO with XRPO's novelty-aware advantage sharpening, on the default task.

Run:
  python -m experiments.train --config=configs/xrpo.py --workdir=/tmp/xrpo
"XRPO: Pushing the limits of GRPO with Targeted Exploration and
Exploitation" (arXiv:2510.06672): a correct rollout that the policy finds
less likely than its siblings (per-token geometric mean, eta < 1) gets the
bonus min(max(lam (1 - eta), 0), kappa_clip A) added to its GRPO advantage
(lam 2.5, kappa_clip 0.5, the paper's values). The paper's adaptive rollout
allocation and in-context seeding are not part of this config. Logs
`rollout/xrpo_sharpened` (share of rollouts changed) and
`rollout/xrpo_bonus`. Same budget and outputs as configs/default.py.
"""

from configs import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.rl.xrpo_lambda = 2.5
  c.rl.xrpo_kappa_clip = 0.5
  return c
