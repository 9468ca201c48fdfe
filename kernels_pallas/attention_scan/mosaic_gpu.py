"""Aaren's attention prefix scan for Hopper GPUs, forward and backward, as
Mosaic GPU (Pallas) kernels with a `jax.custom_vjp`.

Forward. Per batch element b and query head h (kv head n = h // G), with
s_j = scale q . k_j and the initial state (m0, u0, w0) standing for the
partial sums Z_{-1} = u0 e^{m0}, N_{-1} = w0 e^{m0}:

  Z_t = Z_{t-1} + e^{s_t},   N_t = N_{t-1} + e^{s_t} v_t,   o_t = N_t / Z_t,

and the final state is (m, u, w) = (max(m0, max_j s_j), Z_T e^{-m}, N_T e^{-m})
(attnlib/ops/attention_scan.py). One CTA (one warpgroup) per (h, b) walks
the chunks of C = 64 tokens in order; an `emit_pipeline` TMA-loads K, V
[C, D], [C, V] double-buffered. Per chunk, with q broadcast to all 64 rows
of an SMEM tile, the wgmma Q K^T gives S[t, j] = s_j (every row the same),
so inside the chunk

  m_t = max(m_c, max_{j<=t} s_j)   (row max of the causally masked S and
                                    the carried max m_c)
  P[t, j] = e^{s_j - m_t}          (j <= t, in (0, 1]; 0 masked)
  u_t = u_c e^{m_c - m_t} + sum_j P[t, j]
  w_t = W_c e^{m_c - m_t} + P V    (wgmma [C, C] @ [C, V] accumulating onto
                                    the scaled carry; P rounded to bf16/f16
                                    as FlashAttention rounds its
                                    probabilities)

is the carried state (m_c, u_c, W_c) combined with the chunk's tokens
j <= t by the associative operator, and o_t = w_t / u_t.
The carry advances with the same combine of the whole chunk (P_full: no
causal mask, a second product whose rows are all equal), so the carry is held
as [C] / [C, V] registers whose rows are identical. P_full enters its wgmma
as two 16-bit operands hi + lo (`_split16`): the carried state keeps ~16
bits of each weight instead of 8, as the state gradients need (dm0 below is
a small difference of large terms). Every exponent is <= 0
and the carried -inf of an empty state only ever enters as e^{-inf} = 0.
Padded tokens (T is padded to a multiple of C) are masked out of every sum.
The forward also writes lse_t = log Z_t = m_t + log u_t per token and the
position of the maximum logit (first occurrence; -1 when m0 is the max).

Backward. With cotangents dO_t and (dm, du, dw) of the final state, write
L = sum_t dO_t . o_t + dm m + du u + dw . w. Since u = Z_T e^{-m}, the
final state contributes e^{-m}(du dZ_T + dw . dN_T) + g_m dm_, where
g_m = dm - du u - dw . w multiplies the derivative of the max itself, which
goes to the arg max (a logit, or m0). Differentiating o_t = N_t / Z_t:

  dN_t = dO_t / Z_t,   dZ_t = -delta_t / Z_t,   delta_t = dO_t . o_t,

and since s_j enters every Z_t, N_t with t >= j, define the reverse sums

  R_j = sum_{t>=j} dO_t e^{-lse_t} + dw e^{-m},
  r_j = sum_{t>=j} delta_t e^{-lse_t} - du e^{-m};

then dv_j = e^{s_j} R_j, ds_j = e^{s_j} (v_j . R_j - r_j) (+ g_m at the arg
max), dq = scale sum_j ds_j k_j, dk_j = scale sum_{g} ds_{j,g} q_g and
dw0 = e^{m0} R_0, du0 = -e^{m0} r_0, dm0 = u0 du0 + w0 . dw0 (+ g_m if m0
is the max). The backward kernel runs this as a reverse scan: one CTA per
(h, b) over the chunks last to first, carrying (rho, R~, r~) with
R = e^{-rho} R~, r = e^{-rho} r~, starting from (m, dw, -du). Inside a chunk
(rows j, columns t >= j), with P[j, t] = e^{s_j - lse_t} (<= 1: s_j <= lse_j
<= lse_t) and dP[j, t] = v_j . dO_t (wgmma V dO^T):

  dv_j = (P dO)_j + e^{s_j - rho} R~,
  ds_j = sum_t P (dP - delta_t) + e^{s_j - rho} (v_j . R~ - r~),

(here the wgmma K Q^T gives S[j, i] = s_j, every column the same) and the
carry moves to rho' = lse_{t0}, the chunk's first (smallest) lse:
R~' = e^{rho' - rho} R~ + E dO, r~' = e^{rho' - rho} r~ + sum_t E delta_t with
E[., t] = e^{rho' - lse_t} (a product whose rows are all equal; E split
into hi + lo 16-bit operands like P_full). Factors
e^{rho' - rho} can exceed 1 only by u <= T (lse_T = m + log u). dq
accumulates over the chunks as a wgmma of ds (broadcast, 16-bit, SMEM,
transposed) with K. XLA computes delta, the group sums of dv (GQA: per query
head float32 from the kernel), dk = scale ds q, the arg max terms and the
initial-state gradients from the final carry.

Limits. delta is taken from the 16-bit o (the FlashAttention practice), so
when an initial state dominates every logit (o_t ~ w0 / u0) dm0, a small
difference of large terms, carries that rounding (~3% at m0 = max + 8).
With GQA each query head has its own CTA and re-reads its kv head (from L2
when the group's CTAs run together); arg max ties go to the first one (jax
splits them).

Head dims of 256. One kernel call takes D, V <= 128 (its [64, V] float32
carry and accumulator fill a warpgroup's registers). `attention_scan`
composes wider calls from narrower ones, exactly:
  * V = 256: the scan is independent per value column given the logits, so
    two calls take v[..., :128] and v[..., 128:] (and the halves of w0) and
    the outputs are concatenated; m and u are the same in both.
  * D = 256: the logits s = scale q . k [B, T, H] are computed by XLA in
    float32, then fed to a call with D = 64 as k'[..., 0:3] = the three
    16-bit parts hi + mid + lo of s (~24 bits, float32's precision; the
    wgmma sums them in float32) against q' = (1, 1, 1, 0, ...), scale 1 and
    one kv head per query head (v repeated over the group). Autodiff carries
    ds from dk'[..., lo] back through the einsum to q and k (hi and mid are
    stop-gradient). Costs an extra read of k and, with GQA, G copies of v.

Interpret mode (`interpret=True`, Mosaic GPU's CPU interpreter, jax 0.11.2)
runs the same kernels with the differences common.py describes: register
wgmma A operands go through SMEM and accumulators start at zero.
"""

