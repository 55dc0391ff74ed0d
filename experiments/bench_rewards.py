"""Benchmark: verifications per second of the GSM8K and MATH verifiers.

  python -m experiments.bench_rewards [--workers=2] [--limit=0]

Completions are the reference solutions of the GSM8K test split (1,319) and
of MATH-500 (500) from ../shared/data, verified against their own answers,
so every verdict should be 1.0 (``accuracy`` in each record checks it).
MATH reference solutions mostly match their answers by the normalised
spelling; ``math_symbolic`` instead boxes ``2(a) - (a)`` for each answer
``a`` that parses to an expression, so every item goes through the parser
and the sympy comparison.

Each workload is measured two ways: ``in_process`` (a plain loop over
``rlax_llm.rewards.math.verify``) and ``runner`` (``RewardRunner`` with
``--workers`` forkserver workers, one ``score`` call per workload; the
pool's start-up is reported once as ``startup_s`` and not counted).
stdout carries one JSON object per measurement.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
import functools
import json
import os
import sys
import time
from typing import Any

import sympy

_HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(_HERE) not in sys.path:
  sys.path.insert(0, os.path.dirname(_HERE))

# pylint: disable=g-import-not-at-top
from rlax_llm.rewards import latex
from rlax_llm.rewards import math as math_rewards
from rlax_llm.rewards import runner as runner_lib
# pylint: enable=g-import-not-at-top

DATA_DIR = os.path.join(os.path.dirname(_HERE), "..", "shared", "data")
DEFAULTS = {"workers": 2, "limit": 0, "timeout_s": 10.0, "data_dir": DATA_DIR}


def _read(path: str) -> list[dict[str, Any]]:
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} is missing; the rewards benchmark reads GSM8K and MATH-500 "
        "from ../shared/data beside the repository (or pass data_dir).")
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def workloads(data_dir: str, limit: int = 0
              ) -> dict[str, tuple[str, list[str], list[str]]]:
  """name -> (style, completions, answers) built from the shared data."""
  gsm8k = _read(os.path.join(data_dir, "gsm8k", "test.jsonl"))
  math500 = _read(os.path.join(data_dir, "math500", "test.jsonl"))
  symbolic = []
  for row in math500:
    answer = row["answer"]
    normalised = math_rewards.normalize(answer)
    try:
      value = latex.parse(normalised)
    except latex.ParseError:
      continue
    if "," in answer or not isinstance(value, sympy.Expr) or (
        normalised.replace(" ", "").isalpha() and len(normalised) > 1):
      continue  # Lists, containers and word answers.
    symbolic.append(
        (f"\\boxed{{2\\left({answer}\\right)-\\left({answer}\\right)}}",
         answer))
  out = {
      "gsm8k": ("gsm8k", [r["answer"] for r in gsm8k],
                [r["answer"].rsplit("####", 1)[1].strip() for r in gsm8k]),
      "math": ("math", [r["solution"] for r in math500],
               [r["answer"] for r in math500]),
      "math_symbolic": ("math", [c for c, _ in symbolic],
                        [a for _, a in symbolic]),
  }
  if limit:
    out = {k: (s, c[:limit], a[:limit]) for k, (s, c, a) in out.items()}
  return out


def run(args: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
  """Runs every measurement.

  Args:
    args: Overrides of ``DEFAULTS``: ``workers`` (runner processes),
      ``limit`` (items per workload, 0 for all), ``timeout_s`` (per item),
      ``data_dir``.

  Returns:
    One record per (workload, mode) with ``verifications_per_s``.
  """
  options = dict(DEFAULTS)
  unknown = set(args or {}) - set(DEFAULTS)
  if unknown:
    raise ValueError(f"unknown rewards benchmark options {sorted(unknown)}; "
                     f"known: {sorted(DEFAULTS)}.")
  options.update(args or {})
  loads = workloads(options["data_dir"], options["limit"])
  records = []

  def record(name, mode, seconds, rewards, **extra):
    style = loads[name][0]
    n = len(rewards)
    records.append({
        "bench": "rewards", "workload": name, "style": style, "mode": mode,
        "items": n, "seconds": seconds,
        "verifications_per_s": n / seconds if seconds > 0 else float("inf"),
        "accuracy": float(sum(rewards)) / max(n, 1), **extra})

  for name, (style, completions, answers) in loads.items():
    start = time.perf_counter()
    rewards = [math_rewards.verify(c, a, style=style)
               for c, a in zip(completions, answers)]
    record(name, "in_process", time.perf_counter() - start, rewards)

  for style in math_rewards.STYLES:
    start = time.perf_counter()
    with runner_lib.RewardRunner(
        functools.partial(math_rewards.verify, style=style),
        num_workers=options["workers"], timeout_s=options["timeout_s"]
    ) as pool:
      startup = time.perf_counter() - start
      for name, (item_style, completions, answers) in loads.items():
        if item_style != style:
          continue
        start = time.perf_counter()
        result = pool.score(completions, [{"answer": a} for a in answers])
        record(name, "runner", time.perf_counter() - start,
               result.rewards.tolist(), workers=options["workers"],
               startup_s=startup, errors=result.errors,
               timeouts=result.timeouts)
  return records


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workers", type=int, default=DEFAULTS["workers"])
  parser.add_argument("--limit", type=int, default=DEFAULTS["limit"])
  parser.add_argument("--timeout_s", type=float,
                      default=DEFAULTS["timeout_s"])
  parser.add_argument("--data_dir", default=DEFAULTS["data_dir"])
  options = vars(parser.parse_args(argv))
  for rec in run(options):
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
  main()
