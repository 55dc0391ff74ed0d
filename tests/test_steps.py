"""Update steps: exact micro-batching, no recompilation, sharded == one device."""

import dataclasses
import os
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlax_llm.methods import grpo
from rlax_llm.models.config import ModelConfig
from rlax_llm.parallel.mesh import make_mesh
from rlax_llm.training import state as state_lib
from rlax_llm.training import steps as steps_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig(vocab_size=19, num_layers=2, embed_dim=32, num_heads=4,
                  num_kv_heads=2, head_dim=8, mlp_dim=48, max_seq_len=32)


def _rl_batch(n=16, p=5, t=6, seed=0):
  rng = np.random.default_rng(seed)
  prompt = rng.integers(2, 19, (n, p)).astype(np.int32)
  pmask = np.ones((n, p), bool)
  pmask[::3, :2] = False  # some left padding
  comp = rng.integers(1, 19, (n, t)).astype(np.int32)
  lengths = rng.integers(0, t + 1, n)  # includes empty completions
  cmask = np.arange(t)[None] < lengths[:, None]
  old = np.where(cmask, rng.normal(-2.0, 0.3, (n, t)), 0).astype(np.float32)
  adv = (rng.normal(size=(n, 1)) * cmask).astype(np.float32)
  return steps_lib.RLBatch(prompt, pmask, comp, cmask, old, adv)


def _run_rl(num_microbatches, aggregation, num_minibatches=1, epochs=1):
  # One SGD update with a large rate: the parameter change is -lr * gradient,
  # far above the float32 resolution of the parameters.
  opt = optax.sgd(100.0)
  mesh = make_mesh()
  state, sh = state_lib.create_train_state(CFG, opt, mesh, seed=0)
  method = grpo(aggregation=aggregation, max_new_tokens=6)
  step = steps_lib.make_rl_step(
      state_lib.model_graphdef(CFG), opt, method.policy_loss,
      num_epochs=epochs, num_minibatches=num_minibatches,
      num_microbatches=num_microbatches)
  new_state, metrics = jax.jit(step)(state, _rl_batch())
  return state, new_state, metrics


def test_microbatching_does_not_change_the_update():
  for aggregation in ("token_mean", "seq_mean_token_mean",
                      "seq_mean_token_sum_norm"):
    old, one, m1 = _run_rl(1, aggregation)
    _, four, m4 = _run_rl(4, aggregation)
    d_one = jax.tree.map(lambda a, b: np.asarray(a - b), one.params, old.params)
    d_four = jax.tree.map(lambda a, b: np.asarray(a - b), four.params,
                          old.params)
    for a, b in zip(jax.tree.leaves(d_one), jax.tree.leaves(d_four)):
      # 2.5e-7 absorbs the float32 rounding of parameters of size ~1.
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(a).max()
                                 + 2.5e-7)
    assert np.abs(jax.tree.leaves(d_one)[0]).max() > 0  # it did update
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5, atol=1e-7)


def test_bucket_lengths_and_row_lengths_by_hand():
  assert steps_lib.bucket_lengths(256, 4) == (64, 128, 192, 256)
  assert steps_lib.bucket_lengths(100, 3) == (40, 72, 100)  # x8, last T
  assert steps_lib.bucket_lengths(6, 4) == (6,)
  mask = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1]])
  np.testing.assert_array_equal(steps_lib.row_lengths(mask), [2, 0, 3, 4])
  with pytest.raises(ValueError, match="num_buckets"):
    steps_lib.bucket_lengths(8, 0)


