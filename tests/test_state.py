"""Train-state creation: the values of `init_state`, traced once per config."""

import dataclasses

import flax.nnx as nnx
import jax
import numpy as np
import optax

from rlax_llm.models import transformer
from rlax_llm.models.config import ModelConfig
from rlax_llm.parallel.mesh import make_mesh
from rlax_llm.training import state as state_lib

CFG = ModelConfig(vocab_size=29, num_layers=2, embed_dim=16, num_heads=2,
                  num_kv_heads=1, head_dim=8, mlp_dim=24, max_seq_len=16)


def _leaves_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(la, lb))


def test_created_state_is_init_state_bit_for_bit():
  """Per seed and optimiser (one with masked leaves), the same arrays as
  `init_state` compiled as one program, and close to an eager NNX init."""
  mesh = make_mesh()
  lora_cfg = dataclasses.replace(CFG, lora_rank=2)
  cases = [(CFG, optax.adamw(1e-3, weight_decay=0.1), 0),
           (CFG, optax.sgd(0.1, momentum=0.9), 5),
           (CFG, optax.adamw(1e-3), 2**33 + 1),  # a seed beyond 32 bits
           (lora_cfg, state_lib.lora_optimizer(optax.adam(1e-3), lora_cfg),
            3)]
  for cfg, opt, seed in cases:
    state, shardings = state_lib.create_train_state(cfg, opt, mesh,
                                                    seed=seed)
    whole = jax.jit(lambda c=cfg, o=opt, s=seed: state_lib.init_state(
        c, o, s))()
    assert _leaves_equal(state, whole), (cfg.lora_rank, seed)
    eager = nnx.split(transformer.Transformer(cfg, rngs=nnx.Rngs(seed)))[1]
    for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(eager)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6,
                                 atol=1e-7)
    assert jax.tree.structure(shardings) == jax.tree.structure(state)
    for x, sh in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
      assert x.sharding.is_equivalent_to(sh, x.ndim)


def test_states_for_other_seeds_reuse_the_traced_initialiser(monkeypatch):
  """The model's initialisation is traced once per config and layout, not
  per seed or optimiser (each trace builds a `Transformer`)."""
  cfg = dataclasses.replace(CFG, vocab_size=31)  # no other test's config
  built = []

  class Counting(transformer.Transformer):

    def __init__(self, *args, **kwargs):
      built.append(kwargs.get("rngs"))
      super().__init__(*args, **kwargs)

  monkeypatch.setattr(state_lib, "Transformer", Counting)
  mesh = make_mesh()
  states = [state_lib.create_train_state(cfg, opt, mesh, seed=seed)[0]
            for seed, opt in ((0, optax.sgd(0.1)), (1, optax.adam(1e-3)),
                              (0, optax.adamw(1e-3)))]
  assert len(built) == 1
  assert _leaves_equal(states[0].params, states[2].params)
  assert not _leaves_equal(states[0].params, states[1].params)


def test_abstract_model_is_shared_and_its_copies_are_the_callers():
  cfg = dataclasses.replace(CFG, vocab_size=37)
  g1, s1 = transformer.abstract_model(cfg)
  g2, s2 = transformer.abstract_model(dataclasses.replace(cfg))
  assert g1 is g2 and g1 == state_lib.model_graphdef(cfg)
  assert s1 is not s2 and jax.tree.leaves(s1) == jax.tree.leaves(s2)
  s1["embedding"] = None  # the caller's own copy
  _, s3 = transformer.abstract_model(cfg)
  assert jax.tree.leaves(s3) == jax.tree.leaves(s2)
  abstract = jax.eval_shape(lambda: state_lib.init_params(cfg, 0))
  assert jax.tree.structure(abstract) == jax.tree.structure(s3)
  assert jax.tree.leaves(abstract) == jax.tree.leaves(s3)
  axes = state_lib.param_logical_axes(cfg)
  assert axes["embedding"] == ("vocab", "embed")
