"""Accelerator specs for the analytical inference cost model.

Every number is per chip and comes with its source. The interconnect number
follows the convention of Pope et al. 2022 ("Efficiently Scaling Transformer
Inference", arXiv 2211.05102, §4): one figure, the bytes per second a chip can
send to the rest of the slice in one direction, summed over its links (TPU v4:
270 GB/s = 6 torus links x 45 GB/s). Vendors that quote a bidirectional
per-chip figure are halved to match.

`ChipSpec.collective_latency_s` is a fixed cost per collective launch. The
paper gives no such number; it defaults to 0 and the PaLM reproduction in
docs/sharding_cost_model.md leaves it at 0.
"""

from __future__ import annotations

import dataclasses

__all__ = ["ChipSpec", "CHIPS", "TPU_V4", "TPU_V5E", "TPU_V5P", "H100", "H200", "get_chip"]

_GIB = 2**30


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  """One accelerator chip.

  Attributes:
    name: short name ("tpu_v4", ...).
    peak_flops: dense bf16 matmul FLOP/s.
    hbm_bandwidth: HBM bytes/s.
    hbm_bytes: HBM capacity in bytes.
    ici_bandwidth: chip-to-chip bytes/s a chip sends, one direction, all links
      together (the paper's convention, see the module docstring).
    peak_flops_int8: dense int8 matmul OP/s (used only when the cost model is
      asked for int8 compute; the paper's int8 results quantize weights only
      and still multiply in bf16, §3.6).
    topology: "torus3d", "torus2d" or "switch" (NVLink switch: any group of
      chips talks at full bandwidth). Only used by the optional axis-aware
      bandwidth mode of the cost model.
    collective_latency_s: fixed seconds per collective (not from the paper;
      default 0).
  """

  name: str
  peak_flops: float
  hbm_bandwidth: float
  hbm_bytes: float
  ici_bandwidth: float
  peak_flops_int8: float | None = None
  topology: str = "torus3d"
  collective_latency_s: float = 0.0

  def __post_init__(self):
    for field in ("peak_flops", "hbm_bandwidth", "hbm_bytes", "ici_bandwidth"):
      if not getattr(self, field) > 0:
        raise ValueError(f"ChipSpec.{field} must be > 0, got {getattr(self, field)!r}")
    if self.topology not in ("torus3d", "torus2d", "switch"):
      raise ValueError(f"unknown topology {self.topology!r}; expected torus3d, torus2d or switch")
    if self.collective_latency_s < 0:
      raise ValueError("collective_latency_s must be >= 0")

  @property
  def torus_dims(self) -> int:
    return {"torus3d": 3, "torus2d": 2, "switch": 1}[self.topology]

  def replace(self, **changes) -> ChipSpec:
    return dataclasses.replace(self, **changes)


# TPU v4, as the paper states it (§4 "Methodology"): 275 TFLOPS bf16, 32 GiB
# HBM at 1200 GB/s, 270 GB/s interconnect, 3D torus. Cloud TPU v4 docs
# (cloud.google.com/tpu/docs/v4): "Peak compute per chip 275 teraflops (bf16 or
# int8)", "HBM2 capacity and bandwidth 32 GiB, 1200 GBps".
TPU_V4 = ChipSpec(
    name="tpu_v4",
    peak_flops=275e12,
    hbm_bandwidth=1200e9,
    hbm_bytes=32 * _GIB,
    ici_bandwidth=270e9,
    peak_flops_int8=275e12,
    topology="torus3d",
)

# TPU v5e, Cloud TPU v5e docs (cloud.google.com/tpu/docs/v5e): 197 TFLOPs bf16,
# 393 TOPs int8, 16 GB HBM2 at 819 GBps, 400 GBps bidirectional ICI per chip
# (4 ports) -> 200 GB/s one direction, 2D torus.
TPU_V5E = ChipSpec(
    name="tpu_v5e",
    peak_flops=197e12,
    hbm_bandwidth=819e9,
    hbm_bytes=16e9,
    ici_bandwidth=200e9,
    peak_flops_int8=393e12,
    topology="torus2d",
)

# TPU v5p, Cloud TPU v5p docs (cloud.google.com/tpu/docs/v5p): 459 TFLOPs bf16,
# 95 GiB HBM at 2765 GBps, 1200 GBps bidirectional ICI per chip -> 600 GB/s
# one direction, 3D torus. The v5p page lists FP8 = 459 TFLOPs and no int8
# figure, so int8 compute is taken equal to bf16.
TPU_V5P = ChipSpec(
    name="tpu_v5p",
    peak_flops=459e12,
    hbm_bandwidth=2765e9,
    hbm_bytes=95 * _GIB,
    ici_bandwidth=600e9,
    peak_flops_int8=459e12,
    topology="torus3d",
)

# NVIDIA H100 SXM5 (NVIDIA H100 Tensor Core GPU datasheet): 989.4 TFLOPS dense
# bf16 (1979 with 2:4 sparsity), 1979 TOPS dense int8, 80 GB HBM3 at 3.35 TB/s,
# NVLink 4 900 GB/s bidirectional -> 450 GB/s one direction through NVSwitch.
H100 = ChipSpec(
    name="h100",
    peak_flops=989.4e12,
    hbm_bandwidth=3.35e12,
    hbm_bytes=80e9,
    ici_bandwidth=450e9,
    peak_flops_int8=1978.9e12,
    topology="switch",
)

# NVIDIA H200 SXM (NVIDIA H200 datasheet): the H100's compute and NVLink with
# 141 GB HBM3e at 4.8 TB/s.
H200 = H100.replace(name="h200", hbm_bandwidth=4.8e12, hbm_bytes=141e9)

CHIPS: dict[str, ChipSpec] = {c.name: c for c in (TPU_V4, TPU_V5E, TPU_V5P, H100, H200)}


def get_chip(name: str | ChipSpec) -> ChipSpec:
  """Returns the ChipSpec called `name` (or `name` itself if it is one)."""
  if isinstance(name, ChipSpec):
    return name
  try:
    return CHIPS[name]
  except KeyError:
    raise ValueError(f"unknown chip {name!r}; known: {sorted(CHIPS)}") from None
