"""REINFORCE++ (with group baseline) on the default arithmetic task.

Run:
  python -m experiments.train --config=configs/reinforce_pp.py \
      --workdir=/tmp/reinforce_pp
(arXiv:2501.03262): group-centred rewards normalised over the whole batch,
PPO-clip update. Same budget as configs/default.py.
"""

from configs import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.rl.method = "reinforce_pp"
  c.rl.group_baseline = True
  return c
