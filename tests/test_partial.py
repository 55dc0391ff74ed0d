"""APRIL partial rollouts: continuation, stopping rule, buffer, engine, resume."""

import json

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import april_arith
from rlax_llm.methods import april
from rlax_llm.models.config import ModelConfig
from rlax_llm.models.transformer import Transformer
from rlax_llm.sampling import partial as partial_lib
from rlax_llm.sampling.generate import generate_jit
from rlax_llm.sampling.samplers import SamplerConfig
from rlax_llm import experiment
from rlax_llm.training.metrics import read_metrics

V, EOS, PAD = 24, 1, 0
B, G, T, P = 3, 2, 16, 5


@pytest.fixture(scope="module")
def tiny():
  cfg = ModelConfig(vocab_size=V, num_layers=2, embed_dim=32, num_heads=4,
                    num_kv_heads=2, head_dim=8, mlp_dim=64, max_seq_len=32,
                    init_std=0.2)
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
  return graphdef, params


def _prompts(seed=0):
  rng = np.random.default_rng(seed)
  prompt = rng.integers(2, V, (B, P)).astype(np.int32)
  mask = np.ones((B, P), bool)
  mask[0, :2] = False  # left padding
  mask[2, 4:] = False  # right padding
  prompt[~mask] = PAD
  return prompt, mask


# -- continuation equals one-shot decoding -------------------------------------


@pytest.mark.parametrize("packed,width", [(False, T), (True, T), (True, 8)])
def test_continuation_logits_equal_full_forward(tiny, packed, width):
  """Row by row or packed into lanes, the same continuation."""
  graphdef, params = tiny
  model = nnx.merge(graphdef, params)
  prompt, pmask = _prompts()
  rng = np.random.default_rng(1)
  tokens = rng.integers(2, V, (B, G, T)).astype(np.int32)
  length = np.array([[0, 3], [5, 1], [7, 2]], np.int32)
  tokens[np.arange(T) >= length[..., None]] = PAD
  lanes = None
  if packed:
    # Prompt lengths 3, 5, 4: segments 0, 6 | 10, 6 | 11, 6. Longest first,
    # lanes of P + 16 = 21 take [11, 10] [6, 6, 6]; lanes of P + 8 = 13
    # take [11] [10] [6, 6] [6].
    lanes = partial_lib.prefill_lanes(length, pmask.sum(-1), P + width)
    assert lanes == {T: 2, 8: 4}[width]
  cont = april.transformer_continuation(graphdef, params, T, lanes=lanes)
  # Compiled, as the engine runs them (op by op, every operation of the
  # model would compile on its own).
  logits, cache = jax.jit(cont.prefill)(
      jnp.asarray(prompt), jnp.asarray(pmask),
      jnp.asarray(tokens[..., :width]), jnp.asarray(length))
  nxt = rng.integers(2, V, (B, G)).astype(np.int32)
  logits2, _ = jax.jit(cont.step)(jnp.asarray(nxt), jnp.asarray(length),
                                  cache)
  # Reference: one causal pass over [valid prompt | partial | next token] per
  # row, right-padded to a common length (padding is masked).
  s = P + T + 1
  seq = np.zeros((B, G, s), np.int32)
  ends = np.zeros((B, G), np.int32)
  for b in range(B):
    for g in range(G):
      row = np.concatenate([prompt[b][pmask[b]], tokens[b, g, :length[b, g]],
                            [nxt[b, g]]])
      seq[b, g, :len(row)] = row
      ends[b, g] = len(row)
  full = np.asarray(jax.jit(model)(
      jnp.asarray(seq.reshape(B * G, s)), None,
      jnp.asarray(np.arange(s) < ends.reshape(-1, 1)))).reshape(B, G, s, V)
  for b in range(B):
    for g in range(G):
      e = ends[b, g]
      # Next-token logits after the partial completion, then after one more.
      np.testing.assert_allclose(logits[b, g], full[b, g, e - 2], atol=2e-5,
                                 rtol=1e-5)
      np.testing.assert_allclose(logits2[b, g], full[b, g, e - 1], atol=2e-5,
                                 rtol=1e-5)


