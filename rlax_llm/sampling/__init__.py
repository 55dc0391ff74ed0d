"""Token samplers and rollout engines.

`generate` (G samples per prompt sharing one prefill), LATR lookahead trees
(`latr`), shared-prefix trees (`branch`) and APRIL partial rollouts
(`partial`).
"""

from rlax_llm.sampling.branch import branch_generate
from rlax_llm.sampling.branch import branch_generate_jit
from rlax_llm.sampling.branch import BranchRollout
from rlax_llm.sampling.branch import expand_samples
from rlax_llm.sampling.branch import tree_sample
from rlax_llm.sampling.generate import auto_decode_chunk
from rlax_llm.sampling.generate import check_context
from rlax_llm.sampling.generate import chunk_layout
from rlax_llm.sampling.generate import generate
from rlax_llm.sampling.generate import generate_jit
from rlax_llm.sampling.generate import generate_on_mesh
from rlax_llm.sampling.generate import generate_on_mesh_jit
from rlax_llm.sampling.generate import Rollout
from rlax_llm.sampling.latr import edit_distance
from rlax_llm.sampling.latr import COUNTDOWN_ETA
from rlax_llm.sampling.latr import eta_at
from rlax_llm.sampling.latr import eta_schedule
from rlax_llm.sampling.latr import math_symbol_table
from rlax_llm.sampling.latr import rouge_l
from rlax_llm.sampling.latr import suffix_match
from rlax_llm.sampling.latr import tree_config_from_fields
from rlax_llm.sampling.latr import latr_decode
from rlax_llm.sampling.latr import latr_generate
from rlax_llm.sampling.latr import latr_generate_jit
from rlax_llm.sampling.latr import normalized_edit_distance
from rlax_llm.sampling.latr import tree_rows
from rlax_llm.sampling.latr import TreeConfig
from rlax_llm.sampling.latr import TreeRollout
from rlax_llm.sampling.partial import ContinuationModel
from rlax_llm.sampling.partial import generate_partial
from rlax_llm.sampling.partial import Group
from rlax_llm.sampling.partial import pack_lanes
from rlax_llm.sampling.partial import PartialBuffer
from rlax_llm.sampling.partial import PartialState
from rlax_llm.sampling.partial import prefill_lanes
from rlax_llm.sampling.partial import prefill_length
from rlax_llm.sampling.partial import resumed_length
from rlax_llm.sampling.partial import staleness_stats
from rlax_llm.sampling.partial import with_forced_lengths
from rlax_llm.sampling.samplers import categorical_from_uniform
from rlax_llm.sampling.samplers import filtered_logits
from rlax_llm.sampling.samplers import min_p_filter
from rlax_llm.sampling.samplers import Sample
from rlax_llm.sampling.samplers import sample_token
from rlax_llm.sampling.samplers import sample_token_from_uniform
from rlax_llm.sampling.samplers import SamplerConfig
from rlax_llm.sampling.samplers import top_k_filter
from rlax_llm.sampling.samplers import top_p_filter

__all__ = [
    "BranchRollout", "ContinuationModel", "Group", "PartialBuffer",
    "PartialState", "Rollout", "Sample", "SamplerConfig", "TreeConfig",
    "TreeRollout", "auto_decode_chunk", "branch_generate",
    "branch_generate_jit", "categorical_from_uniform", "check_context",
    "COUNTDOWN_ETA", "chunk_layout", "edit_distance", "eta_at",
    "eta_schedule", "math_symbol_table", "rouge_l", "suffix_match",
    "tree_config_from_fields", "expand_samples",
    "filtered_logits", "generate", "generate_jit", "generate_on_mesh",
    "generate_on_mesh_jit", "generate_partial", "latr_decode",
    "latr_generate", "latr_generate_jit", "min_p_filter",
    "normalized_edit_distance", "pack_lanes", "prefill_lanes",
    "prefill_length", "resumed_length", "sample_token",
    "sample_token_from_uniform", "staleness_stats", "top_k_filter",
    "top_p_filter", "tree_rows", "tree_sample", "with_forced_lengths",
]
