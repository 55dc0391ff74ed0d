"""GSM8K with a Hugging Face tokenizer and a model trained from scratch.

Run:
  python -m experiments.train --config=configs/gsm8k.py \
      --config.task.tokenizer_path=/path/to/dir/with/tokenizer.json \
      --workdir=/tmp/rlax_gsm8k

Problems come from ../shared/data/gsm8k/{train,test}.jsonl (or
`--config.task.source_dir`), prepared once as TFDS ArrayRecord files under
`task.data_dir` (default <workdir>/tfds) and streamed by a seeded grain loader
whose position is saved with every checkpoint, so a resumed run reads exactly
the records an uninterrupted one would (metrics `data/index_crc`,
`data/examples_read`). Rewards: `rlax_llm.rewards.math.verify(style="gsm8k")`
in reward worker processes. The 'small' decoder trained from scratch cannot
solve GSM8K; this config is the scaffold that `qwen2_5_0_5b_gsm8k` fills
with pretrained weights (and what the tests shrink).
"""

import ml_collections

from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  c.task = ml_collections.ConfigDict(dict(
      name="gsm8k",
      source_dir="",       # JSONL root; "" = ../shared/data beside the repo
      data_dir="",         # prepared TFDS data; "" = <workdir>/tfds
      tokenizer_path="",   # dir with tokenizer.json; "" = model.hf_path
      chat_template=False,  # wrap the prompt in the tokenizer's chat template
      system_prompt="",    # system message when chat_template is on
      prompt_template="",  # format string over the record; "" = the default
      max_prompt_len=256,  # tokens; longer train prompts are skipped, counted
      max_new_tokens=256,
      train_split="train",
      reward_style="",     # "" = "gsm8k"
  ))
  c.model = base.model_config("small")
  c.model.max_seq_len = 512
  c.sft.steps = 0
  c.rl.steps = 200
  c.rl.prompts_per_step = 16
  c.rl.num_samples = 8
  c.rl.learning_rate = 1e-4
  c.eval.num_problems = 256
  c.eval.batch_size = 64
  return c
