"""GRPO on GSM8K from Gemma 2 2B-it (a local Hugging Face checkpoint).

Run (GPU/TPU; the weights are read from disk, never downloaded):
  python -m experiments.train --config=configs/gemma2_2b_gsm8k.py \
      --config.model.hf_path=/path/to/gemma-2-2b-it \
      --workdir=/tmp/rlax_gemma2_gsm8k
  python -m experiments.evaluate --config=configs/gemma2_2b_gsm8k.py \
      --config.model.hf_path=/path/to/gemma-2-2b-it \
      --workdir=/tmp/rlax_gemma2_gsm8k [--split=test]

The same recipe as `qwen2_5_0_5b_gsm8k` (which it derives from): the
architecture, weights and tokenizer come from the directory (config.json with
model_type "gemma2", safetensors weights, tokenizer.json,
tokenizer_config.json with Gemma's chat template, generation_config.json whose
eos ids include <end_of_turn>), no SFT, 500 GRPO steps of 32 questions x 8
samples at temperature 1.0, lr 1e-6, greedy / pass@8 / maj@8 on 512 test
questions every 50 steps. Gemma's chat template has no system role, so the
instruction stays inside the user turn (task.system_prompt is empty).

What differs is sized for a 2.6B model with a 256k vocabulary: the update is
split into 16 micro-batches (the [N, T, V] logits of one micro-batch are
16 x 768 x 256000 floats) and rollouts and evaluation decode at most 128
rows at a time (the KV cache of 26 layers x 4 KV heads x 256 is ~0.1 MB per
token per row). Log-probs are scored through the full logits
(rl.logprob_chunk=0): Gemma 2 soft-caps the output logits (30 tanh(z / 30)),
which `Transformer.logits_from_hidden` applies and the chunked scoring path
does not. Parameters and optimiser state are float32, activations bfloat16.
Expect greedy test accuracy to start well above zero (the instruction-tuned
model reasons step by step in its chat format) and to rise by several points.
"""

from configs import qwen2_5_0_5b_gsm8k


def get_config(arg=None):
  c = qwen2_5_0_5b_gsm8k.get_config(arg)
  # The architecture comes from hf_path's config.json; the section's
  # max_seq_len / dtype / param_dtype / remat apply on top.
  c.model.hf_path = ""  # required: a local gemma-2-2b-it directory
  c.task.system_prompt = ""  # Gemma's template rejects a system turn
  c.rl.num_microbatches = 16
  c.rl.logprob_chunk = 0  # keep: the chunked path lacks the final soft-cap
  c.rl.decode_chunk = 128  # sequences per decode chunk (rollouts, eval)
  return c
