r"""Partitioning study with the analytical cost model of Pope et al. 2022.

Sweeps model size (PaLM 8B / 62B / 540B), chip count, batch size, weight
format and layout (feedforward: ws1d, ws2d, wg_x, wg_xy, wg_xyz; attention:
heads, batch_kv; every mesh factorization x*y*z = n) with
`attnlib.sharding.planner`, then prints, per model / weights / phase,

* the best layout per batch size (lowest latency over the chip counts), and
* the latency-vs-MFU Pareto frontier over all chip counts and batch sizes,

and writes a PNG of the frontiers like the paper's latency/efficiency figures
(Figure 1 plots cost against latency; cost per token is inversely
proportional to MFU) to --out, with the rows as JSON.

--reproduce prints instead the table of the paper's PaLM numbers against the
model's (docs/sharding_cost_model.md; tests/sharding/test_cost_model.py
asserts it).

Examples:
  python experiments/partition_study.py --out=/tmp/study
  python experiments/partition_study.py --models=palm-8b --chips=4 --chips=8 \
      --batches=1 --batches=16 --phase=decode --out=/tmp/study
  python experiments/partition_study.py --reproduce
"""

from __future__ import annotations

import dataclasses
import json
import os

from absl import app
from absl import flags

from attnlib.sharding import chips as chips_lib
from attnlib.sharding import cost_model as cm
from attnlib.sharding import planner

MODELS = {m.name: m for m in (cm.PALM_8B, cm.PALM_62B, cm.PALM_540B)}

def _define_flags() -> None:
  """Defines the flags; only when this file runs as a script, so that tests
  can import it next to other binaries that define flags of the same names."""
  g = globals()
  g["_MODELS"] = flags.DEFINE_multi_enum("models", sorted(MODELS), sorted(MODELS), "Models to sweep.")
  g["_CHIP"] = flags.DEFINE_enum("chip", "tpu_v4", sorted(chips_lib.CHIPS), "Accelerator.")
  g["_CHIPS"] = flags.DEFINE_multi_integer("chips", [8, 16, 32, 64, 128, 256], "Chip counts.")
  g["_BATCHES"] = flags.DEFINE_multi_integer("batches", [1, 4, 16, 64, 128, 256, 512, 1024],
                                        "Batch sizes.")
  g["_PHASE"] = flags.DEFINE_enum("phase", "both", ["prefill", "decode", "both"], "Phase(s).")
  g["_SEQ_LEN"] = flags.DEFINE_integer("seq_len", 2048, "Prefill length (the paper's 2048).")
  g["_CONTEXT_LEN"] = flags.DEFINE_integer("context_len", 2048, "Decode context length.")
  g["_WEIGHTS"] = flags.DEFINE_multi_enum("weights", ["bf16", "int8"], ["bf16", "int8"],
                                     "Weight formats.")
  g["_LAYOUTS"] = flags.DEFINE_multi_enum("layouts", list(cm.FFN_LAYOUTS), list(cm.FFN_LAYOUTS),
                                     "Feedforward layouts.")
  g["_AXIS_SIZES"] = flags.DEFINE_multi_integer(
      "axis_sizes", None, "Allowed mesh axis sizes (e.g. 4 8 16 for TPU v4 torus axes); "
      "default: any factorization.")
  g["_CONFIG"] = flags.DEFINE_enum("config", "paper", ["paper", "roofline"],
                              "paper: 76% achievable FLOP/s (§4.1); roofline: 100%.")
  g["_OUT"] = flags.DEFINE_string("out", None, "Directory for frontier.png and results.json.")
  g["_REPRODUCE"] = flags.DEFINE_bool("reproduce", False,
                                 "Print the paper-vs-model table and exit.")


# --------------------------------------------------------------------------- paper reproduction

# The paper's slice for PaLM 540B is 64 TPU v4 chips, a 4x4x4 torus (§4); the
# 2D weight-stationary split X = sqrt(n E / F) = 4 (Appendix A.2.1) and the
# weight-gathered groups X, XY, XYZ = 4, 16, 64 follow from it.
PAPER_MESH_540B = (4, 4, 4)
CONTEXT = 2048  # Figure 1 / Tables 2-3: 2048-token context; decode generates 64 tokens.
GENERATED = 64