from __future__ import annotations

import functools
import math

import jax
from jax import lax
import jax.experimental.pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from kernels_pallas import mosaic_gpu_common as common

SUPPORTED_HEAD_DIMS = (64, 128, 256)  # 256 composed of narrower calls
_KERNEL_DIMS = (64, 128)               # what one kernel call takes
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
_C = 64                   # tokens per chunk
_MASK = common.MASK       # masked logit: finite, so never inf - inf
_TILED = common.TILED
_WGMMA = common.WGMMA
_ROWS = common.ROWS
_COLS = common.COLS
_PARAMS = common.LANE_PARAMS
_bcast = common.bcast
_a_operand = common.a_operand
_products = common.products


def supports(d: int, dv: int, dtype) -> bool:
  """Whether the kernels take head dims (d, dv) and this input dtype."""
  return (d in SUPPORTED_HEAD_DIMS and dv in SUPPORTED_HEAD_DIMS
          and jnp.dtype(dtype) in map(jnp.dtype, SUPPORTED_DTYPES))


def _split16(x, dtype, smems):
  """x (float32, in [0, 1]) as two 16-bit wgmma A operands hi + lo, so that
  a product with them keeps ~16 bits of x (the carried state's weights)."""
  hi = x.astype(dtype)
  lo = (x - hi.astype(jnp.float32)).astype(dtype)
  return _a_operand(hi, smems[0]), _a_operand(lo, smems[1])


def _iota(dim):
  return plgpu.broadcasted_iota(jnp.int32, (_C, _C), dim, layout=_WGMMA)


def _row_max(x):
  return x.max(axis=1)


