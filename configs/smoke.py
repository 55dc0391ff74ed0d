"""A seconds-long version of the default experiment, for tests and notebooks.

Run:
  python -m experiments.train --config=configs/smoke.py --workdir=/tmp/rlax_smoke
It exercises every part of the default run (SFT, the SFT->RL switch, GRPO,
evaluation, checkpoints, summary) but learns little. `shrink(config)` applies
the same sizes to any other experiment's config (tests use it to run every
method and engine at smoke size).
"""

from configs import default


def shrink(c):
  """`c` with smoke-test sizes (in place; returns it)."""
  c.sft.steps = 12
  c.sft.batch_size = 16
  c.rl.steps = 4
  c.rl.prompts_per_step = 4
  c.rl.num_samples = 4
  c.eval.every = 2
  c.eval.num_problems = 16
  c.eval.num_samples = 4
  c.eval.batch_size = 16
  c.checkpoint.every = 5
  c.progress = False
  return c


def get_config(arg=None):
  return shrink(default.get_config(arg))
