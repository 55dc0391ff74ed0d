"""Metric writers: `metrics.jsonl` (one object per logged step) and TensorBoard.

On resume, `MetricWriter(..., resume_step=s)` drops the lines logged after the
checkpoint at step `s`, so the file of a resumed run ends up identical to that
of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Mapping

import numpy as np


def to_python(value: Any) -> Any:
  """A JSON-able scalar from a NumPy / JAX scalar (NaN/Inf become strings)."""
  if isinstance(value, (str, bool)) or value is None:
    return value
  arr = np.asarray(value)
  if arr.ndim:
    raise ValueError(f"Metric values must be scalars, got shape {arr.shape}.")
  if np.issubdtype(arr.dtype, np.integer):
    return int(arr)
  if np.issubdtype(arr.dtype, np.bool_):
    return bool(arr)
  x = float(arr)
  return x if math.isfinite(x) else str(x)


def read_metrics(path: str) -> list[dict[str, Any]]:
  """All records of a metrics.jsonl file (tolerates a torn last line)."""
  records = []
  if not os.path.exists(path):
    return records
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        break  # a line cut by a kill: everything after it is untrusted
  return records


def _summary_writer():
  """tensorboardX's SummaryWriter, imported without torch.

  tensorboardX imports torch, when it is installed, only to accept torch
  tensors (2+ s on a CPU host, in every process that writes metrics); the
  writer here is given Python floats. Unless torch is already loaded, its
  import is refused for the duration of tensorboardX's (tensorboardX then
  takes NumPy arrays only) and allowed again after.
  """
  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    if sys.modules.get("torch", 0) is None:
      del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  """Appends metrics to `workdir/metrics.jsonl` and TensorBoard event files.

  Args:
    workdir: the run directory.
    resume_step: when resuming from a checkpoint, its step; records with a
      larger step are removed. None starts a fresh file.
    tensorboard: also write TensorBoard events under `workdir/tensorboard`.
  """

  def __init__(self, workdir: str, *, resume_step: int | None = None,
               tensorboard: bool = True, enabled: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    # In a multi-process run only the primary process writes (enabled=False
    # elsewhere); the others keep their records in memory.
    self.enabled = enabled
    self.records = []
    self._tb = None
    if not enabled:
      return
    kept = []
    if resume_step is not None:
      kept = [r for r in read_metrics(self.path)
              if r.get("step", 0) <= resume_step]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      for r in kept:
        f.write(json.dumps(r) + "\n")
    os.replace(tmp, self.path)
    self.records = kept
    self._tb = None
    if tensorboard:
      self._tb = _summary_writer()(os.path.join(workdir, "tensorboard"),
                                   purge_step=resume_step)

  def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
    record = {"step": int(step)}
    record.update({k: to_python(v) for k, v in sorted(metrics.items())})
    if not self.enabled:
      self.records.append(record)
      return record
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    self.records.append(record)
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)) and not isinstance(
            v, bool):
          self._tb.add_scalar(k, v, step)
    return record

  def flush(self):
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()
