"""Decoder models (Flax NNX: Llama, Qwen2/3, Gemma 2/3), configs, HF interop.

`rlax_llm.models.hf` (checkpoints) and `rlax_llm.models.hf_tokenizer`
(tokenizers, chat templates) are imported on use.
"""

from rlax_llm.models.config import ModelConfig
from rlax_llm.models import lora
from rlax_llm.models.config import LORA_TARGETS
from rlax_llm.models.config import PRESETS
from rlax_llm.models.config import REMAT_POLICIES
from rlax_llm.models.config import get_model_config
from rlax_llm.models.transformer import KVCache
from rlax_llm.models.transformer import LoRAParam
from rlax_llm.models.transformer import Transformer
from rlax_llm.models.transformer import abstract_model
from rlax_llm.models.transformer import decode_cache_from_kv
from rlax_llm.models.transformer import logical_axes
from rlax_llm.models.transformer import prefix_cache_from_kv
from rlax_llm.models.transformer import resize_decode_cache
from rlax_llm.models.transformer import rope_frequencies

__all__ = ["KVCache", "LORA_TARGETS", "LoRAParam", "ModelConfig", "PRESETS",
           "REMAT_POLICIES", "lora", "Transformer", "abstract_model",
           "decode_cache_from_kv", "get_model_config", "logical_axes",
           "prefix_cache_from_kv", "resize_decode_cache", "rope_frequencies"]
