"""Imports every module that registers a rollout engine (see rollouts.py)."""

# pylint: disable=unused-import
from rlax_llm.methods import rollouts
from rlax_llm.methods import april
from rlax_llm.methods import branch
from rlax_llm.methods import latr
