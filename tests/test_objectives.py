"""Tests for rlax_llm.core.objectives."""

import functools
import math

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlax_llm.core import aggregation
from rlax_llm.core import objectives
from rlax_llm.core import supervised

MODES = sorted(aggregation.AGGREGATIONS)
VARIANTS = [pytest.param(lambda f: f, id="eager"),
            pytest.param(jax.jit, id="jit")]
PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, database=None)
METRIC_NAMES = {"pg_loss", "clip_frac", "clip_frac_low", "clip_frac_high",
                "dual_clip_frac", "approx_kl", "ratio_mean", "ratio_max",
                "ratio_min"}


def reference_aggregate(x_NT, mask_NT, mode, norm_constant=None):
  """Plain-loop float64 aggregation with local counts."""
  total, tokens, seqs, sum_of_seq_means = 0.0, 0, 0, 0.0
  for n in range(x_NT.shape[0]):
    row = [float(x_NT[n, t]) for t in range(x_NT.shape[1]) if mask_NT[n, t]]
    total += sum(row)
    tokens += len(row)
    if row:
      seqs += 1
      sum_of_seq_means += sum(row) / len(row)
  return {
      "token_mean": lambda: total / max(tokens, 1),
      "seq_mean_token_mean": lambda: sum_of_seq_means / max(seqs, 1),
      "seq_mean_token_sum": lambda: total / max(seqs, 1),
      "seq_mean_token_sum_norm":
          lambda: total / (max(seqs, 1) * norm_constant),
  }[mode]()


def reference_ppo(logp_NT, old_logp_NT, adv, mask_NT, clip_low=0.2,
                  clip_high=0.2, dual_clip=None):
  """Plain-loop float64 PPO token losses and metric sums."""
  n_rows, n_cols = logp_NT.shape
  loss_NT = np.zeros((n_rows, n_cols))
  stats = {k: [] for k in ("low", "high", "dual", "kl", "ratio")}
  for n in range(n_rows):
    for t in range(n_cols):
      if not mask_NT[n, t]:
        continue
      a = float(adv[n]) if adv.ndim == 1 else float(adv[n, t])
      log_ratio = float(logp_NT[n, t]) - float(old_logp_NT[n, t])
      ratio = math.exp(log_ratio)
      clipped = min(max(ratio, 1 - clip_low), 1 + clip_high)
      loss = -min(ratio * a, clipped * a)
      dual = False
      if dual_clip is not None and a < 0 and loss > -dual_clip * a:
        loss, dual = -dual_clip * a, True
      loss_NT[n, t] = loss
      stats["low"].append(a < 0 and ratio < 1 - clip_low)
      stats["high"].append(a > 0 and ratio > 1 + clip_high)
      stats["dual"].append(dual)
      stats["kl"].append(ratio - 1 - log_ratio)
      stats["ratio"].append(ratio)
  mean = lambda values: sum(values) / max(len(values), 1)
  metrics = {
      "clip_frac_low": mean(stats["low"]),
      "clip_frac_high": mean(stats["high"]),
      "clip_frac": mean([l or h for l, h in zip(stats["low"], stats["high"])]),
      "dual_clip_frac": mean(stats["dual"]),
      "approx_kl": mean(stats["kl"]),
      "ratio_mean": mean(stats["ratio"]),
      "ratio_max": max(stats["ratio"], default=0.0),
      "ratio_min": min(stats["ratio"], default=0.0),
  }
  return loss_NT, metrics


def random_ppo_batch(rng, n_rows, n_cols, per_token_adv=False, p_valid=0.7,
                     empty_rows=1):
  old_logp_NT = -rng.exponential(size=(n_rows, n_cols)).astype(np.float32)
  logp_NT = (old_logp_NT + 0.3 * rng.normal(size=(n_rows, n_cols))).astype(
      np.float32)
  adv_shape = (n_rows, n_cols) if per_token_adv else (n_rows,)
  adv = rng.normal(size=adv_shape).astype(np.float32)
  mask_NT = rng.random((n_rows, n_cols)) < p_valid
  mask_NT[rng.permutation(n_rows)[:empty_rows]] = False
  return logp_NT, old_logp_NT, adv, mask_NT


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("per_token_adv", [False, True])
@pytest.mark.parametrize("clips", [(0.2, 0.2, None), (0.2, 0.28, 3.0)])
def test_ppo_token_loss_matches_reference(variant, per_token_adv, clips):
  clip_low, clip_high, dual_clip = clips
  batch = random_ppo_batch(np.random.default_rng(0), 6, 8, per_token_adv)
  fn = variant(functools.partial(
      objectives.ppo_clip_token_loss, clip_low=clip_low, clip_high=clip_high,
      dual_clip=dual_clip))
  loss_NT, aux = fn(*batch)
  want_NT, _ = reference_ppo(*batch, clip_low, clip_high, dual_clip)
  assert loss_NT.dtype == jnp.float32 and loss_NT.shape == (6, 8)
  np.testing.assert_allclose(loss_NT, want_NT, rtol=1e-5, atol=1e-6)
  mask_NT = batch[-1]
  np.testing.assert_allclose(
      aux.ratio_NT, np.where(mask_NT, np.exp(batch[0] - batch[1]), 1.0),
      rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", MODES)
def test_ppo_loss_and_metrics_match_reference(variant, mode):
  batch = random_ppo_batch(np.random.default_rng(1), 7, 5, empty_rows=2)
  # Large log-ratios so that every clip region is populated.
  batch = (batch[0] * 1.5,) + batch[1:]
  fn = variant(functools.partial(
      objectives.ppo_clip_loss, clip_high=0.28, dual_clip=2.0,
      aggregation=mode, norm_constant=5.0))
  loss, metrics = fn(*batch)
  want_NT, want_metrics = reference_ppo(*batch, 0.2, 0.28, 2.0)
  want = reference_aggregate(want_NT, batch[-1], mode, norm_constant=5.0)
  np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
  assert set(metrics) == METRIC_NAMES
  np.testing.assert_allclose(metrics["pg_loss"], want, rtol=1e-5, atol=1e-6)
  for name, value in want_metrics.items():
    np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-6,
                               err_msg=name)


def test_ppo_vmap_over_stacked_batches():
  rng = np.random.default_rng(2)
  stacked = [np.stack(a) for a in zip(
      *[random_ppo_batch(rng, 3, 4, per_token_adv=True) for _ in range(4)])]
  loss_K, metrics = jax.jit(jax.vmap(objectives.ppo_clip_loss))(*stacked)
  for k in range(4):
    want_NT, want_metrics = reference_ppo(*[a[k] for a in stacked])
    np.testing.assert_allclose(
        loss_K[k], reference_aggregate(want_NT, stacked[-1][k], "token_mean"),
        rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["approx_kl"][k],
                               want_metrics["approx_kl"], rtol=1e-5, atol=1e-7)


