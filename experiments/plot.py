"""Plots the curves of a run from its metrics.jsonl.

  python -m experiments.plot DIR [--out=OUT_DIR] [--window=10]

Writes PNG files into OUT_DIR (default: DIR itself, next to metrics.jsonl):

  reward.png     training reward mean per RL step and its moving average.
  accuracy.png   held-out greedy accuracy and pass@k against the step, with a
                 vertical line where RL starts.
  sft_loss.png   the supervised warm-up's loss, when the run has SFT steps.
  rl_stats.png   policy entropy, approx. KL, clip fraction and completion
                 length per RL step, those the run logged.

Given a reproduction's output instead (`experiments/repro`: DIR/<arm>/
seed<k>/metrics.jsonl), it writes arms_accuracy.png and arms_stats.png, one
line per arm over its seeds (`plot_arms`; `--prefix=NAME_` prepends NAME_ to
both file names).

A figure whose metrics the run has not logged (yet) is skipped, so the command
also works on a run that is still in progress. Notebooks call `plot_run`.
"""

from __future__ import annotations

import math
import os
import re
import sys
from typing import Any, Sequence

from absl import app
from absl import flags
import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(_HERE) not in sys.path:
  sys.path.insert(0, os.path.dirname(_HERE))

# pylint: disable=g-import-not-at-top
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from rlax_llm.training.metrics import read_metrics
# pylint: enable=g-import-not-at-top

METRICS_FILE = "metrics.jsonl"
REWARD_KEY = "reward/mean"
ACCURACY_KEY = "eval/accuracy"
SFT_LOSS_KEY = "sft/loss"
# (metric key, panel title) of rl_stats.png, in panel order.
RL_STATS = (
    ("rl/entropy", "policy entropy (nats/token)"),
    ("rl/approx_kl", "approx. KL(old || new)"),
    ("rl/clip_frac", "clipped token fraction"),
    ("rollout/length", "completion length (tokens)"),
)
_PASS_AT = re.compile(r"^eval/pass@(\d+)$")


def load_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of `workdir/metrics.jsonl` (a torn last line is dropped).

  Raises:
    FileNotFoundError: the file does not exist, with the command that makes it.
    ValueError: the file holds no complete record.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"No {METRICS_FILE} at {path}. Pass the --workdir of a run of "
        "experiments.train, or train one there first: "
        f"`python -m experiments.train --workdir={workdir}`.")
  records = read_metrics(path)
  if not records:
    raise ValueError(
        f"{path} holds no complete record yet; wait for the run to log its "
        "first step, then plot again.")
  return records


