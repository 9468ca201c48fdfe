"""Naive references for `al.linear_attention` (tests only).

`linear_attention` is the plain sequential recurrence, one step per position
(lax.scan over t), in float32 with HIGHEST matmul precision (non-causal: the
quadratic form); it is differentiable so that gradients can be compared too. `linear_attention_np` is
the unrolled closed form in float64 numpy with Python loops, used to check the
recurrence itself on tiny shapes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST


def linear_attention(q, k, v, *, is_causal=True, decay=None, scale=None,
                     initial_state=None):
  """Returns (o float32 [B, T, H, V], final state float32 [B, H, K, V])."""
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  scale = dk ** -0.5 if scale is None else scale
  if initial_state is None:
    initial_state = jnp.zeros((b, h, dk, dv), jnp.float32)
  if decay is None:
    a = jnp.ones((b, t, h), jnp.float32)
  elif decay.ndim == 1:  # rates lambda: a = exp(-lambda)
    a = jnp.broadcast_to(jnp.exp(-decay.astype(jnp.float32)), (b, t, h))
  else:  # log-gates g: a = exp(g)
    a = jnp.exp(decay.astype(jnp.float32))
  if not is_causal:
    assert decay is None
    return _global(q, k, v, initial_state, scale)
  return _recurrence(q, k, v, a, initial_state, scale)


def _repeat_kv(q, k, v):
  rep = q.shape[2] // k.shape[2]
  return (q.astype(jnp.float32), jnp.repeat(k.astype(jnp.float32), rep, axis=2),
          jnp.repeat(v.astype(jnp.float32), rep, axis=2))


@functools.partial(jax.jit, static_argnames="scale")
def _global(q, k, v, s0, scale):
  """o_t = scale * (q_t S_0 + sum_s (q_t . k_s) v_s): quadratic form."""
  q, k, v = _repeat_kv(q, k, v)
  s0 = s0.astype(jnp.float32)
  scores = jnp.einsum("bthk,bshk->bhts", q, k, precision=HIGHEST)
  o = jnp.einsum("bhts,bshv->bthv", scores, v, precision=HIGHEST)
  o = o + jnp.einsum("bthk,bhkv->bthv", q, s0, precision=HIGHEST)
  state = s0 + jnp.einsum("bshk,bshv->bhkv", k, v, precision=HIGHEST)
  return scale * o, state


@functools.partial(jax.jit, static_argnames="scale")
def _recurrence(q, k, v, a, s0, scale):
  """S_t = a_t S_{t-1} + k_t^T v_t, o_t = scale q_t S_t, one step per t."""
  q, k, v = _repeat_kv(q, k, v)

  def step(state, xs):
    q_t, k_t, v_t, a_t = xs  # [B, H, K], [B, H, K], [B, H, V], [B, H]
    outer = jnp.einsum("bhk,bhv->bhkv", k_t, v_t, precision=HIGHEST)
    state = a_t[:, :, None, None] * state + outer
    o_t = scale * jnp.einsum("bhk,bhkv->bhv", q_t, state, precision=HIGHEST)
    return state, o_t

  time_major = lambda x: jnp.moveaxis(x, 1, 0)
  state, o = jax.lax.scan(step, s0.astype(jnp.float32),
                          tuple(map(time_major, (q, k, v, a))))
  return jnp.moveaxis(o, 0, 1), state


def linear_attention_np(q, k, v, *, decay=None, scale=None,
                        initial_state=None):
  """Causal closed form in float64 numpy (loops; tiny shapes only).

  o_t = scale * (A_{0,t} q_t S_0 + sum_{s<=t} A_{s,t} (q_t . k_s) v_s) with
  A_{s,t} = prod_{r=s+1..t} a_r (A_{0,t} = prod_{r=0..t} a_r for S_0).
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  rep = h // k.shape[2]
  scale = dk ** -0.5 if scale is None else scale
  if decay is None:
    a = np.ones((b, t, h))
  elif np.ndim(decay) == 1:
    a = np.broadcast_to(np.exp(-np.asarray(decay, np.float64)), (b, t, h))
  else:
    a = np.exp(np.asarray(decay, np.float64))
  s0 = (np.zeros((b, h, dk, dv)) if initial_state is None
        else np.asarray(initial_state, np.float64))
  o = np.zeros((b, t, h, dv))
  for bi in range(b):
    for hi in range(h):
      kv_h = hi // rep
      for ti in range(t):
        acc = np.prod(a[bi, :ti + 1, hi]) * (q[bi, ti, hi] @ s0[bi, hi])
        for si in range(ti + 1):
          weight = np.prod(a[bi, si + 1:ti + 1, hi])
          acc = acc + weight * (q[bi, ti, hi] @ k[bi, si, kv_h]) * v[bi, si, kv_h]
        o[bi, ti, hi] = scale * acc
  return o
