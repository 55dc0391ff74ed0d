"""One RL pipeline for every engine: each option changes the batch as
specified (asserted on numbers) or is refused at start-up, naming it."""

import importlib

import jax
import numpy as np
import pytest

from configs import smoke
from rlax_llm import experiment
from rlax_llm.training import state as state_lib
from rlax_llm.training import steps as steps_lib

ENGINES = {"sample": "default", "latr": "latr_arith",
           "branch": "branch_arith", "april": "april_arith"}
STEP = 12  # the first RL step of the shrunk configs


def _config(engine, **rl):
  c = smoke.shrink(importlib.import_module(
      f"configs.{ENGINES[engine]}").get_config())
  c.rl.num_samples = 4
  if engine == "branch":
    c.rollout.split_points, c.rollout.branching = (0, 2), (2, 2)
  c.rl.update(rl)
  return c


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
  """Parameters shared by every case (an untrained tiny model)."""
  exp = experiment.Experiment(_config("sample"),
                              str(tmp_path_factory.mktemp("ref")))
  state, _ = state_lib.create_train_state(exp.model_cfg, exp.rl_opt, exp.mesh,
                                          seed=0)
  other, _ = state_lib.create_train_state(exp.model_cfg, exp.rl_opt,
                                          exp.mesh, seed=1)
  return state.params, other.params


def _batch(engine, tmp_path, params, ref=None, name="x", **rl):
  exp = experiment.Experiment(_config(engine, **rl), str(tmp_path / name))
  if ref is not None:
    state = state_lib.RefState(state_lib.TrainState(
        np.int32(0), params, None, None), ref)
    return exp, exp.rollout(state, STEP)
  return exp, exp.rollout(params, STEP)


