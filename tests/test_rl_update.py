"""The shared RL update: token weights, the reference KL, recomputed old
log-probs and rollout correction, each against an independent reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlax_llm.methods import grpo
from rlax_llm.models.config import ModelConfig
from rlax_llm.parallel.mesh import make_mesh
from rlax_llm.training import state as state_lib
from rlax_llm.training import steps as steps_lib
from rlax_llm.training.scoring import score_completions_jit

CFG = ModelConfig(vocab_size=19, num_layers=1, embed_dim=16, num_heads=2,
                  num_kv_heads=1, head_dim=8, mlp_dim=32, max_seq_len=32)
GD = state_lib.model_graphdef(CFG)


def _batch(n=8, p=4, t=5, seed=0):
  rng = np.random.default_rng(seed)
  prompt = rng.integers(2, 19, (n, p)).astype(np.int32)
  pmask = np.ones((n, p), bool)
  pmask[::3, :1] = False
  comp = rng.integers(1, 19, (n, t)).astype(np.int32)
  cmask = np.arange(t)[None] < rng.integers(1, t + 1, (n, 1))
  old = np.where(cmask, rng.normal(-3.0, 0.4, (n, t)), 0).astype(np.float32)
  adv = (rng.normal(size=(n, 1)) * cmask).astype(np.float32)
  return steps_lib.RLBatch(prompt, pmask, comp, cmask, old, adv)


def _state(seed=0, opt=None):
  opt = opt or optax.sgd(10.0)
  state, _ = state_lib.create_train_state(CFG, opt, make_mesh(), seed=seed)
  return state, opt


def _delta(new, old):
  return [np.asarray(a - b) for a, b in zip(jax.tree.leaves(new.params),
                                            jax.tree.leaves(old.params))]


def _assert_same_update(d1, d2):
  scale = max(np.abs(x).max() for x in d1)
  assert scale > 0
  for a, b in zip(d1, d2):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale + 2.5e-7)


def _np_kl(logp, ref, kind):
  d = ref - logp
  return {"k1": -d, "k2": 0.5 * d ** 2, "k3": np.expm1(d) - d}[kind]


def _np_kl_grad(logp, ref, kind):
  d = ref - logp  # d/dlogp of each estimator
  return {"k1": np.ones_like(d), "k2": -d, "k3": 1.0 - np.exp(d)}[kind]


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_term_and_gradient_match_numpy(kind):
  rng = np.random.default_rng(1)
  logp = rng.normal(-2, 0.5, (4, 6)).astype(np.float32)
  ref = rng.normal(-2, 0.5, (4, 6)).astype(np.float32)
  mask = np.arange(6)[None] < np.array([[6], [3], [1], [0]])
  w = np.where(mask, rng.uniform(0.2, 1.0, (4, 6)), 0).astype(np.float32)
  num_tokens = w.sum()

  def f(lp):
    return steps_lib.weighted_kl(lp, ref, w, mask, kind=kind,
                                 num_tokens=num_tokens)[0]

  loss, grad = jax.value_and_grad(f)(jnp.asarray(logp))
  want = (w * _np_kl(logp, ref, kind) * mask).sum() / num_tokens
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  want_g = np.where(mask, w * _np_kl_grad(logp, ref, kind) / num_tokens, 0)
  np.testing.assert_allclose(np.asarray(grad), want_g, rtol=1e-4, atol=1e-7)


def test_kl_loss_gradient_through_the_step_matches_the_kl_term():
  """The step with kl_coef=c moves the policy by the KL term's gradient:
  update(c) - update(0) = -lr * c * grad KL (SGD), with the KL term scored
  independently through `score_completions`."""
  state, opt = _state()
  ref_state, _ = _state(seed=1)
  b = _batch()
  lr, coef = 10.0, 0.5
  outs = {}
  for c in (0.0, coef):
    step = jax.jit(steps_lib.make_rl_step(GD, opt, grpo().policy_loss,
                                          kl_coef=c, use_ref=True))
    outs[c] = step(state_lib.RefState(state, ref_state.params), b)
  ref_lp = score_completions_jit(GD, ref_state.params, b.prompt, b.prompt_mask,
                                 b.completion, b.completion_mask).logp
  mask = b.completion_mask

  def kl_term(params):
    lp = score_completions_jit(GD, params, b.prompt, b.prompt_mask,
                               b.completion, b.completion_mask).logp
    kl = _np_kl_jnp(lp, ref_lp)
    return jnp.sum(jnp.where(mask, kl, 0)) / mask.sum()

  g = jax.jit(jax.grad(kl_term))(state.params)
  d = [np.asarray(a - b_) for a, b_ in zip(
      jax.tree.leaves(outs[coef][0].train.params),
      jax.tree.leaves(outs[0.0][0].train.params))]
  want = [-lr * coef * np.asarray(x) for x in jax.tree.leaves(g)]
  _assert_same_update(want, d)
  # kl is logged in both, as the masked mean of k3 at the step's start.
  np.testing.assert_allclose(float(outs[0.0][1]["kl"]),
                             float(jax.jit(kl_term)(state.params)), rtol=1e-5)
  # The reference never moves.
  for a, b_ in zip(jax.tree.leaves(outs[coef][0].ref),
                   jax.tree.leaves(ref_state.params)):
    np.testing.assert_array_equal(a, b_)


def _np_kl_jnp(lp, ref):
  d = ref - lp
  return jnp.expm1(d) - d


def test_kl_to_an_identical_reference_is_zero():
  state, opt = _state()
  step = jax.jit(steps_lib.make_rl_step(GD, opt, grpo().policy_loss,
                                        kl_coef=0.04, use_ref=True))
  _, m = step(state_lib.RefState(state, state.params), _batch())
  assert abs(float(m["kl"])) < 1e-10


def test_zero_weight_rows_train_nothing():
  """Rows of weight 0 (masked filler groups, unselected rollouts) leave the
  update equal to that of the batch without them (token-mean loss)."""
  state, opt = _state()
  b = _batch(n=8)
  keep = np.array([1, 0, 1, 1, 0, 0, 1, 0], bool)
  w = (b.completion_mask * keep[:, None]).astype(np.float32)
  step = jax.jit(steps_lib.make_rl_step(GD, opt, grpo(
      aggregation="token_mean").policy_loss))
  with_w, _ = step(state, b._replace(weights=w))
  only = steps_lib.RLBatch(*(np.asarray(x)[keep] for x in b[:6]))
  without, _ = step(state, only)
  _assert_same_update(_delta(with_w, state), _delta(without, state))


def test_a_shared_prefix_counts_by_its_weight():
  """Two copies of a row at weight 1/2 each give the update of one copy at
  weight 1: a tree edge weighted once trains once (BranchGRPO)."""
  state, opt = _state()
  b = _batch(n=8)
  step = jax.jit(steps_lib.make_rl_step(GD, opt, grpo(
      aggregation="token_mean").policy_loss))
  dup = np.array([0, 0, 1, 2, 3, 4, 5, 6])
  w = b.completion_mask.astype(np.float32)[dup]
  w[:2] *= 0.5
  twice = steps_lib.RLBatch(*(np.asarray(x)[dup] for x in b[:6]), weights=w)
  once = steps_lib.RLBatch(*(np.asarray(x)[:7] for x in b[:6]))
  step7 = jax.jit(steps_lib.make_rl_step(GD, opt, grpo(
      aggregation="token_mean").policy_loss))
  a, _ = step(state, twice)
  c, _ = step7(state, once)
  _assert_same_update(_delta(a, state), _delta(c, state))


def test_recomputed_old_logp_starts_the_ratio_at_one():
  """With stale behaviour log-probs, recompute_old_logp gives the update of
  a batch whose old log-probs are the trainer's own (ratio 1 at the first
  update), and the step reports ratio_mean 1."""
  state, opt = _state()
  b = _batch()
  cur = score_completions_jit(GD, state.params, b.prompt, b.prompt_mask,
                              b.completion, b.completion_mask).logp
  rec = jax.jit(steps_lib.make_rl_step(GD, opt, grpo().policy_loss,
                                       recompute_old_logp=True))
  plain = jax.jit(steps_lib.make_rl_step(GD, opt, grpo().policy_loss))
  a, ma = rec(state, b)
  c, _ = plain(state, b._replace(old_logp=np.asarray(cur)))
  stale, ms = plain(state, b)
  _assert_same_update(_delta(a, state), _delta(c, state))
  np.testing.assert_allclose(float(ma["ratio_mean"]), 1.0, atol=1e-5)
  assert abs(float(ms["ratio_mean"]) - 1.0) > 1e-2  # stale: not 1
  # The mismatch metric still compares the sampler's log-probs.
  assert float(ma["logp_mismatch_mean"]) > 0.1


@pytest.mark.parametrize("mode,level", [("truncate", "token"),
                                        ("mask", "token"),
                                        ("truncate", "sequence")])
def test_rollout_correction_weights_match_numpy(mode, level):
  state, opt = _state()
  b = _batch()
  cur = np.asarray(score_completions_jit(GD, state.params, b.prompt,
                                         b.prompt_mask, b.completion,
                                         b.completion_mask).logp)
  cap = 1.5
  log_rho = np.where(b.completion_mask, cur - b.old_logp, 0)
  if level == "sequence":
    log_rho = np.broadcast_to(log_rho.sum(-1, keepdims=True), log_rho.shape)
  rho = np.exp(log_rho)
  w = np.minimum(rho, cap) if mode == "truncate" else np.where(rho > cap, 0,
                                                                rho)
  w = np.where(b.completion_mask, w, 0).astype(np.float32)
  rc = jax.jit(steps_lib.make_rl_step(
      GD, opt, grpo().policy_loss, recompute_old_logp=True,
      rollout_correction=steps_lib.RolloutCorrection(mode, level, cap)))
  plain = jax.jit(steps_lib.make_rl_step(GD, opt, grpo().policy_loss))
  a, m = rc(state, b)
  c, _ = plain(state, b._replace(old_logp=cur,
                                 advantages=b.advantages * w))
  _assert_same_update(_delta(a, state), _delta(c, state))
  valid = b.completion_mask
  np.testing.assert_allclose(float(m["rc_is_weight_mean"]),
                             w[valid].mean(), rtol=1e-4)
  np.testing.assert_allclose(float(m["rc_is_capped_frac"]),
                             (rho[valid] > cap).mean(), atol=1e-6)


def test_rollout_correction_without_recompute_is_refused():
  with pytest.raises(ValueError, match="recompute_old_logp"):
    steps_lib.make_rl_step(GD, optax.sgd(1.0), grpo().policy_loss,
                           rollout_correction=steps_lib.RolloutCorrection())


def test_d3s_token_selection_keeps_the_top_share_by_adv_times_entropy():
  state, opt = _state()
  b = _batch(n=8)
  sc = score_completions_jit(GD, state.params, b.prompt, b.prompt_mask,
                             b.completion, b.completion_mask)
  ent = np.asarray(sc.entropy)
  score = np.where(b.completion_mask, np.abs(b.advantages) * ent, -np.inf)
  valid = b.completion_mask.sum()
  k = int(np.ceil(0.3 * valid))
  thresh = np.sort(score.ravel())[::-1][k - 1]
  keep = (score >= thresh) & b.completion_mask
  assert 0 < keep.sum() < valid
  step = jax.jit(steps_lib.make_rl_step(GD, opt, grpo(
      aggregation="token_mean").policy_loss))
  a, m = step(state, b._replace(token_fraction=np.full(8, 0.3, np.float32)))
  c, _ = step(state, b._replace(weights=keep.astype(np.float32)))
  _assert_same_update(_delta(a, state), _delta(c, state))
  np.testing.assert_allclose(float(m["d3s_token_kept"]), keep.sum() / valid,
                             rtol=1e-6)
