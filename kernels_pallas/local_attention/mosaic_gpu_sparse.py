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

How the kernels reach the rows (mosaic_gpu_tiles.py, `io_path`; the same
kernel bodies, parametrized by a `Layout`: how a CTA loads and stores its
own tile and how the pipeline addresses partner tiles):

  direct, "sequence" (1-D, dilation 1, tiles of 64): rows are the tokens;
    TMA boxes x.at[b, pl.ds(64 t, 64), h] of [B, T, H, X] itself (rows past
    T load as zeros, stores clip).
  direct, "image" (2-D, 8 x 8 tiles, D == V, dilation (d0, d1) with
    Hs % d0 == 0 and Ws % (8 d1) == 0): tile t is patch (tr, tc) of
    dilation group (g0, g1) (group-major, patches row-major; dilation 1:
    (tr, tc) = divmod(t, Ws // 8)); TMA boxes [8, 8, X] of the free view
    [B, Hs, Ws // 8, 8, H, X] (dilation 1) or, dilated, every d-th pixel:
    x.at[b, pl.ds(8 tr, 8), g0, tc, :, g1, h] of the free view
    [B, Hs / d0, d0, Ws / (8 d1), 8, d1, H, X] (rows past a ragged group
    height load as zeros, stores clip), the own tile a RefUnion of its
    [8, 8, X] and [64, X] SMEM views (wgmma's A operand takes no ref
    reshape).
  "gather" (everything else: 3-D, whose [4, 4, 4, X] box plus the head is
    over TMA's 5 dims; 1-D dilation; 2-D dilation with Hs % d0 != 0 or
    Ws % (8 d1) != 0; other tile shapes; 2-D with Ws % 8 != 0 or D != V):
    XLA gathers the rows ([B, *S, H, X] -> [B, R, H, X]), the kernels run
    on them, and XLA gathers the outputs back (padded rows read token 0;
    permute.py: the VJPs are gathers too, not scatter-adds).

Padded rows are never seen, and their cotangents are exactly 0 (gathered
back from nothing, or zero-filled past the array end). lse and delta stay
in plan-row order [B, H, R] on every path (delta = rowsum(dO o) in XLA,
reordered by a pad and a transpose on the direct paths); GQA's float32
per-query-head dk/dv leave in plan-row order [B, R, H, X] and are reordered
the same way after the group sum. The direct paths skip XLA gathers that
cost 0.3 of a 0.75 ms forward (kernel 13, 128 x 128, B=2, H=16, D=128) on
the H200 and give the gather path's outputs bit for bit.

Block sparsity. A CTA handles one (64-row tile, head, batch). The plan
lists, per query tile, its visited key tiles (ascending) with a count; the
transposed lists give, per key tile, the query tiles reaching it. The
CTA reads count[tile] and runs an `emit_pipeline` of exactly that many steps
(a dynamic grid: there is no step past the count, so nothing is loaded or
computed for it); step i TMA-loads (double-buffered) the partner tile
list[tile, i] and its mask. The forward and dk/dv CTAs TMA-load their row
of the lists ([2, W] int32: partner tiles, mask ids) into SMEM with their
own tile, so the index maps read SMEM each step; dq reads GMEM when it
uses bias tiles (its SMEM is full at two CTAs an SM), else SMEM too.

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

Masks as a thin matmul (`MASK_AS_MATMUL`, the default where it applies;
BENCHMARKS.md 4r). A neighborhood is a box, and a query's interval along
axis a depends only on its coordinate along a, so a tile's 64 query rows
have few distinct intervals per axis (8 + 8 in an 8 x 8 tile, 4 + 4 + 4 in
4 x 4 x 4). `plan.mask_factors` numbers them (the row's *classes*) and
gives every visited pair a [64 keys, 16] tile F: F[c, j] says whether key
c lies in the interval of class j. With Q1 = z one-hot(classes) [64, 16]
(per query tile) and K1 = where(F, 0, -w) [64, 16] (per pair, deduplicated
like the bias tiles), the bias of the pair is exactly Q1 K1^T: 0 where
visible, -z w per failing axis elsewhere. The kernels issue that k = 16
wgmma into the scores' accumulator after Q K^T (dk/dv: K1 Q1^T after
K Q^T), so a step loads 2 KiB of mask instead of 8 and does no
per-element bias load, conversion or add; s' = s log2(e) scale. z w is
2^100 / (log2(e) scale) for bfloat16 (z = 1) and 2^31 for float16
(z = 2^15, w = 65504; used while 2^31 log2(e) scale >= 2^20); the forward
floors the running max at -z w log2(e) scale / 256 (`_factor_tables`).
Tiles with more than 16 classes (1-D tiles of 64 tokens) keep the bias
tiles.

Kernels (one warpgroup per CTA; every matmul a wgmma with float32
accumulation; P and dS rounded to the input dtype before their matmul):

  forward  (grid: query tiles, H, B): online softmax in base 2 over the
    listed key tiles,
      m' = max(m, rowmax(s')),  l' = 2^(m - m') l + rowsum(2^(s' - m')),
      acc' = 2^(m - m') acc + 2^(s' - m') V,
    then o = acc / l and lse' = m + log2 l (saved, in log2 units). Q is
    a register operand (`SCOPED_Q`): its SMEM is held only while it loads
    and o's only while it leaves (scoped where the pipeline's buffers
    were), so three CTAs share an SM (BENCHMARKS.md 4r); with SCOPED_Q off,
    o leaves through Q's buffer when D == V.
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
at zero (see mosaic_gpu_common); on the "image" path it has no ref reshape
and no aliasing RefUnion, so values are copied between the [8, 8, X] and
[64, X] views there (interpret only).
"""

from __future__ import annotations

import math

import jax
from jax import lax
import jax.experimental.pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np

from kernels_pallas import mosaic_gpu_common as common
from kernels_pallas.local_attention import mosaic_gpu as swa_gpu
from kernels_pallas.local_attention import mosaic_gpu_tiles as tiles_lib
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
  return dict(kv_list=_lists(plan.kv_tiles, masks.kv_ids),
              kv_count=i32(plan.kv_count),
              q_list=_lists(plan.q_tiles, masks.q_ids),
              q_count=i32(plan.q_count),
              bias=as_rows(bias), bias_t=as_rows(bias.transpose(0, 2, 1)))


# The kernels add each pair's mask as a thin matmul beside Q K^T (module
# docstring, "Masks as a thin matmul"). False: bias tiles everywhere
# (bench.py's "mosaic_gpu_bias_mask").
MASK_AS_MATMUL = True
# The forward keeps Q in registers (a wgmma A operand) and holds SMEM for Q
# only while it loads and for o only while it leaves (scoped buffers, where
# the pipeline's were): about 72 KiB a CTA instead of 88 with the thin mask
# tiles, so three CTAs share an SM instead of two: forward 1.09-1.10x on the
# H100 (BENCHMARKS.md 4r). False: Q and o in one kernel-long buffer
# (bench.py's "mosaic_gpu_kernel_long_q"); the bias-tile forward (16 KiB
# more) does not reach three CTAs either way.
SCOPED_Q = True
FACTOR_COLS = 16
# [rows, 16] 16-bit SMEM tiles (32-byte rows) as wgmma and TMA want them.
_THIN = (plgpu.TilingTransform((8, FACTOR_COLS)), plgpu.SwizzleTransform(32))


def _factor_tables(plan, dtype, c):
  """The mask factors and lists of all three kernels as device arrays
  (`MASK_AS_MATMUL`), or None: bias tiles (switch off, a plan with over
  FACTOR_COLS interval classes a tile, e.g. 1-D tiles of 64, or a scale
  the masked value cannot swamp).

  q1 = z one-hot classes [R, 16], k1 = 0 / -w [U * 64, 16] in the input
  dtype: a masked score gets -z w (once per failing axis) before the
  multiplication by c (> 0), so z w c must dwarf any real score: bfloat16
  z = 1, w = 2^100 / c (a bias of about -2^100 in log2 units, like
  common.MASK; used for 2^-20 <= c <= 2^10, so that three failing axes,
  <= 3 2^120, stay finite in float32); float16 z = 2^15, w = 65504 (its
  largest; -2^31 c), used while that is at least 2^20 in log2 units.
  With these the products and their float32 sums are exact, and a visible
  score gains exact zeros.

  "floor" (= -z w c / 256, log2 units) bounds the running max from below.
  The compilers may fuse s c - m into one FMA (exact s c, rounded m): in
  a row whose keys so far are all masked, m = rowmax(s) c ~ -z w c is off
  by up to an ulp of that, about 2^-24 z w c, and 2^(s c - m) could be
  2^(+1e22). With m >= floor every masked term is 2^(<= -z w c / 2) = 0;
  real scores are assumed above the floor (bfloat16: -2^92; float16:
  -2^23 c, at least -4096)."""
  if not MASK_AS_MATMUL or c <= 0:
    return None
  fac = plan_lib.mask_factors(plan, FACTOR_COLS)
  if fac is None:
    return None
  if jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16):
    z, w = 1.0, 2.0 ** 100 / c
    if not 2.0 ** -20 <= c <= 2.0 ** 10:   # w in [2^90, 2^120]
      return None
  else:
    z, w = 2.0 ** 15, 65504.0
    if z * w * c < 2.0 ** 20:
      return None
  i32 = lambda x: jnp.asarray(np.ascontiguousarray(x), jnp.int32)
  return dict(
      floor=-z * w * c / 256,
      q1=jnp.asarray(np.where(fac.q_class, z, 0.0), dtype),
      k1=jnp.asarray(np.where(fac.tiles, 0.0, -w).reshape(-1, FACTOR_COLS),
                     dtype),
      kv_list=_lists(plan.kv_tiles, fac.kv_ids),
      kv_count=i32(plan.kv_count),
      q_list=_lists(plan.q_tiles, fac.q_ids),
      q_count=i32(plan.q_count))


def _lists(tiles, ids):
  """[n, 2, W] int32: per tile its partner tiles and their mask ids (W a
  multiple of 16: rows of 128 bytes, one copy)."""
  width = -(-tiles.shape[1] // 16) * 16
  out = np.stack([tiles, ids], axis=1)
  return jnp.asarray(np.pad(out, ((0, 0), (0, 0), (0, width - out.shape[2])),
                            mode="edge"), jnp.int32)


def _thin_block(row_of):
  """Pipeline block: [64, FACTOR_COLS] tile row_of(i) of a q1 or k1 table."""
  return plgpu.BlockSpec((BLOCK, FACTOR_COLS), lambda i: (row_of(i), 0),
                         transforms=_THIN)


def _mask_operands(tabs, factors, bias_name):
  """The kernel's mask inputs after its lists: the bias table `bias_name`
  of `_tables`, or (k1, q1) of `_factor_tables`."""
  if factors is None:
    return (tabs[bias_name],)
  return factors["k1"], factors["q1"]


def _list_smem(tabs, name):
  """SMEM scratch for one CTA's row of the [n, 2, W] list `tabs[name]`."""
  return plgpu.SMEM(tabs[name].shape[1:], jnp.int32)


