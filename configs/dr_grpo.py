"""Dr.GRPO on the default arithmetic task: no std scaling, constant normaliser.

Run:
  python -m experiments.train --config=configs/dr_grpo.py --workdir=/tmp/dr_grpo
"Understanding R1-Zero-Like Training: A Critical Perspective"
(arXiv:2503.20783): group-centred advantages without the std division, and a
token-sum loss divided by a constant (the completion budget) instead of each
sequence's length. Same budget and outputs as configs/default.py.
"""

from configs import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.rl.scale_by_std = False
  c.rl.aggregation = "seq_mean_token_sum_norm"
  return c
