"""PPO with a critic: advantages, exact micro-batching, the critic learns."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlax_llm.methods import ppo
from rlax_llm.models.config import ModelConfig
from rlax_llm.parallel.mesh import make_mesh
from rlax_llm.training import ppo as ppo_lib
from rlax_llm.training import state as state_lib
from rlax_llm.training import steps as steps_lib

CFG = ModelConfig(vocab_size=19, num_layers=1, embed_dim=16, num_heads=2,
                  num_kv_heads=1, head_dim=8, mlp_dim=32, max_seq_len=32)


def _batch(n=8, p=4, t=5, seed=0):
  rng = np.random.default_rng(seed)
  prompt = rng.integers(2, 19, (n, p)).astype(np.int32)
  pmask = np.ones((n, p), bool)
  pmask[::3, :1] = False
  comp = rng.integers(1, 19, (n, t)).astype(np.int32)
  cmask = np.arange(t)[None] < rng.integers(1, t + 1, (n, 1))
  old = np.where(cmask, rng.normal(-3.0, 0.2, (n, t)), 0).astype(np.float32)
  reward = rng.integers(0, 2, (n, 1)).astype(np.float32)
  return steps_lib.RLBatch(prompt, pmask, comp, cmask, old,
                           np.zeros_like(old), reward=reward[:, 0])


def reference_gae(reward_N, value_NT, mask_NT, gamma, lam):
  n, t = mask_NT.shape
  adv = np.zeros((n, t))
  for i in range(n):
    idx = [j for j in range(t) if mask_NT[i, j]]
    next_v, next_a = 0.0, 0.0
    for k, j in enumerate(reversed(idx)):
      r = reward_N[i] if k == 0 else 0.0
      delta = r + gamma * next_v - value_NT[i, j]
      next_a = delta + gamma * lam * next_a
      next_v = value_NT[i, j]
      adv[i, j] = next_a
  return adv, np.where(mask_NT, adv + value_NT, 0)


def test_ppo_advantages_match_reference():
  b = _batch()
  rng = np.random.default_rng(1)
  v = np.where(b.completion_mask, rng.normal(size=b.old_logp.shape), 0)
  adv, ret, raw = ppo_lib.ppo_advantages(jnp.asarray(b.reward),
                                         jnp.asarray(v, jnp.float32),
                                         b.completion_mask, gamma=0.9,
                                         lam=0.8)
  reward_N = b.reward
  want_adv, want_ret = reference_gae(reward_N, v, b.completion_mask, 0.9, 0.8)
  np.testing.assert_allclose(raw, want_adv, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-6)
  x = want_adv[b.completion_mask]
  np.testing.assert_allclose(np.asarray(adv)[b.completion_mask],
                             (x - x.mean()) / (x.std() + 1e-8), rtol=1e-4,
                             atol=1e-5)


def _setup(opt):
  mesh = make_mesh()
  abstract, sh = ppo_lib.ppo_state_shardings(CFG, opt, opt, mesh, seed=0)
  del abstract
  policy, _ = state_lib.create_train_state(CFG, opt, mesh, seed=0)
  state = ppo_lib.to_ppo_state(policy, opt, opt, sh, CFG.embed_dim)
  return state


def test_critic_starts_at_zero_and_copies_the_policy():
  state = _setup(optax.sgd(1.0))
  for a, b in zip(jax.tree.leaves(state.policy.params),
                  jax.tree.leaves(state.critic.params["trunk"])):
    np.testing.assert_array_equal(a, b)
  b = _batch()
  v = jax.jit(ppo_lib.critic_values, static_argnums=0)(  # one program
      state_lib.model_graphdef(CFG), state.critic.params, b.prompt,
      b.prompt_mask, b.completion, b.completion_mask)
  np.testing.assert_array_equal(v, 0.0)


def _step(num_microbatches, opt, length_buckets=0, t=5):
  state = _setup(opt)
  step = ppo_lib.make_ppo_step(state_lib.model_graphdef(CFG), opt, opt,
                               ppo().policy_loss,
                               num_microbatches=num_microbatches,
                               length_buckets=length_buckets)
  return state, jax.jit(step)(state, _batch(t=t))


def test_ppo_microbatching_does_not_change_the_update():
  opt = optax.sgd(10.0)
  old, (one, m1) = _step(1, opt)
  _, (four, m4) = _step(4, opt)
  for part in ("policy", "critic"):
    d1 = jax.tree.map(lambda a, b: np.asarray(a - b),
                      getattr(one, part).params, getattr(old, part).params)
    d4 = jax.tree.map(lambda a, b: np.asarray(a - b),
                      getattr(four, part).params, getattr(old, part).params)
    biggest = max(np.abs(x).max() for x in jax.tree.leaves(d1))
    assert biggest > 0
    for a, b in zip(jax.tree.leaves(d1), jax.tree.leaves(d4)):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * biggest + 2.5e-7)
  np.testing.assert_allclose(m1["value_loss"], m4["value_loss"], rtol=1e-5)


def test_ppo_length_buckets_do_not_change_the_update():
  """Rows by length, micro-batches cut to 8/16/24 columns: same update."""
  opt = optax.sgd(10.0)
  old, (plain, m0) = _step(4, opt, t=24)
  _, (bucketed, m3) = _step(4, opt, length_buckets=3, t=24)
  for part in ("policy", "critic"):
    d0 = jax.tree.map(lambda a, b: np.asarray(a - b),
                      getattr(plain, part).params, getattr(old, part).params)
    d3 = jax.tree.map(lambda a, b: np.asarray(a - b),
                      getattr(bucketed, part).params,
                      getattr(old, part).params)
    biggest = max(np.abs(x).max() for x in jax.tree.leaves(d0))
    assert biggest > 0
    for a, b in zip(jax.tree.leaves(d0), jax.tree.leaves(d3)):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * biggest + 2.5e-7)
  for k in ("value_loss", "loss", "explained_variance"):
    np.testing.assert_allclose(m0[k], m3[k], rtol=1e-5, atol=1e-7)


def test_critic_learns_the_returns():
  opt = optax.adam(3e-3)
  state = _setup(opt)
  step = jax.jit(ppo_lib.make_ppo_step(state_lib.model_graphdef(CFG), opt,
                                       opt, ppo().policy_loss))
  batch = _batch(n=16)
  ev = []
  for _ in range(30):
    state, m = step(state, batch)
    ev.append(float(m["explained_variance"]))
  assert ev[0] == 0.0  # zero head: V = 0
  assert ev[-1] > 0.5, ev
