"""Tests of the Mosaic GPU (Hopper) sliding-window attention kernels,
forward and backward (kernels_pallas/local_attention/mosaic_gpu.py and the
modules it imports, mosaic_gpu_backward.py and mosaic_gpu_band.py).

Tiers:
  * the per-CTA tile ranges and interior flags against brute force over the
    band mask (pure Python);
  * numerics under Mosaic GPU interpret mode on small shapes (CPU): output,
    lse, dq, dk, dv against the dense oracle tests/oracles/sliding_window.py
    (gradients: jax.grad of a random-weighted sum of its output);
  * lowering for "cuda" via jax.export (CPU, no GPU needed), T = 16384;
  * the compiled kernels on a real GPU (skipped unless the backend is "gpu").
The kernels take bfloat16/float16 only (float32 raises ValueError), so the
numerics use bf16/f16 inputs (the oracle upcasts them to float32) and the
16-bit tolerance 2e-2 relative to the reference's max.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import mosaic_gpu_pipeline as pipeline
from kernels_pallas.local_attention import mosaic_gpu as swa_gpu
from kernels_pallas.local_attention import mosaic_gpu_band as swa_band
from kernels_pallas.local_attention import mosaic_gpu_backward as swa_gpu_backward
from tests.oracles.sliding_window import sliding_window_attention as oracle

_ON_GPU = jax.default_backend() == "gpu"
gpu_only = pytest.mark.skipif(not _ON_GPU, reason="needs a Hopper GPU")
_TOL = 2e-2


def _inputs(t, h, hkv, d, dtype, seed=0, b=1):
  """q [B,T,H,D], k/v [B,T,Hkv,D], a random output weight [B,T,H,D]."""
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, t, h, d), jnp.float32).astype(dtype)
  k = jax.random.normal(keys[1], (b, t, hkv, d), jnp.float32).astype(dtype)
  v = jax.random.normal(keys[2], (b, t, hkv, d), jnp.float32).astype(dtype)
  w = jax.random.normal(keys[3], (b, t, h, d), jnp.float32)
  return q, k, v, w


def _rel_err(x, ref):
  x = np.asarray(x, np.float32)
  ref = np.asarray(ref, np.float32)
  return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-6))


def _check_close(x, ref, what):
  """16-bit tolerance relative to the reference's max; a reference that is
  exactly zero (e.g. dq, dk of the window (0, 0)) needs |x| < tol."""
  ref = np.asarray(ref, np.float32)
  x = np.asarray(x, np.float32)
  assert x.shape == ref.shape, (what, x.shape, ref.shape)
  assert np.all(np.isfinite(x)), what
  if np.max(np.abs(ref)) == 0.0:
    assert np.max(np.abs(x)) < _TOL, what
  else:
    assert _rel_err(x, ref) < _TOL, (what, _rel_err(x, ref))


def _grads(fn, q, k, v, w):
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)
  return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


# ------------------------------------------------------------ tile ranges ---


def _band(t, left, right, rows):
  """[rows, t] bool: query i (i may be >= t, a padded row) sees key j."""
  i = np.arange(rows)[:, None]
  j = np.arange(t)[None, :]
  return (j >= i - left) & (j <= i + right)


@pytest.mark.parametrize("t,left,right", [
    (1, 0, 0), (64, 0, 0), (130, 0, 0), (130, 2, 50), (200, 190, 0),
    (200, 17, 0), (150, 149, 149), (191, 63, 64), (1000, 300, 5),
    (3000, 1000, 0)])
def test_tile_ranges_match_band_mask(t, left, right):
  bs = 64
  n = -(-t // bs)
  tp = n * bs
  mask = _band(t, left, right, tp)          # [Tp, T], padded rows included
  real = mask[:t]
  pad_keys = np.zeros((tp, tp), bool)
  pad_keys[:, :t] = mask                     # keys >= T never visible
  real_pad = pad_keys.copy()
  real_pad[t:] = False                       # only real queries
  for a in range(n):                         # query tile a
    rows = slice(a * bs, (a + 1) * bs)
    want = [c for c in range(n)
            if real_pad[rows, c * bs:(c + 1) * bs].any()]
    s, e = swa_gpu.tile_range(a, t=t, back=left, ahead=right)
    assert list(range(s, e)) == want, (a, s, e, want)
    for c in range(n):
      block = pad_keys[rows, c * bs:(c + 1) * bs]
      interior = bool(swa_gpu._interior(a * bs, c * bs, t=t, left=left,
                                        right=right, block_q=bs, block_kv=bs))
      assert interior == bool(block.all()), (a, c)
  for c in range(n):                         # key tile c -> query tiles
    cols = slice(c * bs, (c + 1) * bs)
    want = [a for a in range(n) if real_pad[a * bs:(a + 1) * bs, cols].any()]
    s, e = swa_gpu.tile_range(c, t=t, back=right, ahead=left)
    assert list(range(s, e)) == want, (c, s, e, want)
  assert real.any(axis=1).all()              # every real query sees a key


@pytest.mark.parametrize("t,left,right", [
    (1, 0, 0), (130, 0, 0), (130, 2, 50), (200, 190, 0), (200, 17, 0),
    (150, 149, 149), (191, 63, 64), (1000, 300, 5), (3000, 1000, 0),
    (1000, 127, 128)])
def test_interior_ranges_match_band_mask(t, left, right):
  # interior_range / cta_interior (the pipelines' interior loops) against
  # the tiles the padded band mask shows to be all-visible; edge_first
  # visits each tile of [start, end) once, the non-interior ones first.
  tp = -(-t // 128) * 128
  pad_keys = np.zeros((tp, tp), bool)
  pad_keys[:, :t] = _band(t, left, right, tp)
  full = lambda bq, bk, a, c: pad_keys[a * bq:(a + 1) * bq,
                                       c * bk:(c + 1) * bk].all()
  kw = dict(t=t, left=left, right=right)
  for bq, bk in ((64, 64), (64, 128)):         # dq and forwards; forward_ws
    for a in range(tp // bq):                  # query tile -> key tiles
      s, e = swa_gpu.tile_range(a, t=t, back=left, ahead=right,
                                block_src=bq, block_dst=bk)
      lo, hi = swa_band.interior_range(a, **kw, block_q=bq, block_kv=bk,
                                       start=s, end=e)
      want = [c for c in range(s, e) if full(bq, bk, a, c)]
      assert list(range(lo, hi)) == want and s <= lo <= hi <= e, (a, bk)
      n_edge, n_interior, tile = pipeline.edge_first(s, lo, hi, e)
      order = [int(tile(i)) for i in range(n_edge + n_interior)]
      assert sorted(order) == list(range(s, e)), (a, order)
      assert order[n_edge:] == want, (a, order)
  n = tp // 64
  for c in range(n):                           # key tile -> query tiles
    s, e = swa_gpu.tile_range(c, t=t, back=right, ahead=left)
    lo, hi = swa_band.interior_range(c, **kw, block_q=64, block_kv=64,
                                     keys_on_rows=True, start=s, end=e)
    assert list(range(lo, hi)) == [a for a in range(s, e)
                                   if full(64, 64, a, c)], c
  for ct in range(n // 2):                     # a dk/dv CTA's two key tiles
    s, _ = swa_gpu.tile_range(2 * ct, t=t, back=right, ahead=left)
    _, e = swa_gpu.tile_range(2 * ct + 1, t=t, back=right, ahead=left)
    lo, hi = swa_band.cta_interior([2 * ct, 2 * ct + 1], start=s, end=e,
                                   **kw, block_q=64, block_kv=64,
                                   keys_on_rows=True)
    want = [a for a in range(s, e)
            if full(64, 64, a, 2 * ct) and full(64, 64, a, 2 * ct + 1)]
    assert list(range(int(lo), int(hi))) == want, ct
    assert s <= int(lo) <= int(hi) <= e, ct


def test_tile_ranges_are_block_sparse():
  # T = 16384, causal window 512: at most 9 of the 256 key tiles per CTA.
  kw = dict(t=16384, back=511, ahead=0)
  assert swa_band._max_steps(256, **kw) == 9
  assert swa_gpu.tile_range(100, **kw) == (92, 101)
  assert swa_gpu.tile_range(3, **kw) == (0, 4)


# ------------------------------------------------------ interpret numerics ---

# (T, H, Hkv, dtype, left, right): GQA everywhere but one MHA f16 case; T not
# a multiple of 64 except one; windows (0, 0), causal narrower and wider than
# a block, asymmetric, causal with interior tiles, full, and one wider than
# _WS_MIN_WIDTH (the other launch order, `tiles_fastest`).
_CASES = [
    (150, 4, 2, jnp.bfloat16, 0, 0),
    (150, 4, 2, jnp.bfloat16, 100, 0),
    (130, 4, 2, jnp.bfloat16, 2, 50),
    (200, 4, 2, jnp.bfloat16, 190, 0),
    (150, 4, 2, jnp.bfloat16, 149, 149),
    (192, 2, 2, jnp.float16, 17, 70),
    (130, 4, 2, jnp.bfloat16, 1100, 0),
]


@pytest.mark.parametrize("t,h,hkv,left,right,ctas,pingpong", [
    (200, 2, 1, 70, 0, 3, False),     # MHA, 4 items over 3 CTAs
    (300, 2, 2, 300, 300, 5, True),   # full window, ragged last round
    (320, 2, 1, 200, 0, 2, False),    # GQA: an item walks 2 query heads
    (256, 4, 1, 5, 9, 1, True),       # one CTA walks everything
])
def test_interpret_persistent_dkv_equals_split(t, h, hkv, left, right, ctas,
                                                pingpong, monkeypatch):
  # CTAs that walk several items (K, V double-buffered, the accumulators
  # restarted per item, the dk/dv stores overlapping the next item) give
  # the split dk/dv kernel's results, summed over each group's heads: MHA
  # bitwise (the same wgmmas on the same operands, in the same order: the
  # split kernel in one loop, as the persistent one runs), GQA up to the
  # order of the float32 sum over heads (the split one rounds per head
  # first).
  monkeypatch.setattr(swa_gpu_backward, "SPLIT_LOOPS_DKV", False)
  d = 64
  q, k, v, w = _inputs(t, h, hkv, d, jnp.bfloat16, seed=14)
  do = w.astype(jnp.bfloat16)
  tp = -(-t // 128) * 128
  q, k, v, do = (jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
                 for x in (q, k, v, do))
  kw = dict(t=t, left=left, right=right, scale=0.125, interpret=True)
  o, lse = swa_gpu._forward(q, k, v, **kw)  # pylint: disable=protected-access
  _, delta = swa_gpu._backward_dq(q, k, v, do, o, lse, **kw)  # pylint: disable=protected-access
  split = swa_gpu._backward_dkv(q, k, v, do, lse, delta, **kw)  # pylint: disable=protected-access
  persistent = swa_gpu._backward_dkv_persistent(  # pylint: disable=protected-access
      q, k, v, do, lse, delta, **kw, pingpong=pingpong, ctas=ctas)
  for name, a, b in zip(("dk", "dv"), split, persistent):
    a = np.asarray(a, np.float32).reshape(1, tp, hkv, h // hkv, d).sum(3)
    b = np.asarray(b, np.float32)
    assert b.shape == (1, tp, hkv, d), name
    if h == hkv:
      np.testing.assert_array_equal(b[:, :t], a[:, :t], name)
    else:
      assert _rel_err(b[:, :t], a[:, :t]) < 1e-2, name


def test_interpret_persistent_dkv_items_are_isolated():
  # One CTA walks every item, batch 0's before batch 1's; NaN queries in
  # batch 0 make its dk, dv NaN, and the restarted accumulators must keep
  # batch 1's exact (a restart by 0 * previous sums would carry the NaN).
  t, h, d = 256, 2, 64
  q, k, v, w = _inputs(t, h, h, d, jnp.bfloat16, seed=15, b=2)
  do = w.astype(jnp.bfloat16)
  q = q.at[0].set(jnp.nan)
  kw = dict(t=t, left=70, right=0, scale=0.125, interpret=True)
  o, lse = swa_gpu._forward(q, k, v, **kw)  # pylint: disable=protected-access
  _, delta = swa_gpu._backward_dq(q, k, v, do, o, lse, **kw)  # pylint: disable=protected-access
  split = swa_gpu._backward_dkv(q, k, v, do, lse, delta, **kw)  # pylint: disable=protected-access
  persistent = swa_gpu._backward_dkv_persistent(  # pylint: disable=protected-access
      q, k, v, do, lse, delta, **kw, ctas=1)
  for name, a, b in zip(("dk", "dv"), split, persistent):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.isnan(b[0]).all(), name
    assert np.isfinite(a[1]).all(), name
    np.testing.assert_array_equal(b[1], a[1], name)


@pytest.mark.parametrize("backward", swa_gpu.BACKWARDS)
@pytest.mark.parametrize("t,h,hkv,dtype,left,right", _CASES)
def test_interpret_matches_oracle(t, h, hkv, dtype, left, right, backward):
  d = 64
  scale = d ** -0.5
  q, k, v, w = _inputs(t, h, hkv, d, dtype)
  fn = lambda q, k, v: swa_gpu.sliding_window_attention(
      q, k, v, left=left, right=right, scale=scale, interpret=True,
      backward=backward)
  ref = lambda q, k, v: oracle(q, k, v, left=left, right=right, scale=scale)
  o = fn(q, k, v)
  assert o.shape == (1, t, h, d) and o.dtype == dtype
  _check_close(o, ref(q, k, v), "o")
  for name, g, g_ref in zip(("dq", "dk", "dv"), _grads(fn, q, k, v, w),
                            _grads(ref, q, k, v, w)):
    assert g.dtype == dtype, name
    _check_close(g, g_ref, name)


@pytest.mark.parametrize("t,h,hkv,dtype,left,right", _CASES)
def test_interpret_warp_specialized_forward_matches_oracle(t, h, hkv, dtype,
                                                          left, right):
  # Two query tiles per CTA over 128-key tiles, ping-pong: the output, lse
  # (in float64 NumPy) and gradients through it.
  d, scale = 64, 0.125
  q, k, v, w = _inputs(t, h, hkv, d, dtype, seed=12)
  fn = lambda q, k, v: swa_gpu.sliding_window_attention(
      q, k, v, left=left, right=right, scale=scale, interpret=True,
      forward="warp_specialized")
  ref = lambda q, k, v: oracle(q, k, v, left=left, right=right, scale=scale)
  _check_close(fn(q, k, v), ref(q, k, v), "o")
  _, lse = swa_gpu.forward_with_lse(q, k, v, left=left, right=right,
                                    scale=scale, interpret=True,
                                    forward="warp_specialized")
  qf, kf = (np.asarray(x, np.float64) for x in (q, k))
  kf = np.repeat(kf, h // hkv, axis=2)
  s = np.einsum("bihd,bjhd->bhij", qf, kf) * scale
  s = np.where(_band(t, left, right, t), s, -np.inf)
  want = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
  np.testing.assert_allclose(np.asarray(lse), want, rtol=0, atol=5e-2)
  for name, g, g_ref in zip(("dq", "dk", "dv"), _grads(fn, q, k, v, w),
                            _grads(ref, q, k, v, w)):
    _check_close(g, g_ref, name)


@pytest.mark.parametrize("t,h,hkv,left,right", [
    (300, 4, 2, 100, 7), (200, 2, 2, 199, 199), (130, 2, 1, 0, 0),
    (150, 2, 2, 2, 50)])
def test_interpret_pv_first_dkv_matches_oracle(t, h, hkv, left, right,
                                               monkeypatch):
  # The split dk/dv kernel's step in PV_FIRST's order (S^T alone, then
  # dV += P^T dO together with dP^T, then dK): gradients against the dense
  # oracle, with GQA, masked edges on both sides, T not a block multiple,
  # full attention and the diagonal-only window (where dk is exactly 0).
  monkeypatch.setattr(swa_gpu_backward, "PV_FIRST", True)
  d = 64
  q, k, v, w = _inputs(t, h, hkv, d, jnp.bfloat16, seed=31)
  fn = lambda q, k, v: swa_gpu.sliding_window_attention(
      q, k, v, left=left, right=right, scale=0.125, interpret=True)
  ref = lambda q, k, v: oracle(q, k, v, left=left, right=right, scale=0.125)
  for name, g, g_ref in zip(("dq", "dk", "dv"), _grads(fn, q, k, v, w),
                            _grads(ref, q, k, v, w)):
    _check_close(g, g_ref, name)


@pytest.mark.parametrize("forward", ["single", "warp_specialized"])
@pytest.mark.parametrize("split_loops", [True, False])
def test_interpret_split_loops_match_oracle(forward, split_loops,
                                            monkeypatch):
  # T = 640, window (300, 70): most steps are interior to both warpgroups
  # of a CTA, so the kernels' second (interior, unmasked) loop does most
  # of the work; edge tiles on both sides, some skipped by one warpgroup.
  # Every kernel in two loops (the forwards' and dq's default; dk/dv's
  # SPLIT_LOOPS_DKV) and every kernel in one.
  monkeypatch.setattr(swa_gpu, "SPLIT_LOOPS", split_loops)
  monkeypatch.setattr(swa_gpu_backward, "SPLIT_LOOPS", split_loops)
  monkeypatch.setattr(swa_gpu_backward, "SPLIT_LOOPS_DKV", split_loops)
  t, left, right = 640, 300, 70
  q, k, v, w = _inputs(t, 2, 1, 64, jnp.bfloat16, seed=41)
  fn = lambda q, k, v: swa_gpu.sliding_window_attention(
      q, k, v, left=left, right=right, scale=0.125, interpret=True,
      forward=forward)
  ref = lambda q, k, v: oracle(q, k, v, left=left, right=right, scale=0.125)
  _check_close(fn(q, k, v), ref(q, k, v), "o")
  for name, g, g_ref in zip(("dq", "dk", "dv"), _grads(fn, q, k, v, w),
                            _grads(ref, q, k, v, w)):
    _check_close(g, g_ref, name)


@pytest.mark.parametrize("forward", ["single", "warp_specialized"])
@pytest.mark.parametrize("fold,scale", [
    (True, 0.125), (False, 0.125), (True, 3.0), (True, 2.0 ** -24)])
def test_interpret_forward_scale_folding(forward, fold, scale, monkeypatch):
  # The forwards with the scale folded into exp2's argument (FOLD_SCALE, the
  # default; off: bench.py's mosaic_gpu_unfolded_scale), and a scale too
  # small to fold (2^-24 log2 e < 2^-20: scaled first): output and lse
  # against float64 NumPy on a window with masked edges on both sides,
  # D != V, GQA, T not a block multiple. At scale 3 the folded exponent gave
  # non-finite rows in interpret mode before _FOLD_FLOOR.
  monkeypatch.setattr(swa_gpu, "FOLD_SCALE", fold)
  t, h, hkv, left, right = 300, 4, 2, 100, 7
  q, k, _, _ = _inputs(t, h, hkv, 128, jnp.bfloat16, seed=21)
  v = jax.random.normal(jax.random.key(22), (1, t, hkv, 64),
                        jnp.float32).astype(jnp.bfloat16)
  o, lse = swa_gpu.forward_with_lse(q, k, v, left=left, right=right,
                                    scale=scale, interpret=True,
                                    forward=forward)
  qf, kf, vf = (np.repeat(np.asarray(x, np.float64), h // hkv, axis=2)
                if x is not q else np.asarray(x, np.float64)
                for x in (q, k, v))
  s = np.einsum("bihd,bjhd->bhij", qf, kf) * scale
  s = np.where(_band(t, left, right, t), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  want_lse = np.log(p.sum(-1)) + s.max(-1)
  want_o = np.einsum("bhij,bjhv->bihv", p / p.sum(-1, keepdims=True), vf)
  _check_close(o, want_o, "o")
  np.testing.assert_allclose(np.asarray(lse), want_lse, rtol=0, atol=5e-2)


def test_interpret_warp_specialized_forward_pingpong_is_bitwise_neutral():
  # Taking turns changes when each warpgroup computes, not what; the
  # warpgroups of a CTA skip different steps here (causal window 300 on
  # T = 700), and a miscounted arrival would deadlock (setup.cfg timeout).
  t, h, hkv, d, left = 700, 2, 1, 64, 300
  q, k, v, _ = _inputs(t, h, hkv, d, jnp.bfloat16, seed=13)
  tp = 768
  pad = lambda x: jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
  kw = dict(t=t, left=left, right=0, scale=0.125, interpret=True)
  outs = [swa_gpu._forward_ws(pad(q), pad(k), pad(v), **kw, pingpong=p)  # pylint: disable=protected-access
          for p in (False, True)]
  for a, b in zip(*outs):
    np.testing.assert_array_equal(np.asarray(a, np.float32),
                                  np.asarray(b, np.float32))


def test_auto_forward_picks_by_window_width():
  pick = swa_gpu._forward_kernel  # pylint: disable=protected-access
  wide = swa_gpu._WS_MIN_WIDTH  # pylint: disable=protected-access
  assert pick("auto", wide - 1, 0) is swa_gpu._forward_ws  # pylint: disable=protected-access
  assert pick("auto", wide - 2, 0) is swa_gpu._forward  # pylint: disable=protected-access
  assert pick("single", 4095, 0) is swa_gpu._forward  # pylint: disable=protected-access
  assert pick("warp_specialized", 0, 0) is swa_gpu._forward_ws  # pylint: disable=protected-access


def test_launch_order_follows_the_window_width():
  # Batch fastest below _WS_MIN_WIDTH keys, a (batch, head)'s tiles fastest
  # from there (BENCHMARKS.md 5h); the interpret tests run both orders
  # (_CASES: the last one wide, the others narrow).
  from kernels_pallas import mosaic_gpu_common as common  # pylint: disable=g-import-not-at-top
  wide = swa_gpu._WS_MIN_WIDTH  # pylint: disable=protected-access
  assert swa_gpu.tiles_fastest(wide - 1, 0) and swa_gpu.tiles_fastest(0, wide - 1)
  assert not swa_gpu.tiles_fastest(wide // 2, wide // 2 - 2)
  assert common.tile_grid("q", 8, 4, 2, False)["grid"] == (8, 4, 2)
  assert common.tile_grid("q", 8, 4, 2, True)["grid"] == (2, 4, 8)


def test_interpret_value_dim_differs_gqa():
  # V = 128 != D = 64 with GQA: the dk/dv kernel stages its float32 outputs
  # in two buffers per warpgroup (D == V shares one).
  t, h, hkv, left, right = 140, 4, 2, 60, 9
  q, k, _, _ = _inputs(t, h, hkv, 64, jnp.bfloat16, seed=4)
  _, _, v, w = _inputs(t, h, hkv, 128, jnp.bfloat16, seed=5)
  fn = lambda q, k, v: swa_gpu.sliding_window_attention(
      q, k, v, left=left, right=right, scale=0.125, interpret=True)
  ref = lambda q, k, v: oracle(q, k, v, left=left, right=right, scale=0.125)
  _check_close(fn(q, k, v), ref(q, k, v), "o")
  for name, g, g_ref in zip(("dq", "dk", "dv"), _grads(fn, q, k, v, w),
                            _grads(ref, q, k, v, w)):
    _check_close(g, g_ref, name)


def test_interpret_lse():
  t, h, hkv, d, left, right = 150, 2, 1, 64, 70, 3
  q, k, v, _ = _inputs(t, h, hkv, d, jnp.bfloat16, seed=1)
  o, lse = swa_gpu.forward_with_lse(q, k, v, left=left, right=right,
                                    scale=0.125, interpret=True)
  qf, kf = (np.asarray(x, np.float64) for x in (q, k))
  s = np.einsum("bihd,bjd->bhij", qf, kf[:, :, 0]) * 0.125
  s = np.where(_band(t, left, right, t), s, -np.inf)
  want = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
  assert lse.shape == (1, h, t)
  np.testing.assert_allclose(np.asarray(lse), want, rtol=0, atol=5e-2)
  _check_close(o, oracle(q, k, v, left=left, right=right, scale=0.125), "o")



@pytest.mark.parametrize("d,dv", [(64, 64), (64, 128)])
def test_interpret_dq_kernel_writes_delta(d, dv):
  # delta_i = dO_i . o_i comes out of the dq kernel (o staged in dq's SMEM
  # buffer when D == V, in its own when not): against float64 NumPy.
  t, h, hkv, left, right = 128, 2, 1, 40, 5
  q, k, _, _ = _inputs(t, h, hkv, d, jnp.bfloat16, seed=6)
  _, _, v, _ = _inputs(t, h, hkv, dv, jnp.bfloat16, seed=7)
  do = jax.random.normal(jax.random.key(8), (1, t, h, dv)).astype(jnp.bfloat16)
  kw = dict(t=t, left=left, right=right, scale=0.125, interpret=True)
  o, lse = swa_gpu._forward(q, k, v, **kw)  # pylint: disable=protected-access
  dq, delta = swa_gpu._backward_dq(q, k, v, do, o, lse, **kw)  # pylint: disable=protected-access
  want = np.einsum("bthv,bthv->bht", np.asarray(do, np.float64),
                   np.asarray(o, np.float64))
  assert delta.shape == (1, h, t) and delta.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(delta), want, rtol=1e-5, atol=1e-5)
  assert dq.shape == q.shape


def test_interpret_never_touches_tiles_outside_range():
  # T = 256, causal window of 11: query tile 0 has one key tile and its second
  # (skipped) pipeline step loads key tile 1; query tile 3 reads tiles 2, 3.
  # NaN keys/values in tile 1 would reach rows 0..63 and 192..255 through any
  # masked or skipped step that still did math (0 * NaN = NaN); they must
  # stay finite and exact.
  t, left = 256, 10
  q, k, v, _ = _inputs(t, 2, 1, 64, jnp.bfloat16, seed=2)
  poison = lambda x: x.at[:, 64:128].set(jnp.nan)
  o = swa_gpu.sliding_window_attention(q, poison(k), poison(v), left=left,
                                       right=0, scale=0.125, interpret=True)
  want = oracle(q, k, v, left=left, right=0, scale=0.125)
  for rows in (slice(0, 64), slice(192, 256)):
    _check_close(o[:, rows], want[:, rows], f"o[{rows}]")
  assert np.isnan(np.asarray(o[:, 64:192], np.float32)).any()


def _window10_grads(seed, poison, backward, pingpong=False):
  """(kernel's, oracle's) dq, dk, dv for causal window 10, T = 512; the
  kernel's q, k, v first pass through poison(q, k, v)."""
  kw = dict(left=10, right=0, scale=0.125)
  q, k, v, w = _inputs(512, 2, 1, 64, jnp.bfloat16, seed=seed)
  fn = lambda q, k, v: swa_gpu.sliding_window_attention(
      q, k, v, **kw, interpret=True, backward=backward, pingpong=pingpong)
  ref = lambda q, k, v: oracle(q, k, v, **kw)
  return _grads(fn, *poison(q, k, v), w), _grads(ref, q, k, v, w)


