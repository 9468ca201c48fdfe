"""experiments/partition_study.py: a tiny sweep as a subprocess."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(*flags, timeout=300):
  cmd = [sys.executable, str(ROOT / "experiments" / "partition_study.py"), *flags]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                        check=False)


def test_tiny_sweep_prints_frontier_and_writes_png(tmp_path):
  result = _run("--models=palm-8b", "--chips=4", "--chips=16", "--batches=1", "--batches=64",
                "--weights=bf16", "--weights=int8", "--phase=both", f"--out={tmp_path}")
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  for phase in ("prefill", "decode"):
    assert f"== palm-8b bf16 {phase} on tpu_v4: best layout per batch" in out
    assert f"-- palm-8b int8 {phase} on tpu_v4: Pareto frontier (latency vs MFU)" in out
  # Table rows: batch, chips, ffn layout, attention layout, mesh, latency, MFU.
  rows = [line.split() for line in out.splitlines()
          if line.split()[:1] in (["1"], ["64"]) and len(line.split()) == 8]
  assert rows
  assert {r[2] for r in rows} <= {"ws1d", "ws2d", "wg_x", "wg_xy", "wg_xyz"}
  assert {r[3] for r in rows} <= {"heads", "batch_kv"}
  assert all(r[1] in ("4", "16") and r[6].endswith("%") for r in rows)
  png = tmp_path / "frontier.png"
  assert png.stat().st_size > 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  report = json.loads((tmp_path / "results.json").read_text())
  assert report["chip"] == "tpu_v4"
  kinds = {r["kind"] for r in report["rows"]}
  assert kinds == {"best", "pareto"}


def test_reproduce_prints_the_paper_table():
  result = _run("--reproduce")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "| `table1_optimized_mq_b128` |" in result.stdout
  assert "| `prefill_b512` |" in result.stdout
