"""LATR: branching, KV-row copies, lookahead pruning, switch, engine smoke run.

The tree is driven by a synthetic `step_fn` whose next-token probabilities are
a Python function of each row's token history. The history lives in the fake
cache's `k` (row g's token at index i), so a branch that copies its parent's
cache rows also inherits its history; `v` stamps every written row with the
id of the slot that wrote it, which shows where a row's cache came from.
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
from rlax_llm.training.scoring import score_completions

PAD, EOS = 0, 1
V = 6  # pad, eos, tokens 2..5
# Default: end now.
P_END = (0.0, 0.91, 0.03, 0.03, 0.03, 0.0)


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


def _run(table_fn, *, b=1, g=4, s=4, t=3, key=0, sampler=SamplerConfig(1.0),
         jit=True, **tree):
  step_fn, first, cache = _synthetic(table_fn, b, g, t)
  fn = _decode_jit if jit else latr.latr_decode
  ro, cache = fn(step_fn, first, cache, jnp.zeros(b, jnp.int32),
                 jax.random.key(key), num_tree=s, max_new_tokens=t,
                 eos_id=EOS, pad_id=PAD, sampler=sampler,
                 tree=latr.TreeConfig(**tree))
  return jax.device_get(ro), jax.device_get(cache)


def _assert_plain_sample(table_fn, ro, *, row, key, b, g, t):
  """Row `row` (of prompt 0) holds sample_token's draws at every step."""
  step_fn, first, cache = _synthetic(table_fn, b, g, t)
  logits = first
  tokens = ro.tokens.reshape(b, g, t)
  for i in range(int(ro.lengths.reshape(b, g)[0, row])):
    want = np.asarray(sample_token(jax.random.fold_in(jax.random.key(key), i),
                                   logits.reshape(b * g, V)).token)
    assert tokens[0, row, i] == want[row], (row, i)
    logits, cache = step_fn(jnp.asarray(tokens[:, :, i]), None, cache, i)


# One compilation per (synthetic table, sizes, settings).
_decode_jit = jax.jit(latr.latr_decode, static_argnums=(0,), static_argnames=(
    "num_tree", "max_new_tokens", "eos_id", "pad_id", "sampler", "tree",
    "gather_fn"))


# -- branching ------------------------------------------------------------------
def _table_branching(b, h):
  del b
  return {(): (0, 0, .30, .25, .24, .21),   # 3 candidates, 2 allowed
          (2,): (0, 0, .50, .40, .10, 0),   # candidate 3
          (3,): (0, 0, .12, .50, .24, .14),  # .24 too far, .14 too small
          (4,): (0, 0, .35, .05, .45, .15),  # candidate 2, but no free slot
          }.get(h, P_END)


def test_branches_open_where_thresholds_allow_within_budget():
  ro, cache = _run(_table_branching, tau_abs=0.15, tau_rel=0.25,
                   tau_ed=0.0, windows=(8,))
  np.testing.assert_array_equal(ro.tokens, [[2, 2, EOS], [3, 3, EOS],
                                            [4, 4, EOS], [2, 3, EOS]])
  np.testing.assert_array_equal(ro.parent, [-1, 0, 0, 0])
  np.testing.assert_array_equal(ro.branch_step, [-1, 0, 0, 1])
  np.testing.assert_array_equal(ro.opened, [3])
  np.testing.assert_array_equal(ro.pruned, [0])
  np.testing.assert_array_equal(ro.lengths, [3, 3, 3, 3])
  assert ro.finished.all() and not ro.copied.any()
  # Stored log-probs are the policy's: log p(token | history).
  want = np.log([[.30, .50, .91], [.25, .50, .91], [.24, .45, .91],
                 [.30, .40, .91]]) * ro.mask
  np.testing.assert_allclose(ro.logp, want, rtol=1e-5, atol=1e-6)
  # KV rows: a child's rows before its branch step were written by its parent
  # (stamp 1 = slot 0) and copied; later rows are its own.
  np.testing.assert_array_equal(cache.v[0][0], [[1, 1, 1], [2, 2, 2],
                                                [3, 3, 3], [1, 4, 4]])
  np.testing.assert_array_equal(cache.k[0][0, 3], [2, 3, EOS])


