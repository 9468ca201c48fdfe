"""Feedforward (MLP) layouts of Pope et al. (2022), §3.2, on an ("x","y","z") mesh.

The block is ``y = gelu(x @ W_in) @ W_out`` (``mlp="gelu"``, weights
``w_in [E, F]``, ``w_out [F, E]``) or the SwiGLU of `attnlib.models.lm`
(``mlp="swiglu"``: ``y = (silu(x @ W_gate) * (x @ W_up)) @ W_down``, weights
``w_gate, w_up [E, F]``, ``w_down [F, E]``), applied to ``x [B, L, E]``.
Notation as in the paper: a subscript lists the mesh axes a dimension is
sharded over, e.g. ``BLE_xyz`` is E split over all chips (x-major) and
``E_x F_yz`` a weight with E split over x and F over (y, z).

Layouts (§3.2.1–3.2.3; Figure 2 of the paper; X, Y, Z = axis sizes,
n = XYZ):

* ``"ws1d"`` 1D weight-stationary: ``W_in E F_xyz``, ``W_out F_xyz E``.
  ``BLE_xyz --all-gather(xyz)--> BLE --W_in--> BLF_xyz --gelu-->
  --W_out--> BLE (partial sums) --reduce-scatter(xyz)--> BLE_xyz``.
* ``"ws2d"`` 2D weight-stationary: ``W_in E_x F_yz``, ``W_out F_yz E_x``.
  ``BLE_xyz --all-gather(yz)--> BLE_x --W_in--> BLF_yz (partial over x)
  --reduce-scatter(x)--> BLF_xyz --gelu--> --all-gather(x)--> BLF_yz
  --W_out--> BLE_x (partial over yz) --reduce-scatter(yz)--> BLE_xyz``.
  (The nonlinearity runs on the fully sharded hidden, as in the paper.)
* ``"wg_x"``, ``"wg_xy"``, ``"wg_xyz"`` weight-gathered: the weights are
  *stored* as in 2D weight-stationary (``E_x F_yz``) and all-gathered just
  before use over the gathered axes G = x / xy / xyz, while the activations
  are sharded over batch on G and over E on the remaining axes R = yz / z /
  none: ``B_G L E_R --all-gather(R)--> B_G L E``; ``W_in --all-gather(G)-->
  E F_R``, ``W_out --all-gather(G)--> F_R E``; ``--W_in--> B_G L F_R --gelu-->
  --W_out--> B_G L E (partial over R) --reduce-scatter(R)--> B_G L E_R``.
  For G = xy and xyz the weight all-gather is one collective over all of G
  (a stacked all-gather and a local transpose), so the hidden F columns a
  chip holds are a fixed permutation of F (the same for W_in and W_out,
  which is all that matters for a contracted dimension).

Axes of size 1 drop out: a collective over axes whose sizes multiply to 1 is
not performed (and not listed by `ffn_collectives`), and a Collective's
``axes`` names only the axes of size > 1, in mesh order.

`ffn_shard_map` writes each layout with `jax.shard_map` and the explicit
collectives above; `ffn_pjit` is plain `jax.jit` with the layout's
NamedShardings on inputs and output, leaving the collectives to XLA's
partitioner; `ffn_collectives` is the exact list the shard_map program runs
(checked against the compiled HLO in tests/sharding/test_feedforward.py).

Example (8 devices)::

  mesh = make_mesh(MeshConfig(x=2, y=2, z=2))
  f = ffn_shard_map("ws2d", mesh)
  y = f(x, w_in, w_out)            # == ffn_reference(x, w_in, w_out)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from attnlib.sharding.mesh import AXES, mesh_shape as _mesh_shape

LAYOUTS = ("ws1d", "ws2d", "wg_x", "wg_xy", "wg_xyz")
MLPS = ("gelu", "swiglu")
COLLECTIVE_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all")

# Gathered axes G of the weight-gathered layouts (the rest, R, shard E).
_WG_GATHER = {"wg_x": ("x",), "wg_xy": ("x", "y"), "wg_xyz": ("x", "y", "z")}


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective a chip takes part in, and the bytes it sends.

  kind: "all-gather", "reduce-scatter", "all-reduce" or "all-to-all".
  axes: the mesh axes (size > 1, mesh order) of the group of chips.
  bytes_per_chip: bytes each chip sends under ring algorithms, with n the
    group size (product of the sizes of ``axes``):
      all-gather:     (n-1)/n * the gathered (result) buffer of one chip;
      reduce-scatter: (n-1)/n * the buffer being reduced (operand) of one chip;
      all-reduce:     2(n-1)/n * the buffer of one chip (reduce-scatter then
                      all-gather);
      all-to-all:     (n-1)/n * the local buffer (one chunk stays home).
    Received bytes equal sent bytes in all four. Exact integers: every buffer
    here is a multiple of n elements.
  """

  kind: str
  axes: tuple[str, ...]
  bytes_per_chip: int


