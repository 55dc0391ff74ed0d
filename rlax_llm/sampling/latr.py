"""Lookahead tree rollouts (LATR): branch where the policy hesitates, prune echoes.

Lookahead Tree-Based Rollouts for Enhanced Trajectory-Level Exploration in
Reinforcement Learning with Verifiable Rewards (Xing et al., arXiv:2510.24302).

Each prompt's group of G rows is split into S = round(G * eta) *tree slots* and
G - S *plain rows*. Plain rows sample token by token from the start. The tree
slots run in two phases:

1. Branching (greedy). Slot 0 holds the original branch and decodes greedily.
   Slots 1..S-1 start as *reserve* rows: until a branch claims one, it
   samples like a plain row. At step i, every live, unfinished branch j with
   next-token probabilities p (tempered as in `samplers`) proposes each
   non-greedy token c with

       p(c) > tau_abs   and   p(top-1) - p(c) < tau_rel,

   at most `max_branches_per_step` of them (most probable first). Proposals
   take the free slots in (slot, rank) order until none is free, emptied
   slots (of pruned branches) first, then reserve rows in slot order. A new
   branch copies its parent's token history and per-sample KV cache rows (no
   recomputation), emits c at step i, and then decodes greedily too.
   Lookahead: for each window r in `windows` (increasing), once the branch has
   written r tokens after c (or it and its parent have both ended), the r
   tokens following c in the branch and in its parent are compared; when

       NED = Levenshtein(branch window, parent window) / max(window lengths)

   is below `tau_ed`, the branch *and all its descendants* are pruned and their
   slots become empty (free again). A branch that passes every window is
   settled.
2. Sampling. The phase switches, per prompt, at the first step where every
   tree slot holds a settled branch, or at step `branch_steps`, whichever
   comes first. Branches still awaiting a check at the switch are kept
   unchecked. Empty slots are then filled with copies of the live branches
   (round robin in slot order, KV rows included), reserve rows go on
   sampling as plain rows, and every tree slot continues by stochastic
   sampling with the sampler, so surviving prefixes and their copies diverge
   from the switch on. If every tree slot ends before the switch, empty slots
   become copies of finished branches (identical completions).

Unclaimed tree capacity is thus spent on independent samples rather than on
duplicates of the tree, so a prompt whose policy never hesitates (no branch
opens, e.g. short answers) gets G - 1 samples and its greedy completion.

Log-probs. Every token, greedy, branch or sampled, is stored with
log softmax(logits / temperature)[token], the quantity `samplers.sample_token`
returns and a trainer recomputes from the same model. `old_logp` is thus the
policy's own log-prob of the chosen token, not the probability of the
(deterministic) tree procedure choosing it, and the PPO ratio starts at 1.

The core, `latr_decode`, takes any `step_fn(tokens_BG, positions_BG, cache,
index) -> (logits_BGV, cache)` and a cache whose `k` and `v` are tuples of
[B, G, ...] arrays (`models.KVCache` or any NamedTuple with those fields), so
tests drive it with synthetic logits; `latr_generate` runs it on a model.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import chex
import flax.nnx as nnx
import jax
import jax.numpy as jnp

from rlax_llm.sampling.generate import check_context
from rlax_llm.sampling.samplers import SamplerConfig, sample_token

StepFn = Callable[[jax.Array, jax.Array, Any, jax.Array],
                  tuple[jax.Array, Any]]


class TreeConfig(NamedTuple):
  """Hashable LATR settings (static under jit).

  Attributes:
    tau_abs: a candidate needs probability above this.
    tau_rel: and within this of the top-1 probability.
    tau_ed: a branch whose lookahead window has normalised edit distance to
      its parent's below this is pruned.
    max_branches_per_step: the most children one branch opens at one step.
    windows: lookahead window lengths r, increasing, each >= 1.
    branch_steps: the branching phase ends at this step at the latest.
  """
  tau_abs: float = 0.15
  tau_rel: float = 0.25
  tau_ed: float = 0.5
  max_branches_per_step: int = 2
  windows: tuple[int, ...] = (2,)
  branch_steps: int = 1 << 30

  def validate(self) -> "TreeConfig":
    w = tuple(int(x) for x in self.windows)
    if not w or any(x < 1 for x in w) or list(w) != sorted(set(w)):
      raise ValueError(f"windows must be a non-empty strictly increasing "
                       f"sequence of lengths >= 1, got {self.windows}.")
    if self.max_branches_per_step < 0:
      raise ValueError("max_branches_per_step must be >= 0, got "
                       f"{self.max_branches_per_step}.")
    if not 0.0 <= self.tau_abs < 1.0 or not 0.0 <= self.tau_rel <= 1.0:
      raise ValueError(f"tau_abs must be in [0, 1) and tau_rel in [0, 1], "
                       f"got {self.tau_abs} and {self.tau_rel}.")
    if not 0.0 <= self.tau_ed <= 1.0:
      raise ValueError(f"tau_ed must be in [0, 1], got {self.tau_ed}.")
    if self.branch_steps < 0:
      raise ValueError(f"branch_steps must be >= 0, got {self.branch_steps}.")
    return self._replace(windows=w)


class TreeRollout(NamedTuple):
  """LATR completions, flattened to N = B * G (rows of a prompt adjacent).

  Attributes:
    tokens, logp, mask, lengths, finished, steps: as in `generate.Rollout`.
    parent: [N] int32 slot (within the group) a branch was opened from; -1
      for the original branch, copies and plain rows.
    branch_step: [N] int32 step at which a branch was opened, -1 otherwise.
    copied: [N] bool, a slot filled with a copy of a live slot at the switch.
    opened: [B] int32 branches opened per prompt (pruned ones included).
    pruned: [B] int32 branches pruned per prompt (descendants included).
    switch_step: [B] int32 step of the switch to sampling (steps run if the
      tree never switched).
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
  switch_step: jax.Array


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
  la = jnp.clip(jnp.asarray(len_a_N, jnp.int32), 0, w)
  lb = jnp.clip(jnp.asarray(len_b_N, jnp.int32), 0, w)
  return table[la, jnp.arange(n), lb]


