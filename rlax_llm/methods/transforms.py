"""The chain of group transforms every rollout engine's groups go through.

After an engine returns its `Groups`, one chain turns them into the update's
`RLBatch`, the same for every engine (built from the config by
`rlax_llm.experiment.pipeline`, like optax's `chain`):

  per draw:   overlong shaping            reward += DAPO soft overlong penalty
  filter:     dynamic sampling            keep groups whose rewards differ,
                                          draw again until B are kept
  reward:     KL in the reward            reward -= beta sum_t KL_t (or per
                                          token, for token-level advantages)
  advantage:  the method's advantage      reward_BG -> adv_BG, a token-level
                                          advantage, or the engine's own
  advantage:  XRPO sharpening             novelty bonus on correct rollouts
  selection:  D^3S sample selection       per group, the max-variance subset

Each transform is a small function `(Work, StepContext) -> Work` over host
arrays that calls one `rlax_llm.core` function; `apply_chain` runs them in
order and `to_batch` flattens the result. Options a given engine or method
cannot honour are refused before the run starts
(`rlax_llm.experiment.pipeline.check_options`), never ignored.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlax_llm.core import regularizers
from rlax_llm.core import selection
from rlax_llm.methods.rollouts import Groups, reward_stats, sampled_tokens
from rlax_llm.methods.rollouts import row_prompts, valid_slots
from rlax_llm.training.steps import RLBatch


class Work(NamedTuple):
  """What flows through the chain.

  Attributes:
    groups: the step's B groups (rewards shaped in place).
    adv: [B, G] sequence or [B, G, T] token advantages, None before the
      advantage transform.
    kl: [B, G, T] f32 per-token KL estimate to the reference (KL in the
      reward), or None.
    stats: metrics of the step so far.
    ref_logp: [B, G, T] f32 reference log-probs scored for the KL in the
      reward (handed to the update so it does not score them again).
  """
  groups: Groups
  adv: Optional[np.ndarray] = None
  kl: Optional[np.ndarray] = None
  stats: Optional[dict] = None
  ref_logp: Optional[np.ndarray] = None


class StepContext(NamedTuple):
  """What a transform may call, for one RL step.

  Attributes:
    engine: the rollout engine (`readvantage` for tree advantages).
    draw: draw -> Groups of the same step through the per-draw transforms
      (dynamic sampling's extra draws; draw 0 is the step's first).
    ref_logp: Groups -> [B, G, T] reference log-probs of their tokens, or
      None without a reference.
    step: the global step; rl_step: the step within the RL phase.
  """
  engine: Any
  draw: Callable[[int], Groups]
  ref_logp: Optional[Callable[[Groups], np.ndarray]]
  step: int
  rl_step: int


Transform = Callable[[Work, StepContext], Work]


def overlong_shaping(*, max_new_tokens: int, buffer: int) -> Callable:
  """DAPO's soft overlong punishment (`core.selection.overlong_penalty`),
  applied to each draw's rewards: a per-draw transform `Groups -> Groups`."""

  def shape(groups: Groups) -> Groups:
    pen = np.asarray(selection.overlong_penalty(
        jnp.asarray(groups.lengths.reshape(-1)), max_length=max_new_tokens,
        cache_length=buffer)).reshape(groups.reward.shape)
    return groups._replace(reward=(groups.reward + pen).astype(np.float32))

  return shape


def _take(groups: Groups, idx) -> Groups:
  """The groups at indices `idx` (leading axis B) of every [B, ...] field."""
  out = {}
  for k, v in groups._asdict().items():
    out[k] = v[idx] if isinstance(v, np.ndarray) else v
  return Groups(**out)


def _concat(parts: Sequence[Groups]) -> Groups:
  first = parts[0]
  out = {}
  for k, v in first._asdict().items():
    if isinstance(v, np.ndarray):
      out[k] = np.concatenate([getattr(p, k) for p in parts])
    else:
      out[k] = v
  out["errors"] = sum(p.errors for p in parts)
  return Groups(**out)


