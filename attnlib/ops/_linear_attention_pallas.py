"""Causal linear attention through the Pallas kernels, with a custom VJP.

`attnlib.linear_attention` calls `causal(...)` for implementation="mosaic_tpu"
and "mosaic_gpu". This module adapts the public layout to the kernels' and
back, with a custom VJP whose backward is the kernels' own:

* [B, T, H, K] -> [B, H, T, K] (the kernels tile the sequence of one head),
  except for kernels with `SEQ_MAJOR = True` (Mosaic GPU's), which read and
  write the public [B, T, H, *] layout themselves (`seq_major=True`), so no
  transposes are paid;
* only where needed: T padded to a multiple of the chunk with k = v = 0 and
  g = 0 (padded steps leave the state unchanged); K and V padded with zeros
  to a head dim the kernel supports (zero columns change no dot product and
  are sliced away);
* per-head rates arrive as broadcast log-gates [B, T, H] (done by the caller);
* the backward kernels return dk, dv per *query* head: each group of H // Hkv
  query heads is summed into its kv head here;
* the gate gradient comes from the identity (Gamma_t = sum_{s <= t} g_s)

    dL/dGamma_t = q_t . dq_t - k_t . dk_t   (+ <dS_T, S_T> at t = T),
    dL/dg_t     = sum_{s >= t} dL/dGamma_s,

  which holds because every term of o and S_T depends on Gamma through
  exp(Gamma_t - Gamma_s) with q_t on the + side and k_s on the - side (and
  exp(Gamma_t) q_t S_0, exp(Gamma_T) S_0 for the initial state). Kernels
  that return a fifth value from `linear_attention_bwd` compute the first
  two terms themselves, from their float32 results (Mosaic GPU's).
"""

from __future__ import annotations

from collections.abc import Callable
import functools
from types import ModuleType

import jax
import jax.numpy as jnp

Array = jax.Array


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _head_dim(d: int, supported: tuple[int, ...]) -> int | None:
  """Smallest supported head dim >= d, or None."""
  fits = [s for s in supported if s >= d]
  return min(fits) if fits else None


def supports(kernels: ModuleType, dk: int, dv: int, dtype) -> bool:
  """Whether the kernels handle K = dk, V = dv (after zero padding) and dtype."""
  dims = kernels.SUPPORTED_HEAD_DIMS
  return (_head_dim(dk, dims) is not None and _head_dim(dv, dims) is not None
          and jnp.dtype(dtype) in [jnp.dtype(d) for d in kernels.SUPPORTED_DTYPES])


def causal(kernels: ModuleType, q: Array, k: Array, v: Array,
           log_g: Array | None, s0: Array | None, scale: float, *, chunk: int,
           interpret) -> tuple[Array, Array]:
  """o [B, T, H, V] (q.dtype) and S_T float32 [B, H, K, V] via `kernels`.

  Args:
    kernels: a module with `linear_attention_fwd`, `linear_attention_bwd`,
      `SUPPORTED_HEAD_DIMS`, `SUPPORTED_DTYPES` and optionally `SEQ_MAJOR`
      (kernels_pallas.linear_attention.tpu and .mosaic_gpu).
    q, k, v: [B, T, H, K], [B, T, Hkv, K], [B, T, Hkv, V].
    log_g: None or float32 [B, T, H] log-decays <= 0.
    s0: None (zeros, nothing read) or float32 [B, H, K, V] initial state.
    scale: output scale.
    chunk: the kernels' chunk length.
    interpret: passed to the kernels (False or an interpret-params object).
  """
  seq_major = bool(getattr(kernels, "SEQ_MAJOR", False))
  return _forward(kernels, q, k, v, log_g, s0, scale, chunk=chunk,
                  vjp=_kernel_vjp(kernels, float(scale), chunk, interpret,
                                  seq_major),
                  seq_major=seq_major)


