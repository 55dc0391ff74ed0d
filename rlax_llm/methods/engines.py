"""The rollout engines by name (`config.rollout.name`), registered explicitly.

Each engine module imports `rlax_llm.methods.rollouts` and nothing of the
others, and this module imports them all, so there is no import cycle. To add
an engine, subclass `rollouts.Engine` and add it here, or pass the class to
`rlax_llm.experiment.run(..., engine=...)`.
"""

from __future__ import annotations

import difflib

from rlax_llm.methods.april import AprilRollout
from rlax_llm.methods.branch import BranchRollout
from rlax_llm.methods.latr import LatrRollout
from rlax_llm.methods.rollouts import SampleRollout
from rlax_llm.methods.xrpo import XrpoRollout

ENGINES = {"sample": SampleRollout, "latr": LatrRollout,
           "branch": BranchRollout, "april": AprilRollout,
           "xrpo": XrpoRollout}


def get_rollout(name: str):
  """The engine class named `name` (a clear error otherwise)."""
  if name not in ENGINES:
    close = difflib.get_close_matches(name, ENGINES, n=3)
    raise ValueError(f"Unknown rollout engine {name!r} (config.rollout.name)"
                     + (f"; did you mean {close}?" if close else "")
                     + f" Known engines: {sorted(ENGINES)}.")
  return ENGINES[name]
