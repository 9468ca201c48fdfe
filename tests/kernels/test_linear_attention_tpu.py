"""Tests for kernels_pallas.linear_attention.tpu (forward and backward).

Numerics run in Pallas TPU interpret mode on tiny shapes (CPU), against
attnlib's blocked XLA implementation and the sequential oracle. Lowering runs
`jax.export` for the "tpu" platform under an abstract TPU mesh: it checks that
the kernel lowers to a Mosaic `tpu_custom_call` at realistic sizes (nothing is
compiled, so it is fast); Mosaic's own compilation happens on a TPU only.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import attnlib as al
from kernels_pallas.linear_attention.tpu import linear_attention_bwd
from kernels_pallas.linear_attention.tpu import linear_attention_fwd
from tests.oracles import linear_attention as oracle
from tests.tpu_export import tpu_mlir

TOLS = {jnp.float32: dict(rtol=1e-4, atol=1e-4),
        jnp.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def make_inputs(*, h=2, hkv=1, t=128, dk=64, dv=64, dtype=jnp.float32,
                gates=False, init=False, seed=0):
  """Returns q, k, v, log_gates, initial_state in the kernel's layout."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  b = 1
  q = jnp.asarray(normal(b, h, t, dk), dtype)
  k = jnp.asarray(normal(b, hkv, t, dk), dtype)
  v = jnp.asarray(normal(b, hkv, t, dv), dtype)
  if gates == "strong":  # exp(G) underflows to 0 within a chunk
    log_gates = -jnp.asarray(rng.uniform(0.0, 8.0, (b, h, t)), jnp.float32)
  elif gates:
    log_gates = jax.nn.log_sigmoid(jnp.asarray(normal(b, h, t) + 2.0))
  else:
    log_gates = None
  s0 = jnp.asarray(normal(b, h, dk, dv)) if init else None
  return q, k, v, log_gates, s0


def to_bthd(x):
  return jnp.swapaxes(x, 1, 2)


def assert_close(got, want, dtype):
  """Tolerances relative to the reference's magnitude."""
  tol = TOLS[dtype]
  want = np.asarray(want, np.float32)
  mag = max(1.0, float(np.abs(want).max()))
  np.testing.assert_allclose(np.asarray(got, np.float32), want,
                             rtol=tol["rtol"], atol=tol["atol"] * mag)


NUMERIC_CASES = [
    # (h, hkv, dk, dv, dtype, gates, init)
    (2, 1, 64, 64, jnp.float32, False, False),
    (2, 1, 64, 64, jnp.float32, False, True),
    (2, 1, 64, 64, jnp.float32, True, False),
    (2, 1, 64, 64, jnp.float32, True, True),
    (2, 1, 64, 64, jnp.float32, "strong", True),
    (2, 2, 64, 64, jnp.float32, True, True),
    (2, 1, 128, 64, jnp.float32, True, True),
    (2, 1, 64, 64, jnp.bfloat16, False, False),
    (2, 1, 64, 64, jnp.bfloat16, True, True),
    (2, 1, 128, 64, jnp.bfloat16, True, True),
]


@pytest.mark.parametrize("h,hkv,dk,dv,dtype,gates,init", NUMERIC_CASES)
def test_interpret_matches_references(h, hkv, dk, dv, dtype, gates, init):
  q, k, v, g, s0 = make_inputs(h=h, hkv=hkv, dk=dk, dv=dv, dtype=dtype,
                               gates=gates, init=init)
  scale = dk ** -0.5
  o, state = linear_attention_fwd(q, k, v, g, s0, scale=scale, chunk=64,
                                  interpret=pltpu.InterpretParams())
  assert o.shape == (1, h, 128, dv) and o.dtype == dtype
  assert state.shape == (1, h, dk, dv) and state.dtype == jnp.float32

  decay = None if g is None else to_bthd(g)
  want_o, want_state = oracle.linear_attention(
      to_bthd(q), to_bthd(k), to_bthd(v), decay=decay, scale=scale,
      initial_state=s0)
  assert_close(to_bthd(o), want_o, dtype)
  assert_close(state, want_state, dtype)

  xla_o, xla_state = al.linear_attention(
      to_bthd(q), to_bthd(k), to_bthd(v), decay=decay, scale=scale,
      initial_state=s0, return_final_state=True, implementation="xla")
  assert_close(to_bthd(o), xla_o, dtype)
  assert_close(state, xla_state, dtype)


