"""The NNX decoder against a NumPy reference; KV-cache decoding; padding."""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlax_llm.models.config import ModelConfig, get_model_config
from rlax_llm.models.transformer import Transformer, dense, swiglu


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
