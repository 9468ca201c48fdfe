"""Blocked evaluation of banded (or full) attention, shared by several ops.

Both ``al.sliding_window_attention`` (softmax) and ``al.sigmoid_attention``
compute, for every query position i,

    o_i = sum_{j allowed for i} w_ij v_j / n_i,
    s_ij = scale * q_i . k_j,

and differ only in how the allowed logits s_ij become weights w_ij (and a
normaliser n_i): that per-op step is the *combine* function. This module holds
everything else: argument checks common to both ops, grouped-query heads,
query blocking, the key span of each block, the exact mask, and padding.

Allowed keys. Query i sees key j iff ``0 <= j < Tk`` and
``i - left <= j <= i + right``, where ``left``/``right`` may be ``None``
(unbounded on that side). `band` turns an op's ``local_window_size`` and
``is_causal`` into that pair (causal means ``right = min(right, 0)``) and
clamps it to the sequence, so that equivalent calls share one compilation.

Blocking. Queries are processed in blocks of ``block_q`` rows with
``jax.lax.map`` (a loop compiled once, vmapping as many consecutive blocks per
step as fit in ``WORKING_SET_ELEMENTS``; see `map_blocks`) whose body is wrapped in
``jax.checkpoint``, so the backward pass recomputes each block's logits instead
of storing them. For a block starting at query ``s``:

* Banded span: when both sides are bounded and ``L = block_q + left + right``
  is smaller than ``Tk``, the block reads only the keys ``[s - left,
  s + block_q + right)``, a ``lax.dynamic_slice`` of length ``L`` taken from
  k/v padded with ``left`` zero rows in front and enough behind. Peak working
  memory per block is O(B * H * block_q * L) float32 for logits/weights, plus
  the padded copies of k and v, O(B * (T + left + right) * Hkv * (D + V));
  never T x T.
* Full span: otherwise (a side is unbounded, or ``L >= Tk``) the block reads
  all ``Tk`` keys: O(B * H * block_q * Tk) float32 per block. Causal
  attention without a window takes this path and computes (then masks) the
  upper triangle too.

Lengths that are not multiples of ``block_q`` are padded with zero query rows,
whose outputs are computed, finite, and sliced away. The backward pass keeps
only the inputs (q blocks and the full k, v) plus gradient accumulators of the
size of k and v.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnlib.ops import _checks

# combine(logits [B, Hkv, G, Bq, L] float32, mask [Bq, L] bool)
#   -> (weights [B, Hkv, G, Bq, L] float32, normaliser [B, Hkv, G, Bq] or None).
# Masked entries of `weights` must be exactly 0 and every value (and gradient)
# finite, including rows where nothing is allowed (padding rows).
Combine = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array | None]]


# ----------------------------------------------------------------------------
# Argument checks shared by the blocked ops.
# ----------------------------------------------------------------------------


def check_qkv(op: str, q: Any, k: Any, v: Any, *, same_length: bool,
              why: str = "") -> None:
  """Checks q [B, Tq, H, D], k [B, Tk, Hkv, D], v [B, Tk, Hkv, V].

  Args:
    op: public op name for messages.
    q, k, v: the arrays.
    same_length: whether Tq must equal Tk.
    why: reason for `same_length`, appended to the message.

  Raises:
    ValueError: naming the offending argument.
  """
  for name, x in (("q", q), ("k", k), ("v", v)):
    _checks.check_array(op, name, x, 4)
  _checks.check_same_dtype(op, q=q, k=k, v=v)
  b, tq, h, d = q.shape
  if tq < 1 or h < 1 or d < 1:
    _checks.fail(op, "q.shape", _checks.shape_of(q),
                 "[batch, length >= 1, heads >= 1, head_dim >= 1]")
  _checks.check_dim(op, "k", k, 0, b, "batch of q")
  _checks.check_dim(op, "v", v, 0, b, "batch of q")
  tk = k.shape[1]
  if tk < 1:
    _checks.fail(op, "k.shape", _checks.shape_of(k), "length >= 1 at axis 1")
  if same_length:
    _checks.check_dim(op, "k", k, 1, tq, f"length of q{why}")
  _checks.check_dim(op, "v", v, 1, tk, "length of k")
  _checks.check_heads(op, h, k.shape[2], "k")
  _checks.check_dim(op, "v", v, 2, k.shape[2], "heads of k")
  _checks.check_dim(op, "k", k, 3, d, "head_dim of q")
  if v.shape[3] < 1:
    _checks.fail(op, "v.shape", _checks.shape_of(v), "value dim >= 1 at axis 3")


def parse_window(op: str, local_window_size: Any) -> tuple[int, int]:
  """Returns (left, right) from an int w (meaning (w, w)) or a pair of ints.

  Raises:
    ValueError: naming `local_window_size` unless it is a non-negative int or
      a tuple/list of two non-negative ints.
  """
  expected = "an int >= 0 or a pair (left, right) of ints >= 0"

  def is_int(x: Any) -> bool:
    return (isinstance(x, (int, np.integer))
            and not isinstance(x, (bool, np.bool_)))

  if is_int(local_window_size):
    sides = (local_window_size, local_window_size)
  elif isinstance(local_window_size, (tuple, list)):
    if len(local_window_size) != 2 or not all(map(is_int, local_window_size)):
      _checks.fail(op, "local_window_size", local_window_size, expected)
    sides = tuple(local_window_size)
  else:
    _checks.fail(op, "local_window_size", local_window_size, expected)
  if min(sides) < 0:
    _checks.fail(op, "local_window_size", local_window_size, expected)
  return int(sides[0]), int(sides[1])


def band(tq: int, tk: int, window: tuple[int, int] | None,
         is_causal: bool) -> tuple[int | None, int | None]:
  """(left, right) bounds for `blocked_attention`; None means unbounded.

  Query i sees keys i - left <= j <= i + right. `window` is (left, right) or
  None (no window); `is_causal` caps right at 0. Bounds at least as large as
  the sequence are clamped to max(tq, tk): they change nothing.
  """
  left, right = (None, None) if window is None else window
  if is_causal:
    right = 0 if right is None else min(right, 0)
  longest = max(tq, tk)
  left = None if left is None else min(left, longest)
  right = None if right is None else min(right, longest)
  return left, right


# ----------------------------------------------------------------------------
# Combine functions.
# ----------------------------------------------------------------------------


def softmax_combine(logits: jax.Array, mask: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
  """Max-subtracted softmax over the allowed entries of each row (float32).

  Rows with no allowed entry (only padding rows) get zero weights and
  normaliser 1. The "double where" keeps exp() away from -inf - (-inf) and the
  division away from 0, so values and gradients stay finite.
  """
  masked = jnp.where(mask, logits, -jnp.inf)
  row_max = jnp.max(masked, axis=-1, keepdims=True)
  row_max = jax.lax.stop_gradient(
      jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  weights = jnp.where(mask, jnp.exp(masked - row_max), 0.0)
  total = jnp.sum(weights, axis=-1)
  return weights, jnp.where(total > 0, total, 1.0)


# ----------------------------------------------------------------------------
# The blocked loop.
# ----------------------------------------------------------------------------


# Blocks evaluated together by `map_blocks` hold at most about this many
# float32 elements of working set (256 MiB): enough parallel work per step to fill
# a GPU with small blocks, without materialising everything at once.
WORKING_SET_ELEMENTS = 1 << 26


def map_blocks(fn: Callable, xs: Any, elements_per_block: int) -> Any:
  """``jax.lax.map(fn, xs)`` over the leading axis of `xs`, several blocks a step.

  Consecutive blocks are vmapped together (``lax.map``'s ``batch_size``) as long
  as their working set, ``elements_per_block`` each, stays within
  ``WORKING_SET_ELEMENTS``; a sequential loop of tiny steps would leave an
  accelerator idle, one step of all blocks would cost the T x T memory the
  blocking avoids.
  """
  num_blocks = jax.tree.leaves(xs)[0].shape[0]
  batch = max(1, min(num_blocks, WORKING_SET_ELEMENTS // max(1, elements_per_block)))
  return jax.lax.map(fn, xs, batch_size=batch if batch > 1 else None)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                      combine: Combine, *, scale: float, left: int | None,
                      right: int | None, block_q: int) -> jax.Array:
  """o_i = sum_j combine(scale * q_i . k_j)_j v_j over allowed j, in blocks.

  Args:
    q: [B, Tq, H, D] queries.
    k: [B, Tk, Hkv, D] keys, H % Hkv == 0 (query head h uses kv head
      h // (H // Hkv)).
    v: [B, Tk, Hkv, V] values.
    combine: logits -> (weights, normaliser or None); see `Combine`.
    scale: logit scale.
    left: query i sees keys j >= i - left; None for no bound (see `band`).
    right: query i sees keys j <= i + right; None for no bound (0: causal).
    block_q: query rows per block (>= 1; reduced to Tq when larger).

  Returns:
    [B, Tq, H, V] in q.dtype. Intermediate arithmetic is float32.
  """
  b, tq, h, d = q.shape
  tk, hkv = k.shape[1], k.shape[2]
  g = h // hkv
  bq = max(1, min(block_q, tq))
  nb = -(-tq // bq)
  tq_pad = nb * bq
  banded = (left is not None and right is not None
            and bq + left + right < tk)

  # Queries as blocks: [nb, B, Bq, Hkv, G, D].
  q_pad = jnp.pad(q, ((0, 0), (0, tq_pad - tq), (0, 0), (0, 0)))
  q_blocks = q_pad.reshape(b, nb, bq, hkv, g, d).swapaxes(0, 1)

  if banded:
    span = bq + left + right
    # Key row m of block n is key position n * bq - left + m.
    back = max(0, tq_pad + right - tk)
    k_src = jnp.pad(k, ((0, 0), (left, back), (0, 0), (0, 0)))
    v_src = jnp.pad(v, ((0, 0), (left, back), (0, 0), (0, 0)))
  else:
    span = tk
    k_src, v_src = k, v

  def block(args: tuple[jax.Array, jax.Array]) -> jax.Array:
    n, q_blk = args                             # q_blk: [B, Bq, Hkv, G, D]
    q_start = n * bq
    if banded:
      k_start = q_start - left
      k_blk = jax.lax.dynamic_slice_in_dim(k_src, q_start, span, axis=1)
      v_blk = jax.lax.dynamic_slice_in_dim(v_src, q_start, span, axis=1)
    else:
      k_start = 0
      k_blk, v_blk = k_src, v_src
    # k_blk: [B, L, Hkv, D], v_blk: [B, L, Hkv, V].
    q_pos = q_start + jnp.arange(bq)[:, None]         # [Bq, 1]
    k_pos = k_start + jnp.arange(span)[None, :]       # [1, L]
    mask = (k_pos >= 0) & (k_pos < tk)                # [Bq, L]
    if left is not None:
      mask &= k_pos >= q_pos - left
    if right is not None:
      mask &= k_pos <= q_pos + right
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", q_blk, k_blk,
                        preferred_element_type=jnp.float32) * scale
    weights, norm = combine(logits, mask)             # [B, Hkv, G, Bq, L]
    out = jnp.einsum("bhgqk,bkhv->bhgqv", weights, v_blk.astype(jnp.float32),
                     preferred_element_type=jnp.float32)
    if norm is not None:
      out = out / norm[..., None]
    return out                                        # [B, Hkv, G, Bq, V]

  per_block = b * h * bq * span  # float32 logits (and weights) of one block
  outs = map_blocks(jax.checkpoint(block),
                    (jnp.arange(nb, dtype=jnp.int32), q_blocks), per_block)
  # [nb, B, Hkv, G, Bq, V] -> [B, nb * Bq, H, V]
  outs = outs.transpose(1, 0, 4, 2, 3, 5).reshape(b, tq_pad, h, v.shape[-1])
  return outs[:, :tq].astype(q.dtype)
