"""Tests for kernels_pallas.sigmoid_attention.tpu (forward and backward).

Numerics run in Pallas TPU interpret mode on tiny shapes (CPU) against the
dense oracle tests/oracles/sigmoid_attention.py (float32, HIGHEST precision):
the output and the gradients in q, k, v and bias of a random-weighted sum.
The tile ranges that make the kernels block sparse are checked against brute
force over the visibility mask, and NaNs planted in a key tile that no query
tile reaches prove that the kernels never touch it. Lowering runs `jax.export`
for the "tpu" platform under an abstract TPU mesh (Mosaic's own compilation
happens on a TPU only).
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.sigmoid_attention import tpu as sig
from tests.oracles import sigmoid_attention as oracle
from tests.oracles.sliding_window import allowed
from tests.tpu_export import tpu_mlir

TOLS = {jnp.float32: dict(rtol=1e-4, atol=1e-4),
        jnp.bfloat16: dict(rtol=2e-2, atol=2e-2),
        jnp.float16: dict(rtol=2e-3, atol=2e-3)}


def make_inputs(*, tq, tk=None, h=4, hkv=2, d=64, dv=64, dtype=jnp.float32,
                seed=0):
  tk = tq if tk is None else tk
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  q = jnp.asarray(normal(1, tq, h, d), dtype)
  k = jnp.asarray(normal(1, tk, hkv, d), dtype)
  v = jnp.asarray(normal(1, tk, hkv, dv), dtype)
  # Around the FlashSigmoid default -log(Tk), different per head.
  bias = jnp.asarray(-math.log(tk) + 0.5 * normal(h))
  w = jnp.asarray(normal(1, tq, h, dv))  # weights of the summed output
  return q, k, v, bias, w


def assert_close(got, want, dtype):
  """Tolerances relative to the reference's magnitude (at least 1)."""
  tol = TOLS[dtype]
  want = np.asarray(want, np.float32)
  mag = max(1.0, float(np.abs(want).max()))
  np.testing.assert_allclose(np.asarray(got, np.float32), want,
                             rtol=tol["rtol"], atol=tol["atol"] * mag)


def kernel_value_and_grads(q, k, v, bias, w, **kw):
  """(o, (dq, dk, dv, dbias)) of sum(w * o), jitted (interpret mode is slow
  eager)."""

  def loss(q, k, v, bias):
    o = sig.sigmoid_attention(q, k, v, bias, **kw)
    return jnp.sum(w * o.astype(jnp.float32)), o

  grads, o = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
      q, k, v, bias)
  return o, grads


def oracle_value_and_grads(q, k, v, bias, w, *, left, right, scale):
  def loss(q, k, v, bias):
    o = oracle.sigmoid_attention(q, k, v, bias=bias, scale=scale, left=left,
                                 right=right)
    return jnp.sum(w * o), o

  f32 = lambda x: jnp.asarray(x, jnp.float32)
  grads, o = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(
      f32(q), f32(k), f32(v), bias)
  return o, grads


NUMERIC_CASES = [
    # (tq, tk, left, right, h, hkv, d, dv, dtype, block_q, block_k)
    (45, 45, None, None, 2, 1, 64, 64, jnp.float32, 16, 16),  # dense
    (61, 61, None, 0, 4, 2, 64, 64, jnp.float32, 16, 8),  # causal, GQA
    (53, 53, 7, 3, 2, 1, 64, 128, jnp.float32, 8, 16),  # both edges, D != V
    (37, 50, None, None, 4, 1, 64, 64, jnp.float32, 16, 16),  # Tq < Tk, MQA
    (50, 21, None, None, 2, 2, 128, 64, jnp.float32, 16, 8),  # Tq > Tk
    (45, 45, 20, 0, 4, 2, 128, 64, jnp.bfloat16, 16, 16),
    (29, 40, None, None, 4, 2, 64, 128, jnp.bfloat16, 16, 16),
    (21, 21, 5, 5, 2, 1, 64, 64, jnp.float16, 8, 8),
    (5, 5, None, 0, 2, 1, 256, 64, jnp.float32, 16, 16),  # T below a block
]


@pytest.mark.parametrize(
    "tq,tk,left,right,h,hkv,d,dv,dtype,block_q,block_k", NUMERIC_CASES)