def test_each_micro_batch_runs_at_its_smallest_bucket():
  """minibatch_scan orders rows by length and runs each micro-batch's loss
  at the smallest bucket width that holds its longest row."""
  n, t = 12, 16
  lengths = np.array([16, 3, 0, 9, 5, 12, 1, 16, 7, 2, 8, 4])
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
  rows = {"x": jnp.asarray(mask * np.arange(1, n + 1)[:, None]),
          "weights": jnp.asarray(mask)}
  seen = []

  def loss_fn(params, micro, num_tokens, num_seqs):
    del num_seqs
    seen.append(micro["x"].shape[1])  # the traced width of each branch
    loss = params * jnp.sum(micro["x"]) / num_tokens
    return loss, ({"width": jnp.asarray(micro["x"].shape[1], jnp.float32)},
                  {"tokens": jnp.sum(micro["weights"])}, {})

  trim = lambda m, w: {k: v[:, :w] for k, v in m.items()}
  buckets = steps_lib.bucket_lengths(t, 2)  # (8, 16)
  p, _, m = steps_lib.minibatch_scan(
      (jnp.float32(1.0),), (optax.sgd(1.0).init(jnp.float32(1.0)),),
      (optax.sgd(1.0),), rows, jax.random.key(0),
      lambda prm, mic, nt, ns: loss_fn(prm[0], mic, nt, ns),
      num_epochs=1, num_minibatches=1, num_microbatches=3,
      lengths=jnp.asarray(lengths), buckets=buckets, trim=trim)
  assert sorted(set(seen)) == [8, 16]  # one compiled branch per bucket
  # Sorted lengths [0 1 2 3 | 4 5 7 8 | 9 12 16 16]: widths 8, 8, 16.
  np.testing.assert_allclose(float(m["width"][0]), (8 + 8 + 16) / 3)
  # The gradient is the whole batch's: d/dp of p * sum(x) / tokens.
  np.testing.assert_allclose(float(p[0]), 1.0 - float(rows["x"].sum()) / mask.sum(),
                             rtol=1e-6)


# One layer: bucketing acts on the rows, the depth only adds compile time.
CFG_1LAYER = dataclasses.replace(CFG, num_layers=1)


def _run_bucketed(length_buckets, *, aggregation="token_mean",
                  num_minibatches=1, num_microbatches=4, epochs=1, t=24,
                  lr=100.0, **kwargs):
  opt = optax.sgd(lr)
  state, _ = state_lib.create_train_state(CFG_1LAYER, opt, make_mesh(), seed=0)
  method = grpo(aggregation=aggregation, max_new_tokens=t)
  step = steps_lib.make_rl_step(
      state_lib.model_graphdef(CFG_1LAYER), opt, method.policy_loss,
      num_epochs=epochs, num_minibatches=num_minibatches,
      num_microbatches=num_microbatches, length_buckets=length_buckets,
      **kwargs)
  return state, *jax.jit(step)(state, _rl_batch(t=t))


def test_length_buckets_do_not_change_the_update():
  for kw in (dict(aggregation="token_mean"),
             dict(aggregation="seq_mean_token_mean", num_microbatches=2),
             # Two epochs of two updates: a smaller rate, so that the
             # second update starts from parameters that differ only by
             # rounding (at 100 the rounding grows to 0.5%).
             dict(aggregation="seq_mean_token_sum_norm", num_minibatches=2,
                  num_microbatches=2, epochs=2, lr=1.0),
             # The scoring pass before the update (old and reference
             # log-probs) is bucketed too; scoring chunks of 20 tokens
             # straddle the bucket widths.
             dict(recompute_old_logp=True, entropy_coef=0.01,
                  rollout_correction=steps_lib.RolloutCorrection(
                      "truncate", "sequence", 1.5),
                  use_ref=True, kl_coef=0.5, logprob_chunk=20,
                  ref_fn=lambda p: jax.tree.map(lambda x: 0.9 * x, p))):
    old, plain, m0 = _run_bucketed(0, **kw)
    _, bucketed, m3 = _run_bucketed(3, **kw)
    d0 = jax.tree.map(lambda a, b: np.asarray(a - b), plain.params,
                      old.params)
    d3 = jax.tree.map(lambda a, b: np.asarray(a - b), bucketed.params,
                      old.params)
    assert np.abs(jax.tree.leaves(d0)[0]).max() > 0  # it did update
    for a, b in zip(jax.tree.leaves(d0), jax.tree.leaves(d3)):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(a).max()
                                 + 2.5e-7)
    for k in ("loss", "grad_norm", "logp_mismatch_max", "kl",
              "rc_is_weight_mean", "rc_rollout_kl"):
      if k in m0:
        np.testing.assert_allclose(m0[k], m3[k], rtol=1e-5, atol=1e-7)
    if "kl_coef" in kw:  # the reference differs from the policy
      assert float(m0["kl"]) > 1e-4


