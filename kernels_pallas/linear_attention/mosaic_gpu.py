"""Forward blocked linear attention (Lightning Attention-2) for Hopper GPUs.

A raw Mosaic GPU (Pallas) builder; no autodiff. For every batch element b and
query head h (which reads kv head h // (H // Hkv)), with row vectors q_t [K],
k_t [K], v_t [V] and per-token log-decays g_t <= 0:

  S_0 = initial_state[b, h]  (zeros if None),  S_t in R^{K x V}, float32
  S_t = exp(g_t) S_{t-1} + k_t^T v_t
  o_t = scale * q_t S_t

Blocked form (Lightning Attention-2). Split T into chunks of C tokens; inside a
chunk let G_t = g_1 + ... + g_t (cumulative, G_0 = 0) and G_C its last value.
Then, with S_prev the state entering the chunk,

  D_ts  = exp(G_t - G_s) if s <= t else 0          (the mask is applied
                                                     before the exp)
  O     = ((Q K^T) * D) V + diag(exp(G)) (Q S_prev)  (intra + inter)
  o     = scale * O
  S     = exp(G_C) S_prev + (K * exp(G_C - G))^T V

Without gates every exp is 1 and D is the causal mask; that case is specialised
at trace time (no exp work, no gate inputs).

Kernel structure. The grid is (V // v_block, H, B): one CTA (a single
warpgroup) per (b, h, slice of V). Columns of V are independent, so a CTA
keeps only its [K, v_block] slice of the float32 state in registers (as a
wgmma accumulator) while it walks the T // C chunks in order. A
`plgpu.emit_pipeline` (max_concurrent_steps buffers) multi-buffers the TMA
loads of the chunk tiles q [C, K], k [C, K], v [C, v_block] and the packed
gates [C + max(C, K)] into swizzled SMEM, so the next chunks' loads overlap
this chunk's math. Per chunk, all matmuls run on wgmma:

  1. S_prev (bf16/f16 copy) -> SMEM [K, v_block].
  2. A = Q K^T [C, C] and P = Q S_prev [C, v_block] (one wgmma group); while
     they run, Kw = K * exp(G_C - G) [C, K] -> SMEM (gated case; when
     v_block < K, Vw = exp(G_C - G) * V [C, v_block] instead, since
     Kw^T V == K^T Vw).
  3. A = A * D (masked), cast to the input dtype (register operand);
     P = exp(G) * P (row scale); S_prev = exp(G_C) S_prev.
  4. One wgmma group: O = P + A V [C, v_block] and S = S_prev + Kw^T V
     [K, v_block] (Kw^T: transposed SMEM operand; K itself without gates).
  5. scale * O -> SMEM (two buffers) -> TMA store, left in flight.

The only XLA work is packing the gates (the in-chunk cumulative sum,
[B, H, T] float32, ~2% of the bytes of q/k/v/o). The matmul operands
(A, S_prev, Kw) are rounded to the input dtype before the tensor cores, as in
flash-linear-attention; the state itself and all accumulations stay float32.

Interpret mode (`interpret=True`, Mosaic GPU's CPU interpreter, jax 0.11.2)
runs the same kernel with two differences forced by the interpreter: A goes
through SMEM (it only takes SMEM wgmma A operands) and accumulators start at
zero with the init added afterwards (it does not handle `run_state`).
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.experimental.pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

SUPPORTED_HEAD_DIMS = _SUPPORTED_DIMS = (64, 128)
SUPPORTED_DTYPES = _SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
_SMEM_LIMIT = 227 * 1024   # per-block opt-in SMEM on H100/H200
# linear_attention_fwd takes seq_major=True (q/k/v/o as [B, T, heads, *]);
# attnlib's adapter then skips its transposes.
SEQ_MAJOR = True


def _check_inputs(q, k, v, log_gates, initial_state, chunk, v_block,
                  seq_major=False):
  """Validates shapes/dtypes; returns (B, H, Hkv, T, K, V)."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be rank 4, got {q.shape}, {k.shape}, "
                     f"{v.shape}")
  # lay(b, heads, t, *rest): the shape in the layout the arrays use.
  if seq_major:
    b, t, h, dk = q.shape
    _, _, hkv, dv = v.shape
    lay = lambda b_, h_, t_, *r: (b_, t_, h_, *r)
  else:
    b, h, t, dk = q.shape
    _, hkv, _, dv = v.shape
    lay = lambda b_, h_, t_, *r: (b_, h_, t_, *r)
  if k.shape != lay(b, hkv, t, dk):
    raise ValueError(f"k.shape={k.shape} must be {lay(b, hkv, t, dk)}")
  if v.shape[:3] != lay(b, hkv, t):
    raise ValueError(f"v.shape={v.shape} must start with {lay(b, hkv, t)}")
  if hkv < 1 or h % hkv:
    raise ValueError(f"H={h} must be a multiple of Hkv={hkv}")
  if q.dtype != k.dtype or q.dtype != v.dtype:
    raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
  if jnp.dtype(q.dtype) not in map(jnp.dtype, _SUPPORTED_DTYPES):
    raise ValueError(f"dtype {q.dtype} unsupported: use bfloat16 or float16")
  if dk not in _SUPPORTED_DIMS or dv not in _SUPPORTED_DIMS:
    raise ValueError(f"K={dk} and V={dv} must be in {_SUPPORTED_DIMS}")
  if chunk not in (64, 128):
    raise ValueError(f"chunk={chunk} must be 64 or 128")
  if t < chunk or t % chunk:
    raise ValueError(f"T={t} must be a positive multiple of chunk={chunk}")
  if v_block not in (64, 128) or dv % v_block:
    raise ValueError(f"v_block={v_block} must be 64 or 128 and divide V={dv}")
  if log_gates is not None and log_gates.shape != lay(b, h, t):
    raise ValueError(f"log_gates.shape={log_gates.shape} must be "
                     f"{lay(b, h, t)}")
  if initial_state is not None and initial_state.shape != (b, h, dk, dv):
    raise ValueError(f"initial_state.shape={initial_state.shape} must be "
                     f"{(b, h, dk, dv)}")
  return b, h, hkv, t, dk, dv


