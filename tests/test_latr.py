"""LATR: branching, lookahead pruning and its exemptions, exit, root copies.

The tree is driven by a synthetic `step_fn` whose next-token probabilities are
a Python function of each row's token history. The history lives in the fake
cache's `k` (row g's token at index i), so a branch that copies its parent's
cache rows also inherits its history; `v` stamps every written row with the
id of the slot that wrote it, which shows where a row's cache came from.
Tokens: 0 pad, 1 EOS, 2..5 ordinary (read 2, 3, 4 as the digits "1", "2", "3"
where a test says so).
"""

import functools
import itertools

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from rlax_llm.models.config import ModelConfig
from rlax_llm.models.transformer import KVCache, Transformer
from rlax_llm.sampling import latr
from rlax_llm.sampling.samplers import SamplerConfig, sample_token
from rlax_llm.training.scoring import score_completions_jit

PAD, EOS = 0, 1
V = 6  # pad, eos, tokens 2..5
# Default: end now.
P_END = (0.0, 0.91, 0.03, 0.03, 0.03, 0.0)
NO_EXEMPT = np.zeros(V, bool)


@functools.lru_cache(maxsize=None)
def _synthetic(table_fn, b, g, t):
  """(step_fn, logits_BGV, cache) for probabilities table_fn(b, history)."""
  hists = [()]
  for n in range(1, t + 1):
    hists += list(itertools.product(range(V), repeat=n))
  # probs[n, b, code] with code = sum_j tok_j V^j over the n tokens.
  probs = np.zeros((t + 1, b, V ** t, V), np.float32)
  for bi in range(b):
    for h in hists:
      code = sum(x * V ** j for j, x in enumerate(h))
      p = np.asarray(table_fn(bi, h), np.float64)
      probs[len(h), bi, code] = p / p.sum()
  logits_table = jnp.asarray(np.log(np.maximum(probs, 1e-30)))
  weights = jnp.asarray([V ** j for j in range(t)], jnp.int32)

  def step_fn(tokens_BG, positions_BG, cache, index):
    del positions_BG
    k = cache.k[0].at[:, :, index].set(tokens_BG.astype(jnp.float32))
    stamp = jnp.broadcast_to(jnp.arange(g, dtype=jnp.float32) + 1, (b, g))
    v = cache.v[0].at[:, :, index].set(stamp)
    hist = k.astype(jnp.int32)
    upto = jnp.arange(t) <= index
    code = jnp.sum(jnp.where(upto, hist, 0) * weights, axis=-1)
    logits = logits_table[index + 1, jnp.arange(b)[:, None], code]
    return logits, cache._replace(k=(k,), v=(v,))

  cache = KVCache(prefix_k=(), prefix_v=(), prefix_mask=jnp.zeros((b, 1), bool),
                  k=(jnp.zeros((b, g, t)),), v=(jnp.zeros((b, g, t)),))
  first = jnp.broadcast_to(logits_table[0, :, 0][:, None], (b, g, V))
  return step_fn, first, cache


# The reference draws, compiled as in decoding (not an eager compile per op).
_sample_token = jax.jit(sample_token, static_argnums=2)

# One compilation per (synthetic table, sizes, settings).
_decode_jit = jax.jit(latr.latr_decode, static_argnums=(0,), static_argnames=(
    "num_tree", "max_new_tokens", "eos_id", "pad_id", "sampler", "tree",
    "gather_fn"))


def _run(table_fn, *, b=1, g=4, s=4, t=3, key=0, sampler=SamplerConfig(1.0),
         exempt=NO_EXEMPT, jit=True, **tree):
  step_fn, first, cache = _synthetic(table_fn, b, g, t)
  fn = _decode_jit if jit else latr.latr_decode
  ro, cache = fn(step_fn, first, cache, jnp.zeros(b, jnp.int32),
                 jax.random.key(key), num_tree=s, max_new_tokens=t,
                 eos_id=EOS, pad_id=PAD, sampler=sampler,
                 tree=latr.TreeConfig(**tree), exempt_V=exempt)
  return jax.device_get(ro), jax.device_get(cache)


def _assert_sampled(table_fn, ro, *, rows, start, key, b, g, t,
                    sampler=SamplerConfig(1.0)):
  """Rows `rows` (flat b * G + g) hold sample_token's draws from step start."""
  step_fn, _, cache = _synthetic(table_fn, b, g, t)
  logits = _synthetic(table_fn, b, g, t)[1]
  tokens = ro.tokens.reshape(b, g, t)
  lengths = ro.lengths
  checked = 0
  for i in range(t):
    want = np.asarray(_sample_token(
        jax.random.fold_in(jax.random.key(key), i), logits.reshape(b * g, V),
        sampler).token)
    got = tokens[:, :, i].reshape(-1)
    for r in rows:
      if start <= i < lengths[r]:
        assert got[r] == want[r], (r, i)
        checked += 1
    logits, cache = step_fn(jnp.asarray(tokens[:, :, i]), None, cache, i)
  assert checked > 0


# -- branching ------------------------------------------------------------------
def _table_branching(b, h):
  del b
  return {(): (0, 0, .30, .28, .27, .15),    # top-3 all within thresholds
          (2,): (0, 0, .50, .40, .10, 0),    # root: candidate 3
          (3,): (0, 0, .10, .50, .40, 0),    # slot 1: candidate 4
          (4,): (0, 0, .10, .10, .50, .30),  # .30 is .20 below the top-1
          }.get(h, P_END)


