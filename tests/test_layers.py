"""The package's import graph: no cycle, and no edge pointing up the layers.

Layers, lowest first (a module may import its own package and any package
of a lower layer, never one of its own layer or above):
  0  core, parallel, rewards      array math, device mesh, verifiers
  1  models, sampling             the decoder and tokenizers, samplers
  2  data                         tasks (with their tokenizers), pipelines
  3  training                     states, update steps, checkpoints
  4  methods                      methods, rollout engines, group transforms
  5  experiment                   builds a run from a config, the loop
Every `import` counts, also those inside functions.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "rlax_llm")
LAYER = {"core": 0, "parallel": 0, "rewards": 0, "models": 1, "sampling": 1,
         "data": 2, "training": 3, "methods": 4, "experiment": 5}


def _modules():
  out = {}
  for dirpath, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3]
        name = rel.replace(os.sep, ".")
        if name.endswith(".__init__"):
          name = name[:-len(".__init__")]
        out[name] = path
  return out


def _imports(path, name, modules):
  tree = ast.parse(open(path).read())
  pkg = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = pkg.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1]
                        + ([base] if base else []))
      # `from pkg import mod` depends on pkg.mod; `from pkg import name` on
      # pkg.
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules
                 else base for a in node.names]
    else:
      continue
    for t in targets:
      if t.startswith("rlax_llm"):
        # The longest known module the target names.
        while t and t not in modules:
          t = t.rpartition(".")[0]
        if t:
          found.add(t)
  return found


def _graph():
  modules = _modules()
  return {m: _imports(p, m, modules) - {m} for m, p in modules.items()}


def _package(module):
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else None


def upward_edges(graph):
  bad = []
  for src, targets in graph.items():
    ps = _package(src)
    if ps is None:  # the top-level package may name every subpackage
      continue
    for dst in targets:
      pd = _package(dst)
      if pd is None:
        bad.append((src, dst))
      elif pd != ps and LAYER[pd] >= LAYER[ps]:
        bad.append((src, dst))
  return sorted(bad)


def cycles(graph):
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []
  counter = [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_every_subpackage_has_a_layer():
  pkgs = {_package(m) for m in _graph()} - {None}
  assert pkgs <= set(LAYER), pkgs - set(LAYER)


def test_no_upward_import():
  assert upward_edges(_graph()) == []


def test_no_import_cycle():
  assert cycles(_graph()) == []


def test_the_checks_find_a_planted_cycle_and_upward_edge():
  graph = {"rlax_llm.core.a": {"rlax_llm.training.steps"},
           "rlax_llm.training.steps": {"rlax_llm.core.a"},
           "rlax_llm.methods.x": {"rlax_llm.methods.y"},
           "rlax_llm.methods.y": {"rlax_llm.methods.x"},
           "rlax_llm.models.t": {"rlax_llm.sampling.s"}}
  assert upward_edges(graph) == [("rlax_llm.core.a", "rlax_llm.training.steps"),
                                 ("rlax_llm.models.t", "rlax_llm.sampling.s")]
  assert sorted(cycles(graph)) == [
      ["rlax_llm.core.a", "rlax_llm.training.steps"],
      ["rlax_llm.methods.x", "rlax_llm.methods.y"]]


@pytest.mark.parametrize("module", ["rlax_llm.methods.engines",
                                    "rlax_llm.experiment.loop"])
def test_the_graph_sees_the_engine_and_loop_imports(module):
  g = _graph()
  assert "rlax_llm.methods.rollouts" in g[module] or (
      "rlax_llm.methods.engines" in g[module])
