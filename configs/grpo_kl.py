"""GRPO as DeepSeekMath publishes it: a k3 KL to the reference in the loss.

Run:
  python -m experiments.train --config=configs/grpo_kl.py --workdir=/tmp/grpo_kl
"DeepSeekMath" (arXiv:2402.03300), eq. 3: group-normalised advantages, the
PPO-clipped ratio, and beta * D_KL(pi || pi_ref) with Schulman's k3
estimator, beta 0.04, every term averaged per sequence then over the group
(`aggregation="seq_mean_token_mean"`). The reference is a frozen copy of the
policy at the start of the RL phase, saved in every checkpoint; `rl/kl` logs
the estimator's mean over the batch before the coefficient. Same budget as
configs/default.py.
"""

from configs import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.rl.method = "grpo"
  c.rl.aggregation = "seq_mean_token_mean"
  c.rl.kl_coef = 0.04
  c.rl.kl_estimator = "k3"
  return c
