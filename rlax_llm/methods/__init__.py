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

  `settings` are the experiment's method settings; a method takes the ones
  its builder declares. Those it does not declare must be at their neutral
  value (`NEUTRAL`), or the method is refused naming them: a setting is never
  ignored silently.
  """
  if name not in METHODS:
    close = difflib.get_close_matches(name, METHODS, n=3)
    raise ValueError(f"Unknown RL method {name!r}"
                     + (f"; did you mean {close}?" if close else "")
                     + f" Known methods: {sorted(METHODS)}.")
  builder = METHODS[name]
  accepted = inspect.signature(builder).parameters
  refused = sorted(k for k, v in settings.items()
                   if k not in accepted and k in NEUTRAL and v != NEUTRAL[k])
  if refused:
    raise ValueError(
        f"RL method {name!r} has no setting {refused} (config.rl."
        f"{refused[0]}={settings[refused[0]]!r}); set "
        + ", ".join(f"rl.{k}={NEUTRAL[k]!r}" for k in refused)
        + " or choose a method that takes it.")
  return builder(**{k: v for k, v in settings.items() if k in accepted})


# Method settings and the value at which a method without them is unchanged.
NEUTRAL = {"dual_clip": None, "token_level": False}


__all__ = ["METHODS", "Method", "cispo", "get_method", "grpo", "gspo",
           "ppo", "reinforce_pp", "rloo"]
