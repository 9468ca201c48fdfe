"""Tests for kernels_pallas.local_attention.tpu_sparse (forward and backward).

Numerics run in Pallas TPU interpret mode on tiny grids (CPU) against the
dense naive oracle tests/oracles/neighborhood.py, forward and gradients (dq,
dk, dv of a random-weighted sum), over 1-D, 2-D and 3-D neighborhoods with
odd/even kernels, dilation, stride, causal axes and GQA. A NaN planted in
every key row that no query of a tile may see proves that the kernels never
read unvisited tiles into the result. Lowering runs `jax.export` for the
"tpu" platform under an abstract TPU mesh at the target shapes (Mosaic's own
compilation happens on a TPU only).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.local_attention import plan as plan_lib
from kernels_pallas.local_attention import tpu_sparse as na
from tests.oracles import neighborhood as oracle
from tests.tpu_export import tpu_mlir

TOLS = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}


def make_inputs(spatial, *, h, hkv, d, dv, dtype, seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  q = jnp.asarray(normal(1, *spatial, h, d), dtype)
  k = jnp.asarray(normal(1, *spatial, hkv, d), dtype)
  v = jnp.asarray(normal(1, *spatial, hkv, dv), dtype)
  w = jnp.asarray(normal(1, *spatial, h, dv))  # weights of the summed output
  return q, k, v, w


def assert_close(got, want, dtype):
  """Tolerance relative to the reference's magnitude (at least 1)."""
  tol = TOLS[dtype]
  want = np.asarray(want, np.float32)
  mag = max(1.0, float(np.abs(want).max()))
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=tol,
                             atol=tol * mag)


def kernel_value_and_grads(q, k, v, w, **kw):
  def loss(q, k, v):
    o = na.neighborhood_attention(q, k, v, **kw)
    return jnp.sum(w * o.astype(jnp.float32)), o

  grads, o = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return o, grads


def oracle_value_and_grads(q, k, v, w, **kw):
  def loss(q, k, v):
    o = oracle.neighborhood_attention(q, k, v, **kw)
    return jnp.sum(w * o), o

  f32 = lambda x: jnp.asarray(x, jnp.float32)
  grads, o = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(
      f32(q), f32(k), f32(v))
  return o, grads


NUMERIC_CASES = [
    # (spatial, kernel, dilation, stride, causal, tile, h, hkv, d, dv, dtype)
    # 1-D: dilation 3 (groups 8, 8, 7), even kernel, stride 2.
    ((23,), (4,), (3,), (2,), (False,), (8,), 2, 1, 64, 64, jnp.float32),
    # 1-D: kernel 17 > tile (interior pairs), dilation 2 (groups 25, 24).
    ((49,), (17,), (2,), (3,), (False,), (8,), 1, 1, 64, 64, jnp.float32),
    # 2-D: kernel 3 x 4, dilation 2 on axis 0, causal + stride 2 on axis 1,
    # GQA (2 query heads, 1 kv head).
    ((10, 12), (3, 4), (2, 1), (1, 2), (False, True), (4, 4), 2, 1, 64, 64,
     jnp.float32),
    # 2-D bfloat16: kernel 4 x 3, stride 2 causal axis, dilation 2, D != V.
    ((10, 12), (4, 3), (1, 2), (2, 1), (True, False), (2, 8), 2, 2, 128, 64,
     jnp.bfloat16),
    # 3-D: 4 x 6 x 6, kernel 3.
    ((4, 6, 6), (3, 3, 3), (1, 1, 1), (1, 1, 1), (False, False, False),
     (2, 2, 4), 1, 1, 64, 64, jnp.float32),
]


def test_cases_cover_interior_and_edge_pairs():
  """The numeric cases run both kernel paths (masked and mask-free)."""
  flags = np.concatenate([
      plan_lib.neighborhood_plan(*case[:6]).kv_interior.reshape(-1)
      for case in NUMERIC_CASES])
  assert flags.any() and not flags.all()


@pytest.mark.parametrize(
    "spatial,kernel,dilation,stride,causal,tile,h,hkv,d,dv,dtype",
    NUMERIC_CASES)
