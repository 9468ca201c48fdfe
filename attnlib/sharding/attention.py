"""Attention layouts of Pope et al. (2022), §3.3, as shard_map programs.

An `attnlib.nn.Attention` layer (any kind: softmax, sliding_window, linear,
sigmoid with a fixed bias, aaren) sharded over the n chips of the mesh axes
of size > 1 (A = those axes in mesh order, e.g. xyz), for the prefill (the
layer's ``__call__`` on a whole sequence) and for decoding (``decode`` of a
chunk against a sharded cache). Both take and return activations ``BTE_A``
(the model dimension split over all chips, as between the layers of the
1D / 2D weight-stationary feedforward layouts of
`attnlib.sharding.feedforward`), with B the batch and T the tokens of the
call (the prompt for a prefill, 1 for a decode step).

* ``"heads"`` (multi-head attention sharded over heads; the paper's
  baseline): ``BTE_A --all-gather(A)--> BTE``; every chip computes q, k, v
  of its H/n query heads and Hkv/n key/value heads (``W_q E H_A D``,
  ``W_k, W_v E Hkv_A D``), attends over its heads' cache shard (KV cache
  ``[B, S, Hkv_A, D]``; linear / Aaren states ``[B, H_A, ...]``) and applies
  its rows of ``W_o H_A D E``: partial sums ``BTE`` --reduce-scatter(A)-->
  ``BTE_A``. Needs Hkv divisible by n: with multi-query (Hkv = 1) every
  chip would have to hold the whole KV cache, which is what the next layout
  avoids.
* ``"batch_kv"`` (multi-query / grouped-query attention with the KV cache
  sharded over batch; the paper's key trick, §3.3):
  ``BTE_A --all-gather(A)--> BTE``; q is computed head-sharded as above
  (``BTH_A D``), while k and v come from the chip's own batch rows and the
  (small, replicated) ``W_k, W_v``: ``B_A T Hkv D``. One all-to-all
  reshards q from heads to batch (``BTH_A D -> B_A T H D``), the chip
  attends over its batch rows of the cache (KV cache ``[B_A, S, Hkv, D]``,
  states ``[B_A, H, ...]``) with all heads, a second all-to-all reshards the
  output back (``B_A T H D -> BTH_A D``) for ``W_o H_A D E`` and the
  reduce-scatter. The KV cache is then split n ways instead of replicated
  n / Hkv times; the price is two all-to-alls of the (small, per-token) q
  and output. The per-head parameters other than the q / o projections
  (linear decay rates or gates, the Aaren query, the output norm) are
  replicated, and an Aaren layer (a learned query, no q projection) needs
  only the output all-to-all.

`attention_collectives` lists exactly the collectives the programs run, per
chip, in the ring convention of `attnlib.sharding.feedforward.Collective`;
tests/sharding/test_attention_layouts.py checks them against the compiled
HLO. The KV cache itself never moves: the communication does not grow with
the context length, only the KV cache memory per chip does (S * Hkv * D / n
per sequence with "batch_kv" at B >= n).

Example (8 devices, a multi-query layer)::

  mesh = make_mesh(MeshConfig(x=2, y=2, z=2))
  sharded = ShardedAttention(layer, mesh, "batch_kv")
  y = sharded(x)                                 # == layer(x)
  cache = sharded.init_cache(batch=8, max_len=64)
  y, cache = sharded.decode(x_prompt, cache)     # == layer.decode(...)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from attnlib.nn.attention import Attention
from attnlib.nn.attention import _attend
from attnlib.nn.attention import apply_rope
from attnlib.sharding import rules as _rules
from attnlib.sharding.feedforward import Collective
from attnlib.sharding.feedforward import ring_bytes

LAYOUTS = ("heads", "batch_kv")
AXES = ("x", "y", "z")


def check_layout(layout: Any) -> str:
  if layout not in LAYOUTS:
    raise ValueError(f"unknown attention layout {layout!r}; expected one of "
                     f"{LAYOUTS}")
  return layout


def default_layout(num_heads: int, num_kv_heads: int) -> str:
  """"heads" for multi-head attention, "batch_kv" for multi-query / GQA."""
  return "heads" if num_kv_heads == num_heads else "batch_kv"


def shard_axes(mesh_shape: dict[str, int]) -> tuple[str, ...]:
  """The axes the programs shard over: the mesh axes of size > 1, in order."""
  return tuple(a for a, s in mesh_shape.items() if int(s) > 1)


def _entry(axes: tuple[str, ...]):
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else axes


def check_dims(layout: str, *, n: int, embed_dim: int, num_heads: int,
               num_kv_heads: int, batch: int | None = None) -> None:
  """ValueError unless the layout divides the layer over n chips: E and H
  divisible by n; "heads": Hkv divisible by n (not more shards than kv
  heads); "batch_kv": the batch divisible by n."""
  check_layout(layout)
  where = f"attention layout {layout!r} over {n} chips"
  if embed_dim % n:
    raise ValueError(f"{where}: embed_dim={embed_dim} is not divisible by "
                     f"{n}")
  if num_heads % n:
    more = " (more shards than heads)" if num_heads < n else ""
    raise ValueError(f"{where}: num_heads={num_heads} is not divisible by "
                     f"{n}{more}")
  if layout == "heads" and num_kv_heads % n:
    more = (f": more shards ({n}) than kv heads ({num_kv_heads}) for head "
            "sharding; use 'batch_kv' (the KV cache sharded over batch)"
            if num_kv_heads < n else "")
    raise ValueError(f"{where}: num_kv_heads={num_kv_heads} is not divisible "
                     f"by {n}{more}")
  if layout == "batch_kv" and batch is not None and batch % n:
    raise ValueError(f"{where}: batch={batch} is not divisible by {n} (the "
                     "KV cache is sharded over batch)")


def attention_collectives(layout: str, *, batch: int, tokens: int,
                          embed_dim: int, num_heads: int, num_kv_heads: int,
                          head_dim: int, mesh_shape: dict[str, int],
                          dtype_bytes: int, kind: str = "softmax"
                          ) -> list[Collective]:
  """The exact per-chip collectives of one `ShardedAttention` call.

  For a prefill of ``tokens`` = T tokens per sequence (not B * T) or a
  decode step of T new tokens (the same list: the cache never moves),
  ``batch`` = B
  sequences, E = embed_dim, H = num_heads, D = head_dim, b = dtype_bytes
  (the activations' dtype), over the n chips of the mesh axes of size > 1
  (A), ring(kind, buf) as `attnlib.sharding.feedforward.ring_bytes`:

  * "heads":    all-gather(A) of x,  ring(B T E b)  [the gathered BTE];
                reduce-scatter(A) of the output, ring(B T E b).
  * "batch_kv": all-gather(A) ring(B T E b);
                all-to-all(A) of q,  ring(B T H D b / n) [q's local BTH_A D]
                (not for kind="aaren", whose query is a parameter);
                all-to-all(A) of the attention output, ring(B T H D b / n);
                reduce-scatter(A) ring(B T E b).

  So per chip "batch_kv" adds 2 (n-1)/n * B T H D b / n bytes (q and the
  output: small, per token) to the 2 (n-1)/n * B T E b of the weight-
  stationary activations; nothing depends on the context length. No
  collectives at all when n = 1.

  Raises:
    ValueError: unknown layout, a non-positive size, or dimensions the
      layout cannot divide (see `check_dims`).
  """
  check_layout(layout)
  for name, value in (("batch", batch), ("tokens", tokens),
                      ("embed_dim", embed_dim), ("num_heads", num_heads),
                      ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                      ("dtype_bytes", dtype_bytes)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"attention_collectives: {name} must be a positive "
                       f"int, got {value!r}")
  shape = {a: int(mesh_shape.get(a, 1)) for a in AXES}
  axes = shard_axes(shape)
  n = math.prod(shape[a] for a in axes)
  check_dims(layout, n=n, embed_dim=embed_dim, num_heads=num_heads,
             num_kv_heads=num_kv_heads, batch=batch)
  if n == 1:
    return []
  act = batch * tokens * embed_dim * dtype_bytes
  out = [Collective("all-gather", axes, ring_bytes("all-gather", act, n))]
  if layout == "batch_kv":
    local_q = batch * tokens * num_heads * head_dim * dtype_bytes // n
    a2a = Collective("all-to-all", axes, ring_bytes("all-to-all", local_q, n))
    out += [a2a] if kind == "aaren" else [a2a, a2a]
  out.append(Collective("reduce-scatter", axes,
                        ring_bytes("reduce-scatter", act, n)))
  return out


def _is_path(path: tuple, *names: str) -> bool:
  keys = tuple(str(getattr(e, "key", getattr(e, "name", e))) for e in path)
  keys = tuple(k for k in keys if k != "value")
  return keys[:len(names)] == names


class ShardedAttention:
  """One `attnlib.nn.Attention` layer as a shard_map program (module doc).

  Args:
    layer: a causal or non-causal layer (decoding needs a causal one).
    mesh: a mesh (e.g. `attnlib.sharding.mesh.make_mesh`); the programs
      shard over its axes of size > 1.
    layout: "heads", "batch_kv", or None for `default_layout` of the layer.

  The layer's parameters are read at every call (``nnx.state(layer)``),
  placed with `param_specs` (pass ``params=put_params()`` to avoid the
  re-placement). Inputs x [B, T, E] are cast to the layer's dtype and placed
  ``P(None, None, A)``.

  Raises:
    ValueError: unknown layout; E, H or (heads) Hkv not divisible by n;
      (batch_kv, at call / init_cache) B not divisible by n.
  """

  def __init__(self, layer: Attention, mesh: Mesh, layout: str | None = None):
    if not isinstance(layer, Attention):
      raise ValueError("ShardedAttention: layer must be an attnlib.nn."
                       f"Attention, got {type(layer).__name__}")
    if layout is None:
      layout = default_layout(layer.num_heads, layer.num_kv_heads)
    self.layout = check_layout(layout)
    self.layer, self.mesh = layer, mesh
    self.mesh_shape = {a: int(s) for a, s in mesh.shape.items()}
    self.axes = shard_axes(self.mesh_shape)
    self.n = math.prod(self.mesh_shape[a] for a in self.axes)
    check_dims(layout, n=self.n, embed_dim=layer.embed_dim,
               num_heads=layer.num_heads, num_kv_heads=layer.num_kv_heads)
    self.graphdef = nnx.graphdef(layer)
    if layout == "heads":
      # A layer of H/n query and Hkv/n kv heads: the local program.
      n = self.n
      local = nnx.eval_shape(lambda: Attention(
          layer.embed_dim, layer.num_heads // n, layer.num_kv_heads // n,
          layer.head_dim, layer.config, rngs=nnx.Rngs(0), dtype=layer.dtype,
          param_dtype=_param_dtype(layer)))
      self.local_graphdef = nnx.graphdef(local)
    else:
      self.local_graphdef = self.graphdef
    self.param_specs = self._param_specs()
    self.x_spec = P(None, None, _entry(self.axes))
    self._jitted: dict = {}

  # -------------------------------------------------------------- specs

  def _param_specs(self) -> Any:
    state = nnx.state(self.layer)
    a = _entry(self.axes)
    if self.layout == "heads":
      rules = (("embed", None), ("heads", a), ("kv_heads", a),
               ("head_dim", None))
      return _rules.state_partition_specs(state, rules)
    # batch_kv: only the q and o projections (kernels, and the scales of an
    # int8 layer from attnlib.sharding.quant) are split over heads.
    rules = (("embed", None), ("heads", a), ("kv_heads", None),
             ("head_dim", None))
    specs = _rules.state_partition_specs(state, rules)

    def spec(path, var):
      if _is_path(path, "q") or _is_path(path, "o"):
        return var
      return var.replace(P())

    return jax.tree_util.tree_map_with_path(
        spec, specs, is_leaf=lambda x: isinstance(x, nnx.Variable))

  def cache_specs(self, cache: Any) -> Any:
    if self.layout == "heads":
      return _rules.cache_partition_specs(cache, (), self.axes)
    return _rules.cache_partition_specs(cache, self.axes, ())

  def _sharding(self, specs: Any) -> Any:
    return jax.tree.map(lambda p: NamedSharding(self.mesh, p), specs,
                        is_leaf=lambda x: isinstance(x, P))

  def put_params(self) -> Any:
    """The layer's state placed with `param_specs`."""
    return jax.device_put(nnx.state(self.layer),
                          self._sharding(self.param_specs))

  def put_inputs(self, x: Any) -> jax.Array:
    if (not hasattr(x, "shape") or len(x.shape) != 3
        or x.shape[-1] != self.layer.embed_dim):
      raise ValueError(f"ShardedAttention: x.shape={np.shape(x)}, expected "
                       f"[B, T, {self.layer.embed_dim}]")
    self._check_batch(x.shape[0])
    if self.layer.dtype is not None:
      # The projections compute in the layer's dtype anyway; casting first
      # makes the all-gather move that dtype (as attention_collectives says).
      x = jnp.asarray(x).astype(self.layer.dtype)
    return jax.device_put(x, NamedSharding(self.mesh, self.x_spec))

  def _check_batch(self, batch: int) -> None:
    layer = self.layer
    check_dims(self.layout, n=self.n, embed_dim=layer.embed_dim,
               num_heads=layer.num_heads, num_kv_heads=layer.num_kv_heads,
               batch=batch)

  def init_cache(self, batch: int, max_len: int) -> Any:
    """The layer's empty cache, sharded as the layout says."""
    self._check_batch(batch)
    cache = self.layer.init_cache(batch, max_len)
    return jax.device_put(cache, self._sharding(self.cache_specs(cache)))

  def collectives(self, batch: int, tokens: int) -> list[Collective]:
    """`attention_collectives` for this layer and mesh (calls of T =
    tokens per sequence)."""
    return attention_collectives(
        self.layout, batch=batch, tokens=tokens,
        embed_dim=self.layer.embed_dim, num_heads=self.layer.num_heads,
        num_kv_heads=self.layer.num_kv_heads, head_dim=self.layer.head_dim,
        mesh_shape=self.mesh_shape,
        dtype_bytes=jnp.dtype(self.layer.dtype or jnp.float32).itemsize,
        kind=self.layer.config.kind)

  # ------------------------------------------------------------ programs

  def _collective_fns(self):
    axes, n = self.axes, self.n
    if n == 1:
      ident = lambda v, *a, **k: v  # noqa: E731
      return ident, ident, ident, (lambda: jnp.zeros((), jnp.int32))
    ag = lambda v, axis: jax.lax.all_gather(  # noqa: E731
        v, axes, axis=axis, tiled=True)
    rs = lambda v, axis: jax.lax.psum_scatter(  # noqa: E731
        v, axes, scatter_dimension=axis, tiled=True)
    a2a = lambda v, split, concat: jax.lax.all_to_all(  # noqa: E731
        v, axes, split, concat, tiled=True)
    return ag, rs, a2a, (lambda: jax.lax.axis_index(axes))

  def _body(self, decode: bool):
    ag, rs, a2a, index = self._collective_fns()
    graphdef, local_graphdef = self.graphdef, self.local_graphdef
    n, cfg = self.n, self.layer.config
    layout = self.layout

    def heads(state, x, cache=None):
      m = nnx.merge(local_graphdef, state)
      x = ag(x, 2)                                       # BTE
      if decode:
        y, cache = m.decode(x, cache)
      else:
        y = m(x)
      y = rs(y, 2)                                       # BTE_A
      return (y, cache) if decode else y

    def batch_kv(state, x, cache=None):
      m = nnx.merge(graphdef, state)                     # q, o: local heads
      x = ag(x, 2)                                       # BTE
      b = x.shape[0] // n
      xb = jax.lax.dynamic_slice_in_dim(x, index() * b, b, axis=0)  # B_A TE
      k, v = m.k(xb), m.v(xb)                            # B_A T Hkv D
      aaren = cfg.kind == "aaren"
      q = m.query[...].astype(k.dtype) if aaren else m.q(x)   # BTH_A D
      t = x.shape[1]
      length = (cache.length.astype(jnp.int32) if decode
                else jnp.zeros((), jnp.int32))
      if cfg.rope:
        pos = length + jnp.arange(t, dtype=jnp.int32)
        q = apply_rope(q, pos, cfg.rope_theta)
        k = apply_rope(k, pos, cfg.rope_theta)
      if not aaren:
        q = a2a(q, 0, 2)                                 # B_A T H D
      decay = m.decay(xb) if cfg.kind == "linear" else None
      if not decode:
        o = _attend(cfg, q, k, v, decay=decay)
      else:
        o, cache = m._attend_cached(
            "attnlib.sharding.ShardedAttention.decode", q, k, v, cache, decay)
      if m.out_norm is not None:
        o = m.out_norm(o)
      o = a2a(o, 2, 0)                                   # BTH_A D
      y = rs(m.o(o), 2)                                  # BTE_A
      return (y, cache) if decode else y

    return heads if layout == "heads" else batch_kv

  def _program(self, decode: bool, cache: Any = None):
    key = (decode, None if cache is None else jax.tree.structure(cache))
    if key not in self._jitted:
      body = self._body(decode)
      if decode:
        cspec = self.cache_specs(cache)
        in_specs = (self.param_specs, self.x_spec, cspec)
        out_specs = (self.x_spec, cspec)
      else:
        in_specs, out_specs = (self.param_specs, self.x_spec), self.x_spec
      self._jitted[key] = jax.jit(jax.shard_map(
          body, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
          # The primitives' scans start from unsharded (invariant) zeros,
          # which the varying-manual-axes check rejects; the programs'
          # collectives are explicit, so the check adds nothing here.
          check_vma=False))
    return self._jitted[key]

  def _params(self, params: Any) -> Any:
    return self.put_params() if params is None else params

  def __call__(self, x: Any, params: Any = None) -> jax.Array:
    """The prefill / forward ``layer(x)``: x [B, T, E] -> [B, T, E]
    (sharded ``P(None, None, A)``)."""
    x = self.put_inputs(x)
    return self._program(False)(self._params(params), x)

  def decode(self, x: Any, cache: Any, params: Any = None
             ) -> tuple[jax.Array, Any]:
    """``layer.decode(x, cache)`` with the cache sharded as the layout says
    (from `init_cache`); returns (y, the new sharded cache)."""
    x = self.put_inputs(x)
    return self._program(True, cache)(self._params(params), x, cache)

  def lower(self, x: Any, cache: Any = None, params: Any = None):
    """The jitted program's ``Lowered`` (forward, or decode with a cache)."""
    x = self.put_inputs(x)
    params = self._params(params)
    if cache is None:
      return self._program(False).lower(params, x)
    return self._program(True, cache).lower(params, x, cache)


def _param_dtype(layer: Attention) -> Any:
  leaves = jax.tree.leaves(nnx.state(layer, nnx.Param))
  return leaves[0].dtype if leaves else jnp.float32


__all__ = ["LAYOUTS", "ShardedAttention", "attention_collectives",
           "check_dims", "default_layout", "shard_axes"]
