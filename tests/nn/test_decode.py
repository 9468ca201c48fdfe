"""Tests for incremental decoding: Attention.init_cache / Attention.decode and
the caches of attnlib.decoding.

Every decodable kind is decoded in several chunkings (a prefill then one token
at a time; uneven chunks) and each output is compared with the layer applied
to the whole sequence at float32 with exact matmuls.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnlib as al
from attnlib import decoding
from attnlib import nn as aln

B, E, H, D = 2, 16, 4, 8
T = 10                      # whole sequence
MAX_LEN = 12
# Decoding must equal the full forward to float32 rounding: within RTOL of
# each element plus SCALE_TOL of the output's largest magnitude, since an
# element where terms of that size cancel carries their rounding. (A flat
# 1e-6 floor failed at one such element of linear_plain, 0.0077 off by
# 2.8e-6 among outputs up to 28.9, with XLA's CPU code on an AMD EPYC host,
# at the commit before too. SCALE_TOL is ~17 float32 ulps of that scale; a
# decode bug such as a stale cache is off by 2.6-32 here.)
RTOL, SCALE_TOL = 1e-5, 2e-6


def _assert_matches(actual, desired):
  desired = np.asarray(desired)
  np.testing.assert_allclose(actual, desired, rtol=RTOL,
                             atol=SCALE_TOL * float(np.max(np.abs(desired))))


@pytest.fixture(autouse=True)
def _exact_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


C = aln.AttentionConfig
# name -> (config, num_kv_heads)
CASES = {
    "softmax_mha": (C(kind="softmax"), 4),
    "softmax_gqa_rope": (C(kind="softmax", rope=True, rope_theta=500.0), 2),
    "softmax_mqa": (C(kind="softmax"), 1),
    "sigmoid_gqa_rope": (C(kind="sigmoid", bias=-1.5, rope=True), 2),
    "sigmoid_mha": (C(kind="sigmoid", bias=0.5), 4),
    # Window smaller than the chunks (left reach 2; chunks of 3, 4, 5).
    "window_small_rope": (C(kind="sliding_window", window=2, rope=True), 2),
    # Left reach larger than every chunk (7); the right side is moot (causal).
    "window_large": (C(kind="sliding_window", window=(7, 3)), 1),
    "window_zero": (C(kind="sliding_window", window=0), 2),
    "linear_plain": (C(kind="linear"), 2),
    "linear_rate_taylor": (C(kind="linear", decay="rate",
                             feature_map="taylor"), 2),
    "linear_gate_norm_rope": (C(kind="linear", decay="gate", output_norm=True,
                                rope=True), 1),
    "linear_identity_norm": (C(kind="linear", feature_map="identity",
                               output_norm=True), 4),
    "aaren_gqa": (C(kind="aaren"), 2),
    "aaren_mha": (C(kind="aaren"), 4),
}
CHUNKINGS = {
    "prefill_then_steps": (4, 1, 1, 1, 1, 1, 1),
    "uneven": (5, 1, 3, 1),
    "steps_only": (1,) * T,
}


def _layer(name, seed=0):
  cfg, hkv = CASES[name]
  return aln.Attention(E, H, hkv, D, cfg, rngs=nnx.Rngs(seed))


def _x(seed=1, t=T):
  return jax.random.normal(jax.random.key(seed), (B, t, E), jnp.float32)


@nnx.jit
def _full(layer, x):
  return layer(x)


@nnx.jit
def _decode_jit(layer, x, cache):
  return layer.decode(x, cache)


def _decode_chunks(layer, x, chunks, cache=None, step=_decode_jit):
  assert sum(chunks) == x.shape[1]
  if cache is None:
    cache = layer.init_cache(B, MAX_LEN)
  outs, start = [], 0
  for n in chunks:
    y, cache = step(layer, x[:, start:start + n], cache)
    assert y.shape == (B, n, E) and y.dtype == jnp.float32
    outs.append(y)
    start += n
  return jnp.concatenate(outs, axis=1), cache


# -------------------------------------------------------- decode == forward


@pytest.mark.parametrize("chunking", ["prefill_then_steps", "uneven"])
@pytest.mark.parametrize("name", list(CASES))
def test_decode_matches_full_forward(name, chunking):
  layer = _layer(name)
  x = _x()
  y, cache = _decode_chunks(layer, x, CHUNKINGS[chunking])
  _assert_matches(y, _full(layer, x))
  assert int(cache.length) == T and cache.length.dtype == jnp.int32


@pytest.mark.parametrize("name", ["softmax_gqa_rope", "window_small_rope",
                                  "linear_gate_norm_rope", "aaren_gqa"])
def test_decode_token_by_token(name):
  layer = _layer(name)
  x = _x(seed=2)
  y, _ = _decode_chunks(layer, x, CHUNKINGS["steps_only"])
  _assert_matches(y, _full(layer, x))


@pytest.mark.parametrize("name", ["softmax_gqa_rope", "sigmoid_gqa_rope",
                                  "window_large", "linear_gate_norm_rope",
                                  "aaren_gqa"])
def test_decode_eagerly(name):
  """Outside jit (concrete lengths and states) the results are the same."""
  layer = _layer(name)
  x = _x(seed=3, t=5)
  step = lambda layer, x, cache: layer.decode(x, cache)  # noqa: E731
  y, cache = _decode_chunks(layer, x, (3, 1, 1), step=step)
  assert not isinstance(cache.length, jax.core.Tracer)
  _assert_matches(y, _full(layer, x))


def test_decode_under_jax_jit_with_traced_length():
  """jax.jit over (params, x, cache): the length is a tracer; one compilation
  serves every step of one chunk length."""
  layer = _layer("softmax_gqa_rope")
  graphdef, state = nnx.split(layer)
  traces = []

  @jax.jit
  def step(state, x, cache):
    traces.append(cache.length)
    return nnx.merge(graphdef, state).decode(x, cache)

  x = _x(seed=4)
  cache = layer.init_cache(B, MAX_LEN)
  y0, cache = step(state, x[:, :4], cache)
  outs = [y0]
  for t in range(4, T):
    y, cache = step(state, x[:, t:t + 1], cache)
    outs.append(y)
  assert len(traces) == 2                         # T = 4, then T = 1
  assert all(isinstance(t, jax.core.Tracer) for t in traces)
  _assert_matches(jnp.concatenate(outs, 1), _full(layer, x))


def test_decode_continues_past_a_prefill_of_the_whole_window():
  """Sliding window: decoding long after the buffer filled keeps matching."""
  layer = _layer("window_small_rope")
  x = _x(seed=5, t=20)
  cache = layer.init_cache(B, 20)
  y, cache = _decode_chunks(layer, x, (3, 4, 1, 2, 5, 1, 1, 3), cache=cache)
  _assert_matches(y, _full(layer, x))
  # The buffer holds the last W = 2 keys/values (the positions 18, 19).
  assert cache.k.shape == (B, 2, 2, D)
  k_full = layer.k(x)
  k_full = aln.apply_rope(k_full, jnp.arange(20), layer.config.rope_theta)
  _assert_matches(cache.k, k_full[:, -2:])


# ------------------------------------------------------------------- caches


@pytest.mark.parametrize("name, cls", [
    ("softmax_gqa_rope", decoding.KVCache),
    ("sigmoid_mha", decoding.KVCache),
    ("window_large", decoding.WindowCache),
    ("linear_rate_taylor", decoding.LinearCache),
    ("aaren_gqa", decoding.ScanCache),
])
def test_init_cache_types_and_shapes(name, cls):
  layer = _layer(name)
  hkv = CASES[name][1]
  cache = layer.init_cache(B, MAX_LEN)
  assert type(cache) is cls
  assert cache.length.shape == () and cache.length.dtype == jnp.int32
  assert int(cache.length) == 0
  if cls is decoding.KVCache:
    assert cache.k.shape == cache.v.shape == (B, MAX_LEN, hkv, D)
    assert cache.k.dtype == jnp.float32 and cache.max_len == MAX_LEN
  elif cls is decoding.WindowCache:
    assert cache.k.shape == cache.v.shape == (B, 7, hkv, D)
    assert cache.window == 7
  elif cls is decoding.LinearCache:
    k_dim = al.feature_maps.taylor(jnp.zeros((D,))).shape[-1]
    assert cache.state.shape == (B, H, k_dim, D)
    assert cache.state.dtype == jnp.float32
  else:
    assert isinstance(cache.state, al.AttentionScanState)
    assert cache.state.m.shape == cache.state.u.shape == (B, H)
    assert cache.state.w.shape == (B, H, D)
    assert bool(jnp.all(jnp.isneginf(cache.state.m)))
  assert not any(bool(jnp.any(jnp.isnan(leaf)))
                 for leaf in jax.tree.leaves(cache))


@pytest.mark.parametrize("name", ["window_small_rope", "window_large",
                                  "linear_plain", "linear_gate_norm_rope",
                                  "aaren_gqa"])
def test_recurrent_cache_size_does_not_depend_on_max_len(name):
  layer = _layer(name)
  shapes = lambda n: [(leaf.shape, leaf.dtype)  # noqa: E731
                      for leaf in jax.tree.leaves(layer.init_cache(B, n))]
  assert shapes(4) == shapes(64)


def test_kv_cache_size_follows_max_len_and_dtype():
  layer = _layer("softmax_mha")
  assert layer.init_cache(B, 4).k.shape[1] == 4
  cache = layer.init_cache(1, 32, dtype=jnp.bfloat16)
  assert cache.k.shape == (1, 32, 4, D) and cache.v.dtype == jnp.bfloat16
  # Recurrent states stay float32 whatever dtype is asked for.
  linear = _layer("linear_plain").init_cache(B, 8, dtype=jnp.bfloat16)
  assert linear.state.dtype == jnp.float32


def test_bfloat16_kv_cache_decodes():
  layer = _layer("softmax_gqa_rope")
  x = _x(seed=6)
  cache = layer.init_cache(B, MAX_LEN, dtype=jnp.bfloat16)
  y, cache = _decode_chunks(layer, x, (5, 1, 3, 1), cache=cache)
  assert cache.k.dtype == jnp.bfloat16
  np.testing.assert_allclose(y, _full(layer, x), rtol=5e-2, atol=5e-2)


def test_caches_are_pytrees_through_jit_and_tree_map():
  for name in ("softmax_mha", "window_large", "linear_plain", "aaren_gqa"):
    cache = _layer(name).init_cache(B, MAX_LEN)
    doubled = jax.jit(lambda c: jax.tree.map(lambda a: a, c))(cache)
    assert type(doubled) is type(cache)
    assert jax.tree.structure(doubled) == jax.tree.structure(cache)


def test_decode_leaves_unused_kv_rows_zero():
  layer = _layer("softmax_mha")
  _, cache = _decode_chunks(layer, _x(t=6), (5, 1))
  assert int(cache.length) == 6
  assert bool(jnp.all(cache.k[:, 6:] == 0))
  assert bool(jnp.all(cache.k[:, 5] != 0))


# ------------------------------------------------------------------- errors


@pytest.mark.parametrize("cfg, field, expected", [
    (C(kind="softmax", is_causal=False), r"config\.is_causal=False", "True"),
    (C(kind="linear", is_causal=False), r"config\.is_causal=False", "True"),
    (C(kind="sliding_window", window=2, is_causal=False),
     r"config\.is_causal=False", "True"),
    (C(kind="sigmoid"), r"config\.bias=None", "a fixed float"),
])
def test_init_cache_rejects_layers_that_cannot_decode(cfg, field, expected):
  layer = aln.Attention(E, H, 2, D, cfg, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=rf"init_cache: {field}, expected "
                                       rf"{expected}"):
    layer.init_cache(B, MAX_LEN)
  with pytest.raises(ValueError, match=rf"decode: {field}"):
    layer.decode(_x(t=1), decoding.KVCache(
        k=jnp.zeros((B, 4, 2, D)), v=jnp.zeros((B, 4, 2, D)),
        length=jnp.zeros((), jnp.int32)))


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch=0, max_len=4), r"batch=0, expected an int >= 1"),
    (dict(batch=2.0, max_len=4), r"batch=2\.0, expected an int"),
    (dict(batch=2, max_len=0), r"max_len=0, expected an int >= 1"),
    (dict(batch=2, max_len=4, dtype=jnp.int32),
     r"dtype=.*int32.*, expected None or a floating dtype"),
])
def test_init_cache_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _layer("softmax_mha").init_cache(**kwargs)


@pytest.mark.parametrize("shape, match", [
    ((B, 3, E + 1), r"x\.shape=\(2, 3, 17\), expected \[B, T >= 1, 16\]"),
    ((B, 0, E), r"x\.shape=\(2, 0, 16\), expected \[B, T >= 1, 16\]"),
    ((3, E), r"x\.shape=\(3, 16\), expected \[B, T >= 1, 16\]"),
])
def test_decode_rejects_bad_x(shape, match):
  layer = _layer("linear_plain")
  with pytest.raises(ValueError, match=match):
    layer.decode(jnp.zeros(shape), layer.init_cache(B, MAX_LEN))


@pytest.mark.parametrize("name, other", [
    ("softmax_mha", "linear_plain"),
    ("window_large", "softmax_mqa"),
    ("linear_plain", "aaren_gqa"),
    ("aaren_gqa", "window_zero"),
    ("sigmoid_mha", "aaren_mha"),
])
def test_decode_rejects_a_cache_of_another_kind(name, other):
  layer = _layer(name)
  wrong = _layer(other).init_cache(B, MAX_LEN)
  want = type(layer.init_cache(B, MAX_LEN)).__name__
  with pytest.raises(ValueError, match=rf"cache='{type(wrong).__name__}', "
                                       rf"expected a {want}"):
    layer.decode(_x(t=1), wrong)
  with pytest.raises(ValueError, match=rf"cache='tuple', expected a {want}"):
    layer.decode(_x(t=1), (1, 2))


@pytest.mark.parametrize("name, field", [
    ("softmax_mha", r"cache\.k\.shape=\(1, 12, 4, 8\)"),
    ("window_large", r"cache\.k\.shape=\(1, 7, 1, 8\)"),
    ("linear_plain", r"cache\.state\.shape=\(1, 4, 8, 8\)"),
    ("aaren_gqa", r"cache\.state\.m\.shape=\(1, 4\)"),
])
def test_decode_rejects_a_cache_of_another_batch(name, field):
  layer = _layer(name)
  with pytest.raises(ValueError, match=rf"{field}, expected \(2,"):
    layer.decode(_x(t=1), layer.init_cache(1, MAX_LEN))


def test_decode_rejects_a_cache_of_another_layer_shape():
  layer = _layer("softmax_mha")                   # Hkv = 4
  other = _layer("softmax_mqa").init_cache(B, MAX_LEN)  # Hkv = 1
  with pytest.raises(ValueError, match=r"cache\.k\.shape=\(2, 12, 1, 8\), "
                                       r"expected \(2, 12, 4, 8\)"):
    layer.decode(_x(t=1), other)
  bad_length = layer.init_cache(B, MAX_LEN).replace(length=jnp.zeros((2,)))
  with pytest.raises(ValueError, match=r"cache\.length=.*expected an integer"):
    layer.decode(_x(t=1), bad_length)


def test_decode_rejects_chunks_beyond_max_len():
  layer = _layer("sigmoid_mha")
  cache = layer.init_cache(B, 4)
  with pytest.raises(ValueError, match=r"x\.shape=\(2, 5, 16\), expected a "
                                       r"chunk of at most max_len=4"):
    layer.decode(_x(t=5), cache)
  with pytest.raises(ValueError, match=r"x\.shape=\(2, 5, 16\), expected a "
                                       r"chunk of at most max_len=4"):
    _decode_jit(layer, _x(t=5), cache)           # static: also under jit
  _, cache = layer.decode(_x(t=3), cache)
  with pytest.raises(ValueError, match=r"cache\.length=3, expected <= 2"):
    layer.decode(_x(t=2), cache)
  # The recurrent caches have no capacity: they go past max_len.
  linear = _layer("linear_plain")
  y, _ = _decode_chunks(linear, _x(), (6, 4), cache=linear.init_cache(B, 2))
  _assert_matches(y, _full(linear, _x()))
