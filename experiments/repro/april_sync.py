"""APRIL partial rollouts vs synchronous rollouts, RL from the testbed's base.

  python -m experiments.repro.april_sync --out=runs/repro/april_sync \
      [--seeds=0,1,2] [--steps=30] [--arms=sync,april]

Claim (APRIL, arXiv:2509.18521): on a long-tailed length distribution a
synchronous step waits for its longest rollout; over-provisioning the
generation and stopping once enough groups have finished (the unfinished
rows carried, with their tokens and log-probs, into the next step) gives
more finished rollouts per second of generation at no loss of accuracy.
Both arms run GRPO from the base on the written Countdown search (the
corpus' long tail: median 70, p95 177 tokens, budget 256), 16 prompts x 8
rows per step, AdamW 1e-4; "sync" uses the ordinary sampler, "april"
`configs/april_arith.py`'s engine (2 x 16 groups decoded per step, finished
groups beyond 16 dropped as slime does, old log-probs recomputed by the
trainer). Columns: final greedy accuracy and pass@1 on "search" (128
problems, 4 samples, 256 tokens), finished rollouts per second of rollout
time (`rollout/rollouts` x (1 - `rollout/truncated`) over `time/rollout_s`,
summed over the run), the share of rollout time in the step, the mean share
of trained tokens sampled by an earlier policy (`rollout/off_policy_tokens`;
0 for "sync", whose tokens all come from the step's policy), the mean
staleness, the mean accuracy over the evaluations and wall time per run.
"""

import os
import sys

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

# pylint: disable=g-import-not-at-top
from configs import april_arith
from experiments.repro import common
from experiments.repro import latr_grpo
# pylint: enable=g-import-not-at-top

SPLITS = ("search",)
METRICS = ("accuracy", "pass@1")
ARMS = ("sync", "april")


def _rl_records(records):
  return [r for r in records if "time/rollout_s" in r]


def _finished_per_s(records):
  rl = _rl_records(records)
  done = sum(r["rollout/rollouts"] * (1.0 - r["rollout/truncated"])
             for r in rl)
  secs = sum(r["time/rollout_s"] for r in rl)
  return float(done / secs) if secs else float("nan")


def _rollout_share(records):
  rl = _rl_records(records)
  step = sum(r["time/step_s"] for r in rl)
  return float(sum(r["time/rollout_s"] for r in rl) / step) if step else 0.0


def _off_policy(records):
  vals = [r["rollout/off_policy_tokens"] for r in records
          if "rollout/off_policy_tokens" in r]
  # An engine that never carries rows trains on the step's own tokens only.
  return float(np.mean(vals)) if vals else 0.0


CURVES = {
    "finished_rollouts_per_s": _finished_per_s,
    "rollout_time_share": _rollout_share,
    "off_policy_tokens": _off_policy,
    "staleness_mean": common.mean_of("rollout/staleness_mean"),
    "mean_eval_accuracy": latr_grpo.CURVES["mean_eval_accuracy"],
    "length_mean": common.mean_of("rollout/length"),
}


def arm(name: str, steps: int):
  """The config maker of one arm (see the module docstring)."""
  if name not in ARMS:
    raise ValueError(f"arm={name!r}: this reproduction runs {list(ARMS)}.")

  def make(seed: int, base: str):
    c = latr_grpo.setting(seed, base, steps, family="search")
    if name == "april":
      ref = april_arith.get_config()
      c.rollout = ref.rollout
      c.rl.recompute_old_logp = ref.rl.recompute_old_logp
    return c
  return make


def arms(steps: int):
  return {a: arm(a, steps) for a in ARMS}


if __name__ == "__main__":
  common.main("april_sync", arms, splits=SPLITS, metrics=METRICS,
              curves=CURVES, steps=30)