@pytest.mark.parametrize("backward,pingpong", [
    ("split", False), ("fused", False), ("split", True), ("persistent", False),
    ("persistent", True)])
def test_interpret_dkv_skips_the_other_warpgroups_tiles(backward, pingpong):
  # Causal window 10, T = 512: the dk/dv CTA of key tiles 0 and 1 streams
  # query tiles 0..2; key tile 0's warpgroup reaches only 0 and 1 and must
  # skip tile 2. NaN queries in tile 2 (rows 128..191) then leave dk, dv of
  # keys 0..63 exact, while keys 64..191 (which those queries see) get NaN.
  (_, dk, dv), (_, dk_ref, dv_ref) = _window10_grads(
      7, lambda q, k, v: (q.at[:, 128:192].set(jnp.nan), k, v), backward,
      pingpong)
  for name, g, g_ref in (("dk", dk, dk_ref), ("dv", dv, dv_ref)):
    _check_close(g[:, :64], g_ref[:, :64], f"{name}[:64]")
    assert np.isnan(np.asarray(g[:, 64:192], np.float32)).any(), name


@pytest.mark.parametrize("backward", swa_gpu.BACKWARDS)
def test_interpret_dq_skips_the_other_warpgroups_tiles(backward):
  # Causal window 10, T = 512. Split: query tile 0 reaches key tile 0 only
  # (its second, skipped step still loads tile 1), query tile 3 key tiles
  # 2, 3. Fused: key tile 1's warpgroup streams query tiles 0..2 (its
  # CTA's union) but reaches only 1 and 2, so it must not add into query
  # tile 0's dq. NaN keys and values in tile 1 (64..127) must leave dq of
  # queries 0..63 and 192..255 exact.
  poison = lambda x: x.at[:, 64:128].set(jnp.nan)
  (dq, _, _), (dq_ref, _, _) = _window10_grads(
      8, lambda q, k, v: (q, poison(k), poison(v)), backward)
  for rows in (slice(0, 64), slice(192, 256)):
    _check_close(dq[:, rows], dq_ref[:, rows], f"dq[{rows}]")
  assert np.isnan(np.asarray(dq[:, 64:192], np.float32)).any()


