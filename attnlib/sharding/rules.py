"""Logical axis rules: any model of `attnlib.models` on a mesh, by layout name.

The parameters of `attnlib.models` carry logical axis names as metadata
("vocab", "embed", "mlp" in the models; "heads", "kv_heads", "head_dim" in
the attention layers). A *layout* is a set of rules mapping these names onto
the ("x", "y", "z") mesh axes of `attnlib.sharding.mesh`, so that one
argument places a whole model:

  sharded = shard_model(model, mesh, "ws2d")       # params placed in place
  logits = sharded(tokens)                         # jax.jit, NamedShardings
  cache = sharded.init_cache(batch, max_len)       # sharded like the layout
  logits, cache = sharded.decode(prompt, cache)

Weight layouts (the feedforward layouts of Pope et al. 2022, §3.2, named as
in `attnlib.sharding.feedforward`; the attention projections and the vocab
follow the feedforward hidden dimension F, as the paper shards heads like F):

  layout   embed ("embed")  F-like ("mlp", "heads", "vocab")  batch
  ws1d     -                x, y, z                           -
  ws2d     x                y, z                              -
  wg_x     x                y, z                              x
  wg_xy    x                y, z                              x, y
  wg_xyz   x                y, z                              x, y, z

The weight-gathered layouts *store* the weights as 2D weight-stationary
(``E_x F_yz``) and shard the activations (the model's input and output, and
the caches) over batch on the gathered axes; under plain `jax.jit` XLA's
partitioner chooses the collectives (the explicit programs are
`attnlib.sharding.feedforward.ffn_shard_map` and
`attnlib.sharding.attention`).

Attention layouts (§3.3) decide "kv_heads" and the decoding caches:

* ``"heads"`` (multi-head): "kv_heads" is sharded like "heads"; the caches
  are sharded over heads on every mesh axis the layout's batch does not use
  (KV cache [B, S, Hkv, D] over Hkv; a linear state [B, H, K, D] and an
  Aaren state over H), and over batch on the batch axes.
* ``"batch_kv"`` (multi-query / grouped-query): the key/value projections
  are replicated ("kv_heads" -> no axis) and every cache is sharded over
  batch on all mesh axes: the paper's trick, which splits the (small, shared)
  multi-query KV cache over chips instead of replicating it per head shard.
* ``"auto"`` (default): "heads" when every attention layer has
  num_kv_heads == num_heads, else "batch_kv".

The rules are `nnx.logical_axis_rules` rules; `model_shardings` reads each
variable's PartitionSpec with ``nnx.get_partition_spec`` under them and
checks that every sharded dimension divides its mesh axes. Checkpoints
written under one mesh restore under another with `restore_sharded`
(orbax restores each array straight into the new layout's sharding).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from attnlib.decoding import cache as _cache
from attnlib.nn.attention import Attention
from attnlib.ops.attention_scan import AttentionScanState

AXES = ("x", "y", "z")
LAYOUTS = ("ws1d", "ws2d", "wg_x", "wg_xy", "wg_xyz")
ATTENTION_LAYOUTS = ("heads", "batch_kv")

# layout -> (embed axes, F-like axes, batch axes)
_LAYOUT_AXES = {
    "ws1d": ((), AXES, ()),
    "ws2d": (("x",), ("y", "z"), ()),
    "wg_x": (("x",), ("y", "z"), ("x",)),
    "wg_xy": (("x",), ("y", "z"), ("x", "y")),
    "wg_xyz": (("x",), ("y", "z"), AXES),
}

# Logical names the rules map (every name the models use).
LOGICAL_NAMES = ("batch", "vocab", "embed", "mlp", "heads", "kv_heads",
                 "head_dim")


def check_layout(layout: Any) -> str:
  """The layout name, or ValueError naming the known ones."""
  if layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
  return layout


def check_attention_layout(attention: Any, *, allow_auto: bool = True) -> str:
  """The attention layout name, or ValueError naming the known ones."""
  names = ATTENTION_LAYOUTS + (("auto",) if allow_auto else ())
  if attention not in names:
    raise ValueError(f"unknown attention layout {attention!r}; expected one "
                     f"of {names}")
  return attention


def _present(mesh_axes: Sequence[str], axes: Sequence[str]) -> tuple[str, ...]:
  """The axes that the mesh has (absent ones count as size 1)."""
  return tuple(a for a in axes if a in mesh_axes)


def _entry(axes: tuple[str, ...]):
  """A PartitionSpec entry: None, one axis name or a tuple of them."""
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else axes


def layout_axes(layout: str, mesh: Mesh | None = None
                ) -> dict[str, tuple[str, ...]]:
  """{"embed", "feature", "batch"} -> the mesh axes of `layout` (restricted
  to the axes `mesh` has, when given)."""
  check_layout(layout)
  names = AXES if mesh is None else tuple(mesh.axis_names)
  emb, feat, batch = _LAYOUT_AXES[layout]
  return {"embed": _present(names, emb), "feature": _present(names, feat),
          "batch": _present(names, batch)}


def logical_axis_rules(layout: str, attention: str = "heads",
                       mesh: Mesh | None = None
                       ) -> tuple[tuple[str, Any], ...]:
  """The `nnx.logical_axis_rules` of a layout: (logical name, mesh axes).

  ``attention`` is "heads" or "batch_kv" (see the module docstring); "batch"
  is the activations' batch (not a parameter name). With ``mesh``, axes the
  mesh lacks are dropped.

  Raises:
    ValueError: unknown layout or attention layout ("auto" needs a model:
      see `resolve_attention`).
  """
  ax = layout_axes(layout, mesh)
  check_attention_layout(attention, allow_auto=False)
  feat = _entry(ax["feature"])
  return (("batch", _entry(ax["batch"])), ("vocab", feat),
          ("embed", _entry(ax["embed"])), ("mlp", feat), ("heads", feat),
          ("kv_heads", feat if attention == "heads" else None),
          ("head_dim", None))


def attention_layers(model: nnx.Module) -> list[Attention]:
  """The `attnlib.nn.Attention` layers of a model (graph order)."""
  return [m for _, m in nnx.iter_modules(model) if isinstance(m, Attention)]


def resolve_attention(model: nnx.Module, attention: str = "auto") -> str:
  """"auto" -> "heads" if every attention layer is multi-head
  (num_kv_heads == num_heads; also for models without such layers), else
  "batch_kv"; other names are checked and returned."""
  check_attention_layout(attention)
  if attention != "auto":
    return attention
  layers = attention_layers(model)
  mqa = any(l.num_kv_heads < l.num_heads for l in layers)
  return "batch_kv" if mqa else "heads"


def _mesh_sizes(mesh: Mesh) -> dict[str, int]:
  return {a: int(s) for a, s in mesh.shape.items()}


def _spec_axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def check_divisible(what: str, shape: Sequence[int], spec: P, mesh: Mesh,
                    names: Sequence[Any] | None = None) -> None:
  """ValueError unless every dimension of `shape` divides the product of the
  mesh axes `spec` shards it over. ``names`` (logical names per dimension)
  make the message say e.g. "more shards (8) than kv_heads (2)"."""
  sizes = _mesh_sizes(mesh)
  for d, entry in enumerate(tuple(spec)):
    axes = _spec_axes(entry)
    n = math.prod(sizes.get(a, 1) for a in axes)
    if n > 1 and shape[d] % n:
      name = names[d] if names is not None and d < len(names) else None
      label = f" ({name})" if name else ""
      extra = ""
      if name in ("heads", "kv_heads", "cache heads") and shape[d] < n:
        extra = (f": more shards ({n}) than {name} ({shape[d]}) for head "
                 "sharding")
      raise ValueError(
          f"{what}: dimension {d}{label} of size {shape[d]} (shape "
          f"{tuple(shape)}) is not divisible by mesh axes {axes} of total "
          f"size {n}{extra}")


def _path_str(path) -> str:
  parts = []
  for e in path:
    for attr in ("key", "name", "idx"):
      if hasattr(e, attr):
        parts.append(str(getattr(e, attr)))
        break
    else:
      parts.append(str(e))
  return "/".join(p for p in parts if p != "value")


def _logical_names(var: Any) -> tuple | None:
  if isinstance(var, nnx.Variable):
    names = var.get_metadata().get("out_sharding")
    return tuple(names) if names else None
  return None


def state_partition_specs(state: Any, rules: Sequence[tuple[str, Any]]) -> Any:
  """``nnx.get_partition_spec(state)`` under the rules (a State of P)."""
  with nnx.logical_axis_rules(tuple(rules)):
    return nnx.get_partition_spec(state)


def model_shardings(model: nnx.Module, mesh: Mesh, layout: str = "ws1d", *,
                    attention: str = "auto") -> Any:
  """The NamedShardings of ``nnx.state(model)`` under the layout's rules.

  Returns an ``nnx.State`` of the model's structure whose values are
  `NamedSharding`s (variables without logical names are replicated).

  Raises:
    ValueError: unknown layout names; a dimension not divisible by the
      mesh axes it maps to (e.g. more shards than heads or kv_heads).
  """
  attention = resolve_attention(model, attention)
  rules = logical_axis_rules(layout, attention, mesh)
  state = nnx.state(model)
  specs = state_partition_specs(state, rules)
  var_leaves = jax.tree_util.tree_leaves_with_path(
      state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  spec_leaves = jax.tree_util.tree_leaves(
      specs, is_leaf=lambda x: isinstance(x, nnx.Variable))
  for (path, var), spec_var in zip(var_leaves, spec_leaves):
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    spec = (spec_var.get_value() if isinstance(spec_var, nnx.Variable)
            else spec_var)
    if hasattr(value, "shape") and isinstance(spec, P):
      check_divisible(f"layout {layout!r}, attention {attention!r}: parameter "
                      f"{_path_str(path)}", value.shape, spec, mesh,
                      _logical_names(var))
  return jax.tree.map(lambda p: NamedSharding(mesh, p), specs)


# ---------------------------------------------------------------- caches


def cache_axes(layout: str, attention: str, mesh: Mesh
               ) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(batch axes, head axes) of the decoding caches (module docstring)."""
  check_attention_layout(attention, allow_auto=False)
  names = tuple(mesh.axis_names)
  if attention == "batch_kv":
    return _present(names, AXES), ()
  batch = layout_axes(layout, mesh)["batch"]
  return batch, tuple(a for a in _present(names, AXES) if a not in batch)


