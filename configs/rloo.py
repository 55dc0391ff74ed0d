"""RLOO on the default arithmetic task: leave-one-out baseline, PPO-clip update.

Run:
  python -m experiments.train --config=configs/rloo.py --workdir=/tmp/rloo
(arXiv:2402.14740). Same budget and outputs as configs/default.py.
"""

from configs import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.rl.method = "rloo"
  return c
