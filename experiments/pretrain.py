"""Pretrains a base model on the reasoning corpus and writes it in HF format.

  python -m experiments.pretrain --config=configs/pretrain_reasoning.py \
      --workdir=runs/base_reasoning [--config.key=value ...]

Runs the config's supervised phase (cross-entropy on the corpus; `rl.steps`
must be 0), resumable like any run (re-run the same command), then writes

  DIR/hf/            config.json, model.safetensors, tokenizer.json,
                     tokenizer_config.json, generation_config.json: load it
                     with `--config.model.hf_path=DIR/hf`
  DIR/corpus.json    completion lengths (tokens, EOS included) per family:
                     histogram, mean, median, p95, max
  DIR/base_eval.json greedy accuracy of the written model on every split
                     (problems: config.eval.num_problems each)

and prints base_eval.json.
"""

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
_DEFAULT_CONFIG = os.path.join(os.path.dirname(_HERE), "configs",
                               "pretrain_reasoning.py")
if os.path.dirname(_HERE) not in sys.path:
  sys.path.insert(0, os.path.dirname(_HERE))

if __name__ == "__main__":
  from rlax_llm.experiment import config_utils  # pylint: disable=g-import-not-at-top
  config_utils.exit_on_bad_overrides(sys.argv, _DEFAULT_CONFIG)

def pretrain(config, workdir: str) -> dict:
  """Trains (or resumes), exports to workdir/hf, evaluates every split."""
  from rlax_llm import experiment  # pylint: disable=g-import-not-at-top
  if config.rl.steps:
    raise ValueError(f"experiments.pretrain trains the supervised phase only; "
                     f"set --config.rl.steps=0 (now {config.rl.steps}).")
  if config.task.name != "reasoning":
    raise ValueError("experiments.pretrain writes the reasoning corpus' "
                     f"statistics; config.task.name={config.task.name!r} "
                     "should be 'reasoning'.")
  summary = experiment.run(config, workdir)
  experiment.export_checkpoint(config, workdir,
                               os.path.join(os.path.abspath(workdir), "hf"))
  exp = experiment.trained_experiment(config, workdir)
  try:
    step, params = experiment.restore_policy(exp)
    corpus = exp.setup.task.length_histogram(exp.setup.tokenizer)
    with open(os.path.join(workdir, "corpus.json"), "w") as f:
      json.dump(corpus, f, indent=1)
    evals = {"step": int(step), "wall_time_s": summary["wall_time_s"]}
    for split in exp.setup.task.SPLITS:
      exp.set_eval_split(split)
      res = exp.evaluate(params, step)
      evals[split] = float(res["accuracy"])
    with open(os.path.join(workdir, "base_eval.json"), "w") as f:
      json.dump(evals, f, indent=1, sort_keys=True)
  finally:
    exp.close()
  return evals


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  evals = pretrain(flags.FLAGS.config, flags.FLAGS.workdir)
  print(json.dumps(evals, sort_keys=True))


if __name__ == "__main__":
  # Defined here, not at import: experiments.train / rollout_diversity own
  # --config when a process imports several launchers (the test suite).
  config_flags.DEFINE_config_file(
      "config", _DEFAULT_CONFIG, "Pretraining config file.", lock_config=True)
  flags.DEFINE_string("workdir", "runs/base_reasoning",
                      "Directory for the run and the HF export.")
  app.run(main)
