"""Tests for rlax_llm.data.countdown."""

import ast
from collections import Counter
from fractions import Fraction
import functools
import itertools

import numpy as np
import pytest

from rlax_llm.data.countdown import CountdownConfig
from rlax_llm.data.countdown import CountdownTask
from rlax_llm.data.countdown import format_prompt
from rlax_llm.data.countdown import Problem

_TASK = CountdownTask(seed=0)


# ------------------------------------------------- independent references --


@functools.lru_cache(maxsize=None)
def _reachable(values: tuple) -> frozenset:
  """All values of expressions using every element of ``values`` once.

  Exact brute force over Fractions: combine any two, in both orders, with
  + - * / (division by non-zero only), recursively.
  """
  if len(values) == 1:
    return frozenset(values)
  out = set()
  n = len(values)
  for i, j in itertools.combinations(range(n), 2):
    a, b = values[i], values[j]
    rest = [values[k] for k in range(n) if k not in (i, j)]
    results = {a + b, a - b, b - a, a * b}
    if b:
      results.add(a / b)
    if a:
      results.add(b / a)
    for r in results:
      out |= _reachable(tuple(sorted(rest + [r])))
  return frozenset(out)


def _is_reachable(numbers, target) -> bool:
  return Fraction(target) in _reachable(
      tuple(sorted(Fraction(n) for n in numbers)))


def _eval_fraction(expr: str):
  """Evaluates ``expr`` (ints, + - * /, parentheses) exactly; lists leaves."""
  leaves = []

  def walk(node):
    if isinstance(node, ast.Expression):
      return walk(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
      leaves.append(node.value)
      return Fraction(node.value)
    if isinstance(node, ast.BinOp):
      a, b = walk(node.left), walk(node.right)
      ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b,
             ast.Mult: lambda: a * b, ast.Div: lambda: a / b}
      return ops[type(node.op)]()
    raise AssertionError(f"unexpected syntax in {expr!r}: {ast.dump(node)}")

  return walk(ast.parse(expr, mode="eval")), leaves


# -------------------------------------------------------------- tests --


def test_reference_solver_on_hand_cases():
  assert _is_reachable((25, 3, 7, 50), 228)       # 25*7 + 50 + 3
  assert _is_reachable((4, 4, 10, 10), 24)        # (10*10 - 4) / 4
  assert _is_reachable((1, 5, 5, 5), 24)          # 5 * (5 - 1/5)
  assert not _is_reachable((1, 1, 1), 100)
  assert not _is_reachable((2, 3), 7)
  assert _reachable((Fraction(2), Fraction(3))) == {5, -1, 1, 6,
                                                    Fraction(2, 3),
                                                    Fraction(3, 2)}


def _sample_problems():
  problems = _TASK.test_set(120)
  for step in range(4):
    problems = problems + _TASK.train_batch(step, 30)
  return problems


def test_targets_reachable_by_brute_force_and_solution_is_exact():
  problems = _sample_problems()
  assert len(problems) == 240
  for p in problems:
    assert isinstance(p, Problem)
    assert _is_reachable(p.numbers, p.target), p
    value, leaves = _eval_fraction(p.solution)
    assert value == p.target, p
    assert Counter(leaves) == Counter(p.numbers), p


def test_fields_respect_config():
  task = CountdownTask(num_numbers=(3, 4), min_number=2, max_number=20,
                       min_target=10, max_target=200, seed=4)
  problems = task.test_set(100) + task.train_batch(0, 100)
  counts = Counter(len(p.numbers) for p in problems)
  assert set(counts) == {3, 4}
  # Counts are drawn uniformly: a 3:1 split is far outside binomial noise.
  assert 60 <= counts[3] <= 140, counts
  for p in problems:
    assert all(2 <= n <= 20 for n in p.numbers), p
    assert 10 <= p.target <= 200, p
    assert p.answer == str(p.target)
    assert p.prompt == format_prompt(p.numbers, p.target)
  assert max(len(p.prompt) for p in problems) <= task.max_prompt_length


def test_prompt_format_hand_case():
  assert format_prompt((25, 3, 7, 50), 228) == (
      "numbers: 25 3 7 50. target: 228. use each number once with + - * /. "
      "equation:")