# ---------------------------------------------------------------- forward ---


def _forward(qb, k, v, m0b, u0b, w0b, *, t, scale, interpret):
  """qb [B, H, C, D] (q in every row), k/v [B, Tp, Hkv, *], m0b/u0b
  [B, H, C], w0b [B, H, C, V] (rows broadcast) -> o [B, Tp, H, V], lse
  [B, H, Tp], state [B, H, 3, C] (m, u, arg max; rows equal), w [B, H, C, V].
  """
  b, h, _, d = qb.shape
  tp, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
  group, n, dtype = h // hkv, tp // _C, qb.dtype
  interp = common.interpret_params(interpret)

  def kernel(q_ref, k_ref, v_ref, m0_ref, u0_ref, w0_ref,
             o_ref, lse_ref, st_ref, wf_ref,
             q_smem, o_smem2, lse_smem2, bar, *maybe_a):
    p_smem, *pf_smems = maybe_a if maybe_a else (None, None, None)
    hh, bb = lax.axis_index("heads"), lax.axis_index("batch")
    kvh = lax.div(hh, jnp.array(group, hh.dtype))
    plgpu.copy_gmem_to_smem(q_ref.at[bb, hh], q_smem, bar)
    init = (plgpu.load(m0_ref.at[bb, hh], layout=_ROWS, optimized=False),
            plgpu.load(u0_ref.at[bb, hh], layout=_ROWS, optimized=False),
            plgpu.load(w0_ref.at[bb, hh], layout=_WGMMA, optimized=False),
            plgpu.layout_cast(jnp.full((_C,), -1.0, jnp.float32), _ROWS))
    plgpu.barrier_wait(bar)

    def body(idx, k_smem, v_smem, carry):
      mc, uc, wc, amax = carry
      (i,) = idx
      t0 = i * _C
      (s,) = _products(
          lambda r: plgpu.wgmma(r, q_smem, k_smem.transpose((1, 0))),
          [(_C, _C)])
      s = s * scale                                   # S[t, j] = s_j
      row, col = _iota(0), _iota(1)
      real = col + t0 < t
      sm = jnp.where((col <= row) & real, s, _MASK)
      sf = jnp.where(real, s, _MASK)
      ml, mlf = _row_max(sm), _row_max(sf)            # finite: col 0 real
      # Every prefix t (and, rows all equal, the whole chunk: the next
      # carry) is the carry combined with the chunk's tokens j <= t, all
      # relative to the combined max: the carry's W, scaled, is the initial
      # value of the wgmma accumulator (fewer live registers).
      m_t, m_n = jnp.maximum(mc, ml), jnp.maximum(mc, mlf)
      p = jnp.exp(sm - _bcast(m_t, (_C, _C), 0))      # 0 where masked
      pf = jnp.exp(sf - _bcast(m_n, (_C, _C), 0))
      ca, fa = jnp.exp(mc - m_t), jnp.exp(mc - m_n)   # e^{-inf} = 0: empty
      u_t = uc * ca + p.sum(axis=1)
      u_n = uc * fa + pf.sum(axis=1)
      p16 = _a_operand(p.astype(dtype), p_smem)
      pf_hi, pf_lo = _split16(pf, dtype, pf_smems)
      def pv(r, rf):
        plgpu.wgmma(r, p16, v_smem)
        plgpu.wgmma(rf, pf_hi, v_smem)
        plgpu.wgmma(rf, pf_lo, v_smem)
      w_t, w_n = common.accumulate(
          pv, (wc * _bcast(ca, (_C, dv), 0), wc * _bcast(fa, (_C, dv), 0)),
          interp)
      o = w_t / _bcast(u_t, (_C, dv), 0)
      # The arg max (first occurrence).
      first = -_row_max(jnp.where(sf == _bcast(mlf, (_C, _C), 0),
                                  -col.astype(jnp.float32), -1e9))
      amax = jnp.where(mlf > mc, first + t0.astype(jnp.float32), amax)
      # o and lse -> SMEM (two buffers) -> TMA stores left in flight.
      slot = lax.rem(i, 2)
      plgpu.wait_smem_to_gmem(2, wait_read_only=True)
      o_smem, lse_smem = o_smem2.at[slot], lse_smem2.at[slot]
      o_smem[...] = o.astype(dtype)
      lse_smem[...] = m_t + jnp.log(u_t)
      plgpu.commit_smem()
      tokens = pl.ds(t0, _C)
      plgpu.copy_smem_to_gmem(o_smem, o_ref.at[bb, tokens, hh])
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bb, hh, tokens])
      return m_n, u_n, w_n, amax

    spec = lambda w: plgpu.BlockSpec((_C, w), lambda i: (i, 0),
                                     transforms=_TILED)
    pipeline = plgpu.emit_pipeline(
        body, grid=(n,), in_specs=[spec(d), spec(dv)], out_specs=[],
        max_concurrent_steps=min(2, n), init_carry=init)
    m, u, w, amax = pipeline(k_ref.at[bb, :, kvh], v_ref.at[bb, :, kvh])
    plgpu.wait_smem_to_gmem(0)

    def store(st_smem, w_smem):
      for r, x in enumerate((m, u, amax)):
        st_smem.at[r][...] = x
      w_smem[...] = w
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(st_smem, st_ref.at[bb, hh])
      plgpu.copy_smem_to_gmem(w_smem, wf_ref.at[bb, hh])
      plgpu.wait_smem_to_gmem(0)
    pl.run_scoped(store, plgpu.SMEM((3, _C), jnp.float32),
                  plgpu.SMEM((_C, dv), jnp.float32))

  scratch = [plgpu.SMEM((_C, d), dtype, transforms=_TILED),
             plgpu.SMEM((2, _C, dv), dtype, transforms=_TILED),
             plgpu.SMEM((2, _C), jnp.float32),
             plgpu.Barrier()]
  if interp is not None:
    scratch += [plgpu.SMEM((_C, _C), dtype, transforms=_TILED)] * 3
  f32 = jnp.float32
  return plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((b, tp, h, dv), dtype),
                jax.ShapeDtypeStruct((b, h, tp), f32),
                jax.ShapeDtypeStruct((b, h, 3, _C), f32),
                jax.ShapeDtypeStruct((b, h, _C, dv), f32)),
      grid=(h, b), grid_names=("heads", "batch"),
      scratch_types=tuple(scratch), compiler_params=_PARAMS,
      interpret=interp,
  )(qb, k, v, m0b, u0b, w0b)


