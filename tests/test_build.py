"""The Bazel BUILD file covers every module, and builds where Bazel exists."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _build_targets() -> dict[str, dict]:
  """Evaluates BUILD (Starlark here is plain Python syntax) with a stub py_library."""
  targets = {}

  def py_library(name, **kwargs):
    targets[name] = kwargs

  exec(compile((ROOT / "BUILD").read_text(), "BUILD", "exec"),  # pylint: disable=exec-used
       {"py_library": py_library})
  return targets


@pytest.mark.parametrize("package", ["attnlib", "kernels_pallas"])
def test_build_srcs_cover_every_module(package):
  targets = _build_targets()
  assert package in targets, f"BUILD has no py_library named {package!r}"
  listed = set(targets[package]["srcs"])
  on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / package).rglob("*.py")}
  assert listed == on_disk, (
      f"//:{package} srcs differ from the modules on disk: missing "
      f"{sorted(on_disk - listed)}, stale {sorted(listed - on_disk)}")


def test_attnlib_target_depends_on_kernels():
  assert ":kernels_pallas" in _build_targets()["attnlib"].get("deps", [])


@pytest.mark.skipif(shutil.which("bazel") is None, reason="bazel is not installed")
def test_bazel_build():
  result = subprocess.run(
      ["bazel", "build", "//:attnlib", "//:kernels_pallas"], cwd=ROOT,
      capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