@pytest.mark.parametrize("t,h,hkv,d,left", [
    (330, 2, 1, 64, 200),    # GQA: a dk/dv CTA streams 6 query tiles
    (300, 2, 2, 128, 150),   # MHA, D = 128: dq's product in two halves
])
def test_interpret_fused_backward_equals_split(t, h, hkv, d, left):
  # The two backwards do the same tile math; dk and dv come from the same
  # wgmmas on the same operands (bitwise), dq only differs in the order its
  # float32 contributions are summed. Causal window left + 1.
  q, k, v, w = _inputs(t, h, hkv, d, jnp.bfloat16, seed=9)
  grads = {}
  for backward in ("fused", "split"):
    fn = lambda q, k, v, b=backward: swa_gpu.sliding_window_attention(
        q, k, v, left=left, right=0, scale=0.125, interpret=True, backward=b)
    grads[backward] = _grads(fn, q, k, v, w)
  (dq_f, dk_f, dv_f), (dq_s, dk_s, dv_s) = grads["fused"], grads["split"]
  np.testing.assert_array_equal(np.asarray(dk_f, np.float32),
                                np.asarray(dk_s, np.float32))
  np.testing.assert_array_equal(np.asarray(dv_f, np.float32),
                                np.asarray(dv_s, np.float32))
  assert _rel_err(dq_f, dq_s) < 1e-2
  ref = lambda q, k, v: oracle(q, k, v, left=left, right=0, scale=0.125)
  _check_close(dq_f, _grads(ref, q, k, v, w)[0], "dq")


