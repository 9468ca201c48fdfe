"""Tests for attnlib.nn.neighborhood: NeighborhoodAttention and
neighborhood_attention_fn, against a float64 NumPy brute force."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import attnlib as al
from attnlib.nn.neighborhood import NeighborhoodAttention
from attnlib.nn.neighborhood import neighborhood_attention_fn

B, E, H, D = 2, 12, 2, 6
TOL = dict(atol=2e-5, rtol=2e-5)


@pytest.fixture(autouse=True)
def _exact_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


def _normal(shape, seed):
  # NumPy, not jax.random: compiling the RNG for every shape is slow on CPU.
  return jnp.asarray(
      np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def _layer(seed=0, **options):
  options.setdefault("kernel_size", 3)
  return NeighborhoodAttention(E, H, D, rngs=nnx.Rngs(seed), **options)


# -------------------------------------------------- float64 NumPy reference


def _per_axis(value, rank):
  return tuple(value) if isinstance(value, (tuple, list)) else (value,) * rank


def axis_windows(n, k, d=1, causal=False):
  """Key positions each query position 0..n-1 sees along one axis.

  The rules of al.neighborhood_attention's docstring (NATTEN / NAT, stride
  1): position i is in dilation group g = i % d at group coordinate c = i // d;
  the group has n_g members g, g + d, ...; non-causal: the k group coordinates
  from clamp(c - k // 2, 0, n_g - k) (shifted, never shrunk, at the borders;
  an even k reaches one further left); causal: max(c - k + 1, 0) .. c.
  """
  out = []
  for i in range(n):
    g, c = i % d, i // d
    n_g = len(range(g, n, d))
    if causal:
      lo, hi = max(c - k + 1, 0), c
    else:
      lo = min(max(c - k // 2, 0), n_g - k)
      hi = lo + k - 1
    out.append([g + d * j for j in range(lo, hi + 1)])
  return out


def dense_mask(spatial, kernel_size, dilation=1, is_causal=False):
  """[N, N] bool over the row-major flattened grid: the product of axes."""
  rank = len(spatial)
  ks, ds, cs = (_per_axis(a, rank) for a in (kernel_size, dilation,
                                              is_causal))
  mask = np.ones((1, 1), bool)
  for n, k, d, c in zip(spatial, ks, ds, cs):
    m = np.zeros((n, n), bool)
    for i, keys in enumerate(axis_windows(n, k, d, c)):
      m[i, keys] = True
    mask = np.kron(mask, m).astype(bool)
  return mask


def attention_np(q, k, v, mask):
  """Masked softmax attention, float64: q, k, v [B, *S, H, D]."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  shape = q.shape
  q, k, v = (a.reshape(a.shape[0], -1, *a.shape[-2:]) for a in (q, k, v))
  s = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(q.shape[-1])
  s = np.where(mask, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhij,bjhd->bihd", p, v).reshape(shape[:-1] + (v.shape[-1],))


def layer_np(layer, x, **options):
  """The layer in float64 NumPy with its own weights."""
  w = {name: np.asarray(getattr(layer, name).kernel[...], np.float64)
       for name in "qkvo"}
  x = np.asarray(x, np.float64)
  q, k, v = (np.einsum("...e,ehd->...hd", x, w[n]) for n in "qkv")
  o = attention_np(q, k, v, dense_mask(x.shape[1:-1], **options))
  return np.einsum("...hd,hde->...e", o, w["o"])


@pytest.mark.parametrize("options, want", [
    (dict(k=3), [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5],
                 [4, 5, 6], [4, 5, 6]]),
    (dict(k=4), [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3], [1, 2, 3, 4],
                 [2, 3, 4, 5], [3, 4, 5, 6], [3, 4, 5, 6]]),
    (dict(k=3, d=2), [[0, 2, 4], [1, 3, 5], [0, 2, 4], [1, 3, 5], [2, 4, 6],
                      [1, 3, 5], [2, 4, 6]]),
    (dict(k=3, causal=True), [[0], [0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4],
                              [3, 4, 5], [4, 5, 6]]),
    (dict(k=2, d=3, causal=True), [[0], [1], [2], [0, 3], [1, 4], [2, 5],
                                   [3, 6]]),
])
def test_reference_windows_by_hand(options, want):
  """The reference's windows on a length-7 axis, worked out by hand."""
  assert axis_windows(7, **options) == want


# ---------------------------------------------------------- layer numerics


