"""Pallas TPU (Mosaic) neighborhood attention (1-D/2-D/3-D) as block-sparse
attention over a static plan (`plan.py`).

For batch b, query head h (which reads kv head h // (H // Hkv)) and a query
token i, N(i) is NATTEN's neighborhood (dilation, odd/even kernel, stride,
causal per axis; rules in plan.py's docstring) and

  s_ij = scale * q_i . k_j,      lse_i = log sum_{j in N(i)} exp(s_ij)
  o_i  = sum_{j in N(i)} exp(s_ij - lse_i) v_j

accumulated in float32 and returned in q.dtype.

Layout. `plan.neighborhood_plan` permutes the N tokens into R padded kernel
rows (each block of rows one multi-dimensional tile of one dilation group)
and gives every query row a box [q_lo, q_hi] of key coordinates and every
key row a coordinate k_coord, so that

  mask(i, j) = AND_a  q_lo[i, a] <= k_coord[j, a] <= q_hi[i, a].

The rows are gathered by `perm` in XLA ([B, *S, H, X] -> [B, H, R, X]), the
kernels run on them, and the output is gathered back by `inv` (permute.py:
the VJPs of both maps are gathers too, not scatter-adds).

Block sparsity. Per query tile the plan lists its visited key tiles (some
query of the tile sees some key of the tile) with a count and, per pair, an
*interior* flag (every query sees every key: no mask work). The lists reach
the kernels by scalar prefetch; the grid is

  (B, H, query tiles, max count)   (last axis "arbitrary", the rest "parallel")

and the key index map reads list[min(step, count - 1)]: a step past the list
re-uses the block of the step before (no new DMA) and its compute is skipped
with `pl.when`. Only non-interior pairs build the box mask, from a [bq, 2A]
block of (q_lo, q_hi) and an [A, bk] block of key coordinates.

Forward (per query tile, online softmax over its key tiles; m, l, acc are
float32 VMEM scratch; masked scores are a large finite negative):

  m' = max(m, rowmax(s)),  p = exp(s - m'),  alpha = exp(m - m')
  l' = alpha l + rowsum(p),  acc' = alpha acc + p V
  o  = acc / l,  lse = m + log l    (lse is saved for the backward)

Padded query rows see nothing; their (finite) outputs are dropped.

Backward, with dO the output cotangent and delta_i = dO_i . o_i (in XLA):

  p_ij  = exp(s_ij - lse_i)  (0 outside N(i)),  dp_ij = dO_i . v_j
  ds_ij = p_ij (dp_ij - delta_i)
  dq_i  = scale sum_j ds_ij k_j      (kernel 1: per query tile, its key tiles)
  dk_j  = scale sum_i ds_ij q_i      (kernel 2: per key tile, the query tiles
  dv_j  = sum_i p_ij dO_i             reaching it: the plan's transposed lists)

The second kernel works on s^T = K Q^T so that lse and delta enter as
[1, bq] rows; dk, dv are produced per query head (float32) and summed over
each GQA group in XLA. The XLA gathers' transposes carry the gradients back
to token order (padded rows get zero cotangents).

Precision: matmuls accumulate in float32. bfloat16 inputs keep bfloat16 MXU
operands (p and ds are cast before their matmul); float32 inputs run every
matmul at Precision.HIGHEST; float16 is upcast to float32 in XLA.

Head dims D (q, k) and V (v) must be in SUPPORTED_HEAD_DIMS. Tiles hold
prod(tile_shape) rows (default 128: e.g. 8 x 16 in 2-D, 4 x 4 x 8 in 3-D);
on TPU the volume must be a multiple of 128 ([1, block] lse rows are
lane-tiled), smaller tiles are for interpret mode.
"""

from __future__ import annotations

import functools
import math

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np

from kernels_pallas.local_attention import _tpu_common as common
from kernels_pallas.local_attention import permute
from kernels_pallas.local_attention import plan as plan_lib

SUPPORTED_HEAD_DIMS = common.SUPPORTED_HEAD_DIMS
SUPPORTED_DTYPES = common.SUPPORTED_DTYPES
supports = common.supports
_LANES, _MASK_VALUE = common.LANES, common.MASK_VALUE
_NN, _NT = common.NN, common.NT
_dot, _precision = common.dot, common.precision
_run_masked_or_not, _is_int = common.run_masked_or_not, common.is_int
_FN = "neighborhood_attention"


