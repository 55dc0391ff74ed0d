"""The NNX decoder against a NumPy reference; KV-cache decoding; padding."""

import functools
import re

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlax_llm.models.config import ModelConfig, get_model_config
from rlax_llm.models.transformer import (Transformer, add_bias, dense,
                                         full_attention, scale_rows, swiglu)


def _model(seed=0, **kw):
  cfg = dict(vocab_size=23, num_layers=2, embed_dim=32, num_heads=4,
             num_kv_heads=2, head_dim=8, mlp_dim=48, max_seq_len=40,
             init_std=0.3)
  cfg.update(kw)
  return Transformer(ModelConfig(**cfg), rngs=nnx.Rngs(seed))


def _np_reference(model: Transformer, tokens: np.ndarray) -> np.ndarray:
  """Plain NumPy forward of one unpadded sequence [T] -> logits [T, V]."""
  cfg = model.cfg
  p = lambda x: np.asarray(x[...], np.float64)  # noqa: E731
  t = len(tokens)

  def rms(x, scale):
    return scale * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps)

  def rope(x):  # x [T, n, H]
    h = x.shape[-1]
    out = np.empty_like(x)
    for pos in range(t):
      for i in range(h // 2):
        ang = pos / cfg.rope_theta ** (2 * i / h)
        c, s = np.cos(ang), np.sin(ang)
        a, b = x[pos, :, i], x[pos, :, i + h // 2]
        out[pos, :, i] = a * c - b * s
        out[pos, :, i + h // 2] = b * c + a * s
    return out

  x = p(model.embedding)[tokens]
  group = cfg.num_heads // cfg.num_kv_heads
  for layer in model.layers:
    a = layer.attn
    h = rms(x, p(layer.attn_norm.scale))
    q = np.einsum("td,dnh->tnh", h, p(a.q_proj))
    k = np.einsum("td,dnh->tnh", h, p(a.k_proj))
    v = np.einsum("td,dnh->tnh", h, p(a.v_proj))
    if cfg.qkv_bias:
      q, k, v = q + p(a.q_bias), k + p(a.k_bias), v + p(a.v_bias)
    q, k = rope(q), rope(k)
    o = np.zeros_like(q)
    for head in range(cfg.num_heads):
      kv = head // group
      for i in range(t):
        s = np.array([q[i, head] @ k[j, kv] for j in range(i + 1)])
        s /= np.sqrt(cfg.head_dim)
        w = np.exp(s - s.max())
        w /= w.sum()
        o[i, head] = sum(w[j] * v[j, kv] for j in range(i + 1))
    x = x + np.einsum("tnh,nhd->td", o, p(a.o_proj))
    h = rms(x, p(layer.mlp_norm.scale))
    g = h @ p(layer.mlp.gate_proj)
    x = x + ((g / (1 + np.exp(-g))) * (h @ p(layer.mlp.up_proj))) @ p(
        layer.mlp.down_proj)
  h = rms(x, p(model.final_norm.scale))
  w = p(model.embedding).T if cfg.tie_embeddings else p(model.lm_head)
  return h @ w


@pytest.mark.parametrize("kw", [
    dict(),
    dict(qkv_bias=True, tie_embeddings=False),
    dict(num_kv_heads=1, rope_theta=500.0),
    dict(num_kv_heads=4, num_heads=4),
])
def test_forward_matches_numpy_reference(kw):
  model = _model(**kw)
  if "qkv_bias" in kw:  # non-zero biases so they matter
    for name in ("q_bias", "k_bias", "v_bias"):
      for i, layer in enumerate(model.layers):
        var = getattr(layer.attn, name)
        var[...] = jax.random.normal(jax.random.key(i), var[...].shape) * 0.3
  tokens = np.array([3, 7, 1, 22, 9, 9, 4, 15])
  want = _np_reference(model, tokens)
  got = np.asarray(_jitted(model)(jnp.asarray(tokens)[None]))[0]
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("x_shape,w_shape,in_dims,spec", [
    ((5, 7, 6), (6, 3, 4), 1, "btd,dnh->btnh"),
    ((2, 3, 5, 4, 2), (4, 2, 9), 2, "abcnh,nhd->abcd"),
    ((6,), (6, 5), 1, "d,dv->v"),
])
def test_dense_is_the_einsum_and_its_gradient(x_shape, w_shape, in_dims, spec):
  rng = np.random.default_rng(0)
  x = rng.normal(size=x_shape).astype(np.float32)
  w = rng.normal(size=w_shape).astype(np.float32)
  got = dense(jnp.asarray(x), jnp.asarray(w), in_dims=in_dims)
  want = np.einsum(spec, x.astype(np.float64), w.astype(np.float64))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  cot = rng.normal(size=want.shape)
  # d<cot, x W>/dW = einsum over the leading axes of x and cot.
  gx, gw = jax.grad(lambda a, b: jnp.sum(dense(a, b, in_dims=in_dims)
                                         * cot), argnums=(0, 1))(x, w)
  ins, out = spec.split("->")
  xs, ws = ins.split(",")
  np.testing.assert_allclose(np.asarray(gw), np.einsum(
      f"{xs},{out}->{ws}", x.astype(np.float64), cot), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(gx), np.einsum(
      f"{out},{ws}->{xs}", cot, w.astype(np.float64)), rtol=1e-4, atol=1e-4)


def _bf16(a) -> np.ndarray:
  """a rounded to bfloat16 (to nearest even), as float64."""
  return np.asarray(jnp.asarray(np.asarray(a, np.float32), jnp.bfloat16),
                    np.float64)


def _close_to_bf16(got, want64):
  """got equals want64 rounded to bfloat16, up to one bfloat16 ulp (f32
  sums in another order can round the other way)."""
  got = np.asarray(got, np.float64)
  ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(want64), 1e-30))) - 7)
  assert np.all(np.abs(got - _bf16(want64)) <= ulp + 1e-30), (
      np.max(np.abs(got - _bf16(want64)) / ulp))


