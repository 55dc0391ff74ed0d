"""Hugging Face checkpoints: load into and save from the NNX `Transformer`.

Supported families (the `model_type` of `config.json`):

  ==========  =================================================================
  qwen2       Qwen2 / Qwen2.5: q/k/v biases, no output bias
  qwen3       Qwen3: per-head q/k RMSNorm, explicit `head_dim`,
              `attention_bias` on q/k/v/o
  llama       Llama 2/3.x: `attention_bias` on q/k/v/o, `mlp_bias`, rope
              scaling "llama3" or "linear"
  gemma2      Gemma 2: (1 + w) RMSNorms, post-attention and post-feedforward
              norms, embeddings times sqrt(hidden), GeGLU (tanh GELU),
              `query_pre_attn_scalar`, attention and final logit soft-capping,
              sliding-window layers alternating with global ones
  gemma3_text Gemma 3 text model (`Gemma3ForCausalLM`): Gemma 2's block with
              q/k norms, local/global `layer_types` (or
              `sliding_window_pattern`), `rope_local_base_freq` for the
              sliding layers and rope scaling for the global ones; like
              transformers it applies no attention soft-capping
  ==========  =================================================================

A checkpoint directory holds `config.json` and either `model.safetensors` or
shards listed by `model.safetensors.index.json`. Loading builds the model
abstractly (`nnx.eval_shape`), then reads one tensor at a time straight from
the file into a host buffer, converts its layout and dtype, and places it on
its target sharding, so host memory stays near one copy of the model and no
randomly initialised copy is ever built.

Example::

  model = load_pretrained("/ckpt/Qwen2.5-0.5B", dtype=jnp.bfloat16)
  logits_BTV = model(tokens_BT)
  save_pretrained(model, "/tmp/out", max_shard_size="2GB")

Low-rank adapters (`ModelConfig.lora_rank` > 0): `save_pretrained` folds
W + (alpha / r) A B into each targeted weight, one tensor at a time on the
host, and writes a plain checkpoint of the `lora_rank=0` model that
transformers loads; `load_params(path, lora_rank=r, ...)` reads the base
weights of a plain checkpoint and adds fresh adapters (B = 0, so the loaded
model computes the checkpoint's function exactly).

Layouts: HF linear weights are [out, in]; ours are [in, ...]. q/k/v
projections are [D, heads, H], the output projection [heads, H, D], MLP
weights [D, F] / [F, D], the separate output layer [D, V]. Both use the
half-split rotary layout, so no permutation of heads is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import json
import os
import re
import struct
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding

from rlax_llm.models import lora as lora_lib
from rlax_llm.models.config import ModelConfig
from rlax_llm.models.transformer import Transformer
from rlax_llm.models.transformer import abstract_model
from rlax_llm.models.transformer import logical_axes
from rlax_llm.parallel import mesh as mesh_lib

__all__ = ["config_from_hf", "config_to_hf", "hf_tensor_specs", "load_params",
           "load_pretrained", "read_safetensors_header", "save_pretrained",
           "write_weights"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "llama": "LlamaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                  "gemma3_text": "Gemma3ForCausalLM"}
_GEMMA = ("gemma2", "gemma3_text")
# transformers' defaults for fields a Gemma config.json may leave out.
_GEMMA_DEFAULTS = {
    "gemma2": dict(head_dim=256, max_position_embeddings=8192,
                   query_pre_attn_scalar=256, sliding_window=4096,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                   sliding_window_pattern=2, rope_theta=10_000.0),
    "gemma3_text": dict(head_dim=256, max_position_embeddings=131_072,
                        query_pre_attn_scalar=256, sliding_window=4096,
                        final_logit_softcapping=None,
                        attn_logit_softcapping=None, sliding_window_pattern=6,
                        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0),
}
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_python_tanh", "gelu_new")

# safetensors dtype codes <-> numpy dtypes (bf16 through ml_dtypes).
_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_CODES = {v: k for k, v in _DTYPES.items()}
_TORCH_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16",
                "F64": "float64"}

# Buffers some checkpoints carry that are recomputed, never learned.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


# -- safetensors I/O ------------------------------------------------------------
def read_safetensors_header(file: str) -> dict[str, Any]:
  """The JSON header of a safetensors file, with `"__data_start__"` added.

  Raises:
    ValueError: when the file is too short or its header is not valid JSON.
  """
  with open(file, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise ValueError(f"{file} is not a safetensors file (shorter than 8 "
                       "bytes); re-export the checkpoint.")
    (n,) = struct.unpack("<Q", raw)
    size = os.path.getsize(file)
    if n > size - 8:
      raise ValueError(f"{file} is not a safetensors file (header length {n} "
                       f"exceeds the file size {size}); it may be truncated.")
    try:
      header = json.loads(f.read(n))
    except ValueError as e:
      raise ValueError(f"{file} has a corrupt safetensors header: {e}") from e
  header["__data_start__"] = 8 + n
  return header


class _SafetensorsFile:
  """Reads single tensors of a safetensors file into fresh host buffers.

  Tensors are read with `readinto` rather than memory-mapped, so a tensor's
  bytes live only in the returned array and are freed with it.
  """

  def __init__(self, file: str):
    self.file = file
    self.header = read_safetensors_header(file)
    self.start = self.header.pop("__data_start__")
    self.header.pop("__metadata__", None)
    self._f = open(file, "rb")

  def close(self):
    self._f.close()

  def get(self, name: str) -> np.ndarray:
    info = self.header[name]
    if info["dtype"] not in _DTYPES:
      raise ValueError(f"Tensor {name!r} in {self.file} has dtype "
                       f"{info['dtype']}, which is not supported; supported "
                       f"are {sorted(_DTYPES)}.")
    dtype = _DTYPES[info["dtype"]]
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    out = np.empty(shape, dtype)
    if out.nbytes != end - begin:
      raise ValueError(f"Tensor {name!r} in {self.file}: shape {shape} of "
                       f"{info['dtype']} needs {out.nbytes} bytes but the "
                       f"header gives {end - begin}; the file is corrupt.")
    self._f.seek(self.start + begin)
    view = memoryview(out.reshape(-1).view(np.uint8))
    if self._f.readinto(view) != out.nbytes:
      raise ValueError(f"{self.file} ends inside tensor {name!r}; the file "
                       "is truncated.")
    return out


def _parse_size(size: int | str) -> int:
  """Bytes of "200MB", "2GB", "1GiB" or an int."""
  if isinstance(size, (int, np.integer)):
    return int(size)
  m = re.fullmatch(r"\s*([\d.]+)\s*([KMG]i?B)?\s*", str(size), re.IGNORECASE)
  if not m:
    raise ValueError(f"max_shard_size={size!r}: use bytes or a string such as "
                     "'200MB', '2GB' or '1GiB'.")
  unit = (m.group(2) or "B").upper()
  scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10,
           "MIB": 2**20, "GIB": 2**30}[unit]
  return int(float(m.group(1)) * scale)


def write_weights(path: str,
                  specs: Sequence[tuple[str, Sequence[int], Any]],
                  fetch: Callable[[str], np.ndarray], *,
                  max_shard_size: int | str = "5GB") -> list[str]:
  """Writes tensors as `model.safetensors` or index + shards, streaming.

  Shards are planned from `specs` first, then each tensor is fetched, written
  and dropped, so at most one tensor is held on the host at a time. Old
  weight files of the same naming scheme in `path` are removed first.

  Args:
    path: an existing directory.
    specs: (name, shape, dtype) of each tensor, in file order.
    fetch: name -> array of that shape; cast to the spec's dtype.
    max_shard_size: start a new shard before a tensor that would make the
      current one larger than this (bytes or "200MB"/"2GB"/"1GiB").

  Returns:
    The file names written (relative to `path`).
  """
  limit = _parse_size(max_shard_size)
  shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
  used = 0
  total = 0
  for name, shape, dtype in specs:
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if shards[-1] and used + nbytes > limit:
      shards.append([])
      used = 0
    shards[-1].append((name, tuple(int(s) for s in shape), dtype))
    used += nbytes
    total += nbytes
  for old in os.listdir(path):
    if old in (WEIGHTS_NAME, INDEX_NAME) or re.fullmatch(
        r"model-\d+-of-\d+\.safetensors", old):
      os.remove(os.path.join(path, old))
  n = len(shards)
  names = ([WEIGHTS_NAME] if n == 1 else
           [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
  weight_map = {}
  for file, shard in zip(names, shards):
    _write_shard(os.path.join(path, file), shard, fetch)
    weight_map.update({name: file for name, _, _ in shard})
  if n > 1:
    with open(os.path.join(path, INDEX_NAME), "w") as f:
      json.dump({"metadata": {"total_size": total},
                 "weight_map": weight_map}, f, indent=2, sort_keys=True)
    names.append(INDEX_NAME)
  return names


def _write_shard(file, shard, fetch):
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for name, shape, dtype in shard:
    if dtype not in _CODES:
      raise ValueError(f"Tensor {name!r}: dtype {dtype} cannot be written to "
                       "safetensors.")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    header[name] = {"dtype": _CODES[dtype], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # keeps the data 8-byte aligned
  with open(file, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for name, shape, dtype in shard:
      arr = np.asarray(fetch(name))
      if arr.shape != shape:
        raise ValueError(f"Tensor {name!r} has shape {arr.shape}, expected "
                         f"{shape}.")
      f.write(np.ascontiguousarray(arr.astype(dtype, copy=False)).tobytes())
      del arr


# -- configs --------------------------------------------------------------------
def _family(hf: Mapping[str, Any]) -> str:
  model_type = hf.get("model_type")
  if model_type in _ARCHITECTURES:
    return model_type
  if model_type == "gemma3" or "Gemma3ForConditionalGeneration" in (
      hf.get("architectures") or ()):
    raise ValueError(
        "This is a multimodal Gemma 3 checkpoint (model_type='gemma3', "
        "Gemma3ForConditionalGeneration); only the text model is supported. "
        "Load a Gemma3ForCausalLM checkpoint (model_type 'gemma3_text'), or "
        "save the language model of this one with transformers' "
        "Gemma3ForCausalLM.save_pretrained first.")
  for arch in hf.get("architectures") or ():
    for family, name in _ARCHITECTURES.items():
      if arch == name:
        return family
  raise ValueError(
      f"Unsupported architecture: model_type={model_type!r}, architectures="
      f"{hf.get('architectures')!r}. Supported are {sorted(_ARCHITECTURES)} "
      f"({sorted(_ARCHITECTURES.values())}).")


def config_from_hf(hf: Mapping[str, Any], **overrides) -> ModelConfig:
  """The ModelConfig of an HF `config.json` dict.

  Args:
    hf: the parsed `config.json` of a Qwen2, Qwen3, Llama, Gemma 2 or
      Gemma 3 text checkpoint.
    **overrides: ModelConfig fields to set on top (`dtype`, `param_dtype`,
      `remat`, `max_seq_len`, ...).

  Raises:
    ValueError: for an unsupported architecture, activation, rope type,
      sliding-window attention outside the Gemma families, bidirectional
      attention or a missing field.
  """
  family = _family(hf)
  for key in ("hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size", "vocab_size"):
    if key not in hf:
      raise ValueError(f"config.json lacks {key!r}, which a {family} config "
                       "must give.")
  if family in _GEMMA:
    fields = _gemma_fields(hf, family)
    fields.update(overrides)
    return ModelConfig(**fields)
  act = hf.get("hidden_act", "silu")
  if act not in ("silu", "swish"):
    raise ValueError(f"hidden_act={act!r} is not supported; the decoder uses "
                     "SwiGLU (silu).")
  window = hf.get("sliding_window")
  max_len = int(hf.get("max_position_embeddings", 4096))
  if hf.get("use_sliding_window", False) and window and window < max_len:
    raise ValueError(
        f"use_sliding_window=true with sliding_window={window} is not "
        f"supported for {family} (its decoder attends to the full context); "
        "set use_sliding_window to false in config.json to load it with full "
        "attention.")
  d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
  rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  rope.setdefault("rope_theta", hf.get("rope_theta", 10_000.0))
  attention_bias = bool(hf.get("attention_bias", False))
  fields = dict(
      vocab_size=int(hf["vocab_size"]),
      num_layers=int(hf["num_hidden_layers"]),
      embed_dim=d,
      num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf.get("head_dim") or d // heads),
      mlp_dim=int(hf["intermediate_size"]),
      max_seq_len=max_len,
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      qkv_bias=True if family == "qwen2" else attention_bias,
      out_bias=False if family == "qwen2" else attention_bias,
      mlp_bias=bool(hf.get("mlp_bias", False)) if family == "llama" else False,
      qk_norm=family == "qwen3",
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      **_rope_fields(rope))
  fields.update(overrides)
  return ModelConfig(**fields)


def _rope_fields(rope: Mapping[str, Any]) -> dict[str, Any]:
  """ModelConfig rope fields of one HF rope dict (`rope_parameters` style)."""
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ("default", "linear", "llama3"):
    raise ValueError(f"rope_type={rope_type!r} is not supported; supported "
                     "are 'default', 'linear' and 'llama3'.")
  if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
    raise ValueError("partial_rotary_factor != 1 is not supported.")
  fields: dict[str, Any] = dict(rope_theta=float(rope["rope_theta"]))
  if rope_type != "default":
    fields.update(rope_scaling=rope_type, rope_factor=float(rope["factor"]))
  if rope_type == "llama3":
    fields.update(
        rope_low_freq_factor=float(rope["low_freq_factor"]),
        rope_high_freq_factor=float(rope["high_freq_factor"]),
        rope_original_max_len=int(rope["original_max_position_embeddings"]))
  return fields


def _gemma_fields(hf: Mapping[str, Any], family: str) -> dict[str, Any]:
  """ModelConfig fields of a Gemma 2 or Gemma 3 text `config.json`."""
  defaults = _GEMMA_DEFAULTS[family]

  def get(key):  # the value, or transformers' default when absent or null
    value = hf.get(key)
    return defaults[key] if value is None else value

  act = hf.get("hidden_activation") or hf.get("hidden_act") or _GELU_TANH[0]
  if act not in _GELU_TANH:
    raise ValueError(f"hidden_activation={act!r} is not supported for "
                     f"{family}; the decoder's GeGLU uses the tanh "
                     f"approximation of GELU ({_GELU_TANH}).")
  if hf.get("use_bidirectional_attention"):
    raise ValueError(
        "use_bidirectional_attention=true is not supported: the decoder is "
        "causal. Set it to false (or null) in config.json for a causal LM.")
  n = int(hf["num_hidden_layers"])
  layer_types = hf.get("layer_types")
  if layer_types is None:
    pattern = int(hf.get("sliding_window_pattern")
                  or hf.get("_sliding_window_pattern")
                  or defaults["sliding_window_pattern"])
    layer_types = ["sliding_attention" if (i + 1) % pattern else
                   "full_attention" for i in range(n)]
  layer_types = tuple(layer_types)
  sliding = "sliding_attention" in layer_types
  window = hf.get("sliding_window", defaults["sliding_window"])
  if sliding and not window:
    raise ValueError(
        f"config.json has sliding_attention layers but sliding_window="
        f"{window!r}; give the window length (transformers' default is "
        f"{defaults['sliding_window']}).")
  # Rotary settings: one dict for every layer (Gemma 2), or one per layer
  # type (Gemma 3: `rope_parameters` keyed by layer type, or the older
  # rope_theta / rope_local_base_freq / rope_scaling fields).
  params = dict(hf.get("rope_parameters") or {})
  local_theta = None
  if family == "gemma3_text":
    if "full_attention" in params or "sliding_attention" in params:
      full = dict(params.get("full_attention") or {})
      local = dict(params.get("sliding_attention") or {})
    else:
      full = dict(hf.get("rope_scaling") or params)
      local = {}
    full.setdefault("rope_theta", hf.get("rope_theta", defaults["rope_theta"]))
    local.setdefault("rope_theta", hf.get("rope_local_base_freq",
                                          defaults["rope_local_base_freq"]))
    local_type = local.get("rope_type", local.get("type", "default"))
    if sliding and local != full:
      if local_type != "default":
        raise ValueError(
            f"rope_parameters['sliding_attention'] has rope_type="
            f"{local_type!r}; sliding layers support only 'default' rope "
            "(with their own rope_theta) or the same rope as full layers.")
      local_theta = float(local["rope_theta"])
    rope = full
    if hf.get("attn_logit_softcapping") is not None:
      raise ValueError(
          f"attn_logit_softcapping={hf['attn_logit_softcapping']} in a "
          "gemma3_text config: transformers' Gemma 3 does not apply attention "
          "soft-capping, so these weights were not trained with it. Set it "
          "to null in config.json.")
  else:
    rope = dict(params or hf.get("rope_scaling") or {})
    rope.setdefault("rope_theta", hf.get("rope_theta", defaults["rope_theta"]))
  d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
  attention_bias = bool(hf.get("attention_bias", False))
  attn_cap = (hf.get("attn_logit_softcapping",
                     defaults["attn_logit_softcapping"])
              if family == "gemma2" else None)
  final_cap = hf.get("final_logit_softcapping",
                     defaults["final_logit_softcapping"])
  return dict(
      vocab_size=int(hf["vocab_size"]),
      num_layers=n,
      embed_dim=d,
      num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(get("head_dim")),
      mlp_dim=int(hf["intermediate_size"]),
      max_seq_len=int(get("max_position_embeddings")),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      qkv_bias=attention_bias,
      out_bias=attention_bias,
      qk_norm=family == "gemma3_text",
      tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
      norm_unit_offset=True,
      post_norms=True,
      embed_scale=True,
      mlp_activation="gelu_tanh",
      query_pre_attn_scalar=float(get("query_pre_attn_scalar")),
      attn_logit_softcap=None if attn_cap is None else float(attn_cap),
      final_logit_softcap=None if final_cap is None else float(final_cap),
      sliding_window=int(window) if sliding else None,
      layer_types=layer_types if sliding else (),
      rope_local_theta=local_theta,
      **_rope_fields(rope))


def _dtype_name(dtype) -> str:
  return _TORCH_NAMES[_CODES[np.dtype(dtype)]]


def _uses_gemma_features(cfg: ModelConfig) -> bool:
  return (cfg.norm_unit_offset or cfg.post_norms or cfg.embed_scale
          or cfg.mlp_activation != "silu"
          or cfg.query_pre_attn_scalar is not None
          or cfg.attn_logit_softcap is not None
          or cfg.final_logit_softcap is not None or any(cfg.sliding_layers)
          or cfg.rope_local_theta is not None)


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  rope: dict[str, Any] = {"rope_type": cfg.rope_scaling or "default",
                          "rope_theta": float(cfg.rope_theta)}
  if cfg.rope_scaling in ("linear", "llama3"):
    rope["factor"] = float(cfg.rope_factor)
  if cfg.rope_scaling == "llama3":
    rope.update(low_freq_factor=float(cfg.rope_low_freq_factor),
                high_freq_factor=float(cfg.rope_high_freq_factor),
                original_max_position_embeddings=int(
                    cfg.rope_original_max_len))
  return rope


def _number(x: float) -> int | float:
  """x as an int when it is integral (transformers types some fields int)."""
  return int(x) if float(x).is_integer() else float(x)


def _gemma_to_hf(cfg: ModelConfig, dtype) -> dict[str, Any]:
  """The Gemma 2 / Gemma 3 text `config.json` of `cfg`."""
  family = "gemma3_text" if cfg.qk_norm else "gemma2"
  needed = dict(norm_unit_offset=True, post_norms=True, embed_scale=True,
                mlp_activation="gelu_tanh", mlp_bias=False)
  wrong = {k: getattr(cfg, k) for k, v in needed.items()
           if getattr(cfg, k) != v}
  if wrong or cfg.qkv_bias != cfg.out_bias:
    raise ValueError(
        f"cfg uses Gemma features but no supported family expresses it: a "
        f"{family} checkpoint needs {needed} and q/k/v/o biases all or none; "
        f"cfg has {wrong}, qkv_bias={cfg.qkv_bias}, out_bias={cfg.out_bias}.")
  if family == "gemma2" and cfg.rope_local_theta is not None:
    raise ValueError(
        f"rope_local_theta={cfg.rope_local_theta} needs a gemma3_text "
        "checkpoint (qk_norm=True); Gemma 2 uses one rope for all layers.")
  if family == "gemma3_text" and cfg.attn_logit_softcap is not None:
    raise ValueError(
        f"attn_logit_softcap={cfg.attn_logit_softcap} cannot be exported as "
        "gemma3_text: transformers' Gemma 3 does not apply attention "
        "soft-capping. Set it to None (or export without q/k norm as gemma2).")
  rope = _rope_to_hf(cfg)
  sliding = cfg.sliding_layers
  hf: dict[str, Any] = {
      "architectures": [_ARCHITECTURES[family]],
      "model_type": family,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.embed_dim,
      "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_activation": "gelu_pytorch_tanh",
      "max_position_embeddings": cfg.max_seq_len,
      "rms_norm_eps": float(cfg.norm_eps),
      "attention_bias": bool(cfg.qkv_bias),
      "query_pre_attn_scalar": _number(cfg.query_pre_attn_scalar
                                       or cfg.head_dim),
      "sliding_window": cfg.sliding_window,
      "layer_types": ["sliding_attention" if s else "full_attention"
                      for s in sliding],
      "attn_logit_softcapping": cfg.attn_logit_softcap,
      "final_logit_softcapping": cfg.final_logit_softcap,
      "use_bidirectional_attention": False,
      "tie_word_embeddings": bool(cfg.tie_embeddings),
      "torch_dtype": _dtype_name(cfg.param_dtype if dtype is None else dtype),
      "use_cache": True,
  }
  if family == "gemma2":
    hf["rope_parameters"] = rope
  else:
    local = (rope if cfg.rope_local_theta is None else
             {"rope_type": "default",
              "rope_theta": float(cfg.rope_local_theta)})
    hf["rope_parameters"] = {"full_attention": rope,
                             "sliding_attention": dict(local)}
  return hf


def config_to_hf(cfg: ModelConfig, *, dtype=None) -> dict[str, Any]:
  """The HF `config.json` dict of `cfg` (Gemma 3 text or Gemma 2 if it uses
  Gemma's features, with or without q/k norm; else Qwen3 if q/k norm, Qwen2
  if q/k/v but no output bias, Llama otherwise).

  Args:
    cfg: the model config.
    dtype: dtype the weights are written in (default `cfg.param_dtype`).

  Raises:
    ValueError: when no supported family expresses `cfg` (e.g. q/k norm with
      MLP biases).
  """
  if _uses_gemma_features(cfg):
    return _gemma_to_hf(cfg, dtype)
  if cfg.qk_norm:
    family = "qwen3"
  elif cfg.qkv_bias and not cfg.out_bias:
    family = "qwen2"
  else:
    family = "llama"
  if family != "qwen2" and cfg.qkv_bias != cfg.out_bias:
    raise ValueError(f"A {family} checkpoint has biases on all of q/k/v/o or "
                     f"none; cfg has qkv_bias={cfg.qkv_bias}, out_bias="
                     f"{cfg.out_bias}.")
  if family != "llama" and cfg.mlp_bias:
    raise ValueError(f"mlp_bias is only expressible as a llama checkpoint, "
                     f"but cfg is {family} (qk_norm={cfg.qk_norm}, qkv_bias="
                     f"{cfg.qkv_bias}, out_bias={cfg.out_bias}).")
  rope = _rope_to_hf(cfg)
  hf = {
      "architectures": [_ARCHITECTURES[family]],
      "model_type": family,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.embed_dim,
      "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_seq_len,
      "rms_norm_eps": float(cfg.norm_eps),
      "rope_theta": float(cfg.rope_theta),
      "rope_parameters": rope,
      "tie_word_embeddings": bool(cfg.tie_embeddings),
      "torch_dtype": _dtype_name(cfg.param_dtype if dtype is None else dtype),
      "use_cache": True,
  }
  if cfg.rope_scaling in ("linear", "llama3"):
    hf["rope_scaling"] = dict(rope)
  if family == "qwen2":
    hf.update(use_sliding_window=False, sliding_window=None)
  else:
    hf["attention_bias"] = bool(cfg.qkv_bias)
  if family == "llama":
    hf["mlp_bias"] = bool(cfg.mlp_bias)
  return hf


# -- parameter layout -----------------------------------------------------------
def _param_map(cfg: ModelConfig) -> dict[tuple, tuple[str, str]]:
  """Our param path -> (HF tensor name, layout kind)."""
  m: dict[tuple, tuple[str, str]] = {
      ("embedding",): ("model.embed_tokens.weight", "copy"),
      ("final_norm", "scale"): ("model.norm.weight", "copy"),
  }
  if not cfg.tie_embeddings:
    m[("lm_head",)] = ("lm_head.weight", "transpose")
  for i in range(cfg.num_layers):
    hf, ours = f"model.layers.{i}.", ("layers", i)
    m[ours + ("attn_norm", "scale")] = (hf + "input_layernorm.weight", "copy")
    if cfg.post_norms:  # Gemma's names: "post_attention" is the attention's
      m[ours + ("attn_post_norm", "scale")] = (
          hf + "post_attention_layernorm.weight", "copy")
      m[ours + ("mlp_norm", "scale")] = (
          hf + "pre_feedforward_layernorm.weight", "copy")
      m[ours + ("mlp_post_norm", "scale")] = (
          hf + "post_feedforward_layernorm.weight", "copy")
    else:
      m[ours + ("mlp_norm", "scale")] = (
          hf + "post_attention_layernorm.weight", "copy")
    a = ours + ("attn",)
    for x in "qkv":
      m[a + (f"{x}_proj",)] = (hf + f"self_attn.{x}_proj.weight", "in_proj")
      if cfg.qkv_bias:
        m[a + (f"{x}_bias",)] = (hf + f"self_attn.{x}_proj.bias", "heads")
    m[a + ("o_proj",)] = (hf + "self_attn.o_proj.weight", "out_proj")
    if cfg.out_bias:
      m[a + ("o_bias",)] = (hf + "self_attn.o_proj.bias", "copy")
    if cfg.qk_norm:
      m[a + ("q_norm", "scale")] = (hf + "self_attn.q_norm.weight", "copy")
      m[a + ("k_norm", "scale")] = (hf + "self_attn.k_norm.weight", "copy")
    for x in ("gate", "up", "down"):
      m[ours + ("mlp", f"{x}_proj")] = (hf + f"mlp.{x}_proj.weight",
                                         "transpose")
      if cfg.mlp_bias:
        m[ours + ("mlp", f"{x}_bias")] = (hf + f"mlp.{x}_proj.bias", "copy")
  return m


def _hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """HF shape of a tensor whose shape in our layout is `shape`."""
  if kind == "copy":
    return shape
  if kind == "transpose":
    return shape[::-1]
  if kind == "in_proj":  # ours [D, N, H] <- HF [N*H, D]
    return (shape[1] * shape[2], shape[0])
  if kind == "out_proj":  # ours [N, H, D] <- HF [D, N*H]
    return (shape[2], shape[0] * shape[1])
  if kind == "heads":  # ours [N, H] <- HF [N*H]
    return (shape[0] * shape[1],)
  raise AssertionError(kind)


def _to_ours(kind: str, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if kind in ("copy", "heads"):
    return w.reshape(shape)
  if kind == "transpose":
    return w.T
  if kind == "in_proj":
    return w.T.reshape(shape)
  if kind == "out_proj":
    return w.T.reshape(shape)
  raise AssertionError(kind)


def _to_hf(kind: str, w: np.ndarray) -> np.ndarray:
  if kind == "copy":
    return w
  if kind == "heads":
    return w.reshape(-1)
  if kind == "transpose":
    return w.T
  if kind == "in_proj":
    return w.reshape(w.shape[0], -1).T
  if kind == "out_proj":
    return w.reshape(-1, w.shape[-1]).T
  raise AssertionError(kind)


def hf_tensor_specs(cfg: ModelConfig, dtype=None) -> list[tuple[str, tuple,
                                                                 np.dtype]]:
  """(HF name, HF shape, dtype) of every tensor of `cfg`'s checkpoint (of
  its merged `lora_rank=0` model when `cfg` has adapters)."""
  cfg = lora_lib.base_config(cfg)
  _, abstract = abstract_model(cfg)
  dtype = np.dtype(cfg.param_dtype if dtype is None else dtype)
  pmap = _param_map(cfg)
  specs = []
  for path, var in nnx.to_flat_state(abstract):
    name, kind = pmap[tuple(path)]
    specs.append((name, _hf_shape(kind, tuple(var.get_value().shape)), dtype))
  return sorted(specs, key=lambda s: _natural_key(s[0]))


def _natural_key(name: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# -- loading --------------------------------------------------------------------
def _check_dir(path) -> tuple[str, dict[str, Any], dict[str, str]]:
  """(path, parsed config.json, tensor name -> file) of a checkpoint dir."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f"Checkpoint directory {path!r} does not exist. Pass a local directory "
        f"holding {CONFIG_NAME} and {WEIGHTS_NAME} (or {INDEX_NAME} and its "
        "shards); files are never downloaded.")
  config_file = os.path.join(path, CONFIG_NAME)
  if not os.path.isfile(config_file):
    raise FileNotFoundError(
        f"{path!r} has no {CONFIG_NAME}. Save the model with transformers' "
        f"save_pretrained (or rlax_llm.models.hf.save_pretrained) so that it "
        "writes the config next to the weights.")
  with open(config_file) as f:
    try:
      hf = json.load(f)
    except ValueError as e:
      raise ValueError(f"{config_file} is not valid JSON: {e}") from e
  single = os.path.join(path, WEIGHTS_NAME)
  index = os.path.join(path, INDEX_NAME)
  if os.path.isfile(single):
    header = read_safetensors_header(single)
    files = {k: single for k in header
             if k not in ("__metadata__", "__data_start__")}
  elif os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index} has no 'weight_map' object; re-export the "
                       "checkpoint.")
    files = {}
    for name, file in weight_map.items():
      full = os.path.join(path, file)
      if not os.path.isfile(full):
        raise FileNotFoundError(
            f"{index} lists {name!r} in shard {file!r}, which is missing from "
            f"{path!r}; copy every shard of the checkpoint.")
      files[name] = full
  else:
    others = [f for f in os.listdir(path) if f.endswith((".bin", ".pt",
                                                         ".pth", ".h5"))]
    hint = (f" Found {others}: convert them with transformers' "
            "save_pretrained(..., safe_serialization=True)." if others else "")
    raise FileNotFoundError(
        f"{path!r} has neither {WEIGHTS_NAME} nor {INDEX_NAME}; only "
        f"safetensors weights are read.{hint}")
  return path, hf, files