# Multi-head variants of §4.2 / Table 1: d_head 128 with the multi-query
# model's head count, all heads carrying K and V (same parameter count).
PALM_540B_MULTIHEAD_TABLE1 = cm.PALM_540B.replace(
    name="palm-540b-multihead", n_heads=64, n_kv_heads=64, d_head=128, n_heads_padded=None)
PALM_540B_MULTIHEAD_48 = cm.PALM_540B.replace(
    name="palm-540b-multihead-48", n_heads=48, n_kv_heads=48, d_head=128, n_heads_padded=None)


@dataclasses.dataclass(frozen=True)
class PaperRow:
  """One number of the paper next to the cost model's.

  key: stable id (tests refer to it). quantity / source: what and where
  (section / table / figure). paper, model: the two values in `unit`.
  upper: the model under overlap="none" (compute + memory + comm, no
  overlap) -- a latency upper bound before fixed per-op costs; None where it
  does not apply.
  """

  key: str
  quantity: str
  source: str
  paper: float
  model: float
  unit: str
  upper: float | None = None

  @property
  def error(self) -> float:
    return (self.model - self.paper) / self.paper


def _decode(model, batch, config=cm.PAPER_CONFIG, mesh=PAPER_MESH_540B, chip="tpu_v4"):
  return cm.estimate(model, chip, batch=batch, phase="decode", context_len=CONTEXT,
                     ffn_layout="ws2d", attention_layout="batch_kv", mesh=mesh, config=config)


def _prefill(model, batch, ffn, attn, config=cm.PAPER_CONFIG, mesh=PAPER_MESH_540B,
             chip="tpu_v4"):
  return cm.estimate(model, chip, batch=batch, phase="prefill", seq_len=CONTEXT,
                     ffn_layout=ffn, attention_layout=attn, mesh=mesh, config=config)


_NO_OVERLAP = dataclasses.replace(cm.PAPER_CONFIG, overlap="none")


