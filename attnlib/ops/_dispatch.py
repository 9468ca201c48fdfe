"""Backend selection shared by every primitive.

``implementation=None`` picks the best backend available for the default
platform; a named backend is used or refused with a clear error. Only the
backends an op registers exist for it: the rest raise ``NotImplementedError``
naming what is available.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from attnlib.ops import _checks

BACKENDS = ("xla", "mosaic_tpu", "mosaic_gpu")

# Preferred kernel for each platform when implementation=None.
_PREFERRED = {"tpu": "mosaic_tpu", "gpu": "mosaic_gpu", "cuda": "mosaic_gpu"}


def select(op: str, implementation: str | None,
           available: Mapping[str, Callable], interpret: bool = False) -> Callable:
  """Returns the function for `implementation` among `available`.

  Args:
    op: public name of the op, for error messages ("al.linear_attention").
    implementation: None, or one of BACKENDS.
    available: backend name -> implementation function. Must hold "xla".
    interpret: whether the caller asked for Pallas interpret mode; with
      implementation=None it prefers a kernel even on CPU so that the kernel
      can be checked without an accelerator.
  """
  if not isinstance(interpret, bool):
    raise ValueError(f"{op}: interpret={interpret!r}, expected True or False.")
  if implementation is None:
    if interpret:
      kernels = [name for name in available if name != "xla"]
      return available[kernels[0]] if kernels else available["xla"]
    preferred = _PREFERRED.get(jax.default_backend())
    return available.get(preferred, available["xla"])
  if implementation not in BACKENDS:
    raise ValueError(
        f"{op}: implementation={implementation!r}, expected None or one of "
        f"{BACKENDS}.")
  if implementation not in available:
    raise NotImplementedError(
        f"{op}: implementation={implementation!r} is not implemented yet; "
        f"available: {tuple(available)} (or None to choose automatically).")
  return available[implementation]


def is_hopper() -> bool:
  """Whether the default device is an NVIDIA Hopper GPU (Mosaic GPU's target)."""
  device = jax.devices()[0]
  return (device.platform == "gpu"
          and str(getattr(device, "compute_capability", "")).startswith("9"))


def with_kernels(op: str, implementation: str | None, xla: Callable,
                 kernels: Mapping[str, tuple[Callable, bool, bool, str]]
                 ) -> dict[str, Callable]:
  """The `available` mapping for `select`: "xla" and the kernels that can run.

  Args:
    op, implementation: as in `select`.
    xla: the "xla" implementation.
    kernels: name -> (implementation, fits, device_ok, takes): whether the
      call fits the kernel (head dims, dtype, ...), whether this device (or
      interpret mode) can run it, and what the kernel takes, for the error.

  Raises:
    ValueError: `implementation` names a kernel that cannot run this call.
  """
  available = {"xla": xla}
  for name, (impl, fits, device_ok, takes) in kernels.items():
    if fits and device_ok:
      available[name] = impl
    elif implementation == name:
      _checks.fail(op, "implementation", name,
                   f"a backend that fits this call: the {name} kernels take "
                   f"{takes}"
                   + ("" if device_ok else ", on a Hopper GPU or with interpret=True"))
  return available


def padded_kernels(op: str, implementation: str | None, xla: Callable,
                   q: jax.Array, v: jax.Array, interpret: bool,
                   kernels: Mapping[str, tuple[Callable, object]]
                   ) -> dict[str, Callable]:
  """`with_kernels` for kernels that take head dims zero-padded to theirs.

  Args:
    op, implementation, xla: as in `with_kernels`.
    q, v: the call's queries and values (head dims q.shape[-1] for q and k,
      v.shape[-1]; dtype q.dtype).
    interpret: whether the call asked for interpret mode ("mosaic_gpu" then
      runs off Hopper too).
    kernels: name ("mosaic_tpu", "mosaic_gpu") -> (implementation, kernel
      module); the module has SUPPORTED_HEAD_DIMS, SUPPORTED_DTYPES and
      supports(d, dv, dtype).
  """
  d, dv, dtype = q.shape[-1], v.shape[-1], q.dtype
  entries = {}
  for name, (impl, module) in kernels.items():
    dims = module.SUPPORTED_HEAD_DIMS
    dp, vp = padded_dim(d, dims), padded_dim(dv, dims)
    fits = dp is not None and vp is not None and module.supports(dp, vp, dtype)
    device_ok = name != "mosaic_gpu" or interpret or is_hopper()
    takes = (f"head dims up to {max(dims)} (got D={d}, V={dv}) and dtypes "
             f"{[jnp.dtype(x).name for x in module.SUPPORTED_DTYPES]} (got "
             f"{jnp.dtype(dtype).name})")
    entries[name] = (impl, fits, device_ok, takes)
  return with_kernels(op, implementation, xla, entries)


def padded_dim(d: int, supported: tuple[int, ...]) -> int | None:
  """The smallest head dim in `supported` that is >= d (kernels take inputs
  zero-padded to it: zero columns change no dot product), or None."""
  return min((x for x in supported if x >= d), default=None)


def pad_last(x: jax.Array, n: int) -> jax.Array:
  """x zero-padded on its last axis to n (x itself when already n)."""
  if x.shape[-1] == n:
    return x
  return jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, n - x.shape[-1]),))
