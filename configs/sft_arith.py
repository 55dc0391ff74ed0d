"""Supervised fine-tuning only, on the default arithmetic task.

Run:
  python -m experiments.train --config=configs/sft_arith.py --workdir=/tmp/sft
The SFT phase of configs/default.py with no RL steps: `final_accuracy` is the
held-out greedy accuracy after supervised training. `--config.sft.loss=dft`
or `=otr` swaps the objective (DFT, One-Token Rollout).
"""

from configs import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.rl.steps = 0
  return c
