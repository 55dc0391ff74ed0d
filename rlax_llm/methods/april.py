"""The "april" rollout engine: partial rollouts with over-provisioning.

Each step decodes `ceil(over_provision * B)` groups of G rows, stops as soon
as B groups have finished, trains on B finished groups and carries the rest
to the next step (see `rlax_llm.sampling.partial` and APRIL,
arXiv:2509.18521). The carried buffer is the engine's `state_dict`, saved in
every checkpoint, so a resumed run continues exactly.

Tokens of a carried row were sampled by older parameters; `Groups.version`
records the step of each token and `rollout/off_policy_tokens` the share of
this step's tokens sampled by an earlier policy. As APRIL does in slime,
configs/april_arith.py has the trainer recompute the old log-probs at train
time (`rl.recompute_old_logp=True`), so the PPO ratio starts at 1 and the
carried tokens are not clipped against their stale behaviour log-probs; the
sampler's log-probs plus an importance correction (`rl.rollout_correction`
"tis" / "mis") is the option, shared with every engine.

Config section (`config.rollout`):
  name: "april".
  over_provision: groups decoded per step / groups trained on (>= 1).
  keep_surplus: False (default, the official rollout): groups that finished
    beyond the B a step trains on are dropped, only unfinished ones are
    carried; True: they are carried too and trained first next step (no
    finished rollout wasted, but on a task whose groups finish together
    every other step then trains only on rows one update old).
  staleness_bins: bins of the `rollout/staleness_hist_k` histogram.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from rlax_llm.methods import rollouts
from rlax_llm.models.transformer import KVCache
from rlax_llm.models.transformer import decode_cache_from_kv
from rlax_llm.models.transformer import prefix_cache_from_kv
from rlax_llm.sampling import partial as partial_lib
from rlax_llm.sampling.samplers import SamplerConfig

def _pack_lanes(seg_len_N: jax.Array, lane_len: int, lanes: int):
  """`partial.pack_lanes` in JAX: first fit, longest segment first."""
  order = jnp.argsort(-seg_len_N, stable=True)

  def place(used_K, s):
    fits = used_K + s <= lane_len
    lane = jnp.where(s > 0, jnp.argmax(fits), lanes)  # lane `lanes`: none
    off = jnp.where(s > 0, used_K[jnp.minimum(lane, lanes - 1)], 0)
    used_K = used_K.at[lane].add(s, mode="drop")
    return used_K, (lane, off)

  _, (lane_o, off_o) = jax.lax.scan(
      place, jnp.zeros((lanes,), jnp.int32),
      seg_len_N[order].astype(jnp.int32))
  inverse = jnp.argsort(order)
  return lane_o[inverse], off_o[inverse]


def transformer_continuation(graphdef: nnx.GraphDef, params,
                             max_new_tokens: int, *, lanes: int | None = None
                             ) -> partial_lib.ContinuationModel:
  """A `ContinuationModel` over `rlax_llm.models.Transformer`.

  prefill keeps the prompt keys/values once per prompt (`Transformer.prefill`)
  and puts each row's partial-completion keys/values in its decode cache
  slots 0..length-1, computed by one causal pass over [prompt | partial
  completion] (positions count valid tokens, as in `generate`):
    * lanes=None: every one of the B*G rows is run, P + L columns each;
    * lanes=K: only rows with a partial completion are run, packed one after
      another into K lanes of P + L tokens (`partial.pack_lanes`; a token
      attends only within its own row's segment). With long-tailed lengths
      most carried rows are short and fresh rows need no pass at all, so this
      costs a fraction of the row-by-row pass. K must be at least
      `partial.prefill_lanes(length, prompt lengths, P + L)`.
  step is `Transformer.decode_step` with per-row cache slots: row (b, g)
  writes slot index_bg at position prompt_len_b + index_bg and attends to its
  slots <= index_bg.
  """
  model = nnx.merge(graphdef, params)
  t = max_new_tokens

  def prefill(prompt_BP, prompt_mask_BP, tokens_BGL, length_BG):
    b, p = prompt_BP.shape
    g, l = tokens_BGL.shape[1], tokens_BGL.shape[2]
    prompt_len_B = jnp.sum(prompt_mask_BP, axis=-1).astype(jnp.int32)
    if l == 0 or lanes == 0:  # fresh rows only: one prefill per prompt
      logits_BV, cache, _ = model.prefill(prompt_BP, prompt_mask_BP,
                                          num_samples=g, max_new_tokens=t)
      logits_BGV = jnp.broadcast_to(logits_BV[:, None],
                                    (b, g, logits_BV.shape[-1]))
      return logits_BGV, (cache, prompt_len_B)
    if lanes is not None:
      return packed_prefill(prompt_BP, prompt_mask_BP, tokens_BGL, length_BG,
                            prompt_len_B)
    n = b * g
    comp_mask_NL = (jnp.arange(l) < length_BG[..., None]).reshape(n, l)
    seq_NS = jnp.concatenate([jnp.repeat(prompt_BP, g, axis=0),
                              tokens_BGL.reshape(n, l)], axis=1)
    mask_NS = jnp.concatenate([jnp.repeat(prompt_mask_BP, g, axis=0),
                               comp_mask_NL], axis=1)
    h_NSD, kvs = model.hidden_states(seq_NS, None, mask_NS, return_kv=True)
    last_prompt_B = p - 1 - jnp.argmax(prompt_mask_BP[:, ::-1], axis=-1)
    length_N = length_BG.reshape(n)
    last_N = jnp.where(length_N > 0, p + length_N - 1,
                       jnp.repeat(last_prompt_B, g))
    h_last = jnp.take_along_axis(h_NSD, last_N[:, None, None], axis=1)[:, 0]
    logits_BGV = model.logits_from_hidden(h_last).reshape(b, g, -1)

    def split(x_NSKH):
      x = x_NSKH.reshape(b, g, p + l, *x_NSKH.shape[2:])
      pad = [(0, 0)] * x.ndim
      pad[2] = (0, t - l)  # decode slots l..T-1 start empty
      return x[:, 0, :p], jnp.pad(x[:, :, p:], pad)

    prefix, decode = [], []
    for k, v in kvs:
      (pk, dk), (pv, dv) = split(k), split(v)
      prefix.append(prefix_cache_from_kv(pk, pv))
      decode.append(decode_cache_from_kv(dk, dv))
    cache = KVCache(prefix_k=tuple(k for k, _ in prefix),
                    prefix_v=tuple(v for _, v in prefix),
                    prefix_mask=prompt_mask_BP,
                    k=tuple(k for k, _ in decode),
                    v=tuple(v for _, v in decode))
    return logits_BGV, (cache, prompt_len_B)

  def packed_prefill(prompt_BP, prompt_mask_BP, tokens_BGL, length_BG,
                     prompt_len_B):
    b, p = prompt_BP.shape
    g, l = tokens_BGL.shape[1], tokens_BGL.shape[2]
    lane_len = p + l
    # The prompts, once per prompt: prefix cache and fresh rows' logits.
    logits_BV, cache, _ = model.prefill(prompt_BP, prompt_mask_BP,
                                        num_samples=g, max_new_tokens=t)
    # Row (b, g)'s segment: its prompt's valid tokens, then its completion.
    seg_BG = jnp.where(length_BG > 0, prompt_len_B[:, None] + length_BG, 0)
    lane_N, off_N = _pack_lanes(seg_BG.reshape(-1), lane_len, lanes)
    lane_BG, off_BG = lane_N.reshape(b, g), off_N.reshape(b, g)
    valid_first = jnp.argsort(~prompt_mask_BP, axis=1, stable=True)
    prompt_valid_BP = jnp.take_along_axis(prompt_BP, valid_first, axis=1)
    j = jnp.arange(lane_len)
    in_prompt = j < prompt_len_B[:, None, None]  # [B, 1, S]
    tok_BGS = jnp.where(
        in_prompt,
        prompt_valid_BP[:, None, jnp.clip(j, 0, p - 1)],
        jnp.take_along_axis(
            tokens_BGL,
            jnp.clip(j - prompt_len_B[:, None, None], 0, l - 1)
            .astype(jnp.int32).repeat(g, axis=1), axis=2))
    inside = j < seg_BG[..., None]
    lane_BGS = jnp.where(inside, lane_BG[..., None], lanes)  # out: dropped
    dest_BGS = off_BG[..., None] + j
    row_BG = jnp.arange(b * g, dtype=jnp.int32).reshape(b, g)

    def scatter(fill, values):
      return jnp.full((lanes, lane_len), fill, values.dtype).at[
          lane_BGS, dest_BGS].set(values, mode="drop")

    tok_KS = scatter(0, tok_BGS)
    pos_KS = scatter(0, jnp.broadcast_to(j, tok_BGS.shape).astype(jnp.int32))
    seg_KS = scatter(-1, jnp.broadcast_to(row_BG[..., None], tok_BGS.shape))
    h_KSD, kvs = model.hidden_states(tok_KS, pos_KS, seg_KS >= 0,
                                     return_kv=True, segment_ids_BT=seg_KS)
    # Completion slot i of row (b, g) sits at offset + prompt_len_b + i.
    lane_c = jnp.minimum(lane_BG, lanes - 1)[..., None]
    at_BGL = jnp.clip(off_BG[..., None] + prompt_len_B[:, None, None]
                      + jnp.arange(l), 0, lane_len - 1)
    written = (jnp.arange(l) < length_BG[..., None])[..., None, None]

    def completion_slots(x_KSKH):
      x = jnp.where(written, x_KSKH[lane_c, at_BGL], 0)  # [B, G, L, K, H]
      pad = [(0, 0)] * x.ndim
      pad[2] = (0, t - l)
      return jnp.pad(x, pad)

    decode = [decode_cache_from_kv(completion_slots(k), completion_slots(v))
              for k, v in kvs]
    cache = cache._replace(k=tuple(k for k, _ in decode),
                           v=tuple(v for _, v in decode))
    last_BG = jnp.clip(off_BG + seg_BG - 1, 0, lane_len - 1)
    h_last = h_KSD[lane_c[..., 0], last_BG]  # [B, G, D]
    logits_BGV = jnp.where((length_BG > 0)[..., None],
                           model.logits_from_hidden(h_last),
                           logits_BV[:, None])
    return logits_BGV, (cache, prompt_len_B)

  def step(tokens_BG, index_BG, carry):
    cache, prompt_len_B = carry
    logits, cache = model.decode_step(
        tokens_BG, prompt_len_B[:, None] + index_BG, cache, index_BG)
    return logits, (cache, prompt_len_B)

  return partial_lib.ContinuationModel(prefill, step)


@functools.partial(jax.jit, static_argnums=(0,),
                   static_argnames=("eos_id", "pad_id", "sampler",
                                    "prefill_len", "prefill_lanes"))
def partial_generate_jit(graphdef, params, state: partial_lib.PartialState,
                         rng, target_groups, version, *, eos_id: int,
                         pad_id: int = 0,
                         sampler: SamplerConfig = SamplerConfig(),
                         prefill_len: int | None = None,
                         prefill_lanes: int | None = None):
  """`generate_partial` over the Transformer, under `jax.jit`.

  `target_groups` and `version` are traced; `prefill_len` and
  `prefill_lanes` are static (pick them with `partial.prefill_length` and
  `partial.prefill_lanes`, or use `partial_generate`, which does).
  """
  model = transformer_continuation(graphdef, params, state.tokens.shape[-1],
                                   lanes=prefill_lanes)
  return partial_lib.generate_partial(
      model, state, rng, target_groups=target_groups, version=version,
      eos_id=eos_id, pad_id=pad_id, sampler=sampler, prefill_len=prefill_len)


def prefill_sizes(state: partial_lib.PartialState,
                  max_new_tokens: int) -> dict[str, int]:
  """The static prefill sizes of a host-side state for `partial_generate_jit`.

  prefill_len: `partial.prefill_length` of the lengths of the rows that go
  on (`partial.resumed_length`); prefill_lanes: `partial.prefill_lanes` of
  those rows in lanes of P + prefill_len tokens.
  Both are powers of two (or 0), so a run compiles for few shapes.
  """
  length = partial_lib.resumed_length(state.length, state.done)
  prefill_len = partial_lib.prefill_length(length, max_new_tokens)
  lanes = partial_lib.prefill_lanes(
      length, np.asarray(state.prompt_mask).sum(-1),
      np.asarray(state.prompt).shape[-1] + prefill_len)
  return dict(prefill_len=prefill_len, prefill_lanes=lanes)


def partial_generate(graphdef, params, state: partial_lib.PartialState, rng,
                     target_groups, version, *, eos_id: int, pad_id: int = 0,
                     sampler: SamplerConfig = SamplerConfig()):
  """`partial_generate_jit` with the prefill sizes read off `state` (host)."""
  return partial_generate_jit(
      graphdef, params, state, rng, target_groups, version, eos_id=eos_id,
      pad_id=pad_id, sampler=sampler,
      **prefill_sizes(state, np.asarray(state.tokens).shape[-1]))


_DEFAULTS = dict(over_provision=2.0, keep_surplus=False, staleness_bins=4)


def parse_settings(section) -> dict:
  """Validated `config.rollout` fields of the april engine."""
  fields = dict(section)
  for old in ("is_correction", "is_cap"):
    if old in fields:
      raise ValueError(
          f"config.rollout.{old} is no longer an APRIL engine field: the "
          "importance correction of carried tokens is the shared "
          "rl.rollout_correction ('tis' or 'mis', with rl.rollout_correction_"
          "cap) together with rl.recompute_old_logp=True, for every engine.")
  out = rollouts.check_fields("april", fields, _DEFAULTS)
  if not out["over_provision"] >= 1.0:
    raise ValueError("config.rollout.over_provision must be >= 1 (groups "
                     "decoded per group trained on), got "
                     f"{out['over_provision']}.")
  if not isinstance(out["keep_surplus"], (bool, np.bool_)):
    raise ValueError("config.rollout.keep_surplus must be True or False, got "
                     f"{out['keep_surplus']!r}.")
  if int(out["staleness_bins"]) < 1:
    raise ValueError("config.rollout.staleness_bins must be >= 1, got "
                     f"{out['staleness_bins']}.")
  return out


class AprilRollout(rollouts.Engine):
  """APRIL partial rollouts (module docstring).

  A step's groups come from the buffer (finished ones first, then as many as
  decoding finishes), so they cannot be drawn again for the same step. DAPO's
  dynamic sampling is applied inside the engine instead, as APRIL does in
  slime: with `ctx.filter_rounds` a newly finished group whose rewards all
  agree is dropped, and the round goes on (up to that many decode rounds)
  until B finished groups have passed; slots still empty then hold fully
  masked groups. Stats: `rollout/filtered_groups`, `rollout/decode_rounds`,
  `rollout/empty_groups`.
  """

  name = "april"
  resamples = False
  filters_groups = True

  @classmethod
  def from_section(cls, ctx, section):
    return cls(ctx, parse_settings(section))

  def __init__(self, ctx, settings: dict):
    super().__init__(ctx, settings)
    self.num_groups = ctx.num_prompts
    self.num_slots = math.ceil(settings["over_provision"] * self.num_groups
                               - 1e-9)
    self.bins = int(settings["staleness_bins"])
    self.keep_surplus = bool(settings["keep_surplus"])
    self.buffer = partial_lib.PartialBuffer(ctx.tokenizer.pad_id)
    # (state, target, params, step) -> (state, steps); replaceable by a
    # synthetic model in tests.
    self.generate_fn = self._generate

  def _generate(self, state, target, params, step, round_=0):
    ctx, tok = self.ctx, self.ctx.tokenizer
    out, steps = partial_generate(
        ctx.graphdef, params, state,
        rollouts.rollout_key(ctx.key, step, round_), target, step,
        eos_id=tok.eos_id, pad_id=tok.pad_id, sampler=ctx.sampler)
    return jax.device_get((out, steps))

  def _new_groups(self, step: int, n: int,
                  round_: int = 0) -> list[partial_lib.Group]:
    ctx, tok = self.ctx, self.ctx.tokenizer
    if n == 0:
      return []
    problems, p, pm = rollouts.encode_prompts(ctx, step, n, round_)
    prefix = f"{step}/" if round_ == 0 else f"{step}.{round_}/"
    return [partial_lib.Group.fresh(
        f"{prefix}{i}", p[i], pm[i], q.answer, num_samples=ctx.num_samples,
        max_new_tokens=ctx.max_new_tokens, pad_id=tok.pad_id)
            for i, q in enumerate(problems)]

  def _score(self, groups: list[partial_lib.Group]):
    """(texts, reward_N, errors) of finished groups (each scored once)."""
    st = partial_lib.stack_groups(groups)
    b, g, t = st.tokens.shape
    mask = (np.arange(t) < st.length[..., None]).reshape(b * g, t)
    texts = self.ctx.decode(st.tokens.reshape(b * g, t), mask)
    reward, errors = self.ctx.score(texts, [x.answer for x in groups
                                            for _ in range(g)])
    return texts, np.asarray(reward, np.float32), errors

  def _accept(self, groups: list[partial_lib.Group]) -> list[bool]:
    texts, reward, errors = self._score(groups)
    g = self.ctx.num_samples
    out = []
    for i, x in enumerate(groups):
      r = reward[i * g:(i + 1) * g]
      self._scored[x.uid] = (texts[i * g:(i + 1) * g], r)
      out.append(bool(r.max() > r.min()))
    self._errors += errors
    return out

  def rollout(self, params, step: int, draw: int = 0) -> rollouts.Groups:
    if draw:
      raise ValueError("The april engine draws each step's groups once from "
                       "its buffer (draw must be 0).")
    ctx = self.ctx
    self._scored, self._errors = {}, 0
    if ctx.filter_rounds:
      used, info = self.buffer.advance(
          num_groups=self.num_groups, num_slots=self.num_slots,
          new_groups=lambda n, r: self._new_groups(step, n, r),
          generate=lambda s, target, r: self.generate_fn(s, target, params,
                                                          step, r),
          accept=self._accept, max_rounds=ctx.filter_rounds,
          keep_surplus=self.keep_surplus)
    else:
      used, info = self.buffer.advance(
          num_groups=self.num_groups, num_slots=self.num_slots,
          new_groups=functools.partial(self._new_groups, step),
          generate=lambda s, target: self.generate_fn(s, target, params,
                                                      step),
          keep_surplus=self.keep_surplus)
    missing = self.num_groups - len(used)
    if missing:  # fully masked fillers (nothing passed the filter)
      template = used[0] if used else self._filler_template()
      used = used + [partial_lib.Group.fresh(
          f"{step}/empty{i}", template.prompt, template.prompt_mask, "",
          num_samples=ctx.num_samples, max_new_tokens=ctx.max_new_tokens,
          pad_id=ctx.tokenizer.pad_id) for i in range(missing)]
    st = partial_lib.stack_groups(used)
    b, g, t = st.tokens.shape
    mask_BGT = np.arange(t) < st.length[..., None]
    problems = [_Answer(x.answer) for x in used]
    scores = None
    if ctx.filter_rounds:
      # Carried finished groups were scored when they passed the filter in
      # an earlier step; score those (and fillers) now.
      todo = [x for x in used if x.uid not in self._scored]
      if todo:
        texts, reward, _ = self._score(todo)
        for i, x in enumerate(todo):
          self._scored[x.uid] = (texts[i * g:(i + 1) * g],
                                 reward[i * g:(i + 1) * g])
      scores = ([s_ for x in used for s_ in self._scored[x.uid][0]],
                np.concatenate([self._scored[x.uid][1] for x in used]),
                self._errors)
    groups = rollouts.scored_groups(
        ctx, problems, st.prompt, st.prompt_mask, st.tokens.reshape(b * g, t),
        mask_BGT.reshape(b * g, t), st.logp.reshape(b * g, t),
        st.length.reshape(-1), st.eos.reshape(-1), scores=scores,
        version=np.asarray(st.version, np.int32))
    if missing:
      w = groups.weights.copy()
      w[b - missing:] = 0.0
      groups = groups._replace(weights=w)
      info["empty_groups"] = missing
    elif ctx.filter_rounds:
      info["empty_groups"] = 0
    stats = partial_lib.staleness_stats(
        st.version.reshape(b * g, t), mask_BGT.reshape(b * g, t), step,
        num_bins=self.bins)
    stale = mask_BGT & (np.asarray(st.version) < step)
    stats["rollout/off_policy_tokens"] = float(
        stale.sum() / max(mask_BGT.sum(), 1))
    stats.update({f"rollout/{k}": float(v) for k, v in info.items()})
    groups.stats.update(stats)
    return groups

  def _filler_template(self):
    problems, p, pm = rollouts.encode_prompts(self.ctx, 0, 1)
    del problems
    return partial_lib.Group.fresh("empty", p[0], pm[0], "",
                                   num_samples=self.ctx.num_samples,
                                   max_new_tokens=self.ctx.max_new_tokens)

  def state_dict(self):
    return self.buffer.state_dict()

  def load_state_dict(self, state) -> None:
    self.buffer.load_state_dict(state)


class _Answer(NamedTuple):
  answer: Any
