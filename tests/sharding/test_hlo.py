"""attnlib.sharding.hlo: collectives parsed from HLO text (hand-written snippets)."""

import pytest

from attnlib.sharding import hlo

_HEADER = ("HloModule m, is_scheduled=true, entry_computation_layout="
           "{(f32[2,4]{1,0})->f32[8,4]{1,0}}, num_partitions=8\n")


def _module(body: str) -> str:
  return (_HEADER + "\nENTRY %main.1 (p0: f32[2,4]) -> f32[8,4] {\n"
          "  %p0 = f32[2,4]{1,0} parameter(0)\n" + body + "\n}\n")


def test_sync_ops_explicit_and_iota_groups():
  text = _module(
      "  %ag = f32[8,4]{1,0} all-gather(%p0), channel_id=1, "
      "replica_groups=[2,4]<=[8], dimensions={0}, use_global_device_ids=true\n"
      "  %ar = f32[8,4]{1,0} all-reduce(%ag), channel_id=2, "
      "replica_groups={{0,1},{2,3},{4,5},{6,7}}, use_global_device_ids=true, "
      "to_apply=%add\n"
      "  ROOT %rs = f32[2,4]{1,0} reduce-scatter(%ar), channel_id=3, "
      "replica_groups=[2,4]<=[4,2]T(1,0), dimensions={0}, to_apply=%add")
  cs = hlo.collectives_in_hlo(text)
  assert [c.kind for c in cs] == ["all-gather", "all-reduce", "reduce-scatter"]
  ag, ar, rs = cs
  assert ag.replica_groups == ((0, 1, 2, 3), (4, 5, 6, 7))
  assert (ag.operand_bytes, ag.result_bytes) == (32, 128)
  assert ar.replica_groups == ((0, 1), (2, 3), (4, 5), (6, 7))
  # [4,2] iota transposed: columns of [[0,1],[2,3],[4,5],[6,7]].
  assert rs.replica_groups == ((0, 2, 4, 6), (1, 3, 5, 7))
  assert (rs.operand_bytes, rs.result_bytes) == (128, 32)
  assert hlo.sent_bytes_per_chip(cs) == {
      "all-gather": 3 * 128 // 4,        # (n-1)/n of the gathered result
      "all-reduce": 2 * 1 * 128 // 2,    # 2(n-1)/n of the buffer
      "reduce-scatter": 3 * 128 // 4,    # (n-1)/n of the reduced operand
  }


