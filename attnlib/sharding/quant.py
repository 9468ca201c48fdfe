"""int8 weight quantisation (per-channel, symmetric), dequantised in the matmul.

Pope et al. (2022) serve PaLM with int8 weights for their lowest-latency
decoding results (the quantization part of their §3): at small batch a
decode step is bound by loading the weights from memory, so halving (vs
bfloat16) or quartering (vs float32) the weight bytes cuts that time
about in proportion. The scheme here is this library's own (the paper's
exact quantizer is not reproduced).
This module is the option for the models of `attnlib.models`:

  quantize_model(model)     # in place: Linear / LinearGeneral / Embed -> int8

Every `nnx.Linear` and `nnx.LinearGeneral` (contracting trailing input
axes) becomes an `Int8Linear`, every `nnx.Embed` an `Int8Embed`:

* kernel ``W`` [in..., out...] -> ``q = round(W / s)`` clipped to
  [-127, 127] (int8) and ``s = max |W| / 127`` per output channel (the max
  over the contracted ``in`` axes; symmetric, no zero point), float32;
* the matmul runs on ``q`` converted to the compute dtype and scales its
  result: ``x @ W ~ (x @ q) * s`` (exact algebra: s is constant along the
  contraction), so the float weight is never materialised in memory;
* an embedding [V, E] is scaled per row (token): lookups return ``q[t] *
  s[t]`` and the tied output head ``x @ E^T ~ (x @ q^T) * s``.

The int8 kernels keep their logical axis names and the scales get the names
of the output axes, so `attnlib.sharding.rules.shard_model` places a
quantised model with the same layouts. Norm scales, biases, decay rates, the
Aaren query and convolutions (NAT) stay in floating point.

Rounding error per weight is at most s / 2 = max|W| / 254 of its channel;
tests/sharding/test_rules.py measures the effect on a small LM's logits.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

INT8_MAX = 127


def quantize_int8(w: jax.Array, num_contract: int) -> tuple[jax.Array,
                                                            jax.Array]:
  """(q int8, scale float32): per-channel symmetric quantisation of a kernel
  whose first ``num_contract`` axes are contracted (scale has the shape of
  the remaining axes; all-zero channels get scale 1)."""
  if num_contract < 0 or num_contract > w.ndim:
    raise ValueError(f"quantize_int8: num_contract={num_contract} for a "
                     f"kernel of shape {w.shape}")
  wf = jnp.asarray(w, jnp.float32)
  amax = jnp.max(jnp.abs(wf), axis=tuple(range(num_contract)))
  scale = jnp.where(amax > 0, amax / INT8_MAX, 1.0).astype(jnp.float32)
  q = jnp.clip(jnp.round(wf / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)
  return q, scale


def dequantize(q: jax.Array, scale: jax.Array, dtype: Any = jnp.float32
               ) -> jax.Array:
  """q * scale (scale broadcast over the leading, contracted axes)."""
  return (q.astype(dtype) * scale.astype(dtype)).astype(dtype)


def _names(var: nnx.Variable) -> tuple | None:
  names = var.get_metadata().get("out_sharding")
  return tuple(names) if names else None


def _param(value: jax.Array, names: tuple | None) -> nnx.Param:
  if names is None:
    return nnx.Param(value)
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


class Int8Linear(nnx.Module):
  """An int8 `nnx.Linear` / `nnx.LinearGeneral`: kernel int8 [in..., out...]
  (the original's logical names), scale float32 [out...] (the output axes'
  names), optional float bias. ``__call__`` contracts the last
  ``num_contract`` axes of the input with the kernel's first ones in the
  compute ``dtype`` and multiplies by the scale. Build with `from_linear`.
  """

  def __init__(self, kernel: nnx.Param, scale: nnx.Param,
               bias: nnx.Param | None, *, num_contract: int, dtype: Any,
               precision: Any = None):
    self.kernel, self.scale = kernel, scale
    self.bias = nnx.data(bias)
    self.num_contract = num_contract
    self.dtype, self.precision = dtype, precision

  @classmethod
  def from_linear(cls, module: nnx.Module) -> Int8Linear:
    """Quantises an `nnx.Linear` or an `nnx.LinearGeneral` (no batch axes,
    contracting trailing input axes)."""
    if isinstance(module, nnx.LinearGeneral):
      if module.batch_axis:
        raise ValueError("quantize: LinearGeneral with batch_axis is not "
                         "supported")
      axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
      k = len(axis)
      if tuple(sorted(axis)) != tuple(range(-k, 0)):
        raise ValueError(f"quantize: LinearGeneral axis={module.axis} must "
                         "be the trailing input axes (e.g. -1 or (-2, -1))")
    elif isinstance(module, nnx.Linear):
      k = 1
    else:
      raise ValueError(f"quantize: not a Linear: {type(module).__name__}")
    w = module.kernel.get_value()
    q, s = quantize_int8(w, k)
    names = _names(module.kernel)
    bias = module.bias
    if bias is not None:
      bias = _param(bias.get_value(), _names(bias))
    return cls(_param(q, names), _param(s, None if names is None
                                        else names[k:]),
               bias, num_contract=k, dtype=module.dtype,
               precision=module.precision)

  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.num_contract
    scale = self.scale.get_value()
    dtype = self.dtype or jnp.result_type(x.dtype, scale.dtype)
    kernel = self.kernel.get_value().astype(dtype)   # int8 -> dtype, fused
    xa = tuple(range(x.ndim - k, x.ndim))
    y = jax.lax.dot_general(x.astype(dtype), kernel,
                            ((xa, tuple(range(k))), ((), ())),
                            precision=self.precision)
    y = y * scale.astype(dtype)
    if self.bias is not None:
      y = y + self.bias.get_value().astype(dtype)
    return y


class Int8Embed(nnx.Module):
  """An int8 `nnx.Embed`: embedding int8 [V, E] (the original's names),
  scale float32 [V] (per token row). ``__call__(tokens)`` looks up and
  scales rows; ``attend(x)`` is ``(x @ q^T) * scale`` (a tied output head).
  Build with `from_embed`."""

  def __init__(self, embedding: nnx.Param, scale: nnx.Param, *, dtype: Any):
    self.embedding, self.scale = embedding, scale
    self.dtype = dtype
    self.num_embeddings, self.features = embedding.get_value().shape

  @classmethod
  def from_embed(cls, module: nnx.Embed) -> Int8Embed:
    w = module.embedding.get_value()          # [V, E]: channel = row
    q, s = quantize_int8(w.T, 1)              # per row: contract over E
    names = _names(module.embedding)
    return cls(_param(q.T, names), _param(s, None if names is None
                                          else names[:1]),
               dtype=module.dtype)

  def _dtype(self) -> Any:
    return self.dtype or self.scale.get_value().dtype

  def __call__(self, tokens: jax.Array) -> jax.Array:
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError("Int8Embed: tokens must be integers, got "
                       f"{tokens.dtype}")
    dtype = self._dtype()
    rows = jnp.take(self.embedding.get_value(), tokens, axis=0)
    scale = jnp.take(self.scale.get_value(), tokens, axis=0)
    return rows.astype(dtype) * scale[..., None].astype(dtype)

  def attend(self, query: jax.Array) -> jax.Array:
    dtype = self._dtype()
    q = self.embedding.get_value().astype(dtype)
    return jnp.dot(query.astype(dtype), q.T) * self.scale.get_value().astype(
        dtype)


def _child(parent: Any, key: Any) -> Any:
  return parent[key] if isinstance(key, int) else getattr(parent, key)


def _set_child(parent: Any, key: Any, value: Any) -> None:
  if isinstance(key, int):
    parent[key] = value
  else:
    setattr(parent, key, value)


def quantize_model(model: nnx.Module, *, embeddings: bool = True
                   ) -> nnx.Module:
  """Replaces, in place, every `nnx.Linear` / `nnx.LinearGeneral` of
  ``model`` by an `Int8Linear` and (``embeddings``) every `nnx.Embed` by an
  `Int8Embed` (module docstring). Returns the model.

  Raises:
    ValueError: a LinearGeneral with batch axes or non-trailing contracted
      axes; the model itself a Linear / Embed (quantise its parent).
  """
  found = []
  for path, module in nnx.iter_modules(model):
    if isinstance(module, (nnx.Linear, nnx.LinearGeneral)):
      found.append((path, Int8Linear.from_linear(module)))
    elif embeddings and isinstance(module, nnx.Embed):
      found.append((path, Int8Embed.from_embed(module)))
  for path, new in found:
    if not path:
      raise ValueError("quantize_model: pass the model containing the "
                       f"{type(model).__name__}, not the layer itself")
    parent = model
    for key in path[:-1]:
      parent = _child(parent, key)
    _set_child(parent, path[-1], new)
  return model


def is_quantized(model: nnx.Module) -> bool:
  """Whether the model has int8 layers (from `quantize_model`)."""
  return any(isinstance(m, (Int8Linear, Int8Embed))
             for _, m in nnx.iter_modules(model))


def param_bytes(model: nnx.Module) -> dict[str, int]:
  """{dtype name: bytes} of the model's ``nnx.Param`` leaves."""
  out: dict[str, int] = {}
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    if hasattr(leaf, "dtype"):
      name = str(jnp.dtype(leaf.dtype))
      out[name] = out.get(name, 0) + int(np.prod(np.shape(leaf))) * \
          jnp.dtype(leaf.dtype).itemsize
  return out


__all__ = ["INT8_MAX", "Int8Embed", "Int8Linear", "dequantize",
           "is_quantized", "param_bytes", "quantize_int8", "quantize_model"]
