"""Verifiers: map (completion, answer) to a reward, never raising."""

from rlax_llm.rewards import arithmetic
from rlax_llm.rewards.arithmetic import batch_verify as batch_verify_arithmetic
from rlax_llm.rewards.arithmetic import verify as verify_arithmetic

__all__ = [
    "arithmetic",
    "batch_verify_arithmetic",
    "verify_arithmetic",
]