def test_bucketed_map_scores_each_chunk_at_its_smallest_bucket():
  """bucketed_map equals the function on the whole batch where rows have
  tokens, 0 beyond, in the rows' order; each chunk at its smallest width."""
  n, t = 12, 16
  rng = np.random.default_rng(3)
  lengths = np.array([16, 3, 0, 9, 5, 12, 1, 16, 7, 2, 8, 4])
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
  x = rng.normal(size=(n, t)).astype(np.float32) * mask
  widths_seen = []

  def fn(rows):  # causal: a running sum per row, and a [N, T, 2] leaf
    widths_seen.append(rows["x"].shape[1])
    c = jnp.cumsum(rows["x"], axis=1) * rows["m"]
    return {"c": c, "pair": jnp.stack([c, 2 * c], axis=-1)}

  trim = lambda r, w: {k: v[:, :w] for k, v in r.items()}
  buckets = steps_lib.bucket_lengths(t, 2)  # (8, 16)
  out = jax.jit(lambda r, l: steps_lib.bucketed_map(fn, r, l, buckets, 3, trim))(
      {"x": jnp.asarray(x), "m": jnp.asarray(mask)}, jnp.asarray(lengths))
  want = np.cumsum(x, axis=1) * mask  # by hand, whole width
  np.testing.assert_allclose(np.asarray(out["c"]), want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out["pair"][..., 1]), 2 * want,
                             rtol=1e-6, atol=1e-6)
  # Sorted lengths [0 1 2 3 | 4 5 7 8 | 9 12 16 16]: two chunks fit in 8.
  assert sorted(set(widths_seen)) == [8, 16]
  with pytest.raises(ValueError, match="do not split into 5 chunks"):
    steps_lib.bucketed_map(fn, {"x": x, "m": mask}, jnp.asarray(lengths),
                           buckets, 5, trim)


def test_first_minibatch_ratio_is_one_when_old_logp_is_current():
  """With old_logp from the current policy, the first update sees ratio 1."""
  opt = optax.sgd(0.0)
  state, _ = state_lib.create_train_state(CFG, opt, make_mesh(), seed=0)
  graphdef = state_lib.model_graphdef(CFG)
  batch = _rl_batch()
  from rlax_llm.training.scoring import score_completions_jit  # pylint: disable=g-import-not-at-top
  logp = score_completions_jit(
      graphdef, state.params, batch.prompt, batch.prompt_mask,
      batch.completion, batch.completion_mask).logp
  batch = batch._replace(old_logp=np.asarray(logp))
  step = steps_lib.make_rl_step(graphdef, opt, grpo().policy_loss)
  _, m = jax.jit(step)(state, batch)
  assert float(m["logp_mismatch_max"]) < 1e-6
  np.testing.assert_allclose(float(m["ratio_mean"]), 1.0, atol=1e-6)
  assert float(m["clip_frac"]) == 0.0


def test_jitted_step_compiles_once_for_same_shapes():
  opt = optax.adam(1e-3)
  mesh = make_mesh()
  state, sh = state_lib.create_train_state(CFG, opt, mesh, seed=0)
  step = steps_lib.jit_step(steps_lib.make_rl_step(
      state_lib.model_graphdef(CFG), opt, grpo().policy_loss,
      num_minibatches=2), sh, mesh)
  state, _ = step(state, _rl_batch(seed=1))
  state, _ = step(state, _rl_batch(seed=2))
  (compiled,) = step.jitted.values()
  assert compiled._cache_size() == 1  # pylint: disable=protected-access


