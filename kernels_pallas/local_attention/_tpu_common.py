"""Pieces shared by the Mosaic TPU local-attention kernels (tpu.py: the 1-D
band; tpu_sparse.py: neighborhoods over a plan): what they support, the
masked-score value, matmul helpers and the masked-or-not step."""

from __future__ import annotations

from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp
import numpy as np

SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)

LANES = 128
# Finite stand-in for -inf in masked scores (as in JAX's flash attention), so
# a row with no visible key in a tile never produces inf - inf.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
NN = (((1,), (0,)), ((), ()))  # [M, N] x [N, P] -> [M, P]
NT = (((1,), (1,)), ((), ()))  # [M, N] x [P, N] -> [M, P]


def supports(d: int, dv: int, dtype) -> bool:
  """Whether these kernels take q/k head dim d, v head dim dv and dtype."""
  try:
    dt = jnp.dtype(dtype)
  except TypeError:
    return False
  return (d in SUPPORTED_HEAD_DIMS and dv in SUPPORTED_HEAD_DIMS
          and any(dt == jnp.dtype(x) for x in SUPPORTED_DTYPES))


def dot(a, b, dims, precision):
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32,
                         precision=precision)


def precision(dtype):
  """HIGHEST for float32 inputs; bf16/f16 operands stay as they are."""
  return (lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32
          else lax.Precision.DEFAULT)


def run_masked_or_not(body, active, interior):
  """On an active step runs body(masked): no mask work on interior tiles."""

  @pl.when(jnp.logical_and(active, interior))
  def _interior():
    body(False)

  @pl.when(jnp.logical_and(active, jnp.logical_not(interior)))
  def _edge():
    body(True)


def is_int(x):
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool,
                                                                 np.bool_))
