"""Pallas TPU (Mosaic) kernels of causal blocked linear attention.

Lightning Attention-2: for each batch element b and query head h (which reads
kv head h // (H // Hkv)), with row vectors q_t, k_t in R^K and v_t in R^V,

  S_0 = initial_state[b, h]  (zeros if None),      S_t in R^{K x V}, float32
  S_t = exp(g_t) S_{t-1} + k_t^T v_t
  o_t = scale * q_t S_t

with per-token log-decays g_t <= 0 (g = 0 when log_gates is None). The
sequence is cut into chunks of C tokens; the grid is (B, H, T // C) and the
chunk axis runs sequentially, carrying S in a float32 VMEM scratch. Within a
chunk, with G_t = sum_{s <= t, s in chunk} g_s (inclusive cumulative log-gate,
computed in-kernel) and Q, K, V the chunk's [C, K], [C, K], [C, V] blocks:

  D_ts     = exp(G_t - G_s) if s <= t else 0            [C, C]
  O_intra  = ((Q K^T) * D) V                           [C, V]
  O_inter  = (Q * exp(G)[:, None]) S_prev              [C, V]
  o        = scale * (O_intra + O_inter)
  S_new    = exp(G_C) S_prev + (K * exp(G_C - G)[:, None])^T V

The mask is applied to the exponent (-inf above the diagonal) before the exp,
so nothing overflows. Without gates D is the causal 0/1 mask and no exp is
traced.

Precision: all matmuls accumulate in float32. For bf16 inputs the MXU operands
stay bf16: Q K^T takes the inputs as they are; the masked scores, the decayed
queries, the decayed keys and (for the inter-chunk term) the state are cast to
the input dtype before their matmul, as in flash-linear-attention. The state
itself is accumulated in float32. For float32 inputs every matmul runs at
Precision.HIGHEST.

`linear_attention_fwd` is the forward above; `linear_attention_bwd` gives dq,
per-query-head dk / dv and d_initial_state with two more kernels (a forward
sweep carrying S for dq, a reverse sweep carrying dS for the rest; the math is
in the comment before `_bwd_dq_kernel`). The gate gradient is left to the
caller (see `linear_attention_bwd`).

These are raw builders: no autodiff rule, no dispatch; the caller (attnlib)
reshapes per-head rates into broadcast log-gates and handles the non-causal
case with XLA.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
SUPPORTED_CHUNKS = (64, 128, 256)


def _raise(fn, name, got, want):
  raise ValueError(f"{fn}: {name} is {got}; expected {want}.")


def _check_args(q, k, v, log_gates, initial_state, scale, chunk,
                fn="linear_attention_fwd"):
  """Validates the caller's preconditions; raises ValueError naming the arg."""
  fail = functools.partial(_raise, fn)
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      fail(f"{name}.shape", getattr(x, "shape", type(x)), "rank 4")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      fail(f"{name}.dtype", x.dtype, "a floating dtype")
  if not q.dtype == k.dtype == v.dtype:
    fail("k.dtype/v.dtype", (k.dtype, v.dtype), f"q.dtype {q.dtype}")
  b, h, t, dk = q.shape
  hkv = k.shape[1]
  dv = v.shape[-1]
  if k.shape[0] != b or k.shape[2] != t or k.shape[3] != dk:
    fail("k.shape", k.shape, f"[B={b}, Hkv, T={t}, K={dk}]")
  if v.shape[:3] != k.shape[:3]:
    fail("v.shape", v.shape, f"[{b}, {hkv}, {t}, V] (matching k)")
  if hkv < 1 or h % hkv:
    fail("k.shape[1] (Hkv)", hkv, f"a divisor of H={h}")
  if dk not in SUPPORTED_HEAD_DIMS:
    fail("q.shape[-1] (K)", dk, f"one of {SUPPORTED_HEAD_DIMS}")
  if dv not in SUPPORTED_HEAD_DIMS:
    fail("v.shape[-1] (V)", dv, f"one of {SUPPORTED_HEAD_DIMS}")
  if not isinstance(chunk, int) or chunk not in SUPPORTED_CHUNKS:
    fail("chunk", chunk, f"one of {SUPPORTED_CHUNKS}")
  if t < 1 or t % chunk:
    fail("q.shape[2] (T)", t, f"a positive multiple of chunk={chunk}")
  if log_gates is not None:
    if tuple(log_gates.shape) != (b, h, t):
      fail("log_gates.shape", log_gates.shape, f"[B, H, T] = {(b, h, t)}")
    if log_gates.dtype != jnp.float32:
      fail("log_gates.dtype", log_gates.dtype, "float32")
  if initial_state is not None:
    if tuple(initial_state.shape) != (b, h, dk, dv):
      fail("initial_state.shape", initial_state.shape,
            f"[B, H, K, V] = {(b, h, dk, dv)}")
    if initial_state.dtype != jnp.float32:
      fail("initial_state.dtype", initial_state.dtype, "float32")
  if isinstance(scale, bool) or not isinstance(scale, (int, float)):
    fail("scale", type(scale).__name__, "a Python float")


