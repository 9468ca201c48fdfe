"""Tests for attnlib.models.lm: LMConfig, the layer-pattern helpers and
TransformerLM (forward, causality, gradients, training, decode == forward,
cache sizes)."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnlib.models.lm import LMConfig
from attnlib.models.lm import TransformerLM
from attnlib.models.lm import based_layers
from attnlib.models.lm import every_nth
from attnlib.models.lm import layer_pattern
from attnlib.nn.attention import AttentionConfig as A

B, T, V, E, H, HKV, D, M = 2, 10, 32, 16, 2, 1, 8, 32
# decode == forward: float32 with exact matmuls; the paths differ only in
# summation order (chunked scans vs recurrences, masked vs cached keys).
# (Observed: <= 1.1e-6 on logits of magnitude ~4.)
TOL = dict(atol=5e-6, rtol=1e-5)
# Prefill 4, two single-token steps, then a 4-token chunk on a non-empty
# cache (2 compilations of decode per model: the CPU is slow to compile).
CHUNKS = (4, 1, 1, 4)


@pytest.fixture(autouse=True)
def _exact_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


KINDS = {
    "softmax": A(kind="softmax"),
    "softmax_rope": A(kind="softmax", rope=True),
    "linear": A(kind="linear"),
    "linear_rate": A(kind="linear", decay="rate"),
    "linear_gate_norm_rope": A(kind="linear", decay="gate", output_norm=True,
                               rope=True),
    "linear_taylor": A(kind="linear", feature_map="taylor"),
    "sliding_window": A(kind="sliding_window", window=3, rope=True),
    "sigmoid": A(kind="sigmoid", bias=-1.0, rope=True),
    "aaren": A(kind="aaren"),
}
HYBRIDS = {
    "every_2nd_softmax": every_nth(2, 2, A(kind="linear", decay="gate",
                                             output_norm=True),
                                   A(kind="softmax", rope=True)),
    "based": based_layers(2, window=3),
    "mixed4": (A(kind="aaren"), A(kind="linear", decay="rate"),
               A(kind="sliding_window", window=2), A(kind="sigmoid",
                                                     bias=-0.5)),
}
# One layer per kind (compiles faster); the hybrids stack 2-4 layers.
LAYERS = {**{k: (v,) for k, v in KINDS.items()}, **HYBRIDS}
# Every kind and option of KINDS in one stack (for the gradient test).
EXTRA = {"all_kinds": (
    A(kind="softmax", rope=True),
    A(kind="linear", decay="gate", output_norm=True, rope=True),
    A(kind="linear", feature_map="taylor", decay="rate"),
    A(kind="sliding_window", window=3, rope=True),
    A(kind="sigmoid", bias=-1.0),
    A(kind="aaren"))}
CASES = list(LAYERS)
LAYERS.update(EXTRA)


def _cfg(layers, **kwargs):
  kw = dict(vocab_size=V, embed_dim=E, num_heads=H, num_kv_heads=HKV,
            head_dim=D, mlp_dim=M, layers=layers, max_len=32)
  kw.update(kwargs)
  return LMConfig(**kw)


_MODELS = {}


def _model(name, seed=0, **kwargs):
  key = (name, seed, tuple(sorted(kwargs.items())))
  if key not in _MODELS:
    _MODELS[key] = TransformerLM(_cfg(LAYERS[name], **kwargs),
                                 rngs=nnx.Rngs(seed))
  return _MODELS[key]


def _tokens(seed=1, b=B, t=T):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, V, jnp.int32)


@nnx.jit
def _forward(model, tokens):
  return model(tokens)


@nnx.jit
def _decode(model, tokens, cache):
  return model.decode(tokens, cache)


def _decode_in_chunks(model, tokens, chunks=CHUNKS, max_len=None):
  """Logits of decoding tokens chunk by chunk (jitted decode per chunk),
  and the final cache."""
  cache = model.init_cache(tokens.shape[0], max_len)
  out, start = [], 0
  for size in chunks:
    logits, cache = _decode(model, tokens[:, start:start + size], cache)
    out.append(logits)
    start += size
  assert start == tokens.shape[1]
  return jnp.concatenate(out, axis=1), cache


# -------------------------------------------------------------------- config


def test_config_defaults_resolve():
  cfg = LMConfig(embed_dim=32, num_heads=4)
  assert cfg.vocab_size == 256
  assert cfg.num_layers == 2 and len(cfg.layers) == 2
  assert cfg.layers[0] == A(kind="softmax", rope=True)
  assert (cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim) == (4, 8, 128)
  cfg = LMConfig(embed_dim=32, num_heads=4, layers=A(kind="linear"),
                 num_layers=3)
  assert cfg.layers == (A(kind="linear"),) * 3
  cfg = LMConfig(embed_dim=32, num_heads=4, layers=based_layers(4))
  assert cfg.num_layers == 4
  assert dataclasses.replace(cfg, embed_dim=64).layers == cfg.layers


def test_layer_patterns():
  lin, soft = A(kind="linear"), A(kind="softmax")
  assert every_nth(8, 4, lin, soft) == (lin, lin, lin, soft) * 2
  assert every_nth(3, 1, lin, soft) == (soft,) * 3
  assert layer_pattern(5, (lin, soft)) == (lin, soft, lin, soft, lin)
  assert layer_pattern(2, soft) == (soft, soft)
  based = based_layers(4, window=8)
  assert [c.kind for c in based] == ["linear", "sliding_window"] * 2
  assert based[0].feature_map == "taylor" and based[1].window == 8
  assert based_layers(2, linear_first=False)[0].kind == "sliding_window"


@pytest.mark.parametrize("kwargs, field", [
    (dict(vocab_size=0), "vocab_size"),
    (dict(embed_dim=-1), "embed_dim"),
    (dict(num_heads=True), "num_heads"),
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(embed_dim=10, num_heads=4), "head_dim"),
    (dict(mlp_dim=0), "mlp_dim"),
    (dict(max_len=0), "max_len"),
    (dict(tie_embeddings=1), "tie_embeddings"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(dtype=jnp.int32), "dtype"),
    (dict(param_dtype="nonsense"), "param_dtype"),
    (dict(layers=(A(),) * 3, num_layers=2), "layers"),
    (dict(layers=()), "layers"),
    (dict(layers=("softmax",)), "layers"),
    (dict(layers=(A(kind="softmax", is_causal=False),)), "layers[0].is_causal"),
    (dict(head_dim=5, layers=A(rope=True)), "head_dim"),
    (dict(num_layers=0), "num_layers"),
])
def test_config_errors(kwargs, field):
  kw = dict(embed_dim=16, num_heads=4)
  kw.update(kwargs)
  with pytest.raises(ValueError, match=re.escape(f"LMConfig: {field}=")):
    LMConfig(**kw)


def test_pattern_errors():
  with pytest.raises(ValueError, match="every_nth: n=0"):
    every_nth(4, 0, A(), A())
  with pytest.raises(ValueError, match="every_nth: base="):
    every_nth(4, 2, "linear", A())
  with pytest.raises(ValueError, match="layer_pattern: num_layers=0"):
    layer_pattern(0, A())
  with pytest.raises(ValueError, match="layer_pattern: pattern="):
    layer_pattern(2, ())
  with pytest.raises(ValueError, match="every_nth: num_layers=0"):
    every_nth(0, 2, A(), A())
  with pytest.raises(ValueError, match="based_layers: num_layers=-2"):
    based_layers(-2)
  with pytest.raises(ValueError, match="based_layers: window=-1"):
    based_layers(2, window=-1)


def test_model_errors():
  model = _model("softmax")
  with pytest.raises(ValueError, match="config="):
    TransformerLM("cfg", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"tokens.shape=\(2,\)"):
    model(jnp.zeros((2,), jnp.int32))
  with pytest.raises(ValueError, match="tokens.dtype='float32'"):
    model(jnp.zeros((2, 3), jnp.float32))
  with pytest.raises(ValueError, match=r"tokens=.*values in \[0, 32\)"):
    model(jnp.full((2, 3), V, jnp.int32))
  with pytest.raises(ValueError, match="init_cache: batch=0"):
    model.init_cache(0)
  with pytest.raises(ValueError, match="init_cache: max_len=0"):
    model.init_cache(1, 0)
  with pytest.raises(ValueError, match="decode: cache="):
    model.decode(_tokens(), ())


# ------------------------------------------------------------------- forward


@pytest.mark.parametrize("name", CASES)
def test_forward_shapes_and_causality(name):
  model = _model(name)
  tokens = _tokens(seed=2)
  logits = _forward(model, tokens)
  assert logits.shape == (B, T, V) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  # Changing a future token leaves the earlier logits unchanged ...
  t = T // 2
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % V)
  logits2 = _forward(model, changed)
  np.testing.assert_array_equal(logits2[:, :t], logits[:, :t])
  # ... and changes the logits from there on.
  assert not np.allclose(logits2[:, t], logits[:, t])


def test_untied_head():
  model = _model("every_2nd_softmax", tie_embeddings=False)
  assert model.head is not None
  assert model.head.kernel.shape == (E, V)
  logits = _forward(model, _tokens())
  assert logits.shape == (B, T, V) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))


def _is_spec(x):
  return isinstance(x, jax.sharding.PartitionSpec)


def test_logical_axes():
  model = _model("mixed4", tie_embeddings=False)
  params = nnx.state(model, nnx.Param)
  specs = nnx.get_partition_spec(params)
  flat = {jax.tree_util.keystr(path): tuple(spec) for path, spec in
          jax.tree_util.tree_leaves_with_path(specs, is_leaf=_is_spec)}

  def get(suffix):
    return [v for k, v in flat.items() if k.endswith(suffix + ".value")]

  assert get("['embed']['embedding']") == [("vocab", "embed")]
  assert get("['head']['kernel']") == [("embed", "vocab")]
  assert get("['mlp']['gate']['kernel']") == [("embed", "mlp")] * 4
  assert get("['mlp']['down']['kernel']") == [("mlp", "embed")] * 4
  assert get("['attn']['k']['kernel']") == [
      ("embed", "kv_heads", "head_dim")] * 4
  assert get("['norm']['scale']") == [("embed",)]
  assert get("['attn_norm']['scale']") == [("embed",)] * 4
  # Every parameter has a name for each of its axes.
  spec_leaves = jax.tree.leaves(specs, is_leaf=_is_spec)
  param_leaves = jax.tree.leaves(params)
  assert len(spec_leaves) == len(param_leaves)
  for spec, leaf in zip(spec_leaves, param_leaves):
    assert len(spec) == leaf.ndim and None not in tuple(spec)


# ----------------------------------------------------------------- gradients


def _loss(model, tokens):
  logits = model(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, tokens[:, 1:]).mean()


_TRAIN = {}


def _train():
  """(gradients at init, losses of 15 adam steps) for the all_kinds model on
  a fixed batch; one compiled step shared by the two tests below."""
  if not _TRAIN:
    model = TransformerLM(_cfg(EXTRA["all_kinds"]), rngs=nnx.Rngs(3))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    tokens = _tokens(seed=7, t=12)

    @nnx.jit
    def step(model, opt, tokens):
      loss, grads = nnx.value_and_grad(_loss)(model, tokens)
      opt.update(model, grads)
      return loss, grads

    losses, grads0 = [], None
    for _ in range(15):
      loss, grads = step(model, opt, tokens)
      grads0 = grads if grads0 is None else grads0
      losses.append(float(loss))
    _TRAIN.update(grads=grads0, losses=losses)
  return _TRAIN["grads"], _TRAIN["losses"]


def test_grads_finite_and_nonzero():
  """Every parameter of a stack with every kind gets a finite, nonzero
  gradient."""
  grads, _ = _train()
  leaves = jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param))
  assert len(leaves) > 20
  for path, g in leaves:
    assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
    assert np.any(g != 0), jax.tree_util.keystr(path)


def test_adam_reduces_loss():
  _, losses = _train()
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.7 * losses[0], losses


# -------------------------------------------------------------------- decode


@pytest.mark.parametrize("name", CASES)
def test_decode_equals_forward(name):
  """Prefill + token steps + a chunk == the full forward (float32, exact
  matmuls, tight tolerance)."""
  model = _model(name)
  tokens = _tokens(seed=2)
  full = _forward(model, tokens)
  decoded, cache = _decode_in_chunks(model, tokens)
  np.testing.assert_allclose(decoded, full, **TOL)
  for layer_cache in cache:
    assert int(layer_cache.length) == T


def test_decode_bf16_close():
  model = _model("mixed4", dtype=jnp.bfloat16)
  tokens = _tokens(seed=2)
  full = _forward(model, tokens)
  decoded, _ = _decode_in_chunks(model, tokens)
  assert decoded.dtype == jnp.float32
  np.testing.assert_allclose(decoded, full, atol=0.1, rtol=0.1)


@pytest.mark.parametrize("name", ["linear", "linear_gate_norm_rope",
                                  "linear_taylor", "aaren", "sliding_window",
                                  "based"])
def test_cache_size_constant_in_max_len(name):
  model = _model(name)
  shapes = lambda n: jax.tree.map(lambda x: (x.shape, x.dtype),  # noqa: E731
                                  model.init_cache(B, n))
  assert shapes(16) == shapes(4096)


def test_kv_cache_grows_with_max_len():
  model = _model("softmax")
  small, big = model.init_cache(B, 16), model.init_cache(B, 64)
  assert small[0].k.shape[1] == 16 and big[0].k.shape[1] == 64
  assert model.init_cache(B)[0].k.shape[1] == model.config.max_len


# ------------------------------------------- LayerScale and hybrid-norm


def _stabilised(layer_scale, hybrid_norm):
  return TransformerLM(
      _cfg((A(kind="sigmoid", bias=-1.0, rope=True), A(kind="linear", decay="gate")),
           layer_scale=layer_scale, hybrid_norm=hybrid_norm), rngs=nnx.Rngs(3))


@pytest.mark.parametrize("layer_scale,hybrid_norm", [(0.1, False), (None, True), (0.5, True)])
def test_layer_scale_and_hybrid_norm_decode_equals_forward(layer_scale, hybrid_norm):
  model = _stabilised(layer_scale, hybrid_norm)
  tokens = _tokens(seed=4)
  decoded, _ = _decode_in_chunks(model, tokens)
  np.testing.assert_allclose(decoded, _forward(model, tokens), **TOL)


def test_layer_scale_and_hybrid_norm_compose_as_documented():
  """Block(x) == x + s_a * norm_o(attn(norm_a(x))), then h + s_m * mlp(norm_m(h)),
  written out from the block's own submodules; the scales start at the value."""
  model = _stabilised(0.25, True)
  block = model.blocks[0]
  np.testing.assert_array_equal(block.attn_scale[...], np.full((E,), 0.25, np.float32))
  spec = nnx.get_partition_spec(nnx.state(block, nnx.Param))["attn_scale"]
  assert tuple(jax.tree.leaves(spec, is_leaf=_is_spec)[0]) == ("embed",)
  x = jax.random.normal(jax.random.key(5), (B, T, E))
  # Distinct scales, so that a swap of the two would show.
  block.attn_scale[...] = jnp.linspace(0.1, 2.0, E)
  block.mlp_scale[...] = jnp.linspace(-1.0, 1.0, E)
  h = x + block.attn_scale[...] * block.attn_out_norm(block.attn(block.attn_norm(x)))
  want = h + block.mlp_scale[...] * block.mlp(block.mlp_norm(h))
  np.testing.assert_allclose(block(x), want, rtol=1e-6, atol=1e-6)
  plain = TransformerLM(_cfg((A(kind="sigmoid", bias=-1.0, rope=True),)), rngs=nnx.Rngs(3))
  assert plain.blocks[0].attn_scale is None and plain.blocks[0].attn_out_norm is None


@pytest.mark.parametrize("kwargs,field", [
    ({"layer_scale": 0.0}, "layer_scale"), ({"layer_scale": float("nan")}, "layer_scale"),
    ({"layer_scale": True}, "layer_scale"), ({"hybrid_norm": 1}, "hybrid_norm")])
def test_layer_scale_and_hybrid_norm_validation(kwargs, field):
  with pytest.raises(ValueError, match=field):
    _cfg(None, **kwargs)
