"""BroRL's token-level simulator: which correct tokens gain probability, by N.

  python -m experiments.brorl_simulator [--vocab=128000] [--correct=10000] \
      [--steps=1000] [--rollouts=4,16,64,256,1024,4096,16384,51200] \
      [--lr=1.0] [--init_std=1.0] [--seed=0]

A softmax policy p = softmax(z) over a vocabulary of V tokens, of which the
first C are "correct" (BroRL, arXiv:2510.01180, Sec. on simulations). Each step
samples N tokens y_1..y_N from p, rewards each with r = +1 (correct) or -1
(incorrect), and takes the exact REINFORCE step on the logits:

  z <- z + (lr / N) sum_k r_k (e_{y_k} - p)
     = z + (lr / N) (c * r - (sum_k r_k) p),

where c[i] counts how often token i was sampled. Logits start i.i.d.
N(0, init_std^2). After `steps` steps the script reports, for each N, the
fraction of correct tokens whose probability is higher than at the start.
Sampling uses inverse-CDF search (O(V + N log V) per step), the step is
jitted and the steps run under `lax.scan`. Prints a markdown table and one
JSON object per N.
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


def pg_step(z_V: jax.Array, counts_V: jax.Array, correct_V: jax.Array, *,
            num_rollouts: int, lr: float) -> jax.Array:
  """One REINFORCE step given the sample counts (module docstring)."""
  p_V = jax.nn.softmax(z_V)
  r_V = jnp.where(correct_V, 1.0, -1.0)
  cr_V = counts_V * r_V
  return z_V + (lr / num_rollouts) * (cr_V - jnp.sum(cr_V) * p_V)


def sample_counts(key: jax.Array, z_V: jax.Array, num_rollouts: int):
  """Counts of N tokens drawn from softmax(z) by inverse-CDF search."""
  cdf = jnp.cumsum(jax.nn.softmax(z_V))
  u = jax.random.uniform(key, (num_rollouts,)) * cdf[-1]
  idx = jnp.minimum(jnp.searchsorted(cdf, u, side="right"), z_V.shape[0] - 1)
  return jnp.zeros(z_V.shape, jnp.float32).at[idx].add(1.0)


@functools.partial(jax.jit, static_argnames=("num_rollouts", "steps",
                                             "num_correct"))
def simulate(key, z0_V, *, num_rollouts: int, steps: int, num_correct: int,
             lr: float = 1.0):
  """Runs `steps` steps; returns the final logits."""
  correct_V = jnp.arange(z0_V.shape[0]) < num_correct

  def body(z, k):
    c = sample_counts(k, z, num_rollouts)
    return pg_step(z, c, correct_V, num_rollouts=num_rollouts, lr=lr), None

  z, _ = jax.lax.scan(body, z0_V, jax.random.split(key, steps))
  return z


def run(args=None) -> list[dict]:
  a = dict(vocab=128_000, correct=10_000, steps=1000,
           rollouts=[4, 16, 64, 256, 1024, 4096, 16384, 51200], lr=1.0,
           init_std=1.0, seed=0)
  a.update(args or {})
  if not 0 < a["correct"] < a["vocab"]:
    raise ValueError("correct must be in (0, vocab), got "
                     f"{a['correct']} of {a['vocab']}.")
  key = jax.random.key(a["seed"])
  z0 = a["init_std"] * jax.random.normal(jax.random.fold_in(key, 0),
                                         (a["vocab"],))
  p0 = np.asarray(jax.nn.softmax(z0))
  out = []
  for n in a["rollouts"]:
    z = simulate(jax.random.fold_in(key, 1), z0, num_rollouts=int(n),
                 steps=a["steps"], num_correct=a["correct"], lr=a["lr"])
    p = np.asarray(jax.nn.softmax(z))
    c = a["correct"]
    out.append(dict(bench="brorl_simulator", N=int(n), vocab=a["vocab"],
                    correct=c, steps=a["steps"], lr=a["lr"],
                    frac_correct_up=float(np.mean(p[:c] > p0[:c])),
                    correct_mass_start=float(p0[:c].sum()),
                    correct_mass_end=float(p[:c].sum())))
  return out


def main(argv):
  del argv
  rows = run(dict(vocab=_VOCAB.value, correct=_CORRECT.value,
                  steps=_STEPS.value, rollouts=[int(x) for x in _ROLLOUTS.value],
                  lr=_LR.value, init_std=_STD.value, seed=_SEED.value))
  print("| N | correct tokens up | correct mass start | end |")
  print("|---|---|---|---|")
  for r in rows:
    print(f"| {r['N']} | {r['frac_correct_up']:.4f} | "
          f"{r['correct_mass_start']:.4f} | {r['correct_mass_end']:.4f} |")
  for r in rows:
    print(json.dumps(r))


if __name__ == "__main__":
  main(_FLAGS(sys.argv))