@pytest.mark.parametrize("x_shape,w_shape,in_dims,spec", [
    ((4, 6, 16), (16, 24), 1, "btd,dn->btn"),  # rows split as 4 x 6
    ((12, 16), (16, 8), 1, "md,dn->mn"),  # one row axis: 12 = 3 x 4
    ((13, 16), (16, 8), 1, "md,dn->mn"),  # 13 rows (prime): no split
    ((2, 3, 4, 8), (4, 8, 16), 2, "abnh,nhd->abd"),
])
def test_dense_bf16_is_the_f32_product_rounded_and_so_are_its_gradients(
    x_shape, w_shape, in_dims, spec):
  # bfloat16 operands: each product is the exact product of the bfloat16
  # values, summed in f32 and rounded to bfloat16 once, forward and back.
  rng = np.random.default_rng(4)
  x, w = _bf16(rng.normal(size=x_shape)), _bf16(rng.normal(size=w_shape))
  bf = jnp.bfloat16
  y = jax.jit(functools.partial(dense, in_dims=in_dims))(
      jnp.asarray(x, bf), jnp.asarray(w, bf))
  assert y.dtype == bf
  want = np.einsum(spec, x, w)
  _close_to_bf16(y, want)
  cot = _bf16(rng.normal(size=want.shape))

  def loss(a, b):
    return jnp.sum(dense(a, b, in_dims=in_dims).astype(jnp.float32) * cot)

  gx, gw = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x, bf),
                                                    jnp.asarray(w, bf))
  assert gx.dtype == gw.dtype == bf
  ins, out = spec.split("->")
  xs, ws = ins.split(",")
  _close_to_bf16(gw, np.einsum(f"{xs},{out}->{ws}", x, cot))
  _close_to_bf16(gx, np.einsum(f"{out},{ws}->{xs}", cot, w))


