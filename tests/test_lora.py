"""LoRA adapters: exact base model at B = 0, merging, the adapter-only
optimiser, HF export/import through transformers, optimiser-state size."""

import dataclasses
import json
import os
import sys
import textwrap

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlax_llm.models import lora
from rlax_llm.models.config import LORA_TARGETS, ModelConfig, get_model_config
from rlax_llm.models.transformer import LoRAParam, Transformer
from rlax_llm.training import state as state_lib

V = 29
_BASE = dict(vocab_size=V, num_layers=2, embed_dim=32, num_heads=4,
             num_kv_heads=2, head_dim=8, mlp_dim=48, max_seq_len=40,
             init_std=0.3, qkv_bias=True, tie_embeddings=False)


def _cfg(**kw) -> ModelConfig:
  return ModelConfig(**dict(_BASE, **kw))


def _randomise_adapters(model: Transformer, seed: int, std: float = 0.2):
  """Gives every adapter A and B random values (B is zero when fresh)."""
  flat = nnx.to_flat_state(nnx.state(model, LoRAParam))
  for i, (_, var) in enumerate(flat):
    var.set_value(std * jax.random.normal(jax.random.key(seed + i),
                                          var.get_value().shape))
  nnx.update(model, nnx.from_flat_state(flat))


@nnx.jit
def _full(model, tok, mask):
  return model(tok, mask_BT=mask)


def _decode(model, prompt, pmask, conts):
  """Logits [B, G, T, V] of prefill + T - 1 decode steps (as generate runs)."""
  b, g, t = conts.shape

  @nnx.jit
  def run(model, prompt, pmask, conts):
    last, cache, plen = model.prefill(prompt, pmask, num_samples=g,
                                      max_new_tokens=t)
    out = [jnp.broadcast_to(last[:, None], (b, g, last.shape[-1]))]
    for i in range(t - 1):
      logits, cache = model.decode_step(conts[:, :, i], plen[:, None] + i,
                                        cache, i)
      out.append(logits)
    return jnp.stack(out, axis=2)

  return np.asarray(run(model, prompt, pmask, conts))


def _data(seed=0):
  rng = np.random.default_rng(seed)
  tok = jnp.asarray(rng.integers(0, V, (3, 9)))
  mask = jnp.asarray(np.arange(9)[None] >= np.array([0, 3, 5])[:, None])
  conts = jnp.asarray(rng.integers(0, V, (3, 2, 4)))
  return tok, mask, conts


@pytest.mark.parametrize("targets", [LORA_TARGETS, ("q", "v"), ("o", "up"),
                                     ("k", "gate", "down")])
def test_zero_adapters_give_exactly_the_base_model(targets):
  base = Transformer(_cfg(), rngs=nnx.Rngs(0))
  model = Transformer(_cfg(lora_rank=4, lora_targets=targets),
                      rngs=nnx.Rngs(0))
  _, params = nnx.split(model)
  base_part, adapters = lora.split_lora(params)
  # Same seed, same base weights; the base part is exactly a rank-0 state.
  want = nnx.split(base)[1]
  assert jax.tree.structure(base_part) == jax.tree.structure(want)
  for x, y in zip(jax.tree.leaves(base_part), jax.tree.leaves(want)):
    np.testing.assert_array_equal(x, y)
  names = {p[-1] for p, _ in nnx.to_flat_state(adapters)}
  assert names == {f"{t}_lora_{ab}" for t in targets for ab in "ab"}

  tok, mask, conts = _data()
  ref_full = np.asarray(_full(base, tok, mask))
  ref_dec = _decode(base, tok, mask, conts)
  # Fresh adapters (B = 0): bit-equal, full pass and prefill + decode.
  np.testing.assert_array_equal(np.asarray(_full(model, tok, mask)), ref_full)
  np.testing.assert_array_equal(_decode(model, tok, mask, conts), ref_dec)
  # Trained-looking adapters change the logits ...
  _randomise_adapters(model, seed=1)
  moved = np.asarray(_full(model, tok, mask))
  assert np.abs(moved - ref_full).max() > 1e-2
  # ... and `zero_adapters` switches them off again, bit for bit.
  graphdef, params = nnx.split(model)
  off = nnx.merge(graphdef, lora.zero_adapters(params))
  np.testing.assert_array_equal(np.asarray(_full(off, tok, mask)), ref_full)
  np.testing.assert_array_equal(_decode(off, tok, mask, conts), ref_dec)


