"""HF checkpoints: logits parity with transformers, sharded files, export, errors.

Every reference model is a tiny randomly initialised transformers model built
here; nothing is downloaded.
"""

import dataclasses
import json
import os
import sys
import textwrap

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rlax_llm.models import hf  # noqa: E402
from rlax_llm.models.config import ModelConfig  # noqa: E402
from rlax_llm.models.transformer import Transformer  # noqa: E402

V = 61
_COMMON = dict(vocab_size=V, max_position_embeddings=64,
               attn_implementation="eager")

CASES = {
    # GQA, tied, q/k/v bias, non-default theta.
    "qwen2_tied": ("Qwen2", dict(hidden_size=32, intermediate_size=56,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, rope_theta=3000.0,
                                 tie_word_embeddings=True)),
    # Odd head count, one KV head, untied.
    "qwen2_odd_untied": ("Qwen2", dict(hidden_size=48, intermediate_size=40,
                                       num_hidden_layers=2,
                                       num_attention_heads=3,
                                       num_key_value_heads=1,
                                       tie_word_embeddings=False)),
    # q/k norm, explicit head_dim != hidden / heads, untied.
    "qwen3": ("Qwen3", dict(hidden_size=48, intermediate_size=80,
                            num_hidden_layers=2, num_attention_heads=6,
                            num_key_value_heads=2, head_dim=16,
                            rope_theta=5000.0, tie_word_embeddings=False)),
    # q/k norm with attention_bias on q/k/v/o, tied.
    "qwen3_bias_tied": ("Qwen3", dict(hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2,
                                      num_attention_heads=4,
                                      num_key_value_heads=4, head_dim=8,
                                      attention_bias=True,
                                      tie_word_embeddings=True)),
    # Llama 3 rope scaling (a short original context so it matters), odd
    # heads, attention and MLP biases.
    "llama3": ("Llama", dict(hidden_size=40, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=5,
                             num_key_value_heads=5, rope_theta=500000.0,
                             rms_norm_eps=1e-5, attention_bias=True,
                             mlp_bias=True, tie_word_embeddings=False,
                             rope_scaling=dict(
                                 rope_type="llama3", factor=8.0,
                                 low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=16))),
    "llama_linear_gqa": ("Llama", dict(hidden_size=32, intermediate_size=48,
                                       num_hidden_layers=1,
                                       num_attention_heads=4,
                                       num_key_value_heads=1,
                                       tie_word_embeddings=True,
                                       rope_scaling=dict(rope_type="linear",
                                                         factor=3.0))),
}


def _hf_model(case, seed=0):
  family, kw = CASES[case]
  cfg = getattr(transformers, family + "Config")(**_COMMON, **kw)
  torch.manual_seed(seed)
  model = getattr(transformers, family + "ForCausalLM")(cfg).eval()
  with torch.no_grad():  # non-trivial norms and biases so every tensor counts
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      else:
        p.copy_(0.2 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """case -> (transformers model, checkpoint dir)."""
  out = {}
  for case in CASES:
    model = _hf_model(case)
    path = str(tmp_path_factory.mktemp(case))
    model.save_pretrained(path)
    out[case] = (model, path)
  return out


def _batch(side, seed=0, lens=(9, 5, 1), width=9):
  rng = np.random.default_rng(seed)
  tok = np.zeros((len(lens), width), np.int64)
  mask = np.zeros((len(lens), width), bool)
  for i, n in enumerate(lens):
    cols = slice(width - n, width) if side == "left" else slice(0, n)
    tok[i, cols] = rng.integers(0, V, n)
    mask[i, cols] = True
  return tok, mask


@nnx.jit
def _logits(model, tok, mask):
  return model(tok, mask_BT=mask)


def _ours(model, tok, mask=None):
  """f32 logits [B, T, V] of our model, jitted (eager dispatch is slow)."""
  mask = np.ones(tok.shape, bool) if mask is None else mask
  return np.asarray(_logits(model, jnp.asarray(tok), jnp.asarray(mask)))


def _torch_logits(model, tok, mask):
  pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tok),
                attention_mask=torch.tensor(mask.astype(np.int64)),
                position_ids=torch.tensor(pos))
  return out.logits.float().numpy()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(saved, case):
  ref_model, path = saved[case]
  model = hf.load_pretrained(path)
  family, kw = CASES[case]
  assert model.cfg.qk_norm == (family == "Qwen3")
  assert model.cfg.tie_embeddings == kw["tie_word_embeddings"]
  for side in ("left", "right"):
    tok, mask = _batch(side)
    ref = _torch_logits(ref_model, tok, mask)
    ours = _ours(model, tok, mask)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours[mask], ref[mask], atol=1e-4, rtol=1e-4)
    # The logits are far from trivially equal: a wrong rope or norm shows.
    assert np.abs(ref[mask]).max() > 0.5


