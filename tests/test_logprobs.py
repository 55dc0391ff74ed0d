"""Tests for rlax_llm.core.logprobs."""

import functools
import math

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlax_llm.core import logprobs

VARIANTS = [pytest.param(lambda f: f, id="eager"),
            pytest.param(jax.jit, id="jit")]
PROPERTY_SETTINGS = settings(max_examples=20, deadline=None, database=None)


def reference_logp_and_entropy(logits_NTV, targets_NT, temperature=1.0):
  """Plain-loop float64 target log-probs and entropies."""
  n_rows, n_cols, vocab = logits_NTV.shape
  logp_NT, entropy_NT = np.zeros((n_rows, n_cols)), np.zeros((n_rows, n_cols))
  for n in range(n_rows):
    for t in range(n_cols):
      z = [float(logits_NTV[n, t, v]) / temperature for v in range(vocab)]
      top = max(z)
      log_norm = top + math.log(sum(math.exp(zv - top) for zv in z))
      logp_NT[n, t] = z[int(targets_NT[n, t])] - log_norm
      entropy_NT[n, t] = -sum(
          math.exp(zv - log_norm) * (zv - log_norm) for zv in z
          if zv != -math.inf)
  return logp_NT, entropy_NT


def random_logits(rng, n_rows, n_cols, vocab, scale=3.0):
  logits_NTV = (scale * rng.normal(size=(n_rows, n_cols, vocab))).astype(
      np.float32)
  targets_NT = rng.integers(0, vocab, size=(n_rows, n_cols))
  return logits_NTV, targets_NT


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_reference(variant, temperature):
  logits_NTV, targets_NT = random_logits(np.random.default_rng(0), 3, 4, 11)
  want_logp, want_entropy = reference_logp_and_entropy(logits_NTV, targets_NT,
                                                       temperature)
  logp_NT = variant(functools.partial(logprobs.token_logprobs,
                                      temperature=temperature))(logits_NTV,
                                                                targets_NT)
  entropy_NT = variant(functools.partial(logprobs.entropy_from_logits,
                                         temperature=temperature))(logits_NTV)
  both = variant(functools.partial(logprobs.token_logprobs_and_entropy,
                                   temperature=temperature))(logits_NTV,
                                                             targets_NT)
  assert isinstance(both, logprobs.LogprobsAndEntropy)
  for got, want in [(logp_NT, want_logp), (entropy_NT, want_entropy),
                    (both.logp, want_logp), (both.entropy, want_entropy)]:
    assert got.dtype == jnp.float32 and got.shape == (3, 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_vmap_over_rows():
  logits_NTV, targets_NT = random_logits(np.random.default_rng(1), 4, 3, 7)
  row_fn = lambda logits_TV, targets_T: logprobs.token_logprobs_and_entropy(
      logits_TV[None], targets_T[None], temperature=0.5)
  got = jax.jit(jax.vmap(row_fn))(logits_NTV, targets_NT)
  want_logp, want_entropy = reference_logp_and_entropy(logits_NTV, targets_NT,
                                                       0.5)
  np.testing.assert_allclose(got.logp[:, 0], want_logp, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got.entropy[:, 0], want_entropy, rtol=1e-5,
                             atol=1e-6)


def test_hand_computed():
  logits_NTV = jnp.array([[[0.0, math.log(3.0)]]])  # p = [1/4, 3/4].
  targets_NT = jnp.array([[1]])
  np.testing.assert_allclose(logprobs.token_logprobs(logits_NTV, targets_NT),
                             [[-0.28768207]], rtol=1e-6)  # ln 3/4
  np.testing.assert_allclose(logprobs.entropy_from_logits(logits_NTV),
                             [[0.56233514]], rtol=1e-6)
  # Temperature 2: p = [1, sqrt 3] / (1 + sqrt 3).
  out = logprobs.token_logprobs_and_entropy(logits_NTV, targets_NT,
                                            temperature=2.0)
  np.testing.assert_allclose(out.logp, [[-0.45574639]], rtol=1e-6)
  np.testing.assert_allclose(out.entropy, [[0.65680640]], rtol=1e-6)


def test_gradient_is_onehot_minus_softmax():
  logits_NTV, targets_NT = random_logits(np.random.default_rng(2), 2, 3, 5)
  grad_NTV = jax.grad(
      lambda x: jnp.sum(logprobs.token_logprobs(x, targets_NT)))(logits_NTV)
  want_NTV = np.eye(5)[targets_NT] - np.asarray(jax.nn.softmax(logits_NTV))
  np.testing.assert_allclose(grad_NTV, want_NTV, rtol=1e-5, atol=1e-6)


def test_bfloat16_logits_are_upcast_before_softmax():
  rng = np.random.default_rng(3)
  logits_NTV, targets_NT = random_logits(rng, 2, 3, 512, scale=8.0)
  logits_NTV = jnp.asarray(logits_NTV, jnp.bfloat16)
  out = logprobs.token_logprobs_and_entropy(logits_NTV, targets_NT)
  assert out.logp.dtype == jnp.float32 and out.entropy.dtype == jnp.float32
  # Exact float64 answer for the bfloat16-rounded logits: a bfloat16
  # log-softmax would be off by ~1e-2 here.
  want_logp, want_entropy = reference_logp_and_entropy(
      np.asarray(logits_NTV, np.float32), targets_NT)
  np.testing.assert_allclose(out.logp, want_logp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.entropy, want_entropy, rtol=1e-5, atol=1e-5)


def test_minus_inf_logits_give_finite_values_and_gradients():
  logits_NTV = jnp.array([[[0.0, -jnp.inf, math.log(3.0)],
                           [-jnp.inf, 2.0, -jnp.inf]]])
  targets_NT = jnp.array([[2, 1]])

  def total(x):
    out = logprobs.token_logprobs_and_entropy(x, targets_NT)
    return jnp.sum(out.logp) + jnp.sum(out.entropy), out

  (_, out), grad_NTV = jax.value_and_grad(total, has_aux=True)(logits_NTV)
  np.testing.assert_allclose(out.logp, [[math.log(0.75), 0.0]], atol=1e-6)
  np.testing.assert_allclose(out.entropy, [[0.56233514, 0.0]], atol=1e-6)
  assert np.all(np.isfinite(grad_NTV))


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="temperature"):
    logprobs.token_logprobs(jnp.zeros((1, 1, 2)), jnp.zeros((1, 1), jnp.int32),
                            temperature=0.0)
  with pytest.raises(AssertionError):
    logprobs.token_logprobs(jnp.zeros((1, 2, 3)), jnp.zeros((2, 1), jnp.int32))


