"""generate: log-prob parity with the trainer, EOS handling, early exit, layout,
chunked decoding, per-row cache slots and sharding over a mesh."""

import json
import os
import sys
import textwrap

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlax_llm.models.config import ModelConfig, get_model_config
from rlax_llm.models.transformer import Transformer
from rlax_llm.sampling.generate import auto_decode_chunk, chunk_layout
from rlax_llm.sampling.generate import generate, generate_jit
from rlax_llm.sampling.samplers import SamplerConfig
from rlax_llm.training.scoring import score_completions_jit

EOS = 1
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _split(seed=0, vocab=23, **kw):
  cfg = ModelConfig(vocab_size=vocab, num_layers=2, embed_dim=32, num_heads=4,
                    num_kv_heads=2, head_dim=8, mlp_dim=48, max_seq_len=32,
                    init_std=0.3, **kw)
  return nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))


def _prompts(lens, width, side, vocab=23, seed=0):
  rng = np.random.default_rng(seed)
  tok = np.zeros((len(lens), width), np.int32)
  mask = np.zeros((len(lens), width), bool)
  for i, n in enumerate(lens):
    sl = slice(width - n, width) if side == "left" else slice(0, n)
    tok[i, sl] = rng.integers(2, vocab, n)
    mask[i, sl] = True
  return tok, mask


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("sampler", [SamplerConfig(1.0),
                                     SamplerConfig(0.7, top_k=5, top_p=0.9)])
def test_rollout_logp_equals_trainer_recomputation(side, sampler):
  graphdef, params = _split(qkv_bias=True)
  p, m = _prompts([5, 2, 7], 7, side)
  g, t = 4, 9
  ro = generate_jit(graphdef, params, p, m, jax.random.key(0), num_samples=g,
                    max_new_tokens=t, eos_id=EOS, sampler=sampler)
  assert ro.tokens.shape == (12, t) and ro.logp.shape == (12, t)
  scores = score_completions_jit(graphdef, params, np.repeat(p, g, 0),
                                 np.repeat(m, g, 0), ro.tokens, ro.mask,
                                 temperature=sampler.temperature)
  np.testing.assert_allclose(np.asarray(scores.logp), np.asarray(ro.logp),
                             atol=1e-5)
  # The update's shared-prompt scoring: each prompt's layers once for its G.
  shared = score_completions_jit(graphdef, params, np.repeat(p, g, 0),
                                 np.repeat(m, g, 0), ro.tokens, ro.mask,
                                 temperature=sampler.temperature,
                                 prompt_group=g)
  np.testing.assert_allclose(np.asarray(shared.logp), np.asarray(ro.logp),
                             atol=1e-5)
  assert np.asarray(ro.mask).sum() > 12  # something was generated


def test_eos_ends_sequences_and_masks_follow():
  graphdef, params = _split(vocab=4)  # pad, eos, 2 tokens: EOS is frequent
  p, m = _prompts([3, 3], 3, "left", vocab=4)
  t = 24
  ro = jax.device_get(generate_jit(graphdef, params, p, m, jax.random.key(1),
                                   num_samples=8, max_new_tokens=t,
                                   eos_id=EOS, pad_id=0))
  for row in range(16):
    tok, mask = ro.tokens[row], ro.mask[row]
    eos_at = np.flatnonzero(tok == EOS)
    if ro.finished[row]:
      first = eos_at[0]
      assert ro.lengths[row] == first + 1
      np.testing.assert_array_equal(mask, np.arange(t) <= first)
      assert np.all(tok[first + 1:] == 0) and np.all(ro.logp[row][~mask] == 0)
    else:
      assert len(eos_at) == 0 and ro.lengths[row] == t and mask.all()
  assert ro.finished.any()
  # The loop exits as soon as every sequence is done.
  assert ro.steps == ro.lengths.max()
  if ro.finished.all():
    assert ro.steps < t


def test_samples_of_a_prompt_share_its_prefill():
  """Greedy: each of the G rows of prompt b equals prompt b decoded alone."""
  graphdef, params = _split(seed=3)
  p, m = _prompts([6, 1, 4], 6, "left")
  greedy = SamplerConfig(0.0)
  ro = jax.device_get(generate_jit(graphdef, params, p, m, jax.random.key(0),
                                   num_samples=3, max_new_tokens=6,
                                   eos_id=EOS, sampler=greedy))
  for b in range(3):
    alone = jax.device_get(generate_jit(
        graphdef, params, p[b:b + 1], m[b:b + 1], jax.random.key(9),
        num_samples=1, max_new_tokens=6, eos_id=EOS, sampler=greedy))
    for g in range(3):
      np.testing.assert_array_equal(ro.tokens[b * 3 + g], alone.tokens[0])


