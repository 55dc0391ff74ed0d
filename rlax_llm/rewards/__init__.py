"""Verifiers: map (completion, answer) to a reward, never raising.

Modules: ``arithmetic`` (exact integers), ``math`` (GSM8K and MATH answers),
``latex`` (the safe answer parser ``math`` uses), ``countdown`` (reach a
target from given numbers), ``reasoning`` (the testbed's final answers),
``runner`` (process-isolated scoring with timeouts, and reward composition).

``math`` and ``latex`` build sympy objects; they, and the names taken from
them, are imported on first use (PEP 562), so the other verifiers (and the
tasks that use them) do not load sympy.
"""

import importlib
from typing import Any

from rlax_llm.rewards import arithmetic
from rlax_llm.rewards import countdown
from rlax_llm.rewards import runner
from rlax_llm.rewards.arithmetic import batch_verify as batch_verify_arithmetic
from rlax_llm.rewards.arithmetic import verify as verify_arithmetic
from rlax_llm.rewards.countdown import batch_verify as batch_verify_countdown
from rlax_llm.rewards.countdown import verify as verify_countdown
from rlax_llm.rewards.runner import boxed_format
from rlax_llm.rewards.runner import compose
from rlax_llm.rewards.runner import ComposedReward
from rlax_llm.rewards.runner import LengthPenalty
from rlax_llm.rewards.runner import RewardResult
from rlax_llm.rewards.runner import RewardRunner

# name -> (module, attribute or None for the module itself), loaded lazily.
_LAZY = {
    "latex": ("latex", None),
    "math": ("math", None),
    "reasoning": ("reasoning", None),
    "batch_verify_math": ("math", "batch_verify"),
    "verify_math": ("math", "verify"),
}

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
    "reasoning",
    "runner",
    "verify_arithmetic",
    "verify_countdown",
    "verify_math",
]


def __getattr__(name: str) -> Any:
  """Imports `math` / `latex` (and their names) on first access."""
  if name in _LAZY:
    module, attr = _LAZY[name]
    mod = importlib.import_module(f"{__name__}.{module}")
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}; "
                       f"its names are {sorted(__all__)}.")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
