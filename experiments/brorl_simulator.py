"""BroRL's token-level simulator: which correct tokens gain probability, by N.

  python -m experiments.brorl_simulator [--vocab=128000] [--correct=10000] \
      [--steps=1000] [--rollouts=4,16,64,256,1024,4096,16384,51200] \
      [--lr=1.0] [--init_std=1.0] [--seed=0] [--update=theorem] \
      [--reward_correct=1.0] [--reward_wrong=-1.0]

A softmax policy p = softmax(z) over a vocabulary of V tokens, of which the
first C are "correct" (BroRL: Scaling Reinforcement Learning via Broadened
Exploration, Hu et al., arXiv:2510.01180, the mass-balance analysis and its
simulations). Each step samples N tokens from p; A and B are the sets of
distinct correct and incorrect tokens sampled, U the rest, and token i has
reward R_i = R_c (correct) or R_w (incorrect), R_c >= 0 >= R_w.

`--update=theorem` (default) takes the step of the paper's Theorem 1 (mass
balance, one-step RL):

  dz_i = (lr / N) p_i (R_i 1[i in A u B] - S_R),
  S_R  = sum_{i in A u B} R_i p_i = R_c P_pos + R_w P_neg,

with P_pos, P_neg the probability masses of the sampled correct and incorrect
tokens; it is the gradient step lr / N * grad_z sum_{i in A u B} R_i p_i. To
first order in lr the correct mass Q_pos = sum_{i correct} p_i changes by

  dQ_pos = (lr / N) [(R_c - S_R) Q_neg A_2 + (S_R - R_w) Q_pos B_2
                     + S_R (Q_pos U_neg,2 - Q_neg U_pos,2)],

A_2 = sum_{i in A} p_i^2, B_2 = sum_{i in B} p_i^2, U_pos,2 and U_neg,2 the
same over the unsampled correct and incorrect tokens (tests check the
simulator's step against this closed form).

`--update=reinforce` is a labelled variant, not the theorem: the exact
count-weighted REINFORCE step z <- z + (lr / N) sum_k R_{y_k} (e_{y_k} - p)
= z + (lr / N) (c * R - (sum_k c_k R_k) p), c[i] counting how often token i
was sampled. Its dQ_pos is larger by a factor of the order of 1 / p_i.

Logits start i.i.d. N(0, init_std^2). After `steps` steps the script reports,
for each N, the fraction of correct tokens whose probability is higher than
at the start and the correct mass before and after. It runs in float64: the
theorem's per-token steps (lr / N) p_i are below float32's resolution of
logits near 1 for a large vocabulary. Sampling uses inverse-CDF search
(O(V + N log V) per step), the step is jitted and the steps run under
`lax.scan`. Prints a markdown table and one JSON object per N.
"""

from __future__ import annotations

import functools
import json
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(_HERE) not in sys.path:
  sys.path.insert(0, os.path.dirname(_HERE))

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

UPDATES = ("theorem", "reinforce")

# Own flag registry: importing this module next to other launchers (tests,
# notebooks) defines no global flags.
_FLAGS = flags.FlagValues()
_VOCAB = flags.DEFINE_integer("vocab", 128_000, "V, vocabulary size.", flag_values=_FLAGS)
_CORRECT = flags.DEFINE_integer("correct", 10_000, "C, correct tokens.", flag_values=_FLAGS)
_STEPS = flags.DEFINE_integer("steps", 1000, "Policy-gradient steps.", flag_values=_FLAGS)
_ROLLOUTS = flags.DEFINE_list(
    "rollouts", ["4", "16", "64", "256", "1024", "4096", "16384", "51200"],
    "N values, rollouts per step.", flag_values=_FLAGS)
_LR = flags.DEFINE_float("lr", 1.0, "Learning rate on the logits.", flag_values=_FLAGS)
_STD = flags.DEFINE_float("init_std", 1.0, "Std of the initial logits.", flag_values=_FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "Seed.", flag_values=_FLAGS)
_UPDATE = flags.DEFINE_enum(
    "update", "theorem", UPDATES,
    "theorem: BroRL Theorem 1's step; reinforce: count-weighted REINFORCE "
    "(a variant).", flag_values=_FLAGS)
_RC = flags.DEFINE_float("reward_correct", 1.0, "R_c >= 0.", flag_values=_FLAGS)
_RW = flags.DEFINE_float("reward_wrong", -1.0, "R_w <= 0.", flag_values=_FLAGS)


def token_rewards(correct_V: jax.Array, r_correct: float = 1.0,
                  r_wrong: float = -1.0) -> jax.Array:
  """R_i: r_correct for correct tokens, r_wrong for the others; [V]."""
  return jnp.where(correct_V, r_correct, r_wrong)


def theorem_step(z_V: jax.Array, counts_V: jax.Array, reward_V: jax.Array, *,
                 num_rollouts: int, lr: float) -> jax.Array:
  """Theorem 1's step: z + (lr / N) p (R 1[sampled] - S_R) (module docstring).

  Args:
    z_V: logits.
    counts_V: how often each token was sampled (only > 0 matters).
    reward_V: per-token reward R_i.
    num_rollouts: N.
    lr: eta.

  Returns:
    The new logits, [V].
  """
  p_V = jax.nn.softmax(z_V)
  sampled_R = jnp.where(counts_V > 0, reward_V, 0.0)
  s_r = jnp.sum(sampled_R * p_V)
  return z_V + (lr / num_rollouts) * p_V * (sampled_R - s_r)


