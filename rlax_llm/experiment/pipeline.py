"""The RL step's pipeline, built from the config: engine -> chain -> update.

`build_chain(config, method, engine)` returns the group transforms of
`rlax_llm.methods.transforms` that the config asks for, in the one order
every engine shares; `check_options` refuses, before the run starts, any
option the chosen engine or method cannot honour, naming the option, the
engine and what to do instead. `update_options(config, method)` gives the
update step's settings (reference KL, recomputed old log-probs, rollout
correction). Nothing here runs on the accelerator.
"""

from __future__ import annotations

from typing import Any

from rlax_llm.core import regularizers
from rlax_llm.core import selection
from rlax_llm.methods import transforms as tf
from rlax_llm.training import steps as steps_lib

ROLLOUT_CORRECTIONS = {"none": None, "tis": "truncate", "mis": "mask"}


def _refuse(option: str, engine_or_method: str, fix: str):
  raise ValueError(f"config.{option} cannot be honoured with "
                   f"{engine_or_method}: {fix}")


def uses_reference(rl) -> bool:
  """Whether the RL phase keeps a frozen reference policy."""
  return float(rl.kl_coef) > 0


def check_options(config, method, engine_cls) -> None:
  """Refuses (ValueError) an RL option the engine or method cannot honour."""
  rl = config.rl
  name = f"the {engine_cls.name!r} rollout engine"
  if rl.kl_estimator not in regularizers.KL_ESTIMATORS:
    raise ValueError(f"config.rl.kl_estimator={rl.kl_estimator!r}; choose one "
                     f"of {sorted(regularizers.KL_ESTIMATORS)}.")
  if rl.kl_coef < 0:
    raise ValueError(f"config.rl.kl_coef must be >= 0 (0 disables the KL to "
                     f"the reference), got {rl.kl_coef}.")
  if rl.kl_in_reward and not rl.kl_coef > 0:
    raise ValueError("config.rl.kl_in_reward=True puts kl_coef * KL in the "
                     "reward, but rl.kl_coef is 0: set rl.kl_coef > 0 (e.g. "
                     "0.001) or kl_in_reward=False.")
  if rl.ref_reset_every < 0:
    raise ValueError("config.rl.ref_reset_every must be >= 0 (0: never), got "
                     f"{rl.ref_reset_every}.")
  if rl.ref_reset_every and not rl.kl_coef > 0:
    raise ValueError("config.rl.ref_reset_every resets the KL reference, but "
                     "rl.kl_coef is 0 (no reference): set rl.kl_coef > 0 or "
                     "ref_reset_every=0.")
  if rl.rollout_correction not in ROLLOUT_CORRECTIONS:
    raise ValueError(f"config.rl.rollout_correction={rl.rollout_correction!r};"
                     f" choose one of {sorted(ROLLOUT_CORRECTIONS)}.")
  if rl.rollout_correction != "none":
    if rl.rollout_correction_level not in ("token", "sequence"):
      raise ValueError("config.rl.rollout_correction_level="
                       f"{rl.rollout_correction_level!r}; choose 'token' or "
                       "'sequence'.")
    if not rl.rollout_correction_cap > 0:
      raise ValueError("config.rl.rollout_correction_cap must be > 0, got "
                       f"{rl.rollout_correction_cap}.")
    if not rl.recompute_old_logp:
      raise ValueError(
          f"config.rl.rollout_correction={rl.rollout_correction!r} weights "
          "each token by the trainer's old log-prob over the sampler's, so "
          "the trainer must recompute them: set rl.recompute_old_logp=True "
          "as well.")
  if rl.dynamic_sampling and not (engine_cls.resamples
                                  or engine_cls.filters_groups):
    _refuse("rl.dynamic_sampling", name,
            "its groups come from a buffer of carried rollouts and cannot "
            "be drawn again for the same step; use rollout.name='sample' "
            "(or latr/branch) for DAPO's dynamic sampling, or set "
            "rl.dynamic_sampling=False.")
  seq_adv = engine_cls.sequence_advantages and not method.critic and (
      getattr(method, "token_advantage_fn", None) is None)
  why = (f"{name} supplies its own per-token tree advantages"
         if not engine_cls.sequence_advantages else
         f"method {method.name!r}, whose advantages are "
         + ("GAE from a critic" if method.critic else "per token"))
  if rl.xrpo_lambda > 0 and not seq_adv:
    _refuse("rl.xrpo_lambda", why,
            "XRPO sharpens sequence advantages of a group; use the 'sample' "
            "or 'latr' engine with a group-advantage method (grpo, rloo, "
            "...), or set rl.xrpo_lambda=0.")
  if rl.get("xrpo_novelty", "mean") not in ("mean", "sum"):
    raise ValueError(f"config.rl.xrpo_novelty={rl.xrpo_novelty!r}; choose "
                     "'mean' (length-normalised log-likelihood, the paper's) "
                     "or 'sum'.")
  if getattr(engine_cls, "variable_groups", False):
    if getattr(method, "token_advantage_fn", None) is not None:
      _refuse("rl.token_level_advantages", name,
              "its groups hold variable numbers of rollouts (empty slots), "
              "and the token-level advantage's group baseline would count "
              "the empty slots; set rl.token_level_advantages=False.")
  if rl.d3s_sample_keep > 0:
    if not seq_adv:
      _refuse("rl.d3s_sample_keep", why,
              "D^3S selects rollouts by their sequence advantages; use a "
              "group-advantage method and engine, or set "
              "rl.d3s_sample_keep=0.")
    if rl.d3s_sample_keep > rl.num_samples:
      raise ValueError(f"config.rl.d3s_sample_keep={rl.d3s_sample_keep} is "
                       f"more than the group size rl.num_samples="
                       f"{rl.num_samples}; keep at most G rollouts per group.")
  if method.critic and not engine_cls.sequence_advantages:
    _refuse("rl.method='ppo'", name,
            "PPO's critic computes GAE advantages from sequence rewards and "
            "would discard the tree's advantages; use the 'sample', 'latr' "
            "or 'april' engine with PPO, or a group method with 'branch'.")
  if rl.token_level_advantages and not engine_cls.sequence_advantages:
    _refuse("rl.token_level_advantages", name,
            "the tree's advantages replace the method's; set "
            "rl.token_level_advantages=False.")
  for name in ("d3s_token_fraction", "d3s_token_fraction_end"):
    if not 0 < rl[name] <= 1:
      raise ValueError(f"config.rl.{name} must be in (0, 1] (1 keeps every "
                       f"token), got {rl[name]}.")
  if rl.d3s_schedule_steps < 0:
    raise ValueError("config.rl.d3s_schedule_steps must be >= 0 (0: the "
                     f"start fraction throughout), got {rl.d3s_schedule_steps}.")
  if rl.overlong_buffer < 0:
    raise ValueError("config.rl.overlong_buffer must be >= 0 (0 disables), "
                     f"got {rl.overlong_buffer}.")


