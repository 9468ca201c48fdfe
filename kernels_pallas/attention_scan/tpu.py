"""Aaren's attention prefix scan as Pallas TPU (Mosaic) kernels, fwd + bwd.

Forward. For batch b and query head h (kv head n = h // G, G = H // Hkv) with
logits s_j = scale q . k_j, the initial state (m0, u0, w0) stands for the sums
Z_{-1} = u0 e^{m0} and N_{-1} = w0 e^{m0}, and

  Z_t = Z_{t-1} + e^{s_t},   N_t = N_{t-1} + e^{s_t} v_t,   o_t = N_t / Z_t.

Stably: m_t = max(m0, max_{j<=t} s_j), u_t = Z_t e^{-m_t}, w_t = N_t e^{-m_t};
the final state is (m, u, w) at t = T - 1 (attnlib/ops/attention_scan.py).

Grid (B, H / P, T / L): P query heads sharing one kv head are done together
(P = the largest divisor of G that is <= 8, padded to 8 rows so that Q K^T is
an [8, D] x [C, D]^T matmul), L tokens per grid step (the time axis is
"arbitrary": the carry (m, u, w) lives in VMEM scratch; batch and heads are
"parallel"). A step walks its L / C chunks of C tokens (128 on TPU) in order.
Per chunk and head, with s the chunk's logits on lanes:

  mp_t = max_{j<=t} s_j                      (row max of the causally masked
  m_t  = max(m_c, mp_t)                       [C, C] broadcast of s)
  P_tj = e^{s_j - m_t} (j <= t, else 0)      every exponent <= 0
  u_t  = u_c e^{m_c - m_t} + sum_j P_tj
  w_t  = w_c e^{m_c - m_t} + (P V)_t         one [C, C] @ [C, V] MXU matmul

and o_t = w_t / u_t, carry <- row C - 1. The reference is the per-row
running max m_t, not the chunk max: with the chunk max, a row whose prefix
lies ~100 below a later logit of the chunk would underflow to 0 / 0. The
empty state (m_c = -inf) only ever enters as e^{-inf} = 0. The forward also
writes lse_t = log Z_t = m_t + log u_t (a row per head and chunk) for the
backward; lse is non-decreasing in t and lse_t >= s_j for every j <= t.

Backward. With alpha_tj = e^{s_j - lse_t} (j <= t), cotangents do_t for the
outputs and (dm, du, dw) for the final state, delta_t = do_t . o_t and
r = m (final):

  dv_j = sum_{t>=j} alpha_tj do_t + e^{s_j - r} dw
  ds_j = sum_{t>=j} alpha_tj (do_t . v_j - delta_t)
         + e^{s_j - r} (du + dw . v_j) + g [j is the argmax]
  g    = dm - u du - w . dw               (u, w: the final state)
  dq   = scale sum_j ds_j k_j,   dk_j = scale sum_{h in group} ds_j q_h.

The last term is the derivative through m = max(...): u and w are relative
to m, so m moves them too (for a loss of u e^m and w e^m only, g = 0). Ties
go to the last occurrence (jax.grad of the xla implementation splits them).
The initial state enters like a token of logit m0, count u0 and value w0,
with beta_t = e^{m0 - lse_t}:

  dw0 = sum_t beta_t do_t + e^{m0 - r} dw
  du0 = -sum_t beta_t delta_t + e^{m0 - r} du
  dm0 = w0 . dw0 + u0 du0 + g [no token attains r]

so m0 = -inf (nothing seen) gives exact zeros. The sums over the future
t >= j run as a reverse scan over the chunks (grid steps in reverse) with the
carry (lam, A, B) = sum_{t later} e^{lam - lse_t} (do_t, delta_t), started
from the final-state terms (lam, A, B) = (r, dw, -du). For the chunk being
processed, keys j on rows and queries t on lanes:

  PT_jt = e^{s_j - lse_t} (j <= t)            [C, C]
  ds_j  = sum_t PT_jt ((V dO^T)_jt - delta_t) + e^{s_j - lam} (v_j . A - B)
  dv    = PT dO + e^{s - lam} A              one [C, C] @ [C, V] matmul
  lam' = min(lam, lse_0)                      (lse_0: the chunk's first row)
  A'   = e^{lam' - lam} A + sum_t e^{lam' - lse_t} do_t
  B'   = e^{lam' - lam} B + sum_t e^{lam' - lse_t} delta_t

so every exponent stays <= 0 (s_j <= lam because lse is non-decreasing and
lam starts at the max). After the first chunk the carry gives dw0 = e^{m0 -
lam} A and du0 = -e^{m0 - lam} B. dq accumulates in VMEM over the sweep; dk,
dv sum the P heads of the step (and XLA sums the G / P steps of a kv head).

Padding: T is padded to a multiple of L with zeros; padded tokens are masked
out of every max, sum and carry, chunks with no real token are skipped.
Precision: float32 accumulation; bf16 matmul operands stay bf16 (P and PT
are rounded to bf16 before their V / dO matmul, as in FlashAttention),
float32 inputs use Precision.HIGHEST. o leaves in q.dtype, the state float32.
Layout: k, v, o are used as [B, T, heads * dim] (a free reshape), so no
transpose of the sequence is needed.
"""

