"""Warp-specialized forward sweep of blocked linear attention for Hopper.

The same math as `mosaic_gpu._sweep` in the forward direction (its module
docstring has the derivation): per chunk of C tokens, with G the in-chunk
cumulative log-gates, G_C their last value and E_i the [Dq, v_block] float32
state entering chunk i,

  out_i = out_scale * ( ((X Y^T) * D) Z  +  diag(exp(G)) (X E_i) )
  E_{i+1} = exp(G_C) E_i + Y^T (Z * exp(G_C - G)),    D_ts = exp(G_t - G_s), s <= t.

Lightning Attention-2 splits the intra-chunk term from the inter-chunk one
because only the latter needs the state. Here only the state update is a
chain; everything that produces output is not, so it gets its own
warpgroups and runs two chunks at a time:

  warpgroup 0, state: holds E in registers; per chunk i it publishes E_i
    (16-bit, SMEM buffer i % 2), scales W = Z * exp(G_C - G) (or Y, whichever
    is narrower) into SMEM and runs one wgmma, E += Y^T W. That is all that
    lies on the chunk-to-chunk critical path.
  warpgroups 1 and 2, output, for the even and the odd chunks: A = X Y^T with
    the decay tile computed while it runs, then one wgmma group
    O = (A * D) Z, P = X E_i, and out = out_scale (O + exp(G) P) -> SMEM ->
    TMA store. Two of them so that one chunk's exponentials and epilogue
    overlap the other's matmuls.
  warpgroup 3, memory: TMA loads of X, Y [C, Dq], Z [C, v_block] and the
    in-chunk cumulative gates G into `max_concurrent_steps` SMEM slots.

Barriers: per slot, one TMA barrier per input and `consumed` (the state
warpgroup and the slot's output warpgroup); per E buffer, `e_ready` (state ->
output) and `e_free` (output -> state). The slot count must be even: chunk i
uses slot i % steps and output warpgroup i % 2, so each output warpgroup waits
on every phase of its own slots' barriers and never on the other's.

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

_STATE, _OUTPUT, _MEMORY = 0, (1, 2), 3     # warpgroup indices
_COMPUTE_REGS, _MEMORY_REGS = 160, 24       # 3 * 160 + 24 <= 65536 / 128


def _swizzle(cols: int) -> int:
  """Swizzle bytes of a 16-bit SMEM tile `cols` wide (wgmma's format)."""
  return min(128, 2 * cols)


def _steps(max_concurrent_steps: int, n_chunks: int) -> int:
  return max(1, min(max_concurrent_steps, n_chunks))


def _smem_bytes(chunk, dq, v_block, steps, dtype, has_gates) -> int:
  """SMEM the kernel allocates (without barriers)."""
  itemsize = jnp.dtype(dtype).itemsize
  w_cols = v_block if v_block < dq else dq
  gate_len = chunk if has_gates else 0
  return (steps * ((2 * chunk * dq + chunk * v_block) * itemsize + gate_len * 4)
          + (chunk * w_cols * itemsize if has_gates else 0)   # W
          + 2 * dq * v_block * itemsize       # E_i, one per output warpgroup
          + 2 * chunk * v_block * itemsize)   # out tiles, likewise


def fits(chunk: int, dq: int, v_block: int, max_concurrent_steps: int,
         n_chunks: int, dtype, has_gates: bool) -> bool:
  """Whether `forward_sweep` takes this configuration: chunk <= 64 (an
  output warpgroup holds [C, C] float32 score and decay tiles, 2 C^2 / 128
  registers per thread), one swizzle for Dq- and v_block-wide tiles (X E and
  Y^T W pair them in one wgmma; v_block=32 with Dq=128 does not), an even slot
  count (or one slot per chunk) and SMEM (with ~4 KiB for barriers and
  alignment) within one block's 227 KiB."""
  steps = _steps(max_concurrent_steps, n_chunks)
  return (chunk <= 64 and _swizzle(dq) == _swizzle(v_block)
          and (steps == n_chunks or steps % 2 == 0)
          and _smem_bytes(chunk, dq, v_block, steps, dtype, has_gates) + 4096
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
      == 0 and `fits(...)` must hold (an even max_concurrent_steps, 2 or 4).
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
                     f"max_concurrent_steps={max_concurrent_steps}: needs chunk "
                     f"<= 64, one swizzle for Dq and v_block, an even number of slots and ~{need} bytes of SMEM <= "
                     f"{common.SMEM_LIMIT}")
  scale_z = v_block < dq          # (Y * w)^T Z == Y^T (w * Z): scale the narrower
  w_cols = v_block if scale_z else dq
  swz = lambda cols: (plgpu.TilingTransform((8, _swizzle(cols) // 2)),
                      plgpu.SwizzleTransform(_swizzle(cols)))
  wgmma_layout = plgpu.Layout.WGMMA
  row_layout = plgpu.Layout.WGMMA.reduce(1)
  col_layout = plgpu.Layout.WGMMA.reduce(0)

  def kernel(x_ref, y_ref, z_ref, g_ref, e0_ref, o_ref, ef_ref, buffers,
             loaded, consumed, e_ready, e_free):
    x_s, y_s, z_s, g_s, w_s, e_s, o_s, a_s = buffers
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

    def set_registers(n, action):
      if interpret is None:
        plgpu.set_max_registers(n, action=action)

    @pl.when(wg == _MEMORY)
    def _memory():
      set_registers(_MEMORY_REGS, "decrease")

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

    @pl.when(wg == _STATE)
    def _state():
      set_registers(_COMPUTE_REGS, "increase")
      if has_state:
        e_init = plgpu.load(e0_ref.at[bb, hh, :, vcols],
                            layout=wgmma_layout, optimized=False)
      else:
        e_init = plgpu.layout_cast(jnp.zeros((dq, v_block), jnp.float32),
                                   wgmma_layout)

      def chunk_step(i, e):
        slot, j = lax.rem(i, steps), lax.rem(i, 2)

        @pl.when(i >= 2)
        def _():
          plgpu.barrier_wait(e_free.at[j])   # chunk i - 2 has read e_s[j]

        e_s.at[j][...] = e.astype(dtype)     # E_i for chunk i's output
        plgpu.commit_smem()
        plgpu.barrier_arrive(e_ready.at[j])
        plgpu.barrier_wait(y_bar.at[slot])
        plgpu.barrier_wait(z_bar.at[slot])
        if has_gates:
          plgpu.barrier_wait(g_bar.at[slot])
          src = z_s.at[slot] if scale_z else y_s.at[slot]
          w = plgpu.load(src, layout=wgmma_layout).astype(jnp.float32)
          e_w = jnp.exp(gate_last(slot) - gate_rows(slot))      # G_C - G_t
          w_s[...] = (w * lax.broadcast_in_dim(e_w, (chunk, w_cols), [0])
                      ).astype(dtype)
          plgpu.commit_smem()
          e = e * jnp.exp(gate_last(slot))                       # exp(G_C) E
          yt, zs = (y_s.at[slot], w_s) if scale_z else (w_s, z_s.at[slot])
        else:
          yt, zs = y_s.at[slot], z_s.at[slot]
        (e,) = common.accumulate(
            lambda e_ref: plgpu.wgmma(e_ref, yt.transpose((1, 0)), zs), (e,),
            interpret)
        plgpu.barrier_arrive(consumed.at[slot])
        return e

      e_final = lax.fori_loop(0, n_chunks, chunk_step, e_init)
      ef_ref.at[bb, hh, :, vcols][...] = e_final
      @pl.loop(max(n_chunks - 2, 0), n_chunks)   # the last two E_i read
      def _drain(i):
        plgpu.barrier_wait(e_free.at[lax.rem(i, 2)])

    def output(p):   # chunks p, p + 2, ...
      set_registers(_COMPUTE_REGS, "increase")
      row = plgpu.broadcasted_iota(jnp.int32, (chunk, chunk), 0,
                                   layout=wgmma_layout)
      col = plgpu.broadcasted_iota(jnp.int32, (chunk, chunk), 1,
                                   layout=wgmma_layout)

      @pl.loop(0, (n_chunks - p + 1) // 2)
      def _chunk(k):
        i = 2 * k + p
        slot = lax.rem(i, steps)
        plgpu.barrier_wait(x_bar.at[slot])
        plgpu.barrier_wait(y_bar.at[slot])
        if has_gates:
          plgpu.barrier_wait(g_bar.at[slot])

        def qk(a_ref):   # A = X Y^T; the decay tile while the wgmma runs
          plgpu.wgmma(a_ref, x_s.at[slot], y_s.at[slot].transpose((1, 0)))
          if not has_gates:
            return a_ref[...], None, None
          g_row = gate_rows(slot)                                 # G_t
          g_col = plgpu.load(g_s.at[slot], layout=col_layout)     # G_s
          diff = (lax.broadcast_in_dim(g_row, (chunk, chunk), [0])
                  - lax.broadcast_in_dim(g_col, (chunk, chunk), [1]))
          decay = jnp.exp(jnp.where(row >= col, diff, -jnp.inf))
          return a_ref[...], decay, jnp.exp(g_row)

        a, decay, e_p = pl.run_scoped(
            qk, plgpu.ACC((chunk, chunk), jnp.float32))
        a = a * decay if has_gates else jnp.where(row >= col, a, 0.0)
        a16 = a.astype(dtype)
        if a_s is not None:   # interpret mode: wgmma takes SMEM A operands only
          a_s.at[p][...] = a16
          plgpu.commit_smem()
          a16 = a_s.at[p]
        plgpu.barrier_wait(z_bar.at[slot])
        plgpu.barrier_wait(e_ready.at[p])

        def mm(o_ref, p_ref):   # O = (A * D) Z; P = X E_i
          plgpu.wgmma(o_ref, a16, z_s.at[slot])
          plgpu.wgmma(p_ref, x_s.at[slot], e_s.at[p])
          return o_ref[...], p_ref[...]

        o_intra, p_inter = pl.run_scoped(
            mm, plgpu.ACC((chunk, v_block), jnp.float32),
            plgpu.ACC((chunk, v_block), jnp.float32))
        plgpu.barrier_arrive(e_free.at[p])
        plgpu.barrier_arrive(consumed.at[slot])
        if has_gates:
          p_inter = p_inter * lax.broadcast_in_dim(e_p, (chunk, v_block), [0])
        o = o_intra + p_inter
        if out_scale != 1.0:
          o = o * out_scale
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # o_s[p] free again
        o_s.at[p][...] = o.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_s.at[p], o_ref.at[bb, tokens(i), hh, vcols])

      plgpu.wait_smem_to_gmem(0)

    for p, wg_p in enumerate(_OUTPUT):
      pl.when(wg == wg_p)(lambda p=p: output(p))

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
        (plgpu.SMEM((chunk, w_cols), dtype, transforms=swz(w_cols))
         if has_gates else None),                                        # W
        plgpu.SMEM((2, dq, v_block), dtype, transforms=swz(v_block)),    # E_i
        plgpu.SMEM((2, chunk, v_block), dtype, transforms=swz(v_block)),  # out
        (plgpu.SMEM((2, chunk, chunk), dtype, transforms=swz(chunk))
         if interpret is not None else None),                            # A
    ]
    loaded = [plgpu.Barrier(num_barriers=steps) for _ in range(4)]
    pl.run_scoped(
        lambda bufs, ld, cons, ready, free: kernel(
            x_ref, y_ref, z_ref, g_ref, e0_ref, o_ref, ef_ref, bufs, ld, cons,
            ready, free),
        buffers, loaded,
        plgpu.Barrier(num_arrivals=2, num_barriers=steps),   # consumed
        plgpu.Barrier(num_barriers=2),                       # e_ready
        plgpu.Barrier(num_barriers=2),                       # e_free
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
      num_threads=4,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(
          approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane),
      interpret=interpret,
  )(*inputs)