def test_top2_one_new_branch_per_position_greedy_original():
  ro, cache = _run(_table_branching, windows=(8,), sampler=SamplerConfig(0.7))
  # Step 0: only the rank-2 token (3) branches, not the third (4) although it
  # passes both thresholds. Step 1: root and slot 1 each open one branch.
  # Every branch decodes its top-1 token after its divergent token.
  np.testing.assert_array_equal(ro.tokens, [[2, 2, EOS], [3, 3, EOS],
                                            [2, 3, EOS], [3, 4, EOS]])
  np.testing.assert_array_equal(ro.parent, [-1, 0, 0, 1])
  np.testing.assert_array_equal(ro.branch_step, [-1, 0, 1, 1])
  np.testing.assert_array_equal(ro.opened, [3])
  np.testing.assert_array_equal(ro.pruned, [0])
  assert ro.finished.all() and not ro.copied.any()
  # Stored log-probs are the policy's at the sampling temperature 0.7.
  def tempered(p, tok):
    q = np.asarray(p, np.float64) ** (1 / 0.7)
    return np.log(q[tok] / q.sum())
  t = _table_branching
  want = [[tempered(t(0, ()), 2), tempered(t(0, (2,)), 2),
           tempered(P_END, EOS)],
          [tempered(t(0, ()), 3), tempered(t(0, (3,)), 3),
           tempered(P_END, EOS)],
          [tempered(t(0, ()), 2), tempered(t(0, (2,)), 3),
           tempered(P_END, EOS)],
          [tempered(t(0, ()), 3), tempered(t(0, (3,)), 4),
           tempered(P_END, EOS)]]
  np.testing.assert_allclose(ro.logp, want, rtol=1e-5, atol=1e-6)
  # KV rows: a child's rows before its branch step were written by its parent
  # and copied; later rows are its own (stamp = slot + 1).
  np.testing.assert_array_equal(cache.v[0][0], [[1, 1, 1], [2, 2, 2],
                                                [1, 3, 3], [2, 4, 4]])


def test_more_candidates_per_step_and_the_oldest_branch_first():
  ro, _ = _run(_table_branching, windows=(8,), max_branches_per_step=2)
  # Step 0 opens 3 and 4; at step 1 one slot is left and both root (the
  # oldest branch) and slot 1 propose: the root's candidate takes it.
  np.testing.assert_array_equal(ro.tokens, [[2, 2, EOS], [3, 3, EOS],
                                            [4, 4, EOS], [2, 3, EOS]])
  np.testing.assert_array_equal(ro.parent, [-1, 0, 0, 0])
  np.testing.assert_array_equal(ro.branch_step, [-1, 0, 0, 1])
  # tau_abs = .29 passes no rank-2 token at step 0; tau_rel = .05 none later.
  ro, _ = _run(_table_branching, windows=(8,), tau_abs=0.29)
  np.testing.assert_array_equal(ro.opened, [1])  # root's 3 (.40) at step 1
  ro, _ = _run(_table_branching, windows=(8,), tau_rel=0.05)
  np.testing.assert_array_equal(ro.opened, [1])  # .28 vs .30 at step 0
  np.testing.assert_array_equal(ro.branch_step[1], 0)


def test_one_tree_slot_is_the_greedy_root_and_the_rest_plain_samples():
  ro, _ = _run(_table_branching, g=4, s=1, windows=(8,), key=3)
  assert ro.opened[0] == 0
  np.testing.assert_array_equal(ro.tokens[0], [2, 2, EOS])
  _assert_sampled(_table_branching, ro, rows=[1, 2, 3], start=0, key=3, b=1,
                  g=4, t=3)


# -- pruning ----------------------------------------------------------------------
def _table_short_answers(b, h):
  del b  # "1" then "2" or "3", then EOS ("12<eos>" vs "13<eos>")
  return {(): (0, 0, 1, 0, 0, 0), (2,): (0, 0, 0, .50, .40, .10),
          (2, 3): (0, 1, 0, 0, 0, 0), (2, 4): (0, 1, 0, 0, 0, 0)}.get(h, P_END)


def _table_short_no_eos(b, h):
  del b  # the same divergence, then both write 5
  return {(): (0, 0, 1, 0, 0, 0), (2,): (0, 0, 0, .50, .40, .10),
          (2, 3): (0, 0, 0, 0, 0, 1), (2, 4): (0, 0, 0, 0, 0, 1)}.get(h, P_END)


def test_distinct_short_answers_are_not_pruned():
  """"12<eos>" vs "13<eos>": the window holds the divergent token and EOS."""
  ro, _ = _run(_table_short_answers, g=2, s=2, t=3, windows=(2,), tau_ed=0.4)
  np.testing.assert_array_equal(ro.tokens, [[2, 3, EOS], [2, 4, EOS]])
  np.testing.assert_array_equal(ro.opened, [1])
  np.testing.assert_array_equal(ro.pruned, [0])
  np.testing.assert_array_equal(ro.parent, [-1, 0])


def test_eos_in_a_window_exempts_the_branch():
  # NED of ("2", EOS) vs ("3", EOS) is 1/2 < 0.6, but EOS exempts the check.
  ro, _ = _run(_table_short_answers, g=2, s=2, t=3, windows=(2,), tau_ed=0.6)
  np.testing.assert_array_equal(ro.pruned, [0])
  np.testing.assert_array_equal(ro.exempted, [1])
  np.testing.assert_array_equal(ro.checked, [0])
  # Without EOS, ("2", 5) vs ("3", 5) has the same NED and is pruned; the
  # emptied slot becomes a copy of the root once the rows end.
  ro, _ = _run(_table_short_no_eos, g=2, s=2, t=4, windows=(2,), tau_ed=0.6)
  np.testing.assert_array_equal(ro.pruned, [1])
  np.testing.assert_array_equal(ro.checked, [1])
  np.testing.assert_array_equal(ro.tokens, [[2, 3, 5, EOS]] * 2)
  assert ro.copied.tolist() == [False, True]


