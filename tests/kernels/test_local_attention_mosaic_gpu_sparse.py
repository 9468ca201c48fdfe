"""Tests of the Mosaic GPU (Hopper) block-sparse neighborhood-attention
kernels, forward and backward (kernels_pallas/local_attention/
mosaic_gpu_sparse.py).

Tiers:
  * numerics under Mosaic GPU interpret mode on tiny grids (CPU): output,
    lse, dq, dk, dv against the dense oracle tests/oracles/neighborhood.py
    (float32 inputs, HIGHEST precision; gradients: jax.grad of a
    random-weighted sum of the output), over 1-D, 2-D and 3-D neighborhoods
    with odd/even kernels, borders, dilation, causal axes, stride, GQA and
    sizes that are not multiples of a tile; NaN keys outside a query tile's
    visited tiles prove that the kernels read only the listed tiles;
  * lowering for "cuda" via jax.export (CPU, no GPU needed) at realistic
    shapes (B=2, H=16, D=128, bfloat16), forward and VJP;
  * the compiled kernels on a real GPU against the op's xla implementation
    (test_gpu_*, skipped unless the backend is "gpu").
The kernels take bfloat16/float16 only, so the numerics use 16-bit inputs
and the 16-bit tolerance 2e-2 relative to the reference's max (as
test_local_attention_mosaic_gpu.py).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnlib as al
from kernels_pallas.local_attention import mosaic_gpu_sparse as na
from kernels_pallas.local_attention import plan as plan_lib
from tests.oracles import neighborhood as oracle

_ON_GPU = jax.default_backend() == "gpu"
gpu_only = pytest.mark.skipif(not _ON_GPU, reason="needs a Hopper GPU")
_TOL = 2e-2


def _inputs(spatial, *, h, hkv, d=64, dv=64, dtype=jnp.bfloat16, b=1, seed=0):
  """q [B,*S,H,D], k [B,*S,Hkv,D], v [B,*S,Hkv,V], output weights [.., H, V]."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  q = jnp.asarray(normal(b, *spatial, h, d), dtype)
  k = jnp.asarray(normal(b, *spatial, hkv, d), dtype)
  v = jnp.asarray(normal(b, *spatial, hkv, dv), dtype)
  return q, k, v, jnp.asarray(normal(b, *spatial, h, dv))


def _check_close(x, ref, what):
  """16-bit tolerance relative to the reference's max."""
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  assert x.shape == ref.shape, (what, x.shape, ref.shape)
  assert np.all(np.isfinite(x)), what
  err = float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-6))
  assert err < _TOL, (what, err)


def _value_and_grads(fn, q, k, v, w):
  def loss(q, k, v):
    o = fn(q, k, v)
    return jnp.sum(o.astype(jnp.float32) * w), o
  grads, o = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return o, grads


def _f32(*xs):
  return tuple(x.astype(jnp.float32) for x in xs)


# ------------------------------------------------------ interpret numerics ---

