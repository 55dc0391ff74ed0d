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

from rlax_llm.core import aggregation as aggregation_lib
from rlax_llm.core import logprobs as logprobs_lib
from rlax_llm.core import objectives
from rlax_llm.core import regularizers
from rlax_llm.core import selection
from rlax_llm.core import value as value_lib
from rlax_llm.parallel import distributed
from rlax_llm.parallel import mesh as mesh_lib
from rlax_llm.training.scoring import completion_logits, score_completions
from rlax_llm.training.state import RefState, TrainState, step_rng

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
      broadcast over T). Unused by actor-critic steps, which compute GAE
      advantages from `reward`.
    weights: [N, T] f32 token weights (D^3S selection, tree edge weights,
      fully masked filler groups), applied once inside the update step: each
      token's loss terms are scaled by its weight and the token normaliser
      is the sum of the weights. None means `completion_mask`.
    ref_logp: [N, T] f32 reference-policy log-probs computed before the step
      (KL in the reward), or None: a step with a reference scores it itself.
    reward: [N] f32 sequence rewards (the critic's targets), or None.
    token_fraction: [N] f32, every entry the share of the batch's tokens
      that D^3S token selection keeps this step (`selection.d3s_token_mask`
      by |A| x entropy at the step's start), or None: no token selection.
  """
  prompt: jax.Array
  prompt_mask: jax.Array
  completion: jax.Array
  completion_mask: jax.Array
  old_logp: jax.Array
  advantages: jax.Array
  weights: Any = None
  ref_logp: Any = None
  reward: Any = None
  token_fraction: Any = None


# (logp_NT, old_logp_NT, adv_NT, mask_NT, *, num_tokens, num_seqs)
#   -> (loss, metrics), e.g. functools.partial(objectives.ppo_clip_loss, ...).
PolicyLoss = Callable[..., tuple[jax.Array, Metrics]]


def _masked_mean(x, mask):
  mask = mask.astype(jnp.float32)
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


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


def one_token_rollout_exact(logits_NTV, targets_NT, mask_NT, rng, *,
                            kappa: float = 1.2, beta: float = -0.1,
                            aggregation: str = "token_mean"):
  """OTR in expectation over the candidates (no sampling; any K)."""
  del rng
  return objectives.otr_exact_loss(logits_NTV, targets_NT, mask_NT,
                                   kappa=kappa, beta=beta,
                                   aggregation=aggregation)


SUPERVISED_LOSSES = {"cross_entropy": cross_entropy,
                     "dft": dynamic_fine_tuning, "otr": one_token_rollout,
                     "otr_exact": one_token_rollout_exact}


class RolloutCorrection(NamedTuple):
  """Importance correction between the sampler and the trainer's old policy.

  With rho = pi_old / mu (trainer's log-probs at the start of the step over
  the sampler's), `objectives.importance_weights(level=, mode=, cap=)`
  scales each token's advantage: "truncate" is TIS (min(rho, cap)), "mask"
  is MIS (rho, or 0 above cap). Needs the old log-probs recomputed by the
  trainer (`recompute_old_logp=True`).
  """
  mode: str = "truncate"
  level: str = "token"
  cap: float = 2.0


def _row_counts(weights_NT):
  """(token normaliser, sequence count) of a minibatch from its weights."""
  return (jnp.sum(weights_NT).astype(jnp.float32),
          jnp.sum(jnp.any(weights_NT > 0, axis=-1)).astype(jnp.float32))


def _counts(mask_NT):
  return _row_counts(mask_NT.astype(jnp.float32))


def _chunks(tree, num_chunks: int):
  """[N, ...] leaves -> [num_chunks, N / num_chunks, ...]."""
  return jax.tree.map(
      lambda x: x.reshape((num_chunks, x.shape[0] // num_chunks)
                          + x.shape[1:]), tree)


def _unchunk(tree):
  return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), tree)


def _trim_batch(b: RLBatch, width: int) -> RLBatch:
  """The plain RLBatch fields with [N, T] token columns cut to `width`."""
  cut = lambda x: x[:, :width]
  return b._replace(completion=cut(b.completion),
                    completion_mask=cut(b.completion_mask),
                    old_logp=cut(b.old_logp), advantages=cut(b.advantages))


def _at_bucket(buckets, at_width):
  """(x, lengths) -> at_width(x, w), w the smallest of `buckets` holding
  max(lengths) (the last bucket if none): one `lax.switch` branch per width."""
  widths = jnp.asarray(buckets, jnp.int32)
  branches = [functools.partial(at_width, width=w) for w in buckets]

  def call(x, lengths):
    which = jnp.minimum(jnp.searchsorted(widths, jnp.max(lengths)),
                        len(buckets) - 1)
    return jax.lax.switch(which, branches, x)
  return call


def bucketed_map(fn, rows, lengths, buckets, num_chunks: int, trim):
  """`fn` over `num_chunks` chunks of `rows`, each at its bucket width.

  The rows are ordered by `lengths` (`row_lengths`), split into
  `num_chunks` equal chunks, and each chunk is passed to `fn` cut to the
  smallest width of `buckets` (ascending, the last the full width T) that
  holds its longest row (`trim(chunk, width)`, one `lax.switch` branch per
  width). `fn` returns a pytree of [rows, width, ...] leaves (per-token
  values, 0 beyond a row's length); they are padded with zeros to T and
  returned in the rows' original order, [N, T, ...]. For a causal scorer
  this equals `fn` on the whole batch wherever a row has tokens.
  """
  n = lengths.shape[0]
  if n % num_chunks:
    raise ValueError(f"{n} rows do not split into {num_chunks} chunks.")
  full = buckets[-1]
  order = jnp.argsort(lengths, stable=True)
  chunks = _chunks(jax.tree.map(lambda x: x[order], rows), num_chunks)
  chunk_len = _chunks(lengths[order], num_chunks)

  def pad(x, width):
    if width == full:
      return x
    cfg = [(0, 0)] * x.ndim
    cfg[1] = (0, full - width)
    return jnp.pad(x, cfg)

  one = _at_bucket(buckets, lambda c, width: jax.tree.map(
      lambda x: pad(x, width), fn(trim(c, width))))
  out = _unchunk(jax.lax.map(lambda xs: one(*xs), (chunks, chunk_len)))
  inverse = jnp.argsort(order)
  return jax.tree.map(lambda x: x[inverse], out)


def _is_loss_metric(name: str) -> bool:
  return name.endswith("loss")


def bucket_lengths(num_tokens: int, num_buckets: int) -> tuple[int, ...]:
  """The completion widths of `num_buckets` length buckets over T tokens.

  Bucket i holds ceil(T (i + 1) / K) tokens rounded up to a multiple of 8
  (at most T); the last is T. Equal widths after rounding are merged.
  """
  if num_buckets < 1:
    raise ValueError(f"num_buckets must be >= 1, got {num_buckets}.")
  t, k = int(num_tokens), int(num_buckets)
  widths = set()
  for i in range(k):
    w = -(-t * (i + 1) // k)  # ceil(T (i + 1) / K)
    widths.add(min(t, -(-w // 8) * 8))
  return tuple(sorted(widths | {t}))


def row_lengths(mask_NT: jax.Array) -> jax.Array:
  """[N] int32: one past the last valid column of each row (0 if none)."""
  mask = mask_NT.astype(bool)
  t = mask.shape[1]
  last = t - jnp.argmax(mask[:, ::-1], axis=1)
  return jnp.where(jnp.any(mask, axis=1), last, 0).astype(jnp.int32)


def weighted_kl(logp_NT, ref_logp_NT, weights_NT, mask_NT, *, kind: str = "k3",
                aggregation: str = "token_mean", num_tokens=None,
                num_seqs=None, norm_constant=None):
  """The KL(pi || pi_ref) loss term with per-token weights.

    L = aggregate_{n,t}( w_{n,t} k(ref_logp - logp) )      k in {k1, k2, k3}

  `regularizers.kl_penalty` per token, scaled by the token weights and
  reduced like the policy loss (`aggregation.aggregate`). With w = mask it
  is `regularizers.kl_loss`. Returns (loss, kl_NT): kl_NT is the unweighted
  estimator (no gradient) for metrics.
  """
  kl_NT = regularizers.kl_penalty(logp_NT, ref_logp_NT, kind)
  loss = aggregation_lib.aggregate(kl_NT * weights_NT, mask_NT, aggregation,
                                   num_tokens=num_tokens, num_seqs=num_seqs,
                                   norm_constant=norm_constant)
  return loss, jax.lax.stop_gradient(kl_NT)


def minibatch_scan(params, opt_states, optimizers, rows, key, loss_fn, *,
                   num_epochs: int, num_minibatches: int,
                   num_microbatches: int, constrain=None, lengths=None,
                   buckets=None, trim=None):
  """Epochs x minibatches x micro-batches of optimiser updates over `rows`.

  The one update loop of every RL step (policy-only and actor-critic). Each
  epoch visits the N rows in a fresh permutation (`fold_in(key, epoch)`),
  split into `num_minibatches` optimiser updates; each update accumulates the
  gradients of `num_microbatches` micro-batches, whose losses are normalised
  by the whole minibatch's token weight and sequence count, so the
  accumulated gradient equals the unsplit minibatch's.

  Args:
    params, opt_states, optimizers: equal-length tuples, one entry per
      trained model (policy, and the critic for PPO).
    rows: a pytree of [N, ...] arrays, with a "weights" [N, T] entry.
    key: the permutation key.
    loss_fn: (params, micro_rows, num_tokens, num_seqs) -> (loss, (metrics,
      sums, maxes)): scalar metrics of the micro-batch (summed over
      micro-batches when their name ends in "loss", else averaged), sums
      (divided by the minibatch's "tokens" sum) and maxima.
    num_epochs, num_minibatches, num_microbatches: the schedule.
    constrain: optional map of each gathered [U, ub, ...] leaf (e.g. a
      sharding constraint that keeps micro-batch rows split over the batch
      axes after the permutation's gather).
    lengths, buckets, trim: length-bucketed micro-batches (all three or
      none). `lengths` [N] int: each row's used width (`row_lengths`);
      `buckets`: ascending widths, the last the rows' full width
      (`bucket_lengths`); `trim(micro_rows, width)`: the micro-batch cut to
      its first `width` token columns. The rows of each minibatch are then
      ordered by length before the split into micro-batches, and each
      micro-batch's loss and gradient are computed at the smallest bucket
      width that holds its longest row (`lax.switch` over one compiled
      branch per bucket). Padding beyond a row's length never changes its
      loss (causal attention, masked tokens), so the update is the same up
      to float rounding, at the cost of the tokens actually used.

  Returns:
    (params, opt_states, metrics): metrics stacked over the
    num_epochs * num_minibatches updates.
  """
  n = jax.tree.leaves(rows)[0].shape[0]
  per_update = num_minibatches * num_microbatches
  if n % per_update:
    raise ValueError(
        f"The rollout batch of {n} sequences does not split into "
        f"{num_minibatches} minibatches x {num_microbatches} micro-batches; "
        "choose sizes whose product divides the number of sequences.")
  num_updates = num_epochs * num_minibatches
  bucketed = buckets is not None
  if bucketed != (lengths is not None) or bucketed != (trim is not None):
    raise ValueError("Length buckets need lengths, buckets and trim "
                     "together.")
  # One minibatch per epoch holds every row, so its gradient does not
  # depend on the order: the rows are split into micro-batches in place
  # (no permutation, no gather; the sums differ only in rounding order).
  permute = num_minibatches > 1
  gather = permute or bucketed
  ub = n // per_update
  if permute:
    perms = jax.vmap(lambda e: jax.random.permutation(
        jax.random.fold_in(key, e), n))(jnp.arange(num_epochs))
    idx = perms.reshape(num_updates, num_microbatches * ub)
  elif bucketed:
    idx = jnp.broadcast_to(jnp.arange(n), (num_updates, n))
  else:
    idx = None  # the scan below runs num_updates times over the same rows
  if bucketed:  # each minibatch's rows by length, then the micro-batches
    order = jnp.argsort(lengths[idx], axis=1, stable=True)
    idx = jnp.take_along_axis(idx, order, axis=1)
  if gather:
    idx = idx.reshape(num_updates, num_microbatches, ub)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def update(carry, idx_UB):
    params, opt_states = carry
    if gather:
      mb = jax.tree.map(lambda x: x[idx_UB], rows)  # leaves [U, ub, ...]
    else:
      mb = _chunks(rows, num_microbatches)
    if constrain is not None:
      mb = jax.tree.map(constrain, mb)
    num_tokens, num_seqs = _row_counts(mb["weights"])

    def micro_grads(micro):
      return grad_fn(params, micro, num_tokens, num_seqs)

    if bucketed:  # xs = (micro-batch, its row lengths)
      at_bucket = _at_bucket(
          buckets, lambda m, width: micro_grads(trim(m, width)))
      micro_step = lambda xs: at_bucket(*xs)
      xs = (mb, lengths[idx_UB])
    else:
      micro_step, xs = micro_grads, mb

    def micro_body(acc, x):
      (loss, aux), grads = micro_step(x)
      return jax.tree.map(jnp.add, acc, grads), (loss, aux)

    zeros = jax.tree.map(jnp.zeros_like, params)
    # A loop of one is inlined (unroll), so XLA fuses across it.
    grads, (loss_U, (metrics_U, sums_U, maxes_U)) = jax.lax.scan(
        micro_body, zeros, xs, unroll=num_microbatches == 1)
    new_params, new_opt = [], []
    for opt, p, o, g in zip(optimizers, params, opt_states, grads):
      upd, o = opt.update(g, o, p)
      new_params.append(optax.apply_updates(p, upd))
      new_opt.append(o)
    tokens = jnp.maximum(jnp.sum(sums_U["tokens"]), 1.0)
    out = {k: jnp.sum(v) if _is_loss_metric(k) else jnp.mean(v)
           for k, v in metrics_U.items()}
    out.update({k: jnp.sum(v) / tokens for k, v in sums_U.items()
                if k != "tokens"})
    out.update({k: jnp.max(v) for k, v in maxes_U.items()})
    out["loss"] = jnp.sum(loss_U)
    out["grad_norm"] = optax.tree.norm(grads[0])
    if len(grads) > 1:
      out["value_grad_norm"] = optax.tree.norm(grads[1])
    return (tuple(new_params), tuple(new_opt)), out

  (params, opt_states), metrics = jax.lax.scan(
      update, (tuple(params), tuple(opt_states)), idx if gather else None,
      length=num_updates, unroll=num_updates == 1)
  return params, opt_states, metrics


class Critic(NamedTuple):
  """The value model of an actor-critic step (see `training.ppo`)."""
  values: Callable[..., jax.Array]  # (critic_params, batch-like) -> V [N, T]
  loss: Callable[..., tuple[jax.Array, Metrics]]  # value_loss partial
  advantages: Callable[..., Any]  # (reward_NT, V, mask) -> (adv, ret, raw)
  value_coef: float = 0.5


def make_policy_step(graphdef: nnx.GraphDef, optimizers, policy_loss, *,
                     critic: Critic | None = None, temperature: float = 1.0,
                     num_epochs: int = 1, num_minibatches: int = 1,
                     num_microbatches: int = 1, entropy_coef: float = 0.0,
                     logprob_chunk: int = 0, vocab_chunk: int | None = None,
                     kl_coef: float = 0.0, kl_estimator: str = "k3",
                     kl_aggregation: str = "token_mean",
                     kl_norm_constant: float | None = None,
                     kl_in_reward: bool = False, use_ref: bool = False,
                     recompute_old_logp: bool = False,
                     rollout_correction: RolloutCorrection | None = None,
                     mesh=None, rules=mesh_lib.DEFAULT_RULES, ref_fn=None,
                     length_buckets: int = 0, prompt_group: int = 1):
  """The shared RL update: `step((policy[, critic]), ref, batch)`.

  Returns `step(states, ref_params, batch) -> (states, metrics)`, `states` a
  tuple of TrainStates (the policy, then the critic when `critic` is given)
  and `ref_params` the frozen reference's parameters (None without one).

  Before any update, one pass over the batch (in micro-batch-sized chunks,
  inside the same program) scores what the step needs at the step's start:
  the policy's log-probs (`recompute_old_logp`, `rollout_correction`), the
  reference's (a KL term without `batch.ref_logp`) and the critic's values.
  Then:
    old_logp  = recomputed log-probs, or the sampler's (`batch.old_logp`);
    adv       = batch.advantages, or GAE from `batch.reward` with a critic
                (minus kl_coef * KL per token with `kl_in_reward`);
    adv      *= importance weights (`rollout_correction`);
    loss      = policy_loss(logp, old_logp, w * adv, mask & (w > 0))
                + kl_coef * weighted_kl(...)      (unless kl_in_reward)
                - entropy_coef * sum(w * H) / sum(w)
                + value_coef * value_loss          (with a critic)
  The reference is `ref_params`, or with `ref_fn` the function of the
  policy's parameters at the step's start (LoRA: adapters off, no copy).
  with w = `batch.weights` (default the mask) and the token normaliser
  sum(w), over `minibatch_scan`'s schedule. With `length_buckets` K > 0 the
  rows of each minibatch are ordered by completion length before the split
  into micro-batches and each micro-batch is computed at the smallest of K
  bucket widths (`bucket_lengths`) that holds its rows: the same update up
  to float rounding, at the cost of the tokens used rather than the
  budget; the scoring pass before the update is bucketed the same way
  (`bucketed_map`: chunks of rows ordered by length). With `prompt_group`
  G > 1 every scoring pass runs each group's shared prompt once
  (`make_rl_step`). With `mesh`, the rows each
  micro-batch gathers stay split over the mesh's batch axes (data parallel
  forward and backward) when the micro-batch divides by them.

  Metrics: the policy loss's, `loss`, `grad_norm`, `entropy`, `kl` (the
  estimator's masked token mean, before the coefficient; with a reference),
  `logp_mismatch_mean/max` (sampler vs the trainer's log-probs, first
  update), importance-weight metrics `rc_*` (with a correction) and, with a
  critic, `value_loss`, `explained_variance`, `gae_adv_mean`.
  """
  if rollout_correction is not None and not recompute_old_logp:
    raise ValueError(
        "A rollout correction compares the trainer's old log-probs with the "
        "sampler's: set recompute_old_logp=True (config rl.recompute_old_logp"
        "=True) together with rl.rollout_correction.")
  if (kl_coef or kl_in_reward) and not use_ref:
    raise ValueError("kl_coef / kl_in_reward need a reference policy "
                     "(use_ref=True).")
  if kl_in_reward and critic is None:
    raise ValueError(
        "kl_in_reward inside the step needs a critic's token rewards; for "
        "sequence-advantage methods the KL is folded into the reward before "
        "the advantage (pass batch.ref_logp and kl_coef=0).")
  _check_prompt_group(prompt_group, num_minibatches, length_buckets)
  optimizers = tuple(optimizers)
  score = functools.partial(score_completions, graphdef,
                            temperature=temperature, chunk_size=logprob_chunk,
                            vocab_chunk=vocab_chunk, prompt_group=prompt_group)
  kl_loss_coef = 0.0 if kl_in_reward else kl_coef

  def batch_scores(params, b):
    return score(params, b.prompt, b.prompt_mask, b.completion,
                 b.completion_mask)

  def loss_fn(params, micro, num_tokens, num_seqs):
    b, w = micro["batch"], micro["weights"]
    mask = b.completion_mask.astype(bool) & (w > 0)
    scores = batch_scores(params[0], b)
    loss, metrics = policy_loss(scores.logp, micro["old_logp"],
                                micro["adv"] * w, mask,
                                num_tokens=num_tokens, num_seqs=num_seqs)
    metrics = dict(metrics)
    maskf = b.completion_mask.astype(jnp.float32)
    ent_sum = jnp.sum(scores.entropy * w)
    if entropy_coef:
      loss = loss - entropy_coef * ent_sum / jnp.maximum(num_tokens, 1.0)
    diff = jnp.abs(scores.logp - b.old_logp) * maskf
    sums = dict(entropy=ent_sum, logp_mismatch_mean=jnp.sum(diff),
                tokens=jnp.sum(w))
    if use_ref:
      kl_term, kl_NT = weighted_kl(
          scores.logp, micro["ref_logp"], w, mask, kind=kl_estimator,
          aggregation=kl_aggregation, num_tokens=num_tokens,
          num_seqs=num_seqs, norm_constant=kl_norm_constant)
      sums["kl"] = jnp.sum(kl_NT * w)
      if kl_loss_coef:
        loss = loss + kl_loss_coef * kl_term
        metrics["kl_loss"] = jax.lax.stop_gradient(kl_term)
    if critic is not None:
      v = critic.values(params[1], b)
      vl, vm = critic.loss(v, micro["v_old"], micro["returns"], mask,
                           num_tokens=num_tokens, num_seqs=num_seqs)
      metrics.update(vm)
      loss = loss + critic.value_coef * vl
    return loss, (metrics, sums, dict(logp_mismatch_max=jnp.max(diff)))

  def step(states, ref_params, batch: RLBatch):
    n, t = batch.completion.shape
    per_update = num_minibatches * num_microbatches
    if n % per_update:
      raise ValueError(
          f"The rollout batch of {n} sequences does not split into "
          f"{num_minibatches} minibatches x {num_microbatches} micro-batches; "
          "choose sizes whose product divides the number of sequences.")
    if (n // per_update) % prompt_group:
      raise ValueError(
          f"Micro-batches of {n // per_update} rows do not hold whole groups "
          f"of prompt_group={prompt_group} rows; use fewer micro-batches or "
          "prompt_group=1.")
    policy = states[0]
    if ref_fn is not None:
      ref_params = jax.lax.stop_gradient(ref_fn(policy.params))
    mask = batch.completion_mask
    maskf = mask.astype(jnp.float32)
    weights = maskf if batch.weights is None else (
        jnp.asarray(batch.weights, jnp.float32) * maskf)
    plain = RLBatch(*batch[:6])
    extra = {}
    need_cur = recompute_old_logp
    select = batch.token_fraction is not None
    need_ref = use_ref and batch.ref_logp is None

    def prepass(b):
      out = {}
      if need_cur or select:
        sc = batch_scores(policy.params, b)
        out["cur"], out["entropy"] = sc.logp, sc.entropy
      if need_ref:
        out["ref"] = batch_scores(ref_params, b).logp
      if critic is not None:
        out["v"] = critic.values(states[1].params, b)
      return out

    if length_buckets:
      lengths, buckets = row_lengths(mask), bucket_lengths(t, length_buckets)
    pre = {}
    if need_cur or select or need_ref or critic is not None:
      if length_buckets:
        pre = bucketed_map(prepass, plain, lengths, buckets, per_update,
                           _trim_batch)
      else:
        pre = _unchunk(jax.lax.map(prepass, _chunks(plain, per_update)))
      pre = jax.lax.stop_gradient(pre)
    old_logp = pre["cur"] if need_cur else batch.old_logp
    ref_logp = (pre["ref"] if need_ref else batch.ref_logp) if use_ref else None
    if critic is not None:
      if batch.reward is None:
        raise ValueError("An actor-critic step needs RLBatch.reward (the "
                         "sequence rewards).")
      reward_N = jnp.asarray(batch.reward, jnp.float32)
      kl_NT = None
      if kl_in_reward:
        kl_NT = regularizers.kl_penalty(old_logp, ref_logp, kl_estimator)
      adv, ret, raw = critic.advantages(reward_N, pre["v"], mask,
                                        kl_NT=kl_NT, kl_coef=kl_coef)
      extra["v_old"], extra["returns"] = pre["v"], ret
      extra["explained_variance"] = value_lib.explained_variance(
          pre["v"], ret, mask)
      extra["gae_adv_mean"] = jnp.sum(raw * maskf) / jnp.maximum(
          jnp.sum(maskf), 1)
      if kl_in_reward:
        extra["kl"] = jnp.sum(kl_NT * weights) / jnp.maximum(
            jnp.sum(weights), 1.0)
    else:
      adv = jnp.asarray(batch.advantages, jnp.float32)
    if select:  # D^3S token level: the top share by |A| x entropy
      keep = selection.d3s_token_mask(adv, pre["entropy"], weights > 0,
                                      fraction=batch.token_fraction[0])
      extra["d3s_token_kept"] = jnp.sum(keep) / jnp.maximum(
          jnp.sum(weights > 0), 1)
      weights = weights * keep
    rc_metrics = {}
    if rollout_correction is not None:
      w_is, rc_metrics = objectives.importance_weights(
          old_logp, batch.old_logp, mask, level=rollout_correction.level,
          mode=rollout_correction.mode, cap=rollout_correction.cap)
      adv = adv * w_is
    rows = {"batch": plain, "weights": weights, "old_logp": old_logp,
            "adv": adv}
    if use_ref:
      rows["ref_logp"] = ref_logp
    if critic is not None:
      rows["v_old"], rows["returns"] = extra["v_old"], extra["returns"]
    key = step_rng(policy, 1)
    constrain = None
    ub = n // per_update
    if mesh is not None and mesh.size > 1 and (
        ub % mesh_lib.batch_size_multiple(mesh, rules) == 0):
      names = mesh_lib.batch_axes(rules)
      lead = names[0] if len(names) == 1 else (names or None)

      def constrain(x):
        spec = jax.sharding.PartitionSpec(None, lead,
                                          *([None] * (x.ndim - 2)))
        return jax.lax.with_sharding_constraint(
            x, jax.sharding.NamedSharding(mesh, spec))
    bucket_kw = {}
    if length_buckets:
      def trim(micro, width):
        out = {k: (v if k == "batch" else v[:, :width])
               for k, v in micro.items()}
        out["batch"] = _trim_batch(micro["batch"], width)
        return out
      bucket_kw = dict(lengths=lengths, buckets=buckets, trim=trim)
    params, opts, m = minibatch_scan(
        tuple(s.params for s in states), tuple(s.opt_state for s in states),
        optimizers, rows, key, loss_fn, num_epochs=num_epochs,
        num_minibatches=num_minibatches, num_microbatches=num_microbatches,
        constrain=constrain, **bucket_kw)
    metrics = {k: jnp.mean(v) for k, v in m.items()}
    metrics["logp_mismatch_mean"] = m["logp_mismatch_mean"][0]
    metrics["logp_mismatch_max"] = m["logp_mismatch_max"][0]
    for k in ("explained_variance", "gae_adv_mean", "kl", "d3s_token_kept"):
      if k in extra:
        metrics[k] = extra[k]
    metrics.update({f"rc_{k}": v for k, v in rc_metrics.items()})
    new = tuple(TrainState(s.step + 1, p, o, s.rng)
                for s, p, o in zip(states, params, opts))
    return new, metrics

  return step


def _check_prompt_group(prompt_group: int, num_minibatches: int,
                        length_buckets: int) -> None:
  """Refuses a shared-prompt update whose rows do not stay in their groups."""
  if prompt_group < 1:
    raise ValueError(f"prompt_group={prompt_group} must be >= 1.")
  if prompt_group == 1:
    return
  if num_minibatches > 1:
    raise ValueError(
        f"prompt_group={prompt_group} needs the rows of a group kept together, "
        f"but num_minibatches={num_minibatches} draws each minibatch's rows "
        "at random; use num_minibatches=1 or prompt_group=1.")
  if length_buckets:
    raise ValueError(
        f"prompt_group={prompt_group} needs the rows of a group kept together, "
        f"but length_buckets={length_buckets} orders the rows by length; "
        "use length_buckets=0 or prompt_group=1.")


def make_rl_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                 policy_loss: PolicyLoss, *, temperature: float = 1.0,
                 num_epochs: int = 1, num_minibatches: int = 1,
                 num_microbatches: int = 1, entropy_coef: float = 0.0,
                 logprob_chunk: int = 0, vocab_chunk: int | None = None,
                 kl_coef: float = 0.0, kl_estimator: str = "k3",
                 kl_aggregation: str = "token_mean",
                 kl_norm_constant: float | None = None,
                 use_ref: bool = False, recompute_old_logp: bool = False,
                 rollout_correction: RolloutCorrection | None = None,
                 mesh=None, rules=mesh_lib.DEFAULT_RULES, ref_fn=None,
                 length_buckets: int = 0, prompt_group: int = 1):
  """Returns `rl_step(state, RLBatch) -> (state, metrics)`.

  `state` is a `TrainState`, or with `use_ref` a `RefState(train, ref)`
  whose frozen reference parameters score `ref_logp` inside the step.
  See `make_policy_step` for the update and its metrics.

  Args:
    graphdef: NNX graph of the policy.
    optimizer: optax transformation.
    policy_loss: see `PolicyLoss`; it receives the minibatch's token weight
      and sequence counts as normalisers.
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
    kl_coef, kl_estimator, kl_aggregation, kl_norm_constant: the KL(pi ||
      pi_ref) loss term (`weighted_kl`); 0 disables the term (the metric
      `kl` is still logged with a reference).
    use_ref: the state carries a reference policy.
    recompute_old_logp: take the PPO ratio against the trainer's log-probs
      at the step's start instead of the sampler's.
    rollout_correction: a `RolloutCorrection` (needs recompute_old_logp).
    mesh, rules: the training mesh, to keep micro-batch rows sharded.
    ref_fn: with `use_ref`, the reference as a function of the policy's
      parameters (`models.lora.zero_adapters`); the state is then a plain
      `TrainState`.
    length_buckets: K > 0 computes each micro-batch at the smallest of K
      completion widths that holds its rows, the rows ordered by length
      (see `make_policy_step`); 0 computes every row at the full width.
    prompt_group: G > 1 when the batch's rows come in consecutive groups of
      G sharing one prompt (`scoring.prompt_groups_shared`): every scoring
      pass runs each prompt's layers once per group
      (`score_completions(prompt_group=G)`), the same update up to float
      rounding. It needs num_minibatches=1, no length buckets, and
      micro-batches of whole groups; other settings are refused.

  The metric `logp_mismatch_*` compares the rollout's log-probs with the
  trainer's recomputation before any update (first minibatch of epoch one).
  """
  body = make_policy_step(
      graphdef, (optimizer,), policy_loss, temperature=temperature,
      num_epochs=num_epochs, num_minibatches=num_minibatches,
      num_microbatches=num_microbatches, entropy_coef=entropy_coef,
      logprob_chunk=logprob_chunk, vocab_chunk=vocab_chunk, kl_coef=kl_coef,
      kl_estimator=kl_estimator, kl_aggregation=kl_aggregation,
      kl_norm_constant=kl_norm_constant, use_ref=use_ref,
      recompute_old_logp=recompute_old_logp,
      rollout_correction=rollout_correction, mesh=mesh, rules=rules,
      ref_fn=ref_fn, length_buckets=length_buckets,
      prompt_group=prompt_group)

  def rl_step(state, batch: RLBatch):
    if use_ref and ref_fn is None:
      (train,), metrics = body((state.train,), state.ref, batch)
      return RefState(train, state.ref), metrics
    (train,), metrics = body((state,), None, batch)
    return train, metrics

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
