"""Tests for rlax_llm.core.aggregation."""

import functools

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlax_llm.core import aggregation

MODES = sorted(aggregation.AGGREGATIONS)
VARIANTS = [pytest.param(lambda f: f, id="eager"),
            pytest.param(jax.jit, id="jit")]
PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, database=None)


def reference_aggregate(x_NT, mask_NT, mode, num_tokens=None, num_seqs=None,
                        norm_constant=None):
  """Plain-loop float64 reference of `aggregation.aggregate`."""
  n_rows, n_cols = x_NT.shape
  total, tokens, seqs, sum_of_seq_means = 0.0, 0, 0, 0.0
  for n in range(n_rows):
    row_sum, row_len = 0.0, 0
    for t in range(n_cols):
      if mask_NT[n, t]:
        row_sum += float(x_NT[n, t])
        row_len += 1
    total += row_sum
    tokens += row_len
    if row_len > 0:
      seqs += 1
      sum_of_seq_means += row_sum / row_len
  num_tokens = tokens if num_tokens is None else float(num_tokens)
  num_seqs = seqs if num_seqs is None else float(num_seqs)
  if mode == "token_mean":
    return total / max(num_tokens, 1)
  if mode == "seq_mean_token_mean":
    return sum_of_seq_means / max(num_seqs, 1)
  if mode == "seq_mean_token_sum":
    return total / max(num_seqs, 1)
  if mode == "seq_mean_token_sum_norm":
    return total / (max(num_seqs, 1) * norm_constant)
  raise AssertionError(mode)


