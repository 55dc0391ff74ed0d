"""generate: log-prob parity with the trainer, EOS handling, early exit, layout."""

import flax.nnx as nnx
import jax
import numpy as np
import pytest

from rlax_llm.models.config import ModelConfig
from rlax_llm.models.transformer import Transformer
from rlax_llm.sampling.generate import generate, generate_jit
from rlax_llm.sampling.samplers import SamplerConfig
from rlax_llm.training.scoring import score_completions

EOS = 1


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
  scores = score_completions(graphdef, params, np.repeat(p, g, 0),
                             np.repeat(m, g, 0), ro.tokens, ro.mask,
                             temperature=sampler.temperature)
  np.testing.assert_allclose(np.asarray(scores.logp), np.asarray(ro.logp),
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
