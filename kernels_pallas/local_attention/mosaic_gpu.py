"""Block-sparse 1-D sliding-window (local) attention for Hopper GPUs, forward
and backward, as Mosaic GPU (Pallas) kernels with a `jax.custom_vjp`.

For q [B, T, H, D], k [B, T, Hkv, D], v [B, T, Hkv, V] (query head h reads
kv head h // (H // Hkv)), query i sees key j iff

  i - left <= j <= i + right  and  0 <= j < T,

and, with s_ij = scale * q_i . k_j over the visible j only,

  o_i   = sum_j p_ij v_j,        p_ij = exp(s_ij - lse_i),
  lse_i = log sum_j exp(s_ij)    (saved for the backward).

Backward (dO the output cotangent, delta_i = dO_i . o_i, computed by the dq
kernel from the dO and o tiles it loads, and read by the dk/dv kernel):

  dp_ij = dO_i . v_j,   ds_ij = p_ij (dp_ij - delta_i),
  dq_i  = scale sum_j ds_ij k_j,
  dk_j  = scale sum_i ds_ij q_i,   dv_j = sum_i p_ij dO_i.

Block sparsity. T is zero-padded to a multiple of 128 (two blocks) and cut
into tiles of 64 queries / 64 keys. The keys some real query of query tile
[q0, q0 + 64) sees form the interval [max(0, q0 - left), min(q1 + right,
T - 1)] (q1 = its last real query), so a CTA visits only the key tiles

  kv_start = max(0, q0 - left) // 64,
  kv_end   = min(q1 + right, T - 1) // 64 + 1

(`tile_range`); symmetrically a key tile is reached by the query tiles of
`tile_range` with (left, right) swapped. A (query tile, key tile) pair is
*interior* when every query of the tile sees every key of the tile
(k0 >= q0 + 63 - left, k0 + 63 <= q0 + right, k0 + 63 < T); only the other
(edge) pairs evaluate the band mask. Tiles outside the range take no part in
the math (see below for the one load a skipped step still issues).

Kernels. The forward and dq kernels have one warpgroup = one CTA per
(query tile, head, batch), grid (tiles, H, B); each pipeline is a
`plgpu.emit_pipeline` over a static number of steps (the largest range of
any CTA); step i loads tile start + i (clamped to the last tile) with TMA,
double-buffered, and a CTA whose range is shorter skips its extra steps
(`lax.cond`, no math; the TMA load of such a step, a clamped tile, still
happens and is ignored: only CTAs near the sequence ends have shorter
ranges). The dk/dv kernel is warp-specialized
(`plgpu.emit_pipeline_warp_specialized`): a CTA holds two key tiles, one per
compute warpgroup, and a third warpgroup streams the union of their query
tile ranges (`_cta_range`), which both compute warpgroups read, each
skipping the tiles outside its own range. Its two [64, D] float32
accumulators per warpgroup kept the one-warpgroup version at one CTA per SM;
two compute warpgroups per CTA give the SM two again, and halve the query
tile loads (1.5x on the H200, BENCHMARKS.md section 4b). The same split was
slower for the forward and dq kernels, which already fit two CTAs per SM.
All matmuls are wgmma with float32 accumulation; probabilities are rounded
to the input dtype before P V, dS K etc. as in FlashAttention.

  forward: per query tile, the online softmax over its key tiles (base 2:
    m, l and the saved lse are in units of log2); o and lse via TMA stores.
    Two kernels (`forward=`): "single", the one-warpgroup CTA above, and
    "warp_specialized" (`_forward_ws`), where a CTA holds two query tiles
    (one per compute warpgroup), a TMA warpgroup streams [128, D] key and
    value tiles over the union of their ranges, and the two compute
    warpgroups take turns on the tensor cores (ping-pong, `common.Turns`)
    so one's softmax runs under the other's matmuls. Its 128-key tiles
    visit more masked keys at narrow windows; "auto" (the default) picks it
    for windows left + right + 1 >= _WS_MIN_WIDTH.
  dq:      per query tile, over the same key tiles: p from lse, dp = dO V^T;
    first delta = rowsum(dO * o) of its tile, an output for dk/dv.
  dk/dv:   per key tile and QUERY head, over the query tiles reaching it;
    with GQA the H // Hkv heads of a group are summed in XLA (float32).
    That is the default (`backward="split"`). The option
    `backward="persistent"` (`_backward_dkv_persistent`) runs the same tile
    math from persistent CTAs, one per SM: each walks its share of the (key
    tile pair, kv head, batch) items through one pipeline, the group's
    query heads one after another (so GQA's sum stays in the accumulators
    and dk, dv leave in the input dtype), with the next item's K, V
    prefetched and the finished item's dk, dv stored while the next one
    computes. It hides the one-shot CTA's start and end, but its
    accumulators must restart per item without letting a NaN through, and
    that reset costs about what persistence saves: on the H100 the op's
    forward + backward is within 1% of the split one at windows 128 and
    512 and 6% slower at 2048 (BENCHMARKS.md sections 4m, 4n).
  fused (opt-in, `backward="fused"`): the dk/dv kernel that also adds each
    pair's dS K into a float32 dq buffer by TMA reduce-add (five tile
    matmuls per pair instead of seven; delta from XLA). Slower than the
    split backward on the H200 and the H100 (BENCHMARKS.md sections 4h,
    4k, 4n: 1.2x its time with dq's product in 64-column halves), hence
    not the default.
  Option `pingpong=True`: the dk/dv kernel's two compute warpgroups take
    turns on the tensor cores (FlashAttention-3's schedule, `common.Turns`);
    no gain on the H200 (BENCHMARKS.md section 4i), so off by default.

Masked scores are a large finite negative (not -inf), so a row whose first
tiles are all masked never takes inf - inf; its junk sums are scaled by
exp2(-1e30 - m) = 0 once a visible key arrives (every real query sees
itself). Padded queries (rows >= T) are computed and sliced off; their
output cotangent is 0, so they add nothing to dk/dv.

Supported: bfloat16/float16 inputs (float32 raises ValueError), D and V in
(64, 128) (other head dims raise ValueError: no zero-padding here), any
T >= 1, block_q = block_kv = 64.

Interpret mode (`interpret=True`: Mosaic GPU's CPU interpreter, jax 0.11.2)
runs the same kernels with two differences it forces: wgmma A operands that
live in registers on the GPU (P, dS) go through SMEM scratch, and the
accumulators start at zero with the carried value added afterwards (no
`run_state` there).
"""

from __future__ import annotations

import functools
import operator

import jax
from jax import lax
import jax.experimental.pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from kernels_pallas import mosaic_gpu_common as common

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
_BLOCK = 64
_WGS = 2            # compute warpgroups of the dk/dv kernel, a key tile each
_MEMORY_REGS = 40   # registers of its TMA warpgroup
_PAD = _WGS * _BLOCK   # T is padded to a multiple of this
_LOG2E = common.LOG2E
_MASK = common.MASK   # masked (log2-scaled) score; finite on purpose (docstring)


