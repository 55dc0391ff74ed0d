"""Shared-prefix tree sampling (BranchGRPO in tokens).

A prompt's G completions are grown as a tree instead of G independent
sequences. With split points ``s_0 = 0 < s_1 < ... < s_{D-1}`` and branching
factors ``K_0, ..., K_{D-1}`` (``prod K = G``):

  * the prompt is prefilled once;
  * ``M_0 = K_0`` rows decode tokens ``[0, s_1)`` from the prompt;
  * at ``s_d`` each of the ``M_{d-1}`` rows is copied to ``K_d`` children
    (tokens, log-probs, the next-token logits and the decode KV rows, by one
    gather), and the ``M_d = M_{d-1} K_d`` rows continue independently over
    ``[s_d, s_{d+1})`` (the last segment runs to T).

A shared prefix token is generated once, so a tree spends fewer decode rows
and generated tokens than G independent samples; `BranchRollout.generated`
counts them. Every leaf row holds its full path, so the result has the same
[N, T] layout as `generate.Rollout` (N = B * G, leaves of a prompt adjacent,
in tree order: leaf g descends from depth-d node ``g // (G / M_d)``).

A row that ends (EOS) before a split is copied to its children like any
other; all of them are already finished, so they stay identical copies of one
completion and cost no further decoding. Each copy is a valid sample of the
policy (nothing is drawn after EOS); see `rlax_llm.core.tree_advantages` for
how the advantages treat them.

Log-probs are the sampler's (`samplers.sample_token`: log softmax of
logits / temperature, before top-k/top-p/min-p), so a trainer recomputes them
exactly. The sampler is written over a
``step_fn(tokens_BM, positions_BM, cache, index) -> (logits_BMV, cache)``
(e.g. `Transformer.decode_step`) and a cache whose per-sample arrays are
gathered at the splits; `branch_generate` wires in the model.

"BranchGRPO: Stable and Efficient GRPO with Structured Branching in Diffusion
Models" (arXiv:2509.06040).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Sequence, TYPE_CHECKING

import chex
import jax
import jax.numpy as jnp

from rlax_llm.core.tree_advantages import segment_ids
from rlax_llm.core.tree_advantages import validate_tree
from rlax_llm.sampling.generate import check_context
from rlax_llm.sampling.samplers import SamplerConfig
from rlax_llm.sampling.samplers import sample_token

if TYPE_CHECKING:  # flax loads on first call, not on import.
  import flax.nnx as nnx

StepFn = Callable[[jax.Array, jax.Array, Any, jax.Array], tuple[jax.Array, Any]]


class BranchRollout(NamedTuple):
  """Leaf paths of B trees of G leaves, flattened to N = B * G rows.

  Attributes:
    tokens: [N, T] int32 full path of each leaf, `pad_id` after its end.
    logp: [N, T] f32 sampler log-probs, 0 where masked; a shared prefix token
      has the same log-prob in every leaf row that holds it.
    mask: [N, T] bool, True on generated tokens including the EOS.
    lengths: [N] int32 number of tokens of each leaf path.
    finished: [N] bool, the path ended with EOS (False: truncated at T).
    segment: [T] int32 tree depth of each completion position.
    generated: [B] int32 tokens actually sampled per prompt (a shared prefix
      token once); G independent samples would sample ``sum(lengths)``.
    decode_rows: int32 scalar, rows fed to the model per prompt, summed over
      decode steps (the decode compute; G independent samples use G per
      step).
    steps: int32 scalar, decode iterations run.
  """
  tokens: jax.Array
  logp: jax.Array
  mask: jax.Array
  lengths: jax.Array
  finished: jax.Array
  segment: jax.Array
  generated: jax.Array
  decode_rows: jax.Array
  steps: jax.Array


def expand_samples(cache: Any, parent_C: jax.Array) -> Any:
  """Gives each new row `c` the per-sample cache rows of its parent.

  For a NamedTuple cache with per-sample fields ``k`` and ``v`` (the
  model's `KVCache`: [B, M, T, K, H] per layer) those are gathered on axis 1
  and the other fields (the shared prompt keys/values) are kept; any other
  pytree has every leaf gathered on axis 1.

  Args:
    cache: the decode cache with M rows per prompt.
    parent_C: [C] int, the parent row of each of the C new rows.

  Returns:
    The cache with C rows per prompt.
  """
  take = lambda x: jnp.take(x, parent_C, axis=1)
  fields = getattr(cache, "_fields", ())
  if "k" in fields and "v" in fields:
    return cache._replace(k=jax.tree.map(take, cache.k),
                          v=jax.tree.map(take, cache.v))
  return jax.tree.map(take, cache)


def tree_sample(step_fn: StepFn, first_logits_BV: jax.typing.ArrayLike,
                cache: Any, prompt_len_B: jax.typing.ArrayLike,
                rng: jax.Array, *, split_points: Sequence[int],
                branching: int | Sequence[int], max_new_tokens: int,
                eos_id: int, pad_id: int = 0,
                sampler: SamplerConfig = SamplerConfig(),
                expand_fn: Callable[[Any, jax.Array], Any] = expand_samples,
                return_cache: bool = False):
  """Samples one shared-prefix tree of completions per prompt.

  Args:
    step_fn: ``(tokens_BM, positions_BM, cache, index) -> (logits_BMV,
      cache)``: feeds one token per row at decode slot ``index``.
    first_logits_BV: f32 next-token logits after each prompt.
    cache: the decode cache with ``K_0`` rows per prompt (e.g. `prefill` with
      ``num_samples=K_0``).
    prompt_len_B: int, valid prompt tokens (positions continue from there).
    rng: PRNG key; step i samples with ``fold_in(rng, i)``.
    split_points: ``s_0 = 0 < s_1 < ... < s_{D-1} < T`` (static).
    branching: ``K_d`` per split point, or one int (static).
    max_new_tokens: T, the most tokens of a path.
    eos_id: the token that ends a path (kept in the mask).
    pad_id: the id written after a path ends.
    sampler: temperature / top-k / top-p / min-p settings.
    expand_fn: ``(cache, parent_C) -> cache`` copying rows at a split.
    return_cache: also return the final cache (G rows per prompt).

  Returns:
    `BranchRollout` with N = B * prod(K) rows, and the final cache when
    ``return_cache``.
  """
  splits, ks = validate_tree(split_points, branching,
                             max_new_tokens=max_new_tokens)
  sampler = SamplerConfig(*sampler).validate()
  first_logits_BV = jnp.asarray(first_logits_BV, jnp.float32)
  prompt_len_B = jnp.asarray(prompt_len_B, jnp.int32)
  chex.assert_rank(first_logits_BV, 2)
  chex.assert_shape(prompt_len_B, first_logits_BV.shape[:1])
  b, v = first_logits_BV.shape
  t = max_new_tokens
  ends = splits[1:] + (t,)

  m = ks[0]
  logits = jnp.broadcast_to(first_logits_BV[:, None], (b, m, v))
  tokens = jnp.full((b, m, t), pad_id, jnp.int32)
  logp = jnp.zeros((b, m, t), jnp.float32)
  mask = jnp.zeros((b, m, t), bool)
  done = jnp.zeros((b, m), bool)
  generated = jnp.zeros((b,), jnp.int32)
  rows = jnp.int32(0)
  steps = jnp.int32(0)
  for d, (start, end) in enumerate(zip(splits, ends)):
    if d:  # split: each row becomes K_d children
      m *= ks[d]
      parent = jnp.arange(m) // ks[d]
      logits, tokens, logp, mask, done = (
          jnp.take(x, parent, axis=1)
          for x in (logits, tokens, logp, mask, done))
      cache = expand_fn(cache, parent)

    def cond(carry, end=end):
      i, done = carry[0], carry[4]
      return (i < end) & ~jnp.all(done)

    def body(carry, m=m):
      i, tokens, logp, mask, done, logits, cache, generated, rows = carry
      s = sample_token(jax.random.fold_in(rng, i), logits.reshape(b * m, v),
                       sampler)
      tok = jnp.where(done, pad_id, s.token.reshape(b, m))
      lp = jnp.where(done, 0.0, s.logp.reshape(b, m))
      tokens = tokens.at[:, :, i].set(tok)
      logp = logp.at[:, :, i].set(lp)
      mask = mask.at[:, :, i].set(~done)
      generated = generated + jnp.sum(~done, axis=1, dtype=jnp.int32)
      new_done = done | (tok == eos_id)
      logits, cache = step_fn(tok, prompt_len_B[:, None] + i, cache, i)
      return (i + 1, tokens, logp, mask, new_done,
              logits.astype(jnp.float32), cache, generated, rows + m)

    carry = (jnp.int32(start), tokens, logp, mask, done, logits, cache,
             generated, rows)
    (i, tokens, logp, mask, done, logits, cache, generated,
     rows) = jax.lax.while_loop(cond, body, carry)
    steps = steps + (i - start)

  g = m
  chex.assert_equal(g, math.prod(ks))
  rollout = BranchRollout(
      tokens=tokens.reshape(b * g, t), logp=logp.reshape(b * g, t),
      mask=mask.reshape(b * g, t),
      lengths=jnp.sum(mask, axis=-1, dtype=jnp.int32).reshape(b * g),
      finished=done.reshape(b * g),
      segment=jnp.asarray(segment_ids(splits, t)), generated=generated,
      decode_rows=rows, steps=steps)
  return (rollout, cache) if return_cache else rollout


def branch_generate(graphdef: nnx.GraphDef, params,
                    prompt_BP: jax.typing.ArrayLike,
                    prompt_mask_BP: jax.typing.ArrayLike, rng: jax.Array, *,
                    split_points: Sequence[int],
                    branching: int | Sequence[int], max_new_tokens: int,
                    eos_id: int, pad_id: int = 0,
                    sampler: SamplerConfig = SamplerConfig()
                    ) -> BranchRollout:
  """`tree_sample` driven by a `Transformer` (one prefill per prompt).

  Args:
    graphdef: the model's NNX graph definition (static under jit).
    params: the model's parameter state.
    prompt_BP: int prompt ids, padded left or right.
    prompt_mask_BP: bool, valid prompt tokens (at least one per row).
    rng: PRNG key.
    split_points, branching, max_new_tokens, eos_id, pad_id, sampler: as in
      `tree_sample`.

  Returns:
    `BranchRollout` with N = B * prod(branching) rows.
  """
  prompt_BP = jnp.asarray(prompt_BP, jnp.int32)
  prompt_mask_BP = jnp.asarray(prompt_mask_BP, bool)
  chex.assert_rank([prompt_BP, prompt_mask_BP], 2)
  chex.assert_equal_shape([prompt_BP, prompt_mask_BP])
  splits, ks = validate_tree(split_points, branching,
                             max_new_tokens=max_new_tokens)
  from flax import nnx  # pylint: disable=g-import-not-at-top
  model = nnx.merge(graphdef, params)
  check_context(prompt_BP.shape[1], max_new_tokens, model.cfg.max_seq_len)
  last_logits_BV, cache, prompt_len_B = model.prefill(
      prompt_BP, prompt_mask_BP, num_samples=ks[0],
      max_new_tokens=max_new_tokens)
  return tree_sample(model.decode_step, last_logits_BV, cache, prompt_len_B,
                     rng, split_points=splits, branching=ks,
                     max_new_tokens=max_new_tokens, eos_id=eos_id,
                     pad_id=pad_id, sampler=sampler)


@functools.partial(jax.jit, static_argnums=(0,),
                   static_argnames=("split_points", "branching",
                                    "max_new_tokens", "eos_id", "pad_id",
                                    "sampler"))
def branch_generate_jit(graphdef, params, prompt_BP, prompt_mask_BP, rng, *,
                        split_points, branching, max_new_tokens, eos_id,
                        pad_id=0, sampler=SamplerConfig()) -> BranchRollout:
  """`branch_generate` under `jax.jit` (graph, tree and sizes static).

  ``split_points`` and ``branching`` must be hashable (tuples).
  """
  return branch_generate(graphdef, params, prompt_BP, prompt_mask_BP, rng,
                         split_points=split_points, branching=branching,
                         max_new_tokens=max_new_tokens, eos_id=eos_id,
                         pad_id=pad_id, sampler=sampler)
