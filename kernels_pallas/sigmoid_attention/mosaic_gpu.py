"""Sigmoid attention (FlashSigmoid) for Hopper GPUs, forward and backward, as
Mosaic GPU (Pallas) kernels with a `jax.custom_vjp`.

For q [B, Tq, H, D], k [B, Tk, Hkv, D], v [B, Tk, Hkv, V] (query head h reads
kv head h // (H // Hkv)) and a per-head bias b_h, query i sees key j iff

  (left is None or j >= i - left) and (right is None or j <= i + right)
  and 0 <= j < Tk,

and with s_ij = scale q_i . k_j and p_ij = sigmoid(s_ij + b_h) on the visible
pairs (0 elsewhere):

  o_i = sum_j p_ij v_j.

No running maximum and no normaliser: every key's weight is final once its
score is known, so the forward is a plain sum of P V tile products.
Backward (dO the output cotangent; sigmoid' = p (1 - p)):

  dp_ij = dO_i . v_j,   ds_ij = p_ij (1 - p_ij) dp_ij,
  dq_i  = scale sum_j ds_ij k_j,    dk_j = scale sum_i ds_ij q_i,
  dv_j  = sum_i p_ij dO_i,          db_h = sum_{b, i, j} ds_ij.

Block sparsity, as in kernels_pallas/local_attention/mosaic_gpu.py: Tq and Tk
are zero-padded to multiples of 128 and cut into 64-row tiles (128-row key
tiles in the forward); a query tile visits only the key tiles some of its
real queries see (`_range`; everything when left and right are None), a key
tile the query tiles that reach it, and only pairs that are not *interior*
(every query of the tile sees every key of the other, all keys real) evaluate
the mask, in a branch that holds only the p tile (`common.edge_mask`; against
branching between two whole step bodies: forward + backward 1.07-1.11x
faster, BENCHMARKS.md section 5c). Masking zeroes p itself (sigmoid of a
masked score is not 0); padded key rows are always masked. Padded query rows
are computed and sliced off; their dO is 0, so their ds and p dO are 0 in
dk/dv.

Each pipeline has a dynamic grid: exactly the CTA's range of partner tiles
(at least one step; a step outside a warpgroup's own range is skipped with
no math), so causal attention loads and computes about half the tiles.
Kernels, all matmuls wgmma with float32 accumulation, p and ds rounded to the
input dtype before their matmuls:
  forward: warp-specialized (`plgpu.emit_pipeline_warp_specialized`): a CTA
    holds two 64-row query tiles (one per compute warpgroup), a third
    warpgroup streams [128, D] key and value tiles over the union of their
    ranges, acc += P V. (Against one warpgroup per query tile over 64-key
    tiles: 1.08x at 4k, 1.41x at 16k tokens, BENCHMARKS.md section 5.)
  dq:      warp-specialized like the forward, over [64, D] key and value
    tiles (against one warpgroup per CTA: forward + backward 1.02-1.09x,
    BENCHMARKS.md section 5c); S and dP = dO V^T, ds, dq += dS K, and the
    row sums of dS for db.
  dk/dv:   warp-specialized: a CTA holds two key tiles (one per compute
    warpgroup) and a third warpgroup streams Q and dO over the union of
    their query-tile ranges; dk/dv per QUERY head, summed over each GQA group
    in XLA (float32).
Ping-pong (`pingpong=True`, the default): in the forward the two compute
warpgroups take turns on the tensor cores (FlashAttention-3's schedule,
`common.Turns`), so one's sigmoid runs under the other's matmuls: 1.02-1.18x
on the H200 (BENCHMARKS.md section 5d). The same schedule in the dq and dk/dv
kernels made forward + backward 0.97-1.04x, so the backward does without.
p = 1 / (1 + 2^-x) with x = (s + b) log2(e), the reciprocal an approximate
`rcp` instruction (1 ulp; an IEEE division costs several instructions).

Supported: bfloat16/float16 (float32 raises ValueError; the op then uses
xla), D and V in (64, 128), any Tq, Tk >= 1. Interpret mode
(`interpret=True`) runs the same kernels on CPU (wgmma A operands through
SMEM scratch there, see mosaic_gpu_common).
"""

