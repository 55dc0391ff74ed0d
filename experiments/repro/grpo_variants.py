"""GRPO vs Dr.GRPO vs DAPO's clip-higher, RL from the testbed's base.

  python -m experiments.repro.grpo_variants --out=runs/repro/grpo_variants \
      [--seeds=0,1,2] [--steps=40] [--arms=grpo,dr_grpo,clip_higher]

Claims:
- Dr.GRPO (arXiv:2503.20783): GRPO's per-sequence length normalisation
  (each completion's token losses divided by its own length) penalises a
  long wrong answer less per token than a short one, so the length of wrong
  answers grows during training; Dr.GRPO's constant normaliser (the
  completion budget) and unscaled advantages remove that bias.
- DAPO (arXiv:2503.14476): a higher upper clip (1 + 0.28 instead of
  1 + 0.2) lets low-probability tokens rise, so the policy's entropy
  collapses less.

Every arm runs `experiments/repro/latr_grpo.py`'s GRPO-with-sampling setting
on the written Countdown search (`setting(..., family="search")`: 16 prompts
x 8 rows, 256-token budget, 40 steps, AdamW 1e-4), where completions range
from about 20 to 250 tokens and GRPO raises the held-out pass@1 in 40 steps
(on chain sums it does not: RESULTS.md), with four optimiser updates per step (`rl.num_minibatches=4`), so that the
clip acts at all: with one update per batch the ratio is 1 and clip-higher
changes nothing. "grpo" is the paper's objective (per-sequence token mean,
std-scaled advantages, clip 0.2/0.2); "dr_grpo" changes the aggregation to
the budget-normalised token sum and drops the std scaling; "clip_higher"
is "grpo" with clip_high 0.28. Columns: final greedy accuracy, pass@1 and
pass@4 on "search" (128 problems), the mean length of wrong and of correct rollouts over the
first and the last 10 steps, the policy entropy over the first and the last
10 steps and the mean test accuracy over the evaluations.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

# pylint: disable=g-import-not-at-top
from configs import dapo
from configs import dr_grpo
from experiments.repro import common
from experiments.repro import latr_grpo
# pylint: enable=g-import-not-at-top

FAMILY = "search"
NUM_MINIBATCHES = 4
WINDOW = 10  # steps at the start and at the end of training

CURVES = {
    "mean_eval_accuracy": latr_grpo.CURVES["mean_eval_accuracy"],
    "zero_variance_groups": latr_grpo.CURVES["zero_variance_groups"],
    "length_wrong_first": common.window_mean("rollout/length_wrong",
                                             first=WINDOW),
    "length_wrong_last": common.window_mean("rollout/length_wrong",
                                            last=WINDOW),
    "length_correct_first": common.window_mean("rollout/length_correct",
                                               first=WINDOW),
    "length_correct_last": common.window_mean("rollout/length_correct",
                                              last=WINDOW),
    "entropy_first": common.window_mean("rl/entropy", first=WINDOW),
    "entropy_last": common.window_mean("rl/entropy", last=WINDOW),
    "clip_frac": common.mean_of("rl/clip_frac"),
}

VARIANTS = ("grpo", "dr_grpo", "clip_higher")


def arm(variant: str, steps: int):
  """The config maker of one variant (see the module docstring)."""
  if variant not in VARIANTS:
    raise ValueError(f"variant={variant!r}: this reproduction runs "
                     f"{list(VARIANTS)}.")
  plain = latr_grpo.arm("grpo", "sampling", steps, family=FAMILY)

  def make(seed: int, base: str):
    c = plain(seed, base)
    c.rl.num_minibatches = NUM_MINIBATCHES
    c.rl.aggregation = "seq_mean_token_mean"  # the GRPO paper's
    if variant == "dr_grpo":
      ref = dr_grpo.get_config().rl
      c.rl.aggregation = ref.aggregation
      c.rl.scale_by_std = ref.scale_by_std
    elif variant == "clip_higher":
      c.rl.clip_high = dapo.get_config().rl.clip_high
    return c
  return make


def arms(steps: int):
  return {v: arm(v, steps) for v in VARIANTS}


if __name__ == "__main__":
  common.main("grpo_variants", arms, splits=latr_grpo.SEARCH_SPLITS,
              metrics=latr_grpo.SEARCH_METRICS, curves=CURVES, steps=40)