def _masked_filler(template: Groups, n: int) -> Groups:
  """n fully masked groups shaped like `template`'s (they train nothing)."""
  out = {}
  for k, v in template._asdict().items():
    if not isinstance(v, np.ndarray):
      out[k] = v
    elif k in ("prompt", "prompt_mask", "row_prompt", "row_prompt_mask"):
      out[k] = np.repeat(v[:1], n, axis=0)
    elif k == "texts":
      out[k] = np.full((n,) + v.shape[1:], "", dtype=object)
    else:
      out[k] = np.zeros((n,) + v.shape[1:], v.dtype)
  return Groups(**out)


def dynamic_sampling(*, max_rounds: int) -> Transform:
  """DAPO dynamic sampling (arXiv:2503.14476): draw until B groups vary.

  Groups whose rewards all agree (`core.selection.dynamic_sampling_mask`)
  carry no signal under group-normalised advantages; they are dropped and
  further draws of the same step (other prompts) fill the batch, as DAPO's
  trainer keeps generating until the batch is full. `max_rounds` bounds the
  draws; slots still empty then hold fully masked groups (weight 0), so the
  batch shape never changes. In variable-size groups (`Groups.valid`) only
  the valid slots' rewards count. Stats: `rollout/sampling_rounds`,
  `rollout/empty_groups`, `rollout/kept_groups_first_draw` (and
  `rollout/filtered_first_draw`, the share of the first draw's groups
  dropped), and the further draws' tokens added to `rollout/sampled_tokens`.
  """

  def apply(work: Work, ctx: StepContext) -> Work:
    b = work.groups.reward.shape[0]
    pieces, count, rounds = [], 0, 0
    groups = work.groups
    drawn_tokens = 0  # of the draws after the first (counted by the chain)
    first_kept = None
    while True:
      keep = np.asarray(selection.dynamic_sampling_mask(
          jnp.asarray(groups.reward),
          mask_BG=None if groups.valid is None else valid_slots(groups)))
      idx = np.flatnonzero(keep)
      if first_kept is None:
        first_kept = len(idx)
      pieces.append(_take(groups, idx))
      count += len(idx)
      rounds += 1
      if count >= b or rounds >= max_rounds:
        break
      groups = ctx.draw(rounds)
      drawn_tokens += sampled_tokens(groups)
    kept = _take(_concat(pieces), np.arange(min(count, b)))
    missing = b - min(count, b)
    errors = sum(p.errors for p in pieces)
    if missing:
      kept = _concat([kept, _masked_filler(work.groups, missing)])
    kept = kept._replace(errors=errors, stats=work.groups.stats)
    stats = dict(work.stats or {})
    stats["rollout/sampled_tokens"] = (
        stats.get("rollout/sampled_tokens", 0) + drawn_tokens)
    stats.update({"rollout/sampling_rounds": rounds,
                  "rollout/empty_groups": missing,
                  "rollout/kept_groups_first_draw": first_kept,
                  "rollout/filtered_first_draw": 1.0 - first_kept / b,
                  "reward/errors": errors})
    return work._replace(groups=kept, stats=stats)

  return apply


def kl_in_reward(*, coef: float, estimator: str = "k3",
                 per_token: bool = False) -> Transform:
  """KL(pi || pi_ref) folded into the reward before the advantage.

    KL_{n,t} = k(ref_logp - logp)   (`core.regularizers.kl_penalty`, the
                                     sampler's log-probs as logp)
    sequence level: r_n <- r_n - coef * sum_t KL_{n,t}
    per token:      kept in `Work.kl` for a token-level advantage, which
                    places -coef * KL_t on every token (REINFORCE++)

  The sequence-level fold is what verl does for outcome-advantage
  estimators with `use_kl_in_reward` (they sum the token-level rewards).
  Stats: `reward/kl` (masked token mean of the estimator, before `coef`;
  the update logs `rl/kl` with the trainer's log-probs).
  """

  def apply(work: Work, ctx: StepContext) -> Work:
    g = work.groups
    ref = ctx.ref_logp(g)
    kl = np.asarray(regularizers.kl_penalty(jnp.asarray(g.logp),
                                            jnp.asarray(ref), estimator))
    w = g.weights if g.weights is not None else g.mask.astype(np.float32)
    kl = np.where(g.mask, kl, 0.0).astype(np.float32)
    stats = dict(work.stats or {})
    stats["reward/kl"] = float((kl * w).sum() / max(w.sum(), 1.0))
    if not per_token:
      g = g._replace(reward=(g.reward - coef * (kl * w).sum(-1)).astype(
          np.float32))
    return work._replace(groups=g, kl=kl, stats=stats,
                         ref_logp=np.asarray(ref, np.float32))

  return apply


