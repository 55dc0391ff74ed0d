"""The experiment loop: SFT warm-up, then RL, with evaluation and checkpoints.

`run(config, workdir)` is what `python -m experiments.train` calls; notebooks
call it directly. It composes the library's pure pieces (task, tokenizer,
model, `generate`, method, update steps) and owns everything host-side:
logging, checkpoints, resumption and input checks.

Steps are counted globally: SFT steps 1..S, then RL steps S+1..S+R. A
checkpoint at step s holds the state after step s and every log line up to
step s, so a run resumed from it rewrites nothing it had already written and
ends with the same metrics as an uninterrupted run. Its metadata also holds
the rollout engine's host state and, for tasks read from a data stream
(gsm8k, math500), the stream's position, so a resumed run reads the same
records.

The task (`config.task.name`, see `rlax_llm.training.tasks`) gives the
tokenizer, problems and reward. Rewards run in this process or in a pool of
worker processes with a per-item deadline (`config.reward`); one pool serves
the whole run and is closed when it ends, also on error. Each RL step logs
`reward/errors` and `reward/timeouts`. With `config.model.hf_path` the
policy's architecture and initial weights come from a local Hugging Face
checkpoint.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rlax_llm.data import tasks as tasks_lib
from rlax_llm.experiment import config_utils
from rlax_llm.experiment import pipeline
from rlax_llm.experiment import setups as setups_lib
from rlax_llm.methods import Method
from rlax_llm.methods import get_method
from rlax_llm.methods import rollouts
from rlax_llm.methods import transforms
from rlax_llm.methods.engines import get_rollout
from rlax_llm.models import hf as hf_lib
from rlax_llm.models import lora as lora_lib
from rlax_llm.models.config import ModelConfig
from rlax_llm.parallel import distributed
from rlax_llm.parallel import mesh as mesh_lib
from rlax_llm.rewards import runner as runner_lib
from rlax_llm.sampling.generate import check_context
from rlax_llm.sampling.samplers import SamplerConfig
from rlax_llm.training import checkpoint as ckpt_lib
from rlax_llm.training import evaluation
from rlax_llm.training import metrics as metrics_lib
from rlax_llm.training import ppo as ppo_lib
from rlax_llm.training import state as state_lib
from rlax_llm.training import steps as steps_lib
from rlax_llm.training import scoring as scoring_lib
from rlax_llm.training.scoring import score_completions_jit


def _optimizer(section) -> optax.GradientTransformation:
  """Gradient clipping + AdamW with linear warm-up to a constant rate (or,
  with `lr_decay="cosine"`, a cosine decay to a tenth of it by `steps`).

  The rate is always a schedule, so the optimiser state has the same structure
  whatever the warm-up (checkpoints restore across such changes).
  """
  warmup = max(int(section.warmup_steps), 0)
  peak = float(section.learning_rate)
  decay = section.get("lr_decay", "constant")
  if decay == "constant":
    after = optax.constant_schedule(peak)
  elif decay == "cosine":  # to a tenth of the peak at the section's last step
    after = optax.cosine_decay_schedule(
        peak, max(int(section.steps) - warmup, 1), alpha=0.1)
  else:
    raise ValueError(f"lr_decay={decay!r}; choose 'constant' or 'cosine'.")
  lr = optax.join_schedules(
      [optax.linear_schedule(0.0 if warmup else peak, peak, max(warmup, 1)),
       after], [warmup])
  return optax.chain(
      optax.clip_by_global_norm(section.grad_clip if section.grad_clip > 0
                                else float("inf")),
      optax.adamw(lr, b1=0.9, b2=0.99, weight_decay=section.weight_decay))


# Model-section fields that apply on top of a Hugging Face config.json.
HF_OVERRIDES = ("max_seq_len", "dtype", "param_dtype", "remat", "lora_rank",
                "lora_alpha", "lora_targets")


def _model_config(section: ml_collections.ConfigDict,
                  vocab_size: int) -> ModelConfig:
  """The policy's ModelConfig: from `hf_path`'s config.json, or the fields.

  With `model.hf_path` set, the architecture comes from the checkpoint's
  config.json; of the section only `HF_OVERRIDES` apply.
  """
  hf_path = section.get("hf_path", "")
  if not hf_path:
    if "num_layers" not in section:
      raise ValueError(
          "config.model.hf_path is empty, and this config's model section "
          "describes no architecture of its own: pass "
          "--config.model.hf_path=/path/to/a/local/HF/checkpoint.")
    fields = {k: v for k, v in section.items()
              if k not in ("preset", "hf_path")}
    return ModelConfig(vocab_size=vocab_size, **fields)
  config_file = os.path.join(hf_path, hf_lib.CONFIG_NAME)
  if not os.path.isfile(config_file):
    raise FileNotFoundError(
        f"config.model.hf_path={hf_path!r} holds no {hf_lib.CONFIG_NAME}; "
        "pass a local directory with config.json, model.safetensors and "
        "tokenizer.json (a Hugging Face checkpoint; nothing is downloaded).")
  with open(config_file) as f:
    hf = json.load(f)
  cfg = hf_lib.config_from_hf(hf, **_hf_overrides(section))
  if cfg.vocab_size < vocab_size:
    raise ValueError(
        f"The checkpoint's vocab_size={cfg.vocab_size} is smaller than its "
        f"tokenizer's ({vocab_size}); tokenizer and weights do not match.")
  return cfg


def _hf_overrides(section) -> dict[str, Any]:
  return {k: section[k] for k in HF_OVERRIDES if k in section}


def _check_finite(metrics: dict[str, Any], step: int, last_ckpt: int | None):
  bad = [k for k, v in metrics.items()
         if np.issubdtype(np.asarray(v).dtype, np.floating)
         and not np.all(np.isfinite(v))]
  if bad:
    where = (f"the last good checkpoint (step {last_ckpt}) is intact"
             if last_ckpt is not None else "no checkpoint had been written")
    raise FloatingPointError(
        f"Non-finite values in {bad} at step {step}; training stopped and "
        f"{where}. Lower the learning rate or raise grad_clip, then re-run "
        "(a re-run resumes from that checkpoint).")


class Experiment:
  """One run in one workdir; see the module docstring.

  Args:
    config: the experiment config (`configs/base.py` and derived).
    workdir: where metrics, checkpoints and the summary go.
    method: a `methods.Method` to train with instead of `config.rl.method`
      (e.g. one a notebook builds); its name is logged with the config.
    engine: a `methods.rollouts.Engine` subclass instead of
      `config.rollout.name`'s.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, *,
               method: Method | None = None, engine: type | None = None):
    if method is not None:  # the run records the method it trains with
      config = ml_collections.ConfigDict(config.to_dict())
      config.rl.method = method.name
    config_utils.validate(config)
    self.config = c = config
    self.workdir = config_utils.prepare_workdir(workdir)
    self.setup = setups_lib.make_setup(c, self.workdir)
    tok = self.setup.tokenizer
    self.hf_path = c.model.get("hf_path", "")
    self.model_cfg = _model_config(c.model, tok.vocab_size)
    self.prompt_len = self.setup.prompt_len
    self.max_new_tokens = self.setup.max_new_tokens
    # Refuse prompts longer than the context before any compute.
    check_context(self.prompt_len, self.max_new_tokens,
                  self.model_cfg.max_seq_len)
    # The updates' mesh, and the one rollouts and evaluation decode on: the
    # same mesh, or in the "split" host layout (distributed.host_layout;
    # "auto" on a CPU-only host with several devices) the first device and a
    # data mesh over every device (`mesh.layout_meshes`).
    self.mesh, self.rollout_mesh = mesh_lib.layout_meshes(
        dict(c.mesh), str((c.get("distributed") or {}).get("host_layout",
                                                            "auto")))
    _check_batch_sizes(c, mesh_lib.batch_size_multiple(self.mesh))
    self.sampler = SamplerConfig(c.rl.temperature, c.rl.top_k, c.rl.top_p,
                                 c.rl.min_p).validate()
    chunk = int(c.rl.get("decode_chunk", -1))
    if chunk < -1:
      raise ValueError(f"rl.decode_chunk={chunk}: use -1 (automatic), 0 (all "
                       "rollouts at once) or a positive number of sequences.")
    self.decode_chunk = None if chunk == -1 else chunk
    self.method = method if method is not None else get_method(
        c.rl.method, clip_low=c.rl.clip_low, clip_high=c.rl.clip_high,
        dual_clip=c.rl.dual_clip or None, scale_by_std=c.rl.scale_by_std,
        group_baseline=c.rl.group_baseline, aggregation=c.rl.aggregation,
        max_new_tokens=self.max_new_tokens,
        token_level=bool(c.rl.token_level_advantages))
    self.sft_loss = _supervised_loss(c.sft)
    # With LoRA (model.lora_rank > 0) both phases train the adapters only.
    self.lora = bool(self.model_cfg.lora_rank)
    if self.lora and self.method.critic:
      raise ValueError(
          "config.model.lora_rank > 0 with rl.method='ppo': the critic is a "
          "full copy of the policy trunk, which LoRA does not train; use a "
          "critic-free method (grpo, rloo, ...) with LoRA, or lora_rank=0.")
    if self.lora and c.rl.ref_reset_every:
      raise ValueError(
          "config.rl.ref_reset_every with LoRA: the reference is the base "
          "model (adapters off), which never changes; set "
          "rl.ref_reset_every=0, or lora_rank=0 for a copied reference.")
    self.sft_opt = state_lib.lora_optimizer(_optimizer(c.sft), self.model_cfg)
    self.rl_opt = state_lib.lora_optimizer(_optimizer(c.rl), self.model_cfg)
    self.critic_opt = _optimizer(ml_collections.ConfigDict(dict(
        warmup_steps=c.rl.warmup_steps, learning_rate=c.rl.value_learning_rate,
        grad_clip=c.rl.grad_clip, weight_decay=c.rl.weight_decay)))
    self.graphdef = state_lib.model_graphdef(self.model_cfg)
    self.total_steps = c.sft.steps + c.rl.steps
    self.set_eval_split(c.eval.split)
    self.ckpt = ckpt_lib.Checkpointer(os.path.join(self.workdir,
                                                   "checkpoints"),
                                      max_to_keep=c.checkpoint.max_to_keep)
    self.key = jax.random.key(c.seed)
    self.use_ref = pipeline.uses_reference(c.rl)
    # LoRA's reference is free: the policy with its adapters off.
    self.copied_ref = self.use_ref and not self.model_cfg.lora_rank
    r = c.get("reward") or ml_collections.ConfigDict(dict(
        mode="auto", num_workers=2, timeout_s=10.0))
    if r.mode not in ("auto", "process", "inline"):
      raise ValueError(f"config.reward.mode={r.mode!r}; choose 'auto' (the "
                       "task's default), 'process' or 'inline'.")
    self.reward_cfg = r
    self.use_runner = (r.mode == "process" or (
        r.mode == "auto" and getattr(self.setup, "use_runner", False)))
    self._runner = None
    # Reward failures since the last `take_reward_counts()`.
    self.reward_counts = {"errors": 0, "timeouts": 0}
    engine_cls = engine or get_rollout(c.rollout.name)
    pipeline.check_options(c, self.method, engine_cls)
    self.engine = engine_cls.from_section(
        self.rollout_context()._replace(
            filter_rounds=pipeline.engine_filter_rounds(c, engine_cls)),
        c.rollout,
        **({"scale_by_std": bool(c.rl.scale_by_std)}
           if engine_cls.name == "branch" else {}))
    # An engine may widen the prompts (XRPO's in-context seeding).
    width = int(getattr(self.engine, "prompt_len", self.prompt_len))
    if width != self.prompt_len:
      check_context(width, self.max_new_tokens, self.model_cfg.max_seq_len)
    self.per_draw = pipeline.per_draw(c, self.max_new_tokens)
    self.chain = pipeline.build_chain(c, self.method, engine_cls)

  def rollout_context(self) -> rollouts.RolloutContext:
    """What the rollout engine uses (`rollouts.RolloutContext`)."""
    c = self.config
    return rollouts.RolloutContext(
        graphdef=self.graphdef, mesh=self.rollout_mesh, sampler=self.sampler,
        tokenizer=self.setup.tokenizer, task=self.setup.task,
        score=self.rewards, decode=self.decode, key=self.key,
        prompt_len=self.prompt_len, max_new_tokens=self.max_new_tokens,
        num_prompts=c.rl.prompts_per_step, num_samples=c.rl.num_samples,
        decode_chunk=self.decode_chunk, rl_start=c.sft.steps,
        vocab_size=self.model_cfg.vocab_size)

  def set_eval_split(self, split: str) -> None:
    """Encodes the held-out problems of `split` (eval.num_problems of them)."""
    c, tok = self.config, self.setup.tokenizer
    if hasattr(self.setup, "eval_set"):
      test = self.setup.eval_set(split, c.eval.num_problems)
    elif split == "test":
      test = self.setup.task.test_set(c.eval.num_problems)
    else:
      raise ValueError(f"Task {c.task.name!r} has only the 'test' split "
                       f"(config.eval.split={split!r}).")
    self.eval_split = split
    self.test_answers = [p.answer for p in test]
    self.test_prompts, self.test_mask = tok.encode_batch(
        [p.prompt for p in test], max_length=self.prompt_len)

  # -- pieces -------------------------------------------------------------------
  def decode(self, tokens_NT, mask_NT) -> list[str]:
    tok = self.setup.tokenizer
    tokens, mask = np.asarray(tokens_NT), np.asarray(mask_NT)
    # A pretrained model's vocabulary may have rows past the tokenizer's
    # (padding); such ids decode to nothing.
    mask = mask & (tokens < tok.vocab_size)
    return tok.decode_batch(tokens, mask)

  def reward_runner(self) -> runner_lib.RewardRunner:
    """The run's reward worker pool (started on first use; see `close`)."""
    if self._runner is None:
      self._runner = runner_lib.RewardRunner(
          self.setup.reward_item_fn, num_workers=self.reward_cfg.num_workers,
          timeout_s=self.reward_cfg.timeout_s)
    return self._runner

  def close(self) -> None:
    """Stops the reward workers (idempotent)."""
    if self._runner is not None:
      self._runner.close()
      self._runner = None

  def take_reward_counts(self) -> dict[str, int]:
    """Reward errors and timeouts since the last call (then reset)."""
    out = dict(self.reward_counts)
    self.reward_counts = {"errors": 0, "timeouts": 0}
    return out

  def rewards(self, texts, answers) -> tuple[np.ndarray, int]:
    """Scores texts; returns (reward_N, errors); never raises for an item.

    With the runner (`config.reward`), each item is scored in a worker
    process under a deadline; an item that raises, crashes its worker or
    runs past `reward.timeout_s` scores 0 and is counted (errors and
    timeouts in `reward_counts`). In-process, a batch reward function that
    raises is retried item by item; failing items score 0 and are counted.
    """
    if self.use_runner:
      kwargs = []
      for a in answers:
        try:
          kwargs.append(self.setup.reward_kwargs(a))
        except Exception:  # pylint: disable=broad-except
          kwargs.append({"_unreadable_reference": a})  # the item errors
      res = self.reward_runner().score(list(texts), kwargs)
      self.reward_counts["errors"] += res.errors
      self.reward_counts["timeouts"] += res.timeouts
      return np.asarray(res.rewards, np.float32), res.errors
    try:
      r = np.asarray(self.setup.reward_fn(texts, answers), np.float32)
      if r.shape != (len(texts),) or not np.all(np.isfinite(r)):
        raise ValueError(f"reward_fn returned {r.shape}, non-finite values "
                         "or the wrong count")
      return r, 0
    except Exception:  # pylint: disable=broad-except
      out = np.zeros(len(texts), np.float32)
      errors = 0
      for i, (t, a) in enumerate(zip(texts, answers)):
        try:
          v = float(np.asarray(self.setup.reward_fn([t], [a]))[0])
          if not np.isfinite(v):
            raise ValueError("non-finite reward")
          out[i] = v
        except Exception:  # pylint: disable=broad-except
          errors += 1
      self.reward_counts["errors"] += errors
      return out, errors

  def encode_sft(self, problems) -> steps_lib.SFTBatch:
    """(prompt, target + EOS) pairs; targets past the budget are cut."""
    tok = self.setup.tokenizer
    prompts = [q.prompt for q in problems]
    targets = [tok.encode(tasks_lib.sft_target(q), add_eos=True)
               [:self.max_new_tokens] for q in problems]
    width, t = self.prompt_len, self.max_new_tokens
    m = int(self.config.sft.get("pad_multiple", 0))
    if m > 0:  # the batch's own widths, rounded up (cut at the budgets)
      def up(n):
        return -(-max(n, 1) // m) * m
      width = min(width, up(max(len(tok.encode(x)) for x in prompts)))
      t = min(t, up(max(len(ids) for ids in targets)))
    p, pm = tok.encode_batch(prompts, max_length=width)
    a = np.full((len(problems), t), tok.pad_id, np.int32)
    am = np.zeros((len(problems), t), bool)
    for i, ids in enumerate(targets):
      a[i, :len(ids)] = ids
      am[i, :len(ids)] = True
    return steps_lib.SFTBatch(p, pm, a, am)

  def evaluate(self, params, step: int) -> dict[str, float]:
    c = self.config
    return evaluation.evaluate(
        self.graphdef, mesh_lib.onto_mesh(params, self.rollout_mesh),
        prompts_BP=self.test_prompts,
        prompt_mask_BP=self.test_mask, answers=self.test_answers,
        decode=self.decode, reward_fn=lambda t, a: self.rewards(t, a)[0],
        rng=jax.random.fold_in(jax.random.fold_in(self.key, 7), step),
        max_new_tokens=self.max_new_tokens,
        eos_id=self.setup.tokenizer.eos_id, pad_id=self.setup.tokenizer.pad_id,
        num_samples=c.eval.num_samples, sampler=self.sampler,
        batch_size=c.eval.batch_size, mesh=self.rollout_mesh,
        decode_chunk=self.decode_chunk)

  # -- the RL-phase state: TrainState or PPOState, with a reference ----------
  def rl_state_shardings(self):
    """(abstract state, shardings) of the RL phase."""
    c = self.config
    if self.method.critic:
      abstract, sh = ppo_lib.ppo_state_shardings(
          self.model_cfg, self.rl_opt, self.critic_opt, self.mesh,
          seed=c.seed)
    else:
      abstract, sh = state_lib.state_shardings(self.model_cfg, self.rl_opt,
                                               self.mesh, seed=c.seed)
    if self.copied_ref:
      p_abs, p_sh = _policy_of(abstract).params, _policy_of(sh).params
      return state_lib.RefState(abstract, p_abs), state_lib.RefState(sh, p_sh)
    return abstract, sh

  def to_rl_state(self, sft_state, rl_sh):
    """The SFT -> RL switch: fresh optimiser (a critic for PPO, and the
    reference: a frozen copy of the policy on the same shardings)."""
    inner_sh = rl_sh.train if self.copied_ref else rl_sh
    if self.method.critic:
      inner = ppo_lib.to_ppo_state(sft_state, self.rl_opt, self.critic_opt,
                                   inner_sh, self.model_cfg.embed_dim)
    else:
      inner = state_lib.reset_optimizer(sft_state, self.rl_opt, inner_sh)
    if not self.copied_ref:
      return inner
    return state_lib.RefState(inner, self.copy_policy(inner, rl_sh.ref))

  @staticmethod
  def copy_policy(inner, shardings):
    """A copy of the policy's parameters (new buffers) on `shardings`."""
    return jax.jit(lambda p: jax.tree.map(jnp.copy, p),
                   out_shardings=shardings)(_policy_of(inner).params)

  @staticmethod
  def policy_params(state):
    return _policy_of(state).params

  def make_rl_step(self, prompt_group: int = 1):
    """The update step of the config's method (`steps.make_rl_step` or
    `ppo.make_ppo_step`), scoring groups of `prompt_group` rows that share
    a prompt once per prompt when > 1 (see `jit_rl_step`)."""
    c = self.config
    common = dict(temperature=c.rl.temperature, num_epochs=c.rl.num_epochs,
                  num_minibatches=c.rl.num_minibatches,
                  num_microbatches=c.rl.num_microbatches,
                  length_buckets=c.rl.get("length_buckets", 0),
                  logprob_chunk=c.rl.get("logprob_chunk", 0),
                  vocab_chunk=c.rl.get("vocab_chunk", 0) or None,
                  entropy_coef=c.rl.entropy_coef, mesh=self.mesh,
                  prompt_group=prompt_group,
                  **pipeline.update_options(
                      c, self.method, max_new_tokens=self.max_new_tokens))
    if self.use_ref and self.lora:
      common["ref_fn"] = lora_lib.zero_adapters
    if self.method.critic:
      return ppo_lib.make_ppo_step(
          self.graphdef, self.rl_opt, self.critic_opt,
          self.method.policy_loss, gamma=c.rl.gamma, lam=c.rl.gae_lambda,
          value_coef=c.rl.value_coef, value_clip=c.rl.value_clip or None,
          aggregation=c.rl.aggregation, **common)
    return steps_lib.make_rl_step(self.graphdef, self.rl_opt,
                                  self.method.policy_loss, **common)

  def jit_rl_step(self, shardings):
    """`rl_step(state, batch) -> (state, metrics)`, compiled (`jit_step`).

    With `rl.share_prompt` on (`config_utils.prompt_group` G > 1), a batch
    whose rows come in groups of G sharing one prompt
    (`scoring.prompt_groups_shared`, checked on the host) takes the update
    that runs each prompt's layers once per group; any other batch (XRPO's
    seeded or compacted rows) takes the plain update. The metric
    `shared_prompt` (1 or 0) says which ran.
    """
    g = config_utils.prompt_group(self.config)
    plain = steps_lib.jit_step(self.make_rl_step(), shardings, self.mesh)
    if g == 1:
      return plain
    shared = steps_lib.jit_step(self.make_rl_step(prompt_group=g), shardings,
                                self.mesh)

    def call(state, batch):
      if scoring_lib.prompt_groups_shared(batch.prompt, batch.prompt_mask, g):
        state, metrics = shared(state, batch)
        return state, dict(metrics, shared_prompt=np.float32(1))
      state, metrics = plain(state, batch)
      return state, dict(metrics, shared_prompt=np.float32(0))
    return call

  def data_metrics(self) -> dict[str, float]:
    """The train stream's data/... metrics of this step (if it has any)."""
    if hasattr(self.setup, "step_metrics"):
      return self.setup.step_metrics()
    return {}

  def ref_logp_fn(self, ref_params):
    """Groups -> [B, G, T] reference log-probs (for the KL in the reward)."""
    score_fn = functools.partial(
        score_completions_jit, self.graphdef,
        temperature=self.config.rl.temperature,
        chunk_size=self.config.rl.get("logprob_chunk", 0),
        vocab_chunk=self.config.rl.get("vocab_chunk", 0) or None)

    # Whole groups are scored here, so the update's layout does not matter:
    # only whether a draw's groups share their prompt.
    share = self.config.rl.get("share_prompt", "off") != "off"

    def score(groups: rollouts.Groups) -> np.ndarray:
      b, g, t = groups.tokens.shape
      prompt_NP, prompt_mask_NP = rollouts.row_prompts(groups)
      shared = share and g > 1 and scoring_lib.prompt_groups_shared(
          prompt_NP, prompt_mask_NP, g)
      out = score_fn(
          ref_params, prompt_NP, prompt_mask_NP,
          groups.tokens.reshape(b * g, t), groups.mask.reshape(b * g, t),
          prompt_group=g if shared else 1)
      return np.asarray(jax.device_get(out.logp)).reshape(b, g, t)

    return score

  def rollout(self, state_or_params, step: int):
    """The RLBatch and statistics of global step `step`: the engine's groups
    through the per-draw transforms and the chain."""
    state = state_or_params
    params = (self.policy_params(state)
              if isinstance(state, (state_lib.TrainState, ppo_lib.PPOState,
                                    state_lib.RefState)) else state)
    ref = state.ref if isinstance(state, state_lib.RefState) else None
    if ref is None and self.use_ref and self.lora:
      ref = lora_lib.zero_adapters(params)  # the base model

    def draw(k: int) -> rollouts.Groups:
      groups = self.engine.rollout(params, step, k)
      for f in self.per_draw:
        groups = f(groups)
      return groups

    ctx = transforms.StepContext(
        engine=self.engine, draw=draw,
        ref_logp=None if ref is None else self.ref_logp_fn(ref),
        step=step, rl_step=step - self.config.sft.steps)
    work = transforms.apply_chain(self.chain, draw(0), ctx)
    rl = self.config.rl
    batch = transforms.to_batch(work, rows=rl.prompts_per_step * rl.num_samples)
    frac = pipeline.token_fraction(self.config, ctx.rl_step)
    if frac is not None:
      batch = batch._replace(token_fraction=np.full(
          batch.completion.shape[:1], frac, np.float32))
      work.stats["rollout/d3s_token_fraction"] = frac
    return batch, work.stats

  # -- the loop -----------------------------------------------------------------
  def initial_state(self):
    """(TrainState, shardings) of a fresh run, on the SFT phase's shardings.

    With `model.hf_path` the parameters are the checkpoint's, streamed onto
    their shardings tensor by tensor; otherwise a seeded random init.
    """
    c = self.config
    if not self.hf_path:
      return state_lib.create_train_state(self.model_cfg, self.sft_opt,
                                          self.mesh, seed=c.seed)
    _, sh = state_lib.state_shardings(self.model_cfg, self.sft_opt, self.mesh,
                                      seed=c.seed)
    cfg, params = hf_lib.load_params(
        self.hf_path, dtype=self.model_cfg.dtype,
        param_dtype=self.model_cfg.param_dtype, mesh=self.mesh,
        rules=mesh_lib.DEFAULT_RULES, **{
            k: v for k, v in _hf_overrides(c.model).items()
            if k not in ("dtype", "param_dtype")})
    if cfg != self.model_cfg:
      raise ValueError(f"{self.hf_path!r} changed while the run started: "
                       f"{cfg} != {self.model_cfg}.")
    opt, seed = self.sft_opt, c.seed

    def init(p):
      return state_lib.TrainState(
          step=jax.numpy.zeros((), jax.numpy.int32), params=p,
          opt_state=opt.init(p),
          rng=jax.random.key_data(jax.random.key(seed)))

    state = jax.jit(init, out_shardings=sh, donate_argnums=0)(params)
    return state, sh

  def run(self) -> dict[str, Any]:
    try:
      return _Loop(self).run()
    finally:
      self.close()


class _Loop:
  """The run loop of one `Experiment`: restore, SFT, the switch, RL."""

  def __init__(self, exp: Experiment):
    self.exp = exp
    c = exp.config
    self.t_start = time.time()
    self.latest = exp.ckpt.latest_step()
    config_utils.check_resume_config(exp.workdir, c,
                                     resuming=self.latest is not None)
    self.sft_abstract, self.sft_sh = state_lib.state_shardings(
        exp.model_cfg, exp.sft_opt, exp.mesh, seed=c.seed)
    self.rl_abstract, self.rl_sh = exp.rl_state_shardings()
    self.meta: dict[str, Any] = {"phase": "sft"}
    self.last_ckpt = self.latest
    self.primary = distributed.is_primary()

  def restore(self):
    exp = self.exp
    if self.latest is None:
      state, self.sft_sh = exp.initial_state()
      return state, 0
    meta = exp.ckpt.restore_meta(self.latest)
    abstract, sh = ((self.rl_abstract, self.rl_sh) if meta["phase"] == "rl"
                    else (self.sft_abstract, self.sft_sh))
    state, self.meta = exp.ckpt.restore(self.latest, abstract, sh)
    exp.engine.load_state_dict(self.meta.get("rollout_state"))
    if hasattr(exp.setup, "load_state_dict"):
      exp.setup.load_state_dict(self.meta.get("data_state"))
    return state, self.latest

  def save(self, step, state):
    exp = self.exp
    self.writer.flush()
    meta = dict(self.meta, rollout_state=exp.engine.state_dict())
    if hasattr(exp.setup, "state_dict"):  # the train stream's position
      meta["data_state"] = exp.setup.state_dict()
    exp.ckpt.save(step, state, meta)
    self.last_ckpt = step

  def log_eval(self, step, state):
    res = self.exp.evaluate(self.exp.policy_params(state), step)
    self.writer.write(step, {f"eval/{k}": v for k, v in res.items()})
    return res

  def sft_phase(self, state, step):
    exp, c = self.exp, self.exp.config
    sft_step = steps_lib.jit_step(
        steps_lib.make_sft_step(exp.graphdef, exp.sft_opt,
                                loss_fn=exp.sft_loss), self.sft_sh, exp.mesh)
    # Optional cross-entropy warm-up before another supervised objective.
    ce_step = steps_lib.jit_step(
        steps_lib.make_sft_step(exp.graphdef, exp.sft_opt), self.sft_sh,
        exp.mesh) if c.sft.ce_warmup_steps else None
    while step < c.sft.steps:
      t0 = time.time()
      batch = exp.encode_sft(exp.setup.task.train_batch(step,
                                                        c.sft.batch_size))
      warm = ce_step is not None and step < c.sft.ce_warmup_steps
      state, m = (ce_step if warm else sft_step)(state, batch)
      m = jax.device_get(m)
      step += 1
      _check_finite(m, step, self.last_ckpt)
      rec = {f"sft/{k}": v for k, v in m.items()}
      rec.update(exp.data_metrics())
      rec["time/step_s"] = time.time() - t0
      self.writer.write(step, rec)
      self.bar.update(1)
      self.bar.set_postfix(loss=f"{float(m['loss']):.3f}")
      if step < c.sft.steps and step % c.checkpoint.every == 0:
        self.save(step, state)
    return state, step

  def switch(self, state, step):
    """SFT -> RL, exactly once: evaluate, build the RL state, checkpoint."""
    res = self.log_eval(step, state)
    self.meta = {"phase": "rl", "sft_accuracy": res["accuracy"],
                 "sft_eval": res, "last_eval": res, "last_eval_step": step}
    state = self.exp.to_rl_state(state, self.rl_sh)
    self.save(step, state)
    self.bar.set_postfix(acc=f"{res['accuracy']:.3f}")
    return state

  def rl_phase(self, state, step):
    exp, c = self.exp, self.exp.config
    rl_step = exp.jit_rl_step(self.rl_sh)
    every = int(c.rl.ref_reset_every)
    while step < exp.total_steps:
      t0 = time.time()
      rl_done = step - c.sft.steps
      if every and rl_done and rl_done % every == 0:
        # ProRL's reference reset: the reference becomes the current policy.
        state = state._replace(ref=exp.copy_policy(state.train,
                                                    self.rl_sh.ref))
      exp.take_reward_counts()
      batch, stats = exp.rollout(state, step)
      t1 = time.time()
      counts = exp.take_reward_counts()
      stats = dict(stats, **{f"reward/{k}": v for k, v in counts.items()})
      stats.update(exp.data_metrics())
      state, m = rl_step(state, batch)
      m = jax.device_get(m)
      step += 1
      _check_finite(m, step, self.last_ckpt)
      rec = dict(stats)
      rec.update({f"rl/{k}": v for k, v in m.items()})
      rec["time/rollout_s"] = t1 - t0
      rec["time/step_s"] = time.time() - t0
      self.writer.write(step, rec)
      self.bar.update(1)
      rl_done = step - c.sft.steps
      if rl_done % c.eval.every == 0 or step == exp.total_steps:
        res = self.log_eval(step, state)
        self.meta = dict(self.meta, last_eval=res, last_eval_step=step)
        self.bar.set_postfix(reward=f"{stats['reward/mean']:.3f}",
                             acc=f"{res['accuracy']:.3f}")
      else:
        self.bar.set_postfix(reward=f"{stats['reward/mean']:.3f}")
      if step % c.checkpoint.every == 0 or step == exp.total_steps:
        self.save(step, state)
    return state, step

  def run(self) -> dict[str, Any]:
    exp, c = self.exp, self.exp.config
    state, step = self.restore()
    self.writer = metrics_lib.MetricWriter(exp.workdir, resume_step=self.latest,
                                           enabled=self.primary)
    self.bar = _progress(c.progress and self.primary, exp.total_steps, step)
    try:
      state, step = self.sft_phase(state, step)
      if self.meta["phase"] == "sft":
        state = self.switch(state, step)
      state, step = self.rl_phase(state, step)
    finally:
      self.bar.close()
      self.writer.close()
    meta = self.meta
    summary = {
        "sft_accuracy": meta["sft_accuracy"],
        "final_accuracy": meta["last_eval"]["accuracy"],
        "sft_eval": meta["sft_eval"],
        "final_eval": meta["last_eval"],
        "steps": exp.total_steps,
        "seed": c.seed,
        "wall_time_s": time.time() - self.t_start,
    }
    if self.primary:  # one writer in a multi-process run
      tmp = os.path.join(exp.workdir, "summary.json.tmp")
      with open(tmp, "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
      os.replace(tmp, os.path.join(exp.workdir, "summary.json"))
    exp.state = state
    return summary


def _policy_of(state):
  """The policy TrainState inside an RL state (RefState, PPOState)."""
  if isinstance(state, state_lib.RefState):
    state = state.train
  if isinstance(state, ppo_lib.PPOState):
    state = state.policy
  return state


def _check_batch_sizes(c, mult: int) -> None:
  for name, size in (("sft.batch_size", c.sft.batch_size),
                     ("rl.prompts_per_step * rl.num_samples",
                      c.rl.prompts_per_step * c.rl.num_samples)):
    if size % mult:
      raise ValueError(f"{name}={size} must divide by the {mult} devices "
                       "the batch is sharded over (mesh data x fsdp).")
  n = c.rl.prompts_per_step * c.rl.num_samples
  if n % (c.rl.num_minibatches * c.rl.num_microbatches):
    raise ValueError(
        f"rl.prompts_per_step * rl.num_samples = {n} rollouts do not split "
        f"into rl.num_minibatches={c.rl.num_minibatches} x "
        f"rl.num_microbatches={c.rl.num_microbatches}; pick sizes whose "
        "product divides it.")


def _supervised_loss(sft):
  """The SFT phase's `SupervisedLoss` from the config's sft section."""
  if sft.loss not in steps_lib.SUPERVISED_LOSSES:
    raise ValueError(f"Unknown sft.loss {sft.loss!r}; choose one of "
                     f"{sorted(steps_lib.SUPERVISED_LOSSES)}.")
  loss = steps_lib.SUPERVISED_LOSSES[sft.loss]
  aggregation = sft.get("aggregation", "token_mean")
  if sft.loss == "otr":
    return functools.partial(loss, num_candidates=sft.otr_num_candidates,
                             kappa=sft.otr_kappa, beta=sft.otr_beta,
                             aggregation=aggregation)
  if sft.loss == "otr_exact":
    return functools.partial(loss, kappa=sft.otr_kappa, beta=sft.otr_beta,
                             aggregation=aggregation)
  return functools.partial(loss, aggregation=aggregation)


def _progress(enabled: bool, total: int, initial: int):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=initial, disable=not enabled,
              desc="train", unit="step", dynamic_ncols=True)


def run(config: ml_collections.ConfigDict, workdir: str, *,
        method: Method | None = None,
        engine: type | None = None) -> dict[str, Any]:
  """Runs (or resumes) the experiment `config` in `workdir`; returns the
  summary. `method` / `engine` replace the config's (see `Experiment`)."""
  return Experiment(config, workdir, method=method, engine=engine).run()


def trained_experiment(config: ml_collections.ConfigDict,
                       workdir: str) -> "Experiment":
  """The `Experiment` of an existing run's workdir (close it when done).

  FileNotFoundError, naming the training command, when `workdir` holds no
  checkpoints/ (nothing is created there then).
  """
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise FileNotFoundError(
        f"No checkpoints under {workdir!r}; train first with "
        f"`python -m experiments.train --workdir={workdir}`.")
  return Experiment(config, workdir)


def restore_policy(exp: "Experiment") -> tuple[int, Any]:
  """(step, policy params) of the latest checkpoint of `exp`'s workdir.

  Works for SFT and RL checkpoints (the RL state's layout comes from the
  method, e.g. with a critic). FileNotFoundError when there is none.
  """
  latest = exp.ckpt.latest_step()
  if latest is None:
    raise FileNotFoundError(
        f"{os.path.join(exp.workdir, 'checkpoints')!r} holds no complete "
        "checkpoint; train first with `python -m experiments.train`.")
  meta = exp.ckpt.restore_meta(latest)
  if meta.get("phase") == "rl":
    abstract, sh = exp.rl_state_shardings()
  else:
    abstract, sh = state_lib.state_shardings(exp.model_cfg, exp.sft_opt,
                                             exp.mesh, seed=exp.config.seed)
  state, _ = exp.ckpt.restore(latest, abstract, sh)
  return latest, exp.policy_params(state)


# Tokenizer files of a Hugging Face checkpoint, copied along on export.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "generation_config.json")


def export_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                      out_dir: str) -> int:
  """Writes the latest checkpoint's policy in `workdir` as a Hugging Face
  checkpoint in `out_dir` (config.json, model.safetensors and the
  tokenizer: the run's own character vocabulary, or the files of the
  `model.hf_path` it started from), loadable with `model.hf_path=out_dir`.
  Returns the checkpoint's step."""
  exp = trained_experiment(config, workdir)
  try:
    step, params = restore_policy(exp)
    hf_lib.save_pretrained((exp.model_cfg, params), out_dir)
    tok = exp.setup.tokenizer
    source = config.model.get("hf_path", "")
    if hasattr(tok, "save_pretrained"):
      tok.save_pretrained(out_dir)
    elif source:
      import shutil  # pylint: disable=g-import-not-at-top
      for name in _TOKENIZER_FILES:
        if os.path.isfile(os.path.join(source, name)):
          shutil.copyfile(os.path.join(source, name),
                          os.path.join(out_dir, name))
    else:
      raise ValueError(
          f"The tokenizer of {workdir!r} ({type(tok).__name__}) cannot be "
          "written and the run has no model.hf_path to copy it from.")
  finally:
    exp.close()
  return int(step)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *,
                        split: str | None = None) -> dict[str, Any]:
  """Evaluates the latest checkpoint in `workdir` on a split.

  Greedy accuracy, pass@1 and pass@G (unbiased estimator over G samples) and
  maj@G on `eval.num_problems` problems of `split` (default
  `config.eval.split`). Writes `eval_step<N>.json` (for the config's split)
  or `eval_<split>_step<N>.json` (another split) and returns the result.
  """
  exp = trained_experiment(config, workdir)
  workdir = exp.workdir
  try:
    split = split or config.eval.split
    if split != exp.eval_split:
      exp.set_eval_split(split)
    latest, params = restore_policy(exp)
    result = {"step": latest, "split": split,
              "num_problems": len(exp.test_answers),
              **exp.evaluate(params, latest)}
    result["reward/errors"] = exp.reward_counts["errors"]
    result["reward/timeouts"] = exp.reward_counts["timeouts"]
  finally:
    exp.close()
  name = (f"eval_step{latest}.json" if split == config.eval.split
          else f"eval_{split}_step{latest}.json")
  path = os.path.join(workdir, name)
  if distributed.is_primary():
    with open(path + ".tmp", "w") as f:
      json.dump(result, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
  return result
