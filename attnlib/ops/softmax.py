"""Softmax attention: ``jax.nn.dot_product_attention``, with cuDNN by default
on GPU.

attnlib does not rewrite softmax attention. This module re-exports JAX's op
under the library's namespace so that models can call every kind of
attention from ``attnlib``. The arguments and their meaning are JAX's
(``implementation=None | "xla" | "cudnn"``, which differs from the Pallas
backends of the other primitives), with one change: JAX's
``implementation=None`` means XLA's unfused attention (jax 0.11.2), which
materialises the [B, H, T, S] scores; here ``None`` on a GPU first tries
cuDNN's fused kernel for 16-bit inputs and falls back to XLA when cuDNN
rejects the call (a shape, mask or dtype it does not take). ``"xla"`` and
``"cudnn"`` are passed through unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def _cudnn_candidate(query) -> bool:
  return (jax.default_backend() == "gpu"
          and getattr(query, "dtype", None) in map(jnp.dtype, _CUDNN_DTYPES))


@functools.wraps(jax.nn.dot_product_attention)
def dot_product_attention(query, key, value, *args, implementation=None, **kwargs):
  if implementation is None and _cudnn_candidate(query):
    try:
      return jax.nn.dot_product_attention(query, key, value, *args,
                                          implementation="cudnn", **kwargs)
    except (ValueError, NotImplementedError, TypeError, RuntimeError):
      pass  # cuDNN does not take this call: XLA's attention below
  return jax.nn.dot_product_attention(query, key, value, *args,
                                      implementation=implementation, **kwargs)