from __future__ import annotations

import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np

from kernels_pallas.local_attention import _tpu_common as common

SUPPORTED_HEAD_DIMS = (128, 256)
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)
_LANES, _NN, _NT = common.LANES, common.NN, common.NT
_dot, _precision, _is_int = common.dot, common.precision, common.is_int
_FN = "attention_scan"
_ROWS = 8  # query heads of a step, padded (sublanes of an f32 vreg)
_HIGHEST = lax.Precision.HIGHEST


def supports(d: int, dv: int, dtype) -> bool:
  """Whether these kernels take q/k head dim d, v head dim dv and dtype."""
  try:
    dt = jnp.dtype(dtype)
  except TypeError:
    return False
  return (d in SUPPORTED_HEAD_DIMS and dv in SUPPORTED_HEAD_DIMS
          and any(dt == jnp.dtype(x) for x in SUPPORTED_DTYPES))


def heads_per_step(groups: int) -> int:
  """The largest divisor of G = H // Hkv that is <= 8."""
  return max(p for p in range(1, _ROWS + 1) if groups % p == 0)


def default_block(t: int, heads: int, dv: int, dtype, chunk: int = 128) -> int:
  """Tokens per grid step: a multiple of chunk, <= 1024, an o block <= 1 MiB."""
  itemsize = jnp.dtype(dtype).itemsize
  cap = (1 << 20) // (heads * dv * itemsize) // chunk * chunk
  return max(chunk, min(1024, cap, -(-t // chunk) * chunk))


# ---------------------------------------------------------------------------
# In-kernel helpers.
# ---------------------------------------------------------------------------


def _logits(q_ref, k, scale, precision):
  """[8, C] float32 logits of the step's heads (same code in fwd and bwd, so
  the backward sees the forward's values bit for bit)."""
  return scale * _dot(q_ref[...], k, _NT, precision)


def _to_row(col, eye):
  """[C, 1] -> [1, C] through the diagonal (exact: adds zeros only)."""
  return jnp.sum(jnp.where(eye, col, 0.0), axis=0, keepdims=True)


def _to_col(row, eye):
  """[1, C] -> [C, 1] likewise."""
  return jnp.sum(jnp.where(eye, row, 0.0), axis=1, keepdims=True)


def _chunks(n, body):
  """Runs body(c) for c in 0..n-1 (a loop when n > 1)."""
  if n == 1:
    body(0)
  else:
    lax.fori_loop(0, n, lambda c, carry: (body(c), carry)[1], 0)


# ---------------------------------------------------------------------------
# Forward kernel.
# ---------------------------------------------------------------------------


def _fwd_kernel(q_ref, k_ref, v_ref, m0_ref, u0_ref, w0_ref, *refs, t_len,
                heads, chunk, n_chunks, dv, scale, precision, save_lse):
  """One (b, head group, time block) step; the carry is in m/u/w_sc."""
  if save_lse:
    o_ref, lse_ref, mt_ref, ut_ref, wt_ref, m_sc, u_sc, w_sc = refs
  else:
    o_ref, mt_ref, ut_ref, wt_ref, m_sc, u_sc, w_sc = refs
    lse_ref = None
  ti = pl.program_id(2)

  @pl.when(ti == 0)
  def _init():
    m_sc[...] = jnp.broadcast_to(m0_ref[...], m_sc.shape)
    u_sc[...] = jnp.broadcast_to(u0_ref[...], u_sc.shape)
    w_sc[...] = w0_ref[...]

  c_ = chunk
  row = lax.broadcasted_iota(jnp.int32, (c_, c_), 0)  # t
  col = lax.broadcasted_iota(jnp.int32, (c_, c_), 1)  # j
  causal, eye = col <= row, col == row
  lane = lax.broadcasted_iota(jnp.int32, (1, c_), 1)

  def chunk_body(c):
    tok0 = (ti * n_chunks + c) * c_

    @pl.when(tok0 < t_len)  # chunks of padding only are skipped
    def _():
      start = pl.multiple_of(c * c_, c_)
      k = k_ref[pl.ds(start, c_), :]
      v = v_ref[pl.ds(start, c_), :]
      s_all = _logits(q_ref, k, scale, precision)  # [8, C]
      mask = causal & (tok0 + lane < t_len)
      for g in range(heads):
        sm = jnp.where(mask, s_all[g:g + 1, :], -jnp.inf)  # [C(t), C(j)]
        m_c = m_sc[g:g + 1, 0:1]  # [1, 1]
        m = jnp.maximum(m_c, jnp.max(sm, axis=1, keepdims=True))  # [C, 1]
        p = jnp.exp(sm - m)  # 0 where masked
        carry = jnp.exp(m_c - m)  # [C, 1], 0 for an empty carry
        u = carry * u_sc[g:g + 1, 0:1] + jnp.sum(p, axis=1, keepdims=True)
        w = carry * w_sc[g:g + 1, :] + _dot(p.astype(v.dtype), v, _NN,
                                            precision)  # [C, V]
        pos = u > 0
        o = jnp.where(pos, w / jnp.where(pos, u, 1.0), 0.0)
        o_ref[pl.ds(start, c_), g * dv:(g + 1) * dv] = o.astype(o_ref.dtype)
        if lse_ref is not None:
          lse_ref[c, g:g + 1, :] = _to_row(m + jnp.log(u), eye)
        m_sc[g:g + 1, :] = jnp.broadcast_to(m[c_ - 1:, :], (1, _LANES))
        u_sc[g:g + 1, :] = jnp.broadcast_to(u[c_ - 1:, :], (1, _LANES))
        w_sc[g:g + 1, :] = w[c_ - 1:, :]

  _chunks(n_chunks, chunk_body)

  @pl.when(ti == pl.num_programs(2) - 1)
  def _final():
    mt_ref[...] = m_sc[:, 0:1]
    ut_ref[...] = u_sc[:, 0:1]
    wt_ref[...] = w_sc[...]


# ---------------------------------------------------------------------------
# Backward kernel: the reverse scan.
# ---------------------------------------------------------------------------


def _bwd_kernel(q_ref, k_ref, v_ref, o_ref, do_ref, lse_ref, m0_ref, u0_ref,
                w0_ref, mt_ref, ut_ref, wt_ref, dmt_ref, dut_ref, dwt_ref,
                dq_ref, dk_ref, dv_ref, dm0_ref, du0_ref, dw0_ref,
                lam_sc, a_sc, b_sc, g_sc, flag_sc, dq_sc, *, t_len, heads,
                chunk, n_chunks, dv, scale, precision):
  """One (b, head group, time block N - 1 - ti) step of the reverse sweep."""
  ti = pl.program_id(2)
  blk = pl.num_programs(2) - 1 - ti
  bcast = lambda x: jnp.broadcast_to(x, (x.shape[0], _LANES))

  @pl.when(ti == 0)
  def _init():  # the final state's terms: (lam, A, B) = (r, dw, -du)
    lam_sc[...] = bcast(mt_ref[...])
    a_sc[...] = dwt_ref[...]
    b_sc[...] = bcast(-dut_ref[...])
    g_sc[...] = bcast(dmt_ref[...] - ut_ref[...] * dut_ref[...] - jnp.sum(
        wt_ref[...] * dwt_ref[...], axis=1, keepdims=True))
    flag_sc[...] = jnp.zeros(flag_sc.shape, jnp.float32)
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  c_ = chunk
  row = lax.broadcasted_iota(jnp.int32, (c_, c_), 0)  # j (key)
  col = lax.broadcasted_iota(jnp.int32, (c_, c_), 1)  # t (query position)
  upper, eye = row <= col, row == col
  sub = lax.broadcasted_iota(jnp.int32, (c_, 1), 0)
  sub_f = sub.astype(jnp.float32)
  lane = lax.broadcasted_iota(jnp.int32, (1, c_), 1)
  q32 = q_ref[...].astype(jnp.float32)

  def chunk_body(i):
    c = n_chunks - 1 - i  # chunks in reverse too
    tok0 = (blk * n_chunks + c) * c_

    @pl.when(tok0 < t_len)
    def _():
      start = pl.multiple_of(c * c_, c_)
      k = k_ref[pl.ds(start, c_), :]
      v = v_ref[pl.ds(start, c_), :]
      k32, v32 = k.astype(jnp.float32), v.astype(jnp.float32)
      s_all = _logits(q_ref, k, scale, precision)  # [8, C]
      valid_col = tok0 + sub < t_len  # [C, 1] (j)
      valid_row = tok0 + lane < t_len  # [1, C] (t)
      mask = upper & valid_col & valid_row
      dk = jnp.zeros(k.shape, jnp.float32)
      dvc = jnp.zeros(v.shape, jnp.float32)
      for g in range(heads):
        s_col = _to_col(s_all[g:g + 1, :], eye)  # [C, 1]
        lse = lse_ref[c, g:g + 1, :]  # [1, C]
        do = do_ref[pl.ds(start, c_), g * dv:(g + 1) * dv]  # [C, V]
        o = o_ref[pl.ds(start, c_), g * dv:(g + 1) * dv]
        delta = _to_row(jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32),
                                axis=1, keepdims=True), eye)  # [1, C]
        delta = jnp.where(valid_row, delta, 0.0)
        pt = jnp.exp(jnp.where(mask, s_col - lse, -jnp.inf))  # [C(j), C(t)]
        dpt = _dot(v, do, _NT, precision)  # v_j . do_t
        ds = jnp.sum(pt * (dpt - delta), axis=1, keepdims=True)  # [C, 1]
        dvc = dvc + _dot(pt.astype(do.dtype), do, _NN, precision)
        # Later chunks (and the final state) through the carry.
        lam, a, b = lam_sc[g:g + 1, 0:1], a_sc[g:g + 1, :], b_sc[g:g + 1, 0:1]
        e = jnp.exp(jnp.where(valid_col, s_col - lam, -jnp.inf))  # [C, 1]
        ds = ds + e * (jnp.sum(v32 * a, axis=1, keepdims=True) - b)
        dvc = dvc + e * a
        # The max's derivative, to the last token attaining r.
        tie = valid_col & (s_col == mt_ref[g:g + 1, :])
        last = jnp.max(jnp.where(tie, sub_f, -1.0), axis=0, keepdims=True)
        flag = flag_sc[g:g + 1, 0:1]
        hit = (sub_f == last) & (flag == 0.0)
        ds = ds + jnp.where(hit, g_sc[g:g + 1, 0:1], 0.0)
        flag_sc[g:g + 1, :] = bcast(
            jnp.maximum(flag, (last >= 0).astype(jnp.float32)))
        # Carry <- this chunk, relative to lam' = min(lam, lse of its row 0).
        lam2 = jnp.minimum(lam, lse[:, 0:1])
        f = jnp.exp(jnp.where(valid_row, lam2 - lse, -jnp.inf))  # [1, C]
        rescale = jnp.exp(lam2 - lam)
        f8 = jnp.broadcast_to(f, (_ROWS, c_))
        a_sc[g:g + 1, :] = rescale * a + _dot(
            f8, do.astype(jnp.float32), _NN, _HIGHEST)[0:1, :]
        b_sc[g:g + 1, :] = bcast(rescale * b + jnp.sum(f * delta, axis=1,
                                                       keepdims=True))
        lam_sc[g:g + 1, :] = bcast(lam2)
        dk = dk + ds * q32[g:g + 1, :]
        dq_sc[g:g + 1, :] += jnp.sum(ds * k32, axis=0, keepdims=True)
      dk_ref[pl.ds(start, c_), :] = (scale * dk).astype(dk_ref.dtype)
      dv_ref[pl.ds(start, c_), :] = dvc.astype(dv_ref.dtype)

  _chunks(n_chunks, chunk_body)

  @pl.when(ti == pl.num_programs(2) - 1)
  def _final():  # the initial state is the token before the first
    e0 = jnp.exp(m0_ref[...] - lam_sc[:, 0:1])  # [8, 1]; 0 for m0 = -inf
    dw0 = e0 * a_sc[...]
    du0 = -e0 * b_sc[:, 0:1]
    dm0 = (jnp.sum(w0_ref[...] * dw0, axis=1, keepdims=True)
           + u0_ref[...] * du0
           + jnp.where(flag_sc[:, 0:1] == 0.0, g_sc[:, 0:1], 0.0))
    dw0_ref[...] = dw0
    du0_ref[...] = du0
    dm0_ref[...] = dm0
    dq_ref[...] = scale * dq_sc[...]


# ---------------------------------------------------------------------------
# pallas_call builders. Kernel layouts: q [B, NG, 8, D]; k, v [B, Tp, Hkv*X];
# o, do [B, Tp, H*V]; lse [B, NG, Tp / C, 8, C]; states [B, NG, 8, 1 | V]
# (NG = H / P head groups, rows >= P padding).
# ---------------------------------------------------------------------------

_PARAMS = pltpu.CompilerParams(
    dimension_semantics=("parallel", "parallel", "arbitrary"))


def _specs(cfg, reverse=False):
  """BlockSpecs of the time blocks, the head-group rows and the states."""
  b, ng, p, gpk, blk, n_t, d, dv, n_c, chunk = (
      cfg[x] for x in ("b", "ng", "p", "gpk", "block", "n_t", "d", "dv",
                       "n_chunks", "chunk"))
  sq = pl.Squeezed()
  tb = (lambda ti: n_t - 1 - ti) if reverse else (lambda ti: ti)
  return dict(
      q=pl.BlockSpec((sq, sq, _ROWS, d), lambda bi, hi, ti: (bi, hi, 0, 0)),
      k=pl.BlockSpec((sq, blk, d), lambda bi, hi, ti: (bi, tb(ti), hi // gpk)),
      v=pl.BlockSpec((sq, blk, dv), lambda bi, hi, ti: (bi, tb(ti), hi // gpk)),
      o=pl.BlockSpec((sq, blk, p * dv), lambda bi, hi, ti: (bi, tb(ti), hi)),
      kg=pl.BlockSpec((sq, blk, d), lambda bi, hi, ti: (bi, tb(ti), hi)),
      vg=pl.BlockSpec((sq, blk, dv), lambda bi, hi, ti: (bi, tb(ti), hi)),
      lse=pl.BlockSpec((sq, sq, n_c, _ROWS, chunk),
                       lambda bi, hi, ti: (bi, hi, tb(ti), 0, 0)),
      s1=pl.BlockSpec((sq, sq, _ROWS, 1), lambda bi, hi, ti: (bi, hi, 0, 0)),
      sv=pl.BlockSpec((sq, sq, _ROWS, dv), lambda bi, hi, ti: (bi, hi, 0, 0)),
  )


def _kw(cfg):
  return dict(t_len=cfg["t"], heads=cfg["p"], chunk=cfg["chunk"],
              n_chunks=cfg["n_chunks"], dv=cfg["dv"], scale=cfg["scale"],
              precision=_precision(cfg["dtype"]))


def _fwd_call(q, k, v, m0, u0, w0, cfg, save_lse):
  b, ng, tp, d, dv = cfg["b"], cfg["ng"], cfg["tp"], cfg["d"], cfg["dv"]
  sp = _specs(cfg)
  f32 = jnp.float32
  st1 = jax.ShapeDtypeStruct((b, ng, _ROWS, 1), f32)
  out_specs = [sp["o"]] + ([sp["lse"]] if save_lse else []) + [
      sp["s1"], sp["s1"], sp["sv"]]
  out_shape = [jax.ShapeDtypeStruct((b, tp, ng * cfg["p"] * dv), q.dtype)] + (
      [jax.ShapeDtypeStruct((b, ng, tp // cfg["chunk"], _ROWS, cfg["chunk"]),
                            f32)] if save_lse else []) + [
          st1, st1, jax.ShapeDtypeStruct((b, ng, _ROWS, dv), f32)]
  tokens = b * ng * cfg["p"] * tp
  isz = jnp.dtype(q.dtype).itemsize
  return pl.pallas_call(
      functools.partial(_fwd_kernel, save_lse=save_lse, **_kw(cfg)),
      grid=(b, ng, cfg["n_t"]),
      in_specs=[sp["q"], sp["k"], sp["v"], sp["s1"], sp["s1"], sp["sv"]],
      out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((_ROWS, _LANES), f32),
                      pltpu.VMEM((_ROWS, _LANES), f32),
                      pltpu.VMEM((_ROWS, dv), f32)],
      compiler_params=_PARAMS,
      cost_estimate=pl.CostEstimate(
          flops=2 * tokens * (cfg["chunk"] * dv + _ROWS * d // cfg["p"]),
          transcendentals=tokens * (cfg["chunk"] + 2),
          bytes_accessed=isz * (ng * (k.size + v.size) + tokens * dv)),
      interpret=cfg["interpret"],
      name="attention_scan_fwd",
  )(q, k, v, m0, u0, w0)


def _bwd_call(res, dos, cfg):
  q, k, v, m0, u0, w0, o, lse, mt, ut, wt = res
  do, dmt, dut, dwt = dos
  b, ng, tp, d, dv, p = (cfg[x] for x in ("b", "ng", "tp", "d", "dv", "p"))
  sp = _specs(cfg, reverse=True)
  f32 = jnp.float32
  gdt = q.dtype if cfg["gpk"] == 1 else f32  # partial sums over a kv head
  st1 = jax.ShapeDtypeStruct((b, ng, _ROWS, 1), f32)
  tokens = b * ng * p * tp
  isz = jnp.dtype(q.dtype).itemsize
  s1, sv = sp["s1"], sp["sv"]
  return pl.pallas_call(
      functools.partial(_bwd_kernel, **_kw(cfg)),
      grid=(b, ng, cfg["n_t"]),
      in_specs=[sp["q"], sp["k"], sp["v"], sp["o"], sp["o"], sp["lse"],
                s1, s1, sv, s1, s1, sv, s1, s1, sv],
      out_specs=[sp["q"], sp["kg"], sp["vg"], s1, s1, sv],
      out_shape=[jax.ShapeDtypeStruct((b, ng, _ROWS, d), f32),
                 jax.ShapeDtypeStruct((b, tp, ng * d), gdt),
                 jax.ShapeDtypeStruct((b, tp, ng * dv), gdt),
                 st1, st1, jax.ShapeDtypeStruct((b, ng, _ROWS, dv), f32)],
      scratch_shapes=[pltpu.VMEM((_ROWS, _LANES), f32),
                      pltpu.VMEM((_ROWS, dv), f32),
                      pltpu.VMEM((_ROWS, _LANES), f32),
                      pltpu.VMEM((_ROWS, _LANES), f32),
                      pltpu.VMEM((_ROWS, _LANES), f32),
                      pltpu.VMEM((_ROWS, d), f32)],
      compiler_params=_PARAMS,
      cost_estimate=pl.CostEstimate(
          flops=4 * tokens * cfg["chunk"] * dv,
          transcendentals=tokens * (cfg["chunk"] + 3),
          bytes_accessed=isz * (2 * ng * (k.size + v.size) + 2 * tokens * dv)),
      interpret=cfg["interpret"],
      name="attention_scan_bwd",
  )(q, k, v, o, do, lse, m0, u0, w0, mt, ut, wt, dmt, dut, dwt)


# ---------------------------------------------------------------------------
# Public entry point.
# ---------------------------------------------------------------------------


def _raise(name, got, want):
  raise ValueError(f"{_FN}: {name} is {got!r}; expected {want}.")


def _shape(x):
  return tuple(x.shape) if hasattr(x, "shape") else type(x).__name__


def _check_args(q, k, v, m0, u0, w0, scale, interpret, chunk, block):
  """Validates everything before tracing; returns (chunk, block)."""
  for name, x, rank in (("q", q, 3), ("k", k, 4), ("v", v, 4)):
    if getattr(x, "ndim", None) != rank or not hasattr(x, "dtype"):
      _raise(f"{name}.shape", _shape(x), f"rank {rank}")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not any(jnp.dtype(x.dtype) == jnp.dtype(s) for s in SUPPORTED_DTYPES):
      _raise(f"{name}.dtype", str(x.dtype), "float32 or bfloat16")
  if not q.dtype == k.dtype == v.dtype:
    _raise("k.dtype/v.dtype", (str(k.dtype), str(v.dtype)),
           f"q.dtype {q.dtype}")
  bsz, h, d = q.shape
  _, t, hkv, _ = k.shape
  if k.shape[0] != bsz or t < 1 or k.shape[3] != d:
    _raise("k.shape", _shape(k), f"[B={bsz}, T >= 1, Hkv, D={d}]")
  if tuple(v.shape[:3]) != tuple(k.shape[:3]):
    _raise("v.shape", _shape(v), f"[{bsz}, {t}, {hkv}, V] (matching k)")
  if hkv < 1 or h % hkv:
    _raise("k.shape[2] (Hkv)", hkv, f"a divisor of H={h}")
  if d not in SUPPORTED_HEAD_DIMS:
    _raise("q.shape[-1] (D)", d, f"one of {SUPPORTED_HEAD_DIMS}")
  dv = v.shape[-1]
  if dv not in SUPPORTED_HEAD_DIMS:
    _raise("v.shape[-1] (V)", dv, f"one of {SUPPORTED_HEAD_DIMS}")
  for name, x, shape in (("m0", m0, (bsz, h)), ("u0", u0, (bsz, h)),
                         ("w0", w0, (bsz, h, dv))):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      _raise(name, type(x).__name__, f"a float32 array of shape {shape}")
    if tuple(x.shape) != shape:
      _raise(f"{name}.shape", tuple(x.shape), f"{shape}")
    if jnp.dtype(x.dtype) != jnp.float32:
      _raise(f"{name}.dtype", str(x.dtype), "float32")
  if (isinstance(scale, (bool, np.bool_))
      or not isinstance(scale, (int, float, np.integer, np.floating))
      or not math.isfinite(scale)):
    _raise("scale", scale, "a finite Python float")
  if not isinstance(interpret, (bool, pltpu.InterpretParams)):
    _raise("interpret", interpret, "a bool or a pltpu.InterpretParams")
  if not _is_int(chunk) or chunk < 8 or chunk % 8:
    _raise("chunk", chunk, "a positive multiple of 8")
  if chunk % _LANES and interpret is False:
    _raise("chunk", chunk, f"a multiple of {_LANES} on TPU (smaller chunks "
           "only with interpret)")
  p = heads_per_step(h // hkv)
  if block is None:
    block = default_block(t, p, dv, q.dtype, chunk)
  if not _is_int(block) or block < chunk or block % chunk:
    _raise("block", block, f"a positive multiple of chunk={chunk}")
  return int(chunk), int(block)


def attention_scan(q, k, v, m0, u0, w0, *, scale, interpret=False,
                   chunk: int = 128, block: int | None = None):
  """All prefix outputs and the final state of Aaren's scan on TPU.

  Args:
    q: [B, H, D] queries; D in SUPPORTED_HEAD_DIMS; dtype in SUPPORTED_DTYPES.
    k: [B, T, Hkv, D] keys, q.dtype, T >= 1; H % Hkv == 0 (query head h reads
      kv head h // (H // Hkv)).
    v: [B, T, Hkv, V] values, q.dtype; V in SUPPORTED_HEAD_DIMS.
    m0, u0: float32 [B, H]; w0: float32 [B, H, V]: the initial state
      (-inf, 0, 0: nothing seen).
    scale: Python float multiplying q . k.
    interpret: False, True (`pltpu.InterpretParams()`) or a
      `pltpu.InterpretParams`.
    chunk: tokens per in-kernel step (the [C, C] matmul); a multiple of 128
      on TPU, of 8 in interpret mode.
    block: tokens per grid step, a multiple of chunk (default
      `default_block`). T is padded inside and the padding masked.

  Returns:
    (o [B, T, H, V] in q.dtype, m [B, H], u [B, H], w [B, H, V] float32),
    differentiable in q, k, v, m0, u0, w0 (jax.custom_vjp, Pallas backward).

  Raises:
    ValueError: a precondition does not hold (the message names the
      argument, its value and what was expected), before any kernel is traced.
  """
  chunk, block = _check_args(q, k, v, m0, u0, w0, scale, interpret, chunk,
                             block)
  if interpret is True:
    interpret = pltpu.InterpretParams()
  bsz, h, d = q.shape
  _, t, hkv, _ = k.shape
  dv = v.shape[-1]
  p = heads_per_step(h // hkv)
  ng = h // p
  tp = -(-t // block) * block
  cfg = dict(b=bsz, ng=ng, p=p, gpk=(h // hkv) // p, t=t, tp=tp, d=d, dv=dv,
             block=block, n_t=tp // block, chunk=chunk,
             n_chunks=block // chunk, scale=float(scale), dtype=q.dtype,
             interpret=interpret)

  def rows(x, fill=0.0):  # [B, H, X] -> [B, NG, 8, X]
    x = x.reshape(bsz, ng, p, x.shape[-1])
    return jnp.pad(x, ((0, 0), (0, 0), (0, _ROWS - p), (0, 0)),
                   constant_values=fill)

  def unrows(x):  # [B, NG, 8, X] -> [B, H, X]
    return x[:, :, :p].reshape(bsz, h, x.shape[-1])

  def seq(x):  # [B, T, N, X] -> [B, Tp, N * X]
    x = jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    return x.reshape(bsz, tp, -1)

  def unseq(x, n):  # [B, Tp, N * X] -> [B, T, N, X]
    return x[:, :t].reshape(bsz, t, n, -1)

  def to_kernel(q, k, v, m0, u0, w0):
    return (rows(q), seq(k), seq(v), rows(m0[..., None]), rows(u0[..., None]),
            rows(w0))

  def outputs(o, mt, ut, wt):
    return unseq(o, h), unrows(mt)[..., 0], unrows(ut)[..., 0], unrows(wt)

  @jax.custom_vjp
  def scan(q, k, v, m0, u0, w0):
    o, mt, ut, wt = _fwd_call(*to_kernel(q, k, v, m0, u0, w0), cfg, False)
    return outputs(o, mt, ut, wt)

  def scan_fwd(q, k, v, m0, u0, w0):
    args = to_kernel(q, k, v, m0, u0, w0)
    o, lse, mt, ut, wt = _fwd_call(*args, cfg, True)
    return outputs(o, mt, ut, wt), (*args, o, lse, mt, ut, wt)

  def scan_bwd(res, cts):
    do, dm, du, dw = cts
    dos = (seq(do.astype(q.dtype)), rows(dm[..., None]), rows(du[..., None]),
           rows(dw))
    dq, dk, dv_, dm0, du0, dw0 = _bwd_call(res, dos, cfg)
    gpk = cfg["gpk"]
    if gpk > 1:  # sum the head groups of a kv head
      dk = dk.reshape(bsz, tp, hkv, gpk, d).sum(3).astype(q.dtype)
      dv_ = dv_.reshape(bsz, tp, hkv, gpk, dv).sum(3).astype(q.dtype)
    return (unrows(dq).astype(q.dtype), unseq(dk.reshape(bsz, tp, -1), hkv),
            unseq(dv_.reshape(bsz, tp, -1), hkv), unrows(dm0)[..., 0],
            unrows(du0)[..., 0], unrows(dw0))

  scan.defvjp(scan_fwd, scan_bwd)
  return scan(q, k, v, m0, u0, w0)