def series(records: Sequence[dict[str, Any]], key: str
           ) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of every record that has `key`, in file order.

  Non-finite values, which the metric writer stores as strings ("nan",
  "inf"), come back as floats.
  """
  steps, values = [], []
  for r in records:
    if key in r and "step" in r:
      v = r[key]
      if isinstance(v, bool) or v is None:
        continue
      try:
        values.append(float(v))
      except (TypeError, ValueError):
        continue
      steps.append(int(r["step"]))
  return np.asarray(steps, np.int64), np.asarray(values, np.float64)


def moving_average(x: Sequence[float], window: int) -> np.ndarray:
  """Trailing mean: out[i] = mean(x[max(0, i - window + 1) : i + 1]).

  The first `window - 1` points average over the values seen so far, so the
  curve starts at x[0] and has the length of `x`.
  """
  x = np.asarray(x, np.float64)
  if window < 1:
    raise ValueError(f"window must be >= 1, got {window}.")
  if x.size == 0:
    return x
  csum = np.concatenate([[0.0], np.cumsum(x)])
  i = np.arange(1, x.size + 1)
  lo = np.maximum(i - window, 0)
  return (csum[i] - csum[lo]) / (i - lo)


def rl_start_step(records: Sequence[dict[str, Any]]) -> int | None:
  """The first step with a training reward (the first RL step), or None."""
  steps, _ = series(records, REWARD_KEY)
  return int(steps.min()) if steps.size else None


def pass_at_keys(records: Sequence[dict[str, Any]]) -> list[str]:
  """The `eval/pass@k` keys the run logged, by increasing k."""
  ks = {int(m.group(1)) for r in records for key in r
        if (m := _PASS_AT.match(key))}
  return [f"eval/pass@{k}" for k in sorted(ks)]


def _new_figure(nrows: int = 1, ncols: int = 1, size=(7.0, 4.0)):
  fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), dpi=100)
  FigureCanvasAgg(fig)  # renders with Agg, whatever pyplot's backend is
  axes = fig.subplots(nrows, ncols, squeeze=False).reshape(-1)
  for ax in axes:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps
  return fig, axes


def _save(fig: Figure, out_dir: str, name: str) -> str:
  fig.tight_layout()
  path = os.path.join(out_dir, name)
  fig.savefig(path, format="png")
  return path


def _mark_rl_start(ax, rl_start: int | None):
  if rl_start is not None:
    ax.axvline(rl_start, color="gray", linestyle="--", linewidth=1,
               label=f"RL starts (step {rl_start})")


def plot_reward(records, out_dir: str, *, window: int = 10,
                title: str = "") -> str | None:
  """reward.png: reward mean per RL step and its moving average."""
  steps, reward = series(records, REWARD_KEY)
  if not steps.size:
    return None
  fig, (ax,) = _new_figure()
  ax.plot(steps, reward, color="tab:blue", alpha=0.35, linewidth=1,
          marker="." if steps.size < 50 else None, label="reward mean")
  ax.plot(steps, moving_average(reward, window), color="tab:blue",
          linewidth=2, label=f"moving average ({window} steps)")
  ax.set_xlabel("step")
  ax.set_ylabel("reward")
  ax.set_title(f"Training reward {title}".strip())
  ax.grid(alpha=0.3)
  ax.legend(loc="best")
  return _save(fig, out_dir, "reward.png")


def plot_accuracy(records, out_dir: str, *, title: str = "") -> str | None:
  """accuracy.png: eval accuracy and pass@k against the step."""
  keys = [ACCURACY_KEY] + pass_at_keys(records)
  curves = [(k, *series(records, k)) for k in keys]
  curves = [c for c in curves if c[1].size]
  if not curves:
    return None
  fig, (ax,) = _new_figure()
  for key, steps, values in curves:
    label = ("greedy accuracy" if key == ACCURACY_KEY
             else key.removeprefix("eval/"))
    ax.plot(steps, values, marker="o", markersize=4, label=label)
  _mark_rl_start(ax, rl_start_step(records))
  ax.set_xlabel("step")
  ax.set_ylabel("held-out fraction solved")
  ax.set_ylim(-0.02, 1.02)
  ax.set_title(f"Evaluation {title}".strip())
  ax.grid(alpha=0.3)
  ax.legend(loc="best")
  return _save(fig, out_dir, "accuracy.png")


def plot_sft_loss(records, out_dir: str, *, title: str = "") -> str | None:
  """sft_loss.png: the supervised warm-up's loss per step."""
  steps, loss = series(records, SFT_LOSS_KEY)
  if not steps.size:
    return None
  fig, (ax,) = _new_figure()
  ax.plot(steps, loss, color="tab:orange", linewidth=1.5)
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  if np.all(loss[np.isfinite(loss)] > 0):
    ax.set_yscale("log")
  ax.set_title(f"SFT loss {title}".strip())
  ax.grid(alpha=0.3, which="both")
  return _save(fig, out_dir, "sft_loss.png")


