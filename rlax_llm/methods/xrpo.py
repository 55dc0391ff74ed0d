"""The "xrpo" rollout engine: XRPO's phased rollout allocator and seeding.

"XRPO: Pushing the limits of GRPO with Targeted Exploration and
Exploitation" (arXiv:2510.06672). A step spends a fixed budget of
B * rl.num_samples rollouts (what the "sample" engine spends) over its B
prompts in `phases` phases:

  phase 1:   every prompt gets `base` rollouts;
  phase k>1: the phase's share of the rest goes, one rollout at a time, to
             the prompt of highest priority Delta_q(n_q) + phi_q(T, n_q)
             (`rlax_llm.core.allocation.xrpo_allocate`), from the rewards
             scored so far.

A prompt holds at most `max_factor * rl.num_samples` rollouts; groups are
padded to that many slots (`Groups.valid`; empty slots are masked, weight 0,
and outside their group's advantage).

In-context seeding (`seeding=True`): before a phase k > 1, a prompt none of
whose rollouts so far is correct (reward < 0.5) gets up to `seed_examples`
verified solutions of other prompts of the task, recorded at earlier steps,
placed before it as worked examples:

  "{prompt_1}{solution_1}{sep}{prompt_2}{solution_2}{sep}{prompt}"

and its rollouts from then on are sampled from that seeded prompt; it first
receives `seed_rollouts` of the phase's rollouts (then shares the rest by
priority). The seeded rollouts stay in the prompt's group, and the update
conditions them on the seeded prompt they were sampled from
(`Groups.row_prompt`): their behaviour and trained log-probs are those of
the rollout given the prompt actually used. Examples are chosen by
character-trigram similarity to the prompt (newest first among ties); the
solution store (newest `store_size` solutions, one per prompt) is the
engine's `state_dict`, saved in every checkpoint, so a resumed run seeds
exactly as an uninterrupted one.

Config section (`config.rollout`):
  name: "xrpo".
  max_factor: slots per prompt = max_factor * rl.num_samples (>= 1).
  base_fraction: phase-1 rollouts base = max(2, floor(base_fraction * G)).
  phases: phases per step, the first included (>= 2; the paper's 3); the
    B * (G - base) rollouts after phase 1 are split evenly over the others.
  alpha: two-sided level of the t-interval (0.05: 95%).
  explore_coef: the exploration bonus' scale lambda.
  seeding: in-context seeding of all-wrong prompts.
  seed_examples: solutions placed in a seeded prompt (the paper's 2).
  seed_rollouts: rollouts a newly seeded prompt gets first (0: base).
  seed_separator: text after each example.
  seed_prompt_len: token width of every prompt row when seeding (0: room
    for the prompt and seed_examples examples of the longest prompt and
    completion).
  store_size: most solutions kept.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import numpy as np

from rlax_llm.core import allocation
from rlax_llm.methods import rollouts
from rlax_llm.parallel import mesh as mesh_lib
from rlax_llm.sampling.generate import generate_on_mesh_jit

_DEFAULTS = dict(max_factor=2, base_fraction=0.5, phases=3, alpha=0.05,
                 explore_coef=0.1, seeding=True, seed_examples=2,
                 seed_rollouts=0, seed_separator=" ", seed_prompt_len=0,
                 store_size=256)


def parse_settings(section, num_samples: int) -> dict:
  """Validated `config.rollout` fields of the xrpo engine."""
  out = rollouts.check_fields("xrpo", section, _DEFAULTS)
  g = int(num_samples)
  if int(out["max_factor"]) < 1:
    raise ValueError("config.rollout.max_factor must be >= 1 (slots per "
                     f"prompt / rl.num_samples), got {out['max_factor']}.")
  if not 0.0 < float(out["base_fraction"]) <= 1.0:
    raise ValueError("config.rollout.base_fraction must be in (0, 1], got "
                     f"{out['base_fraction']}.")
  if g < 2:
    raise ValueError(f"rl.num_samples={g}: XRPO's t-interval needs at least "
                     "2 rollouts per prompt; set rl.num_samples >= 2.")
  if int(out["phases"]) < 2:
    raise ValueError("config.rollout.phases must be >= 2 (phase 1 gives the "
                     "base rollouts, later phases allocate the rest), got "
                     f"{out['phases']}.")
  if not 0.0 < float(out["alpha"]) < 1.0:
    raise ValueError(f"config.rollout.alpha must be in (0, 1), got "
                     f"{out['alpha']}.")
  if float(out["explore_coef"]) < 0:
    raise ValueError("config.rollout.explore_coef must be >= 0, got "
                     f"{out['explore_coef']}.")
  for name in ("seed_examples", "seed_rollouts", "seed_prompt_len",
               "store_size"):
    if int(out[name]) < 0:
      raise ValueError(f"config.rollout.{name} must be >= 0, got "
                       f"{out[name]}.")
  if out["seeding"] and (int(out["seed_examples"]) < 1
                         or int(out["store_size"]) < 1):
    raise ValueError("config.rollout.seeding=True needs seed_examples >= 1 "
                     "and store_size >= 1 (or set seeding=False).")
  out["base"] = max(2, min(g, int(float(out["base_fraction"]) * g)))
  return out


def _trigrams(text: str) -> frozenset:
  return frozenset(text[i:i + 3] for i in range(max(len(text) - 2, 1)))


def similarity(a: str, b: str) -> float:
  """Jaccard similarity of the character trigrams of `a` and `b`."""
  x, y = _trigrams(a), _trigrams(b)
  return len(x & y) / max(len(x | y), 1)


class SolutionStore:
  """Verified solutions of earlier steps, one per prompt, newest last."""

  def __init__(self, capacity: int):
    self.capacity = int(capacity)
    self.items: list[tuple[str, str]] = []  # (prompt, solution)

  def __len__(self) -> int:
    return len(self.items)

  def add(self, prompt: str, solution: str) -> None:
    """Records `solution` for `prompt` (replacing an older one)."""
    self.items = [it for it in self.items if it[0] != prompt]
    self.items.append((prompt, solution))
    del self.items[:max(len(self.items) - self.capacity, 0)]

  def retrieve(self, prompt: str, k: int) -> list[tuple[str, str]]:
    """Up to k solutions of other prompts, most similar first (newest first
    among equally similar ones)."""
    scored = [(similarity(p, prompt), i) for i, (p, _) in
              enumerate(self.items) if p != prompt]
    scored.sort(key=lambda x: (-x[0], -x[1]))
    return [self.items[i] for _, i in scored[:k]]

  def state_dict(self) -> dict:
    return {"items": [list(it) for it in self.items]}

  def load_state_dict(self, state: Optional[dict]) -> None:
    self.items = [tuple(it) for it in (state or {}).get("items", [])]


def seeded_prompt(prompt: str, examples, separator: str = " ") -> str:
  """The prompt with worked examples before it:
  "{p_1}{s_1}{sep}...{p_k}{s_k}{sep}{prompt}"."""
  return "".join(f"{p}{s}{separator}" for p, s in examples) + prompt


class _Rows(NamedTuple):
  """Sampled rows of one phase, on the host."""
  tokens: np.ndarray
  mask: np.ndarray
  logp: np.ndarray
  lengths: np.ndarray
  finished: np.ndarray


def phase_budgets(num_prompts: int, num_samples: int, base: int,
                  phases: int) -> list[int]:
  """Rollouts of each phase: B * base, then B * (G - base) split evenly
  (earlier phases take the remainder)."""
  rest = num_prompts * (num_samples - base)
  k = phases - 1
  return [num_prompts * base] + [rest // k + (i < rest % k) for i in range(k)]


class XrpoRollout(rollouts.Engine):
  """XRPO's allocator and in-context seeding (module docstring)."""

  name = "xrpo"
  resamples = True
  variable_groups = True

  @classmethod
  def from_section(cls, ctx, section):
    return cls(ctx, parse_settings(section, ctx.num_samples))

  def __init__(self, ctx, settings: dict):
    super().__init__(ctx, settings)
    s = settings
    self.slots = int(s["max_factor"]) * ctx.num_samples
    self.base = int(s["base"])
    self.budgets = phase_budgets(ctx.num_prompts, ctx.num_samples,
                                 self.base, int(s["phases"]))
    self.store = SolutionStore(int(s["store_size"]))
    self.seeding = bool(s["seeding"])
    tok = ctx.tokenizer
    if not self.seeding:
      self.prompt_len = ctx.prompt_len
    elif int(s["seed_prompt_len"]):
      self.prompt_len = int(s["seed_prompt_len"])
    else:
      sep = len(tok.encode(s["seed_separator"])) if s["seed_separator"] else 0
      k = int(s["seed_examples"])
      self.prompt_len = ctx.prompt_len + k * (ctx.prompt_len
                                              + ctx.max_new_tokens + sep)
    if self.prompt_len < ctx.prompt_len:
      raise ValueError(f"config.rollout.seed_prompt_len={self.prompt_len} "
                       f"is shorter than the task's prompts "
                       f"({ctx.prompt_len} tokens); raise it or set 0.")
    # (params, prompt_RP, mask_RP, key, num_samples) -> _Rows; replaceable
    # by a synthetic sampler in tests.
    self.sample_fn = self._sample

  def _sample(self, params, prompt, mask, key, num_samples) -> _Rows:
    ctx, tok = self.ctx, self.ctx.tokenizer
    ro = jax.device_get(generate_on_mesh_jit(
        ctx.graphdef, params, prompt, mask, key,
        mesh=ctx.mesh, num_samples=num_samples,
        max_new_tokens=ctx.max_new_tokens,
        eos_id=tok.eos_id, pad_id=tok.pad_id, sampler=ctx.sampler,
        decode_chunk=ctx.decode_chunk))
    return _Rows(np.asarray(ro.tokens), np.asarray(ro.mask, bool),
                 np.asarray(ro.logp, np.float32), np.asarray(ro.lengths),
                 np.asarray(ro.finished, bool))

  def _seed_text(self, prompt: str) -> Optional[str]:
    """The seeded prompt (fewest examples dropped to fit), or None."""
    s = self.settings
    examples = self.store.retrieve(prompt, int(s["seed_examples"]))
    while examples:
      text = seeded_prompt(prompt, examples, s["seed_separator"])
      if len(self.ctx.tokenizer.encode(text)) <= self.prompt_len:
        return text
      examples = examples[:-1]
    return None

  def rollout(self, params, step: int, draw: int = 0) -> rollouts.Groups:
    ctx, s = self.ctx, self.settings
    tok = ctx.tokenizer
    b, m, t = ctx.num_prompts, self.slots, ctx.max_new_tokens
    # Onto the rollout mesh once for all phases (the "split" host layout).
    params = mesh_lib.onto_mesh(params, ctx.mesh)
    problems = ctx.task.train_batch(step, b, draw=draw)
    texts_B = [q.prompt for q in problems]
    key = rollouts.rollout_key(ctx.key, step, draw)
    owner, parts = [], []  # owner: (prompt, phase, row) of each rollout
    rewards = [[] for _ in range(b)]
    solutions = [[] for _ in range(b)]  # (reward, completion, seeded)
    seed_text: list[Optional[str]] = [None] * b
    seeded_rollouts, errors = 0, 0
    alloc_B = np.zeros(b, np.int64)
    stats = {}
    for k, budget in enumerate(self.budgets):
      if k == 0:
        rows_q = np.repeat(np.arange(b), self.base)
      else:
        n_B = np.array([len(r) for r in rewards])
        forced = np.zeros(b, np.int64)
        if self.seeding:
          first = int(s["seed_rollouts"]) or self.base
          for q in range(b):
            if seed_text[q] is None and max(rewards[q]) < 0.5:
              seed_text[q] = self._seed_text(texts_B[q])
              if seed_text[q] is not None:
                forced[q] = max(0, min(first, m - n_B[q],
                                       budget - forced.sum()))
        std, _ = allocation.group_reward_std(
            _padded(rewards, m), np.arange(m) < n_B[:, None])
        extra = np.asarray(allocation.xrpo_allocate(
            np.asarray(std), n_B + forced, int(budget - forced.sum()),
            capacity=m, total=int(n_B.sum() + forced.sum()),
            alpha=float(s["alpha"]), coef=float(s["explore_coef"])))
        count = forced + extra
        stats[f"rollout/xrpo_phase{k + 1}_max"] = float(count.max())
        rows_q = np.repeat(np.arange(b), count)
      if not len(rows_q):
        continue
      row_text = [seed_text[q] or texts_B[q] for q in rows_q]
      if k == 0:
        p, pm = tok.encode_batch(texts_B, max_length=self.prompt_len)
        rows = self.sample_fn(params, p, pm, jax.random.fold_in(key, 0),
                              self.base)
        p, pm = np.repeat(p, self.base, 0), np.repeat(pm, self.base, 0)
      else:
        p, pm = tok.encode_batch(row_text, max_length=self.prompt_len)
        rows = self.sample_fn(params, p, pm, jax.random.fold_in(key, k), 1)
      texts = ctx.decode(rows.tokens, rows.mask)
      reward, err = ctx.score(texts, [problems[q].answer for q in rows_q])
      errors += int(err)
      parts.append((rows, np.asarray(p), np.asarray(pm), texts,
                    np.asarray(reward, np.float32)))
      for i, q in enumerate(rows_q):
        owner.append((q, len(parts) - 1, i))
        rewards[q].append(float(reward[i]))
        seeded = k > 0 and seed_text[q] is not None
        solutions[q].append((float(reward[i]), texts[i], seeded))
        seeded_rollouts += int(seeded)
      alloc_B += np.bincount(rows_q, minlength=b)
    groups = self._assemble(problems, owner, parts, errors)
    # Record each prompt's first correct rollout for later steps.
    solved_seeded = 0
    for q in range(b):
      hits = [(x, sd) for r, x, sd in solutions[q] if r >= 0.5]
      if hits:
        self.store.add(texts_B[q], hits[0][0])
      solved_seeded += int(any(sd for _, sd in hits))
    stats.update({
        "rollout/xrpo_alloc_max": float(alloc_B.max()),
        "rollout/xrpo_alloc_min": float(alloc_B.min()),
        "rollout/xrpo_alloc_std": float(alloc_B.std()),
        "rollout/xrpo_seeded_prompts": float(sum(x is not None
                                                 for x in seed_text)),
        "rollout/xrpo_seeded_rollouts": float(seeded_rollouts),
        "rollout/xrpo_seeded_solved": float(solved_seeded),
        "rollout/xrpo_store_size": float(len(self.store)),
    })
    groups.stats.update(stats)
    return groups

  def _assemble(self, problems, owner, parts, errors) -> rollouts.Groups:
    """[B, slots] groups of the step's rollouts, in the order sampled."""
    ctx, tok = self.ctx, self.ctx.tokenizer
    b, m, t, w = ctx.num_prompts, self.slots, ctx.max_new_tokens, \
        self.prompt_len
    tokens = np.full((b, m, t), tok.pad_id, np.int32)
    mask = np.zeros((b, m, t), bool)
    logp = np.zeros((b, m, t), np.float32)
    lengths = np.zeros((b, m), np.int32)
    finished = np.zeros((b, m), bool)
    reward = np.zeros((b, m), np.float32)
    texts = np.full((b, m), "", dtype=object)
    valid = np.zeros((b, m), bool)
    prompt, prompt_mask = tok.encode_batch([q.prompt for q in problems],
                                           max_length=w)
    row_prompt = np.repeat(prompt[:, None], m, 1)
    row_mask = np.repeat(prompt_mask[:, None], m, 1)
    fill = np.zeros(b, np.int64)
    for q, pi, ri in owner:
      rows, p, pm, tx, r = parts[pi]
      j = fill[q]
      fill[q] += 1
      tokens[q, j], mask[q, j], logp[q, j] = (rows.tokens[ri], rows.mask[ri],
                                              rows.logp[ri])
      lengths[q, j], finished[q, j] = rows.lengths[ri], rows.finished[ri]
      reward[q, j], texts[q, j], valid[q, j] = r[ri], tx[ri], True
      row_prompt[q, j], row_mask[q, j] = p[ri], pm[ri]
    logp = np.where(mask, logp, 0.0).astype(np.float32)
    return rollouts.Groups(
        prompt=np.asarray(prompt), prompt_mask=np.asarray(prompt_mask, bool),
        tokens=tokens, mask=mask, logp=logp, lengths=lengths,
        finished=finished, reward=reward, texts=texts, errors=errors,
        weights=mask.astype(np.float32), stats={}, valid=valid,
        row_prompt=np.asarray(row_prompt, np.int32),
        row_prompt_mask=np.asarray(row_mask, bool))

  def state_dict(self) -> Any:
    return {"store": self.store.state_dict()}

  def load_state_dict(self, state: Any) -> None:
    self.store.load_state_dict((state or {}).get("store"))


def _padded(lists, width: int) -> np.ndarray:
  out = np.zeros((len(lists), width), np.float32)
  for i, xs in enumerate(lists):
    out[i, :len(xs)] = xs
  return out