def _by_group(x, exp):
  b, g = exp.config.rl.prompts_per_step, exp.config.rl.num_samples
  return np.asarray(x).reshape((b, g) + np.shape(x)[1:])


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_overlong_shaping(engine, tmp_path, policy):
  params, _ = policy
  exp0, (base, _) = _batch(engine, tmp_path, params, name="a")
  exp, (shaped, _) = _batch(engine, tmp_path, params, name="b",
                            overlong_buffer=2)
  t = exp.max_new_tokens
  lengths = base.completion_mask.sum(-1)
  if engine == "april":  # the engine's buffer restarts: same first step
    np.testing.assert_array_equal(lengths, shaped.completion_mask.sum(-1))
  want = base.reward + np.clip((t - 2 - lengths) / 2.0, -1.0, 0.0)
  np.testing.assert_allclose(shaped.reward, want, atol=1e-6)
  assert (want < base.reward).any()  # an untrained model runs long


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_dynamic_sampling(engine, tmp_path, policy):
  params, _ = policy
  exp, (batch, stats) = _batch(engine, tmp_path, params,
                               dynamic_sampling=True, max_sampling_rounds=3)
  r = _by_group(batch.reward, exp)
  w = _by_group(batch.weights, exp)
  live = w.sum((1, 2)) > 0
  # Kept groups have differing rewards; the rest are fully masked fillers.
  assert np.all(r[live].max(1) > r[live].min(1))
  assert stats["rollout/empty_groups"] == int((~live).sum())
  # APRIL filters inside its buffer (decode rounds), the others redraw.
  rounds = stats["rollout/decode_rounds" if engine == "april"
                 else "rollout/sampling_rounds"]
  assert 1 <= rounds <= 3
  if (~live).any():
    assert rounds == 3
  if engine == "april":
    assert stats["rollout/filtered_groups"] >= 0


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_kl_in_reward(engine, tmp_path, policy):
  params, ref = policy
  exp0, (base, _) = _batch(engine, tmp_path, params, name="a")
  exp, (batch, stats) = _batch(engine, tmp_path, params, ref, name="b",
                               kl_coef=0.5, kl_in_reward=True,
                               kl_estimator="k2")
  from rlax_llm.training.scoring import score_completions_jit  # pylint: disable=g-import-not-at-top
  ref_lp = np.asarray(score_completions_jit(
      exp.graphdef, ref, batch.prompt, batch.prompt_mask, batch.completion,
      batch.completion_mask).logp)
  np.testing.assert_allclose(batch.ref_logp, ref_lp, atol=2e-5)
  kl = 0.5 * (ref_lp - batch.old_logp) ** 2 * batch.completion_mask
  want = base.reward - 0.5 * (kl * batch.weights).sum(-1)
  np.testing.assert_allclose(batch.reward, want, rtol=1e-4, atol=1e-5)
  assert stats["reward/kl"] > 0


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_xrpo_sharpening(engine, tmp_path, policy):
  params, _ = policy
  if engine == "branch":
    with pytest.raises(ValueError, match=r"rl\.xrpo_lambda.*branch"):
      _batch(engine, tmp_path, params, xrpo_lambda=2.5)
    return
  _, (base, _) = _batch(engine, tmp_path, params, name="a")
  exp, (batch, stats) = _batch(engine, tmp_path, params, name="b",
                               xrpo_lambda=2.5, xrpo_kappa_clip=0.5)
  n, t = base.completion.shape
  g = exp.config.rl.num_samples
  valid = base.completion_mask
  s = (base.old_logp * valid).sum(-1) / np.maximum(valid.sum(-1), 1)
  s_bg = s.reshape(-1, g)
  nonempty = valid.any(-1).reshape(-1, g)
  mean = (s_bg * nonempty).sum(-1, keepdims=True) / np.maximum(
      nonempty.sum(-1, keepdims=True), 1)
  eta = np.where(nonempty, np.exp(s_bg - mean), 1.0).reshape(n)
  a = base.advantages.max(-1) + base.advantages.min(-1)  # the row's A
  correct = base.reward >= 0.5
  bonus = np.minimum(np.maximum(2.5 * (1 - eta), 0), 0.5 * a)
  want = np.where(correct & (a > 0), a + bonus, a)
  got = batch.advantages.max(-1) + batch.advantages.min(-1)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert "rollout/xrpo_bonus" in stats


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_d3s_sample_selection(engine, tmp_path, policy):
  params, _ = policy
  if engine == "branch":
    with pytest.raises(ValueError, match=r"rl\.d3s_sample_keep.*branch"):
      _batch(engine, tmp_path, params, d3s_sample_keep=2)
    return
  _, (base, _) = _batch(engine, tmp_path, params, name="a")
  exp, (batch, stats) = _batch(engine, tmp_path, params, name="b",
                               d3s_sample_keep=2)
  g = exp.config.rl.num_samples
  a = (base.advantages.max(-1) + base.advantages.min(-1)).reshape(-1, g)
  valid = base.completion_mask.any(-1).reshape(-1, g)
  kept = (batch.weights.sum(-1) > 0).reshape(-1, g)
  for i in range(a.shape[0]):
    # Brute force: the valid 2-subsets of largest advantage variance.
    idx = np.flatnonzero(valid[i])
    best = max(np.var(a[i][[j, k]]) for j in idx for k in idx if j < k)
    chosen = np.flatnonzero(kept[i])
    assert len(chosen) == min(2, len(idx))
    np.testing.assert_allclose(np.var(a[i][chosen]), best, atol=1e-6)
  assert 0 < stats["rollout/d3s_kept"] <= 0.5 + 1e-9


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_rollout_correction_and_kl_loss_in_the_update(engine, tmp_path,
                                                      policy):
  params, _ = policy
  with pytest.raises(ValueError, match="recompute_old_logp"):
    _batch(engine, tmp_path, params, name="r", rollout_correction="mis",
           recompute_old_logp=False)
  c = _config(engine, rollout_correction="tis", rollout_correction_cap=1.5,
              recompute_old_logp=True, kl_coef=0.04)
  exp = experiment.Experiment(c, str(tmp_path / "u"))
  sft, _ = state_lib.create_train_state(exp.model_cfg, exp.rl_opt, exp.mesh,
                                        seed=0)
  abstract, rl_sh = exp.rl_state_shardings()
  state = exp.to_rl_state(sft, rl_sh)
  assert isinstance(state, state_lib.RefState)
  step = exp.jit_rl_step(rl_sh)
  batch, _ = exp.rollout(state, STEP)
  state, m = step(state, batch)
  m = jax.device_get(m)
  # Every engine's groups share their prompt: the scoring passes run each
  # prompt once (rl.share_prompt "auto").
  assert m["shared_prompt"] == 1
  # Fresh rollouts of the same policy: weights are 1 up to f32 rounding, the
  # reference equals the policy at the step's start.
  np.testing.assert_allclose(m["rc_is_weight_mean"], 1.0, atol=1e-4)
  assert abs(m["kl"]) < 1e-5
  assert np.isfinite(m["loss"])


