"""Helpers shared by the Mosaic GPU (Hopper) kernels of every family.

Both exist because of Mosaic GPU's CPU interpreter in jax 0.11.2, which the
kernels' CI tests run under: it takes interpret parameters rather than a
flag, and it does not handle `run_state` (accumulators that start from a
value).
"""

from __future__ import annotations

import jax.experimental.pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

SMEM_LIMIT = 227 * 1024   # per-block opt-in SMEM on H100/H200, in bytes


def interpret_params(interpret):
  """`plgpu.kernel`'s interpret= from a kernel's argument: False -> None
  (compile for the GPU), True -> default `plgpu.InterpretGPUParams()`, an
  `InterpretGPUParams` as is."""
  if interpret is True:
    return plgpu.InterpretGPUParams()
  return None if interpret is False else interpret


def accumulate(mma, inits, interpret):
  """Returns inits[i] + (the products `mma(*acc_refs)` issues into acc_refs[i]).

  On the GPU (`interpret` None) each accumulator starts from its init
  (`pl.run_state`; the wgmmas are awaited once, at the end). Interpret mode
  does not handle `run_state_p`, so there the products go into fresh zero
  accumulators (`pl.run_scoped`) and the inits are added afterwards: the
  same math, one extra register add.
  """
  if interpret is None:
    return pl.run_state(lambda refs: mma(*refs))(
        tuple(plgpu.ACC.init(x) for x in inits))
  def scoped(*acc_refs):
    mma(*acc_refs)
    return tuple(r[...] for r in acc_refs)
  outs = pl.run_scoped(
      scoped, *(plgpu.ACC(x.shape, jnp.float32) for x in inits))
  return tuple(x + y for x, y in zip(inits, outs))
