"""PPO with a learned critic on the default arithmetic task.

Run:
  python -m experiments.train --config=configs/ppo.py --workdir=/tmp/ppo
"Proximal Policy Optimization Algorithms" (arXiv:1707.06347) as used for
language models (arXiv:2203.02155): the verifier's reward sits on each
completion's last token; a critic (a copy of the SFT policy with a zero scalar
head, its own optimiser at rl.value_learning_rate) predicts returns; GAE
(gamma 1, lambda 0.95) gives per-token advantages, whitened over the batch;
the policy takes the clipped PPO loss and the critic the clipped value loss.
Logs `rl/value_loss`, `rl/explained_variance`, `rl/value_grad_norm` next to
the usual metrics. Same budget and outputs as configs/default.py.
"""

from configs import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.rl.method = "ppo"
  c.rl.value_learning_rate = 1e-3
  c.rl.value_coef = 0.5
  c.rl.value_clip = 0.2
  c.rl.gamma = 1.0
  c.rl.gae_lambda = 0.95
  return c
