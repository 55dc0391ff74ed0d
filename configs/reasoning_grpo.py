"""GRPO from the testbed's base model on chain sums and Countdown search.

Run (from the committed base, `pretrain_reasoning.BASE_MODEL`; or
`--config.model.hf_path=DIR/hf` after `python -m experiments.pretrain
--workdir=DIR`):
  python -m experiments.train --config=configs/reasoning_grpo.py \
      --workdir=runs/rl_grpo [--config.task.families=search=1]

No supervised phase: the policy starts as the base model. Rewards are
`rlax_llm.rewards.reasoning.verify` (the final "answer X" only). Any method
(`--config.rl.method`) and rollout engine (`--config.rollout.name`, with that
engine's section) runs on it; the completion budget covers the longest
search traces of the base corpus. The update runs four micro-batches per
optimiser step, rows ordered by length, each at the smallest of four widths
that holds it (`rl.length_buckets`): the same update as one full-width pass
(equal losses to six digits over four steps of the search setting), 10.6 s
-> 3.8 s per step on 2 CPU cores, since most traces use a third of the budget.
"""

import ml_collections

from configs import base
from configs import pretrain_reasoning


def get_config(arg=None):
  c = base.get_config(arg)
  c.task = pretrain_reasoning.task_section(
      families="chain=1,search=1", chain_min_operands=2, chain_max_operands=4,
      batch_by_family=False, max_new_tokens=256)
  c.model = ml_collections.ConfigDict(dict(
      hf_path=pretrain_reasoning.BASE_MODEL, max_seq_len=288))
  c.sft.steps = 0
  c.rl.update(steps=100, prompts_per_step=16, num_samples=8,
              learning_rate=1e-4, warmup_steps=10, num_microbatches=4,
              length_buckets=4)
  c.eval.update(every=25, num_problems=256, num_samples=8, batch_size=256)
  c.checkpoint.every = 25
  c.reward.mode = "inline"
  return c
