"""Feature maps phi for linear attention (exposed as `attnlib.feature_maps`).

Linear attention replaces softmax(q . k) by phi(q) . phi(k). Each map here acts
on the last axis of an array of any rank >= 1 and is applied by the caller to
q and k before `attnlib.linear_attention`, e.g.

  o = al.linear_attention(al.feature_maps.elu_plus_one(q),
                          al.feature_maps.elu_plus_one(k), v)

Outputs keep the input dtype.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from attnlib.ops import _checks

Array = jax.Array


def _check(op: str, x: Any) -> None:
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    _checks.fail(op, "x", type(x).__name__, "an array")
  if x.ndim < 1:
    _checks.fail(op, "x.shape", _checks.shape_of(x), "rank >= 1")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    _checks.fail(op, "x.dtype", str(x.dtype), "a floating dtype")


def identity(x: Array) -> Array:
  """phi(x) = x (plain linear attention).

  Args:
    x: floating array [..., d].

  Returns:
    x itself, [..., d].

  Raises:
    ValueError: x not a floating array of rank >= 1.
  """
  _check("al.feature_maps.identity", x)
  return x


def elu_plus_one(x: Array) -> Array:
  """phi(x) = elu(x) + 1, elementwise: x + 1 for x > 0, exp(x) otherwise.

  Strictly positive (Katharopoulos et al., 2020), so phi(q) . phi(k) > 0
  (down to exp()'s underflow, x < ~-87 in float32).

  Args:
    x: floating array [..., d].

  Returns:
    [..., d] in x.dtype.

  Raises:
    ValueError: x not a floating array of rank >= 1.
  """
  _check("al.feature_maps.elu_plus_one", x)
  # Not jax.nn.elu(x) + 1: expm1(x) + 1 rounds to 0 for x < ~-17 in float32.
  # exp() sees min(x, 0) so that the unused branch cannot overflow.
  return jnp.where(x > 0, x + 1, jnp.exp(jnp.minimum(x, 0)))


def relu(x: Array) -> Array:
  """phi(x) = max(x, 0), elementwise.

  Args:
    x: floating array [..., d].

  Returns:
    [..., d] in x.dtype.

  Raises:
    ValueError: x not a floating array of rank >= 1.
  """
  _check("al.feature_maps.relu", x)
  return jax.nn.relu(x)


def taylor(x: Array) -> Array:
  """BASED's second-order Taylor feature map of exp(q . k / sqrt(d)).

  For x of last dimension d:

    phi(x) = concat[1, x / d**(1/4), vec(x x^T) / (sqrt(2) * sqrt(d))]

  of last dimension 1 + d + d*d, where vec(x x^T)[i*d + j] = x_i x_j. Then

    phi(q) . phi(k) = 1 + s + s**2 / 2,   s = q . k / sqrt(d),

  the second-order Taylor expansion of exp(s) (always >= 1/2, so positive).
  Computed in (at least) float32 and returned in x.dtype.

  Args:
    x: floating array [..., d].

  Returns:
    [..., 1 + d + d*d] in x.dtype.

  Raises:
    ValueError: x not a floating array of rank >= 1.
  """
  _check("al.feature_maps.taylor", x)
  d = x.shape[-1]
  compute = jnp.promote_types(x.dtype, jnp.float32)
  xf = x.astype(compute)
  ones = jnp.ones(x.shape[:-1] + (1,), compute)
  first = xf / d ** 0.25
  second = (xf[..., :, None] * xf[..., None, :]).reshape(x.shape[:-1] + (d * d,))
  second = second / (math.sqrt(2.0) * math.sqrt(d))
  return jnp.concatenate([ones, first, second], axis=-1).astype(x.dtype)