from __future__ import annotations

import functools

import jax
import jax.experimental.pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from kernels_pallas import mosaic_gpu_common as common

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
_BLOCK = 64
_WGS = 2             # compute warpgroups of the dk/dv kernel
_MEMORY_REGS = 40    # registers of its TMA warpgroup
_PAD = _WGS * _BLOCK
_LOG2E = common.LOG2E
_TILED, _WGMMA, _ROWS = common.TILED, common.WGMMA, common.ROWS
_bcast, _a_operand, _products = common.bcast, common.a_operand, common.products
_skip_or, _edge_mask = common.skip_or, common.edge_mask


def supports(d: int, dv: int, dtype) -> bool:
  """Whether the kernels take head dims (d, dv) and this input dtype."""
  return (d in SUPPORTED_HEAD_DIMS and dv in SUPPORTED_HEAD_DIMS
          and jnp.dtype(dtype) in map(jnp.dtype, SUPPORTED_DTYPES))


def _range(tile, *, t_src, t_dst, back, ahead, block_src=_BLOCK,
           block_dst=_BLOCK, maximum=max, minimum=min):
  """[start, end) of the destination tiles (block_dst rows) that source tile
  `tile` (block_src rows) reaches, source position i reaching
  [i - back, i + ahead] ∩ [0, t_dst) (back / ahead None: unbounded). Python
  ints or traced int32 scalars (maximum=jnp.maximum, minimum=jnp.minimum)."""
  first = tile * block_src
  last = minimum(first + block_src, t_src) - 1       # last real position
  start = 0 if back is None else maximum(first - back, 0) // block_dst
  end = ((t_dst - 1) // block_dst + 1 if ahead is None
         else minimum(last + ahead, t_dst - 1) // block_dst + 1)
  return start, end


def _interior(q0, k0, *, tk, left, right, bq=_BLOCK, bk=_BLOCK):
  """Every query of [q0, q0 + bq) sees every (real) key of [k0, k0 + bk)."""
  ok = k0 + bk - 1 < tk
  if left is not None:
    ok = ok & (k0 >= q0 + bq - 1 - left)
  if right is not None:
    ok = ok & (k0 + bk - 1 <= q0 + right)
  return ok


def _visible(row0, col0, *, tk, left, right, keys_on_rows,
             shape=(_BLOCK, _BLOCK)):
  """Visibility of a tile in the WGMMA layout (keys on rows if
  keys_on_rows)."""
  r = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=_WGMMA) + row0
  c = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=_WGMMA) + col0
  qi, kj = (c, r) if keys_on_rows else (r, c)
  ok = kj < tk
  if left is not None:
    ok = ok & (kj >= qi - left)
  if right is not None:
    ok = ok & (kj <= qi + right)
  return ok


def _probs(s, c, b2, interp):
  """p = sigmoid(c s + b) of a score tile (c = scale log2(e), b2 = b log2(e)
  per row) as 1 / (1 + 2^-(c s + b2)): two MUFU operations per element on
  the GPU (ex2, and rcp through `common.reciprocal`)."""
  x2 = s * c + _bcast(b2, s.shape, 0)
  return common.reciprocal(1.0 + jnp.exp2(-x2), interp)


def _bias_rows(bias_ref, hh):
  return plgpu.load(bias_ref.at[hh], layout=_ROWS, optimized=False)


_cta = functools.partial(common.cta, wgs=_WGS)


def _own_tiles(copies, bars, wg, bias_ref, hh):
  """In compute warpgroup wg of a warp-specialized backward kernel: TMA-loads
  its two own tiles (`copies`: (GMEM source, SMEM destination) pairs, on
  barriers wg and _WGS + wg) and returns head hh's bias row in log2 units
  once both have landed."""
  for n, (src, dst) in enumerate(copies):
    plgpu.copy_gmem_to_smem(src, dst, bars.at[n * _WGS + wg])
  b2 = _bias_rows(bias_ref, hh) * _LOG2E
  for n in range(len(copies)):
    plgpu.barrier_wait(bars.at[n * _WGS + wg])
  return b2


# ---------------------------------------------------------------- kernels ---


_BLOCK_K_FWD = 128   # key tile of the forward