def _placement(shape, logical, mesh: Mesh | None, rules):
  if mesh is None:
    return SingleDeviceSharding(jax.devices()[0])
  return NamedSharding(mesh, mesh_lib.logical_to_spec(logical, shape, mesh,
                                                      rules))


def _fresh_adapters(cfg: ModelConfig, abstract, mesh: Mesh | None, rules,
                    seed: int) -> list:
  """Flat (path, LoRAParam) adapters of `Transformer(cfg, Rngs(seed))`.

  Initialised by one jit that outputs only the adapters, each onto its
  sharding; the base weights it would draw are dead code XLA removes.
  """
  _, adapters = lora_lib.split_lora(abstract)
  if mesh is None:
    shardings = SingleDeviceSharding(jax.devices()[0])
  else:
    shardings = mesh_lib.tree_shardings(logical_axes(adapters), adapters,
                                        mesh, rules)

  def init():
    state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))[1]
    return lora_lib.split_lora(state)[1]

  return list(nnx.to_flat_state(jax.jit(init, out_shardings=shardings)()))


def _load(path, dtype, param_dtype, mesh, rules, overrides, lora_seed=0):
  path, hf, files = _check_dir(path)
  param_dtype = dtype if param_dtype is None else param_dtype
  cfg = config_from_hf(hf, dtype=dtype, param_dtype=param_dtype, **overrides)
  graphdef, abstract = abstract_model(cfg)
  pmap = _param_map(cfg)
  wanted = {name for name, _ in pmap.values()}
  missing = sorted(wanted - set(files), key=_natural_key)
  if missing:
    raise ValueError(
        f"Checkpoint {path!r} lacks {len(missing)} tensor(s) its config.json "
        f"needs, e.g. {missing[:4]}. Check that config.json belongs to these "
        "weights (tie_word_embeddings, attention_bias, model_type).")
  extra = sorted((n for n in files
                  if n not in wanted and not _IGNORED.match(n)
                  and not (n == "lm_head.weight" and cfg.tie_embeddings)),
                 key=_natural_key)
  if extra:
    raise ValueError(
        f"Checkpoint {path!r} has {len(extra)} tensor(s) that a "
        f"{_family(hf)} model of this config does not use, e.g. {extra[:4]}; "
        "the architecture or config.json does not match the weights.")
  readers: dict[str, _SafetensorsFile] = {}
  leaves = []
  try:
    # Adapters (lora_rank > 0) are not in the checkpoint; they start fresh.
    flat = [pv for pv in nnx.to_flat_state(abstract) if tuple(pv[0]) in pmap]
    # Read shard by shard, tensors in file order.
    flat.sort(key=lambda pv: (files[pmap[tuple(pv[0])][0]],
                              _natural_key(pmap[tuple(pv[0])][0])))
    for path_, var in flat:
      name, kind = pmap[tuple(path_)]
      file = files[name]
      if file not in readers:
        readers[file] = _SafetensorsFile(file)
      target = var.get_value()
      shape = tuple(target.shape)
      expected = _hf_shape(kind, shape)
      if name not in readers[file].header:
        raise ValueError(f"{file} does not contain {name!r} although the index "
                         "lists it there; re-export the checkpoint.")
      got = tuple(readers[file].header[name]["shape"])
      if got != expected:
        raise ValueError(
            f"Tensor {name!r} in {file} has shape {got}, but config.json "
            f"implies {expected}; config.json does not match the weights.")
      host = _to_ours(kind, readers[file].get(name), shape)
      host = np.ascontiguousarray(host.astype(np.dtype(target.dtype),
                                              copy=False))
      sharding = _placement(shape, var.get_metadata().get("logical_axes"),
                            mesh, rules)
      value = jax.make_array_from_callback(shape, sharding,
                                           lambda idx, h=host: h[idx])
      leaves.append((path_, var.replace(value)))
      del host
  finally:
    for r in readers.values():
      r.close()
  if cfg.lora_rank:
    leaves.extend(_fresh_adapters(cfg, abstract, mesh, rules, lora_seed))
  return cfg, graphdef, nnx.from_flat_state(leaves)


