"""Tests of the Mosaic GPU (Hopper) sigmoid-attention kernels, forward and
backward (kernels_pallas/sigmoid_attention/mosaic_gpu.py).

Tiers:
  * the tile ranges against brute force over the visibility mask (Python);
  * numerics under Mosaic GPU interpret mode on small shapes (CPU): output
    and dq, dk, dv, dbias against the dense oracle
    tests/oracles/sigmoid_attention.py (float32 math on the 16-bit inputs;
    gradients: jax.grad of a random-weighted sum of the output);
  * lowering for "cuda" via jax.export (CPU, no GPU needed);
  * the compiled kernels on a real GPU (skipped unless the backend is "gpu").
The kernels take bfloat16/float16 only, so numerics use 16-bit inputs and
the 16-bit tolerance 2e-2 relative to the reference's max, as the softmax
kernels' tests do.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import mosaic_gpu_common as common
from kernels_pallas.sigmoid_attention import mosaic_gpu as sig_gpu
from tests.oracles.sigmoid_attention import sigmoid_attention as oracle

_ON_GPU = jax.default_backend() == "gpu"
gpu_only = pytest.mark.skipif(not _ON_GPU, reason="needs a Hopper GPU")
_TOL = 2e-2


def _inputs(tq, tk, h, hkv, d, dv, dtype, seed=0, b=1):
  keys = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(keys[0], (b, tq, h, d), jnp.float32).astype(dtype)
  k = jax.random.normal(keys[1], (b, tk, hkv, d), jnp.float32).astype(dtype)
  v = jax.random.normal(keys[2], (b, tk, hkv, dv), jnp.float32).astype(dtype)
  w = jax.random.normal(keys[3], (b, tq, h, dv), jnp.float32)
  bias = jax.random.normal(keys[4], (h,), jnp.float32) - 2.0
  return q, k, v, w, bias


def _check_close(x, ref, what):
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  assert x.shape == ref.shape, (what, x.shape, ref.shape)
  assert np.all(np.isfinite(x)), what
  err = float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-6))
  assert err < _TOL, (what, err)


def _grads(fn, q, k, v, bias, w):
  loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * w)
  return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)


@pytest.mark.parametrize("tq,tk,left,right", [
    (200, 200, None, None), (200, 200, 70, 0), (130, 130, 5, 90),
    (70, 300, None, None), (300, 70, None, None), (1, 1, None, 0)])
def test_tile_ranges_match_mask(tq, tk, left, right):
  kw = dict(t_src=tq, t_dst=tk, back=left, ahead=right)
  i = np.arange(tq)[:, None]
  j = np.arange(tk)[None, :]
  mask = np.ones((tq, tk), bool)
  if left is not None:
    mask &= j >= i - left
  if right is not None:
    mask &= j <= i + right
  for tile in range(-(-tq // 64)):
    seen = np.flatnonzero(mask[tile * 64:(tile + 1) * 64].any(axis=0)) // 64
    start, end = sig_gpu._range(tile, **kw)
    assert (start, end) == (seen.min(), seen.max() + 1), tile
  kw_t = dict(t_src=tk, t_dst=tq, back=right, ahead=left)
  for tile in range(-(-tk // 64)):
    rows = np.flatnonzero(mask[:, tile * 64:(tile + 1) * 64].any(axis=1))
    if rows.size:
      assert sig_gpu._range(tile, **kw_t) == (rows.min() // 64,
                                              rows.max() // 64 + 1), tile


# (Tq, Tk, H, Hkv, D, V, dtype, left, right): full, causal, a two-sided
# window with interior and edge tiles, cross attention (Tq != Tk, both ways),
# MHA and GQA, D != V, float16, lengths not a multiple of 64 (and one below).
_CASES = [
    (150, 150, 4, 2, 64, 64, jnp.bfloat16, None, None),
    (200, 200, 4, 1, 64, 64, jnp.bfloat16, None, 0),
    (200, 200, 2, 2, 64, 64, jnp.bfloat16, 40, 13),
    (100, 230, 2, 2, 64, 128, jnp.bfloat16, None, None),
    (190, 60, 4, 2, 128, 64, jnp.float16, None, None),
    (5, 5, 2, 1, 64, 64, jnp.bfloat16, None, 0),
]


@pytest.mark.parametrize("tq,tk,h,hkv,d,dv,dtype,left,right", _CASES)
def test_interpret_matches_oracle(tq, tk, h, hkv, d, dv, dtype, left, right):
  q, k, v, w, bias = _inputs(tq, tk, h, hkv, d, dv, dtype)
  fn = lambda q, k, v, b: sig_gpu.sigmoid_attention(
      q, k, v, b, left=left, right=right, scale=0.2, interpret=True)
  ref = lambda q, k, v, b: oracle(q, k, v, bias=b, scale=0.2, left=left,
                                  right=right)
  o = fn(q, k, v, bias)
  assert o.shape == (1, tq, h, dv) and o.dtype == dtype
  _check_close(o, ref(q, k, v, bias), "o")
  for name, g, g_ref in zip(("dq", "dk", "dv", "dbias"),
                            _grads(fn, q, k, v, bias, w),
                            _grads(ref, q, k, v, bias, w)):
    _check_close(g, g_ref, name)


@pytest.mark.parametrize("tq,tk,h,hkv,d,dv,dtype,left,right",
                         [_CASES[i] for i in (0, 1, 2, 5)])
def test_interpret_without_pingpong_matches_oracle(tq, tk, h, hkv, d, dv,
                                                   dtype, left, right):
  # The forward with its default ping-pong (two warpgroups taking turns, a
  # barrier twice a step, skipped steps included) is what the other oracle
  # tests run; here it is off: full, causal, a two-sided window, one tile.
  q, k, v, w, bias = _inputs(tq, tk, h, hkv, d, dv, dtype)
  fn = lambda q, k, v, b: sig_gpu.sigmoid_attention(
      q, k, v, b, left=left, right=right, scale=0.2, interpret=True,
      pingpong=False)
  ref = lambda q, k, v, b: oracle(q, k, v, bias=b, scale=0.2, left=left,
                                  right=right)
  _check_close(fn(q, k, v, bias), ref(q, k, v, bias), "o")
  for name, g, g_ref in zip(("dq", "dk", "dv", "dbias"),
                            _grads(fn, q, k, v, bias, w),
                            _grads(ref, q, k, v, bias, w)):
    _check_close(g, g_ref, name)


def test_interpret_launch_order_changes_nothing(monkeypatch):
  # common.tile_grid launches a (batch, head)'s tiles together (the tile
  # axis last in the grid); with the old order (batch fastest) the three
  # kernels must give the same bits: no kernel may depend on which grid
  # axis comes first. Batch 2, GQA, causal.
  q, k, v, w, bias = _inputs(150, 150, 4, 2, 64, 64, jnp.bfloat16, b=2)
  fn = lambda q, k, v, b: sig_gpu.sigmoid_attention(
      q, k, v, b, left=None, right=0, scale=0.2, interpret=True)
  def run():
    return [np.asarray(x, np.float32) for x in
            (fn(q, k, v, bias), *_grads(fn, q, k, v, bias, w))]
  tiles_fastest = run()
  monkeypatch.setattr(common, "TILES_FASTEST", False)
  batch_fastest = run()
  for name, a, b in zip(("o", "dq", "dk", "dv", "dbias"), tiles_fastest,
                        batch_fastest):
    np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize("pingpong", [False, True])
def test_interpret_skipped_tiles_are_never_used(pingpong):
  # Causal, window 10, T = 512: keys 128..255 (the forward's key tile 1 of
  # 128, the 64-row tiles 2 and 3 of the backward) are NaN. Queries 0..63
  # and 384..511 never see them; their rows must stay finite and exact, so
  # no skipped step and no other tile's step did math with them (0 * NaN).
  t, left = 512, 10
  q, k, v, _, bias = _inputs(t, t, 2, 1, 64, 64, jnp.bfloat16, seed=2)
  poison = lambda x: x.at[:, 128:256].set(jnp.nan)
  o = sig_gpu.sigmoid_attention(q, poison(k), poison(v), bias, left=left,
                                right=0, scale=0.125, interpret=True,
                                pingpong=pingpong)
  want = oracle(q, k, v, bias=bias, scale=0.125, left=left, right=0)
  for rows in (slice(0, 64), slice(384, 512)):
    _check_close(o[:, rows], want[:, rows], f"o[{rows}]")
  assert np.isnan(np.asarray(o[:, 128:256], np.float32)).any()


def _window10_grads(seed, poison):
  """(kernel's, oracle's) dq, dk, dv, dbias for causal window 10, T = 512;
  the kernel's q, k, v first pass through poison(q, k, v)."""
  kw = dict(left=10, right=0, scale=0.125)
  q, k, v, w, bias = _inputs(512, 512, 2, 1, 64, 64, jnp.bfloat16, seed=seed)
  fn = lambda q, k, v, b: sig_gpu.sigmoid_attention(
      q, k, v, b, **kw, interpret=True)
  ref = lambda q, k, v, b: oracle(q, k, v, bias=b, **kw)
  return (_grads(fn, *poison(q, k, v), bias, w),
          _grads(ref, q, k, v, bias, w))