def _table_echo(b, h):
  del b  # root 2 4 5 EOS; the branch on 3 echoes 4 5 (EOS only at step 3)
  return {(): (0, 0, .50, .40, .10, 0), (2,): (0, 0, 0, 0, 1, 0),
          (3,): (0, 0, 0, 0, 1, 0), (2, 4): (0, 0, 0, 0, 0, 1),
          (3, 4): (0, 0, 0, 0, 0, 1), (2, 4, 5): (0, 1, 0, 0, 0, 0),
          (3, 4, 5): (0, 1, 0, 0, 0, 0)}.get(h, P_END)


def test_echoing_branch_is_pruned_unless_the_parent_token_is_exempt():
  # Window r = 3 from the divergent token: (3, 4, 5) vs (2, 4, 5), NED 1/3.
  ro, _ = _run(_table_echo, g=2, s=2, t=4, windows=(3,), tau_ed=0.4)
  np.testing.assert_array_equal(ro.pruned, [1])
  np.testing.assert_array_equal(ro.tokens, [[2, 4, 5, EOS]] * 2)
  assert ro.copied.tolist() == [False, True]
  # The parent's divergent token 2 as a digit: exempt, the branch survives.
  digit2 = NO_EXEMPT.copy()
  digit2[2] = True
  ro, _ = _run(_table_echo, g=2, s=2, t=4, windows=(3,), tau_ed=0.4,
               exempt=digit2)
  np.testing.assert_array_equal(ro.pruned, [0])
  np.testing.assert_array_equal(ro.exempted, [1])
  np.testing.assert_array_equal(ro.tokens, [[2, 4, 5, EOS], [3, 4, 5, EOS]])
  # Only the branch's own token (3) exempt: the parent's decides, pruned.
  digit3 = NO_EXEMPT.copy()
  digit3[3] = True
  ro, _ = _run(_table_echo, g=2, s=2, t=4, windows=(3,), tau_ed=0.4,
               exempt=digit3)
  np.testing.assert_array_equal(ro.pruned, [1])
  # keep_math_symbols=False ignores the table.
  ro, _ = _run(_table_echo, g=2, s=2, t=4, windows=(3,), tau_ed=0.4,
               exempt=digit2, keep_math_symbols=False)
  np.testing.assert_array_equal(ro.pruned, [1])
  # ROUGE-L of the windows is 2/3: pruned with tau_rouge 0.5 alone, kept with
  # 0.7; the suffix match (4, 5) is 2/3 too.
  for kw, want in ((dict(tau_rouge=0.5), 1), (dict(tau_rouge=0.7), 0),
                   (dict(tau_suffix=0.6), 1), (dict(tau_suffix=0.7), 0)):
    ro, _ = _run(_table_echo, g=2, s=2, t=4, windows=(3,), tau_ed=None, **kw)
    np.testing.assert_array_equal(ro.pruned, [want], err_msg=str(kw))


def _table_descendants(b, h):
  del b
  return {(): (0, 0, .50, .40, .10, 0),       # slot 1 <- 3 at step 0
          (2,): (0, 0, 0, 0, 1, 0),
          (3,): (0, 0, 0, 0, .50, .40),       # slot 2 <- 5 (child of slot 1)
          (2, 4): (0, 0, 0, .50, .40, .10),   # step 2: root branches again
          (2, 4, 3): (0, 1, 0, 0, 0, 0),
          (2, 4, 4): (0, 0, 0, 0, 0, 1),
          (2, 4, 4, 5): (0, 1, 0, 0, 0, 0),
          }.get(h, P_END)


def test_pruned_branch_takes_its_descendants_and_frees_the_slots():
  ro, cache = _run(_table_descendants, g=3, s=3, t=5, windows=(2,),
                   tau_ed=0.6)
  # Step 1: slot 1's window (3, 4) vs the root's (2, 4), NED 1/2 < 0.6: it
  # and slot 2, opened from it at step 1, are pruned. Step 2 reuses slot 1.
  np.testing.assert_array_equal(ro.opened, [3])
  np.testing.assert_array_equal(ro.pruned, [2])
  np.testing.assert_array_equal(ro.tokens[:2], [[2, 4, 3, EOS, PAD],
                                                [2, 4, 4, 5, EOS]])
  np.testing.assert_array_equal(ro.parent, [-1, 0, -1])
  np.testing.assert_array_equal(ro.branch_step, [-1, 2, -1])
  # The emptied slot 2 is a copy of the root at the end.
  assert ro.copied.tolist() == [False, False, True]
  np.testing.assert_array_equal(ro.tokens[2], ro.tokens[0])
  # The reused slot's cache: rows 0-1 copied from the root, then its own.
  np.testing.assert_array_equal(cache.v[0][0, 1], [1, 1, 2, 2, 2])
  # Windows (2, 3), nothing pruned (tau_ed 0): slot 1 is compared at step 1
  # (r = 2) and due again at step 2 (r = 3); slot 2 (opened at step 1) is due
  # at steps 2 and 3: those three windows end in EOS, exempted.
  ro, _ = _run(_table_descendants, g=3, s=3, t=5, windows=(2, 3),
               tau_ed=0.0)
  np.testing.assert_array_equal(ro.pruned, [0])
  np.testing.assert_array_equal(ro.checked, [1])
  np.testing.assert_array_equal(ro.exempted, [3])
  np.testing.assert_array_equal(ro.tokens[1:], [[3, 4, EOS, PAD, PAD],
                                                [3, 5, EOS, PAD, PAD]])


