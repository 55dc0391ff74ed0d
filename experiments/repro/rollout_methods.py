"""BranchGRPO, XRPO and D^3S vs GRPO, RL from the testbed's base.

  python -m experiments.repro.rollout_methods --out=runs/repro/rollout_methods \
      [--seeds=0,1,2] [--steps=40] [--arms=grpo,branch,xrpo,d3s]

Claims: BranchGRPO (arXiv:2509.06040) reaches GRPO's accuracy with fewer
sampled tokens (shared tree prefixes); XRPO (arXiv:2510.06672) spends the
same rollouts better (more for uncertain prompts, in-context seeding of
prompts no rollout solves); D^3S (arXiv:2509.22115, dynamic dual-level
down-sampling) learns faster per step by training on the most informative
rollouts and tokens. Every arm runs `experiments/repro/latr_grpo.py`'s
GRPO-with-sampling setting (chain sums of 2-4 operands, 16 prompts x 8
rollouts per step, 40 steps, AdamW 1e-4) on the written Countdown search
(`family="search"`, 256-token budget), where GRPO raises the held-out pass@1
within 40 steps (on chain sums it does not: RESULTS.md); only the method's
own section differs:

- "branch": `configs/branch_arith.py`'s engine with a 4 x 2 tree split at
  the prompt and after 12 tokens (about one written try, `3+5=8 no, `), so
  each pair of leaves shares its first 12 tokens; edges train once.
- "xrpo": `configs/xrpo.py`'s allocator (3 phases, half the rollouts
  first, at most 16 per prompt) and its novelty sharpening, inside the same
  128 rollouts per step. In-context seeding is off: a seeded prompt holds
  two solved searches of up to 256 tokens each, which with the 256-token
  budget exceeds the base model's 288-token context (the engine refuses
  it at start-up).
- "d3s": `configs/d3s.py`'s selection (4 of 8 rollouts per group by
  advantage variance, |A| x entropy token selection from 50% to 100% of
  tokens over the first half of the run).

Columns: final greedy accuracy, pass@1 and pass@4 on "search" (128 problems); the rollout
tokens sampled over the run (thousands; a tree samples each shared prefix
once); the mean test accuracy over the evaluations; the share of
zero-variance groups; wall time per run. `python -m experiments.plot OUT`
draws accuracy against steps, rollout tokens and wall time.
"""

import os
import sys

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

# pylint: disable=g-import-not-at-top
from configs import branch_arith
from configs import d3s
from configs import xrpo
from experiments.repro import common
from experiments.repro import latr_grpo
# pylint: enable=g-import-not-at-top

# The tree of the "branch" arm: 4 roots, each split in 2 after 12 tokens.
SPLIT_POINTS = (0, 12)
BRANCHING = (4, 2)


def _total_tokens(records) -> float:
  cum = common.rollout_tokens(records)
  return float(cum[-1]) if cum.size else 0.0


def _kilotokens(records):
  return _total_tokens(records) / 1e3


CURVES = {
    "mean_eval_accuracy": latr_grpo.CURVES["mean_eval_accuracy"],
    "zero_variance_groups": latr_grpo.CURVES["zero_variance_groups"],
    "rollout_ktokens": _kilotokens,
}

METHODS = ("grpo", "branch", "xrpo", "d3s")
FAMILY = "search"


def arm(method: str, steps: int):
  """The config maker of one arm (see the module docstring)."""
  if method not in METHODS:
    raise ValueError(f"method={method!r}: this reproduction runs "
                     f"{list(METHODS)}.")
  plain = latr_grpo.arm("grpo", "sampling", steps, family=FAMILY)

  def make(seed: int, base: str):
    c = plain(seed, base)
    if method == "branch":
      c.rollout = branch_arith.get_config().rollout
      c.rollout.split_points = SPLIT_POINTS
      c.rollout.branching = BRANCHING
      assert int(np.prod(BRANCHING)) == c.rl.num_samples
    elif method == "xrpo":
      ref = xrpo.get_config()
      c.rollout = ref.rollout
      c.rollout.seeding = False  # see the module docstring
      for k in ("xrpo_lambda", "xrpo_kappa_clip", "xrpo_novelty"):
        c.rl[k] = ref.rl[k]
    elif method == "d3s":
      ref = d3s.get_config().rl
      c.rl.d3s_sample_keep = c.rl.num_samples // 2
      c.rl.d3s_token_fraction = ref.d3s_token_fraction
      c.rl.d3s_token_fraction_end = ref.d3s_token_fraction_end
      # configs/d3s.py schedules over half of its run (150 of 300 steps).
      c.rl.d3s_schedule_steps = max(steps // 2, 1)
    return c
  return make


def arms(steps: int):
  return {m: arm(m, steps) for m in METHODS}


if __name__ == "__main__":
  common.main("rollout_methods", arms, splits=latr_grpo.SEARCH_SPLITS,
              metrics=latr_grpo.SEARCH_METRICS, curves=CURVES, steps=40)