def supports(d: int, dv: int, dtype) -> bool:
  """Whether the kernels take head dims (d, dv) and this input dtype."""
  return (d in SUPPORTED_HEAD_DIMS and dv in SUPPORTED_HEAD_DIMS
          and jnp.dtype(dtype) in map(jnp.dtype, SUPPORTED_DTYPES))


def tile_range(tile, *, t, back, ahead, block_src=_BLOCK, block_dst=_BLOCK,
               maximum=max, minimum=min):
  """[start, end) of the destination tiles that tile `tile` of the source
  axis reaches, where source position i reaches destination positions
  [i - back, i + ahead] ∩ [0, t).

  Query tile -> key tiles: back=left, ahead=right. Key tile -> query tiles:
  back=right, ahead=left. Works on Python ints and (with maximum=jnp.maximum,
  minimum=jnp.minimum) on traced int32 scalars.
  """
  first = tile * block_src
  last = minimum(first + block_src, t) - 1       # last real position
  start = maximum(first - back, 0) // block_dst
  end = minimum(last + ahead, t - 1) // block_dst + 1
  return start, end


def _interior(q0, k0, *, t, left, right, block_q, block_kv):
  """Whether every query in [q0, q0 + block_q) sees every key of
  [k0, k0 + block_kv)."""
  return ((k0 >= q0 + block_q - 1 - left) & (k0 + block_kv - 1 <= q0 + right)
          & (k0 + block_kv - 1 < t))


def _max_steps(n_src, **kw):
  return max(e - s for s, e in (tile_range(i, **kw) for i in range(n_src)))


_products = common.products
_TILED = common.TILED
# [rows, 32 * k] float32 SMEM tiles, 128-byte swizzled: a warp's stores of a
# WGMMA-layout float32 array then spread over all banks (into a plain
# row-major [64, 128] float32 buffer, the 8 rows a warp writes at once sit
# on the same banks).
_TILED32 = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))
_WGMMA = common.WGMMA
_ROWS = common.ROWS
_COLS = common.COLS
_PARAMS = common.LANE_PARAMS


def _visible(row0, col0, shape, *, t, left, right, keys_on_rows):
  """[bq, bk] (or [bk, bq] if keys_on_rows) band mask in the WGMMA layout."""
  r = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=_WGMMA) + row0
  c = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=_WGMMA) + col0
  qi, kj = (c, r) if keys_on_rows else (r, c)
  return (kj >= qi - left) & (kj <= qi + right) & (kj < t)


_bcast = common.bcast
_a_operand = common.a_operand


_skip_or, _edge_mask = common.skip_or, common.edge_mask


# ---------------------------------------------------------------- forward ---


def _online_softmax(s, m, l, acc, interior, visible):
  """One key tile of the online softmax: s [bq, bk] scores in log2 units,
  masked where not visible() unless `interior`; the running row max m and
  sum l [bq] and the output accumulator acc [bq, V] -> (m, l, acc rescaled
  to the new max, p [bq, bk] float32)."""
  s = _edge_mask(s, interior, visible, _MASK)
  m_new = jnp.maximum(m, s.max(axis=1))
  alpha = jnp.exp2(m - m_new)
  p = jnp.exp2(s - _bcast(m_new, s.shape, 0))
  l = l * alpha + p.sum(axis=1)
  return m_new, l, acc * _bcast(alpha, acc.shape, 0), p


def _forward(q, k, v, *, t, left, right, scale, interpret):
  """q [B, Tp, H, D] (Tp % 128 == 0) -> (o [B, Tp, H, V] q.dtype,
  lse [B, H, Tp] float32 in log2 units of the scaled scores)."""
  b, tp, h, d = q.shape
  hkv, dv = k.shape[2], v.shape[-1]
  group = h // hkv
  bq = bk = _BLOCK
  n = tp // bq
  dtype = q.dtype
  c = float(scale) * _LOG2E
  kw = dict(t=t, back=left, ahead=right, block_src=bq, block_dst=bk)
  max_steps = _max_steps(n, **kw)
  interp = common.interpret_params(interpret)

  def swa_forward(q_ref, k_ref, v_ref, o_ref, lse_ref, q_smem, o_smem,
                  lse_smem, bar, *maybe_p):
    p_smem = maybe_p[0] if maybe_p else None
    qt, hh, bb = (lax.axis_index(a) for a in ("q", "heads", "batch"))
    kvh = lax.div(hh, jnp.array(group, hh.dtype))
    q0 = qt * bq
    start, end = tile_range(qt, **kw, maximum=jnp.maximum,
                            minimum=jnp.minimum)
    plgpu.copy_gmem_to_smem(q_ref.at[bb, pl.ds(q0, bq), hh], q_smem, bar)
    plgpu.barrier_wait(bar)

    def body(idx, k_smem, v_smem, carry):
      (i,) = idx
      kt = start + i

      def step(carry, interior):
        m, l, acc = carry
        (s,) = _products(
            lambda r: plgpu.wgmma(r, q_smem, k_smem.transpose((1, 0))),
            [(bq, bk)])
        m, l, acc, p = _online_softmax(
            s * c, m, l, acc, interior, lambda: _visible(
                q0, kt * bk, (bq, bk), t=t, left=left, right=right,
                keys_on_rows=False))
        p16 = _a_operand(p.astype(dtype), p_smem)
        (acc,) = common.accumulate(lambda r: plgpu.wgmma(r, p16, v_smem),
                                   (acc,), interp)
        return m, l, acc

      interior = _interior(q0, kt * bk, t=t, left=left, right=right,
                           block_q=bq, block_kv=bk)
      return _skip_or(kt < end, interior, step, carry)

    clamp = lambda i: (jnp.minimum(start + i, n - 1), 0)
    init = (
        plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), _ROWS),
        plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), _ROWS),
        plgpu.layout_cast(jnp.zeros((bq, dv), jnp.float32), _WGMMA),
    )
    pipeline = plgpu.emit_pipeline(
        body, grid=(max_steps,),
        in_specs=[plgpu.BlockSpec((bk, d), clamp, transforms=_TILED),
                  plgpu.BlockSpec((bk, dv), clamp, transforms=_TILED)],
        out_specs=[], max_concurrent_steps=max(1, min(2, max_steps)),
        init_carry=init)
    m, l, acc = pipeline(k_ref.at[bb, :, kvh], v_ref.at[bb, :, kvh])
    o_smem[...] = (acc / _bcast(l, (bq, dv), 0)).astype(dtype)
    lse_smem[...] = m + jnp.log(l) * _LOG2E
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[bb, pl.ds(q0, bq), hh])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bb, hh, pl.ds(q0, bq)])
    plgpu.wait_smem_to_gmem(0)

  scratch = [plgpu.SMEM((bq, d), dtype, transforms=_TILED),
             plgpu.SMEM((bq, dv), dtype, transforms=_TILED),
             plgpu.SMEM((bq,), jnp.float32),
             plgpu.Barrier()]
  if interp is not None:
    scratch.append(plgpu.SMEM((bq, bk), dtype, transforms=_TILED))
  return plgpu.kernel(
      swa_forward,
      out_type=(jax.ShapeDtypeStruct((b, tp, h, dv), dtype),
                jax.ShapeDtypeStruct((b, h, tp), jnp.float32)),
      grid=(n, h, b), grid_names=("q", "heads", "batch"),
      scratch_types=tuple(scratch), compiler_params=_PARAMS,
      interpret=interp,
  )(q, k, v)


