"""Task generators, tokenizers and input pipelines.

Synthetic arithmetic and Countdown generators, a character tokenizer, and a
grain pipeline (`make_loader`) over any random-access source. TFDS builders
(arithmetic, Countdown, GSM8K, MATH-500; array_record, no TensorFlow needed)
live in `rlax_llm.data.tfds_builders`, imported explicitly because importing
it loads TFDS and registers the builders.
"""

from rlax_llm.data.arithmetic import ArithmeticConfig
from rlax_llm.data.arithmetic import ArithmeticTask
from rlax_llm.data.arithmetic import max_answer_length
from rlax_llm.data.arithmetic import max_prompt_length
from rlax_llm.data.arithmetic import Problem
from rlax_llm.data.countdown import CountdownConfig
from rlax_llm.data.countdown import CountdownTask
from rlax_llm.data.pipeline import make_loader
from rlax_llm.data.pipeline import PromptLoader
from rlax_llm.data.tokenizer import CharTokenizer
from rlax_llm.data.tokenizer import DEFAULT_ALPHABET

__all__ = [
    "ArithmeticConfig",
    "ArithmeticTask",
    "CharTokenizer",
    "CountdownConfig",
    "CountdownTask",
    "DEFAULT_ALPHABET",
    "Problem",
    "PromptLoader",
    "make_loader",
    "max_answer_length",
    "max_prompt_length",
]