def test_llama3_scaling_changes_logits(saved):
  """The llama3 rope scaling is active: ignoring it gives other logits."""
  ref_model, path = saved["llama3"]
  scaled = hf.load_pretrained(path)
  plain = hf.load_pretrained(path, rope_scaling=None)
  tok, mask = _batch("right", lens=(9,))
  ref = _torch_logits(ref_model, tok, mask)
  assert np.abs(_ours(plain, tok) - ref).max() > 1e-2
  np.testing.assert_allclose(_ours(scaled, tok), ref,
                             atol=1e-4, rtol=1e-4)


def test_config_mapping(saved):
  cfg = hf.load_pretrained(saved["qwen3"][1]).cfg
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim) == (
      6, 2, 16, 48)
  assert (cfg.qkv_bias, cfg.out_bias, cfg.rope_theta) == (False, False, 5000.0)
  cfg = hf.load_pretrained(saved["llama3"][1]).cfg
  assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_max_len) == (
      "llama3", 8.0, 16)
  assert (cfg.qkv_bias, cfg.out_bias, cfg.mlp_bias, cfg.norm_eps) == (
      True, True, True, 1e-5)
  cfg = hf.load_pretrained(saved["qwen2_tied"][1]).cfg
  assert (cfg.qkv_bias, cfg.out_bias, cfg.qk_norm) == (True, False, False)


def test_sharded_hf_checkpoint_loads(tmp_path):
  ref_model = _hf_model("qwen2_odd_untied", seed=3)
  ref_model.save_pretrained(str(tmp_path), max_shard_size="20KB")
  assert os.path.exists(tmp_path / hf.INDEX_NAME)
  shards = [f for f in os.listdir(tmp_path) if f.startswith("model-")]
  assert len(shards) > 2
  cfg, params = hf.load_params(str(tmp_path))
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(
      cfg, rngs=nnx.Rngs(0))))
  model = nnx.merge(graphdef, params)
  tok, mask = _batch("left", seed=1)
  np.testing.assert_allclose(
      _ours(model, tok, mask)[mask],
      _torch_logits(ref_model, tok, mask)[mask], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["qwen2_tied", "qwen3", "llama3"])
def test_export_reloads_in_transformers(tmp_path, case):
  cfg = hf.config_from_hf(json.load(open(_save_case(case, tmp_path / "src")
                                         / "config.json")))
  model = Transformer(dataclasses.replace(cfg, init_std=0.2),
                      rngs=nnx.Rngs(4))
  # Perturb norms and biases (initialised to ones and zeros) so they count.
  state = nnx.state(model, nnx.Param)
  flat = nnx.to_flat_state(state)
  for i, (path, var) in enumerate(flat):
    if "norm" in "/".join(map(str, path)) or "bias" in str(path[-1]):
      var.set_value(var.get_value() + 0.3 * jax.random.normal(
          jax.random.key(i), var.get_value().shape))
  nnx.update(model, nnx.from_flat_state(flat))
  out = tmp_path / "out"
  files = hf.save_pretrained(model, str(out), max_shard_size="30KB")
  assert hf.INDEX_NAME in files and len(files) > 3
  written = json.load(open(out / "config.json"))
  assert written["model_type"] == CASES[case][0].lower()
  assert written["architectures"] == [CASES[case][0] + "ForCausalLM"]
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      str(out), attn_implementation="eager").eval()
  tok, mask = _batch("right", seed=2)
  ours = _ours(model, tok, mask)
  np.testing.assert_allclose(ours[mask], _torch_logits(ref, tok, mask)[mask],
                             atol=1e-4, rtol=1e-4)
  again = hf.load_pretrained(str(out))
  np.testing.assert_allclose(_ours(again, tok, mask),
                             ours, atol=1e-6)


def _save_case(case, path):
  _hf_model(case).save_pretrained(str(path))
  return path


