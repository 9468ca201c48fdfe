"""Static block-sparse plans: attention masks that are a box per query.

A plan describes attention over N tokens whose mask is, after a permutation
of the tokens into R >= N kernel rows (padded), the conjunction over A axes

  mask(i, j) = AND_a  q_lo[i, a] <= k_coord[j, a] <= q_hi[i, a]

for kernel rows i (queries) and j (keys): every query row owns an
axis-aligned box of allowed key coordinates and every key row a point.
Padded rows get an empty box (lo > hi) and the coordinate -1, which lies
outside every box (boxes are within [0, inf)), so they see and are seen by
nothing.

Tiles. Rows are cut into query tiles of block_q rows and key tiles of block_k
rows. A pair (query tile, key tile) is *visited* iff some query row of the
tile sees some key row of the other (computed exactly, not from bounding
boxes), and *interior* iff every query row of the tile sees every key row of
the other (no mask needed; tiles with padded rows are never interior). Per
query tile the visited key tiles form a list (padded to the longest by
repeating the last entry, with its length in a count); the transposed lists
(per key tile, the query tiles that reach it) serve the dk/dv backward. A
tile with no visited partner (only possible for a tile of padded rows) gets
one non-interior entry, so counts are >= 1 and the kernels mask it whole.

Neighborhood attention (`neighborhood_plan`, NATTEN's rules as stated in
attnlib/ops/neighborhood.py's docstring). Along one axis of length n with
kernel k, dilation d, stride s, position p has dilation group g = p % d and
group coordinate c = p // d in a group of n_g = ceil((n - g) / d) members.
With left = k // 2:

  non-causal: L = min((c // s) s + s // 2, n_g - 1),
              lo = clamp(L - left, 0, n_g - k),  hi = lo + k - 1
  causal:     L = min((c // s) s + s - 1, n_g - 1),
              lo = max(L - k + 1, 0),            hi = c

so the window in group coordinates is always the interval [lo, hi] (also
with causal + stride: it starts at a leader-dependent point and ends at c),
and the neighborhood is the product of the per-axis intervals. Groups are
separated with the group-major coordinate g n + c: a key at position p has
coordinate g n + c on this axis and a query the box [g n + lo, g n + hi];
since c < n_g <= n, a box never reaches another group.

Permutation (`neighborhood_plan`): tokens are ordered by dilation group
(row-major over the per-axis groups), each group's sub-grid of shape
(n_g0, n_g1, ...) is cut into tiles of `tile_shape` (row-major over tiles,
row-major within a tile), and every tile is padded to the full tile volume,
so each block of prod(tile_shape) rows is one multi-dimensional tile of one
dilation group (e.g. 8 x 16 tokens in 2-D): queries of a tile have nearby
windows, which keeps the visited key tiles few.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

_EMPTY_LO = np.iinfo(np.int32).max  # empty box: lo > hi
_EMPTY_HI = -1
_PAD_COORD = -1  # outside every box (boxes are within [0, inf))
# Pairs tested per NumPy step while computing the tile lists.
_PAIR_CHUNK = 64


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
  """A block-sparse attention plan over a token permutation (see module doc).

  Attributes:
    n_tokens: N, the number of real tokens.
    n_rows: R, kernel rows (a multiple of block_q and block_k).
    block_q, block_k: rows per query / key tile.
    perm: [R] int32; row r holds token perm[r] (-1: a padded row).
    inv: [N] int32; token t sits in row inv[t] (perm[inv] == arange(N)).
    q_lo, q_hi: [R, A] int32, the box of key coordinates of each query row.
    k_coord: [R, A] int32, the coordinate of each key row.
    kv_tiles: [nq, max_kv] int32, per query tile its visited key tiles
      (ascending, padded by repeating the last); kv_count [nq] >= 1;
      kv_interior [nq, max_kv] bool.
    q_tiles, q_count, q_interior: the same per key tile ([nk, max_q]).
  """
  n_tokens: int
  n_rows: int
  block_q: int
  block_k: int
  perm: np.ndarray
  inv: np.ndarray
  q_lo: np.ndarray
  q_hi: np.ndarray
  k_coord: np.ndarray
  kv_tiles: np.ndarray
  kv_count: np.ndarray
  kv_interior: np.ndarray
  q_tiles: np.ndarray
  q_count: np.ndarray
  q_interior: np.ndarray

  @property
  def visited_pairs(self) -> int:
    """Visited (query tile, key tile) pairs (as the forward runs them)."""
    return int(self.kv_count.sum())

  def dense_mask(self) -> np.ndarray:
    """[N, N] bool mask in the original token order (for tests; O(N^2 A))."""
    rows = self.inv
    lo, hi, kc = self.q_lo[rows], self.q_hi[rows], self.k_coord[rows]
    ok = np.ones((self.n_tokens, self.n_tokens), bool)
    for a in range(lo.shape[1]):
      ok &= (kc[None, :, a] >= lo[:, None, a]) & (kc[None, :, a]
                                                   <= hi[:, None, a])
    return ok


def _frozen(x, dtype=None):
  """A read-only copy (plans are cached and shared)."""
  x = np.array(x, dtype)
  x.flags.writeable = False
  return x


def _lists(pairs_visited, interior):
  """[n_rows_tiles, n_cols_tiles] bool -> (tiles, count, interior) lists."""
  n_rows, n_cols = pairs_visited.shape
  count = pairs_visited.sum(axis=1)
  width = max(1, int(count.max()) if n_rows else 1)
  tiles = np.zeros((n_rows, width), np.int32)
  inter = np.zeros((n_rows, width), bool)
  for r in range(n_rows):
    cols = np.nonzero(pairs_visited[r])[0]
    if cols.size == 0:  # a tile of padded rows: one masked (empty) visit
      cols = np.array([min(r, n_cols - 1)])
      flags = np.zeros(1, bool)
    else:
      flags = interior[r, cols]
    tiles[r, :cols.size] = cols
    tiles[r, cols.size:] = cols[-1]
    inter[r, :cols.size] = flags
  return tiles, np.maximum(count, 1).astype(np.int32), inter


def _box_masks(lo, hi, kc) -> np.ndarray:
  """[P, bq, bk] bool: query rows' boxes lo, hi [P, bq, A] against key
  rows' coordinates kc [P, bk, A], pair by pair."""
  return np.all((kc[:, None] >= lo[:, :, None])
                & (kc[:, None] <= hi[:, :, None]), axis=3)


