"""Tests for al.attention_scan and al.attention_scan_step (Aaren).

Inputs are made with NumPy and every composite computation (gradients, loss
sums) runs under one jax.jit: on CPU almost all of the time goes to compiling,
and each eager op of a new shape is a separate compilation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import attnlib as al
from attnlib.ops import attention_scan as scan_lib
from tests.oracles import attention_scan as oracle

F32_TOL = dict(atol=1e-5, rtol=1e-5)
BF16_TOL = dict(atol=2e-2, rtol=2e-2)
GRAD_TOL = dict(atol=5e-5, rtol=5e-5)
B, T, H, HKV, D, V = 2, 11, 4, 2, 8, 5  # the default problem


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
  """Blocks of 8 tokens so that the usual lengths (11, 17, ...) cross blocks."""
  monkeypatch.setattr(scan_lib, "BLOCK_SIZE", 8)


def _qkv(seed, *, batch=B, length=T, heads=H, kv_heads=HKV, head_dim=D,
         v_dim=V, q_rank=3, dtype=np.float32, q_scale=1.0):
  rng = np.random.default_rng(seed)
  q_shape = (batch, heads, head_dim) if q_rank == 3 else (heads, head_dim)
  q = q_scale * rng.standard_normal(q_shape)
  k = q_scale * rng.standard_normal((batch, length, kv_heads, head_dim))
  v = rng.standard_normal((batch, length, kv_heads, v_dim))
  return tuple(x.astype(np.float32).astype(dtype) for x in (q, k, v))


def _state(seed, batch=B, heads=H, v_dim=V):
  """A non-empty state: m ~ N(0, 1), u in [0.5, 3], w ~ N(0, 1)."""
  rng = np.random.default_rng(seed)
  return al.AttentionScanState(
      m=rng.standard_normal((batch, heads)).astype(np.float32),
      u=rng.uniform(0.5, 3.0, (batch, heads)).astype(np.float32),
      w=rng.standard_normal((batch, heads, v_dim)).astype(np.float32))


def _ct(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _assert_finite(tree):
  for x in jax.tree.leaves(tree):
    assert np.all(np.isfinite(np.asarray(x, np.float32))), x


def _scan_with_state(q, k, v, m0, u0, w0, scale=None):
  """al.attention_scan with the initial state's fields as separate arguments."""
  return al.attention_scan(q, k, v, scale=scale,
                           initial_state=al.AttentionScanState(m0, u0, w0))


def _grads(fn, ct, args, argnums):
  """jit(grad) of sum(fn(*args) * ct) w.r.t. args[argnums]."""
  loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * ct)
  return jax.jit(jax.grad(loss, argnums=argnums))(*args)


# ----------------------------------------------------------------------------
# Forward against the oracle.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("q_rank,length,heads,kv_heads,with_state", [
    (3, 1, 4, 4, False),
    (2, 1, 4, 2, True),
    (3, 17, 4, 2, True),
    (2, 17, 4, 1, False),
    (3, 17, 2, 2, False),
    (2, 13, 4, 4, True),
])
def test_forward_matches_oracle(q_rank, length, heads, kv_heads, with_state):
  q, k, v = _qkv(0, length=length, heads=heads, kv_heads=kv_heads,
                 q_rank=q_rank)
  state = _state(1, heads=heads) if with_state else None
  o = al.attention_scan(q, k, v, initial_state=state)
  want = oracle.attention_scan(q, k, v, initial_state=state)
  assert o.shape == (B, length, heads, V) and o.dtype == jnp.float32
  np.testing.assert_allclose(o, want, **F32_TOL)


@pytest.mark.parametrize("length,block_size", [(8, 8), (31, 8), (67, 8),
                                               (67, 64), (5, 64)])
def test_lengths_and_blocks(monkeypatch, length, block_size):
  # Exact block multiples, padded last blocks, one short block; outputs and
  # the final state's sums (relative to the same max) against the oracle.
  monkeypatch.setattr(scan_lib, "BLOCK_SIZE", block_size)
  q, k, v = _qkv(2, batch=1, length=length, heads=2, kv_heads=1)
  state = _state(3, batch=1, heads=2)
  o, final = al.attention_scan(q, k, v, initial_state=state,
                               return_final_state=True)
  np.testing.assert_allclose(
      o, oracle.attention_scan(q, k, v, initial_state=state), **F32_TOL)
  m, u, w = oracle.final_sums(q, k, v, initial_state=state)
  np.testing.assert_allclose(final.m, m, **F32_TOL)
  np.testing.assert_allclose(final.u, u, **F32_TOL)
  np.testing.assert_allclose(final.w, w, **F32_TOL)


