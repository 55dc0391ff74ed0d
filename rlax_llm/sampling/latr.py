"""Lookahead tree rollouts (LATR): branch where the policy hesitates, prune echoes.

Lookahead Tree-Based Rollouts for Enhanced Trajectory-Level Exploration in
Reinforcement Learning with Verifiable Rewards (Xing et al., arXiv:2510.24302;
official code github.com/starreeze/latr, `model/generation.py`,
`model/sample_filter.py`). docs/FIDELITY.md lists each rule with the official
file:line it follows and every deliberate deviation.

Each prompt's group of G rows is split into S = `tree_rows(G, eta)` *tree
slots* (rows 0..S-1) and G - S *plain rows* that sample token by token
throughout. The tree slots run in two phases.

1. Tree phase. Slot 0 holds the root branch. Every live, unfinished branch
   decodes greedily (its top-1 token). At step i, a branch whose untempered
   next-token probabilities p (softmax of the raw logits) have, for its
   rank-k candidate (k = 1..`max_branches_per_step`, default 1: top-2 only),

       p_k > tau_abs   and   p_1 - p_k < tau_rel,

   proposes a new branch on that candidate. Proposals take the free slots in
   the order (rank k, age of the proposing branch: oldest first) until none
   is free; the rest are dropped. A new branch copies its parent's history and
   per-sample KV cache rows (no recomputation), writes its candidate at step
   i (the *divergent* token) and then decodes greedily too; the parent writes
   its top-1 token at step i.
   Lookahead pruning: for each window length r in `windows`, at step
   birth + r - 1 the branch's r tokens from the divergent token on are
   compared with its parent's r tokens at the same positions. The check is
   skipped when either window holds EOS, and, with `keep_math_symbols`, when
   the parent's divergent token is a digit or math symbol (`exempt_V`, built
   by the caller from its tokenizer with `math_symbol_table`). Otherwise the
   branch *and all its descendants* are pruned when any enabled criterion
   holds:

       Levenshtein(a, b) / r < tau_ed,   suffix_match(a, b) > tau_suffix,
       rouge_l(a, b) > tau_rouge          (a threshold of None disables it).

   Their slots become free again.
2. Sampling phase. After step i the tree exits when (`exit_scope` "batch":
   summed over the batch's prompts, "prompt": per prompt)

       sum_b n_b >= round(S * B * (exit_fill - exit_fill_decay * i / T))

   with n_b the number of branches of prompt b (S once all of them ended),
   and every branch (the root included, born at 0) is older than the largest
   window (birth + max(windows) < i); or at step `branch_steps` at the latest.
   Then empty tree slots become copies of the root branch (KV rows included;
   `empty_slots="root"`) and every tree row continues by stochastic sampling
   with the sampler, so the copies diverge from the exit on. If every row
   ends before the exit, empty slots become copies of the finished root.
   With `empty_slots="sample"`, unclaimed tree slots instead sample like plain
   rows from the start until a branch claims them (slots emptied by pruning
   still become root copies).

Log-probs. Every token, greedy, branch or sampled, is stored with
log softmax(logits / temperature)[token], the quantity `samplers.sample_token`
returns and a trainer recomputes from the same model. `old_logp` is thus the
policy's own log-prob of the chosen token at the sampling temperature, not the
probability of the (deterministic) tree procedure choosing it, and the PPO
ratio starts at 1. Branching alone reads the untempered probabilities.

The tree share eta follows `TreeConfig.eta_schedule`, piecewise-constant
(RL step -> eta) pairs; `eta_at(tree, rl_step)` reads it. The engine builds a
`TreeConfig` from its `config.rollout` section with `tree_config_from_fields`.

The core, `latr_decode`, takes any `step_fn(tokens_BG, positions_BG, cache,
index) -> (logits_BGV, cache)` and a cache whose `k` and `v` are tuples of
[B, G, ...] arrays (`models.KVCache` or any NamedTuple with those fields), so
tests drive it with synthetic logits; `latr_generate` runs it on a model.
"""

from __future__ import annotations

import numbers
from typing import (Any, Callable, Mapping, NamedTuple, Optional, Sequence,
                    TYPE_CHECKING)

import chex
import jax
import jax.numpy as jnp
import numpy as np

from rlax_llm.sampling.generate import check_context
from rlax_llm.sampling.samplers import SamplerConfig, sample_token

if TYPE_CHECKING:  # flax loads on first call, not on import.
  import flax.nnx as nnx

StepFn = Callable[[jax.Array, jax.Array, Any, jax.Array],
                  tuple[jax.Array, Any]]

# The official exemption set (sample_filter.py:18).
MATH_SYMBOLS = "+-*/\\<>=()[]{}_^&%$0123456789"
# The official Countdown schedule of eta (scripts/grpo-kt-countdown.sh:58).
COUNTDOWN_ETA = ((0, 1.0), (10, 0.75), (20, 0.5), (80, 0.25), (200, 0.0))

_EXIT_SCOPES = ("batch", "prompt")
_EMPTY_SLOTS = ("root", "sample")