_jit_logp_and_entropy = jax.jit(logprobs.token_logprobs_and_entropy)
_jit_logp_every_target = jax.jit(jax.vmap(
    lambda logits_NTV, targets_NT, temperature: logprobs.token_logprobs(
        logits_NTV, targets_NT, temperature=temperature),
    in_axes=(None, 0, None)))


@PROPERTY_SETTINGS
@given(seed=st.integers(0, 2**32 - 1),
       scale=st.sampled_from([1e-3, 1.0, 30.0]),
       temperature=st.sampled_from([0.3, 1.0, 2.0]))
def test_probabilities_normalise_and_entropy_is_bounded(seed, scale,
                                                        temperature):
  vocab = 9
  logits_NTV, targets_NT = random_logits(np.random.default_rng(seed), 3, 4,
                                         vocab, scale)
  out = _jit_logp_and_entropy(logits_NTV, targets_NT,
                              temperature=temperature)
  # A float32 log-sum-exp of values of size M rounds by a few eps * M (the
  # scaled logits reach 300 here): the bound each check holds to.
  tol = 8 * np.finfo(np.float32).eps * float(
      np.max(np.abs(logits_NTV)) / temperature) + 1e-6
  assert np.all(np.asarray(out.logp) <= tol)  # 0 up to rounding.
  assert np.all(np.asarray(out.entropy) >= -tol)
  assert np.all(np.asarray(out.entropy) <= math.log(vocab) + tol)
  # Summing exp(logp) over every possible target gives 1.
  every_target_VNT = np.broadcast_to(
      np.arange(vocab)[:, None, None], (vocab, 3, 4))
  logp_VNT = _jit_logp_every_target(logits_NTV, every_target_VNT,
                                    temperature)
  np.testing.assert_allclose(np.exp(logp_VNT).sum(0), 1.0, rtol=0, atol=tol)


def naive_from_hidden(hidden_NTD, kernel_DV, targets_NT, temperature=1.0):
  logits_NTV = jnp.dot(hidden_NTD, kernel_DV,
                       preferred_element_type=jnp.float32)
  return logprobs.token_logprobs_and_entropy(logits_NTV, targets_NT,
                                             temperature=temperature)


# The reference, compiled: one program per shape, not one per operation.
_naive_from_hidden = jax.jit(naive_from_hidden)


