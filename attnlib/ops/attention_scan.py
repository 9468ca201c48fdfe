"""Attention as a prefix scan (Aaren, "Attention as an RNN", Feng et al. 2024).

One query per head, constant in time, attends to every prefix of a key/value
sequence. With logits ``s_t = scale * q . k_t`` the output at step ``t`` is the
softmax attention over the first ``t + 1`` tokens::

  o_t = sum_{j<=t} exp(s_j) v_j / sum_{j<=t} exp(s_j)

The sums are kept relative to the running maximum of the logits as a state
``(m, u, w)``::

  m = max_j s_j,   u = sum_j exp(s_j - m),   w = sum_j exp(s_j - m) v_j,

so ``o = w / u``, and two states of consecutive segments combine with the
associative operator::

  (m_a, u_a, w_a) + (m_b, u_b, w_b) = (m, u_a e^{m_a - m} + u_b e^{m_b - m},
                                         w_a e^{m_a - m} + w_b e^{m_b - m}),
  m = max(m_a, m_b).

Every exponent is <= 0, so logits of any finite magnitude neither overflow nor
lose the largest term. The empty state (nothing seen) is ``m = -inf, u = 0,
w = 0``; it is the identity of the operator, and the combine never evaluates
``-inf - -inf``.

``attention_scan`` computes all prefix outputs of a sequence (the RNN's
many-to-many form) blockwise: a ``jax.lax.scan`` carries the state from block to
block and, inside a block of C tokens, every prefix is computed at once from a
causally masked [C, C] matrix of weights ``exp(s_j - m_t) <= 1``;
``attention_scan_step`` advances the state by one token in O(1) time and memory
(the RNN's recurrent form).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from attnlib.ops import _checks
from attnlib.ops import _dispatch
from kernels_pallas.attention_scan import mosaic_gpu as scan_gpu
from kernels_pallas.attention_scan import tpu as scan_tpu

_OP = "al.attention_scan"
_STEP_OP = "al.attention_scan_step"

# Tokens per block of the xla implementation (read at call time; tests lower it
# to cross block boundaries).
BLOCK_SIZE = 64


class AttentionScanState(NamedTuple):
  """Summary of the tokens seen so far, per batch element and query head.

  Represents ``sum_j exp(s_j) = u * exp(m)`` and
  ``sum_j exp(s_j) v_j = w * exp(m)``. All fields are float32.

  Attributes:
    m: [B, H] running maximum of the logits (-inf when nothing was seen).
    u: [B, H] ``sum_j exp(s_j - m)`` (0 when nothing was seen, else >= 1).
    w: [B, H, V] ``sum_j exp(s_j - m) v_j`` (0 when nothing was seen).
  """
  m: jax.Array
  u: jax.Array
  w: jax.Array

  @classmethod
  def empty(cls, batch: int, heads: int, v_dim: int) -> AttentionScanState:
    """The state of an empty sequence: m = -inf, u = 0, w = 0 (float32).

    Args:
      batch: B >= 1.
      heads: number of query heads H >= 1.
      v_dim: value head dimension V >= 1.

    Raises:
      ValueError: if an argument is not a positive int.
    """
    op = "al.AttentionScanState.empty"
    _checks.check_positive_int(op, "batch", batch)
    _checks.check_positive_int(op, "heads", heads)
    _checks.check_positive_int(op, "v_dim", v_dim)
    return cls(
        m=jnp.full((batch, heads), -jnp.inf, jnp.float32),
        u=jnp.zeros((batch, heads), jnp.float32),
        w=jnp.zeros((batch, heads, v_dim), jnp.float32))


# ----------------------------------------------------------------------------
# Math shared by both forms.
# ----------------------------------------------------------------------------


def _combine(a: AttentionScanState,
             b: AttentionScanState) -> AttentionScanState:
  """The associative operator a + b (a comes first). Fields broadcast.

  Safe for empty states: when both maxima are -inf the exponents are taken
  relative to 0 instead of -inf, so they are exp(-inf) = 0 and neither the
  value nor the gradient is NaN.
  """
  m = jnp.maximum(a.m, b.m)
  m_ref = jnp.where(jnp.isneginf(m), 0.0, m)
  scale_a = jnp.exp(a.m - m_ref)  # <= 1
  scale_b = jnp.exp(b.m - m_ref)  # <= 1
  u = a.u * scale_a + b.u * scale_b
  w = a.w * scale_a[..., None] + b.w * scale_b[..., None]
  return AttentionScanState(m, u, w)


def _normalize(u: jax.Array, w: jax.Array) -> jax.Array:
  """o = w / u, and 0 where u == 0 (double where: no NaN value or gradient)."""
  nonzero = u > 0
  u_safe = jnp.where(nonzero, u, 1.0)
  return jnp.where(nonzero[..., None], w / u_safe[..., None], 0.0)


def _logits(q: jax.Array, k: jax.Array, scale: float) -> jax.Array:
  """float32 logits s[..., Hkv, G] = scale * q . k for query head Hkv*G + g.

  q: [B, H, D] or [H, D]; k: [B, (T,) Hkv, D] with the kv-head axis at -2.
  Query head h uses kv head h // G, G = H // Hkv.
  """
  heads, head_dim = q.shape[-2:]
  kv_heads = k.shape[-2]
  groups = heads // kv_heads
  q = q.reshape(q.shape[:-2] + (kv_heads, groups, head_dim))
  if k.ndim == 4:  # [B, T, Hkv, D] -> [B, T, Hkv, G]
    spec = "bngd,btnd->btng" if q.ndim == 4 else "ngd,btnd->btng"
  else:  # [B, Hkv, D] -> [B, Hkv, G]
    spec = "bngd,bnd->bng" if q.ndim == 4 else "ngd,bnd->bng"
  s = jnp.einsum(spec, q, k, preferred_element_type=jnp.float32)
  return s.astype(jnp.float32) * scale


# ----------------------------------------------------------------------------
# Argument checks.
# ----------------------------------------------------------------------------


def _check_qkv(op: str, q: Any, k: Any, v: Any, scale: Any, seq: bool) -> None:
  """Checks q/k/v for the sequence form (seq=True) or the step form."""
  k_rank = 4 if seq else 3
  _checks.check_array(op, "q", q, (2, 3))
  _checks.check_array(op, "k", k, k_rank)
  _checks.check_array(op, "v", v, k_rank)
  _checks.check_same_dtype(op, q=q, k=k, v=v)
  batch = k.shape[0]
  if q.ndim == 3:
    _checks.check_dim(op, "q", q, 0, batch, "batch, like k")
  _checks.check_dim(op, "k", k, -1, q.shape[-1], "head_dim, like q")
  for axis in range(k_rank - 1):  # batch, (length,) kv heads
    what = ("batch", "length", "kv heads")[axis] if seq else (
        "batch", "kv heads")[axis]
    _checks.check_dim(op, "v", v, axis, k.shape[axis], f"{what}, like k")
  if seq and k.shape[1] < 1:
    _checks.fail(op, "k.shape", _checks.shape_of(k),
                 "a sequence length >= 1 at axis 1")
  _checks.check_heads(op, q.shape[-2], k.shape[-2])
  _checks.check_scale(op, scale)


def _check_state(op: str, name: str, state: Any, batch: int, heads: int,
                 v_dim: int, check_values: bool) -> None:
  """`state` must be an AttentionScanState of float32 [B,H], [B,H], [B,H,V].

  With `check_values`, concrete fields are also read back to the host: m must
  hold no NaN or +inf and u no negative or NaN value.
  """
  if not isinstance(state, AttentionScanState):
    _checks.fail(op, name, type(state).__name__,
                 "an AttentionScanState(m, u, w) "
                 "(see AttentionScanState.empty)")
  want = {"m": (batch, heads), "u": (batch, heads), "w": (batch, heads, v_dim)}
  for field, shape in want.items():
    x = getattr(state, field)
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      _checks.fail(op, f"{name}.{field}", type(x).__name__, "an array")
    if tuple(x.shape) != shape:
      axes = "[batch, heads, v_dim]" if field == "w" else "[batch, heads]"
      _checks.fail(op, f"{name}.{field}.shape", _checks.shape_of(x),
                   f"{shape} ({axes})")
    if x.dtype != jnp.float32:
      _checks.fail(op, f"{name}.{field}.dtype", str(x.dtype), "float32")
  if check_values and _checks.is_concrete(state.m):
    m = np.asarray(state.m)
    if np.any(np.isnan(m) | (m == np.inf)):
      _checks.fail(op, f"{name}.m", "an array with NaN or +inf",
                   "finite values or -inf (empty)")
  if check_values and _checks.is_concrete(state.u):
    if not np.all(np.asarray(state.u) >= 0):
      _checks.fail(op, f"{name}.u", "an array with negative or NaN values",
                   "values >= 0")


# ----------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------


def attention_scan(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float | None = None,
    initial_state: AttentionScanState | None = None,
    return_final_state: bool = False,
    implementation: str | None = None,
    interpret: bool = False,
) -> jax.Array | tuple[jax.Array, AttentionScanState]:
  """Softmax attention of one constant query per head over every prefix.

  With logits ``s_t = scale * q[b, h] . k[b, t, h // G]`` (``G = H // Hkv``,
  grouped-query attention) and an optional initial state ``(m0, u0, w0)``
  summarising earlier tokens::

    o[b, t, h] = (w0 e^{m0} + sum_{j<=t} e^{s_j} v[b, j, h // G])
                 / (u0 e^{m0} + sum_{j<=t} e^{s_j})

  i.e. softmax attention of ``q`` over the first ``t + 1`` keys (and what the
  initial state summarises). The final state summarises the initial state and
  all ``T`` tokens; feeding it as ``initial_state`` of the next segment gives
  the same outputs as one call on the concatenated sequence.

  Args:
    q: [B, H, D] queries, or [H, D] shared by the whole batch.
    k: [B, T, Hkv, D] keys, T >= 1, H % Hkv == 0.
    v: [B, T, Hkv, V] values.
    scale: logit scale; None means ``D ** -0.5``.
    initial_state: None (nothing seen) or an ``AttentionScanState`` with
      float32 fields m [B, H], u [B, H], w [B, H, V].
    return_final_state: also return the state after the last token.
    implementation: None (the kernel of the platform when the call fits
      it: mosaic_tpu on TPU, mosaic_gpu on a Hopper GPU; else "xla"), "xla",
      "mosaic_tpu" (kernels_pallas/attention_scan/tpu.py: f32/bf16, D, V up
      to 256, zero-padded to 128/256) or "mosaic_gpu" (.../mosaic_gpu.py,
      Hopper: bf16/f16, D, V up to 256, zero-padded to 64/128/256). Both run the
      blocked scan forward and its reverse scan backward as Pallas kernels.
    interpret: Pallas interpret mode for kernel backends (TPU semantics for
      mosaic_tpu, Mosaic GPU's interpreter for mosaic_gpu); with
      implementation=None it picks mosaic_tpu when the call fits it.

  Returns:
    o [B, T, H, V] in q.dtype, or ``(o, final_state)`` when
    ``return_final_state`` (final_state float32, fields [B, H], [B, H],
    [B, H, V]).

  Raises:
    ValueError: wrong ranks, mismatched batch/length/head/dim sizes, query
      heads not a multiple of kv heads, T == 0, q/k/v dtypes differing or not
      floating, a non-finite or non-numeric scale, an initial_state that is not
      an AttentionScanState of float32 arrays of the shapes above (or, when
      concrete, with NaN/+inf in m or negative u), a non-bool option, an
      unknown implementation, or a named kernel that does not fit the call.
  """
  _check_qkv(_OP, q, k, v, scale, seq=True)
  batch, heads, v_dim = k.shape[0], q.shape[-2], v.shape[-1]
  if initial_state is not None:
    _check_state(_OP, "initial_state", initial_state, batch, heads, v_dim,
                 check_values=True)
  _checks.check_bool(_OP, "return_final_state", return_final_state)
  impl = _dispatch.select(
      _OP, implementation,
      _dispatch.padded_kernels(_OP, implementation, _attention_scan_xla, k, v,
                               interpret, _KERNELS),
      interpret)
  kwargs = {} if impl is _attention_scan_xla else {"interpret": interpret}
  o, final_state = impl(q, k, v, _checks.default_scale(q.shape[-1], scale),
                        initial_state, **kwargs)
  return (o, final_state) if return_final_state else o


def _kernel_impl(module):
  """The op's backend signature over a kernel module's `attention_scan`: a
  shared query broadcast over the batch, the empty state spelled out, head
  dims zero-padded to ones the kernels take (zero columns change no logit;
  zero value columns are sliced off, also from the state)."""
  @functools.partial(jax.jit, static_argnames=("scale", "interpret"))
  def impl(q, k, v, scale, initial_state, *, interpret):
    b, d, dv = k.shape[0], k.shape[-1], v.shape[-1]
    h = q.shape[-2]
    q = jnp.broadcast_to(q, (b, h, d))
    if initial_state is None:
      initial_state = AttentionScanState(
          m=jnp.full((b, h), -jnp.inf, jnp.float32),
          u=jnp.zeros((b, h), jnp.float32),
          w=jnp.zeros((b, h, dv), jnp.float32))
    dp = _dispatch.padded_dim(d, module.SUPPORTED_HEAD_DIMS)
    vp = _dispatch.padded_dim(dv, module.SUPPORTED_HEAD_DIMS)
    pad = _dispatch.pad_last
    o, m, u, w = module.attention_scan(
        pad(q, dp), pad(k, dp), pad(v, vp), initial_state.m, initial_state.u,
        pad(initial_state.w, vp), scale=scale, interpret=interpret)
    return o[..., :dv], AttentionScanState(m=m, u=u, w=w[..., :dv])
  return impl


# Kernel backends: name -> (the op's implementation, kernel module).
_KERNELS = {"mosaic_tpu": (_kernel_impl(scan_tpu), scan_tpu),
            "mosaic_gpu": (_kernel_impl(scan_gpu), scan_gpu)}


def _attention_scan_xla(
    q: jax.Array, k: jax.Array, v: jax.Array, scale: float,
    initial_state: AttentionScanState | None,
) -> tuple[jax.Array, AttentionScanState]:
  """The "xla" backend: blocked scan with blocks of BLOCK_SIZE tokens."""
  return _attention_scan_blocked(q, k, v, scale, initial_state,
                                 block_size=BLOCK_SIZE)


@functools.partial(jax.jit, static_argnames="block_size")
def _attention_scan_blocked(
    q: jax.Array, k: jax.Array, v: jax.Array, scale: float,
    initial_state: AttentionScanState | None, *, block_size: int,
) -> tuple[jax.Array, AttentionScanState]:
  """Sequential scan over blocks of C = min(block_size, T) tokens.

  The carried state summarises all earlier blocks; inside a block every prefix
  is computed directly (``_block``). T is padded to a multiple of C with masked
  tokens, which leave the state unchanged. Each block is rematerialised in the
  backward pass, so the memory is O(B T H V) (inputs, outputs and one carried
  state per block) plus O(B H C (C + V)) for the block being computed.
  """
  batch, length, _, _ = k.shape
  heads, v_dim = q.shape[-2], v.shape[-1]
  chunk = min(block_size, length)
  n_blocks = -(-length // chunk)
  pad = n_blocks * chunk - length
  s = _logits(q, k, scale).reshape(batch, length, heads)  # [B, T, H] f32
  s = jnp.pad(s, ((0, 0), (0, pad), (0, 0)))
  v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
  valid = (jnp.arange(n_blocks * chunk) < length).reshape(n_blocks, chunk)

  def blocks(x):  # [B, n*C, ...] -> [n, B, C, ...]
    x = x.reshape((batch, n_blocks, chunk) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  def body(state, xs):
    o, state = _block(state, *xs)
    return state, o.astype(q.dtype)

  if initial_state is None:
    initial_state = AttentionScanState.empty(batch, heads, v_dim)
  final_state, o = jax.lax.scan(jax.checkpoint(body), initial_state,
                                (blocks(s), blocks(v), valid))
  o = jnp.moveaxis(o, 0, 1).reshape(batch, n_blocks * chunk, heads, v_dim)
  return o[:, :length], final_state


def _block(
    state: AttentionScanState, s: jax.Array, v: jax.Array, valid: jax.Array,
) -> tuple[jax.Array, AttentionScanState]:
  """All prefixes of one block, each combined with the carried state.

  For row t of the block, with j running over the valid tokens j <= t::

    m_t = max(state.m, max_j s_j)
    u_t = state.u e^{state.m - m_t} + sum_j e^{s_j - m_t}
    w_t = state.w e^{state.m - m_t} + sum_j e^{s_j - m_t} v_j

  which is ``state + (s_0, 1, v_0) + ... + (s_t, 1, v_t)`` with the
  associative operator. Every exponent is <= 0; masked entries are set to
  -inf *before* the exp, so neither values nor gradients overflow.

  Args:
    state: carried state, fields [B, H], [B, H], [B, H, V] float32.
    s: [B, C, H] float32 logits.
    v: [B, C, Hkv, V] values.
    valid: [C] bool, False for padding.

  Returns:
    o [B, C, H, V] float32 and the state after the block.
  """
  batch, chunk, heads = s.shape
  kv_heads, v_dim = v.shape[-2:]
  groups = heads // kv_heads
  rows = jnp.arange(chunk)
  mask = (rows[:, None] >= rows[None, :]) & valid[None, :]  # [C(t), C(j)]
  s_tj = jnp.where(mask, jnp.swapaxes(s, 1, 2)[:, :, None, :], -jnp.inf)
  m = jnp.maximum(state.m[:, :, None], jnp.max(s_tj, axis=-1))  # [B, H, C]
  m_ref = jnp.where(jnp.isneginf(m), 0.0, m)
  p = jnp.exp(s_tj - m_ref[..., None])  # [B, H, C, C]; 0 where masked
  carry_scale = jnp.exp(state.m[:, :, None] - m_ref)  # [B, H, C]; <= 1
  u = state.u[:, :, None] * carry_scale + jnp.sum(p, axis=-1)  # [B, H, C]
  # Query head h = n * G + g uses kv head n.
  p = p.reshape(batch, kv_heads, groups, chunk, chunk)
  pv = jnp.einsum("bngtj,bjnv->bngtv", p, v.astype(jnp.float32))
  w = (state.w[:, :, None, :] * carry_scale[..., None] +
       pv.reshape(batch, heads, chunk, v_dim))  # [B, H, C, V]
  o = jnp.swapaxes(_normalize(u, w), 1, 2)  # [B, C, H, V]
  return o, AttentionScanState(m[:, :, -1], u[:, :, -1], w[:, :, -1])


def attention_scan_step(
    state: AttentionScanState,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float | None = None,
) -> tuple[jax.Array, AttentionScanState]:
  """Advances the scan by one token: O(1) time and memory per token.

  With ``s = scale * q[b, h] . k[b, h // G]`` (``G = H // Hkv``)::

    new_state = state + (s, 1, v[b, h // G])   (the associative operator)
    o[b, h] = new_state.w / new_state.u

  A loop of steps starting from ``AttentionScanState.empty(B, H, V)`` gives
  ``attention_scan``'s outputs and final state.

  Args:
    state: ``AttentionScanState`` with float32 fields m [B, H], u [B, H],
      w [B, H, V] (start from ``AttentionScanState.empty``).
    q: [B, H, D] queries, or [H, D] shared by the whole batch.
    k: [B, Hkv, D] the new token's keys, H % Hkv == 0.
    v: [B, Hkv, V] the new token's values.
    scale: logit scale; None means ``D ** -0.5``.

  Returns:
    ``(o, new_state)``: o [B, H, V] in q.dtype, new_state float32.

  Raises:
    ValueError: wrong ranks, mismatched sizes, heads not divisible, q/k/v
      dtypes differing or not floating, a bad scale, or a state that is not an
      AttentionScanState of float32 arrays of the shapes above. (The state's
      values are not checked: that would cost a host sync per token.)
  """
  _check_qkv(_STEP_OP, q, k, v, scale, seq=False)
  batch, heads, v_dim = k.shape[0], q.shape[-2], v.shape[-1]
  # No value checks: they would read the state back to the host every token.
  _check_state(_STEP_OP, "state", state, batch, heads, v_dim,
               check_values=False)
  return _step_xla(state, q, k, v, _checks.default_scale(q.shape[-1], scale))


@jax.jit
def _step_xla(
    state: AttentionScanState, q: jax.Array, k: jax.Array, v: jax.Array,
    scale: float,
) -> tuple[jax.Array, AttentionScanState]:
  """One combine of [B, H, V] states: O(1) in the sequence length."""
  batch, kv_heads, _ = k.shape
  heads = q.shape[-2]
  s = _logits(q, k, scale).reshape(batch, heads)  # [B, H] f32
  v32 = jnp.repeat(v.astype(jnp.float32), heads // kv_heads, axis=1)  # [B,H,V]
  new_state = _combine(state, AttentionScanState(s, jnp.ones_like(s), v32))
  o = _normalize(new_state.u, new_state.w).astype(q.dtype)
  return o, new_state
