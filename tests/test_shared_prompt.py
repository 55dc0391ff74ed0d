"""Shared-prompt scoring: each group's prompt run once for its G completions.

`score_completions(prompt_group=G)` must give the plain path's log-probs,
entropies and gradients (up to float rounding) for every kind of layer the
model has; the update step and the experiment loop must use it only where
the rows keep their groups, and say so otherwise.
"""

import dataclasses

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import smoke
from rlax_llm import experiment
from rlax_llm.experiment import config_utils
from rlax_llm.methods import grpo
from rlax_llm.models.config import ModelConfig
from rlax_llm.models.transformer import Transformer
from rlax_llm.parallel.mesh import make_mesh
from rlax_llm.training import state as state_lib
from rlax_llm.training import steps as steps_lib
from rlax_llm.training.scoring import (prompt_groups_shared,
                                       score_completions)

V = 29
BASE = dict(vocab_size=V, num_layers=2, embed_dim=32, num_heads=4,
            num_kv_heads=2, head_dim=8, mlp_dim=48, max_seq_len=40,
            init_std=0.3)
CONFIGS = {
    "qwen2": ModelConfig(**BASE, qkv_bias=True),
    # Gemma-style: sliding layers with their own rotary base (a window of 4
    # cuts into the prompt), soft-capped scores and logits, post-norms.
    "gemma": ModelConfig(**dict(BASE, num_layers=3), layer_types=(
        "sliding_attention", "full_attention", "sliding_attention"),
                         sliding_window=4, attn_logit_softcap=5.0,
                         final_logit_softcap=7.0, post_norms=True,
                         rope_local_theta=100.0),
}


def _groups(b=3, g=4, p=6, t=7, seed=0):
  """B prompts (left and right padded) x G completions with padding."""
  rng = np.random.default_rng(seed)
  prompt = np.zeros((b, p), np.int32)
  pmask = np.zeros((b, p), bool)
  for i, n in enumerate([p, 2, 4][:b]):
    sl = slice(p - n, p) if i % 2 == 0 else slice(0, n)
    prompt[i, sl] = rng.integers(2, V, n)
    pmask[i, sl] = True
  comp = rng.integers(2, V, (b * g, t)).astype(np.int32)
  lengths = rng.integers(0, t + 1, b * g)  # includes an empty completion
  lengths[0] = 0
  cmask = np.arange(t)[None] < lengths[:, None]
  weights = rng.normal(size=(b * g, t)).astype(np.float32)
  return (np.repeat(prompt, g, 0), np.repeat(pmask, g, 0), comp, cmask,
          weights)


@pytest.mark.parametrize("name,chunk", [("qwen2", 0), ("gemma", 3)])
def test_scores_and_gradients_equal_the_plain_path(name, chunk):
  graphdef, params = nnx.split(Transformer(CONFIGS[name], rngs=nnx.Rngs(0)))
  prompt, pmask, comp, cmask, w = _groups()

  def objective(params, group):
    s = score_completions(graphdef, params, prompt, pmask, comp, cmask,
                          temperature=0.8, chunk_size=chunk,
                          prompt_group=group)
    return jnp.sum(s.logp * w) + 0.3 * jnp.sum(s.entropy * w), s

  grad = jax.value_and_grad(objective, has_aux=True)
  (_, plain), g1 = jax.jit(lambda p: grad(p, 1))(params)
  (_, shared), g4 = jax.jit(lambda p: grad(p, 4))(params)
  for a, b in ((plain.logp, shared.logp), (plain.entropy, shared.entropy)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0,
                               atol=2e-5)
  assert np.all(np.asarray(shared.logp)[~cmask] == 0)
  assert np.abs(np.asarray(plain.logp)).max() > 1  # not all masked
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(b, a, rtol=0, atol=2e-5 * np.abs(a).max())


def test_bfloat16_shared_scores_follow_the_plain_path():
  cfg = dataclasses.replace(CONFIGS["qwen2"], dtype="bfloat16")
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(1)))
  prompt, pmask, comp, cmask, _ = _groups(seed=1)
  score = jax.jit(lambda p, g: score_completions(
      graphdef, p, prompt, pmask, comp, cmask, prompt_group=g).logp,
                  static_argnums=1)
  plain, shared = np.asarray(score(params, 1)), np.asarray(score(params, 4))
  # bfloat16 activations: the two paths round differently, by about 2^-8 of
  # the values.
  np.testing.assert_allclose(shared, plain, rtol=0,
                             atol=0.02 * np.abs(plain).max())


