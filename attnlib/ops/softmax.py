"""Softmax attention: a pass-through to ``jax.nn.dot_product_attention``.

attnlib does not rewrite softmax attention: on GPU ``jax.nn.dot_product_attention``
reaches cuDNN's fused kernels, elsewhere XLA's. This module re-exports it under
the library's namespace so that models can call every kind of attention from
``attnlib``. The arguments and their meaning are JAX's (including
``implementation=None | "xla" | "cudnn"``, which differs from the Pallas
backends of the other primitives).
"""

from __future__ import annotations

import functools

import jax


@functools.wraps(jax.nn.dot_product_attention)
def dot_product_attention(*args, **kwargs):
  return jax.nn.dot_product_attention(*args, **kwargs)
