"""A hand-rolled Mosaic GPU pipeline for block-sparse kernels whose steps
come in two kinds: "edge" steps (a mask to apply, maybe a step to skip) and
"interior" steps (nothing to decide). The steps run as two loops, edge steps
first, while the TMA prefetch runs straight through both, so the interior
loop's body carries no `lax.cond`.

Why: `plgpu.emit_pipeline` runs one body for every step, so the step kinds
are told apart inside it, with a `lax.cond` around the mask and one around
the whole step. Those conds cost every step, taken or not: at full
attention, where every step is interior, the sliding-window dk/dv kernel was
8-12% faster with them removed (BENCHMARKS.md 4t). Two
`emit_pipeline` calls in a row would drain and refill the buffers between
them; here one prefetch sequence feeds both loops.

Step s of n_edge + n_interior reads buffer slot s % slots, filled by
`fetch(s, slot)` (the TMA copies of step s, arriving on `produced.at[slot]`)
`slots` steps ahead:
- `run` (one warpgroup, no memory warpgroup): the same warpgroup issues the
  copies of step s + slots right after step s, whose wgmmas it has awaited;
- `produce` and `run` with `consumed` (warp-specialized): a memory
  warpgroup issues them once every compute warpgroup has arrived on
  `consumed.at[slot]` after step s.
`kv_loops` (one warpgroup streaming K and V tiles) and `warp_specialized`
(`emit_pipeline_warp_specialized`'s shape) put them together. On the H100
(BENCHMARKS.md 4u) the sliding-window forwards and dq kernel gained
1.01-1.07x from them; its warp-specialized dk/dv kernel did not (0.89x at
window 512), so it keeps `emit_pipeline_warp_specialized` by default.
"""

from __future__ import annotations

from jax import lax
import jax.experimental.pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp


def edge_first(start, lo, hi, end):
  """(n_edge, n_interior, tile): the partner tiles [start, end) in the
  order the pipeline visits them, edge tiles [start, lo) and [hi, end)
  first, then the interior tiles [lo, hi) (start <= lo <= hi <= end,
  traced int32 scalars or Python ints); tile(s) is step s's tile."""
  n_low = lo - start
  n_edge = n_low + (end - hi)

  def tile(s):
    return jnp.where(s < n_low, start + s,
                     jnp.where(s < n_edge, hi + (s - n_low),
                               lo + (s - n_edge)))
  return n_edge, hi - lo, tile


def run(step, *, n_edge, n_interior, carry, produced, slots, fetch=None,
        consumed=None):
  """Runs carry = step(s, slot, carry, edge) for steps s in [0, n_edge)
  (edge=True) and then [n_edge, n_edge + n_interior) (edge=False); returns
  the carry. Each step first waits for its copies (`produced.at[slot]`).
  step must leave no wgmma reading the slot's buffers in flight.

  Without `consumed` (one warpgroup), `fetch` issues the copies: the first
  `slots` steps' here, step s + slots's after step s. With `consumed`
  (a compute warpgroup of a warp-specialized kernel), `produce` issues them
  from the memory warpgroup, and each step arrives on `consumed.at[slot]`.
  """
  total = n_edge + n_interior
  if consumed is None:
    for s in range(slots):
      @pl.when(s < total)
      def _():
        fetch(jnp.int32(s), s)

  def loop(edge):
    def body(s, carry):
      slot = lax.rem(s, slots)
      plgpu.barrier_wait(produced.at[slot])
      carry = step(s, slot, carry, edge)
      if consumed is not None:
        plgpu.barrier_arrive(consumed.at[slot])
      else:
        @pl.when(s + slots < total)
        def _():
          fetch(s + slots, slot)
      return carry
    return body

  carry = lax.fori_loop(0, n_edge, loop(True), carry)
  return lax.fori_loop(n_edge, total, loop(False), carry)


