"""The analytical cost model (attnlib.sharding.cost_model) against the paper.

Pope et al. 2022, "Efficiently Scaling Transformer Inference": every PaLM
number of docs/sharding_cost_model.md within 10%, except the rows listed in
EXCLUDED with the reason the model cannot reach them; plus the model's
internal consistency (collectives agree with the shard_map programs of
attnlib.sharding.feedforward / attention, exact counts approach the paper's
asymptotic formulas, ValueErrors).
"""

from __future__ import annotations

import math
import pathlib
import sys

import pytest

from attnlib.sharding import chips
from attnlib.sharding import cost_model as cm

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))
import partition_study  # pylint: disable=wrong-import-position

TOLERANCE = 0.10

# Rows of partition_study.paper_rows() the model cannot reproduce within 10%,
# and why. No per-row constants are tuned; the one global constant is the 76%
# achievable FLOP/s the paper states for large-batch prefill (§4.1).
_FIXED_COSTS = (
    "small-token-count step (decode, or batch-1 prefill): the paper's measured time includes "
    "costs that no analytical term prices -- per-layer vector work (layer norm, RoPE, softmax, "
    "sampling), collective and kernel-launch latency, small-matmul inefficiency -- so the "
    "roofline model is a lower bound on latency (upper bound on MFU), even with no overlap at "
    "all; see docs/sharding_cost_model.md")
EXCLUDED = {
    "decode_b64_int8_ms": _FIXED_COSTS,
    "decode_b64_int8_mfu": _FIXED_COSTS,
    "decode_b64_bf16_ms": _FIXED_COSTS,
    "decode_b512_bf16_ms": _FIXED_COSTS,
    "decode_b512_bf16_mfu": _FIXED_COSTS,
    "prefill_b1_int8_s": _FIXED_COSTS,
    "prefill_b1_int8_mfu": _FIXED_COSTS,
    "t3_prefill_b1_int8_s": _FIXED_COSTS,
    "t3_prefill_b1_int8_mfu": _FIXED_COSTS,
    "t3_decode_b32_int8_s": _FIXED_COSTS,
    "t3_decode_b32_int8_mfu": _FIXED_COSTS,
    "t3_decode_b512_bf16_s": _FIXED_COSTS,
    "t3_decode_b512_bf16_mfu": _FIXED_COSTS,
    "int8_saving_b64_ms": (
        "the model's saving is half the bf16 weight bytes at the peak 1200 GB/s; the paper's "
        "larger saving implies ~87% achieved HBM bandwidth, a number the paper does not state "
        "(so it is not used)"),
    "serial_block_increase_pct": (
        "the model prices only the serial block's extra activation collectives at peak ICI "
        "bandwidth; the measured +14% also contains the second layer norm and the smaller, "
        "unfused matmuls of the serial block (§3.4), which the model does not price"),
}


@pytest.fixture(scope="module")
def rows():
  return {r.key: r for r in partition_study.paper_rows()}


def test_every_excluded_row_exists(rows):
  assert set(EXCLUDED) <= set(rows)


@pytest.mark.parametrize(
    "key", sorted({r.key for r in partition_study.paper_rows()} - set(EXCLUDED)))
def test_paper_row_within_tolerance(rows, key):
  r = rows[key]
  assert abs(r.error) <= TOLERANCE, f"{r.quantity} ({r.source}): paper {r.paper}, model {r.model}"


@pytest.mark.parametrize("key", sorted(k for k in EXCLUDED if k.endswith(("_ms", "_s"))
                                       and not k.startswith("int8")))
def test_excluded_latency_rows_are_lower_bounds(rows, key):
  """Where the model misses, it misses on the optimistic side -- even summing
  compute, memory and communication with no overlap stays below the paper."""
  r = rows[key]
  assert r.model < r.upper < r.paper, (key, r)


@pytest.mark.parametrize("key", sorted(k for k in EXCLUDED if k.endswith("_mfu")))
def test_excluded_mfu_rows_are_upper_bounds(rows, key):
  r = rows[key]
  assert r.model > r.upper > r.paper, (key, r)