def random_batch(rng, n_rows, n_cols, p_valid=0.7, empty_rows=1):
  x_NT = rng.normal(size=(n_rows, n_cols)).astype(np.float32)
  mask_NT = rng.random((n_rows, n_cols)) < p_valid
  mask_NT[rng.permutation(n_rows)[:empty_rows]] = False
  return x_NT, mask_NT


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference(variant, mode):
  rng = np.random.default_rng(0)
  x_NT, mask_NT = random_batch(rng, 6, 5, empty_rows=2)
  fn = variant(functools.partial(aggregation.aggregate, mode=mode,
                                 norm_constant=5.0))
  np.testing.assert_allclose(
      fn(x_NT, mask_NT),
      reference_aggregate(x_NT, mask_NT, mode, norm_constant=5.0), rtol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference_with_global_normalizers(variant, mode):
  rng = np.random.default_rng(1)
  x_NT, mask_NT = random_batch(rng, 4, 7)
  fn = variant(functools.partial(aggregation.aggregate, mode=mode,
                                 norm_constant=7.0))
  got = fn(x_NT, mask_NT, num_tokens=jnp.float32(40.0), num_seqs=9.0)
  want = reference_aggregate(x_NT, mask_NT, mode, num_tokens=40.0,
                             num_seqs=9.0, norm_constant=7.0)
  np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_vmap_over_stacked_batches(mode):
  rng = np.random.default_rng(2)
  x_KNT, mask_KNT = zip(*[random_batch(rng, 3, 4) for _ in range(5)])
  x_KNT, mask_KNT = np.stack(x_KNT), np.stack(mask_KNT)
  fn = functools.partial(aggregation.aggregate, mode=mode, norm_constant=4.0)
  got_K = jax.jit(jax.vmap(fn))(x_KNT, mask_KNT)
  want_K = [reference_aggregate(x, m, mode, norm_constant=4.0)
            for x, m in zip(x_KNT, mask_KNT)]
  np.testing.assert_allclose(got_K, want_K, rtol=1e-6)


@pytest.mark.parametrize("mode, expected", [
    ("token_mean", 7.0 / 3.0),             # (1 + 2 + 4) / 3 tokens
    ("seq_mean_token_mean", 2.75),          # (1.5 + 4) / 2 non-empty rows
    ("seq_mean_token_sum", 3.5),            # (3 + 4) / 2 non-empty rows
    ("seq_mean_token_sum_norm", 7.0 / 6.0),  # 7 / (2 rows * 3)
])
def test_hand_computed(mode, expected):
  x_NT = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
  mask_NT = jnp.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
  got = aggregation.aggregate(x_NT, mask_NT, mode, norm_constant=3)
  assert got.dtype == jnp.float32 and got.shape == ()
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_normalizers_and_masked_mean():
  mask_NT = np.array([[1, 1, 0], [0, 0, 0], [1, 0, 1], [0, 1, 0]])
  counts = aggregation.normalizers(mask_NT)
  assert float(counts["num_tokens"]) == 5.0
  assert float(counts["num_seqs"]) == 3.0
  x_NT = np.arange(12, dtype=np.float32).reshape(4, 3)
  np.testing.assert_allclose(aggregation.masked_mean(x_NT, mask_NT),
                             (0 + 1 + 6 + 8 + 10) / 5)
  np.testing.assert_allclose(aggregation.masked_mean(x_NT, mask_NT, axis=-1),
                             [0.5, 0.0, 7.0, 10.0])


def test_unknown_mode_names_mode_and_valid_ones():
  with pytest.raises(ValueError, match="'tokne_mean'.*seq_mean_token_mean"):
    aggregation.aggregate(jnp.ones((2, 2)), jnp.ones((2, 2)), "tokne_mean")


def test_norm_mode_requires_norm_constant():
  with pytest.raises(ValueError, match="norm_constant"):
    aggregation.aggregate(jnp.ones((2, 2)), jnp.ones((2, 2)),
                          "seq_mean_token_sum_norm")


def test_shape_mismatch_raises():
  with pytest.raises(AssertionError):
    aggregation.aggregate(jnp.ones((2, 3)), jnp.ones((3, 2)))


def test_callable_mode():
  x_NT, mask_NT = jnp.array([[1.0, 3.0]]), jnp.array([[True, True]])
  total = lambda x, m, **_: jnp.sum(jnp.where(m, x, 0))
  assert float(aggregation.aggregate(x_NT, mask_NT, total)) == 4.0


def test_bfloat16_input_aggregates_in_float32():
  x_NT = jnp.full((4, 300), 1.0 + 2**-7, jnp.bfloat16)  # exact in bfloat16
  got = aggregation.aggregate(x_NT, jnp.ones((4, 300)), "seq_mean_token_sum")
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, 300 * (1.0 + 2**-7), rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_masked_inf_and_nan_are_ignored_with_zero_gradient(mode):
  x_NT = jnp.array([[1.0, jnp.nan], [jnp.inf, 2.0], [-jnp.inf, jnp.nan]])
  mask_NT = jnp.array([[1, 0], [0, 1], [0, 0]])
  fn = functools.partial(aggregation.aggregate, mask_NT=mask_NT, mode=mode,
                         norm_constant=2.0)
  loss, grad_NT = jax.value_and_grad(fn)(x_NT)
  want = reference_aggregate(np.array([[1.0, 0], [0, 2.0], [0, 0]]),
                             np.asarray(mask_NT), mode, norm_constant=2.0)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  assert np.all(np.isfinite(grad_NT))
  np.testing.assert_array_equal(np.asarray(grad_NT)[~np.asarray(mask_NT, bool)],
                                0.0)


@pytest.mark.parametrize("mode", MODES)
def test_empty_mask_gives_zero_and_finite_gradient(mode):
  fn = functools.partial(aggregation.aggregate, mask_NT=jnp.zeros((3, 4)),
                         mode=mode, norm_constant=4.0)
  loss, grad_NT = jax.value_and_grad(fn)(jnp.ones((3, 4)))
  assert float(loss) == 0.0
  np.testing.assert_array_equal(grad_NT, 0.0)


# Property tests use a few fixed shapes so that compiled functions are reused
# across examples; the data, masks and split points are what varies.
N_ROWS, N_COLS = 12, 6
MICRO_SIZES = [1, 2, 3, 4, 5, 12]  # 5 leaves a smaller last micro-batch.

_aggregate_and_grad = jax.jit(jax.value_and_grad(aggregation.aggregate),
                              static_argnames="mode")


@st.composite
def batches(draw):
  """A random [N_ROWS, N_COLS] masked batch with some empty rows."""
  p_valid = draw(st.sampled_from([0.0, 0.3, 0.8, 1.0]))
  empty_rows = draw(st.integers(0, N_ROWS))
  seed = draw(st.integers(0, 2**32 - 1))
  return random_batch(np.random.default_rng(seed), N_ROWS, N_COLS, p_valid,
                      empty_rows)


@PROPERTY_SETTINGS
@given(batch=batches(), mode=st.sampled_from(MODES),
       micro_size=st.sampled_from(MICRO_SIZES))
def test_micro_batch_sum_equals_full_batch(batch, mode, micro_size):
  x_NT, mask_NT = batch
  counts = aggregation.normalizers(mask_NT)
  full_loss, full_grad = _aggregate_and_grad(x_NT, mask_NT, mode=mode,
                                             norm_constant=N_COLS)
  micro_loss, micro_grad = 0.0, []
  for start in range(0, N_ROWS, micro_size):
    rows = slice(start, start + micro_size)
    loss, grad = _aggregate_and_grad(x_NT[rows], mask_NT[rows], mode=mode,
                                     norm_constant=N_COLS, **counts)
    micro_loss += float(loss)
    micro_grad.append(grad)
  # Relative to the loss of |x|, the sum's natural floating-point scale.
  scale = float(_aggregate_and_grad(np.abs(x_NT), mask_NT, mode=mode,
                                    norm_constant=N_COLS)[0]) + 1e-30
  assert abs(micro_loss - float(full_loss)) <= 1e-6 * scale
  np.testing.assert_allclose(np.concatenate(micro_grad), full_grad, rtol=1e-6,
                             atol=0)
  np.testing.assert_allclose(
      full_loss,
      reference_aggregate(x_NT, mask_NT, mode, norm_constant=N_COLS),
      rtol=1e-5, atol=1e-6 * scale)


@PROPERTY_SETTINGS
@given(batch=batches(), mode=st.sampled_from(MODES),
       pad_rows=st.sampled_from([0, 3]), pad_cols=st.sampled_from([0, 2]),
       pad_value=st.sampled_from([0.0, 1e30, np.inf, np.nan]))
def test_all_masked_padding_changes_nothing(batch, mode, pad_rows, pad_cols,
                                            pad_value):
  x_NT, mask_NT = batch
  x_pad = np.full((N_ROWS + pad_rows, N_COLS + pad_cols), pad_value,
                  np.float32)
  x_pad[:N_ROWS, :N_COLS] = x_NT
  mask_pad = np.zeros(x_pad.shape, bool)
  mask_pad[:N_ROWS, :N_COLS] = mask_NT
  want, want_grad = _aggregate_and_grad(x_NT, mask_NT, mode=mode,
                                        norm_constant=7.0)
  got, got_grad = _aggregate_and_grad(x_pad, mask_pad, mode=mode,
                                      norm_constant=7.0)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(got_grad[:N_ROWS, :N_COLS], want_grad, rtol=1e-6)
  np.testing.assert_array_equal(got_grad[N_ROWS:], 0.0)
  np.testing.assert_array_equal(got_grad[:, N_COLS:], 0.0)