def test_interpret_dkv_skips_the_other_warpgroups_tiles():
  # As the softmax kernels' test: causal window 10, T = 512; NaN queries in
  # tile 2 reach keys 64..191 only, so dk, dv of keys 0..63 (whose
  # warpgroup shares a CTA, and the streamed tile 2, with key tile 1) stay
  # exact.
  (_, dk, dv, _), (_, dk_ref, dv_ref, _) = _window10_grads(
      7, lambda q, k, v: (q.at[:, 128:192].set(jnp.nan), k, v))
  for name, g, g_ref in (("dk", dk, dk_ref), ("dv", dv, dv_ref)):
    _check_close(g[:, :64], g_ref[:, :64], f"{name}[:64]")
    assert np.isnan(np.asarray(g[:, 64:192], np.float32)).any(), name


def test_interpret_dq_skips_the_other_warpgroups_tiles():
  # Causal window 10, T = 512: a dq CTA holds query tiles 2c and 2c + 1 and
  # streams the key tiles both reach. Query tile 0 reaches key tile 0 only
  # (CTA 0 streams 0, 1); query tile 3 reaches key tiles 2, 3 (CTA 1
  # streams 1..3). NaN keys and values in tile 1 (64..127) must leave dq of
  # queries 0..63 and 192..255 exact: each warpgroup skipped its partner's
  # tiles at both ends of its own range.
  poison = lambda x: x.at[:, 64:128].set(jnp.nan)
  (dq, *_), (dq_ref, *_) = _window10_grads(
      8, lambda q, k, v: (q, poison(k), poison(v)))
  for rows in (slice(0, 64), slice(192, 256)):
    _check_close(dq[:, rows], dq_ref[:, rows], f"dq[{rows}]")
  assert np.isnan(np.asarray(dq[:, 64:192], np.float32)).any()


