"""Pallas TPU (Mosaic) kernels of sigmoid attention (FlashSigmoid), fwd + bwd.

Math. For batch b, query head h (reading kv head c = h // (H // Hkv)), query
row i < Tq and key row j < Tk, the key j is visible from i when

  j in W(i)  <=>  (left is None or j >= i - left)
                  and (right is None or j <= i + right) and 0 <= j < Tk

(causal is right = 0; a bounded side needs Tq == Tk). Each visible pair gets
an independent weight, there is no normaliser and no coupling between keys:

  s_ij = scale * q_i . k_j + bias_h,     p_ij = sigmoid(s_ij)
  o_i  = sum_{j in W(i)} p_ij v_j        (float32 accumulation, q.dtype out)

Because nothing is normalised, the forward needs no running maximum and no
row sum: each key tile adds p V to a float32 accumulator, and the backward
needs neither lse nor delta = dO . o. With dO the output cotangent and
sigma' = sigma (1 - sigma):

  dp_ij = dO_i . v_j
  ds_ij = p_ij (1 - p_ij) dp_ij          (0 for pairs outside the band)
  dq_i  = scale sum_j ds_ij k_j          kernel "dq": per query tile, its key
  dbias_h = sum_{b,i,j} ds_ij              tiles; also emits per-tile sums of
                                           ds, summed over b and tiles in XLA
  dk_j  = scale sum_i ds_ij q_i          kernel "dkv": per key tile, the query
  dv_j  = sum_i p_ij dO_i                  tiles that reach it, for every query
                                           head of its GQA group in turn

The backward saves only the (padded) inputs, so under jax.grad the forward
kernel is dead code and disappears.

Masking. A masked score does not make a zero weight (sigmoid(s) > 0 for
every finite s, and a zero-padded key has s = bias), so the kernels mask p
itself: p = where(visible, p, 0). Then ds = p (1 - p) dp is 0 there too, and
padded keys (zeros appended to reach a block multiple) contribute exactly
nothing; padded query rows are masked the same way and sliced off.

Block sparsity (as in kernels_pallas/local_attention/tpu.py). An unbounded
side is replaced by its finite equivalent (left -> Tq - 1, right -> Tk - 1)
and bounded sides are clamped the same way, so every case is a band
[i - left, i + right]. Queries are padded to a multiple of block_q and keys
to a multiple of block_k (separately, so Tq != Tk works), and every tile holds
at least one real row. The keys visible from the rows of a query tile form one
interval, hence a contiguous range of key tiles start..start + count - 1
(`Band.ranges`), passed by scalar prefetch with the per-head bias. Grids:

  forward, dq: (B, H, Tq tiles, max count)
  dkv:         (B, Hkv, Tk tiles, (H // Hkv) * max count)

with the last axis "arbitrary" (the reduction, accumulators in VMEM scratch)
and the others "parallel". A step past a tile's range re-uses the block of the
step before it (the index map clamps, so no DMA) and its compute is skipped.
Only tiles straddling a band edge or the padding build the mask
(`Band.interior`); the dkv kernel sees the band transposed (key j is reached
by query i iff j - right <= i <= j + left).

Precision: float32 accumulation everywhere. bf16 inputs stay bf16 on the MXU
(p and ds are cast to bf16 before their matmuls); float32 inputs use
Precision.HIGHEST; float16 inputs are upcast to float32 in XLA first. o, dq,
dk, dv leave the kernels in the (kernel) input dtype, dbias in float32.
Layout: [B, T, H, D] is transposed to [B, H, T, D] for the kernels.
"""

from __future__ import annotations

import dataclasses
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
_LANES, _NN, _NT = common.LANES, common.NN, common.NT
_dot, _precision, _is_int = common.dot, common.precision, common.is_int
_run = common.run_masked_or_not  # body(masked) on active steps
_FN = "sigmoid_attention"
_DB_TILE = (8, _LANES)  # one f32 vreg: the dq kernel's per-tile sum of ds