def test_interpret_matches_oracle(spatial, kernel, dilation, stride, causal,
                                  tile, h, hkv, d, dv, dtype):
  q, k, v, w = make_inputs(spatial, h=h, hkv=hkv, d=d, dv=dv, dtype=dtype)
  opts = dict(kernel_size=kernel, dilation=dilation, stride=stride,
              is_causal=causal, scale=d ** -0.5)
  o, (dq, dk, dv_) = kernel_value_and_grads(
      q, k, v, w, interpret=pltpu.InterpretParams(), tile_shape=tile, **opts)
  assert o.shape == (1, *spatial, h, dv) and o.dtype == dtype
  assert dq.shape == q.shape and dk.shape == k.shape and dv_.shape == v.shape
  assert dq.dtype == dk.dtype == dv_.dtype == dtype

  want_o, (want_dq, want_dk, want_dv) = oracle_value_and_grads(q, k, v, w,
                                                               **opts)
  assert_close(o, want_o, dtype)
  assert_close(dq, want_dq, dtype)
  assert_close(dk, want_dk, dtype)
  assert_close(dv_, want_dv, dtype)


def test_float16_default_tile_and_interpret_true():
  """float16 (upcast inside), the default 128-token tile, interpret=True."""
  q, k, v, _ = make_inputs((40,), h=2, hkv=1, d=64, dv=64,
                           dtype=jnp.float16)
  opts = dict(kernel_size=(5,), dilation=(2,), stride=(1,), is_causal=(True,),
              scale=0.125)
  o = na.neighborhood_attention(q, k, v, interpret=True, **opts)
  assert o.dtype == jnp.float16 and o.shape == (1, 40, 2, 64)
  want = oracle.neighborhood_attention(*(x.astype(jnp.float32)
                                         for x in (q, k, v)), **opts)
  np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(want),
                             rtol=2e-3, atol=2e-3 * float(jnp.abs(want).max()))


def test_unvisited_tiles_are_never_read():
  """A NaN in every key/value row outside a query tile's visited key tiles
  leaves that tile's outputs finite (and the mask hides the rest)."""
  spatial, kernel, tile = (8, 16), (3, 3), (2, 8)
  p = plan_lib.neighborhood_plan(spatial, kernel, 1, 1, False, tile)
  qt = 5  # a query tile in the middle
  seen_rows = np.concatenate([np.arange(t * 16, t * 16 + 16)
                              for t in p.kv_tiles[qt, :p.kv_count[qt]]])
  poison = np.ones(p.n_rows, bool)
  poison[seen_rows] = False
  tokens = p.perm[poison & (p.perm >= 0)]
  assert tokens.size > 0
  q, k, v, _ = make_inputs(spatial, h=2, hkv=1, d=64, dv=64,
                           dtype=jnp.float32)
  flat = lambda x: x.reshape(-1, *x.shape[-2:])
  k = flat(k).at[tokens].set(jnp.nan).reshape(k.shape)
  v = flat(v).at[tokens].set(jnp.nan).reshape(v.shape)
  o = na.neighborhood_attention(q, k, v, kernel_size=kernel, dilation=(1, 1),
                                stride=(1, 1), is_causal=(False, False),
                                scale=0.125, interpret=True, tile_shape=tile)
  mine = p.perm[qt * 16:(qt + 1) * 16]
  mine = mine[mine >= 0]
  assert np.isfinite(np.asarray(flat(o)[mine])).all()
  assert np.isnan(np.asarray(flat(o))).any()  # the poison is reachable


# ---------------------------------------------------------------------------
# TPU lowering at the target shapes (B=1, H=4, D=128, bfloat16).
# ---------------------------------------------------------------------------


def _args(spatial, dtype=jnp.bfloat16, h=4, d=128):
  s = jax.ShapeDtypeStruct
  return (s((1, *spatial, h, d), dtype), s((1, *spatial, h, d), dtype),
          s((1, *spatial, h, d), dtype))


def _fn(spatial, kernel):
  r = len(spatial)
  return lambda q, k, v: na.neighborhood_attention(
      q, k, v, kernel_size=(kernel,) * r, dilation=(1,) * r,
      stride=(1,) * r, is_causal=(False,) * r, scale=128 ** -0.5)


@pytest.mark.parametrize("spatial,kernel", [
    ((64, 64), 7), ((64, 64), 13), ((64, 64), 31), ((128, 128), 7),
    ((128, 128), 13), ((128, 128), 31), ((16, 32, 32), 7)])
def test_forward_lowers_to_mosaic(spatial, kernel):
  mlir = tpu_mlir(_fn(spatial, kernel), *_args(spatial))
  assert mlir.count("tpu_custom_call") == 1


