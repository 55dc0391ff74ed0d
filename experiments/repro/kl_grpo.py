"""GRPO with and without the reference-policy KL, RL from the testbed's base.

  python -m experiments.repro.kl_grpo --out=runs/repro/kl_grpo \
      [--family=chain] [--seeds=0,1,2] [--steps=40] [--arms=grpo,grpo_kl]

Question (the GRPO paper's objective keeps beta KL(pi || pi_ref), k3
estimator, beta 0.04; Dr.GRPO and DAPO drop it): does the penalty change
accuracy or keep the policy nearer the base at this scale? Both arms are
`experiments/repro/latr_grpo.py`'s GRPO-with-sampling arm (chain sums of 2-4
operands, or with `--family=search` the written Countdown search; 40 steps
of 16 prompts x 8 rows, same prompts and keys); "kl" adds
`rl.kl_coef=0.04`, `rl.kl_estimator="k3"` (configs/grpo_kl.py). Columns:
final greedy accuracy, pass@1 and pass@8 on "test" (search: pass@4 on
"search"), the mean test accuracy
over the evaluations, the mean and final KL to the base (`rl/kl`, logged
only where a reference exists, the "kl" arm) and the mean policy entropy
(`rl/entropy`). The "grpo" arm is the same config as latr_grpo.py's
grpo_sampling (chain) and lr_check.py's lr1e-04 arm (search): same seeds,
hence the same runs.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

# pylint: disable=g-import-not-at-top
from configs import grpo_kl
from experiments.repro import common
from experiments.repro import latr_grpo
# pylint: enable=g-import-not-at-top


CURVES = {
    "mean_eval_accuracy": latr_grpo.CURVES["mean_eval_accuracy"],
    "kl_mean": common.mean_of("rl/kl"),
    "kl_final": common.last_of("rl/kl"),
    "entropy_mean": common.mean_of("rl/entropy"),
}


def arm(kl: bool, steps: int, family: str = "chain"):
  plain = latr_grpo.arm("grpo", "sampling", steps, family=family)

  def make(seed: int, base: str):
    c = plain(seed, base)
    if kl:
      ref = grpo_kl.get_config().rl
      c.rl.kl_coef = ref.kl_coef
      c.rl.kl_estimator = ref.kl_estimator
    return c
  return make


def arms(steps: int, family: str = "chain"):
  return {"grpo": arm(False, steps, family),
          "grpo_kl": arm(True, steps, family)}


if __name__ == "__main__":
  _family = common.family_flag()
  _splits, _metrics = latr_grpo.family_splits(_family)
  common.main("kl_grpo" if _family == "chain" else f"kl_grpo_{_family}",
              lambda steps: arms(steps, _family), splits=_splits,
              metrics=_metrics, curves=CURVES, steps=40)
