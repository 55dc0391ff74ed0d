"""Runs that survive what a cluster job meets: damaged checkpoints, kills, full disks.

Every test drives `python -m experiments.train` in a process of its own on
a tiny version of an engine's config and compares the outcome with an
uninterrupted run of the same command (metrics.jsonl without its `time/`
fields, and summary.json without its wall time), shared per module:

  * the latest checkpoint's array files truncated (or its JSON metadata
    cut): the run says so on stderr, moves it to checkpoints/damaged/ and
    finishes from the intact one before it with the uninterrupted metrics;
  * no intact checkpoint left: it stops, naming the directory and the fix;
  * SIGKILL of each engine (sample, latr, branch, april, PPO) inside a save
    (`RLAX_FAULT_KILL_IN_SAVE`, at a seeded step and phase; for APRIL a
    save whose metadata holds carried rollouts) and at a seeded random
    point of the next attempt, then a plain re-run: the uninterrupted
    metrics, so no rollout was lost or used twice;
  * no space left on the device during a save: a clear error, the previous
    checkpoint intact, and a re-run that finishes like the uninterrupted one;
  * a larger `--config.rl.steps` extends a finished run to exactly the
    metrics of a run given that budget from the start; a smaller one is
    refused.

The "sample" engine's kill test is the plain SIGKILL-then-resume check of
the default config (smoke-sized), in the RL phase as well as the SFT one; its
uninterrupted run is also where the damaged-checkpoint, disk-full and
budget tests start.

The runs are processes forked from one that imported the project
(`tests/forkrun.py`: a command's own process, minus ~2.5 s of imports each);
they share the suite's XLA compilation cache (tests/conftest.py).
"""

import glob
import json
import os
import random
import shutil
import signal
import sys
import textwrap
import time

import pytest

from rlax_llm.training.metrics import read_metrics

# One pytest-xdist worker runs the whole module (`--dist=loadgroup`, in
# pyproject.toml), so each uninterrupted reference run is made once.
pytestmark = pytest.mark.xdist_group("kill_anywhere")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Smoke-sized overrides shared by every engine. SFT ends at an odd step so
# that APRIL's checkpoints at the even RL steps hold carried rollouts.
TINY = ("--config.sft.steps=5", "--config.sft.batch_size=8",
        "--config.sft.warmup_steps=2", "--config.rl.steps=4",
        "--config.rl.prompts_per_step=2", "--config.rl.warmup_steps=2",
        "--config.eval.every=2", "--config.eval.num_problems=8",
        "--config.eval.num_samples=2", "--config.eval.batch_size=8",
        "--config.checkpoint.every=2", "--config.progress=False")
TOTAL = 9  # sft.steps + rl.steps
# Checkpoints of a tiny run: SFT every 2 steps, the SFT->RL switch, then
# every 2 steps and the last.
SAVES = (2, 4, 5, 6, 8, 9)

ENGINES = {
    "sample": ("configs/smoke.py", TINY + ("--config.rl.num_samples=4",)),
    "latr": ("configs/latr_arith.py", TINY + ("--config.rl.num_samples=4",)),
    "branch": ("configs/branch_arith.py", TINY),  # 16 leaves per tree
    # Arithmetic rows all finish within the budget: the buffer carries
    # groups across saves only with the surplus kept.
    "april": ("configs/april_arith.py", TINY + ("--config.rl.num_samples=4",
                                                "--config.rollout.keep_surplus=True")),
    "ppo": ("configs/ppo.py", TINY + ("--config.rl.num_samples=4",)),
}
# The two checkpoints of a tiny run that are kept: the damaged-checkpoint
# tests start from the "sample" engine's uninterrupted run.
KEPT = SAVES[-2:]


def _command(engine, workdir, *extra):
  config, flags = ENGINES[engine]
  return [sys.executable, "-m", "experiments.train", f"--config={config}",
          f"--workdir={workdir}", *flags, *extra]


def _run(forks, engine, workdir, *extra, env=None, timeout=600):
  """`_command`'s run (`forks`: conftest's `forks` fixture)."""
  return forks.run(_command(engine, workdir, *extra), cwd=REPO, env=env,
                    timeout=timeout)


def _ok(proc):
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _metrics(workdir):
  return [{k: v for k, v in r.items() if not k.startswith("time/")}
          for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))]


def _summary(workdir):
  with open(os.path.join(workdir, "summary.json")) as f:
    s = json.load(f)
  s.pop("wall_time_s")
  return s


