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


# Vocabulary entries per block of the two-level cumulative sum.
_CDF_BLOCK = 256
# Entries summed by one triangular matmul in `_cumsum`.
_SCAN_BLOCK = 16


def _cumsum(x: jax.Array) -> jax.Array:
  """Inclusive cumulative sum over the last axis, in blocks of 16.

  Each block's running sums are one matmul with a triangular matrix of ones
  (at full f32 precision) and the blocks' offsets the same, recursively, over
  the block totals: a few passes over x where XLA's CPU cumsum (a
  reduce-window) is several times slower. Rounding is that of 16-term sums.
  """
  n = x.shape[-1]
  bs = min(n, _SCAN_BLOCK)
  nb = -(-n // bs)
  xb = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nb * bs - n)]).reshape(
      *x.shape[:-1], nb, bs)
  upper = jnp.triu(jnp.ones((bs, bs), x.dtype))
  within = jnp.matmul(xb, upper, precision=jax.lax.Precision.HIGHEST)
  if nb > 1:
    totals = within[..., -1]
    within = within + (_cumsum(totals) - totals)[..., None]
  return within.reshape(*x.shape[:-1], nb * bs)[..., :n]


def _first_true(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(index of the first True on the last axis, whether there is one)."""
  return jnp.argmax(mask, axis=-1), jnp.any(mask, axis=-1)


def _last_true(mask: jax.Array) -> jax.Array:
  """Index of the last True on the last axis (0 when there is none)."""
  n = mask.shape[-1]
  return jnp.where(jnp.any(mask, axis=-1),
                   n - 1 - jnp.argmax(mask[..., ::-1], axis=-1), 0)


def categorical_from_uniform(u_N: jax.typing.ArrayLike,
                             logits_NV: jax.typing.ArrayLike) -> jax.Array:
  """Inverse-CDF draw of one token per row from softmax(logits_NV).

  Token n is the first index v with F_n(v) > u_n * F_n(V - 1), where F_n is
  the running sum of exp(logits - max): P(v) = p_v exactly up to float
  rounding of F, and a token of probability 0 (a -inf logit) is never drawn.
  Above 256 entries F is summed in two levels, per block of 256 and then
  within the one block the draw falls into, so the cost is two passes over V
  plus one block, with one random number per row (Gumbel-max needs V of
  them, which dominates sampling on a CPU: 4-5x slower at V = 4k-32k).

  Args:
    u_N: [N] uniforms in [0, 1).
    logits_NV: [N, V] logits; every row needs one finite entry.

  Returns:
    [N] int32 tokens.
  """
  return _inverse_cdf(u_N, logits_NV)[0]


def _inverse_cdf(u_N, logits_NV):
  """(tokens, row max, row sum of exp(logits - max)) of the draw above."""
  x = jnp.asarray(logits_NV, jnp.float32)
  u_N = jnp.asarray(u_N, jnp.float32)
  chex.assert_rank([u_N, x], [1, 2])
  n, v = x.shape
  m_N = jnp.max(x, axis=-1)
  p = jnp.exp(x - m_N[:, None])  # 0 at -inf
  if v <= _CDF_BLOCK:  # one level
    cdf_NV = _cumsum(p)
    total_N = cdf_NV[:, -1]
    tok, found = _first_true(cdf_NV > (u_N * total_N)[:, None])
    tok = jnp.where(found, tok, _last_true(p > 0))
    return tok.astype(jnp.int32), m_N, total_N
  bs = _CDF_BLOCK
  nb = -(-v // bs)
  p = jnp.pad(p, ((0, 0), (0, nb * bs - v))).reshape(n, nb, bs)
  mass_NB = jnp.sum(p, axis=-1)
  cdf_NB = _cumsum(mass_NB)
  total_N = cdf_NB[:, -1]
  target_N = u_N * total_N
  blk, found = _first_true(cdf_NB > target_N[:, None])
  # Rounding can put the target at or past the total: the last block with mass.
  blk = jnp.where(found, blk, _last_true(mass_NB > 0))
  within_NS = jnp.take_along_axis(p, blk[:, None, None], axis=1)[:, 0]
  before_N = jnp.take_along_axis(cdf_NB - mass_NB, blk[:, None], axis=1)[:, 0]
  cdf_NS = _cumsum(within_NS)
  j, found = _first_true(cdf_NS > (target_N - before_N)[:, None])
  j = jnp.where(found, j, _last_true(within_NS > 0))
  return (blk * bs + j).astype(jnp.int32), m_N, total_N


def _is_filtering(cfg: SamplerConfig) -> bool:
  return cfg.top_k > 0 or cfg.top_p < 1.0 or cfg.min_p > 0.0


def sample_token_from_uniform(u_N: jax.typing.ArrayLike,
                              logits_NV: jax.typing.ArrayLike,
                              cfg: SamplerConfig = SamplerConfig()) -> Sample:
  """`sample_token` with the row's uniform given (see `sample_token`).

  Row n depends only on (u_N[n], logits_NV[n]), so a batch may be drawn in
  any split into chunks with the same result.
  """
  logits_NV = jnp.asarray(logits_NV)
  chex.assert_rank(logits_NV, 2)
  x = logits_NV.astype(jnp.float32)
  if cfg.temperature == 0:
    token = jnp.argmax(x, axis=-1).astype(jnp.int32)
    logp_NV = jax.nn.log_softmax(x, axis=-1)
    return Sample(token,
                  jnp.take_along_axis(logp_NV, token[:, None], axis=-1)[:, 0])
  scored = x / cfg.temperature
  if _is_filtering(cfg):
    token = categorical_from_uniform(u_N, filtered_logits(x, cfg))
    logz_N = jax.nn.logsumexp(scored, axis=-1)
  else:  # the draw's own normaliser is the score's
    token, m_N, total_N = _inverse_cdf(u_N, scored)
    logz_N = m_N + jnp.log(total_N)
  logp = jnp.take_along_axis(scored, token[:, None], axis=-1)[:, 0] - logz_N
  return Sample(token, logp)


def sample_token(rng: jax.Array, logits_NV: jax.typing.ArrayLike,
                 cfg: SamplerConfig = SamplerConfig()) -> Sample:
  """Draws one token per row.

  The draw is inverse-CDF sampling (`categorical_from_uniform`) from the
  tempered, filtered softmax, with one uniform per row drawn from `rng`.

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
  u_N = jax.random.uniform(rng, logits_NV.shape[:1], jnp.float32)
  return sample_token_from_uniform(u_N, logits_NV, cfg)
