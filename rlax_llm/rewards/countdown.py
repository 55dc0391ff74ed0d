"""Verifier for the Countdown task: reach a target from given numbers.

A problem is a list of positive integers ``numbers`` (3 or 4 of them) and an
integer ``target``. A completion scores 1.0 when its expression

  * is found by the extraction rule below,
  * is made only of non-negative integer literals, the binary operators
    ``+ - * /`` (also ``×`` and ``÷``), parentheses and spaces; there are
    no unary signs, decimals, exponents or implicit products,
  * uses each given number at most once (as a multiset: ``[5, 5, 2]``
    allows two 5s; ``require_all=True`` demands every number exactly once),
  * evaluates exactly (``fractions.Fraction``, so ``(8/3)*3`` is ``8``) to
    ``target``, with no division by zero,

and 0.0 otherwise, never raising.

Extraction rule. The expression is the content of the last
``<answer>...</answer>`` pair if the completion has one, else its last
non-blank line. If that text contains ``=``, only the part before the
first ``=`` counts (``(3 + 5) * 2 = 16`` gives ``(3 + 5) * 2``).

Model text is never executed: a recursive-descent parser evaluates it. Caps:
completions over ``MAX_COMPLETION_CHARS`` characters, expressions over
``MAX_EXPRESSION_CHARS`` characters or nested deeper than ``MAX_DEPTH``
parentheses score 0.0, as do completions that are not a valid ``str``
(bytes, lone surrogates).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
import fractions
import re
from typing import Any

import numpy as np

__all__ = [
    "MAX_COMPLETION_CHARS",
    "MAX_DEPTH",
    "MAX_EXPRESSION_CHARS",
    "batch_verify",
    "evaluate",
    "extract_expression",
    "verify",
]

MAX_COMPLETION_CHARS = 100_000
MAX_EXPRESSION_CHARS = 1_000
MAX_DEPTH = 100

_OPEN, _CLOSE = "<answer>", "</answer>"
_TOKEN = re.compile(r"\s*(?:(\d+)|([-+*/()\u00d7\u00f7]))")
_OP_ALIASES = {"\u00d7": "*", "\u00f7": "/"}


class _Invalid(Exception):
  """The expression breaks a rule; the completion scores 0.0."""


def _last_answer_tag(completion: str) -> str | None:
  """Content of the last ``<answer>...</answer>`` pair, None without one.

  The pairs are those ``re.findall(r"<answer>(.*?)</answer>", text,
  re.DOTALL)`` finds, found in one linear pass: the regex retries from every
  ``<answer>`` that has no closing tag after it and costs quadratic time on
  text made of many of them.
  """
  found, pos = None, 0
  while True:
    start = completion.find(_OPEN, pos)
    if start < 0:
      return found
    end = completion.find(_CLOSE, start + len(_OPEN))
    if end < 0:
      return found
    found = completion[start + len(_OPEN):end]
    pos = end + len(_CLOSE)


def extract_expression(completion: str) -> str | None:
  """The expression a completion commits to (rule in the module docstring).

  Returns:
    The stripped expression text, or None if there is none.
  """
  text = _last_answer_tag(completion)
  if text is None:
    lines = [line for line in completion.splitlines() if line.strip()]
    if not lines:
      return None
    text = lines[-1]
  text = text.split("=", 1)[0].strip()
  return text or None


def _tokenize(text: str) -> list[tuple[str, Any]]:
  tokens, pos = [], 0
  text = text.rstrip()
  while pos < len(text):
    match = _TOKEN.match(text, pos)
    if match is None:
      raise _Invalid(f"unexpected character at {pos}")
    if match[1] is not None:
      tokens.append(("num", int(match[1])))
    else:
      tokens.append(("op", _OP_ALIASES.get(match[2], match[2])))
    pos = match.end()
  return tokens


class _Evaluator:
  """expr := term (('+'|'-') term)*; term := atom (('*'|'/') atom)*;
  atom := integer | '(' expr ')'."""

  def __init__(self, tokens):
    self.tokens = tokens
    self.pos = 0
    self.depth = 0
    self.used: list[int] = []

  def peek(self):
    return self.tokens[self.pos] if self.pos < len(self.tokens) else None

  def expr(self) -> fractions.Fraction:
    value = self.term()
    while self.peek() in (("op", "+"), ("op", "-")):
      op = self.tokens[self.pos][1]
      self.pos += 1
      rhs = self.term()
      value = value + rhs if op == "+" else value - rhs
    return value

  def term(self) -> fractions.Fraction:
    value = self.atom()
    while self.peek() in (("op", "*"), ("op", "/")):
      op = self.tokens[self.pos][1]
      self.pos += 1
      rhs = self.atom()
      if op == "*":
        value *= rhs
      elif rhs == 0:
        raise _Invalid("division by zero")
      else:
        value /= rhs
    return value

  def atom(self) -> fractions.Fraction:
    token = self.peek()
    if token is None:
      raise _Invalid("expression ends early")
    self.pos += 1
    if token[0] == "num":
      self.used.append(token[1])
      return fractions.Fraction(token[1])
    if token == ("op", "("):
      self.depth += 1
      if self.depth > MAX_DEPTH:
        raise _Invalid("nesting too deep")
      value = self.expr()
      if self.peek() != ("op", ")"):
        raise _Invalid("unbalanced parenthesis")
      self.pos += 1
      self.depth -= 1
      return value
    raise _Invalid(f"unexpected {token[1]!r}")


def evaluate(expression: str) -> tuple[fractions.Fraction, list[int]]:
  """Evaluates a Countdown expression exactly.

  Args:
    expression: Text such as ``"(25 - 5) * 4 / 2"``.

  Returns:
    ``(value, numbers_used)``: the exact value and the integer literals in
    order of appearance.

  Raises:
    ValueError: If the text breaks the grammar of the module docstring,
      exceeds a cap, or divides by zero.
  """
  if len(expression) > MAX_EXPRESSION_CHARS:
    raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} chars")
  try:
    evaluator = _Evaluator(_tokenize(expression))
    if not evaluator.tokens:
      raise _Invalid("empty expression")
    value = evaluator.expr()
    if evaluator.pos != len(evaluator.tokens):
      raise _Invalid(f"unexpected {evaluator.peek()[1]!r}")
  except _Invalid as e:
    raise ValueError(f"invalid Countdown expression: {e}") from None
  return value, evaluator.used


def _as_int(value: Any) -> int | None:
  if isinstance(value, (bool, np.bool_)):
    return None
  if isinstance(value, (int, np.integer)):
    return int(value)
  return None


def verify(completion: Any, numbers: Sequence[int], target: int, *,
           require_all: bool = False) -> float:
  """Scores one Countdown completion.

  Args:
    completion: Decoded model output.
    numbers: The given numbers (positive ints).
    target: The integer to reach.
    require_all: Demand that every given number is used exactly once.

  Returns:
    1.0 if correct under the rules of the module docstring, else 0.0.
    Never raises (unusable ``numbers``/``target`` also score 0.0).
  """
  try:
    if (not isinstance(completion, str)
        or len(completion) > MAX_COMPLETION_CHARS):
      return 0.0
    completion = str.__str__(completion)
    completion.encode("utf-8")  # Lone surrogates raise: score 0.0.
    given = [_as_int(n) for n in numbers]
    want = _as_int(target)
    if want is None or any(n is None for n in given):
      return 0.0
    expression = extract_expression(completion)
    if expression is None:
      return 0.0
    value, used = evaluate(expression)
    available = collections.Counter(given)
    used_counts = collections.Counter(used)
    if any(count > available[n] for n, count in used_counts.items()):
      return 0.0
    if require_all and used_counts != available:
      return 0.0
    return 1.0 if value == want else 0.0
  except Exception:  # pylint: disable=broad-except
    return 0.0


def batch_verify(completions: Sequence[Any],
                 numbers: Sequence[Sequence[int]],
                 targets: Sequence[int], *,
                 require_all: bool = False) -> np.ndarray:
  """Scores N Countdown completions.

  Args:
    completions: N decoded completions.
    numbers: N lists of given numbers, aligned with ``completions``.
    targets: N targets.
    require_all: As in ``verify``.

  Returns:
    reward_N: float32 [N] array of 0.0 / 1.0.

  Raises:
    ValueError: If the three sequences differ in length.
  """
  completions = list(completions)
  numbers, targets = list(numbers), list(targets)
  if not len(completions) == len(numbers) == len(targets):
    raise ValueError(
        f"batch_verify got {len(completions)} completions, {len(numbers)} "
        f"number lists and {len(targets)} targets; pass one problem per "
        "completion (repeat each problem G times for G samples).")
  return np.array([verify(c, n, t, require_all=require_all)
                   for c, n, t in zip(completions, numbers, targets)],
                  dtype=np.float32).reshape(len(completions))
