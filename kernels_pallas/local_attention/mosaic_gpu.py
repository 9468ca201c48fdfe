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
(query tile, head, batch), grid (B, H, tiles) (`common.tile_grid`: a
(batch, head)'s tiles launch together and share K, V in L2) for windows of
1024 keys or more, (tiles, H, B) below (`tiles_fastest`, measured). Their
steps run as two loops (`SPLIT_LOOPS`, kernels_pallas/mosaic_gpu_pipeline.py):
first the CTA's edge tiles, masked, then its interior tiles
(`interior_range`), with no mask and no cond, K and V double-buffered by
TMA through one prefetch that runs straight through both loops. A `lax.cond`
in a step body costs every step even where it is never taken (up to 12%,
BENCHMARKS.md 4t); on the H100 the two loops made the dq kernel
1.05-1.07x and the forwards 1.02-1.07x at windows 512 and 2048, both
1.01x at 128 (4u). With SPLIT_LOOPS off, each is one
`plgpu.emit_pipeline` over a static number of steps (the largest range of
any CTA): step i loads tile start + i (clamped to the last tile), a step
past the CTA's range is skipped (`lax.cond`, no math; its TMA load of a
clamped tile still happens and is ignored), and a cond per step applies
the mask on edge tiles only. The dk/dv kernel is warp-specialized
(`plgpu.emit_pipeline_warp_specialized`): a CTA holds two key tiles, one per
compute warpgroup, and a third warpgroup streams the union of their query
tile ranges (`_cta_range`), which both compute warpgroups read, each
skipping the tiles outside its own range. It keeps that one loop: in two
loops (`mosaic_gpu_backward.SPLIT_LOOPS_DKV`) it was as fast at window
2048 and 0.89x at 512 (4u). Its two [64, D] float32
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
    first delta = rowsum(dO * o) of its tile, an output for dk/dv. A step
    issues S and dP together and computes p as soon as S is done, while dP
    is still on the tensor cores (`mosaic_gpu_backward.OVERLAP_EXP`).
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
tiles are all masked never takes inf - inf. The forwards fold the scale
into the exponent, 2^(s c - m) with c = scale log2(e) (`FOLD_SCALE`, one
FMA an element), and floor the running max m far above the masked value
(`_FOLD_FLOOR`), so masked terms are exactly 0; a row that sees no key at
all (only padded rows) ends with l = 0, raised to the smallest normal
float (`_seen`) so that its o is 0 and its lse finite. Padded queries
(rows >= T) are computed and sliced off; their output cotangent is 0, so
they add nothing to dk/dv.

Supported: bfloat16/float16 inputs (float32 raises ValueError), D and V in
(64, 128) (other head dims raise ValueError: no zero-padding here), any
T >= 1, block_q = block_kv = 64.

Files: this module has the forward kernels and the op;
mosaic_gpu_backward.py the backward kernels; mosaic_gpu_band.py the band
geometry (`tile_range`, `_interior`, `interior_range`, `_visible`) and
constants they share; kernels_pallas/mosaic_gpu_pipeline.py the two-loop
pipelines.

Interpret mode (`interpret=True`: Mosaic GPU's CPU interpreter, jax 0.11.2)
runs the same kernels with three differences it forces: wgmma A operands
that live in registers on the GPU (P, dS) go through SMEM scratch, the
accumulators start at zero with the carried value added afterwards (no
`run_state` there), and the dq kernel awaits S and dP together (the
interpreter does not model wgmma's asynchrony, so OVERLAP_EXP's order is
checked on the GPU and by lowering).
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
from kernels_pallas import mosaic_gpu_pipeline as pipe
from kernels_pallas.local_attention.mosaic_gpu_band import (
    _BLOCK, _LOG2E, _MASK, _MEMORY_REGS, _PAD, _PARAMS, _ROWS, _TILED, _WGMMA,
    _WGS, _WS_MIN_WIDTH, _a_operand, _cta_steps, _edge_mask, _interior,
    _products, _visible, cta_interior, key_steps, tile_range, tiles_fastest)
from kernels_pallas.local_attention.mosaic_gpu_backward import (
    _backward_dkv, _backward_dkv_persistent, _backward_dq, _backward_fused)

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)


