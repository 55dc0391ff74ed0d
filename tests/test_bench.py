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
                "--repeats=2", "--samples_per_prompt=4", "--notransformers",
                "--noroofline")
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
  rec = bench.bench_generate(4, samples_per_prompt=8, new_tokens=8, repeats=1,
                             transformers=False, roofline=False)
  assert "transformers_tokens_per_s" not in rec
  assert (rec["batch"], rec["samples_per_prompt"], rec["sequences"]) == (1, 4, 4)
  assert rec["new_tokens"] == 8 and rec["tokens"] == 32
  assert rec["tokens_per_s"] == pytest.approx(32 / rec["seconds_all"][0])
  # One device here (the suite's process): a one-device mesh, no chunking
  # for 4 rows (generate's automatic choice, recorded).
  assert rec["mesh"]["data"] == rec["num_devices"] == 1
  assert rec["decode_chunk"] == 0


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
  recs[1].update(transformers_tokens_per_s=32768.0, speedup_vs_transformers=2.0,
                 roofline_flops_per_s=1.5e11, roofline_fraction=0.25,
                 transformers_roofline_fraction=0.125, targets_met=False)
  lines = bench._table(recs).splitlines()  # pylint: disable=protected-access
  assert lines[0].split()[:4] == ["bench", "B", "x", "G"]
  assert lines[2].split()[:9] == ["generate", "2", "x", "8", "16", "128",
                                  "0.5000", "4,096", "1.25"]
  assert lines[2].split()[9:] == ["-"] * 6  # no comparison measured
  assert lines[3].split()[4] == "256" and lines[3].split()[7] == "65,536"
  assert lines[3].split()[9:] == ["32,768", "2.00", "150.0", "0.25", "0.12",
                                  "missed"]
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


def _tiny_model(seed=0):
  # pylint: disable=g-import-not-at-top
  from rlax_llm.models.config import ModelConfig
  from rlax_llm.training import state as state_lib
  # pylint: enable=g-import-not-at-top
  cfg = ModelConfig(vocab_size=19, num_layers=2, embed_dim=32, num_heads=4,
                    num_kv_heads=2, head_dim=8, mlp_dim=48, max_seq_len=32,
                    init_std=0.3)
  return cfg, state_lib.model_graphdef(cfg), state_lib.init_params(cfg, seed)


def test_transformers_export_gives_the_same_logits(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  cfg, graphdef, params = _tiny_model()
  hf_model = bench.export_to_transformers(cfg, params, str(tmp_path))
  rng = np.random.default_rng(0)
  prompt = rng.integers(2, 19, (3, 6)).astype(np.int32)
  mask = np.ones((3, 6), bool)
  mask[1, :2] = mask[2, :5] = False  # left padding
  diff = bench.logits_max_abs_diff(graphdef, params, hf_model, prompt, mask)
  assert diff < 1e-4
  # The check can fail: other weights give other logits.
  other = jax.tree.map(lambda x: x * 1.1, params)
  assert bench.logits_max_abs_diff(graphdef, other, hf_model, prompt,
                                   mask) > 1e-2


def test_decode_flops_hand_computed():
  cfg, _, _ = _tiny_model()
  # Per layer: q 32*32 + k, v 2*32*16 + o 32*32 + MLP 3*32*48 = 7680.
  assert bench.decode_matmul_params(cfg) == 2 * 7680 + 32 * 19
  # Mean context over 4 new tokens after a 6-column prompt: 6 + 2.5.
  attention = 4 * 2 * 4 * 8 * 8.5
  assert bench.decode_flops_per_token(cfg, 6, 4) == pytest.approx(
      2 * (2 * 7680 + 32 * 19) + attention)
  shapes = bench.decode_matmul_shapes(cfg, 16)
  step_flops = sum(2 * m * k * n * c for _, m, k, n, c in shapes)
  assert step_flops == 16 * 2 * bench.decode_matmul_params(cfg)


def test_generate_compares_with_transformers_and_roofline():
  rec = bench.bench_generate(4, samples_per_prompt=2, new_tokens=4, repeats=1)
  assert rec["logits_max_abs_diff"] < 1e-4
  assert rec["transformers_tokens_per_s"] == pytest.approx(
      16 / rec["transformers_seconds_median"])
  assert rec["speedup_vs_transformers"] == pytest.approx(
      rec["tokens_per_s"] / rec["transformers_tokens_per_s"])
  assert rec["torch_threads"] >= 1 and rec["transformers_version"]
  # The default model: 2 layers, D 128, 4 x 32 query heads, 2 kv heads,
  # MLP 384, vocabulary 50; a 6-column prompt and 4 new tokens.
  w = 2 * (128 * 128 + 2 * 128 * 64 + 128 * 128 + 3 * 128 * 384) + 128 * 50
  assert rec["prompt_len"] == 6
  assert rec["decode_flops_per_token"] == pytest.approx(
      2 * w + 4 * 2 * 4 * 32 * (6 + 2.5))
  assert rec["flops_per_s"] == pytest.approx(
      rec["tokens_per_s"] * rec["decode_flops_per_token"])
  rates = rec["matmul_flops_per_s"]
  assert set(rates) == {"q_proj", "kv_proj", "o_proj", "mlp_in", "mlp_out",
                        "vocab", "square"}
  assert rates["mlp_in"]["shape"] == [4, 128, 384]
  assert rates["vocab"]["shape"] == [4, 128, 50]
  # The roofline is a FLOP-weighted harmonic mean of the best rates.
  best = [max(r["jax"], r["torch"]) for k, r in rates.items() if k != "square"]
  assert min(best) <= rec["roofline_flops_per_s"] <= max(best)
  assert rec["roofline_fraction"] == pytest.approx(
      rec["flops_per_s"] / rec["roofline_flops_per_s"])
  assert rec["transformers_roofline_fraction"] == pytest.approx(
      rec["transformers_flops_per_s"] / rec["roofline_flops_per_s"])
  assert "targets_met" not in rec  # targets exist for N = 16 and 256 only