# ---------------------------------------------------------------------------
# Shared pieces.
# ---------------------------------------------------------------------------


def _entry(row, step, count_ref, width):
  """Flat index of the list entry at `step` of `row` (clamped to the last)."""
  return row * width + jnp.minimum(step, count_ref[row] - 1)


def _box_mask(box_col_ref, coord_row_ref, axes):
  """[rows, cols] bool from box columns and coordinate rows.

  box_col_ref [rows, 2A] (lo then hi per axis), coord_row_ref [A, cols]:
  row r sees column c iff lo[r, a] <= coord[a, c] <= hi[r, a] on every a.
  """
  out = None
  for a in range(axes):
    lo = box_col_ref[:, a:a + 1]  # [rows, 1]
    hi = box_col_ref[:, axes + a:axes + a + 1]
    c = coord_row_ref[a:a + 1, :]  # [1, cols]
    ok = (c >= lo) & (c <= hi)
    out = ok if out is None else out & ok
  return out


def _box_mask_t(coord_col_ref, box_row_ref, axes):
  """Transposed: [keys, queries] from key coordinate columns [bk, A] and
  query box rows [2A, bq]."""
  out = None
  for a in range(axes):
    c = coord_col_ref[:, a:a + 1]  # [bk, 1]
    lo = box_row_ref[a:a + 1, :]  # [1, bq]
    hi = box_row_ref[axes + a:axes + a + 1, :]
    ok = (c >= lo) & (c <= hi)
    out = ok if out is None else out & ok
  return out


def _plan_arrays(plan):
  """Device-side tables: boxes and coordinates in both layouts, lists flat."""
  box = np.concatenate([plan.q_lo, plan.q_hi], axis=1)  # [R, 2A]
  return dict(
      box=jnp.asarray(box), box_t=jnp.asarray(np.ascontiguousarray(box.T)),
      kc=jnp.asarray(plan.k_coord),
      kc_t=jnp.asarray(np.ascontiguousarray(plan.k_coord.T)),
      kv_tiles=jnp.asarray(plan.kv_tiles.reshape(-1)),
      kv_count=jnp.asarray(plan.kv_count),
      kv_interior=jnp.asarray(plan.kv_interior.reshape(-1).astype(np.int32)),
      q_tiles=jnp.asarray(plan.q_tiles.reshape(-1)),
      q_count=jnp.asarray(plan.q_count),
      q_interior=jnp.asarray(plan.q_interior.reshape(-1).astype(np.int32)))


# ---------------------------------------------------------------------------
# Forward.
# ---------------------------------------------------------------------------