def paper_rows() -> list[PaperRow]:
  """The paper's PaLM numbers and the model's, under cost_model.PAPER_CONFIG.

  Sources (numbers as reported by the paper; see docs/sharding_cost_model.md
  for how they were obtained): Table 1 (max context), Table 2 (PaLM 540B,
  64 chips), §4.4 (28.5 / 36.9 ms per token at batch 64), §4.3 (serial
  blocks +14%), §2 (3 TB KV cache), Table 3 (PaLM 62B).
  """
  m540, m540_i8 = cm.PALM_540B, cm.PALM_540B.with_int8_weights()
  rows = []

  def add_step(key, quantity, source, paper, cost, upper_cost, unit, what):
    if what == "ms":
      rows.append(PaperRow(key, quantity, source, paper, cost.time_s * 1e3, unit,
                           upper_cost.time_s * 1e3))
    elif what == "s":
      rows.append(PaperRow(key, quantity, source, paper, cost.time_s, unit, upper_cost.time_s))
    else:
      rows.append(PaperRow(key, quantity, source, paper, cost.mfu * 100, unit,
                           upper_cost.mfu * 100))

  d64 = _decode(m540_i8, 64), _decode(m540_i8, 64, _NO_OVERLAP)
  d64b = _decode(m540, 64), _decode(m540, 64, _NO_OVERLAP)
  d512 = _decode(m540, 512), _decode(m540, 512, _NO_OVERLAP)
  p1 = _prefill(m540_i8, 1, "ws2d", "heads"), _prefill(m540_i8, 1, "ws2d", "heads", _NO_OVERLAP)
  p512 = (_prefill(m540, 512, "wg_xyz", "batch_kv"),
          _prefill(m540, 512, "wg_xyz", "batch_kv", _NO_OVERLAP))
  add_step("decode_b64_int8_ms", "540B decode latency/token, B=64, int8, 2D WS",
           "Table 2 (1.82 s / 64 tokens), §4.4 (28.5 ms)", 28.5, *d64, "ms", "ms")
  add_step("decode_b64_int8_mfu", "540B decode MFU, B=64, int8", "Table 2", 14, *d64, "%", "mfu")
  add_step("decode_b64_bf16_ms", "540B decode latency/token, B=64, bf16", "§4.4", 36.9, *d64b,
           "ms", "ms")
  add_step("decode_b512_bf16_ms", "540B decode latency/token, B=512, bf16, 2D WS",
           "Table 2 (6.0 s / 64 tokens)", 6.0e3 / GENERATED, *d512, "ms", "ms")
  add_step("decode_b512_bf16_mfu", "540B decode MFU, B=512, bf16", "Table 2", 33, *d512, "%",
           "mfu")
  add_step("prefill_b1_int8_s", "540B prefill latency, B=1 x 2048, int8, 2D WS / heads",
           "Table 2", 0.29, *p1, "s", "s")
  add_step("prefill_b1_int8_mfu", "540B prefill MFU, B=1, int8", "Table 2", 43, *p1, "%", "mfu")
  add_step("prefill_b512_bf16_s", "540B prefill latency, B=512 x 2048, bf16, WG XYZ / batch",
           "Table 2", 85.2, *p512, "s", "s")
  add_step("prefill_b512_bf16_mfu", "540B prefill MFU, B=512, bf16 (calibrates the 76%)",
           "Table 2, §4.1 / Figure 7", 76, *p512, "%", "mfu")
  rows.append(PaperRow(
      "int8_saving_b64_ms", "540B decode: bf16 minus int8 latency/token, B=64",
      "§4.4 (36.9 - 28.5)", 36.9 - 28.5, (d64b[0].time_s - d64[0].time_s) * 1e3, "ms",
      (d64b[1].time_s - d64[1].time_s) * 1e3))
  serial = m540.replace(parallel_block=False)
  ser = _decode(serial, 512), _decode(serial, 512, _NO_OVERLAP)
  rows.append(PaperRow(
      "serial_block_increase_pct", "540B decode B=512: serial-block latency increase",
      "§4.3", 14, (ser[0].time_s / d512[0].time_s - 1) * 100, "%",
      (ser[1].time_s / d512[1].time_s - 1) * 100))
  # Table 1: 64 chips, 30% of HBM for the KV cache.
  variants = (("multihead", PALM_540B_MULTIHEAD_TABLE1, "heads", {128: 1320, 512: 330}),
              ("baseline_mq", m540, "heads", {128: 660, 512: 165}),
              ("optimized_mq", m540, "batch_kv", {128: 43_000, 512: 10_700}))
  ctx = {}
  for name, model, attn, paper in variants:
    for b, value in paper.items():
      got = cm.max_context_length(model, "tpu_v4", 64, batch=b, attention_layout=attn,
                                  mesh=PAPER_MESH_540B)
      ctx[name, b] = got
      rows.append(PaperRow(f"table1_{name}_b{b}", f"540B max context, {name.replace('_', ' ')}, "
                           f"B={b}", "Table 1", value, got, "tokens"))
  rows.append(PaperRow("table1_ratio_b128", "optimized multiquery / multihead context, B=128",
                       "Table 1 (43,000 / 1,320; abstract: 32x)", 43_000 / 1320,
                       ctx["optimized_mq", 128] / ctx["multihead", 128], "x"))
  rows.append(PaperRow(
      "kv_cache_multihead_tb", "multihead 540B KV cache, B=512, L=2048", "§2 (3 TB)", 3.0,
      PALM_540B_MULTIHEAD_48.kv_bytes_per_token() * 512 * 2048 / 1e12, "TB"))
  # Table 3: PaLM 62B.
  m62, m62_i8 = cm.PALM_62B, cm.PALM_62B.with_int8_weights()
  t3 = (
      ("t3_prefill_b1_int8", m62_i8, 16, 1, "prefill", "ws2d", "heads", 0.16, 36),
      ("t3_decode_b32_int8", m62_i8, 16, 32, "decode", "ws2d", "batch_kv", 0.73, 8),
      ("t3_prefill_b512_bf16", m62, 32, 512, "prefill", "wg_xyz", "batch_kv", 20.2, 73),
      ("t3_decode_b512_bf16", m62, 8, 512, "decode", "ws2d", "batch_kv", 5.1, 37),
  )
  for key, model, n, b, phase, ffn, attn, latency, mfu in t3:
    got = []
    for config in (cm.PAPER_CONFIG, _NO_OVERLAP):
      kw = dict(seq_len=CONTEXT) if phase == "prefill" else dict(context_len=CONTEXT)
      got.append(cm.estimate(model, "tpu_v4", n, batch=b, phase=phase, ffn_layout=ffn,
                             attention_layout=attn, config=config, **kw))
    steps = 1 if phase == "prefill" else GENERATED
    what = "prefill" if phase == "prefill" else f"decode ({GENERATED} tokens)"
    fmt = "int8" if model.weight_bytes == 1 else "bf16"
    rows.append(PaperRow(f"{key}_s", f"62B {what} latency, {n} chips, B={b}, {fmt}", "Table 3",
                         latency, got[0].time_s * steps, "s", got[1].time_s * steps))
    rows.append(PaperRow(f"{key}_mfu", f"62B {what} MFU, {n} chips, B={b}, {fmt}", "Table 3",
                         mfu, got[0].mfu * 100, "%", got[1].mfu * 100))
  return rows


