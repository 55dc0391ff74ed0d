"""Sharding on 8 fake CPU devices: same numbers as one device, no replicas.

For several mesh shapes, the SFT and RL losses and their gradients equal
those on one device; every large parameter and its optimiser moments are
split over the fsdp x tensor devices; the sampling rules keep weights
tensor-sharded but whole along fsdp.
"""

import json
import os
import sys
import textwrap

import numpy as np
import pytest

from rlax_llm.parallel import mesh as mesh_lib

# One pytest-xdist worker runs the whole module (`--dist=loadgroup`, in
# pyproject.toml), so the 8-device run behind `sharded` is made once.
pytestmark = pytest.mark.xdist_group("sharding")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = {"d8": (8, 1, 1), "d2f2t2": (2, 2, 2), "f4t2": (1, 4, 2),
          "f8": (1, 8, 1)}
MIN_SIZE = 512  # every weight matrix of the test model has >= 512 entries

_SCRIPT = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8")
    import jax, jax.numpy as jnp, numpy as np, optax
    from rlax_llm.methods import grpo
    from rlax_llm.models.config import ModelConfig
    from rlax_llm.parallel import mesh as mesh_lib
    from rlax_llm.training import state as state_lib, steps as steps_lib
    assert len(jax.devices()) == 8
    out_dir, meshes = sys.argv[1], json.loads(sys.argv[2])
    cfg = ModelConfig(vocab_size=32, num_layers=1, embed_dim=32, num_heads=4,
                      num_kv_heads=2, head_dim=8, mlp_dim=64, max_seq_len=16,
                      tie_embeddings=False)
    gd = state_lib.model_graphdef(cfg)

    def grad_capture():
      # An "optimiser" whose state after an update is the gradient itself,
      # sharded like the parameters, and which leaves the parameters as is.
      return optax.GradientTransformation(
          lambda p: jax.tree.map(jnp.zeros_like, p),
          lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))

    n, p, t = 16, 4, 6
    rng = np.random.default_rng(0)
    prompt = rng.integers(2, 32, (n, p)).astype(np.int32)
    pmask = np.ones((n, p), bool); pmask[::3, :2] = False
    comp = rng.integers(1, 32, (n, t)).astype(np.int32)
    cmask = np.arange(t)[None] < rng.integers(0, t + 1, n)[:, None]
    old = np.where(cmask, rng.normal(-3.0, 0.3, (n, t)), 0).astype(np.float32)
    adv = (rng.normal(size=(n, 1)) * cmask).astype(np.float32)
    rl_batch = steps_lib.RLBatch(prompt, pmask, comp, cmask, old, adv)
    sft_batch = steps_lib.SFTBatch(prompt, pmask, comp, cmask)

    def shard_report(tree):
      rows = []
      for path, x in jax.tree_util.tree_leaves_with_path(tree):
        if x.ndim:
          rows.append(dict(path=jax.tree_util.keystr(path), size=x.size,
                           shard=int(np.prod(x.sharding.shard_shape(x.shape))),
                           spec=str(x.sharding.spec)))
      return rows

    summary = {}
    for name, shape in meshes.items():
      devices = jax.devices()[:1] if shape is None else None
      mesh = mesh_lib.make_mesh(shape or (1, 1, 1), devices)
      opt = grad_capture()
      state, sh = state_lib.create_train_state(cfg, opt, mesh, seed=0)
      sft = steps_lib.jit_step(steps_lib.make_sft_step(gd, opt), sh, mesh)
      rl = steps_lib.jit_step(steps_lib.make_rl_step(
          gd, opt, grpo().policy_loss), sh, mesh)
      state, m_sft = sft(state, sft_batch)
      g_sft = [np.asarray(x) for x in jax.tree.leaves(state.opt_state)]
      state, m_rl = rl(state, rl_batch)
      g_rl = [np.asarray(x) for x in jax.tree.leaves(state.opt_state)]
      np.savez(os.path.join(out_dir, name + ".npz"),
               *(g_sft + g_rl))
      # The state a real optimiser keeps, created straight into shardings.
      adam = optax.chain(optax.clip_by_global_norm(1.0),
                         optax.adamw(1e-3, weight_decay=0.1))
      _, ash = state_lib.state_shardings(cfg, adam, mesh, seed=0)
      init = jax.jit(lambda: state_lib.init_state(cfg, adam, 0),
                     out_shardings=ash).lower().compile()
      astate, mem = init(), init.memory_analysis()
      total = sum(x.nbytes for x in jax.tree.leaves(astate))
      summary[name] = dict(
          sft=float(m_sft["loss"]), rl=float(m_rl["loss"]),
          sft_gn=float(m_sft["grad_norm"]), rl_gn=float(m_rl["grad_norm"]),
          n_grads=len(g_sft),
          params=shard_report(astate.params),
          opt=shard_report(astate.opt_state),
          grads=shard_report(state.opt_state),
          same_opt_specs=all(
              a.sharding.spec == b.sharding.spec
              for a, b in zip(jax.tree.leaves(astate.opt_state[1][0].mu),
                              jax.tree.leaves(astate.params))
          ) and all(
              a.sharding.spec == b.sharding.spec
              for a, b in zip(jax.tree.leaves(astate.opt_state[1][0].nu),
                              jax.tree.leaves(astate.params))),
          unsharded=mesh_lib.unsharded_leaves(astate, min_size=%(min_size)d),
          init_out_bytes=getattr(mem, "output_size_in_bytes", -1),
          state_bytes=total)

    # Replicating rules must be caught by the audit.
    mesh = mesh_lib.make_mesh((2, 2, 2))
    rep_rules = mesh_lib.get_rules("train", dict(embed=None, mlp=None,
                                                 heads=None, kv_heads=None,
                                                 vocab=None))
    rstate, _ = state_lib.create_train_state(cfg, optax.adam(1e-3), mesh,
                                             seed=0, rules=rep_rules)
    summary["replicated_audit"] = mesh_lib.unsharded_leaves(
        rstate, min_size=%(min_size)d)

    # Sampling layout: weights whole along fsdp, still split over tensor.
    mesh = mesh_lib.make_mesh((1, 4, 2))
    tstate, tsh = state_lib.create_train_state(cfg, optax.adam(1e-3), mesh,
                                               seed=0)
    ssh = state_lib.param_shardings(cfg, mesh, mesh_lib.SAMPLE_RULES)
    sparams = state_lib.reshard(tstate.params, ssh)
    summary["sample"] = dict(
        params=shard_report(sparams),
        equal=all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                  zip(jax.tree.leaves(sparams),
                      jax.tree.leaves(tstate.params))))

    # Activations: a constraint by logical names lands on the rules' axes.
    x = jnp.ones((8, 4, 32))
    f = jax.jit(lambda x: mesh_lib.logical_constraint(
        x * 2, ("batch", "length", "act_embed"), mesh) + 1)
    g = jax.jit(lambda x: mesh_lib.logical_constraint(
        x * 2, ("batch", "length", "act_mlp"), mesh) + 1)
    pad = lambda spec: [a for a in tuple(spec) + (None,) * (3 - len(spec))]
    summary["act"] = [pad(f(x).sharding.spec), pad(g(x).sharding.spec)]
    print(json.dumps(summary))
