"""Tests for attnlib.nn.attention: AttentionConfig, Attention, apply_rope,
attention_fn."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnlib as al
from attnlib import nn as aln
from tests.oracles import attention_scan as scan_oracle
from tests.oracles import linear_attention as linear_oracle
from tests.oracles import sigmoid_attention as sigmoid_oracle
from tests.oracles import sliding_window as window_oracle

B, T, E, H, D = 2, 9, 16, 4, 8
HI = jax.lax.Precision.HIGHEST
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(autouse=True)
def _exact_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


C = aln.AttentionConfig
CONFIGS = {
    "softmax_causal": C(kind="softmax"),
    "softmax_full_rope": C(kind="softmax", is_causal=False, rope=True),
    "linear_elu": C(kind="linear"),
    "linear_gate_norm_rope": C(kind="linear", decay="gate", output_norm=True,
                               rope=True, rope_theta=500.0),
    "linear_taylor_rate": C(kind="linear", feature_map="taylor",
                            decay="rate"),
    "linear_relu_global": C(kind="linear", feature_map="relu",
                            is_causal=False),
    "linear_identity_norm": C(kind="linear", feature_map="identity",
                              output_norm=True),
    "window_pair": C(kind="sliding_window", window=(3, 1), is_causal=False),
    "window_causal_rope": C(kind="sliding_window", window=2, rope=True),
    "sigmoid_causal": C(kind="sigmoid"),
    "sigmoid_bias_full": C(kind="sigmoid", bias=-1.5, is_causal=False,
                           rope=True),
}
CAUSAL = [name for name, cfg in CONFIGS.items() if cfg.is_causal]


def _x(seed=1, b=B, t=T, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), (b, t, E), dtype)


@nnx.jit
def _apply(layer, x, positions=None):
  """layer(x) compiled whole (faster on CPU than op-by-op dispatch)."""
  return layer(x, positions=positions)


def _layer(cfg, hkv=2, seed=0, **kwargs):
  return aln.Attention(E, H, hkv, D, cfg, rngs=nnx.Rngs(seed), **kwargs)


# ----------------------------------------------------------------- references


def _rope_np(x, positions, theta):
  """float64 numpy RoPE, one pair (i, i + d/2) at a time."""
  x = np.asarray(x, np.float64)
  positions = np.broadcast_to(np.asarray(positions, np.float64),
                              x.shape[:-2])                    # [..., T]
  d = x.shape[-1]
  out = np.empty_like(x)
  for i in range(d // 2):
    angle = positions[..., None] * theta ** (-2.0 * i / d)    # [..., T, 1]
    c, s = np.cos(angle), np.sin(angle)
    a, b = x[..., i], x[..., i + d // 2]
    out[..., i] = a * c - b * s
    out[..., i + d // 2] = b * c + a * s
  return out


def _reference(layer, x, positions=None):
  """The layer's output from its own parameters, projections by einsum and
  attention by the tests' oracles."""
  cfg = layer.config
  q = jnp.einsum("bte,ehd->bthd", x, layer.q.kernel[...], precision=HI)
  k = jnp.einsum("bte,ehd->bthd", x, layer.k.kernel[...], precision=HI)
  v = jnp.einsum("bte,ehd->bthd", x, layer.v.kernel[...], precision=HI)
  if cfg.rope:
    pos = np.arange(x.shape[1]) if positions is None else positions
    q = jnp.asarray(_rope_np(q, pos, cfg.rope_theta), jnp.float32)
    k = jnp.asarray(_rope_np(k, pos, cfg.rope_theta), jnp.float32)
  if cfg.kind == "softmax":
    o = window_oracle.sliding_window_attention(
        q, k, v, left=None, right=None, is_causal=cfg.is_causal)
  elif cfg.kind == "sliding_window":
    left, right = ((cfg.window, cfg.window) if isinstance(cfg.window, int)
                   else cfg.window)
    o = window_oracle.sliding_window_attention(
        q, k, v, left=left, right=right, is_causal=cfg.is_causal)
  elif cfg.kind == "sigmoid":
    o = sigmoid_oracle.sigmoid_attention(q, k, v, bias=cfg.bias,
                                         is_causal=cfg.is_causal)
  else:
    phi = getattr(al.feature_maps, cfg.feature_map or "elu_plus_one")
    decay = None
    if cfg.decay == "rate":
      decay = jnp.exp(layer.log_rate[...])
    elif cfg.decay == "gate":
      logits = (jnp.einsum("bte,eh->bth", x, layer.gate.kernel[...],
                           precision=HI) + layer.gate.bias[...])
      decay = jax.nn.log_sigmoid(logits)
    o, _ = linear_oracle.linear_attention(phi(q), phi(k), v,
                                          is_causal=cfg.is_causal, decay=decay)
    if cfg.output_norm:
      ms = jnp.mean(o * o, axis=-1, keepdims=True)
      o = o * jax.lax.rsqrt(ms + 1e-6) * layer.out_norm.scale[...]
  return jnp.einsum("bthd,hde->bte", o, layer.o.kernel[...], precision=HI)


