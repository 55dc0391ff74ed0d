"""Rollout engines: how the experiment layer turns prompts into an RLBatch.

An engine is built once per run, `Engine(exp, cfg)`, from the experiment
(task, tokenizer, reward, method, base key) and its own config section
(`config.rollout`, whose `name` selects the engine), and is then asked once per
RL step for `rollout(params, step) -> (RLBatch, stats)`. The batch always has
`rl.prompts_per_step * rl.num_samples` rows, so the compiled update step never
changes shape.

Engines that carry host state across steps (e.g. partial rollouts continued at
the next step) return it from `state_dict()` as JSON-able data; it is stored in
every checkpoint and handed back through `load_state_dict` on resume, so a
resumed run continues exactly.

Register a new engine with `@register("name")`; its config file sets
`config.rollout = ml_collections.ConfigDict(dict(name="name", ...))`.
"""

from __future__ import annotations

import abc
import difflib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from rlax_llm.core import selection
from rlax_llm.sampling.generate import generate_on_mesh_jit
from rlax_llm.training import steps as steps_lib

ROLLOUTS: dict[str, Callable[..., Any]] = {}


def register(name: str):
  """Class decorator adding a rollout engine to `ROLLOUTS` under `name`."""
  def deco(cls):
    ROLLOUTS[name] = cls
    return cls
  return deco


def get_rollout(name: str):
  """The engine class registered as `name` (a clear error otherwise)."""
  # Engines defined in other modules register on import.
  from rlax_llm.methods import engines  # pylint: disable=g-import-not-at-top,unused-import
  if name not in ROLLOUTS:
    close = difflib.get_close_matches(name, ROLLOUTS, n=3)
    raise ValueError(f"Unknown rollout engine {name!r} (config.rollout.name)"
                     + (f"; did you mean {close}?" if close else "")
                     + f" Known engines: {sorted(ROLLOUTS)}.")
  return ROLLOUTS[name]


def rollout_key(base_key: jax.Array, step: int, draw: int = 0) -> jax.Array:
  """The PRNG key of draw `draw` of global step `step` (deterministic)."""
  key = jax.random.fold_in(base_key, step)
  if draw:
    key = jax.random.fold_in(key, 1_000_000 + draw)
  return key


def sample_groups(exp, params, step: int, draw: int, *,
                  num_prompts: int | None = None,
                  num_samples: int | None = None) -> dict[str, Any]:
  """One round of B prompts x G samples from `generate`, scored, on the host.

  Returns a dict of arrays with leading [B, G] (or [B] for prompts): prompt,
  prompt_mask [B, P]; tokens, mask, logp [B, G, T]; lengths, finished,
  reward [B, G]; and `errors`, the number of reward-function failures.
  """
  c, tok = exp.config, exp.setup.tokenizer
  b = num_prompts or c.rl.prompts_per_step
  g = num_samples or c.rl.num_samples
  problems = exp.setup.task.train_batch(step, b, draw=draw)
  p, pm = tok.encode_batch([q.prompt for q in problems],
                           max_length=exp.prompt_len)
  ro = jax.device_get(generate_on_mesh_jit(
      exp.graphdef, params, p, pm, rollout_key(exp.key, step, draw),
      mesh=exp.mesh, num_samples=g, max_new_tokens=exp.max_new_tokens,
      eos_id=tok.eos_id, pad_id=tok.pad_id, sampler=exp.sampler,
      decode_chunk=exp.decode_chunk))
  texts = exp.decode(ro.tokens, ro.mask)
  answers = [q.answer for q in problems for _ in range(g)]
  reward_N, errors = exp.rewards(texts, answers)
  if c.rl.overlong_buffer > 0:  # DAPO's soft overlong punishment
    reward_N = reward_N + np.asarray(selection.overlong_penalty(
        ro.lengths, max_length=exp.max_new_tokens,
        cache_length=c.rl.overlong_buffer))
  t = exp.max_new_tokens
  return dict(prompt=p, prompt_mask=pm, tokens=ro.tokens.reshape(b, g, t),
              mask=ro.mask.reshape(b, g, t), logp=ro.logp.reshape(b, g, t),
              lengths=ro.lengths.reshape(b, g),
              finished=ro.finished.reshape(b, g),
              reward=reward_N.reshape(b, g), errors=errors,
              texts=np.asarray(texts, dtype=object).reshape(b, g))


def distinct_completions(texts_BG) -> float:
  """Mean number of distinct completions per group (diversity)."""
  return float(np.mean([len(set(row)) for row in np.asarray(texts_BG)]))


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


def group_batch(groups: dict[str, Any], adv_BG_or_BGT) -> steps_lib.RLBatch:
  """Flattens [B, G, ...] groups and their advantages into an RLBatch.

  `adv` is [B, G] (sequence advantages, broadcast over the completion's
  tokens) or [B, G, T] (per-token advantages, e.g. tree methods).
  """
  b, g, t = groups["tokens"].shape
  mask = groups["mask"].reshape(b * g, t)
  adv = np.asarray(adv_BG_or_BGT, np.float32)
  adv_NT = adv.reshape(b * g, t) if adv.ndim == 3 else np.broadcast_to(
      adv.reshape(b * g, 1), (b * g, t))
  return steps_lib.RLBatch(
      prompt=np.repeat(groups["prompt"], g, axis=0),
      prompt_mask=np.repeat(groups["prompt_mask"], g, axis=0),
      completion=groups["tokens"].reshape(b * g, t),
      completion_mask=mask, old_logp=groups["logp"].reshape(b * g, t),
      advantages=(adv_NT * mask).astype(np.float32))


