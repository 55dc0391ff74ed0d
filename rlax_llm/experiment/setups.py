"""Task setups by name: `make_setup(config, workdir)` (reads the config).

The setups themselves (problems, tokenizer, prompt budget, reward) live in
`rlax_llm.data.tasks`; this module maps `config.task.name` to one.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import ml_collections

from rlax_llm.data.tasks import ArithmeticSetup
from rlax_llm.data.tasks import CountdownSetup
from rlax_llm.data.tasks import JsonlSetup
from rlax_llm.data.tasks import ReasoningSetup


# name -> factory(config, workdir) -> setup
TASKS: dict[str, Callable[..., Any]] = {
    "arithmetic": lambda config, workdir: ArithmeticSetup(config.task,
                                                          config.seed),
    "countdown": lambda config, workdir: CountdownSetup(config.task,
                                                        config.seed),
    "gsm8k": functools.partial(JsonlSetup, "gsm8k"),
    "math500": functools.partial(JsonlSetup, "math500"),
    "reasoning": ReasoningSetup,
}


def make_setup(config: ml_collections.ConfigDict, workdir: str):
  """The setup of `config.task.name` (a clear error for an unknown name)."""
  name = config.task.name
  if name not in TASKS:
    import difflib  # pylint: disable=g-import-not-at-top
    close = difflib.get_close_matches(name, TASKS, n=2)
    raise ValueError(f"Unknown task {name!r} (config.task.name)"
                     + (f"; did you mean {close}?" if close else "")
                     + f" Known tasks: {sorted(TASKS)}.")
  return TASKS[name](config, workdir)