def test_ppo_hand_computed():
  logp_NT = jnp.log(jnp.array([[1.5, 0.5], [5.0, 1.1]]))
  old_logp_NT = jnp.zeros((2, 2))
  adv_NT = jnp.array([[1.0, -1.0], [-1.0, 2.0]])
  mask_NT = jnp.ones((2, 2), bool)
  value_and_grad = jax.value_and_grad(objectives.ppo_clip_loss, has_aux=True)
  # Token losses: -1.2 (clipped high), 0.8 (clipped low), 5 (A < 0, ratio 5,
  # unclipped), -2.2 (inside the clip range).
  (loss, metrics), grad_NT = value_and_grad(logp_NT, old_logp_NT, adv_NT,
                                            mask_NT)
  np.testing.assert_allclose(loss, 0.6, rtol=1e-6)
  np.testing.assert_allclose(grad_NT, [[0.0, 0.0], [1.25, -0.55]], rtol=1e-6)
  expected = {"pg_loss": 0.6, "clip_frac": 0.5, "clip_frac_low": 0.25,
              "clip_frac_high": 0.25, "dual_clip_frac": 0.0,
              "approx_kl": 0.670733495, "ratio_mean": 2.025,
              "ratio_max": 5.0, "ratio_min": 0.5}
  for name, value in expected.items():
    np.testing.assert_allclose(metrics[name], value, rtol=1e-6, err_msg=name)
  # Dual clip at 3 caps the third token's loss at -3 * A = 3.
  (loss, metrics), grad_NT = value_and_grad(logp_NT, old_logp_NT, adv_NT,
                                            mask_NT, dual_clip=3.0)
  np.testing.assert_allclose(loss, 0.1, rtol=1e-5)
  np.testing.assert_allclose(grad_NT, [[0.0, 0.0], [0.0, -0.55]], rtol=1e-6)
  np.testing.assert_allclose(metrics["dual_clip_frac"], 0.25, rtol=1e-6)


def test_ppo_gradient_flows_only_into_logp():
  batch = random_ppo_batch(np.random.default_rng(3), 3, 4, per_token_adv=True)
  loss_fn = lambda *args: objectives.ppo_clip_loss(*args)[0]
  _, grad_old_NT, grad_adv_NT = jax.grad(loss_fn, argnums=(0, 1, 2))(
      *map(jnp.asarray, batch))
  np.testing.assert_array_equal(grad_old_NT, 0.0)
  np.testing.assert_array_equal(grad_adv_NT, 0.0)


def test_ppo_bad_hyperparameters_raise():
  batch = random_ppo_batch(np.random.default_rng(4), 2, 3)
  with pytest.raises(ValueError, match="dual_clip"):
    objectives.ppo_clip_loss(*batch, dual_clip=0.5)
  with pytest.raises(ValueError, match="clip_low"):
    objectives.ppo_clip_loss(*batch, clip_low=-0.1)
  with pytest.raises(ValueError, match="tokne_mean"):
    objectives.ppo_clip_loss(*batch, aggregation="tokne_mean")


def test_ppo_empty_mask_gives_zero_loss_and_finite_gradient():
  batch = random_ppo_batch(np.random.default_rng(5), 3, 4, p_valid=0.0)
  (loss, metrics), grad_NT = jax.value_and_grad(
      objectives.ppo_clip_loss, has_aux=True)(*batch)
  assert float(loss) == 0.0
  np.testing.assert_array_equal(grad_NT, 0.0)
  for name, value in metrics.items():
    assert float(value) == 0.0, name


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", MODES)
def test_sft_loss_matches_reference(variant, mode):
  rng = np.random.default_rng(6)
  logp_NT = -rng.exponential(size=(5, 6)).astype(np.float32)
  mask_NT = rng.random((5, 6)) < 0.6
  mask_NT[2] = False
  fn = variant(functools.partial(objectives.sft_loss, aggregation=mode,
                                 norm_constant=6))
  loss, metrics = fn(logp_NT, mask_NT)
  want = reference_aggregate(-logp_NT, mask_NT, mode, norm_constant=6)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  np.testing.assert_allclose(metrics["sft_loss"], want, rtol=1e-6)
  np.testing.assert_allclose(
      metrics["nll"], reference_aggregate(-logp_NT, mask_NT, "token_mean"),
      rtol=1e-6)


def test_sft_hand_computed_and_vmap():
  logp_NT = jnp.log(jnp.array([[0.5, 0.25], [0.125, 0.0]]))  # -inf is masked.
  mask_NT = jnp.array([[1, 1], [1, 0]])
  loss, metrics = objectives.sft_loss(logp_NT, mask_NT)
  np.testing.assert_allclose(loss, 1.3862944, rtol=1e-6)  # 2 ln 2
  np.testing.assert_allclose(metrics["nll"], 1.3862944, rtol=1e-6)
  loss, _ = objectives.sft_loss(logp_NT, mask_NT,
                                aggregation="seq_mean_token_mean")
  np.testing.assert_allclose(loss, 1.5595812, rtol=1e-6)  # 2.25 ln 2
  grad_NT = jax.grad(lambda x: objectives.sft_loss(x, mask_NT)[0])(logp_NT)
  np.testing.assert_allclose(grad_NT, [[-1 / 3, -1 / 3], [-1 / 3, 0.0]],
                             rtol=1e-6)
  loss_K, _ = jax.vmap(objectives.sft_loss)(jnp.stack([logp_NT, logp_NT * 2]),
                                            jnp.stack([mask_NT, mask_NT]))
  np.testing.assert_allclose(loss_K, [1.3862944, 2.7725887], rtol=1e-6)


