"""APRIL partial rollouts: over-provisioned generation, unfinished rows carried.

Synchronous generation waits for the longest completion of the batch, so on a
long-tailed length distribution most of the decode time is spent on a few
rows. APRIL ("APRIL: Active Partial Rollouts in Reinforcement Learning to Tame
Long-tail Generation", arXiv:2509.18521) starts more groups than a step needs
(e.g. 2x), stops decoding as soon as the step's target number of groups has
finished, and carries every unfinished row to the next step, where it is
continued first. A carried row keeps its token ids (it is never re-tokenised),
its log-probs and the policy version of every token, so the trainer can
measure (and correct) the staleness of what it trains on:

  staleness_{n,t} = step - version_{n,t},

where version is the RL step whose parameters sampled token t of row n.

This module is model-agnostic. A model enters as a `ContinuationModel`, two
pure functions:

  prefill(prompt_BP, prompt_mask_BP, tokens_BGL, length_BG)
      -> (logits_BGV, cache)
    runs each prompt plus the first `length_BG` tokens of each row's partial
    completion (L <= T columns are passed; the cache it returns must still
    hold T completion slots) and returns the logits of the next token of
    every row;
  step(tokens_BG, index_BG, cache) -> (logits_BGV, cache)
    feeds token `tokens_BG` at completion index `index_BG` (per row) and
    returns the logits of the token after it.

`generate_partial` decodes a fixed-shape [B, G, T] state with a
`lax.while_loop` whose condition counts finished groups; `PartialBuffer`
holds the groups carried across steps (JSON-able, so a resumed run continues
exactly) and `PartialBuffer.advance` is the host-side schedule of one step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from rlax_llm.sampling.samplers import SamplerConfig, sample_token


class ContinuationModel(NamedTuple):
  """A model that can resume rows from partial completions (module docstring)."""
  prefill: Callable[..., tuple[jax.Array, Any]]
  step: Callable[..., tuple[jax.Array, Any]]


class PartialState(NamedTuple):
  """B groups x G rows, each possibly carrying a partial completion.

  Attributes:
    prompt: [B, P] int32 prompt ids (padded on either side).
    prompt_mask: [B, P] bool, valid prompt tokens.
    tokens: [B, G, T] int32 completion tokens, `pad_id` from `length` on.
    logp: [B, G, T] f32 behaviour log-probs of the tokens, 0 from `length` on.
    version: [B, G, T] int32 policy version (RL step) that sampled each
      token, -1 from `length` on.
    length: [B, G] int32 tokens written so far: the index where the row
      resumes.
    done: [B, G] bool, the row has ended (EOS emitted, or `length == T`).
    eos: [B, G] bool, the row ended with EOS (done and not truncated).
  """
  prompt: Any
  prompt_mask: Any
  tokens: Any
  logp: Any
  version: Any
  length: Any
  done: Any
  eos: Any


def finished_groups(done_BG: jax.typing.ArrayLike) -> jax.Array:
  """Number of groups all of whose G rows have ended: sum_b prod_g done_bg."""
  return jnp.sum(jnp.all(jnp.asarray(done_BG, bool), axis=-1)).astype(jnp.int32)


def generate_partial(model: ContinuationModel, state: PartialState,
                     rng: jax.Array, *, target_groups: jax.typing.ArrayLike,
                     version: jax.typing.ArrayLike, eos_id: int,
                     pad_id: int = 0, sampler: SamplerConfig = SamplerConfig(),
                     prefill_len: int | None = None
                     ) -> tuple[PartialState, jax.Array]:
  """Continues every unfinished row until enough groups have finished.

  Rows decode in lockstep, each at its own completion index: iteration j
  samples, for every row that has not ended, the token at index
  `length_bg` (the j-th token this call adds to that row), from key
  fold_in(rng, j). The loop stops after the first iteration at which

    #{b : done_bg for all g} >= target_groups,

  or when every row has ended (each row ends at EOS or at the budget T, so at
  most T iterations run). Rows that have ended are left untouched.

  Args:
    model: the `ContinuationModel` that scores the rows.
    state: the rows to continue; rows with `length == 0` start fresh.
    rng: PRNG key of this call.
    target_groups: int scalar (traced: changing it does not recompile).
    version: int scalar, the policy version written for every new token.
    eos_id: the token that ends a row (kept, with its log-prob).
    pad_id: the id of unwritten slots.
    sampler: temperature / top-k / top-p / min-p settings.
    prefill_len: static; only the first `prefill_len` completion tokens are
      given to `model.prefill` (it must be >= the `length` of every row that
      has not ended; see `prefill_length`). Default T. A short prefill is
      what makes resuming cheap: its cost grows with P + prefill_len, not
      P + T. Rows that have ended are never continued, so `model.prefill`
      sees them as fresh (length 0) and need not run their completions.

  Returns:
    (the continued `PartialState`, int32 scalar number of iterations run).
  """
  sampler = SamplerConfig(*sampler).validate()
  tokens_BGT = jnp.asarray(state.tokens, jnp.int32)
  chex.assert_rank(tokens_BGT, 3)
  b, g, t = tokens_BGT.shape
  chex.assert_shape([state.logp, state.version], (b, g, t))
  chex.assert_shape([state.length, state.done, state.eos], (b, g))
  length_BG = jnp.asarray(state.length, jnp.int32)
  done_BG = jnp.asarray(state.done, bool) | (length_BG >= t)
  eos_BG = jnp.asarray(state.eos, bool)
  logp_BGT = jnp.asarray(state.logp, jnp.float32)
  version_BGT = jnp.asarray(state.version, jnp.int32)
  target = jnp.asarray(target_groups, jnp.int32)
  version = jnp.asarray(version, jnp.int32)
  slots_T = jnp.arange(t)

  prefill_len = t if prefill_len is None else int(prefill_len)
  if not 0 <= prefill_len <= t:
    raise ValueError(f"prefill_len must be in [0, T={t}], got {prefill_len}.")
  logits_BGV, cache = model.prefill(
      jnp.asarray(state.prompt, jnp.int32),
      jnp.asarray(state.prompt_mask, bool), tokens_BGT[..., :prefill_len],
      jnp.where(done_BG, 0, jnp.minimum(length_BG, prefill_len)))

  def cond(carry):
    j, done = carry[0], carry[4]
    return (j < t) & (finished_groups(done) < target) & ~jnp.all(done)

  def body(carry):
    j, tokens, logp, ver, done, eos, length, logits, cache = carry
    s = sample_token(jax.random.fold_in(rng, j),
                     logits.reshape(b * g, -1), sampler)
    active = ~done
    index = jnp.minimum(length, t - 1)
    write = (slots_T == index[..., None]) & active[..., None]
    tok = s.token.reshape(b, g)
    tokens = jnp.where(write, tok[..., None], tokens)
    logp = jnp.where(write, s.logp.reshape(b, g)[..., None], logp)
    ver = jnp.where(write, version, ver)
    length = length + active.astype(jnp.int32)
    hit_eos = active & (tok == eos_id)
    eos = eos | hit_eos
    done = done | hit_eos | (length >= t)
    # Ended rows feed a dummy token; their cache is never read again here.
    fed = jnp.where(active, tok, pad_id)
    logits, cache = model.step(fed, index, cache)
    return j + 1, tokens, logp, ver, done, eos, length, logits, cache

  init = (jnp.int32(0), tokens_BGT, logp_BGT, version_BGT, done_BG, eos_BG,
          length_BG, logits_BGV, cache)
  (steps, tokens_BGT, logp_BGT, version_BGT, done_BG, eos_BG, length_BG, _,
   _) = jax.lax.while_loop(cond, body, init)
  return PartialState(state.prompt, state.prompt_mask, tokens_BGT, logp_BGT,
                      version_BGT, length_BG, done_BG, eos_BG), steps


def resumed_length(length_BG, done_BG) -> np.ndarray:
  """The completion tokens `generate_partial` prefills: 0 for ended rows."""
  return np.where(np.asarray(done_BG, bool), 0, np.asarray(length_BG))


def prefill_length(length_BG, max_new_tokens: int, *, minimum: int = 8) -> int:
  """A static prefill length covering every row: 0 or a power of two <= T.

  0 when no row carries tokens, else the smallest power of two (at least
  `minimum`) >= max(length), capped at T, so a run compiles for at most
  log2(T) prefill sizes. Pass `resumed_length(length, done)` to leave out
  rows that have ended.
  """
  longest = int(np.max(length_BG)) if np.size(length_BG) else 0
  if longest == 0:
    return 0
  return min(max_new_tokens, max(minimum, 1 << (longest - 1).bit_length()))


def pack_lanes(seg_len_N, lane_len: int) -> tuple[np.ndarray, np.ndarray]:
  """First-fit-decreasing packing of segments into lanes (NumPy).

  Segments are taken longest first (ties in index order); each goes into
  the first lane with room for it behind what that lane holds, opening a new
  lane when none has. Empty segments (length 0) take no lane (lane -1).
  `april.transformer_continuation` packs the same way inside jit.

  Args:
    seg_len_N: [N] int segment lengths, each <= lane_len.
    lane_len: tokens per lane.

  Returns:
    (lane_N, offset_N): each segment's lane and its first position there.
  """
  seg = np.asarray(seg_len_N, np.int64).reshape(-1)
  if np.any(seg > lane_len):
    i = int(np.argmax(seg > lane_len))
    raise ValueError(f"segment {i} has {seg[i]} tokens, more than a lane's "
                     f"{lane_len}.")
  lane_N = np.full(seg.shape, -1, np.int32)
  off_N = np.zeros(seg.shape, np.int32)
  used: list[int] = []
  for i in np.argsort(-seg, kind="stable"):
    s = int(seg[i])
    if s <= 0:
      continue
    lane = next((k for k, u in enumerate(used) if u + s <= lane_len), None)
    if lane is None:
      lane = len(used)
      used.append(0)
    lane_N[i], off_N[i] = lane, used[lane]
    used[lane] += s
  return lane_N, off_N


def prefill_lanes(length_BG, prompt_len_B, lane_len: int) -> int:
  """Lanes the packed prefill of carried rows needs: 0 or a power of two.

  Each row with a partial completion (length > 0; pass `resumed_length` to
  leave out ended rows) is one segment of its prompt's valid tokens plus its
  completion, packed by `pack_lanes`; the count is rounded up to a power of
  two so a run compiles for at most log2(B * G) + 1 lane counts.
  """
  length_BG = np.asarray(length_BG)
  prompt_len_B = np.asarray(prompt_len_B).reshape(-1, 1)
  seg = np.where(length_BG > 0, prompt_len_B + length_BG, 0)
  lanes = int(pack_lanes(seg.reshape(-1), lane_len)[0].max(initial=-1)) + 1
  return 0 if lanes == 0 else 1 << (lanes - 1).bit_length()


def with_forced_lengths(model: ContinuationModel, target_length_BG: jax.Array,
                        eos_id: int) -> ContinuationModel:
  """The model with EOS forced at row-specific lengths (length simulations).

  Row (b, g) emits EOS exactly as its `target_length_BG[b, g]`-th token (EOS
  included; values > T mean the row is truncated at the budget): the logits
  of every other token are -inf at that index, and the logit of EOS is -inf
  before it. The underlying model still runs, so the cost of decoding is
  real; only the stopping time is controlled.
  """
  def force(logits_BGV, next_index_BG):
    is_eos = jnp.arange(logits_BGV.shape[-1]) == eos_id
    stop = (next_index_BG == target_length_BG - 1)[..., None]
    return jnp.where(stop != is_eos, -jnp.inf, logits_BGV)

  def prefill(prompt_BP, prompt_mask_BP, tokens_BGT, length_BG):
    logits, cache = model.prefill(prompt_BP, prompt_mask_BP, tokens_BGT,
                                  length_BG)
    return force(logits, length_BG), cache

  def step(tokens_BG, index_BG, cache):
    logits, cache = model.step(tokens_BG, index_BG, cache)
    return force(logits, index_BG + 1), cache

  return ContinuationModel(prefill, step)


# -- host side: groups carried across steps -----------------------------------


@dataclasses.dataclass
class Group:
  """One prompt and its G rows on the host (numpy), as carried by the buffer.

  Attributes:
    uid: the prompt's identity, unique over a run (e.g. "step/index").
    prompt: [P] int32 ids; prompt_mask: [P] bool.
    answer: the reference answer the reward checks.
    tokens, logp, version: [G, T] as in `PartialState`.
    length, done, eos: [G] as in `PartialState`.
  """
  uid: str
  prompt: np.ndarray
  prompt_mask: np.ndarray
  answer: str
  tokens: np.ndarray
  logp: np.ndarray
  version: np.ndarray
  length: np.ndarray
  done: np.ndarray
  eos: np.ndarray

  @classmethod
  def fresh(cls, uid: str, prompt_P, prompt_mask_P, answer: str, *,
            num_samples: int, max_new_tokens: int, pad_id: int = 0) -> "Group":
    """A group with no token generated yet."""
    g, t = num_samples, max_new_tokens
    return cls(uid, np.asarray(prompt_P, np.int32),
               np.asarray(prompt_mask_P, bool), answer,
               np.full((g, t), pad_id, np.int32), np.zeros((g, t), np.float32),
               np.full((g, t), -1, np.int32), np.zeros(g, np.int32),
               np.zeros(g, bool), np.zeros(g, bool))

  @property
  def complete(self) -> bool:
    return bool(np.all(self.done))

  def to_json(self) -> dict[str, Any]:
    """JSON-able copy; each row keeps only its `length` written tokens."""
    rows = [int(n) for n in self.length]
    return dict(
        uid=self.uid, answer=self.answer,
        prompt=self.prompt.tolist(), prompt_mask=self.prompt_mask.tolist(),
        shape=list(self.tokens.shape),
        tokens=[self.tokens[i, :n].tolist() for i, n in enumerate(rows)],
        # float32 -> Python float -> JSON round-trips bit-exactly.
        logp=[[float(x) for x in self.logp[i, :n]] for i, n in enumerate(rows)],
        version=[self.version[i, :n].tolist() for i, n in enumerate(rows)],
        length=rows, done=self.done.tolist(), eos=self.eos.tolist())

  @classmethod
  def from_json(cls, d: dict[str, Any], pad_id: int = 0) -> "Group":
    g, t = d["shape"]
    out = cls.fresh(d["uid"], d["prompt"], d["prompt_mask"], d["answer"],
                    num_samples=g, max_new_tokens=t, pad_id=pad_id)
    for i, n in enumerate(d["length"]):
      out.tokens[i, :n] = d["tokens"][i]
      out.logp[i, :n] = np.asarray(d["logp"][i], np.float32)
      out.version[i, :n] = d["version"][i]
    out.length[:] = d["length"]
    out.done[:] = d["done"]
    out.eos[:] = d["eos"]
    return out


def stack_groups(groups: Sequence[Group]) -> PartialState:
  """Host groups -> a numpy `PartialState` with B = len(groups)."""
  st = lambda f: np.stack([getattr(x, f) for x in groups])
  return PartialState(*(st(f) for f in PartialState._fields))


def unstack_into(groups: Sequence[Group], state: PartialState) -> None:
  """Writes a (device-fetched) state back into its groups, in order."""
  for b, grp in enumerate(groups):
    for f in ("tokens", "logp", "version", "length", "done", "eos"):
      setattr(grp, f, np.array(getattr(state, f)[b]))


class PartialBuffer:
  """Groups carried to the next step: unfinished ones (and, with
  `keep_surplus`, surplus finished ones).

  `advance` schedules one step:
    1. finished groups already in the buffer are used first (oldest first);
    2. if fewer than `num_groups` are finished, `num_slots` groups are
       decoded: every unfinished carried group (continued first), then
       fresh ones from `new_groups`; decoding stops once enough have
       finished;
    3. the first `num_groups` finished groups are returned; every
       unfinished one stays in the buffer. The other finished groups stay
       too with `keep_surplus=True` (then a group is returned exactly once
       and never dropped); with `keep_surplus=False` they are dropped, as
       APRIL's slime rollout does (`info["dropped_groups"]`).
  A carried row's earlier tokens are never rewritten.
  """

  def __init__(self, pad_id: int = 0):
    self.pad_id = pad_id
    self.groups: list[Group] = []

  def __len__(self) -> int:
    return len(self.groups)

  def advance(self, *, num_groups: int, num_slots: int,
              new_groups: Callable[..., list[Group]],
              generate: Callable[..., tuple[PartialState, int]],
              accept: Optional[Callable[[list[Group]], Sequence[bool]]] = None,
              max_rounds: int = 1, keep_surplus: bool = True
              ) -> tuple[list[Group], dict[str, float]]:
    """One step's schedule (class docstring); returns (groups used, info).

    Args:
      num_groups: groups the step needs (B).
      num_slots: groups decoded at once (B_over >= B).
      new_groups: n -> n fresh `Group`s; with `accept`, (n, round) -> ...
        (round r > 0 must draw other prompts).
      generate: (state with num_slots groups, target finished groups) ->
        (continued state, decode iterations run); with `accept`,
        (state, target, round) -> ... (round r > 0 must use another key).
      accept: optional filter of newly finished groups (APRIL with DAPO's
        dynamic sampling: a group whose rewards all agree is dropped). The
        step then decodes in up to `max_rounds` rounds until `num_groups`
        finished groups passed it, and may return fewer when the rounds run
        out; dropped groups are counted in `info["filtered_groups"]`.
      max_rounds: decode rounds allowed per step with `accept`.
      keep_surplus: carry finished groups beyond `num_groups` to the next
        step (True) or drop them (False, APRIL's official rollout).
    """
    if num_slots < num_groups:
      raise ValueError(f"num_slots={num_slots} must be >= num_groups="
                       f"{num_groups}: over-provisioning cannot be below 1.")
    if max_rounds < 1:
      raise ValueError(f"max_rounds must be >= 1, got {max_rounds}.")
    ready = [x for x in self.groups if x.complete]
    waiting = [x for x in self.groups if not x.complete]
    info = dict(carried_groups=len(self.groups), carried_finished=len(ready),
                continued_groups=0, fresh_groups=0, decode_steps=0)
    if accept is not None:
      info.update(filtered_groups=0, decode_rounds=0)
    rounds = 0
    while len(ready) < num_groups and (rounds < max_rounds if accept
                                       is not None else rounds < 1):
      need = num_groups - len(ready)
      if len(waiting) > num_slots:
        raise RuntimeError(
            f"{len(waiting)} unfinished groups carried but only {num_slots} "
            "slots; the buffer was restored under a different "
            "over-provisioning. Resume with the original config.")
      n_fresh = num_slots - len(waiting)
      fresh = (new_groups(n_fresh) if accept is None
               else new_groups(n_fresh, rounds))
      slots = waiting + fresh
      out, steps = (generate(stack_groups(slots), need) if accept is None
                    else generate(stack_groups(slots), need, rounds))
      unstack_into(slots, out)
      info["continued_groups"] += len(waiting)
      info["fresh_groups"] += len(fresh)
      info["decode_steps"] += int(steps)
      done = [x for x in slots if x.complete]
      waiting = [x for x in slots if not x.complete]
      if accept is not None and done:
        ok = list(accept(done))
        info["filtered_groups"] += sum(not o for o in ok)
        done = [x for x, o in zip(done, ok) if o]
      ready += done
      rounds += 1
    if accept is not None:
      info["decode_rounds"] = rounds
    elif len(ready) < num_groups:
      raise RuntimeError(f"generation finished {len(ready)} groups, fewer "
                         f"than the {num_groups} asked for.")
    used, surplus = ready[:num_groups], ready[num_groups:]
    info["dropped_groups"] = 0 if keep_surplus else len(surplus)
    if not keep_surplus:
      surplus = []
    self.groups = surplus + waiting
    info.update(buffer_groups=len(self.groups), buffer_finished=len(surplus))
    return used, info

  def state_dict(self) -> dict[str, Any]:
    return dict(pad_id=self.pad_id,
                groups=[x.to_json() for x in self.groups])

  def load_state_dict(self, state: dict[str, Any] | None) -> None:
    if not state:
      self.groups = []
      return
    self.pad_id = state["pad_id"]
    self.groups = [Group.from_json(d, self.pad_id) for d in state["groups"]]


def staleness_stats(version_NT, mask_NT, step: int, *,
                    num_bins: int = 4) -> dict[str, float]:
  """Histogram of per-token staleness, step - version, over valid tokens.

  Returns `rollout/staleness_mean`, `rollout/staleness_max` and
  `rollout/staleness_hist_k` for k = 0 .. num_bins - 1: the fraction of valid
  tokens with staleness k; the last bin counts staleness >= num_bins - 1.
  """
  if num_bins < 1:
    raise ValueError(f"num_bins must be >= 1, got {num_bins}.")
  mask = np.asarray(mask_NT, bool)
  stale = (step - np.asarray(version_NT, np.int64))[mask]
  if stale.size and stale.min() < 0:
    raise ValueError(f"Tokens with a policy version after step {step}: the "
                     "buffer belongs to a different run.")
  out = {"rollout/staleness_mean": float(stale.mean()) if stale.size else 0.0,
         "rollout/staleness_max": float(stale.max()) if stale.size else 0.0}
  counts = np.bincount(np.minimum(stale, num_bins - 1), minlength=num_bins)
  for k in range(num_bins):
    out[f"rollout/staleness_hist_{k}"] = float(counts[k] / max(stale.size, 1))
  return out
