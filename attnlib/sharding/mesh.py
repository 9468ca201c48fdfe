"""Device meshes with the ("x", "y", "z") axes of Pope et al. (2022).

Pope et al., "Efficiently Scaling Transformer Inference" (2022), §3.1, name
the three axes of a TPU v4 torus X, Y and Z; every layout of
`attnlib.sharding.feedforward` is written against these names. On other
hardware the axes are logical: ``MeshConfig(x=8)`` is a 1D mesh (y = z = 1).

Example (8 devices)::

  mesh = make_mesh(MeshConfig(x=2, y=2, z=2))
  mesh.shape            # {'x': 2, 'y': 2, 'z': 2}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

AXES = ("x", "y", "z")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the x, y and z mesh axes (positive ints; y and z default 1)."""

  x: int
  y: int = 1
  z: int = 1

  def __post_init__(self):
    for name in AXES:
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"MeshConfig.{name} must be a positive int, got {value!r}")

  @property
  def shape(self) -> dict[str, int]:
    """{"x": x, "y": y, "z": z}."""
    return {"x": self.x, "y": self.y, "z": self.z}

  @property
  def num_devices(self) -> int:
    return self.x * self.y * self.z


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None, *,
              explicit: bool = False) -> Mesh:
  """A `jax.sharding.Mesh` of shape (cfg.x, cfg.y, cfg.z), axes ("x", "y", "z").

  Built with `jax.make_mesh`. Args:
    cfg: the axis sizes.
    devices: the devices to use (default ``jax.devices()``); their number must
      equal ``cfg.x * cfg.y * cfg.z`` exactly (no silent truncation).
    explicit: axis types. jax 0.11's `jax.make_mesh` defaults to
      ``AxisType.Explicit`` (sharding in types); the default here is
      ``AxisType.Auto`` for every axis, so that plain ``jax.jit`` with
      NamedShardings lets XLA's partitioner propagate shardings and insert
      collectives (the "pjit" layouts), while `jax.shard_map` works either way.

  Raises:
    ValueError: cfg is not a MeshConfig, or the device count does not match.
  """
  if not isinstance(cfg, MeshConfig):
    raise ValueError(f"make_mesh: cfg must be a MeshConfig, got {cfg!r}")
  if devices is None:
    devices = jax.devices()
  devices = list(devices)
  if len(devices) != cfg.num_devices:
    raise ValueError(
        f"make_mesh: MeshConfig(x={cfg.x}, y={cfg.y}, z={cfg.z}) needs "
        f"{cfg.num_devices} devices (x*y*z), got {len(devices)}")
  kind = AxisType.Explicit if explicit else AxisType.Auto
  return jax.make_mesh((cfg.x, cfg.y, cfg.z), AXES,
                       axis_types=(kind,) * len(AXES), devices=devices)


def mesh_shape(mesh: Mesh) -> dict[str, int]:
  """{"x": .., "y": .., "z": ..} of a mesh (axes missing from it count 1)."""
  shape = dict(mesh.shape)
  return {a: int(shape.get(a, 1)) for a in AXES}


def axes_size(mesh_shape_: dict[str, int], axes: Sequence[str]) -> int:
  """The product of the sizes of the named axes."""
  return math.prod(int(mesh_shape_.get(a, 1)) for a in axes)
