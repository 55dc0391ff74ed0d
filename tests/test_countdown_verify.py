"""Tests for rlax_llm.rewards.countdown."""

import fractions
import os
import random
import time

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
import pytest

from rlax_llm.rewards import countdown


@pytest.mark.parametrize("completion,numbers,target,expected", [
    ("<answer>(25 - 5) * 4 / 2</answer>", [25, 5, 4, 2], 40, 1.0),
    ("<answer>(25 - 5) * 4 / 2</answer>", [25, 5, 4, 2], 41, 0.0),
    ("<answer>25 + 5</answer>", [25, 5, 4, 2], 30, 1.0),  # Subset allowed.
    ("<answer>5 + 5</answer>", [25, 5, 4, 2], 10, 0.0),  # 5 used twice.
    ("<answer>5 + 5</answer>", [5, 5, 4], 10, 1.0),  # Two 5s given.
    ("<answer>6 + 4</answer>", [25, 5, 4, 2], 10, 0.0),  # 6 not given.
    ("<answer>(8 / 3) * 3</answer>", [8, 3, 3], 8, 1.0),  # Exact fractions.
    ("<answer>8 / 3 * 3</answer>", [8, 3, 3], 8, 1.0),
    ("<answer>8 / (3 - 3)</answer>", [8, 3, 3], 0, 0.0),  # Division by 0.
    ("<answer>7 - 9</answer>", [7, 9, 1], -2, 1.0),
    ("<answer>-7 + 9</answer>", [7, 9, 1], 2, 0.0),  # No unary minus.
    ("<answer>7 ** 2</answer>", [7, 2, 1], 49, 0.0),
    ("<answer>7.0 + 2</answer>", [7, 2, 1], 9, 0.0),
    ("<answer>(7 + 2</answer>", [7, 2, 1], 9, 0.0),
    ("<answer>7 + 2)</answer>", [7, 2, 1], 9, 0.0),
    ("<answer>7(2)</answer>", [7, 2, 1], 14, 0.0),  # No implicit product.
    ("<answer>7 \u00d7 2 \u00f7 1</answer>", [7, 2, 1], 14, 1.0),
    ("<answer>(3 + 5) * 2 = 16</answer>", [3, 5, 2], 16, 1.0),
    ("<answer>1+2</answer> then <answer>3*4</answer>", [1, 2, 3, 4], 12, 1.0),
    ("<answer>1+2</answer> then <answer>3*4</answer>", [1, 2, 3, 4], 3, 0.0),
    ("Let me think.\n(3 + 5) * 2 = 16\n\n", [3, 5, 2], 16, 1.0),
    ("Let me think.\n(3 + 5) * 2 = 16\nDone", [3, 5, 2], 16, 0.0),
    ("<answer></answer>", [3, 5, 2], 0, 0.0),
    ("<answer>   </answer>", [3, 5, 2], 0, 0.0),
    ("<answer>3 + 5</answer>", [3, 5, 2], "8", 0.0),  # Target must be int.
    ("<answer>3 + 5</answer>", [3, "5", 2], 8, 0.0),
    ("<answer>3 + 5</answer>", np.array([3, 5, 2]), np.int64(8), 1.0),
])
def test_verify_cases(completion, numbers, target, expected):
  assert countdown.verify(completion, numbers, target) == expected


def test_require_all():
  assert countdown.verify("<answer>25 + 5</answer>", [25, 5, 4], 30) == 1.0
  assert countdown.verify("<answer>25 + 5</answer>", [25, 5, 4], 30,
                          require_all=True) == 0.0
  assert countdown.verify("<answer>25 + 5 + 4 - 4</answer>", [25, 5, 4], 30,
                          require_all=True) == 0.0
  assert countdown.verify("<answer>(25 + 5) * 4</answer>", [25, 5, 4], 120,
                          require_all=True) == 1.0


