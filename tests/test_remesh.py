"""Checkpoints restore onto other meshes; half-written ones are never resumed.

A state saved on a (2, 2, 2) mesh of 8 fake CPU devices restores onto
(1, 4, 2) and onto one device with identical values and the new layout. A
process killed in the middle of writing a checkpoint leaves the previous
checkpoint as the latest one, and the leftover is cleared on the next open.
"""

import json
import os
import signal
import sys
import textwrap

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_REMESH = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8")
    import jax, numpy as np, optax
    from rlax_llm.models.config import ModelConfig
    from rlax_llm.parallel.mesh import make_mesh
    from rlax_llm.training import checkpoint as ckpt_lib
    from rlax_llm.training import state as state_lib, steps as steps_lib
    assert len(jax.devices()) == 8
    directory = sys.argv[1]
    cfg = ModelConfig(vocab_size=32, num_layers=1, embed_dim=32, num_heads=4,
                      num_kv_heads=2, head_dim=8, mlp_dim=64, max_seq_len=16)
    opt = optax.adam(1e-2)
    rng = np.random.default_rng(0)
    batch = steps_lib.SFTBatch(
        rng.integers(2, 32, (8, 4)).astype(np.int32), np.ones((8, 4), bool),
        rng.integers(1, 32, (8, 5)).astype(np.int32), np.ones((8, 5), bool))

    mesh = make_mesh((2, 2, 2))
    state, sh = state_lib.create_train_state(cfg, opt, mesh, seed=0)
    step = steps_lib.jit_step(steps_lib.make_sft_step(
        state_lib.model_graphdef(cfg), opt), sh, mesh)
    state, _ = step(state, batch)
    saved = [np.asarray(x) for x in jax.tree.leaves(state)]
    saved_specs = [str(x.sharding.spec) for x in jax.tree.leaves(state)]
    shard = lambda x: int(np.prod(x.sharding.shard_shape(x.shape)))
    saved_shards = [shard(x) for x in jax.tree.leaves(state)]
    ck = ckpt_lib.Checkpointer(directory)
    ck.save(1, state, {"mesh": [2, 2, 2]})

    out = {"saved_specs": saved_specs, "saved_shards": saved_shards,
           "sizes": [x.size for x in saved], "n": len(saved),
           "nonzero_moments": int(sum(np.abs(x).max() > 0 for x in saved))}
    for name, shape, devices in [("f4t2", (1, 4, 2), None),
                                 ("one", (1, 1, 1), jax.devices()[:1])]:
      target = make_mesh(shape, devices)
      abstract, tsh = state_lib.state_shardings(cfg, opt, target, seed=0)
      restored, meta = ckpt_lib.Checkpointer(directory).restore(
          1, abstract, tsh)
      leaves = jax.tree.leaves(restored)
      out[name] = dict(
          equal=[bool(np.array_equal(np.asarray(a), b))
                 for a, b in zip(leaves, saved)],
          specs=[str(x.sharding.spec) for x in leaves],
          shards=[shard(x) for x in leaves],
          want_specs=[str(s.spec) for s in jax.tree.leaves(tsh)],
          devices=sorted({len(x.sharding.device_set) for x in leaves}),
          meta=meta)
    print(json.dumps(out))
