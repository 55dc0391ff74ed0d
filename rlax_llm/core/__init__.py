"""Functional core of rlax_llm: pure array math on masked [N, T] batches.

Nothing here imports models, data or training code; every function takes
arrays (and keyword hyper-parameters) and returns arrays.
"""

from rlax_llm.core.advantages import gae_advantages
from rlax_llm.core.advantages import GAEOutput
from rlax_llm.core.advantages import grpo_advantages
from rlax_llm.core.advantages import masked_whiten_unbiased
from rlax_llm.core.advantages import reinforce_pp_advantages
from rlax_llm.core.advantages import reinforce_pp_token_advantages
from rlax_llm.core.advantages import rloo_advantages
from rlax_llm.core.advantages import token_level_returns
from rlax_llm.core.advantages import token_level_rewards
from rlax_llm.core.allocation import exploration_bonus
from rlax_llm.core.allocation import group_reward_std
from rlax_llm.core.allocation import interval_half_width
from rlax_llm.core.allocation import t_critical
from rlax_llm.core.allocation import uncertainty_reduction
from rlax_llm.core.allocation import xrpo_allocate
from rlax_llm.core.allocation import xrpo_priority
from rlax_llm.core.aggregation import AGGREGATIONS
from rlax_llm.core.aggregation import AggregationFn
from rlax_llm.core.aggregation import aggregate
from rlax_llm.core.aggregation import as_bool_mask
from rlax_llm.core.aggregation import masked_mean
from rlax_llm.core.aggregation import masked_sum
from rlax_llm.core.aggregation import normalizers
from rlax_llm.core.logprobs import chunked_token_logprobs_and_entropy
from rlax_llm.core.logprobs import entropy_from_logits
from rlax_llm.core.logprobs import LogprobsAndEntropy
from rlax_llm.core.logprobs import token_logprobs
from rlax_llm.core.logprobs import token_logprobs_and_entropy
from rlax_llm.core.objectives import cispo_loss
from rlax_llm.core.objectives import dft_loss
from rlax_llm.core.objectives import entropy_loss
from rlax_llm.core.objectives import gspo_loss
from rlax_llm.core.objectives import IMPORTANCE_MODES
from rlax_llm.core.objectives import importance_weights
from rlax_llm.core.objectives import KL_ESTIMATORS
from rlax_llm.core.objectives import kl_loss
from rlax_llm.core.objectives import kl_penalty
from rlax_llm.core.objectives import otr_exact_loss
from rlax_llm.core.objectives import otr_loss
from rlax_llm.core.objectives import policy_gradient_loss
from rlax_llm.core.objectives import ppo_clip_loss
from rlax_llm.core.objectives import ppo_clip_token_loss
from rlax_llm.core.objectives import PPOClipAux
from rlax_llm.core.objectives import sft_loss
from rlax_llm.core.selection import d3s_sample_mask
from rlax_llm.core.selection import d3s_token_mask
from rlax_llm.core.selection import dynamic_sampling_mask
from rlax_llm.core.selection import linear_schedule
from rlax_llm.core.selection import overlong_penalty
from rlax_llm.core.selection import truncation_mask
from rlax_llm.core.selection import xrpo_novelty
from rlax_llm.core.selection import xrpo_sharpen
from rlax_llm.core.tree_advantages import active_pruned_depths
from rlax_llm.core.tree_advantages import depth_advantages
from rlax_llm.core.tree_advantages import edge_log_probs
from rlax_llm.core.tree_advantages import edge_softmax_values
from rlax_llm.core.tree_advantages import edge_weights
from rlax_llm.core.tree_advantages import VALUE_WEIGHTINGS
from rlax_llm.core.tree_advantages import WIDTH_PRUNING_MODES
from rlax_llm.core.tree_advantages import depth_prune_mask
from rlax_llm.core.tree_advantages import node_values
from rlax_llm.core.tree_advantages import path_log_weights
from rlax_llm.core.tree_advantages import token_advantages
from rlax_llm.core.tree_advantages import TreeAdvantages
from rlax_llm.core.tree_advantages import validate_tree
from rlax_llm.core.tree_advantages import width_prune_mask
from rlax_llm.core.value import explained_variance
from rlax_llm.core.value import value_loss
from rlax_llm.core.value import whiten

__all__ = [
    "xrpo_priority",
    "xrpo_allocate",
    "uncertainty_reduction",
    "t_critical",
    "interval_half_width",
    "group_reward_std",
    "exploration_bonus",
    "VALUE_WEIGHTINGS",
    "WIDTH_PRUNING_MODES",
    "active_pruned_depths",
    "edge_log_probs",
    "edge_softmax_values",
    "edge_weights",
    "masked_whiten_unbiased",
    "reinforce_pp_token_advantages",
    "AGGREGATIONS",
    "AggregationFn",
    "GAEOutput",
    "IMPORTANCE_MODES",
    "KL_ESTIMATORS",
    "LogprobsAndEntropy",
    "PPOClipAux",
    "aggregate",
    "as_bool_mask",
    "cispo_loss",
    "dft_loss",
    "d3s_sample_mask",
    "d3s_token_mask",
    "dynamic_sampling_mask",
    "linear_schedule",
    "chunked_token_logprobs_and_entropy",
    "entropy_from_logits",
    "entropy_loss",
    "gae_advantages",
    "grpo_advantages",
    "gspo_loss",
    "importance_weights",
    "kl_loss",
    "kl_penalty",
    "masked_mean",
    "masked_sum",
    "normalizers",
    "otr_exact_loss",
    "otr_loss",
    "overlong_penalty",
    "policy_gradient_loss",
    "ppo_clip_loss",
    "ppo_clip_token_loss",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "sft_loss",
    "token_level_returns",
    "token_level_rewards",
    "token_logprobs",
    "token_logprobs_and_entropy",
    "truncation_mask",
    "xrpo_novelty",
    "xrpo_sharpen",
    "TreeAdvantages",
    "depth_advantages",
    "depth_prune_mask",
    "explained_variance",
    "node_values",
    "path_log_weights",
    "token_advantages",
    "validate_tree",
    "value_loss",
    "whiten",
    "width_prune_mask",
]
