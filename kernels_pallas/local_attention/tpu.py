"""Pallas TPU (Mosaic) kernels of 1-D sliding-window softmax attention.

For batch b, query head h (which reads kv head h // (H // Hkv)) and a query
position i, the visible keys are

  W(i) = { j : i - left <= j <= i + right,  0 <= j < T }

(causal attention is right = 0; every query sees itself, so W(i) is never
empty) and

  s_ij = scale * q_i . k_j,      lse_i = log sum_{j in W(i)} exp(s_ij)
  o_i  = sum_{j in W(i)} exp(s_ij - lse_i) v_j

accumulated in float32 and returned in q.dtype.

Block sparsity. The sequence is padded to Tp (a multiple of both block sizes)
and cut into query tiles of block_q rows and key tiles of block_k columns.
The keys visible from the real rows [a, z] of a query tile form one interval
[max(0, a - left), min(T - 1, z + right)], so the key tiles a query tile needs
are a contiguous range start..start + count - 1 (`block_ranges`). The ranges
reach the kernels by scalar prefetch; the grid is

  (B, H, query tiles, max count)   (last axis "arbitrary", the rest "parallel")

and the key index map reads start + min(step, count - 1): a step past the
range re-uses the block of the step before it (no new DMA) and its compute is
skipped with `pl.when`. A visited tile pair is *interior* when every one of
its block_q x block_k (padded) pairs is visible and real (`tile_is_interior`);
only the other (edge) tiles build the band mask, interior tiles do no mask
work. Tiles containing padded rows or columns are always edge tiles, so padded
keys are masked; padded query rows are sliced off.

Forward (per query tile, online softmax over its key tiles; m, l, acc are
float32 VMEM scratch):

  m' = max(m, rowmax(s)),  p = exp(s - m'),  alpha = exp(m - m')
  l' = alpha l + rowsum(p),  acc' = alpha acc + p V
  o  = acc / l,  lse = m + log l    (lse is saved for the backward)

Backward, with dO the output cotangent and delta_i = dO_i . o_i (computed in
XLA):

  p_ij  = exp(s_ij - lse_i)                 (0 outside W(i))
  dp_ij = dO_i . v_j
  ds_ij = p_ij (dp_ij - delta_i)
  dq_i  = scale sum_j ds_ij k_j             (kernel 1: per query tile, its key
                                             tiles)
  dk_j  = scale sum_i ds_ij q_i             (kernel 2: per key tile, the query
  dv_j  = sum_i p_ij dO_i                    tiles whose windows reach it)

Key j is seen by query i iff j - right <= i <= j + left, so the ranges of the
second kernel are `block_ranges` with left and right swapped; it works on the
transposed scores s^T = K Q^T so that lse and delta enter as rows. dk, dv are
produced per query head (float32) and summed over each GQA group in XLA.

Precision: all matmuls accumulate in float32. For bfloat16 inputs the MXU
operands stay bfloat16 (p and ds are cast to the input dtype before their
matmul, as in flash attention). For float32 inputs every matmul runs at
Precision.HIGHEST. float16 inputs are upcast to float32 in XLA before the
kernels (and the results cast back), so the kernels only see bf16 / f32.

Head dims D (q, k) and V (v) must be in SUPPORTED_HEAD_DIMS; other sizes are
rejected with ValueError (no zero padding). Layout: the public function takes
[B, T, H, D] and transposes to [B, H, T, D] for the kernels.
"""

from __future__ import annotations

import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np

from kernels_pallas.local_attention import _tpu_common as common

SUPPORTED_HEAD_DIMS = common.SUPPORTED_HEAD_DIMS
SUPPORTED_DTYPES = common.SUPPORTED_DTYPES
supports = common.supports
_LANES, _MASK_VALUE = common.LANES, common.MASK_VALUE
_NN, _NT = common.NN, common.NT
_dot, _precision = common.dot, common.precision
_run_masked_or_not, _is_int = common.run_masked_or_not, common.is_int
DEFAULT_BLOCK = 128
_FN = "sliding_window_attention"