def _forward(kernels: ModuleType, q: Array, k: Array, v: Array,
             log_g: Array | None, s0: Array | None, scale: float, *, chunk: int,
             vjp: Callable, seq_major: bool) -> tuple[Array, Array]:
  """Pads (where needed) to the kernels' layout, calls `vjp`, and back.

  seq_major: the kernel takes [B, T, heads, *] as is; otherwise the arrays are
  transposed to [B, heads, T, *] and o back.
  """
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  kp = _head_dim(dk, kernels.SUPPORTED_HEAD_DIMS)
  vp = _head_dim(dv, kernels.SUPPORTED_HEAD_DIMS)
  tp = _round_up(t, chunk)

  def pad(x, widths):  # no pad op at all when nothing is padded
    return jnp.pad(x, widths) if any(w != (0, 0) for w in widths) else x

  def to_kernel(x, d_pad):  # [B, T, heads, d] -> kernel layout, Tp, d_pad
    x = pad(x, ((0, 0), (0, tp - t), (0, 0), (0, d_pad - x.shape[-1])))
    return x if seq_major else jnp.swapaxes(x, 1, 2)

  qk, kk, vk = to_kernel(q, kp), to_kernel(k, kp), to_kernel(v, vp)
  gk = None
  if log_g is not None:
    gk = pad(log_g, ((0, 0), (0, tp - t), (0, 0)))
    gk = gk if seq_major else jnp.swapaxes(gk, 1, 2)
  s0k = None if s0 is None else pad(
      s0, ((0, 0), (0, 0), (0, kp - dk), (0, vp - dv)))
  o, s_t = vjp(qk, kk, vk, gk, s0k)
  if not seq_major:
    o = jnp.swapaxes(o, 1, 2)
  if (tp, vp) != (t, dv):
    o = o[:, :t, :, :dv]
  if (kp, vp) != (dk, dv):
    s_t = s_t[:, :, :dk, :dv]
  return o, s_t


@functools.lru_cache(maxsize=None)
def _kernel_vjp(kernels: ModuleType, scale: float, chunk: int, interpret,
                seq_major: bool):
  """custom_vjp function (q, k, v, g, s0) -> (o, S_T) in the kernels' layout.

  seq_major: the layout is [B, T, heads, *] (else [B, heads, T, *]).
  """
  extra = dict(seq_major=True) if seq_major else {}
  fwd_kernel = functools.partial(kernels.linear_attention_fwd, scale=scale,
                                 chunk=chunk, interpret=interpret, **extra)
  bwd_kernel = functools.partial(kernels.linear_attention_bwd, scale=scale,
                                 chunk=chunk, interpret=interpret, **extra)
  t_ax, head_ax = (1, 2) if seq_major else (2, 1)

  @jax.custom_vjp
  def f(q, k, v, g, s0):
    return fwd_kernel(q, k, v, g, s0)

  def f_fwd(q, k, v, g, s0):
    o, s_t = fwd_kernel(q, k, v, g, s0)
    return (o, s_t), (q, k, v, g, s0, s_t)

  def f_bwd(res, cotangents):
    q, k, v, g, s0, s_t = res
    d_o, d_st = cotangents
    dq, dk_h, dv_h, ds0, *rest = bwd_kernel(
        q, k, v, g, s0, d_o.astype(q.dtype), d_st.astype(jnp.float32))
    h, hkv = q.shape[head_ax], k.shape[head_ax]

    def to_kv_heads(x):  # per query head -> its kv head (h // group)
      if h == hkv:
        return x
      shape = x.shape[:head_ax] + (hkv, h // hkv) + x.shape[head_ax + 1:]
      return x.astype(jnp.float32).reshape(shape).sum(axis=head_ax + 1)

    dg = None
    if g is not None:
      if rest and rest[0] is not None:  # the kernels' own q.dq - k.dk [B,H,T]
        d_gamma = jnp.swapaxes(rest[0], 1, 2) if seq_major else rest[0]
      else:
        k_h = jnp.repeat(k, h // hkv, axis=head_ax).astype(jnp.float32)
        d_gamma = (jnp.sum(q.astype(jnp.float32) * dq, axis=-1)
                   - jnp.sum(k_h * dk_h, axis=-1))
      last = jnp.sum(d_st * s_t, axis=(-2, -1))              # [B, H]
      at_last_t = (slice(None), -1) if seq_major else (slice(None),) * 2 + (-1,)
      d_gamma = d_gamma.at[at_last_t].add(last)
      dg = jnp.flip(jnp.cumsum(jnp.flip(d_gamma, t_ax), axis=t_ax), t_ax)
    return (dq.astype(q.dtype), to_kv_heads(dk_h).astype(k.dtype),
            to_kv_heads(dv_h).astype(v.dtype), dg,
            None if s0 is None else ds0)

  f.defvjp(f_fwd, f_bwd)
  return f