@pytest.mark.parametrize("length,with_state", [(5, False), (23, True)])
def test_forward_bfloat16(length, with_state):
  q, k, v = _qkv(3, length=length, dtype=jnp.bfloat16)
  state = _state(4) if with_state else None
  o, final = al.attention_scan(q, k, v, initial_state=state,
                               return_final_state=True)
  assert o.dtype == jnp.bfloat16
  assert all(x.dtype == jnp.float32 for x in final)
  want = oracle.attention_scan(q, k, v, initial_state=state)
  np.testing.assert_allclose(o.astype(np.float32), want, **BF16_TOL)


def test_scale():
  q, k, v = _qkv(5)
  np.testing.assert_array_equal(al.attention_scan(q, k, v),
                                al.attention_scan(q, k, v, scale=D ** -0.5))
  for scale in (0.3, -1.5, 0.0, 2):
    np.testing.assert_allclose(al.attention_scan(q, k, v, scale=scale),
                               oracle.attention_scan(q, k, v, scale=scale),
                               **F32_TOL)


def test_last_output_is_softmax_attention_over_all_keys():
  q, k, v = _qkv(6, length=19, v_dim=D)  # dot_product_attention needs V == D
  o = al.attention_scan(q, k, v, scale=0.7)
  want = jax.nn.dot_product_attention(q[:, None], k, v, scale=0.7)[:, 0]
  np.testing.assert_allclose(o[:, -1], want, **F32_TOL)
  # q shared across the batch.
  o2 = al.attention_scan(q[0], k, v, scale=0.7)
  q2 = np.broadcast_to(q[0], q.shape)[:, None]
  want2 = jax.nn.dot_product_attention(q2, k, v, scale=0.7)[:, 0]
  np.testing.assert_allclose(o2[:, -1], want2, **F32_TOL)


# ----------------------------------------------------------------------------
# State: final sums, splitting, stepping, the empty state.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("with_state", [False, True])
def test_final_state_matches_oracle_sums(with_state):
  q, k, v = _qkv(7)
  state = _state(8) if with_state else None
  _, final = al.attention_scan(q, k, v, initial_state=state,
                               return_final_state=True)
  m, u, w = oracle.final_sums(q, k, v, initial_state=state)
  assert final.m.shape == (B, H) and final.u.shape == (B, H)
  assert final.w.shape == (B, H, V)
  # u and w are relative to m: compare u e^{m - m_ref} with the oracle's u.
  rel = np.exp(np.asarray(final.m) - np.asarray(m))
  np.testing.assert_allclose(final.m, m, **F32_TOL)
  np.testing.assert_allclose(final.u * rel, u, **F32_TOL)
  np.testing.assert_allclose(final.w * rel[..., None], w, **F32_TOL)


@pytest.mark.parametrize("q_rank", [2, 3])
def test_two_halves_with_state_equal_whole(q_rank):
  q, k, v = _qkv(9, length=23, q_rank=q_rank)
  state = _state(10)
  whole, whole_final = al.attention_scan(q, k, v, initial_state=state,
                                         return_final_state=True)
  first, mid = al.attention_scan(q, k[:, :10], v[:, :10], initial_state=state,
                                 return_final_state=True)
  second, final = al.attention_scan(q, k[:, 10:], v[:, 10:], initial_state=mid,
                                    return_final_state=True)
  np.testing.assert_allclose(np.concatenate([first, second], axis=1), whole,
                             **F32_TOL)
  for got, want in zip(final, whole_final):
    np.testing.assert_allclose(got, want, **F32_TOL)