def _partner_specs(lay, cta_list, cols, thin=False):
  """Pipeline blocks of step i: the partner tile cta_list[0, i] of [*, c]
  operands (c in `cols`, addressed by the layout; None for a [B, H, R]
  vector in plan-row order), then its mask cta_list[1, i]: a [64, 64] bias
  tile, or (`thin`) a [64, 16] k1 tile. cta_list is the CTA's [2, W] row
  of the lists, in SMEM (TMA-loaded with the CTA's own tile, so the index
  maps do not read GMEM each step: forward 1.04x, dk/dv 1.06x) or in
  GMEM."""
  tile_of, mask_of = (lambda i: cta_list[0, i]), (lambda i: cta_list[1, i])
  return [lay.partner_spec(c, tile_of) if c else
          plgpu.BlockSpec((BLOCK,), lambda i: (tile_of(i),)) for c in cols
          ] + [_thin_block(mask_of) if thin else
               tiles_lib.row_block(BLOCK, mask_of)]


def _bias(smem):
  """The step's [64, 64] mask bias (SMEM, bfloat16) as float32 registers."""
  return plgpu.load(smem, layout=_WGMMA).astype(jnp.float32)


def _stage(lay, interp, dtype, n_a_operands, partner_cols):
  """Interpret-mode SMEM scratch (a tuple of Nones on the GPU): the wgmma
  A operands ([64, 64], `common.a_operand`), then a [64, c] copy of each
  pipelined partner for "image" (`Layout.partner`)."""
  a = plgpu.SMEM((BLOCK, BLOCK), dtype, transforms=_TILED)
  return (tuple(None if interp is None else a for _ in range(n_a_operands))
          + tuple(lay.partner_stage(c, dtype, interp) for c in partner_cols))