# (spatial, kernel, dilation, stride, causal, tile, h, hkv, d, dv, dtype);
# tile None is the default (volume 64).
_CASES = [
    # 1-D, causal window 128 > tile: one interior pair; MHA, float16.
    ((150,), 128, 1, 1, True, None, 2, 2, 64, 64, jnp.float16),
    # 1-D: even kernel, dilation 3 (groups 34, 33, 33), stride 2; GQA.
    ((100,), 6, 3, 2, False, None, 2, 1, 64, 64, jnp.bfloat16),
    # 2-D odd sizes, kernel 5 (borders), default 8 x 8 tiles; GQA; float16
    # (the forward's mask matmul with float16 factors).
    ((12, 10), 5, 1, 1, False, None, 2, 1, 64, 64, jnp.float16),
    # 2-D dilation 2 (four 6 x 5 groups, 4 x 16 tiles), stride 2 on a causal
    # axis, kernel 3 x 4; D != V.
    ((12, 10), (3, 4), 2, (1, 2), (False, True), None, 2, 2, 128, 64,
     jnp.bfloat16),
    # 3-D 4 x 6 x 6, 4 x 4 x 4 tiles, stride and a causal axis; GQA.
    ((4, 6, 6), (3, 2, 3), 1, (1, 2, 1), (False, False, True), None, 2, 1,
     64, 64, jnp.bfloat16),
]
# Cases that take the direct path (TMA from / to [B, *S, H, X], no gather;
# _CASES[0] is 1-D "sequence" too, T = 150 not a multiple of 64).
_DIRECT_CASES = [
    # "image": 16 x 24, kernel 5, MHA.
    ((16, 24), 5, 1, 1, False, None, 2, 2, 64, 64, jnp.bfloat16),
    # "image", ragged Hs = 13 (the last tile row half padding), GQA.
    ((13, 16), 7, 1, 1, False, None, 2, 1, 64, 64, jnp.bfloat16),
    # "image", GNA: kernel 8, stride 8.
    ((24, 16), 8, 1, 8, False, None, 2, 2, 64, 64, jnp.bfloat16),
    # dilated "image": 16 x 32, dilation 2 (four 8 x 16 groups), kernel 5.
    ((16, 32), 5, 2, 1, False, None, 2, 2, 64, 64, jnp.bfloat16),
    # dilated "image": 20 x 48, dilation (2, 3) (six 10 x 16 groups: each
    # group's last tile row ragged), kernel (3, 5), stride (1, 2) on a
    # causal axis; GQA.
    ((20, 48), (3, 5), (2, 3), (1, 2), (False, True), None, 2, 1, 64, 64,
     jnp.bfloat16),
]


