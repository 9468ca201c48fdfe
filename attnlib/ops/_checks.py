"""Argument checks shared by every primitive.

Every public op validates its inputs with these helpers *before* anything is
traced into a kernel. Each raises ``ValueError`` whose message names the op, the
argument, the value it got and what was expected. Shapes are static under
``jax.jit``, so shape checks work on tracers too; value checks (signs of decay
rates, say) run only on concrete arrays and are skipped under tracing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_int(x: Any) -> bool:
  """A Python int that is not a bool."""
  return isinstance(x, int) and not isinstance(x, bool)


def is_real(x: Any) -> bool:
  """A Python int or float that is not a bool."""
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def fail(op: str, name: str, value: Any, expected: str) -> None:
  raise ValueError(f"{op}: {name}={value!r}, expected {expected}.")


def shape_of(x: Any) -> tuple[int, ...]:
  return tuple(np.shape(x))


def check_array(op: str, name: str, x: Any, rank: int | Sequence[int]) -> None:
  """`x` must be an array (or array-like) of the given rank(s) and floating dtype."""
  ranks = (rank,) if isinstance(rank, int) else tuple(rank)
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    fail(op, name, type(x).__name__, "an array")
  if x.ndim not in ranks:
    want = " or ".join(str(r) for r in ranks)
    fail(op, f"{name}.shape", shape_of(x), f"rank {want}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    fail(op, f"{name}.dtype", str(x.dtype), "a floating dtype")


def check_same_dtype(op: str, **arrays: Any) -> None:
  """All arrays must share one dtype (q, k, v of one call)."""
  items = list(arrays.items())
  first_name, first = items[0]
  for name, x in items[1:]:
    if x.dtype != first.dtype:
      fail(op, f"{name}.dtype", str(x.dtype), f"{first.dtype} like {first_name}")


def check_dim(op: str, name: str, x: Any, axis: int, want: int, what: str) -> None:
  """x.shape[axis] must equal `want` (described as `what`)."""
  if x.shape[axis] != want:
    fail(op, f"{name}.shape", shape_of(x), f"size {want} at axis {axis} ({what})")


def check_heads(op: str, q_heads: int, kv_heads: int, kv_name: str = "k") -> None:
  """Query heads must be a multiple of key/value heads (GQA/MQA)."""
  if kv_heads < 1 or q_heads % kv_heads:
    fail(op, f"{kv_name} heads", kv_heads,
         f"a divisor of the {q_heads} query heads (grouped-query attention)")


def check_scale(op: str, scale: Any) -> None:
  if scale is None:
    return
  if isinstance(scale, (bool, np.bool_)) or not isinstance(
      scale, (int, float, np.integer, np.floating)):
    fail(op, "scale", scale, "None or a Python float")
  if not np.isfinite(scale):
    fail(op, "scale", scale, "a finite float")


def default_scale(head_dim: int, scale: Any) -> float:
  """The logit scale: head_dim ** -0.5 when `scale` is None, else float(scale)."""
  return head_dim ** -0.5 if scale is None else float(scale)


def is_concrete(x: Any) -> bool:
  """True when `x` holds values now (not a tracer inside jit/vmap/grad)."""
  return not isinstance(x, jax.core.Tracer)


def check_bool(op: str, name: str, value: Any) -> None:
  if not isinstance(value, (bool, np.bool_)):
    fail(op, name, value, "True or False")


def check_positive_int(op: str, name: str, value: Any, minimum: int = 1) -> None:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    fail(op, name, value, f"an int >= {minimum}")
  if value < minimum:
    fail(op, name, value, f"an int >= {minimum}")