def test_interpret_matches_oracle(tq, tk, left, right, h, hkv, d, dv, dtype,
                                  block_q, block_k):
  q, k, v, bias, w = make_inputs(tq=tq, tk=tk, h=h, hkv=hkv, d=d, dv=dv,
                                 dtype=dtype)
  scale = d ** -0.5
  o, (dq, dk, dv_, db) = kernel_value_and_grads(
      q, k, v, bias, w, left=left, right=right, scale=scale, block_q=block_q,
      block_k=block_k, interpret=pltpu.InterpretParams())
  assert o.shape == (1, tq, h, dv) and o.dtype == dtype
  assert dq.shape == q.shape and dk.shape == k.shape and dv_.shape == v.shape
  assert dq.dtype == dk.dtype == dv_.dtype == dtype
  assert db.shape == (h,) and db.dtype == jnp.float32

  want_o, (want_dq, want_dk, want_dv, want_db) = oracle_value_and_grads(
      q, k, v, bias, w, left=left, right=right, scale=scale)
  assert_close(o, want_o, dtype)
  assert_close(dq, want_dq, dtype)
  assert_close(dk, want_dk, dtype)
  assert_close(dv_, want_dv, dtype)
  assert_close(db, want_db, dtype)


def test_default_blocks_and_interpret_true():
  """Default blocks (256 here: T = 130 pads to one tile); interpret=True."""
  q, k, v, bias, _ = make_inputs(tq=130, h=2, hkv=1, seed=1)
  assert sig.default_blocks(130, 130, 129, 0, jnp.float32, 64, 64) == (
      256, 256)
  o = jax.jit(lambda q, k, v, b: sig.sigmoid_attention(
      q, k, v, b, left=None, right=0, scale=0.125, interpret=True))(
          q, k, v, bias)
  want = oracle.sigmoid_attention(q, k, v, bias=bias, scale=0.125, right=0)
  assert_close(o, want, jnp.float32)


def test_default_block_sizes():
  f32, bf16 = jnp.float32, jnp.bfloat16
  assert sig.default_blocks(16384, 16384, 127, 0, bf16, 128, 128) == (128,
                                                                        128)
  assert sig.default_blocks(16384, 16384, 200, 0, bf16, 128, 128) == (256,
                                                                        256)
  assert sig.default_blocks(16384, 16384, 16383, 0, bf16, 128, 128) == (
      512, 512)
  assert sig.default_blocks(16384, 16384, 16383, 0, f32, 128, 128) == (256,
                                                                       256)
  assert sig.default_blocks(16384, 16384, 16383, 0, bf16, 256, 64) == (256,
                                                                       256)
  assert sig.default_blocks(5, 700, 4, 699, bf16, 64, 64) == (128, 512)


# ---------------------------------------------------------------------------
# Block sparsity.
# ---------------------------------------------------------------------------


