"""Tests of the Mosaic GPU (Hopper) forward linear-attention kernel.

Three tiers:
  * lowering for "cuda" via jax.export (runs on CPU, no GPU needed);
  * numerics under Mosaic GPU interpret mode on tiny shapes (CPU);
  * the compiled kernel on a real GPU (skipped unless the backend is "gpu").
References: attnlib.linear_attention(..., implementation="xla").
"""

import re

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


@pytest.mark.parametrize("case", ["t_not_multiple", "bad_k", "bad_dtype",
                                  "bad_groups", "smem_too_big"])
def test_rejects_bad_inputs(case):
  dims = dict(b=1, h=2, hkv=2, t=128, dk=64, dv=64, dtype=jnp.bfloat16)
  if case == "t_not_multiple":
    dims["t"] = 96
  elif case == "bad_k":
    dims["dk"] = 96
  elif case == "bad_dtype":
    dims["dtype"] = jnp.float32
  elif case == "bad_groups":
    dims["h"], dims["hkv"] = 3, 2
  elif case == "smem_too_big":
    dims.update(t=256, dk=128, dv=128)
  q, k, v, g, st = _inputs(**dims, gates=False, s0=False)
  kwargs = dict(chunk=128) if case == "smem_too_big" else {}
  with pytest.raises(ValueError):
    la_gpu.linear_attention_fwd(q, k, v, g, st, scale=1.0, **kwargs)


# ------------------------------------------------------- interpret numerics ---

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


@pytest.mark.parametrize("h,hkv,dk,dv,dtype,gates,s0", _INTERPRET_CASES)
def test_interpret_seq_major_matches_xla(h, hkv, dk, dv, dtype, gates, s0):
  chunk = 64
  q, k, v, g, st = _inputs(2, h, hkv, 2 * chunk, dk, dv, dtype, gates, s0,
                           seed=1)
  scale = dk ** -0.5
  o, sf = la_gpu.linear_attention_fwd(*_seq(q, k, v, g), st, scale=scale,
                                      chunk=chunk, seq_major=True,
                                      interpret=True)
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
      la_gpu, q, k, v, g, s, 0.1, chunk=la_op.GPU_CHUNK, interpret=False,
      reference=la_op._xla_causal_reference)
  exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
  text = exported.mlir_module()
  assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 1
  assert text.count("stablehlo.transpose") == 1     # the gates only
  padded = t % la_op.GPU_CHUNK or d not in la_gpu.SUPPORTED_HEAD_DIMS
  assert ("stablehlo.pad" in text) == bool(padded)
  assert exported.out_avals[0].shape == (b, t, h, d)
  assert exported.out_avals[1].shape == (b, h, d, d)
