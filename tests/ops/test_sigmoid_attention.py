"""Tests for al.sigmoid_attention."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import attnlib as al
from attnlib.ops import _blocked
from attnlib.ops import sigmoid_attention as sig_module
from tests.jaxpr_sizes import largest_array
from tests.oracles import sigmoid_attention as oracle

F32_TOL = dict(atol=1e-5, rtol=1e-5)
BF16_TOL = dict(atol=2e-2, rtol=2e-2)
# One bias per query head.
HEAD_BIAS = jnp.asarray([-1.0, 0.5, -3.0, 2.0], jnp.float32)
BIASES = {"none": None, "float": -1.5, "heads": HEAD_BIAS,
          "scalar": jnp.asarray(-0.7, jnp.float32)}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
  """Blocks of 4 query rows so that every test crosses block boundaries."""
  monkeypatch.setattr(sig_module, "BLOCK_Q", 4)


def make_qkv(seed, b=2, tq=29, tk=None, h=4, hkv=2, d=8, dv=None,
             dtype=jnp.float32, mult=1.0):
  rng = np.random.default_rng(seed)
  tk = tq if tk is None else tk
  dv = d if dv is None else dv
  q = mult * rng.standard_normal((b, tq, h, d), np.float32)
  k = mult * rng.standard_normal((b, tk, hkv, d), np.float32)
  v = rng.standard_normal((b, tk, hkv, dv), np.float32)
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def sides(window):
  if window is None:
    return None, None
  return (window, window) if isinstance(window, int) else window


def check_vs_oracle(q, k, v, bias, is_causal, window, tol=F32_TOL, **kw):
  out = al.sigmoid_attention(q, k, v, bias=bias, is_causal=is_causal,
                             local_window_size=window, **kw)
  left, right = sides(window)
  want = oracle.sigmoid_attention(q, k, v, bias=bias, is_causal=is_causal,
                                  left=left, right=right, **kw)
  assert out.shape == q.shape[:3] + v.shape[3:] and out.dtype == q.dtype
  np.testing.assert_allclose(out.astype(jnp.float32), want, **tol)


@pytest.mark.parametrize("bias", list(BIASES))
@pytest.mark.parametrize("is_causal,window", [
    (False, None), (True, None), (False, (2, 5)), (True, (5, 2)),
    (False, 100)])
def test_forward_vs_oracle(bias, is_causal, window):
  q, k, v = make_qkv(0)
  check_vs_oracle(q, k, v, BIASES[bias], is_causal, window)


@pytest.mark.parametrize("tq,tk,bias", [
    (13, 29, "heads"), (29, 7, "none"), (1, 13, "float"), (13, 1, "scalar")])
def test_different_query_and_key_lengths(tq, tk, bias):
  q, k, v = make_qkv(1, tq=tq, tk=tk, dv=5)
  check_vs_oracle(q, k, v, BIASES[bias], False, None)


@pytest.mark.parametrize("t,block,is_causal,window", [
    (1, 4, True, None), (1, 8, False, (2, 5)), (13, 8, True, 3),
    (29, 8, False, (0, 9)), (13, 4, False, (0, 0))])
def test_lengths_blocks_mqa_value_dim(monkeypatch, t, block, is_causal, window):
  """T = 1 / prime lengths, blocks of 4 and 8, one kv head, V != D."""
  monkeypatch.setattr(sig_module, "BLOCK_Q", block)
  q, k, v = make_qkv(2, tq=t, h=3, hkv=1, dv=5)
  check_vs_oracle(q, k, v, None, is_causal, window)


def test_default_bias_is_minus_log_key_length():
  q, k, v = make_qkv(3, tq=13, tk=29)
  out = al.sigmoid_attention(q, k, v)
  want = oracle.sigmoid_attention(q, k, v, bias=-math.log(29))
  np.testing.assert_allclose(out, want, **F32_TOL)
  explicit = al.sigmoid_attention(q, k, v, bias=-math.log(29))
  np.testing.assert_allclose(out, explicit, **F32_TOL)
  not_tq = oracle.sigmoid_attention(q, k, v, bias=-math.log(13))
  assert np.max(np.abs(out - not_tq)) > 1e-2


def test_zero_window_is_diagonal():
  """Window (0, 0): o_i = sigmoid(scale q_i . k_i + b) v_i; the rest is 0."""
  q, k, v = make_qkv(4, tq=13, hkv=4)
  out = al.sigmoid_attention(q, k, v, bias=HEAD_BIAS, local_window_size=0)
  s = jnp.sum(q * k, axis=-1) / math.sqrt(8)
  want = jax.nn.sigmoid(s + HEAD_BIAS)[..., None] * v
  np.testing.assert_allclose(out, want, **F32_TOL)


def test_scale():
  q, k, v = make_qkv(5, tq=13)
  check_vs_oracle(q, k, v, HEAD_BIAS, True, None, scale=0.4)


@pytest.mark.parametrize("dtype,is_causal,window", [
    (jnp.bfloat16, True, None), (jnp.float16, False, (2, 5))])
def test_half_precision_vs_oracle(dtype, is_causal, window):
  q, k, v = make_qkv(6, dtype=dtype)
  check_vs_oracle(q, k, v, None, is_causal, window, tol=BF16_TOL)


@pytest.mark.parametrize("tq,tk,is_causal,window,bias", [
    (13, 29, False, None, "heads"), (13, 13, True, None, "scalar"),
    (29, 29, False, (2, 5), "heads"), (13, 13, True, 3, "none")])
def test_gradients_vs_oracle(tq, tk, is_causal, window, bias):
  q, k, v = make_qkv(7, tq=tq, tk=tk, dv=5)
  b = BIASES[bias]
  left, right = sides(window)
  rng = np.random.default_rng(8)
  ct = jnp.asarray(rng.standard_normal((2, tq, 4, 5), np.float32))
  argnums = (0, 1, 2) if b is None else (0, 1, 2, 3)

  def lib(q, k, v, b):
    out = al.sigmoid_attention(q, k, v, bias=b, is_causal=is_causal,
                               local_window_size=window)
    return jnp.sum(out * ct)

  def ref(q, k, v, b):
    out = oracle.sigmoid_attention(q, k, v, bias=b, is_causal=is_causal,
                                   left=left, right=right)
    return jnp.sum(out * ct)

  got = jax.jit(jax.grad(lib, argnums=argnums))(q, k, v, b)
  want = jax.jit(jax.grad(ref, argnums=argnums))(q, k, v, b)
  assert len(got) == len(argnums)
  for g, w in zip(got, want):
    assert g.shape == w.shape
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5)


def test_check_grads():
  q, k, v = make_qkv(9, b=1, tq=6, h=2, hkv=1, d=4)
  b = jnp.asarray([-1.0, 0.5])
  f = lambda q, k, v, b: al.sigmoid_attention(
      q, k, v, bias=b, is_causal=True, local_window_size=(2, 0))
  check_grads(f, (q, k, v, b), order=1, modes=["rev"], eps=1e-3)


@pytest.mark.parametrize("is_causal,window", [(False, None), (True, (2, 5))])
def test_large_logits_are_finite(is_causal, window):
  q, k, v = make_qkv(10, tq=13, mult=100.0)        # logits ~ 1e4
  f = lambda q, k, v, b: jnp.sum(al.sigmoid_attention(
      q, k, v, bias=b, is_causal=is_causal, local_window_size=window) ** 2)
  out = al.sigmoid_attention(q, k, v, bias=HEAD_BIAS, is_causal=is_causal,
                             local_window_size=window)
  grads = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))(q, k, v, HEAD_BIAS)
  assert np.all(np.isfinite(out))
  for g in grads:
    assert np.all(np.isfinite(g))
  left, right = sides(window)
  want = oracle.sigmoid_attention(q, k, v, bias=HEAD_BIAS, is_causal=is_causal,
                                  left=left, right=right)
  np.testing.assert_allclose(out, want, atol=1e-4, rtol=1e-4)


def test_full_span_backward_recomputes_blocks(monkeypatch):
  """Without a window a block holds Bq x Tk logits; the backward stores none."""
  monkeypatch.setattr(sig_module, "BLOCK_Q", 8)
  monkeypatch.setattr(_blocked, "WORKING_SET_ELEMENTS", 1)  # one block a step
  jax.clear_caches()  # the budget is read when the jitted op is traced
  q, k, v = make_qkv(13, b=1, tq=64, h=2, hkv=1, d=4)
  f = jax.grad(lambda q, k, v: jnp.sum(al.sigmoid_attention(
      q, k, v, is_causal=True)), argnums=(0, 1, 2))
  # One block: B * H * Bq * Tk = 1024; all blocks (or T x T): 8192.
  assert largest_array(f, q, k, v) == 1 * 2 * 8 * 64


def test_blocks_share_a_step_within_the_working_set(monkeypatch):
  """map_blocks vmaps as many blocks per step as the budget allows, no more."""
  monkeypatch.setattr(sig_module, "BLOCK_Q", 8)
  monkeypatch.setattr(_blocked, "WORKING_SET_ELEMENTS", 2 * 1024 + 5)
  jax.clear_caches()  # the budget is read when the jitted op is traced
  q, k, v = make_qkv(13, b=1, tq=64, h=2, hkv=1, d=4)
  f = jax.grad(lambda q, k, v: jnp.sum(al.sigmoid_attention(
      q, k, v, is_causal=True)), argnums=(0, 1, 2))
  # Two blocks of B * H * Bq * Tk = 1024 logits each per step.
  assert largest_array(f, q, k, v) == 2 * 1 * 2 * 8 * 64
  want = oracle.sigmoid_attention(q, k, v, bias=None, is_causal=True)
  np.testing.assert_allclose(al.sigmoid_attention(q, k, v, is_causal=True), want, **F32_TOL)


def test_jit():
  q, k, v = make_qkv(0)
  f = jax.jit(lambda q, k, v, b: al.sigmoid_attention(
      q, k, v, bias=b, local_window_size=(2, 5)))
  want = oracle.sigmoid_attention(q, k, v, bias=HEAD_BIAS, left=2, right=5)
  np.testing.assert_allclose(f(q, k, v, HEAD_BIAS), want, **F32_TOL)


def test_vmap():
  q, k, v = make_qkv(11, b=3, tq=13, tk=7)
  f = lambda q, k, v: al.sigmoid_attention(q[None], k[None], v[None])[0]
  out = jax.vmap(f)(q, k, v)
  want = oracle.sigmoid_attention(q, k, v)
  np.testing.assert_allclose(out, want, **F32_TOL)


def test_implementation_xla_and_kernels():
  q, k, v = make_qkv(0)
  out = al.sigmoid_attention(q, k, v, implementation="xla")
  np.testing.assert_allclose(out, oracle.sigmoid_attention(q, k, v), **F32_TOL)
  # The TPU kernel (TPU interpret mode) takes these float32 inputs.
  got = al.sigmoid_attention(q, k, v, implementation="mosaic_tpu",
                             interpret=True)
  np.testing.assert_allclose(got, oracle.sigmoid_attention(q, k, v),
                             **F32_TOL)
  # The Mosaic GPU kernel takes 16-bit inputs only: named, it refuses these
  # float32 ones; 16-bit ones run it in interpret mode (tests/kernels).
  with pytest.raises(ValueError, match="implementation='mosaic_gpu'"):
    al.sigmoid_attention(q, k, v, implementation="mosaic_gpu", interpret=True)
  q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
  want = oracle.sigmoid_attention(q16, k16, v16)
  got = al.sigmoid_attention(q16, k16, v16, implementation="mosaic_gpu",
                             interpret=True)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2e-2,
                             rtol=2e-2)


# ----------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------

def _bad_call(**overrides):
  q, k, v = make_qkv(12, tq=5)
  args = dict(q=q, k=k, v=v)
  args.update(overrides)
  q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
  return al.sigmoid_attention(q, k, v, **args)


_Q = jnp.zeros((2, 5, 4, 8))
_K = jnp.zeros((2, 5, 2, 8))
_K6 = jnp.zeros((2, 6, 2, 8))


@pytest.mark.parametrize("overrides,match", [
    (dict(q=_Q[0]), "q.shape"),
    (dict(k=_K[..., None]), "k.shape"),
    (dict(v=_K[0]), "v.shape"),
    (dict(q=np.zeros((2, 5, 4, 8), np.float32).tolist()), "q"),
    (dict(k=jnp.zeros((3, 5, 2, 8))), "k.shape"),
    (dict(v=jnp.zeros((2, 5, 3, 8))), "v.shape"),
    (dict(v=jnp.zeros((2, 4, 2, 8))), "v.shape"),
    (dict(k=jnp.zeros((2, 5, 3, 8)), v=jnp.zeros((2, 5, 3, 8))), "k heads"),
    (dict(k=jnp.zeros((2, 5, 2, 7))), "k.shape"),
    (dict(k=jnp.zeros((2, 0, 2, 8)), v=jnp.zeros((2, 0, 2, 8))), "k.shape"),
    (dict(k=_K.astype(jnp.bfloat16)), "k.dtype"),
    (dict(q=_Q.astype(jnp.int32), k=_K.astype(jnp.int32),
          v=_K.astype(jnp.int32)), "q.dtype"),
    (dict(k=_K6, v=_K6, is_causal=True), "k.shape"),
    (dict(k=_K6, v=_K6, local_window_size=2), "k.shape"),
    (dict(local_window_size=-1), "local_window_size"),
    (dict(local_window_size=(1, -2)), "local_window_size"),
    (dict(local_window_size=(1, 2, 3)), "local_window_size"),
    (dict(local_window_size=2.5), "local_window_size"),
    (dict(local_window_size="3"), "local_window_size"),
    (dict(bias=jnp.zeros((5,))), "bias.shape"),
    (dict(bias=jnp.zeros((1, 4))), "bias.shape"),
    (dict(bias=jnp.zeros((4,), jnp.int32)), "bias.dtype"),
    (dict(bias=True), "bias"),
    (dict(bias="-1"), "bias"),
    (dict(bias=float("nan")), "bias"),
    (dict(bias=jnp.asarray([0.0, jnp.inf, 0.0, 0.0])), "bias"),
    (dict(is_causal="no"), "is_causal"),
    (dict(scale="x"), "scale"),
    (dict(scale=float("inf")), "scale"),
    (dict(implementation="cuda"), "implementation"),
    (dict(interpret=None), "interpret"),
])
def test_bad_input(overrides, match):
  with pytest.raises(ValueError, match=match) as info:
    _bad_call(**overrides)
  assert "al.sigmoid_attention" in str(info.value)
