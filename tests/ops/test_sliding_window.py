"""Tests for al.sliding_window_attention."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import attnlib as al
from attnlib.ops import _blocked
from attnlib.ops import sliding_window as sw_module
from tests.jaxpr_sizes import largest_array
from tests.oracles import sliding_window as oracle

F32_TOL = dict(atol=1e-5, rtol=1e-5)
BF16_TOL = dict(atol=2e-2, rtol=2e-2)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
  """Blocks of 4 query rows so that every test crosses block boundaries."""
  monkeypatch.setattr(sw_module, "BLOCK_Q", 4)


def make_qkv(seed, b=2, t=13, h=4, hkv=2, d=8, dv=None, dtype=jnp.float32,
             mult=1.0):
  rng = np.random.default_rng(seed)
  dv = d if dv is None else dv
  q = mult * rng.standard_normal((b, t, h, d), np.float32)
  k = mult * rng.standard_normal((b, t, hkv, d), np.float32)
  v = rng.standard_normal((b, t, hkv, dv), np.float32)
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def sides(window):
  return (window, window) if isinstance(window, int) else window


WINDOWS = [(0, 0), (3, 0), (2, 5), (5, 2), 3, (100, 100)]


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("window", WINDOWS)
def test_forward_vs_oracle(window, is_causal):
  q, k, v = make_qkv(0, t=29)
  out = al.sliding_window_attention(q, k, v, local_window_size=window,
                                    is_causal=is_causal)
  left, right = sides(window)
  want = oracle.sliding_window_attention(q, k, v, left=left, right=right,
                                         is_causal=is_causal)
  assert out.shape == q.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(out, want, **F32_TOL)


@pytest.mark.parametrize("t,block,window,is_causal", [
    (1, 4, (2, 5), False), (1, 8, 3, True), (13, 4, (2, 5), False),
    (13, 8, 3, True), (29, 8, (2, 5), False), (29, 8, (5, 2), True),
    (13, 4, (0, 9), False)])
def test_lengths_blocks_mqa_value_dim(monkeypatch, t, block, window, is_causal):
  """T = 1 / prime lengths, blocks of 4 and 8, one kv head, V != D."""
  monkeypatch.setattr(sw_module, "BLOCK_Q", block)
  q, k, v = make_qkv(1, t=t, h=3, hkv=1, dv=5)
  out = al.sliding_window_attention(q, k, v, local_window_size=window,
                                    is_causal=is_causal)
  left, right = sides(window)
  want = oracle.sliding_window_attention(q, k, v, left=left, right=right,
                                         is_causal=is_causal)
  assert out.shape == (2, t, 3, 5)
  np.testing.assert_allclose(out, want, **F32_TOL)


@pytest.mark.parametrize("window,is_causal", [(28, False), (100, True)])
def test_window_covering_everything_is_full_attention(window, is_causal):
  q, k, v = make_qkv(0, t=29)
  out = al.sliding_window_attention(q, k, v, local_window_size=window,
                                    is_causal=is_causal)
  want = jax.nn.dot_product_attention(q, k, v, is_causal=is_causal)
  np.testing.assert_allclose(out, want, **F32_TOL)


@pytest.mark.parametrize("window,is_causal", [
    ((0, 0), False), ((3, 0), False), ((2, 5), False), ((5, 2), True),
    (3, False), (3, True)])
def test_matches_jax_local_window(window, is_causal):
  """Against XLA's independent implementation (GQA: 4 query, 2 kv heads)."""
  q, k, v = make_qkv(0, t=29)
  out = al.sliding_window_attention(q, k, v, local_window_size=window,
                                    is_causal=is_causal)
  want = jax.nn.dot_product_attention(q, k, v, local_window_size=window,
                                      is_causal=is_causal)
  np.testing.assert_allclose(out, want, **F32_TOL)


def test_scale():
  q, k, v = make_qkv(2, t=13)
  out = al.sliding_window_attention(q, k, v, local_window_size=(4, 1),
                                    scale=0.7)
  want = oracle.sliding_window_attention(q, k, v, left=4, right=1, scale=0.7)
  np.testing.assert_allclose(out, want, **F32_TOL)


@pytest.mark.parametrize("dtype,window,is_causal", [
    (jnp.bfloat16, (2, 5), False), (jnp.float16, 3, True)])
def test_half_precision_vs_oracle(dtype, window, is_causal):
  q, k, v = make_qkv(5, t=29, dtype=dtype)
  out = al.sliding_window_attention(q, k, v, local_window_size=window,
                                    is_causal=is_causal)
  assert out.dtype == dtype
  left, right = sides(window)
  want = oracle.sliding_window_attention(q, k, v, left=left, right=right,
                                         is_causal=is_causal)
  np.testing.assert_allclose(out.astype(jnp.float32), want, **BF16_TOL)


