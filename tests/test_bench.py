"""Tests of experiments/bench.py: the JSON contract and the token count."""

import json
import os
import subprocess
import sys

import pytest

from experiments import bench

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(*args):
  return subprocess.run(
      [sys.executable, "-m", "experiments.bench", *args], cwd=REPO_ROOT,
      capture_output=True, text=True, timeout=300, check=False)


def test_generate_json_lines():
  proc = _bench("generate", "--json", "--sequences=4,8", "--new_tokens=8",
                "--repeats=2", "--samples_per_prompt=4")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 2  # one object per measurement, nothing else
  records = [json.loads(line) for line in lines]
  for rec, n in zip(records, (4, 8)):
    assert rec["bench"] == "generate"
    assert rec["sequences"] == n
    assert rec["samples_per_prompt"] == 4
    assert rec["batch"] == n // 4
    assert rec["new_tokens"] == 8
    assert rec["tokens"] == n * 8
    assert rec["tokens_per_s"] > 0
    assert len(rec["seconds_all"]) == 2
    assert min(rec["seconds_all"]) <= rec["seconds_median"] <= max(
        rec["seconds_all"])
    assert rec["tokens_per_s"] == pytest.approx(n * 8 / rec["seconds_median"])
    assert rec["compile_s"] > 0
    assert rec["params"] > 0 and rec["model"] == "tiny"
    for key in ("device", "jax_version"):
      assert rec[key]


def test_bench_generate_in_process_counts_exact_tokens():
  # 4 sequences with G=8 asked: G is capped at 4, one prompt.
  rec = bench.bench_generate(4, samples_per_prompt=8, new_tokens=8, repeats=1)
  assert (rec["batch"], rec["samples_per_prompt"], rec["sequences"]) == (1, 4, 4)
  assert rec["new_tokens"] == 8 and rec["tokens"] == 32
  assert rec["tokens_per_s"] == pytest.approx(32 / rec["seconds_all"][0])


def test_bad_sizes_are_clear_errors():
  with pytest.raises(ValueError, match="multiple of --samples_per_prompt"):
    bench.bench_generate(12, samples_per_prompt=8, new_tokens=2, repeats=1)
  with pytest.raises(ValueError, match="Unknown model preset"):
    bench.bench_generate(4, new_tokens=2, repeats=1, preset="nope")


def test_unknown_benchmark_lists_choices():
  proc = _bench("sample", "--json")
  assert proc.returncode != 0
  assert "Unknown benchmark ['sample']" in proc.stderr
  assert "generate" in proc.stderr
  assert proc.stdout == ""


def test_table_lists_each_measurement():
  recs = [dict(bench="generate", batch=b, samples_per_prompt=8, sequences=8 * b,
               new_tokens=128, seconds_median=0.5, tokens_per_s=2048.0 * b,
               compile_s=1.25, model="tiny", params=400256, device="cpu",
               backend="cpu", num_devices=1, jax_version="0.0")
          for b in (2, 32)]
  lines = bench._table(recs).splitlines()  # pylint: disable=protected-access
  assert lines[0].split()[:4] == ["bench", "B", "x", "G"]
  assert lines[2].split() == ["generate", "2", "x", "8", "16", "128", "0.5000",
                              "4,096", "1.25"]
  assert lines[3].split()[4] == "256" and lines[3].split()[7] == "65,536"
  assert "tiny (400,256 params)" in lines[-1]