def _plan(spatial, kernel, dilation, stride, causal, tile):
  r = len(spatial)
  per = lambda x: tuple(x) if isinstance(x, tuple) else (x,) * r
  if tile is None:
    groups = tuple(-(-n // d) for n, d in zip(spatial, per(dilation)))
    tile = plan_lib.default_tile_shape(groups, na.BLOCK)
  return plan_lib.neighborhood_plan(spatial, per(kernel), per(dilation),
                                    per(stride), per(causal), tile)


def test_cases_cover_interior_and_masked_pairs():
  flags = np.concatenate([_plan(*c[:6]).kv_interior.reshape(-1)
                          for c in _CASES])
  assert flags.any() and not flags.all()


def test_default_tiles_hold_64_tokens():
  assert plan_lib.default_tile_shape((128, 128), na.BLOCK) == (8, 8)
  assert plan_lib.default_tile_shape((16, 32, 32), na.BLOCK) == (4, 4, 4)
  assert plan_lib.default_tile_shape((5000,), na.BLOCK) == (64,)


@pytest.mark.parametrize(
    "spatial,kernel,dilation,stride,causal,tile,h,hkv,d,dv,dtype",
    _CASES + _DIRECT_CASES)
def test_interpret_matches_oracle(spatial, kernel, dilation, stride, causal,
                                  tile, h, hkv, d, dv, dtype):
  q, k, v, w = _inputs(spatial, h=h, hkv=hkv, d=d, dv=dv, dtype=dtype)
  r = len(spatial)
  per = lambda x: tuple(x) if isinstance(x, tuple) else (x,) * r
  opts = dict(kernel_size=per(kernel), dilation=per(dilation),
              stride=per(stride), is_causal=per(causal), scale=d ** -0.5)
  o, grads = _value_and_grads(
      lambda q, k, v: na.neighborhood_attention(
          q, k, v, interpret=True, tile_shape=tile, **opts), q, k, v, w)
  assert o.shape == (1, *spatial, h, dv) and o.dtype == dtype
  want_o, want_grads = _value_and_grads(
      lambda q, k, v: oracle.neighborhood_attention(q, k, v, **opts),
      *_f32(q, k, v), w)
  _check_close(o, want_o, "o")
  for name, x, g, g_ref in zip(("dq", "dk", "dv"), (q, k, v), grads,
                               want_grads):
    assert g.shape == x.shape and g.dtype == dtype, name
    _check_close(g, g_ref, name)


def test_forward_mask_path_of_cases():
  # The forward adds masks by a thin matmul where a tile's rows have at
  # most 16 interval classes (8 x 8 and 4 x 4 x 4 tiles, small dilation
  # groups, the 1-D case with dilation 3 and stride 2, whose 34-token
  # groups pair up), else by bias tiles (64 consecutive 1-D tokens: 64
  # classes): the interpret cases cover both, in bfloat16 and float16
  # (test_interpret_forward_variants: the bias tiles in 2-D).
  got = [na._factor_tables(_plan(*case[:6]), case[10],
                           case[8] ** -0.5 * na.common.LOG2E) is not None
         for case in _CASES + _DIRECT_CASES]
  assert got == [False] + [True] * (len(got) - 1)


@pytest.mark.parametrize("dtype,c,used", [
    (jnp.bfloat16, 0.125 * np.log2(np.e), True),
    (jnp.bfloat16, 2.0 ** 10, True), (jnp.bfloat16, 2.0 ** 11, False),
    (jnp.bfloat16, 2.0 ** -21, False), (jnp.float16, 0.125, True),
    (jnp.float16, 2.0 ** -12, False)])
def test_forward_mask_factor_scales(dtype, c, used):
  # Where the mask matmul is used (else bias tiles), a masked score in log2
  # units, c (Q1 K1^T), is at most 128 times the running max's floor (256
  # up to w's rounding to the dtype), far below it, and a visible one gets
  # exactly 0; the products stay finite.
  plan = _plan((16, 24), 5, 1, 1, False, None)
  t = na._factor_tables(plan, dtype, c)
  assert (t is not None) == used
  if not used:
    return
  q1 = np.asarray(t["q1"], np.float64).reshape(-1, 64, 16)[0]
  k1 = np.asarray(t["k1"], np.float64).reshape(-1, 64, 16)
  s = c * np.einsum("rj,ukj->urk", q1, k1)      # every tile vs query tile 0
  assert np.all(np.isfinite(s)) and t["floor"] < -2.0 ** 19
  assert np.all((s == 0) | (s <= 128 * t["floor"]))
  assert (s == 0).any() and (s < 0).any()   # which: plan test of the factors


@pytest.mark.parametrize("matmul,scoped,dv", [
    (False, False, 64), (False, True, 64), (True, False, 64),
    (True, True, 64), (True, True, 128)])
def test_interpret_forward_variants(matmul, scoped, dv, monkeypatch):
  # The forward's two ways of masking (MASK_AS_MATMUL; off: bench.py's
  # "mosaic_gpu_bias_mask") and its Q in registers with scoped Q / o
  # buffers (SCOPED_Q; off: "mosaic_gpu_kernel_long_q"), on a 2-D dilated
  # case with a causal axis and stride ("image"; D != V: "gather"),
  # against the oracle.
  spatial, opts = (20, 48), dict(kernel_size=(3, 5), dilation=(2, 3),
                                 stride=(1, 2), is_causal=(False, True),
                                 scale=0.125)
  monkeypatch.setattr(na, "MASK_AS_MATMUL", matmul)
  monkeypatch.setattr(na, "SCOPED_Q", scoped)
  q, k, v, _ = _inputs(spatial, h=2, hkv=1, dv=dv, seed=5)
  o, lse = na.forward_with_lse(q, k, v, interpret=True, **opts)
  _check_close(o, oracle.neighborhood_attention(*_f32(q, k, v), **opts), "o")
  assert np.all(np.isfinite(np.asarray(lse)))


def _path(spatial, kernel, dilation=1, tile=None, d=64, dv=64):
  q = jnp.zeros((1, *spatial, 2, d), jnp.bfloat16)
  v = jnp.zeros((1, *spatial, 2, dv), jnp.bfloat16)
  return na.io_path(q, q, v, kernel_size=kernel, dilation=dilation, stride=1,
                    is_causal=False, tile_shape=tile)


@pytest.mark.parametrize("case,want", [
    (_CASES[0], "sequence"), (_CASES[1], "gather"), (_CASES[2], "gather"),
    (_CASES[3], "gather"), (_CASES[4], "gather")]
    + [(c, "image") for c in _DIRECT_CASES])
def test_io_path_of_cases(case, want):
  q, k, v, _ = _inputs(case[0], h=case[6], hkv=case[7], d=case[8],
                       dv=case[9], dtype=case[10])
  assert na.io_path(q, k, v, kernel_size=case[1], dilation=case[2],
                    stride=case[3], is_causal=case[4],
                    tile_shape=case[5]) == want


@pytest.mark.parametrize("spatial,kernel,dilation,tile,d,dv,want", [
    ((128, 128), 13, 1, None, 128, 128, "image"),
    ((16384,), 129, 1, None, 128, 128, "sequence"),
    ((100,), 5, 1, None, 64, 128, "sequence"),      # D != V is fine in 1-D
    ((100,), 5, 2, None, 64, 64, "gather"),         # dilation
    ((16, 20), 5, 1, None, 64, 64, "gather"),       # Ws % 8 != 0
    ((16, 24), 5, 1, None, 64, 128, "gather"),      # D != V in 2-D
    ((16, 24), 5, 1, (4, 16), 64, 64, "gather"),    # tiles other than 8 x 8
    ((128, 128), 13, 2, None, 128, 128, "image"),   # dilated image
    ((128, 128), 13, (1, 2), None, 128, 128, "image"),
    ((16, 32), 5, 2, None, 64, 64, "image"),
    ((20, 48), (3, 5), (2, 3), None, 64, 64, "image"),  # ragged groups
    ((16, 24), 5, 2, None, 64, 64, "gather"),       # Ws % (8 d1) != 0
    ((15, 32), 5, 2, None, 64, 64, "gather"),       # Hs % d0 != 0
    ((16, 32), 5, 2, None, 64, 128, "gather"),      # D != V
    ((32, 64), 5, 2, (4, 16), 64, 64, "gather"),    # tiles other than 8 x 8
    ((8, 16, 16), 5, 1, None, 64, 64, "gather"),    # 3-D
])
def test_io_path(spatial, kernel, dilation, tile, d, dv, want):
  assert _path(spatial, kernel, dilation, tile, d, dv) == want


@pytest.mark.parametrize("spatial,kernel,dilation,causal", [
    ((9, 11), (3, 4), (1, 2), (True, False)),      # gather
    ((13, 16), (5, 3), (1, 1), (False, True)),     # image, ragged Hs
    ((10, 24), (3, 3), (2, 3), (True, False)),     # dilated image, ragged
    ((150,), (7,), (1,), (True,)),                  # sequence
])
def test_interpret_lse(spatial, kernel, dilation, causal):
  r, n = len(spatial), int(np.prod(spatial))
  opts = dict(kernel_size=kernel, dilation=dilation, stride=(1,) * r,
              is_causal=causal, scale=0.125)
  q, k, v, _ = _inputs(spatial, h=2, hkv=1, seed=1)
  o, lse = na.forward_with_lse(q, k, v, interpret=True, **opts)
  mask = oracle.neighborhood_mask(spatial, **{
      n: opts[n] for n in ("kernel_size", "dilation", "stride", "is_causal")})
  qf, kf = (np.asarray(x, np.float64).reshape(n, -1, 64) for x in (q, k))
  s = np.einsum("ihd,jd->hij", qf, kf[:, 0]) * 0.125
  s = np.where(mask, s, -np.inf)
  want = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
  assert lse.shape == (1, *spatial, 2) and lse.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(lse).reshape(n, 2), want.T,
                             rtol=0, atol=5e-2)
  _check_close(o, oracle.neighborhood_attention(*_f32(q, k, v), **opts), "o")


@pytest.mark.parametrize("case", [_CASES[0]] + _DIRECT_CASES)
def test_interpret_direct_equals_gather_bitwise(case, monkeypatch):
  # The same kernels on plan rows gathered by XLA (the layout choice forced
  # to "gather"): o, lse and the gradients agree bit for bit.
  spatial, kernel, dilation, stride, causal, tile, h, hkv, d, dv, dtype = case
  q, k, v, w = _inputs(spatial, h=h, hkv=hkv, d=d, dv=dv, dtype=dtype,
                       seed=4)
  opts = dict(kernel_size=kernel, dilation=dilation, stride=stride,
              is_causal=causal, scale=d ** -0.5, interpret=True)
  def run():
    o, lse = na.forward_with_lse(q, k, v, **opts)
    _, grads = _value_and_grads(
        lambda q, k, v: na.neighborhood_attention(q, k, v, **opts), q, k, v,
        w)
    return [np.asarray(x.astype(jnp.float32)) for x in (o, lse, *grads)]
  direct = run()
  monkeypatch.setattr(na.tiles_lib, "choose_kind", lambda *a: "gather")
  gathered = run()
  for name, x, y in zip(("o", "lse", "dq", "dk", "dv"), direct, gathered):
    np.testing.assert_array_equal(x, y, err_msg=name)


@pytest.mark.parametrize("spatial,kernel,dv,path", [
    ((24, 16), 3, 64, "image"), ((24, 16), 3, 128, "gather"),
    ((192,), 5, 64, "sequence")])
def test_interpret_reads_only_listed_tiles(spatial, kernel, dv, path):
  # 2-D: 24 x 16 tokens in 8 x 8 tiles (3 x 2), kernel 3: query tile 0 lists
  # the four tiles of rows 0..15 only (1-D: 192 tokens, kernel 5: tiles 0
  # and 1 of 3). NaN keys/values in rows 16..23 (tokens 128..191) would
  # reach its outputs through any step that loaded or computed an unlisted
  # tile (0 * NaN = NaN); they must stay finite and exact. D != V sends the
  # same plan down the gather path.
  r = len(spatial)
  opts = dict(kernel_size=(kernel,) * r, dilation=(1,) * r, stride=(1,) * r,
              is_causal=(False,) * r, scale=0.125)
  plan = _plan(spatial, kernel, 1, 1, False, None)
  listed = plan.kv_tiles[0, :plan.kv_count[0]]
  assert sorted(listed.tolist()) == ([0, 1, 2, 3] if r == 2 else [0, 1])
  q, k, v, _ = _inputs(spatial, h=2, hkv=1, dv=dv, seed=2)
  assert na.io_path(q, k, v, **{n: opts[n] for n in (
      "kernel_size", "dilation", "stride", "is_causal")}) == path
  cut = 16 if r == 2 else 128
  poison = lambda x: x.at[:, cut:].set(jnp.nan)
  o = na.neighborhood_attention(q, poison(k), poison(v), interpret=True,
                                **opts)
  want = oracle.neighborhood_attention(*_f32(q, k, v), **opts)
  own = (slice(None), slice(0, 8), slice(0, 8)) if r == 2 else (
      slice(None), slice(0, 64))
  _check_close(o[own], want[own], "o of query tile 0")
  assert np.isnan(np.asarray(o[:, cut - 1:], np.float32)).any()


def test_interpret_dilated_image_reads_only_listed_tiles():
  # 48 x 16, dilation 2: four 24 x 8 groups of 3 x 1 tiles (group g0, g1 =
  # tiles 3 (2 g0 + g1) + 0..2), kernel 3: query tile 0 (group (0, 0), its
  # rows 0..7) lists tiles 0 and 1 only (group rows 0..15: image rows 0, 2,
  # .., 30, even columns). NaN keys/values everywhere else (the other
  # groups and tile 2) must not reach its outputs.
  spatial = (48, 16)
  opts = dict(kernel_size=(3, 3), dilation=(2, 2), stride=(1, 1),
              is_causal=(False, False), scale=0.125)
  plan = _plan(spatial, 3, 2, 1, False, None)
  assert sorted(plan.kv_tiles[0, :plan.kv_count[0]].tolist()) == [0, 1]
  q, k, v, _ = _inputs(spatial, h=2, hkv=1, seed=2)
  assert na.io_path(q, k, v, **{n: opts[n] for n in (
      "kernel_size", "dilation", "stride", "is_causal")}) == "image"
  rows, cols = np.meshgrid(np.arange(48), np.arange(16), indexing="ij")
  keep = (rows % 2 == 0) & (cols % 2 == 0) & (rows < 32)
  poison = lambda x: jnp.where(keep[None, :, :, None, None], x, jnp.nan
                               ).astype(x.dtype)
  o = na.neighborhood_attention(q, poison(k), poison(v), interpret=True,
                                **opts)
  want = oracle.neighborhood_attention(*_f32(q, k, v), **opts)
  own = (slice(None), slice(0, 16, 2), slice(0, 16, 2))
  _check_close(o[own], want[own], "o of query tile 0")
  assert np.isnan(np.asarray(o, np.float32)).any()


# --------------------------------------------------------------- lowering ---


def _export(fn, spatial, h=16, hkv=16, d=128, dv=128, dtype=jnp.bfloat16):
  sds = jax.ShapeDtypeStruct
  args = (sds((2, *spatial, h, d), dtype), sds((2, *spatial, hkv, d), dtype),
          sds((2, *spatial, hkv, dv), dtype))
  return jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)


