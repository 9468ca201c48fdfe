"""Tests for al.linear_attention and al.linear_attention_step."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util as jtu

import attnlib as al
from tests.oracles import linear_attention as oracle

la_module = importlib.import_module("attnlib.ops.linear_attention")

DECAYS = [None, "rates", "gates"]
F32_TOL = dict(rtol=2e-5, atol=2e-5)
BF16_TOL = dict(rtol=2e-2, atol=2e-2)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
  """Chunks of 4 steps so that short sequences cross chunk boundaries."""
  monkeypatch.setattr(la_module, "CHUNK_SIZE", 4)


def make_inputs(seed=0, b=2, t=7, h=4, hkv=2, dk=8, dv=6, dtype=jnp.float32,
                decay=None, init=False):
  """Returns q, k, v, decay, initial_state (numpy-seeded, fixed)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  q = jnp.asarray(normal(b, t, h, dk), dtype)
  k = jnp.asarray(normal(b, t, hkv, dk), dtype)
  v = jnp.asarray(normal(b, t, hkv, dv), dtype)
  if decay == "rates":
    dec = jnp.asarray(rng.uniform(0.05, 1.0, (h,)).astype(np.float32))
  elif decay == "gates":
    dec = jax.nn.log_sigmoid(jnp.asarray(normal(b, t, h) + 2.0))
  else:
    dec = None
  s0 = jnp.asarray(normal(b, h, dk, dv)) if init else None
  return q, k, v, dec, s0


def run_both(q, k, v, dec, s0, is_causal=True, scale=None):
  got = al.linear_attention(q, k, v, is_causal=is_causal, decay=dec,
                            scale=scale, initial_state=s0,
                            return_final_state=True)
  up = lambda x: None if x is None else x.astype(jnp.float32)
  want = oracle.linear_attention(up(q), up(k), up(v), is_causal=is_causal,
                                 decay=dec, scale=scale, initial_state=s0)
  return got, want


def assert_close(got, want, tol):
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(want, np.float32), **tol)


