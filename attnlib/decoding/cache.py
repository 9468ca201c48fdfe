"""Decoding caches of `attnlib.nn.Attention` layers.

A cache summarises the tokens a causal layer has consumed so far, so that
`Attention.decode` can continue the sequence chunk by chunk (a prefill is a
decode of the prompt on an empty cache, a generation step a decode of one
token). Each kind of attention keeps what its output at later positions
depends on:

* softmax, sigmoid -> `KVCache`: every key and value, [B, max_len, Hkv, D];
* sliding_window -> `WindowCache`: the last ``left`` keys and values (the ones
  the causal window of the next token reaches), [B, left, Hkv, D], a size
  independent of max_len;
* linear -> `LinearCache`: the recurrent state S [B, H, K, V], float32;
* aaren -> `ScanCache`: the prefix-softmax scan state (m, u, w), float32.

Every cache is a `flax.struct.dataclass` (a pytree: it passes through
``jax.jit``, ``nnx.jit``, ``lax.scan`` ...) with a ``length`` field: the number
of tokens consumed so far, an int32 scalar array (traced under jit). Build
caches with `Attention.init_cache` rather than by hand.
"""

from __future__ import annotations

import jax
from flax import struct

from attnlib.ops.attention_scan import AttentionScanState

Array = jax.Array


@struct.dataclass
class KVCache:
  """Keys and values of every position (softmax and sigmoid layers).

  Rows ``[0, length)`` hold the keys/values of the tokens consumed so far
  (after RoPE, for rope layers); rows ``[length, max_len)`` are zeros, never
  attended to.

  Attributes:
    k: [B, max_len, Hkv, D] keys.
    v: [B, max_len, Hkv, D] values.
    length: int32 [] tokens consumed so far (<= max_len).
  """

  k: Array
  v: Array
  length: Array

  @property
  def max_len(self) -> int:
    """The capacity (static): k.shape[1]."""
    return self.k.shape[1]


@struct.dataclass
class WindowCache:
  """The keys and values the causal window of the next token reaches.

  For a causal sliding-window layer with left reach ``W`` (query i sees keys
  ``i - W .. i``), the next token at position ``length`` sees the ``W``
  previous tokens. The buffer holds them oldest first: row ``r`` is position
  ``length - W + r``; rows with a negative position (before the first token)
  are zeros and masked. Its size depends on the window only, not on how long
  the sequence gets.

  Attributes:
    k: [B, W, Hkv, D] keys of positions length - W .. length - 1.
    v: [B, W, Hkv, D] values of the same positions.
    length: int32 [] tokens consumed so far.
  """

  k: Array
  v: Array
  length: Array

  @property
  def window(self) -> int:
    """The left reach W (static): k.shape[1]."""
    return self.k.shape[1]


@struct.dataclass
class LinearCache:
  """The state of causal linear attention (with or without decay).

  ``state[b, h] = S_t``, the [K, V] matrix of the recurrence
  ``S_t = a_t S_{t-1} + phi(k_t)^T v_t`` after the last consumed token (K is
  the feature dimension of the layer's feature map, e.g. D for elu_plus_one).

  Attributes:
    state: float32 [B, H, K, V].
    length: int32 [] tokens consumed so far.
  """

  state: Array
  length: Array


@struct.dataclass
class ScanCache:
  """The prefix-softmax state of an Aaren layer.

  Attributes:
    state: `attnlib.AttentionScanState` of float32 fields m [B, H], u [B, H],
      w [B, H, D] summarising the consumed tokens (m = -inf, u = w = 0 when
      nothing was consumed).
    length: int32 [] tokens consumed so far.
  """

  state: AttentionScanState
  length: Array


__all__ = ["KVCache", "LinearCache", "ScanCache", "WindowCache"]