def test_sft_step_lowers_the_loss_on_a_fixed_batch():
  opt = optax.adam(3e-3)
  mesh = make_mesh()
  state, sh = state_lib.create_train_state(CFG, opt, mesh, seed=0)
  b = _rl_batch()
  batch = steps_lib.SFTBatch(b.prompt, b.prompt_mask, b.completion,
                             b.completion_mask)
  step = steps_lib.jit_step(steps_lib.make_sft_step(
      state_lib.model_graphdef(CFG), opt), sh, mesh)
  losses = []
  for _ in range(30):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.5 * losses[0]
  # Initial loss of a near-uniform model is close to log(V).
  assert abs(losses[0] - np.log(19)) < 0.3


_SHARDED = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8")
    import json, jax, numpy as np, optax
    from tests.test_steps import CFG, _rl_batch
    from rlax_llm.methods import grpo
    from rlax_llm.parallel.mesh import make_mesh
    from rlax_llm.training import state as state_lib, steps as steps_lib
    assert len(jax.devices()) == 8
    out = {}
    for name, shape in [("one", None), ("d8", (8, 1, 1)), ("d2f2t2", (2, 2, 2)),
                        ("f4t2", (1, 4, 2))]:
      devices = jax.devices()[:1] if shape is None else None
      mesh = make_mesh(shape or (1, 1, 1), devices)
      opt = optax.adam(1e-2)
      state, sh = state_lib.create_train_state(CFG, opt, mesh, seed=0)
      gd = state_lib.model_graphdef(CFG)
      rl = steps_lib.jit_step(steps_lib.make_rl_step(
          gd, opt, grpo().policy_loss, num_minibatches=2, mesh=mesh), sh,
          mesh)
      sft = steps_lib.jit_step(steps_lib.make_sft_step(gd, opt), sh, mesh)
      b = _rl_batch()
      state, m1 = sft(state, steps_lib.SFTBatch(*b[:4]))
      state, m2 = rl(state, b)
      leaves = jax.tree.leaves(state.params)
      specs = [str(x.sharding.spec) for x in leaves]
      out[name] = dict(sft=float(m1["loss"]), rl=float(m2["loss"]),
                       p=[np.asarray(x).ravel()[:50].tolist() for x in leaves],
                       sharded=sum(s != "PartitionSpec()" and "'" in s
                                   for s in specs))
      if name in ("one", "d2f2t2"):  # groups of 4 rows sharing a prompt
        shared = steps_lib.jit_step(steps_lib.make_rl_step(
            gd, opt, grpo().policy_loss, num_microbatches=2, mesh=mesh,
            prompt_group=4), sh, mesh)
        g = b._replace(prompt=np.repeat(b.prompt[::4], 4, 0),
                       prompt_mask=np.repeat(b.prompt_mask[::4], 4, 0))
        state, m3 = shared(state, g)
        out[name]["shared"] = float(m3["loss"])
        out[name]["p_shared"] = [np.asarray(x).ravel()[:50].tolist()
                                 for x in jax.tree.leaves(state.params)]
    print(json.dumps(out))