# -- exit to sampling -----------------------------------------------------------------
def _table_exit(b, h):
  if not h:
    return (0, 0, .50, .40, .10, 0) if b == 0 else (0, 0, .9, .05, .05, 0)
  # .25 is not above tau_abs: no branching after step 0.
  return (0, 0, .45, .25, .20, .10) if b == 0 else (0, 0, .7, .1, .1, .1)


@pytest.mark.parametrize("kw,want", [
    (dict(windows=(1,)), 3),       # full at 0; every branch older than 1 at 2
    (dict(windows=(2,)), 4),       # ... older than 2 at 3
    (dict(windows=(1,), branch_steps=2), 2),  # the token cap
])
def test_exit_when_full_and_settled_or_at_the_cap(kw, want):
  b, g, t = 1, 2, 6
  ro, _ = _run(_table_exit, b=b, g=g, s=2, t=t, tau_ed=None, key=4, **kw)
  np.testing.assert_array_equal(ro.switch_step, [want])
  # Greedy before the exit (the branch on 3 at step 0), sampled after.
  np.testing.assert_array_equal(ro.tokens[:, :want],
                                [[2] + [2] * (want - 1),
                                 [3] + [2] * (want - 1)])
  _assert_sampled(_table_exit, ro, rows=[0, 1], start=want, key=4, b=b, g=g,
                  t=t)


def test_exit_fill_share_decays_with_the_step():
  # 2 branches of 4 slots: full once round(4 (0.8 - 0.4 i / 6)) <= 2, i.e. at
  # step 3 (every branch is older than 1 from step 2); without the decay never.
  ro, _ = _run(_table_exit, b=1, g=4, s=4, t=6, tau_ed=None, windows=(1,),
               exit_fill=0.8, exit_fill_decay=0.4)
  np.testing.assert_array_equal(ro.opened, [1])
  np.testing.assert_array_equal(ro.switch_step, [4])
  ro, _ = _run(_table_exit, b=1, g=4, s=4, t=6, tau_ed=None, windows=(1,),
               exit_fill=0.8, exit_fill_decay=0.0)
  np.testing.assert_array_equal(ro.switch_step, [6])  # never exited


def test_exit_scope_batch_waits_for_every_prompt():
  # Prompt 0 fills its 2 slots at step 0, prompt 1 never branches.
  kw = dict(b=2, g=2, s=2, t=6, tau_ed=None, windows=(1,))
  ro, _ = _run(_table_exit, **kw)
  np.testing.assert_array_equal(ro.opened, [1, 0])
  np.testing.assert_array_equal(ro.switch_step, [6, 6])  # 3 < round(3.9)
  ro, _ = _run(_table_exit, exit_scope="prompt", **kw)
  np.testing.assert_array_equal(ro.switch_step, [3, 6])


def test_empty_slots_become_root_copies_at_the_exit():
  b, g, t = 1, 4, 5
  ro, cache = _run(_table_exit, b=b, g=g, s=4, t=t, tau_ed=None, windows=(1,),
                   branch_steps=2, key=7)
  np.testing.assert_array_equal(ro.switch_step, [2])
  assert ro.copied.tolist() == [False, False, True, True]
  np.testing.assert_array_equal(ro.parent, [-1, 0, -1, -1])
  np.testing.assert_array_equal(ro.tokens[:, :2], [[2, 2], [3, 2], [2, 2],
                                                   [2, 2]])
  _assert_sampled(_table_exit, ro, rows=[0, 1, 2, 3], start=2, key=7, b=b,
                  g=g, t=t)
  # Copies take the root's KV rows (stamp 1) up to the exit.
  np.testing.assert_array_equal(cache.v[0][0, 2], [1, 1, 3, 3, 3])
  # The option: unclaimed slots sample independently from the start.
  ro, _ = _run(_table_exit, b=b, g=g, s=4, t=t, tau_ed=None, windows=(1,),
               branch_steps=2, key=7, empty_slots="sample")
  assert not ro.copied.any()
  np.testing.assert_array_equal(ro.tokens[:2, :2], [[2, 2], [3, 2]])
  _assert_sampled(_table_exit, ro, rows=[2, 3], start=0, key=7, b=b, g=g, t=t)


def test_same_key_same_rollout_other_key_differs():
  kw = dict(b=2, g=6, s=4, t=5, windows=(1,), tau_ed=None, branch_steps=2)
  a, _ = _run(_table_exit, key=1, **kw)
  again, _ = _run(_table_exit, key=1, **kw)
  other, _ = _run(_table_exit, key=2, **kw)
  for x, y in zip(a, again):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a.tokens, other.tokens)


def test_eager_and_jit_agree():
  kw = dict(g=3, s=3, t=5, windows=(2,), tau_ed=0.6)
  a, _ = _run(_table_descendants, jit=False, **kw)
  b, _ = _run(_table_descendants, **kw)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


