"""experiments/kernel_profile.py: the interval arithmetic, and a real trace on CPU."""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import kernel_profile  # pylint: disable=wrong-import-position


def test_summarize_counts_overlaps_once_and_gaps_not_at_all():
  # Two calls: a [0, 10) and b [5, 20) overlap; a [100, 110) after a gap.
  intervals = [("a", 0, 10_000), ("b", 5_000, 20_000), ("a", 100_000, 110_000)]
  rows, summary = kernel_profile.summarize(intervals, calls=2)
  by_name = {r.name: r for r in rows}
  assert by_name["a"].launches_per_call == 1.0
  assert by_name["a"].us_per_call == pytest.approx(10.0)    # (10 + 10) / 2 us
  assert by_name["b"].us_per_call == pytest.approx(7.5)     # 15 / 2 us
  assert summary.busy_us_per_call == pytest.approx(15.0)    # (20 + 10) / 2 us
  assert summary.span_us_per_call == pytest.approx(55.0)    # 110 / 2 us
  assert [r.name for r in rows] == ["a", "b"]                # longest first


def test_summarize_rejects_zero_calls():
  with pytest.raises(ValueError, match="calls=0"):
    kernel_profile.summarize([], calls=0)


def test_profile_reads_the_kernels_of_a_real_trace():
  fn = jax.jit(lambda x: jnp.tanh(x @ x).sum())
  x = jnp.ones((128, 128), jnp.float32)
  rows, summary = kernel_profile.profile(fn, (x,), iters=3)
  top = rows[0]   # the one fusion of matmul, tanh and sum (its name varies)
  assert top.launches_per_call == pytest.approx(1.0)
  assert 0 < top.us_per_call <= summary.busy_us_per_call * 1.001
  assert summary.busy_us_per_call <= summary.span_us_per_call
  table = kernel_profile.format_table(rows, summary)
  assert "device busy" in table and top.name[:20] in table
