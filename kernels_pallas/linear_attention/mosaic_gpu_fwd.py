"""Warp-specialized forward sweep of blocked linear attention for Hopper.

The same math as `mosaic_gpu._sweep` in the forward direction (its module
docstring has the derivation): per chunk of C tokens, with G the in-chunk
cumulative log-gates, G_C their last value and E the [Dq, v_block] float32
state entering the chunk,

  out = out_scale * ( ((X Y^T) * D) Z  +  diag(exp(G)) (X E) )
        \\________ intra ________/     \\______ inter ______/
  E  <- exp(G_C) E + (Y * exp(G_C - G))^T Z,     D_ts = exp(G_t - G_s), s <= t.

Lightning Attention-2 splits the two terms because only the inter-chunk one
depends on the state. This kernel gives each its own warpgroup, so the
state's critical path (one chunk after another) carries only the inter term:

  warpgroup 2, memory: TMA loads of X, Y [C, Dq], Z [C, v_block] and the
    in-chunk cumulative gates G into `max_concurrent_steps` SMEM slots;
  warpgroup 0, intra: A = X Y^T, the decay tile D, O_intra = (A * D) Z, and
    the row-scaled W = Z * exp(G_C - G) (or Y * ..., whichever is narrower),
    handed to warpgroup 1 through two SMEM buffers (float32 O_intra, 16-bit W);
  warpgroup 1, inter: holds E in registers; per chunk E -> SMEM (16-bit),
    P = X E and E = exp(G_C) E + Y^T W in one wgmma group, then
    out = out_scale (O_intra + exp(G) P) -> SMEM -> TMA store.

The intra warpgroup runs up to two chunks ahead of the inter one, so its
exponentials and matmuls overlap the state chain instead of lengthening it.
Barriers: per slot, one TMA barrier per input and `consumed` (both compute
warpgroups); per hand-off buffer, `intra_done` and `intra_free`.

Only the sequence-major layout ([B, T, heads, *]) and the forward direction
without row dots (what `linear_attention_fwd` needs); `mosaic_gpu._sweep`
remains the kernel of the backward sweeps.
"""

from __future__ import annotations

import jax
from jax import lax
import jax.experimental.pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from kernels_pallas import mosaic_gpu_common as common

def _steps(max_concurrent_steps: int, n_chunks: int) -> int:
  return max(1, min(max_concurrent_steps, n_chunks))


def _smem_bytes(chunk, dq, v_block, steps, dtype, has_gates) -> int:
  """SMEM the kernel allocates (without barriers)."""
  itemsize = jnp.dtype(dtype).itemsize
  w_cols = v_block if v_block < dq else dq
  gate_len = chunk if has_gates else 0
  return (steps * ((2 * chunk * dq + chunk * v_block) * itemsize + gate_len * 4)
          + 2 * chunk * w_cols * itemsize       # W hand-off
          + 2 * chunk * v_block * 4             # O_intra hand-off (float32)
          + dq * v_block * itemsize             # E, 16-bit, for X E
          + 2 * chunk * v_block * itemsize)     # out tiles


def fits(chunk: int, dq: int, v_block: int, max_concurrent_steps: int,
         n_chunks: int, dtype, has_gates: bool) -> bool:
  """Whether `forward_sweep`'s SMEM (with ~4 KiB for barriers and alignment)
  fits one block's 227 KiB."""
  steps = _steps(max_concurrent_steps, n_chunks)
  return (_smem_bytes(chunk, dq, v_block, steps, dtype, has_gates) + 4096
          <= common.SMEM_LIMIT)