CASES = {
    "1d": ((11,), dict(kernel_size=3)),
    "1d_even_dilated": ((11,), dict(kernel_size=4, dilation=2)),
    "1d_causal": ((9,), dict(kernel_size=5, is_causal=True)),
    "2d": ((6, 7), dict(kernel_size=3)),
    "2d_per_axis_dilated": ((6, 7), dict(kernel_size=(3, 2), dilation=(2, 3))),
    "2d_causal_one_axis": ((6, 7), dict(kernel_size=3,
                                        is_causal=(True, False))),
    "2d_causal_dilated": ((7, 6), dict(kernel_size=3, dilation=2,
                                       is_causal=True)),
    "3d": ((4, 5, 6), dict(kernel_size=3)),
    "3d_mixed": ((4, 5, 6), dict(kernel_size=(2, 3, 3), dilation=(1, 1, 2),
                                 is_causal=(False, True, False))),
}


@pytest.mark.parametrize("name", CASES)
def test_layer_matches_numpy(name):
  spatial, options = CASES[name]
  layer = _layer(**options)
  x = _normal((B, *spatial, E), 1)
  y = layer(x)
  assert y.shape == x.shape and y.dtype == jnp.float32
  np.testing.assert_allclose(y, layer_np(layer, x, **options), **TOL)


def test_one_layer_serves_1d_2d_3d_inputs():
  layer = _layer(kernel_size=2, dilation=2)
  for spatial in ((8,), (4, 5), (4, 4, 5)):
    x = _normal((1, *spatial, E), 2)
    np.testing.assert_allclose(
        layer(x), layer_np(layer, x, kernel_size=2, dilation=2), **TOL)


def test_window_covering_everything_is_full_attention():
  layer = _layer(kernel_size=(4, 5))
  x = _normal((B, 4, 5, E), 3)
  full = np.ones((20, 20), bool)
  w = {n: np.asarray(getattr(layer, n).kernel[...], np.float64) for n in "qkvo"}
  q, k, v = (np.einsum("...e,ehd->...hd", np.asarray(x, np.float64), w[n])
             for n in "qkv")
  want = np.einsum("...hd,hde->...e", attention_np(q, k, v, full), w["o"])
  np.testing.assert_allclose(layer(x), want, **TOL)


def test_causal_layer_does_not_look_ahead():
  layer = _layer(kernel_size=3, is_causal=True)
  x = _normal((1, 6, 6, E), 4)
  x2 = x.at[:, 4:, :].set(_normal((1, 2, 6, E), 5))  # change rows 4, 5
  y, y2 = layer(x), layer(x2)
  np.testing.assert_allclose(y[:, :4], y2[:, :4], **TOL)
  assert not np.allclose(y[:, 4:], y2[:, 4:])


def test_bfloat16_computation():
  layer = _layer(kernel_size=3, dtype=jnp.bfloat16)
  x = _normal((B, 6, 7, E), 6)
  y = layer(x)
  assert y.dtype == jnp.bfloat16 and y.shape == x.shape
  np.testing.assert_allclose(np.asarray(y, np.float32),
                             layer_np(layer, x, kernel_size=3),
                             atol=5e-2, rtol=5e-2)


def test_jit_and_logical_axis_names():
  layer = _layer(kernel_size=3)
  x = _normal((B, 6, 7, E), 7)
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(layer, x), layer(x),
                             **TOL)
  P = jax.sharding.PartitionSpec
  specs = nnx.get_partition_spec(nnx.state(layer, nnx.Param))
  got = {name: specs[name]["kernel"].get_value() for name in "qkvo"}
  assert got == {"q": P("embed", "heads", "head_dim"),
                 "k": P("embed", "heads", "head_dim"),
                 "v": P("embed", "heads", "head_dim"),
                 "o": P("heads", "head_dim", "embed")}


# --------------------------------------------------------------- gradients


def _dense_layer_jnp(params, x, mask):
  """The layer as dense masked attention in jnp (for reference gradients)."""
  q, k, v = (jnp.einsum("...e,ehd->...hd", x, params[n]["kernel"][...])
             for n in "qkv")
  shape = q.shape
  q, k, v = (a.reshape(a.shape[0], -1, H, D) for a in (q, k, v))
  s = jnp.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(D)
  p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
  o = jnp.einsum("bhij,bjhd->bihd", p, v).reshape(shape)
  return jnp.einsum("...hd,hde->...e", o, params["o"]["kernel"][...])


