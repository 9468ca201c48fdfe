"""Naive neighborhood attention: an explicit N x N mask and dense softmax.

Written from the rules (NATTEN's semantics, see attnlib/ops/neighborhood.py's
docstring) with plain Python loops over positions, independently of the
library's index arithmetic: each dilation group is listed explicitly, windows
are found in the list, and the N x N boolean mask is the product of per-axis
masks. Only for tiny sizes.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


def _tuple(x, rank):
  return tuple(x) if isinstance(x, (tuple, list)) else (x,) * rank


def axis_neighbors(n: int, kernel_size: int, dilation: int = 1, stride: int = 1,
                   is_causal: bool = False) -> list[list[int]]:
  """Sorted key positions seen by each query position along one axis."""
  out = []
  for i in range(n):
    members = [p for p in range(n) if p % dilation == i % dilation]
    size = len(members)
    c = members.index(i)
    first_of_stride_group = (c // stride) * stride
    if is_causal:
      leader = min(first_of_stride_group + stride - 1, size - 1)
      lo, hi = max(leader - kernel_size + 1, 0), c
    else:
      leader = min(first_of_stride_group + stride // 2, size - 1)
      lo = leader - kernel_size // 2
      lo = max(lo, 0)
      lo = min(lo, size - kernel_size)
      hi = lo + kernel_size - 1
    out.append([members[j] for j in range(lo, hi + 1)])
  return out


def neighborhood_mask(spatial, kernel_size, dilation=1, stride=1,
                      is_causal=False) -> np.ndarray:
  """[N, N] bool mask (row-major flattening of the spatial axes)."""
  rank = len(spatial)
  ks, ds, ss, cs = (_tuple(a, rank) for a in (kernel_size, dilation, stride,
                                               is_causal))
  axis_masks = []
  for a in range(rank):
    m = np.zeros((spatial[a], spatial[a]), bool)
    for i, keys in enumerate(axis_neighbors(spatial[a], ks[a], ds[a], ss[a],
                                            cs[a])):
      m[i, keys] = True
    axis_masks.append(m)
  # mask[q, k] = AND over axes a of axis_masks[a][q_a, k_a].
  mask = np.ones(tuple(spatial) * 2, bool)
  for a in range(rank):
    shape = [1] * (2 * rank)
    shape[a], shape[rank + a] = spatial[a], spatial[a]
    mask = mask & axis_masks[a].reshape(shape)
  n = math.prod(spatial)
  mask = mask.reshape(n, n)
  return mask


def neighborhood_attention(q, k, v, *, kernel_size, dilation=1, stride=1,
                           is_causal=False, scale=None):
  """Masked dense softmax attention in float32 at HIGHEST precision."""
  rank = q.ndim - 3
  options = {name: _tuple(x, rank) for name, x in (
      ("kernel_size", kernel_size), ("dilation", dilation), ("stride", stride),
      ("is_causal", is_causal))}
  return _attention(q, k, v, scale, **options)


@functools.partial(jax.jit, static_argnames=("kernel_size", "dilation",
                                             "stride", "is_causal"))
def _attention(q, k, v, scale, *, kernel_size, dilation, stride, is_causal):
  batch, *spatial, heads, head_dim = q.shape
  kv_heads, v_dim = k.shape[-2], v.shape[-1]
  n = math.prod(spatial)
  mask = jnp.asarray(neighborhood_mask(tuple(spatial), kernel_size, dilation,
                                       stride, is_causal))
  scale = head_dim ** -0.5 if scale is None else scale
  qf = q.astype(jnp.float32).reshape(batch, n, heads, head_dim)
  kf = jnp.repeat(k.astype(jnp.float32).reshape(batch, n, kv_heads, head_dim),
                  heads // kv_heads, axis=2)
  vf = jnp.repeat(v.astype(jnp.float32).reshape(batch, n, kv_heads, v_dim),
                  heads // kv_heads, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", qf, kf, precision=_HIGHEST) * scale
  s = jnp.where(mask, s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1)
  o = jnp.einsum("bhqk,bkhv->bqhv", p, vf, precision=_HIGHEST)
  return o.reshape(batch, *spatial, heads, v_dim).astype(q.dtype)