def _fwd_kernel(tiles_ref, count_ref, inter_ref, q_ref, k_ref, v_ref, box_ref,
                kc_t_ref, o_ref, *refs, width, axes, scale, precision):
  """One (b, h, query tile, step) grid point; refs: [lse], m, l, acc."""
  lse_ref, (m_sc, l_sc, acc_sc) = (None, refs) if len(refs) == 3 else (
      refs[0], refs[1:])
  # q [bq, D], k [bk, D], v [bk, V]; box [bq, 2A], kc_t [A, bk] int32;
  # o [bq, V]; lse, m, l [bq, 128] f32 (lanes equal), acc [bq, V] f32.
  qi = pl.program_id(2)
  step = pl.program_id(3)
  e = _entry(qi, step, count_ref, width)

  @pl.when(step == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  def body(masked):
    v = v_ref[...]
    s = _dot(q_ref[...], k_ref[...], _NT, precision) * scale  # [bq, bk] f32
    if masked:
      s = jnp.where(_box_mask(box_ref, kc_t_ref, axes), s, _MASK_VALUE)
    m_prev = m_sc[...]  # [bq, 128]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_next)
    p = jnp.exp(s - m_next[:, :1])  # [bq, bk] f32
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
    m_sc[...] = m_next
    pv = _dot(p.astype(v.dtype), v, _NN, precision)  # [bq, V] f32
    acc_sc[...] = alpha[:, :1] * acc_sc[...] + pv

  _run_masked_or_not(body, step < count_ref[qi], inter_ref[e] != 0)

  @pl.when(step == pl.num_programs(3) - 1)
  def _final():
    l = l_sc[...]
    o_ref[...] = (acc_sc[...] / l[:, :1]).astype(o_ref.dtype)
    if lse_ref is not None:
      lse_ref[...] = m_sc[...] + jnp.log(l)


def _fwd_call(q, k, v, *, plan, scale, interpret, save_lse=True):
  """q [B, H, R, D], k [B, Hkv, R, D], v [B, Hkv, R, V] (plan rows) ->
  (o [B, H, R, V] in q.dtype, lse [B, H, R] float32 or None)."""
  b, h, rows, d = q.shape
  rep = h // k.shape[1]
  dv = v.shape[-1]
  bq, bk = plan.block_q, plan.block_k
  axes = plan.q_lo.shape[1]
  nq = rows // bq
  width = plan.kv_tiles.shape[1]
  arr = _plan_arrays(plan)
  sq = pl.Squeezed()

  def kv_map(bi, hi, qi, si, tiles_ref, count_ref, _):
    return bi, hi // rep, tiles_ref[_entry(qi, si, count_ref, width)], 0

  def kc_map(bi, hi, qi, si, tiles_ref, count_ref, _):
    return 0, tiles_ref[_entry(qi, si, count_ref, width)]

  q_map = lambda bi, hi, qi, si, *_: (bi, hi, qi, 0)
  box_map = lambda bi, hi, qi, si, *_: (qi, 0)
  kernel = functools.partial(_fwd_kernel, width=width, axes=axes,
                             scale=scale, precision=_precision(q.dtype))
  visited = plan.visited_pairs
  itemsize = jnp.dtype(q.dtype).itemsize
  out_specs = [pl.BlockSpec((sq, sq, bq, dv), q_map)]
  out_shape = [jax.ShapeDtypeStruct((b, h, rows, dv), q.dtype)]
  if save_lse:
    out_specs.append(pl.BlockSpec((sq, sq, bq, _LANES), q_map))
    out_shape.append(jax.ShapeDtypeStruct((b, h, rows, _LANES), jnp.float32))
  outs = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(b, h, nq, width),
          in_specs=[pl.BlockSpec((sq, sq, bq, d), q_map),
                    pl.BlockSpec((sq, sq, bk, d), kv_map),
                    pl.BlockSpec((sq, sq, bk, dv), kv_map),
                    pl.BlockSpec((bq, 2 * axes), box_map),
                    pl.BlockSpec((axes, bk), kc_map)],
          out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM((bq, _LANES), jnp.float32),
                          pltpu.VMEM((bq, _LANES), jnp.float32),
                          pltpu.VMEM((bq, dv), jnp.float32)],
      ),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel",
                               "arbitrary")),
      cost_estimate=pl.CostEstimate(
          flops=2 * b * h * visited * bq * bk * (d + dv),
          transcendentals=b * h * visited * bq * bk,
          bytes_accessed=(itemsize * (q.size + b * h * rows * dv
                                      + b * h * visited * bk * (d + dv))
                          + (4 * b * h * rows * _LANES if save_lse else 0))),
      interpret=interpret,
      name="neighborhood_attention_fwd",
  )(arr["kv_tiles"], arr["kv_count"], arr["kv_interior"], q, k, v,
    arr["box"], arr["kc_t"])
  return outs[0], (outs[1][..., 0] if save_lse else None)


# ---------------------------------------------------------------------------
# Backward.
# ---------------------------------------------------------------------------