# ---------------------------------------------------------------------------
# Tile ranges (pure Python / NumPy; also what the tests check by brute force).
# ---------------------------------------------------------------------------


def padded_length(t: int, block_q: int, block_k: int) -> int:
  """Tp: T rounded up to a multiple of both block sizes."""
  m = block_q * block_k // math.gcd(block_q, block_k)
  return -(-t // m) * m


def block_ranges(t: int, left: int, right: int, block_rows: int,
                 block_cols: int) -> tuple[np.ndarray, np.ndarray]:
  """Per row tile, the contiguous range of column tiles it must visit.

  Row r sees column c iff r - left <= c <= r + right, both < t. Returns int32
  (start, count), one entry per row tile of the padded length: row tile i
  visits column tiles start[i] .. start[i] + count[i] - 1, exactly those that
  hold a visible (row, column) pair. A row tile with no real row (possible
  only when the two block sizes differ) gets the range of row t - 1, so count
  is always >= 1 (its rows are masked out anyway).

  For the queries' side (forward, dq) call it as (t, left, right, block_q,
  block_k); for the keys' side (dk, dv) as (t, right, left, block_k, block_q).
  """
  tp = padded_length(t, block_rows, block_cols)
  n = tp // block_rows
  first = np.minimum(np.arange(n) * block_rows, t - 1)
  last = np.minimum(np.arange(n) * block_rows + block_rows - 1, t - 1)
  lo = np.maximum(first - left, 0) // block_cols
  hi = np.minimum(last + right, t - 1) // block_cols
  return lo.astype(np.int32), (hi - lo + 1).astype(np.int32)


def tile_is_interior(ri, ci, *, t, left, right, block_rows, block_cols):
  """Whether every (row, column) pair of tile (ri, ci) is visible and real.

  Works on Python ints and on traced int32 scalars alike (the kernels call it
  on program ids). Interior tiles skip the mask.
  """
  r0 = ri * block_rows
  r1 = r0 + (block_rows - 1)
  c0 = ci * block_cols
  c1 = c0 + (block_cols - 1)
  conds = (r1 < t, c1 < t, c0 >= r1 - left, c1 <= r0 + right)
  if all(isinstance(x, (bool, np.bool_)) for x in conds):
    return bool(all(conds))
  out = conds[0]
  for x in conds[1:]:
    out = jnp.logical_and(out, x)
  return out


def _band_mask(shape, r0, c0, *, t, left, right):
  """[rows, cols] bool: row r0 + a sees column c0 + b (both real, in band)."""
  rows = lax.broadcasted_iota(jnp.int32, shape, 0) + r0
  cols = lax.broadcasted_iota(jnp.int32, shape, 1) + c0
  return ((cols >= rows - left) & (cols <= rows + right)
          & (rows < t) & (cols < t))


def _step_block(i, s, start_ref, count_ref):
  """Column tile visited at step s of row tile i (clamped to the last one)."""
  return start_ref[i] + jnp.minimum(s, count_ref[i] - 1)


# ---------------------------------------------------------------------------
# Forward.
# ---------------------------------------------------------------------------


def _fwd_kernel(start_ref, count_ref, q_ref, k_ref, v_ref, o_ref, *refs, t,
                left, right, scale, precision):
  """One (b, h, query tile, step) grid point; refs: [lse], m, l, acc."""
  lse_ref, (m_sc, l_sc, acc_sc) = (None, refs) if len(refs) == 3 else (
      refs[0], refs[1:])
  # q [bq, D], k [bk, D], v [bk, V]; o [bq, V]; lse [bq, 128] (lanes equal);
  # m, l [bq, 128] f32 (lanes equal), acc [bq, V] f32.
  bq = q_ref.shape[0]
  bk = k_ref.shape[0]
  qi = pl.program_id(2)
  step = pl.program_id(3)
  kj = _step_block(qi, step, start_ref, count_ref)

  @pl.when(step == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  def body(masked):
    q = q_ref[...]
    k = k_ref[...]
    v = v_ref[...]
    s = _dot(q, k, _NT, precision) * scale  # [bq, bk] f32
    if masked:
      mask = _band_mask((bq, bk), qi * bq, kj * bk, t=t, left=left,
                        right=right)
      s = jnp.where(mask, s, _MASK_VALUE)
    m_prev = m_sc[...]  # [bq, 128]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_next)  # [bq, 128]
    p = jnp.exp(s - m_next[:, :1])  # [bq, bk] f32
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
    m_sc[...] = m_next
    pv = _dot(p.astype(v.dtype), v, _NN, precision)  # [bq, V] f32
    acc_sc[...] = alpha[:, :1] * acc_sc[...] + pv

  interior = tile_is_interior(qi, kj, t=t, left=left, right=right,
                              block_rows=bq, block_cols=bk)
  _run_masked_or_not(body, step < count_ref[qi], interior)

  @pl.when(step == pl.num_programs(3) - 1)
  def _final():
    l = l_sc[...]
    o_ref[...] = (acc_sc[...] / l[:, :1]).astype(o_ref.dtype)
    if lse_ref is not None:
      lse_ref[...] = m_sc[...] + jnp.log(l)


def _fwd_call(q, k, v, *, t, left, right, scale, block_q, block_k,
              interpret, save_lse=True):
  """q [B, H, Tp, D], k [B, Hkv, Tp, D], v [B, Hkv, Tp, V] (padded) ->
  (o [B, H, Tp, V] in q.dtype, lse [B, H, Tp] float32 or None if not
  save_lse)."""
  b, h, tp, d = q.shape
  hkv = k.shape[1]
  dv = v.shape[-1]
  rep = h // hkv
  nq = tp // block_q
  start, count = block_ranges(t, left, right, block_q, block_k)
  steps = int(count.max())
  sq = pl.Squeezed()

  def kv_map(bi, hi, qi, si, start_ref, count_ref):
    return bi, hi // rep, _step_block(qi, si, start_ref, count_ref), 0

  q_map = lambda bi, hi, qi, si, *_: (bi, hi, qi, 0)
  kernel = functools.partial(_fwd_kernel, t=t, left=left, right=right,
                             scale=scale, precision=_precision(q.dtype))
  visited = int(count.sum())
  itemsize = jnp.dtype(q.dtype).itemsize
  out_specs = [pl.BlockSpec((sq, sq, block_q, dv), q_map)]
  out_shape = [jax.ShapeDtypeStruct((b, h, tp, dv), q.dtype)]
  if save_lse:  # lanes all equal (a [bq, 128] tile, as in splash attention)
    out_specs.append(pl.BlockSpec((sq, sq, block_q, _LANES), q_map))
    out_shape.append(jax.ShapeDtypeStruct((b, h, tp, _LANES), jnp.float32))
  outs = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(b, h, nq, steps),
          in_specs=[pl.BlockSpec((sq, sq, block_q, d), q_map),
                    pl.BlockSpec((sq, sq, block_k, d), kv_map),
                    pl.BlockSpec((sq, sq, block_k, dv), kv_map)],
          out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM((block_q, _LANES), jnp.float32),
                          pltpu.VMEM((block_q, _LANES), jnp.float32),
                          pltpu.VMEM((block_q, dv), jnp.float32)],
      ),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel",
                               "arbitrary")),
      cost_estimate=pl.CostEstimate(
          flops=2 * b * h * visited * block_q * block_k * (d + dv),
          transcendentals=b * h * visited * block_q * block_k,
          bytes_accessed=(itemsize * (q.size + b * h * tp * dv
                                      + b * h * visited * block_k * (d + dv))
                          + (4 * b * h * tp * _LANES if save_lse else 0))),
      interpret=interpret,
      name="sliding_window_attention_fwd",
  )(jnp.asarray(start), jnp.asarray(count), q, k, v)
  return outs[0], (outs[1][..., 0] if save_lse else None)


