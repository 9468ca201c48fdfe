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
  "image"    (2-D, 8 x 8 tiles, D == V, dilation (d0, d1) >= 1 with
             Hs % d0 == 0 and Ws % (8 d1) == 0): every dilation group
             (g0, g1) = (y % d0, x % d1) is the same (Hs / d0) x (Ws / d1)
             sub-grid (Ws / d1 a multiple of 8), cut into nr x nc patches
             (nr = ceil(Hs / d0 / 8), nc = Ws / (8 d1)). Plan tile t (plan
             order: group-major, row-major over (g0, g1); patches row-major
             within a group) is
               (g0, g1) = divmod(t // (nr nc), d1),
               (tr, tc) = divmod(t % (nr nc), nc),
             the group's rows [8 tr, 8 tr + 8) x cols [8 tc, 8 tc + 8),
             row-major within the patch (checked against plan.perm; with a
             ragged Hs / d0 each group's last tile row's rows past Hs / d0
             are padding). TMA boxes have at most 5 dims, so x is viewed (a
             free reshape in XLA) as
               dilation 1: [B, Hs, Ws // 8, 8, H, X], a patch the [8, 8, X]
                 box x.at[b, pl.ds(8 tr, 8), tc, :, h];
               dilated:    [B, Hs / d0, d0, Ws / (8 d1), 8, d1, H, X], a
                 patch (every d-th pixel) the [8, 8, X] box
                 x.at[b, pl.ds(8 tr, 8), g0, tc, :, g1, h];
             rows past Hs / d0 load as zeros and are clipped on store (along
             the untiled group-row dim). Dilation 1 keeps the 6-dim view
             (its kernels are unchanged by the dilated form).
             SMEM: `TILED3` on [8, 8, X] has the bytes of common.TILED on
             [64, X]. A wgmma A operand takes no ref reshape, so a CTA's
             own tile is a RefUnion of both views (`OwnTile`: TMA through
             the [8, 8, X] view, wgmma and stores through the [64, X] one);
             pipelined partner tiles are [8, 8, X] blocks ref-reshaped to
             [64, X] in the body (`partner`).

Not direct: 3-D (a [4, 4, 4, X] box with the head index is 6 dims, over
TMA's 5, besides a tiled X), 1-D with dilation > 1, 2-D dilation with
Hs % d0 != 0 (groups of unequal heights) or Ws % (8 d1) != 0 (group rows
not whole patches of one strided view), other tile shapes, and 2-D with
Ws % 8 != 0 or D != V.

Interpret mode has no ref reshape and gives each RefUnion member its own
buffer: there values are copied between the views (small, interpret only).

XLA-side: the kernels' lse (and the backward's delta) stay in plan-row order
[B, H, R]; `rows_to_operand` / `operand_to_rows` convert [B, R, ...] from /
to the kernels' operand form with a slice or pad and, for "image", a
transpose (rows (g0, g1, tr, tc, i, j) <-> operand (tr, i, g0, tc, j, g1);
no gather). GQA's float32 per-query-head dk/dv also leave the
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


def row_block(cols, tile_of):
  """Pipeline block: rows [64 tile_of(i), + 64) of a [rows, cols] operand."""
  return plgpu.BlockSpec((BLOCK, cols), lambda i: (tile_of(i), 0),
                         transforms=common.TILED)


def _image_dims(spatial, dilation):
  """(n0, ntr, ntc): a dilation group's sub-grid rows, its tile rows and
  tile columns ("image"; Hs % d0 == 0 and Ws % (8 d1) == 0)."""
  (hs, ws), (d0, d1) = spatial, dilation
  n0 = hs // d0
  return n0, -(-n0 // P), ws // (P * d1)


def _image_perm(spatial, dilation):
  """Plan rows of the "image" layout: token of row r (-1: padding)."""
  (_, ws), (d0, d1) = spatial, dilation
  n0, ntr, ntc = _image_dims(spatial, dilation)
  t, i, j = np.meshgrid(np.arange(d0 * d1 * ntr * ntc), np.arange(P),
                        np.arange(P), indexing="ij")
  grp, rest = np.divmod(t, ntr * ntc)
  (g0, g1), (tr, tc) = np.divmod(grp, d1), np.divmod(rest, ntc)
  c0, c1 = tr * P + i, tc * P + j          # group coordinates
  tok = (c0 * d0 + g0) * ws + c1 * d1 + g1
  return np.where(c0 < n0, tok, -1).reshape(-1)


def choose_kind(plan, spatial, dilation, tile_shape, d, dv):
  """"sequence", "image" or "gather" (module docstring) for a plan."""
  dilation = tuple(dilation)
  if (len(spatial) == 1 and dilation == (1,)
      and tuple(tile_shape) == (BLOCK,)):
    want = np.arange(plan.n_rows)
    if np.array_equal(plan.perm, np.where(want < spatial[0], want, -1)):
      return "sequence"
  if (len(spatial) == 2 and tuple(tile_shape) == (P, P) and d == dv
      and all(x >= 1 for x in dilation)
      and spatial[0] % dilation[0] == 0
      and spatial[1] % (P * dilation[1]) == 0):
    want = _image_perm(spatial, dilation)
    if plan.perm.shape == want.shape and np.array_equal(plan.perm, want):
      return "image"
  return "gather"


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
  """A call's tile addressing (module docstring). `plan`: its plan;
  `dilation`: per axis (None: all 1)."""
  kind: str
  plan: object
  batch: int
  spatial: tuple
  dilation: tuple = None

  @property
  def n_tiles(self):
    return self.plan.n_rows // BLOCK

  @property
  def image(self):
    return self.kind == "image"

  @property
  def dilated(self):
    """"image" with dilation > 1: the group dims are in the view."""
    return self.image and any(x != 1 for x in self.dilation or ())

  def _view(self, rest):
    """"image" operand shape: [B, Hs, Ws // 8, 8, *rest] (dilation 1) or
    [B, Hs / d0, d0, Ws / (8 d1), 8, d1, *rest]."""
    hs, ws = self.spatial
    if not self.dilated:
      return (self.batch, hs, ws // P, P, *rest)
    (d0, d1), (n0, _, ntc) = self.dilation, self._dims()
    return (self.batch, n0, d0, ntc, P, d1, *rest)

  def _dims(self):
    return _image_dims(self.spatial, self.dilation or (1, 1))

  def _tile(self, t):
    """Dilated "image": tile t (traced int32) -> (g0, g1, tr, tc): its
    dilation group and its patch (tile row, tile column) in the group's
    sub-grid (plan order: group-major, tiles row-major)."""
    _, ntr, ntc = self._dims()
    d1 = self.dilation[1]
    grp, rest = lax.div(t, ntr * ntc), lax.rem(t, ntr * ntc)
    return (lax.div(grp, d1), lax.rem(grp, d1), lax.div(rest, ntc),
            lax.rem(rest, ntc))

  # ------------------------------------------------------------- XLA side --

  def operand(self, x):
    """[B, *S, H, X] -> the kernels' operand form: rows [B, R, H, X]
    ("gather"), x ("sequence"), "image": [B, Hs, Ws // 8, 8, H, X]
    (dilation 1) or [B, Hs / d0, d0, Ws / (8 d1), 8, d1, H, X]."""
    b, rest = self.batch, x.shape[-2:]
    if self.kind == "gather":
      to_rows, _ = permute.row_maps(self.plan.perm, self.plan.inv, axis=1)
      return to_rows(x.reshape(b, self.plan.n_tokens, *rest))
    if self.kind == "image":
      return x.reshape(self._view(rest))
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
      return self._view((heads, cols))
    return (self.batch, *self.spatial, heads, cols)

  def rows_to_operand(self, y):
    """[B, R, *rest] in plan-row order -> operand form [.., *rest]."""
    if self.kind == "gather":
      return y
    if self.kind == "sequence":
      return y[:, :self.spatial[0]]
    b, rest = self.batch, y.shape[2:]
    n0, ntr, ntc = self._dims()
    d0, d1 = self.dilation or (1, 1)
    # rows: (g0, g1, tr, tc, i, j) -> (tr, i, g0, tc, j, g1)
    y = y.reshape(b, d0, d1, ntr, ntc, P, P, *rest)
    y = y.transpose(0, 3, 5, 1, 4, 6, 2, *range(7, y.ndim))
    y = y.reshape(b, ntr * P, d0, ntc, P, d1, *rest)[:, :n0]
    return y.reshape(self._view(rest))

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
    b = self.batch
    n0, ntr, ntc = self._dims()
    d0, d1 = self.dilation or (1, 1)
    rest = y.shape[len(self._view(())):]
    y = y.reshape(b, n0, d0, ntc, P, d1, *rest)
    # (tr, i, g0, tc, j, g1) -> rows (g0, g1, tr, tc, i, j)
    y = pad_to(y, ntr * P).reshape(b, ntr, P, d0, ntc, P, d1, *rest)
    y = y.transpose(0, 3, 6, 1, 4, 2, 5, *range(7, y.ndim))
    return y.reshape(b, rows, *rest)

  # ---------------------------------------------------------- kernel side --

  def own_box(self, ref, bb, t, hh):
    """GMEM box of tile t, head hh of operand-form `ref`: [64, X] or
    ("image") [8, 8, X]."""
    if not self.image:
      return ref.at[bb, pl.ds(t * BLOCK, BLOCK), hh]
    if not self.dilated:
      nc = self.spatial[1] // P
      return ref.at[bb, pl.ds(lax.div(t, nc) * P, P), lax.rem(t, nc), :, hh]
    g0, g1, tr, tc = self._tile(t)
    return ref.at[bb, pl.ds(tr * P, P), g0, tc, :, g1, hh]

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
    if self.dilated:
      return ref.at[bb, :, :, :, :, :, hh]
    return ref.at[bb, :, :, :, hh] if self.image else ref.at[bb, :, hh]

  def partner_spec(self, cols, tile_of):
    """Pipeline block: tile tile_of(i) of `partner_ref`, [64, cols] or
    ("image") [8, 8, cols] (TILED3: `partner` turns it into [64, cols])."""
    if not self.image:
      return row_block(cols, tile_of)
    if not self.dilated:
      nc = self.spatial[1] // P
      return plgpu.BlockSpec(
          (P, None, P, cols),
          lambda i: (lax.div(tile_of(i), nc), lax.rem(tile_of(i), nc), 0, 0),
          transforms=TILED3)
    def index(i):   # [Hs / d0, d0, Ws / (8 d1), 8, d1, X]
      g0, g1, tr, tc = self._tile(tile_of(i))
      return tr, g0, tc, 0, g1, 0
    return plgpu.BlockSpec((P, None, None, P, None, cols), index,
                           transforms=TILED3)

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
