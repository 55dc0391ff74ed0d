"""Rollout generation: one prefill per prompt, G samples decoded from a KV cache.

`generate` is a pure function of (model graph, params, prompts, rng). Under
`jax.jit` it compiles once per (shapes, G, T, sampler). The decode runs as up to
four `lax.while_loop`s over consecutive segments of the T steps, each attending
to a cache no longer than its segment's end, and stops as soon as every
sequence has emitted EOS.

The model may be any object with the `prefill` / `decode_step` methods of
`rlax_llm.models.Transformer`, passed as an NNX graph definition plus a
parameter state (`nnx.split`), so the function stays pure at the jit boundary.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import chex
import flax.nnx as nnx
import jax
import jax.numpy as jnp

from rlax_llm.sampling.samplers import SamplerConfig, sample_token

# Decode steps per segment of the loop, and the most segments (see `generate`).
_SEGMENT = 32
_MAX_SEGMENTS = 4


class Rollout(NamedTuple):
  """Sampled completions, flattened to N = B * G (samples of a prompt adjacent).

  Attributes:
    tokens: [N, T] int32 completion tokens, `pad_id` after the end.
    logp: [N, T] f32 log-probs of the tokens (see `samplers`), 0 where masked.
    mask: [N, T] bool, True on generated tokens including the EOS.
    lengths: [N] int32 number of generated tokens (EOS included).
    finished: [N] bool, the sequence ended with EOS (False: truncated at T).
    steps: int32 scalar, decode iterations run (< T when all sequences ended
      early).
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


def generate(graphdef: nnx.GraphDef, params, prompt_BP: jax.typing.ArrayLike,
             prompt_mask_BP: jax.typing.ArrayLike, rng: jax.Array, *,
             num_samples: int, max_new_tokens: int, eos_id: int,
             pad_id: int = 0, sampler: SamplerConfig = SamplerConfig()
             ) -> Rollout:
  """Samples `num_samples` completions for each prompt.

  Each prompt is run through the model once (prefill); its keys/values are
  shared by its G samples, which then decode one token per step.

  Args:
    graphdef: the model's NNX graph definition (static under jit).
    params: the model's parameter state.
    prompt_BP: int prompt ids, padded left or right.
    prompt_mask_BP: bool, valid prompt tokens (at least one per row).
    rng: PRNG key; step i uses fold_in(rng, i), so results do not depend on
      when the loop exits.
    num_samples: G, samples per prompt.
    max_new_tokens: T, the most tokens generated per sample.
    eos_id: the token that ends a sequence (it is kept in the mask).
    pad_id: the id written after a sequence ends.
    sampler: temperature / top-k / top-p / min-p settings (0 temperature is
      greedy).

  Returns:
    Rollout with N = B * G rows, sample g of prompt b at row b * G + g.
  """
  prompt_BP = jnp.asarray(prompt_BP, jnp.int32)
  prompt_mask_BP = jnp.asarray(prompt_mask_BP, bool)
  chex.assert_rank([prompt_BP, prompt_mask_BP], 2)
  chex.assert_equal_shape([prompt_BP, prompt_mask_BP])
  sampler = SamplerConfig(*sampler).validate()
  model = nnx.merge(graphdef, params)
  check_context(prompt_BP.shape[1], max_new_tokens, model.cfg.max_seq_len)
  b, g, t = prompt_BP.shape[0], num_samples, max_new_tokens

  last_logits_BV, cache, prompt_len_B = model.prefill(
      prompt_BP, prompt_mask_BP, num_samples=g, max_new_tokens=t)
  logits_NV = jnp.repeat(last_logits_BV, g, axis=0)
  positions_BG = jnp.broadcast_to(prompt_len_B[:, None], (b, g))

  def cond_until(end):
    def cond(carry):
      i, _, _, _, done_N, _, _ = carry
      return (i < end) & ~jnp.all(done_N)
    return cond

  def body(carry):
    # Token buffers are [T, N]: step i writes one contiguous row.
    i, tokens_TN, logp_TN, mask_TN, done_N, logits_NV, cache = carry
    s = sample_token(jax.random.fold_in(rng, i), logits_NV, sampler)
    tok_N = jnp.where(done_N, pad_id, s.token)
    tokens_TN = jax.lax.dynamic_update_index_in_dim(tokens_TN, tok_N, i, 0)
    logp_TN = jax.lax.dynamic_update_index_in_dim(
        logp_TN, jnp.where(done_N, 0.0, s.logp), i, 0)
    mask_TN = jax.lax.dynamic_update_index_in_dim(mask_TN, ~done_N, i, 0)
    new_done_N = done_N | (tok_N == eos_id)
    # Only the sequences still running after this token need a next step, but
    # the batch decodes in lockstep; finished rows are masked out above.
    logits_BGV, cache = model.decode_step(tok_N.reshape(b, g),
                                          positions_BG + i, cache, i)
    return (i + 1, tokens_TN, logp_TN, mask_TN, new_done_N,
            logits_BGV.reshape(b * g, -1), cache)

  # The decode runs in segments of static length: during the segment ending at
  # step e the cache holds e slots, so attention reads only the slots written so
  # far (rounded up to the segment) rather than all T. Slots past the current
  # step are masked in `decode_step`, so the logits do not depend on the split.
  ends = _segment_ends(t)
  cache = _resize_decode_cache(cache, ends[0])
  carry = (jnp.int32(0), jnp.full((t, b * g), pad_id, jnp.int32),
           jnp.zeros((t, b * g), jnp.float32), jnp.zeros((t, b * g), bool),
           jnp.zeros((b * g,), bool), logits_NV, cache)
  for end in ends:
    carry = carry[:-1] + (_resize_decode_cache(carry[-1], end),)
    carry = jax.lax.while_loop(cond_until(end), body, carry)
  steps, tokens_TN, logp_TN, mask_TN, done_N, _, _ = carry
  # Slots after an early exit were never written: pad_id, mask False.
  mask_NT = mask_TN.T
  return Rollout(tokens=tokens_TN.T, logp=logp_TN.T, mask=mask_NT,
                 lengths=jnp.sum(mask_NT, axis=-1, dtype=jnp.int32),
                 finished=done_N, steps=steps)