def _gate_inputs(log_gates, chunk, dk):
  """Packs the in-chunk cumulative gates for the kernel (XLA, float32).

  Args:
    log_gates: [B, H, T] float32 log-decays g_t <= 0.
    chunk: C.
    dk: K.

  Returns:
    [B, H, (T // C) * (C + L)] float32 with L = max(C, K): per chunk, the
    cumulative gates G_1..G_C followed by G_C repeated L times (so the kernel
    reads G_C as a per-row vector of both the [C, *] tiles and the [K, *]
    state, with one TMA per chunk).
  """
  b, h, t = log_gates.shape
  n = t // chunk
  g = log_gates.astype(jnp.float32).reshape(b, h, n, chunk)
  g_cum = jnp.cumsum(g, axis=-1)                            # [B, H, N, C]
  g_last = jnp.broadcast_to(g_cum[..., -1:], (b, h, n, max(chunk, dk)))
  packed = jnp.concatenate([g_cum, g_last], axis=-1)        # [B, H, N, C+L]
  return packed.reshape(b, h, -1)


def _accumulate(mma, inits, interpret):
  """Returns inits[i] + (the products `mma(*acc_refs)` issues into acc_refs[i]).

  On the GPU each accumulator starts from its init (`pl.run_state`; all the
  wgmmas are awaited once, at the end). Mosaic GPU interpret mode does not
  handle `run_state_p` (jax 0.11.2), so there the products go into fresh zero
  accumulators (`pl.run_scoped`) and the inits are added afterwards: same
  math, one extra register add.
  """
  if not interpret:
    return pl.run_state(lambda refs: mma(*refs))(
        tuple(plgpu.ACC.init(x) for x in inits))
  def scoped(*acc_refs):
    mma(*acc_refs)
    return tuple(r[...] for r in acc_refs)
  outs = pl.run_scoped(
      scoped, *(plgpu.ACC(x.shape, jnp.float32) for x in inits))
  return tuple(x + y for x, y in zip(inits, outs))