# ----------------------------------------------------------------------------
# The oracle itself.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("decay", DECAYS)
def test_oracle_recurrence_matches_closed_form_float64(decay):
  q, k, v, dec, s0 = make_inputs(1, b=1, t=5, h=2, hkv=1, dk=3, dv=2,
                                 decay=decay, init=True)
  o, _ = oracle.linear_attention(q, k, v, decay=dec, initial_state=s0)
  want = oracle.linear_attention_np(q, k, v, decay=dec, initial_state=s0)
  np.testing.assert_allclose(np.asarray(o), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# Forward against the oracle.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("t", [1, 7, 13])
@pytest.mark.parametrize("init", [False, True])
def test_causal_matches_oracle(decay, t, init):
  inputs = make_inputs(2, t=t, decay=decay, init=init)
  (o, state), (o_ref, state_ref) = run_both(*inputs)
  assert o.shape == o_ref.shape and o.dtype == jnp.float32
  assert state.shape == (2, 4, 8, 6) and state.dtype == jnp.float32
  assert_close(o, o_ref, F32_TOL)
  assert_close(state, state_ref, F32_TOL)


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_causal_gqa_matches_oracle(decay, hkv):
  inputs = make_inputs(3, t=13, hkv=hkv, decay=decay, init=True)
  (o, state), (o_ref, state_ref) = run_both(*inputs, scale=0.7)
  assert_close(o, o_ref, F32_TOL)
  assert_close(state, state_ref, F32_TOL)


@pytest.mark.parametrize("hkv", [4, 2, 1])
@pytest.mark.parametrize("t", [1, 13])
@pytest.mark.parametrize("init", [False, True])
def test_noncausal_matches_oracle(hkv, t, init):
  inputs = make_inputs(4, t=t, hkv=hkv, init=init)
  (o, state), (o_ref, state_ref) = run_both(*inputs, is_causal=False)
  assert_close(o, o_ref, F32_TOL)
  assert_close(state, state_ref, F32_TOL)


@pytest.mark.parametrize("decay,is_causal", [
    (None, True), ("rates", True), ("gates", True), (None, False)])
def test_bfloat16_matches_oracle(decay, is_causal):
  inputs = make_inputs(5, t=13, dtype=jnp.bfloat16, decay=decay, init=True)
  (o, state), (o_ref, state_ref) = run_both(*inputs, is_causal=is_causal)
  assert o.dtype == jnp.bfloat16 and state.dtype == jnp.float32
  assert_close(o, o_ref, BF16_TOL)
  assert_close(state, state_ref, BF16_TOL)


def test_default_chunk_size_crosses_a_chunk(monkeypatch):
  monkeypatch.setattr(la_module, "CHUNK_SIZE", 64)
  inputs = make_inputs(6, b=1, t=70, h=2, hkv=1, decay="gates", init=True)
  (o, state), (o_ref, state_ref) = run_both(*inputs)
  assert_close(o, o_ref, F32_TOL)
  assert_close(state, state_ref, F32_TOL)


@pytest.mark.parametrize("chunk", [1, 3, 4, 8, 16])
def test_chunk_size_does_not_change_result(monkeypatch, chunk):
  monkeypatch.setattr(la_module, "CHUNK_SIZE", chunk)
  inputs = make_inputs(7, t=13, decay="gates", init=True)
  (o, state), (o_ref, state_ref) = run_both(*inputs)
  assert_close(o, o_ref, F32_TOL)
  assert_close(state, state_ref, F32_TOL)


def test_final_state_ignores_padding():
  # T = 5 pads to 8 with chunk 4: the state must be S_5, not S_8.
  q, k, v, dec, s0 = make_inputs(8, t=8, decay="gates", init=True)
  _, state5 = al.linear_attention(q[:, :5], k[:, :5], v[:, :5],
                                  decay=dec[:, :5], initial_state=s0,
                                  return_final_state=True)
  _, ref5 = oracle.linear_attention(q[:, :5], k[:, :5], v[:, :5],
                                    decay=dec[:, :5], initial_state=s0)
  _, ref8 = oracle.linear_attention(q, k, v, decay=dec, initial_state=s0)
  assert_close(state5, ref5, F32_TOL)
  assert not np.allclose(np.asarray(state5), np.asarray(ref8), atol=1e-3)


def test_return_final_state_false_returns_array_only():
  q, k, v, _, _ = make_inputs(9, t=5)
  o = al.linear_attention(q, k, v)
  assert isinstance(o, jax.Array) and o.shape == (2, 5, 4, 6)


# ----------------------------------------------------------------------------
# Identities.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("hkv", [4, 1])
def test_equals_loop_of_steps(decay, hkv):
  q, k, v, dec, s0 = make_inputs(10, t=5, hkv=hkv, decay=decay, init=True)
  o, state = al.linear_attention(q, k, v, decay=dec, initial_state=s0,
                                 scale=0.5, return_final_state=True)
  step_state = s0
  for t in range(q.shape[1]):
    dec_t = dec[:, t] if decay == "gates" else dec
    o_t, step_state = al.linear_attention_step(
        step_state, q[:, t], k[:, t], v[:, t], decay=dec_t, scale=0.5)
    assert o_t.shape == (2, 4, 6) and step_state.dtype == jnp.float32
    assert_close(o_t, o[:, t], F32_TOL)
  assert_close(step_state, state, F32_TOL)


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("split", [6, 8])
def test_two_halves_equal_whole(decay, split):
  q, k, v, dec, s0 = make_inputs(11, t=13, decay=decay, init=True)
  o, state = al.linear_attention(q, k, v, decay=dec, initial_state=s0,
                                 return_final_state=True)
  part = lambda x, sl: x if x is None or x.ndim == 1 else x[:, sl]
  first, second = slice(0, split), slice(split, None)
  o1, s1 = al.linear_attention(
      part(q, first), part(k, first), part(v, first), decay=part(dec, first),
      initial_state=s0, return_final_state=True)
  o2, s2 = al.linear_attention(
      part(q, second), part(k, second), part(v, second),
      decay=part(dec, second), initial_state=s1, return_final_state=True)
  assert_close(jnp.concatenate([o1, o2], axis=1), o, F32_TOL)
  assert_close(s2, state, F32_TOL)


def test_step_bfloat16():
  q, k, v, dec, s0 = make_inputs(12, t=1, dtype=jnp.bfloat16, decay="gates",
                                 init=True)
  o, state = al.linear_attention_step(s0, q[:, 0], k[:, 0], v[:, 0],
                                      decay=dec[:, 0])
  o_ref, state_ref = oracle.linear_attention(
      q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
      decay=dec, initial_state=s0)
  assert o.dtype == jnp.bfloat16 and state.dtype == jnp.float32
  assert_close(o, o_ref[:, 0], BF16_TOL)
  assert_close(state, state_ref, BF16_TOL)


# ----------------------------------------------------------------------------
# Gradients.
# ----------------------------------------------------------------------------


def _loss(fn, is_causal, weights):
  w_o, w_s = weights

  def loss(q, k, v, dec, s0):
    o, state = fn(q, k, v, dec, s0, is_causal)
    return (jnp.sum(o.astype(jnp.float32) * w_o)
            + jnp.sum(state * w_s))
  return loss


def _library(q, k, v, dec, s0, is_causal):
  return al.linear_attention(q, k, v, is_causal=is_causal, decay=dec,
                             initial_state=s0, return_final_state=True)


def _oracle(q, k, v, dec, s0, is_causal):
  return oracle.linear_attention(q, k, v, is_causal=is_causal, decay=dec,
                                 initial_state=s0)


@pytest.mark.parametrize("decay,is_causal", [
    (None, True), ("rates", True), ("gates", True), (None, False)])
def test_gradients_match_oracle(decay, is_causal):
  q, k, v, dec, s0 = make_inputs(13, t=7, decay=decay, init=True)
  rng = np.random.default_rng(14)
  weights = (jnp.asarray(rng.standard_normal((2, 7, 4, 6)), jnp.float32),
             jnp.asarray(rng.standard_normal((2, 4, 8, 6)), jnp.float32))
  argnums = (0, 1, 2, 3, 4) if decay else (0, 1, 2, 4)
  grad = lambda fn: jax.jit(jax.grad(_loss(fn, is_causal, weights), argnums))
  got = grad(_library)(q, k, v, dec, s0)
  want = grad(_oracle)(q, k, v, dec, s0)
  for g, w in zip(got, want):
    assert g.shape == w.shape
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4,
                               atol=1e-4)


