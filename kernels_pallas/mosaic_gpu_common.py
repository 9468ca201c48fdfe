"""Helpers shared by the Mosaic GPU (Hopper) kernels of every family.

`interpret_params`, `accumulate` and `a_operand` exist because of Mosaic
GPU's CPU interpreter in jax 0.11.2, which the kernels' CI tests run under:
it takes interpret parameters rather than a flag, it does not handle
`run_state` (accumulators that start from a value), and it wants wgmma A
operands in SMEM. The rest (layouts, the 128-byte-swizzled tiling, base-2
softmax constants, fresh wgmma products, the dk/dv stores) is shared by the
attention kernels of kernels_pallas/local_attention and sigmoid_attention.
"""

from __future__ import annotations

import functools
import math

from jax import lax
import jax.experimental.pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

SMEM_LIMIT = 227 * 1024   # per-block opt-in SMEM on H100/H200, in bytes

LOG2E = math.log2(math.e)
# A masked score in log2 units: finite on purpose, so that a row whose first
# keys are all masked never computes inf - inf; its junk sums are scaled by
# exp2(MASK - m) = 0 once a visible key arrives.
MASK = -1e30

# [rows, 64 * k] 16-bit SMEM tiles as wgmma and TMA want them.
TILED = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
WGMMA = plgpu.Layout.WGMMA
ROWS = plgpu.Layout.WGMMA.reduce(1)   # one value per row of a WGMMA array
COLS = plgpu.Layout.WGMMA.reduce(0)   # one value per column
LANE_PARAMS = plgpu.CompilerParams(
    approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane)


TILES_FASTEST = True   # False: every kernel batch fastest (bench.py's A/B)


def tile_grid(tile_axis, n_tiles, h, b, tiles_fastest=True):
  """`plgpu.kernel`'s grid and grid_names for one CTA per (tile, head,
  batch), the tile axis launching fastest unless `tiles_fastest` is False.
  Pallas launches its last grid axis fastest (it becomes CUDA's x), so with
  the tile axis last the CTAs of one (batch, head), which read the same K
  and V (or Q and dO), run in the same wave and find them in L2; with batch
  fastest each wave read every head's K and V from DRAM again (BENCHMARKS.md
  sections 5f, 5h: sigmoid 1.14x faster tiles fastest). Kernels whose
  tiles read little in common (narrow sliding windows) run batch fastest,
  which measured faster there (5h)."""
  if TILES_FASTEST and tiles_fastest:
    return dict(grid=(b, h, n_tiles), grid_names=("batch", "heads", tile_axis))
  return dict(grid=(n_tiles, h, b), grid_names=(tile_axis, "heads", "batch"))


def interpret_params(interpret):
  """`plgpu.kernel`'s interpret= from a kernel's argument: False -> None
  (compile for the GPU), True -> default `plgpu.InterpretGPUParams()`, an
  `InterpretGPUParams` as is."""
  if interpret is True:
    return plgpu.InterpretGPUParams()
  return None if interpret is False else interpret


def accumulate(mma, inits, interpret):
  """Returns inits[i] + (the products `mma(*acc_refs)` issues into acc_refs[i]).

  On the GPU (`interpret` None) each accumulator starts from its init
  (`pl.run_state`; the wgmmas are awaited once, at the end). Interpret mode
  does not handle `run_state_p`, so there the products go into fresh zero
  accumulators (`pl.run_scoped`) and the inits are added afterwards: the
  same math, one extra register add.
  """
  if interpret is None:
    return pl.run_state(lambda refs: mma(*refs))(
        tuple(plgpu.ACC.init(x) for x in inits))
  def scoped(*acc_refs):
    mma(*acc_refs)
    return tuple(r[...] for r in acc_refs)
  outs = pl.run_scoped(
      scoped, *(plgpu.ACC(x.shape, jnp.float32) for x in inits))
  return tuple(x + y for x, y in zip(inits, outs))


def products(mma, shapes):
  """Fresh float32 accumulators of `shapes` filled by `mma(*acc_refs)` (one
  wgmma group), returned as values."""
  def scoped(*acc_refs):
    mma(*acc_refs)
    return tuple(r[...] for r in acc_refs)
  return pl.run_scoped(scoped, *(plgpu.ACC(s, jnp.float32) for s in shapes))


