"""Gemma 2 and Gemma 3 (text) checkpoints: logits parity with transformers.

Tiny random transformers models are built here (nothing is downloaded) with
a sliding window of 4 tokens, shorter than the test sequences, so the window
masks keys in the full pass and in prefill + KV-cache decoding.
"""

import dataclasses
import json
import os
import shutil

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rlax_llm.models import hf  # noqa: E402
from rlax_llm.models.config import ModelConfig  # noqa: E402
from rlax_llm.models.config import get_model_config  # noqa: E402
from rlax_llm.models.transformer import KVCache  # noqa: E402
from rlax_llm.models.transformer import Transformer  # noqa: E402
from rlax_llm.models.transformer import decode_cache_from_kv  # noqa: E402
from rlax_llm.models.transformer import prefix_cache_from_kv  # noqa: E402

V = 256
W = 4  # sliding window
_COMMON = dict(vocab_size=V, max_position_embeddings=64, sliding_window=W,
               attn_implementation="eager")

CASES = {
    # Alternating sliding/global layers, tied, small soft-caps that bite,
    # query_pre_attn_scalar != head_dim.
    "gemma2": ("Gemma2", dict(hidden_size=64, intermediate_size=96,
                              num_hidden_layers=3, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16,
                              query_pre_attn_scalar=24,
                              attn_logit_softcapping=3.0,
                              final_logit_softcapping=4.0,
                              rope_theta=500.0, tie_word_embeddings=True)),
    # Explicit layer types, untied, attention biases, one KV head.
    "gemma2_untied_bias": ("Gemma2", dict(
        hidden_size=64, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16,
        layer_types=["full_attention", "sliding_attention"],
        attention_bias=True, tie_word_embeddings=False)),
    # q/k norm, local base frequency for sliding layers, linear rope scaling
    # for the global ones, pattern 2 (sliding, full, sliding, full).
    "gemma3": ("Gemma3Text", dict(hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16,
                                  query_pre_attn_scalar=16,
                                  sliding_window_pattern=2,
                                  rope_theta=20_000.0,
                                  rope_local_base_freq=100.0,
                                  rope_scaling=dict(rope_type="linear",
                                                    factor=4.0),
                                  tie_word_embeddings=True)),
    # Gemma 3 with a final soft-cap, untied, layer types given.
    "gemma3_untied_cap": ("Gemma3Text", dict(
        hidden_size=96, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32,
        layer_types=["sliding_attention", "sliding_attention",
                     "full_attention"],
        final_logit_softcapping=5.0, tie_word_embeddings=False)),
}


def _hf_model(case, seed=0):
  family, kw = CASES[case]
  cfg = getattr(transformers, family + "Config")(**_COMMON, **kw)
  torch.manual_seed(seed)
  cls = getattr(transformers, family.replace("Text", "") + "ForCausalLM")
  model = cls(cfg).eval()
  with torch.no_grad():  # (1 + w) norms: w near 0; every tensor counts
    for name, p in model.named_parameters():
      p.copy_((0.3 if "norm" in name else 0.2) * torch.randn_like(p))
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


def _batch(side, seed=0, lens=(12, 7, 1, 5), width=12):
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
  assert model.cfg.qk_norm == CASES[case][0].startswith("Gemma3")
  assert any(model.cfg.sliding_layers) and not all(model.cfg.sliding_layers)
  for side in ("left", "right"):
    tok, mask = _batch(side)
    ref = _torch_logits(ref_model, tok, mask)
    ours = _ours(model, tok, mask)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours[mask], ref[mask], atol=1e-4, rtol=1e-4)
    assert np.abs(ref[mask]).max() > 0.5  # far from trivially equal