_JITTED: dict[Any, Callable[..., Any]] = {}


def _jitted(fn: Callable[..., Any], **jit_kwargs) -> Callable[..., Any]:
  """`jax.jit(fn, **jit_kwargs)`, one per estimator: a `functools.partial`
  of the same function and settings (each `get_method` call makes a new
  one) maps to the same jitted function, so experiments built in one process
  share its compiled programs."""
  key = fn
  if isinstance(fn, functools.partial):
    key = (fn.func, fn.args, tuple(sorted(fn.keywords.items())))
  key = (key, tuple(sorted(jit_kwargs.items())))
  try:
    hash(key)
  except TypeError:  # unhashable settings: one jit per estimator object
    return jax.jit(fn, **jit_kwargs)
  if key not in _JITTED:
    _JITTED[key] = jax.jit(fn, **jit_kwargs)
  return _JITTED[key]


def advantage(method, *, kl_coef: float = 0.0) -> Transform:
  """The advantage: the engine's own (trees), the method's token-level one,
  or the method's sequence advantage over the (shaped) rewards; in
  variable-size groups (`Groups.valid`) over each group's valid rollouts
  only (the estimators' `mask_BG`), 0 on empty slots.

  The estimator runs as one compiled program per batch shape (`jax.jit`):
  the estimators are pure JAX functions, and one program replaces the ~20
  operations an eager call dispatches (and compiles once each) per step.
  """
  sequence_fn = _jitted(method.advantage_fn)
  token_fn = (None if getattr(method, "token_advantage_fn", None) is None
              else _jitted(method.token_advantage_fn,
                           static_argnames=("group_size", "kl_coef")))

  def apply(work: Work, ctx: StepContext) -> Work:
    g = work.groups
    stats = dict(work.stats or {})
    if not ctx.engine.sequence_advantages:
      g = ctx.engine.readvantage(g)
      adv = g.token_adv
    elif token_fn is not None:
      b, n_g, t = g.tokens.shape
      kl = None if work.kl is None else jnp.asarray(work.kl.reshape(-1, t))
      adv = np.asarray(token_fn(
          jnp.asarray(g.reward.reshape(-1)), jnp.asarray(
              g.mask.reshape(-1, t)), kl_NT=kl, kl_coef=float(kl_coef),
          group_size=int(n_g))).reshape(b, n_g, t)
    elif g.valid is not None and not method.critic:
      valid = valid_slots(g)
      adv = np.asarray(sequence_fn(jnp.asarray(g.reward),
                                   mask_BG=jnp.asarray(valid)))
      adv = np.where(valid, adv, 0.0)
    else:
      adv = np.asarray(sequence_fn(jnp.asarray(g.reward)))
    w = g.weights if g.weights is not None else g.mask.astype(np.float32)
    if adv.ndim == 3:
      stats["rollout/adv_abs"] = float((np.abs(adv) * w).sum()
                                       / max(w.sum(), 1.0))
    else:
      stats["rollout/adv_abs"] = float(np.abs(adv).mean())
    return work._replace(groups=g, adv=np.asarray(adv, np.float32),
                         stats=stats)

  return apply


def xrpo_sharpening(*, lam: float, kappa_clip: float,
                    length_normalise: bool = True) -> Transform:
  """XRPO novelty-aware sharpening of sequence advantages
  (`core.selection.xrpo_novelty`, `xrpo_sharpen`); `length_normalise`
  picks s(y) as the mean (True) or the sum of the token log-probs. Empty
  slots of variable-size groups have an all-False mask and advantage 0, so
  they neither enter the group's mean s nor get a bonus."""

  def apply(work: Work, ctx: StepContext) -> Work:
    g = work.groups
    b, n_g, t = g.tokens.shape
    eta = selection.xrpo_novelty(g.logp.reshape(b * n_g, t),
                                 g.mask.reshape(b * n_g, t), n_g,
                                 length_normalise=length_normalise)
    adv = work.adv
    sharp = np.asarray(selection.xrpo_sharpen(
        adv.reshape(-1), g.reward.reshape(-1) >= 0.5, eta, lam=lam,
        kappa_clip=kappa_clip)).reshape(adv.shape)
    stats = dict(work.stats or {})
    stats["rollout/xrpo_sharpened"] = float(np.mean(sharp != adv))
    stats["rollout/xrpo_bonus"] = float(np.mean(sharp - adv))
    return work._replace(adv=sharp.astype(np.float32), stats=stats)

  return apply


