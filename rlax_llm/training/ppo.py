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
from rlax_llm.training.scoring import predictor_hidden, score_completions
from rlax_llm.training.state import TrainState, step_rng
from rlax_llm.training.steps import PolicyLoss, RLBatch, _counts


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
                  prompt_mask_NP, completion_NT, completion_mask_NT
                  ) -> jax.Array:
  """V(s_t) [N, T] f32 for each completion token's predictor state; 0 masked."""
  model = nnx.merge(graphdef, critic_params["trunk"])
  t = completion_NT.shape[1]
  tokens = jnp.concatenate([prompt_NP, completion_NT], axis=1)
  mask = jnp.concatenate([prompt_mask_NP, completion_mask_NT], axis=1)
  h = model.hidden_states(tokens, None, mask.astype(bool))
  h_NTD = predictor_hidden(h, prompt_mask_NP, t).astype(jnp.float32)
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


def ppo_advantages(reward_NT, value_NT, mask_NT, *, gamma: float,
                   lam: float, whiten_advantages: bool = True):
  """(advantages, returns, raw GAE advantages) from a broadcast reward.

  `reward_NT` holds each sequence's reward on all its valid tokens (as the
  rollout batch carries it); the reward is placed on the last valid token
  (`advantages.token_level_rewards`) and GAE runs over the critic's values.
  """
  valid = mask_NT.astype(jnp.float32)
  reward_N = jnp.sum(reward_NT * valid, -1) / jnp.maximum(jnp.sum(valid, -1),
                                                          1.0)
  token_reward = adv_lib.token_level_rewards(reward_N, mask_NT)
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
                  vocab_chunk: int | None = None):
  """Returns `ppo_step(PPOState, RLBatch) -> (PPOState, metrics)`.

  The batch's `advantages` field holds each sequence's reward, broadcast over
  its tokens; the step turns it into GAE advantages with the critic.

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
    aggregation: aggregation of the value loss.
    logprob_chunk, vocab_chunk: memory-bounded scoring, as in `make_rl_step`.
  """
  num_updates = num_epochs * num_minibatches
  vloss = functools.partial(value_lib.value_loss, clip=value_clip,
                            aggregation=aggregation)

  def values_of(critic_params, b: RLBatch):
    return critic_values(graphdef, critic_params, b.prompt, b.prompt_mask,
                         b.completion, b.completion_mask)

  def micro_loss(params, micro, adv, ret, v_old, num_tokens, num_seqs):
    p_params, c_params = params
    scores = score_completions(graphdef, p_params, micro.prompt,
                               micro.prompt_mask, micro.completion,
                               micro.completion_mask, temperature=temperature,
                               chunk_size=logprob_chunk,
                               vocab_chunk=vocab_chunk)
    pl, pm = policy_loss(scores.logp, micro.old_logp, adv,
                         micro.completion_mask, num_tokens=num_tokens,
                         num_seqs=num_seqs)
    v = values_of(c_params, micro)
    vl, vm = vloss(v, v_old, ret, micro.completion_mask,
                   num_tokens=num_tokens, num_seqs=num_seqs)
    mask = micro.completion_mask.astype(jnp.float32)
    diff = jnp.abs(scores.logp - micro.old_logp) * mask
    sums = dict(entropy=jnp.sum(scores.entropy * mask),
                logp_mismatch_mean=jnp.sum(diff), tokens=jnp.sum(mask))
    metrics = dict(pm, **vm)
    return pl + value_coef * vl, (metrics, sums, jnp.max(diff))

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def minibatch_update(carry, idx_UB, batch, adv, ret, v_old):
    (p_params, p_opt), (c_params, c_opt) = carry
    take = lambda x: x[idx_UB]
    mb = jax.tree.map(take, batch)
    mb_adv, mb_ret, mb_v = take(adv), take(ret), take(v_old)
    num_tokens, num_seqs = _counts(mb.completion_mask)

    def micro_body(acc, xs):
      micro, a, r, v = xs
      (loss, aux), grads = grad_fn((p_params, c_params), micro, a, r, v,
                                   num_tokens, num_seqs)
      return jax.tree.map(jnp.add, acc, grads), (loss,) + aux

    zeros = jax.tree.map(jnp.zeros_like, (p_params, c_params))
    (g_p, g_c), (loss_U, metrics_U, sums_U, maxdiff_U) = jax.lax.scan(
        micro_body, zeros, (mb, mb_adv, mb_ret, mb_v))
    upd, p_opt = policy_opt.update(g_p, p_opt, p_params)
    p_params = optax.apply_updates(p_params, upd)
    upd, c_opt = critic_opt.update(g_c, c_opt, c_params)
    c_params = optax.apply_updates(c_params, upd)
    tokens = jnp.maximum(jnp.sum(sums_U["tokens"]), 1.0)
    out = {k: jnp.sum(v) if k in ("pg_loss", "value_loss") else jnp.mean(v)
           for k, v in metrics_U.items()}
    out.update(loss=jnp.sum(loss_U), grad_norm=optax.tree.norm(g_p),
               value_grad_norm=optax.tree.norm(g_c),
               entropy=jnp.sum(sums_U["entropy"]) / tokens,
               logp_mismatch_mean=jnp.sum(sums_U["logp_mismatch_mean"]) / tokens,
               logp_mismatch_max=jnp.max(maxdiff_U))
    return ((p_params, p_opt), (c_params, c_opt)), out

  def ppo_step(state: PPOState, batch: RLBatch):
    n = batch.prompt.shape[0]
    per_update = num_minibatches * num_microbatches
    if n % per_update:
      raise ValueError(
          f"The rollout batch of {n} sequences does not split into "
          f"{num_minibatches} minibatches x {num_microbatches} micro-batches; "
          "choose sizes whose product divides the number of sequences.")
    mask = batch.completion_mask
    # Values at rollout time, in micro-batch-sized chunks.
    chunks = jax.tree.map(
        lambda x: x.reshape((n // (n // per_update), n // per_update)
                            + x.shape[1:]), batch)
    v_old = jax.lax.map(lambda b: values_of(state.critic.params, b),
                        chunks).reshape(mask.shape)
    v_old = jax.lax.stop_gradient(v_old)
    adv, ret, raw_adv = ppo_advantages(batch.advantages, v_old, mask,
                                       gamma=gamma, lam=lam,
                                       whiten_advantages=whiten_advantages)
    key = step_rng(state.policy, 1)
    perms = jax.vmap(lambda e: jax.random.permutation(
        jax.random.fold_in(key, e), n))(jnp.arange(num_epochs))
    idx = perms.reshape(num_updates, num_microbatches, n // per_update)
    carry = ((state.policy.params, state.policy.opt_state),
             (state.critic.params, state.critic.opt_state))
    ((p_params, p_opt), (c_params, c_opt)), m = jax.lax.scan(
        functools.partial(minibatch_update, batch=batch, adv=adv, ret=ret,
                          v_old=v_old), carry, idx)
    metrics = {k: jnp.mean(v) for k, v in m.items()}
    metrics["logp_mismatch_mean"] = m["logp_mismatch_mean"][0]
    metrics["logp_mismatch_max"] = m["logp_mismatch_max"][0]
    metrics["explained_variance"] = value_lib.explained_variance(v_old, ret,
                                                                 mask)
    metrics["gae_adv_mean"] = jnp.sum(raw_adv * mask) / jnp.maximum(
        jnp.sum(mask), 1)
    policy = TrainState(state.policy.step + 1, p_params, p_opt,
                        state.policy.rng)
    critic = TrainState(state.critic.step + 1, c_params, c_opt,
                        state.critic.rng)
    return PPOState(policy, critic), metrics

  return ppo_step