def test_excluded_rows_have_the_right_sign(rows):
  saving = rows["int8_saving_b64_ms"]
  assert 0 < saving.model < saving.paper  # peak HBM bandwidth: the smallest possible saving
  serial = rows["serial_block_increase_pct"]
  assert 0 < serial.model < serial.paper


def test_layout_choices_match_the_paper():
  """Table 2: 2D weight-stationary for decode and batch-1 prefill (heads-
  sharded attention at batch 1, batch-sharded KV cache when decoding);
  weight-gathered at batch-512 prefill."""
  got = {r.key: r for r in partition_study.layout_rows()}
  for key in ("decode_b64", "decode_b512", "prefill_b1"):
    assert got[key].model == got[key].paper, got[key]
  # Batch-512 prefill is compute-bound (comm ~4% of the step): the model picks
  # a weight-gathered layout, but prices the paper's XYZ variant within 2% of
  # its best (XY): the optimum N = sqrt(BL n / F) ~ 23 lies between XY = 16
  # and XYZ = 64 on the 4x4x4 slice.
  r = got["prefill_b512"]
  assert r.model.startswith("wg_"), r
  assert r.gap_pct < 2.0, r


def test_docs_table_is_current():
  """docs/sharding_cost_model.md carries partition_study --reproduce verbatim."""
  doc = (ROOT / "docs" / "sharding_cost_model.md").read_text()
  begin, end = "<!-- BEGIN paper-vs-model -->\n", "\n<!-- END paper-vs-model -->"
  table = doc[doc.index(begin) + len(begin):doc.index(end)]
  assert table.strip() == partition_study.reproduction_markdown().strip()


# --------------------------------------------------------------------------- model and chips


def test_palm_parameter_counts():
  # Chowdhery et al. 2022, Table 1: 8.63B, 62.50B, 540.35B.
  assert cm.PALM_8B.n_params == pytest.approx(8.63e9, rel=1e-3)
  assert cm.PALM_62B.n_params == pytest.approx(62.50e9, rel=1e-3)
  assert cm.PALM_540B.n_params == pytest.approx(540.35e9, rel=1e-4)
  # §4: padding 48 -> 64 heads adds 18B parameters.
  assert cm.PALM_540B.n_params_stored - cm.PALM_540B.n_params == pytest.approx(18e9, rel=0.02)


def test_chip_specs():
  assert chips.TPU_V4.peak_flops == 275e12 and chips.TPU_V4.ici_bandwidth == 270e9
  assert chips.get_chip("h100") is chips.H100
  assert chips.H200.hbm_bytes > chips.H100.hbm_bytes
  with pytest.raises(ValueError, match="unknown chip"):
    chips.get_chip("tpu_v9")
  with pytest.raises(ValueError, match="peak_flops"):
    chips.ChipSpec("bad", peak_flops=0, hbm_bandwidth=1, hbm_bytes=1, ici_bandwidth=1)
  with pytest.raises(ValueError, match="topology"):
    chips.ChipSpec("bad", 1, 1, 1, 1, topology="ring")


def test_model_spec_validation():
  with pytest.raises(ValueError, match="multiple of n_kv_heads"):
    cm.ModelSpec("m", 1, 8, 32, n_heads=6, n_kv_heads=4, d_head=4, vocab=10)
  with pytest.raises(ValueError, match="n_layers"):
    cm.ModelSpec("m", 0, 8, 32, n_heads=2, n_kv_heads=1, d_head=4, vocab=10)
  with pytest.raises(ValueError):
    cm.CostConfig(overlap="some")
  with pytest.raises(ValueError):
    cm.CostConfig(compute_efficiency=0)


# --------------------------------------------------------------------------- collectives


_MESHES = [(2, 2, 2), (4, 1, 2), (1, 8, 1), (2, 4, 1), (4, 4, 4), (8, 2, 4)]