def _dot_operand_types(hlo_text: str) -> list[tuple[str, str]]:
  """(lhs, rhs) element types of every dot in a compiled HLO module."""
  types = dict(re.findall(r"%([\w.\-]+) = ([a-z0-9]+)\[", hlo_text))
  return [(types[a], types[b]) for a, b in re.findall(
      r"\] ?\{?[0-9,]*\}? dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo_text)]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's dots")
@pytest.mark.parametrize("k,n", [(64, 96), (96, 64)])  # dw = x^T g, (g^T x)^T
def test_dense_bf16_keeps_all_three_products_on_bf16_operands_on_cpu(k, n):
  # XLA:CPU converts the operands of a bfloat16 dot to f32 unless the dot
  # returns f32 from row-major operands with the left one contracting its
  # last axis; the plain product's gradient misses that (the contrast below).
  x = jnp.ones((8, 40, k), jnp.bfloat16)
  w = jnp.ones((k, n), jnp.bfloat16)
  cot = jnp.ones((8, 40, n), jnp.float32)

  def grads(f):
    fn = jax.value_and_grad(
        lambda a, b: jnp.sum(jnp.sin(f(a, b).astype(jnp.float32)) * cot),
        argnums=(0, 1))
    return _dot_operand_types(jax.jit(fn).lower(x, w).compile().as_text())

  ours = grads(dense)
  assert len(ours) == 3 and all(t == ("bf16", "bf16") for t in ours), ours
  plain = grads(lambda a, b: jnp.einsum("btk,kn->btn", a, b))
  assert any(t != ("bf16", "bf16") for t in plain), plain


def _np_attention(q, k, v, allowed, scale, softcap):
  """float64 GQA softmax attention: q [B, T, N, H], k, v [B, S, K, H]."""
  r = q.shape[2] // k.shape[2]
  kr, vr = np.repeat(k, r, axis=2), np.repeat(v, r, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, kr) * scale
  if softcap is not None:
    s = softcap * np.tanh(s / softcap)
  s = np.where(allowed[:, None], s, -1e30)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", p, vr)


@pytest.mark.parametrize("t,n,kh,softcap", [(12, 4, 2, None), (12, 4, 2, 5.0),
                                            (7, 2, 2, None)])
def test_bf16_attention_value_and_gradient_follow_the_f64_reference(
    t, n, kh, softcap):
  # The bfloat16 path (a custom derivative on a CPU backend) against the f32
  # path's value (checked against float64 NumPy) and autodiff gradients, on
  # the same bfloat16 inputs, with right padding and a prime length (7).
  rng = np.random.default_rng(6)
  b, h = 3, 8
  q = _bf16(rng.normal(size=(b, t, n, h)))
  k = _bf16(rng.normal(size=(b, t, kh, h)))
  v = _bf16(rng.normal(size=(b, t, kh, h)))
  lengths = np.array([t, t - 2, 1])  # right padding
  valid = np.arange(t)[None] < lengths[:, None]
  allowed = np.tril(np.ones((t, t), bool))[None] & valid[:, None, :]
  scale = h ** -0.5
  cot = _bf16(rng.normal(size=q.shape))
  want = _np_attention(q, k, v, allowed, scale, softcap)

  def f(a, c, d):
    return full_attention(a, c, d, jnp.asarray(allowed), softcap=softcap)

  def loss(a, c, d):
    return jnp.sum(f(a, c, d).astype(jnp.float32) * cot)

  def run(dtype):
    args = [jnp.asarray(x, dtype) for x in (q, k, v)]
    out = jax.jit(f)(*args)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    return [np.asarray(x, np.float64) for x in (out, *grads)]

  ref = run(jnp.float32)
  np.testing.assert_allclose(ref[0], want, rtol=1e-5, atol=1e-5)
  got = run(jnp.bfloat16)
  for g, r in zip(got, ref):
    # bfloat16 keeps 8 significant bits; P and dS are rounded once more.
    assert np.linalg.norm(g - r) <= 0.02 * np.linalg.norm(r), (
        np.linalg.norm(g - r) / np.linalg.norm(r))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's dots")
def test_bf16_attention_runs_every_product_on_bf16_operands_on_cpu():
  b, t, n, kh, h = 2, 16, 4, 2, 8
  q = jnp.ones((b, t, n, h), jnp.bfloat16)
  kv = jnp.ones((b, t, kh, h), jnp.bfloat16)
  allowed = jnp.asarray(np.tril(np.ones((t, t), bool))[None].repeat(b, 0))
  fn = jax.value_and_grad(
      lambda a, c, d: jnp.sum(jnp.sin(full_attention(a, c, d, allowed)
                                      .astype(jnp.float32))),
      argnums=(0, 1, 2))
  dots = _dot_operand_types(jax.jit(fn).lower(q, kv, kv).compile().as_text())
  # q k^T, P V; dO V^T, P^T dO, dS K, dS^T Q.
  assert len(dots) == 6 and all(d == ("bf16", "bf16") for d in dots), dots


@pytest.mark.parametrize("lead", [(64, 80), (7,), (1, 1)])
def test_bf16_products_compile_and_run_for_awkward_shapes(lead):
  # XLA:CPU picks bfloat16 kernels for a dot early and fails at run time
  # ("Unsupported element type for DotThunk") when a later pass turns the
  # dot into a form those kernels do not take; every product here must run.
  bf, f32 = jnp.bfloat16, jnp.float32
  for k, n in ((8, 1), (8, 64), (256, 1024), (1024, 8), (16, 7)):
    x, w = jnp.ones((*lead, k), bf), jnp.ones((k, n), bf)
    value, (gx, gw) = jax.jit(jax.value_and_grad(
        lambda a, b: jnp.sum(jnp.sin(dense(a, b).astype(f32))),
        argnums=(0, 1)))(x, w)
    # Every output is sin(k); d/dx = cos(k) summed over the n outputs.
    m = int(np.prod(lead))
    np.testing.assert_allclose(float(value), m * n * np.sin(k), rtol=1e-2)
    np.testing.assert_allclose(np.asarray(gw, f32), m * np.cos(k),
                               rtol=1e-2, atol=1e-2 * m)
    np.testing.assert_allclose(np.asarray(gx, f32), n * np.cos(k),
                               rtol=1e-2, atol=1e-2 * n)
  b, t = (lead + (1,))[:2]
  for nh, kh, h in ((4, 2, 8), (14, 2, 64), (4, 4, 16)):
    q, kv = jnp.ones((b, t, nh, h), bf), jnp.ones((b, t, kh, h), bf)
    allowed = jnp.asarray(np.tril(np.ones((t, t), bool))[None].repeat(b, 0))
    out = jax.jit(jax.value_and_grad(
        lambda a, c, d: jnp.sum(full_attention(a, c, d, allowed)
                                .astype(f32)), argnums=(0, 1, 2)))(q, kv, kv)
    # Equal values: every output is 1, and no input changes the sum but v.
    np.testing.assert_allclose(float(out[0]), b * t * nh * h, rtol=1e-3)
    np.testing.assert_allclose(np.asarray(out[1][0], f32), 0.0, atol=1e-3)


def test_bias_and_scale_gradients_sum_the_rows_in_f32_in_a_bf16_model():
  # 4,099 rows of 1 + 2^-7 sum to 4131.0234375, exact in f32 and not a
  # bfloat16 number: any partial sum rounded to bfloat16 would miss it.
  rows, v = 4099, 1.0 + 2.0 ** -7
  bf, f32 = jnp.bfloat16, jnp.float32
  b = jnp.asarray(np.linspace(-1.0, 1.0, 8), f32)
  x = jnp.full((rows, 8), v, bf)
  y = jax.jit(add_bias)(x, b)
  assert y.dtype == bf
  np.testing.assert_array_equal(
      np.asarray(y, np.float64),
      np.broadcast_to(_bf16(np.float64(v) + _bf16(b)), (rows, 8)))
  dx, db = jax.jit(jax.grad(
      lambda a, c: jnp.sum(add_bias(a, c).astype(f32) * v), argnums=(0, 1)))(
          x, b)
  assert db.dtype == f32 and dx.dtype == bf
  np.testing.assert_array_equal(np.asarray(db), np.full(8, rows * v))
  np.testing.assert_array_equal(np.asarray(dx, np.float32),
                                np.full((rows, 8), v, np.float32))

  s = jnp.asarray(np.linspace(0.5, 2.0, 8), f32)
  z = jax.jit(scale_rows)(s, x)
  assert z.dtype == bf
  np.testing.assert_array_equal(
      np.asarray(z, np.float64),
      np.broadcast_to(_bf16(_bf16(s) * np.float64(v)), (rows, 8)))
  ds, dy = jax.jit(jax.grad(
      lambda c, a: jnp.sum(scale_rows(c, a).astype(f32)), argnums=(0, 1)))(
          s, x)
  assert ds.dtype == f32 and dy.dtype == bf
  np.testing.assert_array_equal(np.asarray(ds), np.full(8, rows * v))
  np.testing.assert_array_equal(np.asarray(dy, np.float64),
                                np.broadcast_to(_bf16(s), (rows, 8)))
  # Forward mode: the directional derivatives, rounded once to bfloat16.
  dxt, dbt = jnp.full((rows, 8), 0.5, bf), jnp.full((8,), 0.25, f32)
  _, tangent = jax.jvp(add_bias, (x, b), (dxt, dbt))
  np.testing.assert_array_equal(np.asarray(tangent, np.float32), 0.75)
  _, tangent = jax.jvp(scale_rows, (s, x), (dbt, dxt))
  np.testing.assert_array_equal(
      np.asarray(tangent, np.float64),
      np.broadcast_to(_bf16(0.25 * v + _bf16(s) * 0.5), (rows, 8)))
  # f32 activations: the plain expressions.
  x32 = jnp.full((3, 8), 2.0, f32)
  np.testing.assert_array_equal(np.asarray(add_bias(x32, b)),
                                np.broadcast_to(2.0 + np.asarray(b), (3, 8)))
  np.testing.assert_array_equal(np.asarray(scale_rows(s, x32)),
                                np.broadcast_to(2.0 * np.asarray(s), (3, 8)))


def test_bf16_model_gradients_follow_the_f32_model():
  # The same weights computing in bfloat16 (biases, MLP biases and norm
  # scales included) give the f32 model's gradients up to bfloat16 error.
  # (With init_std 0.1 the worst leaf, a k projection, is 1.5% off; a wrong
  # transpose or a lost term is off by order 1.)
  kw = dict(qkv_bias=True, mlp_bias=True, out_bias=True, init_std=0.1)
  m32, m16 = _model(**kw), _model(dtype="bfloat16", **kw)
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, 23, (3, 9)))

  def grads(model):
    graphdef, state = nnx.split(model)

    def loss(st):
      logits = nnx.merge(graphdef, st)(tokens)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    return jax.jit(jax.grad(loss))(state)

  g32 = jax.tree.leaves(grads(m32))
  g16 = jax.tree.leaves(grads(m16))
  assert len(g32) == len(g16) > 10
  for a, b in zip(g32, g16):
    assert b.dtype == jnp.float32
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.linalg.norm(a - b) <= 0.04 * np.linalg.norm(a) + 1e-6, (
        np.linalg.norm(a - b) / np.linalg.norm(a))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5),
                                       (jnp.bfloat16, 2e-2)])
