"""End-to-end runs of the experiment layer on the smoke config."""

import json
import os
import sys
import textwrap

import numpy as np
import pytest

from configs import smoke
from rlax_llm import experiment
from rlax_llm.training.metrics import read_metrics

# One pytest-xdist worker runs the whole module (`--dist=loadgroup`, in
# pyproject.toml), so the smoke run behind the module's fixture is made once.
pytestmark = pytest.mark.xdist_group("experiment")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _strip_time(records):
  return [{k: v for k, v in r.items() if not k.startswith("time/")}
          for r in records]


def _run_cli(forks, workdir, *flags, timeout=300):
  cmd = [sys.executable, "-m", "experiments.train",
         "--config=configs/smoke.py", f"--workdir={workdir}", *flags]
  return forks.run(cmd, cwd=REPO, timeout=timeout)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("smoke")
  summary = experiment.run(smoke.get_config(), str(workdir))
  return workdir, summary


def test_smoke_run_writes_every_artifact(smoke_run):
  workdir, summary = smoke_run
  c = smoke.get_config()
  total = c.sft.steps + c.rl.steps
  on_disk = json.load(open(workdir / "summary.json"))
  for key in ("sft_accuracy", "final_accuracy"):
    assert 0.0 <= on_disk[key] <= 1.0
  assert on_disk["final_accuracy"] == summary["final_accuracy"]
  records = read_metrics(str(workdir / "metrics.jsonl"))
  train_steps = [r["step"] for r in records if "time/step_s" in r]
  assert train_steps == list(range(1, total + 1))
  eval_steps = [r["step"] for r in records if "eval/accuracy" in r]
  # Before RL, then every `eval.every` RL steps, and at the end.
  assert eval_steps == [c.sft.steps, c.sft.steps + 2, c.sft.steps + 4]
  evals = {r["step"]: r for r in records if "eval/accuracy" in r}
  assert summary["sft_accuracy"] == evals[c.sft.steps]["eval/accuracy"]
  assert summary["final_accuracy"] == evals[total]["eval/accuracy"]
  rl = [r for r in records if "rl/loss" in r]
  assert len(rl) == c.rl.steps
  # The rollout's log-probs match the trainer's recomputation.
  assert max(r["rl/logp_mismatch_max"] for r in rl) < 1e-4
  assert all(np.isfinite(r["rl/loss"]) for r in rl)
  assert os.listdir(workdir / "tensorboard")
  assert sorted(int(s) for s in os.listdir(workdir / "checkpoints")
                if s.isdigit())[-1] == total


def test_rerun_of_a_finished_run_changes_nothing(smoke_run):
  workdir, summary = smoke_run
  before = open(workdir / "metrics.jsonl").read()
  again = experiment.run(smoke.get_config(), str(workdir))
  assert open(workdir / "metrics.jsonl").read() == before
  assert again["final_accuracy"] == summary["final_accuracy"]


def test_same_seed_same_metrics_other_seed_differs(smoke_run, tmp_path):
  workdir, _ = smoke_run
  experiment.run(smoke.get_config(), str(tmp_path / "a"))
  ref = _strip_time(read_metrics(str(workdir / "metrics.jsonl")))
  assert _strip_time(read_metrics(str(tmp_path / "a/metrics.jsonl"))) == ref
  c = smoke.get_config()
  c.seed = 1
  experiment.run(c, str(tmp_path / "b"))
  assert _strip_time(read_metrics(str(tmp_path / "b/metrics.jsonl"))) != ref


def test_unknown_config_key_names_it_and_suggests(tmp_path, forks):
  out = _run_cli(forks, tmp_path / "w", "--config.rl.stepz=3", timeout=120)
  assert out.returncode == 2
  assert "rl.stepz" in out.stderr and "--config.rl.steps" in out.stderr
  assert not (tmp_path / "w").exists()


