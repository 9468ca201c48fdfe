"""Tests for kernels_pallas.local_attention.plan (static block-sparse plans).

`from_boxes`'s tile lists, counts and interior flags are checked against
brute force over the dense row mask; `neighborhood_plan`'s mask, expanded to
[N, N] in the original token order, must equal the naive oracle's
neighborhood mask (tests/oracles/neighborhood.py) for 1-D, 2-D and 3-D cases
with odd and even kernels, dilation (groups of unequal size), causal axes and
stride; its permutation must make every block one tile of one dilation group.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from kernels_pallas.local_attention import plan as plan_lib
from tests.oracles import neighborhood as oracle


def _row_mask(p):
  """[R, R] bool mask over kernel rows, straight from the definition."""
  ok = np.ones((p.n_rows, p.n_rows), bool)
  for a in range(p.q_lo.shape[1]):
    kc = p.k_coord[None, :, a]
    ok &= (kc >= p.q_lo[:, None, a]) & (kc <= p.q_hi[:, None, a])
  return ok


def _check_lists(p):
  """Tile lists / counts / interior flags of p against brute force."""
  mask = _row_mask(p)
  nq, nk = p.n_rows // p.block_q, p.n_rows // p.block_k
  pairs = mask.reshape(nq, p.block_q, nk, p.block_k)
  visited = pairs.any(axis=(1, 3))
  interior = pairs.all(axis=(1, 3))
  for tiles, count, inter, vis, full in (
      (p.kv_tiles, p.kv_count, p.kv_interior, visited, interior),
      (p.q_tiles, p.q_count, p.q_interior, visited.T, interior.T)):
    assert tiles.shape[0] == vis.shape[0] and count.min() >= 1
    assert tiles.shape[1] == max(1, vis.sum(axis=1).max())
    for r in range(vis.shape[0]):
      want = np.nonzero(vis[r])[0]
      got = tiles[r, :count[r]]
      if want.size:
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(inter[r, :count[r]], full[r, want])
      else:  # a tile that sees nothing: one masked visit
        assert count[r] == 1 and not inter[r, 0]
      assert (tiles[r, count[r]:] == got[-1]).all()  # padding repeats
      assert not inter[r, count[r]:].any()
  return visited, interior


def test_from_boxes_matches_brute_force():
  rng = np.random.default_rng(0)
  n, axes = 150, 2
  k_coord = rng.integers(0, 40, (n, axes))
  # Boxes around the token's own coordinate (so every token sees itself),
  # some wide enough to make interior tile pairs.
  width = rng.integers(0, 5, (n, axes))
  q_lo = np.maximum(k_coord - width, 0)
  q_hi = k_coord + rng.integers(0, 5, (n, axes))
  order = rng.permutation(n)
  # The first query tile sees everything: interior pairs with full key tiles.
  q_lo[order[:8]], q_hi[order[:8]] = 0, 45
  # Padding rows in the middle and at the end (158 rows, padded to 160).
  perm = np.concatenate([order[:70], [-1] * 5, order[70:], [-1] * 3])
  p = plan_lib.from_boxes(q_lo, q_hi, k_coord, perm, 8, 16)
  assert p.n_rows == 160
  np.testing.assert_array_equal(p.perm[p.inv], np.arange(n))
  assert (p.perm[p.n_rows - 5:] == -1).all()
  visited, interior = _check_lists(p)
  assert interior.any() and (visited & ~interior).any() and (~visited).any()
  # The mask in token order is the per-token box test.
  want = np.all((k_coord[None] >= q_lo[:, None])
                & (k_coord[None] <= q_hi[:, None]), axis=2)
  np.testing.assert_array_equal(p.dense_mask(), want)


def test_from_boxes_all_padding_tile_and_interior():
  # One axis; 4 tokens that all see each other, 4 padded rows: the second
  # tile is all padding and gets a single masked visit.
  lo = np.zeros((4, 1))
  hi = np.full((4, 1), 3)
  kc = np.arange(4)[:, None]
  p = plan_lib.from_boxes(lo, hi, kc, [0, 1, 2, 3, -1, -1, -1, -1], 4, 4)
  assert p.kv_count.tolist() == [1, 1] and p.q_count.tolist() == [1, 1]
  assert p.kv_tiles[:, 0].tolist() == [0, 1]
  assert p.kv_interior[:, 0].tolist() == [True, False]
  _check_lists(p)


def test_from_boxes_rejects_bad_perm():
  z = np.zeros((3, 1))
  with pytest.raises(ValueError, match="perm"):
    plan_lib.from_boxes(z, z, z, [0, 1, 1], 4, 4)
  with pytest.raises(ValueError, match="negative"):
    plan_lib.from_boxes(z - 1, z, z, [0, 1, 2], 4, 4)


MASK_CASES = [
    # (spatial, kernel, dilation, stride, causal, tile_shape)
    ((17,), 5, 3, 2, False, (4,)),  # groups 6, 6, 5; odd kernel, stride 2
    ((16,), 4, 1, 1, False, (8,)),  # even kernel
    ((23,), 6, 2, 3, False, (4,)),  # even kernel, dilation, stride, groups
    ((20,), 5, 1, 1, True, (8,)),  # causal
    ((29,), 4, 3, 4, True, (4,)),  # causal + stride + dilation
    ((10, 12), (3, 4), (2, 1), (1, 2), (False, True), (4, 4)),
    ((9, 11), (4, 3), (2, 3), (3, 1), (True, False), (2, 8)),
    ((7, 8), (2, 8), (3, 1), (2, 8), (False, False), (2, 4)),  # blocked
    ((4, 6, 6), 3, 1, 1, False, (2, 2, 4)),
    ((5, 7, 6), (2, 3, 4), (2, 2, 1), (1, 3, 2), (True, False, True),
     (2, 2, 2)),
]


@pytest.mark.parametrize("spatial,kernel,dilation,stride,causal,tile",
                         MASK_CASES)
def test_neighborhood_plan_matches_oracle_mask(spatial, kernel, dilation,
                                               stride, causal, tile):
  p = plan_lib.neighborhood_plan(spatial, kernel, dilation, stride, causal,
                                 tile)
  want = oracle.neighborhood_mask(spatial, kernel, dilation, stride, causal)
  np.testing.assert_array_equal(p.dense_mask(), want)
  _check_lists(p)
  # Every block is one tile of one dilation group.
  rank = len(spatial)
  dil = dilation if isinstance(dilation, tuple) else (dilation,) * rank
  vol = math.prod(tile)
  assert p.block_q == p.block_k == vol
  for blk in p.perm.reshape(-1, vol):
    real = blk[blk >= 0]
    assert real.size
    pos = np.stack(np.unravel_index(real, spatial), axis=1)  # [m, rank]
    groups = pos % np.array(dil)
    assert (groups == groups[0]).all()
    coords = pos // np.array(dil)
    assert ((coords // np.array(tile)) == (coords[0] // np.array(tile))).all()


def test_default_tile_shapes():
  assert plan_lib.default_tile_shape((128,)) == (128,)
  assert plan_lib.default_tile_shape((64, 64)) == (8, 16)
  assert plan_lib.default_tile_shape((16, 32, 32)) == (4, 4, 8)
  assert plan_lib.default_tile_shape((3, 100)) == (2, 64)
  p = plan_lib.neighborhood_plan((64, 64), 7)
  assert p.block_q == 128 and p.n_rows == 64 * 64


@pytest.mark.parametrize("kernel,max_pairs", [(7, 9), (13, 9), (31, 18)])
def test_large_plan_is_sparse(kernel, max_pairs):
  """128 x 128 grid, tiles of 8 x 16: the lists stay short."""
  p = plan_lib.neighborhood_plan((128, 128), kernel)
  assert p.kv_tiles.shape[1] <= max_pairs
  assert p.q_tiles.shape[1] <= max_pairs
  # The lists are exact: each visited pair holds a visible (q, k) pair,
  # checked on a sample of query tiles.
  for qt in range(0, p.n_rows // 128, 37):
    rows = slice(qt * 128, qt * 128 + 128)
    ok = np.ones((128, p.n_rows), bool)
    for a in range(2):
      kc = p.k_coord[None, :, a]
      ok &= (kc >= p.q_lo[rows, a, None]) & (kc <= p.q_hi[rows, a, None])
    want = np.nonzero(ok.reshape(128, -1, 128).any(axis=(0, 2)))[0]
    np.testing.assert_array_equal(p.kv_tiles[qt, :p.kv_count[qt]], want)


def test_neighborhood_plan_rejects_bad_args():
  with pytest.raises(ValueError, match="axis 0"):
    plan_lib.neighborhood_plan((13,), 5, 3)  # kernel * dilation > n
  with pytest.raises(ValueError, match="stride"):
    plan_lib.neighborhood_plan((10, 10), 3, 1, (1, 2, 3))
  with pytest.raises(ValueError, match="tile_shape"):
    plan_lib.neighborhood_plan((10, 10), 3, tile_shape=(0, 4))


@pytest.mark.parametrize("spatial,kernel,dilation,stride,causal,tile",
                         MASK_CASES + [((24, 24), 13, 1, 1, False, (8, 8))])
def test_mask_tiles_match_row_mask(spatial, kernel, dilation, stride, causal,
                                   tile):
  """Every listed pair's mask tile (both list directions, padding entries
  included) equals the brute-force row mask's block; tiles are distinct,
  tile 0 is all visible and every interior pair points at it."""
  p = plan_lib.neighborhood_plan(spatial, kernel, dilation, stride, causal,
                                 tile)
  m = plan_lib.mask_tiles(p)
  mask = _row_mask(p)
  bq, bk = p.block_q, p.block_k
  block = lambda qt, kt: mask[qt * bq:(qt + 1) * bq, kt * bk:(kt + 1) * bk]
  assert m.tiles.shape[1:] == (bq, bk) and m.tiles[0].all()
  packed = np.packbits(m.tiles.reshape(len(m.tiles), -1), axis=1)
  assert len(np.unique(packed, axis=0)) == len(m.tiles)
  assert m.kv_ids.shape == p.kv_tiles.shape
  assert m.q_ids.shape == p.q_tiles.shape
  for qt, row in enumerate(p.kv_tiles):
    for i, kt in enumerate(row):
      np.testing.assert_array_equal(m.tiles[m.kv_ids[qt, i]], block(qt, kt))
  for kt, row in enumerate(p.q_tiles):
    for i, qt in enumerate(row):
      np.testing.assert_array_equal(m.tiles[m.q_ids[kt, i]], block(qt, kt))
  assert (m.kv_ids[p.kv_interior] == 0).all()
  assert (m.q_ids[p.q_interior] == 0).all()
  assert plan_lib.mask_tiles(p) is m   # cached per plan


@pytest.mark.parametrize("spatial,kernel,dilation,stride,causal,tile", [
    c for c in MASK_CASES if len(c[0]) > 1] + [
        ((24, 24), 13, 1, 1, False, (8, 8)),
        ((20, 21), 5, 1, (2, 3), (True, False), (8, 8)),   # ragged, stride
        ((9, 10, 12), 3, (1, 2, 1), 1, (False, True, False), (4, 4, 4))])
def test_mask_factors_reproduce_the_row_mask(spatial, kernel, dilation,
                                             stride, causal, tile):
  """The thin matmul q1 k1^T of the forward kernel (q1 = one-hot interval
  classes, k1 = 0 / -1 per pair) is 0 exactly where the brute-force row
  mask is visible and <= -1 elsewhere, for every real query row of every
  listed pair (both list directions); padded key rows are masked."""
  p = plan_lib.neighborhood_plan(spatial, kernel, dilation, stride, causal,
                                 tile)
  f = plan_lib.mask_factors(p)
  assert f is not None and f.q_class.shape == (p.n_rows, 16)
  mask = _row_mask(p)
  real = np.all(p.q_lo <= p.q_hi, axis=1)
  assert (f.q_class[~real] == 0).all()
  assert (f.q_class[real].sum(axis=1) == len(spatial)).all()   # one per axis
  bq, bk = p.block_q, p.block_k
  q1 = f.q_class.astype(np.float64)
  def check(qt, kt, tile_id):
    rows = slice(qt * bq, (qt + 1) * bq)
    bias = q1[rows] @ np.where(f.tiles[tile_id], 0.0, -1.0).T   # [bq, bk]
    want = mask[rows, kt * bk:(kt + 1) * bk]
    ok = real[rows]
    np.testing.assert_array_equal(bias[ok] == 0, want[ok])
    assert (bias[ok][~want[ok]] <= -1).all()
  for qt, row in enumerate(p.kv_tiles):
    for i, kt in enumerate(row):
      check(qt, kt, f.kv_ids[qt, i])
  for kt, row in enumerate(p.q_tiles):
    for i, qt in enumerate(row):
      check(qt, kt, f.q_ids[kt, i])
  assert plan_lib.mask_factors(p) is f   # cached per plan


def test_mask_factors_need_few_classes():
  # 1-D tiles of 64 have 64 interval classes (over 16 columns): no factors.
  assert plan_lib.mask_factors(plan_lib.neighborhood_plan((200,), 9)) is None
  # 32 x 32, kernel 5: an interior 8 x 8 tile has 8 distinct intervals on
  # each axis (border tiles fewer: clamped windows coincide).
  p = plan_lib.neighborhood_plan((32, 32), 5, tile_shape=(8, 8))
  assert plan_lib.mask_factors(p, width=15) is None
  assert plan_lib.mask_factors(p, width=16) is not None