def normalized_edit_distance(a_NW, b_NW, len_a_N, len_b_N) -> jax.Array:
  """Levenshtein distance / max(len_a, len_b, 1), in [0, 1]; [N] f32."""
  d = edit_distance(a_NW, b_NW, len_a_N, len_b_N).astype(jnp.float32)
  den = jnp.maximum(jnp.maximum(jnp.asarray(len_a_N), jnp.asarray(len_b_N)), 1)
  return d / den.astype(jnp.float32)


def eta_schedule(step: int, *, eta0: float = 0.5, eta_min: float = 0.0,
                 decay_every: int = 0, decay_rate: float = 0.5,
                 kind: str = "step") -> float:
  """Share eta of a group drawn by the tree at RL step `step` (0-based).

  step:   eta = max(eta_min, eta0 * decay_rate ** floor(step / decay_every))
  linear: eta = eta0 + (eta_min - eta0) * min(step / decay_every, 1)
  `decay_every` = 0 keeps eta0 throughout.
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
  """S = round(G * eta), halves rounded up, clipped to [0, G]."""
  return int(min(max(math.floor(num_samples * eta + 0.5), 0), num_samples))


def gather_kv_rows(cache, src_BG: jax.Array):
  """Row g of prompt b takes the KV rows of row src[b, g] (k and v only)."""
  take = jax.vmap(lambda x, s: x[s])
  return cache._replace(k=tuple(take(x, src_BG) for x in cache.k),
                        v=tuple(take(x, src_BG) for x in cache.v))


def _take_rows(x, src_BG):
  return jnp.take_along_axis(
      x, src_BG.reshape(src_BG.shape + (1,) * (x.ndim - 2)), axis=1)


def _fill_sources(live_BG: jax.Array, free_BG: jax.Array) -> jax.Array:
  """For each free slot, a live slot, round robin over live slots in order."""
  g = live_BG.shape[1]
  live_list = jnp.argsort(~live_BG, axis=1, stable=True)
  n_live = jnp.maximum(jnp.sum(live_BG, axis=1, keepdims=True), 1)
  rank = jnp.cumsum(free_BG, axis=1) - 1
  fill = jnp.take_along_axis(live_list, jnp.maximum(rank, 0) % n_live, axis=1)
  return jnp.where(free_BG, fill, jnp.arange(g)[None])


def latr_decode(step_fn: StepFn, logits_BGV: jax.typing.ArrayLike, cache,
                prompt_len_B: jax.typing.ArrayLike, rng: jax.Array, *,
                num_tree: int, max_new_tokens: int, eos_id: int,
                pad_id: int = 0, sampler: SamplerConfig = SamplerConfig(),
                tree: TreeConfig = TreeConfig(),
                gather_fn: Callable[[Any, jax.Array], Any] = gather_kv_rows
                ) -> tuple[TreeRollout, Any]:
  """Decodes G rows per prompt: S = `num_tree` LATR slots, G - S samples.

  Args:
    step_fn: feeds one token per row, returns next-token logits [B, G, V].
    logits_BGV: f32 next-token logits of every row before the first token.
    cache: decode state with k/v tuples of [B, G, ...] arrays.
    prompt_len_B: int, the position of each prompt's first new token.
    rng: PRNG key; sampling at step i uses fold_in(rng, i).
    num_tree: S, tree slots per prompt (rows 0..S-1); 0 <= S <= G.
    max_new_tokens: T.
    eos_id: the token that ends a row.
    pad_id: written after a row ends and in unused slots.
    sampler: the stochastic phase's sampler; its temperature also scores
      every token and sets the branching probabilities.
    tree: LATR thresholds and windows.
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
  m = min(tree.max_branches_per_step, v - 1)
  nw = len(tree.windows)
  wmax = tree.windows[-1]
  windows = jnp.asarray(tree.windows, jnp.int32)
  prompt_len_B = jnp.asarray(prompt_len_B, jnp.int32)
  is_tree = jnp.arange(g) < s  # [G]
  bidx = jnp.arange(b)[:, None]
  inv_temp = 1.0 / sampler.temperature if sampler.temperature > 0 else 1.0

  def cond(c):
    return (c["i"] < t) & ~jnp.all(c["done"] | ~(c["live"] | c["reserve"]))

  def body(c):
    i = c["i"]
    live, done, parent = c["live"], c["done"], c["parent"]
    birth, level, stoch = c["birth"], c["level"], c["stoch"]
    reserve = c["reserve"]
    # -- switch to sampling: the tree is full and settled, or time is up.
    free = is_tree & ~live
    pending = is_tree & live & (level < nw)
    switch = ~stoch & (((~jnp.any(free, 1)) & ~jnp.any(pending, 1))
                       | (i >= tree.branch_steps))
    fill = free & ~reserve & switch[:, None]  # emptied slots copy branches
    src = jnp.where(fill, _fill_sources(live & is_tree, fill),
                    jnp.arange(g)[None])
    copied = c["copied"] | fill
    live = live | fill | (reserve & switch[:, None])  # reserve rows: plain
    reserve = reserve & ~switch[:, None]
    level = jnp.where(fill | switch[:, None], nw, level)
    stoch = stoch | switch
    switch_step = jnp.where(switch, i, c["switch_step"])
    free = is_tree & ~live

    # -- branching: candidates of every live greedy slot take free slots.
    logp_BGV = jax.nn.log_softmax(c["logits"] * inv_temp, axis=-1)
    top_p, top_i = jax.lax.top_k(jnp.exp(logp_BGV), 1 + m)  # [B, G, 1+M]
    can = is_tree & live & ~done & ~stoch[:, None]
    ok = ((top_p[..., 1:] > tree.tau_abs)
          & (top_p[..., :1] - top_p[..., 1:] < tree.tau_rel) & can[..., None])
    ok = ok.reshape(b, g * m)
    rank = jnp.cumsum(ok, axis=1) - 1
    n_free = jnp.sum(free, axis=1, keepdims=True)
    accept = ok & (rank < n_free)
    # Free slots in order: emptied ones first, then reserve rows.
    free_list = jnp.argsort(jnp.where(free, reserve.astype(jnp.int32), 2),
                            axis=1, stable=True)
    child = jnp.where(accept, jnp.take_along_axis(
        free_list, jnp.clip(rank, 0, g - 1), axis=1), g)  # g: dropped
    from_slot = jnp.broadcast_to(jnp.arange(g)[:, None], (g, m)).reshape(-1)
    cand_tok = top_i[..., 1:].reshape(b, g * m)
    src = src.at[bidx, child].set(from_slot[None], mode="drop")
    new = jnp.zeros((b, g), bool).at[bidx, child].set(True, mode="drop")
    new_tok = jnp.zeros((b, g), jnp.int32).at[bidx, child].set(
        cand_tok, mode="drop")
    parent = parent.at[bidx, child].set(from_slot[None], mode="drop")
    birth = jnp.where(new, i, birth)
    level = jnp.where(new, 0, level)
    live = live | new
    reserve = reserve & ~new
    opened = c["opened"] + jnp.sum(new, axis=1)

    # -- copy histories and KV rows of new branches / copies.
    tokens = _take_rows(c["tokens"], src)
    logp = _take_rows(c["logp"], src)
    mask = _take_rows(c["mask"], src)
    done = _take_rows(done, src)
    logits = _take_rows(c["logits"], src)
    logp_BGV = _take_rows(logp_BGV, src)
    cache = gather_fn(c["cache"], src)

    # -- this step's token.
    sampled = sample_token(jax.random.fold_in(rng, i), logits.reshape(b * g, v),
                           sampler).token.reshape(b, g)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    stochastic_row = jnp.where(is_tree[None], stoch[:, None] | reserve, True)
    tok = jnp.where(stochastic_row, sampled, greedy)
    tok = jnp.where(new, new_tok, tok)
    active = (live | reserve) & ~done
    tok = jnp.where(active, tok, pad_id)
    lp = jnp.where(active, jnp.take_along_axis(logp_BGV, tok[..., None],
                                               axis=-1)[..., 0], 0.0)
    tokens = tokens.at[:, :, i].set(tok)
    logp = logp.at[:, :, i].set(lp)
    mask = mask.at[:, :, i].set(active)
    done = done | (active & (tok == eos_id))

    # -- lookahead: compare each due branch with its parent.
    par = jnp.maximum(parent, 0)
    r = windows[jnp.clip(level, 0, nw - 1)]
    pending = is_tree & live & (level < nw) & (parent >= 0) & ~stoch[:, None]
    both_done = done & _take_rows(done, par)
    due = pending & ((i == birth + r) | both_done)
    pos = birth[..., None] + 1 + jnp.arange(wmax)  # [B, G, W]
    in_win = (jnp.arange(wmax) < r[..., None]) & (pos < t)
    pos = jnp.clip(pos, 0, t - 1)

    def window(rows):
      tk = jnp.take_along_axis(_take_rows(tokens, rows), pos, axis=2)
      mk = jnp.take_along_axis(_take_rows(mask, rows), pos, axis=2) & in_win
      return tk.reshape(b * g, wmax), jnp.sum(mk, -1).reshape(b * g)

    ct, cl = window(jnp.broadcast_to(jnp.arange(g), (b, g)))
    pt, pl = window(par)
    ned = normalized_edit_distance(ct, pt, cl, pl).reshape(b, g)
    prune = due & (ned < tree.tau_ed)
    level = jnp.where(due & ~prune, jnp.where(both_done, nw, level + 1), level)
    for _ in range(max(s - 1, 0)):  # descendants of pruned branches
      prune = prune | (live & (parent >= 0) & _take_rows(prune, par))
    pruned = c["pruned"] + jnp.sum(prune, axis=1)
    keep = ~prune
    live = live & keep
    done = done & keep
    tokens = jnp.where(keep[..., None], tokens, pad_id)
    logp = jnp.where(keep[..., None], logp, 0.0)
    mask = mask & keep[..., None]
    parent = jnp.where(keep, parent, -1)
    birth = jnp.where(keep, birth, -1)
    level = jnp.where(keep, level, nw)

    logits, cache = step_fn(tok, prompt_len_B[:, None] + i, cache, i)
    return dict(i=i + 1, tokens=tokens, logp=logp, mask=mask, done=done,
                live=live, reserve=reserve, parent=parent, birth=birth,
                level=level,
                stoch=stoch, copied=copied, opened=opened, pruned=pruned,
                switch_step=switch_step,
                logits=logits.astype(jnp.float32), cache=cache)

  init = dict(
      i=jnp.int32(0), tokens=jnp.full((b, g, t), pad_id, jnp.int32),
      logp=jnp.zeros((b, g, t), jnp.float32), mask=jnp.zeros((b, g, t), bool),
      done=jnp.zeros((b, g), bool),
      live=jnp.broadcast_to(~is_tree | (jnp.arange(g) == 0), (b, g)),
      reserve=jnp.broadcast_to(is_tree & (jnp.arange(g) > 0), (b, g)),
      parent=jnp.full((b, g), -1, jnp.int32),
      birth=jnp.full((b, g), -1, jnp.int32),
      level=jnp.full((b, g), nw, jnp.int32),
      stoch=jnp.full((b,), s == 0), copied=jnp.zeros((b, g), bool),
      opened=jnp.zeros((b,), jnp.int32), pruned=jnp.zeros((b,), jnp.int32),
      switch_step=jnp.full((b,), 0 if s == 0 else -1, jnp.int32),
      logits=logits_BGV,
      cache=cache)
  c = jax.lax.while_loop(cond, body, init)
  # Emptied slots when every row has ended copy a live branch's history;
  # reserve rows keep their samples.
  free = is_tree & ~c["live"] & ~c["reserve"]
  src = _fill_sources(c["live"] & is_tree, free)
  tokens, logp, mask, done = (_take_rows(c[k], src)
                              for k in ("tokens", "logp", "mask", "done"))
  copied = c["copied"] | free
  switch_step = jnp.where(c["switch_step"] < 0, c["i"], c["switch_step"])
  n = b * g
  ro = TreeRollout(
      tokens=tokens.reshape(n, t), logp=logp.reshape(n, t),
      mask=mask.reshape(n, t),
      lengths=jnp.sum(mask, axis=-1).reshape(n).astype(jnp.int32),
      finished=done.reshape(n), steps=c["i"],
      parent=jnp.where(free, -1, c["parent"]).reshape(n),
      branch_step=jnp.where(free, -1, c["birth"]).reshape(n),
      copied=copied.reshape(n), opened=c["opened"], pruned=c["pruned"],
      switch_step=switch_step)
  return ro, c["cache"]


