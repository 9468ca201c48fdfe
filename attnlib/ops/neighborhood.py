"""Neighborhood attention (NA) with NATTEN's semantics, over 1 to 3 axes.

Each query token attends to the keys in its *neighborhood*, a window of
``kernel_size`` tokens per spatial axis that slides with the query, as in
NATTEN's ``na1d`` / ``na2d`` / ``na3d`` (``neighborhood_attention_generic``),
releases 0.20-0.21, with the dilation, causal and stride ("Generalized
Neighborhood Attention") extensions. Softmax attention over the neighborhood::

  o_i = sum_{j in N(i)} exp(s_ij) v_j / sum_{j in N(i)} exp(s_ij),
  s_ij = scale * q_i . k_j,

where ``N(i)`` is the Cartesian product over spatial axes of the per-axis
neighbor sets defined below.

Per-axis rules (axis length ``n``; ``k = kernel_size``, ``d = dilation``,
``s = stride`` of that axis; positions ``0 .. n - 1``; ``//`` floors):

1. Dilation groups. Position ``i`` belongs to dilation group ``g = i % d`` and
   has group coordinate ``c = i // d``. Group ``g`` holds the positions
   ``g, g + d, g + 2d, ... < n``, so it has ``n_g = ceil((n - g) / d)`` members
   (``n // d + 1`` for ``g < n % d``, else ``n // d``: groups can differ in
   size). A query only sees keys of its own group; everything below is in
   group coordinates and a key coordinate ``c'`` is position ``g + d * c'``.
   [NATTEN reference mask: ``qkv_fix_dilation`` / ``map_idx_to_di_coords`` in
   ``csrc/include/natten/cuda/reference/mask.hpp``; the same in
   ``get_na_flex_mask`` of ``src/natten/backends/flex.py``.]
2. Window split. A window of ``k`` tokens has ``left = k // 2`` tokens before
   its centre and ``right = k // 2`` after it for odd ``k``; for even ``k``,
   ``right = k // 2 - 1`` (an even window reaches one token further to the
   left than to the right). [``get_window_left`` / ``get_window_right`` in
   the reference mask; the GNA paper (Hassani et al. 2025, arXiv:2504.16922)
   introduces even window sizes by splitting the window into a left and a
   right size.]
3. Stride groups. Queries are also grouped by ``s`` along the axis (group
   coordinates ``(c // s) * s .. (c // s) * s + s - 1``); all queries of a
   stride group share the window of one *leader* query ("stride delays the
   sliding window", GNA paper; ``s = 1`` is plain NA, ``s = k`` is blocked
   attention). [Reference mask ``get_win_start``.]
4. Non-causal window. Leader ``L = min((c // s) * s + s // 2, n_g - 1)`` (the
   centre query of the stride group, the right one of the two centres for
   even ``s``, clipped to the group's last member for a partial last stride
   group). The window is the ``k`` group coordinates starting at
   ``start = clamp(L - left, 0, n_g - k)``: centred on the leader and shifted
   at the borders so that it never shrinks. With ``s = 1`` this is
   ``start = clamp(c - k // 2, 0, n_g - k)``.
5. Causal window. Leader ``L = min((c // s) * s + s - 1, n_g - 1)`` (the last
   query of the stride group). The window is ``max(L - k + 1, 0) .. c``: it
   starts ``k - 1`` before the leader and ends at the query itself, so it has
   ``min(c + 1, k)`` tokens for ``s = 1`` (it shrinks near the start), and
   fewer for queries before their leader. Since ``s <= k`` every query sees
   at least itself. [Reference mask ``get_win_start`` / ``get_win_end``.]
6. The neighborhood is the product over axes; ``is_causal`` is per axis.

Arguments (NATTEN's constraints, ``src/natten/utils/checks.py``:
``check_kernel_size_arg``, ``check_stride_arg``, ``check_dilation_arg``,
``check_causal_arg``, ``check_args_against_input``; also natten.org/operations):
``kernel_size >= 2``, ``dilation >= 1``, ``1 <= stride <= kernel_size`` and
``kernel_size * dilation <= n`` on every axis; odd and even kernel sizes are
both allowed. Hence every spatial axis has length >= 2.

Differences from NATTEN: ``scale=0.0`` means a zero scale here (NATTEN's
``scale or head_dim ** -0.5`` treats it as the default); NumPy integers and
lists are accepted where NATTEN wants Python ints and tuples. NATTEN's fast
path for neighborhoods that cover everything (``kernel_size == n``) gives the
same result as the rules above, so it needs no special case.
Not established from the sources: the rules were read from NATTEN's
reference mask (CUDA reference kernel) and its Flex Attention mask, which
state the same formulas, in versions of the repository from the 0.20/0.21
line onwards (stride appeared with GNA in 0.20); the exact release tags could
not be pinned, and NATTEN itself could not be run here to compare outputs.
The tests check the rules on neighbor lists worked out by hand.

The "xla" implementation is a windowed gather. Per axis, a static table of
neighbor positions ``[n, kernel_size]`` (and a validity mask, for causal axes)
is built once; for each block of ``QUERY_BLOCK`` queries the tables are
combined over axes into flat neighbor indices ``[QUERY_BLOCK, kernel_area]``,
the keys and values of those neighborhoods are gathered, and the softmax over
the ``kernel_area`` entries is computed in float32. Memory is
``O(B * QUERY_BLOCK * kernel_area * Hkv * (D + V))`` for the block being
processed plus ``O(sum_a n_a * k_a)`` for the tables; the blocks are visited
with ``lax.map`` (several per step within a memory budget: ``_blocked.map_blocks``)
under ``jax.checkpoint``, so the backward pass recomputes each
block's gather instead of storing it. An ``N x N`` matrix is never built.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnlib.ops import _blocked
from attnlib.ops import _checks
from attnlib.ops import _dispatch
from kernels_pallas.local_attention import mosaic_gpu_sparse as local_gpu_sparse
from kernels_pallas.local_attention import tpu_sparse as local_tpu_sparse

_OP = "al.neighborhood_attention"

# Queries per block in the "xla" implementation (tests set it small).
QUERY_BLOCK = 512


# ----------------------------------------------------------------------------
# Neighbor tables: per axis in NumPy at trace time (shapes and options are
# static), combined over axes per block of queries inside the computation.
# ----------------------------------------------------------------------------


def _axis_table(n: int, kernel_size: int, dilation: int, stride: int,
                causal: bool) -> tuple[np.ndarray, np.ndarray]:
  """Neighbors of every position along one axis.

  Returns:
    idx: [n, kernel_size] int32 positions; entry j of row i is the j-th
      token of i's window (an in-bounds placeholder where not valid).
    valid: [n, kernel_size] bool; False only for causal windows shorter than
      kernel_size.
  """
  k, d, s = kernel_size, dilation, stride
  pos = np.arange(n)
  group = pos % d  # dilation group
  c = pos // d  # coordinate within the group
  n_g = (n - group + d - 1) // d  # size of the group
  if causal:
    leader = np.minimum((c // s) * s + s - 1, n_g - 1)
    start = np.maximum(leader - k + 1, 0)
  else:
    leader = np.minimum((c // s) * s + s // 2, n_g - 1)
    start = np.clip(leader - k // 2, 0, n_g - k)
  coords = start[:, None] + np.arange(k)[None, :]  # [n, k] group coordinates
  if causal:
    valid = coords <= c[:, None]
    coords = np.where(valid, coords, c[:, None])
  else:
    valid = np.ones((n, k), bool)
  idx = group[:, None] + d * coords
  return idx.astype(np.int32), valid


def _block_table(axis_tables: list[tuple[jax.Array, jax.Array]],
                 spatial: tuple[int, ...], positions: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
  """Flat (row-major) neighbor indices and validity of some queries.

  Args:
    axis_tables: per axis, (idx [n_a, k_a], valid [n_a, k_a]) from _axis_table.
    spatial: the spatial shape (n_0, ..., n_{r-1}).
    positions: [Q] flat query positions in [0, N).

  Returns:
    table: [Q, kernel_area] int32 flat key positions; valid: [Q, kernel_area].
  """
  rank = len(spatial)
  num = positions.shape[0]
  table = jnp.zeros((num,) + (1,) * rank, jnp.int32)
  valid = jnp.ones((num,) + (1,) * rank, bool)
  row_stride = 1
  for a in reversed(range(rank)):
    idx, ok = axis_tables[a]
    coord = (positions // row_stride) % spatial[a]  # [Q]
    shape = [num] + [1] * rank
    shape[1 + a] = idx.shape[1]
    table = table + idx[coord].reshape(shape) * row_stride
    valid = valid & ok[coord].reshape(shape)
    row_stride *= spatial[a]
  area = math.prod(t[0].shape[1] for t in axis_tables)
  full = (num,) + tuple(t[0].shape[1] for t in axis_tables)
  table = jnp.broadcast_to(table, full).reshape(num, area)
  valid = jnp.broadcast_to(valid, full).reshape(num, area)
  return table, valid


# ----------------------------------------------------------------------------
# The "xla" implementation.
# ----------------------------------------------------------------------------


def _block(q: jax.Array, kf: jax.Array, vf: jax.Array, table: jax.Array,
           valid: jax.Array, scale: jax.Array) -> jax.Array:
  """Attention of one block of queries over their neighborhoods.

  q: [B, Q, Hkv, G, D]; kf: [B, N, Hkv, D]; vf: [B, N, Hkv, V];
  table, valid: [Q, K] (K = kernel_area). Returns [B, Q, Hkv, G, V] float32.
  """
  kg = jnp.take(kf, table, axis=1)  # [B, Q, K, Hkv, D]
  vg = jnp.take(vf, table, axis=1)  # [B, Q, K, Hkv, V]
  s = jnp.einsum("bqhgd,bqkhd->bqhgk", q, kg,
                 preferred_element_type=jnp.float32)
  s = s.astype(jnp.float32) * scale.astype(jnp.float32)
  mask = valid[None, :, None, None, :]
  # Every query sees at least itself, so the maximum is finite.
  m = jax.lax.stop_gradient(
      jnp.max(jnp.where(mask, s, -jnp.inf), axis=-1, keepdims=True))
  # Double where: masked entries never reach exp() with a large argument.
  p = jnp.where(mask, jnp.exp(jnp.where(mask, s, m) - m), 0.0)
  denom = jnp.sum(p, axis=-1)  # >= 1
  o = jnp.einsum("bqhgk,bqkhv->bqhgv", p, vg.astype(jnp.float32))
  return o / denom[..., None]


def _xla_impl(q: jax.Array, k: jax.Array, v: jax.Array, *,
              kernel_size: tuple[int, ...], dilation: tuple[int, ...],
              stride: tuple[int, ...], is_causal: tuple[bool, ...],
              scale: float, query_block: int | None = None) -> jax.Array:
  """Blocked windowed-gather neighborhood attention (arguments validated)."""
  scale = jnp.asarray(scale, jnp.float32)
  return _xla_jit(q, k, v, scale, kernel_size=kernel_size, dilation=dilation,
                  stride=stride, is_causal=is_causal,
                  query_block=query_block or QUERY_BLOCK)


@functools.partial(jax.jit, static_argnames=(
    "kernel_size", "dilation", "stride", "is_causal", "query_block"))
def _xla_jit(q: jax.Array, k: jax.Array, v: jax.Array, scale: jax.Array, *,
             kernel_size: tuple[int, ...], dilation: tuple[int, ...],
             stride: tuple[int, ...], is_causal: tuple[bool, ...],
             query_block: int) -> jax.Array:
  batch, *spatial_list, heads, head_dim = q.shape
  spatial = tuple(spatial_list)
  kv_heads, v_dim = k.shape[-2], v.shape[-1]
  groups = heads // kv_heads
  n = math.prod(spatial)
  block = min(query_block, n)
  num_blocks = -(-n // block)
  padded = num_blocks * block

  axis_tables = [
      tuple(jnp.asarray(t) for t in _axis_table(
          spatial[a], kernel_size[a], dilation[a], stride[a], is_causal[a]))
      for a in range(len(spatial))]

  qf = q.reshape(batch, n, kv_heads, groups, head_dim)
  qf = jnp.pad(qf, ((0, 0), (0, padded - n), (0, 0), (0, 0), (0, 0)))
  qf = qf.reshape(batch, num_blocks, block, kv_heads, groups, head_dim)
  kf = k.reshape(batch, n, kv_heads, head_dim)
  vf = v.reshape(batch, n, kv_heads, v_dim)

  @jax.checkpoint
  def body(args):
    q_blk, blk = args
    # Padded queries (past n - 1) take the last query's neighborhood; their
    # outputs are dropped.
    positions = jnp.minimum(blk * block + jnp.arange(block), n - 1)
    table, valid = _block_table(axis_tables, spatial, positions)
    return _block(q_blk, kf, vf, table, valid, scale)

  if num_blocks == 1:
    out = body((qf[:, 0], jnp.int32(0)))[:, None]
  else:
    # Working set of one block: gathered keys/values and the logits.
    area = math.prod(kernel_size)
    per_block = batch * block * area * (kv_heads * (head_dim + v_dim) + heads)
    out = _blocked.map_blocks(body, (jnp.moveaxis(qf, 1, 0),
                                     jnp.arange(num_blocks, dtype=jnp.int32)),
                              per_block)
    out = jnp.moveaxis(out, 0, 1)  # [B, nb, Q, Hkv, G, V]
  out = out.reshape(batch, padded, heads, v_dim)[:, :n]
  return out.reshape(batch, *spatial, heads, v_dim).astype(q.dtype)


# ----------------------------------------------------------------------------
# Argument checks.
# ----------------------------------------------------------------------------


def _is_bool(x: Any) -> bool:
  return isinstance(x, (bool, np.bool_))


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not _is_bool(x)


def _per_axis(name: str, value: Any, rank: int, kind: str) -> tuple:
  """Normalizes an int/bool or a per-axis sequence to a tuple of length rank."""
  is_item = _is_bool if kind == "bool" else _is_int
  what = "True or False" if kind == "bool" else "an int"
  expected = f"{what} or a sequence of {rank} of them (one per spatial axis)"
  if isinstance(value, Sequence) and not isinstance(value, str):
    items = tuple(value)
    if len(items) != rank or not all(is_item(x) for x in items):
      _checks.fail(_OP, name, value, expected)
    return tuple(bool(x) if kind == "bool" else int(x) for x in items)
  if not is_item(value):
    _checks.fail(_OP, name, value, expected)
  return (bool(value),) * rank if kind == "bool" else (int(value),) * rank


def _validate(q: Any, k: Any, v: Any, kernel_size: Any, dilation: Any,
              stride: Any, is_causal: Any, scale: Any) -> dict[str, tuple]:
  """Checks every argument; returns the per-axis options as tuples."""
  _checks.check_array(_OP, "q", q, (4, 5, 6))
  _checks.check_array(_OP, "k", k, q.ndim)
  _checks.check_array(_OP, "v", v, q.ndim)
  _checks.check_same_dtype(_OP, q=q, k=k, v=v)
  rank = q.ndim - 3
  for axis in range(1 + rank):  # batch and spatial axes
    what = "batch" if axis == 0 else f"spatial axis {axis - 1}"
    _checks.check_dim(_OP, "k", k, axis, q.shape[axis], f"{what}, like q")
    _checks.check_dim(_OP, "v", v, axis, q.shape[axis], f"{what}, like q")
  _checks.check_dim(_OP, "k", k, -1, q.shape[-1], "head_dim, like q")
  _checks.check_dim(_OP, "v", v, -2, k.shape[-2], "kv heads, like k")
  _checks.check_heads(_OP, q.shape[-2], k.shape[-2])
  _checks.check_scale(_OP, scale)

  kernel = _per_axis("kernel_size", kernel_size, rank, "int")
  dil = _per_axis("dilation", dilation, rank, "int")
  strd = _per_axis("stride", stride, rank, "int")
  causal = _per_axis("is_causal", is_causal, rank, "bool")
  if min(kernel) < 2:
    _checks.fail(_OP, "kernel_size", kernel_size, "ints >= 2 (as in NATTEN)")
  if min(dil) < 1:
    _checks.fail(_OP, "dilation", dilation, "ints >= 1")
  if min(strd) < 1 or any(s > kk for s, kk in zip(strd, kernel)):
    _checks.fail(_OP, "stride", stride,
                 f"ints with 1 <= stride <= kernel_size={kernel} on every axis")
  spatial = tuple(q.shape[1:1 + rank])
  if any(kk * d > n for kk, d, n in zip(kernel, dil, spatial)):
    _checks.fail(_OP, "kernel_size * dilation", tuple(
        kk * d for kk, d in zip(kernel, dil)),
                 f"at most the spatial shape {spatial} on every axis "
                 f"(kernel_size={kernel}, dilation={dil})")
  return dict(kernel_size=kernel, dilation=dil, stride=strd, is_causal=causal)


# ----------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------


def _kernel_impl(module):
  """The op's backend signature over a kernel module's entry point
  (tpu_sparse.py or mosaic_gpu_sparse.py: block-sparse over
  multi-dimensional tiles, forward and backward); head dims zero-padded to
  ones the kernels take."""
  @functools.partial(jax.jit, static_argnames=(
      "kernel_size", "dilation", "stride", "is_causal", "scale", "interpret"))
  def impl(q, k, v, *, kernel_size, dilation, stride, is_causal, scale,
           interpret):
    dims = module.SUPPORTED_HEAD_DIMS
    dp = _dispatch.padded_dim(q.shape[-1], dims)
    vp = _dispatch.padded_dim(v.shape[-1], dims)
    pad = _dispatch.pad_last
    o = module.neighborhood_attention(
        pad(q, dp), pad(k, dp), pad(v, vp), kernel_size=kernel_size,
        dilation=dilation, stride=stride, is_causal=is_causal, scale=scale,
        interpret=interpret)
    return o[..., :v.shape[-1]]
  return impl


# Kernel backends: name -> (the op's implementation, kernel module).
_KERNELS = {"mosaic_tpu": (_kernel_impl(local_tpu_sparse), local_tpu_sparse),
            "mosaic_gpu": (_kernel_impl(local_gpu_sparse), local_gpu_sparse)}


def _backends(q: jax.Array, v: jax.Array, implementation: str | None,
              interpret: bool) -> dict:
  """"xla" and the kernels that fit this call (see `_dispatch.with_kernels`)."""
  return _dispatch.padded_kernels(_OP, implementation, _xla_impl, q, v,
                                  interpret, _KERNELS)


def neighborhood_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kernel_size: int | Sequence[int],
    dilation: int | Sequence[int] = 1,
    stride: int | Sequence[int] = 1,
    is_causal: bool | Sequence[bool] = False,
    scale: float | None = None,
    implementation: str | None = None,
    interpret: bool = False,
) -> jax.Array:
  """Neighborhood attention over 1 to 3 spatial axes (NATTEN semantics).

  For every query position ``i`` (a tuple of spatial coordinates) and query
  head ``h`` (kv head ``h // (H // Hkv)``)::

    out[b, i, h] = sum_{j in N(i)} softmax_j(scale * q[b, i, h] . k[b, j, hkv])
                   v[b, j, hkv],

  the softmax taken over the neighborhood ``N(i)`` only. ``N(i)`` is the
  product over spatial axes of per-axis windows defined by ``kernel_size``,
  ``dilation``, ``stride`` and ``is_causal`` exactly as in NATTEN (see the
  module docstring for the rules and their sources). In short, per axis: a
  query sees ``kernel_size`` members of its dilation group (positions equal
  modulo ``dilation``), centred on it and shifted at the borders so that the
  window never shrinks; with ``is_causal`` the window ends at the query (and
  is shorter near the start); with ``stride > 1`` queries are grouped in runs
  of ``stride`` (within the dilation group) that share the window of the
  group's centre query (last query when causal, the window still ending at
  each query).

  Args:
    q: [B, *S, H, D] queries, 1 <= len(S) <= 3 spatial axes.
    k: [B, *S, Hkv, D] keys (same S), H % Hkv == 0 (GQA/MQA).
    v: [B, *S, Hkv, V] values.
    kernel_size: window size per axis, int or a sequence of len(S) ints,
      each >= 2; odd or even.
    dilation: per-axis dilation, >= 1; ``kernel_size * dilation`` must not
      exceed the axis length.
    stride: per-axis stride, 1 <= stride <= kernel_size (stride 1 is the
      sliding window, stride == kernel_size blocked attention).
    is_causal: per-axis causal masking, bool or a sequence of len(S) bools.
    scale: logit scale; None means ``D ** -0.5``.
    implementation: None (the kernel of the platform when the call fits
      it: mosaic_tpu on TPU, mosaic_gpu on a Hopper GPU; else "xla"), "xla",
      "mosaic_tpu" (kernels_pallas/local_attention/tpu_sparse.py: tokens
      regrouped into multi-dimensional tiles per dilation group, each query
      tile visiting only the key tiles its windows reach, the mask only on
      tiles that straddle a window edge; forward and backward; D, V up to
      256, zero-padded to 64/128/256) or "mosaic_gpu" (.../
      mosaic_gpu_sparse.py, Hopper: the same plan with tiles of 64 tokens,
      wgmma; D, V up to 128, zero-padded to 64/128; bf16/f16 only).
    interpret: run the Pallas kernel in interpret mode (TPU semantics with
      pltpu.InterpretParams for mosaic_tpu, Mosaic GPU's interpreter with
      plgpu.InterpretGPUParams for mosaic_gpu); with implementation=None it
      picks mosaic_tpu when the call fits it.

  Returns:
    [B, *S, H, V] in q.dtype; logits, softmax and the weighted sum are
    computed in float32.

  Raises:
    ValueError: q, k, v not arrays of rank 4 to 6 (1 to 3 spatial axes) of
      one floating dtype; batch, spatial or head_dim mismatches; kv heads not
      dividing the query heads or differing between k and v; kernel_size,
      dilation, stride or is_causal not an int/bool or a sequence of len(S)
      of them; kernel_size < 2, dilation < 1, stride < 1 or > kernel_size,
      kernel_size * dilation > the axis length; a bad scale, implementation
      or interpret; a named kernel that does not fit the call (head dims,
      dtype: mosaic_gpu takes bf16/f16 only; mosaic_gpu off Hopper without
      interpret).
  """
  options = _validate(q, k, v, kernel_size, dilation, stride, is_causal, scale)
  fn = _dispatch.select(_OP, implementation,
                        _backends(q, v, implementation, interpret), interpret)
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  kwargs = {} if fn is _xla_impl else {"interpret": interpret}
  return fn(q, k, v, scale=scale, **options, **kwargs)
