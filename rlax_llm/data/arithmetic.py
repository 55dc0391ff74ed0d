"""Synthetic integer arithmetic: ``"37+5="`` -> ``"42"``.

A problem is ``a OP b`` with non-negative operands of ``min_digits`` to
``max_digits`` decimal digits and ``OP`` one of ``+``, ``-``, ``*``. The prompt
is ``f"{a}{op}{b}="`` (no spaces) and the answer is the exact integer result
written in canonical form, negative for ``-`` when ``b > a``
(``"3-17="`` -> ``"-14"``). The SFT target (completion) is the answer followed
by EOS: ``tokenizer.encode(problem.answer, add_eos=True)``. Answers are checked
by ``rlax_llm.rewards.arithmetic.verify``.

Sampling distribution. The operator is uniform over ``ops``; each operand
independently takes a digit count uniform in its range, then a value uniform
among numbers of that many digits (1 digit means 0..9). This keeps short and
long operands equally frequent, rather than letting the longest dominate.

Splits. Every problem belongs to exactly one split, ``"train"`` or ``"test"``,
decided by a keyed hash (BLAKE2b with the seed as key) of its canonical text,
so train and test never share a problem; ``a+b`` and ``b+a`` (and ``a*b``,
``b*a``) hash the same and fall in the same split. Each split is sampled by
rejection: draw from the distribution above, keep problems of that split.
When the problem space holds at most ``ENUMERATION_LIMIT`` problems it is
enumerated once, split sizes are exact, and sampling draws directly from the
enumerated split with the same (conditional) distribution.

Determinism. ``test_set(n)`` depends only on the config and ``n`` (and is a
prefix of ``test_set(m)`` for ``m > n``); ``train_batch(step, batch_size)``
depends only on the config, ``step`` and ``batch_size``, so a run resumed at
step k draws exactly what an uninterrupted run would. Python's ``hash()`` is
never used. Streams come from NumPy's PCG64 seeded with ``(seed, stream,
step)``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import re
from typing import NamedTuple

import numpy as np

__all__ = [
    "ArithmeticConfig",
    "ArithmeticTask",
    "ENUMERATION_LIMIT",
    "OPS",
    "Problem",
    "max_answer_length",
    "max_prompt_length",
]

OPS = ("+", "-", "*")
# Problem spaces up to this size are enumerated (exact split sizes).
ENUMERATION_LIMIT = 200_000
# Operands stay below 10**18, inside int64.
_MAX_DIGITS_LIMIT = 18
_COMMUTATIVE = frozenset("+*")
_SPLITS = ("train", "test")
_TEST_STREAM = 1
_TRAIN_STREAM = 2
_TEST_CHUNK = 4096
_PROMPT_RE = re.compile(r"([0-9]+)([+\-*])([0-9]+)=")


class Problem(NamedTuple):
  """One arithmetic problem.

  Attributes:
    prompt: The question, e.g. ``"37+5="``.
    answer: The exact result in canonical form, e.g. ``"42"`` or ``"-14"``.
  """

  prompt: str
  answer: str


@dataclasses.dataclass(frozen=True)
class ArithmeticConfig:
  """Which problems exist and how they are split.

  Attributes:
    min_digits: Fewest decimal digits of an operand (>= 1).
    max_digits: Most decimal digits of an operand (<= 18).
    ops: Operators to use, a subset of ``("+", "-", "*")``.
    mul_max_digits: Optional lower cap on the digits of ``*`` operands (for
      example 1 for "2-digit sums but 1-digit products"); None uses
      ``max_digits``.
    seed: Non-negative int below 2**64; fixes the split and every draw.
    test_fraction: Share of the problem space assigned to the test split, in
      (0, 1).
  """

  min_digits: int = 1
  max_digits: int = 2
  ops: tuple[str, ...] = OPS
  mul_max_digits: int | None = None
  seed: int = 0
  test_fraction: float = 0.1

  def __post_init__(self):
    try:
      object.__setattr__(self, "ops", tuple(self.ops))  # Lists, "+-" too.
    except TypeError:
      raise ValueError(
          f"ArithmeticConfig.ops must be a sequence of operators from {OPS}, "
          f"got {self.ops!r}.") from None
    for name in ("min_digits", "max_digits", "seed"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(
            f"ArithmeticConfig.{name} must be an int, got {value!r}.")
    if self.min_digits < 1:
      raise ValueError(
          f"ArithmeticConfig.min_digits must be >= 1, got {self.min_digits}.")
    if self.max_digits < self.min_digits:
      raise ValueError(
          f"ArithmeticConfig.max_digits={self.max_digits} is smaller than "
          f"min_digits={self.min_digits}; set max_digits >= min_digits.")
    if self.max_digits > _MAX_DIGITS_LIMIT:
      raise ValueError(
          f"ArithmeticConfig.max_digits={self.max_digits} exceeds the "
          f"supported {_MAX_DIGITS_LIMIT} digits; lower max_digits.")
    if not self.ops:
      raise ValueError(
          f"ArithmeticConfig.ops is empty; pick some of {OPS}.")
    for op in self.ops:
      if op not in OPS:
        raise ValueError(
            f"ArithmeticConfig.ops holds unknown operator {op!r}; the "
            f"supported operators are {OPS}.")
    if len(set(self.ops)) != len(self.ops):
      raise ValueError(
          f"ArithmeticConfig.ops repeats an operator: {self.ops}; list each "
          "once (the operator is drawn uniformly from ops).")
    if self.mul_max_digits is not None:
      value = self.mul_max_digits
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(
            f"ArithmeticConfig.mul_max_digits must be an int or None, got "
            f"{value!r}.")
      if "*" in self.ops and value < self.min_digits:
        raise ValueError(
            f"ArithmeticConfig.mul_max_digits={value} is smaller than "
            f"min_digits={self.min_digits}, leaving no '*' problems; raise "
            "mul_max_digits or drop '*' from ops.")
    if not 0 <= self.seed < 2**64:
      raise ValueError(
          f"ArithmeticConfig.seed must be in [0, 2**64), got {self.seed}.")
    if not (isinstance(self.test_fraction, (float, int))
            and 0.0 < self.test_fraction < 1.0):
      raise ValueError(
          "ArithmeticConfig.test_fraction must be a number strictly between "
          f"0 and 1, got {self.test_fraction!r}.")

  def digit_range(self, op: str) -> tuple[int, int]:
    """Returns the inclusive (min, max) operand digit counts of ``op``."""
    hi = self.max_digits
    if op == "*" and self.mul_max_digits is not None:
      hi = min(hi, self.mul_max_digits)
    return self.min_digits, hi


@functools.lru_cache(maxsize=8)
def _shared_enumeration(config: ArithmeticConfig) -> dict[str, np.ndarray]:
  return ArithmeticTask(config)._enumerate()  # pylint: disable=protected-access


def _lowest(digits: int) -> int:
  """Smallest number with ``digits`` decimal digits (0 for one digit)."""
  return 0 if digits == 1 else 10 ** (digits - 1)


def _apply(op: str, a: int, b: int) -> int:
  if op == "+":
    return a + b
  if op == "-":
    return a - b
  return a * b


def _make_problem(op: str, a: int, b: int) -> Problem:
  return Problem(f"{a}{op}{b}=", str(_apply(op, a, b)))


def max_prompt_length(config: ArithmeticConfig) -> int:
  """Longest prompt of the problem space, in characters (= tokens).

  Args:
    config: The task configuration.

  Returns:
    ``max over ops of 2 * max_operand_digits + 2`` (two operands, the
    operator, and ``=``).
  """
  return max(2 * config.digit_range(op)[1] + 2 for op in config.ops)


def max_answer_length(config: ArithmeticConfig) -> int:
  """Longest answer of the problem space, in characters, EOS not counted.

  Add 1 for the EOS token when sizing a completion budget.

  Args:
    config: The task configuration.

  Returns:
    The length of the longest canonical result, sign included.
  """
  longest = 0
  for op in config.ops:
    lo, hi = config.digit_range(op)
    small, big = _lowest(lo), 10**hi - 1
    extremes = [_apply(op, x, y) for x in (small, big) for y in (small, big)]
    longest = max(longest, *(len(str(v)) for v in extremes))
  return longest


class ArithmeticTask:
  """Deterministic train batches and a fixed test set of arithmetic problems.

  Example::

    task = ArithmeticTask(max_digits=2, seed=0)
    task.train_batch(step=0, batch_size=4)   # [Problem('37+5=', '42'), ...]
    task.test_set(100)

  Attributes:
    config: The ``ArithmeticConfig`` in use.
  """

  def __init__(self, config: ArithmeticConfig | None = None, **overrides):
    """Builds the task.

    Args:
      config: A full configuration; defaults to ``ArithmeticConfig()``.
      **overrides: ``ArithmeticConfig`` fields to replace, e.g. ``seed=3``.

    Raises:
      TypeError: If ``config`` is not an ``ArithmeticConfig``.
      ValueError: On an invalid configuration or an unknown field name.
    """
    config = ArithmeticConfig() if config is None else config
    if not isinstance(config, ArithmeticConfig):
      raise TypeError(
          "ArithmeticTask expects an ArithmeticConfig (or keyword fields), "
          f"got {type(config).__name__}.")
    fields = {f.name for f in dataclasses.fields(ArithmeticConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
      raise ValueError(
          f"ArithmeticTask got unknown option(s) {unknown}; valid options "
          f"are {sorted(fields)}.")
    self.config = dataclasses.replace(config, **overrides)
    cfg = self.config
    self._key = int(cfg.seed).to_bytes(8, "little")
    self._threshold = int(cfg.test_fraction * 2**64)
    self._space_size = sum(self._num_operands(op) ** 2 for op in cfg.ops)
    self._enum = None  # Filled lazily by _enumeration().
    self._test_cache: list[Problem] = []

  def __repr__(self) -> str:
    return f"ArithmeticTask({self.config!r})"

  # ---------------------------------------------------------------- sizes --

  @property
  def is_enumerated(self) -> bool:
    """Whether the space is small enough to enumerate (exact split sizes)."""
    return self._space_size <= ENUMERATION_LIMIT

  @property
  def max_prompt_length(self) -> int:
    """See the module function ``max_prompt_length``."""
    return max_prompt_length(self.config)

  @property
  def max_answer_length(self) -> int:
    """See the module function ``max_answer_length``."""
    return max_answer_length(self.config)

  def num_problems(self, split: str = "all") -> int:
    """Number of distinct problems in a split.

    Args:
      split: ``"train"``, ``"test"`` or ``"all"``.

    Returns:
      The exact count when ``is_enumerated`` (or for ``"all"``); otherwise
      the expected count ``round(space * test_fraction)`` (the rest for
      ``"train"``), accurate to a relative ``~1/sqrt(count)`` since every
      problem is assigned by an independent hash.

    Raises:
      ValueError: On an unknown split name.
    """
    if split == "all":
      return self._space_size
    _check_split(split)
    if self.is_enumerated:
      is_test = self._enumeration()["is_test"]
      n_test = int(is_test.sum())
      return n_test if split == "test" else len(is_test) - n_test
    # Integer arithmetic: exact for spaces far beyond float precision.
    n_test = (self._space_size * self._threshold + 2**63) >> 64
    return n_test if split == "test" else self._space_size - n_test

  def split_of(self, problem: Problem | str) -> str:
    """Returns ``"train"`` or ``"test"``: the split a problem belongs to.

    Args:
      problem: A ``Problem`` or its prompt, e.g. ``"37+5="``.

    Raises:
      ValueError: If the prompt is not of the form ``a OP b =``.
    """
    prompt = problem.prompt if isinstance(problem, Problem) else problem
    match = _PROMPT_RE.fullmatch(prompt) if isinstance(prompt, str) else None
    if match is None:
      raise ValueError(
          f"{prompt!r} is not an arithmetic prompt of the form '37+5='.")
    a, op, b = int(match[1]), match[2], int(match[3])
    return "test" if self._in_test(op, a, b) else "train"

  # ------------------------------------------------------------- sampling --

  def test_set(self, n: int) -> list[Problem]:
    """The first ``n`` problems of the fixed test ordering, all distinct.

    Args:
      n: Number of problems, at most ``num_problems("test")`` (at most half
        of it when the space is too large to enumerate).

    Returns:
      ``n`` distinct test-split problems; the same list for the same config,
      and a prefix of ``test_set(m)`` for ``m > n``.

    Raises:
      ValueError: If ``n`` is negative or larger than the test split allows.
    """
    n = _check_count("test_set", "n", n)
    available = self.num_problems("test")
    limit = available if self.is_enumerated else available // 2
    if n > limit:
      how = ("holds" if self.is_enumerated else
             "can sample without long rejection loops (half of the expected")
      raise ValueError(
          f"test_set(n={n}) asks for more distinct problems than the test "
          f"split {how} {limit}"
          f"{'' if self.is_enumerated else f' of ~{available})'} "
          f"(test_fraction={self.config.test_fraction} of "
          f"{self._space_size} problems). Ask for at most {limit}, raise "
          "test_fraction, or widen the problem space (max_digits, ops).")
    if n <= len(self._test_cache):
      return self._test_cache[:n]
    if self.is_enumerated:  # extended as far as asked: orders are prefixes
      order = self._enumeration()["test_order"]
      self._test_cache += [self._problem_at(i)
                           for i in order[len(self._test_cache):n]]
    else:
      self._test_cache = self._sample_test(n)
    return self._test_cache[:n]

  def train_batch(self, step: int, batch_size: int, *,
                  draw: int = 0) -> list[Problem]:
    """Draws a batch of train-split problems, a pure function of ``step``.

    Problems are drawn independently (with replacement), so a batch may
    repeat a problem when the space is small.

    Args:
      step: Non-negative training step.
      batch_size: Number of problems B.
      draw: Index of an extra, independent draw for the same step (e.g. when
        a step samples more prompts to replace uninformative ones); 0 is the
        step's ordinary batch.

    Returns:
      B problems, all in the train split.

    Raises:
      ValueError: On a negative step or batch size, or an empty train split.
    """
    step = _check_count("train_batch", "step", step)
    batch_size = _check_count("train_batch", "batch_size", batch_size)
    draw = _check_count("train_batch", "draw", draw)
    key = [self.config.seed, _TRAIN_STREAM, step] + ([draw] if draw else [])
    rng = np.random.default_rng(key)
    if self.is_enumerated:
      enum = self._enumeration()
      train_idx = enum["train_idx"]
      if not len(train_idx):
        raise ValueError(
            f"The train split is empty ({self._space_size} problems, all "
            f"hashed to test with test_fraction={self.config.test_fraction});"
            " lower test_fraction or widen the problem space.")
      picks = rng.choice(len(train_idx), size=batch_size, p=enum["train_p"])
      return [self._problem_at(train_idx[i]) for i in picks]
    batch: list[Problem] = []
    while len(batch) < batch_size:
      for op, a, b in self._draw(rng, 2 * (batch_size - len(batch)) + 8):
        if not self._in_test(op, a, b):
          batch.append(_make_problem(op, a, b))
          if len(batch) == batch_size:
            break
    return batch

  # ------------------------------------------------------------ internals --

  def _num_operands(self, op: str) -> int:
    lo, hi = self.config.digit_range(op)
    return 10**hi - _lowest(lo)

  def _in_test(self, op: str, a: int, b: int) -> bool:
    """Keyed BLAKE2b of the canonical text, compared to test_fraction."""
    if op in _COMMUTATIVE and a > b:
      a, b = b, a
    digest = hashlib.blake2b(
        f"{a}{op}{b}".encode("ascii"), digest_size=8, key=self._key,
        person=b"rlax_arith").digest()
    return int.from_bytes(digest, "little") < self._threshold

  def _operand_probs(self, op: str) -> tuple[np.ndarray, np.ndarray]:
    """All operand values of ``op`` and the probability of drawing each."""
    lo, hi = self.config.digit_range(op)
    values = np.arange(_lowest(lo), 10**hi, dtype=np.int64)
    digits = 1 + np.searchsorted(10 ** np.arange(1, 19, dtype=np.int64),
                                 values, side="right")
    per_digit = np.where(digits == 1, 10.0, 9.0 * 10.0 ** (digits - 1))
    return values, 1.0 / ((hi - lo + 1) * per_digit)

  def _enumeration(self) -> dict[str, np.ndarray]:
    """Operands, weights, split and orders of the whole space (read-only).

    Made once per configuration in a process (`_shared_enumeration`): tasks
    of the same config share it.
    """
    if self._enum is None:
      try:
        self._enum = _shared_enumeration(self.config)
      except TypeError:  # a config holding an unhashable value
        self._enum = self._enumerate()
    return self._enum

  def _enumerate(self) -> dict[str, np.ndarray]:
    cfg = self.config
    op_idx, a_all, b_all, w_all = [], [], [], []
    for k, op in enumerate(cfg.ops):
      values, probs = self._operand_probs(op)
      n = len(values)
      op_idx.append(np.full(n * n, k, dtype=np.int8))
      a_all.append(np.repeat(values, n))
      b_all.append(np.tile(values, n))
      w_all.append(np.outer(probs, probs).ravel() / len(cfg.ops))
    op_idx = np.concatenate(op_idx)
    a_all, b_all = np.concatenate(a_all), np.concatenate(b_all)
    weight = np.concatenate(w_all)
    ops = cfg.ops
    is_test = np.fromiter(
        (self._in_test(ops[k], a, b)
         for k, a, b in zip(op_idx.tolist(), a_all.tolist(), b_all.tolist())),
        dtype=bool, count=len(op_idx))
    train_idx = np.flatnonzero(~is_test)
    test_idx = np.flatnonzero(is_test)
    train_p = weight[train_idx]
    train_p = train_p / train_p.sum() if len(train_idx) else train_p
    # Weighted order without replacement (Efraimidis-Spirakis keys): the same
    # distribution as drawing test problems one by one and skipping repeats.
    rng = np.random.default_rng([cfg.seed, _TEST_STREAM])
    keys = np.log1p(-rng.random(len(test_idx))) / weight[test_idx]
    test_order = test_idx[np.argsort(-keys, kind="stable")]
    enum = dict(op_idx=op_idx, a=a_all, b=b_all, is_test=is_test,
                train_idx=train_idx, train_p=train_p, test_order=test_order)
    for array in enum.values():
      array.setflags(write=False)
    return enum

  def _problem_at(self, i: int) -> Problem:
    enum = self._enum
    return _make_problem(self.config.ops[enum["op_idx"][i]],
                         int(enum["a"][i]), int(enum["b"][i]))

  def _draw(self, rng: np.random.Generator, size: int):
    """Draws ``size`` (op, a, b) triples from the sampling distribution."""
    cfg = self.config
    ranges = np.array([cfg.digit_range(op) for op in cfg.ops], dtype=np.int64)
    k = rng.integers(0, len(cfg.ops), size=size)
    operands = []
    for _ in range(2):
      digits = rng.integers(ranges[k, 0], ranges[k, 1] + 1)
      low = np.where(digits == 1, 0, 10 ** (digits - 1))
      operands.append(rng.integers(low, 10**digits))
    return [(cfg.ops[i], a, b) for i, a, b in
            zip(k.tolist(), operands[0].tolist(), operands[1].tolist())]

  def _sample_test(self, n: int) -> list[Problem]:
    """Distinct test problems by rejection from the fixed test stream."""
    rng = np.random.default_rng([self.config.seed, _TEST_STREAM])
    seen: set[tuple[str, int, int]] = set()
    out: list[Problem] = []
    expected_draws = n / self.config.test_fraction
    max_draws = int(100 * expected_draws) + 10_000
    draws = 0
    while len(out) < n:
      if draws > max_draws:
        raise RuntimeError(
            f"Could not find {n} distinct test problems in {draws} draws; "
            "ask for fewer or raise test_fraction.")
      draws += _TEST_CHUNK  # Fixed chunks keep test_set(n) a prefix.
      for triple in self._draw(rng, _TEST_CHUNK):
        if triple not in seen and self._in_test(*triple):
          seen.add(triple)
          out.append(_make_problem(*triple))
          if len(out) == n:
            break
    return out


def _check_split(split: str) -> None:
  if split not in _SPLITS:
    raise ValueError(
        f"Unknown split {split!r}; use 'train', 'test' or 'all'.")


def _check_count(fn: str, name: str, value) -> int:
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
      or value < 0):
    raise ValueError(
        f"{fn}: {name} must be a non-negative int, got {value!r}.")
  return int(value)
