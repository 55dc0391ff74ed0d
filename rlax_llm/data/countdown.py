"""Countdown: combine 3-4 numbers with ``+ - * /`` into a target.

A problem gives ``k`` positive integers (``k`` drawn uniformly from
``num_numbers``) and a target; a solution is an arithmetic expression that
uses every number exactly once and evaluates exactly to the target, e.g.
numbers ``(25, 3, 7, 50)`` and target ``228``: ``"((25*7)+50)+3"``.

Construction. Targets are reachable by construction: the numbers are drawn
uniformly in ``[min_number, max_number]`` (with repetition), then combined by a
random expression tree: pick two items of the pool uniformly, pick an
operator uniformly among those whose result is a positive integer (``a - b``
only when ``a > b``, ``a / b`` only when ``b`` divides ``a``), put the result
back, until one value is left. That value is the target when it lies in
``[min_target, max_target]``; otherwise the numbers and the tree are redrawn
(the count ``k`` is kept, so counts stay uniform). The
expression is stored as ``Problem.solution`` so the reachability claim is
checkable. Every intermediate value is a positive integer, so the solution
evaluates exactly under integer or ``Fraction`` arithmetic.

Splits. A problem's identity is its multiset of numbers and its target; a
keyed hash (BLAKE2b with the seed as key) of that canonical text assigns it to
``"train"`` or ``"test"``, so the splits never share a problem, whatever the
order its numbers are shown in. Each split is sampled by rejection.

Determinism. ``test_set(n)`` depends only on the config and ``n`` and is a
prefix of ``test_set(m)`` for ``m > n``; ``train_batch(step, batch_size,
draw)`` depends only on the config and its arguments. Streams come from
NumPy's PCG64 seeded with ``(seed, stream, step[, draw])``; Python's
``hash()`` is never used.

Answers are checked by ``rlax_llm.rewards.countdown.verify(completion,
numbers, target)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import NamedTuple

import numpy as np

__all__ = ["CountdownConfig", "CountdownTask", "Problem", "format_prompt"]

OPS = ("+", "-", "*", "/")
_SPLITS = ("train", "test")
_TEST_STREAM = 1
_TRAIN_STREAM = 2
_TEST_CHUNK = 256
# Draws of one problem before giving up on the target range.
_MAX_TARGET_TRIES = 10_000


class Problem(NamedTuple):
  """One Countdown problem.

  Attributes:
    prompt: The question text (see ``format_prompt``).
    answer: The target as a decimal string, e.g. ``"228"``.
    numbers: The given numbers, in the order the prompt shows them.
    target: The target value.
    solution: One expression over ``numbers`` (each used once) equal to
      ``target``, e.g. ``"((25*7)+50)+3"``.
  """

  prompt: str
  answer: str
  numbers: tuple[int, ...]
  target: int
  solution: str


def format_prompt(numbers, target: int) -> str:
  """Renders the question for ``numbers`` and ``target``.

  The text uses lowercase letters, digits, ``+ - * /`` and light punctuation,
  e.g. ``"numbers: 25 3 7 50. target: 228. use each number once with + - *
  /. equation:"``.

  Args:
    numbers: The given numbers.
    target: The target value.

  Returns:
    The prompt string.
  """
  shown = " ".join(str(int(n)) for n in numbers)
  return (f"numbers: {shown}. target: {int(target)}. "
          "use each number once with + - * /. equation:")


@dataclasses.dataclass(frozen=True)
class CountdownConfig:
  """Which problems exist and how they are split.

  Attributes:
    num_numbers: Inclusive ``(min, max)`` count of given numbers, each >= 2;
      the count of a problem is uniform in this range.
    min_number: Smallest given number (>= 1).
    max_number: Largest given number.
    min_target: Smallest accepted target (>= 1).
    max_target: Largest accepted target.
    ops: Operators the construction may use, a subset of ``+ - * /``.
    seed: Non-negative int below 2**64; fixes the split and every draw.
    test_fraction: Share of problems assigned to the test split, in (0, 1).
  """

  num_numbers: tuple[int, int] = (3, 4)
  min_number: int = 1
  max_number: int = 99
  min_target: int = 1
  max_target: int = 999
  ops: tuple[str, ...] = OPS
  seed: int = 0
  test_fraction: float = 0.1

  def __post_init__(self):
    counts = self.num_numbers
    if isinstance(counts, (int, np.integer)) and not isinstance(counts, bool):
      counts = (int(counts), int(counts))
    try:
      counts = tuple(counts)
    except TypeError:
      counts = ()
    if (len(counts) != 2 or any(
        isinstance(c, bool) or not isinstance(c, (int, np.integer))
        for c in counts)):
      raise ValueError(
          "CountdownConfig.num_numbers must be an int or an inclusive (min, "
          f"max) pair of ints, got {self.num_numbers!r}.")
    counts = (int(counts[0]), int(counts[1]))
    object.__setattr__(self, "num_numbers", counts)
    if not 2 <= counts[0] <= counts[1] <= 8:
      raise ValueError(
          f"CountdownConfig.num_numbers={counts} must satisfy 2 <= min <= max"
          " <= 8.")
    for name in ("min_number", "max_number", "min_target", "max_target",
                 "seed"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(
            f"CountdownConfig.{name} must be an int, got {value!r}.")
    if not 1 <= self.min_number <= self.max_number:
      raise ValueError(
          f"CountdownConfig needs 1 <= min_number <= max_number, got "
          f"min_number={self.min_number}, max_number={self.max_number}.")
    if not 1 <= self.min_target <= self.max_target:
      raise ValueError(
          f"CountdownConfig needs 1 <= min_target <= max_target, got "
          f"min_target={self.min_target}, max_target={self.max_target}.")
    try:
      object.__setattr__(self, "ops", tuple(self.ops))
    except TypeError:
      raise ValueError(
          f"CountdownConfig.ops must be a sequence of operators from {OPS}, "
          f"got {self.ops!r}.") from None
    if not self.ops or any(op not in OPS for op in self.ops):
      raise ValueError(
          f"CountdownConfig.ops={self.ops!r} must be a non-empty subset of "
          f"{OPS}.")
    if len(set(self.ops)) != len(self.ops):
      raise ValueError(
          f"CountdownConfig.ops repeats an operator: {self.ops}; list each "
          "once.")
    if "+" not in self.ops and "*" not in self.ops:
      raise ValueError(
          f"CountdownConfig.ops={self.ops} needs '+' or '*': with only '-' "
          "and '/' many number pools cannot be combined into one value.")
    if not 0 <= self.seed < 2**64:
      raise ValueError(
          f"CountdownConfig.seed must be in [0, 2**64), got {self.seed}.")
    if not (isinstance(self.test_fraction, (float, int))
            and 0.0 < self.test_fraction < 1.0):
      raise ValueError(
          "CountdownConfig.test_fraction must be a number strictly between 0 "
          f"and 1, got {self.test_fraction!r}.")


class CountdownTask:
  """Deterministic train batches and a fixed test set of Countdown problems.

  Example::

    task = CountdownTask(num_numbers=(3, 4), max_number=99, seed=0)
    task.train_batch(step=0, batch_size=4)
    task.test_set(100)

  Attributes:
    config: The ``CountdownConfig`` in use.
  """

  def __init__(self, config: CountdownConfig | None = None, **overrides):
    """Builds the task.

    Args:
      config: A full configuration; defaults to ``CountdownConfig()``.
      **overrides: ``CountdownConfig`` fields to replace, e.g. ``seed=3``.

    Raises:
      TypeError: If ``config`` is not a ``CountdownConfig``.
      ValueError: On an invalid configuration or an unknown field name.
    """
    config = CountdownConfig() if config is None else config
    if not isinstance(config, CountdownConfig):
      raise TypeError(
          "CountdownTask expects a CountdownConfig (or keyword fields), got "
          f"{type(config).__name__}.")
    fields = {f.name for f in dataclasses.fields(CountdownConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
      raise ValueError(
          f"CountdownTask got unknown option(s) {unknown}; valid options are "
          f"{sorted(fields)}.")
    self.config = dataclasses.replace(config, **overrides)
    self._key = int(self.config.seed).to_bytes(8, "little")
    self._threshold = int(self.config.test_fraction * 2**64)
    self._test_cache: list[Problem] = []
    self._test_rng = None
    self._test_seen: set[str] = set()

  def __repr__(self) -> str:
    return f"CountdownTask({self.config!r})"

  @property
  def max_prompt_length(self) -> int:
    """Longest prompt of the problem space, in characters."""
    cfg = self.config
    return len(format_prompt([cfg.max_number] * cfg.num_numbers[1],
                             cfg.max_target))

  @property
  def max_answer_length(self) -> int:
    """Longest answer (target) in characters."""
    return len(str(self.config.max_target))

  def split_of(self, problem: Problem) -> str:
    """Returns ``"train"`` or ``"test"``: the split a problem belongs to.

    Args:
      problem: A ``Problem`` (only ``numbers`` and ``target`` are used).
    """
    return "test" if self._in_test(problem.numbers, problem.target) else "train"

  # ------------------------------------------------------------- sampling --

  def test_set(self, n: int) -> list[Problem]:
    """The first ``n`` problems of the fixed test ordering, all distinct.

    Args:
      n: Number of problems.

    Returns:
      ``n`` test-split problems with distinct (number multiset, target); the
      same list for the same config, and a prefix of ``test_set(m)`` for
      ``m > n``.

    Raises:
      ValueError: If ``n`` is not a non-negative int.
      RuntimeError: If the problem space holds too few distinct test
        problems to find ``n`` of them.
    """
    n = _check_count("test_set", "n", n)
    if self._test_rng is None:
      self._test_rng = np.random.default_rng(
          [self.config.seed, _TEST_STREAM])
    expected = n / self.config.test_fraction
    max_draws = int(50 * expected) + 20 * _TEST_CHUNK
    draws = 0
    while len(self._test_cache) < n:
      if draws > max_draws:
        raise RuntimeError(
            f"Found only {len(self._test_cache)} distinct Countdown test "
            f"problems after {draws} more draws (asked for {n}); the "
            "problem space is too small. Ask for fewer, raise test_fraction "
            "or widen max_number / the target range.")
      # Whole chunks only, so that the cache never depends on ``n``.
      for problem in self._draw_problems(self._test_rng, _TEST_CHUNK):
        canon = _canonical(problem.numbers, problem.target)
        if canon not in self._test_seen and self._in_test(
            problem.numbers, problem.target):
          self._test_seen.add(canon)
          self._test_cache.append(problem)
      draws += _TEST_CHUNK
    return self._test_cache[:n]

  def train_batch(self, step: int, batch_size: int, *,
                  draw: int = 0) -> list[Problem]:
    """Draws a batch of train-split problems, a pure function of the args.

    Problems are drawn independently (with replacement).

    Args:
      step: Non-negative training step.
      batch_size: Number of problems B.
      draw: Index of an extra, independent draw for the same step; 0 is the
        step's ordinary batch.

    Returns:
      B problems, all in the train split.

    Raises:
      ValueError: On a negative step, batch size or draw.
    """
    step = _check_count("train_batch", "step", step)
    batch_size = _check_count("train_batch", "batch_size", batch_size)
    draw = _check_count("train_batch", "draw", draw)
    key = [self.config.seed, _TRAIN_STREAM, step] + ([draw] if draw else [])
    rng = np.random.default_rng(key)
    batch: list[Problem] = []
    tries = 0
    while len(batch) < batch_size:
      tries += 1
      if tries > 1000 * (batch_size + 1):
        raise RuntimeError(
            "Could not draw train-split Countdown problems: nearly every "
            "problem hashes to test. Lower test_fraction.")
      problem = self._draw_problem(rng)
      if not self._in_test(problem.numbers, problem.target):
        batch.append(problem)
    return batch

  # ------------------------------------------------------------ internals --

  def _in_test(self, numbers, target: int) -> bool:
    digest = hashlib.blake2b(
        _canonical(numbers, target).encode("ascii"), digest_size=8,
        key=self._key, person=b"rlax_count").digest()
    return int.from_bytes(digest, "little") < self._threshold

  def _draw_problems(self, rng: np.random.Generator, size: int):
    return [self._draw_problem(rng) for _ in range(size)]

  def _draw_problem(self, rng: np.random.Generator) -> Problem:
    """One problem: numbers, a random expression tree, range rejection."""
    cfg = self.config
    lo, hi = cfg.num_numbers
    k = int(rng.integers(lo, hi + 1))  # Fixed first: counts stay uniform.
    for _ in range(_MAX_TARGET_TRIES):
      numbers = tuple(int(v) for v in rng.integers(
          cfg.min_number, cfg.max_number + 1, size=k))
      value, expr = _random_tree(rng, numbers, cfg.ops)
      if value is not None and cfg.min_target <= value <= cfg.max_target:
        return Problem(format_prompt(numbers, value), str(value), numbers,
                       value, expr)
    raise RuntimeError(
        f"No target in [{cfg.min_target}, {cfg.max_target}] after "
        f"{_MAX_TARGET_TRIES} draws of {cfg.num_numbers} numbers in "
        f"[{cfg.min_number}, {cfg.max_number}] with ops {cfg.ops}; widen the "
        "target range or change the number range.")


def _random_tree(rng: np.random.Generator, numbers, ops):
  """Combines ``numbers`` pairwise at random into one positive integer.

  Returns:
    ``(value, expression)``, or ``(None, None)`` when some pair admits no
    operator with a positive integer result (possible only without ``+`` or
    ``*`` in ``ops``).
  """
  pool = [(int(v), str(int(v))) for v in numbers]
  while len(pool) > 1:
    i = int(rng.integers(len(pool)))
    j = int(rng.integers(len(pool) - 1))
    j += j >= i  # A uniform pair of distinct items.
    (a, ea), (b, eb) = pool[i], pool[j]
    if a < b:  # Order the pair so that '-' and '/' can be positive.
      (a, ea), (b, eb) = (b, eb), (a, ea)
    options = []
    for op in ops:
      if op == "+":
        options.append((a + b, op))
      elif op == "*":
        options.append((a * b, op))
      elif op == "-" and a > b:
        options.append((a - b, op))
      elif op == "/" and a % b == 0:
        options.append((a // b, op))
    if not options:
      return None, None
    value, op = options[int(rng.integers(len(options)))]
    merged = (value, f"({ea}{op}{eb})")
    pool = [p for k, p in enumerate(pool) if k not in (i, j)] + [merged]
  value, expr = pool[0]
  if expr.startswith("(") and expr.endswith(")"):
    expr = expr[1:-1]
  return value, expr


def _canonical(numbers, target: int) -> str:
  return ",".join(str(int(n)) for n in sorted(numbers)) + f"->{int(target)}"


def _check_count(fn: str, name: str, value) -> int:
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
      or value < 0):
    raise ValueError(
        f"{fn}: {name} must be a non-negative int, got {value!r}.")
  return int(value)
