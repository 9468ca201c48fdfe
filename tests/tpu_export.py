"""Lowering for TPU on a machine without one (the tests' proof that Mosaic accepts a kernel)."""

from __future__ import annotations

import jax

# The chip the lowering targets; jax.export refuses "cpu" as a TPU device kind.
TARGET_TPU = "TPU v5e"


def tpu_mlir(fn, *args, device_kind: str = TARGET_TPU) -> str:
  """The StableHLO text of jax.jit(fn) exported for TPU at `args` (ShapeDtypeStructs)."""
  mesh = jax.sharding.AbstractMesh(
      (1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
          device_kind=device_kind, num_cores=1, platform="tpu"))
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()
