"""Tests for kernels_pallas.local_attention.tpu (forward and backward).

Numerics run in Pallas TPU interpret mode on tiny shapes (CPU) against the
dense oracle tests/oracles/sliding_window.py, forward and gradients (dq, dk,
dv of a random-weighted sum). The tile ranges that make the kernels block
sparse are checked against brute force over the band mask, and a NaN planted
in a tile that no query of a tile may reach proves that the kernels never
touch it. Lowering runs `jax.export` for the "tpu" platform under an abstract
TPU mesh (Mosaic's own compilation happens on a TPU only).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.local_attention import tpu as swa
from tests.oracles import sliding_window as oracle
from tests.tpu_export import tpu_mlir

TOLS = {jnp.float32: dict(rtol=1e-4, atol=1e-4),
        jnp.bfloat16: dict(rtol=2e-2, atol=2e-2),
        jnp.float16: dict(rtol=2e-3, atol=2e-3)}


def make_inputs(*, t, h=4, hkv=2, d=64, dv=64, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  q = jnp.asarray(normal(1, t, h, d), dtype)
  k = jnp.asarray(normal(1, t, hkv, d), dtype)
  v = jnp.asarray(normal(1, t, hkv, dv), dtype)
  w = jnp.asarray(normal(1, t, h, dv))  # weights of the summed output
  return q, k, v, w


def assert_close(got, want, dtype):
  """Tolerances relative to the reference's magnitude (at least 1)."""
  tol = TOLS[dtype]
  want = np.asarray(want, np.float32)
  mag = max(1.0, float(np.abs(want).max()))
  np.testing.assert_allclose(np.asarray(got, np.float32), want,
                             rtol=tol["rtol"], atol=tol["atol"] * mag)


def kernel_value_and_grads(q, k, v, w, *, left, right, scale, **kw):
  """(o, (dq, dk, dv)) of sum(w * o), jitted (interpret mode is slow eager)."""

  def loss(q, k, v):
    o = swa.sliding_window_attention(q, k, v, left=left, right=right,
                                     scale=scale, **kw)
    return jnp.sum(w * o.astype(jnp.float32)), o

  grads, o = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return o, grads


def oracle_value_and_grads(q, k, v, w, *, left, right, scale):
  def loss(q, k, v):
    o = oracle.sliding_window_attention(q, k, v, left=left, right=right,
                                        scale=scale)
    return jnp.sum(w * o), o

  f32 = lambda x: jnp.asarray(x, jnp.float32)
  grads, o = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(
      f32(q), f32(k), f32(v))
  return o, grads


NUMERIC_CASES = [
    # (t, left, right, h, hkv, d, dv, dtype, block_q, block_k)
    (45, 0, 0, 2, 1, 64, 64, jnp.float32, 16, 16),  # only the diagonal
    (61, 31, 0, 4, 2, 64, 64, jnp.float32, 16, 16),  # causal, > a block
    (53, 2, 50, 4, 2, 64, 64, jnp.float32, 16, 8),  # asymmetric, bq != bk
    (40, 39, 39, 2, 2, 64, 64, jnp.float32, 16, 16),  # full (T-1, T-1), MHA
    (37, 7, 3, 2, 1, 128, 64, jnp.float32, 8, 16),  # D != V
    (45, 20, 0, 4, 2, 64, 64, jnp.bfloat16, 16, 16),
    (53, 50, 2, 2, 1, 64, 128, jnp.bfloat16, 16, 16),
    (21, 5, 5, 2, 1, 64, 64, jnp.float16, 8, 8),
    (5, 3, 0, 2, 1, 64, 64, jnp.float32, 16, 16),  # T below one block
]


@pytest.mark.parametrize("t,left,right,h,hkv,d,dv,dtype,block_q,block_k",
                         NUMERIC_CASES)
def test_interpret_matches_oracle(t, left, right, h, hkv, d, dv, dtype,
                                  block_q, block_k):
  q, k, v, w = make_inputs(t=t, h=h, hkv=hkv, d=d, dv=dv, dtype=dtype)
  scale = d ** -0.5
  o, (dq, dk, dv_) = kernel_value_and_grads(
      q, k, v, w, left=left, right=right, scale=scale, block_q=block_q,
      block_k=block_k, interpret=pltpu.InterpretParams())
  assert o.shape == (1, t, h, dv) and o.dtype == dtype
  assert dq.shape == q.shape and dk.shape == k.shape and dv_.shape == v.shape
  assert dq.dtype == dk.dtype == dv_.dtype == dtype

  want_o, (want_dq, want_dk, want_dv) = oracle_value_and_grads(
      q, k, v, w, left=left, right=right, scale=scale)
  assert_close(o, want_o, dtype)
  assert_close(dq, want_dq, dtype)
  assert_close(dk, want_dk, dtype)
  assert_close(dv_, want_dv, dtype)


