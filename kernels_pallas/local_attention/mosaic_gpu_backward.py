"""The backward kernels of the Hopper sliding-window attention: dq (with
delta), dk/dv one CTA per key tile pair ("split", the default), persistent
dk/dv CTAs ("persistent") and the fused dq/dk/dv kernel ("fused"). The math,
the tiling and the choice between them are in mosaic_gpu.py's module
docstring; the op there wires these into its `jax.custom_vjp`.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.experimental.pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from kernels_pallas import mosaic_gpu_common as common
from kernels_pallas import mosaic_gpu_pipeline as pipe
from kernels_pallas.local_attention.mosaic_gpu_band import (
    _BLOCK, _COLS, _LOG2E, _MEMORY_REGS, _PARAMS, _ROWS, _TILED, _TILED32,
    _WGMMA, _WGS, _a_operand, _bcast, _cta_steps, _edge_mask, _interior,
    _products, _visible, cta_interior, key_steps, tile_range, tiles_fastest)


# OVERLAP_EXP: the dq kernel waits for the first of a step's two products
# (S) alone and computes its exponential while the second (dP) still runs
# on the tensor cores, instead of waiting for both: the dq kernel 1.02-1.03x
# in two H100 runs (a noisier third did not resolve it), gradients bitwise
# unchanged (BENCHMARKS.md 4t). The same order made the dk/dv kernel, whose
# two compute warpgroups already overlap each other, 1-3% slower, so it is
# not used there. bench.py's "mosaic_gpu_dq_waits_both" turns it off.
OVERLAP_EXP = True

# SPLIT_LOOPS: the dq kernel runs its edge steps and its interior steps as
# two loops fed by one prefetch (`mosaic_gpu_pipeline`), so interior steps
# carry no cond; off: one `emit_pipeline` loop whose body tells them apart
# with conds. On the H100 the dq kernel 1.07x at window 2048, 1.05x at 512,
# 1.01x at 128 (BENCHMARKS.md 4u). SPLIT_LOOPS_DKV (off): the same for the split dk/dv
# kernel, which it did not help: as fast at 2048, 0.89x at 512, 0.96x at
# 128 (bench.py's "mosaic_gpu_split_dkv" turns it on).
# (mosaic_gpu.SPLIT_LOOPS: the forwards.)
SPLIT_LOOPS = True
SPLIT_LOOPS_DKV = False


def _exp_under_second(mma, shape, probs, interp):
  """(probs(first), second): mma(first_ref, second_ref) issues two [shape]
  float32 products; with OVERLAP_EXP (on the GPU) probs runs on the first
  while the second is in flight (`wgmma_accumulator_load(wait_n=1)`)."""
  if not OVERLAP_EXP or interp is not None:
    first, second = _products(mma, [shape, shape])
    return probs(first), second
  def scoped(first_ref, second_ref):
    mma(first_ref, second_ref)
    p = probs(plgpu.wgmma_accumulator_load(first_ref, wait_n=1))
    return p, second_ref[...]
  return pl.run_scoped(scoped, plgpu.ACC(shape, jnp.float32),
                       plgpu.ACC(shape, jnp.float32))


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

    def step(dq_acc, k_smem, v_smem, kt, interior):
      def mma(s_ref, dp_ref):
        plgpu.wgmma(s_ref, q_smem, k_smem.transpose((1, 0)))
        plgpu.wgmma(dp_ref, do_smem, v_smem.transpose((1, 0)))
      p, dp = _exp_under_second(
          mma, (bq, bk), lambda s: jnp.exp2(
              s * c - _bcast(lse_i, (bq, bk), 0)), interp)
      p = _edge_mask(p, interior, lambda: _visible(
          q0, kt * bk, (bq, bk), t=t, left=left, right=right,
          keys_on_rows=False), 0.0)
      ds = p * (dp - _bcast(delta_i, (bq, bk), 0))
      ds16 = _a_operand(ds.astype(dtype), ds_smem)
      (dq_acc,) = common.accumulate(
          lambda r: plgpu.wgmma(r, ds16, k_smem), (dq_acc,), interp)
      return dq_acc

    zeros = plgpu.layout_cast(jnp.zeros((bq, d), jnp.float32), _WGMMA)
    dq = key_steps(
        step, k_ref.at[bb, :, kvh], v_ref.at[bb, :, kvh], zeros, qt=qt,
        start=start, end=end, t=t, left=left, right=right, split=SPLIT_LOOPS)
    dq_smem[...] = (dq * float(scale)).astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dq_smem, dq_ref.at[bb, rows, hh])
    common.wait_stores_at_exit()

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
      **common.tile_grid("q", n, h, b, tiles_fastest(left, right)),
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


# PV_FIRST (off; GPU-tested, one unresolved timing): the split dk/dv kernel's
# step in the order of JAX's attention_mgpu backward: S^T alone, P^T, then
# dV += P^T dO issued together with dP^T = V dO^T, then dS^T and
# dK += dS^T Q; instead of S^T and dP^T together first. Two [64, 64] float32
# tiles live at once instead of three, where the shipped order spills
# (BENCHMARKS.md 4t). bench.py's "mosaic_gpu_pv_first" turns it on.
PV_FIRST = False


def _dkv_step_pv_first(k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem,
                       dk_acc, dv_acc, *, k0, q0, interior, c, turns, t, left,
                       right, dtype, pt_smem, ds_smem, interp):
  """`_dkv_pair` and the two accumulations of a split dk/dv step, in
  PV_FIRST's order -> (dk_acc, dv_acc)."""
  shape = (k_smem.shape[0], q_smem.shape[0])
  def mma(st_ref):
    plgpu.wgmma(st_ref, k_smem, q_smem.transpose((1, 0)))
    turns.turn()
  (st,) = _products(mma, [shape])
  lse_j = plgpu.load(lse_smem, layout=_COLS)
  pt = jnp.exp2(st * c - _bcast(lse_j, shape, 1))
  pt = _edge_mask(pt, interior, lambda: _visible(
      k0, q0, shape, t=t, left=left, right=right, keys_on_rows=True), 0.0)
  pt16 = _a_operand(pt.astype(dtype), pt_smem)
  turns.turn()
  def mma2(dv_ref, dpt_ref):
    plgpu.wgmma(dv_ref, pt16, do_smem)
    plgpu.wgmma(dpt_ref, v_smem, do_smem.transpose((1, 0)))
  zeros = plgpu.layout_cast(jnp.zeros(shape, jnp.float32), _WGMMA)
  dv_acc, dpt = common.accumulate(mma2, (dv_acc, zeros), interp)
  delta_j = plgpu.load(delta_smem, layout=_COLS)
  dst16 = _a_operand(
      (pt * (dpt - _bcast(delta_j, shape, 1))).astype(dtype), ds_smem)
  (dk_acc,) = common.accumulate(lambda r: plgpu.wgmma(r, dst16, q_smem),
                                (dk_acc,), interp)
  return dk_acc, dv_acc


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
  TMA reduce-add from a float32 SMEM buffer, in [64, 64] pieces with MHA
  and whole with GQA, where that buffer also stages dk and dv (so D == V is
  needed there). Interpret mode has no TMA reductions: dq_acc is
  [2, B, Tp, H, D], one slice per compute warpgroup (the two run
  concurrently and visit the same query tile at the same step), added to by
  a plain GMEM read-modify-write (the interpreter runs the grid's CTAs one
  after another).
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

    def at(qt, q_smem, do_smem, lse_smem, delta_smem, carry, interior=None):
      """One step on query tile qt; interior None: decided here (the step
      skipped outside the warpgroup's range, masked on an edge tile)."""
      def step(carry, interior):
        dk_acc, dv_acc = carry
        if PV_FIRST and not fused:
          return _dkv_step_pv_first(
              k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, dk_acc,
              dv_acc, k0=k0, q0=qt * bq, interior=interior, c=c, turns=turns,
              t=t, left=left, right=right, dtype=dtype, pt_smem=pt_smem,
              ds_smem=ds_smem, interp=interp)
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

      if interior is not None:
        return step(carry, interior)
      valid = (qt >= own_start) & (qt < own_end)
      interior = _interior(qt * bq, k0, t=t, left=left, right=right,
                           block_q=bq, block_kv=bk)
      return turns.skip_or(valid, interior, step, carry)

    if not SPLIT_LOOPS_DKV:
      clamp = lambda i: (jnp.minimum(start + i, n - 1), 0)
      clamp1 = lambda i: (jnp.minimum(start + i, n - 1),)
      pipeline = plgpu.emit_pipeline_warp_specialized(
          lambda idx, *refs: at(start + idx[0], *refs),
          grid=(steps,), memory_registers=_MEMORY_REGS,
          in_specs=[plgpu.BlockSpec((bq, d), clamp, transforms=_TILED),
                    plgpu.BlockSpec((bq, dv), clamp, transforms=_TILED),
                    plgpu.BlockSpec((bq,), clamp1),
                    plgpu.BlockSpec((bq,), clamp1)],
          max_concurrent_steps=max(1, min(2, steps)), num_compute_wgs=_WGS,
          wg_axis="wg", compute_context=compute)
      pipeline(q_ref.at[bb, :, hh], do_ref.at[bb, :, hh],
               lse_ref.at[bb, hh], delta_ref.at[bb, hh])
      return

    # Edge steps (some warpgroup skips or masks the query tile) first, then
    # the query tiles interior to both warpgroups' key tiles.
    _, cta_end = jnp_range(_WGS * ct + _WGS - 1)
    lo, hi = cta_interior(
        [_WGS * ct + i for i in range(_WGS)], start=start, end=cta_end, t=t,
        left=left, right=right, block_q=bq, block_kv=bk, keys_on_rows=True)
    rows = lambda qt: pl.ds(qt * bq, bq)
    pipe.warp_specialized(
        at, [(lambda qt: q_ref.at[bb, rows(qt), hh], (bq, d), dtype, _TILED),
             (lambda qt: do_ref.at[bb, rows(qt), hh], (bq, dv), dtype,
              _TILED),
             (lambda qt: lse_ref.at[bb, hh, rows(qt)], (bq,), jnp.float32, ()),
             (lambda qt: delta_ref.at[bb, hh, rows(qt)], (bq,), jnp.float32,
              ())],
        start=start, lo=lo, hi=hi, end=cta_end, wgs=_WGS,
        memory_registers=_MEMORY_REGS, compute=compute)

  tile16 = plgpu.SMEM((_WGS, bk, bq), dtype, transforms=_TILED)
  scratch = [plgpu.SMEM((_WGS, bk, d), dtype, transforms=_TILED),
             plgpu.SMEM((_WGS, bk, dv), dtype, transforms=_TILED),
             (plgpu.SMEM((_WGS, bq, dq_cols), jnp.float32,
                         transforms=_TILED32)
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
      **common.tile_grid("kv", n // _WGS, h, b,
                         tiles_fastest(left, right)),
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
      common.wait_stores_at_exit()

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
