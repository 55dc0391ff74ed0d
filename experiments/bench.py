"""Benchmarks: throughput of rlax_llm's compute paths on this machine.

  python -m experiments.bench generate [--json] [--sequences=16,256] \
      [--samples_per_prompt=8] [--new_tokens=128] [--repeats=5] [--preset=...] \
      [--host_devices=-1] [--decode_chunk=-1] [--notransformers] [--noroofline]
  python -m experiments.bench logprobs [--json] [--tokens=2048] \
      [--vocab=32768] [--width=256] [--chunk_size=1024] [--vocab_chunk=8192] \
      [--repeats=5] [--nofull_size]
  python -m experiments.bench xrpo_allocate [--json] [--repeats=5]
  python -m experiments.bench grpo_step [--json] [--step_prompts=8] \
      [--samples_per_prompt=8] [--new_tokens=64] [--prompt_len=16] \
      [--repeats=3] [--warmup_steps=3] [--preset=...] [--notrl] \
      [--noroofline] [--profile] [--host_memory=auto] [--host_layout=split] \
      [--precision=bfloat16] [--noshare_prompt]

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
  grpo_step  seconds of one whole GRPO step (generate, reward, group
             advantages, one AdamW update) of a 3.94M-parameter Qwen2-shaped
             policy (4 layers, width 256, 8 query / 2 key-value heads of 32,
             MLP 1024, vocabulary 512, tied embeddings) on 8 prompts x 8
             samples x 64 new tokens, in rlax_llm (`generate_on_mesh_jit`,
             `make_rl_step`, `jit_step`, composed as the experiment loop
             does) and in TRL's GRPOTrainer on the same exported weights,
             prompts and reward (`bench_grpo_step`): median and spread of
             --repeats steps after --warmup_steps untimed ones (both
             frameworks; TRL in a fresh process of its own), the generate /
             score / update split, TRL / rlax_llm ratios and each part's
             fraction of the measured matmul roofline. Both compute in
             --precision: bfloat16 (default) is both frameworks' usual
             mixed precision (f32 parameters and optimiser, bfloat16
             activations; TRL's own default bf16=True), float32 computes
             in f32 throughout; the roofline is measured with operands of
             that precision. TRL keeps every activation for the backward,
             as rlax_llm does (gradient_checkpointing=False; TRL's default
             recomputes them). The update's FLOPs are
               F_update = 6 W_blk N S + 6 D V N T + 12 L Hq H N S^2,
             S = P + T (`update_flops`: ~6 x params x tokens plus
             attention). rlax_llm's update runs each prompt once for its G
             samples, as the experiment loop does (rl.share_prompt "auto";
             --noshare_prompt: once per sample), so it computes
             `rlax_update_flops` (fewer), against which its roofline
             fraction is taken. TRL is optional (the `bench` extra): without it
             the record has "trl": null and `trl_unavailable`. --profile
             adds the update's parts (scoring forward, backward, optimiser,
             the rest), each compiled and timed on its own. By default
             rlax_llm's step runs in the "split" host layout
             (--host_layout, `rlax_llm.parallel.layout_meshes`): generate
             on a mesh of one device per core, the update on the first
             device alone, whose scratch memory the process's malloc then
             reuses between calls (--host_memory=auto,
             `rlax_llm.parallel.reuse_host_memory`); --host_layout=shared
             runs both on one mesh (--host_devices=0: one device).
             `roofline.update_jax_ceiling_fraction` is the update's fraction
             were it nothing but its matmuls at JAX's own measured rates:
             where torch's kernels outrun XLA's (bfloat16 on a CPU with
             AMX), no JAX program reaches the roofline.
  xrpo_allocate
             milliseconds of one phase of XRPO's rollout allocator
             (`rlax_llm.core.allocation.xrpo_allocate`) at the XRPO config's
             size (16 prompts, 16 slots, 64 rollouts) and at a large one (512
             prompts, 32 slots, 4,096 rollouts): compile time and the median
             and spread of --repeats calls (`bench_xrpo_allocate`).
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

import contextlib
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
_NEW_TOKENS = flags.DEFINE_integer(
    "new_tokens", None, "Tokens decoded per sequence (default: generate 128, "
    "grpo_step 64).", lower_bound=1)
_REPEATS = flags.DEFINE_integer(
    "repeats", None, "Timed calls per measurement (default: generate and "
    "logprobs 5, grpo_step 3 steps).", lower_bound=1)
_PROMPTS = flags.DEFINE_integer("step_prompts", 8, "grpo_step: prompts B per step.",
                                lower_bound=1)
_WARMUP = flags.DEFINE_integer(
    "warmup_steps", 3, "grpo_step: untimed steps before the timed ones, in "
    "both frameworks (the first compiles; the host's heap settles at its "
    "steady size over the next ones).", lower_bound=1)
_PROMPT_LEN = flags.DEFINE_integer(
    "prompt_len", 16, "grpo_step: tokens P of each (random) prompt.",
    lower_bound=1)
_TRL = flags.DEFINE_bool(
    "trl", True, "grpo_step: also time TRL's GRPOTrainer on the same weights "
    "(reported as null when trl cannot be imported).")
_PRECISION = flags.DEFINE_enum(
    "precision", "bfloat16", ["float32", "bfloat16"],
    "grpo_step: compute precision of both frameworks' steps: float32, or "
    "bfloat16 mixed precision (f32 parameters and optimiser; rlax_llm's "
    "ModelConfig.dtype, TRL's bf16=True, its default). The roofline is "
    "measured in the same precision.")
_SHARE_PROMPT = flags.DEFINE_bool(
    "share_prompt", True, "grpo_step: rlax_llm's update runs each prompt's "
    "layers once for its G samples (make_rl_step(prompt_group=G), what the "
    "experiment loop's rl.share_prompt='auto' does here); --noshare_prompt "
    "runs them once per sample, as TRL does.")
_PROFILE = flags.DEFINE_bool(
    "profile", False, "grpo_step: also time the parts of rlax_llm's update "
    "(scoring forward, backward, optimiser), each compiled on its own.")
_PRESET = flags.DEFINE_string(
    "preset", None,
    "Model preset of rlax_llm.models.config.PRESETS to use instead of "
    "configs/default.py's model (generate) or the 3.94M-parameter Qwen2-shaped "
    "policy (grpo_step, which keeps its 512-token vocabulary).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the parameters and samples.")
_TRANSFORMERS = flags.DEFINE_bool(
    "transformers", True, "generate: also time transformers' generate on the "
    "same weights (exported with rlax_llm.models.hf.save_pretrained).")
_ROOFLINE = flags.DEFINE_bool(
    "roofline", True, "generate, grpo_step: also measure the f32 matmul "
    "roofline.")
_HOST_DEVICES = flags.DEFINE_integer(
    "host_devices", -1, "CPU devices JAX splits this host into "
    "(rlax_llm.parallel.use_host_devices): -1 one per core, 0 JAX's default "
    "single device. generate runs on a mesh over them (prompts split over "
    "'data'); transformers' torch uses the same cores as threads.",
    lower_bound=-1)
_HOST_MEMORY = flags.DEFINE_enum(
    "host_memory", "auto", ["auto", "reuse", "default"],
    "How XLA's CPU programs get their scratch memory "
    "(rlax_llm.parallel.reuse_host_memory): 'reuse' keeps it between calls "
    "(one CPU device only: --host_devices=0), 'auto' does so where that holds "
    "on a CPU-only host, 'default' leaves glibc's malloc alone. It applies to "
    "the whole process (TRL's torch included).")
_HOST_LAYOUT = flags.DEFINE_enum(
    "host_layout", "split", ["split", "shared"],
    "grpo_step: where rlax_llm's step runs (rlax_llm.parallel.layout_meshes, "
    "the experiment's distributed.host_layout): 'split' generates on a "
    "'data' mesh over the devices and updates on the first device alone "
    "(with one device per core, decode runs a device per core and the "
    "update's memory is reused: --host_memory=auto), 'shared' runs both on "
    "the one mesh. generate always decodes on a mesh over every device.")
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


# Whether `main` made XLA's CPU programs reuse their scratch memory
# (--host_memory, `rlax_llm.parallel.reuse_host_memory`).
_HOST_MEMORY_REUSED = [False]


def _device_info() -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  return {"device": dev.device_kind, "backend": dev.platform,
          "num_devices": jax.device_count(), "jax_version": jax.__version__,
          "host_memory_reused": _HOST_MEMORY_REUSED[0]}


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
  """f(a, w): `iters` chained [M, K] x [K, N] products in one fori_loop.

  Products accumulate and return in f32, whatever the operands' dtype (for
  bfloat16 operands the form XLA:CPU runs on bfloat16 kernels; see
  `rlax_llm.models.transformer.dense`).
  """
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  # pylint: enable=g-import-not-at-top

  def loop(a, w):
    def body(_, carry):
      a, _ = carry
      out = jnp.dot(a, w, preferred_element_type=jnp.float32)
      # A dependency on the product keeps XLA from hoisting it out of the
      # loop; it costs M x K adds against M x K x N multiply-adds.
      return a + (1e-30 * out[:, :1]).astype(a.dtype), out
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


def _jax_matmul_rate(m: int, k: int, n: int, iters: int, repeats: int,
                     dtype: str = "float32") -> float:
  """FLOP/s of a [M, K] x [K, N] jnp.dot of `dtype` operands, `iters` per
  jitted call."""
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  # pylint: enable=g-import-not-at-top
  a = jax.random.normal(jax.random.key(1), (m, k), jnp.float32).astype(dtype)
  w = (jax.random.normal(jax.random.key(2), (k, n), jnp.float32)
       / k**0.5).astype(dtype)
  loop = jax.jit(_matmul_loop(iters))
  return 2 * m * k * n * iters / _median_seconds(loop, (a, w), repeats)


def _torch_matmul_rate(m: int, k: int, n: int, iters: int, repeats: int,
                       dtype: str = "float32") -> float:
  """FLOP/s of a [M, K] x [K, N] torch.mm of `dtype` tensors, `iters` calls
  per timing."""
  import torch  # pylint: disable=g-import-not-at-top
  tdt = getattr(torch, dtype)
  gen = torch.Generator().manual_seed(0)
  a = torch.randn(m, k, generator=gen).to(tdt)
  w = (torch.randn(k, n, generator=gen) / k**0.5).to(tdt)
  out = torch.empty(m, n, dtype=tdt)
  with torch.inference_mode():
    torch.mm(a, w, out=out)
    seconds = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      for _ in range(iters):
        torch.mm(a, w, out=out)
      seconds.append(time.perf_counter() - t0)
  return 2 * m * k * n * iters / statistics.median(seconds)


def _jax_mesh_matmul_rate(m: int, k: int, n: int, iters: int, repeats: int,
                          dtype: str = "float32") -> float | None:
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
      jax.random.normal(jax.random.key(1), (m, k), jnp.float32).astype(dtype),
      NamedSharding(mesh, P("data")))
  w = jax.device_put(
      (jax.random.normal(jax.random.key(2), (k, n), jnp.float32)
       / k**0.5).astype(dtype),
      NamedSharding(mesh, P()))

  loop = jax.jit(jax.shard_map(_matmul_loop(iters), mesh=mesh,
                               in_specs=(P("data"), P()),
                               out_specs=P("data"), check_vma=False))
  return 2 * m * k * n * iters / _median_seconds(loop, (a, w), repeats)


def matmul_roofline(cfg, sequences: int, *, repeats: int = 5,
                    square: int = 1024,
                    with_torch: bool = True,
                    shapes: list[tuple[str, int, int, int, int]] | None = None,
                    dtype: str = "float32") -> dict[str, Any]:
  """Measures matmul FLOP/s on this machine for the decode step's shapes.

  Operands are `dtype` ("float32", or "bfloat16": JAX accumulates in and
  returns f32, torch returns bfloat16).

  `shapes` (name, M, K, N, count) replaces the decode step's
  (`decode_matmul_shapes(cfg, sequences)`), e.g. `update_matmul_shapes`.
  Each distinct shape of `shapes` and one [square, square]^2
  matmul is timed with JAX on one device (inside one jitted loop), with JAX
  split by rows over every device when there are several (`jax_mesh`), and
  with torch (a loop of `torch.mm` calls on its default threads); a shape's
  rate is the fastest of them. The roofline of
  the step is its matmul FLOPs over the time those matmuls take at those
  rates: sum_i F_i / sum_i (F_i / rate_i).

  Returns:
    {"roofline_flops_per_s", "jax_roofline_flops_per_s" (the same over
     JAX's rates alone: the fastest that any JAX program of these matmuls
     runs here), "peak_flops_per_s" (the square matmul, best of
     all), "matmul_flops_per_s": {shape name: {"jax", "jax_mesh", "torch",
     "shape"}}}.
  """
  target = 1e9  # FLOPs per timing: ~10 ms, long enough to dwarf call overhead
  rates, flops, time_s, jax_time_s = {}, 0.0, 0.0, 0.0
  if shapes is None:
    shapes = decode_matmul_shapes(cfg, sequences)
  shapes = list(shapes) + [("square", square, square, square, 0)]
  for name, m, k, n, count in shapes:
    iters = max(1, min(2000, int(target / (2 * m * k * n))))
    rate = {"shape": [m, k, n],
            "jax": _jax_matmul_rate(m, k, n, iters, repeats, dtype)}
    mesh_rate = _jax_mesh_matmul_rate(m, k, n, iters, repeats, dtype)
    if mesh_rate is not None:
      rate["jax_mesh"] = mesh_rate
    if with_torch:
      rate["torch"] = _torch_matmul_rate(m, k, n, iters, repeats, dtype)
    rates[name] = rate
    best = max(v for key, v in rate.items() if key != "shape")
    flops += 2 * m * k * n * count
    time_s += 2 * m * k * n * count / best
    jax_time_s += 2 * m * k * n * count / max(
        v for key, v in rate.items() if key in ("jax", "jax_mesh"))
  square_rate = rates["square"]
  return {"roofline_flops_per_s": flops / time_s,
          "jax_roofline_flops_per_s": flops / jax_time_s,
          "peak_flops_per_s": max(v for key, v in square_rate.items()
                                  if key != "shape"),
          "matmul_flops_per_s": rates, "dtype": dtype}


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
  ours = rlax_prompt_logits(graphdef, params, prompt_BP, mask_BP)
  return _max_abs_diff_to_transformers(ours, hf_model, prompt_BP, mask_BP)


def rlax_prompt_logits(graphdef, params, prompt_BP, mask_BP):
  """rlax_llm's full-sequence logits [B, P, V] of the padded prompts."""
  # pylint: disable=g-import-not-at-top
  import flax.nnx as nnx
  import numpy as np
  # pylint: enable=g-import-not-at-top
  forward = nnx.jit(lambda m, tok, mask: m(tok, None, mask))  # one program
  return np.asarray(forward(nnx.merge(graphdef, params), np.asarray(prompt_BP),
                            np.asarray(mask_BP, bool)))