_BLOCK_K_WS = 128   # key tile of the warp-specialized forward


def _forward_ws(q, k, v, *, t, left, right, scale, interpret, pingpong=True):
  """`_forward`'s result from a warp-specialized kernel: a CTA holds two
  64-row query tiles (one per compute warpgroup) and a third warpgroup
  streams [128, D] key and value tiles over the union of their ranges (each
  compute warpgroup skips the tiles outside its own); the same online
  softmax per step. pingpong: the two compute warpgroups take turns on the
  tensor cores (`common.Turns`: after issuing S = Q K^T, and before P V),
  so one's softmax runs under the other's matmuls."""
  b, tp, h, d = q.shape
  hkv, dv = k.shape[2], v.shape[-1]
  group = h // hkv
  bq, bk = _BLOCK, _BLOCK_K_WS
  n_k = tp // bk
  dtype = q.dtype
  c = float(scale) * _LOG2E
  kw = dict(t=t, back=left, ahead=right, block_src=bq, block_dst=bk)
  steps = _cta_steps(tp // bq // _WGS, **kw)
  interp = common.interpret_params(interpret)
  jnp_range = lambda tile: tile_range(tile, **kw, maximum=jnp.maximum,
                                      minimum=jnp.minimum)

  def swa_forward_ws(q_ref, k_ref, v_ref, o_ref, lse_ref, q_smem2, o_smem2,
                     lse_smem2, bars, turns_bar, *maybe_p):
    wg, hh, kvh, bb, qt, start, _, own_start, own_end = common.cta(
        "q", group, jnp_range, _WGS)   # qt: this warpgroup's query tile
    q0 = qt * bq
    q_smem, lse_smem = q_smem2.at[wg], lse_smem2.at[wg]
    p_smem = maybe_p[0].at[wg] if maybe_p else None
    rows = pl.ds(q0, bq)
    turns = common.Turns(turns_bar, wg)

    def compute(pipeline):   # per compute warpgroup, around its steps
      plgpu.copy_gmem_to_smem(q_ref.at[bb, rows, hh], q_smem, bars.at[wg])
      plgpu.barrier_wait(bars.at[wg])
      turns.begin()
      m, l, acc = pipeline((
          plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), _ROWS),
          plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), _ROWS),
          plgpu.layout_cast(jnp.zeros((bq, dv), jnp.float32), _WGMMA)))
      turns.end()
      o_smem = q_smem if o_smem2 is None else o_smem2.at[wg]
      o_smem[...] = (acc / _bcast(l, (bq, dv), 0)).astype(dtype)  # Q done
      lse_smem[...] = m + jnp.log(l) * _LOG2E
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, o_ref.at[bb, rows, hh])
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bb, hh, rows])
      plgpu.wait_smem_to_gmem(0)

    def body(idx, k_smem, v_smem, carry):
      kt = start + idx[0]

      def step(carry, interior):
        m, l, acc = carry
        def qk(r):
          plgpu.wgmma(r, q_smem, k_smem.transpose((1, 0)))
          turns.turn()
        (s,) = _products(qk, [(bq, bk)])
        m, l, acc, p = _online_softmax(
            s * c, m, l, acc, interior, lambda: _visible(
                q0, kt * bk, (bq, bk), t=t, left=left, right=right,
                keys_on_rows=False))
        p16 = _a_operand(p.astype(dtype), p_smem)
        turns.turn()
        (acc,) = common.accumulate(lambda r: plgpu.wgmma(r, p16, v_smem),
                                   (acc,), interp)
        return m, l, acc

      valid = (kt >= own_start) & (kt < own_end)
      interior = _interior(q0, kt * bk, t=t, left=left, right=right,
                           block_q=bq, block_kv=bk)
      return turns.skip_or(valid, interior, step, carry)

    clamp = lambda i: (jnp.minimum(start + i, n_k - 1), 0)
    pipeline = plgpu.emit_pipeline_warp_specialized(
        body, grid=(steps,), memory_registers=_MEMORY_REGS,
        in_specs=[plgpu.BlockSpec((bk, d), clamp, transforms=_TILED),
                  plgpu.BlockSpec((bk, dv), clamp, transforms=_TILED)],
        max_concurrent_steps=max(1, min(2, steps)), num_compute_wgs=_WGS,
        wg_axis="wg", compute_context=compute)
    pipeline(k_ref.at[bb, :, kvh], v_ref.at[bb, :, kvh])

  scratch = [plgpu.SMEM((_WGS, bq, d), dtype, transforms=_TILED),
             None if d == dv else plgpu.SMEM((_WGS, bq, dv), dtype,
                                             transforms=_TILED),   # o
             plgpu.SMEM((_WGS, bq), jnp.float32),
             plgpu.Barrier(num_barriers=_WGS),
             common.Turns.scratch(pingpong)]
  if interp is not None:
    scratch.append(plgpu.SMEM((_WGS, bq, bk), dtype, transforms=_TILED))
  return plgpu.kernel(
      swa_forward_ws,
      out_type=(jax.ShapeDtypeStruct((b, tp, h, dv), dtype),
                jax.ShapeDtypeStruct((b, h, tp), jnp.float32)),
      grid=(tp // bq // _WGS, h, b), grid_names=("q", "heads", "batch"),
      num_threads=_WGS + 1, thread_name="wg",
      scratch_types=tuple(scratch), compiler_params=_PARAMS,
      interpret=interp,
  )(q, k, v)


# --------------------------------------------------------------- backward ---


def _backward_dq(q, k, v, do, o, lse, *, t, left, right, scale, interpret):
  """(dq [B, Tp, H, D] q.dtype, delta [B, H, Tp] float32); lse [B, H, Tp]
  float32. delta_i = dO_i . o_i is computed here from the dO and o tiles the
  CTA loads anyway (the dk/dv kernel reads it), not by a separate XLA pass."""
  b, tp, h, d = q.shape
  hkv, dv = k.shape[2], v.shape[-1]
  group = h // hkv
  bq = bk = _BLOCK
  n = tp // bq
  dtype = q.dtype
  c = float(scale) * _LOG2E
  kw = dict(t=t, back=left, ahead=right, block_src=bq, block_dst=bk)
  max_steps = _max_steps(n, **kw)
  interp = common.interpret_params(interpret)

  def swa_dq(q_ref, k_ref, v_ref, do_ref, o_ref, lse_ref, dq_ref, delta_ref,
             q_smem, do_smem, dq_smem, bars, *extra):
    o_smem = dq_smem if dv == d else extra[0]   # o is read before dq is written
    ds_smem = extra[-1] if interp is not None else None
    qt, hh, bb = (lax.axis_index(a) for a in ("q", "heads", "batch"))
    kvh = lax.div(hh, jnp.array(group, hh.dtype))
    q0 = qt * bq
    start, end = tile_range(qt, **kw, maximum=jnp.maximum,
                            minimum=jnp.minimum)
    rows = pl.ds(q0, bq)
    plgpu.copy_gmem_to_smem(q_ref.at[bb, rows, hh], q_smem, bars.at[0])
    plgpu.copy_gmem_to_smem(do_ref.at[bb, rows, hh], do_smem, bars.at[1])
    plgpu.copy_gmem_to_smem(o_ref.at[bb, rows, hh], o_smem, bars.at[2])
    lse_i = plgpu.load(lse_ref.at[bb, hh, rows], layout=_ROWS,
                       optimized=False)
    plgpu.barrier_wait(bars.at[1])
    plgpu.barrier_wait(bars.at[2])
    delta_i = (plgpu.load(do_smem, layout=_WGMMA).astype(jnp.float32)
               * plgpu.load(o_smem, layout=_WGMMA).astype(jnp.float32)
               ).sum(axis=1)                                  # [bq] rows
    # Straight to GMEM: staged through a 256-byte SMEM buffer the kernel was
    # 14-18% slower on the H200, most likely one CTA per SM instead of two
    # (two take ~226 of its 228 KiB; BENCHMARKS.md section 4d).
    delta_ref.at[bb, hh, rows][...] = delta_i
    plgpu.barrier_wait(bars.at[0])

    def body(idx, k_smem, v_smem, dq_acc):
      (i,) = idx
      kt = start + i

      def step(dq_acc, interior):
        def mma(s_ref, dp_ref):
          plgpu.wgmma(s_ref, q_smem, k_smem.transpose((1, 0)))
          plgpu.wgmma(dp_ref, do_smem, v_smem.transpose((1, 0)))
        s, dp = _products(mma, [(bq, bk), (bq, bk)])
        p = jnp.exp2(s * c - _bcast(lse_i, (bq, bk), 0))
        p = _edge_mask(p, interior, lambda: _visible(
            q0, kt * bk, (bq, bk), t=t, left=left, right=right,
            keys_on_rows=False), 0.0)
        ds = p * (dp - _bcast(delta_i, (bq, bk), 0))
        ds16 = _a_operand(ds.astype(dtype), ds_smem)
        (dq_acc,) = common.accumulate(
            lambda r: plgpu.wgmma(r, ds16, k_smem), (dq_acc,), interp)
        return dq_acc

      interior = _interior(q0, kt * bk, t=t, left=left, right=right,
                           block_q=bq, block_kv=bk)
      return _skip_or(kt < end, interior, step, dq_acc)

    clamp = lambda i: (jnp.minimum(start + i, n - 1), 0)
    pipeline = plgpu.emit_pipeline(
        body, grid=(max_steps,),
        in_specs=[plgpu.BlockSpec((bk, d), clamp, transforms=_TILED),
                  plgpu.BlockSpec((bk, dv), clamp, transforms=_TILED)],
        out_specs=[], max_concurrent_steps=max(1, min(2, max_steps)),
        init_carry=plgpu.layout_cast(jnp.zeros((bq, d), jnp.float32),
                                     _WGMMA))
    dq = pipeline(k_ref.at[bb, :, kvh], v_ref.at[bb, :, kvh])
    dq_smem[...] = (dq * float(scale)).astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dq_smem, dq_ref.at[bb, rows, hh])
    plgpu.wait_smem_to_gmem(0)

  scratch = [plgpu.SMEM((bq, d), dtype, transforms=_TILED),
             plgpu.SMEM((bq, dv), dtype, transforms=_TILED),
             plgpu.SMEM((bq, d), dtype, transforms=_TILED),
             plgpu.Barrier(num_barriers=3)]
  if dv != d:
    scratch.append(plgpu.SMEM((bq, dv), dtype, transforms=_TILED))
  if interp is not None:
    scratch.append(plgpu.SMEM((bq, bk), dtype, transforms=_TILED))
  return plgpu.kernel(
      swa_dq, out_type=(jax.ShapeDtypeStruct(q.shape, dtype),
                        jax.ShapeDtypeStruct((b, h, tp), jnp.float32)),
      grid=(n, h, b), grid_names=("q", "heads", "batch"),
      scratch_types=tuple(scratch), compiler_params=_PARAMS,
      interpret=interp,
  )(q, k, v, do, o, lse)


