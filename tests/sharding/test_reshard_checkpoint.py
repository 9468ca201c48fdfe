"""Checkpoints written under one mesh layout restore under another
(attnlib.sharding.rules.restore_sharded: orbax reads every array straight
into the new layout's NamedSharding) and give the same outputs; 8 simulated
CPU devices."""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from attnlib.models.lm import LMConfig
from attnlib.models.lm import TransformerLM
from attnlib.nn.attention import AttentionConfig as A
from attnlib.sharding import quant
from attnlib.sharding import rules
from attnlib.sharding.mesh import MeshConfig
from attnlib.sharding.mesh import make_mesh
from attnlib.training import Checkpointer

TOL = dict(atol=2e-5, rtol=2e-5)
B, T = 8, 6


@pytest.fixture(autouse=True)
def _exact_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


def _lm(seed, hkv=2):
  cfg = LMConfig(vocab_size=64, embed_dim=32, num_heads=8, num_kv_heads=hkv,
                 head_dim=4, mlp_dim=64, num_layers=2, max_len=T,
                 layers=(A(kind="softmax", rope=True),
                         A(kind="linear", decay="gate")))
  return TransformerLM(cfg, rngs=nnx.Rngs(seed))


def _mesh(shape):
  cfg = MeshConfig(*shape)
  return make_mesh(cfg, jax.devices()[:cfg.num_devices])


def _np(x):
  return np.asarray(jax.device_get(x))


def _specs_match(model, sharded):
  """Every array of the model carries the target layout's sharding."""
  got = jax.tree.leaves(nnx.state(model))
  want = jax.tree.leaves(sharded.shardings)
  assert len(got) == len(want)
  for array, sharding in zip(got, want):
    assert array.sharding.mesh == sharding.mesh
    assert array.sharding.spec == sharding.spec


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A hybrid GQA LM sharded ws1d on an 8 x 1 x 1 mesh, saved with
  attnlib.training.Checkpointer at step 7 and with orbax directly; its
  outputs."""
  directory = tmp_path_factory.mktemp("ckpt")
  model = _lm(seed=0)
  with jax.default_matmul_precision("highest"):
    sharded = rules.shard_model(model, _mesh((8, 1, 1)), "ws1d")
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, 64)
    logits = _np(sharded(tokens))
  with Checkpointer(directory / "manager", async_save=False) as ck:
    ck.save(7, model)
  direct = os.fspath(directory / "direct")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(direct, nnx.to_pure_dict(nnx.state(model)))
  return dict(manager=directory / "manager", direct=direct, tokens=tokens,
              logits=logits)


@pytest.mark.parametrize("mesh_shape,layout", [((2, 2, 2), "ws2d"),
                                               ((2, 2, 2), "wg_xyz")],
                         ids=["ws2d", "wg_xyz"])
def test_checkpointer_restores_under_another_layout(saved, mesh_shape,
                                                    layout):
  model = _lm(seed=3)                  # other values: all must be restored
  mesh = _mesh(mesh_shape)
  with Checkpointer(saved["manager"]) as ck:
    sharded = rules.restore_sharded(ck, model, mesh, layout)
  assert sharded.layout == layout and sharded.attention == "batch_kv"
  _specs_match(model, sharded)
  np.testing.assert_allclose(_np(sharded(saved["tokens"])), saved["logits"],
                             **TOL)


def test_orbax_restore_onto_fewer_devices_and_decode(saved):
  """A plain orbax checkpoint of the 8-device model restored onto a 4-device
  2 x 2 x 1 mesh (ws2d): same forward, and decoding on the restored model's
  sharded cache gives the same logits."""
  model = _lm(seed=5)
  mesh = _mesh((2, 2, 1))
  sharded = rules.restore_sharded(saved["direct"], model, mesh, "ws2d")
  _specs_match(model, sharded)
  assert {d.id for d in model.embed.embedding.get_value().devices()} == set(
      range(4))
  tokens = saved["tokens"]
  cache = sharded.init_cache(B, T)
  logits, cache = sharded.decode(tokens[:, :T - 1], cache)
  last, cache = sharded.decode(tokens[:, T - 1:], cache)
  np.testing.assert_allclose(np.concatenate([_np(logits), _np(last)], 1),
                             saved["logits"], **TOL)


def test_int8_checkpoint_across_meshes(tmp_path):
  """A quantised model (int8 kernels + scales) round-trips across meshes."""
  model = quant.quantize_model(_lm(seed=0, hkv=1))
  tokens = jax.random.randint(jax.random.key(2), (B, 4), 0, 64)
  before = _np(rules.shard_model(model, _mesh((2, 2, 2)), "wg_x")(tokens))
  path = os.fspath(tmp_path / "int8")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, nnx.to_pure_dict(nnx.state(model)))
  fresh = quant.quantize_model(_lm(seed=9, hkv=1))
  sharded = rules.restore_sharded(path, fresh, _mesh((8, 1, 1)), "ws1d")
  kernel = fresh.blocks[0].mlp.up.kernel.get_value()
  assert kernel.dtype == np.int8
  assert kernel.sharding.spec == sharded.shardings["blocks"][0]["mlp"]["up"][
      "kernel"].get_value().spec
  np.testing.assert_allclose(_np(sharded(tokens)), before, **TOL)


def test_restore_errors(saved, tmp_path):
  with Checkpointer(saved["manager"]) as ck:
    with pytest.raises(ValueError, match="no checkpoint at step 3"):
      rules.restore_sharded(ck, _lm(seed=1), _mesh((8, 1, 1)), "ws1d",
                            step=3)
  with pytest.raises(ValueError, match="unknown layout"):
    rules.restore_sharded(saved["direct"], _lm(seed=1), _mesh((8, 1, 1)),
                          "2d")
