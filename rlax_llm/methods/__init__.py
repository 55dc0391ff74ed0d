"""RL methods: each is an advantage function plus a policy loss."""

import difflib

from rlax_llm.methods.grpo import Method
from rlax_llm.methods.grpo import grpo
from rlax_llm.methods.grpo import rloo

METHODS = {"grpo": grpo, "rloo": rloo}


def get_method(name: str, **kwargs) -> Method:
  """Builds the method `name` with hyper-parameters `kwargs`."""
  if name not in METHODS:
    close = difflib.get_close_matches(name, METHODS, n=3)
    raise ValueError(f"Unknown RL method {name!r}"
                     + (f"; did you mean {close}?" if close else "")
                     + f" Known methods: {sorted(METHODS)}.")
  return METHODS[name](**kwargs)


__all__ = ["METHODS", "Method", "get_method", "grpo", "rloo"]