class TreeConfig(NamedTuple):
  """Hashable LATR settings (static under jit); defaults: official Countdown.

  Attributes:
    tau_abs: a candidate needs untempered probability above this.
    tau_rel: and within this of the top-1 probability.
    max_branches_per_step: candidates of rank 1..m (after the top-1) one
      branch may open at one step; 1 (top-2) is the official setting.
    windows: lookahead window lengths r, increasing, each >= 1.
    tau_ed: prune when Levenshtein / r is below this; None disables.
    tau_suffix: prune when the suffix-match score is above this; None
      disables (the official math setting uses 0.2).
    tau_rouge: prune when ROUGE-L is above this; None disables (math: 0.5).
    keep_math_symbols: skip the check when the parent's divergent token is a
      digit or math symbol (needs `exempt_V` in `latr_decode`).
    branch_steps: the tree phase ends at this step at the latest; 0 = no cap.
    exit_fill, exit_fill_decay: the capacity share that lets the tree exit at
      step i is exit_fill - exit_fill_decay * i / T; exit_fill > 1 disables
      the capacity exit.
    exit_scope: "batch" (capacity summed over the batch, official) or
      "prompt" (each prompt exits on its own).
    empty_slots: "root" (empty slots become root copies at the exit, official)
      or "sample" (unclaimed slots sample like plain rows from the start).
    eta_schedule: ((step, eta), ...) pairs, steps strictly increasing from 0,
      counted from 1 like the official trainer's global step (see `eta_at`).
  """
  tau_abs: float = 0.25
  tau_rel: float = 0.15
  max_branches_per_step: int = 1
  windows: tuple[int, ...] = (20, 30, 50)
  tau_ed: Optional[float] = 0.4
  tau_suffix: Optional[float] = None
  tau_rouge: Optional[float] = None
  keep_math_symbols: bool = True
  branch_steps: int = 512
  exit_fill: float = 0.98
  exit_fill_decay: float = 0.05
  exit_scope: str = "batch"
  empty_slots: str = "root"
  eta_schedule: tuple[tuple[int, float], ...] = COUNTDOWN_ETA

  def can_prune(self) -> bool:
    """Whether some enabled criterion can ever prune a branch."""
    return ((self.tau_ed is not None and self.tau_ed > 0.0)
            or (self.tau_suffix is not None and self.tau_suffix < 1.0)
            or (self.tau_rouge is not None and self.tau_rouge < 1.0))

  def validate(self) -> "TreeConfig":
    """Checks ranges and normalises containers; errors name the fix."""
    w = tuple(int(x) for x in self.windows)
    if not w or any(x < 1 for x in w) or list(w) != sorted(set(w)):
      raise ValueError(f"windows must be a non-empty strictly increasing "
                       f"sequence of lengths >= 1, got {self.windows}.")
    if self.max_branches_per_step < 0:
      raise ValueError("max_branches_per_step must be >= 0 (0 disables "
                       f"branching), got {self.max_branches_per_step}.")
    if not 0.0 <= self.tau_abs < 1.0 or not 0.0 <= self.tau_rel <= 1.0:
      raise ValueError(f"tau_abs must be in [0, 1) and tau_rel in [0, 1], "
                       f"got {self.tau_abs} and {self.tau_rel}.")
    for name in ("tau_ed", "tau_suffix", "tau_rouge"):
      x = getattr(self, name)
      if x is not None and not 0.0 <= x <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] or None (disabled), got "
                         f"{x}.")
    if self.branch_steps < 0:
      raise ValueError(f"branch_steps must be >= 0 (0: no cap), got "
                       f"{self.branch_steps}.")
    if self.exit_fill < 0.0 or self.exit_fill_decay < 0.0:
      raise ValueError(f"exit_fill and exit_fill_decay must be >= 0, got "
                       f"{self.exit_fill} and {self.exit_fill_decay}.")
    if self.exit_scope not in _EXIT_SCOPES:
      raise ValueError(f"exit_scope must be one of {_EXIT_SCOPES}, got "
                       f"{self.exit_scope!r}.")
    if self.empty_slots not in _EMPTY_SLOTS:
      raise ValueError(f"empty_slots must be one of {_EMPTY_SLOTS}, got "
                       f"{self.empty_slots!r}.")
    sched = _normalise_schedule(self.eta_schedule)
    return self._replace(
        windows=w, eta_schedule=sched, tau_abs=float(self.tau_abs),
        tau_rel=float(self.tau_rel),
        max_branches_per_step=int(self.max_branches_per_step),
        keep_math_symbols=bool(self.keep_math_symbols),
        branch_steps=int(self.branch_steps),
        exit_fill=float(self.exit_fill),
        exit_fill_decay=float(self.exit_fill_decay),
        **{k: None if getattr(self, k) is None else float(getattr(self, k))
           for k in ("tau_ed", "tau_suffix", "tau_rouge")})


def _normalise_schedule(sched) -> tuple[tuple[int, float], ...]:
  fix = ("give eta_schedule as ((step, eta), ...) pairs with steps strictly "
         "increasing from 0 and eta in [0, 1], e.g. "
         f"{COUNTDOWN_ETA}")
  if isinstance(sched, Mapping):
    sched = sorted(sched.items(), key=lambda kv: int(kv[0]))
  try:
    pairs = [(k, e) for k, e in sched]
  except (TypeError, ValueError):
    raise ValueError(f"eta_schedule {sched!r} is not a sequence of pairs; "
                     f"{fix}.") from None
  if not pairs:
    raise ValueError(f"eta_schedule is empty; {fix}.")
  out = []
  for k, e in pairs:
    if (not isinstance(k, numbers.Integral) or isinstance(k, bool)
        or not isinstance(e, numbers.Real) or isinstance(e, bool)):
      raise ValueError(f"eta_schedule entry {(k, e)!r} is not an (int, float) "
                       f"pair; {fix}.")
    out.append((int(k), float(e)))
  steps = [k for k, _ in out]
  if steps[0] != 0 or any(b <= a for a, b in zip(steps, steps[1:])):
    raise ValueError(f"eta_schedule steps {steps} must start at 0 and "
                     f"increase strictly; {fix}.")
  if any(not 0.0 <= e <= 1.0 for _, e in out):
    raise ValueError(f"eta_schedule values {[e for _, e in out]} must be in "
                     f"[0, 1]; {fix}.")
  return tuple(out)


