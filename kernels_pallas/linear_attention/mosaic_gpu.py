"""Blocked linear attention (Lightning Attention-2) for Hopper GPUs, forward
and backward, as raw Mosaic GPU (Pallas) builders; no autodiff rule here.

For every batch element b and query head h (which reads kv head
h // (H // Hkv)), with row vectors q_t [K], k_t [K], v_t [V] and per-token
log-decays g_t <= 0:

  S_0 = initial_state[b, h]  (zeros if None),  S_t in R^{K x V}, float32
  S_t = exp(g_t) S_{t-1} + k_t^T v_t
  o_t = scale * q_t S_t

One kernel, two directions. Every pass here is a *sweep*: for inputs
X [T, Dq] (the rows that read the state), Y [T, Dq] and Z [T, Dv] it carries
a [Dq, Dv] float32 state E chunk by chunk (C tokens) and writes out [T, Dv].
Inside a chunk let G_t = g_1 + ... + g_t (G_0 = 0), G_C its last value, and
E the state entering the chunk (in the direction of the sweep).

  forward sweep (chunks 0, 1, ...):
    out = out_scale * ( ((X Y^T) * D) Z + diag(exp(G)) (X E) )
    E  <- exp(G_C) E + (Y * exp(G_C - G))^T Z
    D_ts = exp(G_t - G_s) if s <= t else 0
  reverse sweep (chunks N-1, ..., 0):
    out = ((X Y^T) * D^T) Z * a_scale + diag(exp(G_C - G)) (X E)
    E  <- exp(G_C) E + w_scale (Y * exp(G))^T Z
    D^T_tu = exp(G_u - G_t) if u >= t else 0

(masks go into the exponent before the exp, so nothing overflows). The four
passes of linear attention are sweeps of (X, Y, Z):

  o        forward  (q, k, v),   E_0 = S_0,        out_scale = scale
  dq       forward  (dO, v, k),  E_0 = S_0^T,      out_scale = scale
  dv (,dS_0) reverse (k, q, dO), E_T = dS_T,       a_scale = w_scale = scale
  dk       reverse  (v, dO, q),  E_T = dS_T^T,     a_scale = w_scale = scale

because the state's cotangent runs backwards: the total cotangent of S_t is
dS_t = scale q_t^T dO_t + exp(g_{t+1}) dS_{t+1} (dS_T given), and
dq_t = scale dO_t S_t^T, dk_t = v_t dS_t^T, dv_t = k_t dS_t. The reverse sweep of (k, q, dO) leaves
dS_0 as its final state. The gate gradient needs, per query head,
dGamma_t = q_t . dq_t - k_t . dk_t (see attnlib's adapter); the dq and dk
sweeps also return these row dot products, taken from the float32 results
before rounding (`dot_with`).

The forward pass on the sequence-major layout (the public op's) runs by
default in `mosaic_gpu_fwd.forward_sweep` instead: the same math with the
state chain on one warpgroup, the output of even and odd chunks on two more
and the loads on a fourth (1.1-1.2x on the H200, BENCHMARKS.md section 3c).
`_sweep` below serves the backward sweeps, the head-major layout and
configurations the warp-specialized kernel does not take (chunk=128, an odd
max_concurrent_steps).

Kernel structure of `_sweep`. The grid is (Dv // v_block, H, B): one CTA (a
single warpgroup) per (b, h, slice of Z's columns). Columns of Z are independent, so
a CTA keeps only its [Dq, v_block] slice of the float32 state in registers (a
wgmma accumulator) while it walks the chunks in order. A
`plgpu.emit_pipeline` (max_concurrent_steps buffers) multi-buffers the TMA
loads of the chunk tiles X, Y [C, Dq], Z [C, v_block] and the packed gates
into swizzled SMEM, so the next chunks' loads overlap this chunk's math. Per
chunk, all matmuls run on wgmma:

  1. E (bf16/f16 copy) -> SMEM [Dq, v_block].
  2. A = X Y^T [C, C] and P = X E [C, v_block] (one wgmma group); while they
     run, the row-scaled Y (or Z, whichever is narrower) -> SMEM.
  3. A = A * D (masked), cast to the input dtype (register operand);
     P = row factor * P; E = exp(G_C) E.
  4. One wgmma group: out = P + A Z and E += Yw^T Z (transposed SMEM operand).
  5. out -> SMEM (two buffers) -> TMA store, left in flight.

The only XLA work is packing the gates (the in-chunk cumulative sum,
[B, H, T] float32, ~2% of the bytes of q/k/v/o). The matmul operands
(A, E, Yw) are rounded to the input dtype before the tensor cores, as in
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

from kernels_pallas import mosaic_gpu_common as common
from kernels_pallas.linear_attention import mosaic_gpu_fwd

SUPPORTED_HEAD_DIMS = _SUPPORTED_DIMS = (64, 128)
SUPPORTED_DTYPES = _SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
# linear_attention_fwd/bwd take seq_major=True (q/k/v/o as [B, T, heads, *]);
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
  if v_block not in (32, 64, 128) or dv % v_block:
    raise ValueError(f"v_block={v_block} must be 32, 64 or 128 and divide "
                     f"V={dv}")
  if log_gates is not None and log_gates.shape != lay(b, h, t):
    raise ValueError(f"log_gates.shape={log_gates.shape} must be "
                     f"{lay(b, h, t)}")
  if initial_state is not None and initial_state.shape != (b, h, dk, dv):
    raise ValueError(f"initial_state.shape={initial_state.shape} must be "
                     f"{(b, h, dk, dv)}")
  return b, h, hkv, t, dk, dv


def _gate_inputs(log_gates, chunk, width, seq_major):
  """Packs the in-chunk cumulative gates for the kernels (XLA, float32).

  Args:
    log_gates: [B, H, T] ([B, T, H] if seq_major) float32 log-decays <= 0.
    chunk: C.
    width: the widest state row count Dq of the sweeps that read the result.

  Returns:
    [B, H, (T // C) * (C + L)] float32 with L = max(C, width): per chunk, the
    cumulative gates G_1..G_C followed by G_C repeated L times (so a kernel
    reads G_C as a per-row vector of both the [C, *] tiles and the [Dq, *]
    state, with one TMA per chunk).
  """
  if seq_major:
    log_gates = jnp.swapaxes(log_gates, 1, 2)   # [B, H, T] (tiny, fused)
  b, h, t = log_gates.shape
  n = t // chunk
  g = log_gates.astype(jnp.float32).reshape(b, h, n, chunk)
  g_cum = jnp.cumsum(g, axis=-1)                            # [B, H, N, C]
  g_last = jnp.broadcast_to(g_cum[..., -1:], (b, h, n, max(chunk, width)))
  packed = jnp.concatenate([g_cum, g_last], axis=-1)        # [B, H, N, C+L]
  return packed.reshape(b, h, -1)


def _sweep(x, y, z, gates, state, dot_with, *, heads, kv_inputs, reverse,
           out_scale, a_scale, w_scale, out_dtype, want_state, chunk, v_block,
           max_concurrent_steps, seq_major, interpret):
  """One sweep (see the module docstring) as a Mosaic GPU kernel.

  Args:
    x, y: [B, T, hx, Dq] and [B, T, hy, Dq] ([B, hx, T, Dq], ... if not
      seq_major); z: [B, T, hz, Dv]. Each has either `heads` heads or the kv
      heads (heads // group); kv_inputs says which, for (x, y, z, dot_with).
    gates: None or the packed cumulative gates of `_gate_inputs`.
    state: None (zeros) or float32 [B, heads, Dq, Dv], the state entering the
      first chunk of the sweep (the last chunk when reverse).
    dot_with: None or [B, T, hd, Dv] like z: also return the row dot products
      sum_j dot_with[t, j] * out[t, j] (float32 out, before rounding).
    heads: H, the grid's head count (outputs have H heads).
    reverse, out_scale, a_scale, w_scale: as in the module docstring.
    out_dtype: dtype of out.
    want_state: whether to return the state after the last chunk.

  Returns:
    (out [B, T, H, Dv] ([B, H, T, Dv]) out_dtype, final state [B, H, Dq, Dv]
     float32 or None, row dots [Dv // v_block, B, H, T] float32 or None: the
     partial sums of each slice of columns).
  """
  seq_ax, head_ax = (1, 2) if seq_major else (2, 1)
  b, t, dq, dv = x.shape[0], x.shape[seq_ax], x.shape[-1], z.shape[-1]
  dtype = x.dtype
  operands = (x, y, z) + ((dot_with,) if dot_with is not None else ())
  hkv = [o.shape[head_ax] for o, kv in zip(operands, kv_inputs) if kv]
  group = heads // hkv[0] if hkv else 1
  n_chunks = t // chunk
  n_vblocks = dv // v_block
  steps = max(1, min(max_concurrent_steps, n_chunks))
  has_gates = gates is not None
  has_state = state is not None
  has_dot = dot_with is not None
  interpret = common.interpret_params(interpret)
  gate_len = gates.shape[-1] // n_chunks if has_gates else 0
  if has_gates and gate_len < chunk + max(chunk, dq):
    raise ValueError(f"gates pack {gate_len} floats per chunk; need "
                     f"{chunk + max(chunk, dq)} (C + max(C, Dq))")
  # (Y * w)^T Z == Y^T (w * Z): row-scale whichever tile is narrower.
  scale_z = v_block < dq
  w_cols = v_block if scale_z else dq
  needs_w = has_gates or w_scale != 1.0
  itemsize = jnp.dtype(dtype).itemsize
  out_itemsize = jnp.dtype(out_dtype).itemsize
  smem_bytes = (
      steps * ((2 * chunk * dq + chunk * v_block * (1 + has_dot)) * itemsize
               + gate_len * 4)                              # pipeline buffers
      + (dq * v_block + (chunk * w_cols if needs_w else 0)) * itemsize
      + 2 * chunk * v_block * out_itemsize + 2 * chunk * 4 * has_dot
      + (chunk * chunk * itemsize if interpret is not None else 0))
  if smem_bytes + 4096 > common.SMEM_LIMIT:   # + barriers and alignment
    raise ValueError(
        f"chunk={chunk}, Dq={dq}, v_block={v_block}, max_concurrent_steps="
        f"{steps} needs ~{smem_bytes} bytes of SMEM > {common.SMEM_LIMIT}")

  # The wgmma SMEM format of 16-bit tiles: (8, n) tiles, rows swizzled over
  # 2 n bytes. wgmma wants one swizzle for both operands: 128 bytes, or 64
  # when v_block = 32 (a row of the [*, 32] tiles is 64 bytes).
  swizzle = min(128, 2 * v_block)
  tiled = lambda cols: (plgpu.TilingTransform((8, swizzle // 2)),
                        plgpu.SwizzleTransform(swizzle))
  wgmma_layout = plgpu.Layout.WGMMA
  row_layout = plgpu.Layout.WGMMA.reduce(1)   # one value per row
  col_layout = plgpu.Layout.WGMMA.reduce(0)   # one value per column
  chunk_of = (lambda i: n_chunks - 1 - i) if reverse else (lambda i: i)

  def kernel(*refs):
    refs = list(refs)
    pop = lambda present: refs.pop(0) if present else None
    x_ref, y_ref, z_ref = refs.pop(0), refs.pop(0), refs.pop(0)
    gate_ref, e0_ref, dw_ref = pop(has_gates), pop(has_state), pop(has_dot)
    o_ref = refs.pop(0)
    ef_ref, rd_ref = pop(want_state), pop(has_dot)
    e_smem, o_smem2 = refs.pop(0), refs.pop(0)
    w_smem, rd_smem2 = pop(needs_w), pop(has_dot)
    a_smem = pop(interpret is not None)

    vb = lax.axis_index("vb")
    hh = lax.axis_index("heads")
    bb = lax.axis_index("batch")
    kvh = lax.div(hh, jnp.array(group, hh.dtype))
    vcols = pl.ds(vb * v_block, v_block)

    def rows(ref, kv):   # this head's [T, D] view (strided rows if seq_major)
      head = kvh if kv else hh
      return ref.at[bb, :, head] if seq_major else ref.at[bb, head]

    # State entering the sweep, [Dq, v_block] f32 in the WGMMA accumulator
    # layout, loaded straight from GMEM: a scoped SMEM buffer + barrier here
    # would be reused by the pipeline's buffers/barriers (a barrier that has
    # already completed a phase made the first wait pass early on the H100).
    if has_state:
      e_init = plgpu.load(e0_ref.at[bb, hh, :, vcols], layout=wgmma_layout,
                          optimized=False)
    else:
      e_init = plgpu.layout_cast(
          jnp.zeros((dq, v_block), jnp.float32), wgmma_layout)
    o_dst = rows(o_ref, False)

    def body(idx, x_smem, y_smem, z_smem, *rest):
      rest = list(rest)
      gate_smem = rest.pop(0) if has_gates else None
      dw_smem = rest.pop(0) if has_dot else None
      (e_prev,) = rest
      (step,) = idx
      c_idx = chunk_of(step)
      if has_gates:
        g_cur = gate_smem.at[pl.ds(0, chunk)]                # G_t, t < C
        g_row = plgpu.load(g_cur, layout=row_layout)         # G_t  [C]
        g_last = plgpu.load(gate_smem.at[pl.ds(chunk, chunk)],
                            layout=row_layout)               # G_C  [C]
      # 1. E -> SMEM in the input dtype (wgmma B operand [Dq, v_block]).
      e_smem[...] = e_prev.astype(dtype)
      plgpu.commit_smem()

      # 2. A = X Y^T [C, C]; P = X E [C, v_block]. While these wgmmas run:
      #    the row-scaled Y (or Z) -> SMEM, and the decay tile D.
      row = plgpu.broadcasted_iota(jnp.int32, (chunk, chunk), 0,
                                   layout=wgmma_layout)
      col = plgpu.broadcasted_iota(jnp.int32, (chunk, chunk), 1,
                                   layout=wgmma_layout)
      visible = col >= row if reverse else row >= col

      def xy_xe(a_ref, p_ref):
        plgpu.wgmma(a_ref, x_smem, y_smem.transpose((1, 0)))
        plgpu.wgmma(p_ref, x_smem, e_smem)
        if needs_w:
          src = z_smem if scale_z else y_smem
          w = plgpu.load(src, layout=wgmma_layout).astype(jnp.float32)
          if has_gates:   # forward exp(G_C - G_s); reverse exp(G_u)
            e_w = jnp.exp(g_row if reverse else g_last - g_row)
            if w_scale != 1.0:
              e_w = e_w * w_scale
            w = w * lax.broadcast_in_dim(e_w, (chunk, w_cols), [0])
          else:
            w = w * w_scale
          w_smem[...] = w.astype(dtype)
          plgpu.commit_smem()
        decay = None
        if has_gates:   # D (D^T when reverse), masked in the exponent
          g_col = plgpu.load(g_cur, layout=col_layout)     # G_s  [C]
          g_rows = lax.broadcast_in_dim(g_row, (chunk, chunk), [0])
          g_cols = lax.broadcast_in_dim(g_col, (chunk, chunk), [1])
          diff = g_cols - g_rows if reverse else g_rows - g_cols
          decay = jnp.exp(jnp.where(visible, diff, -jnp.inf))
          if a_scale != 1.0:
            decay = decay * a_scale
        return a_ref[...], p_ref[...], decay
      a, p, decay = pl.run_scoped(
          xy_xe, plgpu.ACC((chunk, chunk), jnp.float32),
          plgpu.ACC((chunk, v_block), jnp.float32))

      # 3. Mask and decay; the inter-chunk term's row factor; E's decay.
      if has_gates:
        a = a * decay
        e_p = jnp.exp(g_last - g_row if reverse else g_row)
        p = p * lax.broadcast_in_dim(e_p, (chunk, v_block), [0])
        e_s = jnp.exp(plgpu.load(gate_smem.at[pl.ds(chunk, dq)],
                                 layout=row_layout))     # exp(G_C) [Dq]
        e_prev = e_prev * lax.broadcast_in_dim(e_s, (dq, v_block), [0])
      else:
        a = jnp.where(visible, a * a_scale if a_scale != 1.0 else a, 0.0)
      a16 = a.astype(dtype)
      if a_smem is not None:   # interpret mode: wgmma needs an SMEM A operand
        a_smem[...] = a16
        plgpu.commit_smem()
        a16 = a_smem

      # 4. out = P + A Z and E = exp(G_C) E + Yw^T Z, in one wgmma group.
      yt_smem, zs_smem = y_smem, z_smem
      if needs_w:
        yt_smem, zs_smem = (y_smem, w_smem) if scale_z else (w_smem, z_smem)

      def az_yz(o_acc, e_acc):
        plgpu.wgmma(o_acc, a16, z_smem)
        plgpu.wgmma(e_acc, yt_smem.transpose((1, 0)), zs_smem)
      o, e_new = common.accumulate(az_yz, (p, e_prev), interpret)

      # 5. out tile (and row dots) -> SMEM -> TMA store. Two buffers each:
      # before reusing one, wait until only the other's stores may still be
      # reading SMEM.
      if out_scale != 1.0:
        o = o * out_scale
      slot = lax.rem(step, 2)
      tokens = pl.ds(c_idx * chunk, chunk)
      plgpu.wait_smem_to_gmem(1 + has_dot, wait_read_only=True)
      o_smem = o_smem2.at[slot]
      o_smem[...] = o.astype(out_dtype)
      if has_dot:
        d = plgpu.load(dw_smem, layout=wgmma_layout).astype(jnp.float32)
        rd_smem = rd_smem2.at[slot]
        rd_smem[...] = jnp.sum(o * d, axis=1)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, o_dst.at[tokens, vcols])
      if has_dot:
        plgpu.copy_smem_to_gmem(rd_smem, rd_ref.at[vb, bb, hh, tokens])
      return e_new

    tile = lambda d: plgpu.BlockSpec((chunk, d), lambda i: (chunk_of(i), 0),
                                     transforms=tiled(d))
    in_specs = [tile(dq), tile(dq), tile(v_block)]
    in_refs = [rows(x_ref, kv_inputs[0]), rows(y_ref, kv_inputs[1]),
               rows(z_ref, kv_inputs[2]).at[:, vcols]]
    if has_gates:
      in_specs.append(plgpu.BlockSpec((gate_len,), lambda i: (chunk_of(i),)))
      in_refs.append(gate_ref.at[bb, hh])
    if has_dot:
      in_specs.append(tile(v_block))
      in_refs.append(rows(dw_ref, kv_inputs[3]).at[:, vcols])
    pipeline = plgpu.emit_pipeline(
        body,
        grid=(n_chunks,),
        in_specs=in_specs,
        out_specs=[],
        max_concurrent_steps=steps,
        init_carry=e_init,
    )
    e_final = pipeline(*in_refs)
    plgpu.wait_smem_to_gmem(0)   # the last out tiles

    if want_state:
      def store_state(st_smem):
        st_smem[...] = e_final
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(st_smem, ef_ref.at[bb, hh, :, vcols])
        plgpu.wait_smem_to_gmem(0)
      pl.run_scoped(store_state, plgpu.SMEM((dq, v_block), jnp.float32))

  inputs = [x, y, z]
  if has_gates:
    inputs.append(gates)
  if has_state:
    inputs.append(state.astype(jnp.float32))
  if has_dot:
    inputs.append(dot_with)
  o_shape = (b, t, heads, dv) if seq_major else (b, heads, t, dv)
  out_type = [jax.ShapeDtypeStruct(o_shape, out_dtype)]
  if want_state:
    out_type.append(jax.ShapeDtypeStruct((b, heads, dq, dv), jnp.float32))
  if has_dot:
    out_type.append(
        jax.ShapeDtypeStruct((n_vblocks, b, heads, t), jnp.float32))
  o_transforms = tiled(v_block) if out_itemsize == 2 else ()
  scratch = [
      plgpu.SMEM((dq, v_block), dtype, transforms=tiled(v_block)),  # E 16-bit
      plgpu.SMEM((2, chunk, v_block), out_dtype, transforms=o_transforms),
  ]
  if needs_w:
    scratch.append(plgpu.SMEM((chunk, w_cols), dtype,
                              transforms=tiled(w_cols)))
  if has_dot:
    scratch.append(plgpu.SMEM((2, chunk), jnp.float32))
  if interpret is not None:
    # Interpret mode (jax 0.11.2) only takes SMEM refs as wgmma A operands,
    # so A goes through SMEM there; on the GPU it stays in registers.
    scratch.append(plgpu.SMEM((chunk, chunk), dtype, transforms=tiled(chunk)))
  outs = plgpu.kernel(
      kernel,
      out_type=tuple(out_type),
      grid=(n_vblocks, heads, b),
      grid_names=("vb", "heads", "batch"),
      scratch_types=tuple(scratch),
      compiler_params=plgpu.CompilerParams(
          approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane),
      interpret=interpret,
  )(*inputs)
  outs = list(outs)
  o = outs.pop(0)
  e_final = outs.pop(0) if want_state else None
  rowdot = outs.pop(0) if has_dot else None
  return o, e_final, rowdot


def linear_attention_fwd(q, k, v, log_gates, initial_state, *, scale,
                         chunk=64, v_block=64, max_concurrent_steps=None,
                         seq_major=False, warp_specialized=None,
                         interpret=False):
  """Forward blocked linear attention on Hopper (Mosaic GPU).

  Args:
    q: [B, H, T, K] bfloat16 or float16.
    k: [B, Hkv, T, K], same dtype; H % Hkv == 0.
    v: [B, Hkv, T, V], same dtype.
    log_gates: None (no decay) or float32 [B, H, T] log-decays g_t <= 0.
    initial_state: None (zeros) or float32 [B, H, K, V].
    scale: Python float multiplying the outputs.
    chunk: tokens per chunk C (64 or 128); T % C == 0.
    v_block: columns of V per CTA (32, 64 or 128, dividing V). 64 splits
      V=128 over two CTAs, which doubles the CTAs and halves the state
      registers.
    max_concurrent_steps: TMA pipeline depth (buffers per input). None: 4
      for the warp-specialized kernel with gates where they fit, else 2
      (the faster of 2 and 4 on the H200, BENCHMARKS.md section 3c).
    seq_major: if True, q, k, v, log_gates and o use the sequence-major
      layout [B, T, heads, *] instead: q [B, T, H, K], k [B, T, Hkv, K],
      v [B, T, Hkv, V], log_gates [B, T, H], o [B, T, H, V] (the public
      op's layout, so no transposes around the kernel). Each CTA's TMA tiles
      are then [C, K] boxes of strided rows; states stay [B, H, K, V].
    warp_specialized: run `mosaic_gpu_fwd.forward_sweep` (the state chain
      and the outputs on separate warpgroups) instead of the one-warpgroup
      `_sweep`. None: whenever seq_major and `mosaic_gpu_fwd.fits`. It needs
      seq_major.
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
  has_gates = log_gates is not None
  ws_fits = lambda steps: seq_major and mosaic_gpu_fwd.fits(
      chunk, dk, v_block, steps, t // chunk, q.dtype, has_gates)
  if max_concurrent_steps is None:
    max_concurrent_steps = (4 if has_gates and warp_specialized is not False
                            and ws_fits(4) else 2)
  if warp_specialized is None:
    warp_specialized = ws_fits(max_concurrent_steps)
  if warp_specialized:
    if not seq_major:
      raise ValueError("warp_specialized=True needs seq_major=True")
    g_cum = (None if log_gates is None
             else mosaic_gpu_fwd.chunk_cumsum(log_gates, chunk))
    return mosaic_gpu_fwd.forward_sweep(
        q, k, v, g_cum, initial_state, heads=h, out_scale=float(scale),
        chunk=chunk, v_block=v_block,
        max_concurrent_steps=max_concurrent_steps, interpret=interpret)
  gates = (None if log_gates is None
           else _gate_inputs(log_gates, chunk, dk, seq_major))
  o, s_final, _ = _sweep(
      q, k, v, gates, initial_state, None, heads=h,
      kv_inputs=(False, True, True), reverse=False, out_scale=float(scale),
      a_scale=1.0, w_scale=1.0, out_dtype=q.dtype, want_state=True,
      chunk=chunk, v_block=v_block, max_concurrent_steps=max_concurrent_steps,
      seq_major=seq_major, interpret=interpret)
  return o, s_final


def linear_attention_bwd(q, k, v, log_gates, initial_state, d_o,
                         d_final_state, *, scale, chunk=64, v_block=64,
                         max_concurrent_steps=2, seq_major=False,
                         interpret=False):
  """Backward of `linear_attention_fwd`: three sweeps (module docstring).

  Args:
    q, k, v, log_gates, initial_state, scale, chunk, v_block,
      max_concurrent_steps, seq_major, interpret: as in `linear_attention_fwd`
      (v_block here splits the columns of each sweep's output: K for dq and
      dk, V for dv).
    d_o: the output cotangent, shaped and typed like o.
    d_final_state: None (zeros) or float32 [B, H, K, V].

  Returns:
    (dq like q; dk [B, H, T, K] and dv [B, H, T, V] per QUERY head (the caller
     sums each group of H // Hkv query heads into its kv head), in q.dtype
     when H == Hkv, else float32 ([B, T, H, *] if seq_major);
     d_initial_state float32 [B, H, K, V] (also when initial_state is None);
     d_gamma float32 [B, H, T], q_t . dq_t - k_t . dk_t per query head from
     the float32 results, or None without gates).

  Raises:
    ValueError: as `linear_attention_fwd`, or d_o / d_final_state of the
      wrong shape or dtype.
  """
  b, h, hkv, t, dk, dv = _check_inputs(q, k, v, log_gates, initial_state,
                                       chunk, v_block, seq_major)
  o_shape = (b, t, h, dv) if seq_major else (b, h, t, dv)
  if d_o.shape != o_shape or d_o.dtype != q.dtype:
    raise ValueError(f"d_o is {d_o.dtype}{list(d_o.shape)}; expected "
                     f"{jnp.dtype(q.dtype).name}{list(o_shape)}")
  if d_final_state is not None and (d_final_state.shape != (b, h, dk, dv)
                                    or d_final_state.dtype != jnp.float32):
    raise ValueError(f"d_final_state is {d_final_state.dtype}"
                     f"{list(d_final_state.shape)}; expected float32"
                     f"{[b, h, dk, dv]}")
  if v_block > min(dk, dv):
    v_block = min(dk, dv)   # dq and dk sweeps split K into v_block columns
  scale = float(scale)
  has_gates = log_gates is not None
  gates = (_gate_inputs(log_gates, chunk, max(dk, dv), seq_major)
           if has_gates else None)
  per_head_dtype = q.dtype if h == hkv else jnp.float32
  sweep = functools.partial(
      _sweep, gates=gates, heads=h, chunk=chunk, v_block=v_block,
      max_concurrent_steps=max_concurrent_steps, seq_major=seq_major,
      interpret=interpret)
  mt = lambda s: None if s is None else jnp.swapaxes(s, -1, -2)
  # dq: forward sweep of (dO, v, k) from S_0^T; rows dotted with q.
  dq, _, rd_q = sweep(
      d_o, v, k, state=mt(initial_state), dot_with=q if has_gates else None,
      kv_inputs=(False, True, True, False), reverse=False, out_scale=scale,
      a_scale=1.0, w_scale=1.0, out_dtype=q.dtype, want_state=False)
  # dv and dS_0: reverse sweep of (k, q, dO) from dS_T.
  dv_h, ds0, _ = sweep(
      k, q, d_o, state=d_final_state, dot_with=None,
      kv_inputs=(True, False, False), reverse=True, out_scale=1.0,
      a_scale=scale, w_scale=scale, out_dtype=per_head_dtype, want_state=True)
  # dk: reverse sweep of (v, dO, q) from dS_T^T; rows dotted with k.
  dk_h, _, rd_k = sweep(
      v, d_o, q, state=mt(d_final_state), dot_with=k if has_gates else None,
      kv_inputs=(True, False, False, True), reverse=True, out_scale=1.0,
      a_scale=scale, w_scale=scale, out_dtype=per_head_dtype, want_state=False)
  d_gamma = rd_q.sum(0) - rd_k.sum(0) if has_gates else None
  return dq, dk_h, dv_h, ds0, d_gamma


_JIT_STATIC = ("scale", "chunk", "v_block", "max_concurrent_steps",
               "seq_major", "warp_specialized")


@functools.partial(jax.jit, static_argnames=_JIT_STATIC)
def linear_attention_fwd_jit(q, k, v, log_gates, initial_state, **kwargs):
  """`linear_attention_fwd` under jit (compiled kernel, no interpret)."""
  return linear_attention_fwd(q, k, v, log_gates, initial_state, **kwargs)


@functools.partial(jax.jit, static_argnames=_JIT_STATIC)
def linear_attention_bwd_jit(q, k, v, log_gates, initial_state, d_o,
                             d_final_state, **kwargs):
  """`linear_attention_bwd` under jit (compiled kernels, no interpret)."""
  return linear_attention_bwd(q, k, v, log_gates, initial_state, d_o,
                              d_final_state, **kwargs)