def cache_partition_specs(cache: Any, batch_axes: Sequence[str],
                          head_axes: Sequence[str]) -> Any:
  """PartitionSpecs of one layer's cache (or a tuple of them): batch (dim 0)
  over ``batch_axes``, heads over ``head_axes`` (KVCache / WindowCache k, v
  [B, S, Hkv, D]: dim 2; LinearCache state [B, H, K, D] and ScanCache m, u
  [B, H], w [B, H, D]: dim 1); ``length`` replicated.

  Raises:
    ValueError: not a cache of attnlib.decoding.cache.
  """
  b, h = _entry(tuple(batch_axes)), _entry(tuple(head_axes))
  if isinstance(cache, (tuple, list)):
    return type(cache)(cache_partition_specs(c, batch_axes, head_axes)
                       for c in cache)
  if isinstance(cache, (_cache.KVCache, _cache.WindowCache)):
    kv = P(b, None, h, None)
    return cache.replace(k=kv, v=kv, length=P())
  if isinstance(cache, _cache.LinearCache):
    return cache.replace(state=P(b, h, None, None), length=P())
  if isinstance(cache, _cache.ScanCache):
    return cache.replace(state=AttentionScanState(m=P(b, h), u=P(b, h),
                                                  w=P(b, h, None)),
                         length=P())
  raise ValueError(f"cache of type {type(cache).__name__}: expected a "
                   "KVCache, WindowCache, LinearCache or ScanCache (or a tuple "
                   "of them)")


