"""Token samplers and rollout generation."""

from rlax_llm.sampling.generate import Rollout
from rlax_llm.sampling.generate import check_context
from rlax_llm.sampling.generate import generate
from rlax_llm.sampling.generate import generate_jit
from rlax_llm.sampling.samplers import Sample
from rlax_llm.sampling.samplers import SamplerConfig
from rlax_llm.sampling.samplers import filtered_logits
from rlax_llm.sampling.samplers import min_p_filter
from rlax_llm.sampling.samplers import sample_token
from rlax_llm.sampling.samplers import top_k_filter
from rlax_llm.sampling.samplers import top_p_filter

__all__ = ["Rollout", "Sample", "SamplerConfig", "check_context",
           "filtered_logits", "generate", "generate_jit", "min_p_filter",
           "sample_token", "top_k_filter", "top_p_filter"]
