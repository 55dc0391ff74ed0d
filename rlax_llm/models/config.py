"""Decoder model configurations (Llama / Qwen / Gemma families) and presets."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import jax.numpy as jnp


ROPE_SCALINGS = (None, "default", "linear", "llama3")
REMAT_POLICIES = ("none", "full", "dots_saveable")
MLP_ACTIVATIONS = ("silu", "gelu_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")
# Projections that can carry low-rank adapters: attention q/k/v/o, MLP
# gate/up/down.
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


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
    mlp_dim: hidden width of the gated (SwiGLU or GeGLU) MLP.
    max_seq_len: the context: the longest prompt + completion the model takes.
    rope_theta: base of the rotary embedding frequencies.
    norm_eps: epsilon of RMSNorm.
    qkv_bias: add a bias to the q, k, v projections (Qwen2 does).
    tie_embeddings: reuse the token embedding as the output layer.
    dtype: compute dtype of activations (log-probs are always f32); a jnp
      dtype or its name ("float32", "bfloat16"). Products accumulate in f32
      and are rounded to `dtype`, except that on a CPU backend a bfloat16
      SwiGLU MLP rounds silu(gate) * up once rather than gate and up first
      (`transformer._swiglu_rounded`: one pass instead of five).
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
    norm_unit_offset: every RMSNorm multiplies by (1 + scale), with the scale
      initialised to zero, and takes the product in f32 before casting
      (Gemma); otherwise by scale, initialised to one.
    post_norms: an RMSNorm on the attention output and on the MLP output of
      each block, before they are added to the residual stream (Gemma 2/3).
    embed_scale: multiply the token embeddings by sqrt(embed_dim) (rounded
      to `param_dtype`), not the output layer (Gemma).
    mlp_activation: the gate activation of the gated MLP: "silu" (SwiGLU) or
      "gelu_tanh" (GeGLU with the tanh approximation of GELU, Gemma).
    query_pre_attn_scalar: attention scores are scaled by
      query_pre_attn_scalar^-1/2 instead of head_dim^-1/2 (Gemma).
    attn_logit_softcap: c > 0 caps the scaled attention scores to
      c tanh(s / c) before masking and softmax (Gemma 2); None leaves them.
    final_logit_softcap: c > 0 caps the output logits to c tanh(z / c)
      (Gemma 2); None leaves them. `Transformer.logits_from_hidden` applies
      it, so log-probs computed from hidden states and `output_kernel`
      directly must apply it too.
    sliding_window: W, the keys a sliding-window layer sees: those with
      query position - key position < W (the query and W - 1 before it).
    layer_types: per layer "full_attention" or "sliding_attention"; empty
      means all full, unless `sliding_window_pattern` is set.
    sliding_window_pattern: n > 0 with empty `layer_types`: every n-th layer
      (layers n-1, 2n-1, ...) is full, the others sliding (Gemma 2: 2,
      Gemma 3: 6).
    rope_local_theta: rotary base of the sliding-window layers, which then
      use no rope scaling (Gemma 3's local base frequency); None: sliding
      layers use the same rotary frequencies as full layers.
    lora_rank: r > 0 adds low-rank adapters (LoRA, arXiv:2106.09685) to the
      projections named in `lora_targets`: y = x W + (alpha / r) (x A) B,
      A [in, r] normal with std `init_std`, B [r, out] zero, so a fresh
      adapter model computes exactly the base model; 0 (the default) adds
      none and leaves the computation unchanged. See `rlax_llm.models.lora`.
    lora_alpha: alpha of the adapter scale alpha / r.
    lora_targets: the projections that get adapters, a subset of
      `LORA_TARGETS` ("q", "k", "v", "o", "gate", "up", "down").
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
  norm_unit_offset: bool = False
  post_norms: bool = False
  embed_scale: bool = False
  mlp_activation: str = "silu"
  query_pre_attn_scalar: float | None = None
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  sliding_window: int | None = None
  layer_types: tuple[str, ...] = ()
  sliding_window_pattern: int = 0
  rope_local_theta: float | None = None
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = LORA_TARGETS

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
    self._check_gemma_fields()
    self._check_lora_fields()

  def _check_lora_fields(self):
    rank = self.lora_rank
    if isinstance(rank, bool) or int(rank) != rank or rank < 0:
      raise ValueError(f"ModelConfig.lora_rank={rank!r} must be an integer "
                       ">= 0 (0 disables the adapters).")
    object.__setattr__(self, "lora_rank", int(rank))
    if not float(self.lora_alpha) > 0:
      raise ValueError(f"ModelConfig.lora_alpha={self.lora_alpha!r} must be "
                       "positive (the adapter scale is lora_alpha / "
                       "lora_rank).")
    targets = self.lora_targets
    if isinstance(targets, str) or not all(
        isinstance(t, str) for t in targets):
      raise ValueError(f"ModelConfig.lora_targets={targets!r} must be a "
                       f"sequence of projection names from {LORA_TARGETS}, "
                       "e.g. ('q', 'v').")
    targets = tuple(targets)
    bad = [t for t in targets if t not in LORA_TARGETS]
    if bad:
      raise ValueError(f"ModelConfig.lora_targets names unknown projections "
                       f"{bad}; choose from {LORA_TARGETS}.")
    if len(set(targets)) != len(targets):
      raise ValueError(f"ModelConfig.lora_targets={targets} repeats a "
                       "projection; name each at most once.")
    if self.lora_rank and not targets:
      raise ValueError(f"ModelConfig.lora_rank={self.lora_rank} but "
                       "lora_targets is empty; name the projections that get "
                       f"adapters (from {LORA_TARGETS}) or set lora_rank=0.")
    # Canonical order, so equal target sets give equal (hashable) configs.
    object.__setattr__(self, "lora_targets",
                       tuple(t for t in LORA_TARGETS if t in targets))

  def lora_on(self, target: str) -> bool:
    """Whether the projection `target` ("q", ..., "down") has an adapter."""
    return bool(self.lora_rank) and target in self.lora_targets

  @property
  def lora_scale(self) -> float:
    """alpha / r, the factor of the adapter product (0 without adapters)."""
    return float(self.lora_alpha) / self.lora_rank if self.lora_rank else 0.0

  @property
  def num_lora_params(self) -> int:
    """Number of adapter parameters (A and B of every targeted projection)."""
    if not self.lora_rank:
      return 0
    d, f = self.embed_dim, self.mlp_dim
    q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    io = {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d),
          "gate": (d, f), "up": (d, f), "down": (f, d)}
    per_layer = sum(io[t][0] + io[t][1] for t in self.lora_targets)
    return self.num_layers * self.lora_rank * per_layer

  def _check_gemma_fields(self):
    if self.mlp_activation not in MLP_ACTIVATIONS:
      raise ValueError(f"ModelConfig.mlp_activation={self.mlp_activation!r} "
                       f"is not supported; use one of {MLP_ACTIVATIONS}.")
    for name in ("query_pre_attn_scalar", "attn_logit_softcap",
                 "final_logit_softcap", "rope_local_theta"):
      value = getattr(self, name)
      if value is not None and not float(value) > 0:
        raise ValueError(f"ModelConfig.{name}={value} must be positive, or "
                         "None to disable it.")
    if isinstance(self.layer_types, str) or not all(
        isinstance(t, str) for t in self.layer_types):
      raise ValueError(f"ModelConfig.layer_types={self.layer_types!r} must be "
                       f"a sequence of {LAYER_TYPES}, one per layer.")
    object.__setattr__(self, "layer_types", tuple(self.layer_types))
    bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
    if bad:
      raise ValueError(f"ModelConfig.layer_types holds {bad}; each entry must "
                       f"be one of {LAYER_TYPES}.")
    if self.layer_types and len(self.layer_types) != self.num_layers:
      raise ValueError(
          f"ModelConfig.layer_types has {len(self.layer_types)} entries but "
          f"num_layers={self.num_layers}; give one type per layer (or use "
          "sliding_window_pattern, which follows num_layers).")
    if self.sliding_window_pattern < 0:
      raise ValueError(f"ModelConfig.sliding_window_pattern="
                       f"{self.sliding_window_pattern} must be >= 0.")
    if self.layer_types and self.sliding_window_pattern:
      raise ValueError(
          "ModelConfig sets both layer_types and sliding_window_pattern; "
          "give one of them (set the other to () or 0).")
    sliding = any(self.sliding_layers)
    if sliding and (self.sliding_window is None or self.sliding_window < 1):
      raise ValueError(
          f"ModelConfig has sliding-window layers but sliding_window="
          f"{self.sliding_window}; set it to the window length (>= 1).")
    if self.sliding_window is not None and not sliding:
      raise ValueError(
          f"ModelConfig.sliding_window={self.sliding_window} but no layer is "
          "a sliding-window layer; set layer_types or sliding_window_pattern, "
          "or sliding_window=None.")

  @property
  def sliding_layers(self) -> tuple[bool, ...]:
    """Per layer, whether it attends within the sliding window."""
    if self.layer_types:
      return tuple(t == "sliding_attention" for t in self.layer_types)
    n = self.sliding_window_pattern
    return tuple(bool(n) and (i + 1) % n != 0 for i in range(self.num_layers))

  @property
  def num_params(self) -> int:
    """Number of base parameters (embedding counted once when tied; adapters
    are counted by `num_lora_params`)."""
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
    layer = attn + mlp + (4 if self.post_norms else 2) * d
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
    # Gemma 2 2B's shape (use with its tokenizer's vocabulary, 256000).
    "gemma2_2b": dict(num_layers=26, embed_dim=2304, num_heads=8,
                      num_kv_heads=4, head_dim=256, mlp_dim=9216,
                      max_seq_len=8192, rope_theta=10_000.0,
                      tie_embeddings=True, norm_unit_offset=True,
                      post_norms=True, embed_scale=True,
                      mlp_activation="gelu_tanh", query_pre_attn_scalar=256.0,
                      attn_logit_softcap=50.0, final_logit_softcap=30.0,
                      sliding_window=4096, sliding_window_pattern=2),
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