_REAL = ("tau_abs", "tau_rel", "exit_fill", "exit_fill_decay")
_OPTIONAL_REAL = ("tau_ed", "tau_suffix", "tau_rouge")
_INT = ("max_branches_per_step", "branch_steps")
_STR = ("exit_scope", "empty_slots")


def tree_config_from_fields(fields: Mapping[str, Any]) -> TreeConfig:
  """The validated `TreeConfig` of a `config.rollout` section (minus `name`).

  Missing fields keep the `TreeConfig` defaults. `windows` may be one int;
  `eta_schedule` a sequence of (step, eta) pairs or a {step: eta} mapping.

  Raises:
    ValueError: naming an unknown field and the known ones, a field of the
      wrong type and the type it needs, or a value out of range and its range.
  """
  known = TreeConfig._fields
  unknown = sorted(k for k in fields if k not in known)
  if unknown:
    raise ValueError(f"Unknown LATR field(s) {unknown} in config.rollout; "
                     f"the known fields are {list(known)} (see "
                     "rlax_llm/sampling/latr.py TreeConfig).")
  kw = {}
  for k, x in fields.items():
    def bad(need, k=k, x=x):
      return ValueError(f"config.rollout.{k} must be {need}, got {x!r} "
                        f"({type(x).__name__}); set it to {need}.")
    if k in _REAL or (k in _OPTIONAL_REAL and x is not None):
      if not isinstance(x, numbers.Real) or isinstance(x, bool):
        raise bad("a number" + (" or None" if k in _OPTIONAL_REAL else ""))
    elif k in _INT:
      if not isinstance(x, numbers.Integral) or isinstance(x, bool):
        raise bad("an int")
    elif k in _STR:
      if not isinstance(x, str):
        raise bad("one of " + str(_EXIT_SCOPES if k == "exit_scope"
                                  else _EMPTY_SLOTS))
    elif k == "keep_math_symbols":
      if not isinstance(x, (bool, np.bool_)):
        raise bad("True or False")
    elif k == "windows":
      if isinstance(x, numbers.Integral) and not isinstance(x, bool):
        x = (int(x),)
      elif (isinstance(x, (str, bytes)) or not isinstance(x, Sequence)
            or not all(isinstance(w, numbers.Integral)
                       and not isinstance(w, bool) for w in x)):
        raise bad("an int or a tuple of ints")
    kw[k] = x
  return TreeConfig(**kw).validate()


def eta_at(tree: TreeConfig, rl_step: int) -> float:
  """The tree share eta at 0-based RL step `rl_step`, from `tree.eta_schedule`.

  The schedule is piecewise constant: eta is the value of the last pair whose
  step is <= rl_step + 1, since the official trainer counts its global step
  from 1 (verl/trainer/ppo/ray_trainer.py:1153, model/utils.py:148-155). With
  the Countdown schedule the first 9 RL steps use 1.0 and the 10th 0.75.
  """
  sched = _normalise_schedule(tree.eta_schedule)
  k = int(rl_step) + 1
  eta = sched[0][1]
  for step, e in sched:
    if step <= k:
      eta = e
  return eta


