"""Scores the latest checkpoint of a run on a held-out split.

  python -m experiments.evaluate --config=configs/default.py --workdir=DIR \
      [--split=test] [--config.key=value ...]

Pass the same config (and overrides) the run was trained with. Prints one
JSON object (greedy accuracy, pass@1 and pass@G by the unbiased estimator,
maj@G, the split and its problem count) and writes it to
DIR/eval_step<N>.json (the config's `eval.split`) or
DIR/eval_<split>_step<N>.json (another split), N being the checkpoint's step.
"""

import json
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
  from rlax_llm.experiment import config_utils  # pylint: disable=g-import-not-at-top
  config_utils.exit_on_bad_overrides(sys.argv, _DEFAULT_CONFIG)

_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default",
                               "The run directory holding checkpoints/.")
_SPLIT = flags.DEFINE_string(
    "split", None, "Split to score (default: the config's eval.split); "
    "e.g. 'test' or, for gsm8k, 'train'.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  # The same devices as training (e.g. distributed.host_devices on a CPU).
  from rlax_llm.parallel import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(_CONFIG.value.get("distributed"),
                         _CONFIG.value.get("mesh"))
  from rlax_llm import experiment  # pylint: disable=g-import-not-at-top
  try:
    result = experiment.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value,
                                            split=_SPLIT.value)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