def test_interpret_matches_float64_closed_form():
  """One tiny case against the unrolled float64 closed form (chunk=64, T=128)."""
  q, k, v, g, s0 = make_inputs(h=1, hkv=1, dk=64, dv=64, gates=True,
                               init=True, seed=3)
  o, _ = linear_attention_fwd(q, k, v, g, s0, scale=0.125, chunk=64,
                              interpret=pltpu.InterpretParams())
  want = oracle.linear_attention_np(to_bthd(q), to_bthd(k), to_bthd(v),
                                    decay=to_bthd(g), scale=0.125,
                                    initial_state=s0)
  assert_close(to_bthd(o), want, jnp.float32)


def export_mlir(*, t, d, dtype, gates, chunk=128, h=2, hkv=1):
  """Exports the kernel for TPU (initial state given); returns the MLIR text."""
  s = jax.ShapeDtypeStruct
  args = [s((1, h, t, d), dtype), s((1, hkv, t, d), dtype),
          s((1, hkv, t, d), dtype)]
  if gates:
    args.append(s((1, h, t), jnp.float32))
  args.append(s((1, h, d, d), jnp.float32))

  def fwd(q, k, v, *rest):
    g, s0 = rest if gates else (None, rest[0])
    return linear_attention_fwd(q, k, v, g, s0, scale=d ** -0.5, chunk=chunk)

  return tpu_mlir(fwd, *args)


@pytest.mark.parametrize("gates", [False, True])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("t", [1024, 8192, 32768])
def test_lowers_to_mosaic(t, d, dtype, gates):
  assert "tpu_custom_call" in export_mlir(t=t, d=d, dtype=dtype, gates=gates)


@pytest.mark.parametrize("chunk", [64, 256])
@pytest.mark.parametrize("gates", [False, True])
def test_lowers_other_chunks(chunk, gates):
  mlir = export_mlir(t=1024, d=128, dtype=jnp.bfloat16, gates=gates,
                     chunk=chunk)
  assert "tpu_custom_call" in mlir


def _bad_call(name):
  """Returns a zero-arg callable violating the precondition named `name`."""
  q, k, v, g, s0 = make_inputs(t=128, gates=True, init=True)
  kw = dict(scale=0.125, chunk=64)
  cases = {
      "q.shape": lambda: linear_attention_fwd(q[0], k, v, **kw),
      "k.dtype": lambda: linear_attention_fwd(q, k.astype(jnp.bfloat16), v,
                                              **kw),
      "k.shape": lambda: linear_attention_fwd(q, k[..., :32], v, **kw),
      "v.shape": lambda: linear_attention_fwd(q, k, v[:, :, :64], **kw),
      "Hkv": lambda: linear_attention_fwd(
          q[:, :1], jnp.concatenate([k, k], 1), jnp.concatenate([v, v], 1),
          **kw),
      "(K)": lambda: linear_attention_fwd(
          jnp.zeros((1, 2, 128, 96)), jnp.zeros((1, 1, 128, 96)), v, **kw),
      "(V)": lambda: linear_attention_fwd(q, k, jnp.zeros((1, 1, 128, 32)),
                                          **kw),
      "chunk": lambda: linear_attention_fwd(q, k, v, scale=0.125, chunk=32),
      "(T)": lambda: linear_attention_fwd(q, k, v, scale=0.125, chunk=256),
      "log_gates.shape": lambda: linear_attention_fwd(q, k, v, g[:, :1], **kw),
      "log_gates.dtype": lambda: linear_attention_fwd(
          q, k, v, g.astype(jnp.bfloat16), **kw),
      "initial_state.shape": lambda: linear_attention_fwd(
          q, k, v, None, s0[:, :, :32], **kw),
      "initial_state.dtype": lambda: linear_attention_fwd(
          q, k, v, None, s0.astype(jnp.bfloat16), **kw),
      "scale": lambda: linear_attention_fwd(q, k, v, scale=None, chunk=64),
  }
  return cases[name]


