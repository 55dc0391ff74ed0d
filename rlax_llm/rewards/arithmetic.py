"""Exact-match verifier for integer answers (the arithmetic task).

Rule. A completion is correct when, after stripping surrounding whitespace,
it is a decimal integer literal whose value equals the answer:

  * ASCII digits only, with an optional leading ``-`` or ``+`` sign.
    Leading zeros are allowed (``"042"`` equals ``42``); ``"-0"`` equals
    ``"0"``. The rule compares values, not spellings, because the form of a
    correct number is not what the task tests.
  * Anything else scores 0.0: inner spaces (``"4 2"``), decimals
    (``"42.0"``), trailing text (``"42 apples"``), the empty string,
    non-ASCII digits (``"４２"``), and any non-``str`` completion (``None``,
    bytes, numbers).
  * Completions or answers longer than ``MAX_CHARS`` characters score 0.0
    at once, so a runaway generation costs no work.

The completion is the decoded text before EOS (``CharTokenizer.decode`` cuts
at EOS). The answer may be a ``str`` in the same format or a Python/NumPy int.
``verify`` never raises: an unusable answer also scores 0.0.
"""

from __future__ import annotations

from collections.abc import Sequence
import re
from typing import Any

import numpy as np

__all__ = ["MAX_CHARS", "batch_verify", "verify"]

MAX_CHARS = 1000
_INT_LIMIT = 10**MAX_CHARS
_INT_RE = re.compile(r"[+-]?[0-9]+", re.ASCII)


def _canonical(text: Any, *, allow_int: bool) -> str | None:
  """Returns the canonical integer literal of ``text``, or None if invalid."""
  if isinstance(text, (bool, np.bool_)):
    return None
  if allow_int and isinstance(text, (int, np.integer)):
    if abs(int(text)) >= _INT_LIMIT:
      return None
    text = str(int(text))
  if not isinstance(text, str) or len(text) > MAX_CHARS:
    return None
  text = text.strip()
  if _INT_RE.fullmatch(text) is None:
    return None
  negative = text[0] == "-"
  digits = text.lstrip("+-").lstrip("0") or "0"
  return "-" + digits if negative and digits != "0" else digits


def verify(completion: Any, answer: Any) -> float:
  """Scores one completion against the exact integer answer.

  Args:
    completion: The decoded model output (text before EOS).
    answer: The reference answer, a ``str`` like ``"-14"`` or an int.

  Returns:
    Exactly 1.0 if the completion is an integer literal equal to the answer
    (see the module docstring for the rule), else 0.0. Never raises.
  """
  try:
    got = _canonical(completion, allow_int=False)
    if got is None:
      return 0.0
    want = _canonical(answer, allow_int=True)
    return 1.0 if want is not None and got == want else 0.0
  except Exception:  # pylint: disable=broad-except
    # Hostile str subclasses and the like: a reward function must not raise.
    return 0.0


def batch_verify(
    completions: Sequence[Any], answers: Sequence[Any]
) -> np.ndarray:
  """Scores N completions against N answers.

  Args:
    completions: N decoded completions.
    answers: N reference answers, aligned with ``completions`` (repeat each
      prompt's answer G times for G samples per prompt).

  Returns:
    reward_N: float32 [N] array of 0.0 / 1.0.

  Raises:
    ValueError: If the two sequences differ in length (a wiring bug, not a
      model output, so it is reported rather than scored).
  """
  completions = list(completions)
  answers = list(answers)
  if len(completions) != len(answers):
    raise ValueError(
        f"batch_verify got {len(completions)} completions but {len(answers)} "
        "answers; pass one answer per completion (np.repeat the answers G "
        "times when sampling G completions per prompt).")
  return np.array(
      [verify(c, a) for c, a in zip(completions, answers)], dtype=np.float32
  ).reshape(len(completions))