def ring_bytes(kind: str, buffer_bytes: int, n: int) -> int:
  """Bytes one chip sends for `kind` over n chips (see `Collective`).

  buffer_bytes: the gathered result (all-gather), the reduced operand
  (reduce-scatter), the buffer (all-reduce) or the local buffer (all-to-all).
  """
  if kind not in COLLECTIVE_KINDS:
    raise ValueError(f"unknown collective kind {kind!r}; expected one of "
                     f"{COLLECTIVE_KINDS}")
  if n <= 1:
    return 0
  factor = 2 if kind == "all-reduce" else 1
  # (n-1)/n exactly when buffer_bytes % n == 0 (always true for our buffers).
  return factor * (n - 1) * buffer_bytes // n


@dataclasses.dataclass(frozen=True)
class FFNSpecs:
  """PartitionSpecs of one layout: x, the weights (in call order), output."""

  x: P
  weights: tuple[P, ...]
  out: P


def _check_layout(layout: str) -> None:
  if layout not in LAYOUTS:
    raise ValueError(f"unknown feedforward layout {layout!r}; expected one of "
                     f"{LAYOUTS}")


def _check_mlp(mlp: str) -> None:
  if mlp not in MLPS:
    raise ValueError(f"unknown mlp {mlp!r}; expected one of {MLPS}")


def ffn_specs(layout: str, mlp: str = "gelu") -> FFNSpecs:
  """The layout's PartitionSpecs (x [B, L, E]; weights as `ffn_shard_map`)."""
  _check_layout(layout)
  _check_mlp(mlp)
  xyz = AXES
  if layout == "ws1d":
    x, w_in, w_out = P(None, None, xyz), P(None, xyz), P(xyz, None)
  elif layout == "ws2d":
    x, w_in, w_out = P(None, None, xyz), P("x", ("y", "z")), P(("y", "z"), "x")
  else:
    gathered = _WG_GATHER[layout]
    rest = tuple(a for a in AXES if a not in gathered)
    x = P(gathered, None, rest if rest else None)
    w_in, w_out = P("x", ("y", "z")), P(("y", "z"), "x")
  ins = (w_in, w_out) if mlp == "gelu" else (w_in, w_in, w_out)
  return FFNSpecs(x=x, weights=ins, out=x)


def ffn_shardings(layout: str, mesh: Mesh, mlp: str = "gelu"):
  """(x, weights tuple, out) NamedShardings of the layout on `mesh`."""
  s = ffn_specs(layout, mlp)
  ns = lambda spec: NamedSharding(mesh, spec)
  return ns(s.x), tuple(ns(w) for w in s.weights), ns(s.out)


def _size(shape: dict[str, int], axes: Sequence[str]) -> int:
  return math.prod(int(shape.get(a, 1)) for a in axes)


def _nontrivial(shape: dict[str, int], axes: Sequence[str]) -> tuple[str, ...]:
  return tuple(a for a in axes if int(shape.get(a, 1)) > 1)


def _need_divisible(dim: str, size: int, shape: dict[str, int],
                    axes: Sequence[str], layout: str) -> None:
  n = _size(shape, axes)
  if size % n:
    raise ValueError(
        f"layout {layout!r}: dimension {dim}={size} is not divisible by the "
        f"product of mesh axes {tuple(axes)} = {n}")


