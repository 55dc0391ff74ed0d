"""The base model's accuracy on chain sums, by number of operands.

  python -m experiments.repro.chain_operands --out=runs/repro/chain_operands

No training: each arm scores the base model (zero steps) on 256 chain sums
of exactly k operands (k = 2, 3, 4; the base was pretrained on 2-3), greedy
and 8 samples each: accuracy, pass@1, pass@8 and the mean completion length.
The chain-sum reproductions train and test on a mix of 2-4 operands, so
their "test" split is the average of these three rows; where a row's pass@8
is near 0 no group of 8 rows has a correct answer to learn from, and where
pass@1 is near 1 no group has a wrong one.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

# pylint: disable=g-import-not-at-top
from experiments.repro import common
from experiments.repro import latr_grpo
# pylint: enable=g-import-not-at-top

OPERANDS = (2, 3, 4)
SPLITS = ("chain",)
METRICS = ("accuracy", "pass@1", "pass@8", "mean_length")


def arm(operands: int):
  def make(seed: int, base: str):
    c = latr_grpo.setting(seed, base, 1, family="chain")
    c.rl.steps = 0
    c.task.chain_min_operands = operands
    c.task.chain_max_operands = operands
    c.eval.split = "chain"
    return c
  return make


def arms(steps: int):
  del steps  # the base model is scored as it is
  return {f"operands{k}": arm(k) for k in OPERANDS}


if __name__ == "__main__":
  common.main("chain_operands", arms, splits=SPLITS, metrics=METRICS,
              steps=0)
