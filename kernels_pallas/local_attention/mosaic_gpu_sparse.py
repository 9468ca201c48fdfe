"""Neighborhood attention (1-D/2-D/3-D) for Hopper GPUs as block-sparse
Mosaic GPU (Pallas) kernels over a static plan (`plan.py`), forward and
backward, with a `jax.custom_vjp`.

The math. For batch b, query head h (reading kv head h // (H // Hkv)) and
query token i with NATTEN neighborhood N(i) (dilation, odd/even kernel,
stride, causal per axis; the rules are in plan.py's docstring):

  s_ij  = scale * q_i . k_j                        (j in N(i) only)
  lse_i = log sum_{j in N(i)} exp(s_ij)
  o_i   = sum_{j in N(i)} p_ij v_j,   p_ij = exp(s_ij - lse_i).

With dO the output cotangent and delta_i = dO_i . o_i (computed in XLA):

  dp_ij = dO_i . v_j,   ds_ij = p_ij (dp_ij - delta_i)     (0 off N(i))
  dq_i  = scale sum_j ds_ij k_j
  dk_j  = scale sum_i ds_ij q_i,   dv_j = sum_i p_ij dO_i.

Layout. `plan.neighborhood_plan` with tiles of 64 tokens (8 x 8 in 2-D,
4 x 4 x 4 in 3-D, 64 in 1-D; any `tile_shape` of volume 64) orders the N
tokens into R >= N padded kernel rows, each block of 64 rows one
multi-dimensional tile of one dilation group, and gives query row r the box
q_lo[r] <= . <= q_hi[r] of key coordinates and key row r the point
k_coord[r]:

  r sees r'  iff  AND_a  q_lo[r, a] <= k_coord[r', a] <= q_hi[r, a].

XLA gathers the rows ([B, *S, H, X] -> [B, R, H, X]), the kernels run on
them, and XLA gathers the output back (padded rows read token 0 and are
never seen; their cotangents are exactly 0).

Block sparsity. A CTA handles one (64-row tile, head, batch). The plan
lists, per query tile, its visited key tiles (ascending) with a count; the
transposed lists give, per key tile, the query tiles reaching it. The
lists are int32 GMEM inputs read as scalars: the CTA reads count[tile] and
runs an `emit_pipeline` of exactly that many steps (a dynamic grid: there is
no step past the count, so nothing is loaded or computed for it); step i
TMA-loads (double-buffered) the partner tile list[tile, i] and its mask.

Masks. `plan.mask_tiles` gives every visited pair the id of its [64, 64]
mask among the plan's distinct ones (a neighborhood repeats a few relative
offsets: 50 distinct masks for 2116 pairs at kernel 13 on 128 x 128 tokens;
id 0, all visible, serves every interior pair). The masks are a bfloat16
table of additive biases in log2 units, 0 where visible and `common.MASK`
elsewhere (transposed for dk/dv), and the pipeline loads the step's bias
tile beside K and V; every step adds it to its scores, s' = s log2(e) scale
+ bias, with no branch and no per-element comparison. This replaced box
masks evaluated in the kernel (2A comparisons an element, behind a branch
on an interior flag): the three kernels together 1.09-1.36x faster on
the H200, dq up to 1.57x (BENCHMARKS.md 4f).

Kernels (one warpgroup per CTA; every matmul a wgmma with float32
accumulation; P and dS rounded to the input dtype before their matmul):

  forward  (grid: query tiles, H, B): online softmax in base 2 over the
    listed key tiles,
      m' = max(m, rowmax(s')),  l' = 2^(m - m') l + rowsum(2^(s' - m')),
      acc' = 2^(m - m') acc + 2^(s' - m') V,
    then o = acc / l (stored through Q's SMEM buffer when D == V) and
    lse' = m + log2 l (saved, in log2 units).
  dq       (same grid and lists): p = 2^(s' - lse'), dp = dO V^T,
    dq += ds K, scaled at the end (stored through Q's buffer).
  dk/dv    (grid: key tiles, H, B; transposed lists): on s^T = K Q^T so
    that lse and delta arrive as per-column vectors (pipelined with Q and
    dO); per QUERY head, in float32 when H > Hkv, and each group of
    H // Hkv heads is summed in XLA. With H == Hkv the outputs leave
    through K and V's own buffers, so two CTAs fit an SM.

Masked scores are the large finite negative `common.MASK` (the bias
swamps the score: bias + s == bias in float32), not -inf: a row whose
first tiles show it no key never takes inf - inf, and its junk sums are
scaled by 2^(MASK - m) = 0 once a visible key arrives (every real query
sees itself). Padded query rows (empty boxes) keep junk, finite outputs
that are dropped.

Supported: bfloat16/float16 inputs (float32 raises ValueError; the op
falls back to "xla" only when no implementation is named), D and V in
(64, 128) (the op zero-pads smaller head dims), tile volume 64.

Interpret mode (`interpret=True`: Mosaic GPU's CPU interpreter) runs the
same kernels, with P and dS staged through SMEM and accumulators started
at zero (see mosaic_gpu_common).
"""