def test_budget_of_one_slot_is_plain_greedy_and_rest_plain_samples():
  ro, _ = _run(_table_branching, g=4, s=1, tau_ed=0.0, windows=(8,),
               sampler=SamplerConfig(0.0))
  assert ro.opened[0] == 0
  np.testing.assert_array_equal(ro.tokens[0], [2, 2, EOS])


def test_max_branches_per_step_and_thresholds_are_respected():
  ro, _ = _run(_table_branching, g=4, s=4, tau_ed=0.0, windows=(8,),
               max_branches_per_step=1)
  # One child per branch and step: token 3 at step 0, then slot 0's
  # candidate 3 at step 1 takes slot 2 and slot 1 opens nothing (.24 is
  # .26 below .50); the last slot stays a reserve row: a plain sample.
  np.testing.assert_array_equal(ro.parent, [-1, 0, 0, -1])
  np.testing.assert_array_equal(ro.branch_step, [-1, 0, 1, -1])
  np.testing.assert_array_equal(ro.tokens[:3], [[2, 2, EOS], [3, 3, EOS],
                                                [2, 3, EOS]])
  assert not ro.copied.any()
  _assert_plain_sample(_table_branching, ro, row=3, key=0, b=1, g=4, t=3)
  # tau_abs = .26: nothing at step 0; at step 1 slot 0's .40 opens slot 1.
  ro, _ = _run(_table_branching, tau_abs=0.26, tau_ed=0.0, windows=(8,))
  np.testing.assert_array_equal(ro.opened, [1])
  np.testing.assert_array_equal(ro.branch_step, [-1, 1, -1, -1])
  np.testing.assert_array_equal(ro.tokens[1], [2, 3, EOS])
  # tau_rel = .065: .25 and .24 are within it of .30 (.21 is not); at step 1
  # every candidate is .10 or more below its top-1.
  ro, _ = _run(_table_branching, tau_abs=0.20, tau_rel=0.065, tau_ed=0.0,
               windows=(8,))
  np.testing.assert_array_equal(ro.branch_step, [-1, 0, 0, -1])


# -- pruning ----------------------------------------------------------------------
def _table_pruning(b, h):
  del b
  return {(): (0, 0, .50, .40, .10, 0),        # slot 1 <- 3
          (2,): (0, 0, 0, 0, 1, 0),
          (3,): (0, 0, .05, .05, .50, .40),    # slot 2 <- child of slot 1
          (2, 4): (0, 0, 0, 0, 0, 1),
          (3, 4): (0, 0, 0, 0, 0, 1),           # echoes the parent: 4, 5
          (3, 5): (0, 0, 1, 0, 0, 0),
          (2, 4, 5): (0, 0, .50, .45, .05, 0),  # slot 1 <- 3 again
          (2, 4, 5, 2): P_END,
          (2, 4, 5, 3): (0, 0, 0, 0, 1, 0),
          (3, 4, 5): (0, 0, 0, 0, 0, 1),
          (3, 5, 2): (0, 0, 0, 1, 0, 0),
          (3, 4, 5, 5): P_END, (3, 5, 2, 3): P_END,
          }.get(h, P_END)


def test_echoing_branch_is_pruned_with_its_descendants():
  ro, cache = _run(_table_pruning, t=5, tau_ed=0.5, windows=(2,))
  # Step 2: slot 1 (opened at 0) wrote 4, 5 like its parent -> NED 0 < 0.5:
  # it and slot 2 (its child) are pruned. Step 3: slot 1 is reused.
  np.testing.assert_array_equal(ro.opened, [3])
  np.testing.assert_array_equal(ro.pruned, [2])
  np.testing.assert_array_equal(ro.tokens[:2], [[2, 4, 5, 2, EOS],
                                                [2, 4, 5, 3, 4]])
  np.testing.assert_array_equal(ro.parent, [-1, 0, -1, -1])
  np.testing.assert_array_equal(ro.branch_step, [-1, 3, -1, -1])
  # The emptied slot 2 becomes a copy of a live branch at the end; slot 3,
  # never claimed, is a reserve row's plain sample.
  assert ro.copied.tolist() == [False, False, True, False]
  np.testing.assert_array_equal(ro.tokens[2], ro.tokens[0])
  _assert_plain_sample(_table_pruning, ro, row=3, key=0, b=1, g=4, t=5)
  # The reused slot's cache: rows 0-2 copied from slot 0, then its own.
  np.testing.assert_array_equal(cache.v[0][0, 1], [1, 1, 1, 2, 2])