def test_swiglu_value_and_gradient_match_the_formula(dtype, tol):
  # silu(g) u = g sigmoid(g) u; d/dg = u s (1 + g (1 - s)), d/du = g s,
  # evaluated in float64 NumPy, including large |g| where s saturates.
  rng = np.random.default_rng(3)
  g = np.concatenate([rng.normal(size=40) * 3, [-40.0, -12.0, 0.0, 12.0,
                                                40.0]]).reshape(5, 9)
  u = rng.normal(size=g.shape)
  cot = rng.normal(size=g.shape)
  g, u, cot = (np.asarray(jnp.asarray(a, dtype), np.float64)
               for a in (g, u, cot))
  s = 1 / (1 + np.exp(-g))
  want_h, want_dg, want_du = g * s * u, cot * u * s * (1 + g * (1 - s)), \
      cot * g * s
  fn = jax.jit(lambda a, b: jax.value_and_grad(
      lambda a, b: jnp.sum((swiglu(a, b) * jnp.asarray(cot, dtype)
                            ).astype(jnp.float32)), argnums=(0, 1))(a, b))
  (_, (dg, du)) = fn(jnp.asarray(g, dtype), jnp.asarray(u, dtype))
  h = jax.jit(swiglu)(jnp.asarray(g, dtype), jnp.asarray(u, dtype))
  assert h.dtype == dg.dtype == du.dtype == dtype
  scale = lambda w: tol * (1 + np.abs(w))  # noqa: E731
  for got, want in ((h, want_h), (dg, want_dg), (du, want_du)):
    got = np.asarray(got, np.float64)
    assert np.all(np.abs(got - want) <= scale(want)), (got, want)