# --------------------------------------------------------------- lowering ---


@pytest.mark.parametrize("t,d,dv,right,pingpong", [
    (1024, 64, 64, None, False), (4096, 128, 128, 0, False),
    (16384, 128, 128, None, False), (4096, 128, 64, None, False),
    (4096, 64, 128, 0, False), (4096, 128, 128, None, True),
    (16384, 128, 128, 0, True)])
def test_lowers_for_cuda(t, d, dv, right, pingpong):
  sds = jax.ShapeDtypeStruct
  args = (sds((2, t, 16, d), jnp.bfloat16), sds((2, t, 4, d), jnp.bfloat16),
          sds((2, t, 4, dv), jnp.bfloat16), sds((16,), jnp.float32))
  fn = lambda q, k, v, b: sig_gpu.sigmoid_attention(
      q, k, v, b, left=None, right=right, scale=d ** -0.5, pingpong=pingpong)
  both = lambda *a: (fn(*a), jax.grad(
      lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3))(*a))
  exported = jax.export.export(jax.jit(both), platforms=["cuda"])(*args)
  # the forward (for o and again inside the VJP), dq, dk/dv.
  calls = re.findall(r"custom_call @mosaic_gpu_v2\(.*", exported.mlir_module())
  assert len(calls) >= 3
  # sigmoid's reciprocal is the approximate rcp in every kernel, no IEEE
  # division (common.reciprocal; the module is MLIR bytecode, whose string
  # table names the ops and holds the inline PTX).
  for call in calls:
    assert "rcp.approx.ftz.f32" in call and "arith.divf" not in call
  o, dq, dk, dv_, db = exported.out_avals
  assert o.shape == (2, t, 16, dv) and o.dtype == jnp.bfloat16
  assert dk.shape == (2, t, 4, d) and dv_.shape == (2, t, 4, dv)
  assert db.shape == (16,)