def _cache_names(cache: Any, spec: Any) -> Any:
  """Per-leaf logical names for the divisibility messages."""
  def names(c):
    if isinstance(c, (_cache.KVCache, _cache.WindowCache)):
      kv = ("batch", None, "cache heads", None)
      return c.replace(k=kv, v=kv, length=())
    if isinstance(c, _cache.LinearCache):
      return c.replace(state=("batch", "cache heads", None, None), length=())
    return c.replace(state=AttentionScanState(
        m=("batch", "cache heads"), u=("batch", "cache heads"),
        w=("batch", "cache heads", None)), length=())
  del spec
  if isinstance(cache, (tuple, list)):
    return type(cache)(names(c) for c in cache)
  return names(cache)


def cache_shardings(cache: Any, mesh: Mesh, layout: str = "ws1d", *,
                    attention: str = "heads") -> Any:
  """NamedShardings of a cache (`TransformerLM.init_cache`'s tuple or one
  layer's cache) for the layout and attention layout ("heads" or
  "batch_kv"; resolve "auto" with `resolve_attention`).

  Raises:
    ValueError: unknown names; batch or heads not divisible by their mesh
      axes (more shards than heads for head sharding).
  """
  check_layout(layout)
  batch_axes, head_axes = cache_axes(layout, attention, mesh)
  specs = cache_partition_specs(cache, batch_axes, head_axes)
  is_p = lambda x: isinstance(x, P)  # noqa: E731
  names = _cache_names(cache, specs)
  treedef = jax.tree.structure(cache)
  for (path, leaf), spec, nm in zip(
      jax.tree_util.tree_leaves_with_path(cache),
      treedef.flatten_up_to(specs), treedef.flatten_up_to(names)):
    check_divisible(f"layout {layout!r}, attention {attention!r}: cache "
                    f"{jax.tree_util.keystr(path)}", np.shape(leaf), spec,
                    mesh, nm)
  return jax.tree.map(lambda p: NamedSharding(mesh, p), specs, is_leaf=is_p)


