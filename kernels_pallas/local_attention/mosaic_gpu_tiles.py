"""Where the Hopper neighborhood kernels (mosaic_gpu_sparse) find their
64-token tiles in GMEM: a `Layout` per call, chosen from the plan.

Three layouts; the kernels are the same, only the tile addressing differs.

  "gather"   (any plan): XLA gathers [B, *S, H, X] into plan rows
             [B, R, H, X] (padded rows read token 0) and gathers the
             outputs back (permute.py: gathers in the VJP too); tile t is
             rows [64 t, 64 t + 64).
  "sequence" (1-D, dilation 1, tiles of 64): plan rows ARE the tokens
             (plan.perm = 0 .. T-1, then padding), so the kernels read and
             write x [B, T, H, X] itself: tile t is the box
             x.at[b, pl.ds(64 t, 64), h]; the last tile's rows past T load
             as zeros and its stores are clipped (T need not be a multiple
             of 64).
  "image"    (2-D, dilation 1, 8 x 8 tiles, Ws % 8 == 0, D == V): plan tile
             t is the image patch (tr, tc) = divmod(t, Ws // 8), rows
             [8 tr, 8 tr + 8) x cols [8 tc, 8 tc + 8), row-major within the
             patch (checked against plan.perm; with a ragged Hs the last
             tile row's rows past Hs are padding). TMA boxes have at most 5
             dims, so x is viewed (a free reshape in XLA) as
             [B, Hs, Ws // 8, 8, H, X] and a patch is the [8, 8, X] box
             x.at[b, pl.ds(8 tr, 8), tc, :, h]; rows past Hs load as zeros
             and are clipped on store (along the untiled Hs dim).
             SMEM: `TILED3` on [8, 8, X] has the bytes of common.TILED on
             [64, X]. A wgmma A operand takes no ref reshape, so a CTA's
             own tile is a RefUnion of both views (`OwnTile`: TMA through
             the [8, 8, X] view, wgmma and stores through the [64, X] one);
             pipelined partner tiles are [8, 8, X] blocks ref-reshaped to
             [64, X] in the body (`partner`).

Not direct: 3-D (a [4, 4, 4, X] box with the head index is 6 dims, over
TMA's 5, besides a tiled X), dilation > 1 (a tile is a strided sub-grid:
it needs a strided view and padding per group), other tile shapes, and
2-D with Ws % 8 != 0 or D != V.

Interpret mode has no ref reshape and gives each RefUnion member its own
buffer: there values are copied between the views (small, interpret only).

XLA-side: the kernels' lse (and the backward's delta) stay in plan-row order
[B, H, R]; `rows_to_operand` / `operand_to_rows` convert [B, R, ...] from /
to the kernels' operand form with a slice or pad and, for "image", a
transpose (no gather). GQA's float32 per-query-head dk/dv also leave the
kernel in row order [B, R, H, X] and are converted the same way.
"""

from __future__ import annotations

import dataclasses

from jax import lax
import jax.experimental.pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np

from kernels_pallas import mosaic_gpu_common as common
from kernels_pallas.local_attention import permute

BLOCK = 64   # tokens of a tile
P = 8        # patch side ("image")
TILED3 = (plgpu.TilingTransform((1, P, 64)), plgpu.SwizzleTransform(128))