def _bwd_dq_kernel(tiles_ref, count_ref, inter_ref, q_ref, k_ref, v_ref,
                   do_ref, lse_ref, delta_ref, box_ref, kc_t_ref, dq_ref,
                   dq_sc, *, width, axes, scale, precision):
  """dq for one (b, h, query tile, step); the query tile's key tiles."""
  # q [bq, D], k [bk, D], v [bk, V], dO [bq, V]; lse, delta [1, bq] f32;
  # box [bq, 2A], kc_t [A, bk]; dq (out) and dq_sc [bq, D] f32.
  qi = pl.program_id(2)
  step = pl.program_id(3)
  e = _entry(qi, step, count_ref, width)

  @pl.when(step == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  def body(masked):
    k = k_ref[...]
    lse = lse_ref[0][:, None]  # [bq, 1]
    delta = delta_ref[0][:, None]
    s = _dot(q_ref[...], k, _NT, precision) * scale  # [bq, bk] f32
    p = jnp.exp(s - lse)
    if masked:
      p = jnp.where(_box_mask(box_ref, kc_t_ref, axes), p, 0.0)
    dp = _dot(do_ref[...], v_ref[...], _NT, precision)  # [bq, bk] f32
    ds = p * (dp - delta)
    dq_sc[...] += _dot(ds.astype(k.dtype), k, _NN, precision)  # [bq, D]

  _run_masked_or_not(body, step < count_ref[qi], inter_ref[e] != 0)

  @pl.when(step == pl.num_programs(3) - 1)
  def _final():
    dq_ref[...] = scale * dq_sc[...]


def _bwd_dkv_kernel(tiles_ref, count_ref, inter_ref, q_ref, k_ref, v_ref,
                    do_ref, lse_ref, delta_ref, box_t_ref, kc_ref, dk_ref,
                    dv_ref, dk_sc, dv_sc, *, width, axes, scale, precision):
  """dk, dv for one (b, h, key tile, step); the query tiles reaching it."""
  # q [bq, D], k [bk, D], v [bk, V], dO [bq, V]; lse, delta [1, bq] f32 rows;
  # box_t [2A, bq], kc [bk, A]; dk [bk, D], dv [bk, V] f32 (per query head).
  kj = pl.program_id(2)
  step = pl.program_id(3)
  e = _entry(kj, step, count_ref, width)

  @pl.when(step == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  def body(masked):
    q = q_ref[...]
    do = do_ref[...]
    s_t = _dot(k_ref[...], q, _NT, precision) * scale  # s^T [bk, bq] f32
    p_t = jnp.exp(s_t - lse_ref[...])  # lse row [1, bq]
    if masked:
      p_t = jnp.where(_box_mask_t(kc_ref, box_t_ref, axes), p_t, 0.0)
    dv_sc[...] += _dot(p_t.astype(do.dtype), do, _NN, precision)  # [bk, V]
    dp_t = _dot(v_ref[...], do, _NT, precision)  # [bk, bq] f32
    ds_t = p_t * (dp_t - delta_ref[...])
    dk_sc[...] += _dot(ds_t.astype(q.dtype), q, _NN, precision)  # [bk, D]

  _run_masked_or_not(body, step < count_ref[kj], inter_ref[e] != 0)

  @pl.when(step == pl.num_programs(3) - 1)
  def _final():
    dk_ref[...] = scale * dk_sc[...]
    dv_ref[...] = dv_sc[...]


def _bwd_call(q, k, v, o, lse, d_o, *, plan, scale, interpret):
  """Plan-row [B, H(kv), R, *] inputs -> (dq [B, H, R, D], dk [B, Hkv, R, D],
  dv [B, Hkv, R, V]), all float32."""
  b, h, rows, d = q.shape
  hkv = k.shape[1]
  rep = h // hkv
  dv = v.shape[-1]
  bq, bk = plan.block_q, plan.block_k
  axes = plan.q_lo.shape[1]
  sq = pl.Squeezed()
  precision = _precision(q.dtype)
  itemsize = jnp.dtype(q.dtype).itemsize
  arr = _plan_arrays(plan)
  delta = jnp.sum(d_o.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
  lse_rows = lse.reshape(b, h, 1, rows)
  delta_rows = delta.reshape(b, h, 1, rows)
  params = pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))
  args = (q, k, v, d_o, lse_rows, delta_rows)

  # dq: rows are query tiles, the steps walk their key tiles.
  width = plan.kv_tiles.shape[1]
  visited = int(plan.kv_count.sum())

  def kv_map(bi, hi, qi, si, tiles_ref, count_ref, _):
    return bi, hi // rep, tiles_ref[_entry(qi, si, count_ref, width)], 0

  def kc_map(bi, hi, qi, si, tiles_ref, count_ref, _):
    return 0, tiles_ref[_entry(qi, si, count_ref, width)]

  q_map = lambda bi, hi, qi, si, *_: (bi, hi, qi, 0)
  row_map = lambda bi, hi, qi, si, *_: (bi, hi, 0, qi)
  box_map = lambda bi, hi, qi, si, *_: (qi, 0)
  dq = pl.pallas_call(
      functools.partial(_bwd_dq_kernel, width=width, axes=axes, scale=scale,
                        precision=precision),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(b, h, rows // bq, width),
          in_specs=[pl.BlockSpec((sq, sq, bq, d), q_map),
                    pl.BlockSpec((sq, sq, bk, d), kv_map),
                    pl.BlockSpec((sq, sq, bk, dv), kv_map),
                    pl.BlockSpec((sq, sq, bq, dv), q_map),
                    pl.BlockSpec((sq, sq, 1, bq), row_map),
                    pl.BlockSpec((sq, sq, 1, bq), row_map),
                    pl.BlockSpec((bq, 2 * axes), box_map),
                    pl.BlockSpec((axes, bk), kc_map)],
          out_specs=pl.BlockSpec((sq, sq, bq, d), q_map),
          scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
      ),
      out_shape=jax.ShapeDtypeStruct((b, h, rows, d), jnp.float32),
      compiler_params=params,
      cost_estimate=pl.CostEstimate(
          flops=2 * b * h * visited * bq * bk * (2 * d + dv),
          transcendentals=b * h * visited * bq * bk,
          bytes_accessed=(itemsize * (q.size + d_o.size
                                      + b * h * visited * bk * (d + dv))
                          + 4 * b * h * rows * (d + 2))),
      interpret=interpret,
      name="neighborhood_attention_bwd_dq",
  )(arr["kv_tiles"], arr["kv_count"], arr["kv_interior"], *args, arr["box"],
    arr["kc_t"])

  # dk, dv: rows are key tiles, the steps walk the query tiles reaching them.
  width = plan.q_tiles.shape[1]
  visited = int(plan.q_count.sum())

  def qside_map(bi, hi, kj, si, tiles_ref, count_ref, _):
    return bi, hi, tiles_ref[_entry(kj, si, count_ref, width)], 0

  def qrow_map(bi, hi, kj, si, tiles_ref, count_ref, _):
    return bi, hi, 0, tiles_ref[_entry(kj, si, count_ref, width)]

  def box_t_map(bi, hi, kj, si, tiles_ref, count_ref, _):
    return 0, tiles_ref[_entry(kj, si, count_ref, width)]

  k_map = lambda bi, hi, kj, si, *_: (bi, hi // rep, kj, 0)
  out_map = lambda bi, hi, kj, si, *_: (bi, hi, kj, 0)
  kc_map = lambda bi, hi, kj, si, *_: (kj, 0)
  dk_h, dv_h = pl.pallas_call(
      functools.partial(_bwd_dkv_kernel, width=width, axes=axes, scale=scale,
                        precision=precision),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(b, h, rows // bk, width),
          in_specs=[pl.BlockSpec((sq, sq, bq, d), qside_map),
                    pl.BlockSpec((sq, sq, bk, d), k_map),
                    pl.BlockSpec((sq, sq, bk, dv), k_map),
                    pl.BlockSpec((sq, sq, bq, dv), qside_map),
                    pl.BlockSpec((sq, sq, 1, bq), qrow_map),
                    pl.BlockSpec((sq, sq, 1, bq), qrow_map),
                    pl.BlockSpec((2 * axes, bq), box_t_map),
                    pl.BlockSpec((bk, axes), kc_map)],
          out_specs=[pl.BlockSpec((sq, sq, bk, d), out_map),
                     pl.BlockSpec((sq, sq, bk, dv), out_map)],
          scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32),
                          pltpu.VMEM((bk, dv), jnp.float32)],
      ),
      out_shape=[jax.ShapeDtypeStruct((b, h, rows, d), jnp.float32),
                 jax.ShapeDtypeStruct((b, h, rows, dv), jnp.float32)],
      compiler_params=params,
      cost_estimate=pl.CostEstimate(
          flops=2 * b * h * visited * bq * bk * (2 * d + 2 * dv),
          transcendentals=b * h * visited * bq * bk,
          bytes_accessed=(itemsize * (rep * (k.size + v.size)
                                      + b * h * visited * bq * (d + dv))
                          + 4 * b * h * (visited * bq * 2
                                         + rows * (d + dv)))),
      interpret=interpret,
      name="neighborhood_attention_bwd_dkv",
  )(arr["q_tiles"], arr["q_count"], arr["q_interior"], *args, arr["box_t"],
    arr["kc"])
  dk = dk_h.reshape(b, hkv, rep, rows, d).sum(axis=2)
  dv_out = dv_h.reshape(b, hkv, rep, rows, dv).sum(axis=2)
  return dq, dk, dv_out


