"""REINFORCE++ with the KL in each token's reward and token-level whitening.

Run:
  python -m experiments.train --config=configs/reinforce_pp_kl.py \
      --workdir=/tmp/reinforce_pp_kl
"REINFORCE++" (arXiv:2501.03262) as verl computes it: every token's reward is
-beta * KL_t (k1 by default in verl; here the config's estimator) and the
verifier's reward sits on the last token; advantages are the reward-to-go,
whitened over every valid token of the batch (verl's masked_whiten); the
update is the PPO-clipped ratio with no KL loss term. beta = 0.01 here, a
value at which the per-token KL matters at this model's scale (verl's
examples use 0.001 on 7B models). Same budget as configs/default.py.
"""

from configs import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.rl.method = "reinforce_pp"
  c.rl.group_baseline = False
  c.rl.token_level_advantages = True
  c.rl.kl_coef = 0.01
  c.rl.kl_estimator = "k1"
  c.rl.kl_in_reward = True
  return c