@pytest.mark.parametrize("backward", swa_gpu.BACKWARDS)
def test_interpret_pingpong_equals_default(backward):
  # Taking turns (a barrier twice a step in the dk/dv kernel, skipped steps
  # included) changes when the warpgroups compute, not what: the gradients
  # are bitwise those without it. Causal window 151 on T = 300 with GQA:
  # the CTAs' warpgroups have different ranges, so some steps are skipped
  # by one warpgroup only. A miscounted arrival deadlocks, which the
  # timeout of setup.cfg turns into a failure.
  t, h, hkv, d, left = 300, 2, 1, 64, 150
  q, k, v, w = _inputs(t, h, hkv, d, jnp.bfloat16, seed=11)
  grads = [_grads(lambda q, k, v, p=p: swa_gpu.sliding_window_attention(
      q, k, v, left=left, right=0, scale=0.125, interpret=True,
      backward=backward, pingpong=p), q, k, v, w) for p in (False, True)]
  for name, a, b in zip(("dq", "dk", "dv"), *grads):
    np.testing.assert_array_equal(np.asarray(a, np.float32),
                                  np.asarray(b, np.float32), err_msg=name)


def test_interpret_tiny_t():
  # T = 5 < one block: 59 padded keys masked, 59 padded queries sliced off.
  q, k, v, _ = _inputs(5, 4, 2, 64, jnp.bfloat16, seed=3)
  o = swa_gpu.sliding_window_attention(q, k, v, left=4, right=1, scale=0.125,
                                       interpret=True)
  assert o.shape == (1, 5, 4, 64)
  _check_close(o, oracle(q, k, v, left=4, right=1, scale=0.125), "o")