def _tile_pairs(q_lo, q_hi, k_coord, block_q, block_k):
  """(visited, interior) [nq, nk] bool, exact, from row boxes / coordinates.

  Candidates come from tile bounding boxes; each candidate pair is then
  checked on its block_q x block_k rows.
  """
  rows, axes = q_lo.shape
  nq, nk = rows // block_q, rows // block_k
  lo = q_lo.reshape(nq, block_q, axes)
  hi = q_hi.reshape(nq, block_q, axes)
  kc = k_coord.reshape(nk, block_k, axes)
  real_q = np.all(lo <= hi, axis=2)  # [nq, bq]
  real_k = np.all(kc >= 0, axis=2)  # [nk, bk]
  big = np.iinfo(np.int64).max
  qmin = np.where(real_q[..., None], lo, big).min(axis=1)  # [nq, A]
  qmax = np.where(real_q[..., None], hi, -big).max(axis=1)
  kmin = np.where(real_k[..., None], kc, big).min(axis=1)  # [nk, A]
  kmax = np.where(real_k[..., None], kc, -big).max(axis=1)
  cand = np.all((kmax[None] >= qmin[:, None]) & (kmin[None] <= qmax[:, None]),
                axis=2)  # [nq, nk]
  visited = np.zeros((nq, nk), bool)
  interior = np.zeros((nq, nk), bool)
  qi, ki = np.nonzero(cand)
  for s in range(0, qi.size, _PAIR_CHUNK):
    a, b = qi[s:s + _PAIR_CHUNK], ki[s:s + _PAIR_CHUNK]
    ok = _box_masks(lo[a], hi[a], kc[b])
    visited[a, b] = ok.any(axis=(1, 2))
    interior[a, b] = ok.all(axis=(1, 2))
  return visited, interior