def _na(spatial, kernel, dilation=1, stride=1, causal=False, scale=0.088):
  r = len(spatial)
  return lambda q, k, v: na.neighborhood_attention(
      q, k, v, kernel_size=(kernel,) * r, dilation=(dilation,) * r,
      stride=(stride,) * r, is_causal=(causal,) * r, scale=scale)


def _vjp(fn):
  def run(q, k, v):
    o, pull = jax.vjp(fn, q, k, v)
    return (o, *pull(jnp.ones_like(o)))
  return run


# (spatial, kernel, dilation, causal, path)
_TARGETS = [((128, 128), 7, 2, False, "image"),
            ((128, 128), 13, 2, False, "image"),
            ((120, 88), 7, 2, False, "gather"),   # 88 % 16 != 0
            ((16, 32, 32), 7, 1, False, "gather"),
            ((128, 128), 13, 1, False, "image"),
            ((16384,), 129, 1, True, "sequence")]


@pytest.mark.parametrize("spatial,kernel,dilation,causal,path", _TARGETS)
def test_forward_and_vjp_lower_for_cuda(spatial, kernel, dilation, causal,
                                        path):
  assert _path(spatial, kernel, dilation, d=128, dv=128) == path
  fn = _na(spatial, kernel, dilation, causal=causal)
  exported = _export(fn, spatial)
  text = exported.mlir_module()
  assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 1
  # The direct paths read and write [B, *S, H, D] itself: no XLA gather.
  assert ("stablehlo.gather" in text) == (path == "gather")
  (out,) = exported.out_avals
  assert out.shape == (2, *spatial, 16, 128) and out.dtype == jnp.bfloat16
  exported = _export(_vjp(fn), spatial)
  text = exported.mlir_module()
  # forward (with lse), dq and dk/dv kernels.
  assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 3
  assert ("stablehlo.gather" in text) == (path == "gather")
  # The gather path's VJP gathers back (permute.py), never scatter-adds.
  assert "scatter" not in text
  assert [a.shape for a in exported.out_avals] == [(2, *spatial, 16, 128)] * 4


