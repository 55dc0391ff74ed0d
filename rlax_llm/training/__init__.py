"""Train state, jitted update steps, checkpoints and metric writers.

The run loop that composes them lives in `rlax_llm.experiment`.
"""

from rlax_llm.training.checkpoint import CheckpointWriteError
from rlax_llm.training.checkpoint import DamagedCheckpointError
from rlax_llm.training.scoring import Scores
from rlax_llm.training.scoring import score_completions
from rlax_llm.training.scoring import score_completions_jit
from rlax_llm.training.state import RefState
from rlax_llm.training.state import TrainState
from rlax_llm.training.state import create_train_state
from rlax_llm.training.state import lora_optimizer
from rlax_llm.training.state import model_graphdef
from rlax_llm.training.steps import RLBatch
from rlax_llm.training.steps import SFTBatch
from rlax_llm.training.steps import jit_step
from rlax_llm.training.steps import make_rl_step
from rlax_llm.training.steps import make_sft_step

__all__ = ["CheckpointWriteError", "DamagedCheckpointError", "RLBatch", "RefState", "SFTBatch", "Scores", "TrainState", "create_train_state",
           "jit_step", "lora_optimizer", "make_rl_step", "make_sft_step", "model_graphdef",
           "score_completions", "score_completions_jit"]
