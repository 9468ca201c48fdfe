"""Backend selection and the softmax pass-through."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import attnlib as al
from attnlib.ops import _dispatch


def _xla(*_):
  return "xla"


def _kernel(*_):
  return "kernel"


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU choice")
def test_none_picks_xla_on_cpu():
  assert _dispatch.select("op", None, {"xla": _xla}) is _xla
  assert _dispatch.select("op", None, {"xla": _xla, "mosaic_gpu": _kernel}) is _xla


def test_none_with_interpret_prefers_a_kernel():
  assert _dispatch.select("op", None, {"xla": _xla, "mosaic_tpu": _kernel}, True) is _kernel
  assert _dispatch.select("op", None, {"xla": _xla}, True) is _xla


def test_named_backends():
  assert _dispatch.select("op", "mosaic_gpu", {"xla": _xla, "mosaic_gpu": _kernel}) is _kernel
  with pytest.raises(NotImplementedError, match="mosaic_tpu.*available: \\('xla',\\)"):
    _dispatch.select("al.op", "mosaic_tpu", {"xla": _xla})
  with pytest.raises(ValueError, match="implementation='triton'"):
    _dispatch.select("al.op", "triton", {"xla": _xla})
  with pytest.raises(ValueError, match="interpret"):
    _dispatch.select("al.op", None, {"xla": _xla}, interpret="yes")


def test_dot_product_attention_is_jax():
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(kk, (2, 5, 4, 8)) for kk in keys)
  got = al.dot_product_attention(q, k, v, is_causal=True)
  # Independent float64 NumPy softmax attention.
  qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
  s = np.einsum("bthd,bshd->bhts", qn, kn) / np.sqrt(8)
  s = np.where(np.tril(np.ones((5, 5), bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = np.einsum("bhts,bshd->bthd", p, vn)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
  assert al.dot_product_attention.__doc__ == jax.nn.dot_product_attention.__doc__