# Each Gemma feature is exercised by the data: switching it off in our
# config (the weights unchanged) moves the logits away from transformers'.
_ABLATIONS = [
    ("gemma2", dict(final_logit_softcap=None)),
    ("gemma2", dict(attn_logit_softcap=None)),
    ("gemma2", dict(query_pre_attn_scalar=None)),
    ("gemma2", dict(layer_types=(), sliding_window=None)),
    ("gemma2", dict(embed_scale=False)),
    ("gemma2", dict(mlp_activation="silu")),
    ("gemma3", dict(rope_local_theta=None)),
    ("gemma3", dict(rope_scaling=None)),
    ("gemma3", dict(layer_types=(), sliding_window=None,
                    rope_local_theta=None)),
    ("gemma3_untied_cap", dict(final_logit_softcap=None)),
]


@pytest.mark.parametrize("case,change", _ABLATIONS)
def test_each_feature_changes_logits(saved, case, change):
  ref_model, path = saved[case]
  model = hf.load_pretrained(path, **change)
  tok, mask = _batch("left")
  ref = _torch_logits(ref_model, tok, mask)
  assert np.abs(_ours(model, tok, mask)[mask] - ref[mask]).max() > 1e-2


def test_config_mapping(saved):
  cfg = hf.load_pretrained(saved["gemma2"][1]).cfg
  assert cfg.layer_types == ("sliding_attention", "full_attention",
                             "sliding_attention")
  assert cfg.sliding_layers == (True, False, True)
  assert (cfg.sliding_window, cfg.query_pre_attn_scalar) == (W, 24.0)
  assert (cfg.attn_logit_softcap, cfg.final_logit_softcap) == (3.0, 4.0)
  assert (cfg.norm_unit_offset, cfg.post_norms, cfg.embed_scale,
          cfg.mlp_activation) == (True, True, True, "gelu_tanh")
  assert (cfg.rope_theta, cfg.rope_local_theta, cfg.qk_norm) == (
      500.0, None, False)
  cfg = hf.load_pretrained(saved["gemma3"][1]).cfg
  assert cfg.sliding_layers == (True, False, True, False)
  assert (cfg.rope_theta, cfg.rope_local_theta, cfg.rope_scaling,
          cfg.rope_factor) == (20_000.0, 100.0, "linear", 4.0)
  assert (cfg.attn_logit_softcap, cfg.final_logit_softcap, cfg.qk_norm) == (
      None, None, True)
  cfg = hf.load_pretrained(saved["gemma2_untied_bias"][1]).cfg
  assert (cfg.qkv_bias, cfg.out_bias, cfg.tie_embeddings) == (
      True, True, False)
  # transformers' defaults (2B-like fields) when config.json leaves them out.
  legacy = hf.config_from_hf(dict(
      model_type="gemma3_text", vocab_size=V, hidden_size=64,
      intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
      rope_theta=1e6, rope_local_base_freq=1e4,
      rope_scaling=dict(rope_type="linear", factor=8.0)))
  assert legacy.sliding_layers == (True,) * 5 + (False, True)
  assert (legacy.head_dim, legacy.sliding_window, legacy.rope_local_theta,
          legacy.rope_factor, legacy.tie_embeddings) == (
              256, 4096, 1e4, 8.0, True)


def _decode_reference(model, ref_model, tok, mask, new):
  """Full-sequence logits (ours, transformers') of [prompt | new[:, j]]."""
  b, g, t = new.shape
  ours, theirs = [], []
  for j in range(g):
    seq = np.concatenate([tok, new[:, j]], axis=1)
    full_mask = np.concatenate([mask, np.ones((b, t), bool)], axis=1)
    ours.append(_ours(model, seq, full_mask))
    theirs.append(_torch_logits(ref_model, seq, full_mask))
  return np.stack(ours, 1), np.stack(theirs, 1)  # [B, G, P + T, V]