@pytest.mark.parametrize("name", [
    "q.shape", "k.dtype", "k.shape", "v.shape", "Hkv", "(K)", "(V)", "chunk",
    "(T)", "log_gates.shape", "log_gates.dtype", "initial_state.shape",
    "initial_state.dtype", "scale"])
def test_bad_preconditions_raise(name):
  with pytest.raises(ValueError,
                     match=f"linear_attention_fwd: .*{re.escape(name)}"):
    _bad_call(name)()


# ---------------------------------------------------------------------------
# Backward: linear_attention_bwd.
# ---------------------------------------------------------------------------

BWD_CASES = [
    # (h, hkv, dk, dv, dtype, gates, init, d_final)
    (2, 1, 64, 64, jnp.float32, False, False, False),
    (2, 1, 64, 64, jnp.float32, False, True, True),
    (2, 1, 64, 64, jnp.float32, True, True, True),
    (2, 1, 64, 64, jnp.float32, "strong", True, False),
    (2, 1, 128, 64, jnp.float32, True, False, True),
    (2, 1, 64, 64, jnp.bfloat16, True, True, True),
]


def oracle_vjp(q, k, v, g, s0, d_o, d_final, scale):
  """Oracle cotangents (dq, dk, dv, dg, ds0) in the kernel's layouts."""
  f32 = lambda x: x.astype(jnp.float32)
  b, h, t, dk = q.shape
  dv = v.shape[-1]
  g = jnp.zeros((b, h, t), jnp.float32) if g is None else g
  s0 = jnp.zeros((b, h, dk, dv), jnp.float32) if s0 is None else s0

  def f(q, k, v, g, s0):
    o, state = oracle.linear_attention(to_bthd(q), to_bthd(k), to_bthd(v),
                                       decay=to_bthd(g), scale=scale,
                                       initial_state=s0)
    return to_bthd(o), state

  (_, state), vjp = jax.vjp(f, f32(q), f32(k), f32(v), g, s0)
  if d_final is None:
    d_final = jnp.zeros_like(state)
  return vjp((f32(d_o), d_final)), state