def linear_attention_fwd(q, k, v, log_gates, initial_state, *, scale,
                         chunk=64, v_block=64, max_concurrent_steps=2,
                         seq_major=False, interpret=False):
  """Forward blocked linear attention on Hopper (Mosaic GPU).

  Args:
    q: [B, H, T, K] bfloat16 or float16.
    k: [B, Hkv, T, K], same dtype; H % Hkv == 0.
    v: [B, Hkv, T, V], same dtype.
    log_gates: None (no decay) or float32 [B, H, T] log-decays g_t <= 0.
    initial_state: None (zeros) or float32 [B, H, K, V].
    scale: Python float multiplying the outputs.
    chunk: tokens per chunk C (64 or 128); T % C == 0.
    v_block: columns of V per CTA (64 or 128, dividing V). 64 splits V=128
      over two CTAs, which doubles the CTAs and halves the state registers.
    max_concurrent_steps: TMA pipeline depth (buffers per input).
    seq_major: if True, q, k, v, log_gates and o use the sequence-major
      layout [B, T, heads, *] instead: q [B, T, H, K], k [B, T, Hkv, K],
      v [B, T, Hkv, V], log_gates [B, T, H], o [B, T, H, V] (the public
      op's layout, so no transposes around the kernel). Each CTA's TMA tiles
      are then [C, K] boxes of strided rows; states stay [B, H, K, V].
    interpret: False, True (default `plgpu.InterpretGPUParams()`) or an
      `InterpretGPUParams`: run under Mosaic GPU interpret mode on CPU.

  Returns:
    (o [B, H, T, V] ([B, T, H, V] if seq_major) in q.dtype,
     final_state [B, H, K, V] float32).

  Raises:
    ValueError: bad ranks, shapes or dtypes; T % chunk != 0; K or V not in
      {64, 128}; a configuration whose SMEM exceeds 227 KiB (e.g. chunk=128
      with K=128 and two pipeline buffers).
  """
  b, h, hkv, t, dk, dv = _check_inputs(q, k, v, log_gates, initial_state,
                                       chunk, v_block, seq_major)
  dtype = q.dtype
  group = h // hkv
  n_chunks = t // chunk
  n_vblocks = dv // v_block
  steps = max(1, min(max_concurrent_steps, n_chunks))
  has_gates = log_gates is not None
  has_s0 = initial_state is not None
  scale = float(scale)
  if interpret is True:
    interpret = plgpu.InterpretGPUParams()
  elif interpret is False:
    interpret = None

  if has_gates and seq_major:
    log_gates = jnp.swapaxes(log_gates, 1, 2)   # [B, H, T] (tiny, fused)
  gate_arrays = (_gate_inputs(log_gates, chunk, dk),) if has_gates else ()
  gate_len = chunk + max(chunk, dk)
  # (K * w)^T V == K^T (w * V): row-scale whichever tile is narrower.
  scale_v = v_block < dk
  w_cols = v_block if scale_v else dk
  itemsize = jnp.dtype(dtype).itemsize
  smem_bytes = (
      steps * ((2 * chunk * dk + chunk * v_block) * itemsize
               + (gate_len * 4 if has_gates else 0))      # pipeline buffers
      + (dk * v_block + chunk * w_cols + 2 * chunk * v_block) * itemsize
      + (chunk * chunk * itemsize if interpret is not None else 0))
  if smem_bytes + 4096 > _SMEM_LIMIT:   # + barriers and alignment
    raise ValueError(
        f"chunk={chunk}, K={dk}, v_block={v_block}, max_concurrent_steps="
        f"{steps} needs ~{smem_bytes} bytes of SMEM > {_SMEM_LIMIT}")

  # 16-bit tiles: (8, 64) tiling + 128-byte swizzle (the wgmma SMEM format).
  tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  wgmma_layout = plgpu.Layout.WGMMA
  row_layout = plgpu.Layout.WGMMA.reduce(1)   # one value per row
  col_layout = plgpu.Layout.WGMMA.reduce(0)   # one value per column

  def kernel(*refs):
    (q_ref, k_ref, v_ref), refs = refs[:3], refs[3:]
    if has_gates:
      (gate_ref,), refs = refs[:1], refs[1:]
    if has_s0:
      (s0_ref,), refs = refs[:1], refs[1:]
    o_ref, sf_ref, s_smem, w_smem, o_smem2, *a_smem = refs
    a_smem = a_smem[0] if a_smem else None

    vb = lax.axis_index("vb")
    hh = lax.axis_index("heads")
    bb = lax.axis_index("batch")
    kvh = lax.div(hh, jnp.array(group, hh.dtype))
    vcols = pl.ds(vb * v_block, v_block)

    # Initial state [K, v_block] f32, WGMMA accumulator layout.
    # Loaded straight from GMEM: a scoped SMEM buffer + barrier here would be
    # reused by the pipeline's buffers/barriers (a barrier that has already
    # completed a phase made the first q wait pass early on the H100).
    if has_s0:
      s_init = plgpu.load(s0_ref.at[bb, hh, :, vcols], layout=wgmma_layout,
                          optimized=False)
    else:
      s_init = plgpu.layout_cast(
          jnp.zeros((dk, v_block), jnp.float32), wgmma_layout)

    # [T, V] views of this head (strided rows when seq_major).
    o_dst = o_ref.at[bb, :, hh] if seq_major else o_ref.at[bb, hh]

    def body(idx, q_smem, k_smem, v_smem, *rest):
      if has_gates:
        gate_smem, s_prev = rest
        g_cur = gate_smem.at[pl.ds(0, chunk)]                # G_t, t < C
        g_row = plgpu.load(g_cur, layout=row_layout)         # G_t  [C]
        g_last = plgpu.load(gate_smem.at[pl.ds(chunk, chunk)],
                            layout=row_layout)               # G_C  [C]
      else:
        (s_prev,) = rest
      (step,) = idx
      # 1. S_prev -> SMEM in the input dtype (wgmma B operand [K, v_block]).
      s_smem[...] = s_prev.astype(dtype)
      plgpu.commit_smem()

      # 2. A = Q K^T [C, C]; P = Q S_prev [C, v_block]. While these wgmmas
      #    run, Kw = K * exp(G_C - G) [C, K] (or Vw) -> SMEM (gated).
      def qk_qs(a_ref, p_ref):
        plgpu.wgmma(a_ref, q_smem, k_smem.transpose((1, 0)))
        plgpu.wgmma(p_ref, q_smem, s_smem)
        if has_gates:   # scale the narrower of K and V (same product)
          src = v_smem if scale_v else k_smem
          x = plgpu.load(src, layout=wgmma_layout).astype(jnp.float32)
          e_k = jnp.exp(g_last - g_row)                  # exp(G_C-G_t) [C]
          x = x * lax.broadcast_in_dim(e_k, (chunk, w_cols), [0])
          w_smem[...] = x.astype(dtype)
          plgpu.commit_smem()
        return a_ref[...], p_ref[...]
      a, p = pl.run_scoped(qk_qs, plgpu.ACC((chunk, chunk), jnp.float32),
                           plgpu.ACC((chunk, v_block), jnp.float32))

      # 3. Causal mask and in-chunk decay D (masked before the exp).
      row = plgpu.broadcasted_iota(jnp.int32, (chunk, chunk), 0,
                                   layout=wgmma_layout)
      col = plgpu.broadcasted_iota(jnp.int32, (chunk, chunk), 1,
                                   layout=wgmma_layout)
      causal = row >= col
      if has_gates:
        g_col = plgpu.load(g_cur, layout=col_layout)     # G_s  [C]
        diff = (lax.broadcast_in_dim(g_row, (chunk, chunk), [0])
                - lax.broadcast_in_dim(g_col, (chunk, chunk), [1]))
        diff = jnp.where(causal, diff, -jnp.inf)
        a = a * jnp.exp(diff)
        e_q = jnp.exp(g_row)                             # exp(G_t) [C]
        p = p * lax.broadcast_in_dim(e_q, (chunk, v_block), [0])
      else:
        a = jnp.where(causal, a, 0.0)
      a16 = a.astype(dtype)
      if a_smem is not None:   # interpret mode: wgmma needs an SMEM A operand
        a_smem[...] = a16
        plgpu.commit_smem()
        a16 = a_smem

      # 4. O = exp(G) * (Q S_prev) + (A * D) V  and
      # 5. S = exp(G_C) S_prev + Kw^T V, in one wgmma group.
      if has_gates:
        e_s = jnp.exp(plgpu.load(gate_smem.at[pl.ds(chunk, dk)],
                                 layout=row_layout))     # exp(G_C) [K]
        s_prev = s_prev * lax.broadcast_in_dim(e_s, (dk, v_block), [0])
        kt_smem, vs_smem = (k_smem, w_smem) if scale_v else (w_smem, v_smem)
      else:
        kt_smem, vs_smem = k_smem, v_smem

      def av_kv(o_acc, s_acc):
        plgpu.wgmma(o_acc, a16, v_smem)
        plgpu.wgmma(s_acc, kt_smem.transpose((1, 0)), vs_smem)
      o, s_new = _accumulate(av_kv, (p, s_prev), interpret)
      # o tile -> SMEM -> TMA store. Two o buffers: before reusing one, wait
      # until at most one store (the other buffer's) is still reading SMEM.
      o_smem = o_smem2.at[lax.rem(step, 2)]
      plgpu.wait_smem_to_gmem(1, wait_read_only=True)
      o_smem[...] = (o * scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(
          o_smem, o_dst.at[pl.ds(step * chunk, chunk), vcols])
      return s_new

    in_specs = [
        plgpu.BlockSpec((chunk, dk), lambda i: (i, 0), transforms=tiled),
        plgpu.BlockSpec((chunk, dk), lambda i: (i, 0), transforms=tiled),
        plgpu.BlockSpec((chunk, v_block), lambda i: (i, 0), transforms=tiled),
    ]
    if seq_major:
      in_refs = [q_ref.at[bb, :, hh], k_ref.at[bb, :, kvh],
                 v_ref.at[bb, :, kvh, vcols]]
    else:
      in_refs = [q_ref.at[bb, hh], k_ref.at[bb, kvh],
                 v_ref.at[bb, kvh, :, vcols]]
    if has_gates:
      vec = lambda n: plgpu.BlockSpec((n,), lambda i: (i,))
      in_specs.append(vec(gate_len))
      in_refs.append(gate_ref.at[bb, hh])
    pipeline = plgpu.emit_pipeline(
        body,
        grid=(n_chunks,),
        in_specs=in_specs,
        out_specs=[],
        max_concurrent_steps=steps,
        init_carry=s_init,
    )
    s_final = pipeline(*in_refs)

    plgpu.wait_smem_to_gmem(0)   # the last o tiles

    def store_state(st_smem):
      st_smem[...] = s_final
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(st_smem, sf_ref.at[bb, hh, :, vcols])
      plgpu.wait_smem_to_gmem(0)
    pl.run_scoped(store_state, plgpu.SMEM((dk, v_block), jnp.float32))

  inputs = [q, k, v, *gate_arrays]
  if has_s0:
    inputs.append(initial_state.astype(jnp.float32))
  o_shape = (b, t, h, dv) if seq_major else (b, h, t, dv)
  out_type = (jax.ShapeDtypeStruct(o_shape, dtype),
              jax.ShapeDtypeStruct((b, h, dk, dv), jnp.float32))
  scratch = (
      plgpu.SMEM((dk, v_block), dtype, transforms=tiled),   # S_prev (16-bit)
      plgpu.SMEM((chunk, w_cols), dtype, transforms=tiled),  # K or V scaled
      plgpu.SMEM((2, chunk, v_block), dtype, transforms=tiled),  # o tiles
  )
  if interpret is not None:
    # Interpret mode (jax 0.11.2) only takes SMEM refs as wgmma A operands,
    # so A goes through SMEM there; on the GPU it stays in registers.
    scratch += (plgpu.SMEM((chunk, chunk), dtype, transforms=tiled),)
  o, s_final = plgpu.kernel(
      kernel,
      out_type=out_type,
      grid=(n_vblocks, h, b),
      grid_names=("vb", "heads", "batch"),
      scratch_types=scratch,
      compiler_params=plgpu.CompilerParams(
          approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane),
      interpret=interpret,
  )(*inputs)
  return o, s_final


@functools.partial(jax.jit, static_argnames=("scale", "chunk", "v_block",
                                             "max_concurrent_steps",
                                             "seq_major"))
def linear_attention_fwd_jit(q, k, v, log_gates, initial_state, *, scale,
                             chunk=64, v_block=64, max_concurrent_steps=2,
                             seq_major=False):
  """`linear_attention_fwd` under jit (compiled kernel, no interpret)."""
  return linear_attention_fwd(q, k, v, log_gates, initial_state, scale=scale,
                              chunk=chunk, v_block=v_block,
                              max_concurrent_steps=max_concurrent_steps,
                              seq_major=seq_major)