@pytest.mark.parametrize("spatial, options", [
    ((7, 6), dict(kernel_size=3, dilation=(2, 1), is_causal=(False, True))),
    ((9,), dict(kernel_size=4, dilation=2)),
    ((3, 4, 5), dict(kernel_size=(2, 3, 2), is_causal=(True, False, False))),
], ids=["2d", "1d", "3d"])
def test_gradients_match_dense_reference(spatial, options):
  graphdef, params = nnx.split(_layer(**options), nnx.Param)
  x = _normal((B, *spatial, E), 8)
  cot = _normal((B, *spatial, E), 9)
  mask = jnp.asarray(dense_mask(spatial, **options))

  def loss(params, x):
    return jnp.sum(jnp.sin(nnx.merge(graphdef, params)(x)) * cot)

  def loss_ref(params, x):
    return jnp.sum(jnp.sin(_dense_layer_jnp(params, x, mask)) * cot)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  want = jax.jit(jax.grad(loss_ref, argnums=(0, 1)))(params, x)
  assert {tuple(str(p.key) for p in path if hasattr(p, "key"))
          for path, _ in jax.tree_util.tree_leaves_with_path(grads[0])} == {
              (n, "kernel") for n in "qkvo"}
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads),
                          jax.tree.leaves(want)):
    g = np.asarray(g)
    assert np.all(np.isfinite(g)) and np.any(g != 0), path
    scale = np.max(np.abs(w))
    np.testing.assert_allclose(g, w, atol=1e-5 * scale, rtol=1e-4,
                               err_msg=str(path))


def test_check_grads_small():
  options = dict(kernel_size=2, dilation=(1, 2), is_causal=(True, False))
  graphdef, params = nnx.split(_layer(**options), nnx.Param)
  x = _normal((1, 3, 4, E), 10)

  def f(params, x):
    return nnx.merge(graphdef, params)(x)

  check_grads(f, (params, x), order=1, modes=("rev",), eps=1e-3)


# ---------------------------------------------- neighborhood_attention_fn


def _mha(fn, seed=0, use_bias=True):
  return nnx.MultiHeadAttention(H, E, qkv_features=H * D, decode=False,
                                attention_fn=fn, use_bias=use_bias,
                                rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("spatial, options", [
    ((6, 7), dict(kernel_size=3)),
    ((7, 6), dict(kernel_size=(3, 2), dilation=(2, 1),
                  is_causal=(False, True))),
], ids=["plain", "dilated_causal"])
def test_fn_in_multi_head_attention(spatial, options):
  mha = _mha(neighborhood_attention_fn(**options))
  x = _normal((B, *spatial, E), 11)
  y = mha(x)
  assert y.shape == x.shape
  q, k, v = mha.query(x), mha.key(x), mha.value(x)        # [B, *S, H, D]
  direct = mha.out(al.neighborhood_attention(q, k, v, **options,
                                             implementation="xla"))
  np.testing.assert_allclose(y, direct, **TOL)
  np.testing.assert_allclose(
      y, np.einsum("...hd,hde->...e",
                   attention_np(q, k, v, dense_mask(spatial, **options)),
                   np.asarray(mha.out.kernel[...], np.float64))
      + np.asarray(mha.out.bias[...]), **TOL)


def test_fn_equals_layer_with_the_same_weights():
  options = dict(kernel_size=3, dilation=(1, 2), is_causal=(True, False))
  mha = _mha(neighborhood_attention_fn(**options), use_bias=False)
  layer = _layer(seed=5, **options)
  for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value"),
                       ("o", "out")):
    getattr(layer, ours).kernel[...] = getattr(mha, theirs).kernel[...]
  x = _normal((B, 6, 8, E), 12)
  np.testing.assert_allclose(mha(x), layer(x), **TOL)


def test_fn_call_is_causal_spatial_dims_and_batch_axes():
  x = _normal((B, 6, 7, E), 13)
  causal = _mha(neighborhood_attention_fn(3, is_causal=True))
  plain = _mha(neighborhood_attention_fn(3))
  np.testing.assert_allclose(plain(x, is_causal=True), causal(x), **TOL)
  assert not np.allclose(plain(x), causal(x))
  # Per-axis option or-ed with the call's is_causal: causal everywhere.
  partial = _mha(neighborhood_attention_fn(3, is_causal=(True, False)))
  np.testing.assert_allclose(partial(x, is_causal=True), causal(x), **TOL)

  q, k, v = (_normal((3, B, 4, 5, 6, H, D), s) for s in (14, 15, 16))
  mask = dense_mask((4, 5, 6), kernel_size=(2, 3, 3), dilation=(2, 1, 1))
  fn3 = neighborhood_attention_fn((2, 3, 3), dilation=(2, 1, 1),
                                  spatial_dims=3)
  flat = lambda a: a.reshape(-1, 4, 5, 6, H, D)  # noqa: E731
  want = attention_np(flat(q), flat(k), flat(v), mask)
  np.testing.assert_allclose(fn3(q, k, v), want.reshape(q.shape), **TOL)
  np.testing.assert_allclose(fn3(q[0, 0], k[0, 0], v[0, 0]), want[0], **TOL)

  fn1 = neighborhood_attention_fn(4, spatial_dims=1)   # [B, T, H, D] as nnx
  q1, k1, v1 = (a[0, :, 0, 0] for a in (q, k, v))      # [B, 6, H, D]
  np.testing.assert_allclose(
      fn1(q1, k1, v1, dropout_rate=0.1, deterministic=True),
      attention_np(q1, k1, v1, dense_mask((6,), kernel_size=4)), **TOL)


