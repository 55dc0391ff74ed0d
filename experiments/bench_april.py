"""Benchmark: APRIL partial rollouts vs synchronous generation, long-tailed lengths.

  python -m experiments.bench_april [--steps=24] [--prompts=8] [--samples=4] \
      [--max_new_tokens=128] [--over_provision=2.0] [--median_length=12] \
      [--sigma=1.2] [--repeats=3] [--keep_surplus]

Both modes decode with the same compiled kernel (`generate_partial` over the
tiny Transformer of configs/default.py, with EOS forced at each row's drawn
length so the stopping times follow the chosen distribution while the model
does real work):
  sync   B fresh groups per step, decoded until every row has ended (the step
         waits for its longest row);
  april  ceil(over_provision * B) groups decoded per step, stopped once B have
         finished; unfinished rows are continued first at the next step;
         groups that finished beyond B are dropped, as in the engine's
         default (with --keep_surplus they are carried and used first).
Row lengths are log-normal (median `median_length`, log-std `sigma`), rows
longer than T are truncated at T. Carried rows are re-prefilled packed into
lanes (`april.transformer_continuation(lanes=...)`). Each mode runs its
schedule once untimed, which compiles every shape it meets, then `--repeats`
timed passes of the same seeded schedule, alternating between the modes: one
step that fills the buffer, then `--steps` timed steps; a step yields B * G
finished rollouts in both modes. Prints one JSON object per mode (its median
pass; `seconds_all` lists every pass) and one with the ratio of finished
rollouts per second (april / sync).
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(_HERE) not in sys.path:
  sys.path.insert(0, os.path.dirname(_HERE))

from absl import flags
import flax.nnx as nnx
import jax
import numpy as np

from configs import default
from rlax_llm.methods import april
from rlax_llm.models.config import ModelConfig
from rlax_llm.models.transformer import Transformer
from rlax_llm.sampling import partial as partial_lib

# Own flag registry: importing this module next to other launchers (tests,
# notebooks) defines no global flags.
_FLAGS = flags.FlagValues()
_STEPS = flags.DEFINE_integer("steps", 24, "Timed steps per mode.",
                              lower_bound=1, flag_values=_FLAGS)
_PROMPTS = flags.DEFINE_integer("prompts", 8, "B, groups trained per step.",
                                lower_bound=1, flag_values=_FLAGS)
_SAMPLES = flags.DEFINE_integer("samples", 4, "G, rollouts per prompt.",
                                lower_bound=1, flag_values=_FLAGS)
_T = flags.DEFINE_integer("max_new_tokens", 128, "T, the token budget.",
                          lower_bound=1, flag_values=_FLAGS)
_OVER = flags.DEFINE_float("over_provision", 2.0,
                           "APRIL groups decoded / groups trained.", flag_values=_FLAGS)
_MEDIAN = flags.DEFINE_float("median_length", 12.0, "Median row length.", flag_values=_FLAGS)
_SIGMA = flags.DEFINE_float("sigma", 1.2, "Log-std of the row length.", flag_values=_FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of parameters and lengths.", flag_values=_FLAGS)
_KEEP = flags.DEFINE_bool("keep_surplus", False,
                          "Carry finished groups beyond B (default: drop).",
                          flag_values=_FLAGS)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed passes per mode (median).",
                                lower_bound=1, flag_values=_FLAGS)

VOCAB, EOS, PAD, PROMPT_LEN = 64, 1, 0, 8


def _lengths(uid: str, g: int, median: float, sigma: float, seed: int):
  rng = np.random.default_rng([seed] + [int(x) for x in uid.split("/")])
  return np.maximum(np.round(median * np.exp(sigma * rng.normal(size=g))),
                    1).astype(np.int32)


def run(args: dict[str, Any] | None = None) -> list[dict[str, Any]]:
  """Runs both modes; returns [sync record, april record, ratio record]."""
  a = dict(steps=24, prompts=8, samples=4, max_new_tokens=128,
           over_provision=2.0, median_length=12.0, sigma=1.2, seed=0,
           repeats=3, keep_surplus=False)
  a.update(args or {})
  b, g, t = a["prompts"], a["samples"], a["max_new_tokens"]
  if a["over_provision"] < 1:
    raise ValueError("over_provision must be >= 1, got "
                     f"{a['over_provision']}.")
  m = default.get_config().model
  fields = {k: v for k, v in m.items() if k != "preset"}
  fields["max_seq_len"] = max(fields["max_seq_len"], PROMPT_LEN + t)
  cfg = ModelConfig(vocab_size=VOCAB, **fields)
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(a["seed"])))

  @functools.partial(jax.jit, static_argnames=("prefill_len", "prefill_lanes"))
  def gen(params, state, target_len, target, version, rng, prefill_len,
          prefill_lanes):
    model = partial_lib.with_forced_lengths(
        april.transformer_continuation(graphdef, params, t,
                                       lanes=prefill_lanes), target_len, EOS)
    return partial_lib.generate_partial(model, state, rng,
                                        target_groups=target, version=version,
                                        eos_id=EOS, pad_id=PAD,
                                        prefill_len=prefill_len)

  def new_groups(step, n):
    rng = np.random.default_rng([a["seed"], step])
    return [partial_lib.Group.fresh(
        f"{step}/{i}", rng.integers(2, VOCAB, PROMPT_LEN),
        np.ones(PROMPT_LEN, bool), "", num_samples=g, max_new_tokens=t)
            for i in range(n)]

  def run_mode(mode, slots):
    """One pass of `steps` + 1 steps; returns (seconds of steps 1.., stats)."""
    buf = partial_lib.PartialBuffer(PAD)
    elapsed, rollouts, decode_steps, stale = 0.0, 0, 0, []
    for step in range(a["steps"] + 1):  # step 0 fills the buffer, untimed
      uids = []

      def fresh(n, step=step):
        groups = new_groups(step, n)
        uids[:] = [x.uid for x in buf.groups if not x.complete] + [
            x.uid for x in groups]
        return groups

      def generate(state, target, step=step):
        tl = np.stack([_lengths(u, g, a["median_length"], a["sigma"],
                                a["seed"]) for u in uids])
        out = gen(params, state, tl, target if mode == "april" else len(uids),
                  step, jax.random.key(step), **april.prefill_sizes(state, t))
        return jax.device_get(jax.block_until_ready(out))

      t0 = time.perf_counter()
      used, info = buf.advance(num_groups=b, num_slots=slots,
                               new_groups=fresh, generate=generate,
                               keep_surplus=a["keep_surplus"])
      dt = time.perf_counter() - t0
      if step == 0:
        continue
      elapsed += dt
      rollouts += sum(int(x.done.sum()) for x in used)
      decode_steps += info["decode_steps"]
      for x in used:
        v = x.version[x.version >= 0]
        stale.extend((step - v).tolist())
    return elapsed, rollouts, decode_steps, stale

  slots = {"sync": b, "april": math.ceil(a["over_provision"] * b - 1e-9)}
  # The first pass of each mode compiles every shape the run meets (the
  # lengths are seeded, so later passes meet the same ones); then the timed
  # passes alternate between the modes, so a slow spell of the machine
  # weighs on both, and each mode keeps its median pass.
  for mode in ("sync", "april"):
    run_mode(mode, slots[mode])
  passes = {"sync": [], "april": []}
  for _ in range(a["repeats"]):
    for mode in ("sync", "april"):
      passes[mode].append(run_mode(mode, slots[mode]))
  records = []
  for mode in ("sync", "april"):
    seconds = [p[0] for p in passes[mode]]
    elapsed, rollouts, decode_steps, stale = sorted(passes[mode])[
        (len(seconds) - 1) // 2]
    records.append(dict(
        bench="april", mode=mode, prompts=b, samples=g, max_new_tokens=t,
        slots=slots[mode], steps=a["steps"],
        keep_surplus=bool(a["keep_surplus"]),
        median_length=a["median_length"], sigma=a["sigma"],
        seconds=elapsed, seconds_all=seconds, finished_rollouts=rollouts,
        rollouts_per_s=rollouts / elapsed,
        decode_steps_per_step=decode_steps / a["steps"],
        staleness_mean=float(np.mean(stale)) if stale else 0.0,
        device=jax.devices()[0].platform))
  records.append(dict(bench="april", mode="ratio",
                      speedup=records[1]["rollouts_per_s"]
                      / records[0]["rollouts_per_s"], target=1.2))
  return records


def main(argv):
  del argv
  for r in run(dict(steps=_STEPS.value, prompts=_PROMPTS.value,
                    samples=_SAMPLES.value, max_new_tokens=_T.value,
                    over_provision=_OVER.value,
                    median_length=_MEDIAN.value, sigma=_SIGMA.value,
                    seed=_SEED.value, repeats=_REPEATS.value,
                    keep_surplus=_KEEP.value)):
    print(json.dumps(r))


if __name__ == "__main__":
  main(_FLAGS(sys.argv))
