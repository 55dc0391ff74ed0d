"""PPO with a learned critic (value model) for language models.

The critic has the policy's architecture with a scalar head: a `Transformer`
trunk whose final hidden state h_t (the state that predicts completion token
t) is mapped to V(s_t) = h_t . w + b. It starts as a copy of the policy's
weights after SFT and a zero head, so its first predictions are 0, and is
trained with its own optimiser (as a separate critic in verl, or TRL's PPO
trainer, rather than a head sharing the policy's trunk, so value gradients
never move the policy).

One PPO step (`make_ppo_step`), all inside one jitted program:
  1. V_old = critic(batch) at rollout time, micro-batched;
  2. per-token rewards (the verifier's reward on each completion's last token,
     `advantages.token_level_rewards`, optionally minus a KL penalty);
  3. GAE(gamma, lambda) -> advantages A and returns R = A + V_old;
     advantages whitened over the batch's valid tokens;
  4. epochs x minibatches x micro-batches of
     policy_loss(logp, old_logp, A) + value_coef * value_loss(V, V_old, R),
     with token/sequence normalisers of the whole minibatch, so gradient
     accumulation is exact; policy and critic each take an optimiser update.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import optax

from rlax_llm.core import advantages as adv_lib
from rlax_llm.core import value as value_lib
from rlax_llm.parallel import mesh as mesh_lib
from rlax_llm.training import state as state_lib
from rlax_llm.training.scoring import predictor_states
from rlax_llm.training.state import TrainState, step_rng
from rlax_llm.training import steps as steps_lib
from rlax_llm.training.state import RefState
from rlax_llm.training.steps import PolicyLoss


class PPOState(NamedTuple):
  """Policy and critic train states, stepped together."""
  policy: TrainState
  critic: TrainState


def critic_from_policy(policy_params, embed_dim: int) -> dict[str, Any]:
  """Critic parameters: a copy of the policy trunk and a zero value head."""
  return {"trunk": jax.tree.map(jnp.array, policy_params),
          "head": {"w": jnp.zeros((embed_dim,), jnp.float32),
                   "b": jnp.zeros((), jnp.float32)}}


def critic_values(graphdef: nnx.GraphDef, critic_params, prompt_NP,
                  prompt_mask_NP, completion_NT, completion_mask_NT, *,
                  prompt_group: int = 1) -> jax.Array:
  """V(s_t) [N, T] f32 for each completion token's predictor state; 0 masked.

  With `prompt_group` G > 1 each group's shared prompt runs once through the
  trunk (`scoring.predictor_states`).
  """
  _, h_NTD = predictor_states(graphdef, critic_params["trunk"], prompt_NP,
                              prompt_mask_NP, completion_NT,
                              completion_mask_NT, prompt_group)
  h_NTD = h_NTD.astype(jnp.float32)
  head = critic_params["head"]
  v = h_NTD @ head["w"].astype(jnp.float32) + head["b"].astype(jnp.float32)
  return jnp.where(completion_mask_NT.astype(bool), v, 0.0)


def critic_shardings(policy_param_shardings, mesh) -> dict[str, Any]:
  rep = mesh_lib.replicated(mesh)
  return {"trunk": policy_param_shardings, "head": {"w": rep, "b": rep}}


def ppo_state_shardings(model_cfg, policy_opt, critic_opt, mesh, *, seed: int):
  """(abstract PPOState, PPOState of shardings)."""
  abstract_p, sh_p = state_lib.state_shardings(model_cfg, policy_opt, mesh,
                                               seed=seed)
  abstract_c = jax.eval_shape(
      lambda p: _critic_state(p, critic_opt, model_cfg.embed_dim), abstract_p)
  c_param_sh = critic_shardings(sh_p.params, mesh)
  c_def = jax.tree.structure(abstract_c.params)
  rep = mesh_lib.replicated(mesh)

  def is_param_tree(x):
    return jax.tree.structure(x) == c_def

  opt_sh = jax.tree.map(lambda x: c_param_sh if is_param_tree(x) else rep,
                        abstract_c.opt_state, is_leaf=is_param_tree)
  sh_c = TrainState(step=rep, params=c_param_sh, opt_state=opt_sh, rng=rep)
  return PPOState(abstract_p, abstract_c), PPOState(sh_p, sh_c)


def _critic_state(policy_state: TrainState, critic_opt, embed_dim: int):
  params = critic_from_policy(policy_state.params, embed_dim)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=critic_opt.init(params), rng=policy_state.rng)


def to_ppo_state(policy_state: TrainState, policy_opt, critic_opt,
                 shardings: PPOState, embed_dim: int) -> PPOState:
  """SFT -> PPO: fresh policy optimiser, critic initialised from the policy."""
  policy = state_lib.reset_optimizer(policy_state, policy_opt,
                                     shardings.policy)
  critic = jax.jit(lambda s: _critic_state(s, critic_opt, embed_dim),
                   out_shardings=shardings.critic)(policy)
  return PPOState(policy, critic)


def ppo_advantages(reward_N, value_NT, mask_NT, *, gamma: float,
                   lam: float, whiten_advantages: bool = True, kl_NT=None,
                   kl_coef: float = 0.0):
  """(advantages, returns, raw GAE advantages) from sequence rewards.

  Each sequence's reward is placed on its last valid token, minus
  `kl_coef * kl_NT` on every token when a KL estimate is given (the
  KL-shaped token reward of RLHF, `advantages.token_level_rewards`), and
  GAE runs over the critic's values; advantages are whitened over the
  batch's valid tokens.
  """
  token_reward = adv_lib.token_level_rewards(reward_N, mask_NT, kl_NT=kl_NT,
                                             kl_coef=kl_coef)
  gae = adv_lib.gae_advantages(token_reward, value_NT, mask_NT, gamma=gamma,
                               lam=lam)
  adv = (value_lib.whiten(gae.adv_NT, mask_NT) if whiten_advantages
         else gae.adv_NT)
  return adv, gae.returns_NT, gae.adv_NT


def make_ppo_step(graphdef: nnx.GraphDef, policy_opt, critic_opt,
                  policy_loss: PolicyLoss, *, temperature: float = 1.0,
                  num_epochs: int = 1, num_minibatches: int = 1,
                  num_microbatches: int = 1, gamma: float = 1.0,
                  lam: float = 0.95, value_coef: float = 0.5,
                  value_clip: float | None = 0.2,
                  whiten_advantages: bool = True,
                  aggregation: str = "token_mean", logprob_chunk: int = 0,
                  vocab_chunk: int | None = None, entropy_coef: float = 0.0,
                  kl_coef: float = 0.0, kl_estimator: str = "k3",
                  kl_in_reward: bool = False, use_ref: bool = False,
                  kl_norm_constant: float | None = None,
                  recompute_old_logp: bool = False,
                  rollout_correction=None, mesh=None,
                  length_buckets: int = 0, prompt_group: int = 1):
  """Returns `ppo_step(PPOState, RLBatch) -> (PPOState, metrics)`.

  The batch's `reward` field holds each sequence's reward; the step turns it
  into GAE advantages with the critic. The update is the shared
  `steps.make_policy_step` with the critic's value loss added; with
  `use_ref` the state is a `RefState(PPOState, ref_params)`, and
  `kl_in_reward` puts -kl_coef * KL on every token's reward (else a KL loss
  term with `kl_coef`).

  Args:
    graphdef: NNX graph of the policy (the critic trunk shares it).
    policy_opt, critic_opt: optax transformations.
    policy_loss: e.g. `functools.partial(objectives.ppo_clip_loss, ...)`.
    temperature: the rollout's sampling temperature.
    num_epochs, num_minibatches, num_microbatches: as in `make_rl_step`.
    gamma, lam: GAE discount and lambda.
    value_coef: weight of the value loss (it only moves the critic).
    value_clip: clip range of the value loss (None disables).
    whiten_advantages: normalise GAE advantages over the batch's tokens.
    aggregation: aggregation of the value and KL losses.
    logprob_chunk, vocab_chunk, entropy_coef, kl_*, use_ref,
      recompute_old_logp, rollout_correction, length_buckets, prompt_group:
      as in `steps.make_rl_step` (the critic's trunk shares the prompt
      too).
  """
  critic = steps_lib.Critic(
      values=lambda c_params, b: critic_values(
          graphdef, c_params, b.prompt, b.prompt_mask, b.completion,
          b.completion_mask, prompt_group=prompt_group),
      loss=functools.partial(value_lib.value_loss, clip=value_clip,
                             aggregation=aggregation),
      advantages=functools.partial(ppo_advantages, gamma=gamma, lam=lam,
                                   whiten_advantages=whiten_advantages),
      value_coef=value_coef)
  body = steps_lib.make_policy_step(
      graphdef, (policy_opt, critic_opt), policy_loss, critic=critic,
      temperature=temperature, num_epochs=num_epochs,
      num_minibatches=num_minibatches, num_microbatches=num_microbatches,
      entropy_coef=entropy_coef, logprob_chunk=logprob_chunk,
      vocab_chunk=vocab_chunk, kl_coef=kl_coef, kl_estimator=kl_estimator,
      kl_aggregation=aggregation, kl_norm_constant=kl_norm_constant,
      kl_in_reward=kl_in_reward, use_ref=use_ref,
      recompute_old_logp=recompute_old_logp,
      rollout_correction=rollout_correction, mesh=mesh,
      length_buckets=length_buckets, prompt_group=prompt_group)

  def ppo_step(state, batch):
    inner, ref = (state.train, state.ref) if use_ref else (state, None)
    (policy, critic_state), metrics = body((inner.policy, inner.critic), ref,
                                           batch)
    new = PPOState(policy, critic_state)
    return (RefState(new, ref) if use_ref else new), metrics

  return ppo_step