def test_same_key_same_samples_and_no_recompilation():
  graphdef, params = _split()
  p, m = _prompts([4, 3], 4, "left")
  kw = dict(num_samples=2, max_new_tokens=5, eos_id=EOS)
  before = generate_jit._cache_size()  # pylint: disable=protected-access
  a = generate_jit(graphdef, params, p, m, jax.random.key(5), **kw)
  b = generate_jit(graphdef, params, p, m, jax.random.key(5), **kw)
  p2, m2 = _prompts([1, 4], 4, "right", seed=7)
  params2 = jax.tree.map(lambda x: x * 1.01, params)
  generate_jit(graphdef, params2, p2, m2, jax.random.key(6), **kw)
  assert generate_jit._cache_size() == before + 1  # pylint: disable=protected-access
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))


def test_prompt_longer_than_context_is_refused():
  graphdef, params = _split()
  p, m = _prompts([30], 30, "left")
  with pytest.raises(ValueError, match="exceeds the model context"):
    generate(graphdef, params, p, m, jax.random.key(0), num_samples=1,
             max_new_tokens=8, eos_id=EOS)


# -- chunked decoding ----------------------------------------------------------


def test_chunk_layout_hand_computed():
  # (B, G, chunk) -> (samples per sub-group, sub-groups per chunk, chunks)
  assert chunk_layout(3, 4, 0) == (4, 3, 1)
  assert chunk_layout(3, 4, 12) == (4, 3, 1)  # all rows fit
  assert chunk_layout(3, 4, 8) == (4, 2, 2)  # 3 groups, 2 per chunk
  assert chunk_layout(3, 4, 6) == (4, 1, 3)
  assert chunk_layout(3, 4, 2) == (2, 1, 6)  # groups split in halves
  assert chunk_layout(1, 512, 128) == (128, 1, 4)
  assert chunk_layout(2, 7, 5) == (1, 5, 3)  # 7 is prime: 14 rows, 5 a chunk
  with pytest.raises(ValueError, match="decode_chunk"):
    chunk_layout(2, 2, -1)


@pytest.mark.parametrize("chunk", [2, 5, 6, 8])
def test_chunked_decode_equals_unchunked(chunk):
  """Every chunking gives the same rows, EOS and early exit included."""
  graphdef, params = _split(vocab=5)  # EOS is likely: rows end at many lengths
  p, m = _prompts([3, 1, 2], 3, "left", vocab=5)
  kw = dict(num_samples=4, max_new_tokens=20, eos_id=EOS)
  ref = jax.device_get(generate_jit(graphdef, params, p, m, jax.random.key(2),
                                    decode_chunk=0, **kw))
  got = jax.device_get(generate_jit(graphdef, params, p, m, jax.random.key(2),
                                    decode_chunk=chunk, **kw))
  for field in ("tokens", "mask", "lengths", "finished"):
    np.testing.assert_array_equal(getattr(got, field), getattr(ref, field),
                                  err_msg=field)
  # Other batch shapes sum in another order: equal up to f32 rounding.
  np.testing.assert_allclose(got.logp, ref.logp, atol=1e-5)
  assert ref.lengths.min() < ref.lengths.max()  # rows ended apart
  assert int(got.steps) == int(ref.steps) == ref.lengths.max()


def test_chunked_decode_bounds_the_cache_memory():
  """1 prompt x 512 samples: the compiled temporaries shrink with the chunk."""
  graphdef, params = _split()
  p, m = _prompts([5], 5, "left")

  def temp_bytes(chunk):
    lowered = generate_jit.lower(graphdef, params, p, m, jax.random.key(0),
                                 num_samples=512, max_new_tokens=24,
                                 eos_id=EOS, decode_chunk=chunk)
    return lowered.compile().memory_analysis().temp_size_in_bytes

  whole, chunked = temp_bytes(0), temp_bytes(64)
  # The decode cache of 512 rows: 2 layers x (k, v) x 2 heads x 8 x 24 slots.
  cache = 512 * 2 * 2 * 2 * 8 * 24 * 4
  assert whole > cache > 2 * chunked and whole > 4 * chunked, (
      whole, chunked, cache)


def test_one_prompt_512_samples_256_tokens_tiny_model():
  """The issue's BroRL-sized decode on the default model, in chunks."""
  cfg = get_model_config("tiny", vocab_size=16, max_seq_len=264)
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
  p, m = _prompts([6], 6, "left", vocab=16)
  # No EOS (an id outside the vocabulary): every row decodes all 256 tokens.
  # Compiled with XLA's default code generation, as outside the suite (whose
  # -O0, tests/conftest.py, runs this 1,024-step decode 2.4x slower).
  decode = generate_jit.lower(
      graphdef, params, p, m, jax.random.key(0), num_samples=512,
      max_new_tokens=256, eos_id=-1, decode_chunk=128).compile(
          compiler_options={"xla_backend_optimization_level": 2})
  ro = jax.device_get(decode(params, p, m, jax.random.key(0)))
  assert ro.tokens.shape == (512, 256) and int(ro.steps) == 256
  assert (ro.lengths == 256).all()
  assert len({tuple(r) for r in ro.tokens}) == 512  # independent samples
  rows = np.arange(0, 512, 37)  # the trainer's log-probs of a few rows
  scores = score_completions_jit(graphdef, params, np.repeat(p, len(rows), 0),
                                 np.repeat(m, len(rows), 0), ro.tokens[rows],
                                 ro.mask[rows])
  np.testing.assert_allclose(np.asarray(scores.logp), ro.logp[rows],
                             atol=1e-5)


