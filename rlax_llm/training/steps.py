"""Jitted update steps: supervised fine-tuning and policy-gradient RL.

A step is a pure function `(TrainState, batch) -> (TrainState, metrics)`.
`jit_step` compiles it with explicit shardings (state sharded like its
parameters, batch over the mesh's batch axes) and donates the old state.

The RL step runs several epochs over one rollout batch; each epoch is split
into minibatches (one optimiser update each), and each minibatch into
micro-batches whose gradients are accumulated. Loss normalisers (token and
sequence counts) are those of the whole minibatch, so the accumulated gradient
equals the gradient of the unsplit minibatch: micro-batching changes memory,
not the update.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import optax

from rlax_llm.core import logprobs as logprobs_lib
from rlax_llm.core import objectives
from rlax_llm.parallel import distributed
from rlax_llm.parallel import mesh as mesh_lib
from rlax_llm.training.scoring import completion_logits, score_completions
from rlax_llm.training.state import TrainState, step_rng

Metrics = dict[str, jax.Array]


class SFTBatch(NamedTuple):
  """Prompt/completion pairs; the loss covers completion tokens only.

  Shapes: prompt, prompt_mask [N, P]; completion, completion_mask [N, T].
  """
  prompt: jax.Array
  prompt_mask: jax.Array
  completion: jax.Array
  completion_mask: jax.Array


class RLBatch(NamedTuple):
  """One rollout batch, N = B * G rows.

  Attributes:
    prompt, prompt_mask: [N, P] the prompt of each row (repeated per sample).
    completion, completion_mask: [N, T] sampled tokens and their mask.
    old_logp: [N, T] f32 log-probs from the rollout (the behaviour policy).
    advantages: [N, T] f32 per-token advantages (sequence advantages are
      broadcast over T).
  """
  prompt: jax.Array
  prompt_mask: jax.Array
  completion: jax.Array
  completion_mask: jax.Array
  old_logp: jax.Array
  advantages: jax.Array


# (logp_NT, old_logp_NT, adv_NT, mask_NT, *, num_tokens, num_seqs)
#   -> (loss, metrics), e.g. functools.partial(objectives.ppo_clip_loss, ...).
PolicyLoss = Callable[..., tuple[jax.Array, Metrics]]


def _masked_mean(x, mask):
  mask = mask.astype(jnp.float32)
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _counts(mask_NT):
  mask_NT = mask_NT.astype(bool)
  return (jnp.sum(mask_NT).astype(jnp.float32),
          jnp.sum(jnp.any(mask_NT, axis=-1)).astype(jnp.float32))


# (logits_NTV, targets_NT, mask_NT, rng) -> (loss, metrics): a supervised
# objective over the completion tokens.
SupervisedLoss = Callable[..., tuple[jax.Array, Metrics]]


def cross_entropy(logits_NTV, targets_NT, mask_NT, rng, *,
                  aggregation: str = "token_mean"):
  """Plain SFT: the negative log-likelihood of the targets."""
  del rng
  logp = logprobs_lib.token_logprobs(logits_NTV, targets_NT)
  return objectives.sft_loss(logp, mask_NT, aggregation=aggregation)


def dynamic_fine_tuning(logits_NTV, targets_NT, mask_NT, rng, *,
                        aggregation: str = "token_mean"):
  """DFT: cross-entropy weighted by the stop-gradient target probability."""
  del rng
  logp = logprobs_lib.token_logprobs(logits_NTV, targets_NT)
  return objectives.dft_loss(logp, mask_NT, aggregation=aggregation)


def one_token_rollout(logits_NTV, targets_NT, mask_NT, rng, *,
                      num_candidates: int = 8, kappa: float = 1.2,
                      beta: float = -0.1, aggregation: str = "token_mean"):
  """OTR: a policy gradient over K sampled candidate tokens per position."""
  return objectives.otr_loss(logits_NTV, targets_NT, mask_NT, rng,
                             num_candidates=num_candidates, kappa=kappa,
                             beta=beta, aggregation=aggregation)


def make_sft_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                  *, aggregation: str = "token_mean",
                  loss_fn: SupervisedLoss | None = None):
  """Returns `sft_step(state, SFTBatch) -> (state, metrics)`.

  Args:
    graphdef: NNX graph of the policy.
    optimizer: optax transformation.
    aggregation: aggregation of the default cross-entropy loss.
    loss_fn: a `SupervisedLoss` (cross_entropy, dynamic_fine_tuning,
      one_token_rollout or your own); default cross-entropy. Its rng is
      fold_in(state rng, step).
  """
  if loss_fn is None:
    loss_fn = functools.partial(cross_entropy, aggregation=aggregation)

  def objective(params, batch: SFTBatch, rng):
    logits = completion_logits(graphdef, params, batch.prompt,
                               batch.prompt_mask, batch.completion,
                               batch.completion_mask)
    loss, metrics = loss_fn(logits, batch.completion, batch.completion_mask,
                            rng)
    out = logprobs_lib.token_logprobs_and_entropy(logits, batch.completion)
    mask = batch.completion_mask
    metrics = dict(metrics)
    metrics["nll"] = -_masked_mean(out.logp, mask)
    metrics["entropy"] = _masked_mean(out.entropy, mask)
    metrics["token_accuracy"] = _masked_mean(
        (jnp.argmax(logits, -1) == batch.completion).astype(jnp.float32),
        mask)
    return loss, metrics

  def sft_step(state: TrainState, batch: SFTBatch):
    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params, batch, step_rng(state, 2))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    return TrainState(state.step + 1, params, opt_state, state.rng), metrics

  return sft_step


SUPERVISED_LOSSES = {"cross_entropy": cross_entropy,
                     "dft": dynamic_fine_tuning, "otr": one_token_rollout}


def make_rl_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                 policy_loss: PolicyLoss, *, temperature: float = 1.0,
                 num_epochs: int = 1, num_minibatches: int = 1,
                 num_microbatches: int = 1, entropy_coef: float = 0.0,
                 logprob_chunk: int = 0, vocab_chunk: int | None = None):
  """Returns `rl_step(state, RLBatch) -> (state, metrics)`.

  Args:
    graphdef: NNX graph of the policy.
    optimizer: optax transformation.
    policy_loss: see `PolicyLoss`; it receives the minibatch's token and
      sequence counts as normalisers.
    temperature: the rollout's sampling temperature (log-probs are recomputed
      at it).
    num_epochs: passes over the rollout batch.
    num_minibatches: optimiser updates per epoch; N must divide by
      num_minibatches * num_microbatches.
    num_microbatches: gradient-accumulation chunks per minibatch.
    entropy_coef: weight of an entropy bonus (token mean), 0 disables.
    logprob_chunk: tokens per chunk when scoring without the [N, T, V]
      logits (`score_completions`); 0 builds them.
    vocab_chunk: vocabulary columns per block of the chunked path.

  The metric `logp_mismatch_*` compares the rollout's log-probs with the
  trainer's recomputation before any update (first minibatch of epoch one).
  """
  num_updates = num_epochs * num_minibatches

  def micro_loss(params, micro: RLBatch, num_tokens, num_seqs):
    scores = score_completions(graphdef, params, micro.prompt,
                               micro.prompt_mask, micro.completion,
                               micro.completion_mask, temperature=temperature,
                               chunk_size=logprob_chunk,
                               vocab_chunk=vocab_chunk)
    loss, metrics = policy_loss(scores.logp, micro.old_logp, micro.advantages,
                                micro.completion_mask, num_tokens=num_tokens,
                                num_seqs=num_seqs)
    mask = micro.completion_mask.astype(jnp.float32)
    ent_sum = jnp.sum(scores.entropy * mask)
    if entropy_coef:
      loss = loss - entropy_coef * ent_sum / jnp.maximum(num_tokens, 1.0)
    diff = jnp.abs(scores.logp - micro.old_logp) * mask
    sums = dict(entropy=ent_sum, logp_mismatch_mean=jnp.sum(diff),
                tokens=jnp.sum(mask))
    return loss, (dict(metrics), sums, jnp.max(diff))

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def minibatch_update(carry, idx_UB, batch: RLBatch):
    params, opt_state = carry
    mb = jax.tree.map(lambda x: x[idx_UB], batch)  # leaves [U, ub, ...]
    num_tokens, num_seqs = _counts(mb.completion_mask)

    def micro_body(acc, micro):
      (loss, (metrics, sums, maxdiff)), grads = grad_fn(params, micro,
                                                        num_tokens, num_seqs)
      return jax.tree.map(jnp.add, acc, grads), (loss, metrics, sums, maxdiff)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, (loss_U, metrics_U, sums_U, maxdiff_U) = jax.lax.scan(
        micro_body, zeros, mb)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    tokens = jnp.maximum(jnp.sum(sums_U["tokens"]), 1.0)
    out = {k: jnp.mean(v) for k, v in metrics_U.items()}
    out.update(loss=jnp.sum(loss_U), grad_norm=optax.tree.norm(grads),
               entropy=jnp.sum(sums_U["entropy"]) / tokens,
               logp_mismatch_mean=jnp.sum(sums_U["logp_mismatch_mean"]) / tokens,
               logp_mismatch_max=jnp.max(maxdiff_U))
    return (params, opt_state), out

  def rl_step(state: TrainState, batch: RLBatch):
    n = batch.prompt.shape[0]
    per_update = num_minibatches * num_microbatches
    if n % per_update:
      raise ValueError(
          f"The rollout batch of {n} sequences does not split into "
          f"{num_minibatches} minibatches x {num_microbatches} micro-batches; "
          "choose sizes whose product divides the number of sequences.")
    key = step_rng(state, 1)
    perms = jax.vmap(lambda e: jax.random.permutation(
        jax.random.fold_in(key, e), n))(jnp.arange(num_epochs))
    idx = perms.reshape(num_updates, num_microbatches,
                        n // per_update)
    (params, opt_state), m = jax.lax.scan(
        functools.partial(minibatch_update, batch=batch),
        (state.params, state.opt_state), idx)
    metrics = {k: jnp.mean(v) for k, v in m.items()}
    metrics["logp_mismatch_mean"] = m["logp_mismatch_mean"][0]
    metrics["logp_mismatch_max"] = m["logp_mismatch_max"][0]
    return TrainState(state.step + 1, params, opt_state, state.rng), metrics

  return rl_step


def jit_step(step_fn, state_shardings: TrainState, mesh,
             rules=mesh_lib.DEFAULT_RULES, *, batch_type=None,
             process_local: bool = False):
  """Compiles a step with explicit shardings and donates the input state.

  The batch is sharded over the mesh's batch axes along its leading
  dimension; metrics come back replicated, so every process can read them.

  Batch leaves may be host arrays or jax.Arrays. Host arrays are placed
  before the call: with `process_local=False` every process passes the same
  full global batch and each copies only its own rows to its devices; with
  `process_local=True` each process passes only its own rows
  (`distributed.process_batch_slice`) and the global batch is assembled from
  them. jax.Arrays already laid out on the batch sharding pass through.

  Args:
    step_fn: `(TrainState, batch) -> (TrainState, metrics)`.
    state_shardings: a TrainState of NamedShardings (`state.state_shardings`).
    mesh: the training mesh.
    rules: sharding rules; "batch" names the batch axes.
    batch_type: unused; batches keep their own NamedTuple type.
    process_local: whether host-array leaves hold only this process's rows.

  Returns:
    `call(state, batch) -> (state, metrics)`; `call.jitted` maps (batch tree
    structure, leaf ranks) to the compiled functions.
  """
  del batch_type
  rep = mesh_lib.replicated(mesh)
  cache: dict[Any, Any] = {}

  def place(batch):
    if process_local:
      host = jax.tree.map(lambda x: not isinstance(x, jax.Array), batch)
      if all(jax.tree.leaves(host)):
        return distributed.host_local_to_global(batch, mesh, rules)
      if any(jax.tree.leaves(host)):
        raise ValueError("With process_local=True every batch leaf must be a "
                         "host array of this process's rows.")
    return distributed.global_batch_to_devices(batch, mesh, rules)

  def call(state, batch):
    batch = place(batch)
    key = (jax.tree.structure(batch),
           tuple(jnp.ndim(x) for x in jax.tree.leaves(batch)))
    if key not in cache:
      b_sh = jax.tree.map(
          lambda x: mesh_lib.batch_sharding(mesh, x.ndim, rules), batch)
      cache[key] = jax.jit(step_fn, in_shardings=(state_shardings, b_sh),
                           out_shardings=(state_shardings, rep),
                           donate_argnums=(0,))
    return cache[key](state, batch)

  call.jitted = cache
  return call