def _kernel_call(kernel, out_type, tile_axis, lay, b, h, scratch, interp,
                 *args):
  """plgpu.kernel over (B, H, tiles) (`common.tile_grid`), one warpgroup a
  CTA; tile_axis names the tile axis ("q" or "kv")."""
  return plgpu.kernel(
      kernel, out_type=out_type,
      **common.tile_grid(tile_axis, lay.n_tiles, h, b),
      scratch_types=tuple(scratch),
      compiler_params=common.LANE_PARAMS, interpret=interp)(*args)


def _heads(hh, group):
  return lax.div(hh, jnp.array(group, hh.dtype))


def _dims(q, k, v):
  """(B, H, group, D, V) from operand-form q, k, v [.., heads, dim]."""
  h, d = q.shape[-2:]
  return q.shape[0], h, h // k.shape[-2], d, v.shape[-1]


# ---------------------------------------------------------------- forward ---


def _forward(q, k, v, lay, *, scale, interpret):
  """q [.., H, D], k [.., Hkv, D], v [.., Hkv, V] in the operand form of
  `lay` -> (o [.., H, V] q.dtype (operand form), lse [B, H, R] float32 in
  log2 units, plan-row order)."""
  b, h, group, d, dv = _dims(q, k, v)
  dtype = q.dtype
  c = float(scale) * common.LOG2E
  width = lay.plan.kv_tiles.shape[1]
  factors = _factor_tables(lay.plan, dtype, c)   # None: bias tiles
  tabs = _tables(lay.plan) if factors is None else factors
  interp = common.interpret_params(interpret)

  scoped_q = SCOPED_Q

  def kernel(q_ref, k_ref, v_ref, list_ref, count_ref, mask_ref, *rest):
    q1_ref, rest = (None, rest) if factors is None else (rest[0], rest[1:])
    (o_ref, lse_ref, q_buf, o_buf, lse_smem, list_smem, q1_smem, bars,
     stage) = rest
    p_smem, k_stage, v_stage, q_stage = stage
    qt, hh, bb = (lax.axis_index(a) for a in ("q", "heads", "batch"))
    kvh = _heads(hh, group)

    def load_q(q_buf):
      q_own = lay.own(q_buf, interp)
      q_own.load(lay.own_box(q_ref, bb, qt, hh), bars.at[0])
      plgpu.copy_gmem_to_smem(list_ref.at[qt], list_smem, bars.at[1])
      if factors is not None:
        plgpu.copy_gmem_to_smem(q1_ref.at[pl.ds(qt * BLOCK, BLOCK)], q1_smem,
                                bars.at[2])
        plgpu.barrier_wait(bars.at[2])
      plgpu.barrier_wait(bars.at[0])
      plgpu.barrier_wait(bars.at[1])
      q_own.loaded()
      if not scoped_q:
        return q_own.mma
      return plgpu.load(q_own.mma, layout=_WGMMA)

    if scoped_q:   # Q's buffer only while it loads; Q in registers
      q_a = common.a_operand(   # (interpret mode: an SMEM copy)
          pl.run_scoped(load_q, lay.own_scratch(d, dtype, interp)), q_stage)
    else:
      q_a = load_q(q_buf)

    def body(idx, k_blk, v_blk, mask_smem, carry):
      m, l, acc = carry
      k_smem, v_smem = lay.partner(k_blk, k_stage), lay.partner(v_blk, v_stage)
      def mma(r):
        plgpu.wgmma(r, q_a, k_smem.transpose((1, 0)))
        if factors is not None:   # + the mask, 0 or hugely negative
          plgpu.wgmma(r, q1_smem, mask_smem.transpose((1, 0)))
      (s,) = common.products(mma, [(BLOCK, BLOCK)])
      if factors is None:
        s = s * c + _bias(mask_smem)                   # log2 units, masked
        m_new, l, acc, p = common.softmax_step(s, m, l, acc)
      else:                                            # c > 0
        m_new, l, acc, p = common.softmax_step(s, m, l, acc, c,
                                               factors["floor"])
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
        in_specs=_partner_specs(lay, list_smem, (d, dv),
                                thin=factors is not None),
        max_concurrent_steps=min(2, width), init_carry=init,
    )(lay.partner_ref(k_ref, bb, kvh), lay.partner_ref(v_ref, bb, kvh),
      mask_ref)
    lse_smem[...] = m + jnp.log2(l)

    def store_o(o_buf):
      lay.own(o_buf, interp).store(common.normalize(acc, l).astype(dtype),
                                   lay.own_box(o_ref, bb, qt, hh))
      plgpu.copy_smem_to_gmem(lse_smem,
                              lse_ref.at[bb, hh, pl.ds(qt * BLOCK, BLOCK)])
      common.wait_stores_at_exit()

    if scoped_q:   # a fresh buffer where the pipeline's were
      pl.run_scoped(store_o, lay.own_scratch(dv, dtype, interp))
    else:
      store_o(q_buf if o_buf is None else o_buf)   # Q's if D == V: done

  scratch = [None if scoped_q else lay.own_scratch(d, dtype, interp),
             None if d == dv or scoped_q else
             lay.own_scratch(dv, dtype, interp),
             plgpu.SMEM((BLOCK,), jnp.float32), _list_smem(tabs, "kv_list"),
             None if factors is None else
             plgpu.SMEM((BLOCK, FACTOR_COLS), dtype, transforms=_THIN),
             plgpu.Barrier(num_barriers=3),
             _stage(lay, interp, dtype, 1, (d, dv)) + (
                 None if interp is None or not scoped_q else
                 plgpu.SMEM((BLOCK, d), dtype, transforms=_TILED),)]
  out_type = (jax.ShapeDtypeStruct(lay.out_shape(h, dv), dtype),
              jax.ShapeDtypeStruct((b, h, lay.plan.n_rows), jnp.float32))
  return _kernel_call(
      kernel, out_type, "q", lay, b, h, scratch, interp,
      q, k, v, tabs["kv_list"], tabs["kv_count"],
      *_mask_operands(tabs, factors, "bias"))