def _check_band(tq, tk, left, right, br, bc):
  """Band.ranges / Band.interior against the mask, both sides."""
  band = sig.Band(tq, tk, tq - 1 if left is None else min(left, tq - 1),
                  tk - 1 if right is None else min(right, tk - 1))
  nq, nk = -(-tq // br), -(-tk // bc)
  mask = np.zeros((nq * br, nk * bc), bool)
  mask[:tq, :tk] = allowed(tq, tk, left, right, is_causal=False)
  for b, m, rb, cb in ((band, mask, br, bc),
                       (band.transposed(), mask.T, bc, br)):
    start, count = b.ranges(rb, cb)
    assert start.shape == count.shape == (m.shape[0] // rb,)
    for ri in range(m.shape[0] // rb):
      tiles = m[ri * rb:(ri + 1) * rb].reshape(rb, -1, cb)
      np.testing.assert_array_equal(
          np.arange(start[ri], start[ri] + count[ri]),
          np.flatnonzero(tiles.any(axis=(0, 2))))
      full = tiles.all(axis=(0, 2))
      for ci in range(m.shape[1] // cb):
        assert b.interior(ri, ci, rb, cb) == bool(full[ci]), (ri, ci)
        # The exact in-kernel mask of the tile.
        got = np.asarray(b.mask((rb, cb), ri * rb, ci * cb))
        np.testing.assert_array_equal(
            got, m[ri * rb:(ri + 1) * rb, ci * cb:(ci + 1) * cb])


@pytest.mark.parametrize("br,bc", [(8, 8), (16, 8), (8, 24)])
def test_band_matches_brute_force(br, bc):
  # Unbounded both sides with Tq != Tk (and Tq == Tk).
  for tq, tk in ((1, 1), (5, 30), (30, 5), (23, 47), (48, 16)):
    _check_band(tq, tk, None, None, br, bc)
  # Windows: Tq == Tk; edges on and off the tile boundaries.
  for t in (1, 23, 48, 50):
    for left in (None, 0, 3, 8, 15, 30, 60):
      for right in (None, 0, 7, 16, 31):
        _check_band(t, t, left, right, br, bc)


def test_kv_axis_is_short_for_long_sequences():
  """T = 16384, 128-token tiles: a narrow band visits 2 or 3 key tiles."""
  band = sig.Band(16384, 16384, 127, 0)
  _, count = band.ranges(128, 128)
  assert count.max() == 2 and count.min() == 1 and count.size == 128
  _, count = band.transposed().ranges(128, 128)
  assert count.max() == 2
  _, count = sig.Band(16384, 16384, 64, 63).ranges(128, 128)
  assert count.max() == 3
  _, count = sig.Band(16384, 16384, 16383, 0).ranges(512, 512)  # causal
  np.testing.assert_array_equal(count, np.arange(1, 33))


def test_unreached_tiles_are_never_touched():
  """NaN keys/values in a tile no query tile reaches leave the rest finite.

  A kernel that visited the tile (even masked: 0 * NaN) would spread NaN.
  T = 64, 16-token tiles, window (3, 0): query tiles 0..2 never reach key
  tile 3, and dk, dv of key tiles 0..1 see query tiles 0..2 only.
  """
  q, k, v, bias, w = make_inputs(tq=64, h=2, hkv=1)
  k = k.at[:, 48:].set(jnp.nan)
  v = v.at[:, 48:].set(jnp.nan)
  o, (dq, dk, dv, _) = kernel_value_and_grads(
      q, k, v, bias, w, left=3, right=0, scale=0.125, block_q=16,
      block_k=16, interpret=True)
  assert np.isfinite(np.asarray(o[:, :48])).all()
  assert np.isnan(np.asarray(o[:, 48:])).all()
  assert np.isfinite(np.asarray(dq[:, :48])).all()
  assert np.isfinite(np.asarray(dk[:, :32])).all()
  assert np.isfinite(np.asarray(dv[:, :32])).all()
  want = oracle.sigmoid_attention(q[:, :48], k[:, :48], v[:, :48], bias=bias,
                                  scale=0.125, left=3, right=0)
  assert_close(o[:, :48], want, jnp.float32)


# ---------------------------------------------------------------------------
# TPU lowering.
# ---------------------------------------------------------------------------


def _args(tq, d, dtype=jnp.bfloat16, h=4, hkv=2, dv=None, tk=None):
  s = jax.ShapeDtypeStruct
  tk = tq if tk is None else tk
  return (s((1, tq, h, d), dtype), s((1, tk, hkv, d), dtype),
          s((1, tk, hkv, d if dv is None else dv), dtype),
          s((h,), jnp.float32))


def _custom_calls(fn, args):
  """tpu_custom_call count of fn's forward and of its VJP (outputs + all
  four cotangents)."""

  def vjp(*a):
    o, pull = jax.vjp(fn, *a)
    return o, pull(o)

  return (tpu_mlir(fn, *args).count("tpu_custom_call"),
          tpu_mlir(vjp, *args).count("tpu_custom_call"))


@pytest.mark.parametrize("t,d,causal", [
    (1024, 64, False), (1024, 128, True), (4096, 64, True),
    (4096, 128, False), (16384, 64, False), (16384, 128, True)])
def test_lowers_to_mosaic(t, d, causal):
  fn = lambda q, k, v, b: sig.sigmoid_attention(
      q, k, v, b, left=None, right=0 if causal else None, scale=d ** -0.5)
  # forward; forward + dq + dkv
  assert _custom_calls(fn, _args(t, d)) == (1, 3)


def test_other_shapes_lower():
  cases = [  # (args, left, right)
      (_args(16384, 128), 511, 0),  # sliding window (512-token tiles)
      (_args(16384, 128), 100, 0),  # narrow window: the 128-token tiles
      (_args(4096, 128, dtype=jnp.float32, dv=256), 100, 31),
      (_args(1000, 256, dtype=jnp.float16, h=8, hkv=1, dv=64), None, None),
      (_args(1000, 64, tk=3000, dv=128), None, None),  # Tq != Tk
  ]
  for args, left, right in cases:
    fn = lambda q, k, v, b, left=left, right=right: sig.sigmoid_attention(
        q, k, v, b, left=left, right=right, scale=0.1)
    assert _custom_calls(fn, args) == (1, 3)


def test_grad_skips_the_forward_kernel():
  """The backward needs no forward residual, so jax.grad drops the forward."""
  loss = lambda q, k, v, b: jnp.sum(sig.sigmoid_attention(
      q, k, v, b, left=None, right=0, scale=0.125).astype(jnp.float32))
  mlir = tpu_mlir(jax.grad(loss, argnums=(0, 1, 2, 3)), *_args(4096, 128))
  assert mlir.count("tpu_custom_call") == 2


# ---------------------------------------------------------------------------
# Preconditions.
# ---------------------------------------------------------------------------


def test_supports():
  assert sig.supports(128, 128, jnp.bfloat16)
  assert sig.supports(64, 256, jnp.float32)
  assert sig.supports(256, 64, jnp.float16)
  assert not sig.supports(96, 128, jnp.bfloat16)
  assert not sig.supports(128, 32, jnp.bfloat16)
  assert not sig.supports(128, 128, jnp.int8)


def _bad_call(name):
  q, k, v, bias, _ = make_inputs(tq=24)
  kw = dict(left=3, right=0, scale=0.125)
  call = lambda **over: sig.sigmoid_attention(
      over.pop("q", q), over.pop("k", k), over.pop("v", v),
      over.pop("bias", bias), **{**kw, **over})
  z = jnp.zeros
  cases = {
      "q.shape": lambda: call(q=q[0]),
      "k.shape ": lambda: call(k=[[1.0]]),
      "q.dtype": lambda: call(q=q.astype(jnp.int32), k=k.astype(jnp.int32),
                              v=v.astype(jnp.int32)),
      "k.dtype": lambda: call(k=k.astype(jnp.bfloat16)),
      "k.shape": lambda: call(k=k[..., :32]),
      "v.shape": lambda: call(v=v[:, :, :1]),
      "(Tq)": lambda: call(q=q[:, :0], left=None, right=None),
      "(Hkv)": lambda: call(k=z((1, 24, 3, 64)), v=z((1, 24, 3, 64))),
      "(D)": lambda: call(q=z((1, 24, 4, 96)), k=z((1, 24, 2, 96))),
      "(V)": lambda: call(v=z((1, 24, 2, 32))),
      "bias": lambda: call(bias=-1.0),
      "bias.shape": lambda: call(bias=bias[:2]),
      "bias.shape ": lambda: call(bias=bias[0]),
      "bias.dtype": lambda: call(bias=jnp.zeros((4,), jnp.int32)),
      "left": lambda: call(left=-1),
      "right": lambda: call(right=2.0),
      "left ": lambda: call(left=True),
      "(left, right)": lambda: call(k=k[:, :20], v=v[:, :20]),
      "scale": lambda: call(scale=None),
      "interpret": lambda: call(interpret="yes"),
      "block_q": lambda: call(block_q=12, interpret=True),
      "block_k": lambda: call(block_k=0, interpret=True),
      "block size keyword": lambda: call(block_x=16),
      "block_q is 16": lambda: call(block_q=16),  # not interpret
  }
  return cases[name]


@pytest.mark.parametrize("name", [
    "q.shape", "k.shape ", "q.dtype", "k.dtype", "k.shape", "v.shape",
    "(Tq)", "(Hkv)", "(D)", "(V)", "bias", "bias.shape", "bias.shape ",
    "bias.dtype", "left", "right", "left ", "(left, right)", "scale",
    "interpret", "block_q", "block_k", "block size keyword",
    "block_q is 16"])
def test_bad_preconditions_raise_before_tracing(name, monkeypatch):
  def no_kernel(*args, **kwargs):
    raise AssertionError("a kernel was built before the ValueError")

  monkeypatch.setattr(sig, "_fwd_call", no_kernel)
  monkeypatch.setattr(sig, "_bwd_call", no_kernel)
  with pytest.raises(ValueError, match=(
      f"sigmoid_attention: .*{re.escape(name.strip())}")):
    _bad_call(name)()


def test_unbounded_tq_ne_tk_and_oversized_window():
  """Unbounded sides accept Tq != Tk; a window larger than T is clamped."""
  q, k, v, bias, _ = make_inputs(tq=24, tk=40, h=2, hkv=1, seed=3)
  o = sig.sigmoid_attention(q, k, v, bias, left=None, right=None, scale=0.2,
                            interpret=True, block_q=8, block_k=16)
  want = oracle.sigmoid_attention(q, k, v, bias=bias, scale=0.2)
  assert_close(o, want, jnp.float32)
  q, k, v, bias, _ = make_inputs(tq=24, h=2, hkv=1, seed=4)
  o = sig.sigmoid_attention(q, k, v, bias, left=1000, right=1000, scale=0.2,
                            interpret=True, block_q=8, block_k=8)
  want = oracle.sigmoid_attention(q, k, v, bias=bias, scale=0.2)
  assert_close(o, want, jnp.float32)
