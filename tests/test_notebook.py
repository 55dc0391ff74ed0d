"""Executes colab/quickstart.ipynb end to end with SMOKE = True."""

import json
import os

import nbformat
import pytest

nbclient = pytest.importorskip("nbclient")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO_ROOT, "colab", "quickstart.ipynb")


def _parameters_cell(nb):
  cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(cells) == 1, "the notebook needs one cell tagged 'parameters'"
  return cells[0]


def test_notebook_is_valid_and_cleared():
  nb = nbformat.read(NOTEBOOK, as_version=4)
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