def _check_dims(layout: str, shape: dict[str, int], *, batch: int | None,
                tokens: int | None, d_model: int, d_ff: int) -> None:
  """ValueError unless every sharded dimension divides evenly."""
  if layout in ("ws1d", "ws2d"):
    _need_divisible("d_model (E)", d_model, shape, AXES, layout)
    _need_divisible("d_ff (F)", d_ff, shape, AXES, layout)
    return
  gathered = _WG_GATHER[layout]
  rest = tuple(a for a in AXES if a not in gathered)
  if batch is not None:
    _need_divisible("batch (B)", batch, shape, gathered, layout)
  if tokens is not None:
    _need_divisible("tokens (B*L)", tokens, shape, gathered, layout)
  _need_divisible("d_model (E)", d_model, shape, ("x",), layout)
  _need_divisible("d_model (E)", d_model, shape, rest, layout)
  _need_divisible("d_ff (F)", d_ff, shape, ("y", "z"), layout)


def ffn_collectives(layout: str, *, tokens: int, d_model: int, d_ff: int,
                    mesh_shape: dict[str, int], dtype_bytes: int,
                    mlp: str = "gelu") -> list[Collective]:
  """The exact per-chip collectives of ``ffn_shard_map(layout, mesh)``.

  In program order, for one FFN application to ``tokens = B * L`` tokens of
  width ``d_model`` (E) with hidden width ``d_ff`` (F), activations and
  weights of ``dtype_bytes`` bytes per element, on a mesh of
  ``mesh_shape = {"x": X, "y": Y, "z": Z}`` (missing axes count 1). Each
  entry's ``bytes_per_chip`` follows the ring convention of `Collective`:
  with N = tokens, b = dtype_bytes and ring(buf, n) = (n-1) * buf / n,

  * ws1d: all-gather(xyz) ring(N E b, XYZ); reduce-scatter(xyz) ring(N E b, XYZ).
  * ws2d: all-gather(yz) ring(N E/X b, YZ); reduce-scatter(x) ring(N F/(YZ) b, X)
    (twice for swiglu: gate and up); all-gather(x) ring(N F/(YZ) b, X);
    reduce-scatter(yz) ring(N E/X b, YZ).
  * wg_G (G = x, xy, xyz; R = the other axes): all-gather(R) ring(N/|G| E b,
    |R|); one all-gather(G) per weight, ring(E F/|R| b, |G|); reduce-scatter(R)
    ring(N/|G| E b, |R|).

  Collectives over axes of total size 1 are omitted. The paper's asymptotic
  forms (§3.2): ws1d ~ 2 N E b, ws2d ~ 2 N (E/X + F/YZ) b, weight-gathered
  ~ 2 N E b / |G| + weights / |R|; the cost model (attnlib.sharding.cost_model)
  uses this list so that model and program agree exactly.

  Raises:
    ValueError: unknown layout/mlp, or a dimension not divisible by the mesh
      axes it is sharded over.
  """
  _check_layout(layout)
  _check_mlp(mlp)
  shape = {a: int(mesh_shape.get(a, 1)) for a in AXES}
  for name, value in (("tokens", tokens), ("d_model", d_model),
                      ("d_ff", d_ff), ("dtype_bytes", dtype_bytes)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"ffn_collectives: {name} must be a positive int, got "
                       f"{value!r}")
  _check_dims(layout, shape, batch=None, tokens=tokens, d_model=d_model,
              d_ff=d_ff)
  n_, e, f, b = tokens, d_model, d_ff, dtype_bytes
  out: list[Collective] = []

  def add(kind, axes, buffer_bytes):
    axes = _nontrivial(shape, axes)
    n = _size(shape, axes)
    if n > 1:
      out.append(Collective(kind, axes, ring_bytes(kind, buffer_bytes, n)))

  if layout == "ws1d":
    add("all-gather", AXES, n_ * e * b)
    add("reduce-scatter", AXES, n_ * e * b)
  elif layout == "ws2d":
    x, yz = shape["x"], shape["y"] * shape["z"]
    add("all-gather", ("y", "z"), n_ * (e // x) * b)
    for _ in range(1 if mlp == "gelu" else 2):
      add("reduce-scatter", ("x",), n_ * (f // yz) * b)
    add("all-gather", ("x",), n_ * (f // yz) * b)
    add("reduce-scatter", ("y", "z"), n_ * (e // x) * b)
  else:
    gathered = _WG_GATHER[layout]
    rest = tuple(a for a in AXES if a not in gathered)
    g, r = _size(shape, gathered), _size(shape, rest)
    add("all-gather", rest, (n_ // g) * e * b)
    for _ in range(2 if mlp == "gelu" else 3):
      add("all-gather", gathered, e * (f // r) * b)
    add("reduce-scatter", rest, (n_ // g) * e * b)
  return out


# ----------------------------------------------------------------------------
# The computation.


def _act(h_in, h_gate, mlp):
  if mlp == "gelu":
    return jax.nn.gelu(h_in)
  return jax.nn.silu(h_gate) * h_in


def ffn_reference(x, *weights, mlp: str = "gelu",
                  precision=jax.lax.Precision.HIGHEST):
  """The unsharded FFN: gelu(x W_in) W_out, or SwiGLU (w_gate, w_up, w_down)."""
  _check_mlp(mlp)
  dot = functools.partial(jnp.einsum, precision=precision)
  if mlp == "gelu":
    w_in, w_out = weights
    h = jax.nn.gelu(dot("ble,ef->blf", x, w_in))
  else:
    w_gate, w_up, w_out = weights
    h = jax.nn.silu(dot("ble,ef->blf", x, w_gate)) * dot("ble,ef->blf", x, w_up)
  return dot("blf,fe->ble", h, w_out)


def _gather_weight(w, shape, gathered, *, e_dim):
  """All-gathers a stored ``E_x F_yz`` weight shard over the axes `gathered`.

  One collective: the x part of `gathered` restores E, the (y, z) part grows
  F; ``e_dim`` is 0 for [E, F] weights and 1 for [F, E].
  """
  axes = _nontrivial(shape, gathered)
  if not axes:
    return w
  if axes == ("x",):
    return jax.lax.all_gather(w, "x", axis=e_dim, tiled=True)
  stacked = jax.lax.all_gather(w, axes, axis=0, tiled=False)
  stacked = stacked.reshape(tuple(shape[a] for a in axes) + w.shape)
  k = len(axes)
  f_groups = [i for i, a in enumerate(axes) if a != "x"]
  x_group = [i for i, a in enumerate(axes) if a == "x"]
  e_axis, f_axis = k + e_dim, k + (1 - e_dim)
  # [x?, E_local] for E, [yz-groups..., F_local] for F.
  e_part = x_group + [e_axis]
  f_part = f_groups + [f_axis]
  perm = e_part + f_part if e_dim == 0 else f_part + e_part
  t = jnp.transpose(stacked, perm)
  e_size = math.prod(t.shape[: len(e_part)] if e_dim == 0
                     else t.shape[len(f_part):])
  f_size = t.size // e_size
  return t.reshape((e_size, f_size) if e_dim == 0 else (f_size, e_size))


def _body(layout, mlp, shape, precision):
  dot = functools.partial(jnp.einsum, precision=precision)

  def ag(v, axes, axis):
    axes = _nontrivial(shape, axes)
    return jax.lax.all_gather(v, axes, axis=axis, tiled=True) if axes else v

  def rs(v, axes, axis):
    axes = _nontrivial(shape, axes)
    if not axes:
      return v
    return jax.lax.psum_scatter(v, axes, scatter_dimension=axis, tiled=True)

  def body(x, *weights):
    w_ins, w_out = weights[:-1], weights[-1]   # (w_in,) or (w_gate, w_up)
    if layout == "ws1d":
      x = ag(x, AXES, 2)                                    # BLE
      hs = [dot("ble,ef->blf", x, w) for w in w_ins]        # BLF_xyz
      h = _act(hs[-1], hs[0], mlp)
      return rs(dot("blf,fe->ble", h, w_out), AXES, 2)      # BLE_xyz
    if layout == "ws2d":
      x = ag(x, ("y", "z"), 2)                              # BLE_x
      hs = [rs(dot("ble,ef->blf", x, w), ("x",), 2)         # BLF_xyz
            for w in w_ins]
      h = ag(_act(hs[-1], hs[0], mlp), ("x",), 2)           # BLF_yz
      return rs(dot("blf,fe->ble", h, w_out), ("y", "z"), 2)  # BLE_xyz
    gathered = _WG_GATHER[layout]
    rest = tuple(a for a in AXES if a not in gathered)
    x = ag(x, rest, 2)                                      # B_G L E
    w_ins = [_gather_weight(w, shape, gathered, e_dim=0) for w in w_ins]
    w_out = _gather_weight(w_out, shape, gathered, e_dim=1)  # F_R E
    hs = [dot("ble,ef->blf", x, w) for w in w_ins]          # B_G L F_R
    h = _act(hs[-1], hs[0], mlp)
    return rs(dot("blf,fe->ble", h, w_out), rest, 2)        # B_G L E_R

  return body


def _check_args(layout, mlp, shape, x, weights):
  n_w = 2 if mlp == "gelu" else 3
  if len(weights) != n_w:
    raise ValueError(f"mlp={mlp!r} takes x and {n_w} weights, got "
                     f"{len(weights)} weights")
  if x.ndim != 3:
    raise ValueError(f"x must be [B, L, E], got shape {x.shape}")
  b, _, e = x.shape
  f = weights[0].shape[1]
  for w in weights[:-1]:
    if w.shape != (e, f):
      raise ValueError(f"input weights must be [E, F] = {(e, f)}, got "
                       f"{w.shape}")
  if weights[-1].shape != (f, e):
    raise ValueError(f"output weight must be [F, E] = {(f, e)}, got "
                     f"{weights[-1].shape}")
  _check_dims(layout, shape, batch=b, tokens=None, d_model=e, d_ff=f)


def ffn_shard_map(layout: str, mesh: Mesh, *, mlp: str = "gelu",
                  precision=jax.lax.Precision.HIGHEST) -> Callable:
  """The layout as a jitted `jax.shard_map` program with explicit collectives.

  Returns ``f(x, w_in, w_out)`` (``f(x, w_gate, w_up, w_down)`` for
  ``mlp="swiglu"``) on global arrays; the result is sharded as
  ``ffn_specs(layout).out``. Inputs already placed with `ffn_shardings` run
  with exactly the collectives of `ffn_collectives`; other placements make
  XLA reshard them first.

  Raises:
    ValueError: unknown layout/mlp (at once); a dimension not divisible by its
      mesh axes, or wrong shapes (at call).
  """
  _check_layout(layout)
  _check_mlp(mlp)
  shape = _mesh_shape(mesh)
  specs = ffn_specs(layout, mlp)
  mapped = jax.shard_map(_body(layout, mlp, shape, precision), mesh=mesh,
                         in_specs=(specs.x,) + specs.weights,
                         out_specs=specs.out)
  jitted = jax.jit(mapped)

  @functools.wraps(jitted)
  def f(x, *weights):
    _check_args(layout, mlp, shape, x, weights)
    return jitted(x, *weights)

  f.jitted = jitted   # for .lower(...) on ShapeDtypeStructs
  return f


def ffn_pjit(layout: str, mesh: Mesh, *, mlp: str = "gelu",
             precision=jax.lax.Precision.HIGHEST) -> Callable:
  """The layout as plain `jax.jit` with its NamedShardings (XLA partitions).

  Same call signature as `ffn_shard_map`; in_shardings / out_shardings are
  `ffn_shardings(layout, mesh)`; the body is `ffn_reference`, so XLA's SPMD
  partitioner chooses the collectives (they may differ from the paper's; see
  tests/sharding/test_feedforward.py for what it does on CPU).
  """
  _check_layout(layout)
  _check_mlp(mlp)
  shape = _mesh_shape(mesh)
  x_sh, w_sh, out_sh = ffn_shardings(layout, mesh, mlp)
  jitted = jax.jit(functools.partial(ffn_reference, mlp=mlp,
                                     precision=precision),
                   in_shardings=(x_sh,) + w_sh, out_shardings=out_sh)

  @functools.wraps(jitted)
  def f(x, *weights):
    _check_args(layout, mlp, shape, x, weights)
    return jitted(x, *weights)

  f.jitted = jitted
  return f
