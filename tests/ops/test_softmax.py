"""al.dot_product_attention: JAX's op, with cuDNN first on GPU for None."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnlib as al
from attnlib.ops import softmax

_ON_GPU = jax.default_backend() == "gpu"


def _qkv(dtype=jnp.float32, t=16):
  ks = jax.random.split(jax.random.key(0), 3)
  return tuple(jax.random.normal(k, (2, t, 4, 32), jnp.float32).astype(dtype)
               for k in ks)


def _numpy_causal(q, k, v):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  t = s.shape[-1]
  s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


def test_matches_float64_softmax():
  q, k, v = _qkv()
  with jax.default_matmul_precision("highest"):
    o = al.dot_product_attention(q, k, v, is_causal=True)
  np.testing.assert_allclose(o, _numpy_causal(q, k, v), rtol=1e-5, atol=1e-5)


def test_falls_back_to_xla_when_cudnn_rejects(monkeypatch):
  # Pretend to be on a GPU: the cuDNN attempt fails (no cuDNN on CPU) and
  # the call must still give XLA's result.
  monkeypatch.setattr(softmax, "_cudnn_candidate", lambda q: True)
  calls = []
  real = jax.nn.dot_product_attention
  def spy(*a, implementation=None, **kw):
    calls.append(implementation)
    if implementation == "cudnn":
      raise ValueError("cuDNN does not take this call")
    return real(*a, implementation=implementation, **kw)
  monkeypatch.setattr(softmax.jax.nn, "dot_product_attention", spy)
  q, k, v = _qkv(jnp.bfloat16)
  o = softmax.dot_product_attention(q, k, v, is_causal=True)
  assert calls == ["cudnn", None]
  np.testing.assert_array_equal(o, real(q, k, v, is_causal=True, implementation="xla"))


def test_named_implementation_is_passed_through(monkeypatch):
  monkeypatch.setattr(softmax, "_cudnn_candidate", lambda q: True)
  q, k, v = _qkv()
  o = softmax.dot_product_attention(q, k, v, implementation="xla")
  np.testing.assert_array_equal(o, jax.nn.dot_product_attention(q, k, v, implementation="xla"))


def test_only_16_bit_inputs_on_gpu_are_candidates():
  q32, _, _ = _qkv()
  q16, _, _ = _qkv(jnp.bfloat16)
  assert not softmax._cudnn_candidate(q32)  # pylint: disable=protected-access
  assert softmax._cudnn_candidate(q16) == _ON_GPU  # pylint: disable=protected-access


@pytest.mark.skipif(not _ON_GPU, reason="needs a GPU with cuDNN")
def test_gpu_default_is_cudnn():
  q, k, v = _qkv(jnp.bfloat16, t=256)
  hlo = jax.jit(lambda q, k, v: al.dot_product_attention(q, k, v, is_causal=True)
                ).lower(q, k, v).compile().as_text()
  assert "cudnn" in hlo.lower()
  ref = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  np.testing.assert_allclose(np.asarray(al.dot_product_attention(q, k, v, is_causal=True),
                                        np.float32), np.asarray(ref, np.float32), atol=2e-2)
