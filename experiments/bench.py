"""Benchmarks: throughput of rlax_llm's compute paths on this machine.

  python -m experiments.bench generate [--json] [--sequences=16,256] \
      [--samples_per_prompt=8] [--new_tokens=128] [--repeats=3] [--preset=...]

What can be measured (the positional argument):
  generate   tokens/s of `rlax_llm.sampling.generate_jit` (prefill + KV-cache
             decode, G samples per prompt sharing one prefill) for the model
             of configs/default.py, sampling with the RL phase's sampler.

Each measurement compiles first (timed separately as `compile_s`), then times
`--repeats` calls with `jax.block_until_ready` and reports their median. Every
sequence decodes exactly `--new_tokens` tokens: the EOS id passed is one the
sampler cannot emit, so no sequence stops early and tokens/s counts
sequences * new_tokens / median seconds. With --json, stdout carries one JSON
object per measurement and nothing else; otherwise a table.

A default run (256 and 16 sequences x 128 tokens, tiny model) takes well under
two minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging

_HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(_HERE) not in sys.path:
  sys.path.insert(0, os.path.dirname(_HERE))

_JSON = flags.DEFINE_bool("json", False,
                          "Print one JSON object per measurement on stdout.")
_SEQUENCES = flags.DEFINE_list(
    "sequences", ["16", "256"],
    "Rollouts per call, N = prompts x samples_per_prompt; one measurement each.")
_SAMPLES = flags.DEFINE_integer(
    "samples_per_prompt", 8,
    "G, samples per prompt (capped at the number of sequences).", lower_bound=1)
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 128,
                                   "Tokens decoded per sequence.", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per measurement.",
                                lower_bound=1)
_PRESET = flags.DEFINE_string(
    "preset", None,
    "Model preset of rlax_llm.models.config.PRESETS to use instead of "
    "configs/default.py's model.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the parameters and samples.")

# An id outside the vocabulary: the sampler never emits it, so no sequence
# ends before max_new_tokens.
NO_EOS_ID = -1


def _device_info() -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  return {"device": dev.device_kind, "backend": dev.platform,
          "num_devices": jax.device_count(), "jax_version": jax.__version__}


def bench_generate(sequences: int, *, samples_per_prompt: int = 8,
                   new_tokens: int = 128, repeats: int = 3,
                   preset: str | None = None, seed: int = 0) -> dict[str, Any]:
  """Times `generate_jit` on `sequences` rollouts of `new_tokens` tokens.

  The prompts are the default task's (configs/default.py) training prompts,
  tokenised and padded as the experiment does; the parameters are a fresh
  initialisation (throughput does not depend on their values). The model's
  context is raised to prompt length + new_tokens where it is shorter.

  Args:
    sequences: N, rollouts per call; a multiple of the samples per prompt.
    samples_per_prompt: G (capped at N); prompts B = N / G.
    new_tokens: tokens decoded per rollout.
    repeats: timed calls; the median is reported.
    preset: a model preset name instead of configs/default.py's model.
    seed: seed of the parameters and the sampling keys.

  Returns:
    One measurement record (see the module docstring).
  """
  # pylint: disable=g-import-not-at-top
  import jax
  from configs import base as base_config
  from configs import default as default_config
  from rlax_llm.models.config import ModelConfig, PRESETS
  from rlax_llm.sampling.generate import generate_jit
  from rlax_llm.sampling.samplers import SamplerConfig
  from rlax_llm.training import state as state_lib
  from rlax_llm.training.experiment import ArithmeticSetup
  # pylint: enable=g-import-not-at-top

  if preset is not None and preset not in PRESETS:
    raise ValueError(f"Unknown model preset {preset!r}; known: "
                     f"{sorted(PRESETS)}.")
  g = min(samples_per_prompt, sequences)
  if sequences < 1 or sequences % g:
    raise ValueError(
        f"--sequences={sequences} is not a positive multiple of "
        f"--samples_per_prompt={g}; pick N = prompts x samples per prompt.")
  b = sequences // g

  config = default_config.get_config()
  setup = ArithmeticSetup(config.task, config.seed)
  tok = setup.tokenizer
  model_section = (base_config.model_config(preset) if preset
                   else config.model)
  fields = {k: v for k, v in model_section.items() if k != "preset"}
  fields["max_seq_len"] = max(fields["max_seq_len"],
                              setup.prompt_len + new_tokens)
  model_cfg = ModelConfig(vocab_size=tok.vocab_size, **fields)
  sampler = SamplerConfig(config.rl.temperature, config.rl.top_k,
                          config.rl.top_p, config.rl.min_p).validate()

  problems = setup.task.train_batch(0, b)
  prompt_BP, mask_BP = tok.encode_batch([q.prompt for q in problems],
                                        max_length=setup.prompt_len)
  graphdef = state_lib.model_graphdef(model_cfg)
  params = jax.device_put(state_lib.init_params(model_cfg, seed))
  prompt_BP, mask_BP = jax.device_put((prompt_BP, mask_BP))
  key = jax.random.key(seed)

  t0 = time.perf_counter()
  compiled = generate_jit.lower(
      graphdef, params, prompt_BP, mask_BP, key, num_samples=g,
      max_new_tokens=new_tokens, eos_id=NO_EOS_ID, pad_id=tok.pad_id,
      sampler=sampler).compile()
  compile_s = time.perf_counter() - t0
  # One untimed call: first-run allocations stay out of the timings.
  jax.block_until_ready(compiled(params, prompt_BP, mask_BP,
                                 jax.random.fold_in(key, repeats)))

  seconds = []
  for r in range(repeats):
    rng = jax.random.fold_in(key, r)
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(params, prompt_BP, mask_BP, rng))
    seconds.append(time.perf_counter() - t0)
  steps = int(out.steps)
  lengths = jax.device_get(out.lengths)
  if steps != new_tokens or (lengths != new_tokens).any():
    raise RuntimeError(
        f"generate decoded {steps} steps (lengths {lengths.min()}.."
        f"{lengths.max()}) instead of exactly {new_tokens}; the timing would "
        "not count the tokens it claims.")

  median = statistics.median(seconds)
  return {
      "bench": "generate",
      "batch": b,
      "samples_per_prompt": g,
      "sequences": sequences,
      "prompt_len": setup.prompt_len,
      "new_tokens": new_tokens,
      "tokens": sequences * new_tokens,
      "tokens_per_s": sequences * new_tokens / median,
      "seconds_median": median,
      "seconds_all": seconds,
      "compile_s": compile_s,
      "repeats": repeats,
      "model": preset or config.model.preset,
      "params": model_cfg.num_params,
      "sampler": sampler._asdict(),
      **_device_info(),
  }


BENCHES: dict[str, Callable[..., dict[str, Any]]] = {
    "generate": bench_generate,
}


def _table(records: list[dict[str, Any]]) -> str:
  head = ("bench", "B x G", "N", "new tok", "median s", "tokens/s",
          "compile s")
  rows = [head] + [
      (r["bench"], f"{r['batch']} x {r['samples_per_prompt']}",
       str(r["sequences"]), str(r["new_tokens"]),
       f"{r['seconds_median']:.4f}", f"{r['tokens_per_s']:,.0f}",
       f"{r['compile_s']:.2f}") for r in records]
  widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
  lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  if records:
    r = records[0]
    lines.append(f"model {r['model']} ({r['params']:,} params) on "
                 f"{r['num_devices']} x {r['device']} ({r['backend']}), "
                 f"jax {r['jax_version']}")
  return "\n".join(lines)


def main(argv):
  logging.set_verbosity(logging.WARNING)  # stdout/stderr stay readable
  whats = argv[1:]
  if not whats:
    raise app.UsageError(
        f"Say what to benchmark: python -m experiments.bench WHAT [--json]; "
        f"WHAT is one of {sorted(BENCHES)}.")
  unknown = [w for w in whats if w not in BENCHES]
  if unknown:
    raise app.UsageError(f"Unknown benchmark {unknown}; choose from "
                         f"{sorted(BENCHES)}.")
  try:
    sizes = [int(s) for s in _SEQUENCES.value]
  except ValueError:
    raise app.UsageError(f"--sequences must be integers, got "
                         f"{_SEQUENCES.value}.") from None
  records = []
  for what in whats:
    for n in sizes:
      try:
        rec = BENCHES[what](n, samples_per_prompt=_SAMPLES.value,
                            new_tokens=_NEW_TOKENS.value,
                            repeats=_REPEATS.value, preset=_PRESET.value,
                            seed=_SEED.value)
      except ValueError as e:
        raise app.UsageError(str(e)) from None
      records.append(rec)
      if _JSON.value:
        print(json.dumps(rec), flush=True)
  if not _JSON.value:
    print(_table(records))


if __name__ == "__main__":
  app.run(main)