# -- the whole tree phase against a reference of the official loop ------------------
def _random_table(seed, b, h):
  """Random next-token probabilities of history h; EOS likelier with length."""
  del b
  rng = np.random.default_rng([seed, len(h)] + list(h))
  p = rng.dirichlet(np.full(V, 0.6))
  p[PAD] = 0.0
  p[EOS] *= 0.3 * (1 + len(h))
  return tuple(p / p.sum())


def _reference_tree(table_fn, *, s, t, tree, exempt):
  """The official tree phase for one prompt (generation.py:431-588), greedy.

  Rows form a list in creation order (roots first, new branches appended,
  removals compacted), as the official BranchInfo. Returns the rows' token
  lists at the exit, with the root copied into the empty slots
  (generation.py:618-621), and the counts of opened and pruned branches.
  """
  m, wmax = tree.max_branches_per_step, max(tree.windows)
  cap = t if tree.branch_steps == 0 else min(tree.branch_steps, t)
  rows = [dict(toks=[], parent=None, birth=0, done=False)]
  opened = pruned = 0
  steps = 0
  for step in range(cap):
    steps = step + 1
    cands = []  # (rank k, row index, token)
    for idx, row in enumerate(rows):
      if row["done"]:
        continue
      p = np.asarray(table_fn(0, tuple(row["toks"])))
      top = sorted(range(V), key=lambda x, p=p: (-p[x], x))[:1 + m]
      for k in range(1, 1 + m):
        if p[top[k]] > tree.tau_abs and p[top[0]] - p[top[k]] < tree.tau_rel:
          cands.append((k, idx, top[k]))
    keep = sorted(cands)[:max(s - len(rows), 0)]
    born = []
    for idx, row in enumerate(rows):  # appended in row order, then rank
      for _, j, tok in sorted((c for c in keep if c[1] == idx),
                              key=lambda c: c[0]):
        born.append(dict(toks=row["toks"] + [tok], parent=j, birth=step,
                         done=tok == EOS))
      if not row["done"]:
        p = np.asarray(table_fn(0, tuple(row["toks"])))
        tok = int(np.argmax(p))
        row["toks"].append(tok)
        row["done"] = tok == EOS
    rows += born
    opened += len(born)
    # Pruning with current_step = step + 1 (sample_filter.py:264-346).
    remove = set()
    for idx, row in enumerate(rows):
      if row["parent"] is None:
        continue
      for r in tree.windows:
        if step + 1 - r != row["birth"]:
          continue
        par = rows[row["parent"]]
        if row["done"] or par["done"]:  # EOS in a window
          continue
        a = row["toks"][row["birth"]:row["birth"] + r]
        bb = par["toks"][row["birth"]:row["birth"] + r]
        if tree.keep_math_symbols and exempt[bb[0]]:
          continue
        if ((tree.tau_ed is not None
             and _levenshtein(a, bb) / r < tree.tau_ed)
            or (tree.tau_suffix is not None
                and _suffix_ref(a, bb) > tree.tau_suffix)
            or (tree.tau_rouge is not None
                and _rouge_ref(a, bb) > tree.tau_rouge)):
          remove.add(idx)
    grew = True
    while grew:  # descendants
      more = {i for i, row in enumerate(rows) if row["parent"] in remove}
      grew = not more <= remove
      remove |= more
    pruned += len(remove)
    old = {i: n for n, i in enumerate(i for i in range(len(rows))
                                      if i not in remove)}
    rows = [dict(row, parent=None if row["parent"] is None
                 else old[row["parent"]])
            for i, row in enumerate(rows) if i not in remove]
    if all(row["done"] for row in rows):  # generation.py:539-541
      break
    eff = s if all(row["done"] for row in rows) else len(rows)
    thres = tree.exit_fill - tree.exit_fill_decay * step / t
    if (eff >= round(s * thres)
        and all(row["birth"] + wmax < step for row in rows)):
      break
  out = [row["toks"] for row in rows]
  out += [list(rows[0]["toks"])] * (s - len(rows))
  return out, opened, pruned, steps


# Seeds 0 and 6 prune (1 and 2 branches), 4 exits on the capacity rule.
@pytest.mark.parametrize("seed", [0, 4, 6])
def test_tree_phase_matches_a_reference_of_the_official_loop(seed):
  table = functools.partial(_random_table, seed)
  exempt = NO_EXEMPT.copy()
  exempt[2] = True
  kw = dict(tau_abs=0.15, tau_rel=0.3, windows=(1, 2), tau_ed=0.6,
            tau_rouge=0.9, max_branches_per_step=1 + seed % 2)
  tree = latr.TreeConfig(**kw).validate()
  t, s = 6, 4
  want, opened, pruned, steps = _reference_tree(table, s=s, t=t, tree=tree,
                                                exempt=exempt)
  ro, _ = _run(table, g=s, s=s, t=t, exempt=exempt, **kw)
  assert opened >= 2  # the instance exercises branching
  np.testing.assert_array_equal(ro.opened, [opened])
  np.testing.assert_array_equal(ro.pruned, [pruned])
  cut = int(ro.switch_step[0])
  assert cut == steps or (cut == int(ro.steps) and cut <= steps)
  got = sorted(tuple(int(x) for x in row[:cut] if x != PAD)
               for row in ro.tokens)
  assert got == sorted(tuple(w[:cut]) for w in want)


# -- window comparisons -------------------------------------------------------------
def _levenshtein(a, b):
  d = list(range(len(b) + 1))
  for i, x in enumerate(a, 1):
    prev, d[0] = d[0], i
    for j, y in enumerate(b, 1):
      prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (x != y))
  return d[-1]