def _assert_same_run(workdir, reference):
  got, want = _metrics(workdir), _metrics(reference)
  assert [r["step"] for r in got] == [r["step"] for r in want]
  assert got == want
  assert _summary(workdir) == _summary(reference)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, forks):
  """engine -> workdir of its uninterrupted tiny run (made on first use)."""
  runs = {}

  def get(engine, *extra):
    key = (engine, extra)
    if key not in runs:
      workdir = str(tmp_path_factory.mktemp(f"ref_{engine}"))
      _ok(_run(forks, engine, workdir, *extra))
      runs[key] = workdir
    return runs[key]
  return get


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def _array_files(step_dir):
  return [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"),
                               recursive=True) if os.path.isfile(f)]


@pytest.mark.parametrize("damage", [
    "truncate_arrays",
    pytest.param("cut_meta_json", marks=pytest.mark.slow)])
def test_damaged_latest_checkpoint_falls_back_and_finishes(forks, reference,
                                                           tmp_path, damage):
  ref = reference("sample")
  workdir = _copy(ref, tmp_path / "run")
  latest = os.path.join(workdir, "checkpoints", str(KEPT[-1]))
  if damage == "truncate_arrays":  # what a failing disk or a cut copy leaves
    for f in _array_files(latest):
      os.truncate(f, os.path.getsize(f) // 2)
  else:
    meta = os.path.join(latest, "meta", "metadata")
    os.truncate(meta, os.path.getsize(meta) - 7)
  os.remove(os.path.join(workdir, "summary.json"))
  proc = _ok(_run(forks, "sample", workdir))
  assert f"checkpoint step {KEPT[-1]} under" in proc.stderr
  assert "is damaged" in proc.stderr
  assert f"falling back to checkpoint step {KEPT[0]}" in proc.stderr
  assert "Traceback" not in proc.stderr
  # Kept for inspection, and replaced by a new, intact checkpoint.
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "damaged",
                                    f"step_{KEPT[-1]}"))
  assert os.path.isdir(latest)
  _assert_same_run(workdir, ref)


def test_no_intact_checkpoint_left_stops_with_directory_and_fix(forks,
                                                                reference,
                                                                tmp_path):
  workdir = _copy(reference("sample"), tmp_path / "run")
  ckpts = os.path.join(workdir, "checkpoints")
  steps = sorted(int(s) for s in os.listdir(ckpts) if s.isdigit())
  assert steps == list(KEPT)
  for s in steps:
    for f in _array_files(os.path.join(ckpts, str(s))):
      os.truncate(f, 5)
  before = open(os.path.join(workdir, "metrics.jsonl")).read()
  proc = _run(forks, "sample", workdir)
  assert proc.returncode != 0
  assert "No intact checkpoint is left under" in proc.stderr
  assert ckpts in proc.stderr and "--workdir" in proc.stderr
  # Nothing was lost: the damaged steps are kept, the metrics untouched.
  assert sorted(os.listdir(os.path.join(ckpts, "damaged"))) == [
      f"step_{s}" for s in steps]
  assert open(os.path.join(workdir, "metrics.jsonl")).read() == before
  # The refusal holds on the next attempt too (no silent fresh start).
  again = _run(forks, "sample", workdir)
  assert again.returncode != 0
  assert "No intact checkpoint is left under" in again.stderr


def _metrics_file_id(workdir):
  """The inode of workdir/metrics.jsonl, None when there is none."""
  try:
    return os.stat(os.path.join(workdir, "metrics.jsonl")).st_ino
  except FileNotFoundError:
    return None