# --------------------------------------------------------------- backward ---


def _backward_dq(q, k, v, do, lse, delta, lay, *, scale, interpret):
  """dq [.., H, D] q.dtype (operand form); lse, delta [B, H, R] float32
  (log2 lse), plan-row order."""
  b, h, group, d, dv = _dims(q, k, v)
  dtype = q.dtype
  c = float(scale) * common.LOG2E
  width = lay.plan.kv_tiles.shape[1]
  factors = _factor_tables(lay.plan, dtype, c)   # None: bias tiles
  tabs = _tables(lay.plan) if factors is None else factors
  interp = common.interpret_params(interpret)

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, list_ref,
             count_ref, mask_ref, *rest):
    q1_ref, rest = (None, rest) if factors is None else (rest[0], rest[1:])
    dq_ref, q_buf, do_buf, q1_smem, list_smem, bars, stage = rest
    ds_smem, k_stage, v_stage = stage
    q_own, do_own = lay.own(q_buf, interp), lay.own(do_buf, interp)
    qt, hh, bb = (lax.axis_index(a) for a in ("q", "heads", "batch"))
    kvh = _heads(hh, group)
    rows_q = pl.ds(qt * BLOCK, BLOCK)
    q_own.load(lay.own_box(q_ref, bb, qt, hh), bars.at[0])
    do_own.load(lay.own_box(do_ref, bb, qt, hh), bars.at[1])
    lse_i = plgpu.load(lse_ref.at[bb, hh, rows_q], layout=_ROWS,
                       optimized=False)
    delta_i = plgpu.load(delta_ref.at[bb, hh, rows_q], layout=_ROWS,
                         optimized=False)
    if factors is not None:
      plgpu.copy_gmem_to_smem(q1_ref.at[rows_q], q1_smem, bars.at[2])
      plgpu.copy_gmem_to_smem(list_ref.at[qt], list_smem, bars.at[3])
      plgpu.barrier_wait(bars.at[2])
      plgpu.barrier_wait(bars.at[3])
    plgpu.barrier_wait(bars.at[0])
    plgpu.barrier_wait(bars.at[1])
    q_own.loaded()
    do_own.loaded()

    def body(idx, k_blk, v_blk, mask_smem, dq_acc):
      k_smem, v_smem = lay.partner(k_blk, k_stage), lay.partner(v_blk, v_stage)
      def mma(s_ref, dp_ref):
        plgpu.wgmma(s_ref, q_own.mma, k_smem.transpose((1, 0)))
        if factors is not None:   # + the mask, 0 or hugely negative
          plgpu.wgmma(s_ref, q1_smem, mask_smem.transpose((1, 0)))
        plgpu.wgmma(dp_ref, do_own.mma, v_smem.transpose((1, 0)))
      s, dp = common.products(mma, [(BLOCK, BLOCK)] * 2)
      if factors is None:
        s = s * c + _bias(mask_smem)
      else:
        s = s * c
      p = jnp.exp2(s - _bcast(lse_i, s.shape, 0))
      ds = p * (dp - _bcast(delta_i, s.shape, 0))
      ds16 = common.a_operand(ds.astype(dtype), ds_smem)
      (dq_acc,) = common.accumulate(
          lambda r: plgpu.wgmma(r, ds16, k_smem), (dq_acc,), interp)
      return dq_acc

    # With bias tiles the list stays in GMEM: Q, dO and the pipeline fill
    # the SMEM of two CTAs an SM, and 128 bytes more cost the second (dq
    # 1.28x slower). The thin mask tiles leave room for it in SMEM.
    dq = plgpu.emit_pipeline(
        body, grid=(count_ref[qt],),
        in_specs=_partner_specs(lay, list_ref.at[qt] if factors is None
                                else list_smem, (d, dv),
                                thin=factors is not None),
        max_concurrent_steps=min(2, width),
        init_carry=plgpu.layout_cast(jnp.zeros((BLOCK, d), jnp.float32),
                                     _WGMMA),
    )(lay.partner_ref(k_ref, bb, kvh), lay.partner_ref(v_ref, bb, kvh),
      mask_ref)
    q_own.store((dq * float(scale)).astype(dtype),       # Q is done
                lay.own_box(dq_ref, bb, qt, hh))
    common.wait_stores_at_exit()

  scratch = [lay.own_scratch(d, dtype, interp),
             lay.own_scratch(dv, dtype, interp),
             None if factors is None else
             plgpu.SMEM((BLOCK, FACTOR_COLS), dtype, transforms=_THIN),
             None if factors is None else _list_smem(tabs, "kv_list"),
             plgpu.Barrier(num_barriers=4),
             _stage(lay, interp, dtype, 1, (d, dv))]
  return _kernel_call(
      kernel, jax.ShapeDtypeStruct(q.shape, dtype), "q",
      lay, b, h, scratch, interp, q, k, v, do, lse, delta,
      tabs["kv_list"], tabs["kv_count"],
      *_mask_operands(tabs, factors, "bias"))