@pytest.mark.parametrize("h,hkv,dk,dv,dtype,gates,init,d_final", BWD_CASES)
def test_bwd_interpret_matches_oracle_vjp(h, hkv, dk, dv, dtype, gates, init,
                                          d_final):
  q, k, v, g, s0 = make_inputs(h=h, hkv=hkv, dk=dk, dv=dv, dtype=dtype,
                               gates=gates, init=init)
  rng = np.random.default_rng(1)
  d_o = jnp.asarray(rng.standard_normal((1, h, 128, dv)), dtype)
  d_st = (jnp.asarray(rng.standard_normal((1, h, dk, dv)), jnp.float32)
          if d_final else None)
  scale = dk ** -0.5
  dq, dk_h, dv_h, ds0 = linear_attention_bwd(
      q, k, v, g, s0, d_o, d_st, scale=scale, chunk=64,
      interpret=pltpu.InterpretParams())
  assert dq.shape == (1, h, 128, dk) and dk_h.shape == (1, h, 128, dk)
  assert dv_h.shape == (1, h, 128, dv) and ds0.shape == (1, h, dk, dv)
  assert all(x.dtype == jnp.float32 for x in (dq, dk_h, dv_h, ds0))

  (want_dq, want_dk, want_dv, want_dg, want_ds0), state = oracle_vjp(
      q, k, v, g, s0, d_o, d_st, scale)
  group = lambda x: x.reshape(1, hkv, h // hkv, *x.shape[2:]).sum(2)
  assert_close(dq, want_dq, dtype)
  assert_close(group(dk_h), want_dk, dtype)
  assert_close(group(dv_h), want_dv, dtype)
  assert_close(ds0, want_ds0, dtype)

  if gates is True:
    # The caller's gate-gradient identity, from the kernel's dq and per-head
    # dk and the forward's final state.
    k_h = jnp.repeat(k.astype(jnp.float32), h // hkv, axis=1)
    d_gamma = (jnp.sum(q.astype(jnp.float32) * dq, -1)
               - jnp.sum(k_h * dk_h, -1))
    if d_st is not None:
      _, fwd_state = linear_attention_fwd(q, k, v, g, s0, scale=scale,
                                          chunk=64,
                                          interpret=pltpu.InterpretParams())
      d_gamma = d_gamma.at[..., -1].add(jnp.sum(d_st * fwd_state, (-2, -1)))
    dg = jnp.flip(jnp.cumsum(jnp.flip(d_gamma, -1), -1), -1)
    assert_close(dg, want_dg, dtype)


def export_bwd_mlir(*, t, d, dtype, gates, chunk=128, h=2, hkv=1):
  """Exports the backward for TPU (initial state and d_final_state given)."""
  s = jax.ShapeDtypeStruct
  args = [s((1, h, t, d), dtype), s((1, hkv, t, d), dtype),
          s((1, hkv, t, d), dtype), s((1, h, t), jnp.float32),
          s((1, h, d, d), jnp.float32), s((1, h, t, d), dtype),
          s((1, h, d, d), jnp.float32)]

  def bwd(q, k, v, g, s0, d_o, d_st):
    return linear_attention_bwd(q, k, v, g if gates else None, s0, d_o, d_st,
                                scale=d ** -0.5, chunk=chunk)

  return tpu_mlir(bwd, *args)


@pytest.mark.parametrize("gates", [False, True])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("t", [1024, 8192, 32768])
def test_bwd_lowers_to_mosaic(t, d, dtype, gates):
  mlir = export_bwd_mlir(t=t, d=d, dtype=dtype, gates=gates)
  assert mlir.count("tpu_custom_call") >= 2  # the dq and the dk/dv kernels


def test_bwd_lowers_without_optional_inputs():
  s = jax.ShapeDtypeStruct
  args = [s((1, 2, 1024, 128), jnp.bfloat16), s((1, 1, 1024, 128), jnp.bfloat16),
          s((1, 1, 1024, 128), jnp.bfloat16), s((1, 2, 1024, 128), jnp.bfloat16)]
  bwd = lambda q, k, v, d_o: linear_attention_bwd(q, k, v, None, None, d_o,
                                                  None, scale=0.1, chunk=256)
  assert tpu_mlir(bwd, *args).count("tpu_custom_call") >= 2


def _bad_bwd_call(name):
  """Returns a zero-arg callable violating the precondition named `name`."""
  q, k, v, g, s0 = make_inputs(t=128, gates=True, init=True)
  d_o = jnp.zeros((1, 2, 128, 64), jnp.float32)
  d_st = jnp.zeros((1, 2, 64, 64), jnp.float32)
  kw = dict(scale=0.125, chunk=64)
  call = lambda **over: linear_attention_bwd(
      *[over.get(n, x) for n, x in (("q", q), ("k", k), ("v", v), ("g", g),
                                    ("s0", s0), ("d_o", d_o),
                                    ("d_st", d_st))], **kw)
  cases = {
      "k.shape": lambda: call(k=k[..., :32]),
      "log_gates.shape": lambda: call(g=g[:, :1]),
      "initial_state.dtype": lambda: call(s0=s0.astype(jnp.bfloat16)),
      "d_o.shape": lambda: call(d_o=d_o[:, :1]),
      "d_o.dtype": lambda: call(d_o=d_o.astype(jnp.bfloat16)),
      "d_final_state.shape": lambda: call(d_st=d_st[..., :32]),
      "d_final_state.dtype": lambda: call(d_st=d_st.astype(jnp.bfloat16)),
  }
  return cases[name]


@pytest.mark.parametrize("name", [
    "k.shape", "log_gates.shape", "initial_state.dtype", "d_o.shape",
    "d_o.dtype", "d_final_state.shape", "d_final_state.dtype"])
def test_bwd_bad_preconditions_raise(name):
  with pytest.raises(ValueError,
                     match=f"linear_attention_bwd: .*{re.escape(name)}"):
    _bad_bwd_call(name)()