def random_hidden(rng, n_rows, n_cols, width, vocab):
  hidden_NTD = rng.normal(size=(n_rows, n_cols, width)).astype(np.float32)
  kernel_DV = (rng.normal(size=(width, vocab)) / math.sqrt(width) * 3).astype(
      np.float32)
  targets_NT = rng.integers(0, vocab, size=(n_rows, n_cols))
  return hidden_NTD, kernel_DV, targets_NT


def weighted_total(out):
  """A scalar that uses both outputs with different weights."""
  return jnp.sum(1.3 * out.logp) + jnp.sum(0.4 * out.entropy)


# (N, T, D, V, chunk_size, vocab_chunk): M = N * T is not a multiple of the
# chunk in most cases, and V not a multiple of the vocabulary block.
CHUNK_SHAPES = [
    (3, 5, 16, 37, 4, None),
    (3, 5, 16, 37, 4, 8),
    (2, 7, 8, 64, 5, 16),
    (1, 9, 12, 50, 1024, 7),
    (4, 4, 16, 33, 16, 33),
    (2, 3, 8, 20, 6, 100),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("n,t,d,v,chunk_size,vocab_chunk", CHUNK_SHAPES)
def test_chunked_matches_naive(variant, temperature, n, t, d, v, chunk_size,
                               vocab_chunk):
  hidden_NTD, kernel_DV, targets_NT = random_hidden(
      np.random.default_rng(n * 100 + v), n, t, d, v)
  chunked = functools.partial(
      logprobs.chunked_token_logprobs_and_entropy, temperature=temperature,
      chunk_size=chunk_size, vocab_chunk=vocab_chunk)
  got = variant(chunked)(hidden_NTD, kernel_DV, targets_NT)
  want = _naive_from_hidden(hidden_NTD, kernel_DV, targets_NT, temperature)
  assert isinstance(got, logprobs.LogprobsAndEntropy)
  for g, w in [(got.logp, want.logp), (got.entropy, want.entropy)]:
    assert g.dtype == jnp.float32 and g.shape == (n, t)
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  # And against the float64 loop on the same logits.
  logits_NTV = np.einsum("ntd,dv->ntv", hidden_NTD.astype(np.float64),
                         kernel_DV.astype(np.float64))
  want_logp, want_entropy = reference_logp_and_entropy(logits_NTV, targets_NT,
                                                       temperature)
  np.testing.assert_allclose(got.logp, want_logp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got.entropy, want_entropy, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("vocab_chunk", [None, 8])
def test_chunked_gradients_match_naive(variant, vocab_chunk):
  hidden_NTD, kernel_DV, targets_NT = random_hidden(
      np.random.default_rng(7), 3, 5, 16, 37)
  chunked = lambda h, k: weighted_total(
      logprobs.chunked_token_logprobs_and_entropy(
          h, k, targets_NT, temperature=0.7, chunk_size=4,
          vocab_chunk=vocab_chunk))
  naive = lambda h, k: weighted_total(
      naive_from_hidden(h, k, targets_NT, 0.7))
  got = variant(jax.grad(chunked, argnums=(0, 1)))(hidden_NTD, kernel_DV)
  want = jax.jit(jax.grad(naive, argnums=(0, 1)))(hidden_NTD, kernel_DV)
  for g, w in zip(got, want):
    assert g.shape == w.shape
    # Relative to the largest entry: single entries near 0 carry f32 noise.
    np.testing.assert_allclose(g / np.abs(w).max(), w / np.abs(w).max(),
                               atol=1e-5)


def test_chunked_hand_computed():
  # hidden @ kernel = [0, ln 3] for the first token: p = [1/4, 3/4].
  hidden_NTD = jnp.array([[[1.0], [0.0]]])
  kernel_DV = jnp.array([[0.0, math.log(3.0)]])
  targets_NT = jnp.array([[1, 0]])
  out = logprobs.chunked_token_logprobs_and_entropy(
      hidden_NTD, kernel_DV, targets_NT, chunk_size=1, vocab_chunk=1)
  np.testing.assert_allclose(out.logp, [[-0.28768207, math.log(0.5)]],
                             rtol=1e-6)
  np.testing.assert_allclose(out.entropy, [[0.56233514, math.log(2.0)]],
                             rtol=1e-6)


@pytest.mark.parametrize("vocab_chunk", [None, 5])
def test_chunked_padding_rows_are_finite(vocab_chunk):
  # M = 7 tokens in chunks of 4: one zero padding row, plus all-zero hidden
  # rows among the real ones (uniform distribution, entropy log V).
  hidden_NTD, kernel_DV, targets_NT = random_hidden(
      np.random.default_rng(8), 1, 7, 8, 12)
  hidden_NTD[0, 2:4] = 0.0

  def total(h, k):
    out = logprobs.chunked_token_logprobs_and_entropy(
        h, k, targets_NT, chunk_size=4, vocab_chunk=vocab_chunk)
    return weighted_total(out), out

  (_, out), grads = jax.jit(jax.value_and_grad(
      total, argnums=(0, 1), has_aux=True))(hidden_NTD, kernel_DV)
  np.testing.assert_allclose(out.entropy[0, 2:4], math.log(12), rtol=1e-6)
  np.testing.assert_allclose(out.logp[0, 2:4], -math.log(12), rtol=1e-6)
  for x in (out.logp, out.entropy, *grads):
    assert np.all(np.isfinite(x))


def test_chunked_bad_inputs_raise():
  h, k, y = jnp.zeros((1, 2, 3)), jnp.zeros((3, 4)), jnp.zeros((1, 2), int)
  fn = logprobs.chunked_token_logprobs_and_entropy
  with pytest.raises(ValueError, match="temperature"):
    fn(h, k, y, temperature=-1.0)
  with pytest.raises(ValueError, match="chunk_size"):
    fn(h, k, y, chunk_size=0)
  with pytest.raises(ValueError, match="vocab_chunk"):
    fn(h, k, y, vocab_chunk=0)
  with pytest.raises(AssertionError):
    fn(h, jnp.zeros((4, 4)), y)
  with pytest.raises(AssertionError):
    fn(h, k, jnp.zeros((2, 1), int))


def _temp_bytes(fn, *specs):
  return jax.jit(fn).lower(*specs).compile().memory_analysis(
  ).temp_size_in_bytes


@pytest.mark.parametrize("vocab_chunk", [None, 4096])
def test_chunked_memory_is_far_below_full_logits(vocab_chunk):
  m, v, d = 4096, 32768, 128
  specs = (jax.ShapeDtypeStruct((1, m, d), jnp.float32),
           jax.ShapeDtypeStruct((d, v), jnp.float32),
           jax.ShapeDtypeStruct((1, m), jnp.int32))
  chunked = functools.partial(logprobs.chunked_token_logprobs_and_entropy,
                              chunk_size=256, vocab_chunk=vocab_chunk)
  grad_of = lambda f: jax.grad(lambda h, k, y: weighted_total(f(h, k, y)),
                               argnums=(0, 1))
  logits_bytes = m * v * 4  # 512 MiB
  naive_fwd = _temp_bytes(naive_from_hidden, *specs)
  chunked_fwd = _temp_bytes(chunked, *specs)
  naive_bwd = _temp_bytes(grad_of(naive_from_hidden), *specs)
  chunked_bwd = _temp_bytes(grad_of(chunked), *specs)
  print(f"M*V*4 = {logits_bytes:,}; temp bytes forward naive {naive_fwd:,} "
        f"chunked {chunked_fwd:,}; grad naive {naive_bwd:,} chunked "
        f"{chunked_bwd:,}")
  assert naive_fwd >= logits_bytes
  assert chunked_fwd < logits_bytes // 8
  # The backward pass keeps a [D, V] float32 kernel gradient (16 MiB) but
  # never all the logits.
  assert chunked_bwd < logits_bytes // 4 < naive_bwd


@pytest.mark.parametrize("vocab_chunk", [None, 7])
def test_chunked_softcap_matches_numpy(vocab_chunk):
  """Gemma 2's final soft-cap: z = c tanh(h W / c), then the softmax at tau."""
  rng = np.random.default_rng(5)
  h = rng.normal(size=(2, 3, 4)).astype(np.float32) * 3
  w = rng.normal(size=(4, 17)).astype(np.float32) * 3
  y = rng.integers(0, 17, (2, 3))
  c, tau = 5.0, 0.7
  out = logprobs.chunked_token_logprobs_and_entropy(
      h, w, y, temperature=tau, chunk_size=4, vocab_chunk=vocab_chunk,
      softcap=c)
  z = c * np.tanh((h @ w).astype(np.float64) / c) / tau
  lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
  want = np.take_along_axis(z, y[..., None], -1)[..., 0] - lse
  p = np.exp(z - lse[..., None])
  np.testing.assert_allclose(out.logp, want, atol=2e-5)
  np.testing.assert_allclose(out.entropy, lse - (p * z).sum(-1), atol=2e-5)
  assert np.abs(z * tau).max() < c  # the cap acted (raw logits exceed it)
  assert np.abs(h @ w).max() > c