def latr_generate(graphdef: nnx.GraphDef, params, prompt_BP, prompt_mask_BP,
                  rng: jax.Array, *, num_samples: int, num_tree: int,
                  max_new_tokens: int, eos_id: int, pad_id: int = 0,
                  sampler: SamplerConfig = SamplerConfig(),
                  tree: TreeConfig = TreeConfig()) -> TreeRollout:
  """LATR rollouts of a model: one prefill per prompt, then `latr_decode`.

  Args:
    graphdef, params: the model (`nnx.split`), with `prefill`/`decode_step`.
    prompt_BP, prompt_mask_BP: prompts, padded left or right.
    rng: PRNG key.
    num_samples: G rows per prompt; the first `num_tree` are tree slots.
    num_tree, max_new_tokens, eos_id, pad_id, sampler, tree: see
      `latr_decode`.

  Returns:
    TreeRollout with N = B * G rows, row g of prompt b at b * G + g.
  """
  prompt_BP = jnp.asarray(prompt_BP, jnp.int32)
  prompt_mask_BP = jnp.asarray(prompt_mask_BP, bool)
  chex.assert_rank([prompt_BP, prompt_mask_BP], 2)
  chex.assert_equal_shape([prompt_BP, prompt_mask_BP])
  model = nnx.merge(graphdef, params)
  check_context(prompt_BP.shape[1], max_new_tokens, model.cfg.max_seq_len)
  b, g = prompt_BP.shape[0], num_samples
  last_BV, cache, prompt_len_B = model.prefill(
      prompt_BP, prompt_mask_BP, num_samples=g, max_new_tokens=max_new_tokens)
  logits_BGV = jnp.broadcast_to(last_BV[:, None], (b, g, last_BV.shape[-1]))
  ro, _ = latr_decode(model.decode_step, logits_BGV, cache, prompt_len_B, rng,
                      num_tree=num_tree, max_new_tokens=max_new_tokens,
                      eos_id=eos_id, pad_id=pad_id, sampler=sampler, tree=tree)
  return ro


latr_generate_jit = jax.jit(
    latr_generate, static_argnums=(0,),
    static_argnames=("num_samples", "num_tree", "max_new_tokens", "eos_id",
                     "pad_id", "sampler", "tree"))
latr_generate_jit.__doc__ = "`latr_generate` under `jax.jit` (sizes static)."