def _suffix_ref(a, b):
  """max over both directions of the longest suffix found in the other."""
  a, b = list(a), list(b)
  def longest(x, y):
    for n in range(len(x), 0, -1):
      if any(y[j:j + n] == x[-n:] for j in range(len(y) - n + 1)):
        return n
    return 0
  return max(longest(a, b), longest(b, a)) / len(a) if a else 0.0


def _lcs_ref(a, b):
  best = {}
  def f(i, j):
    if i == len(a) or j == len(b):
      return 0
    if (i, j) not in best:
      best[i, j] = (1 + f(i + 1, j + 1) if a[i] == b[j]
                    else max(f(i + 1, j), f(i, j + 1)))
    return best[i, j]
  return f(0, 0)


def _rouge_ref(a, b):
  lcs = _lcs_ref(list(a), list(b))
  if lcs == 0:
    return 0.0
  p, r = lcs / len(a), lcs / len(b)
  return 2 * p * r / (p + r)


def test_window_metrics_hand_cases():
  a = np.array([[1, 2, 3, 0], [1, 2, 3, 4], [5, 5, 5, 5], [1, 2, 0, 0]])
  b = np.array([[1, 3, 0, 0], [2, 3, 4, 1], [5, 5, 5, 5], [3, 4, 0, 0]])
  la, lb = np.array([3, 4, 4, 0]), np.array([2, 4, 2, 2])
  np.testing.assert_array_equal(latr.edit_distance(a, b, la, lb), [1, 2, 2, 2])
  np.testing.assert_allclose(latr.normalized_edit_distance(a, b, la, lb),
                             [1 / 3, 2 / 4, 2 / 4, 2 / 2])
  # Suffixes: (3,) of a in b | (2, 3, 4) of a in b | (5, 5) of b in a | none.
  np.testing.assert_allclose(latr.suffix_match(a, b, la, lb),
                             [1 / 3, 3 / 4, 2 / 4, 0.0])
  np.testing.assert_array_equal(latr.lcs_length(a, b, la, lb), [2, 3, 2, 0])
  np.testing.assert_allclose(latr.rouge_l(a, b, la, lb),
                             [2 * (2 / 3) * 1 / (2 / 3 + 1), 3 / 4,
                              2 * .5 * 1 / 1.5, 0.0], rtol=1e-6)
  # The criteria combine with "or": (2, 3, 4, 5) vs (3, 4, 5, 2) has NED 1/2
  # (kept at 0.4) but ROUGE-L and suffix match 3/4.
  x, y, r = np.array([[2, 3, 4, 5]]), np.array([[3, 4, 5, 2]]), np.array([4])
  decide = lambda **kw: bool(latr.prune_decision(  # pylint: disable=g-long-lambda
      x, y, r, latr.TreeConfig(**kw).validate())[0])
  assert not decide(tau_ed=0.4)
  assert decide(tau_ed=0.6)
  assert decide(tau_ed=0.4, tau_rouge=0.5)
  assert not decide(tau_ed=None, tau_rouge=0.8)
  assert decide(tau_ed=None, tau_suffix=0.7)
  assert not decide(tau_ed=None, tau_suffix=0.75)


_N, _W = 8, 7  # fixed shapes: one compilation each; lengths vary
_edit_jit = jax.jit(latr.edit_distance)
_suffix_jit = jax.jit(latr.suffix_match)
_rouge_jit = jax.jit(latr.rouge_l)


def _draw(data):
  tok = st.lists(st.integers(0, 3), min_size=_W, max_size=_W)
  lens = st.lists(st.integers(0, _W), min_size=_N, max_size=_N)
  return (np.array(data.draw(st.lists(tok, min_size=_N, max_size=_N))),
          np.array(data.draw(st.lists(tok, min_size=_N, max_size=_N))),
          np.array(data.draw(lens)), np.array(data.draw(lens)))


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_window_metrics_match_python_references(data):
  a, b, la, lb = _draw(data)
  pairs = [(a[i, :la[i]], b[i, :lb[i]]) for i in range(_N)]
  np.testing.assert_array_equal(_edit_jit(a, b, la, lb),
                                [_levenshtein(x, y) for x, y in pairs])
  np.testing.assert_allclose(_suffix_jit(a, b, la, lb),
                             [_suffix_ref(x, y) for x, y in pairs], rtol=1e-6)
  np.testing.assert_allclose(_rouge_jit(a, b, la, lb),
                             [_rouge_ref(x, y) if len(x) and len(y) else 0.0
                              for x, y in pairs], rtol=1e-6)


def test_math_symbol_table_follows_the_official_substring_rule():
  texts = ["", " ", "1", "12", "13", "+", "()", " 3", "a", "x1"]
  np.testing.assert_array_equal(
      latr.math_symbol_table(texts),
      [True, True, True, True, False, True, True, True, False, False])
  np.testing.assert_array_equal(
      latr.math_symbol_table(texts, match="chars"),
      [False, False, True, True, True, True, True, True, False, False])


def test_exempt_table_is_required_and_sized_to_the_vocabulary():
  with pytest.raises(ValueError, match="math_symbol_table"):
    _run(_table_echo, g=2, s=2, t=4, windows=(3,), exempt=None)
  with pytest.raises(ValueError, match="V=6"):
    _run(_table_echo, g=2, s=2, t=4, windows=(3,), exempt=np.zeros(5, bool))
  # Not needed when nothing can be pruned or exemptions are off.
  ro, _ = _run(_table_echo, g=2, s=2, t=4, windows=(3,), exempt=None,
               tau_ed=None)
  np.testing.assert_array_equal(ro.pruned, [0])
  ro, _ = _run(_table_echo, g=2, s=1, t=4, windows=(3,), exempt=None)
  np.testing.assert_array_equal(ro.opened, [0])  # one slot: no branch