from __future__ import annotations

import functools
import math

import jax
from jax import lax
import jax.experimental.pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np

from kernels_pallas import mosaic_gpu_common as common
from kernels_pallas.local_attention import mosaic_gpu as swa_gpu
from kernels_pallas.local_attention import plan as plan_lib

SUPPORTED_HEAD_DIMS = swa_gpu.SUPPORTED_HEAD_DIMS
SUPPORTED_DTYPES = swa_gpu.SUPPORTED_DTYPES
supports = swa_gpu.supports
BLOCK = 64   # rows of a query / key tile: the plan's tile volume
_FN = "neighborhood_attention"
_TILED, _WGMMA, _ROWS, _COLS = (common.TILED, common.WGMMA, common.ROWS,
                                common.COLS)
_bcast = common.bcast


# ----------------------------------------------------------- shared pieces ---


def _tables(plan):
  """The plan as device arrays: the lists (int32) and the mask tiles as
  additive biases in log2 units, 0 where visible and common.MASK elsewhere,
  bfloat16 [U * 64, 64] with queries on rows (`bias`) and transposed, keys
  on rows (`bias_t`); tile u is rows [64 u, 64 u + 64)."""
  masks = plan_lib.mask_tiles(plan)
  i32 = lambda x: jnp.asarray(np.ascontiguousarray(x), jnp.int32)
  bias = np.where(masks.tiles, 0.0, common.MASK).astype(np.float32)
  as_rows = lambda x: jnp.asarray(x.reshape(-1, BLOCK), jnp.bfloat16)
  def lists(tiles, ids):   # [n, 2, W]: partner tiles, mask ids; W % 16 == 0
    width = -(-tiles.shape[1] // 16) * 16   # rows of 128 bytes (one copy)
    out = np.stack([tiles, ids], axis=1)
    return i32(np.pad(out, ((0, 0), (0, 0), (0, width - tiles.shape[1])),
                      mode="edge"))
  return dict(kv_list=lists(plan.kv_tiles, masks.kv_ids),
              kv_count=i32(plan.kv_count),
              q_list=lists(plan.q_tiles, masks.q_ids),
              q_count=i32(plan.q_count),
              bias=as_rows(bias), bias_t=as_rows(bias.transpose(0, 2, 1)))


def _list_smem(tabs, name):
  """SMEM scratch for one CTA's row of the [n, 2, W] list `tabs[name]`."""
  return plgpu.SMEM(tabs[name].shape[1:], jnp.int32)


def _partner_specs(cta_list, cols):
  """Pipeline blocks of step i: rows of the partner tile cta_list[0, i] of
  [rows, c] operands (c in `cols`; None for a [rows] vector), then its
  [64, 64] mask bias tile cta_list[1, i]. cta_list is the CTA's [2, W] row
  of the lists, in SMEM (TMA-loaded with the CTA's own tile, so the index
  maps do not read GMEM each step: forward 1.04x, dk/dv 1.06x) or in GMEM."""
  tile_of = lambda i: cta_list[0, i]
  return [_spec(c, tile_of) if c else
          plgpu.BlockSpec((BLOCK,), lambda i: (tile_of(i),)) for c in cols
          ] + [_spec(BLOCK, lambda i: cta_list[1, i])]


def _bias(smem):
  """The step's [64, 64] mask bias (SMEM, bfloat16) as float32 registers."""
  return plgpu.load(smem, layout=_WGMMA).astype(jnp.float32)


def _spec(cols, tile_of):
  """Pipeline block: rows [64 tile_of(i), + 64) of a [rows, cols] operand."""
  return plgpu.BlockSpec((BLOCK, cols), lambda i: (tile_of(i), 0),
                         transforms=_TILED)


def _kernel_call(kernel, out_type, grid_names, n_tiles, b, h, scratch,
                 interp, n_a_operands, *args):
  """plgpu.kernel over grid (tiles, H, B), one warpgroup a CTA; in interpret
  mode with n_a_operands [64, 64] SMEM scratch buffers appended."""
  if interp is not None:   # wgmma A operands through SMEM in interpret mode
    scratch = scratch + [plgpu.SMEM((BLOCK, BLOCK), args[0].dtype,
                                    transforms=_TILED)] * n_a_operands
  return plgpu.kernel(
      kernel, out_type=out_type, grid=(n_tiles, h, b), grid_names=grid_names,
      scratch_types=tuple(scratch), compiler_params=common.LANE_PARAMS,
      interpret=interp)(*args)


def _heads(hh, group):
  return lax.div(hh, jnp.array(group, hh.dtype))


# ---------------------------------------------------------------- forward ---


def _forward(q, k, v, plan, *, scale, interpret):
  """q [B, R, H, D], k [B, R, Hkv, D], v [B, R, Hkv, V] (rows of `plan`) ->
  (o [B, R, H, V] q.dtype, lse [B, H, R] float32 in log2 units)."""
  b, rows, h, d = q.shape
  group, dv = h // k.shape[2], v.shape[-1]
  dtype = q.dtype
  c = float(scale) * common.LOG2E
  tabs, width = _tables(plan), plan.kv_tiles.shape[1]
  interp = common.interpret_params(interpret)

  def kernel(q_ref, k_ref, v_ref, list_ref, count_ref, bias_ref, o_ref,
             lse_ref, q_smem, o_smem, lse_smem, list_smem, bars, *maybe_p):
    p_smem = maybe_p[0] if maybe_p else None
    o_smem = q_smem if o_smem is None else o_smem   # Q's buffer when D == V
    qt, hh, bb = (lax.axis_index(a) for a in ("q", "heads", "batch"))
    kvh = _heads(hh, group)
    rows_q = pl.ds(qt * BLOCK, BLOCK)
    plgpu.copy_gmem_to_smem(q_ref.at[bb, rows_q, hh], q_smem, bars.at[0])
    plgpu.copy_gmem_to_smem(list_ref.at[qt], list_smem, bars.at[1])
    plgpu.barrier_wait(bars.at[0])
    plgpu.barrier_wait(bars.at[1])

    def body(idx, k_smem, v_smem, bias_smem, carry):
      m, l, acc = carry
      (s,) = common.products(
          lambda r: plgpu.wgmma(r, q_smem, k_smem.transpose((1, 0))),
          [(BLOCK, BLOCK)])
      s = s * c + _bias(bias_smem)                     # log2 units, masked
      m_new = jnp.maximum(m, s.max(axis=1))
      alpha = jnp.exp2(m - m_new)
      p = jnp.exp2(s - _bcast(m_new, s.shape, 0))
      l = l * alpha + p.sum(axis=1)
      acc = acc * _bcast(alpha, acc.shape, 0)
      p16 = common.a_operand(p.astype(dtype), p_smem)
      (acc,) = common.accumulate(lambda r: plgpu.wgmma(r, p16, v_smem),
                                 (acc,), interp)
      return m_new, l, acc

    init = (
        plgpu.layout_cast(jnp.full((BLOCK,), -jnp.inf, jnp.float32), _ROWS),
        plgpu.layout_cast(jnp.zeros((BLOCK,), jnp.float32), _ROWS),
        plgpu.layout_cast(jnp.zeros((BLOCK, dv), jnp.float32), _WGMMA))
    m, l, acc = plgpu.emit_pipeline(
        body, grid=(count_ref[qt],),
        in_specs=_partner_specs(list_smem, (d, dv)),
        max_concurrent_steps=min(2, width), init_carry=init,
    )(k_ref.at[bb, :, kvh], v_ref.at[bb, :, kvh], bias_ref)
    o_smem[...] = (acc / _bcast(l, acc.shape, 0)).astype(dtype)   # Q is done
    lse_smem[...] = m + jnp.log2(l)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[bb, rows_q, hh])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bb, hh, rows_q])
    plgpu.wait_smem_to_gmem(0)

  scratch = [plgpu.SMEM((BLOCK, d), dtype, transforms=_TILED),
             None if d == dv else plgpu.SMEM((BLOCK, dv), dtype,
                                             transforms=_TILED),
             plgpu.SMEM((BLOCK,), jnp.float32), _list_smem(tabs, "kv_list"),
             plgpu.Barrier(num_barriers=2)]
  out_type = (jax.ShapeDtypeStruct((b, rows, h, dv), dtype),
              jax.ShapeDtypeStruct((b, h, rows), jnp.float32))
  return _kernel_call(
      kernel, out_type, ("q", "heads", "batch"), rows // BLOCK, b, h,
      scratch, interp, 1, q, k, v, tabs["kv_list"], tabs["kv_count"],
      tabs["bias"])


