"""Core functions give the same numbers with the batch sharded over 8 devices.

Runs in a process of its own (forked, tests/forkrun.py) with 8 fake CPU
devices (the flag must be set before JAX starts). Each public core function
is jitted twice: once with its inputs on one device, once with the batch axis
sharded over a mesh of all 8 devices; values and gradients must agree to
float32 rounding.
"""

import os
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
import os
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
import functools
import jax
jax.config.update("jax_platforms", "cpu")
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rlax_llm.core import advantages, aggregation, logprobs, objectives
from rlax_llm.core import selection, value

assert jax.device_count() == 8, jax.devices()
mesh = Mesh(np.array(jax.devices()), ("data",))
one = jax.devices()[0]
rng = np.random.default_rng(0)
N, T, V, B, G = 32, 7, 11, 8, 4
mask = np.arange(T)[None] < rng.integers(0, T + 1, (N, 1))
logp = np.where(mask, -rng.gamma(2.0, 0.5, (N, T)), 0).astype(np.float32)
old = (logp + np.where(mask, rng.normal(0, 0.2, (N, T)), 0)).astype(np.float32)
adv = (rng.normal(size=(N, T)) * mask).astype(np.float32)
reward = rng.integers(0, 2, (B, G)).astype(np.float32)
logits = rng.normal(size=(N, T, V)).astype(np.float32)
targets = rng.integers(0, V, (N, T)).astype(np.int32)
v = rng.normal(size=(N, T)).astype(np.float32)

def run(fn, *args):
  def place(x, sharded):
    if not sharded:
      return jax.device_put(x, one)
    spec = P("data", *([None] * (np.ndim(x) - 1)))
    return jax.device_put(x, NamedSharding(mesh, spec))
  a = jax.jit(fn)(*[place(x, False) for x in args])
  b = jax.jit(fn)(*[place(x, True) for x in args])
  return a, b

loss_fns = {
  "ppo_clip_token_mean": functools.partial(objectives.ppo_clip_loss,
                                           clip_high=0.28, dual_clip=3.0),
  "ppo_clip_seq_mean": functools.partial(
      objectives.ppo_clip_loss, aggregation="seq_mean_token_mean"),
  "ppo_clip_sum_norm": functools.partial(
      objectives.ppo_clip_loss, aggregation="seq_mean_token_sum_norm",
      norm_constant=float(T)),
  "gspo": objectives.gspo_loss,
  "cispo": objectives.cispo_loss,
  "policy_gradient": lambda lp, o, a, m: objectives.policy_gradient_loss(
      lp, a, m),
}
checked = 0
for name, fn in loss_fns.items():
  f = lambda lp, o, a, m, fn=fn: jax.value_and_grad(
      lambda x: fn(x, o, a, m)[0])(lp)
  (la, ga), (lb, gb) = run(f, logp, old, adv, mask)
  np.testing.assert_allclose(la, lb, rtol=2e-6, atol=1e-7, err_msg=name)
  np.testing.assert_allclose(ga, gb, rtol=2e-5, atol=1e-8, err_msg=name)
  assert np.abs(np.asarray(ga)).max() > 0, name
  checked += 1

others = {
  "grpo": (advantages.grpo_advantages, (reward,)),
  "dr_grpo": (functools.partial(advantages.grpo_advantages,
                                scale_by_std=False), (reward,)),
  "rloo": (advantages.rloo_advantages, (reward,)),
  "reinforce_pp": (functools.partial(advantages.reinforce_pp_advantages,
                                     group_baseline=True), (reward,)),
  "gae": (lambda r, vv, m: advantages.gae_advantages(r, vv, m, gamma=0.9,
                                                      lam=0.8), (adv, v, mask)),
  "kl_k3": (functools.partial(objectives.kl_penalty, kind="k3"), (logp, old)),
  "kl_loss": (lambda a, b, m: objectives.kl_loss(a, b, m)[0], (logp, old, mask)),
  "entropy_loss": (lambda lg, m: objectives.entropy_loss(
      logprobs.entropy_from_logits(lg), m)[0], (logits, mask)),
  "token_logprobs": (logprobs.token_logprobs, (logits, targets)),
  "importance_weights": (lambda a, b, m: objectives.importance_weights(
      a, b, m)[0], (old, logp, mask)),
  "value_loss": (lambda a, b, c, m: value.value_loss(a, b, c, m)[0],
                 (v, v * 0.9, adv, mask)),
  "whiten": (value.whiten, (adv, mask)),
  "d3s_token": (functools.partial(selection.d3s_token_mask, fraction=0.3),
                (adv, -logp, mask)),
  "xrpo_novelty": (functools.partial(selection.xrpo_novelty, group_size=G),
                   (logp, mask)),
  "sft_loss": (lambda a, m: objectives.sft_loss(a, m)[0], (logp, mask)),
}
for name, (fn, args) in others.items():
  a, b = run(fn, *args)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64),
                               np.asarray(y, np.float64), rtol=2e-6,
                               atol=1e-6, err_msg=name)  # sums of O(1) terms
  checked += 1
print("CHECKED", checked)
""")


def test_core_functions_sharded_equal_one_device(forks):
  out = forks.run([sys.executable, "-c", SCRIPT], cwd=REPO, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  assert "CHECKED 21" in out.stdout, out.stdout
