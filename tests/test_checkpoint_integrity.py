"""Checkpoint integrity: damaged steps are moved aside, failed saves lose nothing.

Every test writes real Orbax checkpoints of a small pytree, damages them the
way a failing disk, a cut copy or a full file system does, and checks which
step `latest_step` returns, what is restored (the numbers), what is moved to
`damaged/` and what the errors say.
"""

import errno
import glob
import json
import os
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
from orbax.checkpoint._src.handlers import json_checkpoint_handler
import pytest

from rlax_llm.training import checkpoint as ckpt_lib


def _state(scale):
  return {"w": jnp.arange(2000, dtype=jnp.float32) * scale,
          "opt": {"mu": jnp.full((7, 5), scale, jnp.float32),
                  "count": jnp.asarray(int(scale), jnp.int32)}}


def _restore(ck, step):
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          _state(1))
  sh = jax.tree.map(
      lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
  return ck.restore(step, abstract, sh)


def _assert_state(state, scale):
  want = _state(scale)
  for got, ref in zip(jax.tree.leaves(state), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


@pytest.fixture
def two_steps(tmp_path):
  """A directory with sealed checkpoints 1 and 2 (state scale = step)."""
  d = str(tmp_path / "checkpoints")
  ck = ckpt_lib.Checkpointer(d)
  ck.save(1, _state(1), {"step": 1, "buffer": [1, 2]})
  ck.save(2, _state(2), {"step": 2, "buffer": [3]})
  ck.close()
  return d


def _array_files(step_dir):
  return [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d",
                                            "*"), recursive=True)
          if os.path.isfile(f)]


def _truncate_arrays(step_dir):
  files = _array_files(step_dir)
  assert files
  for f in files:
    os.truncate(f, os.path.getsize(f) // 3)


def _flip_byte(path):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    b = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([b[0] ^ 0x01]))


def test_seal_lists_every_file_with_size_and_hash(two_steps):
  with open(os.path.join(two_steps, "2", ckpt_lib.SEAL_NAME)) as f:
    seal = json.load(f)
  files = seal["files"]
  on_disk = ckpt_lib._step_files(os.path.join(two_steps, "2"))
  assert sorted(files) == on_disk
  assert os.path.join("meta", "metadata") in files
  import hashlib  # pylint: disable=g-import-not-at-top
  for rel, entry in files.items():
    path = os.path.join(two_steps, "2", rel)
    assert entry["size"] == os.path.getsize(path)
    with open(path, "rb") as f:
      assert entry["sha256"] == hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("damage", ["truncate_arrays", "flip_array_byte",
                                    "cut_meta_json", "rewrite_meta_json",
                                    "delete_array_file", "garbage_seal"])