# --------------------------------------------------------------------- layer


@pytest.mark.parametrize("hkv", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_shapes_and_dtypes(name, hkv):
  """Abstract evaluation (no compute): parameter and output shapes."""
  layer = nnx.eval_shape(lambda: _layer(CONFIGS[name], hkv=hkv))
  assert layer.q.kernel.shape == (E, H, D)
  assert layer.k.kernel.shape == layer.v.kernel.shape == (E, hkv, D)
  assert layer.o.kernel.shape == (H, D, E)
  assert layer.q.kernel.dtype == jnp.float32
  out = nnx.eval_shape(lambda m, x: m(x), layer, _x())
  assert out.shape == (B, T, E) and out.dtype == jnp.float32


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bfloat16_shapes(name):
  layer = nnx.eval_shape(lambda: _layer(
      CONFIGS[name], dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
  assert all(p.dtype == jnp.bfloat16
             for p in jax.tree.leaves(nnx.state(layer, nnx.Param)))
  out = nnx.eval_shape(lambda m, x: m(x), layer, _x(dtype=jnp.bfloat16))
  assert out.shape == (B, T, E) and out.dtype == jnp.bfloat16


@pytest.mark.parametrize("name", ["linear_gate_norm_rope", "window_pair"])
def test_bfloat16(name):
  layer = _layer(CONFIGS[name], dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  out = _apply(layer, _x(dtype=jnp.bfloat16))
  assert out.shape == (B, T, E) and out.dtype == jnp.bfloat16
  assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))


REFERENCE_CASES = (
    [(name, 2) for name in CONFIGS]
    + [(name, 1) for name in ("softmax_causal", "linear_gate_norm_rope",
                              "window_pair", "sigmoid_causal")]
    + [(name, H) for name in ("softmax_full_rope", "linear_taylor_rate")])


@pytest.mark.parametrize("name, hkv", REFERENCE_CASES,
                         ids=[f"{n}-hkv{h}" for n, h in REFERENCE_CASES])
def test_matches_reference(name, hkv):
  layer = _layer(CONFIGS[name], hkv=hkv)
  x = _x()
  np.testing.assert_allclose(_apply(layer, x), _reference(layer, x), **TOL)


def test_matches_reference_with_positions_and_jit():
  layer = _layer(CONFIGS["linear_gate_norm_rope"])
  x = _x()
  positions = jnp.array([np.arange(T) + 3, np.arange(T) * 2])  # [B, T]
  out = _apply(layer, x, positions)
  np.testing.assert_allclose(out, _reference(layer, x, np.asarray(positions)),
                             **TOL)


@pytest.mark.parametrize("name", ["softmax_full_rope", "window_causal_rope",
                                  "sigmoid_bias_full"])
def test_rope_layers_see_relative_positions_only(name):
  """Shifting every position by a constant leaves the output unchanged."""
  layer = _layer(CONFIGS[name])
  x = _x()
  base = _apply(layer, x, jnp.arange(T))
  np.testing.assert_allclose(_apply(layer, x, jnp.arange(T) + 17), base,
                             atol=2e-5, rtol=2e-5)
  assert not np.allclose(_apply(layer, x, jnp.arange(T) * 2), base,
                         atol=1e-3)


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_layers_do_not_look_ahead(name):
  layer = _layer(CONFIGS[name])
  x = _x()
  t = 4
  x2 = x.at[:, t + 1:].set(_x(seed=7)[:, t + 1:])
  out, out2 = jnp.split(_apply(layer, jnp.concatenate([x, x2])), 2)
  np.testing.assert_allclose(out[:, :t + 1], out2[:, :t + 1], atol=1e-6,
                             rtol=1e-6)
  assert not np.allclose(out[:, t + 1:], out2[:, t + 1:])


@pytest.mark.parametrize("name", ["softmax_full_rope", "linear_relu_global",
                                  "window_pair", "sigmoid_bias_full"])
def test_non_causal_layers_look_ahead(name):
  layer = _layer(CONFIGS[name])
  x = _x()
  x2 = x.at[:, 1].set(0.0)      # within every window's right reach
  out, out2 = jnp.split(_apply(layer, jnp.concatenate([x, x2])), 2)
  assert not np.allclose(out[:, 0], out2[:, 0])


@pytest.mark.parametrize("name", [
    "softmax_causal", "linear_gate_norm_rope", "linear_taylor_rate",
    "window_causal_rope", "sigmoid_bias_full"])
def test_gradients_finite_and_nonzero(name):
  graphdef, params, rest = nnx.split(_layer(CONFIGS[name]), nnx.Param, ...)
  x = _x()

  def loss(params, x):
    layer = nnx.merge(graphdef, params, rest)
    return jnp.mean(jnp.sin(layer(x)))

  grads, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  leaves = jax.tree_util.tree_leaves_with_path(grads)
  assert len(leaves) == len(jax.tree.leaves(params))
  for path, g in leaves + [("x", gx)]:
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), path
    assert np.any(g != 0), path


def test_logical_axis_names():
  layer = _layer(C(kind="linear", decay="gate", output_norm=True))
  specs = nnx.get_partition_spec(nnx.state(layer, nnx.Param))
  P = jax.sharding.PartitionSpec
  want = {
      ("q", "kernel"): P("embed", "heads", "head_dim"),
      ("k", "kernel"): P("embed", "kv_heads", "head_dim"),
      ("v", "kernel"): P("embed", "kv_heads", "head_dim"),
      ("o", "kernel"): P("heads", "head_dim", "embed"),
      ("gate", "kernel"): P("embed", "heads"),
      ("gate", "bias"): P("heads"),
      ("out_norm", "scale"): P("head_dim"),
  }
  got = {tuple(str(k.key) for k in path if hasattr(k, "key")): spec
         for path, spec in jax.tree_util.tree_leaves_with_path(
             specs, is_leaf=lambda s: isinstance(s, P))}
  assert got == want
  rate = _layer(C(kind="linear", decay="rate"))
  assert rate.log_rate.get_metadata()["out_sharding"] == ("heads",)
  # With logical axis rules the names map onto mesh axes.
  rules = [("embed", None), ("heads", "model"), ("kv_heads", "model"),
           ("head_dim", None)]
  with nnx.logical_axis_rules(rules):
    specs = nnx.get_partition_spec(nnx.state(layer, nnx.Param))
  assert specs["k"]["kernel"].get_value() == P(None, "model", None)


def test_rate_decay_initialisation():
  layer = _layer(C(kind="linear", decay="rate"))
  rates = np.exp(np.asarray(layer.log_rate[...], np.float64))
  np.testing.assert_allclose(np.exp(-rates), 1 - 2.0 ** (-5 - np.arange(H)),
                             rtol=1e-6)


# ---------------------------------------------------------------------- rope


@pytest.mark.parametrize("positions_shape", ["[T]", "[B, T]"])
def test_apply_rope_matches_numpy(positions_shape):
  x = jax.random.normal(jax.random.key(3), (B, T, H, D))
  pos = np.arange(T) * 3 + 1
  if positions_shape == "[B, T]":
    pos = np.stack([pos, pos[::-1]])
  out = aln.apply_rope(x, jnp.asarray(pos), 1000.0)
  assert out.shape == x.shape and out.dtype == x.dtype
  np.testing.assert_allclose(out, _rope_np(x, pos, 1000.0), atol=1e-5,
                             rtol=1e-5)


def test_apply_rope_keeps_dtype_and_norm():
  x = jax.random.normal(jax.random.key(4), (B, T, H, D), jnp.bfloat16)
  out = aln.apply_rope(x, jnp.arange(T))
  assert out.dtype == jnp.bfloat16
  x32 = jax.random.normal(jax.random.key(4), (B, T, H, D))
  np.testing.assert_allclose(
      jnp.linalg.norm(aln.apply_rope(x32, jnp.arange(T) + 5), axis=-1),
      jnp.linalg.norm(x32, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(aln.apply_rope(x32, jnp.zeros(T)), x32)


def test_apply_rope_dot_products_depend_on_offset_only():
  kq, kk = jax.random.split(jax.random.key(5))
  q = jax.random.normal(kq, (B, T, H, D))
  k = jax.random.normal(kk, (B, T, H, D))

  def dots(m, n):  # [B, T, H] <rope(q, m), rope(k, n)>
    rq = aln.apply_rope(q, jnp.full((T,), m), 10000.0)
    rk = aln.apply_rope(k, jnp.full((T,), n), 10000.0)
    return np.asarray(jnp.sum(rq * rk, axis=-1))

  for offset in (0, 3, -5):
    values = [dots(m, m - offset) for m in (0, 7, 100, 2048)]
    for v in values[1:]:
      np.testing.assert_allclose(v, values[0], atol=1e-4, rtol=1e-4)
  assert np.all(np.abs(dots(10, 7) - dots(10, 3)) > 1e-4)


@pytest.mark.parametrize("x_shape, positions, match", [
    ((T, 2, 7), np.arange(T), r"x\.shape=\(9, 2, 7\), expected an even"),
    ((T, 2, 8), np.arange(T + 1), r"positions\.shape=\(10,\), expected"),
])
def test_apply_rope_rejects(x_shape, positions, match):
  with pytest.raises(ValueError, match=match):
    aln.apply_rope(jnp.zeros(x_shape), jnp.asarray(positions))


# -------------------------------------------------------------------- config


@pytest.mark.parametrize("kwargs, field, value, expected", [
    (dict(kind="flash"), "kind", "'flash'", "one of"),
    (dict(kind="linear", feature_map="cosformer"), "feature_map",
     "'cosformer'", "one of"),
    (dict(kind="linear", decay="exp"), "decay", "'exp'", "one of"),
    (dict(kind="linear", decay="gate", is_causal=False), "decay", "'gate'",
     "None with is_causal=False"),
    (dict(kind="sliding_window"), "window", "None", "an int >= 0"),
    (dict(kind="sliding_window", window=(2, -1)), "window", r"\(2, -1\)",
     "an int >= 0"),
    (dict(kind="sliding_window", window=1.5), "window", "1.5", "an int"),
    (dict(kind="softmax", window=3), "window", "3", "only kind='sliding_wi"),
    (dict(kind="softmax", decay="rate"), "decay", "'rate'", "only kind='lin"),
    (dict(kind="sigmoid", output_norm=True), "output_norm", "True",
     "only kind='linear'"),
    (dict(kind="linear", bias=1.0), "bias", "1.0", "only kind='sigmoid'"),
    (dict(kind="sigmoid", bias=float("inf")), "bias", "inf", "finite"),
    (dict(is_causal=1), "is_causal", "1", "a bool"),
    (dict(rope=True, rope_theta=0.0), "rope_theta", "0.0", "> 0"),
])
def test_config_validation(kwargs, field, value, expected):
  with pytest.raises(ValueError,
                     match=rf"{field}={value}, expected .*{expected}"):
    aln.AttentionConfig(**kwargs)


def test_config_is_frozen_and_hashable():
  cfg = C(kind="sliding_window", window=(4, 0))
  with pytest.raises(AttributeError):
    cfg.window = 3  # type: ignore[misc]
  assert hash(cfg) == hash(C(kind="sliding_window", window=(4, 0)))


@pytest.mark.parametrize("args, field, expected", [
    ((E, H, 3, D), "num_kv_heads", "a divisor of num_heads=4"),
    ((E, 0, 1, D), "num_heads", ""),
    ((E, H, 2, 7, C(rope=True)), "head_dim", "an even number"),
])
def test_layer_validation(args, field, expected):
  if len(args) == 4:
    args = args + (C(),)
  with pytest.raises(ValueError, match=rf"{field}=.*{expected}"):
    aln.Attention(*args, rngs=nnx.Rngs(0))


def test_layer_rejects_bad_input():
  with pytest.raises(ValueError, match=r"x\.shape=\(2, 9, 5\)"):
    _layer(C())(jnp.zeros((B, T, 5)))


# -------------------------------------------------------------- attention_fn


def _mha(fn=None, seed=0):
  kwargs = {} if fn is None else dict(attention_fn=fn)
  return nnx.MultiHeadAttention(H, E, qkv_features=H * D, decode=False,
                                rngs=nnx.Rngs(seed), **kwargs)


def _mha_reference(mha, x, attend):
  q, k, v = mha.query(x), mha.key(x), mha.value(x)
  return mha.out(attend(q, k, v))


@pytest.mark.parametrize("is_causal", [False, True])
def test_attention_fn_softmax_equals_nnx_default(is_causal):
  x = _x()
  ours, default = _mha(aln.attention_fn("softmax")), _mha()
  np.testing.assert_allclose(ours(x, is_causal=is_causal),
                             default(x, is_causal=is_causal), **TOL)
  mask = nnx.make_causal_mask(jnp.ones((B, T)))            # [B, 1, T, T]
  np.testing.assert_allclose(ours(x, mask=mask), default(x, mask=mask), **TOL)
  # Option is_causal=True: same as the call's is_causal=True.
  causal = _mha(aln.attention_fn("softmax", is_causal=True))
  np.testing.assert_allclose(causal(x), default(x, is_causal=True), **TOL)


@pytest.mark.parametrize("kind, options, attend", [
    ("sliding_window", dict(window=(2, 1)),
     lambda q, k, v: window_oracle.sliding_window_attention(
         q, k, v, left=2, right=1)),
    ("sliding_window", dict(window=3, is_causal=True),
     lambda q, k, v: window_oracle.sliding_window_attention(
         q, k, v, left=3, right=3, is_causal=True)),
    ("sigmoid", dict(),
     lambda q, k, v: sigmoid_oracle.sigmoid_attention(q, k, v)),
    ("sigmoid", dict(bias=-2.0, is_causal=True),
     lambda q, k, v: sigmoid_oracle.sigmoid_attention(q, k, v, bias=-2.0,
                                                      is_causal=True)),
    ("linear", dict(is_causal=True),
     lambda q, k, v: linear_oracle.linear_attention(
         al.feature_maps.elu_plus_one(q), al.feature_maps.elu_plus_one(k),
         v)[0]),
    ("linear", dict(feature_map="taylor"),
     lambda q, k, v: linear_oracle.linear_attention(
         al.feature_maps.taylor(q), al.feature_maps.taylor(k), v,
         is_causal=False)[0]),
], ids=["window", "window_causal", "sigmoid", "sigmoid_causal", "linear",
        "linear_taylor_global"])
def test_attention_fn_in_multi_head_attention(kind, options, attend):
  x = _x()
  mha = _mha(aln.attention_fn(kind, **options))
  np.testing.assert_allclose(mha(x), _mha_reference(mha, x, attend), **TOL)


def test_attention_fn_call_is_causal_and_batch_axes():
  fn = aln.attention_fn("sliding_window", window=2)
  q, k, v = (jax.random.normal(key, (3, B, T, H, D))
             for key in jax.random.split(jax.random.key(6), 3))
  out = fn(q, k, v, is_causal=True)
  want = al.sliding_window_attention(
      q.reshape(-1, T, H, D), k.reshape(-1, T, H, D), v.reshape(-1, T, H, D),
      local_window_size=2, is_causal=True, implementation="xla")
  np.testing.assert_allclose(out, want.reshape(3, B, T, H, D), **TOL)
  unbatched = fn(q[0, 0], k[0, 0], v[0, 0], is_causal=True)
  np.testing.assert_allclose(unbatched, want[0], **TOL)


def test_attention_fn_rejects():
  with pytest.raises(ValueError, match="kind='flash'"):
    aln.attention_fn("flash")
  for name, value in (("decay", "gate"), ("output_norm", True),
                      ("rope", True)):
    with pytest.raises(ValueError, match=rf"{name}={value!r}, expected not"):
      aln.attention_fn("linear", **{name: value})
  fn = aln.attention_fn("sigmoid")
  q = jnp.zeros((B, T, H, D))
  with pytest.raises(ValueError, match=r"mask=\(2, 1, 9, 9\), expected None"):
    fn(q, q, q, mask=jnp.ones((B, 1, T, T), bool))
  with pytest.raises(ValueError, match="dropout_rate=0.1"):
    fn(q, q, q, dropout_rate=0.1)
  assert fn(q, q, q, dropout_rate=0.1, deterministic=True).shape == q.shape


# --------------------------------------------------------------------- aaren


def _aaren_np(layer, x):
  """float64 NumPy Aaren layer: for every t a softmax of the learned query's
  logits over the prefix 0..t (no running max, no scan)."""
  x = np.asarray(x, np.float64)
  kernel = lambda p: np.asarray(p[...], np.float64)  # noqa: E731
  query = kernel(layer.query)                                    # [H, D]
  k = np.einsum("bte,ehd->bthd", x, kernel(layer.k.kernel))
  v = np.einsum("bte,ehd->bthd", x, kernel(layer.v.kernel))
  groups = H // k.shape[2]
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  s = np.einsum("hd,bthd->bth", query, k) / np.sqrt(D)           # [B, T, H]
  o = np.empty(v.shape)
  for t in range(x.shape[1]):
    p = np.exp(s[:, :t + 1] - s[:, :t + 1].max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    o[:, t] = np.einsum("bjh,bjhd->bhd", p, v[:, :t + 1])
  return np.einsum("bthd,hde->bte", o, kernel(layer.o.kernel))


AAREN = C(kind="aaren")


@pytest.mark.parametrize("hkv", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_aaren_matches_float64_numpy(hkv):
  layer = _layer(AAREN, hkv=hkv)
  x = _x()
  np.testing.assert_allclose(_apply(layer, x), _aaren_np(layer, x),
                             rtol=1e-5, atol=1e-6)


def test_aaren_parameters_and_axes():
  layer = _layer(AAREN)
  assert layer.q is None and layer.query.shape == (H, D)
  assert layer.query.dtype == jnp.float32
  assert layer.query.get_metadata()["out_sharding"] == ("heads", "head_dim")
  names = {tuple(str(k.key) for k in path if hasattr(k, "key"))
           for path, _ in jax.tree_util.tree_leaves_with_path(
               nnx.state(layer, nnx.Param))}
  assert names == {("query",), ("k", "kernel"), ("v", "kernel"),
                   ("o", "kernel")}
  bf16 = _layer(AAREN, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert bf16.query.dtype == jnp.bfloat16
  out = _apply(bf16, _x(dtype=jnp.bfloat16))
  assert out.shape == (B, T, E) and out.dtype == jnp.bfloat16
  assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))


def test_aaren_is_causal_and_first_output_is_v0():
  layer = _layer(AAREN)
  x = _x()
  t = 4
  x2 = x.at[:, t + 1:].set(_x(seed=7)[:, t + 1:])
  out, out2 = jnp.split(_apply(layer, jnp.concatenate([x, x2])), 2)
  np.testing.assert_allclose(out[:, :t + 1], out2[:, :t + 1], atol=1e-6,
                             rtol=1e-6)
  assert not np.allclose(out[:, t + 1:], out2[:, t + 1:])
  # At t = 0 the softmax has one term: the output is the projected v_0.
  v0 = jnp.repeat(layer.v(x[:, :1]), H // 2, axis=2)
  np.testing.assert_allclose(out[:, :1], layer.o(v0), atol=1e-6, rtol=1e-5)


def test_aaren_gradients_reach_the_query():
  graphdef, params, rest = nnx.split(_layer(AAREN), nnx.Param, ...)
  x = _x()

  def loss(params, x):
    return jnp.mean(jnp.sin(nnx.merge(graphdef, params, rest)(x)))

  grads, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  g = np.asarray(grads["query"][...])
  assert g.shape == (H, D) and np.all(np.isfinite(g)) and np.any(g != 0)
  for path, leaf in jax.tree_util.tree_leaves_with_path(grads) + [("x", gx)]:
    assert np.all(np.isfinite(leaf)) and np.any(np.asarray(leaf) != 0), path
  # The gradient of the query matches a finite difference (float64 NumPy).
  layer = nnx.merge(graphdef, params, rest)
  direction = np.asarray(jax.random.normal(jax.random.key(9), (H, D)))
  base = np.asarray(layer.query[...])
  eps = 1e-4
  values = []
  for sign in (1, -1):
    layer.query[...] = jnp.asarray(base + sign * eps * direction, jnp.float32)
    values.append(np.mean(np.sin(_aaren_np(layer, x))))
  np.testing.assert_allclose(np.sum(g * direction),
                             (values[0] - values[1]) / (2 * eps), rtol=1e-3)


@pytest.mark.parametrize("kwargs, field, value, expected", [
    (dict(kind="aaren", is_causal=False), "is_causal", "False",
     "True with kind='aaren'"),
    (dict(kind="aaren", rope=True), "rope", "True", "False with kind='aaren'"),
    (dict(kind="aaren", window=2), "window", "2", "only kind='sliding_wi"),
    (dict(kind="aaren", bias=1.0), "bias", "1.0", "only kind='sigmoid'"),
])
def test_aaren_config_validation(kwargs, field, value, expected):
  with pytest.raises(ValueError,
                     match=rf"{field}={value}, expected .*{expected}"):
    aln.AttentionConfig(**kwargs)


def test_attention_fn_aaren_in_multi_head_attention():
  mha = _mha(aln.attention_fn("aaren"))
  x = _x()
  token = jax.random.normal(jax.random.key(8), (1, 1, E))  # learned query
  out = mha(token, x)
  assert out.shape == (B, T, E)
  q = mha.query(token)[0, 0]                                   # [H, D]
  k, v = mha.key(x), mha.value(x)
  o = scan_oracle.attention_scan(q, k, v)
  np.testing.assert_allclose(out, mha.out(o), **TOL)
  # A per-example query token [B, 1, E] equal to the shared one: same.
  np.testing.assert_allclose(mha(jnp.broadcast_to(token, (B, 1, E)), x), out,
                             **TOL)
  # The module's is_causal flag changes nothing (a prefix scan is causal).
  np.testing.assert_allclose(mha(token, x, is_causal=True), out, **TOL)


def test_attention_fn_aaren_rejects():
  fn = aln.attention_fn("aaren")
  q1 = jnp.zeros((B, 1, H, D))
  k = jnp.zeros((B, T, H, D))
  with pytest.raises(ValueError, match=r"query\.shape=\(2, 9, 4, 8\), "
                                       r"expected \[\.\.\., 1, H, D\]"):
    fn(k, k, k)
  with pytest.raises(ValueError, match=r"query\.shape=\(3, 1, 4, 8\), "
                                       r"expected batch axes broadcastable"):
    fn(jnp.zeros((3, 1, H, D)), k, k)
  with pytest.raises(ValueError, match=r"mask=\(2, 1, 1, 9\), expected None"):
    fn(q1, k, k, mask=jnp.ones((B, 1, 1, T), bool))
  with pytest.raises(ValueError, match="is_causal=False, expected True"):
    aln.attention_fn("aaren", is_causal=False)


def test_attention_fn_neighborhood_delegates(monkeypatch):
  """attention_fn("neighborhood", **options) is
  attnlib.nn.neighborhood.neighborhood_attention_fn(**options), imported on
  use (here a stand-in module, so that the test does not depend on it)."""
  import sys
  import types
  calls = []
  fake = types.ModuleType("attnlib.nn.neighborhood")
  sentinel = object()

  def neighborhood_attention_fn(**options):
    calls.append(options)
    return sentinel

  fake.neighborhood_attention_fn = neighborhood_attention_fn
  monkeypatch.setitem(sys.modules, "attnlib.nn.neighborhood", fake)
  got = aln.attention_fn("neighborhood", kernel_size=3, dilation=2)
  assert got is sentinel
  assert calls == [dict(kernel_size=3, dilation=2)]


def test_attention_fn_neighborhood_runs_the_real_layer_fn():
  neighborhood = pytest.importorskip(
      "attnlib.nn.neighborhood",
      reason="attnlib.nn.neighborhood (helper B) not written yet")
  q, k, v = (jax.random.normal(key, (B, T, H, D))
             for key in jax.random.split(jax.random.key(10), 3))
  ours = aln.attention_fn("neighborhood", kernel_size=3, spatial_dims=1)
  theirs = neighborhood.neighborhood_attention_fn(kernel_size=3,
                                                  spatial_dims=1)
  np.testing.assert_allclose(ours(q, k, v), theirs(q, k, v), rtol=1e-6,
                             atol=1e-6)