def test_without_pruning_the_branches_survive():
  ro, _ = _run(_table_pruning, t=5, tau_ed=0.0, windows=(2,))
  np.testing.assert_array_equal(ro.pruned, [0])
  np.testing.assert_array_equal(ro.tokens[:3], [[2, 4, 5, 2, EOS],
                                                [3, 4, 5, 5, EOS],
                                                [3, 5, 2, 3, EOS]])
  np.testing.assert_array_equal(ro.parent[:3], [-1, 0, 1])
  # A window of 1 sees 4 vs 4 after slot 1's branch token: at step 1 slot 1
  # opens slot 2 and is then pruned with it; slot 1 is reused at step 3 and
  # survives (4 vs EOS at step 4).
  ro, _ = _run(_table_pruning, t=5, tau_ed=0.5, windows=(1,))
  np.testing.assert_array_equal(ro.branch_step[:2], [-1, 3])
  np.testing.assert_array_equal(ro.opened, [3])
  np.testing.assert_array_equal(ro.pruned, [2])


# -- switch to sampling -------------------------------------------------------------
def _table_switch(b, h):
  if len(h) >= 2:
    return (0, 0, .25, .25, .25, .25) if b == 0 else (0, 0, .1, .2, .3, .4)
  return {(): (0, 0, .50, .40, .10, 0), (2,): (0, 0, 1, 0, 0, 0),
          (3,): (0, 0, 0, 1, 0, 0)}.get(h, (0, 0, .25, .25, .25, .25))


def test_settled_tree_switches_to_sampling_with_the_sampler():
  b, g, t = 2, 3, 4
  ro, _ = _run(_table_switch, b=b, g=g, s=2, t=t, tau_ed=0.5, windows=(1,),
               key=3)
  # Slot 1 opens at 0, passes its window at step 1 (3 vs 2): the tree is full
  # and settled, so sampling starts at step 2.
  np.testing.assert_array_equal(ro.switch_step, [2, 2])
  np.testing.assert_array_equal(ro.tokens.reshape(b, g, t)[:, :2, :2],
                                [[[2, 2], [3, 3]]] * 2)
  # Every row at steps >= 2 (and the plain row 2 throughout) is drawn by
  # sample_token with fold_in(key, step) from the row's logits.
  key = jax.random.key(3)
  step_fn, first, cache = _synthetic(_table_switch, b, g, t)
  logits = first
  tokens = ro.tokens.reshape(b, g, t)
  for i in range(t):
    want = np.asarray(sample_token(jax.random.fold_in(key, i),
                                   logits.reshape(b * g, V)).token)
    got = tokens[:, :, i].reshape(-1)
    rows = [r for r in range(b * g) if i >= 2 or r % g == 2]
    np.testing.assert_array_equal(got[rows], want[rows])
    logits, cache = step_fn(jnp.asarray(tokens[:, :, i]), None, cache, i)


def test_branch_steps_caps_the_branching_phase_and_fills_free_slots():
  ro, _ = _run(_table_switch, b=1, g=4, s=4, t=4, tau_ed=0.5, windows=(1,),
               branch_steps=1)
  np.testing.assert_array_equal(ro.switch_step, [1])
  # Slot 1 opened at 0; slots 2, 3 were never claimed: reserve rows, sampled
  # from the start, not copies.
  assert not ro.copied.any()
  np.testing.assert_array_equal(ro.tokens[:2, 0], [2, 3])
  np.testing.assert_array_equal(ro.tokens[:2, 1], [2, 3])  # peaked
  for row in (2, 3):
    _assert_plain_sample(_table_switch, ro, row=row, key=0, b=1, g=4, t=4)
  # Slots emptied by pruning are filled at the switch with copies: the echo
  # of _table_pruning empties slots 1 and 2 at step 2; the switch at step 3
  # fills them from the one live branch (slot 0), then all rows sample.
  ro, _ = _run(_table_pruning, t=5, tau_ed=0.5, windows=(2,), branch_steps=3)
  np.testing.assert_array_equal(ro.switch_step, [3])
  assert ro.copied.tolist() == [False, True, True, False]
  np.testing.assert_array_equal(ro.tokens[:3, :3], [[2, 4, 5]] * 3)
  np.testing.assert_array_equal(ro.parent, [-1, -1, -1, -1])