def chunk_cumsum(log_gates, chunk):
  """G: the cumulative sums of [B, T, H] log-gates within each chunk of C
  tokens, as float32 [B, H, T] (each head's gates contiguous, for the TMA)."""
  b, t, h = log_gates.shape
  g = jnp.cumsum(log_gates.astype(jnp.float32).reshape(b, t // chunk, chunk, h),
                 axis=2)
  return jnp.transpose(g, (0, 3, 1, 2)).reshape(b, h, t)


def forward_sweep(x, y, z, gates, state, *, heads, out_scale, chunk, v_block,
                  max_concurrent_steps, interpret):
  """o = the forward sweep of (x, y, z); see the module docstring.

  Args:
    x: [B, T, heads, Dq]; y: [B, T, Hkv, Dq]; z: [B, T, Hkv, Dv] (16-bit).
    gates: None or `chunk_cumsum(log_gates, chunk)`: float32 [B, heads, T].
    state: None (zeros) or float32 [B, heads, Dq, Dv].
    heads: H (a multiple of Hkv).
    out_scale: Python float.
    chunk, v_block, max_concurrent_steps: as in `mosaic_gpu._sweep`; T % chunk
      == 0 and `fits(...)` must hold.
    interpret: as in `mosaic_gpu._sweep`.

  Returns:
    (out [B, T, heads, Dv] in x.dtype, final state float32 [B, heads, Dq, Dv]).
  """
  b, t, _, dq = x.shape
  hkv, dv = z.shape[2], z.shape[-1]
  dtype = x.dtype
  group = heads // hkv
  n_chunks = t // chunk
  steps = _steps(max_concurrent_steps, n_chunks)
  has_gates, has_state = gates is not None, state is not None
  gate_len = chunk if has_gates else 0
  interpret = common.interpret_params(interpret)
  if not fits(chunk, dq, v_block, steps, n_chunks, dtype, has_gates):
    need = _smem_bytes(chunk, dq, v_block, steps, dtype, has_gates)
    raise ValueError(f"chunk={chunk}, Dq={dq}, v_block={v_block}, "
                     f"max_concurrent_steps={steps} needs ~{need} bytes of SMEM"
                     f" > {common.SMEM_LIMIT}")
  scale_z = v_block < dq          # (Y * w)^T Z == Y^T (w * Z): scale the narrower
  w_cols = v_block if scale_z else dq
  swz = lambda cols: (plgpu.TilingTransform((8, min(128, 2 * cols) // 2)),
                      plgpu.SwizzleTransform(min(128, 2 * cols)))
  f32_tiles = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))
  wgmma_layout = plgpu.Layout.WGMMA
  row_layout = plgpu.Layout.WGMMA.reduce(1)
  col_layout = plgpu.Layout.WGMMA.reduce(0)

  def kernel(x_ref, y_ref, z_ref, g_ref, e0_ref, o_ref, ef_ref, buffers,
             loaded, consumed, intra_done, intra_free):
    x_s, y_s, z_s, g_s, w_s, oi_s, e_s, o_s, a_s = buffers
    x_bar, y_bar, z_bar, g_bar = loaded
    wg = lax.axis_index("wg")
    vb = lax.axis_index("vb")
    hh = lax.axis_index("heads")
    bb = lax.axis_index("batch")
    kvh = lax.div(hh, jnp.array(group, hh.dtype))
    vcols = pl.ds(vb * v_block, v_block)
    tokens = lambda c: pl.ds(c * chunk, chunk)

    def gate_rows(slot):   # G_t of this slot's chunk, one per row
      return plgpu.load(g_s.at[slot], layout=row_layout)

    def gate_last(slot):   # G_C, a scalar
      return g_s[slot, chunk - 1]

    @pl.when(wg == 2)
    def _memory():
      if interpret is None:
        plgpu.set_max_registers(40, action="decrease")

      def load(c, slot):
        plgpu.copy_gmem_to_smem(x_ref.at[bb, tokens(c), hh], x_s.at[slot],
                                x_bar.at[slot])
        plgpu.copy_gmem_to_smem(y_ref.at[bb, tokens(c), kvh], y_s.at[slot],
                                y_bar.at[slot])
        plgpu.copy_gmem_to_smem(z_ref.at[bb, tokens(c), kvh, vcols],
                                z_s.at[slot], z_bar.at[slot])
        if has_gates:
          plgpu.copy_gmem_to_smem(
              g_ref.at[bb, hh, pl.ds(c * gate_len, gate_len)], g_s.at[slot],
              g_bar.at[slot])

      for s in range(steps):
        load(s, s)

      @pl.loop(0, n_chunks - steps)
      def _refill(i):
        slot = lax.rem(i, steps)
        plgpu.barrier_wait(consumed.at[slot])
        load(i + steps, slot)

      # Observe the last consumptions too, so that no barrier phase is left
      # unseen when the barriers are released (the interpreter checks this).
      @pl.loop(max(n_chunks - steps, 0), n_chunks)
      def _drain(i):
        plgpu.barrier_wait(consumed.at[lax.rem(i, steps)])

    @pl.when(wg == 0)
    def _intra():
      if interpret is None:
        plgpu.set_max_registers(232, action="increase")

      @pl.loop(0, n_chunks)
      def _chunk(i):
        slot, j = lax.rem(i, steps), lax.rem(i, 2)
        plgpu.barrier_wait(x_bar.at[slot])
        plgpu.barrier_wait(y_bar.at[slot])
        if has_gates:
          plgpu.barrier_wait(g_bar.at[slot])
        row = plgpu.broadcasted_iota(jnp.int32, (chunk, chunk), 0,
                                     layout=wgmma_layout)
        col = plgpu.broadcasted_iota(jnp.int32, (chunk, chunk), 1,
                                     layout=wgmma_layout)

        def qk(a_ref):   # A = X Y^T; the decay tile while the wgmma runs
          plgpu.wgmma(a_ref, x_s.at[slot], y_s.at[slot].transpose((1, 0)))
          if not has_gates:
            return a_ref[...], None
          g_row = gate_rows(slot)                                 # G_t
          g_col = plgpu.load(g_s.at[slot], layout=col_layout)     # G_s
          diff = (lax.broadcast_in_dim(g_row, (chunk, chunk), [0])
                  - lax.broadcast_in_dim(g_col, (chunk, chunk), [1]))
          decay = jnp.exp(jnp.where(row >= col, diff, -jnp.inf))
          return a_ref[...], decay

        a, decay = pl.run_scoped(qk, plgpu.ACC((chunk, chunk), jnp.float32))
        a = a * decay if has_gates else jnp.where(row >= col, a, 0.0)
        a16 = a.astype(dtype)
        if a_s is not None:   # interpret mode: wgmma takes SMEM A operands only
          a_s[...] = a16
          plgpu.commit_smem()
          a16 = a_s
        plgpu.barrier_wait(z_bar.at[slot])

        @pl.when(i >= 2)
        def _():
          plgpu.barrier_wait(intra_free.at[j])   # chunk i - 2 handed over

        def az(o_ref):   # O_intra = (A * D) Z; W while the wgmma runs
          plgpu.wgmma(o_ref, a16, z_s.at[slot])
          if has_gates:
            src = z_s.at[slot] if scale_z else y_s.at[slot]
            w = plgpu.load(src, layout=wgmma_layout).astype(jnp.float32)
            e_w = jnp.exp(gate_last(slot) - gate_rows(slot))      # G_C - G_t
            w = w * lax.broadcast_in_dim(e_w, (chunk, w_cols), [0])
            w_s.at[j][...] = w.astype(dtype)
          return o_ref[...]

        o_intra = pl.run_scoped(az, plgpu.ACC((chunk, v_block), jnp.float32))
        oi_s.at[j][...] = o_intra
        plgpu.commit_smem()
        plgpu.barrier_arrive(intra_done.at[j])
        plgpu.barrier_arrive(consumed.at[slot])

      @pl.loop(max(n_chunks - 2, 0), n_chunks)   # the last two hand-overs
      def _drain(i):
        plgpu.barrier_wait(intra_free.at[lax.rem(i, 2)])

    @pl.when(wg == 1)
    def _inter():
      if interpret is None:
        plgpu.set_max_registers(232, action="increase")
      if has_state:
        e_init = plgpu.load(e0_ref.at[bb, hh, :, vcols],
                            layout=wgmma_layout, optimized=False)
      else:
        e_init = plgpu.layout_cast(jnp.zeros((dq, v_block), jnp.float32),
                                   wgmma_layout)

      def chunk_step(i, e):
        slot, j = lax.rem(i, steps), lax.rem(i, 2)
        plgpu.barrier_wait(x_bar.at[slot])
        plgpu.barrier_wait(y_bar.at[slot])
        e_s[...] = e.astype(dtype)
        plgpu.commit_smem()
        if has_gates:
          plgpu.barrier_wait(g_bar.at[slot])
          e_p = jnp.exp(gate_rows(slot))                          # exp(G_t)
          e = e * jnp.exp(gate_last(slot))                        # exp(G_C) E
          plgpu.barrier_wait(intra_done.at[j])                    # W ready
          yt, zs = (y_s.at[slot], w_s.at[j]) if scale_z else (w_s.at[j],
                                                                z_s.at[slot])
        else:
          plgpu.barrier_wait(z_bar.at[slot])
          yt, zs = y_s.at[slot], z_s.at[slot]

        def mm(p_ref, e_ref):   # P = X E_prev; E += Yw^T Z
          plgpu.wgmma(p_ref, x_s.at[slot], e_s)
          plgpu.wgmma(e_ref, yt.transpose((1, 0)), zs)

        p0 = plgpu.layout_cast(jnp.zeros((chunk, v_block), jnp.float32),
                               wgmma_layout)
        p, e = common.accumulate(mm, (p0, e), interpret)
        plgpu.barrier_arrive(consumed.at[slot])
        if not has_gates:
          plgpu.barrier_wait(intra_done.at[j])
        o_intra = oi_s.at[j][...]
        plgpu.barrier_arrive(intra_free.at[j])
        if has_gates:
          p = p * lax.broadcast_in_dim(e_p, (chunk, v_block), [0])
        o = o_intra + p
        if out_scale != 1.0:
          o = o * out_scale
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)   # o_s[j] free again
        o_s.at[j][...] = o.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_s.at[j], o_ref.at[bb, tokens(i), hh, vcols])
        return e

      e_final = lax.fori_loop(0, n_chunks, chunk_step, e_init)
      # Straight from registers to GMEM (once per CTA), which leaves the SMEM
      # of a [Dq, v_block] float32 staging tile to the input pipeline.
      ef_ref.at[bb, hh, :, vcols][...] = e_final
      plgpu.wait_smem_to_gmem(0)

  def entry(*refs):
    refs = list(refs)
    x_ref, y_ref, z_ref = refs.pop(0), refs.pop(0), refs.pop(0)
    g_ref = refs.pop(0) if has_gates else None
    e0_ref = refs.pop(0) if has_state else None
    o_ref, ef_ref = refs
    buffers = [
        plgpu.SMEM((steps, chunk, dq), dtype, transforms=swz(dq)),       # X
        plgpu.SMEM((steps, chunk, dq), dtype, transforms=swz(dq)),       # Y
        plgpu.SMEM((steps, chunk, v_block), dtype, transforms=swz(v_block)),
        plgpu.SMEM((steps, max(gate_len, 1)), jnp.float32),              # gates
        plgpu.SMEM((2, chunk, w_cols), dtype, transforms=swz(w_cols)),   # W
        plgpu.SMEM((2, chunk, v_block), jnp.float32, transforms=f32_tiles),
        plgpu.SMEM((dq, v_block), dtype, transforms=swz(v_block)),       # E
        plgpu.SMEM((2, chunk, v_block), dtype, transforms=swz(v_block)),  # out
        (plgpu.SMEM((chunk, chunk), dtype, transforms=swz(chunk))
         if interpret is not None else None),                            # A
    ]
    loaded = [plgpu.Barrier(num_barriers=steps) for _ in range(4)]
    pl.run_scoped(
        lambda bufs, ld, cons, done, free: kernel(
            x_ref, y_ref, z_ref, g_ref, e0_ref, o_ref, ef_ref, bufs, ld, cons,
            done, free),
        buffers, loaded,
        plgpu.Barrier(num_arrivals=2, num_barriers=steps),   # consumed
        plgpu.Barrier(num_barriers=2),                       # intra_done
        plgpu.Barrier(num_barriers=2),                       # intra_free
        collective_axes="wg",
    )

  inputs = [x, y, z]
  if has_gates:
    inputs.append(gates)
  if has_state:
    inputs.append(state.astype(jnp.float32))
  out_type = (jax.ShapeDtypeStruct((b, t, heads, dv), dtype),
              jax.ShapeDtypeStruct((b, heads, dq, dv), jnp.float32))
  return plgpu.kernel(
      entry,
      out_type=out_type,
      grid=(dv // v_block, heads, b),
      grid_names=("vb", "heads", "batch"),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(
          approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane),
      interpret=interpret,
  )(*inputs)