def test_auto_chunk_only_for_small_models_on_cpu():
  tiny = get_model_config("tiny", vocab_size=50)
  params = nnx.state(Transformer(tiny, rngs=nnx.Rngs(0)), nnx.Param)
  # A row's cache: 2 layers x (k, v) x 2 heads x 32 x T slots x 4 bytes.
  assert auto_decode_chunk(params, tiny, 256, 128) == (4 << 20) // (
      2 * 2 * 2 * 32 * 128 * 4) == 32
  assert auto_decode_chunk(params, tiny, 16, 128) == 0  # all rows fit
  assert auto_decode_chunk(params, tiny, 512, 5) == 0  # short completions
  assert auto_decode_chunk(params, tiny, 1024, 5) == (4 << 20) // (
      2 * 2 * 2 * 32 * 5 * 4) == 819
  assert auto_decode_chunk(params, tiny, 4096, 4096) == 16  # the floor
  big = jax.tree.map(lambda x: jnp.zeros((1 << 23,), jnp.float32), params)
  assert auto_decode_chunk(big, tiny, 256, 128) == 0  # weights > 16 MiB


# -- per-row cache slots -------------------------------------------------------


def test_decode_step_with_per_row_slots_matches_full_sequences():
  """Rows resumed at different lengths (index [B, G]) decode exactly."""
  graphdef, params = _split(seed=4, qkv_bias=True)
  model = nnx.merge(graphdef, params)
  decode = nnx.jit(lambda mdl, *a: mdl.decode_step(*a))
  p, m = _prompts([4, 2], 4, "right")
  b, g, t = 2, 3, 6
  rng = np.random.default_rng(3)
  conts = rng.integers(2, 23, (b, g, t))
  start = np.array([[0, 2, 3], [1, 0, 4]])  # slots already written per row
  _, cache, plen = nnx.jit(
      lambda mdl, *a: mdl.prefill(*a, num_samples=g, max_new_tokens=t))(
          model, jnp.asarray(p), jnp.asarray(m))
  # Fill each row's first `start` slots one step at a time, then one more
  # step for all rows at their own slot.
  for i in range(t):
    index = jnp.minimum(jnp.asarray(start), i)
    _, new = decode(
        model, jnp.asarray(np.take_along_axis(
            conts, np.asarray(index)[..., None], -1)[..., 0]),
        plen[:, None] + index, cache, index)
    keep = (i < start)
    sel = lambda a, c: jnp.where(  # noqa: E731
        keep.reshape(b, g, *([1] * (a.ndim - 2))), a, c)
    cache = cache._replace(k=tuple(map(sel, new.k, cache.k)),
                           v=tuple(map(sel, new.v, cache.v)))
  index = jnp.asarray(start)
  tok = np.take_along_axis(conts, start[..., None], -1)[..., 0]
  logits, _ = decode(model, jnp.asarray(tok), plen[:, None] + index, cache,
                     index)
  forward = nnx.jit(lambda mdl, x: mdl(x))
  for bi in range(b):
    prompt = p[bi][m[bi]]
    for gi in range(g):
      seq = np.concatenate([prompt, conts[bi, gi, :start[bi, gi] + 1]])
      full = np.asarray(forward(model, jnp.asarray(seq)[None]))[0, -1]
      np.testing.assert_allclose(np.asarray(logits[bi, gi]), full, atol=1e-5)


# -- on a mesh -----------------------------------------------------------------