def _backward_dkv(q, k, v, do, lse, delta, lay, *, scale, interpret):
  """(dk [.., H, D], dv [.., H, V]) per QUERY head: q.dtype in operand
  form when H == Hkv, else float32 in plan-row order [B, R, H, X] (summed
  over groups and reordered by the caller)."""
  b, h, group, d, dv = _dims(q, k, v)
  dtype = q.dtype
  out_dtype = dtype if group == 1 else jnp.float32
  c = float(scale) * common.LOG2E
  width = lay.plan.q_tiles.shape[1]
  factors = _factor_tables(lay.plan, dtype, c)   # None: bias tiles
  tabs = _tables(lay.plan) if factors is None else factors
  interp = common.interpret_params(interpret)
  staging = common.dkv_staging(group, 1, BLOCK, d, dv)

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, list_ref,
             count_ref, mask_ref, *rest):
    q1_ref, rest = (None, rest) if factors is None else (rest[0], rest[1:])
    (dk_ref, dv_ref, k_buf, v_buf, out_smem, list_smem, bars,
     stage) = rest
    pt_smem, dst_smem, q_stage, do_stage = stage
    k_own, v_own = lay.own(k_buf, interp), lay.own(v_buf, interp)
    kt, hh, bb = (lax.axis_index(a) for a in ("kv", "heads", "batch"))
    kvh = _heads(hh, group)
    k_own.load(lay.own_box(k_ref, bb, kt, kvh), bars.at[0])
    v_own.load(lay.own_box(v_ref, bb, kt, kvh), bars.at[1])
    plgpu.copy_gmem_to_smem(list_ref.at[kt], list_smem, bars.at[2])
    for i in range(3):
      plgpu.barrier_wait(bars.at[i])
    k_own.loaded()
    v_own.loaded()
    k_smem, v_smem = k_own.mma, v_own.mma

    def body(idx, q_blk, do_blk, lse_smem, delta_smem, mask_smem, *rest):
      *q1_blk, carry = rest   # q1_blk: the partner's classes (factors)
      q_smem = lay.partner(q_blk, q_stage)
      do_smem = lay.partner(do_blk, do_stage)
      def mma(st_ref, dpt_ref):
        plgpu.wgmma(st_ref, k_smem, q_smem.transpose((1, 0)))
        if factors is not None:   # + the mask (transposed), 0 or hugely
          plgpu.wgmma(st_ref, mask_smem, q1_blk[0].transpose((1, 0)))
        plgpu.wgmma(dpt_ref, v_smem, do_smem.transpose((1, 0)))
      st, dpt = common.products(mma, [(BLOCK, BLOCK)] * 2)  # [keys, queries]
      lse_j = plgpu.load(lse_smem, layout=_COLS)
      delta_j = plgpu.load(delta_smem, layout=_COLS)
      st = st * c if factors is not None else st * c + _bias(mask_smem)
      pt = jnp.exp2(st - _bcast(lse_j, st.shape, 1))
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
        in_specs=_partner_specs(
            lay, list_smem, (d, dv, None, None), thin=factors is not None
        ) + ([] if factors is None else   # the partner query tile's q1
             [_thin_block(lambda i: list_smem[0, i])]),
        max_concurrent_steps=min(2, width), init_carry=init,
    )(lay.partner_ref(q_ref, bb, hh), lay.partner_ref(do_ref, bb, hh),
      lse_ref.at[bb, hh], delta_ref.at[bb, hh], mask_ref,
      *(() if factors is None else (q1_ref,)))
    dk = (dk * float(scale)).astype(out_dtype)
    dv_ = dv_.astype(out_dtype)
    if staging is None:   # 16-bit: out through K and V's own buffers (done)
      k_own.store(dk, lay.own_box(dk_ref, bb, kt, hh))
      v_own.store(dv_, lay.own_box(dv_ref, bb, kt, hh))
      common.wait_stores_at_exit()
    else:                 # float32, plan rows
      rows_k = pl.ds(kt * BLOCK, BLOCK)
      common.store_dkv(dk, dv_, dk_ref.at[bb, rows_k, hh],
                       dv_ref.at[bb, rows_k, hh], k_smem=None, v_smem=None,
                       staging=out_smem, wg=0)

  scratch = [lay.own_scratch(d, dtype, interp),
             lay.own_scratch(dv, dtype, interp),
             staging, _list_smem(tabs, "q_list"),
             plgpu.Barrier(num_barriers=3),
             _stage(lay, interp, dtype, 2, (d, dv))]
  shape = ((lambda x: lay.out_shape(h, x)) if group == 1 else
           (lambda x: (b, lay.plan.n_rows, h, x)))
  out_type = (jax.ShapeDtypeStruct(shape(d), out_dtype),
              jax.ShapeDtypeStruct(shape(dv), out_dtype))
  return _kernel_call(
      kernel, out_type, "kv", lay, b, h, scratch, interp,
      q, k, v, do, lse, delta, tabs["q_list"], tabs["q_count"],
      *_mask_operands(tabs, factors, "bias_t"))


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
  """Checks the call; returns its `mosaic_gpu_tiles.Layout` (the plan and
  how the kernels address tiles: "sequence"/"image" read and write the
  [B, *S, H, X] arrays directly, "gather" goes through plan rows)."""
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
  kind = tiles_lib.choose_kind(plan, spatial, ds, tile_shape, q.shape[-1],
                               v.shape[-1])
  return tiles_lib.Layout(kind, plan, q.shape[0], spatial, ds)


