"""Backend selection shared by every primitive.

``implementation=None`` picks the best backend available for the default
platform; a named backend is used or refused with a clear error. Only the
backends an op registers exist for it: the rest raise ``NotImplementedError``
naming what is available.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax

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
