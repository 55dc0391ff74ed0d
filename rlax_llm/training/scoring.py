"""Scores completions under the model: per-token log-probs and entropies.

Sequences are laid out as [prompt | completion]: prompts padded on either side
(`prompt_mask_NP`), completions right-padded (`completion_mask_NT`). Completion
token t is predicted by the hidden state of the token before it: the last
valid prompt token for t = 0, completion token t - 1 otherwise. Positions count
valid tokens, as in `generate`, so the scores equal the rollout's log-probs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from rlax_llm.core import logprobs as logprobs_lib
from rlax_llm.models import transformer


class Scores(NamedTuple):
  logp: jax.Array  # [N, T] f32, 0 where masked
  entropy: jax.Array  # [N, T] f32, 0 where masked


def predictor_hidden(h_NSD: jax.Array, prompt_mask_NP: jax.Array,
                     num_completion: int) -> jax.Array:
  """Hidden states [N, T, D] that predict each completion token."""
  p = prompt_mask_NP.shape[1]
  last = p - 1 - jnp.argmax(prompt_mask_NP[:, ::-1].astype(bool), axis=-1)
  h_first = jnp.take_along_axis(h_NSD, last[:, None, None], axis=1)
  return jnp.concatenate([h_first, h_NSD[:, p:p + num_completion - 1]], axis=1)


def predictor_states(graphdef: nnx.GraphDef, params, prompt_NP,
                     prompt_mask_NP, completion_NT, completion_mask_NT,
                     prompt_group: int = 1):
  """(model, final-norm hidden states [N, T, D] that predict each completion
  token), the layout of the module docstring; with `prompt_group` G > 1 each
  group's shared prompt runs once (see `score_completions`)."""
  model = nnx.merge(graphdef, params)
  n, t = completion_NT.shape
  if prompt_group > 1:
    if n % prompt_group:
      raise ValueError(
          f"prompt_group={prompt_group} does not divide the {n} rows; rows "
          "come in consecutive groups of prompt_group that share one prompt.")
    # Completion token t is predicted by the state of token t - 1 (the
    # prompt's last for t = 0): the last completion token feeds nothing.
    # Each group's first row by a reshape: the strided slice x[::G] gave
    # wrong gradients once XLA's SPMD partitioner split a micro-batch's
    # groups over a data x fsdp x tensor mesh (jax 0.10.2;
    # tests/test_steps.py, test_sharded_steps_match_one_device).
    first = lambda x: x.reshape((n // prompt_group, prompt_group)  # noqa: E731
                                + x.shape[1:])[:, 0]
    h_last, h_NTD = model.continuation_hidden_states(
        first(prompt_NP), first(prompt_mask_NP),
        completion_NT[:, :t - 1], completion_mask_NT[:, :t - 1])
    h_first = transformer.repeat_groups(h_last, prompt_group)[:, None]
    return model, jnp.concatenate([h_first, h_NTD], axis=1)
  tokens = jnp.concatenate([prompt_NP, completion_NT], axis=1)
  mask = jnp.concatenate([prompt_mask_NP, completion_mask_NT], axis=1)
  h = model.hidden_states(tokens, None, mask.astype(bool))
  return model, predictor_hidden(h, prompt_mask_NP, t)


def completion_logits(graphdef: nnx.GraphDef, params, prompt_NP,
                      prompt_mask_NP, completion_NT, completion_mask_NT, *,
                      prompt_group: int = 1) -> jax.Array:
  """f32 logits [N, T, V] that predict each completion token.

  For objectives that need the whole next-token distribution (OTR); log-prob
  scoring should use `score_completions`, which has the same layout (and
  the same `prompt_group`).
  """
  model, h = predictor_states(graphdef, params, prompt_NP, prompt_mask_NP,
                              completion_NT, completion_mask_NT, prompt_group)
  return model.logits_from_hidden(h)


def score_completions(graphdef: nnx.GraphDef, params, prompt_NP, prompt_mask_NP,
                      completion_NT, completion_mask_NT, *,
                      temperature: float = 1.0, chunk_size: int = 0,
                      vocab_chunk: int | None = None,
                      prompt_group: int = 1) -> Scores:
  """Log-probs and entropies of completion tokens under softmax(logits / temp).

  With `chunk_size` > 0 the [N, T, V] logits are never built: the predictor
  hidden states go through `chunked_token_logprobs_and_entropy` with the
  model's output kernel, `chunk_size` tokens (and `vocab_chunk` vocabulary
  columns) at a time, rematerialised in the backward pass. The values equal
  the dense path's to float32 rounding.

  With `prompt_group` G > 1 the rows come in consecutive groups of G that
  share one prompt (ids and mask), as rollouts of G samples per prompt do:
  each prompt's layers run once for its group
  (`Transformer.continuation_hidden_states`), and the completions attend to
  its keys and values. The scores equal the plain path's up to float
  rounding, gradients included; the prompt's share of the FLOPs falls by
  a factor G. Nothing checks that a group's prompts are equal (under `jit`
  nothing can): `prompt_groups_shared` checks a host batch.

  Args:
    graphdef: NNX graph of a `Transformer`.
    params: its parameter state.
    prompt_NP: int prompt ids; prompt_mask_NP: bool valid prompt tokens.
    completion_NT: int completion ids; completion_mask_NT: bool valid ones.
    temperature: the sampling temperature (> 0) the rollout used; 0 means 1.
    chunk_size: tokens per chunk of the memory-bounded path; 0 = dense.
    vocab_chunk: vocabulary columns per streamed block (chunked path only).
    prompt_group: G, rows per shared prompt (1: every row its own prompt).

  Returns:
    Scores(logp [N, T], entropy [N, T]) in f32, zero where masked.
  """
  temp = temperature if temperature > 0 else 1.0
  if chunk_size > 0:
    model, h_NTD = predictor_states(graphdef, params, prompt_NP,
                                    prompt_mask_NP, completion_NT,
                                    completion_mask_NT, prompt_group)
    out = logprobs_lib.chunked_token_logprobs_and_entropy(
        h_NTD.astype(model.cfg.dtype),
        model.output_kernel().astype(model.cfg.dtype), completion_NT,
        temperature=temp, chunk_size=chunk_size, vocab_chunk=vocab_chunk,
        softcap=getattr(model.cfg, "final_logit_softcap", None) or None)
  else:
    logits = completion_logits(graphdef, params, prompt_NP, prompt_mask_NP,
                               completion_NT, completion_mask_NT,
                               prompt_group=prompt_group)
    out = logprobs_lib.token_logprobs_and_entropy(logits, completion_NT,
                                                  temperature=temp)
  m = completion_mask_NT.astype(bool)
  return Scores(jnp.where(m, out.logp, 0.0), jnp.where(m, out.entropy, 0.0))


@functools.partial(jax.jit, static_argnums=(0,),
                   static_argnames=("temperature", "chunk_size", "vocab_chunk",
                                    "prompt_group"))
def score_completions_jit(graphdef: nnx.GraphDef, params, prompt_NP,
                          prompt_mask_NP, completion_NT, completion_mask_NT, *,
                          temperature: float = 1.0, chunk_size: int = 0,
                          vocab_chunk: int | None = None,
                          prompt_group: int = 1) -> Scores:
  """`score_completions` under `jax.jit` (graph and options static)."""
  return score_completions(graphdef, params, prompt_NP, prompt_mask_NP,
                           completion_NT, completion_mask_NT,
                           temperature=temperature, chunk_size=chunk_size,
                           vocab_chunk=vocab_chunk, prompt_group=prompt_group)


def prompt_groups_shared(prompt_NP, prompt_mask_NP, prompt_group: int
                         ) -> bool:
  """Whether host rows come in consecutive groups of `prompt_group` that
  share one prompt, ids (padding included) and mask: the layout
  `prompt_group` assumes."""
  prompt, mask = np.asarray(prompt_NP), np.asarray(prompt_mask_NP)
  n = prompt.shape[0]
  g = int(prompt_group)
  if g < 1 or n % g:
    return False
  for x in (prompt, mask):
    grouped = x.reshape((n // g, g) + x.shape[1:])
    if not np.array_equal(grouped, np.broadcast_to(grouped[:, :1],
                                                   grouped.shape)):
      return False
  return True