# -- settings: eta schedule, config fields, validation ---------------------------------
def test_eta_at_follows_the_official_countdown_schedule():
  tree = latr.TreeConfig()
  # Official global steps count from 1: {0: 1, 10: .75, 20: .5, 80: .25,
  # 200: 0} gives 1.0 to RL steps 0..8 (global 1..9), 0.75 from step 9 on.
  got = [latr.eta_at(tree, k) for k in (0, 8, 9, 18, 19, 78, 79, 198, 199,
                                        1000)]
  assert got == [1.0, 1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25, 0.0, 0.0]
  assert [latr.tree_rows(8, e) for e in (1.0, 0.75, 0.5, 0.25, 0.0)] == [
      8, 6, 4, 2, 0]
  assert [latr.tree_rows(16, e) for e in (0.5, 0.125, 0.03)] == [8, 2, 0]
  # Python's round, as the official kt_n_gen: halves go to even.
  assert [latr.tree_rows(4, e) for e in (0.375, 0.625)] == [2, 2]
  assert latr.tree_rows(2, 0.25) == 0
  flat = latr.TreeConfig(eta_schedule=((0, 0.5),))
  assert latr.eta_at(flat, 10_000) == 0.5


def test_geometric_and_linear_eta_decay_values():
  step = lambda s: latr.eta_schedule(s, eta0=0.5, eta_min=0.125,  # pylint: disable=g-long-lambda
                                     decay_every=100, decay_rate=0.5)
  assert [step(s) for s in (0, 99, 100, 199, 200, 300, 1000)] == [
      0.5, 0.5, 0.25, 0.25, 0.125, 0.125, 0.125]
  lin = lambda s: latr.eta_schedule(s, eta0=1.0, eta_min=0.2,  # pylint: disable=g-long-lambda
                                    decay_every=100, kind="linear")
  np.testing.assert_allclose([lin(s) for s in (0, 25, 50, 100, 400)],
                             [1.0, 0.8, 0.6, 0.2, 0.2])
  assert latr.eta_schedule(500, eta0=0.7) == 0.7
  with pytest.raises(ValueError, match="'step' or 'linear'"):
    latr.eta_schedule(3, eta0=0.5, decay_every=1, kind="cosine")


def test_tree_config_from_fields():
  tree = latr.tree_config_from_fields(dict(
      tau_abs=0.15, tau_rel=0.25, windows=4, tau_ed=None, tau_suffix=0.2,
      tau_rouge=0.5, eta_schedule={0: 1.0, 100: 0.5}, branch_steps=1024))
  assert tree.windows == (4,) and tree.tau_ed is None
  assert tree.eta_schedule == ((0, 1.0), (100, 0.5))
  assert latr.tree_config_from_fields({}) == latr.TreeConfig().validate()
  with pytest.raises(ValueError, match="known fields are .*tau_abs"):
    latr.tree_config_from_fields(dict(eta0=0.5))
  with pytest.raises(ValueError, match="tau_ed must be a number or None"):
    latr.tree_config_from_fields(dict(tau_ed="0.4"))
  with pytest.raises(ValueError, match="windows must be an int or a tuple"):
    latr.tree_config_from_fields(dict(windows=(2.5,)))
  with pytest.raises(ValueError, match="branch_steps must be an int"):
    latr.tree_config_from_fields(dict(branch_steps=True))
  with pytest.raises(ValueError, match="keep_math_symbols must be True"):
    latr.tree_config_from_fields(dict(keep_math_symbols=1))
  with pytest.raises(ValueError, match="strictly increasing"):
    latr.tree_config_from_fields(dict(windows=(3, 2)))
  with pytest.raises(ValueError, match="start at 0"):
    latr.tree_config_from_fields(dict(eta_schedule=((5, 1.0),)))
  with pytest.raises(ValueError, match=r"in \[0, 1\]"):
    latr.tree_config_from_fields(dict(eta_schedule=((0, 1.5),)))
  with pytest.raises(ValueError, match="exit_scope must be one of"):
    latr.tree_config_from_fields(dict(exit_scope="global"))


def test_latr_arith_config_fields_build_a_tree():
  from configs import latr_arith  # pylint: disable=g-import-not-at-top
  c = latr_arith.get_config()
  fields = {k: v for k, v in c.rollout.items() if k != "name"}
  tree = latr.tree_config_from_fields(fields)
  assert c.rollout.name == "latr"
  assert tree.eta_schedule == latr.COUNTDOWN_ETA
  assert (tree.tau_abs, tree.tau_rel, tree.tau_ed) == (0.25, 0.15, 0.4)
  assert tree.max_branches_per_step == 1 and tree.keep_math_symbols


def test_bad_settings_are_refused_with_the_fix():
  with pytest.raises(ValueError, match="tau_ed"):
    latr.TreeConfig(tau_ed=1.5).validate()
  with pytest.raises(ValueError, match="empty_slots"):
    latr.TreeConfig(empty_slots="copy").validate()
  with pytest.raises(ValueError, match="num_tree"):
    _run(_table_branching, g=2, s=3)


