"""Verifiers: map (completion, answer) to a reward, never raising.

Modules: ``arithmetic`` (exact integers), ``math`` (GSM8K and MATH answers),
``latex`` (the safe answer parser ``math`` uses), ``countdown`` (reach a
target from given numbers), ``runner`` (process-isolated scoring with
timeouts, and reward composition).
"""

from rlax_llm.rewards import arithmetic
from rlax_llm.rewards import countdown
from rlax_llm.rewards import latex
from rlax_llm.rewards import math
from rlax_llm.rewards import runner
from rlax_llm.rewards.arithmetic import batch_verify as batch_verify_arithmetic
from rlax_llm.rewards.arithmetic import verify as verify_arithmetic
from rlax_llm.rewards.countdown import batch_verify as batch_verify_countdown
from rlax_llm.rewards.countdown import verify as verify_countdown
from rlax_llm.rewards.math import batch_verify as batch_verify_math
from rlax_llm.rewards.math import verify as verify_math
from rlax_llm.rewards.runner import boxed_format
from rlax_llm.rewards.runner import compose
from rlax_llm.rewards.runner import ComposedReward
from rlax_llm.rewards.runner import LengthPenalty
from rlax_llm.rewards.runner import RewardResult
from rlax_llm.rewards.runner import RewardRunner

__all__ = [
    "ComposedReward",
    "LengthPenalty",
    "RewardResult",
    "RewardRunner",
    "arithmetic",
    "batch_verify_arithmetic",
    "batch_verify_countdown",
    "batch_verify_math",
    "boxed_format",
    "compose",
    "countdown",
    "latex",
    "math",
    "runner",
    "verify_arithmetic",
    "verify_countdown",
    "verify_math",
]