# --------------------------------------------------------------- lowering ---


def _export(fn, t, d=128, h=4, hkv=2):
  sds = jax.ShapeDtypeStruct
  args = (sds((2, t, h, d), jnp.bfloat16), sds((2, t, hkv, d), jnp.bfloat16),
          sds((2, t, hkv, d), jnp.bfloat16))
  return jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)


@pytest.mark.parametrize("forward", ["single", "warp_specialized"])
@pytest.mark.parametrize("left", [127, 511, 2047, 4095])
def test_forward_lowers_for_cuda(left, forward):
  t = 16384
  fn = lambda q, k, v: swa_gpu.sliding_window_attention(
      q, k, v, left=left, right=0, scale=128 ** -0.5, forward=forward)
  exported = _export(fn, t)
  assert len(re.findall(r"custom_call @mosaic_gpu",
                        exported.mlir_module())) == 1
  (out,) = exported.out_avals
  assert out.shape == (2, t, 4, 128) and out.dtype == jnp.bfloat16


@pytest.mark.parametrize("backward", ["persistent", "split"])
@pytest.mark.parametrize("left,pingpong", [(511, False), (4095, False),
                                           (511, True)])
def test_backward_lowers_for_cuda(left, pingpong, backward):
  t = 16384
  fn = lambda q, k, v: swa_gpu.sliding_window_attention(
      q, k, v, left=left, right=0, scale=128 ** -0.5, backward=backward,
      pingpong=pingpong)
  grad = lambda q, k, v: jax.grad(
      lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=(0, 1, 2))(
          q, k, v)
  exported = _export(grad, t)
  # forward (residuals), dq and dk/dv kernels.
  assert len(re.findall(r"custom_call @mosaic_gpu",
                        exported.mlir_module())) == 3
  dq, dk, dv = exported.out_avals
  assert dq.shape == (2, t, 4, 128) and dq.dtype == jnp.bfloat16
  assert dk.shape == dv.shape == (2, t, 2, 128)