def load_params(path, *, dtype=jnp.float32, param_dtype=None,
                mesh: Mesh | None = None, rules=mesh_lib.DEFAULT_RULES,
                lora_seed: int = 0, **overrides):
  """Reads an HF checkpoint directory into a parameter state.

  Args:
    path: directory with `config.json` and safetensors weights.
    dtype: compute dtype of the model config.
    param_dtype: storage dtype of the parameters (default: `dtype`).
    mesh: place each parameter on the NamedSharding its logical axes map to
      under `rules`; None puts everything on the first device.
    rules: logical -> mesh axis rules.
    lora_seed: with `lora_rank` > 0 among the overrides, the seed of the
      fresh adapters: A as `Transformer(cfg, rngs=nnx.Rngs(lora_seed))`
      draws it, B zero.
    **overrides: other ModelConfig fields (`remat`, `max_seq_len`,
      `lora_rank`, `lora_alpha`, `lora_targets`, ...).

  Returns:
    (ModelConfig, nnx.State of `nnx.Param`s), the state shaped like
    `nnx.split(Transformer(cfg, ...))[1]`.

  Raises:
    FileNotFoundError: missing directory, config.json or weights.
    ValueError: unsupported architecture, or weights that do not match the
      config (missing, unexpected or wrongly shaped tensors, named).
  """
  cfg, _, state = _load(path, dtype, param_dtype, mesh, rules, overrides,
                        lora_seed)
  return cfg, state


