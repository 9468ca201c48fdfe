"""Tests of kernels_pallas/local_attention/permute.py: the token <-> kernel
row maps and their gather-only VJPs, against jnp.take differentiated by JAX
(whose transpose is a scatter-add) in float64, on real plans with padded
rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.local_attention import permute
from kernels_pallas.local_attention import plan as plan_lib


@pytest.mark.parametrize("spatial,kernel,dilation,tile,axis", [
    ((13, 10), 5, 1, (4, 4), 1),     # ragged: padded rows in every tile row
    ((9, 11), 3, 2, (2, 4), 1),      # dilation groups of unequal size
    ((20,), 5, 1, (8,), 2),          # 1-D, rows on axis 2
    ((16, 16), 5, 1, (8, 8), 1),     # no padded rows at all
])
def test_maps_and_vjps_match_take(spatial, kernel, dilation, tile, axis):
  p = plan_lib.neighborhood_plan(spatial, kernel, dilation, 1, False, tile)
  n, r = p.n_tokens, p.n_rows
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    def arr(length):
      shape = [2, 3, 4]
      shape[axis] = length
      return jnp.asarray(rng.standard_normal(shape))
    to_rows, from_rows = permute.row_maps(p.perm, p.inv, axis)
    ref_to = lambda x: jnp.take(x, np.maximum(p.perm, 0), axis=axis)
    ref_from = lambda y: jnp.take(y, p.inv, axis=axis)
    x, g_rows, y, g_tok = arr(n), arr(r), arr(r), arr(n)
    for fn, ref, arg, cot in ((to_rows, ref_to, x, g_rows),
                              (from_rows, ref_from, y, g_tok)):
      out, vjp = jax.vjp(fn, arg)
      want, want_vjp = jax.vjp(ref, arg)
      np.testing.assert_array_equal(out, want)
      np.testing.assert_allclose(vjp(cot)[0], want_vjp(cot)[0], rtol=0,
                                 atol=1e-12)
  assert (p.perm < 0).any() == (n < r)


def test_vjps_gather_instead_of_scatter():
  p = plan_lib.neighborhood_plan((13, 10), 5, 1, 1, False, (4, 4))
  to_rows, from_rows = permute.row_maps(p.perm, p.inv, 1)
  x = jnp.zeros((2, p.n_tokens, 3), jnp.float32)
  for fn in (to_rows, lambda x: from_rows(to_rows(x))):
    text = str(jax.make_jaxpr(jax.grad(lambda x: fn(x).sum()))(x))
    assert "scatter" not in text and "gather" in text
  # The reference take's gradient does scatter: the check above can fail.
  ref = lambda x: jnp.take(x, np.maximum(p.perm, 0), axis=1).sum()
  assert "scatter" in str(jax.make_jaxpr(jax.grad(ref))(x))
