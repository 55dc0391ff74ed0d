"""Loss aggregation over a masked [N, T] batch of per-token values.

A policy-gradient loss is first computed per token (``x_NT``) and then reduced
to a scalar. How that reduction weighs tokens and sequences differs between
methods and changes what is optimised:

* ``"token_mean"``: every valid token weighs the same
  (DAPO, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale",
  arXiv:2503.14476).
* ``"seq_mean_token_mean"``: mean over sequences of per-sequence token means,
  as in the original GRPO ("DeepSeekMath: Pushing the Limits of Mathematical
  Reasoning in Open Language Models", arXiv:2402.03300).
* ``"seq_mean_token_sum"``: sum over tokens, mean over sequences.
* ``"seq_mean_token_sum_norm"``: token sum divided by a constant (such as the
  maximum completion length) and by the number of sequences, removing the
  length bias (Dr.GRPO, "Understanding R1-Zero-Like Training: A Critical
  Perspective", arXiv:2503.20783).

Micro-batching. Every mode is a sum of per-token (or per-sequence) terms
divided by a normaliser. Passing the normaliser of the *whole* rollout batch
(``num_tokens``, ``num_seqs``, see :func:`normalizers`) to each micro-batch
makes the sum of micro-batch losses, and of their gradients, equal to the
full-batch loss. When they are left as ``None`` the local counts are used.

Masks are binary: a numeric mask is read as ``mask_NT != 0``. Values of
``x_NT`` at masked positions are ignored (they may be ``inf`` or ``NaN``) and
receive zero gradient. Fold token weights into ``x_NT`` before aggregating.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

import chex
import jax
import jax.numpy as jnp

__all__ = [
    "AGGREGATIONS",
    "AggregationFn",
    "aggregate",
    "as_bool_mask",
    "masked_mean",
    "masked_sum",
    "normalizers",
]


class AggregationFn(Protocol):
  """Signature of a registered aggregation mode (all arguments resolved)."""

  def __call__(
      self,
      x_NT: jax.Array,
      valid_NT: jax.Array,
      *,
      num_tokens: jax.Array,
      num_seqs: jax.Array,
      norm_constant: Optional[jax.Array],
  ) -> jax.Array:
    ...


def as_bool_mask(mask_NT: jax.typing.ArrayLike) -> jax.Array:
  """Reads a mask as bool: bool masks pass through, numeric ones are ``!= 0``."""
  mask_NT = jnp.asarray(mask_NT)
  return mask_NT if mask_NT.dtype == jnp.bool_ else mask_NT != 0


def _float_dtype(x: jax.Array) -> jnp.dtype:
  """float32 for float32 and narrower inputs, float64 stays float64."""
  return jnp.promote_types(x.dtype, jnp.float32)


def masked_sum(x_NT: jax.typing.ArrayLike,
               mask_NT: jax.typing.ArrayLike,
               axis: Optional[int] = None) -> jax.Array:
  """Sum of ``x_NT`` over valid entries; masked entries (even NaN) add 0.

  Args:
    x_NT: values, any shape broadcastable against ``mask_NT``.
    mask_NT: validity mask, bool or numeric (``!= 0`` is valid).
    axis: axis to reduce over, or ``None`` for all axes.

  Returns:
    Masked sum in float32 (float64 for float64 input).
  """
  x_NT = jnp.asarray(x_NT)
  x_NT = x_NT.astype(_float_dtype(x_NT))
  valid_NT = as_bool_mask(mask_NT)
  return jnp.sum(jnp.where(valid_NT, x_NT, 0), axis=axis)


def masked_mean(x_NT: jax.typing.ArrayLike,
                mask_NT: jax.typing.ArrayLike,
                axis: Optional[int] = None) -> jax.Array:
  """Mean of ``x_NT`` over valid entries, ``sum(x * m) / max(sum(m), 1)``.

  An all-masked input gives 0, never NaN.

  Args:
    x_NT: values, any shape broadcastable against ``mask_NT``.
    mask_NT: validity mask, bool or numeric (``!= 0`` is valid).
    axis: axis to reduce over, or ``None`` for all axes.

  Returns:
    Masked mean in float32 (float64 for float64 input).
  """
  valid_NT = as_bool_mask(mask_NT)
  total = masked_sum(x_NT, valid_NT, axis=axis)
  count = jnp.sum(valid_NT, axis=axis).astype(total.dtype)
  return total / jnp.maximum(count, 1)


def normalizers(mask_NT: jax.typing.ArrayLike) -> dict[str, jax.Array]:
  """Global counts of a full rollout batch, to pass to every micro-batch.

  ``aggregate(x[s], mask[s], mode, **normalizers(mask))`` summed over a
  partition of the rows ``s`` equals ``aggregate(x, mask, mode)``.

  Args:
    mask_NT: [N, T] validity mask of the whole batch.

  Returns:
    ``{"num_tokens": float32 scalar, number of valid tokens,
    "num_seqs": float32 scalar, number of rows with >= 1 valid token}``.
  """
  valid_NT = as_bool_mask(mask_NT)
  chex.assert_rank(valid_NT, 2)
  len_N = jnp.sum(valid_NT, axis=-1)
  return dict(
      num_tokens=jnp.sum(len_N).astype(jnp.float32),
      num_seqs=jnp.sum(len_N > 0).astype(jnp.float32),
  )


def _token_mean(x_NT, valid_NT, *, num_tokens, num_seqs, norm_constant):
  """sum_{n,t} m x / max(num_tokens, 1)."""
  del num_seqs, norm_constant
  return masked_sum(x_NT, valid_NT) / jnp.maximum(num_tokens, 1)


def _seq_mean_token_mean(x_NT, valid_NT, *, num_tokens, num_seqs,
                         norm_constant):
  """sum_n [sum_t m x / max(len_n, 1)] / max(num_seqs, 1)."""
  del num_tokens, norm_constant
  seq_mean_N = masked_mean(x_NT, valid_NT, axis=-1)
  return jnp.sum(seq_mean_N) / jnp.maximum(num_seqs, 1)


def _seq_mean_token_sum(x_NT, valid_NT, *, num_tokens, num_seqs,
                        norm_constant):
  """sum_{n,t} m x / max(num_seqs, 1)."""
  del num_tokens, norm_constant
  return masked_sum(x_NT, valid_NT) / jnp.maximum(num_seqs, 1)


def _seq_mean_token_sum_norm(x_NT, valid_NT, *, num_tokens, num_seqs,
                             norm_constant):
  """sum_{n,t} m x / (max(num_seqs, 1) * norm_constant)."""
  del num_tokens
  return masked_sum(x_NT, valid_NT) / (
      jnp.maximum(num_seqs, 1) * norm_constant)


AGGREGATIONS: dict[str, AggregationFn] = {
    "token_mean": _token_mean,
    "seq_mean_token_mean": _seq_mean_token_mean,
    "seq_mean_token_sum": _seq_mean_token_sum,
    "seq_mean_token_sum_norm": _seq_mean_token_sum_norm,
}

_NEEDS_NORM_CONSTANT = frozenset({"seq_mean_token_sum_norm"})


def aggregate(
    x_NT: jax.typing.ArrayLike,
    mask_NT: jax.typing.ArrayLike,
    mode: str | Callable[..., jax.Array] = "token_mean",
    *,
    num_tokens: Optional[jax.typing.ArrayLike] = None,
    num_seqs: Optional[jax.typing.ArrayLike] = None,
    norm_constant: Optional[jax.typing.ArrayLike] = None,
) -> jax.Array:
  """Reduces per-token values to a scalar loss.

  With ``m`` the mask, ``len_n = sum_t m[n, t]``:

    token_mean:              sum_{n,t} m x / max(num_tokens, 1)
    seq_mean_token_mean:     sum_n (sum_t m x / max(len_n, 1)) / max(num_seqs, 1)
    seq_mean_token_sum:      sum_{n,t} m x / max(num_seqs, 1)
    seq_mean_token_sum_norm: sum_{n,t} m x / (max(num_seqs, 1) * norm_constant)

  Token-mean is DAPO's token-level loss (arXiv:2503.14476); seq-mean-token-mean
  is GRPO's (DeepSeekMath, arXiv:2402.03300); seq-mean-token-sum-norm is
  Dr.GRPO's ("Understanding R1-Zero-Like Training: A Critical Perspective",
  arXiv:2503.20783). ``mode`` selects an entry of :data:`AGGREGATIONS`; under
  ``jax.jit`` it must be static.

  verl's ``agg_loss`` modes ``token-mean``, ``seq-mean-token-mean``,
  ``seq-mean-token-sum`` and ``seq-mean-token-sum-norm`` are these four, and
  TRL's GRPO ``loss_type`` values ``grpo``, ``dapo``/``bnpo`` and ``dr_grpo``
  are seq_mean_token_mean, token_mean and seq_mean_token_sum_norm (TRL's
  Dr.GRPO divides by batch size x max_completion_length, the same constant).
  The difference is where the normaliser comes from: each micro-batch's own
  counts make the accumulated gradient depend on how the batch was split
  (a token in a short micro-batch weighs more); here ``num_tokens`` and
  ``num_seqs`` are those of the whole minibatch, so the split changes
  nothing (tests/test_aggregation.py checks 1e-6).

  Args:
    x_NT: [N, T] per-token values (e.g. per-token losses), any float dtype.
    mask_NT: [N, T] validity mask, bool or numeric (``!= 0`` is valid). Masked
      entries of ``x_NT`` are ignored and get zero gradient.
    mode: name in :data:`AGGREGATIONS`, or a callable with the signature of
      :class:`AggregationFn`.
    num_tokens: global number of valid tokens (scalar, may be a float array);
      defaults to the local count.
    num_seqs: global number of sequences with >= 1 valid token; defaults to
      the local count.
    norm_constant: constant divisor for ``"seq_mean_token_sum_norm"``, e.g.
      the maximum completion length. Required by that mode, ignored by others.

  Returns:
    Scalar float32 loss (float64 for float64 ``x_NT``); 0 for an empty mask.

  Raises:
    ValueError: unknown ``mode`` or missing ``norm_constant``.
  """
  x_NT = jnp.asarray(x_NT)
  valid_NT = as_bool_mask(mask_NT)
  chex.assert_rank(x_NT, 2)
  chex.assert_equal_shape([x_NT, valid_NT])
  if callable(mode):
    fn = mode
  else:
    try:
      fn = AGGREGATIONS[mode]
    except KeyError:
      raise ValueError(
          f"Unknown aggregation mode {mode!r}; valid modes are "
          f"{sorted(AGGREGATIONS)}.") from None
    if mode in _NEEDS_NORM_CONSTANT and norm_constant is None:
      raise ValueError(
          f"Aggregation mode {mode!r} (Dr.GRPO) needs norm_constant, the "
          "constant token-sum divisor; pass e.g. norm_constant=<maximum "
          "completion length>.")
  if num_tokens is None or num_seqs is None:
    local = normalizers(valid_NT)
    num_tokens = local["num_tokens"] if num_tokens is None else num_tokens
    num_seqs = local["num_seqs"] if num_seqs is None else num_seqs
  dtype = _float_dtype(x_NT)
  num_tokens = jnp.asarray(num_tokens, dtype)
  num_seqs = jnp.asarray(num_seqs, dtype)
  chex.assert_rank([num_tokens, num_seqs], 0)
  if norm_constant is not None:
    norm_constant = jnp.asarray(norm_constant, dtype)
    chex.assert_rank(norm_constant, 0)
  return fn(x_NT, valid_NT, num_tokens=num_tokens, num_seqs=num_seqs,
            norm_constant=norm_constant)
