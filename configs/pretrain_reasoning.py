"""The testbed's base model: cross-entropy on the reasoning corpus.

Run:
  python -m experiments.pretrain --config=configs/pretrain_reasoning.py \
      --workdir=runs/base_reasoning

A 4-layer, 256-wide decoder (3.2M parameters) learns the three families of
`rlax_llm.data.reasoning` from scratch: chain sums of 2-3 operands, written
Countdown search over three numbers (long-tailed lengths, up to ~250
tokens) and digit sorting. `experiments.pretrain` then writes it as a
Hugging Face checkpoint (`<workdir>/hf`: config.json, safetensors,
tokenizer.json) that the fine-tuning and RL configs of `experiments/repro/`
load with `--config.model.hf_path`. The fine-tuning configs train on chain
sums of up to 4 operands (one more than pretraining saw) and test on 5-6
(split "ood"); sorting is never fine-tuned on, so its accuracy measures
forgetting.
"""

import os

import ml_collections

from configs import base

# The base model this config produced, committed with the repository (HF
# format: config.json, model.safetensors, tokenizer.json; with its
# base_eval.json and corpus.json), so that fine-tuning, RL and the
# reproductions of experiments/repro start from the same weights on every
# machine. `experiments.pretrain` rebuilds it (into --workdir/hf).
BASE_MODEL = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "experiments", "repro", "base_reasoning")


def task_section(**overrides) -> ml_collections.ConfigDict:
  """The reasoning task's fields (`rlax_llm.data.reasoning.ReasoningConfig`)."""
  fields = dict(
      name="reasoning",
      families="chain=3,search=2,sort=1",
      chain_min_operands=2,
      chain_max_operands=3,
      ood_min_operands=5,
      ood_max_operands=6,
      chain_max_operand=99,
      search_max_number=13,
      search_max_target=150,
      search_max_tries=12,
      sort_min_len=3,
      sort_max_len=8,
      test_fraction=0.05,
      split_salt=0,          # the test split; independent of the seed
      batch_by_family=True,  # one family per batch (less padding)
      max_prompt_len=28,
      max_new_tokens=256,
  )
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def get_config(arg=None):
  c = base.get_config(arg)
  c.task = task_section()
  c.model.update(num_layers=4, embed_dim=256, num_heads=8, num_kv_heads=2,
                 head_dim=32, mlp_dim=768, max_seq_len=288)
  c.sft.update(steps=2400, batch_size=64, learning_rate=2e-3,
               warmup_steps=100, lr_decay="cosine", weight_decay=0.01,
               pad_multiple=32)
  c.rl.steps = 0
  c.eval.update(every=500, num_problems=256, num_samples=0, batch_size=256)
  c.checkpoint.every = 250
  c.reward.mode = "inline"
  return c
