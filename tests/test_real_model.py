"""A Hugging Face checkpoint through the whole experiment loop.

A tiny random Qwen2 model is built with transformers and saved with a
byte-level BPE tokenizer trained here (chat template, generation config);
the Qwen2.5-0.5B GSM8K config, shrunk, then runs GRPO on a handful of GSM8K
questions from it.
"""

import json
import os
import shutil

import flax.nnx as nnx
import numpy as np
import pytest

from configs import qwen2_5_0_5b_gsm8k as qwen_config
from rlax_llm import experiment
from rlax_llm.training.metrics import read_metrics
from tests.test_tasks import short_gsm8k, write_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("qwen")
  source, texts = short_gsm8k(str(root / "src"))
  tok_dir = write_tokenizer(str(root / "tok"), texts)
  with open(os.path.join(tok_dir, "tokenizer.json")) as f:
    vocab = len(json.load(f)["model"]["vocab"]) + 3  # + added specials
  torch.manual_seed(0)
  cfg = transformers.Qwen2Config(
      vocab_size=vocab + 13,  # padded past the tokenizer, as Qwen's are
      hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2,
      max_position_embeddings=512, rope_theta=10_000.0, rms_norm_eps=1e-6,
      tie_word_embeddings=True)
  model = transformers.Qwen2ForCausalLM(cfg).eval()
  path = str(root / "model")
  model.save_pretrained(path, safe_serialization=True)
  for name in os.listdir(tok_dir):
    shutil.copy(os.path.join(tok_dir, name), path)
  return path, source, str(root / "tfds"), model


def _config(hf_dir):
  path, source, data_dir, _ = hf_dir
  c = qwen_config.get_config()
  c.model.update(hf_path=path, dtype="float32", param_dtype="float32",
                 remat="none", max_seq_len=104)
  c.task.update(source_dir=source, data_dir=data_dir, max_prompt_len=96,
                max_new_tokens=8)
  c.rl.update(steps=2, prompts_per_step=2, num_samples=2, num_microbatches=2)
  c.eval.update(every=1, num_problems=3, num_samples=2, batch_size=4)
  c.reward.num_workers = 1
  c.progress = False
  return c


def test_loaded_policy_matches_transformers_then_trains(hf_dir, tmp_path):
  c = _config(hf_dir)
  exp = experiment.Experiment(c, str(tmp_path))
  hf_model = hf_dir[3]
  assert exp.model_cfg.vocab_size == hf_model.config.vocab_size
  assert exp.model_cfg.qkv_bias and exp.model_cfg.tie_embeddings
  # The prompts are the chat template around the question.
  prompt = exp.setup.task.train_batch(0, 1)[0].prompt
  assert prompt.startswith("<|im_start|>user\n")
  assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
  exp = experiment.Experiment(c, str(tmp_path))  # a fresh stream
  state, _ = exp.initial_state()
  ids = exp.setup.tokenizer.encode(prompt)
  ours = np.asarray(nnx.jit(lambda m, x: m(x))(  # one program
      nnx.merge(exp.graphdef, state.params), np.asarray([ids], np.int32)))
  with torch.no_grad():
    theirs = hf_model(torch.tensor([ids])).logits.numpy()
  assert ours.shape == theirs.shape == (1, len(ids), hf_model.config.vocab_size)
  assert np.abs(theirs).max() > 0.05  # a comparison of non-trivial logits
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
  del state

  summary = exp.run()
  records = read_metrics(str(tmp_path / "metrics.jsonl"))
  rl = [r for r in records if "rl/loss" in r]
  assert [r["step"] for r in rl] == [1, 2]
  for r in rl:
    for key in ("rl/loss", "rl/logp_mismatch_max", "reward/mean",
                "reward/errors", "reward/timeouts", "data/index_crc"):
      assert np.isfinite(r[key]), key
    assert r["reward/errors"] == 0 and r["reward/timeouts"] == 0
    assert r["rl/logp_mismatch_max"] < 1e-4
  assert 0.0 <= summary["final_accuracy"] <= 1.0
  assert [r["step"] for r in records if "eval/accuracy" in r] == [0, 1, 2]


def test_missing_hf_path_names_the_field(hf_dir, tmp_path):
  c = _config(hf_dir)
  c.model.hf_path = ""
  c.task.tokenizer_path = hf_dir[0]
  with pytest.raises(ValueError, match="--config.model.hf_path"):
    experiment.Experiment(c, str(tmp_path / "a"))
  c = _config(hf_dir)
  c.model.hf_path = str(tmp_path / "absent")
  with pytest.raises(FileNotFoundError, match="absent"):
    experiment.Experiment(c, str(tmp_path / "b"))
