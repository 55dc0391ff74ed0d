"""Samplers: filters against NumPy, sampled frequencies against the softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlax_llm.sampling import samplers
from rlax_llm.sampling.samplers import SamplerConfig

# The draws run compiled, as in decoding (one program per shape and
# settings instead of an eager compile per operation).
_sample_token = jax.jit(samplers.sample_token, static_argnums=2)


def _np_filter(logits, *, top_k=0, top_p=1.0, min_p=0.0):
  """Reference: returns the kept-token mask of one row, with plain loops."""
  v = len(logits)
  keep = np.ones(v, bool)
  if 0 < top_k < v:
    kth = sorted(logits, reverse=True)[top_k - 1]
    keep &= logits >= kth
  x = np.where(keep, logits, -np.inf)
  if top_p < 1.0:
    p = np.exp(x - x.max())
    p /= p.sum()
    order = sorted(range(v), key=lambda i: -p[i])
    mass = 0.0
    nucleus = np.zeros(v, bool)
    for i in order:
      if mass < top_p:
        nucleus[i] = True
      mass += p[i]
    keep &= nucleus
  x = np.where(keep, logits, -np.inf)
  if min_p > 0:
    p = np.exp(x - x.max())
    p /= p.sum()
    keep &= p >= min_p * p.max()
  return keep


@pytest.mark.parametrize("kw", [dict(top_k=3), dict(top_p=0.6),
                                dict(min_p=0.2), dict(top_k=5, top_p=0.8),
                                dict(top_k=4, top_p=0.9, min_p=0.1)])
@pytest.mark.parametrize("jit", [False, True])
def test_filters_match_numpy(kw, jit):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 11)).astype(np.float32) * 2
  cfg = SamplerConfig(temperature=1.0, **kw)
  fn = jax.jit(samplers.filtered_logits, static_argnums=1) if jit else (
      samplers.filtered_logits)
  got = np.isfinite(np.asarray(fn(jnp.asarray(logits), cfg)))
  want = np.stack([_np_filter(row, **kw) for row in logits])
  np.testing.assert_array_equal(got, want)


def test_hand_computed_top_p():
  # probs 0.5, 0.3, 0.15, 0.05: top_p=0.75 keeps 0.5 and 0.3 (mass before
  # the third is 0.8 >= 0.75).
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = np.isfinite(np.asarray(samplers.top_p_filter(logits, 0.75)))
  np.testing.assert_array_equal(kept, [[True, True, False, False]])
  # min_p=0.61: threshold 0.305 drops 0.3.
  kept = np.isfinite(np.asarray(samplers.min_p_filter(logits, 0.61)))
  np.testing.assert_array_equal(kept, [[True, False, False, False]])


@pytest.mark.parametrize("kw", [dict(temperature=0.7), dict(top_k=3),
                                dict(top_p=0.8, temperature=1.3),
                                dict(min_p=0.15)])
def test_sampled_frequencies_match_filtered_softmax(kw):
  """Chi-square goodness of fit, fixed seed, 40k draws."""
  logits = jnp.log(jnp.array([0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.05]))
  cfg = SamplerConfig(**kw)
  n = 40_000
  draws = _sample_token(jax.random.key(3), jnp.broadcast_to(logits, (n, 7)),
                        cfg)
  counts = np.bincount(np.asarray(draws.token), minlength=7)
  p = np.asarray(jax.nn.softmax(samplers.filtered_logits(logits[None], cfg)))[0]
  assert np.all(counts[p == 0] == 0)
  nz = p > 0
  expected = n * p[nz]
  chi2 = np.sum((counts[nz] - expected) ** 2 / expected)
  # 99.9% quantile of chi-square with <= 6 degrees of freedom is 22.46.
  assert chi2 < 22.46, (counts, expected)


def test_logp_is_tempered_unfiltered_log_softmax_and_greedy_is_argmax():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(5, 9)).astype(np.float32)
  s = _sample_token(jax.random.key(0), logits,
                    SamplerConfig(temperature=0.5, top_k=2))
  ref = jax.nn.log_softmax(logits / 0.5, axis=-1)
  np.testing.assert_allclose(
      np.asarray(s.logp), np.asarray(ref)[np.arange(5), np.asarray(s.token)],
      atol=1e-6)
  top2 = np.argsort(-logits, axis=-1)[:, :2]
  assert all(t in row for t, row in zip(np.asarray(s.token), top2))
  g = _sample_token(jax.random.key(0), logits, SamplerConfig(0.0))
  np.testing.assert_array_equal(np.asarray(g.token), logits.argmax(-1))
  np.testing.assert_allclose(
      np.asarray(g.logp),
      np.asarray(jax.nn.log_softmax(logits))[np.arange(5), logits.argmax(-1)],
      atol=1e-6)


def test_bad_settings_are_refused():
  for kw, msg in [(dict(temperature=-1), "temperature"),
                  (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"),
                  (dict(min_p=1.5), "min_p")]:
    with pytest.raises(ValueError, match=msg):
      SamplerConfig(**kw).validate()


# -- the inverse-CDF draw --------------------------------------------------------


def test_cumsum_matches_numpy():
  rng = np.random.default_rng(0)
  for shape in [(3, 1), (3, 7), (4, 16), (2, 17), (2, 300), (1, 5000)]:
    x = rng.uniform(size=shape).astype(np.float32)
    got = np.asarray(jax.jit(samplers._cumsum)(jnp.asarray(x)))  # pylint: disable=protected-access
    want = np.cumsum(x.astype(np.float64), axis=-1)
    np.testing.assert_allclose(got, want, rtol=2e-6)


def test_inverse_cdf_hand_computed():
  # p = 0.25, 0, 0.5, 0.25: F = 0.25, 0.25, 0.75, 1.
  logits = jnp.log(jnp.array([[0.25, 0.0, 0.5, 0.25]] * 6))
  u = jnp.array([0.0, 0.2499, 0.25, 0.74, 0.76, 1 - 2**-24])
  got = samplers.categorical_from_uniform(u, logits)
  np.testing.assert_array_equal(np.asarray(got), [0, 0, 2, 2, 3, 3])
  # A zero-probability token is never drawn, not even for u at the top.
  edge = jnp.log(jnp.array([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]]))
  for u0 in (0.0, 0.5, 1 - 2**-24):
    tok = np.asarray(samplers.categorical_from_uniform(
        jnp.full((2,), u0), edge))
    assert tok[0] in (0, 1) and tok[1] == 1


def test_two_level_draw_matches_numpy_search():
  """V = 1000 (4 blocks of 256), masked tokens inside and across blocks."""
  rng = np.random.default_rng(1)
  v = 1000
  logits = rng.normal(size=(3, v)).astype(np.float32) * 2
  logits[0, 200:700] = -np.inf  # two whole blocks and parts of two more
  logits[1, ::2] = -np.inf
  logits[2, :999] = -np.inf  # only the last token
  u = rng.uniform(size=(3, 400)).astype(np.float32)
  got = jax.vmap(samplers.categorical_from_uniform, in_axes=(1, None),
                 out_axes=1)(jnp.asarray(u), jnp.asarray(logits))
  for n in range(3):
    p = np.exp(logits[n].astype(np.float64) - logits[n].max())
    cdf = np.cumsum(p) / p.sum()
    want = np.searchsorted(cdf, u[n], side="right")
    # Draws within f32 rounding of an interval boundary may go either way.
    near = np.min(np.abs(cdf[:, None] - u[n][None]), axis=0) < 1e-5
    np.testing.assert_array_equal(np.asarray(got[n])[~near], want[~near])
    assert np.isfinite(logits[n][np.asarray(got[n])]).all()
  assert (np.asarray(got[2]) == v - 1).all()


def test_large_vocabulary_frequencies_match_softmax():
  """Chi-square over tokens spread across blocks of the two-level sum."""
  v = 700
  probs = np.zeros(v)
  support = [3, 255, 256, 257, 400, 511, 512, 699]  # both sides of boundaries
  probs[support] = [0.05, 0.1, 0.2, 0.05, 0.15, 0.1, 0.25, 0.1]
  logits = jnp.log(jnp.asarray(probs, jnp.float32))
  n = 40_000
  draws = _sample_token(jax.random.key(7), jnp.broadcast_to(logits, (n, v)))
  counts = np.bincount(np.asarray(draws.token), minlength=v)
  assert counts[probs == 0].sum() == 0
  expected = n * probs[support]
  chi2 = np.sum((counts[support] - expected) ** 2 / expected)
  assert chi2 < 24.32, (counts[support], expected)  # 99.9% quantile, 7 dof


def test_unfiltered_logp_is_tempered_log_softmax():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(6, 300)).astype(np.float32) * 3
  s = _sample_token(jax.random.key(1), logits, SamplerConfig(temperature=0.8))
  ref = np.asarray(jax.nn.log_softmax(logits / 0.8, axis=-1))
  np.testing.assert_allclose(np.asarray(s.logp),
                             ref[np.arange(6), np.asarray(s.token)], atol=1e-6)