# --------------------------------------------------------------- backward ---


def _backward_dq(q, k, v, do, lse, delta, plan, *, scale, interpret):
  """dq [B, R, H, D] q.dtype; lse, delta [B, H, R] float32 (log2 lse)."""
  b, rows, h, d = q.shape
  group, dv = h // k.shape[2], v.shape[-1]
  dtype = q.dtype
  c = float(scale) * common.LOG2E
  tabs, width = _tables(plan), plan.kv_tiles.shape[1]
  interp = common.interpret_params(interpret)

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, list_ref,
             count_ref, bias_ref, dq_ref, q_smem, do_smem, bars, *maybe_ds):
    ds_smem = maybe_ds[0] if maybe_ds else None
    qt, hh, bb = (lax.axis_index(a) for a in ("q", "heads", "batch"))
    kvh = _heads(hh, group)
    rows_q = pl.ds(qt * BLOCK, BLOCK)
    plgpu.copy_gmem_to_smem(q_ref.at[bb, rows_q, hh], q_smem, bars.at[0])
    plgpu.copy_gmem_to_smem(do_ref.at[bb, rows_q, hh], do_smem, bars.at[1])
    lse_i = plgpu.load(lse_ref.at[bb, hh, rows_q], layout=_ROWS,
                       optimized=False)
    delta_i = plgpu.load(delta_ref.at[bb, hh, rows_q], layout=_ROWS,
                         optimized=False)
    plgpu.barrier_wait(bars.at[0])
    plgpu.barrier_wait(bars.at[1])

    def body(idx, k_smem, v_smem, bias_smem, dq_acc):
      def mma(s_ref, dp_ref):
        plgpu.wgmma(s_ref, q_smem, k_smem.transpose((1, 0)))
        plgpu.wgmma(dp_ref, do_smem, v_smem.transpose((1, 0)))
      s, dp = common.products(mma, [(BLOCK, BLOCK)] * 2)
      p = jnp.exp2(s * c + _bias(bias_smem) - _bcast(lse_i, s.shape, 0))
      ds = p * (dp - _bcast(delta_i, s.shape, 0))
      ds16 = common.a_operand(ds.astype(dtype), ds_smem)
      (dq_acc,) = common.accumulate(
          lambda r: plgpu.wgmma(r, ds16, k_smem), (dq_acc,), interp)
      return dq_acc

    # The list stays in GMEM here: Q, dO and the pipeline fill the SMEM of
    # two CTAs an SM, and 128 bytes more cost the second (dq 1.28x slower).
    dq = plgpu.emit_pipeline(
        body, grid=(count_ref[qt],),
        in_specs=_partner_specs(list_ref.at[qt], (d, dv)),
        max_concurrent_steps=min(2, width),
        init_carry=plgpu.layout_cast(jnp.zeros((BLOCK, d), jnp.float32),
                                     _WGMMA),
    )(k_ref.at[bb, :, kvh], v_ref.at[bb, :, kvh], bias_ref)
    q_smem[...] = (dq * float(scale)).astype(dtype)      # Q is done
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[bb, rows_q, hh])
    plgpu.wait_smem_to_gmem(0)

  scratch = [plgpu.SMEM((BLOCK, d), dtype, transforms=_TILED),
             plgpu.SMEM((BLOCK, dv), dtype, transforms=_TILED),
             plgpu.Barrier(num_barriers=2)]
  return _kernel_call(
      kernel, jax.ShapeDtypeStruct(q.shape, dtype), ("q", "heads", "batch"),
      rows // BLOCK, b, h, scratch, interp, 1, q, k, v, do, lse, delta,
      tabs["kv_list"], tabs["kv_count"], tabs["bias"])