def test_damaged_latest_falls_back_to_intact_one(two_steps, damage, capfd):
  step2 = os.path.join(two_steps, "2")
  if damage == "truncate_arrays":
    _truncate_arrays(step2)
  elif damage == "flip_array_byte":
    _flip_byte(max(_array_files(step2), key=os.path.getsize))
  elif damage == "cut_meta_json":
    path = os.path.join(step2, "meta", "metadata")
    os.truncate(path, os.path.getsize(path) // 2)
  elif damage == "rewrite_meta_json":  # same size, other content
    path = os.path.join(step2, "meta", "metadata")
    text = open(path).read()
    with open(path, "w") as f:
      f.write(text.replace("[3]", "[4]"))
  elif damage == "delete_array_file":
    os.remove(_array_files(step2)[0])
  elif damage == "garbage_seal":  # the seal itself is unreadable, and the
    # arrays are cut: the step must be judged by reading it
    with open(os.path.join(step2, ckpt_lib.SEAL_NAME), "w") as f:
      f.write("{not json")
    _truncate_arrays(step2)
  ck = ckpt_lib.Checkpointer(two_steps)
  assert ck.latest_step() == 1
  err = capfd.readouterr().err
  assert "checkpoint step 2" in err and "damaged" in err
  assert "falling back to checkpoint step 1" in err
  # Moved aside, not deleted; the manager no longer lists it.
  assert not os.path.exists(step2)
  assert os.path.isdir(os.path.join(two_steps, "damaged", "step_2"))
  assert ck.damaged() == ["step_2"]
  assert ck.all_steps() == [1]
  state, meta = _restore(ck, 1)
  _assert_state(state, 1)
  assert meta == {"step": 1, "buffer": [1, 2]}
  assert ck.restore_meta(1) == meta
  # A new save after the fallback replaces step 2 and is the latest again.
  ck.save(2, _state(5), {"step": 2})
  assert ck.latest_step() == 2
  _assert_state(_restore(ck, 2)[0], 5)


def test_restore_of_a_damaged_step_refuses_with_the_fix(two_steps):
  ck = ckpt_lib.Checkpointer(two_steps)
  _truncate_arrays(os.path.join(two_steps, "2"))
  with pytest.raises(ckpt_lib.DamagedCheckpointError,
                     match=r"step 2 .* is damaged .*Re-run the same command"):
    _restore(ck, 2)
  with pytest.raises(ckpt_lib.DamagedCheckpointError):
    ck.restore_meta(2)
  assert os.path.isdir(os.path.join(two_steps, "2"))  # explicit: not moved


def test_unsealed_steps_are_read_and_sealed_or_moved(two_steps):
  # A step without a seal (a kill between Orbax's commit and the seal, or a
  # checkpoint from before seals): read completely; sealed when it reads.
  os.remove(os.path.join(two_steps, "1", ckpt_lib.SEAL_NAME))
  os.remove(os.path.join(two_steps, "2", ckpt_lib.SEAL_NAME))
  _truncate_arrays(os.path.join(two_steps, "2"))
  ck = ckpt_lib.Checkpointer(two_steps)
  assert ck.latest_step() == 1
  assert os.path.exists(os.path.join(two_steps, "1", ckpt_lib.SEAL_NAME))
  assert ck.damaged() == ["step_2"]
  _assert_state(_restore(ck, 1)[0], 1)


def test_no_intact_step_left_stops_with_directory_and_fix(two_steps, capfd):
  _truncate_arrays(os.path.join(two_steps, "2"))
  path = os.path.join(two_steps, "1", "meta", "metadata")
  os.truncate(path, 3)
  ck = ckpt_lib.Checkpointer(two_steps)
  with pytest.raises(ckpt_lib.DamagedCheckpointError) as e:
    ck.latest_step()
  msg = str(e.value)
  assert two_steps in msg and "damaged" in msg and "--workdir" in msg
  assert "step_1" in msg and "step_2" in msg
  err = capfd.readouterr().err
  assert "checkpoint step 2" in err and "checkpoint step 1" in err
  # A re-run does not silently start over beside the damaged ones.
  with pytest.raises(ckpt_lib.DamagedCheckpointError):
    ckpt_lib.Checkpointer(two_steps).latest_step()
  assert sorted(os.listdir(os.path.join(two_steps, "damaged"))) == [
      "step_1", "step_2"]


def test_twice_damaged_step_gets_a_new_name(two_steps):
  ck = ckpt_lib.Checkpointer(two_steps)
  for k in range(2):
    _truncate_arrays(os.path.join(two_steps, "2"))
    assert ck.latest_step() == 1
    ck.save(2, _state(2), {"step": 2})
  assert ck.damaged() == ["step_2", "step_2.1"]


def _enospc(*unused_args, **unused_kwargs):
  raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_orbax_writes(two_steps, monkeypatch):
  ck = ckpt_lib.Checkpointer(two_steps)
  assert ck.latest_step() == 2

  async def full(self, x, directory):  # the JSON item, after the arrays
    del self, x
    (directory / "metadata").write_text('{"half')
    _enospc()
  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler,
                      "_save_fn", full)
  with pytest.raises(ckpt_lib.CheckpointWriteError) as e:
    ck.save(3, _state(3), {"step": 3})
  assert e.value.errno == errno.ENOSPC
  msg = str(e.value)
  assert "step 3" in msg and "step 2 is intact" in msg
  assert "free space" in msg and "re-run" in msg
  monkeypatch.undo()
  # Nothing of step 3 is left where a later run would look for it.
  assert "3" not in os.listdir(two_steps)
  ck2 = ckpt_lib.Checkpointer(two_steps)
  assert ck2.all_steps() == [1, 2]
  assert ck2.latest_step() == 2
  _assert_state(_restore(ck2, 2)[0], 2)
  assert ck2.restore_meta(2) == {"step": 2, "buffer": [3]}