""")


def test_sharded_steps_match_one_device(forks):
  proc = forks.run([sys.executable, "-c", _SHARDED], cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  import json  # pylint: disable=g-import-not-at-top
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  ref = out["one"]
  assert ref["sharded"] == 0
  for name in ("d8", "d2f2t2", "f4t2"):
    np.testing.assert_allclose(out[name]["sft"], ref["sft"], rtol=1e-5)
    np.testing.assert_allclose(out[name]["rl"], ref["rl"], rtol=1e-4,
                               atol=1e-6)
    for a, b in zip(out[name]["p"], ref["p"]):
      np.testing.assert_allclose(a, b, atol=2e-5)
  # With fsdp/tensor axes, weights really are split across devices.
  assert out["d2f2t2"]["sharded"] > 5 and out["f4t2"]["sharded"] > 5
  # The shared-prompt update (a batch of four groups) on the split mesh.
  np.testing.assert_allclose(out["d2f2t2"]["shared"], ref["shared"],
                             rtol=1e-4, atol=1e-6)
  for a, b in zip(out["d2f2t2"]["p_shared"], ref["p_shared"]):
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_sft_step_losses_are_the_core_objectives():
  """Each supervised objective equals the core function on recomputed logits."""
  from rlax_llm.core import logprobs, objectives  # pylint: disable=g-import-not-at-top
  from rlax_llm.training.scoring import completion_logits  # pylint: disable=g-import-not-at-top
  opt = optax.sgd(0.0)
  state, _ = state_lib.create_train_state(CFG, opt, make_mesh(), seed=0)
  gd = state_lib.model_graphdef(CFG)
  b = _rl_batch()
  batch = steps_lib.SFTBatch(b.prompt, b.prompt_mask, b.completion,
                             b.completion_mask)
  logits = jax.jit(lambda p, *a: completion_logits(gd, p, *a))(state.params,
                                                               *batch)
  logp = logprobs.token_logprobs(logits, batch.completion)
  rng = state_lib.step_rng(state, 2)
  want = {
      "cross_entropy": objectives.sft_loss(logp, batch.completion_mask)[0],
      "dft": objectives.dft_loss(logp, batch.completion_mask)[0],
      "otr": objectives.otr_loss(logits, batch.completion,
                                 batch.completion_mask, rng)[0],
      "otr_exact": objectives.otr_exact_loss(logits, batch.completion,
                                             batch.completion_mask)[0],
  }
  for name, fn in steps_lib.SUPERVISED_LOSSES.items():
    step = jax.jit(steps_lib.make_sft_step(gd, opt, loss_fn=fn))
    _, m = step(state, batch)
    np.testing.assert_allclose(float(m["loss"]), float(want[name]), rtol=1e-5)
  # The cross-entropy is the mean NLL of the valid tokens.
  nll = -np.sum(np.asarray(logp) * b.completion_mask) / b.completion_mask.sum()
  np.testing.assert_allclose(float(want["cross_entropy"]), nll, rtol=1e-5)


def test_chunked_scoring_gives_the_same_update():
  """logprob_chunk > 0 never builds [N, T, V] yet updates identically."""
  opt = optax.sgd(100.0)
  graphdef = state_lib.model_graphdef(CFG)
  outs = []
  for chunk, vchunk in ((0, None), (8, None), (16, 5)):
    state, _ = state_lib.create_train_state(CFG, opt, make_mesh(), seed=0)
    step = steps_lib.make_rl_step(graphdef, opt, grpo().policy_loss,
                                  temperature=0.7, logprob_chunk=chunk,
                                  vocab_chunk=vchunk)
    new, m = jax.jit(step)(state, _rl_batch())
    outs.append((state, new, m))
  base_old, base_new, base_m = outs[0]
  d0 = jax.tree.map(lambda a, b: np.asarray(a - b), base_new.params,
                    base_old.params)
  scale = max(np.abs(x).max() for x in jax.tree.leaves(d0))
  assert scale > 0
  for old, new, m in outs[1:]:
    d = jax.tree.map(lambda a, b: np.asarray(a - b), new.params, old.params)
    for a, b in zip(jax.tree.leaves(d0), jax.tree.leaves(d)):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale + 2.5e-7)
    np.testing.assert_allclose(m["loss"], base_m["loss"], rtol=1e-5)
    np.testing.assert_allclose(m["entropy"], base_m["entropy"], rtol=1e-5)


def test_every_supervised_objective_learns():
  """Cross-entropy, DFT and OTR each lower the held NLL of a fixed batch."""
  b = _rl_batch()
  batch = steps_lib.SFTBatch(b.prompt, b.prompt_mask, b.completion,
                             b.completion_mask)
  results = {}
  for name in ("cross_entropy", "dft", "otr"):
    opt = optax.adam(3e-3)
    mesh = make_mesh()
    state, sh = state_lib.create_train_state(CFG, opt, mesh, seed=0)
    step = steps_lib.jit_step(steps_lib.make_sft_step(
        state_lib.model_graphdef(CFG), opt,
        loss_fn=steps_lib.SUPERVISED_LOSSES[name]), sh, mesh)
    nll = []
    for _ in range(40):
      state, m = step(state, batch)
      nll.append(float(m["nll"]))
    results[name] = (nll[0], nll[-1])
  for name, (first, last) in results.items():
    assert last < 0.8 * first, (name, results)