def io_path(q, k, v, *, kernel_size, dilation, stride, is_causal,
            tile_shape=None) -> str:
  """How `neighborhood_attention` would address tiles for these inputs:
  "sequence" or "image" (TMA straight from / to [B, *S, H, X]) or
  "gather" (XLA gathers into plan rows); raises as the op does."""
  return _prepare(q, k, v, kernel_size, dilation, stride, is_causal, 1.0,
                  tile_shape).kind


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
  lay = _prepare(q, k, v, kernel_size, dilation, stride, is_causal, scale,
                 tile_shape)
  h, hkv = q.shape[-2], k.shape[-2]
  # The tables are built inside each call (constants of its trace, never
  # tracers closed over by the custom_vjp).
  cfg = dict(lay=lay, scale=float(scale), interpret=interpret)

  # On operand forms (Layout.operand: plan rows, or the inputs themselves).
  @jax.custom_vjp
  def attend(qo, ko, vo):
    return _forward(qo, ko, vo, **cfg)[0]

  def attend_fwd(qo, ko, vo):
    o, lse = _forward(qo, ko, vo, **cfg)
    return o, (qo, ko, vo, o, lse)

  def attend_bwd(res, do):
    qo, ko, vo, o, lse = res
    do = do.astype(qo.dtype)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), -1)
    delta = jnp.swapaxes(lay.operand_to_rows(delta), 1, 2)   # [B, H, R]
    dq = _backward_dq(qo, ko, vo, do, lse, delta, **cfg)
    dk, dv = _backward_dkv(qo, ko, vo, do, lse, delta, **cfg)
    if h != hkv:   # plan rows, float32: sum each group of H // Hkv heads
      sum_heads = lambda x: lay.rows_to_operand(x.reshape(
          *x.shape[:2], hkv, h // hkv, x.shape[-1]).sum(axis=3))
      dk, dv = sum_heads(dk), sum_heads(dv)
    return dq, dk.astype(ko.dtype), dv.astype(vo.dtype)

  attend.defvjp(attend_fwd, attend_bwd)
  return lay.result(attend(lay.operand(q), lay.operand(k), lay.operand(v)))


def forward_with_lse(q, k, v, *, kernel_size, dilation, stride, is_causal,
                     scale, interpret=False, tile_shape=None):
  """(o [B, *S, H, V], lse [B, *S, H] float32, natural log) without
  autodiff; for tests and diagnostics."""
  lay = _prepare(q, k, v, kernel_size, dilation, stride, is_causal, scale,
                 tile_shape)
  o, lse = _forward(lay.operand(q), lay.operand(k), lay.operand(v), lay,
                    scale=float(scale), interpret=interpret)
  lse = lay.result(lay.rows_to_operand(jnp.swapaxes(lse, 1, 2)[..., None]))
  return lay.result(o), lse[..., 0] / common.LOG2E
