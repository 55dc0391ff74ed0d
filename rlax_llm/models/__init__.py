"""Decoder models (Flax NNX, Llama/Qwen2 family) and their configs."""

from rlax_llm.models.config import ModelConfig
from rlax_llm.models.config import PRESETS
from rlax_llm.models.config import get_model_config
from rlax_llm.models.transformer import KVCache
from rlax_llm.models.transformer import Transformer
from rlax_llm.models.transformer import logical_axes

__all__ = ["KVCache", "ModelConfig", "PRESETS", "Transformer",
           "get_model_config", "logical_axes"]
