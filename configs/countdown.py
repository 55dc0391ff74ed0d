"""Countdown: SFT on solutions, then GRPO with a process-isolated verifier.

Run:
  python -m experiments.train --config=configs/countdown.py \
      --workdir=/tmp/rlax_countdown

The prompt lists 3-4 numbers (1..99) and a target; a completion scores 1 when
its equation uses each given number at most once and evaluates exactly to the
target (`rlax_llm.rewards.countdown.verify`, run in reward worker processes
with a per-item deadline; reward/errors and reward/timeouts are logged each
RL step). A 2-layer 128-wide decoder learns the equation format during SFT
(seed 0: 27% of 256 held-out problems solved greedily after the 1,000 SFT
steps, 5.5 minutes on 2 CPU cores; completions average 13 tokens). Writes the usual metrics.jsonl, checkpoints
and summary.json.
"""

import ml_collections

from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  c.task = ml_collections.ConfigDict(dict(
      name="countdown",
      num_numbers_min=3,
      num_numbers_max=4,
      min_number=1,
      max_number=99,
      min_target=1,
      max_target=999,
      test_fraction=0.1,
      max_prompt_len=0,   # 0 = the longest prompt of the problem space
      max_new_tokens=0,   # 0 = the longest solution + EOS
  ))
  c.model.max_seq_len = 128  # prompts are up to 79 characters
  c.sft.steps = 1000
  c.rl.steps = 200
  c.rl.prompts_per_step = 32
  c.rl.num_samples = 8
  c.eval.num_problems = 256
  return c
