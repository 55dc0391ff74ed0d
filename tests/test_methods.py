"""Method configs compose the intended core functions."""

import importlib

import jax.numpy as jnp
import numpy as np
import pytest

from configs import smoke
from rlax_llm.methods import get_method
from rlax_llm import experiment

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
    # REINFORCE++ with group baseline: group-centred, then divided by the
    # batch (population) std sqrt(1.75 / 8) = 0.467707.
    ("reinforce_pp", [[1.069045, -1.069045, -1.069045, 1.069045],
                      [0.534522, 0.534522, 0.534522, -1.603567]]),
    ("gspo", [[0.866025, -0.866025, -0.866025, 0.866025],
              [0.5, 0.5, 0.5, -1.5]]),
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


def _rollout(name, tmp_path, reward_fn=None, step=20):
  from rlax_llm.training import state as state_lib  # pylint: disable=g-import-not-at-top
  exp = experiment.Experiment(_shrunk(name), str(tmp_path))
  if reward_fn is not None:
    exp.setup.reward_fn = reward_fn
  state, _ = state_lib.create_train_state(exp.model_cfg, exp.rl_opt, exp.mesh,
                                          seed=0)
  return exp, exp.rollout(state.params, step)


def test_dynamic_sampling_keeps_only_informative_groups(tmp_path):
  def coin(texts, answers):  # a deterministic 0/1 reward per text
    del answers
    return np.array([float(sum(map(ord, t)) % 2) for t in texts], np.float32)

  exp, (batch, stats) = _rollout("dapo", tmp_path, coin)
  b, g = exp.config.rl.prompts_per_step, exp.config.rl.num_samples
  adv = batch.advantages.reshape(b, g, -1)
  mask = batch.completion_mask.reshape(b, g, -1)
  for i in range(b):
    if mask[i].any():  # a kept group: its rewards differ, so advantages do
      assert np.abs(adv[i][mask[i]]).max() > 0
  assert stats["rollout/empty_groups"] == b - int(mask.any((1, 2)).sum())


def test_dynamic_sampling_masks_out_a_batch_without_signal(tmp_path):
  exp, (batch, stats) = _rollout(
      "dapo", tmp_path, lambda t, a: np.zeros(len(t), np.float32))
  assert not batch.completion_mask.any()
  assert not batch.advantages.any()
  assert stats["rollout/sampling_rounds"] == exp.config.rl.max_sampling_rounds
  assert stats["rollout/empty_groups"] == exp.config.rl.prompts_per_step


def test_dapo_config_uses_clip_higher(tmp_path):
  exp = experiment.Experiment(_shrunk("dapo"), str(tmp_path))
  logp = jnp.zeros((1, 3))
  mask = jnp.ones((1, 3), bool)
  # ratio e^0.3 = 1.35 > 1 + 0.28 with A > 0: clipped at 1.28.
  loss, m = exp.method.policy_loss(logp + 0.3, logp, jnp.ones((1, 3)), mask)
  np.testing.assert_allclose(float(loss), -1.28, rtol=1e-6)
  assert float(m["clip_frac_high"]) == 1.0


def test_gspo_clips_the_sequence_ratio(tmp_path):
  exp = experiment.Experiment(_shrunk("gspo"), str(tmp_path))
  old = jnp.zeros((1, 4))
  mask = jnp.array([[1, 1, 1, 0]], bool)
  logp = old.at[0, 0].set(0.3)  # sequence ratio exp(0.3 / 3) = 1.105
  loss, _ = exp.method.policy_loss(logp, old, jnp.ones((1, 4)), mask)
  # A > 0 and the ratio exceeds 1 + 4e-4: every token sees the clipped ratio.
  np.testing.assert_allclose(float(loss), -(1 + 4e-4), rtol=1e-6)


def test_cispo_weights_logp_by_the_clipped_ratio(tmp_path):
  exp = experiment.Experiment(_shrunk("cispo"), str(tmp_path))
  old = jnp.full((1, 2), -1.0)
  logp = jnp.array([[-0.5, -1.0]])  # ratios e^0.5 = 1.65 (clipped), 1
  mask = jnp.ones((1, 2), bool)
  loss, _ = exp.method.policy_loss(logp, old, jnp.ones((1, 2)), mask)
  # -(w * A * logp) token mean: -(1.28 * -0.5 + 1.0 * -1.0) / 2 = 0.82.
  np.testing.assert_allclose(float(loss), 0.82, rtol=1e-6)


def test_overlong_buffer_penalises_long_completions(tmp_path):
  c = _shrunk("dapo")
  c.rl.overlong_buffer = 2  # budget 5: lengths 4 and 5 get -0.5 and -1
  exp = experiment.Experiment(c, str(tmp_path))
  exp.setup.reward_fn = lambda t, a: np.ones(len(t), np.float32)
  from rlax_llm.training import state as state_lib  # pylint: disable=g-import-not-at-top
  state, _ = state_lib.create_train_state(exp.model_cfg, exp.rl_opt, exp.mesh,
                                          seed=0)
  groups = exp.engine.rollout(state.params, 3, 0)
  for shape in exp.per_draw:
    groups = shape(groups)
  want = 1.0 - np.clip(groups.lengths - 3, 0, 2) / 2.0
  np.testing.assert_allclose(groups.reward, want, atol=1e-6)
  assert (groups.lengths >= 4).any()  # an untrained model runs long


def test_group_diversity_measures_against_hand_counts():
  from rlax_llm.methods import rollouts  # pylint: disable=g-import-not-at-top
  texts = [["12", "12", "13", ""], ["7", "7", "7", "7"]]
  assert rollouts.distinct_completions(texts) == (3 + 1) / 2
  # Group 0 pairs: (12,12) 0, (12,13) 1/2 twice, (12,"") 1 twice, (13,"") 1
  # -> 4 / 6; group 1: all equal -> 0.
  assert rollouts.pairwise_edit_distance(texts) == pytest.approx(
      (4 / 6 + 0) / 2)
  # Levenshtein("kitten", "sitting") = 3 over 7 characters.
  assert rollouts.pairwise_edit_distance([["kitten", "sitting"]]) == (
      pytest.approx(3 / 7))
  assert rollouts.pairwise_edit_distance([["", ""]]) == 0.0