def test_resumed_greedy_rows_equal_one_shot_generation(tiny):
  graphdef, params = tiny
  prompt, pmask = _prompts()
  greedy = SamplerConfig(temperature=0.0)
  ref = generate_jit(graphdef, params, prompt, pmask, jax.random.key(0),
                     num_samples=G, max_new_tokens=T, eos_id=EOS, pad_id=PAD,
                     sampler=greedy)
  tokens = np.asarray(ref.tokens).reshape(B, G, T)
  logp = np.asarray(ref.logp).reshape(B, G, T)
  full_len = np.asarray(ref.lengths).reshape(B, G)
  cut = np.minimum(np.array([[0, 2], [4, 1], [3, 6]]), full_len)
  keep = np.arange(T) < cut[..., None]
  state = partial_lib.PartialState(
      prompt, pmask, np.where(keep, tokens, PAD), np.where(keep, logp, 0.0),
      np.where(keep, 0, -1), cut, np.zeros((B, G), bool),
      np.zeros((B, G), bool))
  assert april.prefill_sizes(state, T) == dict(prefill_len=8,
                                                prefill_lanes=4)
  out, steps = april.partial_generate(
      graphdef, params, state, jax.random.key(5), B, 1, eos_id=EOS,
      pad_id=PAD, sampler=greedy)
  np.testing.assert_array_equal(out.tokens, tokens)
  np.testing.assert_allclose(out.logp, logp, atol=1e-5)
  np.testing.assert_array_equal(out.length, full_len)
  np.testing.assert_array_equal(out.eos,
                                np.asarray(ref.finished).reshape(B, G))
  # Old tokens keep version 0; the continued ones carry version 1.
  np.testing.assert_array_equal(
      out.version, np.where(keep, 0, np.where(np.arange(T) < full_len[..., None],
                                              1, -1)))
  assert int(steps) == int(np.max(full_len - cut))


def test_pack_lanes_hand_computed():
  # Lanes of 10, longest first: 7 -> L0, 6 -> L1, 5 -> L2, 4 -> L1 (behind
  # 6), 3 -> L0 (behind 7); the empty segment takes no lane.
  lane, off = partial_lib.pack_lanes([4, 5, 0, 3, 6, 7], 10)
  np.testing.assert_array_equal(lane, [1, 2, -1, 0, 1, 0])
  np.testing.assert_array_equal(off, [6, 0, 0, 7, 0, 0])
  assert partial_lib.prefill_lanes(np.zeros((2, 2)), [3, 3], 10) == 0
  # Segments 3+4, 3+5 | 2+1, 2+7: [9] [8] [7, 3] -> 3 lanes, rounded up to 4.
  assert partial_lib.prefill_lanes([[4, 5], [1, 7]], [3, 2], 10) == 4
  with pytest.raises(ValueError, match="more than a lane"):
    partial_lib.pack_lanes([3, 11], 10)
  # Ended rows are not continued: they need no lanes.
  np.testing.assert_array_equal(
      partial_lib.resumed_length([[4, 5]], [[True, False]]), [[0, 5]])
  # The jitted packing inside the continuation places segments the same way.
  seg = np.random.default_rng(0).integers(0, 9, 40)
  want_lane, want_off = partial_lib.pack_lanes(seg, 12)
  lanes = int(want_lane.max()) + 1
  got_lane, got_off = jax.jit(april._pack_lanes, static_argnums=(1, 2))(  # pylint: disable=protected-access
      jnp.asarray(seg), 12, lanes)
  np.testing.assert_array_equal(np.where(want_lane < 0, lanes, want_lane),
                                got_lane)
  np.testing.assert_array_equal(np.asarray(got_off)[seg > 0],
                                want_off[seg > 0])


def test_prefill_length_buckets():
  assert partial_lib.prefill_length(np.zeros((2, 3)), 128) == 0
  assert partial_lib.prefill_length(np.array([[1, 0]]), 128) == 8
  assert partial_lib.prefill_length(np.array([[9, 3]]), 128) == 16
  assert partial_lib.prefill_length(np.array([[16]]), 128) == 16
  assert partial_lib.prefill_length(np.array([[100]]), 100) == 100


