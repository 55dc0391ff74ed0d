"""GRPO on GSM8K from Qwen2.5-0.5B-Instruct (a local Hugging Face checkpoint).

Run (GPU/TPU; the weights are read from disk, never downloaded):
  python -m experiments.train --config=configs/qwen2_5_0_5b_gsm8k.py \
      --config.model.hf_path=/path/to/Qwen2.5-0.5B-Instruct \
      --workdir=/tmp/rlax_qwen_gsm8k
  python -m experiments.evaluate --config=configs/qwen2_5_0_5b_gsm8k.py \
      --config.model.hf_path=/path/to/Qwen2.5-0.5B-Instruct \
      --workdir=/tmp/rlax_qwen_gsm8k [--split=test]

The directory must hold config.json, model.safetensors (or shards with
their index), tokenizer.json, tokenizer_config.json (with the chat template)
and generation_config.json. The policy's architecture and initial weights
come from it (streamed onto the shardings tensor by tensor), the tokenizer
too; no SFT (sft.steps=0), then 500 GRPO steps of 32 questions x 8 samples at
temperature 1.0, lr 1e-6 (AdamW, 10 warm-up steps), one on-policy update per
batch split into 4 micro-batches. Prompts are the question with a step-by-step
instruction inside the chat template (at most 256 tokens; longer ones are
skipped and counted in data/dropped_too_long); completions up to 512 tokens.
Parameters and optimiser state are float32, activations bfloat16 (float32
parameters keep 1e-6 updates from vanishing under bfloat16 rounding). The
held-out score is greedy accuracy, pass@8 and maj@8 on 512 test questions
(every 50 RL steps). Expect greedy test accuracy to start near 30-35% and to
rise by several points.
"""

import ml_collections

from configs import gsm8k


def get_config(arg=None):
  c = gsm8k.get_config(arg)
  # The architecture comes from hf_path's config.json; these apply on top.
  c.model = ml_collections.ConfigDict(dict(
      preset="hf",
      hf_path="",            # required: a local HF checkpoint directory
      max_seq_len=768,       # prompt (256) + completion (512)
      dtype="bfloat16",      # activations
      param_dtype="float32",  # parameters and optimiser state
      remat="full",          # keep only block inputs for the backward pass
  ))
  c.task.chat_template = True
  c.task.max_prompt_len = 256
  c.task.max_new_tokens = 512
  c.sft.steps = 0
  c.rl.steps = 500
  c.rl.prompts_per_step = 32
  c.rl.num_samples = 8
  c.rl.learning_rate = 1e-6
  c.rl.warmup_steps = 10
  c.rl.weight_decay = 0.0
  c.rl.grad_clip = 1.0
  c.rl.temperature = 1.0
  c.rl.num_microbatches = 4
  c.eval.every = 50
  c.eval.num_problems = 512
  c.eval.num_samples = 8
  c.eval.batch_size = 128
  c.checkpoint.every = 50
  c.reward.num_workers = 4
  return c
