"""BroRL's token simulator: Theorem 1's step, its variant, sampling, a small run.

The theorem's closed form (BroRL, arXiv:2510.01180, Theorem 1) is written
here in NumPy from its definitions, independently of the simulator:

  dQ_pos = (eta / N) [(R_c - S_R) Q_neg A_2 + (S_R - R_w) Q_pos B_2
                      + S_R (Q_pos U_neg,2 - Q_neg U_pos,2)].
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import brorl_simulator as sim


def _softmax(z):
  e = np.exp(z - z.max())
  return e / e.sum()


def _closed_form(p, sampled, correct, *, n, lr, r_c, r_w):
  """Theorem 1's dQ_pos and its two sampled terms, from the definitions."""
  a, b = sampled & correct, sampled & ~correct
  u_pos, u_neg = ~sampled & correct, ~sampled & ~correct
  q_pos, q_neg = p[correct].sum(), p[~correct].sum()
  s_r = r_c * p[a].sum() + r_w * p[b].sum()
  a2, b2 = (p[a] ** 2).sum(), (p[b] ** 2).sum()
  upos2, uneg2 = (p[u_pos] ** 2).sum(), (p[u_neg] ** 2).sum()
  t_a = (r_c - s_r) * q_neg * a2
  t_b = (s_r - r_w) * q_pos * b2
  t_u = s_r * (q_pos * uneg2 - q_neg * upos2)
  return lr / n * (t_a + t_b + t_u), lr / n * t_a, lr / n * t_b


def _instance(seed, v, n):
  rng = np.random.default_rng(seed)
  z = rng.normal(scale=rng.uniform(0.5, 3.0), size=v)
  correct = rng.random(v) < rng.uniform(0.1, 0.9)
  correct[0], correct[-1] = True, False  # both kinds present
  counts = np.bincount(rng.choice(v, size=n, p=_softmax(z)),
                       minlength=v).astype(np.float64)
  return z, correct, counts, rng.uniform(0.0, 2.0), -rng.uniform(0.0, 2.0)


@pytest.mark.parametrize("seed,v,n", list(itertools.product(
    (0, 1, 2), (5, 60, 3000), (1, 7, 256, 5000))))
def test_theorem_step_changes_correct_mass_as_the_closed_form(seed, v, n):
  z, correct, counts, r_c, r_w = _instance(seed, v, n)
  lr = 0.7
  want, t_a, t_b = _closed_form(_softmax(z), counts > 0, correct, n=n, lr=lr,
                                r_c=r_c, r_w=r_w)
  # Sampled tokens never shrink the correct mass (the theorem's claim).
  assert t_a >= 0.0 and t_b >= 0.0
  with jax.enable_x64(True):
    reward = sim.token_rewards(jnp.asarray(correct), r_c, r_w)
    step = lambda zz, eta: sim.theorem_step(  # pylint: disable=g-long-lambda
        zz, jnp.asarray(counts), reward, num_rollouts=n, lr=eta)
    q_pos = lambda zz: jnp.sum(jnp.where(correct, jax.nn.softmax(zz), 0.0))
    z64 = jnp.asarray(z)
    dz = step(z64, lr) - z64
    # The first-order change along the simulator's step: the theorem exactly.
    _, dq = jax.jvp(q_pos, (z64,), (dz,))
    np.testing.assert_allclose(float(dq), want, rtol=1e-6, atol=1e-15)
    # The realised one-step change of a small step, divided by its size.
    small = 1e-4
    got = float(q_pos(step(z64, small)) - q_pos(z64))
    np.testing.assert_allclose(got / small, want / lr, rtol=1e-3,
                               atol=1e-12)


def test_theorem_step_matches_numpy_reference():
  rng = np.random.default_rng(3)
  v, n = 12, 7
  z = rng.normal(size=v)
  counts = np.bincount(rng.integers(0, v, n), minlength=v).astype(np.float64)
  correct = np.arange(v) < 4
  r = np.where(correct, 1.0, -1.0)
  p = _softmax(z)
  s_r = sum(r[i] * p[i] for i in range(v) if counts[i] > 0)
  want = [z[i] + 0.5 / n * p[i] * (r[i] * (counts[i] > 0) - s_r)
          for i in range(v)]
  with jax.enable_x64(True):
    got = sim.theorem_step(jnp.asarray(z), jnp.asarray(counts),
                           jnp.asarray(r), num_rollouts=n, lr=0.5)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_reinforce_variant_matches_numpy_reference_and_differs():
  rng = np.random.default_rng(0)
  v, n = 12, 7
  z = rng.normal(size=v).astype(np.float32)
  samples = rng.integers(0, v, n)
  correct = np.arange(v) < 4
  p = _softmax(z.astype(np.float64))
  want = z.astype(np.float64).copy()
  for y in samples:  # sum_k r_k (e_{y_k} - p) / N, one rollout at a time
    r = 1.0 if correct[y] else -1.0
    e = np.zeros(v)
    e[y] = 1.0
    want += 0.5 / n * r * (e - p)
  counts = np.bincount(samples, minlength=v).astype(np.float32)
  reward = sim.token_rewards(jnp.asarray(correct))
  got = sim.reinforce_step(jnp.asarray(z), jnp.asarray(counts), reward,
                           num_rollouts=n, lr=0.5)
  np.testing.assert_allclose(got, want, atol=1e-6)
  theorem = sim.theorem_step(jnp.asarray(z), jnp.asarray(counts), reward,
                             num_rollouts=n, lr=0.5)
  assert np.abs(np.asarray(theorem) - want).max() > 1e-2
  with pytest.raises(ValueError, match="theorem"):
    sim.step_fn("count")


def test_sample_counts_follow_the_policy():
  z = jnp.log(jnp.array([0.5, 0.3, 0.2, 0.0]))
  c = np.asarray(sim.sample_counts(jax.random.key(0), z, 40_000))
  assert c.sum() == 40_000 and c[3] == 0
  np.testing.assert_allclose(c[:3] / 40_000, [0.5, 0.3, 0.2], atol=0.01)


def test_small_simulation_more_rollouts_raise_more_correct_tokens():
  # 80% of the vocabulary correct: S_R > 0 for most small samples, so the
  # unsampled correct tokens lose mass; N = 16384 covers the vocabulary and
  # every correct token gains.
  rows = sim.run(dict(vocab=2000, correct=1600, steps=100,
                      rollouts=[4, 16384]))
  fr = [r["frac_correct_up"] for r in rows]
  assert fr[0] < 0.3 and fr[1] == 1.0
  assert all(r["update"] == "theorem" for r in rows)
  # The count-weighted variant, for comparison: monotone in N, mass grows.
  rows = sim.run(dict(vocab=2000, correct=200, steps=100,
                      rollouts=[4, 64, 1024], update="reinforce"))
  fr = [r["frac_correct_up"] for r in rows]
  assert fr == sorted(fr) and fr[-1] > fr[0]
  assert all(r["correct_mass_end"] > r["correct_mass_start"] for r in rows)
  with pytest.raises(ValueError, match="reward_correct >= 0"):
    sim.run(dict(vocab=10, correct=2, steps=1, rollouts=[2],
                 reward_correct=-1.0))