# ---------------------------------------------------------------------------
# Backward.
# ---------------------------------------------------------------------------


def _bwd_dq_kernel(start_ref, count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                   delta_ref, dq_ref, dq_sc, *, t, left, right, scale,
                   precision):
  """dq for one (b, h, query tile, step); the query tile's key tiles."""
  # q [bq, D], k [bk, D], v [bk, V], dO [bq, V]; lse, delta [1, bq] f32 rows;
  # dq [bq, D] f32 (out), dq_sc [bq, D] f32.
  bq = q_ref.shape[0]
  bk = k_ref.shape[0]
  qi = pl.program_id(2)
  step = pl.program_id(3)
  kj = _step_block(qi, step, start_ref, count_ref)

  @pl.when(step == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  def body(masked):
    q = q_ref[...]
    k = k_ref[...]
    v = v_ref[...]
    do = do_ref[...]
    lse = lse_ref[0][:, None]  # [bq, 1]
    delta = delta_ref[0][:, None]  # [bq, 1]
    s = _dot(q, k, _NT, precision) * scale  # [bq, bk] f32
    p = jnp.exp(s - lse)
    if masked:
      mask = _band_mask((bq, bk), qi * bq, kj * bk, t=t, left=left,
                        right=right)
      p = jnp.where(mask, p, 0.0)
    dp = _dot(do, v, _NT, precision)  # [bq, bk] f32
    ds = p * (dp - delta)
    dq_sc[...] += _dot(ds.astype(k.dtype), k, _NN, precision)  # [bq, D]

  interior = tile_is_interior(qi, kj, t=t, left=left, right=right,
                              block_rows=bq, block_cols=bk)
  _run_masked_or_not(body, step < count_ref[qi], interior)

  @pl.when(step == pl.num_programs(3) - 1)
  def _final():
    dq_ref[...] = scale * dq_sc[...]


def _bwd_dkv_kernel(start_ref, count_ref, q_ref, k_ref, v_ref, do_ref,
                    lse_ref, delta_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, t,
                    left, right, scale, precision):
  """dk, dv for one (b, h, key tile, step); the query tiles that reach it."""
  # q [bq, D], k [bk, D], v [bk, V], dO [bq, V]; lse, delta [1, bq] f32 rows;
  # dk [bk, D], dv [bk, V] f32 (out, per query head) and their scratch.
  bq = q_ref.shape[0]
  bk = k_ref.shape[0]
  kj = pl.program_id(2)
  step = pl.program_id(3)
  qi = _step_block(kj, step, start_ref, count_ref)

  @pl.when(step == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  def body(masked):
    q = q_ref[...]
    k = k_ref[...]
    v = v_ref[...]
    do = do_ref[...]
    s_t = _dot(k, q, _NT, precision) * scale  # s^T, [bk, bq] f32
    p_t = jnp.exp(s_t - lse_ref[...])  # lse row [1, bq]
    if masked:
      # Query i sees key j iff j - right <= i <= j + left: rows are keys
      # here, so the band has left and right swapped.
      mask = _band_mask((bk, bq), kj * bk, qi * bq, t=t, left=right,
                        right=left)
      p_t = jnp.where(mask, p_t, 0.0)
    dv_sc[...] += _dot(p_t.astype(do.dtype), do, _NN, precision)  # [bk, V]
    dp_t = _dot(v, do, _NT, precision)  # [bk, bq] f32
    ds_t = p_t * (dp_t - delta_ref[...])
    dk_sc[...] += _dot(ds_t.astype(q.dtype), q, _NN, precision)  # [bk, D]

  interior = tile_is_interior(kj, qi, t=t, left=right, right=left,
                              block_rows=bk, block_cols=bq)
  _run_masked_or_not(body, step < count_ref[kj], interior)

  @pl.when(step == pl.num_programs(3) - 1)
  def _final():
    dk_ref[...] = scale * dk_sc[...]
    dv_ref[...] = dv_sc[...]


def _bwd_call(q, k, v, o, lse, d_o, *, t, left, right, scale, block_q,
              block_k, interpret):
  """Padded [B, H(kv), Tp, *] inputs -> (dq [B, H, Tp, D], dk [B, Hkv, Tp, D],
  dv [B, Hkv, Tp, V]), all float32."""
  b, h, tp, d = q.shape
  hkv = k.shape[1]
  dv = v.shape[-1]
  rep = h // hkv
  nq = tp // block_q
  nk = tp // block_k
  sq = pl.Squeezed()
  precision = _precision(q.dtype)
  itemsize = jnp.dtype(q.dtype).itemsize
  # delta_i = dO_i . o_i; lse and delta enter the kernels as [1, bq] rows.
  delta = jnp.sum(d_o.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
  lse_rows = lse.reshape(b, h, 1, tp)
  delta_rows = delta.reshape(b, h, 1, tp)
  params = pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))
  args = (q, k, v, d_o, lse_rows, delta_rows)

  # dq: rows are query tiles, the steps walk their key tiles.
  start, count = block_ranges(t, left, right, block_q, block_k)
  visited = int(count.sum())

  def kv_map(bi, hi, qi, si, start_ref, count_ref):
    return bi, hi // rep, _step_block(qi, si, start_ref, count_ref), 0

  q_map = lambda bi, hi, qi, si, *_: (bi, hi, qi, 0)
  row_map = lambda bi, hi, qi, si, *_: (bi, hi, 0, qi)
  dq = pl.pallas_call(
      functools.partial(_bwd_dq_kernel, t=t, left=left, right=right,
                        scale=scale, precision=precision),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(b, h, nq, int(count.max())),
          in_specs=[pl.BlockSpec((sq, sq, block_q, d), q_map),
                    pl.BlockSpec((sq, sq, block_k, d), kv_map),
                    pl.BlockSpec((sq, sq, block_k, dv), kv_map),
                    pl.BlockSpec((sq, sq, block_q, dv), q_map),
                    pl.BlockSpec((sq, sq, 1, block_q), row_map),
                    pl.BlockSpec((sq, sq, 1, block_q), row_map)],
          out_specs=pl.BlockSpec((sq, sq, block_q, d), q_map),
          scratch_shapes=[pltpu.VMEM((block_q, d), jnp.float32)],
      ),
      out_shape=jax.ShapeDtypeStruct((b, h, tp, d), jnp.float32),
      compiler_params=params,
      cost_estimate=pl.CostEstimate(
          flops=2 * b * h * visited * block_q * block_k * (2 * d + dv),
          transcendentals=b * h * visited * block_q * block_k,
          bytes_accessed=(itemsize * (q.size + d_o.size
                                      + b * h * visited * block_k * (d + dv))
                          + 4 * b * h * tp * (d + 2))),
      interpret=interpret,
      name="sliding_window_attention_bwd_dq",
  )(jnp.asarray(start), jnp.asarray(count), *args)

  # dk, dv: rows are key tiles, the steps walk the query tiles reaching them.
  start, count = block_ranges(t, right, left, block_k, block_q)
  visited = int(count.sum())

  def qside_map(bi, hi, kj, si, start_ref, count_ref):
    return bi, hi, _step_block(kj, si, start_ref, count_ref), 0

  def qrow_map(bi, hi, kj, si, start_ref, count_ref):
    return bi, hi, 0, _step_block(kj, si, start_ref, count_ref)

  k_map = lambda bi, hi, kj, si, *_: (bi, hi // rep, kj, 0)
  out_map = lambda bi, hi, kj, si, *_: (bi, hi, kj, 0)
  dk_h, dv_h = pl.pallas_call(
      functools.partial(_bwd_dkv_kernel, t=t, left=left, right=right,
                        scale=scale, precision=precision),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(b, h, nk, int(count.max())),
          in_specs=[pl.BlockSpec((sq, sq, block_q, d), qside_map),
                    pl.BlockSpec((sq, sq, block_k, d), k_map),
                    pl.BlockSpec((sq, sq, block_k, dv), k_map),
                    pl.BlockSpec((sq, sq, block_q, dv), qside_map),
                    pl.BlockSpec((sq, sq, 1, block_q), qrow_map),
                    pl.BlockSpec((sq, sq, 1, block_q), qrow_map)],
          out_specs=[pl.BlockSpec((sq, sq, block_k, d), out_map),
                     pl.BlockSpec((sq, sq, block_k, dv), out_map)],
          scratch_shapes=[pltpu.VMEM((block_k, d), jnp.float32),
                          pltpu.VMEM((block_k, dv), jnp.float32)],
      ),
      out_shape=[jax.ShapeDtypeStruct((b, h, tp, d), jnp.float32),
                 jax.ShapeDtypeStruct((b, h, tp, dv), jnp.float32)],
      compiler_params=params,
      cost_estimate=pl.CostEstimate(
          flops=2 * b * h * visited * block_q * block_k * (2 * d + 2 * dv),
          transcendentals=b * h * visited * block_q * block_k,
          bytes_accessed=(itemsize * (rep * (k.size + v.size)
                                      + b * h * visited * block_q * (d + dv))
                          + 4 * b * h * (visited * block_q * 2
                                         + tp * (d + dv)))),
      interpret=interpret,
      name="sliding_window_attention_bwd_dkv",
  )(jnp.asarray(start), jnp.asarray(count), *args)
  # Per query head -> per kv head (sum over each group of rep query heads).
  dk = dk_h.reshape(b, hkv, rep, tp, d).sum(axis=2)
  dv_out = dv_h.reshape(b, hkv, rep, tp, dv).sum(axis=2)
  return dq, dk, dv_out