def test_groups_must_divide_the_rows():
  graphdef, params = nnx.split(Transformer(CONFIGS["qwen2"],
                                           rngs=nnx.Rngs(0)))
  prompt, pmask, comp, cmask, _ = _groups()
  with pytest.raises(ValueError, match="prompt_group=5 does not divide"):
    score_completions(graphdef, params, prompt, pmask, comp, cmask,
                      prompt_group=5)


def test_prompt_groups_shared_by_hand():
  prompt = np.array([[0, 5, 6], [0, 5, 6], [7, 8, 9], [7, 8, 9]])
  mask = np.array([[0, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1]], bool)
  assert prompt_groups_shared(prompt, mask, 2)
  assert prompt_groups_shared(prompt, mask, 1)
  assert not prompt_groups_shared(prompt, mask, 4)  # two prompts in a group
  assert not prompt_groups_shared(prompt, mask, 3)  # 3 does not divide 4
  other = mask.copy()
  other[1, 0] = True  # same ids, another mask
  assert not prompt_groups_shared(prompt, other, 2)
  pad = prompt.copy()
  pad[1, 0] = 3  # another id under the padding
  assert not prompt_groups_shared(pad, mask, 2)


def _step_batch(b=4, g=4, p=5, t=6, seed=0):
  rng = np.random.default_rng(seed)
  prompt, pmask, comp, cmask, _ = _groups(b=3, g=g, p=p, t=t, seed=seed)
  prompt = np.concatenate([prompt, prompt[:g]])  # B = 4: prompt 0 twice
  pmask = np.concatenate([pmask, pmask[:g]])
  comp = rng.integers(1, V, (b * g, t)).astype(np.int32)
  lengths = rng.integers(1, t + 1, b * g)
  cmask = np.arange(t)[None] < lengths[:, None]
  old = np.where(cmask, rng.normal(-2.0, 0.3, (b * g, t)), 0).astype(
      np.float32)
  adv = (rng.normal(size=(b * g, 1)) * cmask).astype(np.float32)
  return steps_lib.RLBatch(prompt, pmask, comp, cmask, old, adv)


def test_shared_update_equals_the_plain_update():
  """Two micro-batches of two groups, old log-probs recomputed, a KL to a
  reference: every scoring pass of the step is shared."""
  cfg = CONFIGS["qwen2"]
  opt = optax.sgd(100.0)  # the change is -lr * gradient, far above rounding
  mesh = make_mesh()
  state, _ = state_lib.create_train_state(cfg, opt, mesh, seed=0)
  method = grpo(max_new_tokens=6)
  batch = _step_batch()
  ref = lambda p: jax.tree.map(lambda x: 0.9 * x, p)  # noqa: E731
  out = {}
  for group in (1, 4):
    step = steps_lib.make_rl_step(
        state_lib.model_graphdef(cfg), opt, method.policy_loss,
        num_microbatches=2, recompute_old_logp=True, use_ref=True,
        kl_coef=0.5, ref_fn=ref, prompt_group=group)
    out[group] = jax.jit(step)(state, batch)
  d1, d4 = (jax.tree.map(lambda a, b: np.asarray(a - b), out[g][0].params,
                         state.params) for g in (1, 4))
  assert np.abs(jax.tree.leaves(d1)[0]).max() > 0  # it did update
  for a, b in zip(jax.tree.leaves(d1), jax.tree.leaves(d4)):
    np.testing.assert_allclose(b, a, rtol=0,
                               atol=1e-5 * np.abs(a).max() + 2.5e-7)
  for k in ("loss", "kl", "logp_mismatch_max"):
    np.testing.assert_allclose(out[4][1][k], out[1][1][k], rtol=1e-5,
                               atol=1e-7)
  assert float(out[4][1]["kl"]) > 1e-4


def test_step_refuses_layouts_that_split_groups():
  cfg = CONFIGS["qwen2"]
  graphdef, opt = state_lib.model_graphdef(cfg), optax.sgd(1.0)
  loss = grpo(max_new_tokens=6).policy_loss
  with pytest.raises(ValueError, match="num_minibatches=2 draws"):
    steps_lib.make_rl_step(graphdef, opt, loss, num_minibatches=2,
                           prompt_group=4)
  with pytest.raises(ValueError, match="length_buckets=2 orders"):
    steps_lib.make_rl_step(graphdef, opt, loss, length_buckets=2,
                           prompt_group=4)
  state, _ = state_lib.create_train_state(cfg, opt, make_mesh(), seed=0)
  step = steps_lib.make_rl_step(graphdef, opt, loss, num_microbatches=8,
                                prompt_group=4)
  with pytest.raises(ValueError, match="Micro-batches of 2 rows do not hold"):
    jax.eval_shape(step, state, _step_batch())


