"""Shared-prefix tree sampling and the "branch" rollout engine."""

import functools
import math
from typing import NamedTuple

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import branch_arith
from rlax_llm.models.config import ModelConfig
from rlax_llm.models.transformer import Transformer
from rlax_llm.sampling.branch import branch_generate_jit
from rlax_llm.sampling.branch import tree_sample
from rlax_llm.sampling.generate import generate_jit
from rlax_llm.sampling.samplers import SamplerConfig
from rlax_llm import experiment
from rlax_llm.core import tree_advantages as tree_adv
from rlax_llm.methods import branch as branch_lib
from rlax_llm.methods import rollouts
from rlax_llm.training.metrics import read_metrics
from rlax_llm.training.scoring import score_completions_jit

PAD, EOS, V = 0, 1, 12


class FakeCache(NamedTuple):
  """k holds each row's fed tokens (+1), v the row index that wrote a slot."""
  prompt: jax.Array  # [B] shared, never gathered
  k: jax.Array       # [B, M, T]
  v: jax.Array       # [B, M, T]


def fake_step(eos_logit=-2.0, eos_at=None):
  """A synthetic model: next-token logits from the row's cached history.

  Args:
    eos_logit: logit of EOS (-inf: never ends).
    eos_at: if set, EOS is certain after this many fed tokens.
  """
  def step_fn(tokens_BM, positions_BM, cache, index):
    del positions_BM
    b, m = tokens_BM.shape
    k = cache.k.at[:, :, index].set(tokens_BM.astype(jnp.float32) + 1)
    v = cache.v.at[:, :, index].set(
        jnp.broadcast_to(jnp.arange(m, dtype=jnp.float32), (b, m)))
    history = jnp.sum(k, axis=-1) + cache.prompt[:, None]
    bump = jax.nn.one_hot(history.astype(jnp.int32) % V, V) * 1.5
    logits = jnp.zeros((b, m, V)) + bump
    logits = logits.at[:, :, PAD].set(-1e9).at[:, :, EOS].set(eos_logit)
    if eos_at is not None:
      logits = jnp.where(index + 1 >= eos_at,
                         jnp.full_like(logits, -1e9).at[:, :, EOS].set(0.0),
                         logits)
    return logits, cache._replace(k=k, v=v)
  return step_fn


@functools.partial(jax.jit, static_argnums=(1, 2, 3),
                   static_argnames=("b", "eos_logit", "eos_at", "temperature"))
def _fake_sample(key, splits, branching, t, *, b, eos_logit, eos_at,
                 temperature):
  k0 = branching[0]
  cache = FakeCache(prompt=jnp.arange(b, dtype=jnp.float32) * 5,
                    k=jnp.zeros((b, k0, t)), v=jnp.zeros((b, k0, t)))
  first = jnp.zeros((b, V)).at[:, PAD].set(-1e9).at[:, EOS].set(-1e9)
  return tree_sample(
      fake_step(eos_logit, eos_at), first, cache, jnp.full((b,), 4), key,
      split_points=splits, branching=branching, max_new_tokens=t, eos_id=EOS,
      pad_id=PAD, sampler=SamplerConfig(temperature), return_cache=True)


def fake_sample(key, splits, branching, t, *, b=3, eos_logit=-2.0,
                eos_at=None, temperature=1.0):
  """Samples trees of the synthetic model (compiled once per setting)."""
  return jax.device_get(_fake_sample(
      key, splits, branching, t, b=b, eos_logit=eos_logit, eos_at=eos_at,
      temperature=temperature))


def leaves_per_node(branching):
  return [math.prod(branching[d + 1:]) for d in range(len(branching))]


TREE = ((0, 1, 3), (3, 2, 2), 6)