@dataclasses.dataclass(frozen=True)
class LayoutRow:
  key: str
  setting: str
  source: str
  paper: str
  model: str
  gap_pct: float  # how much slower the paper's layout is than the model's best


def layout_rows() -> list[LayoutRow]:
  """The layouts the paper chose (Table 2) against the planner's choice, on
  the paper's 4x4x4 slice of TPU v4 with PAPER_CONFIG."""
  m540, m540_i8 = cm.PALM_540B, cm.PALM_540B.with_int8_weights()
  cases = (
      ("decode_b64", "540B decode, B=64, int8", m540_i8, 64, "decode", "ws2d/batch_kv"),
      ("decode_b512", "540B decode, B=512, bf16", m540, 512, "decode", "ws2d/batch_kv"),
      ("prefill_b1", "540B prefill, B=1, int8", m540_i8, 1, "prefill", "ws2d/heads"),
      ("prefill_b512", "540B prefill, B=512, bf16", m540, 512, "prefill", "wg_xyz/batch_kv"),
  )
  out = []
  for key, setting, model, b, phase, paper in cases:
    kw = dict(seq_len=CONTEXT) if phase == "prefill" else dict(context_len=CONTEXT)
    p = planner.plan(model, "tpu_v4", 64, batch=b, phase=phase, meshes=[PAPER_MESH_540B],
                     config=cm.PAPER_CONFIG, **kw)
    best = p.best
    ffn, attn = paper.split("/")
    theirs = cm.estimate(model, "tpu_v4", batch=b, phase=phase, ffn_layout=ffn,
                         attention_layout=attn, mesh=PAPER_MESH_540B, config=cm.PAPER_CONFIG,
                         **kw)
    out.append(LayoutRow(key, setting, "Table 2", paper,
                         f"{best.ffn_layout}/{best.attention_layout}",
                         (theirs.time_s / best.time_s - 1) * 100))
  return out


def reproduction_markdown() -> str:
  """The paper-vs-model tables of docs/sharding_cost_model.md."""
  lines = ["| key | quantity | source | paper | model | error | model, no overlap |",
           "|---|---|---|---:|---:|---:|---:|"]
  for r in paper_rows():
    upper = "" if r.upper is None else f"{r.upper:.4g}"
    lines.append(f"| `{r.key}` | {r.quantity} | {r.source} | {r.paper:.4g} {r.unit} | "
                 f"{r.model:.4g} {r.unit} | {r.error:+.1%} | {upper} |")
  lines += ["", "| key | setting | source | paper's layout | model's best "
            "| paper's layout slower by |",
            "|---|---|---|---|---|---:|"]
  for r in layout_rows():
    lines.append(f"| `{r.key}` | {r.setting} | {r.source} | {r.paper} | {r.model} | "
                 f"{r.gap_pct:.2f}% |")
  return "\n".join(lines)


# --------------------------------------------------------------------------- the sweep