@pytest.mark.parametrize("overlap,pv_first", [(True, False), (False, False),
                                              (True, True)])
def test_backward_step_orders_lower_for_cuda(overlap, pv_first, monkeypatch):
  # The dq kernel's early wait for S alone (OVERLAP_EXP, the default) is the
  # one `wgmma.wait_group 1` of the backward's kernels; without it there is
  # none. PV_FIRST's dk/dv step lowers too (GQA, T = 16384).
  monkeypatch.setattr(swa_gpu_backward, "OVERLAP_EXP", overlap)
  monkeypatch.setattr(swa_gpu_backward, "PV_FIRST", pv_first)
  t = 16384
  fn = lambda q, k, v: swa_gpu.sliding_window_attention(
      q, k, v, left=2047, right=0, scale=128 ** -0.5)
  grad = lambda q, k, v: jax.grad(
      lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=(0, 1, 2))(
          q, k, v)
  module = _export(grad, t).mlir_module()
  assert len(re.findall(r"custom_call @mosaic_gpu", module)) == 3
  assert module.count("wgmma.wait_group.sync.aligned 1") == int(overlap)


@pytest.mark.parametrize("forward", ["single", "warp_specialized"])
def test_split_loop_kernels_lower_for_cuda(forward, monkeypatch):
  # Every kernel of the op with its steps in two loops (the dk/dv kernel's
  # too, SPLIT_LOOPS_DKV), T = 16384, window 2048, GQA.
  monkeypatch.setattr(swa_gpu, "SPLIT_LOOPS", True)
  monkeypatch.setattr(swa_gpu_backward, "SPLIT_LOOPS", True)
  monkeypatch.setattr(swa_gpu_backward, "SPLIT_LOOPS_DKV", True)
  fn = lambda q, k, v: swa_gpu.sliding_window_attention(
      q, k, v, left=2047, right=0, scale=128 ** -0.5, forward=forward)
  grad = lambda q, k, v: jax.grad(
      lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=(0, 1, 2))(
          q, k, v)
  module = _export(grad, 16384).mlir_module()
  assert len(re.findall(r"custom_call @mosaic_gpu", module)) == 3


