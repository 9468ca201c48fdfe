"""The 1-D band geometry and shared constants of the Hopper sliding-window
kernels (mosaic_gpu.py: the forward kernels and the op; mosaic_gpu_backward.py:
the backward kernels): which tiles a tile reaches (`tile_range`), whether a
tile pair is wholly inside the band (`_interior`), the band mask of an edge
pair (`_visible`), and the per-CTA step counts of the warp-specialized
kernels (`_cta_range`, `_cta_steps`). The module docstring of mosaic_gpu.py
gives the math.
"""

from __future__ import annotations

import functools

from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from kernels_pallas import mosaic_gpu_common as common
from kernels_pallas import mosaic_gpu_pipeline as pipe

_BLOCK = 64
_WGS = 2            # compute warpgroups of the dk/dv kernel, a key tile each
_MEMORY_REGS = 40   # registers of its TMA warpgroup
_PAD = _WGS * _BLOCK   # T is padded to a multiple of this
_LOG2E = common.LOG2E
_MASK = common.MASK   # masked (log2-scaled) score; finite on purpose (common)
_WS_MIN_WIDTH = 1024   # a "wide" window (left + right + 1), see below


def tiles_fastest(left, right):
  """The kernels' launch order (`common.tile_grid`): the tiles of one
  (batch, head) fastest for windows of at least _WS_MIN_WIDTH keys, where
  they share K and V (or Q and dO) in L2; batch fastest below. On the H100
  (BENCHMARKS.md 5h, fwd+bwd) tiles fastest is 1.04-1.05x at w = 2048,
  batch fastest 1.01-1.02x at 512 and 1.06-1.07x at 128. (mosaic_gpu.py's
  forward picks its warp-specialized kernel from the same width.)"""
  return left + right + 1 >= _WS_MIN_WIDTH


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


def interior_range(tile, *, t, left, right, block_q, block_kv,
                   keys_on_rows=False, start=0, end=None, maximum=max,
                   minimum=min):
  """[lo, hi) of the partner tiles p for which `_interior` holds, clamped
  into [start, end) (start <= lo <= hi <= end): for a query tile `tile`,
  the key tiles (k0 = p block_kv); for a key tile (keys_on_rows), the query
  tiles (q0 = p block_q). `_interior` bounds the partner's first position
  from both sides, so these tiles are one run. Python ints or, with
  maximum=jnp.maximum, minimum=jnp.minimum, traced int32 scalars."""
  ceil = lambda x, m: (maximum(x, 0) + m - 1) // m
  if keys_on_rows:    # k0 + bk - 1 - right <= q0 <= k0 + left - bq + 1
    k0 = tile * block_kv
    lo = ceil(k0 + block_kv - 1 - right, block_q)
    hi = maximum(k0 + left + 1, 0) // block_q
    hi = hi * (k0 + block_kv <= t)     # none with a padded key in the tile
  else:               # q0 + bq - 1 - left <= k0 <= min(q0 + right, t - 1) - bk + 1
    q0 = tile * block_q
    lo = ceil(q0 + block_q - 1 - left, block_kv)
    hi = maximum(minimum(q0 + right, t - 1) + 1, 0) // block_kv
  if end is not None:
    lo = minimum(maximum(lo, start), end)
    hi = maximum(minimum(hi, end), lo)
  return lo, hi


def cta_interior(tiles, *, start, end, **kw):
  """[lo, hi) of the partner tiles interior to each of `tiles` (traced: the
  own tiles of a CTA's compute warpgroups), clamped into the CTA's
  [start, end); kw as `interior_range`'s."""
  ranges = [interior_range(tile, **kw, maximum=jnp.maximum,
                           minimum=jnp.minimum) for tile in tiles]
  lo = functools.reduce(jnp.maximum, [r[0] for r in ranges])
  hi = functools.reduce(jnp.minimum, [r[1] for r in ranges])
  lo = jnp.minimum(jnp.maximum(lo, start), end)
  return lo, jnp.maximum(jnp.minimum(hi, end), lo)


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


def _cta_range(cta, **kw):
  """[start, end) of the destination tiles that source tiles 2 cta and
  2 cta + 1 (the two compute warpgroups of one CTA) reach together."""
  start, _ = tile_range(_WGS * cta, **kw)
  _, end = tile_range(_WGS * cta + _WGS - 1, **kw)
  return start, end


def _cta_steps(n_cta, **kw):
  return max(e - s for s, e in (_cta_range(c, **kw) for c in range(n_cta)))


def key_steps(step, k_rows, v_rows, carry, *, qt, start, end, t, left, right,
              split):
  """The steps of a one-warpgroup kernel (forward, dq) over the key tiles
  [start, end) of query tile qt, both _BLOCK: carry = step(carry, k_smem,
  v_smem, kt, interior) per key tile kt; k_rows [Tp, D], v_rows [Tp, V]
  in GMEM. split: the edge tiles then the interior ones in two loops
  (`mosaic_gpu_pipeline.kv_loops`, interior True or False there); else one
  `emit_pipeline` loop over the most steps any query tile takes, interior
  a traced bool, steps past `end` skipped."""
  n = k_rows.shape[0] // _BLOCK
  if split:
    lo, hi = interior_range(qt, t=t, left=left, right=right, block_q=_BLOCK,
                            block_kv=_BLOCK, start=start, end=end,
                            maximum=jnp.maximum, minimum=jnp.minimum)
    return pipe.kv_loops(step, k_rows, v_rows, carry, start=start, lo=lo,
                         hi=hi, end=end, block=_BLOCK, transforms=_TILED)

  def body(idx, k_smem, v_smem, carry):
    kt = start + idx[0]
    interior = _interior(qt * _BLOCK, kt * _BLOCK, t=t, left=left,
                         right=right, block_q=_BLOCK, block_kv=_BLOCK)
    return _skip_or(kt < end, interior, lambda carry, interior: step(
        carry, k_smem, v_smem, kt, interior), carry)

  steps = _max_steps(n, t=t, back=left, ahead=right)
  clamp = lambda i: (jnp.minimum(start + i, n - 1), 0)
  return plgpu.emit_pipeline(
      body, grid=(steps,),
      in_specs=[plgpu.BlockSpec((_BLOCK, k_rows.shape[1]), clamp,
                                transforms=_TILED),
                plgpu.BlockSpec((_BLOCK, v_rows.shape[1]), clamp,
                                transforms=_TILED)],
      out_specs=[], max_concurrent_steps=max(1, min(2, steps)),
      init_carry=carry)(k_rows, v_rows)
