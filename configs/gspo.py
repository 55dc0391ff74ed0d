"""GSPO on the default arithmetic task.

Run:
  python -m experiments.train --config=configs/gspo.py --workdir=/tmp/gspo
"Group Sequence Policy Optimization" (arXiv:2507.18071): the importance ratio
is the length-normalised sequence ratio exp(mean_t log(pi/pi_old)), clipped
in the narrow range [1 - 3e-4, 1 + 4e-4]. Same budget as configs/default.py.
"""

from configs import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.rl.method = "gspo"
  c.rl.clip_low = 3e-4
  c.rl.clip_high = 4e-4
  c.rl.aggregation = "seq_mean_token_mean"
  return c
