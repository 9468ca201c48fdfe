"""Naive oracle for al.sliding_window_attention: dense T x T masked softmax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_HI = jax.lax.Precision.HIGHEST


def allowed(tq: int, tk: int, left: int | None, right: int | None,
            is_causal: bool) -> np.ndarray:
  """[tq, tk] bool: i sees j iff i-left <= j <= i+right (j <= i if causal)."""
  mask = np.zeros((tq, tk), dtype=bool)
  for i in range(tq):
    for j in range(tk):
      ok = True
      if left is not None and j < i - left:
        ok = False
      if right is not None and j > i + right:
        ok = False
      if is_causal and j > i:
        ok = False
      mask[i, j] = ok
  return mask


@jax.jit
def _masked_softmax_attention(q, k, v, mask, scale):
  """Dense attention over allowed keys; q [B,T,H,D], k/v with H heads."""
  logits = jnp.einsum("bihd,bjhd->bhij", q, k, precision=_HI) * scale
  logits = jnp.where(mask, logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bhij,bjhv->bihv", probs, v, precision=_HI)


def sliding_window_attention(q, k, v, *, left: int, right: int,
                             is_causal: bool = False,
                             scale: float | None = None) -> jax.Array:
  """q [B,T,H,D], k [B,T,Hkv,D], v [B,T,Hkv,V] -> [B,T,H,V] float32."""
  q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
  groups = q.shape[2] // k.shape[2]
  k = jnp.repeat(k, groups, axis=2)
  v = jnp.repeat(v, groups, axis=2)
  if scale is None:
    scale = q.shape[-1] ** -0.5
  mask = allowed(q.shape[1], k.shape[1], left, right, is_causal)
  return _masked_softmax_attention(q, k, v, mask, scale)
