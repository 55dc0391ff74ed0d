"""Held-out evaluation: greedy accuracy and pass@G of a sampled group."""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.nnx as nnx
import jax
import numpy as np

from rlax_llm.sampling.generate import generate_jit
from rlax_llm.sampling.generate import generate_on_mesh_jit
from rlax_llm.sampling.samplers import SamplerConfig

RewardFn = Callable[[Sequence[str], Sequence[str]], np.ndarray]


def pass_at_k(num_correct: np.ndarray, n: int, k: int) -> np.ndarray:
  """Unbiased pass@k from n samples with c correct (Chen et al., 2107.03374).

  pass@k = 1 - C(n - c, k) / C(n, k), computed as a stable product.
  """
  num_correct = np.asarray(num_correct)
  if not 1 <= k <= n:
    raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}.")
  out = np.ones(num_correct.shape, np.float64)
  fail = n - num_correct >= k
  for idx in np.flatnonzero(fail):
    c = num_correct.flat[idx]
    out.flat[idx] = 1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1))
  return out


def _majority_correct(texts: Sequence[str], rewards_KG: np.ndarray,
                     g: int) -> np.ndarray:
  """maj@G: is the most frequent answer of each group correct?

  Answers are compared after stripping whitespace; ties go to the answer seen
  first. Its correctness is read off the reward of a sample giving it.
  """
  out = np.zeros(rewards_KG.shape[0], np.float64)
  for i in range(rewards_KG.shape[0]):
    group = [t.strip() for t in texts[i * g:(i + 1) * g]]
    counts: dict[str, int] = {}
    for t in group:
      counts[t] = counts.get(t, 0) + 1
    best = max(counts, key=lambda t: (counts[t], -group.index(t)))
    out[i] = float(rewards_KG[i, group.index(best)] >= 0.5)
  return out


def evaluate(graphdef: nnx.GraphDef, params, *, prompts_BP: np.ndarray,
             prompt_mask_BP: np.ndarray, answers: Sequence[str],
             decode: Callable[[np.ndarray, np.ndarray], list[str]],
             reward_fn: RewardFn, rng: jax.Array, max_new_tokens: int,
             eos_id: int, pad_id: int, num_samples: int,
             sampler: SamplerConfig, batch_size: int = 256,
             mesh: jax.sharding.Mesh | None = None,
             decode_chunk: int | None = None) -> dict[str, float]:
  """Scores a fixed problem set.

  Args:
    graphdef, params: the policy.
    prompts_BP, prompt_mask_BP: encoded prompts (all the same width, so one
      compiled program serves every chunk).
    answers: reference answers, one per prompt.
    decode: (tokens_NT, mask_NT) -> texts.
    reward_fn: (texts, answers) -> rewards in [0, 1].
    rng: key for the sampled group.
    max_new_tokens, eos_id, pad_id: generation limits and ids.
    num_samples: G, the group size for pass@G (0 skips sampling).
    sampler: the sampling distribution of the group.
    batch_size: prompts per generate call.
    mesh: a device mesh to split each call's prompts over
      (`generate_on_mesh`); None decodes on one device.
    decode_chunk: `generate`'s decode_chunk (None: its automatic choice).

  Returns:
    {"accuracy": greedy accuracy, "pass@G": fraction of prompts with a correct
     sample, "pass@1": mean sampled reward, "maj@G": majority-vote accuracy,
     "mean_length": greedy length}.
  """
  n = len(answers)
  if mesh is None:
    gen = functools.partial(generate_jit, decode_chunk=decode_chunk)
  else:
    gen = functools.partial(generate_on_mesh_jit, mesh=mesh,
                            decode_chunk=decode_chunk)
  greedy, sampled, lengths, majority = [], [], [], []
  for i, start in enumerate(range(0, n, batch_size)):
    sl = slice(start, start + batch_size)
    p, m = prompts_BP[sl], prompt_mask_BP[sl]
    ans = list(answers[sl])
    pad = batch_size - len(ans) if n > batch_size else 0
    if pad:  # keep one shape: pad the last chunk with copies of its first row
      p = np.concatenate([p, np.repeat(p[:1], pad, 0)])
      m = np.concatenate([m, np.repeat(m[:1], pad, 0)])
    ro = jax.device_get(gen(
        graphdef, params, p, m, rng, num_samples=1,
        max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
        sampler=SamplerConfig(temperature=0.0)))
    k = len(ans)
    greedy.append(reward_fn(decode(ro.tokens[:k], ro.mask[:k]), ans))
    lengths.append(ro.lengths[:k])
    if num_samples:
      ro = jax.device_get(gen(
          graphdef, params, p, m, jax.random.fold_in(rng, i),
          num_samples=num_samples, max_new_tokens=max_new_tokens,
          eos_id=eos_id, pad_id=pad_id, sampler=sampler))
      g = num_samples
      texts = decode(ro.tokens[:k * g], ro.mask[:k * g])
      rewards = np.asarray(reward_fn(texts, [a for a in ans for _ in range(g)])
                           ).reshape(k, g)
      sampled.append(rewards)
      majority.append(_majority_correct(texts, rewards, g))
  out = {"accuracy": float(np.mean(np.concatenate(greedy))),
         "mean_length": float(np.mean(np.concatenate(lengths)))}
  if num_samples:
    r = np.concatenate(sampled)
    correct = np.sum(r >= 0.5, axis=1)
    out[f"pass@{num_samples}"] = float(np.mean(
        pass_at_k(correct, num_samples, num_samples)))
    out["pass@1"] = float(np.mean(pass_at_k(correct, num_samples, 1)))
    out[f"maj@{num_samples}"] = float(np.mean(np.concatenate(majority)))
  return out
