"""Naive oracle for al.sigmoid_attention: dense masked sigmoid weights."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from tests.oracles.sliding_window import allowed

_HI = jax.lax.Precision.HIGHEST


@jax.jit
def _masked_sigmoid_attention(q, k, v, mask, bias, scale):
  """q [B,Tq,H,D], k/v with H heads, mask [Tq,Tk], bias [H]."""
  logits = jnp.einsum("bihd,bjhd->bhij", q, k, precision=_HI) * scale
  weights = jax.nn.sigmoid(logits + bias[None, :, None, None])
  weights = weights * mask.astype(jnp.float32)
  return jnp.einsum("bhij,bjhv->bihv", weights, v, precision=_HI)


def sigmoid_attention(q, k, v, *, bias=None, scale: float | None = None,
                      is_causal: bool = False, left: int | None = None,
                      right: int | None = None) -> jax.Array:
  """o_i = sum_{j allowed} sigmoid(scale q_i.k_j + b_h) v_j, float32.

  bias: None (-log Tk), a float, or an array of shape [H] or ().
  """
  q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
  h = q.shape[2]
  groups = h // k.shape[2]
  k = jnp.repeat(k, groups, axis=2)
  v = jnp.repeat(v, groups, axis=2)
  if scale is None:
    scale = 1.0 / math.sqrt(q.shape[-1])
  if bias is None:
    bias = -math.log(k.shape[1])
  bias = jnp.broadcast_to(jnp.asarray(bias, jnp.float32), (h,))
  mask = allowed(q.shape[1], k.shape[1], left, right, is_causal)
  return _masked_sigmoid_attention(q, k, v, mask, bias, scale)
