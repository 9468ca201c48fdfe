"""LASP-2 sequence parallelism: attnlib.sharding.sequence_parallel.

On the 8 simulated CPU devices of tests/conftest.py: outputs, final states
and gradients equal `al.linear_attention` on the whole sequence, and the
compiled HLO performs exactly the collectives `sequence_parallel_collectives`
lists.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import attnlib as al
from attnlib.ops import linear_attention as la_mod
from attnlib.sharding import hlo
from attnlib.sharding.feedforward import Collective
from attnlib.sharding.mesh import MeshConfig, make_mesh
from attnlib.sharding.sequence_parallel import (
    linear_attention_sequence_parallel as lasp,
    sequence_parallel_collectives)

B, H, HKV, K, V = 2, 4, 2, 4, 8   # GQA: two query heads per kv head
TOL = dict(rtol=2e-5, atol=2e-5)

# (mesh config, sequence axis, batch axis)
MESHES = {
    "x8": (MeshConfig(x=8), "x", None),
    "2x4_y": (MeshConfig(x=2, y=4), "y", "x"),     # data x sequence parallel
    "2x4_y_rep": (MeshConfig(x=2, y=4), "y", None),  # x replicates the work
}


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision("highest"):
    yield


@functools.cache
def _mesh(name, explicit=False):
  cfg, axis, batch_axis = MESHES[name]
  return make_mesh(cfg, explicit=explicit), axis, batch_axis


def _inputs(t, decay, init, seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(ks[0], (B, t, H, K))
  k = jax.random.normal(ks[1], (B, t, HKV, K))
  v = jax.random.normal(ks[2], (B, t, HKV, V))
  d = None
  if decay == "rates":
    d = jnp.array([0.05, 0.3, 0.7, 1.5])
  elif decay == "gates":
    d = -jax.nn.softplus(jax.random.normal(ks[3], (B, t, H)) - 1.0)
  s0 = jax.random.normal(ks[4], (B, H, K, V)) if init else None
  return q, k, v, d, s0


def _reference(q, k, v, d, s0):
  return al.linear_attention(q, k, v, decay=d, initial_state=s0,
                             return_final_state=True, implementation="xla")


def _sharded(mesh_name, *, explicit=False, chunk=2):
  mesh, axis, batch_axis = _mesh(mesh_name, explicit)

  def f(q, k, v, d, s0):
    # A small xla chunk inside the shards so their local part crosses chunks.
    old, la_mod.CHUNK_SIZE = la_mod.CHUNK_SIZE, chunk
    try:
      return lasp(q, k, v, mesh=mesh, axis=axis, batch_axis=batch_axis,
                  decay=d, initial_state=s0, return_final_state=True,
                  implementation="xla")
    finally:
      la_mod.CHUNK_SIZE = old

  return f


def _close(got, want):
  for g, w in zip(got, want):
    assert g.shape == w.shape and g.dtype == w.dtype
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), **TOL)


# ----------------------------------------------------------------------------
# Collectives read from the compiled HLO.


def _hlo_list(compiled, mesh):
  """[(kind, axes, sent bytes)] of the nontrivial collectives of a program."""
  out = []
  for c in hlo.collectives_in_compiled(compiled):
    if c.sent_bytes:   # ops over groups of one device send nothing
      out.append((c.kind, hlo.group_axes(c.replica_groups, dict(mesh.shape)),
                  c.sent_bytes))
  return sorted(out)


def _as_list(collectives):
  return sorted((c.kind, c.axes, c.bytes_per_chip) for c in collectives)


def _by_kind_axes(items):
  out = {}
  for kind, axes, nbytes in items:
    out[kind, axes] = out.get((kind, axes), 0) + nbytes
  return out


def _expected(mesh, axis, batch_axis, decay, init, grad=False):
  return sequence_parallel_collectives(
      batch=B, num_heads=H, num_kv_heads=HKV, head_dim=K, value_dim=V,
      mesh_shape=dict(mesh.shape), axis=axis, batch_axis=batch_axis,
      decay=decay, initial_state=init, grad=grad)


def _in_shardings(mesh, axis, batch_axis, args):
  """q, k, v, gates sharded P(batch_axis, axis); s0 P(batch_axis); rates P()."""
  seq = NamedSharding(mesh, P(batch_axis, axis))
  q, k, v, d, s0 = args
  d_sh = None if d is None else (
      seq if d.ndim == 3 else NamedSharding(mesh, P()))
  return (seq, seq, seq, d_sh,
          None if s0 is None else NamedSharding(mesh, P(batch_axis)))


# ----------------------------------------------------------------------------
# Forward: outputs, final state and the collectives of one compiled program.


def _check_forward(mesh_name, t, decay, init, seed=0):
  mesh, axis, batch_axis = _mesh(mesh_name)
  n = mesh.shape[axis]
  args = _inputs(t, decay, init, seed)
  f = _sharded(mesh_name)
  even = t % n == 0
  # Inputs placed sharded over T when they can be (T a multiple of n).
  jitted = jax.jit(f, in_shardings=_in_shardings(mesh, axis, batch_axis, args)
                   if even else None)
  compiled = jitted.lower(*args).compile()
  got = compiled(*args)
  _close(got, _reference(*args))
  want = _as_list(_expected(mesh, axis, batch_axis, decay, init))
  if n > 1:
    assert len(want) == 1 and want[0][0] == "all-gather"
  if even:
    # Exactly the one all-gather of the states; the output stays sharded.
    assert _hlo_list(compiled, mesh) == want
    assert got[0].sharding.spec == P(batch_axis, axis)
  else:
    # T not a multiple of n: a jax.Array cannot be sharded unevenly, so XLA
    # also gathers the padded output [B, n*ceil(T/n), H, V] (documented).
    tp = -(-t // n) * n
    b = B // (1 if batch_axis is None else mesh.shape[batch_axis])
    gather_out = ("all-gather", (axis,),
                  (n - 1) * (b * tp * H * V * 4) // n)
    assert _hlo_list(compiled, mesh) == sorted(want + [gather_out])
  return compiled, args


@pytest.mark.parametrize("decay,init,t", [
    (None, False, 16), (None, True, 13),
    ("rates", False, 13), ("rates", True, 16),
    ("gates", False, 16), ("gates", True, 13),
])
def test_forward_8_shards(decay, init, t):
  # T = 13 over 8 shards: padded to 16 (shards of 2, the last all padding).
  _check_forward("x8", t, decay, init)


@pytest.mark.parametrize("mesh_name,t,decay,init", [
    ("2x4_y", 16, None, True),
    ("2x4_y", 16, "rates", True),
    ("2x4_y", 10, "gates", False),
    ("2x4_y_rep", 16, "gates", True),
])
def test_forward_2x4_mesh(mesh_name, t, decay, init):
  _check_forward(mesh_name, t, decay, init, seed=1)


def test_collectives_do_not_depend_on_length():
  # The same bytes as for T = 16 in test_forward_8_shards, for T = 256.
  mesh, axis, batch_axis = _mesh("x8")
  args = _inputs(256, "gates", True)
  f = jax.jit(_sharded("x8"),
              in_shardings=_in_shardings(mesh, axis, batch_axis, args))
  assert _hlo_list(f.lower(*args).compile(), mesh) == _as_list(
      _expected(mesh, axis, batch_axis, "gates", True))


def test_explicit_mesh_and_short_sequence():
  # A mesh with explicit axis types (inputs get resharded); T = 3 < 8 shards
  # (five shards hold only padding).
  args = _inputs(3, "gates", True, seed=2)
  _close(jax.jit(_sharded("x8", explicit=True))(*args), _reference(*args))


def test_axis_of_size_one():
  # y has size 1 in MeshConfig(x=8): one shard, no collective.
  mesh = make_mesh(MeshConfig(x=8))
  q, k, v, d, s0 = args = _inputs(5, "rates", True, seed=3)
  f = jax.jit(functools.partial(lasp, mesh=mesh, axis="y", decay=d,
                                initial_state=s0, return_final_state=True))
  compiled = f.lower(q, k, v).compile()
  _close(compiled(q, k, v), _reference(*args))
  assert _hlo_list(compiled, mesh) == []
  assert _expected(mesh, "y", None, "rates", True, grad=True) == []


def test_bfloat16_without_final_state():
  mesh, axis, _ = _mesh("x8")
  q, k, v, d, s0 = _inputs(16, "gates", True, seed=4)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  o = jax.jit(functools.partial(lasp, mesh=mesh, axis=axis))(
      q, k, v, decay=d, initial_state=s0)
  o_ref = al.linear_attention(q, k, v, decay=d, initial_state=s0,
                              implementation="xla")
  assert o.dtype == jnp.bfloat16 and o.shape == o_ref.shape
  # The local output is rounded to bf16 before the inter-chunk term is added.
  np.testing.assert_allclose(np.asarray(o, np.float32),
                             np.asarray(o_ref, np.float32), rtol=3e-2,
                             atol=3e-2)


# ----------------------------------------------------------------------------
# Gradients (and the backward pass's collectives).


def _loss(fn, q, k, v, d, s0):
  o, s = fn(q, k, v, d, s0)
  return jnp.sum(o * jnp.cos(o)) + jnp.sum(s * jnp.sin(s))


@pytest.mark.parametrize("mesh_name,t,decay,init", [
    ("x8", 13, "gates", True),
    ("x8", 16, "rates", True),
    ("2x4_y", 16, None, False),
    ("2x4_y", 16, "rates", True),
])
def test_gradients(mesh_name, t, decay, init):
  mesh, axis, batch_axis = _mesh(mesh_name)
  n = mesh.shape[axis]
  args = _inputs(t, decay, init, seed=5)
  argnums = tuple(i for i, a in enumerate(args) if a is not None)
  grad = jax.grad(functools.partial(_loss, _sharded(mesh_name)),
                  argnums=argnums)
  even = t % n == 0
  if even:  # inputs and gradients sharded like the outputs
    in_sh = _in_shardings(mesh, axis, batch_axis, args)
    jitted = jax.jit(grad, in_shardings=in_sh,
                     out_shardings=tuple(in_sh[i] for i in argnums))
  else:
    jitted = jax.jit(grad)
  compiled = jitted.lower(*args).compile()
  got = compiled(*args)
  want = jax.grad(functools.partial(_loss, _reference), argnums=argnums)(*args)
  for g, w in zip(got, want):
    scale = float(jnp.max(jnp.abs(w)))
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * scale)
  if even:
    # Bytes per (kind, axes) exact; XLA may combine the all-reduces.
    assert _by_kind_axes(_hlo_list(compiled, mesh)) == _by_kind_axes(
        _as_list(_expected(mesh, axis, batch_axis, decay, init, grad=True)))


def test_collectives_bytes_formula():
  shape = {"x": 2, "y": 4, "z": 1}
  # decay: n * b * H * (K V + 1) * 4 gathered, (n-1)/n of it sent.
  assert sequence_parallel_collectives(
      batch=4, num_heads=8, head_dim=16, mesh_shape=shape, axis="y",
      batch_axis="x", decay="gates") == [
          Collective("all-gather", ("y",), 3 * 2 * 8 * (16 * 16 + 1) * 4)]
  # no decay, GQA: one state per kv head.
  assert sequence_parallel_collectives(
      batch=4, num_heads=8, num_kv_heads=2, head_dim=16, value_dim=32,
      mesh_shape=shape, axis="y") == [
          Collective("all-gather", ("y",), 3 * 4 * 2 * 16 * 32 * 4)]
  assert sequence_parallel_collectives(
      batch=4, num_heads=8, head_dim=16, mesh_shape=shape, axis="z") == []


# ----------------------------------------------------------------------------
# Errors.


def test_errors():
  mesh, _, _ = _mesh("x8")
  q, k, v, d, s0 = _inputs(16, "gates", True)
  with pytest.raises(ValueError, match="axis"):
    lasp(q, k, v, mesh=mesh, axis="w")
  with pytest.raises(ValueError, match="batch_axis"):
    lasp(q, k, v, mesh=mesh, axis="x", batch_axis="x")
  with pytest.raises(ValueError, match="mesh"):
    lasp(q, k, v, mesh={"x": 8})
  with pytest.raises(ValueError, match="decay.shape"):
    lasp(q, k, v, mesh=mesh, decay=d[:, :, :2])
  with pytest.raises(ValueError, match="decay.shape"):
    lasp(q, k, v, mesh=mesh, decay=jnp.ones((3,)))
  with pytest.raises(ValueError, match="rates"):
    lasp(q, k, v, mesh=mesh, decay=-jnp.ones((H,)))
  with pytest.raises(ValueError, match="initial_state"):
    lasp(q, k, v, mesh=mesh, initial_state=s0[:, :2])
  with pytest.raises(ValueError, match="length"):
    lasp(q, k[:, :8], v, mesh=mesh)
  mesh24, _, _ = _mesh("2x4_y")
  with pytest.raises(ValueError, match="batch"):
    lasp(q[:1], k[:1], v[:1], mesh=mesh24, axis="y", batch_axis="x")
  kw = dict(batch=2, num_heads=4, head_dim=4, mesh_shape={"x": 8})
  with pytest.raises(ValueError, match="axis"):
    sequence_parallel_collectives(**kw, axis="y")
  with pytest.raises(ValueError, match="decay"):
    sequence_parallel_collectives(**kw, decay="exp")
  with pytest.raises(ValueError, match="num_kv_heads"):
    sequence_parallel_collectives(**kw, num_kv_heads=3)