# ---------------------------------------------------------------------------
# Public entry point.
# ---------------------------------------------------------------------------


def _raise(name, got, want):
  raise ValueError(f"{_FN}: {name} is {got!r}; expected {want}.")


def _per_axis(name, x, rank, is_item):
  items = tuple(x) if isinstance(x, (tuple, list)) else (x,)
  if len(items) != rank or not all(is_item(i) for i in items):
    _raise(name, x, f"a tuple of {rank} per-axis values")
  return items


def _check_args(q, k, v, kernel_size, dilation, stride, is_causal, scale,
                tile_shape):
  """Validates what the kernels need; returns the per-axis tuples."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) not in (4, 5, 6):
      _raise(f"{name}.shape", getattr(x, "shape", type(x)),
             "rank 4 to 6 ([B, *S, H, D], 1 to 3 spatial axes)")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not any(jnp.dtype(x.dtype) == jnp.dtype(s) for s in SUPPORTED_DTYPES):
      _raise(f"{name}.dtype", x.dtype, "one of bfloat16, float16, float32")
  if not q.dtype == k.dtype == v.dtype:
    _raise("k.dtype/v.dtype", (k.dtype, v.dtype), f"q.dtype {q.dtype}")
  rank = q.ndim - 3
  d, h = q.shape[-1], q.shape[-2]
  hkv = k.shape[-2] if k.ndim == q.ndim else None
  if k.ndim != q.ndim or k.shape[:-2] != q.shape[:-2] or k.shape[-1] != d:
    _raise("k.shape", k.shape, f"[{', '.join(map(str, q.shape[:-2]))}, Hkv, "
           f"D={d}]")
  if v.ndim != q.ndim or v.shape[:-1] != k.shape[:-1]:
    _raise("v.shape", v.shape, f"{k.shape[:-1]} + (V,) (matching k)")
  if hkv < 1 or h % hkv:
    _raise("k.shape[-2] (Hkv)", hkv, f"a divisor of H={h}")
  if d not in SUPPORTED_HEAD_DIMS:
    _raise("q.shape[-1] (D)", d, f"one of {SUPPORTED_HEAD_DIMS}")
  if v.shape[-1] not in SUPPORTED_HEAD_DIMS:
    _raise("v.shape[-1] (V)", v.shape[-1], f"one of {SUPPORTED_HEAD_DIMS}")
  ks = _per_axis("kernel_size", kernel_size, rank, _is_int)
  ds = _per_axis("dilation", dilation, rank, _is_int)
  ss = _per_axis("stride", stride, rank, _is_int)
  cs = _per_axis("is_causal", is_causal, rank,
                 lambda x: isinstance(x, (bool, np.bool_)))
  spatial = q.shape[1:1 + rank]
  for a in range(rank):
    if not (ks[a] >= 2 and ds[a] >= 1 and 1 <= ss[a] <= ks[a]
            and ks[a] * ds[a] <= spatial[a]):
      _raise(f"(kernel_size, dilation, stride)[axis {a}]",
             (ks[a], ds[a], ss[a]),
             f"kernel_size >= 2, dilation >= 1, 1 <= stride <= kernel_size "
             f"and kernel_size * dilation <= {spatial[a]}")
  if (isinstance(scale, bool)
      or not isinstance(scale, (int, float, np.floating))
      or not math.isfinite(scale)):
    _raise("scale", scale, "a finite Python float")
  if tile_shape is not None:
    tile_shape = _per_axis("tile_shape", tile_shape, rank, _is_int)
    if min(tile_shape) < 1:
      _raise("tile_shape", tile_shape, "positive ints")
  return (tuple(map(int, ks)), tuple(map(int, ds)), tuple(map(int, ss)),
          tuple(map(bool, cs)), tile_shape)


def neighborhood_attention(q, k, v, *, kernel_size, dilation, stride,
                           is_causal, scale, interpret=False,
                           tile_shape=None) -> jax.Array:
  """Neighborhood attention (NATTEN semantics, math in the module docstring).

  Args:
    q: queries [B, *S, H, D], 1 to 3 spatial axes S; D in
      SUPPORTED_HEAD_DIMS.
    k: keys [B, *S, Hkv, D], q.dtype; H % Hkv == 0 (query head h reads kv
      head h // (H // Hkv)).
    v: values [B, *S, Hkv, V], q.dtype; V in SUPPORTED_HEAD_DIMS.
    kernel_size, dilation, stride: per-axis tuples of Python ints (NATTEN's
      rules: kernel >= 2, dilation >= 1, 1 <= stride <= kernel,
      kernel * dilation <= the axis length).
    is_causal: per-axis tuple of bools.
    scale: Python float multiplying q . k.
    interpret: False, True (Pallas TPU interpret mode with default
      `pltpu.InterpretParams()`) or a `pltpu.InterpretParams`.
    tile_shape: tokens per tile along each axis (query and key tiles alike);
      default `plan.default_tile_shape` (volume 128). On TPU the volume must
      be a multiple of 128; smaller volumes (multiples of 8) only with
      interpret.

  Returns:
    [B, *S, H, V] in q.dtype; differentiable in q, k, v (jax.custom_vjp whose
    backward is the dq and dk/dv kernels).

  Raises:
    ValueError: a precondition does not hold (the message names the argument),
      raised before any kernel is traced.
  """
  ks, ds, ss, cs, tile_shape = _check_args(q, k, v, kernel_size, dilation,
                                           stride, is_causal, scale,
                                           tile_shape)
  if interpret is True:
    interpret = pltpu.InterpretParams()
  elif interpret is None:
    interpret = False
  rank = len(ks)
  spatial = tuple(q.shape[1:1 + rank])
  plan = plan_lib.neighborhood_plan(spatial, ks, ds, ss, cs, tile_shape)
  block = plan.block_q
  if block % 8 or (not interpret and block % _LANES):
    _raise("tile_shape volume", block,
           f"a multiple of {_LANES} on TPU (multiples of 8 with interpret)")
  dtype = q.dtype
  if jnp.dtype(dtype) == jnp.float16:
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  b, n = q.shape[0], plan.n_tokens
  # Padded rows read token 0; the maps' VJPs are gathers (permute.py).
  to_rows, _ = permute.row_maps(plan.perm, plan.inv, axis=1)
  _, from_rows = permute.row_maps(plan.perm, plan.inv, axis=2)
  cfg = dict(plan=plan, scale=float(scale), interpret=interpret)

  def to_kernel(x):  # [B, *S, H, X] -> [B, H, R, X]
    x = x.reshape(b, n, x.shape[-2], x.shape[-1])
    return jnp.swapaxes(to_rows(x), 1, 2)

  def from_kernel(x):  # [B, H, R, X] -> [B, *S, H, X]
    x = jnp.swapaxes(from_rows(x), 1, 2)
    return x.reshape(b, *spatial, x.shape[-2], x.shape[-1])

  @jax.custom_vjp
  def attend(qp, kp, vp):
    return _fwd_call(qp, kp, vp, save_lse=False, **cfg)[0]

  def attend_fwd(qp, kp, vp):
    o, lse = _fwd_call(qp, kp, vp, **cfg)
    return o, (qp, kp, vp, o, lse)

  def attend_bwd(res, d_o):
    qp, kp, vp, o, lse = res
    dq, dk, dv = _bwd_call(qp, kp, vp, o, lse, d_o.astype(o.dtype), **cfg)
    return dq.astype(qp.dtype), dk.astype(kp.dtype), dv.astype(vp.dtype)

  attend.defvjp(attend_fwd, attend_bwd)
  o = attend(to_kernel(q), to_kernel(k), to_kernel(v))
  return from_kernel(o).astype(dtype)
