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
is done. `main` is every reproduction's command line (--base, --out, --seeds,
--steps, --arms); `mean_of`, `last_of`, `window_mean` and `rollout_tokens`
are the curve summaries the modules share.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Mapping, Sequence

import numpy as np

ConfigFn = Callable[[int, str], object]
CurveFn = Callable[[list], float]
ArmsFn = Callable[[int], Mapping[str, ConfigFn]]

# The committed base model (configs/pretrain_reasoning.py's BASE_MODEL).
DEFAULT_BASE = os.path.join(os.path.dirname(os.path.dirname(
    os.path.dirname(os.path.abspath(__file__)))), "experiments", "repro",
                            "base_reasoning")


def mean_of(key: str) -> CurveFn:
  """The mean of `key` over the records that have it (NaN if none)."""
  def f(records):
    vals = [r[key] for r in records if key in r]
    return float(np.mean(vals)) if vals else float("nan")
  return f


def last_of(key: str) -> CurveFn:
  """The last logged value of `key` (NaN if never logged)."""
  def f(records):
    vals = [r[key] for r in records if key in r]
    return float(vals[-1]) if vals else float("nan")
  return f


def window_mean(key: str, first: int | None = None,
                last: int | None = None) -> CurveFn:
  """The mean of `key` over its first `first` (or last `last`) logged
  values: how a quantity moved between the start and the end of training."""
  if (first is None) == (last is None):
    raise ValueError("window_mean takes exactly one of first= or last=.")

  def f(records):
    vals = [r[key] for r in records if key in r]
    vals = vals[:first] if first is not None else vals[-last:]
    return float(np.mean(vals)) if vals else float("nan")
  return f


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


def rollout_tokens(records) -> np.ndarray:
  """Cumulative `rollout/sampled_tokens` after each RL step of a run's
  records (a tree's shared prefixes count once); [] before RL."""
  vals = [r["rollout/sampled_tokens"] for r in records
          if "rollout/sampled_tokens" in r]
  return np.cumsum(np.asarray(vals, np.float64))


def select_arms(all_arms: Mapping[str, ConfigFn], names: str
                ) -> dict[str, ConfigFn]:
  """The arms named in the comma-separated `names` ("" = all), in order."""
  chosen = [n.strip() for n in names.split(",") if n.strip()]
  if not chosen:
    return dict(all_arms)
  unknown = [n for n in chosen if n not in all_arms]
  if unknown:
    raise ValueError(f"--arms names {unknown}, which this reproduction does "
                     f"not have; its arms are {list(all_arms)}.")
  return {n: all_arms[n] for n in chosen}


def define_flags(name: str, steps: int) -> None:
  """A reproduction's flags: --base, --out (default runs/repro/NAME),
  --seeds, --steps (default `steps`) and --arms (a comma-separated subset,
  default all). Called from a module's `__main__` block, so that importing
  a reproduction defines no flags (other modules, e.g. experiments.plot,
  own --out)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("base", DEFAULT_BASE,
                      "The base model (experiments.pretrain's DIR/hf); "
                      "default the committed one.")
  flags.DEFINE_string("out", f"runs/repro/{name}", "Output directory.")
  flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds.")
  flags.DEFINE_integer("steps", steps, "Training steps per arm.")
  flags.DEFINE_string("arms", "", "Comma-separated arms to run (default all).")


def family_flag(default: str = "chain") -> str:
  """Defines --family (the task family of `latr_grpo.setting`: chain or
  search) and returns its value from the command line, before `main`
  defines and parses the other flags (so `arms` can depend on it)."""
  import sys  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_enum("family", default, ("chain", "search"),
                    "The task family RL trains and is tested on.")
  flags.FLAGS(sys.argv, known_only=True)
  return flags.FLAGS.family


def seeds_flag() -> list[int]:
  from absl import flags  # pylint: disable=g-import-not-at-top
  return [int(s) for s in flags.FLAGS.seeds.split(",") if s.strip()]


def main(name: str, arms: ArmsFn, *, splits: Sequence[str], steps: int,
         metrics: Sequence[str] = ("accuracy",),
         curves: Mapping[str, CurveFn] | None = None) -> None:
  """A reproduction's command line (`define_flags`), then `run_arms` over
  `arms(--steps)` and the table printed."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  define_flags(name, steps)

  def run(argv):
    del argv
    f = flags.FLAGS
    table = run_arms(select_arms(arms(f.steps), f.arms), seeds=seeds_flag(),
                     base=f.base, out=f.out, splits=splits, metrics=metrics,
                     curves=curves)
    print(markdown(table))

  app.run(run)