def test_grad_lowers_to_mosaic():
  fwd = _fn((128, 128), 13)
  loss = lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32))
  mlir = tpu_mlir(jax.grad(loss, argnums=(0, 1, 2)), *_args((128, 128)))
  assert mlir.count("tpu_custom_call") == 3  # forward, dq, dk/dv


def test_other_options_lower():
  """f32, GQA, dilation, causal + stride, 1-D and a 3-D gradient."""
  s = jax.ShapeDtypeStruct
  q, k = s((2, 48, 40, 4, 64), jnp.float32), s((2, 48, 40, 2, 64), jnp.float32)
  v = s((2, 48, 40, 2, 256), jnp.float32)
  loss = lambda q, k, v: jnp.sum(na.neighborhood_attention(
      q, k, v, kernel_size=(6, 5), dilation=(2, 3), stride=(3, 1),
      is_causal=(True, False), scale=0.1))
  assert tpu_mlir(jax.grad(loss, argnums=(0, 1, 2)), q, k, v).count(
      "tpu_custom_call") == 3
  f = _fn((1000,), 65)
  assert tpu_mlir(f, *_args((1000,))).count("tpu_custom_call") == 1
  loss3 = lambda q, k, v: jnp.sum(_fn((8, 16, 16), 5)(q, k, v).astype(
      jnp.float32))
  assert tpu_mlir(jax.grad(loss3, argnums=(0, 1, 2)),
                  *_args((8, 16, 16))).count("tpu_custom_call") == 3


# ---------------------------------------------------------------------------
# Preconditions.
# ---------------------------------------------------------------------------


def test_supports():
  assert na.supports(128, 128, jnp.bfloat16)
  assert na.supports(64, 256, jnp.float32)
  assert not na.supports(96, 128, jnp.bfloat16)
  assert not na.supports(128, 32, jnp.bfloat16)
  assert not na.supports(128, 128, jnp.int8)


def _bad_call(name):
  q, k, v, _ = make_inputs((8, 8), h=4, hkv=2, d=64, dv=64,
                           dtype=jnp.float32)
  kw = dict(kernel_size=(3, 3), dilation=(1, 1), stride=(1, 1),
            is_causal=(False, False), scale=0.125)
  call = lambda **over: na.neighborhood_attention(
      over.pop("q", q), over.pop("k", k), over.pop("v", v), **{**kw, **over})
  z = jnp.zeros
  cases = {
      "q.shape": lambda: call(q=q[0, 0]),
      "q.dtype": lambda: call(q=q.astype(jnp.int32), k=k.astype(jnp.int32),
                              v=v.astype(jnp.int32)),
      "k.dtype": lambda: call(k=k.astype(jnp.bfloat16)),
      "k.shape": lambda: call(k=k[:, :6]),
      "v.shape": lambda: call(v=v[:, :, :, :1]),
      "(Hkv)": lambda: call(k=z((1, 8, 8, 3, 64)), v=z((1, 8, 8, 3, 64))),
      "(D)": lambda: call(q=z((1, 8, 8, 4, 96)), k=z((1, 8, 8, 2, 96)),
                          v=z((1, 8, 8, 2, 96))),
      "(V)": lambda: call(v=z((1, 8, 8, 2, 32))),
      "kernel_size": lambda: call(kernel_size=3),
      "dilation": lambda: call(dilation=(1, 1, 1)),
      "stride": lambda: call(stride=(1, 1.0)),
      "is_causal": lambda: call(is_causal=(0, 1)),
      "[axis 1]": lambda: call(kernel_size=(3, 5), dilation=(1, 2)),
      "scale": lambda: call(scale=None),
      "tile_shape": lambda: call(tile_shape=(0, 8)),
      "tile_shape volume": lambda: call(tile_shape=(2, 8)),  # not interpret
  }
  return cases[name]


@pytest.mark.parametrize("name", [
    "q.shape", "q.dtype", "k.dtype", "k.shape", "v.shape", "(Hkv)", "(D)",
    "(V)", "kernel_size", "dilation", "stride", "is_causal", "[axis 1]",
    "scale", "tile_shape", "tile_shape volume"])
def test_bad_preconditions_raise_before_tracing(name, monkeypatch):
  def no_kernel(*args, **kwargs):
    raise AssertionError("a kernel was built before the ValueError")

  monkeypatch.setattr(na, "_fwd_call", no_kernel)
  monkeypatch.setattr(na, "_bwd_call", no_kernel)
  with pytest.raises(ValueError, match=(
      f"neighborhood_attention: .*{re.escape(name.strip())}")):
    _bad_call(name)()