@pytest.mark.parametrize("q_rank,with_state", [(2, False), (3, True)])
def test_step_loop_equals_scan(q_rank, with_state):
  q, k, v = _qkv(11, q_rank=q_rank)
  init = _state(12) if with_state else al.AttentionScanState.empty(B, H, V)
  o, final = al.attention_scan(q, k, v, initial_state=init,
                               return_final_state=True)
  state = init
  outs = []
  for t in range(T):
    o_t, state = al.attention_scan_step(state, q, k[:, t], v[:, t])
    assert o_t.shape == (B, H, V)
    outs.append(o_t)
  np.testing.assert_allclose(np.stack(outs, axis=1), o, **F32_TOL)
  for got, want in zip(state, final):
    np.testing.assert_allclose(got, want, **F32_TOL)


def test_step_bfloat16():
  q, k, v = _qkv(13, length=6, dtype=jnp.bfloat16)
  state = al.AttentionScanState.empty(B, H, V)
  for t in range(6):
    o_t, state = al.attention_scan_step(state, q, k[:, t], v[:, t])
  assert o_t.dtype == jnp.bfloat16 and state.w.dtype == jnp.float32
  want = oracle.attention_scan(q, k, v)[:, -1]
  np.testing.assert_allclose(o_t.astype(np.float32), want, **BF16_TOL)


def test_empty_state():
  empty = al.AttentionScanState.empty(B, H, V)
  assert empty.m.shape == (B, H) and empty.w.shape == (B, H, V)
  assert all(x.dtype == jnp.float32 for x in empty)
  assert np.all(np.isneginf(empty.m))
  assert not np.any(empty.u) and not np.any(empty.w)
  q, k, v = _qkv(14)
  o, final = al.attention_scan(q, k, v, initial_state=empty,
                               return_final_state=True)
  o_none, final_none = al.attention_scan(q, k, v, return_final_state=True)
  np.testing.assert_array_equal(o, o_none)
  for got, want in zip(final, final_none):
    np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------
# Gradients.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("heads,kv_heads,q_rank", [(4, 2, 3), (4, 1, 2)])
def test_grads_match_oracle(heads, kv_heads, q_rank):
  q, k, v = _qkv(15, length=17, heads=heads, kv_heads=kv_heads, q_rank=q_rank)
  args = (q, k, v) + tuple(_state(16, heads=heads))
  ct = _ct(17, (B, 17, heads, V))
  ref = lambda q, k, v, m0, u0, w0: oracle.attention_scan(
      q, k, v, scale=0.6, initial_state=(m0, u0, w0))
  got = _grads(functools.partial(_scan_with_state, scale=0.6), ct, args,
               range(6))
  want = _grads(ref, ct, args, range(6))
  for name, g, w in zip("q k v m0 u0 w0".split(), got, want):
    np.testing.assert_allclose(g, w, err_msg=name, **GRAD_TOL)


def test_grads_of_final_state_match_oracle():
  q, k, v = _qkv(18)
  state = _state(19)
  ct_m, ct_w = _ct(20, (B, H)), _ct(21, (B, H, V))

  def loss(final):
    # Functions of the represented sums u e^m and w e^m.
    m, u, w = final
    return (jnp.sum(ct_m * (m + jnp.log(u))) +
            jnp.sum(ct_w * w * jnp.exp(m)[..., None]))

  lib = lambda q, k, v: loss(al.attention_scan(
      q, k, v, initial_state=state, return_final_state=True)[1])
  ref = lambda q, k, v: loss(oracle.final_sums(q, k, v, initial_state=state))
  got = jax.jit(jax.grad(lib, argnums=(0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(ref, argnums=(0, 1, 2)))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, **GRAD_TOL)


def test_grads_bfloat16():
  q, k, v = _qkv(21, dtype=jnp.bfloat16)
  ct = _ct(22, (B, T, H, V))
  got = _grads(al.attention_scan, ct, (q, k, v), (0, 1, 2))
  want = _grads(oracle.attention_scan, ct, (q, k, v), (0, 1, 2))
  for g, w in zip(got, want):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(g.astype(np.float32), w.astype(np.float32),
                               **BF16_TOL)


def test_check_grads():
  q, k, v = _qkv(23, batch=1, length=5, heads=2, kv_heads=1, head_dim=3,
                 v_dim=2)
  state = _state(24, batch=1, heads=2, v_dim=2)
  check_grads(jax.jit(_scan_with_state), (q, k, v) + tuple(state), order=1,
              modes=["rev"], eps=1e-3)


def test_step_grads_match_scan():
  q, k, v = _qkv(25, length=4)

  def steps(q, k, v):
    state = al.AttentionScanState.empty(B, H, V)
    outs = []
    for t in range(4):
      o_t, state = al.attention_scan_step(state, q, k[:, t], v[:, t])
      outs.append(o_t)
    return jnp.stack(outs, axis=1)

  ct = _ct(26, (B, 4, H, V))
  got = _grads(steps, ct, (q, k, v), (0, 1, 2))
  want = _grads(oracle.attention_scan, ct, (q, k, v), (0, 1, 2))
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, **GRAD_TOL)


