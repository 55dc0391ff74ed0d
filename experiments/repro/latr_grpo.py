"""LATR vs stochastic sampling under GRPO and DAPO, RL from the testbed's base.

  python -m experiments.repro.latr_grpo --out=runs/repro/latr_grpo \
      [--seeds=0,1,2] [--steps=40] \
      [--arms=grpo_sampling,grpo_latr,dapo_sampling,dapo_latr]

Claim (LATR, arXiv:2510.24302): lookahead tree rollouts give more distinct
completions per group than plain sampling, so fewer groups have zero reward
variance, and RL reaches a given accuracy in fewer steps with an equal or
better final pass@1 / pass@k. Every arm runs RL from the same base model
(`configs/reasoning_grpo.py` on chain sums of 2-4 operands; the base saw 2-3)
with the same prompts per step, rows per group and steps, so each arm draws
the same number of rollouts (DAPO's dynamic sampling draws more where groups
agree; `sampling_rounds` reports it: rounds of 16 x 8 rollouts per step). Only `config.rollout` differs: the
config's sampler, or the LATR engine with the official Countdown thresholds
and eta schedule (`configs/latr_arith.py`) and lookahead windows scaled to
these traces (one written step, `a+b=c, `, is 8-13 characters; the official
windows 20/30/50 are for answers of 1,024 tokens).

Columns: final greedy accuracy, pass@1 and pass@8 on "test" (256 problems, 8
samples each), and over the training curve the mean distinct completions per
group, the mean share of zero-variance groups (all rows right or all wrong),
the mean rounds of rollouts drawn per step, the mean test accuracy over the evaluations
(every 10 steps, step 0 included) and the first evaluated step whose accuracy
is at least that of step 0 plus 0.05 (`steps_to_plus5`; a run that never gets
there counts as steps + 10). Writes OUT/table.json and OUT/table.md.
"""

import os
import sys

import ml_collections
import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

# pylint: disable=g-import-not-at-top
from configs import dapo
from configs import latr_arith
from configs import pretrain_reasoning
from configs import reasoning_grpo
from experiments.repro import common
# pylint: enable=g-import-not-at-top

SPLITS = ("test",)
METRICS = ("accuracy", "pass@1", "pass@8")
# The written-search setting (`setting(..., family="search")`): its split and
# metrics (4 samples per problem).
SEARCH_SPLITS = ("search",)
SEARCH_METRICS = ("accuracy", "pass@1", "pass@4")
FAMILIES = ("chain", "search")


def family_splits(family: str):
  """(splits, metrics) a reproduction reports for `setting(..., family)`."""
  if family == "chain":
    return SPLITS, METRICS
  if family == "search":
    return SEARCH_SPLITS, SEARCH_METRICS
  raise ValueError(f"family={family!r}: one of {list(FAMILIES)}.")
EVAL_EVERY = 10
# Lookahead windows for chain traces: about one written step and a half.
CHAIN_WINDOWS = (4, 8, 12)


def _zero_variance(records):
  vals = [r["reward/solved_groups"] + r["reward/failed_groups"]
          for r in records if "reward/solved_groups" in r]
  return float(np.mean(vals)) if vals else float("nan")


def _evals(records):
  return [(r["step"], r["eval/accuracy"]) for r in records
          if "eval/accuracy" in r]


def _mean_eval_accuracy(records):
  return float(np.mean([a for _, a in _evals(records)]))


def _steps_to_plus5(records):
  evals = _evals(records)
  start = evals[0][1]
  for step, acc in evals[1:]:
    if acc >= start + 0.05:
      return float(step)
  return float(evals[-1][0] + EVAL_EVERY)


def _sampling_rounds(records):
  vals = [r.get("rollout/sampling_rounds", 1) for r in records
          if "reward/mean" in r]
  return float(np.mean(vals))


CURVES = {
    "distinct_per_group": common.mean_of("rollout/distinct_per_group"),
    "zero_variance_groups": _zero_variance,
    "mean_eval_accuracy": _mean_eval_accuracy,
    "steps_to_plus5": _steps_to_plus5,
    "sampling_rounds": _sampling_rounds,
}


def latr_section() -> ml_collections.ConfigDict:
  section = latr_arith.get_config().rollout
  section.windows = CHAIN_WINDOWS
  return section


def setting(seed: int, base: str, steps: int, family: str = "chain"):
  """GRPO from `base` with sampling: the reproductions' common setting.

  family "chain": chain sums of 2-4 operands (64-token budget), evaluated on
  "test" (256 problems, 8 samples); "search": the written Countdown search
  (256-token budget, the corpus' long tail), evaluated on "search" (128
  problems, 4 samples). Both: 16 prompts x 8 rows per step, AdamW 1e-4, an
  evaluation every EVAL_EVERY steps and one checkpoint at the end.
  """
  c = reasoning_grpo.get_config()
  c.seed = seed
  c.model.hf_path = os.path.abspath(base)
  if family == "chain":
    c.model.max_seq_len = 112
    c.task = pretrain_reasoning.task_section(
        families="chain=1", chain_min_operands=2, chain_max_operands=4,
        batch_by_family=False, max_new_tokens=64)
    c.eval.update(every=EVAL_EVERY, num_problems=256, num_samples=8,
                  batch_size=256)
  elif family == "search":
    c.task = pretrain_reasoning.task_section(
        families="search=1", batch_by_family=False, max_new_tokens=256)
    c.eval.update(split="search", every=EVAL_EVERY, num_problems=128,
                  num_samples=4, batch_size=128)
  else:
    raise ValueError(f"family={family!r}: 'chain' or 'search'.")
  c.rl.update(steps=steps, prompts_per_step=16, num_samples=8)
  c.checkpoint.every = steps
  c.progress = False
  return c


def arm(method: str, rollout: str, steps: int, family: str = "chain"):
  def make(seed: int, base: str):
    c = setting(seed, base, steps, family)
    if method == "dapo":
      d = dapo.get_config()
      for k in ("clip_low", "clip_high", "aggregation", "dynamic_sampling"):
        c.rl[k] = d.rl[k]
    elif method != "grpo":
      raise ValueError(f"method={method!r}: this reproduction runs 'grpo' "
                       "or 'dapo'.")
    if rollout == "latr":
      c.rollout = latr_section()
    elif rollout != "sampling":
      raise ValueError(f"rollout={rollout!r}: 'sampling' or 'latr'.")
    return c
  return make


def arms(steps: int, methods=("grpo", "dapo")):
  return {f"{m}_{r}": arm(m, r, steps) for m in methods
          for r in ("sampling", "latr")}


if __name__ == "__main__":
  common.main("latr_grpo", arms, splits=SPLITS, metrics=METRICS,
              curves=CURVES, steps=40)