def test_tree_shape_prefix_sharing_and_kv_rows():
  splits, branching, t = TREE
  ro, cache = fake_sample(jax.random.key(0), splits, branching, t)
  b, g = 3, 12
  assert ro.tokens.shape == (b * g, t) and ro.logp.shape == (b * g, t)
  np.testing.assert_array_equal(ro.segment, [0, 1, 1, 2, 2, 2])
  assert cache.k.shape == (b, g, t)
  tokens = ro.tokens.reshape(b, g, t)
  logp = ro.logp.reshape(b, g, t)
  mask = ro.mask.reshape(b, g, t)
  ends = splits[1:] + (t,)
  for d, s in enumerate(leaves_per_node(branching)):
    for u in range(g // s):
      rows = slice(u * s, (u + 1) * s)
      # Leaves of one depth-d node share every token up to the next split.
      for x in (tokens, logp, mask):
        np.testing.assert_array_equal(
            x[:, rows, :ends[d]],
            np.broadcast_to(x[:, u * s:u * s + 1, :ends[d]], x[:, rows,
                                                              :ends[d]].shape))
  # Each leaf's KV row holds its own path (the fed tokens, +1; a finished
  # row feeds PAD) ...
  np.testing.assert_array_equal(cache.k, tokens + 1)
  # ... and the slots of segment d were written by its depth-d ancestor row.
  for i in range(t):
    d = ro.segment[i]
    want = np.arange(g) // leaves_per_node(branching)[d]
    np.testing.assert_array_equal(cache.v[:, :, i],
                                  np.broadcast_to(want, (b, g)))
  assert np.all(cache.prompt == np.arange(b) * 5)  # shared entry untouched


def test_siblings_diverge_after_split():
  splits, branching, t = (0, 2), (2, 8), 4
  ro = fake_sample(jax.random.key(1), splits, branching, t, b=4,
                   eos_logit=-1e9)[0]
  tokens = ro.tokens.reshape(4, 2, 8, t)
  # Before the split the 8 siblings are one path; right after it they are
  # drawn independently from ~10 tokens, so most sibling pairs differ.
  assert np.all(tokens[..., :2] == tokens[:, :, :1, :2])
  first = tokens[..., 2]
  same = np.mean([first[b, u, i] == first[b, u, j] for b in range(4)
                  for u in range(2) for i in range(8) for j in range(i)])
  assert same < 0.35
  assert len(np.unique(first)) >= 5


def test_generated_token_count_hand_computed():
  splits, branching, t = (0, 1, 2), (4, 2, 2), 5
  # Never EOS: 4 x 1 + 8 x 1 + 16 x 3 = 60 tokens per prompt, not 16 x 5.
  ro = fake_sample(jax.random.key(2), splits, branching, t, b=2,
                   eos_logit=-1e9)[0]
  np.testing.assert_array_equal(ro.generated, [60, 60])
  assert int(ro.decode_rows) == 60 and int(ro.steps) == 5
  assert ro.mask.sum() == 2 * 16 * 5
  # EOS certain as the 2nd token: 4 + 8 generated, all 16 leaves finished at
  # length 2 (copies of their depth-1 node); decoding stops after 2 steps.
  ro = fake_sample(jax.random.key(2), splits, branching, t, b=2, eos_at=1)[0]
  np.testing.assert_array_equal(ro.generated, [12, 12])
  np.testing.assert_array_equal(ro.lengths, np.full(32, 2))
  assert ro.finished.all() and int(ro.steps) == 2
  assert np.all(ro.tokens[:, 1] == EOS) and np.all(ro.tokens[:, 2:] == PAD)


def test_generated_count_matches_mask_by_depth():
  splits, branching, t = TREE
  ro = fake_sample(jax.random.key(3), splits, branching, t, eos_logit=0.5)[0]
  b, g = 3, 12
  mask = ro.mask.reshape(b, g, t)
  want = np.zeros(b, int)
  for i in range(t):  # each node's own segment, counted once per node
    s = leaves_per_node(branching)[ro.segment[i]]
    want += mask[:, ::s, i].sum(axis=1)
  np.testing.assert_array_equal(ro.generated, want)
  assert 0 < ro.generated.sum() < ro.mask.sum()
  assert not ro.finished.all() and ro.finished.any()


def test_logp_is_the_samplers_on_each_leaf_path():
  splits, branching, t = TREE
  ro = fake_sample(jax.random.key(4), splits, branching, t, eos_logit=0.0,
                   temperature=0.7)[0]
  b, g = 3, 12
  # Replay every leaf path independently (no tree) through the same model.
  step = fake_step(0.0)
  cache = FakeCache(prompt=jnp.arange(b, dtype=jnp.float32) * 5,
                    k=jnp.zeros((b, g, t)), v=jnp.zeros((b, g, t)))
  logits = jnp.zeros((b, g, V)).at[..., PAD].set(-1e9).at[..., EOS].set(-1e9)
  tokens = ro.tokens.reshape(b, g, t)
  want = np.zeros((b, g, t))
  for i in range(t):
    lp = jax.nn.log_softmax(logits / 0.7, axis=-1)
    want[..., i] = np.take_along_axis(np.asarray(lp), tokens[..., i:i + 1],
                                      axis=-1)[..., 0]
    logits, cache = step(jnp.asarray(tokens[..., i]), None, cache, i)
  want = np.where(ro.mask.reshape(b, g, t), want, 0)
  np.testing.assert_allclose(ro.logp.reshape(b, g, t), want, atol=1e-5)


def test_deterministic_for_a_key():
  splits, branching, t = TREE
  a = fake_sample(jax.random.key(5), splits, branching, t)[0]
  again = fake_sample(jax.random.key(5), splits, branching, t)[0]
  other = fake_sample(jax.random.key(6), splits, branching, t)[0]
  np.testing.assert_array_equal(a.tokens, again.tokens)
  np.testing.assert_array_equal(a.logp, again.logp)
  assert not np.array_equal(a.tokens, other.tokens)


def _model(seed=0, vocab=17):
  cfg = ModelConfig(vocab_size=vocab, num_layers=2, embed_dim=32, num_heads=4,
                    num_kv_heads=2, head_dim=8, mlp_dim=48, max_seq_len=32,
                    init_std=0.3)
  return nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))