def test_benchmark_counts_every_finished_rollout():
  from experiments import bench_april  # pylint: disable=g-import-not-at-top
  sync, apr, ratio = bench_april.run(dict(steps=3, prompts=2, samples=2,
                                          max_new_tokens=16, median_length=3,
                                          repeats=2))
  for r in (sync, apr):
    assert r["finished_rollouts"] == 3 * 2 * 2
    assert len(r["seconds_all"]) == 2
    assert r["seconds"] == min(r["seconds_all"])  # median of 2: the lower
  assert sync["staleness_mean"] == 0.0
  # Synchronous steps wait for the longest row of their fresh groups.
  want = np.mean([max(min(int(n), 16) for i in range(2) for n in
                      bench_april._lengths(f"{s}/{i}", 2, 3, 1.2, 0))
                  for s in (1, 2, 3)])
  assert sync["decode_steps_per_step"] == want
  assert ratio["speedup"] == pytest.approx(
      apr["rollouts_per_s"] / sync["rollouts_per_s"])


# -- the stopping rule, on a synthetic model ------------------------------------


def _uniform_model():
  """Logits 0 everywhere; the cache is unused."""
  def prefill(prompt_BP, prompt_mask_BP, tokens_BGT, length_BG):
    del prompt_BP, prompt_mask_BP
    return jnp.zeros(tokens_BGT.shape[:2] + (V,)), jnp.zeros(())

  def step(tokens_BG, index_BG, cache):
    del index_BG
    return jnp.zeros(tokens_BG.shape + (V,)), cache

  return partial_lib.ContinuationModel(prefill, step)


def _synthetic_generate(target_len_fn):
  """generate(state, target) with EOS forced at target_len_fn(state) lengths."""
  @jax.jit
  def run(state, target_len, target, version, rng):
    model = partial_lib.with_forced_lengths(_uniform_model(), target_len, EOS)
    return partial_lib.generate_partial(model, state, rng,
                                        target_groups=target, version=version,
                                        eos_id=EOS, pad_id=PAD)
  return run


@pytest.mark.parametrize("target", [1, 2, 3, 4])
def test_stops_when_target_groups_have_finished(target):
  b, g, t = 4, 3, 10
  target_len = np.array([[2, 5, 3], [12, 1, 1], [4, 4, 6], [1, 2, 2]])
  start = np.array([[1, 0, 2], [3, 0, 0], [0, 0, 5], [0, 1, 0]])
  tokens = np.where(np.arange(t) < start[..., None], 7, PAD).astype(np.int32)
  state = partial_lib.PartialState(
      np.ones((b, 2), np.int32), np.ones((b, 2), bool), tokens,
      np.where(tokens == 7, -0.5, 0.0).astype(np.float32),
      np.where(tokens == 7, 3, -1).astype(np.int32), start,
      np.zeros((b, g), bool), np.zeros((b, g), bool))
  run = _synthetic_generate(None)
  out, steps = run(state, jnp.asarray(target_len), target, 4,
                   jax.random.key(0))
  end = np.minimum(target_len, t)  # the length each row ends at
  group_time = (end - start).max(axis=1)  # iterations until the group ends
  want_steps = np.sort(group_time)[target - 1]
  assert int(steps) == want_steps
  want_len = np.minimum(start + want_steps, end)
  np.testing.assert_array_equal(out.length, want_len)
  np.testing.assert_array_equal(out.done, want_len == end)
  np.testing.assert_array_equal(out.eos, (want_len == end) & (target_len <= t))
  assert int(partial_lib.finished_groups(out.done)) >= target
  idx = np.arange(t)
  new = (idx >= start[..., None]) & (idx < want_len[..., None])
  np.testing.assert_array_equal(out.version,
                                np.where(new, 4, np.where(tokens == 7, 3, -1)))
  # Old tokens untouched; new non-EOS tokens are uniform over V - 1 ids, EOS
  # is certain where forced.
  old = idx < start[..., None]
  np.testing.assert_array_equal(np.asarray(out.tokens)[old], 7)
  is_eos = new & (idx == target_len[..., None] - 1)
  np.testing.assert_array_equal(np.asarray(out.tokens)[is_eos], EOS)
  assert not np.any(np.asarray(out.tokens)[new & ~is_eos] == EOS)
  want_logp = np.where(is_eos, 0.0, np.where(new, -np.log(V - 1),
                                             np.where(old, -0.5, 0.0)))
  np.testing.assert_allclose(out.logp, want_logp, atol=1e-5)