def eta_schedule(step: int, *, eta0: float = 0.5, eta_min: float = 0.0,
                 decay_every: int = 0, decay_rate: float = 0.5,
                 kind: str = "step") -> float:
  """A geometric or linear eta decay at RL step `step` (0-based).

  step:   eta = max(eta_min, eta0 * decay_rate ** floor(step / decay_every))
  linear: eta = eta0 + (eta_min - eta0) * min(step / decay_every, 1)
  `decay_every` = 0 keeps eta0 throughout. The official schedule is the
  piecewise-constant `TreeConfig.eta_schedule` read by `eta_at`.
  """
  if not 0.0 <= eta_min <= 1.0 or not 0.0 <= eta0 <= 1.0:
    raise ValueError(f"eta0 and eta_min must be in [0, 1], got {eta0} and "
                     f"{eta_min}.")
  if decay_every <= 0:
    return float(eta0)
  if kind == "step":
    return float(max(eta_min, eta0 * decay_rate ** (max(step, 0)
                                                    // decay_every)))
  if kind == "linear":
    frac = min(max(step, 0) / decay_every, 1.0)
    return float(eta0 + (eta_min - eta0) * frac)
  raise ValueError(f"Unknown eta schedule kind {kind!r}; use 'step' or "
                   "'linear'.")


def tree_rows(num_samples: int, eta: float) -> int:
  """S = round(G * eta), halves to even as Python's `round` (official
  generation.py:86), clipped to [0, G]."""
  return int(min(max(round(num_samples * eta), 0), num_samples))


def math_symbol_table(token_texts: Sequence[str], *,
                      match: str = "substring") -> np.ndarray:
  """exempt_V for `keep_math_symbols`: which token ids are math symbols.

  `token_texts[i]` is the text of token id i alone (e.g.
  `[tok.decode([i], stop_at_eos=False) for i in range(vocab_size)]`, padded
  with "" up to the model's vocabulary size; special tokens that decode to ""
  count as exempt under "substring", as in the official code).

  Args:
    token_texts: one string per token id, V in all.
    match: "substring" (official, sample_filter.py:301): the stripped text is
      a substring of `MATH_SYMBOLS`, so "", " ", "12" and "()" are exempt but
      "13" is not; "chars": the stripped text is non-empty and each of its
      characters is in `MATH_SYMBOLS`.

  Returns:
    [V] bool NumPy array.
  """
  if match == "substring":
    return np.array([t.strip() in MATH_SYMBOLS for t in token_texts], bool)
  if match == "chars":
    return np.array([bool(t.strip()) and all(c in MATH_SYMBOLS
                                             for c in t.strip())
                     for t in token_texts], bool)
  raise ValueError(f"match must be 'substring' or 'chars', got {match!r}.")


class TreeRollout(NamedTuple):
  """LATR completions, flattened to N = B * G (rows of a prompt adjacent).

  Attributes:
    tokens, logp, mask, lengths, finished, steps: as in `generate.Rollout`.
    parent: [N] int32 slot (within the group) a branch was opened from; -1
      for the root branch, copies and plain rows.
    branch_step: [N] int32 step at which a branch was opened, -1 otherwise.
    copied: [N] bool, a slot filled with a copy of the root branch.
    opened: [B] int32 branches opened per prompt (pruned ones included).
    pruned: [B] int32 branches pruned per prompt (descendants included).
    checked: [B] int32 window comparisons made per prompt.
    exempted: [B] int32 due checks skipped (EOS in a window or an exempt
      divergent token).
    switch_step: [B] int32 first step of the sampling phase (steps run if the
      tree never exited).
  """
  tokens: jax.Array
  logp: jax.Array
  mask: jax.Array
  lengths: jax.Array
  finished: jax.Array
  steps: jax.Array
  parent: jax.Array
  branch_step: jax.Array
  copied: jax.Array
  opened: jax.Array
  pruned: jax.Array
  checked: jax.Array
  exempted: jax.Array
  switch_step: jax.Array


# -- window comparisons ---------------------------------------------------------
def _lengths(len_a_N, len_b_N, w):
  la = jnp.clip(jnp.asarray(len_a_N, jnp.int32), 0, w)
  lb = jnp.clip(jnp.asarray(len_b_N, jnp.int32), 0, w)
  return la, lb


def edit_distance(a_NW: jax.typing.ArrayLike, b_NW: jax.typing.ArrayLike,
                  len_a_N: jax.typing.ArrayLike,
                  len_b_N: jax.typing.ArrayLike) -> jax.Array:
  """Levenshtein distance between a[n, :len_a[n]] and b[n, :len_b[n]].

  D[i, j] = min(D[i-1, j] + 1, D[i, j-1] + 1, D[i-1, j-1] + [a_i != b_j]);
  each row is computed at once with D[i, j] = j + min_{k <= j}(E[k] - k),
  E[k] = min(D[i-1, k] + 1, D[i-1, k-1] + [a_i != b_k]), E[0] = i.

  Args:
    a_NW, b_NW: int tokens; entries past the lengths are ignored.
    len_a_N, len_b_N: int lengths in [0, W].

  Returns:
    [N] int32 distances.
  """
  a_NW, b_NW = jnp.asarray(a_NW), jnp.asarray(b_NW)
  chex.assert_rank([a_NW, b_NW], 2)
  chex.assert_equal_shape([a_NW, b_NW])
  n, w = a_NW.shape
  cols = jnp.arange(w + 1, dtype=jnp.int32)
  row0 = jnp.broadcast_to(cols, (n, w + 1))

  def body(prev, i):
    cost = (a_NW[:, i, None] != b_NW).astype(jnp.int32)  # [N, W]
    e = jnp.concatenate([jnp.full((n, 1), i + 1, jnp.int32),
                         jnp.minimum(prev[:, 1:] + 1, prev[:, :-1] + cost)],
                        axis=1)
    row = cols + jax.lax.cummin(e - cols, axis=1)
    return row, row

  _, rows = jax.lax.scan(body, row0, jnp.arange(w))
  table = jnp.concatenate([row0[None], rows], axis=0)  # [W+1, N, W+1]
  la, lb = _lengths(len_a_N, len_b_N, w)
  return table[la, jnp.arange(n), lb]


def normalized_edit_distance(a_NW, b_NW, len_a_N, len_b_N) -> jax.Array:
  """Levenshtein distance / max(len_a, len_b, 1), in [0, 1]; [N] f32."""
  d = edit_distance(a_NW, b_NW, len_a_N, len_b_N).astype(jnp.float32)
  den = jnp.maximum(jnp.maximum(jnp.asarray(len_a_N), jnp.asarray(len_b_N)), 1)
  return d / den.astype(jnp.float32)


def _dp_tables(a_NW, b_NW, len_a_N, len_b_N):
  """Longest-common-suffix M and LCS C tables, [W+1, N, W+1] int32 each.

  M[i, n, j]: length of the longest common suffix of a[:i] and b[:j];
  C[i, n, j]: LCS length of a[:i] and b[:j]. Entries past the lengths count
  as mismatches. C's row is cummax_j(max(C[i-1, j], C[i-1, j-1] + [a_i = b_j])).
  """
  a_NW, b_NW = jnp.asarray(a_NW), jnp.asarray(b_NW)
  chex.assert_rank([a_NW, b_NW], 2)
  chex.assert_equal_shape([a_NW, b_NW])
  n, w = a_NW.shape
  la, lb = _lengths(len_a_N, len_b_N, w)
  in_b = jnp.arange(w)[None] < lb[:, None]  # [N, W]
  zero = jnp.zeros((n, w + 1), jnp.int32)

  def body(carry, i):
    m_prev, c_prev = carry
    eq = ((a_NW[:, i, None] == b_NW) & in_b
          & (i < la)[:, None]).astype(jnp.int32)  # [N, W]
    m = jnp.concatenate([zero[:, :1], (m_prev[:, :-1] + 1) * eq], axis=1)
    e = jnp.maximum(c_prev[:, 1:], c_prev[:, :-1] + eq)
    c = jnp.concatenate([zero[:, :1], jax.lax.cummax(e, axis=1)], axis=1)
    return (m, c), (m, c)

  _, (ms, cs) = jax.lax.scan(body, (zero, zero), jnp.arange(w))
  return (jnp.concatenate([zero[None], ms], 0),
          jnp.concatenate([zero[None], cs], 0), la, lb)


def suffix_match(a_NW: jax.typing.ArrayLike, b_NW: jax.typing.ArrayLike,
                 len_a_N: jax.typing.ArrayLike,
                 len_b_N: jax.typing.ArrayLike) -> jax.Array:
  """Suffix-match score: max(L_ab, L_ba) / len_a, [N] f32 (0 if len_a = 0).

  L_ab is the length of the longest suffix of a that occurs contiguously in
  b, L_ba the same with a and b swapped (official model/metrics.py:41-51,
  which compares equal-length windows).
  """
  m, _, la, lb = _dp_tables(a_NW, b_NW, len_a_N, len_b_N)
  n = m.shape[1]
  rows = jnp.arange(n)
  l_ab = jnp.max(m[la, rows], axis=-1)  # suffix of a[:la] ending anywhere in b
  l_ba = jnp.max(m[:, rows, lb], axis=0)  # suffix of b[:lb] ending anywhere in a
  best = jnp.maximum(l_ab, l_ba).astype(jnp.float32)
  return jnp.where(la > 0, best / jnp.maximum(la, 1).astype(jnp.float32), 0.0)


def lcs_length(a_NW, b_NW, len_a_N, len_b_N) -> jax.Array:
  """Longest-common-subsequence length of the two prefixes; [N] int32."""
  _, c, la, lb = _dp_tables(a_NW, b_NW, len_a_N, len_b_N)
  return c[la, jnp.arange(c.shape[1]), lb]


def rouge_l(a_NW: jax.typing.ArrayLike, b_NW: jax.typing.ArrayLike,
            len_a_N: jax.typing.ArrayLike,
            len_b_N: jax.typing.ArrayLike) -> jax.Array:
  """ROUGE-L F1: 2 P R / (P + R), P = LCS / len_a, R = LCS / len_b; [N] f32.

  0 when the LCS is empty (official model/metrics.py:78-88).
  """
  _, c, la, lb = _dp_tables(a_NW, b_NW, len_a_N, len_b_N)
  lcs = c[la, jnp.arange(c.shape[1]), lb].astype(jnp.float32)
  p = lcs / jnp.maximum(la, 1).astype(jnp.float32)
  r = lcs / jnp.maximum(lb, 1).astype(jnp.float32)
  return jnp.where(lcs > 0, 2 * p * r / jnp.maximum(p + r, 1e-30), 0.0)


def prune_decision(a_NW, b_NW, len_N, tree: TreeConfig) -> jax.Array:
  """Whether windows a, b (both of length len_N) meet a pruning criterion.

  Any enabled criterion suffices (official sample_filter.py:325-344 adds the
  branch to the removal set for each criterion that holds).
  """
  n = jnp.asarray(a_NW).shape[0]
  out = jnp.zeros((n,), bool)
  r = jnp.maximum(jnp.asarray(len_N), 1).astype(jnp.float32)
  if tree.tau_ed is not None:
    d = edit_distance(a_NW, b_NW, len_N, len_N).astype(jnp.float32)
    out = out | (d / r < tree.tau_ed)
  if tree.tau_suffix is not None:
    out = out | (suffix_match(a_NW, b_NW, len_N, len_N) > tree.tau_suffix)
  if tree.tau_rouge is not None:
    out = out | (rouge_l(a_NW, b_NW, len_N, len_N) > tree.tau_rouge)
  return out


def gather_kv_rows(cache, src_BG: jax.Array):
  """Row g of prompt b takes the KV rows of row src[b, g] (k and v only)."""
  take = jax.vmap(lambda x, s: x[s])
  return cache._replace(k=tuple(take(x, src_BG) for x in cache.k),
                        v=tuple(take(x, src_BG) for x in cache.v))


def _take_rows(x, src_BG):
  return jnp.take_along_axis(
      x, src_BG.reshape(src_BG.shape + (1,) * (x.ndim - 2)), axis=1)


def _exempt_table(tree: TreeConfig, exempt_V, v: int, s: int):
  """The [V] bool exemption table the tree needs, or None."""
  if not tree.keep_math_symbols or not tree.can_prune() or s < 2:
    return None  # nothing to exempt: no criterion or no branch can exist
  if exempt_V is None:
    raise ValueError(
        "TreeConfig.keep_math_symbols=True needs exempt_V, the [V] bool "
        "table of token ids that are digits or math symbols: pass "
        "exempt_V=latr.math_symbol_table(token_texts) built from the "
        "tokenizer, or set keep_math_symbols=False.")
  exempt_V = jnp.asarray(exempt_V, bool)
  if exempt_V.shape != (v,):
    raise ValueError(f"exempt_V has shape {exempt_V.shape} but the logits "
                     f"have V={v} tokens; build it with one entry per model "
                     "token id (pad the tokenizer's texts with '').")
  return exempt_V


def latr_decode(step_fn: StepFn, logits_BGV: jax.typing.ArrayLike, cache,
                prompt_len_B: jax.typing.ArrayLike, rng: jax.Array, *,
                num_tree: int, max_new_tokens: int, eos_id: int,
                pad_id: int = 0, sampler: SamplerConfig = SamplerConfig(),
                tree: TreeConfig = TreeConfig(),
                exempt_V: Optional[jax.typing.ArrayLike] = None,
                gather_fn: Callable[[Any, jax.Array], Any] = gather_kv_rows
                ) -> tuple[TreeRollout, Any]:
  """Decodes G rows per prompt: S = `num_tree` LATR slots, G - S samples.

  Args:
    step_fn: feeds one token per row, returns next-token logits [B, G, V].
    logits_BGV: f32 next-token logits of every row before the first token.
    cache: decode state with k/v tuples of [B, G, ...] arrays.
    prompt_len_B: int, the position of each prompt's first new token.
    rng: PRNG key; sampling at step i uses fold_in(rng, i) for all B * G rows.
    num_tree: S, tree slots per prompt (rows 0..S-1); 0 <= S <= G.
    max_new_tokens: T.
    eos_id: the token that ends a row.
    pad_id: written after a row ends and in unused slots.
    sampler: the sampling phase's and plain rows' sampler; its temperature
      also scores every token.
    tree: LATR settings.
    exempt_V: [V] bool, token ids whose divergence is never pruned
      (`math_symbol_table`); needed when `tree.keep_math_symbols`, some
      criterion can prune and S >= 2.
    gather_fn: copies cache rows, `gather_fn(cache, src_BG)`.

  Returns:
    (TreeRollout with N = B * G rows, the final cache).
  """
  logits_BGV = jnp.asarray(logits_BGV, jnp.float32)
  chex.assert_rank(logits_BGV, 3)
  sampler = SamplerConfig(*sampler).validate()
  tree = TreeConfig(*tree).validate()
  b, g, v = logits_BGV.shape
  t, s = max_new_tokens, num_tree
  if not 0 <= s <= g:
    raise ValueError(f"num_tree={s} must be in [0, num_samples={g}].")
  exempt = _exempt_table(tree, exempt_V, v, s)
  m = min(tree.max_branches_per_step, v - 1)
  nw = len(tree.windows)
  wmax = tree.windows[-1]
  windows = jnp.asarray(tree.windows, jnp.int32)
  cap = t if tree.branch_steps == 0 else min(tree.branch_steps, t)
  sample_empty = tree.empty_slots == "sample"
  prompt_len_B = jnp.asarray(prompt_len_B, jnp.int32)
  slots = jnp.arange(g)
  is_tree = slots < s  # [G]
  bidx = jnp.arange(b)[:, None]
  inv_temp = 1.0 / sampler.temperature if sampler.temperature > 0 else 1.0

  def cond(c):
    return (c["i"] < t) & ~jnp.all(c["done"] | ~(c["live"] | c["reserve"]))

  def body(c):
    i = c["i"]
    live, done, parent = c["live"], c["done"], c["parent"]
    birth, level, seq = c["birth"], c["level"], c["seq"]
    reserve, stoch = c["reserve"], c["stoch"]
    # -- after the exit: empty slots copy the root, reserve rows go plain.
    fill = stoch[:, None] & is_tree & ~live & ~reserve
    src = jnp.where(fill, 0, slots[None])
    copied = c["copied"] | fill
    live = live | fill | (reserve & stoch[:, None])
    reserve = reserve & ~stoch[:, None]
    level = jnp.where(fill, nw, level)

    # -- branching: rank-k candidates (k = 1..m) of every greedy branch.
    if m > 0 and s > 1:
      top_p, top_i = jax.lax.top_k(jax.nn.softmax(c["logits"], axis=-1), 1 + m)
      can = is_tree & live & ~done & ~stoch[:, None]
      ok = ((top_p[..., 1:] > tree.tau_abs)
            & (top_p[..., :1] - top_p[..., 1:] < tree.tau_rel)
            & can[..., None])  # [B, G, M]
      # Flat index k * G + slot; order by (rank k, age of the proposer).
      flat_ok = jnp.swapaxes(ok, 1, 2).reshape(b, m * g)
      flat_tok = jnp.swapaxes(top_i[..., 1:], 1, 2).reshape(b, m * g)
      flat_slot = jnp.tile(slots, m)
      flat_k = jnp.repeat(jnp.arange(m), g)
      order = jnp.lexsort((seq[:, flat_slot],
                           jnp.where(flat_ok, flat_k[None], m)), axis=-1)
      rank = jnp.argsort(order, axis=-1)
      free = is_tree & ~live
      accept = flat_ok & (rank < jnp.sum(free, axis=1, keepdims=True))
      # Free slots in order: emptied or unused ones first, then reserve rows.
      free_list = jnp.argsort(jnp.where(free, reserve.astype(jnp.int32), 2),
                              axis=1, stable=True)
      child = jnp.where(accept, jnp.take_along_axis(
          free_list, jnp.clip(rank, 0, g - 1), axis=1), g)  # g: dropped
      src = src.at[bidx, child].set(flat_slot[None], mode="drop")
      new = jnp.zeros((b, g), bool).at[bidx, child].set(True, mode="drop")
      new_tok = jnp.zeros((b, g), jnp.int32).at[bidx, child].set(
          flat_tok, mode="drop")
      parent = parent.at[bidx, child].set(flat_slot[None], mode="drop")
      # New branches are numbered in (proposer age, rank k) order, the
      # official order of appending rows (generation.py:256-294).
      age_order = jnp.lexsort((jnp.broadcast_to(flat_k, rank.shape),
                               jnp.where(accept, seq[:, flat_slot], 1 << 30)),
                              axis=-1)
      seq = seq.at[bidx, child].set(
          c["next_seq"][:, None] + jnp.argsort(age_order, axis=-1),
          mode="drop")
      n_new = jnp.sum(new, axis=1)
      next_seq = c["next_seq"] + n_new
      birth = jnp.where(new, i, birth)
      level = jnp.where(new, 0, level)
      live = live | new
      reserve = reserve & ~new
      opened = c["opened"] + n_new
    else:
      new = jnp.zeros((b, g), bool)
      new_tok = jnp.zeros((b, g), jnp.int32)
      next_seq, opened = c["next_seq"], c["opened"]

    # -- copy histories and KV rows of new branches and root copies.
    tokens = _take_rows(c["tokens"], src)
    logp = _take_rows(c["logp"], src)
    mask = _take_rows(c["mask"], src)
    done = _take_rows(done, src)
    logits = _take_rows(c["logits"], src)
    cache = gather_fn(c["cache"], src)

    # -- this step's token.
    sampled = sample_token(jax.random.fold_in(rng, i), logits.reshape(b * g, v),
                           sampler).token.reshape(b, g)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    greedy_row = is_tree[None] & ~stoch[:, None] & ~reserve
    tok = jnp.where(new, new_tok, jnp.where(greedy_row, greedy, sampled))
    active = (live | reserve) & ~done
    tok = jnp.where(active, tok, pad_id)
    logp_BGV = jax.nn.log_softmax(logits * inv_temp, axis=-1)
    lp = jnp.where(active, jnp.take_along_axis(logp_BGV, tok[..., None],
                                               axis=-1)[..., 0], 0.0)
    tokens = tokens.at[:, :, i].set(tok)
    logp = logp.at[:, :, i].set(lp)
    mask = mask.at[:, :, i].set(active)
    done = done | (active & (tok == eos_id))

    # -- lookahead: a branch born at `birth` is checked at birth + r - 1.
    par = jnp.maximum(parent, 0)
    r = windows[jnp.clip(level, 0, nw - 1)]
    due = (is_tree & live & (parent >= 0) & (level < nw) & ~stoch[:, None]
           & (i == birth + r - 1))
    skip = done | _take_rows(done, par)  # EOS in either window
    if exempt is not None:
      div = jnp.take_along_axis(_take_rows(tokens, par),
                                jnp.clip(birth, 0, t - 1)[..., None],
                                axis=2)[..., 0]
      skip = skip | exempt[div]
    check = due & ~skip
    if tree.can_prune():
      def compare(_):
        pos = jnp.clip(birth[..., None] + jnp.arange(wmax), 0, t - 1)
        own = jnp.take_along_axis(tokens, pos, axis=2).reshape(b * g, wmax)
        theirs = jnp.take_along_axis(_take_rows(tokens, par), pos,
                                     axis=2).reshape(b * g, wmax)
        return prune_decision(own, theirs, r.reshape(b * g),
                              tree).reshape(b, g)
      prune = check & jax.lax.cond(jnp.any(check), compare,
                                   lambda _: jnp.zeros((b, g), bool), None)
    else:
      prune = jnp.zeros((b, g), bool)
    level = jnp.where(due, level + 1, level)
    for _ in range(max(s - 1, 0)):  # descendants of pruned branches
      prune = prune | (live & (parent >= 0) & _take_rows(prune, par))
    keep = ~prune
    live = live & keep
    done = done & keep
    tokens = jnp.where(keep[..., None], tokens, pad_id)
    logp = jnp.where(keep[..., None], logp, 0.0)
    mask = mask & keep[..., None]
    parent = jnp.where(keep, parent, -1)
    birth = jnp.where(keep, birth, -1)
    level = jnp.where(keep, level, nw)
    seq = jnp.where(keep, seq, 0)

    # -- exit to sampling after this step.
    branch = is_tree & live & ~reserve
    n_branch = jnp.sum(branch, axis=1)
    all_ended = jnp.all(~branch | done, axis=1)
    eff = jnp.where(all_ended, s, n_branch)
    thres = tree.exit_fill - tree.exit_fill_decay * i / t
    settled = jnp.all(~branch | (birth + wmax < i), axis=1)
    if tree.exit_scope == "batch":
      full = jnp.sum(eff) >= jnp.round(s * b * thres)
      ready = jnp.broadcast_to(full & jnp.all(settled), (b,))
    else:
      ready = (eff >= jnp.round(s * thres)) & settled
    leave = ~stoch & (ready | (i + 1 >= cap))
    stoch = stoch | leave
    switch_step = jnp.where(leave, i + 1, c["switch_step"])

    logits, cache = step_fn(tok, prompt_len_B[:, None] + i, cache, i)
    return dict(i=i + 1, tokens=tokens, logp=logp, mask=mask, done=done,
                live=live, reserve=reserve, parent=parent, birth=birth,
                level=level, seq=seq, next_seq=next_seq, stoch=stoch,
                copied=copied, opened=opened,
                pruned=c["pruned"] + jnp.sum(prune, axis=1),
                checked=c["checked"] + jnp.sum(check, axis=1),
                exempted=c["exempted"] + jnp.sum(due & skip, axis=1),
                switch_step=switch_step,
                logits=logits.astype(jnp.float32), cache=cache)

  root = slots == 0
  init = dict(
      i=jnp.int32(0), tokens=jnp.full((b, g, t), pad_id, jnp.int32),
      logp=jnp.zeros((b, g, t), jnp.float32), mask=jnp.zeros((b, g, t), bool),
      done=jnp.zeros((b, g), bool),
      live=jnp.broadcast_to(~is_tree | root, (b, g)),
      reserve=jnp.broadcast_to(is_tree & ~root & sample_empty, (b, g)),
      parent=jnp.full((b, g), -1, jnp.int32),
      birth=jnp.broadcast_to(jnp.where(root, 0, -1), (b, g)).astype(jnp.int32),
      level=jnp.full((b, g), nw, jnp.int32),
      seq=jnp.zeros((b, g), jnp.int32), next_seq=jnp.ones((b,), jnp.int32),
      stoch=jnp.full((b,), s == 0), copied=jnp.zeros((b, g), bool),
      opened=jnp.zeros((b,), jnp.int32), pruned=jnp.zeros((b,), jnp.int32),
      checked=jnp.zeros((b,), jnp.int32), exempted=jnp.zeros((b,), jnp.int32),
      switch_step=jnp.full((b,), 0 if s == 0 else -1, jnp.int32),
      logits=logits_BGV, cache=cache)
  c = jax.lax.while_loop(cond, body, init)
  # Slots still empty when every row has ended copy the root's history
  # (official generation.py:619-621); reserve rows keep their samples.
  free = is_tree & ~c["live"] & ~c["reserve"]
  src = jnp.where(free, 0, slots[None])
  tokens, logp, mask, done = (_take_rows(c[k], src)
                              for k in ("tokens", "logp", "mask", "done"))
  copied = c["copied"] | free
  parent = jnp.where(copied, -1, c["parent"])
  switch_step = jnp.where(c["switch_step"] < 0, c["i"], c["switch_step"])
  n = b * g
  ro = TreeRollout(
      tokens=tokens.reshape(n, t), logp=logp.reshape(n, t),
      mask=mask.reshape(n, t),
      lengths=jnp.sum(mask, axis=-1).reshape(n).astype(jnp.int32),
      finished=done.reshape(n), steps=c["i"], parent=parent.reshape(n),
      branch_step=jnp.where(parent >= 0, c["birth"], -1).reshape(n),
      copied=copied.reshape(n), opened=c["opened"], pruned=c["pruned"],
      checked=c["checked"], exempted=c["exempted"], switch_step=switch_step)
  return ro, c["cache"]


def latr_generate(graphdef: nnx.GraphDef, params, prompt_BP, prompt_mask_BP,
                  rng: jax.Array, *, num_samples: int, num_tree: int,
                  max_new_tokens: int, eos_id: int, pad_id: int = 0,
                  sampler: SamplerConfig = SamplerConfig(),
                  tree: TreeConfig = TreeConfig(),
                  exempt_V: Optional[jax.typing.ArrayLike] = None
                  ) -> TreeRollout:
  """LATR rollouts of a model: one prefill per prompt, then `latr_decode`.

  Args:
    graphdef, params: the model (`nnx.split`), with `prefill`/`decode_step`.
    prompt_BP, prompt_mask_BP: prompts, padded left or right.
    rng: PRNG key.
    num_samples: G rows per prompt; the first `num_tree` are tree slots.
    num_tree, max_new_tokens, eos_id, pad_id, sampler, tree, exempt_V: see
      `latr_decode` (`exempt_V` has one entry per model token id).

  Returns:
    TreeRollout with N = B * G rows, row g of prompt b at b * G + g.
  """
  prompt_BP = jnp.asarray(prompt_BP, jnp.int32)
  prompt_mask_BP = jnp.asarray(prompt_mask_BP, bool)
  chex.assert_rank([prompt_BP, prompt_mask_BP], 2)
  chex.assert_equal_shape([prompt_BP, prompt_mask_BP])
  from flax import nnx  # pylint: disable=g-import-not-at-top
  model = nnx.merge(graphdef, params)
  check_context(prompt_BP.shape[1], max_new_tokens, model.cfg.max_seq_len)
  b, g = prompt_BP.shape[0], num_samples
  last_BV, cache, prompt_len_B = model.prefill(
      prompt_BP, prompt_mask_BP, num_samples=g, max_new_tokens=max_new_tokens)
  logits_BGV = jnp.broadcast_to(last_BV[:, None], (b, g, last_BV.shape[-1]))
  ro, _ = latr_decode(model.decode_step, logits_BGV, cache, prompt_len_B, rng,
                      num_tree=num_tree, max_new_tokens=max_new_tokens,
                      eos_id=eos_id, pad_id=pad_id, sampler=sampler, tree=tree,
                      exempt_V=exempt_V)
  return ro


latr_generate_jit = jax.jit(
    latr_generate, static_argnums=(0,),
    static_argnames=("num_samples", "num_tree", "max_new_tokens", "eos_id",
                     "pad_id", "sampler", "tree"))
latr_generate_jit.__doc__ = "`latr_generate` under `jax.jit` (sizes static)."