# --------------------------------------------------------------- backward ---


def _backward(qb, k, v, do, lse, delta, rho0, r0, big_r0, *, t, scale,
              interpret):
  """Reverse scan. do [B, Tp, H, V]; lse, delta [B, H, Tp]; rho0, r0
  [B, H, C] and big_r0 [B, H, C, V] the initial carry (rows broadcast) ->
  dv [B, Tp, H, V] (q.dtype if H == Hkv else float32), ds [B, H, Tp],
  dq [B, H, C, D] (rows equal, scale applied), carry [B, H, 2, C] (rho, r~),
  R~ [B, H, C, V]."""
  b, h, _, d = qb.shape
  tp, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
  group, n, dtype = h // hkv, tp // _C, qb.dtype
  dv_dtype = dtype if group == 1 else jnp.float32
  interp = common.interpret_params(interpret)

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, rho_ref, r_ref,
             bigr_ref, dv_ref, ds_ref, dq_ref, st_ref, rf_ref,
             q_smem, dv_smem2, ds_smem2, dsb_smem, bar, *maybe_a):
    p_smem, *e_smems = maybe_a if maybe_a else (None, None, None)
    hh, bb = lax.axis_index("heads"), lax.axis_index("batch")
    kvh = lax.div(hh, jnp.array(group, hh.dtype))
    plgpu.copy_gmem_to_smem(q_ref.at[bb, hh], q_smem, bar)
    init = (plgpu.load(rho_ref.at[bb, hh], layout=_ROWS, optimized=False),
            plgpu.load(bigr_ref.at[bb, hh], layout=_WGMMA, optimized=False),
            plgpu.load(r_ref.at[bb, hh], layout=_ROWS, optimized=False),
            plgpu.layout_cast(jnp.zeros((_C, d), jnp.float32), _WGMMA))
    plgpu.barrier_wait(bar)

    def body(idx, k_smem, v_smem, do_smem, lse_smem, delta_smem, carry):
      rho, big_r, r, dq = carry
      (i,) = idx
      c = n - 1 - i
      t0 = c * _C
      def mma(s_ref, dp_ref):
        plgpu.wgmma(s_ref, k_smem, q_smem.transpose((1, 0)))
        plgpu.wgmma(dp_ref, v_smem, do_smem.transpose((1, 0)))
      s, dp = _products(mma, [(_C, _C), (_C, _C)])
      s = s * scale                                   # S[j, i] = s_j
      lse_t = _bcast(plgpu.load(lse_smem, layout=_COLS), (_C, _C), 1)
      delta_t = _bcast(plgpu.load(delta_smem, layout=_COLS), (_C, _C), 1)
      row, col = _iota(0), _iota(1)
      real_t = col + t0 < t
      vis = (col >= row) & real_t & (row + t0 < t)
      p = jnp.exp(jnp.where(vis, s - lse_t, _MASK))   # P[j, t] <= 1
      rho_n = _row_max(jnp.where(col == 0, lse_t, _MASK))   # lse_{t0}
      e = jnp.exp(jnp.where(real_t, _bcast(rho_n, (_C, _C), 0) - lse_t,
                            _MASK))                   # rows equal, <= 1
      p16 = _a_operand(p.astype(dtype), p_smem)
      e_hi, e_lo = _split16(e, dtype, e_smems)
      def pdo(dv_acc, r_acc):
        plgpu.wgmma(dv_acc, p16, do_smem)
        plgpu.wgmma(r_acc, e_hi, do_smem)
        plgpu.wgmma(r_acc, e_lo, do_smem)
      # Exponent s_j - rho <= 0 for real j; masked for padded ones.
      f = _row_max(jnp.where((col == 0) & (row + t0 < t),
                             s - _bcast(rho, (_C, _C), 0), _MASK))
      f = jnp.exp(f)
      v_rows = plgpu.load(v_smem, layout=_WGMMA).astype(jnp.float32)
      v_r = (v_rows * big_r).sum(axis=1)
      # dv = P dO + e^{s_j - rho} R~; the carry moves to rho_n = lse_{t0}:
      # R~ <- e^{rho_n - rho} R~ + E dO (the accumulators start from R~).
      g = jnp.exp(rho_n - rho)
      dv_, big_r = common.accumulate(
          pdo, (big_r * _bcast(f, (_C, dv), 0), big_r * _bcast(g, (_C, dv), 0)),
          interp)
      ds = (p * (dp - delta_t)).sum(axis=1) + f * (v_r - r)
      r = r * g + (e * delta_t).sum(axis=1)
      # dq += ds K (ds broadcast over rows: SMEM, transposed A operand).
      dsb_smem[...] = _bcast(ds, (_C, _C), 0).astype(dtype)
      plgpu.commit_smem()
      (dq,) = common.accumulate(
          lambda acc: plgpu.wgmma(acc, dsb_smem.transpose((1, 0)), k_smem),
          (dq,), interp)
      slot = lax.rem(i, 2)
      plgpu.wait_smem_to_gmem(2, wait_read_only=True)
      dv_smem, ds_smem = dv_smem2.at[slot], ds_smem2.at[slot]
      dv_smem[...] = dv_.astype(dv_dtype)
      ds_smem[...] = ds
      plgpu.commit_smem()
      tokens = pl.ds(t0, _C)
      plgpu.copy_smem_to_gmem(dv_smem, dv_ref.at[bb, tokens, hh])
      plgpu.copy_smem_to_gmem(ds_smem, ds_ref.at[bb, hh, tokens])
      return rho_n, big_r, r, dq

    rev = lambda i: (n - 1 - i, 0)
    spec = lambda w: plgpu.BlockSpec((_C, w), rev, transforms=_TILED)
    vec = plgpu.BlockSpec((_C,), lambda i: (n - 1 - i,))
    pipeline = plgpu.emit_pipeline(
        body, grid=(n,), in_specs=[spec(d), spec(dv), spec(dv), vec, vec],
        out_specs=[], max_concurrent_steps=min(2, n), init_carry=init)
    rho, big_r, r, dq = pipeline(
        k_ref.at[bb, :, kvh], v_ref.at[bb, :, kvh], do_ref.at[bb, :, hh],
        lse_ref.at[bb, hh], delta_ref.at[bb, hh])
    plgpu.wait_smem_to_gmem(0)

    def store(st_smem, rf_smem, dq_smem):
      st_smem.at[0][...] = rho
      st_smem.at[1][...] = r
      rf_smem[...] = big_r
      dq_smem[...] = dq * scale
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(st_smem, st_ref.at[bb, hh])
      plgpu.copy_smem_to_gmem(rf_smem, rf_ref.at[bb, hh])
      plgpu.copy_smem_to_gmem(dq_smem, dq_ref.at[bb, hh])
      plgpu.wait_smem_to_gmem(0)
    pl.run_scoped(store, plgpu.SMEM((2, _C), jnp.float32),
                  plgpu.SMEM((_C, dv), jnp.float32),
                  plgpu.SMEM((_C, d), jnp.float32))

  dv_transforms = _TILED if dv_dtype == dtype else ()
  scratch = [plgpu.SMEM((_C, d), dtype, transforms=_TILED),
             plgpu.SMEM((2, _C, dv), dv_dtype, transforms=dv_transforms),
             plgpu.SMEM((2, _C), jnp.float32),
             plgpu.SMEM((_C, _C), dtype, transforms=_TILED),
             plgpu.Barrier()]
  if interp is not None:
    scratch += [plgpu.SMEM((_C, _C), dtype, transforms=_TILED)] * 3
  f32 = jnp.float32
  return plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((b, tp, h, dv), dv_dtype),
                jax.ShapeDtypeStruct((b, h, tp), f32),
                jax.ShapeDtypeStruct((b, h, _C, d), f32),
                jax.ShapeDtypeStruct((b, h, 2, _C), f32),
                jax.ShapeDtypeStruct((b, h, _C, dv), f32)),
      grid=(h, b), grid_names=("heads", "batch"),
      scratch_types=tuple(scratch), compiler_params=_PARAMS,
      interpret=interp,
  )(qb, k, v, do, lse, delta, rho0, r0, big_r0)


