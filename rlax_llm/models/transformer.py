"""A Flax NNX decoder of the Llama / Qwen / Gemma families, with a group-shared
KV cache.

Architecture: token embedding -> L x [RMSNorm -> grouped-query attention with
rotary embeddings (optional q/k/v and output biases, optional per-head q/k
RMSNorm as in Qwen3, optional "linear"/"llama3" frequency scaling) -> residual
-> RMSNorm -> SwiGLU MLP (optional biases) -> residual] -> RMSNorm -> output
layer (tied to the embedding or separate). Checkpoints of the Qwen2/Qwen2.5,
Qwen3, Llama 3, Gemma 2 and Gemma 3 (text) families load into it through
`rlax_llm.models.hf`.

Gemma's features are switched on by static `ModelConfig` fields whose
defaults leave the computation above unchanged: (1 + scale) RMSNorms
(`norm_unit_offset`), norms on the attention and MLP outputs (`post_norms`),
embeddings scaled by sqrt(D) (`embed_scale`), a GeGLU MLP (`mlp_activation`),
query scaling by `query_pre_attn_scalar`, tanh soft-capping of attention
scores and of the output logits (`attn_logit_softcap`, `final_logit_softcap`)
and sliding-window layers (`sliding_window`, `layer_types` or
`sliding_window_pattern`) with their own rotary base (`rope_local_theta`).
A sliding-window layer lets a query at position p see keys at positions
p - W + 1 .. p; positions are token positions (counted over valid tokens), in
the full pass and in decoding alike.

Numerics: parameters are stored in `cfg.param_dtype`, activations computed in
`cfg.dtype`; norms, softmax and the rotary embedding run in f32, and logits are
always f32. In a bfloat16/float16 model the gradients of biases and norm scales
sum over the tokens in f32 (`add_bias`, `scale_rows`), and on a CPU backend
bfloat16 matmuls and attention keep every product of the forward and backward
pass on XLA's bfloat16 kernels (`dense`, `full_attention`), with the values of
the plain products. `cfg.remat` rematerialises each decoder block in the
backward pass.

Three ways to run it:
  * `model(tokens_BT, positions_BT, mask_BT)`: full-sequence causal logits
    (training, scoring). Padding, left or right, is expressed only by
    `mask_BT`; positions count valid tokens, so a padded and an unpadded copy of
    a sequence give identical logits.
  * `model.prefill(prompt_BP, prompt_mask_BP, ...)`: runs the prompts once and
    returns the logits of each prompt's last token and a `KVCache` holding the
    prompt keys/values once per prompt.
  * `model.decode_step(tokens_BG, positions_BG, cache, index)`: one new token for
    each of G samples of each prompt. Samples of a prompt attend to the shared
    prompt keys/values plus their own decode keys/values, so G samples cost one
    prefill and no copy of the prompt cache. `index` is one slot for all rows
    or a slot per row (rows resumed at different lengths).

Every parameter carries `logical_axes` metadata (names such as "embed", "mlp",
"heads", "vocab") that `rlax_llm.parallel` maps onto mesh axes.

With `cfg.lora_rank` r > 0 each projection named in `cfg.lora_targets` gets a
low-rank adapter (LoRA, arXiv:2106.09685): y = x W + (alpha / r) (x A) B, the
same in the full pass and in the fused projections of decoding. A and B are
`LoRAParam`s named `<target>_lora_a` [in..., r] and `<target>_lora_b`
[r, out...] beside the base weight (`q_lora_a` next to `q_proj`); their
logical axes are the base weight's input / output axes and None for the rank.
They are created after every base weight, so a model of the same seed has the
same base weights with or without adapters, and B starts at zero, so a fresh
adapter model computes exactly the base model. `rlax_llm.models.lora` splits,
merges and zeroes them.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from rlax_llm.models.config import ModelConfig

_NEG_INF = -1e30


def _param(rngs: nnx.Rngs, shape, axes, cfg: ModelConfig, *, std=None):
  std = cfg.init_std if std is None else std
  value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
  return nnx.Param(value.astype(cfg.param_dtype), logical_axes=axes)


class LoRAParam(nnx.Param):
  """A low-rank adapter matrix (A or B of `cfg.lora_targets`' projections)."""


def _lora_pair(rngs: nnx.Rngs, in_shape, in_axes, out_shape, out_axes,
               cfg: ModelConfig) -> tuple[LoRAParam, LoRAParam]:
  """(A [in..., r] normal with std `cfg.init_std`, B [r, out...] zero)."""
  r = cfg.lora_rank
  a = cfg.init_std * jax.random.normal(rngs.params(), (*in_shape, r),
                                       jnp.float32)
  return (LoRAParam(a.astype(cfg.param_dtype),
                    logical_axes=(*in_axes, None)),
          LoRAParam(jnp.zeros((r, *out_shape), cfg.param_dtype),
                    logical_axes=(None, *out_axes)))


def dense(x: jax.Array, w: jax.Array, *, in_dims: int = 1,
          preferred_element_type=None) -> jax.Array:
  """x [..., in...] times w [in..., out...] -> [..., out...] as one 2-D dot.

  The leading axes of x and the `in_dims` trailing ones are flattened, so
  XLA sees an [M, K] x [K, N] product whatever the rank of the activations.
  On the CPU this matters in the backward pass: the weight gradient of a
  [B, S, D] x [D, F] einsum contracts two axes, which XLA lowers with
  transposes around a slower dot (a SwiGLU MLP's forward + backward at
  B S = 5120, D = 256, F = 1024 took 1.7x as long as the flattened one). The
  result is the same product, reshaped back.

  bfloat16 x and w on a CPU backend go through `_bf16_cpu_dot` (with an f32
  `preferred_element_type`, `_bf16_cpu_dot_f32`), which keeps all three
  products of the forward and backward pass on bfloat16 operands (see
  there); the values are those of the plain product. It defines
  reverse mode only: forward-mode differentiation (`jax.jvp`) of a bfloat16
  model on a CPU backend raises JAX's custom_vjp error (compute in float32
  for it).
  """
  lead = x.shape[:x.ndim - in_dims]
  out = w.shape[in_dims:]
  x2 = x.reshape(math.prod(lead), -1)
  w2 = w.reshape(math.prod(w.shape[:in_dims]), -1)
  if (_bf16_on_cpu(x, w)
      and preferred_element_type in (None, jnp.bfloat16)):
    y = _bf16_cpu_dot(x2, w2)
  elif _bf16_on_cpu(x, w) and preferred_element_type == jnp.float32:
    y = _bf16_cpu_dot_f32(x2, w2)
  else:
    y = jnp.dot(x2, w2, preferred_element_type=preferred_element_type)
  return y.reshape(*lead, *out)


def _bf16_on_cpu(*arrays) -> bool:
  """Whether `arrays` are all bfloat16 and the default backend is the CPU."""
  return (all(a.dtype == jnp.bfloat16 for a in arrays)
          and jax.default_backend() == "cpu")


def _row_split(m: int) -> int:
  """The smallest divisor a > 1 of m (1 when m is prime or 1).

  Any a > 1 keeps the transpose in `_kept_transpose`; a small one made the
  copies of [4160, 256] and [4160, 1024] bfloat16 activations about twice
  as fast as a ~ sqrt(m) (0.3 against 0.55 ms, 0.9 against 2.2 ms).
  """
  for a in range(2, math.isqrt(m) + 1):
    if m % a == 0:
      return a
  return 1


def _kept_transpose(x: jax.Array, perm, split: int) -> jax.Array:
  """`jnp.transpose(x, perm)` as a materialised row-major array.

  Axis `split` of x is split in two (`_row_split` of its size) for the
  transpose and merged back after it, so XLA:CPU sees a reshape at the
  consumer, not a transpose it folds into a dot's dimensions or reads in
  place (its bfloat16 kernels take neither: the dot would run on f32
  copies). When the axis has no split, this is the plain transpose.
  """
  n = x.shape[split]
  a = _row_split(n)
  split_perm = []
  for i in perm:
    if i < split:
      split_perm.append(i)
    elif i == split:
      split_perm += [split, split + 1]
    else:
      split_perm.append(i + 1)
  y = x.reshape(*x.shape[:split], a, n // a, *x.shape[split + 1:])
  return jnp.transpose(y, split_perm).reshape([x.shape[i] for i in perm])


def _bf16_cpu_dot(x_MK: jax.Array, w_KN: jax.Array) -> jax.Array:
  """[M, K] x [K, N] -> [M, N] in bfloat16, accumulated in f32.

  XLA:CPU runs a bfloat16 dot on bfloat16 operands (AMX or AVX512-BF16
  kernels, where the host has them) only when its output is f32 and both
  operands are row-major with the left one contracting its last axis;
  otherwise it converts the operands to f32 and runs an f32 dot. The plain
  product and its autodiff miss that in two ways: a bfloat16-output dot, and
  the weight gradient x^T g, which contracts the rows of x. Here every
  product has an f32 output rounded to bfloat16 (the value XLA computes for
  a bfloat16 dot, which accumulates in f32), dx = g w^T contracts the last
  axes of both (a form the kernels take), and the weight gradient multiplies
  a materialised transpose (`_kept_transpose`; XLA folds a plain one into
  the dot's dimensions) of the narrower of x and g. The GRPO
  bench's update (4 layers, 5,120 tokens, width 256, MLP 1,024) in
  bfloat16: 0.72 -> 0.47 s on a 2-core Xeon with AMX.
  """
  return _bf16_cpu_dot_f32(x_MK, w_KN).astype(x_MK.dtype)


@jax.custom_vjp
def _bf16_cpu_dot_f32(x_MK: jax.Array, w_KN: jax.Array) -> jax.Array:
  """`_bf16_cpu_dot` without the final rounding: the f32 product.

  Its f32 cotangent is rounded to bfloat16 for the backward's two products
  (a conversion XLA fuses into whatever produced the cotangent, or drops
  where that was a bfloat16 value widened).
  """
  return jnp.dot(x_MK, w_KN, preferred_element_type=jnp.float32)


def _bf16_cpu_dot_f32_fwd(x_MK, w_KN):
  return _bf16_cpu_dot_f32(x_MK, w_KN), (x_MK, w_KN)


def _bf16_cpu_dot_f32_bwd(res, g_MN):
  x_MK, w_KN = res
  g_MN = g_MN.astype(x_MK.dtype)
  f32 = jnp.float32
  dx = jax.lax.dot_general(g_MN, w_KN, (((1,), (1,)), ((), ())),
                           preferred_element_type=f32)
  m, k = x_MK.shape
  n = g_MN.shape[1]
  if _row_split(m) == 1:  # a prime row count: XLA converts this one to f32
    dw = jax.lax.dot_general(x_MK, g_MN, (((0,), (0,)), ((), ())),
                             preferred_element_type=f32)
  elif k > n and _row_split(n) > 1:
    # Transposing the narrower operand moves k/n times less data:
    # dw = (g^T x)^T, the [n, k] product transposed back, also kept (the
    # MLP's down projection, k = 4 n, and the key/value projections, k = 4 n
    # at the bench's shape; 4.4 -> 2.8 ms for [4160, 1024]^T [4160, 256]).
    dw = _kept_transpose(
        jnp.dot(_kept_transpose(g_MN, (1, 0), split=0), x_MK,
                preferred_element_type=f32), (1, 0), split=0)
  else:
    dw = jnp.dot(_kept_transpose(x_MK, (1, 0), split=0), g_MN,
                 preferred_element_type=f32)
  return dx.astype(x_MK.dtype), dw.astype(w_KN.dtype)


_bf16_cpu_dot_f32.defvjp(_bf16_cpu_dot_f32_fwd, _bf16_cpu_dot_f32_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _swiglu_rounded(gate: jax.Array, up: jax.Array, dtype) -> jax.Array:
  """`swiglu` of f32 gate and up, rounded once to `dtype`.

  The bfloat16 MLP on a CPU backend takes gate and up as the f32 outputs of
  its products (`_bf16_cpu_dot_f32`), so the forward is one pass over them
  (where rounding each to bfloat16 first, then keeping sigmoid(gate) and
  silu(gate) for the backward, took five). The backward keeps gate and up
  and recomputes the sigmoid; the barrier stops XLA from sharing that
  sigmoid with the forward's, which would store it. The GRPO bench's
  forward + backward in bfloat16: 0.305 -> 0.29 s on a 2-core Xeon.
  """
  return (jax.nn.silu(gate) * up).astype(dtype)


def _swiglu_rounded_fwd(gate, up, dtype):
  return _swiglu_rounded(gate, up, dtype), (gate, up)


def _swiglu_rounded_bwd(dtype, res, dh):
  del dtype
  gate, up = jax.lax.optimization_barrier(res)
  dh = dh.astype(gate.dtype)
  silu, slope = _silu_and_slope(gate)
  return dh * up * slope, dh * silu


_swiglu_rounded.defvjp(_swiglu_rounded_fwd, _swiglu_rounded_bwd)


def _low_precision(dtype) -> bool:
  return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def add_bias(x: jax.Array, b: jax.Array) -> jax.Array:
  """x + b in x's dtype (b [n...] over x's trailing axes).

  In a bfloat16/float16 model, b's gradient sums the cotangent over the rows
  in f32. Autodiff of the plain sum reduces in the activations' dtype:
  XLA rounds every partial sum of the 5,120 rows of the GRPO bench's batch
  to bfloat16 (and, on a CPU, splits the sum into a slow tree of windows
  to limit that error).
  """
  if not _low_precision(x.dtype):
    return x + b.astype(x.dtype)
  return _add_bias_lp(x, b)


@jax.custom_jvp
def _add_bias_lp(x, b):
  return x + b.astype(x.dtype)


@_add_bias_lp.defjvp
def _add_bias_lp_jvp(primals, tangents):
  # The tangent in f32, rounded once: its transpose sums b's cotangent over
  # the rows in f32.
  (x, b), (dx, db) = primals, tangents
  f32 = jnp.float32
  return _add_bias_lp(x, b), (dx.astype(f32) + db.astype(f32)).astype(x.dtype)


def scale_rows(s: jax.Array, y: jax.Array) -> jax.Array:
  """s * y in y's dtype (s [n...] over y's trailing axes), with s's gradient
  summed over the rows in f32 in a bfloat16/float16 model (see `add_bias`)."""
  if not _low_precision(y.dtype):
    return s.astype(y.dtype) * y
  return _scale_rows_lp(s, y)


@jax.custom_jvp
def _scale_rows_lp(s, y):
  return s.astype(y.dtype) * y


@_scale_rows_lp.defjvp
def _scale_rows_lp_jvp(primals, tangents):
  (s, y), (ds, dy) = primals, tangents
  f32 = jnp.float32
  tangent = (ds.astype(f32) * y.astype(f32)
             + s.astype(y.dtype).astype(f32) * dy.astype(f32))
  return _scale_rows_lp(s, y), tangent.astype(y.dtype)


@jax.custom_jvp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """silu(gate) * up (SwiGLU's gating), with a hand-written derivative.

  d(silu(g) u) = u silu'(g) dg + silu(g) du, silu'(g) = s (1 + g (1 - s)),
  s = sigmoid(g). Reverse mode keeps the two coefficients of that linear
  map, where autodiff of the plain expression keeps gate, up, sigmoid(gate),
  its derivative and silu(gate), each as large as the MLP's activations.
  The GRPO bench's update (4 layers, 5,120 tokens x 1,024 MLP units):
  759 -> 686 MiB of scratch memory on a CPU. Same values; derivatives equal
  up to float rounding.
  """
  return jax.nn.silu(gate) * up


def _silu_and_slope(gate: jax.Array):
  """silu(g) = g s and its derivative s + silu(g) (1 - s), s = sigmoid(g)."""
  s = jax.nn.sigmoid(gate)
  silu = gate * s
  return silu, s + silu * (1 - s)


@swiglu.defjvp
def _swiglu_jvp(primals, tangents):
  gate, up = primals
  d_gate, d_up = tangents
  silu, slope = _silu_and_slope(gate)
  return silu * up, d_gate * (up * slope) + d_up * silu


def _lora_down(x: jax.Array, a: jax.Array, dt) -> jax.Array:
  """x [..., in...] times A [in..., r] -> [..., r], in dtype `dt`."""
  return dense(x.astype(dt), a.astype(dt), in_dims=a.ndim - 1)


def _lora_up(xa: jax.Array, b: jax.Array, scale: float, dt) -> jax.Array:
  """(scale * xa) [..., r] times B [r, out...] -> [..., out...]."""
  return dense(xa * jnp.asarray(scale, dt), b.astype(dt))


def _ones(shape, axes, cfg: ModelConfig):
  return nnx.Param(jnp.ones(shape, cfg.param_dtype), logical_axes=axes)


def _zeros(shape, axes, cfg: ModelConfig):
  return nnx.Param(jnp.zeros(shape, cfg.param_dtype), logical_axes=axes)


class KVCache(NamedTuple):
  """Keys and values for decoding G samples per prompt.

  Keys are stored with the slot axis last and values with the head axis last,
  so that both contractions of a decode query (q.k over H, p.v over slots)
  run over a non-minor axis of the cache and vectorise along its minor axis
  (on a CPU this reads each cached key once per step at full vector width;
  on accelerators each is an ordinary batched matmul).

  Attributes:
    prefix_k: per layer [B, K, H, P], the prompt keys (once per prompt).
    prefix_v: per layer [B, K, P, H].
    prefix_mask: [B, P] bool, valid prompt positions.
    k: per layer [B, G, K, H, T], keys of generated tokens (slot t last).
    v: per layer [B, G, K, T, H], values of generated tokens.
  """
  prefix_k: tuple[jax.Array, ...]
  prefix_v: tuple[jax.Array, ...]
  prefix_mask: jax.Array
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]


def decode_cache_length(cache: KVCache) -> int:
  """T, the number of decode slots of `cache`."""
  return cache.k[0].shape[-1]


def resize_decode_cache(cache: KVCache, length: int) -> KVCache:
  """The cache with `length` decode slots (zero-padded or truncated at the end).

  Slots past a step's index are masked in `Transformer.decode_step`, so a
  decode on a longer (zero-padded) cache gives the same logits; a shorter
  cache bounds how much of it each step reads.
  """
  def resize(x, axis):
    if x.shape[axis] >= length:
      return jax.lax.slice_in_dim(x, 0, length, axis=axis)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad)
  return cache._replace(k=tuple(resize(x, -1) for x in cache.k),
                        v=tuple(resize(x, -2) for x in cache.v))


def decode_cache_from_kv(k_BGTKH: jax.Array, v_BGTKH: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
  """Per-sample keys/values [B, G, T, K, H] in the layout of `KVCache.k/v`."""
  return (jnp.transpose(k_BGTKH, (0, 1, 3, 4, 2)),
          jnp.transpose(v_BGTKH, (0, 1, 3, 2, 4)))


def prefix_cache_from_kv(k_BPKH: jax.Array, v_BPKH: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
  """Prompt keys/values [B, P, K, H] in the layout of `KVCache.prefix_k/v`."""
  return (jnp.transpose(k_BPKH, (0, 2, 3, 1)),
          jnp.transpose(v_BPKH, (0, 2, 1, 3)))


def default_positions(mask_BT: jax.Array) -> jax.Array:
  """Positions that count valid tokens: 0 at each row's first valid token."""
  return jnp.maximum(jnp.cumsum(mask_BT.astype(jnp.int32), axis=-1) - 1, 0)


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
  """Inverse rotary frequencies [H/2] f32 of `cfg`, with its rope scaling.

  "default": inv_freq_i = theta^(-2i/H). "linear": inv_freq / factor.
  "llama3" (Llama 3.1): with wavelength w = 2 pi / inv_freq and the bounds
  w_lo = L / low_freq_factor, w_hi = L / high_freq_factor (L the original
  context), frequencies with w > w_lo are divided by the factor, those with
  w < w_hi kept, and those between interpolated with
  s = (L / w - low_freq_factor) / (high_freq_factor - low_freq_factor):
  (1 - s) inv_freq / factor + s inv_freq.
  """
  h = cfg.head_dim
  exponent = np.arange(0, h, 2, dtype=np.float32) / np.float32(h)
  inv_freq = (1.0 / np.float32(cfg.rope_theta) ** exponent).astype(np.float32)
  if cfg.rope_scaling == "linear":
    inv_freq = inv_freq / np.float32(cfg.rope_factor)
  elif cfg.rope_scaling == "llama3":
    factor = cfg.rope_factor
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_len = cfg.rope_original_max_len
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    inv_freq = np.where(medium, smoothed, scaled)
  return inv_freq.astype(np.float32)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float, *,
                 inv_freq=None) -> tuple[jax.Array, jax.Array]:
  """cos and sin of the rotary angles, each [..., T, 1, H] f32.

  Args:
    positions: [..., T] int.
    head_dim: H.
    theta: frequency base (used when `inv_freq` is None).
    inv_freq: optional [H/2] inverse frequencies (see `rope_frequencies`).
  """
  h = head_dim
  if inv_freq is None:
    inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  inv_freq = jnp.asarray(inv_freq, jnp.float32)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., T, H/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[..., None, :]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x [..., T, heads, H] by angles given as `rope_cos_sin`."""
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float, *,
         inv_freq=None) -> jax.Array:
  """Rotary position embedding (RoFormer, arXiv:2104.09864), half-split layout.

  Args:
    x: [..., T, heads, H].
    positions: [..., T] int.
    theta: frequency base (used when `inv_freq` is None).
    inv_freq: optional [H/2] inverse frequencies (see `rope_frequencies`).

  Returns:
    x rotated, same shape and dtype.
  """
  cos, sin = rope_cos_sin(positions, x.shape[-1], theta, inv_freq=inv_freq)
  return apply_rope(x, cos, sin)


class RMSNorm(nnx.Module):
  """Root-mean-square layer norm (arXiv:1910.07467), computed in f32.

  y = x / sqrt(mean(x^2) + eps) * scale, or * (1 + scale) in f32 with
  `cfg.norm_unit_offset` (Gemma; the scale then starts at zero).
  """

  def __init__(self, cfg: ModelConfig, dim: int | None = None,
               axis: str = "embed"):
    self.eps = cfg.norm_eps
    self.unit_offset = cfg.norm_unit_offset
    dim = cfg.embed_dim if dim is None else dim
    init = _zeros if self.unit_offset else _ones
    self.scale = init((dim,), (axis,), cfg)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True)
                            + self.eps)
    if self.unit_offset:
      return (y * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)
    return scale_rows(self.scale[...], y.astype(x.dtype))


class Attention(nnx.Module):
  """Grouped-query attention projections (arXiv:2305.13245).

  `sliding` marks a sliding-window layer: it uses `cfg.rope_local_theta`
  (when set) for its rotary angles; the caller applies the window mask.
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *,
               sliding: bool = False):
    d, hq, hk, h = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.cfg = cfg
    self.sliding = sliding
    self.q_proj = _param(rngs, (d, hq, h), ("embed", "heads", "head_dim"), cfg)
    self.k_proj = _param(rngs, (d, hk, h), ("embed", "kv_heads", "head_dim"),
                         cfg)
    self.v_proj = _param(rngs, (d, hk, h), ("embed", "kv_heads", "head_dim"),
                         cfg)
    self.o_proj = _param(rngs, (hq, h, d), ("heads", "head_dim", "embed"), cfg)
    if cfg.qkv_bias:
      self.q_bias = _zeros((hq, h), ("heads", "head_dim"), cfg)
      self.k_bias = _zeros((hk, h), ("kv_heads", "head_dim"), cfg)
      self.v_bias = _zeros((hk, h), ("kv_heads", "head_dim"), cfg)
    if cfg.out_bias:
      self.o_bias = _zeros((d,), ("embed",), cfg)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(cfg, h, "head_dim")
      self.k_norm = RMSNorm(cfg, h, "head_dim")

  def init_lora(self, rngs: nnx.Rngs):
    """Adds the adapters of the targeted q/k/v/o projections (B = 0)."""
    cfg = self.cfg
    d, hq, hk, h = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    io = {"q": ((d,), ("embed",), (hq, h), ("heads", "head_dim")),
          "k": ((d,), ("embed",), (hk, h), ("kv_heads", "head_dim")),
          "v": ((d,), ("embed",), (hk, h), ("kv_heads", "head_dim")),
          "o": ((hq, h), ("heads", "head_dim"), (d,), ("embed",))}
    for t, shapes in io.items():
      if cfg.lora_on(t):
        a, b = _lora_pair(rngs, *shapes, cfg)
        setattr(self, f"{t}_lora_a", a)
        setattr(self, f"{t}_lora_b", b)

  def _add_qkv_lora(self, x, q, k, v, *, fused: bool):
    """q, k, v plus the adapters' (alpha / r) (x A) B of those targeted.

    `fused` computes x A of every targeted projection in one matmul.
    """
    cfg, dt = self.cfg, self.cfg.dtype
    on = [t for t in "qkv" if cfg.lora_on(t)]
    if not on:
      return q, k, v
    if fused and len(on) > 1:
      a = jnp.concatenate([getattr(self, f"{t}_lora_a")[...] for t in on],
                          axis=1)
      xas = jnp.split(_lora_down(x, a, dt), len(on), axis=-1)
    else:
      xas = [_lora_down(x, getattr(self, f"{t}_lora_a")[...], dt) for t in on]
    out = {"q": q, "k": k, "v": v}
    for t, xa in zip(on, xas):
      out[t] = out[t] + _lora_up(xa, getattr(self, f"{t}_lora_b")[...],
                                 cfg.lora_scale, dt)
    return out["q"], out["k"], out["v"]

  def qkv(self, x: jax.Array, positions: jax.Array, *, fused: bool = False,
          rope_cs: tuple[jax.Array, jax.Array] | None = None):
    """[..., T, D] -> q [..., T, Hq, H], k, v [..., T, K, H] (rotated).

    With `fused`, the three projections run as one [D, (Hq + 2K) H] matmul
    (the decode path: one wider product instead of three narrow ones; the
    weights are concatenated in the graph, outside any decode loop).
    `rope_cs`, the `rope_angles` of `positions` computed once for all
    layer, replaces computing them here.
    """
    dt = self.cfg.dtype
    x = x.astype(dt)
    if fused:
      wq, wk, wv = self.q_proj[...], self.k_proj[...], self.v_proj[...]
      d = wq.shape[0]
      w = jnp.concatenate([wq.reshape(d, -1), wk.reshape(d, -1),
                           wv.reshape(d, -1)], axis=1).astype(dt)
      y = dense(x, w)
      split = (wq.shape[1] * wq.shape[2],
               (wq.shape[1] + wk.shape[1]) * wk.shape[2])
      q, k, v = jnp.split(y, split, axis=-1)
      q = q.reshape(*q.shape[:-1], *wq.shape[1:])
      k = k.reshape(*k.shape[:-1], *wk.shape[1:])
      v = v.reshape(*v.shape[:-1], *wv.shape[1:])
    else:
      q = dense(x, self.q_proj[...].astype(dt))
      k = dense(x, self.k_proj[...].astype(dt))
      v = dense(x, self.v_proj[...].astype(dt))
    if self.cfg.lora_rank:
      q, k, v = self._add_qkv_lora(x, q, k, v, fused=fused)
    if self.cfg.qkv_bias:
      q = add_bias(q, self.q_bias[...])
      k = add_bias(k, self.k_bias[...])
      v = add_bias(v, self.v_bias[...])
    if self.cfg.qk_norm:
      q = self.q_norm(q)
      k = self.k_norm(k)
    cos, sin = rope_cs if rope_cs is not None else self.rope_angles(positions)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

  @property
  def local_rope(self) -> bool:
    """Whether this layer uses the sliding layers' own rotary base."""
    return self.sliding and self.cfg.rope_local_theta is not None

  def rope_angles(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`rope_cos_sin` of `positions` with this layer's frequencies."""
    if self.local_rope:  # plain frequencies of the local base
      return rope_cos_sin(positions, self.cfg.head_dim,
                          self.cfg.rope_local_theta)
    scaled = self.cfg.rope_scaling not in (None, "default")
    inv_freq = rope_frequencies(self.cfg) if scaled else None
    return rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta,
                        inv_freq=inv_freq)

  @property
  def score_scale(self) -> float | None:
    """The attention score scale when it is not head_dim^-1/2, else None."""
    s = self.cfg.query_pre_attn_scalar
    return None if s is None else float(s) ** -0.5

  def out(self, o: jax.Array) -> jax.Array:
    dt = self.cfg.dtype
    w = self.o_proj[...]
    # One [M, Hq H] x [Hq H, D] matmul: contracting (heads, head_dim) as a
    # two-axis einsum makes XLA transpose o on the CPU.
    y = dense(o.astype(dt), w.astype(dt), in_dims=2)
    if self.cfg.lora_on("o"):
      y = y + _lora_up(_lora_down(o, self.o_lora_a[...], dt),
                       self.o_lora_b[...], self.cfg.lora_scale, dt)
    if self.cfg.out_bias:
      y = add_bias(y, self.o_bias[...])
    return y


class MLP(nnx.Module):
  """Gated feed-forward block: SwiGLU, or GeGLU with the tanh approximation of
  GELU (`cfg.mlp_activation`; GLU Variants Improve Transformer,
  arXiv:2002.05202)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, f = cfg.embed_dim, cfg.mlp_dim
    self.cfg = cfg
    self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), cfg)
    self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), cfg)
    self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), cfg)
    if cfg.mlp_bias:
      self.gate_bias = _zeros((f,), ("mlp",), cfg)
      self.up_bias = _zeros((f,), ("mlp",), cfg)
      self.down_bias = _zeros((d,), ("embed",), cfg)

  def init_lora(self, rngs: nnx.Rngs):
    """Adds the adapters of the targeted gate/up/down projections (B = 0)."""
    cfg = self.cfg
    d, f = cfg.embed_dim, cfg.mlp_dim
    io = {"gate": ((d,), ("embed",), (f,), ("mlp",)),
          "up": ((d,), ("embed",), (f,), ("mlp",)),
          "down": ((f,), ("mlp",), (d,), ("embed",))}
    for t, shapes in io.items():
      if cfg.lora_on(t):
        a, b = _lora_pair(rngs, *shapes, cfg)
        setattr(self, f"{t}_lora_a", a)
        setattr(self, f"{t}_lora_b", b)

  def _lora(self, t: str, x: jax.Array, xa: jax.Array | None = None):
    """(alpha / r) (x A) B of projection `t` (x A given as `xa` or computed)."""
    dt = self.cfg.dtype
    if xa is None:
      xa = _lora_down(x, getattr(self, f"{t}_lora_a")[...], dt)
    return _lora_up(xa, getattr(self, f"{t}_lora_b")[...],
                    self.cfg.lora_scale, dt)

  def __call__(self, x: jax.Array, *, fused: bool = False) -> jax.Array:
    """[..., D] -> [..., D]; `fused` runs gate and up as one [D, 2F] matmul."""
    dt = self.cfg.dtype
    x = x.astype(dt)
    cfg = self.cfg
    # bfloat16 on a CPU backend: gate and up stay f32 (`_swiglu_rounded`).
    wide = _bf16_on_cpu(x) and cfg.mlp_activation != "gelu_tanh"
    pet = jnp.float32 if wide else None
    if fused:
      w = jnp.concatenate([self.gate_proj[...], self.up_proj[...]],
                          axis=1).astype(dt)
      gate, up = jnp.split(dense(x, w, preferred_element_type=pet), 2,
                           axis=-1)
    else:
      gate = dense(x, self.gate_proj[...].astype(dt),
                   preferred_element_type=pet)
      up = dense(x, self.up_proj[...].astype(dt), preferred_element_type=pet)
    if fused and cfg.lora_on("gate") and cfg.lora_on("up"):
      a = jnp.concatenate([self.gate_lora_a[...], self.up_lora_a[...]], axis=1)
      xa_gate, xa_up = jnp.split(_lora_down(x, a, dt), 2, axis=-1)
      gate = gate + self._lora("gate", x, xa_gate)
      up = up + self._lora("up", x, xa_up)
    else:
      if cfg.lora_on("gate"):
        gate = gate + self._lora("gate", x)
      if cfg.lora_on("up"):
        up = up + self._lora("up", x)
    if self.cfg.mlp_bias:
      gate = add_bias(gate, self.gate_bias[...])
      up = add_bias(up, self.up_bias[...])
    if self.cfg.mlp_activation == "gelu_tanh":
      h = jax.nn.gelu(gate, approximate=True) * up
    elif wide:
      h = _swiglu_rounded(gate, up, dt)
    else:
      h = swiglu(gate, up)
    y = dense(h, self.down_proj[...].astype(dt))
    if cfg.lora_on("down"):
      y = y + self._lora("down", h)
    if self.cfg.mlp_bias:
      y = add_bias(y, self.down_bias[...])
    return y


class DecoderLayer(nnx.Module):
  """Pre-norm decoder block (with `cfg.post_norms`, also post-norm: Gemma)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *,
               sliding: bool = False):
    self.attn_norm = RMSNorm(cfg)
    self.attn = Attention(cfg, rngs, sliding=sliding)
    if cfg.post_norms:
      self.attn_post_norm = RMSNorm(cfg)
    self.mlp_norm = RMSNorm(cfg)
    self.mlp = MLP(cfg, rngs)
    if cfg.post_norms:
      self.mlp_post_norm = RMSNorm(cfg)

  def attn_residual(self, x, o):
    """x + the attention output o [..., Hq, H], projected (and normed)."""
    y = self.attn.out(o)
    if self.attn.cfg.post_norms:
      y = self.attn_post_norm(y)
    return x + y

  def mlp_residual(self, x, *, fused: bool = False):
    """x + the MLP of x (normed before, and with post_norms after)."""
    y = self.mlp(self.mlp_norm(x), fused=fused)
    if self.attn.cfg.post_norms:
      y = self.mlp_post_norm(y)
    return x + y

  def __call__(self, x, positions, allowed, rope_cs=None):
    """One block over a full sequence: x [B, T, D] -> (x', (k, v)).

    `allowed` [B, T, S] bool marks the keys each query sees (the caller
    narrows it to the window for a sliding-window layer). `rope_cs`, this
    layer's `rope_angles(positions)` computed by the caller, replaces
    computing them here.
    """
    q, k, v = self.attn.qkv(self.attn_norm(x), positions, rope_cs=rope_cs)
    cfg = self.attn.cfg
    o = full_attention(q, k, v, allowed, scale=self.attn.score_scale,
                       softcap=cfg.attn_logit_softcap)
    x = self.attn_residual(x, o)
    x = self.mlp_residual(x)
    return x, (k, v)

  def shared_prefix_call(self, x_MD, rope_cs, allowed_BPP, allowed_NTS):
    """One block over B prompts and their N = B G continuations at once.

    x_MD holds the B P prompt tokens, then the N T continuation tokens,
    flattened (M = B P + N T), so that the projections and the MLP run as
    one product each; `rope_cs` are their rotary angles, [M, 1, H] each.
    Attention runs twice: the prompts over themselves (`allowed_BPP`), and
    each continuation over its prompt's keys and values (continuation n
    continues prompt n // G) followed by its own (`allowed_NTS`, S = P + T).
    """
    b, p, _ = allowed_BPP.shape
    n, t, _ = allowed_NTS.shape
    g = n // b
    cfg = self.attn.cfg
    q, k, v = self.attn.qkv(self.attn_norm(x_MD), None, rope_cs=rope_cs)

    def split(y):  # [M, ...] -> [B, P, ...], [N, T, ...]
      return (y[:b * p].reshape((b, p) + y.shape[1:]),
              y[b * p:].reshape((n, t) + y.shape[1:]))

    (qp, qc), (kp, kc), (vp, vc) = split(q), split(k), split(v)
    attend = functools.partial(full_attention, scale=self.attn.score_scale,
                               softcap=cfg.attn_logit_softcap)
    op = attend(qp, kp, vp, allowed_BPP)
    oc = attend(qc, jnp.concatenate([repeat_groups(kp, g), kc], axis=1),
                jnp.concatenate([repeat_groups(vp, g), vc], axis=1),
                allowed_NTS)
    o = jnp.concatenate([op.reshape((b * p,) + op.shape[2:]),
                         oc.reshape((n * t,) + oc.shape[2:])])
    x = self.attn_residual(x_MD, o)
    return self.mlp_residual(x)


