"""Tests of experiments/plot.py on a metrics.jsonl written by hand."""

import json
import os

import numpy as np
import pytest

from experiments import plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SFT_STEPS = 5
RL_STEPS = 6


def _records():
  """SFT steps 1..5, an eval at 5, RL steps 6..11 with evals at 8 and 11."""
  recs = [{"step": s, "sft/loss": 4.0 / s, "sft/entropy": 3.0}
          for s in range(1, SFT_STEPS + 1)]
  recs.append({"step": SFT_STEPS, "eval/accuracy": 0.25, "eval/pass@1": 0.2,
               "eval/pass@8": 0.5, "eval/mean_length": 3.0})
  for i in range(RL_STEPS):
    s = SFT_STEPS + 1 + i
    recs.append({"step": s, "reward/mean": 0.1 * i, "reward/std": 0.3,
                 "rl/loss": -0.01 * i, "rl/entropy": 2.0 - 0.1 * i,
                 "rl/approx_kl": 0.001 * i, "rl/clip_frac": 0.01 * i,
                 "rollout/length": 4.0 + i})
    if s in (8, 11):
      recs.append({"step": s, "eval/accuracy": 0.3 + 0.01 * s,
                   "eval/pass@1": 0.25, "eval/pass@8": 0.6,
                   "eval/mean_length": 3.0})
  return recs


def _write(workdir, records, tail=""):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
    f.write(tail)


def _assert_png(path):
  assert os.path.getsize(path) > len(PNG_MAGIC)
  with open(path, "rb") as f:
    assert f.read(8) == PNG_MAGIC


def test_plot_run_writes_all_figures(tmp_path):
  _write(str(tmp_path), _records())
  paths = plot.plot_run(str(tmp_path))
  names = [os.path.basename(p) for p in paths]
  assert names == ["reward.png", "accuracy.png", "sft_loss.png",
                   "rl_stats.png"]
  for p in paths:
    assert os.path.dirname(p) == str(tmp_path)
    _assert_png(p)


def test_plot_run_out_dir_and_torn_last_line(tmp_path):
  run, out = tmp_path / "run", tmp_path / "plots" / "nested"
  # A run killed mid-write leaves a partial last line.
  _write(str(run), _records(), tail='{"step": 12, "reward/me')
  paths = plot.plot_run(str(run), str(out))
  assert len(paths) == 4
  assert all(os.path.dirname(p) == str(out) for p in paths)
  assert not any(name.endswith(".png") for name in os.listdir(run))
  for p in paths:
    _assert_png(p)


def test_sft_only_run_writes_what_it_has(tmp_path):
  recs = [r for r in _records() if r["step"] <= SFT_STEPS]
  _write(str(tmp_path), recs)
  names = [os.path.basename(p) for p in plot.plot_run(str(tmp_path))]
  assert names == ["accuracy.png", "sft_loss.png"]


def test_series_rl_start_and_pass_keys():
  recs = _records()
  steps, reward = plot.series(recs, "reward/mean")
  np.testing.assert_array_equal(steps, np.arange(6, 12))
  np.testing.assert_allclose(reward, 0.1 * np.arange(6))
  steps, acc = plot.series(recs, "eval/accuracy")
  np.testing.assert_array_equal(steps, [5, 8, 11])
  np.testing.assert_allclose(acc, [0.25, 0.38, 0.41])
  assert plot.rl_start_step(recs) == SFT_STEPS + 1
  assert plot.rl_start_step(recs[:SFT_STEPS]) is None
  assert plot.pass_at_keys(recs) == ["eval/pass@1", "eval/pass@8"]


def test_series_reads_non_finite_strings():
  recs = [{"step": 1, "rl/loss": 1.5}, {"step": 2, "rl/loss": "nan"},
          {"step": 3, "rl/loss": "inf"}, {"step": 4}]
  steps, v = plot.series(recs, "rl/loss")
  np.testing.assert_array_equal(steps, [1, 2, 3])
  assert v[0] == 1.5 and np.isnan(v[1]) and v[2] == np.inf


def _moving_average_reference(x, window):
  return np.array([np.mean(x[max(0, i - window + 1):i + 1])
                   for i in range(len(x))])


@pytest.mark.parametrize("n,window", [(1, 1), (7, 1), (7, 3), (20, 5),
                                      (4, 10)])
def test_moving_average_matches_numpy_reference(n, window):
  x = np.random.default_rng(n * 100 + window).normal(size=n)
  np.testing.assert_allclose(plot.moving_average(x, window),
                             _moving_average_reference(x, window),
                             rtol=1e-12, atol=1e-12)