def test_config_modes_and_their_errors():
  c = smoke.get_config()
  c.rl.num_samples, c.rl.prompts_per_step = 4, 2
  assert c.rl.share_prompt == "auto"
  assert config_utils.prompt_group(c) == 4
  c.rl.num_microbatches = 4  # micro-batches of 2 rows
  assert config_utils.prompt_group(c) == 1  # "auto": off where it cannot be
  c.rl.share_prompt = "on"
  with pytest.raises(ValueError, match=r"rl\.share_prompt='on' cannot work "
                     r"here: micro-batches of 8 / rl\.num_microbatches=4"):
    config_utils.validate(c)
  c.rl.num_microbatches, c.rl.num_minibatches = 1, 2
  with pytest.raises(ValueError, match=r"rl\.num_minibatches=2 draws"):
    config_utils.validate(c)
  c.rl.num_minibatches = 1
  config_utils.validate(c)
  assert config_utils.prompt_group(c) == 4
  c.rl.share_prompt = "off"
  assert config_utils.prompt_group(c) == 1
  c.rl.share_prompt = "yes"
  with pytest.raises(ValueError, match=r"rl\.share_prompt must be one of"):
    config_utils.validate(c)


def test_experiment_takes_the_plain_update_for_mixed_groups(tmp_path):
  """A batch whose groups do not share a prompt (XRPO's seeded rows) takes
  the plain update, and the metric says so."""
  c = smoke.shrink(smoke.get_config())
  c.rl.num_samples = 4
  exp = experiment.Experiment(c, str(tmp_path))
  _, rl_sh = exp.rl_state_shardings()

  def fresh():  # the step donates its input state
    sft, _ = state_lib.create_train_state(exp.model_cfg, exp.rl_opt,
                                          exp.mesh, seed=0)
    return exp.to_rl_state(sft, rl_sh)

  step = exp.jit_rl_step(rl_sh)
  batch, _ = exp.rollout(fresh(), c.sft.steps)
  prompt = np.array(batch.prompt)
  prompt[1, 0] = (prompt[1, 0] + 1) % exp.model_cfg.vocab_size
  _, m = step(fresh(), batch._replace(prompt=prompt))
  assert float(m["shared_prompt"]) == 0
  _, m = step(fresh(), batch)
  assert float(m["shared_prompt"]) == 1


def test_critic_values_share_the_prompt_too():
  from rlax_llm.training import ppo as ppo_lib  # pylint: disable=g-import-not-at-top
  graphdef, params = nnx.split(Transformer(CONFIGS["qwen2"],
                                           rngs=nnx.Rngs(2)))
  rng = np.random.default_rng(2)
  critic = {"trunk": params,
            "head": {"w": jnp.asarray(rng.normal(size=(32,)), jnp.float32),
                     "b": jnp.float32(0.5)}}
  prompt, pmask, comp, cmask, _ = _groups(seed=2)
  values = jax.jit(lambda c, g: ppo_lib.critic_values(
      graphdef, c, prompt, pmask, comp, cmask, prompt_group=g),
                   static_argnums=1)
  plain, shared = np.asarray(values(critic, 1)), np.asarray(values(critic, 4))
  assert np.abs(plain).max() > 0.1 and np.all(plain[~cmask] == 0)
  np.testing.assert_allclose(shared, plain, rtol=0, atol=2e-5)


def test_reference_log_probs_of_groups_share_the_prompt(tmp_path,
                                                       monkeypatch):
  """The experiment's reference scoring (a KL in the reward) of a draw's
  groups: the same log-probs with the prompt shared as without."""
  from rlax_llm.experiment import loop  # pylint: disable=g-import-not-at-top
  groups_seen = []
  plain_fn = loop.score_completions_jit

  def spy(*args, prompt_group=1, **kwargs):
    groups_seen.append(prompt_group)
    return plain_fn(*args, prompt_group=prompt_group, **kwargs)

  monkeypatch.setattr(loop, "score_completions_jit", spy)
  out = {}
  for mode in ("auto", "off"):
    c = smoke.shrink(smoke.get_config())
    c.rl.share_prompt = mode
    exp = experiment.Experiment(c, str(tmp_path / mode))
    state, _ = state_lib.create_train_state(exp.model_cfg, exp.rl_opt,
                                            exp.mesh, seed=0)
    groups = exp.engine.rollout(state.params, c.sft.steps, 0)
    out[mode] = exp.ref_logp_fn(state.params)(groups)
  assert groups_seen == [4, 1]
  assert out["off"].shape == groups.tokens.shape
  assert np.abs(out["off"]).max() > 0.1
  np.testing.assert_allclose(out["auto"], out["off"], rtol=0, atol=2e-5)
