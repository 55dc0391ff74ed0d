"""GRPO on lookahead tree rollouts (LATR, arXiv:2510.24302), synthetic arithmetic.

Run:
  python -m experiments.train --config=configs/latr_arith.py --workdir=/tmp/latr

The default experiment (1,500 SFT steps, then 300 GRPO steps of 64 prompts x
16 rows) with rollouts from the "latr" engine, following the official code
(github.com/starreeze/latr; rule by rule in docs/FIDELITY.md): S =
round(16 * eta) rows of each group come from a lookahead tree, the other
16 - S are plain samples. In the tree every branch decodes greedily; where
the untempered top-2 token has p2 > tau_abs and p1 - p2 < tau_rel a branch
opens on it (one per position); r tokens after it opened, a branch whose
window (from the divergent token on) has edit distance / r below tau_ed to
its parent's is pruned with its descendants, unless a window holds EOS or the
parent's divergent token is a digit or math symbol. The tree exits to plain
sampling once (0.98 - 0.05 t/T) of the batch's tree slots hold branches and
every branch is older than the largest window; empty slots then become
copies of the root branch. eta follows the official Countdown schedule
{0: 1, 10: .75, 20: .5, 80: .25, 200: 0} (S = 16, 12, 8, 4, 0). Thresholds
are the official Countdown ones; the windows (official 20, 30, 50) are scaled
to answers of at most 4 characters + EOS. With the character tokenizer the
digits, arithmetic symbols, the space and the special tokens are exempt (the
official substring rule), so pruning acts on divergences at other tokens only.

Writes the same artifacts as the default run; the engine adds the rollout
statistics listed in rlax_llm/methods/latr.py. Every field below except
`name` goes to `rlax_llm.sampling.latr.tree_config_from_fields`; see
`TreeConfig` for the rest (tau_suffix/tau_rouge for the math criteria,
exit_scope, empty_slots="sample" for independent reserve rows).
"""

import ml_collections

from configs import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.rollout = ml_collections.ConfigDict(dict(
      name="latr",
      tau_abs=0.25,             # branch on the top-2 token when p2 > tau_abs
      tau_rel=0.15,             # and p1 - p2 < tau_rel (untempered)
      max_branches_per_step=1,  # candidates after the top-1: 1 = top-2
      windows=(2, 3),           # lookahead lengths r, from the divergent token
      tau_ed=0.4,               # prune when edit distance / r < tau_ed
      tau_suffix=None,          # math setting: prune when suffix match > 0.2
      tau_rouge=None,           # math setting: prune when ROUGE-L > 0.5
      keep_math_symbols=True,   # never prune a digit / math-symbol divergence
      branch_steps=0,           # tree phase cap in tokens (0: none; official
                                # 512 for Countdown answers of 1,024)
      exit_fill=0.98,           # exit when this share of the tree slots ...
      exit_fill_decay=0.05,     # ... minus decay * t / T is filled
      eta_schedule=((0, 1.0), (10, 0.75), (20, 0.5), (80, 0.25), (200, 0.0)),
  ))
  return c