@pytest.mark.parametrize("window,is_causal,t", [
    ((2, 5), False, 13), ((3, 0), True, 13), ((5, 2), True, 29),
    (100, False, 7)])
def test_gradients_vs_oracle(window, is_causal, t):
  q, k, v = make_qkv(6, t=t, dv=5)
  left, right = sides(window)
  rng = np.random.default_rng(7)
  ct = jnp.asarray(rng.standard_normal((2, t, 4, 5), np.float32))

  def lib(q, k, v):
    out = al.sliding_window_attention(q, k, v, local_window_size=window,
                                      is_causal=is_causal)
    return jnp.sum(out * ct)

  def ref(q, k, v):
    out = oracle.sliding_window_attention(q, k, v, left=left, right=right,
                                          is_causal=is_causal)
    return jnp.sum(out * ct)

  got = jax.jit(jax.grad(lib, argnums=(0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(ref, argnums=(0, 1, 2)))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5)


def test_check_grads():
  q, k, v = make_qkv(8, b=1, t=6, h=2, hkv=1, d=4)
  f = lambda q, k, v: al.sliding_window_attention(
      q, k, v, local_window_size=(1, 2), is_causal=False)
  check_grads(f, (q, k, v), order=1, modes=["rev"], eps=1e-3)


@pytest.mark.parametrize("window,is_causal", [((2, 5), False), (100, True)])
def test_large_logits_are_finite(window, is_causal):
  q, k, v = make_qkv(9, t=13, mult=100.0)          # logits ~ 1e4
  f = lambda q, k, v: jnp.sum(al.sliding_window_attention(
      q, k, v, local_window_size=window, is_causal=is_causal) ** 2)
  out = al.sliding_window_attention(q, k, v, local_window_size=window,
                                    is_causal=is_causal)
  grads = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)
  assert np.all(np.isfinite(out))
  for g in grads:
    assert np.all(np.isfinite(g))
  left, right = sides(window)
  want = oracle.sliding_window_attention(q, k, v, left=left, right=right,
                                         is_causal=is_causal)
  np.testing.assert_allclose(out, want, atol=1e-4, rtol=1e-4)


def test_banded_path_memory_is_linear(monkeypatch):
  """Forward + backward of a small window: no T x T array, no stacked blocks."""
  monkeypatch.setattr(_blocked, "WORKING_SET_ELEMENTS", 1)  # one block a step
  jax.clear_caches()  # the budget is read when the jitted op is traced
  t = 64
  q, k, v = make_qkv(10, b=1, t=t, h=2, hkv=1, d=4)
  f = jax.grad(lambda q, k, v: jnp.sum(al.sliding_window_attention(
      q, k, v, local_window_size=(3, 2))), argnums=(0, 1, 2))
  text = str(jax.make_jaxpr(f)(q, k, v))
  # Per-block logits [B, Hkv, G, Bq, Bq + left + right] = [1, 1, 2, 4, 9].
  assert "f32[1,1,2,4,9]" in text
  # T x T would be 4096 elements and the stacked block logits 1152; q has 512.
  assert largest_array(f, q, k, v) <= q.size


def test_jit():
  q, k, v = make_qkv(0, t=29)
  f = jax.jit(lambda q, k, v: al.sliding_window_attention(
      q, k, v, local_window_size=(2, 5)))
  want = oracle.sliding_window_attention(q, k, v, left=2, right=5)
  np.testing.assert_allclose(f(q, k, v), want, **F32_TOL)


def test_vmap():
  q, k, v = make_qkv(12, b=3, t=13)
  f = lambda q, k, v: al.sliding_window_attention(
      q[None], k[None], v[None], local_window_size=(2, 3))[0]
  out = jax.vmap(f)(q, k, v)
  want = oracle.sliding_window_attention(q, k, v, left=2, right=3)
  np.testing.assert_allclose(out, want, **F32_TOL)


def test_implementation_xla_and_kernels():
  q, k, v = make_qkv(0, t=29)
  out = al.sliding_window_attention(q, k, v, local_window_size=(2, 5),
                                    implementation="xla")
  want = oracle.sliding_window_attention(q, k, v, left=2, right=5)
  np.testing.assert_allclose(out, want, **F32_TOL)
  # The Mosaic GPU kernels take bf16/f16 only.
  with pytest.raises(ValueError, match="implementation='mosaic_gpu'"):
    al.sliding_window_attention(q, k, v, local_window_size=1,
                                implementation="mosaic_gpu")


