"""One-Token Rollout (OTR) fine-tuning on the default arithmetic task.

Run:
  python -m experiments.train --config=configs/otr_arith.py --workdir=/tmp/otr
"One-Token Rollout: Guiding Supervised Fine-Tuning of LLMs with Policy
Gradient" (arXiv:2509.26313): at every supervised position K = 256
candidate tokens (the paper's K as its public reviews give it) are drawn
from softmax(z / 1.2); a candidate that equals the target
earns reward 1, any other beta = -0.1, and the loss is the policy gradient
-(1/K) sum_j R_j log pi(a_j). A policy gradient from a randomly initialised
model gets almost no reward (the target is one of 50 tokens), so the first
500 of the 1,500 supervised steps use cross-entropy (`sft.ce_warmup_steps`),
then OTR takes over; there is no RL phase. `final_accuracy` is held-out
greedy accuracy, to compare with configs/sft_arith.py (cross-entropy for all
1,500 steps) at the same budget; `--config.sft.loss=dft` gives the DFT
control (cross-entropy weighted by the stop-gradient target probability),
`--config.sft.loss=otr_exact` the loss in expectation over the candidates
(no sampling), `--config.sft.aggregation=seq_mean_token_mean` per-sequence
normalisation. Memory of the candidates: the draws and their gathered
log-probs are [N, T, K] int32 + f32, 8 * N * T * K bytes (64 x 5 x 256 here:
0.66 MB per step); the sampling itself needs one [N, T, V] cumulative sum,
independent of K.
"""

from configs import sft_arith


def get_config(arg=None):
  c = sft_arith.get_config(arg)
  c.sft.loss = "otr"
  c.sft.ce_warmup_steps = 500
  c.sft.otr_num_candidates = 256
  c.sft.otr_kappa = 1.2
  c.sft.otr_beta = -0.1
  return c
