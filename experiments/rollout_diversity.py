"""Distinct completions per group: plain sampling against LATR, on a trained policy.

  python -m experiments.rollout_diversity --config=configs/default.py \
      --workdir=DIR [--prompts=64] [--num_samples=16] [--eta=0.5] \
      [--latr_config=configs/latr_arith.py] [--tree=tau_abs=0.2,windows=3] \
      [--rounds=2] [--config.key=value ...]

Loads the latest checkpoint of a run (pass the config it was trained with),
draws `--prompts` training prompts per round and, for each, G rollouts
twice from the same prefill and key: all G as plain samples (the config's
sampler), and with the first S = round(G * eta) rows from the LATR tree
(`rlax_llm.sampling.latr`, with the `config.rollout` fields of
`--latr_config`, each overridable by `--tree=field=value,...`; values are
Python literals, e.g. `windows=(2,3)`). With `keep_math_symbols` the exempt
token table is built from the run's tokenizer, as the engine does. Prints one JSON object per mode with the mean number
of distinct completions per group, the mean normalised edit distance between
the rows of a group (`pairwise_ned`), the mean reward and pass rate (groups with
at least one correct row), the mean completion length and, for LATR, the
branches opened and pruned per prompt and the distinct completions among the
tree rows.
"""

from __future__ import annotations

import json
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_DEFAULT_CONFIG = os.path.join(os.path.dirname(_HERE), "configs", "default.py")
if os.path.dirname(_HERE) not in sys.path:
  sys.path.insert(0, os.path.dirname(_HERE))

if __name__ == "__main__":
  from rlax_llm.experiment import config_utils  # pylint: disable=g-import-not-at-top
  config_utils.exit_on_bad_overrides(sys.argv, _DEFAULT_CONFIG)

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags
import numpy as np

_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default",
                               "The run directory holding checkpoints/.")
_PROMPTS = flags.DEFINE_integer("prompts", 64, "Prompts per round.",
                                lower_bound=1)
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Rounds of prompts.",
                               lower_bound=1)
_G = flags.DEFINE_integer("num_samples", 16, "G, rows per prompt.",
                          lower_bound=1)
_ETA = flags.DEFINE_float("eta", 0.5, "Share of a group from the tree.")
_LATR_CONFIG = flags.DEFINE_string(
    "latr_config", os.path.join(os.path.dirname(_HERE), "configs",
                                "latr_arith.py"),
    "Config file whose `rollout` section gives the LATR tree.")
_TREE = flags.DEFINE_list("tree", [], "Tree field overrides, field=value.")


def tree_from_flags(latr_config: str, overrides) -> "latr_lib.TreeConfig":
  """The TreeConfig of `latr_config`'s rollout section with `overrides`."""
  import ast  # pylint: disable=g-import-not-at-top
  from rlax_llm.experiment import config_utils  # pylint: disable=g-import-not-at-top
  from rlax_llm.sampling import latr as latr_lib  # pylint: disable=g-import-not-at-top
  fields = {k: v for k, v in dict(config_utils.load_config_file(
      latr_config).rollout).items() if k != "name"}
  joined = ",".join(overrides)
  for item in _split_fields(joined):
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"--tree entry {item!r} is not field=value.")
    try:
      fields[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError) as e:
      raise ValueError(f"--tree {key}={value!r} is not a Python literal "
                       "(numbers, True/False, None, tuples).") from e
  return latr_lib.tree_config_from_fields(fields)


def _split_fields(text: str) -> list[str]:
  """Splits on commas outside brackets ("windows=(2,3),tau_ed=0.4")."""
  out, depth, cur = [], 0, ""
  for ch in text:
    depth += ch in "([{"
    depth -= ch in ")]}"
    if ch == "," and depth == 0:
      out.append(cur)
      cur = ""
    else:
      cur += ch
  if cur.strip():
    out.append(cur)
  return [x for x in out if x.strip()]