# ----------------------------------------------------------------------------
# Numerical robustness: huge logits, ties, the empty state under grad.
# ----------------------------------------------------------------------------


def _integer_qk(seed):
  """q, k with integer entries: with scale 1, logits ~1e4 exact in float32.

  One ulp of a logit of 1e4 is ~1e-3, which moves the softmax weights by
  ~1e-3: only exact logits make a tight comparison between two different (and
  equally correct) computations meaningful.
  """
  rng = np.random.default_rng(seed)
  q = 500.0 * rng.integers(-3, 4, (B, H, D))
  k = rng.integers(-3, 4, (B, T, HKV, D))
  return q.astype(np.float32), k.astype(np.float32)


def test_large_logits():
  q, k = _integer_qk(27)
  v = _qkv(27)[2]
  s = np.einsum("bhd,bthd->bth", q, np.repeat(k, H // HKV, axis=2))
  assert np.max(np.abs(s)) > 1e4
  empty = al.AttentionScanState.empty(B, H, V)
  o = al.attention_scan(q, k, v, scale=1.0, initial_state=empty)
  _assert_finite(o)
  np.testing.assert_allclose(o, oracle.attention_scan(q, k, v, scale=1.0),
                             **F32_TOL)
  state = empty
  for t in range(T):
    o_t, state = al.attention_scan_step(state, q, k[:, t], v[:, t], scale=1.0)
  _assert_finite((o_t, state))
  np.testing.assert_allclose(o_t, o[:, -1], **F32_TOL)
  # Gradients, also with Gaussian q, k scaled by 100 (logits ~1e3..1e4),
  # through the empty state.
  ct = _ct(28, (B, T, H, V))
  grads = jax.jit(jax.grad(
      lambda *a: jnp.sum(_scan_with_state(*a, scale=1.0) * ct),
      argnums=range(6)))
  _assert_finite(grads(q, k, v, *empty))
  _assert_finite(grads(*_qkv(29, q_scale=100.0), *empty))


@pytest.mark.parametrize("tie", ["zero_query", "repeated_keys"])
def test_ties_and_empty_state_grads(tie):
  q, k, v = _qkv(30)
  if tie == "zero_query":
    q = np.zeros_like(q)  # every logit is 0
  else:
    k = np.broadcast_to(k[:, :1], k.shape).copy()  # equal logits over time
  ct = _ct(31, (B, T, H, V))
  empty = tuple(al.AttentionScanState.empty(B, H, V))
  got = _grads(_scan_with_state, ct, (q, k, v) + empty, range(6))
  _assert_finite(got)
  want = _grads(oracle.attention_scan, ct, (q, k, v), (0, 1, 2))
  for g, w in zip(got[:3], want):
    np.testing.assert_allclose(g, w, **GRAD_TOL)

  def step_loss(m0, u0, w0, q, k, v):
    o, state = al.attention_scan_step(al.AttentionScanState(m0, u0, w0), q,
                                      k[:, 0], v[:, 0])
    return jnp.sum(o) + jnp.sum(state.w)

  _assert_finite(jax.jit(jax.grad(step_loss, argnums=range(6)))(*empty, q, k,
                                                                 v))


# ----------------------------------------------------------------------------
# Transformations and dispatch.
# ----------------------------------------------------------------------------


def test_jit():
  q, k, v = _qkv(32)
  state = _state(33)
  fn = jax.jit(functools.partial(al.attention_scan, return_final_state=True))
  o, final = fn(q, k, v, initial_state=state)
  assert isinstance(final, al.AttentionScanState)
  np.testing.assert_allclose(
      o, oracle.attention_scan(q, k, v, initial_state=state), **F32_TOL)
  o_t, new = jax.jit(al.attention_scan_step)(state, q, k[:, 0], v[:, 0])
  o_t2, new2 = al.attention_scan_step(state, q, k[:, 0], v[:, 0])
  np.testing.assert_allclose(o_t, o_t2, **F32_TOL)
  np.testing.assert_allclose(new.w, new2.w, **F32_TOL)


def test_vmap():
  # A leading axis of 3 independent problems.
  qs, ks, vs = zip(*(_qkv(40 + i) for i in range(3)))
  states = [_state(50 + i) for i in range(3)]
  q, k, v = np.stack(qs), np.stack(ks), np.stack(vs)
  state = jax.tree.map(lambda *xs: np.stack(xs), *states)
  fn = jax.vmap(functools.partial(al.attention_scan, return_final_state=True))
  o, final = fn(q, k, v, initial_state=state)
  for i in range(3):
    want = oracle.attention_scan(qs[i], ks[i], vs[i], initial_state=states[i])
    np.testing.assert_allclose(o[i], want, **F32_TOL)
  _, whole_final = al.attention_scan(qs[2], ks[2], vs[2],
                                     initial_state=states[2],
                                     return_final_state=True)
  np.testing.assert_allclose(final.w[2], whole_final.w, **F32_TOL)
  o_t, _ = jax.vmap(al.attention_scan_step)(state, q, k[:, :, 0], v[:, :, 0])
  o_t0, _ = al.attention_scan_step(states[0], qs[0], ks[0][:, 0], vs[0][:, 0])
  np.testing.assert_allclose(o_t[0], o_t0, **F32_TOL)


def test_implementation():
  q, k, v = _qkv(60)
  np.testing.assert_array_equal(
      al.attention_scan(q, k, v, implementation="xla"),
      al.attention_scan(q, k, v))
  # The TPU kernel (TPU interpret mode) takes these float32 inputs; the
  # Mosaic GPU kernel 16-bit ones only (tests/kernels has both in depth).
  np.testing.assert_allclose(
      al.attention_scan(q, k, v, implementation="mosaic_tpu", interpret=True),
      al.attention_scan(q, k, v), **F32_TOL)
  with pytest.raises(ValueError, match="implementation='mosaic_gpu'"):
    al.attention_scan(q, k, v, implementation="mosaic_gpu", interpret=True)
  q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
  got = al.attention_scan(q16, k16, v16, implementation="mosaic_gpu",
                          interpret=True)
  want = al.attention_scan(q16, k16, v16, implementation="xla")
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(want, np.float32), atol=2e-2, rtol=2e-2)


# ----------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------

_Q, _K, _V = _qkv(70, length=4)
_S = al.AttentionScanState(np.full((B, H), -np.inf, np.float32),
                           np.zeros((B, H), np.float32),
                           np.zeros((B, H, V), np.float32))


def _with(**fields):
  return _S._replace(**fields)


_BAD_SCAN = [
    # (id, arguments overriding q/k/v/options, match)
    ("q rank", dict(q=_Q[None]), "q.shape"),
    ("q not array", dict(q=[[1.0]]), "q="),
    ("k rank", dict(k=_K[0]), "k.shape"),
    ("v rank", dict(v=_V[None]), "v.shape"),
    ("q int", dict(q=_Q.astype(np.int32)), "q.dtype"),
    ("k dtype", dict(k=_K.astype(jnp.bfloat16)), "k.dtype"),
    ("v dtype", dict(v=_V.astype(np.float16)), "v.dtype"),
    ("q batch", dict(q=_Q[:1]), "q.shape"),
    ("k head_dim", dict(k=_K[..., :3]), "k.shape"),
    ("v batch", dict(v=_V[:1]), "v.shape"),
    ("v length", dict(v=_V[:, :3]), "v.shape"),
    ("v heads", dict(v=_V[:, :, :1]), "v.shape"),
    ("heads", dict(k=np.zeros((B, 4, 3, D), np.float32),
                   v=np.zeros((B, 4, 3, V), np.float32)), "k heads"),
    ("empty seq", dict(k=_K[:, :0], v=_V[:, :0]), "k.shape"),
    ("scale str", dict(scale="1"), "scale"),
    ("scale nan", dict(scale=float("nan")), "scale"),
    ("scale inf", dict(scale=float("inf")), "scale"),
    ("scale bool", dict(scale=True), "scale"),
    ("scale array", dict(scale=np.ones(2)), "scale"),
    ("state tuple", dict(initial_state=tuple(_S)), "initial_state"),
    ("state m shape", dict(initial_state=_with(m=_S.m[:1])),
     "initial_state.m.shape"),
    ("state u shape", dict(initial_state=_with(u=_S.u[:, :2])),
     "initial_state.u.shape"),
    ("state w shape", dict(initial_state=_with(w=_S.w[..., :2])),
     "initial_state.w.shape"),
    ("state dtype", dict(initial_state=_with(u=_S.u.astype(jnp.bfloat16))),
     "initial_state.u.dtype"),
    ("state field", dict(initial_state=_with(w=None)), "initial_state.w"),
    ("state u<0", dict(initial_state=_with(u=-np.ones((B, H), np.float32))),
     "initial_state.u"),
    ("state m nan", dict(initial_state=_with(
        m=np.full((B, H), np.nan, np.float32))), "initial_state.m"),
    ("return_final_state", dict(return_final_state="yes"),
     "return_final_state"),
    ("implementation", dict(implementation="cuda"), "implementation"),
    ("interpret", dict(interpret="no"), "interpret"),
]


@pytest.mark.parametrize("overrides,match", [b[1:] for b in _BAD_SCAN],
                         ids=[b[0] for b in _BAD_SCAN])
def test_bad_input_scan(overrides, match):
  args = dict(q=_Q, k=_K, v=_V)
  args.update(overrides)
  q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
  with pytest.raises(ValueError, match=match) as err:
    al.attention_scan(q, k, v, **args)
  assert "al.attention_scan" in str(err.value)


_BAD_STEP = [
    ("state none", dict(state=None), "state"),
    ("state w shape", dict(state=_with(w=_S.w[:, :, :2])), "state.w.shape"),
    ("state m dtype", dict(state=_with(m=_S.m.astype(np.float16))),
     "state.m.dtype"),
    ("q rank", dict(q=_Q[None]), "q.shape"),
    ("k rank", dict(k=_K), "k.shape"),
    ("v rank", dict(v=_V), "v.shape"),
    ("dtype", dict(k=_K[:, 0].astype(jnp.bfloat16)), "k.dtype"),
    ("q batch", dict(q=_Q[:1]), "q.shape"),
    ("k head_dim", dict(k=_K[:, 0, :, :3]), "k.shape"),
    ("v heads", dict(v=_V[:, 0, :1]), "v.shape"),
    ("heads", dict(k=np.zeros((B, 3, D), np.float32),
                   v=np.zeros((B, 3, V), np.float32)), "k heads"),
    ("scale", dict(scale=float("nan")), "scale"),
]


@pytest.mark.parametrize("overrides,match", [b[1:] for b in _BAD_STEP],
                         ids=[b[0] for b in _BAD_STEP])
def test_bad_input_step(overrides, match):
  args = dict(state=_S, q=_Q, k=_K[:, 0], v=_V[:, 0])
  args.update(overrides)
  with pytest.raises(ValueError, match=match) as err:
    al.attention_scan_step(args.pop("state"), args.pop("q"), args.pop("k"),
                           args.pop("v"), **args)
  assert "al.attention_scan_step" in str(err.value)


@pytest.mark.parametrize("args,match", [((0, 4, 5), "batch"),
                                        ((2, 4.0, 5), "heads"),
                                        ((2, 4, -1), "v_dim")])
def test_bad_input_empty_state(args, match):
  with pytest.raises(ValueError, match=match):
    al.AttentionScanState.empty(*args)


def test_shape_checks_run_under_jit():
  with pytest.raises(ValueError, match="v.shape"):
    jax.jit(al.attention_scan)(_Q, _K, _V[:, :3])


def test_combine_of_empty_states_is_empty_and_differentiable():
  # The operator itself (private) on the one input the public functions never
  # produce: both sides empty, where a naive max shift would compute
  # -inf - -inf.
  empty = al.AttentionScanState.empty(B, H, V)
  both = scan_lib._combine(empty, empty)
  for got, want in zip(both, empty):
    np.testing.assert_array_equal(got, want)
  grads = jax.jit(jax.grad(
      lambda a, b: jnp.sum(scan_lib._combine(a, b).w) +
      jnp.sum(scan_lib._combine(a, b).u), argnums=(0, 1)))(empty, empty)
  _assert_finite(grads)
