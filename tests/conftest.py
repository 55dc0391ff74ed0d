"""Test-session setup: one XLA compilation cache for the whole run.

Many tests compile the same programs (the smoke experiment's update steps,
`generate` on the tiny model, ...). A persistent compilation cache shared by
the pytest-xdist workers and by the subprocesses some tests start compiles
each of them once per run. It lives in a fresh temporary directory, removed
at the end, so no run reuses another run's programs.
"""

import os
import shutil
import tempfile

import pytest

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"

# Set at import, in the controller before it starts the xdist workers (they
# and every subprocess inherit the environment), and before jax is imported.
if _CACHE_ENV not in os.environ:
  os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="rlax_llm_test_xla_cache_")
  os.environ["RLAX_TEST_OWNS_XLA_CACHE"] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


def pytest_unconfigure(config):
  del config
  if os.environ.get("RLAX_TEST_OWNS_XLA_CACHE") == str(os.getpid()):
    shutil.rmtree(os.environ[_CACHE_ENV], ignore_errors=True)


_SLOW_LIST = os.path.join(os.path.dirname(__file__), "slow_tests.txt")


def pytest_collection_modifyitems(config, items):
  """Marks the tests listed in slow_tests.txt `slow` (by node id)."""
  del config
  with open(_SLOW_LIST, encoding="utf-8") as f:
    listed = {line.strip() for line in f
              if line.strip() and not line.startswith("#")}
  for item in items:
    if item.nodeid in listed:
      item.add_marker(pytest.mark.slow)