""")


def test_restore_onto_other_meshes(tmp_path, forks):
  proc = forks.run([sys.executable, "-c", _REMESH, str(tmp_path / "ckpt")],
                   cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  # The saved state was really split 8 ways, and training filled the moments.
  assert any("fsdp" in s and "tensor" in s for s in out["saved_specs"])
  assert out["nonzero_moments"] > out["n"] // 2
  for name, n_devices in (("f4t2", [8]), ("one", [1])):
    got = out[name]
    assert len(got["equal"]) == out["n"] and all(got["equal"]), name
    assert got["specs"] == got["want_specs"]
    assert got["devices"] == n_devices
    assert got["meta"] == {"mesh": [2, 2, 2]}
  # Each device holds a quarter of a large weight on (2, 2, 2), an eighth on
  # (1, 4, 2) and all of it on one device.
  large = [i for i, n in enumerate(out["sizes"]) if n >= 512]
  assert len(large) >= 7
  for i in large:
    assert out["saved_shards"][i] * 4 == out["sizes"][i]
    assert out["f4t2"]["shards"][i] * 8 == out["sizes"][i]
    assert out["one"]["shards"][i] == out["sizes"][i]


_CRASH = textwrap.dedent("""
    import os, signal, sys
    import jax, numpy as np, optax
    from orbax.checkpoint._src.path import atomicity
    from rlax_llm.models.config import ModelConfig
    from rlax_llm.parallel.mesh import make_mesh
    from rlax_llm.training import checkpoint as ckpt_lib
    from rlax_llm.training import state as state_lib
    directory = sys.argv[1]
    cfg = ModelConfig(vocab_size=32, num_layers=1, embed_dim=16, num_heads=2,
                      num_kv_heads=2, head_dim=8, mlp_dim=32, max_seq_len=16)
    state, _ = state_lib.create_train_state(cfg, optax.adam(1e-3), make_mesh(),
                                            seed=0)
    ck = ckpt_lib.Checkpointer(directory)
    ck.save(1, state, {"step": 1})
    np.savez(os.path.join(directory, "..", "step1.npz"),
             *[np.asarray(x) for x in jax.tree.leaves(state)])

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def crash(self, *args, **kwargs):
      # Items inside the step finish; when the step directory itself is to
      # be made visible, every array and the metadata are written and the
      # process dies.
      if self.get().name.startswith("2."):
        os.kill(os.getpid(), signal.SIGKILL)
      return await finalize(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = crash
    state = jax.tree.map(lambda x: x + 1 if x.dtype == np.float32 else x,
                         state)
    ck.save(2, state, {"step": 2})
    print("the save of step 2 completed", flush=True)
""")


def test_checkpoint_killed_mid_save_is_never_resumed(tmp_path, forks):
  from rlax_llm.training import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  directory = str(tmp_path / "ckpt")
  proc = forks.run([sys.executable, "-c", _CRASH, directory], cwd=REPO,
                   timeout=180)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-4000:]
  assert "completed" not in proc.stdout
  leftovers = [d for d in os.listdir(directory) if d.startswith("2.")]
  assert leftovers and ".orbax-checkpoint-tmp" in leftovers[0], os.listdir(
      directory)
  # The half-written step holds its array data.
  assert os.path.isdir(os.path.join(directory, leftovers[0], "state"))

  ck = ckpt_lib.Checkpointer(directory)
  assert ck.latest_step() == 1
  assert ck.all_steps() == [1]
  with pytest.raises(FileNotFoundError, match="No complete checkpoint for "
                     "step 2"):
    ck.restore_meta(2)

  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from rlax_llm.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from rlax_llm.parallel.mesh import make_mesh  # pylint: disable=g-import-not-at-top
  from rlax_llm.training import state as state_lib  # pylint: disable=g-import-not-at-top
  cfg = ModelConfig(vocab_size=32, num_layers=1, embed_dim=16, num_heads=2,
                    num_kv_heads=2, head_dim=8, mlp_dim=32, max_seq_len=16)
  abstract, sh = state_lib.state_shardings(cfg, optax.adam(1e-3), make_mesh(),
                                           seed=0)
  restored, meta = ck.restore(1, abstract, sh)
  assert meta == {"step": 1}
  want = np.load(str(tmp_path / "step1.npz"))
  got = [np.asarray(x) for x in jax.tree.leaves(restored)]
  assert len(got) == len(want.files) > 10
  for i, x in enumerate(got):
    np.testing.assert_array_equal(x, want[f"arr_{i}"])
  # Saving step 2 again works; by then the leftover has been cleared.
  ck.save(2, restored, {"step": 2})
  assert ck.latest_step() == 2 and ck.restore_meta(2) == {"step": 2}
  assert sorted(os.listdir(directory)) == ["1", "2"]
  ck.close()


def test_orbax_temporary_form_is_skipped(tmp_path):
  """A step directory in orbax's temporary form is not a checkpoint."""
  import shutil  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from rlax_llm.training import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  directory = str(tmp_path / "ckpt")
  ck = ckpt_lib.Checkpointer(directory, max_to_keep=3)
  ck.save(3, {"w": jnp.arange(4.0)}, {"step": 3})
  ck.close()
  # A later step copied into the temporary name orbax writes before renaming.
  shutil.copytree(os.path.join(directory, "3"),
                  os.path.join(directory, "7.orbax-checkpoint-tmp-1700000000"))
  ck = ckpt_lib.Checkpointer(directory, max_to_keep=3)
  assert ck.latest_step() == 3
  assert ck.all_steps() == [3]
  ck.close()