@pytest.mark.parametrize("case", ["gemma2", "gemma3"])
def test_prefill_decode_matches_full_sequence(saved, case):
  """Decoding past the window: slots and prompt keys leave it by position."""
  ref_model, path = saved[case]
  model = hf.load_pretrained(path)
  tok, mask = _batch("left", lens=(7, 3), width=7, seed=5)
  g, t = 2, 6
  new = np.random.default_rng(6).integers(0, V, (2, g, t))
  full, theirs = _decode_reference(model, ref_model, tok, mask, new)
  prefill = nnx.jit(lambda m, p, pm: m.prefill(p, pm, num_samples=g,
                                                max_new_tokens=t))
  decode = nnx.jit(lambda m, x, pos, c, i: m.decode_step(x, pos, c, i))
  for per_row in (False, True):
    last, cache, plen = prefill(model, jnp.asarray(tok), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(last), full[:, 0, 6], atol=1e-4)
    for i in range(t):
      pos = np.asarray(plen)[:, None] + i + np.zeros((1, g), int)
      index = np.full((2, g), i) if per_row else i
      logits, cache = decode(model, jnp.asarray(new[:, :, i]),
                             jnp.asarray(pos), cache, jnp.asarray(index))
      np.testing.assert_allclose(np.asarray(logits), full[:, :, 7 + i],
                                 atol=1e-4, rtol=1e-4)
      np.testing.assert_allclose(np.asarray(logits), theirs[:, :, 7 + i],
                                 atol=1e-4, rtol=1e-4)


def test_resumed_rows_decode_with_per_row_slots(saved):
  """Rows resumed at different lengths (the cache of a causal pass over
  [prompt | partial completion], as partial rollouts build it) decode with
  per-row slots and match transformers once the window has moved on."""
  ref_model, path = saved["gemma2"]
  model = hf.load_pretrained(path)
  b, g, t = 2, 2, 9
  tok, mask = _batch("left", lens=(6, 2), width=6, seed=7)
  new = np.random.default_rng(8).integers(0, V, (b, g, t))
  length = np.array([[0, 5], [3, 1]])  # tokens already decoded per row
  n, p = b * g, tok.shape[1]
  seq = np.concatenate([np.repeat(tok, g, 0), new.reshape(n, t)], axis=1)
  seq_mask = np.concatenate([np.repeat(mask, g, 0),
                             np.arange(t) < length.reshape(n, 1)], axis=1)
  _, kvs = nnx.jit(lambda m, x, mk: m.hidden_states(x, None, mk,
                                                    return_kv=True))(
                                                        model, seq, seq_mask)
  prefix, dec = [], []
  for k, v in kvs:
    k, v = (np.asarray(x).reshape(b, g, p + t, *x.shape[2:]) for x in (k, v))
    written = (np.arange(t) < length[..., None])[..., None, None]
    prefix.append(prefix_cache_from_kv(k[:, 0, :p], v[:, 0, :p]))
    dec.append(decode_cache_from_kv(np.where(written, k[:, :, p:], 0),
                                    np.where(written, v[:, :, p:], 0)))
  cache = KVCache(prefix_k=tuple(x for x, _ in prefix),
                  prefix_v=tuple(x for _, x in prefix), prefix_mask=mask,
                  k=tuple(x for x, _ in dec), v=tuple(x for _, x in dec))
  _, theirs = _decode_reference(model, ref_model, tok, mask, new)
  plen = mask.sum(-1)[:, None]
  decode = nnx.jit(lambda m, x, pos, c, i: m.decode_step(x, pos, c, i))
  index = length.copy()
  checked = 0
  for _ in range(t - 1):
    tokens = np.take_along_axis(new, np.minimum(index, t - 1)[..., None],
                                2)[..., 0]
    logits, cache = decode(model, jnp.asarray(tokens),
                           jnp.asarray(plen + index), cache,
                           jnp.asarray(index))
    for bi in range(b):
      for gi in range(g):
        if index[bi, gi] < t:
          np.testing.assert_allclose(
              np.asarray(logits[bi, gi]), theirs[bi, gi, p + index[bi, gi]],
              atol=1e-4, rtol=1e-4)
          checked += 1
    index = index + 1
  assert checked >= 25


