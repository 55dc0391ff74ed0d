"""Method configs compose the intended core functions."""

import importlib

import jax.numpy as jnp
import numpy as np
import pytest

from configs import smoke
from rlax_llm.methods import get_method
from rlax_llm.training import experiment

REWARD_BG = jnp.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])


def _shrunk(name):
  """The named config at smoke size (sizes from configs/smoke.py)."""
  c = importlib.import_module(f"configs.{name}").get_config()
  s = smoke.get_config()
  for section in ("sft", "eval", "checkpoint"):
    c[section] = s[section]
  for key in ("steps", "prompts_per_step", "num_samples"):
    c.rl[key] = s.rl[key]
  c.progress = False
  return c


@pytest.mark.parametrize("name,want", [
    # GRPO: (r - mean) / (sample std + eps); std of [1,0,0,1] is 0.57735.
    ("grpo", [[0.866025, -0.866025, -0.866025, 0.866025],
              [0.5, 0.5, 0.5, -1.5]]),
    # Dr.GRPO: r - mean.
    ("dr_grpo", [[0.5, -0.5, -0.5, 0.5], [0.25, 0.25, 0.25, -0.75]]),
    # RLOO: r - mean of the other G - 1.
    ("rloo", [[2 / 3, -2 / 3, -2 / 3, 2 / 3], [1 / 3, 1 / 3, 1 / 3, -1.0]]),
])
def test_config_selects_the_advantage(name, want, tmp_path):
  exp = experiment.Experiment(_shrunk(name), str(tmp_path))
  np.testing.assert_allclose(np.asarray(exp.method.advantage_fn(REWARD_BG)),
                             want, atol=1e-5)


def test_dr_grpo_divides_by_the_completion_budget(tmp_path):
  exp = experiment.Experiment(_shrunk("dr_grpo"), str(tmp_path))
  logp = jnp.full((2, 5), -1.0)
  mask = jnp.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], bool)
  adv = jnp.ones((2, 5))
  loss, _ = exp.method.policy_loss(logp, logp, adv, mask, num_tokens=6.0,
                                   num_seqs=2.0)
  # ratio 1: -sum(A) / (num_seqs * max_new_tokens) = -6 / (2 * 5).
  assert exp.max_new_tokens == 5
  np.testing.assert_allclose(float(loss), -6.0 / 10.0, rtol=1e-6)


def test_rloo_smoke_run_finishes(tmp_path):
  summary = experiment.run(_shrunk("rloo"), str(tmp_path))
  assert 0.0 <= summary["final_accuracy"] <= 1.0


def test_unknown_method_suggests():
  with pytest.raises(ValueError, match="did you mean"):
    get_method("rlooo")
