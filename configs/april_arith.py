"""APRIL partial rollouts on the default arithmetic experiment.

Run:
  python -m experiments.train --config=configs/april_arith.py \
      --workdir=/tmp/rlax_april
The default run (SFT warm-up, then 300 GRPO steps of 64 prompts x 16 samples)
with the "april" rollout engine: each step decodes 2 x 64 groups, stops once
64 have finished and carries the unfinished rows (token ids, log-probs and
the policy version of every token) to the next step, where they are continued
first; groups that finished beyond the 64 are dropped, as slime's rollout
does (`--config.rollout.keep_surplus=True` carries them as well). Arithmetic answers are at most a few tokens long, so here APRIL is a
correctness demonstration (rows carried across steps, staleness logged as
`rollout/staleness_*`, `rollout/off_policy_tokens`); `python -m
experiments.bench_april` measures its throughput on a long-tailed length
distribution. As APRIL in slime, the trainer recomputes the old log-probs
at train time (`rl.recompute_old_logp`), so the first update's ratio of a
carried token is 1; `--config.rl.recompute_old_logp=False
--config.rl.rollout_correction=none` takes the ratio against the sampler's
log-probs instead, and `rl.rollout_correction=tis` adds truncated
importance weights against them.
"""

import ml_collections

from configs import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.rollout = ml_collections.ConfigDict(dict(
      name="april",
      over_provision=2.0,   # groups decoded per step / groups trained on
      keep_surplus=False,   # drop finished groups beyond B (official)
      staleness_bins=4,     # rollout/staleness_hist_0..3 (3 = 3 or more)
  ))
  c.rl.recompute_old_logp = True
  return c
