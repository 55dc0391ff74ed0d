"""CISPO on the default arithmetic task.

Run:
  python -m experiments.train --config=configs/cispo.py --workdir=/tmp/cispo
MiniMax-M1 (arXiv:2506.13585): REINFORCE weighted by the importance ratio,
clipped from above and stop-gradient, so no token's gradient is dropped.
Same budget as configs/default.py.
"""

from configs import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.rl.method = "cispo"
  c.rl.clip_low = 0.0  # no lower bound on the weight
  c.rl.clip_high = 0.28
  c.rl.aggregation = "token_mean"
  return c