def test_gradients_bfloat16_match_oracle():
  q, k, v, dec, s0 = make_inputs(15, t=7, dtype=jnp.bfloat16, decay="gates",
                                 init=True)
  rng = np.random.default_rng(16)
  weights = (jnp.asarray(rng.standard_normal((2, 7, 4, 6)), jnp.float32),
             jnp.asarray(rng.standard_normal((2, 4, 8, 6)), jnp.float32))
  grad = lambda fn: jax.jit(jax.grad(_loss(fn, True, weights), (0, 1, 2, 3, 4)))
  got = grad(_library)(q, k, v, dec, s0)
  up = lambda x: x.astype(jnp.float32)
  want = grad(_oracle)(up(q), up(k), up(v), dec, s0)
  for g, w in zip(got, want):
    assert g.dtype == w.dtype or g.dtype == jnp.bfloat16
    assert_close(g, w, BF16_TOL)


@pytest.mark.parametrize("decay", DECAYS)
def test_check_grads(decay):
  q, k, v, dec, s0 = make_inputs(17, b=1, t=6, h=2, hkv=1, dk=3, dv=2,
                                 decay=decay, init=True)

  def f(q, k, v, dec, s0):
    o, state = al.linear_attention(q, k, v, decay=dec, initial_state=s0,
                                   return_final_state=True)
    return jnp.sum(o * o) + jnp.sum(jnp.sin(state))

  jtu.check_grads(jax.jit(f), (q, k, v, dec, s0), order=1, modes=["rev"],
                  eps=1e-3)


@pytest.mark.parametrize("decay", DECAYS)
def test_large_logits_and_strong_decay_stay_finite(decay):
  q, k, v, dec, s0 = make_inputs(18, t=13, decay=decay, init=True)
  q, k = 100.0 * q, 100.0 * k
  if decay == "gates":
    dec = dec * 1e3  # a_t ~ exp(-1e3): underflows to 0 inside chunks.
  elif decay == "rates":
    dec = dec.at[0].set(0.0).at[1].set(80.0)

  def f(q, k, v, dec, s0):
    o, state = al.linear_attention(q, k, v, decay=dec, initial_state=s0,
                                   return_final_state=True)
    return jnp.sum(o) + jnp.sum(state), (o, state)

  argnums = (0, 1, 2, 3, 4) if decay else (0, 1, 2, 4)
  grads, (o, state) = jax.jit(jax.grad(f, argnums, has_aux=True))(
      q, k, v, dec, s0)
  for x in (o, state, *grads):
    assert bool(jnp.all(jnp.isfinite(x)))
  o_ref, state_ref = oracle.linear_attention(q, k, v, decay=dec,
                                             initial_state=s0)
  scale_o = float(jnp.abs(o_ref).max())
  np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), rtol=1e-4,
                             atol=1e-5 * scale_o)


