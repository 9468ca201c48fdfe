"""Tests of the Mosaic GPU (Hopper) attention prefix scan kernels, forward
and backward (kernels_pallas/attention_scan/mosaic_gpu.py).

Tiers:
  * numerics under Mosaic GPU interpret mode on small shapes (CPU): o and the
    final state against the naive oracle tests/oracles/attention_scan.py, a
    float64 NumPy recurrence and the op's xla implementation; gradients
    w.r.t. q, k, v, m0, u0, w0 (random cotangents for o and for the final
    state) against jax.grad of the xla implementation and of the oracle;
  * lowering for "cuda" via jax.export (CPU, no GPU needed);
  * the compiled kernels on a real GPU (skipped unless the backend is "gpu").
The kernels take bfloat16/float16 only, so the numerics use 16-bit inputs
(the references upcast them) and the 16-bit tolerance 2e-2 relative to the
reference's max.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnlib as al
from attnlib.ops.attention_scan import AttentionScanState
from kernels_pallas.attention_scan import mosaic_gpu as scan_gpu
from tests.oracles import attention_scan as oracle

_ON_GPU = jax.default_backend() == "gpu"
gpu_only = pytest.mark.skipif(not _ON_GPU, reason="needs a Hopper GPU")
_TOL = 2e-2


def _inputs(b, t, h, hkv, d, dv, dtype, state="random", seed=0, q_scale=1.0):
  """q, k, v, (m0, u0, w0) and cotangents (do, dm, du, dw)."""
  ks = jax.random.split(jax.random.key(seed), 10)
  normal = lambda i, shape: jax.random.normal(ks[i], shape, jnp.float32)
  q = (q_scale * normal(0, (b, h, d))).astype(dtype)
  k = normal(1, (b, t, hkv, d)).astype(dtype)
  v = normal(2, (b, t, hkv, dv)).astype(dtype)
  if state == "empty":
    m0 = jnp.full((b, h), -jnp.inf, jnp.float32)
    u0 = jnp.zeros((b, h), jnp.float32)
    w0 = jnp.zeros((b, h, dv), jnp.float32)
  else:
    # "dominant": m0 above every logit (the max's gradient goes to m0).
    m0 = normal(3, (b, h)) * (0.1 if state == "dominant" else 1.0) + (
        5.0 if state == "dominant" else 0.0)
    u0 = 1.0 + 3.0 * jax.random.uniform(ks[4], (b, h))
    w0 = normal(5, (b, h, dv)) * u0[..., None]
  cts = (normal(6, (b, t, h, dv)), normal(7, (b, h)), normal(8, (b, h)),
         normal(9, (b, h, dv)))
  return (q, k, v), (m0, u0, w0), cts


def _kernel(scale, interpret=True):
  fn = lambda q, k, v, m0, u0, w0: scan_gpu.attention_scan(
      q, k, v, m0, u0, w0, scale=scale, interpret=interpret)
  return jax.jit(fn) if interpret else fn   # jit: the interpreter, traced once


def _xla(scale):
  def fn(q, k, v, m0, u0, w0):
    o, st = al.attention_scan(q, k, v, scale=scale,
                              initial_state=AttentionScanState(m0, u0, w0),
                              return_final_state=True, implementation="xla")
    return o, st.m, st.u, st.w
  return fn


def _oracle(scale):
  def fn(q, k, v, m0, u0, w0):
    f32 = lambda x: x.astype(jnp.float32)
    q, k, v = f32(q), f32(k), f32(v)
    o = oracle.attention_scan(q, k, v, scale=scale,
                              initial_state=(m0, u0, w0))
    return (o,) + tuple(oracle.final_sums(q, k, v, scale=scale,
                                          initial_state=(m0, u0, w0)))
  return fn


def _numpy_f64(q, k, v, m0, u0, w0, scale):
  """o [B, T, H, V] and (m, u, w) by the token-by-token recurrence, float64."""
  q, k, v, m0, u0, w0 = (np.asarray(x, np.float64)
                         for x in (q, k, v, m0, u0, w0))
  b, t, hkv, _ = k.shape
  h = q.shape[1]
  g = h // hkv
  o = np.zeros((b, t, h, v.shape[-1]))
  m, u, w = m0.copy(), u0.copy(), w0.copy()
  for j in range(t):
    kj = np.repeat(k[:, j], g, axis=1)
    vj = np.repeat(v[:, j], g, axis=1)
    s = scale * np.einsum("bhd,bhd->bh", q, kj)
    mn = np.maximum(m, s)
    a = np.where(np.isneginf(m), 0.0, np.exp(m - mn))
    u = u * a + np.exp(s - mn)
    w = w * a[..., None] + np.exp(s - mn)[..., None] * vj
    m = mn
    o[:, j] = w / u[..., None]
  return o, m, u, w


def _rel_err(x, ref):
  x = np.asarray(x, np.float32)
  ref = np.asarray(ref, np.float32)
  return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-6))


def _check_close(x, ref, what):
  """16-bit tolerance relative to the reference's max; an all-zero reference
  needs |x| < tol."""
  ref = np.asarray(ref, np.float32)
  x = np.asarray(x, np.float32)
  assert x.shape == ref.shape, (what, x.shape, ref.shape)
  assert np.all(np.isfinite(x)), what
  if np.max(np.abs(ref)) == 0.0:
    assert np.max(np.abs(x)) < _TOL, what
  else:
    assert _rel_err(x, ref) < _TOL, (what, _rel_err(x, ref))


def _grads(fn, args, cts):
  def loss(*a):
    outs = fn(*a)
    return sum(jnp.sum(x.astype(jnp.float32) * c) for x, c in zip(outs, cts))
  return jax.grad(loss, argnums=range(6))(*args)


_NAMES = ("o", "m", "u", "w")
_GRAD_NAMES = ("dq", "dk", "dv", "dm0", "du0", "dw0")

# ------------------------------------------------------ interpret numerics ---

# (B, T, H, Hkv, D, V, dtype, state): GQA, MHA; T not a multiple of 64 and
# a multiple; the empty state, a random one and one whose m0 is the max.
_CASES = [
    (1, 100, 2, 1, 64, 64, jnp.bfloat16, "random"),
    (1, 150, 2, 1, 64, 128, jnp.bfloat16, "empty"),
    (1, 64, 2, 2, 128, 64, jnp.float16, "empty"),
    (1, 70, 1, 1, 64, 64, jnp.bfloat16, "dominant"),
    # Head dims of 256: composed calls (the logit surrogate, value halves).
    (1, 70, 2, 1, 256, 64, jnp.bfloat16, "random"),
    (1, 40, 2, 2, 64, 256, jnp.bfloat16, "empty"),
    (1, 33, 2, 1, 256, 256, jnp.float16, "random"),
]


@pytest.mark.parametrize("b,t,h,hkv,d,dv,dtype,state", _CASES)
def test_interpret_matches_references(b, t, h, hkv, d, dv, dtype, state):
  scale = d ** -0.5
  qkv, st, cts = _inputs(b, t, h, hkv, d, dv, dtype, state)
  args = qkv + st
  outs = _kernel(scale)(*args)
  assert outs[0].shape == (b, t, h, dv) and outs[0].dtype == dtype
  assert all(x.dtype == jnp.float32 for x in outs[1:])
  for ref_fn in (_xla(scale), _oracle(scale)):
    for name, x, r in zip(_NAMES, outs, ref_fn(*args)):
      _check_close(x, r, name)
  grads = _grads(_kernel(scale), args, cts)
  for ref_fn in (_xla, _oracle):
    for name, g, g_ref, a in zip(_GRAD_NAMES, grads,
                                 _grads(ref_fn(scale), args, cts), args):
      assert g.dtype == a.dtype, name
      if ref_fn is _oracle and state == "empty" and name[-1] == "0":
        continue  # the oracle's log(u0) has no gradient at u0 = 0
      _check_close(g, g_ref, name)
  if state == "empty":   # nothing to differentiate in e^{m0} = 0
    for g in grads[3:]:
      assert not np.any(np.asarray(g)), g


def test_interpret_state_continuation():
  # Two calls (the second starting from the first's final state) equal one
  # call on the concatenated sequence; 70 + 90 tokens cross chunk borders.
  scale = 0.125
  (q, k, v), (m0, u0, w0), _ = _inputs(1, 160, 2, 1, 64, 64, jnp.bfloat16,
                                       "empty", seed=1)
  fn = _kernel(scale)
  o1, m1, u1, w1 = fn(q, k[:, :70], v[:, :70], m0, u0, w0)
  o2, m2, u2, w2 = fn(q, k[:, 70:], v[:, 70:], m1, u1, w1)
  o, m, u, w = fn(q, k, v, m0, u0, w0)
  _check_close(jnp.concatenate([o1, o2], axis=1), o, "o")
  for name, x, r in zip("muw", (m2, u2, w2), (m, u, w)):
    _check_close(x, r, name)
  want_o, *want_st = _numpy_f64(q, k, v, m0, u0, w0, scale)
  _check_close(o, want_o, "o vs float64")
  for name, x, r in zip("muw", (m, u, w), want_st):
    _check_close(x, r, name + " vs float64")


def test_interpret_huge_logits():
  # Logits of magnitude ~1e4 (q scaled by 1e3): every exponent stays <= 0.
  scale = 64 ** -0.5
  qkv, st, cts = _inputs(1, 90, 2, 1, 64, 64, jnp.bfloat16, "empty",
                         seed=2, q_scale=1e3)
  args = qkv + st
  outs = _kernel(scale)(*args)
  assert float(jnp.max(jnp.abs(outs[1]))) > 1e3
  want = _numpy_f64(*args, scale)
  for name, x, r in zip(_NAMES, outs, want):
    _check_close(x, r, name)
  grads = _grads(_kernel(scale), args, cts)
  for name, g, g_ref in zip(_GRAD_NAMES, grads,
                            _grads(_xla(scale), args, cts)):
    _check_close(g, g_ref, name)


def test_interpret_huge_logits_wide_keys():
  # D = 256 (the logit surrogate): logits ~1e4 keep float32-like precision.
  scale = 256 ** -0.5
  qkv, st, cts = _inputs(1, 50, 2, 1, 256, 64, jnp.bfloat16, "empty",
                         seed=5, q_scale=1e3)
  args = qkv + st
  outs = _kernel(scale)(*args)
  assert float(jnp.max(jnp.abs(outs[1]))) > 1e3
  for name, x, r in zip(_NAMES, outs, _numpy_f64(*args, scale)):
    _check_close(x, r, name)
  # m is the max logit itself: the surrogate must carry it to ~1e-6 relative.
  np.testing.assert_allclose(outs[1], _numpy_f64(*args, scale)[1], rtol=1e-6)


def test_interpret_many_short_sequences():
  # B = 16, T = 3: 32 CTAs of a single, mostly padded chunk each.
  scale = 0.125
  qkv, st, cts = _inputs(16, 3, 2, 1, 64, 64, jnp.bfloat16, "random",
                         seed=3)
  args = qkv + st
  outs = _kernel(scale)(*args)
  for name, x, r in zip(_NAMES, outs, _xla(scale)(*args)):
    _check_close(x, r, name)
  grads = _grads(_kernel(scale), args, cts)
  for name, g, g_ref in zip(_GRAD_NAMES, grads,
                            _grads(_xla(scale), args, cts)):
    _check_close(g, g_ref, name)


def test_interpret_single_token():
  scale = 0.125
  (q, k, v), (m0, u0, w0), _ = _inputs(2, 1, 2, 2, 64, 64, jnp.float16,
                                       "empty", seed=4)
  o, m, u, w = _kernel(scale)(q, k, v, m0, u0, w0)
  _check_close(o[:, 0], v[:, 0], "o = v_0")
  np.testing.assert_allclose(np.asarray(u), 1.0)
  _check_close(w, v[:, 0].astype(jnp.float32), "w = v_0")


# --------------------------------------------------------------- lowering ---


def _export(fn, t, b=8, h=16, hkv=16, d=128, dv=128):
  sds = jax.ShapeDtypeStruct
  args = (sds((b, h, d), jnp.bfloat16), sds((b, t, hkv, d), jnp.bfloat16),
          sds((b, t, hkv, dv), jnp.bfloat16), sds((b, h), jnp.float32),
          sds((b, h), jnp.float32), sds((b, h, dv), jnp.float32))
  return jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)


def _count(exported):
  return len(re.findall(r"custom_call @mosaic_gpu", exported.mlir_module()))


@pytest.mark.parametrize("t", [1024, 16384, 131072])
def test_forward_lowers_for_cuda(t):
  exported = _export(_kernel(128 ** -0.5, interpret=False), t)
  assert _count(exported) == 1
  o, m, u, w = exported.out_avals
  assert o.shape == (8, t, 16, 128) and o.dtype == jnp.bfloat16
  assert m.shape == u.shape == (8, 16) and w.shape == (8, 16, 128)


@pytest.mark.parametrize("t", [1024, 16384, 131072])
def test_vjp_lowers_for_cuda(t):
  fn = _kernel(128 ** -0.5, interpret=False)
  def grad(*args):
    loss = lambda *a: sum(jnp.sum(x.astype(jnp.float32)) for x in fn(*a))
    return jax.grad(loss, argnums=range(6))(*args)
  exported = _export(grad, t)
  assert _count(exported) == 2   # forward (residuals) and the reverse scan
  shapes = [a.shape for a in exported.out_avals]
  assert shapes == [(8, 16, 128), (8, t, 16, 128), (8, t, 16, 128),
                    (8, 16), (8, 16), (8, 16, 128)]


def test_wide_head_dims_lower_for_cuda():
  # D = V = 256: the surrogate call and two value halves, forward and vjp.
  fn = _kernel(256 ** -0.5, interpret=False)
  assert _count(_export(fn, 4096, b=2, h=8, hkv=2, d=256, dv=256)) == 2
  grad = lambda *a: _grads(fn, a, (1.0, 1.0, 1.0, 1.0))
  exported = _export(grad, 4096, b=2, h=8, hkv=2, d=256, dv=256)
  assert _count(exported) == 4
  assert exported.out_avals[1].shape == (2, 4096, 2, 256)


def test_vjp_lowers_for_cuda_gqa_t_not_multiple():
  fn = _kernel(0.1, interpret=False)
  grad = lambda *a: _grads(fn, a, (1.0, 1.0, 1.0, 1.0))
  exported = _export(grad, 1000, b=2, h=8, hkv=2, d=64, dv=128)
  assert _count(exported) == 2
  assert exported.out_avals[1].shape == (2, 1000, 2, 64)


# -------------------------------------------------------------- validation ---


@pytest.mark.parametrize("case,match", [
    ("float32", "q.dtype=float32"), ("head_dim", "D.*=96"),
    ("v_dim", "V.*=32"), ("groups", "Hkv.*=3"), ("k_shape", "k.shape"),
    ("mixed", "v.dtype=float16"), ("w0_shape", "w0.shape"),
    ("m0_dtype", "m0.dtype=bfloat16"), ("scale", "scale=nan"),
    ("rank", "q.shape")])
def test_rejects_bad_inputs(case, match):
  b, t, h, hkv, d, dv, dtype = 1, 10, 4, 2, 64, 64, jnp.bfloat16
  if case == "float32":
    dtype = jnp.float32
  elif case == "head_dim":
    d = 96
  elif case == "v_dim":
    dv = 32
  elif case == "groups":
    hkv = 3
  q = jnp.zeros((b, h, d), dtype)
  k = jnp.zeros((b, t, hkv, d + 8 * (case == "k_shape")), dtype)
  v = jnp.zeros((b, t, hkv, dv), jnp.float16 if case == "mixed" else dtype)
  m0 = jnp.zeros((b, h), jnp.bfloat16 if case == "m0_dtype" else jnp.float32)
  u0 = jnp.ones((b, h), jnp.float32)
  w0 = jnp.zeros((b, h, dv + (case == "w0_shape")), jnp.float32)
  if case == "rank":
    q = q[0]
  scale = float("nan") if case == "scale" else 0.125
  with pytest.raises(ValueError, match=match):
    scan_gpu.attention_scan(q, k, v, m0, u0, w0, scale=scale, interpret=True)


def test_supports():
  assert scan_gpu.supports(128, 128, jnp.bfloat16)
  assert scan_gpu.supports(64, 128, jnp.float16)
  assert scan_gpu.supports(256, 64, jnp.bfloat16)
  assert not scan_gpu.supports(96, 128, jnp.bfloat16)
  assert not scan_gpu.supports(128, 512, jnp.bfloat16)
  assert not scan_gpu.supports(128, 128, jnp.float32)


# ------------------------------------------------------------- on the GPU ---


@gpu_only
@pytest.mark.parametrize("t,hkv,d,state", [(4096, 4, 128, "empty"),
                                           (3000, 2, 128, "random"),
                                           (2000, 2, 256, "random")])
def test_gpu_matches_xla(t, hkv, d, state):
  scale = d ** -0.5
  qkv, st, cts = _inputs(2, t, 4, hkv, d, d, jnp.bfloat16, state)
  args = qkv + st
  fn = jax.jit(_kernel(scale, interpret=False))
  for name, x, r in zip(_NAMES, fn(*args), _xla(scale)(*args)):
    _check_close(x, r, name)
  grads = jax.jit(lambda *a: _grads(fn, a, cts))(*args)
  for name, g, g_ref in zip(_GRAD_NAMES, grads,
                            _grads(_xla(scale), args, cts)):
    _check_close(g, g_ref, name)
