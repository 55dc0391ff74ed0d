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