def reference_kl(logp, ref_logp, kind):
  out = np.zeros(logp.shape)
  for index in np.ndindex(logp.shape):
    log_ratio = float(ref_logp[index]) - float(logp[index])
    out[index] = {"k1": -log_ratio, "k2": 0.5 * log_ratio**2,
                  "k3": math.exp(log_ratio) - log_ratio - 1}[kind]
  return out


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_penalty_matches_reference(variant, kind):
  rng = np.random.default_rng(7)
  logp_NT = -rng.exponential(size=(4, 5)).astype(np.float32)
  ref_logp_NT = (logp_NT + rng.normal(size=(4, 5))).astype(np.float32)
  got_NT = variant(functools.partial(objectives.kl_penalty, kind=kind))(
      logp_NT, ref_logp_NT)
  np.testing.assert_allclose(got_NT, reference_kl(logp_NT, ref_logp_NT, kind),
                             rtol=1e-5, atol=1e-7)
  got_KNT = jax.vmap(functools.partial(objectives.kl_penalty, kind=kind))(
      logp_NT[None], ref_logp_NT[None])
  np.testing.assert_allclose(got_KNT[0], got_NT, rtol=1e-6)


def test_kl_penalty_hand_computed():
  logp, ref_logp = jnp.log(0.5), jnp.log(0.25)
  np.testing.assert_allclose(objectives.kl_penalty(logp, ref_logp, "k1"),
                             0.6931472, rtol=1e-6)
  np.testing.assert_allclose(objectives.kl_penalty(logp, ref_logp, "k2"),
                             0.2402265, rtol=1e-6)
  np.testing.assert_allclose(objectives.kl_penalty(logp, ref_logp, "k3"),
                             0.1931472, rtol=1e-6)
  with pytest.raises(ValueError, match="'k4'.*k1"):
    objectives.kl_penalty(logp, ref_logp, "k4")


def test_kl_estimators_are_unbiased_in_expectation():
  # Exact expectation over a categorical pi: E_pi[k1] = E_pi[k3] = KL(pi||ref).
  rng = np.random.default_rng(8)
  logp_V = jax.nn.log_softmax(jnp.asarray(rng.normal(size=10)))
  ref_logp_V = jax.nn.log_softmax(jnp.asarray(rng.normal(size=10)))
  p_V = jnp.exp(logp_V)
  exact = float(jnp.sum(p_V * (logp_V - ref_logp_V)))
  assert exact > 0.05
  for kind in ("k1", "k3"):
    estimate = jnp.sum(p_V * objectives.kl_penalty(logp_V, ref_logp_V, kind))
    np.testing.assert_allclose(estimate, exact, rtol=1e-5)
  grad_ref = jax.grad(
      lambda r: jnp.sum(objectives.kl_penalty(logp_V, r, "k3")))(ref_logp_V)
  np.testing.assert_array_equal(grad_ref, 0.0)


# Property tests use a few fixed shapes and pass every hyper-parameter except
# the aggregation mode as an array, so that each compiled function is reused
# across examples; the data, masks and split points vary.
N_ROWS, N_COLS = 12, 6
MICRO_SIZES = [3, 5]  # 5 leaves a smaller last micro-batch.
NO_DUAL_CLIP = 1e30   # A dual clip this large never binds.


def _ppo(logp_NT, old_logp_NT, adv_NT, mask_NT, counts, dual_clip, *,
         aggregation):
  return objectives.ppo_clip_loss(
      logp_NT, old_logp_NT, adv_NT, mask_NT, dual_clip=dual_clip,
      aggregation=aggregation, norm_constant=N_COLS, **counts)


def _sft(logp_NT, mask_NT, counts, *, aggregation):
  return objectives.sft_loss(logp_NT, mask_NT, aggregation=aggregation,
                             norm_constant=N_COLS, **counts)


_ppo_and_grad = jax.jit(jax.value_and_grad(_ppo, has_aux=True),
                        static_argnames="aggregation")


@functools.partial(jax.jit, static_argnames="aggregation")
def _losses_and_grads(logp_NT, old_logp_NT, adv_NT, mask_NT, counts,
                      dual_clip, *, aggregation):
  """PPO and SFT losses and their gradients w.r.t. logp, in one compile."""
  ppo = jax.value_and_grad(lambda lp: _ppo(
      lp, old_logp_NT, adv_NT, mask_NT, counts, dual_clip,
      aggregation=aggregation)[0])
  sft = jax.value_and_grad(lambda lp: _sft(
      lp, mask_NT, counts, aggregation=aggregation)[0])
  return ppo(logp_NT), sft(logp_NT)


@st.composite
def ppo_batches(draw):
  """A [N_ROWS, N_COLS] batch; per-sequence advantages broadcast over T."""
  p_valid = draw(st.sampled_from([0.0, 0.3, 0.8, 1.0]))
  empty_rows = draw(st.integers(0, N_ROWS))
  per_token_adv = draw(st.booleans())
  seed = draw(st.integers(0, 2**32 - 1))
  logp_NT, old_logp_NT, adv, mask_NT = random_ppo_batch(
      np.random.default_rng(seed), N_ROWS, N_COLS, per_token_adv, p_valid,
      empty_rows)
  adv_NT = np.broadcast_to(adv if per_token_adv else adv[:, None],
                           logp_NT.shape).copy()
  return logp_NT, old_logp_NT, adv_NT, mask_NT


@PROPERTY_SETTINGS
@given(batch=ppo_batches(), mode=st.sampled_from(MODES),
       micro_size=st.sampled_from(MICRO_SIZES),
       dual_clip=st.sampled_from([NO_DUAL_CLIP, 1.5]))