def _forward(q, k, v, bias, *, tq, tk, left, right, scale, interpret,
             pingpong=True):
  """q [B, Tqp, H, D], k [B, Tkp, Hkv, D] (padded) -> o [B, Tqp, H, V]: two
  compute warpgroups per CTA (64 query rows each) share [128, D] key tiles
  streamed by a third.

  pingpong: the two compute warpgroups take turns on the tensor cores
  (`common.Turns`: after issuing S = Q K^T, and after the sigmoid, before
  P V)."""
  b, tqp, h, d = q.shape
  tkp, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
  group = h // hkv
  dtype = q.dtype
  bq, bk = _BLOCK, _BLOCK_K_FWD
  c = float(scale) * _LOG2E
  kw = dict(t_src=tq, t_dst=tk, back=left, ahead=right, block_src=bq,
            block_dst=bk)
  n_k = -(-tkp // bk)
  interp = common.interpret_params(interpret)
  jnp_range = lambda tile: _range(tile, **kw, maximum=jnp.maximum,
                                  minimum=jnp.minimum)

  def sigmoid_forward(q_ref, k_ref, v_ref, bias_ref, o_ref, q_smem2,
                      o_smem2, bars, turns_bar, *maybe_p):
    wg, hh, kvh, bb, qt, start, cta_end, own_start, own_end = _cta(
        "q", group, jnp_range)
    q0 = qt * bq
    q_smem = q_smem2.at[wg]
    p_smem = maybe_p[0].at[wg] if maybe_p else None
    rows = pl.ds(q0, bq)
    turns = common.Turns(turns_bar, wg)

    def compute(pipeline):
      plgpu.copy_gmem_to_smem(q_ref.at[bb, rows, hh], q_smem, bars.at[wg])
      b2 = _bias_rows(bias_ref, hh) * _LOG2E
      plgpu.barrier_wait(bars.at[wg])
      turns.begin()
      acc, _ = pipeline(
          (plgpu.layout_cast(jnp.zeros((bq, dv), jnp.float32), _WGMMA), b2))
      turns.end()
      o_smem = q_smem if o_smem2 is None else o_smem2.at[wg]
      o_smem[...] = acc.astype(dtype)   # (Q is read no more)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, o_ref.at[bb, rows, hh])
      common.wait_stores_at_exit()

    def body(idx, k_smem, v_smem, carry):
      kt = start + idx[0]

      def step(carry, interior):
        acc, b2 = carry
        def qk(r):
          plgpu.wgmma(r, q_smem, k_smem.transpose((1, 0)))
          turns.turn()
        (s,) = _products(qk, [(bq, bk)])
        p = _probs(s, c, b2, interp)
        p = _edge_mask(p, interior, lambda: _visible(
            q0, kt * bk, tk=tk, left=left, right=right, keys_on_rows=False,
            shape=(bq, bk)), 0.0)
        p16 = _a_operand(p.astype(dtype), p_smem)
        turns.turn()
        (acc,) = common.accumulate(lambda r: plgpu.wgmma(r, p16, v_smem),
                                   (acc,), interp)
        return acc, b2

      valid = (kt >= own_start) & (kt < own_end)
      interior = _interior(q0, kt * bk, tk=tk, left=left, right=right,
                           bq=bq, bk=bk)
      return turns.skip_or(valid, interior, step, carry)

    clamp = lambda i: (jnp.minimum(start + i, n_k - 1), 0)
    pipeline = plgpu.emit_pipeline_warp_specialized(
        body, grid=(jnp.maximum(cta_end - start, 1),),
        memory_registers=_MEMORY_REGS,
        in_specs=[plgpu.BlockSpec((bk, d), clamp, transforms=_TILED),
                  plgpu.BlockSpec((bk, dv), clamp, transforms=_TILED)],
        max_concurrent_steps=2, num_compute_wgs=_WGS, wg_axis="wg",
        compute_context=compute)
    pipeline(k_ref.at[bb, :, kvh], v_ref.at[bb, :, kvh])

  scratch = [plgpu.SMEM((_WGS, bq, d), dtype, transforms=_TILED),
             None if d == dv else plgpu.SMEM((_WGS, bq, dv), dtype,
                                             transforms=_TILED),   # o
             plgpu.Barrier(num_barriers=_WGS),
             common.Turns.scratch(pingpong)]
  if interp is not None:
    scratch.append(plgpu.SMEM((_WGS, bq, bk), dtype, transforms=_TILED))
  return plgpu.kernel(
      sigmoid_forward,
      out_type=jax.ShapeDtypeStruct((b, tqp, h, dv), dtype),
      **common.tile_grid("q", tqp // bq // _WGS, h, b),
      num_threads=_WGS + 1, thread_name="wg",
      scratch_types=tuple(scratch), compiler_params=common.LANE_PARAMS,
      interpret=interp,
  )(q, k, v, bias)


def _backward_dq(q, k, v, bias, do, *, tq, tk, left, right, scale,
                 interpret):
  """(dq [B, Tqp, H, D] q.dtype, row sums of dS [B, H, Tqp] float32): two
  compute warpgroups per CTA (a 64-row query tile each) share [64, D] key
  and value tiles streamed by a third."""
  b, tqp, h, d = q.shape
  tkp, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
  group = h // hkv
  dtype = q.dtype
  c = float(scale) * _LOG2E
  kw = dict(t_src=tq, t_dst=tk, back=left, ahead=right)
  n_k = tkp // _BLOCK
  interp = common.interpret_params(interpret)
  jnp_range = lambda tile: _range(tile, **kw, maximum=jnp.maximum,
                                  minimum=jnp.minimum)

  def sigmoid_dq(q_ref, k_ref, v_ref, bias_ref, do_ref, dq_ref, dsum_ref,
                 q_smem2, do_smem2, dsum_smem2, bars, *maybe_ds):
    wg, hh, kvh, bb, qt, start, cta_end, own_start, own_end = _cta(
        "q", group, jnp_range)
    q0 = qt * _BLOCK
    q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
    ds_smem = maybe_ds[0].at[wg] if maybe_ds else None
    rows = pl.ds(q0, _BLOCK)

    def compute(pipeline):   # per compute warpgroup, around its steps
      b2 = _own_tiles(((q_ref.at[bb, rows, hh], q_smem),
                       (do_ref.at[bb, rows, hh], do_smem)), bars, wg,
                      bias_ref, hh)
      dq, dsum, _ = pipeline(
          (plgpu.layout_cast(jnp.zeros((_BLOCK, d), jnp.float32), _WGMMA),
           plgpu.layout_cast(jnp.zeros((_BLOCK,), jnp.float32), _ROWS), b2))
      q_smem[...] = (dq * float(scale)).astype(dtype)   # Q is read no more
      dsum_smem2.at[wg][...] = dsum
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[bb, rows, hh])
      plgpu.copy_smem_to_gmem(dsum_smem2.at[wg], dsum_ref.at[bb, hh, rows])
      common.wait_stores_at_exit()

    def body(idx, k_smem, v_smem, carry):
      kt = start + idx[0]

      def step(carry, interior):
        dq_acc, dsum, b2 = carry
        def mma(s_ref, dp_ref):
          plgpu.wgmma(s_ref, q_smem, k_smem.transpose((1, 0)))
          plgpu.wgmma(dp_ref, do_smem, v_smem.transpose((1, 0)))
        s, dp = _products(mma, [(_BLOCK, _BLOCK)] * 2)
        p = _probs(s, c, b2, interp)
        p = _edge_mask(p, interior, lambda: _visible(
            q0, kt * _BLOCK, tk=tk, left=left, right=right,
            keys_on_rows=False), 0.0)
        ds = p * (1.0 - p) * dp
        ds16 = _a_operand(ds.astype(dtype), ds_smem)
        (dq_acc,) = common.accumulate(
            lambda r: plgpu.wgmma(r, ds16, k_smem), (dq_acc,), interp)
        return dq_acc, dsum + ds.sum(axis=1), b2

      valid = (kt >= own_start) & (kt < own_end)
      interior = _interior(q0, kt * _BLOCK, tk=tk, left=left, right=right)
      return _skip_or(valid, interior, step, carry)

    clamp = lambda i: (jnp.minimum(start + i, n_k - 1), 0)
    pipeline = plgpu.emit_pipeline_warp_specialized(
        body, grid=(jnp.maximum(cta_end - start, 1),),
        memory_registers=_MEMORY_REGS,
        in_specs=[plgpu.BlockSpec((_BLOCK, d), clamp, transforms=_TILED),
                  plgpu.BlockSpec((_BLOCK, dv), clamp, transforms=_TILED)],
        max_concurrent_steps=2, num_compute_wgs=_WGS, wg_axis="wg",
        compute_context=compute)
    pipeline(k_ref.at[bb, :, kvh], v_ref.at[bb, :, kvh])

  scratch = [plgpu.SMEM((_WGS, _BLOCK, d), dtype, transforms=_TILED),
             plgpu.SMEM((_WGS, _BLOCK, dv), dtype, transforms=_TILED),
             plgpu.SMEM((_WGS, _BLOCK), jnp.float32),
             plgpu.Barrier(num_barriers=2 * _WGS)]
  if interp is not None:
    scratch.append(plgpu.SMEM((_WGS, _BLOCK, _BLOCK), dtype,
                              transforms=_TILED))
  return plgpu.kernel(
      sigmoid_dq,
      out_type=(jax.ShapeDtypeStruct(q.shape, dtype),
                jax.ShapeDtypeStruct((b, h, tqp), jnp.float32)),
      **common.tile_grid("q", tqp // _BLOCK // _WGS, h, b),
      num_threads=_WGS + 1, thread_name="wg",
      scratch_types=tuple(scratch), compiler_params=common.LANE_PARAMS,
      interpret=interp,
  )(q, k, v, bias, do)


def _backward_dkv(q, k, v, bias, do, *, tq, tk, left, right, scale,
                  interpret):
  """(dk [B, Tkp, H, D], dv [B, Tkp, H, V]) per QUERY head, in q.dtype when
  H == Hkv else float32."""
  b, tqp, h, d = q.shape
  tkp, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
  group = h // hkv
  dtype = q.dtype
  out_dtype = dtype if group == 1 else jnp.float32
  c = float(scale) * _LOG2E
  kw = dict(t_src=tk, t_dst=tq, back=right, ahead=left)
  n_q = tqp // _BLOCK
  interp = common.interpret_params(interpret)
  jnp_range = lambda tile: _range(tile, **kw, maximum=jnp.maximum,
                                  minimum=jnp.minimum)

  def sigmoid_dkv(q_ref, k_ref, v_ref, bias_ref, do_ref, dk_ref, dv_ref,
                  k_smem2, v_smem2, out_smem2, bars, *maybe_a):
    wg, hh, kvh, bb, kt, start, cta_end, own_start, own_end = _cta(
        "kv", group, jnp_range)
    k0 = kt * _BLOCK
    k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
    pt_smem, dst_smem = ((maybe_a[0].at[wg], maybe_a[1].at[wg])
                         if maybe_a else (None, None))
    keys = pl.ds(k0, _BLOCK)

    def compute(pipeline):   # per compute warpgroup, around its steps
      b2 = _own_tiles(((k_ref.at[bb, keys, kvh], k_smem),
                       (v_ref.at[bb, keys, kvh], v_smem)), bars, wg,
                      bias_ref, hh)
      dk, dv_, _ = pipeline(
          (plgpu.layout_cast(jnp.zeros((_BLOCK, d), jnp.float32), _WGMMA),
           plgpu.layout_cast(jnp.zeros((_BLOCK, dv), jnp.float32), _WGMMA),
           b2))
      common.store_dkv(
          (dk * float(scale)).astype(out_dtype), dv_.astype(out_dtype),
          dk_ref.at[bb, keys, hh], dv_ref.at[bb, keys, hh], k_smem=k_smem,
          v_smem=v_smem, staging=out_smem2, wg=wg)

    def body(idx, q_smem, do_smem, carry):
      qt = start + idx[0]

      def step(carry, interior):
        dk_acc, dv_acc, b2 = carry
        def mma(st_ref, dpt_ref):
          plgpu.wgmma(st_ref, k_smem, q_smem.transpose((1, 0)))
          plgpu.wgmma(dpt_ref, v_smem, do_smem.transpose((1, 0)))
        st, dpt = _products(mma, [(_BLOCK, _BLOCK)] * 2)   # [keys, queries]
        pt = _probs(st, c, b2, interp)
        pt = _edge_mask(pt, interior, lambda: _visible(
            k0, qt * _BLOCK, tk=tk, left=left, right=right,
            keys_on_rows=True), 0.0)
        dst = pt * (1.0 - pt) * dpt
        pt16 = _a_operand(pt.astype(dtype), pt_smem)
        dst16 = _a_operand(dst.astype(dtype), dst_smem)
        def acc(dk_ref, dv_ref):
          plgpu.wgmma(dv_ref, pt16, do_smem)
          plgpu.wgmma(dk_ref, dst16, q_smem)
        dk_acc, dv_acc = common.accumulate(acc, (dk_acc, dv_acc), interp)
        return dk_acc, dv_acc, b2

      valid = (qt >= own_start) & (qt < own_end)
      interior = _interior(qt * _BLOCK, k0, tk=tk, left=left, right=right)
      return _skip_or(valid, interior, step, carry)

    clamp = lambda i: (jnp.minimum(start + i, n_q - 1), 0)
    pipeline = plgpu.emit_pipeline_warp_specialized(
        body, grid=(jnp.maximum(cta_end - start, 1),),
        memory_registers=_MEMORY_REGS,
        in_specs=[plgpu.BlockSpec((_BLOCK, d), clamp, transforms=_TILED),
                  plgpu.BlockSpec((_BLOCK, dv), clamp, transforms=_TILED)],
        max_concurrent_steps=2, num_compute_wgs=_WGS,
        wg_axis="wg", compute_context=compute)
    pipeline(q_ref.at[bb, :, hh], do_ref.at[bb, :, hh])

  scratch = [plgpu.SMEM((_WGS, _BLOCK, d), dtype, transforms=_TILED),
             plgpu.SMEM((_WGS, _BLOCK, dv), dtype, transforms=_TILED),
             common.dkv_staging(group, _WGS, _BLOCK, d, dv),
             plgpu.Barrier(num_barriers=2 * _WGS)]
  if interp is not None:
    scratch += [plgpu.SMEM((_WGS, _BLOCK, _BLOCK), dtype,
                           transforms=_TILED)] * 2
  return plgpu.kernel(
      sigmoid_dkv,
      out_type=(jax.ShapeDtypeStruct((b, tkp, h, d), out_dtype),
                jax.ShapeDtypeStruct((b, tkp, h, dv), out_dtype)),
      **common.tile_grid("kv", tkp // _BLOCK // _WGS, h, b),
      num_threads=_WGS + 1, thread_name="wg",
      scratch_types=tuple(scratch), compiler_params=common.LANE_PARAMS,
      interpret=interp,
  )(q, k, v, bias, do)


# ------------------------------------------------------------ custom_vjp ---


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9, 10))
def _attention(q, k, v, bias, tq, tk, left, right, scale, pingpong,
               interpret):
  """On padded arrays; bias float32 [H, 64] (each head's value repeated)."""
  return _forward(q, k, v, bias, tq=tq, tk=tk, left=left, right=right,
                  scale=scale, interpret=interpret, pingpong=pingpong)


def _attention_fwd(q, k, v, bias, tq, tk, left, right, scale, pingpong,
                   interpret):
  return _attention(q, k, v, bias, tq, tk, left, right, scale, pingpong,
                    interpret), (q, k, v, bias)


def _attention_bwd(tq, tk, left, right, scale, pingpong, interpret, res, do):
  q, k, v, bias = res
  do = do.astype(q.dtype)
  kw = dict(tq=tq, tk=tk, left=left, right=right, scale=scale,
            interpret=interpret)
  dq, dsum = _backward_dq(q, k, v, bias, do, **kw)
  dk, dv = _backward_dkv(q, k, v, bias, do, **kw)
  h, hkv = q.shape[2], k.shape[2]
  if h != hkv:   # sum each group of H // Hkv query heads into its kv head
    sum_heads = lambda x: x.reshape(
        *x.shape[:2], hkv, h // hkv, x.shape[-1]).sum(axis=3)
    dk, dv = sum_heads(dk), sum_heads(dv)
  d_bias = jnp.zeros_like(bias).at[:, 0].set(dsum[:, :, :tq].sum(axis=(0, 2)))
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), d_bias


_attention.defvjp(_attention_fwd, _attention_bwd)


def _check(q, k, v, bias, left, right):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be rank 4 [B, T, heads, dim], got "
                     f"{q.shape}, {k.shape}, {v.shape}")
  b, tq, h, d = q.shape
  tk, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
  if k.shape != (b, tk, hkv, d):
    raise ValueError(f"k.shape={k.shape} must be {(b, tk, hkv, d)} "
                     f"(q.shape={q.shape})")
  if v.shape[:3] != (b, tk, hkv):
    raise ValueError(f"v.shape={v.shape} must start with {(b, tk, hkv)}")
  if tq < 1 or tk < 1 or hkv < 1 or h % hkv:
    raise ValueError(f"Tq={tq}, Tk={tk} must be >= 1 and H={h} a multiple "
                     f"of Hkv={hkv}")
  if q.dtype != k.dtype or q.dtype != v.dtype:
    raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, "
                     f"{v.dtype}")
  if jnp.dtype(q.dtype) not in map(jnp.dtype, SUPPORTED_DTYPES):
    raise ValueError(f"dtype={q.dtype} unsupported: expected bfloat16 or "
                     f"float16")
  if d not in SUPPORTED_HEAD_DIMS or dv not in SUPPORTED_HEAD_DIMS:
    raise ValueError(f"head dims D={d}, V={dv} must be in "
                     f"{SUPPORTED_HEAD_DIMS}")
  if getattr(bias, "shape", None) != (h,):
    raise ValueError(f"bias.shape={getattr(bias, 'shape', None)} must be "
                     f"({h},): one bias per query head")
  for name, w in (("left", left), ("right", right)):
    if w is not None and (not isinstance(w, int) or isinstance(w, bool)
                          or w < 0):
      raise ValueError(f"{name}={w!r} must be None or an int >= 0")
  if (left is not None or right is not None) and tq != tk:
    raise ValueError(f"a window (left={left}, right={right}) needs Tq == Tk, "
                     f"got Tq={tq}, Tk={tk}")


