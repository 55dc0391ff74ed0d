"""A Flax NNX decoder of the Llama / Qwen2 family, with a group-shared KV cache.

Architecture: token embedding -> L x [RMSNorm -> grouped-query attention with
rotary embeddings (optional q/k/v and output biases, optional per-head q/k
RMSNorm as in Qwen3, optional "linear"/"llama3" frequency scaling) -> residual
-> RMSNorm -> SwiGLU MLP (optional biases) -> residual] -> RMSNorm -> output
layer (tied to the embedding or separate). Checkpoints of the Qwen2/Qwen2.5,
Qwen3 and Llama 3 families load into it through `rlax_llm.models.hf`.

Numerics: parameters are stored in `cfg.param_dtype`, activations computed in
`cfg.dtype`; norms, softmax and the rotary embedding run in f32, and logits are
always f32. `cfg.remat` rematerialises each decoder block in the backward pass.

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
    prefill and no copy of the prompt cache.

Every parameter carries `logical_axes` metadata (names such as "embed", "mlp",
"heads", "vocab") that `rlax_llm.parallel` maps onto mesh axes.
"""

from __future__ import annotations

from typing import NamedTuple

import math

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


def _ones(shape, axes, cfg: ModelConfig):
  return nnx.Param(jnp.ones(shape, cfg.param_dtype), logical_axes=axes)


def _zeros(shape, axes, cfg: ModelConfig):
  return nnx.Param(jnp.zeros(shape, cfg.param_dtype), logical_axes=axes)


class KVCache(NamedTuple):
  """Keys and values for decoding G samples per prompt.

  Attributes:
    prefix_k: per layer [B, P, K, H], the prompt keys (once per prompt).
    prefix_v: per layer [B, P, K, H].
    prefix_mask: [B, P] bool, valid prompt positions.
    k: per layer [B, G, T, K, H], keys of generated tokens.
    v: per layer [B, G, T, K, H].
  """
  prefix_k: tuple[jax.Array, ...]
  prefix_v: tuple[jax.Array, ...]
  prefix_mask: jax.Array
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]


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
  h = x.shape[-1]
  if inv_freq is None:
    inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  inv_freq = jnp.asarray(inv_freq, jnp.float32)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., T, H/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[..., None, :]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


class RMSNorm(nnx.Module):
  """Root-mean-square layer norm (arXiv:1910.07467), computed in f32."""

  def __init__(self, cfg: ModelConfig, dim: int | None = None,
               axis: str = "embed"):
    self.eps = cfg.norm_eps
    dim = cfg.embed_dim if dim is None else dim
    self.scale = _ones((dim,), (axis,), cfg)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True)
                            + self.eps)
    return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


class Attention(nnx.Module):
  """Grouped-query attention projections (arXiv:2305.13245)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, hq, hk, h = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.cfg = cfg
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

  def qkv(self, x: jax.Array, positions: jax.Array):
    """[..., T, D] -> q [..., T, Hq, H], k, v [..., T, K, H] (rotated)."""
    dt = self.cfg.dtype
    x = x.astype(dt)
    q = jnp.einsum("...d,dnh->...nh", x, self.q_proj[...].astype(dt))
    k = jnp.einsum("...d,dnh->...nh", x, self.k_proj[...].astype(dt))
    v = jnp.einsum("...d,dnh->...nh", x, self.v_proj[...].astype(dt))
    if self.cfg.qkv_bias:
      q = q + self.q_bias[...].astype(dt)
      k = k + self.k_bias[...].astype(dt)
      v = v + self.v_bias[...].astype(dt)
    if self.cfg.qk_norm:
      q = self.q_norm(q)
      k = self.k_norm(k)
    scaled = self.cfg.rope_scaling not in (None, "default")
    inv_freq = rope_frequencies(self.cfg) if scaled else None
    q = rope(q, positions, self.cfg.rope_theta, inv_freq=inv_freq)
    k = rope(k, positions, self.cfg.rope_theta, inv_freq=inv_freq)
    return q, k, v

  def out(self, o: jax.Array) -> jax.Array:
    dt = self.cfg.dtype
    y = jnp.einsum("...nh,nhd->...d", o.astype(dt),
                   self.o_proj[...].astype(dt))
    if self.cfg.out_bias:
      y = y + self.o_bias[...].astype(dt)
    return y


class MLP(nnx.Module):
  """SwiGLU feed-forward block (arXiv:2002.05202)."""

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

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.cfg.dtype
    x = x.astype(dt)
    gate = x @ self.gate_proj[...].astype(dt)
    up = x @ self.up_proj[...].astype(dt)
    if self.cfg.mlp_bias:
      gate = gate + self.gate_bias[...].astype(dt)
      up = up + self.up_bias[...].astype(dt)
    y = (jax.nn.silu(gate) * up) @ self.down_proj[...].astype(dt)
    if self.cfg.mlp_bias:
      y = y + self.down_bias[...].astype(dt)
    return y


class DecoderLayer(nnx.Module):
  """Pre-norm decoder block."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, positions, allowed):
    """One block over a full sequence: x [B, T, D] -> (x', (k, v))."""
    q, k, v = self.attn.qkv(self.attn_norm(x), positions)
    x = x + self.attn.out(full_attention(q, k, v, allowed))
    x = x + self.mlp(self.mlp_norm(x))
    return x, (k, v)


