"""Samplers: filters against NumPy, sampled frequencies against the softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlax_llm.sampling import samplers
from rlax_llm.sampling.samplers import SamplerConfig


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
  draws = samplers.sample_token(jax.random.key(3),
                                jnp.broadcast_to(logits, (n, 7)), cfg)
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
  s = samplers.sample_token(jax.random.key(0), logits,
                            SamplerConfig(temperature=0.5, top_k=2))
  ref = jax.nn.log_softmax(logits / 0.5, axis=-1)
  np.testing.assert_allclose(
      np.asarray(s.logp), np.asarray(ref)[np.arange(5), np.asarray(s.token)],
      atol=1e-6)
  top2 = np.argsort(-logits, axis=-1)[:, :2]
  assert all(t in row for t, row in zip(np.asarray(s.token), top2))
  g = samplers.sample_token(jax.random.key(0), logits, SamplerConfig(0.0))
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
