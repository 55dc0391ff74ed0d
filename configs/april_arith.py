"""APRIL partial rollouts on the default arithmetic experiment.

Run:
  python -m experiments.train --config=configs/april_arith.py \
      --workdir=/tmp/rlax_april
The default run (SFT warm-up, then 300 GRPO steps of 64 prompts x 16 samples)
with the "april" rollout engine: each step decodes 2 x 64 groups, stops once
64 have finished and carries the unfinished rows (token ids, log-probs and
the policy version of every token) to the next step, where they are continued
first. Arithmetic answers are at most a few tokens long, so here APRIL is a
correctness demonstration (rows carried across steps, staleness logged as
`rollout/staleness_*`); `python -m experiments.bench_april` measures its
throughput on a long-tailed length distribution.
"""

import ml_collections

from configs import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.rollout = ml_collections.ConfigDict(dict(
      name="april",
      over_provision=2.0,   # groups decoded per step / groups trained on
      is_correction=False,  # truncated IS of current vs behaviour log-probs
      is_cap=2.0,           # truncation of that importance weight
      staleness_bins=4,     # rollout/staleness_hist_0..3 (3 = 3 or more)
  ))
  return c