@pytest.mark.parametrize("h,hkv,d,pingpong", [(4, 2, 128, False),
                                              (2, 2, 64, False),
                                              (2, 2, 128, False),
                                              (4, 2, 128, True)])
def test_fused_backward_lowers_for_cuda(h, hkv, d, pingpong):
  # One kernel for the backward (its float32 dq staging, K, V, dS and two
  # pipeline slots fit the SMEM limit); dq comes back in bf16.
  t = 16384
  fn = lambda q, k, v: swa_gpu.sliding_window_attention(
      q, k, v, left=2047, right=0, scale=0.1, backward="fused",
      pingpong=pingpong)
  grad = lambda q, k, v: jax.grad(
      lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=(0, 1, 2))(
          q, k, v)
  exported = _export(grad, t, d=d, h=h, hkv=hkv)
  assert len(re.findall(r"custom_call @mosaic_gpu",
                        exported.mlir_module())) == 2
  dq, dk, dv = exported.out_avals
  assert dq.shape == (2, t, h, d) and dq.dtype == jnp.bfloat16
  assert dk.shape == dv.shape == (2, t, hkv, d)


@pytest.mark.parametrize("d,dv", [(128, 64), (64, 128)])
def test_backward_lowers_for_cuda_value_dim_differs(d, dv):
  # GQA (float32 dk/dv staging) with D != V fits the SMEM limit at T = 16k.
  sds = jax.ShapeDtypeStruct
  args = (sds((2, 16384, 4, d), jnp.bfloat16), sds((2, 16384, 2, d), jnp.bfloat16),
          sds((2, 16384, 2, dv), jnp.bfloat16))
  fn = lambda q, k, v: swa_gpu.sliding_window_attention(
      q, k, v, left=511, right=0, scale=0.1)
  grad = jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)),
                  argnums=(0, 1, 2))
  exported = jax.export.export(jax.jit(grad), platforms=["cuda"])(*args)
  assert len(re.findall(r"custom_call @mosaic_gpu",
                        exported.mlir_module())) == 3


