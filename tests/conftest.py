"""Test-session setup: one XLA compilation cache for the whole run, fast compiles.

Many tests compile the same programs (the smoke experiment's update steps,
`generate` on the tiny model, ...). A persistent compilation cache shared by
the pytest-xdist workers and by the subprocesses some tests start compiles
each of them once per run. It lives in a fresh temporary directory, removed
at the end, so no run reuses another run's programs.

`RLAX_TEST_TIMELINE=FILE` logs when each test starts and ends on which
xdist worker (to see where a run's time goes and whether a worker idles),
and how many programs it compiled in that worker and the seconds spent
tracing, lowering and compiling them (not counting its subprocesses).
"""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"

# Set at import, in the controller before it starts the xdist workers (they
# and every subprocess inherit the environment), and before jax is imported.
if _CACHE_ENV not in os.environ:
  os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="rlax_llm_test_xla_cache_")
  os.environ["RLAX_TEST_OWNS_XLA_CACHE"] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

# The suite's programs are tiny and most run a few times: compiling them
# dominates. LLVM's -O0 code generation for the CPU backend compiles them in
# about half the time, and the run is faster overall (tests/test_rl_update.py
# with tests/test_ppo.py: 108 s -> 60 s; three learning tests 59 s -> 48 s).
# XLA's HLO passes (fusion, layout) are unchanged; the float results differ
# from -O2 code by rounding only. Subprocesses inherit the flag; scripts that
# force a device count append to XLA_FLAGS. A developer's own
# --xla_backend_optimization_level in XLA_FLAGS wins.
_OPT_FLAG = "--xla_backend_optimization_level"
if _OPT_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(
      f for f in (os.environ.get("XLA_FLAGS", ""), f"{_OPT_FLAG}=0") if f)

# Two more compile-time settings, each added only where XLA_FLAGS does not
# already name it, and only after a subprocess accepted them (a jaxlib that
# no longer knows a flag would abort on it; probed once, in the process that
# starts the workers):
# * XLA's MLIR fusion emitters for the CPU take about half of the suite's
#   compilation time; the classic elemental emitters compile the same fusions
#   in about half the time (tests/test_latr.py 97 s -> 53 s, most of it
#   compiling LATR's decode loop; tests/test_learning.py 189 s -> 170 s).
#   The program and its results are the same up to float rounding.
# * XLA splits a program's LLVM module into parts compiled on several threads;
#   the two xdist workers already keep both cores busy, so the split only
#   adds work. One part: the GRPO smoke update step compiles in 0.36 s
#   instead of 0.43 s, and tests/test_steps.py, test_latr.py,
#   test_hf_gemma.py and test_tree_advantages.py took 71.7 and 73.0 s
#   instead of 77.2 and 79.9 s. The same machine code, in one object file.
_OPTIONAL_FLAGS = ("--xla_cpu_use_fusion_emitters=false",
                   "--xla_cpu_parallel_codegen_split_count=1")


def _accepted(flags: str) -> bool:
  probe = subprocess.run(
      [sys.executable, "-c",
       "import jax, jax.numpy as jnp; jax.jit(jnp.sin)(jnp.ones(2))"],
      env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"),
      capture_output=True, check=False, timeout=300)
  return probe.returncode == 0