def test_unclaimed_tree_capacity_adds_distinct_samples():
  """No hesitation anywhere: the tree is the greedy row + G - 1 samples."""
  def flat(b, h):  # peaked enough that nothing passes tau_rel
    del b
    return (0, .05, .60, .15, .10, .10) if len(h) < 3 else P_END
  ro, _ = _run(flat, g=8, s=8, t=4, key=5, tau_rel=0.25, windows=(1,))
  np.testing.assert_array_equal(ro.opened, [0])
  np.testing.assert_array_equal(ro.tokens[0][:3], [2, 2, 2])  # greedy
  assert not ro.copied.any()
  # Copies of the greedy row would leave one distinct completion.
  assert len({tuple(r) for r in ro.tokens}) >= 4
  for row in range(1, 8):
    _assert_plain_sample(flat, ro, row=row, key=5, b=1, g=8, t=4)


def test_same_key_same_rollout_other_key_differs():
  kw = dict(b=2, g=8, s=4, t=4, tau_ed=0.5, windows=(1,))
  a, _ = _run(_table_switch, key=1, **kw)
  again, _ = _run(_table_switch, key=1, **kw)
  other, _ = _run(_table_switch, key=2, **kw)
  for x, y in zip(a, again):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a.tokens, other.tokens)


# -- edit distance ---------------------------------------------------------------------
def _levenshtein(a, b):
  d = list(range(len(b) + 1))
  for i, x in enumerate(a, 1):
    prev, d[0] = d[0], i
    for j, y in enumerate(b, 1):
      prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (x != y))
  return d[-1]


def test_edit_distance_hand_cases():
  a = np.array([[1, 2, 3, 0], [1, 2, 3, 4], [5, 5, 5, 5], [1, 2, 0, 0]])
  b = np.array([[1, 3, 0, 0], [2, 3, 4, 1], [5, 5, 5, 5], [3, 4, 0, 0]])
  la, lb = np.array([3, 4, 4, 0]), np.array([2, 4, 2, 2])
  np.testing.assert_array_equal(latr.edit_distance(a, b, la, lb), [1, 2, 2, 2])
  np.testing.assert_allclose(latr.normalized_edit_distance(a, b, la, lb),
                             [1 / 3, 2 / 4, 2 / 4, 2 / 2])
  z = np.zeros((1, 3), int)
  assert float(latr.normalized_edit_distance(z, z, [0], [0])[0]) == 0.0


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_edit_distance_matches_python_reference(data):
  n, w = 8, 7  # fixed shapes: one compilation; lengths vary
  tok = st.lists(st.integers(0, 3), min_size=w, max_size=w)
  a = np.array(data.draw(st.lists(tok, min_size=n, max_size=n)))
  b = np.array(data.draw(st.lists(tok, min_size=n, max_size=n)))
  la = np.array(data.draw(st.lists(st.integers(0, w), min_size=n,
                                   max_size=n)))
  lb = np.array(data.draw(st.lists(st.integers(0, w), min_size=n,
                                   max_size=n)))
  want = [_levenshtein(a[i, :la[i]], b[i, :lb[i]]) for i in range(n)]
  np.testing.assert_array_equal(_edit_jit(a, b, la, lb), want)


_edit_jit = jax.jit(latr.edit_distance)


