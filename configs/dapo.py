"""DAPO on the default arithmetic task.

Run:
  python -m experiments.train --config=configs/dapo.py --workdir=/tmp/dapo
"DAPO: An Open-Source LLM Reinforcement Learning System at Scale"
(arXiv:2503.14476): clip-higher (clip_low 0.2, clip_high 0.28), token-level
loss aggregation, and dynamic sampling (groups whose rewards all agree are
replaced by groups of fresh prompts). DAPO's soft overlong punishment is
available as `--config.rl.overlong_buffer=N`; it stays off here because the
arithmetic budget (longest answer + EOS) leaves no slack to punish. Same
budget and outputs as configs/default.py.
"""

from configs import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.rl.clip_low = 0.2
  c.rl.clip_high = 0.28
  c.rl.aggregation = "token_mean"
  c.rl.dynamic_sampling = True
  return c
