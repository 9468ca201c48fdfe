"""Tests of the Mosaic GPU (Hopper) linear-attention kernels, forward and
backward.

Three tiers:
  * lowering for "cuda" via jax.export (runs on CPU, no GPU needed);
  * numerics under Mosaic GPU interpret mode on tiny shapes (CPU);
  * the compiled kernel on a real GPU (skipped unless the backend is "gpu").
References: attnlib.linear_attention(..., implementation="xla") and its VJP;
float64 NumPy for the gate packing.
"""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlib import linear_attention
from kernels_pallas.linear_attention import mosaic_gpu as la_gpu

_ON_GPU = jax.default_backend() == "gpu"
gpu_only = pytest.mark.skipif(not _ON_GPU, reason="needs a Hopper GPU")


def _inputs(b, h, hkv, t, dk, dv, dtype, gates, s0, seed=0):
  """Random q [B,H,T,K], k/v [B,Hkv,T,*], log-gates [B,H,T], state."""
  keys = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(keys[0], (b, h, t, dk), jnp.float32).astype(dtype)
  k = (jax.random.normal(keys[1], (b, hkv, t, dk), jnp.float32)
       * dk ** -0.5).astype(dtype)
  v = jax.random.normal(keys[2], (b, hkv, t, dv), jnp.float32).astype(dtype)
  g = (-jax.random.uniform(keys[3], (b, h, t), jnp.float32, 0.0, 0.2)
       if gates else None)
  st = (jax.random.normal(keys[4], (b, h, dk, dv), jnp.float32)
        if s0 else None)
  return q, k, v, g, st


def _seq(*xs):
  """[B, heads, T, *] -> [B, T, heads, *] (None stays None): seq_major inputs."""
  return tuple(None if x is None else jnp.swapaxes(x, 1, 2) for x in xs)


def _reference(q, k, v, g, st, scale):
  """attnlib's xla path; transposes [B,H,T,*] <-> [B,T,H,*]."""
  tr = lambda x: jnp.swapaxes(x, 1, 2)
  o, sf = linear_attention(
      tr(q), tr(k), tr(v), decay=None if g is None else tr(g), scale=scale,
      initial_state=st, return_final_state=True, implementation="xla")
  return tr(o), sf


def _rel_err(x, ref):
  x = np.asarray(x, np.float32)
  ref = np.asarray(ref, np.float32)
  return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-6))


# --------------------------------------------------------------- lowering ---