def _backward_dkv(q, k, v, do, lse, delta, plan, *, scale, interpret):
  """(dk [B, R, H, D], dv [B, R, H, V]) per QUERY head: q.dtype when
  H == Hkv, else float32 (summed over groups by the caller)."""
  b, rows, h, d = q.shape
  group, dv = h // k.shape[2], v.shape[-1]
  dtype = q.dtype
  out_dtype = dtype if group == 1 else jnp.float32
  c = float(scale) * common.LOG2E
  tabs, width = _tables(plan), plan.q_tiles.shape[1]
  interp = common.interpret_params(interpret)
  staging = common.dkv_staging(group, 1, BLOCK, d, dv)

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, list_ref,
             count_ref, bias_ref, dk_ref, dv_ref, k_smem, v_smem, out_smem,
             list_smem, bars, *maybe_a):
    pt_smem, dst_smem = maybe_a if maybe_a else (None, None)
    kt, hh, bb = (lax.axis_index(a) for a in ("kv", "heads", "batch"))
    kvh = _heads(hh, group)
    rows_k = pl.ds(kt * BLOCK, BLOCK)
    plgpu.copy_gmem_to_smem(k_ref.at[bb, rows_k, kvh], k_smem, bars.at[0])
    plgpu.copy_gmem_to_smem(v_ref.at[bb, rows_k, kvh], v_smem, bars.at[1])
    plgpu.copy_gmem_to_smem(list_ref.at[kt], list_smem, bars.at[2])
    for i in range(3):
      plgpu.barrier_wait(bars.at[i])

    def body(idx, q_smem, do_smem, lse_smem, delta_smem, bias_smem, carry):
      def mma(st_ref, dpt_ref):
        plgpu.wgmma(st_ref, k_smem, q_smem.transpose((1, 0)))
        plgpu.wgmma(dpt_ref, v_smem, do_smem.transpose((1, 0)))
      st, dpt = common.products(mma, [(BLOCK, BLOCK)] * 2)  # [keys, queries]
      lse_j = plgpu.load(lse_smem, layout=_COLS)
      delta_j = plgpu.load(delta_smem, layout=_COLS)
      pt = jnp.exp2(st * c + _bias(bias_smem) - _bcast(lse_j, st.shape, 1))
      dst = pt * (dpt - _bcast(delta_j, st.shape, 1))
      pt16 = common.a_operand(pt.astype(dtype), pt_smem)
      dst16 = common.a_operand(dst.astype(dtype), dst_smem)
      def acc(dk_ref, dv_ref):
        plgpu.wgmma(dv_ref, pt16, do_smem)
        plgpu.wgmma(dk_ref, dst16, q_smem)
      return common.accumulate(acc, carry, interp)

    init = (plgpu.layout_cast(jnp.zeros((BLOCK, d), jnp.float32), _WGMMA),
            plgpu.layout_cast(jnp.zeros((BLOCK, dv), jnp.float32), _WGMMA))
    dk, dv_ = plgpu.emit_pipeline(
        body, grid=(count_ref[kt],),
        in_specs=_partner_specs(list_smem, (d, dv, None, None)),
        max_concurrent_steps=min(2, width), init_carry=init,
    )(q_ref.at[bb, :, hh], do_ref.at[bb, :, hh], lse_ref.at[bb, hh],
      delta_ref.at[bb, hh], bias_ref)
    # 16-bit outputs go out through K and V's own buffers (both are done).
    common.store_dkv((dk * float(scale)).astype(out_dtype),
                     dv_.astype(out_dtype), dk_ref.at[bb, rows_k, hh],
                     dv_ref.at[bb, rows_k, hh], k_smem=k_smem, v_smem=v_smem,
                     staging=out_smem, wg=0)

  scratch = [plgpu.SMEM((BLOCK, d), dtype, transforms=_TILED),
             plgpu.SMEM((BLOCK, dv), dtype, transforms=_TILED),
             staging, _list_smem(tabs, "q_list"),
             plgpu.Barrier(num_barriers=3)]
  out_type = (jax.ShapeDtypeStruct((b, rows, h, d), out_dtype),
              jax.ShapeDtypeStruct((b, rows, h, dv), out_dtype))
  return _kernel_call(
      kernel, out_type, ("kv", "heads", "batch"), rows // BLOCK, b, h,
      scratch, interp, 2, q, k, v, do, lse, delta, tabs["q_list"],
      tabs["q_count"], tabs["bias_t"])