def _chunk_gates(g_row, row, col):
  """In-chunk inclusive cumulative log-gates from g_row [1, C] (g_s on lanes).

  Masked reductions, so no cumsum or transpose is needed in Mosaic; row / col
  are the [C, C] iotas (row = t, col = s). Returns
    G_col[t] = sum_{s <= t} g_s     [C, 1]
    G_row[s] = sum_{r <= s} g_r     [1, C]
    G_C      = sum_s g_s            [1, 1]
  """
  c = g_row.shape[1]
  g_mat = jnp.broadcast_to(g_row, (c, c))  # [t, s] -> g_s
  big_g_col = jnp.sum(jnp.where(col <= row, g_mat, 0.0), axis=1, keepdims=True)
  g_col = jnp.sum(jnp.where(row == col, g_mat, 0.0), axis=1, keepdims=True)
  big_g_row = jnp.sum(  # [r, s] -> g_r, kept where r <= s
      jnp.where(row <= col, jnp.broadcast_to(g_col, (c, c)), 0.0),
      axis=0, keepdims=True)
  g_total = jnp.sum(g_row, axis=1, keepdims=True)
  return big_g_col, big_g_row, g_total


def _split_refs(refs, n_inputs, has_gates, has_state):
  """(inputs, gates ref or None, state-in ref or None, the rest) of a kernel's refs.

  Every kernel here takes `n_inputs` blocks, then the optional [1, C] float32
  gates and the optional [K, V] float32 state that starts its sweep, then its
  outputs and scratch.
  """
  pos = n_inputs
  g_ref = state_in_ref = None
  if has_gates:
    g_ref = refs[pos]
    pos += 1
  if has_state:
    state_in_ref = refs[pos]
    pos += 1
  return refs[:n_inputs], g_ref, state_in_ref, refs[pos:]


def _start_sweep(carry_ref, start_ref):
  """At a sweep's first chunk, the carried [K, V] state is start_ref or 0."""

  @pl.when(pl.program_id(2) == 0)
  def _init():
    if start_ref is not None:
      carry_ref[...] = start_ref[...]
    else:
      carry_ref[...] = jnp.zeros(carry_ref.shape, jnp.float32)


