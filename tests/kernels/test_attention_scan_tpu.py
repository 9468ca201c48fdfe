"""Tests for kernels_pallas.attention_scan.tpu (forward and backward).

Numerics run in Pallas TPU interpret mode on tiny shapes (CPU): the outputs
and the final state against a naive float64 NumPy oracle (one softmax per
prefix, the initial state as an extra pseudo-token) and against the op's xla
implementation; the gradients of a random-weighted sum of (o, m, u, w) in q,
k, v, m0, u0, w0 against jax.grad of the xla implementation and (q, k, v) of
the float32 JAX oracle tests/oracles/attention_scan.py. Lowering runs
`jax.export` for the "tpu" platform under an abstract TPU mesh.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import attnlib as al
from attnlib.ops.attention_scan import AttentionScanState
from kernels_pallas.attention_scan import tpu as ks
from tests.oracles import attention_scan as oracle
from tests.tpu_export import tpu_mlir

TOLS = {jnp.float32: 2e-4, jnp.bfloat16: 3e-2}
INTERPRET = pltpu.InterpretParams()


def numpy_oracle(q, k, v, m0, u0, w0, scale):
  """float64 (o [B, T, H, V], m, u, w): softmax over each prefix, directly."""
  q, k, v, m0, u0, w0 = (np.asarray(jnp.asarray(x, jnp.float32), np.float64)
                         for x in (q, k, v, m0, u0, w0))
  b, t, hkv, _ = k.shape
  h = q.shape[1]
  kk = np.repeat(k, h // hkv, axis=2)
  vv = np.repeat(v, h // hkv, axis=2)
  o = np.zeros((b, t, h, v.shape[-1]))
  mt, ut, wt = np.zeros((b, h)), np.zeros((b, h)), np.zeros((b, h, v.shape[-1]))
  for bi in range(b):
    for hi in range(h):
      s = scale * kk[bi, :, hi] @ q[bi, hi]  # [T]
      a, ua, wa = m0[bi, hi], u0[bi, hi], w0[bi, hi]

      def sums(n):  # (max, sum e^{s - max}, sum e^{s - max} v) of n tokens
        top = max(s[:n].max(), a)
        e = np.exp(s[:n] - top)
        c = np.exp(a - top)  # 0 for an empty initial state
        return top, e.sum() + ua * c, e @ vv[bi, :n, hi] + wa * c

      for ti in range(t):
        _, den, num = sums(ti + 1)
        o[bi, ti, hi] = num / den
      mt[bi, hi], ut[bi, hi], wt[bi, hi] = sums(t)
  return o, mt, ut, wt


def make_inputs(*, b=1, t, h=2, hkv=1, d=128, dv=128, dtype=jnp.float32,
                state="random", qscale=1.0, seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *s: rng.standard_normal(s).astype(np.float32)
  q = jnp.asarray(qscale * normal(b, h, d), dtype)
  k = jnp.asarray(normal(b, t, hkv, d), dtype)
  v = jnp.asarray(normal(b, t, hkv, dv), dtype)
  if state == "empty":
    m0 = jnp.full((b, h), -jnp.inf, jnp.float32)
    u0 = jnp.zeros((b, h), jnp.float32)
    w0 = jnp.zeros((b, h, dv), jnp.float32)
  else:
    m0 = jnp.asarray(qscale * normal(b, h))
    u0 = jnp.asarray(1.0 + rng.random((b, h)).astype(np.float32))
    w0 = jnp.asarray(normal(b, h, dv))
  cts = (jnp.asarray(normal(b, t, h, dv)), jnp.asarray(normal(b, h)),
         jnp.asarray(normal(b, h)), jnp.asarray(normal(b, h, dv)))
  return (q, k, v, m0, u0, w0), cts


def weighted(outs, cts):
  return sum(jnp.sum(c * x.astype(jnp.float32)) for c, x in zip(cts, outs))


def kernel_value_and_grads(args, cts, **kw):
  def loss(*a):
    outs = ks.attention_scan(*a, **kw)
    return weighted(outs, cts), outs

  grads, outs = jax.jit(jax.grad(loss, argnums=range(6), has_aux=True))(*args)
  return outs, grads


def xla_value_and_grads(args, cts, scale):
  def loss(q, k, v, m0, u0, w0):
    o, st = al.attention_scan(
        q, k, v, scale=scale, initial_state=AttentionScanState(m0, u0, w0),
        return_final_state=True, implementation="xla")
    outs = (o, st.m, st.u, st.w)
    return weighted(outs, cts), outs

  f32 = [jnp.asarray(x, jnp.float32) for x in args]
  return jax.grad(loss, argnums=range(6), has_aux=True)(*f32)[::-1]


def oracle_grads_qkv(args, cts, scale):
  """d(q, k, v) of the float32 JAX oracle (initial state held fixed)."""
  q, k, v, m0, u0, w0 = (jnp.asarray(x, jnp.float32) for x in args)
  state = (m0, u0, w0)

  def loss(q, k, v):
    o = oracle.attention_scan(q, k, v, scale=scale, initial_state=state)
    fin = oracle.final_sums(q, k, v, scale=scale, initial_state=state)
    return weighted((o, *fin), cts)

  return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def assert_close(got, want, dtype, what=""):
  want = np.asarray(want, np.float64)
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  assert np.isfinite(got).all(), what
  mag = max(1.0, float(np.abs(want).max()))
  np.testing.assert_allclose(got, want, rtol=TOLS[dtype],
                             atol=TOLS[dtype] * mag, err_msg=what)


CASES = [
    # (b, t, h, hkv, dv, dtype, state, chunk, block)
    # GQA, T = 21 not a block multiple, two chunks per block (one all padding)
    (2, 21, 4, 2, 128, jnp.float32, "random", 8, 16),
    # MQA with G = 16 > 8: two head groups per kv head (dk, dv summed in XLA)
    (1, 10, 16, 1, 256, jnp.float32, "empty", 8, 8),
    (1, 29, 2, 1, 128, jnp.bfloat16, "random", 16, 32),
    (1, 19, 4, 4, 128, jnp.bfloat16, "empty", 8, 8),
]


@pytest.mark.parametrize("b,t,h,hkv,dv,dtype,state,chunk,block", CASES)
def test_interpret_matches_oracles(b, t, h, hkv, dv, dtype, state, chunk,
                                   block):
  args, cts = make_inputs(b=b, t=t, h=h, hkv=hkv, dv=dv, dtype=dtype,
                          state=state)
  scale = 0.3
  outs, grads = kernel_value_and_grads(args, cts, scale=scale,
                                       interpret=INTERPRET, chunk=chunk,
                                       block=block)
  o, m, u, w = outs
  assert o.shape == (b, t, h, dv) and o.dtype == dtype
  assert m.dtype == u.dtype == w.dtype == jnp.float32
  for x, g in zip(args, grads):
    assert g.shape == x.shape and g.dtype == x.dtype
  want = numpy_oracle(*args, scale)
  for name, got, ref in zip("omuw", outs, want):
    assert_close(got, ref, dtype, name)
  xla_outs, xla_grads = xla_value_and_grads(args, cts, scale)
  for name, got, ref in zip("omuw", outs, xla_outs):
    assert_close(got, ref, dtype, name)
  for name, got, ref in zip(("dq", "dk", "dv", "dm0", "du0", "dw0"), grads,
                            xla_grads):
    assert_close(got, ref, dtype, name)
  for name, got, ref in zip(("dq", "dk", "dv"), grads,
                            oracle_grads_qkv(args, cts, scale)):
    assert_close(got, ref, dtype, name + " (oracle)")
  if state == "empty":  # nothing seen: exact zeros, as the xla jax.grad
    for g in grads[3:]:
      np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_huge_logits_are_finite_and_correct():
  """Logits of magnitude ~1e4 (and an initial state up there too)."""
  args, cts = make_inputs(t=21, h=2, hkv=1, qscale=1e3, seed=1)
  scale = 1.0
  outs, grads = kernel_value_and_grads(args, cts, scale=scale,
                                       interpret=INTERPRET, chunk=8, block=8)
  s = np.einsum("bhd,btd->bth", np.asarray(args[0]), np.asarray(args[1][:, :, 0]))
  assert np.abs(s).max() > 1e4
  want = numpy_oracle(*args, scale)
  xla_outs, xla_grads = xla_value_and_grads(args, cts, scale)
  for name, got, ref, ref2 in zip("omuw", outs, want, xla_outs):
    assert_close(got, ref, jnp.float32, name)
    assert_close(got, ref2, jnp.float32, name)
  for name, got, ref in zip(("dq", "dk", "dv", "dm0", "du0", "dw0"), grads,
                            xla_grads):
    # f32 logits ~1e4 carry ~1e-3 absolute error: compare loosely.
    g, r = np.asarray(got), np.asarray(ref)
    assert np.isfinite(g).all(), name
    np.testing.assert_allclose(g, r, rtol=2e-2, atol=2e-2 * max(
        1.0, np.abs(r).max()), err_msg=name)


def test_max_derivative_routing():
  """The derivative through m = max(m0, s_j) reaches the maximiser.

  Batch 0: m0 = 100 exceeds every logit (m0 takes it). Batch 1: tokens 2 and
  4 share the largest logit of head 0 exactly; the kernel gives it to the
  last of them, jax.grad of the xla implementation splits it, so dk matches
  summed over the tie and everything else matches as is.
  """
  (q, k, v, m0, u0, w0), cts = make_inputs(b=2, t=6, h=2, hkv=1, seed=4)
  m0 = m0.at[0].set(100.0)
  top = 2.0 * q[1, 0] / jnp.linalg.norm(q[1, 0]) * 128 ** 0.5
  k = k.at[1, 2, 0].set(top).at[1, 4, 0].set(top)
  args = (q, k, v, m0, u0, w0)
  scale = 0.3
  outs, grads = kernel_value_and_grads(args, cts, scale=scale,
                                       interpret=INTERPRET, chunk=8, block=8)
  xla_outs, xla_grads = xla_value_and_grads(args, cts, scale)
  s = np.einsum("d,td->t", np.asarray(q[1, 0]), np.asarray(k[1, :, 0]))
  assert np.argmax(s) == 2 and s[2] == s[4] and float(outs[1][0, 0]) == 100.0
  for name, got, ref in zip("omuw", outs, xla_outs):
    assert_close(got, ref, jnp.float32, name)
  dk, want_dk = np.array(grads[1]), np.array(xla_grads[1])
  for g in (dk, want_dk):
    g[1, 2] += g[1, 4]
    g[1, 4] = 0.0
  assert_close(dk, want_dk, jnp.float32, "dk")
  for name, got, ref in zip(("dq", "dv", "dm0", "du0", "dw0"),
                            grads[:1] + grads[2:], xla_grads[:1] + xla_grads[2:]):
    assert_close(got, ref, jnp.float32, name)


def test_state_continuation_equals_one_call():
  (q, k, v, m0, u0, w0), _ = make_inputs(b=2, t=20, h=2, hkv=1, seed=2)
  kw = dict(scale=0.25, interpret=INTERPRET, chunk=8, block=16)
  run = jax.jit(lambda *a: ks.attention_scan(*a, **kw))
  o, m, u, w = run(q, k, v, m0, u0, w0)
  o1, *st = run(q, k[:, :7], v[:, :7], m0, u0, w0)
  o2, m2, u2, w2 = run(q, k[:, 7:], v[:, 7:], *st)
  assert_close(jnp.concatenate([o1, o2], 1), o, jnp.float32, "o")
  for name, got, ref in zip("muw", (m2, u2, w2), (m, u, w)):
    assert_close(got, ref, jnp.float32, name)


def test_many_short_sequences_default_chunk():
  """B = 6 sequences of T = 3 (one 128-token chunk each), interpret=True."""
  args, cts = make_inputs(b=6, t=3, h=2, hkv=2, state="empty", seed=3)
  outs, grads = kernel_value_and_grads(args, cts, scale=0.2, interpret=True)
  want = numpy_oracle(*args, 0.2)
  for name, got, ref in zip("omuw", outs, want):
    assert_close(got, ref, jnp.float32, name)
  _, xla_grads = xla_value_and_grads(args, cts, 0.2)
  for name, got, ref in zip(("dq", "dk", "dv", "dm0", "du0", "dw0"), grads,
                            xla_grads):
    assert_close(got, ref, jnp.float32, name)


# ---------------------------------------------------------------------------
# TPU lowering.
# ---------------------------------------------------------------------------


def _args(t, b=8, h=16, hkv=16, d=128, dv=128, dtype=jnp.bfloat16):
  s = jax.ShapeDtypeStruct
  f32 = jnp.float32
  return (s((b, h, d), dtype), s((b, t, hkv, d), dtype),
          s((b, t, hkv, dv), dtype), s((b, h), f32), s((b, h), f32),
          s((b, h, dv), f32))


def _custom_calls(args, **kw):
  fn = lambda *a: ks.attention_scan(*a, scale=0.1, **kw)

  def vjp(*a):
    outs, pull = jax.vjp(fn, *a)
    return outs, pull(outs)

  return (tpu_mlir(fn, *args).count("tpu_custom_call"),
          tpu_mlir(vjp, *args).count("tpu_custom_call"))


@pytest.mark.parametrize("t", [1024, 16384, 131072])
def test_lowers_to_mosaic(t):
  assert _custom_calls(_args(t)) == (1, 2)  # forward; forward + backward


def test_other_shapes_lower():
  assert _custom_calls(_args(1000, b=2, h=16, hkv=1, d=256, dv=256,
                             dtype=jnp.float32)) == (1, 2)
  assert _custom_calls(_args(5, b=512, h=4, hkv=2)) == (1, 2)
  assert _custom_calls(_args(4096, b=1, h=8, hkv=2), block=256) == (1, 2)


# ---------------------------------------------------------------------------
# Small pieces and preconditions.
# ---------------------------------------------------------------------------


def test_supports_and_blocks():
  assert ks.supports(128, 256, jnp.bfloat16)
  assert ks.supports(256, 128, jnp.float32)
  assert not ks.supports(64, 128, jnp.float32)
  assert not ks.supports(128, 96, jnp.float32)
  assert not ks.supports(128, 128, jnp.float16)
  assert not ks.supports(128, 128, "not a dtype")
  assert [ks.heads_per_step(g) for g in (1, 2, 6, 8, 12, 16, 7, 9)] == [
      1, 2, 6, 8, 6, 8, 7, 3]
  assert ks.default_block(131072, 1, 128, jnp.bfloat16) == 1024
  assert ks.default_block(131072, 8, 128, jnp.bfloat16) == 512
  assert ks.default_block(131072, 8, 256, jnp.float32) == 128
  assert ks.default_block(5, 1, 128, jnp.bfloat16) == 128
  assert ks.default_block(300, 1, 128, jnp.bfloat16) == 384


def _bad_call(name):
  (q, k, v, m0, u0, w0), _ = make_inputs(t=8, h=4, hkv=2)
  z = jnp.zeros
  args = dict(q=q, k=k, v=v, m0=m0, u0=u0, w0=w0)
  call = lambda **over: ks.attention_scan(
      *[over.pop(n, a) for n, a in args.items()],
      **{"scale": 0.1, **over})
  cases = {
      "q.shape": lambda: call(q=q[0]),
      "k.shape ": lambda: call(k=[[1.0]]),
      "q.dtype": lambda: call(q=q.astype(jnp.float16), k=k.astype(
          jnp.float16), v=v.astype(jnp.float16)),
      "k.dtype": lambda: call(k=k.astype(jnp.bfloat16)),
      "k.shape": lambda: call(k=k[:, :0], v=v[:, :0]),
      "v.shape": lambda: call(v=v[:, :3]),
      "(Hkv)": lambda: call(k=z((1, 8, 3, 128)), v=z((1, 8, 3, 128))),
      "(D)": lambda: call(q=z((1, 4, 64)), k=z((1, 8, 2, 64))),
      "(V)": lambda: call(v=z((1, 8, 2, 96))),
      "m0": lambda: call(m0=-1.0),
      "u0.shape": lambda: call(u0=u0[:, :2]),
      "w0.dtype": lambda: call(w0=w0.astype(jnp.bfloat16)),
      "scale": lambda: call(scale=float("nan")),
      "interpret": lambda: call(interpret="yes"),
      "chunk": lambda: call(chunk=12, interpret=True),
      "chunk is 16": lambda: call(chunk=16),  # not interpret
      "block": lambda: call(chunk=8, block=12, interpret=True),
  }
  return cases[name]


@pytest.mark.parametrize("name", [
    "q.shape", "k.shape ", "q.dtype", "k.dtype", "k.shape", "v.shape",
    "(Hkv)", "(D)", "(V)", "m0", "u0.shape", "w0.dtype", "scale",
    "interpret", "chunk", "chunk is 16", "block"])
def test_bad_preconditions_raise_before_tracing(name, monkeypatch):
  def no_kernel(*args, **kwargs):
    raise AssertionError("a kernel was built before the ValueError")

  monkeypatch.setattr(ks, "_fwd_call", no_kernel)
  monkeypatch.setattr(ks, "_bwd_call", no_kernel)
  with pytest.raises(ValueError,
                     match=f"attention_scan: .*{re.escape(name.strip())}"):
    _bad_call(name)()
