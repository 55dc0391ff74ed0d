"""Default experiment: SFT warm-up, then GRPO, on synthetic arithmetic (CPU).

Run:
  python -m experiments.train --workdir=/tmp/rlax_default
(this is also what `python -m experiments.train` with no flags runs).

A 2-layer, 128-wide decoder is trained from scratch with supervised
fine-tuning until it solves part of the held-out problems, then GRPO raises
its held-out greedy accuracy. Writes metrics.jsonl, TensorBoard events,
checkpoints and summary.json (`sft_accuracy`, `final_accuracy`) to the workdir.
"""

from configs import base


def get_config(arg=None):
  return base.get_config(arg)
