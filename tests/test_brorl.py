"""BroRL: the config's arithmetic, a shrunk run, and the token simulator."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from configs import brorl_arith, default
from experiments import brorl_simulator as sim
from rlax_llm.training import experiment
from rlax_llm.training.metrics import read_metrics


def test_config_scales_lr_and_keeps_microbatch_rows():
  c, d = brorl_arith.get_config(), default.get_config()
  assert c.rl.num_samples == 512 and c.rollout.name == "sample"
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


def test_pg_step_matches_numpy_reference():
  rng = np.random.default_rng(0)
  v, n = 12, 7
  z = rng.normal(size=v).astype(np.float32)
  samples = rng.integers(0, v, n)
  correct = np.arange(v) < 4
  p = np.exp(z - z.max())
  p /= p.sum()
  want = z.astype(np.float64).copy()
  for y in samples:  # sum_k r_k (e_{y_k} - p) / N, one rollout at a time
    r = 1.0 if correct[y] else -1.0
    e = np.zeros(v)
    e[y] = 1.0
    want += 0.5 / n * r * (e - p)
  counts = np.bincount(samples, minlength=v).astype(np.float32)
  got = sim.pg_step(jnp.asarray(z), jnp.asarray(counts), jnp.asarray(correct),
                    num_rollouts=n, lr=0.5)
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_sample_counts_follow_the_policy():
  z = jnp.log(jnp.array([0.5, 0.3, 0.2, 0.0]))
  c = np.asarray(sim.sample_counts(jax.random.key(0), z, 40_000))
  assert c.sum() == 40_000 and c[3] == 0
  np.testing.assert_allclose(c[:3] / 40_000, [0.5, 0.3, 0.2], atol=0.01)


def test_small_simulation_more_rollouts_raise_more_correct_tokens():
  rows = sim.run(dict(vocab=2000, correct=200, steps=100,
                      rollouts=[4, 64, 1024]))
  fr = [r["frac_correct_up"] for r in rows]
  assert fr == sorted(fr) and fr[-1] > fr[0]
  assert all(r["correct_mass_end"] > r["correct_mass_start"] for r in rows)
