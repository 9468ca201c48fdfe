"""Per-kernel device time of a jitted call, read from a jax.profiler trace.

Wall-clock timing (bench.py) tells how long a call takes; this tells where the
time goes: which device kernels one call launches, how long each runs, and how
much of the call is gaps between kernels (launch latency, host dispatch).

  rows, summary = profile(fn, args, iters=10)
  print(format_table(rows, summary))

On a GPU the kernels are the events on the "Stream" lines of the
"/device:GPU:<n>" planes of the trace (one event per kernel launch). On CPU
the same parser reads XLA's host thunks ("/host:CPU", "tf_XLA" lines), which
is what the tests use.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import tempfile
from collections.abc import Callable, Sequence

import jax


@dataclasses.dataclass(frozen=True)
class KernelRow:
  name: str
  launches_per_call: float
  us_per_call: float      # summed durations of its launches, per call


@dataclasses.dataclass(frozen=True)
class Summary:
  calls: int
  busy_us_per_call: float   # union of all kernel intervals, per call
  span_us_per_call: float   # first kernel start to last kernel end, per call


def _intervals(profile_data, plane_prefix: str, line_prefix: str):
  """(name, start_ns, end_ns) of every event on the matching planes/lines."""
  out = []
  for plane in profile_data.planes:
    if not plane.name.startswith(plane_prefix):
      continue
    for line in plane.lines:
      if not line.name.startswith(line_prefix):
        continue
      for ev in line.events:
        if ev.duration_ns > 0:
          out.append((ev.name, ev.start_ns, ev.start_ns + ev.duration_ns))
  return out


def summarize(intervals: Sequence[tuple[str, float, float]], calls: int
              ) -> tuple[list[KernelRow], Summary]:
  """Aggregates (name, start, end) intervals in ns over `calls` calls."""
  if calls < 1:
    raise ValueError(f"calls={calls}: expected >= 1")
  per_name: dict[str, list[float]] = {}
  for name, start, end in intervals:
    per_name.setdefault(name, []).append(end - start)
  rows = sorted((KernelRow(name, len(d) / calls, sum(d) / calls / 1e3)
                 for name, d in per_name.items()),
                key=lambda r: -r.us_per_call)
  busy, last_end = 0.0, -float("inf")
  for _, start, end in sorted(intervals, key=lambda i: i[1]):
    if end > last_end:
      busy += end - max(start, last_end)
      last_end = end
  span = (max(e for _, _, e in intervals) - min(s for _, s, _ in intervals)
          if intervals else 0.0)
  return rows, Summary(calls, busy / calls / 1e3, span / calls / 1e3)


def profile(fn: Callable, args: tuple, *, iters: int = 10,
            plane_prefix: str | None = None, line_prefix: str | None = None
            ) -> tuple[list[KernelRow], Summary]:
  """Traces `iters` back-to-back calls of the (already compiled) `fn(*args)`.

  plane_prefix, line_prefix: which trace lines hold kernels; default: the
  GPU's streams on a GPU, XLA's CPU thunks otherwise.
  """
  if iters < 1:
    raise ValueError(f"iters={iters}: expected >= 1")
  on_gpu = jax.default_backend() == "gpu"
  plane_prefix = plane_prefix or ("/device:GPU" if on_gpu else "/host:CPU")
  line_prefix = line_prefix or ("Stream" if on_gpu else "tf_XLA")
  jax.block_until_ready(fn(*args))
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    try:
      out = None
      for _ in range(iters):
        out = fn(*args)
      jax.block_until_ready(out)
    finally:
      jax.profiler.stop_trace()
    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not files:
      raise RuntimeError(f"no .xplane.pb written under {trace_dir}")
    data = jax.profiler.ProfileData.from_file(files[0])
  return summarize(_intervals(data, plane_prefix, line_prefix), iters)


def format_table(rows: Sequence[KernelRow], summary: Summary, top: int = 8) -> str:
  lines = [f"  device busy {summary.busy_us_per_call:.1f} us/call, span "
           f"{summary.span_us_per_call:.1f} us/call over {summary.calls} calls"]
  for r in rows[:top]:
    lines.append(f"  {r.us_per_call:>10.1f} us  x{r.launches_per_call:<4g} {r.name[:90]}")
  if len(rows) > top:
    rest = sum(r.us_per_call for r in rows[top:])
    lines.append(f"  {rest:>10.1f} us  ({len(rows) - top} more kernels)")
  return "\n".join(lines)