def test_moving_average_hand_values():
  np.testing.assert_allclose(plot.moving_average([1.0, 2.0, 3.0, 4.0], 2),
                             [1.0, 1.5, 2.5, 3.5])
  assert plot.moving_average([], 3).shape == (0,)
  with pytest.raises(ValueError, match="window"):
    plot.moving_average([1.0], 0)


def test_missing_metrics_names_path_and_fix(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    plot.plot_run(str(tmp_path / "nope"))
  msg = str(e.value)
  assert os.path.join(str(tmp_path / "nope"), "metrics.jsonl") in msg
  assert "experiments.train" in msg


def test_empty_metrics_is_a_clear_error(tmp_path):
  _write(str(tmp_path), [], tail='{"step": 1, "sf')
  with pytest.raises(ValueError, match="no complete record"):
    plot.plot_run(str(tmp_path))


def _rl_records(scale, tokens):
  """RL steps 1..4 (`tokens[i]` sampled at step i + 1, 2 s per step) with
  evaluations at steps 0, 2 and 4 (accuracy 0.1 * scale * k at the k-th)."""
  recs = [{"step": 0, "eval/accuracy": 0.0}]
  for i, tok in enumerate(tokens):
    s = i + 1
    recs.append({"step": s, "reward/mean": 0.2 * scale, "rl/entropy": 1.0,
                 "rollout/length_wrong": 10.0 + s,
                 "rollout/sampled_tokens": tok, "time/step_s": 2.0})
    if s % 2 == 0:
      recs.append({"step": s, "eval/accuracy": 0.1 * scale * s / 2})
  return recs


def test_eval_curve_costs_by_hand():
  c = plot.eval_curve(_rl_records(1.0, [10, 20, 30, 40]))
  np.testing.assert_array_equal(c["step"], [0, 2, 4])
  np.testing.assert_allclose(c["accuracy"], [0.0, 0.1, 0.2])
  np.testing.assert_array_equal(c["tokens"], [0, 30, 100])
  np.testing.assert_array_equal(c["wall_s"], [0, 4, 8])


def test_plot_arms_from_a_reproduction_dir(tmp_path, capsys):
  out = tmp_path / "repro"
  _write(str(out / "grpo" / "seed0"), _rl_records(1.0, [10] * 4))
  _write(str(out / "grpo" / "seed1"), _rl_records(2.0, [20] * 4))
  _write(str(out / "branch" / "seed0"), _rl_records(1.5, [5] * 4))
  (out / "branch" / "seed1").mkdir()  # not started: no metrics
  (out / "table.md").write_text("| arm |\n")
  runs = plot.arm_runs(str(out))
  assert list(runs) == ["branch", "grpo"] and len(runs["grpo"]) == 2
  assert [len(r) for r in runs["branch"]] == [7]
  xs, mean, lo, hi = plot._mean_band(  # pylint: disable=protected-access
      [plot.eval_curve(r) for r in runs["grpo"]], "tokens")
  np.testing.assert_allclose(xs, [0, 30, 60])  # mean of 20/40, 40/80
  np.testing.assert_allclose(mean, [0, 0.15, 0.3])
  np.testing.assert_allclose(lo, [0, 0.1, 0.2])
  np.testing.assert_allclose(hi, [0, 0.2, 0.4])
  paths = plot.plot_arms(str(out))
  assert [os.path.basename(p) for p in paths] == ["arms_accuracy.png",
                                                 "arms_stats.png"]
  for p in paths:
    _assert_png(p)
  # The command line tells a reproduction's output from a run directory.
  for p in paths:
    os.remove(p)
  argv = plot.flags.FLAGS(["plot", str(out)])  # parses --out, --window
  plot.main(argv)
  assert sorted(os.listdir(out)) == ["arms_accuracy.png", "arms_stats.png",
                                     "branch", "grpo", "table.md"]
  assert "arms_accuracy.png" in capsys.readouterr().out
  # --prefix names the PNGs of a reproduction; a single run refuses it.
  figs = tmp_path / "figs"
  plot.main(plot.flags.FLAGS(["plot", str(out), f"--out={figs}",
                              "--prefix=demo_"]))
  assert sorted(os.listdir(figs)) == ["demo_arms_accuracy.png",
                                      "demo_arms_stats.png"]
  with pytest.raises(plot.app.UsageError, match="--prefix"):
    plot.main(plot.flags.FLAGS(["plot", str(out / "grpo" / "seed0"),
                                "--prefix=demo_"]))
  plot.flags.FLAGS["prefix"].value = ""  # back to the defaults
  plot.flags.FLAGS["out"].value = None
  with pytest.raises(FileNotFoundError, match="<arm>/seed<k>"):
    plot.plot_arms(str(tmp_path / "empty_dir_that_is_missing"))
