"""Executes the colab/ notebooks end to end with SMOKE = True."""

import json
import os

import nbformat
import pytest

nbclient = pytest.importorskip("nbclient")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO_ROOT, "colab", "quickstart.ipynb")
PROTOTYPE = os.path.join(REPO_ROOT, "colab", "prototype_a_loss.ipynb")
REPRODUCE_OTR = os.path.join(REPO_ROOT, "colab", "reproduce_otr.ipynb")


def _parameters_cell(nb):
  cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(cells) == 1, "the notebook needs one cell tagged 'parameters'"
  return cells[0]


@pytest.mark.parametrize("path", [NOTEBOOK, PROTOTYPE, REPRODUCE_OTR])
def test_notebook_is_valid_and_cleared(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code)
  src = _parameters_cell(nb).source
  assert "SMOKE = False" in src and "WORKDIR = " in src


@pytest.mark.slow
def test_quickstart_smoke_run(tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  workdir = tmp_path / "quickstart"
  _parameters_cell(nb).source = (f"SMOKE = True\nWORKDIR = {str(workdir)!r}\n")
  client = nbclient.NotebookClient(
      nb, timeout=600, kernel_name="python3",
      resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
  client.execute()

  run_dir = workdir / "smoke"
  with open(run_dir / "summary.json") as f:
    summary = json.load(f)
  for key in ("sft_accuracy", "final_accuracy"):
    value = summary[key]
    assert isinstance(value, (int, float)) and not isinstance(value, bool), (
        summary)
    assert 0.0 <= value <= 1.0
  # The plotting cell wrote and displayed the curves.
  for name in ("reward.png", "accuracy.png", "sft_loss.png", "rl_stats.png"):
    assert (run_dir / name).stat().st_size > 0
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert sum("image/png" in o.get("data", {}) for o in outputs) == 4
  assert not [o for o in outputs if o.output_type == "error"]


@pytest.mark.slow
def test_prototype_a_loss_smoke_run(tmp_path):
  nb = nbformat.read(PROTOTYPE, as_version=4)
  _parameters_cell(nb).source = (f"SMOKE = True\nWORKDIR = {str(tmp_path)!r}\n")
  client = nbclient.NotebookClient(
      nb, timeout=600, kernel_name="python3",
      resources={"metadata": {"path": os.path.dirname(PROTOTYPE)}})
  client.execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs)
  # The gradient check ran (its assertions would have raised) and both
  # methods trained and logged the new loss's metric.
  assert "gradient at rho = 1 equals the policy gradient" in text
  assert "gaussian_gate" in text
  for method in ("grpo", "gaussian_gate"):
    with open(tmp_path / f"smoke_{method}" / "summary.json") as f:
      assert 0.0 <= json.load(f)["final_accuracy"] <= 1.0
  from rlax_llm.training.metrics import read_metrics  # pylint: disable=g-import-not-at-top
  recs = read_metrics(str(tmp_path / "smoke_gaussian_gate" / "metrics.jsonl"))
  gates = [r["rl/gate_mean"] for r in recs if "rl/gate_mean" in r]
  assert gates and all(0.0 < g <= 1.0 for g in gates)
  assert (tmp_path / "prototype.png").stat().st_size > 0


@pytest.mark.slow
def test_reproduce_otr_smoke_run(tmp_path):
  nb = nbformat.read(REPRODUCE_OTR, as_version=4)
  params = _parameters_cell(nb)
  assert 'BASE = "committed"' in params.source
  # The smoke run pretrains its own toy base (the notebook's other path).
  params.source = (f"SMOKE = True\nWORKDIR = {str(tmp_path)!r}\n"
                   "BASE = 'pretrain'\nSTEPS = 2\nSEEDS = (0,)\n")
  client = nbclient.NotebookClient(
      nb, timeout=600, kernel_name="python3",
      resources={"metadata": {"path": os.path.dirname(REPRODUCE_OTR)}})
  client.execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  # It pretrained a base and wrote it as an HF checkpoint ...
  assert (tmp_path / "base" / "hf" / "model.safetensors").is_file()
  evals = json.loads((tmp_path / "base" / "base_eval.json").read_text())
  assert evals["step"] == 4
  # ... fine-tuned both arms from it, and tabulated the rows it scored.
  out = tmp_path / "smoke_repro"
  saved = json.loads((out / "table.json").read_text())
  assert [(r["arm"], r["seed"]) for r in saved["rows"]] == [("sft", 0),
                                                           ("otr", 0)]
  for row in saved["rows"]:
    for split in ("test", "sort"):
      assert 0.0 <= row[f"{split}/accuracy"] <= 1.0
      assert (saved["table"][row["arm"]][f"{split}/accuracy"]["mean"]
              == row[f"{split}/accuracy"])
  for arm in ("sft", "otr"):
    summary = json.loads((out / arm / "seed0" / "summary.json").read_text())
    assert summary["steps"] == 2
  assert (out / "otr_vs_sft.png").stat().st_size > 0
  assert sum("image/png" in o.get("data", {}) for o in outputs) == 1
