"""Linear attention with optional decay (RetNet, GLA, Lightning Attention-2).

For each batch element and query head the op runs the recurrence

  S_0 = initial_state (or 0),                     S_t in R^{K x V}
  S_t = a_t * S_{t-1} + k_t^T v_t
  o_t = scale * q_t S_t

with q_t in R^{1 x K}, k_t in R^{1 x K}, v_t in R^{1 x V} and a scalar decay
a_t in (0, 1] per head and step. Unrolled, o_t = scale * (A_{0,t} q_t S_0 +
sum_{s <= t} A_{s,t} (q_t . k_s) v_s) with A_{s,t} = prod_{r=s+1..t} a_r.
Without decay this is (causal) attention with the identity kernel; apply a
feature map from `attnlib.feature_maps` to q and k beforehand for others.

The "xla" implementation is Lightning Attention-2's blocked algorithm: the
sequence is cut into chunks of `CHUNK_SIZE` steps; inside a chunk the
contributions are computed as a masked quadratic form, across chunks through
the [K, V] state carried by `lax.scan`. Memory per (batch, head) is O(T * C)
for the scores and O(T / C * K * V) for the per-chunk states, never O(T^2).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np

from attnlib.ops import _checks
from attnlib.ops import _dispatch
from attnlib.ops import _linear_attention_pallas
from kernels_pallas.linear_attention import mosaic_gpu as la_gpu
from kernels_pallas.linear_attention import tpu as la_tpu

# Steps per chunk of the blocked "xla" implementation. Read at call time, so
# tests may set it small to cross chunk boundaries with short sequences.
CHUNK_SIZE = 64
# Tokens per chunk of the Mosaic TPU kernels (128 lanes: the TPU's grain).
TPU_CHUNK = 128
# Tokens per chunk of the Mosaic GPU kernel (64 keeps K = 128 within shared memory).
GPU_CHUNK = 64

_OP = "al.linear_attention"
_STEP_OP = "al.linear_attention_step"

Array = jax.Array


# ----------------------------------------------------------------------------
# Argument checks.
# ----------------------------------------------------------------------------


def _check_qkv(op: str, q: Any, k: Any, v: Any, rank: int) -> None:
  """q [B, (T,) H, K], k [B, (T,) Hkv, K], v [B, (T,) Hkv, V]."""
  _checks.check_array(op, "q", q, rank)
  _checks.check_array(op, "k", k, rank)
  _checks.check_array(op, "v", v, rank)
  _checks.check_same_dtype(op, q=q, k=k, v=v)
  for axis, what in ((0, "batch"),) + (((1, "length"),) if rank == 4 else ()):
    _checks.check_dim(op, "k", k, axis, q.shape[axis], f"{what} of q")
    _checks.check_dim(op, "v", v, axis, q.shape[axis], f"{what} of q")
  _checks.check_dim(op, "k", k, -1, q.shape[-1], "head_dim K of q")
  _checks.check_dim(op, "v", v, -2, k.shape[-2], "kv heads of k")
  _checks.check_heads(op, q.shape[-2], k.shape[-2])


def _check_decay(op: str, decay: Any, gate_shape: tuple[int, ...],
                 num_heads: int) -> None:
  """decay is None, rates [H] >= 0, or log-gates `gate_shape` <= 0."""
  if decay is None:
    return
  _checks.check_array(op, "decay", decay, (1, len(gate_shape)))
  shape = _checks.shape_of(decay)
  if shape not in ((num_heads,), gate_shape):
    _checks.fail(op, "decay.shape", shape,
                 f"None, rates of shape ({num_heads},) or log-gates of shape "
                 f"{gate_shape}")
  if not _checks.is_concrete(decay):
    return
  values = np.asarray(decay, dtype=np.float32)
  if not np.all(np.isfinite(values)):
    _checks.fail(op, "decay", "non-finite values", "finite values")
  if decay.ndim == 1 and np.any(values < 0):
    _checks.fail(op, "decay (rates)", float(values.min()),
                 "rates lambda >= 0 (a_t = exp(-lambda))")
  if decay.ndim > 1 and np.any(values > 0):
    _checks.fail(op, "decay (log-gates)", float(values.max()),
                 "log-gates g <= 0 (a_t = exp(g))")


def _check_state(op: str, name: str, state: Any,
                 shape: tuple[int, ...]) -> None:
  _checks.check_array(op, name, state, 4)
  if _checks.shape_of(state) != shape:
    _checks.fail(op, f"{name}.shape", _checks.shape_of(state),
                 f"{shape} ([B, H, K, V])")


def _log_gates(decay: Array | None, gate_shape: tuple[int, ...]) -> Array | None:
  """decay (None | rates [H] | log-gates) -> float32 log-gates or None."""
  if decay is None:
    return None
  decay = jnp.asarray(decay, jnp.float32)
  if decay.ndim == 1:
    return jnp.broadcast_to(-decay, gate_shape)
  return decay


# ----------------------------------------------------------------------------
# The "xla" implementation.
# ----------------------------------------------------------------------------


def _xla_causal(q: Array, k: Array, v: Array, log_g: Array | None,
                s0: Array, scale: Array, chunk_size: int) -> tuple[Array, Array]:
  """Blocked causal linear attention (Lightning Attention-2).

  T is padded to N chunks of C steps (k = v = 0, g = 0 in the padding). With
  G_t the cumulative log-decay *within* its chunk (never over the whole
  sequence, whose exp() would under/overflow), every exponent used is <= 0:

    intra:  o_t += sum_{s <= t in chunk} exp(G_t - G_s) (q_t . k_s) v_s
    inter:  o_t += exp(G_t) q_t S_prev
    state:  S = exp(G_C) S_prev + sum_s exp(G_C - G_s) k_s^T v_s

  The intra part and each chunk's state contribution are computed for all
  chunks at once; only the [K, V] state recurrence runs in `lax.scan` over
  the N chunks. Per (batch, head) the memory is O(T * C) for the scores and
  O(N * K * V) for the states entering each chunk. GQA: q is viewed as
  [.., Hkv, G, K] so that k and v are never repeated.

  Args:
    q: [B, T, H, K]; k: [B, T, Hkv, K]; v: [B, T, Hkv, V].
    log_g: None or float32 [B, T, H] log-decays g_t <= 0 (a_t = exp(g_t)).
    s0: float32 [B, H, K, V] initial state.
    scale: scalar applied to the outputs.
    chunk_size: steps per chunk C (clipped to T).

  Returns:
    o float32 [B, T, H, V] and the final state float32 [B, H, K, V].
  """
  f32 = jnp.float32
  b, t, h, dk = q.shape
  hkv, dv = k.shape[2], v.shape[3]
  g = h // hkv  # query heads per kv head; query head = kv head * g + i.
  c = min(chunk_size, t)
  n = -(-t // c)
  pad = n * c - t
  if pad:
    # Padded steps have k = v = 0 and a = 1: they leave the state unchanged.
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
    if log_g is not None:
      log_g = jnp.pad(log_g, widths[:3])

  q = q.reshape(b, n, c, hkv, g, dk)
  k = k.reshape(b, n, c, hkv, dk)
  v = v.reshape(b, n, c, hkv, dv)
  s0 = s0.reshape(b, hkv, g, dk, dv)
  causal = jnp.tril(jnp.ones((c, c), bool))  # [t, s]: s <= t.

  # Intra-chunk: masked quadratic attention. scores [B, N, Hkv, G, C(t), C(s)].
  scores = jnp.einsum("bnthgk,bnshk->bnhgts", q, k, preferred_element_type=f32)
  if log_g is None:
    scores = jnp.where(causal, scores, 0.0)
    k_weight = q_decay = chunk_decay = None
  else:
    cum = jnp.cumsum(log_g.reshape(b, n, c, hkv, g), axis=2)  # G_t within chunk.
    cum_ts = jnp.moveaxis(cum, 2, -1)  # [B, N, Hkv, G, C]
    # exp(G_t - G_s) for s <= t only; the masked entries (which could overflow)
    # are zeroed before exp() so that neither values nor gradients blow up.
    diff = jnp.where(causal, cum_ts[..., :, None] - cum_ts[..., None, :], 0.0)
    scores = jnp.where(causal, scores * jnp.exp(diff), 0.0)
    total = cum[:, :, -1]  # G_C: [B, N, Hkv, G]
    q_decay = jnp.exp(cum)  # exp(G_t): [B, N, C, Hkv, G]
    k_weight = jnp.exp(total[:, :, None] - cum)  # exp(G_C - G_s)
    chunk_decay = jnp.exp(total)  # exp(G_C)
  o_intra = jnp.einsum("bnhgts,bnshv->bnthgv", scores, v.astype(f32))

  # Each chunk's own contribution to the state: sum_s exp(G_C - G_s) k_s^T v_s.
  if k_weight is None:
    kv = jnp.einsum("bnshk,bnshv->bnhkv", k, v, preferred_element_type=f32)
    kv = jnp.broadcast_to(kv[:, :, :, None], (b, n, hkv, g, dk, dv))
  else:
    k_weighted = k.astype(f32)[:, :, :, :, None] * k_weight[..., None]
    kv = jnp.einsum("bnshgk,bnshv->bnhgkv", k_weighted, v.astype(f32))

  # Inter-chunk: carry S across chunks; emit the state before each chunk.
  def step(state, inputs):
    kv_n, decay_n = inputs
    if decay_n is None:
      new_state = state + kv_n
    else:
      new_state = decay_n[..., None, None] * state + kv_n
    return new_state, state

  chunk_major = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)
  final_state, prev_states = jax.lax.scan(
      step, s0, (chunk_major(kv), chunk_major(chunk_decay)))
  prev_states = jnp.moveaxis(prev_states, 0, 1)  # [B, N, Hkv, G, K, V]

  q_inter = q if q_decay is None else q.astype(f32) * q_decay[..., None]
  o_inter = jnp.einsum("bnthgk,bnhgkv->bnthgv", q_inter, prev_states,
                       preferred_element_type=f32)
  o = scale * (o_intra + o_inter)
  o = o.reshape(b, n * c, h, dv)[:, :t]
  return o, final_state.reshape(b, h, dk, dv)


def _xla_noncausal(q: Array, k: Array, v: Array, s0: Array,
                   scale: Array) -> tuple[Array, Array]:
  """o_t = scale * q_t (S_0 + K^T V); returns (o float32, state float32)."""
  f32 = jnp.float32
  b, t, h, dk = q.shape
  hkv, dv = k.shape[2], v.shape[3]
  g = h // hkv
  kv = jnp.einsum("bthk,bthv->bhkv", k, v, preferred_element_type=f32)
  state = s0.reshape(b, hkv, g, dk, dv) + kv[:, :, None]
  o = jnp.einsum("bthgk,bhgkv->bthgv", q.reshape(b, t, hkv, g, dk), state,
                 preferred_element_type=f32)
  return (scale * o).reshape(b, t, h, dv), state.reshape(b, h, dk, dv)


def _xla_impl(q: Array, k: Array, v: Array, log_g: Array | None, s0: Array,
              scale: float, *, is_causal: bool,
              chunk_size: int) -> tuple[Array, Array]:
  """Returns (o in q.dtype, final state float32)."""
  if is_causal:
    o, state = _xla_causal(q, k, v, log_g, s0, scale, chunk_size)
  else:
    o, state = _xla_noncausal(q, k, v, s0, scale)
  return o.astype(q.dtype), state


_xla_impl_jit = jax.jit(_xla_impl, static_argnames=("is_causal", "chunk_size"))


def _zeros_if_none(s0: Array | None, q: Array, v: Array) -> Array:
  """The initial state, float32 [B, H, K, V]; zeros when None."""
  if s0 is not None:
    return s0
  b, _, h, dk = q.shape
  return jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32)


def _mosaic_tpu_impl(q: Array, k: Array, v: Array, log_g: Array | None,
                     s0: Array, scale: float, *, is_causal: bool,
                     chunk_size: int, interpret: bool) -> tuple[Array, Array]:
  """The Mosaic TPU kernels (forward and backward); non-causal stays in XLA.

  `chunk_size` (the xla chunk) is not used: the kernels tile by
  `TPU_CHUNK` tokens, 128 lanes wide.
  """
  del chunk_size
  if not is_causal:  # two matmuls: nothing for a kernel to add
    o, state = _xla_noncausal(q, k, v, _zeros_if_none(s0, q, v), scale)
    return o.astype(q.dtype), state
  params = pltpu.InterpretParams() if interpret else False
  return _linear_attention_pallas.causal(
      la_tpu, q, k, v, log_g, s0, scale, chunk=TPU_CHUNK, interpret=params)


def _mosaic_gpu_impl(q: Array, k: Array, v: Array, log_g: Array | None,
                     s0: Array, scale: float, *, is_causal: bool,
                     chunk_size: int, interpret: bool) -> tuple[Array, Array]:
  """The Mosaic GPU kernels (Hopper), forward and backward; non-causal in XLA.

  `chunk_size` (the xla chunk) is not used: the kernels tile by `GPU_CHUNK`.
  """
  del chunk_size
  if not is_causal:
    o, state = _xla_noncausal(q, k, v, _zeros_if_none(s0, q, v), scale)
    return o.astype(q.dtype), state
  params = plgpu.InterpretGPUParams() if interpret else False
  return _linear_attention_pallas.causal(
      la_gpu, q, k, v, log_g, s0, scale, chunk=GPU_CHUNK, interpret=params)


def _backends(dk: int, dv: int, dtype, implementation: str | None,
              interpret: bool) -> dict:
  """The implementations that can run this call (see `_dispatch.select`).

  A kernel is offered when the call fits it (head dims after padding, dtype)
  and, for Mosaic GPU, when the device is a Hopper GPU or interpret mode runs
  it; naming a kernel that does not fit raises ValueError.
  """
  kernels = {}
  for name, module, impl, device_ok in (
      ("mosaic_tpu", la_tpu, _mosaic_tpu_impl, True),
      ("mosaic_gpu", la_gpu, _mosaic_gpu_impl,
       interpret or _dispatch.is_hopper())):
    takes = (f"head dims up to {max(module.SUPPORTED_HEAD_DIMS)} (got K={dk}, "
             f"V={dv}) and dtypes "
             f"{[jnp.dtype(d).name for d in module.SUPPORTED_DTYPES]} (got "
             f"{jnp.dtype(dtype).name})")
    fits = _linear_attention_pallas.supports(module, dk, dv, dtype)
    kernels[name] = (impl, fits, device_ok, takes)
  return _dispatch.with_kernels(_OP, implementation, _xla_impl_jit, kernels)


# ----------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------


def linear_attention(q: Array, k: Array, v: Array, *, is_causal: bool = True,
                     decay: Array | None = None, scale: float | None = None,
                     initial_state: Array | None = None,
                     return_final_state: bool = False,
                     implementation: str | None = None,
                     interpret: bool = False) -> Array | tuple[Array, Array]:
  """Linear attention with an optional per-head decay (RetNet / GLA style).

  For each batch element b and query head h (which reads kv head
  h // (H // Hkv)), with row vectors q_t [K], k_t [K], v_t [V]:

    S_0 = initial_state[b, h]  (zeros if None),   S_t in R^{K x V}, float32
    S_t = a_t * S_{t-1} + k_t^T v_t
    o_t = scale * q_t S_t

  The decay a_t is given by `decay`:
    * None: a_t = 1 (plain causal linear attention);
    * rates lambda of shape [H], lambda >= 0: a_t = exp(-lambda_h), a
      constant per head (RetNet);
    * log-gates g of shape [B, T, H], g <= 0: a_t = exp(g[b, t, h]) (the `g`
      of gated linear attention / flash-linear-attention).
  Gates are per query head, also with grouped-query k/v.

  With is_causal=False every position sees the whole sequence:
  o_t = scale * q_t (S_0 + sum_s k_s^T v_s), and decay must be None; the
  "final state" is then S_0 + sum_s k_s^T v_s.

  Feature maps (elu+1, Taylor, ...) are not applied here: apply one from
  `attnlib.feature_maps` to q and k first.

  Args:
    q: queries [B, T, H, K], floating.
    k: keys [B, T, Hkv, K], same dtype as q; H % Hkv == 0.
    v: values [B, T, Hkv, V], same dtype as q.
    is_causal: causal recurrence (True) or global sum (False).
    decay: None, rates [H] or log-gates [B, T, H] (any float dtype, used in
      float32), see above. Non-finite values are rejected.
    scale: multiplies the outputs; None means K ** -0.5.
    initial_state: None or S_0 [B, H, K, V] (any float dtype, used in float32).
    return_final_state: also return S_T.
    implementation: "xla" (the blocked pure-JAX version); "mosaic_tpu" (the
      Pallas TPU kernels of kernels_pallas/linear_attention/tpu.py, forward
      and backward; K, V up to 256, zero-padded to 64/128/256; T padded to
      128-token chunks); "mosaic_gpu" (the Hopper kernels of
      kernels_pallas/linear_attention/mosaic_gpu.py, forward and backward;
      K, V up to 128, zero-padded to 64/128; bf16 or f16; T padded to
      64-token chunks). Non-causal calls are two XLA matmuls under every
      backend. None picks mosaic_tpu on TPU, mosaic_gpu on Hopper GPUs (and
      with interpret=True, mosaic_tpu) when the call fits the kernel, else
      xla; naming a kernel that does not fit raises ValueError.
    interpret: run the Pallas kernels in interpret mode on CPU (TPU semantics
      with pltpu.InterpretParams, Mosaic GPU with plgpu.InterpretGPUParams);
      unused by "xla".

  Returns:
    o [B, T, H, V] in q.dtype, or (o, S_T) with S_T float32 [B, H, K, V] when
    return_final_state.

  Raises:
    ValueError: wrong ranks, shapes or dtypes (q, k, v not floating or not of
      one dtype; batch, length, head_dim or kv heads mismatched; H not a
      multiple of Hkv; T < 1), decay of a wrong shape, negative rates or
      positive log-gates (checked when concrete), decay with is_causal=False,
      initial_state not [B, H, K, V], a bad scale, non-bool flags or an
      unknown implementation.
    ValueError: also a named kernel that does not fit the call (head dims,
      dtype, or mosaic_gpu off Hopper without interpret).
  """
  _check_qkv(_OP, q, k, v, rank=4)
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  if t < 1:
    _checks.fail(_OP, "q.shape", _checks.shape_of(q), "a length T >= 1")
  _checks.check_bool(_OP, "is_causal", is_causal)
  _checks.check_bool(_OP, "return_final_state", return_final_state)
  _check_decay(_OP, decay, (b, t, h), h)
  if decay is not None and not is_causal:
    _checks.fail(_OP, "decay", f"array of shape {_checks.shape_of(decay)}",
                 "None when is_causal=False")
  if initial_state is not None:
    _check_state(_OP, "initial_state", initial_state, (b, h, dk, dv))
  _checks.check_scale(_OP, scale)
  _checks.check_positive_int(_OP, "CHUNK_SIZE", CHUNK_SIZE)
  impl = _dispatch.select(_OP, implementation, _backends(dk, dv, q.dtype, implementation, interpret),
                          interpret)
  if impl is not _xla_impl_jit:
    impl = functools.partial(impl, interpret=interpret)

  # The kernels take initial_state=None as zeros without reading any memory.
  s0 = None if initial_state is None else jnp.asarray(initial_state, jnp.float32)
  if s0 is None and impl is _xla_impl_jit:
    s0 = jnp.zeros((b, h, dk, dv), jnp.float32)
  o, final_state = impl(q, k, v, _log_gates(decay, (b, t, h)), s0,
                        _checks.default_scale(dk, scale), is_causal=bool(is_causal),
                        chunk_size=int(CHUNK_SIZE))
  return (o, final_state) if return_final_state else o


def linear_attention_step(state: Array, q: Array, k: Array, v: Array, *,
                          decay: Array | None = None,
                          scale: float | None = None) -> tuple[Array, Array]:
  """One step of the causal linear-attention recurrence (for decoding).

  For each batch element b and query head h (kv head h // (H // Hkv)):

    S' = a * S + k^T v,    o = scale * q S'

  with a = 1 (decay None), a = exp(-lambda_h) (rates [H], lambda >= 0) or
  a = exp(g[b, h]) (log-gates [B, H], g <= 0). Running it over t = 0..T-1
  gives `linear_attention(..., is_causal=True)` with the per-step slices of
  q, k, v and decay.

  Args:
    state: S [B, H, K, V], floating (used in float32).
    q: [B, H, K]; k: [B, Hkv, K]; v: [B, Hkv, V]; one dtype, H % Hkv == 0.
    decay: None, rates [H] or log-gates [B, H]; finite.
    scale: multiplies the output; None means K ** -0.5.

  Returns:
    (o [B, H, V] in q.dtype, new state float32 [B, H, K, V]).

  Raises:
    ValueError: wrong ranks, shapes or dtypes (as for `linear_attention`),
      state not [B, H, K, V], a bad decay (shape; negative rates or positive
      log-gates when concrete) or a bad scale.
  """
  _check_qkv(_STEP_OP, q, k, v, rank=3)
  b, h, dk = q.shape
  hkv, dv = k.shape[1], v.shape[-1]
  _check_state(_STEP_OP, "state", state, (b, h, dk, dv))
  _check_decay(_STEP_OP, decay, (b, h), h)
  _checks.check_scale(_STEP_OP, scale)

  f32 = jnp.float32
  g = h // hkv
  s = jnp.asarray(state, f32).reshape(b, hkv, g, dk, dv)
  kv = jnp.einsum("bhk,bhv->bhkv", k, v, preferred_element_type=f32)
  if decay is not None:
    a = jnp.exp(_log_gates(decay, (b, h)))  # [B, H]
    s = a.reshape(b, hkv, g, 1, 1) * s
  s = s + kv[:, :, None]
  o = jnp.einsum("bhgk,bhgkv->bhgv", q.reshape(b, hkv, g, dk), s,
                 preferred_element_type=f32)
  o = _checks.default_scale(dk, scale) * o
  return o.reshape(b, h, dv).astype(q.dtype), s.reshape(b, h, dk, dv)