@pytest.mark.parametrize("layout", cm.FFN_LAYOUTS)
@pytest.mark.parametrize("mesh", _MESHES)
@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_reference_ffn_collectives_match_the_program(layout, mesh, mlp):
  """The model's independent formulas == helper I's program-exact list."""
  ff = pytest.importorskip("attnlib.sharding.feedforward")
  n = math.prod(mesh)
  kw = dict(tokens=24 * n, d_model=16 * n, d_ff=48 * n, mesh_shape=dict(zip("xyz", mesh)),
            dtype_bytes=2, mlp=mlp)
  program = ff.ffn_collectives(layout, **kw)
  assert sorted(cm._reference_ffn_collectives(layout, **kw), key=repr) == sorted(program, key=repr)
  assert cm.ffn_collectives(layout, **kw) == program  # the model delegates to the program


@pytest.mark.parametrize("layout", ["heads", "batch_kv"])
@pytest.mark.parametrize("mesh", [(2, 2, 2), (8, 1, 1), (2, 1, 4)])
def test_reference_attention_collectives_match_the_program(layout, mesh):
  at = pytest.importorskip("attnlib.sharding.attention")
  kw = dict(batch=16, tokens=3, embed_dim=64, num_heads=16, num_kv_heads=8, head_dim=8,
            mesh_shape=dict(zip("xyz", mesh)), dtype_bytes=2)
  program = at.attention_collectives(layout, **kw)
  assert cm._reference_attention_collectives(layout, **kw) == program
  assert cm.attention_collectives(layout, **kw) == program


@pytest.mark.parametrize("layout", cm.FFN_LAYOUTS)
def test_gated_ffn_equals_plain_ffn_of_one_and_a_half_width(layout):
  """The equivalence layer_collectives uses for fused / gated blocks."""
  kw = dict(tokens=512, d_model=256, mesh_shape={"x": 2, "y": 2, "z": 2}, dtype_bytes=2)
  gated = cm.ffn_network_bytes(layout, d_ff=1024, mlp="swiglu", **kw)
  plain = cm.ffn_network_bytes(layout, d_ff=1536, mlp="gelu", **kw)
  assert gated == plain


def test_serial_ws1d_layer_is_the_two_programs():
  """A serial block on ws1d: exactly I's SwiGLU FFN + J's attention layer."""
  ff = pytest.importorskip("attnlib.sharding.feedforward")
  at = pytest.importorskip("attnlib.sharding.attention")
  model = cm.ModelSpec("gqa", n_layers=2, d_model=128, d_ff=512, n_heads=16, n_kv_heads=8,
                       d_head=8, vocab=100, parallel_block=False)
  shape = {"x": 2, "y": 2, "z": 2}
  for att in ("heads", "batch_kv"):
    got = cm.layer_collectives(model, ffn_layout="ws1d", attention_layout=att, mesh=(2, 2, 2),
                               tokens=16 * 4, batch=16)
    want = ff.ffn_collectives("ws1d", tokens=64, d_model=128, d_ff=512, mesh_shape=shape,
                              dtype_bytes=2, mlp="swiglu")
    want += at.attention_collectives(att, batch=16, tokens=4, embed_dim=128, num_heads=16,
                                     num_kv_heads=8, head_dim=8, mesh_shape=shape, dtype_bytes=2)
    assert got == want


@pytest.mark.parametrize("layout", cm.FFN_LAYOUTS)
def test_exact_counts_approach_the_papers_formulas(layout):
  """Exact ring counts / the paper's asymptotic volumes (§3.2, Appendix A)
  -> 1 as the mesh grows: the (k-1)/k factors vanish."""
  def ratio(mesh):
    n = math.prod(mesh)
    kw = dict(tokens=4 * n * 64, d_model=4 * n, d_ff=16 * n, mesh_shape=dict(zip("xyz", mesh)),
              dtype_bytes=2)
    return cm.ffn_network_bytes(layout, **kw) / cm.asymptotic_ffn_comm_bytes(layout, **kw)

  small, large = ratio((2, 2, 2)), ratio((32, 32, 32))
  assert small < large <= 1.0
  assert large == pytest.approx(1.0, abs=0.04)