def test_default_blocks_and_interpret_true():
  """Default 128-token blocks, T = 1 and T just over a block; interpret=True."""
  for t, left in ((1, 0), (130, 127)):
    q, k, v, w = make_inputs(t=t, h=2, hkv=1, seed=t)
    o = jax.jit(lambda q, k, v, left=left: swa.sliding_window_attention(
        q, k, v, left=left, right=0, scale=0.125, interpret=True))(q, k, v)
    want = oracle.sliding_window_attention(q, k, v, left=left, right=0,
                                           scale=0.125)
    assert_close(o, want, jnp.float32)


# ---------------------------------------------------------------------------
# Block sparsity.
# ---------------------------------------------------------------------------


def _padded_mask(t, tp, left, right):
  """[tp, tp] bool band mask over the padded length (padded rows/cols off)."""
  mask = np.zeros((tp, tp), bool)
  mask[:t, :t] = oracle.allowed(t, t, left, right, is_causal=False)
  return mask


def _check_ranges(t, left, right, br, bc):
  """block_ranges / tile_is_interior against the band mask, both sides."""
  tp = swa.padded_length(t, br, bc)
  assert tp % br == 0 and tp % bc == 0 and t <= tp
  mask = _padded_mask(t, tp, left, right)
  start, count = swa.block_ranges(t, left, right, br, bc)
  assert start.shape == count.shape == (tp // br,)
  n_interior = 0
  for ri in range(tp // br):
    tiles = mask[ri * br:(ri + 1) * br].reshape(br, tp // bc, bc)
    needed = np.flatnonzero(tiles.any(axis=(0, 2)))
    got = np.arange(start[ri], start[ri] + count[ri])
    if ri * br < t:
      np.testing.assert_array_equal(got, needed)
    else:  # no real row: a non-empty in-bounds range, its rows all masked
      assert count[ri] >= 1 and 0 <= start[ri] and got[-1] < tp // bc
    full = tiles.all(axis=(0, 2))
    for ci in range(tp // bc):
      interior = swa.tile_is_interior(ri, ci, t=t, left=left, right=right,
                                      block_rows=br, block_cols=bc)
      assert interior == bool(full[ci]), (ri, ci)
      n_interior += interior
  # The keys' side is the same function with the band transposed.
  start_t, count_t = swa.block_ranges(t, right, left, bc, br)
  for ci in range(tp // bc):
    if ci * bc < t:
      cols = mask[:, ci * bc:(ci + 1) * bc].reshape(tp // br, br, bc)
      needed = np.flatnonzero(cols.any(axis=(1, 2)))
      np.testing.assert_array_equal(
          np.arange(start_t[ci], start_t[ci] + count_t[ci]), needed)
  return n_interior


@pytest.mark.parametrize("br,bc", [(8, 8), (16, 8), (8, 24), (24, 16)])
def test_block_ranges_match_brute_force(br, bc):
  """Every window edge offset: one side swept 0..33, the other from a set."""
  n_interior = 0
  # T + 1 or T a multiple of the blocks: a tile ends on the first padded row,
  # or the sequence ends on a tile edge.
  for t in (1, 23, 47, 48, 50):
    sweep = range(min(34, t))
    others = [x for x in (0, 3, 8, 15, 30) if x < t]
    windows = ({(a, b) for a in sweep for b in others}
               | {(b, a) for a in sweep for b in others})
    for left, right in sorted(windows):
      n_interior += _check_ranges(t, left, right, br, bc)
  assert n_interior > 0  # wide windows do have unmasked tiles


def test_kv_axis_is_short_for_long_sequences():
  """T = 16384, 128-token tiles: 2 or 3 key tiles per query tile, not 128."""
  t = 16384
  _, count = swa.block_ranges(t, 127, 0, 128, 128)  # causal window of 128
  assert count.max() == 2 and count.min() == 1 and count.size == 128
  _, count = swa.block_ranges(t, 64, 63, 128, 128)  # centred window of 128
  assert count.max() == 3
  _, count = swa.block_ranges(t, 0, 127, 128, 128)  # keys' side of (127, 0)
  assert count.max() == 2
  _, count = swa.block_ranges(t, 4095, 0, 128, 128)
  assert count.max() == 33


def test_unreached_tiles_are_never_touched():
  """NaN keys/values in a tile no query of a tile reaches leave it finite.

  A kernel that visited the tile (even masked) would compute 0 * NaN there.
  T = 64, 16-token tiles, causal window 3: query tiles 0..2 never reach key
  tile 3, and no query of tile 3 reaches key tile 0 (dk, dv of tile 0 only
  see query tiles 0 and 1).
  """
  t, blk = 64, 16
  q, k, v, w = make_inputs(t=t, h=2, hkv=1)
  k = k.at[:, 48:].set(jnp.nan)
  v = v.at[:, 48:].set(jnp.nan)
  o, (dq, dk, dv) = kernel_value_and_grads(
      q, k, v, w, left=3, right=0, scale=0.125, block_q=blk, block_k=blk,
      interpret=True)
  assert np.isfinite(np.asarray(o[:, :48])).all()
  assert np.isnan(np.asarray(o[:, 48:])).all()
  assert np.isfinite(np.asarray(dq[:, :48])).all()
  # dk/dv of key tiles 0..1 come from query tiles 0..2 only.
  assert np.isfinite(np.asarray(dk[:, :32])).all()
  assert np.isfinite(np.asarray(dv[:, :32])).all()
  want, _ = oracle_value_and_grads(q[:, :48], k[:, :48], v[:, :48],
                                   w[:, :48], left=3, right=0, scale=0.125)
  assert_close(o[:, :48], want, jnp.float32)


# ---------------------------------------------------------------------------
# TPU lowering.
# ---------------------------------------------------------------------------

T_LONG = 16384


def _long_args(dtype=jnp.bfloat16, h=4, hkv=2, d=128):
  s = jax.ShapeDtypeStruct
  return (s((1, T_LONG, h, d), dtype), s((1, T_LONG, hkv, d), dtype),
          s((1, T_LONG, hkv, d), dtype))


@pytest.mark.parametrize("left", [127, 511, 2047, 4095])
def test_forward_lowers_to_mosaic(left):
  fwd = lambda q, k, v: swa.sliding_window_attention(
      q, k, v, left=left, right=0, scale=128 ** -0.5)
  assert tpu_mlir(fwd, *_long_args()).count("tpu_custom_call") == 1


@pytest.mark.parametrize("left", [127, 2047])
def test_grad_lowers_to_mosaic(left):
  def loss(q, k, v):
    o = swa.sliding_window_attention(q, k, v, left=left, right=0,
                                     scale=128 ** -0.5)
    return jnp.sum(o.astype(jnp.float32))

  mlir = tpu_mlir(jax.grad(loss, argnums=(0, 1, 2)), *_long_args())
  assert mlir.count("tpu_custom_call") == 3  # forward, dq, dk/dv


def test_other_dims_and_dtypes_lower():
  s = jax.ShapeDtypeStruct
  for d, dv, dtype in ((64, 256, jnp.float32), (256, 64, jnp.float16)):
    args = (s((2, 1000, 2, d), dtype), s((2, 1000, 1, d), dtype),
            s((2, 1000, 1, dv), dtype))
    loss = lambda q, k, v: jnp.sum(swa.sliding_window_attention(
        q, k, v, left=100, right=31, scale=0.1).astype(jnp.float32))
    mlir = tpu_mlir(jax.grad(loss, argnums=(0, 1, 2)), *args)
    assert mlir.count("tpu_custom_call") == 3


# ---------------------------------------------------------------------------
# Preconditions.
# ---------------------------------------------------------------------------


def test_supports():
  assert swa.supports(128, 128, jnp.bfloat16)
  assert swa.supports(64, 256, jnp.float32)
  assert swa.supports(256, 64, jnp.float16)
  assert not swa.supports(96, 128, jnp.bfloat16)
  assert not swa.supports(128, 32, jnp.bfloat16)
  assert not swa.supports(128, 128, jnp.int8)


def _bad_call(name):
  q, k, v, _ = make_inputs(t=24)
  kw = dict(left=3, right=0, scale=0.125)
  call = lambda **over: swa.sliding_window_attention(
      over.pop("q", q), over.pop("k", k), over.pop("v", v), **{**kw, **over})
  cases = {
      "q.shape": lambda: call(q=q[0]),
      "q.dtype": lambda: call(q=q.astype(jnp.int32), k=k.astype(jnp.int32),
                              v=v.astype(jnp.int32)),
      "k.dtype": lambda: call(k=k.astype(jnp.bfloat16)),
      "k.shape": lambda: call(k=k[:, :20]),
      "v.shape": lambda: call(v=v[:, :, :1]),
      "(Hkv)": lambda: call(k=jnp.zeros((1, 24, 3, 64)),
                            v=jnp.zeros((1, 24, 3, 64))),
      "(D)": lambda: call(q=jnp.zeros((1, 24, 4, 96)),
                          k=jnp.zeros((1, 24, 2, 96))),
      "(V)": lambda: call(v=jnp.zeros((1, 24, 2, 32))),
      "left": lambda: call(left=-1),
      "right": lambda: call(right=2.0),
      "left ": lambda: call(left=True),
      "scale": lambda: call(scale=None),
      "block_q": lambda: call(block_q=12),
      "block_k": lambda: call(block_k=0),
      "block size keyword": lambda: call(block_x=16),
      "block_q is 16": lambda: call(block_q=16, block_k=8),  # not interpret
  }
  return cases[name]


@pytest.mark.parametrize("name", [
    "q.shape", "q.dtype", "k.dtype", "k.shape", "v.shape", "(Hkv)", "(D)",
    "(V)", "left", "right", "left ", "scale", "block_q", "block_k",
    "block size keyword", "block_q is 16"])
def test_bad_preconditions_raise_before_tracing(name, monkeypatch):
  def no_kernel(*args, **kwargs):
    raise AssertionError("a kernel was built before the ValueError")

  monkeypatch.setattr(swa, "_fwd_call", no_kernel)
  monkeypatch.setattr(swa, "_bwd_call", no_kernel)
  with pytest.raises(ValueError, match=(
      f"sliding_window_attention: .*{re.escape(name.strip())}")):
    _bad_call(name)()