@pytest.mark.parametrize("gates", [True, False], ids=["gates", "nogates"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("t", [1024, 8192, 32768])
def test_lowers_for_cuda(t, d, gates):
  b, h = 2, 4
  sds = jax.ShapeDtypeStruct
  args = (sds((b, h, t, d), jnp.bfloat16), sds((b, h, t, d), jnp.bfloat16),
          sds((b, h, t, d), jnp.bfloat16),
          sds((b, h, t), jnp.float32) if gates else None,
          sds((b, h, d, d), jnp.float32))
  fn = lambda q, k, v, g, s: la_gpu.linear_attention_fwd(
      q, k, v, g, s, scale=d ** -0.5)
  exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
  text = exported.mlir_module()
  assert re.search(r"custom_call @mosaic_gpu", text)
  out = exported.out_avals
  assert out[0].shape == (b, h, t, d) and out[0].dtype == jnp.bfloat16
  assert out[1].shape == (b, h, d, d) and out[1].dtype == jnp.float32


@pytest.mark.parametrize("gates", [True, False], ids=["gates", "nogates"])
def test_lowers_chunk128_k64(gates):
  b, h, t, d = 1, 2, 1024, 64
  sds = jax.ShapeDtypeStruct
  args = (sds((b, h, t, d), jnp.float16), sds((b, 1, t, d), jnp.float16),
          sds((b, 1, t, 2 * d), jnp.float16),
          sds((b, h, t), jnp.float32) if gates else None, None)
  fn = lambda q, k, v, g, s: la_gpu.linear_attention_fwd(
      q, k, v, g, s, scale=0.125, chunk=128)
  exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
  assert re.search(r"custom_call @mosaic_gpu", exported.mlir_module())


@pytest.mark.parametrize("v_block", [64, 32])
def test_seq_major_lowers_for_cuda_at_every_v_block(v_block):
  """The seq_major default path lowers for each documented v_block with K=128
  (at 32 the warp-specialized kernel's wgmma operands would disagree in
  swizzle, so the call must take the sweep)."""
  sds = jax.ShapeDtypeStruct
  args = (sds((1, 1024, 2, 128), jnp.bfloat16),) * 3 + (
      sds((1, 1024, 2), jnp.float32), None)
  fn = lambda q, k, v, g, s: la_gpu.linear_attention_fwd(
      q, k, v, g, s, scale=0.1, v_block=v_block, seq_major=True)
  exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
  assert len(re.findall(r"custom_call @mosaic_gpu", exported.mlir_module())) == 1


@pytest.mark.parametrize("gates", [True, False], ids=["gates", "nogates"])
@pytest.mark.parametrize("t", [1024, 32768])
def test_lowers_for_cuda_seq_major(t, gates):
  b, h, hkv, d = 2, 4, 2, 128
  sds = jax.ShapeDtypeStruct
  args = (sds((b, t, h, d), jnp.bfloat16), sds((b, t, hkv, d), jnp.bfloat16),
          sds((b, t, hkv, d), jnp.bfloat16),
          sds((b, t, h), jnp.float32) if gates else None,
          sds((b, h, d, d), jnp.float32))
  fn = lambda q, k, v, g, s: la_gpu.linear_attention_fwd(
      q, k, v, g, s, scale=d ** -0.5, seq_major=True)
  exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
  text = exported.mlir_module()
  assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 1
  # No XLA transposes of q, k, v, o; only the small gate swap [B,T,H]->[B,H,T].
  assert text.count("stablehlo.transpose") == (1 if gates else 0)
  out = exported.out_avals
  assert out[0].shape == (b, t, h, d) and out[0].dtype == jnp.bfloat16
  assert out[1].shape == (b, h, d, d) and out[1].dtype == jnp.float32


# -------------------------------------------------------------- validation ---


@pytest.mark.parametrize("seq_major", [False, True])
def test_gate_packing_matches_float64_cumsum(seq_major):
  rng = np.random.default_rng(0)
  g = np.log(rng.uniform(0.05, 1.0, size=(2, 3, 256)))         # [B, H, T]
  c = np.cumsum(g.reshape(2, 3, 4, 64), axis=-1)                # per chunk
  want = np.concatenate([c, np.repeat(c[..., -1:], 128, -1)], -1)
  arg = np.swapaxes(g, 1, 2) if seq_major else g
  got = la_gpu._gate_inputs(jnp.asarray(arg, jnp.float32), 64, 128, seq_major)
  np.testing.assert_allclose(got, want.reshape(2, 3, -1), rtol=1e-6, atol=1e-5)



@pytest.mark.parametrize("case,match", [
    ("t_not_multiple", "T=96"), ("bad_k", "K=96"), ("bad_dtype", "float32"),
    ("bad_groups", "H=3"), ("smem_too_big", "SMEM")])
def test_rejects_bad_inputs(case, match):
  dims = dict(b=1, h=2, hkv=2, t=128, dk=64, dv=64, dtype=jnp.bfloat16)
  if case == "t_not_multiple":
    dims["t"] = 96
  elif case == "bad_k":
    dims["dk"] = 96
  elif case == "bad_dtype":
    dims["dtype"] = jnp.float32
  elif case == "bad_groups":
    dims["h"], dims["hkv"] = 3, 2
  elif case == "smem_too_big":   # C = 128, K = 128, gates: ~232 KiB
    dims.update(t=256, dk=128, dv=128)
  q, k, v, g, st = _inputs(**dims, gates=case == "smem_too_big", s0=False)
  kwargs = dict(chunk=128) if case == "smem_too_big" else {}
  with pytest.raises(ValueError, match=match):
    la_gpu.linear_attention_fwd(q, k, v, g, st, scale=1.0, **kwargs)


# ------------------------------------------------------- interpret numerics ---

_IN_CHILD = os.environ.get("ATTNLIB_INTERPRET_CHILD") == "1"


def _in_child_process(request) -> bool:
  """Runs this test in a child pytest with a timeout; True when it passed.

  Mosaic GPU's interpreter (jax 0.11.2) now and then hangs in a barrier wait
  on the four-warpgroup forward (about one run in five of these tests here;
  the same cases never hung on the H200). A hang must not stall CI, and a
  wrong result must still fail: the child's assertion failure fails this
  test; two hangs in a row skip it, saying so.
  """
  if _IN_CHILD:
    return False
  for _ in range(2):
    try:
      run = subprocess.run(
          [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           request.node.nodeid], cwd=request.config.rootpath,
          env={**os.environ, "ATTNLIB_INTERPRET_CHILD": "1"},
          capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
      continue
    assert run.returncode == 0, run.stdout[-4000:]
    return True
  pytest.skip("Mosaic GPU's interpreter hung twice on this case")


_INTERPRET_CASES = [
    # (h, hkv, dk, dv, dtype, gates, s0)
    (2, 2, 64, 64, jnp.bfloat16, True, False),
    (2, 2, 64, 64, jnp.bfloat16, False, True),
    (2, 1, 128, 128, jnp.bfloat16, True, True),    # GQA, V split in 2
    (2, 1, 64, 128, jnp.bfloat16, False, False),   # GQA, K != V
    (1, 1, 64, 64, jnp.float16, True, True),
]


@pytest.mark.parametrize("h,hkv,dk,dv,dtype,gates,s0", _INTERPRET_CASES)
def test_interpret_matches_xla(h, hkv, dk, dv, dtype, gates, s0):
  chunk = 64
  q, k, v, g, st = _inputs(1, h, hkv, 2 * chunk, dk, dv, dtype, gates, s0)
  scale = dk ** -0.5
  o, sf = la_gpu.linear_attention_fwd(q, k, v, g, st, scale=scale,
                                      chunk=chunk, interpret=True)
  o_ref, sf_ref = _reference(q, k, v, g, st, scale)
  assert o.shape == o_ref.shape and o.dtype == q.dtype
  assert sf.shape == sf_ref.shape and sf.dtype == jnp.float32
  assert _rel_err(o, o_ref) < 2e-2
  assert _rel_err(sf, sf_ref) < 2e-2


def test_rejects_head_major_shapes_when_seq_major():
  q, k, v, g, st = _inputs(1, 4, 2, 128, 64, 64, jnp.bfloat16, True, False)
  with pytest.raises(ValueError):   # k is [B, Hkv, T, K]: T and Hkv swapped
    la_gpu.linear_attention_fwd(_seq(q)[0], k, _seq(v)[0], _seq(g)[0], st,
                                scale=1.0, seq_major=True)
  with pytest.raises(ValueError):   # gates still [B, H, T]
    la_gpu.linear_attention_fwd(*_seq(q, k, v), g, st, scale=1.0,
                                seq_major=True)


def _ws_cases():
  """_INTERPRET_CASES x (one-warpgroup sweep, warp-specialized forward)."""
  return [pytest.param(*case, ws, id=f"{case[:4]}-{name}")
          for case in _INTERPRET_CASES
          for ws, name in ((False, "sweep"), (True, "ws"))]


@pytest.mark.parametrize("h,hkv,dk,dv,dtype,gates,s0,ws", _ws_cases())
def test_interpret_seq_major_matches_xla(h, hkv, dk, dv, dtype, gates, s0, ws,
                                        request):
  if ws and _in_child_process(request):
    return
  chunk = 64
  q, k, v, g, st = _inputs(2, h, hkv, 3 * chunk, dk, dv, dtype, gates, s0,
                           seed=1)
  scale = dk ** -0.5
  o, sf = la_gpu.linear_attention_fwd(*_seq(q, k, v, g), st, scale=scale,
                                      chunk=chunk, seq_major=True,
                                      warp_specialized=ws, interpret=True)
  o_ref, sf_ref = _reference(q, k, v, g, st, scale)
  (o_ref,) = _seq(o_ref)
  assert o.shape == o_ref.shape and o.dtype == q.dtype
  assert sf.shape == sf_ref.shape and sf.dtype == jnp.float32
  assert _rel_err(o, o_ref) < 2e-2
  assert _rel_err(sf, sf_ref) < 2e-2


# ---------------------------------------------------------------- real GPU ---

_GPU_CASES = [
    # (h, hkv, gates, s0)
    (4, 4, True, False),
    (4, 4, False, False),
    (4, 4, True, True),
    (4, 2, True, True),    # GQA
]


@gpu_only
@pytest.mark.parametrize("d", [128, 64])
@pytest.mark.parametrize("h,hkv,gates,s0", _GPU_CASES)
def test_gpu_matches_xla(h, hkv, gates, s0, d):
  b, t = 2, 1024
  q, k, v, g, st = _inputs(b, h, hkv, t, d, d, jnp.bfloat16, gates, s0)
  scale = d ** -0.5
  o, sf = la_gpu.linear_attention_fwd_jit(q, k, v, g, st, scale=scale)
  o_ref, sf_ref = _reference(q, k, v, g, st, scale)
  assert o.shape == (b, h, t, d) and o.dtype == jnp.bfloat16
  assert _rel_err(o, o_ref) < 2e-2
  assert _rel_err(sf, sf_ref) < 2e-2


@gpu_only
@pytest.mark.parametrize("gates", [True, False], ids=["gates", "nogates"])
def test_gpu_chunk128_k64_f16(gates):
  q, k, v, g, st = _inputs(2, 4, 2, 1024, 64, 128, jnp.float16, gates, True)
  o, sf = la_gpu.linear_attention_fwd_jit(q, k, v, g, st, scale=0.125,
                                          chunk=128)
  o_ref, sf_ref = _reference(q, k, v, g, st, 0.125)
  assert _rel_err(o, o_ref) < 2e-2
  assert _rel_err(sf, sf_ref) < 2e-2


@gpu_only
@pytest.mark.parametrize("v_block", [64, 128])
def test_gpu_v_block_variants_agree(v_block):
  q, k, v, g, st = _inputs(2, 4, 4, 1024, 128, 128, jnp.bfloat16, True, True)
  o, sf = la_gpu.linear_attention_fwd_jit(q, k, v, g, st, scale=0.1,
                                          v_block=v_block)
  o_ref, sf_ref = _reference(q, k, v, g, st, 0.1)
  assert _rel_err(o, o_ref) < 2e-2
  assert _rel_err(sf, sf_ref) < 2e-2


@gpu_only
@pytest.mark.parametrize("d", [128, 64])
@pytest.mark.parametrize("h,hkv,gates,s0", _GPU_CASES)
def test_gpu_seq_major_matches_xla(h, hkv, gates, s0, d):
  b, t = 2, 1024
  q, k, v, g, st = _inputs(b, h, hkv, t, d, d, jnp.bfloat16, gates, s0)
  scale = d ** -0.5
  o, sf = la_gpu.linear_attention_fwd_jit(*_seq(q, k, v, g), st, scale=scale,
                                          seq_major=True)
  o_ref, sf_ref = _reference(q, k, v, g, st, scale)
  assert o.shape == (b, t, h, d) and o.dtype == jnp.bfloat16
  assert _rel_err(o, _seq(o_ref)[0]) < 2e-2
  assert _rel_err(sf, sf_ref) < 2e-2


@gpu_only
@pytest.mark.parametrize("chunk,v_block", [(64, 128), (128, 64)])
def test_gpu_seq_major_variants(chunk, v_block):
  dk = 64 if chunk == 128 else 128
  q, k, v, g, st = _inputs(2, 4, 2, 1024, dk, 128, jnp.float16, True, True)
  o, sf = la_gpu.linear_attention_fwd_jit(*_seq(q, k, v, g), st, scale=0.1,
                                          chunk=chunk, v_block=v_block,
                                          seq_major=True)
  o_ref, sf_ref = _reference(q, k, v, g, st, 0.1)
  assert _rel_err(o, _seq(o_ref)[0]) < 2e-2
  assert _rel_err(sf, sf_ref) < 2e-2


@gpu_only
@pytest.mark.parametrize("d", [128, 64])
@pytest.mark.parametrize("h,hkv,gates,s0", _GPU_CASES)
def test_gpu_warp_specialized_matches_sweep(h, hkv, gates, s0, d):
  """The warp-specialized forward against the one-warpgroup sweep and xla, at a
  length with more chunks than pipeline slots and hand-off buffers."""
  b, t = 2, 2048 + 64
  q, k, v, g, st = _inputs(b, h, hkv, t, d, d, jnp.bfloat16, gates, s0, seed=3)
  run = lambda ws: la_gpu.linear_attention_fwd_jit(
      *_seq(q, k, v, g), st, scale=0.1, seq_major=True, warp_specialized=ws)
  (o_ws, s_ws), (o_sw, s_sw) = run(True), run(False)
  o_ref, s_ref = _reference(q, k, v, g, st, 0.1)
  assert _rel_err(o_ws, _seq(o_ref)[0]) < 2e-2 and _rel_err(s_ws, s_ref) < 2e-2
  assert _rel_err(o_ws, o_sw) < 1e-2 and _rel_err(s_ws, s_sw) < 1e-3


def test_warp_specialized_is_the_seq_major_default():
  """seq_major forwards whose SMEM fits lower to the four-warpgroup kernel;
  head-major ones, chunk=128 (too many registers) and odd slot counts, to
  the one-warpgroup sweep."""
  sds = jax.ShapeDtypeStruct

  def threads(seq_major, chunk, d, t=1024, steps=2, v_block=64):
    shp = (lambda *s: s) if seq_major else (lambda b, t, h, d: (b, h, t, d))
    args = (sds(shp(1, t, 2, d), jnp.bfloat16),) * 3 + (
        sds((1, t, 2) if seq_major else (1, 2, t), jnp.float32), None)
    fn = lambda q, k, v, g, s: la_gpu.linear_attention_fwd(
        q, k, v, g, s, scale=0.1, chunk=chunk, seq_major=seq_major,
        max_concurrent_steps=steps, v_block=v_block)
    jaxpr = str(jax.make_jaxpr(fn)(*args))
    return "num_threads=4" in jaxpr

  assert threads(True, 64, 128) and threads(True, 64, 64)
  assert not threads(False, 64, 128)
  assert not threads(True, 128, 64)
  assert not threads(True, 64, 128, steps=3)   # odd slot counts: the sweep
  # The default depth (4 with gates) falls back to 2 where 4 does not fit.
  assert threads(True, 64, 128, steps=None, v_block=128)
  # v_block=32 next to K=128: two swizzles in one wgmma, so the sweep.
  assert not threads(True, 64, 128, steps=None, v_block=32)
  with pytest.raises(ValueError, match="seq_major"):
    la_gpu.linear_attention_fwd(
        *(jnp.zeros((1, 2, 128, 64), jnp.bfloat16),) * 3, None, None,
        scale=0.1, warp_specialized=True)


@pytest.mark.parametrize("h,hkv,gates,s0", [(2, 2, True, True),
                                            (2, 1, False, True)])
def test_interpret_warp_specialized_four_slots(h, hkv, gates, s0, request):
  """Five chunks through four pipeline slots: every slot but one is reused,
  by the same output warpgroup each time."""
  if _in_child_process(request):
    return
  chunk = 64
  q, k, v, g, st = _inputs(1, h, hkv, 5 * chunk, 64, 64, jnp.bfloat16, gates,
                           s0, seed=2)
  o, sf = la_gpu.linear_attention_fwd(
      *_seq(q, k, v, g), st, scale=0.125, chunk=chunk, seq_major=True,
      warp_specialized=True, max_concurrent_steps=4, interpret=True)
  o_ref, sf_ref = _reference(q, k, v, g, st, 0.125)
  assert _rel_err(o, _seq(o_ref)[0]) < 2e-2
  assert _rel_err(sf, sf_ref) < 2e-2


def test_warp_specialized_rejects_odd_slot_counts():
  q = jnp.zeros((1, 256, 1, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match="even number of slots"):
    la_gpu.linear_attention_fwd(q, q, q, None, None, scale=0.1, seq_major=True,
                                warp_specialized=True, max_concurrent_steps=3)


# ------------------------------------------------- the public op's adapter ---


@pytest.mark.parametrize("t,d", [(8192, 128), (8192 + 5, 100)])
def test_public_adapter_skips_transposes_for_cuda(t, d):
  """attnlib's adapter hands [B, T, H, *] straight to the seq_major kernel:
  no transposes of q, k, v, o (the gate swap aside), pads only if needed."""
  from attnlib.ops import _linear_attention_pallas as adapter
  from attnlib.ops import linear_attention as la_op
  b, h, hkv = 2, 4, 2
  sds = jax.ShapeDtypeStruct
  args = (sds((b, t, h, d), jnp.bfloat16), sds((b, t, hkv, d), jnp.bfloat16),
          sds((b, t, hkv, d), jnp.bfloat16), sds((b, t, h), jnp.float32),
          sds((b, h, d, d), jnp.float32))
  fn = lambda q, k, v, g, s: adapter.causal(
      la_gpu, q, k, v, g, s, 0.1, chunk=la_op.GPU_CHUNK, interpret=False)
  exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
  text = exported.mlir_module()
  assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 1
  assert text.count("stablehlo.transpose") == 1     # the gates only
  padded = t % la_op.GPU_CHUNK or d not in la_gpu.SUPPORTED_HEAD_DIMS
  assert ("stablehlo.pad" in text) == bool(padded)
  assert exported.out_avals[0].shape == (b, t, h, d)
  assert exported.out_avals[1].shape == (b, h, d, d)


# --------------------------------------------------------------- backward ---
# linear_attention_bwd: three sweeps (dq; dv and dS_0; dk) plus the row dots
# q.dq - k.dk of the gate gradient. Reference: the VJP of the xla path.


def _reference_grads(q, k, v, g, st, scale, d_o, d_st):
  """(dq, dk, dv, ds0, dg or None) of the xla path, head-major arrays."""
  if st is None:
    st = jnp.zeros(q.shape[:2] + (k.shape[-1], v.shape[-1]), jnp.float32)
  args = (q, k, v, st) + (() if g is None else (g,))

  def f(q, k, v, st, *g):
    o, sf = _reference(q, k, v, g[0] if g else None, st, scale)
    return o.astype(jnp.float32), sf

  _, pullback = jax.vjp(f, *args)
  grads = pullback((d_o.astype(jnp.float32), d_st))
  return grads[:4] + ((grads[4],) if g is not None else (None,))


def _gate_grad(d_gamma, d_st, s_t):
  """dg from the kernels' d_gamma [B, H, T]: add <dS_T, S_T> at the last
  token, then the reverse cumulative sum (attnlib's adapter does the same)."""
  d_gamma = d_gamma.at[:, :, -1].add(jnp.sum(d_st * s_t, axis=(-2, -1)))
  return jnp.flip(jnp.cumsum(jnp.flip(d_gamma, -1), -1), -1)


def _check_bwd(q, k, v, g, st, scale, d_o, d_st, got, seq_major=False,
               tol=2e-2):
  dq, dk_h, dv_h, ds0, d_gamma = got
  if seq_major:   # compare in the head-major layout
    dq, dk_h, dv_h = _seq(dq, dk_h, dv_h)
  b, h, t, dk = q.shape
  hkv, dv = k.shape[1], v.shape[-1]
  assert dq.shape == q.shape and dq.dtype == q.dtype
  assert dk_h.shape == (b, h, t, dk) and dv_h.shape == (b, h, t, dv)
  assert dk_h.dtype == dv_h.dtype == (q.dtype if h == hkv else jnp.float32)
  assert ds0.shape == (b, h, dk, dv) and ds0.dtype == jnp.float32
  per_kv = lambda x: x.astype(jnp.float32).reshape(
      b, hkv, h // hkv, t, -1).sum(2)
  want = _reference_grads(q, k, v, g, st, scale, d_o, d_st)
  errors = {name: _rel_err(x, ref) for name, x, ref in (
      ("dq", dq, want[0]), ("dk", per_kv(dk_h), want[1]),
      ("dv", per_kv(dv_h), want[2]), ("ds0", ds0, want[3]))}
  if g is None:
    assert d_gamma is None
  else:
    _, s_t = _reference(q, k, v, g, st, scale)
    errors["dg"] = _rel_err(_gate_grad(d_gamma, d_st, s_t), want[4])
  assert max(errors.values()) < tol, errors


def _cotangents(b, h, t, dk, dv, dtype, d_final, seed=3):
  k1, k2 = jax.random.split(jax.random.key(seed))
  d_o = jax.random.normal(k1, (b, h, t, dv), jnp.float32).astype(dtype)
  d_st = jax.random.normal(k2, (b, h, dk, dv), jnp.float32) if d_final else None
  return d_o, d_st


_BWD_INTERPRET_CASES = [
    # (h, hkv, dk, dv, dtype, gates, s0, d_final)
    (2, 2, 64, 64, jnp.bfloat16, True, True, True),
    (2, 1, 128, 64, jnp.bfloat16, True, False, True),   # GQA, K split in 2
    (2, 2, 64, 64, jnp.bfloat16, False, True, False),
    (2, 1, 64, 128, jnp.float16, True, True, False),    # GQA, V split in 2
]


@pytest.mark.parametrize("seq_major", [False, True], ids=["head", "seq"])
@pytest.mark.parametrize("h,hkv,dk,dv,dtype,gates,s0,d_final",
                         _BWD_INTERPRET_CASES)
def test_interpret_bwd_matches_xla_vjp(h, hkv, dk, dv, dtype, gates, s0,
                                       d_final, seq_major):
  t, scale = 3 * 64, 0.3   # three chunks: first, middle and last of a sweep
  q, k, v, g, st = _inputs(1, h, hkv, t, dk, dv, dtype, gates, s0, seed=4)
  d_o, d_st = _cotangents(1, h, t, dk, dv, dtype, d_final)
  args = _seq(q, k, v, g) + (st,) + _seq(d_o) + (d_st,) if seq_major else (
      q, k, v, g, st, d_o, d_st)
  got = la_gpu.linear_attention_bwd(*args, scale=scale, seq_major=seq_major,
                                    interpret=True)
  d_st = jnp.zeros((1, h, dk, dv), jnp.float32) if d_st is None else d_st
  _check_bwd(q, k, v, g, st, scale, d_o, d_st, got, seq_major)


def test_bwd_rejects_bad_cotangents():
  q, k, v, g, st = _inputs(1, 2, 2, 128, 64, 64, jnp.bfloat16, True, False)
  d_o, d_st = _cotangents(1, 2, 128, 64, 64, jnp.bfloat16, True)
  with pytest.raises(ValueError, match="d_o"):
    la_gpu.linear_attention_bwd(q, k, v, g, st, d_o[:, :, :64], d_st,
                                scale=1.0)
  with pytest.raises(ValueError, match="d_o"):
    la_gpu.linear_attention_bwd(q, k, v, g, st, d_o.astype(jnp.float32),
                                d_st, scale=1.0)
  with pytest.raises(ValueError, match="d_final_state"):
    la_gpu.linear_attention_bwd(q, k, v, g, st, d_o, d_st[..., :32],
                                scale=1.0)


@pytest.mark.parametrize("gates", [True, False], ids=["gates", "nogates"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("t", [1024, 8192, 32768])
def test_bwd_lowers_for_cuda(t, d, gates):
  b, h, hkv = 2, 4, 2
  sds = jax.ShapeDtypeStruct
  bf16 = lambda *s: sds(s, jnp.bfloat16)
  f32 = lambda *s: sds(s, jnp.float32)
  args = (bf16(b, t, h, d), bf16(b, t, hkv, d), bf16(b, t, hkv, d),
          f32(b, t, h) if gates else None, f32(b, h, d, d),
          bf16(b, t, h, d), f32(b, h, d, d))
  fn = lambda *a: la_gpu.linear_attention_bwd(*a, scale=d ** -0.5,
                                              seq_major=True)
  exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
  text = exported.mlir_module()
  assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 3
  out = exported.out_avals
  assert [o.shape for o in out[:4]] == [(b, t, h, d)] * 3 + [(b, h, d, d)]
  assert (out[4].shape == (b, h, t)) if gates else len(out) == 4


def test_public_grad_lowers_to_four_kernels_without_big_transposes():
  """Under jax.grad the public op runs the forward and three backward
  sweeps, reading [B, T, H, *] as is: only float32 gates/states move."""
  b, t, h, hkv, d = 2, 8192 + 5, 4, 2, 128
  sds = jax.ShapeDtypeStruct
  args = (sds((b, t, h, d), jnp.bfloat16), sds((b, t, hkv, d), jnp.bfloat16),
          sds((b, t, hkv, d), jnp.bfloat16), sds((b, t, h), jnp.float32))

  def loss(q, k, v, g):
    return jnp.sum(linear_attention(q, k, v, decay=g,
                                    implementation="mosaic_gpu",
                                    interpret=False).astype(jnp.float32))

  from attnlib.ops import _dispatch
  hopper = _dispatch.is_hopper
  _dispatch.is_hopper = lambda: True   # lowering only: no GPU needed
  try:
    text = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))),
                             platforms=["cuda"])(*args).mlir_module()
  finally:
    _dispatch.is_hopper = hopper
  assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 4
  transposes = re.findall(r"stablehlo\.transpose.*", text)
  assert transposes and not [x for x in transposes if "bf16" in x]


@gpu_only
@pytest.mark.parametrize("seq_major", [False, True], ids=["head", "seq"])
@pytest.mark.parametrize("d", [128, 64])
@pytest.mark.parametrize("h,hkv,gates,s0", _GPU_CASES)
def test_gpu_bwd_matches_xla_vjp(h, hkv, gates, s0, d, seq_major):
  b, t, scale = 2, 1024, d ** -0.5
  q, k, v, g, st = _inputs(b, h, hkv, t, d, d, jnp.bfloat16, gates, s0)
  d_o, d_st = _cotangents(b, h, t, d, d, jnp.bfloat16, True)
  args = _seq(q, k, v, g) + (st,) + _seq(d_o) + (d_st,) if seq_major else (
      q, k, v, g, st, d_o, d_st)
  got = la_gpu.linear_attention_bwd_jit(*args, scale=scale,
                                        seq_major=seq_major)
  _check_bwd(q, k, v, g, st, scale, d_o, d_st, got, seq_major)