def test_extract_expression():
  got = countdown.extract_expression("a\n<answer> 1+2 = 3 </answer>\n")
  assert got == "1+2"
  assert countdown.extract_expression("thinking\n 4*5=20 \n  \n") == "4*5"
  assert countdown.extract_expression("") is None
  assert countdown.extract_expression("<answer>=3</answer>") is None


def test_evaluate():
  assert countdown.evaluate("(1 + 2) * 3 - 4 / 8") == (
      fractions.Fraction(17, 2), [1, 2, 3, 4, 8])
  with pytest.raises(ValueError, match="division by zero"):
    countdown.evaluate("1 / (2 - 2)")
  with pytest.raises(ValueError, match="invalid Countdown expression"):
    countdown.evaluate("1 + + 2")


# An independent reference: random expression trees evaluated by recursion
# over the tree (not over text), then printed fully parenthesised.


def _random_tree(rng, numbers):
  if len(numbers) == 1:
    return numbers[0]
  split = rng.randint(1, len(numbers) - 1)
  return (rng.choice("+-*/"), _random_tree(rng, numbers[:split]),
          _random_tree(rng, numbers[split:]))


def _value(tree):
  if isinstance(tree, int):
    return fractions.Fraction(tree)
  op, a, b = tree
  a, b = _value(a), _value(b)
  if op == "/" and b == 0:
    return None
  if a is None or b is None:
    return None
  return {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op]


def _text(tree):
  if isinstance(tree, int):
    return str(tree)
  op, a, b = tree
  return f"({_text(a)} {op} {_text(b)})"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 100), min_size=3, max_size=4),
       st.integers(0, 2**32 - 1))
def test_matches_tree_reference(numbers, seed):
  rng = random.Random(seed)
  used = rng.sample(numbers, rng.randint(1, len(numbers)))
  tree = _random_tree(rng, used)
  value = _value(tree)
  completion = f"<think>...</think>\n<answer>{_text(tree)}</answer>"
  if value is None:  # Division by zero somewhere.
    assert countdown.verify(completion, numbers, 0) == 0.0
    return
  if value.denominator != 1:
    assert countdown.verify(completion, numbers, int(value)) == 0.0
    return
  assert countdown.verify(completion, numbers, int(value)) == 1.0
  assert countdown.verify(completion, numbers, int(value) + 1) == 0.0
  # The same expression with one number replaced by an absent one fails.
  absent = max(numbers) + 1
  tampered = completion.replace(str(used[0]), str(absent), 1)
  assert countdown.verify(tampered, numbers, int(value)) == 0.0


def test_batch_verify():
  got = countdown.batch_verify(
      ["<answer>1+2</answer>", "<answer>1+2</answer>", "x"],
      [[1, 2, 3], [1, 2, 3], [1, 2, 3]], [3, 4, 3])
  assert got.dtype == np.float32 and got.tolist() == [1.0, 0.0, 0.0]
  with pytest.raises(ValueError, match="one problem per completion"):
    countdown.batch_verify(["a"], [[1, 2, 3]], [])


_PWNED = "/tmp/rlax_llm_countdown_pwned"


@pytest.mark.parametrize("completion", [
    "1" * 1_000_000,
    "<answer>" + "(" * 10_000 + "1" + ")" * 10_000 + "</answer>",
    "<answer>" + "(" * 150 + "1" + ")" * 150 + "</answer>",
    "<answer>" + "+".join(["1"] * 600) + "</answer>",
    f"<answer>__import__('os').system('touch {_PWNED}')</answer>",
    "<answer>10**10**10**10</answer>",
    "<answer>1+2</answer>\udcff",
    b"<answer>1+2</answer>",
    "",
    None,
])
def test_adversarial_inputs_score_zero_fast(completion):
  start = time.perf_counter()
  assert countdown.verify(completion, [1, 2, 3], 3) == 0.0
  assert time.perf_counter() - start < 1.0
  assert not os.path.exists(_PWNED)
