"""Two processes on one machine train like one process and share checkpoints.

Two local CPU processes (2 devices each, gloo collectives) join through an
explicit coordinator, each feeding only its own rows of a fixed global batch.
Their losses and gradient norms must equal those of one process that sees the
whole batch, and the checkpoint they write together must restore in one
process with the values they held.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import portpicker
import pytest

from rlax_llm.parallel import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240

_WORKER = textwrap.dedent("""
    import json, os, sys
    mode, out = sys.argv[1], sys.argv[2]
    ndev = 2 if mode == "multi" else 1
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={ndev}")
    from rlax_llm.parallel import distributed
    plan = distributed.initialize()  # from the RLAX_* environment
    import jax, numpy as np, optax
    from jax.experimental import multihost_utils
    from rlax_llm.methods import grpo
    from rlax_llm.models.config import ModelConfig
    from rlax_llm.parallel.mesh import make_mesh
    from rlax_llm.training import checkpoint as ckpt_lib
    from rlax_llm.training import state as state_lib, steps as steps_lib

    pid = jax.process_index()
    cfg = ModelConfig(vocab_size=32, num_layers=1, embed_dim=16, num_heads=2,
                      num_kv_heads=2, head_dim=8, mlp_dim=32, max_seq_len=16)
    n, p, t = 8, 4, 5
    rng = np.random.default_rng(0)
    prompt = rng.integers(2, 32, (n, p)).astype(np.int32)
    pmask = np.ones((n, p), bool); pmask[::3, :1] = False
    comp = rng.integers(1, 32, (n, t)).astype(np.int32)
    cmask = np.arange(t)[None] < rng.integers(0, t + 1, n)[:, None]
    old = np.where(cmask, rng.normal(-2.0, 0.3, (n, t)), 0).astype(np.float32)
    adv = (rng.normal(size=(n, 1)) * cmask).astype(np.float32)
    rl_batch = steps_lib.RLBatch(prompt, pmask, comp, cmask, old, adv)
    sft_batch = steps_lib.SFTBatch(prompt, pmask, comp, cmask)

    if mode == "multi":
      assert plan.method == "explicit" and jax.process_count() == 2, plan
      assert len(jax.devices()) == 4 and len(jax.local_devices()) == 2
      mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2})
    else:
      assert plan.method == "none" and jax.process_count() == 1
      mesh = make_mesh((1, 1, 1))
    rows = distributed.process_batch_slice(n, mesh)
    local = lambda b: type(b)(*(None if x is None else x[rows] for x in b))

    opt = optax.adam(1e-2)
    state, sh = state_lib.create_train_state(cfg, opt, mesh, seed=0)
    gd = state_lib.model_graphdef(cfg)
    sft = steps_lib.jit_step(steps_lib.make_sft_step(gd, opt), sh, mesh,
                             process_local=True)
    rl = steps_lib.jit_step(steps_lib.make_rl_step(
        gd, opt, grpo().policy_loss, num_minibatches=2), sh, mesh)
    metrics = []
    for _ in range(2):
      state, m = sft(state, local(sft_batch))
      metrics.append({k: float(m[k]) for k in ("loss", "grad_norm")})
    # Rows placed by hand, and the full batch given on every process: the
    # two global arrays agree.
    placed = distributed.host_local_to_global(local(rl_batch), mesh,
                                              global_batch_size=n)
    full = distributed.global_batch_to_devices(rl_batch, mesh)
    for a, b, ref in zip(placed[:6], full[:6], rl_batch[:6]):
      assert np.array_equal(multihost_utils.process_allgather(a, tiled=True),
                            ref)
      assert np.array_equal(multihost_utils.process_allgather(b, tiled=True),
                            ref)
    for _ in range(2):
      state, m = rl(state, placed)
      metrics.append({k: float(m[k]) for k in ("loss", "grad_norm")})

    result = dict(rows=[rows.start, rows.stop], metrics=metrics,
                  num_devices=len(jax.devices()))
    # As at the SFT -> RL switch: a fresh optimiser state and step counter,
    # created as global arrays that every process can checkpoint.
    state = state_lib.reset_optimizer(state, optax.adam(1e-3), sh)
    if mode == "multi":
      ck = ckpt_lib.Checkpointer(os.path.join(out, "ckpt"))
      ck.save(4, state, {"phase": "rl", "who": "two processes"})
      result["latest"] = ck.latest_step()
      ck.close()
      host = multihost_utils.process_allgather(state, tiled=True)
      if pid == 0:
        leaves = [np.asarray(x) for x in jax.tree.leaves(host)]
        np.savez(os.path.join(out, "saved.npz"), *leaves)
    else:
      ck = ckpt_lib.Checkpointer(os.path.join(out, "ckpt"))
      abstract, sh1 = state_lib.state_shardings(cfg, opt, mesh, seed=0)
      restored, meta = ck.restore(ck.latest_step(), abstract, sh1)
      saved = np.load(os.path.join(out, "saved.npz"))
      got = [np.asarray(x) for x in jax.tree.leaves(restored)]
      want = [saved[f"arr_{i}"] for i in range(len(got))]
      result["restored_equal"] = all(
          a.shape == b.shape and np.array_equal(a, b)
          for a, b in zip(got, want))
      result["restored_vs_single"] = max(
          float(np.max(np.abs(a.astype(np.float64) - np.asarray(b))))
          for a, b in zip(got, jax.tree.leaves(state)) if a.size)
      result["meta"] = meta
      result["num_leaves"] = len(got)
    with open(os.path.join(out, f"result_{mode}_{pid}.json"), "w") as f:
      json.dump(result, f)
