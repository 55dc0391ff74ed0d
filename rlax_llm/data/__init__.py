"""Task generators and tokenizers: synthetic arithmetic, a character tokenizer."""

from rlax_llm.data.arithmetic import ArithmeticConfig
from rlax_llm.data.arithmetic import ArithmeticTask
from rlax_llm.data.arithmetic import max_answer_length
from rlax_llm.data.arithmetic import max_prompt_length
from rlax_llm.data.arithmetic import Problem
from rlax_llm.data.tokenizer import CharTokenizer
from rlax_llm.data.tokenizer import DEFAULT_ALPHABET

__all__ = [
    "ArithmeticConfig",
    "ArithmeticTask",
    "CharTokenizer",
    "DEFAULT_ALPHABET",
    "Problem",
    "max_answer_length",
    "max_prompt_length",
]
