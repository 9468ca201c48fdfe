"""Naive oracle for al.attention_scan: one softmax per prefix.

Written independently of the library: no running-max state, no associative
operator. For each t the output is ``jax.nn.softmax`` over the first t + 1
logits (plus one extra pseudo-token standing for the initial state), computed
in float32 at HIGHEST precision. All prefixes are done at once as the rows of
a causally masked [T, T] softmax: O(T^2) memory, tiny sizes only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def _logits_and_values(q, k, v, scale):
  """float32 logits [B, T, H] and values [B, T, H, V], kv heads repeated."""
  q = jnp.asarray(q, jnp.float32)
  k = jnp.asarray(k, jnp.float32)
  v = jnp.asarray(v, jnp.float32)
  batch, _, kv_heads, head_dim = k.shape
  heads = q.shape[-2]
  if q.ndim == 2:
    q = jnp.broadcast_to(q, (batch, heads, head_dim))
  if scale is None:
    scale = head_dim ** -0.5
  groups = heads // kv_heads
  k = jnp.repeat(k, groups, axis=2)  # [B, T, H, D]
  v = jnp.repeat(v, groups, axis=2)  # [B, T, H, V]
  s = scale * jnp.einsum("bhd,bthd->bth", q, k, precision=HIGHEST)
  return s, v


@functools.partial(jax.jit, static_argnames="scale")  # compile time only
def attention_scan(q, k, v, *, scale=None, initial_state=None):
  """o [B, T, H, V] float32: softmax attention of q over each prefix of k/v.

  initial_state (m0, u0, w0), if given, enters as one extra token in front of
  the sequence with logit m0 + log(u0) and value w0 / u0, so that it adds
  u0 e^{m0} to the softmax denominator and w0 e^{m0} to the numerator.
  """
  s, v = _logits_and_values(q, k, v, scale)
  length = s.shape[1]
  if initial_state is not None:
    m0, u0, w0 = (jnp.asarray(x, jnp.float32) for x in initial_state)
    s0 = m0 + jnp.log(u0)  # -inf when u0 == 0: zero weight in the softmax
    v0 = jnp.where(u0[..., None] > 0,
                   w0 / jnp.where(u0 > 0, u0, 1.0)[..., None], 0.0)
    s = jnp.concatenate([s0[:, None], s], axis=1)
    v = jnp.concatenate([v0[:, None], v], axis=1)
  offset = s.shape[1] - length
  # Row t is the softmax over the first offset + t + 1 logits (a causal mask),
  # the rest get weight 0. All rows at once: [B, T, n, H].
  n = s.shape[1]
  rows = jnp.arange(length)[:, None] + offset
  cols = jnp.arange(n)[None, :]
  prefix = (cols <= rows)[None, :, :, None]  # [1, T, n, 1]
  logits = jnp.broadcast_to(s[:, None], (s.shape[0], length) + s.shape[1:])
  p = jax.nn.softmax(logits, axis=2, where=prefix)  # 0 where masked
  return jnp.einsum("btjh,bjhv->bthv", p, v, precision=HIGHEST)


@functools.partial(jax.jit, static_argnames="scale")
def final_sums(q, k, v, *, scale=None, initial_state=None):
  """(m, u, w) of the whole sequence, computed directly from the logits.

  m = max of all logits (and m0), u = sum exp(s - m) (+ u0 e^{m0 - m}),
  w = sum exp(s - m) v (+ w0 e^{m0 - m}).
  """
  s, v = _logits_and_values(q, k, v, scale)
  m = jnp.max(s, axis=1)  # [B, H]
  if initial_state is not None:
    m0, u0, w0 = (jnp.asarray(x, jnp.float32) for x in initial_state)
    m = jnp.maximum(m, m0)
  p = jnp.exp(s - m[:, None])  # [B, T, H]
  u = jnp.sum(p, axis=1)
  w = jnp.einsum("bth,bthv->bhv", p, v, precision=HIGHEST)
  if initial_state is not None:
    c = jnp.exp(m0 - m)
    u = u + u0 * c
    w = w + w0 * c[..., None]
  return m, u, w
