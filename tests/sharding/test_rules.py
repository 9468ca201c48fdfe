"""Logical axis rules (attnlib.sharding.rules), their ValueErrors, and the
int8 weight option (attnlib.sharding.quant), on 8 simulated CPU devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from attnlib.models.aaren import AarenConfig
from attnlib.models.aaren import AarenModel
from attnlib.models.lm import LMConfig
from attnlib.models.lm import TransformerLM
from attnlib.models.vision import NAT
from attnlib.models.vision import NATConfig
from attnlib.nn.attention import Attention
from attnlib.nn.attention import AttentionConfig as A
from attnlib.sharding import feedforward
from attnlib.sharding import quant
from attnlib.sharding import rules
from attnlib.sharding.attention import ShardedAttention
from attnlib.sharding.attention import attention_collectives
from attnlib.sharding.mesh import MeshConfig
from attnlib.sharding.mesh import make_mesh

XYZ = ("x", "y", "z")


@pytest.fixture(autouse=True)
def _exact_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


@pytest.fixture(scope="module")
def mesh222():
  return make_mesh(MeshConfig(2, 2, 2))


@pytest.fixture(scope="module")
def mesh8():
  return make_mesh(MeshConfig(8))


def _lm(hkv=2, layers=None, embed=32, seed=0, **kw):
  cfg = LMConfig(vocab_size=64, embed_dim=embed, num_heads=8,
                 num_kv_heads=hkv, head_dim=4, mlp_dim=64, num_layers=1,
                 layers=layers, max_len=8, **kw)
  return TransformerLM(cfg, rngs=nnx.Rngs(seed))


def _spec(shardings, *path):
  node = shardings
  for key in path:
    node = node[key]
  return node.get_value().spec


# ------------------------------------------------------------------- rules


def test_rule_tables():
  assert rules.LAYOUTS == feedforward.LAYOUTS
  assert dict(rules.logical_axis_rules("ws1d")) == {
      "batch": None, "vocab": XYZ, "embed": None, "mlp": XYZ, "heads": XYZ,
      "kv_heads": XYZ, "head_dim": None}
  r = dict(rules.logical_axis_rules("ws2d", "batch_kv"))
  assert (r["embed"], r["mlp"], r["heads"], r["kv_heads"], r["batch"]) == (
      "x", ("y", "z"), ("y", "z"), None, None)
  for layout, batch in (("wg_x", "x"), ("wg_xy", ("x", "y")),
                        ("wg_xyz", XYZ)):
    r = dict(rules.logical_axis_rules(layout))
    assert (r["embed"], r["mlp"], r["batch"]) == ("x", ("y", "z"), batch)
  # A mesh without some axes: they drop out of the rules.
  mesh4 = make_mesh(MeshConfig(4), jax.devices()[:4])
  assert dict(rules.logical_axis_rules("ws2d", mesh=mesh4))["mlp"] == ("y",
                                                                       "z")
  one_axis = jax.make_mesh((4,), ("x",), devices=jax.devices()[:4],
                           axis_types=(jax.sharding.AxisType.Auto,))
  assert dict(rules.logical_axis_rules("ws1d", mesh=one_axis))["mlp"] == "x"


@pytest.mark.parametrize("layout", rules.LAYOUTS)
def test_mlp_weights_follow_the_feedforward_layouts(layout, mesh222):
  """The LM's SwiGLU kernels are placed as attnlib.sharding.feedforward's
  program of the same layout expects them (w_in specs for gate/up, w_out
  for down), and the input batch as its activations."""
  sh = rules.model_shardings(_lm(), mesh222, layout)
  specs = feedforward.ffn_specs(layout, "swiglu")
  mlp = ("blocks", 0, "mlp")
  assert _spec(sh, *mlp, "gate", "kernel") == specs.weights[0]
  assert _spec(sh, *mlp, "up", "kernel") == specs.weights[1]
  assert _spec(sh, *mlp, "down", "kernel") == specs.weights[2]
  tokens = rules.input_sharding(mesh222, layout, (8, 4))
  assert tokens.spec[0] == specs.x[0]


def test_attention_placements(mesh222):
  gqa = rules.model_shardings(_lm(hkv=2), mesh222, "ws2d")   # auto: batch_kv
  attn = ("blocks", 0, "attn")
  assert _spec(gqa, *attn, "q", "kernel") == P("x", ("y", "z"), None)
  assert _spec(gqa, *attn, "k", "kernel") == P("x", None, None)
  assert _spec(gqa, *attn, "o", "kernel") == P(("y", "z"), None, "x")
  assert _spec(gqa, "embed", "embedding") == P(("y", "z"), "x")
  mha = rules.model_shardings(_lm(hkv=8), mesh222, "ws1d")   # auto: heads
  assert _spec(mha, *attn, "k", "kernel") == P(None, XYZ, None)
  assert _spec(mha, "norm", "scale") == P(None)
  assert rules.resolve_attention(_lm(hkv=8)) == "heads"
  assert rules.resolve_attention(_lm(hkv=1)) == "batch_kv"
  assert rules.resolve_attention(_lm(hkv=1), "heads") == "heads"


def test_cache_shardings_every_kind(mesh222):
  layers = (A(kind="softmax", rope=True), A(kind="sliding_window", window=2),
            A(kind="linear"), A(kind="aaren"))
  cfg = LMConfig(vocab_size=64, embed_dim=32, num_heads=8, num_kv_heads=8,
                 head_dim=4, mlp_dim=64, layers=layers, max_len=8)
  cache = TransformerLM(cfg, rngs=nnx.Rngs(0)).init_cache(8, 8)
  kv, win, lin, scan = rules.cache_shardings(cache, mesh222, "ws2d",
                                             attention="heads")
  assert kv.k.spec == win.v.spec == P(None, None, XYZ, None)
  assert lin.state.spec == P(None, XYZ, None, None)
  assert scan.state.m.spec == P(None, XYZ) and kv.length.spec == P()
  kv, win, lin, scan = rules.cache_shardings(cache, mesh222, "ws2d",
                                             attention="batch_kv")
  assert kv.k.spec == P(XYZ, None, None, None)
  assert lin.state.spec == P(XYZ, None, None, None)
  assert scan.state.w.spec == P(XYZ, None, None)
  # Heads mode under a weight-gathered layout: batch on its axes, heads on
  # the rest.
  kv = rules.cache_shardings(cache, mesh222, "wg_x", attention="heads")[0]
  assert kv.k.spec == P("x", None, ("y", "z"), None)


def test_other_models_shard(mesh222):
  """AarenModel and NAT place with the same rules (and Aaren runs)."""
  acfg = AarenConfig(input_dim=3, embed_dim=32, num_heads=8, num_layers=1,
                     mlp_dim=64)
  model = AarenModel(acfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (8, 5, 3))
  ref = np.asarray(nnx.jit(lambda m, x: m(x))(model, x))
  sharded = rules.shard_model(model, mesh222, "wg_xyz")
  assert model.in_proj.kernel.get_value().sharding.spec == P(None, "x")
  np.testing.assert_allclose(np.asarray(sharded(x)), ref, atol=2e-5,
                             rtol=2e-5)
  nat = nnx.eval_shape(lambda: NAT(NATConfig(
      embed_dims=(16, 32), depths=(1, 1), num_heads=(4, 8), kernel_size=3,
      num_classes=8), rngs=nnx.Rngs(0)))       # abstract: placements only
  sh = rules.model_shardings(nat, mesh222, "ws2d")
  assert _spec(sh, "head", "kernel") == P("x", None)


# -------------------------------------------------------------- ValueErrors


def test_value_errors(mesh222, mesh8):
  with pytest.raises(ValueError, match="unknown layout 'ws3d'"):
    rules.shard_model(_lm(), mesh222, "ws3d")
  with pytest.raises(ValueError, match="unknown attention layout 'rows'"):
    rules.shard_model(_lm(), mesh222, "ws1d", attention="rows")
  # More shards than kv heads for head sharding (GQA, 2 kv heads, 8 chips).
  with pytest.raises(ValueError, match=r"more shards \(8\) than kv_heads "
                     r"\(2\) for head sharding"):
    rules.model_shardings(_lm(hkv=2), mesh8, "ws1d", attention="heads")
  # A dimension not divisible by its mesh axes (embed 36 over x = 8).
  with pytest.raises(ValueError, match=r"embed\) of size 36 .* not "
                     r"divisible by mesh axes \('x',\)"):
    rules.model_shardings(_lm(embed=36), mesh8, "ws2d")
  # Batch-sharded caches / inputs need the batch to divide.
  cache = _lm(hkv=1).init_cache(4, 8)
  with pytest.raises(ValueError, match=r"batch\) of size 4 .* total size 8"):
    rules.cache_shardings(cache, mesh222, "ws1d", attention="batch_kv")
  with pytest.raises(ValueError, match=r"more shards \(8\) than cache heads "
                     r"\(1\)"):
    rules.cache_shardings(cache, mesh222, "ws1d", attention="heads")
  with pytest.raises(ValueError, match="input: dimension 0 \\(batch\\)"):
    rules.input_sharding(mesh222, "wg_xyz", (4, 3))
  with pytest.raises(ValueError, match="expected a KVCache"):
    rules.cache_partition_specs(object(), (), ())
  # The shard_map attention programs.
  mqa = Attention(32, 8, 1, 4, A(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"more shards \(8\) than kv heads "
                     r"\(1\).*use 'batch_kv'"):
    ShardedAttention(mqa, mesh222, "heads")
  with pytest.raises(ValueError, match="unknown attention layout 'rows'"):
    ShardedAttention(mqa, mesh222, "rows")
  with pytest.raises(ValueError, match="batch=4 is not divisible by 8"):
    ShardedAttention(mqa, mesh222).init_cache(4, 8)
  with pytest.raises(ValueError, match=r"num_heads=4 .* \(more shards than "
                     r"heads\)"):
    ShardedAttention(Attention(32, 4, 1, 4, A(), rngs=nnx.Rngs(0)), mesh222)
  with pytest.raises(ValueError, match="embed_dim=12"):
    attention_collectives("heads", batch=8, tokens=1, embed_dim=12,
                          num_heads=8, num_kv_heads=8, head_dim=4,
                          mesh_shape={"x": 8}, dtype_bytes=4)
  with pytest.raises(ValueError, match="unknown attention layout"):
    attention_collectives("ring", batch=8, tokens=1, embed_dim=16,
                          num_heads=8, num_kv_heads=8, head_dim=4,
                          mesh_shape={"x": 8}, dtype_bytes=4)


# --------------------------------------------------------------------- int8


def test_int8_params_and_logits():
  """Per-channel symmetric int8: kernels int8 + float32 scales; logits close
  to the float model. Measured (this config): max |diff| 0.056 on logits
  with max |logit| 7.4 (0.8%), relative L2 error 1.1%, 98% of argmaxes
  equal."""
  cfg = LMConfig(vocab_size=64, embed_dim=64, num_heads=8, num_kv_heads=2,
                 mlp_dim=128, num_layers=2, max_len=16)
  model = TransformerLM(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (8, 8), 0, 64)
  fwd = nnx.jit(lambda m, t: m(t))
  ref = np.asarray(fwd(model, tokens))
  before = quant.param_bytes(model)
  quant.quantize_model(model)
  assert quant.is_quantized(model)
  state = nnx.state(model, nnx.Param)
  q = state["blocks"][0]["attn"]["q"]
  assert q["kernel"].get_value().dtype == jnp.int8
  assert q["kernel"].get_value().shape == (64, 8, 8)
  assert q["scale"].get_value().dtype == jnp.float32
  assert q["scale"].get_value().shape == (8, 8)
  assert q["kernel"].get_metadata()["out_sharding"] == ("embed", "heads",
                                                        "head_dim")
  assert q["scale"].get_metadata()["out_sharding"] == ("heads", "head_dim")
  assert state["embed"]["embedding"].get_value().dtype == jnp.int8
  assert state["embed"]["scale"].get_value().shape == (64,)
  for kernel in ("gate", "up", "down"):
    assert state["blocks"][1]["mlp"][kernel]["kernel"].get_value().dtype == \
        jnp.int8
  after = quant.param_bytes(model)
  # int8 kernels + float32 scales and norms: 27% of the float32 bytes.
  assert after["int8"] + after["float32"] < 0.3 * before["float32"]
  out = np.asarray(fwd(model, tokens))
  err = np.abs(out - ref)
  assert err.max() < 0.02 * np.abs(ref).max()
  assert np.linalg.norm(out - ref) < 0.03 * np.linalg.norm(ref)
  assert (out.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_int8_matches_dequantized_weights():
  """The int8 layers compute exactly x @ (q * s): dequantised in the matmul."""
  lin = nnx.LinearGeneral((8, 4), 16, axis=(-2, -1), rngs=nnx.Rngs(0))
  q8 = quant.Int8Linear.from_linear(lin)
  x = jax.random.normal(jax.random.key(0), (3, 8, 4))
  w = quant.dequantize(q8.kernel.get_value(), q8.scale.get_value())
  np.testing.assert_allclose(np.asarray(q8(x)),
                             np.asarray(jnp.einsum("bhd,hde->be", x, w)),
                             atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(w), np.asarray(lin.kernel.get_value()),
                             atol=float(jnp.abs(lin.kernel.get_value()).max())
                             / 254 + 1e-7)


def test_int8_model_shards(mesh222):
  """A quantised model shards with the same layouts: the int8 LM under
  ws2d and the int8 attention layer under the batch_kv program equal their
  unsharded int8 versions."""
  model = quant.quantize_model(_lm(hkv=1))
  tokens = jax.random.randint(jax.random.key(1), (8, 4), 0, 64)
  ref = np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens))
  sharded = rules.shard_model(model, mesh222, "ws2d")
  assert model.blocks[0].attn.q.scale.get_value().sharding.spec == P(
      ("y", "z"), None)
  np.testing.assert_allclose(np.asarray(sharded(tokens)), ref, atol=2e-5,
                             rtol=2e-5)
  layer = model.blocks[0].attn
  x = jax.random.normal(jax.random.key(2), (8, 3, 32))
  want = np.asarray(nnx.jit(lambda l, x: l(x))(layer, x))
  prog = ShardedAttention(layer, mesh222, "batch_kv")
  np.testing.assert_allclose(np.asarray(prog(x)), want, atol=2e-5, rtol=2e-5)

