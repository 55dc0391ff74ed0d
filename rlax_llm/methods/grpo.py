"""GRPO as a composition of core functions: group advantages + PPO clip loss.

A method is the pair (advantage function, policy loss) that the RL loop calls;
its hyper-parameters reach the core through `functools.partial`, so the core
never sees a config.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax

from rlax_llm.core import advantages, objectives


class Method(NamedTuple):
  """What an RL method contributes to the training loop.

  Attributes:
    name: the method's name.
    advantage_fn: reward_BG -> adv_BG (sequence-level advantages).
    policy_loss: (logp_NT, old_logp_NT, adv_NT, mask_NT, *, num_tokens,
      num_seqs) -> (loss, metrics).
  """
  name: str
  advantage_fn: Callable[[jax.Array], jax.Array]
  policy_loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def grpo(*, clip_low: float = 0.2, clip_high: float = 0.2,
         dual_clip: float | None = None, scale_by_std: bool = True,
         aggregation: str = "seq_mean_token_mean",
         max_new_tokens: int | None = None, adv_eps: float = 1e-6) -> Method:
  """GRPO (DeepSeekMath, arXiv:2402.03300) with optional DAPO clip-higher.

  Args:
    clip_low, clip_high, dual_clip: PPO clip ranges (see
      `objectives.ppo_clip_loss`).
    scale_by_std: divide group-centred rewards by the group std (False is
      Dr.GRPO's advantage).
    aggregation: loss aggregation mode; "seq_mean_token_sum_norm" uses
      `max_new_tokens` as its constant.
    max_new_tokens: the completion budget (needed by the "_norm" mode).
    adv_eps: epsilon added to the group std.
  """
  norm_constant = (float(max_new_tokens)
                   if aggregation == "seq_mean_token_sum_norm" else None)
  return Method(
      name="grpo",
      advantage_fn=functools.partial(advantages.grpo_advantages,
                                     scale_by_std=scale_by_std, eps=adv_eps),
      policy_loss=functools.partial(objectives.ppo_clip_loss,
                                    clip_low=clip_low, clip_high=clip_high,
                                    dual_clip=dual_clip,
                                    aggregation=aggregation,
                                    norm_constant=norm_constant))


def rloo(*, clip_low: float = 0.2, clip_high: float = 0.2,
         dual_clip: float | None = None, scale_by_std: bool = True,
         aggregation: str = "token_mean", max_new_tokens: int | None = None,
         adv_eps: float = 1e-6) -> Method:
  """RLOO: leave-one-out group baseline, no std scaling, PPO-clip update.

  "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
  Human Feedback in LLMs" (arXiv:2402.14740). `scale_by_std` and `adv_eps`
  are accepted so every PPO-clip-family method takes the same settings; RLOO
  ignores them.
  """
  del scale_by_std, adv_eps
  norm_constant = (float(max_new_tokens)
                   if aggregation == "seq_mean_token_sum_norm" else None)
  return Method(
      name="rloo",
      advantage_fn=advantages.rloo_advantages,
      policy_loss=functools.partial(objectives.ppo_clip_loss,
                                    clip_low=clip_low, clip_high=clip_high,
                                    dual_clip=dual_clip,
                                    aggregation=aggregation,
                                    norm_constant=norm_constant))