@pytest.mark.parametrize("spatial,kernel", [((40, 72), 9), ((1000,), 65)])
def test_direct_gqa_lowers_for_cuda(spatial, kernel):
  # Direct path with GQA: float32 dk/dv leave the kernel in plan rows and
  # are reordered by a transpose / slice, still no gather; float16.
  assert _path(spatial, kernel, d=64, dv=64) != "gather"
  fn = _na(spatial, kernel, causal=len(spatial) == 1)
  exported = _export(_vjp(fn), spatial, h=8, hkv=2, d=64, dv=64,
                     dtype=jnp.float16)
  text = exported.mlir_module()
  assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 3
  assert "stablehlo.gather" not in text
  assert [a.shape for a in exported.out_avals] == [
      (2, *spatial, 8, 64), (2, *spatial, 8, 64), (2, *spatial, 2, 64),
      (2, *spatial, 2, 64)]


def test_gqa_causal_stride_lowers_for_cuda():
  # GQA: dk/dv leave the kernel in float32 per query head; D != V; f16.
  fn = _na((40, 72), 9, dilation=2, stride=3, causal=True)
  exported = _export(_vjp(fn), (40, 72), h=8, hkv=2, d=64, dv=128,
                     dtype=jnp.float16)
  assert len(re.findall(r"custom_call @mosaic_gpu",
                        exported.mlir_module())) == 3
  assert [a.shape for a in exported.out_avals] == [
      (2, 40, 72, 8, 128), (2, 40, 72, 8, 64), (2, 40, 72, 2, 64),
      (2, 40, 72, 2, 128)]