def _dkv_pair(k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, *, k0,
              q0, interior, c, turns, t, left, right):
  """One (key tile k0, query tile q0) pair of the dk/dv kernels, keys on
  rows: (P^T, dS^T) [64, 64] float32 from S^T = K Q^T and dP^T = V dO^T
  (`turns.turn()` after issuing them), masked unless `interior`."""
  def mma(st_ref, dpt_ref):
    plgpu.wgmma(st_ref, k_smem, q_smem.transpose((1, 0)))
    plgpu.wgmma(dpt_ref, v_smem, do_smem.transpose((1, 0)))
    turns.turn()
  shape = (k_smem.shape[0], q_smem.shape[0])
  st, dpt = _products(mma, [shape, shape])
  lse_j = plgpu.load(lse_smem, layout=_COLS)
  delta_j = plgpu.load(delta_smem, layout=_COLS)
  pt = jnp.exp2(st * c - _bcast(lse_j, shape, 1))
  pt = _edge_mask(pt, interior, lambda: _visible(
      k0, q0, shape, t=t, left=left, right=right, keys_on_rows=True), 0.0)
  return pt, pt * (dpt - _bcast(delta_j, shape, 1))


def _cta_range(cta, **kw):
  """[start, end) of the destination tiles that source tiles 2 cta and
  2 cta + 1 (the two compute warpgroups of one CTA) reach together."""
  start, _ = tile_range(_WGS * cta, **kw)
  _, end = tile_range(_WGS * cta + _WGS - 1, **kw)
  return start, end


def _cta_steps(n_cta, **kw):
  return max(e - s for s, e in (_cta_range(c, **kw) for c in range(n_cta)))


