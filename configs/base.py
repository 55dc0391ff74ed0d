"""Base configuration every experiment config derives from.

Not run directly: experiment files import `get_config` from here and override
fields. Every field is documented where it is set.
"""

import ml_collections

from rlax_llm.models.config import PRESETS


def model_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  """The model section: a preset's fields, each overridable on the command line."""
  fields = dict(num_layers=2, embed_dim=128, num_heads=4, num_kv_heads=2,
                head_dim=32, mlp_dim=384, max_seq_len=64, rope_theta=10_000.0,
                norm_eps=1e-6, qkv_bias=False, tie_embeddings=True,
                init_std=0.02)
  fields.update(PRESETS[preset])
  # LoRA: adapters of this rank on the listed projections; the base weights
  # stay frozen and the KL reference is the model with adapters off. 0: off.
  fields.update(lora_rank=0, lora_alpha=16.0,
                lora_targets=("q", "k", "v", "o", "gate", "up", "down"))
  return ml_collections.ConfigDict(dict(preset=preset, **fields))


def get_config(arg=None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds the model init, every rollout and the task's problems.

  # The task: synthetic arithmetic "a<op>b=" -> answer, EOS.
  c.task = ml_collections.ConfigDict(dict(
      name="arithmetic",
      min_digits=1,
      max_digits=2,
      ops="+-*",          # any of "+", "-", "*"
      mul_max_digits=2,   # cap on "*" operand digits
      test_fraction=0.1,  # share of the problem space held out for test
      max_new_tokens=0,   # completion budget; 0 = longest answer + EOS
  ))

  c.model = model_config("tiny")

  # Supervised warm-up on (prompt, answer + EOS).
  c.sft = ml_collections.ConfigDict(dict(
      steps=1500,
      batch_size=64,
      learning_rate=1e-3,
      warmup_steps=20,
      weight_decay=0.0,
      grad_clip=1.0,
      loss="cross_entropy",  # or "dft", "otr" (One-Token Rollout, K sampled
                             # candidates), "otr_exact" (its expectation)
      aggregation="token_mean",  # or "seq_mean_token_mean" (per sequence)
      ce_warmup_steps=0,     # cross-entropy steps before `loss` takes over
      otr_num_candidates=8,  # OTR: K candidate tokens per position
      otr_kappa=1.2,         # OTR: candidate sampling temperature
      otr_beta=-0.1,         # OTR: reward of a candidate that misses
      lr_decay="constant",   # or "cosine" (to 0.1x the peak at the last step)
      pad_multiple=0,        # >0: pad each batch to its longest prompt and
                             # target, rounded up to this multiple (fewer
                             # padded tokens for long-tailed targets; one
                             # compile per width); 0: the full budget
  ))

  # RL phase.
  c.rl = ml_collections.ConfigDict(dict(
      method="grpo",
      steps=300,
      prompts_per_step=64,   # B
      num_samples=16,         # G
      temperature=1.0,
      top_k=0,
      top_p=1.0,
      min_p=0.0,
      learning_rate=3e-4,
      warmup_steps=20,
      weight_decay=0.0,
      grad_clip=1.0,
      num_epochs=1,          # passes over each rollout batch
      num_minibatches=1,     # optimiser updates per pass (1: on-policy)
      num_microbatches=1,    # gradient accumulation per update
      length_buckets=0,      # >0: rows ordered by completion length, each
                             # micro-batch run at the smallest of this many
                             # widths holding its rows (same update, fewer
                             # padded tokens; most with num_microbatches > 1)
      share_prompt="auto",   # run each group's prompt once when scoring
                             # its rows (update, critic, reference): "auto"
                             # where the update's layout allows
                             # (num_minibatches=1, no length buckets, whole
                             # groups per micro-batch), "on" (refused where
                             # it does not), "off"
      clip_low=0.2,
      clip_high=0.2,
      dual_clip=0.0,         # 0 disables
      scale_by_std=True,     # False: Dr.GRPO advantages
      group_baseline=True,   # REINFORCE++: subtract the group mean first
      aggregation="token_mean",
      entropy_coef=0.0,
      decode_chunk=-1,       # rollouts decoded at once per device: -1
                             # automatic (a bounded cache on a CPU), 0 all
      logprob_chunk=0,       # >0: score tokens this many at a time without
                             # building the [N, T, V] logits
      vocab_chunk=0,         # with logprob_chunk: vocabulary block; 0 = all
      dynamic_sampling=False,  # DAPO: replace groups whose rewards all agree
      max_sampling_rounds=16,  # draws per step at most for that (the first
                               # included); then masked groups fill the rest
      overlong_buffer=0,       # DAPO soft overlong punishment over the last
                               # this many tokens of the budget; 0 disables
      # PPO (method "ppo") only: the critic and GAE.
      value_learning_rate=1e-3,
      value_coef=0.5,
      value_clip=0.2,          # 0 disables the value clip
      gamma=1.0,
      gae_lambda=0.95,
      xrpo_lambda=0.0,         # XRPO advantage sharpening scale; 0 disables
      xrpo_kappa_clip=0.5,     # XRPO: bonus capped at this fraction of A
      xrpo_novelty="mean",     # XRPO novelty s(y): "mean" token log-prob
                               # (length-normalised, the paper's) or "sum"
      d3s_sample_keep=0,       # D^3S: rollouts kept per group (max advantage
                               # variance); 0 keeps all
      d3s_token_fraction=1.0,  # D^3S: share of tokens kept by |A| x entropy
                               # at the first RL step; 1 keeps all
      d3s_token_fraction_end=1.0,  # ... after d3s_schedule_steps RL steps
      d3s_schedule_steps=0,    # linear schedule length; 0 constant
      token_level_advantages=False,  # REINFORCE++: verl's token-level
                               # returns whitened over the batch's tokens
      # The reference policy: a frozen copy of the RL phase's initial policy.
      kl_coef=0.0,             # beta of KL(pi || pi_ref); 0: no reference
      kl_estimator="k3",       # "k1" | "k2" | "k3" (Schulman's estimators)
      kl_in_reward=False,      # KL in the reward (REINFORCE++) instead of a
                               # loss term
      ref_reset_every=0,       # RL steps between reference resets (ProRL);
                               # 0 never
      # Old log-probs and the sampler / trainer gap.
      recompute_old_logp=False,  # PPO ratio against the trainer's log-probs
                                 # at the step's start (not the sampler's)
      rollout_correction="none",  # "tis" (truncate) | "mis" (mask) | "none"
      rollout_correction_level="token",  # or "sequence"
      rollout_correction_cap=2.0,        # the ratio threshold C
  ))

  # How rollouts are produced: "sample" draws rl.num_samples independent
  # completions per prompt. Tree and partial-rollout engines (configs
  # latr_arith, branch_arith, april_arith) replace this section with their
  # own fields. "xrpo" (configs/xrpo.py; off here) spreads a budget of
  # prompts_per_step * num_samples rollouts over the prompts in phases by
  # XRPO's priority and seeds all-wrong prompts with solved examples; its
  # fields are listed in rlax_llm/methods/xrpo.py.
  c.rollout = ml_collections.ConfigDict(dict(name="sample"))

  c.eval = ml_collections.ConfigDict(dict(
      every=50,           # RL steps between held-out evaluations
      num_problems=512,
      num_samples=8,      # group size G of pass@G
      batch_size=256,
      split="test",       # the held-out split scored (gsm8k also has "train")
  ))

  # How rewards are computed. "auto": the task's default (arithmetic in this
  # process; countdown, gsm8k, math500 in worker processes, each item under
  # a deadline); "process" or "inline" force one. A worker item that raises,
  # crashes or passes the deadline scores 0 and is logged as reward/errors
  # or reward/timeouts; training goes on.
  c.reward = ml_collections.ConfigDict(dict(
      mode="auto",
      num_workers=2,
      timeout_s=10.0,     # per item
  ))

  c.checkpoint = ml_collections.ConfigDict(dict(
      every=250,          # steps (SFT and RL counted together)
      max_to_keep=2,
  ))

  # Device mesh (-1 fills with the remaining devices).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  # Multi-process start-up (rlax_llm/parallel/LAUNCHING.md). "auto" joins a
  # SLURM `srun` step or a Cloud TPU pod by itself, or uses the coordinator
  # below (or RLAX_COORDINATOR_ADDRESS, RLAX_NUM_PROCESSES, RLAX_PROCESS_ID);
  # with none of these the run is one process.
  c.distributed = ml_collections.ConfigDict(dict(
      method="auto",              # "auto", "none", "explicit", "slurm", "tpu"
      coordinator_address="",     # "host:port" of process 0
      num_processes=0,            # 0: from the environment
      process_id=-1,              # -1: from the environment
      local_device_ids="",        # e.g. "0,1"; "" = every local device
      coordinator_port=0,         # SLURM: 0 derives it from the job id
      initialization_timeout=300,  # seconds to wait for every process
      cpu_collectives="gloo",     # cross-process collectives on CPU
      host_devices=-1,            # CPU hosts: JAX devices per process; -1 one
                                  # per core (rollouts decode on every core),
                                  # 0 JAX's default single device
      host_memory="auto",         # "reuse": XLA's CPU programs reuse their
                                  # scratch memory between calls instead of
                                  # faulting in fresh pages (glibc malloc
                                  # settings; one CPU device only); "auto"
                                  # where that holds on a CPU-only host,
                                  # "default" leaves malloc alone
      host_layout="auto",         # "split": the updates on the first device
                                  # alone, rollouts (sample, xrpo engines)
                                  # and evaluation on a data mesh over every
                                  # device (a CPU host: decode a device per
                                  # core, reuse the update's memory);
                                  # "shared": one mesh for all; "auto": split
                                  # for one CPU-only process with several
                                  # devices and fsdp = tensor = 1
  ))

  c.progress = True  # a progress bar with ETA on stderr
  return c