def test_ops_subset_is_respected():
  task = CountdownTask(ops=("+", "*"), num_numbers=3, max_number=9,
                       max_target=10_000, seed=2)
  for p in task.test_set(50):
    assert set(p.solution) <= set("0123456789+*()"), p
    value, _ = _eval_fraction(p.solution)
    assert value == p.target


def _canon(p):
  return tuple(sorted(p.numbers)), p.target


def test_splits_are_disjoint_and_test_problems_distinct():
  test = _TASK.test_set(300)
  test_keys = {_canon(p) for p in test}
  assert len(test_keys) == 300
  train = [p for s in range(20) for p in _TASK.train_batch(s, 50)]
  assert not test_keys & {_canon(p) for p in train}
  assert all(_TASK.split_of(p) == "test" for p in test)
  assert all(_TASK.split_of(p) == "train" for p in train)
  # Reordering the numbers keeps the split (identity is the multiset).
  p = test[0]
  shuffled = p._replace(numbers=tuple(reversed(p.numbers)))
  assert _TASK.split_of(shuffled) == "test"


def test_test_fraction_is_respected():
  task = CountdownTask(seed=9, test_fraction=0.3)
  # The hash share over independent draws of the generator.
  draws = task._draw_problems(np.random.default_rng(7), 2000)
  share = sum(task.split_of(p) == "test" for p in draws) / len(draws)
  assert 0.26 < share < 0.34, share  # +-4 standard deviations.
  assert all(task.split_of(p) == "train" for p in task.train_batch(0, 200))


def test_determinism_and_prefix():
  again = CountdownTask(seed=0)
  assert again.test_set(50) == _TASK.test_set(50)
  assert _TASK.test_set(20) == _TASK.test_set(200)[:20]
  assert again.train_batch(7, 16) == _TASK.train_batch(7, 16)
  assert again.train_batch(7, 16, draw=1) != _TASK.train_batch(7, 16)
  assert _TASK.train_batch(7, 16) != _TASK.train_batch(8, 16)
  other = CountdownTask(seed=1)
  assert other.test_set(50) != _TASK.test_set(50)
  # A prefix also when the longer list was asked for first.
  fresh = CountdownTask(seed=0)
  long = fresh.test_set(300)
  assert fresh.test_set(10) == long[:10] == _TASK.test_set(10)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_numbers=(1, 3)), "num_numbers"),
    (dict(num_numbers=(4, 3)), "num_numbers"),
    (dict(min_number=0), "min_number"),
    (dict(min_target=50, max_target=10), "max_target"),
    (dict(ops=("+", "^")), "ops"),
    (dict(ops=("-", "/")), r"needs '\+' or '\*'"),
    (dict(seed=-1), "seed"),
    (dict(test_fraction=1.0), "test_fraction"),
    (dict(colour=3), "unknown option"),
])
def test_bad_config_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    CountdownTask(**kwargs)


def test_bad_arguments_and_impossible_requests():
  with pytest.raises(ValueError, match="batch_size"):
    _TASK.train_batch(0, -1)
  with pytest.raises(ValueError, match="step"):
    _TASK.train_batch(1.5, 4)
  with pytest.raises(TypeError, match="CountdownConfig"):
    CountdownTask({"seed": 0})
  # 2 numbers in 1..2 give at most a handful of distinct problems.
  tiny = CountdownTask(num_numbers=2, max_number=2, max_target=10, seed=0)
  with pytest.raises(RuntimeError, match="too small"):
    tiny.test_set(50)
  # No tree over numbers <= 3 reaches 1000.
  with pytest.raises(RuntimeError, match="target range"):
    CountdownTask(num_numbers=2, max_number=3, min_target=1000,
                  max_target=2000).train_batch(0, 1)


def test_config_object_and_overrides():
  cfg = CountdownConfig(num_numbers=4, seed=3)
  task = CountdownTask(cfg, max_number=50)
  assert task.config.num_numbers == (4, 4)
  assert task.config.max_number == 50 and task.config.seed == 3
  assert all(len(p.numbers) == 4 for p in task.test_set(30))