# -- the buffer: nothing lost, nothing used twice ---------------------------------


def _buffer_run(num_steps, *, b=4, g=3, t=16, slots=8, save_at=None,
                resume=None):
  """Drives PartialBuffer.advance with Pareto-like synthetic lengths.

  Target lengths are a pure function of a prompt's uid. With `save_at`, the
  buffer's JSON state before that step is returned; `resume=(step, json)`
  starts from such a state instead of an empty buffer.
  """
  lengths = {}  # uid -> [G] target lengths
  created = []
  run = _synthetic_generate(None)

  def target_lengths(uid):
    if uid not in lengths:
      rng = np.random.default_rng([int(x) for x in uid.split("/")])
      lengths[uid] = np.minimum(np.ceil(2 * (1 + rng.pareto(1.2, g))),
                                3 * t).astype(np.int32)
    return lengths[uid]

  buf = partial_lib.PartialBuffer(PAD)
  first = 0
  if resume is not None:
    first, state = resume
    buf.load_state_dict(json.loads(state))
  history, saved = [], None
  for step in range(first, num_steps):
    if save_at == step:
      saved = json.dumps(buf.state_dict())
    uids_now = None

    def generate(state, target, step=step):
      tl = np.stack([target_lengths(u) for u in uids_now])
      out, steps = run(state, jnp.asarray(tl), target, step,
                       jax.random.key(step))
      return jax.device_get(out), steps

    def fresh(n, step=step):
      nonlocal uids_now
      groups = [partial_lib.Group.fresh(f"{step}/{i}", [5, 6], [True, True],
                                        str(i), num_samples=g,
                                        max_new_tokens=t) for i in range(n)]
      created.extend(x.uid for x in groups)
      uids_now = [x.uid for x in buf.groups if not x.complete] + [
          x.uid for x in groups]
      return groups

    snap = lambda x: (x.tokens.copy(), x.logp.copy(), x.version.copy(),
                      x.length.copy(), x.eos.copy())
    before = {x.uid: snap(x) for x in buf.groups}
    used, info = buf.advance(num_groups=b, num_slots=slots, new_groups=fresh,
                             generate=generate)
    history.append(dict(used=[(x.uid, *snap(x)) for x in used],
                        before=before, info=info,
                        current={x.uid: snap(x) for x in used + buf.groups}))
  return history, created, {u: target_lengths(u) for u in created}, buf, saved


def test_buffer_uses_every_rollout_exactly_once_and_keeps_prefixes():
  b, t = 4, 16
  history, created, lengths, buf, _ = _buffer_run(12, b=b, t=t)
  used = [u for h in history for (u, *_) in h["used"]]
  assert len(used) == len(set(used)) == 12 * b  # no double use
  assert set(used) | {x.uid for x in buf.groups} == set(created)  # no loss
  assert not set(used) & {x.uid for x in buf.groups}
  carried = 0
  for h in history:
    for uid, _, _, version, length, eos in h["used"]:
      want = np.minimum(lengths[uid], t)
      np.testing.assert_array_equal(length, want)  # every row completed
      np.testing.assert_array_equal(eos, lengths[uid] <= t)
      assert np.all(version[np.arange(t) < length[:, None]] >= 0)
    for uid, (tok, lp, ver, ln, _) in h["before"].items():
      tok2, lp2, ver2, _, _ = h["current"][uid]
      keep = np.arange(t) < ln[:, None]
      carried += int(ln.sum())
      # Earlier tokens, log-probs and versions are bit-identical.
      np.testing.assert_array_equal(tok2[keep], tok[keep])
      np.testing.assert_array_equal(lp2[keep].view(np.int32),
                                    lp[keep].view(np.int32))
      np.testing.assert_array_equal(ver2[keep], ver[keep])
  assert carried > 0  # partial rows really crossed steps
  # Some trained rows mix tokens of several policy versions.
  assert any(len(set(v[v >= 0].tolist())) > 1
             for h in history for (_, _, _, v, _, _) in h["used"])


