"""rlax_llm: reinforcement learning on language models with verifiable rewards.

Subpackages: `core` (pure array math), `sampling`, `models`, `data`,
`rewards`, `parallel`, `training`, `methods`.
"""

from rlax_llm import core
from rlax_llm import data
from rlax_llm import methods
from rlax_llm import models
from rlax_llm import parallel
from rlax_llm import rewards
from rlax_llm import sampling
from rlax_llm import training

__version__ = "0.1.0"
__all__ = ["core", "data", "methods", "models", "parallel", "rewards",
           "sampling", "training"]