def plot_rl_stats(records, out_dir: str, *, window: int = 10,
                  title: str = "") -> str | None:
  """rl_stats.png: one panel per RL statistic the run logged."""
  panels = [(key, label, *series(records, key)) for key, label in RL_STATS]
  panels = [p for p in panels if p[2].size]
  if not panels:
    return None
  ncols = 2 if len(panels) > 1 else 1
  nrows = math.ceil(len(panels) / ncols)
  fig, axes = _new_figure(nrows, ncols, size=(5.5, 3.5))
  for ax, (key, label, steps, values) in zip(axes, panels):
    ax.plot(steps, values, alpha=0.35, linewidth=1, color="tab:green")
    ax.plot(steps, moving_average(values, window), linewidth=2,
            color="tab:green")
    ax.set_title(f"{label}\n[{key}]", fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  for ax in axes[len(panels):]:
    ax.set_visible(False)
  if title:
    fig.suptitle(f"RL statistics {title}")
  return _save(fig, out_dir, "rl_stats.png")


def plot_run(workdir: str, out_dir: str | None = None, *,
             window: int = 10) -> list[str]:
  """Writes the PNG curves of the run in `workdir`.

  Args:
    workdir: a run directory holding metrics.jsonl.
    out_dir: where the PNGs go (created if needed); default `workdir`.
    window: steps in the moving averages.

  Returns:
    The paths written, in the order reward, accuracy, sft_loss, rl_stats
    (figures without data are skipped).

  Raises:
    FileNotFoundError: `workdir` has no metrics.jsonl.
    ValueError: metrics.jsonl holds no complete record.
  """
  records = load_metrics(workdir)
  out_dir = out_dir or workdir
  os.makedirs(out_dir, exist_ok=True)
  title = f"({os.path.basename(os.path.normpath(workdir))})"
  written = [
      plot_reward(records, out_dir, window=window, title=title),
      plot_accuracy(records, out_dir, title=title),
      plot_sft_loss(records, out_dir, title=title),
      plot_rl_stats(records, out_dir, window=window, title=title),
  ]
  return [p for p in written if p is not None]


# (metric key, panel title) of arms_stats.png, in panel order.
ARM_STATS = (
    (REWARD_KEY, "training reward"),
    ("rl/entropy", "policy entropy (nats/token)"),
    ("rollout/length_wrong", "length of wrong rollouts (tokens)"),
    ("rollout/distinct_per_group", "distinct completions per group"),
)
TOKENS_KEY = "rollout/sampled_tokens"
STEP_TIME_KEY = "time/step_s"


def arm_runs(repro_dir: str) -> dict[str, list[list[dict[str, Any]]]]:
  """{arm: [records of each seed]} of a reproduction's output directory
  (`experiments/repro`: OUT/<arm>/seed<k>/metrics.jsonl), arms in name
  order, seeds in number order; arms without a logged run are left out."""
  arms = {}
  if not os.path.isdir(repro_dir):
    return arms
  for arm in sorted(os.listdir(repro_dir)):
    adir = os.path.join(repro_dir, arm)
    if not os.path.isdir(adir):
      continue
    seeds = sorted((d for d in os.listdir(adir) if re.fullmatch(r"seed\d+", d)
                    and os.path.isfile(os.path.join(adir, d, METRICS_FILE))),
                   key=lambda d: int(d[4:]))
    runs = [read_metrics(os.path.join(adir, d, METRICS_FILE)) for d in seeds]
    runs = [r for r in runs if r]
    if runs:
      arms[arm] = runs
  return arms


def eval_curve(records: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
  """A run's evaluations with the cost spent before each: {"step",
  "accuracy", "tokens" (cumulative `rollout/sampled_tokens` of the steps
  up to it), "wall_s" (cumulative training `time/step_s`, evaluations
  excluded)}."""
  steps, acc = series(records, ACCURACY_KEY)
  t_steps, tokens = series(records, TOKENS_KEY)
  w_steps, wall = series(records, STEP_TIME_KEY)

  def upto(xs, vals):
    return np.asarray([vals[xs <= s].sum() for s in steps], np.float64)
  return {"step": steps, "accuracy": acc, "tokens": upto(t_steps, tokens),
          "wall_s": upto(w_steps, wall)}


def _mean_band(curves: Sequence[dict[str, np.ndarray]], x: str):
  """Mean x, mean/min/max accuracy over seeds at the evaluations that every
  seed has (the shortest run's)."""
  n = min(c["step"].size for c in curves)
  xs = np.mean([c[x][:n] for c in curves], axis=0)
  ys = np.asarray([c["accuracy"][:n] for c in curves])
  return xs, ys.mean(0), ys.min(0), ys.max(0)


def plot_arms(repro_dir: str, out_dir: str | None = None, *,
              window: int = 10, prefix: str = "") -> list[str]:
  """Writes a reproduction's comparison curves (one line per arm):

  arms_accuracy.png  greedy test accuracy (mean over seeds, band min-max)
                     against the RL step, the rollout tokens sampled and
                     the training wall time.
  arms_stats.png     per-step training statistics (moving average of the
                     mean over seeds) that the runs logged: reward,
                     entropy, length of wrong rollouts, distinct
                     completions per group.

  Raises:
    FileNotFoundError: no OUT/<arm>/seed<k>/metrics.jsonl under `repro_dir`.
  """
  arms = arm_runs(repro_dir)
  if not arms:
    raise FileNotFoundError(
        f"No runs under {repro_dir}: a reproduction's output holds "
        "<arm>/seed<k>/metrics.jsonl; run one first, e.g. "
        f"`python -m experiments.repro.latr_grpo --out={repro_dir}`.")
  out_dir = out_dir or repro_dir
  os.makedirs(out_dir, exist_ok=True)
  title = f"({os.path.basename(os.path.normpath(repro_dir))})"
  written = []
  curves = {a: [eval_curve(r) for r in runs] for a, runs in arms.items()}
  curves = {a: c for a, c in curves.items()
            if all(x["step"].size for x in c)}
  if curves:
    axes_x = [("step", "RL step"), ("tokens", "rollout tokens sampled"),
              ("wall_s", "training wall time (s)")]
    fig, axes = _new_figure(1, 3, size=(5.0, 3.8))
    for ax, (x, label) in zip(axes, axes_x):
      for arm, c in curves.items():
        xs, mean, lo, hi = _mean_band(c, x)
        (line,) = ax.plot(xs, mean, marker="o", markersize=3, label=arm)
        if len(c) > 1:
          ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
      ax.set_xlabel(label)
      ax.grid(alpha=0.3)
      ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
    axes[0].set_ylabel("test greedy accuracy")
    axes[0].legend(loc="best", fontsize=8)
    fig.suptitle(f"Accuracy by arm, mean and range over seeds {title}")
    written.append(_save(fig, out_dir, prefix + "arms_accuracy.png"))
  panels = [(k, label) for k, label in ARM_STATS
            if any(series(r, k)[0].size for runs in arms.values()
                   for r in runs)]
  if panels:
    ncols = 2 if len(panels) > 1 else 1
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = _new_figure(nrows, ncols, size=(5.5, 3.5))
    for ax, (key, label) in zip(axes, panels):
      for arm, runs in arms.items():
        per_seed = [series(r, key) for r in runs]
        per_seed = [p for p in per_seed if p[0].size]
        if not per_seed:
          continue
        n = min(p[0].size for p in per_seed)
        mean = np.mean([p[1][:n] for p in per_seed], axis=0)
        ax.plot(per_seed[0][0][:n], moving_average(mean, window),
                linewidth=1.5, label=arm)
      ax.set_title(f"{label}\n[{key}]", fontsize=10)
      ax.set_xlabel("RL step")
      ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize=8)
    for ax in axes[len(panels):]:
      ax.set_visible(False)
    fig.suptitle(f"Training statistics by arm {title}")
    written.append(_save(fig, out_dir, prefix + "arms_stats.png"))
  return written


_OUT = flags.DEFINE_string("out", None,
                           "Directory for the PNGs (default: the run's DIR).")
_WINDOW = flags.DEFINE_integer("window", 10,
                               "Steps in the moving averages.", lower_bound=1)
_PREFIX = flags.DEFINE_string(
    "prefix", "", "A reproduction's PNG names start with this (e.g. "
    "--prefix=grpo_variants_ writes grpo_variants_arms_accuracy.png), so "
    "several reproductions can share one --out directory.")


def main(argv):
  if len(argv) != 2:
    raise app.UsageError(
        "Pass exactly one run directory: python -m experiments.plot DIR "
        f"[--out=OUT_DIR]; got {argv[1:] or 'none'}.")
  path = argv[1]
  is_repro = (not os.path.isfile(os.path.join(path, METRICS_FILE))
              and os.path.isdir(path) and bool(arm_runs(path)))
  if _PREFIX.value and not is_repro:
    raise app.UsageError(
        f"--prefix names a reproduction's PNGs; {path} is a single run "
        "(its PNGs are reward.png, accuracy.png, ...): drop --prefix or pass "
        "a reproduction's output directory.")
  try:
    if is_repro:  # a reproduction's output: one folder per arm
      paths = plot_arms(path, _OUT.value, window=_WINDOW.value,
                        prefix=_PREFIX.value)
    else:
      paths = plot_run(path, _OUT.value, window=_WINDOW.value)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  if not paths:
    print(f"No curves to plot yet in {argv[1]}.")
  for p in paths:
    print(p)


if __name__ == "__main__":
  app.run(main)