def _kernel(*refs, has_gates, has_init, scale, precision):
  """One (b, h, chunk) grid step; refs follow `linear_attention_fwd`'s specs."""
  # q, k, v: [C, K], [C, K], [C, V]; o [C, V]; S_T, S: [K, V] f32 (S in VMEM).
  (q_ref, k_ref, v_ref), g_ref, s0_ref, (o_ref, st_ref, state_ref) = _split_refs(
      refs, 3, has_gates, has_init)
  c_idx = pl.program_id(2)
  _start_sweep(state_ref, s0_ref)

  q = q_ref[...]
  k = k_ref[...]
  v = v_ref[...]
  dtype = q.dtype
  c = q.shape[0]
  s_prev = state_ref[...]  # [K, V] f32

  dot = functools.partial(lax.dot_general, preferred_element_type=jnp.float32,
                          precision=precision)
  nn = (((1,), (0,)), ((), ()))  # [M, N] x [N, P] -> [M, P]
  nt = (((1,), (1,)), ((), ()))  # [M, N] x [P, N] -> [M, P]

  row = lax.broadcasted_iota(jnp.int32, (c, c), 0)  # t
  col = lax.broadcasted_iota(jnp.int32, (c, c), 1)  # s
  causal = col <= row  # s <= t

  scores = dot(q, k, nt)  # Q K^T, [C, C] f32

  if has_gates:
    big_g_col, big_g_row, g_total = _chunk_gates(g_ref[...], row, col)
    # D_ts = exp(G_t - G_s) for s <= t, 0 above the diagonal (masked first).
    decay = jnp.exp(jnp.where(causal, big_g_col - big_g_row, -jnp.inf))
    p = scores * decay  # [C, C] f32
    q_inter = (q.astype(jnp.float32) * jnp.exp(big_g_col)).astype(dtype)
    k_state = k.astype(jnp.float32) * jnp.exp(g_total - big_g_col)  # [C, K]
    state_decay = jnp.exp(g_total)  # [1, 1]
  else:
    p = jnp.where(causal, scores, 0.0)
    q_inter = q
    k_state = k.astype(jnp.float32)
    state_decay = None

  o_intra = dot(p.astype(dtype), v, nn)  # [C, V] f32
  o_inter = dot(q_inter, s_prev.astype(dtype), nn)  # [C, V] f32
  o_ref[...] = (scale * (o_intra + o_inter)).astype(o_ref.dtype)

  # (K * exp(G_C - G))^T V, [K, V] f32. The LHS transpose is explicit and in
  # float32 (as in JAX's flash attention backward), not a dim-0 contraction.
  kv = dot(k_state.T.astype(dtype), v, nn)
  if state_decay is None:
    s_new = s_prev + kv
  else:
    s_new = state_decay * s_prev + kv
  state_ref[...] = s_new

  @pl.when(c_idx == pl.num_programs(2) - 1)
  def _final():
    st_ref[...] = s_new