def test_unwritable_workdir_is_refused(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(PermissionError, match="cannot be written"):
    experiment.run(smoke.get_config(), str(blocker / "run"))


def test_prompt_longer_than_context_is_refused_before_compute(tmp_path):
  c = smoke.get_config()
  c.model.max_seq_len = 8  # prompts are up to 6 tokens, answers 4 + EOS
  with pytest.raises(ValueError, match="exceeds the model context"):
    experiment.run(c, str(tmp_path / "w"))
  assert not (tmp_path / "w" / "checkpoints").exists()
  assert not (tmp_path / "w" / "metrics.jsonl").exists()


def test_nan_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
  c = smoke.get_config()
  c.sft.learning_rate = 1e38  # parameters overflow within a few steps
  c.sft.grad_clip = 0.0
  c.sft.warmup_steps = 0
  c.checkpoint.every = 1
  with pytest.raises(FloatingPointError, match="Non-finite"):
    experiment.run(c, str(tmp_path / "w"))
  ckpts = [s for s in os.listdir(tmp_path / "w" / "checkpoints")
           if s.isdigit()]
  records = read_metrics(str(tmp_path / "w" / "metrics.jsonl"))
  # Every checkpoint left behind precedes the failing step.
  last_logged = records[-1]["step"] if records else 0
  assert all(int(s) <= last_logged for s in ckpts)


def test_resuming_with_a_different_config_is_refused(smoke_run):
  workdir, _ = smoke_run
  c = smoke.get_config()
  c.rl.learning_rate = 0.5
  with pytest.raises(ValueError, match="rl.learning_rate"):
    experiment.run(c, str(workdir))


def test_rollout_diversity_compares_sampling_and_latr(smoke_run, tmp_path,
                                                       forks):
  from experiments import rollout_diversity  # pylint: disable=g-import-not-at-top
  from rlax_llm.sampling import latr as latr_lib  # pylint: disable=g-import-not-at-top
  workdir, _ = smoke_run
  c = smoke.get_config()
  exp = experiment.Experiment(c, str(workdir))
  try:
    step, params = experiment.restore_policy(exp)
    assert step == c.sft.steps + c.rl.steps
    # eta = 0: no tree rows, so both modes draw the very same samples.
    same = rollout_diversity.measure(exp, params, latr_lib.TreeConfig(),
                                     prompts=3, rounds=1, g=4, eta=0.0)
    for key in ("distinct_per_group", "reward", "mean_length"):
      assert same[0][key] == same[1][key]
    assert 1.0 <= same[0]["distinct_per_group"] <= 4.0
    # Branch on every candidate, never prune: the 4-row tree fills with 3
    # branches, every path differs at its branch token, so all 4 differ.
    every = latr_lib.TreeConfig(tau_abs=0.0, tau_rel=1.0, tau_ed=0.0,
                                windows=(1,)).validate()
    sample, tree = rollout_diversity.measure(exp, params, every, prompts=3,
                                             rounds=2, g=4, eta=1.0)
  finally:
    exp.close()
  assert sample["tree_rows"] == 0 and tree["tree_rows"] == 4
  assert tree["branches_opened"] == 3.0 and tree["branches_pruned"] == 0.0
  assert tree["distinct_tree"] == 4.0 == tree["distinct_per_group"]
  assert sample["prompts"] == tree["prompts"] == 6
  missing = forks.run(
      [sys.executable, "-m", "experiments.rollout_diversity",
       "--config=configs/smoke.py", f"--workdir={tmp_path / 'none'}"],
      cwd=REPO, timeout=300)
  assert missing.returncode == 2 and "train first" in missing.stderr


def test_evaluate_scores_the_latest_checkpoint_like_training(smoke_run,
                                                             tmp_path, forks):
  workdir, summary = smoke_run
  out = forks.run(
      [sys.executable, "-m", "experiments.evaluate",
       "--config=configs/smoke.py", f"--workdir={workdir}", "--split=test"],
      cwd=REPO, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  c = smoke.get_config()
  assert result["step"] == c.sft.steps + c.rl.steps
  # Same params, same evaluation key: the final evaluation is reproduced.
  for key in ("accuracy", "pass@1", f"pass@{c.eval.num_samples}",
              f"maj@{c.eval.num_samples}"):
    assert result[key] == summary["final_eval"][key]
  assert json.load(open(workdir / f"eval_step{result['step']}.json")) == result
  missing = forks.run(
      [sys.executable, "-m", "experiments.evaluate",
       "--config=configs/smoke.py", f"--workdir={tmp_path / 'none'}"],
      cwd=REPO, timeout=300)
  assert missing.returncode == 2 and "train first" in missing.stderr


def test_negative_length_buckets_is_refused_with_its_name():
  from configs import base  # pylint: disable=g-import-not-at-top
  from rlax_llm.experiment import config_utils  # pylint: disable=g-import-not-at-top
  c = base.get_config()
  c.rl.length_buckets = 3
  config_utils.validate(c)  # a positive int is accepted
  c.rl.length_buckets = -1
  with pytest.raises(ValueError, match=r"rl\.length_buckets must be an int"):
    config_utils.validate(c)


def test_run_stored_before_length_buckets_resumes_only_without_them(tmp_path):
  from configs import base  # pylint: disable=g-import-not-at-top
  from rlax_llm.experiment import config_utils  # pylint: disable=g-import-not-at-top
  c = base.get_config()
  saved = json.loads(c.to_json_best_effort(sort_keys=True))
  del saved["rl"]["length_buckets"]  # a run stored before the field existed
  (tmp_path / "config.json").write_text(json.dumps(saved))
  config_utils.check_resume_config(str(tmp_path), c, resuming=True)
  (tmp_path / "config.json").write_text(json.dumps(saved))
  c.rl.length_buckets = 4  # would change how the rest of the run computes
  with pytest.raises(ValueError, match=r"rl\.length_buckets: None -> 4"):
    config_utils.check_resume_config(str(tmp_path), c, resuming=True)


_SPLIT_RUN = textwrap.dedent("""
    import json, sys
    from configs import smoke
    from rlax_llm import experiment
    from rlax_llm.parallel import distributed

    c = smoke.get_config()
    c.distributed.host_devices = 2  # host_layout "auto": split here
    distributed.initialize(c.distributed, c.mesh)
    import jax
    exp = experiment.Experiment(c, sys.argv[1])
    print(json.dumps({
        "devices": len(jax.devices()),
        "update_devices": int(exp.mesh.devices.size),
        "rollout_devices": int(exp.engine.ctx.mesh.devices.size)}))
    exp.run()
""")

# Fed by the rollout log-probs: equal up to their float rounding.
_ROUNDED = ("rl/logp_mismatch", "rl/ratio", "rl/approx_kl", "rl/clip",
            "rl/loss", "rl/grad_norm")


@pytest.mark.slow
def test_split_layout_run_matches_the_one_device_run(smoke_run, tmp_path,
                                                     forks):
  """The default host layout ("auto") on two CPU devices is "split":
  rollouts and evaluations decode over both (the same tokens as one device:
  the sampling keys are per row), the updates run on the first; the metrics
  are those of the module's one-device run."""
  script = tmp_path / "split.py"
  script.write_text(_SPLIT_RUN)
  proc = forks.run([sys.executable, str(script), str(tmp_path / "split")],
                   cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.strip().splitlines()[0]) == {
      "devices": 2, "update_devices": 1, "rollout_devices": 2}
  one = read_metrics(str(smoke_run[0] / "metrics.jsonl"))
  split = read_metrics(str(tmp_path / "split" / "metrics.jsonl"))
  assert [r["step"] for r in split] == [r["step"] for r in one]
  assert any("rl/loss" in r for r in one)
  for a, b in zip(one, split):
    assert a.keys() == b.keys()
    for k, v in a.items():
      if k.startswith("time/"):
        continue
      if k.startswith(_ROUNDED):
        np.testing.assert_allclose(b[k], v, rtol=1e-4, atol=1e-6, err_msg=k)
      else:  # tokens, rewards, accuracies: the same
        assert b[k] == v, (a["step"], k, v, b[k])