# -- the real model -----------------------------------------------------------------------
def _model(seed=0, vocab=11):
  cfg = ModelConfig(vocab_size=vocab, num_layers=2, embed_dim=32, num_heads=4,
                    num_kv_heads=2, head_dim=8, mlp_dim=48, max_seq_len=24,
                    init_std=0.5)
  return nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))


def test_model_rollout_logp_equals_trainer_recomputation():
  """Copied KV rows are the parent's: the branch's log-probs match a rescore."""
  graphdef, params = _model()
  rng = np.random.default_rng(0)
  p = rng.integers(2, 11, (3, 5)).astype(np.int32)
  m = np.ones((3, 5), bool)
  m[1, :2] = False
  g, t = 6, 8
  tree = latr.TreeConfig(tau_abs=0.05, tau_rel=0.5, tau_ed=0.5,
                         windows=(1, 3), branch_steps=5)
  exempt = np.zeros(11, bool)
  exempt[5] = True
  ro = jax.device_get(latr.latr_generate_jit(
      graphdef, params, p, m, jax.random.key(0), num_samples=g, num_tree=4,
      max_new_tokens=t, eos_id=EOS, sampler=SamplerConfig(0.8), tree=tree,
      exempt_V=exempt))
  assert ro.opened.sum() >= 3  # the test exercises branching
  assert (ro.switch_step <= 5).all()
  scores = score_completions_jit(graphdef, params, np.repeat(p, g, 0),
                                 np.repeat(m, g, 0), ro.tokens, ro.mask,
                                 temperature=0.8)
  np.testing.assert_allclose(np.asarray(scores.logp), ro.logp, atol=2e-5)


# -- the engine, end to end ------------------------------------------------------------
@pytest.mark.slow
def test_latr_config_runs_through_the_experiment(tmp_path):
  from configs import latr_arith  # pylint: disable=g-import-not-at-top
  from rlax_llm import experiment  # pylint: disable=g-import-not-at-top
  from rlax_llm.training.metrics import read_metrics  # pylint: disable=g-import-not-at-top
  c = latr_arith.get_config()
  c.sft.steps, c.sft.batch_size = 12, 16
  c.rl.steps, c.rl.prompts_per_step, c.rl.num_samples = 3, 4, 8
  # The schedule counts RL steps from 1: eta 0.5, 0.5, 0.25 -> S = 4, 4, 2.
  c.rollout.eta_schedule = ((0, 0.5), (3, 0.25))
  c.eval.every, c.eval.num_problems, c.eval.num_samples = 3, 16, 2
  c.eval.batch_size, c.checkpoint.every, c.progress = 16, 100, False
  summary = experiment.run(c, str(tmp_path / "w"))
  assert 0.0 <= summary["final_accuracy"] <= 1.0
  rl = [r for r in read_metrics(str(tmp_path / "w/metrics.jsonl"))
        if "rl/loss" in r]
  assert len(rl) == 3
  assert [r["rollout/tree_rows"] for r in rl] == [4, 4, 2]
  assert [r["rollout/eta"] for r in rl] == [0.5, 0.5, 0.25]
  for r in rl:
    for k in ("rollout/branches_opened", "rollout/branches_pruned",
              "rollout/distinct_per_group", "rollout/distinct_tree",
              "rollout/switch_step", "reward/mean", "rl/loss"):
      assert np.isfinite(r[k]), k
    assert 1.0 <= r["rollout/distinct_per_group"] <= 8.0
    assert 1.0 <= r["rollout/distinct_tree"] <= r["rollout/tree_rows"]
    assert r["rollout/branches_pruned"] <= r["rollout/branches_opened"]
    # Stored log-probs are the policy's: the ratio starts at 1.
    assert r["rl/logp_mismatch_max"] < 1e-4


def test_engine_batch_has_the_configured_rows(tmp_path):
  from configs import latr_arith  # pylint: disable=g-import-not-at-top
  from rlax_llm import experiment  # pylint: disable=g-import-not-at-top
  from rlax_llm.training import state as state_lib  # pylint: disable=g-import-not-at-top
  c = latr_arith.get_config()
  c.rl.prompts_per_step, c.rl.num_samples = 3, 4
  c.rollout.tau_abs, c.rollout.tau_rel = 0.01, 0.9  # branch readily
  exp = experiment.Experiment(c, str(tmp_path / "w"))
  state, _ = state_lib.create_train_state(exp.model_cfg, exp.sft_opt,
                                          exp.mesh, seed=0)
  c.rollout.eta_schedule = ((0, 0.5),)
  exp = experiment.Experiment(c, str(tmp_path / "w2"))
  batch, stats = exp.rollout(state.params, c.sft.steps)
  b, g, t = 3, 4, exp.max_new_tokens
  assert batch.completion.shape == (b * g, t)
  assert batch.old_logp.shape == batch.advantages.shape == (b * g, t)
  assert stats["rollout/tree_rows"] == 2 and stats["rollout/eta"] == 0.5
  assert stats["rollout/branches_opened"] > 0
  # GRPO advantages over each group of G rows: zero mean per group.
  adv_BG = np.asarray(batch.advantages)[:, 0].reshape(b, g)
  np.testing.assert_allclose(adv_BG.mean(1), 0.0, atol=1e-5)
  again, _ = exp.rollout(state.params, c.sft.steps)
  np.testing.assert_array_equal(batch.completion, again.completion)
  c.rollout.windows = (2, 1)
  with pytest.raises(ValueError, match="windows"):
    experiment.Experiment(c, str(tmp_path / "v"))
