"""Default experiment: SFT warm-up, then GRPO, on synthetic arithmetic (CPU).

Run:
  python -m experiments.train --workdir=/tmp/rlax_default
(this is also what `python -m experiments.train` with no flags runs).

A 2-layer, 128-wide decoder (0.4M parameters) is trained from scratch on
1- and 2-digit +, -, * problems with 1,500 steps of supervised fine-tuning,
which leaves it solving roughly 25-55% of held-out problems (greedy), then
300 GRPO steps (64 prompts x 16 samples, one on-policy update per batch)
raise held-out greedy accuracy by about 8-14 points. About 3.5 minutes on 2
CPU cores. Writes metrics.jsonl, TensorBoard events, checkpoints and
summary.json (`sft_accuracy`, `final_accuracy`) to the workdir.
"""

from configs import base


def get_config(arg=None):
  return base.get_config(arg)