# ------------------------------------------------------------ custom_vjp ---


def _rows(x, *tail):
  """[B, H, *tail] -> [B, H, C, *tail]: broadcast over a chunk's rows."""
  return jnp.broadcast_to(x[:, :, None], x.shape[:2] + (_C,) + tuple(tail))


def _fwd_call(q, k, v, m0, u0, w0, t, scale, interpret):
  dv = v.shape[-1]
  o, lse, st, wf = _forward(_rows(q, q.shape[-1]), k, v, _rows(m0), _rows(u0),
                            _rows(w0, dv), t=t, scale=scale,
                            interpret=interpret)
  return o, lse, st[:, :, 0, 0], st[:, :, 1, 0], wf[:, :, 0], st[:, :, 2, 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _scan(q, k, v, m0, u0, w0, t, scale, interpret):
  """On T-padded k, v ([B, Tp, Hkv, *], Tp % C == 0); t is the real T.
  Returns (o [B, Tp, H, V], m, u, w)."""
  o, _, m, u, w, _ = _fwd_call(q, k, v, m0, u0, w0, t, scale, interpret)
  return o, m, u, w


def _scan_fwd(q, k, v, m0, u0, w0, t, scale, interpret):
  o, lse, m, u, w, amax = _fwd_call(q, k, v, m0, u0, w0, t, scale, interpret)
  return (o, m, u, w), (q, k, v, m0, u0, w0, o, lse, m, u, w, amax)


def _scan_bwd(t, scale, interpret, res, cts):
  q, k, v, m0, u0, w0, o, lse, m, u, w, amax = res
  do, dm, du, dw = cts
  b, h, d = q.shape
  tp, hkv, dv_dim = k.shape[1], k.shape[2], v.shape[-1]
  group = h // hkv
  do = do.astype(q.dtype)
  delta = jnp.einsum("bthv,bthv->bht", do.astype(jnp.float32),
                     o.astype(jnp.float32))
  dv, ds, dq, st, rf = _backward(
      _rows(q, d), k, v, do, lse, delta, _rows(m), _rows(-du),
      _rows(dw, dv_dim), t=t, scale=scale, interpret=interpret)
  rho, r, big_r, dq = st[:, :, 0, 0], st[:, :, 1, 0], rf[:, :, 0], dq[:, :, 0]
  # The derivative of the max goes to the arg max: a logit or m0.
  g_m = dm - du * u - jnp.sum(dw * w, axis=-1)              # [B, H]
  pos = amax.astype(jnp.int32)                             # -1: m0
  on_token = pos >= 0
  ds = ds + jnp.where(on_token[..., None] & (
      jnp.arange(tp)[None, None] == pos[..., None]), g_m[..., None], 0.0)
  kvh = jnp.arange(h) // group
  k_max = k[jnp.arange(b)[:, None], jnp.maximum(pos, 0), kvh[None, :]]
  dq = dq + scale * jnp.where(on_token, g_m, 0.0)[..., None] * k_max.astype(
      jnp.float32)
  ds_g = ds.reshape(b, hkv, group, tp)
  dk = scale * jnp.einsum("bngt,bngd->btnd", ds_g,
                          q.reshape(b, hkv, group, d).astype(jnp.float32))
  if group > 1:
    dv = dv.astype(jnp.float32).reshape(b, tp, hkv, group, dv_dim).sum(3)
  # Initial state: R_0 = e^{-rho} R~, r_0 = e^{-rho} r~ (m0 = -inf -> 0).
  e0 = jnp.exp(jnp.where(jnp.isneginf(m0), -jnp.inf, m0 - rho))
  dw0 = e0[..., None] * big_r
  du0 = -e0 * r
  dm0 = (u0 * du0 + jnp.sum(w0 * dw0, axis=-1)
         + jnp.where(on_token, 0.0, g_m))
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
          dm0, du0, dw0)