def measure(exp, params, tree, *, prompts: int, rounds: int, g: int,
            eta: float) -> list[dict]:
  """Both modes' records over `rounds` rounds of `prompts` training prompts."""
  import jax  # pylint: disable=g-import-not-at-top
  from rlax_llm.methods import rollouts  # pylint: disable=g-import-not-at-top
  from rlax_llm.sampling import latr as latr_lib  # pylint: disable=g-import-not-at-top

  from rlax_llm.methods import latr as latr_engine  # pylint: disable=g-import-not-at-top
  tok, t = exp.setup.tokenizer, exp.max_new_tokens
  s = latr_lib.tree_rows(g, eta)
  exempt_V = None
  if tree.keep_math_symbols:
    exempt_V = latr_lib.math_symbol_table(latr_engine.token_texts(
        tok, exp.model_cfg.vocab_size))
  acc = {mode: dict(distinct=[], ned=[], reward=[], solved=[], length=[],
                    opened=[], pruned=[], distinct_tree=[])
         for mode in ("sample", "latr")}
  for r in range(rounds):
    problems = exp.setup.task.train_batch(r, prompts)
    p, pm = tok.encode_batch([q.prompt for q in problems],
                             max_length=exp.prompt_len)
    answers = [q.answer for q in problems for _ in range(g)]
    key = jax.random.fold_in(exp.key, 1_000_003 + r)
    for mode, num_tree in (("sample", 0), ("latr", s)):
      ro = jax.device_get(latr_lib.latr_generate_jit(
          exp.graphdef, params, p, pm, key, num_samples=g, num_tree=num_tree,
          max_new_tokens=t, eos_id=tok.eos_id, pad_id=tok.pad_id,
          sampler=exp.sampler, tree=tree, exempt_V=exempt_V))
      texts = exp.decode(ro.tokens, ro.mask)
      reward, _ = exp.rewards(texts, answers)
      texts_bg = np.asarray(texts, dtype=object).reshape(prompts, g)
      a = acc[mode]
      a["distinct"].append(rollouts.distinct_completions(texts_bg))
      a["ned"].append(rollouts.pairwise_edit_distance(texts_bg))
      a["reward"].append(float(np.mean(reward)))
      a["solved"].append(float(np.mean(reward.reshape(prompts, g).max(1) > 0)))
      a["length"].append(float(np.mean(ro.lengths)))
      a["opened"].append(float(np.mean(ro.opened)))
      a["pruned"].append(float(np.mean(ro.pruned)))
      a["distinct_tree"].append(rollouts.distinct_completions(texts_bg[:, :s])
                                if num_tree else 0.0)
  out = []
  for mode, a in acc.items():
    rec = dict(mode=mode, prompts=prompts * rounds, num_samples=g,
               tree_rows=s if mode == "latr" else 0,
               distinct_per_group=float(np.mean(a["distinct"])),
               pairwise_ned=float(np.mean(a["ned"])),
               reward=float(np.mean(a["reward"])),
               solved_groups=float(np.mean(a["solved"])),
               mean_length=float(np.mean(a["length"])))
    if mode == "latr":
      rec.update(branches_opened=float(np.mean(a["opened"])),
                 branches_pruned=float(np.mean(a["pruned"])),
                 distinct_tree=float(np.mean(a["distinct_tree"])),
                 tree=dict(tree._asdict()))
    out.append(rec)
  return out


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from rlax_llm.parallel import distributed  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  distributed.initialize(config.get("distributed"), config.get("mesh"))
  from rlax_llm import experiment  # pylint: disable=g-import-not-at-top
  try:
    tree = tree_from_flags(_LATR_CONFIG.value, _TREE.value)
    if not 0.0 <= _ETA.value <= 1.0:
      raise ValueError(f"--eta must be in [0, 1], got {_ETA.value}.")
    exp = experiment.trained_experiment(config, _WORKDIR.value)
    try:
      step, params = experiment.restore_policy(exp)
      records = measure(exp, params, tree, prompts=_PROMPTS.value,
                        rounds=_ROUNDS.value, g=_G.value, eta=_ETA.value)
    finally:
      exp.close()
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  for rec in records:
    print(json.dumps(dict(bench="rollout_diversity", step=step, **rec)))


if __name__ == "__main__":
  app.run(main)
