"""al.neighborhood_attention vs the naive oracle, NATTEN's rules and JAX."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import attnlib as al
from attnlib.ops import _dispatch
from attnlib.ops import neighborhood as nb_lib
from tests.oracles import neighborhood as oracle

_oracle = oracle.neighborhood_attention

F32_TOL = dict(atol=2e-5, rtol=2e-5)
BF16_TOL = dict(atol=2e-2, rtol=2e-2)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
  """Query blocks of 16 so that most cases span several blocks, with padding."""
  monkeypatch.setattr(nb_lib, "QUERY_BLOCK", 16)


def _normal(shape, seed):
  # NumPy, not jax.random: compiling the RNG for every shape is slow on CPU.
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _inputs(spatial, heads=2, kv_heads=2, dim=8, v_dim=8, batch=2,
            dtype=jnp.float32, seed=0, as_numpy=False):
  q = _normal((batch, *spatial, heads, dim), seed)
  k = _normal((batch, *spatial, kv_heads, dim), seed + 1000)
  v = _normal((batch, *spatial, kv_heads, v_dim), seed + 2000)
  if as_numpy:
    return q, k, v
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


# ----------------------------------------------------------------------------
# Neighbor sets worked out by hand from NATTEN's rules (module docstring).
# ----------------------------------------------------------------------------

# 1-D axis of length 7; value: the key positions seen by queries 0..6.
HAND_CASES = {
    # k=3: window start clamp(i - 1, 0, 4).
    "k3": (dict(kernel_size=3),
           [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 6],
            [4, 5, 6]]),
    # Dilation 2: groups {0,2,4,6} (size 4) and {1,3,5} (size 3).
    "k3_d2": (dict(kernel_size=3, dilation=2),
              [[0, 2, 4], [1, 3, 5], [0, 2, 4], [1, 3, 5], [2, 4, 6],
               [1, 3, 5], [2, 4, 6]]),
    # Causal: window ends at the query and shrinks near the start.
    "k3_causal": (dict(kernel_size=3, is_causal=True),
                  [[0], [0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5],
                   [4, 5, 6]]),
    "k3_d2_causal": (dict(kernel_size=3, dilation=2, is_causal=True),
                     [[0], [1], [0, 2], [1, 3], [0, 2, 4], [1, 3, 5],
                      [2, 4, 6]]),
    # Even kernel: 2 tokens left of the centre, 1 right.
    "k4": (dict(kernel_size=4),
           [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3], [1, 2, 3, 4],
            [2, 3, 4, 5], [3, 4, 5, 6], [3, 4, 5, 6]]),
    # Stride 2: groups {0,1},{2,3},{4,5},{6} use the windows of 1, 3, 5, 6.
    "k3_s2": (dict(kernel_size=3, stride=2),
              [[0, 1, 2], [0, 1, 2], [2, 3, 4], [2, 3, 4], [4, 5, 6],
               [4, 5, 6], [4, 5, 6]]),
    # Stride == kernel: blocked attention; the partial last block {6} keeps
    # a full window shifted inside the axis.
    "k3_s3": (dict(kernel_size=3, stride=3),
              [[0, 1, 2], [0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5],
               [3, 4, 5], [4, 5, 6]]),
    # Causal stride 2: window starts k - 1 before the group's last query and
    # ends at the query itself.
    "k3_s2_causal": (dict(kernel_size=3, stride=2, is_causal=True),
                     [[0], [0, 1], [1, 2], [1, 2, 3], [3, 4], [3, 4, 5],
                      [4, 5, 6]]),
    # Stride 2 within dilation groups: group {1,3,5} has stride groups
    # {1,3} (leader 3) and {5} (leader 5, window shifted back to {3,5}).
    "k2_d2_s2": (dict(kernel_size=2, dilation=2, stride=2),
                 [[0, 2], [1, 3], [0, 2], [1, 3], [4, 6], [3, 5], [4, 6]]),
}


def _probe_neighbors(fn, n, **options):
  """Neighbor sets read off an attention fn: q = 0 gives uniform weights over
  the neighborhood and v = identity tags each key position."""
  q = jnp.zeros((1, n, 1, 4), jnp.float32)
  k = jnp.ones((1, n, 1, 4), jnp.float32)
  v = jnp.eye(n, dtype=jnp.float32).reshape(1, n, 1, n)
  out = np.asarray(fn(q, k, v, **options))[0, :, 0, :]
  return [np.flatnonzero(row > 0).tolist() for row in out]


@pytest.mark.parametrize("name", sorted(HAND_CASES))
def test_hand_checked_neighbors(name):
  options, expected = HAND_CASES[name]
  assert oracle.axis_neighbors(7, options["kernel_size"],
                               options.get("dilation", 1),
                               options.get("stride", 1),
                               options.get("is_causal", False)) == expected
  assert _probe_neighbors(al.neighborhood_attention, 7, **options) == expected


def test_hand_checked_neighbors_2d():
  """2-D neighborhoods are the product of the per-axis windows."""
  rows = HAND_CASES["k3_causal"][1]
  cols = HAND_CASES["k3_s2"][1]
  mask = oracle.neighborhood_mask((7, 7), (3, 3), 1, (1, 2), (True, False))
  for qi in (0, 10, 24, 48):
    r, c = divmod(qi, 7)
    want = sorted(a * 7 + b for a in rows[r] for b in cols[c])
    assert np.flatnonzero(mask[qi]).tolist() == want


# ----------------------------------------------------------------------------
# Library vs oracle.
# ----------------------------------------------------------------------------

# name: (spatial, options, heads, kv_heads)
CASES = {
    "1d_k3": ((7,), dict(kernel_size=3), 2, 2),
    "1d_dilation_ragged": ((11,), dict(kernel_size=3, dilation=3), 2, 1),
    "1d_causal_dilation": ((11,), dict(kernel_size=4, dilation=2,
                                       is_causal=True), 4, 2),
    "1d_stride": ((13,), dict(kernel_size=5, stride=3), 2, 2),
    "1d_stride_causal_dilation": ((13,), dict(kernel_size=4, dilation=2,
                                              stride=3, is_causal=True), 2, 2),
    "1d_even_stride": ((9,), dict(kernel_size=4, stride=2), 2, 2),
    "2d": ((9, 11), dict(kernel_size=(3, 5), dilation=(2, 1), stride=(1, 2),
                         is_causal=(False, True)), 4, 2),
    "2d_causal_blocked": ((6, 7), dict(kernel_size=(3, 2), stride=(3, 2),
                                       is_causal=True), 2, 2),
    "3d": ((5, 6, 7), dict(kernel_size=(3, 4, 2), dilation=(1, 1, 3),
                           stride=(2, 3, 1), is_causal=(False, True, False)),
           4, 1),
    "3d_causal_dilation": ((4, 5, 6), dict(kernel_size=2, dilation=(2, 1, 1),
                                           stride=(1, 2, 2), is_causal=True),
                           2, 2),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_f32(name):
  spatial, options, heads, kv_heads = CASES[name]
  q, k, v = _inputs(spatial, heads, kv_heads, v_dim=6)
  out = al.neighborhood_attention(q, k, v, **options)
  assert out.shape == (*q.shape[:-1], 6) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, _oracle(q, k, v, **options),
                             **F32_TOL)


@pytest.mark.parametrize("name", ["1d_causal_dilation", "2d", "3d"])
def test_forward_bf16(name):
  spatial, options, heads, kv_heads = CASES[name]
  q, k, v = _inputs(spatial, heads, kv_heads, dtype=jnp.bfloat16, seed=1)
  out = al.neighborhood_attention(q, k, v, **options)
  assert out.dtype == jnp.bfloat16
  want = _oracle(q, k, v, **options)
  np.testing.assert_allclose(out.astype(jnp.float32), want.astype(jnp.float32),
                             **BF16_TOL)


def _loss(fn, options, cotangent):
  def loss(q, k, v):
    return jnp.sum(fn(q, k, v, **options).astype(jnp.float32) * cotangent)
  return loss


@pytest.mark.parametrize("name", ["1d_stride_causal_dilation", "1d_even_stride",
                                  "2d", "3d"])
def test_gradients_f32(name):
  spatial, options, heads, kv_heads = CASES[name]
  q, k, v = _inputs(spatial, heads, kv_heads, seed=2)
  cot = jnp.asarray(_normal(q.shape, 3))
  got = jax.grad(_loss(al.neighborhood_attention, options, cot), (0, 1, 2))(q, k, v)
  want = jax.grad(_loss(_oracle, options, cot),
                  (0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=5e-5, rtol=5e-5)


def test_gradients_bf16():
  spatial, options, heads, kv_heads = CASES["2d"]
  q, k, v = _inputs(spatial, heads, kv_heads, dtype=jnp.bfloat16, seed=4)
  cot = jnp.asarray(_normal(q.shape, 5))
  got = jax.grad(_loss(al.neighborhood_attention, options, cot), (0, 1, 2))(q, k, v)
  want = jax.grad(_loss(_oracle, options, cot),
                  (0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(g.astype(jnp.float32), w.astype(jnp.float32),
                               atol=5e-2, rtol=5e-2)


def test_check_grads():
  q, k, v = _inputs((6,), heads=2, kv_heads=1, dim=4, v_dim=4, batch=1, seed=6)
  fn = functools.partial(al.neighborhood_attention, kernel_size=3, stride=2,
                         is_causal=True)
  check_grads(fn, (q, k, v), order=1, modes=["rev"], eps=1e-3)
  fn = functools.partial(al.neighborhood_attention, kernel_size=(2, 3),
                         dilation=(2, 1))
  q, k, v = _inputs((4, 5), heads=2, kv_heads=2, dim=4, v_dim=4, batch=1, seed=7)
  check_grads(fn, (q, k, v), order=1, modes=["rev"], eps=1e-3)


@pytest.mark.parametrize("name", ["1d_stride_causal_dilation", "2d"])
def test_large_logits_finite(name):
  spatial, options, heads, kv_heads = CASES[name]
  q, k, v = _inputs(spatial, heads, kv_heads, seed=8)
  q, k = q * 100.0, k * 100.0  # logits ~ 1e4
  out = al.neighborhood_attention(q, k, v, **options)
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_allclose(out, _oracle(q, k, v, **options),
                             atol=1e-4, rtol=1e-4)
  grads = jax.grad(lambda *a: jnp.sum(al.neighborhood_attention(*a, **options)),
                   (0, 1, 2))(q, k, v)
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()


@pytest.mark.parametrize("block", [1, 5, 7, 64])
def test_query_blocks(monkeypatch, block):
  """Block sizes that do not divide N (= 3 * 5 * 7 = 105, and 13) agree."""
  monkeypatch.setattr(nb_lib, "QUERY_BLOCK", block)
  for spatial, options in [((3, 5, 7), dict(kernel_size=(2, 3, 3),
                                            is_causal=(True, False, False))),
                           ((13,), dict(kernel_size=5, dilation=2, stride=2))]:
    q, k, v = _inputs(spatial, seed=9)
    np.testing.assert_allclose(
        al.neighborhood_attention(q, k, v, **options),
        _oracle(q, k, v, **options), **F32_TOL)


def test_scale_and_value_dim():
  q, k, v = _inputs((9,), heads=2, kv_heads=2, dim=4, v_dim=12, seed=10)
  options = dict(kernel_size=5, dilation=1, scale=0.3)
  out = al.neighborhood_attention(q, k, v, **options)
  assert out.shape == (2, 9, 2, 12)
  np.testing.assert_allclose(out, _oracle(q, k, v, **options),
                             **F32_TOL)


# ----------------------------------------------------------------------------
# Identities with jax.nn.dot_product_attention.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("spatial,stride", [((9,), 4), ((5, 6), (2, 3)),
                                            ((3, 4, 5), 1)])
def test_full_kernel_is_full_attention(spatial, stride):
  q, k, v = _inputs(spatial, heads=4, kv_heads=2, seed=11)
  out = al.neighborhood_attention(q, k, v, kernel_size=spatial, stride=stride)
  flat = lambda x: x.reshape(x.shape[0], -1, *x.shape[-2:])
  want = jax.nn.dot_product_attention(flat(q), flat(k), flat(v))
  np.testing.assert_allclose(flat(out), want, **F32_TOL)


@pytest.mark.parametrize("n,kernel", [(13, 4), (11, 11), (8, 2)])
def test_causal_1d_is_sliding_window(n, kernel):
  q, k, v = _inputs((n,), heads=4, kv_heads=2, seed=12)
  out = al.neighborhood_attention(q, k, v, kernel_size=kernel, is_causal=True)
  want = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                      local_window_size=(kernel - 1, 0))
  np.testing.assert_allclose(out, want, **F32_TOL)


# ----------------------------------------------------------------------------
# Transformations and dispatch.
# ----------------------------------------------------------------------------


def test_jit():
  spatial, options, heads, kv_heads = CASES["2d"]
  q, k, v = _inputs(spatial, heads, kv_heads, seed=13)
  fn = jax.jit(functools.partial(al.neighborhood_attention, **options))
  np.testing.assert_allclose(fn(q, k, v), _oracle(
      q, k, v, **options), **F32_TOL)


def test_vmap():
  options = dict(kernel_size=3, dilation=2, stride=2, is_causal=(True, False))
  q, k, v = _inputs((6, 7), heads=2, kv_heads=1, batch=3, seed=14)
  q, k, v = (x.reshape(3, 1, 6, 7, *x.shape[-2:]) for x in (q, k, v))
  out = jax.vmap(functools.partial(al.neighborhood_attention, **options))(q, k, v)
  for i in range(3):
    np.testing.assert_allclose(out[i], _oracle(
        q[i], k[i], v[i], **options), **F32_TOL)


def test_implementations():
  q, k, v = _inputs((7,), seed=15)
  base = al.neighborhood_attention(q, k, v, kernel_size=3)
  np.testing.assert_array_equal(
      al.neighborhood_attention(q, k, v, kernel_size=3, implementation="xla"), base)
  # The Mosaic GPU kernels take bf16/f16 only, and run on Hopper or with
  # interpret=True; implementation=None falls back to xla on its own.
  with pytest.raises(ValueError, match="implementation='mosaic_gpu'.*bfloat16"):
    al.neighborhood_attention(q, k, v, kernel_size=3, implementation="mosaic_gpu",
                              interpret=True)
  q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
  if not _dispatch.is_hopper():
    with pytest.raises(ValueError, match="on a Hopper GPU or with interpret=True"):
      al.neighborhood_attention(q16, k16, v16, kernel_size=3,
                                implementation="mosaic_gpu")
  with pytest.raises(ValueError, match="head dims up to 128"):
    al.neighborhood_attention(*(jnp.zeros((1, 7, 2, 130), jnp.bfloat16),) * 3,
                              kernel_size=3, implementation="mosaic_gpu",
                              interpret=True)
  with pytest.raises(ValueError, match="implementation"):
    al.neighborhood_attention(q, k, v, kernel_size=3, implementation="cuda")
  with pytest.raises(ValueError, match="interpret"):
    al.neighborhood_attention(q, k, v, kernel_size=3, interpret="yes")


# ----------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------


def _bad_calls():
  q, k, v = _inputs((7, 8), heads=4, kv_heads=2, as_numpy=True)
  f16 = np.float16
  good = dict(kernel_size=3)
  calls = {
      # Number of spatial axes: 0 and 4.
      "rank0": ((q[:, 0, 0], k[:, 0, 0], v[:, 0, 0]), good, "q.shape"),
      "rank4": ((q[:, None, None], k[:, None, None], v[:, None, None]), good,
                "q.shape"),
      "k_rank": ((q, k[:, 0], v), good, "k.shape"),
      "not_array": ((np.zeros(3).tolist(), k, v), good, "q"),
      # Shapes.
      "batch": ((q, k[:1], v), good, "k.shape"),
      "spatial": ((q, k[:, :6], v), good, "k.shape"),
      "v_spatial": ((q, k, v[:, :, :7]), good, "v.shape"),
      "head_dim": ((q, k[..., :4], v), good, "k.shape"),
      "kv_heads_differ": ((q, k, v[..., :1, :]), good, "v.shape"),
      "heads": ((q[..., :3, :], k, v), good, "k heads"),
      # Dtypes.
      "dtype_mismatch": ((q, k.astype(f16), v), good, "k.dtype"),
      "int_dtype": ((q.astype(np.int32), k.astype(np.int32),
                     v.astype(np.int32)), good, "q.dtype"),
      # Options.
      "kernel_1": ((q, k, v), dict(kernel_size=1), "kernel_size"),
      "kernel_0": ((q, k, v), dict(kernel_size=(3, 0)), "kernel_size"),
      "kernel_len": ((q, k, v), dict(kernel_size=(3, 3, 3)), "kernel_size"),
      "kernel_float": ((q, k, v), dict(kernel_size=3.0), "kernel_size"),
      "kernel_bool": ((q, k, v), dict(kernel_size=True), "kernel_size"),
      "kernel_too_big": ((q, k, v), dict(kernel_size=(8, 3)), "kernel_size"),
      "kernel_dilation_too_big": ((q, k, v), dict(kernel_size=3, dilation=3),
                                  "kernel_size \\* dilation"),
      "dilation_0": ((q, k, v), dict(kernel_size=3, dilation=0), "dilation"),
      "dilation_len": ((q, k, v), dict(kernel_size=3, dilation=(1,)), "dilation"),
      "stride_0": ((q, k, v), dict(kernel_size=3, stride=0), "stride"),
      "stride_gt_kernel": ((q, k, v), dict(kernel_size=(3, 2), stride=(3, 3)),
                           "stride"),
      "stride_len": ((q, k, v), dict(kernel_size=3, stride=(1, 1, 1)), "stride"),
      "causal_int": ((q, k, v), dict(kernel_size=3, is_causal=1), "is_causal"),
      "causal_len": ((q, k, v), dict(kernel_size=3, is_causal=(True,)),
                     "is_causal"),
      "scale": ((q, k, v), dict(kernel_size=3, scale="big"), "scale"),
      "scale_nan": ((q, k, v), dict(kernel_size=3, scale=float("nan")), "scale"),
  }
  # An axis of length 1 cannot hold a kernel (NATTEN's kernel_size >= 2).
  q1, k1, v1 = _inputs((1,), as_numpy=True)
  calls["length_1"] = ((q1, k1, v1), dict(kernel_size=2),
                       "kernel_size \\* dilation")
  return calls


BAD = _bad_calls()


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input(name):
  (q, k, v), options, match = BAD[name]
  with pytest.raises(ValueError, match=match):
    al.neighborhood_attention(q, k, v, **options)


# The Mosaic TPU kernel through the op (TPU interpret mode): head dims 8
# zero-padded to 64, forward and gradients against the oracle.
@pytest.mark.parametrize("name", ["1d_stride_causal_dilation", "2d"])
def test_mosaic_tpu_kernel_through_the_op(name):
  spatial, options, heads, kv_heads = CASES[name]
  q, k, v = _inputs(spatial, heads, kv_heads, batch=1, seed=6)
  cot = jnp.asarray(_normal(q.shape, 7))
  run = functools.partial(al.neighborhood_attention, implementation="mosaic_tpu",
                          interpret=True)
  np.testing.assert_allclose(run(q, k, v, **options), _oracle(q, k, v, **options),
                             atol=1e-4, rtol=1e-4)
  got = jax.grad(_loss(run, options, cot), (0, 1, 2))(q, k, v)
  want = jax.grad(_loss(_oracle, options, cot), (0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


# The Mosaic GPU kernel through the op (its interpreter): bf16 inputs, head
# dims 8 zero-padded to 64, forward and gradients against the oracle (float32
# inputs) with the 16-bit tolerance of the Mosaic GPU kernels' tests.
@pytest.mark.parametrize("name", ["1d_stride_causal_dilation", "3d_causal_dilation"])
def test_mosaic_gpu_kernel_through_the_op(name):
  spatial, options, heads, kv_heads = CASES[name]
  q, k, v = _inputs(spatial, heads, kv_heads, v_dim=6, batch=1,
                    dtype=jnp.bfloat16, seed=16)
  cot = jnp.asarray(_normal((*q.shape[:-1], 6), 17))
  run = functools.partial(al.neighborhood_attention, implementation="mosaic_gpu",
                          interpret=True)
  out = run(q, k, v, **options)
  assert out.shape == (*q.shape[:-1], 6) and out.dtype == jnp.bfloat16
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  got = (out,) + jax.grad(_loss(run, options, cot), (0, 1, 2))(q, k, v)
  want = (_oracle(*f32, **options),) + jax.grad(_loss(_oracle, options, cot),
                                                (0, 1, 2))(*f32)
  for x, y in zip(got, want):
    assert x.dtype == jnp.bfloat16
    scale = float(jnp.abs(y).max())
    np.testing.assert_allclose(np.asarray(x, np.float32) / scale,
                               np.asarray(y, np.float32) / scale, atol=2e-2)


@pytest.mark.skipif(not _dispatch.is_hopper(), reason="needs a Hopper GPU")
def test_gpu_none_picks_mosaic_gpu_for_16_bit_inputs():
  q, k, v = _inputs((12, 10), 4, 2, dim=64, v_dim=64, batch=1,
                    dtype=jnp.bfloat16, seed=18)
  pick = lambda *a: _dispatch.select("op", None, nb_lib._backends(*a, None, False))
  assert pick(q, v) is nb_lib._KERNELS["mosaic_gpu"][0]
  assert pick(q.astype(jnp.float32), v.astype(jnp.float32)) is nb_lib._xla_impl
  out = al.neighborhood_attention(q, k, v, kernel_size=5, dilation=2)
  want = _oracle(*(x.astype(jnp.float32) for x in (q, k, v)), kernel_size=5,
                 dilation=2)
  scale = float(jnp.abs(want).max())
  np.testing.assert_allclose(np.asarray(out, np.float32) / scale,
                             np.asarray(want) / scale, atol=2e-2)
