"""GRPO on the default arithmetic task (the default experiment, by name).

Run:
  python -m experiments.train --config=configs/grpo.py --workdir=/tmp/grpo
"""

from configs import default


def get_config(arg=None):
  return default.get_config(arg)