def load_pretrained(path, *, dtype=jnp.float32, param_dtype=None,
                    mesh: Mesh | None = None, rules=mesh_lib.DEFAULT_RULES,
                    lora_seed: int = 0, **overrides) -> Transformer:
  """Reads an HF checkpoint directory into a `Transformer`.

  `model(tokens_BT)` then gives f32 logits [B, T, V]. Arguments as in
  `load_params`.
  """
  _, graphdef, state = _load(path, dtype, param_dtype, mesh, rules, overrides,
                             lora_seed)
  return nnx.merge(graphdef, state)


# -- saving ---------------------------------------------------------------------
def _flatten(tree, prefix=()) -> dict[tuple, Any]:
  if isinstance(tree, nnx.Variable):
    return {prefix: tree.get_value()}
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, prefix + (k,)))
    return out
  return {prefix: tree}


def _to_host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def save_pretrained(model_or_params, path, *, max_shard_size: int | str = "5GB",
                    dtype=None) -> list[str]:
  """Writes an HF checkpoint (`config.json` + safetensors) transformers loads.

  Args:
    model_or_params: a `Transformer`, or `(ModelConfig, params)` with params an
      `nnx.State` or the nested dict of its arrays (`state.to_pure_dict()`).
    path: output directory (created if missing).
    max_shard_size: above this the weights are split into
      `model-0000i-of-0000n.safetensors` shards with `model.safetensors.index.json`.
    dtype: dtype to write the weights in (default: `cfg.param_dtype`).

  With `cfg.lora_rank` > 0 the adapters are folded in (W + (alpha / r) A B,
  in f32 on the host, one tensor at a time) and the checkpoint is that of
  `lora.base_config(cfg)`: a plain model with no adapter tensors.

  Returns:
    The file names written.

  Raises:
    ValueError: when params do not match the config, or no supported family
      expresses the config.
  """
  if isinstance(model_or_params, Transformer):
    cfg = model_or_params.cfg
    params = nnx.state(model_or_params, nnx.Param)
  else:
    try:
      cfg, params = model_or_params
    except (TypeError, ValueError):
      raise TypeError("save_pretrained takes a Transformer or a (ModelConfig, "
                      f"params) pair, got {type(model_or_params).__name__}."
                      ) from None
    if not isinstance(cfg, ModelConfig):
      raise TypeError(f"Expected (ModelConfig, params), got a "
                      f"{type(cfg).__name__} as the first element.")
  flat = _flatten(params)
  adapters: dict[tuple, tuple[tuple, tuple]] = {}  # weight -> (A, B) paths
  scale = cfg.lora_scale
  if cfg.lora_rank:
    _, abstract = abstract_model(cfg)
    want = {tuple(p) for p, _ in nnx.to_flat_state(abstract)
            if lora_lib.is_adapter_name(p[-1])}
    got = {p for p in flat if lora_lib.is_adapter_name(p[-1])}
    if want != got:
      raise ValueError(
          f"params do not hold the adapters of lora_rank={cfg.lora_rank}, "
          f"lora_targets={cfg.lora_targets}: missing "
          f"{sorted(map(str, want - got))[:4]}, unexpected "
          f"{sorted(map(str, got - want))[:4]}. Pass the config the params "
          "were made with.")
    for p in sorted(want):
      if p[-1].endswith("_lora_a"):
        target = p[-1][:-len("_lora_a")]
        adapters[p[:-1] + (f"{target}_proj",)] = (
            p, p[:-1] + (f"{target}_lora_b",))
    cfg = lora_lib.base_config(cfg)
  adapter_leaves = {p: flat.pop(p) for ab in adapters.values() for p in ab}
  pmap = _param_map(cfg)
  if set(flat) != set(pmap):
    missing = sorted(map(str, set(pmap) - set(flat)))
    extra = sorted(map(str, set(flat) - set(pmap)))
    raise ValueError(f"params do not match the config: missing {missing[:4]}, "
                     f"unexpected {extra[:4]}.")
  hf_config = config_to_hf(cfg, dtype=dtype)
  out_dtype = np.dtype(cfg.param_dtype if dtype is None else dtype)
  by_name = {name: (p, kind) for p, (name, kind) in pmap.items()}
  _, abstract = abstract_model(cfg)
  for p, var in nnx.to_flat_state(abstract):
    want, got = tuple(var.get_value().shape), tuple(np.shape(flat[tuple(p)]))
    if want != got:
      raise ValueError(f"Parameter {'/'.join(map(str, p))} has shape {got}, "
                       f"but the config implies {want}.")
  specs = [(name, _hf_shape(kind, tuple(np.shape(flat[p]))), out_dtype)
           for name, (p, kind) in sorted(by_name.items(),
                                          key=lambda kv: _natural_key(kv[0]))]

  def fetch(name):
    p, kind = by_name[name]
    w = _to_host(flat[p])
    if p in adapters:
      a, b = (_to_host(adapter_leaves[q]) for q in adapters[p])
      w = lora_lib.fold_adapter(w, a, b, scale, xp=np)
    return _to_hf(kind, w)

  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, CONFIG_NAME), "w") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  return [CONFIG_NAME] + write_weights(path, specs, fetch,
                                       max_shard_size=max_shard_size)