if "RLAX_TEST_XLA_FLAGS_PROBED" not in os.environ:
  os.environ["RLAX_TEST_XLA_FLAGS_PROBED"] = "1"
  _wanted = [f for f in _OPTIONAL_FLAGS
             if f.split("=")[0] not in os.environ["XLA_FLAGS"]]
  _all = " ".join([os.environ["XLA_FLAGS"], *_wanted])
  if _wanted and _accepted(_all):
    os.environ["XLA_FLAGS"] = _all
  else:  # one at a time: keep those this jaxlib knows
    for _flag in _wanted:
      if _accepted(f"{os.environ['XLA_FLAGS']} {_flag}"):
        os.environ["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} {_flag}"


def pytest_unconfigure(config):
  del config
  if os.environ.get("RLAX_TEST_OWNS_XLA_CACHE") == str(os.getpid()):
    shutil.rmtree(os.environ[_CACHE_ENV], ignore_errors=True)


_SLOW_LIST = os.path.join(os.path.dirname(__file__), "slow_tests.txt")


def pytest_collection_modifyitems(config, items):
  """Marks the tests listed in slow_tests.txt `slow` (by node id).

  In an xdist worker with --dist=loadgroup, a grouped test's node id ends in
  "@group" (xdist's own hook may run first); the list names it without.
  """
  del config
  with open(_SLOW_LIST, encoding="utf-8") as f:
    listed = {line.strip() for line in f
              if line.strip() and not line.startswith("#")}
  for item in items:
    if _ungrouped_nodeid(item) in listed:
      item.add_marker(pytest.mark.slow)


def _ungrouped_nodeid(item):
  """The node id without the "@group" that xdist appends to grouped tests."""
  if item.get_closest_marker("xdist_group"):
    return item.nodeid.rsplit("@", 1)[0]
  return item.nodeid


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
  """Warns when pytest-xdist cannot keep an `xdist_group` on one worker.

  With --dist=loadgroup, xdist appends "@group" to the node id of each
  grouped test in the worker; a pytest whose node ids ignore that (9.2)
  spreads a group over the workers, and each then builds the group's module
  fixtures (the 8-device run, the learning warm-up, the kill tests'
  reference runs) again.
  """
  if (not os.environ.get("PYTEST_XDIST_WORKER")
      or not session.config.getvalue("loadgroup")):
    return
  lost = [item.nodeid for item in session.items
          if item.get_closest_marker("xdist_group")
          and _ungrouped_nodeid(item) == item.nodeid]
  if lost:
    import warnings  # pylint: disable=g-import-not-at-top
    warnings.warn(pytest.PytestConfigWarning(
        f"pytest {pytest.__version__} hides the xdist_group of {len(lost)} "
        f"tests (e.g. {lost[0]}) from pytest-xdist's --dist=loadgroup, so "
        "their module fixtures run once per worker; install the test "
        "extra's pytest (pip install -e '.[test]', pytest<9.2)."))


_TIMELINE_ENV = "RLAX_TEST_TIMELINE"


def pytest_runtest_logstart(nodeid, location):
  """With RLAX_TEST_TIMELINE=FILE, appends "worker start|end time nodeid"
  lines to FILE: how the xdist workers spent the run (who idled, when)."""
  del location
  _timeline("start", nodeid)


def pytest_runtest_logfinish(nodeid, location):
  del location
  _timeline("end", nodeid)


_COMPILE_SECONDS = {}  # jax.monitoring duration event -> seconds in this test


def pytest_configure(config):
  del config
  if os.environ.get(_TIMELINE_ENV):
    from jax import monitoring  # pylint: disable=g-import-not-at-top
    monitoring.register_event_duration_secs_listener(_on_duration)


def _on_duration(event, seconds, **kwargs):
  del kwargs
  if event.startswith("/jax/core/compile/"):
    key = event.rsplit("/", 1)[-1].replace("_duration", "")
    _COMPILE_SECONDS[key] = _COMPILE_SECONDS.get(key, 0.0) + seconds
    if key == "backend_compile":
      _COMPILE_SECONDS["compiles"] = _COMPILE_SECONDS.get("compiles", 0) + 1


def _timeline(event, nodeid):
  """The end line also gives the programs this test compiled in this process
  and the seconds spent tracing, lowering and compiling them (jax.monitoring's
  compile durations), as "compiles=N,backend_compile=S,..."."""
  path = os.environ.get(_TIMELINE_ENV)
  if path:
    import time  # pylint: disable=g-import-not-at-top
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    extra = ""
    if event == "end" and _COMPILE_SECONDS:
      extra = " " + ",".join(f"{k}={v:.2f}" if isinstance(v, float)
                             else f"{k}={v}"
                             for k, v in sorted(_COMPILE_SECONDS.items()))
    _COMPILE_SECONDS.clear()
    with open(path, "a", encoding="utf-8") as f:
      f.write(f"{worker} {event} {time.time():.3f} {nodeid}{extra}\n")


# What the commands the tests start import before they start a JAX backend:
# `python -m experiments.train`'s modules (not experiments.train itself: a
# second import of it would define its flags twice), which include jax,
# flax, optax, orbax and the training library the scripts use.
FORK_PRELOAD = ("absl.app", "ml_collections.config_flags", "configs.base",
                "rlax_llm.experiment", "rlax_llm.experiment.config_utils",
                "rlax_llm.parallel.distributed", "tensorboardX", "tqdm")


@pytest.fixture(scope="session")
def forks():
  """A `forkrun.ForkServer` for the Python commands tests start (one per
  xdist worker, started on first use)."""
  from tests import forkrun  # pylint: disable=g-import-not-at-top
  server = forkrun.ForkServer(
      FORK_PRELOAD, cwd=os.path.dirname(os.path.dirname(__file__)))
  yield server
  server.close()