_REMAT_POLICIES = {
    "full": None,  # save nothing but the block inputs
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


def _block_fn(cfg: ModelConfig, fn=DecoderLayer.__call__):
  """`fn` (a `DecoderLayer` method), rematerialised as `cfg.remat` asks."""
  if cfg.remat == "none":
    return fn
  return nnx.remat(fn, policy=_REMAT_POLICIES[cfg.remat])


def repeat_groups(x_B: jax.Array, g: int) -> jax.Array:
  """[B, ...] -> [B G, ...]: row b repeated for rows b G .. b G + G - 1."""
  b = x_B.shape[0]
  return jnp.broadcast_to(x_B[:, None], (b, g) + x_B.shape[1:]).reshape(
      (b * g,) + x_B.shape[1:])


def _visible_keys(mask_BT: jax.Array, segment_ids_BT=None) -> jax.Array:
  """[B, T, T] bool: each query sees the valid keys at or before it (of its
  own segment with `segment_ids_BT`); a padded query still sees itself, so
  no row is fully masked (no NaN)."""
  idx = jnp.arange(mask_BT.shape[-1])
  causal = idx[None, :, None] >= idx[None, None, :]
  if segment_ids_BT is not None:
    causal = causal & (segment_ids_BT[:, :, None]
                       == segment_ids_BT[:, None, :])
  return (causal & mask_BT[:, None, :]) | (idx[:, None] == idx[None, :])


def _in_window(allowed, q_pos, k_pos, window: int) -> jax.Array:
  """`allowed` [B, T, S] narrowed to a sliding window: the window counts
  token positions (`q_pos` [B, T], `k_pos` [B, S]; a query sees itself,
  distance 0)."""
  return allowed & (q_pos[:, :, None] - k_pos[:, None, :] < window)


def _group(q: jax.Array, num_kv_heads: int) -> jax.Array:
  """[..., Hq, H] -> [..., K, Hq/K, H]."""
  *lead, hq, h = q.shape
  return q.reshape(*lead, num_kv_heads, hq // num_kv_heads, h)


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
  """cap * tanh(x / cap) (logit soft-capping, Gemma 2); x when cap is None."""
  if cap is None:
    return x
  return cap * jnp.tanh(x / cap)


def full_attention(q_BTNH, k_BSKH, v_BSKH, allowed_BTS, *,
                   scale: float | None = None,
                   softcap: float | None = None) -> jax.Array:
  """Softmax attention with GQA; `allowed_BTS` marks visible keys.

  Scores are q.k * scale (default head_dim^-1/2), soft-capped to
  softcap * tanh(s / softcap) when `softcap` is given, then masked.
  """
  b, t, n, h = q_BTNH.shape
  kh = k_BSKH.shape[-2]
  r = n // kh
  scale = h ** -0.5 if scale is None else scale
  # Both products as plain batched matmuls over (B, K): the R query heads
  # of a KV head and the T queries form one [T R, H] operand, keys and
  # values are [S, H] per head. (A [B, T, K, R, H] x [B, S, K, H] einsum
  # makes XLA transpose inside each product; explicit transposes here cost
  # one copy each and ran the block's attention about 1.4x faster on a CPU,
  # forward and backward.)
  q = _group(q_BTNH, kh).transpose(0, 2, 1, 3, 4).reshape(b, kh, t * r, h)
  if _bf16_on_cpu(q_BTNH, k_BSKH, v_BSKH):
    k, v = (_kept_transpose(x, (0, 2, 1, 3), split=1)
            for x in (k_BSKH, v_BSKH))
    o = _bf16_cpu_attention(q, k, v, allowed_BTS, scale, softcap)
    return o.reshape(b, kh, t, r, h).transpose(0, 2, 1, 3, 4).reshape(
        q_BTNH.shape)
  k = k_BSKH.transpose(0, 2, 1, 3)
  v = v_BSKH.transpose(0, 2, 1, 3)
  s = jnp.einsum("bkqh,bksh->bkqs", q, k,
                 preferred_element_type=jnp.float32) * scale
  s = _softcap(s, softcap).reshape(b, kh, t, r, -1)
  s = jnp.where(allowed_BTS[:, None, :, None, :], s, _NEG_INF)
  p = jax.nn.softmax(s, axis=-1).reshape(b, kh, t * r, -1)
  o = jnp.einsum("bkqs,bksh->bkqh", p.astype(v.dtype), v)
  return o.reshape(b, kh, t, r, h).transpose(0, 2, 1, 3, 4).reshape(
      q_BTNH.shape)


def _bkqs_mask(allowed_BTS, r: int):
  """[B, T, S] -> [B, 1, T R, S]: the mask of the grouped query rows."""
  b, t, s = allowed_BTS.shape
  return jnp.broadcast_to(allowed_BTS[:, None, :, None, :],
                          (b, 1, t, r, s)).reshape(b, 1, t * r, s)


_BATCH2 = ((0, 1), (0, 1))


def _swap_last(x_BKQS: jax.Array) -> jax.Array:
  """[B, K, Q, S] -> [B, K, S, Q], materialised (`_kept_transpose`)."""
  return _kept_transpose(x_BKQS, (0, 1, 3, 2), split=2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _bf16_cpu_attention(q_BKQH, k_BKSH, v_BKSH, allowed_BTS, scale, softcap):
  """`full_attention` of grouped bfloat16 q [B, K, T R, H], k, v [B, K, S, H]
  on a CPU backend, with every product in a form XLA:CPU runs on bfloat16
  operands (see `_bf16_cpu_dot`): q k^T and dO v^T contract the last axes
  of both, P V, dS K are plain, and P^T dO, dS^T Q multiply materialised
  transposes (as are k and v, moved head-first by the caller). Scores, softmax and its derivative are f32; P and dS are
  rounded to bfloat16 for the products, as autodiff of `full_attention`
  rounds P. The GRPO bench's bfloat16 update: 0.42 -> 0.40 s.
  """
  return _bf16_cpu_attention_fwd(q_BKQH, k_BKSH, v_BKSH, allowed_BTS, scale,
                                 softcap)[0]


def _bf16_cpu_attention_fwd(q, k, v, allowed_BTS, scale, softcap):
  f32 = jnp.float32
  r = q.shape[2] // allowed_BTS.shape[1]
  s = jax.lax.dot_general(q, k, ((3, 3), _BATCH2),
                          preferred_element_type=f32) * scale
  capped = _softcap(s, softcap)
  p = jax.nn.softmax(
      jnp.where(_bkqs_mask(allowed_BTS, r), capped, _NEG_INF), axis=-1)
  o = jax.lax.dot_general(p.astype(v.dtype), v, ((3, 2), _BATCH2),
                          preferred_element_type=f32).astype(v.dtype)
  return o, (q, k, v, allowed_BTS, p,
             capped if softcap is not None else None)


def _bf16_cpu_attention_bwd(scale, softcap, res, do):
  q, k, v, allowed_BTS, p, capped = res
  f32, dt = jnp.float32, q.dtype
  dp = jax.lax.dot_general(do, v, ((3, 3), _BATCH2),
                           preferred_element_type=f32)
  dv = jax.lax.dot_general(_swap_last(p.astype(dt)), do, ((3, 2), _BATCH2),
                           preferred_element_type=f32)
  ds = p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True))
  if softcap is not None:  # d(c tanh(x / c)) = (1 - (y / c)^2) dx
    ds = ds * (1.0 - jnp.square(capped / softcap))
  ds = (ds * scale).astype(dt)
  dq = jax.lax.dot_general(ds, k, ((3, 2), _BATCH2),
                           preferred_element_type=f32)
  dk = jax.lax.dot_general(_swap_last(ds), q, ((3, 2), _BATCH2),
                           preferred_element_type=f32)
  return dq.astype(dt), dk.astype(dt), dv.astype(dt), None


_bf16_cpu_attention.defvjp(_bf16_cpu_attention_fwd, _bf16_cpu_attention_bwd)


def grouped_decode_attention(q_BGNH, pk_BKHP, pv_BKPH, pmask_BP, k_BGKHT,
                             v_BGKTH, dmask, *, scale: float | None = None,
                             softcap: float | None = None) -> jax.Array:
  """One query per sample over shared prompt keys plus per-sample keys.

  softmax over the union of the prompt's P keys and the sample's own T decode
  slots, without concatenating them: with m the joint max,
  o = (sum_p e^{s_p - m} v_p + sum_t e^{s_t - m} v_t) / (sum_p e^{s_p - m}
  + sum_t e^{s_t - m}).

  Args:
    q_BGNH: [B, G, Hq, H] queries.
    pk_BKHP, pv_BKPH: the prompt keys/values (`KVCache.prefix_k/v` layout).
    pmask_BP: visible prompt keys, [B, P] bool, or [B, G, P] (a sliding
      window differs per sample).
    k_BGKHT, v_BGKTH: the decode slots (`KVCache.k/v` layout).
    dmask: visible decode slots, [T] (one index for all rows) or [B, G, T].
    scale: score scale (default head_dim^-1/2).
    softcap: soft-cap of the scaled scores, as in `full_attention`.

  Returns:
    [B, G, Hq, H] attention outputs, in the dtype of the values.
  """
  kh = pk_BKHP.shape[1]
  q = _group(q_BGNH, kh)  # [B, G, K, R, H]
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  f32 = jnp.float32
  # The prompt's keys are shared by the G samples. A multiply-reduce over H
  # fuses into one loop over [B, G, K, R, P] with no copies; as a dot it
  # would batch over (B, K) and transpose q and the output at every step.
  sp = jnp.sum(q[..., :, None].astype(f32)
               * pk_BKHP[:, None, :, None].astype(f32), axis=-2) * scale
  sd = jnp.einsum("bgkrh,bgkht->bgkrt", q, k_BGKHT,
                  preferred_element_type=jnp.float32) * scale
  sp, sd = _softcap(sp, softcap), _softcap(sd, softcap)
  pmask = (pmask_BP[:, None, None, None, :] if pmask_BP.ndim == 2
           else pmask_BP[:, :, None, None, :])
  sp = jnp.where(pmask, sp, _NEG_INF)
  dmask = jnp.asarray(dmask, bool)
  dmask = dmask if dmask.ndim == 1 else dmask[:, :, None, None, :]
  sd = jnp.where(dmask, sd, _NEG_INF)
  m = jnp.maximum(jnp.max(sp, axis=-1, keepdims=True),
                  jnp.max(sd, axis=-1, keepdims=True))
  ep, ed = jnp.exp(sp - m), jnp.exp(sd - m)
  z = jnp.sum(ep, axis=-1, keepdims=True) + jnp.sum(ed, axis=-1, keepdims=True)
  vt = v_BGKTH.dtype
  op = jnp.sum(ep[..., None] * pv_BKPH[:, None, :, None].astype(f32), axis=-2)
  o = (op
       + jnp.einsum("bgkrt,bgkth->bgkrh", ed.astype(vt), v_BGKTH,
                    preferred_element_type=jnp.float32)) / z
  return o.astype(vt).reshape(q_BGNH.shape)


class Transformer(nnx.Module):
  """Decoder-only language model; see the module docstring."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embedding = _param(rngs, (cfg.vocab_size, cfg.embed_dim),
                            ("vocab", "embed"), cfg)
    self.layers = nnx.List([DecoderLayer(cfg, rngs, sliding=sliding)
                            for sliding in cfg.sliding_layers])
    self.final_norm = RMSNorm(cfg)
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, (cfg.embed_dim, cfg.vocab_size),
                            ("embed", "vocab"), cfg)
    if cfg.lora_rank:  # after every base weight: their init does not change
      for layer in self.layers:
        layer.attn.init_lora(rngs)
        layer.mlp.init_lora(rngs)

  # -- pieces -----------------------------------------------------------------
  def embed(self, tokens: jax.Array) -> jax.Array:
    """Token embeddings [..., D] in `cfg.dtype` (times sqrt(D) with
    `cfg.embed_scale`, the factor rounded to the parameter dtype)."""
    w = self.embedding[...]
    x = jnp.take(w, tokens, axis=0)
    if self.cfg.embed_scale:
      x = x * jnp.asarray(math.sqrt(self.cfg.embed_dim), jnp.float32
                          ).astype(w.dtype)
    return x.astype(self.cfg.dtype)

  def output_kernel(self) -> jax.Array:
    """The [D, V] output projection (tied or separate)."""
    if self.cfg.tie_embeddings:
      return self.embedding[...].T
    return self.lm_head[...]

  def logits_from_hidden(self, h: jax.Array) -> jax.Array:
    """[..., D] final hidden states -> [..., V] f32 logits.

    With `cfg.final_logit_softcap` c the logits are c tanh((h W) / c).
    """
    w = self.output_kernel().astype(self.cfg.dtype)
    logits = dense(h.astype(self.cfg.dtype), w,
                   preferred_element_type=jnp.float32)
    return _softcap(logits, self.cfg.final_logit_softcap)

  # -- full sequence ----------------------------------------------------------
  def hidden_states(self, tokens_BT, positions_BT=None, mask_BT=None,
                    *, return_kv: bool = False, segment_ids_BT=None):
    """Final-norm hidden states [B, T, D] of a causal pass over `tokens_BT`.

    Args:
      tokens_BT: int token ids.
      positions_BT: int positions; by default counted over `mask_BT`.
      mask_BT: bool, valid tokens (False marks padding, anywhere in the row).
      return_kv: also return the per-layer (k, v), each [B, T, K, H].
      segment_ids_BT: optional int ids of packed sequences: a token attends
        only to earlier tokens of its own segment (several sequences in one
        row; give each its own positions).
    """
    b, t = tokens_BT.shape
    if mask_BT is None:
      mask_BT = jnp.ones((b, t), bool)
    mask_BT = mask_BT.astype(bool)
    idx = jnp.arange(t)
    kinds = self._rope_kinds()
    if positions_BT is None:
      positions_BT = default_positions(mask_BT)
      # Counted positions lie in [0, T): their cos/sin are rows of a table
      # of T rows, computed once per kind of layer. Computed from the
      # positions instead, XLA recomputes cos and sin inside every fusion
      # that reads them (the GRPO bench's bfloat16 update: 42 ms of 420).
      rope = {kind: tuple(c[positions_BT] for c in attn.rope_angles(idx))
              for kind, attn in kinds.items()}
    else:
      rope = {kind: attn.rope_angles(positions_BT)
              for kind, attn in kinds.items()}
    allowed = _visible_keys(mask_BT, segment_ids_BT)
    if any(self.cfg.sliding_layers):
      allowed_local = _in_window(allowed, positions_BT, positions_BT,
                                 self.cfg.sliding_window)
    x = self.embed(tokens_BT)
    block = _block_fn(self.cfg)
    kvs = []
    for layer in self.layers:
      visible = allowed_local if layer.attn.sliding else allowed
      x, kv = block(layer, x, positions_BT, visible,
                    rope[layer.attn.local_rope])
      kvs.append(kv)
    h = self.final_norm(x)
    return (h, kvs) if return_kv else h

  def continuation_hidden_states(self, prompt_BP, prompt_mask_BP, tokens_NT,
                                 mask_NT):
    """Final-norm hidden states of N = B G continuations of B prompts, with
    each prompt run through the layers once instead of once per continuation.

    Row n of `tokens_NT` continues prompt n // G. Each continuation's hidden
    states are those of a causal pass over [prompt_BP[n // G] |
    tokens_NT[n]] with `hidden_states`' default positions and masks (equal
    up to float rounding): in every layer the continuation's queries attend
    to its prompt's keys and values (broadcast to the G rows; their
    gradients summed over the G rows) and to its own tokens. GRPO-style
    groups score G completions of one prompt, so the prompt's share of the
    work is done 1/G as often. Prompt and continuation tokens go through the
    projections and the MLP together (`DecoderLayer.shared_prefix_call`).

    Args:
      prompt_BP: int prompt ids, padded on either side.
      prompt_mask_BP: bool valid prompt tokens; every row needs at least one.
      tokens_NT: int continuation ids, N a multiple of B.
      mask_NT: bool valid continuation tokens.

    Returns:
      (h_last_BD: hidden state of each prompt's last valid token,
       h_NTD: hidden states of the continuation tokens).
    """
    b, p = prompt_BP.shape
    n, t = tokens_NT.shape
    if n % b:
      raise ValueError(f"{n} continuations do not split into groups of the "
                       f"{b} prompts; give each prompt the same number of "
                       "rows.")
    g = n // b
    cfg = self.cfg
    pmask = prompt_mask_BP.astype(bool)
    last = p - 1 - jnp.argmax(pmask[:, ::-1], axis=-1)
    if t == 0:
      h_p = self.hidden_states(prompt_BP, None, pmask)
      h_last = jnp.take_along_axis(h_p, last[:, None, None], axis=1)[:, 0]
      return h_last, jnp.zeros((n, 0, h_p.shape[-1]), h_p.dtype)
    mask = mask_NT.astype(bool)
    pos_p = default_positions(pmask)
    plen = repeat_groups(jnp.sum(pmask, axis=-1).astype(jnp.int32), g)
    # The positions `hidden_states` counts over [prompt | continuation].
    pos_c = jnp.maximum(
        plen[:, None] + jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)
    flat_pos = jnp.concatenate([pos_p.reshape(-1), pos_c.reshape(-1)])
    idx = jnp.arange(p + t)  # every position lies in [0, P + T)
    rope = {kind: tuple(c[flat_pos] for c in attn.rope_angles(idx))
            for kind, attn in self._rope_kinds().items()}
    # As in `hidden_states`; a continuation sees all of its prompt's valid
    # tokens, then its own as a causal sequence.
    allowed_p = _visible_keys(pmask)
    allowed_c = jnp.concatenate(
        [jnp.broadcast_to(repeat_groups(pmask, g)[:, None, :], (n, t, p)),
         _visible_keys(mask)], axis=-1)
    if any(cfg.sliding_layers):
      w = cfg.sliding_window
      local_p = _in_window(allowed_p, pos_p, pos_p, w)
      key_pos = jnp.concatenate([repeat_groups(pos_p, g), pos_c], axis=-1)
      local_c = _in_window(allowed_c, pos_c, key_pos, w)
    d = cfg.embed_dim
    x = jnp.concatenate([self.embed(prompt_BP).reshape(b * p, d),
                         self.embed(tokens_NT).reshape(n * t, d)])
    block = _block_fn(cfg, DecoderLayer.shared_prefix_call)
    for layer in self.layers:
      sliding = layer.attn.sliding
      x = block(layer, x, rope[layer.attn.local_rope],
                local_p if sliding else allowed_p,
                local_c if sliding else allowed_c)
    h = self.final_norm(x)
    h_p = h[:b * p].reshape(b, p, d)
    h_last = jnp.take_along_axis(h_p, last[:, None, None], axis=1)[:, 0]
    return h_last, h[b * p:].reshape(n, t, d)

  def _rope_kinds(self) -> dict:
    """{`Attention.local_rope`: one layer's attention} per kind of rotary
    frequencies among the layers (their `rope_angles` are shared)."""
    kinds = {}
    for layer in self.layers:
      kinds.setdefault(layer.attn.local_rope, layer.attn)
    return kinds

  def __call__(self, tokens_BT, positions_BT=None, mask_BT=None) -> jax.Array:
    """Returns f32 logits [B, T, V]; see `hidden_states` for the arguments."""
    return self.logits_from_hidden(
        self.hidden_states(tokens_BT, positions_BT, mask_BT))

  # -- incremental decoding ---------------------------------------------------
  resize_decode_cache = staticmethod(resize_decode_cache)

  def prefill(self, prompt_BP, prompt_mask_BP, *, num_samples: int,
              max_new_tokens: int):
    """Runs each prompt once and allocates the decode cache for G samples.

    Args:
      prompt_BP: int prompt ids, padded on either side.
      prompt_mask_BP: bool, valid prompt tokens; every row needs at least one.
      num_samples: G, samples to be decoded per prompt.
      max_new_tokens: T, capacity of the per-sample cache.

    Returns:
      (last_logits_BV f32 logits of each prompt's last valid token,
       cache KVCache, prompt_len_B int32 number of valid prompt tokens).
    """
    cfg = self.cfg
    b, p = prompt_BP.shape
    mask = prompt_mask_BP.astype(bool)
    h, kvs = self.hidden_states(prompt_BP, None, mask, return_kv=True)
    last = p - 1 - jnp.argmax(mask[:, ::-1], axis=-1)
    h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
    kh, hd, t = cfg.num_kv_heads, cfg.head_dim, max_new_tokens
    prefix = [prefix_cache_from_kv(k, v) for k, v in kvs]
    cache = KVCache(
        prefix_k=tuple(k for k, _ in prefix),
        prefix_v=tuple(v for _, v in prefix), prefix_mask=mask,
        k=tuple(jnp.zeros((b, num_samples, kh, hd, t), cfg.dtype)
                for _ in kvs),
        v=tuple(jnp.zeros((b, num_samples, kh, t, hd), cfg.dtype)
                for _ in kvs))
    prompt_len = jnp.sum(mask, axis=-1).astype(jnp.int32)
    return self.logits_from_hidden(h_last), cache, prompt_len

  def decode_step(self, tokens_BG, positions_BG, cache: KVCache, index):
    """Feeds one token per sample and returns the next-token logits.

    Args:
      tokens_BG: int, the token each sample feeds now.
      positions_BG: int, its position (prompt length + index).
      cache: from `prefill` or a previous step.
      index: the decode-cache slot written now: an int scalar shared by every
        row (0 for the first token; the write is an in-place slice update), or
        an int [B, G] array of per-row slots (rows continue from different
        lengths, e.g. partial rollouts). Each row attends to its slots
        <= its index.

    A sliding-window layer also drops keys at token positions <= the
    query's position - W: prompt keys at the positions counted over
    `cache.prefix_mask`, and slot s at position prompt length + s (the
    position `generate` and partial rollouts write it at).

    Returns:
      (logits_BGV f32, updated cache).
    """
    cfg = self.cfg
    x = self.embed(tokens_BG)
    t = decode_cache_length(cache)
    index = jnp.asarray(index, jnp.int32)
    slots = jnp.arange(t)
    per_row = index.ndim > 0
    dmask = slots <= (index[..., None] if per_row else index)
    # The rotary angles of this step, once for all layers (once per kind when
    # sliding layers have their own base); the barrier keeps XLA from
    # recomputing cos/sin inside every fusion that reads them.
    kinds = self._rope_kinds()
    angles = jax.lax.optimization_barrier(
        {kind: attn.rope_angles(positions_BG) for kind, attn in kinds.items()})
    pmask, pmask_local = cache.prefix_mask, None
    if any(cfg.sliding_layers):
      # Sliding layers see keys at token positions > query position - W: the
      # prompt's at their counted positions, slot s at prompt length + s.
      w = cfg.sliding_window
      pos_q = positions_BG[..., None]
      prefix_pos = default_positions(cache.prefix_mask)[:, None, :]
      pmask_local = cache.prefix_mask[:, None, :] & (pos_q - prefix_pos < w)
      prompt_len = jnp.sum(cache.prefix_mask, axis=-1).astype(jnp.int32)
      slot_pos = prompt_len[:, None, None] + slots
      dmask_local = dmask & (pos_q - slot_pos < w)
    new_k, new_v = [], []
    for i, layer in enumerate(self.layers):
      q, k, v = layer.attn.qkv(layer.attn_norm(x), positions_BG, fused=True,
                               rope_cs=angles[layer.attn.local_rope])
      k, v = k.astype(cache.k[i].dtype), v.astype(cache.v[i].dtype)
      if per_row:  # one scatter per array: each row writes its own slot
        b, g = index.shape
        bi, gi = jnp.arange(b)[:, None], jnp.arange(g)[None, :]
        ck = _store_bits(lambda c, u: c.at[bi, gi, :, :, index].set(
            u, mode="drop"), cache.k[i], k)
        cv = _store_bits(lambda c, u: c.at[bi, gi, :, index, :].set(
            u, mode="drop"), cache.v[i], v)
      else:
        ck = _store_bits(lambda c, u: jax.lax.dynamic_update_slice_in_dim(
            c, u[..., None], index, axis=4), cache.k[i], k)
        cv = _store_bits(lambda c, u: jax.lax.dynamic_update_slice_in_dim(
            c, u[:, :, :, None, :], index, axis=3), cache.v[i], v)
      new_k.append(ck)
      new_v.append(cv)
      sliding = layer.attn.sliding
      o = grouped_decode_attention(
          q, cache.prefix_k[i], cache.prefix_v[i],
          pmask_local if sliding else pmask, ck, cv,
          dmask_local if sliding else dmask, scale=layer.attn.score_scale,
          softcap=cfg.attn_logit_softcap)
      x = layer.attn_residual(x, o)
      x = layer.mlp_residual(x, fused=True)
    logits = self.logits_from_hidden(self.final_norm(x))
    return logits, cache._replace(k=tuple(new_k), v=tuple(new_v))


def _store_bits(write, cache: jax.Array, new: jax.Array) -> jax.Array:
  """`write(cache, new)` (a slot update of the KV cache); 16-bit floats are
  written as their uint16 bits. XLA:CPU runs a bfloat16 dynamic-update-slice
  or scatter on an f32 copy of the whole cache (convert, update, convert
  back) instead of in place: the GRPO bench's bfloat16 decoding spent 95 us
  per layer and step on it, against 10 us in f32. A bit copy stores the
  same values."""
  if not _low_precision(cache.dtype):
    return write(cache, new)
  bits = jax.lax.bitcast_convert_type
  return bits(write(bits(cache, jnp.uint16), bits(new, jnp.uint16)),
              cache.dtype)


def abstract_model(cfg: ModelConfig, *, copy: bool = True):
  """(graph, parameter state of `jax.ShapeDtypeStruct`s) of a `Transformer`.

  Nothing is allocated. The model's initialisation is traced once per config
  and process (a `ModelConfig` is a frozen dataclass); with `copy` each call
  returns a fresh copy of the state, which the caller may change (without,
  the shared one: read it only).
  """
  try:
    graphdef, state = _abstract_model_cached(cfg)
  except TypeError:  # a config holding an unhashable value: trace it again
    graphdef, state = _trace_abstract_model(cfg)
  return graphdef, (jax.tree.map(lambda x: x, state) if copy else state)


def _trace_abstract_model(cfg: ModelConfig):
  return nnx.split(nnx.eval_shape(lambda: Transformer(cfg,
                                                       rngs=nnx.Rngs(0))))


_abstract_model_cached = functools.lru_cache(maxsize=32)(
    _trace_abstract_model)


def logical_axes(state) -> object:
  """The pytree of logical axis-name tuples matching an NNX param state."""
  return jax.tree.map(lambda v: v.get_metadata().get("logical_axes"), state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))