def test_ppo_with_branch_and_token_level_with_branch_are_refused(tmp_path):
  c = _config("branch")
  c.rl.method = "ppo"
  with pytest.raises(ValueError, match="ppo.*branch"):
    experiment.Experiment(c, str(tmp_path / "a"))
  c = _config("branch", token_level_advantages=True)
  c.rl.method = "reinforce_pp"
  with pytest.raises(ValueError, match="token_level_advantages.*branch"):
    experiment.Experiment(c, str(tmp_path / "b"))


def test_option_without_its_precondition_is_refused(tmp_path):
  for rl, match in ((dict(kl_in_reward=True), "kl_coef is 0"),
                    (dict(ref_reset_every=5), "no reference"),
                    (dict(kl_coef=0.1, kl_estimator="k4"), "kl_estimator"),
                    (dict(rollout_correction="is"), "rollout_correction")):
    with pytest.raises(ValueError, match=match):
      experiment.Experiment(_config("sample", **rl), str(tmp_path / "x"))
  c = _config("sample", dual_clip=3.0)
  c.rl.method = "gspo"
  with pytest.raises(ValueError, match="dual_clip"):
    experiment.Experiment(c, str(tmp_path / "y"))
  c = _config("sample")
  c.model.lora_rank, c.rl.method = 4, "ppo"
  with pytest.raises(ValueError, match="lora_rank.*ppo"):
    experiment.Experiment(c, str(tmp_path / "z"))
  c = _config("sample", kl_coef=0.1, ref_reset_every=5)
  c.model.lora_rank = 4
  with pytest.raises(ValueError, match="ref_reset_every with LoRA"):
    experiment.Experiment(c, str(tmp_path / "w"))


def _strip_time(records):
  return [{k: v for k, v in r.items() if not k.startswith("time/")}
          for r in records]


@pytest.mark.slow
def test_reference_is_checkpointed_and_reset(tmp_path):
  """A run with a KL reference (reset every 2 RL steps) resumed half way
  logs exactly the metrics of the uninterrupted run, and its checkpoint
  holds the reference: the policy as of the last reset."""
  from rlax_llm.training.metrics import read_metrics  # pylint: disable=g-import-not-at-top
  # The entropy bonus moves the policy at every step whatever the rewards
  # (the tiny model may score no row right: no policy-gradient signal).
  c = _config("sample", kl_coef=0.04, ref_reset_every=2, learning_rate=3e-3,
              warmup_steps=0, entropy_coef=0.01)
  c.eval.every = 1  # the shortened run evaluates at its end, as this one
  experiment.run(c, str(tmp_path / "full"))
  full = read_metrics(str(tmp_path / "full/metrics.jsonl"))
  kl = [r["rl/kl"] for r in full if "rl/kl" in r]
  assert len(kl) == 4
  assert abs(kl[0]) < 1e-5 and abs(kl[2]) < 1e-5  # right after a reset
  assert kl[1] > 0 and kl[3] > 0                   # after an update
  short = _config("sample", kl_coef=0.04, ref_reset_every=2,
                  learning_rate=3e-3, warmup_steps=0, entropy_coef=0.01)
  short.rl.steps = 1
  short.eval.every = 1
  experiment.run(short, str(tmp_path / "resumed"))
  exp = experiment.Experiment(c, str(tmp_path / "resumed"))
  abstract, sh = exp.rl_state_shardings()
  state, _ = exp.ckpt.restore(exp.ckpt.latest_step(), abstract, sh)
  sft_step = c.sft.steps
  assert exp.ckpt.latest_step() == sft_step + 1
  switch, _ = exp.ckpt.restore(sft_step, abstract, sh)
  for a, b in zip(jax.tree.leaves(state.ref), jax.tree.leaves(switch.ref)):
    np.testing.assert_array_equal(a, b)  # the frozen RL-start policy
  assert any(np.any(np.asarray(a) != np.asarray(b)) for a, b in zip(
      jax.tree.leaves(state.train.params), jax.tree.leaves(state.ref)))
  exp.close()
  experiment.run(c, str(tmp_path / "resumed"))
  got = _strip_time(read_metrics(str(tmp_path / "resumed/metrics.jsonl")))
  assert got == _strip_time(full)
