"""Token samplers: temperature, top-k, top-p (nucleus), min-p and greedy.

A sampler is built from small logit filters, each a pure function
`logits_NV -> logits_NV` that sets excluded tokens to -inf; `sample_token`
chains them and draws one token per row.

The log-prob returned with each token is log softmax(logits / temperature) at
that token, *before* top-k/top-p/min-p filtering (for greedy decoding,
temperature 1). That is the quantity a trainer recomputes from the same logits
at the same temperature, so the rollout's and the trainer's log-probs agree
exactly; truncation filters change which tokens are drawn, not how they are
scored. (vLLM calls the same choice "raw" log-probs of the processed logits.)
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

_MASKED = -jnp.inf


class SamplerConfig(NamedTuple):
  """Hashable sampler settings (static under jit).

  Attributes:
    temperature: 0 for greedy decoding, else the softmax temperature.
    top_k: keep the k most likely tokens; 0 disables.
    top_p: keep the smallest set of tokens whose probability reaches top_p;
      1.0 disables.
    min_p: keep tokens with probability >= min_p * max probability; 0 disables.
  """
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0

  def validate(self) -> "SamplerConfig":
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}.")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 disables), got {self.top_k}.")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
    if not 0.0 <= self.min_p <= 1.0:
      raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
    return self


def top_k_filter(logits_NV: jax.Array, k: int) -> jax.Array:
  """Keeps the k largest logits of each row (ties at the k-th value kept)."""
  if k <= 0 or k >= logits_NV.shape[-1]:
    return logits_NV
  kth = jax.lax.top_k(logits_NV, k)[0][..., -1:]
  return jnp.where(logits_NV >= kth, logits_NV, _MASKED)


def top_p_filter(logits_NV: jax.Array, p: float) -> jax.Array:
  """Nucleus filter (Holtzman et al., arXiv:1904.09751).

  Keeps token i when the probability mass of the tokens strictly more likely
  than i is below p; the most likely token is always kept.
  """
  if p >= 1.0:
    return logits_NV
  probs = jax.nn.softmax(logits_NV.astype(jnp.float32), axis=-1)
  order = jnp.argsort(-probs, axis=-1)
  sorted_p = jnp.take_along_axis(probs, order, axis=-1)
  mass_before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
  keep_sorted = mass_before < p
  keep = jnp.zeros_like(keep_sorted).at[
      jnp.arange(logits_NV.shape[0])[:, None], order].set(keep_sorted)
  return jnp.where(keep, logits_NV, _MASKED)


def min_p_filter(logits_NV: jax.Array, min_p: float) -> jax.Array:
  """Keeps tokens with p >= min_p * max p (Nguyen et al., arXiv:2407.01082)."""
  if min_p <= 0.0:
    return logits_NV
  logp = jax.nn.log_softmax(logits_NV.astype(jnp.float32), axis=-1)
  threshold = jnp.max(logp, axis=-1, keepdims=True) + jnp.log(min_p)
  return jnp.where(logp >= threshold, logits_NV, _MASKED)


def filtered_logits(logits_NV: jax.Array, cfg: SamplerConfig) -> jax.Array:
  """Tempered and filtered logits whose softmax is the sampling distribution."""
  x = logits_NV.astype(jnp.float32)
  if cfg.temperature > 0:
    x = x / cfg.temperature
  x = top_k_filter(x, cfg.top_k)
  x = top_p_filter(x, cfg.top_p)
  return min_p_filter(x, cfg.min_p)


class Sample(NamedTuple):
  token: jax.Array  # [N] int32
  logp: jax.Array  # [N] f32, log softmax(logits / temperature)[token]


def sample_token(rng: jax.Array, logits_NV: jax.typing.ArrayLike,
                 cfg: SamplerConfig = SamplerConfig()) -> Sample:
  """Draws one token per row.

  Args:
    rng: PRNG key.
    logits_NV: f32 or bf16 logits.
    cfg: sampler settings; temperature 0 is greedy.

  Returns:
    Sample(token [N] int32, logp [N] f32); see the module docstring for which
    log-prob.
  """
  logits_NV = jnp.asarray(logits_NV)
  chex.assert_rank(logits_NV, 2)
  x = logits_NV.astype(jnp.float32)
  if cfg.temperature == 0:
    token = jnp.argmax(x, axis=-1)
    scored = x
  else:
    token = jax.random.categorical(rng, filtered_logits(x, cfg), axis=-1)
    scored = x / cfg.temperature
  logp_NV = jax.nn.log_softmax(scored, axis=-1)
  logp = jnp.take_along_axis(logp_NV, token[:, None], axis=-1)[:, 0]
  return Sample(token.astype(jnp.int32), logp)