# ------------------------------------------------------------ entry point ---


def _raise(name, got, want):
  raise ValueError(f"{_FN}: {name} is {got!r}; expected {want}.")


def _per_axis(name, x, rank, kind=int):
  """x or a tuple of `rank` of them, each an int (kind=int) or a bool."""
  items = tuple(x) if isinstance(x, (tuple, list)) else (x,) * rank
  is_bool = lambda y: isinstance(y, (bool, np.bool_))
  ok = (lambda y: isinstance(y, (int, np.integer)) and not is_bool(y)
        ) if kind is int else is_bool
  if len(items) != rank or not all(map(ok, items)):
    _raise(name, x, f"{'an int' if kind is int else 'a bool'} or a tuple "
           f"of {rank} (one per spatial axis)")
  return tuple(map(kind, items))


def _check(q, k, v, scale):
  """What the kernels need beyond the plan's own checks."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) not in (4, 5, 6):
      _raise(f"{name}.shape", getattr(x, "shape", type(x)),
             "rank 4 to 6 ([B, *S, heads, dim], 1 to 3 spatial axes)")
    if not any(jnp.dtype(x.dtype) == jnp.dtype(t) for t in SUPPORTED_DTYPES):
      _raise(f"{name}.dtype", jnp.dtype(x.dtype).name,
             "bfloat16 or float16 (float32: use the xla implementation)")
  if not q.dtype == k.dtype == v.dtype:
    _raise("k.dtype/v.dtype", (jnp.dtype(k.dtype).name,
                               jnp.dtype(v.dtype).name),
           f"q.dtype {jnp.dtype(q.dtype).name}")
  h, d = q.shape[-2:]
  hkv = k.shape[-2]
  if k.ndim != q.ndim or k.shape[:-2] != q.shape[:-2] or k.shape[-1] != d:
    _raise("k.shape", k.shape, f"{q.shape[:-2]} + (Hkv, D={d})")
  if v.shape[:-1] != k.shape[:-1]:
    _raise("v.shape", v.shape, f"{k.shape[:-1]} + (V,), matching k")
  if hkv < 1 or h % hkv:
    _raise("k.shape[-2] (Hkv)", hkv, f"a divisor of H={h}")
  if d not in SUPPORTED_HEAD_DIMS:
    _raise("q.shape[-1] (D)", d, f"one of {SUPPORTED_HEAD_DIMS}")
  if v.shape[-1] not in SUPPORTED_HEAD_DIMS:
    _raise("v.shape[-1] (V)", v.shape[-1], f"one of {SUPPORTED_HEAD_DIMS}")
  if (isinstance(scale, bool) or not isinstance(scale, (int, float,
                                                         np.floating))
      or not math.isfinite(scale)):
    _raise("scale", scale, "a finite Python float")


def _prepare(q, k, v, kernel_size, dilation, stride, is_causal, scale,
             tile_shape):
  """Checks the call; returns (plan, to_rows, from_rows): [B, *S, H, X] <->
  [B, R, H, X] plan rows (padded rows read token 0)."""
  _check(q, k, v, scale)
  rank = q.ndim - 3
  spatial = tuple(q.shape[1:1 + rank])
  ks, ds, ss = (_per_axis(name, x, rank) for name, x in (
      ("kernel_size", kernel_size), ("dilation", dilation),
      ("stride", stride)))
  cs = _per_axis("is_causal", is_causal, rank, bool)
  if tile_shape is None:
    tile_shape = plan_lib.default_tile_shape(
        tuple(-(-n // max(x, 1)) for n, x in zip(spatial, ds)), BLOCK)
  tile_shape = _per_axis("tile_shape", tile_shape, rank)
  if math.prod(tile_shape) != BLOCK:
    _raise("tile_shape", tile_shape, f"tokens per axis of volume {BLOCK}")
  # The plan checks NATTEN's rules (kernel >= 2, stride <= kernel, ...).
  plan = plan_lib.neighborhood_plan(spatial, ks, ds, ss, cs, tile_shape)
  b, n = q.shape[0], plan.n_tokens
  perm = jnp.asarray(np.maximum(plan.perm, 0))
  inv = jnp.asarray(plan.inv)
  to_rows = lambda x: jnp.take(x.reshape(b, n, *x.shape[-2:]), perm, axis=1)
  from_rows = lambda x: jnp.take(x, inv, axis=1).reshape(
      b, *spatial, *x.shape[2:])
  return plan, to_rows, from_rows


def neighborhood_attention(q, k, v, *, kernel_size, dilation, stride,
                           is_causal, scale, interpret=False,
                           tile_shape=None) -> jax.Array:
  """Neighborhood attention (module docstring) on Hopper, differentiable.

  Args:
    q: [B, *S, H, D] bfloat16 or float16, 1 to 3 spatial axes S; D in
      SUPPORTED_HEAD_DIMS.
    k: [B, *S, Hkv, D], v: [B, *S, Hkv, V], q.dtype; H % Hkv == 0 (query
      head h reads kv head h // (H // Hkv)); V in SUPPORTED_HEAD_DIMS.
    kernel_size, dilation, stride, is_causal: ints / bools or per-axis
      tuples (NATTEN's rules; checked by `plan.neighborhood_plan`).
    scale: Python float multiplying q . k.
    interpret: False, True (`plgpu.InterpretGPUParams()`) or an
      `InterpretGPUParams`: Mosaic GPU interpret mode on CPU.
    tile_shape: tokens per tile along each axis, volume 64; default
      `plan.default_tile_shape(largest dilation group, 64)`.

  Returns:
    [B, *S, H, V] in q.dtype. Its VJP runs the dq and dk/dv kernels.

  Raises:
    ValueError: a precondition does not hold (the message names the
      argument, its value and what was expected); before any tracing.
  """
  plan, to_rows, from_rows = _prepare(q, k, v, kernel_size, dilation, stride,
                                      is_causal, scale, tile_shape)
  h, hkv = q.shape[-2], k.shape[-2]
  # The tables are built inside each call (constants of its trace, never
  # tracers closed over by the custom_vjp).
  cfg = dict(plan=plan, scale=float(scale), interpret=interpret)

  @jax.custom_vjp
  def attend(qr, kr, vr):
    return _forward(qr, kr, vr, **cfg)[0]

  def attend_fwd(qr, kr, vr):
    o, lse = _forward(qr, kr, vr, **cfg)
    return o, (qr, kr, vr, o, lse)

  def attend_bwd(res, do):
    qr, kr, vr, o, lse = res
    do = do.astype(qr.dtype)
    delta = jnp.einsum("brhv,brhv->bhr", do.astype(jnp.float32),
                       o.astype(jnp.float32))
    dq = _backward_dq(qr, kr, vr, do, lse, delta, **cfg)
    dk, dv = _backward_dkv(qr, kr, vr, do, lse, delta, **cfg)
    if h != hkv:   # sum each group of H // Hkv query heads into its kv head
      sum_heads = lambda x: x.reshape(*x.shape[:2], hkv, h // hkv,
                                      x.shape[-1]).sum(axis=3)
      dk, dv = sum_heads(dk), sum_heads(dv)
    return dq, dk.astype(kr.dtype), dv.astype(vr.dtype)

  attend.defvjp(attend_fwd, attend_bwd)
  return from_rows(attend(to_rows(q), to_rows(k), to_rows(v)))


def forward_with_lse(q, k, v, *, kernel_size, dilation, stride, is_causal,
                     scale, interpret=False, tile_shape=None):
  """(o [B, *S, H, V], lse [B, *S, H] float32, natural log) without
  autodiff; for tests and diagnostics."""
  plan, to_rows, from_rows = _prepare(q, k, v, kernel_size, dilation, stride,
                                      is_causal, scale, tile_shape)
  o, lse = _forward(to_rows(q), to_rows(k), to_rows(v), plan,
                    scale=float(scale), interpret=interpret)
  return from_rows(o), from_rows(jnp.swapaxes(lse, 1, 2)) / common.LOG2E