# ----------------------------------------------------------------------------
# Transformations and dispatch.
# ----------------------------------------------------------------------------


def test_jit():
  q, k, v, dec, s0 = make_inputs(19, t=13, decay="gates", init=True)
  f = jax.jit(lambda q, k, v, d, s: al.linear_attention(
      q, k, v, decay=d, initial_state=s, return_final_state=True))
  o, state = f(q, k, v, dec, s0)
  o_ref, state_ref = oracle.linear_attention(q, k, v, decay=dec,
                                             initial_state=s0)
  assert_close(o, o_ref, F32_TOL)
  assert_close(state, state_ref, F32_TOL)


def test_vmap():
  q, k, v, dec, s0 = make_inputs(20, t=7, decay="gates", init=True)
  f = lambda q, k, v, d, s: al.linear_attention(
      q[None], k[None], v[None], decay=d[None], initial_state=s[None])[0]
  o = jax.vmap(f)(q, k, v, dec, s0)
  o_ref, _ = oracle.linear_attention(q, k, v, decay=dec, initial_state=s0)
  assert_close(o, o_ref, F32_TOL)


def test_step_jit():
  q, k, v, dec, s0 = make_inputs(21, t=1, decay="rates", init=True)
  f = jax.jit(lambda *a: al.linear_attention_step(*a, decay=dec))
  o, state = f(s0, q[:, 0], k[:, 0], v[:, 0])
  o_ref, state_ref = oracle.linear_attention(q, k, v, decay=dec,
                                             initial_state=s0)
  assert_close(o, o_ref[:, 0], F32_TOL)
  assert_close(state, state_ref, F32_TOL)


def test_implementation_xla_and_kernels():
  q, k, v, _, _ = make_inputs(22, t=5)
  np.testing.assert_array_equal(
      np.asarray(al.linear_attention(q, k, v, implementation="xla")),
      np.asarray(al.linear_attention(q, k, v)))
  # The kernels are tested in test_linear_attention_kernels.py. Mosaic GPU
  # needs a Hopper GPU (or interpret=True) and bf16/f16 inputs.
  with pytest.raises(ValueError, match="implementation='mosaic_gpu'.*Hopper"):
    al.linear_attention(q, k, v, implementation="mosaic_gpu")


# ----------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------


def _base():
  q, k, v, _, _ = make_inputs(23, b=2, t=5, h=4, hkv=2, dk=8, dv=6)
  return dict(q=q, k=k, v=v)


def _bad_cases():
  f32 = jnp.float32
  z = jnp.zeros
  return [
      ("q_rank", dict(q=z((2, 5, 4), f32)), "q.shape"),
      ("k_rank", dict(k=z((2, 5, 2, 8, 1), f32)), "k.shape"),
      ("v_rank", dict(v=z((5, 2, 6), f32)), "v.shape"),
      ("q_not_array", dict(q=[[1.0]]), "q="),
      ("batch", dict(k=z((3, 5, 2, 8), f32)), "k.shape"),
      ("length", dict(v=z((2, 6, 2, 6), f32)), "v.shape"),
      ("head_dim", dict(k=z((2, 5, 2, 7), f32)), "k.shape"),
      ("v_heads", dict(v=z((2, 5, 1, 6), f32)), "v.shape"),
      ("heads", dict(k=z((2, 5, 3, 8), f32), v=z((2, 5, 3, 6), f32)),
       "k heads"),
      ("empty_length", dict(q=z((2, 0, 4, 8), f32), k=z((2, 0, 2, 8), f32),
                            v=z((2, 0, 2, 6), f32)), "q.shape"),
      ("dtype_mismatch", dict(k=z((2, 5, 2, 8), jnp.bfloat16)), "k.dtype"),
      ("int_dtype", dict(q=z((2, 5, 4, 8), jnp.int32),
                         k=z((2, 5, 2, 8), jnp.int32),
                         v=z((2, 5, 2, 6), jnp.int32)), "q.dtype"),
      ("decay_shape", dict(decay=z((2,), f32)), "decay.shape"),
      ("decay_rank", dict(decay=z((2, 5), f32)), "decay.shape"),
      ("decay_gate_shape", dict(decay=z((2, 5, 2), f32)), "decay.shape"),
      ("decay_int", dict(decay=z((4,), jnp.int32)), "decay.dtype"),
      ("negative_rates", dict(decay=jnp.array([0.1, -0.2, 0.0, 1.0])),
       "decay \\(rates\\)"),
      ("positive_gates", dict(decay=z((2, 5, 4), f32).at[1, 2, 3].set(0.5)),
       "decay \\(log-gates\\)"),
      ("nan_gates", dict(decay=z((2, 5, 4), f32).at[0, 0, 0].set(jnp.nan)),
       "decay"),
      ("decay_noncausal", dict(decay=z((4,), f32), is_causal=False), "decay"),
      ("state_shape", dict(initial_state=z((2, 4, 8, 5), f32)),
       "initial_state.shape"),
      ("state_rank", dict(initial_state=z((4, 8, 6), f32)),
       "initial_state.shape"),
      ("state_dtype", dict(initial_state=z((2, 4, 8, 6), jnp.int32)),
       "initial_state.dtype"),
      ("implementation", dict(implementation="cuda"), "implementation"),
      ("scale_str", dict(scale="0.5"), "scale"),
      ("scale_nan", dict(scale=float("nan")), "scale"),
      ("scale_array", dict(scale=jnp.ones(2)), "scale"),
      ("is_causal", dict(is_causal=1), "is_causal"),
      ("return_final_state", dict(return_final_state="yes"),
       "return_final_state"),
      ("interpret", dict(interpret=None), "interpret"),
  ]