def _prompts(b=3, width=5, vocab=17):
  rng = np.random.default_rng(0)
  p = rng.integers(2, vocab, (b, width)).astype(np.int32)
  m = np.ones((b, width), bool)
  m[0, :2] = False
  return p, m


def test_single_split_tree_is_independent_sampling():
  graphdef, params = _model()
  p, m = _prompts()
  key = jax.random.key(7)
  tree = branch_generate_jit(graphdef, params, p, m, key, split_points=(0,),
                             branching=(6,), max_new_tokens=7, eos_id=EOS)
  ind = generate_jit(graphdef, params, p, m, key, num_samples=6,
                     max_new_tokens=7, eos_id=EOS)
  np.testing.assert_array_equal(tree.tokens, ind.tokens)
  # Same tokens; the log-probs agree to float32 rounding (a few ulp).
  np.testing.assert_allclose(tree.logp, ind.logp, rtol=2e-6, atol=1e-6)
  np.testing.assert_array_equal(tree.generated.sum(), ind.mask.sum())
  # Same shapes, other key: the compiled program is reused.
  # pylint: disable=protected-access
  compiled = branch_generate_jit._cache_size()
  branch_generate_jit(graphdef, params, p, m, jax.random.key(9),
                      split_points=(0,), branching=(6,), max_new_tokens=7,
                      eos_id=EOS)
  assert branch_generate_jit._cache_size() == compiled


def test_model_tree_logp_equals_trainer_recomputation():
  graphdef, params = _model(1)
  p, m = _prompts()
  ro = branch_generate_jit(graphdef, params, p, m, jax.random.key(8),
                           split_points=(0, 2, 4), branching=(2, 3, 2),
                           max_new_tokens=7, eos_id=EOS,
                           sampler=SamplerConfig(0.8, top_k=6))
  g = 12
  scores = score_completions_jit(graphdef, params, np.repeat(p, g, 0),
                                 np.repeat(m, g, 0), ro.tokens, ro.mask,
                                 temperature=0.8)
  np.testing.assert_allclose(np.asarray(scores.logp), np.asarray(ro.logp),
                             atol=1e-5)
  assert int(ro.generated.sum()) < int(ro.mask.sum())


