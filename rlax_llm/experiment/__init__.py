"""The experiment layer: builds a run's parts from a config and runs the loop.

The only package that reads a `ml_collections.ConfigDict`. `run(config,
workdir)` is what `python -m experiments.train` calls; notebooks call it
directly. Nothing below this package imports it.
"""

from rlax_llm.experiment.loop import Experiment
from rlax_llm.experiment.loop import evaluate_checkpoint
from rlax_llm.experiment.loop import export_checkpoint
from rlax_llm.experiment.loop import restore_policy
from rlax_llm.experiment.loop import run
from rlax_llm.experiment.loop import trained_experiment
from rlax_llm.experiment.setups import TASKS
from rlax_llm.experiment.setups import make_setup

__all__ = ["Experiment", "TASKS", "evaluate_checkpoint", "export_checkpoint",
           "make_setup", "restore_policy", "run", "trained_experiment"]