_scan.defvjp(_scan_fwd, _scan_bwd)


def _fail(name, value, expected):
  raise ValueError(f"attention_scan (mosaic_gpu): {name}={value} unsupported: "
                   f"expected {expected}")


def _check(q, k, v, m0, u0, w0, scale):
  for name, x, rank in (("q", q, 3), ("k", k, 4), ("v", v, 4), ("m0", m0, 2),
                        ("u0", u0, 2), ("w0", w0, 3)):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      _fail(name, type(x).__name__, "an array")
    if x.ndim != rank:
      _fail(f"{name}.shape", tuple(x.shape), f"rank {rank}")
  b, h, d = q.shape
  _, t, hkv, _ = k.shape
  dv = v.shape[-1]
  if jnp.dtype(q.dtype) not in map(jnp.dtype, SUPPORTED_DTYPES):
    _fail("q.dtype", q.dtype, "bfloat16 or float16")
  for name, x in (("k", k), ("v", v)):
    if x.dtype != q.dtype:
      _fail(f"{name}.dtype", x.dtype, f"{q.dtype}, like q")
  if d not in SUPPORTED_HEAD_DIMS:
    _fail("q.shape[-1] (D)", d, f"one of {SUPPORTED_HEAD_DIMS}")
  if dv not in SUPPORTED_HEAD_DIMS:
    _fail("v.shape[-1] (V)", dv, f"one of {SUPPORTED_HEAD_DIMS}")
  if t < 1 or k.shape != (b, t, hkv, d):
    _fail("k.shape", tuple(k.shape), f"(B={b}, T>=1, Hkv, D={d})")
  if hkv < 1 or h % hkv:
    _fail("k.shape[2] (Hkv)", hkv, f"a divisor of H={h}")
  if tuple(v.shape[:3]) != (b, t, hkv):
    _fail("v.shape", tuple(v.shape), f"({b}, {t}, {hkv}, V), like k")
  for name, x, shape in (("m0", m0, (b, h)), ("u0", u0, (b, h)),
                         ("w0", w0, (b, h, dv))):
    if tuple(x.shape) != shape:
      _fail(f"{name}.shape", tuple(x.shape), shape)
    if x.dtype != jnp.float32:
      _fail(f"{name}.dtype", x.dtype, "float32")
  if (isinstance(scale, bool) or not isinstance(scale, (int, float))
      or not math.isfinite(scale)):
    _fail("scale", repr(scale), "a finite Python float")