def from_boxes(q_lo, q_hi, k_coord, perm, block_q: int, block_k: int) -> Plan:
  """A Plan from per-token boxes and a row permutation.

  Args:
    q_lo, q_hi: [N, A] ints >= 0, the key-coordinate box of each token (in
      the original token order); a token must see at least itself for the
      softmax to be defined (not checked here).
    k_coord: [N, A] ints >= 0, each token's coordinate as a key.
    perm: [R0] ints, row r holds token perm[r] or -1 (padding); each token
      exactly once. Padded at the end to a multiple of both block sizes.
    block_q, block_k: rows per query / key tile (positive).
  """
  q_lo, q_hi, k_coord = (np.asarray(x, np.int64) for x in (q_lo, q_hi,
                                                          k_coord))
  n, axes = q_lo.shape
  if q_hi.shape != (n, axes) or k_coord.shape != (n, axes):
    raise ValueError(f"from_boxes: q_hi/k_coord shapes {q_hi.shape}, "
                     f"{k_coord.shape}; expected q_lo's {(n, axes)}.")
  if (q_lo < 0).any() or (k_coord < 0).any():
    raise ValueError("from_boxes: q_lo/k_coord have negative entries; "
                     "expected coordinates >= 0.")
  perm = np.asarray(perm, np.int64)
  real = perm[perm >= 0]
  if real.size != n or not np.array_equal(np.sort(real), np.arange(n)):
    raise ValueError(f"from_boxes: perm (length {perm.size}) does not hold "
                     f"every token 0..{n - 1} exactly once.")
  if block_q < 1 or block_k < 1:
    raise ValueError(f"from_boxes: block sizes {(block_q, block_k)}; "
                     "expected positive ints.")
  step = block_q * block_k // math.gcd(block_q, block_k)
  rows = -(-max(perm.size, 1) // step) * step
  perm = np.concatenate([perm, np.full(rows - perm.size, -1, np.int64)])
  pad = perm < 0
  src = np.where(pad, 0, perm)
  r_lo = np.where(pad[:, None], _EMPTY_LO, q_lo[src])
  r_hi = np.where(pad[:, None], _EMPTY_HI, q_hi[src])
  r_kc = np.where(pad[:, None], _PAD_COORD, k_coord[src])
  visited, interior = _tile_pairs(r_lo, r_hi, r_kc, block_q, block_k)
  kv = _lists(visited, interior)
  qs = _lists(visited.T, interior.T)
  inv = np.zeros(n, np.int64)
  inv[perm[~pad]] = np.nonzero(~pad)[0]
  i32 = lambda x: _frozen(x, np.int32)
  kv, qs = (tuple(map(_frozen, x)) for x in (kv, qs))
  return Plan(n_tokens=n, n_rows=rows, block_q=block_q, block_k=block_k,
              perm=i32(perm), inv=i32(inv), q_lo=i32(r_lo), q_hi=i32(r_hi),
              k_coord=i32(r_kc), kv_tiles=kv[0], kv_count=kv[1],
              kv_interior=kv[2], q_tiles=qs[0], q_count=qs[1],
              q_interior=qs[2])


@dataclasses.dataclass(frozen=True, eq=False)
class MaskTiles:
  """A plan's masks as deduplicated [block_q, block_k] tiles (`mask_tiles`).

  Attributes:
    tiles: [U, block_q, block_k] bool, the distinct masks of visited pairs;
      tiles[0] is all True (every interior pair, and any pair whose rows all
      see each other, points at it).
    kv_ids: [nq, max_kv] int32, the mask of pair (query tile t, key tile
      kv_tiles[t, i]) is tiles[kv_ids[t, i]] (rows: queries of t).
    q_ids: [nk, max_q] int32, likewise per key tile: the pair (query tile
      q_tiles[t, i], key tile t) has the mask tiles[q_ids[t, i]] (rows:
      queries; transpose it for keys on rows).
  Entries past a list's count repeat its last pair's id.
  """
  tiles: np.ndarray
  kv_ids: np.ndarray
  q_ids: np.ndarray


def _pair_masks(plan: Plan, q_tiles, k_tiles) -> np.ndarray:
  """[P, block_q, block_k] bool: the masks of pairs (q_tiles[p], k_tiles[p])."""
  bq, bk, axes = plan.block_q, plan.block_k, plan.q_lo.shape[1]
  tiles = lambda x, rows, which: x.reshape(-1, rows, axes)[which]
  return _box_masks(tiles(plan.q_lo, bq, q_tiles), tiles(plan.q_hi, bq, q_tiles),
                    tiles(plan.k_coord, bk, k_tiles))


def _dedupe(pair_tiles, plan: Plan, first=None):
  """Distinct tiles of the forward's visited pairs and their ids.

  pair_tiles: [nq * max_kv, ...] bool, one tile per entry of plan.kv_tiles
  (row-major); `first` (optional, [...] bool) is made id 0. Returns
  (tiles [U, ...], kv_ids [nq, max_kv], q_ids [nk, max_q]): the transposed
  lists name the same pairs, so their ids are looked up in kv_ids.
  """
  nq, width = plan.kv_tiles.shape
  shape = pair_tiles.shape[1:]
  flat = pair_tiles.reshape(pair_tiles.shape[0], -1)
  head = (np.zeros((0, flat.shape[1]), bool) if first is None
          else first.reshape(1, -1))
  packed = np.packbits(np.concatenate([head, flat]), axis=1)
  uniq, first_at, inverse = np.unique(packed, axis=0, return_index=True,
                                      return_inverse=True)
  # Number tiles by first appearance (so `first`, if given, is id 0).
  order = np.argsort(first_at, kind="stable")
  rank = np.empty_like(order)
  rank[order] = np.arange(order.size)
  ids = rank[inverse.reshape(-1)][head.shape[0]:]
  tiles = np.unpackbits(uniq[order], axis=1, count=flat.shape[1]).astype(bool)
  kv_ids = ids.reshape(nq, width)
  nk = plan.q_tiles.shape[0]
  q_of = np.repeat(np.arange(nq), width).astype(np.int64)
  pair_key = q_of * nk + plan.kv_tiles.reshape(-1)
  order_k = np.argsort(pair_key, kind="stable")
  want = (plan.q_tiles.astype(np.int64) * nk
          + np.arange(nk)[:, None]).reshape(-1)
  at = order_k[np.searchsorted(pair_key, want, sorter=order_k)]
  q_ids = ids[at].reshape(plan.q_tiles.shape)
  return (_frozen(tiles.reshape(-1, *shape)), _frozen(kv_ids, np.int32),
          _frozen(q_ids, np.int32))


@functools.lru_cache(maxsize=64)
def mask_tiles(plan: Plan) -> MaskTiles:
  """Every visited pair's mask as an id into a table of distinct tiles.

  Kernels that add a tile's bias (0 where visible, a large negative value
  elsewhere) to their scores apply the exact mask with one add an element
  instead of 2A comparisons; the distinct tiles are few (a neighborhood's
  pairs repeat a handful of relative offsets), so the table stays small
  (cached per plan, which is itself cached).
  """
  nq, width = plan.kv_tiles.shape
  q_of = np.repeat(np.arange(nq), width)
  masks = _pair_masks(plan, q_of, plan.kv_tiles.reshape(-1))
  tiles, kv_ids, q_ids = _dedupe(
      masks, plan, first=np.ones(masks.shape[1:], bool))
  return MaskTiles(tiles=tiles, kv_ids=kv_ids, q_ids=q_ids)


@dataclasses.dataclass(frozen=True, eq=False)
class MaskFactors:
  """A plan's tile masks as a product of two thin matrices (`mask_factors`).

  Attributes:
    q_class: [R, C] bool. Query row r's box is, along axis a, one of the
      few distinct intervals of its tile's rows along a (its *class* on a);
      columns [off_a, off_a + n_a) one-hot that class (padded rows: no 1).
    tiles: [U, block_k, C] bool, distinct per pair: key row c passes the
      interval of class u on axis a (column off_a + u).
    kv_ids, q_ids: as in MaskTiles, ids into `tiles`.
  For every real query row r (non-empty box) of query tile t and key row c
  of key tile k, with pair tile F = tiles[id of (t, k)]:
    mask(r, c)  iff  F[c, j] for every column j with q_class[r, j].
  So with Q1 = z q_class and K1 = where(F, 0, -w) (z, w > 0),
  (Q1 K1^T)[r, c] is 0 where visible and <= -z w where masked: a kernel
  adds the mask with one thin matmul (k = C) beside Q K^T.
  """
  q_class: np.ndarray
  tiles: np.ndarray
  kv_ids: np.ndarray
  q_ids: np.ndarray


@functools.lru_cache(maxsize=64)
def mask_factors(plan: Plan, width: int = 16):
  """`MaskFactors` of the plan with C = width columns, or None when the
  classes of some tile need more (sum over axes of the distinct intervals
  of a tile's rows: 8 + 8 for 8 x 8 tiles, 4 + 4 + 4 for 4 x 4 x 4; 64
  for 1-D tiles of 64, which keep the bias tiles)."""
  bq, axes = plan.block_q, plan.q_lo.shape[1]
  nq = plan.n_rows // bq
  lo = plan.q_lo.reshape(nq, bq, axes).astype(np.int64)
  hi = plan.q_hi.reshape(nq, bq, axes).astype(np.int64)
  real = np.all(lo <= hi, axis=2).reshape(-1)          # [nq bq]
  tile_of = np.repeat(np.arange(nq), bq)
  q_class = np.zeros((nq * bq, width), bool)
  box_lo, box_hi, off = [], [], 0
  for a in range(axes):
    trip = np.stack([tile_of, lo[..., a].reshape(-1),
                     hi[..., a].reshape(-1)], axis=1)[real]
    uniq, inv = np.unique(trip, axis=0, return_inverse=True)
    cls = np.arange(len(uniq)) - np.searchsorted(uniq[:, 0], uniq[:, 0])
    n_a = int(cls.max()) + 1 if len(uniq) else 1
    if off + n_a > width:
      return None
    q_class[np.nonzero(real)[0], off + cls[inv.reshape(-1)]] = True
    # Per tile, the interval of each class (unused classes: empty).
    b_lo = np.full((nq, n_a), _EMPTY_LO, np.int64)
    b_hi = np.full((nq, n_a), _EMPTY_HI, np.int64)
    b_lo[uniq[:, 0], cls], b_hi[uniq[:, 0], cls] = uniq[:, 1], uniq[:, 2]
    box_lo.append(b_lo)
    box_hi.append(b_hi)
    off += n_a
  nq_, list_w = plan.kv_tiles.shape
  q_of = np.repeat(np.arange(nq_), list_w)
  kc = plan.k_coord.reshape(-1, plan.block_k, axes)[plan.kv_tiles.reshape(-1)]
  cols = [(kc[:, :, a, None] >= box_lo[a][q_of][:, None])
          & (kc[:, :, a, None] <= box_hi[a][q_of][:, None])
          for a in range(axes)]                        # [P, bk, n_a] each
  pairs = np.ones((q_of.size, plan.block_k, width), bool)
  pairs[..., :off] = np.concatenate(cols, axis=2)
  tiles, kv_ids, q_ids = _dedupe(pairs, plan)
  return MaskFactors(q_class=_frozen(q_class), tiles=tiles, kv_ids=kv_ids,
                     q_ids=q_ids)


# ---------------------------------------------------------------------------
# Neighborhood attention.
# ---------------------------------------------------------------------------


def axis_boxes(n: int, kernel_size: int, dilation: int, stride: int,
               causal: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Along one axis: (lo, hi, coord) [n] int64 in group-major coordinates."""
  k, d, s = kernel_size, dilation, stride
  p = np.arange(n)
  g, c = p % d, p // d
  n_g = (n - g + d - 1) // d
  if causal:
    leader = np.minimum((c // s) * s + s - 1, n_g - 1)
    lo = np.maximum(leader - k + 1, 0)
    hi = c
  else:
    leader = np.minimum((c // s) * s + s // 2, n_g - 1)
    lo = np.clip(leader - k // 2, 0, n_g - k)
    hi = lo + k - 1
  base = g * n
  return base + lo, base + hi, base + c


def default_tile_shape(group_shape: tuple[int, ...],
                       volume: int = 128) -> tuple[int, ...]:
  """A power-of-two tile of `volume` tokens, near-cubic, last axis longest.

  Doubles the shortest tile axis (the last one on ties) that still fits in
  the largest dilation group's extent `group_shape`; when none fits, the
  last axis.
  """
  tile = [1] * len(group_shape)
  while math.prod(tile) < volume:
    fits = [a for a in range(len(tile)) if 2 * tile[a] <= group_shape[a]]
    if fits:
      a = min(fits, key=lambda a: (tile[a], -a))
    else:
      a = len(tile) - 1
    tile[a] *= 2
  return tuple(tile)


def _tiled_order(spatial, dilation, tile_shape) -> np.ndarray:
  """Rows -> flat token (-1: padding): group-major, tiles of tile_shape."""
  rank = len(spatial)
  out = []
  for groups in np.ndindex(*dilation):
    sub = [(n - g + d - 1) // d for n, g, d in zip(spatial, groups, dilation)]
    ntile = [-(-m // t) for m, t in zip(sub, tile_shape)]
    # coords[a]: shape (T0, t0, T1, t1, ...) group coordinates along axis a.
    shape = [x for pair in zip(ntile, tile_shape) for x in pair]
    ok = np.ones(shape, bool)
    flat = np.zeros(shape, np.int64)
    for a in range(rank):
      view = [1] * (2 * rank)
      view[2 * a], view[2 * a + 1] = ntile[a], tile_shape[a]
      c = (np.arange(ntile[a])[:, None] * tile_shape[a]
           + np.arange(tile_shape[a])[None, :]).reshape(view)
      ok = ok & (c < sub[a])
      pos = groups[a] + dilation[a] * c
      flat = flat * spatial[a] + pos
    order = list(range(0, 2 * rank, 2)) + list(range(1, 2 * rank, 2))
    ok = ok.transpose(order).reshape(-1)
    flat = flat.transpose(order).reshape(-1)
    out.append(np.where(ok, flat, -1))
  return np.concatenate(out)


@functools.lru_cache(maxsize=64)
def _neighborhood_plan(spatial, kernel_size, dilation, stride, is_causal,
                       tile_shape):
  rank = len(spatial)
  per_axis = [axis_boxes(spatial[a], kernel_size[a], dilation[a], stride[a],
                         is_causal[a]) for a in range(rank)]
  grids = np.meshgrid(*[np.arange(n) for n in spatial], indexing="ij")
  lo = np.stack([per_axis[a][0][grids[a].reshape(-1)] for a in range(rank)], 1)
  hi = np.stack([per_axis[a][1][grids[a].reshape(-1)] for a in range(rank)], 1)
  kc = np.stack([per_axis[a][2][grids[a].reshape(-1)] for a in range(rank)], 1)
  volume = math.prod(tile_shape)
  perm = _tiled_order(spatial, dilation, tile_shape)
  return from_boxes(lo, hi, kc, perm, volume, volume)


def _tuple(name, x, rank, kind):
  items = tuple(x) if isinstance(x, (tuple, list)) else (x,) * rank
  if len(items) != rank:
    raise ValueError(f"neighborhood_plan: {name} is {x!r}; expected one "
                     f"value or {rank} (one per spatial axis).")
  return tuple(kind(v) for v in items)


def neighborhood_plan(spatial_shape, kernel_size, dilation=1, stride=1,
                      is_causal=False, tile_shape=None) -> Plan:
  """The Plan of NATTEN neighborhood attention (rules in the module doc).

  Args:
    spatial_shape: (n_0, ..., n_{A-1}), A >= 1.
    kernel_size, dilation, stride, is_causal: ints/bools or per-axis tuples,
      NATTEN's constraints (kernel >= 2, 1 <= stride <= kernel,
      kernel * dilation <= n; checked here as well).
    tile_shape: tokens per tile along each axis; default
      `default_tile_shape(largest dilation group, 128)`. Query and key tiles
      both hold prod(tile_shape) rows.
  """
  spatial = tuple(int(n) for n in spatial_shape)
  rank = len(spatial)
  if rank < 1:
    raise ValueError(f"neighborhood_plan: spatial_shape is {spatial_shape!r};"
                     " expected at least one axis.")
  ks = _tuple("kernel_size", kernel_size, rank, int)
  ds = _tuple("dilation", dilation, rank, int)
  ss = _tuple("stride", stride, rank, int)
  cs = _tuple("is_causal", is_causal, rank, bool)
  for a in range(rank):
    if not (ks[a] >= 2 and ds[a] >= 1 and 1 <= ss[a] <= ks[a]
            and ks[a] * ds[a] <= spatial[a]):
      raise ValueError(
          f"neighborhood_plan: axis {a} has (n, kernel_size, dilation, "
          f"stride) = {(spatial[a], ks[a], ds[a], ss[a])}; expected "
          "kernel_size >= 2, dilation >= 1, 1 <= stride <= kernel_size and "
          "kernel_size * dilation <= n.")
  if tile_shape is None:
    tile_shape = default_tile_shape(tuple(-(-n // d) for n, d in zip(spatial,
                                                                      ds)))
  tile_shape = _tuple("tile_shape", tile_shape, rank, int)
  if min(tile_shape) < 1:
    raise ValueError(f"neighborhood_plan: tile_shape is {tile_shape!r}; "
                     "expected positive ints.")
  return _neighborhood_plan(spatial, ks, ds, ss, cs, tile_shape)
