"""Verifier of the reasoning corpus (`rlax_llm.data.reasoning`).

Every family's completion ends in ``answer X``; only the text after the last
``answer `` counts (trailing ``.`` and spaces stripped), so the chain of
thought before it is free. The reference names the family:

  ===========================  ==============================================
  reference                    a completion is correct when its answer ...
  ===========================  ==============================================
  ``chain|44``                 is the integer 44 (`rewards.arithmetic` rule)
  ``search|5 8 8|24``          is a Countdown expression over 5 8 8, each at
                               most once, equal to 24 (`rewards.countdown`)
  ``sort|1 3 5 9``             is ``1 3 5 9`` (single spaces between digits)
  ===========================  ==============================================

Scores are 1.0 or 0.0; `verify` never raises (a malformed reference or a
non-string completion scores 0.0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rlax_llm.rewards import arithmetic
from rlax_llm.rewards import countdown

__all__ = ["ANSWER_MARK", "FAMILIES", "batch_verify", "extract_answer",
           "verify"]

ANSWER_MARK = "answer "
FAMILIES = ("chain", "search", "sort")
MAX_CHARS = 10_000


def extract_answer(completion: Any) -> str | None:
  """The text after the last ``answer `` (without a final "."), or None."""
  if not isinstance(completion, str) or len(completion) > MAX_CHARS:
    return None
  at = completion.rfind(ANSWER_MARK)
  if at < 0:
    return None
  return completion[at + len(ANSWER_MARK):].strip().rstrip(".").strip()


def verify(completion: Any, reference: str) -> float:
  """1.0 when `completion`'s answer satisfies `reference`, else 0.0."""
  try:
    family, _, payload = str(reference).partition("|")
    answer = extract_answer(completion)
    if answer is None or family not in FAMILIES:
      return 0.0
    if family == "chain":
      return arithmetic.verify(answer, payload)
    if family == "sort":
      return float(answer.split() == payload.split()
                   and " ".join(answer.split()) == answer)
    numbers, _, target = payload.partition("|")
    if "=" in answer:
      return 0.0
    return countdown.verify(answer, [int(v) for v in numbers.split()],
                            int(target))
  except Exception:  # pylint: disable=broad-except
    return 0.0


def batch_verify(completions: Sequence[Any],
                 references: Sequence[str]) -> np.ndarray:
  """[N] f32 scores of N completions against their references."""
  if len(completions) != len(references):
    raise ValueError(f"{len(completions)} completions but {len(references)} "
                     "references; pass one reference per completion.")
  return np.asarray([verify(c, r) for c, r in zip(completions, references)],
                    np.float32)