def test_lowers_mha_t_not_multiple_of_block():
  # H == Hkv: dk/dv come out of the kernel in bf16 (GQA: float32 per head).
  fn = lambda q, k, v: swa_gpu.sliding_window_attention(
      q, k, v, left=100, right=7, scale=0.125)
  grad = lambda q, k, v: (fn(q, k, v), jax.grad(
      lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=(0, 1, 2))(
          q, k, v))
  exported = _export(grad, 1000, d=64, h=2, hkv=2)
  assert len(re.findall(r"custom_call @mosaic_gpu",
                        exported.mlir_module())) >= 3
  assert [a.shape for a in exported.out_avals] == [(2, 1000, 2, 64)] * 4


# -------------------------------------------------------------- validation ---


@pytest.mark.parametrize("case,match", [
    ("float32", "dtype=float32"), ("head_dim", "D=96"),
    ("v_dim", "V=32"), ("groups", "H=3"), ("k_shape", "k.shape"),
    ("mixed", "dtypes differ"), ("left", "left=-1"),
    ("block", "block_q=128"), ("unknown", "block_foo"),
    ("backward", "backward='both'"), ("fused_gqa_dv", "backward='fused'"),
    ("pingpong", "pingpong=1"), ("forward", "forward='fast'")])
def test_rejects_bad_inputs(case, match):
  t, h, hkv, d, dv, dtype = 128, 4, 2, 64, 64, jnp.bfloat16
  kw = dict(left=3, right=0, scale=0.125)
  if case == "float32":
    dtype = jnp.float32
  elif case == "head_dim":
    d = 96
  elif case == "v_dim":
    dv = 32
  elif case == "groups":
    h = 3
  elif case == "left":
    kw["left"] = -1
  elif case == "block":
    kw["block_q"] = 128
  elif case == "unknown":
    kw["block_foo"] = 64
  elif case == "backward":
    kw["backward"] = "both"
  elif case == "fused_gqa_dv":
    kw["backward"], dv = "fused", 128
  elif case == "pingpong":
    kw["pingpong"] = 1
  elif case == "forward":
    kw["forward"] = "fast"
  q = jnp.zeros((1, t, h, d), dtype)
  k = jnp.zeros((1, t if case != "k_shape" else t + 1, hkv, d), dtype)
  v = jnp.zeros((1, t if case != "k_shape" else t + 1, hkv, dv),
                jnp.float16 if case == "mixed" else dtype)
  with pytest.raises(ValueError, match=match):
    swa_gpu.sliding_window_attention(q, k, v, **kw)


def test_supports():
  assert swa_gpu.supports(128, 128, jnp.bfloat16)
  assert swa_gpu.supports(64, 128, jnp.float16)
  assert not swa_gpu.supports(96, 96, jnp.bfloat16)
  assert not swa_gpu.supports(128, 128, jnp.float32)


# ------------------------------------------------------------- on the GPU ---


@gpu_only
@pytest.mark.parametrize("backward,pingpong,forward", [
    (b, p, "auto") for b in swa_gpu.BACKWARDS for p in (False, True)] + [
        ("split", False, "single"), ("split", False, "warp_specialized")])
@pytest.mark.parametrize("left", [127, 511, 1500])
def test_gpu_matches_oracle(left, backward, pingpong, forward):
  t, h, hkv, d = 2048, 4, 2, 128
  scale = d ** -0.5
  q, k, v, w = _inputs(t, h, hkv, d, jnp.bfloat16, b=2)
  fn = jax.jit(lambda q, k, v: swa_gpu.sliding_window_attention(
      q, k, v, left=left, right=0, scale=scale, backward=backward,
      pingpong=pingpong, forward=forward))
  ref = lambda q, k, v: oracle(q, k, v, left=left, right=0, scale=scale)
  o = fn(q, k, v)
  assert o.shape == (2, t, h, d) and o.dtype == jnp.bfloat16
  _check_close(o, ref(q, k, v), "o")
  grads = jax.jit(lambda q, k, v: _grads(fn, q, k, v, w))(q, k, v)
  for name, g, g_ref in zip(("dq", "dk", "dv"), grads,
                            _grads(ref, q, k, v, w)):
    _check_close(g, g_ref, name)


@gpu_only
@pytest.mark.parametrize("pv_first,overlap", [(True, True), (False, False),
                                              (True, False)])
@pytest.mark.parametrize("left,right", [(511, 0), (1500, 0), (300, 40)])
def test_gpu_backward_orders_match_oracle(left, right, pv_first, overlap,
                                          monkeypatch):
  # The backward's step orders on the GPU: PV_FIRST (dk/dv; off by default)
  # and OVERLAP_EXP (dq, on by default: the exponential computed while dP is
  # still in flight, which interpret mode does not model; off, both
  # products awaited together), gradients against the dense oracle.
  monkeypatch.setattr(swa_gpu_backward, "PV_FIRST", pv_first)
  monkeypatch.setattr(swa_gpu_backward, "OVERLAP_EXP", overlap)
  t, h, hkv, d = 2048, 4, 2, 128
  scale = d ** -0.5
  q, k, v, w = _inputs(t, h, hkv, d, jnp.bfloat16, b=2, seed=41)
  fn = lambda q, k, v: swa_gpu.sliding_window_attention(
      q, k, v, left=left, right=right, scale=scale)
  ref = lambda q, k, v: oracle(q, k, v, left=left, right=right, scale=scale)
  grads = jax.jit(lambda q, k, v: _grads(fn, q, k, v, w))(q, k, v)
  for name, g, g_ref in zip(("dq", "dk", "dv"), grads,
                            _grads(ref, q, k, v, w)):
    _check_close(g, g_ref, name)
