"""XRPO on the default task: phased rollout allocation, in-context seeding
and novelty-aware advantage sharpening, with GRPO's advantage and loss.

Run:
  python -m experiments.train --config=configs/xrpo.py --workdir=/tmp/xrpo
"XRPO: Pushing the limits of GRPO with Targeted Exploration and
Exploitation" (arXiv:2510.06672), all three parts:
  * the "xrpo" rollout engine spends the default run's budget of 64 x 16
    rollouts per step in 3 phases: 8 per prompt first, then two rounds of
    256 that go, one at a time, to the prompts of highest priority
    Delta(n) + phi(T, n) (t-interval half-width reduction plus a UCB bonus),
    at most 32 per prompt; groups are padded to 32 slots (empty slots are
    masked and outside the group's advantage);
  * a prompt whose rollouts are all wrong after a phase is seeded with 2
    solved problems recorded at earlier steps ("3+4=7 12*3=36 5+9=") and
    sampled from that prompt (the update conditions on it too);
  * a correct rollout the policy finds less likely than its siblings (per
    token, eta < 1) gets min(max(lam (1 - eta), 0), kappa_clip A) added to
    its GRPO advantage (lam 2.5, kappa_clip 0.5, the paper's values).
Logs `rollout/xrpo_alloc_{max,min,std}`, `rollout/xrpo_seeded_prompts`,
`rollout/xrpo_seeded_solved`, `rollout/xrpo_store_size`,
`rollout/xrpo_sharpened` and `rollout/xrpo_bonus`. The update runs over
64 x 32 slots, half of them empty: about twice the default run's update
cost for the same sampling budget.
"""

import ml_collections

from configs import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.rl.xrpo_lambda = 2.5
  c.rl.xrpo_kappa_clip = 0.5
  c.rl.xrpo_novelty = "mean"
  c.rollout = ml_collections.ConfigDict(dict(
      name="xrpo",
      max_factor=2,         # at most 2 x rl.num_samples rollouts per prompt
      base_fraction=0.5,    # phase 1: rl.num_samples / 2 per prompt
      phases=3,             # the paper's three phases
      alpha=0.05,           # 95% t-interval
      explore_coef=0.1,     # lambda of the UCB-style bonus
      seeding=True,         # in-context seeding of all-wrong prompts
      seed_examples=2,      # solved examples per seeded prompt
      seed_rollouts=0,      # rollouts a seeded prompt gets first (0: base)
      seed_separator=" ",   # after each example
      seed_prompt_len=0,    # prompt width when seeding (0: automatic)
      store_size=256,       # solutions kept (one per prompt)
  ))
  return c