# ----------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------

def _bad_call(**overrides):
  q, k, v = make_qkv(14, t=5)
  args = dict(q=q, k=k, v=v, local_window_size=2)
  args.update(overrides)
  q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
  return al.sliding_window_attention(q, k, v, **args)


_Q = jnp.zeros((2, 5, 4, 8))
_K = jnp.zeros((2, 5, 2, 8))


@pytest.mark.parametrize("overrides,match", [
    (dict(q=_Q[0]), "q.shape"),
    (dict(k=_K[..., None]), "k.shape"),
    (dict(v=_K[0]), "v.shape"),
    (dict(q=[1.0, 2.0]), "q"),
    (dict(k=jnp.zeros((3, 5, 2, 8))), "k.shape"),
    (dict(v=jnp.zeros((2, 5, 3, 8))), "v.shape"),
    (dict(k=jnp.zeros((2, 6, 2, 8)), v=jnp.zeros((2, 6, 2, 8))), "k.shape"),
    (dict(v=jnp.zeros((2, 4, 2, 8))), "v.shape"),
    (dict(k=jnp.zeros((2, 5, 3, 8)), v=jnp.zeros((2, 5, 3, 8))), "k heads"),
    (dict(k=jnp.zeros((2, 5, 2, 7))), "k.shape"),
    (dict(q=jnp.zeros((2, 0, 4, 8)), k=jnp.zeros((2, 0, 2, 8)),
          v=jnp.zeros((2, 0, 2, 8))), "q.shape"),
    (dict(v=jnp.zeros((2, 5, 2, 8), jnp.bfloat16)), "v.dtype"),
    (dict(q=_Q.astype(jnp.int32), k=_K.astype(jnp.int32),
          v=_K.astype(jnp.int32)), "q.dtype"),
    (dict(local_window_size=-1), "local_window_size"),
    (dict(local_window_size=(2, -1)), "local_window_size"),
    (dict(local_window_size=(1, 2, 3)), "local_window_size"),
    (dict(local_window_size=(1,)), "local_window_size"),
    (dict(local_window_size=2.0), "local_window_size"),
    (dict(local_window_size=(1.0, 2)), "local_window_size"),
    (dict(local_window_size=True), "local_window_size"),
    (dict(local_window_size=None), "local_window_size"),
    (dict(local_window_size="2"), "local_window_size"),
    (dict(is_causal=1), "is_causal"),
    (dict(scale="x"), "scale"),
    (dict(scale=float("nan")), "scale"),
    (dict(scale=True), "scale"),
    (dict(implementation="foo"), "implementation"),
    (dict(interpret="yes"), "interpret"),
])
def test_bad_input(overrides, match):
  with pytest.raises(ValueError, match=match) as info:
    _bad_call(**overrides)
  assert "al.sliding_window_attention" in str(info.value)


# The Pallas kernels through the public op (interpret mode on CPU): head dims
# zero-padded (40 -> 64, 24 -> 64), windows wider than T clamped, gradients.
@pytest.mark.parametrize("impl,dtype,window,is_causal", [
    ("mosaic_tpu", jnp.float32, (9, 30), False),
    ("mosaic_tpu", jnp.bfloat16, (200, 0), True),
    ("mosaic_gpu", jnp.bfloat16, (70, 5), True),
])
def test_kernels_through_the_op(impl, dtype, window, is_causal):
  q, k, v = make_qkv(3, b=1, t=70, d=40, dv=24, dtype=dtype)
  left, right = window
  rng = np.random.default_rng(4)
  w = jnp.asarray(rng.standard_normal((1, 70, 4, 24)), jnp.float32)

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)

  run = lambda q, k, v: al.sliding_window_attention(
      q, k, v, local_window_size=window, is_causal=is_causal,
      implementation=impl, interpret=True)
  ref = lambda q, k, v: oracle.sliding_window_attention(
      q, k, v, left=left, right=right, is_causal=is_causal)
  out = run(q, k, v)
  assert out.shape == (1, 70, 4, 24) and out.dtype == dtype
  got = (out,) + jax.grad(loss(run), (0, 1, 2))(q, k, v)
  want = (ref(q, k, v),) + jax.grad(loss(ref), (0, 1, 2))(q, k, v)
  tol = 1e-4 if dtype == jnp.float32 else 2e-2
  for x, y in zip(got, want):
    scale = float(jnp.abs(y.astype(jnp.float32)).max())
    np.testing.assert_allclose(np.asarray(x, np.float32) / scale,
                               np.asarray(y, np.float32) / scale, atol=tol)
