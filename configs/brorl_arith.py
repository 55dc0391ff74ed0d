"""BroRL on the default arithmetic experiment: 512 rollouts per prompt.

Run:
  python -m experiments.train --config=configs/brorl_arith.py \
      --workdir=/tmp/rlax_brorl
BroRL ("BroRL: Scaling Reinforcement Learning via Broadened Exploration",
arXiv:2510.01180) scales the rollouts per prompt N to hundreds instead of
scaling training steps. Against configs/default.py (64 prompts x 16 samples =
1,024 rollouts per step) each step here draws 4 prompts x 512 samples = 2,048
rollouts with the ordinary "sample" engine; the learning rate grows with the
square root of the batch ratio and the update keeps the default's single
minibatch per step, micro-batched so that each micro-batch holds the
default's 1,024 rows (peak update memory does not grow with N).

BroRL continues a ProRL run, so the ProRL ingredients are on through the
shared pipeline: a KL penalty to a reference policy (`rl.kl_coef`, k3) reset
to the current policy every `rl.ref_reset_every` RL steps, and DAPO's
dynamic sampling (groups whose 512 rewards all agree are redrawn, up to
`rl.max_sampling_rounds` draws). The coefficient (1e-3) and the reset period
(100 steps) are this config's choices for a 300-step run, not values read
from the ProRL or BroRL papers.

Measured on 2 CPU cores, seed 0 (SFT accuracy 0.188), before the ProRL
ingredients were added: this config ended at
0.109 held-out greedy accuracy after 300 steps (about 6 minutes), where the
default GRPO run reaches 0.277 on half as many rollouts. Probes of 100 steps:
4 x 512 at the unscaled lr 3e-4 0.150, 2 x 512 0.160, GRPO 0.230; 50 steps
of 16 x 512: 0.191 at lr 3e-4, 0.096 at its sqrt-scaled lr 8.5e-4. The
default lr already sits near this tiny model's stability edge, so the sqrt
scaling tips it over; and with few prompts the update of a step follows the
few problems it drew (Adam normalises its size whatever N is). Prefer more
prompts per step and the unscaled lr (`--config.rl.learning_rate=3e-4`)
when reproducing BroRL at this scale.
"""

import math

from configs import default


def get_config(arg=None):
  c = default.get_config(arg)
  base = default.get_config(arg).rl
  c.rl.num_samples = 512
  c.rl.prompts_per_step = 4
  n_base = base.prompts_per_step * base.num_samples  # 64 * 16 = 1,024
  n_new = c.rl.prompts_per_step * c.rl.num_samples  # 4 * 512 = 2,048
  # lr = 3e-4 * sqrt(2,048 / 1,024) = 3e-4 * 1.4142 = 4.243e-4
  c.rl.learning_rate = base.learning_rate * math.sqrt(n_new / n_base)
  c.rl.num_minibatches = base.num_minibatches  # 1 optimiser update per step
  # Rows per micro-batch as in the default: 1,024 / (1 * 1) = 1,024, so
  # 2,048 / (1 * m) = 1,024 gives m = 2.
  rows = n_base // (base.num_minibatches * base.num_microbatches)
  c.rl.num_microbatches = n_new // (c.rl.num_minibatches * rows)
  # ProRL's ingredients (KL with reference resets, dynamic sampling).
  c.rl.kl_coef = 1e-3
  c.rl.kl_estimator = "k3"
  c.rl.ref_reset_every = 100
  c.rl.dynamic_sampling = True
  c.rl.max_sampling_rounds = 4
  return c
