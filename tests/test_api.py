"""Every public primitive: callable on CPU, jit-able, vmap-able, differentiable,
and one consistent story for `implementation=`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnlib as al

B, T, H, HKV, D = 2, 11, 4, 2, 8


@pytest.fixture(autouse=True)
def _exact_matmuls():
  """Float32 matmuls at full precision, so that comparisons between primitives
  hold to 1e-5 on GPUs/TPUs too (their default is reduced precision)."""
  with jax.default_matmul_precision("highest"):
    yield


def _inputs(spatial=(T,), q_heads=H):
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (B, *spatial, q_heads, D))
  k = jax.random.normal(keys[1], (B, *spatial, HKV, D))
  v = jax.random.normal(keys[2], (B, *spatial, HKV, D))
  return q, k, v


def _scan_inputs():
  q, k, v = _inputs()
  return q[:, 0], k, v  # one query per (batch, head)


# name -> (function of (q, k, v, **kwargs), inputs)
PRIMITIVES = {
    "linear_attention": (al.linear_attention, _inputs()),
    "linear_attention_gated": (
        functools.partial(al.linear_attention,
                          decay=jax.nn.log_sigmoid(jnp.ones((B, T, H)))), _inputs()),
    "sliding_window_attention": (
        functools.partial(al.sliding_window_attention, local_window_size=(3, 1)), _inputs()),
    "neighborhood_attention_2d": (
        functools.partial(al.neighborhood_attention, kernel_size=3, dilation=(1, 2)),
        _inputs(spatial=(5, 6))),
    "sigmoid_attention": (
        functools.partial(al.sigmoid_attention, is_causal=True), _inputs()),
    "attention_scan": (al.attention_scan, _scan_inputs()),
}


@pytest.mark.parametrize("name", sorted(PRIMITIVES))
def test_jit_vmap_grad(name):
  fn, (q, k, v) = PRIMITIVES[name]
  eager = fn(q, k, v)
  assert eager.shape[:-1] == (B, *k.shape[1:-2], H) and eager.dtype == q.dtype
  np.testing.assert_allclose(jax.jit(fn)(q, k, v), eager, atol=1e-5, rtol=1e-5)
  # vmap over an extra leading axis equals the per-slice calls.
  stacked = [jnp.stack([x, 2 * x]) for x in (q, k, v)]
  batched = jax.vmap(fn)(*stacked)
  np.testing.assert_allclose(batched[1], fn(2 * q, 2 * k, 2 * v), atol=1e-5, rtol=1e-5)
  grads = jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
  for g, x in zip(grads, (q, k, v)):
    assert g.shape == x.shape and bool(jnp.all(jnp.isfinite(g)))
    assert float(jnp.abs(g).max()) > 0


# The Pallas kernels each primitive has so far (the float32 inputs here fit
# the TPU kernels; the Mosaic GPU kernel takes bf16/f16 and refuses them).
KERNELS = {"linear_attention": {"mosaic_tpu"}, "linear_attention_gated": {"mosaic_tpu"},
           "sliding_window_attention": {"mosaic_tpu"},
           "neighborhood_attention_2d": {"mosaic_tpu"},
           "sigmoid_attention": {"mosaic_tpu"}, "attention_scan": {"mosaic_tpu"}}
REFUSED = {"linear_attention": {"mosaic_gpu"}, "linear_attention_gated": {"mosaic_gpu"},
           "sliding_window_attention": {"mosaic_gpu"},
           "neighborhood_attention_2d": {"mosaic_gpu"},
           "sigmoid_attention": {"mosaic_gpu"}, "attention_scan": {"mosaic_gpu"}}


@pytest.mark.parametrize("name", sorted(PRIMITIVES))
def test_implementation_names(name):
  fn, (q, k, v) = PRIMITIVES[name]
  np.testing.assert_allclose(fn(q, k, v, implementation="xla"), fn(q, k, v), atol=1e-6)
  with pytest.raises(ValueError, match="implementation"):
    fn(q, k, v, implementation="triton")
  for kernel in ("mosaic_tpu", "mosaic_gpu"):
    if kernel in KERNELS.get(name, ()):  # in interpret mode on CPU
      np.testing.assert_allclose(fn(q, k, v, implementation=kernel, interpret=True),
                                 fn(q, k, v), atol=1e-4, rtol=1e-4)
    elif kernel in REFUSED.get(name, ()):
      with pytest.raises(ValueError, match=f"implementation='{kernel}'"):
        fn(q, k, v, implementation=kernel, interpret=True)
    else:
      with pytest.raises(NotImplementedError, match=kernel):
        fn(q, k, v, implementation=kernel)


# Identities between primitives (each side computed by a different primitive).

def test_causal_1d_neighborhood_is_causal_sliding_window():
  q, k, v = _inputs()
  for kernel_size in (2, 3, 6):
    na = al.neighborhood_attention(q, k, v, kernel_size=kernel_size, is_causal=True)
    sw = al.sliding_window_attention(q, k, v, local_window_size=(kernel_size - 1, 0),
                                     is_causal=True)
    np.testing.assert_allclose(na, sw, atol=1e-5, rtol=1e-5)


def test_full_window_sliding_window_is_softmax_attention():
  q, k, v = _inputs()
  sw = al.sliding_window_attention(q, k, v, local_window_size=T)
  np.testing.assert_allclose(sw, al.dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_attention_scan_last_output_is_causal_softmax_last_row():
  q, k, v = _inputs()
  scan = al.attention_scan(q[:, -1], k, v)                      # the last query, every prefix
  full = al.dot_product_attention(q[:, -1:], k, v)              # [B, 1, H, V]
  np.testing.assert_allclose(scan[:, -1], full[:, 0], atol=1e-5, rtol=1e-5)
