"""Tests for attnlib.feature_maps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnlib as al

fm = al.feature_maps
MAPS = {
    "identity": fm.identity,
    "elu_plus_one": fm.elu_plus_one,
    "relu": fm.relu,
    "taylor": fm.taylor,
}


def _normal(seed: int, shape, dtype=np.float32):
  return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("d", [1, 4, 8, 16])
def test_taylor_dot_is_second_order_taylor_of_exp(d):
  q = _normal(0, (2, 5, d))
  k = _normal(1, (2, 5, d))
  phi_q = np.asarray(fm.taylor(jnp.asarray(q)), np.float64)
  phi_k = np.asarray(fm.taylor(jnp.asarray(k)), np.float64)
  assert phi_q.shape == (2, 5, 1 + d + d * d)
  got = np.einsum("...i,...i->...", phi_q, phi_k)
  s = np.einsum("...i,...i->...", q.astype(np.float64), k.astype(np.float64))
  s = s / np.sqrt(d)
  np.testing.assert_allclose(got, 1 + s + s ** 2 / 2, rtol=1e-5, atol=1e-5)


def test_taylor_matches_definition_float64():
  d = 3
  x = _normal(2, (4, d))
  got = np.asarray(fm.taylor(jnp.asarray(x)))
  x64 = x.astype(np.float64)
  want = np.concatenate([
      np.ones((4, 1)),
      x64 / d ** 0.25,
      np.stack([np.outer(row, row).ravel() for row in x64]) / np.sqrt(2 * d),
  ], axis=-1)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_taylor_pairwise_scores_against_all_pairs():
  # phi(Q) phi(K)^T == 1 + S + S^2/2 for whole matrices (what attention uses).
  d = 6
  q = _normal(3, (7, d))
  k = _normal(4, (5, d))
  got = np.asarray(fm.taylor(jnp.asarray(q)) @ fm.taylor(jnp.asarray(k)).T,
                   np.float64)
  s = q.astype(np.float64) @ k.astype(np.float64).T / np.sqrt(d)
  np.testing.assert_allclose(got, 1 + s + s ** 2 / 2, rtol=1e-5, atol=1e-5)
  assert np.all(got > 0)


def test_elu_plus_one_positive_and_definition():
  x = np.linspace(-20.0, 20.0, 401, dtype=np.float32)
  got = np.asarray(fm.elu_plus_one(jnp.asarray(x)))
  assert np.all(got > 0)
  x64 = x.astype(np.float64)
  want = np.where(x64 > 0, x64 + 1, np.exp(x64))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_relu_and_identity():
  x = _normal(5, (3, 4))
  np.testing.assert_array_equal(np.asarray(fm.relu(jnp.asarray(x))),
                                np.maximum(x, 0))
  np.testing.assert_array_equal(np.asarray(fm.identity(jnp.asarray(x))), x)


@pytest.mark.parametrize("name", sorted(MAPS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtype_and_shape(name, dtype):
  x = jnp.asarray(_normal(6, (2, 3, 4)), dtype)
  y = MAPS[name](x)
  assert y.dtype == dtype
  d_out = 1 + 4 + 16 if name == "taylor" else 4
  assert y.shape == (2, 3, d_out)


@pytest.mark.parametrize("name", sorted(MAPS))
def test_jit_vmap_grad_finite(name):
  f = MAPS[name]
  x = jnp.asarray(_normal(7, (3, 2, 4)))
  np.testing.assert_allclose(jax.jit(f)(x), f(x), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jax.vmap(f)(x), f(x), rtol=1e-6, atol=1e-6)
  grad = jax.grad(lambda y: jnp.sum(f(y) ** 2))(x)
  assert bool(jnp.all(jnp.isfinite(grad)))


def test_taylor_with_linear_attention_is_taylor_softmax_numerator():
  # Non-causal linear attention over Taylor features with scale=1 equals
  # sum_s (1 + s_ts + s_ts^2 / 2) v_s, s_ts = q_t . k_s / sqrt(d).
  d = 4
  q = _normal(8, (1, 6, 2, d))
  k = _normal(9, (1, 6, 2, d))
  v = _normal(10, (1, 6, 2, 3))
  o = al.linear_attention(fm.taylor(jnp.asarray(q)), fm.taylor(jnp.asarray(k)),
                          jnp.asarray(v), is_causal=False, scale=1.0)
  s = np.einsum("thd,shd->hts", q[0].astype(np.float64), k[0].astype(np.float64))
  s = s / np.sqrt(d)
  want = np.einsum("hts,shv->thv", 1 + s + s ** 2 / 2, v[0].astype(np.float64))
  np.testing.assert_allclose(np.asarray(o[0]), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", sorted(MAPS))
def test_bad_inputs(name):
  f = MAPS[name]
  with pytest.raises(ValueError, match="x.dtype"):
    f(jnp.ones((2, 3), jnp.int32))
  with pytest.raises(ValueError, match="x.shape"):
    f(jnp.float32(1.0))
  with pytest.raises(ValueError, match="x="):
    f([1.0, 2.0])
  with pytest.raises(ValueError, match=f"al.feature_maps.{name}"):
    f(jnp.ones((2,), jnp.int32))
