"""Supervised fine-tuning of the testbed's base model on longer chain sums.

Run (from the committed base, `pretrain_reasoning.BASE_MODEL`; or
`--config.model.hf_path=DIR/hf` after `python -m experiments.pretrain
--workdir=DIR`):
  python -m experiments.train --config=configs/reasoning_finetune.py \
      --workdir=runs/ft_sft [--config.sft.loss=otr|otr_exact|dft]

The base model (`configs/pretrain_reasoning.py`) saw chain sums of 2-3
operands, Countdown search and sorting. Fine-tuning uses chain sums of 2-4
operands only; held-out accuracy is read on "test" (2-4 operands, in
distribution), "ood" (5-6 operands) and "sort" (never fine-tuned on:
forgetting). `experiments/repro/otr_sft.py` runs the OTR / SFT / DFT / exact
OTR comparison over seeds from this config.
"""

import ml_collections

from configs import base
from configs import pretrain_reasoning


def get_config(arg=None):
  c = base.get_config(arg)
  c.task = pretrain_reasoning.task_section(
      families="chain=1", chain_min_operands=2, chain_max_operands=4,
      batch_by_family=False, max_new_tokens=72)
  # The architecture and tokenizer come from the checkpoint.
  c.model = ml_collections.ConfigDict(dict(
      hf_path=pretrain_reasoning.BASE_MODEL, max_seq_len=128))
  c.sft.update(steps=300, batch_size=32, learning_rate=3e-4, warmup_steps=20,
               lr_decay="cosine", pad_multiple=16)
  c.rl.steps = 0
  c.eval.update(num_problems=256, num_samples=0, batch_size=256)
  c.checkpoint.every = 100
  c.reward.mode = "inline"
  return c