""")


def _run(procs_env, out, mode):
  procs = [subprocess.Popen([sys.executable, "-c", _WORKER, mode, out],
                            cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
           for env in procs_env]
  logs = []
  try:
    for proc in procs:
      logs.append(proc.communicate(timeout=TIMEOUT_S)[0])
  except subprocess.TimeoutExpired:
    for proc in procs:
      proc.kill()
    pytest.fail(f"{mode} run hung for more than {TIMEOUT_S}s (a collective "
                "that never completed?)")
  for proc, log in zip(procs, logs):
    assert proc.returncode == 0, log[-4000:]


def test_two_processes_match_one_and_share_checkpoints(tmp_path):
  out = str(tmp_path)
  base = {k: v for k, v in os.environ.items()
          if not k.startswith(("RLAX_", "SLURM_"))}
  base["PYTHONPATH"] = REPO
  addr = f"127.0.0.1:{portpicker.pick_unused_port()}"
  multi_env = [dict(base, RLAX_COORDINATOR_ADDRESS=addr,
                    RLAX_NUM_PROCESSES="2", RLAX_PROCESS_ID=str(i))
               for i in range(2)]
  _run(multi_env, out, "multi")
  _run([base], out, "single")

  res = {}
  for name in ("multi_0", "multi_1", "single_0"):
    with open(os.path.join(out, f"result_{name}.json")) as f:
      res[name] = json.load(f)
  # Each process loaded half the rows; one process loads them all.
  assert res["multi_0"]["rows"] == [0, 4]
  assert res["multi_1"]["rows"] == [4, 8]
  assert res["single_0"]["rows"] == [0, 8]
  assert res["multi_0"]["num_devices"] == 4
  ref = res["single_0"]["metrics"]
  assert len(ref) == 4 and ref[0]["loss"] > 1.0  # ~log(32) at init
  for name in ("multi_0", "multi_1"):
    got = res[name]["metrics"]
    for step, (g, r) in enumerate(zip(got, ref)):
      for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(g[key], r[key], rtol=1e-5, atol=1e-6,
                                   err_msg=f"{name} step {step} {key}")
  # The losses moved, so the comparison covers updated parameters.
  assert abs(ref[1]["loss"] - ref[0]["loss"]) > 1e-3
  # Written by both processes, read back by one: the very same values.
  assert res["multi_0"]["latest"] == 4 and res["multi_1"]["latest"] == 4
  single = res["single_0"]
  assert single["restored_equal"] and single["num_leaves"] > 10
  assert single["meta"] == {"phase": "rl", "who": "two processes"}
  assert single["restored_vs_single"] < 1e-4
  # Only the primary process wrote the metadata file: one copy, complete.
  step_dir = os.path.join(out, "ckpt", "4")
  assert sorted(os.listdir(os.path.join(out, "ckpt"))) == ["4"]
  with open(os.path.join(step_dir, "meta", "metadata")) as f:
    assert json.load(f)["who"] == "two processes"


def test_plan_reads_explicit_coordinator_from_the_environment():
  env = {"RLAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
         "RLAX_NUM_PROCESSES": "4", "RLAX_PROCESS_ID": "3"}
  assert distributed.plan(None, env, tpu_present=False) == distributed.Plan(
      "explicit", "10.0.0.1:1234", 4, 3, None)
  # The config wins over the environment.
  p = distributed.plan(dict(coordinator_address="h:9", num_processes=2,
                            process_id=0, local_device_ids="0,1"), env,
                       tpu_present=False)
  assert p == distributed.Plan("explicit", "h:9", 2, 0, (0, 1))


def test_plan_detects_slurm():
  env = {"SLURM_JOB_ID": "12345", "SLURM_NTASKS": "4", "SLURM_PROCID": "2",
         "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": "4",
         "SLURM_STEP_NODELIST": "gpu[007-010]",
         "SLURM_JOB_NODELIST": "gpu[001-010]"}
  p = distributed.plan(None, env, tpu_present=False)
  # One task per node: every local GPU; the port derives from the job id.
  assert p == distributed.Plan("slurm", "gpu007:47345", 4, 2, None)
  # Two tasks per node that both see all GPUs: one GPU each.
  env2 = dict(env, SLURM_NTASKS="8", SLURM_PROCID="5", SLURM_LOCALID="1",
              RLAX_COORDINATOR_PORT="6000")
  p2 = distributed.plan(None, env2, tpu_present=False)
  assert p2 == distributed.Plan("slurm", "gpu007:6000", 8, 5, (1,))
  # A one-task SLURM job (or a batch script outside srun) is one process.
  assert distributed.plan(None, dict(env, SLURM_NTASKS="1", SLURM_PROCID="0"),
                          tpu_present=False).method == "none"
  no_step = {k: v for k, v in env.items() if k != "SLURM_STEP_NODELIST"}
  assert distributed.plan(None, no_step, tpu_present=False).method == "none"


def test_first_slurm_host():
  assert distributed.first_slurm_host("node001") == "node001"
  assert distributed.first_slurm_host("node001,host2") == "node001"
  assert distributed.first_slurm_host("gpu[003-010,012],cpu1") == "gpu003"
  assert distributed.first_slurm_host("rack1-n[09,11-12]") == "rack1-n09"


def test_plan_tpu_and_single_process():
  assert distributed.plan(None, {}, tpu_present=True) == distributed.Plan("tpu")
  assert distributed.plan(None, {}, tpu_present=False) == distributed.Plan(
      "none")
  assert distributed.plan(dict(method="none"), {"RLAX_COORDINATOR_ADDRESS":
                                                "h:1"}).method == "none"
  # Single process: initialize() is a no-op that reports it.
  assert distributed.initialize(dict(method="none")).method == "none"


def test_initialize_after_devices_are_in_use_names_the_fix():
  import jax  # pylint: disable=g-import-not-at-top
  jax.devices()
  with pytest.raises(RuntimeError, match="before any jax.devices"):
    distributed.initialize(dict(coordinator_address="127.0.0.1:1",
                                num_processes=2, process_id=0))


def test_process_rows_on_one_process():
  from rlax_llm.parallel.mesh import make_mesh  # pylint: disable=g-import-not-at-top
  mesh = make_mesh((1, 1, 1))
  assert distributed.process_batch_slice(6) == slice(0, 6)
  assert distributed.process_batch_slice(6, mesh) == slice(0, 6)
  batch = {"x": np.arange(12).reshape(6, 2)}
  out = distributed.host_local_to_global(batch, mesh, global_batch_size=6)
  np.testing.assert_array_equal(np.asarray(out["x"]), batch["x"])
  with pytest.raises(ValueError, match="holds 6 of the 6 rows but was given 3"):
    distributed.host_local_to_global({"x": np.zeros((3, 2))}, mesh,
                                     global_batch_size=6)


@pytest.mark.parametrize("section, env, needle", [
    (dict(num_processes=2), {}, "no coordinator address"),
    (dict(method="explicit"), {}, "no coordinator address"),
    (dict(coordinator_address="h"), {}, "needs a port"),
    (dict(coordinator_address="h:1"), {}, "number of processes"),
    (dict(coordinator_address="h:1", num_processes=2), {}, "process_id=-1"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), {},
     "process_id=2"),
    (dict(method="slurm"), {}, "not inside an `srun` step"),
    (dict(method="mpi"), {}, "is not one of"),
    (dict(coordinator="h:1"), {}, "Unknown distributed config fields"),
    (None, {"RLAX_NUM_PROCESSES": "two", "RLAX_COORDINATOR_ADDRESS": "h:1"},
     "not an integer"),
])
def test_plan_errors_name_the_fix(section, env, needle):
  with pytest.raises(ValueError, match=re.escape(needle)):
    distributed.plan(section, env, tpu_present=False)


_HOST_DEVICES = textwrap.dedent("""
    import json, os, sys
    # No forced device count (other XLA flags of the suite stay).
    os.environ["XLA_FLAGS"] = " ".join(
        f for f in os.environ.get("XLA_FLAGS", "").split()
        if "device_count" not in f)
    from rlax_llm.parallel import distributed
    import jax
    jax.config.update("jax_platforms", "cpu")
    n = distributed.use_host_devices(3)
    out = {"n": n, "devices": len(jax.devices()),
           "platform": jax.devices()[0].platform,
           "again_same": distributed.use_host_devices(3)}
    try:
      distributed.use_host_devices(2)
    except RuntimeError as e:
      out["error"] = str(e)
    json.dump(out, open(sys.argv[1], "w"))
""")


def test_use_host_devices_splits_the_cpu_before_first_use(tmp_path, forks):
  script, out = tmp_path / "host.py", tmp_path / "out.json"
  script.write_text(_HOST_DEVICES)
  proc = forks.run([sys.executable, str(script), str(out)], cwd=REPO,
                   timeout=TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(out.read_text())
  assert res["n"] == 3 and res["devices"] == 3 and res["platform"] == "cpu"
  assert res["again_same"] == 3
  assert "before the first JAX operation" in res["error"]


def test_use_host_devices_leaves_forced_device_counts_alone(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert distributed.use_host_devices(-1) == 0
  assert distributed.use_host_devices(0) == 0
  assert distributed.host_core_count() >= 1
  monkeypatch.delenv("XLA_FLAGS")
  with pytest.raises(ValueError, match="count must be"):
    distributed.use_host_devices(-2)