def test_adapter_forward_matches_explicit_low_rank_sum():
  """Logits of the adapter model = base model on W + (alpha/r) A B (NumPy)."""
  cfg = _cfg(lora_rank=3, lora_alpha=6.0)
  model = Transformer(cfg, rngs=nnx.Rngs(2))
  _randomise_adapters(model, seed=5)
  base = Transformer(lora.base_config(cfg), rngs=nnx.Rngs(2))
  for la, lb in zip(model.layers, base.layers):
    for mod_a, mod_b, ts in ((la.attn, lb.attn, "qkvo"),
                             (la.mlp, lb.mlp, ("gate", "up", "down"))):
      for t in ts:
        a = np.asarray(getattr(mod_a, f"{t}_lora_a")[...], np.float64)
        b = np.asarray(getattr(mod_a, f"{t}_lora_b")[...], np.float64)
        w = np.asarray(getattr(mod_a, f"{t}_proj")[...], np.float64)
        delta = (a.reshape(-1, 3) @ b.reshape(3, -1)).reshape(w.shape)
        getattr(mod_b, f"{t}_proj")[...] = jnp.asarray(w + 2.0 * delta,
                                                       jnp.float32)
  tok, mask, conts = _data(1)
  want = np.asarray(_full(base, tok, mask))
  np.testing.assert_allclose(np.asarray(_full(model, tok, mask)), want,
                             atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(_decode(model, tok, mask, conts),
                             _decode(base, tok, mask, conts), atol=2e-5,
                             rtol=1e-5)


def _loss(graphdef, params, tok, mask):
  logits = nnx.merge(graphdef, params)(tok, mask_BT=mask)
  logp = jax.nn.log_softmax(logits[:, :-1])
  nll = -jnp.take_along_axis(logp, tok[:, 1:, None], axis=-1)[..., 0]
  m = mask[:, 1:]
  return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1)