def sigmoid_attention(q, k, v, bias, *, left, right, scale: float,
                      interpret=False, pingpong=True) -> jax.Array:
  """Sigmoid attention (module docstring) on Hopper, differentiable in q, k,
  v and bias.

  Args:
    q: [B, Tq, H, D] bfloat16 or float16; D in SUPPORTED_HEAD_DIMS.
    k: [B, Tk, Hkv, D], v: [B, Tk, Hkv, V], same dtype; H % Hkv == 0.
    bias: float32 [H], added to the scaled scores of query head h.
    left, right: None (unbounded) or ints >= 0; a window needs Tq == Tk.
    scale: Python float multiplying q . k.
    interpret: False, True (`plgpu.InterpretGPUParams()`) or an
      `InterpretGPUParams`: Mosaic GPU interpret mode on CPU.
    pingpong: the forward kernel's two compute warpgroups take turns on the
      tensor cores (`common.Turns`; module docstring). On by default;
      False is for comparison.

  Returns:
    [B, Tq, H, V] in q.dtype.

  Raises:
    ValueError: bad ranks/shapes, dtype not bf16/f16, D or V not in
      (64, 128), bias not of shape [H], bad windows, a non-bool pingpong.
  """
  _check(q, k, v, bias, left, right)
  if not isinstance(pingpong, bool):
    raise ValueError(f"pingpong={pingpong!r} must be a bool")
  tq, tk = q.shape[1], k.shape[1]
  if left is not None:
    left = min(left, tk - 1)
  if right is not None:
    right = min(right, tk - 1)
  pad_to = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0),
                                    (0, 0)))
  tqp, tkp = -(-tq // _PAD) * _PAD, -(-tk // _PAD) * _PAD
  bias_rows = jnp.broadcast_to(
      jnp.asarray(bias, jnp.float32)[:, None], (q.shape[2], _BLOCK))
  o = _attention(pad_to(q, tqp), pad_to(k, tkp), pad_to(v, tkp), bias_rows,
                 tq, tk, left, right, float(scale), pingpong, interpret)
  return o[:, :tq]
