"""RL methods: each is an advantage function plus a policy loss."""

import difflib
import inspect

from rlax_llm.methods.policy_gradient import Method
from rlax_llm.methods.policy_gradient import cispo
from rlax_llm.methods.policy_gradient import grpo
from rlax_llm.methods.policy_gradient import gspo
from rlax_llm.methods.policy_gradient import ppo
from rlax_llm.methods.policy_gradient import reinforce_pp
from rlax_llm.methods.policy_gradient import rloo

METHODS = {"grpo": grpo, "rloo": rloo, "reinforce_pp": reinforce_pp,
           "gspo": gspo, "cispo": cispo, "ppo": ppo}


def get_method(name: str, **settings) -> Method:
  """Builds the method `name` from the settings it declares.

  Settings a method does not take (e.g. `scale_by_std` for RLOO) are ignored,
  so the experiment layer can pass its whole RL section.
  """
  if name not in METHODS:
    close = difflib.get_close_matches(name, METHODS, n=3)
    raise ValueError(f"Unknown RL method {name!r}"
                     + (f"; did you mean {close}?" if close else "")
                     + f" Known methods: {sorted(METHODS)}.")
  builder = METHODS[name]
  accepted = inspect.signature(builder).parameters
  return builder(**{k: v for k, v in settings.items() if k in accepted})


__all__ = ["METHODS", "Method", "cispo", "get_method", "grpo", "gspo",
           "ppo", "reinforce_pp", "rloo"]