# -------------------------------------------------------------- validation ---


@pytest.mark.parametrize("case,match", [
    (dict(dtype=jnp.float32), "dtype"),
    (dict(d=96), "head dims"),
    (dict(bias=jnp.zeros((3,))), "bias.shape"),
    (dict(left=-1), "left"),
    (dict(tk=100, left=4), "Tq == Tk"),
    (dict(hkv=3), "multiple"),
    (dict(pingpong=1), "pingpong"),
])
def test_rejects_bad_inputs(case, match):
  c = dict(tq=64, tk=64, h=4, hkv=2, d=64, dtype=jnp.bfloat16, left=None)
  c.update(case)
  q, k, v, _, bias = _inputs(c["tq"], c["tk"], c["h"], c["hkv"], c["d"],
                             c["d"], c["dtype"])
  with pytest.raises(ValueError, match=match):
    sig_gpu.sigmoid_attention(q, k, v, c.get("bias", bias), left=c["left"],
                              right=None, scale=0.1, interpret=True,
                              pingpong=c.get("pingpong", False))


def test_supports():
  assert sig_gpu.supports(128, 64, jnp.bfloat16)
  assert not sig_gpu.supports(128, 128, jnp.float32)
  assert not sig_gpu.supports(256, 128, jnp.float16)


# ------------------------------------------------------------- on the GPU ---


@gpu_only
@pytest.mark.parametrize("left,right,pingpong", [
    (None, None, False), (None, 0, False), (300, 0, False),
    (None, None, True), (None, 0, True), (300, 0, True)])
def test_gpu_matches_oracle(left, right, pingpong):
  t, h, hkv, d = 2048, 4, 2, 128
  q, k, v, w, bias = _inputs(t, t, h, hkv, d, d, jnp.bfloat16, b=2)
  fn = jax.jit(lambda q, k, v, b: sig_gpu.sigmoid_attention(
      q, k, v, b, left=left, right=right, scale=d ** -0.5, pingpong=pingpong))
  ref = lambda q, k, v, b: oracle(q, k, v, bias=b, scale=d ** -0.5,
                                  left=left, right=right)
  _check_close(fn(q, k, v, bias), ref(q, k, v, bias), "o")
  grads = jax.jit(lambda *a: _grads(fn, *a, w))(q, k, v, bias)
  for name, g, g_ref in zip(("dq", "dk", "dv", "dbias"), grads,
                            _grads(ref, q, k, v, bias, w)):
    _check_close(g, g_ref, name)