_REMAT_POLICIES = {
    "full": None,  # save nothing but the block inputs
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


def _block_fn(cfg: ModelConfig):
  """`DecoderLayer.__call__`, rematerialised as `cfg.remat` asks."""
  if cfg.remat == "none":
    return DecoderLayer.__call__
  return nnx.remat(DecoderLayer.__call__, policy=_REMAT_POLICIES[cfg.remat])


def _group(q: jax.Array, num_kv_heads: int) -> jax.Array:
  """[..., Hq, H] -> [..., K, Hq/K, H]."""
  *lead, hq, h = q.shape
  return q.reshape(*lead, num_kv_heads, hq // num_kv_heads, h)


def full_attention(q_BTNH, k_BSKH, v_BSKH, allowed_BTS) -> jax.Array:
  """Softmax attention with GQA; `allowed_BTS` marks visible keys."""
  kh = k_BSKH.shape[-2]
  q = _group(q_BTNH, kh)
  scale = q.shape[-1] ** -0.5
  s = jnp.einsum("btkrh,bskh->bkrts", q, k_BSKH,
                 preferred_element_type=jnp.float32) * scale
  s = jnp.where(allowed_BTS[:, None, None], s, _NEG_INF)
  p = jax.nn.softmax(s, axis=-1)
  o = jnp.einsum("bkrts,bskh->btkrh", p.astype(v_BSKH.dtype), v_BSKH)
  return o.reshape(q_BTNH.shape)


def grouped_decode_attention(q_BGNH, pk_BPKH, pv_BPKH, pmask_BP, k_BGTKH,
                             v_BGTKH, dmask_T) -> jax.Array:
  """One query per sample over shared prompt keys plus per-sample keys."""
  kh = pk_BPKH.shape[-2]
  q = _group(q_BGNH, kh)
  scale = q.shape[-1] ** -0.5
  sp = jnp.einsum("bgkrh,bpkh->bgkrp", q, pk_BPKH,
                  preferred_element_type=jnp.float32) * scale
  sd = jnp.einsum("bgkrh,bgtkh->bgkrt", q, k_BGTKH,
                  preferred_element_type=jnp.float32) * scale
  sp = jnp.where(pmask_BP[:, None, None, None, :], sp, _NEG_INF)
  sd = jnp.where(dmask_T, sd, _NEG_INF)
  p = jax.nn.softmax(jnp.concatenate([sp, sd], axis=-1), axis=-1)
  pp, pd = p[..., :sp.shape[-1]], p[..., sp.shape[-1]:]
  o = (jnp.einsum("bgkrp,bpkh->bgkrh", pp.astype(pv_BPKH.dtype), pv_BPKH)
       + jnp.einsum("bgkrt,bgtkh->bgkrh", pd.astype(v_BGTKH.dtype), v_BGTKH))
  return o.reshape(q_BGNH.shape)


class Transformer(nnx.Module):
  """Decoder-only language model; see the module docstring."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embedding = _param(rngs, (cfg.vocab_size, cfg.embed_dim),
                            ("vocab", "embed"), cfg)
    self.layers = nnx.List([DecoderLayer(cfg, rngs)
                            for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg)
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, (cfg.embed_dim, cfg.vocab_size),
                            ("embed", "vocab"), cfg)

  # -- pieces -----------------------------------------------------------------
  def embed(self, tokens: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], tokens, axis=0).astype(self.cfg.dtype)

  def output_kernel(self) -> jax.Array:
    """The [D, V] output projection (tied or separate)."""
    if self.cfg.tie_embeddings:
      return self.embedding[...].T
    return self.lm_head[...]

  def logits_from_hidden(self, h: jax.Array) -> jax.Array:
    """[..., D] final hidden states -> [..., V] f32 logits."""
    w = self.output_kernel().astype(self.cfg.dtype)
    return jnp.einsum("...d,dv->...v", h.astype(self.cfg.dtype), w,
                      preferred_element_type=jnp.float32)

  # -- full sequence ----------------------------------------------------------
  def hidden_states(self, tokens_BT, positions_BT=None, mask_BT=None,
                    *, return_kv: bool = False):
    """Final-norm hidden states [B, T, D] of a causal pass over `tokens_BT`.

    Args:
      tokens_BT: int token ids.
      positions_BT: int positions; by default counted over `mask_BT`.
      mask_BT: bool, valid tokens (False marks padding, anywhere in the row).
      return_kv: also return the per-layer (k, v), each [B, T, K, H].
    """
    b, t = tokens_BT.shape
    if mask_BT is None:
      mask_BT = jnp.ones((b, t), bool)
    mask_BT = mask_BT.astype(bool)
    if positions_BT is None:
      positions_BT = default_positions(mask_BT)
    idx = jnp.arange(t)
    causal = idx[None, :, None] >= idx[None, None, :]
    # A padded query still sees itself, so no row is fully masked (no NaN).
    allowed = (causal & mask_BT[:, None, :]) | (idx[:, None] == idx[None, :])
    x = self.embed(tokens_BT)
    block = _block_fn(self.cfg)
    kvs = []
    for layer in self.layers:
      x, kv = block(layer, x, positions_BT, allowed)
      kvs.append(kv)
    h = self.final_norm(x)
    return (h, kvs) if return_kv else h

  def __call__(self, tokens_BT, positions_BT=None, mask_BT=None) -> jax.Array:
    """Returns f32 logits [B, T, V]; see `hidden_states` for the arguments."""
    return self.logits_from_hidden(
        self.hidden_states(tokens_BT, positions_BT, mask_BT))

  # -- incremental decoding ---------------------------------------------------
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
    shape = (b, num_samples, max_new_tokens, cfg.num_kv_heads, cfg.head_dim)
    zeros = tuple(jnp.zeros(shape, cfg.dtype) for _ in kvs)
    cache = KVCache(prefix_k=tuple(k for k, _ in kvs),
                    prefix_v=tuple(v for _, v in kvs),
                    prefix_mask=mask, k=zeros, v=zeros)
    prompt_len = jnp.sum(mask, axis=-1).astype(jnp.int32)
    return self.logits_from_hidden(h_last), cache, prompt_len

  def decode_step(self, tokens_BG, positions_BG, cache: KVCache, index):
    """Feeds one token per sample and returns the next-token logits.

    Args:
      tokens_BG: int, the token each sample feeds now.
      positions_BG: int, its position (prompt length + index).
      cache: from `prefill` or a previous step.
      index: int scalar, the slot in the decode cache (0 for the first token).

    Returns:
      (logits_BGV f32, updated cache).
    """
    x = self.embed(tokens_BG)
    t = cache.k[0].shape[2]
    dmask = jnp.arange(t) <= index
    new_k, new_v = [], []
    for i, layer in enumerate(self.layers):
      q, k, v = layer.attn.qkv(layer.attn_norm(x)[:, :, None],
                               positions_BG[:, :, None])
      ck = jax.lax.dynamic_update_slice_in_dim(cache.k[i], k, index, axis=2)
      cv = jax.lax.dynamic_update_slice_in_dim(cache.v[i], v, index, axis=2)
      new_k.append(ck)
      new_v.append(cv)
      o = grouped_decode_attention(q[:, :, 0], cache.prefix_k[i],
                                   cache.prefix_v[i], cache.prefix_mask,
                                   ck, cv, dmask)
      x = x + layer.attn.out(o)
      x = x + layer.mlp(layer.mlp_norm(x))
    logits = self.logits_from_hidden(self.final_norm(x))
    return logits, cache._replace(k=tuple(new_k), v=tuple(new_v))


def logical_axes(state) -> object:
  """The pytree of logical axis-name tuples matching an NNX param state."""
  return jax.tree.map(lambda v: v.get_metadata().get("logical_axes"), state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))