def per_draw(config, max_new_tokens: int) -> list:
  """Transforms each draw of an engine goes through (reward shaping)."""
  out = []
  if config.rl.overlong_buffer > 0:
    out.append(tf.overlong_shaping(max_new_tokens=max_new_tokens,
                                   buffer=int(config.rl.overlong_buffer)))
  return out


def build_chain(config, method, engine_cls=None) -> list:
  """The group transforms after the first draw, in their one order.

  An engine that filters groups itself (`Engine.filters_groups`, APRIL)
  gets dynamic sampling through `engine_filter_rounds` instead.
  """
  rl = config.rl
  chain = []
  if rl.dynamic_sampling and not getattr(engine_cls, "filters_groups", False):
    chain.append(tf.dynamic_sampling(max_rounds=int(rl.max_sampling_rounds)))
  if rl.kl_coef > 0 and rl.kl_in_reward and not method.critic:
    chain.append(tf.kl_in_reward(
        coef=float(rl.kl_coef), estimator=rl.kl_estimator,
        per_token=getattr(method, "token_advantage_fn", None) is not None))
  chain.append(tf.advantage(method, kl_coef=float(rl.kl_coef)
                            if rl.kl_in_reward else 0.0))
  if rl.xrpo_lambda > 0:
    chain.append(tf.xrpo_sharpening(
        lam=float(rl.xrpo_lambda), kappa_clip=float(rl.xrpo_kappa_clip),
        length_normalise=rl.get("xrpo_novelty", "mean") == "mean"))
  if rl.d3s_sample_keep > 0:
    chain.append(tf.d3s_sample_selection(keep=int(rl.d3s_sample_keep)))
  return chain


def engine_filter_rounds(config, engine_cls) -> int:
  """`RolloutContext.filter_rounds` for an engine that filters itself."""
  if config.rl.dynamic_sampling and engine_cls.filters_groups:
    return int(config.rl.max_sampling_rounds)
  return 0


def token_fraction(config, rl_step: int) -> float | None:
  """D^3S token-level keep fraction at RL step `rl_step`, None when off.

  Linear from `rl.d3s_token_fraction` to `rl.d3s_token_fraction_end` over
  `rl.d3s_schedule_steps` RL steps (`core.selection.linear_schedule`): an
  aggressive selection early that relaxes later.
  """
  rl = config.rl
  start, end = float(rl.d3s_token_fraction), float(rl.d3s_token_fraction_end)
  if start >= 1.0 and end >= 1.0:
    return None
  if rl.d3s_schedule_steps <= 0:
    return start
  return float(selection.linear_schedule(rl_step, start=start, end=end,
                                         num_steps=int(rl.d3s_schedule_steps)))


def update_options(config, method, *, max_new_tokens: int) -> dict[str, Any]:
  """Keyword settings of the update step (`steps.make_rl_step` /
  `ppo.make_ppo_step`) for the reference KL and the old log-probs."""
  rl = config.rl
  use_ref = uses_reference(rl)
  mode = ROLLOUT_CORRECTIONS[rl.rollout_correction]
  out = dict(
      use_ref=use_ref,
      recompute_old_logp=bool(rl.recompute_old_logp),
      rollout_correction=None if mode is None else steps_lib.RolloutCorrection(
          mode=mode, level=rl.rollout_correction_level,
          cap=float(rl.rollout_correction_cap)),
      kl_estimator=rl.kl_estimator,
      kl_norm_constant=(float(max_new_tokens)
                        if rl.aggregation == "seq_mean_token_sum_norm"
                        else None))
  if method.critic:
    out["kl_coef"] = float(rl.kl_coef)
    out["kl_in_reward"] = bool(rl.kl_in_reward)
  else:
    # With the KL in the reward the step adds no KL term (it still logs kl).
    out["kl_coef"] = 0.0 if rl.kl_in_reward else float(rl.kl_coef)
    out["kl_aggregation"] = rl.aggregation
  return out