def _shrunk_config(**rollout):
  c = branch_arith.get_config()
  c.sft.steps = 10
  c.sft.batch_size = 16
  c.rl.steps = 2
  c.rl.prompts_per_step = 4
  c.eval.every = 2
  c.eval.num_problems = 16
  c.eval.num_samples = 2
  c.eval.batch_size = 16
  c.checkpoint.every = 100
  c.progress = False
  c.rollout.update(rollout)
  return c


def test_end_to_end_smoke_run(tmp_path):
  c = _shrunk_config(width_pruning="best_per_branch",
                     value_weighting="edge_softmax", depth_pruning=(2,),
                     depth_pruning_slide=True)
  summary = experiment.run(c, str(tmp_path))
  assert 0.0 <= summary["final_accuracy"] <= 1.0
  rl = [r for r in read_metrics(str(tmp_path / "metrics.jsonl"))
        if "rl/loss" in r]
  assert len(rl) == c.rl.steps
  keys = ("rollout/generated_tokens_per_completion", "rollout/token_savings",
          "rollout/distinct_per_group", "rollout/adv_abs",
          "rollout/adv_abs_depth0", "rollout/adv_abs_depth1",
          "rollout/adv_abs_depth2", "rollout/pruned_tokens", "reward/mean",
          "rl/loss")
  for r in rl:
    for k in keys:
      assert np.isfinite(r[k]), (k, r)
    # Shared prefixes: fewer tokens sampled than the leaf paths hold.
    assert r["rollout/generated_tokens_per_completion"] < r["rollout/length"]
    # The step's sampled-token count is the tree's, each prefix once.
    assert r["rollout/sampled_tokens"] == pytest.approx(
        r["rollout/generated_tokens_per_completion"]
        * c.rl.prompts_per_step * c.rl.num_samples)
    assert r["rl/logp_mismatch_max"] < 1e-4
    assert r["rollout/pruned_tokens"] > 0  # depth 1 (after the slide) drops
    # The window (2,) slides to the last split's parent, depth 1, at step 1.
    assert r["rollout/depth_pruning_shallowest"] == 1


def _engine(rl_start=10, **rollout):
  splits, branching, t = (0, 1, 2), (2, 2, 2), 6
  c = branch_arith.get_config()
  c.rollout.update(dict(split_points=splits, branching=branching, **rollout))
  st = branch_lib.parse_settings(c.rollout, num_samples=8, max_new_tokens=t)
  ctx = rollouts.RolloutContext(
      graphdef=None, mesh=None, sampler=None, tokenizer=None, task=None,
      score=None, decode=None, key=None, prompt_len=3, max_new_tokens=t,
      num_prompts=2, num_samples=8, rl_start=rl_start)
  return branch_lib.BranchRollout(ctx, st)


def _groups(b=2, g=8, t=6, seed=0):
  rng = np.random.default_rng(seed)
  mask = np.ones((b, g, t), bool)
  return rollouts.Groups(
      prompt=np.zeros((b, 3), np.int32), prompt_mask=np.ones((b, 3), bool),
      tokens=np.full((b, g, t), 2, np.int32), mask=mask,
      logp=np.where(mask, -rng.random((b, g, t)), 0).astype(np.float32),
      lengths=np.full((b, g), t), finished=np.ones((b, g), bool),
      reward=rng.random((b, g)).astype(np.float32),
      texts=np.full((b, g), "", object), stats={})


