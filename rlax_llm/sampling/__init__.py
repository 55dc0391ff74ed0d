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
from rlax_llm.sampling.generate import check_context
from rlax_llm.sampling.generate import generate
from rlax_llm.sampling.generate import generate_jit
from rlax_llm.sampling.generate import Rollout
from rlax_llm.sampling.latr import edit_distance
from rlax_llm.sampling.latr import eta_schedule
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
from rlax_llm.sampling.partial import PartialBuffer
from rlax_llm.sampling.partial import PartialState
from rlax_llm.sampling.partial import prefill_length
from rlax_llm.sampling.partial import staleness_stats
from rlax_llm.sampling.partial import with_forced_lengths
from rlax_llm.sampling.samplers import filtered_logits
from rlax_llm.sampling.samplers import min_p_filter
from rlax_llm.sampling.samplers import Sample
from rlax_llm.sampling.samplers import sample_token
from rlax_llm.sampling.samplers import SamplerConfig
from rlax_llm.sampling.samplers import top_k_filter
from rlax_llm.sampling.samplers import top_p_filter

__all__ = [
    "BranchRollout", "ContinuationModel", "Group", "PartialBuffer",
    "PartialState", "Rollout", "Sample", "SamplerConfig", "TreeConfig",
    "TreeRollout", "branch_generate", "branch_generate_jit", "check_context",
    "edit_distance", "eta_schedule", "expand_samples", "filtered_logits",
    "generate", "generate_jit", "generate_partial", "latr_decode",
    "latr_generate", "latr_generate_jit", "min_p_filter",
    "normalized_edit_distance", "prefill_length", "sample_token",
    "staleness_stats", "top_k_filter", "top_p_filter", "tree_rows",
    "tree_sample", "with_forced_lengths",
]
