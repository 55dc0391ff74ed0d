"""OTR vs SFT vs DFT vs exact OTR, fine-tuning the testbed's base model.

  python -m experiments.repro.otr_sft --out=runs/repro/otr_sft \
      [--seeds=0,1,2] [--steps=300] [--arms=...]

Claim (One-Token Rollout): fine-tuning with OTR's token-level policy
gradient generalises better out of distribution and forgets less than
cross-entropy. Every arm fine-tunes the same base model
(`configs/reasoning_finetune.py`: chain sums of 2-4 operands, the base saw
2-3) for the same steps and batch, so each sees the same number of tokens;
only `sft.loss` differs; the "base" row scores the base model itself (zero
steps). Scored greedily on "test" (2-4 operands), "ood"
(5-6 operands) and "sort" (never fine-tuned on; forgetting) and "search".
Writes OUT/table.json and OUT/table.md.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

# pylint: disable=g-import-not-at-top
from configs import reasoning_finetune
from experiments.repro import common
# pylint: enable=g-import-not-at-top

SPLITS = ("test", "ood", "sort", "search")
LOSSES = {"sft": "cross_entropy", "dft": "dft", "otr": "otr",
          "otr_exact": "otr_exact"}


def arm(loss: str, steps: int):
  def make(seed: int, base: str):
    c = reasoning_finetune.get_config()
    c.seed = seed
    c.model.hf_path = os.path.abspath(base)
    c.sft.loss = loss
    c.sft.steps = steps
    c.progress = False
    return c
  return make


def arms(steps: int):
  """The base model itself (no fine-tuning step) and the four losses."""
  out = {"base": arm("cross_entropy", 0)}
  out.update({name: arm(loss, steps) for name, loss in LOSSES.items()})
  return out


if __name__ == "__main__":
  common.main("otr_sft", arms, splits=SPLITS, steps=300)
