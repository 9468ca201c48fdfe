"""Attention layouts on 8 simulated CPU devices (tests/conftest.py).

* attnlib.sharding.attention.ShardedAttention (explicit shard_map programs,
  "heads" and "batch_kv"): prefill and decode equal the unsharded layer for
  softmax MQA / GQA / MHA, sliding window, linear (gate and rate decay) and
  Aaren layers, and the compiled HLO's collectives (kind, mesh axes, bytes
  each chip sends) equal `attention_collectives` exactly;
* attnlib.sharding.rules.shard_model (jit + NamedSharding, every weight
  layout): the sharded LM's forward and its decode (prefill + steps on a
  sharded cache) equal the unsharded model.

float32 with exact matmuls: the sharded and unsharded programs differ in
summation order only (partial sums over heads / E shards, reduce-scatter).
Observed max |diff| <= 6e-6 on outputs of magnitude ~1-5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from attnlib.models.lm import LMConfig
from attnlib.models.lm import TransformerLM
from attnlib.nn.attention import Attention
from attnlib.nn.attention import AttentionConfig as A
from attnlib.sharding import hlo
from attnlib.sharding.attention import ShardedAttention
from attnlib.sharding.attention import attention_collectives
from attnlib.sharding.mesh import MeshConfig
from attnlib.sharding.mesh import make_mesh
from attnlib.sharding.rules import shard_model

TOL = dict(atol=2e-5, rtol=2e-5)
B, T, E, H, D = 8, 6, 32, 8, 4
PREFILL = 4          # decode: a prefill of 4 tokens, then 2 single steps


@pytest.fixture(autouse=True)
def _exact_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


def _mesh(shape):
  cfg = MeshConfig(*shape)
  return make_mesh(cfg, jax.devices()[:cfg.num_devices])


def _np(x):
  return np.asarray(jax.device_get(x))


def _hlo_collectives(compiled, mesh):
  """Sorted (kind, axes, bytes each chip sends) of a compiled program."""
  shape = dict(mesh.shape)
  out = []
  for c in hlo.collectives_in_compiled(compiled):
    if c.sent_bytes:
      out.append((c.kind, hlo.group_axes(c.replica_groups, shape),
                  c.sent_bytes))
  return sorted(out)


def _model_collectives(collectives):
  return sorted((c.kind, c.axes, c.bytes_per_chip) for c in collectives)


# ------------------------------------------------ shard_map attention layers

LAYER_CASES = {
    # id: (layout, num_kv_heads, config, mesh shape)
    "mqa_softmax": ("batch_kv", 1, A(kind="softmax", rope=True), (2, 2, 2)),
    "gqa_softmax": ("batch_kv", 2, A(kind="softmax", rope=True), (4, 2, 1)),
    "gqa_window": ("batch_kv", 2,
                   A(kind="sliding_window", window=3, rope=True), (2, 2, 2)),
    "gqa_linear_gate": ("batch_kv", 2, A(kind="linear", decay="gate",
                                         output_norm=True), (2, 2, 2)),
    "mqa_aaren": ("batch_kv", 1, A(kind="aaren"), (2, 2, 2)),
    "mha_softmax": ("heads", 8, A(kind="softmax", rope=True), (2, 2, 2)),
    "mha_linear_rate": ("heads", 8, A(kind="linear", decay="rate"),
                        (2, 2, 1)),
}


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_sharded_attention_matches_layer_and_hlo(case):
  layout, hkv, cfg, mesh_shape = LAYER_CASES[case]
  mesh = _mesh(mesh_shape)
  layer = Attention(E, H, hkv, D, cfg, rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(0), (B, T, E))
  ref = _np(nnx.jit(lambda l, x: l(x))(layer, x))

  sharded = ShardedAttention(layer, mesh, layout)
  params = sharded.put_params()
  # Prefill (the full forward).
  y = sharded(x, params)
  assert y.sharding.spec == sharded.x_spec
  np.testing.assert_allclose(_np(y), ref, **TOL)
  # Decode: a prefill into the sharded cache, then single-token steps.
  cache = sharded.init_cache(B, T)
  outs = []
  for lo, hi in ((0, PREFILL),) + tuple((t, t + 1) for t in range(PREFILL, T)):
    y_t, cache = sharded.decode(x[:, lo:hi], cache, params)
    outs.append(_np(y_t))
  np.testing.assert_allclose(np.concatenate(outs, 1), ref, **TOL)
  assert int(cache.length) == T
  a = sharded.x_spec[2]
  first = jax.tree.leaves(cache)[0]
  if layout == "batch_kv":      # the cache is split over batch on every axis
    assert first.sharding.spec[0] == a
  else:                         # over heads
    head_dim = 2 if cfg.kind == "softmax" else 1
    assert first.sharding.spec[head_dim] == a

  # The compiled programs perform exactly the listed collectives.
  want_prefill = _model_collectives(sharded.collectives(B, T))
  want_step = _model_collectives(sharded.collectives(B, 1))
  got_prefill = _hlo_collectives(sharded.lower(x, None, params).compile(),
                                 mesh)
  got_step = _hlo_collectives(
      sharded.lower(x[:, :1], cache, params).compile(), mesh)
  assert got_prefill == want_prefill
  assert got_step == want_step
  per_kind = {}
  for kind, _, sent in want_step:
    per_kind[kind] = per_kind.get(kind, 0) + sent
  assert hlo.sent_bytes_per_chip(hlo.collectives_in_compiled(
      sharded.lower(x[:, :1], cache, params).compile())) == per_kind
  kinds = {c[0] for c in want_step}
  assert ("all-to-all" in kinds) == (layout == "batch_kv")


def test_attention_collectives_formulas():
  """The list itself: bytes per chip in the ring convention."""
  shape = {"x": 2, "y": 2, "z": 2}
  b, t, e, h, d, n = 8, 1, 64, 16, 8, 8
  heads = attention_collectives("heads", batch=b, tokens=t, embed_dim=e,
                                num_heads=h, num_kv_heads=h, head_dim=d,
                                mesh_shape=shape, dtype_bytes=2)
  act = (n - 1) * b * t * e * 2 // n
  assert [(c.kind, c.axes, c.bytes_per_chip) for c in heads] == [
      ("all-gather", ("x", "y", "z"), act),
      ("reduce-scatter", ("x", "y", "z"), act)]
  mqa = attention_collectives("batch_kv", batch=b, tokens=t, embed_dim=e,
                              num_heads=h, num_kv_heads=1, head_dim=d,
                              mesh_shape=shape, dtype_bytes=2)
  q = (n - 1) * (b * t * h * d * 2 // n) // n
  assert [c.bytes_per_chip for c in mqa] == [act, q, q, act]
  assert [c.kind for c in mqa] == ["all-gather", "all-to-all", "all-to-all",
                                   "reduce-scatter"]
  # Independent of the context length; none on one chip; axes of size 1 drop.
  one = attention_collectives("batch_kv", batch=b, tokens=t, embed_dim=e,
                              num_heads=h, num_kv_heads=1, head_dim=d,
                              mesh_shape={"x": 1}, dtype_bytes=2)
  assert one == []
  x_only = attention_collectives("heads", batch=b, tokens=t, embed_dim=e,
                                 num_heads=h, num_kv_heads=h, head_dim=d,
                                 mesh_shape={"x": 4, "y": 1}, dtype_bytes=4)
  assert {c.axes for c in x_only} == {("x",)}


# ------------------------------------------------- whole models, jit + rules

MODEL_LAYERS = {
    "gqa": (2, A(kind="softmax", rope=True)),
    "mqa": (1, A(kind="softmax", rope=True)),
    "mha": (8, A(kind="softmax", rope=True)),
    "linear": (8, A(kind="linear", decay="gate")),
    "window": (2, A(kind="sliding_window", window=3, rope=True)),
}

MODEL_CASES = [
    # (model, mesh shape, layout, attention)
    ("gqa", (2, 2, 2), "ws2d", "auto"),
    ("mqa", (2, 2, 2), "wg_x", "auto"),
    ("mqa", (2, 2, 2), "wg_xyz", "auto"),
    ("mha", (2, 2, 2), "ws1d", "heads"),
    ("linear", (2, 2, 2), "wg_xy", "auto"),
    ("linear", (8, 1, 1), "ws1d", "batch_kv"),
    ("window", (2, 2, 2), "ws2d", "auto"),
]


def _lm(name, seed=0):
  hkv, layer = MODEL_LAYERS[name]
  cfg = LMConfig(vocab_size=64, embed_dim=E, num_heads=H, num_kv_heads=hkv,
                 head_dim=D, mlp_dim=64, num_layers=1, layers=layer,
                 max_len=T)
  return TransformerLM(cfg, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("name,mesh_shape,layout,attention", MODEL_CASES,
                         ids=[f"{c[0]}-{c[2]}-{c[3]}" for c in MODEL_CASES])
def test_sharded_model_matches_unsharded(name, mesh_shape, layout, attention):
  mesh = _mesh(mesh_shape)
  model = _lm(name)
  tokens = jax.random.randint(jax.random.key(2), (B, T), 0, 64)
  ref = _np(nnx.jit(lambda m, t: m(t))(model, tokens))

  sharded = shard_model(model, mesh, layout, attention=attention)
  want = {"auto": "heads" if name in ("mha", "linear") else "batch_kv"}
  assert sharded.attention == want.get(attention, attention)
  # The parameters live on the mesh as the rules say.
  up = model.blocks[0].mlp.up.kernel.get_value()
  assert up.sharding.mesh == mesh
  assert up.sharding.spec == sharded.shardings["blocks"][0]["mlp"]["up"][
      "kernel"].get_value().spec

  np.testing.assert_allclose(_np(sharded(tokens)), ref, **TOL)

  cache = sharded.init_cache(B, T)
  leaf = jax.tree.leaves(cache[0])[0]
  everything = tuple(mesh.axis_names)
  if sharded.attention == "batch_kv":
    assert leaf.sharding.spec[0] == everything
  outs = []
  for lo, hi in ((0, PREFILL),) + tuple((t, t + 1) for t in range(PREFILL, T)):
    logits, cache = sharded.decode(tokens[:, lo:hi], cache)
    outs.append(_np(logits))
    # The cache keeps its layout from step to step.
    assert jax.tree.leaves(cache[0])[0].sharding.spec == leaf.sharding.spec
  np.testing.assert_allclose(np.concatenate(outs, 1), ref, **TOL)


def test_heads_and_batch_kv_agree_for_mha():
  """A multi-head model under both attention layouts (explicit choice)."""
  mesh = _mesh((2, 2, 2))
  tokens = jax.random.randint(jax.random.key(3), (B, PREFILL), 0, 64)
  outs, specs = {}, {}
  for attention in ("heads", "batch_kv"):
    sharded = shard_model(_lm("mha", seed=4), mesh, "ws1d",
                          attention=attention)
    cache = sharded.init_cache(B, T)
    logits, cache = sharded.decode(tokens, cache)
    outs[attention] = _np(logits)
    specs[attention] = cache[0].k.sharding.spec
  np.testing.assert_allclose(outs["heads"], outs["batch_kv"], **TOL)
  assert specs["heads"] == P(None, None, ("x", "y", "z"), None)
  assert specs["batch_kv"] == P(("x", "y", "z"), None, None, None)


def test_bfloat16_program_moves_bfloat16():
  """dtype_bytes is the layer's dtype: a bfloat16 multi-query layer's
  program (x cast on entry) moves 2-byte elements, as listed, in the module
  jax lowers. XLA's CPU backend then widens bfloat16 collectives to float32
  (its compiled module moves twice the bytes, same collectives); TPU and GPU
  backends keep bfloat16."""
  mesh = _mesh((2, 2, 2))
  layer = Attention(E, H, 1, D, A(kind="softmax", rope=True),
                    rngs=nnx.Rngs(1), dtype=jnp.bfloat16,
                    param_dtype=jnp.bfloat16)
  sharded = ShardedAttention(layer, mesh)
  assert sharded.layout == "batch_kv"
  x = jax.random.normal(jax.random.key(0), (B, T, E))        # float32 in
  want = _model_collectives(sharded.collectives(B, T))
  assert want == _model_collectives(attention_collectives(
      "batch_kv", batch=B, tokens=T, embed_dim=E, num_heads=H,
      num_kv_heads=1, head_dim=D, mesh_shape=dict(mesh.shape),
      dtype_bytes=2))
  lowered = sharded.lower(x)
  assert _hlo_collectives(lowered.as_text(dialect="hlo"), mesh) == want
  compiled = _hlo_collectives(lowered.compile(), mesh)
  assert [c[:2] for c in compiled] == [c[:2] for c in want]
  assert all(g[2] in (w[2], 2 * w[2]) for g, w in zip(compiled, want))
