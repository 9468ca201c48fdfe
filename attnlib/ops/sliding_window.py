"""Sliding-window (local) softmax attention."""

from __future__ import annotations

import functools

import jax

from attnlib.ops import _blocked
from attnlib.ops import _checks
from attnlib.ops import _dispatch
from kernels_pallas.local_attention import mosaic_gpu as local_gpu
from kernels_pallas.local_attention import tpu as local_tpu

_OP = "al.sliding_window_attention"

# Query rows per block of the "xla" implementation (tests set it small).
BLOCK_Q = 128


@functools.partial(
    jax.jit, static_argnames=("left", "right", "scale", "block_q"))
def _xla_impl(q: jax.Array, k: jax.Array, v: jax.Array, *, left: int,
              right: int, scale: float, block_q: int) -> jax.Array:
  # Query i sees keys i - left <= j <= i + right (causality is right == 0).
  return _blocked.blocked_attention(
      q, k, v, _blocked.softmax_combine, scale=scale, left=left, right=right,
      block_q=block_q)


def _kernel_impl(module):
  """The op's backend signature over a kernel module's entry point: head dims
  zero-padded to ones the kernels take, windows clamped to T - 1."""
  @functools.partial(jax.jit, static_argnames=("left", "right", "scale",
                                               "block_q", "interpret"))
  def impl(q, k, v, *, left, right, scale, block_q, interpret):
    del block_q  # the xla implementation's; the kernels tile by their own
    t, d, dv = q.shape[1], q.shape[-1], v.shape[-1]
    dp = _dispatch.padded_dim(d, module.SUPPORTED_HEAD_DIMS)
    vp = _dispatch.padded_dim(dv, module.SUPPORTED_HEAD_DIMS)
    pad = _dispatch.pad_last
    o = module.sliding_window_attention(
        pad(q, dp), pad(k, dp), pad(v, vp), left=min(left, t - 1),
        right=min(right, t - 1), scale=scale, interpret=interpret)
    return o[..., :dv]
  return impl


# Kernel backends: name -> (the op's implementation, kernel module).
_KERNELS = {"mosaic_tpu": (_kernel_impl(local_tpu), local_tpu),
            "mosaic_gpu": (_kernel_impl(local_gpu), local_gpu)}


def _backends(q: jax.Array, v: jax.Array, implementation: str | None,
              interpret: bool) -> dict:
  """"xla" and the kernels that fit this call (see `_dispatch.with_kernels`)."""
  return _dispatch.padded_kernels(_OP, implementation, _xla_impl, q, v,
                                  interpret, _KERNELS)


def sliding_window_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *,
    local_window_size: int | tuple[int, int], is_causal: bool = False,
    scale: float | None = None, implementation: str | None = None,
    interpret: bool = False) -> jax.Array:
  """Softmax attention restricted to a band of keys around each query.

  With ``(left, right) = local_window_size`` (an int ``w`` means ``(w, w)``,
  the convention of ``jax.nn.dot_product_attention``'s ``local_window_size``),
  query i sees key j iff ``i - left <= j <= i + right`` (and ``j <= i`` when
  ``is_causal``), with 0 <= j < T. For query head h and its kv head
  ``c = h // (H // Hkv)``:

      s_ij = scale * q[b, i, h] . k[b, j, c]
      o[b, i, h] = (sum_{j allowed} exp(s_ij) v[b, j, c])
                   / (sum_{j allowed} exp(s_ij))

  Every query sees at least itself, so every row is well defined. Windows
  larger than T are allowed (they are clamped); a window of (T - 1, T - 1)
  is ordinary full attention.

  Memory ("xla" implementation): queries are processed in blocks of
  ``BLOCK_Q`` rows (``lax.map``, several blocks a step within
  ``_blocked.WORKING_SET_ELEMENTS``; the backward recomputes each
  block). A block reads only its ``BLOCK_Q + left + right`` keys, so the
  working set is O(B * H * BLOCK_Q * (BLOCK_Q + left + right)) float32 plus a
  padded copy of k and v, O(B * (T + left + right) * Hkv * (D + V)): linear in
  T, never T x T. When ``BLOCK_Q + left + right >= T`` a block reads all T keys
  instead: O(B * H * BLOCK_Q * T). Inputs in bf16/f16 are accumulated in
  float32.

  Args:
    q: [B, T, H, D] queries, floating dtype.
    k: [B, T, Hkv, D] keys, same dtype as q; H % Hkv == 0 (grouped-query
      attention, heads in consecutive groups).
    v: [B, T, Hkv, V] values, same dtype; V may differ from D.
    local_window_size: int w >= 0 or a pair (left, right) of ints >= 0.
    is_causal: additionally mask keys after the query (j > i).
    scale: logit scale; None means D ** -0.5.
    implementation: None (the kernel of the platform when the call fits it,
      else "xla"), "xla", "mosaic_tpu" (kernels_pallas/local_attention/tpu.py:
      block-sparse flash attention, forward and backward; D, V up to 256,
      zero-padded to 64/128/256; f32/bf16/f16) or "mosaic_gpu"
      (.../mosaic_gpu.py, Hopper: D, V up to 128, zero-padded to 64/128;
      bf16/f16). The kernels visit only the key tiles that meet some
      window of a query tile and mask only the tiles that straddle an edge.
    interpret: Pallas interpret mode for kernel backends (TPU semantics with
      pltpu.InterpretParams, Mosaic GPU with plgpu.InterpretGPUParams).

  Returns:
    [B, T, H, V] in q.dtype.

  Raises:
    ValueError: for wrong ranks, mismatched batch/length/heads/head_dim,
      heads not divisible, dtypes differing or not floating, a bad
      ``local_window_size`` (negative, wrong type or length), a non-bool
      ``is_causal`` or ``interpret``, a non-finite or non-numeric ``scale``, or
      an unknown ``implementation`` or a named kernel that does not fit the
      call (head dims, dtype, or mosaic_gpu off Hopper without interpret).
  """
  _blocked.check_qkv(_OP, q, k, v, same_length=True)
  window = _blocked.parse_window(_OP, local_window_size)
  _checks.check_bool(_OP, "is_causal", is_causal)
  _checks.check_scale(_OP, scale)
  impl = _dispatch.select(_OP, implementation,
                          _backends(q, v, implementation, interpret), interpret)
  left, right = _blocked.band(q.shape[1], k.shape[1], window, bool(is_causal))
  kwargs = {} if impl is _xla_impl else {"interpret": interpret}
  return impl(q, k, v, left=left, right=right,
              scale=_checks.default_scale(q.shape[-1], scale), block_q=BLOCK_Q,
              **kwargs)


__all__ = ["sliding_window_attention"]
