"""Train state, jitted update steps, checkpoints, metrics and the run loop.

`rlax_llm.training.experiment.run(config, workdir)` runs an experiment; it is
imported lazily so that the steps can be used without the experiment layer.
"""

from rlax_llm.training.scoring import Scores
from rlax_llm.training.scoring import score_completions
from rlax_llm.training.state import TrainState
from rlax_llm.training.state import create_train_state
from rlax_llm.training.state import model_graphdef
from rlax_llm.training.steps import RLBatch
from rlax_llm.training.steps import SFTBatch
from rlax_llm.training.steps import jit_step
from rlax_llm.training.steps import make_rl_step
from rlax_llm.training.steps import make_sft_step

__all__ = ["RLBatch", "SFTBatch", "Scores", "TrainState", "create_train_state",
           "jit_step", "make_rl_step", "make_sft_step", "model_graphdef",
           "score_completions"]
