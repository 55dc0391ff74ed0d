"""Rollout generation: one prefill per prompt, G samples decoded from a KV cache.

`generate` is a pure function of (model graph, params, prompts, rng). Under
`jax.jit` it compiles once per (shapes, G, T, sampler) and its decode loop is a
`lax.while_loop` that stops as soon as every sequence has emitted EOS.

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
  logits_BGV = jnp.broadcast_to(last_logits_BV[:, None],
                                (b, g, last_logits_BV.shape[-1]))

  def cond(carry):
    i, _, _, _, done, _, _ = carry
    return (i < t) & ~jnp.all(done)

  def body(carry):
    i, tokens, logp, mask, done, logits, cache = carry
    s = sample_token(jax.random.fold_in(rng, i), logits.reshape(b * g, -1),
                     sampler)
    tok = jnp.where(done, pad_id, s.token.reshape(b, g))
    lp = jnp.where(done, 0.0, s.logp.reshape(b, g))
    tokens = tokens.at[:, :, i].set(tok)
    logp = logp.at[:, :, i].set(lp)
    mask = mask.at[:, :, i].set(~done)
    new_done = done | (tok == eos_id)
    # Only the sequences still running after this token need a next step, but
    # the batch decodes in lockstep; finished rows are masked out above.
    logits, cache = model.decode_step(tok, prompt_len_B[:, None] + i, cache, i)
    return i + 1, tokens, logp, mask, new_done, logits, cache

  init = (jnp.int32(0), jnp.full((b, g, t), pad_id, jnp.int32),
          jnp.zeros((b, g, t), jnp.float32), jnp.zeros((b, g, t), bool),
          jnp.zeros((b, g), bool), logits_BGV, cache)
  steps, tokens, logp, mask, done, _, _ = jax.lax.while_loop(cond, body, init)
  # Slots after an early exit were never written: pad_id, mask False.
  return Rollout(tokens=tokens.reshape(b * g, t), logp=logp.reshape(b * g, t),
                 mask=mask.reshape(b * g, t),
                 lengths=jnp.sum(mask, axis=-1).reshape(b * g).astype(jnp.int32),
                 finished=done.reshape(b * g), steps=steps)


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