# ---------------------------------------------------------------------------
# The band: tile ranges, interior tiles, the exact mask (static Python ints).
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Band:
  """Row r < rows sees column c < cols iff r - left <= c <= r + right."""
  rows: int
  cols: int
  left: int
  right: int

  def transposed(self) -> "Band":
    return Band(self.cols, self.rows, self.right, self.left)

  def ranges(self, br: int, bc: int) -> tuple[np.ndarray, np.ndarray]:
    """int32 (start, count) per row tile: its contiguous column-tile range.

    The columns seen by row r form [max(r - left, 0), min(r + right, cols - 1)]
    (never empty after clamping); these intervals move by at most one per row,
    so a tile's union is an interval too.
    """
    first = np.arange(-(-self.rows // br)) * br
    last = np.minimum(first + br - 1, self.rows - 1)
    lo = np.maximum(first - self.left, 0) // bc
    hi = np.minimum(last + self.right, self.cols - 1) // bc
    return lo.astype(np.int32), (hi - lo + 1).astype(np.int32)

  def interior(self, ri, ci, br: int, bc: int):
    """Whether every pair of tile (ri, ci) is real and visible (ints or traced
    int32 scalars); interior tiles skip the mask."""
    r0, c0 = ri * br, ci * bc
    r1, c1 = r0 + (br - 1), c0 + (bc - 1)
    conds = (r1 < self.rows, c1 < self.cols, c0 >= r1 - self.left,
             c1 <= r0 + self.right)
    if all(isinstance(x, (bool, np.bool_)) for x in conds):
      return bool(all(conds))
    return functools.reduce(jnp.logical_and, conds)

  def mask(self, shape, r0, c0):
    """[br, bc] bool: pair (r0 + a, c0 + b) is real and visible. Conditions
    that hold for every real pair (an unbounded side) are left out."""
    r = lax.broadcasted_iota(jnp.int32, shape, 0) + r0
    c = lax.broadcasted_iota(jnp.int32, shape, 1) + c0
    out = (r < self.rows) & (c < self.cols)
    if self.left < self.rows - 1:
      out &= c >= r - self.left
    if self.right < self.cols - 1:
      out &= c <= r + self.right
    return out


def _step_block(i, s, start_ref, count_ref):
  """Tile visited at step s of row tile i (clamped to its last one)."""
  return start_ref[i] + jnp.minimum(s, count_ref[i] - 1)


def default_blocks(tq: int, tk: int, left: int, right: int, dtype, d: int,
                   dv: int) -> tuple[int, int]:
  """(block_q, block_k): about the window width, 128..512 tokens.

  Dense attention wants big tiles (the per-step overhead is fixed); a narrow
  band wants tiles close to its width (fewer masked pairs). Wide f32 or
  D = 256 rows are capped at 256 to bound VMEM in the backward. Not tuned on
  a TPU yet.
  """
  cap = 512 if jnp.dtype(dtype).itemsize * max(d, dv) <= 256 else 256
  width = left + right + 1
  blk = 128
  while blk < cap and blk < width:
    blk *= 2
  round_up = lambda t: -(-t // _LANES) * _LANES
  return min(blk, round_up(tq)), min(blk, round_up(tk))


# ---------------------------------------------------------------------------
# Kernels.
# ---------------------------------------------------------------------------


def _fwd_kernel(start_ref, count_ref, bias_ref, q_ref, k_ref, v_ref, o_ref,
                acc_sc, *, band, scale, precision):
  """One (b, h, query tile, step): acc += sigmoid(s) V over the key tiles."""
  bq, bk = q_ref.shape[0], k_ref.shape[0]
  hi, qi, step = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  kj = _step_block(qi, step, start_ref, count_ref)

  @pl.when(step == 0)
  def _init():
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  def body(masked):
    v = v_ref[...]
    s = _dot(q_ref[...], k_ref[...], _NT, precision) * scale + bias_ref[hi]
    p = jax.nn.sigmoid(s)  # [bq, bk] f32
    if masked:
      p = jnp.where(band.mask((bq, bk), qi * bq, kj * bk), p, 0.0)
    acc_sc[...] += _dot(p.astype(v.dtype), v, _NN, precision)

  _run(body, step < count_ref[qi], band.interior(qi, kj, bq, bk))

  @pl.when(step == pl.num_programs(3) - 1)
  def _final():
    o_ref[...] = acc_sc[...].astype(o_ref.dtype)


def _dq_kernel(start_ref, count_ref, bias_ref, q_ref, k_ref, v_ref, do_ref,
               dq_ref, db_ref, dq_sc, db_sc, *, band, scale, precision):
  """One (b, h, query tile, step): dq and the rows' sums of ds."""
  # dq_sc [bq, D] f32; db_sc [bq, 128] f32 (lanes equal); db_ref [8, 128].
  bq, bk = q_ref.shape[0], k_ref.shape[0]
  hi, qi, step = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  kj = _step_block(qi, step, start_ref, count_ref)

  @pl.when(step == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)
    db_sc[...] = jnp.zeros(db_sc.shape, jnp.float32)

  def body(masked):
    k = k_ref[...]
    s = _dot(q_ref[...], k, _NT, precision) * scale + bias_ref[hi]
    p = jax.nn.sigmoid(s)
    if masked:
      p = jnp.where(band.mask((bq, bk), qi * bq, kj * bk), p, 0.0)
    dp = _dot(do_ref[...], v_ref[...], _NT, precision)  # [bq, bk] f32
    ds = p * (1.0 - p) * dp
    dq_sc[...] += _dot(ds.astype(k.dtype), k, _NN, precision)
    db_sc[...] += jnp.sum(ds, axis=1, keepdims=True)

  _run(body, step < count_ref[qi], band.interior(qi, kj, bq, bk))

  @pl.when(step == pl.num_programs(3) - 1)
  def _final():
    dq_ref[...] = (scale * dq_sc[...]).astype(dq_ref.dtype)
    tile_sum = jnp.sum(db_sc[...], axis=0, keepdims=True)  # [1, 128]
    db_ref[...] = jnp.broadcast_to(tile_sum, db_ref.shape)


def _dkv_kernel(start_ref, count_ref, bias_ref, q_ref, k_ref, v_ref, do_ref,
                dk_ref, dv_ref, dk_sc, dv_sc, *, band_t, scale, precision,
                rep, steps):
  """One (b, kv head, key tile, step); step = g * steps + (query-tile step)
  walks the query tiles reaching this key tile for query head g of the group.
  Rows are keys here: s^T = K Q^T."""
  bq, bk = q_ref.shape[0], k_ref.shape[0]
  kj, step = pl.program_id(2), pl.program_id(3)
  g, sub = lax.div(step, steps), lax.rem(step, steps)
  qi = _step_block(kj, sub, start_ref, count_ref)
  b_h = bias_ref[pl.program_id(1) * rep + g]

  @pl.when(step == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  def body(masked):
    q, do = q_ref[...], do_ref[...]
    p_t = jax.nn.sigmoid(_dot(k_ref[...], q, _NT, precision) * scale + b_h)
    if masked:
      p_t = jnp.where(band_t.mask((bk, bq), kj * bk, qi * bq), p_t, 0.0)
    dv_sc[...] += _dot(p_t.astype(do.dtype), do, _NN, precision)  # [bk, V]
    dp_t = _dot(v_ref[...], do, _NT, precision)  # [bk, bq] f32
    ds_t = p_t * (1.0 - p_t) * dp_t
    dk_sc[...] += _dot(ds_t.astype(q.dtype), q, _NN, precision)  # [bk, D]

  _run(body, sub < count_ref[kj], band_t.interior(kj, qi, bk, bq))

  @pl.when(step == pl.num_programs(3) - 1)
  def _final():
    dk_ref[...] = (scale * dk_sc[...]).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


# ---------------------------------------------------------------------------
# pallas_call builders (padded [B, H(kv), T*, X] operands).
# ---------------------------------------------------------------------------

_PARAMS = pltpu.CompilerParams(
    dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _fwd_call(q, k, v, bias, *, band, scale, block_q, block_k, interpret):
  """-> o [B, H, Tqp, V] in q.dtype."""
  b, h, tqp, d = q.shape
  hkv, dv = k.shape[1], v.shape[-1]
  rep = h // hkv
  start, count = band.ranges(block_q, block_k)
  sq = pl.Squeezed()

  def kv_map(bi, hi, qi, si, start_ref, count_ref, _):
    return bi, hi // rep, _step_block(qi, si, start_ref, count_ref), 0

  q_map = lambda bi, hi, qi, si, *_: (bi, hi, qi, 0)
  pairs = b * h * int(count.sum()) * block_q * block_k
  itemsize = jnp.dtype(q.dtype).itemsize
  return pl.pallas_call(
      functools.partial(_fwd_kernel, band=band, scale=scale,
                        precision=_precision(q.dtype)),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(b, h, tqp // block_q, int(count.max())),
          in_specs=[pl.BlockSpec((sq, sq, block_q, d), q_map),
                    pl.BlockSpec((sq, sq, block_k, d), kv_map),
                    pl.BlockSpec((sq, sq, block_k, dv), kv_map)],
          out_specs=pl.BlockSpec((sq, sq, block_q, dv), q_map),
          scratch_shapes=[pltpu.VMEM((block_q, dv), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct((b, h, tqp, dv), q.dtype),
      compiler_params=_PARAMS,
      cost_estimate=pl.CostEstimate(
          flops=2 * pairs * (d + dv), transcendentals=pairs,
          bytes_accessed=itemsize * (q.size + b * h * tqp * dv
                                     + pairs // block_q * (d + dv))),
      interpret=interpret,
      name="sigmoid_attention_fwd",
  )(jnp.asarray(start), jnp.asarray(count), bias, q, k, v)


def _bwd_call(q, k, v, bias, d_o, *, band, scale, block_q, block_k,
              interpret):
  """-> (dq [B, H, Tqp, D], dk [B, Hkv, Tkp, D], dv [B, Hkv, Tkp, V] in
  q.dtype, dbias [H] float32)."""
  b, h, tqp, d = q.shape
  hkv, tkp, dv = k.shape[1], k.shape[2], v.shape[-1]
  rep, nq, nk = h // hkv, tqp // block_q, tkp // block_k
  sq = pl.Squeezed()
  precision = _precision(q.dtype)
  itemsize = jnp.dtype(q.dtype).itemsize
  args = (bias, q, k, v, d_o)

  # dq, dbias: rows are query tiles, the steps walk their key tiles.
  start, count = band.ranges(block_q, block_k)
  pairs = b * h * int(count.sum()) * block_q * block_k

  def kv_map(bi, hi, qi, si, start_ref, count_ref, _):
    return bi, hi // rep, _step_block(qi, si, start_ref, count_ref), 0

  q_map = lambda bi, hi, qi, si, *_: (bi, hi, qi, 0)
  db_map = lambda bi, hi, qi, si, *_: (bi, hi, qi, 0, 0)
  dq, db = pl.pallas_call(
      functools.partial(_dq_kernel, band=band, scale=scale,
                        precision=precision),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(b, h, nq, int(count.max())),
          in_specs=[pl.BlockSpec((sq, sq, block_q, d), q_map),
                    pl.BlockSpec((sq, sq, block_k, d), kv_map),
                    pl.BlockSpec((sq, sq, block_k, dv), kv_map),
                    pl.BlockSpec((sq, sq, block_q, dv), q_map)],
          out_specs=[pl.BlockSpec((sq, sq, block_q, d), q_map),
                     pl.BlockSpec((sq, sq, sq) + _DB_TILE, db_map)],
          scratch_shapes=[pltpu.VMEM((block_q, d), jnp.float32),
                          pltpu.VMEM((block_q, _LANES), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((b, h, tqp, d), q.dtype),
                 jax.ShapeDtypeStruct((b, h, nq) + _DB_TILE, jnp.float32)],
      compiler_params=_PARAMS,
      cost_estimate=pl.CostEstimate(
          flops=2 * pairs * (2 * d + dv), transcendentals=pairs,
          bytes_accessed=itemsize * (2 * q.size + d_o.size
                                     + pairs // block_q * (d + dv))),
      interpret=interpret,
      name="sigmoid_attention_bwd_dq",
  )(jnp.asarray(start), jnp.asarray(count), *args)
  dbias = db[:, :, :, 0, 0].sum(axis=(0, 2))

  # dk, dv: rows are key tiles; the steps walk, for each query head g of the
  # group in turn, the query tiles reaching the key tile.
  band_t = band.transposed()
  start, count = band_t.ranges(block_k, block_q)
  steps = int(count.max())
  pairs = b * h * int(count.sum()) * block_q * block_k

  def qside_map(bi, ci, kj, si, start_ref, count_ref, _):
    g, sub = lax.div(si, steps), lax.rem(si, steps)
    return bi, ci * rep + g, _step_block(kj, sub, start_ref, count_ref), 0

  k_map = lambda bi, ci, kj, si, *_: (bi, ci, kj, 0)
  dk, dv_out = pl.pallas_call(
      functools.partial(_dkv_kernel, band_t=band_t, scale=scale,
                        precision=precision, rep=rep, steps=steps),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(b, hkv, nk, rep * steps),
          in_specs=[pl.BlockSpec((sq, sq, block_q, d), qside_map),
                    pl.BlockSpec((sq, sq, block_k, d), k_map),
                    pl.BlockSpec((sq, sq, block_k, dv), k_map),
                    pl.BlockSpec((sq, sq, block_q, dv), qside_map)],
          out_specs=[pl.BlockSpec((sq, sq, block_k, d), k_map),
                     pl.BlockSpec((sq, sq, block_k, dv), k_map)],
          scratch_shapes=[pltpu.VMEM((block_k, d), jnp.float32),
                          pltpu.VMEM((block_k, dv), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_PARAMS,
      cost_estimate=pl.CostEstimate(
          flops=2 * pairs * (2 * d + 2 * dv), transcendentals=pairs,
          bytes_accessed=itemsize * (2 * (k.size + v.size)
                                     + pairs // block_k * (d + dv))),
      interpret=interpret,
      name="sigmoid_attention_bwd_dkv",
  )(jnp.asarray(start), jnp.asarray(count), *args)
  return dq, dk, dv_out, dbias


# ---------------------------------------------------------------------------
# Public entry point.
# ---------------------------------------------------------------------------


def _raise(name, got, want):
  raise ValueError(f"{_FN}: {name} is {got!r}; expected {want}.")


def _check_args(q, k, v, bias, left, right, scale, interpret, block_sizes):
  """Validates everything before tracing; returns (band, block_q, block_k)."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4 or not hasattr(x, "dtype"):
      _raise(f"{name}.shape", getattr(x, "shape", type(x).__name__), "rank 4")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not any(jnp.dtype(x.dtype) == jnp.dtype(s) for s in SUPPORTED_DTYPES):
      _raise(f"{name}.dtype", x.dtype, "one of bfloat16, float16, float32")
  if not q.dtype == k.dtype == v.dtype:
    _raise("k.dtype/v.dtype", (k.dtype, v.dtype), f"q.dtype {q.dtype}")
  b, tq, h, d = q.shape
  tk, hkv = k.shape[1], k.shape[2]
  if tq < 1:
    _raise("q.shape[1] (Tq)", tq, ">= 1")
  if k.shape[0] != b or tk < 1 or k.shape[3] != d:
    _raise("k.shape", k.shape, f"[B={b}, Tk >= 1, Hkv, D={d}]")
  if v.shape[:3] != k.shape[:3]:
    _raise("v.shape", v.shape, f"[{b}, {tk}, {hkv}, V] (matching k)")
  if hkv < 1 or h % hkv:
    _raise("k.shape[2] (Hkv)", hkv, f"a divisor of H={h}")
  if d not in SUPPORTED_HEAD_DIMS:
    _raise("q.shape[-1] (D)", d, f"one of {SUPPORTED_HEAD_DIMS}")
  if v.shape[-1] not in SUPPORTED_HEAD_DIMS:
    _raise("v.shape[-1] (V)", v.shape[-1], f"one of {SUPPORTED_HEAD_DIMS}")
  if not hasattr(bias, "shape") or not hasattr(bias, "dtype"):
    _raise("bias", type(bias).__name__, f"a float32 array of shape ({h},)")
  if not jnp.issubdtype(bias.dtype, jnp.floating):
    _raise("bias.dtype", bias.dtype, "float32")
  if tuple(bias.shape) != (h,):
    _raise("bias.shape", tuple(bias.shape), f"({h},) (one per query head)")
  for name, x in (("left", left), ("right", right)):
    if x is not None and (not _is_int(x) or x < 0):
      _raise(name, x, "None or a Python int >= 0")
  if (left is not None or right is not None) and tq != tk:
    _raise("(left, right)", (left, right),
           f"(None, None) when Tq={tq} != Tk={tk} (a window needs Tq == Tk)")
  if (isinstance(scale, (bool, np.bool_))
      or not isinstance(scale, (int, float, np.integer, np.floating))
      or not math.isfinite(scale)):
    _raise("scale", scale, "a finite Python float")
  if not (isinstance(interpret, (bool, pltpu.InterpretParams))
          or interpret is None):
    _raise("interpret", interpret, "a bool or a pltpu.InterpretParams")
  unknown = set(block_sizes) - {"block_q", "block_k"}
  if unknown:
    _raise("block size keyword", sorted(unknown)[0], "block_q or block_k")
  # An unbounded (or over-long) side becomes its finite equivalent.
  band = Band(tq, tk, tq - 1 if left is None else min(int(left), tq - 1),
               tk - 1 if right is None else min(int(right), tk - 1))
  kdtype = jnp.float32 if jnp.dtype(q.dtype) == jnp.float16 else q.dtype
  defaults = default_blocks(tq, tk, band.left, band.right, kdtype, d,
                            v.shape[-1])
  blocks = []
  for name, default in zip(("block_q", "block_k"), defaults):
    x = block_sizes.get(name, default)
    if not _is_int(x) or x < 8 or x % 8:
      _raise(name, x, "a positive multiple of 8")
    if x % _LANES and not interpret:
      _raise(name, x, f"a multiple of {_LANES} on TPU (smaller blocks only "
             "with interpret)")
    blocks.append(int(x))
  return band, blocks[0], blocks[1]


def sigmoid_attention(q, k, v, bias, *, left: int | None, right: int | None,
                      scale: float, interpret=False,
                      **block_sizes) -> jax.Array:
  """Sigmoid attention on TPU (math in the module docstring).

  Args:
    q: queries [B, Tq, H, D]; D in SUPPORTED_HEAD_DIMS; dtype in
      SUPPORTED_DTYPES.
    k: keys [B, Tk, Hkv, D], q.dtype; H % Hkv == 0 (query head h reads kv head
      h // (H // Hkv)).
    v: values [B, Tk, Hkv, V], q.dtype; V in SUPPORTED_HEAD_DIMS.
    bias: [H] floating array (float32 expected; computed in float32), one per
      query head; differentiable.
    left, right: None (unbounded) or Python ints >= 0: query i sees keys
      i - left .. i + right (causal: right=0). Either bounded needs Tq == Tk.
    scale: Python float multiplying q . k.
    interpret: False, True (TPU interpret mode, `pltpu.InterpretParams()`) or
      a `pltpu.InterpretParams`.
    **block_sizes: block_q, block_k (tokens per query / key tile; default
      `default_blocks`). Multiples of 128 on TPU, of 8 in interpret mode. Any
      Tq, Tk >= 1: the sequences are padded inside and the padding masked.

  Returns:
    [B, Tq, H, V] in q.dtype, differentiable in q, k, v and bias
    (jax.custom_vjp; the backward is the dq and dkv kernels).

  Raises:
    ValueError: a precondition does not hold (the message names the
      argument, its value and what was expected), before any kernel is traced.
  """
  band, block_q, block_k = _check_args(q, k, v, bias, left, right, scale,
                                       interpret, block_sizes)
  if interpret is True:
    interpret = pltpu.InterpretParams()
  elif interpret is None:
    interpret = False
  dtype = q.dtype
  if jnp.dtype(dtype) == jnp.float16:
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  tq, tk = band.rows, band.cols
  tqp, tkp = -(-tq // block_q) * block_q, -(-tk // block_k) * block_k
  cfg = dict(band=band, scale=float(scale), block_q=block_q, block_k=block_k,
             interpret=interpret)

  def to_kernel(x, tp):  # [B, T, H, X] -> [B, H, Tp, X], zero padded
    x = jnp.swapaxes(x, 1, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, tp - x.shape[2]), (0, 0)))

  def from_kernel(x, t):  # [B, H, Tp, X] -> [B, T, H, X]
    return jnp.swapaxes(x[:, :, :t], 1, 2)

  def forward(q, k, v, bias):
    qp, kp, vp = to_kernel(q, tqp), to_kernel(k, tkp), to_kernel(v, tkp)
    return from_kernel(_fwd_call(qp, kp, vp, bias, **cfg), tq), (qp, kp, vp)

  @jax.custom_vjp
  def attend(q, k, v, bias):
    return forward(q, k, v, bias)[0]

  def attend_fwd(q, k, v, bias):
    o, padded = forward(q, k, v, bias)
    return o, (*padded, bias)

  def attend_bwd(res, d_o):
    qp, kp, vp, bias = res
    dq, dk, dv, db = _bwd_call(qp, kp, vp, bias,
                               to_kernel(d_o.astype(qp.dtype), tqp), **cfg)
    return (from_kernel(dq, tq), from_kernel(dk, tk), from_kernel(dv, tk),
            db)

  attend.defvjp(attend_fwd, attend_bwd)
  return attend(q, k, v, bias.astype(jnp.float32)).astype(dtype)