_MESH_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=4")
    import flax.nnx as nnx, jax, numpy as np
    from rlax_llm.models.config import ModelConfig
    from rlax_llm.models.transformer import Transformer
    from rlax_llm.parallel import mesh as mesh_lib
    from rlax_llm.training import state as state_lib
    from rlax_llm.sampling.generate import generate_jit, generate_on_mesh_jit
    from rlax_llm.sampling.samplers import SamplerConfig
    cfg = ModelConfig(vocab_size=7, num_layers=2, embed_dim=32, num_heads=4,
                      num_kv_heads=2, head_dim=8, mlp_dim=64, max_seq_len=32,
                      init_std=0.3)
    gd, params = state_lib.model_graphdef(cfg), state_lib.init_params(cfg, 1)
    rng = np.random.default_rng(0)
    p = rng.integers(2, 7, (5, 4)).astype(np.int32)  # 5 prompts, 4 shards
    m = np.ones((5, 4), bool); m[1, :2] = False
    kw = dict(num_samples=3, max_new_tokens=12, eos_id=1,
              sampler=SamplerConfig(0.9, top_k=5))
    ref = jax.device_get(generate_jit(gd, params, p, m,
                                          jax.random.key(3), **kw))
    out = {}
    for name, shape in [("d4", (4, 1, 1)), ("d2f2", (2, 2, 1)),
                        ("d2t2", (2, 1, 2))]:
      mesh = mesh_lib.make_mesh(shape)
      sp = jax.device_put(params, state_lib.param_shardings(
          cfg, mesh, mesh_lib.SAMPLE_RULES))
      ro = jax.device_get(generate_on_mesh_jit(
          gd, sp, p, m, jax.random.key(3), mesh=mesh, decode_chunk=4, **kw))
      out[name] = {f: bool(np.array_equal(getattr(ro, f), getattr(ref, f)))
                   for f in ("tokens", "mask", "lengths", "finished")}
      out[name]["logp_diff"] = float(np.abs(ro.logp - ref.logp).max())
      out[name]["steps"] = [int(ro.steps), int(ref.steps)]
      out[name]["mlp_sharded"] = not sp["layers"][0]["mlp"]["up_proj"][
          ...].sharding.is_fully_replicated
    out["rows"] = int(ref.tokens.shape[0])
    out["distinct_lengths"] = int(len(set(ref.lengths.tolist())))
    json.dump(out, open(sys.argv[1], "w"))
""")


def test_generate_on_mesh_equals_one_device(tmp_path, forks):
  """4 fake devices, three meshes (batch split, fsdp, tensor-sharded weights)."""
  script, out = tmp_path / "mesh.py", tmp_path / "out.json"
  script.write_text(_MESH_SCRIPT)
  proc = forks.run([sys.executable, str(script), str(out)], cwd=REPO,
                   timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(out.read_text())
  assert res["rows"] == 15 and res["distinct_lengths"] > 1
  for name in ("d4", "d2f2", "d2t2"):
    r = res[name]
    assert r["tokens"] and r["mask"] and r["lengths"] and r["finished"], r
    assert r["logp_diff"] < 1e-5 and r["steps"][0] == r["steps"][1], r
  assert res["d2t2"]["mlp_sharded"]  # the weights stayed tensor-sharded


# -- bfloat16 cache writes -----------------------------------------------------


def test_bf16_cache_slots_are_written_bit_exactly_and_in_place():
  # `_store_bits` writes 16-bit floats as their uint16 bits: the same values,
  # without the f32 copy of the whole cache XLA:CPU makes for a bfloat16
  # dynamic-update-slice or scatter.
  from rlax_llm.models.transformer import _store_bits  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(7)
  bf = jnp.bfloat16
  cache = jnp.asarray(rng.normal(size=(2, 3, 2, 4, 6)), bf)
  new = jnp.asarray(rng.normal(size=(2, 3, 2, 4)), bf)

  def slot(c, u, index):
    return jax.lax.dynamic_update_slice_in_dim(c, u[..., None], index, axis=4)

  fn = jax.jit(lambda c, u, i: _store_bits(
      lambda a, b: slot(a, b, i), c, u))
  got = np.asarray(fn(cache, new, 2), np.float32)
  want = np.asarray(cache, np.float32).copy()
  want[..., 2] = np.asarray(new, np.float32)
  np.testing.assert_array_equal(got, want)
  hlo = fn.lower(cache, new, 2).compile().as_text()
  assert "f32[2,3,2,4,6]" not in hlo  # no f32 copy of the cache
  # Per-row slots; a slot past the end is dropped (APRIL's finished rows).
  index = jnp.asarray([[0, 5, 6], [3, 3, 9]])
  bi, gi = jnp.arange(2)[:, None], jnp.arange(3)[None, :]
  got = np.asarray(jax.jit(lambda c, u: _store_bits(
      lambda a, b: a.at[bi, gi, :, :, index].set(b, mode="drop"), c, u))(
          cache, new), np.float32)
  want = np.asarray(cache, np.float32).copy()
  for b in range(2):
    for g in range(3):
      if index[b, g] < 6:
        want[b, g, :, :, int(index[b, g])] = np.asarray(new[b, g], np.float32)
  np.testing.assert_array_equal(got, want)
  # Other dtypes are written as they are.
  f = jnp.zeros((2, 3), jnp.float32)
  np.testing.assert_array_equal(np.asarray(_store_bits(
      lambda a, b: a.at[0].set(b), f, jnp.ones(3, jnp.float32))),
                                [[1, 1, 1], [0, 0, 0]])