def test_disk_full_while_sealing(two_steps, monkeypatch):
  ck = ckpt_lib.Checkpointer(two_steps)
  monkeypatch.setattr(ckpt_lib.json, "dump", _enospc)
  with pytest.raises(ckpt_lib.CheckpointWriteError) as e:
    ck.save(3, _state(3), {"step": 3})
  monkeypatch.undo()
  assert e.value.errno == errno.ENOSPC and "step 2 is intact" in str(e.value)
  ck2 = ckpt_lib.Checkpointer(two_steps)
  assert ck2.latest_step() == 2
  _assert_state(_restore(ck2, 2)[0], 2)
  assert ck2.damaged() == ["step_3"]  # committed but unsealed: kept aside


_KILL_SCRIPT = textwrap.dedent("""
    import sys
    import jax.numpy as jnp
    from rlax_llm.training import checkpoint as ckpt_lib
    ck = ckpt_lib.Checkpointer(sys.argv[1])
    state = {"w": jnp.arange(200000, dtype=jnp.float32) * 3,
             "opt": {"mu": jnp.full((7, 5), 3.0, jnp.float32),
                     "count": jnp.asarray(3, jnp.int32)}}
    ck.save(3, state, {"step": 3})
    print("survived")
""")


@pytest.mark.parametrize("phase,latest", [("arrays", 2), ("commit", 3),
                                          ("seal", 3)])
def test_fault_injection_kill_in_save(two_steps, phase, latest, forks):
  env = dict(os.environ, **{ckpt_lib.FAULT_ENV: f"3:{phase}"})
  proc = forks.run([sys.executable, "-c", _KILL_SCRIPT, two_steps],
                   cwd=os.getcwd(), env=env, timeout=120)
  assert proc.returncode == -9, proc.stderr[-2000:]
  assert "survived" not in proc.stdout
  ck = ckpt_lib.Checkpointer(two_steps)
  assert ck.latest_step() == latest
  assert ck.damaged() == []
  if latest == 3:  # committed before the kill: read fully, then sealed
    assert os.path.exists(os.path.join(two_steps, "3", ckpt_lib.SEAL_NAME))
    assert ck.restore_meta(3) == {"step": 3}
  # The seal written now holds on the next run too.
  again = ckpt_lib.Checkpointer(two_steps)
  assert again.latest_step() == latest
  assert again.damaged() == []
  if latest == 3:
    assert again.restore_meta(3) == {"step": 3}
  else:
    _assert_state(_restore(ck, 2)[0], 2)


def test_bad_fault_spec_is_refused(two_steps, monkeypatch):
  monkeypatch.setenv(ckpt_lib.FAULT_ENV, "3:later")
  with pytest.raises(ValueError, match="RLAX_FAULT_KILL_IN_SAVE"):
    ckpt_lib.Checkpointer(two_steps).save(3, _state(3), {})


# -- resuming with a changed budget (config_utils.check_resume_config) --------


def test_resume_budget_may_grow_but_not_shrink(tmp_path):
  from configs import smoke  # pylint: disable=g-import-not-at-top
  from rlax_llm.experiment import config_utils  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path)
  c = smoke.get_config()
  config_utils.check_resume_config(workdir, c, resuming=False)
  total = c.sft.steps + c.rl.steps
  os.makedirs(os.path.join(workdir, "checkpoints", str(total)))
  # Same budget and a larger one resume; the stored config takes the new one.
  config_utils.check_resume_config(workdir, c, resuming=True)
  c.rl.steps = 9
  config_utils.check_resume_config(workdir, c, resuming=True)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["rl"]["steps"] == 9
  # Back below the (extended) budget: refused, naming values and the fix.
  c.rl.steps = 5
  with pytest.raises(ValueError) as e:
    config_utils.check_resume_config(workdir, c, resuming=True)
  msg = str(e.value)
  assert "--config.rl.steps=5 is smaller than the 9 RL steps" in msg
  assert f"step {total}" in msg and "--config.rl.steps=9" in msg
  assert "new --workdir" in msg
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["rl"]["steps"] == 9  # the refusal wrote nothing
  # Other resumable fields still change freely.
  c.rl.steps = 9
  c.eval.every = 3
  config_utils.check_resume_config(workdir, c, resuming=True)