# -- eta schedule and validation --------------------------------------------------------
def test_eta_schedule_values():
  step = lambda s: latr.eta_schedule(s, eta0=0.5, eta_min=0.125,  # pylint: disable=g-long-lambda
                                     decay_every=100, decay_rate=0.5)
  assert [step(s) for s in (0, 99, 100, 199, 200, 300, 1000)] == [
      0.5, 0.5, 0.25, 0.25, 0.125, 0.125, 0.125]
  lin = lambda s: latr.eta_schedule(s, eta0=1.0, eta_min=0.2,  # pylint: disable=g-long-lambda
                                    decay_every=100, kind="linear")
  np.testing.assert_allclose([lin(s) for s in (0, 25, 50, 100, 400)],
                             [1.0, 0.8, 0.6, 0.2, 0.2])
  assert latr.eta_schedule(500, eta0=0.7) == 0.7
  assert [latr.tree_rows(16, e) for e in (0.5, 0.25, 0.125, 0.03, 1.0)] == [
      8, 4, 2, 0, 16]
  assert latr.tree_rows(4, 0.375) == 2  # 1.5 rounds up
  with pytest.raises(ValueError, match="'step' or 'linear'"):
    latr.eta_schedule(3, eta0=0.5, decay_every=1, kind="cosine")


def test_bad_settings_are_refused_with_the_fix():
  with pytest.raises(ValueError, match="strictly increasing"):
    latr.TreeConfig(windows=(3, 2)).validate()
  with pytest.raises(ValueError, match="tau_ed"):
    latr.TreeConfig(tau_ed=1.5).validate()
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
  tree = latr.TreeConfig(tau_abs=0.05, tau_rel=0.5, tau_ed=0.3, windows=(1, 3),
                         branch_steps=5)
  ro = jax.device_get(latr.latr_generate_jit(
      graphdef, params, p, m, jax.random.key(0), num_samples=g, num_tree=4,
      max_new_tokens=t, eos_id=EOS, sampler=SamplerConfig(0.8), tree=tree))
  assert ro.opened.sum() >= 3  # the test exercises branching
  scores = score_completions(graphdef, params, np.repeat(p, g, 0),
                             np.repeat(m, g, 0), ro.tokens, ro.mask,
                             temperature=0.8)
  np.testing.assert_allclose(np.asarray(scores.logp), ro.logp, atol=2e-5)


# -- the engine, end to end ------------------------------------------------------------
@pytest.mark.slow
def test_latr_config_runs_through_the_experiment(tmp_path):
  from configs import latr_arith  # pylint: disable=g-import-not-at-top
  from rlax_llm.training import experiment  # pylint: disable=g-import-not-at-top
  from rlax_llm.training.metrics import read_metrics  # pylint: disable=g-import-not-at-top
  c = latr_arith.get_config()
  c.sft.steps, c.sft.batch_size = 12, 16
  c.rl.steps, c.rl.prompts_per_step, c.rl.num_samples = 3, 4, 8
  c.rollout.eta_decay_every = 2  # eta 0.5, 0.5, 0.25 -> S = 4, 4, 2
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
  from rlax_llm.training import experiment  # pylint: disable=g-import-not-at-top
  from rlax_llm.training import state as state_lib  # pylint: disable=g-import-not-at-top
  c = latr_arith.get_config()
  c.rl.prompts_per_step, c.rl.num_samples = 3, 4
  c.rollout.tau_abs, c.rollout.tau_rel = 0.01, 0.9  # branch readily
  exp = experiment.Experiment(c, str(tmp_path / "w"))
  state, _ = state_lib.create_train_state(exp.model_cfg, exp.sft_opt,
                                          exp.mesh, seed=0)
  batch, stats = exp.engine.rollout(state.params, c.sft.steps)
  b, g, t = 3, 4, exp.max_new_tokens
  assert batch.completion.shape == (b * g, t)
  assert batch.old_logp.shape == batch.advantages.shape == (b * g, t)
  assert stats["rollout/tree_rows"] == 2 and stats["rollout/eta"] == 0.5
  assert stats["rollout/branches_opened"] > 0
  # GRPO advantages over each group of G rows: zero mean per group.
  adv_BG = np.asarray(batch.advantages)[:, 0].reshape(b, g)
  np.testing.assert_allclose(adv_BG.mean(1), 0.0, atol=1e-5)
  again, _ = exp.engine.rollout(state.params, c.sft.steps)
  np.testing.assert_array_equal(batch.completion, again.completion)
  c.rollout.windows = (2, 1)
  with pytest.raises(ValueError, match="windows"):
    experiment.Experiment(c, str(tmp_path / "v"))