def _kill_when(proc, workdir, step, delay_s, file_id, deadline_s=600):
  """SIGKILLs `proc` `delay_s` after its metrics reach `step`.

  Only the run's own metrics file counts: a run replaces metrics.jsonl when
  it starts (keeping the records up to its checkpoint), so the records a
  killed attempt left (inode `file_id`, taken before the launch) cannot
  trigger the kill while the run is still starting.
  """
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + deadline_s
  while proc.poll() is None and time.time() < deadline:
    if _metrics_file_id(workdir) != file_id:
      records = read_metrics(path)
      if records and records[-1]["step"] >= step:
        time.sleep(delay_s)
        break
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_kill_anywhere_then_rerun_matches_uninterrupted(forks, reference,
                                                        tmp_path, engine):
  from rlax_llm.training import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  ref = reference(engine)
  rng = random.Random(f"kill-anywhere:{engine}")
  workdir = str(tmp_path / "run")

  # 1. Killed inside a save. APRIL: a save whose metadata holds rollouts
  #    carried to the next step (the buffer is being written).
  step = 8 if engine == "april" else rng.choice(SAVES[:-1])
  # Between them the engines meet every phase of a save.
  phase = ckpt_lib._FAULT_PHASES[sorted(ENGINES).index(engine) % 3]  # pylint: disable=protected-access
  env = dict(os.environ, **{ckpt_lib.FAULT_ENV: f"{step}:{phase}"})
  proc = _run(forks, engine, workdir, env=env)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert not os.path.exists(os.path.join(workdir, "summary.json"))
  if engine == "april":  # the checkpoint resumed from carries rollouts
    ckpts = os.path.join(workdir, "checkpoints")
    newest = max(int(s) for s in os.listdir(ckpts) if s.isdigit())
    assert newest in (6, 8)
    with open(os.path.join(ckpts, str(newest), "meta", "metadata")) as f:
      carried = json.load(f)["rollout_state"]
    assert len(json.dumps(carried)) > 200, carried

  # 2. The re-run is killed at a seeded point: after a random step's metrics,
  #    a random fraction of a second later (in a step, an eval or a save).
  #    A compiled tiny step takes ~20 ms: when the run outruns the delay and
  #    finishes (exits, or is killed after writing its summary, while the
  #    interpreter shuts down), it is repeated from the same files with a
  #    quarter of it.
  at, delay = rng.randint(step, TOTAL - 1), rng.uniform(0.0, 0.3)
  before = _copy(workdir, tmp_path / "before_rerun")
  summary = os.path.join(workdir, "summary.json")
  for _ in range(5):
    file_id = _metrics_file_id(workdir)
    killed = forks.popen(_command(engine, workdir), cwd=REPO)
    _kill_when(killed, workdir, at, delay, file_id)
    if killed.returncode != 0 and not os.path.exists(summary):
      break
    shutil.rmtree(workdir)
    _copy(before, workdir)
    delay /= 4
  assert killed.returncode == -signal.SIGKILL, killed.output()[1][-3000:]
  assert not os.path.exists(summary)

  # 3. A plain re-run finishes as if nothing had happened.
  final = _ok(_run(forks, engine, workdir))
  assert "damaged" not in final.stderr
  _assert_same_run(workdir, ref)


_ENOSPC_LAUNCHER = textwrap.dedent("""
    import errno, re, runpy, sys
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as h

    FULL_AT = int(sys.argv[1])

    async def full(self, x, directory):  # the metadata item of one step
      step = re.search(r"checkpoints/(\\d+)", str(directory))
      if step and int(step[1]) == FULL_AT:
        (directory / "metadata").write_text('{"cut')
        raise OSError(errno.ENOSPC, "No space left on device")
      return await ORIGINAL(self, x, directory)
    ORIGINAL = h.JsonCheckpointHandler._save_fn
    h.JsonCheckpointHandler._save_fn = full
    sys.argv = ["experiments.train"] + sys.argv[2:]
    runpy.run_module("experiments.train", run_name="__main__")
""")


@pytest.mark.slow
def test_disk_full_during_a_save_stops_clearly_and_loses_nothing(forks,
                                                                 reference,
                                                                 tmp_path):
  ref = reference("sample")
  workdir = str(tmp_path / "run")
  cmd = _command("sample", workdir)
  proc = forks.run(
      [sys.executable, "-c", _ENOSPC_LAUNCHER, "6", *cmd[3:]], cwd=REPO,
      timeout=600)
  assert proc.returncode != 0
  assert "Could not write checkpoint step 6" in proc.stderr
  assert "No space left on device" in proc.stderr
  assert "step 5 is intact" in proc.stderr
  ckpts = os.path.join(workdir, "checkpoints")
  assert sorted(int(s) for s in os.listdir(ckpts) if s.isdigit()) == [4, 5]
  assert not os.path.exists(os.path.join(workdir, "summary.json"))
  final = _ok(_run(forks, "sample", workdir))
  assert "damaged" not in final.stderr
  _assert_same_run(workdir, ref)


@pytest.mark.slow
def test_larger_budget_extends_a_finished_run_smaller_is_refused(forks,
                                                                 reference,
                                                                 tmp_path):
  workdir = _copy(reference("sample"), tmp_path / "run")
  longer = reference("sample", "--config.rl.steps=6")
  _ok(_run(forks, "sample", workdir, "--config.rl.steps=6"))
  _assert_same_run(workdir, longer)
  before = open(os.path.join(workdir, "metrics.jsonl")).read()
  proc = _run(forks, "sample", workdir, "--config.rl.steps=3")
  assert proc.returncode != 0
  assert "--config.rl.steps=3 is smaller than the 6 RL steps" in proc.stderr
  assert "--config.rl.steps=6" in proc.stderr
  assert open(os.path.join(workdir, "metrics.jsonl")).read() == before
