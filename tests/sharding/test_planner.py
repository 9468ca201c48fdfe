"""attnlib.sharding.planner: the paper's layout choices, the frontier, errors."""

from __future__ import annotations

import pytest

from attnlib.sharding import cost_model as cm
from attnlib.sharding import planner

PALM = cm.PALM_540B
PALM_INT8 = cm.PALM_540B.with_int8_weights()
SLICE = [(4, 4, 4)]  # the paper's 64-chip TPU v4 slice


def _plan(model, batch, phase, **kw):
  length = dict(seq_len=2048) if phase == "prefill" else dict(context_len=2048)
  return planner.plan(model, "tpu_v4", kw.pop("n_chips", 64), batch=batch, phase=phase,
                      config=cm.PAPER_CONFIG, **length, **kw)


@pytest.mark.parametrize("model,batch", [(PALM_INT8, 64), (PALM, 512)])
def test_decode_picks_2d_weight_stationary_with_batch_sharded_kv(model, batch):
  """Table 2 / §4.1: decode always uses 2D weight-stationary (the batch in
  tokens is small), with the multi-query KV cache sharded over batch (§3.3)."""
  best = _plan(model, batch, "decode", meshes=SLICE).best
  assert (best.ffn_layout, best.attention_layout) == ("ws2d", "batch_kv")
  # Free to pick any factorization of 64, it still picks X = 4 (= sqrt(n E/F)).
  free = _plan(model, batch, "decode").best
  assert free.ffn_layout == "ws2d" and free.mesh[0] == 4
  assert free.mesh == (4, 4, 4)  # the balanced representative of the equivalent meshes


def test_batch_one_prefill_picks_2d_weight_stationary_and_heads():
  """Table 2, low-latency prefill: batch 1 cannot be sharded over batch."""
  best = _plan(PALM_INT8, 1, "prefill", meshes=SLICE).best
  assert (best.ffn_layout, best.attention_layout) == ("ws2d", "heads")


def test_large_batch_prefill_picks_weight_gathered():
  """Table 2 / Figure 7: weight-gathered layouts win at ~1M tokens per batch."""
  p = _plan(PALM, 512, "prefill", meshes=SLICE)
  assert p.best.ffn_layout.startswith("wg_")
  ws = [c for c in p.candidates if c.ffn_layout.startswith("ws")]
  assert min(c.time_s for c in ws) > 1.1 * p.best.time_s
  xyz = min(c.time_s for c in p.candidates if c.ffn_layout == "wg_xyz")
  assert xyz < 1.02 * p.best.time_s  # the paper's WG XYZ: within 2% of the best


def test_crossover_from_weight_stationary_to_weight_gathered():
  """§3.2.3: weight-stationary at few tokens, weight-gathered at many."""
  few = _plan(PALM, 4, "prefill", meshes=SLICE).best       # 8k tokens
  many = _plan(PALM, 256, "prefill", meshes=SLICE).best    # 512k tokens
  assert few.ffn_layout.startswith("ws") and many.ffn_layout.startswith("wg")


def test_1d_below_16_chips_2d_above():
  """§3.2.2: 2D beats 1D once sqrt(n) > F/E = 4."""
  small = planner.plan(cm.PALM_8B, "tpu_v4", 4, batch=64, phase="decode", context_len=2048)
  large = planner.plan(cm.PALM_8B, "tpu_v4", 64, batch=64, phase="decode", context_len=2048)
  assert small.best.ffn_layout == "ws1d"
  assert large.best.ffn_layout == "ws2d"


