"""Functional core of rlax_llm: pure array math on masked [N, T] batches.

Nothing here imports models, data or training code; every function takes
arrays (and keyword hyper-parameters) and returns arrays.
"""

from rlax_llm.core.advantages import grpo_advantages
from rlax_llm.core.advantages import rloo_advantages
from rlax_llm.core.aggregation import AGGREGATIONS
from rlax_llm.core.aggregation import AggregationFn
from rlax_llm.core.aggregation import aggregate
from rlax_llm.core.aggregation import as_bool_mask
from rlax_llm.core.aggregation import masked_mean
from rlax_llm.core.aggregation import masked_sum
from rlax_llm.core.aggregation import normalizers
from rlax_llm.core.logprobs import entropy_from_logits
from rlax_llm.core.logprobs import LogprobsAndEntropy
from rlax_llm.core.logprobs import token_logprobs
from rlax_llm.core.logprobs import token_logprobs_and_entropy
from rlax_llm.core.objectives import KL_ESTIMATORS
from rlax_llm.core.objectives import kl_penalty
from rlax_llm.core.objectives import ppo_clip_loss
from rlax_llm.core.objectives import ppo_clip_token_loss
from rlax_llm.core.objectives import PPOClipAux
from rlax_llm.core.objectives import sft_loss

__all__ = [
    "AGGREGATIONS",
    "AggregationFn",
    "KL_ESTIMATORS",
    "LogprobsAndEntropy",
    "PPOClipAux",
    "aggregate",
    "as_bool_mask",
    "entropy_from_logits",
    "grpo_advantages",
    "kl_penalty",
    "masked_mean",
    "masked_sum",
    "normalizers",
    "ppo_clip_loss",
    "ppo_clip_token_loss",
    "rloo_advantages",
    "sft_loss",
    "token_logprobs",
    "token_logprobs_and_entropy",
]