def test_buffer_state_dict_resume_continues_exactly():
  full, _, _, _, saved = _buffer_run(8, save_at=4)
  assert json.loads(saved)["groups"]  # the resume point carries groups
  resumed, *_ = _buffer_run(8, resume=(4, saved))
  assert len(resumed) == 4
  for h_full, h_res in zip(full[4:], resumed):
    assert h_full["info"] == h_res["info"]
    assert len(h_full["used"]) == len(h_res["used"])
    for a, r in zip(h_full["used"], h_res["used"]):
      assert a[0] == r[0]
      for x, y in zip(a[1:], r[1:]):
        np.testing.assert_array_equal(np.asarray(x).view(np.int32)
                                      if x.dtype == np.float32 else x,
                                      np.asarray(y).view(np.int32)
                                      if y.dtype == np.float32 else y)


def test_staleness_stats_hand_computed():
  version = np.array([[3, 3, 1, -1], [0, 2, -1, -1]])
  mask = version >= 0
  s = partial_lib.staleness_stats(version, mask, 3, num_bins=3)
  # staleness of valid tokens: 0, 0, 2, 3, 1
  assert s["rollout/staleness_mean"] == pytest.approx(6 / 5)
  assert s["rollout/staleness_max"] == 3.0
  assert s["rollout/staleness_hist_0"] == pytest.approx(2 / 5)
  assert s["rollout/staleness_hist_1"] == pytest.approx(1 / 5)
  assert s["rollout/staleness_hist_2"] == pytest.approx(2 / 5)  # >= 2
  with pytest.raises(ValueError, match="different run"):
    partial_lib.staleness_stats(version, mask, 2)


# -- the engine -------------------------------------------------------------------


def _small_config(**rollout):
  c = april_arith.get_config()
  c.sft.steps = 4
  c.sft.batch_size = 16
  c.rl.steps = 3
  c.rl.prompts_per_step = 4
  c.rl.num_samples = 2
  c.eval.every = 1
  c.eval.num_problems = 8
  c.eval.num_samples = 2
  c.eval.batch_size = 8
  c.checkpoint.every = 100
  c.progress = False
  c.rollout.update(rollout)
  return c


def test_engine_rejects_bad_config(tmp_path):
  with pytest.raises(ValueError, match="over_provision must be >= 1"):
    experiment.Experiment(_small_config(over_provision=0.5), str(tmp_path))
  from rlax_llm.methods import april  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="keep_surplus must be True or False"):
    april.parse_settings({"name": "april", "keep_surplus": "yes"})
  c = _small_config()
  c.rollout.overprovision = 2.0
  with pytest.raises(ValueError, match="does not know"):
    experiment.Experiment(c, str(tmp_path / "b"))
  old = _small_config(is_correction=True)
  with pytest.raises(ValueError, match="rl.rollout_correction"):
    experiment.Experiment(old, str(tmp_path / "c"))
  c = _small_config()
  c.rl.rollout_correction = "tis"
  c.rl.recompute_old_logp = False
  with pytest.raises(ValueError, match="recompute_old_logp"):
    experiment.Experiment(c, str(tmp_path / "d"))


def _strip_time(records):
  return [{k: v for k, v in r.items() if not k.startswith("time/")}
          for r in records]


