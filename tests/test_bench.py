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


def test_logprobs_json_lines():
  proc = _bench("logprobs", "--json", "--tokens=96", "--vocab=1000",
                "--width=16", "--chunk_size=32", "--vocab_chunk=0",
                "--repeats=2", "--nofull_size")
  assert proc.returncode == 0, proc.stderr
  records = [json.loads(line) for line in proc.stdout.strip().splitlines()]
  assert [(r["path"], r["mode"]) for r in records] == [
      ("chunked", "forward"), ("chunked", "forward_backward"),
      ("naive", "forward"), ("naive", "forward_backward")]
  for rec in records:
    assert rec["bench"] == "logprobs" and rec["executed"]
    assert (rec["tokens"], rec["vocab"], rec["width"]) == (96, 1000, 16)
    assert rec["logits_bytes"] == 96 * 1000 * 4
    assert len(rec["seconds_all"]) == 2
    assert min(rec["seconds_all"]) <= rec["seconds_median"] <= max(
        rec["seconds_all"])
    assert rec["peak_bytes"] == (rec["temp_bytes"] + rec["argument_bytes"] +
                                 rec["output_bytes"])
    # hidden + kernel + targets in, [1, 96] logp and entropy out.
    assert rec["argument_bytes"] >= (96 * 16 + 16 * 1000 + 96) * 4
    assert rec["output_bytes"] >= 2 * 96 * 4
    assert rec["device"] and rec["jax_version"]
  by_key = {(r["path"], r["mode"]): r for r in records}
  assert by_key["chunked", "forward"]["chunk_size"] == 32
  assert by_key["chunked", "forward"]["vocab_chunk"] is None  # 0: dense
  assert by_key["naive", "forward"]["chunk_size"] is None
  for mode in ("forward", "forward_backward"):
    assert (by_key["chunked", mode]["temp_bytes"] <
            by_key["naive", mode]["temp_bytes"])
  assert by_key["naive", "forward"]["temp_bytes"] >= 96 * 1000 * 4


def test_bench_logprobs_full_size_is_analysed_not_run():
  records = bench.bench_logprobs(8, vocab=64, width=8, chunk_size=4,
                                 vocab_chunk=16, repeats=1)
  assert len(records) == 8
  full = [r for r in records if not r["executed"]]
  assert [(r["path"], r["mode"]) for r in full] == [
      ("chunked", "forward"), ("chunked", "forward_backward"),
      ("naive", "forward"), ("naive", "forward_backward")]
  for rec in full:
    assert (rec["tokens"], rec["vocab"], rec["width"]) == (8192, 151936, 896)
    assert "seconds_median" not in rec
  by_key = {(r["path"], r["mode"]): r for r in full}
  # The naive forward holds the full float32 logits (~5 GB); the chunked one
  # only one [4, 16] block at a time.
  assert by_key["naive", "forward"]["temp_bytes"] >= 8192 * 151936 * 4
  assert by_key["chunked", "forward"]["temp_bytes"] < 2**20
  assert by_key["chunked", "forward"]["vocab_chunk"] == 16


def test_logprobs_table():
  recs = bench.bench_logprobs(8, vocab=32, width=4, chunk_size=4, repeats=1,
                              full_size=False)
  lines = bench._logprobs_table(recs).splitlines()  # pylint: disable=protected-access
  assert lines[0].split()[:2] == ["path", "mode"]
  assert [line.split()[:2] for line in lines[2:]] == [
      ["chunked", "forward"], ["chunked", "forward_backward"],
      ["naive", "forward"], ["naive", "forward_backward"]]
