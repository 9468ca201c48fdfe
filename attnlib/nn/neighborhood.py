"""Flax NNX neighborhood attention over 1 to 3 spatial axes.

* `NeighborhoodAttention`: q, k, v projections of a feature map
  ``x [B, *spatial, E]``, `al.neighborhood_attention` (NATTEN's semantics:
  each token attends to a ``kernel_size`` window around it per spatial axis,
  shifted at the borders, optionally dilated and/or causal), and the output
  projection back to ``[B, *spatial, E]``.
* `neighborhood_attention_fn`: a drop-in ``attention_fn`` for
  `flax.nnx.MultiHeadAttention` on image-like inputs ``[B, *spatial, E]``.

Parameters carry logical axis names ("embed", "heads", "head_dim") as
sharding metadata, like `attnlib.nn.Attention`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnlib.ops import _checks
from attnlib.ops.neighborhood import neighborhood_attention
from attnlib.nn import attention
from attnlib.nn.attention import logical_init

Array = jax.Array

EMBED, HEADS, HEAD_DIM = "embed", "heads", "head_dim"

_LAYER = "attnlib.nn.NeighborhoodAttention"
_FN = "attnlib.nn.neighborhood_attention_fn"


def _option(op: str, name: str, value: Any, kind: str, minimum: int = 1
            ) -> int | bool | tuple:
  """An int (>= minimum) / bool, or a sequence of 1 to 3 of them (per axis).

  Returns the int/bool, or a tuple for a sequence.
  """
  if kind == "bool":
    ok = lambda x: isinstance(x, (bool, np.bool_))  # noqa: E731
    what = "True or False"
  else:
    ok = lambda x: (isinstance(x, (int, np.integer))  # noqa: E731
                    and not isinstance(x, (bool, np.bool_)) and x >= minimum)
    what = f"an int >= {minimum}"
  expected = f"{what}, or a sequence of 1 to 3 of them (one per spatial axis)"
  if isinstance(value, Sequence) and not isinstance(value, str):
    items = tuple(value)
    if not 1 <= len(items) <= 3 or not all(ok(x) for x in items):
      _checks.fail(op, name, value, expected)
    return tuple(bool(x) if kind == "bool" else int(x) for x in items)
  if not ok(value):
    _checks.fail(op, name, value, expected)
  return bool(value) if kind == "bool" else int(value)


def _check_rank(op: str, options: dict[str, Any], rank: int) -> None:
  """Per-axis sequences must have one entry per spatial axis."""
  for name, value in options.items():
    if isinstance(value, tuple) and len(value) != rank:
      _checks.fail(op, name, value,
                   f"a single value or {rank} values (the input has {rank} "
                   f"spatial axes)")


def _or_causal(option: bool | tuple, extra: bool) -> bool | tuple:
  """The option or-ed with a call-time is_causal (True: every axis)."""
  if not extra:
    return option
  return True if isinstance(option, bool) else tuple(True for _ in option)


class NeighborhoodAttention(nnx.Module):
  """Multi-head neighborhood attention (Hassani et al., NAT / DiNAT) layer.

  For x [B, *S, E] with 1 <= len(S) <= 3 spatial axes (the number of axes is
  ``x.ndim - 2``, read from each input: one layer serves 1-D, 2-D and 3-D
  inputs as long as per-axis options fit)::

    q = x W_q, k = x W_k, v = x W_v              [B, *S, H, D]
    o_i = sum_{j in N(i)} softmax_j(q_i . k_j / sqrt(D)) v_j   (per head)
    y = o W_o                                    [B, *S, E]

  where ``N(i)`` is the neighborhood of token i given by ``kernel_size``,
  ``dilation`` and ``is_causal`` with NATTEN's rules
  (`al.neighborhood_attention`, stride 1): per axis, the ``kernel_size``
  tokens of i's dilation group (positions equal to i modulo ``dilation``)
  centred on i and shifted at the borders so that the window never shrinks;
  causal axes take the window ending at i (shorter near the start). The op
  runs with ``implementation=None`` (the platform's kernel where the call
  fits it, else "xla"); softmax and the weighted sum are in float32.

  No projection biases and no relative position bias: the op takes no
  additive logit bias, so NAT's learned relative position bias (rpb) is not
  available here.

  Args:
    embed_dim: E, the input and output features.
    num_heads: H.
    head_dim: D.
    kernel_size: window size, an int >= 2 or one per spatial axis.
    dilation: an int >= 1 or one per spatial axis; ``kernel_size *
      dilation`` must not exceed an axis' length (checked by the op at call
      time, when the spatial shape is known).
    is_causal: a bool or one per spatial axis.
    rngs: for the initialisers.
    dtype: the computation dtype of the projections (and of q, k, v).
    param_dtype: the parameters' dtype.

  Parameters and their logical axes:
    q.kernel, k.kernel, v.kernel [E, H, D] ("embed", "heads", "head_dim");
    o.kernel [H, D, E] ("heads", "head_dim", "embed").

  Raises:
    ValueError: (at construction) a bad size or option; (at call time) x not
      [B, *S, E] with 1 to 3 spatial axes, a per-axis option whose length is
      not len(S), or (from the op) ``kernel_size * dilation`` larger than an
      axis. Messages name the argument, its value and what was expected.
  """

  def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *,
               kernel_size: int | Sequence[int],
               dilation: int | Sequence[int] = 1,
               is_causal: bool | Sequence[bool] = False, rngs: nnx.Rngs,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
    for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads),
                        ("head_dim", head_dim)):
      _checks.check_positive_int(_LAYER, name, value)
    self.kernel_size = _option(_LAYER, "kernel_size", kernel_size, "int", 2)
    self.dilation = _option(_LAYER, "dilation", dilation, "int", 1)
    self.is_causal = _option(_LAYER, "is_causal", is_causal, "bool")
    self.embed_dim, self.num_heads = embed_dim, num_heads
    self.head_dim = head_dim
    self.dtype = dtype
    init = nnx.initializers.lecun_normal()
    common = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype,
                  rngs=rngs)
    in_names = (EMBED, HEADS, HEAD_DIM)
    self.q = nnx.LinearGeneral(embed_dim, (num_heads, head_dim),
                               kernel_init=logical_init(init, in_names),
                               **common)
    self.k = nnx.LinearGeneral(embed_dim, (num_heads, head_dim),
                               kernel_init=logical_init(init, in_names),
                               **common)
    self.v = nnx.LinearGeneral(embed_dim, (num_heads, head_dim),
                               kernel_init=logical_init(init, in_names),
                               **common)
    self.o = nnx.LinearGeneral(
        (num_heads, head_dim), embed_dim, axis=(-2, -1),
        kernel_init=logical_init(init, (HEADS, HEAD_DIM, EMBED)), **common)

  def __call__(self, x: Array) -> Array:
    """x [B, *S, E] (1 to 3 spatial axes) -> [B, *S, E]."""
    if (not hasattr(x, "shape") or not 3 <= x.ndim <= 5
        or x.shape[-1] != self.embed_dim):
      _checks.fail(_LAYER, "x.shape", _checks.shape_of(x),
                   f"[B, *spatial, {self.embed_dim}] with 1 to 3 spatial axes")
    options = dict(kernel_size=self.kernel_size, dilation=self.dilation,
                   is_causal=self.is_causal)
    _check_rank(_LAYER, options, x.ndim - 2)
    q, k, v = self.q(x), self.k(x), self.v(x)
    o = neighborhood_attention(q, k, v, **options, implementation=None)
    return self.o(o)


def neighborhood_attention_fn(kernel_size: int | Sequence[int], *,
                              dilation: int | Sequence[int] = 1,
                              is_causal: bool | Sequence[bool] = False,
                              spatial_dims: int = 2) -> Callable[..., Array]:
  """Neighborhood attention as an ``attention_fn`` for nnx.MultiHeadAttention.

  nnx.MultiHeadAttention projects inputs ``[..., E]`` to query, key and value
  ``[..., H, D]`` and treats every axis before the heads as batch, except
  the one before them, which it calls the length. This function instead
  reads the last ``spatial_dims`` axes before the heads as the spatial grid
  and every axis before those as batch: for inputs [B, Himg, Wimg, E] and
  ``spatial_dims=2`` the query is [B, Himg, Wimg, H, D] and each pixel
  attends to its neighborhood on the Himg x Wimg grid
  (`al.neighborhood_attention`, see `NeighborhoodAttention` for the math).
  Self-attention only: key and value must have the query's spatial shape.

  Args:
    kernel_size: an int >= 2 or one per spatial axis.
    dilation: an int >= 1 or one per spatial axis.
    is_causal: a bool or one per spatial axis; or-ed with the
      ``is_causal`` the module passes (True there: causal on every axis).
    spatial_dims: the number of spatial axes, 1, 2 or 3.

  The returned function takes nnx's arguments (query [..., *S, H, D], key
  and value [..., *S, H, D], bias, mask, dropout arguments, dtype,
  precision, module, promote_dtype, is_causal). Zero or more leading batch
  axes are allowed (none: one is added and removed). ``mask``, ``bias``,
  dropout (rate > 0 and not deterministic) and ``module`` (sow_weights) are
  not supported; ``precision`` is ignored (the op computes its logits and
  softmax in float32).

  Raises:
    ValueError: a bad option; at call time, an unsupported argument, a query
      of rank < spatial_dims + 2, a per-axis option whose length is not
      spatial_dims, or the op's own checks (shapes, kernel_size * dilation
      larger than an axis).
  """
  if (isinstance(spatial_dims, (bool, np.bool_))
      or not isinstance(spatial_dims, (int, np.integer))
      or not 1 <= spatial_dims <= 3):
    _checks.fail(_FN, "spatial_dims", spatial_dims, "1, 2 or 3")
  spatial_dims = int(spatial_dims)
  options = dict(kernel_size=_option(_FN, "kernel_size", kernel_size, "int", 2),
                 dilation=_option(_FN, "dilation", dilation, "int", 1),
                 is_causal=_option(_FN, "is_causal", is_causal, "bool"))
  _check_rank(_FN, options, spatial_dims)

  def fn(query, key, value, bias=None, mask=None, broadcast_dropout=True,
         dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
         precision=None, module=None, promote_dtype=None, is_causal=False,
         **unused):
    del broadcast_dropout, dropout_rng, precision, unused
    attention.check_fn_options(_FN, dropout_rate, deterministic, module)
    if mask is not None:
      _checks.fail(_FN, "mask", _checks.shape_of(mask),
                   "None (the neighborhood is the mask)")
    if bias is not None:
      _checks.fail(_FN, "bias", _checks.shape_of(bias), "None")
    for name, x in (("query", query), ("key", key), ("value", value)):
      if not hasattr(x, "shape") or x.ndim < spatial_dims + 2:
        _checks.fail(_FN, f"{name}.shape", _checks.shape_of(x),
                     f"[..., *spatial, H, D] with spatial_dims="
                     f"{spatial_dims} spatial axes")
    if promote_dtype is not None:
      query, key, value = promote_dtype((query, key, value), dtype=dtype)
    elif dtype is not None:
      query, key, value = (x.astype(dtype) for x in (query, key, value))
    # Flatten the batch axes to one (add one when there is none).
    tail = spatial_dims + 2
    batch = query.shape[:-tail]
    flat = lambda x: x.reshape((-1,) + x.shape[-tail:])  # noqa: E731
    causal = _or_causal(options["is_causal"], bool(is_causal))
    o = neighborhood_attention(
        flat(query), flat(key), flat(value),
        kernel_size=options["kernel_size"], dilation=options["dilation"],
        is_causal=causal, implementation=None)
    return o.reshape(batch + o.shape[1:])

  return fn
