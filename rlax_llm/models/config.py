"""Decoder model configurations (Llama / Qwen2 family) and the named presets."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import jax.numpy as jnp


ROPE_SCALINGS = (None, "default", "linear", "llama3")
REMAT_POLICIES = ("none", "full", "dots_saveable")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a decoder-only transformer.

  Attributes:
    vocab_size: V, number of token ids.
    num_layers: number of decoder blocks.
    embed_dim: D, width of the residual stream.
    num_heads: query heads.
    num_kv_heads: key/value heads (grouped-query attention); must divide
      `num_heads`.
    head_dim: width of one head.
    mlp_dim: hidden width of the SwiGLU MLP.
    max_seq_len: the context: the longest prompt + completion the model takes.
    rope_theta: base of the rotary embedding frequencies.
    norm_eps: epsilon of RMSNorm.
    qkv_bias: add a bias to the q, k, v projections (Qwen2 does).
    tie_embeddings: reuse the token embedding as the output layer.
    dtype: compute dtype of activations (log-probs are always f32); a jnp
      dtype or its name ("float32", "bfloat16").
    param_dtype: storage dtype of parameters; a jnp dtype or its name.
    init_std: standard deviation of the normal initialiser.
    qk_norm: RMSNorm over the head dimension of each query and key head,
      after the projection and before the rotary embedding (Qwen3).
    out_bias: add a bias to the attention output projection (Llama's and
      Qwen3's `attention_bias` also sets this).
    mlp_bias: add biases to the three MLP projections (Llama's `mlp_bias`).
    rope_scaling: None or "default" for plain rotary frequencies, "linear"
      (all frequencies divided by `rope_factor`) or "llama3" (Llama 3.1's
      wavelength-dependent rescaling).
    rope_factor: the scaling factor of "linear" and "llama3".
    rope_low_freq_factor: "llama3": wavelengths above
      `rope_original_max_len / rope_low_freq_factor` are divided by the factor.
    rope_high_freq_factor: "llama3": wavelengths below
      `rope_original_max_len / rope_high_freq_factor` are kept; those between
      the two bounds are interpolated.
    rope_original_max_len: "llama3": the context the model was pre-trained on.
    remat: rematerialisation of each decoder block in the backward pass:
      "none" (keep every activation), "full" (keep only the block inputs) or
      "dots_saveable" (keep the matmul outputs, recompute the elementwise
      ops).
  """

  vocab_size: int
  num_layers: int = 2
  embed_dim: int = 128
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 32
  mlp_dim: int = 384
  max_seq_len: int = 64
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  qkv_bias: bool = False
  tie_embeddings: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  init_std: float = 0.02
  qk_norm: bool = False
  out_bias: bool = False
  mlp_bias: bool = False
  rope_scaling: str | None = None
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  remat: str = "none"

  def __post_init__(self):
    for name in ("dtype", "param_dtype"):
      value = getattr(self, name)
      if isinstance(value, str):
        try:
          value = jnp.dtype(value).type
        except TypeError:
          raise ValueError(f"ModelConfig.{name}={value!r} is not a dtype name; "
                           "use e.g. 'float32' or 'bfloat16'.") from None
        object.__setattr__(self, name, value)
    positive = ("vocab_size", "num_layers", "embed_dim", "num_heads",
                "num_kv_heads", "head_dim", "mlp_dim", "max_seq_len")
    for name in positive:
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"ModelConfig.{name} must be positive, got "
                         f"{getattr(self, name)}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"ModelConfig.num_heads={self.num_heads} is not a multiple of "
          f"num_kv_heads={self.num_kv_heads}; grouped-query attention needs "
          "each key/value head to serve the same number of query heads.")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even "
                       "for rotary embeddings.")
    if self.rope_scaling not in ROPE_SCALINGS:
      raise ValueError(f"ModelConfig.rope_scaling={self.rope_scaling!r} is not "
                       f"supported; use one of {ROPE_SCALINGS}.")
    if self.rope_scaling in ("linear", "llama3") and self.rope_factor <= 0:
      raise ValueError(f"ModelConfig.rope_factor={self.rope_factor} must be "
                       "positive.")
    if (self.rope_scaling == "llama3"
        and self.rope_high_freq_factor <= self.rope_low_freq_factor):
      raise ValueError(
          f"ModelConfig.rope_high_freq_factor={self.rope_high_freq_factor} "
          f"must exceed rope_low_freq_factor={self.rope_low_freq_factor} for "
          "llama3 rope scaling.")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"ModelConfig.remat={self.remat!r} is not supported; "
                       f"use one of {REMAT_POLICIES}.")

  @property
  def num_params(self) -> int:
    """Number of parameters (embedding counted once when tied)."""
    d, h = self.embed_dim, self.head_dim
    attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
    if self.qkv_bias:
      attn += h * (self.num_heads + 2 * self.num_kv_heads)
    if self.out_bias:
      attn += d
    if self.qk_norm:
      attn += 2 * h
    mlp = 3 * d * self.mlp_dim
    if self.mlp_bias:
      mlp += 2 * self.mlp_dim + d
    layer = attn + mlp + 2 * d
    emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return self.num_layers * layer + emb + d


# Presets leave the vocabulary to the task's tokenizer.
PRESETS: dict[str, dict[str, Any]] = {
    # The CPU default: trains from scratch in minutes on 2 cores.
    "tiny": dict(num_layers=2, embed_dim=128, num_heads=4, num_kv_heads=2,
                 head_dim=32, mlp_dim=384, max_seq_len=64),
    # A bigger CPU/GPU model for longer experiments (~9M parameters + embedding).
    "small": dict(num_layers=6, embed_dim=384, num_heads=6, num_kv_heads=2,
                  head_dim=64, mlp_dim=1024, max_seq_len=256),
    # Qwen2.5-0.5B's shape (use with a real tokenizer's vocabulary).
    "qwen2_5_0_5b": dict(num_layers=24, embed_dim=896, num_heads=14,
                         num_kv_heads=2, head_dim=64, mlp_dim=4864,
                         max_seq_len=32768, rope_theta=1_000_000.0,
                         qkv_bias=True, tie_embeddings=True),
}


def get_model_config(name: str, *, vocab_size: int, **overrides) -> ModelConfig:
  """Returns the preset `name` ("tiny", "small", ...) with overrides applied.

  Args:
    name: a key of `PRESETS`.
    vocab_size: the tokenizer's vocabulary size.
    **overrides: ModelConfig fields that replace the preset's.

  Raises:
    ValueError: for an unknown preset or field, naming close matches.
  """
  if name not in PRESETS:
    close = difflib.get_close_matches(name, PRESETS, n=3)
    raise ValueError(f"Unknown model preset {name!r}"
                     + (f"; did you mean {close}?" if close else "")
                     + f" Known presets: {sorted(PRESETS)}.")
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  for key in overrides:
    if key not in fields:
      close = difflib.get_close_matches(key, fields, n=3)
      raise ValueError(f"Unknown model field {key!r}"
                       + (f"; did you mean {close}?" if close else "") + ".")
  kwargs = dict(PRESETS[name])
  kwargs.update(overrides)
  return ModelConfig(vocab_size=vocab_size, **kwargs)