# Epilogue switches (on by default; bench.py's "mosaic_gpu_full_exit_wait" and
# "mosaic_gpu_divide" turn them off for an A/B, BENCHMARKS.md section 4q).
# EXIT_READ_ONLY: a kernel's last wait for its TMA stores waits until they
# have read SMEM, not until their writes have landed: the kernel's completion
# makes the writes visible to whatever runs after it. (Triton's Gluon
# `store_wait` waits read-only by default and asks for the full wait only
# where TMA writes pass messages between CTAs, which no kernel here does.)
# NORMALIZE_BY_INVERSE: o = acc * (1 / l), one division a row, instead of
# acc / l, an IEEE division (`div.rn.f32`, several instructions) for every
# element of the accumulator.
EXIT_READ_ONLY = True
NORMALIZE_BY_INVERSE = True


def wait_stores_at_exit():
  """The wait after the last TMA stores of a kernel, a compute warpgroup or
  a persistent CTA's work item: until they have read SMEM (EXIT_READ_ONLY;
  else until their writes have landed), so that SMEM may be released or
  reused. The caller never reads their GMEM destinations afterwards."""
  plgpu.wait_smem_to_gmem(0, wait_read_only=EXIT_READ_ONLY)


def normalize(acc, l):
  """acc [rows, V] divided by the row sums l [rows] (float32)."""
  if NORMALIZE_BY_INVERSE:
    return acc * bcast(1.0 / l, acc.shape, 0)
  return acc / bcast(l, acc.shape, 0)


def softmax_step(s, m, l, acc, c=None, floor=None):
  """One key tile of the online softmax in base 2: s [rows, keys] scores
  (masked ones hugely negative), the running row max m and sum l [rows]
  (log2 units) and the output accumulator acc [rows, V] -> (m, l, acc
  rescaled to the new max, p [rows, keys] float32).

  c None: s is already in log2 units. c = scale log2(e) > 0: s holds the raw
  scores q . k and the scale is folded in, 2^(s c - m), one FMA an element;
  a compiler may contract it so (exact s c, rounded m): in a row whose keys
  so far are all masked m is off by an ulp of a huge number and the power
  could overflow, so m is floored at `floor`, far below any real score and
  far above the masked ones, which then give exactly 0."""
  if c is None:
    m_new = jnp.maximum(m, s.max(axis=1))
    p = jnp.exp2(s - bcast(m_new, s.shape, 0))
  else:
    m_new = jnp.maximum(jnp.maximum(m, s.max(axis=1) * c), floor)
    p = jnp.exp2(s * c - bcast(m_new, s.shape, 0))
  alpha = jnp.exp2(m - m_new)
  l = l * alpha + p.sum(axis=1)
  return m_new, l, acc * bcast(alpha, acc.shape, 0), p


def bcast(x, shape, dim):
  """A row (dim=0) or column (dim=1) vector broadcast to `shape`."""
  return lax.broadcast_in_dim(x, shape, [dim])


def a_operand(x16, smem):
  """wgmma A operand: the registers x16 on the GPU (smem None); in interpret
  mode written to the SMEM scratch `smem`, which is returned."""
  if smem is None:
    return x16
  smem[...] = x16
  plgpu.commit_smem()
  return smem


def reciprocal(x, interpret):
  """1 / x for a float32 array in the WGMMA layout. On the GPU
  (`interpret` None) one `rcp.approx.ftz.f32` per element (PTX ISA: at most
  1 ulp of error, subnormals flushed to zero); a plain division lowers to
  IEEE `div.rn.f32`, a sequence of several instructions with a slow-path
  check. The interpreter runs no inline Mosaic GPU code, so there it divides.
  (`_pointwise` and `_lift_fast_instr` are Mosaic GPU internals, stable in
  the pinned jax 0.11.2.)"""
  if interpret is not None:
    return 1.0 / x

  @plgpu.inline_mgpu(
      arg_types=(plgpu.Layout.WGMMA,),
      return_type=plgpu.ShapeDtypeStruct(x.shape, jnp.float32,
                                         layout=plgpu.Layout.WGMMA))
  def rcp(_, y):
    return y._pointwise(y._lift_fast_instr("rcp.approx.ftz.f32"))  # pylint: disable=protected-access
  return rcp(x)


def dkv_staging(group, wgs, rows, d, dv):
  """SMEM scratch of `store_dkv` for `wgs` warpgroups of [rows, *] tiles:
  None when H == Hkv (group 1: 16-bit outputs staged in K and V
  themselves), else float32 buffers, one reused for dk then dv when
  D == V (two [64, 128] float32 tiles per warpgroup do not fit next to K,
  V and a pipeline)."""
  if group == 1:
    return None
  return (plgpu.SMEM((wgs, rows, d), jnp.float32),
          None if d == dv else plgpu.SMEM((wgs, rows, dv), jnp.float32))


