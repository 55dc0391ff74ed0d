"""Tests of experiments/bench.py: the JSON contract and the token count."""

import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(forks, *args):
  return forks.run([sys.executable, "-m", "experiments.bench", *args],
                   cwd=REPO_ROOT, timeout=300)


def test_generate_json_lines(forks):
  proc = _bench(forks, "generate", "--json", "--sequences=4,8",
                "--new_tokens=8", "--repeats=2", "--samples_per_prompt=4",
                "--notransformers", "--noroofline")
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


def test_unknown_benchmark_lists_choices(forks):
  proc = _bench(forks, "sample", "--json")
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


def test_logprobs_json_lines(forks):
  proc = _bench(forks, "logprobs", "--json", "--tokens=96", "--vocab=1000",
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


# grpo_step -----------------------------------------------------------------------
# The smoke shape: the tiny preset (2 layers, D 128, 4 query heads and 2
# key/value heads of 32, MLP 384) over the 512-token vocabulary, 2 prompts of
# 8 tokens x 2 samples x 4 new tokens.
GRPO_SMOKE = ("--preset=tiny", "--step_prompts=2", "--samples_per_prompt=2",
              "--prompt_len=8", "--new_tokens=4")
# Blocks' matmul weights per layer: q 128*128 + k, v 2*128*64 + o 128*128 +
# MLP 3*128*384 = 196,608; two layers 393,216. N = 4 rows, S = 8 + 4 = 12.
#   6 W_blk N S       = 6 * 393216 * 4 * 12      = 113,246,208
#   6 D V N T         = 6 * 128 * 512 * 4 * 4    =   6,291,456
#   12 L Hq H N S^2   = 12 * 2 * 4 * 32 * 4 * 144 =   1,769,472
SMOKE_UPDATE_FLOPS = 113_246_208 + 6_291_456 + 1_769_472  # 121,307,136
# rlax_llm's update with each prompt run once for its G = 2 samples: B = 2
# prompts of P = 8 tokens and N = 4 completions of T' = 3 tokens (the last
# completion token predicts nothing):
#   6 W_blk (B P + N T')              = 6 * 393216 * 28        = 66,060,288
#   6 D V N T                         =                           6,291,456
#   12 L Hq H (B P^2 + N T' (P + T')) = 3072 * (128 + 132)     =    798,720
SMOKE_SHARED_UPDATE_FLOPS = 66_060_288 + 6_291_456 + 798_720  # 73,150,464
# Decode: 2 (393,216 + 128 * 512) + 4 * 2 * 4 * 32 * (8 + 2.5) = 928,256 per
# token, 16 tokens.
SMOKE_GENERATE_FLOPS = 16 * 928_256


def _check_spread(side, part, repeats):
  values = side[f"{part}_s_all"]
  assert len(values) == repeats and all(v > 0 for v in values)
  assert min(values) <= side[f"{part}_s"] <= max(values)
  assert side[f"{part}_s_spread"] == pytest.approx(max(values) - min(values))


def test_grpo_step_json_rlax_only(forks):
  # The default "split" layout on two CPU devices: generate over both, the
  # update on the first, whose scratch memory is reused.
  proc = _bench(forks, "grpo_step", "--json", *GRPO_SMOKE, "--repeats=2",
                "--warmup_steps=2", "--notrl", "--noroofline", "--profile",
                "--host_devices=2", "--host_memory=reuse")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 1  # one object, nothing else on stdout
  rec = json.loads(lines[0])
  assert rec["bench"] == "grpo_step" and rec["model"] == "tiny"
  assert (rec["prompts"], rec["samples_per_prompt"], rec["sequences"],
          rec["prompt_len"], rec["new_tokens"], rec["repeats"]) == (
              2, 2, 4, 8, 4, 2)
  assert rec["warmup_steps"] == 2 and rec["num_devices"] == 2
  assert rec["precision"] == "bfloat16"  # the default
  assert rec["host_memory_reused"] is True
  # 2 (128 * 32 * 12 + 3 * 128 * 384 + 2 * 128) + 512 * 128 + 128.
  assert rec["params"] == 459_392 and rec["vocab"] == 512
  assert rec["update_flops"] == SMOKE_UPDATE_FLOPS
  assert rec["rlax_update_flops"] == SMOKE_SHARED_UPDATE_FLOPS
  assert rec["generate_flops"] == SMOKE_GENERATE_FLOPS
  ours = rec["rlax"]
  assert ours["prompt_group"] == 2  # each prompt once for its 2 samples
  for part in ("step", "generate", "score", "update"):
    _check_spread(ours, part, 2)
  for step, gen, score, upd in zip(ours["step_s_all"], ours["generate_s_all"],
                                   ours["score_s_all"], ours["update_s_all"]):
    assert step == pytest.approx(gen + score + upd)
  assert ours["warmup_s"] > 0 and 0.0 <= ours["reward_mean"] <= 1.0
  assert ours["host_layout"] == "split"
  assert ours["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
  assert ours["generate_mesh"] == {"data": 2, "fsdp": 1, "tensor": 1}
  assert rec["trl"] is None and "--notrl" in rec["trl_unavailable"]
  assert rec["trl_over_rlax"] is None and "roofline" not in rec
  prof = ours["profile"]
  assert prof["backward_s"] == pytest.approx(
      prof["forward_backward_s"] - prof["forward_s"])
  assert prof["other_s"] == pytest.approx(
      prof["update_s"] - prof["forward_backward_s"] - prof["optimizer_s"])
  # XLA's own count of the compiled forward: the model FLOPs plus a little
  # elementwise work (norms, softmax, rotary, the loss).
  assert (SMOKE_SHARED_UPDATE_FLOPS / 3 <= prof["forward_xla_flops"]
          <= 1.2 * SMOKE_SHARED_UPDATE_FLOPS / 3)


def test_grpo_flops_of_the_benchmark_policy():
  cfg = bench.grpo_model_config(None, 16, 64)
  assert cfg.num_params == 3_936_000  # the "3.94M" of the benchmark
  assert (cfg.num_layers, cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads,
          cfg.vocab_size, cfg.qkv_bias, cfg.tie_embeddings) == (
              4, 256, 8, 2, 512, True, True)
  # W_blk = 4 (256*256 + 2*256*64 + 256*256 + 3*256*1024) = 3,801,088;
  # N = 64, S = 80, T = 64.
  expected = (6 * 3_801_088 * 64 * 80 + 6 * 256 * 512 * 64 * 64
              + 12 * 4 * 8 * 32 * 64 * 80 * 80)
  assert expected == 125_023_813_632
  assert bench.update_flops(cfg, 64, 16, 64) == expected
  # Each of the 8 prompts once for its 8 samples: 8 x 16 prompt tokens and
  # 64 x 63 completion tokens through the blocks; the completions' queries
  # see 16 + 63 keys.
  shared = (6 * 3_801_088 * (8 * 16 + 64 * 63) + 6 * 256 * 512 * 64 * 64
            + 12 * 4 * 8 * 32 * (8 * 16 * 16 + 64 * 63 * 79))
  assert shared == 102_035_619_840  # 18% fewer
  assert bench.update_flops(cfg, 64, 16, 64, prompt_group=8) == shared
  # The matmuls the roofline times carry all but the attention FLOPs.
  shapes = bench.update_matmul_shapes(cfg, 64, 16, 64)
  matmul = sum(2 * m * k * n * c for _, m, k, n, c in shapes)
  assert matmul == expected - 12 * 4 * 8 * 32 * 64 * 80 * 80
  names = {name for name, *_ in shapes}
  assert {"mlp_in", "mlp_in/dx", "mlp_in/dw", "vocab/dw"} <= names
  by_name = {name: (m, k, n) for name, m, k, n, _ in shapes}
  assert by_name["mlp_in"] == (64 * 80, 256, 1024)
  assert by_name["mlp_in/dw"] == (256, 64 * 80, 1024)
  assert by_name["vocab"] == (64 * 64, 256, 512)


def test_synthetic_reward_and_prompts():
  assert bench.synthetic_reward([[2, 3, 4, 5], [], [1, 3], [8]]) == [
      0.5, 0.0, 0.0, 1.0]
  p = bench.grpo_prompts(3, 5, seed=1)
  assert p.shape == (3, 5) and p.dtype.name == "int32"
  assert p.min() >= bench.GRPO_FIRST_WORD and p.max() < bench.GRPO_VOCAB
  assert (p == bench.grpo_prompts(3, 5, seed=1)).all()


def test_grpo_tokenizer_maps_words_to_ids():
  pytest.importorskip("transformers")
  tok = bench.grpo_tokenizer()
  assert tok("t5 t17 t511", add_special_tokens=False)["input_ids"] == [
      5, 17, 511]
  assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)
  assert tok.decode([5, 17]) == "t5 t17"


def test_grpo_bad_settings_are_clear_errors():
  with pytest.raises(ValueError, match="at least 2"):
    bench.bench_grpo_step(samples_per_prompt=1, trl=False, roofline=False)
  with pytest.raises(ValueError, match="Unknown model preset"):
    bench.bench_grpo_step(preset="nope", trl=False, roofline=False)
  with pytest.raises(ValueError, match="--precision must be one of"):
    bench.bench_grpo_step(precision="float16", trl=False, roofline=False)


def test_grpo_bfloat16_policy_and_roofline():
  cfg = bench.grpo_model_config("tiny", 8, 4, "bfloat16")
  assert (cfg.dtype, cfg.param_dtype) == (jnp.bfloat16, jnp.float32)
  roof = bench.matmul_roofline(cfg, 4, repeats=1, with_torch=False,
                               shapes=[("a", 64, 32, 16, 2)],
                               dtype="bfloat16")
  assert roof["dtype"] == "bfloat16"
  rates = roof["matmul_flops_per_s"]["a"]
  assert roof["roofline_flops_per_s"] == pytest.approx(max(  # one shape
      v for k, v in rates.items() if k != "shape"))
  assert roof["jax_roofline_flops_per_s"] == pytest.approx(max(
      v for k, v in rates.items() if k in ("jax", "jax_mesh")))


def test_grpo_table():
  side = {}
  for part, v in (("step", 0.5), ("generate", 0.3), ("score", 0.01),
                  ("update", 0.19)):
    side.update({f"{part}_s": v, f"{part}_s_spread": 0.02})
  side.update(generate_roofline_fraction=0.125, update_roofline_fraction=0.25,
              step_roofline_fraction=0.2)
  rec = dict(bench="grpo_step", model="qwen2_3.9m", params=3_936_000,
             prompts=8, samples_per_prompt=8, new_tokens=64, prompt_len=16,
             update_flops=1.25e11, generate_flops=2.5e10, rlax=side, trl=None,
             trl_unavailable="No module named 'trl'", trl_over_rlax=None)
  lines = bench._grpo_table([rec]).splitlines()  # pylint: disable=protected-access
  assert lines[0].split()[0] == "framework"
  assert lines[2].split() == ["rlax", "0.500", "±0.010", "0.300", "±0.010",
                              "0.010", "±0.010", "0.190", "±0.010", "0.125",
                              "0.250", "0.200"]
  assert lines[3].split() == ["trl"] + ["-"] * 7
  assert "3,936,000 params" in lines[4] and "125.00 GFLOP" in lines[4]
  assert "No module named 'trl'" in lines[4]


@pytest.mark.slow
def test_grpo_step_against_trl_on_the_same_model():
  pytest.importorskip("trl")
  rec = bench.bench_grpo_step(num_prompts=2, samples_per_prompt=2,
                              new_tokens=4, prompt_len=8, repeats=1,
                              warmup=1, preset="tiny", trl=True,
                              roofline=False)
  theirs = rec["trl"]
  assert theirs is not None, rec.get("trl_unavailable")
  assert theirs["logits_max_abs_diff"] < 1e-4
  for part in ("step", "generate", "score", "update"):
    _check_spread(theirs, part, 1)
  assert theirs["step_s"] == pytest.approx(
      theirs["generate_s"] + theirs["score_s"] + theirs["update_s"])
  assert rec["trl_over_rlax"] == pytest.approx(
      theirs["step_s"] / rec["rlax"]["step_s"])
  assert rec["trl_over_rlax_update"] == pytest.approx(
      theirs["update_s"] / rec["rlax"]["update_s"])
  assert theirs["trl_version"] and theirs["torch_threads"] >= 1
  # As rlax_llm's step: bfloat16 mixed precision (the default --precision),
  # and no recomputation in the backward (TRL's default turns gradient
  # checkpointing on).
  assert rec["precision"] == "bfloat16"
  assert theirs["bf16"] and not theirs["gradient_checkpointing"]


def test_grpo_step_without_trl_reports_null_with_the_reason(monkeypatch):
  # `import trl` raises ImportError while sys.modules holds None for it.
  monkeypatch.setitem(sys.modules, "trl", None)
  # In f32 (the command line's default, bfloat16, runs in
  # test_grpo_step_json_rlax_only).
  rec = bench.bench_grpo_step(num_prompts=2, samples_per_prompt=2,
                              new_tokens=4, prompt_len=8, repeats=1,
                              warmup=1, preset="tiny", trl=True,
                              roofline=False, precision="float32",
                              share_prompt=False)
  assert rec["precision"] == "float32" and np.isfinite(rec["rlax"]["loss"])
  assert rec["rlax"]["prompt_group"] == 1  # every row its own prompt pass
  assert rec["rlax_update_flops"] == rec["update_flops"]
  assert rec["trl"] is None
  assert "trl" in rec["trl_unavailable"]
  assert "pip install trl" in rec["trl_unavailable"]
  assert rec["trl_over_rlax"] is None and rec["trl_over_rlax_update"] is None
  assert rec["rlax"]["step_s"] > 0
  assert rec["update_flops"] == SMOKE_UPDATE_FLOPS


def test_xrpo_allocate_records_and_table():
  # 3 prompts x 4 slots holding 2 rollouts each leave 6 to give out of 20;
  # 4 prompts x 6 slots (counts 2) have room for all 5.
  recs = bench.bench_xrpo_allocate(((4, 6, 5), (3, 4, 20)), repeats=2)
  assert [(r["prompts"], r["capacity"], r["budget"], r["given_out"])
          for r in recs] == [(4, 6, 5, 5), (3, 4, 20, 6)]
  for r in recs:
    assert r["bench"] == "xrpo_allocate" and len(r["call_s_all"]) == 2
    assert 0 < r["call_s"] and r["call_s_spread"] >= 0 and r["compile_s"] > 0
  lines = bench._allocate_table(recs).splitlines()  # pylint: disable=protected-access
  assert lines[0].split()[:3] == ["prompts", "slots", "budget"]
  assert lines[3].split()[:3] == ["3", "4", "20"]
  assert lines[3].split()[4] == f"{recs[1]['call_s'] * 1e3:.2f}"