def _sweep(model, chip, phase, config):
  kw = dict(seq_len=_SEQ_LEN.value) if phase == "prefill" else dict(context_len=_CONTEXT_LEN.value)
  costs, best_per_batch = [], {}
  for b in _BATCHES.value:
    per_batch = []
    for n in _CHIPS.value:
      try:
        p = planner.plan(model, chip, n, batch=b, phase=phase, ffn_layouts=_LAYOUTS.value,
                         axis_sizes=_AXIS_SIZES.value, config=config, **kw)
      except ValueError:
        continue  # does not fit / no valid layout at this chip count
      per_batch.append(p.best)
      costs.extend(p.candidates)
    if per_batch:
      best_per_batch[b] = min(per_batch, key=lambda c: (c.time_s, -c.mfu))
  return costs, best_per_batch


def _row(c: cm.InferenceCost) -> dict:
  return dict(model=c.model.name, phase=c.phase, chips=c.n_chips, batch=c.batch,
              mesh="x".join(map(str, c.mesh)), ffn_layout=c.ffn_layout,
              attention_layout=c.attention_layout, time_s=c.time_s, mfu=c.mfu,
              cost_chip_ms_per_token=c.cost_chip_s_per_token * 1e3, bound=c.bound)


def _fmt(c: cm.InferenceCost) -> str:
  x, y, z = c.mesh
  return (f"{c.batch:6d} {c.n_chips:6d} {c.ffn_layout:7} {c.attention_layout:9} "
          f"{f'{x}x{y}x{z}':9} {c.time_s * 1e3:12.3f} {c.mfu:7.1%} {c.bound:>13}")


_HEADER = (f"{'batch':>6} {'chips':>6} {'ffn':7} {'attention':9} {'mesh':9} {'latency ms':>12} "
           f"{'MFU':>7} {'bound':>13}")


def main(argv):
  del argv
  if _REPRODUCE.value:
    print(reproduction_markdown())
    return
  chip = chips_lib.get_chip(_CHIP.value)
  config = cm.PAPER_CONFIG if _CONFIG.value == "paper" else cm.CostConfig()
  phases = ["prefill", "decode"] if _PHASE.value == "both" else [_PHASE.value]
  results, frontiers = [], {}
  for name in _MODELS.value:
    for weights in _WEIGHTS.value:
      model = MODELS[name] if weights == "bf16" else MODELS[name].with_int8_weights()
      for phase in phases:
        costs, best = _sweep(model, chip, phase, config)
        title = f"{name} {weights} {phase} on {chip.name}"
        if not costs:
          print(f"\n== {title}: nothing fits / no valid layout")
          continue
        frontier = planner.pareto_frontier(costs)
        frontiers[(name, weights, phase)] = frontier
        print(f"\n== {title}: best layout per batch (lowest latency over chip counts)")
        print(_HEADER)
        for b in sorted(best):
          print(_fmt(best[b]))
        print(f"-- {title}: Pareto frontier (latency vs MFU), {len(frontier)} points")
        print(_HEADER)
        for c in frontier:
          print(_fmt(c))
        results += [dict(_row(c), weights=weights, kind="best") for c in best.values()]
        results += [dict(_row(c), weights=weights, kind="pareto") for c in frontier]
  if _OUT.value:
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "results.json"), "w") as f:
      json.dump(dict(chip=chip.name, config=dataclasses.asdict(config), rows=results), f,
                indent=1)
    _plot(frontiers, phases, os.path.join(_OUT.value, "frontier.png"), chip.name)
    print(f"\nwrote {_OUT.value}/frontier.png and results.json")


def _plot(frontiers, phases, path, chip_name):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(1, len(phases), figsize=(6 * len(phases), 4.5), squeeze=False)
  for ax, phase in zip(axes[0], phases):
    for (name, weights, ph), frontier in sorted(frontiers.items()):
      if ph != phase:
        continue
      xs = [c.time_s * 1e3 for c in frontier]
      ys = [c.mfu * 100 for c in frontier]
      ax.plot(xs, ys, marker="o", ls="-" if weights == "bf16" else "--",
              label=f"{name} {weights}")
    ax.set_xscale("log")
    ax.set_xlabel("latency per token (ms)" if phase == "decode"
                  else "prefill latency (ms)")
    ax.set_ylabel("MFU (%)")
    ax.set_title(f"{phase}: Pareto frontier on {chip_name}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