def _max_abs_diff_to_transformers(ours_BPV, hf_model, prompt_BP,
                                  mask_BP) -> float:
  """Max |ours - transformers' logits| over the valid prompt positions."""
  # pylint: disable=g-import-not-at-top
  import numpy as np
  import torch
  # pylint: enable=g-import-not-at-top
  prompt_BP, mask_BP = np.asarray(prompt_BP), np.asarray(mask_BP, bool)
  positions_BP = np.maximum(np.cumsum(mask_BP, axis=-1) - 1, 0)
  with torch.inference_mode():
    theirs = hf_model(input_ids=torch.from_numpy(prompt_BP.astype(np.int64)),
                      attention_mask=torch.from_numpy(mask_BP.astype(np.int64)),
                      position_ids=torch.from_numpy(positions_BP)).logits
  diff = np.abs(ours_BPV - theirs.float().numpy())
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
  from rlax_llm.data.tasks import ArithmeticSetup
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


# One whole GRPO step, against TRL ------------------------------------------
# The policy of `grpo_step`: a Qwen2-shaped decoder (q/k/v biases, tied
# embeddings) of 3,936,000 parameters over a 512-token vocabulary:
# L (D H (2 Hq + 2 K) + H (Hq + 2 K) + 3 D F + 2 D) + V D + D
# = 4 (256 32 20 + 32 12 + 3 256 1024 + 512) + 512 256 + 256.
GRPO_MODEL = dict(num_layers=4, embed_dim=256, num_heads=8, num_kv_heads=2,
                  head_dim=32, mlp_dim=1024, qkv_bias=True,
                  tie_embeddings=True, rope_theta=1_000_000.0)