@pytest.mark.parametrize("case", ["gemma2", "gemma3", "gemma2_untied_bias"])
def test_export_reloads_in_transformers(tmp_path, saved, case):
  cfg = hf.config_from_hf(json.load(open(os.path.join(saved[case][1],
                                                      "config.json"))))
  model = Transformer(dataclasses.replace(cfg, init_std=0.2),
                      rngs=nnx.Rngs(4))
  # Norm scales start at zero and biases at zero: perturb them so they count.
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  for i, (path, var) in enumerate(flat):
    if "norm" in "/".join(map(str, path)) or "bias" in str(path[-1]):
      var.set_value(var.get_value() + 0.3 * jax.random.normal(
          jax.random.key(i), var.get_value().shape))
  nnx.update(model, nnx.from_flat_state(flat))
  out = tmp_path / "out"
  hf.save_pretrained(model, str(out))
  written = json.load(open(out / "config.json"))
  family = "gemma3_text" if case.startswith("gemma3") else "gemma2"
  assert written["model_type"] == family
  assert written["architectures"] == [hf._ARCHITECTURES[family]]
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      str(out), attn_implementation="eager").eval()
  assert ref.config.layer_types == saved[case][0].config.layer_types
  for side in ("left", "right"):
    tok, mask = _batch(side, seed=2)
    ours = _ours(model, tok, mask)
    np.testing.assert_allclose(ours[mask], _torch_logits(ref, tok, mask)[mask],
                               atol=1e-4, rtol=1e-4)
  again = hf.load_pretrained(str(out))
  assert again.cfg == dataclasses.replace(model.cfg,
                                         init_std=again.cfg.init_std)
  np.testing.assert_allclose(_ours(again, tok, mask), ours, atol=1e-6)


def test_bf16_compute_stays_close(saved):
  model32 = hf.load_pretrained(saved["gemma3"][1])
  model16 = hf.load_pretrained(saved["gemma3"][1], dtype=jnp.bfloat16)
  tok, mask = _batch("right")
  ours32, ours16 = _ours(model32, tok, mask), _ours(model16, tok, mask)
  assert ours16.dtype == np.float32
  err = np.abs(ours16[mask] - ours32[mask]).max()
  assert 0 < err < 0.05 * np.abs(ours32[mask]).max(), err


def test_remat_gives_identical_gradients(saved):
  path = saved["gemma3"][1]
  tok, mask = _batch("right")

  def grads(model):
    def loss(m):
      logp = jax.nn.log_softmax(m(jnp.asarray(tok),
                                  mask_BT=jnp.asarray(mask))[:, :-1])
      tgt = jnp.take_along_axis(logp, jnp.asarray(tok)[:, 1:, None], -1)
      return -jnp.sum(tgt[..., 0] * mask[:, 1:])
    return jax.tree.leaves(nnx.jit(nnx.grad(loss))(model))

  base = grads(hf.load_pretrained(path))
  rem = grads(hf.load_pretrained(path, remat="full"))
  assert len(base) == len(rem) > 20
  for a, b in zip(base, rem):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5,
                               rtol=1e-4)
  assert max(float(jnp.abs(a).max()) for a in base) > 1e-3


# -- configs and errors --------------------------------------------------------
def test_default_config_has_no_gemma_features():
  cfg = ModelConfig(vocab_size=8)
  assert cfg.sliding_layers == (False, False)
  assert not (cfg.norm_unit_offset or cfg.post_norms or cfg.embed_scale)
  assert (cfg.mlp_activation, cfg.final_logit_softcap,
          cfg.attn_logit_softcap) == ("silu", None, None)


def test_gemma2_2b_preset_shape():
  cfg = get_model_config("gemma2_2b", vocab_size=256_000)
  assert cfg.sliding_layers[:4] == (True, False, True, False)
  assert abs(cfg.num_params - 2.614e9) < 1e7  # Gemma 2 2B: 2.61B
  # Shrinking num_layers keeps the alternating pattern valid.
  small = get_model_config("gemma2_2b", vocab_size=64, num_layers=3)
  assert small.sliding_layers == (True, False, True)