def test_micro_batch_loss_and_gradient_equal_full_batch(batch, mode,
                                                        micro_size, dual_clip):
  mask_NT = batch[-1]
  counts = aggregation.normalizers(mask_NT)
  dual_clip = np.float32(dual_clip)
  full = _losses_and_grads(*batch, counts, dual_clip, aggregation=mode)
  micro = [
      _losses_and_grads(*[a[s:s + micro_size] for a in batch], counts,
                        dual_clip, aggregation=mode)
      for s in range(0, N_ROWS, micro_size)
  ]
  loss_NT, _ = reference_ppo(*batch, dual_clip=float(dual_clip))
  for i, token_loss_NT in enumerate([loss_NT, -batch[0]]):  # PPO, then SFT.
    full_loss, full_grad = full[i]
    micro_loss = sum(float(m[i][0]) for m in micro)
    micro_grad = np.concatenate([m[i][1] for m in micro])
    # Scale: the same aggregation of |token loss|, the sum's rounding scale.
    scale = reference_aggregate(np.abs(token_loss_NT), mask_NT, mode,
                                N_COLS) + 1e-30
    assert abs(micro_loss - float(full_loss)) <= 1e-6 * scale
    np.testing.assert_allclose(
        full_loss, reference_aggregate(token_loss_NT, mask_NT, mode, N_COLS),
        rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(micro_grad, full_grad, rtol=1e-6, atol=0)


@PROPERTY_SETTINGS
@given(batch=ppo_batches(), mode=st.sampled_from(MODES),
       pad_value=st.sampled_from([0.0, -np.inf, np.nan]))
def test_all_masked_padding_changes_nothing(batch, mode, pad_value):
  """Appends 3 rows and 2 columns of masked garbage."""
  shape = (N_ROWS + 3, N_COLS + 2)

  def pad(x_NT, value):
    out = np.full(shape, value, x_NT.dtype)
    out[:N_ROWS, :N_COLS] = x_NT
    return out

  padded = [pad(x, pad_value) for x in batch[:3]] + [pad(batch[3], False)]
  dual_clip = np.float32(2.0)

  def run(logp_NT, old_logp_NT, adv_NT, mask_NT):
    # Local counts: padding must not change them either.
    return _ppo_and_grad(logp_NT, old_logp_NT, adv_NT, mask_NT, {}, dual_clip,
                         aggregation=mode)

  (want, want_metrics), want_grad = run(*batch)
  (got, got_metrics), got_grad = run(*padded)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  for name in METRIC_NAMES:
    np.testing.assert_allclose(got_metrics[name], want_metrics[name],
                               rtol=1e-6, atol=1e-7, err_msg=name)
  np.testing.assert_allclose(got_grad[:N_ROWS, :N_COLS], want_grad, rtol=1e-6)
  np.testing.assert_array_equal(got_grad[N_ROWS:], 0.0)
  np.testing.assert_array_equal(got_grad[:, N_COLS:], 0.0)


# GSPO, CISPO, policy gradient, KL and entropy losses, importance weights.


def reference_gspo(logp_NT, old_logp_NT, adv, mask_NT, clip_low=3e-4,
                   clip_high=4e-4):
  """Plain-loop float64 GSPO token losses and sequence ratios."""
  n_rows, n_cols = logp_NT.shape
  loss_NT, ratio_N = np.zeros((n_rows, n_cols)), np.zeros(n_rows)
  for n in range(n_rows):
    steps = [t for t in range(n_cols) if mask_NT[n, t]]
    if not steps:
      continue
    ratio = math.exp(sum(float(logp_NT[n, t]) - float(old_logp_NT[n, t])
                         for t in steps) / len(steps))
    ratio_N[n] = ratio
    clipped = min(max(ratio, 1 - clip_low), 1 + clip_high)
    for t in steps:
      a = float(adv[n]) if adv.ndim == 1 else float(adv[n, t])
      loss_NT[n, t] = -min(ratio * a, clipped * a)
  return loss_NT, ratio_N


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_sum_norm"])
def test_gspo_matches_reference(variant, mode):
  batch = random_ppo_batch(np.random.default_rng(10), 7, 5, empty_rows=2)
  # Log-ratios of ~1e-3 so that some sequences clip and some do not.
  batch = (batch[1] + 3e-3 * (batch[0] - batch[1]),) + batch[1:]
  fn = variant(functools.partial(objectives.gspo_loss, aggregation=mode,
                                 norm_constant=5.0))
  loss, metrics = fn(*batch)
  want_NT, ratio_N = reference_gspo(*batch)
  np.testing.assert_allclose(
      loss, reference_aggregate(want_NT, batch[-1], mode, norm_constant=5.0),
      rtol=1e-5, atol=1e-7)
  rows = batch[-1].any(-1)
  np.testing.assert_allclose(metrics["seq_ratio_mean"], ratio_N[rows].mean(),
                             rtol=1e-6)
  np.testing.assert_allclose(metrics["seq_ratio_max"], ratio_N[rows].max(),
                             rtol=1e-6)
  clipped = (ratio_N < 1 - 3e-4) | (ratio_N > 1 + 4e-4)
  assert 0 < clipped[rows].sum() < rows.sum()


def test_gspo_gradient_is_the_sequence_level_gradient():
  """Token-form gradient equals the paper's sequence-level objective's."""
  logp_NT, old_logp_NT, adv_N, mask_NT = random_ppo_batch(
      np.random.default_rng(11), 6, 5, empty_rows=1)
  logp_NT = old_logp_NT + 1e-3 * (logp_NT - old_logp_NT)

  def sequence_level(lp_NT):
    m_NT = jnp.asarray(mask_NT, jnp.float32)
    len_N = m_NT.sum(-1)
    s_N = jnp.exp(jnp.sum(m_NT * (lp_NT - old_logp_NT), -1) /
                  jnp.maximum(len_N, 1))
    obj_N = jnp.minimum(s_N * adv_N,
                        jnp.clip(s_N, 1 - 3e-4, 1 + 4e-4) * adv_N)
    return -jnp.sum(jnp.where(len_N > 0, obj_N, 0)) / jnp.sum(len_N > 0)

  grad_NT = jax.jit(jax.grad(lambda lp: objectives.gspo_loss(
      lp, old_logp_NT, adv_N, mask_NT)[0]))(logp_NT)
  want_NT = jax.jit(jax.grad(sequence_level))(logp_NT)
  assert np.abs(want_NT).max() > 1e-3  # Some sequences are not clipped.
  np.testing.assert_allclose(grad_NT, want_NT, rtol=1e-5, atol=1e-8)


def test_gspo_hand_computed():
  old_logp_NT = jnp.zeros((2, 2))
  # Row 0: log-ratios 0.001 and 0.003, s = exp(0.002) > 1 + 4e-4: clipped
  # for A > 0 (zero gradient). Row 1: s = exp(1e-4), inside: gradient
  # -A s / (2 tokens) / (2 sequences) per token.
  logp_NT = jnp.array([[0.001, 0.003], [0.0, 2e-4]])
  adv_N = jnp.array([1.0, 2.0])
  (loss, metrics), grad_NT = jax.value_and_grad(
      objectives.gspo_loss, has_aux=True)(logp_NT, old_logp_NT, adv_N,
                                          jnp.ones((2, 2)))
  s1 = math.exp(1e-4)
  np.testing.assert_allclose(loss, -(1.0004 * 1.0 + s1 * 2.0) / 2, rtol=1e-6)
  np.testing.assert_allclose(grad_NT, [[0, 0], [-s1 / 2, -s1 / 2]],
                             rtol=1e-5)
  np.testing.assert_allclose(metrics["seq_clip_frac"], 0.5)
  np.testing.assert_allclose(metrics["clip_frac_high"], 0.5)


def reference_cispo(logp_NT, old_logp_NT, adv, mask_NT, clip_low=None,
                    clip_high=0.28):
  """Plain-loop float64 CISPO token losses and d loss_NT / d logp_NT."""
  loss_NT, dloss_NT = np.zeros(logp_NT.shape), np.zeros(logp_NT.shape)
  for n, t in np.ndindex(*logp_NT.shape):
    if not mask_NT[n, t]:
      continue
    a = float(adv[n]) if adv.ndim == 1 else float(adv[n, t])
    ratio = math.exp(float(logp_NT[n, t]) - float(old_logp_NT[n, t]))
    weight = min(ratio, 1 + clip_high)
    if clip_low is not None:
      weight = max(weight, 1 - clip_low)
    loss_NT[n, t] = -weight * a * float(logp_NT[n, t])
    dloss_NT[n, t] = -weight * a
  return loss_NT, dloss_NT


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("clip_low", [None, 0.2])
def test_cispo_matches_reference(variant, mode, clip_low):
  batch = random_ppo_batch(np.random.default_rng(12), 7, 5, True,
                           empty_rows=2)
  batch = (batch[0] * 1.5,) + batch[1:]
  fn = variant(functools.partial(objectives.cispo_loss, clip_low=clip_low,
                                 aggregation=mode, norm_constant=5.0))
  loss, metrics = fn(*batch)
  want_NT, dloss_NT = reference_cispo(*batch, clip_low=clip_low)
  np.testing.assert_allclose(
      loss, reference_aggregate(want_NT, batch[-1], mode, norm_constant=5.0),
      rtol=1e-5, atol=1e-6)
  ratio = np.exp(batch[0] - batch[1])[batch[-1]]
  np.testing.assert_allclose(metrics["clip_frac_high"],
                             np.mean(ratio > 1.28), rtol=1e-6)
  assert 0 < float(metrics["clip_frac_high"]) < 1
  if mode == "token_mean":
    grad_NT = jax.grad(lambda lp: objectives.cispo_loss(
        lp, *batch[1:], clip_low=clip_low)[0])(batch[0])
    np.testing.assert_allclose(grad_NT, dloss_NT / batch[-1].sum(),
                               rtol=1e-5, atol=1e-8)


def test_cispo_hand_computed_keeps_clipped_gradients():
  logp_NT = jnp.log(jnp.array([[2.0, 0.5]]))
  old_logp_NT = jnp.zeros((1, 2))
  adv_NT = jnp.array([[1.0, -1.0]])
  (loss, metrics), grad_NT = jax.value_and_grad(
      objectives.cispo_loss, has_aux=True)(logp_NT, old_logp_NT, adv_NT,
                                           jnp.ones((1, 2)))
  # Weights: min(2, 1.28) = 1.28 and 0.5 (no floor).
  np.testing.assert_allclose(
      loss, -(1.28 * math.log(2.0) - 0.5 * math.log(0.5)) / 2, rtol=1e-6)
  # PPO would zero the first token's gradient; CISPO keeps it, weighted.
  np.testing.assert_allclose(grad_NT, [[-0.64, 0.25]], rtol=1e-6)
  np.testing.assert_allclose(metrics["clip_frac"], 0.5)
  np.testing.assert_allclose(metrics["is_weight_mean"], 0.89, rtol=1e-6)
  _, grad_NT = jax.value_and_grad(
      functools.partial(objectives.cispo_loss, clip_low=0.2),
      has_aux=True)(logp_NT, old_logp_NT, adv_NT, jnp.ones((1, 2)))
  np.testing.assert_allclose(grad_NT, [[-0.64, 0.4]], rtol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_sum_norm"])
def test_policy_gradient_matches_reference(variant, mode):
  logp_NT, _, adv_N, mask_NT = random_ppo_batch(np.random.default_rng(13),
                                                6, 5)
  fn = variant(functools.partial(objectives.policy_gradient_loss,
                                 aggregation=mode, norm_constant=5.0))
  loss, metrics = fn(logp_NT, adv_N, mask_NT)
  want_NT = -adv_N[:, None] * logp_NT.astype(np.float64)
  np.testing.assert_allclose(
      loss, reference_aggregate(want_NT, mask_NT, mode, norm_constant=5.0),
      rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(
      metrics["adv_mean"],
      reference_aggregate(np.broadcast_to(adv_N[:, None], mask_NT.shape),
                          mask_NT, "token_mean"), rtol=1e-5, atol=1e-7)


def test_policy_gradient_equals_ppo_gradient_on_policy():
  batch = random_ppo_batch(np.random.default_rng(14), 5, 4, True)
  grad_pg = jax.grad(lambda lp: objectives.policy_gradient_loss(
      lp, batch[2], batch[3])[0])(batch[0])
  grad_ppo = jax.grad(lambda lp: objectives.ppo_clip_loss(
      lp, lp, batch[2], batch[3])[0])(batch[0])
  np.testing.assert_allclose(grad_pg, grad_ppo, rtol=1e-6)
  np.testing.assert_allclose(
      grad_pg, np.where(batch[3], -batch[2], 0) / batch[3].sum(), rtol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean"])
def test_kl_loss_matches_reference(variant, kind, mode):
  rng = np.random.default_rng(15)
  logp_NT = -rng.exponential(size=(5, 6)).astype(np.float32)
  ref_logp_NT = (logp_NT + rng.normal(size=(5, 6))).astype(np.float32)
  mask_NT = rng.random((5, 6)) < 0.7
  mask_NT[1] = False
  ref_logp_NT[~mask_NT] = np.nan
  fn = variant(functools.partial(objectives.kl_loss, kind=kind,
                                 aggregation=mode))
  loss, metrics = fn(logp_NT, ref_logp_NT, mask_NT)
  kl_NT = np.where(mask_NT, reference_kl(logp_NT, np.nan_to_num(ref_logp_NT),
                                         kind), 0)
  np.testing.assert_allclose(loss, reference_aggregate(kl_NT, mask_NT, mode),
                             rtol=1e-5)
  np.testing.assert_allclose(metrics["kl"],
                             reference_aggregate(kl_NT, mask_NT, "token_mean"),
                             rtol=1e-5)
  np.testing.assert_allclose(metrics["kl_max"], kl_NT[mask_NT].max(),
                             rtol=1e-5)
  if variant is not jax.jit or kind != "k3" or mode != "token_mean":
    return
  grad_NT = jax.jit(jax.grad(lambda lp: fn(lp, ref_logp_NT, mask_NT)[0]))(
      logp_NT)
  # d k3 / d logp = 1 - exp(ref_logp - logp); 0 where masked (NaN there).
  want_NT = np.where(mask_NT, 1 - np.exp(np.nan_to_num(ref_logp_NT) -
                                         logp_NT), 0) / mask_NT.sum()
  np.testing.assert_allclose(grad_NT, want_NT, rtol=1e-5, atol=1e-8)


def test_kl_loss_hand_computed():
  logp_NT = jnp.log(jnp.array([[0.5, 0.5]]))
  ref_logp_NT = jnp.log(jnp.array([[0.25, 0.5]]))
  loss, metrics = objectives.kl_loss(logp_NT, ref_logp_NT, jnp.ones((1, 2)))
  np.testing.assert_allclose(loss, 0.1931472 / 2, rtol=1e-6)
  np.testing.assert_allclose(metrics["kl_max"], 0.1931472, rtol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_sum_norm"])
def test_entropy_loss_matches_reference(variant, mode):
  rng = np.random.default_rng(16)
  entropy_NT = rng.exponential(size=(5, 6)).astype(np.float32)
  mask_NT = rng.random((5, 6)) < 0.6
  mask_NT[3] = False
  entropy_NT[~mask_NT] = np.nan
  fn = variant(functools.partial(objectives.entropy_loss, aggregation=mode,
                                 norm_constant=6.0))
  loss, metrics = fn(entropy_NT, mask_NT)
  np.testing.assert_allclose(
      loss, -reference_aggregate(entropy_NT, mask_NT, mode, norm_constant=6.0),
      rtol=1e-6)
  np.testing.assert_allclose(
      metrics["entropy"], reference_aggregate(entropy_NT, mask_NT,
                                              "token_mean"), rtol=1e-6)
  grad_NT = jax.grad(lambda e: objectives.entropy_loss(e, mask_NT)[0])(
      entropy_NT)
  np.testing.assert_allclose(grad_NT, np.where(mask_NT, -1 / mask_NT.sum(), 0),
                             rtol=1e-6)


def reference_importance(logp_NT, rollout_logp_NT, mask_NT, level, mode, cap):
  """Plain-loop float64 importance weights."""
  w_NT = np.zeros(logp_NT.shape)
  for n in range(logp_NT.shape[0]):
    steps = [t for t in range(logp_NT.shape[1]) if mask_NT[n, t]]
    seq = sum(float(logp_NT[n, t]) - float(rollout_logp_NT[n, t])
              for t in steps)
    for t in steps:
      log_rho = (seq if level == "sequence" else
                 float(logp_NT[n, t]) - float(rollout_logp_NT[n, t]))
      rho = math.exp(log_rho)
      w_NT[n, t] = min(rho, cap) if mode == "truncate" else (
          rho if rho <= cap else 0.0)
  return w_NT


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_importance_weights_match_reference(variant, level, mode):
  rng = np.random.default_rng(17)
  logp_NT = -rng.exponential(size=(8, 5)).astype(np.float32)
  rollout_logp_NT = (logp_NT + 0.4 * rng.normal(size=(8, 5))).astype(
      np.float32)
  mask_NT = rng.random((8, 5)) < 0.7
  mask_NT[0] = False
  rollout_logp_NT[~mask_NT] = np.nan
  fn = variant(functools.partial(objectives.importance_weights, level=level,
                                 mode=mode, cap=1.5))
  w_NT, metrics = fn(logp_NT, rollout_logp_NT, mask_NT)
  want_NT = reference_importance(logp_NT, rollout_logp_NT, mask_NT, level,
                                 mode, 1.5)
  np.testing.assert_allclose(w_NT, want_NT, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(metrics["is_weight_mean"],
                             want_NT[mask_NT].mean(), rtol=1e-5)
  capped = float(metrics["is_capped_frac"])
  assert 0 < capped < 1
  if mode == "mask":
    np.testing.assert_allclose(capped, np.mean(want_NT[mask_NT] == 0),
                               rtol=1e-6)


def test_importance_weights_hand_computed_and_stop_gradient():
  logp_NT = jnp.log(jnp.array([[0.5, 0.9, 0.2]]))
  rollout_logp_NT = jnp.log(jnp.array([[0.25, 0.9, 0.4]]))
  mask_NT = jnp.array([[1, 1, 1]])
  w_NT, metrics = objectives.importance_weights(logp_NT, rollout_logp_NT,
                                                mask_NT, cap=1.5)
  np.testing.assert_allclose(w_NT, [[1.5, 1.0, 0.5]], rtol=1e-6)
  np.testing.assert_allclose(metrics["is_capped_frac"], 1 / 3, rtol=1e-6)
  np.testing.assert_allclose(metrics["is_ratio_max"], 2.0, rtol=1e-6)
  w_NT, _ = objectives.importance_weights(logp_NT, rollout_logp_NT, mask_NT,
                                          mode="mask", cap=1.5)
  np.testing.assert_allclose(w_NT, [[0.0, 1.0, 0.5]], rtol=1e-6)
  # Sequence ratio 2 * 1 * 0.5 = 1 for every token.
  w_NT, _ = objectives.importance_weights(logp_NT, rollout_logp_NT, mask_NT,
                                          level="sequence", mode="mask")
  np.testing.assert_allclose(w_NT, [[1.0, 1.0, 1.0]], rtol=1e-6)
  grad_NT = jax.grad(lambda lp: jnp.sum(objectives.importance_weights(
      lp, rollout_logp_NT, mask_NT)[0]))(logp_NT)
  np.testing.assert_array_equal(grad_NT, 0.0)
  with pytest.raises(ValueError, match="'clip'"):
    objectives.importance_weights(logp_NT, rollout_logp_NT, mask_NT,
                                  mode="clip")
  with pytest.raises(ValueError, match="'batch'"):
    objectives.importance_weights(logp_NT, rollout_logp_NT, mask_NT,
                                  level="batch")


_NEW_LOSSES = {
    "gspo": lambda lp, old, adv, m, **kw: objectives.gspo_loss(
        lp, old, adv, m, **kw),
    "cispo": lambda lp, old, adv, m, **kw: objectives.cispo_loss(
        lp, old, adv, m, **kw),
    "pg": lambda lp, old, adv, m, **kw: objectives.policy_gradient_loss(
        lp, adv, m, **kw),
    "kl": lambda lp, old, adv, m, **kw: objectives.kl_loss(lp, old, m, **kw),
    "entropy": lambda lp, old, adv, m, **kw: objectives.entropy_loss(
        -lp, m, **kw),
    "dft": lambda lp, old, adv, m, **kw: objectives.dft_loss(lp, m, **kw),
}


@functools.partial(jax.jit, static_argnames=("name", "aggregation"))
def _new_loss_and_grad(logp_NT, old_logp_NT, adv_NT, mask_NT, counts, *,
                       name, aggregation):
  fn = lambda lp: _NEW_LOSSES[name](lp, old_logp_NT, adv_NT, mask_NT,
                                    aggregation=aggregation,
                                    norm_constant=N_COLS, **counts)
  return jax.value_and_grad(fn, has_aux=True)(logp_NT)


@settings(max_examples=8, deadline=None, database=None)
@given(batch=ppo_batches(), mode=st.sampled_from(MODES),
       name=st.sampled_from(sorted(_NEW_LOSSES)),
       pad_value=st.sampled_from([-np.inf, np.nan]))
def test_new_losses_micro_batch_and_padding_invariant(batch, mode, name,
                                                      pad_value):
  mask_NT = batch[-1]
  counts = aggregation.normalizers(mask_NT)
  (full, metrics), full_grad = _new_loss_and_grad(*batch, counts, name=name,
                                                  aggregation=mode)
  micro = [_new_loss_and_grad(*[a[s:s + 6] for a in batch], counts,
                              name=name, aggregation=mode)
           for s in range(0, N_ROWS, 6)]
  scale = float(np.abs(full)) + 1e-3
  np.testing.assert_allclose(sum(float(m[0][0]) for m in micro), full,
                             rtol=1e-5, atol=1e-6 * scale)
  np.testing.assert_allclose(np.concatenate([m[1] for m in micro]), full_grad,
                             rtol=1e-5, atol=1e-7)
  # Masked garbage in extra rows and columns changes nothing.
  padded = []
  for x_NT in batch[:3]:
    out = np.full((N_ROWS + 2, N_COLS + 2), pad_value, np.float32)
    out[:N_ROWS, :N_COLS] = x_NT
    padded.append(out)
  padded_mask_NT = np.zeros((N_ROWS + 2, N_COLS + 2), bool)
  padded_mask_NT[:N_ROWS, :N_COLS] = mask_NT
  (got, got_metrics), got_grad = _new_loss_and_grad(
      *padded, padded_mask_NT, counts, name=name, aggregation=mode)
  np.testing.assert_allclose(got, full, rtol=1e-6, atol=1e-7)
  for key, value in metrics.items():
    np.testing.assert_allclose(got_metrics[key], value, rtol=1e-6, atol=1e-7,
                               err_msg=key)
  np.testing.assert_allclose(got_grad[:N_ROWS, :N_COLS], full_grad, rtol=1e-6,
                             atol=1e-9)
  assert np.all(np.asarray(got_grad)[~padded_mask_NT] == 0)


# DFT and One-Token Rollout.


def np_log_softmax(x_V):
  x_V = np.asarray(x_V, np.float64)
  m = x_V.max()
  return x_V - m - math.log(sum(math.exp(v - m) for v in x_V))


def random_logits(rng, n_rows, n_cols, vocab, p_valid=0.7):
  logits_NTV = (2 * rng.normal(size=(n_rows, n_cols, vocab))).astype(
      np.float32)
  targets_NT = rng.integers(0, vocab, (n_rows, n_cols))
  mask_NT = rng.random((n_rows, n_cols)) < p_valid
  mask_NT[0] = False
  logits_NTV[~mask_NT] = np.nan
  targets_NT[~mask_NT] = -1
  return logits_NTV, targets_NT, mask_NT


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_sum_norm"])
def test_dft_matches_reference(variant, mode):
  rng = np.random.default_rng(20)
  logp_NT = -rng.exponential(size=(5, 6)).astype(np.float32)
  mask_NT = rng.random((5, 6)) < 0.6
  mask_NT[1] = False
  fn = variant(functools.partial(objectives.dft_loss, aggregation=mode,
                                 norm_constant=6.0))
  loss, metrics = fn(logp_NT, mask_NT)
  want_NT = -np.exp(logp_NT.astype(np.float64)) * logp_NT
  np.testing.assert_allclose(
      loss, reference_aggregate(want_NT, mask_NT, mode, norm_constant=6.0),
      rtol=1e-6)
  np.testing.assert_allclose(
      metrics["target_prob"],
      reference_aggregate(np.exp(logp_NT), mask_NT, "token_mean"), rtol=1e-6)


def test_dft_hand_computed():
  logp_NT = jnp.log(jnp.array([[0.5, 0.25]]))
  (loss, _), grad_NT = jax.value_and_grad(objectives.dft_loss, has_aux=True)(
      logp_NT, jnp.ones((1, 2)))
  np.testing.assert_allclose(loss, (0.5 * math.log(2) + 0.25 * math.log(4)) / 2,
                             rtol=1e-6)
  np.testing.assert_allclose(grad_NT, [[-0.25, -0.125]], rtol=1e-6)


def reference_otr_exact(logits_NTV, targets_NT, mask_NT, kappa, beta):
  """Plain-loop float64 expected OTR token losses."""
  loss_NT = np.zeros(mask_NT.shape)
  for n, t in np.ndindex(*mask_NT.shape):
    if not mask_NT[n, t]:
      continue
    logp_V = np_log_softmax(logits_NTV[n, t])
    q_V = np.exp(np_log_softmax(logits_NTV[n, t].astype(np.float64) / kappa))
    for a in range(len(logp_V)):
      reward = 1.0 if a == targets_NT[n, t] else beta
      loss_NT[n, t] -= q_V[a] * reward * logp_V[a]
  return loss_NT


def reference_otr(logits_NTV, targets_NT, mask_NT, cand_NTK, beta):
  """Plain-loop float64 sampled OTR token losses for given candidates."""
  loss_NT = np.zeros(mask_NT.shape)
  for n, t in np.ndindex(*mask_NT.shape):
    if not mask_NT[n, t]:
      continue
    logp_V = np_log_softmax(logits_NTV[n, t])
    for a in cand_NTK[n, t]:
      reward = 1.0 if a == targets_NT[n, t] else beta
      loss_NT[n, t] -= reward * logp_V[a] / cand_NTK.shape[-1]
  return loss_NT


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean"])
def test_otr_exact_matches_reference(variant, mode):
  batch = random_logits(np.random.default_rng(21), 4, 5, 7)
  fn = functools.partial(objectives.otr_exact_loss, aggregation=mode)
  loss, metrics = variant(fn)(*batch)
  want_NT = reference_otr_exact(*batch, kappa=1.2, beta=-0.1)
  np.testing.assert_allclose(loss, reference_aggregate(want_NT, batch[2], mode),
                             rtol=1e-5)
  grad_NTV = jax.jit(jax.grad(lambda x: fn(x, *batch[1:])[0]))(batch[0])
  assert np.all(np.isfinite(grad_NTV))
  np.testing.assert_array_equal(np.asarray(grad_NTV)[~batch[2]], 0.0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_otr_matches_reference_given_its_candidates(variant):
  logits_NTV, targets_NT, mask_NT = random_logits(np.random.default_rng(22),
                                                  4, 5, 6)
  # Make hits frequent: each target is the sampler's favourite half the time.
  targets_NT = np.where(np.arange(5) % 2 == 0,
                        np.nan_to_num(logits_NTV).argmax(-1), targets_NT)
  rng = jax.random.PRNGKey(0)
  fn = variant(functools.partial(objectives.otr_loss, num_candidates=5,
                                 kappa=0.8, beta=-0.3))
  loss, metrics = fn(logits_NTV, targets_NT, mask_NT, rng)
  prepared, _, _ = supervised._prepare_logits(logits_NTV, targets_NT, mask_NT)
  cand_NTK = np.asarray(supervised._otr_candidates(prepared, rng, 5, 0.8))
  want_NT = reference_otr(logits_NTV, targets_NT, mask_NT, cand_NTK, -0.3)
  np.testing.assert_allclose(
      loss, reference_aggregate(want_NT, mask_NT, "token_mean"), rtol=1e-5)
  hits = (cand_NTK == targets_NT[..., None]).mean(-1)[mask_NT].mean()
  assert 0 < hits < 1
  np.testing.assert_allclose(metrics["hit_rate"], hits, rtol=1e-6)


def test_otr_candidates_follow_the_tempered_distribution():
  logits_V = jnp.array([1.0, 0.0, -1.0, 2.0, -jnp.inf])
  cand = supervised._otr_candidates(logits_V[None, None],
                                    jax.random.PRNGKey(1), 20000, 1.5)
  freq_V = np.bincount(np.asarray(cand).ravel(), minlength=5) / 20000
  q_V = np.asarray(jax.nn.softmax(logits_V / 1.5))
  # Binomial standard error <= 0.0036; 4 sigma.
  np.testing.assert_allclose(freq_V, q_V, atol=0.015)
  assert freq_V[4] == 0


def test_otr_hand_computed():
  # kappa = 0.01 makes the sampler (nearly) greedy: every candidate is
  # token 0, while pi = softmax([2, 1, 0]) at temperature 1.
  logits_NTV = jnp.array([[[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]]])
  logp0 = float(jax.nn.log_softmax(logits_NTV[0, 0])[0])
  loss, metrics = objectives.otr_loss(
      logits_NTV, jnp.array([[0, 1]]), jnp.ones((1, 2)),
      jax.random.PRNGKey(0), num_candidates=4, kappa=0.01, beta=-0.1)
  # Position 0: hit, loss -log pi(0); position 1: miss, loss 0.1 log pi(0).
  np.testing.assert_allclose(loss, (-logp0 + 0.1 * logp0) / 2, rtol=1e-6)
  np.testing.assert_allclose(metrics["hit_rate"], 0.5)
  exact, _ = objectives.otr_exact_loss(logits_NTV, jnp.array([[0, 1]]),
                                       jnp.ones((1, 2)), kappa=0.01, beta=-0.1)
  np.testing.assert_allclose(exact, loss, rtol=1e-6)


def test_otr_exact_gradient_at_kappa_one_is_scaled_dft():
  """sum_a pi(a) grad log pi(a) = 0 leaves (1 - beta) pi(x) grad log pi(x)."""
  logits_NTV, targets_NT, mask_NT = random_logits(np.random.default_rng(23),
                                                  3, 4, 6)
  beta = -0.1
  grad_otr = jax.jit(jax.grad(lambda x: objectives.otr_exact_loss(
      x, targets_NT, mask_NT, kappa=1.0, beta=beta)[0]))(logits_NTV)

  def dft_of_logits(x_NTV):
    logp_NT = jnp.take_along_axis(
        jax.nn.log_softmax(jnp.nan_to_num(x_NTV)),
        np.maximum(targets_NT, 0)[..., None], -1)[..., 0]
    return objectives.dft_loss(logp_NT, mask_NT)[0]

  grad_dft = jax.jit(jax.grad(dft_of_logits))(logits_NTV)
  assert np.abs(grad_dft).max() > 1e-2
  np.testing.assert_allclose(grad_otr, (1 - beta) * np.asarray(grad_dft),
                             rtol=1e-5, atol=1e-7)
  # Away from kappa = 1 the beta term contributes and the two differ.
  grad_hot = jax.jit(jax.grad(lambda x: objectives.otr_exact_loss(
      x, targets_NT, mask_NT, kappa=1.5, beta=beta)[0]))(logits_NTV)
  assert np.abs(grad_hot - (1 - beta) * np.asarray(grad_dft)).max() > 1e-3


def test_otr_monte_carlo_gradient_converges_to_exact():
  """Error of the K-sample gradient shrinks like 1 / sqrt(K)."""
  logits_NTV, targets_NT, mask_NT = random_logits(np.random.default_rng(24),
                                                  2, 3, 5, p_valid=1.0)
  logits_NTV, targets_NT = np.nan_to_num(logits_NTV), targets_NT % 5
  mask_NT = np.ones_like(mask_NT)
  exact = jax.grad(lambda x: objectives.otr_exact_loss(
      x, targets_NT, mask_NT)[0])(logits_NTV)

  # One draw per key: the K-sample gradient is the mean of K of these.
  grad = jax.jit(jax.vmap(jax.grad(lambda x, key: objectives.otr_loss(
      x, targets_NT, mask_NT, key, num_candidates=1)[0]), in_axes=(None, 0)))
  draws = np.asarray(grad(logits_NTV,
                          jax.random.split(jax.random.PRNGKey(7), 16 * 1024)))

  def rms_error(num_candidates):
    estimates = draws[:16 * num_candidates].reshape(
        (16, num_candidates) + draws.shape[1:]).mean(1)
    err = estimates - np.asarray(exact)[None]
    return float(np.sqrt(np.mean(err**2)))

  errors = [rms_error(k) for k in (16, 1024)]
  # Expected ratio sqrt(1024 / 16) = 8; allow noise in the 16 replicates.
  assert 5 < errors[0] / errors[1] < 12, errors
  assert errors[1] < 0.05 * float(np.abs(exact).max()), errors