GRPO_MODEL_NAME = "qwen2_3.9m"
GRPO_PRECISIONS = ("float32", "bfloat16")  # --precision
GRPO_VOCAB = 512
# Token ids of the synthetic vocabulary: "<pad>" 0, "<eos>" 1, words "t2" ..
# "t511". Prompts draw from the words; every rollout decodes exactly
# new_tokens tokens (rlax_llm: an EOS id the sampler never emits; TRL:
# min_new_tokens = max_completion_length).
GRPO_PAD_ID, GRPO_EOS_ID, GRPO_FIRST_WORD = 0, 1, 2
# The optimiser of both frameworks: global-norm clipping at 1, then AdamW
# with a constant rate (the experiment loop's optimiser without warm-up).
GRPO_LEARNING_RATE, GRPO_BETAS, GRPO_GRAD_CLIP = 1e-6, (0.9, 0.99), 1.0


def grpo_model_config(preset: str | None, prompt_len: int, new_tokens: int,
                      dtype: str = "float32"):
  """The benchmark policy's ModelConfig (or a preset's shape), context P + T,
  computing in `dtype` (parameters stay f32)."""
  # pylint: disable=g-import-not-at-top
  from rlax_llm.models.config import ModelConfig, PRESETS
  # pylint: enable=g-import-not-at-top
  if preset is None:
    fields = dict(GRPO_MODEL)
  elif preset in PRESETS:
    fields = dict(PRESETS[preset])
  else:
    raise ValueError(f"Unknown model preset {preset!r}; known: "
                     f"{sorted(PRESETS)} (or none for the {GRPO_MODEL_NAME} "
                     "policy).")
  fields["max_seq_len"] = prompt_len + new_tokens
  fields["dtype"] = dtype
  fields["param_dtype"] = "float32"
  return ModelConfig(vocab_size=GRPO_VOCAB, **fields)


def update_matmul_shapes(cfg, sequences: int, prompt_len: int,
                         new_tokens: int) -> list[tuple[str, int, int, int,
                                                        int]]:
  """(name, M, K, N, count) of the matmuls of one update's forward + backward.

  The forward runs the blocks' projections on all N (P + T) tokens and the
  output layer on the N T completion positions; the backward multiplies by
  the transposed weights ([M, N] x [N, K], "/dx") and forms the weight
  gradients ([K, M] x [M, N], "/dw"), each as many FLOPs as the forward.
  """
  tokens = sequences * (prompt_len + new_tokens)
  forward = [(name, tokens if name != "vocab" else sequences * new_tokens,
              k, n, count)
             for name, _, k, n, count in decode_matmul_shapes(cfg, 1)]
  out = []
  for name, m, k, n, count in forward:
    out += [(name, m, k, n, count), (name + "/dx", m, n, k, count),
            (name + "/dw", k, m, n, count)]
  return out


def score_forward_flops(cfg, sequences: int, prompt_len: int,
                        new_tokens: int, prompt_group: int = 1) -> int:
  """Model FLOPs of scoring N rollouts once (the update's forward).

    F_fwd = 2 W_blk N S + 2 D V N T + 4 L Hq H N S^2,   S = P + T,

  W_blk = L (D Hq H + 2 D K H + Hq H D + 3 D F) the blocks' matmul weights
  (`decode_matmul_params` without the output layer), applied to every token
  of [prompt | completion]; the output layer D V only where a completion
  token is predicted (N T rows); attention q.k and p.v over all S positions
  of each sequence (2 FLOPs per multiply-add, the causal mask not
  subtracted, as PaLM's MFU counts it).

  With `prompt_group` G > 1 (`score_completions(prompt_group=G)`) the
  blocks run each of the B = N / G prompts once and the N completions
  without their last token (it predicts nothing), whose queries see the
  prompt's P keys and their own:
    F_fwd = 2 W_blk (B P + N T') + 2 D V N T
            + 4 L Hq H (B P^2 + N T' (P + T')),   T' = T - 1.
  """
  w_blk = decode_matmul_params(cfg) - cfg.embed_dim * cfg.vocab_size
  head = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim
  output = 2 * cfg.embed_dim * cfg.vocab_size * sequences * new_tokens
  p = prompt_len
  if prompt_group > 1:
    b, t1 = sequences // prompt_group, new_tokens - 1
    return (2 * w_blk * (b * p + sequences * t1) + output
            + head * (b * p * p + sequences * t1 * (p + t1)))
  s = p + new_tokens
  return 2 * w_blk * sequences * s + output + head * sequences * s * s


def update_flops(cfg, sequences: int, prompt_len: int, new_tokens: int,
                 prompt_group: int = 1) -> int:
  """FLOPs of one update's forward + backward: 3 x `score_forward_flops`.

    F_update = 6 W_blk N S + 6 D V N T + 12 L Hq H N S^2

  (~6 x params x tokens plus attention); the backward is twice the forward.
  The optimiser's elementwise work is not counted.
  """
  return 3 * score_forward_flops(cfg, sequences, prompt_len, new_tokens,
                                prompt_group)


