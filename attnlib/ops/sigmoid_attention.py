"""Sigmoid attention (FlashSigmoid; Ramapuram et al., 2024)."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnlib.ops import _blocked
from attnlib.ops import _checks
from attnlib.ops import _dispatch
from kernels_pallas.sigmoid_attention import mosaic_gpu as sigmoid_gpu
from kernels_pallas.sigmoid_attention import tpu as sigmoid_tpu

_OP = "al.sigmoid_attention"

# Query rows per block of the "xla" implementation (tests set it small).
BLOCK_Q = 128


@functools.partial(
    jax.jit, static_argnames=("left", "right", "scale", "block_q"))
def _xla_impl(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, *,
              left: int | None, right: int | None, scale: float,
              block_q: int) -> jax.Array:
  # Query i sees keys i - left <= j <= i + right (None: unbounded; causality
  # is right == 0); bias is float32 of shape () or [H].
  h, hkv = q.shape[2], k.shape[2]
  b = bias.astype(jnp.float32)
  if b.ndim == 1:                                     # [H] -> [Hkv, G, 1, 1]
    b = b.reshape(hkv, h // hkv, 1, 1)

  def combine(logits: jax.Array, mask: jax.Array) -> tuple[jax.Array, None]:
    # logits: [B, Hkv, G, Bq, L]; masked entries contribute exactly 0.
    return jnp.where(mask, jax.nn.sigmoid(logits + b), 0.0), None

  return _blocked.blocked_attention(
      q, k, v, combine, scale=scale, left=left, right=right, block_q=block_q)


def _kernel_impl(module):
  """The op's backend signature over a kernel module's entry point: head dims
  zero-padded to ones the kernels take, the bias as one value per head."""
  @functools.partial(jax.jit, static_argnames=("left", "right", "scale",
                                               "block_q", "interpret"))
  def impl(q, k, v, bias, *, left, right, scale, block_q, interpret):
    del block_q  # the xla implementation's; the kernels tile by their own
    d, dv, h = q.shape[-1], v.shape[-1], q.shape[2]
    dp = _dispatch.padded_dim(d, module.SUPPORTED_HEAD_DIMS)
    vp = _dispatch.padded_dim(dv, module.SUPPORTED_HEAD_DIMS)
    pad = _dispatch.pad_last
    per_head = jnp.broadcast_to(bias.astype(jnp.float32), (h,))
    o = module.sigmoid_attention(
        pad(q, dp), pad(k, dp), pad(v, vp), per_head, left=left, right=right,
        scale=scale, interpret=interpret)
    return o[..., :dv]
  return impl


# Kernel backends: name -> (the op's implementation, kernel module).
_KERNELS = {"mosaic_tpu": (_kernel_impl(sigmoid_tpu), sigmoid_tpu),
            "mosaic_gpu": (_kernel_impl(sigmoid_gpu), sigmoid_gpu)}


def _backends(q: jax.Array, v: jax.Array, implementation: str | None,
              interpret: bool) -> dict:
  """"xla" and the kernels that fit this call (see `_dispatch.with_kernels`)."""
  return _dispatch.padded_kernels(_OP, implementation, _xla_impl, q, v,
                                  interpret, _KERNELS)


def _check_bias(bias: Any, heads: int) -> None:
  if bias is None:
    return
  if isinstance(bias, (bool, np.bool_)):
    _checks.fail(_OP, "bias", bias, "None, a float or an array of shape () or "
                 f"({heads},)")
  if isinstance(bias, (int, float)):
    if not math.isfinite(bias):
      _checks.fail(_OP, "bias", bias, "a finite float")
    return
  if not hasattr(bias, "shape") or not hasattr(bias, "dtype"):
    _checks.fail(_OP, "bias", type(bias).__name__,
                 f"None, a float or an array of shape () or ({heads},)")
  _checks.check_array(_OP, "bias", bias, (0, 1))
  if bias.ndim == 1 and bias.shape[0] != heads:
    _checks.fail(_OP, "bias.shape", _checks.shape_of(bias),
                 f"() or ({heads},) (one bias per query head)")
  if _checks.is_concrete(bias) and not np.all(np.isfinite(np.asarray(bias))):
    _checks.fail(_OP, "bias", bias, "finite values")


def sigmoid_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, bias: Any = None,
    scale: float | None = None, is_causal: bool = False,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: str | None = None, interpret: bool = False) -> jax.Array:
  """Attention with an elementwise sigmoid instead of a softmax.

  For query head h (kv head ``c = h // (H // Hkv)``):

      s_ij = scale * q[b, i, h] . k[b, j, c]
      o[b, i, h] = sum_{j allowed} sigmoid(s_ij + b_h) v[b, j, c]

  There is no normaliser: disallowed keys contribute exactly 0, and a row
  has no other coupling between keys. ``b_h`` is ``bias``: None means
  ``-log(Tk)`` (the FlashSigmoid default, which keeps the output magnitude
  comparable to softmax attention), a Python float is used for every head, and
  an array of shape ``[H]`` (per query head) or ``()`` is added as is (and
  is differentiable).

  Allowed keys: all j (Tq may differ from Tk) unless ``is_causal`` (j <= i)
  and/or ``local_window_size = (left, right)`` (``i - left <= j <= i + right``;
  an int w means (w, w), JAX's convention) restrict them; both restrictions
  need Tq == Tk.

  Memory ("xla" implementation): queries are processed in blocks of
  ``BLOCK_Q`` rows (``lax.map``, several blocks a step within
  ``_blocked.WORKING_SET_ELEMENTS``; the backward recomputes each block). With a window smaller than the sequence a block reads only its
  ``BLOCK_Q + left + right`` keys: O(B * H * BLOCK_Q * (BLOCK_Q + left +
  right)) float32 working memory plus padded k/v copies, linear in T. Without
  a window (or with a larger one) a block reads all Tk keys:
  O(B * H * BLOCK_Q * Tk). bf16/f16 inputs are accumulated in float32.

  Args:
    q: [B, Tq, H, D] queries, floating dtype.
    k: [B, Tk, Hkv, D] keys, same dtype; H % Hkv == 0 (grouped-query
      attention, heads in consecutive groups).
    v: [B, Tk, Hkv, V] values, same dtype; V may differ from D.
    bias: None, a finite Python float, or a floating array of shape [H] or ().
    scale: logit scale; None means D ** -0.5.
    is_causal: mask keys after the query (requires Tq == Tk).
    local_window_size: None, an int w >= 0 or a pair (left, right) of ints
      >= 0 (requires Tq == Tk).
    implementation: None (the kernel of the platform when the call fits
      it: mosaic_tpu on TPU, mosaic_gpu on a Hopper GPU; else "xla"), "xla",
      "mosaic_tpu" (kernels_pallas/sigmoid_attention/tpu.py) or "mosaic_gpu"
      (.../mosaic_gpu.py, Hopper). Both are forward and backward kernels that
      visit only the key tiles a query tile's window reaches. mosaic_tpu: D,
      V up to 256 (zero-padded to 64/128/256), f32/bf16/f16; mosaic_gpu: D,
      V up to 128 (zero-padded to 64/128), bf16/f16 only, so float32 calls
      with implementation=None use "xla" there.
    interpret: Pallas interpret mode for kernel backends (TPU semantics for
      mosaic_tpu, Mosaic GPU's interpreter for mosaic_gpu); with
      implementation=None it picks mosaic_tpu when the call fits it.

  Returns:
    [B, Tq, H, V] in q.dtype.

  Raises:
    ValueError: for wrong ranks, mismatched batch/length/heads/head_dim,
      heads not divisible, dtypes differing or not floating, Tq != Tk with
      ``is_causal`` or a window, a bias of the wrong type/shape/dtype or
      non-finite (checked when concrete), a bad ``local_window_size``, a
      non-bool ``is_causal`` or ``interpret``, a bad ``scale``, an unknown
      ``implementation``, or a named kernel that does not fit the call.
  """
  _checks.check_bool(_OP, "is_causal", is_causal)
  masked = bool(is_causal) or local_window_size is not None
  _blocked.check_qkv(
      _OP, q, k, v, same_length=masked,
      why="; is_causal / local_window_size need equal query and key lengths")
  window = (None if local_window_size is None
            else _blocked.parse_window(_OP, local_window_size))
  _check_bias(bias, q.shape[2])
  _checks.check_scale(_OP, scale)
  impl = _dispatch.select(
      _OP, implementation, _backends(q, v, implementation, interpret),
      interpret)
  if bias is None:
    bias = -math.log(k.shape[1])
  if isinstance(bias, (int, float)):
    bias = jnp.asarray(bias, jnp.float32)
  left, right = _blocked.band(q.shape[1], k.shape[1], window, bool(is_causal))
  kwargs = {} if impl is _xla_impl else {"interpret": interpret}
  return impl(q, k, v, bias, left=left, right=right,
              scale=_checks.default_scale(q.shape[-1], scale), block_q=BLOCK_Q,
              **kwargs)