def test_mesh_axes_groups_as_printed_by_current_xla():
  text = _module(
      "  %a = f32[2,8]{1,0} all-gather(%p0), channel_id=1, "
      "replica_groups=mesh['x'=2,'y'=2,'z'=2] {'z'}, dimensions={1}, "
      "use_global_device_ids=true\n"
      "  %b = f32[4,2,4]{2,1,0} all-gather(%p0), channel_id=2, "
      "replica_groups=mesh['x'=2,'y'=2,'z'=2] {'x','y'}, dimensions={0}, "
      "use_global_device_ids=true\n"
      "  ROOT %c = f32[2,4]{1,0} all-to-all(%p0), channel_id=3, "
      "replica_groups=mesh['axis_0'=8] {'axis_0'}, dimensions={0}")
  a, b, c = hlo.collectives_in_hlo(text)
  assert a.replica_groups == ((0, 1), (2, 3), (4, 5), (6, 7))
  assert b.replica_groups == ((0, 2, 4, 6), (1, 3, 5, 7))
  assert c.replica_groups == (tuple(range(8)),)
  shape = {"x": 2, "y": 2, "z": 2}
  assert hlo.group_axes(a.replica_groups, shape) == ("z",)
  assert hlo.group_axes(b.replica_groups, shape) == ("x", "y")
  assert hlo.sent_bytes_per_chip([c]) == {"all-to-all": 7 * 32 // 8}


def test_mesh_groups_with_subaxes_and_device_ids():
  g = hlo.parse_replica_groups("mesh['a'=8] {'a':(1)2}")
  assert g == ((0, 4), (1, 5), (2, 6), (3, 7))      # the major factor 2
  g = hlo.parse_replica_groups("mesh['a'=8] {'a':(2)2}")
  assert g == ((0, 2), (1, 3), (4, 6), (5, 7))
  g = hlo.parse_replica_groups(
      "mesh['x'=2,'y'=2], device_ids=(0,2,1,3) {'y'}")
  assert g == ((0, 2), (1, 3))
  assert hlo.parse_replica_groups("{}", 4) == ((0, 1, 2, 3),)


def test_async_pairs_count_once_and_tuple_shapes():
  text = _module(
      "  %p1 = f32[2,4]{1,0} parameter(1)\n"
      "  %ags = (f32[2,4]{1,0}, f32[8,4]{1,0}) all-gather-start("
      "f32[2,4]{1,0} %p0), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}},"
      " dimensions={0}, use_global_device_ids=true\n"
      "  %agd = f32[8,4]{1,0} all-gather-done((f32[2,4]{1,0}, f32[8,4]{1,0}) "
      "%ags)\n"
      "  %ars = (f32[2,4]{1,0}, f32[2,4]{1,0}) all-reduce-start(%p0, %p1), "
      "channel_id=2, replica_groups=[1,8]<=[8], to_apply=%add\n"
      "  %ard = (f32[2,4]{1,0}, f32[2,4]{1,0}) all-reduce-done(%ars)\n"
      "  %cps = (f32[2,4]{1,0}, f32[2,4]{1,0}, u32[], u32[]) "
      "collective-permute-start(%p0), channel_id=3, "
      "source_target_pairs={{0,1},{1,0}}\n"
      "  ROOT %cpd = f32[2,4]{1,0} collective-permute-done(%cps)")
  cs = hlo.collectives_in_hlo(text)
  assert [c.kind for c in cs] == ["all-gather", "all-reduce",
                                  "collective-permute"]
  ag, ar, cp = cs
  assert (ag.operand_bytes, ag.result_bytes) == (32, 128)
  assert (ar.operand_bytes, ar.result_bytes) == (64, 64)    # tuple summed
  assert ar.group_size == 8
  assert cp.source_target_pairs == ((0, 1), (1, 0))
  assert hlo.sent_bytes_per_chip(cs) == {
      "all-gather": 96, "all-reduce": 2 * 7 * 64 // 8,
      "collective-permute": 32}


def test_combined_tuple_all_gather_derives_operand_and_skips_trivial():
  text = _module(
      "  %t = (f32[8,4]{1,0}, bf16[16]{0}) all-gather(%x, %y), "
      "replica_groups=[2,4]<=[8], dimensions={0}\n"
      "  ROOT %one = f32[2,4]{1,0} all-reduce(%p0), "
      "replica_groups={{0},{1},{2},{3},{4},{5},{6},{7}}, to_apply=%add")
  t, one = hlo.collectives_in_hlo(text)
  assert t.result_bytes == 128 + 32
  assert t.operand_bytes == (128 + 32) // 4   # operands not defined: derived
  assert one.group_size == 1 and one.sent_bytes == 0
  assert hlo.sent_bytes_per_chip([t, one]) == {"all-gather": 3 * 160 // 4}


def test_shape_bytes_and_errors():
  assert hlo.shape_bytes("(f32[2,3]{1,0}, (bf16[4]{0}, pred[]))") == 24 + 8 + 1
  assert hlo.shape_bytes("f32[<=8,2]{1,0}") == 64
  with pytest.raises(ValueError, match="replica groups"):
    hlo.parse_replica_groups("bogus")
  with pytest.raises(ValueError, match="not whole sub-meshes"):
    hlo.group_axes(((0, 3),), {"x": 2, "y": 2})
  with pytest.raises(ValueError, match="as_text"):
    hlo.collectives_in_compiled(42)


def test_real_compiled_module():
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from attnlib.sharding.mesh import MeshConfig, make_mesh

  mesh = make_mesh(MeshConfig(x=2, y=4))
  f = jax.jit(lambda a: jax.lax.with_sharding_constraint(
      a * 2, NamedSharding(mesh, P())))
  arg = jax.ShapeDtypeStruct((8, 4), jnp.float32,
                             sharding=NamedSharding(mesh, P(("x", "y"))))
  cs = hlo.collectives_in_compiled(f.lower(arg).compile())
  assert [c.kind for c in cs] == ["all-gather"]
  assert cs[0].result_bytes == 128 and cs[0].group_size == 8
  assert hlo.sent_bytes_per_chip(cs) == {"all-gather": 7 * 128 // 8}
