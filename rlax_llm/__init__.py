"""rlax_llm: reinforcement learning on language models with verifiable rewards, in JAX."""