def test_save_from_config_and_param_dict(tmp_path):
  cfg = ModelConfig(vocab_size=V, num_layers=1, embed_dim=32, num_heads=4,
                    num_kv_heads=2, head_dim=8, mlp_dim=48, qkv_bias=True)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  hf.save_pretrained((cfg, params), str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
  again = hf.load_pretrained(str(tmp_path))
  tok = jnp.asarray(_batch("left")[0])
  call = nnx.jit(lambda m, x: m(x))  # one program, not one per operation
  np.testing.assert_array_equal(np.asarray(call(again, tok)),
                                np.asarray(call(model, tok)))
  bad = dict(params)
  del bad["final_norm"]
  with pytest.raises(ValueError, match="final_norm"):
    hf.save_pretrained((cfg, bad), str(tmp_path / "bad"))


def test_bf16_checkpoint_and_bf16_compute(saved, tmp_path):
  ref_bf16 = _hf_model("qwen3").to(torch.bfloat16)
  ref_bf16.save_pretrained(str(tmp_path))
  header = hf.read_safetensors_header(str(tmp_path / "model.safetensors"))
  assert header["model.norm.weight"]["dtype"] == "BF16"
  # bf16 weights read into f32 parameters: exact against the upcast weights.
  model32 = hf.load_pretrained(str(tmp_path), dtype=jnp.float32)
  assert model32.embedding[...].dtype == jnp.float32
  tok, mask = _batch("left")
  ref32 = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), dtype=torch.float32, attn_implementation="eager").eval()
  ref = _torch_logits(ref32, tok, mask)
  ours32 = _ours(model32, tok, mask)
  np.testing.assert_allclose(ours32[mask], ref[mask], atol=1e-4, rtol=1e-4)
  # bf16 parameters and compute: logits stay f32 and close to f32's.
  model16 = hf.load_pretrained(str(tmp_path), dtype=jnp.bfloat16)
  assert model16.embedding[...].dtype == jnp.bfloat16
  ours16 = _ours(model16, tok, mask)
  assert ours16.dtype == np.float32
  err = np.abs(ours16[mask] - ours32[mask]).max()
  assert err < 0.05 * np.abs(ours32[mask]).max(), err
  assert err > 0  # bf16 compute really happened


def test_prefill_decode_matches_full_sequence(saved):
  model = hf.load_pretrained(saved["qwen3"][1])
  tok, mask = _batch("left", lens=(6, 3), width=6, seed=5)
  g, t = 2, 4
  rng = np.random.default_rng(6)
  new = rng.integers(0, V, (2, g, t))
  prefill = nnx.jit(lambda m, p, pm: m.prefill(p, pm, num_samples=g,
                                                max_new_tokens=t))
  decode = nnx.jit(lambda m, x, pos, c, i: m.decode_step(x, pos, c, i))
  last, cache, plen = prefill(model, jnp.asarray(tok), jnp.asarray(mask))
  full_logits = []
  for j in range(g):
    seq = np.concatenate([tok, new[:, j]], axis=1)
    full_mask = np.concatenate([mask, np.ones((2, t), bool)], axis=1)
    full_logits.append(_ours(model, seq, full_mask))
  full = np.stack(full_logits, 1)  # [B, G, P + T, V]
  np.testing.assert_allclose(np.asarray(last), full[:, 0, 5], atol=1e-4)
  for i in range(t):
    logits, cache = decode(
        model, jnp.asarray(new[:, :, i]),
        jnp.asarray(np.asarray(plen)[:, None] + i) * jnp.ones((1, g), int),
        cache, i)
    np.testing.assert_allclose(np.asarray(logits), full[:, :, 6 + i],
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_gives_identical_gradients(saved, policy):
  path = saved["qwen3"][1]
  tok, mask = _batch("right")

  def grads(model):
    def loss(m):
      logits = m(jnp.asarray(tok), mask_BT=jnp.asarray(mask))
      logp = jax.nn.log_softmax(logits[:, :-1])
      tgt = jnp.take_along_axis(logp, jnp.asarray(tok)[:, 1:, None], -1)[..., 0]
      return -jnp.sum(tgt * mask[:, 1:])
    return nnx.jit(nnx.grad(loss))(model)

  base = grads(hf.load_pretrained(path))
  rem = grads(hf.load_pretrained(path, remat=policy))
  leaves_b, leaves_r = jax.tree.leaves(base), jax.tree.leaves(rem)
  assert len(leaves_b) == len(leaves_r) > 10
  for a, b in zip(leaves_b, leaves_r):
    # Equal up to f32 rounding: XLA fuses the recomputed ops differently.
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5,
                               rtol=1e-4)
  assert max(float(jnp.abs(a).max()) for a in leaves_b) > 1e-3