def test_lora_optimizer_updates_only_adapters_and_merge_matches():
  cfg = _cfg(lora_rank=4)
  model = Transformer(cfg, rngs=nnx.Rngs(3))
  _randomise_adapters(model, seed=7, std=0.05)
  graphdef, params = nnx.split(model)
  opt = state_lib.lora_optimizer(optax.sgd(0.2), cfg)
  adam = state_lib.lora_optimizer(optax.adamw(1e-2, weight_decay=0.1), cfg)
  sgd = optax.sgd(0.5)  # rank 0: the optimiser itself, unwrapped
  assert state_lib.lora_optimizer(sgd, lora.base_config(cfg)) is sgd
  tok, mask, _ = _data(2)

  # Compiled (op by op, each operation would compile on its own).
  loss = jax.jit(_loss, static_argnums=0)
  grads = jax.jit(jax.grad(_loss, argnums=1), static_argnums=0)(
      graphdef, params, tok, mask)
  for tx in (opt, adam):
    updates, _ = jax.jit(lambda g, p, tx=tx: tx.update(g, tx.init(p), p))(
        grads, params)
    is_adapter = lora.adapter_mask(params)
    for u, g, on in zip(jax.tree.leaves(updates), jax.tree.leaves(grads),
                        jax.tree.leaves(is_adapter)):
      assert np.abs(np.asarray(g)).max() > 0  # the base has gradients too
      if on:
        assert np.abs(np.asarray(u)).max() > 0
      else:  # ... but receives exactly zero updates
        np.testing.assert_array_equal(np.asarray(u), 0.0)
  # Adam keeps moments only for the adapters: 2 x their size + the count.
  adam_state = adam.init(params)
  n = sum(x.size for x in jax.tree.leaves(adam_state))
  assert n == 2 * cfg.num_lora_params + 1

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(_loss, argnums=1)(graphdef, params, tok, mask)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  start, opt_state = params, opt.init(params)
  losses = [float(loss(graphdef, params, tok, mask))]
  for _ in range(3):
    params, opt_state = step(params, opt_state)
    losses.append(float(loss(graphdef, params, tok, mask)))
  assert losses[-1] < losses[0] - 1e-3, losses
  for x, y, on in zip(jax.tree.leaves(start), jax.tree.leaves(params),
                      jax.tree.leaves(lora.adapter_mask(params))):
    if on:
      assert np.abs(np.asarray(x) - np.asarray(y)).max() > 1e-6
    else:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  # The merged rank-0 model computes the adapter model's logits.
  merged = lora.merge_lora(params, cfg)
  base_model = nnx.merge(nnx.split(Transformer(lora.base_config(cfg),
                                               rngs=nnx.Rngs(0)))[0], merged)
  trained = nnx.merge(graphdef, params)
  want = np.asarray(_full(trained, tok, mask))
  np.testing.assert_allclose(np.asarray(_full(base_model, tok, mask)), want,
                             atol=1e-5, rtol=1e-5)
  # The same from the plain dict of arrays.
  merged_dict = lora.merge_lora(nnx.to_pure_dict(params), cfg)
  flat_a = sorted(
      jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(merged)),
      key=lambda kv: str(kv[0]))
  flat_b = sorted(jax.tree_util.tree_leaves_with_path(merged_dict),
                  key=lambda kv: str(kv[0]))
  assert [str(k) for k, _ in flat_a] == [str(k) for k, _ in flat_b]
  for (_, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(x, y)


def test_adapters_carry_their_base_weights_logical_axes():
  cfg = _cfg(lora_rank=2)
  abstract = nnx.split(nnx.eval_shape(lambda: Transformer(
      cfg, rngs=nnx.Rngs(0))))[1]
  axes = {tuple(p): v.get_metadata()["logical_axes"]
          for p, v in nnx.to_flat_state(abstract)}
  layer = ("layers", 1)
  assert axes[layer + ("attn", "q_lora_a")] == ("embed", None)
  assert axes[layer + ("attn", "q_lora_b")] == (None, "heads", "head_dim")
  assert axes[layer + ("attn", "k_lora_b")] == (None, "kv_heads", "head_dim")
  assert axes[layer + ("attn", "o_lora_a")] == ("heads", "head_dim", None)
  assert axes[layer + ("attn", "o_lora_b")] == (None, "embed")
  assert axes[layer + ("mlp", "up_lora_b")] == (None, "mlp")
  assert axes[layer + ("mlp", "down_lora_a")] == ("mlp", None)


def test_sharded_lora_train_state_on_a_mesh(forks):
  """Adapters and their Adam moments are sharded like their base weights."""
  code = textwrap.dedent(f"""
    import os
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8")
    import jax
    jax.config.update("jax_platforms", "cpu")
    import optax
    from jax.sharding import PartitionSpec as P
    from rlax_llm.models.config import ModelConfig
    from rlax_llm.parallel.mesh import make_mesh
    from rlax_llm.training import state as state_lib
    cfg = ModelConfig(**{dict(_BASE, lora_rank=4)!r})
    mesh = make_mesh(dict(data=2, fsdp=2, tensor=2))
    opt = state_lib.lora_optimizer(optax.adam(1e-3), cfg)
    state, sh = state_lib.create_train_state(cfg, opt, mesh, seed=0)
    attn = state.params["layers"][0]["attn"]
    assert attn["q_lora_a"].get_value().sharding.spec == P("fsdp", None)
    assert attn["q_lora_b"].get_value().sharding.spec == P(None, "tensor",
                                                            None)
    assert attn["q_proj"].get_value().sharding.spec == P("fsdp", "tensor",
                                                          None)
    mu = state.opt_state.inner_states["lora"].inner_state[0].mu
    mu_b = mu["layers"][0]["attn"]["q_lora_b"].get_value()
    assert mu_b.sharding.spec == P(None, "tensor", None), mu_b.sharding
    assert mu_b.shape == (4, 4, 8)
    print("OK")
  """)
  out = forks.run([sys.executable, "-c", code], timeout=300,
                  cwd=os.path.dirname(os.path.dirname(__file__)))
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_hf_export_merges_and_import_adds_fresh_adapters(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from rlax_llm.models import hf  # pylint: disable=g-import-not-at-top
  # A tiny Qwen2 shape (q/k/v biases, tied embedding).
  cfg = ModelConfig(vocab_size=61, num_layers=2, embed_dim=32, num_heads=4,
                    num_kv_heads=2, head_dim=8, mlp_dim=56, max_seq_len=64,
                    rope_theta=3000.0, qkv_bias=True, tie_embeddings=True,
                    init_std=0.2, lora_rank=4, lora_alpha=8.0)
  model = Transformer(cfg, rngs=nnx.Rngs(4))
  _randomise_adapters(model, seed=11)
  out = tmp_path / "merged"
  hf.save_pretrained(model, str(out))
  written = json.load(open(out / "config.json"))
  assert written["model_type"] == "qwen2"
  assert not any("lora" in k for k in written)
  header = hf.read_safetensors_header(str(out / hf.WEIGHTS_NAME))
  assert not any("lora" in k for k in header)
  assert {n for n, _, _ in hf.hf_tensor_specs(cfg)} == (
      set(header) - {"__metadata__", "__data_start__"})

  ref = transformers.AutoModelForCausalLM.from_pretrained(
      str(out), attn_implementation="eager").eval()
  rng = np.random.default_rng(3)
  tok = rng.integers(0, 61, (2, 9))
  mask = np.ones(tok.shape, bool)
  with torch.no_grad():
    want = ref(input_ids=torch.tensor(tok)).logits.float().numpy()
  ours = np.asarray(_full(model, jnp.asarray(tok), jnp.asarray(mask)))
  np.testing.assert_allclose(ours, want, atol=1e-4, rtol=1e-4)
  base = Transformer(lora.base_config(cfg), rngs=nnx.Rngs(4))
  unmerged = np.asarray(_full(base, jnp.asarray(tok), jnp.asarray(mask)))
  assert np.abs(unmerged - want).max() > 1e-2  # the adapters were folded in

  # Import into a LoRA config: the checkpoint's weights, fresh adapters.
  plain = hf.load_pretrained(str(out))
  cfg_in, params = hf.load_params(str(out), lora_rank=8, lora_alpha=4.0,
                                  lora_targets=("q", "v", "down"),
                                  lora_seed=1)
  assert (cfg_in.lora_rank, cfg_in.lora_targets) == (8, ("q", "v", "down"))
  base_part, adapters = lora.split_lora(params)
  for x, y in zip(jax.tree.leaves(base_part),
                  jax.tree.leaves(nnx.state(plain, nnx.Param))):
    np.testing.assert_array_equal(x, y)
  flat = dict((p, v.get_value()) for p, v in nnx.to_flat_state(adapters))
  assert len(flat) == 2 * 3 * cfg.num_layers
  fresh = nnx.split(Transformer(cfg_in, rngs=nnx.Rngs(1)))[1]
  for p, v in nnx.to_flat_state(lora.split_lora(fresh)[1]):
    # The seed's A (up to the rounding of a jitted vs an eager init).
    np.testing.assert_allclose(flat[tuple(p)], v.get_value(), rtol=1e-6)
    assert np.abs(flat[tuple(p)]).max() == 0 if p[-1].endswith("_b") \
        else np.abs(flat[tuple(p)]).max() > 0
  loaded = nnx.merge(nnx.split(Transformer(cfg_in, rngs=nnx.Rngs(0)))[0],
                     params)
  np.testing.assert_array_equal(
      np.asarray(_full(loaded, jnp.asarray(tok), jnp.asarray(mask))),
      np.asarray(_full(plain, jnp.asarray(tok), jnp.asarray(mask))))

  with pytest.raises(ValueError, match="adapters of lora_rank"):
    hf.save_pretrained((cfg, nnx.split(base)[1]), str(tmp_path / "bad"))


def test_optimizer_state_size_at_qwen2_5_0_5b():
  """Adam(W) state, full vs LoRA rank 16 on every projection (eval_shape)."""
  full_cfg = get_model_config("qwen2_5_0_5b", vocab_size=151_936)
  lora_cfg = dataclasses.replace(full_cfg, lora_rank=16)
  adamw = optax.adamw(1e-5)
  full = jax.eval_shape(lambda: state_lib.init_state(full_cfg, adamw, 0))
  with_lora = jax.eval_shape(lambda: state_lib.init_state(
      lora_cfg, state_lib.lora_optimizer(adamw, lora_cfg), 0))
  n_full = sum(x.size for x in jax.tree.leaves(full.opt_state))
  n_lora = sum(x.size for x in jax.tree.leaves(with_lora.opt_state))
  b_full = state_lib.opt_state_bytes(full.opt_state)
  b_lora = state_lib.opt_state_bytes(with_lora.opt_state)
  adapters = lora.num_adapter_params(with_lora.params)
  print(f"\nQwen2.5-0.5B shape, AdamW state: full {n_full:,} entries "
        f"({b_full / 2**30:.3f} GiB f32) for {full_cfg.num_params:,} params; "
        f"LoRA r=16 on {lora_cfg.lora_targets}: {n_lora:,} entries "
        f"({b_lora / 2**20:.1f} MiB) for {adapters:,} adapter params; "
        f"ratio {n_lora / n_full:.4%}")
  # Independent counts: 2 moments per parameter + the step count.
  assert n_full == 2 * full_cfg.num_params + 1
  # Per layer: r (in + out) over q, k, v, o, gate, up, down.
  d, q, kv, f = 896, 14 * 64, 2 * 64, 4864
  per_layer = 16 * ((d + q) * 2 + (d + kv) * 2 + (d + f) * 3)
  assert adapters == lora_cfg.num_lora_params == 24 * per_layer
  assert n_lora == 2 * adapters + 1
  assert n_lora < 0.05 * n_full
  assert b_lora < 0.05 * b_full
  # What XLA would allocate for the state: the compiled init's outputs
  # (compiled from shapes only, nothing allocated).
  compiled = {}
  for name, cfg, tx in (("full", full_cfg, adamw), ("lora", lora_cfg,
                        state_lib.lora_optimizer(adamw, lora_cfg))):
    params = jax.eval_shape(lambda c=cfg: state_lib.init_params(c, 0))
    analysis = jax.jit(tx.init).lower(params).compile().memory_analysis()
    compiled[name] = analysis.output_size_in_bytes
  print(f"compiled optimiser-state init outputs: full {compiled['full']:,} "
        f"bytes, LoRA {compiled['lora']:,} bytes "
        f"({compiled['lora'] / compiled['full']:.4%})")
  assert compiled["full"] >= b_full and compiled["lora"] >= b_lora
  assert compiled["lora"] < 0.05 * compiled["full"]


def test_bad_lora_configs_raise_naming_the_field():
  with pytest.raises(ValueError, match="lora_rank"):
    _cfg(lora_rank=-1)
  with pytest.raises(ValueError, match="lora_rank"):
    _cfg(lora_rank=1.5)
  with pytest.raises(ValueError, match="lora_alpha"):
    _cfg(lora_rank=4, lora_alpha=0.0)
  with pytest.raises(ValueError, match="unknown projections.*qkv"):
    _cfg(lora_rank=4, lora_targets=("qkv",))
  with pytest.raises(ValueError, match="lora_targets"):
    _cfg(lora_rank=4, lora_targets="q")
  with pytest.raises(ValueError, match="repeats"):
    _cfg(lora_rank=4, lora_targets=("q", "q"))
  with pytest.raises(ValueError, match="empty"):
    _cfg(lora_rank=4, lora_targets=())
  assert _cfg(lora_rank=2, lora_targets=["v", "q"]).lora_targets == ("q", "v")
  with pytest.raises(ValueError, match="lora_rank > 0"):
    lora.merge_lora(nnx.split(Transformer(_cfg(), rngs=nnx.Rngs(0)))[1],
                    _cfg())