# -------------------------------------------------------------- validation ---


@pytest.mark.parametrize("case,match", [
    ("float32", r"q.dtype is 'float32'; expected bfloat16 or float16"),
    ("head_dim", r"q.shape\[-1\] \(D\) is 96"),
    ("v_dim", r"v.shape\[-1\] \(V\) is 32"),
    ("groups", r"\(Hkv\) is 2; expected a divisor of H=3"),
    ("k_shape", r"k.shape is \(1, 8, 9, 2, 64\)"),
    ("mixed", r"k.dtype/v.dtype"),
    ("rank", r"q.shape is \(1, 64, 64\)"),
    ("tile", r"tile_shape is \(4, 8\); expected tokens per axis of volume 64"),
    ("kernel", r"kernel_size"),
    ("causal", r"is_causal is \(0, 1\)"),
    ("scale", r"scale is None"),
])
def test_rejects_bad_inputs(case, match):
  spatial, h, hkv, d, dv, dtype = (8, 8), 4, 2, 64, 64, jnp.bfloat16
  kw = dict(kernel_size=(3, 3), dilation=(1, 1), stride=(1, 1),
            is_causal=(False, False), scale=0.125)
  if case == "float32":
    dtype = jnp.float32
  elif case == "head_dim":
    d = 96
  elif case == "v_dim":
    dv = 32
  elif case == "groups":
    h = 3
  elif case == "tile":
    kw["tile_shape"] = (4, 8)
  elif case == "kernel":
    kw["kernel_size"] = (3, 9)
  elif case == "causal":
    kw["is_causal"] = (0, 1)
  elif case == "scale":
    kw["scale"] = None
  q = jnp.zeros((1, *spatial, h, d), dtype)
  k = jnp.zeros((1, 8, 9 if case == "k_shape" else 8, hkv, d), dtype)
  v = jnp.zeros((1, 8, 9 if case == "k_shape" else 8, hkv, dv),
                jnp.float16 if case == "mixed" else dtype)
  if case == "rank":
    q = jnp.zeros((1, 64, 64), dtype)
  with pytest.raises(ValueError, match=match):
    na.neighborhood_attention(q, k, v, **kw)