def _segment_ends(max_new_tokens: int) -> list[int]:
  """Static ends of the decode segments.

  A segment spans at least _SEGMENT steps and there are at most _MAX_SEGMENTS
  of them (each one is one more compiled loop body).
  """
  size = max(_SEGMENT, -(-max_new_tokens // _MAX_SEGMENTS))
  return list(range(size, max_new_tokens, size)) + [max_new_tokens]


def _resize_decode_cache(cache, length: int):
  """The cache with `length` decode slots (zero-padded or truncated)."""
  def resize(x):
    if x.shape[2] >= length:
      return jax.lax.slice_in_dim(x, 0, length, axis=2)
    pad = [(0, 0)] * x.ndim
    pad[2] = (0, length - x.shape[2])
    return jnp.pad(x, pad)
  return cache._replace(k=tuple(map(resize, cache.k)),
                        v=tuple(map(resize, cache.v)))


@functools.partial(jax.jit, static_argnums=(0,),
                   static_argnames=("num_samples", "max_new_tokens", "eos_id",
                                    "pad_id", "sampler"))
def generate_jit(graphdef, params, prompt_BP, prompt_mask_BP, rng, *,
                 num_samples, max_new_tokens, eos_id, pad_id=0,
                 sampler=SamplerConfig()) -> Rollout:
  """`generate` under `jax.jit` (graph and sizes static)."""
  return generate(graphdef, params, prompt_BP, prompt_mask_BP, rng,
                  num_samples=num_samples, max_new_tokens=max_new_tokens,
                  eos_id=eos_id, pad_id=pad_id, sampler=sampler)