def supports(d: int, dv: int, dtype) -> bool:
  """Whether the kernels take head dims (d, dv) and this input dtype."""
  return (d in SUPPORTED_HEAD_DIMS and dv in SUPPORTED_HEAD_DIMS
          and jnp.dtype(dtype) in map(jnp.dtype, SUPPORTED_DTYPES))


# ---------------------------------------------------------------- forward ---


# FOLD_SCALE: the forwards take the raw scores s = q . k and apply
# c = scale log2(e) to the row max and inside exp2's argument,
# 2^(s c - m), one FMA an element, instead of multiplying every score by c
# first and subtracting m after (a multiply and a subtraction). 1.02-1.04x
# for the forward kernels on the H100 (BENCHMARKS.md 4s); bench.py's
# "mosaic_gpu_unfolded_scale" turns it off. Folded only while _MASK / c stays
# finite and far below any real score.
FOLD_SCALE = True
# The running max's floor with the scale folded (`common.softmax_step`): in
# a row whose keys so far are all masked, m ~ _MASK carries an error of
# ~2^76, and an unfloored 2^(s c - m) gave inf at scale 3 in the interpret
# tests. With m >= _MASK / 256 every masked term is 2^(<= _MASK / 2) = 0.
_FOLD_FLOOR = _MASK / 256


def _seen(l):
  """The row sums l at the end of a forward, with 0 (a row that saw no key:
  with the floored max every masked term is 0) raised to the smallest normal
  float32, so that o = 0 and lse stays finite there, as the backward needs
  (delta = dO . o, and 2^(s c - lse) is masked to 0, not inf * 0). Only
  padded query rows (>= T) see no key; a row that saw one has l >= ~1 (its
  max's term is 2^0) and is unchanged."""
  return jnp.maximum(l, jnp.finfo(jnp.float32).tiny)


def _online_softmax(s, m, l, acc, interior, visible, c):
  """One key tile of the online softmax: s [bq, bk] raw scores q . k, c
  = scale log2(e) (m, l and the saved lse are in log2 units), masked where
  not visible() unless `interior`; the running row max m and sum l [bq] and
  the output accumulator acc [bq, V] -> (m, l, acc rescaled to the new max,
  p [bq, bk] float32)."""
  if FOLD_SCALE and 2.0 ** -20 <= c <= 2.0 ** 20:
    s = _edge_mask(s, interior, visible, _MASK / c)
    return common.softmax_step(s, m, l, acc, c, _FOLD_FLOOR)
  return common.softmax_step(_edge_mask(s * c, interior, visible, _MASK),
                             m, l, acc)


