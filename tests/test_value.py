"""Tests for rlax_llm.core.value: clipped value loss, whitening, EV."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlax_llm.core import value

VARIANTS = [pytest.param(lambda f: f, id="eager"),
            pytest.param(jax.jit, id="jit")]


def reference_value_loss(v, v_old, ret, mask, clip):
  total, count = 0.0, 0
  for n in range(v.shape[0]):
    for t in range(v.shape[1]):
      if not mask[n, t]:
        continue
      err = (v[n, t] - ret[n, t]) ** 2
      if clip is not None:
        vc = v_old[n, t] + min(max(v[n, t] - v_old[n, t], -clip), clip)
        err = max(err, (vc - ret[n, t]) ** 2)
      total += 0.5 * err
      count += 1
  return total / max(count, 1)


def _data(seed=0, n=6, t=5):
  rng = np.random.default_rng(seed)
  v = rng.normal(size=(n, t)).astype(np.float32)
  v_old = (v + rng.normal(scale=0.5, size=(n, t))).astype(np.float32)
  ret = rng.normal(size=(n, t)).astype(np.float32)
  mask = np.arange(t)[None] < rng.integers(0, t + 1, (n, 1))
  return v, v_old, ret, mask


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_loss_matches_reference(variant, clip):
  v, v_old, ret, mask = _data()
  v_old[~mask] = np.nan  # masked entries are ignored
  loss, metrics = variant(lambda *a: value.value_loss(*a, clip=clip))(
      v, v_old, ret, mask)
  v_old = np.nan_to_num(v_old)
  np.testing.assert_allclose(loss, reference_value_loss(v, v_old, ret, mask,
                                                        clip), rtol=1e-5)
  assert np.isfinite(metrics["value_clip_frac"])
  if clip is not None:
    assert 0 < float(metrics["value_clip_frac"]) < 1


def test_value_loss_vmap_and_gradient():
  v, v_old, ret, mask = _data(1)
  batched = jax.vmap(lambda *a: value.value_loss(*a)[0])(
      *(np.stack([x, x]) for x in (v, v_old, ret, mask)))
  np.testing.assert_allclose(batched, [value.value_loss(v, v_old, ret,
                                                        mask)[0]] * 2,
                             rtol=1e-6)
  # Unclipped: d/dV 0.5 (V - R)^2 / count = (V - R) / count on valid tokens.
  g = jax.grad(lambda x: value.value_loss(x, v_old, ret, mask, clip=None)[0])(
      jnp.asarray(v))
  want = np.where(mask, (v - ret) / mask.sum(), 0.0)
  np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)


def test_value_loss_hand_computed():
  # V=1, V_old=0, R=0.5, clip 0.2: unclipped err 0.25, clipped V 0.2 -> 0.09;
  # the max is 0.25 -> loss 0.125, not clipped.
  one = jnp.ones((1, 1))
  loss, m = value.value_loss(one, 0 * one, 0.5 * one, one, clip=0.2)
  np.testing.assert_allclose(loss, 0.125)
  assert float(m["value_clip_frac"]) == 0.0
  # R=2: unclipped 1.0, clipped (0.2-2)^2 = 3.24 -> 1.62, clipped.
  loss, m = value.value_loss(one, 0 * one, 2 * one, one, clip=0.2)
  np.testing.assert_allclose(loss, 1.62, rtol=1e-6)
  assert float(m["value_clip_frac"]) == 1.0
  with pytest.raises(ValueError, match="clip"):
    value.value_loss(one, one, one, one, clip=0.0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_whiten_and_explained_variance(variant):
  v, _, ret, mask = _data(2)
  w = variant(value.whiten)(ret, mask)
  x = ret[mask]
  want = (x - x.mean()) / (x.std() + 1e-8)
  np.testing.assert_allclose(np.asarray(w)[mask], want, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(w)[~mask] == 0)
  ev = variant(value.explained_variance)(v, ret, mask)
  np.testing.assert_allclose(ev, 1 - np.var(x - v[mask]) / np.var(x),
                             rtol=1e-5)
  assert float(value.explained_variance(ret, ret, mask)) == 1.0
  # Constant returns: defined as 0, never NaN.
  assert float(value.explained_variance(v, np.ones_like(ret), mask)) == 0.0
  assert np.all(value.whiten(ret, np.zeros_like(mask)) == 0)