@pytest.mark.parametrize("name,changes,match", _bad_cases(),
                         ids=[c[0] for c in _bad_cases()])
def test_bad_input(name, changes, match):
  del name
  args, changes = _base(), dict(changes)
  for key in ("q", "k", "v"):
    if key in changes:
      args[key] = changes.pop(key)
  with pytest.raises(ValueError, match=match) as err:
    al.linear_attention(args["q"], args["k"], args["v"], **changes)
  assert "al.linear_attention" in str(err.value)


def test_bad_decay_values_skipped_under_jit_but_shapes_checked():
  args = _base()
  f = jax.jit(lambda d: al.linear_attention(**args, decay=d))
  f(jnp.full((4,), 0.3))  # traced: sign checks cannot run, shapes can.
  with pytest.raises(ValueError, match="decay.shape"):
    f(jnp.zeros((3,)))


def _step_base():
  q, k, v, _, s0 = make_inputs(24, b=2, t=1, h=4, hkv=2, dk=8, dv=6,
                               init=True)
  return dict(state=s0, q=q[:, 0], k=k[:, 0], v=v[:, 0])


def _bad_step_cases():
  f32 = jnp.float32
  z = jnp.zeros
  return [
      ("q_rank", dict(q=z((2, 1, 4, 8), f32)), "q.shape"),
      ("batch", dict(v=z((3, 2, 6), f32)), "v.shape"),
      ("head_dim", dict(k=z((2, 2, 5), f32)), "k.shape"),
      ("heads", dict(k=z((2, 3, 8), f32), v=z((2, 3, 6), f32)), "k heads"),
      ("dtype", dict(v=z((2, 2, 6), jnp.float16)), "v.dtype"),
      ("int_dtype", dict(q=z((2, 4, 8), jnp.int32), k=z((2, 2, 8), jnp.int32),
                         v=z((2, 2, 6), jnp.int32)), "q.dtype"),
      ("state_shape", dict(state=z((2, 4, 6, 8), f32)), "state.shape"),
      ("state_rank", dict(state=z((2, 4, 8), f32)), "state.shape"),
      ("decay_shape", dict(decay=z((2, 5, 4), f32)), "decay.shape"),
      ("negative_rates", dict(decay=jnp.full((4,), -1.0)),
       "decay \\(rates\\)"),
      ("positive_gates", dict(decay=jnp.full((2, 4), 0.1)),
       "decay \\(log-gates\\)"),
      ("scale", dict(scale=True), "scale"),
  ]


@pytest.mark.parametrize("name,changes,match", _bad_step_cases(),
                         ids=[c[0] for c in _bad_step_cases()])
def test_step_bad_input(name, changes, match):
  del name
  args, changes = _step_base(), dict(changes)
  for key in ("state", "q", "k", "v"):
    if key in changes:
      args[key] = changes.pop(key)
  with pytest.raises(ValueError, match=match) as err:
    al.linear_attention_step(args["state"], args["q"], args["k"], args["v"],
                             **changes)
  assert "al.linear_attention_step" in str(err.value)
