"""BroRL: the config's arithmetic, a shrunk run, and the token simulator."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from configs import brorl_arith, default
from rlax_llm import experiment
from rlax_llm.training.metrics import read_metrics


def test_config_scales_lr_and_keeps_microbatch_rows():
  c, d = brorl_arith.get_config(), default.get_config()
  assert c.rl.num_samples == 512 and c.rollout.name == "sample"
  # ProRL's ingredients, through the shared pipeline.
  assert c.rl.kl_coef > 0 and c.rl.ref_reset_every > 0
  assert c.rl.dynamic_sampling
  n, n0 = c.rl.prompts_per_step * 512, d.rl.prompts_per_step * d.rl.num_samples
  assert math.isclose(c.rl.learning_rate, 3e-4 * math.sqrt(2048 / 1024))
  assert c.rl.num_minibatches == d.rl.num_minibatches
  assert n // (c.rl.num_minibatches * c.rl.num_microbatches) == n0 // (
      d.rl.num_minibatches * d.rl.num_microbatches) == 1024


def test_shrunk_run(tmp_path):
  c = brorl_arith.get_config()
  c.sft.steps, c.sft.batch_size = 4, 16
  c.rl.steps, c.rl.prompts_per_step = 2, 1
  c.rl.num_microbatches = 4  # 512 rows in micro-batches of 128
  c.eval.every, c.eval.num_problems, c.eval.num_samples = 2, 8, 2
  c.eval.batch_size, c.progress = 8, False
  experiment.run(c, str(tmp_path))
  rl = [r for r in read_metrics(str(tmp_path / "metrics.jsonl"))
        if "rl/loss" in r]
  assert len(rl) == 2
  assert all(np.isfinite(r["rl/loss"]) for r in rl)
  assert max(r["rl/logp_mismatch_max"] for r in rl) < 1e-4