def test_swiglu_saves_two_arrays_for_the_backward_and_has_a_jvp():
  # Reverse mode keeps the two coefficients of d(silu(g) u) = u silu'(g) dg
  # + silu(g) du, where autodiff of the plain expression keeps more arrays as
  # large as the MLP's activations (gate, up, sigmoid(gate), its derivative,
  # silu(gate) with this JAX).
  g64 = np.linspace(-3.0, 3.0, 20).reshape(4, 5)
  u64 = np.linspace(2.0, -1.0, 20).reshape(4, 5)
  g, u = jnp.asarray(g64, jnp.float32), jnp.asarray(u64, jnp.float32)

  def saved(f):
    _, vjp = jax.vjp(f, g, u)
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(vjp)
            if getattr(x, "shape", ()) == g.shape]

  plain = saved(lambda a, b: jax.nn.silu(a) * b)
  ours = saved(swiglu)
  assert len(ours) == 2 < len(plain), len(plain)
  s = 1 / (1 + np.exp(-g64))
  want = [u64 * s * (1 + g64 * (1 - s)), g64 * s]
  for w in want:
    assert any(np.allclose(o, w, rtol=1e-5, atol=1e-6) for o in ours), ours
  # Forward mode, as a custom JVP: the directional derivative by hand.
  dg, du = 0.5 * np.ones_like(g64), -np.ones_like(g64)
  _, tangent = jax.jvp(swiglu, (g, u), (jnp.asarray(dg, jnp.float32),
                                        jnp.asarray(du, jnp.float32)))
  np.testing.assert_allclose(np.asarray(tangent), want[0] * dg + want[1] * du,
                             rtol=1e-5, atol=1e-6)