@pytest.mark.parametrize("fields,match", [
    (dict(layer_types=("sliding_attention",), sliding_window=4),
     "one type per layer"),
    (dict(layer_types=("sliding_attention", "full_attention")),
     "sliding_window"),
    (dict(sliding_window=4), "no layer is"),
    (dict(layer_types=("local", "full_attention"), sliding_window=4),
     "local"),
    (dict(sliding_window_pattern=2, sliding_window=4,
          layer_types=("sliding_attention", "full_attention")), "both"),
    (dict(mlp_activation="relu"), "mlp_activation"),
    (dict(final_logit_softcap=0.0), "final_logit_softcap"),
])
def test_model_config_errors(fields, match):
  with pytest.raises(ValueError, match=match):
    ModelConfig(vocab_size=8, **fields)


def _copy_with_config(src, dst, **changes):
  os.makedirs(dst, exist_ok=True)
  config = json.load(open(os.path.join(src, "config.json")))
  config.update(changes)
  json.dump(config, open(os.path.join(dst, "config.json"), "w"))
  shutil.copy(os.path.join(src, "model.safetensors"), dst)
  return str(dst)


def test_bad_config_errors(tmp_path, saved):
  g2, g3 = saved["gemma2"][1], saved["gemma3"][1]
  with pytest.raises(ValueError, match="multimodal Gemma 3"):
    hf.load_pretrained(_copy_with_config(
        g3, tmp_path / "a", model_type="gemma3",
        architectures=["Gemma3ForConditionalGeneration"]))
  with pytest.raises(ValueError, match="use_bidirectional_attention"):
    hf.load_pretrained(_copy_with_config(g3, tmp_path / "b",
                                         use_bidirectional_attention=True))
  with pytest.raises(ValueError, match="attn_logit_softcapping"):
    hf.load_pretrained(_copy_with_config(g3, tmp_path / "c",
                                         attn_logit_softcapping=50.0))
  with pytest.raises(ValueError, match="hidden_activation='relu'"):
    hf.load_pretrained(_copy_with_config(g2, tmp_path / "d",
                                         hidden_activation="relu"))
  with pytest.raises(ValueError, match="sliding_window=None"):
    hf.load_pretrained(_copy_with_config(g2, tmp_path / "e",
                                         sliding_window=None))
  with pytest.raises(ValueError, match="sliding_attention.*rope_type"):
    hf.load_pretrained(_copy_with_config(g3, tmp_path / "f", rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1e4},
        "sliding_attention": {"rope_type": "linear", "factor": 2.0,
                              "rope_theta": 1e3}}))
  # A Gemma 3 checkpoint read as Gemma 2 has q/k norms it does not use.
  with pytest.raises(ValueError, match="does not use.*q_norm"):
    hf.load_pretrained(_copy_with_config(
        g3, tmp_path / "g", model_type="gemma2",
        architectures=["Gemma2ForCausalLM"], rope_parameters=None))


def test_export_refuses_what_no_family_expresses(tmp_path):
  base = get_model_config("gemma2_2b", vocab_size=32, num_layers=2,
                          embed_dim=32, num_heads=2, num_kv_heads=1,
                          head_dim=16, mlp_dim=32, max_seq_len=16)
  with pytest.raises(ValueError, match="post_norms"):
    hf.config_to_hf(dataclasses.replace(base, post_norms=False))
  with pytest.raises(ValueError, match="rope_local_theta"):
    hf.config_to_hf(dataclasses.replace(base, rope_local_theta=100.0))
  with pytest.raises(ValueError, match="attn_logit_softcap"):
    hf.config_to_hf(dataclasses.replace(base, qk_norm=True))
  assert hf.config_to_hf(base)["model_type"] == "gemma2"


# -- the Gemma 2 GSM8K config, end to end --------------------------------------
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim"
    " + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<start_of_turn>model\n' }}{% endif %}")