def _backward_dkv(q, k, v, do, lse, delta, *, t, left, right, scale,
                  interpret, pingpong=False, dq_acc=None):
  """(dk [B, Tp, H, D], dv [B, Tp, H, V]) per QUERY head, in q.dtype when
  H == Hkv else float32; Tp % 128 == 0 (two key tiles per CTA).

  pingpong: the two compute warpgroups take turns on the tensor cores
  (`common.Turns`: after issuing S^T and dP^T, and before dv's and dk's
  matmuls).

  With `dq_acc` (the fused backward, `_backward_fused`), a zeroed float32
  Ref [B, Tp, H, D], each warpgroup also forms every visited pair's dq
  contribution dS K ([64, D] float32, unscaled; dS^T goes to SMEM, where it
  is dk's A operand, and its transpose dq's) and adds it into dq_acc with a
  TMA reduce-add from a [64, D] float32 SMEM buffer. With GQA that buffer
  also stages dk and dv, so D == V is needed there. Interpret mode has no
  TMA reductions: dq_acc is [2, B, Tp, H, D], one slice per compute
  warpgroup (the two run concurrently and visit the same query tile at the
  same step), added to by a plain GMEM read-modify-write (the interpreter
  runs the grid's CTAs one after another).
  """
  b, tp, h, d = q.shape
  hkv, dv = k.shape[2], v.shape[-1]
  group = h // hkv
  fused = dq_acc is not None
  # The fused dq product in 64-column pieces, each reduce-added on its own
  # (MHA; with GQA the dq buffer also stages [64, D] dk and dv): at D = 128
  # the kernel took 0.92x / 0.82x the time of whole [64, 128] products on
  # the H100 at w = 512 / 2048 (BENCHMARKS.md section 4n).
  dq_cols = _BLOCK if group == 1 else d
  assert not fused or group == 1 or d == dv, (group, d, dv)
  bq = bk = _BLOCK
  n = tp // bk
  dtype = q.dtype
  out_dtype = dtype if group == 1 else jnp.float32
  c = float(scale) * _LOG2E
  kw = dict(t=t, back=right, ahead=left, block_src=bk, block_dst=bq)
  steps = _cta_steps(n // _WGS, **kw)
  interp = common.interpret_params(interpret)
  jnp_range = lambda tile: tile_range(tile, **kw, maximum=jnp.maximum,
                                      minimum=jnp.minimum)

  def swa_dkv(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
              k_smem2, v_smem2, out_smem2, ds_smem2, bars, turns_bar,
              *maybe_p):
    ct, hh, bb = (lax.axis_index(a) for a in ("kv", "heads", "batch"))
    wg = lax.axis_index("wg")      # the compute warpgroups are 0 and 1
    turns = common.Turns(turns_bar, wg)
    kvh = lax.div(hh, jnp.array(group, hh.dtype))
    start, _ = jnp_range(_WGS * ct)  # the CTA's first query tile
    kt = _WGS * ct + wg              # this warpgroup's key tile
    k0 = kt * bk
    own_start, own_end = jnp_range(kt)
    k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
    ds_smem = None if ds_smem2 is None else ds_smem2.at[wg]
    pt_smem = maybe_p[0].at[wg] if maybe_p else None
    keys = pl.ds(k0, bk)
    staging = out_smem2
    if fused:      # out_smem2 is the dq buffer; it stages dk, dv with GQA
      staging = None if group == 1 else (out_smem2, None)

    def compute(pipeline):   # per compute warpgroup, around its steps
      plgpu.copy_gmem_to_smem(k_ref.at[bb, keys, kvh], k_smem, bars.at[wg])
      plgpu.copy_gmem_to_smem(v_ref.at[bb, keys, kvh], v_smem,
                              bars.at[_WGS + wg])
      plgpu.barrier_wait(bars.at[wg])
      plgpu.barrier_wait(bars.at[_WGS + wg])
      turns.begin()
      dk, dv_ = pipeline(
          (plgpu.layout_cast(jnp.zeros((bk, d), jnp.float32), _WGMMA),
           plgpu.layout_cast(jnp.zeros((bk, dv), jnp.float32), _WGMMA)))
      turns.end()
      if fused:
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # last dq has left
      common.store_dkv(
          (dk * float(scale)).astype(out_dtype), dv_.astype(out_dtype),
          dk_ref.at[bb, keys, hh], dv_ref.at[bb, keys, hh], k_smem=k_smem,
          v_smem=v_smem, staging=staging, wg=wg)

    def add_dq(part, qt, cols):    # the fused backward: dq_acc[rows] += part
      rows = pl.ds(qt * bq, bq)
      if interp is not None:
        dst = dq_acc.at[wg, bb, rows, hh, cols]
        dst[...] = dst[...] + part
        return
      dq_smem = out_smem2.at[wg]
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # previous one left
      dq_smem[...] = part
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(dq_smem, dq_acc.at[bb, rows, hh, cols],
                              reduction_op="add")

    def body(idx, q_smem, do_smem, lse_smem, delta_smem, carry):
      qt = start + idx[0]

      def step(carry, interior):
        dk_acc, dv_acc = carry
        pt, dst = _dkv_pair(k_smem, v_smem, q_smem, do_smem, lse_smem,
                            delta_smem, k0=k0, q0=qt * bq, interior=interior,
                            c=c, turns=turns, t=t, left=left, right=right)
        pt16 = _a_operand(pt.astype(dtype), pt_smem)
        if fused:    # dS^T in SMEM: dk's A operand, transposed dq's
          ds_smem[...] = dst.astype(dtype)
          plgpu.commit_smem()
          dst16 = ds_smem
        else:
          dst16 = _a_operand(dst.astype(dtype), ds_smem)
        turns.turn()
        def acc(dk_ref, dv_ref):
          plgpu.wgmma(dv_ref, pt16, do_smem)
          plgpu.wgmma(dk_ref, dst16, q_smem)
        carry = common.accumulate(acc, (dk_acc, dv_acc), interp)
        if fused:    # [queries, D]: dS K of this pair, dq_cols at a time
          for c0 in range(0, d, dq_cols):
            cols = pl.ds(c0, dq_cols)
            (dq_part,) = _products(
                lambda r, cols=cols: plgpu.wgmma(
                    r, ds_smem.transpose((1, 0)), k_smem.at[:, cols]),
                [(bq, dq_cols)])
            add_dq(dq_part, qt, cols)
        return carry

      valid = (qt >= own_start) & (qt < own_end)
      interior = _interior(qt * bq, k0, t=t, left=left, right=right,
                           block_q=bq, block_kv=bk)
      return turns.skip_or(valid, interior, step, carry)

    clamp = lambda i: (jnp.minimum(start + i, n - 1), 0)
    clamp1 = lambda i: (jnp.minimum(start + i, n - 1),)
    pipeline = plgpu.emit_pipeline_warp_specialized(
        body, grid=(steps,), memory_registers=_MEMORY_REGS,
        in_specs=[plgpu.BlockSpec((bq, d), clamp, transforms=_TILED),
                  plgpu.BlockSpec((bq, dv), clamp, transforms=_TILED),
                  plgpu.BlockSpec((bq,), clamp1),
                  plgpu.BlockSpec((bq,), clamp1)],
        max_concurrent_steps=max(1, min(2, steps)), num_compute_wgs=_WGS,
        wg_axis="wg", compute_context=compute)
    pipeline(q_ref.at[bb, :, hh], do_ref.at[bb, :, hh],
             lse_ref.at[bb, hh], delta_ref.at[bb, hh])

  tile16 = plgpu.SMEM((_WGS, bk, bq), dtype, transforms=_TILED)
  scratch = [plgpu.SMEM((_WGS, bk, d), dtype, transforms=_TILED),
             plgpu.SMEM((_WGS, bk, dv), dtype, transforms=_TILED),
             (plgpu.SMEM((_WGS, bq, dq_cols if group == 1 else d),
                         jnp.float32, transforms=_TILED32)
              if fused
              else common.dkv_staging(group, _WGS, bk, d, dv)),
             tile16 if fused or interp is not None else None,   # dS^T
             plgpu.Barrier(num_barriers=2 * _WGS),
             common.Turns.scratch(pingpong)]
  if interp is not None:
    scratch.append(tile16)                                     # P^T
  return plgpu.kernel(
      swa_dkv,
      out_type=(jax.ShapeDtypeStruct((b, tp, h, d), out_dtype),
                jax.ShapeDtypeStruct((b, tp, h, dv), out_dtype)),
      grid=(n // _WGS, h, b), grid_names=("kv", "heads", "batch"),
      num_threads=_WGS + 1, thread_name="wg",
      scratch_types=tuple(scratch), compiler_params=_PARAMS,
      interpret=interp,
  )(q, k, v, do, lse, delta)


def _resident_ctas(per_sm):
  """CTAs that fit the GPU at once (per_sm per SM): the SM count of the
  first GPU, else (interpret mode, lowering on a CPU host) the H100's 132."""
  try:
    sms = jax.local_devices(backend="gpu")[0].core_count
  except (RuntimeError, AttributeError, IndexError):
    sms = 132
  return per_sm * sms


def _backward_dkv_persistent(q, k, v, do, lse, delta, *, t, left, right,
                             scale, interpret, pingpong=False, ctas=None):
  """(dk [B, Tp, Hkv, D], dv [B, Tp, Hkv, V]) in q.dtype, as
  `_backward_dkv` summed over each group's query heads, from persistent
  CTAs: `ctas` CTAs (default one per SM, the kernel's occupancy) share the
  (key tile pair, kv head, batch) items round-robin, and one warp-
  specialized pipeline runs through all of a CTA's items, each the
  H // Hkv query heads of its group one after another (so the group's sum
  stays in the float32 accumulators). Each compute warpgroup double-buffers
  its K and V tiles: the next item's load is issued at the current item's
  second step, and its dk, dv go out through the finished K, V buffers
  while the next item computes. The one-shot kernel's prologue and
  epilogue (K, V waited for, the first query tiles, the dk/dv stores) are
  exposed there, one CTA per SM having no other CTA to hide them behind."""
  b, tp, h, d = q.shape
  hkv, dv = k.shape[2], v.shape[-1]
  group = h // hkv
  bq = bk = _BLOCK
  n = tp // bk
  n_pairs = n // _WGS
  dtype = q.dtype
  c = float(scale) * _LOG2E
  kw = dict(t=t, back=right, ahead=left, block_src=bk, block_dst=bq)
  steps_h = _cta_steps(n_pairs, **kw)     # query tiles per head
  steps = group * steps_h                 # per item
  items = n_pairs * hkv * b
  n_cta = min(items, ctas or _resident_ctas(1))
  interp = common.interpret_params(interpret)
  jnp_range = lambda tile: tile_range(tile, **kw, maximum=jnp.maximum,
                                      minimum=jnp.minimum)
  q2 = q.reshape(b * tp, h * d)           # tile (bb * n + qt, hh)
  do2 = do.reshape(b * tp, h * dv)
  lse1, delta1 = lse.reshape(-1), delta.reshape(-1)   # tile (bb h + hh) n + qt

  def swa_dkv_persistent(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                         dk_ref, dv_ref, k_smem4, v_smem4, bars, turns_bar,
                         *maybe_tiles):
    cta = lax.axis_index("cta")
    wg = lax.axis_index("wg")      # the compute warpgroups are 0 and 1
    turns = common.Turns(turns_bar, wg)
    n_items = (items - 1 - cta) // n_cta + 1    # items cta, cta + n_cta, ..
    ds_smem, pt_smem = ((maybe_tiles[0].at[wg], maybe_tiles[1].at[wg])
                        if maybe_tiles else (None, None))

    def item(j):       # this CTA's j-th item -> (key tile pair, kv head, b)
      it = cta + j * n_cta
      return it % n_pairs, (it // n_pairs) % hkv, it // (n_pairs * hkv)

    def kv_bar(j, which):     # which: 0 K, 1 V
      return bars.at[((j % 2) * _WGS + wg) * 2 + which]

    def load_kv(j):    # item j's K, V tiles of this warpgroup, slot j % 2
      ct, kvh, bb = item(j)
      keys = pl.ds((_WGS * ct + wg) * bk, bk)
      plgpu.copy_gmem_to_smem(k_ref.at[bb, keys, kvh],
                              k_smem4.at[j % 2, wg], kv_bar(j, 0))
      plgpu.copy_gmem_to_smem(v_ref.at[bb, keys, kvh],
                              v_smem4.at[j % 2, wg], kv_bar(j, 1))

    def locate(s):     # pipeline step -> (item, step in it, query head,
      j, r = s // steps, s % steps   # query tile, key tile pair, kv head, b)
      ct, kvh, bb = item(j)
      start, _ = jnp_range(_WGS * ct)
      return (j, r, kvh * group + r // steps_h, start + r % steps_h, ct, kvh,
              bb)

    def q_tile(s):
      _, _, hh, qt, _, _, bb = locate(s)
      return bb * n + jnp.minimum(qt, n - 1), hh

    def row_tile(s):
      _, _, hh, qt, _, _, bb = locate(s)
      return ((bb * h + hh) * n + jnp.minimum(qt, n - 1),)

    def compute(pipeline):   # per compute warpgroup, around its steps
      load_kv(0)
      turns.begin()
      pipeline(
          (plgpu.layout_cast(jnp.zeros((bk, d), jnp.float32), _WGMMA),
           plgpu.layout_cast(jnp.zeros((bk, dv), jnp.float32), _WGMMA)))
      turns.end()
      plgpu.wait_smem_to_gmem(0)

    def body(idx, q_smem, do_smem, lse_smem, delta_smem, carry):
      j, r, _, qt, ct, kvh, bb = locate(idx[0])
      kt = _WGS * ct + wg              # this warpgroup's key tile
      k0 = kt * bk
      own_start, own_end = jnp_range(kt)
      k_smem, v_smem = k_smem4.at[j % 2, wg], v_smem4.at[j % 2, wg]

      @pl.when(r == 0)
      def _():
        plgpu.barrier_wait(kv_bar(j, 0))
        plgpu.barrier_wait(kv_bar(j, 1))

      # The other slot held item j - 1's K, V and then its dk, dv, stored
      # a step ago: once that store has left, fetch item j + 1's K, V.
      @pl.when(r == min(1, steps - 1))
      def _():
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        pl.when(j + 1 < n_items)(lambda: load_kv(j + 1))

      # A new item restarts the sums by a select at every step: a NaN of one
      # item must not reach the next (0 * carry would carry it). Any reset
      # costs, as it touches the accumulators outside the wgmmas: on the
      # H100 the kernel was 1.2-1.3x slower with a lax.cond at the item's
      # first step, and 3-8% slower with a multiply or a bitwise and than
      # with this select (BENCHMARKS.md section 4n).
      carry = tuple(jnp.where(r == 0, 0.0, a) for a in carry)

      def step(carry, interior):
        dk_acc, dv_acc = carry
        pt, dst = _dkv_pair(k_smem, v_smem, q_smem, do_smem, lse_smem,
                            delta_smem, k0=k0, q0=qt * bq, interior=interior,
                            c=c, turns=turns, t=t, left=left, right=right)
        pt16 = _a_operand(pt.astype(dtype), pt_smem)
        dst16 = _a_operand(dst.astype(dtype), ds_smem)
        turns.turn()
        def acc(dk_ref, dv_ref):
          plgpu.wgmma(dv_ref, pt16, do_smem)
          plgpu.wgmma(dk_ref, dst16, q_smem)
        return common.accumulate(acc, (dk_acc, dv_acc), interp)

      valid = (qt >= own_start) & (qt < own_end)
      interior = _interior(qt * bq, k0, t=t, left=left, right=right,
                           block_q=bq, block_kv=bk)
      dk_acc, dv_acc = turns.skip_or(valid, interior, step, carry)

      @pl.when(r == steps - 1)
      def _store():    # through the item's K, V buffers, done with
        keys = pl.ds(k0, bk)
        k_smem[...] = (dk_acc * float(scale)).astype(dtype)
        v_smem[...] = dv_acc.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[bb, keys, kvh])
        plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[bb, keys, kvh])
      return dk_acc, dv_acc

    pipeline = plgpu.emit_pipeline_warp_specialized(
        body, grid=(n_items * steps,), memory_registers=_MEMORY_REGS,
        in_specs=[plgpu.BlockSpec((bq, d), q_tile, transforms=_TILED),
                  plgpu.BlockSpec((bq, dv), q_tile, transforms=_TILED),
                  plgpu.BlockSpec((bq,), row_tile),
                  plgpu.BlockSpec((bq,), row_tile)],
        max_concurrent_steps=2, num_compute_wgs=_WGS,
        wg_axis="wg", compute_context=compute)
    pipeline(q_ref, do_ref, lse_ref, delta_ref)

  scratch = [plgpu.SMEM((2, _WGS, bk, d), dtype, transforms=_TILED),
             plgpu.SMEM((2, _WGS, bk, dv), dtype, transforms=_TILED),
             plgpu.Barrier(num_barriers=2 * _WGS * 2),
             common.Turns.scratch(pingpong)]
  if interp is not None:     # dS^T, P^T
    scratch += [plgpu.SMEM((_WGS, bk, bq), dtype, transforms=_TILED)] * 2
  return plgpu.kernel(
      swa_dkv_persistent,
      out_type=(jax.ShapeDtypeStruct(k.shape, dtype),
                jax.ShapeDtypeStruct(v.shape, dtype)),
      grid=(n_cta,), grid_names=("cta",),
      num_threads=_WGS + 1, thread_name="wg",
      scratch_types=tuple(scratch), compiler_params=_PARAMS,
      interpret=interp,
  )(q2, k, v, do2, lse1, delta1)


@functools.partial(jax.jit, static_argnames=(
    "t", "left", "right", "scale", "interpret", "pingpong"))  # dq_acc: new_ref
def _backward_fused(q, k, v, do, lse, delta, *, t, left, right, scale,
                    interpret, pingpong=False):
  """(dq [B, Tp, H, D] float32 unscaled, dk, dv): `_backward_dkv` with a
  zeroed dq buffer. Five tile matmuls per visited pair instead of the split
  backward's seven, for the buffer's zeroing and conversion and 32 KiB of
  reduce traffic per pair; delta [B, H, Tp] comes in (XLA). D == V or
  H == Hkv.

  Opt-in (`backward="fused"`): on the H200 the op's forward + backward is
  1.3-1.6x slower with it than with the split backward at every window
  measured, 128 to 2048 (BENCHMARKS.md section 4h).
  """
  b, tp, h, d = q.shape
  interp = common.interpret_params(interpret)
  dq_acc = jax.new_ref(jnp.zeros(
      (b, tp, h, d) if interp is None else (_WGS, b, tp, h, d), jnp.float32))
  dk, dv = _backward_dkv(q, k, v, do, lse, delta, t=t, left=left,
                         right=right, scale=scale, interpret=interpret,
                         pingpong=pingpong, dq_acc=dq_acc)
  dq = dq_acc[...]
  return (dq if interp is None else dq.sum(axis=0)), dk, dv


BACKWARDS = ("split", "persistent", "fused")   # the first is the default
# "auto" picks "warp_specialized" for windows (left + right + 1) of at least
# _WS_MIN_WIDTH keys, "single" (one warpgroup per CTA) below: on the H100 the
# former is 1.01x / 1.02x at 1024 / 2048 (forward alone 1.18x) and 0.94x /
# 0.96x at 128 / 512 (BENCHMARKS.md section 4l).
FORWARDS = ("auto", "single", "warp_specialized")
_WS_MIN_WIDTH = 1024


def _forward_kernel(forward, left, right):
  """The forward kernel function that `forward` (in FORWARDS) names."""
  if forward == "auto":
    forward = ("warp_specialized" if left + right + 1 >= _WS_MIN_WIDTH
               else "single")
  return _forward_ws if forward == "warp_specialized" else _forward


@functools.partial(jax.custom_vjp,
                   nondiff_argnums=(3, 4, 5, 6, 7, 8, 9, 10))
def _attention(q, k, v, t, left, right, scale, forward, backward, pingpong,
               interpret):
  """On T-padded arrays ([B, Tp, *, *], Tp % 128 == 0); t is the real T."""
  o, _ = _forward_kernel(forward, left, right)(
      q, k, v, t=t, left=left, right=right, scale=scale, interpret=interpret)
  return o


def _attention_fwd(q, k, v, t, left, right, scale, forward, backward,
                   pingpong, interpret):
  o, lse = _forward_kernel(forward, left, right)(
      q, k, v, t=t, left=left, right=right, scale=scale, interpret=interpret)
  return o, (q, k, v, o, lse)


def _attention_bwd(t, left, right, scale, forward, backward, pingpong,
                   interpret, res, do):
  del forward
  q, k, v, o, lse = res
  do = do.astype(q.dtype)
  kw = dict(t=t, left=left, right=right, scale=scale, interpret=interpret)
  if backward == "fused":
    delta = jnp.einsum("bthv,bthv->bht", do.astype(jnp.float32),
                       o.astype(jnp.float32))              # [B, H, Tp]
    dq, dk, dv = _backward_fused(q, k, v, do, lse, delta, **kw,
                                 pingpong=pingpong)
    if interpret and not isinstance(dq, jax.core.Tracer):
      # Eager interpret mode: wait for the kernel. Ops dispatched while its
      # interpreter callbacks still run sometimes deadlocked with them (2 CPU
      # cores, pytest-xdist; jax 0.11.2).
      jax.block_until_ready((dq, dk, dv))
    dq = (dq * float(scale)).astype(q.dtype)
  elif backward == "persistent":
    dq, delta = _backward_dq(q, k, v, do, o, lse, **kw)    # delta [B, H, Tp]
    dk, dv = _backward_dkv_persistent(q, k, v, do, lse, delta, **kw,
                                      pingpong=pingpong)   # group-summed
    return dq, dk, dv
  else:
    dq, delta = _backward_dq(q, k, v, do, o, lse, **kw)    # delta [B, H, Tp]
    dk, dv = _backward_dkv(q, k, v, do, lse, delta, **kw, pingpong=pingpong)
  h, hkv = q.shape[2], k.shape[2]
  if h != hkv:   # sum each group of H // Hkv query heads into its kv head
    sum_heads = lambda x: x.reshape(
        *x.shape[:2], hkv, h // hkv, x.shape[-1]).sum(axis=3)
    dk, dv = sum_heads(dk), sum_heads(dv)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _check(q, k, v, left, right, block_sizes):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be rank 4 [B, T, heads, dim], got "
                     f"{q.shape}, {k.shape}, {v.shape}")
  b, t, h, d = q.shape
  hkv, dv = k.shape[2], v.shape[-1]
  if k.shape != (b, t, hkv, d):
    raise ValueError(f"k.shape={k.shape} must be {(b, t, hkv, d)}")
  if v.shape[:3] != (b, t, hkv):
    raise ValueError(f"v.shape={v.shape} must start with {(b, t, hkv)}")
  if t < 1 or hkv < 1 or h % hkv:
    raise ValueError(f"T={t} must be >= 1 and H={h} a multiple of Hkv={hkv}")
  if q.dtype != k.dtype or q.dtype != v.dtype:
    raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, "
                     f"{v.dtype}")
  if jnp.dtype(q.dtype) not in map(jnp.dtype, SUPPORTED_DTYPES):
    raise ValueError(f"dtype={q.dtype} unsupported: expected bfloat16 or "
                     f"float16")
  if d not in SUPPORTED_HEAD_DIMS or dv not in SUPPORTED_HEAD_DIMS:
    raise ValueError(f"head dims D={d}, V={dv} must be in "
                     f"{SUPPORTED_HEAD_DIMS}")
  for name, w in (("left", left), ("right", right)):
    try:
      ok = operator.index(w) >= 0
    except TypeError:
      ok = False
    if not ok:
      raise ValueError(f"{name}={w!r} must be an int >= 0")
  for name, val in block_sizes.items():
    if name not in ("block_q", "block_kv"):
      raise ValueError(f"unknown block size {name}={val!r}; expected "
                       f"block_q or block_kv")
    if val != _BLOCK:
      raise ValueError(f"{name}={val!r} unsupported: expected {_BLOCK}")


