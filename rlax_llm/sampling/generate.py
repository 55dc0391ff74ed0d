"""Rollout generation: one prefill per prompt, G samples decoded from a KV cache.

`generate` is a pure function of (model graph, params, prompts, rng). Under
`jax.jit` it compiles once per (shapes, G, T, sampler, chunk). The decode runs
as up to four `lax.while_loop`s over consecutive segments of the T steps, each
attending to a cache no longer than its segment's end, and stops as soon as
every sequence has emitted EOS.

Chunked decoding (`decode_chunk`): the N = B * G sequences are decoded a
chunk of sample groups at a time (`lax.map`), each chunk with its own decode
cache and its own early exit, after one prefill of all prompts. The decode
cache then takes memory for `decode_chunk` sequences instead of N, so 1
prompt x 512 samples x 256 tokens decodes in bounded memory; on a CPU a chunk
whose cache stays in the CPU's caches also decodes faster, which is what the
default (`auto_decode_chunk`) picks. The samples do not depend on the
chunking: step i of sequence n draws with the n-th entry of one [N] vector of
uniforms from fold_in(rng, i) (log-probs agree to f32 rounding: other batch
shapes sum in another order).

The model may be any object with the `prefill` / `decode_step` /
`resize_decode_cache` methods of `rlax_llm.models.Transformer` and a
`KVCache`-like cache (per-prompt `prefix_*` fields with leading axis B,
per-sample `k` / `v` tuples with leading axes [B, G]), passed as an NNX graph
definition plus a parameter state (`nnx.split`), so the function stays pure at
the jit boundary.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, TYPE_CHECKING

import chex
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from rlax_llm.sampling.samplers import SamplerConfig, sample_token_from_uniform

if TYPE_CHECKING:  # flax loads on first call, not on import.
  import flax.nnx as nnx

# Decode steps per segment of the loop, and the most segments (see `generate`).
_SEGMENT = 32
_MAX_SEGMENTS = 4

# Automatic chunking on a CPU (`decode_chunk=None`): a chunk's decode cache
# stays within this many bytes (so it is read from the CPU's caches, not from
# memory, at every step), provided the weights are small enough to stay
# cached too; chunks never go below _MIN_AUTO_CHUNK sequences.
_AUTO_CHUNK_CACHE_BYTES = 4 << 20
_AUTO_CHUNK_MAX_WEIGHT_BYTES = 16 << 20
_MIN_AUTO_CHUNK = 16


class Rollout(NamedTuple):
  """Sampled completions, flattened to N = B * G (samples of a prompt adjacent).

  Attributes:
    tokens: [N, T] int32 completion tokens, `pad_id` after the end.
    logp: [N, T] f32 log-probs of the tokens (see `samplers`), 0 where masked.
    mask: [N, T] bool, True on generated tokens including the EOS.
    lengths: [N] int32 number of generated tokens (EOS included).
    finished: [N] bool, the sequence ended with EOS (False: truncated at T).
    steps: int32 scalar, decode iterations run (< T when all sequences ended
      early; with chunks, the most any chunk ran).
  """
  tokens: jax.Array
  logp: jax.Array
  mask: jax.Array
  lengths: jax.Array
  finished: jax.Array
  steps: jax.Array


def check_context(prompt_len: int, max_new_tokens: int, max_seq_len: int):
  """Refuses, before any compute, a request that exceeds the model context."""
  if prompt_len + max_new_tokens > max_seq_len:
    raise ValueError(
        f"Prompt length {prompt_len} + max_new_tokens {max_new_tokens} = "
        f"{prompt_len + max_new_tokens} exceeds the model context "
        f"max_seq_len={max_seq_len}. Shorten the prompts, lower "
        "max_new_tokens, or use a model config with a larger max_seq_len.")


def chunk_layout(num_prompts: int, num_samples: int,
                 decode_chunk: int) -> tuple[int, int, int]:
  """How `generate` splits B x G sequences into chunks.

  A chunk holds `bc` sub-groups of `gc` samples each, where `gc` is the
  largest divisor of G that is <= `decode_chunk` and `bc` = decode_chunk // gc
  sub-groups (so chunks never split a sub-group); G / gc sub-groups per
  prompt, padded with empty sub-groups to a multiple of `bc`.

  Args:
    num_prompts: B.
    num_samples: G.
    decode_chunk: the most sequences per chunk; 0 or >= B * G: one chunk.

  Returns:
    (gc samples per sub-group, bc sub-groups per chunk, number of chunks).
  """
  b, g = num_prompts, num_samples
  if decode_chunk < 0:
    raise ValueError(f"decode_chunk must be >= 0 (0: no chunking), got "
                     f"{decode_chunk}.")
  if decode_chunk == 0 or decode_chunk >= b * g:
    return g, b, 1
  gc = max(d for d in range(1, min(g, decode_chunk) + 1) if g % d == 0)
  subgroups = b * (g // gc)
  bc = min(decode_chunk // gc, subgroups)
  return gc, bc, -(-subgroups // bc)


def auto_decode_chunk(params, model_cfg, rows: int,
                      max_new_tokens: int) -> int:
  """The chunk `generate` uses with `decode_chunk=None` (0: no chunking).

  On a CPU, a decode step reads every cached key and value of its rows; once
  those exceed the CPU's caches each step streams them from memory, which
  then bounds the speed. When the weights are small enough to stay cached
  (<= 16 MiB), rows are decoded in chunks whose cache of T slots takes at
  most 4 MiB (at least 16 rows per chunk). Elsewhere (accelerators, or larger
  models whose weights would be re-read per chunk) all rows decode at once.

  Args:
    params: the parameter state (only shapes and dtypes are read).
    model_cfg: the model's config (layers, key/value heads, head size, dtype).
    rows: the sequences to decode.
    max_new_tokens: T.
  """
  if jax.default_backend() != "cpu":
    return 0
  weight_bytes = sum(x.size * jnp.dtype(x.dtype).itemsize
                     for x in jax.tree.leaves(params))
  if weight_bytes > _AUTO_CHUNK_MAX_WEIGHT_BYTES:
    return 0
  row_bytes = (2 * model_cfg.num_layers * model_cfg.num_kv_heads
               * model_cfg.head_dim * max_new_tokens
               * jnp.dtype(model_cfg.dtype).itemsize)
  chunk = max(_MIN_AUTO_CHUNK, _AUTO_CHUNK_CACHE_BYTES // row_bytes)
  return 0 if chunk >= rows else int(chunk)


def generate(graphdef: nnx.GraphDef, params, prompt_BP: jax.typing.ArrayLike,
             prompt_mask_BP: jax.typing.ArrayLike, rng: jax.Array, *,
             num_samples: int, max_new_tokens: int, eos_id: int,
             pad_id: int = 0, sampler: SamplerConfig = SamplerConfig(),
             decode_chunk: int | None = None,
             row_offset: jax.typing.ArrayLike = 0,
             total_rows: int | None = None) -> Rollout:
  """Samples `num_samples` completions for each prompt.

  Each prompt is run through the model once (prefill); its keys/values are
  shared by its G samples, which then decode one token per step.

  Args:
    graphdef: the model's NNX graph definition (static under jit).
    params: the model's parameter state.
    prompt_BP: int prompt ids, padded left or right.
    prompt_mask_BP: bool, valid prompt tokens (at least one per row).
    rng: PRNG key; step i draws from fold_in(rng, i), so results depend
      neither on when the loop exits nor on `decode_chunk`.
    num_samples: G, samples per prompt.
    max_new_tokens: T, the most tokens generated per sample.
    eos_id: the token that ends a sequence (it is kept in the mask).
    pad_id: the id written after a sequence ends.
    sampler: temperature / top-k / top-p / min-p settings (0 temperature is
      greedy).
    decode_chunk: the most sequences decoded at once (0: all N at once; None:
      `auto_decode_chunk`); see the module docstring and `chunk_layout`.
    row_offset, total_rows: for a shard of a larger batch (`generate_on_mesh`):
      these N rows are rows row_offset .. row_offset + N - 1 of a batch of
      `total_rows` (default N), and draw that batch's uniforms, so a sharded
      call returns the rows of an unsharded one.

  Returns:
    Rollout with N = B * G rows, sample g of prompt b at row b * G + g.
  """
  prompt_BP = jnp.asarray(prompt_BP, jnp.int32)
  prompt_mask_BP = jnp.asarray(prompt_mask_BP, bool)
  chex.assert_rank([prompt_BP, prompt_mask_BP], 2)
  chex.assert_equal_shape([prompt_BP, prompt_mask_BP])
  sampler = SamplerConfig(*sampler).validate()
  from flax import nnx  # pylint: disable=g-import-not-at-top
  model = nnx.merge(graphdef, params)
  check_context(prompt_BP.shape[1], max_new_tokens, model.cfg.max_seq_len)
  b, g, t = prompt_BP.shape[0], num_samples, max_new_tokens
  if decode_chunk is None:
    decode_chunk = auto_decode_chunk(params, model.cfg, b * g, t)
  gc, bc, chunks = chunk_layout(b, g, decode_chunk)
  total_rows = b * g if total_rows is None else int(total_rows)
  row_offset = jnp.asarray(row_offset, jnp.int32)

  # One prefill for all prompts; a chunk's cache takes its sub-groups' prompt
  # keys/values and fresh decode slots (never allocated for all N at once).
  ends = _segment_ends(t)
  last_logits_BV, cache, prompt_len_B = model.prefill(
      prompt_BP, prompt_mask_BP, num_samples=gc, max_new_tokens=ends[0])
  subgroups = b * (g // gc)
  prompt_of = jnp.minimum(jnp.arange(chunks * bc) // (g // gc), b - 1)
  real = jnp.arange(chunks * bc) < subgroups  # padding sub-groups decode too

  def take_prompts(x):
    return jnp.take(x, prompt_of, axis=0).reshape(chunks, bc, *x.shape[1:])

  per_chunk = dict(
      logits=take_prompts(last_logits_BV),
      prompt_len=take_prompts(prompt_len_B),
      prefix=jax.tree.map(take_prompts, (cache.prefix_k, cache.prefix_v,
                                         cache.prefix_mask)),
      offset=jnp.arange(chunks, dtype=jnp.int32) * (bc * gc),
      real=real.reshape(chunks, bc))

  def decode_chunk_fn(xs):
    n = bc * gc
    pk, pv, pm = xs["prefix"]

    def zeros(x):
      return jnp.zeros((bc, gc) + x.shape[2:], x.dtype)

    ccache = cache._replace(prefix_k=pk, prefix_v=pv, prefix_mask=pm,
                            k=tuple(map(zeros, cache.k)),
                            v=tuple(map(zeros, cache.v)))
    positions = jnp.broadcast_to(xs["prompt_len"][:, None], (bc, gc))
    logits_nV = jnp.repeat(xs["logits"], gc, axis=0)
    done = ~jnp.repeat(xs["real"], gc)  # padding rows start finished

    def cond_until(end):
      def cond(carry):
        i, _, _, _, done_n, _, _ = carry
        return (i < end) & ~jnp.all(done_n)
      return cond

    def body(carry):
      # Token buffers are [T, n]: step i writes one contiguous row.
      i, tokens_Tn, logp_Tn, mask_Tn, done_n, logits_nV, ccache = carry
      u_all = jax.random.uniform(jax.random.fold_in(rng, i), (total_rows,))
      u_N = jax.lax.dynamic_slice_in_dim(u_all, row_offset, b * g)
      u_n = jax.lax.dynamic_slice_in_dim(
          jnp.pad(u_N, (0, chunks * n - b * g)), xs["offset"], n)
      s = sample_token_from_uniform(u_n, logits_nV, sampler)
      tok_n = jnp.where(done_n, pad_id, s.token)
      tokens_Tn = jax.lax.dynamic_update_index_in_dim(tokens_Tn, tok_n, i, 0)
      logp_Tn = jax.lax.dynamic_update_index_in_dim(
          logp_Tn, jnp.where(done_n, 0.0, s.logp), i, 0)
      mask_Tn = jax.lax.dynamic_update_index_in_dim(mask_Tn, ~done_n, i, 0)
      new_done = done_n | (tok_n == eos_id)
      # The chunk decodes in lockstep; finished rows are masked out above.
      logits_BGV, ccache = model.decode_step(tok_n.reshape(bc, gc),
                                             positions + i, ccache, i)
      return (i + 1, tokens_Tn, logp_Tn, mask_Tn, new_done,
              logits_BGV.reshape(n, -1), ccache)

    # The decode runs in segments of static length: during the segment ending
    # at step e the cache holds e slots, so attention reads only the slots
    # written so far (rounded up to the segment) rather than all T. Slots past
    # the current step are masked in `decode_step`, so the logits do not
    # depend on the split.
    carry = (jnp.int32(0), jnp.full((t, n), pad_id, jnp.int32),
             jnp.zeros((t, n), jnp.float32), jnp.zeros((t, n), bool), done,
             logits_nV, ccache)
    for end in ends:
      carry = carry[:-1] + (model.resize_decode_cache(carry[-1], end),)
      carry = jax.lax.while_loop(cond_until(end), body, carry)
    steps, tokens_Tn, logp_Tn, mask_Tn, done_n, _, _ = carry
    return steps, tokens_Tn, logp_Tn, mask_Tn, done_n

  if chunks == 1:
    out = jax.tree.map(lambda x: x[None],
                       decode_chunk_fn(jax.tree.map(lambda x: x[0], per_chunk)))
  else:
    out = jax.lax.map(decode_chunk_fn, per_chunk)
  steps, tokens_CTn, logp_CTn, mask_CTn, done_Cn = out

  def rows(x_CTn):  # [chunks, T, n] -> [N, T], padding sub-groups dropped
    return jnp.swapaxes(x_CTn, 1, 2).reshape(-1, t)[:b * g]

  # Slots after an early exit were never written: pad_id, mask False.
  mask_NT = rows(mask_CTn)
  return Rollout(tokens=rows(tokens_CTn), logp=rows(logp_CTn), mask=mask_NT,
                 lengths=jnp.sum(mask_NT, axis=-1, dtype=jnp.int32),
                 finished=done_Cn.reshape(-1)[:b * g],
                 steps=jnp.max(steps))


def _segment_ends(max_new_tokens: int) -> list[int]:
  """Static ends of the decode segments.

  A segment spans at least _SEGMENT steps and there are at most _MAX_SEGMENTS
  of them (each one is one more compiled loop body).
  """
  size = max(_SEGMENT, -(-max_new_tokens // _MAX_SEGMENTS))
  return list(range(size, max_new_tokens, size)) + [max_new_tokens]


def generate_on_mesh(graphdef: nnx.GraphDef, params,
                     prompt_BP: jax.typing.ArrayLike,
                     prompt_mask_BP: jax.typing.ArrayLike, rng: jax.Array, *,
                     mesh: jax.sharding.Mesh,
                     batch_axes: tuple[str, ...] = ("data", "fsdp"),
                     **kwargs) -> Rollout:
  """`generate` with the prompts split over the batch axes of `mesh`.

  Each device decodes its own prompts' samples (`jax.shard_map`, manual over
  `batch_axes`): its own while loops, its own early exit, no communication
  per token. Parameters are replicated over the batch axes (an fsdp-sharded
  state is gathered once, at the call) and keep any sharding over the other
  mesh axes (e.g. "tensor"), which stay automatic. Every row draws the
  uniforms of its place in the whole batch, so the samples equal those of
  `generate` on one device, whatever the mesh (log-probs to f32 rounding).
  B need not divide by the number of batch shards: the prompts are padded
  with copies of the last one and the padding rows dropped.

  Args:
    graphdef, params, prompt_BP, prompt_mask_BP, rng: as for `generate`.
    mesh: the device mesh.
    batch_axes: the mesh axes the prompts are split over (those absent from
      the mesh are ignored).
    **kwargs: the keyword arguments of `generate` (num_samples, ...).

  Returns:
    Rollout as from `generate` (rows sharded over `batch_axes`, `steps` the
    most any shard ran).
  """
  axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  shards = math.prod(mesh.shape[a] for a in axes)
  prompt_BP = jnp.asarray(prompt_BP, jnp.int32)
  prompt_mask_BP = jnp.asarray(prompt_mask_BP, bool)
  b, g = prompt_BP.shape[0], kwargs["num_samples"]
  if shards <= 1:
    return generate(graphdef, params, prompt_BP, prompt_mask_BP, rng,
                    **kwargs)
  pad = -b % shards
  if pad:
    prompt_BP = jnp.concatenate([prompt_BP, jnp.repeat(prompt_BP[-1:], pad, 0)])
    prompt_mask_BP = jnp.concatenate(
        [prompt_mask_BP, jnp.repeat(prompt_mask_BP[-1:], pad, 0)])
  local_rows = (b + pad) // shards * g

  def local(params, prompt_BP, prompt_mask_BP, rng):
    offset = jax.lax.axis_index(axes) * local_rows
    ro = generate(graphdef, params, prompt_BP, prompt_mask_BP, rng,
                  row_offset=offset, total_rows=(b + pad) * g, **kwargs)
    return ro._replace(steps=jax.lax.pmax(ro.steps, axes))

  rows = P(axes)
  ro = jax.shard_map(
      local, mesh=mesh, in_specs=(P(), rows, rows, P()),
      out_specs=Rollout(rows, rows, rows, rows, rows, P()),
      axis_names=frozenset(axes), check_vma=False)(
          params, prompt_BP, prompt_mask_BP, rng)
  if pad:
    ro = ro._replace(**{f: getattr(ro, f)[:b * g]
                        for f in Rollout._fields if f != "steps"})
  return ro


@functools.partial(jax.jit, static_argnums=(0,),
                   static_argnames=("num_samples", "max_new_tokens", "eos_id",
                                    "pad_id", "sampler", "decode_chunk",
                                    "mesh", "batch_axes"))
def generate_on_mesh_jit(graphdef, params, prompt_BP, prompt_mask_BP, rng, *,
                         mesh, num_samples, max_new_tokens, eos_id, pad_id=0,
                         sampler=SamplerConfig(), decode_chunk=None,
                         batch_axes=("data", "fsdp")) -> Rollout:
  """`generate_on_mesh` under `jax.jit` (graph, sizes and mesh static)."""
  return generate_on_mesh(graphdef, params, prompt_BP, prompt_mask_BP, rng,
                          mesh=mesh, batch_axes=batch_axes,
                          num_samples=num_samples,
                          max_new_tokens=max_new_tokens, eos_id=eos_id,
                          pad_id=pad_id, sampler=sampler,
                          decode_chunk=decode_chunk)


@functools.partial(jax.jit, static_argnums=(0,),
                   static_argnames=("num_samples", "max_new_tokens", "eos_id",
                                    "pad_id", "sampler", "decode_chunk"))
def generate_jit(graphdef, params, prompt_BP, prompt_mask_BP, rng, *,
                 num_samples, max_new_tokens, eos_id, pad_id=0,
                 sampler=SamplerConfig(), decode_chunk=None) -> Rollout:
  """`generate` under `jax.jit` (graph and sizes static)."""
  return generate(graphdef, params, prompt_BP, prompt_mask_BP, rng,
                  num_samples=num_samples, max_new_tokens=max_new_tokens,
                  eos_id=eos_id, pad_id=pad_id, sampler=sampler,
                  decode_chunk=decode_chunk)
