"""experiments/bench.py: its FLOP accounting, and a CPU smoke run of every op."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import bench  # pylint: disable=wrong-import-position


@pytest.mark.parametrize("t,left,right", [(1, 0, 0), (9, 3, 0), (9, 2, 5), (6, 10, 10)])
def test_window_pairs_counts_the_mask(t, left, right):
  i, j = np.meshgrid(np.arange(t), np.arange(t), indexing="ij")
  mask = (j >= i - left) & (j <= i + right)
  assert bench._window_pairs(t, left, right) == mask.sum()  # pylint: disable=protected-access


_SMOKE = {
    "linear_attention": ["--decay=gate"],
    "sliding_window_attention": ["--window=8"],
    "neighborhood_attention": ["--spatial_dims=2", "--kernel_size=3", "--seq_len=6"],
    "sigmoid_attention": [],
    "attention_scan": [],
    "attention_scan_step": [],
    "dot_product_attention": [],
}


@pytest.mark.parametrize("op", sorted(_SMOKE))
def test_bench_runs_on_cpu(op, tmp_path):
  flags = ["--batch=1", "--heads=2", "--head_dim=8", "--seq_len=24", "--dtype=float32",
           "--iters=1", "--repeats=1", "--warmup=0", "--mode=fwd_bwd",
           "--implementation=xla", "--implementation=xla_softmax",
           "--implementation=cudnn_softmax"]
  cmd = [sys.executable, str(ROOT / "experiments" / "bench.py"), f"--op={op}",
         f"--out={tmp_path}", *flags, *_SMOKE[op]]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tmp_path / "results.json").read_text())
  rows = {r["implementation"]: r for r in report["rows"]}
  assert rows["xla"]["ms"] > 0 and rows["xla_softmax"]["ms"] > 0
  assert "error" in rows["cudnn_softmax"]  # no GPU here: reported, not crashed
  assert "speedup" in result.stdout
  assert (tmp_path / "plot.png").stat().st_size > 0


def test_bench_profile_and_min_time_on_cpu(tmp_path):
  cmd = [sys.executable, str(ROOT / "experiments" / "bench.py"), "--op=linear_attention",
         "--batch=1", "--heads=2", "--head_dim=8", "--seq_len=24", "--dtype=float32",
         "--iters=2", "--repeats=1", "--warmup=0", "--min_time=0.05", "--profile",
         "--implementation=xla", f"--out={tmp_path}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "device busy" in result.stdout
  row = json.loads((tmp_path / "results.json").read_text())["rows"][0]
  assert 0 < row["device_busy_ms"]


def test_timed_fn_random_cotangent_is_the_vjp():
  """The 'random' pullback returns o and the VJP at its appended dO: checked
  against the derivative of sin(x) * y worked out by hand in float64."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  from absl.testing import flagsaver  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  x, y = (jax.random.normal(k, (3, 5), jnp.float32) for k in jax.random.split(jax.random.key(0)))
  with flagsaver.flagsaver(mode="fwd_bwd", cotangent="random"):
    fn, args = bench._timed_fn(lambda a, b: jnp.sin(a) * b, (x, y))  # pylint: disable=protected-access
  assert len(args) == 3 and args[2].shape == x.shape
  o, (gx, gy) = fn(*args)
  x64, y64, do = (np.asarray(a, np.float64) for a in args)
  assert float(np.abs(do).max()) > 0
  np.testing.assert_allclose(o, np.sin(x64) * y64, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gx, np.cos(x64) * y64 * do, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gy, np.sin(x64) * do, rtol=1e-5, atol=1e-6)


def test_bench_random_cotangent_on_cpu(tmp_path):
  """--cotangent=random times the VJP at a random dO (an extra input), so the
  backward cannot fold dO = ones into its reductions."""
  cmd = [sys.executable, str(ROOT / "experiments" / "bench.py"),
         "--op=sliding_window_attention", "--window=8", "--batch=1", "--heads=2",
         "--head_dim=8", "--seq_len=24", "--dtype=float32", "--iters=1", "--repeats=1",
         "--warmup=0", "--mode=fwd_bwd", "--cotangent=random", "--implementation=xla",
         "--implementation=xla_softmax", f"--out={tmp_path}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = json.loads((tmp_path / "results.json").read_text())["rows"]
  assert [r["cotangent"] for r in rows] == ["random", "random"]
  assert all(r["ms"] > 0 and "error" not in r for r in rows)


def test_bench_rejects_a_negative_min_time(tmp_path):
  cmd = [sys.executable, str(ROOT / "experiments" / "bench.py"), "--min_time=-1",
         f"--out={tmp_path}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)
  assert result.returncode != 0
  assert "min_time" in result.stderr and not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("op,variant,extra", [
    ("sliding_window_attention", bench.SWA_FUSED_BWD, ["--window=16"]),
    ("sliding_window_attention", bench.SWA_PERSISTENT_BWD, ["--window=16"]),
    ("sliding_window_attention", bench.PINGPONG, ["--window=16"]),
    ("sliding_window_attention", "mosaic_gpu_ws_fwd", ["--window=16"]),
    ("sigmoid_attention", bench.NO_PINGPONG, ["--window=16"]),
    ("sigmoid_attention", bench.NO_PINGPONG, ["--nocausal"]),
    ("sigmoid_attention", bench.BATCH_FASTEST, ["--nocausal"]),
    ("sliding_window_attention", bench.FULL_EXIT_WAIT, ["--window=16"]),
    ("neighborhood_attention", bench.DIVIDE,
     ["--spatial_dims=1", "--kernel_size=3"]),
    ("neighborhood_attention", bench.NA_BIAS_MASK,
     ["--spatial_dims=2", "--kernel_size=3", "--seq_len=16"]),
    ("neighborhood_attention", bench.NA_LONG_Q,
     ["--spatial_dims=2", "--kernel_size=3", "--seq_len=16"]),
    ("sliding_window_attention", bench.SWA_UNFOLDED, ["--window=16"]),
    ("sliding_window_attention", bench.SWA_DQ_WAITS_BOTH, ["--window=16"]),
    ("sliding_window_attention", bench.SWA_PV_FIRST, ["--window=16"]),
    ("sliding_window_attention", bench.SWA_ONE_LOOP, ["--window=16"]),
    ("sliding_window_attention", bench.SWA_SPLIT_DKV, ["--window=16"])])
def test_bench_kernel_options_in_interpret_mode(op, variant, extra, tmp_path):
  """A kernel-option variant runs (Mosaic GPU interpreter) beside the op's
  own mosaic_gpu row."""
  cmd = [sys.executable, str(ROOT / "experiments" / "bench.py"), f"--op={op}",
         "--batch=1", "--heads=1", "--head_dim=64",
         *([] if any(x.startswith("--seq_len") for x in extra)
           else ["--seq_len=128"]), "--dtype=bfloat16", "--iters=1", "--repeats=1", "--warmup=0",
         "--mode=fwd_bwd", "--interpret", "--implementation=mosaic_gpu",
         f"--implementation={variant}", f"--out={tmp_path}", *extra]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = {r["implementation"]: r
          for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
  assert rows["mosaic_gpu"]["ms"] > 0 and rows[variant]["ms"] > 0, rows
