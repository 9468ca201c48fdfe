"""Causal linear attention through the Pallas kernels, with a custom VJP.

`attnlib.linear_attention` calls `causal(...)` for implementation="mosaic_tpu"
and "mosaic_gpu". This module adapts the public layout to the kernels' and
back (kernels without backward kernels, Mosaic GPU's for now, get their
gradients from the VJP of the xla reference, recomputing the forward in XLA):

* [B, T, H, K] -> [B, H, T, K] (the kernels tile the sequence of one head),
  except for kernels with `SEQ_MAJOR = True` (Mosaic GPU's forward), which
  read and write the public [B, T, H, *] layout themselves (`seq_major=True`),
  so no transposes are paid;
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
  exp(Gamma_t) q_t S_0, exp(Gamma_T) S_0 for the initial state).
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
           log_g: Array | None, s0: Array, scale: float, *, chunk: int,
           interpret, reference: Callable | None = None) -> tuple[Array, Array]:
  """o [B, T, H, V] (q.dtype) and S_T float32 [B, H, K, V] via `kernels`.

  Args:
    kernels: a module with `linear_attention_fwd`, `SUPPORTED_HEAD_DIMS`,
      `SUPPORTED_DTYPES` and, if it has backward kernels,
      `linear_attention_bwd` (kernels_pallas.linear_attention.tpu).
    q, k, v: [B, T, H, K], [B, T, Hkv, K], [B, T, Hkv, V].
    log_g: None or float32 [B, T, H] log-decays <= 0.
    s0: float32 [B, H, K, V] initial state.
    scale: output scale.
    chunk: the kernels' chunk length.
    interpret: passed to the kernels (False or an interpret-params object).
    reference: for kernels without a backward: (q, k, v, log_g, s0, scale)
      -> (o float32, S_T) in this layout, whose VJP gives the gradients (the
      forward still runs the kernel). A module-level function (it is a cache
      key).
  """
  if not hasattr(kernels, "linear_attention_bwd"):
    return _reference_vjp(kernels, float(scale), chunk, interpret, reference)(
        q, k, v, log_g, s0)
  # The backward kernels (and _kernel_vjp's head reductions) are head-major.
  return _forward(kernels, q, k, v, log_g, s0, scale, chunk=chunk,
                  vjp=_kernel_vjp(kernels, float(scale), chunk, interpret),
                  seq_major=False)


@functools.lru_cache(maxsize=None)
def _reference_vjp(kernels: ModuleType, scale: float, chunk: int, interpret,
                   reference: Callable):
  """custom_vjp: the kernel forward, the reference's VJP backward."""
  seq_major = bool(getattr(kernels, "SEQ_MAJOR", False))
  extra = dict(seq_major=True) if seq_major else {}
  fwd_kernel = functools.partial(kernels.linear_attention_fwd, scale=scale,
                                 chunk=chunk, interpret=interpret, **extra)

  def run(q, k, v, g, s0):
    return _forward(kernels, q, k, v, g, s0, scale, chunk=chunk, vjp=fwd_kernel,
                    seq_major=seq_major)

  @jax.custom_vjp
  def f(q, k, v, g, s0):
    return run(q, k, v, g, s0)

  def f_fwd(q, k, v, g, s0):
    return run(q, k, v, g, s0), (q, k, v, g, s0)

  def f_bwd(res, cotangents):
    d_o, d_st = cotangents
    _, pullback = jax.vjp(lambda *a: reference(*a, scale), *res)
    return pullback((d_o.astype(jnp.float32), d_st))

  f.defvjp(f_fwd, f_bwd)
  return f


def _forward(kernels: ModuleType, q: Array, k: Array, v: Array,
             log_g: Array | None, s0: Array, scale: float, *, chunk: int,
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
  s0k = pad(s0, ((0, 0), (0, 0), (0, kp - dk), (0, vp - dv)))
  o, s_t = vjp(qk, kk, vk, gk, s0k)
  if not seq_major:
    o = jnp.swapaxes(o, 1, 2)
  if (tp, vp) != (t, dv):
    o = o[:, :t, :, :dv]
  if (kp, vp) != (dk, dv):
    s_t = s_t[:, :, :dk, :dv]
  return o, s_t


@functools.lru_cache(maxsize=None)
def _kernel_vjp(kernels: ModuleType, scale: float, chunk: int, interpret):
  """custom_vjp function (q, k, v, g, s0) -> (o, S_T) in the kernels' layout."""
  fwd_kernel = functools.partial(kernels.linear_attention_fwd, scale=scale,
                                 chunk=chunk, interpret=interpret)
  bwd_kernel = functools.partial(kernels.linear_attention_bwd, scale=scale,
                                 chunk=chunk, interpret=interpret)

  @jax.custom_vjp
  def f(q, k, v, g, s0):
    return fwd_kernel(q, k, v, g, s0)

  def f_fwd(q, k, v, g, s0):
    o, s_t = fwd_kernel(q, k, v, g, s0)
    return (o, s_t), (q, k, v, g, s0, s_t)

  def f_bwd(res, cotangents):
    q, k, v, g, s0, s_t = res
    d_o, d_st = cotangents
    dq, dk_h, dv_h, ds0 = bwd_kernel(q, k, v, g, s0, d_o.astype(q.dtype),
                                     d_st.astype(jnp.float32))
    b, h, t, dk = q.shape
    hkv = k.shape[1]
    # Per-query-head dk, dv -> kv heads: query head h reads kv head h // group.
    dk_kv = dk_h.reshape(b, hkv, h // hkv, t, dk).sum(axis=2)
    dv_kv = dv_h.reshape(b, hkv, h // hkv, t, v.shape[-1]).sum(axis=2)
    dg = None
    if g is not None:
      k_h = jnp.repeat(k, h // hkv, axis=1).astype(jnp.float32)
      d_gamma = (jnp.sum(q.astype(jnp.float32) * dq, axis=-1)
                 - jnp.sum(k_h * dk_h, axis=-1))                   # [B, H, T]
      d_gamma = d_gamma.at[:, :, -1].add(jnp.sum(d_st * s_t, axis=(-2, -1)))
      dg = jnp.flip(jnp.cumsum(jnp.flip(d_gamma, -1), axis=-1), -1)
    return (dq.astype(q.dtype), dk_kv.astype(k.dtype), dv_kv.astype(v.dtype),
            dg, ds0)

  f.defvjp(f_fwd, f_bwd)
  return f