def synthetic_reward(completion_ids) -> list[float]:
  """The reward of both frameworks: the fraction of even token ids.

  Args:
    completion_ids: one sequence of generated token ids per rollout.

  Returns:
    One float in [0, 1] per rollout (0 for an empty completion).
  """
  return [sum(1 for t in ids if int(t) % 2 == 0) / max(len(ids), 1)
          for ids in completion_ids]


def grpo_prompts(num_prompts: int, prompt_len: int, seed: int):
  """[B, P] int32 prompt ids drawn uniformly from the vocabulary's words."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  return rng.integers(GRPO_FIRST_WORD, GRPO_VOCAB,
                      size=(num_prompts, prompt_len)).astype(np.int32)


def grpo_tokenizer():
  """The synthetic vocabulary as a transformers fast tokenizer (for TRL).

  Word-level: "t<id>" words separated by spaces map one to one onto ids, so
  TRL's prompts tokenise to exactly rlax_llm's prompt ids.
  """
  # pylint: disable=g-import-not-at-top
  import tokenizers
  import transformers
  # pylint: enable=g-import-not-at-top
  vocab = {"<pad>": GRPO_PAD_ID, "<eos>": GRPO_EOS_ID}
  vocab.update({f"t{i}": i for i in range(GRPO_FIRST_WORD, GRPO_VOCAB)})
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab,
                                                         unk_token="<pad>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
      padding_side="left")


def _spread(prefix: str, seconds: list[float]) -> dict[str, Any]:
  """{prefix_s: median, prefix_s_all: all, prefix_s_spread: max - min}."""
  return {f"{prefix}_s": statistics.median(seconds),
          f"{prefix}_s_all": seconds,
          f"{prefix}_s_spread": max(seconds) - min(seconds)}


def _largest_divisor_mesh(num_prompts: int):
  """A "data" mesh over the most devices that divide the prompts."""
  # pylint: disable=g-import-not-at-top
  import jax
  from rlax_llm.parallel import mesh as mesh_lib
  # pylint: enable=g-import-not-at-top
  devices = jax.devices()
  k = max(d for d in range(1, len(devices) + 1) if num_prompts % d == 0)
  return mesh_lib.make_mesh({"data": k}, devices=devices[:k])


def grpo_optimizer():
  """Gradient clipping + AdamW at a constant rate (see GRPO_LEARNING_RATE)."""
  import optax  # pylint: disable=g-import-not-at-top
  return optax.chain(
      optax.clip_by_global_norm(GRPO_GRAD_CLIP),
      optax.adamw(GRPO_LEARNING_RATE, b1=GRPO_BETAS[0], b2=GRPO_BETAS[1],
                  weight_decay=0.0))


def rlax_grpo_step(model_cfg, prompt_BP, *, samples_per_prompt: int,
                   new_tokens: int, repeats: int, warmup: int, seed: int,
                   layout: str, profile: bool = False,
                   share_prompt: bool = True) -> dict[str, Any]:
  """Times rlax_llm's GRPO step as the experiment loop composes it.

  One step: `generate_on_mesh_jit` (B prompts x G samples, fetched to the
  host), the synthetic reward and GRPO group advantages on the host
  (`methods.get_method("grpo")`) flattened into a `training.RLBatch`, then one
  jitted update (`training.make_rl_step` under `training.jit_step`: one
  epoch, one minibatch, clipped-ratio loss, one AdamW update) whose metrics
  are fetched. The first `warmup` steps are untimed (the first compiles; its
  time is `warmup_s`); then `repeats` steps, each part timed to its
  blocking fetch. `layout` ("shared" or "split", `parallel.layout_meshes`)
  places them: generate on a "data" mesh over the most devices that divide
  B, the update on that mesh or on its first device alone (then the
  parameters go to the generate mesh first, counted in `generate_s`).
  With `share_prompt` the update scores each prompt once for its G samples
  (`make_rl_step(prompt_group=G)`, as the experiment loop does for this
  layout), else once per sample.

  Returns:
    {"step_s", "generate_s", "score_s" (reward + advantages + batch),
     "update_s", each with `_all` and `_spread`; "warmup_s", "host_layout",
     "prompt_group",
     "mesh" (the update's), "generate_mesh", "reward_mean", "loss";
     "profile" with `profile` (see `profile_rlax_update`)}, and the initial
     parameters under "_params" (for the export; removed before printing).
  """
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  import numpy as np
  from rlax_llm.methods import get_method
  from rlax_llm.parallel import mesh as mesh_lib
  from rlax_llm.sampling.generate import generate_on_mesh_jit
  from rlax_llm.sampling.samplers import SamplerConfig
  from rlax_llm.training import state as state_lib
  from rlax_llm.training import steps as steps_lib
  # pylint: enable=g-import-not-at-top

  b, g, t = prompt_BP.shape[0], samples_per_prompt, new_tokens
  devices = list(_largest_divisor_mesh(b).devices.flat)
  mesh, gen_mesh = mesh_lib.layout_meshes({"data": -1}, layout, devices)
  optimizer = grpo_optimizer()
  state, shardings = state_lib.create_train_state(model_cfg, optimizer, mesh,
                                                  seed=seed)
  params0 = jax.device_get(state.params)
  graphdef = state_lib.model_graphdef(model_cfg)
  method = get_method("grpo", max_new_tokens=t)
  prompt_group = g if share_prompt else 1
  rl_step = steps_lib.jit_step(
      steps_lib.make_rl_step(graphdef, optimizer, method.policy_loss,
                             mesh=mesh, prompt_group=prompt_group),
      shardings, mesh)
  sampler = SamplerConfig(1.0, 0, 1.0, 0.0).validate()
  mask_BP = np.ones(prompt_BP.shape, bool)
  key = jax.random.key(seed)
  advantage_fn = jax.jit(method.advantage_fn)  # as the experiment layer runs it

  def step(state, i):
    t0 = time.perf_counter()
    ro = jax.device_get(generate_on_mesh_jit(
        graphdef, mesh_lib.onto_mesh(state.params, gen_mesh), prompt_BP,
        mask_BP, jax.random.fold_in(key, i), mesh=gen_mesh, num_samples=g,
        max_new_tokens=t, eos_id=NO_EOS_ID, pad_id=GRPO_PAD_ID,
        sampler=sampler, decode_chunk=None))
    t1 = time.perf_counter()
    if (np.asarray(ro.lengths) != t).any():
      raise RuntimeError(
          f"generate decoded {ro.lengths.min()}..{ro.lengths.max()} tokens "
          f"instead of exactly {t}; the step would not do the work it claims.")
    reward_N = np.asarray(synthetic_reward(ro.tokens.tolist()), np.float32)
    adv_BG = np.asarray(
        advantage_fn(jnp.asarray(reward_N.reshape(b, g))))
    # The RL batch as the experiment layer flattens groups: N = B * G rows,
    # each prompt repeated per sample, sequence advantages over the tokens.
    mask_NT = np.asarray(ro.mask, bool)
    batch = steps_lib.RLBatch(
        prompt=np.repeat(prompt_BP, g, axis=0),
        prompt_mask=np.repeat(mask_BP, g, axis=0),
        completion=np.asarray(ro.tokens), completion_mask=mask_NT,
        old_logp=np.asarray(ro.logp, np.float32),
        advantages=(adv_BG.reshape(b * g, 1) * mask_NT).astype(np.float32))
    t2 = time.perf_counter()
    state, metrics = rl_step(state, batch)
    metrics = jax.device_get(metrics)
    t3 = time.perf_counter()
    return state, batch, metrics, reward_N, (t3 - t0, t1 - t0, t2 - t1, t3 - t2)

  t0 = time.perf_counter()
  state, batch, _, _, _ = step(state, repeats)
  warmup_s = time.perf_counter() - t0
  for i in range(1, warmup):
    state, batch, _, _, _ = step(state, repeats + i)
  times = []
  for i in range(repeats):
    state, batch, metrics, reward_N, parts = step(state, i)
    times.append(parts)
  steps_s, gen_s, score_s, upd_s = (list(x) for x in zip(*times))
  rec = {**_spread("step", steps_s), **_spread("generate", gen_s),
         **_spread("score", score_s), **_spread("update", upd_s),
         "warmup_s": warmup_s, "host_layout": layout,
         "prompt_group": prompt_group,
         "mesh": dict(mesh.shape), "generate_mesh": dict(gen_mesh.shape),
         "reward_mean": float(reward_N.mean()),
         "loss": float(metrics["loss"]), "_params": params0}
  if profile:
    rec["profile"] = profile_rlax_update(
        graphdef, state, mesh, batch, rl_step, optimizer,
        method.policy_loss, repeats=repeats, prompt_group=prompt_group)
  return rec


def profile_rlax_update(graphdef, state, mesh, batch, rl_step,
                        optimizer, policy_loss, *, repeats: int,
                        prompt_group: int = 1) -> dict[str, Any]:
  """Times the parts of rlax_llm's update, each compiled on its own.

  On the step's batch and parameters, on the same mesh: `forward_s` the
  scoring forward (with the step's `prompt_group`) and the policy loss
  (`training.score_completions` +
  the GRPO loss), `forward_backward_s` its `jax.value_and_grad`,
  `backward_s` their difference, `optimizer_s` the clipped AdamW update
  and `apply_updates` on those gradients, and `update_s` the whole jitted
  step (`training.jit_step`, batch placement included). `other_s` =
  update_s - forward_backward_s - optimizer_s is what the step spends
  besides the three parts (the minibatch permutation and gathers, the
  gradient accumulator, metrics). Each is the median of `repeats` calls
  after one untimed call; `*_compile_s` their compile times.
  `forward_xla_flops` is XLA's own FLOP count of the compiled forward,
  summed over the mesh's devices (a check of `score_forward_flops`, which
  it exceeds by the elementwise work), None where the backend reports none.
  """
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  import optax
  from rlax_llm.parallel import distributed
  from rlax_llm.training.scoring import score_completions
  # pylint: enable=g-import-not-at-top
  placed = distributed.global_batch_to_devices(batch, mesh)
  mask = placed.completion_mask.astype(bool)
  num_tokens = jnp.sum(mask).astype(jnp.float32)
  num_seqs = jnp.sum(jnp.any(mask, axis=-1)).astype(jnp.float32)

  def loss(params, b):
    scores = score_completions(graphdef, params, b.prompt, b.prompt_mask,
                               b.completion, b.completion_mask,
                               prompt_group=prompt_group)
    return policy_loss(scores.logp, b.old_logp, b.advantages,
                       b.completion_mask.astype(bool), num_tokens=num_tokens,
                       num_seqs=num_seqs)[0]

  def opt_update(params, opt_state, grads):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  out = {}

  def compile_and_time(name, fn, *args):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    out[f"{name}_compile_s"] = time.perf_counter() - t0
    out[f"{name}_s"] = _median_seconds(compiled, args, repeats)
    return compiled

  fwd = compile_and_time("forward", loss, state.params, placed)
  fwd_bwd = compile_and_time("forward_backward", jax.value_and_grad(loss),
                             state.params, placed)
  _, grads = fwd_bwd(state.params, placed)
  compile_and_time("optimizer", opt_update, state.params, state.opt_state,
                   grads)
  try:
    cost = fwd.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    # XLA counts one device's program; the mesh runs `mesh.size` of them.
    out["forward_xla_flops"] = (float(cost["flops"]) * mesh.size if cost
                                else None)
  except (KeyError, TypeError, NotImplementedError):
    out["forward_xla_flops"] = None
  # The whole step last: it donates the state the parts above read.
  seconds = []
  for _ in range(repeats + 1):
    t0 = time.perf_counter()
    state, metrics = rl_step(state, batch)
    jax.block_until_ready((state, metrics))
    seconds.append(time.perf_counter() - t0)
  out["update_s"] = statistics.median(seconds[1:])
  out["backward_s"] = out["forward_backward_s"] - out["forward_s"]
  out["other_s"] = (out["update_s"] - out["forward_backward_s"]
                    - out["optimizer_s"])
  return out


def trl_grpo_step(hf_dir: str, prompt_BP, *, samples_per_prompt: int,
                  new_tokens: int, repeats: int, warmup: int, seed: int,
                  reference=None, bf16: bool = False) -> dict[str, Any]:
  """Times TRL's GRPOTrainer on the same weights, prompts and reward.

  The checkpoint in `hf_dir` (rlax_llm's initial parameters) is loaded in
  float32; prompts are the same ids as words of `grpo_tokenizer`. The
  trainer is set up as rlax_llm's step: per_device_train_batch_size = N
  with num_generations = G (one generation batch per optimiser step, no
  gradient accumulation, so no old-log-prob pass), sampling at temperature
  1 with no top-k/top-p, exactly `new_tokens` tokens (min_new_tokens),
  beta 0 (no reference model), no gradient checkpointing (rlax_llm keeps
  the activations for the backward; TRL's default recomputes them),
  loss_type "grpo" (sequence mean of token means, rlax_llm's default
  aggregation), epsilon 0.2, group-std scaling, and AdamW with rlax_llm's
  rate, betas, clipping and no decay. It trains
  `warmup` + `repeats` steps; the first `warmup` are untimed. `step_s` spans
  a step from the trainer's on_step_begin to on_step_end callback,
  `generate_s` the model's `generate`, `score_s` the rest of
  `_generate_and_score_completions`
  (tokenising, decoding, reward, advantages) and `update_s` the remainder
  (forward, backward, optimiser). With `reference` = (graphdef, params) of
  rlax_llm's model, both models' logits on the prompts must agree within
  LOGITS_ATOL (`logits_max_abs_diff`) before anything is timed. `bf16`
  trains in TRL's bfloat16 mixed precision (GRPOConfig(bf16=True), TRL's
  default: the f32 model runs under torch's bfloat16 autocast).

  The trainer runs in a fresh process (multiprocessing "spawn"): torch
  there has glibc's default malloc and no JAX runtime beside it, whatever
  this process set up for rlax_llm (`rlax_llm.parallel.reuse_host_memory`
  keeps one malloc arena for all threads, which slowed TRL's bfloat16
  step from 1.33 to 2.0 s in one process). Whatever the trainer prints
  goes to stderr, so stdout keeps only the JSON.

  Raises:
    ImportError: when trl, transformers, datasets or torch are missing.
  """
  # pylint: disable=g-import-not-at-top,unused-import
  import multiprocessing
  import numpy as np
  import datasets  # noqa: F401  (fail here, not in the child, when missing)
  import torch  # noqa: F401
  import transformers  # noqa: F401
  import trl  # noqa: F401
  # pylint: enable=g-import-not-at-top,unused-import
  prompt_BP = np.asarray(prompt_BP)
  ours = (None if reference is None else
          rlax_prompt_logits(*reference, prompt_BP,
                             np.ones(prompt_BP.shape, bool)))
  ctx = multiprocessing.get_context("spawn")
  with ctx.Pool(1) as pool:
    return pool.apply(_trl_grpo_step, (hf_dir, prompt_BP), dict(
        samples_per_prompt=samples_per_prompt, new_tokens=new_tokens,
        repeats=repeats, seed=seed, warmup=warmup, reference_logits=ours,
        bf16=bf16))


def _trl_grpo_step(hf_dir, prompt_BP, *, samples_per_prompt, new_tokens,
                   repeats, seed, warmup, reference_logits, bf16):
  with contextlib.redirect_stdout(sys.stderr):
    return _trl_grpo_step_here(
        hf_dir, prompt_BP, samples_per_prompt=samples_per_prompt,
        new_tokens=new_tokens, repeats=repeats, seed=seed, warmup=warmup,
        reference_logits=reference_logits, bf16=bf16)


def _trl_grpo_step_here(hf_dir, prompt_BP, *, samples_per_prompt,
                        new_tokens, repeats, seed, warmup, reference_logits,
                        bf16):
  # pylint: disable=g-import-not-at-top
  import tempfile
  import datasets
  import numpy as np
  import torch
  import transformers
  import trl
  # pylint: enable=g-import-not-at-top
  n = prompt_BP.shape[0] * samples_per_prompt
  tokenizer = grpo_tokenizer()
  model = transformers.AutoModelForCausalLM.from_pretrained(
      hf_dir, dtype=torch.float32)
  diff = None
  if reference_logits is not None:
    diff = _max_abs_diff_to_transformers(reference_logits, model.eval(),
                                         prompt_BP,
                                         np.ones(prompt_BP.shape, bool))
    if not diff <= LOGITS_ATOL:
      raise RuntimeError(
          f"TRL's model (transformers) gives logits {diff:.3g} away from "
          f"rlax_llm's (> {LOGITS_ATOL}); the two steps would not train the "
          "same model.")
  gen_s, rollout_s, step_s, lengths = [], [], [], []
  generate = model.generate

  def timed_generate(*args, **kwargs):
    t0 = time.perf_counter()
    out = generate(*args, **kwargs)
    gen_s.append(time.perf_counter() - t0)
    return out

  model.generate = timed_generate

  class TimedGRPOTrainer(trl.GRPOTrainer):

    def _generate_and_score_completions(self, inputs):
      t0 = time.perf_counter()
      out = super()._generate_and_score_completions(inputs)
      rollout_s.append(time.perf_counter() - t0)
      return out

  class StepTimer(transformers.TrainerCallback):

    def on_step_begin(self, args, state, control, **kwargs):
      self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
      step_s.append(time.perf_counter() - self.t0)

  def even_token_reward(prompts, completions, completion_ids, **kwargs):
    del prompts, completions, kwargs
    lengths.extend(len(ids) for ids in completion_ids)
    return synthetic_reward(completion_ids)

  prompts = [" ".join(f"t{i}" for i in row) for row in prompt_BP.tolist()]
  # Each step takes the next B prompts (no shuffling): the same B every step.
  dataset = datasets.Dataset.from_dict(
      {"prompt": prompts * (warmup + repeats)})
  with tempfile.TemporaryDirectory() as out_dir:
    args = trl.GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=n,
        gradient_accumulation_steps=1, num_generations=samples_per_prompt,
        max_completion_length=new_tokens,
        generation_kwargs={"min_new_tokens": new_tokens},
        temperature=1.0, top_k=0, top_p=1.0, beta=0.0, loss_type="grpo",
        epsilon=0.2, scale_rewards="group", num_iterations=1,
        learning_rate=GRPO_LEARNING_RATE, adam_beta1=GRPO_BETAS[0],
        adam_beta2=GRPO_BETAS[1], weight_decay=0.0,
        max_grad_norm=GRPO_GRAD_CLIP, lr_scheduler_type="constant",
        warmup_steps=0, max_steps=warmup + repeats, shuffle_dataset=False,
        logging_steps=10 * (warmup + repeats), save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(), bf16=bf16, seed=seed,
        gradient_checkpointing=False,
        disable_tqdm=True, dataloader_num_workers=0, log_completions=False)
    trainer = TimedGRPOTrainer(
        model=model, reward_funcs=[even_token_reward], args=args,
        train_dataset=dataset, processing_class=tokenizer,
        callbacks=[StepTimer()])
    trainer.train()
  if len(step_s) != warmup + repeats:
    raise RuntimeError(f"TRL ran {len(step_s)} steps instead of "
                       f"{warmup + repeats}; the timings would not match.")
  if set(lengths) != {new_tokens}:
    raise RuntimeError(
        f"TRL generated completions of {sorted(set(lengths))} tokens instead "
        f"of exactly {new_tokens}; the step would not do the work it claims.")
  rec = {**_spread("step", step_s[warmup:]), "warmup_s": step_s[0],
         "logits_max_abs_diff": diff, "trl_version": trl.__version__,
         "transformers_version": transformers.__version__,
         "torch_version": torch.__version__,
         "torch_threads": torch.get_num_threads(), "optim": str(args.optim),
         "bf16": bool(args.bf16),
         "gradient_checkpointing": bool(args.gradient_checkpointing)}
  if len(rollout_s) == len(step_s) and len(gen_s) == len(step_s):
    rest = [r - g for r, g in zip(rollout_s, gen_s)]
    upd = [s - r for s, r in zip(step_s, rollout_s)]
    rec.update({**_spread("generate", gen_s[warmup:]),
                **_spread("score", rest[warmup:]),
                **_spread("update", upd[warmup:])})
  else:  # this TRL version does not generate where the timers look
    rec.update({"generate_s": None, "score_s": None, "update_s": None})
  return rec


def bench_grpo_step(*, num_prompts: int = 8, samples_per_prompt: int = 8,
                    new_tokens: int = 64, prompt_len: int = 16,
                    repeats: int = 3, warmup: int = 3,
                    preset: str | None = None, seed: int = 0,
                    trl: bool = True, roofline: bool = True,
                    profile: bool = False,
                    layout: str = "split",
                    precision: str = "bfloat16",
                    share_prompt: bool = True) -> dict[str, Any]:
  """One whole GRPO step in rlax_llm and in TRL's GRPOTrainer.

  B prompts of P random word tokens x G samples x T new tokens: generate,
  reward (`synthetic_reward`, the same function in both), group advantages
  and one AdamW update, on the `GRPO_MODEL` policy (or a preset's shape)
  freshly initialised by rlax_llm and exported with
  `rlax_llm.models.hf.save_pretrained` for TRL. Timings are the median
  (and spread, max - min) of `repeats` steps after `warmup` untimed ones
  (the first compiles; on a CPU host the process's heap takes a few steps
  to reach its steady size: see `rlax_llm.parallel.reuse_host_memory`).

  `precision` "float32" computes in f32 in both; "bfloat16" is mixed
  precision in both: f32 parameters and optimiser, bfloat16 activations and
  matmul operands (rlax_llm: ModelConfig.dtype; TRL: `bf16=True`, its
  default, i.e. torch autocast), f32 log-probs and loss; the roofline is
  then measured with bfloat16 operands.

  FLOPs (see `update_flops`, `score_forward_flops`):
    update_flops   = 6 W_blk N S + 6 D V N T + 12 L Hq H N S^2, S = P + T,
    generate_flops = N T F_tok, F_tok = `decode_flops_per_token(cfg, P, T)`
                     (the prefill is not counted).
  With `roofline`, each part's achieved rate (FLOPs / median seconds) is
  divided by the measured matmul roofline of its shapes (`matmul_roofline`:
  the decode step's matmuls at N rows for generate, `update_matmul_shapes`
  for the update): `generate_roofline_fraction`,
  `update_roofline_fraction`, and for the whole step
  `step_roofline_fraction` = (generate + update FLOPs) / step_s over the
  FLOP-weighted roofline of both.

  Returns:
    One record: the shapes, `params`, the FLOP counts, `rlax` and `trl` (None
    with `trl_unavailable` saying why when TRL cannot be imported) with
    their timings, `trl_over_rlax` (step_s ratio; `_generate`, `_update` per
    part) and, with `roofline`, the rates and fractions.
  """
  # pylint: disable=g-import-not-at-top
  import tempfile
  from rlax_llm.models import hf
  from rlax_llm.training import state as state_lib
  # pylint: enable=g-import-not-at-top
  for name, value in (("prompts", num_prompts),
                      ("samples_per_prompt", samples_per_prompt),
                      ("new_tokens", new_tokens), ("prompt_len", prompt_len),
                      ("repeats", repeats), ("warmup_steps", warmup)):
    if value < 1:
      raise ValueError(f"--{name} must be a positive integer, got {value}.")
  if samples_per_prompt < 2:
    raise ValueError("--samples_per_prompt must be at least 2: GRPO's group "
                     "advantages need two samples per prompt.")
  if precision not in GRPO_PRECISIONS:
    raise ValueError(f"--precision must be one of {GRPO_PRECISIONS}, got "
                     f"{precision!r}.")
  model_cfg = grpo_model_config(preset, prompt_len, new_tokens, precision)
  # The export, and the check that TRL's model gives rlax_llm's logits, use
  # the same weights computing in f32.
  f32_cfg = grpo_model_config(preset, prompt_len, new_tokens)
  n = num_prompts * samples_per_prompt
  prompt_BP = grpo_prompts(num_prompts, prompt_len, seed)
  rec = {
      "bench": "grpo_step", "model": preset or GRPO_MODEL_NAME,
      "params": model_cfg.num_params, "vocab": model_cfg.vocab_size,
      "prompts": num_prompts, "samples_per_prompt": samples_per_prompt,
      "sequences": n, "prompt_len": prompt_len, "new_tokens": new_tokens,
      "repeats": repeats, "warmup_steps": warmup, "precision": precision,
      "update_flops": update_flops(model_cfg, n, prompt_len, new_tokens),
      "rlax_update_flops": update_flops(
          model_cfg, n, prompt_len, new_tokens,
          samples_per_prompt if share_prompt else 1),
      "generate_flops": n * new_tokens * decode_flops_per_token(
          model_cfg, prompt_len, new_tokens),
      **_device_info(),
  }
  ours = rlax_grpo_step(model_cfg, prompt_BP,
                        samples_per_prompt=samples_per_prompt,
                        new_tokens=new_tokens, repeats=repeats, seed=seed,
                        warmup=warmup, layout=layout, profile=profile,
                        share_prompt=share_prompt)
  params0 = ours.pop("_params")
  graphdef = state_lib.model_graphdef(f32_cfg)
  rec["rlax"] = ours
  rec["trl"] = None
  if trl:
    with tempfile.TemporaryDirectory() as hf_dir:
      hf.save_pretrained((f32_cfg, params0), hf_dir)
      try:
        rec["trl"] = trl_grpo_step(
            hf_dir, prompt_BP, samples_per_prompt=samples_per_prompt,
            new_tokens=new_tokens, repeats=repeats, seed=seed,
            warmup=warmup, reference=(graphdef, params0),
            bf16=precision == "bfloat16")
      except ImportError as e:
        rec["trl_unavailable"] = (
            f"{e}; install it with `pip install trl` (the `bench` extra).")
  else:
    rec["trl_unavailable"] = "not requested (--notrl)"
  theirs = rec["trl"]
  for part in ("step", "generate", "update"):
    key = "trl_over_rlax" + ("" if part == "step" else f"_{part}")
    ok = theirs is not None and theirs.get(f"{part}_s") is not None
    rec[key] = theirs[f"{part}_s"] / ours[f"{part}_s"] if ok else None

  if roofline:
    rr = min(repeats, 3)
    gen = matmul_roofline(model_cfg, n, repeats=rr, with_torch=trl,
                          dtype=precision)
    upd = matmul_roofline(model_cfg, n, repeats=rr, with_torch=trl,
                          shapes=update_matmul_shapes(model_cfg, n, prompt_len,
                                                      new_tokens),
                          dtype=precision)
    g_rate, u_rate = gen["roofline_flops_per_s"], upd["roofline_flops_per_s"]
    g_flops = rec["generate_flops"]

    def step_rate(u_flops):  # the FLOP-weighted roofline of both parts
      return (g_flops + u_flops) / (g_flops / g_rate + u_flops / u_rate)

    rec["roofline"] = {
        "dtype": precision,
        "generate_flops_per_s": g_rate, "update_flops_per_s": u_rate,
        "step_flops_per_s": step_rate(rec["update_flops"]),
        "peak_flops_per_s": max(gen["peak_flops_per_s"],
                                upd["peak_flops_per_s"]),
        # The fraction an update made of nothing but its matmuls, each at
        # JAX's own measured rate, would reach: the ceiling of
        # update_roofline_fraction for rlax_llm (below 1 where torch's
        # kernels outrun XLA's at these shapes).
        "update_jax_ceiling_fraction": (
            upd["jax_roofline_flops_per_s"] / u_rate),
        "generate_jax_ceiling_fraction": (
            gen["jax_roofline_flops_per_s"] / g_rate),
        "generate_matmul_flops_per_s": gen["matmul_flops_per_s"],
        "update_matmul_flops_per_s": upd["matmul_flops_per_s"]}
    for side, u_flops in ((ours, rec["rlax_update_flops"]),
                          (theirs, rec["update_flops"])):
      if side is None:
        continue
      side["step_roofline_fraction"] = (
          (g_flops + u_flops) / side["step_s"] / step_rate(u_flops))
      for part, flops, rate in (("generate", g_flops, g_rate),
                                ("update", u_flops, u_rate)):
        side[f"{part}_roofline_fraction"] = (
            flops / side[f"{part}_s"] / rate
            if side.get(f"{part}_s") is not None else None)
    prof = ours.get("profile")
    if prof:
      fwd = score_forward_flops(model_cfg, n, prompt_len, new_tokens,
                                ours["prompt_group"])
      prof["forward_roofline_fraction"] = fwd / prof["forward_s"] / u_rate
      prof["backward_roofline_fraction"] = (
          2 * fwd / prof["backward_s"] / u_rate
          if prof["backward_s"] > 0 else None)
  return rec


def _run_generate() -> list[dict[str, Any]]:
  try:
    sizes = [int(s) for s in _SEQUENCES.value]
  except ValueError:
    raise app.UsageError(f"--sequences must be integers, got "
                         f"{_SEQUENCES.value}.") from None
  return [bench_generate(n, samples_per_prompt=_SAMPLES.value,
                         new_tokens=_NEW_TOKENS.value or 128,
                         repeats=_REPEATS.value or 5,
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
                        repeats=_REPEATS.value or 5, seed=_SEED.value,
                        full_size=_FULL_SIZE.value)


def _run_grpo_step() -> list[dict[str, Any]]:
  return [bench_grpo_step(
      num_prompts=_PROMPTS.value, samples_per_prompt=_SAMPLES.value,
      new_tokens=_NEW_TOKENS.value or 64, prompt_len=_PROMPT_LEN.value,
      repeats=_REPEATS.value or 3, warmup=_WARMUP.value, preset=_PRESET.value,
      seed=_SEED.value, trl=_TRL.value, roofline=_ROOFLINE.value,
      profile=_PROFILE.value, layout=_HOST_LAYOUT.value,
      precision=_PRECISION.value, share_prompt=_SHARE_PROMPT.value)]


# XRPO's allocator -----------------------------------------------------------------
XRPO_ALLOCATE_SIZES = ((16, 16, 64), (512, 32, 4096))  # prompts, slots, budget


def bench_xrpo_allocate(sizes=XRPO_ALLOCATE_SIZES, *, repeats: int = 5,
                        seed: int = 0) -> list[dict[str, Any]]:
  """Times one allocator phase per (prompts, capacity, budget) of `sizes`:
  reward stds uniform in [0, 0.5), counts in [2, capacity / 2)."""
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  import numpy as np
  from rlax_llm.core import allocation
  # pylint: enable=g-import-not-at-top
  out = []
  for prompts, capacity, budget in sizes:
    rng = np.random.default_rng(seed)
    std = jnp.asarray(rng.uniform(0.0, 0.5, prompts), jnp.float32)
    count = jnp.asarray(rng.integers(2, max(3, capacity // 2), prompts),
                        jnp.int32)
    call = lambda: allocation.xrpo_allocate(std, count, budget,  # noqa: E731
                                            capacity=capacity)
    t0 = time.perf_counter()
    given = np.asarray(jax.block_until_ready(call()))
    compile_s = time.perf_counter() - t0
    seconds = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(call())
      seconds.append(time.perf_counter() - t0)
    out.append({"bench": "xrpo_allocate", "prompts": prompts,
                "capacity": capacity, "budget": budget,
                "given_out": int(given.sum()), "compile_s": compile_s,
                **_spread("call", seconds)})
  return out


def _run_xrpo_allocate() -> list[dict[str, Any]]:
  return bench_xrpo_allocate(repeats=_REPEATS.value or 5, seed=_SEED.value)


def _run_rewards() -> list[dict[str, Any]]:
  from experiments import bench_rewards  # pylint: disable=g-import-not-at-top
  return bench_rewards.run()


BENCHES: dict[str, Callable[[], list[dict[str, Any]]]] = {
    "generate": _run_generate,
    "grpo_step": _run_grpo_step,
    "logprobs": _run_logprobs,
    "rewards": _run_rewards,
    "xrpo_allocate": _run_xrpo_allocate,
}


def _aligned(rows: list[tuple[str, ...]]) -> str:
  """Right-aligned columns, the first row a header underlined with dashes."""
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


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
  lines = _aligned(rows).splitlines()
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
  return _aligned(rows)


def _rewards_table(records: list[dict[str, Any]]) -> str:
  head = ("workload", "mode", "items", "verifications/s", "accuracy")
  rows = [head] + [
      (str(r.get("workload")), str(r.get("mode")), str(r.get("items")),
       f"{r.get('verifications_per_s', 0):,.0f}", f"{r.get('accuracy', 0):.3f}")
      for r in records]
  return _aligned(rows)


def _allocate_table(records: list[dict[str, Any]]) -> str:
  head = ("prompts", "slots", "budget", "compile s", "call ms", "spread ms")
  rows = [head] + [
      (str(r["prompts"]), str(r["capacity"]), str(r["budget"]),
       f"{r['compile_s']:.2f}", f"{r['call_s'] * 1e3:.2f}",
       f"{r['call_s_spread'] * 1e3:.2f}") for r in records]
  return _aligned(rows)


def _grpo_table(records: list[dict[str, Any]]) -> str:
  """The grpo_step records: one row per framework, seconds and fractions."""
  def sec(side, part):
    v = side.get(f"{part}_s") if side else None
    return "-" if v is None else (
        f"{v:.3f} ±{side[f'{part}_s_spread'] / 2:.3f}")

  def frac(side, part):
    v = side.get(f"{part}_roofline_fraction") if side else None
    return "-" if v is None else f"{v:.3f}"

  head = ("framework", "step s", "generate s", "score s", "update s",
          "gen frac", "upd frac", "step frac")
  rows, notes = [head], []
  for r in records:
    for name in ("rlax", "trl"):
      side = r.get(name)
      rows.append((name, sec(side, "step"), sec(side, "generate"),
                   sec(side, "score"), sec(side, "update"),
                   frac(side, "generate"), frac(side, "update"),
                   frac(side, "step")))
    notes.append(
        f"{r['model']} ({r['params']:,} params), {r['prompts']} prompts x "
        f"{r['samples_per_prompt']} samples x {r['new_tokens']} new tokens "
        f"(prompt {r['prompt_len']}); update {r['update_flops'] / 1e9:.2f} "
        f"GFLOP, generate {r['generate_flops'] / 1e9:.2f} GFLOP; "
        + (f"TRL / rlax_llm = {r['trl_over_rlax']:.2f}"
           if r.get("trl_over_rlax") else
           f"TRL: {r.get('trl_unavailable')}"))
    prof = r["rlax"].get("profile")
    if prof:
      notes.append("rlax_llm update parts (s): " + ", ".join(
          f"{k[:-2]} {prof[k]:.4f}" for k in (
              "forward_s", "backward_s", "optimizer_s", "other_s",
              "update_s")))
  return "\n".join([_aligned(rows)] + notes)


def main(argv):
  logging.set_verbosity(logging.WARNING)  # stdout/stderr stay readable
  # pylint: disable=g-import-not-at-top
  from rlax_llm.parallel import distributed
  # pylint: enable=g-import-not-at-top
  distributed.use_host_devices(_HOST_DEVICES.value)
  whats = argv[1:]
  # Only grpo_step runs the split layout's one-device update; the other
  # benchmarks run every program on the whole mesh.
  _HOST_MEMORY_REUSED[0] = distributed.reuse_host_memory(
      _HOST_MEMORY.value,
      layout=_HOST_LAYOUT.value if whats == ["grpo_step"] else "shared")
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
    grpo = [r for r in records if r["bench"] == "grpo_step"]
    alloc = [r for r in records if r["bench"] == "xrpo_allocate"]
    print("\n\n".join(([_table(generate)] if generate else []) +
                       ([_grpo_table(grpo)] if grpo else []) +
                       ([_logprobs_table(logprobs)] if logprobs else []) +
                       ([_rewards_table(rewards)] if rewards else []) +
                       ([_allocate_table(alloc)] if alloc else [])))


if __name__ == "__main__":
  app.run(main)
