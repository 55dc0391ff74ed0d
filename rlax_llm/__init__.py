"""rlax_llm: reinforcement learning on language models with verifiable rewards.

Subpackages: `core` (pure array math), `sampling`, `models`, `data`,
`rewards`, `parallel`, `training`, `methods`, `experiment`.

Subpackages are imported on first use (PEP 562), so `import rlax_llm.core`
pays for jax, chex and numpy only, while `rlax_llm.data` (grain, TFDS),
`rlax_llm.rewards` (sympy) and `rlax_llm.experiment` (orbax, ml_collections)
load their stacks only when touched.
"""

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["core", "data", "experiment", "methods", "models", "parallel",
           "rewards", "sampling", "training"]

_SUBPACKAGES = frozenset(__all__)


def __getattr__(name: str) -> Any:
  """Imports the subpackage `name` on first attribute access."""
  if name in _SUBPACKAGES:
    # import_module also binds the submodule as an attribute of this package,
    # so later accesses do not reach __getattr__ again.
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(
      f"module {__name__!r} has no attribute {name!r}; its subpackages are "
      f"{sorted(_SUBPACKAGES)} (e.g. `from rlax_llm import core`).")


def __dir__() -> list[str]:
  return sorted(set(globals()) | _SUBPACKAGES)
