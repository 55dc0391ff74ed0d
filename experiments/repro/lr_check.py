"""Does GRPO learn in the reproductions' setting? The train reward decides.

  python -m experiments.repro.lr_check --out=runs/repro/lr_check \
      [--family=chain] [--seeds=0] [--steps=40] \
      [--arms=lr1e-04,lr3e-05,lr1e-05,control]

The RL reproductions run GRPO at AdamW 1e-4 for 40 steps of 16 prompts x 8
rows (`latr_grpo.setting`), on chain sums (`--family=chain`) or on the
written Countdown search (`--family=search`). This check runs that setting
at three peak learning rates and a control whose rate vanishes (1e-9: the
base policy, the same prompts and sampling keys), and reports the train
reward (`reward/mean`, the rollouts' own accuracy) over each quarter of the
run, the share of groups whose rows disagree (the only groups with a
gradient) and the entropy. Every arm sees the same prompts in the same
order, so a quarter's reward minus the control's is what the updates
gained. This is what a setting and a learning rate are chosen by here,
since no configuration is tuned on the test split; the held-out accuracy is
reported beside it, not used.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

# pylint: disable=g-import-not-at-top
import numpy as np

from experiments.repro import common
from experiments.repro import latr_grpo
# pylint: enable=g-import-not-at-top

LEARNING_RATES = (1e-4, 3e-5, 1e-5)
CONTROL_RATE = 1e-9  # Adam moves each weight by ~1e-9 per step: the base


def _reward_quarter(q: int):
  def f(records):
    vals = [r["reward/mean"] for r in records if "reward/mean" in r]
    n = len(vals) // 4
    if n == 0:
      return float("nan")
    return float(np.mean(vals[q * n:(q + 1) * n]))
  return f


def _signal_groups(records):
  """The share of groups whose rows disagree: 1 - the zero-variance share."""
  return 1.0 - latr_grpo.CURVES["zero_variance_groups"](records)


CURVES = {
    "train_reward_q1": _reward_quarter(0),
    "train_reward_q2": _reward_quarter(1),
    "train_reward_q3": _reward_quarter(2),
    "train_reward_q4": _reward_quarter(3),
    "groups_with_signal": _signal_groups,
    "entropy": common.mean_of("rl/entropy"),
}


def arm(learning_rate: float, steps: int, family: str = "chain"):
  def make(seed: int, base: str):
    c = latr_grpo.setting(seed, base, steps, family=family)
    c.rl.learning_rate = learning_rate
    return c
  return make


def arms(steps: int, family: str = "chain"):
  latr_grpo.family_splits(family)  # refuses an unknown family
  out = {f"lr{lr:.0e}": arm(lr, steps, family) for lr in LEARNING_RATES}
  out["control"] = arm(CONTROL_RATE, steps, family)
  return out


if __name__ == "__main__":
  _family = common.family_flag()
  _splits, _metrics = latr_grpo.family_splits(_family)
  common.main("lr_check" if _family == "chain" else f"lr_check_{_family}",
              lambda steps: arms(steps, _family), splits=_splits,
              metrics=_metrics, curves=CURVES, steps=40)