def _jitted(model, method="__call__", **static):
  """`model.method(*args, **static)` as one compiled program per input shape
  (run op by op, each of the model's operations would compile separately)."""
  graphdef, state = nnx.split(model)

  def call(state, *args):
    return getattr(nnx.merge(graphdef, state), method)(*args, **static)
  compiled = jax.jit(call)
  return lambda *args: compiled(state, *args)


def _padded(seqs, width, side):
  tok = np.zeros((len(seqs), width), np.int32)
  mask = np.zeros((len(seqs), width), bool)
  for i, s in enumerate(seqs):
    sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
    tok[i, sl] = s
    mask[i, sl] = True
  return tok, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_logits(side):
  model = _model()
  rng = np.random.default_rng(0)
  seqs = [rng.integers(3, 23, n) for n in (7, 3, 1, 5)]
  tok, mask = _padded(seqs, 9, side)
  forward = _jitted(model)
  logits = np.asarray(forward(jnp.asarray(tok), None, jnp.asarray(mask)))
  assert np.all(np.isfinite(logits))
  for i, s in enumerate(seqs):
    alone = np.asarray(forward(jnp.asarray(s)[None]))[0]
    np.testing.assert_allclose(logits[i][mask[i]], alone, atol=1e-5)


def test_future_tokens_never_change_earlier_logits():
  model = _model()
  base = np.array([[5, 6, 7, 8, 9, 10]])
  changed = base.copy()
  changed[0, 4:] = [20, 21]
  forward = _jitted(model)
  a = np.asarray(forward(jnp.asarray(base)))
  b = np.asarray(forward(jnp.asarray(changed)))
  np.testing.assert_array_equal(a[0, :4], b[0, :4])
  assert np.abs(a[0, 4:] - b[0, 4:]).max() > 1e-3


