"""Layout planner on top of the analytical cost model (Pope et al. 2022).

`plan` enumerates feedforward layouts (ws1d, ws2d, wg_x, wg_xy, wg_xyz),
attention layouts (heads, batch) and mesh factorizations x*y*z = n for one or
several chip counts and batch sizes, prices each with
`attnlib.sharding.cost_model.estimate`, drops what is invalid (shapes that do
not divide, more head shards than heads, ...) or does not fit in HBM, and
returns the best candidate for an objective together with the latency-vs-MFU
Pareto frontier -- the paper's procedure for Figure 1 and Tables 2-3 (§4:
"select from weight-stationary and weight-gathered layouts based on the
current number of tokens in the batch" for prefill, 2D weight-stationary for
decode).

Example:
  >>> from attnlib.sharding import cost_model as cm, planner
  >>> p = planner.plan(cm.PALM_540B.with_int8_weights(), "tpu_v4", 64, batch=64,
  ...                  phase="decode", context_len=2048, config=cm.PAPER_CONFIG)
  >>> p.best.ffn_layout, p.best.attention_layout, p.best.mesh
  ('ws2d', 'batch_kv', (4, 4, 4))
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Sequence

from attnlib.sharding import cost_model as cm
from attnlib.sharding.chips import ChipSpec
from attnlib.sharding.chips import get_chip

__all__ = ["OBJECTIVES", "Plan", "mesh_factorizations", "pareto_frontier", "plan"]

OBJECTIVES = ("latency", "mfu", "cost")


@dataclasses.dataclass(frozen=True)
class Plan:
  """Result of `plan`.

  Attributes:
    best: the chosen candidate.
    objective: what `best` optimizes.
    candidates: every valid (and, with require_fit, fitting) candidate,
      one per distinct cost (equivalent meshes collapsed), sorted by objective.
    pareto: the candidates not dominated in (lower latency, higher MFU), by
      increasing latency.
    rejected: (description, reason) of each candidate that was dropped.
  """

  best: cm.InferenceCost
  objective: str
  candidates: tuple[cm.InferenceCost, ...]
  pareto: tuple[cm.InferenceCost, ...]
  rejected: tuple[tuple[str, str], ...]

  def table(self, limit: int | None = None) -> str:
    """Plain-text table of the candidates."""
    rows = [f"{'ffn':7} {'attn':5} {'mesh':9} {'chips':>5} {'batch':>5} {'time ms':>11} "
            f"{'MFU':>6} {'bound':>13}"]
    for c in self.candidates[:limit]:
      x, y, z = c.mesh
      rows.append(f"{c.ffn_layout:7} {c.attention_layout:5} {f'{x}x{y}x{z}':9} {c.n_chips:5d} "
                  f"{c.batch:5d} {c.time_s * 1e3:11.3f} {c.mfu:6.1%} {c.bound:>13}")
    return "\n".join(rows)


def mesh_factorizations(n: int, *, axis_sizes: Iterable[int] | None = None,
                        max_axes: int = 3) -> list[tuple[int, int, int]]:
  """All ordered (x, y, z) with x * y * z == n, the most balanced first.

  Args:
    n: number of chips.
    axis_sizes: if given, every axis of size > 1 must be one of these (e.g.
      the torus axis lengths a slice allows).
    max_axes: at most this many axes larger than 1 (1, 2 or 3).

  Raises:
    ValueError: n < 1, max_axes not in 1..3, or no factorization meets the
      constraints ("n not factorable as requested").
  """
  if int(n) != n or n < 1:
    raise ValueError(f"number of chips must be a positive integer, got {n!r}")
  if max_axes not in (1, 2, 3):
    raise ValueError(f"max_axes must be 1, 2 or 3, got {max_axes!r}")
  allowed = None if axis_sizes is None else {int(a) for a in axis_sizes}
  divisors = [d for d in range(1, n + 1) if n % d == 0]
  out = []
  for x in divisors:
    for y in divisors:
      if (n // x) % y:
        continue
      z = n // x // y
      mesh = (x, y, z)
      if sum(m > 1 for m in mesh) > max_axes:
        continue
      if allowed is not None and any(m > 1 and m not in allowed for m in mesh):
        continue
      out.append(mesh)
  out.sort(key=lambda m: (max(m), m))  # most balanced first
  if not out:
    raise ValueError(f"{n} chips cannot be factored as requested "
                     f"(axis_sizes={sorted(allowed or [])}, max_axes={max_axes})")
  return out


def pareto_frontier(costs: Sequence[cm.InferenceCost]) -> list[cm.InferenceCost]:
  """Candidates not dominated in (lower time_s, higher MFU), by increasing time."""
  out: list[cm.InferenceCost] = []
  best_mfu = -1.0
  for c in sorted(costs, key=lambda c: (c.time_s, -c.mfu)):
    if c.mfu > best_mfu * (1 + 1e-12):
      out.append(c)
      best_mfu = c.mfu
  return out


def _as_tuple(v) -> tuple[int, ...]:
  if isinstance(v, Iterable) and not isinstance(v, (str, bytes)):
    return tuple(int(i) for i in v)
  return (int(v),)


def _key(objective: str):
  if objective == "latency":
    return lambda c: (c.time_s, -c.mfu, c.network_bytes)
  if objective == "mfu":
    return lambda c: (-c.mfu, c.time_s, c.network_bytes)
  return lambda c: (c.cost_chip_s_per_token, c.time_s, c.network_bytes)


def plan(model: cm.ModelSpec, chip: ChipSpec | str, n_chips: int | Sequence[int], *,
         batch: int | Sequence[int], phase: str, seq_len: int | None = None,
         context_len: int | None = None, objective: str = "latency",
         ffn_layouts: Sequence[str] = cm.FFN_LAYOUTS,
         attention_layouts: Sequence[str] = cm.ATTENTION_LAYOUTS,
         meshes: Sequence[Sequence[int]] | None = None, axis_sizes: Iterable[int] | None = None,
         config: cm.CostConfig | None = None, require_fit: bool = True,
         max_latency_s: float | None = None) -> Plan:
  """Best layout and mesh for a model, chip, chip count(s) and batch size(s).

  Args:
    model, chip: what to run where.
    n_chips: a chip count or several.
    batch: a batch size or several.
    phase, seq_len, context_len: as in cost_model.estimate.
    objective: "latency" (lowest step time), "mfu" (highest MFU) or "cost"
      (fewest chip-seconds per token). With a single chip count and batch,
      all three rank alike; they differ across chip counts and batches.
    ffn_layouts, attention_layouts: the layouts to consider.
    meshes: explicit (x, y, z) meshes instead of all factorizations; each must
      multiply to one of n_chips.
    axis_sizes: passed to mesh_factorizations.
    config: cost_model.CostConfig.
    require_fit: drop candidates whose weights + KV cache exceed HBM.
    max_latency_s: drop candidates slower than this (e.g. "best MFU within a
      latency budget").

  Raises:
    ValueError: unknown objective / layout names, an explicit mesh of the
      wrong size, a chip count that cannot be factored as requested, or no
      valid candidate (the message lists why each was rejected).
  """
  chip = get_chip(chip)
  config = config or cm.CostConfig()
  if objective not in OBJECTIVES:
    raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
  for name in ffn_layouts:
    if name not in cm.FFN_LAYOUTS:
      raise ValueError(f"unknown feedforward layout {name!r}; expected one of {cm.FFN_LAYOUTS}")
  for name in attention_layouts:
    if name not in cm.ATTENTION_LAYOUTS:
      raise ValueError(f"unknown attention layout {name!r}; expected one of "
                       f"{cm.ATTENTION_LAYOUTS}")
  if phase not in cm.PHASES:
    raise ValueError(f"unknown phase {phase!r}; expected one of {cm.PHASES}")
  chip_counts = _as_tuple(n_chips)
  batches = _as_tuple(batch)
  if not chip_counts or not batches:
    raise ValueError("need at least one chip count and one batch size")
  if any(b < 1 for b in batches):
    raise ValueError(f"batch sizes must be >= 1, got {batches}")

  mesh_lists: dict[int, list[tuple[int, int, int]]] = {}
  if meshes is not None:
    for m in meshes:
      mt = cm._mesh_tuple(m)  # pylint: disable=protected-access
      size = mt[0] * mt[1] * mt[2]
      if size not in chip_counts:
        raise ValueError(f"mesh {tuple(m)} has {size} chips, not one of n_chips={chip_counts}")
      mesh_lists.setdefault(size, []).append(mt)
    missing = [n for n in chip_counts if n not in mesh_lists]
    if missing:
      raise ValueError(f"no mesh given for n_chips={missing}")
  else:
    for n in chip_counts:
      mesh_lists[n] = mesh_factorizations(n, axis_sizes=axis_sizes)

  kept: dict[tuple, cm.InferenceCost] = {}
  rejected: list[tuple[str, str]] = []
  for n, b, ffn, att in itertools.product(chip_counts, batches, ffn_layouts, attention_layouts):
    for mesh in mesh_lists[n]:
      desc = f"{ffn}/{att} mesh {'x'.join(map(str, mesh))} batch {b}"
      try:
        c = cm.estimate(model, chip, n, batch=b, phase=phase, seq_len=seq_len,
                        context_len=context_len, ffn_layout=ffn, attention_layout=att,
                        mesh=mesh, config=config)
      except ValueError as err:
        rejected.append((desc, str(err)))
        continue
      if require_fit and not c.fits:
        rejected.append((desc, f"needs {c.memory_capacity_bytes / 2**30:.1f} GiB per chip, "
                               f"HBM holds {chip.hbm_bytes / 2**30:.1f} GiB"))
        continue
      if max_latency_s is not None and c.time_s > max_latency_s:
        rejected.append((desc, f"{c.time_s:.4g} s exceeds max_latency_s={max_latency_s}"))
        continue
      key = (n, b, ffn, att, round(c.time_s, 15), round(c.network_bytes, 3),
             round(c.memory_capacity_bytes))
      kept.setdefault(key, c)  # equivalent meshes collapse onto the first one
  if not kept:
    reasons = sorted({r for _, r in rejected})
    raise ValueError("no valid layout for this request:\n  " + "\n  ".join(reasons[:12]))
  candidates = sorted(kept.values(), key=_key(objective))
  return Plan(best=candidates[0], objective=objective, candidates=tuple(candidates),
              pareto=tuple(pareto_frontier(candidates)), rejected=tuple(rejected))
