"""Benchmarks: throughput of rlax_llm's compute paths on this machine.

  python -m experiments.bench generate [--json] [--sequences=16,256] \
      [--samples_per_prompt=8] [--new_tokens=128] [--repeats=5] [--preset=...] \
      [--host_devices=-1] [--decode_chunk=-1] [--notransformers] [--noroofline]
  python -m experiments.bench logprobs [--json] [--tokens=2048] \
      [--vocab=32768] [--width=256] [--chunk_size=1024] [--vocab_chunk=8192] \
      [--repeats=3] [--nofull_size]

What can be measured (the positional argument):
  generate   tokens/s of `rlax_llm.sampling.generate_on_mesh_jit` (prefill +
             KV-cache decode, G samples per prompt sharing one prefill,
             prompts split over a "data" mesh of every device) for the
             model of configs/default.py, sampling with the RL phase's
             sampler; in the same run and on the same weights, tokens/s of
             transformers' `generate` (torch, CPU) and the f32 matmul
             roofline of this machine (below). On a CPU host the run first
             makes one JAX device per core (--host_devices=-1,
             `rlax_llm.parallel.use_host_devices`), so both frameworks use
             every core: torch as threads, JAX as devices.
  rewards    verifications/s of the GSM8K and MATH verifiers on the
             reference solutions, in-process and through the reward runner's
             process pool (experiments/bench_rewards.py).
  logprobs   target log-probs + entropies from hidden states and an output
             kernel: `chunked_token_logprobs_and_entropy` against the naive
             path that builds the [tokens, vocab] logits, forward and
             forward + backward (gradient w.r.t. hidden and kernel). Each
             record has the median time and the compiled memory analysis
             (temp / argument / output bytes; peak = their sum). Two more
             records per path give the memory analysis only (compiled, never
             run) of the target shape 8,192 tokens x 151,936 vocab x 896
             width, where the full float32 logits alone take ~5 GB.

Each measurement compiles first (timed separately as `compile_s`), then times
`--repeats` calls (default 5) with `jax.block_until_ready` and reports their
median. Every
sequence decodes exactly `--new_tokens` tokens: the EOS id passed is one the
sampler cannot emit, so no sequence stops early and tokens/s counts
sequences * new_tokens / median seconds. With --json, stdout carries one JSON
object per measurement and nothing else; otherwise a table.

generate compared with transformers. The freshly initialised parameters are
written with `rlax_llm.models.hf.save_pretrained` to a temporary directory and
loaded with `transformers.AutoModelForCausalLM.from_pretrained(dir,
dtype=torch.float32)`; the run stops unless both models' logits on the
benchmark prompts agree within 1e-4 (`logits_max_abs_diff`). transformers'
`generate` gets the same left-padded prompts with their attention mask, each
repeated G times, `do_sample=True`, temperature 1, no top-k / top-p (the RL
sampler's settings), `max_new_tokens = min_new_tokens = --new_tokens` and the
KV cache, under `torch.inference_mode()` with torch's default thread count
(`torch_threads`), timed as the median of `--repeats` calls after one untimed
call. `speedup_vs_transformers` = tokens_per_s / transformers_tokens_per_s.

FLOPs and the roofline. The model FLOPs of one decoded token are

  F_tok = 2 W + 4 L Hq H c,   W = L (D Hq H + 2 D K H + Hq H D + 3 D F) + D V,

W the weights a token multiplies (q, k, v, o, gate, up, down and the output
layer; the embedding is a gather), L layers, D width, Hq query heads and K
key/value heads of size H, F the MLP width, V the vocabulary, and c the
context the token attends to (q.k and p.v over c keys). The j-th new token
(j = 0 .. T-1) of a prompt of P columns sees c = P + j + 1, so the mean is
`decode_flops_per_token` = 2 W + 4 L Hq H (P + (T + 1) / 2). Both frameworks
are credited with the same useful FLOPs (padding, a cache longer than the
context and the prefill are not counted): `flops_per_s` = tokens_per_s x
F_tok, and likewise `transformers_flops_per_s`.
The roofline is measured in the same run: every distinct f32 matmul of one
decode step at that N ([N, D] x [D, Hq H], [N, D] x [D, K H], [N, Hq H] x
[Hq H, D], [N, D] x [D, F], [N, F] x [F, D], [N, D] x [D, V]) and a
1024^3 square matmul are timed with JAX on one device (a jitted loop), with
JAX split by rows over every device (`jax_mesh`, as the decode splits its
batch) and with torch (a loop of `torch.mm`), each timing ~1 GFLOP long,
reported in `matmul_flops_per_s`; each shape's rate R_i is the fastest.
With F_i a step's FLOPs in shape i,

  roofline_flops_per_s = sum_i F_i / sum_i (F_i / R_i)

is the rate at which the step's matmuls alone run on this machine, and
`peak_flops_per_s` the square matmul's. `roofline_fraction` =
flops_per_s / roofline_flops_per_s (`transformers_roofline_fraction` for
transformers; `*_peak_fraction` against the square matmul). At N = 16 the
target is speedup >= 3, at N = 256 speedup >= 1.5 and roofline_fraction >=
0.6 (`target_speedup`, `target_roofline_fraction`, `targets_met`).

A default generate run (16 and 256 sequences x 128 tokens, tiny model, with
transformers and the roofline) takes about a minute on 2 CPU cores; a default
logprobs run (2,048 tokens x 32,768 vocab x 256 width, ~1.1 GB peak for the
naive backward) well under two.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging

_HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(_HERE) not in sys.path:
  sys.path.insert(0, os.path.dirname(_HERE))

_JSON = flags.DEFINE_bool("json", False,
                          "Print one JSON object per measurement on stdout.")
_SEQUENCES = flags.DEFINE_list(
    "sequences", ["16", "256"],
    "Rollouts per call, N = prompts x samples_per_prompt; one measurement each.")
_SAMPLES = flags.DEFINE_integer(
    "samples_per_prompt", 8,
    "G, samples per prompt (capped at the number of sequences).", lower_bound=1)
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 128,
                                   "Tokens decoded per sequence.", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per measurement.",
                                lower_bound=1)
_PRESET = flags.DEFINE_string(
    "preset", None,
    "Model preset of rlax_llm.models.config.PRESETS to use instead of "
    "configs/default.py's model.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the parameters and samples.")
_TRANSFORMERS = flags.DEFINE_bool(
    "transformers", True, "generate: also time transformers' generate on the "
    "same weights (exported with rlax_llm.models.hf.save_pretrained).")
_ROOFLINE = flags.DEFINE_bool(
    "roofline", True, "generate: also measure the f32 matmul roofline.")
_HOST_DEVICES = flags.DEFINE_integer(
    "host_devices", -1, "CPU devices JAX splits this host into "
    "(rlax_llm.parallel.use_host_devices): -1 one per core, 0 JAX's default "
    "single device. generate runs on a mesh over them (prompts split over "
    "'data'); transformers' torch uses the same cores as threads.",
    lower_bound=-1)
_DECODE_CHUNK = flags.DEFINE_integer(
    "decode_chunk", -1, "generate: the most sequences decoded at once per "
    "device: -1 generate's default (rlax_llm.sampling.auto_decode_chunk), 0 "
    "all at once.", lower_bound=-1)
_TOKENS = flags.DEFINE_integer("tokens", 2048,
                               "logprobs: tokens M = N x T per call.",
                               lower_bound=1)
_VOCAB = flags.DEFINE_integer("vocab", 32768, "logprobs: vocabulary size V.",
                              lower_bound=1)
_WIDTH = flags.DEFINE_integer("width", 256, "logprobs: model width D.",
                              lower_bound=1)
_CHUNK_SIZE = flags.DEFINE_integer("chunk_size", 1024,
                                   "logprobs: tokens per chunk.",
                                   lower_bound=1)
_VOCAB_CHUNK = flags.DEFINE_integer(
    "vocab_chunk", 8192, "logprobs: vocabulary columns per streamed block; "
    "0 takes the whole vocabulary per chunk. Streaming keeps the full-size "
    "forward + backward near 0.7 GB of temporaries (2.5 GB with 0 and "
    "--chunk_size=1024).", lower_bound=0)
_FULL_SIZE = flags.DEFINE_bool(
    "full_size", True, "logprobs: also report the compiled memory analysis "
    "of the 8,192 x 151,936 x 896 target shape.")

# The target shape of the chunked log-probs: a Qwen2-0.5B-sized unembedding
# over an 8k-token batch.
FULL_TOKENS, FULL_VOCAB, FULL_WIDTH = 8192, 151936, 896

# An id outside the vocabulary: the sampler never emits it, so no sequence
# ends before max_new_tokens.
NO_EOS_ID = -1

# Largest |rlax_llm - transformers| logit the comparison accepts.
LOGITS_ATOL = 1e-4


def _device_info() -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  return {"device": dev.device_kind, "backend": dev.platform,
          "num_devices": jax.device_count(), "jax_version": jax.__version__}


# Decode FLOPs and the matmul roofline ------------------------------------------
def decode_matmul_params(cfg) -> int:
  """Weights one decoded token multiplies: every projection + the output layer.

  L x (D Hq H [q] + 2 D K H [k, v] + Hq H D [o] + 3 D F [gate, up, down])
  + D V [output layer]. The embedding lookup is a gather (no FLOPs); norms,
  rotary embedding, biases and the softmax are not counted.
  """
  d, hq, kh, h = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  per_layer = d * hq * h + 2 * d * kh * h + hq * h * d + 3 * d * cfg.mlp_dim
  return cfg.num_layers * per_layer + d * cfg.vocab_size


def decode_flops_per_token(cfg, prompt_len: int, new_tokens: int) -> float:
  """Mean model FLOPs of one decoded token (see the module docstring).

  2 x decode_matmul_params + 4 L Hq H c, where c = prompt_len + j + 1 is the
  context the j-th new token attends to (q.k and p.v, 2 FLOPs per
  multiply-add), averaged over j = 0 .. new_tokens - 1:
  mean c = prompt_len + (new_tokens + 1) / 2.
  """
  mean_context = prompt_len + (new_tokens + 1) / 2
  attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * mean_context
  return 2 * decode_matmul_params(cfg) + attention


def decode_matmul_shapes(cfg, sequences: int) -> list[tuple[str, int, int,
                                                            int, int]]:
  """(name, M, K, N, count per decode step) of the step's matmuls."""
  d, f = cfg.embed_dim, cfg.mlp_dim
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  l = cfg.num_layers
  return [("q_proj", sequences, d, q, l), ("kv_proj", sequences, d, kv, 2 * l),
          ("o_proj", sequences, q, d, l), ("mlp_in", sequences, d, f, 2 * l),
          ("mlp_out", sequences, f, d, l),
          ("vocab", sequences, d, cfg.vocab_size, 1)]