@pytest.mark.parametrize("side", ["left", "right"])
def test_kv_cache_decoding_reproduces_full_sequence_logits(side):
  """prefill + decode_step, G samples per prompt, mixed prompt lengths."""
  model = _model(qkv_bias=True, tie_embeddings=False)
  rng = np.random.default_rng(1)
  lens, g, t = (6, 2, 4), 3, 5
  prompts = [rng.integers(3, 23, n) for n in lens]
  p_tok, p_mask = _padded(prompts, 6, side)
  conts = rng.integers(3, 23, (len(lens), g, t))

  last, cache, plen = _jitted(model, "prefill", num_samples=g,
                              max_new_tokens=t)(jnp.asarray(p_tok),
                                                jnp.asarray(p_mask))
  step_logits = [np.broadcast_to(np.asarray(last)[:, None], (len(lens), g, 23))]
  decode_step = _jitted(model, "decode_step")
  for i in range(t - 1):
    logits, cache = decode_step(jnp.asarray(conts[:, :, i]),
                                plen[:, None] + i, cache, i)
    step_logits.append(np.asarray(logits))
  got = np.stack(step_logits, axis=2)  # [B, G, T, V]

  forward = _jitted(model)
  for b, prompt in enumerate(prompts):
    for s in range(g):
      seq = np.concatenate([prompt, conts[b, s]])
      full = np.asarray(forward(jnp.asarray(seq)[None]))[0]
      want = full[len(prompt) - 1:len(prompt) - 1 + t]
      np.testing.assert_allclose(got[b, s], want, atol=1e-5)


def test_presets_and_bad_configs():
  tiny = get_model_config("tiny", vocab_size=50)
  assert (tiny.num_layers, tiny.embed_dim) == (2, 128)
  small = get_model_config("small", vocab_size=50)
  assert small.num_params > tiny.num_params
  n = sum(x.size for x in jax.tree.leaves(nnx.state(Transformer(
      tiny, rngs=nnx.Rngs(0)), nnx.Param)))
  assert n == tiny.num_params
  with pytest.raises(ValueError, match="num_kv_heads"):
    ModelConfig(vocab_size=10, num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match="did you mean"):
    get_model_config("tiyn", vocab_size=10)
  with pytest.raises(ValueError, match="embed_dim"):
    get_model_config("tiny", vocab_size=10, embed_dimm=3)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU's path")
def test_bf16_cpu_mlp_rounds_once_and_its_gradients_follow_the_formula():
  # On a CPU backend the bfloat16 SwiGLU MLP keeps gate and up as the f32
  # products of its bfloat16 operands and rounds silu(gate) up to bfloat16
  # once: h = bf16(silu(x Wg) (x Wu)), y = bf16(h Wd). Its hand-written
  # backward against the float64 chain rule on the same bfloat16 values.
  from rlax_llm.models.transformer import MLP  # pylint: disable=g-import-not-at-top
  cfg = ModelConfig(vocab_size=23, num_layers=1, embed_dim=16, num_heads=2,
                    num_kv_heads=1, head_dim=8, mlp_dim=24, max_seq_len=8,
                    init_std=0.5, dtype="bfloat16")
  mlp = MLP(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(7)
  x = _bf16(rng.normal(size=(6, 16)))
  wg, wu, wd = (_bf16(np.asarray(p[...]))
                for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
  g, u = x @ wg, x @ wu
  s = 1 / (1 + np.exp(-g))
  h = _bf16(g * s * u)
  y = jax.jit(lambda a: mlp(a))(jnp.asarray(x, jnp.bfloat16))
  assert y.dtype == jnp.bfloat16
  _close_to_bf16(y, h @ wd)
  # Gradients of sum(y * cot) w.r.t. x and the three weights.
  cot = rng.normal(size=(6, 16))
  graphdef, state = nnx.split(mlp)

  def loss(st, a):
    out = nnx.merge(graphdef, st)(a).astype(jnp.float32)
    return jnp.sum(out * jnp.asarray(cot, jnp.float32))

  gst, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(
      state, jnp.asarray(x, jnp.bfloat16))
  dh = cot @ wd.T
  dg, du = dh * u * s * (1 + g * (1 - s)), dh * g * s
  want = {"down_proj": h.T @ cot, "gate_proj": x.T @ dg, "up_proj": x.T @ du}
  for name, w in want.items():
    got = np.asarray(gst[name][...], np.float64)
    assert np.linalg.norm(got - w) <= 0.02 * np.linalg.norm(w), name
  want_x = dg @ wg.T + du @ wu.T
  got_x = np.asarray(gx, np.float64)
  assert np.linalg.norm(got_x - want_x) <= 0.02 * np.linalg.norm(want_x)