def test_end_to_end_run_and_resume_equal_uninterrupted(tmp_path):
  # Arithmetic rows all finish within the budget, so the buffer carries
  # groups across steps only with the surplus kept.
  c = _small_config(over_provision=3.0, keep_surplus=True)
  c.rl.rollout_correction = "tis"
  experiment.run(c, str(tmp_path / "full"))
  full = read_metrics(str(tmp_path / "full/metrics.jsonl"))
  rl = [r for r in full if "rl/loss" in r]
  assert len(rl) == 3
  for r in rl:
    assert np.isfinite(r["rl/loss"])
    hist = sum(r[f"rollout/staleness_hist_{k}"] for k in range(4))
    assert hist == pytest.approx(1.0)
    # Carried tokens' behaviour log-probs are stale: the trainer recomputes
    # old log-probs, and truncated weights correct the gap.
    assert 0.0 < r["rl/rc_is_weight_mean"] <= 2.0
    assert 0.0 <= r["rollout/off_policy_tokens"] <= 1.0
  # Some step trains on rows carried from an earlier step.
  assert max(r["rollout/staleness_max"] for r in rl) >= 1
  # k RL steps, then the same config to the end on the same workdir.
  short = _small_config(over_provision=3.0, keep_surplus=True)
  short.rl.rollout_correction = "tis"
  short.rl.steps = 1
  experiment.run(short, str(tmp_path / "resumed"))
  experiment.run(c, str(tmp_path / "resumed"))
  got = _strip_time(read_metrics(str(tmp_path / "resumed/metrics.jsonl")))
  assert got == _strip_time(full)


def test_buffer_filter_drops_constant_groups_and_decodes_more_rounds():
  """With a filter, the round goes on until B finished groups pass it;
  dropped groups are counted and never returned."""
  buf = partial_lib.PartialBuffer(0)
  made = []

  def fresh(n, r):
    out = [partial_lib.Group.fresh(f"{r}/{i}", np.array([1, 2]),
                                   np.array([True, True]), str(i),
                                   num_samples=2, max_new_tokens=3)
           for i in range(n)]
    made.extend(out)
    return out

  def generate(state, target, r):
    del target
    # Every row ends at its first token: all groups finish each round.
    st = state._replace(length=np.ones_like(state.length),
                        done=np.ones_like(state.done),
                        eos=np.ones_like(state.eos))
    return st, 1

  # Round 0's groups "0/*" fail, round 1's odd ones pass.
  accept = lambda gs: [g.uid.startswith("1/") and int(g.uid[2:]) % 2 == 1
                       for g in gs]
  used, info = buf.advance(num_groups=2, num_slots=4, new_groups=fresh,
                           generate=generate, accept=accept, max_rounds=3)
  assert [g.uid for g in used] == ["1/1", "1/3"]
  assert info["filtered_groups"] == 6 and info["decode_rounds"] == 2
  assert len(buf) == 0
  # Out of rounds: fewer than B come back.
  used, info = partial_lib.PartialBuffer(0).advance(
      num_groups=2, num_slots=2, new_groups=fresh, generate=generate,
      accept=lambda gs: [False] * len(gs), max_rounds=2)
  assert used == [] and info["filtered_groups"] == 4


def test_buffer_surplus_finished_groups_dropped_or_carried():
  """slime drops groups that finished beyond B (keep_surplus=False, the
  engine's default) and carries only unfinished ones; keep_surplus=True
  serves the surplus first at the next step, without decoding."""
  made = []

  def fresh(n):
    out = [partial_lib.Group.fresh(f"{len(made)}/{i}", np.array([1, 2]),
                                   np.array([True, True]), str(i),
                                   num_samples=2, max_new_tokens=4)
           for i in range(n)]
    made.extend(out)
    return out

  def generate(state, target):
    del target
    # Rows of slot 3 run past the budget's first pass (unfinished); the
    # other slots end at their first token.
    length = np.ones_like(state.length)
    done = np.ones_like(state.done)
    done[3] = False
    return state._replace(length=length, done=done,
                          eos=np.asarray(done)), 1

  for keep in (False, True):
    made.clear()
    buf = partial_lib.PartialBuffer(0)
    used, info = buf.advance(num_groups=2, num_slots=4, new_groups=fresh,
                             generate=generate, keep_surplus=keep)
    assert [g.uid for g in used] == ["0/0", "0/1"]
    assert info["dropped_groups"] == (0 if keep else 1)
    assert [g.uid for g in buf.groups] == (["0/2", "0/3"] if keep
                                           else ["0/3"])
    assert info["buffer_finished"] == (1 if keep else 0)
  # With the surplus kept, the next step trains it first: one more finished
  # group is needed, so decoding runs (the carried unfinished one first).
  used, info = buf.advance(num_groups=1, num_slots=4, new_groups=fresh,
                           generate=generate, keep_surplus=True)
  assert [g.uid for g in used] == ["0/2"] and info["decode_steps"] == 0
