"""Rollout engines: how prompts become scored groups of completions.

An engine is built once per run from a `RolloutContext` (what it uses: the
model graph, mesh, sampler, tokenizer, reward scorer, task stream, sizes) and
its own parsed settings (`Engine.from_section(ctx, config.rollout)`), and is
then asked once per RL step for `rollout(params, step, draw=0) -> Groups`:
B = `ctx.num_prompts` prompts with G = `ctx.num_samples` completions each,
rewarded by the task's verifier. Everything after that (reward shaping,
dynamic sampling, advantages, XRPO, D^3S, KL in the reward) is one chain of
group transforms shared by every engine (`rlax_llm.methods.transforms`).

What an engine can honour is declared on its class, so that an option it
cannot honour is refused at start-up rather than ignored:
  resamples: `rollout(..., draw=k)` draws fresh independent groups (other
    prompts) for the same step, which dynamic sampling needs.
  sequence_advantages: the method's sequence advantage (reward_BG -> adv_BG)
    applies; False when the engine supplies its own per-token advantages
    (`Groups.token_adv`, e.g. shared-prefix trees).
  filters_groups: the engine applies dynamic sampling itself
    (`RolloutContext.filter_rounds`), as APRIL stops a round once enough
    groups have finished and passed the filter.
  variable_groups: prompts get variable numbers of rollouts, padded to
    the group width with empty slots (`Groups.valid`); only advantages that
    take a validity mask over groups apply.

Engines that carry host state across steps (partial rollouts continued at
the next step) return it from `state_dict()` as JSON-able data; it is stored
in every checkpoint and handed back through `load_state_dict` on resume.

The engines are registered explicitly in `rlax_llm.methods.engines.ENGINES`.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import numpy as np

from rlax_llm.parallel import mesh as mesh_lib
from rlax_llm.sampling.generate import generate_on_mesh_jit
from rlax_llm.sampling.samplers import SamplerConfig


class RolloutContext(NamedTuple):
  """What a rollout engine uses (built by the experiment layer).

  Attributes:
    graphdef: NNX graph of the policy.
    mesh: the device mesh rollouts are split over: the updates' mesh, or
      with the "split" host layout a data mesh over every device
      (`parallel.layout_meshes`), where engines that decode on it take the
      parameters first (`parallel.onto_mesh`).
    sampler: the sampling settings.
    tokenizer: encode_batch/decode_batch, pad_id, eos_id, vocab_size.
    task: the train stream, `train_batch(step, n, draw=0)` -> problems with
      `.prompt` and `.answer`.
    score: (texts, answers) -> (reward_N f32, errors); never raises.
    decode: (tokens_NT, mask_NT) -> list of N texts.
    key: the run's base PRNG key.
    prompt_len: width prompts are padded to.
    max_new_tokens: the completion budget T.
    num_prompts: B, groups per step.
    num_samples: G, completions per group.
    decode_chunk: rows decoded at once per device (None: automatic).
    rl_start: the global step at which RL starts (schedules count from it).
    vocab_size: the model's vocabulary (output width; 0: the tokenizer's).
    filter_rounds: for engines that filter groups themselves
      (`Engine.filters_groups`): drop groups whose rewards all agree (DAPO's
      dynamic sampling), decoding up to this many rounds; 0 keeps all.
  """
  graphdef: Any
  mesh: Any
  sampler: SamplerConfig
  tokenizer: Any
  task: Any
  score: Callable[..., tuple[np.ndarray, int]]
  decode: Callable[..., list]
  key: jax.Array
  prompt_len: int
  max_new_tokens: int
  num_prompts: int
  num_samples: int
  decode_chunk: Optional[int] = None
  rl_start: int = 0
  vocab_size: int = 0
  filter_rounds: int = 0


class Groups(NamedTuple):
  """B groups of G scored completions, on the host.

  Attributes:
    prompt, prompt_mask: [B, P] prompts.
    tokens: [B, G, T] int32 completions; mask [B, G, T] bool generated
      tokens (EOS included); logp [B, G, T] f32 behaviour log-probs.
    lengths: [B, G] int; finished: [B, G] bool (ended with EOS).
    reward: [B, G] f32 verifier rewards (shaped by the transforms).
    texts: [B, G] object decoded completions.
    errors: reward-function failures of this draw.
    weights: [B, G, T] f32 token weights (default the mask).
    token_adv: [B, G, T] f32 per-token advantages the engine computed
      itself (trees), or None: the method's advantage applies.
    version: [B, G, T] int32 global step whose policy sampled each token
      (partial rollouts), or None: every token is from this step.
    stats: the engine's own statistics ("rollout/..." keys).
    valid: [B, G] bool slots that hold a rollout, or None: all of them.
      Engines that give prompts variable numbers of rollouts (XRPO's
      allocator) pad each group to G slots; an empty slot has an all-False
      mask, weight 0 and takes no part in its group's advantage.
    row_prompt, row_prompt_mask: [B, G, P] the prompt each rollout was
      sampled from, or None: the group's `prompt`. They differ when a
      rollout was sampled from an augmented prompt (XRPO's in-context
      seeding); the update then conditions on the prompt actually used.
  """
  prompt: np.ndarray
  prompt_mask: np.ndarray
  tokens: np.ndarray
  mask: np.ndarray
  logp: np.ndarray
  lengths: np.ndarray
  finished: np.ndarray
  reward: np.ndarray
  texts: np.ndarray
  errors: int = 0
  weights: Optional[np.ndarray] = None
  token_adv: Optional[np.ndarray] = None
  version: Optional[np.ndarray] = None
  stats: Optional[dict] = None
  valid: Optional[np.ndarray] = None
  row_prompt: Optional[np.ndarray] = None
  row_prompt_mask: Optional[np.ndarray] = None


def row_prompts(groups: Groups) -> tuple[np.ndarray, np.ndarray]:
  """(prompt_NP, prompt_mask_NP): the prompt of each of the N = B * G rows."""
  b, g = groups.tokens.shape[:2]
  if groups.row_prompt is not None:
    p = groups.row_prompt.shape[-1]
    return (groups.row_prompt.reshape(b * g, p),
            groups.row_prompt_mask.reshape(b * g, p))
  return (np.repeat(groups.prompt, g, axis=0),
          np.repeat(groups.prompt_mask, g, axis=0))


def valid_slots(groups: Groups) -> np.ndarray:
  """[B, G] bool: the slots that hold a rollout (`Groups.valid`)."""
  if groups.valid is None:
    return np.ones(groups.reward.shape, bool)
  return np.asarray(groups.valid, bool)


def rollout_key(base_key: jax.Array, step: int, draw: int = 0) -> jax.Array:
  """The PRNG key of draw `draw` of global step `step` (deterministic)."""
  key = jax.random.fold_in(base_key, step)
  if draw:
    key = jax.random.fold_in(key, 1_000_000 + draw)
  return key


def encode_prompts(ctx: RolloutContext, step: int, num: int, draw: int = 0):
  """(problems, prompt_BP, prompt_mask_BP) of draw `draw` of step `step`."""
  problems = ctx.task.train_batch(step, num, draw=draw)
  p, pm = ctx.tokenizer.encode_batch([q.prompt for q in problems],
                                     max_length=ctx.prompt_len)
  return problems, p, pm


def scored_groups(ctx: RolloutContext, problems, prompt_BP, prompt_mask_BP,
                  tokens_NT, mask_NT, logp_NT, lengths_N, finished_N, *,
                  stats: Optional[dict] = None, scores=None,
                  **fields) -> Groups:
  """Decodes and rewards N = B * G completions; returns them as Groups.

  `scores` = (texts, reward_N, errors) already computed skips the scoring.
  """
  b = len(problems)
  n, t = np.shape(tokens_NT)
  g = n // max(b, 1)
  if scores is None:
    texts = ctx.decode(tokens_NT, mask_NT)
    answers = [q.answer for q in problems for _ in range(g)]
    reward_N, errors = ctx.score(texts, answers)
  else:
    texts, reward_N, errors = scores
  mask = np.asarray(mask_NT, bool).reshape(b, g, t)
  return Groups(
      prompt=np.asarray(prompt_BP), prompt_mask=np.asarray(prompt_mask_BP),
      tokens=np.asarray(tokens_NT).reshape(b, g, t), mask=mask,
      logp=np.asarray(logp_NT, np.float32).reshape(b, g, t),
      lengths=np.asarray(lengths_N).reshape(b, g),
      finished=np.asarray(finished_N, bool).reshape(b, g),
      reward=np.asarray(reward_N, np.float32).reshape(b, g),
      texts=np.asarray(texts, dtype=object).reshape(b, g),
      errors=int(errors), weights=mask.astype(np.float32),
      stats=dict(stats or {}), **fields)


def distinct_completions(texts_BG, valid_BG=None) -> float:
  """Mean number of distinct completions per group (diversity); with
  `valid_BG`, over each group's valid slots (groups without any are
  skipped)."""
  texts_BG = np.asarray(texts_BG, dtype=object)
  if valid_BG is None:
    return float(np.mean([len(set(row)) for row in texts_BG]))
  counts = [len(set(row[v])) for row, v in zip(texts_BG,
                                               np.asarray(valid_BG, bool))
            if v.any()]
  return float(np.mean(counts)) if counts else 0.0


def _levenshtein(a: str, b: str) -> int:
  prev = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    cur = [i]
    for j, cb in enumerate(b, 1):
      cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
    prev = cur
  return prev[-1]


def pairwise_edit_distance(texts_BG) -> float:
  """Mean normalised edit distance between the completions of a group.

  Per group, the mean over pairs i < j of Levenshtein(a_i, a_j) /
  max(len(a_i), len(a_j)) (0 for two empty texts); then the mean over
  groups. 0 when every row is the same, near 1 when rows share nothing.
  Unlike `distinct_completions`, it tells one differing character from a
  different answer.
  """
  means = []
  for row in np.asarray(texts_BG, dtype=object):
    row = [str(x) for x in row]
    d = [(_levenshtein(a, b) / max(len(a), len(b)) if a or b else 0.0)
         for i, a in enumerate(row) for b in row[i + 1:]]
    means.append(float(np.mean(d)) if d else 0.0)
  return float(np.mean(means))


def sampled_tokens(groups: Groups) -> int:
  """Tokens a sampler generated for these rollouts: the engine's own count
  (`stats["rollout/sampled_tokens"]`, e.g. a tree that samples each shared
  prefix once) or else the generated tokens of the valid slots (EOS
  included). Carried partial rollouts count once, in the step that trains
  on them."""
  if groups.stats and "rollout/sampled_tokens" in groups.stats:
    return int(groups.stats["rollout/sampled_tokens"])
  return int(groups.mask[valid_slots(groups)].sum())


def _length_by_outcome(groups: Groups, v: np.ndarray) -> dict[str, float]:
  """Mean length of the correct (reward >= 0.5) and of the wrong rollouts
  among the slots `v`; a key is left out when no rollout has that outcome
  (Dr.GRPO's claim is about the length of wrong answers)."""
  out = {}
  right = groups.reward >= 0.5
  for key, sel in (("rollout/length_correct", v & right),
                   ("rollout/length_wrong", v & ~right)):
    if sel.any():
      out[key] = float(groups.lengths[sel].mean())
  return out


def reward_stats(groups: Groups) -> dict[str, Any]:
  """Reward and length statistics of one draw of groups (over the valid
  slots of variable-size groups, `Groups.valid`; `rollout/rollouts` counts
  them)."""
  r = groups.reward
  if groups.valid is None:
    return {
        "reward/mean": r.mean(),
        "reward/std": r.std(),
        "reward/solved_groups": np.mean(r.min(axis=1) >= 0.5),
        "reward/failed_groups": np.mean(r.max(axis=1) < 0.5),
        "rollout/length": groups.lengths.mean(),
        "rollout/truncated": 1.0 - groups.finished.mean(),
        "rollout/distinct_per_group": distinct_completions(groups.texts),
        "rollout/rollouts": int(r.size),
        **_length_by_outcome(groups, np.ones(r.shape, bool)),
    }
  v = valid_slots(groups)
  rv, has = r[v], v.any(axis=1)
  lo = np.where(v, r, np.inf).min(axis=1)[has]
  hi = np.where(v, r, -np.inf).max(axis=1)[has]
  mean = lambda x: float(np.mean(x)) if np.size(x) else 0.0  # noqa: E731
  return {
      "reward/mean": mean(rv),
      "reward/std": float(np.std(rv)) if rv.size else 0.0,
      "reward/solved_groups": mean(lo >= 0.5),
      "reward/failed_groups": mean(hi < 0.5),
      "rollout/length": mean(groups.lengths[v]),
      "rollout/truncated": 1.0 - mean(groups.finished[v]),
      "rollout/distinct_per_group": distinct_completions(groups.texts, v),
      "rollout/rollouts": int(v.sum()),
      **_length_by_outcome(groups, v),
  }


def check_fields(engine: str, section: Mapping[str, Any],
                 known: Mapping[str, Any]) -> dict[str, Any]:
  """`section`'s fields (minus `name`) over `known`'s defaults.

  Raises ValueError naming an unknown field and the known ones.
  """
  fields = {k: v for k, v in dict(section).items() if k != "name"}
  unknown = sorted(set(fields) - set(known))
  if unknown:
    raise ValueError(
        f"config.rollout has fields {unknown} that the {engine!r} engine "
        f"does not know; its fields are {sorted(known)}.")
  return {k: fields.get(k, v) for k, v in known.items()}


class Engine(abc.ABC):
  """Base class of rollout engines (see the module docstring)."""

  name = ""
  resamples = True
  sequence_advantages = True
  filters_groups = False
  variable_groups = False

  def __init__(self, ctx: RolloutContext, settings: Any = None):
    self.ctx = ctx
    self.settings = settings

  @classmethod
  def from_section(cls, ctx: RolloutContext, section: Mapping[str, Any]):
    """The engine with settings parsed from its `config.rollout` fields."""
    check_fields(cls.name, section, {})
    return cls(ctx)

  @abc.abstractmethod
  def rollout(self, params, step: int, draw: int = 0) -> Groups:
    """B groups of G scored completions of draw `draw` of global `step`."""

  def readvantage(self, groups: Groups) -> Groups:
    """Groups with the engine's own token advantages recomputed from their
    (shaped) rewards; engines with `sequence_advantages` return them as is."""
    return groups

  def state_dict(self) -> Any:
    return None

  def load_state_dict(self, state: Any) -> None:
    del state


class SampleRollout(Engine):
  """B prompts x G independent samples (GRPO family, BroRL with large G)."""

  name = "sample"

  def rollout(self, params, step: int, draw: int = 0) -> Groups:
    ctx, tok = self.ctx, self.ctx.tokenizer
    problems, p, pm = encode_prompts(ctx, step, ctx.num_prompts, draw)
    ro = jax.device_get(generate_on_mesh_jit(
        ctx.graphdef, mesh_lib.onto_mesh(params, ctx.mesh), p, pm,
        rollout_key(ctx.key, step, draw), mesh=ctx.mesh,
        num_samples=ctx.num_samples,
        max_new_tokens=ctx.max_new_tokens, eos_id=tok.eos_id,
        pad_id=tok.pad_id, sampler=ctx.sampler,
        decode_chunk=ctx.decode_chunk))
    return scored_groups(ctx, problems, p, pm, ro.tokens, ro.mask, ro.logp,
                         ro.lengths, ro.finished)