def test_supports():
  assert na.supports(128, 128, jnp.bfloat16)
  assert na.supports(64, 128, jnp.float16)
  assert not na.supports(96, 96, jnp.bfloat16)
  assert not na.supports(128, 128, jnp.float32)


# ------------------------------------------------------------- on the GPU ---


@gpu_only
@pytest.mark.parametrize("spatial,kernel,dilation,stride,causal,hkv,path", [
    ((64, 96), 7, 2, 1, False, 4, "image"),        # dilated image
    ((60, 88), 7, 2, 1, False, 4, "gather"),       # 88 % (8 * 2) != 0
    ((64, 64), 13, 1, 1, True, 2, "image"),
    ((128, 128), 13, 1, 1, False, 4, "image"),
    ((100, 128), 8, 1, 8, False, 2, "image"),      # ragged Hs, GNA
    ((1000,), 129, 1, 1, True, 4, "sequence"),
    ((16, 32, 32), 7, 1, 1, False, 4, "gather"),
])
def test_gpu_matches_xla(spatial, kernel, dilation, stride, causal, hkv,
                         path):
  h, d = 4, 128
  q, k, v, w = _inputs(spatial, h=h, hkv=hkv, d=d, dv=d, b=2, seed=3)
  opts = dict(kernel_size=kernel, dilation=dilation, stride=stride,
              is_causal=causal, scale=d ** -0.5)
  assert na.io_path(q, k, v, **{n: opts[n] for n in (
      "kernel_size", "dilation", "stride", "is_causal")}) == path
  o, grads = jax.jit(lambda q, k, v: _value_and_grads(
      lambda q, k, v: na.neighborhood_attention(q, k, v, **opts),
      q, k, v, w))(q, k, v)
  with jax.default_matmul_precision("highest"):   # no TF32 in the reference
    want_o, want_grads = jax.jit(lambda q, k, v: _value_and_grads(
        lambda q, k, v: al.neighborhood_attention(
            q, k, v, implementation="xla", **opts), q, k, v, w))(
                *_f32(q, k, v))
  assert o.shape == (2, *spatial, h, d) and o.dtype == jnp.bfloat16
  _check_close(o, want_o, "o")
  for name, g, g_ref in zip(("dq", "dk", "dv"), grads, want_grads):
    _check_close(g, g_ref, name)