def test_objectives_differ_across_chip_counts_and_batches():
  kw = dict(phase="decode", context_len=2048, config=cm.PAPER_CONFIG)
  by_latency = planner.plan(PALM_INT8, "tpu_v4", [64, 256], batch=[64, 256], **kw)
  by_mfu = planner.plan(PALM_INT8, "tpu_v4", [64, 256], batch=[64, 256], objective="mfu", **kw)
  by_cost = planner.plan(PALM_INT8, "tpu_v4", [64, 256], batch=[64, 256], objective="cost", **kw)
  assert by_latency.best.n_chips == 256
  assert by_mfu.best.n_chips == 64 and by_mfu.best.batch == 256
  assert by_cost.best.cost_chip_s_per_token == min(c.cost_chip_s_per_token
                                                   for c in by_cost.candidates)
  assert by_latency.best.time_s == min(c.time_s for c in by_latency.candidates)
  assert by_mfu.best.mfu == max(c.mfu for c in by_mfu.candidates)
  # A latency budget: best MFU among those fast enough.
  budget = planner.plan(PALM_INT8, "tpu_v4", [64, 256], batch=[64, 256], objective="mfu",
                        max_latency_s=0.02, **kw)
  assert budget.best.time_s <= 0.02
  assert budget.best.mfu < by_mfu.best.mfu


def test_pareto_frontier_is_non_dominated():
  p = planner.plan(PALM_INT8, "tpu_v4", [64, 128, 256], batch=[16, 64, 256, 1024],
                   phase="decode", context_len=2048, config=cm.PAPER_CONFIG)
  front = list(p.pareto)
  assert front and front == sorted(front, key=lambda c: c.time_s)
  assert all(a.mfu < b.mfu for a, b in zip(front, front[1:]))
  for c in p.candidates:  # every candidate is matched or beaten by a frontier point
    assert any(f.time_s <= c.time_s and f.mfu >= c.mfu for f in front)
  for f in front:
    assert not any(c.time_s < f.time_s and c.mfu > f.mfu for c in p.candidates)
  assert "ffn" in p.table(5)


def test_mesh_factorizations():
  meshes = planner.mesh_factorizations(8)
  assert len(meshes) == 10 and meshes[0] == (2, 2, 2)
  assert all(x * y * z == 8 for x, y, z in meshes)
  assert planner.mesh_factorizations(64, axis_sizes=[4]) == [(4, 4, 4)]
  assert set(planner.mesh_factorizations(8, max_axes=1)) == {(8, 1, 1), (1, 8, 1), (1, 1, 8)}


def test_value_errors():
  kw = dict(batch=64, phase="decode", context_len=128)
  with pytest.raises(ValueError, match="cannot be factored"):
    planner.mesh_factorizations(6, axis_sizes=[4])
  with pytest.raises(ValueError, match="positive integer"):
    planner.mesh_factorizations(0)
  with pytest.raises(ValueError, match="cannot be factored"):
    planner.plan(PALM, "tpu_v4", 96, axis_sizes=[4, 8], **kw)
  with pytest.raises(ValueError, match="has 32 chips"):
    planner.plan(PALM, "tpu_v4", 64, meshes=[(4, 4, 2)], **kw)
  with pytest.raises(ValueError, match="unknown feedforward layout"):
    planner.plan(PALM, "tpu_v4", 64, ffn_layouts=["ws2d", "ws4d"], **kw)
  with pytest.raises(ValueError, match="unknown attention layout"):
    planner.plan(PALM, "tpu_v4", 64, attention_layouts=["batch"], **kw)
  with pytest.raises(ValueError, match="unknown objective"):
    planner.plan(PALM, "tpu_v4", 64, objective="speed", **kw)
  with pytest.raises(ValueError, match="unknown phase"):
    planner.plan(PALM, "tpu_v4", 64, batch=1, phase="generate")
  with pytest.raises(ValueError, match="unknown chip"):
    planner.plan(PALM, "tpu_v9", 64, **kw)
  # Head sharding over more chips than heads, and nothing else allowed.
  with pytest.raises(ValueError, match="more shards than heads"):
    planner.plan(cm.PALM_8B, "tpu_v4", 32, batch=1, phase="decode", context_len=128,
                 attention_layouts=["heads"], ffn_layouts=["ws1d", "ws2d"])
  # PaLM 540B in bf16 does not fit on 8 chips of 32 GiB.
  with pytest.raises(ValueError, match="HBM"):
    planner.plan(PALM, "tpu_v4", 8, batch=8, phase="decode", context_len=128)
