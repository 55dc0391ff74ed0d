"""Policy-gradient methods as compositions of core functions.

A method is the pair (advantage function, policy loss) that the RL loop calls;
its hyper-parameters reach the core through `functools.partial`, so the core
never sees a config. Variants differ by the small functions they compose:

| method       | advantage                         | policy loss                  |
|--------------|-----------------------------------|------------------------------|
| grpo         | group-normalised (std optional)   | PPO clip (clip-higher, dual) |
| rloo         | leave-one-out baseline            | PPO clip                     |
| reinforce_pp | batch-normalised (group baseline) | PPO clip                     |
| gspo         | group-normalised                  | sequence-ratio clip          |
| cispo        | group-normalised                  | clipped-IS-weight REINFORCE  |
| ppo          | GAE with a learned critic         | PPO clip (+ value loss)      |

Dr.GRPO and DAPO are GRPO with other settings (see configs/dr_grpo.py and
configs/dapo.py).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import jax

from rlax_llm.core import advantages, objectives


class Method(NamedTuple):
  """What an RL method contributes to the training loop.

  Attributes:
    name: the method's name.
    advantage_fn: reward_BG -> adv_BG (sequence-level advantages).
    policy_loss: (logp_NT, old_logp_NT, adv_NT, mask_NT, *, num_tokens,
      num_seqs) -> (loss, metrics).
    critic: True for actor-critic methods (PPO): `advantage_fn` is then the
      identity and the update step computes GAE advantages with a learned
      value model (`rlax_llm.training.ppo`).
    token_advantage_fn: optional (reward_N, mask_NT, *, kl_NT, kl_coef,
      group_size) -> adv_NT; when set it replaces `advantage_fn` (token-level
      advantages, e.g. REINFORCE++ with the KL in each token's reward).
  """
  name: str
  advantage_fn: Callable[[jax.Array], jax.Array]
  policy_loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
  critic: bool = False
  token_advantage_fn: Optional[Callable[..., jax.Array]] = None


def _norm_constant(aggregation: str, max_new_tokens: int | None):
  if aggregation != "seq_mean_token_sum_norm":
    return None
  if not max_new_tokens:
    raise ValueError("aggregation 'seq_mean_token_sum_norm' divides by the "
                     "completion budget: pass max_new_tokens.")
  return float(max_new_tokens)


def _ppo_clip(clip_low, clip_high, dual_clip, aggregation, max_new_tokens):
  return functools.partial(
      objectives.ppo_clip_loss, clip_low=clip_low, clip_high=clip_high,
      dual_clip=dual_clip or None, aggregation=aggregation,
      norm_constant=_norm_constant(aggregation, max_new_tokens))


def grpo(*, clip_low: float = 0.2, clip_high: float = 0.2,
         dual_clip: float | None = None, scale_by_std: bool = True,
         aggregation: str = "seq_mean_token_mean",
         max_new_tokens: int | None = None, adv_eps: float = 1e-6) -> Method:
  """GRPO (DeepSeekMath, arXiv:2402.03300) with optional DAPO clip-higher.

  Args:
    clip_low, clip_high, dual_clip: PPO clip ranges (see
      `objectives.ppo_clip_loss`); a falsy dual_clip disables it.
    scale_by_std: divide group-centred rewards by the group std (False is
      Dr.GRPO's advantage).
    aggregation: loss aggregation mode; "seq_mean_token_sum_norm" uses
      `max_new_tokens` as its constant.
    max_new_tokens: the completion budget (needed by the "_norm" mode).
    adv_eps: epsilon added to the group std.
  """
  return Method(
      name="grpo",
      advantage_fn=functools.partial(advantages.grpo_advantages,
                                     scale_by_std=scale_by_std, eps=adv_eps),
      policy_loss=_ppo_clip(clip_low, clip_high, dual_clip, aggregation,
                            max_new_tokens))


def rloo(*, clip_low: float = 0.2, clip_high: float = 0.2,
         dual_clip: float | None = None, aggregation: str = "token_mean",
         max_new_tokens: int | None = None) -> Method:
  """RLOO: leave-one-out group baseline, no std scaling, PPO-clip update.

  "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
  Human Feedback in LLMs" (arXiv:2402.14740).
  """
  return Method(
      name="rloo", advantage_fn=advantages.rloo_advantages,
      policy_loss=_ppo_clip(clip_low, clip_high, dual_clip, aggregation,
                            max_new_tokens))


def reinforce_pp(*, clip_low: float = 0.2, clip_high: float = 0.2,
                 dual_clip: float | None = None,
                 aggregation: str = "token_mean",
                 max_new_tokens: int | None = None,
                 group_baseline: bool = True, adv_eps: float = 1e-6,
                 token_level: bool = False, gamma: float = 1.0) -> Method:
  """REINFORCE++ (arXiv:2501.03262): batch-normalised advantages, PPO clip.

  With `group_baseline` the group mean is subtracted first (the paper's
  "REINFORCE++ with baseline" for groups of samples per prompt). With
  `token_level` the advantages are verl's: token rewards (the KL in the
  reward on every token, the outcome on the last), returns, whitened over
  every valid token of the batch (`advantages.reinforce_pp_token_advantages`);
  otherwise sequence rewards normalised over the batch's sequences.
  """
  return Method(
      name="reinforce_pp",
      advantage_fn=functools.partial(advantages.reinforce_pp_advantages,
                                     group_baseline=group_baseline,
                                     eps=adv_eps),
      policy_loss=_ppo_clip(clip_low, clip_high, dual_clip, aggregation,
                            max_new_tokens),
      token_advantage_fn=(functools.partial(
          advantages.reinforce_pp_token_advantages,
          group_baseline=group_baseline, gamma=gamma) if token_level
                          else None))


def gspo(*, clip_low: float = 3e-4, clip_high: float = 4e-4,
         scale_by_std: bool = True,
         aggregation: str = "seq_mean_token_mean",
         max_new_tokens: int | None = None, adv_eps: float = 1e-6) -> Method:
  """GSPO (arXiv:2507.18071): clip on the length-normalised sequence ratio."""
  return Method(
      name="gspo",
      advantage_fn=functools.partial(advantages.grpo_advantages,
                                     scale_by_std=scale_by_std, eps=adv_eps),
      policy_loss=functools.partial(
          objectives.gspo_loss, clip_low=clip_low, clip_high=clip_high,
          aggregation=aggregation,
          norm_constant=_norm_constant(aggregation, max_new_tokens)))


def cispo(*, clip_low: float = 0.0, clip_high: float = 0.28,
          scale_by_std: bool = True, aggregation: str = "token_mean",
          max_new_tokens: int | None = None, adv_eps: float = 1e-6) -> Method:
  """CISPO (MiniMax-M1, arXiv:2506.13585): clipped stop-gradient IS weight.

  `clip_low` 0 means no lower bound on the weight, as in the paper.
  """
  return Method(
      name="cispo",
      advantage_fn=functools.partial(advantages.grpo_advantages,
                                     scale_by_std=scale_by_std, eps=adv_eps),
      policy_loss=functools.partial(
          objectives.cispo_loss, clip_low=clip_low or None,
          clip_high=clip_high, aggregation=aggregation,
          norm_constant=_norm_constant(aggregation, max_new_tokens)))


def _identity(reward_BG: jax.Array) -> jax.Array:
  return reward_BG


def ppo(*, clip_low: float = 0.2, clip_high: float = 0.2,
        dual_clip: float | None = None, aggregation: str = "token_mean",
        max_new_tokens: int | None = None) -> Method:
  """PPO with a value model ("Proximal Policy Optimization Algorithms",
  arXiv:1707.06347; for language models, arXiv:2203.02155).

  The rollout batch carries the raw rewards (identity advantage function);
  `rlax_llm.training.ppo.make_ppo_step` turns them into GAE advantages with
  the critic, whitens them, and applies this clipped policy loss plus the
  clipped value loss.
  """
  return Method(name="ppo", advantage_fn=_identity,
                policy_loss=_ppo_clip(clip_low, clip_high, dual_clip,
                                      aggregation, max_new_tokens),
                critic=True)