""") % {"min_size": MIN_SIZE}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, forks):
  out = str(tmp_path_factory.mktemp("sharding"))
  meshes = dict(one=None, **MESHES)
  proc = forks.run([sys.executable, "-c", _SCRIPT, out, json.dumps(meshes)],
                   cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  grads = {k: np.load(os.path.join(out, k + ".npz")) for k in meshes}
  return summary, grads


@pytest.mark.parametrize("name", sorted(MESHES))
def test_losses_and_gradients_match_one_device(sharded, name):
  summary, grads = sharded
  ref, got = summary["one"], summary[name]
  for key in ("sft", "rl", "sft_gn", "rl_gn"):
    np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, err_msg=key)
  g_ref, g_got = grads["one"], grads[name]
  assert len(g_ref.files) == 2 * ref["n_grads"] > 10
  for f in g_ref.files:
    a, b = g_got[f], g_ref[f]
    assert a.shape == b.shape
    # Within 1e-5 of the gradient's scale (sums are reordered across devices).
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max()
                               + 1e-9, err_msg=f)
  # The gradients are not trivially zero, and SFT and RL gradients differ.
  n = ref["n_grads"]
  assert np.abs(g_ref["arr_0"]).max() > 1e-4
  assert not np.allclose(g_ref["arr_0"], g_ref[f"arr_{n}"])
  # Initial SFT loss of a near-uniform model is close to log(V).
  assert abs(ref["sft"] - np.log(32)) < 0.3


@pytest.mark.parametrize("name", ["d2f2t2", "f4t2", "f8"])
def test_large_weights_and_moments_are_split(sharded, name):
  summary, _ = sharded
  got = summary[name]
  _, fsdp, tensor = MESHES[name]
  split = fsdp * tensor
  for kind in ("params", "opt", "grads"):
    large = [r for r in got[kind] if r["size"] >= MIN_SIZE]
    assert len(large) >= 7, kind  # embedding, lm_head, q/k/v/o, mlp, moments
    for r in large:
      # Each device holds 1/(fsdp*tensor) of every large array, no more.
      assert r["shard"] * split == r["size"], (kind, r)
  assert got["same_opt_specs"]
  assert got["unsharded"] == []
  # The compiled init writes only one device's shard of the state: about
  # 1/(fsdp*tensor) of it plus the small replicated leaves.
  assert 0 < got["init_out_bytes"] < 1.5 * got["state_bytes"] / split


def test_pure_data_parallel_replicates_and_the_audit_sees_it(sharded):
  summary, _ = sharded
  # (8, 1, 1) keeps whole weights on every device, by design...
  assert all(r["shard"] == r["size"] for r in summary["d8"]["params"])
  assert summary["d8"]["init_out_bytes"] >= summary["d8"]["state_bytes"]
  # ...and the audit flags every large leaf, as it does when rules replicate.
  assert len(summary["d8"]["unsharded"]) >= 7
  audit = summary["replicated_audit"]
  assert len(audit) >= 3 * 7  # params, mu and nu
  assert any("embedding" in a for a in audit)


def test_sampling_rules_gather_fsdp_but_keep_tensor(sharded):
  summary, _ = sharded
  sample = summary["sample"]
  assert sample["equal"]
  large = [r for r in sample["params"] if r["size"] >= MIN_SIZE]
  assert len(large) >= 7
  for r in large:
    assert "fsdp" not in r["spec"], r
    assert "tensor" in r["spec"], r
    assert r["shard"] * 2 == r["size"], r
  # Under the training rules the same weights are split 8 ways.
  assert all(r["shard"] * 8 == r["size"] for r in summary["f4t2"]["params"]
             if r["size"] >= MIN_SIZE)


def test_activation_constraints_follow_the_rules(sharded):
  summary, _ = sharded
  # batch over data x fsdp (data has size 1: only fsdp remains).
  assert summary["act"] == [["fsdp", None, None], ["fsdp", None, "tensor"]]


def test_logical_to_spec_rules():
  import jax  # pylint: disable=g-import-not-at-top
  mesh = mesh_lib.make_mesh((1, 1, 1))
  # Axes of size one drop out; on one device everything is replicated.
  assert mesh_lib.logical_to_spec(("embed", "mlp"), (32, 64),
                                  mesh) == jax.sharding.PartitionSpec(None,
                                                                      None)
  assert mesh_lib.get_rules("sample")["embed"] is None
  assert mesh_lib.get_rules("sample")["mlp"] == "tensor"
  assert mesh_lib.get_rules("train", {"mlp": None})["mlp"] is None
  assert mesh_lib.TRAIN_RULES["mlp"] == "tensor"  # the default is untouched


@pytest.mark.parametrize("shape, needle", [
    ((2, 2, 2), "needs 8 devices but 1 are available"),
    ({"data": 2, "fsdp": -1}, "does not divide the 1 devices"),
    ((-1, -1, 1), "at most one axis may be -1"),
    ((0, 1, 1), "sizes must be positive"),
    ({"model": 2}, "Unknown mesh axes"),
    ((1, 1), "one size per axis"),
])
def test_bad_mesh_shapes_name_the_fix(shape, needle):
  with pytest.raises(ValueError, match=needle):
    mesh_lib.make_mesh(shape)


def test_bad_rules_name_the_fix():
  with pytest.raises(ValueError, match="unknown mesh axes"):
    mesh_lib.get_rules("train", {"mlp": "model"})
  with pytest.raises(ValueError, match="Unknown rule set"):
    mesh_lib.get_rules("decode")