def test_engine_prunes_by_rl_step_window_and_cutoff():
  engine = _engine(depth_pruning=(2,), depth_pruning_slide=True,
                   depth_pruning_slide_interval=3, depth_pruning_stop_depth=0,
                   width_pruning="best_and_worst", pruning_cutoff_step=7)
  groups = _groups()
  edge_w = tree_adv.edge_weights((0, 1, 2), (2, 2, 2), 6)
  # RL steps (from 1) -> pruned depths: 1-2 {2}, 3-5 {1}, 6-7 {0}, 8+ none.
  for rl_step, depths, width in [(1, (2,), "best_and_worst"),
                                 (3, (1,), "best_and_worst"),
                                 (7, (0,), "best_and_worst"),
                                 (8, (), "none")]:
    engine.step = 10 + rl_step - 1
    out = engine.readvantage(groups)
    want = tree_adv.tree_advantages(
        groups.reward, groups.mask.reshape(16, 6),
        logp_NT=groups.logp.reshape(16, 6), split_points=(0, 1, 2),
        branching=(2, 2, 2), pruned_depths=depths, width_pruning=width)
    np.testing.assert_allclose(out.token_adv.reshape(16, 6), want.adv_NT,
                               rtol=1e-6)
    np.testing.assert_allclose(
        out.weights.reshape(16, 6),
        np.asarray(want.loss_mask_NT) * np.tile(edge_w, (2, 1)), rtol=1e-6)
    seg = tree_adv.segment_ids((0, 1, 2), 6)
    for d in range(3):  # the listed depth, and only it, is dropped
      assert (out.weights[..., seg == d].sum() == 0) == (d in depths)
    assert out.stats["rollout/depth_pruning_shallowest"] == (
        min(depths) if depths else -1)


def test_engine_value_weighting_reaches_the_advantages():
  groups = _groups(seed=3)
  mean = _engine().readvantage(groups)
  soft = _engine(value_weighting="edge_softmax",
                 value_alpha=2.0).readvantage(groups)
  want = tree_adv.tree_advantages(
      groups.reward, groups.mask.reshape(16, 6),
      logp_NT=groups.logp.reshape(16, 6), split_points=(0, 1, 2),
      branching=(2, 2, 2), value_weighting="edge_softmax", value_alpha=2.0)
  np.testing.assert_allclose(soft.token_adv.reshape(16, 6), want.adv_NT,
                             rtol=1e-6)
  assert not np.allclose(soft.token_adv, mean.token_adv, atol=1e-3)
  clipped = _engine(adv_clip_max=0.5).readvantage(groups)
  np.testing.assert_allclose(clipped.token_adv, np.clip(mean.token_adv, -0.5,
                                                        0.5), rtol=1e-6)
  assert np.abs(mean.token_adv).max() > 0.5  # the clip acts


def test_parse_settings_defaults_follow_the_official_code():
  st = _engine().settings
  assert st.value_weighting == "mean" and st.value_alpha == 1.0
  assert st.depth_pruning == () and not st.depth_pruning_slide
  assert st.width_pruning == "none" and st.width_pruning_ratio == 0.5
  assert st.pruning_cutoff_step == -1 and st.train_edges_once
  assert st.adv_clip_max == 5.0
  assert st.depth_pruning_stop_depth == 1  # -1: the last split's parent
  # The official comma-list form of depth_pruning.
  st = branch_lib.parse_settings(
      dict(split_points=(0, 1, 2), branching=(2, 2, 2), depth_pruning="0,2"),
      num_samples=8, max_new_tokens=6)
  assert st.depth_pruning == (0, 2)
  assert branch_lib.pruning_at(st, 1) == ((0, 2), "none")


@pytest.mark.parametrize("rollout,match", [
    (dict(branching=(4, 2, 4)), "set rl.num_samples to 32"),
    (dict(split_points=(0, 1, 9)), "max_new_tokens"),
    (dict(depth_pruning=(3,)), "distinct depths in 0..2"),
    (dict(depth_pruning=(0, 1, 2)), "drops every depth"),
    (dict(depth_pruning_slide_interval=0), "slide_interval"),
    (dict(depth_pruning_stop_depth=3), "stop_depth"),
    (dict(value_weighting="path"), "value_weighting"),
    (dict(width_pruning="top"), "width_pruning"),
    (dict(width_pruning_ratio=0.0), "width_pruning_ratio"),
    (dict(adv_clip_max=0.0), "adv_clip_max"),
])
def test_bad_tree_config_is_refused(tmp_path, rollout, match):
  c = _shrunk_config(**rollout)
  with pytest.raises(ValueError, match=match):
    experiment.Experiment(c, str(tmp_path))


def test_removed_fields_are_refused(tmp_path):
  c = _shrunk_config()
  c.rollout.width_keep = 3  # the former per-depth width pruning
  with pytest.raises(ValueError, match="does not know"):
    experiment.Experiment(c, str(tmp_path))