def kv_loops(step, k_rows, v_rows, carry, *, start, lo, hi, end, block,
             transforms):
  """A one-warpgroup kernel's loop over the key tiles [start, end) of its
  query tile: carry = step(carry, k_smem, v_smem, kt, is_interior) for
  each key tile kt, the edge tiles first (is_interior False), then the
  interior ones [lo, hi) (True), K and V [block, .] double-buffered by one
  prefetch through both loops; k_rows [Tp, D], v_rows [Tp, V] in GMEM."""
  n_edge, n_interior, tile = edge_first(start, lo, hi, end)

  def loops(k_bufs, v_bufs, bars):
    def fetch(s, slot):
      rows = pl.ds(tile(s) * block, block)
      plgpu.copy_gmem_to_smem(k_rows.at[rows], k_bufs.at[slot], bars.at[slot])
      plgpu.copy_gmem_to_smem(v_rows.at[rows], v_bufs.at[slot], bars.at[slot])
    return run(
        lambda s, slot, carry, edge: step(
            carry, k_bufs.at[slot], v_bufs.at[slot], tile(s), not edge),
        n_edge=n_edge, n_interior=n_interior, carry=carry, produced=bars,
        slots=2, fetch=fetch)
  return pl.run_scoped(
      loops,
      plgpu.SMEM((2, block, k_rows.shape[-1]), k_rows.dtype,
                 transforms=transforms),
      plgpu.SMEM((2, block, v_rows.shape[-1]), v_rows.dtype,
                 transforms=transforms),
      plgpu.Barrier(num_arrivals=2, num_barriers=2))


def warp_specialized(at, inputs, *, start, lo, hi, end, wgs,
                     memory_registers, compute, wg_axis="wg"):
  """A warp-specialized kernel's loop over the partner tiles [start, end)
  of its CTA, as `plgpu.emit_pipeline_warp_specialized` with
  `compute_context`, but edge tiles first and the interior ones [lo, hi)
  (interior for every compute warpgroup) in a loop of their own.

  inputs: (src, shape, dtype, transforms) per streamed input, src(p) its
  GMEM tile for partner tile p, double-buffered in SMEM as [2, *shape].
  at(p, *smem_tiles, carry, interior) -> carry is one step of a compute
  warpgroup, interior None on edge tiles (to be decided there) and True on
  interior ones. compute(pipeline) runs on each of the `wgs` compute
  warpgroups (wg_axis 0 .. wgs - 1); pipeline(carry) runs the steps and
  returns the carry. Warpgroup `wgs` issues the copies."""
  n_edge, n_interior, tile = edge_first(start, lo, hi, end)

  def loops(*refs):
    bufs, (produced, consumed) = refs[:-2], refs[-2:]

    def fetch(s, slot):
      p = tile(s)
      for (src, *_), buf in zip(inputs, bufs):
        plgpu.copy_gmem_to_smem(src(p), buf.at[slot], produced.at[slot])

    def pipeline(carry):
      return run(
          lambda s, slot, carry, edge: at(
              tile(s), *(b.at[slot] for b in bufs), carry,
              interior=None if edge else True),
          n_edge=n_edge, n_interior=n_interior, carry=carry,
          produced=produced, slots=2, consumed=consumed)

    def memory():
      plgpu.set_max_registers(memory_registers, action="decrease")
      produce(fetch, total=n_edge + n_interior, consumed=consumed, slots=2)

    def computing():
      plgpu.set_max_registers(compute_registers(memory_registers, wgs),
                              action="increase")
      compute(pipeline)
    lax.cond(lax.axis_index(wg_axis) == wgs, memory, computing)

  pl.run_scoped(
      loops,
      *(plgpu.SMEM((2, *shape), dtype, transforms=transforms)
        for _, shape, dtype, transforms in inputs),
      plgpu.Barrier(num_arrivals=len(inputs), num_barriers=2),
      plgpu.Barrier(num_arrivals=wgs, num_barriers=2),
      collective_axes=wg_axis)


def produce(fetch, *, total, consumed, slots):
  """The memory warpgroup's side of `run`: fetch(s, slot) for s in
  [0, total), each once its slot's previous step has been consumed; then
  waits for the last steps' consumption, so every phase of `consumed` is
  awaited before the kernel ends."""
  def body(s, _):
    slot = lax.rem(s, slots)

    @pl.when(s >= slots)
    def _():
      plgpu.barrier_wait(consumed.at[slot])
    fetch(s, slot)

  lax.fori_loop(0, total, body, None)

  def drain(s, _):
    plgpu.barrier_wait(consumed.at[lax.rem(s, slots)])
  lax.fori_loop(jnp.maximum(total - slots, 0), total, drain, None)


def compute_registers(memory_registers, compute_wgs):
  """Registers a thread of each compute warpgroup may raise itself to when
  the memory warpgroup lowers itself to `memory_registers`: the 64K
  register file split evenly, at most 255, in multiples of 8 (as
  `plgpu.emit_pipeline_warp_specialized` does)."""
  per_thread = min(256, (512 - memory_registers) // compute_wgs)
  return per_thread // 8 * 8
