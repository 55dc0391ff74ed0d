"""Import weight: the functional primitives load jax, chex and numpy only.

Each check runs in a fresh interpreter (`sys.executable -c ...`), since this
test process has long since imported everything, and reads which top-level
modules the import left in `sys.modules`.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Data, reward, checkpoint, plotting, logging and Hugging Face stacks.
HEAVY = ("grain", "array_record", "orbax", "tensorflow_datasets", "tensorflow",
         "sympy", "matplotlib", "tensorboardX", "tqdm", "ml_collections",
         "transformers", "torch", "safetensors", "tokenizers")
# The array-math packages also stay free of the module and optimizer stacks.
NOT_IN_CORE = HEAVY + ("flax", "optax")

# package -> top-level modules its import must not load.
FORBIDDEN = {
    "rlax_llm.core": NOT_IN_CORE,
    "rlax_llm.sampling": NOT_IN_CORE,
    "rlax_llm.parallel": NOT_IN_CORE,
    "rlax_llm.models": HEAVY,
    # Every run's process (experiments.train): no math parser, Hugging Face,
    # plotting or TensorFlow stacks until a task or writer asks for them.
    "rlax_llm.experiment": ("sympy", "torch", "transformers", "matplotlib",
                            "tensorflow", "tensorflow_datasets",
                            "tensorboardX"),
}


def _run(code, extra_path=None):
  """Runs `code` in a fresh interpreter and returns what it printed as JSON."""
  env = dict(os.environ)
  if extra_path:
    env["PYTHONPATH"] = os.pathsep.join(
        [extra_path] + [p for p in [env.get("PYTHONPATH")] if p])
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                        cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr
  return json.loads(proc.stdout.strip().splitlines()[-1])


def loaded_top_level(module, extra_path=None):
  """Top-level module names in `sys.modules` after a fresh `import module`."""
  return set(_run(f"""
      import json, sys
      import {module}
      print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}})))
      """, extra_path))


def forbidden_loaded(module, forbidden, extra_path=None):
  return sorted(loaded_top_level(module, extra_path) & set(forbidden))


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_package_import_leaves_heavy_stacks_unloaded(module):
  loaded = loaded_top_level(module)
  assert module.split(".")[0] in loaded and "jax" in loaded
  bad = sorted(loaded & set(FORBIDDEN[module]))
  assert not bad, (
      f"`import {module}` loads {bad}; import them inside the functions that "
      "need them (or keep their module out of the package __init__).")


def test_check_detects_a_module_that_loads_a_heavy_stack(tmp_path):
  # A stand-in package that imports one forbidden module at top level, the
  # mistake the check above exists to catch.
  (tmp_path / "heavy_probe.py").write_text("import json\nimport tqdm\n")
  assert forbidden_loaded("heavy_probe", HEAVY, str(tmp_path)) == ["tqdm"]
  (tmp_path / "light_probe.py").write_text("import json\n")
  assert forbidden_loaded("light_probe", HEAVY, str(tmp_path)) == []


def test_top_level_import_loads_no_subpackage():
  loaded = _run("""
      import json, sys
      import rlax_llm
      print(json.dumps(sorted(m for m in sys.modules
                              if m.startswith("rlax_llm.") or m == "jax")))
      """)
  assert loaded == []


def test_every_public_name_resolves_lazily():
  out = _run("""
      import json, sys
      import rlax_llm
      names = list(rlax_llm.__all__)
      listed = sorted(set(names) - set(dir(rlax_llm)))
      resolved = {n: getattr(rlax_llm, n).__name__ for n in names}
      from rlax_llm import experiment, training
      try:
        rlax_llm.no_such_subpackage
        missing_error = ""
      except AttributeError as e:
        missing_error = str(e)
      print(json.dumps({"names": names, "not_in_dir": listed,
                        "resolved": resolved,
                        "same": (experiment is rlax_llm.experiment and
                                 training is sys.modules["rlax_llm.training"]),
                        "missing_error": missing_error}))
      """)
  assert sorted(out["names"]) == ["core", "data", "experiment", "methods",
                                  "models", "parallel", "rewards", "sampling",
                                  "training"]
  assert out["not_in_dir"] == []
  assert out["resolved"] == {n: f"rlax_llm.{n}" for n in out["names"]}
  assert out["same"]
  assert "no_such_subpackage" in out["missing_error"]
  assert "from rlax_llm import core" in out["missing_error"]


def test_metric_writer_leaves_torch_unloaded_and_importable(tmp_path):
  """Writing TensorBoard events does not load torch (2+ s per process), and
  torch stays importable afterwards when it is installed."""
  got = _run(f"""
      import importlib.util, json, os, sys
      from rlax_llm.training import metrics
      w = metrics.MetricWriter({str(tmp_path)!r})
      w.write(3, {{"rl/loss": 0.5}})
      w.close()
      loaded = "torch" in sys.modules
      events = os.listdir(os.path.join({str(tmp_path)!r}, "tensorboard"))
      has_torch = importlib.util.find_spec("torch") is not None
      if has_torch:
        import torch
      print(json.dumps([loaded, len(events), has_torch,
                        "torch" in sys.modules]))
      """)
  loaded, events, has_torch, after = got
  assert not loaded and events == 1
  assert after == has_torch
