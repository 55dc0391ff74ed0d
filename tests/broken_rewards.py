"""Reward functions that misbehave on purpose, for the reward workers' tests.

A module of its own with light imports: a reward worker imports the module
of its function when it starts (and each replacement of a worker killed
after a timeout does too), so a test module that imports the whole project
would make every such start take seconds.
"""

import time

from rlax_llm.rewards import countdown as countdown_rewards


def countdown_reward_that_hangs_or_raises(completion, numbers, target, *,
                                          hang=(), fail=()):
  """The Countdown reward, except that it never returns for a target in
  `hang` and raises for one in `fail`."""
  if target in hang:
    while True:
      time.sleep(1.0)
  if target in fail:
    raise RuntimeError("a broken reward")
  return countdown_rewards.verify(completion, numbers, target)