def _matmul_loop(iters: int):
  """f(a, w): `iters` chained [M, K] x [K, N] products in one fori_loop."""
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  # pylint: enable=g-import-not-at-top

  def loop(a, w):
    def body(_, carry):
      a, _ = carry
      out = jnp.dot(a, w)
      # A dependency on the product keeps XLA from hoisting it out of the
      # loop; it costs M x K adds against M x K x N multiply-adds.
      return a + 1e-30 * out[:, :1], out
    zeros = jnp.zeros((a.shape[0], w.shape[1]), jnp.float32)
    return jax.lax.fori_loop(0, iters, body, (a, zeros))[1]
  return loop


def _median_seconds(fn, args, repeats: int) -> float:
  """Median wall time of `repeats` blocked calls, after one untimed call."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn(*args))
  seconds = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    seconds.append(time.perf_counter() - t0)
  return statistics.median(seconds)


def _jax_matmul_rate(m: int, k: int, n: int, iters: int,
                     repeats: int) -> float:
  """FLOP/s of an f32 [M, K] x [K, N] jnp.dot, `iters` per jitted call."""
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  # pylint: enable=g-import-not-at-top
  a = jax.random.normal(jax.random.key(1), (m, k), jnp.float32)
  w = jax.random.normal(jax.random.key(2), (k, n), jnp.float32) / k**0.5
  loop = jax.jit(_matmul_loop(iters))
  return 2 * m * k * n * iters / _median_seconds(loop, (a, w), repeats)


def _torch_matmul_rate(m: int, k: int, n: int, iters: int,
                       repeats: int) -> float:
  """FLOP/s of an f32 [M, K] x [K, N] torch.mm, `iters` calls per timing."""
  import torch  # pylint: disable=g-import-not-at-top
  gen = torch.Generator().manual_seed(0)
  a = torch.randn(m, k, generator=gen)
  w = torch.randn(k, n, generator=gen) / k**0.5
  out = torch.empty(m, n)
  with torch.inference_mode():
    torch.mm(a, w, out=out)
    seconds = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      for _ in range(iters):
        torch.mm(a, w, out=out)
      seconds.append(time.perf_counter() - t0)
  return 2 * m * k * n * iters / statistics.median(seconds)


def _jax_mesh_matmul_rate(m: int, k: int, n: int, iters: int,
                          repeats: int) -> float | None:
  """FLOP/s of the [M, K] x [K, N] matmul split by rows over every device.

  Each device multiplies its M / devices rows (`jax.shard_map` over a 1-D
  mesh), as the decode step does when its batch is split over the "data"
  axis. None with one device, or when M does not divide by the devices.
  """
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  # pylint: enable=g-import-not-at-top
  devices = jax.devices()
  if len(devices) < 2 or m % len(devices):
    return None
  mesh = Mesh(np.asarray(devices), ("data",))
  a = jax.device_put(
      jax.random.normal(jax.random.key(1), (m, k), jnp.float32),
      NamedSharding(mesh, P("data")))
  w = jax.device_put(
      jax.random.normal(jax.random.key(2), (k, n), jnp.float32) / k**0.5,
      NamedSharding(mesh, P()))

  loop = jax.jit(jax.shard_map(_matmul_loop(iters), mesh=mesh,
                               in_specs=(P("data"), P()),
                               out_specs=P("data"), check_vma=False))
  return 2 * m * k * n * iters / _median_seconds(loop, (a, w), repeats)


def matmul_roofline(cfg, sequences: int, *, repeats: int = 5,
                    square: int = 1024,
                    with_torch: bool = True) -> dict[str, Any]:
  """Measures f32 matmul FLOP/s on this machine for the decode step's shapes.

  Each distinct shape of `decode_matmul_shapes` and one [square, square]^2
  matmul is timed with JAX on one device (inside one jitted loop), with JAX
  split by rows over every device when there are several (`jax_mesh`), and
  with torch (a loop of `torch.mm` calls on its default threads); a shape's
  rate is the fastest of them. The roofline of
  the step is its matmul FLOPs over the time those matmuls take at those
  rates: sum_i F_i / sum_i (F_i / rate_i).

  Returns:
    {"roofline_flops_per_s", "peak_flops_per_s" (the square matmul, best of
     all), "matmul_flops_per_s": {shape name: {"jax", "jax_mesh", "torch",
     "shape"}}}.
  """
  target = 1e9  # FLOPs per timing: ~10 ms, long enough to dwarf call overhead
  rates, flops, time_s = {}, 0.0, 0.0
  shapes = decode_matmul_shapes(cfg, sequences) + [
      ("square", square, square, square, 0)]
  for name, m, k, n, count in shapes:
    iters = max(1, min(2000, int(target / (2 * m * k * n))))
    rate = {"shape": [m, k, n],
            "jax": _jax_matmul_rate(m, k, n, iters, repeats)}
    mesh_rate = _jax_mesh_matmul_rate(m, k, n, iters, repeats)
    if mesh_rate is not None:
      rate["jax_mesh"] = mesh_rate
    if with_torch:
      rate["torch"] = _torch_matmul_rate(m, k, n, iters, repeats)
    rates[name] = rate
    best = max(v for key, v in rate.items() if key != "shape")
    flops += 2 * m * k * n * count
    time_s += 2 * m * k * n * count / best
  square_rate = rates["square"]
  return {"roofline_flops_per_s": flops / time_s,
          "peak_flops_per_s": max(v for key, v in square_rate.items()
                                  if key != "shape"),
          "matmul_flops_per_s": rates}


# transformers on the same weights -----------------------------------------------
def export_to_transformers(model_cfg, params, path: str):
  """Writes `params` as an HF checkpoint and loads it back with transformers.

  Returns:
    The f32 `transformers` causal LM, in eval mode.
  """
  # pylint: disable=g-import-not-at-top
  import torch
  import transformers
  from rlax_llm.models import hf
  # pylint: enable=g-import-not-at-top
  hf.save_pretrained((model_cfg, params), path)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      path, dtype=torch.float32)
  return model.eval()


def logits_max_abs_diff(graphdef, params, hf_model, prompt_BP,
                        mask_BP) -> float:
  """Max |rlax - transformers| logit over the valid prompt positions.

  Both models see the same padded prompts, mask and positions (valid tokens
  counted from 0, as `rlax_llm.models.transformer.default_positions`).
  """
  # pylint: disable=g-import-not-at-top
  import flax.nnx as nnx
  import numpy as np
  import torch
  # pylint: enable=g-import-not-at-top
  prompt_BP, mask_BP = np.asarray(prompt_BP), np.asarray(mask_BP, bool)
  positions_BP = np.maximum(np.cumsum(mask_BP, axis=-1) - 1, 0)
  ours = np.asarray(nnx.merge(graphdef, params)(prompt_BP, None, mask_BP))
  with torch.inference_mode():
    theirs = hf_model(input_ids=torch.from_numpy(prompt_BP.astype(np.int64)),
                      attention_mask=torch.from_numpy(mask_BP.astype(np.int64)),
                      position_ids=torch.from_numpy(positions_BP)).logits
  diff = np.abs(ours - theirs.float().numpy())
  return float(diff[mask_BP].max())


def time_transformers_generate(hf_model, prompt_BP, mask_BP, *,
                               samples_per_prompt: int, new_tokens: int,
                               pad_id: int, repeats: int,
                               seed: int) -> dict[str, Any]:
  """Times transformers' `generate` (do_sample, temperature 1, no top-k/p).

  Each left-padded prompt is repeated G times (rows b * G + g, as rlax_llm
  lays them out); every row decodes exactly `new_tokens` tokens
  (min_new_tokens = max_new_tokens), with the KV cache, under
  `torch.inference_mode()`, after one untimed call.
  """
  # pylint: disable=g-import-not-at-top
  import numpy as np
  import torch
  # pylint: enable=g-import-not-at-top
  g = samples_per_prompt
  ids = torch.from_numpy(np.repeat(np.asarray(prompt_BP, np.int64), g, 0))
  mask = torch.from_numpy(np.repeat(np.asarray(mask_BP, np.int64), g, 0))
  kwargs = dict(input_ids=ids, attention_mask=mask, do_sample=True,
                temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                use_cache=True, pad_token_id=pad_id)
  with torch.inference_mode():
    torch.manual_seed(seed + repeats)
    hf_model.generate(**kwargs)
    seconds = []
    for r in range(repeats):
      torch.manual_seed(seed + r)
      t0 = time.perf_counter()
      out = hf_model.generate(**kwargs)
      seconds.append(time.perf_counter() - t0)
  if tuple(out.shape) != (ids.shape[0], ids.shape[1] + new_tokens):
    raise RuntimeError(
        f"transformers generated {tuple(out.shape)} tokens instead of "
        f"{(ids.shape[0], ids.shape[1] + new_tokens)}; the timing would not "
        "count the tokens it claims.")
  median = statistics.median(seconds)
  return {"transformers_tokens_per_s": ids.shape[0] * new_tokens / median,
          "transformers_seconds_median": median,
          "transformers_seconds_all": seconds,
          "torch_threads": torch.get_num_threads(),
          "torch_version": torch.__version__}


# Targets of the comparison at the default sizes: (N, min speedup over
# transformers, min fraction of the roofline or None).
GENERATE_TARGETS = {16: (3.0, None), 256: (1.5, 0.6)}


def bench_generate(sequences: int, *, samples_per_prompt: int = 8,
                   new_tokens: int = 128, repeats: int = 5,
                   preset: str | None = None, seed: int = 0,
                   transformers: bool = True, roofline: bool = True,
                   decode_chunk: int | None = None) -> dict[str, Any]:
  """Times `generate_on_mesh_jit` on `sequences` rollouts of `new_tokens`.

  The prompts are the default task's (configs/default.py) training prompts,
  tokenised and left-padded as the experiment does; the parameters are a
  fresh initialisation (throughput does not depend on their values). The
  model's context is raised to prompt length + new_tokens where it is
  shorter. With `transformers`, the same parameters are exported with
  `rlax_llm.models.hf.save_pretrained`, loaded by transformers, checked to
  give the same logits on the prompts, and its `generate` timed on the same
  prompts; with `roofline`, the matmul roofline is measured (see the module
  docstring). The prompts are split over a mesh of every device on its "data"
  axis (one device per core on a CPU host with --host_devices=-1; see
  `rlax_llm.sampling.generate_on_mesh`, whose tokens equal one device's).

  Args:
    sequences: N, rollouts per call; a multiple of the samples per prompt.
    samples_per_prompt: G (capped at N); prompts B = N / G.
    new_tokens: tokens decoded per rollout.
    repeats: timed calls; the median is reported.
    preset: a model preset name instead of configs/default.py's model.
    seed: seed of the parameters and the sampling keys.
    transformers: also time transformers' `generate` on the same weights.
    roofline: also measure the matmul roofline.
    decode_chunk: sequences decoded at once per device (0: all; None:
      generate's automatic choice, recorded as `decode_chunk`).

  Returns:
    One measurement record (see the module docstring).
  """
  # pylint: disable=g-import-not-at-top
  import tempfile
  import jax
  from configs import base as base_config
  from configs import default as default_config
  from rlax_llm.models.config import ModelConfig, PRESETS
  from rlax_llm.parallel import mesh as mesh_lib
  from rlax_llm.sampling.generate import auto_decode_chunk
  from rlax_llm.sampling.generate import generate_on_mesh_jit
  from rlax_llm.sampling.samplers import SamplerConfig
  from rlax_llm.training import state as state_lib
  from rlax_llm.training.experiment import ArithmeticSetup
  # pylint: enable=g-import-not-at-top

  if preset is not None and preset not in PRESETS:
    raise ValueError(f"Unknown model preset {preset!r}; known: "
                     f"{sorted(PRESETS)}.")
  g = min(samples_per_prompt, sequences)
  if sequences < 1 or sequences % g:
    raise ValueError(
        f"--sequences={sequences} is not a positive multiple of "
        f"--samples_per_prompt={g}; pick N = prompts x samples per prompt.")
  b = sequences // g

  config = default_config.get_config()
  setup = ArithmeticSetup(config.task, config.seed)
  tok = setup.tokenizer
  model_section = (base_config.model_config(preset) if preset
                   else config.model)
  fields = {k: v for k, v in model_section.items() if k != "preset"}
  fields["max_seq_len"] = max(fields["max_seq_len"],
                              setup.prompt_len + new_tokens)
  model_cfg = ModelConfig(vocab_size=tok.vocab_size, **fields)
  sampler = SamplerConfig(config.rl.temperature, config.rl.top_k,
                          config.rl.top_p, config.rl.min_p).validate()

  problems = setup.task.train_batch(0, b)
  prompt_BP, mask_BP = tok.encode_batch([q.prompt for q in problems],
                                        max_length=setup.prompt_len)
  graphdef = state_lib.model_graphdef(model_cfg)
  mesh = mesh_lib.make_mesh({"data": -1})
  params = jax.device_put(state_lib.init_params(model_cfg, seed),
                          mesh_lib.replicated(mesh))
  prompt_dev, mask_dev = jax.device_put(
      (prompt_BP, mask_BP), mesh_lib.batch_sharding(mesh, 2)
      if b % mesh.shape["data"] == 0 else mesh_lib.replicated(mesh))
  key = jax.random.key(seed)

  t0 = time.perf_counter()
  compiled = generate_on_mesh_jit.lower(
      graphdef, params, prompt_dev, mask_dev, key, mesh=mesh, num_samples=g,
      max_new_tokens=new_tokens, eos_id=NO_EOS_ID, pad_id=tok.pad_id,
      sampler=sampler, decode_chunk=decode_chunk).compile()
  compile_s = time.perf_counter() - t0
  # One untimed call: first-run allocations stay out of the timings.
  jax.block_until_ready(compiled(params, prompt_dev, mask_dev,
                                 jax.random.fold_in(key, repeats)))

  seconds = []
  for r in range(repeats):
    rng = jax.random.fold_in(key, r)
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(params, prompt_dev, mask_dev, rng))
    seconds.append(time.perf_counter() - t0)
  steps = int(out.steps)
  lengths = jax.device_get(out.lengths)
  if steps != new_tokens or (lengths != new_tokens).any():
    raise RuntimeError(
        f"generate decoded {steps} steps (lengths {lengths.min()}.."
        f"{lengths.max()}) instead of exactly {new_tokens}; the timing would "
        "not count the tokens it claims.")

  median = statistics.median(seconds)
  tokens_per_s = sequences * new_tokens / median
  flops_per_token = decode_flops_per_token(model_cfg, setup.prompt_len,
                                           new_tokens)
  rec = {
      "bench": "generate",
      "batch": b,
      "samples_per_prompt": g,
      "sequences": sequences,
      "prompt_len": setup.prompt_len,
      "new_tokens": new_tokens,
      "tokens": sequences * new_tokens,
      "tokens_per_s": tokens_per_s,
      "seconds_median": median,
      "seconds_all": seconds,
      "compile_s": compile_s,
      "repeats": repeats,
      "model": preset or config.model.preset,
      "params": model_cfg.num_params,
      "sampler": sampler._asdict(),
      "mesh": dict(mesh.shape),
      "decode_chunk": (decode_chunk if decode_chunk is not None else
                       auto_decode_chunk(params, model_cfg,
                                         -(-b // mesh.shape["data"]) * g,
                                         new_tokens)),
      "decode_matmul_params": decode_matmul_params(model_cfg),
      "decode_flops_per_token": flops_per_token,
      "flops_per_s": tokens_per_s * flops_per_token,
      **_device_info(),
  }

  if transformers:
    # pylint: disable=g-import-not-at-top
    import transformers as transformers_lib
    # pylint: enable=g-import-not-at-top
    with tempfile.TemporaryDirectory() as tmp:
      hf_model = export_to_transformers(model_cfg, params, tmp)
    rec["logits_max_abs_diff"] = logits_max_abs_diff(
        graphdef, params, hf_model, prompt_BP, mask_BP)
    if not rec["logits_max_abs_diff"] <= LOGITS_ATOL:
      raise RuntimeError(
          f"transformers' logits differ from rlax_llm's by "
          f"{rec['logits_max_abs_diff']:.3g} (> {LOGITS_ATOL}); the two "
          "benchmarks would not run the same model.")
    rec.update(time_transformers_generate(
        hf_model, prompt_BP, mask_BP, samples_per_prompt=g,
        new_tokens=new_tokens, pad_id=tok.pad_id, repeats=repeats, seed=seed))
    rec["transformers_version"] = transformers_lib.__version__
    rec["transformers_flops_per_s"] = (rec["transformers_tokens_per_s"]
                                       * flops_per_token)
    rec["speedup_vs_transformers"] = (tokens_per_s
                                      / rec["transformers_tokens_per_s"])

  if roofline:
    rec.update(matmul_roofline(model_cfg, sequences, repeats=repeats,
                               with_torch=transformers))
    rec["roofline_fraction"] = rec["flops_per_s"] / rec["roofline_flops_per_s"]
    rec["peak_fraction"] = rec["flops_per_s"] / rec["peak_flops_per_s"]
    if transformers:
      rec["transformers_roofline_fraction"] = (
          rec["transformers_flops_per_s"] / rec["roofline_flops_per_s"])
      rec["transformers_peak_fraction"] = (
          rec["transformers_flops_per_s"] / rec["peak_flops_per_s"])

  if sequences in GENERATE_TARGETS and transformers and roofline:
    min_speedup, min_fraction = GENERATE_TARGETS[sequences]
    rec["target_speedup"] = min_speedup
    rec["target_roofline_fraction"] = min_fraction
    rec["targets_met"] = bool(
        rec["speedup_vs_transformers"] >= min_speedup and
        (min_fraction is None or rec["roofline_fraction"] >= min_fraction))
  return rec


def _logprobs_fns(chunk_size: int, vocab_chunk: int | None):
  """{path: fn(hidden_1MD, kernel_DV, targets_1M) -> LogprobsAndEntropy}."""
  # pylint: disable=g-import-not-at-top
  import functools
  import jax.numpy as jnp
  from rlax_llm.core import logprobs
  # pylint: enable=g-import-not-at-top

  def naive(hidden_NTD, kernel_DV, targets_NT):
    logits_NTV = jnp.dot(hidden_NTD, kernel_DV,
                         preferred_element_type=jnp.float32)
    return logprobs.token_logprobs_and_entropy(logits_NTV, targets_NT)

  chunked = functools.partial(logprobs.chunked_token_logprobs_and_entropy,
                              chunk_size=chunk_size, vocab_chunk=vocab_chunk)
  return {"chunked": chunked, "naive": naive}


def _logprobs_modes(fn):
  """{mode: fn(hidden, kernel, targets)} for the forward and the backward."""
  import jax  # pylint: disable=g-import-not-at-top

  def loss(hidden_NTD, kernel_DV, targets_NT):
    out = fn(hidden_NTD, kernel_DV, targets_NT)
    return out.logp.sum() + 0.01 * out.entropy.sum()

  return {"forward": fn,
          "forward_backward": jax.value_and_grad(loss, argnums=(0, 1))}


def _memory_record(compiled) -> dict[str, int]:
  mem = compiled.memory_analysis()
  rec = {"temp_bytes": int(mem.temp_size_in_bytes),
         "argument_bytes": int(mem.argument_size_in_bytes),
         "output_bytes": int(mem.output_size_in_bytes)}
  rec["peak_bytes"] = sum(rec.values())
  return rec


def bench_logprobs(tokens: int = 2048, *, vocab: int = 32768, width: int = 256,
                   chunk_size: int = 1024, vocab_chunk: int | None = None,
                   repeats: int = 3, seed: int = 0,
                   full_size: bool = True) -> list[dict[str, Any]]:
  """Times and sizes chunked vs naive target log-probs + entropies.

  For each path (chunked, naive) and mode (forward, forward_backward) one
  record: the compiled memory analysis and the median of `repeats` timed
  calls after one untimed call, on float32 hidden [1, tokens, width], kernel
  [width, vocab] and random targets. With `full_size`, one more record per
  path and mode holds the memory analysis of the 8,192 x 151,936 x 896 shape,
  lowered from ShapeDtypeStructs and compiled, never run (`executed: false`).

  Args:
    tokens: M, tokens per call.
    vocab: V, vocabulary size.
    width: D, model width.
    chunk_size: tokens per chunk of the chunked path.
    vocab_chunk: vocabulary block of the chunked path, or None.
    repeats: timed calls; the median is reported.
    seed: seed of the random inputs.
    full_size: also analyse the target shape.

  Returns:
    The measurement records, timed ones first.
  """
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  # pylint: enable=g-import-not-at-top

  for name, value in (("tokens", tokens), ("vocab", vocab), ("width", width),
                      ("chunk_size", chunk_size), ("repeats", repeats)):
    if value < 1:
      raise ValueError(f"--{name} must be a positive integer, got {value}.")
  k_h, k_w, k_y = jax.random.split(jax.random.key(seed), 3)
  hidden_NTD = jax.random.normal(k_h, (1, tokens, width), jnp.float32)
  kernel_DV = jax.random.normal(k_w, (width, vocab), jnp.float32) / width**0.5
  targets_NT = jax.random.randint(k_y, (1, tokens), 0, vocab)
  fns = _logprobs_fns(chunk_size, vocab_chunk)

  def common(path, mode, m, v, d):
    return {"bench": "logprobs", "path": path, "mode": mode, "tokens": m,
            "vocab": v, "width": d, "dtype": "float32",
            "chunk_size": chunk_size if path == "chunked" else None,
            "vocab_chunk": vocab_chunk if path == "chunked" else None,
            "logits_bytes": m * v * 4}

  records = []
  for path, fn in fns.items():
    for mode, step in _logprobs_modes(fn).items():
      t0 = time.perf_counter()
      compiled = jax.jit(step).lower(hidden_NTD, kernel_DV,
                                     targets_NT).compile()
      compile_s = time.perf_counter() - t0
      jax.block_until_ready(compiled(hidden_NTD, kernel_DV, targets_NT))
      seconds = []
      for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(hidden_NTD, kernel_DV, targets_NT))
        seconds.append(time.perf_counter() - t0)
      records.append({
          **common(path, mode, tokens, vocab, width), "executed": True,
          **_memory_record(compiled),
          "seconds_median": statistics.median(seconds),
          "seconds_all": seconds, "compile_s": compile_s,
          "repeats": repeats, **_device_info()})
      del compiled

  if full_size:
    specs = (jax.ShapeDtypeStruct((1, FULL_TOKENS, FULL_WIDTH), jnp.float32),
             jax.ShapeDtypeStruct((FULL_WIDTH, FULL_VOCAB), jnp.float32),
             jax.ShapeDtypeStruct((1, FULL_TOKENS), jnp.int32))
    for path, fn in fns.items():
      for mode, step in _logprobs_modes(fn).items():
        t0 = time.perf_counter()
        compiled = jax.jit(step).lower(*specs).compile()
        records.append({
            **common(path, mode, FULL_TOKENS, FULL_VOCAB, FULL_WIDTH),
            "executed": False, **_memory_record(compiled),
            "compile_s": time.perf_counter() - t0, **_device_info()})
  return records


def _run_generate() -> list[dict[str, Any]]:
  try:
    sizes = [int(s) for s in _SEQUENCES.value]
  except ValueError:
    raise app.UsageError(f"--sequences must be integers, got "
                         f"{_SEQUENCES.value}.") from None
  return [bench_generate(n, samples_per_prompt=_SAMPLES.value,
                         new_tokens=_NEW_TOKENS.value, repeats=_REPEATS.value,
                         preset=_PRESET.value, seed=_SEED.value,
                         transformers=_TRANSFORMERS.value,
                         roofline=_ROOFLINE.value,
                         decode_chunk=(None if _DECODE_CHUNK.value < 0
                                       else _DECODE_CHUNK.value))
          for n in sizes]


def _run_logprobs() -> list[dict[str, Any]]:
  return bench_logprobs(_TOKENS.value, vocab=_VOCAB.value, width=_WIDTH.value,
                        chunk_size=_CHUNK_SIZE.value,
                        vocab_chunk=_VOCAB_CHUNK.value or None,
                        repeats=_REPEATS.value, seed=_SEED.value,
                        full_size=_FULL_SIZE.value)


def _run_rewards() -> list[dict[str, Any]]:
  from experiments import bench_rewards  # pylint: disable=g-import-not-at-top
  return bench_rewards.run()


BENCHES: dict[str, Callable[[], list[dict[str, Any]]]] = {
    "generate": _run_generate,
    "logprobs": _run_logprobs,
    "rewards": _run_rewards,
}


def _table(records: list[dict[str, Any]]) -> str:
  """The generate records as a table; missing comparisons print as '-'."""
  def num(r, key, fmt):
    return format(r[key], fmt) if r.get(key) is not None else "-"

  head = ("bench", "B x G", "N", "new tok", "median s", "tokens/s",
          "compile s", "hf tokens/s", "x hf", "roofline GF/s", "frac",
          "hf frac", "targets")
  rows = [head] + [
      (r["bench"], f"{r['batch']} x {r['samples_per_prompt']}",
       str(r["sequences"]), str(r["new_tokens"]),
       f"{r['seconds_median']:.4f}", f"{r['tokens_per_s']:,.0f}",
       f"{r['compile_s']:.2f}", num(r, "transformers_tokens_per_s", ",.0f"),
       num(r, "speedup_vs_transformers", ".2f"),
       (f"{r['roofline_flops_per_s'] / 1e9:.1f}"
        if r.get("roofline_flops_per_s") else "-"),
       num(r, "roofline_fraction", ".2f"),
       num(r, "transformers_roofline_fraction", ".2f"),
       {True: "met", False: "missed"}.get(r.get("targets_met"), "-"))
      for r in records]
  widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
  lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  if records:
    r = records[0]
    lines.append(f"model {r['model']} ({r['params']:,} params) on "
                 f"{r['num_devices']} x {r['device']} ({r['backend']}), "
                 f"jax {r['jax_version']}")
  return "\n".join(lines)


def _logprobs_table(records: list[dict[str, Any]]) -> str:
  head = ("path", "mode", "M x V x D", "median s", "temp MB", "peak MB")
  mb = lambda b: f"{b / 2**20:,.1f}"
  rows = [head] + [
      (r["path"], r["mode"], f"{r['tokens']} x {r['vocab']} x {r['width']}",
       f"{r['seconds_median']:.4f}" if r["executed"] else "(not run)",
       mb(r["temp_bytes"]), mb(r["peak_bytes"])) for r in records]
  widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
  lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def _rewards_table(records: list[dict[str, Any]]) -> str:
  head = ("workload", "mode", "items", "verifications/s", "accuracy")
  rows = [head] + [
      (str(r.get("workload")), str(r.get("mode")), str(r.get("items")),
       f"{r.get('verifications_per_s', 0):,.0f}", f"{r.get('accuracy', 0):.3f}")
      for r in records]
  widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
  lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def main(argv):
  logging.set_verbosity(logging.WARNING)  # stdout/stderr stay readable
  # pylint: disable=g-import-not-at-top
  from rlax_llm.parallel import distributed
  # pylint: enable=g-import-not-at-top
  distributed.use_host_devices(_HOST_DEVICES.value)
  whats = argv[1:]
  if not whats:
    raise app.UsageError(
        f"Say what to benchmark: python -m experiments.bench WHAT [--json]; "
        f"WHAT is one of {sorted(BENCHES)}.")
  unknown = [w for w in whats if w not in BENCHES]
  if unknown:
    raise app.UsageError(f"Unknown benchmark {unknown}; choose from "
                         f"{sorted(BENCHES)}.")
  records = []
  for what in whats:
    try:
      recs = BENCHES[what]()
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    records.extend(recs)
    if _JSON.value:
      for rec in recs:
        print(json.dumps(rec), flush=True)
  if not _JSON.value:
    generate = [r for r in records if r["bench"] == "generate"]
    logprobs = [r for r in records if r["bench"] == "logprobs"]
    rewards = [r for r in records if r["bench"] == "rewards"]
    print("\n\n".join(([_table(generate)] if generate else []) +
                       ([_logprobs_table(logprobs)] if logprobs else []) +
                       ([_rewards_table(rewards)] if rewards else [])))


if __name__ == "__main__":
  app.run(main)