def test_remat_rejects_unknown_policy():
  with pytest.raises(ValueError, match="remat"):
    ModelConfig(vocab_size=5, remat="everything")


def test_sharded_loading_on_a_mesh(saved, forks):
  """Parameters land on their logical-axis shardings; logits are unchanged."""
  path = saved["qwen3"][1]
  code = textwrap.dedent(f"""
    import os
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=4")
    import jax
    jax.config.update("jax_platforms", "cpu")
    import jax.numpy as jnp, numpy as np
    from rlax_llm.models import hf
    from rlax_llm.parallel.mesh import make_mesh
    mesh = make_mesh(dict(fsdp=2, tensor=2))
    sharded = hf.load_pretrained({path!r}, mesh=mesh)
    single = hf.load_pretrained({path!r})
    q = sharded.layers[0].attn.q_proj[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor",
                                                         None), q.sharding
    assert len(q.addressable_shards) == 4
    assert q.addressable_shards[0].data.shape == (24, 3, 16)
    tok = jnp.asarray(np.arange(16).reshape(2, 8) % 61)
    np.testing.assert_allclose(np.asarray(sharded(tok)),
                               np.asarray(single(tok)), atol=1e-5)
    print("OK")
  """)
  out = forks.run([sys.executable, "-c", code], timeout=300,
                  cwd=os.path.dirname(os.path.dirname(__file__)))
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


# -- errors ----------------------------------------------------------------------
def test_missing_directory_and_files(tmp_path, saved):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    hf.load_pretrained(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf.load_pretrained(str(tmp_path))
  src = saved["qwen2_tied"][1]
  (tmp_path / "config.json").write_text(open(os.path.join(
      src, "config.json")).read())
  (tmp_path / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="safe_serialization"):
    hf.load_pretrained(str(tmp_path))


def _copy_with_config(src, dst, **changes):
  os.makedirs(dst, exist_ok=True)
  config = json.load(open(os.path.join(src, "config.json")))
  config.update(changes)
  json.dump(config, open(os.path.join(dst, "config.json"), "w"))
  os.symlink(os.path.join(src, "model.safetensors"),
             os.path.join(dst, "model.safetensors"))
  return str(dst)


def test_bad_config_errors(tmp_path, saved):
  src = saved["qwen2_tied"][1]
  with pytest.raises(ValueError, match="Unsupported architecture.*gpt2"):
    hf.load_pretrained(_copy_with_config(src, tmp_path / "a",
                                         model_type="gpt2",
                                         architectures=["GPT2LMHeadModel"]))
  with pytest.raises(ValueError,
                     match=r"model.layers.0.mlp.down_proj.weight.*\(32, 56\)"):
    hf.load_pretrained(_copy_with_config(src, tmp_path / "b",
                                         intermediate_size=50))
  with pytest.raises(ValueError, match="lacks .*lm_head.weight"):
    hf.load_pretrained(_copy_with_config(src, tmp_path / "c",
                                         tie_word_embeddings=False))
  with pytest.raises(ValueError, match="does not use.*q_norm"):
    hf.load_pretrained(_copy_with_config(saved["qwen3"][1], tmp_path / "d",
                                         model_type="llama",
                                         architectures=["LlamaForCausalLM"]))
  with pytest.raises(ValueError, match="rope_type='yarn'"):
    hf.load_pretrained(_copy_with_config(
        src, tmp_path / "e", rope_parameters=dict(rope_type="yarn",
                                                  factor=2.0)))
  with pytest.raises(ValueError, match="sliding_window"):
    hf.load_pretrained(_copy_with_config(src, tmp_path / "f",
                                         use_sliding_window=True,
                                         sliding_window=8))


def test_truncated_weights_error(tmp_path, saved):
  src = saved["qwen2_tied"][1]
  dst = tmp_path / "t"
  os.makedirs(dst)
  (dst / "config.json").write_text(open(os.path.join(src,
                                                     "config.json")).read())
  data = open(os.path.join(src, "model.safetensors"), "rb").read()
  (dst / "model.safetensors").write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match="truncated"):
    hf.load_pretrained(str(dst))