def store_dkv(dk, dv, dk_dst, dv_dst, *, k_smem, v_smem, staging, wg):
  """TMA-stores the values dk, dv (in their output dtype) to the GMEM refs
  dk_dst, dv_dst through SMEM: K, V's own buffers k_smem, v_smem when
  `staging` (from `dkv_staging`) is None, else warpgroup wg's float32
  buffers; waits until the stores have read SMEM (`wait_stores_at_exit`)."""
  if staging is None:
    dk_smem, dv_smem = k_smem, v_smem
  elif staging[1] is None:
    dk_smem = dv_smem = staging[0].at[wg]
  else:
    dk_smem, dv_smem = staging[0].at[wg], staging[1].at[wg]
  for value, smem, dst in ((dk, dk_smem, dk_dst), (dv, dv_smem, dv_dst)):
    if dst is dv_dst and dv_smem is dk_smem:
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # dk has left it
    smem[...] = value
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(smem, dst)
  wait_stores_at_exit()


def skip_or(valid, interior, step, carry):
  """carry if not valid (a traced bool), else step(carry, interior)."""
  return lax.cond(valid, functools.partial(step, interior=interior),
                  lambda c: c, carry)


class Turns:
  """Two compute warpgroups of a warp-specialized kernel taking turns on the
  tensor cores, as FlashAttention-3 schedules its two softmax warpgroups
  ("ping-pong"). Both arrive at one barrier (`scratch(True)`: two
  arrivals per phase) twice a step: `turn()` after issuing the step's
  first matmuls and again before issuing its last ones. Warpgroup 1 runs
  one arrival ahead (`begin`, made up by warpgroup 0 in `end`), so one
  warpgroup's elementwise work falls between the other's matmuls. A
  skipped step arrives twice too (`skip_or`): both warpgroups must arrive
  equally often, or the kernel deadlocks. Built with barrier None (the
  option off), every method is a no-op and `skip_or` is `skip_or`."""

  def __init__(self, barrier, wg):
    self.barrier, self.wg = barrier, wg

  @staticmethod
  def scratch(enabled):
    return plgpu.Barrier(num_arrivals=2) if enabled else None

  def turn(self):
    if self.barrier is not None:
      plgpu.barrier_arrive(self.barrier)
      plgpu.barrier_wait(self.barrier)

  def begin(self):
    if self.barrier is not None:
      pl.when(self.wg == 1)(self.turn)

  def end(self):
    if self.barrier is not None:
      pl.when(self.wg == 0)(self.turn)

  def skip_or(self, valid, interior, step, carry):
    if self.barrier is None:
      return skip_or(valid, interior, step, carry)
    def skip(carry):
      self.turn()
      self.turn()
      return carry
    return lax.cond(valid, functools.partial(step, interior=interior), skip,
                    carry)


def edge_mask(x, interior, visible, fill):
  """x where visible() (the tile's mask), fill elsewhere; x as it is when
  `interior` (a traced bool: the whole tile is visible). The branch holds
  only this [64, n] tile: branching between two whole step bodies (their
  wgmmas, the accumulators passing through) made every step of the
  sliding-window dq and dk/dv 10-15% slower on the H200, interior ones
  included (BENCHMARKS.md section 4d). A Python bool `interior` (a loop of
  known edge or interior steps, `mosaic_gpu_pipeline`) decides at trace time,
  with no cond."""
  if isinstance(interior, bool):
    return x if interior else jnp.where(visible(), x, fill)
  return lax.cond(interior, lambda x: x,
                  lambda x: jnp.where(visible(), x, fill), x)


def cta(tile_axis, group, jnp_range, wgs):
  """Where a warp-specialized kernel's compute warpgroup is (grid
  (tile_axis, "heads", "batch"), warpgroups on "wg"): (wg, head, kv head,
  batch, its own tile, [start, cta_end) of the partner tiles its CTA
  streams (both warpgroups' ranges together), [own_start, own_end) of its
  own tile; jnp_range(tile) gives a tile's range)."""
  ct, hh, bb = (lax.axis_index(a) for a in (tile_axis, "heads", "batch"))
  wg = lax.axis_index("wg")      # compute warpgroups 0 .. wgs - 1
  kvh = lax.div(hh, jnp.array(group, hh.dtype))
  start, _ = jnp_range(wgs * ct)
  _, cta_end = jnp_range(wgs * ct + wgs - 1)
  tile = wgs * ct + wg
  return (wg, hh, kvh, bb, tile, start, cta_end, *jnp_range(tile))