# ---------------------------------------------------------------------------
# Public entry point.
# ---------------------------------------------------------------------------


def _raise(name, got, want):
  raise ValueError(f"{_FN}: {name} is {got!r}; expected {want}.")


def _check_args(q, k, v, left, right, scale, block_sizes):
  """Validates the preconditions; returns (left, right, block_q, block_k)."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      _raise(f"{name}.shape", getattr(x, "shape", type(x)), "rank 4")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not any(jnp.dtype(x.dtype) == jnp.dtype(s) for s in SUPPORTED_DTYPES):
      _raise(f"{name}.dtype", x.dtype, "one of bfloat16, float16, float32")
  if not q.dtype == k.dtype == v.dtype:
    _raise("k.dtype/v.dtype", (k.dtype, v.dtype), f"q.dtype {q.dtype}")
  b, t, h, d = q.shape
  hkv = k.shape[2]
  if t < 1:
    _raise("q.shape[1] (T)", t, ">= 1")
  if k.shape[0] != b or k.shape[1] != t or k.shape[3] != d:
    _raise("k.shape", k.shape, f"[B={b}, T={t}, Hkv, D={d}]")
  if v.shape[:3] != k.shape[:3]:
    _raise("v.shape", v.shape, f"[{b}, {t}, {hkv}, V] (matching k)")
  if hkv < 1 or h % hkv:
    _raise("k.shape[2] (Hkv)", hkv, f"a divisor of H={h}")
  if d not in SUPPORTED_HEAD_DIMS:
    _raise("q.shape[-1] (D)", d, f"one of {SUPPORTED_HEAD_DIMS}")
  if v.shape[-1] not in SUPPORTED_HEAD_DIMS:
    _raise("v.shape[-1] (V)", v.shape[-1], f"one of {SUPPORTED_HEAD_DIMS}")
  for name, x in (("left", left), ("right", right)):
    if not _is_int(x) or x < 0:
      _raise(name, x, "a Python int >= 0")
  if (isinstance(scale, bool)
      or not isinstance(scale, (int, float, np.floating))
      or not math.isfinite(scale)):
    _raise("scale", scale, "a finite Python float")
  unknown = set(block_sizes) - {"block_q", "block_k"}
  if unknown:
    _raise("block size keyword", sorted(unknown)[0], "block_q or block_k")
  blocks = []
  for name in ("block_q", "block_k"):
    x = block_sizes.get(name, DEFAULT_BLOCK)
    if not _is_int(x) or x < 8 or x % 8:
      _raise(name, x, "a positive multiple of 8")
    blocks.append(int(x))
  # Windows wider than the sequence change nothing: clamp to T - 1.
  return min(int(left), t - 1), min(int(right), t - 1), blocks[0], blocks[1]


def sliding_window_attention(q, k, v, *, left: int, right: int, scale: float,
                             interpret=False, **block_sizes) -> jax.Array:
  """Sliding-window softmax attention (math in the module docstring), TPU.

  Args:
    q: queries [B, T, H, D]; D in SUPPORTED_HEAD_DIMS.
    k: keys [B, T, Hkv, D], q.dtype; H % Hkv == 0 (query head h reads kv head
      h // (H // Hkv)).
    v: values [B, T, Hkv, V], q.dtype; V in SUPPORTED_HEAD_DIMS.
    left, right: Python ints >= 0; query i sees keys i - left .. i + right
      (values above T - 1 are clamped to T - 1).
    scale: Python float multiplying q . k.
    interpret: False, True (Pallas TPU interpret mode with default
      `pltpu.InterpretParams()`) or a `pltpu.InterpretParams`.
    **block_sizes: block_q, block_k (tokens per query / key tile, positive
      multiples of 8; default 128). Any T >= 1: the sequence is padded inside
      to a multiple of both, padded keys are masked and padded queries dropped.
      Without interpret, block_q must also be a multiple of 128 (the
      backward reads lse and delta as [1, block_q] lane-tiled rows) unless
      one block holds the whole padded sequence; smaller blocks are for
      interpret mode. For bfloat16 a block_k multiple of 16 matches its
      native tiling.

  Returns:
    [B, T, H, V] in q.dtype; differentiable in q, k, v (jax.custom_vjp whose
    backward is the two Pallas kernels above).

  Raises:
    ValueError: a precondition does not hold (the message names the argument),
      raised before any kernel is traced.
  """
  left, right, block_q, block_k = _check_args(q, k, v, left, right, scale,
                                              block_sizes)
  if interpret is True:
    interpret = pltpu.InterpretParams()
  elif interpret is None:
    interpret = False
  t = q.shape[1]
  tp = padded_length(t, block_q, block_k)
  if not interpret and block_q % _LANES and block_q != tp:
    # The backward's [1, block_q] lse / delta rows are lane-tiled on TPU.
    _raise("block_q", block_q,
           f"a multiple of {_LANES} on TPU (or the whole padded sequence, "
           f"{tp}); smaller blocks only with interpret=True")
  dtype = q.dtype
  if jnp.dtype(dtype) == jnp.float16:
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  cfg = dict(t=t, left=left, right=right, scale=float(scale),
             block_q=block_q, block_k=block_k, interpret=interpret)

  def to_kernel(x):  # [B, T, H, X] -> [B, H, Tp, X]
    x = jnp.swapaxes(x, 1, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, tp - t), (0, 0)))

  def from_kernel(x):  # [B, H, Tp, X] -> [B, T, H, X]
    return jnp.swapaxes(x[:, :, :t], 1, 2)

  @jax.custom_vjp
  def attend(q, k, v):
    o, _ = _fwd_call(to_kernel(q), to_kernel(k), to_kernel(v),
                     save_lse=False, **cfg)
    return from_kernel(o)

  def attend_fwd(q, k, v):
    qp, kp, vp = to_kernel(q), to_kernel(k), to_kernel(v)
    o, lse = _fwd_call(qp, kp, vp, **cfg)
    return from_kernel(o), (qp, kp, vp, o, lse)

  def attend_bwd(res, d_o):
    qp, kp, vp, o, lse = res
    dq, dk, dv = _bwd_call(qp, kp, vp, o, lse, to_kernel(d_o.astype(o.dtype)),
                           **cfg)
    return (from_kernel(dq).astype(qp.dtype), from_kernel(dk).astype(kp.dtype),
            from_kernel(dv).astype(vp.dtype))

  attend.defvjp(attend_fwd, attend_bwd)
  return attend(q, k, v).astype(dtype)
