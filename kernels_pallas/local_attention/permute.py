"""Tokens to a plan's kernel rows and back, with permutation VJPs.

A plan (`plan.py`) orders the N tokens of an axis into R >= N kernel rows:
row r holds token perm[r] (perm[r] = -1 for a padded row) and token t sits
in row inv[t]. The block-sparse kernels run on rows, so the ops gather

  to_rows(x)[r]   = x[max(perm[r], 0)]      (padded rows read token 0)
  from_rows(y)[t] = y[inv[t]]

along one axis. Under autodiff `jnp.take`'s transpose is a scatter-add,
which on a GPU took 2 ms of a 3.1 ms forward + backward (BENCHMARKS.md 4g);
the transposes of these two maps are gathers too:

  to_rows^T(g)[t]   = g[inv[t]] + [t == 0] sum_{r padded} g[r]
  from_rows^T(g)[r] = g[perm[r]] if perm[r] >= 0 else 0,

which the custom VJPs below compute (exactly; the padded rows' sum is a
gather of the few padded rows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def row_maps(perm: np.ndarray, inv: np.ndarray, axis: int):
  """(to_rows, from_rows) along `axis` for a plan's perm [R] and inv [N]."""
  # NumPy indices, made constants where each map is traced: jax arrays
  # created here would be tracers of the caller's trace when it is staged.
  perm = np.asarray(perm)
  pad = np.nonzero(perm < 0)[0].astype(np.int32)
  src = np.maximum(perm, 0).astype(np.int32)
  inv_ = np.asarray(inv, np.int32)
  real = perm >= 0

  def gather(x, index):
    return jnp.take(x, index, axis=axis)

  def to_rows_t(g):   # [.., R, ..] -> [.., N, ..]
    out = gather(g, inv_)
    if pad.size:
      extra = gather(g, pad).sum(axis, keepdims=True)
      out = out + jnp.pad(extra, [(0, 0)] * axis + [(0, out.shape[axis] - 1)]
                          + [(0, 0)] * (out.ndim - axis - 1))
    return out

  def from_rows_t(g):   # [.., N, ..] -> [.., R, ..]
    rows = gather(g, src)
    keep = real.reshape((-1,) + (1,) * (rows.ndim - axis - 1))
    return jnp.where(keep, rows, jnp.zeros((), rows.dtype))

  @jax.custom_vjp
  def to_rows(x):
    return gather(x, src)

  @jax.custom_vjp
  def from_rows(y):
    return gather(y, inv_)

  to_rows.defvjp(lambda x: (gather(x, src), None),
                 lambda _, g: (to_rows_t(g),))
  from_rows.defvjp(lambda y: (gather(y, inv_), None),
                   lambda _, g: (from_rows_t(g),))
  return to_rows, from_rows
