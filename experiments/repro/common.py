"""Runs a reproduction's arms over seeds and tabulates held-out accuracy.

A reproduction module (e.g. `experiments/repro/otr_sft.py`) names its arms
(name -> function(seed, base) -> config), the splits to score and a title;
`main` runs every (arm, seed) not yet finished under OUT/<arm>/seed<k>
(each is an ordinary resumable run), scores the latest checkpoint on each
split (`experiment.evaluate_checkpoint`, cached as eval_<split>_step<N>.json;
the run's own final evaluation for the config's eval split), summarises the
run's training curve with the module's `curves` (name -> function of the
metrics.jsonl records) and writes OUT/table.json and OUT/table.md: mean,
standard deviation (ddof 1) and count over seeds per arm and column, plus
wall time per run. Re-running the command after an interruption skips what
is done.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Mapping, Sequence

import numpy as np

ConfigFn = Callable[[int, str], object]
CurveFn = Callable[[list], float]


def _summary(workdir: str) -> dict | None:
  path = os.path.join(workdir, "summary.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _cached_eval(workdir: str, split: str, step: int) -> dict | None:
  for name in (f"eval_{split}_step{step}.json", f"eval_step{step}.json"):
    path = os.path.join(workdir, name)
    if os.path.isfile(path):
      with open(path) as f:
        res = json.load(f)
      if res.get("split") == split:
        return res
  return None


def run_arms(arms: Mapping[str, ConfigFn], *, seeds: Sequence[int],
             base: str, out: str, splits: Sequence[str],
             metrics: Sequence[str] = ("accuracy",),
             curves: Mapping[str, CurveFn] | None = None,
             log=print) -> dict:
  """Runs/evaluates every (arm, seed); returns the table (also written)."""
  from rlax_llm import experiment  # pylint: disable=g-import-not-at-top
  from rlax_llm.training import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  os.makedirs(out, exist_ok=True)
  rows = []
  for arm, make in arms.items():
    for seed in seeds:
      workdir = os.path.join(out, arm, f"seed{seed}")
      config = make(seed, base)
      summary = _summary(workdir)
      if summary is None:
        log(f"[{arm} seed {seed}] training in {workdir}")
        t0 = time.time()
        summary = experiment.run(config, workdir)
        log(f"[{arm} seed {seed}] done in {time.time() - t0:.0f}s")
      step = int(summary["steps"])
      row = {"arm": arm, "seed": seed, "wall_time_s": summary["wall_time_s"]}
      for split in splits:
        res = _cached_eval(workdir, split, step)
        if res is None and split == config.eval.split:
          res = summary.get("final_eval")  # the run's last eval, same params
        if res is None:
          res = experiment.evaluate_checkpoint(config, workdir, split=split)
        for m in metrics:
          if m in res:
            row[f"{split}/{m}"] = float(res[m])
      if curves:
        records = metrics_lib.read_metrics(
            os.path.join(workdir, "metrics.jsonl"))
        for name, fn in curves.items():
          row[name] = float(fn(records))
      rows.append(row)
  table = tabulate(rows)
  with open(os.path.join(out, "table.json"), "w") as f:
    json.dump({"rows": rows, "table": table}, f, indent=1, sort_keys=True)
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(markdown(table))
  return table


def tabulate(rows: Sequence[dict]) -> dict:
  """{arm: {column: {"mean", "std", "n"}}} over the rows' seeds."""
  out: dict = {}
  for row in rows:
    arm = out.setdefault(row["arm"], {})
    for k, v in row.items():
      if k in ("arm", "seed"):
        continue
      arm.setdefault(k, []).append(float(v))
  for arm, cols in out.items():
    for k, vals in cols.items():
      a = np.asarray(vals)
      cols[k] = {"mean": float(a.mean()),
                 "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
                 "n": int(a.size)}
  return out


def markdown(table: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
  """One row per arm, `mean ± std (n)` per column."""
  cols = sorted({k for arm in table.values() for k in arm})
  lines = ["| arm | " + " | ".join(cols) + " |",
           "|---|" + "---|" * len(cols)]
  for arm, vals in table.items():
    cells = []
    for k in cols:
      v = vals.get(k)
      cells.append("" if v is None else
                   f"{v['mean']:.3f} ± {v['std']:.3f} ({v['n']})")
    lines.append(f"| {arm} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"