def test_2d_weight_stationary_optimum_is_8BLE_over_sqrt_n():
  """§3.2.2: with F = 4E and X = sqrt(n E / F), T_comm = 8BLE / sqrt(n)."""
  for n, x in ((64, 4), (1024, 16), (16384, 64)):
    yz = n // x
    t, e = 4096, 4 * n
    kw = dict(tokens=t, d_model=e, d_ff=4 * e, mesh_shape={"x": x, "y": yz, "z": 1},
              dtype_bytes=1)
    assert cm.asymptotic_ffn_comm_bytes("ws2d", **kw) == pytest.approx(8 * t * e / math.sqrt(n))
    exact = cm.ffn_network_bytes("ws2d", **kw)
    assert exact / (8 * t * e / math.sqrt(n)) == pytest.approx(1.0, abs=2 / x)


def test_weight_gathered_optimum_is_4E_sqrt_BLF_over_n():
  """§3.2.3 / A.2.2: 2EFN/n + 2BLE/N is minimal at N = sqrt(BL n / F), where it
  equals 4E sqrt(BL F / n)."""
  e, f, n = 1024, 4096, 4096
  t = f * n // 64  # N* = sqrt(t n / f) = n / 8 = 512
  n_star = math.sqrt(t * n / f)
  assert n_star == 512
  kw = dict(tokens=t, d_model=e, d_ff=f, dtype_bytes=1)
  at_opt = cm.asymptotic_ffn_comm_bytes("wg_x", mesh_shape={"x": 512, "y": 8, "z": 1}, **kw)
  assert at_opt == pytest.approx(4 * e * math.sqrt(t * f / n))
  for x in (128, 2048):
    other = cm.asymptotic_ffn_comm_bytes("wg_x", mesh_shape={"x": x, "y": n // x, "z": 1}, **kw)
    assert other > at_opt


def test_2d_beats_1d_only_past_sqrt_n_equals_F_over_E():
  """§3.2.2: 2D weight-stationary communicates less than 1D iff
  sqrt(n) > F/E (F = 4E: n > 16), here with exact counts."""
  def both(mesh):
    n = math.prod(mesh)
    kw = dict(tokens=1024, d_model=64 * n, d_ff=256 * n, mesh_shape=dict(zip("xyz", mesh)),
              dtype_bytes=2)
    return cm.ffn_network_bytes("ws1d", **kw), cm.ffn_network_bytes("ws2d", **kw)

  for mesh in ((1, 2, 2), (2, 1, 2), (2, 2, 1), (4, 1, 1)):  # n = 4: X = 1 is 1D itself
    one_d, two_d = both(mesh)
    assert two_d >= one_d, mesh
  one_d, two_d = both((4, 4, 4))     # n = 64, X = sqrt(64 / 4) = 4
  assert two_d < one_d


# --------------------------------------------------------------------------- estimates


def test_kv_cache_sharding():
  m = cm.PALM_540B
  total = m.kv_bytes_per_token() * 128 * 1000
  assert cm.kv_cache_bytes_per_chip(m, batch=128, context_len=1000, n_chips=64) == total / 64
  # Multi-query sharded over heads: the one KV head is replicated (Figure 4b).
  assert cm.kv_cache_bytes_per_chip(m, batch=128, context_len=1000, n_chips=64,
                                    attention_layout="heads") == total


def test_phases_are_bound_where_the_paper_says():
  """§2: small-batch decode is memory-bound; large-batch prefill compute-bound."""
  m = cm.PALM_540B
  dec = cm.estimate(m, "tpu_v4", 64, batch=64, phase="decode", context_len=2048)
  assert dec.bound == "memory"
  pre = cm.estimate(m, "tpu_v4", 64, batch=512, phase="prefill", seq_len=2048,
                    ffn_layout="wg_xyz")
  assert pre.bound == "compute"
  # int8 weights halve the weight bytes read per step (§3.6).
  dec8 = cm.estimate(m.with_int8_weights(), "tpu_v4", 64, batch=64, phase="decode",
                     context_len=2048)
  assert dec8.weight_bytes == pytest.approx(dec.weight_bytes / 2)
  assert dec8.time_s < dec.time_s


def test_overlap_conventions_are_ordered():
  m = cm.PALM_62B
  times = [cm.estimate(m, "tpu_v4", 16, batch=64, phase="decode", context_len=2048,
                       config=cm.CostConfig(overlap=o)).time_s
           for o in ("full", "roofline", "none")]
  assert times[0] <= times[1] <= times[2]
  aware = cm.estimate(m, "tpu_v4", 16, batch=64, phase="decode", context_len=2048,
                      config=cm.CostConfig(network="axis_aware"))
  assert aware.comm_s >= cm.estimate(m, "tpu_v4", 16, batch=64, phase="decode",
                                     context_len=2048).comm_s


def test_weight_gathered_int8_weights_travel_as_int8():
  m = cm.PALM_8B
  kw = dict(batch=64, phase="prefill", seq_len=128, ffn_layout="wg_xyz", mesh=(2, 2, 2))
  bf16 = cm.estimate(m, "tpu_v4", **kw).network_bytes
  int8 = cm.estimate(m.with_int8_weights(), "tpu_v4", **kw).network_bytes
  assert int8 == pytest.approx(bf16 / 2)


def test_estimate_value_errors():
  m = cm.PALM_540B
  base = dict(batch=64, phase="decode", context_len=128)
  with pytest.raises(ValueError, match="unknown feedforward layout"):
    cm.estimate(m, "tpu_v4", 64, ffn_layout="ws3d", **base)
  with pytest.raises(ValueError, match="unknown attention layout"):
    cm.estimate(m, "tpu_v4", 64, attention_layout="rows", **base)
  with pytest.raises(ValueError, match="unknown phase"):
    cm.estimate(m, "tpu_v4", 64, batch=1, phase="train")
  with pytest.raises(ValueError, match="not n_chips"):
    cm.estimate(m, "tpu_v4", 64, mesh=(4, 4, 2), **base)
  with pytest.raises(ValueError, match="more shards than heads"):
    cm.estimate(m, "tpu_v4", 128, attention_layout="heads", **base)
  with pytest.raises(ValueError, match="multiple of the number of chips"):
    cm.estimate(m, "tpu_v4", 64, batch=8, phase="decode", context_len=128)
  with pytest.raises(ValueError, match="not divisible"):
    cm.estimate(m, "tpu_v4", 64 * 7, attention_layout="batch_kv", batch=448, phase="decode",
                context_len=8)
  with pytest.raises(ValueError, match="seq_len"):
    cm.estimate(m, "tpu_v4", 64, batch=64, phase="prefill")
  with pytest.raises(ValueError, match="unknown feedforward layout"):
    cm.ffn_collectives("nope", tokens=8, d_model=8, d_ff=8, mesh_shape={}, dtype_bytes=2)


def test_max_context_needs_the_batch_sharding():
  m = cm.PALM_540B
  opt = cm.max_context_length(m, "tpu_v4", 64, batch=128, attention_layout="batch_kv")
  base = cm.max_context_length(m, "tpu_v4", 64, batch=128, attention_layout="heads")
  assert opt == pytest.approx(64 * base, rel=1e-3)


def test_x_weight_gathered_beats_2d_exactly_when_tokens_exceed_d_model():
  """From the two asymptotic formulas on the same mesh: ws2d - wg_x =
  2F(BL - E)/YZ, so X-weight-gathered wins iff BL > E."""
  e, f, mesh = 1024, 4096, {"x": 4, "y": 4, "z": 4}
  for t in (256, 1024, 8192):
    kw = dict(tokens=t, d_model=e, d_ff=f, mesh_shape=mesh, dtype_bytes=1)
    diff = (cm.asymptotic_ffn_comm_bytes("ws2d", **kw)
            - cm.asymptotic_ffn_comm_bytes("wg_x", **kw))
    assert diff == pytest.approx(2 * f * (t - e) / 16)