def attention_scan(q, k, v, m0, u0, w0, *, scale, interpret=False):
  """All prefix outputs and the final state (module docstring), on Hopper.

  Args:
    q: [B, H, D] bfloat16 or float16, D in SUPPORTED_HEAD_DIMS.
    k: [B, T, Hkv, D], v: [B, T, Hkv, V], q's dtype; H % Hkv == 0.
    m0, u0: float32 [B, H]; w0: float32 [B, H, V]: the initial state
      (-inf, 0, 0 is the empty one).
    scale: Python float multiplying q . k.
    interpret: False, True (`plgpu.InterpretGPUParams()`) or an
      `InterpretGPUParams`: Mosaic GPU interpret mode on CPU.

  Returns:
    (o [B, T, H, V] q.dtype, m [B, H], u [B, H], w [B, H, V] float32),
    differentiable w.r.t. q, k, v, m0, u0, w0 (backward: a reverse-scan
    kernel).

  Raises:
    ValueError: a non-array, wrong rank/shape, dtype other than bf16/f16
      (float32 included) or mixed, D or V not in (64, 128, 256), H not a multiple
      of Hkv, a state that is not float32 of the shapes above, a bad scale.
  """
  _check(q, k, v, m0, u0, w0, scale)
  half = _KERNEL_DIMS[-1]
  if q.shape[-1] > half:    # logits by XLA, passed as a D = 64 surrogate key
    q1, k1, v1 = _logit_surrogate(q, k, v, scale)
    return attention_scan(q1, k1, v1, m0, u0, w0, scale=1.0,
                          interpret=interpret)
  if v.shape[-1] > half:    # two calls over the halves of the value columns
    o1, m, u, w1 = attention_scan(q, k, v[..., :half], m0, u0, w0[..., :half],
                                  scale=scale, interpret=interpret)
    o2, _, _, w2 = attention_scan(q, k, v[..., half:], m0, u0, w0[..., half:],
                                  scale=scale, interpret=interpret)
    return (jnp.concatenate([o1, o2], -1), m, u, jnp.concatenate([w1, w2], -1))
  return _attention_scan_narrow(q, k, v, m0, u0, w0, scale, interpret)