def reinforce_step(z_V: jax.Array, counts_V: jax.Array, reward_V: jax.Array,
                   *, num_rollouts: int, lr: float) -> jax.Array:
  """Variant: exact count-weighted REINFORCE, z + (lr/N)(c R - (c . R) p)."""
  p_V = jax.nn.softmax(z_V)
  cr_V = counts_V * reward_V
  return z_V + (lr / num_rollouts) * (cr_V - jnp.sum(cr_V) * p_V)


_STEP_FNS = dict(theorem=theorem_step, reinforce=reinforce_step)


def step_fn(update: str):
  """The update function named `update` ("theorem" or "reinforce")."""
  if update not in _STEP_FNS:
    raise ValueError(f"update must be one of {UPDATES}, got {update!r}.")
  return _STEP_FNS[update]


def sample_counts(key: jax.Array, z_V: jax.Array, num_rollouts: int):
  """Counts of N tokens drawn from softmax(z) by inverse-CDF search."""
  cdf = jnp.cumsum(jax.nn.softmax(z_V))
  u = jax.random.uniform(key, (num_rollouts,), dtype=cdf.dtype) * cdf[-1]
  idx = jnp.minimum(jnp.searchsorted(cdf, u, side="right"), z_V.shape[0] - 1)
  return jnp.zeros(z_V.shape, z_V.dtype).at[idx].add(1.0)


@functools.partial(jax.jit, static_argnames=("num_rollouts", "steps",
                                             "num_correct", "update"))
def simulate(key, z0_V, *, num_rollouts: int, steps: int, num_correct: int,
             lr: float = 1.0, update: str = "theorem",
             r_correct: float = 1.0, r_wrong: float = -1.0):
  """Runs `steps` steps of `update`; returns the final logits."""
  correct_V = jnp.arange(z0_V.shape[0]) < num_correct
  reward_V = token_rewards(correct_V, r_correct, r_wrong).astype(z0_V.dtype)
  fn = step_fn(update)

  def body(z, k):
    c = sample_counts(k, z, num_rollouts)
    return fn(z, c, reward_V, num_rollouts=num_rollouts, lr=lr), None

  z, _ = jax.lax.scan(body, z0_V, jax.random.split(key, steps))
  return z


def run(args=None) -> list[dict]:
  a = dict(vocab=128_000, correct=10_000, steps=1000,
           rollouts=[4, 16, 64, 256, 1024, 4096, 16384, 51200], lr=1.0,
           init_std=1.0, seed=0, update="theorem", reward_correct=1.0,
           reward_wrong=-1.0)
  a.update(args or {})
  if not 0 < a["correct"] < a["vocab"]:
    raise ValueError("correct must be in (0, vocab), got "
                     f"{a['correct']} of {a['vocab']}.")
  if a["reward_correct"] < 0 or a["reward_wrong"] > 0:
    raise ValueError("Theorem 1 assumes reward_correct >= 0 >= reward_wrong, "
                     f"got {a['reward_correct']} and {a['reward_wrong']}.")
  step_fn(a["update"])  # checks the name
  with jax.enable_x64(True):
    key = jax.random.key(a["seed"])
    z0 = a["init_std"] * jax.random.normal(jax.random.fold_in(key, 0),
                                           (a["vocab"],), jnp.float64)
    p0 = np.asarray(jax.nn.softmax(z0))
    out = []
    for n in a["rollouts"]:
      z = simulate(jax.random.fold_in(key, 1), z0, num_rollouts=int(n),
                   steps=a["steps"], num_correct=a["correct"], lr=a["lr"],
                   update=a["update"], r_correct=a["reward_correct"],
                   r_wrong=a["reward_wrong"])
      p = np.asarray(jax.nn.softmax(z))
      c = a["correct"]
      out.append(dict(bench="brorl_simulator", update=a["update"], N=int(n),
                      vocab=a["vocab"], correct=c, steps=a["steps"],
                      lr=a["lr"],
                      frac_correct_up=float(np.mean(p[:c] > p0[:c])),
                      correct_mass_start=float(p0[:c].sum()),
                      correct_mass_end=float(p[:c].sum())))
  return out


def main(argv):
  del argv
  rows = run(dict(vocab=_VOCAB.value, correct=_CORRECT.value,
                  steps=_STEPS.value, rollouts=[int(x) for x in _ROLLOUTS.value],
                  lr=_LR.value, init_std=_STD.value, seed=_SEED.value,
                  update=_UPDATE.value, reward_correct=_RC.value,
                  reward_wrong=_RW.value))
  print(f"update={rows[0]['update']}")
  print("| N | correct tokens up | correct mass start | end |")
  print("|---|---|---|---|")
  for r in rows:
    print(f"| {r['N']} | {r['frac_correct_up']:.4f} | "
          f"{r['correct_mass_start']:.6f} | {r['correct_mass_end']:.6f} |")
  for r in rows:
    print(json.dumps(r))


if __name__ == "__main__":
  main(_FLAGS(sys.argv))
