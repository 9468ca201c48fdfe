"""Reading array sizes off a jaxpr, for the tests that bound memory."""

from __future__ import annotations

import math
import re

import jax


def largest_array(f, *args) -> int:
  """Most elements of any array in the jaxpr of f(*args) (nested jaxprs too)."""
  text = str(jax.make_jaxpr(f)(*args))
  shapes = re.findall(r"(?:f32|bool|i32)\[([0-9,]*)\]", text)
  return max(math.prod(int(n) for n in s.split(",") if n) for s in shapes)