def sliding_window_attention(q, k, v, *, left: int, right: int, scale: float,
                             interpret=False, forward="auto",
                             backward="split", pingpong=False,
                             **block_sizes) -> jax.Array:
  """Sliding-window attention (module docstring) on Hopper, differentiable.

  Args:
    q: [B, T, H, D] bfloat16 or float16; D in SUPPORTED_HEAD_DIMS.
    k: [B, T, Hkv, D], v: [B, T, Hkv, V], same dtype; H % Hkv == 0.
    left, right: window (ints >= 0); causal is right=0.
    scale: Python float multiplying q . k.
    interpret: False, True (`plgpu.InterpretGPUParams()`) or an
      `InterpretGPUParams`: Mosaic GPU interpret mode on CPU.
    forward: "single" (one warpgroup per CTA over 64-key tiles),
      "warp_specialized" (`_forward_ws`: two query tiles per CTA, 128-key
      tiles streamed by a TMA warpgroup, ping-pong) or "auto" (the latter
      for windows left + right + 1 >= _WS_MIN_WIDTH).
    backward: "split" (the dq kernel and one dk/dv CTA per key tile pair
      and query head), "persistent" (the dq kernel, then persistent dk/dv
      CTAs that sum each GQA group in-kernel; `_backward_dkv_persistent`;
      about as fast, BENCHMARKS.md section 4n) or "fused" (one kernel, dq
      by TMA reduce-add; D == V or H == Hkv; slower, sections 4h, 4k, 4m).
    pingpong: the dk/dv kernel's two compute warpgroups take turns on the
      tensor cores (`common.Turns`). Off by default: no gain on the H200
      (BENCHMARKS.md section 4i).
    **block_sizes: block_q, block_kv; only 64 is supported.

  Returns:
    [B, T, H, V] in q.dtype. Its VJP runs the `backward` kernels.

  Raises:
    ValueError: bad ranks/shapes, dtype not bf16/f16 (float32 included), D
      or V not in (64, 128), negative windows, unsupported block sizes, an
      unknown `forward`, an unknown or inapplicable `backward`, a non-bool
      `pingpong`.
  """
  _check(q, k, v, left, right, block_sizes)
  b, t, h, d = q.shape
  hkv, dv = k.shape[2], v.shape[-1]
  left, right = min(int(left), t - 1), min(int(right), t - 1)
  if backward not in BACKWARDS or (backward == "fused" and h != hkv
                                   and d != dv):
    raise ValueError(f"backward={backward!r}: expected one of "
                     f"{BACKWARDS} (\"fused\" needs D == V or H == Hkv; "
                     f"got D={d}, V={dv}, H={h}, Hkv={hkv})")
  if not isinstance(pingpong, bool):
    raise ValueError(f"pingpong={pingpong!r} must be a bool")
  _check_forward(forward)
  tp = -(-t // _PAD) * _PAD
  pad = lambda x: jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
  if tp != t:
    q, k, v = pad(q), pad(k), pad(v)
  o = _attention(q, k, v, t, left, right, float(scale), forward, backward,
                 pingpong, interpret)
  return o[:, :t]


def _check_forward(forward):
  if forward not in FORWARDS:
    raise ValueError(f"forward={forward!r}: expected one of {FORWARDS}")


def forward_with_lse(q, k, v, *, left: int, right: int, scale: float,
                     interpret=False, forward="auto"):
  """(o [B, T, H, V], lse [B, H, T] float32, natural log) without autodiff;
  for tests and diagnostics."""
  _check(q, k, v, left, right, {})
  _check_forward(forward)
  t = q.shape[1]
  left, right = min(int(left), t - 1), min(int(right), t - 1)
  tp = -(-t // _PAD) * _PAD
  pad = lambda x: jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
  o, lse = _forward_kernel(forward, left, right)(
      pad(q), pad(k), pad(v), t=t, left=left, right=right,
      scale=float(scale), interpret=interpret)
  return o[:, :t], lse[:, :, :t] / _LOG2E