def _image_perm(hs, ws):
  """Plan rows of the "image" layout: token of row r (-1: padding)."""
  nr, nc = -(-hs // P), ws // P
  t, i, j = np.meshgrid(np.arange(nr * nc), np.arange(P), np.arange(P),
                        indexing="ij")
  row = (t // nc) * P + i
  return np.where(row < hs, row * ws + (t % nc) * P + j, -1).reshape(-1)


def choose_kind(plan, spatial, dilation, tile_shape, d, dv):
  """"sequence", "image" or "gather" (module docstring) for a plan."""
  if any(x != 1 for x in dilation):
    return "gather"
  if len(spatial) == 1 and tuple(tile_shape) == (BLOCK,):
    want = np.arange(plan.n_rows)
    if np.array_equal(plan.perm, np.where(want < spatial[0], want, -1)):
      return "sequence"
  if (len(spatial) == 2 and tuple(tile_shape) == (P, P)
      and spatial[1] % P == 0 and d == dv):
    if np.array_equal(plan.perm, _image_perm(*spatial)):
      return "image"
  return "gather"


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
  """A call's tile addressing (module docstring). `plan`: its plan."""
  kind: str
  plan: object
  batch: int
  spatial: tuple

  @property
  def n_tiles(self):
    return self.plan.n_rows // BLOCK

  @property
  def image(self):
    return self.kind == "image"

  # ------------------------------------------------------------- XLA side --

  def operand(self, x):
    """[B, *S, H, X] -> the kernels' operand form: rows [B, R, H, X]
    ("gather"), x ("sequence"), [B, Hs, Ws // 8, 8, H, X] ("image")."""
    b, rest = self.batch, x.shape[-2:]
    if self.kind == "gather":
      to_rows, _ = permute.row_maps(self.plan.perm, self.plan.inv, axis=1)
      return to_rows(x.reshape(b, self.plan.n_tokens, *rest))
    if self.kind == "image":
      hs, ws = self.spatial
      return x.reshape(b, hs, ws // P, P, *rest)
    return x

  def result(self, y):
    """Operand form [.., H, X] -> [B, *S, H, X]."""
    rest = y.shape[-2:]
    if self.kind == "gather":
      _, from_rows = permute.row_maps(self.plan.perm, self.plan.inv, axis=1)
      y = from_rows(y)
    return y.reshape(self.batch, *self.spatial, *rest)

  def out_shape(self, heads, cols):
    """Operand-form shape of a kernel output with `heads` heads."""
    if self.kind == "gather":
      return (self.batch, self.plan.n_rows, heads, cols)
    if self.kind == "image":
      hs, ws = self.spatial
      return (self.batch, hs, ws // P, P, heads, cols)
    return (self.batch, *self.spatial, heads, cols)

  def rows_to_operand(self, y):
    """[B, R, *rest] in plan-row order -> operand form [.., *rest]."""
    if self.kind == "gather":
      return y
    if self.kind == "sequence":
      return y[:, :self.spatial[0]]
    hs, ws = self.spatial
    nr, nc, rest = -(-hs // P), ws // P, y.shape[2:]
    y = y.reshape(self.batch, nr, nc, P, P, *rest)
    y = jnp.moveaxis(y, 3, 2).reshape(self.batch, nr * P, nc, P, *rest)
    return y[:, :hs]

  def operand_to_rows(self, y):
    """Operand form [.., *rest] (rest after the spatial dims) -> plan-row
    order [B, R, *rest]; padded rows are zeros ("gather": as is)."""
    if self.kind == "gather":
      return y
    rows = self.plan.n_rows
    pad_to = lambda y, n: jnp.pad(y, [(0, 0), (0, n - y.shape[1])]
                                  + [(0, 0)] * (y.ndim - 2))
    if self.kind == "sequence":
      return pad_to(y, rows)
    hs, ws = self.spatial
    nr, nc, rest = -(-hs // P), ws // P, y.shape[4:]
    y = pad_to(y, nr * P).reshape(self.batch, nr, P, nc, P, *rest)
    return jnp.moveaxis(y, 2, 3).reshape(self.batch, rows, *rest)

  # ---------------------------------------------------------- kernel side --

  def own_box(self, ref, bb, t, hh):
    """GMEM box of tile t, head hh of operand-form `ref`: [64, X] or
    ("image") [8, 8, X]."""
    if self.image:
      nc = self.spatial[1] // P
      return ref.at[bb, pl.ds(lax.div(t, nc) * P, P), lax.rem(t, nc), :, hh]
    return ref.at[bb, pl.ds(t * BLOCK, BLOCK), hh]

  def own_scratch(self, cols, dtype, interp):
    """SMEM scratch of a CTA's own [64, cols] tile (`OwnTile`)."""
    s64 = plgpu.SMEM((BLOCK, cols), dtype, transforms=common.TILED)
    if not self.image:
      return s64
    s3 = plgpu.SMEM((P, P, cols), dtype, transforms=TILED3)
    return plgpu.RefUnion(s64, s3) if interp is None else (s64, s3)

  def own(self, scratch, interp):
    return OwnTile(scratch, self.image, interp is not None)

  def partner_ref(self, ref, bb, hh):
    """The [tokens.., X] slab of batch bb, head hh the pipeline reads."""
    return ref.at[bb, :, :, :, hh] if self.image else ref.at[bb, :, hh]

  def partner_spec(self, cols, tile_of):
    """Pipeline block: tile tile_of(i) of `partner_ref`, [64, cols] or
    ("image") [8, 8, cols] (TILED3: `partner` turns it into [64, cols])."""
    if self.image:
      nc = self.spatial[1] // P
      return plgpu.BlockSpec(
          (P, None, P, cols),
          lambda i: (lax.div(tile_of(i), nc), lax.rem(tile_of(i), nc), 0, 0),
          transforms=TILED3)
    return plgpu.BlockSpec((BLOCK, cols), lambda i: (tile_of(i), 0),
                           transforms=common.TILED)

  def partner_stage(self, cols, dtype, interp):
    """Interpret-mode "image" only: a [64, cols] SMEM copy of a partner
    block (no ref reshape in the interpreter); else None."""
    if self.image and interp is not None:
      return plgpu.SMEM((BLOCK, cols), dtype, transforms=common.TILED)
    return None

  def partner(self, blk, stage):
    """A pipelined partner block as a [64, X] ref."""
    if not self.image:
      return blk
    if stage is None:
      return blk.reshape(BLOCK, blk.shape[-1])
    stage[...] = blk[...].reshape(stage.shape)
    return stage


class OwnTile:
  """A CTA's own [64, X] tile in SMEM: `mma` is the [64, X] view (wgmma
  operand, register stores), `tma` the view TMA copies ([8, 8, X] for
  "image", the same ref otherwise)."""

  def __init__(self, scratch, image, interpret):
    self.mma, self.tma = scratch if image else (scratch, scratch)
    self._copy = image and interpret   # separate buffers in interpret mode

  def load(self, src, barrier):
    plgpu.copy_gmem_to_smem(src, self.tma, barrier)

  def loaded(self):
    """After the load's barrier: interpret mode copies tma into mma."""
    if self._copy:
      self.mma[...] = self.tma[...].reshape(self.mma.shape)

  def store(self, value, dst):
    """value -> the tile -> TMA copy to dst (not awaited)."""
    self.mma[...] = value
    if self._copy:
      self.tma[...] = self.mma[...].reshape(self.tma.shape)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(self.tma, dst)