# SPLIT_LOOPS: the forwards run their edge steps and their interior steps
# as two loops fed by one prefetch (`mosaic_gpu_pipeline`), so interior steps
# carry no cond; off: one `emit_pipeline` loop whose body tells them apart
# with conds. On the H100 (BENCHMARKS.md 4u): the warp-specialized forward
# 1.07x at window 2048, the single one 1.02x at 512 and 1.01x at 128.
# (mosaic_gpu_backward.SPLIT_LOOPS: the dq kernel; bench.py's
# "mosaic_gpu_one_loop" turns both off.)
SPLIT_LOOPS = True


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

    def step(carry, k_smem, v_smem, kt, interior):
      m, l, acc = carry
      (s,) = _products(
          lambda r: plgpu.wgmma(r, q_smem, k_smem.transpose((1, 0))),
          [(bq, bk)])
      m, l, acc, p = _online_softmax(
          s, m, l, acc, interior, lambda: _visible(
              q0, kt * bk, (bq, bk), t=t, left=left, right=right,
              keys_on_rows=False), c)
      p16 = _a_operand(p.astype(dtype), p_smem)
      (acc,) = common.accumulate(lambda r: plgpu.wgmma(r, p16, v_smem),
                                 (acc,), interp)
      return m, l, acc

    init = (
        plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), _ROWS),
        plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), _ROWS),
        plgpu.layout_cast(jnp.zeros((bq, dv), jnp.float32), _WGMMA),
    )
    m, l, acc = key_steps(
        step, k_ref.at[bb, :, kvh], v_ref.at[bb, :, kvh], init, qt=qt,
        start=start, end=end, t=t, left=left, right=right, split=SPLIT_LOOPS)
    l = _seen(l)
    o_smem[...] = common.normalize(acc, l).astype(dtype)
    lse_smem[...] = m + jnp.log(l) * _LOG2E
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[bb, pl.ds(q0, bq), hh])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bb, hh, pl.ds(q0, bq)])
    common.wait_stores_at_exit()

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
      **common.tile_grid("q", n, h, b, tiles_fastest(left, right)),
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
    wg, hh, kvh, bb, qt, start, cta_end, own_start, own_end = common.cta(
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
      l = _seen(l)
      o_smem[...] = common.normalize(acc, l).astype(dtype)  # Q done
      lse_smem[...] = m + jnp.log(l) * _LOG2E
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, o_ref.at[bb, rows, hh])
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bb, hh, rows])
      common.wait_stores_at_exit()

    def at(kt, k_smem, v_smem, carry, interior=None):
      """One step on key tile kt; interior None: decided here (skipped
      outside the warpgroup's range, masked on an edge tile)."""
      def step(carry, interior):
        m, l, acc = carry
        def qk(r):
          plgpu.wgmma(r, q_smem, k_smem.transpose((1, 0)))
          turns.turn()
        (s,) = _products(qk, [(bq, bk)])
        m, l, acc, p = _online_softmax(
            s, m, l, acc, interior, lambda: _visible(
                q0, kt * bk, (bq, bk), t=t, left=left, right=right,
                keys_on_rows=False), c)
        p16 = _a_operand(p.astype(dtype), p_smem)
        turns.turn()
        (acc,) = common.accumulate(lambda r: plgpu.wgmma(r, p16, v_smem),
                                   (acc,), interp)
        return m, l, acc

      if interior is not None:
        return step(carry, interior)
      valid = (kt >= own_start) & (kt < own_end)
      interior = _interior(q0, kt * bk, t=t, left=left, right=right,
                           block_q=bq, block_kv=bk)
      return turns.skip_or(valid, interior, step, carry)

    if SPLIT_LOOPS:
      ct = lax.axis_index("q")      # (qt is wrong on the memory warpgroup)
      lo, hi = cta_interior([_WGS * ct + i for i in range(_WGS)],
                            start=start, end=cta_end, t=t, left=left,
                            right=right, block_q=bq, block_kv=bk)
      keys = lambda kt: pl.ds(kt * bk, bk)
      pipe.warp_specialized(
          at, [(lambda kt: k_ref.at[bb, keys(kt), kvh], (bk, d), dtype,
                _TILED),
               (lambda kt: v_ref.at[bb, keys(kt), kvh], (bk, dv), dtype,
                _TILED)],
          start=start, lo=lo, hi=hi, end=cta_end, wgs=_WGS,
          memory_registers=_MEMORY_REGS, compute=compute)
      return
    clamp = lambda i: (jnp.minimum(start + i, n_k - 1), 0)
    pipeline = plgpu.emit_pipeline_warp_specialized(
        lambda idx, *refs: at(start + idx[0], *refs),
        grid=(steps,), memory_registers=_MEMORY_REGS,
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
      **common.tile_grid("q", tp // bq // _WGS, h, b,
                         tiles_fastest(left, right)),
      num_threads=_WGS + 1, thread_name="wg",
      scratch_types=tuple(scratch), compiler_params=_PARAMS,
      interpret=interp,
  )(q, k, v)


BACKWARDS = ("split", "persistent", "fused")   # the first is the default
# "auto" picks "warp_specialized" for windows (left + right + 1) of at least
# _WS_MIN_WIDTH keys, "single" (one warpgroup per CTA) below: on the H100 the
# former is 1.01x / 1.02x at 1024 / 2048 (forward alone 1.18x) and 0.94x /
# 0.96x at 128 / 512 (BENCHMARKS.md section 4l).
FORWARDS = ("auto", "single", "warp_specialized")


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
