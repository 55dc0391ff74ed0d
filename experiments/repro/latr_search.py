"""LATR vs stochastic sampling under GRPO on the written Countdown search.

  python -m experiments.repro.latr_search --out=runs/repro/latr_search \
      [--seeds=0,1,2] [--steps=20] \
      [--arms=sampling,latr,dapo_sampling,dapo_latr]

The LATR claim (arXiv:2510.24302; see `latr_grpo.py`) on the task its
official thresholds were set for: Countdown. The base model's written
search is long (median 70, p95 177 tokens) and uncertain (greedy accuracy
0.1-0.2), where on chain sums it is confident and LATR's tree barely
branches (RESULTS.md). Every arm runs RL from the base on the search
family (`latr_grpo.setting(..., family="search")`: 16 prompts x 8 rows,
256-token budget, AdamW 1e-4, 20 steps), so each draws the same rollouts
per round; "latr" replaces the sampler by the LATR engine (official
Countdown thresholds tau_abs 0.25, tau_rel 0.15, tau_ed 0.4, eta schedule
from 1.0, lookahead windows (4, 8, 12) tokens: about one written try,
`3+5=8 no, `). "sampling" and "latr" train with GRPO; "dapo_sampling" and
"dapo_latr" with DAPO's clip-higher, token-mean aggregation and dynamic
sampling (`latr_grpo.py`'s DAPO arms), which draws further rounds of
16 x 8 rollouts where groups agree (`sampling_rounds`). Columns: final
greedy accuracy and pass@1 on "search" (128 problems, 4 samples), the mean
distinct completions per group and share of zero-variance groups over the
run, the rounds drawn per step, the mean test accuracy over the
evaluations, the first evaluated step at step-0 accuracy + 0.05, the
branches opened per prompt and wall time.
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

SPLITS = ("search",)
METRICS = ("accuracy", "pass@1")
ROLLOUTS = ("sampling", "latr")

CURVES = {
    "sampling_rounds": latr_grpo.CURVES["sampling_rounds"],
    "distinct_per_group": latr_grpo.CURVES["distinct_per_group"],
    "zero_variance_groups": latr_grpo.CURVES["zero_variance_groups"],
    "mean_eval_accuracy": latr_grpo.CURVES["mean_eval_accuracy"],
    "steps_to_plus5": latr_grpo.CURVES["steps_to_plus5"],
    "branches_opened": common.mean_of("rollout/branches_opened"),
    "length_mean": common.mean_of("rollout/length"),
}


def arms(steps: int):
  """GRPO arms ("sampling", "latr") and DAPO arms ("dapo_sampling",
  "dapo_latr": clip-higher, token-mean aggregation and dynamic sampling, as
  in `latr_grpo.py`)."""
  out = {r: latr_grpo.arm("grpo", r, steps, family="search")
         for r in ROLLOUTS}
  out.update({f"dapo_{r}": latr_grpo.arm("dapo", r, steps, family="search")
              for r in ROLLOUTS})
  return out


if __name__ == "__main__":
  common.main("latr_search", arms, splits=SPLITS, metrics=METRICS,
              curves=CURVES, steps=20)
