"""al.linear_attention through the Mosaic TPU kernels (TPU interpret mode on CPU):
forward, final state and every gradient against the naive oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnlib as al
from tests.oracles import linear_attention as oracle
from tests.tpu_export import tpu_mlir


def _inputs(seed, b=1, t=150, h=2, hkv=1, dk=32, dv=48, decay="gate", dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q, k = (rng.normal(size=(b, t, n, dk)) for n in (h, hkv))
  v = rng.normal(size=(b, t, hkv, dv))
  q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
  if decay == "gate":
    d = jnp.asarray(np.log(rng.uniform(0.8, 1.0, size=(b, t, h))), jnp.float32)
  elif decay == "rate":
    d = jnp.asarray(rng.uniform(0.0, 0.2, size=(h,)), jnp.float32)
  else:
    d = None
  s0 = jnp.asarray(rng.normal(size=(b, h, dk, dv)), jnp.float32)
  return q, k, v, d, s0


def _loss(fn, q, k, v, d, s0, w_o, w_s):
  o, s = fn(q, k, v, d, s0)
  return jnp.sum(o.astype(jnp.float32) * w_o) + jnp.sum(s * w_s)


def _kernel(q, k, v, d, s0):
  return al.linear_attention(q, k, v, decay=d, initial_state=s0, return_final_state=True,
                             implementation="mosaic_tpu", interpret=True)


def _oracle(q, k, v, d, s0):
  return oracle.linear_attention(q, k, v, decay=d, initial_state=s0)


# T = 150 is not a multiple of the 128-token chunk; K = 32, V = 48 are padded to 64.
@pytest.mark.parametrize("decay", ["gate", "rate", None])
def test_forward_and_gradients_match_the_oracle(decay):
  q, k, v, d, s0 = _inputs(0, decay=decay)
  o, s = _kernel(q, k, v, d, s0)
  o_ref, s_ref = _oracle(q, k, v, d, s0)
  np.testing.assert_allclose(o, o_ref, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(s, s_ref, atol=1e-4, rtol=1e-4)
  rng = np.random.default_rng(1)
  w_o = jnp.asarray(rng.normal(size=o.shape), jnp.float32)
  w_s = jnp.asarray(rng.normal(size=s.shape), jnp.float32)
  argnums = (0, 1, 2, 4) if d is None else (0, 1, 2, 3, 4)
  grads = jax.grad(lambda *a: _loss(_kernel, *a, w_o, w_s), argnums)(q, k, v, d, s0)
  want = jax.grad(lambda *a: _loss(_oracle, *a, w_o, w_s), argnums)(q, k, v, d, s0)
  names = ("dq", "dk", "dv", "ds0") if d is None else ("dq", "dk", "dv", "dg", "ds0")
  for name, g, g_ref in zip(names, grads, want):
    scale = float(jnp.abs(g_ref).max())
    np.testing.assert_allclose(g / scale, g_ref / scale, atol=2e-5, err_msg=name)


def test_bfloat16_and_gqa():
  q, k, v, d, s0 = _inputs(2, b=2, t=64, h=4, hkv=2, dk=64, dv=64, dtype=jnp.bfloat16)
  o, s = _kernel(q, k, v, d, s0)
  o_ref, s_ref = _oracle(q, k, v, d, s0)
  assert o.dtype == jnp.bfloat16
  scale = float(jnp.abs(o_ref).max())
  np.testing.assert_allclose(o.astype(jnp.float32) / scale, o_ref / scale, atol=2e-2)
  np.testing.assert_allclose(s / float(jnp.abs(s_ref).max()),
                             s_ref / float(jnp.abs(s_ref).max()), atol=2e-2)


def test_non_causal_and_default_choice():
  q, k, v, _, s0 = _inputs(3, decay=None)
  got = al.linear_attention(q, k, v, is_causal=False, initial_state=s0,
                            implementation="mosaic_tpu", interpret=True)
  want, _ = oracle.linear_attention(q, k, v, is_causal=False, initial_state=s0)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  # implementation=None with interpret=True picks the kernel (same numbers as naming it).
  np.testing.assert_array_equal(
      al.linear_attention(q, k, v, interpret=True),
      al.linear_attention(q, k, v, implementation="mosaic_tpu", interpret=True))


def test_head_dims_beyond_the_kernel():
  q, k, v, d, s0 = _inputs(4, t=8, dk=300, dv=8)
  with pytest.raises(ValueError, match="mosaic_tpu"):
    al.linear_attention(q, k, v, implementation="mosaic_tpu", interpret=True)
  # implementation=None falls back to xla.
  got = al.linear_attention(q, k, v, decay=d, interpret=True)
  want, _ = _oracle(q, k, v, d, jnp.zeros_like(s0))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_public_op_and_its_gradient_lower_for_tpu(dtype):
  """What implementation=None picks on a TPU lowers to Mosaic custom calls:
  the forward kernel, and the forward + both backward kernels under grad."""
  b, t, h, d = 2, 8192 + 5, 4, 128
  spec = lambda *s: jax.ShapeDtypeStruct(s, dtype)
  args = (spec(b, t, h, d), spec(b, t, h // 2, d), spec(b, t, h // 2, d),
          jax.ShapeDtypeStruct((b, t, h), jnp.float32))

  def loss(q, k, v, g):
    return jnp.sum(al.linear_attention(q, k, v, decay=g, implementation="mosaic_tpu")
                   .astype(jnp.float32))

  assert tpu_mlir(loss, *args).count("tpu_custom_call") == 1
  grad = jax.grad(loss, argnums=(0, 1, 2, 3))
  assert tpu_mlir(grad, *args).count("tpu_custom_call") == 3


# --- Mosaic GPU (forward and backward kernels), in its interpret mode.

def _gpu(q, k, v, d, s0):
  return al.linear_attention(q, k, v, decay=d, initial_state=s0, return_final_state=True,
                             implementation="mosaic_gpu", interpret=True)


@pytest.mark.parametrize("decay", ["gate", "rate", None])
def test_mosaic_gpu_forward_and_gradients(decay):
  # T = 70: not a multiple of the 64-token chunk; K = 40, V = 64 (K padded to 64); GQA.
  q, k, v, d, s0 = _inputs(5, t=70, h=2, hkv=1, dk=40, dv=64, decay=decay,
                           dtype=jnp.bfloat16)
  o, s = _gpu(q, k, v, d, s0)
  o_ref, s_ref = _oracle(q, k, v, d, s0)
  assert o.dtype == jnp.bfloat16
  for got, want in ((o, o_ref), (s, s_ref)):
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(got.astype(jnp.float32) / scale, want / scale, atol=2e-2)
  rng = np.random.default_rng(6)
  w_o = jnp.asarray(rng.normal(size=o.shape), jnp.float32)
  w_s = jnp.asarray(rng.normal(size=s.shape), jnp.float32)
  argnums = (0, 1, 2, 4) if d is None else (0, 1, 2, 3, 4)
  grads = jax.grad(lambda *a: _loss(_gpu, *a, w_o, w_s), argnums)(q, k, v, d, s0)
  want = jax.grad(lambda *a: _loss(_oracle, *a, w_o, w_s), argnums)(q, k, v, d, s0)
  for g, g_ref in zip(grads, want):
    scale = float(jnp.abs(g_ref.astype(jnp.float32)).max())
    np.testing.assert_allclose(np.asarray(g, np.float32) / scale,
                               np.asarray(g_ref, np.float32) / scale, atol=2e-2)


def test_mosaic_gpu_refuses_what_it_cannot_run():
  q, k, v, d, s0 = _inputs(7, t=8, dk=64, dv=64)  # float32
  with pytest.raises(ValueError, match="implementation='mosaic_gpu'.*float32"):
    _gpu(q, k, v, d, s0)
  q, k, v, d, s0 = _inputs(7, t=8, dk=256, dv=64, dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="K=256"):
    _gpu(q, k, v, d, s0)


@pytest.mark.skipif(not (jax.default_backend() == "gpu"
                         and str(getattr(jax.devices()[0], "compute_capability", "")
                                 ).startswith("9")), reason="needs a Hopper GPU")
def test_mosaic_gpu_on_hopper_matches_xla():
  q, k, v, d, s0 = _inputs(8, b=2, t=1000, h=4, hkv=2, dk=128, dv=128, dtype=jnp.bfloat16)

  def run(impl):
    f = lambda *a: al.linear_attention(*a, decay=d, initial_state=s0, return_final_state=True,
                                       implementation=impl)
    (o, s), pullback = jax.vjp(f, q, k, v)
    return (o, s) + pullback((jnp.ones_like(o), jnp.ones_like(s)))

  for got, want in zip(jax.jit(lambda: run("mosaic_gpu"))(), jax.jit(lambda: run("xla"))()):
    scale = float(jnp.abs(want.astype(jnp.float32)).max())
    np.testing.assert_allclose(np.asarray(got, np.float32) / scale,
                               np.asarray(want, np.float32) / scale, atol=2e-2)


@pytest.mark.parametrize("impl", ["mosaic_tpu", "mosaic_gpu"])
def test_kernels_without_initial_state(impl):
  """initial_state=None reaches the kernels as None (zeros, nothing read):
  forward, final state and gradients still match the oracle."""
  dtype = jnp.float32 if impl == "mosaic_tpu" else jnp.bfloat16
  q, k, v, d, _ = _inputs(9, t=70, h=2, hkv=1, dk=64, dv=64, decay="gate", dtype=dtype)
  run = lambda q, k, v, d: al.linear_attention(q, k, v, decay=d, return_final_state=True,
                                               implementation=impl, interpret=True)
  ref = lambda q, k, v, d: oracle.linear_attention(q, k, v, decay=d)
  rng = np.random.default_rng(10)
  w_o = jnp.asarray(rng.normal(size=(1, 70, 2, 64)), jnp.float32)
  w_s = jnp.asarray(rng.normal(size=(1, 2, 64, 64)), jnp.float32)
  loss = lambda fn: lambda *a: (jnp.sum(fn(*a)[0].astype(jnp.float32) * w_o)
                                + jnp.sum(fn(*a)[1] * w_s))
  got = (*run(q, k, v, d), *jax.grad(loss(run), (0, 1, 2, 3))(q, k, v, d))
  want = (*ref(q, k, v, d), *jax.grad(loss(ref), (0, 1, 2, 3))(q, k, v, d))
  tol = 1e-4 if dtype == jnp.float32 else 2e-2
  for x, y in zip(got, want):
    scale = float(jnp.abs(y.astype(jnp.float32)).max())
    np.testing.assert_allclose(np.asarray(x, np.float32) / scale,
                               np.asarray(y, np.float32) / scale, atol=tol)