def linear_attention_fwd(q, k, v, log_gates=None, initial_state=None, *,
                         scale, chunk=128, interpret=False):
  """Causal linear attention forward (Lightning Attention-2), Pallas TPU.

  Args:
    q: queries [B, H, T, K]; K in {64, 128, 256}.
    k: keys [B, Hkv, T, K], q.dtype; H % Hkv == 0 (query head h reads kv head
      h // (H // Hkv), through the index map).
    v: values [B, Hkv, T, V], q.dtype; V in {64, 128, 256}.
    log_gates: None (no decay) or float32 [B, H, T] log-decays g_t <= 0 (not
      checked: they may be traced).
    initial_state: None (zeros) or float32 [B, H, K, V].
    scale: Python float multiplying the outputs.
    chunk: tokens per grid step C, in {64, 128, 256}; T % C == 0.
    interpret: False, True or a `pltpu.InterpretParams`.

  Returns:
    (o [B, H, T, V] in q.dtype, final_state float32 [B, H, K, V]).

  Raises:
    ValueError: a precondition above does not hold (the message names the
      argument).
  """
  _check_args(q, k, v, log_gates, initial_state, scale, chunk)
  b, h, t, dk = q.shape
  hkv = k.shape[1]
  dv = v.shape[-1]
  rep = h // hkv
  n_chunks = t // chunk
  has_gates = log_gates is not None
  has_init = initial_state is not None
  sq = pl.Squeezed()

  q_spec = pl.BlockSpec((sq, sq, chunk, dk), lambda bi, hi, ci: (bi, hi, ci, 0))
  k_spec = pl.BlockSpec((sq, sq, chunk, dk),
                        lambda bi, hi, ci: (bi, hi // rep, ci, 0))
  v_spec = pl.BlockSpec((sq, sq, chunk, dv),
                        lambda bi, hi, ci: (bi, hi // rep, ci, 0))
  state_spec = pl.BlockSpec((sq, sq, dk, dv), lambda bi, hi, ci: (bi, hi, 0, 0))
  o_spec = pl.BlockSpec((sq, sq, chunk, dv), lambda bi, hi, ci: (bi, hi, ci, 0))

  in_specs = [q_spec, k_spec, v_spec]
  args = [q, k, v]
  if has_gates:
    # [B, H, T] -> [B, H, T/C, 1, C] (free): each block's last two dims equal
    # the array's, a legal Mosaic tile for any C; the kernel sees [1, C].
    in_specs.append(pl.BlockSpec((sq, sq, sq, 1, chunk),
                                 lambda bi, hi, ci: (bi, hi, ci, 0, 0)))
    args.append(log_gates.reshape(b, h, n_chunks, 1, chunk))
  if has_init:
    in_specs.append(state_spec)
    args.append(initial_state)

  precision = (lax.Precision.HIGHEST if q.dtype == jnp.float32
               else lax.Precision.DEFAULT)
  kernel = functools.partial(_kernel, has_gates=has_gates, has_init=has_init,
                             scale=float(scale), precision=precision)
  itemsize = jnp.dtype(q.dtype).itemsize
  flops = 2 * b * h * t * (chunk * dk + chunk * dv + 2 * dk * dv)
  bytes_accessed = (itemsize * (q.size + b * h * t * dv
                                + (k.size + v.size) * rep)
                    + 4 * b * h * dk * dv * (2 if has_init else 1)
                    + (4 * log_gates.size if has_gates else 0))
  o, final_state = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0,
          grid=(b, h, n_chunks),
          in_specs=in_specs,
          out_specs=[o_spec, state_spec],
          scratch_shapes=[pltpu.VMEM((dk, dv), jnp.float32)],
      ),
      out_shape=[jax.ShapeDtypeStruct((b, h, t, dv), q.dtype),
                 jax.ShapeDtypeStruct((b, h, dk, dv), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=pl.CostEstimate(
          flops=flops,
          transcendentals=(b * h * t * (chunk + 2) if has_gates else 0),
          bytes_accessed=bytes_accessed),
      interpret=interpret,
      name="lightning_attention_fwd",
  )(*args)
  return o, final_state


# ---------------------------------------------------------------------------
# Backward.
#
# With chunk-local G, D, G_C as in the forward, dO the chunk's [C, V] output
# cotangent and dS the cotangent of the state at the chunk's end (S_prev is the
# state at its start), the chunk's contributions are (per b, h)
#
#   dQ      = scale * ( ((dO V^T) * D) K + (dO S_prev^T) * exp(G)[:, None] )
#   dK      = scale * ((V dO^T) * D^T) Q + (V dS^T) * exp(G_C - G)[:, None]
#   dV      = scale * ((K Q^T) * D^T) dO + (K dS) * exp(G_C - G)[:, None]
#   dS_prev = exp(G_C) dS + scale * (Q * exp(G)[:, None])^T dO
#
# (V dO^T)_tu = v_t . do_u and D^T_tu = exp(G_u - G_t) for u >= t, else 0.
# dQ needs S_prev: a forward sweep over the chunks carrying S exactly as the
# forward kernel does. dK, dV need dS: a reverse sweep (chunk n of the grid
# reads chunk N - 1 - n) carrying dS from d_final_state (or 0); what is left
# after the first chunk is d_initial_state. The row factors exp(G) and
# exp(G_C - G) are applied to the float32 matmul results; Q * exp(G) is formed
# in float32 before its cast. Precision follows the forward.
# ---------------------------------------------------------------------------

_NN = (((1,), (0,)), ((), ()))  # [M, N] x [N, P] -> [M, P]
_NT = (((1,), (1,)), ((), ()))  # [M, N] x [P, N] -> [M, P]


def _bwd_dq_kernel(*refs, has_gates, has_init, scale, precision):
  """dQ, forward sweep; refs: k, v, do, [g], [s0], dq (out), S (scratch)."""
  # k, v, dO: [C, K], [C, V], [C, V]; dq [C, K] f32; S [K, V] f32 in VMEM.
  (k_ref, v_ref, do_ref), g_ref, s0_ref, (dq_ref, state_ref) = _split_refs(
      refs, 3, has_gates, has_init)
  _start_sweep(state_ref, s0_ref)

  k = k_ref[...]
  v = v_ref[...]
  do = do_ref[...]
  dtype = k.dtype
  c = k.shape[0]
  s_prev = state_ref[...]  # [K, V] f32
  dot = functools.partial(lax.dot_general, preferred_element_type=jnp.float32,
                          precision=precision)
  row = lax.broadcasted_iota(jnp.int32, (c, c), 0)  # t
  col = lax.broadcasted_iota(jnp.int32, (c, c), 1)  # s
  causal = col <= row

  dov = dot(do, v, _NT)  # dO V^T, [C, C] f32: [t, s] -> do_t . v_s
  dq_inter = dot(do, s_prev.astype(dtype), _NT)  # dO S_prev^T, [C, K] f32
  if has_gates:
    big_g_col, big_g_row, g_total = _chunk_gates(g_ref[...], row, col)
    decay = jnp.exp(jnp.where(causal, big_g_col - big_g_row, -jnp.inf))
    p = dov * decay
    dq_inter = dq_inter * jnp.exp(big_g_col)
    k_state = k.astype(jnp.float32) * jnp.exp(g_total - big_g_col)
    state_decay = jnp.exp(g_total)
  else:
    p = jnp.where(causal, dov, 0.0)
    k_state = k.astype(jnp.float32)
    state_decay = None
  dq_intra = dot(p.astype(dtype), k, _NN)  # [C, K] f32
  dq_ref[...] = (scale * (dq_intra + dq_inter)).astype(dq_ref.dtype)

  kv = dot(k_state.T.astype(dtype), v, _NN)  # [K, V] f32
  state_ref[...] = kv + (s_prev if state_decay is None
                         else state_decay * s_prev)


def _bwd_dkv_kernel(*refs, has_gates, has_dfinal, scale, precision):
  """dK, dV, reverse sweep; refs: q, k, v, do, [g], [dS_T], dk, dv, dS0, dS."""
  # q, k, v, dO: [C, K], [C, K], [C, V], [C, V]; dS [K, V] f32 in VMEM.
  ((q_ref, k_ref, v_ref, do_ref), g_ref, dst_ref,
   (dk_ref, dv_ref, ds0_ref, ds_ref)) = _split_refs(refs, 4, has_gates, has_dfinal)
  c_idx = pl.program_id(2)  # chunk N - 1 - c_idx
  _start_sweep(ds_ref, dst_ref)

  q = q_ref[...]
  k = k_ref[...]
  v = v_ref[...]
  do = do_ref[...]
  dtype = q.dtype
  c = q.shape[0]
  ds = ds_ref[...]  # [K, V] f32: cotangent of the state at the chunk's end
  ds_in = ds.astype(dtype)
  dot = functools.partial(lax.dot_general, preferred_element_type=jnp.float32,
                          precision=precision)
  row = lax.broadcasted_iota(jnp.int32, (c, c), 0)  # t (key position)
  col = lax.broadcasted_iota(jnp.int32, (c, c), 1)  # u (query position)
  anti = row <= col  # u >= t

  vdo = dot(v, do, _NT)  # V dO^T, [t, u] -> v_t . do_u
  kq = dot(k, q, _NT)  # K Q^T, [t, u] -> k_t . q_u
  dk_inter = dot(v, ds_in, _NT)  # V dS^T, [C, K] f32
  dv_inter = dot(k, ds_in, _NN)  # K dS, [C, V] f32
  if has_gates:
    big_g_col, big_g_row, g_total = _chunk_gates(g_ref[...], row, col)
    # D^T_tu = exp(G_u - G_t) for u >= t, masked in the exponent.
    decay_t = jnp.exp(jnp.where(anti, big_g_row - big_g_col, -jnp.inf))
    p_dk = vdo * decay_t
    p_dv = kq * decay_t
    key_decay = jnp.exp(g_total - big_g_col)  # [C, 1]
    dk_inter = dk_inter * key_decay
    dv_inter = dv_inter * key_decay
    q_state = q.astype(jnp.float32) * jnp.exp(big_g_col)  # [C, K]
    state_decay = jnp.exp(g_total)
  else:
    p_dk = jnp.where(anti, vdo, 0.0)
    p_dv = jnp.where(anti, kq, 0.0)
    q_state = q.astype(jnp.float32)
    state_decay = None
  dk_intra = dot(p_dk.astype(dtype), q, _NN)  # [C, K] f32
  dv_intra = dot(p_dv.astype(dtype), do, _NN)  # [C, V] f32
  dk_ref[...] = (scale * dk_intra + dk_inter).astype(dk_ref.dtype)
  dv_ref[...] = (scale * dv_intra + dv_inter).astype(dv_ref.dtype)

  # (Q * exp(G))^T dO, [K, V] f32; explicit float32 transpose as in the forward.
  qdo = dot(q_state.T.astype(dtype), do, _NN)
  ds_new = scale * qdo + (ds if state_decay is None else state_decay * ds)
  ds_ref[...] = ds_new

  @pl.when(c_idx == pl.num_programs(2) - 1)
  def _final():
    ds0_ref[...] = ds_new


def linear_attention_bwd(q, k, v, log_gates, initial_state, d_o,
                         d_final_state, *, scale, chunk=128, interpret=False):
  """Backward of `linear_attention_fwd` (all but the gate gradient), Pallas TPU.

  Two kernels on the grid (B, H, T // C): a forward sweep carrying the state S
  gives dq; a reverse sweep carrying dS (the state's cotangent, starting at
  d_final_state) gives dk, dv and d_initial_state. The math is in the comment
  above `_bwd_dq_kernel`.

  The log-gate gradient is left to the caller, from the identity
    dGamma_t = q_t . dq_t - k_t . dk_t  (+ <d_final_state, S_T> at t = T - 1),
    dg_t     = sum_{u >= t} dGamma_u,
  with dk per query head and S_T the forward's final state.

  Args:
    q, k, v, log_gates, initial_state, scale, chunk, interpret: as in
      `linear_attention_fwd`.
    d_o: output cotangent [B, H, T, V], q.dtype.
    d_final_state: None (zeros) or float32 [B, H, K, V], the final state's
      cotangent.

  Returns:
    (dq float32 [B, H, T, K], dk float32 [B, H, T, K], dv float32 [B, H, T, V],
     d_initial_state float32 [B, H, K, V]). dk and dv are per QUERY head: the
    caller sums each group of H // Hkv consecutive query heads into its kv
    head. d_initial_state is returned even when initial_state is None.

  Raises:
    ValueError: a precondition does not hold (the message names the argument).
  """
  fn = "linear_attention_bwd"
  _check_args(q, k, v, log_gates, initial_state, scale, chunk, fn=fn)
  b, h, t, dk = q.shape
  hkv = k.shape[1]
  dv = v.shape[-1]
  if getattr(d_o, "shape", None) is None or tuple(d_o.shape) != (b, h, t, dv):
    _raise(fn, "d_o.shape", getattr(d_o, "shape", type(d_o)),
           f"[B, H, T, V] = {(b, h, t, dv)}")
  if d_o.dtype != q.dtype:
    _raise(fn, "d_o.dtype", d_o.dtype, f"q.dtype {q.dtype}")
  if d_final_state is not None:
    if tuple(d_final_state.shape) != (b, h, dk, dv):
      _raise(fn, "d_final_state.shape", d_final_state.shape,
             f"[B, H, K, V] = {(b, h, dk, dv)}")
    if d_final_state.dtype != jnp.float32:
      _raise(fn, "d_final_state.dtype", d_final_state.dtype, "float32")

  rep = h // hkv
  n_chunks = t // chunk
  has_gates = log_gates is not None
  has_init = initial_state is not None
  has_dfinal = d_final_state is not None
  scale = float(scale)
  sq = pl.Squeezed()
  precision = (lax.Precision.HIGHEST if q.dtype == jnp.float32
               else lax.Precision.DEFAULT)
  itemsize = jnp.dtype(q.dtype).itemsize
  gates = (None if not has_gates
           else log_gates.reshape(b, h, n_chunks, 1, chunk))
  state_spec = pl.BlockSpec((sq, sq, dk, dv), lambda bi, hi, ci: (bi, hi, 0, 0))
  params = pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "arbitrary"))

  def specs(chunk_of):
    """BlockSpecs reading chunk chunk_of(ci) of each per-token array."""
    head = lambda d: pl.BlockSpec(
        (sq, sq, chunk, d), lambda bi, hi, ci: (bi, hi, chunk_of(ci), 0))
    kv_head = lambda d: pl.BlockSpec(
        (sq, sq, chunk, d), lambda bi, hi, ci: (bi, hi // rep, chunk_of(ci), 0))
    g_spec = pl.BlockSpec((sq, sq, sq, 1, chunk),
                          lambda bi, hi, ci: (bi, hi, chunk_of(ci), 0, 0))
    return head, kv_head, g_spec

  # dq: forward sweep carrying S.
  head, kv_head, g_spec = specs(lambda ci: ci)
  in_specs = [kv_head(dk), kv_head(dv), head(dv)]
  args = [k, v, d_o]
  if has_gates:
    in_specs.append(g_spec)
    args.append(gates)
  if has_init:
    in_specs.append(state_spec)
    args.append(initial_state)
  dq = pl.pallas_call(
      functools.partial(_bwd_dq_kernel, has_gates=has_gates,
                        has_init=has_init, scale=scale, precision=precision),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0,
          grid=(b, h, n_chunks),
          in_specs=in_specs,
          out_specs=head(dk),
          scratch_shapes=[pltpu.VMEM((dk, dv), jnp.float32)],
      ),
      out_shape=jax.ShapeDtypeStruct((b, h, t, dk), jnp.float32),
      compiler_params=params,
      cost_estimate=pl.CostEstimate(
          flops=2 * b * h * t * (chunk * dv + chunk * dk + 2 * dk * dv),
          transcendentals=(b * h * t * (chunk + 2) if has_gates else 0),
          bytes_accessed=(itemsize * (b * h * t * dv
                                      + (k.size + v.size) * rep)
                          + 4 * b * h * t * dk
                          + (4 * log_gates.size if has_gates else 0)
                          + (4 * b * h * dk * dv if has_init else 0))),
      interpret=interpret,
      name="lightning_attention_bwd_dq",
  )(*args)

  # dk, dv, d_initial_state: reverse sweep carrying dS.
  head, kv_head, g_spec = specs(lambda ci: n_chunks - 1 - ci)
  in_specs = [head(dk), kv_head(dk), kv_head(dv), head(dv)]
  args = [q, k, v, d_o]
  if has_gates:
    in_specs.append(g_spec)
    args.append(gates)
  if has_dfinal:
    in_specs.append(state_spec)
    args.append(d_final_state)
  dk_out, dv_out, d_initial_state = pl.pallas_call(
      functools.partial(_bwd_dkv_kernel, has_gates=has_gates,
                        has_dfinal=has_dfinal, scale=scale,
                        precision=precision),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0,
          grid=(b, h, n_chunks),
          in_specs=in_specs,
          out_specs=[head(dk), head(dv), state_spec],
          scratch_shapes=[pltpu.VMEM((dk, dv), jnp.float32)],
      ),
      out_shape=[jax.ShapeDtypeStruct((b, h, t, dk), jnp.float32),
                 jax.ShapeDtypeStruct((b, h, t, dv), jnp.float32),
                 jax.ShapeDtypeStruct((b, h, dk, dv), jnp.float32)],
      compiler_params=params,
      cost_estimate=pl.CostEstimate(
          flops=2 * b * h * t * (2 * chunk * dk + 2 * chunk * dv
                                 + 3 * dk * dv),
          transcendentals=(b * h * t * (chunk + 2) if has_gates else 0),
          bytes_accessed=(itemsize * (q.size + b * h * t * dv
                                      + (k.size + v.size) * rep)
                          + 4 * b * h * t * (dk + dv)
                          + (4 * log_gates.size if has_gates else 0)
                          + 4 * b * h * dk * dv * (2 if has_dfinal else 1))),
      interpret=interpret,
      name="lightning_attention_bwd_dkv",
  )(*args)
  return dq, dk_out, dv_out, d_initial_state