def d3s_sample_selection(*, keep: int) -> Transform:
  """D^3S sample-level selection: per group, the `keep` rollouts whose
  advantages have the largest variance (`core.selection.d3s_sample_mask`);
  the others get token weight 0. Stats: `rollout/d3s_kept` (share kept)."""
  select = jax.jit(jax.vmap(
      lambda a, m: selection.d3s_sample_mask(a, keep, mask_N=m)))

  def apply(work: Work, ctx: StepContext) -> Work:
    g = work.groups
    valid_BG = g.mask.any(-1)
    chosen = np.asarray(select(jnp.asarray(work.adv), jnp.asarray(valid_BG)))
    w = g.weights if g.weights is not None else g.mask.astype(np.float32)
    w = (w * chosen[..., None]).astype(np.float32)
    stats = dict(work.stats or {})
    stats["rollout/d3s_kept"] = float(chosen.sum() / max(valid_BG.sum(), 1))
    return work._replace(groups=g._replace(weights=w), stats=stats)

  return apply


def apply_chain(transforms: Sequence[Transform], groups: Groups,
                ctx: StepContext) -> Work:
  """Runs `transforms` in order over the step's first draw."""
  stats = reward_stats(groups)
  stats["reward/errors"] = groups.errors
  stats.update(groups.stats or {})
  stats["rollout/sampled_tokens"] = sampled_tokens(groups)
  work = Work(groups=groups, stats=stats)
  for t in transforms:
    work = t(work, ctx)
  return work


def to_batch(work: Work, rows: Optional[int] = None) -> RLBatch:
  """The update's `RLBatch` of the chain's output: N = B * G rows.

  With variable-size groups (`Groups.valid`) and `rows` given, N = `rows`
  when the valid slots fit in it: those slots in group order, then as many
  empty slots as it takes to fill `rows` (the step's rollout budget, so the
  update's shape does not change from step to step). An empty slot has no
  token and zero weight, so it changes no loss, gradient or count
  (`core.aggregation` counts sequences with a token); leaving the others
  out spares the update their compute (XRPO at max_factor 2: half of the
  rows). More valid slots than `rows` (dynamic sampling keeps the groups
  with the most rollouts) and every other case keep all B * G rows.
  """
  g = work.groups
  b, n_g, t = g.tokens.shape
  n = b * n_g
  mask = g.mask.reshape(n, t)
  adv = np.asarray(work.adv, np.float32)
  adv_NT = (adv.reshape(n, t) if adv.ndim == 3 else
            np.broadcast_to(adv.reshape(n, 1), (n, t)))
  weights = (mask.astype(np.float32) if g.weights is None
             else g.weights.reshape(n, t).astype(np.float32))
  prompt_NP, prompt_mask_NP = row_prompts(g)
  batch = RLBatch(
      prompt=prompt_NP, prompt_mask=prompt_mask_NP,
      completion=g.tokens.reshape(n, t), completion_mask=mask,
      old_logp=g.logp.reshape(n, t),
      advantages=(adv_NT * mask).astype(np.float32),
      weights=weights, reward=g.reward.reshape(n).astype(np.float32),
      ref_logp=(None if work.ref_logp is None else
                (work.ref_logp.reshape(n, t) * mask).astype(np.float32)))
  if rows is None or g.valid is None or rows >= n:
    return batch
  valid = valid_slots(g).reshape(n)
  full, empty = np.flatnonzero(valid), np.flatnonzero(~valid)
  if len(full) > rows:
    return batch
  take = np.concatenate([full, empty[:rows - len(full)]])
  return jax.tree.map(lambda x: np.asarray(x)[take], batch)