def _write_gemma_tokenizer(path, texts, vocab_size=400):
  """A BPE tokenizer with Gemma's special tokens and chat template."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=GEMMA_SPECIALS,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  os.makedirs(path, exist_ok=True)
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<bos>", "eos_token": "<eos>",
               "pad_token": "<pad>", "chat_template": GEMMA_TEMPLATE}, f)
  with open(os.path.join(path, "generation_config.json"), "w") as f:
    json.dump({"eos_token_id": [tok.token_to_id("<eos>"),
                                tok.token_to_id("<end_of_turn>")],
               "pad_token_id": tok.token_to_id("<pad>"),
               "bos_token_id": tok.token_to_id("<bos>")}, f)
  return tok.get_vocab_size(with_added_tokens=True)


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
  from tests.test_tasks import short_gsm8k  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("gemma2")
  source, texts = short_gsm8k(str(root / "src"))
  path = str(root / "model")
  vocab = _write_gemma_tokenizer(path, texts)
  cfg = transformers.Gemma2Config(
      vocab_size=vocab + 11, hidden_size=64, intermediate_size=128,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      head_dim=16, max_position_embeddings=512, sliding_window=8,
      final_logit_softcapping=2.0, attn_logit_softcapping=4.0,
      query_pre_attn_scalar=16, attn_implementation="eager")
  torch.manual_seed(0)
  model = transformers.Gemma2ForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_((0.3 if "norm" in name else 0.2) * torch.randn_like(p))
  model.save_pretrained(path)
  return path, source, str(root / "tfds"), model


def test_gemma2_gsm8k_config_loads_matches_and_trains(gemma_dir, tmp_path):
  from configs import gemma2_2b_gsm8k  # pylint: disable=g-import-not-at-top
  from rlax_llm import experiment  # pylint: disable=g-import-not-at-top
  from rlax_llm.training.metrics import read_metrics  # pylint: disable=g-import-not-at-top
  path, source, data_dir, hf_model = gemma_dir
  c = gemma2_2b_gsm8k.get_config()
  assert c.rl.logprob_chunk == 0 and c.task.chat_template
  c.model.update(hf_path=path, dtype="float32", param_dtype="float32",
                 remat="none", max_seq_len=104)
  c.task.update(source_dir=source, data_dir=data_dir, max_prompt_len=96,
                max_new_tokens=8)
  c.rl.update(steps=2, prompts_per_step=2, num_samples=2, num_microbatches=2,
              decode_chunk=0)
  c.eval.update(every=1, num_problems=3, num_samples=2, batch_size=4)
  c.reward.num_workers = 1
  c.progress = False
  exp = experiment.Experiment(c, str(tmp_path))
  cfg = exp.model_cfg
  assert (cfg.final_logit_softcap, cfg.attn_logit_softcap,
          cfg.sliding_window) == (2.0, 4.0, 8)
  prompt = exp.setup.task.train_batch(0, 1)[0].prompt
  assert prompt.startswith("<bos><start_of_turn>user\n")
  assert prompt.endswith("<end_of_turn>\n<start_of_turn>model\n")
  exp = experiment.Experiment(c, str(tmp_path))  # a fresh stream
  state, _ = exp.initial_state()
  ids = exp.setup.tokenizer.encode(prompt)
  assert ids[0] == exp.setup.tokenizer.bos_id and len(ids) > 4 * 8
  ours = np.asarray(nnx.jit(lambda m, x: m(x))(  # one program
      nnx.merge(exp.graphdef, state.params), np.asarray([ids], np.int32)))
  with torch.no_grad():
    theirs = hf_model(torch.tensor([ids])).logits.numpy()
  assert np.abs(theirs).max() > 0.5
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
  del state
  summary = exp.run()
  rl = [r for r in read_metrics(str(tmp_path / "metrics.jsonl"))
        if "rl/loss" in r]
  assert [r["step"] for r in rl] == [1, 2]
  for r in rl:
    assert np.isfinite(r["rl/loss"]) and r["reward/errors"] == 0
    # Rollout and update log-probs both see the soft-capped logits.
    assert r["rl/logp_mismatch_max"] < 1e-4
  assert 0.0 <= summary["final_accuracy"] <= 1.0