def reward_stats(groups: dict[str, Any]) -> dict[str, Any]:
  """Reward and length statistics of one round of groups."""
  r = groups["reward"]
  out = {
      "reward/mean": r.mean(),
      "reward/std": r.std(),
      "reward/solved_groups": np.mean(r.min(axis=1) >= 0.5),
      "reward/failed_groups": np.mean(r.max(axis=1) < 0.5),
      "rollout/length": groups["lengths"].mean(),
      "rollout/truncated": 1.0 - groups["finished"].mean(),
  }
  if "texts" in groups:
    out["rollout/distinct_per_group"] = distinct_completions(groups["texts"])
  return out


class Engine(abc.ABC):
  """Base class: stateless engines need only `rollout`."""

  def __init__(self, exp, cfg):
    self.exp = exp
    self.cfg = cfg

  @abc.abstractmethod
  def rollout(self, params, step: int):
    """-> (RLBatch with prompts_per_step * num_samples rows, stats dict)."""

  def state_dict(self) -> Any:
    return None

  def load_state_dict(self, state: Any) -> None:
    del state


@register("sample")
class SampleRollout(Engine):
  """B prompts x G independent samples (GRPO family, BroRL with large G).

  With `rl.dynamic_sampling` (DAPO, arXiv:2503.14476), groups whose rewards
  all agree carry no signal and are replaced by groups of extra prompts, up to
  `rl.max_sampling_rounds` rounds; slots still empty then are filled with
  fully masked groups, which contribute nothing, so the batch shape (and the
  compiled step) never changes.
  """

  def rollout(self, params, step: int):
    exp, c = self.exp, self.exp.config
    b = c.rl.prompts_per_step
    first = sample_groups(exp, params, step, 0)
    rounds, groups = [first], first
    if c.rl.dynamic_sampling:
      pieces, count, draw = [], 0, 0
      while True:
        r = rounds[-1]
        informative = np.flatnonzero(r["reward"].max(1) > r["reward"].min(1))
        pieces.append({k: v[informative] for k, v in r.items()
                       if k != "errors"})
        count += len(informative)
        draw += 1
        if count >= b or draw >= c.rl.max_sampling_rounds:
          break
        rounds.append(sample_groups(exp, params, step, draw))
      kept = {k: np.concatenate([p_[k] for p_ in pieces])[:b]
              for k in pieces[0]}
      missing = b - len(kept["reward"])
      if missing:  # fully masked filler groups
        filler = {k: np.zeros((missing,) + v.shape[1:], v.dtype)
                  for k, v in first.items() if k not in ("errors", "texts")}
        filler["texts"] = np.full((missing,) + first["texts"].shape[1:], "",
                                  dtype=object)
        filler["prompt"] = first["prompt"][:1].repeat(missing, 0)
        filler["prompt_mask"] = first["prompt_mask"][:1].repeat(missing, 0)
        kept = {k: np.concatenate([kept[k], filler[k]]) for k in kept}
      groups = kept
    adv_BG = np.asarray(exp.method.advantage_fn(jnp.asarray(groups["reward"])))
    if c.rl.xrpo_lambda > 0:  # XRPO novelty-aware sharpening
      b_, g_, t_ = groups["tokens"].shape
      eta = selection.xrpo_novelty(groups["logp"].reshape(b_ * g_, t_),
                                   groups["mask"].reshape(b_ * g_, t_), g_)
      sharp = selection.xrpo_sharpen(
          adv_BG.reshape(-1), groups["reward"].reshape(-1) >= 0.5, eta,
          lam=c.rl.xrpo_lambda, kappa_clip=c.rl.xrpo_kappa_clip)
      sharp = np.asarray(sharp).reshape(adv_BG.shape)
      xrpo_stats = {"rollout/xrpo_sharpened": float(np.mean(sharp != adv_BG)),
                    "rollout/xrpo_bonus": float(np.mean(sharp - adv_BG))}
      adv_BG = sharp
    else:
      xrpo_stats = {}
    batch = group_batch(groups, adv_BG)
    # Reward statistics describe the step's ordinary draw (round 0).
    stats = reward_stats(first)
    stats["reward/errors"] = sum(r["errors"] for r in rounds)
    stats["rollout/adv_abs"] = np.abs(adv_BG).mean()
    stats.update(xrpo_stats)
    if c.rl.dynamic_sampling:
      stats["rollout/sampling_rounds"] = len(rounds)
      stats["rollout/empty_groups"] = b - int(
          np.sum(batch.completion_mask.reshape(b, -1).any(1)))
    return batch, stats
