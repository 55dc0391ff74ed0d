"""Trains a policy: SFT warm-up then RL, as the config says.

  python -m experiments.train [--config=configs/default.py] [--workdir=DIR] \
      [--config.key=value ...]

Writes DIR/metrics.jsonl, DIR/tensorboard/, DIR/checkpoints/ and
DIR/summary.json. Re-running the same command on the same DIR resumes from
its last checkpoint. On several hosts, run the same command on every host
(rlax_llm/parallel/LAUNCHING.md).
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
_DEFAULT_CONFIG = os.path.join(os.path.dirname(_HERE), "configs", "default.py")
if os.path.dirname(_HERE) not in sys.path:
  sys.path.insert(0, os.path.dirname(_HERE))

if __name__ == "__main__":
  # Before the flags are defined: ml_collections parses overrides at that point.
  from rlax_llm.experiment import config_utils  # pylint: disable=g-import-not-at-top
  config_utils.exit_on_bad_overrides(sys.argv, _DEFAULT_CONFIG)

_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default",
                               "Directory for metrics, checkpoints, summary.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # keep library INFO logs quiet
  # Join the other processes of a multi-host run before anything touches
  # devices; a no-op for a single process.
  from rlax_llm.parallel import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(_CONFIG.value.get("distributed"),
                         _CONFIG.value.get("mesh"))
  from rlax_llm import experiment  # pylint: disable=g-import-not-at-top
  summary = experiment.run(_CONFIG.value, _WORKDIR.value)
  print(f"sft_accuracy={summary['sft_accuracy']:.4f} "
        f"final_accuracy={summary['final_accuracy']:.4f} "
        f"({summary['wall_time_s']:.0f}s) -> "
        f"{os.path.join(os.path.abspath(_WORKDIR.value), 'summary.json')}")


if __name__ == "__main__":
  app.run(main)
