"""Sequence parallelism for causal linear attention (LASP-2).

One long sequence ``q [B, T, H, K]``, ``k, v [B, T, Hkv, K | V]`` is split
along T over the n devices of one mesh axis: shard i holds the T/n tokens
``[i * T/n, (i+1) * T/n)``. The scheme follows LASP-2 (Sun et al., "LASP-2:
Rethinking Sequence Parallelism for Linear Attention and Its Hybrid", 2025,
arXiv:2502.07563): because linear attention is right-product first, all that
one shard needs from the earlier ones is their [K, V] memory states, whose
size does not depend on T, and these travel in a *single* all-gather (instead
of the ring of point-to-point sends of LASP-1), after which every shard
combines them locally.

Math (per batch element and query head; a_t = exp(g_t) the decay of step t,
g_t = 0 without decay, g_t = -lambda_h for rates, the log-gates otherwise;
`al.linear_attention` defines S_t = a_t S_{t-1} + k_t^T v_t, o_t = scale *
q_t S_t). On shard i, with tokens t local to the shard:

  1. local part, zero initial state (``al.linear_attention`` on the chunk, so
     the Pallas kernels run where they apply):
       o_t^loc = scale * sum_{s <= t in chunk} exp(G_t - G_s) (q_t . k_s) v_s
       M_i     = sum_{s in chunk} exp(G_end - G_s) k_s^T v_s     (chunk state)
     with G_t = sum_{r <= t in chunk} g_r the cumulative log-decay inside the
     chunk and L_i = G_end the chunk's total log-decay.
  2. one all-gather over the axis of (M_j, L_j) for all j (packed into one
     float32 buffer [n, B, H, K*V + 1]; without decay only M_j, and only one
     state per kv head [n, B, Hkv, K, V], since then the states of the query
     heads of a group are equal).
  3. local prefix combine, with E_i = sum_{j<i} L_j and C_j = sum_{m<=j} L_m:
       S_prefix,i = exp(E_i) S_0 + sum_{j<i} exp(E_i - C_j) M_j
     i.e. M_j decayed through shards j+1..i-1 (E_i - C_j = sum_{j<m<i} L_m <=
     0, so no exponent is positive), plus the initial state S_0 decayed
     through all earlier shards.
  4. inter-chunk term: o_t = o_t^loc + scale * exp(G_t) q_t S_prefix,i.

The final state is S_T = exp(C_{n-1}) S_0 + sum_j exp(C_{n-1} - C_j) M_j (the
last shard's state after its chunk); every shard computes it from the
gathered buffer, so it comes back replicated without another collective.

T need not be a multiple of n: the sequence is padded at the end to
n * ceil(T / n) tokens with q = k = v = 0 and log-gate 0 (a = 1), which
leaves every state unchanged, and the padded outputs are dropped. The cost
of that convenience: a jax.Array cannot be sharded unevenly, so the [B, T,
H, V] result of a length T that is not a multiple of n comes back replicated,
and XLA adds an all-gather of the padded output (n-1)/n * B * n*ceil(T/n) *
H * V * itemsize bytes per chip (and inputs already sharded over T must be
resharded). For the LASP-2 traffic alone, pass T a multiple of n. Rates [H]
are turned into log-gates [B, T, H] (as `al.linear_attention` does
internally).

Gradients: JAX differentiates the program; the transpose of the all-gather
is a reduce-scatter of the same buffer (see `sequence_parallel_collectives`).

Example (8 devices)::

  mesh = make_mesh(MeshConfig(x=8))
  o, s_t = linear_attention_sequence_parallel(
      q, k, v, mesh=mesh, axis="x", decay=rates, return_final_state=True)
  # == al.linear_attention(q, k, v, decay=rates, return_final_state=True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from attnlib.ops import _checks
from attnlib.ops import linear_attention as _la
from attnlib.sharding.feedforward import Collective, ring_bytes

_OP = "linear_attention_sequence_parallel"
_STATE_BYTES = 4  # states and log-decays travel in float32

Array = jax.Array


def _check_axis(mesh: Any, axis: Any, batch_axis: Any) -> tuple[int, int]:
  """(n = size of axis, size of batch_axis or 1)."""
  if not isinstance(mesh, Mesh):
    _checks.fail(_OP, "mesh", type(mesh).__name__, "a jax.sharding.Mesh")
  names = tuple(mesh.axis_names)
  if not isinstance(axis, str) or axis not in names:
    _checks.fail(_OP, "axis", axis, f"one of the mesh axes {names}")
  if batch_axis is None:
    return int(mesh.shape[axis]), 1
  if not isinstance(batch_axis, str) or batch_axis not in names:
    _checks.fail(_OP, "batch_axis", batch_axis,
                 f"None or one of the mesh axes {names}")
  if batch_axis == axis:
    _checks.fail(_OP, "batch_axis", batch_axis,
                 f"a mesh axis other than the sequence axis {axis!r}")
  return int(mesh.shape[axis]), int(mesh.shape[batch_axis])


def _combine(i: Array, n: int, m_all: Array, l_all: Array | None,
             s0: Array | None) -> tuple[Array, Array]:
  """(S_prefix of shard i, S_T) from the gathered chunk states (see doc).

  m_all [n, B, Hs, K, V] (Hs = H; without decay Hkv, and the results are
  per kv head), l_all None (no decay) or the chunk log-decays [n, B, H], s0
  None or [B, H, K, V] (added here only with a decay): all float32.
  """
  before = jnp.arange(n) < i  # j < i
  if l_all is None:
    mask = before.reshape(n, 1, 1, 1, 1)
    prefix = jnp.sum(jnp.where(mask, m_all, 0.0), axis=0)
    total = jnp.sum(m_all, axis=0)
    return prefix, total
  incl = jnp.cumsum(l_all, axis=0)  # C_j
  e_i = jnp.sum(jnp.where(before[:, None, None], l_all, 0.0), axis=0)  # E_i
  # exp(E_i - C_j) for j < i; zeroed elsewhere before exp() (no overflow).
  diff = jnp.where(before[:, None, None], e_i - incl, 0.0)
  w = jnp.where(before[:, None, None], jnp.exp(diff), 0.0)
  prefix = jnp.einsum("nbh,nbhkv->bhkv", w, m_all)
  w_total = jnp.exp(incl[-1] - incl)  # exp(C_{n-1} - C_j) <= 1
  total = jnp.einsum("nbh,nbhkv->bhkv", w_total, m_all)
  if s0 is not None:
    prefix = prefix + jnp.exp(e_i)[..., None, None] * s0
    total = total + jnp.exp(incl[-1])[..., None, None] * s0
  return prefix, total


def _body(axis: str, n: int, scale: float, implementation: str | None,
          has_decay: bool, has_s0: bool):
  """The per-shard program of shard_map (steps 1-4 of the module doc)."""

  def body(q, k, v, g, s0):
    f32 = jnp.float32
    b, t, h, dk = q.shape
    hkv, dv = k.shape[2], v.shape[3]
    grp = h // hkv
    # 1. Local part with zero initial state, and the chunk state M_i.
    o_loc, m_i = _la.linear_attention(
        q, k, v, is_causal=True, decay=g if has_decay else None, scale=scale,
        return_final_state=True, implementation=implementation)
    i = jax.lax.axis_index(axis)
    if has_decay:
      cum = jnp.cumsum(g, axis=1)  # G_t [B, Tc, H]
      l_i = cum[:, -1]  # L_i [B, H]
      # 2. One all-gather of (M_i, L_i), packed into one buffer.
      buf = jnp.concatenate([m_i.reshape(b, h, dk * dv), l_i[..., None]], -1)
      gathered = jax.lax.all_gather(buf, axis)  # [n, B, H, K*V + 1]
      m_all = gathered[..., :dk * dv].reshape(n, b, h, dk, dv)
      l_all = gathered[..., dk * dv]
      # 3. Prefix combine.
      prefix, total = _combine(i, n, m_all, l_all, s0 if has_s0 else None)
      # 4. Inter-chunk term scale * exp(G_t) q_t S_prefix.
      q_dec = q.astype(f32) * jnp.exp(cum)[..., None]
      o_inter = jnp.einsum("bthk,bhkv->bthv", q_dec, prefix,
                           preferred_element_type=f32)
    else:
      # Without decay the states of a group's query heads are equal: gather
      # one per kv head.
      m_kv = m_i.reshape(b, hkv, grp, dk, dv)[:, :, 0]
      gathered = jax.lax.all_gather(m_kv, axis)  # [n, B, Hkv, K, V]
      prefix, total = _combine(i, n, gathered, None, None)
      prefix = jnp.repeat(prefix, grp, axis=1)  # [B, H, K, V]
      total = jnp.repeat(total, grp, axis=1)
      if has_s0:
        prefix = prefix + s0
        total = total + s0
      o_inter = jnp.einsum("bthk,bhkv->bthv", q, prefix,
                           preferred_element_type=f32)
    o = o_loc.astype(f32) + scale * o_inter
    return o.astype(q.dtype), total

  return body


def linear_attention_sequence_parallel(
    q: Array, k: Array, v: Array, *, mesh: Mesh, axis: str = "x",
    decay: Array | None = None, initial_state: Array | None = None,
    return_final_state: bool = False, scale: float | None = None,
    batch_axis: str | None = None,
    implementation: str | None = None) -> Array | tuple[Array, Array]:
  """Causal `al.linear_attention` with T split over mesh axis `axis` (LASP-2).

  Same semantics and results as ``al.linear_attention(q, k, v,
  is_causal=True, decay=decay, scale=scale, initial_state=initial_state,
  return_final_state=return_final_state)`` on the whole sequence (see the
  module doc for the algorithm and its math). Each of the n shards of `axis`
  runs ``al.linear_attention`` (with `implementation`) on its T/n tokens,
  then one all-gather of the float32 chunk states (and chunk log-decays)
  over `axis` feeds a local prefix combine; `sequence_parallel_collectives`
  lists that all-gather and its bytes exactly.

  Args:
    q: [B, T, H, K]; k: [B, T, Hkv, K]; v: [B, T, Hkv, V]; one float dtype,
      H % Hkv == 0 (grouped-query attention).
    mesh: the device mesh.
    axis: the mesh axis T is split over (size n); T need not be a multiple
      of n (padded at the end with k = v = 0, a = 1; dropped afterwards).
    decay: None, rates [H] (>= 0) or log-gates [B, T, H] (<= 0), as in
      `al.linear_attention`.
    initial_state: None or S_0 [B, H, K, V] (used in float32).
    return_final_state: also return S_T, float32 [B, H, K, V], replicated
      over `axis`.
    scale: output scale; None means K ** -0.5.
    batch_axis: None, or another mesh axis to split B over (data parallel);
      B must be a multiple of its size. Other mesh axes replicate the work.
    implementation: passed to the local `al.linear_attention` calls (None
      picks the kernel for the platform, as there).

  Returns:
    o [B, T, H, V] in q.dtype, sharded over T along `axis` when T is a
    multiple of n (else replicated: see the module doc), or (o, S_T).

  Raises:
    ValueError: mesh not a Mesh, `axis` (or `batch_axis`) not one of its axes
      (or equal), B not a multiple of the batch axis size, and everything
      `al.linear_attention` rejects (ranks, shapes, dtypes, heads, decay of a
      shape other than [H] or [B, T, H], negative rates or positive log-gates
      when concrete, initial_state not [B, H, K, V], a bad scale).
  """
  n, nb = _check_axis(mesh, axis, batch_axis)
  _la._check_qkv(_OP, q, k, v, rank=4)
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  if t < 1:
    _checks.fail(_OP, "q.shape", _checks.shape_of(q), "a length T >= 1")
  _la._check_decay(_OP, decay, (b, t, h), h)
  if initial_state is not None:
    _la._check_state(_OP, "initial_state", initial_state, (b, h, dk, dv))
  _checks.check_scale(_OP, scale)
  _checks.check_bool(_OP, "return_final_state", return_final_state)
  if b % nb:
    _checks.fail(_OP, "q.shape", _checks.shape_of(q),
                 f"a batch B divisible by the size {nb} of batch_axis "
                 f"{batch_axis!r}")

  has_decay = decay is not None
  has_s0 = initial_state is not None
  tp = -(-t // n) * n
  pad = tp - t
  if pad:
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
  g = None
  if has_decay:
    g = _la._log_gates(decay, (b, t, h))  # float32 [B, T, H]
    if pad:
      g = jnp.pad(g, ((0, 0), (0, pad), (0, 0)))  # a = 1 in the padding
  s0 = None if not has_s0 else jnp.asarray(initial_state, jnp.float32)

  seq = P(batch_axis, axis)
  rep = P(batch_axis)
  body = _body(axis, n, _checks.default_scale(dk, scale), implementation,
               has_decay, has_s0)
  # check_vma=False: the final state is computed identically on every shard
  # from the (varying) all-gather result, so it is declared replicated
  # (out_specs without `axis`); shard_map's transpose then scales its
  # cotangent by 1/n, and the all-gather's transpose (a reduce-scatter)
  # sums the n copies back: gradients stay exact.
  mapped = jax.shard_map(
      body, mesh=mesh,
      in_specs=(seq, seq, seq, seq if has_decay else P(),
                rep if has_s0 else P()),
      out_specs=(seq, rep), check_vma=False)
  args = (q, k, v, g, s0)
  explicit = any(t_ == AxisType.Explicit for t_ in mesh.axis_types)
  if explicit:
    # Explicit axes (sharding in types): shard_map takes only arguments typed
    # with its in_specs, so reshard them first (a no-op when they are).
    specs = (seq, seq, seq, seq, rep)
    args = tuple(None if x is None else jax.reshard(x, NamedSharding(mesh, sp))
                 for x, sp in zip(args, specs))
  o, s_t = mapped(*args)
  if pad:
    if explicit:  # an uneven T cannot be typed sharded: gather it first
      o = jax.reshard(o, NamedSharding(mesh, rep))
    o = o[:, :t]
  return (o, s_t) if return_final_state else o


def sequence_parallel_collectives(
    *, batch: int, num_heads: int, head_dim: int, mesh_shape: Mapping[str, int],
    axis: str = "x", num_kv_heads: int | None = None,
    value_dim: int | None = None, decay: str | bool | None = None,
    initial_state: bool = False, batch_axis: str | None = None,
    grad: bool = False) -> list[Collective]:
  """The exact collectives of `linear_attention_sequence_parallel`, per chip.

  Forward: one all-gather over `axis` (n = its size) of the float32 chunk
  states; the gathered buffer per chip (b = batch / size of batch_axis, the
  local batch) is

    with a decay (rates or log-gates):  n * b * H * (K * V + 1) * 4 bytes
      (the state M_i [b, H, K, V] and the log-decay L_i [b, H], packed);
    without decay:                      n * b * Hkv * K * V * 4 bytes
      (one state per kv head).

  bytes_per_chip = (n-1)/n * gathered = (n-1) * (one chip's block), the
  ring convention of `Collective` (each chip sends its block to the n-1
  others). Independent of T: the point of LASP-2. This holds for T a
  multiple of n; otherwise XLA also gathers the padded output (module doc).

  grad=True adds the collectives of the backward pass (jax.grad of a loss of
  the outputs, with the inputs and their gradients sharded like the outputs:
  q, k, v, log-gates P(batch_axis, axis); initial_state P(batch_axis); rates
  replicated):
    * reduce-scatter over `axis` of the gathered buffer (the all-gather's
      transpose), bytes (n-1)/n * gathered;
    * initial_state=True: all-reduce over `axis` of the gradient of S_0,
      float32 [b, H, K, V] (each shard's contribution summed), 2(n-1)/n of it;
    * decay="rates": all-reduce over `axis` of the rates' gradient, float32
      [H] (summed over the shard's tokens and batch), and one more over
      `batch_axis` when given (size m > 1: 2(m-1)/m * 4H bytes).
  XLA's all-reduce combiner may merge the two all-reduces over `axis` into
  one op (it does on CPU): the bytes per (kind, axes) are what is exact for
  the backward pass, the op list is exact for the forward pass (both checked
  against XLA's CPU compilation in tests/sharding/test_sequence_parallel.py).

  Args:
    batch: B (global); num_heads: H; head_dim: K; value_dim: V (default K);
    num_kv_heads: Hkv (default H); mesh_shape: {axis name: size};
    axis / batch_axis: as in `linear_attention_sequence_parallel`;
    decay: None (or False), "rates" ([H]) or "gates" ([B, T, H]); True means
      "gates" (the forward pass is the same for both);
    initial_state: whether an initial state is passed (backward only);
    grad: also list the backward pass's collectives.

  Returns:
    [Collective(kind, (axis name,), bytes_per_chip), ...]; empty when n == 1
    (and ops over a batch axis of size 1 are left out).

  Raises:
    ValueError: axis or batch_axis not in mesh_shape (or equal), an unknown
      decay, batch not a multiple of the batch axis size, heads not a
      multiple of kv heads, or a non-positive size.
  """
  shape = {str(a): int(s) for a, s in dict(mesh_shape).items()}
  name = "sequence_parallel_collectives"
  if axis not in shape:
    _checks.fail(name, "axis", axis, f"one of the mesh axes {tuple(shape)}")
  nb = 1
  if batch_axis is not None:
    if batch_axis not in shape or batch_axis == axis:
      _checks.fail(name, "batch_axis", batch_axis,
                   f"None or a mesh axis of {tuple(shape)} other than {axis!r}")
    nb = shape[batch_axis]
  if decay is True:
    decay = "gates"
  elif decay is False:
    decay = None
  if decay not in (None, "rates", "gates"):
    _checks.fail(name, "decay", decay, 'None, "rates" or "gates"')
  hkv = num_heads if num_kv_heads is None else num_kv_heads
  dv = head_dim if value_dim is None else value_dim
  for what, val in (("batch", batch), ("num_heads", num_heads),
                    ("num_kv_heads", hkv), ("head_dim", head_dim),
                    ("value_dim", dv)):
    if isinstance(val, bool) or not isinstance(val, int) or val < 1:
      _checks.fail(name, what, val, "a positive int")
  if batch % nb:
    _checks.fail(name, "batch", batch, f"a multiple of {nb} ({batch_axis!r})")
  if num_heads % hkv:
    _checks.fail(name, "num_kv_heads", hkv, f"a divisor of {num_heads}")
  n = shape[axis]
  if n == 1:
    return []
  b = batch // nb
  f32 = _STATE_BYTES
  if decay is not None:
    local = b * num_heads * (head_dim * dv + 1) * f32
  else:
    local = b * hkv * head_dim * dv * f32
  gathered = n * local
  out = [Collective("all-gather", (axis,),
                    ring_bytes("all-gather", gathered, n))]
  if grad:
    out.append(Collective("reduce-scatter", (axis,),
                          ring_bytes("reduce-scatter", gathered, n)))
    if initial_state:
      out.append(Collective(
          "all-reduce", (axis,),
          ring_bytes("all-reduce", b * num_heads * head_dim * dv * f32, n)))
    if decay == "rates":
      out.append(Collective("all-reduce", (axis,),
                            ring_bytes("all-reduce", num_heads * f32, n)))
      if nb > 1:
        out.append(Collective("all-reduce", (batch_axis,),
                              ring_bytes("all-reduce", num_heads * f32, nb)))
  return out