def input_sharding(mesh: Mesh, layout: str, shape: Sequence[int]
                   ) -> NamedSharding:
  """The sharding of a model input (tokens [B, T], x [B, T, F], images ...):
  dim 0 over the layout's batch axes, the rest replicated.

  Raises:
    ValueError: unknown layout, or the batch not divisible by those axes.
  """
  batch = layout_axes(layout, mesh)["batch"]
  spec = P(_entry(batch), *([None] * (len(shape) - 1)))
  check_divisible(f"layout {layout!r}: input", tuple(shape), spec, mesh,
                  ("batch",))
  return NamedSharding(mesh, spec)


# ----------------------------------------------------------------- models


class ShardedModel:
  """A model placed on a mesh by `shard_model`, with jitted entry points.

  ``model`` is the same object that was passed (its arrays now live on the
  mesh); the entry points read ``nnx.state(model)`` at every call, so later
  in-place updates (e.g. `restore_sharded`) are seen.

  * ``__call__(inputs)``: the model's forward (inputs batch-sharded as the
    layout says);
  * ``init_cache(batch, max_len=None)``: the model's empty cache, placed
    with `cache_shardings`;
  * ``decode(inputs, cache)``: the model's ``decode`` (the new cache keeps
    its shardings).
  """

  def __init__(self, model: nnx.Module, mesh: Mesh, layout: str,
               attention: str):
    self.model, self.mesh = model, mesh
    self.layout, self.attention = layout, attention
    self.graphdef = nnx.graphdef(model)
    self.shardings = model_shardings(model, mesh, layout, attention=attention)
    graphdef = self.graphdef
    self._forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    self._decode = {}

  @property
  def rules(self) -> tuple[tuple[str, Any], ...]:
    return logical_axis_rules(self.layout, self.attention, self.mesh)

  def _out_sharding(self, ndim: int) -> NamedSharding:
    batch = layout_axes(self.layout, self.mesh)["batch"]
    return NamedSharding(self.mesh, P(_entry(batch), *([None] * (ndim - 1))))

  def put_inputs(self, inputs: Any) -> jax.Array:
    return jax.device_put(inputs, input_sharding(self.mesh, self.layout,
                                                 np.shape(inputs)))

  def __call__(self, inputs: Any) -> jax.Array:
    return self._forward(nnx.state(self.model), self.put_inputs(inputs))

  def cache_shardings(self, cache: Any) -> Any:
    return cache_shardings(cache, self.mesh, self.layout,
                           attention=self.attention)

  def init_cache(self, batch: int, max_len: int | None = None) -> Any:
    cache = self.model.init_cache(batch, max_len)
    return jax.device_put(cache, self.cache_shardings(cache))

  def decode(self, inputs: Any, cache: Any) -> tuple[jax.Array, Any]:
    inputs = self.put_inputs(inputs)
    cache_sh = self.cache_shardings(cache)
    key = (np.ndim(inputs), jax.tree.structure(cache))
    if key not in self._decode:
      graphdef = self.graphdef

      def step(state, x, c):
        return nnx.merge(graphdef, state).decode(x, c)

      out_ndim = np.ndim(inputs) if np.ndim(inputs) >= 3 else 3
      self._decode[key] = jax.jit(
          step, out_shardings=(self._out_sharding(out_ndim), cache_sh))
    return self._decode[key](nnx.state(self.model), inputs, cache)

  def lower(self, inputs: Any):
    """``jax.jit(forward).lower`` (for HLO inspection)."""
    return self._forward.lower(nnx.state(self.model), self.put_inputs(inputs))