def _logit_surrogate(q, k, v, scale):
  """(q', k', v') with q' . k'_j = scale q . k_j to ~24 bits, D' = 64, one kv
  head per query head (module docstring, "Head dims of 256")."""
  b, h, _ = q.shape
  t, hkv = k.shape[1], k.shape[2]
  g = h // hkv
  qg = q.reshape(b, hkv, g, -1).astype(jnp.float32)
  s = scale * jnp.einsum("bngd,btnd->btng", qg, k.astype(jnp.float32),
                         precision=lax.Precision.HIGHEST).reshape(b, t, h)
  hi = lax.stop_gradient(s).astype(q.dtype)
  mid = (lax.stop_gradient(s) - hi.astype(jnp.float32)).astype(q.dtype)
  lo = (s - lax.stop_gradient(hi.astype(jnp.float32) + mid.astype(jnp.float32))
        ).astype(q.dtype)
  k1 = jnp.pad(jnp.stack([hi, mid, lo], axis=-1),          # [B, T, H, 64]
               ((0, 0), (0, 0), (0, 0), (0, _KERNEL_DIMS[0] - 3)))
  q1 = jnp.zeros((b, h, _KERNEL_DIMS[0]), q.dtype).at[..., :3].set(1)
  return q1, k1, jnp.repeat(v, g, axis=2)


def _attention_scan_narrow(q, k, v, m0, u0, w0, scale, interpret):
  """`attention_scan` for D, V in _KERNEL_DIMS: one forward kernel call."""
  t = k.shape[1]
  tp = -(-t // _C) * _C
  if tp != t:
    pad = lambda x: jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    k, v = pad(k), pad(v)
  o, m, u, w = _scan(q, k, v, m0, u0, w0, t, float(scale), interpret)
  return o[:, :t], m, u, w