def test_fn_dtype_argument():
  fn = neighborhood_attention_fn(3)
  q = _normal((1, 5, 5, H, D), 17)
  out = fn(q, q, q, dtype=jnp.bfloat16)
  assert out.dtype == jnp.bfloat16


# ----------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, match", [
    (dict(embed_dim=0), r"embed_dim=0, expected an int >= 1"),
    (dict(num_heads=2.0), r"num_heads=2.0, expected an int >= 1"),
    (dict(kernel_size=1), r"kernel_size=1, expected an int >= 2"),
    (dict(kernel_size=(3, 1)), r"kernel_size=\(3, 1\), expected an int >= 2"),
    (dict(kernel_size=(3, 3, 3, 3)), r"kernel_size=\(3, 3, 3, 3\), expected "
     r".*sequence of 1 to 3"),
    (dict(kernel_size="3"), r"kernel_size='3', expected an int >= 2"),
    (dict(kernel_size=True), r"kernel_size=True, expected an int >= 2"),
    (dict(dilation=0), r"dilation=0, expected an int >= 1"),
    (dict(is_causal=1), r"is_causal=1, expected True or False"),
    (dict(is_causal=(True, 0)), r"is_causal=\(True, 0\), expected True or"),
])
def test_layer_construction_errors(kwargs, match):
  args = dict(embed_dim=E, num_heads=H, head_dim=D, kernel_size=3)
  args.update(kwargs)
  with pytest.raises(ValueError, match="NeighborhoodAttention: " + match):
    NeighborhoodAttention(**args, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("options, shape, match", [
    (dict(), (B, 5, 5, 7), r"x\.shape=\(2, 5, 5, 7\), expected \[B, \*spatial"
     r", 12\]"),
    (dict(), (B, E), r"x\.shape=\(2, 12\), expected"),
    (dict(), (B, 3, 3, 3, 3, E), r"x\.shape=\(2, 3, 3, 3, 3, 12\), expected"),
    (dict(kernel_size=(3, 3)), (B, 9, E), r"kernel_size=\(3, 3\), expected a "
     r"single value or 1 values \(the input has 1 spatial axes\)"),
    (dict(is_causal=(True,)), (B, 5, 5, E), r"is_causal=\(True,\), expected a "
     r"single value or 2 values"),
    (dict(kernel_size=3, dilation=2), (B, 5, 8, E),
     r"neighborhood_attention: kernel_size \* dilation=\(6, 6\), expected at "
     r"most the spatial shape \(5, 8\)"),
])
def test_layer_call_errors(options, shape, match):
  options.setdefault("kernel_size", 3)
  with pytest.raises(ValueError, match=match):
    _layer(**options)(jnp.zeros(shape))


def test_fn_errors():
  fn_name = "neighborhood_attention_fn: "
  for kwargs, match in (
      (dict(spatial_dims=0), r"spatial_dims=0, expected 1, 2 or 3"),
      (dict(spatial_dims=4), r"spatial_dims=4, expected 1, 2 or 3"),
      (dict(spatial_dims=True), r"spatial_dims=True, expected 1, 2 or 3"),
      (dict(kernel_size=(3, 3, 3)), r"kernel_size=\(3, 3, 3\), expected a "
       r"single value or 2 values"),
      (dict(kernel_size=1), r"kernel_size=1, expected an int >= 2"),
      (dict(dilation=-1), r"dilation=-1, expected an int >= 1"),
  ):
    kwargs.setdefault("kernel_size", 3)
    with pytest.raises(ValueError, match=fn_name + match):
      neighborhood_attention_fn(**kwargs)
  fn = neighborhood_attention_fn(3)
  q = jnp.zeros((B, 5, 5, H, D))
  for kwargs, match in (
      (dict(mask=jnp.ones((B, 1, 5, 5), bool)),
       r"mask=\(2, 1, 5, 5\), expected None"),
      (dict(bias=jnp.zeros((B, H, 5, 5))), r"bias=\(2, 2, 5, 5\), expected "
       r"None"),
      (dict(dropout_rate=0.1), r"dropout_rate=0.1, expected 0.0"),
      (dict(module=_mha(fn)), r"module='MultiHeadAttention', expected None"),
  ):
    with pytest.raises(ValueError, match=fn_name + match):
      fn(q, q, q, **kwargs)
  with pytest.raises(ValueError, match=fn_name + r"query\.shape=\(5, 2, 6\), "
                     r"expected \[\.\.\., \*spatial, H, D\]"):
    fn(q[0, 0], q[0, 0], q[0, 0])
  # The module's sow_weights reaches the function as module=.
  with pytest.raises(ValueError, match="sow_weights is not supported"):
    _mha(fn)(jnp.zeros((1, 5, 5, E)), sow_weights=True)