def shard_model(model: nnx.Module, mesh: Mesh, layout: str = "ws1d", *,
                attention: str = "auto") -> ShardedModel:
  """Places ``model``'s variables on ``mesh`` under the layout's rules (in
  place: ``nnx.update`` with the device_put state) and returns a
  `ShardedModel` with jitted forward / init_cache / decode.

  Works for every model of `attnlib.models` (TransformerLM, AarenModel,
  NAT: any nnx.Module whose variables carry logical names from
  LOGICAL_NAMES; others are replicated).

  Raises:
    ValueError: unknown layout or attention layout; a parameter dimension
      not divisible by its mesh axes (e.g. more shards than kv heads with
      attention="heads").
  """
  attention = resolve_attention(model, attention)
  check_layout(layout)
  shardings = model_shardings(model, mesh, layout, attention=attention)
  state = jax.device_put(nnx.state(model), shardings)
  nnx.update(model, state)
  return ShardedModel(model, mesh, layout, attention)


# ------------------------------------------------------------ checkpoints


def abstract_state(model: nnx.Module, mesh: Mesh, layout: str = "ws1d", *,
                   attention: str = "auto") -> dict:
  """The model's state as a pure dict of ``jax.ShapeDtypeStruct`` carrying
  the layout's NamedShardings: an orbax restore target that reshards.

  Typed PRNG keys appear as their uint32 key data (as
  `attnlib.training.Checkpointer` stores them).
  """
  shardings = nnx.to_pure_dict(model_shardings(model, mesh, layout,
                                               attention=attention))
  pure = nnx.to_pure_dict(nnx.state(model))

  def leaf(x, sharding):
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype,
                                                   jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

  return jax.tree.map(leaf, pure, shardings)


def restore_sharded(checkpoint: Any, model: nnx.Module, mesh: Mesh,
                    layout: str = "ws1d", *, attention: str = "auto",
                    step: int | None = None) -> ShardedModel:
  """Restores a model checkpoint written under any mesh into ``model``
  placed with ``layout`` on ``mesh`` (orbax reads each array straight into
  its new sharding), and returns the `ShardedModel`.

  Args:
    checkpoint: an `attnlib.training.Checkpointer` (its item "model" at
      ``step``, default the latest), or the path of a checkpoint written by
      ``ocp.StandardCheckpointer().save(path, nnx.to_pure_dict(nnx.state(
      model)))``.
    model: a model of the saved structure (e.g. a fresh one; its values are
      replaced).
    mesh, layout, attention: the target placement (as `shard_model`).
    step: Checkpointer only.

  Raises:
    ValueError: no checkpoint at step; structure, shape or dtype mismatch
      (from orbax); a layout that does not divide the model.
  """
  import orbax.checkpoint as ocp  # noqa: PLC0415 (heavy import)

  target = abstract_state(model, mesh, layout, attention=attention)
  if isinstance(checkpoint, (str, os.PathLike)):
    with ocp.StandardCheckpointer() as ckptr:
      restored = ckptr.restore(os.fspath(checkpoint), target)
  else:
    manager = checkpoint.manager
    if step is None:
      step = manager.latest_step()
    if step is None or step not in manager.all_steps():
      raise ValueError(f"restore_sharded: no checkpoint at step {step!r} in "
                       f"{checkpoint.directory}")
    restored = manager.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(target)))["model"]
  like = nnx.to_pure_dict(nnx.state(model))

  def unsave(r, l):
    if isinstance(l, jax.Array) and jnp.issubdtype(l.dtype,
                                                   jax.dtypes.prng_key):
      return jax.random.wrap_key_data(r, impl=jax.random.key_impl(l))
    return r

  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, jax.tree.map(unsave, restored, like))
  nnx.update(model, state)
  return ShardedModel(model, mesh, check_layout(layout),
                      resolve_attention(model, attention))


__all__ = [
    "AXES", "ATTENTION_LAYOUTS", "LAYOUTS", "LOGICAL_NAMES", "ShardedModel",
    "abstract_state", "attention_layers", "cache_axes",
    "cache_partition_specs", "cache_shardings", "check_attention_layout",
    "check_divisible", "check_layout", "input_sharding", "layout_axes",
    "logical_axis_rules", "model_shardings", "resolve_attention",
    "restore_sharded", "shard_model", "state_partition_specs",
]
